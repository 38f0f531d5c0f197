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
