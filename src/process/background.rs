//! Output of a session's background writers after their command answered (in the process table, per session): read and discarded within a byte rate, on a bounded number of pipes, until EOF or the session's end.
//!
//! `(yes &); true` leaves a writer holding the command's pipes. Closing our
//! end would kill it with SIGPIPE at its next write; reading as fast as it
//! writes cost the daemon 2.95 s of CPU per 5 s (docs/design-notes.md,
//! "Ending a command"). So each session gets one byte budget shared by all
//! its leftover pipes ([`Budget`]): a pipe is read when the budget allows,
//! and a faster writer blocks on the full pipe, which costs nothing. The
//! pipes are bounded too: past `max_pipes` per session the oldest is closed
//! (its writer gets EPIPE or SIGPIPE) and counted.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::unix::pipe;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::table::SessionKey;

/// `sessions.background_drain_rate` and `sessions.max_background_pipes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackgroundLimits {
    /// Bytes per second per session, all its leftover pipes together.
    pub rate: u64,
    /// Pipes kept per session; past it the oldest is closed.
    pub max_pipes: usize,
}

impl Default for BackgroundLimits {
    fn default() -> Self {
        BackgroundLimits {
            rate: 8 << 20,
            max_pipes: 64,
        }
    }
}

/// Every session's leftover pipes, and the drain tasks reading them.
#[derive(Debug, Default)]
pub struct BackgroundDrains {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    limits: BackgroundLimits,
    sessions: Mutex<HashMap<SessionKey, SessionPipes>>,
    next_id: AtomicU64,
    closed: AtomicU64,
}

/// One session's pipes, oldest first; dropping it ends their drains.
#[derive(Debug)]
struct SessionPipes {
    budget: Arc<Budget>,
    pipes: VecDeque<(u64, AbortHandle)>,
}

impl Drop for SessionPipes {
    fn drop(&mut self) {
        for (_, task) in &self.pipes {
            task.abort();
        }
    }
}

impl BackgroundDrains {
    /// Empty, with these limits.
    pub fn new(limits: BackgroundLimits) -> BackgroundDrains {
        // Opened now, at start, not at the first drain: one fd for the
        // daemon's life, not one that appears later (and looks like a leak).
        let _ = dev_null();
        BackgroundDrains {
            inner: Arc::new(Inner {
                limits,
                ..Default::default()
            }),
        }
    }

    /// Drains `pipes` (a command's stdout and stderr that background writers
    /// still hold) for `session` within its budget, until EOF or
    /// [`Self::forget`]. Call from inside the runtime.
    pub fn adopt(&self, session: SessionKey, pipes: impl IntoIterator<Item = pipe::Receiver>) {
        for rx in pipes {
            let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
            let mut sessions = self.inner.lock();
            let entry = sessions.entry(session).or_insert_with(|| SessionPipes {
                budget: Arc::new(Budget::new(self.inner.limits.rate)),
                pipes: VecDeque::new(),
            });
            while entry.pipes.len() >= self.inner.limits.max_pipes {
                let Some((_, oldest)) = entry.pipes.pop_front() else {
                    break;
                };
                // Aborting drops its receiver: the read end closes.
                oldest.abort();
                self.inner.closed.fetch_add(1, Ordering::Relaxed);
            }
            let inner = self.inner.clone();
            let budget = entry.budget.clone();
            // Spawned under the lock, so the task's own removal at EOF comes after its insertion.
            let task = tokio::spawn(async move {
                drain(rx, &budget).await;
                inner.finished(session, id);
            });
            entry.pipes.push_back((id, task.abort_handle()));
        }
    }

    /// The session ended: stop draining its pipes and close them.
    pub fn forget(&self, session: SessionKey) {
        let gone = self.inner.lock().remove(&session);
        drop(gone);
    }

    /// Pipes of `session` drained now.
    pub fn open_pipes(&self, session: SessionKey) -> usize {
        self.inner.lock().get(&session).map_or(0, |s| s.pipes.len())
    }

    /// Pipes closed so far because a session had `max_pipes` open.
    pub fn closed_total(&self) -> u64 {
        self.inner.closed.load(Ordering::Relaxed)
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionKey, SessionPipes>> {
        // Each operation is one insert, remove or pop: nothing is half-done on a panic.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A pipe reached EOF (every writer gone).
    fn finished(&self, session: SessionKey, id: u64) {
        let mut sessions = self.lock();
        if let Some(s) = sessions.get_mut(&session) {
            s.pipes.retain(|(pipe, _)| *pipe != id);
            if s.pipes.is_empty() {
                sessions.remove(&session);
            }
        }
    }
}

/// One session's drain budget: a token bucket of one read's depth. Each read
/// moves the time the next may start by its size over the rate, so all the
/// session's pipes together get `rate` bytes per second.
#[derive(Debug)]
struct Budget {
    rate: f64,
    chunk: usize,
    next: Mutex<Instant>,
}

/// How large an adopted pipe is made, and the most one read takes: fewer,
/// larger reads (8 MiB/s through the default 64 KiB pipes is 128 wake-ups a
/// second per session). The pipe's pages are charged to the writer's memory
/// cgroup, not the daemon.
const PIPE_SIZE: usize = 256 * 1024;

impl Budget {
    fn new(rate: u64) -> Budget {
        // About 16 reads a second at most, each between 4 KiB and a pipeful.
        let chunk = (rate / 16).clamp(4096, PIPE_SIZE as u64) as usize;
        Budget {
            rate: rate.max(1) as f64,
            chunk,
            next: Mutex::new(Instant::now()),
        }
    }

    /// Discards what `rx` holds, up to one chunk, if the budget allows now;
    /// `Err(until)` when it does not.
    fn try_discard(&self, rx: &pipe::Receiver) -> Result<std::io::Result<usize>, Instant> {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if *next > now {
            return Err(*next);
        }
        let read = rx.try_io(|| discard(rx, self.chunk));
        if let Ok(n) = read {
            // Unused budget does not pile up beyond one read.
            *next = now + Duration::from_secs_f64(n as f64 / self.rate);
        }
        Ok(read)
    }
}

/// The daemon's one /dev/null, open for writing (close-on-exec, as std opens files).
fn dev_null() -> Option<&'static std::fs::File> {
    static DEV_NULL: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();
    DEV_NULL
        .get_or_init(|| {
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/null")
                .ok()
        })
        .as_ref()
}

/// Moves up to `max` bytes from the pipe to /dev/null in the kernel (no copy,
/// no buffer of ours); 0 at EOF, WouldBlock when empty.
fn discard(rx: &pipe::Receiver, max: usize) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let n = match dev_null() {
        // SAFETY: both fds are open for the call (we hold `rx` and the static
        // file); null offsets mean "the current position", which pipes require.
        Some(null) => unsafe {
            libc::splice(
                rx.as_raw_fd(),
                std::ptr::null_mut(),
                null.as_raw_fd(),
                std::ptr::null_mut(),
                max,
                libc::SPLICE_F_NONBLOCK,
            )
        },
        // No /dev/null (a bare chroot): read and drop instead.
        None => {
            let mut buf = [0u8; 4096];
            // SAFETY: reads at most the buffer's length into it, from a pipe fd we hold.
            unsafe { libc::read(rx.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) }
        }
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Makes the pipe hold [`PIPE_SIZE`] (best effort: the default stays on failure).
fn enlarge(rx: &pipe::Receiver) {
    use std::os::fd::AsRawFd;
    // SAFETY: F_SETPIPE_SZ on a pipe fd we hold; the result is only checked.
    let _ = unsafe { libc::fcntl(rx.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as libc::c_int) };
}

/// Reads `rx` to EOF within `budget`, discarding what it reads.
async fn drain(rx: pipe::Receiver, budget: &Budget) {
    enlarge(&rx);
    loop {
        if rx.readable().await.is_err() {
            return;
        }
        match budget.try_discard(&rx) {
            Err(until) => tokio::time::sleep_until(until).await,
            Ok(Ok(0)) => return,
            Ok(Ok(_)) => {}
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) => {}
            Ok(Err(_)) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A pipe whose write end is written by a thread: `total` bytes, then closed.
    fn writer(total: usize) -> (pipe::Receiver, std::thread::JoinHandle<std::io::Result<()>>) {
        let (rx, tx) = std::io::pipe().unwrap();
        let rx = pipe::Receiver::from_owned_fd(rx.into()).unwrap();
        let thread = std::thread::spawn(move || {
            let mut tx = tx;
            let block = vec![b'y'; 8192];
            let mut left = total;
            while left > 0 {
                let n = left.min(block.len());
                tx.write_all(&block[..n])?;
                left -= n;
            }
            Ok(())
        });
        (rx, thread)
    }

    async fn wait_finished(d: &BackgroundDrains, session: SessionKey) {
        while d.open_pipes(session) > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_sessions_pipes_share_one_rate_and_writers_are_slowed_not_broken() {
        let d = BackgroundDrains::new(BackgroundLimits {
            rate: 1 << 20,
            max_pipes: 64,
        });
        // 1.5 MiB over two pipes of one session at 1 MiB/s: at least ~1.3 s
        // together (what the pipe buffers hold is read without waiting); each
        // pipe alone at that rate would take half.
        let (a, wa) = writer(768 << 10);
        let (b, wb) = writer(768 << 10);
        let started = std::time::Instant::now();
        d.adopt(7, [a, b]);
        assert_eq!(d.open_pipes(7), 2);
        wait_finished(&d, 7).await;
        let took = started.elapsed();
        // Every byte was written: no EPIPE, no SIGPIPE.
        wa.join().unwrap().unwrap();
        wb.join().unwrap().unwrap();
        assert!(took >= Duration::from_millis(1200), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert_eq!(d.closed_total(), 0);
    }

    #[tokio::test]
    async fn past_the_pipe_bound_the_oldest_is_closed_and_counted() {
        let d = BackgroundDrains::new(BackgroundLimits {
            rate: 1 << 20,
            max_pipes: 2,
        });
        let (keep_rx, keep_tx) = std::io::pipe().unwrap();
        d.adopt(1, [pipe::Receiver::from_owned_fd(keep_rx.into()).unwrap()]);
        let mut writers = Vec::new();
        for _ in 0..2 {
            let (rx, tx) = std::io::pipe().unwrap();
            d.adopt(1, [pipe::Receiver::from_owned_fd(rx.into()).unwrap()]);
            writers.push(tx);
        }
        assert_eq!(d.open_pipes(1), 2);
        assert_eq!(d.closed_total(), 1);
        // The first pipe's read end is gone: its writer gets EPIPE (Rust ignores SIGPIPE).
        let mut keep_tx = keep_tx;
        let mut broken = false;
        for _ in 0..1000 {
            if keep_tx.write_all(b"x").is_err() {
                broken = true;
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(broken, "the oldest pipe was not closed");
        // Another session has its own bound.
        let (rx, _tx) = std::io::pipe().unwrap();
        d.adopt(2, [pipe::Receiver::from_owned_fd(rx.into()).unwrap()]);
        assert_eq!(d.closed_total(), 1);
        d.forget(1);
        d.forget(2);
    }

    #[tokio::test]
    async fn forgetting_a_session_closes_its_pipes() {
        let d = BackgroundDrains::default();
        let (rx, tx) = std::io::pipe().unwrap();
        d.adopt(3, [pipe::Receiver::from_owned_fd(rx.into()).unwrap()]);
        d.forget(3);
        assert_eq!(d.open_pipes(3), 0);
        let mut tx = tx;
        let mut broken = false;
        for _ in 0..1000 {
            if tx.write_all(b"x").is_err() {
                broken = true;
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(broken, "the drain outlived its session");
        assert_eq!(d.closed_total(), 0, "a session's end is not a bound");
    }
}
