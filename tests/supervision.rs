//! Supervision with injected faults (`debug.fault`): only the faulty unit dies, the daemon goes on.

mod support;

use std::sync::Arc;
use std::time::Duration;

use sessiond::client::Client;
use sessiond::fault::{FaultAction, FaultParams, FaultResult, FaultTarget};
use sessiond::protocol::CreateParams;
use support::{TestDaemon, alive, wait_dead, wait_until, wait_until_async};

async fn inject(
    c: &Client,
    target: FaultTarget,
    action: FaultAction,
    session: Option<&str>,
) -> u64 {
    let r: FaultResult = c
        .call(
            "debug.fault",
            FaultParams {
                target,
                action,
                session_id: session.map(str::to_string),
                stall_ms: None,
            },
        )
        .await
        .unwrap();
    r.injected
}

fn read_pid(d: &TestDaemon, file: &str) -> i32 {
    let path = d.work_dir().join(file);
    wait_until(
        &format!("{file} is written"),
        Duration::from_secs(10),
        || std::fs::read_to_string(&path).is_ok_and(|s| s.ends_with('\n')),
    );
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_actor_failure_answers_internal_and_the_session_goes_on() {
    let d = TestDaemon::start("");
    let c = Arc::new(d.client().await);
    let s = c.create_session(CreateParams::default()).await.unwrap();
    c.run(&s, "cd /tmp").await.unwrap();
    for (n, action) in [FaultAction::Panic, FaultAction::Error]
        .into_iter()
        .enumerate()
    {
        let pidfile = format!("shell{n}.pid");
        let runner = {
            let (c, s, cmd) = (
                c.clone(),
                s.clone(),
                format!("echo $$ > {}/{pidfile}; sleep 60", d.work_dir().display()),
            );
            tokio::spawn(async move { c.run(&s, &cmd).await })
        };
        let shell = read_pid(&d, &pidfile);
        assert_eq!(inject(&c, FaultTarget::Command, action, Some(&s)).await, 1);
        let e = runner.await.unwrap().unwrap_err();
        assert_eq!(e.code(), Some("INTERNAL"), "{action:?}");
        wait_dead(shell, "the failed command's process is killed");
        // The session is usable, its state intact.
        let r = c.run(&s, "pwd").await.unwrap();
        assert_eq!(String::from_utf8_lossy(&r.stdout), "/tmp\n");
    }
    let stats = c.stats().await.unwrap();
    assert_eq!(stats.runtime.actor_failures_total, 2);
    assert_eq!(
        stats.commands.running, 0,
        "the failed commands' slots came back"
    );
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_actor_failure_loses_that_session_only() {
    let d = TestDaemon::start("");
    let c = Arc::new(d.client().await);
    let doomed = c.create_session(CreateParams::default()).await.unwrap();
    let other = c.create_session(CreateParams::default()).await.unwrap();
    let r = c.run(&doomed, "sleep 300 & echo $!").await.unwrap();
    let background: i32 = String::from_utf8_lossy(&r.stdout).trim().parse().unwrap();
    let runner = {
        let (c, s, cmd) = (
            c.clone(),
            doomed.clone(),
            format!("echo $$ > {}/shell.pid; sleep 60", d.work_dir().display()),
        );
        tokio::spawn(async move { c.run(&s, &cmd).await })
    };
    let shell = read_pid(&d, "shell.pid");
    inject(&c, FaultTarget::Session, FaultAction::Panic, Some(&doomed)).await;

    assert_eq!(runner.await.unwrap().unwrap_err().code(), Some("INTERNAL"));
    wait_until(
        "the session's processes are killed",
        Duration::from_secs(5),
        || !alive(shell) && !alive(background),
    );
    wait_until_async(
        "the session is unlisted",
        Duration::from_secs(5),
        || async { c.run(&doomed, "true").await.unwrap_err().code() == Some("SESSION_NOT_FOUND") },
    )
    .await;
    // The other session is untouched.
    assert_eq!(
        String::from_utf8_lossy(&c.run(&other, "echo ok").await.unwrap().stdout),
        "ok\n"
    );
    let stats = c.stats().await.unwrap();
    assert_eq!(stats.sessions.active, 1);
    assert_eq!(stats.runtime.actor_failures_total, 1);
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_failure_is_restarted_and_loses_no_session() {
    let d = TestDaemon::start("");
    let c = d.client().await;
    let a = c.create_session(CreateParams::default()).await.unwrap();
    let b = c.create_session(CreateParams::default()).await.unwrap();
    c.run(&a, "cd /tmp; export KEPT=yes").await.unwrap();
    inject(&c, FaultTarget::Registry, FaultAction::Panic, None).await;
    wait_until_async(
        "the restarted registry serves",
        Duration::from_secs(10),
        || async { c.list_sessions().await.is_ok_and(|l| l.sessions.len() == 2) },
    )
    .await;
    let r = c.run(&a, "pwd; echo $KEPT").await.unwrap();
    assert_eq!(String::from_utf8_lossy(&r.stdout), "/tmp\nyes\n");
    c.run(&b, "true").await.unwrap();
    // Counts survive: the per-client and global tallies were rebuilt.
    let stats = c.stats().await.unwrap();
    assert_eq!(stats.sessions.active, 2);
    assert_eq!(stats.runtime.actor_failures_total, 1);
    c.destroy_session(&a).await.unwrap();
    assert_eq!(c.stats().await.unwrap().sessions.active, 1);
    // A registry that returns an error is restarted the same way.
    inject(&c, FaultTarget::Registry, FaultAction::Error, None).await;
    wait_until_async(
        "the registry serves again",
        Duration::from_secs(10),
        || async { c.list_sessions().await.is_ok_and(|l| l.sessions.len() == 1) },
    )
    .await;
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_spawn_is_spawn_failed_and_the_next_one_works() {
    let d = TestDaemon::start("");
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    inject(&c, FaultTarget::Spawn, FaultAction::Error, None).await;
    assert_eq!(
        c.run(&s, "true").await.unwrap_err().code(),
        Some("SPAWN_FAILED")
    );
    c.run(&s, "true").await.unwrap();
    assert_eq!(c.stats().await.unwrap().commands.spawn_failed_total, 1);
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_root_supervisor_failure_is_replaced_by_a_fresh_tree() {
    let d = TestDaemon::start("");
    let c = d.client().await;
    let old = c.create_session(CreateParams::default()).await.unwrap();
    let r = c.run(&old, "sleep 300 & echo $!").await.unwrap();
    let pid: i32 = String::from_utf8_lossy(&r.stdout).trim().parse().unwrap();
    inject(&c, FaultTarget::Supervisor, FaultAction::Panic, None).await;
    // The whole old tree is gone, its processes with it...
    wait_dead(pid, "the old tree's session processes are killed");
    // ...and a fresh tree serves: new sessions work, old ones are unknown.
    wait_until_async("the fresh tree serves", Duration::from_secs(10), || async {
        c.create_session(CreateParams::default()).await.is_ok()
    })
    .await;
    assert_eq!(
        c.run(&old, "true").await.unwrap_err().code(),
        Some("SESSION_NOT_FOUND")
    );
    let stats = c.stats().await.unwrap();
    assert_eq!(stats.sessions.active, 1);
    assert!(stats.runtime.actor_failures_total >= 1);
    drop(c);
    d.stop();
}
