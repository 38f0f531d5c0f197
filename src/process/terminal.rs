//! Terminal state of a session (held by the SessionActor): the bash restore script fed to each command, the save trap, and the parser of what it saved.
//!
//! A command runs as `bash -c COMMAND bash`, so it is parsed and run at the
//! top level exactly as typed (`set -x` traces it with one `+`, errors read
//! `bash: line 1: …`). The state reaches the shell before the command through
//! `BASH_ENV=/dev/fd/62`: a memfd written by the daemon, which any command
//! user can reopen through /dev/fd (a memfd is mode 0777; a root-owned pipe
//! is not). The restore installs an EXIT trap that writes the state left by
//! the command, with builtins only, to fd 63 (a second memfd read by the
//! daemon once the shell has exited, so a background child holding it open
//! delays nothing). Every name of ours carries a per-command random nonce.
//!
//! What is carried, what is not and why: docs/protocol.md "Terminal state".

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use super::shell::EnvMap;

/// Fd at which the shell finds the restore script (closed by the restore itself).
pub const RESTORE_FD: i32 = 62;
/// Fd to which the save trap writes the state. High, so `exec 3>&-` and
/// friends in a command leave it alone.
pub const SAVE_FD: i32 = 63;
/// Fd of the code the save trap sources (a memfd the daemon wrote).
pub const SAVE_CODE_FD: i32 = 61;

/// Variables bash owns or that describe one shell process: never carried.
const BASH_OWNED: &[&str] = &[
    "BASH",
    "BASHOPTS",
    "BASHPID",
    "BASH_ALIASES",
    "BASH_ARGC",
    "BASH_ARGV",
    "BASH_ARGV0",
    "BASH_CMDS",
    "BASH_COMMAND",
    "BASH_EXECUTION_STRING",
    "BASH_LINENO",
    "BASH_REMATCH",
    "BASH_SOURCE",
    "BASH_SUBSHELL",
    "BASH_VERSINFO",
    "BASH_VERSION",
    "BASH_XTRACEFD",
    "COLUMNS",
    "DIRSTACK",
    "EPOCHREALTIME",
    "EPOCHSECONDS",
    "EUID",
    "FUNCNAME",
    "GROUPS",
    "HISTCMD",
    "HOSTNAME",
    "HOSTTYPE",
    "LINENO",
    "LINES",
    "MACHTYPE",
    "OSTYPE",
    "PIPESTATUS",
    "POSIXLY_CORRECT",
    "PPID",
    "PWD",
    "RANDOM",
    "SECONDS",
    "SHELLOPTS",
    "SHLVL",
    "SRANDOM",
    "UID",
    "_",
];

/// Variables whose assignment changes how bash parses or runs what follows:
/// restored after every other variable, just before the options.
const LATE: &[&str] = &["IFS", "LANG", "BASH_COMPAT", "FUNCNEST", "GLOBIGNORE"];

/// `set -o` options restored (the rest are bash's own business: `history`,
/// `monitor` and line editing need a terminal, `noexec` and `onecmd` would stop
/// the command itself, `privileged` cannot be set back, `posix` goes last).
const SET_OPTIONS: &[&str] = &[
    "allexport",
    "braceexpand",
    "errexit",
    "errtrace",
    "functrace",
    "hashall",
    "histexpand",
    "ignoreeof",
    "interactive-comments",
    "keyword",
    "noclobber",
    "noglob",
    "nolog",
    "notify",
    "nounset",
    "physical",
    "pipefail",
    "verbose",
    "xtrace",
];

/// `shopt` options restored (all but the read-only `login_shell` and `restricted_shell`).
const SHOPT_OPTIONS: &[&str] = &[
    "autocd",
    "assoc_expand_once",
    "cdable_vars",
    "cdspell",
    "checkhash",
    "checkjobs",
    "checkwinsize",
    "cmdhist",
    "compat31",
    "compat32",
    "compat40",
    "compat41",
    "compat42",
    "compat43",
    "compat44",
    "complete_fullquote",
    "direxpand",
    "dirspell",
    "dotglob",
    "execfail",
    "expand_aliases",
    "extdebug",
    "extglob",
    "extquote",
    "failglob",
    "force_fignore",
    "globasciiranges",
    "globskipdots",
    "globstar",
    "gnu_errfmt",
    "histappend",
    "histreedit",
    "histverify",
    "hostcomplete",
    "huponexit",
    "inherit_errexit",
    "interactive_comments",
    "lastpipe",
    "lithist",
    "localvar_inherit",
    "localvar_unset",
    "mailwarn",
    "no_empty_cmd_completion",
    "nocaseglob",
    "nocasematch",
    "noexpand_translation",
    "nullglob",
    "patsub_replacement",
    "progcomp",
    "progcomp_alias",
    "promptvars",
    "shift_verbose",
    "sourcepath",
    "varredir_close",
    "xpg_echo",
];

/// Traps that fire on our own restore code if installed early: set last, in the final function.
const LATE_TRAPS: &[&[u8]] = &[b"DEBUG", b"ERR", b"RETURN"];

/// One carried variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Var {
    /// A `declare` statement that recreates it (as `declare -p` prints it).
    pub decl: Vec<u8>,
    /// Its value, when it is a scalar (what a POSIX sh can carry).
    pub value: Option<Vec<u8>>,
    pub exported: bool,
}

/// Everything a session carries from one command to the next.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TerminalState {
    pub cwd: PathBuf,
    pub vars: BTreeMap<Vec<u8>, Var>,
    /// `declare -f` output: every function's definition.
    pub functions: Vec<u8>,
    /// Names of every function (`declare -F`).
    pub function_names: Vec<Vec<u8>>,
    /// Names of exported and of read-only functions.
    pub exported_functions: Vec<Vec<u8>>,
    pub readonly_functions: Vec<Vec<u8>>,
    /// Alias name → its value as `alias -p` quotes it.
    pub aliases: Vec<(Vec<u8>, Vec<u8>)>,
    /// (action as quoted by `trap -p`, signal name), EXIT excluded.
    pub traps: Vec<(Vec<u8>, Vec<u8>)>,
    /// The directory stack below the cwd (DIRSTACK[1..]), as quoted words.
    pub dirstack: Vec<Vec<u8>>,
    /// `umask` output, e.g. "0022"; `None` keeps the spawn's default.
    pub umask: Option<Vec<u8>>,
    /// `$?` left by the last command.
    pub status: u8,
    /// Enabled `set -o` options and `shopt` options; `None` before any command ran.
    pub set_options: Option<Vec<Vec<u8>>>,
    pub shopt_options: Option<Vec<Vec<u8>>>,
    /// Size of the report it was parsed from (what the cap is charged with).
    pub bytes: usize,
}

impl TerminalState {
    /// A new session's state: its cwd and environment, aliases expanded (as at a prompt).
    pub fn new(cwd: PathBuf, env: &EnvMap) -> TerminalState {
        let vars = env
            .iter()
            .map(|(k, v)| (k.clone(), exported_var(k, v)))
            .collect();
        TerminalState {
            cwd,
            vars,
            ..TerminalState::default()
        }
    }

    /// The exported scalar variables: the environment a POSIX sh starts with.
    pub fn env(&self) -> EnvMap {
        self.vars
            .iter()
            .filter(|(_, v)| v.exported)
            .filter_map(|(k, v)| Some((k.clone(), v.value.clone()?)))
            .collect()
    }
}

/// What a fresh `bash -c` has before the restore runs: the variables bash
/// sets itself and its `set -o` and `shopt` options. The restore leaves out
/// what would set a value back to itself: a `declare` costs bash ~30 000
/// instructions and the full `shopt`/`set` lists ~800 000, more than the
/// whole shell start (docs/benchmarks.md "Terminal state").
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ShellDefaults {
    /// Name → the `declare -p` line of each variable a fresh shell has.
    vars: BTreeMap<Vec<u8>, Vec<u8>>,
    set_on: BTreeSet<Vec<u8>>,
    shopt_on: BTreeSet<Vec<u8>>,
    /// The umask commands start with (the daemon's own).
    umask: Vec<u8>,
    /// The shell's builtins (`compgen -b`) and reserved words (`compgen -k`).
    builtins: BTreeSet<Vec<u8>>,
    keywords: BTreeSet<Vec<u8>>,
}

/// Defaults that depend on who runs the shell (bash sets SHELL from the
/// user's passwd entry): always restored.
const PER_USER_DEFAULTS: &[&str] = &["SHELL", "HOME"];

/// Variables of the request's environment that change a fresh shell's
/// options before the restore runs: with one of them, nothing is assumed.
const OPTION_ENV: &[&str] = &["SHELLOPTS", "BASHOPTS", "POSIXLY_CORRECT"];

impl ShellDefaults {
    /// The defaults of `shell`, probed once per shell path for the daemon's
    /// lifetime (one `bash -c` run, off the async workers). `None` when the
    /// probe fails: the restore then sets everything.
    pub async fn of(shell: &std::path::Path) -> Option<std::sync::Arc<ShellDefaults>> {
        type Cache = std::sync::Mutex<Vec<(PathBuf, Option<std::sync::Arc<ShellDefaults>>)>>;
        static CACHE: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        let cached = |cache: &Cache| {
            let list = cache.lock().unwrap_or_else(|e| e.into_inner());
            list.iter()
                .find(|(p, _)| p == shell)
                .map(|(_, d)| d.clone())
        };
        if let Some(found) = cached(cache) {
            return found;
        }
        let path = shell.to_path_buf();
        let Ok(Some(probed)) =
            tokio::task::spawn_blocking(move || ShellDefaults::probe(&path)).await
        else {
            // Not run, or not waited for (the periodic sweep may reap a child
            // outside the process table first): not an answer to keep.
            return None;
        };
        let probed = probed.map(std::sync::Arc::new);
        let mut list = cache.lock().unwrap_or_else(|e| e.into_inner());
        // The shell is the daemon's (`commands.shell`): one entry, a few at most.
        if list.len() < 8 && !list.iter().any(|(p, _)| p == shell) {
            list.push((shell.to_path_buf(), probed.clone()));
        }
        probed
    }

    /// Runs `shell` as a command's shell starts (empty environment, no
    /// BASH_ENV) and reads its variables and options: `Some(None)` when the
    /// shell ran and its answer is unusable (kept: the restore then sets
    /// everything), `None` when it could not be run or waited for (tried
    /// again at the next command).
    fn probe(shell: &std::path::Path) -> Option<Option<ShellDefaults>> {
        let out = std::process::Command::new(shell)
            .env_clear()
            .env("PWD", "/")
            .current_dir("/")
            .args([
                "-c",
                // `compgen` is missing from a bash built without programmable
                // completion: its lists are then empty, and `:` keeps the status.
                "declare -p; printf '\\0%s\\0%s\\0' \"$SHELLOPTS\" \"$BASHOPTS\"; umask; printf '\\0'; compgen -b; printf '\\0'; compgen -k; :",
            ])
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return Some(None);
        }
        Some(Self::parse_probe(&out.stdout))
    }

    /// What the probe printed, read into defaults (`None` if malformed).
    fn parse_probe(stdout: &[u8]) -> Option<ShellDefaults> {
        let mut parts = stdout.split(|b| *b == 0);
        let (vars, set_on, shopt_on) = (parts.next()?, parts.next()?, parts.next()?);
        let (umask, builtins, keywords) = (parts.next()?, parts.next()?, parts.next()?);
        let lines = |list: &[u8]| -> BTreeSet<Vec<u8>> {
            list.split(|b| *b == b'\n')
                .filter(|w| !w.is_empty())
                .map(<[u8]>::to_vec)
                .collect()
        };
        let mut defaults = ShellDefaults {
            set_on: split_colon(set_on).into_iter().collect(),
            shopt_on: split_colon(shopt_on).into_iter().collect(),
            umask: umask.strip_suffix(b"\n").unwrap_or(umask).to_vec(),
            builtins: lines(builtins),
            keywords: lines(keywords),
            ..ShellDefaults::default()
        };
        for line in shell_lines(vars)? {
            let entry = parse_declare(line)?;
            let owned = BASH_OWNED.iter().any(|o| o.as_bytes() == entry.name);
            let per_user = PER_USER_DEFAULTS.iter().any(|o| o.as_bytes() == entry.name);
            if !owned && !per_user {
                defaults.vars.insert(entry.name.to_vec(), line.to_vec());
            }
        }
        Some(defaults)
    }

    /// Whether a fresh shell has `name` without attributes, or not at all
    /// (so a plain assignment, or the environment, gives it as it was).
    fn has_plain(&self, name: &[u8]) -> bool {
        self.vars
            .get(name)
            .is_none_or(|fresh| fresh.starts_with(b"declare -- "))
    }

    /// Whether the probe listed the builtins and reserved words (a bash
    /// without `compgen` does not).
    pub fn knows_commands(&self) -> bool {
        !self.builtins.is_empty() && !self.keywords.is_empty()
    }

    /// Whether `name` is one of the shell's builtins.
    pub fn is_builtin(&self, name: &[u8]) -> bool {
        self.builtins.contains(name)
    }

    /// Whether `name` is one of the shell's reserved words (`if`, `[[`, `{`…).
    pub fn is_keyword(&self, name: &[u8]) -> bool {
        self.keywords.contains(name)
    }
}

/// A `declare -x NAME=$'…'` for an environment variable.
pub fn exported_var(name: &[u8], value: &[u8]) -> Var {
    let mut decl = b"declare -x ".to_vec();
    decl.extend_from_slice(name);
    decl.push(b'=');
    decl.extend_from_slice(&ansi_c_quote(value));
    Var {
        decl,
        value: Some(value.to_vec()),
        exported: true,
    }
}

/// `$'…'` quoting of any bytes (never a NUL in a shell value).
fn ansi_c_quote(value: &[u8]) -> Vec<u8> {
    let mut out = b"$'".to_vec();
    for &b in value {
        match b {
            b'\\' | b'\'' => {
                out.push(b'\\');
                out.push(b);
            }
            0x20..=0x7e => out.push(b),
            _ => out.extend_from_slice(format!("\\{b:03o}").as_bytes()),
        }
    }
    out.push(b'\'');
    out
}

/// A fresh random nonce for the names one command's wrapper uses.
pub fn nonce() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    id[..16].to_string()
}

/// The EXIT trap: it captures `$?`, the options and the cwd and turns on
/// posix mode (assigning POSIXLY_CORRECT), in which `.`, `set`, `export`,
/// `readonly` and `trap` are found before functions, all in one assignment —
/// no command a function or alias could take over — lists the traps (here:
/// `.` hides a DEBUG trap from the file it sources; `trap` without `-p`,
/// which in posix mode would list all 64 signals) and sources the
/// [`save_code`] at [`SAVE_CODE_FD`] with stdout, stderr and xtrace on
/// /dev/null (a DEBUG trap of the command's fires before each command until
/// the code has reset it: its output must go nowhere). The code sits in a file rather than in the trap, so
/// bash lexes it once, at exit, instead of also when the trap is set (it
/// costs bash ~250 instructions a byte).
fn save_trap(n: &str) -> String {
    format!(
        "{{ __sd_{n}_s=$? __sd_{n}_o=$SHELLOPTS __sd_{n}_b=$BASHOPTS __sd_{n}_w=$PWD POSIXLY_CORRECT=y; \\trap >&{SAVE_FD}; \\. /dev/fd/{SAVE_CODE_FD}; }} >/dev/null 2>&1 {{BASH_XTRACEFD}}>/dev/null"
    )
}

/// What the EXIT trap sources to write the state. A sourced file is parsed
/// one command at a time, so the alias it defines first applies to the lines
/// after it: `__sd_N_c` expands to `builtin`, or to nothing when `builtin`
/// itself is a user function (then `declare` and the rest are called
/// directly). `\name` keeps user aliases out. It resets the command's
/// DEBUG, ERR and RETURN traps before it sends stdout to [`SAVE_FD`] (until
/// then a DEBUG trap's output goes to /dev/null). Function attributes are
/// listed before `export -f builtin` (which exports that function) runs.
/// Every line before the one NUL is known by how it starts (see
/// [`parse_save`]), so no separators are printed between them; the function
/// definitions, which may hold any line, come after it.
pub fn save_code(n: &str) -> Vec<u8> {
    let b = format!("__sd_{n}_c");
    format!(
        "\\set +xvCeu\n\\trap - ERR DEBUG RETURN\n\\exec >&{SAVE_FD}\n\\export -f\n\\readonly -f\n\
         BASH_ALIASES[{b}]=builtin\n\\export -f builtin && BASH_ALIASES[{b}]=\n\
         {b} declare -p\n{b} declare -p DIRSTACK\n{b} declare -F\n{b} alias -p\n{b} umask\n\
         {b} printf '\\0'\n{b} declare -f\n{b} printf '\\0%s-end\\0' {n}\n"
    )
    .into_bytes()
}

/// Single-quotes `s` for the shell.
pub(super) fn single_quote(s: &[u8]) -> Vec<u8> {
    let mut out = vec![b'\''];
    for &b in s {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
    out
}

/// The restore of one command, and whether a command that keeps the state
/// (`save` false) can start without it.
#[derive(Debug)]
pub struct Restore {
    /// What bash reads through `BASH_ENV`.
    pub script: Vec<u8>,
    /// `Some` when, of the state, the script would restore only what such a
    /// command cannot see: `$?` (it expands nothing), `expand_aliases`
    /// with no alias, and the variables already in its environment — and an
    /// absolute `OLDPWD`, which may come in the environment too when it
    /// names a directory (bash drops it at start otherwise).
    pub bare: Option<Bare>,
}

/// A start without the restore (see [`Restore::bare`] and [`bare_command`]).
#[derive(Debug, PartialEq, Eq)]
pub struct Bare {
    /// The state's exported, absolute `OLDPWD`, for the environment if it
    /// is a directory.
    pub oldpwd: Option<Vec<u8>>,
}

/// What keeps bash from exec'ing a lone command in its own place when no
/// restore sets it: the command then runs in a child and ends as on the
/// full path (a signal's death is reported by the shell, `$$` is the
/// shell's). On the command's own line, so its errors still read `line 1`.
const EMPTY_EXIT_TRAP: &str = "trap -- '' EXIT";

/// The `-c` string of a command started bare: `command` after the empty
/// EXIT trap; `None` when that would be longer than exec takes (the command
/// then starts with the restore, as its own length allows).
pub fn bare_command(command: &str) -> Option<String> {
    let bare = format!("{EMPTY_EXIT_TRAP}; {command}");
    (bare.len() <= super::shell::MAX_ARG_BYTES).then_some(bare)
}

/// The restore script for the next command, which `bash` reads through
/// `BASH_ENV` before the command. `skip` names the variables the request's own
/// `env` sets for this command (they come from the environment instead).
/// With the shell's `defaults`, what a fresh shell already has is left out
/// and variables of a fresh shell that the state no longer has are unset.
///
/// Order, so that nothing restored can break the restore: first what only
/// builtins do (umask, directory stack, shopt, traps that cannot fire now, our
/// EXIT trap), then variables (those that change parsing — IFS, LANG, LC_*,
/// BASH_COMPAT, FUNCNEST, GLOBIGNORE — last), aliases by assignment to
/// BASH_ALIASES (no command a function could take over), the functions, their
/// attributes in posix mode; last a function of ours that sets DEBUG, ERR and
/// RETURN traps and the `set -o` options (errexit, nounset, xtrace…) and
/// returns the carried `$?`, with its stderr (where xtrace goes) on /dev/null.
/// Posix mode (so that `set`, `unset`, `export`… are found before functions)
/// is entered only when the state has functions, and that function only
/// when there is something for it to do. `save` false: a command that keeps
/// the state (no save trap), which may then start bare ([`Restore::bare`]).
pub fn restore(
    state: &TerminalState,
    n: &str,
    skip: &EnvMap,
    defaults: Option<&ShellDefaults>,
    save: bool,
) -> Restore {
    // Whether the script restores something a plain command could see.
    let mut visible = save;
    let mut oldpwd = None;
    let option_env = OPTION_ENV.iter().any(|k| skip.contains_key(k.as_bytes()));
    let defaults = defaults.filter(|_| !option_env);
    let mut s: Vec<u8> = Vec::with_capacity(state.bytes + 4096);
    s.extend_from_slice(format!("{{\nunset BASH_ENV\nexec {RESTORE_FD}<&-\n").as_bytes());
    if let Some(umask) = &state.umask {
        let unchanged = defaults.is_some_and(|d| &d.umask == umask);
        if umask.iter().all(u8::is_ascii_digit) && !unchanged {
            visible = true;
            s.extend_from_slice(b"umask ");
            s.extend_from_slice(umask);
            s.push(b'\n');
        }
    }
    for dir in state.dirstack.iter().rev() {
        visible = true;
        s.extend_from_slice(b"pushd -n ");
        s.extend_from_slice(dir);
        s.push(b'\n');
    }
    match &state.shopt_options {
        // A new session: aliases defined in one command work in the next, as at a prompt.
        None => s.extend_from_slice(b"shopt -s expand_aliases\n"),
        Some(on) => {
            let on = on.iter().cloned().collect();
            let (set, unset) = option_changes(SHOPT_OPTIONS, &on, defaults.map(|d| &d.shopt_on));
            // With no alias, a plain command's words expand the same either way.
            visible |= !unset.is_empty() || set.iter().any(|o| *o != "expand_aliases");
            for (cmd, names) in [("shopt -s", set), ("shopt -u", unset)] {
                if !names.is_empty() {
                    s.extend_from_slice(format!("{cmd} {}\n", names.join(" ")).as_bytes());
                }
            }
        }
    }
    visible |= !state.traps.is_empty() || !state.aliases.is_empty();
    for (action, signal) in &state.traps {
        if !LATE_TRAPS.contains(&signal.as_slice()) {
            push_trap(&mut s, action, signal, "");
        }
    }
    if save {
        s.extend_from_slice(b"trap -- ");
        s.extend_from_slice(&single_quote(save_trap(n).as_bytes()));
        s.extend_from_slice(b" EXIT\n");
    } else {
        // A command that cannot change the state (super::simple_command):
        // an empty EXIT trap still keeps bash from exec'ing it in its place,
        // so it runs and ends as on the full path.
        s.extend_from_slice(format!("{EMPTY_EXIT_TRAP}\n").as_bytes());
    }
    let is_late = |k: &[u8]| LATE.iter().any(|l| l.as_bytes() == k) || k.starts_with(b"LC_");
    let unchanged =
        |name: &[u8], var: &Var| defaults.is_some_and(|d| d.vars.get(name) == Some(&var.decl));
    // Only a saved state knows what the command unset; a new one has the env only.
    let gone: Vec<&Vec<u8>> = match (defaults, &state.set_options) {
        (Some(d), Some(_)) => d
            .vars
            .keys()
            .filter(|k| !state.vars.contains_key(*k) && !skip.contains_key(*k))
            .collect(),
        _ => Vec::new(),
    };
    let mut exports: Vec<&[u8]> = Vec::new();
    for late in [false, true] {
        for (name, var) in &state.vars {
            if is_late(name) == late && !skip.contains_key(name) && !unchanged(name, var) {
                // Only an absolute OLDPWD: bash resolves a relative one from
                // its cwd, where the daemon cannot check it.
                match (name.as_slice(), &var.value) {
                    (b"OLDPWD", Some(value))
                        if var.decl.starts_with(b"declare -x ") && value.starts_with(b"/") =>
                    {
                        oldpwd = Some(value.clone());
                    }
                    _ => visible = true,
                }
                // A variable with no attribute but export, which a fresh shell
                // has without attributes or not at all, is a plain assignment:
                // bash runs one in a third of the time of a `declare` (2 000 of
                // them: 33 vs 80 million instructions); one `export` names them all.
                let plain = defaults.is_some_and(|d| d.has_plain(name));
                match plain_assignment(name, &var.decl).filter(|_| plain) {
                    Some((assignment, exported)) => {
                        s.extend_from_slice(assignment);
                        if exported {
                            exports.push(name);
                        }
                    }
                    None => s.extend_from_slice(&var.decl),
                }
                s.push(b'\n');
            }
        }
        for name in gone.iter().filter(|k| is_late(k) == late) {
            visible = true;
            s.extend_from_slice(b"unset ");
            s.extend_from_slice(name);
            s.push(b'\n');
        }
    }
    if !exports.is_empty() {
        s.extend_from_slice(b"export");
        for name in exports {
            s.push(b' ');
            s.extend_from_slice(name);
        }
        s.push(b'\n');
    }
    for (name, value) in &state.aliases {
        s.extend_from_slice(b"BASH_ALIASES[");
        s.extend_from_slice(&single_quote(name));
        s.extend_from_slice(b"]=");
        s.extend_from_slice(value);
        s.push(b'\n');
    }
    visible |= !state.functions.is_empty();
    s.extend_from_slice(&state.functions);
    // `:` so that `$?` is 0 when nothing below sets it.
    s.extend_from_slice(b"\n:\n} >/dev/null 2>&1\n");
    // Without user functions nothing can take over `set` or `return`: no posix mode.
    let posix_mode = !state.function_names.is_empty();
    if posix_mode {
        s.extend_from_slice(b"POSIXLY_CORRECT=y\n");
    }
    for (list, cmd) in [
        (&state.exported_functions, "\\export -f"),
        (&state.readonly_functions, "\\readonly -f"),
    ] {
        if !list.is_empty() {
            s.extend_from_slice(cmd.as_bytes());
            for name in list {
                s.push(b' ');
                s.extend_from_slice(name);
            }
            s.extend_from_slice(b" 2>/dev/null\n");
        }
    }
    // Late traps and `set -o` options go last, in a function of ours.
    let mut options: Vec<u8> = Vec::new();
    for (action, signal) in &state.traps {
        if LATE_TRAPS.contains(&signal.as_slice()) {
            push_trap(&mut options, action, signal, "\\");
        }
    }
    let mut posix = false;
    if let Some(on) = &state.set_options {
        let on: BTreeSet<Vec<u8>> = on.iter().cloned().collect();
        posix = on.contains(&b"posix"[..]);
        let (set, unset) = option_changes(SET_OPTIONS, &on, defaults.map(|d| &d.set_on));
        if !set.is_empty() || !unset.is_empty() {
            options.extend_from_slice(b"\\set");
            for (sign, names) in [(" -o ", set), (" +o ", unset)] {
                for name in names {
                    options.extend_from_slice(sign.as_bytes());
                    options.extend_from_slice(name.as_bytes());
                }
            }
            options.push(b'\n');
        }
    }
    // `$?` alone is nothing a plain command sees.
    visible |= !options.is_empty() || posix_mode || posix;
    let bare = (!visible).then_some(Bare { oldpwd });
    if options.is_empty() && !posix_mode && !posix && state.status == 0 {
        return Restore { script: s, bare };
    }
    s.extend_from_slice(format!("__sd_{n}_fin() {{\n").as_bytes());
    s.extend_from_slice(&options);
    // Still in posix mode, where `unset` is found before a function of that name.
    s.extend_from_slice(format!("\\unset -f __sd_{n}_fin\n").as_bytes());
    if posix_mode {
        s.extend_from_slice(b"\\unset POSIXLY_CORRECT\n");
    }
    if posix {
        s.extend_from_slice(b"\\set -o posix\n");
    }
    if posix_mode {
        // Leaving posix mode resets these two; set them back as they were (a new
        // session has aliases expanded). Through `builtin` unless that is a function.
        let on = |o: &str| match &state.shopt_options {
            None => o == "expand_aliases",
            Some(list) => list.iter().any(|x| x == o.as_bytes()),
        };
        let reset: Vec<&str> = ["expand_aliases", "shift_verbose"]
            .into_iter()
            .filter(|o| on(o))
            .collect();
        if !reset.is_empty() {
            let shadowed = state.function_names.iter().any(|f| f == b"builtin");
            let prefix = if shadowed { "\\" } else { "\\builtin " };
            s.extend_from_slice(format!("{prefix}shopt -s {}\n", reset.join(" ")).as_bytes());
        }
    }
    // Called on the left of `&&`: a non-zero `$?` to carry trips neither
    // errexit nor ERR; the right side's trace (xtrace is on by then) and what
    // a restored DEBUG or RETURN trap prints on our lines go to /dev/null.
    s.extend_from_slice(
        format!(
            "\\return {}\n}} >/dev/null 2>&1\n__sd_{n}_fin && {{ :; }} >/dev/null 2>&1\n",
            state.status
        )
        .as_bytes(),
    );
    Restore { script: s, bare }
}

/// `NAME=VALUE` out of a `declare -- NAME=VALUE` or `declare -x NAME=VALUE`
/// line (with whether it is exported); `None` for any other attribute or a
/// variable declared without a value.
fn plain_assignment<'a>(name: &[u8], decl: &'a [u8]) -> Option<(&'a [u8], bool)> {
    let (rest, exported) = match decl.strip_prefix(b"declare -- ") {
        Some(rest) => (rest, false),
        None => (decl.strip_prefix(b"declare -x ")?, true),
    };
    let value_follows = rest.strip_prefix(name)?.first() == Some(&b'=');
    value_follows.then_some((rest, exported))
}

/// Variables that never reach bash in its environment at exec: names bash
/// acts on when it finds them there at start otherwise than when the
/// restore assigns and exports them (`SSH_CLIENT` makes Debian's bash read
/// `~/.bashrc` instead of `BASH_ENV`, `POSIX_PEDANTIC` starts it in posix
/// mode, `EXECIGNORE` and `CHILD_MAX` apply only when assigned, an invalid
/// `LC_ALL` prints a warning at start, `OLDPWD` is dropped when it names no
/// directory), the variables bash reads for itself, and those glibc reads
/// from the wrapper shell's own environment, where an assignment does not
/// reach (`LANGUAGE` translates bash's own messages, `GLIBC_TUNABLES`,
/// `LOCPATH`…; see also [`NOT_FROM_ENV_PREFIXES`]). They go through the
/// restore script.
const NOT_FROM_ENV: &[&str] = &[
    "BASHOPTS",
    "CDPATH",
    "CHILD_MAX",
    "EMACS",
    "ENV",
    "EXECIGNORE",
    "FCEDIT",
    "FIGNORE",
    "FUNCNEST",
    "GCONV_PATH",
    "GLIBC_TUNABLES",
    "GLOBIGNORE",
    "GLOBSORT",
    "HOSTALIASES",
    "HOSTFILE",
    "IFS",
    "IGNOREEOF",
    "INPUTRC",
    "INSIDE_EMACS",
    "LANGUAGE",
    "LC_ALL",
    "LIBC_FATAL_STDERR_",
    "LOCALDOMAIN",
    "LOCPATH",
    "MAIL",
    "MAILCHECK",
    "MAILPATH",
    "NLSPATH",
    "OLDPWD",
    "OPTARG",
    "OPTERR",
    "OPTIND",
    "OUTPUT_CHARSET",
    "POSIXLY_CORRECT",
    "POSIX_PEDANTIC",
    "PROMPT_COMMAND",
    "PROMPT_DIRTRIM",
    "PS0",
    "PS1",
    "PS2",
    "PS3",
    "PS4",
    "PWD",
    "REPLY",
    "RES_OPTIONS",
    "SHELLOPTS",
    "SHLVL",
    "SSH2_CLIENT",
    "SSH_CLIENT",
    "TERMCAP",
    "TERMINFO",
    "TEXTDOMAIN",
    "TEXTDOMAINDIR",
    "TIMEFORMAT",
    "TMOUT",
    "TZDIR",
    "auto_resume",
    "histchars",
    "ignoreeof",
];

/// Prefixes of names that never reach bash in its environment (see
/// [`NOT_FROM_ENV`]): bash's own, completion, readline and history
/// variables, the loader's and malloc's.
const NOT_FROM_ENV_PREFIXES: &[&str] = &["BASH", "COMP_", "READLINE_", "HIST", "LD_", "MALLOC_"];

/// Whether a variable named `name` of the state may reach bash in its
/// environment instead of through the restore script: bash then imports it
/// exactly as the restore's assignment and `export` would set it. Locale
/// variables are decided together, in [`exec_env`].
fn may_come_from_env(name: &[u8]) -> bool {
    let Ok(name) = std::str::from_utf8(name) else {
        return false;
    };
    super::shell::is_variable_name(name.as_bytes())
        && !NOT_FROM_ENV.contains(&name)
        && !BASH_OWNED.contains(&name)
        && !NOT_FROM_ENV_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// `LANG` and glibc's locale categories (`LC_ALL` never comes in the
/// environment; an `LC_TERMINAL` is an ordinary variable).
const LOCALE_VARS: &[&str] = &[
    "LANG",
    "LC_ADDRESS",
    "LC_COLLATE",
    "LC_CTYPE",
    "LC_IDENTIFICATION",
    "LC_MEASUREMENT",
    "LC_MESSAGES",
    "LC_MONETARY",
    "LC_NAME",
    "LC_NUMERIC",
    "LC_PAPER",
    "LC_TELEPHONE",
    "LC_TIME",
];

fn is_locale_var(name: &[u8]) -> bool {
    LOCALE_VARS.iter().any(|l| l.as_bytes() == name)
}

/// Longest locale name asked of glibc; how many answers are kept (the
/// oldest goes first), and for how long (a locale installed or removed
/// since is seen within it). The values come from clients: a name past the
/// bound is taken as not installed (its variables then go through the
/// script, as before), and one client's names can push out others' answers
/// but not grow the cache.
const LOCALE_NAME_MAX: usize = 128;
const LOCALES_KNOWN_MAX: usize = 32;
const LOCALE_ANSWER_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether `value` names a locale bash finds at start as an assignment would:
/// C, POSIX, or an installed UTF-8 locale. Only UTF-8 among the rest, so the
/// restore, then parsed in that locale, reads as in the C locale (a multibyte
/// encoding such as SJIS has `\` as a second byte). Installed means glibc's
/// `newlocale` finds it, as bash's own `setlocale` would (not when the
/// daemon itself runs with a `LOCPATH`, which bash would not have).
fn locale_installed(value: &[u8]) -> bool {
    if matches!(value, b"C" | b"POSIX") {
        return true;
    }
    let codeset = value.rsplit(|b| *b == b'.').next().unwrap_or_default();
    let codeset = codeset.split(|b| *b == b'@').next().unwrap_or_default();
    let utf8 = codeset.eq_ignore_ascii_case(b"utf-8") || codeset.eq_ignore_ascii_case(b"utf8");
    if !utf8 || !value.contains(&b'.') || value.len() > LOCALE_NAME_MAX {
        return false;
    }
    type Answer = (Vec<u8>, bool, std::time::Instant);
    static KNOWN: std::sync::Mutex<Vec<Answer>> = std::sync::Mutex::new(Vec::new());
    let fresh = |(v, _, at): &Answer| v == value && at.elapsed() < LOCALE_ANSWER_AGE;
    let Ok(known) = KNOWN.lock() else {
        return false;
    };
    if let Some((_, installed, _)) = known.iter().find(|a| fresh(a)) {
        return *installed;
    }
    drop(known);
    // Asked without the lock: glibc reads the locale's files.
    let installed = std::env::var_os("LOCPATH").is_none() && newlocale_finds(value);
    if let Ok(mut known) = KNOWN.lock() {
        known.retain(|(v, _, _)| v != value);
        if known.len() >= LOCALES_KNOWN_MAX {
            known.remove(0);
        }
        known.push((value.to_vec(), installed, std::time::Instant::now()));
    }
    installed
}

/// Whether glibc's `newlocale` loads the locale `name` for every category.
fn newlocale_finds(name: &[u8]) -> bool {
    let Ok(name) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated name and no base locale; the locale
    // object, when there is one, is freed at once.
    unsafe {
        let locale = libc::newlocale(libc::LC_ALL_MASK, name.as_ptr(), std::ptr::null_mut());
        !locale.is_null() && {
            libc::freelocale(locale);
            true
        }
    }
}

/// All variables passed in the environment, at most this long together
/// (`NAME=value` each): exec refuses an environment over a quarter of the
/// stack limit (E2BIG); what does not fit goes through the script, which
/// has no such limit.
const EXEC_ENV_TOTAL: usize = 16 * 1024;

/// The state's variables that go to bash in its environment at exec instead
/// of through the restore script (pass them as the restore's `skip`): the
/// plain exported scalars, with no attribute a fresh shell would not give
/// them, that [`may_come_from_env`]. Bash imports them for less than it
/// parses an assignment, with `SHELL` set it does not look up the user's
/// passwd entry at start (~90 µs of `exec.run true`, docs/benchmarks.md),
/// and a session whose variables all come this way can start a plain
/// command with no restore at all ([`Restore::bare`]). `skip` names (the
/// request's `env`) are left to the caller; without probed defaults
/// nothing is passed (the restore then sets everything).
pub fn exec_env(state: &TerminalState, skip: &EnvMap, defaults: Option<&ShellDefaults>) -> EnvMap {
    let mut env = EnvMap::new();
    let Some(defaults) = defaults else {
        return env;
    };
    let mut total = 0;
    let size = |name: &[u8], value: &[u8]| name.len() + 1 + value.len();
    let mut fits = |size: usize| {
        let fits = total + size <= EXEC_ENV_TOTAL;
        if fits {
            total += size;
        }
        fits
    };
    let mut locales = Vec::new();
    for (name, var) in &state.vars {
        let Some(value) = var.value.as_ref() else {
            continue;
        };
        if !may_come_from_env(name)
            || !defaults.has_plain(name)
            || skip.contains_key(name)
            || !matches!(plain_assignment(name, &var.decl), Some((_, true)))
        {
            continue;
        }
        if is_locale_var(name) {
            locales.push((name, value));
        } else if fits(size(name, value)) {
            env.insert(name.to_vec(), value.clone());
        }
    }
    // Locale variables come all or none: bash's start-up `setlocale(LC_ALL,
    // "")` fails as a whole if one of those in its environment (the
    // request's too) names a locale not installed, and then keeps C for every
    // category, where assignments set each category on its own. A request's
    // LOCPATH would change where that start-up call looks.
    let request_locales = skip.iter().filter(|(k, _)| is_locale_var(k));
    let all_installed = !skip.contains_key(&b"LOCPATH"[..])
        && locales
            .iter()
            .map(|(_, v)| v.as_slice())
            .chain(request_locales.map(|(_, v)| v.as_slice()))
            .all(locale_installed);
    if all_installed && fits(locales.iter().map(|(n, v)| size(n, v)).sum()) {
        env.extend(locales.into_iter().map(|(n, v)| (n.clone(), v.clone())));
    }
    env
}

/// The options of `all` to turn on and to turn off so that exactly `on` are
/// on, given those on already (`None`: unknown, so every one is set).
fn option_changes(
    all: &[&'static str],
    on: &BTreeSet<Vec<u8>>,
    already: Option<&BTreeSet<Vec<u8>>>,
) -> (Vec<&'static str>, Vec<&'static str>) {
    let (mut set, mut unset) = (Vec::new(), Vec::new());
    for name in all {
        let want = on.contains(name.as_bytes());
        if already.is_some_and(|a| a.contains(name.as_bytes()) == want) {
            continue;
        }
        if want {
            set.push(*name);
        } else {
            unset.push(*name);
        }
    }
    (set, unset)
}

fn push_trap(s: &mut Vec<u8>, action: &[u8], signal: &[u8], prefix: &str) {
    s.extend_from_slice(prefix.as_bytes());
    s.extend_from_slice(b"trap -- ");
    s.extend_from_slice(action);
    s.push(b' ');
    s.extend_from_slice(signal);
    s.push(b'\n');
}

/// Why a saved state was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error(
        "the terminal state reached {size} bytes, over sessions.max_state_bytes ({limit}); the session keeps its previous state"
    )]
    TooLarge { size: usize, limit: usize },
    #[error("the terminal state could not be read ({0}); the session keeps its previous state")]
    Malformed(&'static str),
}

/// Parses what the save trap of the command with nonce `n` wrote. `Ok(None)`
/// when it wrote nothing (a documented exception: own EXIT trap, `exec`,
/// `set -n`, `enable -n`); the session then keeps its state.
pub fn parse_save(report: &[u8], n: &str) -> Result<Option<TerminalState>, StateError> {
    if report.is_empty() {
        return Ok(None);
    }
    let malformed = StateError::Malformed;
    let end_marker = format!("\0{n}-end\0");
    let body = match find(report, end_marker.as_bytes()) {
        Some(i) => &report[..i],
        // A dump cut short (the shell was killed while writing, or a builtin was disabled).
        None => return Ok(None),
    };
    // One listing of logical lines, each known by how it starts (traps,
    // function attributes, variables, function names, aliases, the umask),
    // then a NUL and the function definitions, which may hold any line.
    let split = body
        .iter()
        .position(|b| *b == 0)
        .ok_or(malformed("no functions"))?;
    let (listing, functions) = (&body[..split], &body[split + 1..]);
    let mut state = TerminalState {
        bytes: report.len(),
        functions: functions.to_vec(),
        ..TerminalState::default()
    };
    let (mut vars, mut aliases, mut umask) = (Vec::new(), Vec::new(), None);
    for line in shell_lines(listing).ok_or(malformed("listing"))? {
        // `declare -F`: `declare -f[r][x] NAME` (no variable has the f attribute).
        if let Some(rest) = line.strip_prefix(b"declare -f") {
            let name = rest
                .iter()
                .position(|b| *b == b' ')
                .map(|i| &rest[i + 1..])
                .ok_or(malformed("function names"))?;
            state.function_names.push(name.to_vec());
        } else if line.starts_with(b"declare -") {
            vars.push(line);
        } else if line.starts_with(b"alias ") {
            aliases.push(line);
        } else if line.iter().all(u8::is_ascii_digit) {
            umask = Some(line);
        } else {
            let words = words(line).ok_or(malformed("traps"))?;
            match words.as_slice() {
                [t, dd, action, signal] if t == b"trap" && dd == b"--" => {
                    if action != b"-" && signal != b"EXIT" {
                        state.traps.push((action.to_vec(), signal.to_vec()));
                    }
                }
                [e, f, name] if e == b"export" && f == b"-f" => {
                    state.exported_functions.push(name.to_vec())
                }
                [r, f, name] if r == b"readonly" && f == b"-f" => {
                    state.readonly_functions.push(name.to_vec())
                }
                _ => return Err(malformed("listing")),
            }
        }
    }
    let ours = format!("__sd_{n}_");
    let mut cwd = None;
    for line in vars {
        let entry = parse_declare(line).ok_or(malformed("variables"))?;
        if let Some(key) = entry.name.strip_prefix(ours.as_bytes()) {
            let value = entry.scalar().unwrap_or_default();
            match key {
                b"s" => {
                    state.status = std::str::from_utf8(&value)
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0)
                }
                b"o" => state.set_options = Some(split_colon(&value)),
                b"b" => state.shopt_options = Some(split_colon(&value)),
                b"w" => cwd = Some(value),
                _ => {}
            }
            continue;
        }
        if entry.name == b"DIRSTACK" {
            state.dirstack = entry.array_values().unwrap_or_default();
            if !state.dirstack.is_empty() {
                state.dirstack.remove(0);
            }
            continue;
        }
        if BASH_OWNED.iter().any(|o| o.as_bytes() == entry.name) {
            continue;
        }
        state.vars.insert(
            entry.name.to_vec(),
            Var {
                decl: line.to_vec(),
                value: entry.scalar(),
                exported: entry.flags.contains(&b'x'),
            },
        );
    }
    let cwd = cwd.ok_or(malformed("no cwd"))?;
    state.cwd = PathBuf::from(OsStr::from_bytes(&cwd));
    if !state.cwd.is_absolute() {
        return Err(malformed("cwd"));
    }
    for line in aliases {
        let rest = line.strip_prefix(b"alias ").ok_or(malformed("aliases"))?;
        let eq = rest
            .iter()
            .position(|b| *b == b'=')
            .ok_or(malformed("aliases"))?;
        let name = rest[..eq].strip_prefix(b"-- ").unwrap_or(&rest[..eq]);
        if !name.starts_with(ours.as_bytes()) {
            state.aliases.push((name.to_vec(), rest[eq + 1..].to_vec()));
        }
    }
    state.umask = umask.filter(|u| !u.is_empty()).map(<[u8]>::to_vec);
    Ok(Some(state))
}

fn split_colon(s: &[u8]) -> Vec<Vec<u8>> {
    s.split(|b| *b == b':')
        .filter(|w| !w.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Splits shell text into logical lines: newlines inside quotes do not count.
fn shell_lines(text: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < text.len() {
        match text[i] {
            b'\n' => {
                if i > start {
                    out.push(&text[start..i]);
                }
                start = i + 1;
                i += 1;
            }
            b'\\' => i += 2,
            b'\'' => i = i + 1 + text[i + 1..].iter().position(|b| *b == b'\'')? + 1,
            b'"' => i = skip_double(text, i + 1)?,
            b'$' if text.get(i + 1) == Some(&b'\'') => i = skip_ansi(text, i + 2)?,
            _ => i += 1,
        }
    }
    if start < text.len() {
        out.push(&text[start..]);
    }
    Some(out)
}

/// Index after the closing `"` of a double-quoted string starting at `i`.
fn skip_double(text: &[u8], mut i: usize) -> Option<usize> {
    loop {
        match *text.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
}

/// Index after the closing `'` of a `$'…'` string whose body starts at `i`.
fn skip_ansi(text: &[u8], mut i: usize) -> Option<usize> {
    loop {
        match *text.get(i)? {
            b'\'' => return Some(i + 1),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
}

/// Splits one line into words, keeping each word's quoting as written.
pub(super) fn words(line: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < line.len() {
        if line[i] == b' ' || line[i] == b'\t' {
            i += 1;
            continue;
        }
        let start = i;
        while i < line.len() && line[i] != b' ' && line[i] != b'\t' {
            match line[i] {
                b'\\' => i += 2,
                b'\'' => i = i + 1 + line[i + 1..].iter().position(|b| *b == b'\'')? + 1,
                b'"' => i = skip_double(line, i + 1)?,
                b'$' if line.get(i + 1) == Some(&b'\'') => i = skip_ansi(line, i + 2)?,
                _ => i += 1,
            }
        }
        out.push(&line[start..i.min(line.len())]);
    }
    Some(out)
}

/// One `declare -FLAGS NAME[=VALUE]` line of `declare -p`.
struct Declare<'a> {
    flags: &'a [u8],
    name: &'a [u8],
    value: Option<&'a [u8]>,
}

fn parse_declare(line: &[u8]) -> Option<Declare<'_>> {
    let rest = line.strip_prefix(b"declare -")?;
    let sp = rest.iter().position(|b| *b == b' ')?;
    let (flags, rest) = (&rest[..sp], &rest[sp + 1..]);
    let eq = rest.iter().position(|b| *b == b'=');
    let name = &rest[..eq.unwrap_or(rest.len())];
    if name.is_empty() || !name.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_') {
        return None;
    }
    Some(Declare {
        flags,
        name,
        value: eq.map(|e| &rest[e + 1..]),
    })
}

impl Declare<'_> {
    /// The value of a scalar (not an array).
    fn scalar(&self) -> Option<Vec<u8>> {
        if self.flags.contains(&b'a') || self.flags.contains(&b'A') {
            return None;
        }
        unquote(self.value?)
    }

    /// The values of an indexed array, as quoted words, in index order.
    fn array_values(&self) -> Option<Vec<Vec<u8>>> {
        let v = self.value?.strip_prefix(b"(")?.strip_suffix(b")")?;
        let mut out = Vec::new();
        for w in words(v)? {
            let eq = w.iter().position(|b| *b == b'=')?;
            out.push(w[eq + 1..].to_vec());
        }
        Some(out)
    }
}

/// Decodes one shell word made of `"…"`, `'…'`, `$'…'` and bare parts.
pub fn unquote(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut value = Vec::new();
    while let Some(&b) = rest.first() {
        match b {
            b'"' => rest = double_quoted(&rest[1..], &mut value)?,
            b'\'' => rest = single_quoted(&rest[1..], &mut value)?,
            b'$' if rest.get(1) == Some(&b'\'') => rest = ansi_c_quoted(&rest[2..], &mut value)?,
            b'\\' => {
                value.push(*rest.get(1)?);
                rest = &rest[2..];
            }
            _ => {
                value.push(b);
                rest = &rest[1..];
            }
        }
    }
    Some(value)
}

/// Inside "...": backslash escapes only `"`, `\`, `$`, `` ` `` (and newline).
pub(super) fn double_quoted<'a>(mut s: &'a [u8], out: &mut Vec<u8>) -> Option<&'a [u8]> {
    loop {
        match *s.first()? {
            b'"' => return Some(&s[1..]),
            b'\\' if matches!(s.get(1), Some(b'"' | b'\\' | b'$' | b'`' | b'\n')) => {
                out.push(s[1]);
                s = &s[2..];
            }
            b => {
                out.push(b);
                s = &s[1..];
            }
        }
    }
}

/// Inside '...': everything is literal.
pub(super) fn single_quoted<'a>(s: &'a [u8], out: &mut Vec<u8>) -> Option<&'a [u8]> {
    let end = s.iter().position(|b| *b == b'\'')?;
    out.extend_from_slice(&s[..end]);
    Some(&s[end + 1..])
}

/// Inside $'...': C-style escapes as bash writes them.
pub(super) fn ansi_c_quoted<'a>(mut s: &'a [u8], out: &mut Vec<u8>) -> Option<&'a [u8]> {
    loop {
        match *s.first()? {
            b'\'' => return Some(&s[1..]),
            b'\\' => {
                let e = *s.get(1)?;
                s = &s[2..];
                let simple = match e {
                    b'a' => Some(7),
                    b'b' => Some(8),
                    b'e' | b'E' => Some(0x1b),
                    b'f' => Some(0x0c),
                    b'n' => Some(b'\n'),
                    b'r' => Some(b'\r'),
                    b't' => Some(b'\t'),
                    b'v' => Some(0x0b),
                    b'\\' | b'\'' | b'"' | b'?' => Some(e),
                    _ => None,
                };
                if let Some(b) = simple {
                    out.push(b);
                } else if e.is_ascii_digit() && e < b'8' {
                    let mut v = u32::from(e - b'0');
                    let mut n = 1;
                    while n < 3 && s.first().is_some_and(|d| (b'0'..b'8').contains(d)) {
                        v = v * 8 + u32::from(s[0] - b'0');
                        s = &s[1..];
                        n += 1;
                    }
                    out.push(v as u8);
                } else if e == b'x' {
                    let digits = s
                        .iter()
                        .take(2)
                        .take_while(|d| d.is_ascii_hexdigit())
                        .count();
                    let v = u8::from_str_radix(std::str::from_utf8(&s[..digits]).ok()?, 16).ok()?;
                    out.push(v);
                    s = &s[digits..];
                } else {
                    out.push(b'\\');
                    out.push(e);
                }
            }
            b => {
                out.push(b);
                s = &s[1..];
            }
        }
    }
}

/// The state to keep after a command that ran with `request_env` on top of
/// `before`: a variable the request set and the command left exported with
/// the same value goes back to what the session had, so per-command env does
/// not stick unless the command itself assigned it.
pub fn carry_over(
    before: &TerminalState,
    request_env: &EnvMap,
    mut after: TerminalState,
) -> TerminalState {
    for (k, v) in request_env {
        let untouched = after
            .vars
            .get(k)
            .is_some_and(|var| var.exported && var.value.as_ref() == Some(v));
        if untouched {
            match before.vars.get(k) {
                Some(prev) => {
                    after.vars.insert(k.clone(), prev.clone());
                }
                None => {
                    after.vars.remove(k);
                }
            }
        }
    }
    after
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;

    /// Runs `command` as the daemon does (bash -c, restore on fd 62, save on
    /// fd 63, save code on fd 61) from `state`, with the given shell defaults
    /// (`None`: the restore sets everything); returns stdout, stderr, exit
    /// code and the saved state.
    fn run_with(
        state: &TerminalState,
        command: &str,
        defaults: Option<&ShellDefaults>,
    ) -> (
        Vec<u8>,
        Vec<u8>,
        i32,
        Result<Option<TerminalState>, StateError>,
    ) {
        let n = nonce();
        // As the daemon does: the exported variables bash takes there in the environment.
        let env = exec_env(state, &EnvMap::new(), defaults);
        let script = restore(state, &n, &env, defaults, true).script;
        let mut restore = tempfile::tempfile().unwrap();
        restore.write_all(&script).unwrap();
        restore.rewind().unwrap();
        let mut code = tempfile::tempfile().unwrap();
        code.write_all(&save_code(&n)).unwrap();
        code.rewind().unwrap();
        let mut save = tempfile::tempfile().unwrap();
        let (r, w, c) = (restore.as_raw_fd(), save.as_raw_fd(), code.as_raw_fd());
        let mut cmd = std::process::Command::new("/bin/bash");
        cmd.env_clear()
            .envs(
                env.iter()
                    .map(|(k, v)| (OsStr::from_bytes(k), OsStr::from_bytes(v))),
            )
            .env("BASH_ENV", "/dev/fd/62")
            .args(["-c", command, "bash"])
            .current_dir(&state.cwd);
        // SAFETY: dup2 and signal are async-signal-safe; the fds stay open until the child has exec'd.
        unsafe {
            cmd.pre_exec(move || {
                // As the daemon's spawn does: a test runner started in the
                // background has SIGINT and SIGQUIT ignored, and bash cannot
                // trap a signal ignored at its start.
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                libc::signal(libc::SIGQUIT, libc::SIG_DFL);
                if libc::dup2(r, RESTORE_FD) < 0
                    || libc::dup2(w, SAVE_FD) < 0
                    || libc::dup2(c, SAVE_CODE_FD) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        let mut report = Vec::new();
        save.rewind().unwrap();
        save.read_to_end(&mut report).unwrap();
        let parsed = parse_save(&report, &n);
        (
            out.stdout,
            out.stderr,
            out.status.code().unwrap_or(-1),
            parsed,
        )
    }

    fn fresh() -> TerminalState {
        let mut env = EnvMap::new();
        env.insert(b"PATH".to_vec(), b"/usr/bin:/bin".to_vec());
        TerminalState::new(PathBuf::from("/"), &env)
    }

    /// Runs commands one after the other, each from the state the previous left.
    fn chain(commands: &[&str]) -> (Vec<u8>, Vec<u8>, TerminalState) {
        chain_with(commands, probed())
    }

    fn probed() -> Option<&'static ShellDefaults> {
        static DEFAULTS: std::sync::OnceLock<Option<ShellDefaults>> = std::sync::OnceLock::new();
        let defaults = DEFAULTS
            .get_or_init(|| ShellDefaults::probe(std::path::Path::new("/bin/bash")).flatten());
        assert!(defaults.is_some(), "probing /bin/bash failed");
        defaults.as_ref()
    }

    /// A bash without `compgen` prints empty lists: its defaults are kept,
    /// only the builtins and reserved words are unknown (no plain-command path).
    #[test]
    fn a_probe_without_command_lists_keeps_its_defaults() {
        let printed = b"declare -- OPTERR=\"1\"\n\0braceexpand:hashall\0extquote\x000022\n\0\0";
        let defaults = ShellDefaults::parse_probe(printed).expect("usable defaults");
        assert!(!defaults.knows_commands());
        assert_eq!(defaults.umask, b"0022");
        assert!(defaults.vars.contains_key(&b"OPTERR"[..]));
        let real = probed().expect("bash is probed");
        assert!(real.knows_commands() && real.is_builtin(b"cd") && real.is_keyword(b"if"));
    }

    fn chain_with(
        commands: &[&str],
        defaults: Option<&ShellDefaults>,
    ) -> (Vec<u8>, Vec<u8>, TerminalState) {
        let mut state = fresh();
        let mut last = (Vec::new(), Vec::new());
        for c in commands {
            let (o, e, _, saved) = run_with(&state, c, defaults);
            if let Some(s) = saved.unwrap() {
                state = s;
            }
            last = (o, e);
        }
        (last.0, last.1, state)
    }

    fn text(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    #[test]
    fn carries_every_kind_of_state() {
        let (out, err, _) = chain(&[
            "x=1; declare -i n=5; a=(1 \"2 3\"); declare -A h=([k]=v); export E=e; f() { echo hi; }; alias ll='echo LL'; set -o pipefail; shopt -s extglob; umask 077; cd /tmp; pushd -n /usr >/dev/null; trap 'echo int' INT; false",
            "echo \"st=$? x=$x n=$((n+1)) a=${a[1]} h=${h[k]} E=$E\"; f; ll; shopt -o pipefail; shopt extglob; umask; pwd; dirs; trap -p INT; env | grep -c '^E=e$'",
        ]);
        assert_eq!(text(&err), "");
        assert_eq!(
            text(&out),
            "st=1 x=1 n=6 a=2 3 h=v E=e\nhi\nLL\npipefail       \ton\nextglob        \ton\n0077\n/tmp\n/tmp /usr\ntrap -- 'echo int' SIGINT\n1\n"
        );
    }

    const EVERY_KIND: [&str; 2] = [
        "x=1; declare -i n=5; a=(1 \"2 3\"); declare -A h=([k]=v); export E=e; f() { echo hi; }; alias ll='echo LL'; set -o pipefail; shopt -s extglob; umask 077; cd /tmp; pushd -n /usr >/dev/null; trap 'echo int' INT; false",
        "echo \"st=$? x=$x n=$((n+1)) a=${a[1]} h=${h[k]} E=$E\"; f; ll; shopt -o pipefail; shopt extglob; umask; pwd; dirs; trap -p INT; env | grep -c '^E=e$'",
    ];

    #[test]
    fn carries_every_kind_of_state_without_the_shell_defaults() {
        let (out, err, _) = chain_with(&EVERY_KIND, None);
        assert_eq!(text(&err), "");
        assert_eq!(
            text(&out),
            "st=1 x=1 n=6 a=2 3 h=v E=e\nhi\nLL\npipefail       \ton\nextglob        \ton\n0077\n/tmp\n/tmp /usr\ntrap -- 'echo int' SIGINT\n1\n"
        );
    }

    #[test]
    fn a_variable_of_a_fresh_shell_that_was_unset_or_changed_stays_so() {
        let (out, err, _) = chain(&[
            "unset OPTERR PS4; TERM=xterm; IFS=:",
            "echo \"${OPTERR-gone} ${PS4-gone} $TERM\"; printf '[%s]' \"$IFS\"",
        ]);
        assert_eq!(text(&err), "");
        assert_eq!(text(&out), "gone gone xterm\n[:]");
    }

    #[test]
    fn the_restore_of_an_untouched_state_sets_nothing_a_fresh_shell_has() {
        let (_, _, state) = chain(&["true"]);
        let script = restore(&state, "n", &EnvMap::new(), probed(), true).script;
        let script = text(&script);
        let script = script.replace(&text(&single_quote(save_trap("n").as_bytes())), "");
        // Only what differs from `bash -c`: aliases expanded, the session's
        // PATH, and SHELL (bash takes it from the user's passwd entry).
        assert!(script.contains("shopt -s expand_aliases\n"), "{script}");
        assert!(!script.contains("shopt -u"), "{script}");
        assert!(!script.contains("\\set "), "{script}");
        assert!(!script.contains("OPTERR"), "{script}");
        assert!(!script.contains("umask"), "{script}");
        assert!(!script.contains("_fin"), "{script}");
        assert!(!script.contains("POSIXLY_CORRECT=y\n__"), "{script}");
        let declares: Vec<&str> = script
            .lines()
            .filter(|l| l.starts_with("declare "))
            .collect();
        assert!(declares.is_empty(), "{script}");
        assert!(script.contains("\nPATH=\"/usr/bin:/bin\"\n"), "{script}");
        assert!(script.contains("\nSHELL=\"/bin/bash\"\n"), "{script}");
        assert!(script.contains("\nexport PATH\n"), "{script}");
    }

    /// Bare only when the script would restore nothing a plain command
    /// could see: `$?` and the exported variables in the environment are
    /// not such things, an OLDPWD goes along; anything else is. (bash sets
    /// SHELL unexported when its environment has none; sessions have one.)
    #[test]
    fn a_plain_command_starts_bare_only_when_the_restore_holds_nothing_it_sees() {
        let bare = |setup: &[&str]| {
            let (_, err, state) = chain(&[&["export SHELL"], setup].concat());
            assert_eq!(text(&err), "", "{setup:?}");
            let env = exec_env(&state, &EnvMap::new(), probed());
            restore(&state, "n", &env, probed(), false).bare
        };
        assert_eq!(chain(&[]).2.set_options, None, "a new session");
        let fresh = restore(
            &fresh(),
            "n",
            &exec_env(&fresh(), &EnvMap::new(), probed()),
            probed(),
            false,
        );
        assert_eq!(fresh.bare, Some(Bare { oldpwd: None }), "a new session");
        let env_only = Some(Bare { oldpwd: None });
        assert_eq!(bare(&["export A=1 LANG=C.UTF-8; false"]), env_only);
        assert_eq!(bare(&["export LC_TERMINAL=iTerm2 LANG=C.UTF-8"]), env_only);
        assert_eq!(
            bare(&["cd /tmp", "cd /usr"]),
            Some(Bare {
                oldpwd: Some(b"/tmp".to_vec())
            })
        );
        for setup in [
            "x=1",
            "export LC_ALL=C",
            "export N; declare -i N=2",
            "alias l=ls",
            "f() { :; }",
            "umask 0077",
            "shopt -s dotglob",
            "shopt -s expand_aliases; alias l=ls",
            "set -o noglob",
            "pushd -n /tmp >/dev/null",
            "trap 'echo' USR1",
            "unset PS4",
            "set -o posix",
            "export BIG=$(head -c 17000 /dev/zero | tr '\\0' x)",
            "export LANG=xx_XX.UTF-8",
            "export OLDPWD=relative",
        ] {
            assert_eq!(bare(&[setup]), None, "{setup}");
        }
        // A command that saves always gets the restore.
        let (_, _, state) = chain(&["export A=1"]);
        let env = exec_env(&state, &EnvMap::new(), probed());
        assert_eq!(restore(&state, "n", &env, probed(), true).bare, None);
    }

    #[test]
    fn names_bash_acts_on_at_start_and_other_locales_stay_in_the_script() {
        for (name, from_env) in [
            ("VIRTUAL_ENV", true),
            ("_x1", true),
            ("LC_TERMINAL", true),
            ("UID", false),
            ("RANDOM", false),
            ("LANG", true),
            ("LC_CTYPE", true),
            ("LC_ALL", false),
            ("LANGUAGE", false),
            ("OLDPWD", false),
            ("BASH_COMPAT", false),
            ("BASHOPTS", false),
            ("LD_PRELOAD", false),
            ("MALLOC_ARENA_MAX", false),
            ("HISTFILE", false),
            ("SSH_CLIENT", false),
            ("A-B", false),
            ("1A", false),
        ] {
            assert_eq!(may_come_from_env(name.as_bytes()), from_env, "{name}");
        }
        // Debian installs C.UTF-8 (glibc's own C.utf8); the tests need it.
        assert!(
            std::path::Path::new("/usr/lib/locale/C.utf8").is_dir(),
            "these tests need the C.UTF-8 locale installed"
        );
        assert!(!is_locale_var(b"LC_TERMINAL") && !is_locale_var(b"LC_ALL"));
        for (value, installed) in [
            ("C", true),
            ("POSIX", true),
            ("C.UTF-8", true),
            ("C.utf8", true),
            ("xx_XX.UTF-8", false),
            ("ja_JP.SJIS", false),
            ("en_US", false),
        ] {
            assert_eq!(locale_installed(value.as_bytes()), installed, "{value}");
        }
        // All or none: one locale not installed keeps them all in the script.
        let (_, err, state) = chain(&["export LANG=C.UTF-8 LC_CTYPE=C.UTF-8 LC_TIME=POSIX A=1"]);
        assert_eq!(text(&err), "");
        let names = |env: EnvMap| -> Vec<String> {
            env.keys()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .filter(|k| k.starts_with("L"))
                .collect()
        };
        assert_eq!(
            names(exec_env(&state, &EnvMap::new(), probed())),
            ["LANG", "LC_CTYPE", "LC_TIME"]
        );
        let request: EnvMap = [(b"LC_NUMERIC".to_vec(), b"xx_XX.UTF-8".to_vec())].into();
        assert!(names(exec_env(&state, &request, probed())).is_empty());
        // A request's LOCPATH moves where bash's start-up setlocale looks.
        let request: EnvMap = [(b"LOCPATH".to_vec(), b"/nowhere".to_vec())].into();
        assert!(names(exec_env(&state, &request, probed())).is_empty());
        let (_, _, mixed) = chain(&["export LANG=xx_XX.UTF-8 LC_CTYPE=C.UTF-8 A=1"]);
        let env = exec_env(&mixed, &EnvMap::new(), probed());
        assert!(names(env.clone()).is_empty(), "{env:?}");
        assert!(env.contains_key(&b"A"[..]), "{env:?}");
    }

    #[test]
    fn exported_variables_go_in_the_environment_unless_bash_acts_on_them_there() {
        let big = "v".repeat(EXEC_ENV_TOTAL);
        let (_, err, state) = chain(&[&format!(
            "export E=plain TERM=xterm SSH_CLIENT='1 2 3' POSIX_PEDANTIC=1 EXECIGNORE='*/ls' \
             PAGER={big} LANG=C; declare -ix N=3; declare -x TZ; USER=local"
        )]);
        assert_eq!(text(&err), "");
        let env = exec_env(&state, &EnvMap::new(), probed());
        let names: Vec<&str> = env
            .keys()
            .map(|k| std::str::from_utf8(k).unwrap())
            .collect();
        // The session's PATH, and E, TERM, LANG (a C locale); none bash acts
        // on when it finds it there (SSH_CLIENT, POSIX_PEDANTIC,
        // EXECIGNORE), nor N (an attribute), TZ (no value), USER (not
        // exported), PAGER (past the size).
        assert_eq!(names, ["E", "LANG", "PATH", "TERM"], "{names:?}");
        let script = text(&restore(&state, "n", &env, probed(), true).script);
        assert!(!script.contains("\nPATH="), "{script}");
        for kept in ["SSH_CLIENT=", "POSIX_PEDANTIC=", "EXECIGNORE=", "PAGER="] {
            assert!(script.contains(kept), "{kept} not in {script}");
        }
        assert!(script.contains("declare -ix N="), "{script}");
        // Without probed defaults nothing is assumed: all in the script.
        assert!(exec_env(&state, &EnvMap::new(), None).is_empty());
        // The request's env is the caller's: not taken from the state.
        let request: EnvMap = [(b"TERM".to_vec(), b"r".to_vec())].into();
        assert!(!exec_env(&state, &request, probed()).contains_key(&b"TERM"[..]));
        // Carried as before: the next command sees every one of them, its
        // restore ran (SSH_CLIENT and POSIX_PEDANTIC in bash's environment
        // would have skipped BASH_ENV), and EXECIGNORE still applies.
        let (out, err, _) = chain(&[
            &format!(
                "export E=plain TERM=xterm SSH_CLIENT='1 2 3' POSIX_PEDANTIC=1 PAGER={big}; \
                 declare -ix N=3; declare -x TZ; USER=local; x=restored"
            ),
            "export EXECIGNORE='*/ls'",
            "printf '%s|' \"$E\" \"$TERM\" \"$SSH_CLIENT\" \"${#PAGER}\" \"$N\" \"${TZ-unset}\" \"$USER\" \"$x\"; \
             shopt -oq posix && echo posix; ls / >/dev/null 2>&1 || echo ignored; printenv E",
        ]);
        assert_eq!(text(&err), "");
        assert_eq!(
            text(&out),
            format!("plain|xterm|1 2 3|{EXEC_ENV_TOTAL}|3|unset|local|restored|ignored\nplain\n")
        );
    }

    #[test]
    fn a_debug_trap_fires_for_the_command_only() {
        let (out, err, state) = chain(&[
            "trap 'echo D' DEBUG; trap 'echo E >&2' ERR; trap 'echo R' RETURN",
            "echo x",
        ]);
        assert_eq!(text(&err), "");
        assert_eq!(text(&out), "D\nx\n");
        assert_eq!(state.traps.len(), 3, "{:?}", state.traps);
    }

    #[test]
    fn control_bytes_round_trip() {
        let (out, err, _) = chain(&[
            "v=$'a\\001b\\177c\\377'; a=(\"$v\"); export X=\"$v\"",
            "printf '%s|%s|' \"$v\" \"${a[0]}\"; printenv X",
        ]);
        assert_eq!(text(&err), "");
        assert_eq!(out, b"a\x01b\x7fc\xff|a\x01b\x7fc\xff|a\x01b\x7fc\xff\n");
    }

    #[test]
    fn xtrace_traces_the_command_only() {
        let (out, err, _) = chain(&["set -x", "echo a", "echo b"]);
        assert_eq!(text(&out), "b\n");
        assert_eq!(text(&err), "+ echo b\n");
    }
}
