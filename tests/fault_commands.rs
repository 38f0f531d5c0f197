//! Fault scenarios: hostile commands. Each is bounded in time, checks its own
//! outcome, and then the invariants (ping, a control session, RSS, fds, no
//! process or cgroup left, stats).

mod support;

use support::scenarios::{self as sc};
use support::{Invariants, TestDaemon};

#[tokio::test(flavor = "multi_thread")]
async fn hostile_commands_kill_only_themselves() {
    let d = TestDaemon::start(
        "[sessions]\nmax_sessions_per_client = 16\n[commands]\nmax_output_bytes = \"1 MiB\"\n[rlimits]\nnofile = 2048\n",
    );
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
    inv.check_live(&d, &c).await;
    let cgroups = before.runtime.cgroups != "off";
    if cgroups {
        sc::memory_hog(&c).await;
        sc::fork_bomb(&c).await;
    } else {
        eprintln!("note: cgroups are off here; the memory-hog and fork-bomb scenarios need them");
    }
    inv.check_after(&d, &c).await;

    // The counters tell the same story: 4 timeouts (spin, yes, TERM-ignorer,
    // fork bomb), 1 OOM kill, 2 truncated commands (flood, yes), no actor failed.
    let after = c.stats().await.unwrap();
    let delta = |f: fn(&sessiond::protocol::StatsResult) -> u64| f(&after) - f(&before);
    let with_cgroups = u64::from(cgroups);
    assert_eq!(delta(|s| s.commands.timed_out_total), 3 + with_cgroups);
    assert_eq!(delta(|s| s.commands.oom_killed_total), with_cgroups);
    assert_eq!(delta(|s| s.commands.output_truncated_total), 2);
    assert_eq!(delta(|s| s.runtime.actor_failures_total), 0);
    assert_eq!(delta(|s| s.sessions.destroyed_total), 7 + 2 * with_cgroups);
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_cannot_touch_another_session() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: uid-per-session needs a root daemon");
        return;
    }
    let d = TestDaemon::start_isolated(4, "");
    let c = d.client().await;
    let inv = Invariants::baseline(&d, &c).await;
    sc::touch_another_session(&c).await;
    inv.check_after(&d, &c).await;
    drop(c);
    d.stop();
}
