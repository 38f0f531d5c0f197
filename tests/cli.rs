//! The `sessiond` command line against a real daemon.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use support::{TestDaemon, tagged_pids, wait_until};

fn sessiond(d: &TestDaemon, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sessiond"))
        .args(args)
        .env("SESSIOND_SOCKET", &d.socket)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn run_prints_output_and_exits_with_the_command_code() {
    let d = TestDaemon::start("");
    let o = sessiond(&d, &["run", "--", "echo", "hi"]);
    assert!(o.status.success());
    assert_eq!(stdout(&o), "hi\n");

    let o = sessiond(&d, &["run", "--", "echo oops >&2; exit 3"]);
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&o.stderr), "oops\n");

    let o = sessiond(&d, &["run", "--timeout", "0.2", "--", "sleep", "30"]);
    assert_eq!(o.status.code(), Some(128 + 15));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("killed (timeout)"),
        "{o:?}"
    );

    let input = d.dir.path().join("input.txt");
    std::fs::write(&input, "a\nb\nc\n").unwrap();
    let o = sessiond(
        &d,
        &["run", "--stdin", input.to_str().unwrap(), "--", "wc", "-l"],
    );
    assert_eq!(stdout(&o).trim(), "3");

    // Fresh sessions made by `run` are destroyed after.
    let o = sessiond(&d, &["session", "list"]);
    assert_eq!(stdout(&o), "");
    d.stop();
}

#[test]
fn session_subcommands_and_health() {
    let d = TestDaemon::start("");
    let o = sessiond(&d, &["session", "create"]);
    assert!(o.status.success());
    let id = stdout(&o).trim().to_string();
    let o = sessiond(&d, &["run", "--session", &id, "--", "cd /tmp"]);
    assert!(o.status.success());
    let o = sessiond(&d, &["run", "--session", &id, "--", "pwd"]);
    assert_eq!(stdout(&o), "/tmp\n");
    assert!(stdout(&sessiond(&d, &["session", "list"])).contains(&id));
    assert!(sessiond(&d, &["session", "destroy", &id]).status.success());
    let o = sessiond(&d, &["session", "destroy", &id]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("SESSION_NOT_FOUND"));

    assert!(stdout(&sessiond(&d, &["ping"])).starts_with("pong"));
    let o = sessiond(&d, &["stats", "--json"]);
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(stats["sessions"]["created_total"], 1);
    d.stop();
}

/// `sessiond <subcommand> --config <path>`, without a daemon.
fn with_config(subcommand: &str, config: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sessiond"))
        .args([subcommand, "--config"])
        .arg(config)
        .output()
        .unwrap()
}

#[test]
fn check_config_names_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[commands]\ndefault_timeout = \"2h\"\n").unwrap();
    let o = with_config("check-config", &bad);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("commands.default_timeout") && err.contains("max_timeout"),
        "{err}"
    );

    std::fs::write(&bad, "[server]\nsokcet = \"/x\"\n").unwrap();
    let o = with_config("check-config", &bad);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("sokcet"));

    // Without a file: the embedded defaults, which parse back to themselves.
    let o = Command::new(env!("CARGO_BIN_EXE_sessiond"))
        .arg("check-config")
        .output()
        .unwrap();
    assert!(o.status.success());
    let printed = String::from_utf8_lossy(&o.stdout);
    let parsed = sessiond::config::Config::parse(&printed).unwrap();
    assert_eq!(
        parsed.commands,
        sessiond::config::Config::default().commands
    );

    // A serve with a bad config refuses to start, with the same message.
    let o = with_config("serve", &bad);
    assert_eq!(o.status.code(), Some(2));
}

/// `sessiond run` prints each line as the command writes it: the command
/// waits for a file the test creates only after reading the first line.
#[test]
fn run_streams_output_as_it_comes() {
    let d = TestDaemon::start("");
    let flag = d.work_dir().join("next");
    let mut cli = Command::new(env!("CARGO_BIN_EXE_sessiond"))
        .args(["run", "--"])
        .arg(format!(
            "echo one; while [ ! -e {0} ]; do sleep 0.01; done; echo two",
            flag.display()
        ))
        .env("SESSIOND_SOCKET", &d.socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(cli.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "one");
    std::fs::write(&flag, b"").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "two");
    assert!(cli.wait().unwrap().success());
    d.stop();
}

/// Ctrl-C (SIGINT) to `sessiond run` cancels the remote command and
/// destroys its fresh session before the CLI exits 128 + 2; nothing is left.
#[test]
fn ctrl_c_cancels_the_remote_command_and_leaves_nothing() {
    let d = TestDaemon::start("");
    let mut cli = Command::new(env!("CARGO_BIN_EXE_sessiond"))
        .args(["run", "--", "echo started; sleep 30"])
        .env("SESSIOND_SOCKET", &d.socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(cli.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "started");
    // The tag is in the environment of what the shell starts (`sleep`), which
    // may not have started the instant `started` is read.
    wait_until("the command runs", Duration::from_secs(10), || {
        !tagged_pids(&d.tag).is_empty()
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(cli.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    assert_eq!(cli.wait().unwrap().code(), Some(128 + 2));
    wait_until(
        "the command's processes are gone",
        Duration::from_secs(10),
        || tagged_pids(&d.tag).is_empty(),
    );
    let o = sessiond(&d, &["session", "list"]);
    assert_eq!(stdout(&o), "", "the fresh session was destroyed");
    d.stop();
}

/// `run --detach` prints the id; `attach` follows the output to the end and
/// exits with the command's code; `write` sends stdin on.
#[test]
fn detach_attach_and_write() {
    let d = TestDaemon::start("");
    let session = stdout(&sessiond(&d, &["session", "create"]))
        .trim()
        .to_string();
    let o = sessiond(
        &d,
        &[
            "run",
            "--session",
            &session,
            "--detach",
            "--",
            "echo hello; exit 4",
        ],
    );
    assert!(o.status.success(), "{o:?}");
    let id = stdout(&o).trim().to_string();
    let o = sessiond(&d, &["attach", &id]);
    assert_eq!((o.status.code(), stdout(&o).as_str()), (Some(4), "hello\n"));
    // write: a command reading its stdin, started with it open.
    let c = tokio::runtime::Runtime::new().unwrap();
    let id = c.block_on(async {
        d.client()
            .await
            .start(sessiond::protocol::ExecParams {
                session_id: session.clone(),
                command: "tr a-z A-Z".into(),
                stdin_open: true,
                ..Default::default()
            })
            .await
            .unwrap()
    });
    let mut write = Command::new(env!("CARGO_BIN_EXE_sessiond"))
        .args(["write", &id, "--eof"])
        .env("SESSIOND_SOCKET", &d.socket)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut write.stdin.take().unwrap(), b"shout\n").unwrap();
    assert!(write.wait().unwrap().success());
    let o = sessiond(&d, &["attach", &id]);
    assert_eq!((o.status.code(), stdout(&o).as_str()), (Some(0), "SHOUT\n"));
    d.stop();
}
