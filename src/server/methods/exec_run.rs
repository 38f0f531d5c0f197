//! `exec.run`: params → a validated [`ExecRequest`] (command, stdin size, timeout, env, keep_output) → registry → session → CommandActor; answered with the command's result.

use super::{ask, env_param};
use crate::actors::registry::RegistryMsg;
use crate::actors::session::ExecRequest;
use crate::config::Config;
use crate::process::shell::MAX_ARG_BYTES;
use crate::protocol::{ExecParams, ExecResult, RequestError, parse_params, seconds_param};
use crate::server::Daemon;

pub(super) async fn serve(
    daemon: &Daemon,
    uid: u32,
    params: &[u8],
) -> Result<ExecResult, RequestError> {
    let (session_id, request) = parse(&daemon.ctx.config, params)?;
    ask(daemon, |reply| RegistryMsg::Run {
        uid,
        session_id,
        request,
        reply,
    })
    .await?
}

/// Every param check of `exec.run`. The timeout is checked against the
/// session's own maximum by the session (`TimeoutOverSessionMax`).
fn parse(config: &Config, params: &[u8]) -> Result<(String, ExecRequest), RequestError> {
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
    let request = ExecRequest {
        command: p.command,
        timeout: p
            .timeout_s
            .map(|s| seconds_param("timeout_s", s))
            .transpose()?,
        stdin: p.stdin.map(|b| b.into_vec()),
        env: env_param("env", p.env)?,
        keep_output: p.keep_output.unwrap_or_default(),
    };
    Ok((p.session_id, request))
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
            ..Default::default()
        };
        let (id, request) = parse(&config, &encoded(&ok)).unwrap();
        assert_eq!(id, "s");
        assert_eq!(
            request.timeout,
            Some(std::time::Duration::from_millis(2500))
        );
    }
}
