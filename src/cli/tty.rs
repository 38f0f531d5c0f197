//! `sessiond run -t` (client side): the command on a pseudo-terminal of our terminal's size, our terminal in raw mode while it runs, keystrokes and window-size changes forwarded, as `ssh -t` and `docker exec -it` do.
//!
//! Raw mode is undone by [`RawMode`]'s `Drop`, so every way out of the run
//! restores the terminal: the command's end, an error, SIGINT/SIGTERM/SIGHUP
//! (caught, see [`super::run`]), a panic (the binary unwinds). Only SIGKILL
//! leaves it raw (`stty sane` repairs it), as with ssh.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use nix::sys::termios::{self, SetArg, Termios};
use sessiond::client::Client;
use sessiond::protocol::{Event, ExecParams, PtyParams};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use super::CliError;
use super::run::{Signals, Streamed, cancel, read_chunks};

/// The size a terminal reporting none (0 × 0) is taken to have.
const FALLBACK_SIZE: (u16, u16) = (24, 80);

/// A terminal switched to raw mode; its settings come back when this is dropped.
pub struct RawMode<'a> {
    fd: BorrowedFd<'a>,
    saved: Termios,
}

impl<'a> RawMode<'a> {
    /// Puts the terminal `fd` in raw mode (no echo, no line editing, no
    /// signals from keys: ^C, ^Z, ^D are bytes for the remote terminal).
    pub fn enter(fd: BorrowedFd<'a>) -> std::io::Result<RawMode<'a>> {
        let saved = termios::tcgetattr(fd)?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(fd, SetArg::TCSADRAIN, &raw)?;
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode<'_> {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(self.fd, SetArg::TCSADRAIN, &self.saved);
    }
}

/// The window size (rows, cols) of the terminal `fd`, if it is one; a
/// terminal that reports 0 × 0 (a serial line) is taken as 24 × 80.
pub fn window_size(fd: BorrowedFd<'_>) -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a `winsize` through a pointer valid for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    if rc < 0 {
        return None;
    }
    Some(if ws.ws_row == 0 || ws.ws_col == 0 {
        FALLBACK_SIZE
    } else {
        (ws.ws_row, ws.ws_col)
    })
}

/// Runs `params` on a pseudo-terminal of our terminal's size: raw mode on
/// our terminal (stdin) for the run, every byte typed sent as is, SIGWINCH
/// sent on as `exec.resize`, the output copied to our stdout. Our terminal
/// is back to its settings when this returns, whatever it returns.
pub(super) async fn interactive(
    client: &Client,
    mut params: ExecParams,
    signals: &mut Signals,
) -> Result<Streamed, CliError> {
    let stdin = std::io::stdin();
    let (rows, cols) = window_size(stdin.as_fd()).ok_or_else(|| {
        CliError::Usage(
            "-t needs a terminal on stdin (give the command one with ssh -t, or drop -t)".into(),
        )
    })?;
    params.pty = Some(PtyParams {
        rows: rows.into(),
        cols: cols.into(),
    });
    let mut winch = signal(SignalKind::window_change())?;
    let mut stream = client
        .exec_stream(params)
        .await
        .map_err(|e| CliError::from(e).during("running the command"))?;
    let _raw = RawMode::enter(stdin.as_fd())?;
    let mut keys = read_chunks(Box::new(std::io::stdin()));
    let (key_tx, key_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let mut key_tx = Some(key_tx);
    let mut command_id: Option<String> = None;
    let mut forward: Option<_> = None;
    let mut key_rx = Some(key_rx);
    let mut size = (rows, cols);
    loop {
        let event = tokio::select! {
            event = stream.next_event() => event.map_err(|e| CliError::from(e).during("running the command"))?,
            chunk = keys.recv(), if key_tx.is_some() => {
                match chunk {
                    Some(Ok(bytes)) => {
                        if let Some(tx) = &key_tx {
                            let _ = tx.send(bytes);
                        }
                    }
                    // Our terminal went away (or reads fail): nothing more to type.
                    _ => key_tx = None,
                }
                continue;
            }
            () = async { forward.as_mut().expect("polled only when set").await }, if forward.is_some() => {
                forward = None;
                continue;
            }
            _ = winch.recv() => {
                let now = window_size(std::io::stdin().as_fd()).unwrap_or(size);
                if let (Some(id), true) = (&command_id, now != size) {
                    size = now;
                    // A command that has just ended cannot be resized: no matter.
                    let _ = client.resize(id, now.0.into(), now.1.into()).await;
                }
                continue;
            }
            sig = signals.recv() => return cancel(client, command_id.as_deref(), sig).await,
        };
        match event {
            None => break,
            Some(Event::Started { command_id: id }) => {
                if let Some(rx) = key_rx.take() {
                    forward = Some(Box::pin(forward_keys(client, id.clone(), rx)));
                }
                command_id = Some(id);
            }
            Some(Event::Output { data, .. }) => {
                let mut out = std::io::stdout().lock();
                if out.write_all(&data).and_then(|()| out.flush()).is_err() {
                    return cancel(client, command_id.as_deref(), libc::SIGPIPE).await;
                }
            }
        }
    }
    let result = stream
        .result()
        .await
        .map_err(|e| CliError::from(e).during("running the command"))?;
    Ok(Streamed::Ended(Box::new(result)))
}

/// Types the keys, in order, into the command's terminal until the command
/// no longer takes them.
async fn forward_keys(client: &Client, id: String, mut keys: mpsc::UnboundedReceiver<Vec<u8>>) {
    while let Some(mut bytes) = keys.recv().await {
        // Keys typed while the last write was on its way go in one write.
        while let Ok(more) = keys.try_recv() {
            bytes.extend_from_slice(&more);
        }
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            match client.write(&id, rest, false).await {
                Ok(n) => rest = &rest[(n as usize).min(rest.len())..],
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// Raw mode on a pseudo-terminal of our own, and back on drop.
    #[test]
    fn raw_mode_is_undone_on_drop_and_sizes_read() {
        let pty = nix::pty::openpty(
            Some(&nix::pty::Winsize {
                ws_row: 0,
                ws_col: 0,
                ws_xpixel: 0,
                ws_ypixel: 0,
            }),
            None,
        )
        .unwrap();
        let slave = pty.slave.as_fd();
        let canonical = |fd| {
            termios::tcgetattr(fd)
                .unwrap()
                .local_flags
                .contains(termios::LocalFlags::ICANON | termios::LocalFlags::ECHO)
        };
        assert!(canonical(slave));
        {
            let _raw = RawMode::enter(slave).unwrap();
            let now = termios::tcgetattr(slave).unwrap();
            assert!(!now.local_flags.intersects(
                termios::LocalFlags::ICANON | termios::LocalFlags::ECHO | termios::LocalFlags::ISIG
            ));
        }
        assert!(canonical(slave));
        assert_eq!(window_size(slave), Some(FALLBACK_SIZE));
        let devnull = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(window_size(devnull.as_fd()), None);
    }
}
