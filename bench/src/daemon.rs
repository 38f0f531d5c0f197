//! The bench's daemon handle: a real `sessiond serve` on a socket in its own temp dir, stopped with SIGTERM and checked to have left nothing behind.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sessiond::client::Client;
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep, timeout};

use crate::error::BenchError;

/// The environment variable every command of a bench daemon carries, so the
/// bench can find any process the daemon left, whatever became of its parent.
const TAG_VAR: &str = "SESSIOND_BENCH_TAG";

/// A running daemon; [`BenchDaemon::stop`] ends it and checks its exit.
pub struct BenchDaemon {
    /// `None` once stopped.
    child: Option<Child>,
    pid: u32,
    socket: PathBuf,
    tag: String,
    log: PathBuf,
    /// Holds the socket, config, log and the sessions' cwd; removed on drop.
    _dir: tempfile::TempDir,
}

impl BenchDaemon {
    /// Starts `binary serve` with cgroups `auto` or `off`, and waits until it accepts connections.
    pub async fn start(binary: &Path, cgroups: bool) -> Result<BenchDaemon, BenchError> {
        let dir = tempfile::Builder::new()
            .prefix("sessiond-bench-")
            .tempdir()
            .map_err(|e| BenchError::io("create temp dir in", std::env::temp_dir(), e))?;
        let socket = dir.path().join("bench.sock");
        let log = dir.path().join("daemon.log");
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let mode = if cgroups { "auto" } else { "off" };
        // Limits high enough that the workloads, not admission, are measured.
        let config = format!(
            "[server]\nsocket = \"{socket}\"\nmax_connections = 1024\n\
             [sessions]\nmax_sessions = 20000\nmax_sessions_per_client = 20000\ndefault_cwd = \"{cwd}\"\n\
             [commands]\nmax_concurrent = 64\nmax_per_session = 1\n\
             [commands.env]\nPATH = \"/usr/local/bin:/usr/bin:/bin\"\nLANG = \"C.UTF-8\"\n{TAG_VAR} = \"{tag}\"\n\
             [rate_limit]\nrequests_per_second = 0\n\
             [cgroups]\nmode = \"{mode}\"\nparent = \"{parent}\"\n",
            socket = socket.display(),
            cwd = dir.path().display(),
            parent = cgroup_parent(&tag),
        );
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config)
            .map_err(|e| BenchError::io("write", &config_path, e))?;
        let log_file =
            std::fs::File::create(&log).map_err(|e| BenchError::io("create", &log, e))?;
        let mut command = Command::new(binary);
        command
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            // A bench killed from outside runs no Drop: its daemons then get
            // SIGTERM and clean up after themselves. (The signal follows the
            // spawning thread, a runtime worker that lives as long as the run.)
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|source| BenchError::DaemonBinary {
            path: binary.to_path_buf(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::UnixStream::connect(&socket).await.is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(BenchError::Daemon(format!(
                    "exited with {status} before listening\n{}",
                    read_log(&log)
                )));
            }
            if Instant::now() > deadline {
                return Err(BenchError::Daemon(format!(
                    "not listening after 10 s\n{}",
                    read_log(&log)
                )));
            }
            sleep(Duration::from_millis(10)).await;
        }
        Ok(BenchDaemon {
            child: Some(child),
            pid,
            socket,
            tag,
            log,
            _dir: dir,
        })
    }

    /// A new client connection.
    pub async fn client(&self) -> Result<Client, BenchError> {
        Ok(Client::connect(&self.socket).await?)
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The daemon's resident set size now.
    pub fn rss(&self) -> u64 {
        rss_of(self.pid)
    }

    /// How many live processes of this daemon's commands are named `comm`.
    pub fn commands_named(&self, comm: &str) -> usize {
        tagged_pids(&self.tag)
            .into_iter()
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim_end() == comm)
            })
            .count()
    }

    /// SIGTERM, then checks the clean exit: status 0 within 30 s, socket
    /// removed, no process of its commands and no cgroup of its subtree left.
    pub async fn stop(mut self) -> Result<(), BenchError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM)
            .map_err(|e| BenchError::Daemon(format!("SIGTERM: {e}")))?;
        let status = match timeout(Duration::from_secs(30), child.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => return Err(BenchError::Daemon(format!("wait: {e}"))),
            Err(_) => {
                let _ = child.start_kill();
                return Err(BenchError::Daemon(format!(
                    "did not exit within 30 s of SIGTERM\n{}",
                    read_log(&self.log)
                )));
            }
        };
        if !status.success() {
            return Err(BenchError::Daemon(format!(
                "exit status {status}\n{}",
                read_log(&self.log)
            )));
        }
        if self.socket.exists() {
            return Err(BenchError::Daemon("socket file left behind".into()));
        }
        // SIGKILLed processes and emptied cgroups take a moment to go.
        let tag = self.tag.clone();
        wait_for("processes of its commands to exit", move || {
            let left = tagged_pids(&tag);
            left.is_empty().then_some(()).ok_or(left)
        })
        .await?;
        let parent = cgroup_parent(&self.tag);
        wait_for("its cgroups to be removed", move || {
            let left = sessiond::cgroup_dirs_named(&parent);
            left.is_empty().then_some(()).ok_or(left)
        })
        .await
    }
}

impl Drop for BenchDaemon {
    /// A run that failed half-way: the daemon still gets SIGTERM, so it drains
    /// and kills its commands and removes its cgroups on its own.
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
        }
    }
}

/// Polls `check` (every 10 ms, 5 s at most) until it returns `Ok`; the error names what was left.
async fn wait_for<T: std::fmt::Debug>(
    what: &str,
    mut check: impl FnMut() -> Result<(), T>,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match check() {
            Ok(()) => return Ok(()),
            Err(left) if Instant::now() > deadline => {
                return Err(BenchError::Daemon(format!(
                    "waited 5 s for {what}; left: {left:?}"
                )));
            }
            Err(_) => sleep(Duration::from_millis(10)).await,
        }
    }
}

/// The cgroup subtree a daemon with `tag` creates its sessions' cgroups under.
fn cgroup_parent(tag: &str) -> String {
    format!("sessiond-bench-{tag}")
}

/// Live (non-zombie) processes whose environment holds `SESSIOND_BENCH_TAG=tag`.
fn tagged_pids(tag: &str) -> Vec<u32> {
    let needle = format!("{TAG_VAR}={tag}");
    let Ok(proc) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    proc.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // The state follows the last ')' of /proc/PID/stat (the name may hold one).
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| Some(s[s.rfind(')')? + 1..].trim_start().starts_with('Z')))
                == Some(false)
        })
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()))
        })
        .collect()
}

/// The resident set size of process `pid` (0 when it is gone).
pub fn rss_of(pid: u32) -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as u64;
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * page
}

/// The last lines of a daemon's log, for an error message.
fn read_log(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
