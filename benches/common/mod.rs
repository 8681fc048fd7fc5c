//! Command-line helpers shared by the benchmark binaries.

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
