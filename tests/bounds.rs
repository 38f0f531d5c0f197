//! The daemon inside its own bounds, seen by a client (issue 14): bounded error messages, strict params, lingering refusals, fair connection slots, requests started in the order sent.

mod support;

use std::io::Write;
use std::time::Duration;

use rmpv::Value;
use support::{TestDaemon, error_code, get, request, wait_until};

fn map(entries: Vec<(&str, Value)>) -> Value {
    Value::Map(entries.into_iter().map(|(k, v)| (k.into(), v)).collect())
}

/// The encoded size of `value`.
fn size(value: &Value) -> usize {
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, value).unwrap();
    bytes.len()
}

fn message(r: &Value) -> String {
    get(get(r, "error"), "message")
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Issue 14, row "`session.create` with a 2 MiB env key or cwd of control
/// bytes → a 10 MiB error message": every error that names a value the
/// client sent shows a short prefix of it; no answer is more than a small
/// fixed size, whatever the request's.
#[test]
fn errors_echo_only_a_short_prefix_of_client_values() {
    let d = TestDaemon::start("");
    let mut conn = d.raw();
    let big = "k".repeat(1536 * 1024);
    let controls = "\u{1}\u{1b}".repeat(512 * 1024);
    let cases: Vec<(&str, Value)> = vec![
        (
            "session.create",
            map(vec![("env", map(vec![(big.as_str(), "v".into())]))]),
        ),
        (
            "session.create",
            map(vec![("cwd", controls.as_str().into())]),
        ),
        (
            "exec.run",
            map(vec![
                ("session_id", big.as_str().into()),
                ("command", "true".into()),
            ]),
        ),
        (
            "session.destroy",
            map(vec![("session_id", big.as_str().into())]),
        ),
        ("exec.read", map(vec![("command_id", big.as_str().into())])),
        (
            "exec.cancel",
            map(vec![("command_id", big.as_str().into())]),
        ),
        (
            "exec.run",
            map(vec![
                ("session_id", "s".into()),
                ("command", "true".into()),
                ("keep_output", big.as_str().into()),
            ]),
        ),
        (
            "exec.run",
            map(vec![
                ("session_id", 5.into()),
                ("command", big.as_str().into()),
            ]),
        ),
        (big.as_str(), map(vec![])),
    ];
    for (i, (method, params)) in cases.into_iter().enumerate() {
        let req = map(vec![
            ("id", (i as u64).into()),
            ("method", method.into()),
            ("params", params),
        ]);
        let sent = size(&req);
        conn.send(&req);
        let r = conn.read().expect("an answer");
        assert!(error_code(&r).is_some(), "case {i}: {r}");
        let got = size(&r);
        assert!(
            got < 1024,
            "case {i} ({}): a {sent}-byte request got a {got}-byte answer: {}…",
            &method[..method.len().min(20)],
            &message(&r)[..200.min(message(&r).len())]
        );
    }
    d.stop();
}

/// Issue 14, row "`{"limits": {"memry_max_bytes": 1}}`, `keep_output: 1`,
/// `limits: [1,2]`, `timeout_s: 1e-9`": each is INVALID_REQUEST naming the
/// param, where before it was accepted and silently meant something else.
#[test]
fn params_that_would_apply_silently_are_refused() {
    let d = TestDaemon::start("");
    // Every case, one by one on one connection (the fault harness runs it too).
    support::scenarios::huge_and_ill_typed_params(&d.socket);
    let mut conn = d.raw();
    let session = conn.create_session(1);
    // Unknown top-level params stay ignored, as the contract says.
    conn.send(&request(
        30,
        "exec.run",
        vec![
            ("session_id", session.as_str().into()),
            ("command", "true".into()),
            ("a_param_from_the_future", 1.into()),
        ],
    ));
    let r = conn.read().unwrap();
    assert_eq!(get(get(&r, "result"), "exit_code").as_i64(), Some(0), "{r}");
    d.stop();
}

/// Writes one whole frame of `body_len` bytes (declared and sent) before
/// reading anything; returns whether the write completed and the first
/// frame the daemon sent.
fn write_then_read(conn: &mut support::RawConn, body_len: usize) -> (bool, Option<Value>) {
    let mut frame = (body_len as u32).to_be_bytes().to_vec();
    frame.resize(4 + body_len, 0xc0);
    let written = conn.stream.write_all(&frame).is_ok();
    (written, conn.read())
}

/// Issue 14, row "a refused connection (PERMISSION_DENIED, FRAME_TOO_LARGE)
/// from a client that writes its request first → EPIPE": the daemon reads
/// what the client still sends before closing, so the write completes and
/// the error frame is read.
#[test]
fn a_refused_client_that_writes_first_reads_the_error() {
    let d = TestDaemon::start("[server]\nmax_request_bytes = \"64 KiB\"\n");
    let mut conn = d.raw();
    // 1 MiB: far more than the socket buffers hold, so the write needs the daemon to read.
    let (written, r) = write_then_read(&mut conn, 1 << 20);
    assert!(written, "the write of the oversized frame failed (EPIPE)");
    let r = r.expect("the error frame");
    assert_eq!(error_code(&r).as_deref(), Some("FRAME_TOO_LARGE"), "{r}");
    assert!(conn.is_closed());
    d.stop();

    // Only uid 65534 may connect: this test (root) is refused.
    let d = TestDaemon::start("[server]\nallowed_uids = [65534]\n");
    let mut conn = d.raw();
    let (written, r) = write_then_read(&mut conn, 1 << 20);
    assert!(written, "the write of a refused client failed (EPIPE)");
    let r = r.expect("the error frame");
    assert_eq!(error_code(&r).as_deref(), Some("PERMISSION_DENIED"), "{r}");
    assert!(conn.is_closed());
    // Bounded: a client that keeps writing is closed after 4 MiB or 1 s.
    let mut conn = d.raw();
    let chunk = vec![0u8; 1 << 20];
    let mut sent = 0usize;
    while conn.stream.write_all(&chunk).is_ok() {
        sent += chunk.len();
        assert!(
            sent <= 64 << 20,
            "the daemon read {sent} bytes of a refused client"
        );
    }
    d.stop();
}

/// Issue 14, row "one uid opens 256 idle connections → every other uid and
/// `sessiond ping` get TOO_MANY_CONNECTIONS": a uid past its share is
/// refused with its limit while other uids are served, and a ping on a
/// refused connection is still answered.
#[test]
#[ignore = "needs root (connects as another uid)"]
fn one_uid_cannot_take_every_connection_slot() {
    assert!(nix::unistd::getuid().is_root(), "needs root");
    let d = TestDaemon::start(
        "[server]\nsocket_mode = 0o666\nallowed_uids = [0, 65534]\nmax_connections = 8\nmax_connections_per_client = 2\n",
    );
    support::open_to_everyone(&d);
    let mut served = Vec::new();
    wait_until("root holds its share", Duration::from_secs(10), || {
        let mut conn = d.raw();
        if conn.try_send(&request(1, "system.ping", vec![]))
            && conn.read().is_some_and(|r| error_code(&r).is_none())
        {
            served.push(conn);
        }
        served.len() == 2
    });
    // Root's third: refused with its share as the limit, yet its ping answered.
    let mut third = d.raw();
    third.send(&request(7, "system.ping", vec![]));
    let refusal = third.read().expect("the refusal frame");
    assert_eq!(
        error_code(&refusal).as_deref(),
        Some("TOO_MANY_CONNECTIONS"),
        "{refusal}"
    );
    assert_eq!(get(get(&refusal, "error"), "limit").as_u64(), Some(2));
    assert!(get(&refusal, "id").is_nil());
    let pong = third.read().expect("the ping's answer");
    assert_eq!(get(&pong, "id").as_u64(), Some(7), "{pong}");
    assert_eq!(get(get(&pong, "result"), "pong").as_bool(), Some(true));
    // Another request there gets the refusal with its own id.
    third.send(&request(8, "session.list", vec![]));
    let r = third.read().unwrap();
    assert_eq!(get(&r, "id").as_u64(), Some(8));
    assert_eq!(error_code(&r).as_deref(), Some("TOO_MANY_CONNECTIONS"));
    // Another uid is served in full, and the CLI's ping works for root too.
    let out = support::as_nobody(&d, &["session", "list"]);
    assert!(out.status.success(), "{out:?}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sessiond"))
        .args(["ping", "--socket"])
        .arg(&d.socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "root's ping at its share: {out:?}");
    drop(served);
    d.stop();
}

/// Issue 14, row "one uid opens 256 idle connections" at the global cap: a
/// ping on a connection refused for `max_connections` is answered.
#[test]
fn a_ping_is_answered_at_the_global_connection_cap() {
    let d = TestDaemon::start("[server]\nmax_connections = 1\n");
    let mut served = None;
    wait_until("the one slot is held", Duration::from_secs(10), || {
        let mut conn = d.raw();
        if conn.try_send(&request(1, "system.ping", vec![]))
            && conn.read().is_some_and(|r| error_code(&r).is_none())
        {
            served = Some(conn);
        }
        served.is_some()
    });
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sessiond"))
        .args(["ping", "--socket"])
        .arg(&d.socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "ping at the global cap: {out:?}");
    drop(served);
    d.stop();
}

/// Issue 14, row "the doc's own pipelined `exec.run` then `exec.cancel` in
/// one write → the cancel runs first; two pipelined `exec.run` → the first
/// gets SESSION_BUSY": requests of one connection reach their actors in the
/// order they were sent.
#[test]
fn pipelined_requests_start_in_the_order_sent() {
    let d = TestDaemon::start("");
    let mut conn = d.raw();
    let session = conn.create_session(1);
    let run = |id: u64, command: &str| {
        request(
            id,
            "exec.run",
            vec![
                ("session_id", session.as_str().into()),
                ("command", command.into()),
            ],
        )
    };
    for round in 0..5u64 {
        let (run_id, cancel_id) = (100 + 2 * round, 101 + 2 * round);
        let cancel = request(
            cancel_id,
            "exec.cancel",
            vec![("session_id", session.as_str().into())],
        );
        conn.send_in_one_write(&[run(run_id, "sleep 30"), cancel]);
        let got = support::scenarios::final_frames(&mut conn, &[run_id, cancel_id]);
        let cancelled = get(get(&got[&cancel_id], "result"), "cancelled");
        assert_eq!(
            cancelled.as_bool(),
            Some(true),
            "round {round}: {}",
            got[&cancel_id]
        );
        let killed_by = get(get(&got[&run_id], "result"), "killed_by");
        assert_eq!(
            killed_by.as_str(),
            Some("cancelled"),
            "round {round}: {}",
            got[&run_id]
        );
    }
    for round in 0..5u64 {
        let (first, second, cancel_id) = (200 + 3 * round, 201 + 3 * round, 202 + 3 * round);
        conn.send_in_one_write(&[run(first, "sleep 30"), run(second, "true")]);
        let got = support::scenarios::final_frames(&mut conn, &[second]);
        assert_eq!(
            error_code(&got[&second]).as_deref(),
            Some("SESSION_BUSY"),
            "round {round}: the second run, not the first, is refused: {}",
            got[&second]
        );
        conn.send(&request(
            cancel_id,
            "exec.cancel",
            vec![("session_id", session.as_str().into())],
        ));
        let got = support::scenarios::final_frames(&mut conn, &[first, cancel_id]);
        let killed_by = get(get(&got[&first], "result"), "killed_by");
        assert_eq!(killed_by.as_str(), Some("cancelled"), "{}", got[&first]);
    }
    d.stop();
}

/// Issue 14, item 6, for `session.create` too: its cwd check (a stat off the
/// workers) happens before the next frame is read, so of two pipelined
/// creates at a share of one session, the first (with a cwd) is admitted and
/// the second refused (the second, with nothing to check, used to overtake it).
#[test]
fn pipelined_session_creates_are_admitted_in_the_order_sent() {
    let d = TestDaemon::start("[sessions]\nmax_sessions_per_client = 1\n");
    let mut conn = d.raw();
    for round in 0..5u64 {
        let (first, second) = (10 * round + 1, 10 * round + 2);
        let with_cwd = request(first, "session.create", vec![("cwd", "/tmp".into())]);
        let without = request(second, "session.create", vec![]);
        conn.send_in_one_write(&[with_cwd, without]);
        let got = support::scenarios::final_frames(&mut conn, &[first, second]);
        let created = get(get(&got[&first], "result"), "session_id")
            .as_str()
            .unwrap_or_else(|| panic!("round {round}: the first is admitted: {}", got[&first]))
            .to_string();
        assert_eq!(
            error_code(&got[&second]).as_deref(),
            Some("CLIENT_SESSION_LIMIT"),
            "round {round}: {}",
            got[&second]
        );
        conn.send(&request(
            10 * round + 3,
            "session.destroy",
            vec![("session_id", created.as_str().into())],
        ));
        let done = support::scenarios::final_frames(&mut conn, &[10 * round + 3]);
        assert!(get(&done[&(10 * round + 3)], "result").is_map());
    }
    d.stop();
}

/// Issue 14, item 6 (and the "Open differences" line it removes): `exec.write`s
/// pipelined on one connection reach the command's stdin in the order sent.
#[test]
fn pipelined_writes_apply_in_the_order_sent() {
    let d = TestDaemon::start("");
    let mut conn = d.raw();
    let session = conn.create_session(1);
    for round in 0..3u64 {
        let command_id = conn.start_command(2, &session, "cat", true);
        let n = 60u64;
        let writes: Vec<Value> = (0..n)
            .map(|i| {
                request(
                    10 + i,
                    "exec.write",
                    vec![
                        ("command_id", command_id.as_str().into()),
                        ("data", Value::Binary(format!("{i},").into_bytes())),
                        ("eof", (i == n - 1).into()),
                    ],
                )
            })
            .collect();
        conn.send_in_one_write(&writes);
        let ids: Vec<u64> = (10..10 + n).collect();
        for (id, r) in support::scenarios::final_frames(&mut conn, &ids) {
            assert!(error_code(&r).is_none(), "write {id}: {r}");
        }
        conn.send(&request(
            3,
            "exec.read",
            vec![
                ("command_id", command_id.as_str().into()),
                ("wait_s", 30.into()),
            ],
        ));
        let mut stdout = Vec::new();
        loop {
            let r = conn.read().unwrap();
            let result = get(&r, "result");
            stdout.extend_from_slice(get(result, "stdout").as_slice().unwrap_or_default());
            if get(result, "done").as_bool() == Some(true) {
                break;
            }
            conn.send(&request(
                3,
                "exec.read",
                vec![
                    ("command_id", command_id.as_str().into()),
                    ("stdout_offset", get(result, "stdout_next").clone()),
                    ("wait_s", 30.into()),
                ],
            ));
        }
        let expected: String = (0..n).map(|i| format!("{i},")).collect();
        assert_eq!(String::from_utf8_lossy(&stdout), expected, "round {round}");
    }
    d.stop();
}
