//! Shell state of a session: the wrapper that runs a command and reports cwd and exports, and its parser.
//!
//! Each command runs as `shell -c WRAPPER sessiond COMMAND`. The wrapper
//! installs an EXIT trap that writes the shell's final `$PWD` (NUL-terminated)
//! and `export -p` to fd 3, then `eval`s the command with fd 3 closed, so the
//! command and its children never see the state pipe. The trap runs on a
//! normal end and on `exit N` inside the command; a command killed by a signal
//! writes nothing and the session keeps its previous state. No extra process
//! is forked: `export -p` and `printf` are builtins.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// An environment: names to values, as raw bytes (values need not be UTF-8).
pub type EnvMap = BTreeMap<Vec<u8>, Vec<u8>>;

/// Longest single argument or `NAME=value` string the kernel accepts at exec
/// (MAX_ARG_STRLEN, including the NUL): one longer makes every spawn fail with E2BIG.
pub const MAX_ARG_BYTES: usize = 128 * 1024 - 1;

/// Variables that describe the shell process itself and must not be carried
/// from one command to the next (SHLVL would grow by one per command).
const NOT_CARRIED: &[&[u8]] = &[b"SHLVL", b"_"];

/// Wrapper for bash: `builtin` keeps a user function named `printf` or `export` from hijacking the report.
const BASH_WRAPPER: &str = r#"trap 'builtin printf "%s\0" "$PWD" >&3; builtin export -p >&3' EXIT
eval "set --; $1" 3>&-"#;

/// Wrapper for a POSIX sh (the fallback when bash is absent).
const POSIX_WRAPPER: &str = r#"trap 'printf "%s\0" "$PWD" >&3; export -p >&3' EXIT
eval "set --; $1" 3>&-"#;

/// The argv that runs `command` under `shell` with the state report on fd 3.
pub fn wrapper_argv(shell: &Path, command: &str) -> Result<Vec<CString>, String> {
    let is_bash = shell.file_name() == Some(OsStr::new("bash"));
    let script = if is_bash { BASH_WRAPPER } else { POSIX_WRAPPER };
    let command =
        CString::new(command).map_err(|_| "param `command` holds a NUL byte".to_string())?;
    Ok(vec![
        CString::new(shell.as_os_str().as_bytes())
            .map_err(|_| "shell path holds a NUL byte".to_string())?,
        CString::new("-c").expect("no NUL"),
        CString::new(script).expect("no NUL"),
        CString::new("sessiond").expect("no NUL"),
        command,
    ])
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

/// The state a finished command left: its cwd and exported environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShellState {
    pub cwd: PathBuf,
    pub env: EnvMap,
}

/// Parses the wrapper's report: `PWD\0` then `export -p` output.
/// Returns `None` when the report is missing or malformed (the session then keeps its state).
pub fn parse_report(report: &[u8]) -> Option<ShellState> {
    let nul = report.iter().position(|b| *b == 0)?;
    let cwd = PathBuf::from(OsStr::from_bytes(&report[..nul]));
    if !cwd.is_absolute() {
        return None;
    }
    let mut env = EnvMap::new();
    let mut rest = &report[nul + 1..];
    while !rest.is_empty() {
        let (entry, after) = parse_export_line(rest)?;
        rest = after;
        if let Some((name, value)) = entry {
            if name.len() + 1 + value.len() > MAX_ARG_BYTES {
                // Carrying it would make every later command fail to start.
                return None;
            }
            if !NOT_CARRIED.contains(&name.as_slice()) {
                env.insert(name, value);
            }
        }
    }
    Some(ShellState { cwd, env })
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

/// Inside "...": backslash escapes only `"`, `\`, `$`, `` ` `` (and newline).
fn double_quoted<'a>(mut s: &'a [u8], out: &mut Vec<u8>) -> Option<&'a [u8]> {
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
fn single_quoted<'a>(s: &'a [u8], out: &mut Vec<u8>) -> Option<&'a [u8]> {
    let end = s.iter().position(|b| *b == b'\'')?;
    out.extend_from_slice(&s[..end]);
    Some(&s[end + 1..])
}

/// Inside $'...': C-style escapes as bash writes them.
fn ansi_c_quoted<'a>(mut s: &'a [u8], out: &mut Vec<u8>) -> Option<&'a [u8]> {
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
/// `before`: a variable the request set and the command left untouched is
/// restored to its session value, so per-command env does not stick.
pub fn carry_over(before: &EnvMap, request_env: &EnvMap, mut after: EnvMap) -> EnvMap {
    for (k, v) in request_env {
        if after.get(k) == Some(v) {
            match before.get(k) {
                Some(prev) => {
                    after.insert(k.clone(), prev.clone());
                }
                None => {
                    after.remove(k);
                }
            }
        }
    }
    after
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn env_of(pairs: &[(&str, &[u8])]) -> EnvMap {
        pairs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec()))
            .collect()
    }

    #[test]
    fn parses_bash_quoting() {
        let report = b"/tmp\0declare -x A=$'x\\ny'\ndeclare -x B=\"q\\\"\\$\\`\\\\z\"\ndeclare -x C=$'\\001\\303\\251'\ndeclare -x D\ndeclare -x E=\"\"\ndeclare -x SHLVL=\"1\"\n";
        let state = parse_report(report).unwrap();
        assert_eq!(state.cwd, PathBuf::from("/tmp"));
        assert_eq!(
            state.env,
            env_of(&[
                ("A", b"x\ny"),
                ("B", b"q\"$`\\z"),
                ("C", b"\x01\xc3\xa9"),
                ("E", b"")
            ])
        );
    }

    #[test]
    fn parses_posix_quoting() {
        let report = b"/\0export A='it'\\''s'\nexport B='two\nlines'\n";
        let state = parse_report(report).unwrap();
        assert_eq!(state.env, env_of(&[("A", b"it's"), ("B", b"two\nlines")]));
    }

    #[test]
    fn a_variable_too_long_to_exec_is_not_carried() {
        let mut report = b"/\0declare -x BIG=\"".to_vec();
        report.extend(std::iter::repeat_n(b'x', MAX_ARG_BYTES));
        report.extend_from_slice(b"\"\n");
        assert!(parse_report(&report).is_none());
    }

    #[test]
    fn missing_or_relative_report_is_none() {
        assert!(parse_report(b"").is_none());
        assert!(parse_report(b"relative\0").is_none());
        assert!(parse_report(b"/x\0garbage line\n").is_none());
    }

    /// The parser against the real bash on this machine (the default shell:
    /// the test suite needs it), with hostile values.
    #[test]
    fn round_trips_through_real_bash() {
        let values: &[&[u8]] = &[
            b"plain",
            b"sp ace",
            b"q\"uote",
            b"$dollar`tick\\",
            b"new\nline",
            b"\x01\x7f\xff",
            b"it's",
            b"",
        ];
        let mut cmd = Command::new("/bin/bash");
        cmd.env_clear();
        cmd.arg("-c")
            .arg("builtin printf '%s\\0' \"$PWD\"; export -p")
            .current_dir("/");
        for (i, v) in values.iter().enumerate() {
            cmd.env(format!("V{i}"), OsStr::from_bytes(v));
        }
        let out = cmd.output().unwrap();
        let state = parse_report(&out.stdout).unwrap();
        for (i, v) in values.iter().enumerate() {
            assert_eq!(
                state
                    .env
                    .get(format!("V{i}").as_bytes())
                    .map(|v| v.as_slice()),
                Some(*v),
                "V{i}"
            );
        }
    }

    #[test]
    fn request_env_does_not_stick_unless_changed() {
        let before = env_of(&[("A", b"1")]);
        let request = env_of(&[("A", b"req"), ("B", b"req"), ("C", b"req")]);
        let after = env_of(&[("A", b"req"), ("B", b"req"), ("C", b"changed")]);
        assert_eq!(
            carry_over(&before, &request, after),
            env_of(&[("A", b"1"), ("C", b"changed")])
        );
    }
}
