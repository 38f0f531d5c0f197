//! Fault scenarios: hostile commands. Each is bounded in time, checks its own
//! outcome, and then the invariants (ping, a control session, RSS, fds, no
//! process or cgroup left, stats). Issue 14's command attacks (16 floods at
//! once, background writers, a timeout's timing) have a test of their own,
//! and so does the harness's promise that a failed test leaves no command
//! behind.

mod support;

use sessiond::client::Client;
use sessiond::protocol::StatsResult;
use support::scenarios::{self as sc};
use support::{Invariants, KillOnDrop, TestDaemon};

/// A `system.stats` counter, by name.
type Counter = (&'static str, fn(&StatsResult) -> u64);
const TIMED_OUT: Counter = ("timed_out_total", |s| s.commands.timed_out_total);
const OOM_KILLED: Counter = ("oom_killed_total", |s| s.commands.oom_killed_total);
const TRUNCATED: Counter = ("output_truncated_total", |s| {
    s.commands.output_truncated_total
});
const DESTROYED: Counter = ("destroyed_total", |s| s.sessions.destroyed_total);
const ACTOR_FAILURES: Counter = ("actor_failures_total", |s| s.runtime.actor_failures_total);

/// A daemon for the scenarios, a client, the invariants' baseline and the stats before.
struct Harness {
    d: TestDaemon,
    c: Client,
    inv: Invariants,
    before: StatsResult,
}

/// A counter and how much the scenarios moved it.
type Moved = (Counter, u64);

impl Harness {
    async fn start() -> Harness {
        Self::start_with("").await
    }

    /// With `commands`: more lines of the config's `[commands]` table.
    async fn start_with(commands: &str) -> Harness {
        let d = TestDaemon::start(&format!(
            "[sessions]\nmax_sessions_per_client = 24\n[rlimits]\nnofile = 2048\n[commands]\nmax_output_bytes = \"1 MiB\"\n{commands}"
        ));
        let c = d.client().await;
        let inv = Invariants::baseline(&d, &c).await;
        let before = c.stats().await.unwrap();
        Harness { d, c, inv, before }
    }

    /// Between scenarios: the service goes on.
    async fn check_live(&self) {
        self.inv.check_live(&self.d, &self.c).await;
    }

    /// After the scenarios: nothing of them is left, the counters moved by
    /// exactly `moved` (every other one of them by 0: no actor failed), and
    /// the daemon stops cleanly.
    async fn finish(self, moved: &[Moved]) {
        let Harness { d, c, inv, before } = self;
        inv.check_after(&d, &c).await;
        let after = c.stats().await.unwrap();
        for (name, counter) in [TIMED_OUT, OOM_KILLED, TRUNCATED, DESTROYED, ACTOR_FAILURES] {
            let want = moved.iter().find(|m| m.0.0 == name).map_or(0, |m| m.1);
            assert_eq!(counter(&after) - counter(&before), want, "{name}");
        }
        drop(c);
        d.stop();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_commands_kill_only_themselves() {
    let h = Harness::start().await;
    sc::cpu_spin(&h.c).await;
    h.check_live().await;
    sc::flood_both_streams(&h.c, 1 << 20).await;
    h.check_live().await;
    let yes_truncated = sc::yes_tail(&h.c, 1 << 20).await;
    h.check_live().await;
    sc::thousand_files(&h.c).await;
    sc::daemonizing_child(&h.c).await;
    sc::term_ignorer(&h.c).await;
    sc::early_stdout_close(&h.c).await;
    // Timeouts: spin, yes, TERM-ignorer; truncated: flood, yes (when it
    // wrote past the cap in its time); one session each.
    h.finish(&[
        (TIMED_OUT, 3),
        (TRUNCATED, 1 + u64::from(yes_truncated)),
        (DESTROYED, 7),
    ])
    .await;
}

/// Issue 14's command-side attacks: 16 commands flooding both streams (RSS
/// sampled throughout), background writers on both streams after the
/// answer, a 1 s timeout on `sleep 10` with a 4 s grace (a kill that waited
/// for a zombie answered about the grace after the command died).
#[tokio::test(flavor = "multi_thread")]
async fn commands_that_strain_the_daemon_stay_within_its_bounds() {
    const GRACE: std::time::Duration = std::time::Duration::from_secs(4);
    let h = Harness::start_with(&format!(
        "kill_grace = \"{}s\"\nmax_concurrent = 24\n",
        GRACE.as_secs()
    ))
    .await;
    sc::flood_many(&h.d.socket, 16, 1 << 20, (h.d.pid(), h.inv.rss_bound)).await;
    h.check_live().await;
    let truncated = sc::background_writers(&h.c, &h.d.work_dir()).await;
    h.check_live().await;
    sc::timeout_on_time(&h.c, &h.d.work_dir(), GRACE).await;
    h.finish(&[
        (TIMED_OUT, 1),
        (TRUNCATED, 16 + u64::from(truncated)),
        (DESTROYED, 18),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and a usable cgroup hierarchy"]
async fn cgroup_limits_contain_memory_hogs_and_fork_bombs() {
    let h = Harness::start().await;
    assert_ne!(h.before.runtime.cgroups, "off", "needs cgroups");
    sc::memory_hog(&h.c).await;
    h.check_live().await;
    sc::fork_bomb(&h.c).await;
    // The hog is OOM-killed, the fork bomb times out; one session each.
    h.finish(&[(OOM_KILLED, 1), (TIMED_OUT, 1), (DESTROYED, 2)])
        .await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (uid-per-session); CI runs it"]
async fn a_command_cannot_touch_another_session() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "uid-per-session needs a root daemon"
    );
    let d = TestDaemon::start_isolated(4, "");
    let c = d.client().await;
    let inv = Invariants::baseline(&d, &c).await;
    sc::touch_another_session(&c).await;
    inv.check_after(&d, &c).await;
    drop(c);
    d.stop();
}

/// The harness itself: a test that fails while a command that is only its
/// shell spins (a builtin loop; its shell's environment holds no tag — the
/// session unsets it too, should the tag ever travel there — so
/// `tagged_pids` cannot see it) leaves nothing behind: dropping its
/// `TestDaemon`, as a panicking test does, kills the shell, with cgroups on
/// and off. (It once left the spinners of a failed measurement, and a failed
/// soak's TERM-ignoring loop, running for good.)
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_test_leaves_no_command_shell_behind() {
    for extra in ["", "[cgroups]\nmode = \"off\"\n"] {
        let d = TestDaemon::start(extra);
        let c = d.client().await;
        let s = sc::session(&c, None).await;
        c.run(&s, "unset SESSIOND_TEST_TAG").await.expect("unset");
        let pidfile = d.work_dir().join("spin.pid");
        c.start(sessiond::protocol::ExecParams {
            session_id: s,
            command: format!("echo $$ > {}; while :; do :; done", pidfile.display()),
            timeout_s: Some(60.0),
            ..Default::default()
        })
        .await
        .expect("exec.start");
        let shell = sc::read_pid_file(&pidfile).await;
        let _kill = KillOnDrop(vec![shell as u32]);
        assert!(
            !support::tagged_pids(&d.tag).contains(&shell),
            "the shell carries the tag: this test would prove nothing"
        );
        drop(c);
        drop(d);
        sc::wait_dead(shell, "the spinning shell dies with its test daemon").await;
    }
}
