//! One client connection: reads frames, dispatches each request to its actor in the order sent, awaits answers in a task per request, writes them in any order.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures::{FutureExt, SinkExt};
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::codec::{Decoder, FramedWrite};
use tokio_util::sync::CancellationToken;

use super::Daemon;
use super::methods::{Dispatched, Method, answer_ping, dispatch};
use crate::budget::{Charge, Unsent};
use crate::context::Context;
use crate::protocol::RequestError;
use crate::protocol::frame::{
    encode_error, is_frame_too_large, parse_request, request_codec, response_codec,
};
use crate::stats::Stats;
use crate::timing;

/// Requests of one connection being served at once. Past it the connection
/// stops reading (backpressure), so a client cannot queue unbounded work
/// in the registry's mailbox.
pub const MAX_IN_FLIGHT_PER_CONNECTION: u32 = 64;

/// Encoded responses waiting for the socket, per connection.
const RESPONSE_QUEUE: usize = 64;

/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 64 * 1024;

/// After a refusal that closes the connection, what the client still sends
/// is read and discarded, for at most this many bytes (and
/// `timing::REFUSAL_LINGER`) before the daemon closes: a client that writes
/// its whole request before reading then sees the error frame instead of
/// EPIPE on its write.
const LINGER_BYTES: usize = 4 * 1024 * 1024;

/// Serves one connection until the client closes it, a fatal framing error,
/// a stalled partial frame, an answer backlog over its byte budget, or `stop`
/// (after the shutdown drained the sessions: then the answers of requests in
/// flight are flushed first).
pub async fn serve(daemon: Daemon, stream: UnixStream, uid: u32, stop: CancellationToken) {
    let ctx = daemon.ctx.clone();
    let (mut read_half, write_half) = stream.into_split();
    let max = ctx.config.server.max_request_bytes.as_u64() as usize;
    let read_timeout = ctx.config.server.request_read_timeout;
    let (outbox, writer) = Outbox::start(&ctx, write_half);
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_CONNECTION as usize));
    let writes = WriteTickets::default();
    let mut codec = request_codec(max);
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    // Bytes received since the last complete frame: > 0 means a frame is in
    // progress, and it must complete within `request_read_timeout`.
    let mut pending_bytes = 0usize;
    let mut partial_since: Option<Instant> = None;
    // Whether we are dropping the client (stalled, not reading): then its
    // answers still in flight are not written.
    let mut dropped = false;
    // Refused with FRAME_TOO_LARGE or OVERLOADED: the rest of what it sends is discarded.
    let mut too_large = false;
    // The read buffer's share of the memory budget: a partial frame is
    // charged as it grows past the first READ_CHUNK (that one is part of the
    // fixed overhead of a connection, so a small request such as a ping is
    // read even when the budget is full).
    let mut read_charge = ctx.budget.empty();

    'serve: loop {
        // 1. Serve every complete frame already received.
        loop {
            let body = match codec.decode(&mut buf) {
                Ok(Some(body)) => body,
                Ok(None) => break,
                Err(e) if is_frame_too_large(&e) => {
                    Stats::bump(&ctx.stats.bad_frames);
                    let error = RequestError::FrameTooLarge { limit: max as u64 };
                    // The last frame: the writer closes the connection after it, and
                    // answers of requests still in flight are dropped.
                    outbox
                        .send(Outgoing::Last(encode_error(None, &error)))
                        .await;
                    too_large = true;
                    break 'serve;
                }
                Err(_) => break 'serve,
            };
            pending_bytes = buf.len();
            if !serve_frame(&daemon, uid, body.freeze(), &outbox, &in_flight, &writes).await {
                break 'serve;
            }
            // A frame completed: a partial one after it gets a fresh deadline,
            // counted from now (not from before our own backpressure wait).
            partial_since = None;
        }
        partial_since = match (pending_bytes, partial_since) {
            (0, _) => None,
            (_, Some(since)) => Some(since),
            (_, None) => Some(Instant::now()),
        };
        // 2. Read more, unless the partial frame is out of time or cannot be charged.
        if buf.capacity() == buf.len() {
            buf.reserve(READ_CHUNK);
        }
        if !charge_to(&mut read_charge, buf.capacity().saturating_sub(READ_CHUNK)) {
            tracing::info!(
                uid,
                "a request frame cannot be charged to the memory budget; disconnecting"
            );
            let error = ctx.overloaded();
            outbox
                .send(Outgoing::Last(encode_error(None, &error)))
                .await;
            too_large = true;
            break;
        }
        let deadline = partial_since.map(|since| since + read_timeout);
        let read = tokio::select! {
            read = read_half.read_buf(&mut buf) => read,
            _ = sleep_until_or_never(deadline) => {
                Stats::bump(&ctx.stats.stalled_connections);
                tracing::info!(uid, "partial request frame stalled past request_read_timeout; disconnecting");
                dropped = true;
                break;
            }
            _ = outbox.overflowed() => {
                dropped = true;
                break;
            }
            _ = stop.cancelled() => break,
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => pending_bytes += n,
        }
    }

    if stop.is_cancelled() {
        // Shutdown: the sessions are gone, so the requests in flight are about
        // to answer; wait for them so their answers reach the client.
        let _ = tokio::time::timeout(
            timing::IN_FLIGHT_FLUSH,
            in_flight.acquire_many(MAX_IN_FLIGHT_PER_CONNECTION),
        )
        .await;
    }
    // The writer ends when the last answer in flight is written (a client
    // that half-closed may still read them) or cannot be; until then this
    // connection keeps its slot, so a client cannot open connections without
    // bound by leaving answers behind. Dropped or shutting down: no waiting.
    drop(outbox);
    drop(read_charge);
    drop(buf);
    let mut writer = writer;
    if too_large {
        // The writer ends after the error frame; meanwhile the oversized
        // frame is read away, so the client's write of it completes.
        let linger = tokio::time::timeout(
            timing::REFUSAL_LINGER,
            discard(&mut read_half, LINGER_BYTES),
        );
        let _ = tokio::join!(&mut writer, linger);
    } else if dropped {
        writer.abort();
    } else if stop.is_cancelled() {
        if tokio::time::timeout(timing::WRITER_FLUSH, &mut writer)
            .await
            .is_err()
        {
            writer.abort();
        }
    } else {
        let _ = writer.await;
    }
}

/// Parses and serves one frame. Inline methods (ping, stats, which never
/// wait on an actor) are answered here. Any other request is dispatched here
/// too — params checked and the request sent to its actor — so the requests
/// of a connection reach the actors in the order they were sent; only the
/// wait for its answer runs on a task of its own (at most
/// [`MAX_IN_FLIGHT_PER_CONNECTION`] at once). Returns false when the
/// connection must end.
async fn serve_frame(
    daemon: &Daemon,
    uid: u32,
    body: Bytes,
    outbox: &Outbox,
    in_flight: &Arc<Semaphore>,
    writes: &WriteTickets,
) -> bool {
    let ctx = &daemon.ctx;
    let request = match parse_request(&body) {
        Ok(request) => request,
        Err(bad) => {
            Stats::bump(&ctx.stats.bad_frames);
            return outbox
                .send(Outgoing::Frame(encode_error(bad.id, &bad.error)))
                .await;
        }
    };
    let id = request.id;
    let events = EventSink {
        id,
        outbox: outbox.clone(),
    };
    let inline = Method::from_name(&request.method).is_some_and(Method::is_inline);
    let permit = if inline {
        None
    } else {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return false;
        };
        Some(permit)
    };
    // A panic while serving one request answers it INTERNAL instead of leaving it unanswered.
    let failed = move || {
        Stats::bump(&ctx.stats.actor_failures);
        encode_error(
            Some(id),
            &RequestError::Internal("serving this request failed".into()),
        )
    };
    let dispatched = AssertUnwindSafe(dispatch(daemon, uid, request, events, writes))
        .catch_unwind()
        .await;
    let pending = match dispatched {
        Ok(Dispatched::Answered(answer)) => return outbox.send(Outgoing::Frame(answer)).await,
        Ok(Dispatched::Waiting(pending)) => pending,
        Err(_) => return outbox.send(Outgoing::Frame(failed())).await,
    };
    let (daemon, outbox) = (daemon.clone(), outbox.clone());
    tokio::spawn(async move {
        let ctx = &daemon.ctx;
        let answer = AssertUnwindSafe(pending)
            .catch_unwind()
            .await
            .unwrap_or_else(|_| {
                Stats::bump(&ctx.stats.actor_failures);
                encode_error(
                    Some(id),
                    &RequestError::Internal("serving this request failed".into()),
                )
            });
        outbox.send(Outgoing::Frame(answer)).await;
        drop(permit);
    });
    true
}

/// Orders the `exec.write`s of one connection: each takes a ticket, in the
/// order the writes were sent, when it is dispatched, and applies its write
/// only once the previous ticket for the same command is done. (The writes'
/// tasks would otherwise reach the command's stdin in any order.) Holds one
/// entry per command with a write in flight: at most
/// [`MAX_IN_FLIGHT_PER_CONNECTION`] once the finished ones are pruned.
#[derive(Default)]
pub struct WriteTickets {
    last: std::sync::Mutex<std::collections::HashMap<String, oneshot::Receiver<()>>>,
}

/// One `exec.write`'s place in its connection's order; done when dropped.
pub struct WriteTicket {
    previous: Option<oneshot::Receiver<()>>,
    _done: oneshot::Sender<()>,
}

impl WriteTickets {
    /// The next ticket for writes to `command_id`.
    pub fn take(&self, command_id: &str) -> WriteTicket {
        let (done, after_me) = oneshot::channel();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        // Forget the commands whose last write is done.
        last.retain(|_, rx| matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
        let previous = last.insert(command_id.to_string(), after_me);
        WriteTicket {
            previous,
            _done: done,
        }
    }
}

impl WriteTicket {
    /// Resolves when every earlier write of this connection to this command is done.
    pub async fn turn(&mut self) {
        if let Some(previous) = self.previous.take() {
            // Done is the sender dropped: an error here is the signal.
            let _ = previous.await;
        }
    }
}

/// Sets `charge` to `bytes`: growing only if the budget has room; false when it has not.
fn charge_to(charge: &mut Charge, bytes: usize) -> bool {
    let bytes = bytes as u64;
    if bytes > charge.bytes() {
        charge.try_grow(bytes - charge.bytes())
    } else {
        charge.resize(bytes);
        true
    }
}

async fn sleep_until_or_never(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// The answers of one connection on their way to the socket, with a byte
/// budget: answers queued behind the one being written (`unsent`) may not
/// exceed `server.max_unsent_bytes`. A client that stops reading therefore
/// cannot make the daemon buffer without bound: past the budget the
/// connection is dropped (its requests still run; nothing of other clients is
/// touched). What one connection holds is therefore at most the answer being
/// written plus the queue, and the queue is under the budget or holds a single
/// answer (one of any size is accepted into an empty queue): budget + two
/// answers, each at most two capped streams and their envelope.
///
/// Every queued frame is also charged to the daemon's memory budget, until
/// it is written: an output event that cannot be charged is not queued
/// (shed: the streaming loop skips ahead, as when the client is behind); an
/// answer that cannot be charged drops the connection with the most unsent
/// bytes in the daemon (its requests still run) and is queued anyway, so an
/// answer is never lost to the budget and the overshoot lasts only until that
/// connection's queue is released.
///
/// The answer being written is not counted: a client that has read an answer
/// to its end has necessarily seen it leave the queue, so a client that reads
/// can never be taken for one that does not. (Counting until the write
/// completed did exactly that: the client could read the last byte and send its
/// next request before the writer task got to subtract, and a 1 MiB answer
/// then pushed a 200-byte one over a 1 MiB budget. The chaos soak found it.)
#[derive(Clone)]
struct Outbox {
    /// Each frame with its charge, released once it is written (or dropped).
    tx: mpsc::Sender<(Outgoing, Charge)>,
    /// Unsent bytes, and the token that drops the connection (past the
    /// per-connection budget, or when the daemon's budget needs the room).
    unsent: Arc<Unsent>,
    /// Notified each time the writer takes a frame off the queue.
    progress: Arc<tokio::sync::Notify>,
    budget: usize,
    ctx: Arc<Context>,
}

/// What became of a frame offered to an [`Outbox`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Queued,
    /// An output event over the memory budget: not queued.
    Shed,
    /// An output event that found the queue full of frames (many small
    /// events, not yet written): not queued; the client is behind.
    Behind,
    /// The connection is gone or being dropped.
    Closed,
}

impl Outbox {
    fn start(
        ctx: &Arc<Context>,
        write_half: OwnedWriteHalf,
    ) -> (Outbox, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<(Outgoing, Charge)>(RESPONSE_QUEUE);
        let outbox = Outbox {
            tx,
            unsent: Arc::new(Unsent::default()),
            progress: Arc::new(tokio::sync::Notify::new()),
            budget: ctx.config.server.max_unsent_bytes.as_u64() as usize,
            ctx: ctx.clone(),
        };
        ctx.outboxes.register(&outbox.unsent);
        let (unsent, overflow, progress) = (
            outbox.unsent.clone(),
            outbox.unsent.drop.clone(),
            outbox.progress.clone(),
        );
        let writer = tokio::spawn(async move {
            let mut sink = FramedWrite::new(write_half, response_codec());
            loop {
                let out = tokio::select! {
                    out = rx.recv() => out,
                    _ = overflow.cancelled() => None,
                };
                let Some((out, charge)) = out else { break };
                let (frame, last) = match out {
                    Outgoing::Frame(frame) => (frame, false),
                    Outgoing::Last(frame) => (frame, true),
                };
                // Off the queue: from here on this answer is "being written".
                unsent.bytes.fetch_sub(frame.len(), Ordering::Relaxed);
                progress.notify_waiters();
                let sent = tokio::select! {
                    sent = sink.send(frame) => sent.is_ok(),
                    _ = overflow.cancelled() => false,
                };
                drop(charge);
                if !sent || last {
                    break;
                }
            }
        });
        (outbox, writer)
    }

    /// Queues an answer; false when the connection is over its budget or gone.
    async fn send(&self, out: Outgoing) -> bool {
        self.queue(out, false).await == Offer::Queued
    }

    /// Queues a frame; one that is `sheddable` (an output event) is not
    /// queued when the memory budget has no room for it.
    async fn queue(&self, out: Outgoing, sheddable: bool) -> Offer {
        let len = match &out {
            Outgoing::Frame(f) | Outgoing::Last(f) => f.len(),
        };
        let before = self.unsent.bytes.fetch_add(len, Ordering::Relaxed);
        let unqueue = || {
            self.unsent.bytes.fetch_sub(len, Ordering::Relaxed);
        };
        if self.unsent.drop.is_cancelled() {
            unqueue();
            return Offer::Closed;
        }
        if before + len > self.budget && before > 0 {
            unqueue();
            if self.unsent.drop_once() {
                Stats::bump(&self.ctx.stats.slow_readers_dropped);
                tracing::warn!(
                    unsent = before,
                    budget = self.budget,
                    "client does not read its answers; dropping the connection"
                );
            }
            return Offer::Closed;
        }
        let charge = match self.ctx.budget.try_charge(len as u64) {
            Some(charge) => charge,
            None if sheddable => {
                unqueue();
                return Offer::Shed;
            }
            None => {
                // This answer itself does not count towards its connection's
                // share: a client that reads is never dropped for the answer
                // it is about to get (as with the per-connection budget).
                unqueue();
                let largest = self.ctx.outboxes.drop_largest();
                self.unsent.bytes.fetch_add(len, Ordering::Relaxed);
                if let Some(largest) = largest {
                    Stats::bump(&self.ctx.stats.slow_readers_dropped);
                    tracing::warn!(
                        unsent = largest.bytes.load(Ordering::Relaxed),
                        "memory budget reached; dropping the connection with the most unsent answers"
                    );
                    if Arc::ptr_eq(&largest, &self.unsent) {
                        unqueue();
                        return Offer::Closed;
                    }
                }
                let mut charge = self.ctx.budget.empty();
                charge.resize(len as u64);
                charge
            }
        };
        if sheddable {
            // Never wait for room in the queue: a stream task waiting here
            // would see the command's end only once the client read again,
            // and whether its answer then fits behind the events would depend
            // on how fast the client drains them (found by the CI).
            return match self.tx.try_send((out, charge)) {
                Ok(()) => Offer::Queued,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    unqueue();
                    Offer::Behind
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    unqueue();
                    Offer::Closed
                }
            };
        }
        if self.tx.send((out, charge)).await.is_err() {
            unqueue();
            return Offer::Closed;
        }
        Offer::Queued
    }

    /// Resolves once the connection is to be dropped (over its own budget,
    /// or the largest queue when the daemon's budget needed room).
    async fn overflowed(&self) {
        self.unsent.drop.cancelled().await
    }
}

/// Where a streaming request sends its event frames: the connection's
/// outbox, in order with everything else of that request (its result last).
pub struct EventSink {
    id: u64,
    outbox: Outbox,
}

impl EventSink {
    /// Queues an event of this request; false when the connection is gone.
    pub async fn send(&self, event: &crate::protocol::Event) -> bool {
        let frame = crate::protocol::frame::encode_event(self.id, event);
        self.outbox.send(Outgoing::Frame(frame)).await
    }

    /// Queues an output event, unless the memory budget has no room for it
    /// (shed) or the queue is full of frames (behind); never waits.
    pub async fn offer(&self, event: &crate::protocol::Event) -> Offer {
        let frame = crate::protocol::frame::encode_event(self.id, event);
        self.outbox.queue(Outgoing::Frame(frame), true).await
    }

    /// Bytes queued on this connection and not yet taken by the writer.
    pub fn backlog(&self) -> usize {
        self.outbox.unsent.bytes.load(Ordering::Relaxed)
    }

    /// Resolves when the writer has taken a frame off the queue (the backlog
    /// shrank) — one missed while the caller was not waiting is not seen:
    /// wait with a bound, or use [`Self::caught_up`].
    pub async fn progress(&self) {
        self.outbox.progress.notified().await
    }

    /// Resolves once the client is no longer behind: the queue has room for
    /// a frame and at most `backlog` bytes are unsent. It registers for the
    /// writer's notification before it looks, so a frame the writer takes in
    /// between is not missed (a stream would stall until its command ended).
    pub async fn caught_up(&self, backlog: usize) {
        loop {
            let progress = self.outbox.progress.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            if self.outbox.tx.capacity() > 0 && self.backlog() <= backlog {
                return;
            }
            progress.await;
        }
    }

    /// Resolves when the connection's writer is gone (the client went away).
    pub async fn closed(&self) {
        self.outbox.tx.closed().await
    }
}

/// A response on its way to the socket.
enum Outgoing {
    Frame(Bytes),
    /// Write it, then close the connection.
    Last(Bytes),
}

/// Reads and discards up to `limit` bytes, until the client's end of stream.
async fn discard(read_half: &mut (impl AsyncReadExt + Unpin), limit: usize) {
    let mut buf = vec![0u8; READ_CHUNK];
    let mut read = 0;
    while read < limit {
        match read_half.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => read += n,
        }
    }
}

/// Answers a connection that will not be served with one error frame (nil
/// id), then lingers (`timing::REFUSAL_LINGER`, [`LINGER_BYTES`]) before closing: what the
/// client sends meanwhile is read, so its write does not fail before it reads
/// the error. With `pings` (a client that is allowed but over a connection
/// cap), each `system.ping` received meanwhile is answered (so a health check
/// works even when its uid, or the daemon, is at its cap) and every other
/// request gets the refusal again with its id; otherwise it is discarded.
pub async fn refuse(stream: UnixStream, error: RequestError, pings: Option<Arc<Context>>) {
    let (mut read_half, write_half) = stream.into_split();
    let mut sink = FramedWrite::new(write_half, response_codec());
    let linger = async {
        if sink.send(encode_error(None, &error)).await.is_err() {
            return;
        }
        let Some(ctx) = pings else {
            return discard(&mut read_half, LINGER_BYTES).await;
        };
        let mut codec = request_codec(ctx.config.server.max_request_bytes.as_u64() as usize);
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let mut read = 0;
        while read < LINGER_BYTES {
            buf.reserve(READ_CHUNK);
            match read_half.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => read += n,
            }
            loop {
                let body = match codec.decode(&mut buf) {
                    Ok(Some(body)) => body.freeze(),
                    Ok(None) => break,
                    // Not framed as it should be: nothing more is answered.
                    Err(_) => return discard(&mut read_half, LINGER_BYTES - read).await,
                };
                let answer = match parse_request(&body) {
                    Ok(r) if Method::from_name(&r.method) == Some(Method::Ping) => {
                        answer_ping(&ctx, r.id)
                    }
                    Ok(r) => encode_error(Some(r.id), &error),
                    Err(bad) => encode_error(bad.id, &bad.error),
                };
                if sink.send(answer).await.is_err() {
                    return;
                }
            }
        }
    };
    let _ = tokio::time::timeout(timing::REFUSAL_LINGER, linger).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::protocol::{Event, StreamName};

    /// Output events to a client that reads nothing: once the queue is full,
    /// an offer is refused as behind at once — it never waits for room,
    /// which only the client's reading could make. Once the client reads,
    /// the stream learns it has caught up.
    #[tokio::test]
    async fn an_output_event_never_waits_for_room_in_the_queue() {
        let ctx = Arc::new(Context::new(Config::default()));
        let (ours, mut client) = UnixStream::pair().unwrap();
        let (_read_half, write_half) = ours.into_split();
        let (outbox, writer) = Outbox::start(&ctx, write_half);
        let events = EventSink { id: 1, outbox };
        let small = Event::Output {
            stream: StreamName::Stdout,
            offset: 0,
            data: serde_bytes::ByteBuf::from(vec![b'x'; 100]),
        };
        let mut queued = 0;
        let offer = async {
            loop {
                match events.offer(&small).await {
                    Offer::Queued => queued += 1,
                    other => return other,
                }
            }
        };
        let outcome = tokio::time::timeout(std::time::Duration::from_secs(10), offer)
            .await
            .expect("an offer waited for room in the queue");
        assert_eq!(outcome, Offer::Behind);
        assert!(
            events.backlog() < ctx.config.server.max_unsent_bytes.as_u64() as usize,
            "refused for a full queue of frames, not for the byte budget"
        );
        assert!(queued >= RESPONSE_QUEUE, "{queued} events queued");
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while client.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        });
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            events.caught_up(64 * 1024),
        )
        .await
        .expect("a reading client lets the stream catch up");
        writer.abort();
        reader.abort();
    }
}
