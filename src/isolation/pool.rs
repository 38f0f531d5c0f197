//! The uid pool's bookkeeping (pure data, no I/O): which uids of the range are free, leased or waiting for a cleanup that failed; free ones are handed out least-recently-used.

use std::collections::{BTreeSet, HashSet, VecDeque};

use super::UidRange;

/// Free uids in LRU order (front = released longest ago), leased uids, and
/// uids whose cleanup failed (held back until a retry succeeds).
#[derive(Debug)]
pub struct UidPool {
    free: VecDeque<u32>,
    leased: HashSet<u32>,
    dirty: BTreeSet<u32>,
}

impl UidPool {
    /// Every uid of `range` free, in order.
    pub fn new(range: UidRange) -> UidPool {
        UidPool {
            free: (range.first..=range.last).collect(),
            leased: HashSet::new(),
            dirty: BTreeSet::new(),
        }
    }

    /// The least recently used free uid, now leased.
    pub fn take(&mut self) -> Option<u32> {
        let uid = self.free.pop_front()?;
        self.leased.insert(uid);
        Some(uid)
    }

    /// `uid` is clean again: free, at the back of the LRU order.
    pub fn put_back(&mut self, uid: u32) {
        self.leased.remove(&uid);
        if self.dirty.remove(&uid) || !self.free.contains(&uid) {
            self.free.push_back(uid);
        }
    }

    /// `uid`'s cleanup failed: neither leased nor free until a retry succeeds.
    pub fn mark_dirty(&mut self, uid: u32) {
        self.leased.remove(&uid);
        // Recovery marks uids that were never taken: out of the free queue too.
        self.free.retain(|&u| u != uid);
        self.dirty.insert(uid);
    }

    /// Uids waiting for a cleanup retry.
    pub fn dirty(&self) -> Vec<u32> {
        self.dirty.iter().copied().collect()
    }

    /// Uids leased now.
    pub fn leased(&self) -> Vec<u32> {
        self.leased.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_least_recently_used_and_never_twice() {
        let mut pool = UidPool::new(UidRange {
            first: 10,
            last: 12,
        });
        let (a, b) = (pool.take().unwrap(), pool.take().unwrap());
        assert_eq!((a, b), (10, 11));
        pool.put_back(a);
        // 12 was never used; 10 was just released: 12 first.
        assert_eq!(pool.take(), Some(12));
        assert_eq!(pool.take(), Some(10));
        assert_eq!(pool.take(), None, "11, 12 and 10 are leased");
        pool.mark_dirty(b);
        assert_eq!(pool.take(), None, "a dirty uid is not free");
        assert_eq!(pool.dirty(), vec![11]);
        pool.put_back(b);
        assert_eq!(pool.take(), Some(11));

        // A free uid found dirty (at recovery) is never handed out until cleaned.
        let mut pool = UidPool::new(UidRange { first: 1, last: 2 });
        pool.mark_dirty(1);
        assert_eq!((pool.take(), pool.take()), (Some(2), None));
        pool.put_back(1);
        assert_eq!(pool.take(), Some(1));
    }
}
