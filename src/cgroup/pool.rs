//! A session's command leaves, made ahead and, where the kernel allows, used again: the SessionActor's [`SessionLeaves`] keeps a leaf ready, which a command's run takes at spawn and gives back at its end; the leaf's counters are read at its end from files opened with it.
//!
//! Why: making a leaf (mkdir in each hierarchy it has), opening its join files,
//! reading its counters and removing it cost ~325 µs per command on v1,
//! about half of `exec.run true` (docs/design-notes.md, "The cgroup path").
//! Made ahead, that work is off the command's path but still competes with it
//! for the CPUs, and a process joining a leaf made moments before costs more
//! than joining one that has held processes before.
//!
//! A leaf is used again only where the backend can start its peak over
//! ([`super::Backend::reset_leaf`]: on v1, an empty leaf whose command left
//! little charged has its peak reset to its usage): its OOM and
//! refused-fork counters only grow, so each command's figures — its peak
//! too — are their growth from the leaf's reset. Where the backend cannot (v2:
//! `memory.peak` is resettable from Linux 6.12 only), or the leaf still holds
//! background processes, every command gets a fresh leaf, made before it is
//! asked for.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::{CgroupError, CgroupNode, Cgroups};

/// Leaves a session keeps, ready or with a command, where leaves are used
/// again: two, so a command takes one ready while its predecessor's is
/// being reset (a reset is a few cgroup file writes and reads on the
/// blocking pool, behind whatever else the blocking pool has queued —
/// which a command sent as soon as the previous
/// one was answered would otherwise wait for). Each holds a cgroup in the
/// kernel (in three hierarchies on v1) and 8 open files (5 join files, 3
/// counters).
pub const REUSED_LEAVES: usize = 2;

/// Leaves kept ready per session where each command needs a fresh one: one
/// is enough for commands run one after another (the next is made while the
/// current one runs). 4 open files each on v2.
pub const FRESH_LEAVES_READY: usize = 1;

// Either way the second of a burst of `exec.start`s (with
// `max_per_session` above 1) waits up to `RETURN_WAIT` for a leaf being
// given back, else makes its own on its path, as every command did before.

/// How long a command's spawn waits for the leaf of the session's previous
/// command to come back before it makes one of its own. Giving a leaf back
/// is a few writes and reads of cgroup files on the blocking pool, queued
/// before that command was answered; the bound only covers a blocking pool
/// that is busy elsewhere.
const RETURN_WAIT: Duration = Duration::from_millis(20);

/// Where a node's counters are (per backend).
#[derive(Debug, Clone)]
pub struct CounterFiles {
    /// OOM kills: a `key value` file, and the key.
    pub oom: (PathBuf, &'static str),
    /// Peak memory: one number (absent on kernels that do not report it).
    pub peak: PathBuf,
    /// Refused forks (`max N`, pids.events).
    pub pids: PathBuf,
}

/// A leaf's counter files, open for reading (re-read from offset 0 each
/// time: the kernel formats a cgroup file anew for a read at offset 0).
#[derive(Debug)]
struct Counters {
    oom: Option<File>,
    oom_key: &'static str,
    peak: Option<File>,
    pids: Option<File>,
    /// The OOM kills and refused forks counted before the leaf's current
    /// command (by earlier commands of a leaf used again), and the usage
    /// its peak was reset to.
    oom_before: u64,
    pids_before: u64,
    peak_before: u64,
}

impl Counters {
    fn open(files: &CounterFiles) -> Counters {
        Counters {
            oom: File::open(&files.oom.0).ok(),
            oom_key: files.oom.1,
            peak: File::open(&files.peak).ok(),
            pids: File::open(&files.pids).ok(),
            oom_before: 0,
            pids_before: 0,
            peak_before: 0,
        }
    }

    /// OOM kills in the leaf since it was made.
    fn read_oom_kills(&self) -> Option<u64> {
        read_counter(self.oom.as_ref(), |t| super::fs::key_value(t, self.oom_key))
    }

    fn oom_kills(&self) -> u64 {
        self.read_oom_kills().unwrap_or(0)
    }

    /// Refused forks counted in the leaf since it was made.
    fn pids_hits(&self) -> u64 {
        pids_hits(self.pids.as_ref())
    }

    /// The peak since the leaf was made or last reset (0 where the kernel
    /// reports none).
    fn read_peak(&self) -> Option<u64> {
        read_counter(self.peak.as_ref(), |t| t.trim().parse().ok())
    }

    /// The leaf starts over for its next command (its peak just reset to
    /// the usage): what it counts from now. `false` if a counter cannot be
    /// read (the next command would count its predecessors' kills, forks
    /// or memory as its own: the leaf is not used).
    fn start_over(&mut self) -> bool {
        match (
            self.read_oom_kills(),
            read_pids_hits(self.pids.as_ref()),
            self.read_peak(),
        ) {
            (Some(oom), Some(pids), Some(peak)) => {
                (self.oom_before, self.pids_before, self.peak_before) = (oom, pids, peak);
                true
            }
            _ => false,
        }
    }
}

/// A leaf made ahead: the node, its `cgroup.procs` files open for the spawn
/// child to join, and its counters open.
#[derive(Debug)]
struct Prepared {
    node: CgroupNode,
    procs: Vec<OwnedFd>,
    counters: Counters,
}

/// The session's command leaves: the ready ones, their refill, and the
/// session's count of refused forks. Shared by the SessionActor (which ends
/// it with [`SessionLeaves::finish`]) and each command's run.
#[derive(Debug)]
pub struct SessionLeaves {
    cgroups: Arc<Cgroups>,
    session: String,
    /// The session's memory limit: a leaf's peak is reported at most this.
    memory_max: u64,
    ready: Mutex<Ready>,
    /// Signalled when a leaf is given back (or will not be).
    given_back: Condvar,
    /// Whether the backend can start a used leaf's peak over.
    reuses: bool,
    /// Held while a leaf is being made or put back among the ready ones,
    /// so `finish` can wait one out (a leaf being reset finds `closed` set
    /// when it takes this, and goes).
    making: Mutex<()>,
    /// A refill task is queued or running.
    refilling: AtomicBool,
    /// The session is ending: no more leaves are made.
    closed: AtomicBool,
    /// The session's own pids.events, on kernels that count a refused fork
    /// at the limiting cgroup and its ancestors (those with
    /// pids.events.local): there the leaf of the forking task counts
    /// nothing. On v1 and on older v2 kernels (Debian's 6.1) the forking
    /// task's cgroup — the leaf — counts it, and this is `None`.
    session_pids: Option<File>,
    /// Refused forks counted by leaves already removed. The lock also keeps
    /// a leaf's removal apart from a sum over the leaves still there.
    retired: Mutex<u64>,
    /// Refused forks already added to the daemon's total (at each command's end).
    reported: AtomicU64,
}

/// The ready leaves, and those out with a command.
#[derive(Debug, Default)]
struct Ready {
    leaves: VecDeque<Prepared>,
    /// Leaves taken by commands not yet given back (running, or ended and
    /// being reset), which the backend may make ready again.
    out: usize,
    /// Of those, the ones whose command has ended: a spawn waits for these.
    returning: usize,
}

/// What the kernel says of a command's leaf at the command's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafReading {
    pub oom_kills: u64,
    /// Peak memory, at most the session's `memory_max` (see [`CommandLeaf::finish`]).
    pub memory_peak: Option<u64>,
    /// Forks refused by the session's pids limit while the command ran.
    pub pids_limit_hits: u64,
}

/// A command's own leaf, taken from its session's pool.
#[derive(Debug)]
pub struct CommandLeaf {
    /// `None` once given back.
    prepared: Option<Prepared>,
    session: Arc<SessionLeaves>,
    /// The session's count when the command started (where the session counts).
    session_hits_before: u64,
    /// The command has ended ([`CommandLeaf::finish`]).
    ended: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here leaves its data half-changed on a panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads a small cgroup file from offset 0.
fn pread(file: &File) -> Option<String> {
    let mut buf = [0u8; 1024];
    let n = file.read_at(&mut buf, 0).ok()?;
    String::from_utf8(buf[..n].to_vec()).ok()
}

/// A counter in an open cgroup file, by `parse`: `None` if the file cannot
/// be read, 0 where the kernel has no such file (it was not opened).
fn read_counter(file: Option<&File>, parse: impl Fn(&str) -> Option<u64>) -> Option<u64> {
    match file {
        Some(file) => pread(file).and_then(|t| parse(&t)),
        None => Some(0),
    }
}

/// Refused forks in an open pids.events (`max N`); `None` if unreadable.
fn read_pids_hits(file: Option<&File>) -> Option<u64> {
    read_counter(file, |t| super::fs::key_value(t, "max"))
}

/// [`read_pids_hits`], 0 if unreadable.
fn pids_hits(file: Option<&File>) -> u64 {
    read_pids_hits(file).unwrap_or(0)
}

impl SessionLeaves {
    /// The leaves of `session` (blocking: opens the session's counter where
    /// it counts). None is made until the first command takes one: a
    /// session that runs nothing (or is made and destroyed at once) costs no
    /// leaf.
    pub fn new(cgroups: &Arc<Cgroups>, session: &CgroupNode, memory_max: u64) -> Arc<Self> {
        let session_pids = cgroups
            .session_pids_events(session.name())
            .and_then(|f| File::open(f).ok());
        Arc::new(SessionLeaves {
            cgroups: cgroups.clone(),
            session: session.name().to_string(),
            memory_max,
            ready: Mutex::new(Ready::default()),
            given_back: Condvar::new(),
            reuses: cgroups.reuses_leaves(),
            making: Mutex::new(()),
            refilling: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            session_pids,
            retired: Mutex::new(0),
            reported: AtomicU64::new(0),
        })
    }

    /// A leaf for a command (blocking): a ready one, else the previous
    /// command's once it is given back, else the one being made (sooner
    /// ready than a new one, and no work done twice), else one made now.
    /// Unless a leaf out with a command may come back, the next is made in
    /// the background.
    pub fn take(self: &Arc<Self>) -> Result<CommandLeaf, CgroupError> {
        let ready = self.ready_or_returned();
        let prepared = match ready {
            Some(p) => p,
            None => {
                let _making = lock(&self.making);
                let made_meanwhile = lock(&self.ready).leaves.pop_front();
                match made_meanwhile {
                    Some(p) => p,
                    None => self.prepare()?,
                }
            }
        };
        let wanted = {
            let mut ready = lock(&self.ready);
            ready.out += 1;
            self.wants_more(&ready)
        };
        if wanted {
            self.refill();
        }
        Ok(CommandLeaf {
            prepared: Some(prepared),
            session: self.clone(),
            session_hits_before: pids_hits(self.session_pids.as_ref()),
            ended: false,
        })
    }

    /// The leaves the session keeps: [`REUSED_LEAVES`] (ready or out) or
    /// [`FRESH_LEAVES_READY`] (ready).
    fn size(&self) -> usize {
        if self.reuses {
            REUSED_LEAVES
        } else {
            FRESH_LEAVES_READY
        }
    }

    /// Whether a leaf is to be made: fewer ready than the session keeps
    /// (counting, where leaves come back, those out with commands).
    fn wants_more(&self, ready: &Ready) -> bool {
        ready.leaves.len() + if self.reuses { ready.out } else { 0 } < self.size()
    }

    /// A ready leaf, waiting (at most [`RETURN_WAIT`]) for one an ended
    /// command is giving back.
    fn ready_or_returned(&self) -> Option<Prepared> {
        let mut ready = lock(&self.ready);
        let waited = std::time::Instant::now();
        loop {
            if let Some(p) = ready.leaves.pop_front() {
                return Some(p);
            }
            let left = RETURN_WAIT.checked_sub(waited.elapsed())?;
            if ready.returning == 0 {
                return None;
            }
            ready = self
                .given_back
                .wait_timeout(ready, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Makes one leaf: the node, its join files and counters open (blocking).
    fn prepare(&self) -> Result<Prepared, CgroupError> {
        let rel = self.cgroups.create_command(&self.session)?;
        let node = CgroupNode::own(&self.cgroups, rel);
        let procs = node.open_procs()?;
        let counters = Counters::open(&self.cgroups.counter_files(node.name()));
        Ok(Prepared {
            node,
            procs,
            counters,
        })
    }

    /// Tops the leaves up (see [`SessionLeaves::wants_more`]) on the blocking pool (one
    /// task at a time), never on a command's path nor in the session's actor.
    fn refill(self: &Arc<Self>) {
        if self.closed.load(Ordering::Acquire)
            || !self.wants_more(&lock(&self.ready))
            || self.refilling.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.refilling.store(false, Ordering::Release);
            return;
        };
        let leaves = self.clone();
        runtime.spawn_blocking(move || {
            let mut full = false;
            loop {
                let _making = lock(&leaves.making);
                if leaves.closed.load(Ordering::Acquire) {
                    break;
                }
                if !leaves.wants_more(&lock(&leaves.ready)) {
                    full = true;
                    break;
                }
                match leaves.prepare() {
                    // The session ended while it was made (its actor failed:
                    // `finish` waits this out): it goes at once.
                    Ok(p) if leaves.closed.load(Ordering::Acquire) => {
                        let _ = p.node.destroy();
                    }
                    Ok(p) => {
                        lock(&leaves.ready).leaves.push_back(p);
                        leaves.given_back.notify_all();
                    }
                    Err(e) => {
                        tracing::warn!(session = %leaves.session, error = %e, "cannot make a command leaf ahead");
                        break;
                    }
                }
            }
            leaves.refilling.store(false, Ordering::Release);
            // A take between the check above and now saw the flag still set
            // and left the refill to us.
            if full && leaves.wants_more(&lock(&leaves.ready)) {
                leaves.refill();
            }
        });
    }

    /// Refused forks in the session so far (blocking: reads every leaf's
    /// count, for `session.list`).
    pub fn pids_limit_hits(&self) -> u64 {
        let at_session = pids_hits(self.session_pids.as_ref());
        let retired = lock(&self.retired);
        let in_leaves: u64 = self
            .cgroups
            .children_of(&self.session)
            .iter()
            .map(|leaf| self.cgroups.leaf_pids_limit_hits(leaf))
            .sum();
        at_session.max(*retired + in_leaves)
    }

    /// At the session's end, once its processes are killed (blocking): no
    /// more leaves are made, the ready ones go, and the refused forks not yet
    /// counted (those of background processes after their command ended)
    /// join the daemon's total. Returns the session's count.
    pub fn finish(&self) -> u64 {
        self.closed.store(true, Ordering::Release);
        let unused: Vec<Prepared> = {
            let _making = lock(&self.making);
            lock(&self.ready).leaves.drain(..).collect()
        };
        // Counted while the unused leaves are still there: one used again
        // holds the refused forks of its earlier commands.
        let total = self.pids_limit_hits();
        for p in unused {
            let _ = p.node.destroy();
        }
        let reported = self.reported.swap(total, Ordering::AcqRel);
        self.cgroups
            .count_pids_limit_hits(total.saturating_sub(reported));
        total
    }
}

/// The SessionActor's hold on its leaves: dropping it (the session ended,
/// or its actor failed) stops their refill, so no leaf is made in a session
/// being removed.
#[derive(Debug)]
pub struct SessionLeavesHandle(Arc<SessionLeaves>);

impl SessionLeavesHandle {
    pub fn new(leaves: Arc<SessionLeaves>) -> Self {
        SessionLeavesHandle(leaves)
    }

    /// The leaves, for a command's run or `session.list`.
    pub fn shared(&self) -> Arc<SessionLeaves> {
        self.0.clone()
    }
}

impl std::ops::Deref for SessionLeavesHandle {
    type Target = SessionLeaves;
    fn deref(&self) -> &SessionLeaves {
        &self.0
    }
}

impl Drop for SessionLeavesHandle {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Release);
    }
}

impl CommandLeaf {
    fn prepared(&self) -> &Prepared {
        self.prepared
            .as_ref()
            .expect("a leaf is given back only by release")
    }

    /// The leaf's node (to kill the command's whole tree).
    pub fn node(&self) -> &CgroupNode {
        &self.prepared().node
    }

    /// Its `cgroup.procs` files, open for the spawn child to join (kept open
    /// for the leaf's next command).
    pub fn procs(&self) -> Vec<RawFd> {
        self.prepared()
            .procs
            .iter()
            .map(|f| f.as_raw_fd())
            .collect()
    }

    /// What the kernel says of the leaf at the command's end: a few reads of
    /// files already open, which only format counters the kernel keeps
    /// (never waiting on I/O), so done inline on the answer's path. Counts
    /// the command's refused forks into the daemon's total. From here the
    /// session's next command may wait for this leaf to be given back.
    ///
    /// The peak is the leaf's — in a leaf used again, its growth over the
    /// usage it was reset to (what earlier commands left charged: kernel
    /// objects awaiting their freeing, cached directory entries) — at most
    /// the session's `memory_max`: the
    /// kernel charges a leaf before its session and records the leaf's peak
    /// even when the session's limit then refuses the charge (a batch of
    /// pages or a huge page), so a leaf's recorded peak can pass the limit by
    /// memory never held (67–69 MB under 64 MiB measured on a v2 6.1 kernel).
    pub fn finish(&mut self) -> LeafReading {
        let c = &self.prepared().counters;
        let oom_kills = c.oom_kills().saturating_sub(c.oom_before);
        let memory_peak = c
            .peak
            .as_ref()
            .and(c.read_peak())
            .map(|p| p.saturating_sub(c.peak_before).min(self.session.memory_max));
        let in_leaf = c.pids_hits().saturating_sub(c.pids_before);
        let at_session =
            pids_hits(self.session.session_pids.as_ref()).saturating_sub(self.session_hits_before);
        let pids_limit_hits = in_leaf.max(at_session);
        self.session
            .reported
            .fetch_add(pids_limit_hits, Ordering::AcqRel);
        self.session.cgroups.count_pids_limit_hits(pids_limit_hits);
        if self.session.reuses && !self.ended {
            lock(&self.session.ready).returning += 1;
        }
        self.ended = true;
        LeafReading {
            oom_kills,
            memory_peak,
            pids_limit_hits,
        }
    }

    /// The command is done with its leaf (blocking). An empty leaf the
    /// backend can reset goes back to the session's ready ones, if there is
    /// room; else it is removed now if empty, its refused forks kept in the
    /// session's count, and one still holding background processes is left
    /// to the session's end. The reset (cgroup file I/O) holds no lock a
    /// spawn or the session's end waits on.
    pub fn release(mut self) {
        let Some(mut prepared) = self.prepared.take() else {
            return;
        };
        let session = self.session.clone();
        let room = || lock(&session.ready).leaves.len() < session.size();
        if session.reuses
            && room()
            && !session.closed.load(Ordering::Acquire)
            && !session.cgroups.populated(prepared.node.name())
            && session.cgroups.reset_leaf(prepared.node.name())
            && prepared.counters.start_over()
        {
            // The session's end (`finish`) drains the ready leaves under
            // `making` once `closed` is set: either it finds this one, or
            // this finds `closed`.
            let _making = lock(&session.making);
            if !session.closed.load(Ordering::Acquire) && room() {
                lock(&session.ready).leaves.push_back(prepared);
                // `self` drops here: counted in, and waiters woken.
                return;
            }
        }
        retire(&session, prepared, Retire::IfEmpty);
        drop(self);
        // Nothing comes back for the session's next command: make it one.
        session.refill();
    }
}

/// How a leaf leaves its session's pool.
#[derive(Clone, Copy)]
enum Retire {
    /// Its command ended by itself: removed if empty, else left to the
    /// session's end with the background processes in it.
    IfEmpty,
    /// Its command's run failed or was aborted: killed and removed.
    Destroy,
}

/// Removes a leaf, keeping its refused forks (of every command it served)
/// in the session's count once it is gone (blocking).
fn retire(session: &SessionLeaves, prepared: Prepared, how: Retire) {
    let Prepared { node, counters, .. } = prepared;
    if let Retire::Destroy = how {
        // Before the count's lock: a kill waits for the leaf to empty.
        if let Err(e) = node.kill() {
            tracing::error!(cgroup = %node.name(), error = %e, "cannot kill a dropped command leaf");
        }
    }
    let mut retired = lock(&session.retired);
    let hits = counters.pids_hits();
    drop(counters);
    let gone = match how {
        Retire::IfEmpty => node.release(),
        Retire::Destroy => {
            let name = node.name().to_string();
            node.destroy()
                .map_err(|e| tracing::error!(cgroup = %name, error = %e, "cannot remove a dropped command leaf"))
                .is_ok()
        }
    };
    if gone {
        *retired += hits;
    }
}

/// A leaf leaves its command: it is no longer out, and a spawn waiting for
/// it is woken (to take it, or to make its own).
impl Drop for CommandLeaf {
    fn drop(&mut self) {
        let unreturned = self.prepared.take();
        {
            let mut ready = lock(&self.session.ready);
            ready.out = ready.out.saturating_sub(1);
            if self.session.reuses && self.ended {
                ready.returning = ready.returning.saturating_sub(1);
            }
        }
        self.session.given_back.notify_all();
        // Not given back (its command's spawn failed, or its run ended in
        // an error or was aborted): it goes, killed first, with whatever
        // refused forks of earlier commands it counted, and the session
        // gets another.
        let Some(prepared) = unreturned else {
            return;
        };
        let leaves = self.session.clone();
        let gone = move || {
            retire(&leaves, prepared, Retire::Destroy);
            leaves.refill();
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(gone)),
            Err(_) => gone(),
        }
    }
}

impl Cgroups {
    /// Whether the backend can start a used command leaf's peak over.
    pub(crate) fn reuses_leaves(&self) -> bool {
        self.backend.reuses_leaves()
    }

    /// Starts the peak of the empty leaf `rel` over for its next command,
    /// where the backend can (blocking): whether it did.
    pub(crate) fn reset_leaf(&self, rel: &str) -> bool {
        self.backend.reset_leaf(rel)
    }

    /// Where a session's own pids.events counts its refused forks: on kernels
    /// with pids.events.local (hierarchical counting, v2 only). `None`
    /// where the leaves count them.
    pub(crate) fn session_pids_events(&self, session: &str) -> Option<PathBuf> {
        let files = self.counter_files(session);
        let local = files.pids.with_file_name("pids.events.local");
        local.exists().then_some(files.pids)
    }

    /// Refused forks counted by a leaf (by path; blocking).
    pub(crate) fn leaf_pids_limit_hits(&self, rel: &str) -> u64 {
        let file = File::open(self.counter_files(rel).pids).ok();
        pids_hits(file.as_ref())
    }

    /// The child nodes of `rel`.
    pub(crate) fn children_of(&self, rel: &str) -> Vec<String> {
        self.backend
            .children(rel)
            .into_iter()
            .map(|c| format!("{rel}/{c}"))
            .collect()
    }
}
