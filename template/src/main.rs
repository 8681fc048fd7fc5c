//! {{project-name}}: a WebSocket Backend-For-Frontend on the NuroPb mesh.
//! Wiring only: settings, tracing, signals; the gateway is the runtime's.

mod auth;
mod handler;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dev = std::env::args().skip(1).any(|a| a == "--dev");
    let config = std::env::var_os("BFF_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("config/default.toml"));
    let (mut settings, warnings) = nuropb_bff::Settings::load(&config, std::env::vars())
        .with_context(|| format!("loading settings from {}", config.display()))?;
    if dev {
        settings.amqp_url = "memory://".into();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_new(nuropb_bff::log_filter(&settings.log))
                .unwrap_or_else(|_| EnvFilter::new(nuropb_bff::log_filter("info"))),
        )
        .init();
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    let auth = auth::hook(&settings)?;
    nuropb_bff::run(
        settings,
        auth,
        Arc::new(handler::Handler),
        shutdown_signal(),
    )
    .await?;
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
