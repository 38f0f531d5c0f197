//! `exec.resize`: a new window size for a running command's pseudo-terminal (the kernel sends SIGWINCH to its foreground process group).

use super::Pending;
use super::exec_read::find;
use crate::process::live_output::ResizeRefused;
use crate::process::pty::{MAX_DIMENSION, PtySize};
use crate::protocol::{RequestError, ResizeParams, ResizeResult, parse_params};
use crate::server::Daemon;

pub(super) fn dispatch(
    daemon: &Daemon,
    uid: u32,
    params: &[u8],
) -> Result<Pending<ResizeResult>, RequestError> {
    let p: ResizeParams = parse_params(params)?;
    let size = pty_size("", p.rows, p.cols)?;
    let record = find(daemon, uid, p.command_id)?;
    Ok(Box::pin(async move {
        let record = record.await?;
        record
            .output
            .resize(size)
            .map_err(|refused| match refused {
                ResizeRefused::Failed(_) => {
                    RequestError::Internal(format!("cannot resize: {refused}"))
                }
                _ => RequestError::InvalidRequest(format!("cannot resize: {refused}")),
            })?;
        Ok(ResizeResult { resized: true })
    }))
}

/// A terminal size from its params (`prefix` names where they sit: "" or
/// "pty."): each of `rows` and `cols` between 1 and [`MAX_DIMENSION`].
pub(super) fn pty_size(prefix: &str, rows: u64, cols: u64) -> Result<PtySize, RequestError> {
    let dimension = |name: &str, value: u64| {
        u16::try_from(value)
            .ok()
            .filter(|v| (1..=MAX_DIMENSION).contains(v))
            .ok_or_else(|| {
                RequestError::InvalidRequest(format!(
                    "param `{prefix}{name}`: {value} is not a terminal size (1 to {MAX_DIMENSION})"
                ))
            })
    };
    Ok(PtySize {
        rows: dimension("rows", rows)?,
        cols: dimension("cols", cols)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_bounded_and_the_key_is_named() {
        assert_eq!(
            pty_size("pty.", 24, 80).unwrap(),
            PtySize { rows: 24, cols: 80 }
        );
        let max = u64::from(MAX_DIMENSION);
        assert!(pty_size("", max, max).is_ok());
        for (rows, cols, key) in [
            (0, 80, "`pty.rows`"),
            (24, 0, "`pty.cols`"),
            (max + 1, 80, "`pty.rows`"),
            (24, u64::MAX, "`pty.cols`"),
        ] {
            let err = pty_size("pty.", rows, cols).unwrap_err();
            assert_eq!(err.code(), "INVALID_REQUEST");
            assert!(err.to_string().contains(key), "{err}");
        }
    }
}
