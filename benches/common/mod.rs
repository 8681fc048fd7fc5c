//! Command-line helpers shared by the benchmark binaries, and their
//! allocator.

/// The test OTLP collector (`hop --otlp`).
#[path = "../../tests/common/otlp.rs"]
#[allow(unreachable_pub)]
pub(crate) mod otlp;

/// The benches run the gateway with the allocator a BFF binary installs,
/// behind a census that is off unless a bench turns it on (`heap::count`).
/// Built without the `mimalloc` feature they run on the system allocator,
/// which heap profilers (heaptrack, massif) can see into.
#[cfg(feature = "mimalloc")]
#[allow(unsafe_code)]
#[global_allocator]
static ALLOCATOR: heap::Census<nuropb_bff::MiMalloc> = heap::Census(nuropb_bff::MiMalloc);

/// A census of the live heap: blocks and bytes by size class, counted only
/// once `count` was called (before the runtime starts, so every block freed
/// was counted when it was allocated). Off, it costs one relaxed load per
/// allocation.
#[allow(dead_code, unsafe_code)]
pub(crate) mod heap {
    use std::alloc::{GlobalAlloc, Layout};
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::Relaxed};

    /// Size classes: `[0, 16]`, `(16, 32]`, ... `(2^(CLASSES+2), ...)`.
    pub(crate) const CLASSES: usize = 24;

    static ON: AtomicBool = AtomicBool::new(false);
    static BLOCKS: [AtomicI64; CLASSES] = [const { AtomicI64::new(0) }; CLASSES];
    static BYTES: [AtomicI64; CLASSES] = [const { AtomicI64::new(0) }; CLASSES];

    pub(crate) struct Census<A>(pub(crate) A);

    /// The class of a block of `size` bytes: 0 up to 16 bytes, then one
    /// class per power of two.
    pub(crate) fn class(size: usize) -> usize {
        let bits = usize::BITS - size.saturating_sub(1).leading_zeros();
        (bits.saturating_sub(4) as usize).min(CLASSES - 1)
    }

    /// The upper bound of class `c` in bytes.
    pub(crate) fn class_limit(c: usize) -> usize {
        16usize << c
    }

    fn note(size: usize, sign: i64) {
        if ON.load(Relaxed) {
            let c = class(size);
            BLOCKS[c].fetch_add(sign, Relaxed);
            BYTES[c].fetch_add(sign * size as i64, Relaxed);
        }
    }

    /// Start counting; call it first thing in `main`.
    pub(crate) fn count() {
        ON.store(true, Relaxed);
    }

    /// Live (blocks, bytes) per size class.
    pub(crate) fn snapshot() -> [(i64, i64); CLASSES] {
        std::array::from_fn(|c| (BLOCKS[c].load(Relaxed), BYTES[c].load(Relaxed)))
    }

    unsafe impl<A: GlobalAlloc> GlobalAlloc for Census<A> {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note(layout.size(), 1);
            unsafe { self.0.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            note(layout.size(), 1);
            unsafe { self.0.alloc_zeroed(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            note(layout.size(), -1);
            unsafe { self.0.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note(layout.size(), -1);
            note(new_size, 1);
            unsafe { self.0.realloc(ptr, layout, new_size) }
        }
    }
}

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

/// CPU time the whole machine has spent busy (user, nice, system, irq,
/// softirq and steal, from the first line of /proc/stat) on all its cores:
/// the broker's, the services', the kernel's and the clients' together.
#[allow(dead_code)]
pub(crate) fn machine_busy() -> std::time::Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let ticks: u64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|i| fields.get(*i))
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
