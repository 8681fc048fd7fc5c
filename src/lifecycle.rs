//! The frontend's comings and goings as NuroPb events, for the services
//! behind the BFF (start a per-user feed, release a lock, mark a seat
//! free): `bff.{name}.connected`, `.disconnected` (with the close code and
//! why), `.subscribed` and `.unsubscribed` (with the topics), each naming
//! the user, the session, the instance and the time. Never a token, a
//! claim or a client address.
//!
//! Off the socket's path: a socket only queues its event (without
//! waiting) for one task that publishes them in order. When the broker is
//! slow or away the queue fills and events are dropped and counted
//! (`bff_lifecycle_events_dropped_total`): a connect never waits on it.

use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::mesh::{Mesh, OutgoingEvent};
use crate::metrics::Metrics;
use crate::protocol::{SessionInfo, close};
use crate::session::Sessions;

/// Lifecycle events waiting to be published, at most.
const QUEUE: usize = 4096;

/// The longest one publish may take before the event is given up.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// After shutdown begins, how long what is queued still gets to go out.
const DRAIN: Duration = Duration::from_secs(2);

/// Where a BFF's lifecycle events go, if it sends them.
#[derive(Debug)]
pub(crate) struct Lifecycle {
    out: Option<mpsc::Sender<OutgoingEvent>>,
    /// `bff.{name}`: the topics' common prefix.
    prefix: String,
    instance: String,
    metrics: Metrics,
}

/// Why a session ended, from its close code: what `disconnected` says.
pub(crate) fn why_closed(code: u16) -> &'static str {
    match code {
        close::NORMAL => "client",
        close::TOKEN_EXPIRED => "token_expired",
        close::DISCONNECTED => "kicked",
        close::GOING_AWAY => "shutdown",
        close::NO_PONG => "dead_peer",
        close::SLOW_CONSUMER => "slow_consumer",
        close::AUTH_REQUIRED => "unauthorized",
        _ => "other",
    }
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Lifecycle {
    /// Events for the BFF `name`'s `instance` when `enabled`; the queue's
    /// other end is for [`pump`].
    pub(crate) fn new(
        enabled: bool,
        name: &str,
        instance: &str,
        metrics: Metrics,
    ) -> (Self, Option<mpsc::Receiver<OutgoingEvent>>) {
        let (out, rx) = if enabled {
            let (tx, rx) = mpsc::channel(QUEUE);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let lifecycle = Self {
            out,
            prefix: format!("bff.{name}"),
            instance: instance.to_owned(),
            metrics,
        };
        (lifecycle, rx)
    }

    pub(crate) fn connected(&self, session: &SessionInfo) {
        self.emit("connected", session, Map::new());
    }

    pub(crate) fn disconnected(&self, session: &SessionInfo, code: u16) {
        let mut extra = Map::new();
        extra.insert("code".into(), json!(code));
        extra.insert("why".into(), json!(why_closed(code)));
        self.emit("disconnected", session, extra);
    }

    /// A session another instance held, gone with that instance.
    pub(crate) fn lost(&self, user_id: &str, session_id: &str, instance: &str) {
        let mut body = Map::new();
        body.insert("user_id".into(), json!(user_id));
        body.insert("session_id".into(), json!(session_id));
        body.insert("instance".into(), json!(instance));
        body.insert("at".into(), json!(now_ms()));
        body.insert("code".into(), json!(close::GOING_AWAY));
        body.insert("why".into(), json!("instance_lost"));
        self.send("disconnected", body);
    }

    pub(crate) fn subscribed(&self, session: &SessionInfo, topics: &[String]) {
        if topics.is_empty() {
            return;
        }
        let mut extra = Map::new();
        extra.insert("topics".into(), json!(topics));
        self.emit("subscribed", session, extra);
    }

    pub(crate) fn unsubscribed(&self, session: &SessionInfo, topics: &[String]) {
        if topics.is_empty() {
            return;
        }
        let mut extra = Map::new();
        extra.insert("topics".into(), json!(topics));
        self.emit("unsubscribed", session, extra);
    }

    fn emit(&self, kind: &str, session: &SessionInfo, extra: Map<String, Value>) {
        if self.out.is_none() {
            return;
        }
        let mut body = Map::new();
        body.insert("user_id".into(), json!(session.user_id));
        body.insert("session_id".into(), json!(session.session_id));
        body.insert("instance".into(), json!(self.instance));
        body.insert("at".into(), json!(now_ms()));
        body.extend(extra);
        self.send(kind, body);
    }

    fn send(&self, kind: &str, body: Map<String, Value>) {
        let Some(out) = &self.out else {
            return;
        };
        let event = OutgoingEvent {
            topic: format!("{}.{kind}", self.prefix),
            event: Value::Object(body),
            context: Map::new(),
            target: None,
            trace_id: None,
        };
        if out.try_send(event).is_err() {
            self.metrics.lifecycle_dropped();
        }
    }
}

/// How often the pump looks whether the broker link is back.
const READY_POLL: Duration = Duration::from_millis(20);

/// Until the mesh takes calls (the broker link is up and not blocked).
async fn until_ready(mesh: &dyn Mesh) {
    while !mesh.is_ready() {
        tokio::time::sleep(READY_POLL).await;
    }
}

/// Publish queued lifecycle events in order until `stop` (the sessions
/// are being closed), then what the closing sessions still queue, until
/// none is left or [`DRAIN`] is over. While the broker link is down (a
/// relink, a resource alarm) the pump waits for it and the events wait in
/// their bounded queue: a blink of the link delays them, a long outage
/// fills the queue and drops what comes after. A publish that fails or
/// takes over [`PUBLISH_TIMEOUT`] is counted as dropped, as is what is
/// left when the drain is over.
pub(crate) async fn pump(
    mesh: std::sync::Arc<dyn Mesh>,
    mut queue: mpsc::Receiver<OutgoingEvent>,
    metrics: Metrics,
    sessions: Sessions,
    stop: CancellationToken,
) {
    let publish = async |event: OutgoingEvent| {
        let sent = tokio::time::timeout(PUBLISH_TIMEOUT, mesh.publish_event(event)).await;
        if !matches!(sent, Ok(Ok(()))) {
            metrics.lifecycle_dropped();
        }
    };
    let mut held = None;
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            event = queue.recv() => match event {
                Some(event) => event,
                None => return,
            },
        };
        tokio::select! {
            biased;
            _ = stop.cancelled() => {
                held = Some(event);
                break;
            }
            _ = until_ready(&*mesh) => publish(event).await,
        }
    }
    let deadline = tokio::time::Instant::now() + DRAIN;
    loop {
        let last_look = sessions.counts().sessions == 0;
        while let Some(event) = held.take().or_else(|| queue.try_recv().ok()) {
            if tokio::time::timeout_at(deadline, until_ready(&*mesh))
                .await
                .is_err()
            {
                metrics.lifecycle_dropped();
                while queue.try_recv().is_ok() {
                    metrics.lifecycle_dropped();
                }
                return;
            }
            publish(event).await;
        }
        if last_look || tokio::time::Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> SessionInfo {
        SessionInfo {
            session_id: "s1".into(),
            user_id: "alice".into(),
            username: Some("Alice".into()),
            roles: vec!["admin".into()],
        }
    }

    #[test]
    fn events_name_the_user_the_session_and_why_but_no_token_or_claim() {
        let (l, rx) = Lifecycle::new(true, "shop", "i1", Metrics::new());
        let mut rx = rx.unwrap();
        l.connected(&alice());
        l.subscribed(&alice(), &["orders.#".into()]);
        l.subscribed(&alice(), &[]);
        l.disconnected(&alice(), close::TOKEN_EXPIRED);
        let got: Vec<OutgoingEvent> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        let topics: Vec<&str> = got.iter().map(|e| e.topic.as_str()).collect();
        assert_eq!(
            topics,
            [
                "bff.shop.connected",
                "bff.shop.subscribed",
                "bff.shop.disconnected"
            ]
        );
        assert_eq!(got[0].event["user_id"], "alice");
        assert_eq!(got[0].event["instance"], "i1");
        assert_eq!(got[1].event["topics"], json!(["orders.#"]));
        assert_eq!(got[2].event["why"], "token_expired");
        assert_eq!(got[2].event["code"], 4001);
        for e in &got {
            let text = e.event.to_string();
            assert!(!text.contains("admin") && !text.contains("Alice"), "{text}");
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_never_waits() {
        let metrics = Metrics::new();
        let (l, _rx) = Lifecycle::new(true, "shop", "i1", metrics.clone());
        for _ in 0..QUEUE + 10 {
            l.connected(&alice());
        }
        assert!(
            metrics
                .encode()
                .contains("bff_lifecycle_events_dropped_total 10")
        );
        let (off, rx) = Lifecycle::new(false, "shop", "i1", Metrics::new());
        assert!(rx.is_none());
        off.connected(&alice());
    }

    /// A mesh whose link can be down: a publish then fails, as the AMQP
    /// mesh's does.
    #[derive(Debug, Default)]
    struct Blinking {
        up: std::sync::atomic::AtomicBool,
        published: std::sync::Mutex<Vec<String>>,
    }

    impl Mesh for Blinking {
        fn request<'a>(
            &'a self,
            _: &'a crate::mesh::Call,
        ) -> crate::mesh::BoxFuture<'a, Result<Value, crate::mesh::MeshError>> {
            Box::pin(async { Ok(Value::Null) })
        }
        fn command(
            &self,
            _: crate::mesh::Call,
        ) -> crate::mesh::BoxFuture<'_, Result<(), crate::mesh::MeshError>> {
            Box::pin(async { Ok(()) })
        }
        fn publish_event(
            &self,
            event: OutgoingEvent,
        ) -> crate::mesh::BoxFuture<'_, Result<(), crate::mesh::MeshError>> {
            Box::pin(async move {
                if !self.is_ready() {
                    return Err(crate::mesh::MeshError::Unavailable("down".into()));
                }
                self.published
                    .lock()
                    .unwrap()
                    .push(event.event["session_id"].to_string());
                Ok(())
            })
        }
        fn is_ready(&self) -> bool {
            self.up.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    fn session(id: &str) -> SessionInfo {
        SessionInfo {
            session_id: id.into(),
            ..alice()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn events_wait_for_the_link_to_come_back_and_a_drain_does_not() {
        let metrics = Metrics::new();
        let dropped = |m: &Metrics| {
            m.encode()
                .lines()
                .find_map(|l| l.strip_prefix("bff_lifecycle_events_dropped_total "))
                .map(|v| v.trim().to_owned())
        };
        let mesh = std::sync::Arc::new(Blinking::default());
        let (l, rx) = Lifecycle::new(true, "shop", "i1", metrics.clone());
        let stop = CancellationToken::new();
        let sessions = Sessions::new(8);
        let pump = tokio::spawn(pump(
            mesh.clone(),
            rx.unwrap(),
            metrics.clone(),
            sessions.clone(),
            stop.clone(),
        ));
        // The link is down (a relink): the events wait, none is dropped.
        for id in ["a", "b", "c"] {
            l.connected(&session(id));
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(mesh.published.lock().unwrap().is_empty());
        assert_eq!(dropped(&metrics).as_deref(), Some("0"));
        // It is back: they go out, in order.
        mesh.up.store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(*mesh.published.lock().unwrap(), ["\"a\"", "\"b\"", "\"c\""]);
        // Down again as the BFF stops: the drain waits no longer than its
        // bound, and what it could not send is counted.
        mesh.up.store(false, std::sync::atomic::Ordering::SeqCst);
        l.disconnected(&session("a"), close::GOING_AWAY);
        l.disconnected(&session("b"), close::GOING_AWAY);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let stopped = tokio::time::Instant::now();
        stop.cancel();
        tokio::time::timeout(DRAIN * 2, pump)
            .await
            .unwrap()
            .unwrap();
        assert!(stopped.elapsed() >= DRAIN, "it gave the link its time");
        assert_eq!(dropped(&metrics).as_deref(), Some("2"));
        assert_eq!(mesh.published.lock().unwrap().len(), 3);
    }

    #[test]
    fn every_close_code_has_a_reason() {
        for (_, code) in close::ALL {
            assert_ne!(why_closed(code), "", "{code}");
        }
        assert_eq!(why_closed(close::NORMAL), "client");
        assert_eq!(why_closed(close::DISCONNECTED), "kicked");
        assert_eq!(why_closed(close::GOING_AWAY), "shutdown");
        assert_eq!(why_closed(close::NO_PONG), "dead_peer");
    }
}
