//! {{project-name}}: a WebSocket Backend-For-Frontend on the NuroPb mesh.
//! What this team changes lives here: the auth hook (`auth`), the WebSocket
//! handler hooks (`handler`); `routes.toml` and `config/default.toml` beside
//! them. Everything else is the nuropb-bff runtime's.

pub mod auth;
pub mod handler;
