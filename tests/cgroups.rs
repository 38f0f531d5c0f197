//! The kernel isolation layer on this host's real cgroups: hard memory, CPU and pids limits per session, whole-tree kill (crash recovery is in fault_signals.rs).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use sessiond::protocol::{CreateParams, ExecParams, KilledBy, SessionLimits};
use support::{TestDaemon, alive, wait_dead};

/// Why every test here is `#[ignore]`d by default: they need what CI has and
/// a developer's machine may not. Run them with `-- --include-ignored`.
const NEEDS_CGROUPS: &str = "needs root and a usable cgroup hierarchy";

/// Starts a daemon with cgroups on; fails the test where this host has none usable.
async fn daemon_with_cgroups() -> TestDaemon {
    assert!(nix::unistd::geteuid().is_root(), "{NEEDS_CGROUPS}");
    let d = TestDaemon::start("[cgroups]\nmode = \"auto\"\n");
    let mode = d.client().await.stats().await.unwrap().runtime.cgroups;
    assert_ne!(mode, "off", "{NEEDS_CGROUPS}");
    d
}

fn limits(l: SessionLimits) -> CreateParams {
    CreateParams {
        limits: Some(l),
        ..Default::default()
    }
}

fn exec(session: &str, command: &str, timeout_s: f64) -> ExecParams {
    ExecParams {
        session_id: session.into(),
        command: command.into(),
        timeout_s: Some(timeout_s),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and a usable cgroup hierarchy"]
async fn a_memory_hog_is_oom_killed_and_reported_while_others_run() {
    let d = daemon_with_cgroups().await;
    let c = Arc::new(d.client().await);
    let small = c
        .create_session(limits(SessionLimits {
            memory_max_bytes: Some(64 << 20),
            ..Default::default()
        }))
        .await
        .unwrap();
    let other = c.create_session(CreateParams::default()).await.unwrap();
    let neighbour = support::spawn_run(&c, &other, "sleep 1; echo fine");
    // `tail` keeps a whole line in memory; /dev/zero has none.
    let r = c
        .exec(exec(
            &small,
            "head -c 300M /dev/zero | tail > /dev/null; echo after",
            30.0,
        ))
        .await
        .unwrap();
    assert_eq!(r.killed_by, Some(KilledBy::MemoryLimit), "{r:?}");
    assert!(
        r.max_rss_bytes.unwrap() <= 64 << 20,
        "peak within the limit: {r:?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&neighbour.await.unwrap().unwrap().stdout),
        "fine\n"
    );
    assert_eq!(c.stats().await.unwrap().commands.oom_killed_total, 1);
    // The session lives on; its next command runs normally.
    let r = c.run(&small, "echo ok").await.unwrap();
    assert_eq!((r.exit_code, r.killed_by), (Some(0), None));
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and a usable cgroup hierarchy"]
async fn a_fork_bomb_is_contained_by_pids_max() {
    let d = daemon_with_cgroups().await;
    let c = Arc::new(d.client().await);
    let s = c
        .create_session(limits(SessionLimits {
            pids_max: Some(32),
            ..Default::default()
        }))
        .await
        .unwrap();
    let bomb = {
        let (c, s) = (c.clone(), s.clone());
        tokio::spawn(async move { c.exec(exec(&s, "b() { b | b & }; b; sleep 5", 4.0)).await })
    };
    support::wait_running(&c, 1).await;
    let mut pings = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        c.ping().await.unwrap();
        pings.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pings.sort();
    assert!(
        pings[2] < Duration::from_millis(100),
        "ping median under a fork bomb: {pings:?}"
    );
    let r = bomb.await.unwrap().unwrap();
    assert!(r.timed_out);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(
        stderr.contains("Resource temporarily unavailable"),
        "forks were refused by pids.max: {stderr}"
    );
    // The refusals are reported: by the command, and in the daemon's total.
    assert!(r.pids_limit_hits.unwrap() > 0, "{r:?}");
    assert!(c.stats().await.unwrap().commands.pids_limit_hits_total >= r.pids_limit_hits.unwrap());
    // Contained: after the command's end nothing of it is left.
    d.assert_no_leaks();
    drop(c);
    d.stop();
}

/// `pids_limit_hits` of session `id` in `session.list`.
async fn listed_hits(c: &sessiond::client::Client, id: &str) -> u64 {
    let sessions = c.list_sessions().await.unwrap().sessions;
    let info = sessions.into_iter().find(|i| i.session_id == id).unwrap();
    info.pids_limit_hits.expect("reported with cgroups on")
}

/// A fork bomb that detaches (the command returns at once) holds the
/// session's pids until the session ends: the session's count says so while
/// it lives, the daemon's total once it has ended, and nothing is left.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and a usable cgroup hierarchy"]
async fn a_detached_fork_bomb_is_reported_by_its_session_and_in_stats() {
    let d = daemon_with_cgroups().await;
    let c = d.client().await;
    let s = c
        .create_session(limits(SessionLimits {
            pids_max: Some(16),
            ..Default::default()
        }))
        .await
        .unwrap();
    let quiet = c.create_session(CreateParams::default()).await.unwrap();
    let r = c.run(&s, "b() { b | b & }; b").await.unwrap();
    assert!(r.pids_limit_hits.is_some(), "{r:?}");
    support::wait_until_async(
        "the session reports refused forks",
        Duration::from_secs(20),
        || async { listed_hits(&c, &s).await > 0 },
    )
    .await;
    assert_eq!(listed_hits(&c, &quiet).await, 0, "only the bomb's session");
    c.destroy_session(&s).await.unwrap();
    let total = c.stats().await.unwrap().commands.pids_limit_hits_total;
    assert!(
        total > 0,
        "the daemon's total counts them once the session has ended"
    );
    d.assert_no_leaks();
    c.destroy_session(&quiet).await.unwrap();
    assert!(d.command_cgroups().is_empty(), "no leaf left");
    drop(c);
    d.stop();
}

/// Prints the leaf a command's shell is in (`cmd-N`).
const OWN_LEAF: &str = "grep -o 'cmd-[0-9]*' /proc/self/cgroup | sort -u";

/// [`OWN_LEAF`], then `then`.
fn in_leaf(then: &str) -> String {
    format!("{OWN_LEAF}; {then}")
}

/// Each command's figures are its own, whether its leaf was made for it
/// (v2) or used before and reset (v1): a command run after a 50 MiB one,
/// an OOM-killed one and one whose forks the pids limit refused, in the same
/// leaf, reports its own small peak, no OOM kill and no refused fork. A session keeps its leaves
/// made ahead once it ran a command (on v1 two, used in turn; on v2 one
/// fresh one ready), and none is left after the session.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and a usable cgroup hierarchy"]
async fn each_command_counts_only_itself_in_a_leaf_made_ahead_or_reset() {
    let d = daemon_with_cgroups().await;
    let c = d.client().await;
    let kept = support::leaves_kept(&c).await;
    let reuses = c.stats().await.unwrap().runtime.cgroups == "v1";
    let s = c
        .create_session(limits(SessionLimits {
            memory_max_bytes: Some(64 << 20),
            pids_max: Some(8),
            ..Default::default()
        }))
        .await
        .unwrap();
    let leaves = || d.command_leaves();
    assert_eq!(leaves(), 0, "a session that ran nothing has no leaf");
    let leaf_of = |r: &sessiond::protocol::ExecResult| {
        let out = String::from_utf8_lossy(&r.stdout).into_owned();
        out.lines().next().unwrap_or_default().to_string()
    };
    let heavy = [
        ("a 50 MiB peak", "head -c 50M /dev/zero | tail > /dev/null"),
        ("an OOM kill", "head -c 300M /dev/zero | tail > /dev/null"),
        (
            "refused forks",
            "for i in $(seq 9); do sleep 0.2 & done; wait",
        ),
    ];
    // Once first: what the commands read for the first time since boot
    // (their programs) is charged to the leaf that read it, whose reset
    // would evict it from the page cache — such a leaf is removed instead.
    for (_, command) in heavy {
        c.exec(exec(&s, &in_leaf(command), 30.0)).await.unwrap();
    }
    let warm = leaves();
    let mut seen = std::collections::BTreeSet::new();
    for (what, command) in heavy {
        let r = c.exec(exec(&s, &in_leaf(command), 30.0)).await.unwrap();
        let leaf = leaf_of(&r);
        assert!(leaf.starts_with("cmd-"), "{what}: {r:?}");
        seen.insert(leaf.clone());
        match what {
            "a 50 MiB peak" => assert!(r.max_rss_bytes.unwrap() > 40 << 20, "{r:?}"),
            "an OOM kill" => assert_eq!(r.killed_by, Some(KilledBy::MemoryLimit), "{r:?}"),
            _ => assert!(r.pids_limit_hits.unwrap() > 0, "{r:?}"),
        }
        // The next commands until one runs in the same leaf (on v1 the
        // second one: two leaves in turn; on v2 none does).
        let mut reused = false;
        for _ in 0..kept + 1 {
            let r = c.exec(exec(&s, &in_leaf("true"), 30.0)).await.unwrap();
            assert_eq!(
                (r.exit_code, r.killed_by),
                (Some(0), None),
                "after {what}: {r:?}"
            );
            assert!(r.max_rss_bytes.unwrap() < 20 << 20, "after {what}: {r:?}");
            assert_eq!(r.pids_limit_hits, Some(0), "after {what}: {r:?}");
            reused |= leaf_of(&r) == leaf;
            seen.insert(leaf_of(&r));
        }
        assert_eq!(
            reused, reuses,
            "after {what}: a leaf is used again on v1 only (leaves seen: {seen:?})"
        );
    }
    let commands = heavy.len() * (kept + 2);
    let expected = if reuses { kept } else { commands };
    assert_eq!(
        seen.len(),
        expected,
        "leaves used: {seen:?} (after warming up: {warm})"
    );
    // Generous: under emulation (the v2 CI guest) a leaf takes a while. A
    // leaf whose processes had not all gone when its command's end was seen
    // stays until the session ends, as with background processes: only
    // empty ones are counted.
    support::wait_for(
        "ended commands' leaves go, those kept ahead stay",
        Duration::from_secs(30),
        || {
            let (all, held) = d.command_leaves_held();
            let empty = all.difference(&held).count();
            if empty == kept {
                Ok(())
            } else {
                Err(format!("leaves {all:?}, holding processes {held:?}"))
            }
        },
    );
    c.destroy_session(&s).await.unwrap();
    assert!(
        d.command_cgroups().is_empty(),
        "no leaf left after the session"
    );
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and a usable cgroup hierarchy"]
async fn a_cpu_spin_gets_its_share_of_a_core() {
    let d = daemon_with_cgroups().await;
    let c = d.client().await;
    let s = c
        .create_session(limits(SessionLimits {
            cpu_max_cores: Some(0.2),
            ..Default::default()
        }))
        .await
        .unwrap();
    let r = c.exec(exec(&s, "while :; do :; done", 2.0)).await.unwrap();
    assert!(r.timed_out);
    let cpu = r.cpu_ms.unwrap();
    // 20% of a core over 2 s is 400 ms.
    assert!(
        (200..=700).contains(&cpu),
        "cpu_ms {cpu} for 2 s at 0.2 cores"
    );
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and a usable cgroup hierarchy"]
async fn daemonized_children_die_with_the_command_or_the_session() {
    let d = daemon_with_cgroups().await;
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    // Double fork + setsid: reparented to init, in a session of its own, no
    // longer a descendant of anything of ours. Only its cgroup still holds it.
    let daemonize = |file: &str| {
        format!(
            "setsid sh -c 'sleep 1000 & echo $! > {file}'; while [ ! -s {file} ]; do sleep 0.01; done"
        )
    };
    // Killed with its command, once it runs (a condition: a 1 s timeout raced
    // the shell's start, and lost under emulation), by a cancel: the
    // timeout's kill path (`cgroup.kill` of the command's leaf).
    let c = Arc::new(c);
    let killed = support::spawn_run(&c, &s, &format!("{}; sleep 300", daemonize("t.pid")));
    let pid_file = d.work_dir().join("t.pid");
    support::wait_until("the daemonized child runs", Duration::from_secs(60), || {
        std::fs::read_to_string(&pid_file).is_ok_and(|p| p.ends_with('\n'))
    });
    assert!(c.cancel(&s).await.unwrap());
    let r = killed.await.unwrap().unwrap();
    assert_eq!(r.killed_by, Some(KilledBy::Cancelled), "{r:?}");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_dead(pid, "the daemonized child of the killed command dies");
    // Outlives its command (it ended by itself), dies with the session.
    let r = c.run(&s, &in_leaf(&daemonize("d.pid"))).await.unwrap();
    let pid: i32 = std::fs::read_to_string(d.work_dir().join("d.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Its leaf, which still holds it, is never another command's (on v1,
    // where leaves are reset and used again, nor there): a later command's
    // cancel, which kills its own leaf, leaves it alive.
    let background_leaf = r.stdout.to_vec();
    for _ in 0..4 {
        let r = c.run(&s, OWN_LEAF).await.unwrap();
        assert_ne!(
            r.stdout, background_leaf,
            "a command in the background's leaf"
        );
    }
    let later = support::spawn_run(&c, &s, &format!("{OWN_LEAF} > later.leaf; sleep 300"));
    let leaf_file = d.work_dir().join("later.leaf");
    support::wait_until("the later command runs", Duration::from_secs(60), || {
        std::fs::read(&leaf_file).is_ok_and(|l| !l.is_empty())
    });
    assert_ne!(std::fs::read(&leaf_file).unwrap(), background_leaf);
    assert!(c.cancel(&s).await.unwrap());
    let r = later.await.unwrap().unwrap();
    assert_eq!(r.killed_by, Some(KilledBy::Cancelled), "{r:?}");
    assert!(
        alive(pid),
        "a background process lives until the session ends"
    );
    c.destroy_session(&s).await.unwrap();
    wait_dead(pid, "the daemonized child dies with its session");
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and a usable cgroup hierarchy"]
async fn cgroup_limits_may_only_tighten() {
    let d = daemon_with_cgroups().await;
    let c = d.client().await;
    for (l, name) in [
        (
            SessionLimits {
                memory_max_bytes: Some(2 << 30),
                ..Default::default()
            },
            "memory_max_bytes",
        ),
        (
            SessionLimits {
                cpu_max_cores: Some(2.0),
                ..Default::default()
            },
            "cpu_max_cores",
        ),
        (
            SessionLimits {
                pids_max: Some(513),
                ..Default::default()
            },
            "pids_max",
        ),
    ] {
        let e = c.create_session(limits(l)).await.unwrap_err();
        assert_eq!(e.code(), Some("INVALID_REQUEST"));
        assert!(e.to_string().contains(name), "{e}");
    }
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and a usable cgroup hierarchy"]
async fn a_second_daemon_on_the_same_cgroup_parent_refuses_to_start() {
    let d = daemon_with_cgroups().await;
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let r = c.run(&s, "sleep 1000 & echo $!").await.unwrap();
    let pid = support::printed_pid(&r);
    // Same parent, other socket: it must not "recover" (kill) our live sessions.
    let config = d.dir.path().join("second.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nsocket = \"{}\"\n[cgroups]\nparent = \"{}\"\n",
            d.dir.path().join("second.sock").display(),
            d.cgroup_parent()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sessiond"))
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use by another running sessiond"),
        "{out:?}"
    );
    assert!(alive(pid), "the first daemon's session survived");
    assert_eq!(
        String::from_utf8_lossy(&c.run(&s, "echo still").await.unwrap().stdout),
        "still\n"
    );
    drop(c);
    d.stop();
}
