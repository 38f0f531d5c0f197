//! The cgroup v2 backend where only a pure cgroup v2 kernel can show it: a daemon at a cgroup namespace root (a container) and restarts in the cgroup a daemon left. Runs in the VM of ci/v2-vm.sh only.
//!
//! These checks change the machine's cgroup v2 tree (a namespace, cgroups
//! with processes moved in and out), so they run only where ci/v2-vm.sh says
//! so with `SESSIOND_V2_GUEST=1`. Anywhere else this binary prints one
//! `SKIP` line and passes: it is a test binary of its own without the test
//! harness (`harness = false`), so the line shows in `cargo test`'s output,
//! and `--include-ignored` (which CI passes on its hybrid host) cannot make
//! it run where it cannot work.

mod support;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sessiond::client::Client;
use sessiond::protocol::{CreateParams, ExecParams, KilledBy, SessionLimits};
use support::{DELEGATE_ENV, KillOnDrop, TestDaemon, wait_until};

const GUEST_ENV: &str = "SESSIOND_V2_GUEST";

fn main() {
    if std::env::var(GUEST_ENV).as_deref() != Ok("1") {
        println!(
            "SKIP v2_guest: needs a pure cgroup v2 kernel it may change; ci/v2-vm.sh runs it in a VM ({GUEST_ENV}=1)"
        );
        return;
    }
    let base = PathBuf::from(
        std::env::var_os(DELEGATE_ENV)
            .unwrap_or_else(|| panic!("{GUEST_ENV}=1 needs {DELEGATE_ENV} (a delegated cgroup)")),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    // Futures are lazy: each runs only when its turn comes.
    let tests: Vec<(&str, Pinned)> = vec![
        (
            "a_test_daemon_gets_the_v2_backend",
            Box::pin(a_test_daemon_gets_the_v2_backend()),
        ),
        (
            "a_daemon_stopped_cleanly_restarts_in_the_same_delegated_cgroup",
            Box::pin(a_daemon_stopped_cleanly_restarts_in_the_same_delegated_cgroup()),
        ),
        (
            "a_start_that_fails_after_the_setup_leaves_its_delegated_cgroup_as_it_was",
            Box::pin(
                a_start_that_fails_after_the_setup_leaves_its_delegated_cgroup_as_it_was(
                    base.clone(),
                ),
            ),
        ),
        (
            "a_daemon_at_a_cgroup_namespace_root_uses_v2",
            Box::pin(a_daemon_at_a_cgroup_namespace_root_uses_v2(base)),
        ),
    ];
    // libtest's way: free arguments filter by name, `--skip NAME` leaves out.
    let (mut filters, mut skips) = (Vec::new(), Vec::new());
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--skip" {
            skips.extend(args.next());
        } else if !a.starts_with('-') {
            filters.push(a);
        }
    }
    let chosen = |name: &str| {
        (filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())))
            && !skips.iter().any(|s| name.contains(s.as_str()))
    };
    let tests: Vec<_> = tests.into_iter().filter(|(n, _)| chosen(n)).collect();
    let count = tests.len();
    for (name, test) in tests {
        println!("test v2_guest::{name} ...");
        runtime.block_on(test);
        println!("test v2_guest::{name} ... ok");
    }
    // (A failed check panics: the binary exits non-zero before this line.)
    println!("test result: ok. {count} passed");
}

type Pinned = std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

/// What the other test binaries rely on here: `auto` finds v2 (not `off`).
async fn a_test_daemon_gets_the_v2_backend() {
    let d = TestDaemon::start("[cgroups]\nmode = \"auto\"\n");
    let c = d.client().await;
    assert_eq!(
        c.stats().await.unwrap().runtime.cgroups,
        "v2",
        "{}",
        d.log()
    );
    drop(c);
    d.stop();
}

/// A clean exit leaves the delegated cgroup as it found it (no `daemon`
/// leaf, no controllers enabled: `stop` checks), so the same cgroup takes
/// the next daemon (before, joining it failed with EBUSY).
async fn a_daemon_stopped_cleanly_restarts_in_the_same_delegated_cgroup() {
    let mut d = TestDaemon::start("[cgroups]\nmode = \"v2\"\n");
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    c.run(&s, "true").await.unwrap();
    drop(c);
    d.stop_and_restart();
    let c = d.client().await;
    assert_eq!(c.stats().await.unwrap().runtime.cgroups, "v2");
    let s = c.create_session(CreateParams::default()).await.unwrap();
    assert_eq!(
        c.run(&s, "echo again").await.unwrap().stdout.as_ref(),
        b"again\n"
    );
    drop(c);
    d.stop();
}

/// In a delegated cgroup of its own, a daemon whose start fails after the
/// v2 setup (it moved into `<own>/daemon` and enabled controllers on
/// `<own>`) undoes it: no `daemon` leaf, no subtree, no controllers left
/// enabled, so a daemon started there next works.
async fn a_start_that_fails_after_the_setup_leaves_its_delegated_cgroup_as_it_was(base: PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let own = base.join(format!("failed-{}", std::process::id()));
    std::fs::create_dir(&own).unwrap();
    let (socket, config) = one_off_config(dir.path(), "failed.sock", "v2");
    let serve = |fail: bool| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sessiond"));
        command.args(["serve", "--config"]).arg(&config);
        if fail {
            command.env(sessiond::fault::FAIL_START_ENV, "1");
        }
        in_cgroup(command, &own)
    };
    let out = serve(true).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("cgroups on"), "the v2 setup ran: {log}");
    let left: Vec<_> = std::fs::read_dir(&own)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name())
        .collect();
    assert!(
        left.is_empty(),
        "cgroups left in {}: {left:?}",
        own.display()
    );
    support::assert_no_controllers_enabled(&own);
    assert!(!socket.exists(), "the failed start left its socket");
    // The same cgroup serves a daemon that starts.
    let mut daemon = serve(false)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = KillOnDrop(vec![daemon.id()]);
    // Until a connect succeeds, not until the file exists: between the
    // daemon's bind and its listen a connect is refused (seen once, under
    // emulation).
    wait_until("the next daemon serves", Duration::from_secs(60), || {
        assert!(
            daemon.try_wait().unwrap().is_none(),
            "the next daemon exited"
        );
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    let c = Client::connect(&socket).await.unwrap();
    assert_eq!(c.stats().await.unwrap().runtime.cgroups, "v2");
    drop(c);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(daemon.wait().unwrap().success());
    guard.0.clear();
    std::fs::remove_dir(&own).unwrap();
}

/// A process set to start in the cgroup `dir` (its `cgroup.procs` is
/// written between fork and exec).
/// A config for a daemon started by hand in `dir` (its socket `socket_name`
/// there, cgroups `mode`): the socket's path and the config's.
fn one_off_config(dir: &Path, socket_name: &str, mode: &str) -> (PathBuf, PathBuf) {
    let socket = dir.join(socket_name);
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nsocket = \"{}\"\n[sessions]\ndefault_cwd = \"{}\"\n[cgroups]\nmode = \"{mode}\"\n",
            socket.display(),
            dir.display()
        ),
    )
    .unwrap();
    (socket, config)
}

fn in_cgroup(mut command: Command, dir: &Path) -> Command {
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.procs"))
        .unwrap();
    // SAFETY: write is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

/// `sessiond serve --config config` inside a new cgroup namespace rooted at
/// `ctr`, with cgroup2 mounted afresh at /sys/fs/cgroup: what
/// `docker run --cgroupns=private` gives a container.
fn serve_in_namespace(ctr: &Path, config: &Path, log: &Path) -> Child {
    let mut command = Command::new("unshare");
    command
        .args(["--cgroup", "--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "umount /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec {} serve --config {}",
            env!("CARGO_BIN_EXE_sessiond"),
            config.display()
        ))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    in_cgroup(command, ctr).spawn().unwrap()
}

fn procs(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A container: the daemon (mode `auto`) is at the root of its cgroup
/// namespace, which holds another process too (the container's init). It
/// gets v2, moving both into a leaf; a memory hog is killed by its session's
/// limit; at exit both are back and the cgroup is as it was, so a second
/// daemon starts there the same way. (Before: `auto` fell back to off, `v2`
/// failed on EBUSY.)
async fn a_daemon_at_a_cgroup_namespace_root_uses_v2(base: PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let ctr = base.join(format!("ctr-{}", std::process::id()));
    std::fs::create_dir(&ctr).unwrap();
    let mut init = in_cgroup(
        {
            let mut c = Command::new("sleep");
            c.arg("1000").stdout(Stdio::null()).stderr(Stdio::null());
            c
        },
        &ctr,
    )
    .spawn()
    .unwrap();
    let (socket, config) = one_off_config(dir.path(), "ctr.sock", "auto");
    let log = dir.path().join("daemon.log");
    // A failed check leaves nothing running (the VM goes on with other tests).
    let mut left = KillOnDrop(vec![init.id()]);
    for round in 1..=2 {
        let mut daemon = serve_in_namespace(&ctr, &config, &log);
        left.0.push(daemon.id());
        let logged = || std::fs::read_to_string(&log).unwrap_or_default();
        wait_until(
            "the namespaced daemon accepts connections",
            Duration::from_secs(60),
            || {
                assert!(
                    daemon.try_wait().unwrap().is_none(),
                    "round {round}: the daemon exited: {}",
                    logged()
                );
                std::os::unix::net::UnixStream::connect(&socket).is_ok()
            },
        );
        let c = Client::connect(&socket).await.unwrap();
        assert_eq!(
            c.stats().await.unwrap().runtime.cgroups,
            "v2",
            "round {round}: {}",
            logged()
        );
        let mut in_leaf = procs(&ctr.join("daemon"));
        in_leaf.sort();
        let mut want = vec![daemon.id(), init.id()];
        want.sort();
        assert_eq!(
            in_leaf, want,
            "the daemon and the container's init share the leaf"
        );
        let s = c
            .create_session(CreateParams {
                limits: Some(SessionLimits {
                    memory_max_bytes: Some(64 << 20),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap();
        let r = c
            .exec(ExecParams {
                session_id: s.clone(),
                command: "head -c 300M /dev/zero | tail > /dev/null".into(),
                timeout_s: Some(120.0),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(r.killed_by, Some(KilledBy::MemoryLimit), "{r:?}");
        drop(c);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(daemon.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = daemon.wait().unwrap();
        left.0.pop();
        assert!(status.success(), "round {round}: {status:?}: {}", logged());
        assert!(!socket.exists());
        assert_eq!(procs(&ctr), vec![init.id()], "the container's init is back");
        assert!(!ctr.join("daemon").exists(), "the leaf is removed");
        assert_eq!(
            std::fs::read_to_string(ctr.join("cgroup.subtree_control"))
                .unwrap()
                .trim(),
            "",
            "the controllers we enabled are disabled"
        );
    }
    left.0.clear();
    init.kill().unwrap();
    init.wait().unwrap();
    wait_until(
        "the container cgroup is empty",
        Duration::from_secs(10),
        || procs(&ctr).is_empty(),
    );
    std::fs::remove_dir(&ctr).unwrap();
}
