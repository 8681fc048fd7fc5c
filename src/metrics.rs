//! Prometheus metrics of one gateway, in its own registry (no globals), served
//! at `/metrics` in the text exposition format.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabels {
    pub(crate) outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabels {
    pub(crate) kind: &'static str,
}

/// The gateway's metrics. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Metrics(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    registry: Registry,
    connections: Counter,
    sessions: Gauge,
    frames_in: Family<KindLabels, Counter>,
    requests: Family<OutcomeLabels, Counter>,
    /// The series every call counts in, taken out of their families once:
    /// a family's lookup takes a lock and hashes the labels.
    frames_in_request: Counter,
    frames_in_command: Counter,
    requests_ok: Counter,
    request_seconds: Histogram,
    pushes: Family<KindLabels, Counter>,
    slow_closes: Counter,
    dead_closes: Counter,
    pushes_refused: Counter,
    refused_connections: Family<ReasonLabels, Counter>,
    mesh_dropped: Family<ReasonLabels, Counter>,
    events_dropped: Counter,
    reconnects: Counter,
    mesh_ready: Gauge,
    mesh_blocked: Gauge,
    routes_reloads: Family<ResultLabels, Counter>,
    resumes: Family<ResultLabels, Counter>,
    lifecycle_dropped: Counter,
    spans_exported: Counter,
    spans_dropped: Family<ReasonLabels, Counter>,
    route_seconds: Family<RouteLabels, Histogram, fn() -> Histogram>,
}

fn latency_buckets() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ])
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RouteLabels {
    /// The name the client calls: a route of the routing file, or `-`.
    pub(crate) route: String,
    pub(crate) outcome: &'static str,
}

/// One route's latency: its name, and its `ok` series taken out of the
/// family once (the common outcome costs no lookup).
#[derive(Debug, Clone)]
pub(crate) struct RouteLatency {
    label: Arc<str>,
    ok: Histogram,
}

impl RouteLatency {
    pub(crate) fn label(&self) -> &str {
        &self.label
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabels {
    pub(crate) result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabels {
    pub(crate) reason: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Bring a counter the mesh keeps its own count of up to that count.
fn catch_up(counter: &Counter, total: u64) {
    let seen = counter.get();
    if total > seen {
        counter.inc_by(total - seen);
    }
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("bff");
        let connections = Counter::default();
        let sessions = Gauge::default();
        let frames_in = Family::<KindLabels, Counter>::default();
        let requests = Family::<OutcomeLabels, Counter>::default();
        let request_seconds = Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0,
        ]);
        let pushes = Family::<KindLabels, Counter>::default();
        let slow_closes = Counter::default();
        let dead_closes = Counter::default();
        let pushes_refused = Counter::default();
        let refused_connections = Family::<ReasonLabels, Counter>::default();
        let mesh_dropped = Family::<ReasonLabels, Counter>::default();
        let events_dropped = Counter::default();
        let reconnects = Counter::default();
        let mesh_ready = Gauge::default();
        let mesh_blocked = Gauge::default();
        let routes_reloads = Family::<ResultLabels, Counter>::default();
        let resumes = Family::<ResultLabels, Counter>::default();
        let lifecycle_dropped = Counter::default();
        let spans_exported = Counter::default();
        let spans_dropped = Family::<ReasonLabels, Counter>::default();
        let route_seconds =
            Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_buckets as fn() -> Histogram,
            );
        registry.register(
            "ws_connections",
            "WebSocket connections accepted",
            connections.clone(),
        );
        registry.register("ws_sessions", "Live WebSocket sessions", sessions.clone());
        registry.register(
            "ws_frames_in",
            "Client frames received, by type",
            frames_in.clone(),
        );
        registry.register(
            "requests",
            "Client requests answered, by outcome",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from a client request to its response",
            request_seconds.clone(),
        );
        registry.register(
            "pushes",
            "Frames pushed to sessions from the mesh, by kind",
            pushes.clone(),
        );
        registry.register(
            "slow_consumer_closes",
            "Sessions closed because their outbound queue was full",
            slow_closes.clone(),
        );
        registry.register(
            "dead_socket_closes",
            "Sessions closed because two pings went unanswered",
            dead_closes.clone(),
        );
        registry.register(
            "mesh_pushes_refused",
            "Pushes (send_to_users, broadcast, disconnect_users) refused for their caller token",
            pushes_refused.clone(),
        );
        registry.register(
            "refused_connections",
            "Sockets refused at the door, by reason",
            refused_connections.clone(),
        );
        registry.register(
            "mesh_messages_dropped",
            "Messages from the broker let go, by reason (too_large, undecodable, bad_field, unexpected)",
            mesh_dropped.clone(),
        );
        registry.register(
            "mesh_events_dropped",
            "Mesh events dropped because the event queue was full (history read at start to fill the window is not counted)",
            events_dropped.clone(),
        );
        registry.register(
            "mesh_reconnects",
            "Times the broker link was lost and rebuilt",
            reconnects.clone(),
        );
        registry.register(
            "mesh_ready",
            "1 while the broker connection is up",
            mesh_ready.clone(),
        );
        registry.register(
            "mesh_blocked",
            "1 while the broker blocks publishing (a memory or disk alarm)",
            mesh_blocked.clone(),
        );
        registry.register(
            "routes_reload",
            "Routing-file reloads, by result (ok, error: the old table kept serving)",
            routes_reloads.clone(),
        );
        registry.register(
            "resumes",
            "Subscriptions resumed with `since`, by result (recovered, refetch)",
            resumes.clone(),
        );
        registry.register(
            "lifecycle_events_dropped",
            "Lifecycle events (connected, disconnected, ...) not published: their queue was full or the broker did not take them",
            lifecycle_dropped.clone(),
        );
        registry.register(
            "spans_exported",
            "Spans the OTLP collector took",
            spans_exported.clone(),
        );
        registry.register(
            "spans_dropped",
            "Spans not exported, by reason (queue_full, export_failed, shutdown)",
            spans_dropped.clone(),
        );
        registry.register(
            "route_duration_seconds",
            "Time from a client call to its answer, by route (the name the client calls; `-` outside the routing file) and outcome",
            route_seconds.clone(),
        );
        let frames_in_request = frames_in
            .get_or_create(&KindLabels { kind: "request" })
            .clone();
        let frames_in_command = frames_in
            .get_or_create(&KindLabels { kind: "command" })
            .clone();
        let requests_ok = requests
            .get_or_create(&OutcomeLabels { outcome: "ok" })
            .clone();
        Self(Arc::new(Inner {
            registry,
            connections,
            sessions,
            frames_in,
            requests,
            frames_in_request,
            frames_in_command,
            requests_ok,
            request_seconds,
            pushes,
            slow_closes,
            dead_closes,
            pushes_refused,
            refused_connections,
            mesh_dropped,
            events_dropped,
            reconnects,
            mesh_ready,
            mesh_blocked,
            routes_reloads,
            resumes,
            lifecycle_dropped,
            spans_exported,
            spans_dropped,
            route_seconds,
        }))
    }

    pub(crate) fn connection_opened(&self) {
        self.0.connections.inc();
        self.0.sessions.inc();
    }

    pub(crate) fn connection_closed(&self) {
        self.0.sessions.dec();
    }

    pub(crate) fn frame_in(&self, kind: &'static str) {
        match kind {
            "request" => self.0.frames_in_request.inc(),
            "command" => self.0.frames_in_command.inc(),
            _ => self.0.frames_in.get_or_create(&KindLabels { kind }).inc(),
        };
    }

    pub(crate) fn request_done(&self, outcome: &'static str, seconds: f64) {
        match outcome {
            "ok" => self.0.requests_ok.inc(),
            _ => self
                .0
                .requests
                .get_or_create(&OutcomeLabels { outcome })
                .inc(),
        };
        self.0.request_seconds.observe(seconds);
    }

    pub(crate) fn pushed(&self, kind: &'static str, count: usize) {
        self.0
            .pushes
            .get_or_create(&KindLabels { kind })
            .inc_by(count as u64);
    }

    pub(crate) fn slow_consumer_closed(&self) {
        self.0.slow_closes.inc();
    }

    pub(crate) fn push_refused(&self) {
        self.0.pushes_refused.inc();
    }

    pub(crate) fn dead_socket_closed(&self) {
        self.0.dead_closes.inc();
    }

    pub(crate) fn connection_refused(&self, reason: &'static str) {
        self.0
            .refused_connections
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Bring the counters the mesh keeps itself up to its counts.
    pub(crate) fn set_mesh_counts(&self, events_dropped: u64, reconnects: u64) {
        catch_up(&self.0.events_dropped, events_dropped);
        catch_up(&self.0.reconnects, reconnects);
    }

    /// A control message not believed (its seal missing, wrong or stale).
    pub(crate) fn control_dropped(&self, reason: &'static str) {
        self.0
            .mesh_dropped
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Bring the dropped-message counters up to the mesh's counts.
    pub(crate) fn set_mesh_dropped(&self, counts: &[(&'static str, u64)]) {
        for &(reason, total) in counts {
            catch_up(
                &self.0.mesh_dropped.get_or_create(&ReasonLabels { reason }),
                total,
            );
        }
    }

    pub(crate) fn set_mesh_blocked(&self, blocked: bool) {
        self.0.mesh_blocked.set(i64::from(blocked));
    }

    /// A routing-file reload: `ok` or `error`.
    pub(crate) fn routes_reloaded(&self, result: &'static str) {
        self.0
            .routes_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// The latency series of route `label`.
    pub(crate) fn route_latency(&self, label: &str) -> RouteLatency {
        let ok = self
            .0
            .route_seconds
            .get_or_create(&RouteLabels {
                route: label.to_owned(),
                outcome: "ok",
            })
            .clone();
        RouteLatency {
            label: label.into(),
            ok,
        }
    }

    /// A call on `route` (or outside the routing file) answered with
    /// `outcome` after `seconds`.
    pub(crate) fn route_done(
        &self,
        route: Option<&RouteLatency>,
        outcome: &'static str,
        seconds: f64,
    ) {
        match (route, outcome) {
            (Some(r), "ok") => r.ok.observe(seconds),
            (r, outcome) => self
                .0
                .route_seconds
                .get_or_create(&RouteLabels {
                    route: r.map_or("-", RouteLatency::label).to_owned(),
                    outcome,
                })
                .observe(seconds),
        }
    }

    pub(crate) fn lifecycle_dropped(&self) {
        self.0.lifecycle_dropped.inc();
    }

    pub(crate) fn spans_exported(&self, n: u64) {
        self.0.spans_exported.inc_by(n);
    }

    pub(crate) fn spans_dropped(&self, reason: &'static str, n: u64) {
        self.0
            .spans_dropped
            .get_or_create(&ReasonLabels { reason })
            .inc_by(n);
    }

    /// A resume: `recovered` or `refetch`.
    pub(crate) fn resumed(&self, result: &'static str) {
        self.0.resumes.get_or_create(&ResultLabels { result }).inc();
    }

    pub(crate) fn set_mesh_ready(&self, ready: bool) {
        self.0.mesh_ready.set(i64::from(ready));
    }

    /// The text exposition format.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.0.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_show_in_the_text_format() {
        let m = Metrics::new();
        m.connection_opened();
        m.request_done("ok", 0.002);
        m.request_done("ok", 0.002);
        m.request_done("RouteNotFound", 0.0);
        for kind in ["request", "request", "command", "subscribe"] {
            m.frame_in(kind);
        }
        let text = m.encode();
        for (kind, n) in [("request", 2), ("command", 1), ("subscribe", 1)] {
            let line = format!(r#"bff_ws_frames_in_total{{kind="{kind}"}} {n}"#);
            assert!(text.contains(&line), "{line} in {text}");
        }
        assert!(text.contains("bff_ws_connections_total 1"), "{text}");
        assert!(text.contains("bff_ws_sessions 1"), "{text}");
        assert!(
            text.contains(r#"bff_requests_total{outcome="ok"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"bff_requests_total{outcome="RouteNotFound"} 1"#),
            "{text}"
        );
        m.routes_reloaded("error");
        let text = m.encode();
        assert!(
            text.contains(r#"bff_routes_reload_total{result="error"} 1"#),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
