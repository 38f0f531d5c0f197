//! The daemon's one memory budget (`server.memory_budget`): every holder of client bytes (command output, queued answers and events, request frames, session state) charges it through a [`Charge`], in the context every actor and connection shares.
//!
//! Only charges that may be refused are checked against the limit
//! ([`Budget::try_charge`], [`Charge::try_grow`]); a charge that only records
//! bytes already covered by a reservation ([`Charge::resize`]) never fails.
//! A charge returns its bytes when dropped, so no path can forget to.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio_util::sync::CancellationToken;

/// The byte budget and what is charged against it now.
#[derive(Debug)]
pub struct Budget {
    /// Reloadable: a SIGHUP that lowers it below `used` refuses new charges
    /// until use falls under it; nothing already charged is taken back.
    limit: AtomicU64,
    used: AtomicU64,
}

impl Budget {
    pub fn new(limit: u64) -> Arc<Budget> {
        Arc::new(Budget {
            limit: AtomicU64::new(limit),
            used: AtomicU64::new(0),
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Bytes charged now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `bytes` if they fit under the limit (atomically: two callers
    /// can never both take the last bytes). Nothing always fits, even with
    /// the limit cut below what is in use: a request that holds no bytes is
    /// never refused for room.
    fn take(&self, bytes: u64) -> bool {
        if bytes == 0 {
            return true;
        }
        let limit = self.limit();
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|&n| n <= limit)
            })
            .is_ok()
    }

    /// A charge of `bytes`, or `None` when they do not fit.
    pub fn try_charge(self: &Arc<Self>, bytes: u64) -> Option<Charge> {
        self.take(bytes).then(|| Charge {
            budget: self.clone(),
            bytes,
        })
    }

    /// An empty charge, to grow or resize later.
    pub fn empty(self: &Arc<Self>) -> Charge {
        Charge {
            budget: self.clone(),
            bytes: 0,
        }
    }
}

/// Bytes held against a [`Budget`]; returned when dropped.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Charge {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Grows by `more` if it fits; false (and unchanged) when it does not.
    pub fn try_grow(&mut self, more: u64) -> bool {
        if self.budget.take(more) {
            self.bytes += more;
            true
        } else {
            false
        }
    }

    /// Sets the charge to `bytes` without checking the limit: for bytes a
    /// reservation already covered (a retained output shrinking to what it
    /// keeps, session state a command reserved), and for shrinking.
    pub fn resize(&mut self, bytes: u64) {
        if bytes >= self.bytes {
            self.budget
                .used
                .fetch_add(bytes - self.bytes, Ordering::AcqRel);
        } else {
            self.budget
                .used
                .fetch_sub(self.bytes - bytes, Ordering::AcqRel);
        }
        self.bytes = bytes;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// What the daemon-wide registry sees of one connection's outbox: its
/// unsent bytes, and the token that drops the connection.
#[derive(Debug, Default)]
pub struct Unsent {
    pub bytes: AtomicUsize,
    pub drop: CancellationToken,
    dropped: AtomicBool,
}

impl Unsent {
    /// Drops the connection; true for the one caller that did it (which
    /// counts it), false when it was dropped already — answers racing to
    /// pass the budget together count one drop, not one each.
    pub fn drop_once(&self) -> bool {
        if self.dropped.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.drop.cancel();
        true
    }

    /// Whether the connection was dropped (its token may not be cancelled yet).
    pub fn is_dropped(&self) -> bool {
        self.dropped.load(Ordering::Acquire)
    }
}

/// Every live connection's [`Unsent`], to find the one holding the most.
#[derive(Debug, Default)]
pub struct Outboxes(Mutex<Vec<Weak<Unsent>>>);

impl Outboxes {
    pub fn register(&self, unsent: &Arc<Unsent>) {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|u| u.strong_count() > 0);
        all.push(Arc::downgrade(unsent));
    }

    /// Drops the live connection with the most unsent bytes (its queue is
    /// released as its writer stops; its commands run on). Returns it, or
    /// `None` when no connection holds any.
    pub fn drop_largest(&self) -> Option<Arc<Unsent>> {
        let all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // A connection dropping itself meanwhile (over its own budget) is
        // not this call's drop: take the next largest then.
        loop {
            let largest = all
                .iter()
                .filter_map(Weak::upgrade)
                // The flag, not the token: between the two, a loser of the
                // race would pick the same connection again and again.
                .filter(|u| !u.is_dropped())
                .max_by_key(|u| u.bytes.load(Ordering::Relaxed))
                .filter(|u| u.bytes.load(Ordering::Relaxed) > 0)?;
            if largest.drop_once() {
                return Some(largest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_dropped_once_whoever_races_to_drop_it() {
        let outboxes = Outboxes::default();
        let unsent = Arc::new(Unsent::default());
        outboxes.register(&unsent);
        unsent.bytes.store(10, Ordering::Relaxed);
        let start = std::sync::Barrier::new(8);
        let drops: usize = std::thread::scope(|s| {
            let racers: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        unsent.drop_once() as usize
                    })
                })
                .collect();
            racers.into_iter().map(|r| r.join().unwrap()).sum()
        });
        assert_eq!(drops, 1, "one of the racers dropped it");
        assert!(unsent.drop.is_cancelled());
        assert!(
            outboxes.drop_largest().is_none(),
            "a dropped connection is not dropped again"
        );
    }

    #[test]
    fn charges_fit_under_the_limit_and_return_on_drop() {
        let b = Budget::new(100);
        let a = b.try_charge(60).unwrap();
        assert!(b.try_charge(41).is_none());
        let mut c = b.try_charge(40).unwrap();
        assert_eq!(b.used(), 100);
        assert!(!c.try_grow(1));
        c.resize(10);
        assert_eq!(b.used(), 70);
        assert!(c.try_grow(30));
        drop(a);
        drop(c);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn a_lowered_limit_refuses_until_use_falls() {
        let b = Budget::new(100);
        let a = b.try_charge(80).unwrap();
        b.set_limit(50);
        assert!(b.try_charge(1).is_none());
        drop(a);
        assert!(b.try_charge(50).is_some());
    }
}
