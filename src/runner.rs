//! `run`: everything a BFF binary does between reading its settings and
//! exiting, so generated `main.rs` files stay a few lines long.

use std::future::Future;
use std::sync::Arc;

use crate::auth::{AuthHook, dev_token};
use crate::config::Settings;
use crate::error::RunError;
use crate::gateway::Gateway;
use crate::hooks::WsHandler;

/// The tracing filter for a settings `log` value: what it says, and never
/// lapin's own line for a returned (NO_ROUTE) message, which dumps the
/// message and with it the caller's token. The gateway answers those calls
/// with `NuropbNotDeliveredError` and counts them.
pub fn log_filter(log: &str) -> String {
    let log = log.trim();
    let base = if log.is_empty() { "info" } else { log };
    format!("{base},lapin::returned_messages=off")
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
/// mesh for `memory://`), serve until `shutdown` resolves (reloading the
/// routing table on SIGHUP and when its file changes), drain (calls in
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
    // Watching starts before serving: a change made as soon as the BFF
    // serves is seen.
    let watch = crate::reload::Watch::start(gateway.clone());
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
    // The routing file, taken again on SIGHUP and when it changes, while
    // the gateway serves.
    let stop_watching = tokio_util::sync::CancellationToken::new();
    let watching = tokio::spawn(watch.run(stop_watching.clone()));
    let served = gateway.serve(listener, shutdown).await;
    stop_watching.cancel();
    let _ = watching.await;
    hurrying.abort();
    tracing::info!("stopped");
    served.map_err(RunError::Serve)
}
