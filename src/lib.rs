//! nuropb-bff: the gateway runtime every generated WebSocket
//! Backend-For-Frontend runs on. It speaks NuroPb 0.1.1 to the service mesh
//! over RabbitMQ and a JSON frame protocol to browsers and apps.
//!
//! A BFF binary reads its [`Settings`], implements an [`AuthHook`] and a
//! [`WsHandler`], and hands them to [`run`]. Tests and tools build a
//! [`Gateway`] the same way with [`Gateway::builder`]; the `testing` feature
//! adds a test gateway and a WebSocket client.

#![forbid(unsafe_code)]

mod auth;
mod budget;
mod calls;
mod cli;
mod cluster;
mod compose;
mod config;
mod dispatch;
mod error;
mod frame;
mod frontend;
mod gateway;
mod history;
mod hooks;
mod hub;
mod keepalive;
mod lifecycle;
mod mesh;
mod mesh_api;
mod metrics;
mod outbox;
mod protocol;
mod recovery;
mod reload;
mod routing;
mod runner;
mod seal;
mod server;
mod session;
mod socket;
mod spans;
mod spread;
#[cfg(feature = "testing")]
pub mod testing;
mod throttle;
mod topic;
mod trace;
mod upgrade;
mod watch;
mod ws;

pub use auth::{
    AuthError, AuthHook, ClaimsMapper, Identity, JwksProvider, JwtVerifier, NoAuth,
    auth_from_settings, jwt_verifier_from_settings,
};
pub use cli::main;
pub use config::{
    ANY_AUDIENCE, AuthConfig, AuthMode, BrokerUrl, DEV_TOKEN_MARK, Events, JwksSettings, JwtConfig,
    KeySource, Limits, MIN_SECRET_BYTES, MeshApi, Secret, Settings, SettingsError,
};
pub use error::RunError;
pub use frontend::{ServiceDescriptions, client_ts, describe_services};
pub use gateway::{Gateway, GatewayBuilder, Serving, load_routes};
pub use hooks::{DefaultHandler, LocalCall, MeshClient, WsHandler};
/// The signing algorithms of [`JwtVerifier::with_algorithms`].
pub use jsonwebtoken::Algorithm as JwtAlgorithm;
pub use mesh::{
    AmqpConfig, AmqpMesh, BoxFuture, BoxStream, Call, EchoService, EventLogConfig, IncomingEvent,
    IncomingRequest, LogRead, MemoryMesh, Mesh, MeshError, MeshHandler, OutgoingEvent, StubService,
};
pub use protocol::{ClientCall, ErrorBody, ErrorName, Params, RawJson, SessionInfo, close};
pub use reload::reload_routes;
pub use routing::{
    Composed, Delivery, EventRule, Part, PartParams, Route, RouteTable, RoutesError, TableChanges,
};
pub use runner::{log_filter, run};
pub use session::{SessionCounts, Sessions};

/// The allocator a BFF binary installs as its global allocator (the
/// template's `main.rs` does):
///
/// ```ignore
/// #[global_allocator]
/// static ALLOCATOR: nuropb_bff::MiMalloc = nuropb_bff::MiMalloc;
/// ```
///
/// A call through the gateway allocates small values (frames, JSON values)
/// that live for microseconds; with glibc's malloc, allocation was over a
/// third of the gateway's user-space instructions per call
/// (docs/perf-history.md).
#[cfg(feature = "mimalloc")]
pub use mimalloc::MiMalloc;
