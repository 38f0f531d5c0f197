//! /proc reading for the process layer: one parser of `/proc/<pid>/stat`, used by tree kill, the reaper and the tests.

/// The fields of `/proc/<pid>/stat` the daemon needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: i32,
    /// One letter: `R`, `S`, `Z`, …
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
}

impl ProcStat {
    /// Whether the process is a zombie (exited, not yet reaped).
    pub fn is_zombie(&self) -> bool {
        self.state == 'Z'
    }
}

/// Reads `/proc/<pid>/stat`; `None` when the process is gone.
pub fn stat(pid: i32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(pid, &text)
}

/// Parses a stat line. The command name is in parentheses and may itself
/// hold spaces and parentheses, so the fields are read after the LAST ')'.
fn parse_stat(pid: i32, text: &str) -> Option<ProcStat> {
    let after = &text[text.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some(ProcStat {
        pid,
        state,
        ppid,
        pgrp,
    })
}

/// Every process visible in /proc now (blocking I/O: call off the async workers).
pub fn all_processes() -> Vec<ProcStat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(stat)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_name_with_spaces_and_parentheses() {
        let s = parse_stat(42, "42 (a (b) c) Z 7 42 42 0 -1").unwrap();
        assert_eq!(
            s,
            ProcStat {
                pid: 42,
                state: 'Z',
                ppid: 7,
                pgrp: 42
            }
        );
        assert!(s.is_zombie());
    }

    #[test]
    fn reads_this_process() {
        let me = stat(std::process::id() as i32).unwrap();
        assert_eq!(me.pid, std::process::id() as i32);
        assert!(!me.is_zombie());
        assert!(all_processes().iter().any(|p| p.pid == me.pid));
    }
}
