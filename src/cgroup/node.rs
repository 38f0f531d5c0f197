//! Owned cgroup nodes: a session's node (held by its SessionActor) and a command's leaf (made ahead by the session's pool, then held by its run); each is killed and removed when dropped.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use super::{CgroupError, CgroupLimits, Cgroups};

/// One node of our subtree — `session-<key>` or `session-<key>/cmd-<n>` —
/// owned: dropping it kills every process in it and below and removes it
/// (off the async workers when a runtime is present: cgroup I/O blocks).
/// That covers every way its owner can end: a panic, an aborted task, an
/// early return. Only [`CgroupNode::release`] lets a node outlive its handle.
#[derive(Debug)]
pub struct CgroupNode {
    cgroups: Arc<Cgroups>,
    rel: String,
    /// Cleared by `release` and `destroy`, which did the node's end themselves.
    armed: bool,
}

impl CgroupNode {
    /// Creates the cgroup of session `key` with `limits` (blocking).
    pub fn create_session(
        cgroups: &Arc<Cgroups>,
        key: u64,
        limits: &CgroupLimits,
    ) -> Result<CgroupNode, CgroupError> {
        let rel = cgroups.create_session(key, limits)?;
        Ok(CgroupNode::own(cgroups, rel))
    }

    pub(super) fn own(cgroups: &Arc<Cgroups>, rel: String) -> CgroupNode {
        CgroupNode {
            cgroups: cgroups.clone(),
            rel,
            armed: true,
        }
    }

    /// The node's path below our subtree.
    pub fn name(&self) -> &str {
        &self.rel
    }

    /// Opens the node's `cgroup.procs` files for the spawn child to join (blocking).
    pub fn open_procs(&self) -> Result<Vec<OwnedFd>, CgroupError> {
        self.cgroups.open_procs(&self.rel)
    }

    /// Kills every process in the node and below; waits until it is empty (blocking).
    pub fn kill(&self) -> Result<(), CgroupError> {
        self.cgroups.kill(&self.rel)
    }

    /// [`CgroupNode::kill`] on a blocking thread.
    pub async fn kill_off_workers(&self) -> Result<(), CgroupError> {
        let (cgroups, rel) = (self.cgroups.clone(), self.rel.clone());
        tokio::task::spawn_blocking(move || cgroups.kill(&rel))
            .await
            .unwrap_or_else(|e| Err(CgroupError::Task(e.to_string())))
    }

    /// The node's owner is done with it but its processes may go on (a
    /// command that ended by itself, leaving background children): removed
    /// now if empty, else left to its session's end (blocking). Whether it
    /// was removed.
    pub fn release(mut self) -> bool {
        self.armed = false;
        !self.cgroups.populated(&self.rel) && self.cgroups.remove(&self.rel).is_ok()
    }

    /// Kills everything in the node and below, and removes it (blocking).
    pub fn destroy(mut self) -> Result<(), CgroupError> {
        self.armed = false;
        self.cgroups.destroy(&self.rel)
    }
}

impl Drop for CgroupNode {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (cgroups, rel) = (self.cgroups.clone(), std::mem::take(&mut self.rel));
        let destroy = move || {
            if let Err(e) = cgroups.destroy(&rel) {
                tracing::error!(cgroup = %rel, error = %e, "cannot remove a dropped cgroup node");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(destroy);
            }
            Err(_) => destroy(),
        }
    }
}
