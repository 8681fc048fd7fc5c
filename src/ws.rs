//! One WebSocket connection: authenticate, register the session, then one
//! task that decodes frames, polls the session's calls and writes its
//! bounded outbound queue. What a call becomes is `calls`'s to say (and
//! whether it may go out, `dispatch`'s); this module queues the future it
//! gets and writes the frame its outcome makes.
//!
//! One task, not a reader and a writer: when a socket was split in two,
//! every task that last used either half was woken whenever it was ready,
//! so a writer task was woken for nothing by each frame a client sent, and
//! the runtime woke its other worker thread to take the second task. The
//! socket itself (`socket`) is built for that one task.

use std::sync::Arc;
use std::time::SystemTime;

use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;

use tokio::time::Instant;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hyper::upgrade::OnUpgrade;
use serde_json::Value;
use sync_wrapper::SyncWrapper;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::auth::Identity;
use crate::budget::{BEFORE_AUTH, ReadBudget};
use crate::calls::{Answer, Caller};
use crate::dispatch::{self, Failure, Rates, Refusal, SessionContext};
use crate::frame::Batch;
use crate::gateway::{CallGuard, Gateway};
use crate::mesh::BoxFuture;
use crate::metrics::RouteLatency;
use crate::outbox::{Outbox, PushError};
use crate::protocol::{
    ClientCall, ClientFrame, ErrorName, NARROWED_BY_RELOAD, RawJson, ServerFrame, SessionInfo,
    close,
};
use crate::recovery;
use crate::session::{Admission, AuthWait, Crowded, SessionGuard, SubscribeError};
use crate::socket::Socket;
use crate::spans::{self, Ended, Spans};
use crate::trace::TraceContext;

fn text(frame: &ServerFrame) -> Utf8Bytes {
    frame.to_json().into()
}

/// The largest frame a socket may send before it has authenticated: a
/// token's limit (the verifier refuses longer ones) and the frame around it.
const MAX_FRAME_BEFORE_AUTH: usize = 16 * 1024 + 256;

/// Wait for `{"type":"authenticate"}` as the first frame.
async fn first_frame_auth(gw: &Gateway, socket: &mut Socket) -> Option<Identity> {
    let deadline = tokio::time::sleep(gw.limits().auth_timeout);
    tokio::pin!(deadline);
    loop {
        let msg = tokio::select! {
            _ = &mut deadline => {
                let _ = socket.send(text(&ServerFrame::error(ErrorName::Unauthorized,
                    "no token: send an `authenticate` frame first", None))).await;
                let _ = socket.close(close::AUTH_REQUIRED, "authentication timed out").await;
                return None;
            }
            _ = gw.stopping() => return None,
            msg = socket.next() => msg,
        };
        let refuse = |desc: String| ServerFrame::error(ErrorName::Unauthorized, desc, None);
        match msg {
            Some(Ok(Message::Text(t))) if t.len() > MAX_FRAME_BEFORE_AUTH => {
                gw.metrics().frame_in("too_large");
                let _ = socket
                    .send(text(&ServerFrame::error(
                        ErrorName::MessageTooLarge,
                        format!("before authentication a frame is {MAX_FRAME_BEFORE_AUTH} bytes at most (the token limit)"),
                        None,
                    )))
                    .await;
                let _ = socket
                    .close(close::TOO_BIG, "frame too large before authentication")
                    .await;
                return None;
            }
            Some(Ok(Message::Text(t))) => match ClientFrame::decode(t.as_str()) {
                Ok(ClientFrame::Authenticate(a)) => {
                    match gw.hub().auth().authenticate(&a.token).await {
                        Ok(id) => return Some(id),
                        Err(e) => {
                            let _ = socket.send(text(&refuse(e.to_string()))).await;
                            let _ = socket
                                .close(close::AUTH_REQUIRED, "authentication failed")
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
                        .close(close::AUTH_REQUIRED, "authentication required")
                        .await;
                    return None;
                }
            },
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            _ => return None,
        }
    }
}

/// What a socket brings from its upgrade request to its task.
#[derive(Debug)]
pub(crate) struct Opening {
    pub(crate) gw: Gateway,
    /// The upgrade is done once the `101` is written.
    pub(crate) upgrade: OnUpgrade,
    pub(crate) config: WebSocketConfig,
    /// Who the token of the upgrade request named, if it had one.
    pub(crate) identity: Option<Identity>,
    pub(crate) admission: Admission,
    /// A socket upgraded without a token, until it authenticates: its place
    /// among those waiting (`limits.max_unauthenticated`).
    pub(crate) unauthenticated: Option<AuthWait>,
    pub(crate) span: Option<Box<SocketSpan>>,
}

/// Serve one socket, from its upgrade to its end: the future of its task.
///
/// Two phases, so that an idle connection holds only what it needs: the
/// setup (the upgrade, authentication, registration, hello) runs in its
/// own boxed future that is freed once it is done; what stays alive for
/// the connection's lifetime is the [`Live`] state and the loop's.
pub(crate) fn connection(opening: Opening) -> impl Future<Output = ()> + Send {
    let setup = Box::pin(open(opening));
    async move {
        // let-else, not if-let: an if-let scrutinee's temporary would keep
        // a second `Live`-sized slot for the whole connection.
        let Some(mut live) = setup.await else {
            return;
        };
        live.run().await;
    }
}

/// What an open connection keeps: its state, with the socket.
struct Live {
    conn: Connection,
    _guard: SessionGuard,
}

/// A socket's span, while spans are exported: where it is in its trace
/// (under the upgrade request's `traceparent`, if it sent a valid one)
/// and when the upgrade came. It ends when the socket closes.
#[derive(Debug)]
pub(crate) struct SocketSpan {
    at: TraceContext,
    started: SystemTime,
}

impl SocketSpan {
    /// The span of a socket opening now, when `spans` are exported.
    pub(crate) fn begin(spans: &Spans, traceparent: Option<&str>) -> Option<Box<Self>> {
        spans.on().then(|| {
            Box::new(Self {
                at: spans.begin(traceparent),
                started: SystemTime::now(),
            })
        })
    }

    fn end(self, gw: &Gateway, session: &SessionInfo, code: u16) {
        let attributes = vec![
            spans::text("bff.session_id", &session.session_id),
            spans::text("enduser.id", &session.user_id),
            KeyValue::new("websocket.close_code", i64::from(code)),
            KeyValue::new("bff.close_reason", crate::lifecycle::why_closed(code)),
        ];
        gw.hub().spans().end(Ended {
            at: self.at,
            kind: SpanKind::Server,
            name: format!("websocket {}", gw.settings().ws_path),
            started: self.started,
            ended: SystemTime::now(),
            attributes,
            error: None,
            link: None,
        });
    }
}

/// Wait for the upgrade, authenticate, register the session and queue the
/// hello event.
async fn open(opening: Opening) -> Option<Live> {
    let Opening {
        gw,
        upgrade,
        config,
        identity,
        admission,
        unauthenticated,
        span,
    } = opening;
    let upgraded = match upgrade.await {
        Ok(upgraded) => upgraded,
        Err(e) => {
            tracing::debug!(error = %e, "the upgrade failed");
            return None;
        }
    };
    // What it may send before it authenticates, from the upgrade on.
    let budget = match unauthenticated {
        Some(_) => ReadBudget::of(BEFORE_AUTH),
        None => ReadBudget::UNLIMITED,
    };
    let read_chunk = gw.limits().read_buffer_bytes;
    let sessions = gw.sessions();
    let outbox = |stream| sessions.outbox_on(stream);
    let Some(mut socket) = Socket::upgraded(upgraded, config, read_chunk, budget, outbox) else {
        tracing::debug!("the upgraded connection is not a TCP stream, or sent too much early");
        return None;
    };
    let session_id = uuid::Uuid::new_v4().simple().to_string();
    let identity = match identity.or_else(|| gw.hub().auth().anonymous(&session_id)) {
        Some(id) => id,
        None => first_frame_auth(&gw, &mut socket).await?,
    };
    // Authenticated: its place among the waiting is free, and it may send
    // what its limits allow.
    drop(unauthenticated);
    socket.lift_budget();
    let Identity {
        user_id,
        username,
        roles,
        token,
        expires_at,
    } = identity;
    let info = Arc::new(SessionInfo {
        session_id,
        user_id,
        username,
        roles,
    });
    let outbox = socket.outbox().clone();
    // The keepalive pass closes the session once its token expires.
    let registered = gw
        .sessions()
        .register(admission, &info, gw.caps(), &outbox, expires_at);
    let guard = match registered {
        Ok(registered) => registered,
        Err(Crowded::User(limit) | Crowded::Total(limit)) => {
            // Only a socket that authenticated after the upgrade gets here.
            gw.metrics().connection_refused("per_user");
            let refusal = format!("at most {limit} connections per user");
            let _ = socket
                .send(text(&ServerFrame::error(
                    ErrorName::RateLimited,
                    refusal,
                    None,
                )))
                .await;
            let _ = socket
                .close(close::POLICY, "too many connections for this user")
                .await;
            return None;
        }
    };
    gw.metrics().connection_opened();
    gw.hub().lifecycle().connected(&info);
    gw.hub().session_opened(&info.session_id, &info.user_id);
    tracing::debug!(session_id = %info.session_id, user_id = %info.user_id, "session opened");

    let context = SessionContext::new(token.as_deref());
    let mut event = gw.hub().handler().hello(&info);
    if let Some(call) = gw.settings().hello_call.as_deref() {
        let caller = Caller {
            hub: gw.hub(),
            mesh: gw.mesh(),
            session: &info,
            context: &context,
        };
        let socket = span.as_ref().map(|s| &s.at);
        let (key, value) = match caller.hello_data(call, socket).await {
            Ok(data) => ("data", data),
            Err(e) => ("data_error", serde_json::to_value(e).unwrap_or(Value::Null)),
        };
        if let Value::Object(fields) = &mut event {
            fields.insert(key.into(), value);
        }
    }
    let hello = ServerFrame::Event {
        topic: "hello".into(),
        event: event.into(),
        position: None,
    };
    let _ = outbox.try_push(hello.to_json().into());

    let conn = Connection {
        gw,
        info,
        context,
        outbox,
        socket,
        calls: SyncWrapper::new(None),
        rates: Rates::default(),
        span,
    };
    Some(Live {
        conn,
        _guard: guard,
    })
}

/// A call's answer, with the guard that counts the call as in flight
/// until its answer is queued (a draining shutdown waits for it).
type Done = (Utf8Bytes, CallGuard);

/// A connection's calls in flight: one, polled directly, or several in a
/// `FuturesUnordered`. One is the common case (a client that waits for
/// each answer), and `FuturesUnordered` wakes its task again whenever one
/// poll visited every future it holds without any finishing (its fairness
/// rule): with one call in it, on every request, and the runtime then woke
/// its other worker thread to take the task.
enum Calls {
    One(BoxFuture<'static, Done>),
    Many(FuturesUnordered<BoxFuture<'static, Done>>),
}

impl Calls {
    fn len(&self) -> usize {
        match self {
            Calls::One(_) => 1,
            Calls::Many(calls) => calls.len(),
        }
    }
}

fn calls_mut(calls: &mut SyncWrapper<Option<Box<Calls>>>) -> &mut Option<Box<Calls>> {
    calls.get_mut()
}

/// Add a call to `calls`.
fn push_call(calls: &mut Option<Box<Calls>>, call: BoxFuture<'static, Done>) {
    *calls = Some(match calls.take() {
        None => Box::new(Calls::One(call)),
        Some(mut held) => {
            match *held {
                Calls::Many(ref mut many) => many.push(call),
                Calls::One(first) => {
                    let many = FuturesUnordered::new();
                    many.push(first);
                    many.push(call);
                    *held = Calls::Many(many);
                }
            }
            held
        }
    });
}

/// The answer of the next call of `calls` to finish, or `None` at once
/// when there are none (the set is dropped once empty, so an idle socket
/// holds nothing for it). A `poll_fn` holding one reference: every idle
/// socket's loop keeps this future, so its size counts.
fn next_call(calls: &mut Option<Box<Calls>>) -> impl Future<Output = Option<Done>> + '_ {
    std::future::poll_fn(move |cx| {
        let done = match calls.as_deref_mut() {
            None => return std::task::Poll::Ready(None),
            Some(Calls::One(call)) => std::task::ready!(call.as_mut().poll(cx)),
            Some(Calls::Many(many)) => match std::task::ready!(many.poll_next_unpin(cx)) {
                Some(done) if !many.is_empty() => return std::task::Poll::Ready(Some(done)),
                Some(done) => done,
                None => {
                    *calls = None;
                    return std::task::Poll::Ready(None);
                }
            },
        };
        *calls = None;
        std::task::Poll::Ready(Some(done))
    })
}

impl Live {
    /// Borrows rather than consumes: a by-value `self` would be stored again
    /// in each nested future of this long-lived state machine.
    async fn run(&mut self) {
        self.conn.serve().await;
        // Boxed: its timeouts and close frame would otherwise share the
        // state of every idle socket's loop, though only an ending socket
        // ever needs them.
        Box::pin(self.conn.finish()).await;
        let code = self
            .conn
            .outbox
            .close_reason()
            .map_or(close::NORMAL, |r| r.code);
        self.conn
            .gw
            .hub()
            .lifecycle()
            .disconnected(&self.conn.info, code);
        if let Some(span) = self.conn.span.take() {
            span.end(&self.conn.gw, &self.conn.info, code);
        }
        self.conn
            .gw
            .hub()
            .session_closed(&self.conn.info.session_id);
        self.conn.gw.metrics().connection_closed();
        tracing::debug!(session_id = %self.conn.info.session_id, "session closed");
    }
}

struct Connection {
    gw: Gateway,
    /// Shared with the calls in flight (the `on_response` hook sees it)
    /// without a copy per call.
    info: Arc<SessionInfo>,
    /// The mesh context of this session's calls, with the bearer token
    /// (forwarded to services as `Authorization`). Who it names is in
    /// `info`; when it expires, in the outbox (`keepalive` closes it).
    context: SessionContext,
    outbox: Outbox,
    /// The socket, read and written by this connection's task alone (not
    /// split: a split socket is shared behind a lock).
    socket: Socket,
    /// The connection's calls in flight, polled by the connection's own
    /// task (their number is what `max_in_flight` limits). Not a task each:
    /// spawning one per call woke the runtime's other worker for nothing,
    /// which cost more than the call. `None` while there are none, so an
    /// idle socket holds nothing for them.
    /// (In a `SyncWrapper` to be `Sync`: it is only reached through
    /// `&mut`. A mutex, never locked, was 8 bytes more of every socket.)
    calls: SyncWrapper<Option<Box<Calls>>>,
    rates: Rates,
    /// The socket's span, while spans are exported.
    span: Option<Box<SocketSpan>>,
}

/// What the loop does once a frame's work is done.
enum After {
    /// Read the next frame.
    Read,
    /// The connection is to end.
    End,
}

impl Connection {
    /// Read frames, run calls and write the outbound queue until the
    /// session ends. In each turn, in this order: the calls that finished
    /// (their answers queued), the queue written (one vectored write for
    /// all that is queued) or the session's close, then the next client
    /// frame.
    /// Writing before reading is the backpressure: a client that does not
    /// read its answers is not read either.
    async fn serve(&mut self) {
        loop {
            let msg = tokio::select! {
                biased;
                Some((answer, call)) = next_call(calls_mut(&mut self.calls)) => {
                    self.reply_bytes(answer).await;
                    drop(call);
                    continue;
                }
                // Once the session is closed, what was queued before, then
                // `None`: the loop ends.
                batch = self.outbox.pop() => match batch {
                    Some(batch) => {
                        if !self.write(batch).await {
                            break;
                        }
                        continue;
                    }
                    None => break,
                },
                msg = self.socket.next() => msg,
            };
            // Any frame answers the keepalive's pings.
            self.outbox.heard();
            // The frame is read and decoded without an await, so neither it
            // nor its decoded form is part of every idle socket's state;
            // what must wait (an answer into a full queue, a subscription)
            // comes back boxed.
            let wait = match msg {
                Some(Ok(Message::Text(text))) => match self.on_text(&text) {
                    Some(wait) => wait,
                    None => continue,
                },
                Some(Ok(Message::Binary(_))) => {
                    self.gw.metrics().frame_in("binary");
                    self.reply_then(ServerFrame::error(
                        ErrorName::InvalidMessage,
                        "binary frames are not supported; send JSON text frames",
                        None,
                    ))
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Close(_))) | None => break,
                Some(Err(e)) => {
                    // A frame over tungstenite's hard cap ends up here.
                    tracing::debug!(error = %e, "websocket read error");
                    break;
                }
            };
            if let After::End = wait.await {
                break;
            }
        }
        // Requests still running finish (their answers go nowhere) or are
        // bounded by their own timeouts.
        while next_call(calls_mut(&mut self.calls)).await.is_some() {}
    }

    /// Act on a text frame from the client: start its call, or hand back
    /// what has to be awaited before the next frame is read.
    fn on_text(&mut self, text: &str) -> Option<BoxFuture<'_, After>> {
        let limit = self.gw.limits().max_frame_bytes;
        if text.len() > limit {
            self.gw.metrics().frame_in("too_large");
            return Some(self.reply_then(ServerFrame::error(
                ErrorName::MessageTooLarge,
                format!("frames are limited to {limit} bytes"),
                None,
            )));
        }
        match ClientFrame::decode(text) {
            Ok(ClientFrame::Request(call)) => {
                self.gw.metrics().frame_in("request");
                let refused = self.start_request(call, false)?;
                Some(self.reply_bytes_then(refused))
            }
            Ok(ClientFrame::Command(call)) => {
                self.gw.metrics().frame_in("command");
                let refused = self.start_request(call, true)?;
                Some(self.reply_bytes_then(refused))
            }
            Ok(ClientFrame::Subscribe(t)) => {
                self.gw.metrics().frame_in("subscribe");
                Some(Box::pin(async move {
                    self.subscribe(t.topics, t.since).await;
                    After::Read
                }))
            }
            Ok(ClientFrame::Unsubscribe(t)) => {
                self.gw.metrics().frame_in("unsubscribe");
                Some(Box::pin(async move {
                    self.unsubscribe(t.topics).await;
                    After::Read
                }))
            }
            Ok(ClientFrame::Authenticate(a)) => {
                self.gw.metrics().frame_in("authenticate");
                Some(Box::pin(async move {
                    if self.reauthenticate(&a.token).await {
                        After::Read
                    } else {
                        After::End
                    }
                }))
            }
            Err(e) => {
                self.gw.metrics().frame_in("invalid");
                Some(self.reply_then(ServerFrame::error(
                    ErrorName::InvalidMessage,
                    e.description,
                    e.trace_id,
                )))
            }
        }
    }

    /// Queue `frame`, then read on.
    fn reply_then(&mut self, frame: ServerFrame) -> BoxFuture<'_, After> {
        self.reply_bytes_then(frame.to_json().into())
    }

    /// Queue `frame`, then read on: one box, the queueing inside it.
    fn reply_bytes_then(&mut self, frame: Utf8Bytes) -> BoxFuture<'_, After> {
        Box::pin(async move {
            self.queue(frame).await;
            After::Read
        })
    }

    /// Queue a frame for this client.
    fn reply(&mut self, frame: ServerFrame) -> BoxFuture<'_, ()> {
        self.reply_bytes(frame.to_json().into())
    }

    /// Queue a frame for this client. Boxed: an inline future would grow
    /// every idle connection's state by the write's size.
    fn reply_bytes(&mut self, frame: Utf8Bytes) -> BoxFuture<'_, ()> {
        Box::pin(self.queue(frame))
    }

    /// Queue a frame; while the queue is full, write what it holds first.
    /// Only ever awaited inside a box (`reply_bytes`, `reply_bytes_then`).
    async fn queue(&mut self, mut frame: Utf8Bytes) {
        loop {
            match self.outbox.try_push_own(frame) {
                Err((PushError::Full, refused)) => {
                    frame = refused;
                    let Some(batch) = self.outbox.pop_now() else {
                        return;
                    };
                    if !self.write(batch).await {
                        return;
                    }
                }
                _ => return,
            }
        }
    }

    /// Write a batch taken from the outbox (one vectored write for many
    /// frames when calls complete together), within the write timeout.
    /// False, with the session closed, once the socket cannot take it.
    /// Boxed: only a socket being written to holds the write's state (its
    /// timer among it), not every idle one.
    fn write(&mut self, batch: Batch) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            if self.socket.is_broken() {
                return false;
            }
            let write = self.socket.write(&batch);
            // Failed or timed out, the socket is broken: nothing more is
            // written to it.
            let _ = tokio::time::timeout(self.gw.limits().write_timeout, write).await;
            if self.socket.is_broken() {
                self.outbox.close(close::NORMAL, "closed");
            }
            !self.socket.is_broken()
        })
    }

    /// The session is over: write what is still queued and the close frame
    /// with the session's close reason (unless writing failed), then shut
    /// the socket down.
    async fn finish(&mut self) {
        self.outbox.close(close::NORMAL, "closed");
        // Once closed, `pop` hands out what was queued, then `None`.
        while let Some(batch) = self.outbox.pop().await {
            if !self.write(batch).await {
                break;
            }
        }
        let timeout = self.gw.limits().write_timeout;
        if !self.socket.is_broken() {
            let (code, why) = self
                .outbox
                .close_reason()
                .map_or((close::NORMAL, "closed".to_owned()), |r| (r.code, r.reason));
            let _ = tokio::time::timeout(timeout, self.socket.close(code, &why)).await;
        }
        // Completes the closing handshake when the client started it (the
        // reply tungstenite queued is written here); the socket is shut
        // when it is dropped.
        let _ = tokio::time::timeout(timeout, self.socket.finish()).await;
    }

    /// A new token on an open connection. For the same user, its roles and
    /// expiry replace the old ones together (and subscriptions the new
    /// roles no longer allow are dropped); for another user the connection
    /// ends. False once the connection is to end.
    async fn reauthenticate(&mut self, token: &str) -> bool {
        match self.gw.hub().auth().authenticate(token).await {
            Ok(id) if id.user_id == self.info.user_id => {
                let info = Arc::make_mut(&mut self.info);
                info.roles = id.roles;
                info.username = id.username;
                self.context = SessionContext::new(id.token.as_deref());
                self.gw
                    .sessions()
                    .set_expiry(&self.info.session_id, id.expires_at);
                self.narrow_subscriptions(
                    "the roles of the new token do not allow these subscriptions",
                )
                .await;
                true
            }
            Ok(_) => {
                self.reply(ServerFrame::error(
                    ErrorName::Unauthorized,
                    "the token names another user; reconnect as that user",
                    None,
                ))
                .await;
                self.gw.sessions().close_session(
                    &self.info.session_id,
                    close::AUTH_REQUIRED,
                    "the token names another user",
                );
                false
            }
            Err(e) => {
                self.reply(ServerFrame::error(
                    ErrorName::Unauthorized,
                    e.to_string(),
                    None,
                ))
                .await;
                true
            }
        }
    }

    /// Subscribe to all of `topics` or (refused, with the first reason) to
    /// none; with `since`, resume after that log position (`recovery`).
    async fn subscribe(&mut self, topics: Vec<String>, since: Option<u64>) {
        let limit = self.gw.limits().max_subscriptions;
        let routes = self.gw.hub().routes_full();
        let checked = if topics.len() > limit {
            Err(Refusal::TooManySubscriptions { limit })
        } else {
            topics
                .iter()
                .try_for_each(|t| dispatch::authorize_subscription(&routes, &self.info.roles, t))
        };
        if let Some(since) = since {
            if let Err(refusal) = checked {
                let frame = ServerFrame::error(refusal.name(), refusal.description(), None);
                self.reply(frame).await;
                return;
            }
            match recovery::begin(self.gw.hub(), &self.info, &topics, since) {
                Ok(resume) => {
                    self.gw.hub().lifecycle().subscribed(&self.info, &topics);
                    let hub = self.gw.hub().clone();
                    let mesh = self.gw.mesh().clone();
                    let info = self.info.clone();
                    // A drain does not wait for a replay: the socket is
                    // about to close anyway.
                    let gw = self.gw.clone();
                    self.gw.tasks().spawn(async move {
                        tokio::select! {
                            _ = resume.finish(hub, mesh, info) => {}
                            _ = gw.stopping() => {}
                        }
                    });
                }
                Err(frame) => self.reply(*frame).await,
            }
            return;
        }
        let checked = checked.and_then(|()| {
            self.gw
                .sessions()
                .subscribe(&self.info.session_id, &topics, limit)
                .map_err(|SubscribeError::TooMany(limit)| Refusal::TooManySubscriptions { limit })
        });
        if checked.is_ok() {
            self.gw.hub().lifecycle().subscribed(&self.info, &topics);
        }
        let frame = match checked {
            Ok(now) => ServerFrame::Subscribed {
                topics: now,
                recovered: None,
            },
            Err(refusal) => ServerFrame::error(refusal.name(), refusal.description(), None),
        };
        self.reply(frame).await;
        // A reload between the check and the subscription: the new table's
        // pass over the sessions may have come before these topics did.
        if self.gw.hub().routes().generation() != routes.generation() {
            self.narrow_subscriptions(NARROWED_BY_RELOAD).await;
        }
    }

    /// Keep only the subscriptions the routing table in use allows this
    /// session's roles (after new roles, or a reload): the others are
    /// dropped, said in a lifecycle event and to the client, with `reason`.
    async fn narrow_subscriptions(&mut self, reason: &str) {
        let routes = self.gw.hub().routes();
        let dropped = self.gw.sessions().set_info(&self.info, |t| {
            dispatch::authorize_subscription(&routes, &self.info.roles, t).is_ok()
        });
        drop(routes);
        self.gw.hub().lifecycle().unsubscribed(&self.info, &dropped);
        if !dropped.is_empty() {
            self.reply(ServerFrame::Unsubscribed {
                topics: dropped,
                reason: reason.into(),
            })
            .await;
        }
    }

    async fn unsubscribe(&mut self, topics: Vec<String>) {
        let now = self
            .gw
            .sessions()
            .unsubscribe(&self.info.session_id, &topics);
        self.gw.hub().lifecycle().unsubscribed(&self.info, &topics);
        self.reply(ServerFrame::Subscribed {
            topics: now,
            recovered: None,
        })
        .await;
    }

    /// Start a request or command. A refusal (not routed, forbidden, rate
    /// limited, ...) is answered at once: its frame is handed back for the
    /// loop to queue, so a client flooding refused calls is slowed by its
    /// own queue instead of starting a call for it. Accepted calls run
    /// beside the socket (`run_call`), at most `max_in_flight` per
    /// connection.
    fn start_request(&mut self, call: ClientCall, command: bool) -> Option<Utf8Bytes> {
        let trace_id = call
            .trace_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        let spans = self.gw.hub().spans();
        let trace = spans.begin(call.traceparent.as_deref());
        let span = (spans.on() && trace.sampled).then(|| {
            Box::new(CallSpan {
                at: trace,
                route: format!("{}.{}", call.service, call.method),
                target: None,
                started: SystemTime::now(),
                socket: self.span.as_ref().map(|s| s.at),
                session: self.info.clone(),
            })
        });
        let respond = Responder {
            gw: self.gw.clone(),
            started: Instant::now(),
            command,
            trace_id,
            latency: None,
            span,
        };

        if self.gw.is_stopping() {
            return Some(respond.frame(Err(Refusal::ShuttingDown.into())));
        }
        let limit = self.gw.limits().max_in_flight;
        if calls_mut(&mut self.calls).as_ref().map_or(0, |c| c.len()) >= limit {
            return Some(respond.frame(Err(Refusal::TooManyInFlight { limit }.into())));
        }
        let caller = Caller {
            hub: self.gw.hub(),
            mesh: self.gw.mesh(),
            session: &self.info,
            context: &self.context,
        };
        let mut respond = respond;
        let plan = match caller.plan(&mut self.rates, call, command, &trace) {
            Ok((plan, latency)) => {
                respond.latency = latency;
                if let (Some(span), Some((service, method))) = (&mut respond.span, plan.target()) {
                    span.target = Some((service.to_owned(), method.to_owned()));
                }
                plan
            }
            Err(refusal) => return Some(respond.frame(Err(refusal.into()))),
        };
        let run = plan.run(
            self.gw.mesh().clone(),
            self.gw.hub().handler().clone(),
            self.info.clone(),
            spans.clone(),
        );
        // Counted until its answer is queued: the drain waits for it.
        let call = self.gw.call_started();
        self.run_call(async move {
            // Failures are counted by outcome in the request metrics; the
            // broker's state changes are logged once by the mesh, never
            // once per call.
            let outcome = tokio::select! {
                outcome = run => outcome,
                _ = respond.gw.hurried() => Err(Refusal::ShuttingDown.into()),
            };
            (respond.frame(outcome), call)
        });
        None
    }

    /// Run `call` beside the socket: the connection's loop polls it and
    /// queues its answer.
    fn run_call(&mut self, call: impl Future<Output = Done> + Send + 'static) {
        push_call(calls_mut(&mut self.calls), Box::pin(call));
    }
}

/// A client call's span, while spans are exported: ended with the call's
/// outcome when its answer is made.
struct CallSpan {
    at: TraceContext,
    /// The name the client called.
    route: String,
    /// The mesh service and method it went to, when it was one.
    target: Option<(String, String)>,
    started: SystemTime,
    /// The span of the socket it came on.
    socket: Option<TraceContext>,
    session: Arc<SessionInfo>,
}

impl CallSpan {
    fn end(self, spans: &Spans, command: bool, call_id: &str, label: &str, error: Option<&str>) {
        let mut attributes = vec![
            spans::text("bff.route", &self.route),
            KeyValue::new("bff.kind", if command { "command" } else { "request" }),
            spans::text("bff.call_id", call_id),
            spans::text("enduser.id", &self.session.user_id),
            spans::text("bff.session_id", &self.session.session_id),
            spans::text("bff.outcome", label),
        ];
        if let Some((service, method)) = &self.target {
            attributes.extend(spans::rpc(service, method));
        }
        if let Some(name) = error {
            attributes.push(spans::text("error.type", name));
        }
        spans.end(Ended {
            at: self.at,
            kind: SpanKind::Server,
            name: self.route,
            started: self.started,
            ended: SystemTime::now(),
            attributes,
            error: error.map(str::to_owned),
            link: self.socket,
        });
    }
}

/// Turns a call's outcome into the frame its client gets, and counts it.
struct Responder {
    gw: Gateway,
    started: Instant,
    command: bool,
    trace_id: String,
    /// The route's latency series, once the call is routed.
    latency: Option<RouteLatency>,
    /// The call's span, while spans are exported and it is sampled.
    span: Option<Box<CallSpan>>,
}

impl Responder {
    fn frame(self, outcome: Result<Answer, Failure>) -> Utf8Bytes {
        let label = match &outcome {
            Ok(_) => "ok",
            Err(f) => f.label(),
        };
        let seconds = self.started.elapsed().as_secs_f64();
        let metrics = self.gw.metrics();
        metrics.request_done(label, seconds);
        metrics.route_done(self.latency.as_ref(), label, seconds);
        let trace_id = self.trace_id;
        let outcome = outcome.map_err(|f| f.to_client());
        if let Some(span) = self.span {
            let error = outcome.as_ref().err().map(|e| e.error.as_str());
            span.end(self.gw.hub().spans(), self.command, &trace_id, label, error);
        }
        let frame = match (self.command, outcome) {
            (true, Ok(_)) => ServerFrame::Ack { trace_id },
            (true, Err(e)) => ServerFrame::Error {
                error: e.error,
                description: e.description.unwrap_or_default(),
                trace_id: Some(trace_id),
            },
            (false, Ok(Answer { result, failed })) => ServerFrame::Response {
                trace_id,
                result,
                error: None,
                failed,
            },
            (false, Err(e)) => ServerFrame::Response {
                trace_id,
                result: RawJson::null(),
                error: Some(e),
                failed: None,
            },
        };
        frame.to_json().into()
    }
}
