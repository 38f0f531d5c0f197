//! The daemon's one memory budget (`server.memory_budget`), seen by a client: commands reserve at start and are refused with OVERLOADED past it, retained output is evicted oldest first before that, a request frame that cannot be charged is refused, and the stats show it.

mod support;

use std::io::Write;
use std::time::Duration;

use sessiond::client::{Client, ClientError};
use sessiond::protocol::{CreateParams, ExecParams, ReadParams};
use support::{TestDaemon, error_code, get, wait_until_async};

const MIB: u64 = 1 << 20;

/// 4 MiB of output per stream: each command reserves 2 × 2 × 4 MiB plus the
/// default 256 KiB of session state, so three fit in 56 MiB and a fourth does not.
const BUDGET: &str = "[server]\nmemory_budget = \"56 MiB\"\nmax_request_bytes = \"16 MiB\"\n\
                      [commands]\nmax_output_bytes = \"4 MiB\"\n";
const RESERVATION: u64 = 16 * MIB + 256 * 1024;

async fn new_session(c: &Client) -> String {
    c.create_session(CreateParams::default())
        .await
        .expect("session.create")
}

fn exec(session: &str, command: &str) -> ExecParams {
    ExecParams {
        session_id: session.into(),
        command: command.into(),
        timeout_s: Some(60.0),
        ..Default::default()
    }
}

/// Starts `command` with its stdin open for `exec.write`s; its id.
async fn start_with_stdin(c: &Client, session: &str, command: &str) -> String {
    c.start(ExecParams {
        stdin_open: true,
        ..exec(session, command)
    })
    .await
    .expect("started")
}

#[tokio::test]
async fn commands_past_the_budget_are_overloaded_until_reservations_end() {
    let d = TestDaemon::start(&format!("{BUDGET}retain_per_session = 0\n"));
    let c = d.client().await;
    let stats = c.stats().await.unwrap().runtime;
    assert_eq!(stats.memory_budget_bytes, 56 * MIB);
    assert!(stats.memory_used_bytes < 4 * MIB, "idle: {stats:?}");
    assert!(
        c.ping()
            .await
            .unwrap()
            .features
            .iter()
            .any(|f| f == "memory-budget")
    );

    let mut running = Vec::new();
    for _ in 0..3 {
        let s = new_session(&c).await;
        running.push((c.start(exec(&s, "sleep 60")).await.expect("fits"), s));
    }
    let used = c.stats().await.unwrap().runtime.memory_used_bytes;
    assert!(
        used >= 3 * RESERVATION,
        "three reservations charged: {used}"
    );

    let s = new_session(&c).await;
    let refused = c.start(exec(&s, "true")).await.unwrap_err();
    let ClientError::Server(e) = &refused else {
        panic!("{refused:?}")
    };
    assert_eq!(e.code, "OVERLOADED", "{e:?}");
    assert!(
        e.retry_after_ms.is_some_and(|ms| (1..=1000).contains(&ms)),
        "{e:?}"
    );
    assert_eq!(c.stats().await.unwrap().runtime.overloaded_total, 1);

    // A request frame that cannot be charged: nil-id OVERLOADED, then closed.
    let mut raw = d.raw();
    raw.write_bytes(&(12 * MIB as u32).to_be_bytes());
    raw.write_bytes(&[0x80; 1024]);
    let answer = raw.read().expect("an error frame");
    assert_eq!(
        error_code(&answer).as_deref(),
        Some("OVERLOADED"),
        "{answer}"
    );
    assert!(get(&answer, "id").is_nil(), "{answer}");
    assert!(raw.is_closed());

    for (_, session) in &running {
        c.cancel(session).await.unwrap();
    }
    // Ended and not retained: their reservations are back.
    wait_until_async("reservations released", Duration::from_secs(10), || async {
        c.stats().await.unwrap().runtime.memory_used_bytes < RESERVATION
    })
    .await;
    let r = c.exec(exec(&s, "echo again")).await.expect("fits again");
    assert_eq!(r.stdout.as_ref(), b"again\n");
}

#[tokio::test]
async fn retained_output_is_evicted_oldest_first_before_refusing() {
    let d = TestDaemon::start(BUDGET);
    let c = d.client().await;
    let s = new_session(&c).await;
    // Each keeps 4 MiB per stream: retained, 8 MiB each (16 MiB until trimmed).
    let mut ids = Vec::new();
    for _ in 0..7 {
        let r = c
            .exec(exec(
                &s,
                "head -c 4194304 /dev/zero; head -c 4194304 /dev/zero >&2",
            ))
            .await
            .expect("older retained output makes room");
        assert_eq!(r.stdout.len() as u64, 4 * MIB);
        ids.push(r.command_id.expect("a command id"));
    }
    let mut found = Vec::new();
    for id in &ids {
        let read = c
            .read(ReadParams {
                command_id: id.clone(),
                stdout_offset: 4 * MIB,
                stderr_offset: 4 * MIB,
                wait_s: None,
            })
            .await;
        match read {
            Ok(_) => found.push(true),
            Err(e) if e.code() == Some("COMMAND_NOT_FOUND") => found.push(false),
            Err(e) => panic!("{id}: {e:?}"),
        }
    }
    // Evicted oldest first: the readable ones are the newest, and at least
    // the first was evicted (seven never fit at once).
    assert!(!found[0], "{found:?}");
    assert!(found[6], "{found:?}");
    let first_kept = found.iter().position(|f| *f).unwrap();
    assert!(found[first_kept..].iter().all(|f| *f), "{found:?}");
    let stats = c.stats().await.unwrap().runtime;
    assert!(stats.memory_used_bytes <= 56 * MIB, "{stats:?}");
    assert_eq!(stats.overloaded_total, 0, "evicted, never refused");
}

/// Peak resident memory of a process, bytes.
fn vm_hwm(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        * 1024
}

/// Issue 14's attacks at once (unread answers on many connections, streaming
/// to clients that never read, many large retained results, partial request
/// frames, 16 commands flooding both streams to the 4 MiB cap, oversized
/// values echoed in errors, idle connections, background writers, writes
/// piled before a command that does not read): the daemon's peak RSS stays
/// within the budget plus the stated fixed overhead of 96 MiB, and it still
/// answers.
#[test]
fn combined_attack_stays_within_budget_plus_overhead() {
    use support::request;
    const BUDGET_MIB: u64 = 128;
    let d = TestDaemon::start(&format!(
        "[server]\nmemory_budget = \"{BUDGET_MIB} MiB\"\n[sessions]\nmax_sessions_per_client = 40\n[commands]\nmax_per_session = 4\n"
    ));
    let pid = d.pid();
    let idle = vm_hwm(pid);
    let idle_rss = support::rss_of(pid);
    let mut ctl = d.raw();
    let mut next_id = 1000u64;
    let mut id = || {
        next_id += 1;
        next_id
    };
    let big = "head -c 4194304 /dev/zero; head -c 4194304 /dev/zero >&2";

    // Oversized values echoed in errors: a 1.5 MiB env key, a cwd of control bytes.
    // First, while the budget has room for their frames: each is refused
    // with a short message (it was a 5x larger one).
    let mut echoes = Vec::new();
    for (key, value) in [
        (
            "env",
            rmpv::Value::Map(vec![("K".repeat(3 << 19).into(), "v".into())]),
        ),
        ("cwd", rmpv::Value::from("\u{1}".repeat(3 << 19))),
    ] {
        let mut conn = d.raw();
        conn.send(&request(1, "session.create", vec![(key, value)]));
        let r = conn.read().expect("an error");
        assert_eq!(error_code(&r).as_deref(), Some("INVALID_REQUEST"), "{r}");
        assert!(
            r.to_string().len() < 1024,
            "a short error: {} bytes",
            r.to_string().len()
        );
        echoes.push(conn);
    }

    // Background writers left running after their command's answer.
    let background = ctl.create_session(id());
    ctl.send(&request(
        id(),
        "exec.run",
        vec![
            ("session_id", background.as_str().into()),
            ("command", "(yes &); (yes >&2 &); true".into()),
        ],
    ));
    assert!(get(&ctl.read().expect("an answer"), "result").is_map());

    // Writes of 1 MiB piled before a command that does not read its stdin.
    let mut writer = d.raw();
    let s = writer.create_session(1);
    let stalled = writer.start_command(2, &s, "sleep 60", true);
    let writes: Vec<_> = (0..24)
        .map(|k| {
            request(
                10 + k,
                "exec.write",
                vec![
                    ("command_id", stalled.as_str().into()),
                    ("data", rmpv::Value::Binary(vec![b'x'; 1 << 20])),
                ],
            )
        })
        .collect();
    writer.send_in_one_write(&writes);

    // Many retained results of 8 MiB each.
    let mut retained = Vec::new();
    for _ in 0..4 {
        let s = ctl.create_session(id());
        for _ in 0..4 {
            ctl.send(&request(
                id(),
                "exec.run",
                vec![("session_id", s.as_str().into()), ("command", big.into())],
            ));
            let r = ctl.read().expect("an answer");
            match get(get(&r, "result"), "command_id").as_str() {
                Some(c) => retained.push(c.to_string()),
                None => assert_eq!(error_code(&r).as_deref(), Some("OVERLOADED"), "{r}"),
            }
        }
    }
    assert!(!retained.is_empty());

    // Streaming to clients that never read.
    let mut streamers = Vec::new();
    for _ in 0..4 {
        let mut conn = d.raw();
        let s = conn.create_session(1);
        conn.send(&request(
            2,
            "exec.run",
            vec![
                ("session_id", s.as_str().into()),
                ("command", "head -c 300000000 /dev/zero".into()),
                ("stream", true.into()),
                ("timeout_s", 60.into()),
            ],
        ));
        streamers.push(conn);
    }

    // Unread answers: every connection asks for the retained output seven times.
    let mut unread = Vec::new();
    for n in 0..24 {
        let mut conn = d.raw();
        for k in 0..7 {
            let c = &retained[(n + k) % retained.len()];
            conn.try_send(&request(
                k as u64,
                "exec.read",
                vec![("command_id", c.as_str().into())],
            ));
        }
        unread.push(conn);
    }

    // Partial request frames, stalled just short of their end.
    let mut partial = Vec::new();
    for _ in 0..8 {
        let mut conn = d.raw();
        conn.write_bytes(&((2 << 20) - 16u32).to_be_bytes());
        let _ = conn.stream.write_all(&vec![0x90u8; (2 << 20) - 64]);
        partial.push(conn);
    }

    // 16 commands flooding both streams to the cap at once, their answers unread.
    let mut floods = Vec::new();
    for _ in 0..16 {
        let mut conn = d.raw();
        let s = conn.create_session(1);
        conn.send(&request(
            2,
            "exec.run",
            vec![("session_id", s.as_str().into()), ("command", big.into())],
        ));
        floods.push(conn);
    }

    // Idle connections, up to the uid's share.
    let idle_conns: Vec<_> = (0..16).map(|_| d.raw()).collect();

    // Commands keep coming while all of it is held.
    let s = ctl.create_session(id());
    for _ in 0..8 {
        ctl.send(&request(
            id(),
            "exec.run",
            vec![("session_id", s.as_str().into()), ("command", big.into())],
        ));
        let r = ctl.read().expect("an answer");
        assert!(
            r.as_map()
                .is_some_and(|m| m.iter().any(|(k, _)| k.as_str() == Some("result")))
                || error_code(&r).as_deref() == Some("OVERLOADED"),
            "{r}"
        );
    }
    // The stalled writes' command goes; the streaming ones run to their end
    // with nobody reading.
    ctl.send(&request(
        id(),
        "exec.cancel",
        vec![("command_id", stalled.as_str().into())],
    ));
    assert!(get(&ctl.read().expect("cancelled"), "result").is_map());
    support::wait_until("streaming commands ended", Duration::from_secs(60), || {
        ctl.send(&request(1, "system.stats", vec![]));
        let r = ctl.read().expect("stats");
        let running = get(get(get(&r, "result"), "commands"), "running").as_u64();
        running == Some(0)
    });
    ctl.send(&request(2, "system.stats", vec![]));
    let stats = ctl.read().expect("stats");
    let runtime = get(get(&stats, "result"), "runtime");
    let used = get(runtime, "memory_used_bytes").as_u64().unwrap();
    let hwm = vm_hwm(pid);
    eprintln!(
        "combined attack: VmHWM idle {} MiB, peak {} MiB, budget {BUDGET_MIB} MiB, used now {} MiB, overloaded_total {}",
        idle >> 20,
        hwm >> 20,
        used >> 20,
        get(runtime, "overloaded_total")
    );
    assert!(used <= BUDGET_MIB << 20, "{runtime}");
    assert!(
        hwm <= (BUDGET_MIB + 96) << 20,
        "VmHWM {} MiB over budget + 96 MiB",
        hwm >> 20
    );
    ctl.send(&request(3, "system.ping", vec![]));
    assert!(get(&ctl.read().expect("pong"), "result").is_map());
    drop((
        streamers, unread, partial, floods, idle_conns, writer, echoes,
    ));

    // Memory comes back after the spike: with every session gone and nothing
    // charged, RSS is back near idle within the minute the bound allows.
    ctl.send(&request(4, "session.list", vec![]));
    let list = ctl.read().expect("list");
    for session in get(get(&list, "result"), "sessions").as_array().unwrap() {
        let id = get(session, "session_id").as_str().unwrap();
        ctl.send(&request(
            5,
            "session.destroy",
            vec![("session_id", id.into())],
        ));
        assert!(get(&ctl.read().expect("destroyed"), "result").is_map());
    }
    let mut used = u64::MAX;
    support::wait_until("nothing charged", Duration::from_secs(10), || {
        ctl.send(&request(6, "system.stats", vec![]));
        let r = ctl.read().expect("stats");
        used = get(get(get(&r, "result"), "runtime"), "memory_used_bytes")
            .as_u64()
            .unwrap();
        used < MIB
    });
    let bound = idle_rss + (idle_rss / 10).max(16 * MIB);
    let mut rss = 0;
    support::wait_until("RSS back near idle", Duration::from_secs(60), || {
        rss = support::rss_of(pid);
        rss <= bound
    });
    eprintln!(
        "after the attack: RSS {} MiB (idle {} MiB), used {used} bytes",
        rss >> 20,
        idle_rss >> 20
    );
}

/// Sets `server.memory_budget` to `mib` MiB in the daemon's config file and
/// reloads it with SIGHUP; returns once it is in force.
async fn reload_budget(d: &TestDaemon, c: &Client, mib: u64) {
    let path = d.dir.path().join("config.toml");
    let mut config: toml::Table = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["server"]
        .as_table_mut()
        .unwrap()
        .insert("memory_budget".into(), format!("{mib} MiB").into());
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    wait_until_async(
        "the new budget in force",
        Duration::from_secs(10),
        || async { c.stats().await.unwrap().runtime.memory_budget_bytes == mib * MIB },
    )
    .await;
}

/// `server.memory_budget` is reloaded by SIGHUP: cut below what is in use,
/// new commands are refused until use falls; nothing running is killed.
#[tokio::test(flavor = "multi_thread")]
async fn a_lowered_budget_refuses_new_work_until_use_falls() {
    let d = TestDaemon::start(&format!("{BUDGET}retain_per_session = 0\n"));
    let c = d.client().await;
    let (a, b) = (new_session(&c).await, new_session(&c).await);
    c.start(exec(&a, "sleep 60")).await.unwrap();
    c.start(exec(&b, "sleep 60")).await.unwrap();
    reload_budget(&d, &c, 20).await;
    let s = new_session(&c).await;
    let refused = c.start(exec(&s, "true")).await.unwrap_err();
    assert_eq!(refused.code(), Some("OVERLOADED"), "{refused:?}");
    assert_eq!(
        c.stats().await.unwrap().commands.running,
        2,
        "nothing killed"
    );
    c.cancel(&a).await.unwrap();
    c.cancel(&b).await.unwrap();
    wait_until_async(
        "use under the new budget",
        Duration::from_secs(10),
        || async { c.stats().await.unwrap().runtime.memory_used_bytes < 2 * MIB },
    )
    .await;
    let r = c.exec(exec(&s, "echo fits")).await.expect("fits again");
    assert_eq!(r.stdout.as_ref(), b"fits\n");
}

/// An `exec.write` waiting its turn before a command that does not read holds
/// its data: charged to the budget from when it is read, so writes piling up
/// are refused with OVERLOADED once the budget is full (before, each of up to
/// 64 per connection held up to `max_stdin_bytes` uncharged).
#[tokio::test(flavor = "multi_thread")]
async fn waiting_writes_are_charged_and_refused_past_the_budget() {
    let d = TestDaemon::start(
        "[server]\nmemory_budget = \"16 MiB\"\n\
         [commands]\nmax_output_bytes = \"1 MiB\"\nmax_stdin_bytes = \"1 MiB\"\n",
    );
    let c = std::sync::Arc::new(d.client().await);
    let s = new_session(&c).await;
    let id = start_with_stdin(&c, &s, "sleep 60").await;
    // Each waits its turn (5 s at most each, the first for the full pipe):
    // 24 MiB of data against a 16 MiB budget.
    let mut writes = tokio::task::JoinSet::new();
    for _ in 0..24 {
        let (c, id) = (c.clone(), id.clone());
        writes.spawn(async move { c.write(&id, &vec![b'x'; MIB as usize], false).await });
    }
    wait_until_async(
        "writes past the budget refused",
        Duration::from_secs(10),
        || async { c.stats().await.unwrap().runtime.overloaded_total > 0 },
    )
    .await;
    let used = c.stats().await.unwrap().runtime.memory_used_bytes;
    assert!(
        used <= 16 * MIB,
        "the waiting writes within the budget: {used}"
    );
    assert!(used >= 8 * MIB, "the waiting writes charged: {used}");
    // Its end answers the writes still waiting (nothing more written).
    c.cancel(&s).await.unwrap();
    let mut overloaded = 0;
    while let Some(answer) = writes.join_next().await {
        match answer.unwrap() {
            Ok(_) => {}
            Err(e) if e.code() == Some("OVERLOADED") => overloaded += 1,
            Err(e) => assert_eq!(e.code(), Some("INVALID_REQUEST"), "{e:?}"),
        }
    }
    assert!(overloaded > 0, "some writes refused");
    wait_until_async(
        "the writes' charges back",
        Duration::from_secs(10),
        || async { c.stats().await.unwrap().runtime.memory_used_bytes < 2 * MIB },
    )
    .await;
}

/// The shedding order end to end: when an answer needs room the budget does
/// not have, the connection with the most unsent answers is dropped (counted
/// in `slow_readers_dropped_total`), its queue is given back, and the command
/// it asked about stays readable by its id from another connection.
#[tokio::test(flavor = "multi_thread")]
async fn the_connection_with_most_unsent_answers_is_dropped_for_room() {
    use support::request;
    let d = TestDaemon::start(BUDGET);
    let c = d.client().await;
    let s = new_session(&c).await;
    let big = "head -c 4194304 /dev/zero; head -c 4194304 /dev/zero >&2";
    let id = c.start(exec(&s, big)).await.expect("started");
    wait_until_async("the command ended", Duration::from_secs(30), || async {
        c.stats().await.unwrap().commands.running == 0
    })
    .await;
    // A client asks for the 8 MiB of output again and again and never reads.
    let mut hoarder = d.raw();
    let reads: Vec<_> = (0..6u64)
        .map(|k| request(k, "exec.read", vec![("command_id", id.as_str().into())]))
        .collect();
    hoarder.send_in_one_write(&reads);
    wait_until_async("the hoarder dropped", Duration::from_secs(10), || async {
        c.stats().await.unwrap().clients.slow_readers_dropped_total == 1
    })
    .await;
    let mut hoarder = support::blocking(move || {
        let _ = hoarder.read_until_closed();
        hoarder
    })
    .await;
    assert!(hoarder.is_closed());
    // Its queue is back: another connection reads the whole output (once the
    // dropped writer has let go of it, OVERLOADED until then).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let read = loop {
        let params = ReadParams {
            command_id: id.clone(),
            ..Default::default()
        };
        match c.read(params).await {
            Ok(r) => break r,
            Err(e) => {
                assert_eq!(e.code(), Some("OVERLOADED"), "{e:?}");
                assert!(std::time::Instant::now() < deadline, "still {e:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(read.stdout.len(), 4 << 20);
    assert_eq!(read.stderr.len(), 4 << 20);
}

/// A write that does not fit evicts retained output first, as a command's
/// reservation does; and an `eof` alone holds nothing, so it closes stdin
/// even with the budget cut below what is in use (as a read that finds no
/// new output, or only the result, is answered).
#[tokio::test(flavor = "multi_thread")]
async fn a_write_evicts_retained_output_and_an_eof_is_never_refused() {
    let d = TestDaemon::start(&format!(
        "{BUDGET}max_stdin_bytes = \"4 MiB\"\nretain_per_session = 16\n"
    ));
    let c = d.client().await;
    let s = new_session(&c).await;
    let id = start_with_stdin(&c, &s, "cat >/dev/null; echo closed").await;
    // Retained output of ended commands fills what the running one leaves.
    let other = new_session(&c).await;
    let big = "head -c 4194304 /dev/zero; head -c 4194304 /dev/zero >&2";
    for _ in 0..4 {
        c.exec(exec(&other, big)).await.expect("fits, evicting");
    }
    // Room for the write's frame while it is read, not for its data beside it.
    let used = c.stats().await.unwrap().runtime.memory_used_bytes;
    assert!(used + 4 * MIB <= 56 * MIB, "{used}");
    assert!(
        used + 8 * MIB > 56 * MIB,
        "no room for the write as it is: {used}"
    );
    let written = c
        .write(&id, &vec![b'x'; 4 << 20], false)
        .await
        .expect("fits by evicting");
    assert_eq!(written, 4 << 20);
    // Cut the budget below what running commands hold (nothing left to
    // evict would make room): new work is refused, an eof is not.
    c.start(exec(&other, "sleep 60"))
        .await
        .expect("fits, evicting");
    reload_budget(&d, &c, 20).await;
    let refused = c.write(&id, b"more", false).await.unwrap_err();
    assert_eq!(refused.code(), Some("OVERLOADED"), "{refused:?}");
    assert_eq!(c.write(&id, b"", true).await.expect("eof"), 0);
    // cat saw its stdin close: the command ends by itself (the sleep runs on).
    wait_until_async("cat ended at its eof", Duration::from_secs(10), || async {
        c.stats().await.unwrap().commands.running == 1
    })
    .await;
    c.cancel(&other).await.unwrap();
}
