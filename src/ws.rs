//! One WebSocket connection: authenticate, register the session, then a
//! reader loop that decodes frames and runs requests concurrently, and a
//! writer task that drains the session's bounded outbound queue. Whether a
//! call may go out is `dispatch`'s to say; this module carries it out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::auth::{Identity, unix_now};
use crate::dispatch::{self, Failure, Rates, Refusal};
use crate::gateway::Gateway;
use crate::hooks::{LocalCall, MeshClient};
use crate::mesh::{BoxFuture, Call, MeshError};
use crate::outbox::Outbox;
use crate::protocol::{ClientCall, ClientFrame, ErrorName, ServerFrame, close};
use crate::routing::validate_topic_pattern;
use crate::session::{SessionGuard, SessionInfo};

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
    let deadline = tokio::time::sleep(gw.limits().auth_timeout);
    tokio::pin!(deadline);
    loop {
        let msg = tokio::select! {
            _ = &mut deadline => {
                let _ = socket.send(text(&ServerFrame::error(ErrorName::Unauthorized,
                    "no token: send an `authenticate` frame first", None))).await;
                let _ = socket.send(close(close::AUTH_REQUIRED, "authentication timed out")).await;
                return None;
            }
            _ = gw.stopping() => return None,
            msg = socket.recv() => msg,
        };
        let refuse = |desc: String| ServerFrame::error(ErrorName::Unauthorized, desc, None);
        match msg {
            Some(Ok(Message::Text(t))) => match ClientFrame::decode(t.as_str()) {
                Ok(ClientFrame::Authenticate(a)) => {
                    match gw.hub().auth().authenticate(&a.token).await {
                        Ok(id) => return Some(id),
                        Err(e) => {
                            let _ = socket.send(text(&refuse(e.to_string()))).await;
                            let _ = socket
                                .send(close(close::AUTH_REQUIRED, "authentication failed"))
                                .await;
                            return None;
                        }
                    }
                }
                _ => {
                    let _ = socket
                        .send(text(&refuse(
                            "authenticate first: send an `authenticate` frame".into(),
                        )))
                        .await;
                    let _ = socket
                        .send(close(close::AUTH_REQUIRED, "authentication required"))
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
    let identity = match identity.or_else(|| gw.hub().auth().anonymous(&session_id)) {
        Some(id) => id,
        None => first_frame_auth(&gw, &mut socket).await?,
    };
    let info = SessionInfo {
        session_id,
        user_id: identity.user_id.clone(),
        username: identity.username.clone(),
        roles: identity.roles.clone(),
    };
    let (guard, outbox) = gw.sessions().register(&info);
    gw.metrics().connection_opened();
    tracing::debug!(session_id = %info.session_id, user_id = %info.user_id, "session opened");

    let (sink, stream) = socket.split();
    let hello = ServerFrame::Event {
        topic: "hello".into(),
        event: gw.hub().handler().hello(&info),
    };
    let _ = outbox.try_push(hello.to_json().into());

    let writer = tokio::spawn(write_loop(sink, outbox.clone(), gw.limits().write_timeout));
    let conn = Connection {
        in_flight: Arc::new(Semaphore::new(gw.limits().max_in_flight)),
        gw,
        info,
        identity,
        outbox,
        tasks: TaskTracker::new(),
        rates: Rates::default(),
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
    outbox.close(close::NORMAL, "closed");
    if drained_ok {
        let (code, why) = outbox
            .close_reason()
            .map_or((close::NORMAL, "closed".to_owned()), |r| (r.code, r.reason));
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
        self.conn.outbox.close(close::NORMAL, "closed");
        let _ = (&mut self.writer).await;
        self.conn.gw.metrics().connection_closed();
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
    rates: Rates,
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
                    self.gw.sessions().close_session(&self.info.session_id, close::TOKEN_EXPIRED, "token expired");
                    break;
                }
                msg = stream.next() => msg,
            };
            let text = match msg {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Binary(_))) => {
                    self.gw.metrics().frame_in("binary");
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
            let limit = self.gw.limits().max_frame_bytes;
            if text.len() > limit {
                self.gw.metrics().frame_in("too_large");
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
                    self.gw.metrics().frame_in("request");
                    if let Some(refused) = self.start_request(call, false) {
                        self.reply_bytes(refused).await;
                    }
                }
                Ok(ClientFrame::Command(call)) => {
                    self.gw.metrics().frame_in("command");
                    if let Some(refused) = self.start_request(call, true) {
                        self.reply_bytes(refused).await;
                    }
                }
                Ok(ClientFrame::Subscribe(t)) => {
                    self.gw.metrics().frame_in("subscribe");
                    Box::pin(self.subscribe(t.topics, true)).await;
                }
                Ok(ClientFrame::Unsubscribe(t)) => {
                    self.gw.metrics().frame_in("unsubscribe");
                    Box::pin(self.subscribe(t.topics, false)).await;
                }
                Ok(ClientFrame::Authenticate(a)) => {
                    self.gw.metrics().frame_in("authenticate");
                    if let Some(exp) = Box::pin(self.reauthenticate(&a.token)).await {
                        expiry.as_mut().reset(expiry_instant(exp));
                    }
                }
                Err(e) => {
                    self.gw.metrics().frame_in("invalid");
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
        match self.gw.hub().auth().authenticate(token).await {
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
        let sessions = self.gw.sessions();
        let now = if add {
            sessions.subscribe(&self.info.session_id, &topics)
        } else {
            sessions.unsubscribe(&self.info.session_id, &topics)
        };
        self.reply(ServerFrame::Subscribed { topics: now }).await;
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
        let respond = Responder {
            gw: self.gw.clone(),
            started: Instant::now(),
            command,
            trace_id,
        };

        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            let limit = self.gw.limits().max_in_flight;
            return Some(respond.frame(Err(Refusal::TooManyInFlight { limit }.into())));
        };
        let mesh = self.gw.mesh().clone();
        let context = dispatch::context(
            &self.info,
            self.identity.token.as_deref(),
            &respond.trace_id,
        );
        let handler = self.gw.hub().handler().clone();

        if !command {
            let local = LocalCall {
                session: self.info.clone(),
                call: call.clone(),
                mesh: MeshClient::new(
                    mesh.clone(),
                    context.clone(),
                    respond.trace_id.clone(),
                    crate::routing::DEFAULT_TIMEOUT,
                ),
            };
            if let Some(fut) = handler.local_request(local) {
                let outbox = self.outbox.clone();
                self.tasks.spawn(async move {
                    let outcome = fut.await.map_err(Failure::Local);
                    let _ = outbox.push(respond.frame(outcome)).await;
                    drop(permit);
                });
                return None;
            }
        }

        let allowed = match dispatch::authorize(
            self.gw.routes(),
            &self.info,
            &mut self.rates,
            Instant::now(),
            &call.service,
            &call.method,
        ) {
            Ok(allowed) => allowed,
            Err(refusal) => return Some(respond.frame(Err(refusal.into()))),
        };
        let mut mesh_call = Call {
            service: allowed.service.to_owned(),
            method: allowed.method.to_owned(),
            params: call.params,
            context,
            ttl: allowed.timeout(),
            trace_id: Some(respond.trace_id.clone()),
        };
        handler.on_request(&self.info, &mut mesh_call);
        let info = self.info.clone();
        let outbox = self.outbox.clone();
        self.tasks.spawn(async move {
            let outcome = if command {
                mesh.command(mesh_call).await.map(|()| Value::Null)
            } else {
                let sent = mesh_call.clone();
                mesh.request(mesh_call)
                    .await
                    .map(|v| handler.on_response(&info, &sent, v))
            };
            let outcome = outcome.map_err(|e| {
                log_mesh_error(&e);
                Failure::Mesh(e)
            });
            let _ = outbox.push(respond.frame(outcome)).await;
            drop(permit);
        });
        None
    }
}

/// Turns a call's outcome into the frame its client gets, and counts it.
struct Responder {
    gw: Gateway,
    started: Instant,
    command: bool,
    trace_id: String,
}

impl Responder {
    fn frame(self, outcome: Result<Value, Failure>) -> Utf8Bytes {
        let label = match &outcome {
            Ok(_) => "ok",
            Err(f) => f.label(),
        };
        self.gw
            .metrics()
            .request_done(label, self.started.elapsed().as_secs_f64());
        let trace_id = self.trace_id;
        let frame = match (self.command, outcome) {
            (true, Ok(_)) => ServerFrame::Ack { trace_id },
            (true, Err(f)) => {
                let e = f.to_client();
                ServerFrame::Error {
                    error: e.error,
                    description: e.description.unwrap_or_default(),
                    trace_id: Some(trace_id),
                }
            }
            (false, Ok(result)) => ServerFrame::Response {
                trace_id,
                result,
                error: None,
            },
            (false, Err(f)) => ServerFrame::Response {
                trace_id,
                result: Value::Null,
                error: Some(f.to_client()),
            },
        };
        frame.to_json().into()
    }
}

fn log_mesh_error(e: &MeshError) {
    if let MeshError::Unavailable(detail) = e {
        tracing::warn!(%detail, "mesh call failed");
    }
}
