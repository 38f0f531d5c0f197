//! Commands on a pseudo-terminal against the real daemon: interactive programs (a REPL, `read -p`, a pager), keystrokes (Ctrl-C, ^D), `exec.resize`, limits, the terminal's end, and the refusals of `pty` and `exec.resize`.

mod support;

use std::time::{Duration, Instant};

use sessiond::client::Client;
use sessiond::protocol::{
    CreateParams, Event, ExecParams, ExecResult, KilledBy, PtyParams, ReadParams, StreamName,
};
use support::{TestDaemon, alive, get, request, wait_dead, wait_until};

/// How long any one expected output may take to come.
const EXPECT_WITHIN: Duration = Duration::from_secs(15);

fn on_pty(session: &str, command: &str, rows: u64, cols: u64) -> ExecParams {
    ExecParams {
        session_id: session.into(),
        command: command.into(),
        pty: Some(PtyParams { rows, cols }),
        ..Default::default()
    }
}

fn code(e: &sessiond::client::ClientError) -> &str {
    e.code().unwrap_or("none")
}

/// A command on a terminal, as a person at it sees it: what it printed so
/// far, and what it printed since the last look.
struct Term<'a> {
    c: &'a Client,
    id: String,
    /// Every byte of stdout so far.
    seen: Vec<u8>,
    /// Where the last `expect` matched: `since` is what came after.
    mark: usize,
    result: Option<sessiond::protocol::CommandResult>,
}

impl<'a> Term<'a> {
    async fn start(c: &'a Client, params: ExecParams) -> Term<'a> {
        let id = c.start(params).await.unwrap();
        Term {
            c,
            id,
            seen: Vec::new(),
            mark: 0,
            result: None,
        }
    }

    /// One `exec.read` of what came since; false once the command has ended.
    async fn read_more(&mut self) -> bool {
        let r = self
            .c
            .read(ReadParams {
                command_id: self.id.clone(),
                stdout_offset: self.seen.len() as u64,
                stderr_offset: 0,
                wait_s: Some(1.0),
            })
            .await
            .unwrap();
        assert!(
            r.stderr.is_empty(),
            "a terminal has no stderr: {:?}",
            r.stderr
        );
        assert_eq!(r.stderr_next, 0, "a terminal has no stderr");
        assert_eq!(r.stdout_offset, self.seen.len() as u64, "no gap");
        self.seen.extend_from_slice(&r.stdout);
        if r.done && r.stdout.is_empty() {
            self.result = r.result;
            return false;
        }
        true
    }

    /// Waits until the output after the last match holds `text`; returns
    /// what came before it (since the last match) and moves the mark past it.
    async fn expect(&mut self, text: &str) -> String {
        let deadline = Instant::now() + EXPECT_WITHIN;
        loop {
            let after = &self.seen[self.mark..];
            if let Some(at) = find(after, text.as_bytes()) {
                let before = String::from_utf8_lossy(&after[..at]).into_owned();
                self.mark += at + text.len();
                return before;
            }
            assert!(
                Instant::now() < deadline,
                "no {text:?} within {EXPECT_WITHIN:?}; after the last match: {:?}",
                String::from_utf8_lossy(after)
            );
            assert!(
                self.read_more().await || find(&self.seen[self.mark..], text.as_bytes()).is_some(),
                "the command ended without printing {text:?}; after the last match: {:?}",
                String::from_utf8_lossy(&self.seen[self.mark..])
            );
        }
    }

    async fn send(&self, keys: &str) {
        let n = self
            .c
            .write(&self.id, keys.as_bytes(), false)
            .await
            .unwrap();
        assert_eq!(n, keys.len() as u64);
    }

    /// Reads to the end; the command's result, and what it printed after the last match.
    async fn end(&mut self) -> (sessiond::protocol::CommandResult, String) {
        let deadline = Instant::now() + EXPECT_WITHIN;
        while self.read_more().await {
            assert!(Instant::now() < deadline, "the command did not end");
        }
        let rest = String::from_utf8_lossy(&self.seen[self.mark..]).into_owned();
        (self.result.clone().expect("a result when done"), rest)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

async fn setup() -> (TestDaemon, Client, String) {
    let d = TestDaemon::start("");
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    (d, c, s)
}

/// Links in `/proc/<pid>/fd` that name a pseudo-terminal (master or slave).
fn pty_fds(pid: i32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|l| l.display().to_string())
        .filter(|l| l == "/dev/ptmx" || l.starts_with("/dev/pts/"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn ping_lists_pty() {
    let (_d, c, _s) = setup().await;
    let ping = c.ping().await.unwrap();
    assert!(
        ping.features.iter().any(|f| f == "pty"),
        "{:?}",
        ping.features
    );
}

/// A python REPL prints its prompt and answers, as for a person: the
/// keystrokes are echoed by the terminal, `1+1` answers `2`, ^D ends it.
#[tokio::test(flavor = "multi_thread")]
async fn a_python_repl_prompts_and_answers() {
    let (_d, c, s) = setup().await;
    let mut t = Term::start(&c, on_pty(&s, "python3 -q", 24, 80)).await;
    t.expect(">>> ").await;
    t.send("1+1\n").await;
    assert_eq!(t.expect(">>> ").await, "1+1\r\n2\r\n");
    t.send("print('a' * 3)\n").await;
    assert_eq!(t.expect(">>> ").await, "print('a' * 3)\r\naaa\r\n");
    // ^D (exec.write's `eof` on a terminal) ends the REPL.
    c.write(&t.id, b"", true).await.unwrap();
    let (r, rest) = t.end().await;
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    assert_eq!(rest, "\r\n", "python echoes a newline at ^D");
    assert_eq!(r.stderr_total_bytes, 0);
}

/// gdb on a terminal: its `(gdb) ` prompt, an expression typed and answered,
/// `quit` ends it. (The test machine has gdb; CI installs nothing for it.)
#[tokio::test(flavor = "multi_thread")]
async fn gdb_prompts_evaluates_and_quits() {
    let (_d, c, s) = setup().await;
    let mut t = Term::start(&c, on_pty(&s, "gdb -q -nx", 24, 80)).await;
    t.expect("(gdb) ").await;
    t.send("print 6*7\n").await;
    // Readline echoes the line and, on an xterm, toggles bracketed paste around it.
    let answer = t.expect("(gdb) ").await;
    assert!(answer.starts_with("print 6*7\r\n"), "{answer:?}");
    assert!(answer.contains("\r$1 = 42\r\n"), "{answer:?}");
    t.send("quit\n").await;
    let (r, _) = t.end().await;
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    assert_eq!(r.stderr_total_bytes, 0);
}

/// `read -p` prints its prompt on the terminal and reads a typed line.
#[tokio::test(flavor = "multi_thread")]
async fn read_p_prompts_and_reads_a_line() {
    let (_d, c, s) = setup().await;
    let mut t = Term::start(&c, on_pty(&s, "read -p 'name? ' x; echo \"hi $x\"", 24, 80)).await;
    assert_eq!(t.expect("name? ").await, "");
    t.send("bob\n").await;
    let (r, rest) = t.end().await;
    assert_eq!(rest, "bob\r\nhi bob\r\n");
    assert_eq!(r.exit_code, Some(0));
    assert_eq!(String::from_utf8_lossy(&t.seen), "name? bob\r\nhi bob\r\n");
    // The variable was read in the session's shell: it carries over.
    let next = c.run(&s, "echo \"$x\"").await.unwrap();
    assert_eq!(next.stdout, b"bob\n");
}

/// `less` shows one screen (rows - 1 lines and its prompt), waits, and `q` quits.
#[tokio::test(flavor = "multi_thread")]
async fn a_pager_shows_one_screen_and_quits_on_q() {
    let (_d, c, s) = setup().await;
    let less = c.run(&s, "command -v less").await.unwrap();
    assert_eq!(less.exit_code, Some(0), "this test needs `less` installed");
    let mut t = Term::start(&c, on_pty(&s, "printf 'l%d\\n' $(seq 100) | less", 10, 40)).await;
    let screen = t.expect("l9").await;
    // Lines 1 to 8 came before, then l9 (10 rows: 9 lines and the prompt).
    for n in 1..9 {
        assert!(screen.contains(&format!("l{n}\r\n")), "l{n} in {screen:?}");
    }
    t.expect(":").await;
    // Nothing past the first screen until asked for.
    assert!(
        find(&t.seen, b"l10").is_none(),
        "{:?}",
        String::from_utf8_lossy(&t.seen)
    );
    t.send(" ").await;
    t.expect("l18").await;
    assert!(
        find(&t.seen, b"l19").is_none(),
        "{:?}",
        String::from_utf8_lossy(&t.seen)
    );
    t.send("q").await;
    let (r, _) = t.end().await;
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    assert!(find(&t.seen, b"l100").is_none());
}

/// Ctrl-C is a keystroke: the terminal sends SIGINT to the foreground
/// group, `sleep 100` and its shell end by it, and the session runs on with
/// its state as before.
#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_interrupts_sleep_and_the_session_stays_usable() {
    let (d, c, s) = setup().await;
    c.run(&s, "x=kept; cd /tmp").await.unwrap();
    let begun = Instant::now();
    let mut t = Term::start(&c, on_pty(&s, "echo ready; sleep 100; echo after", 24, 80)).await;
    t.expect("ready\r\n").await;
    // A ^C between bash's fork and sleep's exec is lost for sleep (as it
    // would be for a person typing it then): wait until sleep runs.
    wait_until("sleep runs", EXPECT_WITHIN, || {
        support::tagged_pids(&d.tag).into_iter().any(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c == "sleep\n")
        })
    });
    t.send("\u{3}").await;
    let (r, rest) = t.end().await;
    assert!(
        begun.elapsed() < Duration::from_secs(50),
        "{:?}",
        begun.elapsed()
    );
    assert_eq!(r.signal, Some(libc::SIGINT), "{r:?}");
    assert_eq!(r.exit_code, None);
    assert_eq!(r.killed_by, None, "the terminal, not the daemon, ended it");
    // The terminal echoes ^C; `after` never ran.
    assert_eq!(rest, "^C");
    let next = c.run(&s, "echo \"$x $PWD\"").await.unwrap();
    assert_eq!(next.stdout, b"kept /tmp\n");
}

/// ^D (`eof`) ends `cat`'s input without closing the terminal: the next
/// program on it still reads keystrokes.
#[tokio::test(flavor = "multi_thread")]
async fn eof_is_ctrl_d_and_leaves_the_terminal_open() {
    let (_d, c, s) = setup().await;
    let mut t = Term::start(&c, on_pty(&s, "cat; echo again; cat", 24, 80)).await;
    t.send("hello\n").await;
    // The terminal's echo, then cat's copy.
    assert_eq!(t.expect("hello\r\nhello\r\n").await, "");
    c.write(&t.id, b"", true).await.unwrap();
    t.expect("again\r\n").await;
    t.send("more\n").await;
    t.expect("more\r\nmore\r\n").await;
    // Data and ^D in one write: the line, then the end.
    assert_eq!(c.write(&t.id, b"last\n", true).await.unwrap(), 5);
    let (r, rest) = t.end().await;
    assert_eq!(rest, "last\r\nlast\r\n");
    assert_eq!(r.exit_code, Some(0));
    let err = c.write(&t.id, b"x", false).await.unwrap_err();
    assert_eq!(code(&err), "INVALID_REQUEST", "{err}");
}

/// `exec.resize` changes what `stty size` reads, and the command's
/// foreground group gets SIGWINCH.
#[tokio::test(flavor = "multi_thread")]
async fn resize_is_seen_by_stty_and_a_sigwinch_trap() {
    let (_d, c, s) = setup().await;
    let mut t = Term::start(
        &c,
        on_pty(
            &s,
            "stty size; trap 'stty size; exit 7' WINCH; echo ready; while :; do sleep 0.05; done",
            24,
            80,
        ),
    )
    .await;
    assert_eq!(t.expect("ready\r\n").await, "24 80\r\n");
    c.resize(&t.id, 40, 132).await.unwrap();
    let (r, rest) = t.end().await;
    assert_eq!(rest, "40 132\r\n");
    assert_eq!(r.exit_code, Some(7), "{r:?}");
    // Ended: no terminal to resize.
    let err = c.resize(&t.id, 10, 10).await.unwrap_err();
    assert_eq!(code(&err), "INVALID_REQUEST");
    assert!(err.to_string().contains("ended"), "{err}");
}

/// stdin, stdout and stderr are the terminal, which is the controlling
/// one; TERM is xterm-256color unless the request's env says otherwise,
/// and stderr stays empty.
#[tokio::test(flavor = "multi_thread")]
async fn the_terminal_is_stdio_and_controlling_terminal() {
    let (_d, c, s) = setup().await;
    let session_term = c.run(&s, "echo \"${TERM-unset}\"").await.unwrap().stdout;
    assert!(session_term != b"xterm-256color\n" && session_term != b"vt100\n");
    let mut p = on_pty(
        &s,
        "[ -t 0 ] && [ -t 1 ] && [ -t 2 ] && echo tty; [ \"$(tty)\" = \"$(readlink /proc/$$/fd/0)\" ] && echo same; \
         exec 3</dev/tty && echo ctty; ls -l /proc/$$/fd/ | grep -c ptmx; echo \"$TERM\"; echo err >&2; [ \"$(ps -o tpgid= -p $$)\" -eq \"$(ps -o pgid= -p $$)\" ] && echo foreground",
        24,
        80,
    );
    p.stream = true;
    let mut stream = c.exec_stream(p.clone()).await.unwrap();
    let mut events = Vec::new();
    while let Some(e) = stream.next_event().await.unwrap() {
        events.push(e);
    }
    let r = stream.result().await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        "tty\r\nsame\r\nctty\r\n0\r\nxterm-256color\r\nerr\r\nforeground\r\n"
    );
    assert!(r.stderr.is_empty() && r.stderr_total_bytes == 0, "{r:?}");
    assert!(
        events.iter().all(|e| !matches!(
            e,
            Event::Output {
                stream: StreamName::Stderr,
                ..
            }
        )),
        "{events:?}"
    );
    // The request's env wins over the default.
    p.env = Some([("TERM".to_string(), "vt100".to_string())].into());
    p.command = "echo \"$TERM\"".into();
    let r = c.exec_stream(p).await.unwrap().result().await.unwrap();
    assert_eq!(r.stdout, b"vt100\r\n");
    // And neither sticks to the session.
    let r = c.run(&s, "echo \"${TERM-unset}\"").await.unwrap();
    assert_eq!(
        r.stdout,
        session_term,
        "{}",
        String::from_utf8_lossy(&r.stdout)
    );
}

/// A timeout ends a terminal command like any other; its background child
/// on the terminal goes with it, and no fd of its terminal is left in the
/// daemon or in another session's command.
#[tokio::test(flavor = "multi_thread")]
async fn timeout_kills_a_pty_command_and_leaves_no_process_or_fd() {
    let (d, c, s) = setup().await;
    let other = c.create_session(CreateParams::default()).await.unwrap();
    let mut p = on_pty(&s, "sleep 300 & echo \"bg $!\"; echo ready; cat", 24, 80);
    // Long enough for the checks below on a slow machine; the `cat` waits.
    p.timeout_s = Some(6.0);
    let mut t = Term::start(&c, p).await;
    let bg: i32 = t
        .expect("\r\nready")
        .await
        .trim()
        .trim_start_matches("bg ")
        .parse()
        .unwrap();
    assert!(alive(bg));
    // While it runs: the master is the daemon's only, and another
    // command's fds name no terminal.
    let daemon_fds = pty_fds(d.pid());
    assert!(
        daemon_fds.iter().all(|l| l == "/dev/ptmx"),
        "{daemon_fds:?}"
    );
    assert!(!daemon_fds.is_empty());
    let r = c
        .run(
            &other,
            "ls -l /proc/self/fd/ | grep -c -e ptmx -e /dev/pts || true",
        )
        .await
        .unwrap();
    assert_eq!(r.stdout, b"0\n", "{}", String::from_utf8_lossy(&r.stdout));
    let (r, _) = t.end().await;
    assert_eq!(r.killed_by, Some(KilledBy::Timeout), "{r:?}");
    assert!(r.timed_out);
    wait_dead(bg, "the pty command's background sleep");
    assert_eq!(
        pty_fds(d.pid()),
        Vec::<String>::new(),
        "the terminal is closed"
    );
    let r = c.run(&s, "echo fine").await.unwrap();
    assert_eq!(r.stdout, b"fine\n");
}

/// A command that ends by itself takes its terminal and its process group
/// with it, even a child that ignores the hangup.
#[tokio::test(flavor = "multi_thread")]
async fn the_terminal_and_process_group_end_with_the_command() {
    let (d, c, s) = setup().await;
    let mut t = Term::start(
        &c,
        on_pty(
            &s,
            "trap '' HUP; (trap '' HUP; exec sleep 300) & echo \"bg $!\"",
            24,
            80,
        ),
    )
    .await;
    let bg: i32 = t
        .expect("\r\n")
        .await
        .trim_start_matches("bg ")
        .parse()
        .unwrap();
    let (r, _) = t.end().await;
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    wait_dead(bg, "a child left on the terminal");
    wait_until(
        "no terminal fd in the daemon",
        Duration::from_secs(5),
        || pty_fds(d.pid()).is_empty(),
    );
}

/// `stdin` of the request arrives as typed keystrokes ahead of any write.
#[tokio::test(flavor = "multi_thread")]
async fn request_stdin_is_typed_first() {
    let (_d, c, s) = setup().await;
    let mut p = on_pty(&s, "read a; read b; echo \"$a-$b\"", 24, 80);
    p.stdin = Some(serde_bytes::ByteBuf::from(b"one\n".to_vec()));
    let mut t = Term::start(&c, p).await;
    t.send("two\n").await;
    let (r, rest) = t.end().await;
    assert_eq!(rest, "one\r\ntwo\r\none-two\r\n");
    assert_eq!(r.exit_code, Some(0));
}

/// The refusals: sizes out of bounds name their key, `pty` needs a stream,
/// `exec.resize` needs a terminal.
#[tokio::test(flavor = "multi_thread")]
async fn bad_pty_params_and_resizes_are_refused() {
    let (d, c, s) = setup().await;
    for (rows, cols, key) in [
        (0, 80, "pty.rows"),
        (24, 0, "pty.cols"),
        (24, 100_000, "pty.cols"),
    ] {
        let err = c.start(on_pty(&s, "true", rows, cols)).await.unwrap_err();
        assert_eq!(code(&err), "INVALID_REQUEST");
        assert!(err.to_string().contains(key), "{err}");
    }
    // exec.run without a stream: nothing would show the terminal's output as it comes.
    let err = c.exec(on_pty(&s, "true", 24, 80)).await.unwrap_err();
    assert_eq!(code(&err), "INVALID_REQUEST");
    assert!(err.to_string().contains("`pty`"), "{err}");
    // Strict: an unknown key in `pty` is refused.
    let mut raw = d.raw();
    raw.send(&request(
        1,
        "exec.start",
        vec![
            ("session_id", s.as_str().into()),
            ("command", "true".into()),
            (
                "pty",
                rmpv::Value::Map(vec![
                    ("rows".into(), 24.into()),
                    ("cols".into(), 80.into()),
                    ("depth".into(), 3.into()),
                ]),
            ),
        ],
    ));
    let answer = raw.read().unwrap();
    assert_eq!(
        support::error_code(&answer).as_deref(),
        Some("INVALID_REQUEST")
    );
    assert!(
        get(get(&answer, "error"), "message")
            .as_str()
            .unwrap()
            .contains("pty"),
        "{answer}"
    );
    // A command without a terminal has nothing to resize.
    let id = c
        .start(ExecParams {
            session_id: s.clone(),
            command: "cat".into(),
            stdin_open: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let err = c.resize(&id, 24, 80).await.unwrap_err();
    assert_eq!(code(&err), "INVALID_REQUEST");
    assert!(err.to_string().contains("pty"), "{err}");
    let err = c.resize(&id, 0, 80).await.unwrap_err();
    assert!(err.to_string().contains("`rows`"), "{err}");
    c.write(&id, b"", true).await.unwrap();
    let err = c.resize("nope/c-1", 24, 80).await.unwrap_err();
    assert_eq!(code(&err), "COMMAND_NOT_FOUND", "{err}");
}

/// Output of a terminal command comes as `stdout` events only, and its
/// result is the same as `exec.read` shows.
#[tokio::test(flavor = "multi_thread")]
async fn streamed_pty_output_is_stdout_events() {
    let (_d, c, s) = setup().await;
    let mut p = on_pty(&s, "echo out; echo err >&2; exit 3", 24, 80);
    p.stream = true;
    let mut stream = c.exec_stream(p).await.unwrap();
    let mut out = Vec::new();
    while let Some(e) = stream.next_event().await.unwrap() {
        if let Event::Output { stream, data, .. } = e {
            assert_eq!(stream, StreamName::Stdout);
            out.extend_from_slice(&data);
        }
    }
    let r: ExecResult = stream.result().await.unwrap();
    assert_eq!(out, b"out\r\nerr\r\n");
    assert_eq!(r.stdout, out);
    assert_eq!(r.exit_code, Some(3));
}

/// The terminal state goes in and out through the state fds, never through
/// the terminal: with `set -x` on, the terminal shows the command's own
/// trace and output only, and what the command set is carried.
#[tokio::test(flavor = "multi_thread")]
async fn state_is_carried_outside_the_terminal() {
    let (_d, c, s) = setup().await;
    c.run(&s, "set -x; y=1").await.unwrap();
    let mut t = Term::start(&c, on_pty(&s, "echo $y; z=2", 24, 80)).await;
    let (r, rest) = t.end().await;
    assert_eq!(rest, "+ echo 1\r\n1\r\n+ z=2\r\n");
    assert_eq!(r.state_error, None);
    let r = c.run(&s, "set +x; echo $y$z").await.unwrap();
    assert_eq!(r.stdout, b"12\n");
}

/// The output cap applies to a terminal's output as to a pipe's.
#[tokio::test(flavor = "multi_thread")]
async fn the_output_cap_applies() {
    let d = TestDaemon::start("[commands]\nmax_output_bytes = \"1 KiB\"\n");
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let mut p = on_pty(&s, "head -c 100000 /dev/zero | tr '\\0' a", 24, 80);
    p.stream = true;
    let r = c.exec_stream(p).await.unwrap().result().await.unwrap();
    assert_eq!(r.exit_code, Some(0));
    assert_eq!(r.stdout_total_bytes, 100_000);
    assert!(r.stdout_truncated);
    assert_eq!(r.stdout, vec![b'a'; 1024], "the kept head");
}

/// A command running as a session's own uid owns its terminal, as after a
/// login: it can reopen it by name.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (uid-per-session); CI runs it"]
async fn a_session_uid_owns_its_terminal() {
    assert!(nix::unistd::geteuid().is_root(), "run as root");
    let d = TestDaemon::start_isolated(1, "");
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let mut t = Term::start(
        &c,
        on_pty(&s, "[ \"$(stat -c %u \"$(tty)\")\" = \"$(id -u)\" ] && echo owner; echo again > \"$(tty)\"; id -u", 24, 80),
    )
    .await;
    let (r, rest) = t.end().await;
    assert_eq!(r.exit_code, Some(0), "{rest:?}");
    let lines: Vec<&str> = rest.split("\r\n").collect();
    assert_eq!(lines[..2], ["owner", "again"], "{rest:?}");
    assert_ne!(lines[2], "0", "runs as the session's uid");
}

/// `sessiond run -t` on a pseudo-terminal of the test's own, which plays
/// the person's terminal: the CLI's controlling terminal and stdio.
mod cli_tty {
    use super::*;
    use nix::sys::termios::{self, LocalFlags};
    use std::io::Read;
    use std::os::fd::{AsFd, AsRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command, Stdio};
    use std::sync::{Arc, Mutex};

    struct Terminal {
        master: OwnedFd,
        /// Kept for tcgetattr; dropped once the CLI has exited.
        slave: Option<OwnedFd>,
        seen: Arc<Mutex<Vec<u8>>>,
        cli: Child,
    }

    impl Terminal {
        /// `sessiond run -t -- <command>` on a fresh 30 × 100 terminal.
        fn run(d: &TestDaemon, command: &str) -> Terminal {
            let size = nix::pty::Winsize {
                ws_row: 30,
                ws_col: 100,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            let pty = nix::pty::openpty(Some(&size), None).unwrap();
            let stdio = || Stdio::from(pty.slave.try_clone().unwrap());
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_sessiond"));
            cmd.args(["run", "-t", "--", command])
                .env("SESSIOND_SOCKET", &d.socket)
                .stdin(stdio())
                .stdout(stdio())
                .stderr(stdio());
            // SAFETY: setsid and ioctl are async-signal-safe; fd 0 is the slave by then.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let cli = cmd.spawn().unwrap();
            let seen = Arc::new(Mutex::new(Vec::new()));
            let (sink, mut from) = (
                seen.clone(),
                std::fs::File::from(pty.master.try_clone().unwrap()),
            );
            // Ends at EIO, once no slave fd is left (the CLI exited, ours dropped).
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = from.read(&mut buf) {
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
            Terminal {
                master: pty.master,
                slave: Some(pty.slave),
                seen,
                cli,
            }
        }

        fn screen(&self) -> String {
            String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
        }

        fn expect(&self, text: &str) {
            wait_until(&format!("{text:?} on the terminal"), EXPECT_WITHIN, || {
                self.screen().contains(text)
            });
        }

        fn type_keys(&self, keys: &[u8]) {
            assert_eq!(nix::unistd::write(&self.master, keys).unwrap(), keys.len());
        }

        /// Whether the terminal is in its cooked mode (line editing and echo).
        fn cooked(&self) -> bool {
            let t = termios::tcgetattr(self.slave.as_ref().unwrap().as_fd()).unwrap();
            t.local_flags
                .contains(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG)
        }

        fn wait(&mut self) -> i32 {
            let deadline = Instant::now() + EXPECT_WITHIN;
            loop {
                if let Some(status) = self.cli.try_wait().unwrap() {
                    return status.code().expect("the CLI exits, it is not killed");
                }
                assert!(Instant::now() < deadline, "sessiond run -t did not exit");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Keys typed reach the remote command raw (no local echo or line
    /// editing: the echo comes from the remote terminal), the size is ours,
    /// a size change is forwarded, the exit code is the command's, and our
    /// terminal is cooked again afterwards.
    #[test]
    fn run_t_forwards_keys_and_size_and_restores_the_terminal() {
        let d = TestDaemon::start("");
        let mut t = Terminal::run(
            &d,
            "stty size; [ -t 0 ] && echo tty; read -r x; echo \"got $x\"; trap 'stty size; exit 5' WINCH; echo ready; while :; do sleep 0.05; done",
        );
        t.expect("30 100\r\ntty\r\n");
        assert!(!t.cooked(), "raw while the command runs");
        t.type_keys(b"abc\r");
        t.expect("abc\r\ngot abc\r\n");
        t.expect("ready\r\n");
        let size = libc::winsize {
            ws_row: 40,
            ws_col: 120,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // The kernel sends SIGWINCH to the CLI, the terminal's foreground group.
        // SAFETY: TIOCSWINSZ reads a winsize through a valid pointer.
        let rc = unsafe { libc::ioctl(t.master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        assert_eq!(rc, 0);
        t.expect("40 120\r\n");
        assert_eq!(t.wait(), 5);
        assert!(t.cooked(), "cooked again after the run");
        assert_eq!(
            t.screen().matches("abc").count(),
            2,
            "typed once, echoed once: {:?}",
            t.screen()
        );
        t.slave = None;
        d.stop();
    }

    /// ^C is a key for the remote terminal (it interrupts the command
    /// there); SIGTERM to the CLI cancels the command and restores our terminal.
    #[test]
    fn run_t_ctrl_c_and_sigterm_leave_the_terminal_cooked() {
        let d = TestDaemon::start("");
        let mut t = Terminal::run(&d, "echo ready; read -r x");
        t.expect("ready\r\n");
        t.type_keys(b"\x03");
        assert_eq!(t.wait(), 128 + libc::SIGINT);
        assert!(t.cooked());

        let mut t = Terminal::run(&d, "echo ready; sleep 100");
        t.expect("ready\r\n");
        assert!(!t.cooked());
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(t.cli.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        assert_eq!(t.wait(), 128 + libc::SIGTERM);
        assert!(t.cooked(), "cooked again after SIGTERM");
        wait_until("the remote command is gone", EXPECT_WITHIN, || {
            support::tagged_pids(&d.tag).is_empty()
        });
        t.slave = None;
        d.stop();
    }

    #[test]
    fn run_t_needs_a_terminal() {
        let d = TestDaemon::start("");
        let o = Command::new(env!("CARGO_BIN_EXE_sessiond"))
            .args(["run", "-t", "--", "true"])
            .env("SESSIOND_SOCKET", &d.socket)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("-t needs a terminal"),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        d.stop();
    }
}
