//! The reaper collects zombie children no waiter owns, and never one that a waiter owns.
//! (Its own test binary: a reaper in a process where other tests spawn children would race them.)

use std::sync::Arc;

use sessiond::process::ProcessTable;
use sessiond::process::reaper::reap_orphans;

fn zombie_child() -> i32 {
    let child = std::process::Command::new("/bin/true").spawn().unwrap();
    let pid = child.id() as i32;
    // Dropping a std Child neither waits nor kills: it becomes a zombie of ours.
    drop(child);
    let stat = format!("/proc/{pid}/stat");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::fs::read_to_string(&stat).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "child {pid} never became a zombie"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    pid
}

#[test]
fn reaps_unowned_zombies_and_leaves_owned_ones() {
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
