//! The fault harness's scenarios: each one hostile act against a running daemon, with the outcome it must have. The fault_* test files and the chaos soak both run them.
//!
//! Every scenario works on sessions of its own (created and destroyed inside
//! it), asserts only what is true however many other scenarios run at the
//! same time, and leaves nothing behind. A new failure mode gets a function
//! here, a line in its fault_* file, and a weight in the soak.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sessiond::client::Client;
use sessiond::fault::{FaultAction, FaultParams, FaultResult, FaultTarget};
use sessiond::protocol::{
    CreateParams, ExecParams, ExecResult, KeepOutput, KilledBy, SessionLimits,
};

use super::{RawConn, alive, error_code, get, printed_pid, request, wait_until_async, within};

/// How long a scenario waits for an answer that needs no command to finish.
const ANSWER: Duration = Duration::from_secs(30);

/// Waits (5 s at most) until process `pid` is gone, without holding up the runtime.
pub async fn wait_dead(pid: i32, what: &str) {
    wait_until_async(what, Duration::from_secs(5), || async { !alive(pid) }).await;
}

/// Creates a session with `limits`.
pub async fn session(c: &Client, limits: Option<SessionLimits>) -> String {
    c.create_session(CreateParams {
        limits,
        ..Default::default()
    })
    .await
    .expect("session.create")
}

/// `command` with a timeout.
pub fn cmd(command: &str, timeout_s: f64) -> ExecParams {
    ExecParams {
        command: command.into(),
        timeout_s: Some(timeout_s),
        ..Default::default()
    }
}

/// Runs `params` in session `s`, bounded on the client's side too: a daemon
/// that never answers (a broken timeout, say) fails the scenario instead of
/// hanging it. The bound is the command's timeout plus 30 s of slack.
pub async fn exec_bounded(c: &Client, s: &str, params: ExecParams) -> ExecResult {
    let bound = Duration::from_secs_f64(params.timeout_s.unwrap_or(60.0) + 30.0);
    let command = params.command.clone();
    tokio::time::timeout(
        bound,
        c.exec(ExecParams {
            session_id: s.to_string(),
            ..params
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("no answer within {bound:?} to `{command}`"))
    .expect("exec.run")
}

/// Runs `params` in a fresh session with `limits`, destroys the session, returns the result.
async fn in_own_session(
    c: &Client,
    limits: Option<SessionLimits>,
    params: ExecParams,
) -> ExecResult {
    let s = session(c, limits).await;
    let r = exec_bounded(c, &s, params).await;
    c.destroy_session(&s).await.expect("session.destroy");
    r
}

/// Waits until `path` holds a complete line, then parses it as a pid.
pub async fn read_pid_file(path: &Path) -> i32 {
    wait_until_async(
        &format!("{} is written", path.display()),
        Duration::from_secs(10),
        || async { std::fs::read_to_string(path).is_ok_and(|s| s.ends_with('\n')) },
    )
    .await;
    let pid = std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _ = std::fs::remove_file(path);
    pid
}

// ---------------------------------------------------------------- normal work

/// Ordinary work in an existing session: state carries over, stdin and exit codes come back.
pub async fn normal_work(c: &Client, s: &str, n: u64) {
    let r = c
        .run(s, &format!("cd /tmp && export SOAK_N={n}"))
        .await
        .expect("exec.run");
    assert_eq!(r.exit_code, Some(0));
    let r = c
        .exec(ExecParams {
            session_id: s.into(),
            command: "echo \"$SOAK_N $(pwd) $(cat)\"; exit 3".into(),
            stdin: Some(serde_bytes::ByteBuf::from(b"in".to_vec())),
            ..Default::default()
        })
        .await
        .expect("exec.run");
    assert_eq!(
        (r.exit_code, String::from_utf8_lossy(&r.stdout).into_owned()),
        (Some(3), format!("{n} /tmp in\n"))
    );
}

/// A command cancelled while it runs ends with SIGTERM; the session runs the next one.
pub async fn cancel_running(c: &Arc<Client>) {
    let s = session(c, None).await;
    let runner = super::spawn_run(c, &s, "sleep 30");
    wait_until_async(
        "the command is listed busy",
        Duration::from_secs(10),
        || async {
            c.list_sessions()
                .await
                .is_ok_and(|l| l.sessions.iter().any(|i| i.session_id == s && i.busy))
        },
    )
    .await;
    assert!(c.cancel(&s).await.expect("exec.cancel"));
    let r = within(ANSWER, "the cancelled command's answer", runner)
        .await
        .unwrap()
        .expect("the cancelled command's answer");
    assert_eq!(r.killed_by, Some(KilledBy::Cancelled));
    assert_eq!(
        c.run(&s, "echo next").await.unwrap().stdout.as_ref(),
        b"next\n"
    );
    c.destroy_session(&s).await.unwrap();
}

// ----------------------------------------------------------- hostile commands

/// A CPU spin is ended by its timeout.
pub async fn cpu_spin(c: &Client) {
    let r = in_own_session(c, None, cmd("while :; do :; done", 0.5)).await;
    assert!(r.timed_out, "{r:?}");
}

/// A flood on both streams at once: each capped at `cap`, drained to the end, counted.
pub async fn flood_both_streams(c: &Client, cap: usize) {
    let r = in_own_session(
        c,
        None,
        cmd(
            "head -c 20000000 /dev/zero & head -c 20000000 /dev/zero >&2; wait",
            60.0,
        ),
    )
    .await;
    assert_eq!((r.stdout.len(), r.stderr.len()), (cap, cap));
    assert!(r.stdout_truncated && r.stderr_truncated);
    assert_eq!(
        (r.stdout_total_bytes, r.stderr_total_bytes),
        (20_000_000, 20_000_000)
    );
}

/// `yes` with `keep_output: "tail"`: the last bytes are kept until the timeout.
pub async fn yes_tail(c: &Client) {
    let r = in_own_session(
        c,
        None,
        ExecParams {
            keep_output: Some(KeepOutput::Tail),
            ..cmd("yes", 0.5)
        },
    )
    .await;
    assert!(r.timed_out && r.stdout_truncated, "{r:?}");
    assert!(r.stdout.ends_with(b"y\n") || r.stdout.ends_with(b"y"));
}

/// A thousand open files (the daemon's `nofile` must allow them).
pub async fn thousand_files(c: &Client) {
    let r = in_own_session(
        c,
        None,
        cmd(
            "for i in $(seq 1 1000); do exec {fd}</dev/null || exit 9; done; echo opened",
            30.0,
        ),
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&r.stdout), "opened\n");
}

/// A daemonizing child (fork + setsid) outlives its command but not its session.
pub async fn daemonizing_child(c: &Client) {
    let s = session(c, None).await;
    let r = exec_bounded(c, &s, cmd("setsid sh -c 'sleep 1000 & echo $!'", 10.0)).await;
    let pid = printed_pid(&r);
    assert!(alive(pid), "the daemonized child runs after its command");
    c.destroy_session(&s).await.unwrap();
    wait_dead(pid, "the daemonized child dies with its session").await;
}

/// A command that ignores SIGTERM gets SIGKILL after the grace; its answer
/// is a timeout with the output written before it. The timeout leaves the
/// shell ample time to install its trap even on a loaded machine (at 0.3 s
/// the scenario failed once on a machine busy with builds).
pub async fn term_ignorer(c: &Client) {
    let r = in_own_session(
        c,
        None,
        cmd(
            "trap '' TERM; echo ready; while :; do sleep 0.05; done",
            2.0,
        ),
    )
    .await;
    assert_eq!(
        (r.timed_out, r.killed_by, r.signal),
        (true, Some(KilledBy::Timeout), Some(9)),
        "SIGKILL after kill_grace: {r:?}"
    );
    assert_eq!(String::from_utf8_lossy(&r.stdout), "ready\n");
}

/// A command that closes its stdout early and goes on: the answer waits for its exit.
pub async fn early_stdout_close(c: &Client) {
    let r = in_own_session(c, None, cmd("exec >&-; sleep 0.2; echo done >&2", 10.0)).await;
    assert_eq!(
        (r.exit_code, String::from_utf8_lossy(&r.stderr).into_owned()),
        (Some(0), "done\n".into())
    );
}

/// A memory hog is killed by its session's memory limit (cgroups only).
pub async fn memory_hog(c: &Client) {
    let limits = SessionLimits {
        memory_max_bytes: Some(64 << 20),
        ..Default::default()
    };
    let r = in_own_session(
        c,
        Some(limits),
        cmd("head -c 200M /dev/zero | tail > /dev/null", 30.0),
    )
    .await;
    assert_eq!(r.killed_by, Some(KilledBy::MemoryLimit), "{r:?}");
}

/// A fork bomb is contained by its session's pids limit and ended by its timeout (cgroups only).
pub async fn fork_bomb(c: &Client) {
    let limits = SessionLimits {
        pids_max: Some(32),
        ..Default::default()
    };
    let r = in_own_session(c, Some(limits), cmd("b() { b | b & }; b; sleep 5", 1.0)).await;
    assert!(r.timed_out, "{r:?}");
}

/// A command tries to touch another session: signal its process, read its
/// environment. Only on a `uid-per-session` daemon (under `shared` the
/// sessions are one uid and nothing stops it): both attempts fail with
/// EPERM/EACCES and the other session's process lives on.
pub async fn touch_another_session(c: &Client) {
    let victim = session(c, None).await;
    let r = exec_bounded(
        c,
        &victim,
        cmd("sleep 60 > /dev/null 2>&1 < /dev/null & echo $!", 10.0),
    )
    .await;
    let pid = printed_pid(&r);
    let attacker = session(c, None).await;
    let r = exec_bounded(
        c,
        &attacker,
        cmd(
            &format!(
                "kill -KILL {pid}; echo kill=$?; cat /proc/{pid}/environ > /dev/null; echo environ=$?"
            ),
            10.0,
        ),
    )
    .await;
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(out.contains("kill=1") && out.contains("environ=1"), "{out}");
    assert!(alive(pid), "the other session's process is untouched");
    c.destroy_session(&attacker).await.expect("session.destroy");
    c.destroy_session(&victim).await.expect("session.destroy");
    wait_dead(pid, "the victim's process dies with its own session").await;
}

// ------------------------------------------------------------ hostile clients

/// Garbage inside a frame is INVALID_REQUEST and the connection goes on;
/// then a stream of garbage bytes, and a hang-up.
pub fn garbage_bytes(socket: &Path, garbage: &[u8]) {
    let mut conn = RawConn::connect(socket);
    conn.write_frame(&[0xc1, 0xff, 0x00]);
    let r = conn.read().expect("an answer to a garbage frame");
    assert_eq!(error_code(&r).as_deref(), Some("INVALID_REQUEST"));
    conn.send(&request(1, "system.ping", vec![]));
    assert_eq!(get(&conn.read().unwrap(), "id").as_u64(), Some(1));
    // Raw garbage: whatever the daemon makes of it, it answers or hangs up, never hangs.
    let _ = std::io::Write::write_all(&mut conn.stream, garbage);
}

/// A length prefix of 4 GiB is refused from the prefix alone, then the connection is closed.
pub fn huge_length_prefix(socket: &Path) {
    let mut conn = RawConn::connect(socket);
    conn.write_bytes(&0xffff_fff0u32.to_be_bytes());
    let r = conn.read().expect("an answer to a huge prefix");
    assert_eq!(error_code(&r).as_deref(), Some("FRAME_TOO_LARGE"));
    assert!(conn.is_closed(), "closed after FRAME_TOO_LARGE");
}

/// Truncated frames (a short prefix, a short body), then hang-ups.
pub fn truncated_frames(socket: &Path) {
    RawConn::connect(socket).write_bytes(&[0, 0]);
    RawConn::connect(socket).write_bytes(&[0, 0, 0, 100, 0x82, 0xa2]);
}

/// A client that hangs up in the middle of an exec: the command outlives its
/// connection by design and runs to its end (it writes a marker); seen through
/// another connection, its session turns idle, and then no process of the
/// command (the shell, its background child) is left before anything else
/// could kill them; the session is usable again.
pub async fn disconnect_mid_exec(c: &Client, socket: &Path, work_dir: &Path) {
    let s = session(c, None).await;
    let started = work_dir.join(format!("{s}.started"));
    let marker = work_dir.join(format!("{s}.done"));
    let mut conn = RawConn::connect(socket);
    conn.send(&request(
        1,
        "exec.run",
        vec![
            ("session_id", s.as_str().into()),
            (
                "command",
                format!(
                    "sleep 0.3 & echo $$ $! > {}.tmp; mv {0}.tmp {0}; wait; echo done > {}",
                    started.display(),
                    marker.display()
                )
                .into(),
            ),
        ],
    ));
    wait_until_async("the command runs", Duration::from_secs(10), || async {
        started.exists()
    })
    .await;
    let pids: Vec<i32> = std::fs::read_to_string(&started)
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().expect("a pid"))
        .collect();
    assert_eq!(pids.len(), 2, "the shell's pid and its child's");
    drop(conn);
    wait_until_async(
        "the abandoned command ends (its session is idle)",
        Duration::from_secs(20),
        || async {
            let list = c.list_sessions().await.expect("session.list");
            !list
                .sessions
                .iter()
                .find(|i| i.session_id == s)
                .expect("the session outlives its client's connection")
                .busy
        },
    )
    .await;
    for pid in pids {
        assert!(
            !alive(pid),
            "process {pid} of the abandoned command is left"
        );
    }
    assert_eq!(
        std::fs::read_to_string(&marker).expect("the abandoned command ran to its end"),
        "done\n"
    );
    let r = exec_bounded(c, &s, cmd("true", 10.0)).await;
    assert_eq!(r.exit_code, Some(0), "the session runs its next command");
    let _ = std::fs::remove_file(&marker);
    let _ = std::fs::remove_file(&started);
    c.destroy_session(&s).await.unwrap();
}

/// `n` connections opened at once, each served, all closed.
pub fn connection_burst(socket: &Path, n: u64) {
    let mut conns: Vec<RawConn> = (0..n).map(|_| RawConn::connect(socket)).collect();
    for (i, conn) in (0..).zip(conns.iter_mut()) {
        conn.send(&request(i, "system.ping", vec![]));
    }
    for (i, conn) in (0..).zip(conns.iter_mut()) {
        let r = conn
            .read()
            .expect("every connection of the burst is served");
        assert_eq!(get(&r, "id").as_u64(), Some(i));
    }
}

/// A client that asks for four answers of `unsent_budget` bytes each and
/// never reads is dropped once the answers queued behind the one being
/// written pass the budget; its commands ran to their end all the same.
pub async fn never_reads(c: &Client, socket: &Path, unsent_budget: u64) {
    let mut sessions = Vec::new();
    let mut conn = RawConn::connect(socket);
    for id in 0..4 {
        let s = session(c, None).await;
        conn.send(&request(
            id,
            "exec.run",
            vec![
                ("session_id", s.as_str().into()),
                (
                    "command",
                    format!("head -c {unsent_budget} /dev/zero").into(),
                ),
            ],
        ));
        sessions.push(s);
    }
    // Not reading: the answers pile up in the daemon until it gives up.
    for s in &sessions {
        wait_until_async(
            "the unread command ends (its session is free again)",
            ANSWER,
            || async {
                match c.run(s, "true").await {
                    Ok(_) => true,
                    Err(e) if e.code() == Some("SESSION_BUSY") => false,
                    Err(e) => panic!("the session of a dropped client: {e}"),
                }
            },
        )
        .await;
    }
    // Reading now drains what was written, then meets the daemon's hang-up
    // (a read that times out instead means the connection was kept).
    if let Err(e) = conn.read_until_closed() {
        panic!("the non-reader's connection was kept: {e}");
    }
    for s in sessions {
        c.destroy_session(&s).await.unwrap();
    }
}

/// A client that sends half a frame and stalls is disconnected once
/// `read_timeout` (the daemon's `request_read_timeout`) passes, not before
/// (the read waits for the hang-up); others are served meanwhile, and a
/// client that sends nothing is not disconnected.
pub fn stalled_partial_frame(socket: &Path, read_timeout: Duration) {
    let mut idle = RawConn::connect(socket);
    let mut stalled = RawConn::connect(socket);
    // Before the write: the daemon's deadline starts when it reads the bytes.
    let started = std::time::Instant::now();
    stalled.write_bytes(&[0, 0, 0, 50, 0x82]);
    let mut other = RawConn::connect(socket);
    other.send(&request(1, "system.ping", vec![]));
    let r = other.read().expect("others are served meanwhile");
    assert_eq!(get(&r, "id").as_u64(), Some(1));
    assert!(stalled.is_closed(), "the stalled connection is closed");
    assert!(
        started.elapsed() >= read_timeout,
        "closed after {:?}, before the {read_timeout:?} deadline",
        started.elapsed()
    );
    idle.send(&request(2, "system.ping", vec![]));
    let r = idle.read().expect("the idle connection is served");
    assert_eq!(get(&r, "id").as_u64(), Some(2));
}

// --------------------------------------------------------------- actor faults

/// Injects a fault; returns how many actors it reached.
pub async fn inject(
    c: &Client,
    target: FaultTarget,
    action: FaultAction,
    session: Option<&str>,
) -> u64 {
    inject_params(
        c,
        FaultParams {
            target,
            action,
            session_id: session.map(str::to_string),
            stall_ms: None,
        },
    )
    .await
}

/// Sends `debug.fault` with `params`; returns how many actors it reached.
async fn inject_params(c: &Client, params: FaultParams) -> u64 {
    let r: FaultResult = c.call("debug.fault", params).await.expect("debug.fault");
    r.injected
}

/// Strikes the actor `target` of `s` while `runner` (a command of `s`) runs:
/// that command's answer is INTERNAL.
async fn fail_while_running(
    c: &Client,
    target: FaultTarget,
    action: FaultAction,
    s: &str,
    runner: tokio::task::JoinHandle<Result<ExecResult, sessiond::client::ClientError>>,
) {
    assert_eq!(inject(c, target, action, Some(s)).await, 1);
    let e = within(ANSWER, "the answer of the struck command", runner)
        .await
        .unwrap()
        .expect_err("the answer of the struck command");
    assert_eq!(e.code(), Some("INTERNAL"), "{target:?} {action:?}: {e}");
}

/// Starts `sleep 60` in `s` and waits until its shell runs; returns the shell's pid and the run.
async fn start_sleeper(
    c: &Arc<Client>,
    s: &str,
    work_dir: &Path,
) -> (
    i32,
    tokio::task::JoinHandle<Result<ExecResult, sessiond::client::ClientError>>,
) {
    let pidfile = work_dir.join(format!("{s}.pid"));
    let runner = super::spawn_run(c, s, &format!("echo $$ > {}; sleep 60", pidfile.display()));
    (read_pid_file(&pidfile).await, runner)
}

/// A CommandActor panic (or error): that exec.run is INTERNAL, its processes
/// die, and the session runs its next command with its state intact.
/// Returns the (destroyed) session's id.
pub async fn command_actor_fault(c: &Arc<Client>, work_dir: &Path, action: FaultAction) -> String {
    let s = session(c, None).await;
    c.run(&s, "cd /tmp").await.unwrap();
    let (shell, runner) = start_sleeper(c, &s, work_dir).await;
    fail_while_running(c, FaultTarget::Command, action, &s, runner).await;
    wait_dead(shell, "the failed command's process is killed").await;
    let r = c.run(&s, "pwd").await.expect("the session goes on");
    assert_eq!(String::from_utf8_lossy(&r.stdout), "/tmp\n");
    c.destroy_session(&s).await.unwrap();
    s
}

/// A CommandActor panic while its command has a setsid'd child in its
/// cgroup leaf: the leaf and that child are gone at once, while the session
/// lives on (not when it ends). Needs cgroups (the leaf is what finds the
/// child that left the command's process group).
pub async fn command_actor_panic_with_setsid_child(c: &Arc<Client>, d: &super::TestDaemon) {
    assert!(!d.cgroup_dirs().is_empty(), "cgroups are on");
    let s = session(c, None).await;
    let pidfile = d.work_dir().join(format!("{s}.setsid.pid"));
    let runner = super::spawn_run(
        c,
        &s,
        &format!(
            "setsid sh -c 'echo $$ > {}; exec sleep 1000' & sleep 60",
            pidfile.display()
        ),
    );
    let escaped = read_pid_file(&pidfile).await;
    // The command's leaf, in every hierarchy: the `cmd-*` cgroups holding the child.
    let leaf: Vec<_> = d
        .command_cgroups()
        .into_iter()
        .filter(|dir| {
            std::fs::read_to_string(dir.join("cgroup.procs"))
                .is_ok_and(|p| p.split_whitespace().any(|x| x == escaped.to_string()))
        })
        .collect();
    assert!(
        !leaf.is_empty(),
        "the setsid'd child is in its command's leaf"
    );
    fail_while_running(c, FaultTarget::Command, FaultAction::Panic, &s, runner).await;
    wait_until_async(
        "the struck command's leaf and its setsid'd child are gone",
        Duration::from_secs(5),
        || async { !alive(escaped) && leaf.iter().all(|dir| !dir.exists()) },
    )
    .await;
    c.run(&s, "true").await.expect("the session lives on");
    c.destroy_session(&s).await.unwrap();
}

/// A SessionActor panic (or error): that session is lost, with its processes
/// (a running command and a background one); later calls are SESSION_NOT_FOUND.
/// Returns the lost session's id.
pub async fn session_actor_fault(c: &Arc<Client>, work_dir: &Path, action: FaultAction) -> String {
    let s = session(c, None).await;
    let r = c.run(&s, "sleep 300 & echo $!").await.unwrap();
    let background = printed_pid(&r);
    let (shell, runner) = start_sleeper(c, &s, work_dir).await;
    fail_while_running(c, FaultTarget::Session, action, &s, runner).await;
    wait_until_async(
        "the lost session's processes are killed",
        Duration::from_secs(5),
        || async { !alive(shell) && !alive(background) },
    )
    .await;
    wait_until_async(
        "the lost session is unknown",
        Duration::from_secs(5),
        || async { c.run(&s, "true").await.unwrap_err().code() == Some("SESSION_NOT_FOUND") },
    )
    .await;
    s
}

/// A stalled SessionActor delays only its own session's work: while it
/// stalls, another session runs a command and ping answers (checked by order,
/// not by time: the stalled run has not answered when they have).
pub async fn session_stall(c: &Arc<Client>) {
    let stalled = session(c, None).await;
    let other = session(c, None).await;
    let stall = FaultParams {
        target: FaultTarget::Session,
        action: FaultAction::Stall,
        session_id: Some(stalled.clone()),
        stall_ms: Some(3000),
    };
    assert_eq!(inject_params(c, stall).await, 1);
    let late = super::spawn_run(c, &stalled, "echo late");
    let r = c.run(&other, "echo other").await.unwrap();
    assert_eq!(r.stdout.as_ref(), b"other\n");
    assert!(c.ping().await.unwrap().pong);
    assert!(
        !late.is_finished(),
        "the stalled session answered before the others"
    );
    let r = within(ANSWER, "the stalled session's answer", late)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.stdout.as_ref(), b"late\n");
    c.destroy_session(&stalled).await.unwrap();
    c.destroy_session(&other).await.unwrap();
}

/// A failed spawn is SPAWN_FAILED and the next command runs. The flag is
/// global: no other command may spawn in between (the soak runs this alone).
pub async fn spawn_failure(c: &Client) {
    let s = session(c, None).await;
    assert_eq!(
        inject(c, FaultTarget::Spawn, FaultAction::Error, None).await,
        1
    );
    let e = c.run(&s, "true").await.expect_err("the failed spawn");
    assert_eq!(e.code(), Some("SPAWN_FAILED"), "{e}");
    c.run(&s, "true").await.expect("the next spawn works");
    c.destroy_session(&s).await.unwrap();
}

/// A RegistryActor panic (or error): restarted, every live session kept with
/// its shell state. `live` is how many sessions exist before the fault.
pub async fn registry_fault(c: &Client, action: FaultAction, live: usize) {
    let s = session(c, None).await;
    c.run(&s, "cd /tmp; export KEPT=yes").await.unwrap();
    assert_eq!(inject(c, FaultTarget::Registry, action, None).await, 1);
    wait_until_async(
        "the restarted registry lists every session",
        Duration::from_secs(10),
        || async {
            c.list_sessions()
                .await
                .is_ok_and(|l| l.sessions.len() == live + 1)
        },
    )
    .await;
    let r = c.run(&s, "pwd; echo $KEPT").await.unwrap();
    assert_eq!(String::from_utf8_lossy(&r.stdout), "/tmp\nyes\n");
    c.destroy_session(&s).await.unwrap();
}

/// A root-supervisor failure: a fresh tree serves, every old session is gone with its processes.
pub async fn supervisor_fault(c: &Client) {
    let s = session(c, None).await;
    let r = c.run(&s, "sleep 300 & echo $!").await.unwrap();
    let pid = printed_pid(&r);
    assert_eq!(
        inject(c, FaultTarget::Supervisor, FaultAction::Panic, None).await,
        1
    );
    wait_dead(pid, "the old tree's processes are killed").await;
    wait_until_async("the fresh tree serves", Duration::from_secs(10), || async {
        c.list_sessions().await.is_ok_and(|l| l.sessions.is_empty())
    })
    .await;
    assert_eq!(
        c.run(&s, "true").await.unwrap_err().code(),
        Some("SESSION_NOT_FOUND")
    );
}
