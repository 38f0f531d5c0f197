//! Counters behind `system.stats`: plain atomics, bumped where each event is decided (always through these functions), read without any actor.

use std::sync::atomic::{AtomicU64, Ordering};

/// One counter per event the protocol reports. They live outside the actors,
/// so they survive any actor's restart and `system.stats` never waits on a mailbox.
#[derive(Debug, Default)]
pub struct Stats {
    pub sessions_active: AtomicU64,
    pub sessions_created: AtomicU64,
    pub sessions_destroyed: AtomicU64,
    pub sessions_expired: AtomicU64,
    pub sessions_rejected: AtomicU64,

    pub commands_started: AtomicU64,
    pub commands_completed: AtomicU64,
    pub commands_timed_out: AtomicU64,
    pub commands_idle_timed_out: AtomicU64,
    pub commands_killed: AtomicU64,
    pub commands_rejected_busy: AtomicU64,
    pub commands_rejected_capacity: AtomicU64,
    pub output_truncated: AtomicU64,
    pub oom_killed: AtomicU64,
    pub spawn_failed: AtomicU64,

    pub connections: AtomicU64,
    pub connections_total: AtomicU64,
    pub connections_refused: AtomicU64,
    pub rate_limited: AtomicU64,
    pub bad_frames: AtomicU64,
    pub stalled_connections: AtomicU64,
    pub slow_readers_dropped: AtomicU64,
    pub requests: AtomicU64,
    pub errors: AtomicU64,

    pub actor_failures: AtomicU64,
    pub zombies_reaped: AtomicU64,
    pub cgroups_recovered: AtomicU64,
    /// Requests and frames refused with OVERLOADED (over the memory budget).
    pub overloaded: AtomicU64,

    /// How long each request took to answer, per method (the index in [`REQUEST_METHODS`]).
    pub request_seconds: [Histogram; REQUEST_METHODS.len()],
    /// How long each command ran, from spawn to its end (exec.run and exec.start alike).
    pub command_seconds: Histogram,
}

/// The methods whose request latency is kept, in a fixed order (an unknown
/// method counts as the last: `other`).
pub const REQUEST_METHODS: [&str; 12] = [
    crate::protocol::method::PING,
    crate::protocol::method::STATS,
    crate::protocol::method::SESSION_CREATE,
    crate::protocol::method::SESSION_DESTROY,
    crate::protocol::method::SESSION_LIST,
    crate::protocol::method::EXEC_RUN,
    crate::protocol::method::EXEC_START,
    crate::protocol::method::EXEC_READ,
    crate::protocol::method::EXEC_WRITE,
    crate::protocol::method::EXEC_CANCEL,
    crate::protocol::method::EXEC_RESIZE,
    "other",
];

/// Upper bounds (seconds) of the latency buckets: 1 ms to about 17 min, so
/// one set fits a ping and a long build alike.
pub const BUCKETS_S: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 300.0, 1000.0,
];

/// A latency histogram of plain atomics (one count per bucket, not yet
/// cumulative, plus the overflow bucket), so observing never takes a lock.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_S.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    /// Counts one observation of `elapsed`.
    pub fn observe(&self, elapsed: std::time::Duration) {
        let s = elapsed.as_secs_f64();
        let i = BUCKETS_S
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(BUCKETS_S.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// Cumulative counts per bound of [`BUCKETS_S`] (Prometheus' `le`), the
    /// total count and the sum in seconds.
    pub fn snapshot(&self) -> (Vec<u64>, u64, f64) {
        let mut running = 0;
        let cumulative = BUCKETS_S
            .iter()
            .enumerate()
            .map(|(i, _)| {
                running += self.buckets[i].load(Ordering::Relaxed);
                running
            })
            .collect();
        // The count is the buckets' own total, so `+Inf` always equals it.
        let count = running + self.buckets[BUCKETS_S.len()].load(Ordering::Relaxed);
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        (cumulative, count, sum)
    }
}

/// The index of `method` in [`REQUEST_METHODS`] (`other` when unknown).
pub fn method_index(method: &str) -> usize {
    REQUEST_METHODS
        .iter()
        .position(|m| *m == method)
        .unwrap_or(REQUEST_METHODS.len() - 1)
}

impl Stats {
    /// Adds one.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Takes one off a gauge.
    pub fn drop_one(gauge: &AtomicU64) {
        gauge.fetch_sub(1, Ordering::Relaxed);
    }

    /// Sets a gauge.
    pub fn set(gauge: &AtomicU64, value: u64) {
        gauge.store(value, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Resident set size of this process, from /proc/self/statm.
pub fn rss_bytes() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}
