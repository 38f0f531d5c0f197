//! Fault scenarios: hostile commands. Each is bounded in time, checks its own
//! outcome, and then the invariants (ping, a control session, RSS, fds, no
//! process or cgroup left, stats).

mod support;

use support::scenarios::{self as sc};
use support::{Invariants, TestDaemon};

const CONFIG: &str = "[sessions]\nmax_sessions_per_client = 16\n[commands]\nmax_output_bytes = \"1 MiB\"\n[rlimits]\nnofile = 2048\n";

#[tokio::test(flavor = "multi_thread")]
async fn hostile_commands_kill_only_themselves() {
    let d = TestDaemon::start(CONFIG);
    let c = d.client().await;
    let inv = Invariants::baseline(&d, &c).await;
    let before = c.stats().await.unwrap();

    sc::cpu_spin(&c).await;
    inv.check_live(&d, &c).await;
    sc::flood_both_streams(&c, 1 << 20).await;
    inv.check_live(&d, &c).await;
    sc::yes_tail(&c).await;
    inv.check_live(&d, &c).await;
    sc::thousand_files(&c).await;
    sc::daemonizing_child(&c).await;
    sc::term_ignorer(&c).await;
    sc::early_stdout_close(&c).await;
    inv.check_after(&d, &c).await;

    // The counters tell the same story: 3 timeouts (spin, yes, TERM-ignorer),
    // 2 truncated commands (flood, yes), no actor failed.
    let after = c.stats().await.unwrap();
    let delta = |f: fn(&sessiond::protocol::StatsResult) -> u64| f(&after) - f(&before);
    assert_eq!(delta(|s| s.commands.timed_out_total), 3);
    assert_eq!(delta(|s| s.commands.oom_killed_total), 0);
    assert_eq!(delta(|s| s.commands.output_truncated_total), 2);
    assert_eq!(delta(|s| s.runtime.actor_failures_total), 0);
    assert_eq!(delta(|s| s.sessions.destroyed_total), 7);
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and a usable cgroup hierarchy"]
async fn cgroup_limits_contain_memory_hogs_and_fork_bombs() {
    let d = TestDaemon::start(CONFIG);
    let c = d.client().await;
    let inv = Invariants::baseline(&d, &c).await;
    let before = c.stats().await.unwrap();
    assert_ne!(before.runtime.cgroups, "off", "needs cgroups");

    sc::memory_hog(&c).await;
    inv.check_live(&d, &c).await;
    sc::fork_bomb(&c).await;
    inv.check_after(&d, &c).await;

    // 1 OOM kill (the hog), 1 timeout (the fork bomb), no actor failed.
    let after = c.stats().await.unwrap();
    let delta = |f: fn(&sessiond::protocol::StatsResult) -> u64| f(&after) - f(&before);
    assert_eq!(delta(|s| s.commands.oom_killed_total), 1);
    assert_eq!(delta(|s| s.commands.timed_out_total), 1);
    assert_eq!(delta(|s| s.runtime.actor_failures_total), 0);
    assert_eq!(delta(|s| s.sessions.destroyed_total), 2);
    drop(c);
    d.stop();
}
