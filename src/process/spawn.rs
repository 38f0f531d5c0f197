//! The spawn path: `clone(CLONE_VM|CLONE_VFORK)` of the shell, whose child sets limits, identity and pipes with raw syscalls, then execs.
//!
//! Why not `std::process::Command` with `pre_exec`: a `pre_exec` hook forces a
//! full `fork()`, whose cost grows with the daemon's memory (docs/design-notes.md, "Spawning a command":
//! 0.6 ms idle, 36 ms at +1 GiB). Why not `posix_spawn`: it cannot set rlimits,
//! oom_score_adj or credentials, and an exec shim that could costs another
//! exec (≈0.7 ms for a tiny binary, ≈1.3 ms for ours, measured here).
//!
//! So we do what glibc's `posix_spawn` does inside: `clone` with `CLONE_VM |
//! CLONE_VFORK` — the child borrows the parent's memory (no page tables are
//! copied, so the cost does not grow with the daemon) and the calling thread
//! sleeps until the child has exec'd or exited. The child runs
//! [`child_main`], which only makes async-signal-safe calls that are thin
//! syscall wrappers, reads data the parent prepared, and never allocates,
//! locks, logs or panics. Identity changes use raw `syscall()`: glibc's
//! `setuid()` would try to signal every thread of the (shared) process.

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::{SigSet, SigmaskHow, pthread_sigmask};
use nix::unistd::{Pid, pipe2};

use super::child::ChildProcess;
use super::table::{ProcessTable, SessionKey};
use crate::limits::Rlimit;

/// Stack of the cloned child until it execs; it only makes a few syscalls.
const CHILD_STACK_BYTES: usize = 64 * 1024;

/// The uid and gid a command runs as (when the daemon is root and `run_as_user` is set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
}

/// What to start, and what the child sets up before it executes anything.
pub struct SpawnRequest<'a> {
    /// Absolute path of the program (the session's shell).
    pub program: &'a CStr,
    /// argv, including argv[0].
    pub argv: &'a [CString],
    /// The complete environment, `KEY=VALUE`.
    pub envp: &'a [CString],
    /// Working directory of the child (entered after the identity change, so
    /// the command's user must be able to enter it).
    pub cwd: &'a CStr,
    /// Whether the child gets a stdin pipe (else /dev/null).
    pub with_stdin: bool,
    /// The slave of a pseudo-terminal: the child's controlling terminal and
    /// its stdin, stdout and stderr (no pipes are made then).
    pub terminal: Option<RawFd>,
    /// setrlimit calls, applied before exec.
    pub rlimits: &'a [Rlimit],
    /// Written to /proc/self/oom_score_adj (e.g. "1000"), if set.
    pub oom_score_adj: Option<&'a CStr>,
    /// Switch to this uid/gid with no supplementary groups, if set.
    pub credentials: Option<Credentials>,
    /// Open `cgroup.procs` files of the command's cgroup leaf (one per
    /// hierarchy); the child writes "0" to each before anything else.
    pub cgroup_procs: &'a [RawFd],
    /// The terminal state memfds, restore, save and the save code, each with
    /// the fd number the shell expects it at (62, 63 and 61 for bash; 8 and 9
    /// for a POSIX sh, which has no save code: -1).
    pub state_fds: [(RawFd, i32); 3],
}

/// The parent's ends of the child's pipes (all close-on-exec); none with a terminal.
pub struct ChildPipes {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// The step of the child's setup that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum ChildStep {
    Cgroup = 1,
    Signals,
    Session,
    Terminal,
    Stdio,
    OomScore,
    Rlimit,
    Identity,
    Cwd,
    Exec,
}

impl ChildStep {
    fn from_raw(raw: i32) -> Option<ChildStep> {
        use ChildStep::*;
        [
            Cgroup, Signals, Session, Terminal, Stdio, OomScore, Rlimit, Identity, Cwd, Exec,
        ]
        .into_iter()
        .find(|s| *s as i32 == raw)
    }

    fn describe(self) -> &'static str {
        match self {
            ChildStep::Cgroup => "joining the command's cgroup",
            ChildStep::Signals => "resetting signal dispositions",
            ChildStep::Session => "starting a new session",
            ChildStep::Terminal => "taking the pseudo-terminal as controlling terminal",
            ChildStep::Stdio => "connecting stdin, stdout, stderr and the state fds",
            ChildStep::OomScore => "setting oom_score_adj",
            ChildStep::Rlimit => "setting resource limits",
            ChildStep::Identity => "switching to the command user",
            ChildStep::Cwd => "entering the working directory",
            ChildStep::Exec => "executing the shell",
        }
    }
}

/// Why a spawn failed: carries the program, the cwd, the step and the errno.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot start {program} in {cwd}: {} failed: {errno}", .step.describe())]
    Child {
        program: String,
        cwd: String,
        step: ChildStep,
        errno: Errno,
    },
    #[error("cannot start {program}: {step}: {errno}")]
    Setup {
        program: String,
        step: &'static str,
        errno: Errno,
    },
}

/// Everything the child reads, prepared by the parent; plus where it reports a failure.
#[repr(C)]
struct ChildPlan {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    /// -1: open /dev/null as stdin.
    stdin: libc::c_int,
    stdout: libc::c_int,
    stderr: libc::c_int,
    /// -1: no terminal; else the pty slave, made the controlling terminal.
    terminal: libc::c_int,
    state_fds: [(libc::c_int, libc::c_int); 3],
    rlimits: *const Rlimit,
    rlimit_count: usize,
    oom_score_adj: *const libc::c_char,
    cgroup_procs: *const RawFd,
    cgroup_procs_count: usize,
    /// -1: keep the identity.
    uid: i64,
    gid: i64,
    /// Written by the child on failure (shared memory: CLONE_VM).
    failed_step: i32,
    failed_errno: i32,
}

fn cloexec_pipe() -> Result<(OwnedFd, OwnedFd), Errno> {
    pipe2(OFlag::O_CLOEXEC)
}

/// Starts `req.program` with stdout, stderr at fds 1, 2 and the state memfds where asked,
/// stdin from a pipe or /dev/null, as the leader of a new session, with the
/// requested limits, oom_score_adj and identity. Blocking (the calling thread
/// sleeps until the child execs): call it off the async workers. The pid is
/// recorded in `table` before anyone can reap it.
pub fn spawn(
    table: &Arc<ProcessTable>,
    session: SessionKey,
    req: &SpawnRequest<'_>,
) -> Result<(ChildProcess, ChildPipes), SpawnError> {
    // Error text is built only when an error happens: this is the spawn path.
    let program = || req.program.to_string_lossy().into_owned();
    let setup = |step: &'static str| {
        move |errno| SpawnError::Setup {
            program: program(),
            step,
            errno,
        }
    };

    let pipes = match req.terminal {
        Some(_) => None,
        None => Some((
            req.with_stdin
                .then(|| cloexec_pipe().map_err(setup("stdin pipe")))
                .transpose()?,
            cloexec_pipe().map_err(setup("stdout pipe"))?,
            cloexec_pipe().map_err(setup("stderr pipe"))?,
        )),
    };
    // The child's stdio: the pipes' ends, or the terminal's slave at all three.
    let (stdin_fd, stdout_fd, stderr_fd) = match (&pipes, req.terminal) {
        (Some((stdin, (_, out_w), (_, err_w))), _) => (
            stdin.as_ref().map_or(-1, |(r, _)| r.as_raw_fd()),
            out_w.as_raw_fd(),
            err_w.as_raw_fd(),
        ),
        (None, Some(slave)) => (slave, slave, slave),
        (None, None) => unreachable!("pipes are made whenever there is no terminal"),
    };

    let mut argv: Vec<*const libc::c_char> = req.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = req.envp.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    let mut plan = ChildPlan {
        program: req.program.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        cwd: req.cwd.as_ptr(),
        stdin: stdin_fd,
        stdout: stdout_fd,
        stderr: stderr_fd,
        terminal: req.terminal.unwrap_or(-1),
        state_fds: req.state_fds,
        rlimits: req.rlimits.as_ptr(),
        rlimit_count: req.rlimits.len(),
        oom_score_adj: req.oom_score_adj.map_or(std::ptr::null(), CStr::as_ptr),
        cgroup_procs: req.cgroup_procs.as_ptr(),
        cgroup_procs_count: req.cgroup_procs.len(),
        uid: req.credentials.map_or(-1, |c| i64::from(c.uid)),
        gid: req.credentials.map_or(-1, |c| i64::from(c.gid)),
        failed_step: 0,
        failed_errno: 0,
    };
    let mut stack = vec![0u8; CHILD_STACK_BYTES];

    let pid = table.spawn_owned(session, || {
        let pid = clone_vfork(&mut plan, &mut stack).map_err(|(step, errno)| setup(step)(errno))?;
        // SAFETY: the child has exec'd or exited (CLONE_VFORK); nobody writes the plan now.
        let (step, errno) = unsafe {
            (
                std::ptr::read_volatile(&plan.failed_step),
                std::ptr::read_volatile(&plan.failed_errno),
            )
        };
        if let Some(step) = ChildStep::from_raw(step) {
            // The child exited with 127; collect it here, it was never ours to wait for.
            let _ = nix::sys::wait::waitpid(pid, None);
            return Err(SpawnError::Child {
                program: program(),
                cwd: req.cwd.to_string_lossy().into_owned(),
                step,
                errno: Errno::from_raw(errno),
            });
        }
        Ok(pid)
    })?;
    let child = ChildProcess::adopt(pid, table.clone());
    // The child's ends close here; from now on EOF on a pipe means every
    // holder of the write end (the shell and anything it left behind) is gone.
    let pipes = match pipes {
        Some((stdin, (stdout_r, stdout_w), (stderr_r, stderr_w))) => {
            drop((stdout_w, stderr_w));
            ChildPipes {
                stdin: stdin.map(|(_, w)| w),
                stdout: Some(stdout_r),
                stderr: Some(stderr_r),
            }
        }
        None => ChildPipes {
            stdin: None,
            stdout: None,
            stderr: None,
        },
    };
    Ok((child, pipes))
}

/// Clones a child that shares our memory until it execs, with every signal
/// blocked around the clone so no handler of ours can run on the child's stack.
/// An error names the step that failed.
fn clone_vfork(plan: &mut ChildPlan, stack: &mut [u8]) -> Result<Pid, (&'static str, Errno)> {
    let mut saved = SigSet::empty();
    // Unblocked, a signal could run a handler of ours in the child, on its
    // stack and in our memory: no clone then.
    pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut saved),
    )
    .map_err(|errno| ("blocking signals", errno))?;
    // The stack grows down on every Linux target we support: pass its top, 16-byte aligned.
    let top = stack.as_mut_ptr_range().end;
    let top = top.wrapping_sub(top as usize % 16);
    // SAFETY: `child_main` only reads `plan` (alive until clone returns, since
    // CLONE_VFORK suspends us until the child execs or exits) and runs on
    // `stack`, which also outlives the child's use of it.
    let rc = unsafe {
        libc::clone(
            child_main,
            top.cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (plan as *mut ChildPlan).cast(),
        )
    };
    let clone_errno = Errno::last();
    if let Err(errno) = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&saved), None) {
        // Cannot happen with valid arguments; if it does, this thread keeps
        // every signal blocked, and the spawn fails without leaving a child.
        if rc > 0 {
            let pid = Pid::from_raw(rc);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
        }
        return Err(("restoring the signal mask", errno));
    }
    if rc < 0 {
        return Err(("clone", clone_errno));
    }
    Ok(Pid::from_raw(rc))
}

/// Runs in the cloned child, on its own stack, in the parent's memory, with
/// every signal blocked. Raw syscalls only; on failure it records the step and
/// errno in the plan and exits 127.
///
/// What the child must never do, and why. `CLONE_VM | CLONE_VFORK` without
/// `CLONE_SETTLS`: every byte the child writes is the daemon's memory, and
/// the child runs with the parent thread's thread pointer, so every
/// thread-local it touches is that thread's. The child can also end at any
/// instruction (exec, `_exit`, a SIGKILL from outside, the OOM killer once it
/// is in its cgroup). So it must never
/// - allocate (`Vec`, `String`, `format!`, `Box`): it would use the parent
///   thread's allocator cache, and a heap left half-updated by a child that
///   died mid-call corrupts the daemon; a completed allocation leaks at exec;
/// - lock anything (stdio, `tracing`, a `Mutex`, the allocator's arenas): a
///   lock taken and never released (the child execs or dies) stays taken in
///   the daemon, recorded as held by the parent's thread;
/// - log: it locks and allocates;
/// - panic: the panic machinery allocates its payload, bumps a thread-local
///   panic count and locks stderr, all in the daemon's memory. Hence no
///   `unwrap`, no `[]` indexing (each array is walked by a loop bounded by its
///   count, through a pointer the parent took from a slice of that length),
///   no arithmetic that can overflow.
///
/// The only per-thread state it does touch is glibc's own words of the
/// suspended parent thread: `errno` (set by a failing wrapper, read back here
/// for the report) and the cancellation state a cancellable wrapper (open,
/// write, close) sets and restores. The parent thread sleeps in `clone` until
/// we exec or exit, reads `errno` only when `clone` itself failed (then no
/// child ran), and the daemon never calls `pthread_cancel`.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the plan the parent passed; it stays valid until we
    // exec or exit, and the parent does not touch it meanwhile (suspended).
    let plan = unsafe { &mut *arg.cast::<ChildPlan>() };
    // SAFETY: every call below is a thin, async-signal-safe syscall wrapper on
    // pointers the parent prepared and keeps alive; nothing allocates, locks
    // or can panic (see the function's comment for the rules and why).
    unsafe {
        if let Err(step) = child_setup(plan) {
            std::ptr::write_volatile(&mut plan.failed_errno, *libc::__errno_location());
            std::ptr::write_volatile(&mut plan.failed_step, step as i32);
            libc::_exit(127);
        }
        libc::execve(plan.program, plan.argv, plan.envp);
        std::ptr::write_volatile(&mut plan.failed_errno, *libc::__errno_location());
        std::ptr::write_volatile(&mut plan.failed_step, ChildStep::Exec as i32);
        libc::_exit(127)
    }
}

/// The child's setup, in order. Returns the step that failed (errno is set).
///
/// 0. Join the command's cgroup (in every hierarchy: its leaf, or on v1
///    its session's node where it has no leaf), so this process and all
///    it will ever fork are inside it before the first instruction of the
///    command (adding the pid after spawn lets early grandchildren escape).
/// 1. Every signal back to its default disposition (the daemon ignores
///    SIGPIPE, and ignored signals survive exec; handlers would run in our memory).
/// 2. A new session: the command leads its own process group, killable as one;
///    with a terminal, it becomes the session's controlling terminal (TIOCSCTTY),
///    whose foreground group is then the command's.
/// 3. stdin, stdout, stderr at 0-2 and the state memfds (dup2 clears close-on-exec).
/// 4. oom_score_adj (raising it needs no privilege; done before the identity change).
/// 5. rlimits (while still privileged, so hard limits can be set as asked).
/// 6. No supplementary groups, the gid, then the uid (raw syscalls).
/// 7. The working directory, as the command's user.
/// 8. An empty signal mask, then the caller execs.
///
/// # Safety
/// Only in the cloned child, with `plan` prepared by [`spawn`].
unsafe fn child_setup(plan: &ChildPlan) -> Result<(), ChildStep> {
    // SAFETY: raw syscall wrappers on valid, parent-owned data; see the function's contract.
    unsafe {
        for i in 0..plan.cgroup_procs_count {
            let fd = *plan.cgroup_procs.add(i);
            if libc::write(fd, c"0".as_ptr().cast(), 1) < 0 {
                return Err(ChildStep::Cgroup);
            }
        }
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        for sig in 1..=64 {
            // SIGKILL, SIGSTOP and glibc's internal signals refuse (EINVAL);
            // that is fine. Any other failure leaves a disposition of ours.
            if libc::sigaction(sig, &dfl, std::ptr::null_mut()) < 0
                && *libc::__errno_location() != libc::EINVAL
            {
                return Err(ChildStep::Signals);
            }
        }
        if libc::setsid() < 0 {
            return Err(ChildStep::Session);
        }
        if plan.terminal >= 0 && libc::ioctl(plan.terminal, libc::TIOCSCTTY, 0) < 0 {
            return Err(ChildStep::Terminal);
        }
        let stdin = if plan.stdin >= 0 {
            plan.stdin
        } else {
            let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(ChildStep::Stdio);
            }
            fd
        };
        for (from, to) in [
            (stdin, 0),
            (plan.stdout, 1),
            (plan.stderr, 2),
            plan.state_fds[0],
            plan.state_fds[1],
            plan.state_fds[2],
        ] {
            let ok = if from < 0 {
                true
            } else if from == to {
                // dup2 onto itself keeps close-on-exec: clear it instead.
                libc::fcntl(to, libc::F_SETFD, 0) >= 0
            } else {
                libc::dup2(from, to) >= 0
            };
            if !ok {
                return Err(ChildStep::Stdio);
            }
        }
        if !plan.oom_score_adj.is_null() {
            let fd = libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd < 0 {
                return Err(ChildStep::OomScore);
            }
            let len = libc::strlen(plan.oom_score_adj);
            let written = libc::write(fd, plan.oom_score_adj.cast(), len);
            libc::close(fd);
            if written < 0 {
                return Err(ChildStep::OomScore);
            }
        }
        for i in 0..plan.rlimit_count {
            let l = &*plan.rlimits.add(i);
            let r = libc::rlimit {
                rlim_cur: l.soft,
                rlim_max: l.hard,
            };
            if libc::setrlimit(l.resource, &r) < 0 {
                return Err(ChildStep::Rlimit);
            }
        }
        if plan.uid >= 0
            && (libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) < 0
                || libc::syscall(libc::SYS_setgid, plan.gid as libc::gid_t) < 0
                || libc::syscall(libc::SYS_setuid, plan.uid as libc::uid_t) < 0)
        {
            return Err(ChildStep::Identity);
        }
        if libc::chdir(plan.cwd) < 0 {
            return Err(ChildStep::Cwd);
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) < 0 {
            return Err(ChildStep::Signals);
        }
    }
    Ok(())
}
