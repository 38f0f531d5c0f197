//! Isolation between sessions (`isolation = "uid-per-session"`) and the socket nobody can hijack: each session's uid keeps the others out (env, cwd, files, signals, ptrace), RLIMIT_NPROC is per session, uids are reused only clean (after destroy and after a crash), and unsafe socket directories are refused by the daemon and the client.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sessiond::client::Client;
use sessiond::protocol::{CreateParams, ExecResult, SessionLimits};
use support::{TestDaemon, alive, wait_until};

const NOBODY: u32 = 65534;

/// The tests below are `#[ignore]`d for developers who are not root; CI
/// runs them (`--include-ignored`), and there they must really run.
fn needs_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root (uid-per-session and other client uids)"
    );
}

/// Runs the CLI as `nobody` against the daemon: `args` ends with the
/// subcommand's own, `trailing` (after `--`) is a command line to run.
fn as_nobody(d: &TestDaemon, args: &[&str], trailing: Option<&str>) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sessiond"))
        .args(args)
        .arg("--socket")
        .arg(&d.socket)
        .args(trailing.map(|t| ["--", t]).into_iter().flatten())
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .expect("run the CLI as nobody")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn run_ok(c: &Client, s: &str, command: &str) -> String {
    let r = c.run(s, command).await.expect("exec.run");
    assert_eq!(
        r.exit_code,
        Some(0),
        "`{command}`: {}{}",
        text(&r.stdout),
        text(&r.stderr)
    );
    text(&r.stdout)
}

async fn uid_of(c: &Client, s: &str) -> u32 {
    run_ok(c, s, "id -u").await.trim().parse().unwrap()
}

/// Live processes with real uid `uid`.
fn processes_of(uid: u32) -> Vec<i32> {
    sessiond::isolation::cleanup::processes_of(&|u| u == uid)
        .into_iter()
        .map(|(pid, _)| pid)
        .collect()
}

/// SysV IPC objects (any table) owned by `uid`.
fn sysv_objects_of(uid: u32) -> usize {
    ["shm", "sem", "msg"]
        .iter()
        .map(|t| {
            let text = std::fs::read_to_string(format!("/proc/sysvipc/{t}")).unwrap_or_default();
            let mut lines = text.lines();
            let header: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
            let col = header.iter().position(|c| *c == "uid").unwrap();
            lines
                .filter(|l| l.split_whitespace().nth(col) == Some(uid.to_string().as_str()))
                .count()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (uid-per-session, other client uids); CI runs it"]
async fn a_session_cannot_read_signal_or_trace_another() {
    needs_root();
    let d = TestDaemon::start_isolated(
        4,
        "[server]\nsocket_mode = 0o666\nallowed_uids = [0, 65534]\n",
    );
    // Client A: root, through the library; its secret is in the session env.
    let a = Arc::new(d.client().await);
    let sa = a
        .create_session(CreateParams {
            env: Some([("SECRET_A".to_string(), "s3cret-a".to_string())].into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let out = run_ok(
        &a,
        &sa,
        "umask 077; echo private-a > secret.txt; sleep 300 & echo $!; pwd; id -u; id -g; id -G",
    )
    .await;
    let lines: Vec<&str> = out.lines().collect();
    let (bg, home_a, uid_a) = (lines[0], lines[1], lines[2]);
    assert_eq!(lines[3], uid_a, "gid = uid");
    assert_eq!(lines[4], uid_a, "no supplementary groups");
    let meta = std::fs::metadata(home_a).unwrap();
    assert_eq!(
        (meta.uid().to_string(), meta.mode() & 0o7777),
        (uid_a.to_string(), 0o700)
    );
    // A's foreground command waits for a file the test creates after B's attempts.
    let fg = support::spawn_run(
        &a,
        &sa,
        "echo $$ > fg.pid; while [ ! -e release ]; do sleep 0.05; done; echo done",
    );
    let fg_pid = support::scenarios::read_pid_file(&Path::new(home_a).join("fg.pid")).await;

    // Client B: nobody, through the CLI, in a session of its own.
    let o = as_nobody(&d, &["session", "create"], None);
    assert!(o.status.success(), "{o:?}");
    let sb = text(&o.stdout).trim().to_string();
    let script = format!(
        r#"id -u
cat /proc/{bg}/environ >/dev/null 2>&1 && echo environ:read || echo environ:denied
readlink /proc/{bg}/cwd >/dev/null 2>&1 && echo cwd:read || echo cwd:denied
cat {home_a}/secret.txt >/dev/null 2>&1 && echo file:read || echo file:denied
ls {home_a} >/dev/null 2>&1 && echo home:listed || echo home:denied
kill -TERM {fg_pid} 2>/dev/null && echo kill-fg:sent || echo kill-fg:denied
kill -KILL {bg} 2>/dev/null && echo kill-bg:sent || echo kill-bg:denied
/usr/bin/python3 -c 'import ctypes; l = ctypes.CDLL(None, use_errno=True); r = l.ptrace(16, {bg}, 0, 0); print("ptrace:attached" if r == 0 else "ptrace:denied errno=%d" % ctypes.get_errno())'
sleep 30 & kill -KILL $! && echo own-kill:sent"#
    );
    let o = as_nobody(&d, &["run", "--session", &sb], Some(&script));
    let b_out = text(&o.stdout);
    let uid_b = b_out.lines().next().unwrap_or("");
    assert_ne!(uid_b, uid_a, "B runs as a uid of its own: {b_out}");
    for expected in [
        "environ:denied",
        "cwd:denied",
        "file:denied",
        "home:denied",
        "kill-fg:denied",
        "kill-bg:denied",
        "ptrace:denied errno=1",
        // The control: kill works in B's own session.
        "own-kill:sent",
    ] {
        assert!(
            b_out.lines().any(|l| l == expected),
            "B's attempts: expected {expected:?} in\n{b_out}{}",
            text(&o.stderr)
        );
    }

    // A's command ends by itself, untouched; A's background process lives, secret intact.
    std::fs::write(Path::new(home_a).join("release"), "").unwrap();
    let r = fg.await.unwrap().unwrap();
    assert_eq!(
        (r.exit_code, r.signal, r.killed_by, text(&r.stdout)),
        (Some(0), None, None, "done\n".to_string()),
        "A's result shows no foreign signal"
    );
    let bg: i32 = bg.parse().unwrap();
    assert!(alive(bg), "A's background process survived B");
    let environ = std::fs::read(format!("/proc/{bg}/environ")).unwrap();
    assert!(
        text(&environ).contains("SECRET_A=s3cret-a"),
        "the secret was there to steal"
    );

    // Both end; their homes and processes go with them.
    a.destroy_session(&sa).await.unwrap();
    assert!(!Path::new(home_a).exists(), "A's home is removed");
    support::wait_dead(bg, "A's background process dies with its session");
    let o = as_nobody(&d, &["session", "destroy", &sb], None);
    assert!(o.status.success(), "{o:?}");
    let uid_b: u32 = uid_b.parse().unwrap();
    assert!(
        !d.state_dir().join(uid_b.to_string()).exists(),
        "B's home is removed"
    );
    assert!(processes_of(uid_b).is_empty() && processes_of(uid_a.parse().unwrap()).is_empty());
    drop(a);
    d.stop();
}

/// A fork loop in python: how many children it could start (they sleep on).
const FORK_LOOP: &str = r#"/usr/bin/python3 -c '
import os, time
n = 0
try:
    while n < 100:
        if os.fork() == 0:
            time.sleep(120)
            os._exit(0)
        n += 1
except OSError:
    pass
print(n)'"#;

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (uid-per-session, other client uids); CI runs it"]
async fn rlimit_nproc_is_each_sessions_own_budget_without_cgroups() {
    needs_root();
    let d = TestDaemon::start_isolated(2, "[cgroups]\nmode = \"off\"\n");
    let c = d.client().await;
    assert_eq!(c.stats().await.unwrap().runtime.cgroups, "off");
    let limits = Some(SessionLimits {
        rlimit_nproc: Some(16),
        ..Default::default()
    });
    let mut counts = Vec::new();
    let mut sessions = Vec::new();
    for _ in 0..2 {
        let s = c
            .create_session(CreateParams {
                limits: limits.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        // A's children still live while B forks: one shared budget would leave B nothing.
        let n: u32 = run_ok(&c, &s, FORK_LOOP).await.trim().parse().unwrap();
        counts.push(n);
        sessions.push(s);
    }
    for n in &counts {
        assert!(
            (8..16).contains(n),
            "each session forks up to its own limit of 16 processes (shell and python count): {counts:?}"
        );
    }
    for s in &sessions {
        c.destroy_session(s).await.unwrap();
    }
    drop(c);
    d.stop();
}

/// Leaves everything a session can leave behind it: a background process,
/// files in /tmp, /var/tmp and /dev/shm, SysV IPC objects. Returns the
/// background pid and the paths.
async fn leave_traces(c: &Client, s: &str, tag: &str) -> (i32, Vec<PathBuf>) {
    let paths: Vec<PathBuf> = [
        format!("/tmp/iso-{tag}-file"),
        format!("/var/tmp/iso-{tag}-dir"),
        format!("/dev/shm/iso-{tag}-shm"),
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    let out = run_ok(
        c,
        s,
        &format!(
            "echo x > {0}; mkdir {1} && echo y > {1}/inner; echo z > {2}; ipcmk -M 4096 >/dev/null; ipcmk -Q >/dev/null; ipcmk -S 1 >/dev/null; setsid sleep 300 > /dev/null 2>&1 < /dev/null & echo $!",
            paths[0].display(),
            paths[1].display(),
            paths[2].display()
        ),
    )
    .await;
    for p in &paths {
        assert!(p.exists(), "{} was made", p.display());
    }
    let pid = out.trim().parse().unwrap();
    (pid, paths)
}

fn assert_all_gone(uid: u32, pid: i32, paths: &[PathBuf], home: &Path) {
    assert!(!alive(pid), "the background process of uid {uid} is dead");
    assert!(processes_of(uid).is_empty(), "no process of uid {uid}");
    for p in paths {
        assert!(
            std::fs::symlink_metadata(p).is_err(),
            "{} removed",
            p.display()
        );
    }
    assert_eq!(sysv_objects_of(uid), 0, "no SysV IPC object of uid {uid}");
    assert!(!home.exists(), "home {} removed", home.display());
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (uid-per-session, other client uids); CI runs it"]
async fn a_uid_is_reused_only_after_everything_of_its_session_is_gone() {
    needs_root();
    let d = TestDaemon::start_isolated(2, "");
    let c = d.client().await;
    let s1 = c.create_session(CreateParams::default()).await.unwrap();
    let u1 = uid_of(&c, &s1).await;
    let home1 = d.state_dir().join(u1.to_string());
    let (pid, paths) = leave_traces(&c, &s1, &d.tag).await;
    assert_eq!(sysv_objects_of(u1), 3);
    let s2 = c.create_session(CreateParams::default()).await.unwrap();
    let u2 = uid_of(&c, &s2).await;
    assert_ne!(u1, u2, "never two live sessions on one uid");

    c.destroy_session(&s1).await.unwrap();
    // Answered once the uid is clean: nothing to wait for.
    support::wait_dead(pid, "the setsid'd process of the destroyed session");
    assert_all_gone(u1, pid, &paths, &home1);

    // The only free uid is u1 again: a fresh home, nothing of before.
    let s3 = c.create_session(CreateParams::default()).await.unwrap();
    assert_eq!(uid_of(&c, &s3).await, u1);
    assert_eq!(
        run_ok(&c, &s3, "ls -A; pwd").await,
        format!("{}\n", home1.display())
    );
    for s in [&s2, &s3] {
        c.destroy_session(s).await.unwrap();
    }
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (uid-per-session, other client uids); CI runs it"]
async fn a_panicking_session_still_frees_its_uid_clean() {
    needs_root();
    // No cgroups: only the lease's Drop can find the setsid'd process.
    let d = TestDaemon::start_isolated(1, "[cgroups]\nmode = \"off\"\n");
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let uid = uid_of(&c, &s).await;
    let home = d.state_dir().join(uid.to_string());
    let (pid, paths) = leave_traces(&c, &s, &d.tag).await;
    use sessiond::fault::{FaultAction, FaultTarget};
    let reached =
        support::scenarios::inject(&c, FaultTarget::Session, FaultAction::Panic, Some(&s)).await;
    assert_eq!(reached, 1);
    support::wait_dead(pid, "the panicked session's setsid'd process is killed");
    wait_until(
        "the panicked session's home is removed",
        Duration::from_secs(5),
        || !home.exists(),
    );
    // The one uid of the range is handed out again, and nothing of before is left.
    // (Polled: until then, create is TOO_MANY_SESSIONS or finds no free uid.)
    let deadline = Instant::now() + Duration::from_secs(5);
    let next = loop {
        match c.create_session(CreateParams::default()).await {
            Ok(s) => break s,
            Err(e) => assert!(
                Instant::now() < deadline,
                "the uid is never free again: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(uid_of(&c, &next).await, uid);
    for p in &paths {
        assert!(
            std::fs::symlink_metadata(p).is_err(),
            "{} removed",
            p.display()
        );
    }
    assert_eq!(sysv_objects_of(uid), 0);
    c.destroy_session(&next).await.unwrap();
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (uid-per-session, other client uids); CI runs it"]
async fn uids_are_handed_out_least_recently_used() {
    needs_root();
    let d = TestDaemon::start_isolated(3, "");
    let c = d.client().await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let s = c.create_session(CreateParams::default()).await.unwrap();
        seen.push(uid_of(&c, &s).await);
        c.destroy_session(&s).await.unwrap();
    }
    assert_ne!(seen[0], seen[1]);
    assert_ne!(seen[1], seen[2]);
    assert_ne!(seen[0], seen[2]);
    assert_eq!(
        seen[3], seen[0],
        "after all three, the first is the least recently used"
    );
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (uid-per-session, other client uids); CI runs it"]
async fn a_crashed_daemons_uids_are_recovered_before_reuse() {
    needs_root();
    // No cgroups: only the uid recovery can find the setsid'd process.
    let mut d = TestDaemon::start_isolated(2, "[cgroups]\nmode = \"off\"\n");
    let c = d.client().await;
    let s1 = c.create_session(CreateParams::default()).await.unwrap();
    let u1 = uid_of(&c, &s1).await;
    let home1 = d.state_dir().join(u1.to_string());
    let (pid, paths) = leave_traces(&c, &s1, &d.tag).await;
    drop(c);

    d.crash_and_restart();
    let c = d.client().await;
    // The new daemon serves only after its recovery.
    assert!(c.ping().await.unwrap().pong);
    support::wait_dead(pid, "the dead daemon's session process is killed at start");
    assert_all_gone(u1, pid, &paths, &home1);
    assert!(
        d.log()
            .contains("recovered the uids of a dead daemon's sessions"),
        "{}",
        d.log()
    );
    // Both uids are free again; whichever is u1 runs only its own processes.
    let (a, b) = (
        c.create_session(CreateParams::default()).await.unwrap(),
        c.create_session(CreateParams::default()).await.unwrap(),
    );
    let uids = [uid_of(&c, &a).await, uid_of(&c, &b).await];
    assert!(uids.contains(&u1), "{uids:?}");
    for s in [&a, &b] {
        c.destroy_session(s).await.unwrap();
    }
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (uid-per-session, other client uids); CI runs it"]
async fn homes_cwd_and_private_tmp() {
    needs_root();
    let d = TestDaemon::start_isolated(2, "[commands]\nprivate_tmp = true\n");
    let c = d.client().await;
    // A directory the session's uid cannot enter: refused at create, naming why.
    let closed = d.dir.path().join("closed");
    std::fs::create_dir(&closed).unwrap();
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
    let err = c
        .create_session(CreateParams {
            cwd: Some(closed.display().to_string()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("INVALID_REQUEST"), "{err}");
    assert!(
        err.to_string()
            .contains("cannot be entered by the session's uid"),
        "{err}"
    );
    // One it can enter is fine.
    let s = c
        .create_session(CreateParams {
            cwd: Some("/".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(run_ok(&c, &s, "pwd").await, "/\n");
    c.destroy_session(&s).await.unwrap();

    // The default: the home, with HOME, USER and TMPDIR pointing into it.
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let out = run_ok(&c, &s, "pwd; echo $HOME; echo $USER; echo $TMPDIR; id -u").await;
    let l: Vec<&str> = out.lines().collect();
    let home = d.state_dir().join(l[4]);
    assert_eq!(l[0], home.display().to_string());
    assert_eq!(l[1], l[0]);
    assert_eq!(l[2], l[4]);
    assert_eq!(l[3], home.join("tmp").display().to_string());
    for dir in [&home, &home.join("tmp")] {
        let m = std::fs::metadata(dir).unwrap();
        assert_eq!(
            (m.uid().to_string(), m.mode() & 0o7777),
            (l[4].to_string(), 0o700)
        );
    }
    c.destroy_session(&s).await.unwrap();
    assert!(!home.exists());
    drop(c);
    d.stop();
}

// ------------------------------------------------------------ socket hijack

/// Runs `sessiond serve` with `args` and expects it to refuse to start within
/// 10 s; returns its stderr. A daemon that starts anyway fails the test.
fn serve_must_fail(config: &Path, args: &[&str], env: &[(&str, &Path)]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sessiond"));
    cmd.args(["serve", "--config"])
        .arg(config)
        .args(args)
        .env_remove("XDG_RUNTIME_DIR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the daemon started (args {args:?}) instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    err
}

fn plain_config(dir: &Path) -> PathBuf {
    let config = dir.join("config.toml");
    std::fs::write(&config, "[cgroups]\nmode = \"off\"\n").unwrap();
    config
}

fn cli(args: &[&str], socket: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sessiond"))
        .args(args)
        .arg("--socket")
        .arg(socket)
        .output()
        .unwrap()
}

#[test]
#[ignore = "needs root (uid-per-session, other client uids); CI runs it"]
fn a_world_writable_or_foreign_socket_dir_is_refused_by_daemon_and_client() {
    needs_root();
    let t = tempfile::tempdir().unwrap();
    let config = plain_config(t.path());
    // The reproduction: `nobody` made the directory, 0777.
    let theirs = t.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o777)).unwrap();
    let sock = theirs.join("sessiond.sock");
    let err = serve_must_fail(&config, &["--socket", sock.to_str().unwrap()], &[]);
    assert!(
        err.contains("owned by uid 65534") && err.contains("chown"),
        "{err}"
    );
    // Root's, but open to all: refused too.
    let open = t.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = serve_must_fail(
        &config,
        &["--socket", open.join("s.sock").to_str().unwrap()],
        &[],
    );
    assert!(err.contains("mode 0777") && err.contains("chmod"), "{err}");

    // The client refuses the attacker's socket there, and says why...
    let attacker = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::os::unix::fs::lchown(&sock, Some(NOBODY), Some(NOBODY)).unwrap();
    let o = cli(&["ping"], &sock);
    let err = text(&o.stderr);
    assert!(
        !o.status.success() && err.contains("refusing to connect"),
        "{err}"
    );
    assert!(
        err.contains("owned by uid 65534") && err.contains("--insecure-socket-dir"),
        "{err}"
    );
    attacker.set_nonblocking(true).unwrap();
    assert!(attacker.accept().is_err(), "nothing reached the attacker");
    // ...and only the explicit opt-out connects (to the attacker, as asked).
    let ping = Command::new(env!("CARGO_BIN_EXE_sessiond"))
        .args(["ping", "--insecure-socket-dir", "--socket"])
        .arg(&sock)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut accepted = None;
    wait_until(
        "the opt-out reaches the attacker",
        Duration::from_secs(10),
        || {
            accepted = attacker.accept().ok();
            accepted.is_some()
        },
    );
    drop(accepted);
    let o = ping.wait_with_output().unwrap();
    assert!(
        !o.status.success() && !text(&o.stderr).contains("refusing"),
        "{o:?}"
    );
}

#[test]
#[ignore = "needs root (uid-per-session, other client uids); CI runs it"]
fn a_rename_over_the_socket_by_another_uid_is_impossible_in_a_sticky_dir() {
    needs_root();
    // A sticky, root-owned, world-writable dir (like /tmp) is accepted for a
    // root daemon: others may create names there, not replace ours.
    let t = tempfile::tempdir().unwrap();
    let sticky = t.path().join("sticky");
    std::fs::create_dir(&sticky).unwrap();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let sock = sticky.join("sessiond.sock");
    let config = plain_config(t.path());
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_sessiond"))
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--socket")
        .arg(&sock)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the daemon serves", Duration::from_secs(10), || {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    });
    let attack = format!(
        "import os, socket\ns = socket.socket(socket.AF_UNIX)\ns.bind('{evil}')\ntry:\n    os.rename('{evil}', '{sock}')\n    print('renamed')\nexcept PermissionError:\n    print('refused')\n",
        evil = sticky.join("evil.sock").display(),
        sock = sock.display()
    );
    let o = Command::new("/usr/bin/python3")
        .args(["-c", &attack])
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    assert_eq!(text(&o.stdout), "refused\n", "{o:?}");
    let o = cli(&["ping"], &sock);
    assert!(o.status.success(), "the daemon still answers: {o:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(daemon.wait().unwrap().success());
}

#[test]
#[ignore = "needs root (uid-per-session, other client uids); CI runs it"]
fn a_symlinked_socket_dir_or_symlink_at_the_socket_is_refused() {
    needs_root();
    let t = tempfile::tempdir().unwrap();
    let config = plain_config(t.path());
    let real = t.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = t.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let err = serve_must_fail(
        &config,
        &["--socket", link.join("s.sock").to_str().unwrap()],
        &[],
    );
    assert!(err.contains("link") && err.contains("symlink"), "{err}");
    // A symlink at the socket path itself: named, not followed, not replaced.
    let at = real.join("s.sock");
    std::os::unix::fs::symlink("/nonexistent-target", &at).unwrap();
    let err = serve_must_fail(&config, &["--socket", at.to_str().unwrap()], &[]);
    assert!(
        err.contains("is a symlink") && err.contains("s.sock"),
        "{err}"
    );
    assert!(
        std::fs::symlink_metadata(&at)
            .unwrap()
            .file_type()
            .is_symlink()
    );

    // The client refuses a live daemon's socket reached through a symlinked dir.
    let d = TestDaemon::start("");
    let via = t.path().join("via");
    std::os::unix::fs::symlink(d.dir.path(), &via).unwrap();
    let o = cli(&["ping"], &via.join("sessiond.sock"));
    let err = text(&o.stderr);
    assert!(!o.status.success() && err.contains("symlink"), "{err}");
    // The daemon's own dir, opened to all after start: the client refuses it too.
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let o = cli(&["ping"], &d.socket);
    let refused = text(&o.stderr);
    let o2 = cli(&["ping", "--insecure-socket-dir"], &d.socket);
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(
        refused.contains("refusing to connect") && refused.contains("0777"),
        "{refused}"
    );
    assert!(o2.status.success(), "{o2:?}");
    d.stop();
}

#[test]
#[ignore = "needs root (uid-per-session, other client uids); CI runs it"]
fn a_default_socket_dir_with_the_wrong_mode_or_owner_is_a_start_error() {
    needs_root();
    let t = tempfile::tempdir().unwrap();
    let config = plain_config(t.path());
    let xdg = t.path().join("xdg");
    std::fs::create_dir(&xdg).unwrap();
    std::fs::set_permissions(&xdg, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = serve_must_fail(&config, &[], &[("XDG_RUNTIME_DIR", &xdg)]);
    assert!(
        err.contains(&xdg.display().to_string()) && err.contains("chmod"),
        "{err}"
    );
    std::fs::set_permissions(&xdg, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&xdg, Some(NOBODY), None).unwrap();
    let err = serve_must_fail(&config, &[], &[("XDG_RUNTIME_DIR", &xdg)]);
    assert!(
        err.contains("owned by uid 65534") && err.contains("chown"),
        "{err}"
    );
}

// ------------------------------------------------------------ cost

fn p50(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn time_true(c: &Client, s: &str) -> Duration {
    let t = Instant::now();
    let r: ExecResult = c.run(s, "true").await.unwrap();
    assert_eq!(r.exit_code, Some(0));
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: prints exec.run `true` p50 under shared and uid-per-session"]
async fn measure_exec_true_p50_shared_vs_uid_per_session() {
    needs_root();
    let shared = TestDaemon::start("");
    let isolated = TestDaemon::start_isolated(2, "");
    let (cs, ci) = (shared.client().await, isolated.client().await);
    let ss = cs.create_session(CreateParams::default()).await.unwrap();
    let si = ci.create_session(CreateParams::default()).await.unwrap();
    for _ in 0..30 {
        time_true(&cs, &ss).await;
        time_true(&ci, &si).await;
    }
    let rounds = 400;
    let (mut ts, mut ti) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        ts.push(time_true(&cs, &ss).await);
        ti.push(time_true(&ci, &si).await);
    }
    let (ps, pi) = (p50(ts), p50(ti));
    println!(
        "exec.run `true`, {rounds} rounds interleaved: p50 shared {:.3} ms, uid-per-session {:.3} ms ({:+.1}%)",
        ps.as_secs_f64() * 1e3,
        pi.as_secs_f64() * 1e3,
        (pi.as_secs_f64() / ps.as_secs_f64() - 1.0) * 100.0
    );
    // A session's start and end cost more: home, cleanup walk of the shared tmp dirs.
    let (mut cs_t, mut ci_t) = (Vec::new(), Vec::new());
    for _ in 0..50 {
        for (c, v) in [(&cs, &mut cs_t), (&ci, &mut ci_t)] {
            let t = Instant::now();
            let s = c.create_session(CreateParams::default()).await.unwrap();
            c.destroy_session(&s).await.unwrap();
            v.push(t.elapsed());
        }
    }
    println!(
        "session.create + session.destroy, 50 rounds: p50 shared {:.3} ms, uid-per-session {:.3} ms",
        p50(cs_t).as_secs_f64() * 1e3,
        p50(ci_t).as_secs_f64() * 1e3
    );
    drop((cs, ci));
    shared.stop();
    isolated.stop();
}
