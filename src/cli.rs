//! The entry point of every BFF binary: what each one does the same way
//! (arguments, the settings file, development mode, tracing, signals), so a
//! generated `main.rs` is a few lines and a runtime upgrade fixes all of
//! them. The gateway itself reads no environment; this is the one place
//! that does.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use tracing_subscriber::EnvFilter;

use crate::auth::AuthHook;
use crate::config::Settings;
use crate::error::RunError;
use crate::hooks::WsHandler;
use crate::runner::{log_filter, run};

/// The settings file when `BFF_CONFIG` names none.
const DEFAULT_CONFIG: &str = "config/default.toml";
/// The broker URL's variable, which `--dev` sets to the in-process mesh.
const AMQP_URL_VAR: &str = "BFF_AMQP_URL";

/// What the command line asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Command {
    Serve { dev: bool },
    ClientTs { out: Option<PathBuf>, live: bool },
    RoutesCheck { file: Option<PathBuf>, live: bool },
    Help,
    Version,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Command, String> {
    let mut args = args.into_iter().peekable();
    if args.peek().is_some_and(|a| a == "client-ts") {
        args.next();
        let (mut out, mut live) = (None, false);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--out" => {
                    let file = args.next().ok_or("--out needs a file name")?;
                    out = Some(PathBuf::from(file));
                }
                "--live" => live = true,
                "-h" | "--help" => return Ok(Command::Help),
                other => return Err(format!("unknown argument `{other}` for client-ts")),
            }
        }
        return Ok(Command::ClientTs { out, live });
    }
    if args.peek().is_some_and(|a| a == "routes") {
        args.next();
        if args.next().as_deref() != Some("check") {
            return Err("`routes` takes `check [FILE] [--live]`".into());
        }
        let (mut file, mut live) = (None, false);
        for arg in args {
            match arg.as_str() {
                "--live" => live = true,
                "-h" | "--help" => return Ok(Command::Help),
                other if other.starts_with('-') => {
                    return Err(format!("unknown argument `{other}` for routes check"));
                }
                other if file.is_none() => file = Some(PathBuf::from(other)),
                other => return Err(format!("routes check takes one file, not also `{other}`")),
            }
        }
        return Ok(Command::RoutesCheck { file, live });
    }
    let mut dev = false;
    for arg in args {
        match arg.as_str() {
            "--dev" => dev = true,
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(Command::Serve { dev })
}

fn usage(name: &str) -> String {
    format!(
        "{name}: a WebSocket Backend-For-Frontend on the NuroPb mesh (nuropb-bff {runtime})

usage: {name} [--dev]
       {name} client-ts [--out FILE] [--live]
       {name} routes check [FILE] [--live]

  --dev          development mode: no broker (in-process echo services for the
                 routed calls) and a token for user dev-user in the log;
                 GET /console is a page to try calls, GET /client.ts the client
  client-ts      write the typed TypeScript client of the routing table (to
                 stdout, or FILE); --live asks each routed service on the
                 broker for its nuropb_describe to type the parameters
  routes check   check the routing file (FILE, or the settings' one) as
                 start-up would, without starting: exit 1 with the same
                 message; --live also asks each routed service for its
                 nuropb_describe and names routes to methods it lacks
  -h, --help     this text
  -V, --version  the version

Settings come from {DEFAULT_CONFIG} (or the file BFF_CONFIG names), each
overridden by an environment variable BFF_<KEY> (BFF_LIMITS__<KEY> for a key
of [limits]); BFF_LOG sets the log filter; TOKIO_WORKER_THREADS the number of
worker threads (one per core when unset).",
        runtime = env!("CARGO_PKG_VERSION"),
    )
}

/// Run a BFF binary: parse the command line, load the settings, set up
/// tracing, build the auth hook with `auth`, and serve with `handler` until
/// SIGTERM or Ctrl-C. `name` and `version` are the binary's (its
/// `CARGO_PKG_NAME` and `CARGO_PKG_VERSION`).
pub fn main(
    name: &str,
    version: &str,
    auth: impl FnOnce(&Settings) -> Result<Arc<dyn AuthHook>, RunError>,
    handler: Arc<dyn WsHandler>,
) -> ExitCode {
    let command = match parse_args(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{name}: {e}\n\n{}", usage(name));
            return ExitCode::from(2);
        }
    };
    let dev = match command {
        Command::Help => {
            println!("{}", usage(name));
            return ExitCode::SUCCESS;
        }
        Command::Version => {
            println!(
                "{name} {version} (nuropb-bff {})",
                env!("CARGO_PKG_VERSION")
            );
            return ExitCode::SUCCESS;
        }
        Command::Serve { dev } => dev,
        Command::ClientTs { out, live } => return client_ts(name, out, live),
        Command::RoutesCheck { file, live } => return routes_check(name, file, live),
    };
    // `--dev` is the in-process mesh, whatever BFF_AMQP_URL says: settled
    // before the settings are checked, since what they allow depends on it
    // (a short HS256 secret, say).
    let env = std::env::vars()
        .filter(|(k, _)| !(dev && k == AMQP_URL_VAR))
        .chain(dev.then(|| (AMQP_URL_VAR.to_owned(), "memory://".to_owned())));
    let (settings, warnings) = match Settings::load(&config_file(), env) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let filter = EnvFilter::try_new(log_filter(&settings.log)).unwrap_or_else(|e| {
        eprintln!("{name}: log filter `{}`: {e}; using `info`", settings.log);
        EnvFilter::new(log_filter("info"))
    });
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    let auth = match auth(&settings) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    match worker_threads(std::env::var_os(WORKER_THREADS_VAR)) {
        // Given here, tokio does not read the variable (a value it cannot
        // parse would panic there).
        Ok(Some(n)) => {
            builder.worker_threads(n);
        }
        Ok(None) => {}
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = runtime.block_on(async {
        // The first SIGTERM (or Ctrl-C) starts the drain, a second one ends
        // it at once.
        let (first_tx, first) = tokio::sync::oneshot::channel::<()>();
        let (second_tx, second) = tokio::sync::oneshot::channel::<()>();
        let signals = tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!("shutdown requested: draining (signal again to stop at once)");
            let _ = first_tx.send(());
            shutdown_signal().await;
            let _ = second_tx.send(());
        });
        let served = run(
            settings,
            auth,
            handler,
            async {
                let _ = first.await;
            },
            async {
                let _ = second.await;
            },
        )
        .await;
        signals.abort();
        served
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// The variable tokio reads for its number of worker threads.
const WORKER_THREADS_VAR: &str = "TOKIO_WORKER_THREADS";

/// Most worker threads a BFF starts; far more than cores only adds wake-ups.
const MAX_WORKER_THREADS: usize = 1024;

/// `TOKIO_WORKER_THREADS`, checked: unset (tokio's default, one per core),
/// or a whole number from 1 to [`MAX_WORKER_THREADS`].
fn worker_threads(value: Option<std::ffi::OsString>) -> Result<Option<usize>, String> {
    let Some(value) = value else {
        return Ok(None);
    };
    let text = value.to_string_lossy();
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_WORKER_THREADS).contains(&n) => Ok(Some(n)),
        _ => Err(format!(
            "{WORKER_THREADS_VAR} must be a whole number of threads from 1 to \
             {MAX_WORKER_THREADS}, not `{}` (unset it for one per core)",
            text.chars().take(40).collect::<String>()
        )),
    }
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

/// The settings file: `BFF_CONFIG`, or [`DEFAULT_CONFIG`].
fn config_file() -> PathBuf {
    std::env::var_os("BFF_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG))
}

/// The routed services' `nuropb_describe` answers, asked on the broker;
/// what could not be described is said on stderr. `None` when the broker
/// cannot be reached (said too).
fn describe(
    name: &str,
    settings: &Settings,
    routes: &crate::routing::RouteTable,
) -> Option<crate::frontend::ServiceDescriptions> {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            return None;
        }
    };
    match runtime.block_on(crate::frontend::describe_services(settings, routes)) {
        Ok((d, notes)) => {
            for note in notes {
                eprintln!("{name}: {note}");
            }
            Some(d)
        }
        Err(e) => {
            eprintln!("{name}: {e}");
            None
        }
    }
}

/// The settings as a tool reads them: no credentials needed, as if the
/// BFF took no tokens, so a missing secret is no reason to stop.
fn tool_settings(name: &str) -> Option<Settings> {
    let env = std::env::vars().chain([("BFF_AUTH".to_owned(), "none".to_owned())]);
    match Settings::load(&config_file(), env) {
        Ok((s, _)) => Some(s),
        Err(e) => {
            eprintln!("{name}: {e}");
            None
        }
    }
}

/// `routes check`: the routing file (`file`, or the settings' own) checked
/// as start-up checks it, with its messages, and with `live` against what
/// the routed services describe. Exit 1 on any finding.
fn routes_check(name: &str, file: Option<PathBuf>, live: bool) -> ExitCode {
    let Some(mut settings) = tool_settings(name) else {
        return ExitCode::FAILURE;
    };
    if let Some(file) = file {
        settings.routes = file;
    }
    let routes = match crate::gateway::load_routes(&settings) {
        Ok(routes) => routes,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if live {
        let Some(described) = describe(name, &settings, &routes) else {
            return ExitCode::FAILURE;
        };
        let missing = described.missing_methods(&routes);
        for finding in &missing {
            eprintln!("{name}: {}: {finding}", settings.routes.display());
        }
        if !missing.is_empty() {
            return ExitCode::FAILURE;
        }
    }
    println!(
        "{}: valid ({} routes, {} event rules, {} composed routes)",
        settings.routes.display(),
        routes.routes().len(),
        routes.events().len(),
        routes.composed_routes().len()
    );
    ExitCode::SUCCESS
}

/// `client-ts`: render the client from the settings' routing file (and the
/// services' descriptions with `live`), to `out` or stdout.
fn client_ts(name: &str, out: Option<PathBuf>, live: bool) -> ExitCode {
    let Some(settings) = tool_settings(name) else {
        return ExitCode::FAILURE;
    };
    let routes = match crate::routing::RouteTable::load(&settings.routes) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{name}: routing table: {e}");
            return ExitCode::FAILURE;
        }
    };
    let described = if live {
        match describe(name, &settings, &routes) {
            Some(d) => d,
            None => return ExitCode::FAILURE,
        }
    } else {
        crate::frontend::ServiceDescriptions::new()
    };
    let ts = crate::frontend::client_ts(
        &settings.mesh_service_name,
        &settings.ws_path,
        &routes,
        &described,
    );
    match out {
        Some(file) => match std::fs::write(&file, ts) {
            Ok(()) => {
                eprintln!("{name}: wrote {}", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{name}: cannot write {}: {e}", file.display());
                ExitCode::FAILURE
            }
        },
        None => {
            use std::io::Write as _;
            match std::io::stdout().write_all(ts.as_bytes()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Result<Command, String> {
        parse_args(a.iter().map(|s| s.to_string()))
    }

    #[test]
    fn the_command_line() {
        let file = |f: &str| Some(PathBuf::from(f));
        let taken = [
            (&[][..], Command::Serve { dev: false }),
            (&["--dev"], Command::Serve { dev: true }),
            (&["--dev", "--help"], Command::Help),
            (&["-V"], Command::Version),
            (
                &["client-ts"],
                Command::ClientTs {
                    out: None,
                    live: false,
                },
            ),
            (
                &["client-ts", "--live", "--out", "c.ts"],
                Command::ClientTs {
                    out: file("c.ts"),
                    live: true,
                },
            ),
            (
                &["routes", "check"],
                Command::RoutesCheck {
                    file: None,
                    live: false,
                },
            ),
            (
                &["routes", "check", "--live", "new.toml"],
                Command::RoutesCheck {
                    file: file("new.toml"),
                    live: true,
                },
            ),
        ];
        for (given, command) in taken {
            assert_eq!(args(given), Ok(command), "{given:?}");
        }
        for refused in [
            &["client-ts", "--out"][..],
            &["client-ts", "--dev"],
            &["routes"],
            &["routes", "check", "a.toml", "b.toml"],
            &["routes", "check", "--dev"],
        ] {
            assert!(args(refused).is_err(), "{refused:?}");
        }
        let e = args(&["--deV"]).unwrap_err();
        assert!(e.contains("--deV"), "{e}");
        assert!(usage("my-bff").contains("BFF_CONFIG"));
    }

    #[test]
    fn the_worker_thread_count_is_checked() {
        let v = |s: &str| worker_threads(Some(s.into()));
        assert_eq!(worker_threads(None), Ok(None));
        assert_eq!(v("1"), Ok(Some(1)));
        assert_eq!(v(" 4 "), Ok(Some(4)));
        assert_eq!(v("1024"), Ok(Some(1024)));
        for bad in [
            "0",
            "-1",
            "two",
            "",
            "1.5",
            "1025",
            "99999999999999999999999",
        ] {
            let e = v(bad).unwrap_err();
            assert!(e.contains(WORKER_THREADS_VAR), "{bad}: {e}");
            assert!(e.contains(&format!("`{bad}`")), "{bad}: {e}");
        }
    }
}
