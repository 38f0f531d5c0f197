//! Fault scenarios: hostile commands. Each is bounded in time, checks its own
//! outcome, and then the invariants (ping, a control session, RSS, fds, no
//! process left).

mod support;

use sessiond::client::Client;
use sessiond::protocol::{
    CreateParams, ExecParams, ExecResult, KeepOutput, KilledBy, SessionLimits,
};
use support::{Invariants, TestDaemon};

async fn hostile(
    c: &Client,
    limits: Option<SessionLimits>,
    params: ExecParams,
) -> (String, ExecResult) {
    let s = c
        .create_session(CreateParams {
            limits,
            ..Default::default()
        })
        .await
        .unwrap();
    let r = c
        .exec(ExecParams {
            session_id: s.clone(),
            ..params
        })
        .await
        .unwrap();
    (s, r)
}

fn cmd(command: &str, timeout_s: f64) -> ExecParams {
    ExecParams {
        command: command.into(),
        timeout_s: Some(timeout_s),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_commands_kill_only_themselves() {
    let d = TestDaemon::start(
        "[sessions]\nmax_sessions_per_client = 16\n[commands]\nmax_output_bytes = \"1 MiB\"\n[rlimits]\nnofile = 2048\n",
    );
    let c = d.client().await;
    let inv = Invariants::baseline(&d, &c).await;
    let cgroups = c.stats().await.unwrap().runtime.cgroups != "off";
    let mut sessions = Vec::new();

    // CPU spin: ended by its timeout.
    let (s, r) = hostile(&c, None, cmd("while :; do :; done", 0.5)).await;
    assert!(r.timed_out);
    sessions.push(s);
    inv.check_live(&d, &c).await;

    // Output flood on both streams at once: capped, drained, counted.
    let (s, r) = hostile(
        &c,
        None,
        cmd(
            "head -c 20000000 /dev/zero & head -c 20000000 /dev/zero >&2; wait",
            30.0,
        ),
    )
    .await;
    assert_eq!((r.stdout.len(), r.stderr.len()), (1 << 20, 1 << 20));
    assert_eq!(
        (r.stdout_total_bytes, r.stderr_total_bytes),
        (20_000_000, 20_000_000)
    );
    sessions.push(s);
    inv.check_live(&d, &c).await;

    // `yes` with keep_output tail: the last bytes, until the timeout.
    let (s, r) = hostile(
        &c,
        None,
        ExecParams {
            keep_output: Some(KeepOutput::Tail),
            ..cmd("yes", 0.5)
        },
    )
    .await;
    assert!(r.timed_out && r.stdout_truncated);
    assert!(
        r.stdout.ends_with(b"y\n") || r.stdout.ends_with(b"y"),
        "tail kept"
    );
    sessions.push(s);
    inv.check_live(&d, &c).await;

    // A thousand open files.
    let (s, r) = hostile(
        &c,
        None,
        cmd(
            "for i in $(seq 1 1000); do exec {fd}</dev/null || exit 9; done; echo opened",
            30.0,
        ),
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&r.stdout), "opened\n");
    sessions.push(s);

    // A daemonizing child (double fork + setsid) outlives its command, not its session.
    let (s, r) = hostile(&c, None, cmd("setsid sh -c 'sleep 1000 & echo $!'", 10.0)).await;
    let pid: i32 = String::from_utf8_lossy(&r.stdout).trim().parse().unwrap();
    assert!(support::alive(pid));
    sessions.push(s);

    // Ignores SIGTERM: SIGKILL after the grace.
    let (s, r) = hostile(
        &c,
        None,
        cmd("trap '' TERM; while :; do sleep 0.05; done", 0.3),
    )
    .await;
    assert_eq!(r.signal, Some(9));
    sessions.push(s);

    // Closes its stdout early and goes on: the answer still waits for its exit.
    let (s, r) = hostile(&c, None, cmd("exec >&-; sleep 0.2; echo done >&2", 10.0)).await;
    assert_eq!(
        (r.exit_code, String::from_utf8_lossy(&r.stderr).into_owned()),
        (Some(0), "done\n".into())
    );
    sessions.push(s);

    if cgroups {
        // Memory hog: killed by its session's memory limit.
        let (s, r) = hostile(
            &c,
            Some(SessionLimits {
                memory_max_bytes: Some(64 << 20),
                ..Default::default()
            }),
            cmd("head -c 300M /dev/zero | tail > /dev/null", 30.0),
        )
        .await;
        assert_eq!(r.killed_by, Some(KilledBy::MemoryLimit));
        sessions.push(s);
        // Bounded fork bomb: contained by pids.max, ended by its timeout.
        let (s, r) = hostile(
            &c,
            Some(SessionLimits {
                pids_max: Some(32),
                ..Default::default()
            }),
            cmd("b() { b | b & }; b; sleep 5", 2.0),
        )
        .await;
        assert!(r.timed_out);
        sessions.push(s);
    } else {
        eprintln!("note: cgroups are off here; the memory-hog and fork-bomb scenarios need them");
    }
    inv.check_live(&d, &c).await;

    for s in sessions {
        c.destroy_session(&s).await.unwrap();
    }
    support::wait_dead(pid, "the daemonized child dies with its session");
    inv.check_after(&d, &c).await;
    drop(c);
    d.stop();
}
