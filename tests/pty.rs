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
         exec 3</dev/tty && echo ctty; echo \"$TERM\"; echo err >&2; [ \"$(ps -o tpgid= -p $$)\" -eq \"$(ps -o pgid= -p $$)\" ] && echo foreground",
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
        "tty\r\nsame\r\nctty\r\nxterm-256color\r\nerr\r\nforeground\r\n"
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
    p.timeout_s = Some(2.0);
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
