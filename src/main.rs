//! The `sessiond` command line: `serve` runs the daemon; the other subcommands are clients of a running one.

mod cli;

/// `println!` for the client subcommands: a closed stdout is no panic (see
/// [`cli::print_out`]); other write errors return from the caller.
macro_rules! outln {
    ($($arg:tt)*) => {
        cli::print_out(&format!("{}\n", format_args!($($arg)*)))?
    };
}

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use cli::{CliError, Connect, connect, print_out};
use sessiond::config::Config;
use sessiond::protocol::CreateParams;
use sessiond::server::{self, Exit};

/// sessiond: hosts shell sessions and runs their commands under limits.
#[derive(Parser)]
#[command(version, about, after_help = cli::EXIT_CODES_HELP)]
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
    /// Run a command in a fresh session (destroyed after, whatever happens) or
    /// in --session, streaming its output and our stdin; exit with its exit code.
    ///
    /// Several words after `--` are an argv, run exactly as given
    /// (`sessiond run -- ls -la "my dir"`); one word is a command line for the
    /// session's shell (`sessiond run -- 'cd /tmp && ls'`). Ctrl-C, SIGTERM or
    /// SIGHUP cancels the command first.
    Run(cli::run::RunArgs),
    /// Follow a command's output (from its start) to its end and exit with its
    /// exit code. Ctrl-C stops following; the command runs on.
    #[command(after_help = cli::EXIT_CODES_HELP)]
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
    /// Print a shell completion script, generated from this command line's
    /// definition (e.g. `sessiond completions bash > /etc/bash_completion.d/sessiond`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), generated from this command line's
    /// definition (e.g. `sessiond man > /usr/local/share/man/man1/sessiond.1`).
    Man,
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
                let k = &c.commands;
                // One write: a closed stdout (`| head -c 10`) is not a panic.
                let text = format!(
                    "{}# socket in force: {}\n# server.max_connections_per_client in force: {}\n{}",
                    c.to_toml(),
                    c.socket_path().display(),
                    c.server.connections_per_client(),
                    sessiond::isolation::explain(
                        k.isolation,
                        k.uid_range,
                        &k.state_dir,
                        k.private_tmp,
                        &k.run_as_user
                    )
                );
                match print_out(&text) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => cli::fail(&e),
                }
            }
            Err(e) => {
                eprintln!("sessiond: {e}");
                ExitCode::from(2)
            }
        },
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "sessiond", &mut out);
            print_bytes(&out)
        }
        Command::Man => {
            let mut out = Vec::new();
            match clap_mangen::Man::new(Cli::command()).render(&mut out) {
                Ok(()) => print_bytes(&out),
                Err(e) => cli::fail(&CliError::from(e)),
            }
        }
        other => client_command(other),
    }
}

/// Generated text (UTF-8) to stdout.
fn print_bytes(out: &[u8]) -> ExitCode {
    match print_out(&String::from_utf8_lossy(out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => cli::fail(&e),
    }
}

/// Keeps the daemon's RSS close to what it holds (the memory budget's
/// promise): glibc's malloc otherwise raises its mmap threshold after the
/// first large free (so later output buffers and answers of megabytes come
/// from the heap, which is not returned to the system after a spike) and
/// gives each thread an arena of its own (fragmenting what is freed). With a
/// fixed 128 KiB threshold every large buffer is its own mapping, unmapped
/// when freed; two arenas are enough for the daemon's worker threads.
fn bound_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt takes no pointers and is thread-safe; it only changes
    // malloc's tuning for allocations made from now on.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn serve(config_path: Option<PathBuf>, socket: Option<PathBuf>, log_format: LogFormat) -> ExitCode {
    ensure_standard_fds();
    close_inherited_fds_on_exec();
    bound_allocator();
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
    server::raise_open_files();
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
        Err(e) => cli::fail(&e),
    }
}

async fn run_client(command: Command) -> Result<ExitCode, CliError> {
    match command {
        Command::Ping(c) => {
            let pong = connect(&c).await?.ping().await?;
            outln!(
                "pong: sessiond {} (protocol {}), up {} ms",
                pong.version,
                pong.protocol,
                pong.uptime_ms
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
            outln!("{}", text.map_err(|e| CliError::Failed(e.to_string()))?);
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
                outln!("{id}");
            }
            SessionAction::List(c) => {
                for s in connect(&c).await?.list_sessions().await?.sessions {
                    outln!(
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
                outln!("destroyed {id}");
            }
        },
        Command::Run(args) => return cli::run::run(args).await,
        Command::Attach { connect: c, id } => return cli::run::attach(&c, &id).await,
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
            outln!(
                "{}",
                if cancelled {
                    "cancelled"
                } else {
                    "not running"
                }
            );
        }
        Command::Serve { .. }
        | Command::CheckConfig { .. }
        | Command::Completions { .. }
        | Command::Man => {
            unreachable!("handled in main")
        }
    }
    Ok(ExitCode::SUCCESS)
}
