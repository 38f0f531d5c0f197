//! Reaps zombie children of the daemon that no waiter owns (run by the registry's periodic sweep).

use std::sync::Arc;

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
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name, which is in parentheses and may hold spaces.
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut fields = after.split_whitespace();
        let state = fields.next();
        let ppid = fields.next().and_then(|p| p.parse::<i32>().ok());
        if state == Some("Z") && ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}
