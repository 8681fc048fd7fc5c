//! Command-line helpers shared by the benchmark binaries, and their
//! allocator.

/// The test OTLP collector (`hop --otlp`).
#[path = "../../tests/common/otlp.rs"]
#[allow(unreachable_pub)]
pub(crate) mod otlp;

/// The benches run the gateway with the allocator a BFF binary installs.
#[global_allocator]
static ALLOCATOR: nuropb_bff::MiMalloc = nuropb_bff::MiMalloc;

/// The value after `--name` on the command line, or `default`.
pub(crate) fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Whether `cargo bench` runs us (it passes `--bench`); under `cargo test`
/// the benchmarks make a short smoke run instead.
pub(crate) fn benching() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// Resident set size of process `pid` in KiB, from /proc.
#[allow(dead_code)]
pub(crate) fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (user + system) in a `/proc/.../stat` file: a process's
/// (`/proc/<pid>/stat`) or the calling thread's (`/proc/thread-self/stat`).
#[allow(dead_code)]
pub(crate) fn cpu_time(stat_file: &str) -> std::time::Duration {
    let stat = std::fs::read_to_string(stat_file).unwrap_or_default();
    // Fields after the command name's closing parenthesis; utime and stime
    // are the 14th and 15th of the line, in clock ticks (100 per second).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    std::time::Duration::from_millis(ticks * 10)
}

/// Run `rabbitmqctl` with `args`, its output discarded: whether it
/// succeeded.
#[allow(dead_code)]
pub(crate) fn rabbitmqctl(args: &[&str]) -> bool {
    std::process::Command::new("rabbitmqctl")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
