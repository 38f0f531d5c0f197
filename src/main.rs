//! The `sessiond` command line: `serve` runs the daemon; the other subcommands are clients of a running one.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use sessiond::client::{Client, ClientError};
use sessiond::config::{Config, default_socket_path};
use sessiond::protocol::{CreateParams, ExecParams};
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
    /// Benchmark a daemon against the physical floor (starts its own daemons); prints a table, writes JSON and SVG plots.
    Bench {
        /// A smoke run: every workload, tiny counts (seconds).
        #[arg(long)]
        quick: bool,
        /// Where bench.json and the plots go.
        #[arg(long, default_value = "bench-out")]
        out: PathBuf,
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
    },
    /// Create, list or destroy sessions.
    Session {
        #[command(subcommand)]
        action: SessionAction,
    },
    /// Run COMMAND in a fresh session (destroyed after) or in --session; exit with its exit code.
    Run {
        #[command(flatten)]
        connect: Connect,
        /// Run in this existing session instead of a fresh one.
        #[arg(long)]
        session: Option<String>,
        /// Timeout in seconds.
        #[arg(long)]
        timeout: Option<f64>,
        /// Feed this file to the command's stdin.
        #[arg(long)]
        stdin: Option<PathBuf>,
        /// The command and its arguments (joined with spaces, run by the session's shell).
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
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
        Command::Bench { quick, out } => {
            let scale = if quick {
                sessiond::bench::Scale::QUICK
            } else {
                sessiond::bench::Scale::FULL
            };
            let runtime = match build_runtime(true) {
                Ok(r) => r,
                Err(code) => return code,
            };
            match runtime.block_on(sessiond::bench::run(scale, &out)) {
                Ok(report) => {
                    println!(
                        "machine: {}

{}",
                        report.machine,
                        report.table()
                    );
                    println!(
                        "wrote {}/bench.json, concurrency.svg, rss.svg",
                        out.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("sessiond bench: {e}");
                    ExitCode::from(1)
                }
            }
        }
        other => client_command(other),
    }
}

fn serve(config_path: Option<PathBuf>, socket: Option<PathBuf>, log_format: LogFormat) -> ExitCode {
    ensure_standard_fds();
    close_inherited_fds_on_exec();
    init_logging(log_format);
    let mut config = match Config::load(config_path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sessiond: {e}");
            return ExitCode::from(2);
        }
    };
    if socket.is_some() {
        config.server.socket = socket;
    }
    let path = config.socket_path();
    server::block_stop_signals();
    // Bound before the runtime exists: binding sets the process-wide umask.
    let bound = match server::bind(&path, config.server.socket_mode) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("sessiond: {e}");
            return ExitCode::from(1);
        }
    };
    let runtime = match build_runtime(true) {
        Ok(r) => r,
        Err(code) => return code,
    };
    match runtime.block_on(server::run(config, bound)) {
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
        if nix::fcntl::fcntl(unsafe_borrow(fd), nix::fcntl::FcntlArg::F_GETFD).is_err() {
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
        let _ = nix::fcntl::fcntl(
            unsafe_borrow(fd),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
    }
}

fn unsafe_borrow(fd: i32) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: only used with F_GETFD/F_SETFD, which tolerate a closed fd (EBADF).
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a terminal: a log file or journald gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// A tokio runtime (multi-threaded for the daemon and the bench, one thread for a client call).
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
        Command::Stats { connect: c, json } => {
            let stats = connect(&c).await?.stats().await?;
            let text = if json {
                serde_json::to_string(&stats)
            } else {
                serde_json::to_string_pretty(&stats)
            };
            println!("{}", text.map_err(|e| ClientError::Decode(e.to_string()))?);
        }
        Command::Session { action } => match action {
            SessionAction::Create { connect: c, cwd } => {
                let id = connect(&c)
                    .await?
                    .create_session(CreateParams {
                        cwd,
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
            stdin,
            command,
        } => return run_command(&c, session, timeout, stdin, command.join(" ")).await,
        Command::Serve { .. } | Command::CheckConfig { .. } | Command::Bench { .. } => {
            unreachable!("handled in main")
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_command(
    c: &Connect,
    session: Option<String>,
    timeout: Option<f64>,
    stdin: Option<PathBuf>,
    command: String,
) -> Result<ExitCode, ClientError> {
    let client = connect(c).await?;
    let stdin = match stdin {
        Some(path) => Some(serde_bytes::ByteBuf::from(std::fs::read(&path)?)),
        None => None,
    };
    let (session_id, fresh) = match session {
        Some(id) => (id, false),
        None => (client.create_session(CreateParams::default()).await?, true),
    };
    let result = client
        .exec(ExecParams {
            session_id: session_id.clone(),
            command,
            timeout_s: timeout,
            stdin,
            ..Default::default()
        })
        .await;
    if fresh {
        let _ = client.destroy_session(&session_id).await;
    }
    let r = result?;
    let _ = std::io::stdout().write_all(&r.stdout);
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().write_all(&r.stderr);
    if r.stdout_truncated || r.stderr_truncated {
        eprintln!(
            "sessiond: output truncated (stdout {} bytes, stderr {} bytes written in all)",
            r.stdout_total_bytes, r.stderr_total_bytes
        );
    }
    if let Some(by) = r.killed_by {
        eprintln!(
            "sessiond: command killed ({by:?}) after {} ms",
            r.duration_ms
        );
    }
    let code = match (r.exit_code, r.signal) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 1,
    };
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}
