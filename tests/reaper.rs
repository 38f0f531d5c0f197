//! The reaper collects zombie children no waiter owns, and never one that a waiter owns.
//! (Its own test binary: a reaper in a process where other tests spawn children would race them.)

use std::sync::Arc;

use sessiond::process::ProcessTable;
use sessiond::process::procfs;
use sessiond::process::reaper::{reap_adopted, reap_orphans};

/// The two tests count what they reap, so they never run at once.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn zombie_child() -> i32 {
    let child = std::process::Command::new("/bin/true").spawn().unwrap();
    let pid = child.id() as i32;
    // Dropping a std Child neither waits nor kills: it becomes a zombie of ours.
    drop(child);
    wait_for(&format!("child {pid} to become a zombie"), || {
        is_zombie(pid)
    });
    pid
}

fn is_zombie(pid: i32) -> bool {
    procfs::stat(pid).is_some_and(|s| s.is_zombie())
}

/// Polls `cond` until it holds; fails after 10 s.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn reaps_unowned_zombies_and_leaves_owned_ones() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let table = Arc::new(ProcessTable::default());
    let owned = zombie_child();
    table
        .spawn_owned(1, || Ok::<_, ()>(nix::unistd::Pid::from_raw(owned)))
        .unwrap();
    let orphan = zombie_child();

    assert_eq!(reap_orphans(&table), 1);
    assert!(
        !std::path::Path::new(&format!("/proc/{orphan}")).exists(),
        "the unowned zombie is gone"
    );
    assert!(
        std::path::Path::new(&format!("/proc/{owned}")).exists(),
        "the owned zombie waits for its waiter"
    );

    // Once its waiter lets go of it, the sweep takes it too.
    table.release(nix::unistd::Pid::from_raw(owned));
    assert_eq!(reap_orphans(&table), 1);
    assert!(!std::path::Path::new(&format!("/proc/{owned}")).exists());
}

/// What the SIGCHLD path relies on: an orphan adopted by a subreaper is a
/// child of its main thread, whichever thread's child its parent was (this
/// test runs on a thread of the test harness), and `reap_adopted` finds it
/// there and reaps it.
#[test]
fn adopted_orphans_are_children_of_the_main_thread_and_reaped_from_there() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let table = Arc::new(ProcessTable::default());
    // sh starts a child that outlives it (a `cat` of a pipe this test holds
    // open, so sh cannot have reaped it), says its pid and exits: the child
    // is ours now.
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let mut sh = std::process::Command::new("/bin/sh");
    sh.args(["-c", "cat <&3 >/dev/null 2>&1 & echo $!"]);
    let from = std::os::fd::AsRawFd::as_raw_fd(&read_end);
    // SAFETY: dup2 and fcntl are async-signal-safe; `read_end` stays open until sh has exec'd.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut sh, move || {
            // dup2 onto itself would keep close-on-exec: clear it instead.
            let ok = if from == 3 {
                libc::fcntl(3, libc::F_SETFD, 0) >= 0
            } else {
                libc::dup2(from, 3) >= 0
            };
            if !ok {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = sh.output().unwrap();
    drop(read_end);
    let orphan: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let me = std::process::id();
    let main_children = format!("/proc/self/task/{me}/children");
    wait_for(
        &format!("orphan {orphan} to be a child of the main thread"),
        || {
            std::fs::read_to_string(&main_children)
                .unwrap()
                .split_whitespace()
                .any(|p| p == orphan.to_string())
        },
    );
    assert_eq!(reap_adopted(&table), Some(0), "a live orphan is left alone");
    // Its pipe closes: it exits, a zombie of ours.
    drop(write_end);
    wait_for(&format!("orphan {orphan} to exit"), || is_zombie(orphan));
    assert_eq!(reap_adopted(&table), Some(1));
    assert!(!std::path::Path::new(&format!("/proc/{orphan}")).exists());
    assert_eq!(reap_adopted(&table), Some(0), "nothing left to reap");
    // A child of this (non-main) thread whose waiter gave up on it: not in
    // the main thread's list, found as released all the same.
    let abandoned = zombie_child();
    table
        .spawn_owned(1, || Ok::<_, ()>(nix::unistd::Pid::from_raw(abandoned)))
        .unwrap();
    assert_eq!(reap_adopted(&table), Some(0), "its waiter still owns it");
    table.release(nix::unistd::Pid::from_raw(abandoned));
    assert_eq!(reap_adopted(&table), Some(1));
    assert!(!std::path::Path::new(&format!("/proc/{abandoned}")).exists());
    assert!(table.released().is_empty(), "a reaped child is forgotten");
}
