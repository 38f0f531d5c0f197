//! Test support: start the real daemon in a temp dir, talk to it (client library or raw frames), wait on conditions, check for leaks.
#![allow(dead_code)]

pub mod scenarios;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use std::sync::Arc;

use sessiond::client::{Client, ClientError};
use sessiond::process::procfs;
use sessiond::protocol::ExecResult;

/// SIGKILLs its pids when dropped: a test leaks no process it started even
/// when a check fails and unwinds.
pub struct KillOnDrop(pub Vec<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Waits until `cond` holds, polling, or panics after `limit` naming `what`.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    wait_for(what, limit, || {
        if cond() { Ok(()) } else { Err(String::new()) }
    });
}

/// [`wait_until`] for a check that says what it found when it does not
/// hold: the last finding is in the panic.
pub fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + limit;
    loop {
        let finding = match check() {
            Ok(()) => return,
            Err(finding) => finding,
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}{}",
            if finding.is_empty() {
                String::new()
            } else {
                format!(" (found: {finding})")
            }
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Async form of [`wait_until`] for conditions that need the client. Each
/// evaluation of `cond` is bounded by the deadline too, so a call that never
/// returns fails the wait instead of hanging it.
pub async fn wait_until_async<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let held = tokio::time::timeout_at(deadline, cond()).await;
        if held.unwrap_or_else(|_| panic!("timed out after {limit:?} waiting for: {what}")) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Awaits `fut` for at most `limit`; past it the test fails naming `what`.
pub async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = T>,
) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("no result within {limit:?}: {what}"))
}

/// A real `sessiond serve` on a socket in its own temp dir. Every command it
/// runs carries `SESSIOND_TEST_TAG=<unique>` in its environment, so the test
/// can find any process it leaked, whatever became of its parent.
pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub tag: String,
    child: Option<Child>,
    pub stderr_path: PathBuf,
    /// The uids of a `start_isolated` daemon's sessions.
    uid_range: Option<(u32, u32)>,
    /// The cgroup v2 directory delegated to this daemon alone, as systemd's
    /// `Delegate=yes` would (see [`DELEGATE_ENV`]).
    delegated: Option<PathBuf>,
}

/// With this variable set to a cgroup v2 directory whose children get the
/// memory, cpu and pids controllers (ci/v2-vm.sh sets it), every test daemon
/// starts in a cgroup of its own below it, `<dir>/d-<tag>`, the way a systemd
/// unit with `Delegate=yes` starts: several daemons of one test process cannot
/// share one cgroup (each would find the others in it and refuse it as not
/// delegated). The test process itself must then sit in a leaf elsewhere.
pub const DELEGATE_ENV: &str = "SESSIOND_TEST_DELEGATE";

fn merge(base: &mut toml::Table, extra: toml::Table) {
    for (k, v) in extra {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(e)) => merge(b, e),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

impl TestDaemon {
    /// Starts a daemon with test defaults plus `extra` (TOML, merged over them).
    pub fn start(extra: &str) -> TestDaemon {
        Self::start_in(tempfile::tempdir().expect("temp dir"), extra)
    }

    /// Starts a daemon under `isolation = "uid-per-session"` with `uids` uids
    /// (and as many sessions at most), plus `extra`. Each such daemon of this
    /// test process gets a uid range of its own (the crash recovery of one
    /// would kill the sessions of another on the same range), its homes
    /// under `<dir>/state`, and a temp dir others may search (0711), so
    /// session uids reach their homes and other client uids the socket.
    pub fn start_isolated(uids: u32, extra: &str) -> TestDaemon {
        use std::os::unix::fs::PermissionsExt;
        static NEXT_BLOCK: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        assert!((1..=16).contains(&uids), "at most 16 uids per test daemon");
        let block = NEXT_BLOCK.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 16;
        let first = 400_000 + (std::process::id() % 4096) * 256 + block * 16;
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let mut config: toml::Table = toml::from_str(&format!(
            "[sessions]\nmax_sessions = {uids}\n[commands]\nisolation = \"uid-per-session\"\nuid_range = \"{first}-{last}\"\nstate_dir = \"{state}\"\n",
            last = first + uids - 1,
            state = dir.path().join("state").display(),
        ))
        .unwrap();
        merge(
            &mut config,
            toml::from_str(extra).expect("extra config is TOML"),
        );
        let mut daemon = Self::start_in(dir, &toml::to_string(&config).unwrap());
        daemon.uid_range = Some((first, first + uids - 1));
        daemon
    }

    fn start_in(dir: tempfile::TempDir, extra: &str) -> TestDaemon {
        let socket = dir.path().join("sessiond.sock");
        let tag = format!("t{}", uuid::Uuid::new_v4().simple());
        let work = dir.path().join("work");
        std::fs::create_dir(&work).unwrap();
        let mut config: toml::Table = toml::from_str(&format!(
            r#"
[server]
socket = "{socket}"
shutdown_grace = "5s"
[sessions]
default_cwd = "{work}"
[rate_limit]
requests_per_second = 0
[cgroups]
parent = "sessiond-test-{tag}"
[commands]
kill_grace = "300ms"
[commands.env]
PATH = "/usr/local/bin:/usr/bin:/bin"
LANG = "C.UTF-8"
SESSIOND_TEST_TAG = "{tag}"
"#,
            socket = socket.display(),
            work = work.display(),
        ))
        .unwrap();
        merge(
            &mut config,
            toml::from_str(extra).expect("extra config is TOML"),
        );
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
        let daemon = Self::spawn(dir, socket, tag, &config_path);
        daemon.wait_ready();
        daemon
    }

    fn spawn(dir: tempfile::TempDir, socket: PathBuf, tag: String, config: &Path) -> TestDaemon {
        let stderr_path = dir.path().join("daemon.log");
        let delegated = std::env::var_os(DELEGATE_ENV).map(|base| {
            let own = PathBuf::from(base).join(format!("d-{tag}"));
            std::fs::create_dir(&own).expect("create the daemon's delegated cgroup");
            own
        });
        let child = Self::launch(config, &stderr_path, delegated.as_deref());
        TestDaemon {
            dir,
            socket,
            tag,
            child: Some(child),
            stderr_path,
            uid_range: None,
            delegated,
        }
    }

    /// Runs `sessiond serve --config config`, its log appended to `log`.
    /// The daemon gets SIGTERM when the test process dies, however it dies (a
    /// test killed from outside runs no `Drop`): it then drains and kills its
    /// commands itself. PR_SET_PDEATHSIG fires when the *thread* that spawned
    /// the child ends, so every daemon is spawned by one thread that lives as
    /// long as the test process. With `cgroup`, the daemon starts in that
    /// cgroup v2 directory.
    fn launch(config: &Path, log: &Path, cgroup: Option<&Path>) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_sessiond"));
        command
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            // Must NOT reach commands: they get only the configured base env.
            .env("SESSIOND_DAEMON_SECRET", "leak")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // Opened here: between fork and exec only the write may run.
        let procs = cgroup.map(|dir| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))
                .expect("open the delegated cgroup's cgroup.procs")
        });
        // SAFETY: prctl and write are async-signal-safe; nothing else runs
        // between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(f) = &procs {
                    // "0": the writing process, the daemon-to-be, joins the cgroup.
                    let fd = std::os::fd::AsRawFd::as_raw_fd(f);
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        spawn_from_lasting_thread(command)
    }

    fn wait_ready(&self) {
        wait_until(
            "the daemon accepts connections",
            Duration::from_secs(10),
            || UnixStream::connect(&self.socket).is_ok(),
        );
    }

    /// Kills the daemon with SIGKILL (a crash: nothing of its cleanup runs),
    /// then starts a new one with the same config, socket and cgroup parent.
    pub fn crash_and_restart(&mut self) {
        let mut old = self.child.take().expect("running");
        old.kill().unwrap();
        old.wait().unwrap();
        self.relaunch();
    }

    /// Stops the daemon with SIGTERM and checks the clean exit (status 0,
    /// socket gone, no process or cgroup left), then starts a new one.
    pub fn stop_and_restart(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.check_clean_exit();
        self.relaunch();
    }

    fn relaunch(&mut self) {
        let config = self.dir.path().join("config.toml");
        self.child = Some(Self::launch(
            &config,
            &self.stderr_path,
            self.delegated.as_deref(),
        ));
        self.wait_ready();
    }

    /// The daemon's pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Where the homes of a `start_isolated` daemon's sessions are.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The working directory sessions start in.
    pub fn work_dir(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    /// A client-library connection.
    pub async fn client(&self) -> Client {
        Client::connect(&self.socket).await.expect("connect")
    }

    /// A raw-frame connection.
    pub fn raw(&self) -> RawConn {
        RawConn::connect(&self.socket)
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// Waits for the daemon to exit (after a signal), with a deadline.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit within {limit:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then checks the clean exit: status 0, socket gone, no process left.
    pub fn stop(mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.check_clean_exit();
    }

    /// Waits for the exit that follows a SIGTERM: status 0, socket gone, no process or cgroup left.
    pub fn check_clean_exit(&mut self) {
        let status = self.wait_exit(Duration::from_secs(30));
        assert!(
            status.success(),
            "daemon exit status {status:?}\n{}",
            self.log()
        );
        assert!(!self.socket.exists(), "socket file left behind");
        self.assert_no_leaks();
        self.assert_no_cgroups_left();
        self.assert_own_cgroup_restored();
    }

    /// The delegated cgroup this daemon started in (see [`DELEGATE_ENV`]).
    pub fn delegated_cgroup(&self) -> Option<&Path> {
        self.delegated.as_deref()
    }

    /// After a clean exit the daemon's delegated cgroup is as it was at
    /// start: no `daemon` leaf, no controllers enabled for its children (a
    /// daemon started in it again can join it).
    pub fn assert_own_cgroup_restored(&self) {
        let Some(own) = &self.delegated else {
            return;
        };
        assert!(
            !own.join("daemon").exists(),
            "{}/daemon left behind",
            own.display()
        );
        assert_no_controllers_enabled(own);
    }

    /// This daemon's cgroup subtree name (unique per test daemon).
    pub fn cgroup_parent(&self) -> String {
        format!("sessiond-test-{}", self.tag)
    }

    /// Every directory named for this daemon's subtree under /sys/fs/cgroup.
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        sessiond::cgroup_dirs_named(&self.cgroup_parent())
    }

    /// The `cmd-*` leaves of this daemon's sessions, in every hierarchy.
    pub fn command_cgroups(&self) -> Vec<PathBuf> {
        self.cgroup_dirs()
            .iter()
            .flat_map(|dir| session_cgroups(dir).1)
            .collect()
    }

    /// How many command leaves there are, whatever hierarchies each is made
    /// in (on v1, those where it counts or kills something of its own).
    pub fn command_leaves(&self) -> usize {
        self.command_leaves_held().0.len()
    }

    /// The command leaves by name, and those of them holding a process (in
    /// any of their hierarchies).
    pub fn command_leaves_held(
        &self,
    ) -> (
        std::collections::BTreeSet<std::ffi::OsString>,
        std::collections::BTreeSet<std::ffi::OsString>,
    ) {
        let (mut all, mut held) = (
            std::collections::BTreeSet::new(),
            std::collections::BTreeSet::new(),
        );
        for leaf in self.command_cgroups() {
            let Some(name) = leaf.file_name().map(|n| n.to_owned()) else {
                continue;
            };
            let procs = std::fs::read_to_string(leaf.join("cgroup.procs"));
            if procs.is_ok_and(|p| !p.trim().is_empty()) {
                held.insert(name.clone());
            }
            all.insert(name);
        }
        (all, held)
    }

    /// Panics when a cgroup of this daemon's subtree is left.
    pub fn assert_no_cgroups_left(&self) {
        let left = self.cgroup_dirs();
        assert!(left.is_empty(), "cgroups left behind: {left:?}");
    }

    /// Live processes of this daemon's commands: see [`command_pids`].
    pub fn command_pids(&self) -> Vec<i32> {
        let daemon = self.child.as_ref().map(|c| c.id() as i32);
        command_pids(&self.tag, daemon, &self.cgroup_dirs())
    }

    /// Panics when any process started by this daemon's commands is still alive.
    pub fn assert_no_leaks(&self) {
        // SIGKILLed processes may take a moment to disappear; zombies of init's are reaped by it.
        let mut left = Vec::new();
        let ok = (0..300).any(|_| {
            left = self.command_pids();
            if left.is_empty() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
            false
        });
        assert!(ok, "processes leaked by the daemon: {left:?}");
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        let sigkill = |pids: Vec<i32>| {
            for pid in pids {
                let _ = kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
            }
        };
        // Whatever a failed test left behind dies here, by pid: first what
        // descends from the daemon (found only while it lives; stopped, it
        // spawns nothing more meanwhile)...
        if let Some(child) = &self.child {
            let _ = kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                Signal::SIGSTOP,
            );
        }
        let descendants = self.command_pids();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        sigkill(descendants);
        // ...then what is still tagged or in its cgroups...
        sigkill(self.command_pids());
        // ...so does anything of its session uids (a failed test may have
        // broken their cleanup): processes, SysV IPC, files in the shared tmp dirs...
        if let Some((first, last)) = self.uid_range {
            use sessiond::isolation::cleanup;
            let ours = |u: u32| (first..=last).contains(&u);
            for (pid, _) in cleanup::processes_of(&ours) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            cleanup::remove_sysv_ipc(&ours);
            cleanup::remove_files_in(&cleanup::SHARED_TMP, &ours);
        }
        // ...and its cgroups go, deepest first (only this daemon's own subtree,
        // and the cgroup delegated to it).
        for dir in self.cgroup_dirs() {
            remove_cgroup_tree(&dir);
        }
        if let Some(own) = &self.delegated {
            remove_cgroup_tree(own);
        }
    }
}

/// Spawns `command` from a thread that lives as long as the test process (see [`TestDaemon::launch`]).
fn spawn_from_lasting_thread(command: Command) -> Child {
    type Job = (Command, std::sync::mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<Job>>> =
        std::sync::OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::spawn(move || {
            for (mut command, reply) in rx {
                let _ = reply.send(command.spawn());
            }
        });
        std::sync::Mutex::new(tx)
    });
    let (reply, answer) = std::sync::mpsc::channel();
    spawner
        .lock()
        .unwrap()
        .send((command, reply))
        .expect("the spawner thread runs");
    answer.recv().unwrap().expect("start sessiond")
}

/// Removes a cgroup directory and its children, deepest first (after their processes died).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    for _ in 0..100 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Live (non-zombie) processes whose environment holds `SESSIOND_TEST_TAG=tag`.
pub fn tagged_pids(tag: &str) -> Vec<i32> {
    let needle = format!("SESSIOND_TEST_TAG={tag}");
    procfs::all_processes()
        .into_iter()
        .filter(|p| !p.is_zombie())
        .filter(|p| {
            std::fs::read(format!("/proc/{}/environ", p.pid))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()))
        })
        .map(|p| p.pid)
        .collect()
}

/// Live (non-zombie) processes of a test daemon's commands, found three
/// ways, because a command's own shell may carry no tag: a session whose
/// tag is not exported, or whose variables do not all come in the shell's
/// environment, hands it over through `BASH_ENV`, so a command that is only
/// its shell (a builtin loop) can be invisible to [`tagged_pids`]. Hence
/// also the descendants of the
/// daemon process `daemon` while it lives (its commands, and orphans it
/// adopted as subreaper), and every process in its cgroup subtree
/// (`cgroup_dirs`, cgroups on; found even after the daemon died).
pub fn command_pids(tag: &str, daemon: Option<i32>, cgroup_dirs: &[PathBuf]) -> Vec<i32> {
    let mut found: std::collections::BTreeSet<i32> = tagged_pids(tag).into_iter().collect();
    if let Some(daemon) = daemon {
        let all = procfs::all_processes();
        let mut descendants = std::collections::BTreeSet::new();
        let mut parents = vec![daemon];
        while let Some(parent) = parents.pop() {
            for p in all.iter().filter(|p| p.ppid == parent) {
                if descendants.insert(p.pid) {
                    parents.push(p.pid);
                }
            }
        }
        found.extend(descendants);
    }
    let mut dirs: Vec<PathBuf> = cgroup_dirs.to_vec();
    while let Some(dir) = dirs.pop() {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            found.extend(
                procs
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    found.into_iter().filter(|p| alive(*p)).collect()
}

/// Waits (5 s at most) until process `pid` is gone; `what` names it in the failure.
pub fn wait_dead(pid: i32, what: &str) {
    wait_until(what, Duration::from_secs(5), || !alive(pid));
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    procfs::stat(pid).is_some_and(|p| !p.is_zombie())
}

/// Starts `exec.run` of `command` in `session` on its own task; await the handle for the result.
pub fn spawn_run(
    client: &Arc<Client>,
    session: &str,
    command: &str,
) -> tokio::task::JoinHandle<Result<ExecResult, ClientError>> {
    let (client, session, command) = (client.clone(), session.to_string(), command.to_string());
    tokio::spawn(async move { client.run(&session, &command).await })
}

/// Waits until the daemon reports `n` running commands.
pub async fn wait_running(client: &Client, n: u64) {
    wait_until_async(
        &format!("{n} command(s) running"),
        Duration::from_secs(10),
        || async { client.stats().await.unwrap().commands.running == n },
    )
    .await;
}

/// A connection speaking raw frames: for malformed input the client library would never send.
pub struct RawConn {
    pub stream: UnixStream,
}

impl RawConn {
    /// Connects to `socket`; a read waits 20 s at most.
    pub fn connect(socket: &Path) -> RawConn {
        let stream = UnixStream::connect(socket).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        RawConn { stream }
    }

    /// Writes raw bytes as they are.
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Writes one frame: length prefix, then `body`.
    pub fn write_frame(&mut self, body: &[u8]) {
        self.write_bytes(&frame(body));
    }

    /// Several requests as one write, as a pipelining client sends them.
    pub fn send_in_one_write(&mut self, requests: &[rmpv::Value]) {
        let mut bytes = Vec::new();
        for r in requests {
            let mut body = Vec::new();
            rmpv::encode::write_value(&mut body, r).unwrap();
            bytes.extend_from_slice(&(body.len() as u32).to_be_bytes());
            bytes.extend_from_slice(&body);
        }
        self.write_bytes(&bytes);
    }

    /// Writes a request given as an rmpv map.
    pub fn send(&mut self, request: &rmpv::Value) {
        assert!(self.try_send(request), "the daemon closed the connection");
    }

    /// Like [`RawConn::send`], but a connection the daemon already closed is `false`, not a panic.
    pub fn try_send(&mut self, request: &rmpv::Value) -> bool {
        let mut body = Vec::new();
        rmpv::encode::write_value(&mut body, request).unwrap();
        self.stream.write_all(&frame(&body)).is_ok()
    }

    /// `session.create` with request id `id`; returns the session id.
    pub fn create_session(&mut self, id: u64) -> String {
        self.send(&request(id, "session.create", vec![]));
        let r = self.read().expect("an answer");
        get(get(&r, "result"), "session_id")
            .as_str()
            .expect("a session id")
            .to_string()
    }

    /// `exec.start` of `command` in `session` (stdin kept open for
    /// `exec.write` with `stdin_open`); its command id.
    pub fn start_command(
        &mut self,
        id: u64,
        session: &str,
        command: &str,
        stdin_open: bool,
    ) -> String {
        let mut params = vec![("session_id", session.into()), ("command", command.into())];
        if stdin_open {
            params.push(("stdin_open", true.into()));
        }
        self.send(&request(id, "exec.start", params));
        let r = self.read().expect("an answer");
        get(get(&r, "result"), "command_id")
            .as_str()
            .unwrap_or_else(|| panic!("{r}"))
            .to_string()
    }

    /// Reads one frame and decodes it; `None` on EOF.
    pub fn read(&mut self) -> Option<rmpv::Value> {
        let mut len = [0u8; 4];
        if self.stream.read_exact(&mut len).is_err() {
            return None;
        }
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        self.stream.read_exact(&mut body).ok()?;
        Some(rmpv::decode::read_value(&mut &body[..]).expect("daemon sends valid MessagePack"))
    }

    /// True when the daemon closed the connection (its next byte is the end).
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.read_some(&mut b), Ok(0))
    }

    /// Reads and discards until the daemon closes the connection; returns the
    /// bytes read. An error (the 20 s read timeout) means it did not close.
    pub fn read_until_closed(&mut self) -> std::io::Result<usize> {
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0;
        loop {
            match self.read_some(&mut buf)? {
                0 => return Ok(got),
                n => got += n,
            }
        }
    }

    /// One read; 0 is the end. A reset is an end too: the daemon closed while
    /// some of our bytes were still unread on its side.
    fn read_some(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.stream.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(0),
            other => other,
        }
    }
}

/// `body` with its length prefix.
fn frame(body: &[u8]) -> Vec<u8> {
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    frame
}

/// Runs blocking socket work off the async workers; its panic is the caller's.
pub async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// The pid a command printed (`... & echo $!`).
pub fn printed_pid(r: &ExecResult) -> i32 {
    let text = String::from_utf8_lossy(&r.stdout);
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a pid: {text:?}"))
}

/// Builds a request map.
pub fn request(
    id: impl Into<rmpv::Value>,
    method: &str,
    params: Vec<(&str, rmpv::Value)>,
) -> rmpv::Value {
    rmpv::Value::Map(vec![
        ("id".into(), id.into()),
        ("method".into(), method.into()),
        (
            "params".into(),
            rmpv::Value::Map(params.into_iter().map(|(k, v)| (k.into(), v)).collect()),
        ),
    ])
}

/// `value[key]` of a map.
pub fn get<'a>(value: &'a rmpv::Value, key: &str) -> &'a rmpv::Value {
    value
        .as_map()
        .and_then(|m| {
            m.iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v)
        })
        .unwrap_or(&rmpv::Value::Nil)
}

/// The error code of a response, if it is an error.
pub fn error_code(value: &rmpv::Value) -> Option<String> {
    get(get(value, "error"), "code")
        .as_str()
        .map(str::to_string)
}

/// Open file descriptors of a process.
pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Resident memory of a process, bytes.
pub fn rss_of(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * 4096
}

/// The promises a fault scenario must leave intact: the daemon answers ping
/// within a bound, a session not under attack runs `echo ok`, RSS stays under
/// a bound, and after the scenario its fd count is back to the baseline and no
/// process of the scenario's sessions survives.
pub struct Invariants {
    control: String,
    baseline_fds: usize,
    /// Leaves a session keeps once it ran a command: two used in turn on
    /// v1, where a leaf is reset and used again; one made ahead on v2.
    leaves_kept: usize,
    pub ping_bound: Duration,
    pub rss_bound: u64,
}

impl Invariants {
    /// Records the baseline and creates the control session (not under attack).
    pub async fn baseline(d: &TestDaemon, c: &Client) -> Invariants {
        let control = c
            .create_session(sessiond::protocol::CreateParams::default())
            .await
            .expect("control session");
        c.run(&control, "true").await.expect("control session runs");
        let leaves_kept = leaves_kept(c).await;
        // The control session's next leaf is made ahead, in the background:
        // the baseline counts its open files.
        wait_until(
            "the control session's next leaf is made ahead",
            Duration::from_secs(5),
            || d.command_leaves() == leaves_kept,
        );
        Invariants {
            control,
            baseline_fds: fd_count(d.pid()),
            leaves_kept,
            ping_bound: Duration::from_secs(1),
            rss_bound: 256 << 20,
        }
    }

    /// While (or right after) the scenario runs: the service goes on.
    pub async fn check_live(&self, d: &TestDaemon, c: &Client) {
        let t = Instant::now();
        assert!(c.ping().await.expect("ping").pong);
        assert!(t.elapsed() < self.ping_bound, "ping took {:?}", t.elapsed());
        let r = c
            .run(&self.control, "echo ok")
            .await
            .expect("the control session runs");
        assert_eq!(String::from_utf8_lossy(&r.stdout), "ok\n");
        let rss = rss_of(d.pid());
        assert!(
            rss < self.rss_bound,
            "daemon RSS {rss} over {}",
            self.rss_bound
        );
    }

    /// After the scenario's sessions are destroyed: nothing of them is left.
    /// Only the control session lives, no command runs, no session cgroup but
    /// the control session's remains, fds are back to the baseline, and no
    /// process of the scenario survives.
    pub async fn check_after(&self, d: &TestDaemon, c: &Client) {
        self.check_quiescent(d, c, 1, 0).await;
    }

    /// At a moment when no scenario runs: exactly `live` sessions (the control
    /// session included) and as many session cgroups exist, no command runs
    /// (and no command cgroup is left but each session's leaves kept,
    /// empty), the daemon has at most `connections` more fds than at the
    /// baseline (open client connections) besides the other sessions' leaves
    /// made ahead, and no process of any session survives (idle sessions run
    /// none). Cleanup that happens off the answer path (a cgroup's removal, a
    /// closed socket) gets 5 s.
    pub async fn check_quiescent(&self, d: &TestDaemon, c: &Client, live: u64, connections: usize) {
        self.check_live(d, c).await;
        let stats = c.stats().await.expect("stats");
        assert_eq!(
            (stats.sessions.active, stats.commands.running),
            (live, 0),
            "(sessions, running commands) when nothing runs"
        );
        settles(
            "one session cgroup per live session, no command cgroup but its empty leaves kept per session",
            || {
                let found: Vec<_> = d
                    .cgroup_dirs()
                    .iter()
                    .map(|dir| session_cgroups(dir))
                    .collect();
                let ok = found.iter().all(|(sessions, commands)| {
                    sessions.len() as u64 == live
                        && commands.len() <= live as usize * self.leaves_kept
                        && commands.iter().all(|leaf| {
                            std::fs::read_to_string(leaf.join("cgroup.procs"))
                                .is_ok_and(|p| p.trim().is_empty())
                        })
                });
                if ok {
                    Ok(())
                } else {
                    Err(format!("{live} live sessions, cgroups {found:?}"))
                }
            },
        )
        .await;
        let bound = self.baseline_fds
            + connections
            + live.saturating_sub(1) as usize * self.leaves_kept * ready_leaf_fds(d);
        settles("daemon fds back to baseline + open connections", || {
            let now = fd_count(d.pid());
            if now <= bound {
                Ok(())
            } else {
                Err(format!("{now} fds, bound {bound}"))
            }
        })
        .await;
        settles("no process of any session left", || {
            let left = d.command_pids();
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("alive: {left:?}"))
            }
        })
        .await;
    }

    /// Takes `n` connections that were open at the baseline out of it (they
    /// are counted as open connections by [`Invariants::check_quiescent`]).
    pub fn discount_connections(&mut self, n: usize) {
        self.baseline_fds = self.baseline_fds.saturating_sub(n);
    }
}

/// Leaves a session keeps once it ran a command (ready, or out with a
/// command): two on v1, where leaves are reset and used in turn; one on v2.
/// (The daemon's `REUSED_LEAVES` and `FRESH_LEAVES_READY`, in
/// src/cgroup/pool.rs, which the crate does not export.)
pub async fn leaves_kept(c: &Client) -> usize {
    match c.stats().await.expect("stats").runtime.cgroups.as_str() {
        "v1" => 2,
        "off" => 0,
        _ => 1,
    }
}

/// The files a session's leaf made ahead keeps open in the daemon: its
/// `cgroup.procs` in every hierarchy and three counters, and the session's
/// own pids.events on kernels that count there (with pids.events.local).
fn ready_leaf_fds(d: &TestDaemon) -> usize {
    let dirs = d.cgroup_dirs();
    if dirs.is_empty() {
        return 0;
    }
    let session_counts = dirs.iter().any(|dir| {
        session_cgroups(dir)
            .0
            .iter()
            .any(|s| s.join("pids.events.local").exists())
    });
    dirs.len() + 3 + usize::from(session_counts)
}

/// Polls `check` until it holds, for 5 s at most; then fails with `what` and the last finding.
async fn settles(what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match check() {
            Ok(()) => return,
            Err(finding) if Instant::now() >= deadline => panic!("{what}: {finding}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// The `session-*` cgroups under `dir`, and the `cmd-*` leaves under them.
fn session_cgroups(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let subdirs = |d: &Path, prefix: &str| -> Vec<PathBuf> {
        std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .map(|e| e.path())
            .collect()
    };
    let sessions = subdirs(dir, "session-");
    let commands = sessions.iter().flat_map(|s| subdirs(s, "cmd-")).collect();
    (sessions, commands)
}

/// Runs the CLI as uid/gid 65534 (`nobody`) against the daemon (which must
/// allow that uid, with its directory opened by [`open_to_everyone`]).
pub fn as_nobody(d: &TestDaemon, args: &[&str]) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    Command::new(env!("CARGO_BIN_EXE_sessiond"))
        .args(args)
        .env("SESSIOND_SOCKET", &d.socket)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap()
}

/// Lets other uids reach the daemon's socket directory.
pub fn open_to_everyone(d: &TestDaemon) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A cgroup v2 directory enables no controller for its children (as a
/// daemon found it, before it enabled any).
pub fn assert_no_controllers_enabled(dir: &Path) {
    let enabled = std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap();
    assert_eq!(
        enabled.trim(),
        "",
        "controllers left enabled on {}",
        dir.display()
    );
}
