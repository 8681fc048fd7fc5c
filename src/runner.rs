//! `run`: everything a BFF binary does between reading its settings and
//! exiting, so generated `main.rs` files stay a few lines long.

use std::future::Future;
use std::sync::Arc;

use crate::auth::{JwksProvider, JwtVerifier, NoAuth};
use crate::config::{AuthMode, Settings};
use crate::gateway::Gateway;
use crate::hooks::{AuthHook, WsHandler};
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

/// Shorter HS* secrets are refused outside development mode: they can be
/// found by brute force from any one token.
pub const MIN_SECRET_BYTES: usize = 32;

/// The JWT verifier the settings describe (`jwt-hs256`: a secret;
/// `jwt-rs256`: a PEM public key; `jwks`: the identity provider's key set),
/// restricted to `jwt_algorithms` when set.
pub fn jwt_verifier_from_settings(settings: &Settings) -> Result<JwtVerifier, RunError> {
    let iss = settings.jwt_issuer.as_deref().filter(|s| !s.is_empty());
    let aud = settings.jwt_audience.as_deref().filter(|s| !s.is_empty());
    let verifier = match settings.auth {
        AuthMode::JwtHs256 => {
            let secret = settings
                .jwt_secret
                .as_deref()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| RunError::Auth("BFF_JWT_SECRET is not set".into()))?;
            if secret.len() < MIN_SECRET_BYTES && !settings.is_memory_mesh() {
                return Err(RunError::Auth(format!(
                    "BFF_JWT_SECRET is {} bytes; at least {MIN_SECRET_BYTES} are needed outside development mode \
                     (make one with `openssl rand -base64 48`)",
                    secret.len()
                )));
            }
            JwtVerifier::hs256(secret.as_bytes(), iss, aud)
        }
        AuthMode::JwtRs256 => {
            let path = settings
                .jwt_public_key
                .as_ref()
                .ok_or_else(|| RunError::Auth("BFF_JWT_PUBLIC_KEY is not set".into()))?;
            let pem = std::fs::read(path)
                .map_err(|e| RunError::Auth(format!("cannot read {}: {e}", path.display())))?;
            JwtVerifier::public_key_pem(&pem, iss, aud)
                .map_err(|e| RunError::Auth(format!("{}: {e}", path.display())))?
        }
        AuthMode::Jwks => {
            let issuer = iss.ok_or_else(|| {
                RunError::Auth("auth is jwks but BFF_JWT_ISSUER is not set".into())
            })?;
            let provider = JwksProvider {
                issuer: issuer.to_owned(),
                jwks_url: settings.jwks_url.clone().filter(|u| !u.is_empty()),
            };
            JwtVerifier::jwks(vec![provider], aud, &settings.jwks)
                .map_err(|e| RunError::Auth(e.to_string()))?
        }
        AuthMode::None => {
            return Err(RunError::Auth(
                "auth is `none`: there is no token verifier".into(),
            ));
        }
    };
    let algorithms: Vec<_> = settings
        .jwt_algorithms
        .iter()
        .map(|name| {
            crate::auth::algorithm(name)
                .ok_or_else(|| RunError::Auth(format!("unknown algorithm `{name}`")))
        })
        .collect::<Result<_, _>>()?;
    Ok(verifier.with_algorithms(&algorithms))
}

/// The tracing filter for a settings `log` value: what it says, and never
/// lapin's own line for a returned (NO_ROUTE) message, which dumps the
/// message and with it the caller's token. The gateway answers those calls
/// with `NuropbNotDeliveredError` and counts them.
pub fn log_filter(log: &str) -> String {
    let log = log.trim();
    let base = if log.is_empty() { "info" } else { log };
    format!("{base},lapin::returned_messages=off")
}

/// The default auth hook for the settings' mode.
pub fn auth_from_settings(settings: &Settings) -> Result<Arc<dyn AuthHook>, RunError> {
    match settings.auth {
        AuthMode::None => Ok(Arc::new(NoAuth)),
        _ => Ok(Arc::new(jwt_verifier_from_settings(settings)?)),
    }
}

/// In development mode with HS256, a token for `dev-user`, valid 8 hours,
/// that the frontend (and the console page) can use at once; `None` in any
/// other mode.
pub(crate) fn dev_token(settings: &Settings) -> Option<Result<String, crate::auth::AuthError>> {
    let secret = settings.jwt_secret.as_deref().filter(|s| !s.is_empty())?;
    if !settings.is_memory_mesh() || settings.auth != AuthMode::JwtHs256 {
        return None;
    }
    Some(crate::auth::hs256_dev_token(
        secret.as_bytes(),
        "dev-user",
        8 * 3600,
        settings.jwt_issuer.as_deref(),
        settings.jwt_audience.as_deref(),
    ))
}

fn log_dev_token(settings: &Settings) {
    match dev_token(settings) {
        Some(Ok(token)) => tracing::warn!(
            "DEVELOPMENT MODE: a token for user dev-user, valid 8 h (Authorization: Bearer, or ?access_token=): {token}"
        ),
        Some(Err(e)) => {
            tracing::warn!("DEVELOPMENT MODE: could not make a development token: {e}")
        }
        None => {}
    }
}

/// Load the routing table, join the mesh (or the in-process development
/// mesh for `memory://`), serve until `shutdown` resolves, drain (calls in
/// flight are answered, up to `shutdown_grace_ms`, or until `hurry`
/// resolves), then close sessions and leave the mesh.
pub async fn run(
    settings: Settings,
    auth: Arc<dyn AuthHook>,
    handler: Arc<dyn WsHandler>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    hurry: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    if settings.is_memory_mesh() {
        tracing::warn!(
            "DEVELOPMENT MODE: BFF_AMQP_URL=memory:// - no broker; every routed service is an in-process echo stub"
        );
        tracing::warn!("DEVELOPMENT MODE: never run this in production");
        log_dev_token(&settings);
    }
    let gateway = Gateway::builder(settings)
        .auth(auth)
        .handler(handler)
        .start()
        .await?;
    let routes = gateway.routes();
    tracing::info!(
        routes = routes.routes().len(),
        event_rules = routes.events().len(),
        file = %gateway.settings().routes.display(),
        "routing table loaded"
    );
    let listener = gateway.bind().await?;
    let addr = listener
        .local_addr()
        .map_or_else(|_| gateway.settings().listen.clone(), |a| a.to_string());
    tracing::info!(%addr, ws_path = %gateway.settings().ws_path, "serving");
    if gateway.settings().is_memory_mesh() || gateway.settings().console {
        tracing::info!(
            "try calls at http://{addr}/console; the typed TypeScript client is at http://{addr}/client.ts"
        );
    }
    let hurrying = {
        let gateway = gateway.clone();
        tokio::spawn(async move {
            hurry.await;
            gateway.hurry();
        })
    };
    let served = gateway.serve(listener, shutdown).await;
    hurrying.abort();
    tracing::info!("stopped");
    served.map_err(RunError::Serve)
}
