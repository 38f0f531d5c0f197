//! Which commands cannot change a session's terminal state but `$?`: for them the spawn path skips the save (the state after is the state before, with the command's exit status).
//!
//! Saving the state costs bash more than the rest of the command: at exit it
//! lists every variable, function, alias, trap and option (≈ 0.9 million
//! instructions for an empty state, as much as a whole `bash -c true`;
//! docs/design-notes.md "Terminal state"). A command such as `ls -la src`,
//! `git status` or `true` changes none of it. The test here is deliberately
//! narrow — anything it is not sure of takes the full path — and works on
//! the text alone plus what the daemon knows of the state:
//!
//! - one simple command: words separated by blanks; a word holds letters,
//!   digits, `-_./,:+@%^=~` and glob characters `*?[]`, or a quoted string
//!   (`'…'`, or `"…"` without `$`, backquote or backslash). So no expansion
//!   that could assign (`${x:=1}`, `$((x=1))`), no redirection (`{fd}>file`
//!   assigns), no pipe (`lastpipe` runs its end in the shell), list,
//!   background job, comment, newline or history expansion;
//! - its name is a plain word without `=` (no assignment) or glob character
//!   (`c?` could expand to `cd`), not starting with `%` (a job) or `~`
//!   (`~` is `$HOME`, which may name a builtin), neither a reserved word nor
//!   an alias nor a function of the state, and, if a builtin, one that
//!   changes nothing: `true`, `false`, `:`, `echo`; any other name is a
//!   program, which runs in a child of the shell;
//! - the state has no trap (a DEBUG or ERR trap runs in the shell around
//!   the command, a signal trap could be triggered by it), neither `xtrace`
//!   (`PS4` is expanded in the shell and can assign) nor `keyword` (`set -k`
//!   makes `NAME=value` arguments assignments) on, and the request sets no
//!   env (which may define functions, `BASH_FUNC_name%%`).
//!
//! Such a command still gets an (empty) EXIT trap, so bash forks it exactly
//! as on the full path (an EXIT trap keeps bash from exec'ing a lone command
//! in its own place) and ends with its status; and the restore, unless the
//! state it could see all comes in its environment (it then starts bare:
//! [`super::terminal::Restore::bare`]).

use super::shell::EnvMap;
use super::terminal::{ShellDefaults, TerminalState};

/// Builtins that change no state of the shell that runs them. Not `pwd`:
/// in posix mode `pwd -P` sets `$PWD`, the cwd carried. Not `test` or `[`:
/// `-v 'a[i=1]'` evaluates its subscript, and can assign.
const SAFE_BUILTINS: &[&[u8]] = &[b"true", b"false", b":", b"echo"];

/// `set -o` options under which even a plain command can assign: `xtrace`
/// expands `PS4` (`$((n++))`) in the shell before each command, `keyword`
/// makes any `NAME=value` argument an assignment.
const ASSIGNING_OPTIONS: &[&[u8]] = &[b"xtrace", b"keyword"];

/// Whether `command`, run in `state` with `request_env` on top, can change
/// nothing of the terminal state but `$?` (see the module's doc). `false`
/// whenever unsure.
pub fn keeps_state(
    command: &str,
    state: &TerminalState,
    request_env: &EnvMap,
    defaults: &ShellDefaults,
) -> bool {
    let assigning = state
        .set_options
        .iter()
        .flatten()
        .any(|o| ASSIGNING_OPTIONS.contains(&o.as_slice()));
    if !defaults.knows_commands() || !state.traps.is_empty() || assigning {
        return false;
    }
    // The request's env may define functions the state does not know of.
    if !request_env.is_empty() {
        return false;
    }
    let Some(words) = plain_words(command.as_bytes()) else {
        return false;
    };
    let Some(name) = words.first() else {
        return false;
    };
    let plain_name = !name.starts_with(b"%")
        && !name.starts_with(b"~")
        && name.iter().all(|b| is_plain(*b) && !b"=*?[]".contains(b));
    plain_name
        && !defaults.is_keyword(name)
        && !state.aliases.iter().any(|(alias, _)| alias == name)
        && !state.function_names.iter().any(|f| f == name)
        && (!defaults.is_builtin(name) || SAFE_BUILTINS.contains(name))
}

/// A byte a word may hold outside quotes.
fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_./,:+@%^=~*?[]".contains(&b)
}

/// The words of a simple command made of plain bytes and quoted strings
/// only; `None` for anything else (an empty command included).
fn plain_words(text: &[u8]) -> Option<Vec<&[u8]>> {
    let words = super::terminal::words(text)?;
    let plain = !words.is_empty() && words.iter().all(|w| is_plain_word(w));
    plain.then_some(words)
}

/// Whether a word (as [`super::terminal::words`] splits it) is plain bytes
/// and quoted strings: `'…'`, or `"…"` with no `$`, backquote, backslash or `!`.
fn is_plain_word(word: &[u8]) -> bool {
    let mut rest = word;
    while let Some(&b) = rest.first() {
        let quote = match b {
            b'\'' | b'"' => b,
            b if is_plain(b) => {
                rest = &rest[1..];
                continue;
            }
            _ => return false,
        };
        let Some(close) = rest[1..].iter().position(|c| *c == quote) else {
            return false;
        };
        let inside = &rest[1..1 + close];
        if quote == b'"' && inside.iter().any(|c| b"$`\\!".contains(c)) {
            return false;
        }
        rest = &rest[close + 2..];
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> std::sync::Arc<ShellDefaults> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(ShellDefaults::of(std::path::Path::new("/bin/bash")))
            .expect("bash is probed")
    }

    #[test]
    fn plain_commands_keep_the_state() {
        let d = defaults();
        let state = TerminalState::default();
        let none = EnvMap::new();
        for command in [
            "true",
            "false",
            ":",
            "ls -la src",
            "git status",
            "echo hello world",
            "echo 'a $b; c' \"d e\"",
            "grep -rn \"fn main\" src/*.rs",
            "/usr/bin/env",
            "make CC=gcc -j4",
            "  echo  ",
            "python3 -c 'print(1)'",
        ] {
            assert!(keeps_state(command, &state, &none, &d), "{command:?}");
        }
    }

    #[test]
    fn anything_that_could_change_the_state_takes_the_full_path() {
        let d = defaults();
        let state = TerminalState::default();
        let none = EnvMap::new();
        for command in [
            "",
            "   ",
            "x=1",
            "X=1 ls",
            "cd /tmp",
            "export A",
            "set -e",
            "shopt -s extglob",
            "source venv/bin/activate",
            ". ./env.sh",
            "read x",
            "printf -v x y",
            "declare x",
            "alias ll=ls",
            "exit 3",
            "pwd -P",
            "%1",
            "[ -d /tmp ]",
            "[ -v a[i=1] ]",
            "test -v 'arr[i++]'",
            "~ /usr",
            "~-",
            "exec ls",
            "eval true",
            "ls; cd /",
            "ls && cd /",
            "ls | read x",
            "ls > out",
            "ls 2>&1",
            "sleep 1 &",
            "echo $x",
            "echo ${x:=1}",
            "echo \"$x\"",
            "echo `id`",
            "echo $(id)",
            "echo \\x",
            "echo {a,b}",
            "echo a # comment",
            "ls\ncd /",
            "if true",
            "[[ -d / ]]",
            "{ ls; }",
            "(cd /)",
            "! ls",
            "time ls",
            "echo 'unclosed",
            "echo \"!x\"",
            "'ls' -l",
            "c? /tmp",
            "[[",
        ] {
            assert!(!keeps_state(command, &state, &none, &d), "{command:?}");
        }
    }

    #[test]
    fn a_name_the_state_defines_or_a_trap_takes_the_full_path() {
        let d = defaults();
        let state = TerminalState {
            function_names: vec![b"deactivate".to_vec()],
            aliases: vec![(b"ll".to_vec(), b"'cd /'".to_vec())],
            ..TerminalState::default()
        };
        let none = EnvMap::new();
        assert!(!keeps_state("deactivate", &state, &none, &d));
        assert!(!keeps_state("ll", &state, &none, &d));
        assert!(keeps_state("ls", &state, &none, &d));
        let trapped = TerminalState {
            traps: vec![(b"'e=1'".to_vec(), b"ERR".to_vec())],
            ..TerminalState::default()
        };
        assert!(!keeps_state("false", &trapped, &none, &d));
        for option in ["xtrace", "keyword"] {
            let on = TerminalState {
                set_options: Some(vec![option.as_bytes().to_vec()]),
                ..TerminalState::default()
            };
            assert!(!keeps_state("true", &on, &none, &d), "{option}");
        }
        let env: EnvMap = [(b"BASH_FUNC_ls%%".to_vec(), b"() { cd /; }".to_vec())].into();
        assert!(!keeps_state("ls", &TerminalState::default(), &env, &d));
    }
}
