//! Protocol 2's long-running commands against the real daemon: streamed output, exec.start/read/write, re-attach, idle timeout, cancel by id, and the refusals of each (hostile clients are in the fault_* scenarios).

mod support;

use std::sync::Arc;
use std::time::Duration;

use sessiond::client::Client;
use sessiond::protocol::{
    CreateParams, Event, ExecParams, KilledBy, ReadParams, ReadResult, StreamName,
};
use support::{TestDaemon, get, request, wait_until, wait_until_async};

fn exec(session: &str, command: &str) -> ExecParams {
    ExecParams {
        session_id: session.into(),
        command: command.into(),
        ..Default::default()
    }
}

fn read_at(command_id: &str, stdout_offset: u64, wait_s: f64) -> ReadParams {
    ReadParams {
        command_id: command_id.into(),
        stdout_offset,
        stderr_offset: 0,
        wait_s: Some(wait_s),
    }
}

/// Reads until the command is done, collecting its stdout (bytes retained in order).
async fn read_to_end(c: &Client, command_id: &str) -> (Vec<u8>, ReadResult) {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        let r = c.read(read_at(command_id, at, 10.0)).await.unwrap();
        assert_eq!(r.stdout_offset, at, "no gap in a command this small");
        out.extend_from_slice(&r.stdout);
        at = r.stdout_next;
        if r.done {
            return (out, r);
        }
    }
}

fn code(e: &sessiond::client::ClientError) -> &str {
    e.code().unwrap_or("none")
}

/// Output arrives as events while the command runs: the command waits for a
/// file that the test creates only after it saw the first line's event.
#[tokio::test(flavor = "multi_thread")]
async fn streamed_output_arrives_while_the_command_runs() {
    let d = TestDaemon::start("");
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let flag = d.work_dir().join("go-on");
    let command = format!(
        "echo first; echo err >&2; while [ ! -e {0} ]; do sleep 0.01; done; echo second",
        flag.display()
    );
    let mut stream = c.exec_stream(exec(&s, &command)).await.unwrap();
    let Some(Event::Started { command_id }) = stream.next_event().await.unwrap() else {
        panic!("the first event is `started`");
    };
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let mut created = false;
    while let Some(event) = stream.next_event().await.unwrap() {
        let Event::Output {
            stream: which,
            offset,
            data,
        } = event
        else {
            panic!("only output events after `started`: {event:?}");
        };
        let buf = match which {
            StreamName::Stdout => &mut stdout,
            StreamName::Stderr => &mut stderr,
        };
        assert_eq!(
            offset,
            buf.len() as u64,
            "offsets are contiguous for a reader that keeps up"
        );
        buf.extend_from_slice(&data);
        if !created && stdout.starts_with(b"first\n") {
            // Seen before the command could end: it waits for this file.
            std::fs::write(&flag, b"").unwrap();
            created = true;
        }
    }
    assert!(created, "the first line came as an event before the end");
    let r = stream.result().await.unwrap();
    assert_eq!(r.command_id.as_deref(), Some(command_id.as_str()));
    assert_eq!(
        (stdout.as_slice(), stderr.as_slice()),
        (&b"first\nsecond\n"[..], &b"err\n"[..])
    );
    assert_eq!(
        r.stdout.as_slice(),
        b"first\nsecond\n",
        "the result still carries the kept output"
    );
    assert_eq!(r.exit_code, Some(0));
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn start_then_read_with_offsets_until_done() {
    let d = TestDaemon::start("");
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let id = c
        .start(exec(&s, "printf abc; printf def >&2; exit 3"))
        .await
        .unwrap();
    assert!(id.starts_with(&format!("{s}/")), "{id}");
    let (out, last) = read_to_end(&c, &id).await;
    assert_eq!(out, b"abc");
    let result = last.result.expect("a done read carries the result");
    assert_eq!(result.exit_code, Some(3));
    assert_eq!(result.command_id.as_deref(), Some(id.as_str()));
    assert_eq!(
        (result.stdout_total_bytes, result.stderr_total_bytes),
        (3, 3)
    );
    // Reading removes nothing: from 0 again, both streams; from 1, the rest.
    let again = c.read(read_at(&id, 1, 0.0)).await.unwrap();
    assert_eq!(
        (
            again.stdout.as_slice(),
            again.stdout_offset,
            again.stdout_next
        ),
        (&b"bc"[..], 1, 3)
    );
    assert_eq!(again.stderr.as_slice(), b"def");
    // An offset past the end is an empty read at the end, not an error.
    let past = c.read(read_at(&id, 100, 0.0)).await.unwrap();
    assert!(past.stdout.is_empty() && past.done);
    assert_eq!((past.stdout_offset, past.stdout_next), (3, 3));
    // The session's slot was free and its state updated before `done` was seen.
    let r = c.run(&s, "echo next").await.unwrap();
    assert_eq!(r.exit_code, Some(0));
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_waits_for_output_and_returns_at_once_when_the_command_ends() {
    let d = TestDaemon::start("");
    let c = Arc::new(d.client().await);
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let id = c
        .start(ExecParams {
            stdin_open: true,
            ..exec(&s, "read line; echo \"got $line\"")
        })
        .await
        .unwrap();
    // Nothing yet: a read without wait answers at once, empty, not done.
    let r = c.read(read_at(&id, 0, 0.0)).await.unwrap();
    assert!(r.stdout.is_empty() && !r.done && r.result.is_none());
    // Many readers wait at once; the write makes the command print and end.
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let (c, id) = (c.clone(), id.clone());
            tokio::spawn(async move { c.read(read_at(&id, 0, 30.0)).await })
        })
        .collect();
    assert_eq!(c.write(&id, b"hi\n", false).await.unwrap(), 3);
    for reader in readers {
        let r = reader.await.unwrap().unwrap();
        assert!(r.stdout.starts_with(b"got"), "{r:?}");
    }
    let (out, last) = read_to_end(&c, &id).await;
    assert_eq!(out, b"got hi\n");
    assert_eq!(last.result.unwrap().exit_code, Some(0));
    // A command that ends while a read waits: the read returns at once with done.
    let id = c.start(exec(&s, "sleep 0.3")).await.unwrap();
    let r = c.read(read_at(&id, 0, 60.0)).await.unwrap();
    assert!(r.done, "{r:?}");
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_reach_stdin_in_order_and_refusals_say_why() {
    let d = TestDaemon::start("[commands]\nmax_stdin_bytes = \"64 KiB\"\n");
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let id = c
        .start(ExecParams {
            stdin_open: true,
            stdin: Some(serde_bytes::ByteBuf::from(b"first\n".to_vec())),
            ..exec(&s, "cat")
        })
        .await
        .unwrap();
    for part in ["second\n", "third\n"] {
        assert_eq!(
            c.write(&id, part.as_bytes(), false).await.unwrap(),
            part.len() as u64
        );
    }
    assert_eq!(c.write(&id, b"last\n", true).await.unwrap(), 5);
    let (out, _) = read_to_end(&c, &id).await;
    assert_eq!(out, b"first\nsecond\nthird\nlast\n");
    // After eof, and after the end: INVALID_REQUEST saying which.
    let err = c.write(&id, b"x", false).await.unwrap_err();
    assert_eq!(code(&err), "INVALID_REQUEST");
    assert!(
        err.to_string().contains("ended") || err.to_string().contains("closed"),
        "{err}"
    );
    // Over max_stdin_bytes per call.
    let id2 = c
        .start(ExecParams {
            stdin_open: true,
            // Runs on after its stdin closes, so the write after eof meets a
            // closed stdin, not an ended command.
            ..exec(&s, "cat >/dev/null; sleep 30")
        })
        .await
        .unwrap();
    let err = c
        .write(&id2, &vec![b'x'; 65 * 1024], false)
        .await
        .unwrap_err();
    assert_eq!(code(&err), "STDIN_TOO_LARGE");
    c.write(&id2, b"", true).await.unwrap();
    let err = c.write(&id2, b"x", false).await.unwrap_err();
    assert!(err.to_string().contains("closed"), "after eof: {err}");
    assert!(c.cancel_command(&id2).await.unwrap());
    read_to_end(&c, &id2).await;
    // A command not started with stdin_open.
    let id3 = c.start(exec(&s, "sleep 0.2")).await.unwrap();
    let err = c.write(&id3, b"x", false).await.unwrap_err();
    assert!(err.to_string().contains("stdin_open"), "{err}");
    read_to_end(&c, &id3).await;
    // exec.run's stdin_open needs stream (the id comes in its `started` event).
    let err = c
        .exec(ExecParams {
            stdin_open: true,
            ..exec(&s, "cat")
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("stdin_open"), "{err}");
    drop(c);
    d.stop();
}

/// A command that does not read its stdin never blocks the daemon: the
/// write returns within its 5 s with what went in, and others are served.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_to_a_command_that_does_not_read_returns_what_was_written() {
    let d = TestDaemon::start("[commands]\nmax_stdin_bytes = \"1 MiB\"\n");
    let c = Arc::new(d.client().await);
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let id = c
        .start(ExecParams {
            stdin_open: true,
            ..exec(&s, "sleep 30")
        })
        .await
        .unwrap();
    let writer = {
        let (c, id) = (c.clone(), id.clone());
        tokio::spawn(async move { c.write(&id, &vec![b'x'; 1 << 20], false).await })
    };
    // Meanwhile the daemon serves everything else.
    let other = c.create_session(CreateParams::default()).await.unwrap();
    assert_eq!(c.run(&other, "echo ok").await.unwrap().exit_code, Some(0));
    let written = writer.await.unwrap().unwrap();
    assert!(
        written > 0 && written < 1 << 20,
        "a full pipe takes part: {written}"
    );
    assert!(c.cancel_command(&id).await.unwrap());
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_outlives_its_connection_and_is_read_from_another() {
    let d = TestDaemon::start("");
    let first = d.client().await;
    let s = first.create_session(CreateParams::default()).await.unwrap();
    let flag = d.work_dir().join("reattached");
    let id = first
        .start(exec(
            &s,
            &format!(
                "echo before; while [ ! -e {0} ]; do sleep 0.01; done; echo after",
                flag.display()
            ),
        ))
        .await
        .unwrap();
    drop(first);
    let second = d.client().await;
    let r = second.read(read_at(&id, 0, 10.0)).await.unwrap();
    assert_eq!(
        r.stdout.as_slice(),
        b"before\n",
        "still running after its connection closed"
    );
    assert!(!r.done);
    std::fs::write(&flag, b"").unwrap();
    let (out, last) = read_to_end(&second, &id).await;
    assert_eq!(out, b"before\nafter\n");
    assert_eq!(last.result.unwrap().exit_code, Some(0));
    // session.list shows no running command now.
    let listed = second.list_sessions().await.unwrap();
    let entry = listed.sessions.iter().find(|e| e.session_id == s).unwrap();
    assert!(entry.command_ids.is_empty() && entry.command_id.is_none());
    drop(second);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_and_expired_ids_are_command_not_found() {
    // Kept 2 s: long enough for the reads below on a slow machine, short for the expiry check.
    let d = TestDaemon::start("[commands]\nretain_finished = \"2s\"\n");
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let id = c.start(exec(&s, "echo mine")).await.unwrap();
    read_to_end(&c, &id).await;
    for bad in [
        "nope",
        "",
        "/c-x",
        &format!("{s}/c-unknown"),
        "s-0000/c-0000",
    ] {
        let err = c.read(read_at(bad, 0, 0.0)).await.unwrap_err();
        assert_eq!(code(&err), "COMMAND_NOT_FOUND", "{bad:?}");
        let err = c.cancel_command(bad).await.unwrap_err();
        assert_eq!(code(&err), "COMMAND_NOT_FOUND", "{bad:?}");
        let err = c.write(bad, b"x", false).await.unwrap_err();
        assert_eq!(code(&err), "COMMAND_NOT_FOUND", "{bad:?}");
    }
    // Retention ends: after retain_finished the id is gone.
    wait_until_async(
        "the finished command expires",
        Duration::from_secs(10),
        || async {
            c.read(read_at(&id, 0, 0.0))
                .await
                .is_err_and(|e| e.code() == Some("COMMAND_NOT_FOUND"))
        },
    )
    .await;
    drop(c);
    d.stop();
}

/// Another uid gets COMMAND_NOT_FOUND from every command method, for a
/// running and for a finished command alike: never a hint that it exists.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (connects as another uid)"]
async fn another_uids_commands_are_not_found() {
    assert!(nix::unistd::getuid().is_root(), "needs root");
    let d = TestDaemon::start("[server]\nsocket_mode = 0o666\nallowed_uids = [0, 65534]\n");
    support::open_to_everyone(&d);
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let finished = c.run(&s, "echo secret").await.unwrap().command_id.unwrap();
    let running = c
        .start(ExecParams {
            stdin_open: true,
            ..exec(&s, "sleep 30")
        })
        .await
        .unwrap();
    for id in [&finished, &running] {
        for args in [
            vec!["attach", id.as_str()],
            vec!["cancel", id.as_str()],
            vec!["write", id.as_str(), "--eof"],
        ] {
            let o = support::as_nobody(&d, &args);
            let stderr = String::from_utf8_lossy(&o.stderr);
            assert!(!o.status.success(), "{args:?}");
            assert!(stderr.contains("COMMAND_NOT_FOUND"), "{args:?}: {stderr}");
        }
    }
    // Nothing of nobody's attempts touched root's command.
    let listed = c.list_sessions().await.unwrap();
    assert_eq!(
        listed.sessions[0].command_id.as_deref(),
        Some(running.as_str())
    );
    assert!(c.cancel_command(&running).await.unwrap());
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_keeps_the_newest_per_session() {
    let d = TestDaemon::start("[commands]\nretain_per_session = 2\n");
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = c.run(&s, &format!("echo {i}")).await.unwrap();
        ids.push(r.command_id.unwrap());
    }
    let err = c.read(read_at(&ids[0], 0, 0.0)).await.unwrap_err();
    assert_eq!(code(&err), "COMMAND_NOT_FOUND", "the oldest is dropped");
    for (i, id) in ids.iter().enumerate().skip(1) {
        let r = c.read(read_at(id, 0, 0.0)).await.unwrap();
        assert_eq!(r.stdout.as_slice(), format!("{i}\n").as_bytes());
    }
    // A destroyed session takes its retained commands with it.
    c.destroy_session(&s).await.unwrap();
    let err = c.read(read_at(&ids[2], 0, 0.0)).await.unwrap_err();
    assert_eq!(code(&err), "COMMAND_NOT_FOUND");
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_timeout_kills_a_silent_command_only() {
    let d = TestDaemon::start("");
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let r = c
        .exec(ExecParams {
            // Long enough for a slow shell to start and say "waiting": the
            // idle clock runs from the command's start.
            idle_timeout_s: Some(3.0),
            ..exec(&s, "echo waiting; sleep 30")
        })
        .await
        .unwrap();
    assert_eq!(r.killed_by, Some(KilledBy::IdleTimeout));
    assert!(r.timed_out);
    assert_eq!(r.stdout.as_slice(), b"waiting\n");
    assert_eq!(c.stats().await.unwrap().commands.idle_timed_out_total, 1);
    // Output keeps it alive: its own timeout ends it, not the idle one.
    let r = c
        .exec(ExecParams {
            idle_timeout_s: Some(2.0),
            timeout_s: Some(4.0),
            ..exec(&s, "while true; do echo tick; sleep 0.05; done")
        })
        .await
        .unwrap();
    assert_eq!(r.killed_by, Some(KilledBy::Timeout));
    assert_eq!(c.stats().await.unwrap().commands.idle_timed_out_total, 1);
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_by_command_id_and_session_list_shows_running_ids() {
    let d = TestDaemon::start("");
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let id = c.start(exec(&s, "sleep 30")).await.unwrap();
    let listed = c.list_sessions().await.unwrap();
    let entry = listed.sessions.iter().find(|e| e.session_id == s).unwrap();
    assert_eq!(entry.command_ids, vec![id.clone()]);
    assert_eq!(entry.command_id.as_deref(), Some(id.as_str()));
    assert!(c.cancel_command(&id).await.unwrap());
    let (_, last) = read_to_end(&c, &id).await;
    assert_eq!(last.result.unwrap().killed_by, Some(KilledBy::Cancelled));
    // A finished command: nothing to cancel.
    assert!(!c.cancel_command(&id).await.unwrap());
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_read_and_cancel_params_are_invalid_and_named() {
    let d = TestDaemon::start("");
    let mut conn = d.raw();
    let s = conn.create_session(1);
    let id = conn.start_command(2, &s, "sleep 5", false);
    for (n, wait) in [
        (3u64, rmpv::Value::from(61)),
        (4, (-1).into()),
        (5, "soon".into()),
    ] {
        conn.send(&request(
            n,
            "exec.read",
            vec![("command_id", id.as_str().into()), ("wait_s", wait)],
        ));
        let r = conn.read().unwrap();
        assert_eq!(support::error_code(&r).as_deref(), Some("INVALID_REQUEST"));
        assert!(r.to_string().contains("wait_s"), "{r}");
    }
    for (n, params) in [
        (6u64, vec![]),
        (
            7,
            vec![
                ("session_id", s.as_str().into()),
                ("command_id", id.as_str().into()),
            ],
        ),
    ] {
        conn.send(&request(n, "exec.cancel", params));
        let r = conn.read().unwrap();
        assert_eq!(
            support::error_code(&r).as_deref(),
            Some("INVALID_REQUEST"),
            "{r}"
        );
    }
    conn.send(&request(
        8,
        "exec.cancel",
        vec![("session_id", s.as_str().into())],
    ));
    let r = conn.read().unwrap();
    assert_eq!(get(get(&r, "result"), "cancelled").as_bool(), Some(true));
    drop(conn);
    d.stop();
}

/// A client that reads nothing never holds the command back nor grows the
/// daemon: 1 GiB streamed to it ends at drain speed, within the memory bound.
#[test]
fn a_gigabyte_streamed_to_a_client_that_reads_nothing_stays_bounded() {
    let d = TestDaemon::start("[commands]\ndefault_timeout = \"120s\"\n");
    let rss = || support::rss_of(d.pid());
    let mut setup = d.raw();
    let s = setup.create_session(1);
    let before = rss();
    let mut greedy = d.raw();
    greedy.send(&request(
        1,
        "exec.run",
        vec![
            ("session_id", s.as_str().into()),
            ("command", "head -c 1073741824 /dev/zero".into()),
            ("stream", true.into()),
        ],
    ));
    let mut peak = before;
    wait_until("the 1 GiB command ends", Duration::from_secs(120), || {
        peak = peak.max(rss());
        setup.send(&request(2, "system.stats", vec![]));
        let r = setup.read().unwrap();
        // The request is timed once its stream has stopped and its answer is
        // made: reading before that would drain what the stream decides on.
        let answered = get(get(&r, "result"), "latency")
            .as_array()
            .into_iter()
            .flatten()
            .any(|h| {
                get(h, "method").as_str() == Some("exec.run") && get(h, "count").as_u64() >= Some(1)
            });
        get(get(get(&r, "result"), "commands"), "completed_total").as_u64() == Some(1) && answered
    });
    assert!(
        peak < before + 64 * 1024 * 1024,
        "daemon RSS went from {before} to {peak} bytes while streaming 1 GiB to a non-reader"
    );
    // What the client gets when it finally reads: `started`, the events
    // made before it fell behind (in order), then the result, never dropped.
    let first = greedy.read().unwrap();
    assert_eq!(get(&first, "event").as_str(), Some("started"));
    let mut last_end = 0u64;
    let result = loop {
        let frame = greedy.read().expect("the result frame comes");
        if get(&frame, "event").is_nil() {
            break frame;
        }
        let offset = get(&frame, "offset").as_u64().unwrap();
        let len = get(&frame, "data").as_slice().unwrap().len() as u64;
        assert!(offset >= last_end, "offsets never go back");
        last_end = offset + len;
    };
    assert!(
        last_end < 64 << 20,
        "no more than a bounded backlog of events was made for a non-reader: {last_end}"
    );
    let r = get(&result, "result");
    assert_eq!(get(r, "stdout_total_bytes").as_u64(), Some(1 << 30));
    assert_eq!(get(r, "exit_code").as_i64(), Some(0));
    drop((setup, greedy));
    d.stop();
}

/// A client that falls behind and then reads again sees exactly where
/// bytes were skipped: the next event's offset jumps past them.
#[test]
fn a_client_that_falls_behind_sees_the_gap_in_offsets() {
    let d = TestDaemon::start("[commands]\nmax_output_bytes = \"1 MiB\"\n");
    let flag = d.work_dir().join("finish");
    let mut conn = d.raw();
    let s = conn.create_session(1);
    conn.send(&request(
        2,
        "exec.run",
        vec![
            ("session_id", s.as_str().into()),
            (
                "command",
                format!(
                    "head -c 33554432 /dev/zero; while [ ! -e {0} ]; do sleep 0.01; done; echo end",
                    flag.display()
                )
                .into(),
            ),
            ("stream", true.into()),
        ],
    ));
    let started = conn.read().unwrap();
    let id = get(&started, "command_id").as_str().unwrap().to_string();
    // Not reading `conn`: wait (on another connection) until all 32 MiB are out.
    let mut other = d.raw();
    wait_until(
        "the command wrote its 32 MiB",
        Duration::from_secs(60),
        || {
            other.send(&request(
                1,
                "exec.read",
                vec![
                    ("command_id", id.as_str().into()),
                    ("stdout_offset", (1u64 << 40).into()),
                ],
            ));
            let r = other.read().unwrap();
            get(get(&r, "result"), "stdout_offset").as_u64() == Some(32 << 20)
        },
    );
    // Now read: contiguous events up to where we fell behind, then a jump.
    let mut last_end = 0u64;
    let (skipped_from, resumed_at) = loop {
        let frame = conn.read().expect("events come");
        let offset = get(&frame, "offset").as_u64().expect("an output event");
        let len = get(&frame, "data").as_slice().unwrap().len() as u64;
        if offset > last_end {
            break (last_end, offset);
        }
        assert_eq!(offset, last_end, "contiguous until the gap");
        last_end = offset + len;
    };
    assert!(
        resumed_at > skipped_from,
        "the skipped bytes are [{skipped_from}, {resumed_at})"
    );
    std::fs::write(&flag, b"").unwrap();
    let result = loop {
        let frame = conn.read().expect("the result comes");
        if get(&frame, "event").is_nil() {
            break frame;
        }
    };
    let r = get(&result, "result");
    assert_eq!(get(r, "stdout_total_bytes").as_u64(), Some((32 << 20) + 4));
    drop((conn, other));
    d.stop();
}

/// A streaming client that hangs up frees its connection slot at once; its
/// command runs on and is still reachable by id.
#[test]
fn a_streaming_client_that_hangs_up_frees_its_slot_and_the_command_runs_on() {
    let d = TestDaemon::start("");
    let mut conn = d.raw();
    let s = conn.create_session(1);
    conn.send(&request(
        2,
        "exec.run",
        vec![
            ("session_id", s.as_str().into()),
            // Output after the hang-up: the daemon learns of it when a write fails.
            (
                "command",
                "echo up; while true; do echo tick; sleep 0.05; done".into(),
            ),
            ("stream", true.into()),
        ],
    ));
    let started = conn.read().unwrap();
    let id = get(&started, "command_id").as_str().unwrap().to_string();
    drop(conn);
    let mut other = d.raw();
    wait_until(
        "the hung-up connection is gone",
        Duration::from_secs(5),
        || {
            other.send(&request(1, "system.stats", vec![]));
            let r = other.read().unwrap();
            get(get(get(&r, "result"), "clients"), "connections").as_u64() == Some(1)
        },
    );
    other.send(&request(
        2,
        "exec.read",
        vec![("command_id", id.as_str().into())],
    ));
    let r = other.read().unwrap();
    let r = get(&r, "result");
    assert_eq!(get(r, "done").as_bool(), Some(false), "the command runs on");
    assert!(get(r, "stdout").as_slice().unwrap().starts_with(b"up\n"));
    other.send(&request(
        3,
        "exec.cancel",
        vec![("command_id", id.as_str().into())],
    ));
    assert_eq!(
        get(get(&other.read().unwrap(), "result"), "cancelled").as_bool(),
        Some(true)
    );
    drop(other);
    d.stop();
}
