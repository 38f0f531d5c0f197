//! `exec.read`: a command's retained output from given offsets, waiting up to `wait_s` for more or for its end; any number of readers, from any connection of the owner's uid.

use std::sync::Arc;
use std::time::Duration;

use super::{Pending, cast};
use crate::actors::command_record::CommandRecord;
use crate::actors::registry::RegistryMsg;
use crate::context::Context;
use crate::protocol::commands::MAX_READ_WAIT_S;
use crate::protocol::{ReadParams, ReadResult, RequestError, parse_params};
use crate::server::Daemon;

pub(super) fn dispatch(
    daemon: &Daemon,
    uid: u32,
    params: &[u8],
) -> Result<Pending<ReadResult>, RequestError> {
    let p: ReadParams = parse_params(params)?;
    let wait = wait_param(p.wait_s)?;
    let record = find(daemon, uid, p.command_id)?;
    let max = daemon.ctx.live().commands.max_output_bytes.as_u64() as usize;
    let ctx = daemon.ctx.clone();
    Ok(Box::pin(async move {
        read(
            &ctx,
            record.await?,
            p.stdout_offset,
            p.stderr_offset,
            max,
            wait,
        )
        .await
    }))
}

/// Reads from the command's record, waiting up to `wait` for news. The
/// bytes copied for the answer are charged to the memory budget (twice: the
/// copy and its encoding) until it returns; from there to its frame's own
/// charge in the outbox there is no await, so the answer is never held
/// uncharged while other tasks run. No room, even after dropping the
/// connection with the most unsent bytes: `OVERLOADED`.
async fn read(
    ctx: &Context,
    record: Arc<CommandRecord>,
    stdout_offset: u64,
    stderr_offset: u64,
    max: usize,
    wait: Duration,
) -> Result<ReadResult, RequestError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut changes = record.output.subscribe();
    loop {
        // Read the end before the bytes: once ended, the bytes are final.
        let outcome = record.outcome();
        let (stdout, stderr) = record.output.read(stdout_offset, stderr_offset, max);
        let news = !stdout.data.is_empty() || !stderr.data.is_empty();
        if news || outcome.is_some() || tokio::time::Instant::now() >= deadline {
            let bytes = 2 * (stdout.data.len() + stderr.data.len()) as u64;
            let _charge = ctx.charge_request(bytes)?;
            let result = match outcome {
                Some(Err(e)) => return Err(e.clone()),
                Some(Ok(result)) => Some(result.clone()),
                None => None,
            };
            return Ok(ReadResult {
                stdout_offset: stdout.offset,
                stderr_offset: stderr.offset,
                stdout_next: stdout.next(),
                stderr_next: stderr.next(),
                stdout: serde_bytes::ByteBuf::from(stdout.data),
                stderr: serde_bytes::ByteBuf::from(stderr.data),
                done: result.is_some(),
                result,
            });
        }
        let _ = tokio::time::timeout_at(deadline, changes.changed()).await;
    }
}

/// `wait_s`: 0 (the default) to `MAX_READ_WAIT_S` seconds.
fn wait_param(wait_s: Option<f64>) -> Result<Duration, RequestError> {
    match wait_s {
        None => Ok(Duration::ZERO),
        Some(s) if s.is_finite() && (0.0..=MAX_READ_WAIT_S).contains(&s) => {
            Ok(Duration::from_secs_f64(s))
        }
        Some(s) => Err(RequestError::InvalidRequest(format!(
            "param `wait_s`: {s} is not a number of seconds from 0 to {MAX_READ_WAIT_S}"
        ))),
    }
}

/// Asks for the caller's command by id (`COMMAND_NOT_FOUND` for another
/// uid's, or an unknown or expired one); the answer comes from the returned future.
pub(super) fn find(
    daemon: &Daemon,
    uid: u32,
    command_id: String,
) -> Result<Pending<Arc<CommandRecord>>, RequestError> {
    let reply = cast(daemon, |reply| RegistryMsg::FindCommand {
        uid,
        command_id,
        reply,
    })?;
    Ok(Box::pin(async move { reply.await? }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_is_bounded() {
        assert_eq!(wait_param(None).unwrap(), Duration::ZERO);
        assert_eq!(wait_param(Some(60.0)).unwrap(), Duration::from_secs(60));
        for bad in [-1.0, 60.5, f64::NAN, f64::INFINITY] {
            let err = wait_param(Some(bad)).unwrap_err();
            assert!(err.to_string().contains("wait_s"), "{err}");
        }
    }
}
