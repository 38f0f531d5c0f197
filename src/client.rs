//! The async client library: one pipelined connection to the daemon; used by the CLI, the tests and host agents.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use crate::protocol::frame::response_codec;
use crate::protocol::{
    CancelParams, CancelResult, CreateParams, CreateResult, DestroyResult, Event, ExecParams,
    ExecResult, ListResult, PingResult, ReadParams, ReadResult, ResizeParams, ResizeResult,
    SessionIdParams, StartResult, StatsResult, WireError, WriteParams, WriteResult, method,
};
use crate::socket_dir::{SocketDir, SocketDirError};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon answered with an error frame.
    #[error("{}: {}", .0.code, .0.message)]
    Server(WireError),
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    #[error("the connection closed before the answer came")]
    Closed,
    #[error("cannot decode the answer: {0}")]
    Decode(String),
    /// No answer within the call's deadline (the call is abandoned; the
    /// daemon may still carry out the request).
    #[error("no answer within {0:?}")]
    TimedOut(std::time::Duration),
    /// The socket's directory could be written by someone else, so the socket
    /// may not be the daemon's (see [`ConnectOptions::insecure_socket_dir`]).
    #[error(
        "refusing to connect: {0} (to connect anyway, e.g. in a test: --insecure-socket-dir, or ConnectOptions::insecure_socket_dir)"
    )]
    UnsafeSocketDir(#[from] SocketDirError),
}

/// How [`Client::connect_with`] connects.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConnectOptions {
    /// Connect even when the socket's directory fails the check (owned by
    /// someone other than us or root, writable by others, a symlink). Anyone
    /// who can write there can put their own socket in the daemon's place.
    pub insecure_socket_dir: bool,
}

impl ClientError {
    /// The protocol error code, when the daemon sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Server(e) => Some(&e.code),
            _ => None,
        }
    }
}

type Pending = Arc<Mutex<PendingCalls>>;

#[derive(Default)]
struct PendingCalls {
    waiting: HashMap<u64, oneshot::Sender<Result<rmpv::Value, ClientError>>>,
    /// Event frames of streaming calls, by id (dropped with the call's final answer).
    events: HashMap<u64, mpsc::UnboundedSender<Event>>,
    /// Set when the connection ended; later calls fail at once.
    closed: Option<WireError>,
}

/// A connection to the daemon. Calls may be issued concurrently from many
/// tasks; they are pipelined on the one connection and matched by id.
pub struct Client {
    writer: tokio::sync::Mutex<FramedWrite<OwnedWriteHalf, LengthDelimitedCodec>>,
    pending: Pending,
    next_id: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
    /// How long a call waits for its answer; `None`: as long as it takes.
    deadline: Option<std::time::Duration>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Client {
    /// Connects to the daemon's socket, after checking its directory like the
    /// daemon does before binding (`socket_dir`): owned by us or root, not
    /// writable by others unless sticky and ours (then the socket itself must
    /// be ours or root's), not a symlink. The connection goes through the
    /// directory that was checked, even if the path is swapped meanwhile.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        Self::connect_with(path, ConnectOptions::default()).await
    }

    /// [`Client::connect`] with options.
    pub async fn connect_with(
        path: impl AsRef<Path>,
        options: ConnectOptions,
    ) -> Result<Client, ClientError> {
        let path = path.as_ref();
        let stream = if options.insecure_socket_dir {
            UnixStream::connect(path).await?
        } else {
            let me = nix::unistd::geteuid().as_raw();
            let dir = SocketDir::open(path, me).map_err(|e| match e {
                // No such directory (no daemon), or not ours to enter: a plain
                // connection error, as connect(2) would have said.
                SocketDirError::Open { errno, .. } => ClientError::Io(errno.into()),
                unsafe_dir => ClientError::UnsafeSocketDir(unsafe_dir),
            })?;
            dir.check_socket_owner(me)?;
            UnixStream::connect(dir.fd_path()).await?
        };
        let (read_half, write_half) = stream.into_split();
        let pending: Pending = Arc::default();
        let reader = tokio::spawn(read_answers(
            FramedRead::new(read_half, response_codec()),
            pending.clone(),
        ));
        Ok(Client {
            writer: tokio::sync::Mutex::new(FramedWrite::new(write_half, response_codec())),
            pending,
            next_id: AtomicU64::new(1),
            reader,
            deadline: None,
        })
    }

    /// Every call on this client gives up after `deadline` without an answer
    /// ([`ClientError::TimedOut`]): a daemon that never answers cannot hold
    /// the caller forever. A streaming call's deadline applies to each event
    /// and to its result.
    pub fn with_deadline(mut self, deadline: std::time::Duration) -> Client {
        self.deadline = Some(deadline);
        self
    }

    /// Waits for `answer` within the call deadline; on timeout the call is forgotten.
    async fn within<T>(
        &self,
        id: u64,
        answer: impl std::future::Future<Output = T>,
    ) -> Result<T, ClientError> {
        let Some(deadline) = self.deadline else {
            return Ok(answer.await);
        };
        match tokio::time::timeout(deadline, answer).await {
            Ok(t) => Ok(t),
            Err(_) => {
                let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                pending.waiting.remove(&id);
                pending.events.remove(&id);
                Err(ClientError::TimedOut(deadline))
            }
        }
    }

    /// Calls `method` with `params` and returns the raw `result` value.
    pub async fn call_value(
        &self,
        method: &str,
        params: impl Serialize,
    ) -> Result<rmpv::Value, ClientError> {
        let (id, rx) = self.send(method, params, None).await?;
        self.within(id, rx)
            .await?
            .map_err(|_| ClientError::Closed)?
    }

    /// Sends a request; the answer comes on the returned receiver, its events (if any) on `events`.
    async fn send(
        &self,
        method: &str,
        params: impl Serialize,
        events: Option<mpsc::UnboundedSender<Event>>,
    ) -> Result<(u64, oneshot::Receiver<Result<rmpv::Value, ClientError>>), ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Named maps (string keys), as the protocol requires: rmp_serde's
        // `to_vec_named`, not rmpv's `to_value`, which writes structs as arrays.
        let body = rmp_serde::to_vec_named(&RequestFrame { id, method, params })
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(err) = &pending.closed {
                return Err(ClientError::Server(err.clone()));
            }
            pending.waiting.insert(id, tx);
            if let Some(events) = events {
                pending.events.insert(id, events);
            }
        }
        if let Err(write_error) = self.writer.lock().await.send(Bytes::from(body)).await {
            // The daemon may have refused the connection (PERMISSION_DENIED,
            // TOO_MANY_CONNECTIONS) and closed it before our write: prefer its
            // error frame, which the reader hands to every waiting call.
            return match tokio::time::timeout(std::time::Duration::from_secs(1), rx).await {
                Ok(Ok(Err(refused))) => Err(refused),
                _ => Err(ClientError::Io(write_error)),
            };
        }
        Ok((id, rx))
    }

    /// Calls `method` and decodes its result as `R`.
    pub async fn call<R: DeserializeOwned>(
        &self,
        method: &str,
        params: impl Serialize,
    ) -> Result<R, ClientError> {
        let value = self.call_value(method, params).await?;
        decode(&value)
    }

    /// `system.ping`
    pub async fn ping(&self) -> Result<PingResult, ClientError> {
        self.call(method::PING, NoParams {}).await
    }

    /// `system.stats`
    pub async fn stats(&self) -> Result<StatsResult, ClientError> {
        self.call(method::STATS, NoParams {}).await
    }

    /// `session.create`
    pub async fn create_session(&self, params: CreateParams) -> Result<String, ClientError> {
        let r: CreateResult = self.call(method::SESSION_CREATE, params).await?;
        Ok(r.session_id)
    }

    /// `session.destroy`
    pub async fn destroy_session(&self, session_id: &str) -> Result<DestroyResult, ClientError> {
        self.call(
            method::SESSION_DESTROY,
            SessionIdParams {
                session_id: session_id.into(),
            },
        )
        .await
    }

    /// `session.list`
    pub async fn list_sessions(&self) -> Result<ListResult, ClientError> {
        self.call(method::SESSION_LIST, NoParams {}).await
    }

    /// `exec.run`
    pub async fn exec(&self, params: ExecParams) -> Result<ExecResult, ClientError> {
        self.call(method::EXEC_RUN, params).await
    }

    /// `exec.run` of `command` in `session_id` with every other param at its default.
    pub async fn run(&self, session_id: &str, command: &str) -> Result<ExecResult, ClientError> {
        self.exec(ExecParams {
            session_id: session_id.into(),
            command: command.into(),
            ..Default::default()
        })
        .await
    }

    /// `exec.cancel` of every command the session runs.
    pub async fn cancel(&self, session_id: &str) -> Result<bool, ClientError> {
        let r: CancelResult = self
            .call(
                method::EXEC_CANCEL,
                CancelParams {
                    session_id: Some(session_id.into()),
                    command_id: None,
                },
            )
            .await?;
        Ok(r.cancelled)
    }

    /// `exec.cancel` of one command by id.
    pub async fn cancel_command(&self, command_id: &str) -> Result<bool, ClientError> {
        let r: CancelResult = self
            .call(
                method::EXEC_CANCEL,
                CancelParams {
                    session_id: None,
                    command_id: Some(command_id.into()),
                },
            )
            .await?;
        Ok(r.cancelled)
    }

    /// `exec.start`: the command's id, as soon as it runs.
    pub async fn start(&self, params: ExecParams) -> Result<String, ClientError> {
        let r: StartResult = self.call(method::EXEC_START, params).await?;
        Ok(r.command_id)
    }

    /// `exec.read`
    pub async fn read(&self, params: ReadParams) -> Result<ReadResult, ClientError> {
        self.call(method::EXEC_READ, params).await
    }

    /// `exec.write`: how many bytes the command took (all, unless it stopped reading for 5 s).
    pub async fn write(
        &self,
        command_id: &str,
        data: &[u8],
        eof: bool,
    ) -> Result<u64, ClientError> {
        let r: WriteResult = self
            .call(
                method::EXEC_WRITE,
                WriteParams {
                    command_id: command_id.into(),
                    data: serde_bytes::ByteBuf::from(data.to_vec()),
                    eof,
                },
            )
            .await?;
        Ok(r.written)
    }

    /// `exec.resize`: the new window size of a command's pseudo-terminal
    /// (started with `ExecParams::pty`); its foreground group gets SIGWINCH.
    pub async fn resize(&self, command_id: &str, rows: u64, cols: u64) -> Result<(), ClientError> {
        let _: ResizeResult = self
            .call(
                method::EXEC_RESIZE,
                ResizeParams {
                    command_id: command_id.into(),
                    rows,
                    cols,
                },
            )
            .await?;
        Ok(())
    }

    /// `exec.run` with `stream: true`: events as the command runs, then its result.
    pub async fn exec_stream(&self, mut params: ExecParams) -> Result<ExecStream<'_>, ClientError> {
        params.stream = true;
        let (tx, events) = mpsc::unbounded_channel();
        let (id, result) = self.send(method::EXEC_RUN, params, Some(tx)).await?;
        Ok(ExecStream {
            client: self,
            id,
            events,
            result,
        })
    }
}

/// A streaming `exec.run` in progress: its events, then its result.
pub struct ExecStream<'a> {
    client: &'a Client,
    id: u64,
    events: mpsc::UnboundedReceiver<Event>,
    result: oneshot::Receiver<Result<rmpv::Value, ClientError>>,
}

impl ExecStream<'_> {
    /// The next event; `None` once the result is in (then call [`Self::result`]).
    pub async fn next_event(&mut self) -> Result<Option<Event>, ClientError> {
        self.client.within(self.id, self.events.recv()).await
    }

    /// The command's result (after the events, which it drops if unread).
    pub async fn result(self) -> Result<ExecResult, ClientError> {
        let value = self
            .client
            .within(self.id, self.result)
            .await?
            .map_err(|_| ClientError::Closed)??;
        decode(&value)
    }
}

/// Decodes a result value as `R`, through rmp_serde (rmpv's Value
/// deserializer cannot read enum variants from strings).
fn decode<R: DeserializeOwned>(value: &rmpv::Value) -> Result<R, ClientError> {
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, value).map_err(|e| ClientError::Decode(e.to_string()))?;
    rmp_serde::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
}

#[derive(Serialize)]
struct NoParams {}

#[derive(Serialize)]
struct RequestFrame<'a, P: Serialize> {
    id: u64,
    method: &'a str,
    params: P,
}

/// Reads answers and hands each to the call waiting for its id. An error
/// frame with a nil id (e.g. `FRAME_TOO_LARGE`) is about the connection: it
/// fails every waiting call.
async fn read_answers(
    mut frames: FramedRead<tokio::net::unix::OwnedReadHalf, LengthDelimitedCodec>,
    pending: Pending,
) {
    let mut connection_error = None;
    while let Some(Ok(frame)) = frames.next().await {
        let Ok(value) = rmpv::decode::read_value(&mut &frame[..]) else {
            continue;
        };
        let field = |name: &str| {
            value.as_map().and_then(|m| {
                m.iter()
                    .find(|(k, _)| k.as_str() == Some(name))
                    .map(|(_, v)| v.clone())
            })
        };
        let id = field("id").and_then(|id| id.as_u64());
        if let (Some(id), Some(_)) = (id, field("event")) {
            // An event of a streaming call: it has no result, the call goes on.
            let events = pending.lock().unwrap_or_else(|p| p.into_inner());
            if let (Some(tx), Ok(event)) = (events.events.get(&id), decode::<Event>(&value)) {
                let _ = tx.send(event);
            }
            continue;
        }
        let outcome = match (field("result"), field("error")) {
            (Some(result), _) => Ok(result),
            (None, Some(error)) => match rmpv::ext::from_value::<WireError>(error) {
                Ok(e) => Err(ClientError::Server(e)),
                Err(e) => Err(ClientError::Decode(e.to_string())),
            },
            (None, None) => Err(ClientError::Decode(
                "answer has neither result nor error".into(),
            )),
        };
        match id {
            Some(id) => {
                let mut calls = pending.lock().unwrap_or_else(|p| p.into_inner());
                // The final answer closes the call's event stream.
                calls.events.remove(&id);
                let waiter = calls.waiting.remove(&id);
                drop(calls);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(outcome);
                }
            }
            None => {
                if let Err(ClientError::Server(e)) = outcome {
                    connection_error = Some(e);
                }
            }
        }
    }
    let mut pending = pending.lock().unwrap_or_else(|p| p.into_inner());
    let closed = connection_error.unwrap_or_else(|| WireError {
        code: "CONNECTION_CLOSED".into(),
        message: "the daemon closed the connection".into(),
        limit: None,
        retry_after_ms: None,
    });
    pending.events.clear();
    for (_, waiter) in pending.waiting.drain() {
        let _ = waiter.send(Err(ClientError::Server(closed.clone())));
    }
    pending.closed = Some(closed);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A result from a newer daemon: an unknown `killed_by`, unknown fields.
    #[test]
    fn results_of_a_newer_daemon_decode() {
        let newer = rmpv::Value::Map(vec![
            ("exit_code".into(), rmpv::Value::Nil),
            ("signal".into(), 9.into()),
            ("timed_out".into(), false.into()),
            ("killed_by".into(), "frozen_by_operator".into()),
            ("stdout".into(), rmpv::Value::Binary(b"x".to_vec())),
            ("stderr".into(), rmpv::Value::Binary(Vec::new())),
            ("stdout_truncated".into(), false.into()),
            ("stderr_truncated".into(), false.into()),
            ("stdout_total_bytes".into(), 1.into()),
            ("stderr_total_bytes".into(), 0.into()),
            ("duration_ms".into(), 3.into()),
            ("cpu_ms".into(), rmpv::Value::Nil),
            ("max_rss_bytes".into(), rmpv::Value::Nil),
            ("cwd".into(), "/".into()),
            ("a_field_from_the_future".into(), 42.into()),
        ]);
        let r: ExecResult = decode(&newer).unwrap();
        assert_eq!(r.killed_by, Some(crate::protocol::KilledBy::Other));
        assert_eq!(r.stdout.as_slice(), b"x");
    }

    /// A daemon that accepts the connection and never answers: the call
    /// gives up at its deadline, and the client stays usable.
    #[tokio::test]
    async fn a_call_gives_up_at_its_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("silent.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            // Hold the connection open, read nothing, answer nothing.
            let (stream, _) = listener.accept().await.unwrap();
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            drop(stream);
        });
        let deadline = std::time::Duration::from_millis(200);
        let client = Client::connect(&path)
            .await
            .unwrap()
            .with_deadline(deadline);
        let err = client.ping().await.unwrap_err();
        assert!(
            matches!(err, ClientError::TimedOut(d) if d == deadline),
            "{err}"
        );
        assert!(
            client.pending.lock().unwrap().waiting.is_empty(),
            "the abandoned call is forgotten"
        );
        server.abort();
    }
}
