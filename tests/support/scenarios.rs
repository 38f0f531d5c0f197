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
    CommandResult, CreateParams, Event, ExecParams, ExecResult, KeepOutput, KilledBy, ReadParams,
    SessionLimits, StreamName,
};

use super::{
    RawConn, alive, blocking, error_code, get, printed_pid, request, rss_of, wait_until_async,
    within,
};

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

/// `yes` with `keep_output: "tail"`: the last `cap` bytes are kept until it
/// is killed. The kill waits for a condition, not a clock: the idle timeout,
/// once 3 MB (past every cap the tests use) are written and the output
/// stops. (A 0.5 s timeout raced the shell's start: under emulation, or at a
/// load of 12 on 2 cores, it fired before `yes` had written anything.) It
/// counts as a timeout, and as truncated output. Returns whether the output
/// was truncated (always, now; the callers count it from the result).
pub async fn yes_tail(c: &Client, cap: usize) -> bool {
    assert!(cap < 3_000_000, "the cap must be below what yes writes");
    let r = in_own_session(
        c,
        None,
        ExecParams {
            keep_output: Some(KeepOutput::Tail),
            idle_timeout_s: Some(3.0),
            ..cmd("yes | head -c 3000000; exec sleep 1000", 120.0)
        },
    )
    .await;
    assert_eq!(r.killed_by, Some(KilledBy::IdleTimeout), "{r:?}");
    assert!(r.timed_out && r.stdout_truncated, "{r:?}");
    assert_eq!(r.stdout_total_bytes, 3_000_000);
    assert_eq!(r.stdout.len(), cap);
    assert!(r.stdout.ends_with(b"y\n"));
    r.stdout_truncated
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
    // The command's leaf, in every hierarchy it is made in: the `cmd-*` cgroups holding the child.
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

// ------------------------------------------------------ long-running commands

/// Unsent bytes on a connection above which the daemon makes no output event
/// (src/server/methods/exec_run.rs `EVENT_BACKLOG`), and the most one event
/// adds to them (a 64 KiB chunk and its envelope).
const EVENT_BACKLOG: u64 = 256 << 10;
const EVENT_MAX: u64 = (64 << 10) + 1024;

/// A daemon's `server.max_unsent_bytes` and `commands.max_output_bytes`:
/// together they decide what becomes of a streaming client that never reads.
#[derive(Clone, Copy, Debug)]
pub struct StreamBudgets {
    pub unsent: u64,
    pub output_cap: u64,
}

impl StreamBudgets {
    /// Whether a streaming non-reader's connection is dropped when its result
    /// comes. Its events stop once more than `EVENT_BACKLOG` is unsent (or the
    /// queue holds 64 frames), so when the command ends its queue holds at
    /// most that and one event more; the result (a capped stream:
    /// `output_cap` bytes plus envelope) is
    /// queued only if it fits in the budget on top of them, else the
    /// connection is dropped as a slow reader. Budgets between the two bounds
    /// could go either way and are refused.
    pub fn result_dropped(self) -> bool {
        if self.output_cap + EVENT_BACKLOG >= self.unsent {
            true
        } else if self.output_cap + EVENT_BACKLOG + EVENT_MAX + 1024 <= self.unsent {
            false
        } else {
            panic!("{self:?}: the outcome would depend on the events' sizes; pick budgets apart")
        }
    }
}

/// One streaming request's frames read off a raw connection: the id of its
/// `started` event (which must come first), its output events in order
/// (stream, offset, data), and its final frame (`None`: the connection ended
/// first, maybe in the middle of a frame).
struct RawStream {
    command_id: String,
    outputs: Vec<(String, u64, Vec<u8>)>,
    last: Option<rmpv::Value>,
}

impl RawStream {
    /// Reads frames of request `id` until its final frame or the connection's end.
    fn read(conn: &mut RawConn, id: u64) -> RawStream {
        let command_id = Self::started(conn, id);
        Self::rest(conn, id, command_id, Vec::new())
    }

    /// Reads the first frame of request `id`, which must be `started`; its command id.
    fn started(conn: &mut RawConn, id: u64) -> String {
        let first = conn.read().expect("the started event");
        assert_eq!(get(&first, "id").as_u64(), Some(id));
        assert_eq!(
            get(&first, "event").as_str(),
            Some("started"),
            "`started` comes first"
        );
        get(&first, "command_id")
            .as_str()
            .expect("a command id")
            .to_string()
    }

    /// One frame of request `id`: an output event, or (`Err`) its final frame
    /// (`None`: the connection ended first).
    fn next(conn: &mut RawConn, id: u64) -> Result<(String, u64, Vec<u8>), Option<rmpv::Value>> {
        let frame = conn.read().ok_or(None)?;
        assert_eq!(get(&frame, "id").as_u64(), Some(id));
        match get(&frame, "event").as_str() {
            Some("output") => Ok((
                get(&frame, "stream").as_str().expect("a stream").into(),
                get(&frame, "offset").as_u64().expect("an offset"),
                get(&frame, "data").as_slice().expect("data").to_vec(),
            )),
            Some(other) => panic!("unexpected event `{other}` after `started`"),
            None => Err(Some(frame)),
        }
    }

    /// Reads the events after `outputs` until the final frame or the connection's end.
    fn rest(
        conn: &mut RawConn,
        id: u64,
        command_id: String,
        mut outputs: Vec<(String, u64, Vec<u8>)>,
    ) -> RawStream {
        loop {
            match Self::next(conn, id) {
                Ok(output) => outputs.push(output),
                Err(last) => {
                    return RawStream {
                        command_id,
                        outputs,
                        last,
                    };
                }
            }
        }
    }

    /// Per stream: the offsets never go back nor overlap; returns the end of
    /// what the events carried and the gaps they showed (start, end) per stream.
    fn check_offsets(&self) -> std::collections::HashMap<String, (u64, Vec<(u64, u64)>)> {
        let mut seen: std::collections::HashMap<String, (u64, Vec<(u64, u64)>)> =
            Default::default();
        for (stream, offset, data) in &self.outputs {
            assert!(!data.is_empty(), "an output event carries bytes");
            let (end, gaps) = seen.entry(stream.clone()).or_default();
            assert!(
                *offset >= *end,
                "{stream}: an event at {offset} goes back before {end}"
            );
            if *offset > *end {
                gaps.push((*end, *offset));
            }
            *end = offset + data.len() as u64;
        }
        seen
    }
}

/// Sends `exec.run` of `command` in session `s` with `stream: true` (and
/// a 120 s timeout) as request `id`, without reading anything.
fn send_streamed_run(conn: &mut RawConn, id: u64, s: &str, command: String) {
    conn.send(&request(
        id,
        "exec.run",
        vec![
            ("session_id", s.into()),
            ("command", command.into()),
            ("stream", true.into()),
            ("timeout_s", 120.0.into()),
        ],
    ));
}

/// The id of the command `s` runs, from `session.list` (another connection's view).
async fn running_command(c: &Client, s: &str) -> String {
    within(ANSWER, "the command is listed with its id", async {
        loop {
            let list = c.list_sessions().await.expect("session.list");
            let listed = list
                .sessions
                .into_iter()
                .find(|i| i.session_id == s)
                .and_then(|i| i.command_id);
            if let Some(id) = listed {
                return id;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// Waits up to `wait_s` for command `id` to end (reading no bytes: the
/// offsets are past any end); its result once it has.
async fn ended(c: &Client, id: &str, wait_s: f64) -> Option<CommandResult> {
    let r = c
        .read(ReadParams {
            command_id: id.into(),
            stdout_offset: u64::MAX,
            stderr_offset: u64::MAX,
            wait_s: Some(wait_s),
        })
        .await
        .expect("exec.read");
    assert!(r.stdout.is_empty() && r.stderr.is_empty());
    assert_eq!(r.done, r.result.is_some());
    r.result
}

/// Reads command `id` with `exec.read` from offset 0 to its end: (stdout,
/// stderr, result). Nothing may be skipped: the output must fit the retention.
pub async fn read_to_end(c: &Client, id: &str) -> (Vec<u8>, Vec<u8>, CommandResult) {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    within(ANSWER, "exec.read to the command's end", async {
        loop {
            let r = c
                .read(ReadParams {
                    command_id: id.into(),
                    stdout_offset: stdout.len() as u64,
                    stderr_offset: stderr.len() as u64,
                    wait_s: Some(10.0),
                })
                .await
                .expect("exec.read");
            assert_eq!(
                (r.stdout_offset, r.stderr_offset),
                (stdout.len() as u64, stderr.len() as u64),
                "nothing skipped"
            );
            stdout.extend_from_slice(&r.stdout);
            stderr.extend_from_slice(&r.stderr);
            assert_eq!(
                (r.stdout_next, r.stderr_next),
                (stdout.len() as u64, stderr.len() as u64)
            );
            if let Some(result) = r.result {
                assert!(r.done);
                return (stdout, stderr, result);
            }
        }
    })
    .await
}

/// A client that streams a command writing `bytes` and never reads. The
/// command runs to its end by itself at drain speed (seen from another
/// connection, which is served meanwhile), the daemon's RSS stays under
/// `daemon.1` (sampled while it runs), the session runs its next command.
/// When the client finally reads: `started`, then output events from offset 0
/// on that never go back and stop far short of `bytes` (no event is made
/// while the client is behind; the skipped bytes show against the result's
/// `stdout_total_bytes`), then the result — or, when `budgets` say the result
/// cannot be queued behind the unread events, the connection's end instead
/// (dropped as a slow reader: the client reads only once the daemon has
/// counted the drop, which it decides by itself). Returns whether it was
/// dropped.
pub async fn stream_never_reads(
    c: &Client,
    socket: &Path,
    work_dir: &Path,
    daemon: (i32, u64),
    bytes: u64,
    budgets: StreamBudgets,
) -> bool {
    let dropped = budgets.result_dropped();
    assert!(
        bytes > 2 * budgets.output_cap + (1 << 20),
        "a flood past the cap"
    );
    let drops_before = slow_readers_dropped(c).await;
    let runs_before = exec_runs_answered(c).await;
    let s = session(c, None).await;
    let gate = work_dir.join(format!("{s}.go"));
    let mut conn = RawConn::connect(socket);
    send_streamed_run(
        &mut conn,
        7,
        &s,
        format!(
            "while [ ! -e {} ]; do sleep 0.01; done; head -c {bytes} /dev/zero",
            gate.display()
        ),
    );
    let id = running_command(c, &s).await;
    std::fs::write(&gate, "").unwrap();
    let (pid, rss_bound) = daemon;
    let mut peak = 0;
    let result = within(
        Duration::from_secs(120),
        "the unread command ends by itself",
        async {
            loop {
                peak = peak.max(rss_of(pid));
                if let Some(r) = ended(c, &id, 0.5).await {
                    break r;
                }
                assert!(c.ping().await.expect("others are served").pong);
            }
        },
    )
    .await;
    let _ = std::fs::remove_file(&gate);
    assert!(peak < rss_bound, "daemon RSS {peak} over {rss_bound}");
    assert_eq!(
        (
            result.exit_code,
            result.stdout_total_bytes,
            result.stdout_truncated
        ),
        (Some(0), bytes, true)
    );
    // The daemon's streaming task decides by itself, once it sees the end,
    // and the request is timed only then: reading before that would drain
    // the queue the decision is about.
    wait_until_async("the streamed run is answered", ANSWER, || async {
        exec_runs_answered(c).await > runs_before
    })
    .await;
    let r = exec_bounded(c, &s, cmd("echo next", 10.0)).await;
    assert_eq!(r.stdout.as_ref(), b"next\n", "the session is free again");
    if dropped {
        wait_until_async("the daemon drops the non-reader", ANSWER, || async {
            slow_readers_dropped(c).await > drops_before
        })
        .await;
    }

    let stream = blocking(move || RawStream::read(&mut conn, 7)).await;
    assert_eq!(stream.command_id, id);
    let ends = stream.check_offsets();
    assert!(
        stream
            .outputs
            .iter()
            .all(|(name, _, data)| name == "stdout" && data.iter().all(|b| *b == 0)),
        "only stdout's zeros"
    );
    assert_eq!(
        stream.outputs.first().map(|o| o.1),
        Some(0),
        "the first event is the first bytes"
    );
    let seen = ends.get("stdout").map_or(0, |e| e.0);
    assert!(
        seen < bytes / 2,
        "events stop while the client is behind: {seen} of {bytes} bytes"
    );
    match (&stream.last, dropped) {
        (None, true) => {}
        (Some(last), false) => {
            let r = get(last, "result");
            assert_eq!(
                (
                    get(r, "command_id").as_str(),
                    get(r, "stdout_total_bytes").as_u64(),
                    get(r, "stdout").as_slice().map(<[u8]>::len),
                ),
                (
                    Some(id.as_str()),
                    Some(bytes),
                    Some(budgets.output_cap as usize)
                ),
                "the result after the events"
            );
        }
        (last, _) => panic!(
            "daemon log: {}\nbudgets {budgets:?}: expected {}, got {}; the stream had {} output events up to stdout offset {seen}; the daemon's stats after: {:?}",
            std::fs::read_to_string(work_dir.with_file_name("daemon.log")).unwrap_or_default(),
            if dropped {
                "a dropped connection"
            } else {
                "the result"
            },
            match last {
                Some(f) => format!(
                    "a final frame with error {:?} (stdout of {:?} bytes, stdout_total_bytes {:?})",
                    error_code(f),
                    get(get(f, "result"), "stdout").as_slice().map(<[u8]>::len),
                    get(get(f, "result"), "stdout_total_bytes").as_u64()
                ),
                None => "the connection's end".into(),
            },
            stream.outputs.len(),
            c.stats().await.map(|s| s.runtime),
        ),
    }
    c.destroy_session(&s).await.unwrap();
    dropped
}

/// How many `exec.run` requests the daemon has answered (or dropped the
/// answer of): its latency count, taken once the answer is made.
async fn exec_runs_answered(c: &Client) -> u64 {
    c.stats()
        .await
        .expect("stats")
        .latency
        .iter()
        .filter(|h| h.method.as_deref() == Some("exec.run"))
        .map(|h| h.count)
        .sum()
}

async fn slow_readers_dropped(c: &Client) -> u64 {
    c.stats()
        .await
        .expect("stats")
        .clients
        .slow_readers_dropped_total
}

/// A streaming client that falls behind while its command writes `bytes`
/// and catches up while the command still runs (it waits at a gate): the
/// events go on from where they stopped through the retained head, then
/// jump once — from the head's end to the retained window's start — and go
/// on to the end; the result follows. Needs budgets under which the result
/// is never dropped.
pub async fn stream_reads_late(
    c: &Client,
    socket: &Path,
    work_dir: &Path,
    bytes: u64,
    budgets: StreamBudgets,
) {
    assert!(
        !budgets.result_dropped(),
        "{budgets:?} would drop the result"
    );
    let cap = budgets.output_cap;
    assert!(
        bytes > 2 * cap + (1 << 20),
        "a flood past the head and the window"
    );
    let s = session(c, None).await;
    let gate = work_dir.join(format!("{s}.go"));
    let mut conn = RawConn::connect(socket);
    send_streamed_run(
        &mut conn,
        8,
        &s,
        format!(
            "head -c {bytes} /dev/zero; while [ ! -e {} ]; do sleep 0.01; done; echo end",
            gate.display()
        ),
    );
    let id = running_command(c, &s).await;
    // Every byte written while the client reads nothing.
    wait_until_async("the flood is written", Duration::from_secs(60), || async {
        let r = c
            .read(ReadParams {
                command_id: id.clone(),
                stdout_offset: u64::MAX,
                stderr_offset: u64::MAX,
                wait_s: Some(0.5),
            })
            .await
            .expect("exec.read");
        assert!(!r.done, "the command waits at its gate");
        r.stdout_offset == bytes
    })
    .await;
    let gate_for_reader = gate.clone();
    let stream = blocking(move || {
        // Catch up with the events while the command waits, then let it end.
        let command_id = RawStream::started(&mut conn, 8);
        let mut outputs = Vec::new();
        loop {
            let output = RawStream::next(&mut conn, 8).expect("events while the command runs");
            let end = output.1 + output.2.len() as u64;
            outputs.push(output);
            if end == bytes {
                break;
            }
        }
        std::fs::write(&gate_for_reader, "").unwrap();
        RawStream::rest(&mut conn, 8, command_id, outputs)
    })
    .await;
    let _ = std::fs::remove_file(&gate);
    assert_eq!(stream.command_id, id);
    let ends = stream.check_offsets();
    let (end, gaps) = &ends["stdout"];
    // Up to the last byte, `end\n` included: a stream keeps its window for a
    // while after the command ended, so a reader that caught up reads it all.
    assert_eq!(
        *end,
        bytes + 4,
        "the events reach the command's last byte: {end} of {bytes} + 4"
    );
    assert_eq!(
        gaps,
        &vec![(cap, bytes - cap)],
        "one gap: from the retained head's end to the retained window's start"
    );
    let last = stream.last.expect("the result after the events");
    let r = get(&last, "result");
    assert_eq!(
        (
            get(r, "exit_code").as_i64(),
            get(r, "stdout_total_bytes").as_u64()
        ),
        (Some(0), Some(bytes + 4))
    );
    c.destroy_session(&s).await.unwrap();
}

/// A client that streams and reads along (through the client library): `started`
/// first, then output events that carry every byte in order on each stream
/// (the output is far under the event backlog, so nothing may be skipped),
/// then the result, whose output and id agree with the events.
pub async fn stream_and_read(c: &Client) {
    let s = session(c, None).await;
    let mut stream = c
        .exec_stream(ExecParams {
            session_id: s.clone(),
            command: "for i in $(seq 1 2000); do echo line $i; done; echo oops >&2; exit 4".into(),
            timeout_s: Some(60.0),
            ..Default::default()
        })
        .await
        .expect("exec.run stream");
    let (mut id, mut stdout, mut stderr) = (None, Vec::new(), Vec::new());
    within(ANSWER, "the events up to the result", async {
        while let Some(event) = stream.next_event().await.expect("events") {
            match event {
                Event::Started { command_id } => {
                    assert!(id.is_none(), "one `started`");
                    id = Some(command_id);
                }
                Event::Output {
                    stream,
                    offset,
                    data,
                } => {
                    assert!(id.is_some(), "`started` comes first");
                    let out = match stream {
                        StreamName::Stdout => &mut stdout,
                        StreamName::Stderr => &mut stderr,
                    };
                    assert_eq!(offset, out.len() as u64, "{stream:?}: no gap, no overlap");
                    out.extend_from_slice(&data);
                }
            }
        }
    })
    .await;
    let r = within(ANSWER, "the result", stream.result())
        .await
        .expect("the result");
    let want: String = (1..=2000).map(|i| format!("line {i}\n")).collect();
    assert_eq!(
        (
            r.exit_code,
            r.command_id.as_deref(),
            r.stdout.as_ref(),
            r.stderr.as_ref()
        ),
        (Some(4), id.as_deref(), want.as_bytes(), &b"oops\n"[..])
    );
    assert_eq!(
        (stdout.as_slice(), stderr.as_slice()),
        (want.as_bytes(), &b"oops\n"[..])
    );
    c.destroy_session(&s).await.unwrap();
}

/// A client that starts a streaming command with stdin open, sees its first
/// output and hangs up mid-stream; from another connection the command is
/// found by the id of its `started` event, written to, and read to its end:
/// all its output and its result are there, and the session goes on.
pub async fn reattach(c: &Client, socket: &Path) {
    let s = session(c, None).await;
    let id = {
        let first = Client::connect(socket).await.expect("connect");
        let mut stream = first
            .exec_stream(ExecParams {
                session_id: s.clone(),
                command: "echo start; read x; echo got $x".into(),
                stdin_open: true,
                timeout_s: Some(60.0),
                ..Default::default()
            })
            .await
            .expect("exec.run stream");
        let (mut id, mut out) = (None, Vec::new());
        within(ANSWER, "`started` and the first output", async {
            while !out.ends_with(b"start\n") {
                match stream.next_event().await.expect("events") {
                    Some(Event::Started { command_id }) => id = Some(command_id),
                    Some(Event::Output {
                        stream: StreamName::Stdout,
                        offset,
                        data,
                    }) => {
                        assert!(id.is_some(), "`started` comes first");
                        assert_eq!(offset, out.len() as u64);
                        out.extend_from_slice(&data);
                    }
                    other => panic!("before the command waits for input: {other:?}"),
                }
            }
        })
        .await;
        id.unwrap()
        // The first connection closes here, mid-stream.
    };
    assert_eq!(c.write(&id, b"hello\n", true).await.expect("exec.write"), 6);
    let (stdout, stderr, result) = read_to_end(c, &id).await;
    assert_eq!(
        (stdout.as_slice(), stderr.as_slice()),
        (&b"start\ngot hello\n"[..], &b""[..])
    );
    assert_eq!(
        (result.exit_code, result.command_id.as_deref()),
        (Some(0), Some(id.as_str()))
    );
    let r = exec_bounded(c, &s, cmd("echo next", 10.0)).await;
    assert_eq!(r.stdout.as_ref(), b"next\n");
    c.destroy_session(&s).await.unwrap();
}

/// `exec.start` with stdin open, `exec.write`, `exec.read` until the echo,
/// `exec.cancel` by id: the command ends cancelled with what it wrote, a
/// second cancel finds nothing running, a write after the end is
/// `INVALID_REQUEST`, and the session runs its next command.
pub async fn start_write_cancel(c: &Client) {
    let s = session(c, None).await;
    let id = c
        .start(ExecParams {
            session_id: s.clone(),
            command: "cat".into(),
            stdin_open: true,
            timeout_s: Some(60.0),
            ..Default::default()
        })
        .await
        .expect("exec.start");
    assert_eq!(c.write(&id, b"ping\n", false).await.expect("exec.write"), 5);
    let mut out = Vec::new();
    within(ANSWER, "the echo of the write", async {
        while out != b"ping\n" {
            let r = c
                .read(ReadParams {
                    command_id: id.clone(),
                    stdout_offset: out.len() as u64,
                    stderr_offset: 0,
                    wait_s: Some(10.0),
                })
                .await
                .expect("exec.read");
            assert!(!r.done, "cat runs until its stdin ends");
            out.extend_from_slice(&r.stdout);
        }
    })
    .await;
    assert!(c.cancel_command(&id).await.expect("exec.cancel"));
    let (stdout, _, result) = read_to_end(c, &id).await;
    assert_eq!(
        (stdout.as_slice(), result.killed_by),
        (&b"ping\n"[..], Some(KilledBy::Cancelled))
    );
    assert!(
        !c.cancel_command(&id).await.expect("exec.cancel"),
        "nothing left to cancel"
    );
    let e = c
        .write(&id, b"late", false)
        .await
        .expect_err("a write after the end");
    assert_eq!(e.code(), Some("INVALID_REQUEST"), "{e}");
    let r = exec_bounded(c, &s, cmd("echo next", 10.0)).await;
    assert_eq!(r.stdout.as_ref(), b"next\n");
    c.destroy_session(&s).await.unwrap();
}

/// CommandActors panic while readers wait: in one session a started `sleep`
/// with two `exec.read`s (`wait_s` 30) in flight from two connections, in
/// another a streaming `exec.run`. Every waiting read and the stream answer
/// `INTERNAL` within 10 s (not at their 30 s), the commands' processes die,
/// the sessions run their next command, and a later read of the struck
/// command is `INTERNAL` too. Two actor failures.
pub async fn command_panic_with_readers(c: &Client, socket: &Path, work_dir: &Path) {
    let started = session(c, None).await;
    let streamed = session(c, None).await;
    let pidfile = |s: &str| work_dir.join(format!("{s}.readers.pid"));
    let id = c
        .start(ExecParams {
            session_id: started.clone(),
            command: format!(
                "sh -c 'echo $$ > {}; exec sleep 30'",
                pidfile(&started).display()
            ),
            timeout_s: Some(60.0),
            ..Default::default()
        })
        .await
        .expect("exec.start");
    let started_pid = read_pid_file(&pidfile(&started)).await;
    let mut readers = Vec::new();
    for _ in 0..2 {
        let reader = Arc::new(Client::connect(socket).await.expect("connect"));
        let (r, id) = (reader.clone(), id.clone());
        let read = tokio::spawn(async move {
            r.read(ReadParams {
                command_id: id,
                stdout_offset: 0,
                stderr_offset: 0,
                wait_s: Some(30.0),
            })
            .await
        });
        // Answered after the read was taken off this connection.
        assert!(reader.ping().await.expect("ping").pong);
        readers.push((reader, read));
    }
    let streamer = Arc::new(Client::connect(socket).await.expect("connect"));
    let (st, s2, file) = (streamer.clone(), streamed.clone(), pidfile(&streamed));
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let stream = tokio::spawn(async move {
        let mut stream = st
            .exec_stream(ExecParams {
                session_id: s2,
                command: format!("sh -c 'echo $$ > {}; exec sleep 30'", file.display()),
                timeout_s: Some(60.0),
                ..Default::default()
            })
            .await?;
        let mut started_tx = Some(started_tx);
        while let Some(event) = stream.next_event().await? {
            if let (Event::Started { .. }, Some(tx)) = (event, started_tx.take()) {
                let _ = tx.send(());
            }
        }
        stream.result().await
    });
    within(ANSWER, "the streaming run's `started`", started_rx)
        .await
        .expect("the started event");
    let streamed_pid = read_pid_file(&pidfile(&streamed)).await;
    for (_, read) in &readers {
        assert!(!read.is_finished(), "a read answered before the fault");
    }

    let struck = std::time::Instant::now();
    for s in [&started, &streamed] {
        assert_eq!(
            inject(c, FaultTarget::Command, FaultAction::Panic, Some(s)).await,
            1
        );
    }
    let prompt = Duration::from_secs(10);
    for (_, read) in readers {
        let e = within(prompt, "a waiting read's answer to the panic", read)
            .await
            .unwrap()
            .expect_err("a waiting read of the struck command");
        assert_eq!(e.code(), Some("INTERNAL"), "{e}");
    }
    let e = within(prompt, "the stream's answer to the panic", stream)
        .await
        .unwrap()
        .expect_err("the struck streaming run");
    assert_eq!(e.code(), Some("INTERNAL"), "{e}");
    assert!(
        struck.elapsed() < prompt,
        "answered after {:?}",
        struck.elapsed()
    );
    wait_dead(started_pid, "the started command's process dies").await;
    wait_dead(streamed_pid, "the streamed command's process dies").await;
    let e = c
        .read(ReadParams {
            command_id: id,
            stdout_offset: 0,
            stderr_offset: 0,
            wait_s: None,
        })
        .await
        .expect_err("a read after the panic");
    assert_eq!(e.code(), Some("INTERNAL"), "{e}");
    for s in [&started, &streamed] {
        let r = exec_bounded(c, s, cmd("echo next", 10.0)).await;
        assert_eq!(r.stdout.as_ref(), b"next\n", "the session goes on");
        c.destroy_session(s).await.unwrap();
    }
}

// ------------------------------------------- the daemon inside its own bounds

/// A map value from its entries.
fn map(entries: Vec<(&str, rmpv::Value)>) -> rmpv::Value {
    rmpv::Value::Map(entries.into_iter().map(|(k, v)| (k.into(), v)).collect())
}

/// Answers this small or smaller whatever the request's size: an error
/// echoes only a short prefix of a value the client sent.
const SMALL_ANSWER: usize = 1024;

/// The encoded size of `value`.
fn encoded_size(value: &rmpv::Value) -> usize {
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, value).unwrap();
    bytes.len()
}

/// Reads frames until every id in `ids` has its final frame (events are skipped).
pub fn final_frames(
    conn: &mut RawConn,
    ids: &[u64],
) -> std::collections::HashMap<u64, rmpv::Value> {
    let mut got = std::collections::HashMap::new();
    while got.len() < ids.len() {
        let r = conn.read().expect("an answer");
        if !get(&r, "event").is_nil() {
            continue;
        }
        let id = get(&r, "id").as_u64().expect("an id");
        assert!(ids.contains(&id), "unexpected {r}");
        got.insert(id, r);
    }
    got
}

fn error_message(r: &rmpv::Value) -> String {
    get(get(r, "error"), "message")
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Issue 14's first row: `conns` connections each send 7 requests whose
/// (error) answers they do not read — `session.create` with an env key of
/// `key_bytes`. Meanwhile another connection is served and the daemon's
/// RSS stays under `daemon.1`; read at last, every answer is there,
/// `INVALID_REQUEST` and small (no connection was dropped: the answers are
/// bounded, so nothing piles up).
pub fn unread_error_answers(socket: &Path, daemon: (i32, u64), conns: usize, key_bytes: usize) {
    let key = "k".repeat(key_bytes);
    let req = |id: u64| {
        request(
            id,
            "session.create",
            vec![("env", map(vec![(key.as_str(), "v".into())]))],
        )
    };
    let (pid, rss_bound) = daemon;
    let mut peak = 0;
    let mut unread = Vec::new();
    for _ in 0..conns {
        let mut conn = RawConn::connect(socket);
        for id in 0..7 {
            conn.send(&req(id));
        }
        peak = peak.max(rss_of(pid));
        unread.push(conn);
    }
    let mut other = RawConn::connect(socket);
    other.send(&request(99, "system.ping", vec![]));
    let pong = other.read().expect("another connection is served");
    assert_eq!(get(&pong, "id").as_u64(), Some(99), "{pong}");
    assert!(peak < rss_bound, "daemon RSS {peak} over {rss_bound}");
    // Answers may come in any order; each id has its one.
    let ids: Vec<u64> = (0..7).collect();
    for mut conn in unread {
        for r in final_frames(&mut conn, &ids).values() {
            assert_eq!(error_code(r).as_deref(), Some("INVALID_REQUEST"), "{r}");
            assert!(
                encoded_size(r) < SMALL_ANSWER,
                "a {}-byte answer",
                encoded_size(r)
            );
        }
    }
}

/// Issue 14's rows of huge and ill-formed params: `session.create` with a
/// 1.5 MiB env key or a cwd of control bytes gets a small `INVALID_REQUEST`;
/// a misspelt limit, an enum by index, limits as an array and a timeout or
/// idle timeout under 1 ms are `INVALID_REQUEST` naming what is wrong (none of them applies
/// silently, none creates a session); the connection goes on.
pub fn huge_and_ill_typed_params(socket: &Path) {
    let mut conn = RawConn::connect(socket);
    let session = conn.create_session(1);
    let big = "k".repeat(1536 * 1024);
    let controls = "\u{1}\u{1b}".repeat(512 * 1024);
    let s = || rmpv::Value::from(session.as_str());
    // (method, params, what the message must name)
    type Case<'a> = (&'a str, Vec<(&'a str, rmpv::Value)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "session.create",
            vec![("env", map(vec![(big.as_str(), "v".into())]))],
            "env",
        ),
        (
            "session.create",
            vec![("cwd", controls.as_str().into())],
            "cwd",
        ),
        (
            "session.create",
            vec![("limits", map(vec![("memry_max_bytes", 1.into())]))],
            "memry_max_bytes",
        ),
        (
            "session.create",
            vec![("limits", rmpv::Value::Array(vec![1.into(), 2.into()]))],
            "limits",
        ),
        (
            "session.create",
            vec![("limits", map(vec![("timeout_s", 1e-9.into())]))],
            "below the minimum of",
        ),
        (
            "exec.run",
            vec![
                ("session_id", s()),
                ("command", "true".into()),
                ("keep_output", 1.into()),
            ],
            "keep_output",
        ),
        (
            "exec.run",
            vec![
                ("session_id", s()),
                ("command", "true".into()),
                ("timeout_s", 1e-9.into()),
            ],
            "below the minimum of",
        ),
        (
            "exec.start",
            vec![
                ("session_id", s()),
                ("command", "true".into()),
                ("idle_timeout_s", 1e-9.into()),
            ],
            "idle_timeout_s",
        ),
    ];
    for (i, (method, params, named)) in cases.into_iter().enumerate() {
        conn.send(&request(10 + i as u64, method, params));
        let r = conn.read().expect("an answer");
        assert_eq!(get(&r, "id").as_u64(), Some(10 + i as u64), "case {i}: {r}");
        assert_eq!(
            error_code(&r).as_deref(),
            Some("INVALID_REQUEST"),
            "case {i}: {r}"
        );
        assert!(
            encoded_size(&r) < SMALL_ANSWER,
            "case {i}: a {}-byte answer",
            encoded_size(&r)
        );
        assert!(
            error_message(&r).contains(named),
            "case {i}: {}",
            error_message(&r)
        );
    }
    conn.send(&request(
        30,
        "exec.run",
        vec![("session_id", s()), ("command", "echo ok".into())],
    ));
    let r = conn.read().expect("the connection goes on");
    assert_eq!(
        get(get(&r, "result"), "stdout").as_slice(),
        Some(&b"ok\n"[..]),
        "{r}"
    );
    conn.send(&request(31, "session.destroy", vec![("session_id", s())]));
    assert!(get(&conn.read().unwrap(), "result").is_map());
}

/// Issue 14's row "16 commands flooding both streams": `n` clients, each on
/// a connection of its own, flood both streams in a session of their own at
/// once; each result is capped at `cap` with the true totals
/// (`flood_both_streams`), and the daemon's RSS, sampled throughout, stays
/// under `daemon.1`. (On one connection, `n` capped answers at once would
/// pass a small `max_unsent_bytes` and drop it as a slow reader, by design.)
/// Moves `output_truncated_total` by `n`.
pub async fn flood_many(socket: &Path, n: usize, cap: usize, daemon: (i32, u64)) {
    let mut clients = Vec::new();
    for _ in 0..n {
        clients.push(Client::connect(socket).await.expect("connect"));
    }
    let done = std::sync::atomic::AtomicBool::new(false);
    let floods = async {
        futures::future::join_all(clients.iter().map(|c| flood_both_streams(c, cap))).await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
    };
    let (pid, rss_bound) = daemon;
    let sampler = async {
        let mut peak = 0;
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            peak = peak.max(rss_of(pid));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        peak
    };
    let ((), peak) = tokio::join!(floods, sampler);
    assert!(
        peak < rss_bound,
        "daemon RSS {peak} over {rss_bound} during {n} floods"
    );
}

/// Bytes a process has written so far (`wchar` of /proc/<pid>/io).
fn written_by(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("wchar:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Issue 14's row `(yes &); (yes >&2 &); true`: the command answers at once;
/// its background writers are drained after the answer (each writes far more
/// than the pipe holds: the daemon reads on) and are never killed nor given
/// SIGPIPE; the session runs its next command meanwhile; the writers die with
/// their session. Returns whether the command's own result was truncated
/// (the writers may fill the kept output before the shell ends).
pub async fn background_writers(c: &Client, work_dir: &Path) -> bool {
    let s = session(c, None).await;
    let files = [
        work_dir.join(format!("{s}.yes1")),
        work_dir.join(format!("{s}.yes2")),
    ];
    let r = exec_bounded(
        c,
        &s,
        cmd(
            &format!(
                "(yes & echo $! > {}); (yes >&2 & echo $! > {}); true",
                files[0].display(),
                files[1].display()
            ),
            10.0,
        ),
    )
    .await;
    assert_eq!((r.exit_code, r.timed_out), (Some(0), false), "{r:?}");
    let truncated = r.stdout_truncated || r.stderr_truncated;
    let pids = [
        read_pid_file(&files[0]).await,
        read_pid_file(&files[1]).await,
    ];
    // 2 MiB each: many times what a pipe holds, so the daemon drains them.
    wait_until_async(
        "both background writers are drained past 2 MiB",
        Duration::from_secs(30),
        || async {
            for pid in pids {
                assert!(alive(pid), "a background writer died: {pid}");
            }
            pids.iter().all(|p| written_by(*p) >= 2 << 20)
        },
    )
    .await;
    let r = exec_bounded(c, &s, cmd("echo next", 10.0)).await;
    assert_eq!(
        r.stdout.as_ref(),
        b"next\n",
        "the session runs on meanwhile"
    );
    for pid in pids {
        assert!(alive(pid), "a background writer was killed: {pid}");
    }
    c.destroy_session(&s).await.unwrap();
    for pid in pids {
        wait_dead(pid, "the background writers die with their session").await;
    }
    truncated
}

/// Issue 14's row "`timeout_s: 1` on `sleep 10` took 1.0 s or 3.0 s": the
/// answer comes once the group's live processes are gone, not after waiting
/// out `grace` (the daemon's `kill_grace`, 4 s or more) for a zombie. Timed from the
/// command's shell's death (seen by polling its pid) to the answer, so a
/// loaded machine's slow spawn does not count. Moves `timed_out_total` by 1.
pub async fn timeout_on_time(c: &Client, work_dir: &Path, grace: Duration) {
    let s = session(c, None).await;
    let pidfile = work_dir.join(format!("{s}.timeout.pid"));
    let started = std::time::Instant::now();
    let answered = async {
        let command = format!("echo $$ > {}; sleep 10", pidfile.display());
        let r = exec_bounded(c, &s, cmd(&command, 1.0)).await;
        (r, std::time::Instant::now())
    };
    let died = async {
        let shell = read_pid_file(&pidfile).await;
        while alive(shell) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        std::time::Instant::now()
    };
    let ((r, answered), died) = tokio::join!(answered, died);
    assert_eq!(
        (r.timed_out, r.killed_by),
        (true, Some(KilledBy::Timeout)),
        "{r:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "answered after {:?}",
        started.elapsed()
    );
    // A kill that waited for a zombie answered about `grace` after the
    // death; half of it is far from that and, with a grace of 4 s or more,
    // from the daemon's reaction time on a loaded machine.
    let after_death = answered.saturating_duration_since(died);
    assert!(
        after_death < grace / 2,
        "the answer came {after_death:?} after the command's shell died: it waited for the {grace:?} grace"
    );
    c.destroy_session(&s).await.unwrap();
}

/// Issue 14's row of pipelined requests: `exec.run` then `exec.cancel` in one
/// write cancels the run (the cancel reaches the session after the run);
/// two `exec.run`s in one write give the second `SESSION_BUSY`. Moves
/// `rejected_busy_total` by 1.
pub fn pipelined_run_then_cancel(socket: &Path) {
    let mut conn = RawConn::connect(socket);
    let session = conn.create_session(1);
    let s = || rmpv::Value::from(session.as_str());
    let run = |id: u64, command: &str| {
        request(
            id,
            "exec.run",
            vec![("session_id", s()), ("command", command.into())],
        )
    };
    let cancel = |id: u64| request(id, "exec.cancel", vec![("session_id", s())]);
    conn.send_in_one_write(&[run(2, "sleep 30"), cancel(3)]);
    let got = final_frames(&mut conn, &[2, 3]);
    assert_eq!(
        get(get(&got[&3], "result"), "cancelled").as_bool(),
        Some(true),
        "{}",
        got[&3]
    );
    assert_eq!(
        get(get(&got[&2], "result"), "killed_by").as_str(),
        Some("cancelled"),
        "{}",
        got[&2]
    );
    conn.send_in_one_write(&[run(4, "sleep 30"), run(5, "echo second")]);
    let got = final_frames(&mut conn, &[5]);
    assert_eq!(
        error_code(&got[&5]).as_deref(),
        Some("SESSION_BUSY"),
        "the second run, not the first, is refused: {}",
        got[&5]
    );
    conn.send(&cancel(6));
    let got = final_frames(&mut conn, &[4, 6]);
    assert_eq!(
        get(get(&got[&4], "result"), "killed_by").as_str(),
        Some("cancelled"),
        "{}",
        got[&4]
    );
    conn.send(&request(7, "session.destroy", vec![("session_id", s())]));
    assert!(get(&conn.read().unwrap(), "result").is_map());
}

/// Issue 14's row "a refused connection from a client that writes its request
/// first gets EPIPE": a frame over the size limit, written whole (1 MiB of
/// body, far more than the socket buffers hold) before reading, is read by
/// the daemon until the client is done; then the client reads
/// `FRAME_TOO_LARGE` and the close. Moves `bad_frames_total` by 1.
pub fn refused_writer_reads_error(socket: &Path) {
    let mut conn = RawConn::connect(socket);
    let mut frame = 0xffff_fff0u32.to_be_bytes().to_vec();
    frame.resize(4 + (1 << 20), 0xc0);
    let written = std::io::Write::write_all(&mut conn.stream, &frame);
    assert!(
        written.is_ok(),
        "the refused client's write failed: {written:?}"
    );
    let r = conn.read().expect("the error frame after the write");
    assert_eq!(error_code(&r).as_deref(), Some("FRAME_TOO_LARGE"), "{r}");
    assert!(conn.is_closed(), "closed after FRAME_TOO_LARGE");
}

/// Issue 14's row "one uid opens 256 idle connections": this uid (root)
/// opens idle connections until it is refused; the refusal is
/// `TOO_MANY_CONNECTIONS` with its share, `share`, as the limit, yet a ping
/// on the refused connection is answered (and another request refused with
/// its id), while another uid (`nobody`, through the CLI) is served in full.
/// Once the idle connections close, this uid is served again. Needs root, a
/// daemon that allows uid 65534 with its directory open to it, and global
/// room beyond `share`; it must run alone (every connection of this uid
/// counts). Returns how many refusals this uid saw: the one above, plus any
/// met while the daemon was still closing the idle connections; each moves
/// `connections_refused_total` by 1.
pub fn connection_share(d: &super::TestDaemon, share: u64) -> u64 {
    let mut held = Vec::new();
    let (mut refused, refusal) = loop {
        let mut conn = RawConn::connect(&d.socket);
        conn.send(&request(1, "system.ping", vec![]));
        let r = conn.read().expect("an answer or a refusal");
        if error_code(&r).is_some() {
            break (conn, r);
        }
        assert_eq!(get(&r, "id").as_u64(), Some(1), "{r}");
        held.push(conn);
        assert!(
            held.len() as u64 <= share,
            "served past the share of {share}"
        );
    };
    assert_eq!(
        error_code(&refusal).as_deref(),
        Some("TOO_MANY_CONNECTIONS"),
        "{refusal}"
    );
    assert_eq!(
        get(get(&refusal, "error"), "limit").as_u64(),
        Some(share),
        "{refusal}"
    );
    assert!(get(&refusal, "id").is_nil(), "{refusal}");
    let pong = refused
        .read()
        .expect("the ping on a refused connection is answered");
    assert_eq!(get(&pong, "id").as_u64(), Some(1), "{pong}");
    assert_eq!(
        get(get(&pong, "result"), "pong").as_bool(),
        Some(true),
        "{pong}"
    );
    refused.send(&request(2, "session.list", vec![]));
    let r = refused
        .read()
        .expect("the refusal again, with the request's id");
    assert_eq!(
        (get(&r, "id").as_u64(), error_code(&r).as_deref()),
        (Some(2), Some("TOO_MANY_CONNECTIONS")),
        "{r}"
    );
    let out = super::as_nobody(d, &["session", "list"]);
    assert!(out.status.success(), "another uid is refused: {out:?}");
    drop(held);
    drop(refused);
    // The daemon notices the closes asynchronously: until it has, a new
    // connection is still over the share and refused (and counted).
    let mut refusals = 1;
    super::wait_until("this uid is served again", Duration::from_secs(10), || {
        let mut conn = RawConn::connect(&d.socket);
        conn.send(&request(3, "session.list", vec![]));
        let r = conn.read().expect("an answer or a refusal");
        match error_code(&r).as_deref() {
            None => true,
            Some("TOO_MANY_CONNECTIONS") => {
                refusals += 1;
                false
            }
            Some(other) => panic!("neither served nor refused for the share: {other}: {r}"),
        }
    });
    refusals
}

/// Protocol 2 under the budget: `n` results of `bytes` each retained in one
/// session (more than its `retain_per_session`, `retained`): the readable ones
/// are the newest (the older were pruned or evicted, oldest first), the newest
/// among them whole; the rest are `COMMAND_NOT_FOUND`, nothing else.
pub async fn many_retained(c: &Client, n: usize, bytes: u64, retained: usize) {
    assert!(n > retained, "more than the session retains");
    let s = session(c, None).await;
    let mut ids = Vec::new();
    for _ in 0..n {
        let r = exec_bounded(c, &s, cmd(&format!("head -c {bytes} /dev/zero"), 30.0)).await;
        assert_eq!(r.stdout.len() as u64, bytes);
        ids.push(r.command_id.expect("a command id"));
    }
    let mut found = Vec::new();
    for id in &ids {
        let read = c
            .read(ReadParams {
                command_id: id.clone(),
                stdout_offset: u64::MAX,
                stderr_offset: u64::MAX,
                wait_s: None,
            })
            .await;
        match read {
            Ok(r) => {
                let result = r.result.expect("an ended command's result");
                assert_eq!(result.stdout_total_bytes, bytes);
                found.push(true);
            }
            Err(e) if e.code() == Some("COMMAND_NOT_FOUND") => found.push(false),
            Err(e) => panic!("{id}: {e}"),
        }
    }
    let kept = found.iter().filter(|f| **f).count();
    assert!(kept <= retained, "{kept} of {n} retained: {found:?}");
    assert!(found[n - 1], "the newest result is retained: {found:?}");
    let first_kept = found.iter().position(|f| *f).unwrap();
    assert!(
        found[first_kept..].iter().all(|f| *f),
        "oldest go first: {found:?}"
    );
    let (stdout, _, result) = read_to_end(c, &ids[n - 1]).await;
    assert_eq!((stdout.len() as u64, result.exit_code), (bytes, Some(0)));
    c.destroy_session(&s).await.unwrap();
}
