//! A running gateway and the one way to build it: the hub first, then the
//! mesh joined with the hub's own service as its handler, then the gateway
//! owning both. `run`, the testing helpers and the benchmarks all start
//! here ([`Gateway::builder`]).

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::AuthHook;
use crate::auth::auth_from_settings;
use crate::cluster::Cluster;
use crate::config::ANY_AUDIENCE;
use crate::config::{Limits, Settings};
use crate::error::RunError;
use crate::hooks::{DefaultHandler, WsHandler};
use crate::hub::Hub;
use crate::mesh::{
    AmqpConfig, AmqpMesh, EventLogConfig, MemoryMesh, Mesh, MeshHandler, redact_url,
};
use crate::mesh_api::{self, BffService, CONTROL_OUTBOX, ControlItem, ControlOut};
use crate::metrics::Metrics;
use crate::protocol::close;
use crate::routing::RouteTable;
use crate::session::{Caps, Sessions};

/// Connections the kernel holds for the gateway before it accepts them
/// (capped by `net.core.somaxconn`). std's 128 overflowed when every client
/// of an instance reconnected at once after a deploy: each connection past
/// it waited a second for its SYN to be sent again (see `benches/storm.rs`).
const LISTEN_BACKLOG: u32 = 4096;

/// The gateway: shared state, the mesh it joined, and its lifecycle. Cheap
/// to clone; clones share everything.
///
/// ```
/// use std::sync::Arc;
///
/// use nuropb_bff::{Gateway, MemoryMesh, RouteTable, Settings, StubService};
/// use serde_json::json;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // A BFF routing `orders.*`, on the in-process mesh with one service.
/// let routes = RouteTable::parse("routes.toml", "[[route]]\ncall = \"orders.*\"\n")?;
/// let mesh = MemoryMesh::new();
/// let orders = StubService::new("orders")
///     .method("get", |req| async move { Ok(json!({"id": req.params["id"]})) });
/// mesh.add_service("orders", Arc::new(orders), Vec::new());
/// let serving = Gateway::builder(Settings::new("shop-bff"))
///     .routes(routes)
///     .memory_mesh(mesh)
///     .start()
///     .await?
///     .spawn()
///     .await?;
/// assert!(serving.ws_url().starts_with("ws://127.0.0.1:"));
/// assert!(serving.gateway().is_ready());
/// serving.stop().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Gateway(Arc<Inner>);

struct Inner {
    hub: Hub,
    mesh: Arc<dyn Mesh>,
    /// What this instance knows of the others.
    cluster: Arc<Cluster>,
    /// The mesh as what it is: a broker link (closed on shutdown) or the
    /// in-process mesh; a reloaded routing table rebinds its events.
    joined: Joined,
    /// Cancelled when the drain begins: not ready, no new sockets or calls.
    shutdown: CancellationToken,
    /// Cancelled to cut the drain short (a second SIGTERM).
    hurry: CancellationToken,
    /// Cancelled once the sessions are closed: the listener stops.
    closed: CancellationToken,
    /// Client calls sent to the mesh (or a local route) and not answered yet.
    calls: Calls,
    /// Connection tasks.
    tasks: TaskTracker,
    /// The control pump and the heartbeat: they outlive the connections
    /// (the last heartbeat says this instance leaves).
    background: TaskTracker,
    background_stop: CancellationToken,
}

impl fmt::Debug for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gateway")
            .field("hub", &self.0.hub)
            .field("mesh", &self.0.mesh)
            .finish_non_exhaustive()
    }
}

/// How far back an instance that starts reads the event log, to fill its
/// window: a client whose instance went away in a deploy resumes on this
/// one from memory.
const LOG_PREFILL: std::time::Duration = std::time::Duration::from_secs(60);

/// The mesh a gateway joined, as what it is.
#[derive(Debug, Clone)]
pub(crate) enum Joined {
    Broker(AmqpMesh),
    /// The in-process mesh; `stubs` when its services are development
    /// mode's echo stubs (a reloaded table's new services get one too).
    Memory {
        mesh: MemoryMesh,
        stubs: bool,
    },
}

/// Builds a [`Gateway`] from [`Settings`]; what is not given comes from the
/// settings (the routing file, the auth mode, the broker URL).
#[derive(Debug)]
pub struct GatewayBuilder {
    settings: Settings,
    routes: Option<RouteTable>,
    auth: Option<Arc<dyn AuthHook>>,
    handler: Arc<dyn WsHandler>,
    memory: Option<MemoryMesh>,
}

impl GatewayBuilder {
    /// Use this routing table instead of loading `settings.routes`.
    pub fn routes(mut self, routes: RouteTable) -> Self {
        self.routes = Some(routes);
        self
    }

    /// Use this auth hook instead of the settings' default for their mode.
    pub fn auth(mut self, auth: Arc<dyn AuthHook>) -> Self {
        self.auth = Some(auth);
        self
    }

    /// The BFF's handler hooks (default: [`DefaultHandler`]).
    pub fn handler(mut self, handler: Arc<dyn WsHandler>) -> Self {
        self.handler = handler;
        self
    }

    /// Join this in-process mesh, whatever `amqp_url` says; the BFF
    /// registers its own service in it. Without it, `memory://` makes a mesh
    /// of echo stubs for the routed services.
    pub fn memory_mesh(mut self, mesh: MemoryMesh) -> Self {
        self.memory = Some(mesh);
        self
    }

    /// Load what was not given, join the mesh and return the gateway, ready
    /// to serve. Fails on a bad routing file, an auth setting that cannot
    /// work, or a broker that cannot be reached.
    pub async fn start(self) -> Result<Gateway, RunError> {
        let settings = self.settings;
        let routes = match self.routes {
            Some(r) => r,
            None => RouteTable::load(&settings.routes)?,
        };
        check_routes(&settings, &routes)?;
        let auth = match self.auth {
            Some(a) => a,
            None => auth_from_settings(&settings)?,
        };
        if settings.jwt_audience.as_deref() == Some(ANY_AUDIENCE) {
            tracing::warn!(
                "jwt_audience is `*`: tokens the identity provider issued for any of its clients are accepted"
            );
        }
        let hub = Hub::new(settings, routes, auth, self.handler).map_err(RunError::Invalid)?;
        let cluster = Arc::new(Cluster::new(
            hub.instance_id().to_owned(),
            hub.settings().mesh_api.heartbeat,
        ));
        let (control, control_rx) = mpsc::channel(CONTROL_OUTBOX);
        let service: Arc<dyn MeshHandler> =
            Arc::new(BffService::new(hub.clone(), cluster.clone(), control));
        let name = hub.service_name().to_owned();
        let bindings = hub.event_bindings();
        let settings = hub.settings();
        if settings.mesh_api.open {
            tracing::warn!(
                "mesh_api.open is set: any program that reaches the broker may push to every user and disconnect anyone"
            );
        }
        let (mesh, joined): (Arc<dyn Mesh>, Joined) = match self.memory {
            Some(mesh) => {
                mesh.add_service(name, service, bindings);
                hub.log().live_from_empty(mesh.log_next());
                let joined = Joined::Memory {
                    mesh: mesh.clone(),
                    stubs: false,
                };
                (Arc::new(mesh), joined)
            }
            None if settings.is_memory_mesh() => {
                let mesh = MemoryMesh::with_echo_stubs(&hub.routes());
                mesh.add_service(name, service, bindings);
                hub.log().live_from_empty(mesh.log_next());
                let joined = Joined::Memory {
                    mesh: mesh.clone(),
                    stubs: true,
                };
                (Arc::new(mesh), joined)
            }
            None => {
                let mut config = AmqpConfig::new(settings.amqp_url.as_str(), name.clone());
                config.instance_id = hub.instance_id().to_owned();
                config.event_bindings = bindings;
                let events = &settings.events;
                config.event_log = Some(EventLogConfig {
                    queue: format!("nuropb-bff-{name}-events"),
                    max_age: std::time::Duration::from_secs(events.history_max_age_s),
                    max_bytes: events.history_max_bytes,
                    prefill: LOG_PREFILL
                        .min(std::time::Duration::from_secs(events.history_max_age_s)),
                });
                config.control_exchange = Some(format!("nuropb-bff-{name}-control"));
                config.max_message_bytes = settings.limits.max_mesh_message_bytes;
                if !hub.seal().is_keyed() {
                    tracing::info!(
                        "no cluster_key: this instance works alone (a push reaches its own sockets \
                         only); set BFF_CLUSTER_KEY, the same on every instance, to run several"
                    );
                }
                let mesh = AmqpMesh::connect(config, service).await.map_err(|source| {
                    RunError::Broker {
                        url: redact_url(&settings.amqp_url),
                        source,
                    }
                })?;
                (Arc::new(mesh.clone()), Joined::Broker(mesh))
            }
        };
        let gateway = Gateway(Arc::new(Inner {
            hub,
            mesh,
            cluster,
            joined,
            shutdown: CancellationToken::new(),
            hurry: CancellationToken::new(),
            closed: CancellationToken::new(),
            calls: Calls::default(),
            tasks: TaskTracker::new(),
            background: TaskTracker::new(),
            background_stop: CancellationToken::new(),
        }));
        let g = &gateway.0;
        g.background.spawn(pump_control(
            g.mesh.clone(),
            control_rx,
            g.background_stop.clone(),
        ));
        g.background.spawn(heartbeat(gateway.clone()));
        // Pings and token expiry for every socket, until the sessions are
        // closed.
        g.background.spawn(crate::keepalive::run(
            g.hub.sessions().clone(),
            g.hub.settings().limits.ping_interval,
            g.closed.clone(),
        ));
        if let Some(queue) = g.hub.take_lifecycle_queue() {
            // Until the sessions are closed (their `disconnected` events
            // are queued by then), then what is left, briefly.
            g.background.spawn(crate::lifecycle::pump(
                g.mesh.clone(),
                queue,
                g.hub.metrics().clone(),
                g.hub.sessions().clone(),
                g.closed.clone(),
            ));
        }
        if let Some(work) = g.hub.take_span_export() {
            // Until the sessions are closed (their sockets' spans are
            // queued by then), then what is left, briefly.
            let sessions = g.hub.sessions().clone();
            g.background.spawn(crate::spans::export(
                work,
                g.hub.metrics().clone(),
                g.closed.clone(),
                move || sessions.counts().sessions == 0,
            ));
        }
        if let Some(work) = g.hub.auth().maintain() {
            let stop = g.background_stop.clone();
            g.background.spawn(async move {
                tokio::select! {
                    _ = work => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
        Ok(gateway)
    }
}

/// The routing file the settings name, loaded and checked against them:
/// what a gateway checks at start-up, with the same messages, for a CI job
/// or a generated crate's own test to run without starting anything.
pub fn load_routes(settings: &Settings) -> Result<RouteTable, RunError> {
    let routes = RouteTable::load(&settings.routes)?;
    check_routes(settings, &routes)?;
    Ok(routes)
}

/// What the settings and the routing table must agree on: no route opens
/// the BFF's own mesh methods to clients, and `hello_call` is routed.
fn check_routes(settings: &Settings, routes: &RouteTable) -> Result<(), RunError> {
    if let Some(own) = routes
        .routes()
        .iter()
        .find(|r| r.service == settings.mesh_service_name && r.method.is_none())
    {
        return Err(RunError::Invalid(format!(
            "route `{}` would let clients call this BFF's own mesh methods \
                 (send_to_users, broadcast, ...); route them one by one if you mean to",
            own.describe()
        )));
    }
    if let Some(call) = &settings.hello_call {
        routes.check_call(call).map_err(|why| {
            RunError::Invalid(format!(
                "hello_call (BFF_HELLO_CALL): {why} ({})",
                settings.routes.display()
            ))
        })?;
    }
    Ok(())
}

/// Counts the client calls in flight, and wakes the drain when none is left.
#[derive(Debug, Default)]
pub(crate) struct Calls {
    count: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// How long a cut-short drain waits for the calls it ends to have their
/// `ShuttingDown` answers queued before the sockets close.
const HURRIED_ANSWERS: std::time::Duration = std::time::Duration::from_secs(1);

/// One call in flight; counted until dropped.
#[derive(Debug)]
pub(crate) struct CallGuard(Gateway);

impl Drop for CallGuard {
    fn drop(&mut self) {
        let calls = &(self.0).0.calls;
        if calls
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            calls.idle.notify_waiters();
        }
    }
}

impl Calls {
    pub(crate) fn count(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Resolves when no call is in flight.
    async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Gateway {
    /// Count a call as in flight until the guard is dropped.
    pub(crate) fn call_started(&self) -> CallGuard {
        self.0
            .calls
            .count
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        CallGuard(self.clone())
    }
}

/// Publish queued control messages, in order, until the gateway is gone.
async fn pump_control(
    mesh: Arc<dyn Mesh>,
    mut outbox: mpsc::Receiver<ControlItem>,
    stop: CancellationToken,
) {
    loop {
        let item = tokio::select! {
            _ = stop.cancelled() => return,
            item = outbox.recv() => item,
        };
        let Some((out, done)) = item else { return };
        let sent = match out {
            ControlOut::All(body) => mesh.broadcast_control(body).await,
            ControlOut::To(instance, body) => mesh.send_control(&instance, body).await,
        };
        if let Some(done) = done {
            let _ = done.send(sent);
        }
    }
}

/// Tell the other instances, every `mesh_api.heartbeat`, that this one is
/// alive (and its counts); say goodbye when the gateway stops.
async fn heartbeat(gateway: Gateway) {
    let hub = gateway.hub();
    let me = hub.instance_id();
    let beat = hub.settings().mesh_api.heartbeat;
    let mut every = tokio::time::interval(beat);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // An instance silent for two heartbeats is lost (killed, not drained):
    // looked for four times a heartbeat.
    let mut look = tokio::time::interval(beat / 4);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = gateway.stopping() => break,
            _ = every.tick() => {
                if gateway.0.mesh.is_ready()
                    && let Some(presence) = mesh_api::presence(hub, me)
                {
                    let _ = gateway.0.mesh.broadcast_control(presence).await;
                }
            }
            _ = look.tick() => lost_instances(&gateway, beat * 2),
        }
    }
    if let Some(bye) = mesh_api::leave(hub, me) {
        let bye = gateway.0.mesh.broadcast_control(bye);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), bye).await;
    }
    // The control pump is needed no more.
    gateway.0.background_stop.cancel();
}

/// Instances not heard from for `after`: forgotten, and (by the first of
/// the live instances, so it is said once) each of their sessions said
/// `disconnected` with why `instance_lost`.
fn lost_instances(gateway: &Gateway, after: std::time::Duration) {
    let now = std::time::Instant::now();
    let lost = gateway.0.cluster.lost(now, after);
    if lost.is_empty() {
        return;
    }
    let speak = gateway.0.cluster.speaks_for_the_lost(now);
    for (instance, sessions) in lost {
        tracing::warn!(
            %instance,
            sessions = sessions.len(),
            "an instance of this BFF went silent without leaving; its sessions are taken for gone"
        );
        if speak {
            for (session_id, user_id) in &sessions {
                gateway
                    .hub()
                    .lifecycle()
                    .lost(user_id, session_id, &instance);
            }
        }
    }
}

impl Gateway {
    /// Start building a gateway from `settings`.
    pub fn builder(settings: Settings) -> GatewayBuilder {
        GatewayBuilder {
            settings,
            routes: None,
            auth: None,
            handler: Arc::new(DefaultHandler),
            memory: None,
        }
    }

    pub(crate) fn hub(&self) -> &Hub {
        &self.0.hub
    }

    pub(crate) fn limits(&self) -> &Limits {
        self.0.hub.limits()
    }

    /// The connection caps of the settings.
    pub(crate) fn caps(&self) -> Caps {
        let l = self.limits();
        Caps {
            total: l.max_connections,
            per_user: l.max_connections_per_user,
        }
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        self.0.hub.metrics()
    }

    pub(crate) fn tasks(&self) -> &TaskTracker {
        &self.0.tasks
    }

    pub fn settings(&self) -> &Settings {
        self.0.hub.settings()
    }

    /// The live sessions: push to them or close them.
    pub fn sessions(&self) -> &Sessions {
        self.0.hub.sessions()
    }

    /// The routing table in use now (a reload replaces it).
    pub fn routes(&self) -> Arc<RouteTable> {
        self.0.hub.routes_full()
    }

    /// The mesh the gateway joined.
    pub fn mesh(&self) -> &Arc<dyn Mesh> {
        &self.0.mesh
    }

    pub(crate) fn joined(&self) -> &Joined {
        &self.0.joined
    }

    /// Whether the mesh can take calls and the gateway is not stopping.
    pub fn is_ready(&self) -> bool {
        let ready = self.0.mesh.is_ready();
        self.metrics().set_mesh_ready(ready);
        self.metrics()
            .set_mesh_blocked(!ready && self.0.mesh.unready_reason().is_some());
        ready && self.hub().auth().ready() && !self.is_stopping()
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.0.shutdown.is_cancelled()
    }

    /// Resolves once the gateway starts shutting down.
    pub(crate) async fn stopping(&self) {
        self.0.shutdown.cancelled().await;
    }

    /// Begin shutting down (the drain): what [`Gateway::serve`] waits for,
    /// besides its own shutdown future.
    pub fn stop(&self) {
        self.0.shutdown.cancel();
    }

    /// Cut the drain short: close the sessions now (a second SIGTERM).
    pub fn hurry(&self) {
        self.0.shutdown.cancel();
        self.0.hurry.cancel();
    }

    /// Resolves once the drain is cut short: calls still in flight give up.
    pub(crate) async fn hurried(&self) {
        self.0.hurry.cancelled().await;
    }

    /// Resolves once the sessions are closed and the listener is to stop.
    pub(crate) async fn closed(&self) {
        self.0.closed.cancelled().await;
    }

    /// The drain, then the stop: `/readyz` answers 503 and new sockets and
    /// calls are refused at once; calls already sent get their answers (up
    /// to the shutdown grace, or until [`Gateway::hurry`]); then every
    /// session closes with 1001, connection tasks finish, and the gateway
    /// leaves the mesh.
    pub(crate) async fn shutdown(&self) {
        let grace = self.settings().shutdown_grace();
        self.stop();
        let pending = self.0.calls.count();
        if pending > 0 {
            tracing::info!(calls = pending, "draining: waiting for calls in flight");
        }
        let drained = tokio::select! {
            _ = self.0.calls.idle() => true,
            _ = self.0.hurry.cancelled() => {
                tracing::warn!(calls = self.0.calls.count(), "drain cut short");
                false
            }
            _ = tokio::time::sleep(grace) => {
                tracing::warn!(calls = self.0.calls.count(), "calls still in flight after the shutdown grace period");
                false
            }
        };
        if !drained {
            // What is still in flight ends now, answered `ShuttingDown`;
            // a call counts until its answer is queued, so the sockets
            // close after the answers (waiting a second at most).
            self.0.hurry.cancel();
            let _ = tokio::time::timeout(HURRIED_ANSWERS, self.0.calls.idle()).await;
        }
        self.sessions()
            .close_all(close::GOING_AWAY, "server shutting down");
        self.0.closed.cancel();
        self.0.tasks.close();
        if tokio::time::timeout(grace, self.0.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = self.0.tasks.len(),
                "connections still open after the shutdown grace period"
            );
        }
        self.0.background.close();
        if tokio::time::timeout(grace, self.0.background.wait())
            .await
            .is_err()
        {
            self.0.background_stop.cancel();
            self.0.background.wait().await;
        }
        if let Joined::Broker(amqp) = &self.0.joined {
            amqp.close(grace).await;
        }
    }

    /// Bind `settings.listen` and serve in a background task until
    /// [`Serving::stop`] (or drop).
    pub async fn spawn(self) -> Result<Serving, RunError> {
        let listener = self.bind().await?;
        let addr = listener.local_addr().map_err(|source| RunError::Listen {
            addr: self.settings().listen.clone(),
            source,
        })?;
        let gateway = self.clone();
        let task = tokio::spawn(self.serve(listener, std::future::pending()));
        Ok(Serving {
            addr,
            gateway,
            task: Some(task),
        })
    }

    /// A listener on `settings.listen`, with room for [`LISTEN_BACKLOG`]
    /// connections not yet accepted.
    pub async fn bind(&self) -> Result<tokio::net::TcpListener, RunError> {
        let addr = &self.settings().listen;
        let failed = |source| RunError::Listen {
            addr: addr.clone(),
            source,
        };
        let at: SocketAddr = addr
            .parse()
            .map_err(|e| failed(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
        let socket = if at.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(failed)?;
        socket.set_reuseaddr(true).map_err(failed)?;
        socket.bind(at).map_err(failed)?;
        socket.listen(LISTEN_BACKLOG).map_err(failed)
    }
}

/// A gateway serving in a background task; stops when dropped.
#[derive(Debug)]
pub struct Serving {
    addr: SocketAddr,
    gateway: Gateway,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Serving {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    /// The WebSocket URL.
    pub fn ws_url(&self) -> String {
        format!("ws://{}{}", self.addr, self.gateway.settings().ws_path)
    }

    /// Shut down (sessions close with 1001, the mesh is left) and wait for
    /// the server task.
    pub async fn stop(mut self) -> std::io::Result<()> {
        self.gateway.stop();
        match self.task.take() {
            Some(task) => task.await.map_err(std::io::Error::other)?,
            None => Ok(()),
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.gateway.stop();
    }
}
