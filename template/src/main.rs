//! {{project-name}}: hands its auth hook and handler hooks to the runtime,
//! which reads the settings, sets up logging and serves until SIGTERM.

use std::process::ExitCode;
use std::sync::Arc;

// Every call through the gateway allocates small values that live for
// microseconds: mimalloc serves them for a fraction of glibc's cost.
#[global_allocator]
static ALLOCATOR: nuropb_bff::MiMalloc = nuropb_bff::MiMalloc;

fn main() -> ExitCode {
    nuropb_bff::main(
        env!("CARGO_PKG_NAME"),
        env!("CARGO_PKG_VERSION"),
        {{crate_name}}::auth::hook,
        Arc::new({{crate_name}}::handler::Handler),
    )
}
