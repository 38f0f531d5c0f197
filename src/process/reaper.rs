//! Reaps zombie children of the daemon that no waiter owns (run by the registry's periodic sweep).

use std::sync::Arc;

use super::procfs;
use super::table::ProcessTable;

/// Collects every zombie child of this process whose pid is not waited for by
/// a [`super::ChildProcess`]; returns how many it reaped.
///
/// 1. List our children from /proc (`ppid == our pid`, state `Z`).
/// 2. Under the process-table lock (no spawn can race), skip the pids a
///    waiter owns and `waitpid(pid, WNOHANG)` the rest, by pid.
///
/// Never `waitpid(-1)`: it would steal exit statuses that waiters need.
/// Blocking /proc I/O: call it from a blocking thread.
pub fn reap_orphans(table: &Arc<ProcessTable>) -> u64 {
    let me = std::process::id() as i32;
    let zombies: Vec<i32> = zombie_children(me);
    if zombies.is_empty() {
        return 0;
    }
    table.with_locked(|is_waited| {
        let mut reaped = 0;
        for pid in zombies {
            if is_waited(pid) {
                continue;
            }
            let mut status = 0;
            // SAFETY: waitpid on a specific pid with WNOHANG; status is a valid local.
            if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
                reaped += 1;
            }
        }
        reaped
    })
}

fn zombie_children(parent: i32) -> Vec<i32> {
    procfs::all_processes()
        .into_iter()
        .filter(|p| p.ppid == parent && p.is_zombie())
        .map(|p| p.pid)
        .collect()
}
