//! HTTP side of the gateway: the axum router (WebSocket endpoint, health,
//! readiness, metrics) and `serve`, which runs it until shutdown and then
//! closes every session.

use std::future::Future;

use axum::Router;
use axum::extract::{Query, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use tokio::net::TcpListener;

use crate::auth::handshake_token;
use crate::gateway::Gateway;
use crate::ws::connection;

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
        Router::new()
            .route(&self.settings().ws_path, get(ws_upgrade))
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(self.clone())
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
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let grace = self.settings().shutdown_grace();
        let app = self.router();
        let stopping = self.clone();
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopping.stopping().await })
                .await
        });
        tokio::select! {
            _ = shutdown => {}
            _ = self.stopping() => {}
        }
        tracing::info!("shutting down: closing sessions");
        self.shutdown().await;
        match tokio::time::timeout(grace, server).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(std::io::Error::other(join)),
            Err(_) => {
                tracing::warn!("HTTP server did not stop within the grace period");
                Ok(())
            }
        }
    }
}

async fn readyz(State(gw): State<Gateway>) -> Response {
    if gw.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "mesh unavailable").into_response()
    }
}

async fn metrics(State(gw): State<Gateway>) -> Response {
    gw.is_ready();
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
    headers: HeaderMap,
    Query(query): Query<WsQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    if gw.is_stopping() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let allowed = origin.to_str().is_ok_and(|o| gw.origin_allowed(o));
        if !allowed {
            return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
        }
    }
    let query_token = query.access_token.as_deref();
    let identity = match handshake_token(&headers, query_token) {
        Some(token) => match gw.hub().auth().authenticate(&token).await {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::debug!(error = %e, "handshake refused");
                return (StatusCode::UNAUTHORIZED, e.to_string()).into_response();
            }
        },
        None => None,
    };
    let limits = gw.limits();
    let tasks = gw.tasks().clone();
    ws.read_buffer_size(limits.read_buffer_bytes)
        .write_buffer_size(0)
        .max_message_size(limits.max_frame_bytes.saturating_mul(HARD_FRAME_FACTOR))
        .max_frame_size(limits.max_frame_bytes.saturating_mul(HARD_FRAME_FACTOR))
        .on_upgrade(move |socket| tasks.track_future(connection(gw, socket, identity)))
}
