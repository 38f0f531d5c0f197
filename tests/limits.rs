//! The process layer against the real daemon: rlimits read back from inside commands, limit kills, privilege drop, OOM score, subreaping.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use sessiond::client::Client;
use sessiond::protocol::{CreateParams, ExecParams, KilledBy, SessionLimits};
use support::{TestDaemon, wait_until, wait_until_async};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `/proc/self/limits` of a command: limit name → (soft, hard).
async fn limits_in(c: &Client, session: &str) -> HashMap<String, (String, String)> {
    let r = c.run(session, "cat /proc/self/limits").await.unwrap();
    text(&r.stdout)
        .lines()
        .skip(1)
        .filter_map(|line| {
            // "Max open files            1024                 1024                 files"
            let name = line.get(..26)?.trim().to_string();
            let mut rest = line.get(26..)?.split_whitespace();
            Some((name, (rest.next()?.to_string(), rest.next()?.to_string())))
        })
        .collect()
}

/// Whether this process may lower its oom_score_adj (probed on a child shell).
fn can_lower_oom_score() -> bool {
    std::process::Command::new("/bin/sh")
        .args(["-c", "echo -1 > /proc/self/oom_score_adj"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn pair(soft: &str, hard: &str) -> (String, String) {
    (soft.to_string(), hard.to_string())
}

fn session_with(limits: SessionLimits) -> CreateParams {
    CreateParams {
        limits: Some(limits),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_command_carries_the_default_limits() {
    let d = TestDaemon::start("");
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let l = limits_in(&c, &s).await;
    assert_eq!(
        l["Max cpu time"],
        pair("300", "302"),
        "hard = soft + margin"
    );
    assert_eq!(l["Max address space"], pair("17179869184", "17179869184"));
    assert_eq!(l["Max processes"], pair("1024", "1024"));
    assert_eq!(l["Max open files"], pair("1024", "1024"));
    assert_eq!(l["Max core file size"], pair("0", "0"));
    let r = c.run(&s, "cat /proc/self/oom_score_adj").await.unwrap();
    assert_eq!(text(&r.stdout).trim(), "1000");
    // The daemon keeps itself low, where this host lets a process lower its
    // score (a container may not: then it keeps the inherited one).
    let stats = c.stats().await.unwrap().runtime;
    assert_eq!(stats.commands_oom_score_adj, 1000);
    if can_lower_oom_score() {
        assert_eq!(stats.oom_score_adj, -900);
    } else {
        eprintln!(
            "note: this host refuses lowering oom_score_adj; the daemon kept {}",
            stats.oom_score_adj
        );
        assert!(stats.oom_score_adj < 1000);
    }
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn configured_and_session_limits_are_read_back() {
    let d = TestDaemon::start(
        "[rlimits]\ncpu = \"20s\"\naddress_space = \"2 GiB\"\nnproc = 300\nnofile = 256\ncore = 0\n\
         [commands]\noom_score_adj = 500\n",
    );
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let l = limits_in(&c, &s).await;
    assert_eq!(l["Max cpu time"], pair("20", "22"));
    assert_eq!(l["Max address space"], pair("2147483648", "2147483648"));
    assert_eq!(l["Max processes"], pair("300", "300"));
    assert_eq!(l["Max open files"], pair("256", "256"));
    let r = c.run(&s, "cat /proc/self/oom_score_adj").await.unwrap();
    assert_eq!(text(&r.stdout).trim(), "500");

    // A session tightens them...
    let tight = c
        .create_session(session_with(SessionLimits {
            rlimit_cpu_s: Some(5),
            rlimit_as_bytes: Some(1 << 30),
            rlimit_nofile: Some(64),
            rlimit_nproc: Some(100),
            ..Default::default()
        }))
        .await
        .unwrap();
    let l = limits_in(&c, &tight).await;
    assert_eq!(l["Max cpu time"], pair("5", "7"));
    assert_eq!(l["Max address space"], pair("1073741824", "1073741824"));
    assert_eq!(l["Max processes"], pair("100", "100"));
    assert_eq!(l["Max open files"], pair("64", "64"));
    // ...and a command cannot raise its hard limit back unless it holds
    // CAP_SYS_RESOURCE (the kernel's rule: root has it on most hosts).
    let r = c
        .run(
            &tight,
            "grep CapEff /proc/self/status; ulimit -n 65 2>&1; echo rc=$?",
        )
        .await
        .unwrap();
    let out = text(&r.stdout);
    let cap_eff = out
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
        .expect("CapEff");
    const CAP_SYS_RESOURCE: u32 = 24; // linux/capability.h
    let sys_resource = cap_eff & (1 << CAP_SYS_RESOURCE) != 0;
    let expect = if sys_resource { "rc=0" } else { "rc=1" };
    assert!(
        out.contains(expect),
        "CAP_SYS_RESOURCE {sys_resource}: {out}"
    );
    // Without the capability it cannot, whoever runs this.
    let r = c
        .run(
            &tight,
            "setpriv --inh-caps=-sys_resource --bounding-set=-sys_resource \
             bash -c 'ulimit -n 65' 2>&1; echo rc=$?",
        )
        .await
        .unwrap();
    assert!(text(&r.stdout).contains("rc=1"), "{}", text(&r.stdout));

    // ...but never loosens them.
    for limits in [
        SessionLimits {
            rlimit_nofile: Some(257),
            ..Default::default()
        },
        SessionLimits {
            rlimit_cpu_s: Some(21),
            ..Default::default()
        },
        SessionLimits {
            rlimit_as_bytes: Some(4 << 30),
            ..Default::default()
        },
    ] {
        let e = c.create_session(session_with(limits)).await.unwrap_err();
        assert_eq!(e.code(), Some("INVALID_REQUEST"));
        assert!(e.to_string().contains("limits.rlimit_"), "{e}");
    }
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cpu_spin_is_killed_by_rlimit_cpu_and_reported() {
    // The spins run in a session limited to 1 s of CPU; `exit 152` runs
    // under the daemon's 10 s: a command is taken for a limit kill from half
    // its limit on, and starting a shell under emulation on a busy machine
    // counts more than 0.5 s of CPU.
    let d = TestDaemon::start("[rlimits]\ncpu = \"10s\"\n");
    let c = d.client().await;
    let s = c
        .create_session(session_with(SessionLimits {
            rlimit_cpu_s: Some(1),
            ..Default::default()
        }))
        .await
        .unwrap();
    // The spin in a child process: the shell reports 128 + SIGXCPU. The
    // timeout is a backstop only: a starved machine (an emulated one busy
    // with other tests) takes many seconds of wall time to spend 1 s of CPU.
    let r = c
        .exec(ExecParams {
            timeout_s: Some(300.0),
            ..ExecParams {
                session_id: s.clone(),
                command: "echo spinning; sh -c 'while :; do :; done'".into(),
                ..Default::default()
            }
        })
        .await
        .unwrap();
    assert_eq!(r.killed_by, Some(KilledBy::CpuLimit), "{r:?}");
    assert!(!r.timed_out);
    assert_eq!(r.exit_code, Some(128 + libc::SIGXCPU));
    assert!(r.cpu_ms.unwrap() >= 500, "{r:?}");
    assert_eq!(text(&r.stdout), "spinning\n");
    // The spin in the shell itself: the shell dies of SIGXCPU.
    let r = c.run(&s, "while :; do :; done").await.unwrap();
    assert_eq!(r.killed_by, Some(KilledBy::CpuLimit), "{r:?}");
    assert_eq!(r.signal, Some(libc::SIGXCPU));
    // A command that merely exits 152 without using the CPU is not a limit kill.
    let roomy = c.create_session(CreateParams::default()).await.unwrap();
    let r = c.run(&roomy, "exit 152").await.unwrap();
    assert_eq!(r.killed_by, None);
    // No core file from SIGXCPU: RLIMIT_CORE is 0.
    let cores: Vec<_> = std::fs::read_dir(d.work_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("core"))
        .collect();
    assert!(cores.is_empty(), "core files: {cores:?}");
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn rlimit_nofile_and_as_stop_commands_the_way_programs_report_it() {
    let d = TestDaemon::start("");
    let c = d.client().await;
    let s = c
        .create_session(session_with(SessionLimits {
            rlimit_nofile: Some(32),
            rlimit_as_bytes: Some(256 << 20),
            ..Default::default()
        }))
        .await
        .unwrap();
    let r = c
        .run(&s, "for i in $(seq 1 64); do exec {fd}</dev/null || { echo \"stopped at $i\"; exit 9; }; done")
        .await
        .unwrap();
    assert_eq!(r.exit_code, Some(9));
    assert!(
        text(&r.stdout).starts_with("stopped at"),
        "{}",
        text(&r.stdout)
    );
    assert!(text(&r.stderr).contains("Too many open files"));
    assert_eq!(
        r.killed_by, None,
        "a failed open is the program's own error"
    );

    // A 1 GiB allocation under a 256 MiB address-space limit fails.
    let r = c
        .run(&s, "dd if=/dev/zero of=/dev/null bs=1G count=1")
        .await
        .unwrap();
    assert_eq!(r.exit_code, Some(1));
    assert!(
        text(&r.stderr).contains("memory exhausted"),
        "{}",
        text(&r.stderr)
    );
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs kernel.core_pattern = core (cores in the cwd, as in CI)"]
async fn core_dumps_follow_rlimit_core() {
    // With RLIMIT_CORE = 0 (the default) a crash leaves no core; with it
    // unlimited, the same crash does — so the check can see a core at all.
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/core_pattern")
            .unwrap()
            .trim(),
        "core",
        "needs kernel.core_pattern = core"
    );
    for (config, expect_core) in [("", false), ("[rlimits]\ncore = \"unlimited\"\n", true)] {
        let d = TestDaemon::start(config);
        let c = d.client().await;
        let s = c.create_session(CreateParams::default()).await.unwrap();
        c.run(&s, "sh -c 'kill -SEGV $$'").await.unwrap();
        let has_core = std::fs::read_dir(d.work_dir())
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("core"));
        assert_eq!(has_core, expect_core, "config {config:?}");
        drop(c);
        d.stop();
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (run_as_user needs a root daemon)"]
async fn run_as_user_drops_privileges_and_nproc_then_binds() {
    assert!(nix::unistd::geteuid().is_root(), "needs root");
    let d = TestDaemon::start("[commands]\nrun_as_user = \"nobody\"\n");
    let c = d.client().await;
    // The test's work dir is root's (0700); nobody needs a directory it can enter.
    let s = c
        .create_session(CreateParams {
            cwd: Some("/tmp".into()),
            ..session_with(SessionLimits {
                rlimit_nproc: Some(8),
                ..Default::default()
            })
        })
        .await
        .unwrap();
    let r = c
        .run(&s, "id -u; id -g; id -G; echo $USER $HOME")
        .await
        .unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    assert_eq!(
        text(&r.stdout),
        format!(
            "{uid}\n{gid}\n{gid}\nnobody {home}\n",
            uid = nobody.uid,
            gid = nobody.gid,
            home = nobody.dir.display()
        ),
        "uid, primary group only, and the user's environment"
    );
    // RLIMIT_NPROC binds a non-root user: a bounded fork loop is stopped.
    let r = c
        .run(
            &s,
            "sh -c 'i=0; while [ $i -lt 30 ]; do sleep 2 & i=$((i+1)); done; wait' 2>&1",
        )
        .await
        .unwrap();
    assert!(
        text(&r.stdout).contains("Cannot fork"),
        "{}",
        text(&r.stdout)
    );
    // A directory only root may enter: the command's user cannot start there, and SPAWN_FAILED says why.
    let private = d.work_dir().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(
        &private,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let root_only = c
        .create_session(CreateParams {
            cwd: Some(private.to_string_lossy().into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let e = c.run(&root_only, "true").await.unwrap_err();
    assert_eq!(e.code(), Some("SPAWN_FAILED"));
    assert!(e.to_string().contains("working directory"), "{e}");
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn as_subreaper_orphans_are_reaped_and_exit_codes_stay_right() {
    let d = TestDaemon::start("[sessions]\nsubreaper = true\n");
    let c = std::sync::Arc::new(d.client().await);
    assert!(c.stats().await.unwrap().runtime.subreaper);
    let s = c.create_session(CreateParams::default()).await.unwrap();
    // The subshell exits at once; its `sleep` is orphaned onto the daemon.
    c.run(&s, "(sleep 0.2 &) ; exit").await.unwrap();
    wait_until_async("the orphan is reaped", Duration::from_secs(10), || async {
        c.stats().await.unwrap().runtime.zombies_reaped_total >= 1
    })
    .await;
    // A burst of 200 commands over 8 sessions, orphans included: every exit status is right.
    let mut sessions = Vec::new();
    for _ in 0..7 {
        sessions.push(c.create_session(CreateParams::default()).await.unwrap());
    }
    sessions.push(s);
    let mut runs = Vec::new();
    for (i, session) in (0..200).zip(sessions.iter().cycle()) {
        let (c, session) = (c.clone(), session.clone());
        runs.push(tokio::spawn(async move {
            loop {
                match c
                    .run(&session, &format!("(true &); exit {}", i % 256))
                    .await
                {
                    Ok(r) => return (i, r.exit_code),
                    // One command per session at a time: retry the busy ones.
                    Err(e) if e.code() == Some("SESSION_BUSY") => tokio::task::yield_now().await,
                    Err(e) if e.code() == Some("TOO_MANY_COMMANDS") => {
                        tokio::task::yield_now().await
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }));
    }
    for run in runs {
        let (i, code) = run.await.unwrap();
        assert_eq!(code, Some(i % 256), "command {i}");
    }
    wait_until("no zombie child is left", Duration::from_secs(10), || {
        sessiond::process::procfs::all_processes()
            .iter()
            .all(|p| !(p.ppid == d.pid() && p.is_zombie()))
    });
    drop(c);
    d.stop();
}
