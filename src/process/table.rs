//! The daemon-wide table of the processes it owns: pids a waiter will collect, and process groups per session.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, RwLock};

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use super::background::{BackgroundDrains, BackgroundLimits};

/// Identifies a session inside the daemon (cheaper than its string id).
pub type SessionKey = u64;

/// What the daemon owns, shared by spawners, the reaper and shutdown.
///
/// 1. `waited`: pids whose exit status a [`super::ChildProcess`] will collect.
///    The reaper never touches them (docs/design-notes.md "Reaping": `waitpid(-1)`
///    stole statuses; reaping only zombies outside this set got 50/50 right).
/// 2. `groups`: every process group a command of a session started (one per
///    command, pgid = the shell's pid). Background children stay in their
///    command's group after the shell exits, so destroying a session kills
///    every group recorded for it; groups found empty are pruned.
///
/// Two locks, so a spawn that hangs (a cwd on a stalled mount) blocks nobody
/// but the reaper: spawners hold `spawn_gate` for reading across the spawn,
/// the reaper holds it for writing, so it never sees a fresh child's zombie
/// before its pid is in `waited`. `inner` is only held for quick updates and
/// for `wait4(WNOHANG)`, so a pid is collected and forgotten atomically (it
/// cannot be reused by a new child in between).
#[derive(Debug, Default)]
pub struct ProcessTable {
    spawn_gate: RwLock<()>,
    inner: Mutex<TableInner>,
    /// Pipes background writers of each session still hold after their command answered.
    background: BackgroundDrains,
}

#[derive(Debug, Default)]
struct TableInner {
    waited: HashSet<i32>,
    /// Children whose waiter gave up on them (`release`): the reaper's to
    /// take once they exit. A child of the thread that spawned it, so not in
    /// the main thread's list the SIGCHLD reaper reads.
    released: HashSet<i32>,
    groups: HashMap<i32, SessionKey>,
}

impl ProcessTable {
    /// An empty table whose sessions' leftover pipes are drained within `limits`.
    pub fn new(limits: BackgroundLimits) -> ProcessTable {
        ProcessTable {
            background: BackgroundDrains::new(limits),
            ..Default::default()
        }
    }

    /// The sessions' leftover pipes (see [`BackgroundDrains`]).
    pub fn background(&self) -> &BackgroundDrains {
        &self.background
    }

    /// Runs `spawn` (blocking: call it off the async workers) and records the
    /// child it returns as waited-for and as the leader of a group of `session`.
    pub fn spawn_owned<E>(
        &self,
        session: SessionKey,
        spawn: impl FnOnce() -> Result<Pid, E>,
    ) -> Result<Pid, E> {
        let _gate = self.spawn_gate.read().unwrap_or_else(|p| p.into_inner());
        let pid = spawn()?;
        let mut inner = self.lock();
        inner.waited.insert(pid.as_raw());
        inner.groups.insert(pid.as_raw(), session);
        Ok(pid)
    }

    /// Runs `collect` (a non-blocking wait for `pid`) under the lock; when it
    /// returns `Some`, `pid` is forgotten in the same critical section.
    pub fn collect<T>(&self, pid: Pid, collect: impl FnOnce() -> Option<T>) -> Option<T> {
        let mut inner = self.lock();
        let collected = collect();
        if collected.is_some() {
            inner.waited.remove(&pid.as_raw());
        }
        collected
    }

    /// The waiter gave up on `pid` (its owner was dropped): the reaper may take it now.
    pub fn release(&self, pid: Pid) {
        let mut inner = self.lock();
        inner.waited.remove(&pid.as_raw());
        inner.released.insert(pid.as_raw());
    }

    /// The children released by their waiters and not yet reaped.
    pub fn released(&self) -> Vec<i32> {
        self.lock().released.iter().copied().collect()
    }

    /// Forgets released children that were reaped or are no longer ours.
    pub fn forget_released(&self, pids: &[i32]) {
        let mut inner = self.lock();
        for pid in pids {
            inner.released.remove(pid);
        }
    }

    /// Runs `f` with no spawn in progress and the table locked, for the
    /// reaper; `None` (skipped) while a spawn is in progress. It never waits
    /// for the gate: a waiting writer would block new spawners behind a spawn
    /// that hangs (a cwd on a stalled mount), stopping every command.
    pub fn with_locked<R>(&self, f: impl FnOnce(&dyn Fn(i32) -> bool) -> R) -> Option<R> {
        let _gate = match self.spawn_gate.try_write() {
            Ok(gate) => gate,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        let inner = self.lock();
        Some(f(&|pid| inner.waited.contains(&pid)))
    }

    /// Sends `signal` to every group of `session`; returns how many groups were still alive.
    pub fn signal_session(&self, session: SessionKey, signal: Signal) -> usize {
        let mut inner = self.lock();
        let mut alive = 0;
        inner.groups.retain(|&pgid, &mut owner| {
            if owner != session {
                return true;
            }
            match killpg(Pid::from_raw(pgid), signal) {
                Err(Errno::ESRCH) => false,
                _ => {
                    alive += 1;
                    true
                }
            }
        });
        alive
    }

    /// Forgets every group of `session` (after its final kill), and stops
    /// draining its leftover pipes: they belong to the session.
    pub fn forget_session(&self, session: SessionKey) {
        self.lock().groups.retain(|_, owner| *owner != session);
        self.background.forget(session);
    }

    /// Sends `signal` to every group the daemon ever started that may still be alive.
    pub fn signal_all(&self, signal: Signal) -> usize {
        let mut inner = self.lock();
        let mut alive = 0;
        inner
            .groups
            .retain(|&pgid, _| match killpg(Pid::from_raw(pgid), signal) {
                Err(Errno::ESRCH) => false,
                _ => {
                    alive += 1;
                    true
                }
            });
        alive
    }

    /// Drops groups with no process left (signal 0 probes without killing).
    pub fn prune_dead_groups(&self) {
        self.lock().groups.retain(|&pgid, _| {
            !matches!(
                nix::sys::signal::killpg(Pid::from_raw(pgid), None),
                Err(Errno::ESRCH)
            )
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TableInner> {
        // A panic while holding this lock cannot leave the sets half-updated
        // (each operation is one insert/remove/retain), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}
