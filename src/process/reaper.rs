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
    reap_unwaited(table, zombie_children(me))
}

/// On SIGCHLD, the cheap look: reaps the orphans the daemon adopted as a
/// subreaper. The kernel hands an orphan to the subreaper's first live
/// thread (`find_alive_thread` in kernel/exit.c), the main thread, which
/// spawns nothing; so its one children file lists the adopted orphans (and
/// children of pool threads that exited, which the table keeps for their
/// waiters), where [`reap_orphans`] reads one file per thread and the stat
/// of every child — on every command's exit. `None` when the file cannot be
/// read (a kernel without CONFIG_PROC_CHILDREN): use [`reap_orphans`].
pub fn reap_adopted(table: &Arc<ProcessTable>) -> Option<u64> {
    let me = std::process::id();
    let list = std::fs::read_to_string(format!("/proc/self/task/{me}/children")).ok()?;
    let mut children: Vec<i32> = list
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    // Many live orphans (background jobs left running): each would be a
    // waitpid under the table's lock; the full scan looks at zombies only.
    if children.len() > ADOPTED_INLINE {
        return None;
    }
    // Children whose waiter gave up on them are children of their spawning thread.
    children.extend(table.released());
    if children.is_empty() {
        return Some(0);
    }
    // `waitpid(WNOHANG)` takes the zombies among them and leaves the rest.
    Some(reap_unwaited(table, children))
}

/// Most adopted children `reap_adopted` waits for inline.
const ADOPTED_INLINE: usize = 64;

/// `waitpid(pid, WNOHANG)` on each of `pids` that no waiter owns.
fn reap_unwaited(table: &Arc<ProcessTable>, pids: Vec<i32>) -> u64 {
    if pids.is_empty() {
        return 0;
    }
    // A spawn in progress: skip this round (SIGCHLD or the next sweep comes again).
    let Some(done) = table.with_locked(|is_waited| {
        let mut done = Vec::new();
        for pid in pids {
            if is_waited(pid) {
                continue;
            }
            let mut status = 0;
            // SAFETY: waitpid on a specific pid with WNOHANG; status is a valid local.
            match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
                0 => {}
                // Reaped (pid), or not a child of ours any more (-1, ECHILD).
                reaped => done.push((pid, reaped == pid)),
            }
        }
        done
    }) else {
        return 0;
    };
    let gone: Vec<i32> = done.iter().map(|(pid, _)| *pid).collect();
    table.forget_released(&gone);
    done.iter().filter(|(_, reaped)| *reaped).count() as u64
}

fn zombie_children(parent: i32) -> Vec<i32> {
    // Our children are listed per thread in /proc/self/task/*/children (a
    // few small reads); scanning all of /proc is the fallback for kernels
    // built without CONFIG_PROC_CHILDREN.
    let children = children_of_self().unwrap_or_else(|| {
        procfs::all_processes()
            .into_iter()
            .filter(|p| p.ppid == parent)
            .map(|p| p.pid)
            .collect()
    });
    children
        .into_iter()
        .filter(|pid| procfs::stat(*pid).is_some_and(|p| p.ppid == parent && p.is_zombie()))
        .collect()
}

fn children_of_self() -> Option<Vec<i32>> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let list = std::fs::read_to_string(task.path().join("children")).ok()?;
        out.extend(
            list.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok()),
        );
    }
    Some(out)
}
