//! The handler hooks a BFF implements: [`WsHandler`] shapes what clients
//! see (the hello event, BFF-local routes, calls, results, events). The
//! generated crate's `handler.rs` implements it; the runtime calls it. (The
//! auth hook, `AuthHook`, lives with the identities it makes, in `auth`.)

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::mesh::{BoxFuture, Call, Mesh, MeshError};
use crate::protocol::SessionInfo;
use crate::protocol::{ClientCall, ErrorBody, Params, RawJson};

/// The WebSocket handler hooks of a BFF. Every method has a default, so a
/// BFF overrides only what it needs.
///
/// ```
/// use nuropb_bff::{Call, RawJson, SessionInfo, WsHandler};
/// use serde_json::Value;
///
/// #[derive(Debug)]
/// struct Handler;
///
/// impl WsHandler for Handler {
///     // A header every service of this BFF reads.
///     fn on_request(&self, session: &SessionInfo, call: &mut Call) {
///         let tenant = session.user_id.split('/').next().unwrap_or_default();
///         call.context.insert("tenant".into(), Value::String(tenant.into()));
///     }
///
///     // Internal events never reach a browser.
///     fn on_event(&self, topic: &str, event: RawJson) -> Option<RawJson> {
///         (!topic.starts_with("internal.")).then_some(event)
///     }
/// }
///
/// assert!(Handler.on_event("internal.audit", RawJson::null()).is_none());
/// ```
pub trait WsHandler: Send + Sync + fmt::Debug + 'static {
    /// The `hello` event sent once a connection is authenticated.
    fn hello(&self, session: &SessionInfo) -> Value {
        json!({
            "session_id": session.session_id,
            "user_id": session.user_id,
            "username": session.username,
        })
    }

    /// Whether [`local_request`](Self::local_request) is offered `call`.
    /// The gateway asks this first because building a [`LocalCall`] copies
    /// the session, the call and the mesh context; a BFF whose local routes
    /// are one service says so here and saves the copies on every other
    /// call. The default offers every request.
    fn is_local(&self, call: &ClientCall) -> bool {
        let _ = call;
        true
    }

    /// A BFF-local route: answer `call` here (composing mesh calls, say)
    /// instead of forwarding it. `None` forwards through the routing table.
    /// Only called for requests [`is_local`](Self::is_local) accepts.
    fn local_request(
        &self,
        call: LocalCall,
    ) -> Option<BoxFuture<'static, Result<Value, ErrorBody>>> {
        let _ = call;
        None
    }

    /// Change a mesh call before it is sent (extra params, a header in the
    /// context). The routing table has already allowed it.
    fn on_request(&self, session: &SessionInfo, call: &mut Call) {
        let _ = (session, call);
    }

    /// Change a service's result before the client sees it. The result is
    /// the JSON the service sent, passed on unparsed unless a hook reads it
    /// ([`RawJson::to_value`], then [`RawJson::from_value`]).
    fn on_response(&self, session: &SessionInfo, call: &Call, result: RawJson) -> RawJson {
        let _ = (session, call);
        result
    }

    /// Change or drop (`None`) a mesh event before it is pushed to clients.
    /// The event is the JSON text it arrived in, passed on unparsed unless
    /// a hook reads it ([`RawJson::to_value`], then
    /// [`RawJson::from_value`]).
    fn on_event(&self, topic: &str, event: RawJson) -> Option<RawJson> {
        let _ = topic;
        Some(event)
    }
}

/// The hooks with every default.
#[derive(Debug, Clone, Default)]
pub struct DefaultHandler;
impl WsHandler for DefaultHandler {
    fn is_local(&self, _: &ClientCall) -> bool {
        false
    }
}

/// What a BFF-local route gets: who asked, what they asked, and a mesh client
/// that calls on their behalf.
#[derive(Debug, Clone)]
pub struct LocalCall {
    pub session: SessionInfo,
    pub call: ClientCall,
    pub mesh: MeshClient,
}

/// Calls the mesh on behalf of one client, with the context the gateway
/// built for them. BFF code is trusted: these calls are not checked against
/// the routing table.
#[derive(Clone)]
pub struct MeshClient {
    mesh: Arc<dyn Mesh>,
    context: Params,
    trace_id: String,
    timeout: Duration,
}

impl fmt::Debug for MeshClient {
    // The context carries the user's token: never in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshClient")
            .field("context_keys", &self.context.keys().collect::<Vec<_>>())
            .field("trace_id", &self.trace_id)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl MeshClient {
    pub(crate) fn new(
        mesh: Arc<dyn Mesh>,
        context: Params,
        trace_id: String,
        timeout: Duration,
    ) -> Self {
        Self {
            mesh,
            context,
            trace_id,
            timeout,
        }
    }

    /// Call `service.method` as the client, and wait for its result.
    pub async fn request(
        &self,
        service: &str,
        method: &str,
        params: Map<String, Value>,
    ) -> Result<Value, MeshError> {
        self.mesh
            .request(&Call {
                service: service.to_owned(),
                method: method.to_owned(),
                params: params.into(),
                context: self.context.clone(),
                ttl: self.timeout,
                trace_id: Some(self.trace_id.clone()),
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::MemoryMesh;

    #[test]
    fn a_local_call_debug_carries_no_token() {
        let mut context = Map::new();
        context.insert(
            "Authorization".into(),
            Value::String("eyJ.secret.sig".into()),
        );
        let client = MeshClient::new(
            Arc::new(MemoryMesh::new()),
            context.into(),
            "t".into(),
            Duration::from_secs(1),
        );
        let local = LocalCall {
            session: SessionInfo {
                session_id: "s".into(),
                user_id: "u".into(),
                username: None,
                roles: vec![],
            },
            call: ClientCall {
                service: "bff".into(),
                method: "whoami".into(),
                params: Default::default(),
                trace_id: None,
                traceparent: None,
            },
            mesh: client,
        };
        let text = format!("{local:?}");
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("Authorization"), "{text}");
    }
}
