//! nuropb-bff: the gateway runtime every generated WebSocket
//! Backend-For-Frontend runs on. It speaks NuroPb 0.1.1 to the service mesh
//! over RabbitMQ and a JSON frame protocol to browsers and apps.
//!
//! A BFF binary reads its settings ([`Settings`]), builds a [`Gateway`] with
//! its routing table ([`RouteTable`]), auth hook ([`AuthHook`]) and handler
//! hooks ([`WsHandler`]), attaches a [`Mesh`] and serves. [`run`] does all of
//! that in one call.

pub mod auth;
pub mod config;
mod gateway;
pub mod mesh;
mod metrics;
mod outbox;
pub mod protocol;
pub mod routing;
mod server;
pub mod session;
#[cfg(feature = "testing")]
pub mod testing;
mod ws;

pub use auth::{AuthError, AuthHook, Identity, JwtVerifier, NoAuth};
pub use config::{AuthMode, Settings, SettingsError};
pub use gateway::{
    DefaultHandler, Gateway, GatewayConfig, Limits, LocalCall, MeshClient, WsHandler,
};
pub use mesh::amqp::{AmqpConfig, AmqpMesh};
pub use mesh::memory::{EchoService, MemoryMesh, StubService};
pub use mesh::{BoxFuture, Call, Mesh, MeshError, MeshHandler};
pub use metrics::Metrics;
pub use protocol::{ErrorBody, ErrorName};
pub use routing::{RouteTable, RoutesError};
pub use runner::{RunError, auth_from_settings, jwt_verifier_from_settings, run};
pub use session::{SessionInfo, Sessions};

mod runner;
