//! HTTP side of the gateway: the axum router (WebSocket endpoint, health,
//! readiness, metrics) and `serve`, which runs it until shutdown and then
//! closes every session.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::Request;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::auth::handshake_token;
use crate::gateway::Gateway;
use crate::session::Crowded;
use crate::upgrade;
use crate::ws::{Opening, SocketSpan, connection};

/// Hard cap on a frame tungstenite will read at all: a frame above
/// `max_frame_bytes` but below this gets a `MessageTooLarge` error frame and
/// the connection stays; above this the connection is dropped.
const HARD_FRAME_FACTOR: usize = 4;

#[derive(Debug, Deserialize)]
struct WsQuery {
    access_token: Option<String>,
}

impl Gateway {
    /// The routes of the gateway: the WebSocket path, `/healthz`, `/readyz`
    /// and `/metrics`. Merge a BFF's own HTTP routes into it as needed.
    pub fn router(&self) -> Router {
        let mut router = Router::new()
            .route(&self.settings().ws_path, get(ws_upgrade))
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics));
        if self.serves_console() {
            router = router
                .route("/console", get(console))
                .route("/client.ts", get(client_ts));
        }
        router.with_state(self.clone())
    }

    /// Whether `/console` and `/client.ts` are served: always in
    /// development mode, else when `console = true`.
    fn serves_console(&self) -> bool {
        self.settings().is_memory_mesh() || self.settings().console
    }

    fn origin_allowed(&self, origin: &str) -> bool {
        self.settings()
            .allowed_origins
            .iter()
            .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
    }

    /// Serve on `listener` until `shutdown` resolves (or [`Gateway::stop`]),
    /// then close every session (code 1001), wait up to the shutdown grace
    /// for connections to finish, and leave the mesh.
    ///
    /// Each TCP connection is HTTP/1.1 with a header timer
    /// (`limits.handshake_timeout_ms`): a client that sends half a request
    /// (or nothing) is dropped when it runs out, whatever it does next.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let grace = self.settings().shutdown_grace();
        let connections = TaskTracker::new();
        let accepting = tokio::spawn(accept_loop(
            self.clone(),
            listener,
            self.router(),
            connections.clone(),
        ));
        tokio::select! {
            _ = shutdown => {}
            _ = self.stopping() => {}
        }
        tracing::info!("shutting down: closing sessions");
        self.shutdown().await;
        let accepted = accepting.await;
        connections.close();
        if tokio::time::timeout(grace, connections.wait())
            .await
            .is_err()
        {
            tracing::warn!("HTTP connections still open after the shutdown grace period");
        }
        accepted.map_err(std::io::Error::other)
    }
}

/// Accept TCP connections until the gateway stops; each one is served by
/// its own task in `connections`.
async fn accept_loop(gw: Gateway, listener: TcpListener, app: Router, connections: TaskTracker) {
    loop {
        // Still accepting while the gateway drains: `/readyz` must answer
        // 503 (and upgrades are refused) until the sessions close.
        let accepted = tokio::select! {
            _ = gw.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of file descriptors (or a connection reset before it
                // was accepted): wait a little rather than spin.
                tracing::debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Nagle stays on, as with axum's own `serve`: with TCP_NODELAY every
        // frame is a packet of its own, which measured 15-20% fewer requests
        // a second at 64 in flight (`cargo bench --bench gateway --
        // --memory`) and no gain in latency at one in flight.
        connections.spawn(serve_connection(gw.clone(), tcp, app.clone()));
    }
}

async fn serve_connection(gw: Gateway, tcp: TcpStream, app: Router) {
    let service = service_fn(move |req: Request<Incoming>| app.clone().oneshot(req.map(Body::new)));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(gw.limits().handshake_timeout);
    let conn = http
        .serve_connection(TokioIo::new(tcp), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = gw.closed() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(gw.settings().shutdown_grace(), conn).await;
        }
    }
}

/// Whether a browser `origin` is the BFF's own (the `Host` it asked for):
/// the console page it served opening its socket.
fn same_origin(origin: &str, host: Option<&str>) -> bool {
    let Some(host) = host else { return false };
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|rest| rest.eq_ignore_ascii_case(host))
}

/// Whether `host` (a request's `Host` header) names this machine: a
/// loopback name or address, with or without a port.
fn loopback_host(host: Option<&str>) -> bool {
    let Some(host) = host else { return false };
    let name = match host.strip_prefix('[') {
        // [::1]:8080
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                name
            } else {
                host
            }
        }),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// In development mode the console hands out a token: only to a page the
/// developer's own browser asked for by a loopback name. A page on another
/// site that rebinds its DNS name to 127.0.0.1 sends its own name as
/// `Host`, and is refused.
fn development_host_refused(gw: &Gateway, headers: &HeaderMap) -> Option<Response> {
    if !gw.settings().is_memory_mesh() {
        return None;
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    if loopback_host(host) {
        return None;
    }
    Some(
        (
            StatusCode::FORBIDDEN,
            "development mode answers /console only to a loopback Host (localhost, 127.0.0.1, [::1])",
        )
            .into_response(),
    )
}

/// The console page; in development mode its token field holds a token
/// for `dev-user` (HS256 only).
async fn console(State(gw): State<Gateway>, headers: HeaderMap) -> Response {
    if let Some(refused) = development_host_refused(&gw, &headers) {
        return refused;
    }
    let settings = gw.settings();
    let token = crate::auth::dev_token(settings)
        .and_then(Result::ok)
        .unwrap_or_default();
    let html = crate::frontend::console_html(
        &settings.mesh_service_name,
        &settings.ws_path,
        &gw.routes(),
        &token,
    );
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        html,
    )
        .into_response()
}

/// The typed TypeScript client of this BFF's routing table.
async fn client_ts(State(gw): State<Gateway>, headers: HeaderMap) -> Response {
    if let Some(refused) = development_host_refused(&gw, &headers) {
        return refused;
    }
    let settings = gw.settings();
    let ts = crate::frontend::client_ts(
        &settings.mesh_service_name,
        &settings.ws_path,
        &gw.routes(),
        &crate::frontend::ServiceDescriptions::new(),
    );
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], ts).into_response()
}

async fn readyz(State(gw): State<Gateway>) -> Response {
    if gw.is_stopping() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    } else if gw.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else if !gw.hub().auth().ready() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the identity provider's keys have not loaded",
        )
            .into_response()
    } else {
        let why = gw
            .mesh()
            .unready_reason()
            .unwrap_or_else(|| "mesh unavailable".into());
        (StatusCode::SERVICE_UNAVAILABLE, why).into_response()
    }
}

async fn metrics(State(gw): State<Gateway>) -> Response {
    gw.is_ready();
    gw.metrics()
        .set_mesh_counts(gw.mesh().events_dropped(), gw.mesh().reconnects());
    gw.metrics().set_mesh_dropped(&gw.mesh().messages_dropped());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        gw.metrics().encode(),
    )
        .into_response()
}

async fn ws_upgrade(
    State(gw): State<Gateway>,
    Query(query): Query<WsQuery>,
    mut request: axum::extract::Request,
) -> Response {
    let accept = match upgrade::accept_key(request.method(), request.version(), request.headers()) {
        Ok(accept) => accept,
        Err(not) => return not.into_response(),
    };
    let Some(on_upgrade) = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
    else {
        return (
            StatusCode::UPGRADE_REQUIRED,
            "this connection cannot be upgraded",
        )
            .into_response();
    };
    let headers = request.headers();
    if gw.is_stopping() {
        gw.metrics().connection_refused("shutting_down");
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        let allowed = origin
            .to_str()
            .is_ok_and(|o| gw.origin_allowed(o) || (gw.serves_console() && same_origin(o, host)));
        if !allowed {
            return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
        }
    }
    let query_token = query.access_token.as_deref();
    let identity = match handshake_token(headers, query_token) {
        Some(token) => match gw.hub().auth().authenticate(&token).await {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::debug!(error = %e, "handshake refused");
                return (StatusCode::UNAUTHORIZED, e.to_string()).into_response();
            }
        },
        None => None,
    };
    // A socket that has not said who it is yet costs its buffers and a
    // task for up to `auth_timeout`: their number is capped.
    let unauthenticated = if identity.is_none() && gw.hub().auth().anonymous("").is_none() {
        match gw.sessions().wait_for_auth(gw.limits().max_unauthenticated) {
            Some(wait) => Some(wait),
            None => {
                gw.metrics().connection_refused("unauthenticated");
                let why = "too many sockets are waiting to authenticate; send the token with the upgrade or retry";
                return (StatusCode::SERVICE_UNAVAILABLE, why).into_response();
            }
        }
    } else {
        None
    };
    let user = identity.as_ref().map(|i| i.user_id.as_str());
    let admission = match gw.sessions().admit(user, gw.caps()) {
        Ok(admission) => admission,
        Err(Crowded::Total(limit)) => {
            gw.metrics().connection_refused("max_connections");
            let why = format!("this gateway holds its limit of {limit} connections");
            return (StatusCode::SERVICE_UNAVAILABLE, why).into_response();
        }
        Err(Crowded::User(limit)) => {
            gw.metrics().connection_refused("per_user");
            let why = format!("at most {limit} connections per user");
            return (StatusCode::TOO_MANY_REQUESTS, why).into_response();
        }
    };
    let limits = gw.limits();
    let hard_cap = limits.max_frame_bytes.saturating_mul(HARD_FRAME_FACTOR);
    let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok());
    let span = SocketSpan::begin(gw.hub().spans(), traceparent);
    // The frame caps; the socket sets tungstenite's buffers (`socket`).
    let config = WebSocketConfig::default()
        .max_message_size(Some(hard_cap))
        .max_frame_size(Some(hard_cap));
    let tasks = gw.tasks().clone();
    tasks.spawn(connection(Opening {
        gw,
        upgrade: on_upgrade,
        config,
        identity,
        admission,
        unauthenticated,
        span,
    }));
    upgrade::switching(&accept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_are_the_developers_own() {
        for host in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:8080",
            "127.9.9.9",
            "[::1]:8080",
            "app.localhost:3000",
            "LOCALHOST.",
        ] {
            assert!(loopback_host(Some(host)), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8080",
            "10.0.0.5:8080",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "",
        ] {
            assert!(!loopback_host(Some(host)), "{host}");
        }
        assert!(!loopback_host(None));
    }
}
