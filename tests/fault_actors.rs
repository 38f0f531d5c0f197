//! Fault scenarios: actor failures at every level (`debug.fault`). Only the
//! faulty unit dies, every failure is counted, the invariants hold.

mod support;

use std::sync::Arc;

use sessiond::fault::FaultAction;
use support::scenarios::{self as sc};
use support::{Invariants, TestDaemon};

#[tokio::test(flavor = "multi_thread")]
async fn a_command_actor_failure_answers_internal_and_the_session_goes_on() {
    let d = TestDaemon::start("");
    let c = Arc::new(d.client().await);
    let inv = Invariants::baseline(&d, &c).await;
    let s = sc::command_actor_fault(&c, &d.work_dir(), FaultAction::Panic).await;
    inv.check_live(&d, &c).await;
    sc::command_actor_fault(&c, &d.work_dir(), FaultAction::Error).await;
    let stats = c.stats().await.unwrap();
    assert_eq!(stats.runtime.actor_failures_total, 2);
    inv.check_after(&d, &c).await;
    assert!(
        d.log()
            .lines()
            .any(|l| l.contains("CommandActor failed") && l.contains(&s)),
        "the failure is logged with its session"
    );
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_actor_panic_kills_its_cgroup_leaf_at_once() {
    let d = TestDaemon::start("");
    let c = Arc::new(d.client().await);
    let inv = Invariants::baseline(&d, &c).await;
    sc::command_actor_panic_with_setsid_child(&c, &d).await;
    assert_eq!(c.stats().await.unwrap().runtime.actor_failures_total, 1);
    inv.check_after(&d, &c).await;
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_actor_panic_answers_its_waiting_readers_and_stream_internal() {
    let d = TestDaemon::start("");
    let c = d.client().await;
    let inv = Invariants::baseline(&d, &c).await;
    sc::command_panic_with_readers(&c, &d.socket, &d.work_dir()).await;
    assert_eq!(c.stats().await.unwrap().runtime.actor_failures_total, 2);
    inv.check_after(&d, &c).await;
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_actor_failure_loses_that_session_only() {
    let d = TestDaemon::start("");
    let c = Arc::new(d.client().await);
    let inv = Invariants::baseline(&d, &c).await;
    let other = sc::session(&c, None).await;
    c.run(&other, "cd /tmp").await.unwrap();
    let lost = sc::session_actor_fault(&c, &d.work_dir(), FaultAction::Panic).await;
    inv.check_live(&d, &c).await;
    assert!(
        d.log()
            .lines()
            .any(|l| l.contains("session ended unexpectedly") && l.contains(&lost)),
        "the failure is logged with its session"
    );
    sc::session_actor_fault(&c, &d.work_dir(), FaultAction::Error).await;
    // The other session is untouched, state and all.
    assert_eq!(
        c.run(&other, "pwd").await.unwrap().stdout.as_ref(),
        b"/tmp\n"
    );
    let stats = c.stats().await.unwrap();
    assert_eq!(stats.runtime.actor_failures_total, 2);
    assert_eq!(
        stats.sessions.active, 2,
        "the control session and the other one"
    );
    c.destroy_session(&other).await.unwrap();
    inv.check_after(&d, &c).await;
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_session_delays_only_itself() {
    let d = TestDaemon::start("");
    let c = Arc::new(d.client().await);
    let inv = Invariants::baseline(&d, &c).await;
    sc::session_stall(&c).await;
    assert_eq!(c.stats().await.unwrap().runtime.actor_failures_total, 0);
    inv.check_after(&d, &c).await;
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_failure_is_restarted_and_loses_no_session() {
    let d = TestDaemon::start("");
    let c = d.client().await;
    let inv = Invariants::baseline(&d, &c).await;
    let kept = sc::session(&c, None).await;
    // Live before each fault: the control session and `kept`.
    sc::registry_fault(&c, FaultAction::Panic, 2).await;
    inv.check_live(&d, &c).await;
    sc::registry_fault(&c, FaultAction::Error, 2).await;
    c.run(&kept, "true").await.unwrap();
    // Counts survive: the global and per-client tallies were rebuilt.
    let stats = c.stats().await.unwrap();
    assert_eq!(stats.sessions.active, 2);
    assert_eq!(stats.runtime.actor_failures_total, 2);
    c.destroy_session(&kept).await.unwrap();
    inv.check_after(&d, &c).await;
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_spawn_is_spawn_failed_and_the_next_one_works() {
    let d = TestDaemon::start("");
    let c = d.client().await;
    let inv = Invariants::baseline(&d, &c).await;
    sc::spawn_failure(&c).await;
    assert_eq!(c.stats().await.unwrap().commands.spawn_failed_total, 1);
    inv.check_after(&d, &c).await;
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_root_supervisor_failure_is_replaced_by_a_fresh_tree() {
    let d = TestDaemon::start("");
    let c = d.client().await;
    sc::supervisor_fault(&c).await;
    // The control session of the invariants is made in the fresh tree.
    let inv = Invariants::baseline(&d, &c).await;
    let stats = c.stats().await.unwrap();
    assert_eq!(stats.sessions.active, 1);
    assert_eq!(
        stats.runtime.actor_failures_total, 1,
        "the root supervisor's failure, and nothing else, is counted"
    );
    inv.check_after(&d, &c).await;
    drop(c);
    d.stop();
}
