//! How a command is handed to the session's shell: its argv and environment, and the POSIX-sh fallback's state wrapper.
//!
//! With bash the command is the `-c` string itself (see [`super::terminal`]).
//! A POSIX sh (the fallback when bash is absent) has no BASH_ENV and no way to
//! list functions: its wrapper sources the restore from `/dev/fd/62`, `eval`s
//! the command, and its EXIT trap saves the cwd, umask, `set` flags and
//! variables (exported or not) to fd 63. Functions, aliases, traps, arrays and
//! `$?` are not carried under sh.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::terminal::{
    self, StateError, TerminalState, Var, ansi_c_quoted, double_quoted, single_quoted,
};

/// An environment: names to values, as raw bytes (values need not be UTF-8).
pub type EnvMap = BTreeMap<Vec<u8>, Vec<u8>>;

/// Longest single argument or `NAME=value` string the kernel accepts at exec
/// (MAX_ARG_STRLEN, including the NUL): one longer makes every spawn fail with E2BIG.
pub const MAX_ARG_BYTES: usize = 128 * 1024 - 1;

/// Where a POSIX sh finds the restore script and writes its state: dash
/// redirects only fds 0-9.
pub const SH_RESTORE_FD: i32 = 8;
pub const SH_SAVE_FD: i32 = 9;

/// Whether `name` is a shell variable name: letters, digits and `_`, not
/// starting with a digit.
pub fn is_variable_name(name: &[u8]) -> bool {
    name.first()
        .is_some_and(|c| c.is_ascii_alphabetic() || *c == b'_')
        && name.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// Whether `shell` is bash (full terminal state) rather than a POSIX sh.
pub fn is_bash(shell: &Path) -> bool {
    shell.file_name() == Some(OsStr::new("bash"))
}

/// The argv that runs `command`: `bash -c COMMAND bash` (so `$0` is "bash"
/// and errors read as bash's own), or the sh wrapper that evals it.
pub fn wrapper_argv(shell: &Path, command: &str) -> Result<Vec<CString>, String> {
    let command =
        CString::new(command).map_err(|_| "param `command` holds a NUL byte".to_string())?;
    let program = CString::new(shell.as_os_str().as_bytes())
        .map_err(|_| "shell path holds a NUL byte".to_string())?;
    let c = |s: &str| CString::new(s).expect("no NUL");
    if is_bash(shell) {
        return Ok(vec![program, c("-c"), command, c("bash")]);
    }
    Ok(vec![
        program,
        c("-c"),
        c(&format!(". /dev/fd/{SH_RESTORE_FD}\neval \"set --; $1\"")),
        c("sh"),
        command,
    ])
}

/// `set` flags of a POSIX sh that are carried, by letter.
const SH_FLAGS: &[(u8, &str)] = &[
    (b'a', "allexport"),
    (b'C', "noclobber"),
    (b'e', "errexit"),
    (b'f', "noglob"),
    (b'u', "nounset"),
    (b'v', "verbose"),
    (b'x', "xtrace"),
];

/// Variables a POSIX sh owns.
const SH_OWNED: &[&[u8]] = &[
    b"PPID", b"PWD", b"OPTIND", b"PS1", b"PS2", b"PS4", b"_", b"SHLVL",
];

/// The sh restore script: umask, variables, exports, the save trap, then the `set` flags.
pub fn sh_restore_script(state: &TerminalState, n: &str, skip: &EnvMap) -> Vec<u8> {
    let mut s = format!("exec {SH_RESTORE_FD}<&-\n").into_bytes();
    if let Some(umask) = &state.umask {
        s.extend_from_slice(b"umask ");
        s.extend_from_slice(umask);
        s.push(b'\n');
    }
    for (name, var) in &state.vars {
        let Some(value) = &var.value else { continue };
        if skip.contains_key(name) {
            continue;
        }
        s.extend_from_slice(name);
        s.push(b'=');
        s.extend_from_slice(&terminal::single_quote(value));
        s.push(b'\n');
        if var.exported {
            s.extend_from_slice(b"export ");
            s.extend_from_slice(name);
            s.push(b'\n');
        }
    }
    let save = format!(
        "__sd_{n}_s=$?; {{ set +x; }} 2>/dev/null; {{ printf '%s\\0' \"$PWD\"; umask; printf '\\0%s\\0' \"$-\"; set; printf '\\0'; export -p; printf '\\0%s-end\\0' {n}; }} 2>/dev/null >&{SH_SAVE_FD}"
    );
    s.extend_from_slice(b"trap ");
    s.extend_from_slice(&terminal::single_quote(save.as_bytes()));
    s.extend_from_slice(b" EXIT\n");
    if let Some(on) = &state.set_options {
        s.extend_from_slice(b"set");
        for (_, name) in SH_FLAGS {
            let sign = if on.iter().any(|o| o == name.as_bytes()) {
                " -o "
            } else {
                " +o "
            };
            s.extend_from_slice(sign.as_bytes());
            s.extend_from_slice(name.as_bytes());
        }
        s.push(b'\n');
    }
    s
}

/// Parses what the sh save trap wrote: `PWD\0umask\0$-\0` then `set` output,
/// `\0`, `export -p` output, `\0N-end\0`.
pub fn parse_sh_save(report: &[u8], n: &str) -> Result<Option<TerminalState>, StateError> {
    let malformed = StateError::Malformed;
    let end = format!("\0{n}-end\0");
    let Some(i) = report.windows(end.len()).position(|w| w == end.as_bytes()) else {
        return Ok(None);
    };
    let mut parts = report[..i].split(|b| *b == 0);
    let mut next = || parts.next().ok_or(malformed("sh report"));
    let (cwd, umask, flags, set, exports) = (next()?, next()?, next()?, next()?, next()?);
    let cwd = PathBuf::from(OsStr::from_bytes(cwd));
    if !cwd.is_absolute() {
        return Err(malformed("cwd"));
    }
    let mut state = TerminalState {
        cwd,
        bytes: report.len(),
        ..TerminalState::default()
    };
    let umask = umask.strip_suffix(b"\n").unwrap_or(umask);
    if !umask.is_empty() && umask.iter().all(u8::is_ascii_digit) {
        state.umask = Some(umask.to_vec());
    }
    state.set_options = Some(
        SH_FLAGS
            .iter()
            .filter(|(letter, _)| flags.contains(letter))
            .map(|(_, name)| name.as_bytes().to_vec())
            .collect(),
    );
    let mut exported = std::collections::BTreeSet::new();
    let mut rest = exports;
    while !rest.is_empty() {
        let (entry, after) = parse_export_line(rest).ok_or(malformed("export -p"))?;
        rest = after;
        if let Some((name, _)) = entry {
            exported.insert(name);
        }
    }
    let mut rest = set;
    while !rest.is_empty() {
        // `set` prints `NAME='value'` lines: the export parser reads them with a prefix.
        let mut line = b"export ".to_vec();
        line.extend_from_slice(rest);
        let (entry, after) = parse_export_line(&line).ok_or(malformed("set"))?;
        rest = &rest[rest.len() - after.len()..];
        let Some((name, value)) = entry else { continue };
        if SH_OWNED.contains(&name.as_slice()) || name.starts_with(format!("__sd_{n}_").as_bytes())
        {
            continue;
        }
        let is_exported = exported.contains(&name);
        if is_exported && name.len() + 1 + value.len() > MAX_ARG_BYTES {
            // Passed through the environment, it would make every later spawn fail (E2BIG).
            return Err(malformed("an exported variable over 128 KiB"));
        }
        let mut var = terminal::exported_var(&name, &value);
        var.exported = is_exported;
        if !is_exported {
            var.decl
                .splice(..b"declare -x".len(), b"declare --".iter().copied());
        }
        state.vars.insert(name, Var { ..var });
    }
    Ok(Some(state))
}

/// `KEY=VALUE` strings for `posix_spawn`, with PWD set to `cwd`.
pub fn envp(env: &EnvMap, cwd: &Path) -> Vec<CString> {
    let mut out = Vec::with_capacity(env.len() + 1);
    for (k, v) in env {
        if k.as_slice() == b"PWD" {
            continue;
        }
        let mut kv = Vec::with_capacity(k.len() + v.len() + 1);
        kv.extend_from_slice(k);
        kv.push(b'=');
        kv.extend_from_slice(v);
        // Keys and values containing NUL are refused where they enter (config, params).
        if let Ok(c) = CString::new(kv) {
            out.push(c);
        }
    }
    let mut pwd = b"PWD=".to_vec();
    pwd.extend_from_slice(cwd.as_os_str().as_bytes());
    if let Ok(c) = CString::new(pwd) {
        out.push(c);
    }
    out
}

type Entry = Option<(Vec<u8>, Vec<u8>)>;

/// One line of `export -p`: bash's `declare -x NAME="v"` / `declare -x NAME=$'v'` /
/// `declare -x NAME`, or POSIX `export NAME='v'`. Returns the entry (None for an
/// exported-but-unset name) and the input after the line.
fn parse_export_line(input: &[u8]) -> Option<(Entry, &[u8])> {
    let body = input
        .strip_prefix(b"declare -x ")
        .or_else(|| input.strip_prefix(b"export "))?;
    let name_len = body
        .iter()
        .position(|b| *b == b'=' || *b == b'\n')
        .unwrap_or(body.len());
    let name = body[..name_len].to_vec();
    if name.is_empty() {
        return None;
    }
    let mut rest = &body[name_len..];
    if rest.first() != Some(&b'=') {
        // `declare -x NAME`: exported, no value.
        return Some((None, rest.strip_prefix(b"\n").unwrap_or(rest)));
    }
    rest = &rest[1..];
    let mut value = Vec::new();
    loop {
        match rest.first() {
            None => break,
            Some(b'\n') => {
                rest = &rest[1..];
                break;
            }
            Some(b'"') => rest = double_quoted(&rest[1..], &mut value)?,
            Some(b'\'') => rest = single_quoted(&rest[1..], &mut value)?,
            Some(b'$') if rest.get(1) == Some(&b'\'') => {
                rest = ansi_c_quoted(&rest[2..], &mut value)?
            }
            Some(b'\\') => {
                value.push(*rest.get(1)?);
                rest = &rest[2..];
            }
            Some(&b) => {
                value.push(b);
                rest = &rest[1..];
            }
        }
    }
    Some((Some((name, value)), rest))
}
