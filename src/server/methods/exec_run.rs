//! `exec.run`: params → a validated [`ExecRequest`] → registry → session → CommandActor; then it waits for the command's end inside the daemon (the same path as `exec.start`), streaming `started` and `output` events first when asked.

use std::sync::Arc;

use super::{Pending, cast, env_param};
use crate::actors::command_record::CommandRecord;
use crate::actors::registry::RegistryMsg;
use crate::actors::session::ExecRequest;
use crate::config::Config;
use crate::process::shell::MAX_ARG_BYTES;
use crate::protocol::{
    Event, ExecParams, ExecResult, RequestError, StreamName, parse_params, seconds_param,
};
use crate::server::Daemon;
use crate::server::connection::{EventSink, Offer};

/// Bytes of one stream in one output event, at most.
const EVENT_CHUNK: usize = 64 * 1024;

/// Unsent bytes on the connection above which no output event is made: a
/// client that does not keep up misses events (the offsets show the gap)
/// instead of holding the command back or growing the daemon.
const EVENT_BACKLOG: usize = 256 * 1024;

/// How long a stream whose event was shed (memory budget full) waits before
/// it tries again, when its own connection's queue does not move first.
const SHED_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

pub(super) fn dispatch(
    daemon: &Daemon,
    uid: u32,
    params: &[u8],
    events: EventSink,
) -> Result<Pending<ExecResult>, RequestError> {
    let (session_id, request, stream) = parse(&daemon.ctx.live(), params)?;
    if request.pty.is_some() && !stream {
        return Err(RequestError::InvalidRequest(
            "param `pty`: only with `stream: true` (or `exec.start`): a terminal's output comes as it is typed at".into(),
        ));
    }
    if request.stdin_open && !stream {
        return Err(RequestError::InvalidRequest(
            "param `stdin_open`: only with `stream: true`, whose `started` event gives the command id to write to".into(),
        ));
    }
    let record = start(daemon, uid, session_id, request)?;
    Ok(Box::pin(async move {
        let record = record.await?;
        if stream && !stream_events(&record, &events).await {
            // The connection is gone: nobody to answer, and the command runs
            // on (readable by id); stop holding the connection's slot for it.
            return Err(RequestError::Internal("the connection closed".into()));
        }
        match record.ended().await {
            Ok(result) => Ok(record.exec_result(result)),
            Err(e) => Err(e.clone()),
        }
    }))
}

/// Starts a command (`exec.start` and `exec.run` alike): sends it to the
/// registry now; the returned future gives its record once it runs.
pub(super) fn start(
    daemon: &Daemon,
    uid: u32,
    session_id: String,
    request: ExecRequest,
) -> Result<Pending<Arc<CommandRecord>>, RequestError> {
    let reply = cast(daemon, |reply| RegistryMsg::Run {
        uid,
        session_id,
        request,
        reply,
    })?;
    Ok(Box::pin(async move { reply.await? }))
}

/// Every param check of `exec.run` and `exec.start`: the session id, the
/// request, and whether events were asked for. The timeout is checked
/// against the session's own maximum by the session (`TimeoutOverSessionMax`).
pub(super) fn parse(
    config: &Config,
    params: &[u8],
) -> Result<(String, ExecRequest, bool), RequestError> {
    let p: ExecParams = parse_params(params)?;
    let limit = config.commands.max_stdin_bytes.as_u64();
    if let Some(stdin) = &p.stdin {
        if stdin.len() as u64 > limit {
            return Err(RequestError::StdinTooLarge {
                size: stdin.len() as u64,
                limit,
            });
        }
    }
    if p.command.contains('\0') || p.command.len() > MAX_ARG_BYTES {
        return Err(RequestError::InvalidRequest(format!(
            "param `command`: must hold no NUL byte and at most {MAX_ARG_BYTES} bytes (pass data through stdin)"
        )));
    }
    let pty = p
        .pty
        .map(|size| super::exec_resize::pty_size("pty.", size.rows, size.cols))
        .transpose()?;
    let request = ExecRequest {
        command: p.command,
        timeout: p
            .timeout_s
            .map(|s| seconds_param("timeout_s", s))
            .transpose()?,
        stdin: p.stdin.map(|b| b.into_vec()),
        env: env_param("env", p.env)?,
        keep_output: p.keep_output.unwrap_or_default(),
        // A terminal is always open for keystrokes.
        stdin_open: p.stdin_open || pty.is_some(),
        idle_timeout: p
            .idle_timeout_s
            .map(|s| seconds_param("idle_timeout_s", s))
            .transpose()?,
        pty,
    };
    Ok((p.session_id, request, p.stream))
}

/// Sends `started`, then output events as output comes, until the command
/// has ended; false if the connection is gone. Never holds the command back:
/// it reads what the command's buffers still hold, and makes no event while
/// the client is behind by more than [`EVENT_BACKLOG`] or by a full queue of
/// frames, nor while the daemon's memory budget has no room for an event
/// (then it skips ahead as well).
async fn stream_events(record: &CommandRecord, events: &EventSink) -> bool {
    let started = Event::Started {
        command_id: record.id.clone(),
    };
    if !events.send(&started).await {
        return false;
    }
    let mut changes = record.output.subscribe();
    let (mut stdout_at, mut stderr_at) = (0u64, 0u64);
    let mut behind = false;
    loop {
        // Whether it had ended before this read: then the read sees all there is.
        let ended = record.outcome().is_some();
        if std::mem::take(&mut behind) || events.backlog() > EVENT_BACKLOG {
            if ended {
                return true;
            }
            tokio::select! {
                _ = events.caught_up(EVENT_BACKLOG) => {}
                _ = record.ended() => {}
                _ = events.closed() => return false,
            }
            continue;
        }
        let (stdout, stderr) = record.output.read(stdout_at, stderr_at, EVENT_CHUNK);
        let mut sent = false;
        let mut shed = false;
        for (stream, chunk, at) in [
            (StreamName::Stdout, stdout, &mut stdout_at),
            (StreamName::Stderr, stderr, &mut stderr_at),
        ] {
            if chunk.data.is_empty() || shed {
                continue;
            }
            let next = chunk.next();
            let event = Event::Output {
                stream,
                offset: chunk.offset,
                data: serde_bytes::ByteBuf::from(chunk.data),
            };
            match events.offer(&event).await {
                Offer::Queued => {
                    *at = next;
                    sent = true;
                }
                Offer::Shed => shed = true,
                Offer::Behind => {
                    behind = true;
                    break;
                }
                Offer::Closed => return false,
            }
        }
        if behind {
            continue;
        }
        if shed {
            // Over the memory budget: as when the client is behind, wait for
            // room (the queue moving, or a moment) and read on from there.
            if ended {
                return true;
            }
            tokio::select! {
                _ = events.progress() => {}
                _ = tokio::time::sleep(SHED_PAUSE) => {}
                _ = record.ended() => {}
                _ = events.closed() => return false,
            }
            continue;
        }
        if sent {
            continue;
        }
        if ended {
            return true;
        }
        tokio::select! {
            _ = changes.changed() => {}
            _ = events.closed() => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ExecParams;

    fn encoded(p: &ExecParams) -> Vec<u8> {
        rmp_serde::to_vec_named(p).unwrap()
    }

    #[test]
    fn command_and_stdin_are_checked_here() {
        let config = Config::default();
        let nul = ExecParams {
            session_id: "s".into(),
            command: "a\0b".into(),
            ..Default::default()
        };
        let err = parse(&config, &encoded(&nul)).unwrap_err();
        assert!(err.to_string().contains("param `command`"), "{err}");
        let big = ExecParams {
            session_id: "s".into(),
            command: "cat".into(),
            stdin: Some(serde_bytes::ByteBuf::from(vec![
                0u8;
                config.commands.max_stdin_bytes.as_u64()
                    as usize
                    + 1
            ])),
            ..Default::default()
        };
        assert!(matches!(
            parse(&config, &encoded(&big)),
            Err(RequestError::StdinTooLarge { .. })
        ));
        let ok = ExecParams {
            session_id: "s".into(),
            command: "true".into(),
            timeout_s: Some(2.5),
            idle_timeout_s: Some(0.5),
            stream: true,
            ..Default::default()
        };
        let (id, request, stream) = parse(&config, &encoded(&ok)).unwrap();
        assert_eq!(id, "s");
        assert!(stream);
        assert_eq!(
            request.timeout,
            Some(std::time::Duration::from_millis(2500))
        );
        assert_eq!(
            request.idle_timeout,
            Some(std::time::Duration::from_millis(500))
        );
        let bad_idle = ExecParams {
            idle_timeout_s: Some(-1.0),
            ..ok
        };
        let err = parse(&config, &encoded(&bad_idle)).unwrap_err();
        assert!(err.to_string().contains("idle_timeout_s"), "{err}");
    }
}
