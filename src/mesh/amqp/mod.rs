//! The mesh on RabbitMQ through lapin, wire-compatible with nuropb 0.1.8.
//!
//! Three connections. lapin's declares the topology and publishes (in
//! confirm mode, so a mandatory publish nobody can take comes back as
//! NO_ROUTE at once) commands, events, control messages and responses. The
//! request lane ([`super::lane`]) carries what is per request or per
//! event: RPC requests out; the instance's response queue and its event
//! queue in, each with a consumer and prefetch of its own. The service lane
//! takes the requests other services send the BFF itself, each
//! acknowledged once served. Everything received passes a lane, so every
//! message from the broker is bounded in size before anything parses it.
//! A supervisor task owns the lanes and watches lapin's connection, and
//! rebuilds all three with backoff when anything fails; calls in flight
//! then fail with `MeshUnavailable` rather than waiting out their timeouts.
//!
//! Events for clients are bound to the per-instance event queue, so every
//! gateway instance sees every event and can reach its own sockets.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::lane::{Lane, Properties as LaneProperties};
use super::{
    BoxFuture, CONTROL_TOPIC, Call, IncomingEvent, Mesh, MeshError, MeshHandler, OutgoingEvent,
    redact_url,
};
use crate::config::BrokerUrl;
use crate::protocol::{EventBody, MeshMessage, MessageType, RawJson, RequestBodyRef};
use drops::Drops;
use headers::{header_table, nuropb_headers};
pub use log::EventLogConfig;
use supervisor::{deliver, supervise};
use topology::establish;

/// Where and as whom to join the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpConfig {
    /// The broker; its `Debug` hides the password.
    pub url: BrokerUrl,
    /// This peer's service name: its service queue is `nuropb-{name}-sq`.
    pub service_name: String,
    /// Distinguishes instances: the response queue is `nuropb-{name}-{instance}-rq`.
    pub instance_id: String,
    pub rpc_exchange: String,
    pub events_exchange: String,
    pub dl_exchange: String,
    /// The BFF's event log: when set, events are read from this stream,
    /// which every instance shares, instead of a queue of the instance's
    /// own, and each carries its position.
    pub event_log: Option<EventLogConfig>,
    /// Topic patterns of the events this instance receives at first
    /// ([`AmqpMesh::set_event_bindings`] changes them).
    pub event_bindings: Vec<String>,
    /// A fanout exchange for control messages between the instances of one
    /// BFF, bound to each instance's response queue; `None` for peers that
    /// are not BFFs.
    pub control_exchange: Option<String>,
    /// A peer that only calls (a tool such as `client-ts --live`): its
    /// service queue is not durable and goes when it disconnects.
    pub transient: bool,
    /// Service-queue messages handled at once.
    pub prefetch: u16,
    /// The same for the event queue. Small: events the broker has sent
    /// travel on the connection the responses use (the lane), so fewer in
    /// flight means less for a response to wait behind during a burst.
    /// Under 50,000 events a request's p99 rose from 3 to about 75 ms with
    /// 1024; with 64, 1.2x to 3.0x of its value without the burst, about
    /// what the same burst on a topic nobody here takes costs on shared
    /// cores (`cargo test --release --test burst -- --nocapture`).
    pub event_prefetch: u16,
    /// Mesh events waiting for the handler; past it, events are dropped
    /// (and counted) rather than delaying responses or growing memory.
    pub event_queue: usize,
    /// The largest message body taken from the broker (a response, an
    /// event, a control message); a larger one is let go as it comes,
    /// counted and never buffered, and the link stays up.
    pub max_message_bytes: usize,
    pub connect_timeout: Duration,
    /// Longest pause between reconnect attempts (default 2 s). The pause
    /// doubles from 100 ms, with jitter, up to this: the link is back at
    /// most this long after the broker is, and a refused connection costs
    /// the broker next to nothing. (At 10 s, the link came back 2 to 5 s
    /// after a broker stopped for 5 s.)
    pub max_backoff: Duration,
}

impl AmqpConfig {
    pub fn new(url: impl Into<BrokerUrl>, service_name: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            service_name: service_name.into(),
            instance_id: uuid::Uuid::new_v4().simple().to_string(),
            rpc_exchange: "nuropb-rpc-exchange".into(),
            events_exchange: "nuropb-events-exchange".into(),
            dl_exchange: "nuropb-dl-exchange".into(),
            event_bindings: Vec::new(),
            event_log: None,
            control_exchange: None,
            transient: false,
            prefetch: 64,
            event_prefetch: 64,
            event_queue: 4096,
            max_message_bytes: 8 << 20,
            connect_timeout: Duration::from_secs(10),
            max_backoff: Duration::from_secs(2),
        }
    }

    pub fn service_queue(&self) -> String {
        format!("nuropb-{}-sq", self.service_name)
    }

    pub fn response_queue(&self) -> String {
        self.response_queue_of(&self.instance_id)
    }

    /// The queue events come from: the event log when there is one, else
    /// this instance's own `nuropb-{name}-{instance}-eq`.
    pub fn event_queue_name(&self) -> String {
        match &self.event_log {
            Some(log) => log.queue.clone(),
            None => format!("nuropb-{}-{}-eq", self.service_name, self.instance_id),
        }
    }

    /// The response queue of another instance of the same service.
    pub fn response_queue_of(&self, instance_id: &str) -> String {
        format!("nuropb-{}-{}-rq", self.service_name, instance_id)
    }

    /// Whether this peer has an event queue: one with event bindings, and
    /// a BFF (which has a control exchange) always, for a reloaded routing
    /// table to bind.
    pub(crate) fn has_event_queue(&self) -> bool {
        !self.event_bindings.is_empty() || self.control_exchange.is_some()
    }

    /// The name the broker shows for this instance's connection (management
    /// UI, `rabbitmqctl list_connections client_properties`).
    pub fn connection_name(&self) -> String {
        format!("nuropb-bff {} {}", self.service_name, self.instance_id)
    }
}

/// Control messages waiting for the handler.
const CONTROL_QUEUE: usize = 1024;

/// What the event queue carries to the handler, in the log's order.
#[derive(Debug)]
enum LogItem {
    Event(IncomingEvent),
    /// News begins after this position.
    Live(u64),
}

fn handle_log_item(handler: &dyn MeshHandler, item: LogItem) -> BoxFuture<'_, ()> {
    match item {
        LogItem::Event(e) => handler.handle_event(e),
        LogItem::Live(p) => handler.handle_log_live(p),
    }
}

type Pending = Mutex<HashMap<String, oneshot::Sender<Result<RawJson, MeshError>>>>;

#[derive(Debug)]
struct Shared {
    config: AmqpConfig,
    response_queue: String,
    pending: Pending,
    link: RwLock<Option<Link>>,
    ready: AtomicBool,
    handler: Arc<dyn MeshHandler>,
    /// Events from the lane, on their way to the handler: off the loop
    /// that completes responses, so handling a burst of events never
    /// delays one. Bounded; what does not fit is dropped and counted.
    events: mpsc::Sender<LogItem>,
    /// Where this instance is in the event log, when there is one.
    log: Option<log::LogState>,
    /// Control messages between instances: their own queue, so events
    /// cannot crowd them out.
    control: mpsc::Sender<Value>,
    events_dropped: AtomicU64,
    /// Messages let go, by why.
    drops: Drops,
    /// Times the link was rebuilt.
    reconnects: AtomicU64,
    /// The event queue's bindings: wanted, and on the live link.
    bindings: tokio::sync::Mutex<bindings::EventBindings>,
    /// Wakes the supervisor to rebuild the link (a publish channel failed).
    relink: tokio::sync::Notify,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

#[derive(Debug)]
struct Link {
    connection: Connection,
    /// Confirmed publishing: commands, events, control, responses.
    publish: Channel,
    /// Requests, without confirms (the response is the confirmation); an
    /// unroutable one comes back on the lane as a basic.return.
    lane: Lane,
    /// Requests to the BFF's own service in, their acks out.
    service: Lane,
}

/// The mesh over RabbitMQ. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AmqpMesh {
    shared: Arc<Shared>,
    supervisor: Arc<Mutex<Option<JoinHandle<()>>>>,
}

/// Removes a pending call when its waiter goes away before an answer
/// (a failed publish, the timeout, a cancel).
struct PendingGuard<'a> {
    pending: &'a Pending,
    correlation_id: String,
    /// The answer came: whoever sent it took the entry out.
    answered: bool,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if !self.answered {
            lock(self.pending).remove(&self.correlation_id);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn unavailable(e: impl std::fmt::Display) -> MeshError {
    MeshError::Unavailable(e.to_string())
}

impl AmqpMesh {
    /// Connect, declare the topology and start consuming. Fails (naming the
    /// URL, password masked) when the broker cannot be reached in
    /// `connect_timeout`; later losses are retried in the background.
    pub async fn connect(
        config: AmqpConfig,
        handler: Arc<dyn MeshHandler>,
    ) -> Result<Self, MeshError> {
        let response_queue = config.response_queue();
        let (events, events_rx) = mpsc::channel(config.event_queue.max(1));
        let (control, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let shared = Arc::new(Shared {
            response_queue,
            pending: Mutex::new(HashMap::new()),
            link: RwLock::new(None),
            ready: AtomicBool::new(false),
            handler,
            events,
            control,
            log: config.event_log.as_ref().map(|_| log::LogState::default()),
            events_dropped: AtomicU64::new(0),
            drops: Drops::default(),
            reconnects: AtomicU64::new(0),
            relink: tokio::sync::Notify::new(),
            bindings: tokio::sync::Mutex::new(bindings::EventBindings {
                wanted: config.event_bindings.clone(),
                bound: Vec::new(),
            }),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            config,
        });
        shared
            .tasks
            .spawn(deliver(shared.clone(), events_rx, handle_log_item));
        shared.tasks.spawn(deliver(
            shared.clone(),
            control_rx,
            <dyn MeshHandler>::handle_control,
        ));
        let consumers = tokio::time::timeout(shared.config.connect_timeout, establish(&shared))
            .await
            .map_err(|_| {
                MeshError::Unavailable(format!(
                    "no answer from {} within {:?}",
                    redact_url(&shared.config.url),
                    shared.config.connect_timeout
                ))
            })??;
        let supervisor = tokio::spawn(supervise(shared.clone(), consumers));
        Ok(Self {
            shared,
            supervisor: Arc::new(Mutex::new(Some(supervisor))),
        })
    }

    pub fn config(&self) -> &AmqpConfig {
        &self.shared.config
    }

    /// Bind the event queue to `topics` instead (a reloaded routing table):
    /// new topics are bound before old ones are unbound, and those in both
    /// are left alone. Without a link now, the next one is declared so;
    /// an error leaves the wanted set in place for the rebuilt link.
    pub async fn set_event_bindings(&self, topics: Vec<String>) -> Result<(), MeshError> {
        bindings::set(&self.shared, topics).await
    }

    /// Requests published and not yet answered, timed out or given up.
    pub fn calls_waiting(&self) -> usize {
        lock(&self.shared.pending).len()
    }

    /// Stop consuming, close the connection and wait for the background
    /// tasks (requests being served get `grace` to finish).
    pub async fn close(&self, grace: Duration) {
        self.shared.shutdown.cancel();
        let supervisor = lock(&self.supervisor).take();
        if let Some(mut handle) = supervisor
            && tokio::time::timeout(grace, &mut handle).await.is_err()
        {
            handle.abort();
        }
        self.shared.tasks.close();
        let _ = tokio::time::timeout(grace, self.shared.tasks.wait()).await;
        let link = self
            .shared
            .link
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(link) = link {
            let bye = link.connection.close(200, "bye".into());
            let _ = tokio::time::timeout(Duration::from_secs(2), bye).await;
        }
        self.shared.ready.store(false, Ordering::SeqCst);
    }

    /// The publish channel for a client's command or event: refused at
    /// once while the broker blocks publishing.
    fn publish_channel(&self) -> Result<Channel, MeshError> {
        self.ready()?;
        if let Some(why) = self.shared.blocked() {
            return Err(MeshError::Blocked(why));
        }
        self.shared.publish_channel()
    }

    /// The request lane, while the mesh is ready and the broker takes
    /// publishes.
    fn lane(&self) -> Result<Lane, MeshError> {
        self.ready()?;
        self.shared.with_unblocked_link(|l| l.lane.clone())
    }

    fn ready(&self) -> Result<(), MeshError> {
        if self.shared.ready.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(MeshError::Unavailable("broker connection is down".into()))
        }
    }
}

impl Link {
    /// Why the broker blocks publishing (a memory or disk alarm), while it
    /// blocks either connection: the lane's says why, lapin's only that it
    /// does.
    fn blocked(&self) -> Option<String> {
        self.lane.blocked().or_else(|| {
            self.connection
                .status()
                .blocked()
                .then(|| "a resource alarm".to_owned())
        })
    }
}

impl Shared {
    /// The publishing channel of the current connection, if it can publish;
    /// one that cannot wakes the supervisor to rebuild the link.
    fn publish_channel(&self) -> Result<Channel, MeshError> {
        let channel = self
            .link
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|l| l.publish.clone())
            .ok_or_else(|| MeshError::Unavailable("broker connection is down".into()))?;
        if !channel.status().connected() {
            self.publish_failed();
            return Err(MeshError::Unavailable(
                "the publish channel is closed".into(),
            ));
        }
        Ok(channel)
    }

    /// A publish failed below the message: rebuild unless shutting down.
    fn publish_failed(&self) {
        if self.ready.swap(false, Ordering::SeqCst) {
            self.relink.notify_one();
        }
    }

    /// Queue a mesh event for the handler; with no room, drop and count it
    /// (and tell the handler its log position is a gap). Its topic and
    /// trace id, which end up in frames, metrics and log lines, are
    /// checked first: an event that fails is dropped and counted.
    fn hand_off_event(&self, event: EventBody, position: Option<u64>, live: bool) {
        let trace_ok = event.trace_id.as_deref().is_none_or(drops::echoable);
        if !drops::echoable(&event.topic) || !trace_ok {
            let what = "an event whose topic or trace_id is not 1 to 255 visible characters";
            self.drops.drop_message(drops::DropReason::BadField, what);
            return;
        }
        let mut event = IncomingEvent::from(event);
        event.position = position;
        event.live = live;
        self.hand_off(LogItem::Event(event), position);
    }

    /// Queue an item of the event queue; a marker that found it full is
    /// sent first with the next item that fits.
    fn hand_off(&self, item: LogItem, position: Option<u64>) {
        if let Some(state) = &self.log {
            let pending = lock(&state.pending_live).take();
            if let Some(p) = pending
                && self.events.try_send(LogItem::Live(p)).is_err()
            {
                *lock(&state.pending_live) = Some(p);
            }
        }
        match self.events.try_send(item) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(LogItem::Live(p))) => {
                if let Some(state) = &self.log {
                    *lock(&state.pending_live) = Some(p);
                }
            }
            Err(e) => {
                // History read to fill the window at start is no client's
                // loss: only a live event lost counts as dropped.
                let live = match e {
                    mpsc::error::TrySendError::Full(LogItem::Event(ev))
                    | mpsc::error::TrySendError::Closed(LogItem::Event(ev)) => ev.live,
                    _ => true,
                };
                if live {
                    self.events_dropped.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(p) = position {
                    self.handler.log_gap(p);
                }
            }
        }
    }

    /// A publish that failed at the channel: the link is rebuilt.
    fn channel_error(&self, e: lapin::Error) -> MeshError {
        self.publish_failed();
        unavailable(e)
    }

    /// `take` from the current link, when there is one and the broker
    /// takes publishes on it: one look at the link per call.
    fn with_unblocked_link<T>(&self, take: impl FnOnce(&Link) -> T) -> Result<T, MeshError> {
        let link = self.link.read().unwrap_or_else(|p| p.into_inner());
        let link = link
            .as_ref()
            .ok_or_else(|| MeshError::Unavailable("broker connection is down".into()))?;
        match link.blocked() {
            Some(why) => Err(MeshError::Blocked(why)),
            None => Ok(take(link)),
        }
    }

    /// Why the broker blocks publishing, while it does.
    fn blocked(&self) -> Option<String> {
        let link = self.link.read().unwrap_or_else(|p| p.into_inner());
        link.as_ref()?.blocked()
    }

    /// Ready: connected, the publish channel can publish, and the broker
    /// takes publishes.
    fn is_ready(&self) -> bool {
        if !self.ready.load(Ordering::SeqCst) {
            return false;
        }
        self.link
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|l| {
                l.publish.status().connected()
                    && l.lane.is_open()
                    && l.service.is_open()
                    && l.connection.status().connected()
                    && l.blocked().is_none()
            })
    }
}

impl AmqpMesh {
    async fn publish_call(
        &self,
        call: &Call,
        command: bool,
        correlation_id: &str,
    ) -> Result<(), MeshError> {
        let kind = if command {
            MessageType::Command
        } else {
            MessageType::Request
        };
        let body = RequestBodyRef {
            tag: kind.as_str(),
            correlation_id,
            context: &call.context,
            trace_id: call.trace_id.as_deref(),
            service: &call.service,
            method: &call.method,
            params: &call.params,
        };
        let payload = body.to_vec().map_err(unavailable)?;
        let exchange = self.shared.config.rpc_exchange.as_str();
        if !command {
            // Requests go on the lane, unconfirmed: the response is the
            // confirmation. A lane that has ended is rebuilt by the
            // supervisor, which sees it end; one that is backed up (the
            // broker not reading) only refuses until it drains.
            let lane = self.lane()?;
            let headers = nuropb_headers(kind, call.trace_id.as_deref());
            let props = LaneProperties {
                content_type: "application/json",
                correlation_id,
                reply_to: &self.shared.response_queue,
                expiration_ms: u64::try_from(call.ttl.as_millis().max(1)).unwrap_or(u64::MAX),
                headers: &headers,
            };
            return lane
                .publish(exchange, &call.service, true, &props, &payload)
                .map_err(unavailable);
        }
        // Commands are confirmed.
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_correlation_id(correlation_id.into())
            .with_reply_to(self.shared.response_queue.as_str().into())
            .with_expiration(call.ttl.as_millis().max(1).to_string().into())
            .with_headers(header_table(kind, call.trace_id.as_deref()));
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let channel = self.publish_channel()?;
        let confirm = channel
            .basic_publish(
                exchange.into(),
                call.service.as_str().into(),
                options,
                &payload,
                props,
            )
            .await
            .map_err(|e| self.shared.channel_error(e))?
            .await
            .map_err(|e| self.shared.channel_error(e))?;
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => {
                Err(MeshError::NotDelivered {
                    service: call.service.clone(),
                    method: call.method.clone(),
                })
            }
            Confirmation::Nack(None) => Err(MeshError::Unavailable(
                "the broker refused the message".into(),
            )),
        }
    }
}

/// A control message as a NuroPb event on [`CONTROL_TOPIC`].
fn control_event(body: Value) -> OutgoingEvent {
    OutgoingEvent {
        topic: CONTROL_TOPIC.into(),
        event: body,
        context: Default::default(),
        target: None,
        trace_id: None,
    }
}

impl AmqpMesh {
    /// Publish an event body to `exchange` with `routing_key`, and wait for
    /// the broker to take it.
    async fn publish_event_to(
        &self,
        exchange: &str,
        routing_key: &str,
        event: OutgoingEvent,
    ) -> Result<(), MeshError> {
        let channel = self.publish_channel()?;
        let correlation_id = uuid::Uuid::new_v4().simple().to_string();
        let body = MeshMessage::Event(EventBody {
            correlation_id: correlation_id.clone(),
            context: event.context,
            trace_id: event.trace_id.clone(),
            topic: event.topic,
            event: RawJson::from(event.event),
            target: event.target,
        });
        let payload = serde_json::to_vec(&body).map_err(unavailable)?;
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_correlation_id(correlation_id.into())
            .with_headers(header_table(MessageType::Event, event.trace_id.as_deref()));
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                &payload,
                props,
            )
            .await
            .map_err(|e| self.shared.channel_error(e))?;
        let confirmation = tokio::time::timeout(Duration::from_secs(10), confirm)
            .await
            .map_err(|_| MeshError::Timeout(Duration::from_secs(10)))?
            .map_err(|e| self.shared.channel_error(e))?;
        taken(confirmation)
    }
}

/// Whether the broker took a message published without `mandatory`: its
/// confirm is an ack. A nack (a queue it routes to cannot take it, such as
/// a stream still recovering after a restart) is not success: the message
/// is not in the queue, and the caller must hear so.
pub(super) fn taken(confirmation: Confirmation) -> Result<(), MeshError> {
    match confirmation {
        Confirmation::Ack(_) | Confirmation::NotRequested => Ok(()),
        Confirmation::Nack(_) => Err(MeshError::Unavailable(
            "the broker refused the message".into(),
        )),
    }
}

impl Mesh for AmqpMesh {
    fn request<'a>(&'a self, call: &'a Call) -> BoxFuture<'a, Result<Value, MeshError>> {
        Box::pin(async move {
            let raw = self.request_raw(call).await?;
            raw.to_value().map_err(|e| super::unreadable(call, &e))
        })
    }

    fn request_raw<'a>(&'a self, call: &'a Call) -> BoxFuture<'a, Result<RawJson, MeshError>> {
        Box::pin(async move {
            let correlation_id = uuid::Uuid::new_v4().simple().to_string();
            let (tx, rx) = oneshot::channel();
            lock(&self.shared.pending).insert(correlation_id.clone(), tx);
            let mut guard = PendingGuard {
                pending: &self.shared.pending,
                correlation_id,
                answered: false,
            };
            let ttl = call.ttl;
            let exchange = async {
                self.publish_call(call, false, &guard.correlation_id)
                    .await?;
                Ok(rx.await)
            };
            let answer = match tokio::time::timeout(ttl, exchange).await {
                Err(_) => return Err(MeshError::Timeout(ttl)),
                Ok(Err(e)) => return Err(e),
                Ok(Ok(answer)) => answer,
            };
            // The sender was taken out of the map to send it, or dropped
            // with the map's other entries when the connection was lost.
            guard.answered = true;
            match answer {
                Ok(Err(MeshError::NotDelivered { .. })) => Err(MeshError::NotDelivered {
                    service: call.service.clone(),
                    method: call.method.clone(),
                }),
                Ok(answer) => answer,
                Err(_) => Err(MeshError::Unavailable("connection lost".into())),
            }
        })
    }

    fn command(&self, call: Call) -> BoxFuture<'_, Result<(), MeshError>> {
        Box::pin(async move {
            let correlation_id = uuid::Uuid::new_v4().simple().to_string();
            let ttl = call.ttl;
            tokio::time::timeout(ttl, self.publish_call(&call, true, &correlation_id))
                .await
                .unwrap_or(Err(MeshError::Timeout(ttl)))
        })
    }

    fn publish_event(&self, event: OutgoingEvent) -> BoxFuture<'_, Result<(), MeshError>> {
        let exchange = self.shared.config.events_exchange.clone();
        let routing_key = event.topic.clone();
        Box::pin(async move { self.publish_event_to(&exchange, &routing_key, event).await })
    }

    fn broadcast_control(&self, body: Value) -> BoxFuture<'_, Result<(), MeshError>> {
        Box::pin(async move {
            let Some(exchange) = self.shared.config.control_exchange.clone() else {
                return Err(MeshError::Unavailable("no control exchange".into()));
            };
            self.publish_event_to(&exchange, "", control_event(body))
                .await
        })
    }

    fn send_control(&self, instance: &str, body: Value) -> BoxFuture<'_, Result<(), MeshError>> {
        let queue = self.shared.config.response_queue_of(instance);
        Box::pin(async move { self.publish_event_to("", &queue, control_event(body)).await })
    }

    fn is_ready(&self) -> bool {
        self.shared.is_ready()
    }

    fn unready_reason(&self) -> Option<String> {
        self.shared
            .blocked()
            .map(|why| MeshError::Blocked(why).to_string())
    }

    fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::Relaxed)
    }

    fn messages_dropped(&self) -> Vec<(&'static str, u64)> {
        self.shared.drops.counts()
    }

    fn read_log(
        &self,
        from: u64,
        until: u64,
    ) -> super::BoxStream<'_, Result<super::LogRead, MeshError>> {
        log::read(&self.shared, from, until)
    }

    fn events_dropped(&self) -> u64 {
        self.shared.events_dropped.load(Ordering::Relaxed)
    }
}

mod bindings;
mod drops;
mod headers;
mod log;
mod service;
mod supervisor;
mod topology;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names_follow_nuropb() {
        let mut c = AmqpConfig::new("amqp://localhost", "my-bff");
        c.instance_id = "abc".into();
        assert_eq!(c.service_queue(), "nuropb-my-bff-sq");
        assert_eq!(c.response_queue(), "nuropb-my-bff-abc-rq");
    }

    #[test]
    fn the_config_debug_masks_the_password() {
        let c = AmqpConfig::new("amqp://guest:hunter2@host/%2f", "x");
        let text = format!("{c:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("guest:***@host"), "{text}");
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact_url("amqp://host/"), "amqp://host/");
    }

    #[test]
    fn a_nack_is_not_taken_for_success() {
        assert_eq!(taken(Confirmation::Ack(None)), Ok(()));
        assert_eq!(taken(Confirmation::NotRequested), Ok(()));
        assert!(matches!(
            taken(Confirmation::Nack(None)),
            Err(MeshError::Unavailable(why)) if why.contains("refused")
        ));
    }
}
