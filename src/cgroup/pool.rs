//! A session's command leaves, made ahead: the SessionActor's [`SessionLeaves`] keeps [`POOL_SIZE`] fresh leaf ready (made on the blocking pool), which a command's run takes at spawn; the leaf's counters are read at its end from files opened with it.
//!
//! Why: making a leaf (mkdir in each hierarchy it has), opening its join files,
//! reading its counters and removing it cost ~325 µs per command on v1,
//! about half of `exec.run true` (docs/design-notes.md, "The cgroup path").
//! A leaf cannot be reused: its peak memory (`memory.peak`,
//! `memory.max_usage_in_bytes`) and its OOM and pids counters only grow
//! (memory.peak is resettable from Linux 6.12 only), so every command still
//! gets a fresh, empty leaf of its own — made before it is asked for.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{CgroupError, CgroupNode, Cgroups};

/// Fresh leaves kept ready per session. One is enough for commands run one
/// after another (the next is made while the current one runs); the second
/// of a burst of `exec.start`s makes its own on its path, as every command
/// did before. Each ready leaf holds a cgroup in the kernel (on v1, in three
/// hierarchies) and 8 open files on v1 (5 join files, 3 counters), 4 on v2.
pub const POOL_SIZE: usize = 1;

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
}

impl Counters {
    fn open(files: &CounterFiles) -> Counters {
        Counters {
            oom: File::open(&files.oom.0).ok(),
            oom_key: files.oom.1,
            peak: File::open(&files.peak).ok(),
            pids: File::open(&files.pids).ok(),
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
    ready: Mutex<VecDeque<Prepared>>,
    /// Held while a leaf is being made, so `finish` can wait one out.
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
    prepared: Prepared,
    session: Arc<SessionLeaves>,
    /// The session's count when the command started (where the session counts).
    session_hits_before: u64,
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

/// Refused forks in an open pids.events (`max N`).
fn pids_hits(file: Option<&File>) -> u64 {
    file.and_then(pread)
        .and_then(|t| super::fs::key_value(&t, "max"))
        .unwrap_or(0)
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
            ready: Mutex::new(VecDeque::with_capacity(POOL_SIZE)),
            making: Mutex::new(()),
            refilling: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            session_pids,
            retired: Mutex::new(0),
            reported: AtomicU64::new(0),
        })
    }

    /// A fresh leaf for a command (blocking): a ready one, else the one
    /// being made (sooner ready than a new one, and no work done twice),
    /// else one made now; either way the next is made in the background.
    pub fn take(self: &Arc<Self>) -> Result<CommandLeaf, CgroupError> {
        let ready = lock(&self.ready).pop_front();
        let prepared = match ready {
            Some(p) => p,
            None => {
                let _making = lock(&self.making);
                let made_meanwhile = lock(&self.ready).pop_front();
                match made_meanwhile {
                    Some(p) => p,
                    None => self.prepare()?,
                }
            }
        };
        self.refill();
        Ok(CommandLeaf {
            prepared,
            session: self.clone(),
            session_hits_before: pids_hits(self.session_pids.as_ref()),
        })
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

    /// Tops the ready leaves up to [`POOL_SIZE`] on the blocking pool (one
    /// task at a time), never on a command's path nor in the session's actor.
    fn refill(self: &Arc<Self>) {
        if self.closed.load(Ordering::Acquire) || self.refilling.swap(true, Ordering::AcqRel) {
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
                if lock(&leaves.ready).len() >= POOL_SIZE {
                    full = true;
                    break;
                }
                match leaves.prepare() {
                    // The session ended while it was made (its actor failed:
                    // `finish` waits this out): it goes at once.
                    Ok(p) if leaves.closed.load(Ordering::Acquire) => {
                        let _ = p.node.destroy();
                    }
                    Ok(p) => lock(&leaves.ready).push_back(p),
                    Err(e) => {
                        tracing::warn!(session = %leaves.session, error = %e, "cannot make a command leaf ahead");
                        break;
                    }
                }
            }
            leaves.refilling.store(false, Ordering::Release);
            // A take between the check above and now saw the flag still set
            // and left the refill to us.
            if full && lock(&leaves.ready).len() < POOL_SIZE {
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
            lock(&self.ready).drain(..).collect()
        };
        for p in unused {
            let _ = p.node.destroy();
        }
        let total = self.pids_limit_hits();
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
    /// The leaf's node (to kill the command's whole tree).
    pub fn node(&self) -> &CgroupNode {
        &self.prepared.node
    }

    /// Its `cgroup.procs` files, open for the spawn child to join.
    pub fn procs(&self) -> Vec<RawFd> {
        self.prepared.procs.iter().map(|f| f.as_raw_fd()).collect()
    }

    /// The child has joined: the join files are closed.
    pub fn joined(&mut self) {
        self.prepared.procs.clear();
    }

    /// What the kernel says of the leaf at the command's end: a few reads of
    /// files already open, which only format counters the kernel keeps
    /// (never waiting on I/O), so done inline on the answer's path. Counts
    /// the command's refused forks into the daemon's total.
    ///
    /// The peak is the leaf's, at most the session's `memory_max`: the
    /// kernel charges a leaf before its session and records the leaf's peak
    /// even when the session's limit then refuses the charge (a batch of
    /// pages or a huge page), so a leaf's recorded peak can pass the limit by
    /// memory never held (67–69 MB under 64 MiB measured on a v2 6.1 kernel).
    pub fn finish(&self) -> LeafReading {
        let c = &self.prepared.counters;
        let oom_kills = c
            .oom
            .as_ref()
            .and_then(pread)
            .and_then(|t| super::fs::key_value(&t, c.oom_key))
            .unwrap_or(0);
        let memory_peak = c
            .peak
            .as_ref()
            .and_then(pread)
            .and_then(|t| t.trim().parse::<u64>().ok())
            .map(|p| p.min(self.session.memory_max));
        let in_leaf = pids_hits(c.pids.as_ref());
        let at_session =
            pids_hits(self.session.session_pids.as_ref()).saturating_sub(self.session_hits_before);
        let pids_limit_hits = in_leaf.max(at_session);
        self.session
            .reported
            .fetch_add(pids_limit_hits, Ordering::AcqRel);
        self.session.cgroups.count_pids_limit_hits(pids_limit_hits);
        LeafReading {
            oom_kills,
            memory_peak,
            pids_limit_hits,
        }
    }

    /// The command is done with its leaf (blocking): removed now if empty,
    /// its refused forks kept in the session's count; one still holding
    /// background processes is left to the session's end.
    pub fn release(self) {
        let CommandLeaf {
            prepared, session, ..
        } = self;
        let Prepared { node, counters, .. } = prepared;
        let mut retired = lock(&session.retired);
        let hits = pids_hits(counters.pids.as_ref());
        drop(counters);
        if node.release() {
            *retired += hits;
        }
    }
}

impl Cgroups {
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
