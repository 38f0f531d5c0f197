//! Fault scenarios: signals to the daemon under load. SIGTERM drains and ends
//! everything cleanly (streaming clients get their final frame or a clean
//! close); SIGKILL loses the sessions, and the next daemon removes whatever
//! the dead one left.

mod support;

use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use sessiond::client::Client;
use sessiond::protocol::{Event, ExecParams, KilledBy};
use support::scenarios::{self as sc};
use support::{
    Invariants, TestDaemon, alive, request, spawn_run, wait_running, wait_until, wait_until_async,
    within,
};

/// Starts `sleep 60` (with a background `sleep 300`) in `n` new sessions; returns the sessions, every pid and the runs.
async fn load(
    d: &TestDaemon,
    c: &Arc<Client>,
    n: usize,
    command: &str,
) -> (
    Vec<String>,
    Vec<i32>,
    Vec<
        tokio::task::JoinHandle<
            Result<sessiond::protocol::ExecResult, sessiond::client::ClientError>,
        >,
    >,
) {
    let (mut sessions, mut pids, mut runs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        let s = sc::session(c, None).await;
        let r = c.run(&s, "setsid sleep 300 & echo $!").await.unwrap();
        pids.push(support::printed_pid(&r));
        let pidfile = d.work_dir().join(format!("{s}.pid"));
        runs.push(spawn_run(
            c,
            &s,
            &format!("echo $$ > {}; {command}", pidfile.display()),
        ));
        pids.push(sc::read_pid_file(&pidfile).await);
        sessions.push(s);
    }
    (sessions, pids, runs)
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_load_drains_then_ends_everything_cleanly() {
    let mut d = TestDaemon::start(
        "[server]\nshutdown_grace = \"5s\"\n[sessions]\nmax_sessions_per_client = 16\n",
    );
    let c = Arc::new(d.client().await);
    let (_, long_pids, long_runs) = load(&d, &c, 4, "sleep 60").await;
    let (_, flood_pids, flood_runs) = load(&d, &c, 2, "cat /dev/zero").await;
    let (_, short_pids, short_runs) = load(
        &d,
        &c,
        2,
        "while [ ! -e $PWD/go ]; do sleep 0.01; done; echo fin",
    )
    .await;
    // A client hammering ping all the while.
    let pings = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let pinger = {
        let (c, pings) = (d.client().await, pings.clone());
        tokio::spawn(async move {
            while c.ping().await.is_ok() {
                pings.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        })
    };

    d.signal(Signal::SIGTERM);
    wait_until_async("the daemon drains", Duration::from_secs(10), || async {
        c.stats().await.unwrap().runtime.draining
    })
    .await;
    // Draining: the pinging client goes on being answered...
    let seen = pings.load(std::sync::atomic::Ordering::SeqCst);
    wait_until_async(
        "pings answered while draining",
        Duration::from_secs(5),
        || async { pings.load(std::sync::atomic::Ordering::SeqCst) > seen + 10 },
    )
    .await;
    // ...and new work is refused.
    assert_eq!(
        c.create_session(Default::default())
            .await
            .unwrap_err()
            .code(),
        Some("SHUTTING_DOWN")
    );
    // Commands that finish within the grace answer normally...
    std::fs::write(d.work_dir().join("go"), "").unwrap();
    for run in short_runs {
        let r = run.await.unwrap().unwrap();
        assert_eq!((r.exit_code, r.stdout.as_ref()), (Some(0), &b"fin\n"[..]));
    }
    // ...the rest is killed at the grace's end, and says so.
    for run in long_runs.into_iter().chain(flood_runs) {
        let r = run.await.unwrap().unwrap();
        assert_eq!(r.killed_by, Some(KilledBy::Shutdown), "{r:?}");
    }
    d.check_clean_exit();
    pinger.await.unwrap();
    for pid in long_pids.iter().chain(&flood_pids).chain(&short_pids) {
        assert!(!alive(*pid), "process {pid} outlived the daemon");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_while_commands_stream_gives_every_streamer_its_end() {
    let mut d = TestDaemon::start(
        "[server]\nshutdown_grace = \"2s\"\n[sessions]\nmax_sessions_per_client = 16\n",
    );
    let c = d.client().await;
    // Three clients streaming and reading along, each on its own connection.
    let mut streamers = Vec::new();
    for _ in 0..3 {
        let s = sc::session(&c, None).await;
        let client = d.client().await;
        let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
        streamers.push((
            tokio::spawn(async move {
                let mut stream = client
                    .exec_stream(ExecParams {
                        session_id: s,
                        command: "while :; do echo tick; sleep 0.05; done".into(),
                        ..Default::default()
                    })
                    .await?;
                let mut seen_tx = Some(seen_tx);
                while let Some(event) = stream.next_event().await? {
                    if matches!(event, Event::Output { .. }) {
                        if let Some(tx) = seen_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                }
                stream.result().await
            }),
            seen_rx,
        ));
    }
    // One streaming a flood and never reading.
    let s = sc::session(&c, None).await;
    let mut idle = d.raw();
    idle.send(&request(
        1,
        "exec.run",
        vec![
            ("session_id", s.as_str().into()),
            ("command", "cat /dev/zero".into()),
            ("stream", true.into()),
        ],
    ));
    for (_, seen) in &mut streamers {
        within(Duration::from_secs(20), "a streamer's first output", seen)
            .await
            .expect("output before the SIGTERM");
    }
    wait_running(&c, 4).await;

    d.signal(Signal::SIGTERM);
    // Every reading streamer gets its result: killed at the grace's end.
    for (run, _) in streamers {
        let r = within(Duration::from_secs(30), "a streamer's final frame", run)
            .await
            .unwrap()
            .expect("the result, not a lost connection");
        assert_eq!(r.killed_by, Some(KilledBy::Shutdown), "{r:?}");
    }
    // The non-reader's connection ends (after whatever it was sent), never hangs.
    let drained = support::blocking(move || idle.read_until_closed()).await;
    assert!(
        drained.is_ok(),
        "the non-reader's connection was kept: {drained:?}"
    );
    drop(c);
    d.check_clean_exit();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and a usable cgroup hierarchy"]
async fn sigkill_under_load_then_restart_removes_what_the_dead_daemon_left() {
    let mut d = TestDaemon::start("[sessions]\nmax_sessions_per_client = 16\n");
    let c = Arc::new(d.client().await);
    // Without cgroups nothing marks a dead daemon's processes as its own.
    assert_ne!(
        c.stats().await.unwrap().runtime.cgroups,
        "off",
        "crash recovery needs cgroups"
    );
    let (sessions, mut pids, runs) = load(&d, &c, 4, "sleep 60").await;
    let (flood_sessions, flood_pids, flood_runs) = load(&d, &c, 2, "cat /dev/zero").await;
    pids.extend(flood_pids);

    d.crash_and_restart();
    // The dead daemon's clients lose their connection, not their minds.
    for run in runs.into_iter().chain(flood_runs) {
        assert!(run.await.unwrap().is_err());
    }
    wait_until(
        "every process of the dead daemon's sessions is killed",
        Duration::from_secs(10),
        || pids.iter().all(|p| !alive(*p)),
    );
    let c = Arc::new(d.client().await);
    let stats = c.stats().await.unwrap();
    assert_eq!(stats.runtime.cgroups_recovered_total, 6);
    assert_eq!(stats.sessions.active, 0);
    for s in sessions.iter().chain(&flood_sessions) {
        assert_eq!(
            c.run(s, "true").await.unwrap_err().code(),
            Some("SESSION_NOT_FOUND")
        );
    }
    // The new daemon serves as if nothing happened.
    let inv = Invariants::baseline(&d, &c).await;
    let s = sc::session(&c, None).await;
    sc::normal_work(&c, &s, 1).await;
    c.destroy_session(&s).await.unwrap();
    inv.check_after(&d, &c).await;
    drop(c);
    d.stop();
}
