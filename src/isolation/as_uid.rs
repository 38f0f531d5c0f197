//! Short acts done as a session's uid (kill everything it runs, probe whether it can enter a directory), in a cloned child of the daemon; used by the uid pool, below the actors.
//!
//! The kernel decides both questions itself when the caller *is* that uid:
//! `kill(-1, SIGKILL)` reaches exactly the processes the uid may signal (all
//! of its own, in one pass over the task list, so a fork loop cannot outrun
//! it), and `access(X_OK)` applies modes, ACLs and every path component as a
//! command would meet them. The child is cloned like a command
//! (`CLONE_VM|CLONE_VFORK`, raw syscalls only; see `process/spawn.rs`), but
//! with no exit signal: it is a "clone child" that only `__WCLONE` waits
//! for, so the orphan reaper (a plain `waitpid` by pid) can never take its status.

use std::ffi::CStr;

use nix::errno::Errno;

/// Stack of the cloned child; it makes a handful of syscalls.
const STACK_BYTES: usize = 16 * 1024;

/// What the child does once it is the uid.
enum Act {
    /// `kill(-1, SIGKILL)`: every process the uid may signal, except itself.
    KillAll,
    /// `access(path, X_OK)`: may the uid enter this directory?
    Enter(*const libc::c_char),
}

#[repr(C)]
struct Plan {
    uid: libc::uid_t,
    gid: libc::gid_t,
    act: Act,
}

/// Sends SIGKILL to every process `uid` may signal (all of its own).
pub fn kill_all(uid: u32, gid: u32) -> Result<(), Errno> {
    match run(&Plan {
        uid,
        gid,
        act: Act::KillAll,
    })? {
        0 => Ok(()),
        errno => Err(Errno::from_raw(errno)),
    }
}

/// Whether `uid` (with `gid` and no supplementary groups) may enter `dir`;
/// `Err` is the errno the uid would get (EACCES, ENOENT, …).
pub fn can_enter(uid: u32, gid: u32, dir: &CStr) -> Result<(), Errno> {
    match run(&Plan {
        uid,
        gid,
        act: Act::Enter(dir.as_ptr()),
    })? {
        0 => Ok(()),
        errno => Err(Errno::from_raw(errno)),
    }
}

/// Clones the child, waits for it, returns its exit code (0, or an errno).
/// Blocking (it waits for the child): call it off the async workers.
fn run(plan: &Plan) -> Result<i32, Errno> {
    let mut stack = vec![0u8; STACK_BYTES];
    let top = stack.as_mut_ptr_range().end;
    let top = top.wrapping_sub(top as usize % 16);
    // SAFETY: sigset_t is plain data; sigfillset initialises it.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut saved: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to initialised sigsets. Every signal is blocked
    // around the clone so no handler of ours runs on the child's stack.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut saved);
    }
    // SAFETY: `child` only reads `plan` (alive until clone returns: CLONE_VFORK
    // suspends us until the child exits) and runs on `stack`, which outlives it.
    // Exit signal 0: a clone child, waited for with __WCLONE below.
    let pid = unsafe {
        libc::clone(
            child,
            top.cast(),
            libc::CLONE_VM | libc::CLONE_VFORK,
            (plan as *const Plan).cast_mut().cast(),
        )
    };
    let clone_errno = Errno::last();
    // SAFETY: restores the mask saved above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &saved, std::ptr::null_mut());
    }
    if pid < 0 {
        return Err(clone_errno);
    }
    let mut status = 0;
    loop {
        // SAFETY: waits for our own clone child by pid; status is a valid local.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::__WCLONE) };
        if rc == pid {
            break;
        }
        match Errno::last() {
            Errno::EINTR => continue,
            e => return Err(e),
        }
    }
    if libc::WIFEXITED(status) {
        Ok(libc::WEXITSTATUS(status))
    } else {
        Err(Errno::ECHILD)
    }
}

/// The cloned child: drop to the uid (no supplementary groups, the gid, the
/// uid — raw syscalls, as in `process/spawn.rs`), act, exit with 0 or the errno.
extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the plan the parent passed; it stays valid until we exit.
    let plan = unsafe { &*arg.cast::<Plan>() };
    // SAFETY: raw, async-signal-safe syscalls on data the parent keeps alive.
    unsafe {
        if libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) < 0
            || libc::syscall(libc::SYS_setgid, plan.gid) < 0
            || libc::syscall(libc::SYS_setuid, plan.uid) < 0
        {
            libc::_exit(*libc::__errno_location() & 0xff);
        }
        let rc = match plan.act {
            Act::KillAll => libc::kill(-1, libc::SIGKILL),
            Act::Enter(path) => libc::access(path, libc::X_OK),
        };
        if rc < 0 {
            let errno = *libc::__errno_location();
            // kill(-1) with nobody to signal is ESRCH: nothing left is success.
            if matches!(plan.act, Act::KillAll) && errno == libc::ESRCH {
                libc::_exit(0);
            }
            libc::_exit(errno & 0xff);
        }
        libc::_exit(0)
    }
}
