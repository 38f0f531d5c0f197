//! exec.run and exec.cancel against the real daemon: results, shell state, timeouts, caps, stdin, background children, refusals (hostile commands and a client hanging up mid-exec are in the fault_* scenarios).

mod support;

use std::time::Duration;

use serde_bytes::ByteBuf;
use sessiond::protocol::{CreateParams, ExecParams, KeepOutput, KilledBy};
use support::{TestDaemon, alive, spawn_run, wait_dead, wait_running, wait_until};

fn exec(session: &str, command: &str) -> ExecParams {
    ExecParams {
        session_id: session.into(),
        command: command.into(),
        ..Default::default()
    }
}

fn text(b: &ByteBuf) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_a_command_and_reports_exit_code_and_streams() {
    let d = TestDaemon::start("");
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let r = c.run(&s, "echo out; echo err >&2; exit 7").await.unwrap();
    assert_eq!(r.exit_code, Some(7));
    assert_eq!(r.signal, None);
    assert_eq!(text(&r.stdout), "out\n");
    assert_eq!(text(&r.stderr), "err\n");
    assert_eq!((r.stdout_total_bytes, r.stderr_total_bytes), (4, 4));
    assert!(!r.timed_out && r.killed_by.is_none());
    assert!(r.cpu_ms.is_some() && r.max_rss_bytes.unwrap() > 0);

    // cpu_ms comes from the rusage of the shell and its children.
    let r = c
        .run(&s, "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done")
        .await
        .unwrap();
    assert!(
        r.cpu_ms.unwrap() > 0,
        "a CPU-bound loop used some CPU: {r:?}"
    );
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn shell_state_persists_between_commands() {
    let d = TestDaemon::start("");
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let r = c
        .run(&s, "cd /tmp && export A=1 B='two words'")
        .await
        .unwrap();
    assert_eq!(r.cwd, "/tmp");
    let r = c.run(&s, "pwd; echo \"$A|$B\"").await.unwrap();
    assert_eq!(text(&r.stdout), "/tmp\n1|two words\n");

    // A command that exits with an error code still leaves its state...
    c.run(&s, "cd /usr; export C=3; false").await.unwrap();
    // ...and so does `exit N` inside the command.
    let r = c.run(&s, "cd /; unset A; exit 4").await.unwrap();
    assert_eq!(r.exit_code, Some(4));
    let r = c.run(&s, "pwd; echo \"A=${A-unset} C=$C\"").await.unwrap();
    assert_eq!(text(&r.stdout), "/\nA=unset C=3\n");
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_command_leaves_the_state_unchanged() {
    let d = TestDaemon::start("");
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    c.run(&s, "cd /tmp; export K=before").await.unwrap();
    let r = c
        .exec(ExecParams {
            timeout_s: Some(0.3),
            ..exec(&s, "cd /usr; export K=after; sleep 30")
        })
        .await
        .unwrap();
    assert!(r.timed_out);
    assert_eq!(r.cwd, "/tmp");
    let r = c.run(&s, "pwd; echo $K").await.unwrap();
    assert_eq!(text(&r.stdout), "/tmp\nbefore\n");
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn environment_is_base_plus_session_plus_request_only() {
    let d = TestDaemon::start("");
    let c = d.client().await;
    let s = c
        .create_session(CreateParams {
            env: Some([("SESS".to_string(), "s".to_string())].into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let r = c
        .exec(ExecParams {
            env: Some([("REQ".to_string(), "r".to_string())].into()),
            ..exec(
                &s,
                "echo \"$SESS $REQ ${SESSIOND_DAEMON_SECRET-absent} $LANG\"; echo $HOME",
            )
        })
        .await
        .unwrap();
    let out = text(&r.stdout);
    assert!(out.starts_with("s r absent C.UTF-8\n"), "{out}");
    assert!(
        out.lines().nth(1).is_some_and(|h| h.starts_with('/')),
        "HOME is set: {out}"
    );
    // The request's env is for that command only.
    let r = c.run(&s, "echo \"${REQ-gone}\"").await.unwrap();
    assert_eq!(text(&r.stdout), "gone\n");
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn timeout_kills_the_group_and_keeps_output_so_far() {
    let d = TestDaemon::start("");
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let r = c
        .exec(ExecParams {
            // Long enough for a slow shell to get to its `sleep`.
            timeout_s: Some(3.0),
            ..exec(&s, "echo started; sleep 30 & echo $! > child.pid; sleep 30")
        })
        .await
        .unwrap();
    assert!(r.timed_out);
    assert_eq!(r.killed_by, Some(KilledBy::Timeout));
    assert_eq!(r.exit_code, None);
    assert_eq!(r.signal, Some(15), "SIGTERM ended the shell");
    assert_eq!(text(&r.stdout), "started\n");
    let pid: i32 = std::fs::read_to_string(d.work_dir().join("child.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_dead(pid, "the timed-out command's child is dead");
    let stats = c.stats().await.unwrap();
    assert_eq!(stats.commands.timed_out_total, 1);
    assert_eq!(stats.commands.killed_total, 1);
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn timeouts_over_the_maximum_are_invalid() {
    let d = TestDaemon::start("[commands]\nmax_timeout = \"10s\"\ndefault_timeout = \"5s\"\n");
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let e = c
        .exec(ExecParams {
            timeout_s: Some(11.0),
            ..exec(&s, "true")
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("INVALID_REQUEST"));
    assert!(e.to_string().contains("timeout_s"), "{e}");
    let e = c
        .exec(ExecParams {
            timeout_s: Some(-1.0),
            ..exec(&s, "true")
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("INVALID_REQUEST"));
    assert_eq!(c.stats().await.unwrap().commands.started_total, 0);
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn output_is_capped_in_all_three_keep_modes_and_drained() {
    let d = TestDaemon::start("[commands]\nmax_output_bytes = 10\n");
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let cmd = "printf 0123456789abcdefghij; printf ABCDEFGHIJKLMNOPQRST >&2";
    // The last column: where in the kept bytes the dropped ones were.
    for (keep, out, err, cut) in [
        (None, "0123456789", "ABCDEFGHIJ", 10),
        (Some(KeepOutput::Head), "0123456789", "ABCDEFGHIJ", 10),
        (Some(KeepOutput::Tail), "abcdefghij", "KLMNOPQRST", 0),
        (Some(KeepOutput::Both), "01234fghij", "ABCDEPQRST", 5),
    ] {
        let r = c
            .exec(ExecParams {
                keep_output: keep,
                ..exec(&s, cmd)
            })
            .await
            .unwrap();
        assert_eq!(
            (text(&r.stdout).as_str(), text(&r.stderr).as_str()),
            (out, err),
            "{keep:?}"
        );
        assert!(r.stdout_truncated && r.stderr_truncated);
        assert_eq!((r.stdout_total_bytes, r.stderr_total_bytes), (20, 20));
        assert_eq!(
            (r.stdout_cut_at, r.stderr_cut_at),
            (Some(cut), Some(cut)),
            "{keep:?}"
        );
    }
    let whole = c.run(&s, "echo short").await.unwrap();
    assert_eq!((whole.stdout_cut_at, whole.stderr_cut_at), (None, None));
    // 50 MB through a 10-byte cap: the command never blocks on a full pipe.
    let r = c
        .run(&s, "head -c 50000000 /dev/zero; echo done >&2")
        .await
        .unwrap();
    assert_eq!(r.exit_code, Some(0));
    assert_eq!(r.stdout_total_bytes, 50_000_000);
    assert_eq!(r.stdout.len(), 10);
    assert_eq!(text(&r.stderr), "done\n");
    assert_eq!(c.stats().await.unwrap().commands.output_truncated_total, 5);
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn stdin_is_fed_then_closed_and_capped() {
    let d = TestDaemon::start("[commands]\nmax_stdin_bytes = 1024\n");
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let r = c
        .exec(ExecParams {
            stdin: Some(ByteBuf::from(b"line one\nline two\n".to_vec())),
            ..exec(&s, "wc -l; cat")
        })
        .await
        .unwrap();
    assert_eq!(text(&r.stdout).trim(), "2");
    // Without stdin the command reads EOF at once.
    let r = c.run(&s, "cat; echo eof").await.unwrap();
    assert_eq!(text(&r.stdout), "eof\n");
    // Over the cap: refused, nothing spawned.
    let before = c.stats().await.unwrap().commands.started_total;
    let e = c
        .exec(ExecParams {
            stdin: Some(ByteBuf::from(vec![b'x'; 1025])),
            ..exec(&s, "touch spawned")
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("STDIN_TOO_LARGE"));
    assert_eq!(c.stats().await.unwrap().commands.started_total, before);
    assert!(!d.work_dir().join("spawned").exists());
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_background_child_does_not_hold_the_answer_and_dies_with_the_session() {
    let d = TestDaemon::start("");
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    // The answer must come long before `sleep 300` ends (the test would hang otherwise).
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        c.run(&s, "sleep 300 & echo $!; echo more"),
    )
    .await
    .expect("the answer did not wait for the background child")
    .unwrap();
    let mut lines = text(&r.stdout)
        .lines()
        .map(str::to_string)
        .collect::<Vec<_>>()
        .into_iter();
    let pid: i32 = lines.next().unwrap().parse().unwrap();
    assert_eq!(lines.next().as_deref(), Some("more"));
    assert!(
        alive(pid),
        "the background child lives on until the session ends"
    );
    c.destroy_session(&s).await.unwrap();
    wait_dead(pid, "the background child dies with its session");
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_kills_the_running_command() {
    let d = TestDaemon::start("");
    let c = std::sync::Arc::new(d.client().await);
    let s = c.create_session(CreateParams::default()).await.unwrap();
    assert!(!c.cancel(&s).await.unwrap(), "nothing to cancel yet");
    let runner = spawn_run(&c, &s, "echo going; sleep 60");
    wait_running(&c, 1).await;
    assert!(c.cancel(&s).await.unwrap());
    let r = runner.await.unwrap().unwrap();
    assert_eq!(r.killed_by, Some(KilledBy::Cancelled));
    assert!(!r.timed_out);
    // The session is usable after a cancel.
    assert_eq!(
        text(&c.run(&s, "echo again").await.unwrap().stdout),
        "again\n"
    );
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn destroy_mid_command_answers_session_destroyed() {
    let d = TestDaemon::start("");
    let c = std::sync::Arc::new(d.client().await);
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let runner = spawn_run(&c, &s, "setsid sleep 60 & echo $! > bg.pid; sleep 60");
    wait_until(
        "the command started its child",
        Duration::from_secs(10),
        || d.work_dir().join("bg.pid").exists(),
    );
    c.destroy_session(&s).await.unwrap();
    let r = runner.await.unwrap().unwrap();
    assert_eq!(r.killed_by, Some(KilledBy::SessionDestroyed));
    assert_eq!(r.signal, Some(9));
    let e = c.run(&s, "true").await.unwrap_err();
    assert_eq!(e.code(), Some("SESSION_NOT_FOUND"));
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_busy_session_refuses_a_second_command() {
    let d = TestDaemon::start("");
    let c = std::sync::Arc::new(d.client().await);
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let runner = spawn_run(&c, &s, "sleep 60");
    wait_running(&c, 1).await;
    let e = c.run(&s, "true").await.unwrap_err();
    assert_eq!(e.code(), Some("SESSION_BUSY"));
    assert_eq!(c.stats().await.unwrap().commands.rejected_busy_total, 1);
    c.cancel(&s).await.unwrap();
    runner.await.unwrap().unwrap();
    c.run(&s, "true").await.unwrap();
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_global_command_cap_refuses_with_its_limit() {
    let d = TestDaemon::start("[commands]\nmax_concurrent = 1\n");
    let c = std::sync::Arc::new(d.client().await);
    let s1 = c.create_session(CreateParams::default()).await.unwrap();
    let s2 = c.create_session(CreateParams::default()).await.unwrap();
    let runner = spawn_run(&c, &s1, "sleep 60");
    wait_running(&c, 1).await;
    let e = c.run(&s2, "true").await.unwrap_err();
    assert_eq!(e.code(), Some("TOO_MANY_COMMANDS"));
    match &e {
        sessiond::client::ClientError::Server(w) => assert_eq!(w.limit, Some(1)),
        other => panic!("{other}"),
    }
    assert_eq!(c.stats().await.unwrap().commands.rejected_capacity_total, 1);
    c.cancel(&s1).await.unwrap();
    runner.await.unwrap().unwrap();
    // The slot came back before the answer did.
    c.run(&s2, "true").await.unwrap();
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vanished_cwd_is_spawn_failed() {
    let d = TestDaemon::start("");
    let c = d.client().await;
    let dir = d.work_dir().join("doomed");
    std::fs::create_dir(&dir).unwrap();
    let s = c
        .create_session(CreateParams {
            cwd: Some(dir.to_string_lossy().into()),
            ..Default::default()
        })
        .await
        .unwrap();
    std::fs::remove_dir(&dir).unwrap();
    let e = c.run(&s, "true").await.unwrap_err();
    assert_eq!(e.code(), Some("SPAWN_FAILED"));
    assert!(e.to_string().contains("doomed"), "{e}");
    assert_eq!(c.stats().await.unwrap().commands.spawn_failed_total, 1);
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_shell_falls_back_to_sh_with_state_kept() {
    let d = TestDaemon::start("[sessions]\nshell = \"/nonexistent/bash\"\n");
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    c.run(&s, "cd /tmp; export X='it'\"'\"'s'").await.unwrap();
    let r = c
        .run(&s, "pwd; echo \"$X\"; echo ${BASH_VERSION:-not bash}")
        .await
        .unwrap();
    assert_eq!(text(&r.stdout), "/tmp\nit's\nnot bash\n");
    assert!(d.log().contains("falling back to /bin/sh"));
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ping_is_answered_while_a_long_exec_runs_on_the_same_connection() {
    let d = TestDaemon::start("");
    let c = std::sync::Arc::new(d.client().await);
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let runner = spawn_run(&c, &s, "sleep 60");
    wait_running(&c, 1).await;
    // Same connection, sent after the exec: answered while the exec is still running.
    assert!(c.ping().await.unwrap().pong);
    assert!(!runner.is_finished());
    c.cancel(&s).await.unwrap();
    assert_eq!(
        runner.await.unwrap().unwrap().killed_by,
        Some(KilledBy::Cancelled)
    );
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_gives_the_command_its_kill_grace() {
    let d = TestDaemon::start("[commands]\nkill_grace = \"10s\"\n");
    let c = std::sync::Arc::new(d.client().await);
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let runner = spawn_run(
        &c,
        &s,
        "trap 'sleep 0.2; echo cleaned up; exit 3' TERM; touch ready; sleep 30 & wait",
    );
    wait_until(
        "the command installed its trap",
        Duration::from_secs(10),
        || d.work_dir().join("ready").exists(),
    );
    assert!(c.cancel(&s).await.unwrap());
    let r = runner.await.unwrap().unwrap();
    assert_eq!(r.killed_by, Some(KilledBy::Cancelled));
    assert_eq!(r.exit_code, Some(3), "the TERM trap ran to its end: {r:?}");
    assert_eq!(text(&r.stdout), "cleaned up\n");
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_background_child_survives_writing_after_the_answer() {
    let d = TestDaemon::start("");
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let r = c
        .run(
            &s,
            "(sleep 0.3; echo tick; echo tock >&2; touch wrote; sleep 300) & echo $!",
        )
        .await
        .unwrap();
    let pid: i32 = text(&r.stdout).trim().parse().unwrap();
    // `touch` runs only if the writes before it did not kill the child (SIGPIPE).
    wait_until(
        "the child wrote after the answer",
        Duration::from_secs(10),
        || d.work_dir().join("wrote").exists(),
    );
    assert!(alive(pid));
    c.destroy_session(&s).await.unwrap();
    wait_dead(pid, "the child dies with its session");
    drop(c);
    d.stop();
}

/// Ended once the descendant exists (a condition: a short timeout raced the
/// shell's start, and lost under emulation or load), by a cancel, which takes
/// the timeout's kill path (`CommandMsg::Kill`).
#[tokio::test(flavor = "multi_thread")]
async fn a_kill_reaches_setsid_descendants_that_ignore_sigterm() {
    let d = TestDaemon::start("");
    let c = std::sync::Arc::new(d.client().await);
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let runner = spawn_run(
        &c,
        &s,
        "setsid bash -c 'trap \"\" TERM; echo $$ > escaped.pid; while :; do sleep 0.05; done' & \
         sleep 300",
    );
    let pid_file = d.work_dir().join("escaped.pid");
    wait_until(
        "the setsid'd descendant is running",
        Duration::from_secs(30),
        || std::fs::read_to_string(&pid_file).is_ok_and(|p| p.ends_with('\n')),
    );
    assert!(c.cancel(&s).await.unwrap());
    let r = runner.await.unwrap().unwrap();
    assert_eq!(r.killed_by, Some(KilledBy::Cancelled), "{r:?}");
    let escaped: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_dead(escaped, "the escaped descendant is killed");
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_commands_and_env_are_invalid_not_spawn_failures() {
    let d = TestDaemon::start("");
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let e = c.run(&s, &"x".repeat(200_000)).await.unwrap_err();
    assert_eq!(e.code(), Some("INVALID_REQUEST"));
    assert!(e.to_string().contains("command"), "{e}");
    // A variable larger than one exec argument is carried (through the state
    // memfd, not the environment), as a terminal would keep it.
    c.run(
        &s,
        "export SMALL=1; export BIG=$(head -c 200000 /dev/zero | tr '\\0' x)",
    )
    .await
    .unwrap();
    let r = c.run(&s, "echo ${SMALL-unset} ${#BIG}").await.unwrap();
    assert_eq!(text(&r.stdout), "1 200000\n", "both variables are carried");
    drop(c);
    d.stop();
}
