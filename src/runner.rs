//! `run`: everything a BFF binary does between reading its settings and
//! exiting, so generated `main.rs` files stay a few lines long.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::{AuthHook, JwtVerifier, NoAuth};
use crate::config::{AuthMode, Settings};
use crate::gateway::{Gateway, WsHandler};
use crate::mesh::amqp::{AmqpConfig, AmqpMesh, redact_url};
use crate::mesh::memory::MemoryMesh;
use crate::mesh::{Mesh, MeshError};
use crate::routing::{RouteTable, RoutesError};

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
    #[error("server: {0}")]
    Serve(std::io::Error),
}

/// The JWT verifier the settings describe (`jwt-hs256` or `jwt-rs256`).
pub fn jwt_verifier_from_settings(settings: &Settings) -> Result<JwtVerifier, RunError> {
    let iss = settings.jwt_issuer.as_deref();
    let aud = settings.jwt_audience.as_deref();
    match settings.auth {
        AuthMode::JwtHs256 => {
            let secret = settings
                .jwt_secret
                .as_deref()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| RunError::Auth("BFF_JWT_SECRET is not set".into()))?;
            Ok(JwtVerifier::hs256(secret.as_bytes(), iss, aud))
        }
        AuthMode::JwtRs256 => {
            let path = settings
                .jwt_public_key
                .as_ref()
                .ok_or_else(|| RunError::Auth("BFF_JWT_PUBLIC_KEY is not set".into()))?;
            let pem = std::fs::read(path)
                .map_err(|e| RunError::Auth(format!("cannot read {}: {e}", path.display())))?;
            JwtVerifier::rs256_pem(&pem, iss, aud)
                .map_err(|e| RunError::Auth(format!("{}: {e}", path.display())))
        }
        AuthMode::None => Err(RunError::Auth(
            "auth is `none`: there is no token verifier".into(),
        )),
    }
}

/// The default auth hook for the settings' mode.
pub fn auth_from_settings(settings: &Settings) -> Result<Arc<dyn AuthHook>, RunError> {
    match settings.auth {
        AuthMode::None => Ok(Arc::new(NoAuth)),
        _ => Ok(Arc::new(jwt_verifier_from_settings(settings)?)),
    }
}

/// In development mode with HS256, a token the frontend can use at once.
fn log_dev_token(settings: &Settings) {
    let Some(secret) = settings.jwt_secret.as_deref().filter(|s| !s.is_empty()) else {
        return;
    };
    if settings.auth != AuthMode::JwtHs256 {
        return;
    }
    let ttl_secs = 8 * 3600;
    match crate::auth::hs256_dev_token(
        secret.as_bytes(),
        "dev-user",
        ttl_secs,
        settings.jwt_issuer.as_deref(),
        settings.jwt_audience.as_deref(),
    ) {
        Ok(token) => tracing::warn!(
            "DEVELOPMENT MODE: a token for user dev-user, valid 8 h (Authorization: Bearer, or ?access_token=): {token}"
        ),
        Err(e) => tracing::warn!("DEVELOPMENT MODE: could not make a development token: {e}"),
    }
}

/// Load the routing table, join the mesh (or the in-process development
/// mesh for `memory://`), serve until `shutdown` resolves, then close
/// sessions and leave the mesh.
pub async fn run(
    settings: Settings,
    auth: Arc<dyn AuthHook>,
    handler: Arc<dyn WsHandler>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let routes = RouteTable::load(&settings.routes)?;
    tracing::info!(
        routes = routes.routes().len(),
        event_rules = routes.events().len(),
        file = %settings.routes.display(),
        "routing table loaded"
    );
    let gateway = Gateway::new(settings.gateway_config(), routes, auth, handler);
    let grace = Duration::from_millis(settings.shutdown_grace_ms);

    let mut amqp = None;
    if settings.is_memory_mesh() {
        tracing::warn!(
            "DEVELOPMENT MODE: BFF_AMQP_URL=memory:// - no broker; every routed service is an in-process echo stub"
        );
        tracing::warn!("DEVELOPMENT MODE: never run this in production");
        log_dev_token(&settings);
        let mesh = MemoryMesh::with_echo_stubs(gateway.routes());
        mesh.add_service(
            settings.mesh_service_name.clone(),
            gateway.mesh_service(),
            gateway.event_bindings(),
        );
        gateway.set_mesh(Arc::new(mesh) as Arc<dyn Mesh>);
    } else {
        let mut config = AmqpConfig::new(&settings.amqp_url, &settings.mesh_service_name);
        if let Some(id) = &settings.instance_id {
            config.instance_id = id.clone();
        }
        config.event_bindings = gateway.event_bindings();
        let mesh = AmqpMesh::connect(config, gateway.mesh_service())
            .await
            .map_err(|source| RunError::Broker {
                url: redact_url(&settings.amqp_url),
                source,
            })?;
        gateway.set_mesh(Arc::new(mesh.clone()) as Arc<dyn Mesh>);
        amqp = Some(mesh);
    }

    let listener = tokio::net::TcpListener::bind(&settings.listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: settings.listen.clone(),
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_or_else(|_| settings.listen.clone(), |a| a.to_string());
    tracing::info!(%addr, ws_path = %settings.ws_path, "serving");
    let served = gateway.serve(listener, shutdown, grace).await;
    if let Some(mesh) = amqp {
        mesh.close(grace).await;
    }
    tracing::info!("stopped");
    served.map_err(RunError::Serve)
}
