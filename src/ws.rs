//! One WebSocket connection: authenticate, register the session, then a
//! reader loop that decodes frames and runs requests concurrently, and a
//! writer task that drains the session's bounded outbound queue.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use serde_json::{Map, Value};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::auth::{Identity, unix_now};
use crate::gateway::{Gateway, LocalCall, MeshClient, refusal};
use crate::mesh::{Call, MeshError};
use crate::protocol::{ClientCall, ClientFrame, ErrorBody, ErrorName, ServerFrame};
use crate::routing::validate_topic_pattern;
use crate::session::{
    CLOSE_AUTH_REQUIRED, CLOSE_NORMAL, CLOSE_TOKEN_EXPIRED, Outbox, SessionGuard, SessionInfo,
};

fn text(frame: &ServerFrame) -> Message {
    Message::Text(frame.to_json().into())
}

fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.to_owned().into(),
    }))
}

/// Wait for `{"type":"authenticate"}` as the first frame.
async fn first_frame_auth(gw: &Gateway, socket: &mut WebSocket) -> Option<Identity> {
    let limits = &gw.0.config.limits;
    let deadline = tokio::time::sleep(limits.auth_timeout);
    tokio::pin!(deadline);
    loop {
        let msg = tokio::select! {
            _ = &mut deadline => {
                let _ = socket.send(text(&ServerFrame::error(ErrorName::Unauthorized,
                    "no token: send an `authenticate` frame first", None))).await;
                let _ = socket.send(close(CLOSE_AUTH_REQUIRED, "authentication timed out")).await;
                return None;
            }
            _ = gw.0.shutdown.cancelled() => return None,
            msg = socket.recv() => msg,
        };
        let refuse = |desc: String| ServerFrame::error(ErrorName::Unauthorized, desc, None);
        match msg {
            Some(Ok(Message::Text(t))) => match ClientFrame::decode(t.as_str()) {
                Ok(ClientFrame::Authenticate(a)) => match gw.0.auth.authenticate(&a.token).await {
                    Ok(id) => return Some(id),
                    Err(e) => {
                        let _ = socket.send(text(&refuse(e.to_string()))).await;
                        let _ = socket
                            .send(close(CLOSE_AUTH_REQUIRED, "authentication failed"))
                            .await;
                        return None;
                    }
                },
                _ => {
                    let _ = socket
                        .send(text(&refuse(
                            "authenticate first: send an `authenticate` frame".into(),
                        )))
                        .await;
                    let _ = socket
                        .send(close(CLOSE_AUTH_REQUIRED, "authentication required"))
                        .await;
                    return None;
                }
            },
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            _ => return None,
        }
    }
}

/// Serve one upgraded socket to its end.
///
/// Two phases, so that an idle connection holds only what it needs: the
/// setup (authentication, registration, hello) runs in its own boxed future
/// that is freed once it is done; what stays alive for the connection's
/// lifetime is the [`Live`] state and the read loop.
pub(crate) fn connection(
    gw: Gateway,
    socket: WebSocket,
    identity: Option<Identity>,
) -> impl Future<Output = ()> + Send {
    let setup = Box::pin(open(gw, socket, identity));
    async move {
        // let-else, not if-let: an if-let scrutinee's temporary would keep
        // a second `Live`-sized slot for the whole connection.
        let Some(mut live) = setup.await else {
            return;
        };
        live.run().await;
    }
}

/// What an open connection keeps for its lifetime.
struct Live {
    conn: Connection,
    socket: WebSocket,
    _guard: SessionGuard,
}

/// Authenticate, register the session and queue the hello event.
async fn open(gw: Gateway, mut socket: WebSocket, identity: Option<Identity>) -> Option<Live> {
    let session_id = uuid::Uuid::new_v4().simple().to_string();
    let identity = match identity.or_else(|| gw.0.auth.anonymous(&session_id)) {
        Some(id) => id,
        None => first_frame_auth(&gw, &mut socket).await?,
    };
    let info = SessionInfo {
        session_id,
        user_id: identity.user_id.clone(),
        username: identity.username.clone(),
        roles: identity.roles.clone(),
    };
    let (guard, outbox) = gw.0.sessions.register(&info);
    gw.0.metrics.connection_opened();
    tracing::debug!(session_id = %info.session_id, user_id = %info.user_id, "session opened");

    let hello = ServerFrame::Event {
        topic: "hello".into(),
        event: gw.0.handler.hello(&info),
    };
    let _ = outbox.try_push(hello.to_json().into());
    let conn = Connection {
        in_flight: Arc::new(Semaphore::new(gw.0.config.limits.max_in_flight)),
        gw,
        info,
        identity,
        outbox,
        tasks: TaskTracker::new(),
        rate: HashMap::new(),
    };
    Some(Live {
        conn,
        socket,
        _guard: guard,
    })
}

/// One write with the configured timeout; false if it failed.
async fn send(socket: &mut WebSocket, message: Message, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, socket.send(message)).await,
        Ok(Ok(()))
    )
}

impl Live {
    /// One task per connection reads client frames and writes the session's
    /// outbox (a second writer task per socket would cost memory on every
    /// idle connection). Frames queued before a close are written, then the
    /// close frame with the session's reason.
    ///
    /// Borrows rather than consumes: a by-value `self` would be stored again
    /// in each nested future of this long-lived state machine.
    async fn run(&mut self) {
        let write_timeout = self.conn.gw.0.config.limits.write_timeout;
        let expiry = tokio::time::sleep_until(expiry_instant(self.conn.identity.expires_at));
        tokio::pin!(expiry);
        let mut reading = true;
        let mut written_ok = true;
        loop {
            tokio::select! {
                biased;
                frame = self.conn.outbox.pop() => {
                    // None: closed and drained.
                    let Some(frame) = frame else { break };
                    if !send(&mut self.socket, Message::Text(frame), write_timeout).await {
                        written_ok = false;
                        break;
                    }
                }
                _ = &mut expiry, if reading => {
                    self.conn.gw.0.sessions.close_session(
                        &self.conn.info.session_id, CLOSE_TOKEN_EXPIRED, "token expired");
                    reading = false;
                }
                // The client has stopped sending: its requests still in
                // flight are answered, then the session closes.
                _ = self.conn.tasks.wait(), if !reading => {
                    self.conn.outbox.close(CLOSE_NORMAL, "closed");
                }
                msg = self.socket.recv(), if reading => {
                    match msg {
                        Some(Ok(Message::Text(text))) => {
                            if let Some(token) = self.conn.on_text(text)
                                && let Some(exp) = Box::pin(self.conn.reauthenticate(&token)).await
                            {
                                expiry.as_mut().reset(expiry_instant(exp));
                            }
                        }
                        Some(Ok(Message::Binary(_))) => {
                            self.conn.gw.0.metrics.frame_in("binary");
                            self.conn.reply(ServerFrame::error(
                                ErrorName::InvalidMessage,
                                "binary frames are not supported; send JSON text frames",
                                None,
                            ));
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        Some(Ok(Message::Close(_))) | None => reading = false,
                        Some(Err(e)) => {
                            // A frame over tungstenite's hard cap ends up here.
                            tracing::debug!(error = %e, "websocket read error");
                            reading = false;
                        }
                    }
                    if !reading {
                        self.conn.tasks.close();
                    }
                }
            }
        }
        self.conn.outbox.close(CLOSE_NORMAL, "closed");
        if written_ok {
            let (code, why) = self
                .conn
                .outbox
                .close_reason()
                .map_or((CLOSE_NORMAL, "closed".to_owned()), |r| (r.code, r.reason));
            let _ = send(&mut self.socket, close(code, &why), write_timeout).await;
        }
        // Requests still running finish (their replies go nowhere) or are
        // bounded by their own timeouts.
        self.conn.tasks.close();
        self.conn.tasks.wait().await;
        self.conn.gw.0.metrics.connection_closed();
        tracing::debug!(session_id = %self.conn.info.session_id, "session closed");
    }
}

struct Connection {
    gw: Gateway,
    info: SessionInfo,
    identity: Identity,
    outbox: Outbox,
    in_flight: Arc<Semaphore>,
    tasks: TaskTracker,
    /// Per-route request counts in the current one-second window.
    rate: HashMap<usize, (Instant, u32)>,
}

fn expiry_instant(expires_at: Option<u64>) -> tokio::time::Instant {
    let far = tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600);
    match expires_at {
        Some(exp) => {
            let left = exp.saturating_sub(unix_now());
            tokio::time::Instant::now() + Duration::from_secs(left)
        }
        None => far,
    }
}

impl Connection {
    /// Handle one text frame without waiting; a token to re-authenticate
    /// with is handed back, since that waits on the auth hook.
    fn on_text(&mut self, text: Utf8Bytes) -> Option<String> {
        if text.len() > self.gw.0.config.limits.max_frame_bytes {
            self.gw.0.metrics.frame_in("too_large");
            let limit = self.gw.0.config.limits.max_frame_bytes;
            self.reply(ServerFrame::error(
                ErrorName::MessageTooLarge,
                format!("frames are limited to {limit} bytes"),
                None,
            ));
            return None;
        }
        match ClientFrame::decode(text.as_str()) {
            Ok(ClientFrame::Request(call)) => {
                self.gw.0.metrics.frame_in("request");
                self.start_request(call, false);
            }
            Ok(ClientFrame::Command(call)) => {
                self.gw.0.metrics.frame_in("command");
                self.start_request(call, true);
            }
            Ok(ClientFrame::Subscribe(t)) => {
                self.gw.0.metrics.frame_in("subscribe");
                self.subscribe(t.topics, true);
            }
            Ok(ClientFrame::Unsubscribe(t)) => {
                self.gw.0.metrics.frame_in("unsubscribe");
                self.subscribe(t.topics, false);
            }
            Ok(ClientFrame::Authenticate(a)) => {
                self.gw.0.metrics.frame_in("authenticate");
                return Some(a.token);
            }
            Err(e) => {
                self.gw.0.metrics.frame_in("invalid");
                self.reply(ServerFrame::error(
                    ErrorName::InvalidMessage,
                    e.description,
                    e.trace_id,
                ));
            }
        }
        None
    }

    /// Queue a frame for this client without waiting: the connection's own
    /// task drains the queue, so it must never wait for room in it. A client
    /// whose queue is full is closed as too slow.
    fn reply(&self, frame: ServerFrame) {
        self.gw
            .0
            .sessions
            .send_to_session(&self.info.session_id, frame.to_json().into());
    }

    async fn reauthenticate(&mut self, token: &str) -> Option<Option<u64>> {
        match self.gw.0.auth.authenticate(token).await {
            Ok(id) if id.user_id == self.identity.user_id => {
                let exp = id.expires_at;
                self.identity = id;
                Some(exp)
            }
            Ok(_) => {
                self.reply(ServerFrame::error(
                    ErrorName::Unauthorized,
                    "the token names another user",
                    None,
                ));
                None
            }
            Err(e) => {
                self.reply(ServerFrame::error(
                    ErrorName::Unauthorized,
                    e.to_string(),
                    None,
                ));
                None
            }
        }
    }

    fn subscribe(&self, topics: Vec<String>, add: bool) {
        if let Some(bad) = topics.iter().find_map(|t| validate_topic_pattern(t).err()) {
            self.reply(ServerFrame::error(
                ErrorName::InvalidMessage,
                format!("topic {bad}"),
                None,
            ));
            return;
        }
        let sessions = &self.gw.0.sessions;
        let now = if add {
            sessions.subscribe(&self.info.session_id, &topics)
        } else {
            sessions.unsubscribe(&self.info.session_id, &topics)
        };
        self.reply(ServerFrame::Subscribed { topics: now });
    }

    /// The mesh context the gateway builds for this client; whatever the
    /// client sent is ignored.
    fn context(&self, trace_id: &str) -> Map<String, Value> {
        let mut ctx = Map::new();
        ctx.insert("user_id".into(), Value::String(self.info.user_id.clone()));
        ctx.insert(
            "Authorization".into(),
            self.identity
                .token
                .clone()
                .map_or(Value::Null, Value::String),
        );
        ctx.insert("trace_id".into(), Value::String(trace_id.to_owned()));
        ctx.insert(
            "session_id".into(),
            Value::String(self.info.session_id.clone()),
        );
        ctx
    }

    fn rate_exceeded(&mut self, route_index: usize, limit: Option<u32>) -> bool {
        let Some(limit) = limit else { return false };
        let now = Instant::now();
        let (start, count) = self.rate.entry(route_index).or_insert((now, 0));
        if now.duration_since(*start) >= Duration::from_secs(1) {
            *start = now;
            *count = 0;
        }
        *count += 1;
        *count > limit
    }

    fn start_request(&mut self, call: ClientCall, command: bool) {
        let trace_id = call
            .trace_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        let started = Instant::now();
        let gw = self.gw.clone();
        let outbox = self.outbox.clone();
        let respond = move |outcome: Result<Value, ErrorBody>, trace_id: String| {
            let label = match &outcome {
                Ok(_) => "ok",
                Err(e) => outcome_label(&e.error),
            };
            gw.0.metrics
                .request_done(label, started.elapsed().as_secs_f64());
            let frame = match (command, outcome) {
                (true, Ok(_)) => ServerFrame::Ack { trace_id },
                (true, Err(e)) => ServerFrame::Error {
                    error: e.error,
                    description: e.description.unwrap_or_default(),
                    trace_id: Some(trace_id),
                },
                (false, Ok(result)) => ServerFrame::Response {
                    trace_id,
                    result,
                    error: None,
                },
                (false, Err(e)) => ServerFrame::Response {
                    trace_id,
                    result: Value::Null,
                    error: Some(e),
                },
            };
            let outbox = outbox.clone();
            async move {
                let _ = outbox.push(frame.to_json().into()).await;
            }
        };

        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            let limit = self.gw.0.config.limits.max_in_flight;
            let fut = respond(
                Err(refusal(
                    ErrorName::RateLimited,
                    format!("at most {limit} requests may be in flight per connection"),
                )),
                trace_id,
            );
            self.tasks.spawn(fut);
            return;
        };
        let Some(mesh) = self.gw.mesh().cloned() else {
            let fut = respond(
                Err(MeshError::Unavailable("no mesh".into()).to_client()),
                trace_id,
            );
            self.tasks.spawn(fut);
            return;
        };
        let context = self.context(&trace_id);

        if !command {
            let local = LocalCall {
                session: self.info.clone(),
                call: call.clone(),
                mesh: MeshClient::new(
                    mesh.clone(),
                    context.clone(),
                    trace_id.clone(),
                    crate::routing::DEFAULT_TIMEOUT,
                ),
            };
            if let Some(fut) = self.gw.0.handler.local_request(local) {
                self.tasks.spawn(async move {
                    let outcome = fut.await;
                    respond(outcome, trace_id).await;
                    drop(permit);
                });
                return;
            }
        }

        let routes = self.gw.0.routes.clone();
        let Some(resolved) = routes.resolve(&call.service, &call.method) else {
            let fut = respond(
                Err(refusal(
                    ErrorName::RouteNotFound,
                    format!(
                        "{}.{} is not routed by this gateway",
                        call.service, call.method
                    ),
                )),
                trace_id,
            );
            self.tasks.spawn(fut);
            return;
        };
        if !resolved.route.allows(&self.info.roles) {
            let fut = respond(
                Err(refusal(
                    ErrorName::Forbidden,
                    format!(
                        "{}.{} requires one of the roles {:?}",
                        call.service, call.method, resolved.route.roles
                    ),
                )),
                trace_id,
            );
            self.tasks.spawn(fut);
            return;
        }
        if self.rate_exceeded(resolved.route_index, resolved.route.rate_per_sec) {
            let fut = respond(
                Err(refusal(
                    ErrorName::RateLimited,
                    format!(
                        "{}.{} allows {} requests a second",
                        call.service,
                        call.method,
                        resolved.route.rate_per_sec.unwrap_or(0)
                    ),
                )),
                trace_id,
            );
            self.tasks.spawn(fut);
            return;
        }
        let mut mesh_call = Call {
            service: resolved.service.to_owned(),
            method: resolved.method.to_owned(),
            params: call.params,
            context,
            ttl: resolved.route.timeout,
            trace_id: Some(trace_id.clone()),
        };
        let handler = self.gw.0.handler.clone();
        handler.on_request(&self.info, &mut mesh_call);
        let info = self.info.clone();
        self.tasks.spawn(async move {
            let outcome = if command {
                mesh.command(mesh_call)
                    .await
                    .map(|()| Value::Null)
                    .map_err(|e| log_mesh_error(&e))
            } else {
                let sent = mesh_call.clone();
                match mesh.request(mesh_call).await {
                    Ok(v) => Ok(handler.on_response(&info, &sent, v)),
                    Err(e) => Err(log_mesh_error(&e)),
                }
            };
            respond(outcome, trace_id).await;
            drop(permit);
        });
    }
}

fn log_mesh_error(e: &MeshError) -> ErrorBody {
    if let MeshError::Unavailable(detail) = e {
        tracing::warn!(%detail, "mesh call failed");
    }
    e.to_client()
}

fn outcome_label(name: &str) -> &'static str {
    match name {
        "RouteNotFound" => "RouteNotFound",
        "Forbidden" => "Forbidden",
        "NuropbNotDeliveredError" => "NuropbNotDeliveredError",
        "Timeout" => "Timeout",
        "MeshUnavailable" => "MeshUnavailable",
        "RateLimited" => "RateLimited",
        _ => "service_error",
    }
}
