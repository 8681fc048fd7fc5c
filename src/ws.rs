//! One WebSocket connection: authenticate, register the session, then a
//! reader loop that decodes frames and runs requests concurrently, and a
//! writer task that drains the session's bounded outbound queue.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Map, Value};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::auth::{Identity, unix_now};
use crate::gateway::{Gateway, LocalCall, MeshClient, refusal};
use crate::mesh::{BoxFuture, Call, MeshError};
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

/// What an open connection keeps: its reader state, the read half of the
/// socket and the writer task.
struct Live {
    conn: Connection,
    stream: SplitStream<WebSocket>,
    writer: tokio::task::JoinHandle<()>,
    _guard: SessionGuard,
}

/// Authenticate, register the session, start the writer and queue the
/// hello event.
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

    let (sink, stream) = socket.split();
    let hello = ServerFrame::Event {
        topic: "hello".into(),
        event: gw.0.handler.hello(&info),
    };
    let _ = outbox.try_push(hello.to_json().into());

    let writer = tokio::spawn(write_loop(
        sink,
        outbox.clone(),
        gw.0.config.limits.write_timeout,
    ));
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
        stream,
        writer,
        _guard: guard,
    })
}

/// Drain the session's outbound queue into the socket until the session
/// closes, then send the close frame with the session's close reason.
async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    outbox: Outbox,
    write_timeout: Duration,
) {
    let mut drained_ok = true;
    while let Some(frame) = outbox.pop().await {
        match tokio::time::timeout(write_timeout, sink.send(Message::Text(frame))).await {
            Ok(Ok(())) => {}
            _ => {
                drained_ok = false;
                break;
            }
        }
    }
    // Stops the reader too when the write side failed.
    outbox.close(CLOSE_NORMAL, "closed");
    if drained_ok {
        let (code, why) = outbox
            .close_reason()
            .map_or((CLOSE_NORMAL, "closed".to_owned()), |r| (r.code, r.reason));
        let _ = tokio::time::timeout(write_timeout, sink.send(close(code, &why))).await;
    }
    // Completes the closing handshake when the client started it (the reply
    // tungstenite queued is flushed here), then shuts the socket down.
    let _ = tokio::time::timeout(write_timeout, sink.close()).await;
}

impl Live {
    /// Borrows rather than consumes: a by-value `self` would be stored again
    /// in each nested future of this long-lived state machine.
    async fn run(&mut self) {
        self.conn.read_loop(&mut self.stream).await;
        self.conn.outbox.close(CLOSE_NORMAL, "closed");
        let _ = (&mut self.writer).await;
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
    async fn read_loop(&mut self, stream: &mut SplitStream<WebSocket>) {
        let expiry = tokio::time::sleep_until(expiry_instant(self.identity.expires_at));
        tokio::pin!(expiry);
        loop {
            let msg = tokio::select! {
                _ = self.outbox.closed() => break,
                _ = &mut expiry => {
                    self.gw.0.sessions.close_session(&self.info.session_id, CLOSE_TOKEN_EXPIRED, "token expired");
                    break;
                }
                msg = stream.next() => msg,
            };
            let text = match msg {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Binary(_))) => {
                    self.gw.0.metrics.frame_in("binary");
                    self.reply(ServerFrame::error(
                        ErrorName::InvalidMessage,
                        "binary frames are not supported; send JSON text frames",
                        None,
                    ))
                    .await;
                    continue;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Close(_))) | None => break,
                Some(Err(e)) => {
                    // A frame over tungstenite's hard cap ends up here.
                    tracing::debug!(error = %e, "websocket read error");
                    break;
                }
            };
            if text.len() > self.gw.0.config.limits.max_frame_bytes {
                self.gw.0.metrics.frame_in("too_large");
                let limit = self.gw.0.config.limits.max_frame_bytes;
                self.reply(ServerFrame::error(
                    ErrorName::MessageTooLarge,
                    format!("frames are limited to {limit} bytes"),
                    None,
                ))
                .await;
                continue;
            }
            match ClientFrame::decode(text.as_str()) {
                Ok(ClientFrame::Request(call)) => {
                    self.gw.0.metrics.frame_in("request");
                    if let Some(refused) = self.start_request(call, false) {
                        self.reply_bytes(refused).await;
                    }
                }
                Ok(ClientFrame::Command(call)) => {
                    self.gw.0.metrics.frame_in("command");
                    if let Some(refused) = self.start_request(call, true) {
                        self.reply_bytes(refused).await;
                    }
                }
                Ok(ClientFrame::Subscribe(t)) => {
                    self.gw.0.metrics.frame_in("subscribe");
                    Box::pin(self.subscribe(t.topics, true)).await;
                }
                Ok(ClientFrame::Unsubscribe(t)) => {
                    self.gw.0.metrics.frame_in("unsubscribe");
                    Box::pin(self.subscribe(t.topics, false)).await;
                }
                Ok(ClientFrame::Authenticate(a)) => {
                    self.gw.0.metrics.frame_in("authenticate");
                    if let Some(exp) = Box::pin(self.reauthenticate(&a.token)).await {
                        expiry.as_mut().reset(expiry_instant(exp));
                    }
                }
                Err(e) => {
                    self.gw.0.metrics.frame_in("invalid");
                    self.reply(ServerFrame::error(
                        ErrorName::InvalidMessage,
                        e.description,
                        e.trace_id,
                    ))
                    .await;
                }
            }
        }
        self.tasks.close();
        // Requests still running finish (their replies go nowhere) or are
        // bounded by their own timeouts.
        self.tasks.wait().await;
    }

    /// Queue a frame for this client, waiting while its queue is full.
    /// Boxed: replies are off the request path, and an inline future would
    /// grow every idle connection's state by its size.
    fn reply(&self, frame: ServerFrame) -> BoxFuture<'_, ()> {
        self.reply_bytes(frame.to_json().into())
    }

    fn reply_bytes(&self, frame: Utf8Bytes) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = self.outbox.push(frame).await;
        })
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
                ))
                .await;
                None
            }
            Err(e) => {
                self.reply(ServerFrame::error(
                    ErrorName::Unauthorized,
                    e.to_string(),
                    None,
                ))
                .await;
                None
            }
        }
    }

    async fn subscribe(&self, topics: Vec<String>, add: bool) {
        if let Some(bad) = topics.iter().find_map(|t| validate_topic_pattern(t).err()) {
            self.reply(ServerFrame::error(
                ErrorName::InvalidMessage,
                format!("topic {bad}"),
                None,
            ))
            .await;
            return;
        }
        let sessions = &self.gw.0.sessions;
        let now = if add {
            sessions.subscribe(&self.info.session_id, &topics)
        } else {
            sessions.unsubscribe(&self.info.session_id, &topics)
        };
        self.reply(ServerFrame::Subscribed { topics: now }).await;
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

    /// Start a request or command. A refusal (not routed, forbidden, rate
    /// limited, ...) is answered at once: its frame is handed back for the
    /// reader to queue, so a client flooding refused calls is slowed by its
    /// own queue instead of spawning a task per call. Accepted calls run as
    /// tasks, at most `max_in_flight` per connection.
    fn start_request(&mut self, call: ClientCall, command: bool) -> Option<Utf8Bytes> {
        let trace_id = call
            .trace_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        let started = Instant::now();
        let gw = self.gw.clone();
        let respond = move |outcome: Result<Value, ErrorBody>, trace_id: String| -> Utf8Bytes {
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
            frame.to_json().into()
        };

        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            let limit = self.gw.0.config.limits.max_in_flight;
            return Some(respond(
                Err(refusal(
                    ErrorName::RateLimited,
                    format!("at most {limit} requests may be in flight per connection"),
                )),
                trace_id,
            ));
        };
        let Some(mesh) = self.gw.mesh().cloned() else {
            return Some(respond(
                Err(MeshError::Unavailable("no mesh".into()).to_client()),
                trace_id,
            ));
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
                let outbox = self.outbox.clone();
                self.tasks.spawn(async move {
                    let outcome = fut.await;
                    let _ = outbox.push(respond(outcome, trace_id)).await;
                    drop(permit);
                });
                return None;
            }
        }

        let routes = self.gw.0.routes.clone();
        let Some(resolved) = routes.resolve(&call.service, &call.method) else {
            return Some(respond(
                Err(refusal(
                    ErrorName::RouteNotFound,
                    format!(
                        "{}.{} is not routed by this gateway",
                        call.service, call.method
                    ),
                )),
                trace_id,
            ));
        };
        if !resolved.route.allows(&self.info.roles) {
            return Some(respond(
                Err(refusal(
                    ErrorName::Forbidden,
                    format!(
                        "{}.{} requires one of the roles {:?}",
                        call.service, call.method, resolved.route.roles
                    ),
                )),
                trace_id,
            ));
        }
        if self.rate_exceeded(resolved.route_index, resolved.route.rate_per_sec) {
            return Some(respond(
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
            ));
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
        let outbox = self.outbox.clone();
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
            let _ = outbox.push(respond(outcome, trace_id)).await;
            drop(permit);
        });
        None
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
