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
use tokio::sync::oneshot;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use crate::protocol::frame::response_codec;
use crate::protocol::{
    CancelResult, CreateParams, CreateResult, DestroyResult, ExecParams, ExecResult, ListResult,
    PingResult, SessionIdParams, StatsResult, WireError, method,
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
        })
    }

    /// Calls `method` with `params` and returns the raw `result` value.
    pub async fn call_value(
        &self,
        method: &str,
        params: impl Serialize,
    ) -> Result<rmpv::Value, ClientError> {
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
        }
        if let Err(write_error) = self.writer.lock().await.send(Bytes::from(body)).await {
            // The daemon may have refused the connection (PERMISSION_DENIED,
            // TOO_MANY_CONNECTIONS) and closed it before our write: prefer its
            // error frame, which the reader hands to every waiting call.
            return match tokio::time::timeout(std::time::Duration::from_secs(1), rx).await {
                Ok(Ok(answer)) => answer,
                _ => Err(ClientError::Io(write_error)),
            };
        }
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Calls `method` and decodes its result as `R`.
    pub async fn call<R: DeserializeOwned>(
        &self,
        method: &str,
        params: impl Serialize,
    ) -> Result<R, ClientError> {
        let value = self.call_value(method, params).await?;
        // Through rmp_serde: rmpv's Value deserializer cannot read enum variants from strings.
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &value)
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        rmp_serde::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
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

    /// `exec.cancel`
    pub async fn cancel(&self, session_id: &str) -> Result<bool, ClientError> {
        let r: CancelResult = self
            .call(
                method::EXEC_CANCEL,
                SessionIdParams {
                    session_id: session_id.into(),
                },
            )
            .await?;
        Ok(r.cancelled)
    }
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
        match field("id").and_then(|id| id.as_u64()) {
            Some(id) => {
                let waiter = pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .waiting
                    .remove(&id);
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
    for (_, waiter) in pending.waiting.drain() {
        let _ = waiter.send(Err(ClientError::Server(closed.clone())));
    }
    pending.closed = Some(closed);
}
