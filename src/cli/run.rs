//! `sessiond run` and `attach`: a command's output streamed to ours, our stdin to it, its exit code as ours; a fresh session never outlives the run.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::ValueEnum;
use sessiond::client::Client;
use sessiond::protocol::{
    CreateParams, Event, ExecParams, ExecResult, KeepOutput, ReadParams, StreamName,
};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, oneshot};

use super::{CliError, Connect, connect};

/// Bytes per `exec.write`: well under the default `max_stdin_bytes` (1 MiB),
/// large enough that a pipe's worth goes in one call.
const STDIN_CHUNK: usize = 256 * 1024;

/// How long we wait for a `session.create` that was in flight when a signal
/// came, to destroy what it made.
const CREATE_GRACE: Duration = Duration::from_secs(10);

/// `sessiond run`'s arguments.
#[derive(clap::Args)]
#[command(after_help = super::EXIT_CODES_HELP)]
pub struct RunArgs {
    #[command(flatten)]
    pub connect: Connect,
    /// Run in this existing session instead of a fresh one.
    #[arg(long)]
    pub session: Option<String>,
    /// Working directory of the fresh session [default: ours when the
    /// daemon's commands run as the daemon's own uid (`shared` isolation
    /// without `run_as_user`), else the session's own default]. An existing
    /// session keeps its own: `cd` in it instead.
    #[arg(long, conflicts_with = "session")]
    pub cwd: Option<PathBuf>,
    /// Set NAME to VALUE for this command only (repeatable).
    #[arg(long = "env", short = 'e', value_name = "NAME=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Timeout: seconds (`30`, `0.5`) or a duration (`5s`, `2m`, `1h30m`).
    #[arg(long, value_name = "DURATION", value_parser = parse_seconds)]
    pub timeout: Option<f64>,
    /// Kill the command when it writes nothing for this long (as --timeout).
    #[arg(long, value_name = "DURATION", value_parser = parse_seconds)]
    pub idle_timeout: Option<f64>,
    /// Which part of an output longer than the daemon's cap the result keeps.
    #[arg(long, value_enum)]
    pub keep_output: Option<Keep>,
    /// Feed this file to the command's stdin (`-`: our stdin, even a
    /// terminal) [default: our stdin when it is not a terminal].
    #[arg(long, value_name = "FILE")]
    pub stdin: Option<PathBuf>,
    /// Give the command no stdin, even when ours is a pipe or file.
    #[arg(long, short = 'n', conflicts_with = "stdin")]
    pub no_stdin: bool,
    /// Print the whole result as one JSON object instead of the output
    /// (`stdout`/`stderr` as text when UTF-8, else base64, said by
    /// `stdout_encoding`/`stderr_encoding`); the exit code is the same.
    #[arg(long)]
    pub json: bool,
    /// Start the command, print its id and exit; follow it with `attach`.
    /// A fresh session is left to its idle timeout. Only --stdin FILE|- is
    /// sent (whole, at most the daemon's `max_stdin_bytes`).
    #[arg(long, conflicts_with = "json")]
    pub detach: bool,
    /// Run the command on a pseudo-terminal of our terminal's size (like
    /// `ssh -t`): our terminal is in raw mode while it runs, every key goes
    /// to the command (^C interrupts it there, ^D is its EOF), window size
    /// changes follow. Needs a terminal on stdin; output all comes on stdout.
    #[arg(
        long = "tty",
        short = 't',
        conflicts_with_all = ["json", "detach", "stdin", "no_stdin"]
    )]
    pub tty: bool,
    /// The command. Several words are an argv, run as given (each word
    /// quoted: no globbing, expansion or aliases): `run -- ls -la "my dir"`.
    /// One word is a command line for the session's shell: `run -- 'cd /tmp && ls'`.
    #[arg(trailing_var_arg = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// `--keep-output`, in the protocol's spelling.
#[derive(Clone, Copy, ValueEnum)]
pub enum Keep {
    Head,
    Tail,
    Both,
}

impl From<Keep> for KeepOutput {
    fn from(k: Keep) -> KeepOutput {
        match k {
            Keep::Head => KeepOutput::Head,
            Keep::Tail => KeepOutput::Tail,
            Keep::Both => KeepOutput::Both,
        }
    }
}

/// `NAME=VALUE`, NAME a shell variable name.
fn parse_env(s: &str) -> Result<(String, String), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not NAME=VALUE"))?;
    if !sessiond::process::shell::is_variable_name(name.as_bytes()) {
        return Err(format!(
            "`{name}` is not a variable name (letters, digits and _, not starting with a digit)"
        ));
    }
    Ok((name.to_string(), value.to_string()))
}

/// Seconds (`30`, `0.5`) or a humantime duration (`5s`, `2m`, `1h30m`).
fn parse_seconds(s: &str) -> Result<f64, String> {
    let secs = match s.trim().parse::<f64>() {
        Ok(secs) => secs,
        Err(_) => humantime::parse_duration(s.trim())
            .map_err(|e| format!("`{s}`: {e} (give seconds, e.g. 30, or a duration, e.g. 5s, 2m)"))?
            .as_secs_f64(),
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("`{s}` is not a duration above zero"));
    }
    Ok(secs)
}

/// The command line the session's shell runs: one word as it is; several
/// quoted word by word, so the shell hands the program exactly this argv
/// (a quoted first word is not an alias or a reserved word either).
pub fn command_line(words: &[String]) -> String {
    match words {
        [line] => line.clone(),
        words => words
            .iter()
            .map(|w| shell_quote(w))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// `word` in single quotes, each `'` written as `'\''`.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// Where the command's stdin comes from.
enum StdinSource {
    None,
    Ours,
    File(std::fs::File),
}

impl StdinSource {
    /// `--stdin`/`--no-stdin`, or our stdin when it is not a terminal. The
    /// file is opened here, before anything else, so a bad name is a usage
    /// error that names it.
    fn from_args(args: &RunArgs) -> Result<StdinSource, CliError> {
        Ok(match &args.stdin {
            Some(p) if p.as_os_str() == "-" => StdinSource::Ours,
            Some(p) => StdinSource::File(std::fs::File::open(p).map_err(|e| {
                CliError::Usage(format!("cannot open the --stdin file {}: {e}", p.display()))
            })?),
            None if args.no_stdin || args.detach || std::io::stdin().is_terminal() => {
                StdinSource::None
            }
            None => StdinSource::Ours,
        })
    }

    fn reader(self) -> Option<Box<dyn Read + Send>> {
        match self {
            StdinSource::None => None,
            StdinSource::Ours => Some(Box::new(std::io::stdin())),
            StdinSource::File(f) => Some(Box::new(f)),
        }
    }
}

/// Reads `from` on a thread of its own (a blocking read of a terminal or
/// pipe cannot be cancelled; the thread ends with the process), in chunks
/// of at most [`STDIN_CHUNK`]. The channel ends at EOF.
pub(super) fn read_chunks(
    mut from: Box<dyn Read + Send>,
) -> mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = mpsc::channel(4);
    std::thread::spawn(move || {
        loop {
            let mut buf = vec![0; STDIN_CHUNK];
            let chunk = match from.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    Ok(buf)
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
            let failed = chunk.is_err();
            if tx.blocking_send(chunk).is_err() || failed {
                return;
            }
        }
    });
    rx
}

/// SIGINT, SIGTERM and SIGHUP, caught for the whole run: whichever comes
/// first, we clean up (cancel, destroy) and exit 128 + N.
pub(super) struct Signals([(i32, Signal); 3]);

impl Signals {
    fn new() -> Result<Signals, CliError> {
        let one = |kind: SignalKind| {
            signal(kind)
                .map(|s| (kind.as_raw_value(), s))
                .map_err(CliError::from)
        };
        Ok(Signals([
            one(SignalKind::interrupt())?,
            one(SignalKind::terminate())?,
            one(SignalKind::hangup())?,
        ]))
    }

    /// The next signal's number.
    pub(super) async fn recv(&mut self) -> i32 {
        let [(a, sa), (b, sb), (c, sc)] = &mut self.0;
        tokio::select! {
            _ = sa.recv() => *a,
            _ = sb.recv() => *b,
            _ = sc.recv() => *c,
        }
    }
}

fn signal_exit(signal: i32) -> ExitCode {
    ExitCode::from(128 + signal as u8)
}

/// `sessiond run`.
pub async fn run(args: RunArgs) -> Result<ExitCode, CliError> {
    if args.tty && !std::io::stdin().is_terminal() {
        return Err(CliError::Usage(
            "-t needs a terminal on stdin (drop -t to pipe input to the command)".into(),
        ));
    }
    let stdin = StdinSource::from_args(&args)?;
    // Caught before the session exists, so no signal can end us between its
    // creation and its destruction.
    let mut signals = Signals::new()?;
    let client = tokio::select! {
        c = connect(&args.connect) => c?,
        sig = signals.recv() => return Ok(signal_exit(sig)),
    };
    let mut params = ExecParams {
        command: command_line(&args.command),
        timeout_s: args.timeout,
        idle_timeout_s: args.idle_timeout,
        keep_output: args.keep_output.map(KeepOutput::from),
        env: (!args.env.is_empty()).then(|| args.env.iter().cloned().collect::<BTreeMap<_, _>>()),
        ..Default::default()
    };
    let (session_id, fresh) = match &args.session {
        Some(id) => (id.clone(), false),
        None => {
            let create = create_fresh(&client, args.cwd.as_deref());
            tokio::pin!(create);
            tokio::select! {
                id = &mut create => (id?, true),
                sig = signals.recv() => {
                    // The create may have gone through: destroy what it made.
                    if let Ok(Ok(id)) = tokio::time::timeout(CREATE_GRACE, create).await {
                        destroy_fresh(&client, &args.connect, &id).await;
                    }
                    return Ok(signal_exit(sig));
                }
            }
        }
    };
    params.session_id = session_id.clone();
    let outcome = if args.detach {
        detach(&client, params, stdin).await
    } else {
        let json = args.json;
        let streamed = if args.tty {
            super::tty::interactive(&client, params, &mut signals).await
        } else {
            stream_to_stdio(&client, params, stdin, &mut signals, json).await
        };
        match streamed {
            Ok(Streamed::Ended(r)) => {
                if json {
                    super::print_out(&format!("{}\n", result_json(&r)))?;
                }
                Ok(report(&r))
            }
            Ok(Streamed::Interrupted(sig)) => Ok(signal_exit(sig)),
            Err(e) => Err(e),
        }
    };
    // A detached command lives in its fresh session: that one stays.
    if fresh && (!args.detach || outcome.is_err()) {
        destroy_fresh(&client, &args.connect, &session_id).await;
    }
    outcome
}

/// Creates the fresh session, in `cwd`, or in ours when the daemon runs
/// commands as its own uid (which is then ours or root: only they may
/// connect to its socket), else in the session's own default.
async fn create_fresh(client: &Client, cwd: Option<&std::path::Path>) -> Result<String, CliError> {
    let (cwd, implicit) = match cwd {
        Some(dir) => (Some(std::path::absolute(dir)?), false),
        None => {
            let runtime = client.stats().await.map_err(CliError::from)?.runtime;
            let own_uid = runtime.isolation == "shared" && !runtime.run_as_user;
            (
                own_uid
                    .then(std::env::current_dir)
                    .transpose()
                    .ok()
                    .flatten(),
                true,
            )
        }
    };
    let params = |cwd: Option<String>| CreateParams {
        cwd,
        ..Default::default()
    };
    let cwd = cwd.map(|p| p.to_string_lossy().into_owned());
    match client.create_session(params(cwd.clone())).await {
        Ok(id) => Ok(id),
        // Our cwd is only a default: one the daemon cannot use (another mount
        // namespace, a directory it may not enter) falls back to its own.
        Err(sessiond::client::ClientError::Server(e))
            if implicit && cwd.is_some() && e.code == "INVALID_REQUEST" =>
        {
            eprintln!(
                "sessiond: note: the daemon cannot start a session in {} ({}); running in the session's default directory",
                cwd.unwrap_or_default(),
                e.message
            );
            client
                .create_session(params(None))
                .await
                .map_err(|e| CliError::from(e).during("creating a session"))
        }
        Err(e) => Err(CliError::from(e).during("creating a session")),
    }
}

/// Destroys the session `run` made; on a broken connection, tries once on a
/// new one. What cannot be destroyed is said, with what to do.
async fn destroy_fresh(client: &Client, c: &Connect, id: &str) {
    let mut result = client.destroy_session(id).await.map_err(CliError::from);
    if matches!(&result, Err(e) if e.is_connection()) {
        result = match connect(c).await {
            Ok(again) => again.destroy_session(id).await.map_err(CliError::from),
            Err(e) => Err(e),
        };
    }
    if let Err(e) = result {
        eprintln!(
            "sessiond: could not destroy the fresh session {id}: {e}\n  it ends at the daemon's idle timeout, or: sessiond session destroy {id}"
        );
    }
}

/// `run --detach`: starts the command and prints its id.
async fn detach(
    client: &Client,
    mut params: ExecParams,
    stdin: StdinSource,
) -> Result<ExitCode, CliError> {
    if let Some(mut from) = stdin.reader() {
        let mut data = Vec::new();
        from.read_to_end(&mut data)?;
        params.stdin = Some(serde_bytes::ByteBuf::from(data));
    }
    let id = client
        .start(params)
        .await
        .map_err(|e| CliError::from(e).during("starting the command"))?;
    super::print_out(&format!("{id}\n"))?;
    Ok(ExitCode::SUCCESS)
}

/// How a streamed run ended for us.
pub(super) enum Streamed {
    Ended(Box<ExecResult>),
    /// We got this signal (or SIGPIPE: our stdout closed) and cancelled the command.
    Interrupted(i32),
}

/// Runs `params` with streaming, copying output events to our stdout and
/// stderr as they come (unless `quiet`: `--json` prints the result only)
/// and `stdin` to the command; on a signal, cancels the command by id.
async fn stream_to_stdio(
    client: &Client,
    mut params: ExecParams,
    stdin: StdinSource,
    signals: &mut Signals,
    quiet: bool,
) -> Result<Streamed, CliError> {
    let chunks = stdin.reader().map(read_chunks);
    params.stdin_open = chunks.is_some();
    let mut stream = client
        .exec_stream(params)
        .await
        .map_err(|e| CliError::from(e).during("running the command"))?;
    let (id_tx, id_rx) = oneshot::channel::<String>();
    let mut id_tx = Some(id_tx);
    let pump = async {
        if let (Ok(id), Some(chunks)) = (id_rx.await, chunks) {
            pump_stdin(client, &id, chunks).await;
        }
    };
    tokio::pin!(pump);
    let mut pumped = false;
    let mut command_id = None;
    let mut at = [0u64; 2];
    loop {
        let event = tokio::select! {
            event = stream.next_event() => event.map_err(|e| CliError::from(e).during("running the command"))?,
            () = &mut pump, if !pumped => {
                pumped = true;
                continue;
            }
            sig = signals.recv() => return cancel(client, command_id.as_deref(), sig).await,
        };
        match event {
            None => break,
            Some(Event::Started { command_id: id }) => {
                if let Some(tx) = id_tx.take() {
                    let _ = tx.send(id.clone());
                }
                command_id = Some(id);
            }
            Some(Event::Output {
                stream: which,
                offset,
                data,
            }) => {
                if quiet {
                    continue;
                }
                let i = usize::from(which == StreamName::Stderr);
                if offset > at[i] {
                    eprintln!(
                        "sessiond: {} bytes of output skipped (we fell behind)",
                        offset - at[i]
                    );
                }
                at[i] = offset + data.len() as u64;
                match which {
                    StreamName::Stdout => {
                        let mut out = std::io::stdout().lock();
                        if out.write_all(&data).and_then(|()| out.flush()).is_err() {
                            // Nobody reads our output any more: the command
                            // would have died of SIGPIPE writing to it.
                            return cancel(client, command_id.as_deref(), libc::SIGPIPE).await;
                        }
                    }
                    StreamName::Stderr => {
                        let _ = std::io::stderr().write_all(&data);
                    }
                }
            }
        }
    }
    let result = stream
        .result()
        .await
        .map_err(|e| CliError::from(e).during("running the command"))?;
    Ok(Streamed::Ended(Box::new(result)))
}

/// Sends our stdin's chunks to the command, then `eof`. Stops quietly when
/// the command no longer takes them (it ended or closed its stdin): its
/// result says what became of it.
async fn pump_stdin(
    client: &Client,
    id: &str,
    mut chunks: mpsc::Receiver<std::io::Result<Vec<u8>>>,
) {
    let mut per_call = STDIN_CHUNK;
    while let Some(chunk) = chunks.recv().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                eprintln!("sessiond: cannot read stdin: {e}; closing the command's stdin");
                break;
            }
        };
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            let part = &rest[..rest.len().min(per_call)];
            // A short write: the command did not read for 5 s; offer the rest again.
            match client.write(id, part, false).await {
                Ok(n) => rest = &rest[(n as usize).min(part.len())..],
                // A daemon configured with a smaller `max_stdin_bytes`.
                Err(e) if e.code() == Some("STDIN_TOO_LARGE") && per_call > 1 => {
                    per_call /= 2;
                }
                Err(_) => return,
            }
        }
    }
    let _ = client.write(id, b"", true).await;
}

/// Cancels the remote command (if it started) after we got `signal`.
pub(super) async fn cancel(
    client: &Client,
    command_id: Option<&str>,
    signal: i32,
) -> Result<Streamed, CliError> {
    if let Some(id) = command_id {
        let _ = client.cancel_command(id).await;
    }
    Ok(Streamed::Interrupted(signal))
}

/// The result as JSON, field names as in the protocol; `stdout`/`stderr` as
/// text when they are UTF-8, else base64 (`stdout_encoding`: `utf-8` or `base64`).
pub fn result_json(r: &ExecResult) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap_or_default();
    for (name, bytes) in [("stdout", &r.stdout), ("stderr", &r.stderr)] {
        let (text, encoding) = match std::str::from_utf8(bytes) {
            Ok(s) => (s.to_string(), "utf-8"),
            Err(_) => (base64(bytes), "base64"),
        };
        v[name] = text.into();
        v[format!("{name}_encoding")] = encoding.into();
    }
    v
}

/// Standard base64 with padding (RFC 4648).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= group.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `sessiond attach`: follows a command's output to its end.
pub async fn attach(c: &Connect, id: &str) -> Result<ExitCode, CliError> {
    let client = connect(c).await?;
    let mut signals = Signals::new()?;
    let (mut stdout_at, mut stderr_at) = (0, 0);
    loop {
        let read = client.read(ReadParams {
            command_id: id.to_string(),
            stdout_offset: stdout_at,
            stderr_offset: stderr_at,
            wait_s: Some(30.0),
        });
        let r = tokio::select! {
            r = read => r.map_err(|e| CliError::from(e).during("reading the command"))?,
            // Only stops following: the command runs on.
            sig = signals.recv() => return Ok(signal_exit(sig)),
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
        if out.write_all(&r.stdout).and_then(|()| out.flush()).is_err() {
            return Ok(signal_exit(libc::SIGPIPE));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_words_are_quoted_one_is_a_command_line() {
        let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(command_line(&words(&["cd /tmp && ls"])), "cd /tmp && ls");
        assert_eq!(
            command_line(&words(&["ls", "-la", "my dir", "it's", "$HOME"])),
            r"'ls' '-la' 'my dir' 'it'\''s' '$HOME'"
        );
    }

    #[test]
    fn durations_and_env_parse() {
        assert_eq!(parse_seconds("5s"), Ok(5.0));
        assert_eq!(parse_seconds("2m"), Ok(120.0));
        assert_eq!(parse_seconds("0.5"), Ok(0.5));
        assert!(parse_seconds("0").is_err());
        assert!(parse_seconds("soon").is_err());
        assert_eq!(parse_env("A_1=x=y"), Ok(("A_1".into(), "x=y".into())));
        assert!(parse_env("NOVALUE").is_err());
        assert!(parse_env("1A=x").is_err());
        assert!(parse_env("=x").is_err());
    }

    #[test]
    fn base64_matches_rfc4648() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
        assert_eq!(base64(&[0xff, 0xfe]), "//4=");
    }
}
