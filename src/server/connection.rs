//! One client connection: reads frames, answers inline or in a task per request, writes responses in any order.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use std::panic::AssertUnwindSafe;

use futures::{FutureExt, SinkExt, StreamExt};
use tokio::net::UnixStream;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use super::dispatch::{dispatch, is_inline};
use crate::context::Context;
use crate::protocol::RequestError;
use crate::protocol::frame::{
    encode_error, is_frame_too_large, parse_request, request_codec, response_codec,
};
use crate::stats::Stats;

/// Requests of one connection being served at once. Past it the connection
/// stops reading (backpressure), so a client cannot queue unbounded work
/// in the registry's mailbox.
pub const MAX_IN_FLIGHT_PER_CONNECTION: u32 = 64;

/// Encoded responses waiting for the socket, per connection.
const RESPONSE_QUEUE: usize = 64;

/// How long a refused connection's single error frame may take to write.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves one connection until the client closes it, a fatal framing error,
/// or `stop` (after the shutdown drained the sessions: then the responses of
/// requests in flight are flushed first).
pub async fn serve(ctx: Arc<Context>, stream: UnixStream, uid: u32, stop: CancellationToken) {
    let (read_half, write_half) = stream.into_split();
    let max = ctx.config.server.max_request_bytes.as_u64() as usize;
    let mut frames = FramedRead::new(read_half, request_codec(max));
    let (tx, mut rx) = mpsc::channel::<Outgoing>(RESPONSE_QUEUE);
    let writer = tokio::spawn(async move {
        let mut sink = FramedWrite::new(write_half, response_codec());
        while let Some(out) = rx.recv().await {
            let (frame, last) = match out {
                Outgoing::Frame(frame) => (frame, false),
                Outgoing::Last(frame) => (frame, true),
            };
            if sink.send(frame).await.is_err() || last {
                break;
            }
        }
    });
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_CONNECTION as usize));

    loop {
        let next = tokio::select! {
            next = frames.next() => next,
            _ = stop.cancelled() => break,
        };
        let body = match next {
            None => break,
            Some(Ok(body)) => body,
            Some(Err(e)) if is_frame_too_large(&e) => {
                Stats::bump(&ctx.stats.bad_frames);
                let error = RequestError::FrameTooLarge { limit: max as u64 };
                // The last frame: the writer closes the connection after it, and
                // answers of requests still in flight are dropped.
                let _ = tx.send(Outgoing::Last(encode_error(None, &error))).await;
                break;
            }
            Some(Err(_)) => break,
        };
        let request = match parse_request(&body.freeze()) {
            Ok(request) => request,
            Err(bad) => {
                Stats::bump(&ctx.stats.bad_frames);
                if tx
                    .send(Outgoing::Frame(encode_error(bad.id, &bad.error)))
                    .await
                    .is_err()
                {
                    break;
                }
                continue;
            }
        };
        if is_inline(&request.method) {
            if tx
                .send(Outgoing::Frame(dispatch(&ctx, uid, request).await))
                .await
                .is_err()
            {
                break;
            }
            continue;
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let (ctx, tx) = (ctx.clone(), tx.clone());
        tokio::spawn(async move {
            let id = request.id;
            // A panic while serving one request answers it INTERNAL instead of leaving it unanswered.
            let answer = AssertUnwindSafe(dispatch(&ctx, uid, request))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| {
                    Stats::bump(&ctx.stats.actor_failures);
                    encode_error(
                        Some(id),
                        &RequestError::Internal("serving this request failed".into()),
                    )
                });
            let _ = tx.send(Outgoing::Frame(answer)).await;
            drop(permit);
        });
    }

    if stop.is_cancelled() {
        // Shutdown: the sessions are gone, so the requests in flight are about
        // to answer; wait for them so their answers reach the client.
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            in_flight.acquire_many(MAX_IN_FLIGHT_PER_CONNECTION),
        )
        .await;
    }
    // A client that hung up mid-exec: its requests run to their end, their
    // answers are dropped (documented in docs/protocol.md).
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
}

/// A response on its way to the socket.
enum Outgoing {
    Frame(Bytes),
    /// Write it, then close the connection.
    Last(Bytes),
}

/// Answers a connection that will not be served with one error frame, then closes it.
pub async fn refuse(stream: UnixStream, error: RequestError) {
    let mut sink = FramedWrite::new(stream, response_codec());
    let _ =
        tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, sink.send(encode_error(None, &error))).await;
}
