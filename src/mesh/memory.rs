//! An in-process mesh: services are Rust values registered by name, calls are
//! function calls. For a BFF's own tests and for development without a
//! broker; it behaves like the broker where the gateway can tell (NO_ROUTE
//! for an unknown service, ttl as timeout, topic bindings for events).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, RwLock};

use serde_json::{Map, Value, json};

use super::{
    BoxFuture, Call, IncomingEvent, IncomingRequest, Mesh, MeshError, MeshHandler, OutgoingEvent,
    unknown_method,
};
use crate::protocol::ErrorBody;
use crate::routing::RouteTable;
use crate::topic;

#[derive(Debug)]
struct Registered {
    handler: Arc<dyn MeshHandler>,
    bindings: Vec<String>,
}

/// The in-process mesh. Cheap to clone; clones share the services.
#[derive(Debug, Clone, Default)]
pub struct MemoryMesh {
    services: Arc<RwLock<HashMap<String, Arc<Registered>>>>,
    log: Arc<std::sync::Mutex<MemoryLog>>,
}

/// Events the in-process mesh keeps, as a broker's event log would: each
/// with its position, the oldest let go past [`MEMORY_LOG_EVENTS`] or
/// [`MEMORY_LOG_BYTES`].
#[derive(Debug, Default)]
struct MemoryLog {
    next: u64,
    events: std::collections::VecDeque<IncomingEvent>,
    bytes: usize,
}

/// Events the in-process log keeps at most.
pub(crate) const MEMORY_LOG_EVENTS: usize = 10_000;
/// Payload bytes the in-process log keeps at most.
const MEMORY_LOG_BYTES: usize = 16 << 20;

impl MemoryLog {
    fn append(&mut self, mut event: IncomingEvent) -> IncomingEvent {
        event.position = Some(self.next);
        self.next += 1;
        self.bytes += event.event.get().len();
        self.events.push_back(event.clone());
        while self.events.len() > MEMORY_LOG_EVENTS || self.bytes > MEMORY_LOG_BYTES {
            match self.events.pop_front() {
                Some(old) => self.bytes -= old.event.get().len(),
                None => break,
            }
        }
        event
    }
}

impl MemoryMesh {
    pub fn new() -> Self {
        Self::default()
    }

    /// Register (or replace) a service, with the topic patterns of the events
    /// it wants.
    pub fn add_service(
        &self,
        name: impl Into<String>,
        handler: Arc<dyn MeshHandler>,
        event_bindings: Vec<String>,
    ) {
        let reg = Arc::new(Registered {
            handler,
            bindings: event_bindings,
        });
        self.write().insert(name.into(), reg);
    }

    /// The position the next event published here will take: everything
    /// before it is in the in-process log (as far as it keeps).
    pub fn log_next(&self) -> u64 {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).next
    }

    pub fn remove_service(&self, name: &str) {
        self.write().remove(name);
    }

    /// An echo stub for every service the routing table names: each answers
    /// any method with `{service, method, params, user_id}`. What development
    /// mode serves.
    pub fn with_echo_stubs(routes: &RouteTable) -> Self {
        let mesh = Self::new();
        mesh.add_echo_stubs(routes);
        mesh
    }

    /// An echo stub for each service the routing table names that has
    /// none yet (a reloaded table in development mode).
    pub fn add_echo_stubs(&self, routes: &RouteTable) {
        for route in routes.routes() {
            if !self.read().contains_key(&route.service) {
                self.add_service(
                    route.service.clone(),
                    Arc::new(EchoService::new(route.service.clone())),
                    Vec::new(),
                );
            }
        }
    }

    /// Give a registered service other event bindings; false if there is
    /// no such service.
    pub fn set_event_bindings(&self, name: &str, event_bindings: Vec<String>) -> bool {
        let mut services = self.write();
        let Some(old) = services.get(name) else {
            return false;
        };
        let reg = Arc::new(Registered {
            handler: Arc::clone(&old.handler),
            bindings: event_bindings,
        });
        services.insert(name.to_owned(), reg);
        true
    }

    /// The registered services `which` picks, out of the lock.
    fn registered(&self, which: impl Fn(&Registered) -> bool) -> Vec<Arc<Registered>> {
        self.services
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|r| which(r))
            .cloned()
            .collect()
    }

    fn get(&self, name: &str) -> Option<Arc<Registered>> {
        self.services
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Registered>>> {
        self.services.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<Registered>>> {
        self.services.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl Mesh for MemoryMesh {
    fn request<'a>(&'a self, call: &'a Call) -> BoxFuture<'a, Result<Value, MeshError>> {
        Box::pin(async move {
            let Some(service) = self.get(&call.service) else {
                return Err(MeshError::NotDelivered {
                    service: call.service.clone(),
                    method: call.method.clone(),
                });
            };
            let ttl = call.ttl;
            let request = IncomingRequest {
                method: call.method.clone(),
                params: Map::clone(&call.params),
                context: Map::clone(&call.context),
                trace_id: call.trace_id.clone(),
            };
            match tokio::time::timeout(ttl, service.handler.handle_request(request)).await {
                Ok(result) => result.map_err(MeshError::Remote),
                Err(_) => Err(MeshError::Timeout(ttl)),
            }
        })
    }

    fn command(&self, call: Call) -> BoxFuture<'_, Result<(), MeshError>> {
        Box::pin(async move {
            let Some(service) = self.get(&call.service) else {
                return Err(MeshError::NotDelivered {
                    service: call.service,
                    method: call.method,
                });
            };
            let request = IncomingRequest {
                method: call.method,
                params: call.params.into(),
                context: call.context.into(),
                trace_id: call.trace_id,
            };
            // Fire and forget, as on the broker: the caller does not wait for
            // the service, but the service does run.
            let ttl = call.ttl;
            tokio::spawn(async move {
                let _ = tokio::time::timeout(ttl, service.handler.handle_request(request)).await;
            });
            Ok(())
        })
    }

    fn publish_event(&self, event: OutgoingEvent) -> BoxFuture<'_, Result<(), MeshError>> {
        Box::pin(async move {
            let receivers =
                self.registered(|r| r.bindings.iter().any(|b| topic::matches(b, &event.topic)));
            if receivers.is_empty() {
                return Ok(());
            }
            let incoming =
                self.log
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .append(IncomingEvent {
                        topic: event.topic.clone(),
                        event: crate::protocol::RawJson::from_value(&event.event),
                        target: event.target.clone(),
                        trace_id: event.trace_id.clone(),
                        position: None,
                        live: true,
                    });
            for r in receivers {
                r.handler.handle_event(incoming.clone()).await;
            }
            Ok(())
        })
    }

    fn is_ready(&self) -> bool {
        true
    }

    fn read_log(
        &self,
        from: u64,
        until: u64,
    ) -> super::BoxStream<'_, Result<super::LogRead, MeshError>> {
        let events: Vec<Result<super::LogRead, MeshError>> = self
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .events
            .iter()
            .filter(|e| e.position.is_some_and(|p| p >= from && p <= until))
            .map(|e| Ok(super::LogRead::Event(e.clone())))
            .collect();
        Box::pin(futures_util::stream::iter(events))
    }

    /// One process is one instance: a control message goes to every
    /// registered handler (only BFFs act on it).
    fn broadcast_control(&self, body: Value) -> BoxFuture<'_, Result<(), MeshError>> {
        Box::pin(async move {
            let all = self.registered(|_| true);
            for r in all {
                r.handler.handle_control(body.clone()).await;
            }
            Ok(())
        })
    }

    fn send_control(&self, _instance: &str, body: Value) -> BoxFuture<'_, Result<(), MeshError>> {
        self.broadcast_control(body)
    }
}

type MethodFn =
    Box<dyn Fn(IncomingRequest) -> BoxFuture<'static, Result<Value, ErrorBody>> + Send + Sync>;

/// A service made of closures, one a method, for tests and development on
/// the [`MemoryMesh`].
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// use nuropb_bff::{Call, MemoryMesh, Mesh, StubService};
/// use serde_json::{Map, json};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let orders = StubService::new("orders")
///     .method("get", |req| async move { Ok(json!({"id": req.params["id"]})) });
/// let mesh = MemoryMesh::new();
/// mesh.add_service("orders", Arc::new(orders), Vec::new());
/// let mut params = Map::new();
/// params.insert("id".into(), json!(7));
/// let call = Call {
///     service: "orders".into(),
///     method: "get".into(),
///     params: params.into(),
///     context: Map::new().into(),
///     ttl: Duration::from_secs(1),
///     trace_id: None,
/// };
/// assert_eq!(mesh.request(&call).await.unwrap(), json!({"id": 7}));
/// # }
/// ```
pub struct StubService {
    name: String,
    methods: HashMap<String, MethodFn>,
}

impl StubService {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            methods: HashMap::new(),
        }
    }

    pub fn method<F, Fut>(mut self, name: impl Into<String>, f: F) -> Self
    where
        F: Fn(IncomingRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, ErrorBody>> + Send + 'static,
    {
        self.methods
            .insert(name.into(), Box::new(move |req| Box::pin(f(req))));
        self
    }
}

impl fmt::Debug for StubService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StubService")
            .field("name", &self.name)
            .field("methods", &self.methods.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl MeshHandler for StubService {
    fn handle_request(&self, request: IncomingRequest) -> BoxFuture<'_, Result<Value, ErrorBody>> {
        match self.methods.get(&request.method) {
            Some(f) => f(request),
            None => {
                let err = unknown_method(&self.name, &request.method);
                Box::pin(async move { Err(err) })
            }
        }
    }
}

/// Answers every method with what it was asked and on whose behalf.
#[derive(Debug, Clone)]
pub struct EchoService {
    name: String,
}

impl EchoService {
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }
}

impl MeshHandler for EchoService {
    fn handle_request(&self, request: IncomingRequest) -> BoxFuture<'_, Result<Value, ErrorBody>> {
        let answer = json!({
            "service": self.name,
            "method": request.method,
            "params": request.params,
            "user_id": request.context.get("user_id").cloned().unwrap_or(Value::Null),
        });
        Box::pin(async move { Ok(answer) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn call(service: &str, method: &str, ttl_ms: u64) -> Call {
        Call {
            service: service.into(),
            method: method.into(),
            params: Default::default(),
            context: Default::default(),
            ttl: Duration::from_millis(ttl_ms),
            trace_id: None,
        }
    }

    #[tokio::test]
    async fn routes_to_stub_methods_and_reports_unknown_ones() {
        let mesh = MemoryMesh::new();
        mesh.add_service(
            "calc",
            Arc::new(StubService::new("calc").method("two", |_| async { Ok(json!(2)) })),
            vec![],
        );
        assert_eq!(mesh.request(&call("calc", "two", 1000)).await, Ok(json!(2)));
        let err = mesh
            .request(&call("calc", "three", 1000))
            .await
            .unwrap_err();
        assert!(matches!(err, MeshError::Remote(ref b) if b.error == "NuropbException"));
        let err = mesh.request(&call("nope", "x", 1000)).await.unwrap_err();
        assert_eq!(
            err.to_client().error,
            "NuropbNotDeliveredError",
            "unknown service is NO_ROUTE"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_service_times_out() {
        let mesh = MemoryMesh::new();
        mesh.add_service(
            "slow",
            Arc::new(StubService::new("slow").method("wait", |_| async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(Value::Null)
            })),
            vec![],
        );
        let err = mesh.request(&call("slow", "wait", 500)).await.unwrap_err();
        assert_eq!(err, MeshError::Timeout(Duration::from_millis(500)));
    }

    #[derive(Debug, Default)]
    struct Collect(std::sync::Mutex<Vec<String>>);
    impl MeshHandler for Collect {
        fn handle_request(&self, _: IncomingRequest) -> BoxFuture<'_, Result<Value, ErrorBody>> {
            Box::pin(async { Ok(Value::Null) })
        }
        fn handle_event(&self, event: IncomingEvent) -> BoxFuture<'_, ()> {
            self.0.lock().unwrap().push(event.topic);
            Box::pin(async {})
        }
    }

    #[tokio::test]
    async fn events_reach_matching_bindings_only() {
        let mesh = MemoryMesh::new();
        let c = Arc::new(Collect::default());
        mesh.add_service("bff", c.clone(), vec!["orders.#".into()]);
        for topic in ["orders.created", "users.created", "orders"] {
            mesh.publish_event(OutgoingEvent {
                topic: topic.into(),
                event: Value::Null,
                context: Default::default(),
                target: None,
                trace_id: None,
            })
            .await
            .unwrap();
        }
        assert_eq!(*c.0.lock().unwrap(), vec!["orders.created", "orders"]);
    }

    #[tokio::test]
    async fn echo_stubs_cover_the_routing_table() {
        let routes = RouteTable::parse("r", "[[route]]\ncall = \"orders.*\"\n").unwrap();
        let mesh = MemoryMesh::with_echo_stubs(&routes);
        let mut c = call("orders", "list", 1000);
        c.context.insert("user_id".into(), json!("u1"));
        let v = mesh.request(&c).await.unwrap();
        assert_eq!(v["method"], "list");
        assert_eq!(v["user_id"], "u1");
    }
}
