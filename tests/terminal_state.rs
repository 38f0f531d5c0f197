//! Terminal state against the real daemon: every kind of state carried from one command to the next, hostile commands, kills, the cap, and the sh fallback; each case as the daemon's user and as `nobody`.

mod support;

use std::time::Duration;

use sessiond::client::Client;
use sessiond::protocol::{CreateParams, ExecParams, ExecResult, KilledBy};
use support::{TestDaemon, wait_until_async};

const AS_NOBODY: &str = "[commands]\nrun_as_user = \"nobody\"\n";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn run(c: &Client, s: &str, command: &str) -> ExecResult {
    c.run(s, command).await.unwrap()
}

/// Runs `command` and asserts its exact stdout and stderr.
async fn expect(c: &Client, s: &str, command: &str, stdout: &str, stderr: &str) -> ExecResult {
    let r = run(c, s, command).await;
    assert_eq!(text(&r.stdout), stdout, "stdout of {command:?}");
    assert_eq!(text(&r.stderr), stderr, "stderr of {command:?}");
    r
}

/// One test per mode: the daemon's own user, and `run_as_user = "nobody"`.
/// Sessions start in a directory every user may enter.
macro_rules! in_both_modes {
    ($case:ident) => {
        mod $case {
            use super::*;
            #[tokio::test(flavor = "multi_thread")]
            async fn as_daemon_user() {
                in_mode("", |c, s| Box::pin(super::$case(c, s))).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn as_nobody() {
                in_mode(AS_NOBODY, |c, s| Box::pin(super::$case(c, s))).await
            }
        }
    };
}

type Case = for<'a> fn(
    &'a Client,
    &'a str,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>>;

async fn in_mode(config: &str, case: Case) {
    let d = TestDaemon::start(config);
    let c = d.client().await;
    let s = c
        .create_session(CreateParams {
            cwd: Some("/tmp".into()),
            ..CreateParams::default()
        })
        .await
        .unwrap();
    case(&c, &s).await;
    c.destroy_session(&s).await.unwrap();
    drop(c);
    d.stop();
}

async fn variables(c: &Client, s: &str) {
    run(c, s, "x='a b'; declare -i n=5; arr=(1 \"2 3\"); declare -A h=([k]=v); export E=e; declare -r R=r; declare -n ref=x;").await;
    expect(
        c,
        s,
        "echo \"$x|$((n+1))|${arr[1]}|${h[k]}|$ref|$R\"; env | grep -c '^E=e$'; declare -p n arr h R | cut -c1-11",
        "a b|6|2 3|v|a b|r\n1\ndeclare -i \ndeclare -a \ndeclare -A \ndeclare -r \n",
        "",
    )
    .await;
}
in_both_modes!(variables);

async fn cwd_oldpwd_and_dirstack(c: &Client, s: &str) {
    run(c, s, "cd /usr; cd /; pushd -n /usr/bin >/dev/null").await;
    expect(c, s, "pwd; echo $OLDPWD; dirs", "/\n/usr\n/ /usr/bin\n", "").await;
    let r = expect(c, s, "cd - >/dev/null; pwd", "/usr\n", "").await;
    assert_eq!(r.cwd, "/usr");
}
in_both_modes!(cwd_oldpwd_and_dirstack);

async fn status_functions_aliases(c: &Client, s: &str) {
    run(c, s, "f() { echo \"f:$1\"; }; alias ll='echo LL'; (exit 7)").await;
    expect(c, s, "echo $?; f 1; ll", "7\nf:1\nLL\n", "").await;
    // exit N saves, and its status is the next `$?`.
    run(c, s, "g() { echo g; }; exit 4").await;
    expect(c, s, "echo $?; g", "4\ng\n", "").await;
}
in_both_modes!(status_functions_aliases);

async fn options_umask_traps(c: &Client, s: &str) {
    run(
        c,
        s,
        "set -o pipefail -o noglob; shopt -s extglob nullglob; umask 027; trap 'echo usr1' USR1",
    )
    .await;
    expect(
        c,
        s,
        "shopt -o pipefail noglob | tr -s ' \\t' ' '; shopt extglob nullglob | tr -s ' \\t' ' '; umask; trap -p USR1",
        "pipefail on\nnoglob on\nextglob on\nnullglob on\n0027\ntrap -- 'echo usr1' SIGUSR1\n",
        "",
    )
    .await;
    run(c, s, "set +o noglob; shopt -u nullglob").await;
    expect(
        c,
        s,
        "shopt -o noglob | tr -s ' \\t' ' '; shopt nullglob | tr -s ' \\t' ' '",
        "noglob off\nnullglob off\n",
        "",
    )
    .await;
}
in_both_modes!(options_umask_traps);

async fn xtrace_traces_the_command_at_depth_one(c: &Client, s: &str) {
    expect(c, s, "set -x", "", "").await;
    expect(c, s, "echo $BASH_SUBSHELL", "0\n", "+ echo 0\n").await;
    expect(c, s, "set +x", "", "+ set +x\n").await;
    expect(c, s, "echo quiet", "quiet\n", "").await;
}
in_both_modes!(xtrace_traces_the_command_at_depth_one);

async fn errors_read_as_bash(c: &Client, s: &str) {
    expect(
        c,
        s,
        "xyz_not_a_command",
        "",
        "bash: line 1: xyz_not_a_command: command not found\n",
    )
    .await;
    expect(c, s, "echo $0", "bash\n", "").await;
}
in_both_modes!(errors_read_as_bash);

/// Hostile commands: each prints only its own bytes, and the next command still sees the state.
async fn hostile_commands(c: &Client, s: &str) {
    run(c, s, "KEEP=kept; kf() { echo kf; }").await;
    // (command, its stdout, its stderr, the stderr of the next command: bash's own trace of it)
    let cases: &[(&str, &str, &str, &str)] = &[
        ("set -u; echo u", "u\n", "", ""),
        ("set -e; false; echo never", "", "", ""),
        ("set -o pipefail; false | true; echo $?", "1\n", "", ""),
        ("exec 3>&-; exec 4>&-; echo closed", "closed\n", "", ""),
        ("exec >/dev/null; echo gone", "", "", ""),
        ("exec >&-; exec 2>&-", "", "", ""),
        ("trap 'echo err' ERR; false", "err\n", "", ""),
        (
            "BASH_XTRACEFD=1; set -x",
            "",
            "",
            "+ set +eux +o pipefail\n",
        ),
    ];
    for (command, stdout, stderr, next) in cases {
        expect(c, s, command, stdout, stderr).await;
        expect(
            c,
            s,
            "set +eux +o pipefail; trap - ERR; echo $KEEP; kf",
            "kept\nkf\n",
            next,
        )
        .await;
    }
    for name in [
        "printf", "echo", "declare", "builtin", "eval", "source", "cd", "trap", "typeset", "set",
        "unset", "command", "type", "shopt", "alias", "umask", "export", "readonly",
    ] {
        let define = format!("alias {name}='true'; {name}() {{ :; }}");
        expect(c, s, &define, "", "").await;
        expect(c, s, "KEEP2=$KEEP", "", "").await;
        // On its own line: aliases are expanded when a line is read.
        // (in posix mode, so that `unset` is the builtin even when shadowed)
        let undo = format!(
            "\\unalias {name}; POSIXLY_CORRECT=y; \\unset -f {name}; \\unset POSIXLY_CORRECT\necho $KEEP2"
        );
        expect(c, s, &undo, "kept\n", "").await;
        expect(c, s, "kf", "kf\n", "").await;
    }
    // Variables named like ours.
    expect(c, s, "__sd_x=1; __sd_=2; POSIXLY_CORRECT=", "", "").await;
    expect(c, s, "echo $__sd_x $KEEP", "1 kept\n", "").await;
}
in_both_modes!(hostile_commands);

/// The documented exceptions keep the previous state and add nothing to the output.
async fn exceptions_keep_the_state(c: &Client, s: &str) {
    run(c, s, "KEEP=kept").await;
    for (command, stdout) in [
        ("trap 'echo mine' EXIT; KEEP=lost; exit 3", "mine\n"),
        ("KEEP=lost; exec /bin/echo execd", "execd\n"),
        ("KEEP=lost; set -n", ""),
        ("KEEP=lost; enable -n declare", ""),
    ] {
        expect(c, s, command, stdout, "").await;
        expect(c, s, "echo $KEEP", "kept\n", "").await;
    }
}
in_both_modes!(exceptions_keep_the_state);

/// A killed command leaves the state as it was and nothing of ours in stderr.
async fn killed_commands(c: &Client, s: &str) {
    run(c, s, "KEEP=kept").await;
    let r = c
        .exec(ExecParams {
            session_id: s.into(),
            command: "KEEP=lost; cd /usr; echo started; sleep 30".into(),
            // Long enough for a slow shell to get to its `sleep`.
            timeout_s: Some(3.0),
            ..ExecParams::default()
        })
        .await
        .unwrap();
    assert_eq!(r.killed_by, Some(KilledBy::Timeout));
    assert_eq!(text(&r.stdout), "started\n");
    assert_eq!(text(&r.stderr), "");
    expect(c, s, "echo $KEEP; pwd", "kept\n/tmp\n", "").await;

    let canceller = async {
        wait_until_async("the command runs", Duration::from_secs(10), || async {
            c.stats().await.unwrap().commands.running == 1
        })
        .await;
        assert!(c.cancel(s).await.unwrap());
    };
    let (r, ()) = tokio::join!(c.run(s, "KEEP=lost; sleep 30"), canceller);
    let r = r.unwrap();
    assert_eq!(r.killed_by, Some(KilledBy::Cancelled));
    assert_eq!(text(&r.stderr), "");
    expect(c, s, "echo $KEEP", "kept\n", "").await;
}
in_both_modes!(killed_commands);

/// Per-request env is for that command only, unless the command assigns it.
async fn request_env_does_not_stick(c: &Client, s: &str) {
    run(c, s, "export A=session").await;
    let r = c
        .exec(ExecParams {
            session_id: s.into(),
            command: "echo $A $B; C=mine".into(),
            env: Some(
                [("A", "req"), ("B", "req"), ("C", "req")]
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .into(),
            ),
            ..ExecParams::default()
        })
        .await
        .unwrap();
    assert_eq!(text(&r.stdout), "req req\n");
    expect(c, s, "echo $A ${B-unset} $C", "session unset mine\n", "").await;
}
in_both_modes!(request_env_does_not_stick);

/// A plain command (a program, or `true`, `false`, `echo`…: the path that
/// skips the save) keeps the whole state and leaves its status as `$?`; a
/// plain word the state defines as a function or alias, a builtin that
/// changes state, or any trap takes the full path, and what it does sticks.
async fn plain_commands_keep_the_state(c: &Client, s: &str) {
    run(
        c,
        s,
        "x=1; f() { y=2; cd /usr; }; alias g='z=3'; shopt -s extglob; set -o pipefail; umask 027; cd /var",
    )
    .await;
    let state = "echo \"$x|$(type -t f)|$(alias g)|$(shopt -p extglob)|$(set -o | grep -c 'pipefail.*on')|$(umask)|$PWD\"";
    let expected = "1|function|alias g='z=3'|shopt -s extglob|1|0027|/var\n";
    for (command, status) in [
        ("false", "1"),
        ("true", "0"),
        ("ls /nonexistent-dir", "2"),
        ("/bin/sh -c 'exit 7'", "7"),
        ("echo plain", "0"),
        ("no-such-program-here", "127"),
    ] {
        let r = run(c, s, command).await;
        assert_eq!(r.cwd, "/var", "{command:?}");
        expect(c, s, "echo $?", &format!("{status}\n"), "").await;
        expect(c, s, state, expected, "").await;
    }
    // Plain words, but a function and an alias of the session: they run in full.
    run(c, s, "f").await;
    expect(c, s, "echo $y; pwd", "2\n/usr\n", "").await;
    run(c, s, "g").await;
    expect(c, s, "echo $z", "3\n", "").await;
    // A builtin that changes state, in a plain form.
    run(c, s, "shopt -u extglob").await;
    expect(c, s, "shopt -p extglob", "shopt -u extglob\n", "").await;
    run(c, s, "cd /tmp").await;
    expect(c, s, "pwd", "/tmp\n", "").await;
    // With a trap, even `false` takes the full path: its ERR trap's assignment sticks.
    run(c, s, "trap 'e=failed' ERR").await;
    run(c, s, "false").await;
    expect(c, s, "echo $e", "failed\n", "").await;
    // `pwd` looks harmless, but in posix mode `pwd -P` sets $PWD (the cwd carried).
    run(
        c,
        s,
        "trap - ERR; d=$(mktemp -d); mkdir $d/real; ln -s $d/real $d/link; cd $d/link; set -o posix",
    )
    .await;
    run(c, s, "pwd -P").await;
    expect(c, s, "echo ${PWD#$d}", "/real\n", "").await;
    // With `set -k` a NAME=value argument is an assignment (in posix mode, to
    // `:`, one that persists); `[ -v ]` evaluates an array subscript.
    run(c, s, "set -k").await;
    run(c, s, ": kw=1").await;
    expect(c, s, "echo $kw", "1\n", "").await;
    run(c, s, "set +k +o posix; cd /tmp; rm -rf $d").await;
    run(c, s, "[ -v a[i=1] ]").await;
    expect(c, s, "echo $i", "1\n", "").await;
}
in_both_modes!(plain_commands_keep_the_state);

/// The environment the wrapper shell of a plain command was started with
/// (its parent's, read by a child `sh`), one `NAME=value` per line.
const WRAPPER_ENV: &str = r#"sh -c 'tr "\0" "\n" < /proc/$PPID/environ'"#;

/// A plain command in a session whose visible state all travels in the
/// environment starts without the restore (no `BASH_ENV`), and shows
/// exactly what the full path shows: its environment (OLDPWD included),
/// output, errors, a signal's report, exit status. An OLDPWD that no longer
/// names a directory, which bash would drop from its environment, takes the
/// restore instead; so does any OLDPWD under another identity, for which
/// the daemon cannot tell, and a relative one (bash resolves it from the
/// session's cwd, not the daemon's). Locale variables, all or none, and
/// `LANGUAGE` (which glibc reads from the shell's own environment) behave
/// as when assigned, on both paths.
async fn bare_starts_show_what_the_full_path_shows(c: &Client, s: &str) {
    // Debian installs C.UTF-8 (glibc's own C.utf8); the sessions here use it.
    assert!(
        std::path::Path::new("/usr/lib/locale/C.utf8").is_dir(),
        "this test needs the C.UTF-8 locale installed"
    );
    let has = |out: &[u8], line: &str| text(out).lines().any(|l| l == line);
    let as_daemon_user =
        text(&run(c, s, "id -u").await.stdout) == format!("{}\n", nix::unistd::geteuid());
    run(c, s, "export FOO='a  b' LANG=C.UTF-8").await;
    let wrapper_env = run(c, s, WRAPPER_ENV).await.stdout;
    assert!(
        !text(&wrapper_env).contains("BASH_ENV="),
        "{}",
        text(&wrapper_env)
    );
    assert!(has(&wrapper_env, "FOO=a  b"), "{}", text(&wrapper_env));
    run(c, s, "cd /usr; cd /tmp").await;
    let wrapper_env = run(c, s, WRAPPER_ENV).await.stdout;
    let bare = !text(&wrapper_env).contains("BASH_ENV=");
    assert_eq!(bare, as_daemon_user, "{}", text(&wrapper_env));
    assert_eq!(
        has(&wrapper_env, "OLDPWD=/usr"),
        bare,
        "{}",
        text(&wrapper_env)
    );
    let same_as_full_path = |command: &'static str| async move {
        let bare = run(c, s, command).await;
        let full = run(c, s, &format!("{command}; exit $?")).await;
        // Pids differ from run to run (the line number is checked below).
        let scrub = |b: &[u8]| text(b).replace(|ch: char| ch.is_ascii_digit(), "");
        assert_eq!(
            text(&bare.stdout),
            text(&full.stdout),
            "stdout of {command:?}"
        );
        assert_eq!(
            scrub(&bare.stderr),
            scrub(&full.stderr),
            "stderr of {command:?}"
        );
        assert_eq!(bare.exit_code, full.exit_code, "exit of {command:?}");
        assert_eq!(bare.signal, full.signal, "signal of {command:?}");
        bare
    };
    let env = same_as_full_path("env").await;
    assert!(has(&env.stdout, "OLDPWD=/usr"), "{env:?}");
    same_as_full_path("printenv LANG FOO").await;
    same_as_full_path("ls -d /tm* /no-such-path").await;
    same_as_full_path("echo plain  words").await;
    let missing = same_as_full_path("no-such-program-here").await;
    assert_eq!(
        text(&missing.stderr),
        "bash: line 1: no-such-program-here: command not found\n"
    );
    let killed = same_as_full_path("/bin/sh -c 'kill -SEGV $$'").await;
    assert!(
        text(&killed.stderr).starts_with("bash: line 1: "),
        "{killed:?}"
    );
    assert!(
        text(&killed.stderr).contains("Segmentation fault"),
        "{killed:?}"
    );
    assert_eq!(killed.exit_code, Some(139));
    expect(c, s, "echo $?; echo $OLDPWD", "139\n/usr\n", "").await;

    run(c, s, "d=$(mktemp -d); cd $d; cd /tmp; rmdir $d").await;
    let wrapper_env = run(c, s, WRAPPER_ENV).await.stdout;
    assert!(
        has(&wrapper_env, "BASH_ENV=/dev/fd/62"),
        "{}",
        text(&wrapper_env)
    );
    let gone = same_as_full_path("printenv OLDPWD").await;
    let expected = text(&run(c, s, "echo $d; unset d").await.stdout);
    assert_eq!(text(&gone.stdout), expected);

    // `tests` is a directory from the daemon's cwd (the test's), not from the session's.
    assert!(std::path::Path::new("tests").is_dir());
    run(c, s, "cd $(mktemp -d); export OLDPWD=/usr").await;
    let wrapper_env = run(c, s, WRAPPER_ENV).await.stdout;
    assert_eq!(
        has(&wrapper_env, "OLDPWD=/usr"),
        as_daemon_user,
        "bare again"
    );
    run(c, s, "export OLDPWD=tests").await;
    let relative = same_as_full_path("printenv OLDPWD").await;
    assert_eq!(text(&relative.stdout), "tests\n");

    // One locale not installed: bash would keep C for every category if it
    // found them all in its environment; assigned, LC_CTYPE still applies.
    run(c, s, "touch é; export LANG=xx_XX.UTF-8 LC_CTYPE=C.UTF-8").await;
    expect(c, s, "x=é; echo ${#x}; unset x", "1\n", "").await;
    let glob = same_as_full_path("echo ?").await;
    assert_eq!(text(&glob.stdout), "é\n");
    // glibc translates bash's messages after LANGUAGE in the shell's environment.
    run(c, s, "export LANG=C.UTF-8 LANGUAGE=de; unset LC_CTYPE").await;
    let missing = same_as_full_path("no-such-program-here").await;
    assert_eq!(
        text(&missing.stderr),
        "bash: line 1: no-such-program-here: command not found\n"
    );
    run(c, s, "rm é; d=$PWD; cd /tmp; rmdir $d").await;
}
in_both_modes!(bare_starts_show_what_the_full_path_shows);

/// The longest command a request may carry runs, plain or not: the empty
/// EXIT trap a bare start puts before a plain command must not take it past
/// what exec accepts (one argument of at most 128 KiB).
#[tokio::test(flavor = "multi_thread")]
async fn the_longest_command_allowed_runs_plain_or_not() {
    let d = TestDaemon::start("");
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    for head in ["true ", "true; : "] {
        let filler = "x".repeat(sessiond::process::shell::MAX_ARG_BYTES - head.len());
        let r = run(&c, &s, &format!("{head}{filler}")).await;
        assert_eq!(r.exit_code, Some(0), "{head:?}: {}", text(&r.stderr));
    }
    c.destroy_session(&s).await.unwrap();
    drop(c);
    d.stop();
}

/// A library of 300 functions sourced once is there for every later command.
async fn function_library(c: &Client, s: &str) {
    let mut lib = String::new();
    for i in 0..300 {
        lib.push_str(&format!(
            "lib_{i}() {{ local a=$1; echo \"lib {i} $a\"; }}\nLIBVAR_{i}='v {i}'\n"
        ));
    }
    let r = c
        .exec(ExecParams {
            session_id: s.into(),
            command: "eval \"$(cat)\"".into(),
            stdin: Some(lib.into_bytes().into()),
            ..ExecParams::default()
        })
        .await
        .unwrap();
    assert_eq!(r.exit_code, Some(0), "{}", text(&r.stderr));
    expect(
        c,
        s,
        "lib_299 x; lib_0 y; echo $LIBVAR_150",
        "lib 299 x\nlib 0 y\nv 150\n",
        "",
    )
    .await;
}
in_both_modes!(function_library);

/// Random values (any byte but NUL) survive save and restore byte for byte.
async fn random_values_round_trip(c: &Client, s: &str) {
    let seed: u64 = std::env::var("TERMINAL_STATE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("seed {seed} (TERMINAL_STATE_SEED={seed} replays it)");
    let mut rng = seed;
    let mut next = move || {
        // xorshift64*
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let special = b"\n'\"\\$`!*?[]{}() \t\x01\x7f\xff\xc3\xa9";
    let mut values = Vec::new();
    for _ in 0..40 {
        let len = (next() % 40) as usize;
        let v: Vec<u8> = (0..len)
            .map(|_| {
                let r = next();
                if r % 3 == 0 {
                    special[(r >> 8) as usize % special.len()]
                } else {
                    (r >> 16) as u8 % 255 + 1
                }
            })
            .collect();
        values.push(v);
    }
    // The values come in through stdin (read -d '' keeps every byte but NUL).
    let mut input = Vec::new();
    for v in &values {
        input.extend_from_slice(v);
        input.push(0);
    }
    // In a UTF-8 locale `read -d ''` takes a NUL after a lone lead byte as part
    // of the character: read in the C locale.
    let mut set = String::from("LC_ALL=C; ");
    for i in 0..values.len() {
        set.push_str(&format!(
            "IFS= read -r -d '' V{i}; A[{i}]=$V{i}; export X{i}=$V{i}; "
        ));
    }
    set.push_str("unset LC_ALL");
    let r = c
        .exec(ExecParams {
            session_id: s.into(),
            command: set,
            stdin: Some(input.into()),
            ..ExecParams::default()
        })
        .await
        .unwrap();
    assert_eq!(r.exit_code, Some(0), "seed {seed}: {}", text(&r.stderr));
    assert_eq!(r.state_error, None, "seed {seed}");
    let mut print = String::new();
    for i in 0..values.len() {
        print.push_str(&format!("printf '%s\\0%s\\0' \"$V{i}\" \"${{A[{i}]}}\"; "));
    }
    print.push_str("env -0");
    let r = run(c, s, &print).await;
    let got: Vec<&[u8]> = r.stdout.split(|b| *b == 0).collect();
    for (i, v) in values.iter().enumerate() {
        assert_eq!(got[2 * i], v.as_slice(), "seed {seed}: V{i}");
        assert_eq!(got[2 * i + 1], v.as_slice(), "seed {seed}: A[{i}]");
        let mut entry = format!("X{i}=").into_bytes();
        entry.extend_from_slice(v);
        assert!(
            got[2 * values.len()..].contains(&entry.as_slice()),
            "seed {seed}: exported X{i}"
        );
    }
}
in_both_modes!(random_values_round_trip);

#[tokio::test(flavor = "multi_thread")]
async fn venv_activate_and_deactivate_across_commands() {
    let venv = tempfile::Builder::new()
        .prefix("sessiond-venv")
        .tempdir_in("/tmp")
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(venv.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The system python, which every command user may run (a pyenv one may live under /root).
    let made = std::process::Command::new("/usr/bin/python3")
        .args(["-m", "venv", "--without-pip"])
        .arg(venv.path().join("v"))
        .status()
        .unwrap();
    assert!(made.success(), "python3 -m venv");
    let path = venv.path().join("v");
    for config in ["", AS_NOBODY] {
        let d = TestDaemon::start(config);
        let c = d.client().await;
        let s = c
            .create_session(CreateParams {
                cwd: Some("/tmp".into()),
                ..CreateParams::default()
            })
            .await
            .unwrap();
        let before = text(&run(&c, &s, "command -v python3").await.stdout);
        expect(
            &c,
            &s,
            &format!("source {}/bin/activate", path.display()),
            "",
            "",
        )
        .await;
        expect(
            &c,
            &s,
            "command -v python3; echo $VIRTUAL_ENV",
            &format!("{p}/bin/python3\n{p}\n", p = path.display()),
            "",
        )
        .await;
        expect(&c, &s, "deactivate", "", "").await;
        expect(
            &c,
            &s,
            "command -v python3; echo ${VIRTUAL_ENV-none}",
            &format!("{before}none\n"),
            "",
        )
        .await;
        drop(c);
        d.stop();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_state_over_the_cap_is_refused_and_the_old_one_kept() {
    let d = TestDaemon::start("[sessions]\nmax_state_bytes = \"64 KiB\"\n");
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let r = run(&c, &s, "KEEP=kept").await;
    assert_eq!(r.state_error, None);
    let r = run(
        &c,
        &s,
        "KEEP=lost; BIG=$(head -c 100000 /dev/zero | tr '\\0' x)",
    )
    .await;
    let e = r.state_error.expect("state_error");
    assert!(e.contains("max_state_bytes"), "{e}");
    expect(&c, &s, "echo $KEEP ${#BIG}", "kept 0\n", "").await;
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sh_fallback_keeps_what_sh_can() {
    let d = TestDaemon::start("[sessions]\nshell = \"/nonexistent/bash\"\n");
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    expect(
        &c,
        &s,
        "cd /tmp; x='it'\"'\"'s'; export Y=2; umask 077; set -u; f() { echo f; }",
        "",
        "",
    )
    .await;
    expect(
        &c,
        &s,
        "pwd; echo \"$x $Y\"; umask; echo $-; env | grep -c '^x='",
        "/tmp\nit's 2\n0077\nu\n0\n",
        "",
    )
    .await;
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn ping_lists_the_features() {
    let d = TestDaemon::start("");
    let c = d.client().await;
    let p = c.ping().await.unwrap();
    for feature in ["terminal-state", "init"] {
        assert!(
            p.features.iter().any(|f| f == feature),
            "{feature}: {:?}",
            p.features
        );
    }
    drop(c);
    d.stop();
}

fn with_init(init: &str) -> CreateParams {
    CreateParams {
        init: Some(init.into()),
        ..Default::default()
    }
}

/// `init` sets the session's starting state: variables, functions, cwd, options.
#[tokio::test(flavor = "multi_thread")]
async fn init_gives_the_starting_state() {
    let d = TestDaemon::start("");
    let c = d.client().await;
    let s = c
        .create_session(with_init(
            "cd /tmp; LIB=loaded; greet() { echo \"hi $1\"; }; set -o pipefail",
        ))
        .await
        .unwrap();
    expect(
        &c,
        &s,
        "pwd; echo $LIB; greet you; [[ -o pipefail ]] && echo pipefail",
        "/tmp\nloaded\nhi you\npipefail\n",
        "",
    )
    .await;
    assert_eq!(c.stats().await.unwrap().sessions.created_total, 1);
    drop(c);
    d.stop();
}

/// A failing init fails the create with SPAWN_FAILED naming the exit status
/// and the end of its stderr; no session remains.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_init_fails_the_create_and_leaves_nothing() {
    let d = TestDaemon::start("");
    let c = d.client().await;
    let long = "x".repeat(10_000);
    let err = c
        .create_session(with_init(&format!(
            "echo {long} >&2; echo the-end >&2; exit 3"
        )))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("SPAWN_FAILED"));
    let message = err.to_string();
    assert!(message.contains("exit status 3"), "{message}");
    assert!(
        message.contains("the-end"),
        "the last bytes of stderr: {message}"
    );
    assert!(
        message.len() < 4096 + 200,
        "at most 4 KiB of stderr: {}",
        message.len()
    );
    // Killed by its timeout (the session's default): SPAWN_FAILED too.
    let err = c
        .create_session(CreateParams {
            limits: Some(sessiond::protocol::SessionLimits {
                timeout_s: Some(0.3),
                ..Default::default()
            }),
            ..with_init("sleep 30")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("SPAWN_FAILED"));
    assert!(err.to_string().contains("timeout"), "{err}");
    assert!(c.list_sessions().await.unwrap().sessions.is_empty());
    // The registry counts a session's end when it hears of it from the
    // supervisor, after the answer: wait for that, then check the counts.
    wait_until_async(
        "the registry counts both ends",
        Duration::from_secs(10),
        || async {
            let sessions = c.stats().await.unwrap().sessions;
            sessions.active == 0 && sessions.rejected_total >= 2
        },
    )
    .await;
    let stats = c.stats().await.unwrap();
    assert_eq!(
        (stats.sessions.active, stats.sessions.created_total),
        (0, 0)
    );
    assert_eq!(stats.sessions.rejected_total, 2);
    support::wait_until("init's processes are gone", Duration::from_secs(10), || {
        support::tagged_pids(&d.tag).is_empty()
    });
    drop(c);
    d.stop();
}

/// An init takes a command slot like any command, and a slow init holds up
/// nobody else: another client's session runs commands meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn init_takes_a_slot_and_holds_up_nobody() {
    let d = TestDaemon::start("[commands]\nmax_concurrent = 2\n");
    let c = std::sync::Arc::new(d.client().await);
    let flag = d.work_dir().join("init-may-end");
    let slow = {
        let (c, flag) = (c.clone(), flag.clone());
        tokio::spawn(async move {
            c.create_session(with_init(&format!(
                "while [ ! -e {0} ]; do sleep 0.01; done",
                flag.display()
            )))
            .await
        })
    };
    support::wait_running(&c, 1).await;
    let other = c.create_session(CreateParams::default()).await.unwrap();
    expect(&c, &other, "echo meanwhile", "meanwhile\n", "").await;
    // Both slots taken (the slow init and a running command): an init is refused.
    let busy = c.start(sessiond::protocol::ExecParams {
        session_id: other.clone(),
        command: "sleep 30".into(),
        ..Default::default()
    });
    let busy = busy.await.unwrap();
    let err = c.create_session(with_init("true")).await.unwrap_err();
    assert_eq!(err.code(), Some("TOO_MANY_COMMANDS"), "{err}");
    c.cancel_command(&busy).await.unwrap();
    std::fs::write(&flag, b"").unwrap();
    let s = slow.await.unwrap().unwrap();
    expect(&c, &s, "echo ready", "ready\n", "").await;
    drop(c);
    d.stop();
}
