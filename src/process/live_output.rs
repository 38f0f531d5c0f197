//! A command's output and stdin while it runs and after it ended, shared by the pump that fills them, the CommandActor that finishes them and every reader (`exec.read`, streaming `exec.run`) and writer (`exec.write`).
//!
//! Readers never go through an actor for bytes: they hold this object and
//! wait on its version, which moves on every push and at the end. Memory is
//! bounded by the two [`StreamBuffer`]s (see there); nothing here queues
//! per reader, so any number of readers cost nothing but their own reads.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::sync::watch;

use super::pty::{self, PtySize};
use super::stream_buffer::{Chunk, KeepOutput as Keep, StreamBuffer};

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Both output streams of one command, plus its stdin when it is kept open.
#[derive(Debug)]
pub struct LiveOutput {
    streams: Mutex<Streams>,
    /// Moves on every push and once at the end; readers wait on it.
    version: watch::Sender<u64>,
    stdin: tokio::sync::Mutex<Stdin>,
    /// The pseudo-terminal's master for `exec.resize` (apart from stdin, so a
    /// resize never waits behind a write to a command that does not read).
    terminal: Mutex<Terminal>,
}

#[derive(Debug)]
enum Terminal {
    /// Not started with a pseudo-terminal.
    None,
    Open(OwnedFd),
    /// The command ended: the daemon's last hold on the master is gone.
    Closed,
}

#[derive(Debug)]
struct Streams {
    stdout: StreamBuffer,
    stderr: StreamBuffer,
    /// When the command last wrote anything (for `idle_timeout_s`).
    last_output: Instant,
    ended: bool,
}

#[derive(Debug)]
enum Stdin {
    /// Not started with `stdin_open`: `exec.write` is refused.
    NotOpen,
    /// Open for `exec.write` (the pipe, once the command runs).
    Open(Option<pipe::Sender>),
    /// Closed by `eof`, by the command, or because the command ended.
    Closed,
}

/// Why an `exec.write` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WriteRefused {
    #[error("the command was not started with `stdin_open`")]
    NotOpen,
    #[error("the command's stdin is closed (by `eof` or by the command)")]
    Closed,
    #[error("the command has ended")]
    Ended,
}

/// Why an `exec.resize` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResizeRefused {
    #[error("the command was not started with a `pty`")]
    NoTerminal,
    #[error("the command has ended")]
    Ended,
    #[error("resizing its pseudo-terminal failed: {0}")]
    Failed(nix::errno::Errno),
}

/// Bytes written to stdin per `write` call, so a partial write can say how much went in.
const WRITE_CHUNK: usize = 64 * 1024;

impl LiveOutput {
    /// Empty streams keeping `cap` bytes each as `keep` says; stdin open for writes when `stdin_open`.
    pub fn new(cap: usize, keep: Keep, stdin_open: bool) -> LiveOutput {
        LiveOutput {
            streams: Mutex::new(Streams {
                stdout: StreamBuffer::new(cap, keep),
                stderr: StreamBuffer::new(cap, keep),
                last_output: Instant::now(),
                ended: false,
            }),
            version: watch::Sender::new(0),
            stdin: tokio::sync::Mutex::new(if stdin_open {
                Stdin::Open(None)
            } else {
                Stdin::NotOpen
            }),
            terminal: Mutex::new(Terminal::None),
        }
    }

    fn terminal(&self) -> std::sync::MutexGuard<'_, Terminal> {
        self.terminal.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, Streams> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes bytes the command wrote.
    pub fn push(&self, stream: Stream, bytes: &[u8]) {
        {
            let mut s = self.streams();
            match stream {
                Stream::Stdout => s.stdout.push(bytes),
                Stream::Stderr => s.stderr.push(bytes),
            }
            s.last_output = Instant::now();
        }
        self.version.send_modify(|v| *v += 1);
    }

    /// When the command last wrote to either stream (its start, if never).
    pub fn last_output(&self) -> Instant {
        self.streams().last_output
    }

    /// The command ended: close stdin and wake every reader. Readers see
    /// `ended()` from here on; the streams keep their window until [`Self::trim`].
    pub fn end(&self) {
        self.streams().ended = true;
        if let Ok(mut stdin) = self.stdin.try_lock() {
            if !matches!(*stdin, Stdin::NotOpen) {
                *stdin = Stdin::Closed;
            }
        }
        {
            let mut terminal = self.terminal();
            if matches!(*terminal, Terminal::Open(_)) {
                *terminal = Terminal::Closed;
            }
        }
        self.version.send_modify(|v| *v += 1);
    }

    /// Cuts each stream to its kept output (what a finished command retains).
    pub fn trim(&self) {
        let mut s = self.streams();
        s.stdout.finish();
        s.stderr.finish();
    }

    /// Drops every byte both streams hold (evicted under the memory budget).
    pub fn clear(&self) {
        let mut s = self.streams();
        s.stdout.clear();
        s.stderr.clear();
    }

    /// Whether [`Self::end`] was called.
    pub fn ended(&self) -> bool {
        self.streams().ended
    }

    /// Up to `max` bytes of each stream from the given offsets (see [`StreamBuffer::read`]).
    pub fn read(&self, stdout_offset: u64, stderr_offset: u64, max: usize) -> (Chunk, Chunk) {
        let s = self.streams();
        (
            s.stdout.read(stdout_offset, max),
            s.stderr.read(stderr_offset, max),
        )
    }

    /// The kept output of each stream, with (total bytes, truncated) of each.
    pub fn kept(&self) -> KeptOutput {
        let s = self.streams();
        KeptOutput {
            stdout: s.stdout.kept(),
            stderr: s.stderr.kept(),
            stdout_total: s.stdout.total(),
            stderr_total: s.stderr.total(),
            stdout_truncated: s.stdout.truncated(),
            stderr_truncated: s.stderr.truncated(),
        }
    }

    /// The ends of both streams (their total bytes).
    pub fn totals(&self) -> (u64, u64) {
        let s = self.streams();
        (s.stdout.total(), s.stderr.total())
    }

    /// Where bytes were dropped in the kept (stdout, stderr) (see [`StreamBuffer::cut_at`]).
    pub fn cut_at(&self) -> (Option<u64>, Option<u64>) {
        let s = self.streams();
        (s.stdout.cut_at(), s.stderr.cut_at())
    }

    /// Whether the result drops bytes of (stdout, stderr).
    pub fn truncated(&self) -> (bool, bool) {
        let s = self.streams();
        (s.stdout.truncated(), s.stderr.truncated())
    }

    /// Bytes held now by both streams.
    pub fn held(&self) -> usize {
        let s = self.streams();
        s.stdout.held() + s.stderr.held()
    }

    /// A receiver that sees every change from now on.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Keeps the command's stdin pipe for `exec.write` (started with
    /// `stdin_open`). Called before the command's id is handed out, so
    /// nobody else can hold the lock yet.
    pub fn install_stdin(&self, pipe: pipe::Sender) {
        if let Ok(mut stdin) = self.stdin.try_lock() {
            if let Stdin::Open(slot @ None) = &mut *stdin {
                *slot = Some(pipe);
            }
        }
    }

    /// Keeps a pseudo-terminal's master: `keys` (non-blocking) for
    /// `exec.write`, `window` for `exec.resize`. Called, like
    /// [`Self::install_stdin`], before the command's id is handed out, on a
    /// `LiveOutput` made with stdin open.
    pub fn install_terminal(&self, keys: pipe::Sender, window: OwnedFd) {
        *self.terminal() = Terminal::Open(window);
        self.install_stdin(keys);
    }

    /// Whether the command runs on a pseudo-terminal (its writes are keystrokes).
    pub fn is_terminal(&self) -> bool {
        !matches!(*self.terminal(), Terminal::None)
    }

    /// `exec.resize`: the terminal's new window size (the kernel sends
    /// SIGWINCH to its foreground process group).
    pub fn resize(&self, size: PtySize) -> Result<(), ResizeRefused> {
        match &*self.terminal() {
            Terminal::None => Err(ResizeRefused::NoTerminal),
            Terminal::Closed => Err(ResizeRefused::Ended),
            Terminal::Open(master) => {
                pty::set_size(master.as_fd(), size).map_err(ResizeRefused::Failed)
            }
        }
    }

    /// Writes the request's `stdin` bytes to the kept stdin pipe, however
    /// long the command takes to read them; `exec.write`s queue behind them.
    pub async fn feed_initial(&self, data: &[u8]) {
        let mut stdin = self.stdin.lock().await;
        if let Stdin::Open(Some(pipe)) = &mut *stdin {
            if pipe.write_all(data).await.is_err() {
                *stdin = Stdin::Closed;
            }
        }
    }

    /// Whether stdin is kept open for writes.
    pub fn stdin_open(&self) -> bool {
        self.stdin
            .try_lock()
            .map(|s| matches!(*s, Stdin::Open(_)))
            .unwrap_or(true)
    }

    /// `exec.write`: writes `data` to the command's stdin, then closes it
    /// when `eof` — on a pseudo-terminal, types its EOF character (^D) instead,
    /// and the terminal stays open. Writes are applied in the order they take the stdin lock
    /// (FIFO). A command that does not read makes this return after
    /// `timeout` with what was written.
    pub async fn write(
        &self,
        data: &[u8],
        eof: bool,
        timeout: Duration,
    ) -> Result<u64, WriteRefused> {
        let deadline = tokio::time::Instant::now() + timeout;
        let Ok(mut stdin) = tokio::time::timeout_at(deadline, self.stdin.lock()).await else {
            // Earlier bytes still wait for the command to read them.
            return Ok(0);
        };
        let pipe = match &mut *stdin {
            Stdin::NotOpen => return Err(WriteRefused::NotOpen),
            Stdin::Closed if self.ended() => return Err(WriteRefused::Ended),
            Stdin::Closed => return Err(WriteRefused::Closed),
            // The pipe is installed before the id is handed out: no pipe
            // means the command never got one (it failed to start).
            Stdin::Open(None) => return Err(WriteRefused::Ended),
            Stdin::Open(Some(pipe)) => pipe,
        };
        let mut written = 0usize;
        let mut broken = false;
        while written < data.len() {
            let end = (written + WRITE_CHUNK).min(data.len());
            match tokio::time::timeout_at(deadline, pipe.write(&data[written..end])).await {
                Ok(Ok(n)) => written += n,
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // EPIPE: the command closed its stdin or ended.
                Ok(Err(_)) => {
                    broken = true;
                    break;
                }
                Err(_) => break,
            }
        }
        if broken {
            *stdin = Stdin::Closed;
            if written == 0 {
                return Err(if self.ended() {
                    WriteRefused::Ended
                } else {
                    WriteRefused::Closed
                });
            }
        } else if eof && written == data.len() && self.is_terminal() {
            let key = [pty::eof_char(pipe.as_fd())];
            let _ = tokio::time::timeout_at(deadline, pipe.write_all(&key)).await;
        } else if eof && written == data.len() {
            if let Stdin::Open(Some(mut pipe)) = std::mem::replace(&mut *stdin, Stdin::Closed) {
                let _ = pipe.shutdown().await;
            }
        }
        if self.ended() {
            // The end could not close it while this write held the lock.
            *stdin = Stdin::Closed;
        }
        Ok(written as u64)
    }
}

/// What a finished command keeps of its output.
#[derive(Debug, Clone, Default)]
pub struct KeptOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_total: u64,
    pub stderr_total: u64,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readers_are_woken_by_output_and_by_the_end() {
        let out = std::sync::Arc::new(LiveOutput::new(16, Keep::Head, false));
        let mut rx = out.subscribe();
        let writer = out.clone();
        tokio::spawn(async move {
            writer.push(Stream::Stdout, b"hi");
            writer.end();
        });
        rx.changed().await.unwrap();
        let (o, _) = out.read(0, 0, 100);
        assert_eq!(o.data, b"hi");
        while !out.ended() {
            rx.changed().await.unwrap();
        }
        assert_eq!(out.kept().stdout, b"hi");
    }

    #[tokio::test]
    async fn writes_are_refused_with_the_reason() {
        let out = LiveOutput::new(16, Keep::Head, false);
        assert_eq!(
            out.write(b"x", false, Duration::from_secs(1)).await,
            Err(WriteRefused::NotOpen)
        );
        let open = LiveOutput::new(16, Keep::Head, true);
        let (tx, rx) = pipe::pipe().unwrap();
        open.install_stdin(tx);
        assert_eq!(
            open.write(b"abc", true, Duration::from_secs(1)).await,
            Ok(3)
        );
        assert_eq!(
            open.write(b"x", false, Duration::from_secs(1)).await,
            Err(WriteRefused::Closed)
        );
        let mut got = Vec::new();
        let mut rx = rx;
        tokio::io::AsyncReadExt::read_to_end(&mut rx, &mut got)
            .await
            .unwrap();
        assert_eq!(got, b"abc");
        open.end();
        assert_eq!(
            open.write(b"x", false, Duration::from_secs(1)).await,
            Err(WriteRefused::Ended)
        );
    }

    #[tokio::test]
    async fn a_write_to_a_command_that_does_not_read_returns_what_went_in() {
        let open = LiveOutput::new(16, Keep::Head, true);
        let (tx, _rx) = pipe::pipe().unwrap();
        open.install_stdin(tx);
        let data = vec![0u8; 1 << 20];
        let written = open
            .write(&data, false, Duration::from_millis(200))
            .await
            .unwrap();
        assert!(written > 0 && written < data.len() as u64, "{written}");
    }
}
