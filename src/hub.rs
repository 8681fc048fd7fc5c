//! The hub: what every connection and the BFF's own mesh service share,
//! built before the mesh is joined (settings, routing table, hooks, the
//! session registry, metrics). It knows nothing of sockets or the broker.
//!
//! The routing table is the one thing in it that changes while the BFF
//! runs (a reload swaps it whole): whoever decides by it takes the table
//! once and decides by that one, so a call never sees two tables.

use std::fmt;
use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};

use crate::auth::AuthHook;
use crate::config::{Limits, Settings};
use crate::history::Window;
use crate::hooks::WsHandler;
use crate::lifecycle::Lifecycle;
use crate::mesh::OutgoingEvent;
use crate::metrics::Metrics;
use crate::routing::RouteTable;
use crate::seal::Seal;
use crate::session::Sessions;
use crate::spans::{OtlpExporting, Spans};

/// Every this many heartbeats, one tells all of an instance's sessions.
const FULL_ROSTER_EVERY: u32 = 12;

/// Changes past this many between two heartbeats: the next tells all.
const MAX_ROSTER_CHANGES: usize = 50_000;

/// This instance's session changes since its last heartbeat.
#[derive(Debug, Default)]
struct RosterOut {
    opened: Vec<(String, String)>,
    closed: Vec<String>,
    full_next: bool,
    beats: u32,
}

impl RosterOut {
    fn note(&mut self, opened: Option<(&str, &str)>, closed: Option<&str>) {
        if self.full_next {
            return;
        }
        if let Some((sid, uid)) = opened {
            self.opened.push((sid.to_owned(), uid.to_owned()));
        }
        if let Some(sid) = closed {
            self.closed.push(sid.to_owned());
        }
        if self.opened.len() + self.closed.len() > MAX_ROSTER_CHANGES {
            self.opened.clear();
            self.closed.clear();
            self.full_next = true;
        }
    }
}

/// What a heartbeat says of the instance's sessions.
#[derive(Debug)]
pub(crate) struct RosterNews {
    pub(crate) full: bool,
    pub(crate) opened: Vec<(String, String)>,
    pub(crate) closed: Vec<String>,
}

/// Cheap to clone; clones share everything.
#[derive(Clone)]
pub(crate) struct Hub(Arc<Inner>);

struct Inner {
    settings: Settings,
    /// This instance among the BFF's instances on the broker.
    instance_id: String,
    routes: ArcSwap<RouteTable>,
    auth: Arc<dyn AuthHook>,
    handler: Arc<dyn WsHandler>,
    sessions: Sessions,
    metrics: Metrics,
    /// Seals and opens control messages with the cluster key.
    seal: Seal,
    /// The window of the event log this instance keeps; its lock orders
    /// live delivery against a resume's switch from replay to live.
    log: std::sync::Mutex<Window>,
    /// Resumes reading the broker's log at once.
    log_reads: tokio::sync::Semaphore,
    /// Lifecycle events out, and their queue's other end until the
    /// gateway takes it to publish.
    lifecycle: Lifecycle,
    lifecycle_queue: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<OutgoingEvent>>>,
    /// Where spans go, and (until the gateway takes it) the exporter's end
    /// of their queue.
    spans: Spans,
    spans_export: std::sync::Mutex<Option<OtlpExporting>>,
    /// Sessions opened and closed since the last heartbeat, for the other
    /// instances to know what this one holds (lifecycle events with a
    /// cluster key only).
    roster: std::sync::Mutex<RosterOut>,
    /// Held while a new routing table is put in place: one at a time.
    replacing_routes: tokio::sync::Mutex<()>,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("service", &self.0.settings.mesh_service_name)
            .field("sessions", &self.0.sessions.counts())
            .finish_non_exhaustive()
    }
}

impl Hub {
    pub(crate) fn new(
        settings: Settings,
        routes: RouteTable,
        auth: Arc<dyn AuthHook>,
        handler: Arc<dyn WsHandler>,
    ) -> Result<Self, String> {
        let metrics = Metrics::new();
        let mut routes = routes;
        routes.set_latency(&metrics);
        let sessions = Sessions::new(settings.limits.outbound_queue)
            .with_queue_bytes(settings.limits.outbound_queue_bytes)
            .with_metrics(metrics.clone());
        let instance_id = settings
            .instance_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        let seal = Seal::new(settings.cluster_key.clone());
        let (lifecycle, lifecycle_queue) = Lifecycle::new(
            settings.lifecycle_events,
            &settings.mesh_service_name,
            &instance_id,
            metrics.clone(),
        );
        let (spans, spans_export) = Spans::new(
            settings.otlp_endpoint.as_deref(),
            settings.otlp_sample_ratio,
            &settings.mesh_service_name,
            &instance_id,
            metrics.clone(),
        )?;
        let events = &settings.events;
        let log = std::sync::Mutex::new(Window::new(events.window_events, events.window_bytes));
        let log_reads = tokio::sync::Semaphore::new(events.max_log_reads);
        Ok(Self(Arc::new(Inner {
            spans,
            spans_export: std::sync::Mutex::new(spans_export),
            lifecycle,
            lifecycle_queue: std::sync::Mutex::new(lifecycle_queue),
            roster: std::sync::Mutex::default(),
            log,
            log_reads,
            seal,
            replacing_routes: tokio::sync::Mutex::new(()),
            instance_id,
            settings,
            routes: ArcSwap::from_pointee(routes),
            auth,
            handler,
            sessions,
            metrics,
        })))
    }

    pub(crate) fn settings(&self) -> &Settings {
        &self.0.settings
    }

    pub(crate) fn instance_id(&self) -> &str {
        &self.0.instance_id
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.0.settings.limits
    }

    pub(crate) fn service_name(&self) -> &str {
        &self.0.settings.mesh_service_name
    }

    /// The routing table now: one atomic load, held only while a decision
    /// is made (a reload does not wait for it).
    pub(crate) fn routes(&self) -> Guard<Arc<RouteTable>> {
        self.0.routes.load()
    }

    /// The routing table now, to keep.
    pub(crate) fn routes_full(&self) -> Arc<RouteTable> {
        self.0.routes.load_full()
    }

    /// Held while a new routing table is read, checked and put in place,
    /// so two reloads never interleave.
    pub(crate) async fn replacing_routes(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.0.replacing_routes.lock().await
    }

    /// Put `routes` in the place of the table in use: every decision from
    /// now on is made by the new one.
    pub(crate) fn replace_routes(&self, mut routes: RouteTable) {
        routes.set_generation(self.routes().generation().wrapping_add(1));
        routes.set_latency(&self.0.metrics);
        self.0.routes.store(Arc::new(routes));
    }

    pub(crate) fn auth(&self) -> &dyn AuthHook {
        self.0.auth.as_ref()
    }

    pub(crate) fn handler(&self) -> &Arc<dyn WsHandler> {
        &self.0.handler
    }

    pub(crate) fn sessions(&self) -> &Sessions {
        &self.0.sessions
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    pub(crate) fn lifecycle(&self) -> &Lifecycle {
        &self.0.lifecycle
    }

    pub(crate) fn spans(&self) -> &Spans {
        &self.0.spans
    }

    /// The span exporter's work, once: for the task that runs it.
    pub(crate) fn take_span_export(&self) -> Option<OtlpExporting> {
        self.0
            .spans_export
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// The lifecycle events' queue, once, for the task that publishes them.
    pub(crate) fn take_lifecycle_queue(
        &self,
    ) -> Option<tokio::sync::mpsc::Receiver<OutgoingEvent>> {
        self.0
            .lifecycle_queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Whether this instance tells the others its sessions (so that they
    /// can say `disconnected` for them if it is lost).
    fn keeps_roster(&self) -> bool {
        self.0.settings.lifecycle_events && self.0.seal.is_keyed()
    }

    pub(crate) fn session_opened(&self, session_id: &str, user_id: &str) {
        if self.keeps_roster() {
            self.roster().note(Some((session_id, user_id)), None);
        }
    }

    pub(crate) fn session_closed(&self, session_id: &str) {
        if self.keeps_roster() {
            self.roster().note(None, Some(session_id));
        }
    }

    /// The next heartbeat's news of this instance's sessions: all of them,
    /// or what changed since the last one; `None` when it keeps no roster.
    pub(crate) fn roster_news(&self) -> Option<RosterNews> {
        if !self.keeps_roster() {
            return None;
        }
        let mut roster = self.roster();
        roster.beats = roster.beats.wrapping_add(1);
        let full = roster.full_next || roster.beats % FULL_ROSTER_EVERY == 1;
        roster.full_next = false;
        let opened = std::mem::take(&mut roster.opened);
        let closed = std::mem::take(&mut roster.closed);
        drop(roster);
        Some(if full {
            RosterNews {
                full: true,
                opened: self.0.sessions.all(),
                closed: Vec::new(),
            }
        } else {
            RosterNews {
                full: false,
                opened,
                closed,
            }
        })
    }

    /// A new instance was heard: the next heartbeat tells all.
    pub(crate) fn roster_in_full_next(&self) {
        self.roster().full_next = true;
    }

    fn roster(&self) -> std::sync::MutexGuard<'_, RosterOut> {
        self.0.roster.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The window of the event log, locked.
    pub(crate) fn log(&self) -> std::sync::MutexGuard<'_, Window> {
        self.0.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place among the resumes reading the broker's log.
    pub(crate) fn log_reads(&self) -> &tokio::sync::Semaphore {
        &self.0.log_reads
    }

    pub(crate) fn seal(&self) -> &Seal {
        &self.0.seal
    }

    /// The topic patterns the BFF must receive mesh events for.
    pub(crate) fn event_bindings(&self) -> Vec<String> {
        self.routes()
            .events()
            .iter()
            .map(|r| r.pattern.clone())
            .collect()
    }
}
