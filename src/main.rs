//! The `sessiond` command line: `serve` runs the daemon; the other subcommands are clients of a running one.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use sessiond::client::{Client, ClientError};
use sessiond::config::{Config, default_socket_path};
use sessiond::protocol::{CreateParams, Event, ExecParams, ExecResult, ReadParams, StreamName};
use sessiond::server::{self, Exit};

/// sessiond: hosts shell sessions and runs their commands under limits.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground (logs to stderr).
    Serve {
        /// Config file (TOML); without it the embedded defaults apply.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Socket path; overrides `[server] socket`.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Log format on stderr; the level comes from RUST_LOG (default info).
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Validate a config and print the effective configuration.
    CheckConfig {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Ask a running daemon whether it is alive.
    Ping(Connect),
    /// Print a running daemon's counters.
    Stats {
        #[command(flatten)]
        connect: Connect,
        /// Print JSON instead of the indented form.
        #[arg(long)]
        json: bool,
        /// `prometheus`: the Prometheus text format (for node_exporter's textfile collector).
        #[arg(long, value_enum)]
        format: Option<StatsFormat>,
    },
    /// Create, list or destroy sessions.
    Session {
        #[command(subcommand)]
        action: SessionAction,
    },
    /// Run COMMAND in a fresh session (destroyed after) or in --session,
    /// printing its output as it comes; exit with its exit code (128 + N when
    /// a signal ended it). Ctrl-C or SIGTERM cancels the command first.
    Run {
        #[command(flatten)]
        connect: Connect,
        /// Run in this existing session instead of a fresh one.
        #[arg(long)]
        session: Option<String>,
        /// Timeout in seconds.
        #[arg(long)]
        timeout: Option<f64>,
        /// Kill the command when it writes nothing for this many seconds.
        #[arg(long)]
        idle_timeout: Option<f64>,
        /// Feed this file to the command's stdin.
        #[arg(long)]
        stdin: Option<PathBuf>,
        /// Start the command, print its id and exit; follow it with `attach`.
        /// A fresh session is left to its idle timeout.
        #[arg(long)]
        detach: bool,
        /// The command and its arguments (joined with spaces, run by the session's shell).
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
    /// Follow a command's output (from its start) to its end and exit with its
    /// exit code. Ctrl-C stops following; the command runs on.
    Attach {
        #[command(flatten)]
        connect: Connect,
        /// The command's id (from `run --detach`, `session list` or an event).
        id: String,
    },
    /// Send this program's stdin on to a command started with an open stdin.
    Write {
        #[command(flatten)]
        connect: Connect,
        id: String,
        /// Close the command's stdin afterwards.
        #[arg(long)]
        eof: bool,
    },
    /// Cancel a command by id.
    Cancel {
        #[command(flatten)]
        connect: Connect,
        id: String,
    },
}

#[derive(Subcommand)]
enum SessionAction {
    /// Create a session and print its id.
    Create {
        #[command(flatten)]
        connect: Connect,
        /// Working directory of the session.
        #[arg(long)]
        cwd: Option<String>,
        /// A script run in the session before it is handed out (its state is the starting state).
        #[arg(long)]
        init: Option<String>,
    },
    /// List this user's sessions.
    List(Connect),
    /// Destroy a session and everything it runs.
    Destroy {
        #[command(flatten)]
        connect: Connect,
        id: String,
    },
}

#[derive(clap::Args)]
struct Connect {
    /// The daemon's socket.
    #[arg(long, env = "SESSIOND_SOCKET")]
    socket: Option<PathBuf>,
    /// Connect even if the socket's directory is not safe (writable by others,
    /// owned by another user, a symlink): whoever can write there could be
    /// answering in the daemon's place. For tests.
    #[arg(long)]
    insecure_socket_dir: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum StatsFormat {
    Json,
    Prometheus,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            socket,
            log_format,
        } => serve(config, socket, log_format),
        Command::CheckConfig { config } => match Config::load(config.as_deref()) {
            Ok(c) => {
                print!("{}", c.to_toml());
                println!("# socket in force: {}", c.socket_path().display());
                println!(
                    "# server.max_connections_per_client in force: {}",
                    c.server.connections_per_client()
                );
                let k = &c.commands;
                print!(
                    "{}",
                    sessiond::isolation::explain(
                        k.isolation,
                        k.uid_range,
                        &k.state_dir,
                        k.private_tmp,
                        &k.run_as_user
                    )
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sessiond: {e}");
                ExitCode::from(2)
            }
        },
        other => client_command(other),
    }
}

fn serve(config_path: Option<PathBuf>, socket: Option<PathBuf>, log_format: LogFormat) -> ExitCode {
    ensure_standard_fds();
    close_inherited_fds_on_exec();
    let set_log_filter = init_logging(log_format);
    let mut config = match Config::load(config_path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sessiond: {e}");
            return ExitCode::from(2);
        }
    };
    if !config.server.log_level.is_empty() {
        let _ = set_log_filter(&config.server.log_level);
    }
    if socket.is_some() {
        config.server.socket.clone_from(&socket);
    }
    let path = config.socket_path();
    server::block_stop_signals();
    // Socket activation: systemd's listening socket instead of our own.
    let bound = match server::systemd::take_listener() {
        Some(Ok(listener)) => {
            let passed = listener
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(PathBuf::from))
                .unwrap_or_else(|| path.clone());
            Ok(server::BoundSocket::activated(listener, passed))
        }
        Some(Err(e)) => {
            eprintln!("sessiond: socket activation: {e}");
            return ExitCode::from(1);
        }
        // Bound before the runtime exists: binding sets the process-wide umask.
        None => config.socket_gid().map_or_else(
            |e| Err(server::ServeError::Actors(e.to_string())),
            |gid| server::bind(&path, config.server.socket_mode, gid),
        ),
    };
    let bound = match bound {
        Ok(b) => b,
        Err(e) => {
            eprintln!("sessiond: {e}");
            return ExitCode::from(1);
        }
    };
    let reloading = server::Reloading {
        config_path,
        socket_override: socket,
        set_log_filter: Some(Box::new(set_log_filter)),
    };
    let runtime = match build_runtime(true) {
        Ok(r) => r,
        Err(code) => return code,
    };
    match runtime.block_on(server::run(config, bound, reloading)) {
        Ok(Exit::Graceful) => ExitCode::SUCCESS,
        Ok(Exit::Forced) => ExitCode::from(1),
        Err(e) => {
            eprintln!("sessiond: {e}");
            ExitCode::from(1)
        }
    }
}

/// fds 0-2 must be open: a pipe created on fd 1 would otherwise be handed to
/// a command as something it is not.
fn ensure_standard_fds() {
    for fd in 0..3 {
        if !fd_is_open(fd) {
            if let Ok(f) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                // Opening takes the lowest free fd, which is the missing one.
                std::mem::forget(f);
            }
        }
    }
}

/// Whatever fds the daemon inherited beyond 0-2 (from a careless parent) must
/// not reach the commands: mark them close-on-exec. Ours are all created so.
fn close_inherited_fds_on_exec() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: fcntl on a raw number touches no memory of ours; an fd that
        // is closed by now (the listing's own) fails with EBADF, ignored.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

/// Whether `fd` is open. A raw number, not a `BorrowedFd`: it may be closed.
fn fd_is_open(fd: i32) -> bool {
    // SAFETY: F_GETFD only reads the fd's flags; a closed fd fails with EBADF.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// Logs to stderr; returns what puts a new filter in force (`server.log_level`, on SIGHUP).
fn init_logging(format: LogFormat) -> impl Fn(&str) -> Result<(), String> + Send + Sync + 'static {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::new(server::log_filter(""));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    // Colours only for a terminal: a log file or journald gets plain text.
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry.with(fmt).init(),
        LogFormat::Json => registry.with(fmt.json()).init(),
    }
    move |level: &str| {
        let filter = tracing_subscriber::EnvFilter::try_new(server::log_filter(level))
            .map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    }
}

/// A tokio runtime (multi-threaded for the daemon, one thread for a client call).
fn build_runtime(multi_thread: bool) -> Result<tokio::runtime::Runtime, ExitCode> {
    let mut builder = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    builder.enable_all().build().map_err(|e| {
        eprintln!("sessiond: cannot start the runtime: {e}");
        ExitCode::from(1)
    })
}

fn client_command(command: Command) -> ExitCode {
    let runtime = match build_runtime(false) {
        Ok(r) => r,
        Err(code) => return code,
    };
    match runtime.block_on(run_client(command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sessiond: {e}");
            ExitCode::from(1)
        }
    }
}

async fn connect(c: &Connect) -> Result<Client, ClientError> {
    let path = c.socket.clone().unwrap_or_else(default_socket_path);
    let options = sessiond::client::ConnectOptions {
        insecure_socket_dir: c.insecure_socket_dir,
    };
    Client::connect_with(&path, options).await
}

async fn run_client(command: Command) -> Result<ExitCode, ClientError> {
    match command {
        Command::Ping(c) => {
            let pong = connect(&c).await?.ping().await?;
            println!(
                "pong: sessiond {} (protocol {}), up {} ms",
                pong.version, pong.protocol, pong.uptime_ms
            );
        }
        Command::Stats {
            connect: c,
            json,
            format,
        } => {
            let stats = connect(&c).await?.stats().await?;
            if let Some(StatsFormat::Prometheus) = format {
                print!("{}", sessiond::metrics::render(&stats));
                return Ok(ExitCode::SUCCESS);
            }
            let json = json || matches!(format, Some(StatsFormat::Json));
            let text = if json {
                serde_json::to_string(&stats)
            } else {
                serde_json::to_string_pretty(&stats)
            };
            println!("{}", text.map_err(|e| ClientError::Decode(e.to_string()))?);
        }
        Command::Session { action } => match action {
            SessionAction::Create {
                connect: c,
                cwd,
                init,
            } => {
                let id = connect(&c)
                    .await?
                    .create_session(CreateParams {
                        cwd,
                        init,
                        ..Default::default()
                    })
                    .await?;
                println!("{id}");
            }
            SessionAction::List(c) => {
                for s in connect(&c).await?.list_sessions().await?.sessions {
                    println!(
                        "{}\tcreated {} ms ago\tidle {} ms\t{}\t{}",
                        s.session_id,
                        s.created_ms_ago,
                        s.idle_ms,
                        if s.busy { "busy" } else { "idle" },
                        s.cwd
                    );
                }
            }
            SessionAction::Destroy { connect: c, id } => {
                connect(&c).await?.destroy_session(&id).await?;
                println!("destroyed {id}");
            }
        },
        Command::Run {
            connect: c,
            session,
            timeout,
            idle_timeout,
            stdin,
            detach,
            command,
        } => {
            let params = ExecParams {
                command: command.join(" "),
                timeout_s: timeout,
                idle_timeout_s: idle_timeout,
                stdin: match stdin {
                    Some(path) => Some(serde_bytes::ByteBuf::from(std::fs::read(&path)?)),
                    None => None,
                },
                ..Default::default()
            };
            return run_command(&c, session, params, detach).await;
        }
        Command::Attach { connect: c, id } => return attach(&c, &id).await,
        Command::Write {
            connect: c,
            id,
            eof,
        } => {
            let client = connect(&c).await?;
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut data)?;
            let mut sent = 0;
            // One call at most max_stdin_bytes: send in 512 KiB parts, in order.
            for part in data.chunks(512 * 1024) {
                let written = client.write(&id, part, false).await? as usize;
                sent += written;
                if written < part.len() {
                    eprintln!(
                        "sessiond: the command took {sent} of {} bytes (it stopped reading its stdin)",
                        data.len()
                    );
                    return Ok(ExitCode::from(1));
                }
            }
            if eof {
                client.write(&id, b"", true).await?;
            }
        }
        Command::Cancel { connect: c, id } => {
            let cancelled = connect(&c).await?.cancel_command(&id).await?;
            println!(
                "{}",
                if cancelled {
                    "cancelled"
                } else {
                    "not running"
                }
            );
        }
        Command::Serve { .. } | Command::CheckConfig { .. } => {
            unreachable!("handled in main")
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `sessiond run`: streams the command's output to ours; a Ctrl-C or
/// SIGTERM cancels it (and destroys a fresh session) before we exit 128 + N.
async fn run_command(
    c: &Connect,
    session: Option<String>,
    mut params: ExecParams,
    detach: bool,
) -> Result<ExitCode, ClientError> {
    let client = connect(c).await?;
    let (session_id, fresh) = match session {
        Some(id) => (id, false),
        None => (client.create_session(CreateParams::default()).await?, true),
    };
    params.session_id = session_id.clone();
    if detach {
        let id = client.start(params).await?;
        println!("{id}");
        return Ok(ExitCode::SUCCESS);
    }
    let streamed = stream_to_stdio(&client, params).await;
    if fresh {
        let _ = client.destroy_session(&session_id).await;
    }
    match streamed? {
        Streamed::Ended(r) => Ok(report(&r)),
        Streamed::Interrupted(signal) => Ok(ExitCode::from(128 + signal as u8)),
    }
}

/// How a streamed run ended for us.
enum Streamed {
    Ended(ExecResult),
    /// We got this signal and cancelled the command.
    Interrupted(i32),
}

/// Runs `params` with streaming, copying output events to our stdout and
/// stderr as they come; on SIGINT or SIGTERM cancels the command by id.
async fn stream_to_stdio(client: &Client, params: ExecParams) -> Result<Streamed, ClientError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut stream = client.exec_stream(params).await?;
    let mut command_id = None;
    let mut at = [0u64; 2];
    loop {
        let event = tokio::select! {
            event = stream.next_event() => event?,
            _ = sigint.recv() => return cancel(client, command_id.as_deref(), libc::SIGINT).await,
            _ = sigterm.recv() => return cancel(client, command_id.as_deref(), libc::SIGTERM).await,
        };
        match event {
            None => break,
            Some(Event::Started { command_id: id }) => command_id = Some(id),
            Some(Event::Output {
                stream: which,
                offset,
                data,
            }) => {
                let i = usize::from(which == StreamName::Stderr);
                if offset > at[i] {
                    eprintln!(
                        "sessiond: {} bytes of output skipped (we fell behind)",
                        offset - at[i]
                    );
                }
                at[i] = offset + data.len() as u64;
                let _ = match which {
                    StreamName::Stdout => {
                        let mut out = std::io::stdout().lock();
                        out.write_all(&data).and_then(|_| out.flush())
                    }
                    StreamName::Stderr => std::io::stderr().write_all(&data),
                };
            }
        }
    }
    Ok(Streamed::Ended(stream.result().await?))
}

/// Cancels the remote command (if it started) after we got `signal`.
async fn cancel(
    client: &Client,
    command_id: Option<&str>,
    signal: i32,
) -> Result<Streamed, ClientError> {
    if let Some(id) = command_id {
        let _ = client.cancel_command(id).await;
    }
    Ok(Streamed::Interrupted(signal))
}

/// `sessiond attach`: follows a command's output to its end.
async fn attach(c: &Connect, id: &str) -> Result<ExitCode, ClientError> {
    use tokio::signal::unix::{SignalKind, signal};
    let client = connect(c).await?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let (mut stdout_at, mut stderr_at) = (0, 0);
    loop {
        let read = client.read(ReadParams {
            command_id: id.to_string(),
            stdout_offset: stdout_at,
            stderr_offset: stderr_at,
            wait_s: Some(30.0),
        });
        let r = tokio::select! {
            r = read => r?,
            _ = sigint.recv() => return Ok(ExitCode::from(128 + libc::SIGINT as u8)),
        };
        for (offset, asked) in [(r.stdout_offset, stdout_at), (r.stderr_offset, stderr_at)] {
            if offset > asked {
                eprintln!(
                    "sessiond: {} bytes of output no longer retained",
                    offset - asked
                );
            }
        }
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&r.stdout).and_then(|_| out.flush());
        let _ = std::io::stderr().write_all(&r.stderr);
        (stdout_at, stderr_at) = (r.stdout_next, r.stderr_next);
        if let Some(result) = r.result {
            return Ok(report(&result.with_output(Vec::new(), Vec::new())));
        }
    }
}

/// Says on stderr what cut or killed the command; its exit code as ours (128 + N for a signal).
fn report(r: &ExecResult) -> ExitCode {
    if r.stdout_truncated || r.stderr_truncated {
        eprintln!(
            "sessiond: output truncated (stdout {} bytes, stderr {} bytes written in all)",
            r.stdout_total_bytes, r.stderr_total_bytes
        );
    }
    if let Some(by) = r.killed_by {
        eprintln!(
            "sessiond: command killed ({}) after {} ms",
            by.name(),
            r.duration_ms
        );
    }
    let code = match (r.exit_code, r.signal) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 1,
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}
