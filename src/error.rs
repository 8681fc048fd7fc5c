//! [`RunError`]: why a BFF could not start or stopped serving, in the words
//! its operator needs (which setting, which file, which broker). Every room
//! that starts something returns it, so it lives below them all.

use crate::mesh::MeshError;
use crate::routing::RoutesError;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("routing table: {0}")]
    Routes(#[from] RoutesError),
    #[error(
        "cannot reach the broker at {url}: {source}\n  start RabbitMQ (`rabbitmq-server -detached`) or point BFF_AMQP_URL at one,\n  or run without a broker in development mode: BFF_AMQP_URL=memory://"
    )]
    Broker { url: String, source: MeshError },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("auth: {0}")]
    Auth(String),
    #[error("{0}")]
    Invalid(String),
    #[error("server: {0}")]
    Serve(std::io::Error),
}
