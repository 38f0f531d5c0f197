//! The client side of the `sessiond` binary: connecting to the daemon, the CLI's errors and exit codes, and `run` (`-t`: on a terminal)/`attach`.

pub mod run;
pub mod tty;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use sessiond::client::{Client, ClientError};
use sessiond::config::default_socket_path;
use sessiond::protocol::WireError;

/// Exit code of a command line that cannot be carried out as written
/// (clap's own code for usage errors): a bad option or value, a malformed
/// `--env`, a `--stdin` file that cannot be opened.
pub const EXIT_USAGE: u8 = 2;
/// The daemon refused the request (its error code is printed), or the
/// client failed at its own part. As `docker run`'s 125: 126 and 127 are left
/// to the shell that runs the command ("not executable", "not found").
pub const EXIT_REFUSED: u8 = 125;
/// The daemon could not be reached, or the connection broke before the
/// answer came. As ssh's 255.
pub const EXIT_UNREACHABLE: u8 = 255;

/// The exit codes, for `--help` and the README.
pub const EXIT_CODES_HELP: &str = "\
Exit codes of `run` and `attach`: the command's own exit code; 128 + N when signal N ended it \
(or when this program got SIGINT, SIGTERM or SIGHUP and cancelled it; 141 when our stdout closed). \
sessiond's own failures: 2 usage (bad arguments, a --stdin file that cannot be opened), \
125 refused by the daemon (its error code is printed), 255 daemon unreachable or connection lost. \
Other subcommands exit 0 or one of these.";

/// The daemon's socket, as every client subcommand takes it.
#[derive(clap::Args)]
pub struct Connect {
    /// The daemon's socket [default: $XDG_RUNTIME_DIR/sessiond.sock, else /tmp/sessiond-<uid>/sessiond.sock].
    #[arg(long, env = "SESSIOND_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Connect even if the socket's directory is not safe (writable by others,
    /// owned by another user, a symlink): whoever can write there could be
    /// answering in the daemon's place. For tests.
    #[arg(long)]
    pub insecure_socket_dir: bool,
}

impl Connect {
    /// The socket this connects to.
    pub fn path(&self) -> PathBuf {
        self.socket.clone().unwrap_or_else(default_socket_path)
    }
}

/// Connects to the daemon; a failure names the socket and what to check.
pub async fn connect(c: &Connect) -> Result<Client, CliError> {
    let path = c.path();
    let options = sessiond::client::ConnectOptions {
        insecure_socket_dir: c.insecure_socket_dir,
    };
    Client::connect_with(&path, options)
        .await
        .map_err(|source| CliError::Unreachable { path, source })
}

/// Why a client subcommand failed; each kind has its exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line cannot be carried out as written.
    #[error("{0}")]
    Usage(String),
    /// No connection to the daemon.
    #[error("cannot connect to the daemon at {}: {source}\n  is `sessiond serve` running? The socket comes from --socket, else $SESSIOND_SOCKET, else the default.", .path.display())]
    Unreachable { path: PathBuf, source: ClientError },
    /// The connection broke (or stayed silent) during a call.
    #[error("lost the connection to the daemon: {0}")]
    Lost(ClientError),
    /// The daemon answered with an error.
    #[error("{}refused by the daemon: {}: {}{}", .what.map(|w| format!("{w}: ")).unwrap_or_default(), .error.code, .error.message, hint(.error))]
    Refused {
        what: Option<&'static str>,
        error: WireError,
    },
    /// Our own part failed (an answer we cannot decode, a local read).
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    /// The exit code this failure ends the program with.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => EXIT_USAGE,
            CliError::Unreachable { .. } | CliError::Lost(_) => EXIT_UNREACHABLE,
            CliError::Refused { .. } | CliError::Failed(_) => EXIT_REFUSED,
        }
    }

    /// Names the step that was refused (`creating a session`, …).
    pub fn during(self, step: &'static str) -> CliError {
        match self {
            CliError::Refused { error, .. } => CliError::Refused {
                what: Some(step),
                error,
            },
            other => other,
        }
    }

    /// Whether the connection itself failed (a retry on a new one may work).
    pub fn is_connection(&self) -> bool {
        matches!(self, CliError::Unreachable { .. } | CliError::Lost(_))
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> CliError {
        match e {
            // The client reports a closed connection to every waiting call as
            // this code; it is not the daemon's refusal.
            ClientError::Server(w) if w.code == "CONNECTION_CLOSED" => {
                CliError::Lost(ClientError::Server(w))
            }
            ClientError::Server(error) => CliError::Refused { what: None, error },
            ClientError::Decode(m) => CliError::Failed(format!("cannot decode the answer: {m}")),
            other => CliError::Lost(other),
        }
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> CliError {
        CliError::Failed(e.to_string())
    }
}

/// What to do about an error code, when we can say.
fn hint(e: &WireError) -> String {
    let h = match e.code.as_str() {
        "CLIENT_SESSION_LIMIT" | "TOO_MANY_SESSIONS" => {
            "see your sessions with `sessiond session list` and end unused ones with `sessiond session destroy ID`"
                .to_string()
        }
        "SESSION_NOT_FOUND" => "see the live sessions with `sessiond session list`".to_string(),
        "SESSION_BUSY" => "the session runs a command: wait for it, or `sessiond cancel ID` (ids in `sessiond session list`)".to_string(),
        "COMMAND_NOT_FOUND" => "finished commands are kept for `commands.retain_finished` only".to_string(),
        "RATE_LIMITED" | "OVERLOADED" => match e.retry_after_ms {
            Some(ms) => format!("retry in {ms} ms"),
            None => "retry later".to_string(),
        },
        "SHUTTING_DOWN" => "the daemon is stopping; retry once it is back".to_string(),
        "PERMISSION_DENIED" => "the daemon does not accept connections from your uid".to_string(),
        "STDIN_TOO_LARGE" => "the daemon takes at most `commands.max_stdin_bytes` of stdin per call".to_string(),
        _ => return String::new(),
    };
    format!("\n  {h}")
}

/// Writes `text` to stdout. A closed stdout (`sessiond … | head -c 10`) is
/// not an error: whoever read it wanted no more.
pub fn print_out(text: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// Prints `e` on stderr and turns it into its exit code.
pub fn fail(e: &CliError) -> ExitCode {
    eprintln!("sessiond: {e}");
    ExitCode::from(e.exit_code())
}
