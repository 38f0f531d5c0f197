//! The spawn path: `posix_spawn` of the shell with its pipes, cwd and a new session; no code of ours runs in the child.
//!
//! Why not `std::process::Command` with `pre_exec`: a `pre_exec` hook forces a
//! full `fork()`, whose cost grows with the daemon's memory (design-rules:
//! 0.6 ms idle, 36 ms at +1 GiB). glibc's `posix_spawn` uses
//! `clone(CLONE_VM|CLONE_VFORK)`, so its cost stays flat (≈0.5 ms), and every
//! step between clone and exec is a file action or attribute carried out by
//! libc with raw syscalls (dup2, open, chdir, setsid, sigprocmask). We call
//! libc directly because nix's wrapper lacks `addchdir_np` and `SETSID`, and
//! std's would not hand us the extra state pipe or the rusage of the child.

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::unistd::{Pid, pipe2};

use super::child::ChildProcess;
use super::table::{ProcessTable, SessionKey};

/// The fd number at which the shell wrapper writes the session state (cwd, env).
pub const STATE_FD: i32 = 3;

/// What to start.
pub struct SpawnRequest<'a> {
    /// Absolute path of the program (the session's shell).
    pub program: &'a CStr,
    /// argv, including argv[0].
    pub argv: &'a [CString],
    /// The complete environment, `KEY=VALUE`.
    pub envp: &'a [CString],
    /// Working directory of the child.
    pub cwd: &'a CStr,
    /// Whether the child gets a stdin pipe (else /dev/null).
    pub with_stdin: bool,
}

/// The parent's ends of the child's pipes (all close-on-exec).
pub struct ChildPipes {
    pub stdin: Option<OwnedFd>,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub state: OwnedFd,
}

/// Why a spawn failed: carries the program, the cwd and the errno.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot start {program} in {cwd}: {errno}")]
    Spawn {
        program: String,
        cwd: String,
        errno: Errno,
    },
    #[error("cannot set up the spawn of {program}: {step}: {errno}")]
    Setup {
        program: String,
        step: &'static str,
        errno: Errno,
    },
}

/// RAII owner of a `posix_spawn_file_actions_t`.
struct FileActions(libc::posix_spawn_file_actions_t);

impl FileActions {
    fn new() -> Result<Self, Errno> {
        let mut raw = std::mem::MaybeUninit::uninit();
        // SAFETY: init writes a valid object into `raw`; we only assume it is
        // initialised when init returned 0.
        let rc = unsafe { libc::posix_spawn_file_actions_init(raw.as_mut_ptr()) };
        if rc != 0 {
            return Err(Errno::from_raw(rc));
        }
        // SAFETY: init succeeded, so `raw` is initialised.
        Ok(FileActions(unsafe { raw.assume_init() }))
    }

    fn dup2(&mut self, fd: i32, target: i32) -> Result<(), Errno> {
        // SAFETY: self.0 is an initialised file-actions object; fd is open in
        // the parent for the duration of the spawn.
        check(unsafe { libc::posix_spawn_file_actions_adddup2(&mut self.0, fd, target) })
    }

    fn open_read(&mut self, target: i32, path: &CStr) -> Result<(), Errno> {
        // SAFETY: initialised object; glibc copies `path`.
        check(unsafe {
            libc::posix_spawn_file_actions_addopen(
                &mut self.0,
                target,
                path.as_ptr(),
                libc::O_RDONLY,
                0,
            )
        })
    }

    fn chdir(&mut self, dir: &CStr) -> Result<(), Errno> {
        // SAFETY: initialised object; glibc copies `dir`.
        check(unsafe { libc::posix_spawn_file_actions_addchdir_np(&mut self.0, dir.as_ptr()) })
    }
}

impl Drop for FileActions {
    fn drop(&mut self) {
        // SAFETY: self.0 was initialised by `new` and is destroyed once.
        unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
    }
}

/// RAII owner of a `posix_spawnattr_t`.
struct SpawnAttr(libc::posix_spawnattr_t);

impl SpawnAttr {
    /// New session (so pgid = pid and the group can be killed as one),
    /// every signal back to its default disposition (the daemon ignores
    /// SIGPIPE, and ignored signals survive exec), an empty signal mask.
    fn new_session_default_signals() -> Result<Self, Errno> {
        let mut raw = std::mem::MaybeUninit::uninit();
        // SAFETY: init writes a valid object into `raw`.
        let rc = unsafe { libc::posix_spawnattr_init(raw.as_mut_ptr()) };
        if rc != 0 {
            return Err(Errno::from_raw(rc));
        }
        // SAFETY: init succeeded.
        let mut attr = SpawnAttr(unsafe { raw.assume_init() });
        let mut all: libc::sigset_t = unsafe_zeroed_sigset();
        let mut none: libc::sigset_t = unsafe_zeroed_sigset();
        // SAFETY: both sets are valid, writable sigset_t values.
        unsafe {
            libc::sigfillset(&mut all);
            libc::sigemptyset(&mut none);
        }
        // SAFETY: attr.0 is initialised; the sets are initialised above.
        check(unsafe { libc::posix_spawnattr_setsigdefault(&mut attr.0, &all) })?;
        // SAFETY: as above.
        check(unsafe { libc::posix_spawnattr_setsigmask(&mut attr.0, &none) })?;
        let flags = libc::POSIX_SPAWN_SETSID
            | libc::POSIX_SPAWN_SETSIGDEF as libc::c_short
            | libc::POSIX_SPAWN_SETSIGMASK as libc::c_short;
        // SAFETY: attr.0 is initialised.
        check(unsafe { libc::posix_spawnattr_setflags(&mut attr.0, flags) })?;
        Ok(attr)
    }
}

impl Drop for SpawnAttr {
    fn drop(&mut self) {
        // SAFETY: initialised by `new_session_default_signals`, destroyed once.
        unsafe { libc::posix_spawnattr_destroy(&mut self.0) };
    }
}

fn unsafe_zeroed_sigset() -> libc::sigset_t {
    // SAFETY: sigset_t is a plain bit array; all-zero is a valid (empty) value.
    unsafe { std::mem::zeroed() }
}

fn check(rc: libc::c_int) -> Result<(), Errno> {
    if rc == 0 {
        Ok(())
    } else {
        Err(Errno::from_raw(rc))
    }
}

fn cloexec_pipe() -> Result<(OwnedFd, OwnedFd), Errno> {
    pipe2(OFlag::O_CLOEXEC)
}

/// Starts `req.program` with stdout, stderr and the state pipe at fds 1, 2, 3,
/// stdin from a pipe or /dev/null, in `req.cwd`, as the leader of a new
/// session. The pid is recorded in `table` under its lock before anyone can
/// reap it.
pub fn spawn(
    table: &Arc<ProcessTable>,
    session: SessionKey,
    req: &SpawnRequest<'_>,
) -> Result<(ChildProcess, ChildPipes), SpawnError> {
    let program = req.program.to_string_lossy().into_owned();
    let setup = |step: &'static str| {
        let program = program.clone();
        move |errno| SpawnError::Setup {
            program,
            step,
            errno,
        }
    };

    let stdin = if req.with_stdin {
        Some(cloexec_pipe().map_err(setup("stdin pipe"))?)
    } else {
        None
    };
    let (stdout_r, stdout_w) = cloexec_pipe().map_err(setup("stdout pipe"))?;
    let (stderr_r, stderr_w) = cloexec_pipe().map_err(setup("stderr pipe"))?;
    let (state_r, state_w) = cloexec_pipe().map_err(setup("state pipe"))?;

    let mut actions = FileActions::new().map_err(setup("file actions"))?;
    match &stdin {
        Some((r, _)) => actions.dup2(r.as_raw_fd(), 0),
        None => actions.open_read(0, c"/dev/null"),
    }
    .map_err(setup("stdin"))?;
    actions
        .dup2(stdout_w.as_raw_fd(), 1)
        .map_err(setup("stdout"))?;
    actions
        .dup2(stderr_w.as_raw_fd(), 2)
        .map_err(setup("stderr"))?;
    actions
        .dup2(state_w.as_raw_fd(), STATE_FD)
        .map_err(setup("state fd"))?;
    actions.chdir(req.cwd).map_err(setup("cwd"))?;
    let attr = SpawnAttr::new_session_default_signals().map_err(setup("attributes"))?;

    let mut argv: Vec<*mut libc::c_char> = req.argv.iter().map(|a| a.as_ptr().cast_mut()).collect();
    argv.push(std::ptr::null_mut());
    let mut envp: Vec<*mut libc::c_char> = req.envp.iter().map(|e| e.as_ptr().cast_mut()).collect();
    envp.push(std::ptr::null_mut());

    let pid = table.spawn_owned(session, || {
        let mut pid: libc::pid_t = 0;
        // SAFETY: program, argv and envp are NUL-terminated C strings kept
        // alive by `req` for this call; both arrays end with a null pointer;
        // actions and attr are initialised. posix_spawn does not keep them.
        let rc = unsafe {
            libc::posix_spawn(
                &mut pid,
                req.program.as_ptr(),
                &actions.0,
                &attr.0,
                argv.as_ptr(),
                envp.as_ptr(),
            )
        };
        if rc == 0 {
            Ok(Pid::from_raw(pid))
        } else {
            Err(SpawnError::Spawn {
                program: program.clone(),
                cwd: req.cwd.to_string_lossy().into_owned(),
                errno: Errno::from_raw(rc),
            })
        }
    })?;
    // The child's ends close here; from now on EOF on a pipe means every
    // holder of the write end (the shell and anything it left behind) is gone.
    drop((stdout_w, stderr_w, state_w));

    let child = ChildProcess::adopt(pid, table.clone());
    let pipes = ChildPipes {
        stdin: stdin.map(|(_, w)| w),
        stdout: stdout_r,
        stderr: stderr_r,
        state: state_r,
    };
    Ok((child, pipes))
}
