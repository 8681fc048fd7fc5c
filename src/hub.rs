//! The hub: what every connection and the BFF's own mesh service share,
//! built before the mesh is joined (settings, routing table, hooks, the
//! session registry, metrics). It knows nothing of sockets or the broker.

use std::fmt;
use std::sync::Arc;

use crate::auth::AuthHook;
use crate::config::{Limits, Settings};
use crate::hooks::WsHandler;
use crate::metrics::Metrics;
use crate::routing::RouteTable;
use crate::seal::Seal;
use crate::session::Sessions;

/// Cheap to clone; clones share everything.
#[derive(Clone)]
pub(crate) struct Hub(Arc<Inner>);

struct Inner {
    settings: Settings,
    /// This instance among the BFF's instances on the broker.
    instance_id: String,
    routes: RouteTable,
    auth: Arc<dyn AuthHook>,
    handler: Arc<dyn WsHandler>,
    sessions: Sessions,
    metrics: Metrics,
    /// Seals and opens control messages with the cluster key.
    seal: Seal,
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
    ) -> Self {
        let metrics = Metrics::new();
        let event_roles = routes.events().iter().any(|r| !r.roles.is_empty());
        let sessions = Sessions::new(settings.limits.outbound_queue)
            .with_queue_bytes(settings.limits.outbound_queue_bytes)
            .with_metrics(metrics.clone())
            .keeping_roles(event_roles);
        let instance_id = settings
            .instance_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        let seal = Seal::new(settings.cluster_key.clone());
        Self(Arc::new(Inner {
            seal,
            instance_id,
            settings,
            routes,
            auth,
            handler,
            sessions,
            metrics,
        }))
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

    pub(crate) fn routes(&self) -> &RouteTable {
        &self.0.routes
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

    pub(crate) fn seal(&self) -> &Seal {
        &self.0.seal
    }

    /// The topic patterns the BFF must receive mesh events for.
    pub(crate) fn event_bindings(&self) -> Vec<String> {
        self.0
            .routes
            .events()
            .iter()
            .map(|r| r.pattern.clone())
            .collect()
    }
}
