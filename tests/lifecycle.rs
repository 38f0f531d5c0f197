//! The daemon's lifetime: graceful and forced shutdown, socket ownership, connection admission.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use sessiond::protocol::{CreateParams, KilledBy};
use support::{KillOnDrop, TestDaemon, alive, spawn_run, wait_until, wait_until_async};

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_running_commands_finish_within_the_grace() {
    let mut d = TestDaemon::start("[server]\nshutdown_grace = \"20s\"\n");
    let c = Arc::new(d.client().await);
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let runner = {
        let (c, s) = (c.clone(), s.clone());
        tokio::spawn(async move {
            c.run(
                &s,
                "touch started; while [ ! -e finish ]; do sleep 0.02; done; echo finished",
            )
            .await
        })
    };
    wait_until("the command runs", Duration::from_secs(10), || {
        d.work_dir().join("started").exists()
    });
    d.signal(Signal::SIGTERM);
    wait_until_async("the daemon drains", Duration::from_secs(10), || async {
        c.stats().await.unwrap().runtime.draining
    })
    .await;
    // Draining: health checks answer, new work is refused.
    assert!(c.ping().await.unwrap().pong);
    let e = c.create_session(CreateParams::default()).await.unwrap_err();
    assert_eq!(e.code(), Some("SHUTTING_DOWN"));
    let other = c.create_session(CreateParams::default()).await.unwrap_err();
    assert_eq!(other.code(), Some("SHUTTING_DOWN"));
    let e = c.run(&s, "true").await.unwrap_err();
    assert_eq!(e.code(), Some("SHUTTING_DOWN"));
    // The running command finishes normally.
    std::fs::write(d.work_dir().join("finish"), "").unwrap();
    let r = runner.await.unwrap().unwrap();
    assert_eq!(r.exit_code, Some(0));
    assert_eq!(String::from_utf8_lossy(&r.stdout), "finished\n");
    let status = d.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    assert!(!d.socket.exists());
    d.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_kills_what_outlives_the_grace_with_killed_by_shutdown() {
    let mut d = TestDaemon::start("[server]\nshutdown_grace = \"300ms\"\n");
    let c = Arc::new(d.client().await);
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let r = c.run(&s, "sleep 300 & echo $!").await.unwrap();
    let background = support::printed_pid(&r);
    let runner = spawn_run(&c, &s, "echo $$ > shell.pid; sleep 300");
    wait_until("the command runs", Duration::from_secs(10), || {
        d.work_dir().join("shell.pid").exists()
    });
    d.signal(Signal::SIGTERM);
    let r = runner.await.unwrap().unwrap();
    assert_eq!(r.killed_by, Some(KilledBy::Shutdown));
    assert_eq!(r.signal, Some(9));
    let status = d.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    assert!(!d.socket.exists());
    assert!(!alive(background));
    d.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_exits_at_once_and_still_kills_every_child() {
    let mut d = TestDaemon::start("[server]\nshutdown_grace = \"60s\"\n");
    let c = Arc::new(d.client().await);
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let runner = spawn_run(&c, &s, "echo $$ > shell.pid; sleep 300");
    wait_until("the command runs", Duration::from_secs(10), || {
        d.work_dir().join("shell.pid").exists()
    });
    d.signal(Signal::SIGTERM);
    wait_until_async("the daemon drains", Duration::from_secs(10), || async {
        c.stats().await.unwrap().runtime.draining
    })
    .await;
    d.signal(Signal::SIGINT);
    let status = d.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "a forced stop exits 1");
    assert!(!d.socket.exists());
    d.assert_no_leaks();
    // The client sees the connection end instead of an answer.
    assert!(runner.await.unwrap().is_err());
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_is_not() {
    let d = TestDaemon::start("");
    // A second daemon on the same live socket refuses to start.
    let out = Command::new(env!("CARGO_BIN_EXE_sessiond"))
        .args(["serve", "--socket"])
        .arg(&d.socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already serving"),
        "{out:?}"
    );
    // ...and left the first one's socket alone.
    let mut conn = d.raw();
    conn.send(&support::request(1, "system.ping", vec![]));
    assert!(conn.read().is_some());
    drop(conn);
    d.stop();

    // A socket file nobody listens on (a daemon that died) is replaced.
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    // Defaults, except cgroups: the default cgroup parent may belong to a real daemon on this host.
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[cgroups]\nmode = \"off\"\n").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sessiond"))
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--socket")
        .arg(&stale)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        "the daemon serves on the stale path",
        Duration::from_secs(10),
        || std::os::unix::net::UnixStream::connect(&stale).is_ok(),
    );
    let mode = std::fs::metadata(&stale).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "default socket mode");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
    assert!(!stale.exists());
}

#[test]
fn connections_over_the_limit_get_an_error_frame() {
    let d = TestDaemon::start("[server]\nmax_connections = 2\nmax_connections_per_client = 2\n");
    // Fill both slots (the harness's readiness probe may hold one for a moment).
    let mut served = Vec::new();
    wait_until(
        "two connections are served",
        Duration::from_secs(10),
        || {
            let mut conn = d.raw();
            if conn.try_send(&support::request(1, "system.ping", vec![]))
                && conn
                    .read()
                    .is_some_and(|r| support::error_code(&r).is_none())
            {
                served.push(conn);
            }
            served.len() == 2
        },
    );
    let (a, b) = (served.remove(0), served.remove(0));
    let mut c = d.raw();
    let r = c.read().expect("an error frame, not a silent close");
    assert_eq!(
        support::error_code(&r).as_deref(),
        Some("TOO_MANY_CONNECTIONS")
    );
    assert_eq!(
        support::get(support::get(&r, "error"), "limit").as_u64(),
        Some(2)
    );
    assert!(c.is_closed());
    // A slot frees when a connection ends.
    drop(a);
    wait_until("a slot frees", Duration::from_secs(10), || {
        let mut conn = d.raw();
        // Until the slot is free, this one is refused and may be closed before we write.
        conn.try_send(&support::request(2, "system.ping", vec![]))
            && conn
                .read()
                .is_some_and(|r| support::error_code(&r).is_none())
    });
    drop((b, c));
    d.stop();
}

#[test]
#[ignore = "needs root (connects as another uid)"]
fn a_uid_that_is_not_allowed_gets_permission_denied() {
    assert!(nix::unistd::getuid().is_root(), "needs root");
    let d = TestDaemon::start("[server]\nsocket_mode = 0o666\n");
    // Let uid 65534 reach the socket through the temp dir.
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sessiond"))
        .args(["ping", "--socket"])
        .arg(&d.socket)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("PERMISSION_DENIED"),
        "{out:?}"
    );
    d.stop();
}

/// The daemon raises its soft limit of open files to its hard limit: its
/// files grow with what it hosts (two command leaves of 8 files per session
/// on cgroup v1) past the 1 024 a service often starts with.
#[test]
fn the_daemon_raises_its_open_file_limit_to_the_hard_limit() {
    let hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap()
        .1;
    let soft = 256.min(hard);
    assert_ne!(
        soft, hard,
        "a hard limit above 256 to start the daemon below"
    );
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[cgroups]\nmode = \"off\"\n").unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_sessiond"));
    command
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--socket")
        .arg(&socket)
        .stderr(std::process::Stdio::null());
    // SAFETY: setrlimit only, between fork and exec.
    unsafe {
        command.pre_exec(move || {
            let lowered = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let mut child = command.spawn().unwrap();
    // Killed if the test fails before it stops the daemon.
    let mut guard = KillOnDrop(vec![child.id()]);
    wait_until("the daemon serves", Duration::from_secs(10), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let open_files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    // "Max open files <soft> <hard> files"
    assert_eq!(open_files[3], hard.to_string(), "soft limit: {limits}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
    guard.0.clear();
}
