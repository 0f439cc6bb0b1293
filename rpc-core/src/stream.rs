//! Streams as applications see them: [`Streaming`], the receiving half (a
//! `futures::Stream<Item = Result<T, Status>>`), and [`StreamSender`], the sending half.
//!
//! Both sides of a connection use the same two types: a client's call returns a `Streaming` of
//! responses and, for client and bidirectional streams, a `StreamSender` of requests; a server
//! handler gets a `Streaming` of requests and returns a [`ResponseStream`] that the runtime sends
//! through a `StreamSender` of its own.
//!
//! Flow control is per stream and per connection, credit based (see `PROTOCOL.md`, *Streams*):
//! a message the application takes from its `Streaming` gives its bytes back to the sender, in
//! batches of half a window. A consumer that stops reading stops its own stream's sender once the
//! window is used; its sender's `send` then waits, and fails with a stall after
//! `stream_stall_timeout`, resetting that stream alone.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::driver::{CallResult, ConnectionError, ConnectionHandle, InFlightGuard, Outbound};
use crate::error::CloseReason;
use crate::message::Metadata;
use crate::status::{Code, Status};

/// A stream's responses (or, in a handler, requests), as a server handler returns them.
pub type ResponseStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

/// Names a stream to its connection's driver. A client's id is set when its opening request is
/// written; every message the application queues after that request carries the same key.
#[derive(Debug, Clone, Default)]
pub struct StreamKey(Arc<KeyState>);

#[derive(Debug, Default)]
struct KeyState {
    id: AtomicU64,
    /// The driver forgot the stream (it ended, was reset, refused, or its connection closed).
    closed: std::sync::atomic::AtomicBool,
    /// Why this side reset the stream, if it did (a stall): what its receiver then reports.
    reset: OnceLock<Status>,
    /// Messages this side sent and received on the stream, for the errors of both its halves.
    sent: AtomicU64,
    received: AtomicU64,
}

impl StreamKey {
    /// A key for a stream whose id is known (a server's).
    pub fn with_id(id: u64) -> Self {
        let key = StreamKey::default();
        key.set_id(id);
        key
    }

    /// The stream id, 0 until the opening request is written.
    pub fn id(&self) -> u64 {
        self.0.id.load(Ordering::Acquire)
    }

    pub(crate) fn set_id(&self, id: u64) {
        self.0.id.store(id, Ordering::Release);
    }

    /// The driver forgot the stream: nothing sent on it goes anywhere.
    pub(crate) fn close(&self) {
        self.0.closed.store(true, Ordering::Release);
    }

    /// True once the stream is gone on this side.
    pub fn is_closed(&self) -> bool {
        self.0.closed.load(Ordering::Acquire)
    }

    /// This side reset the stream: its receiver reports `status`.
    pub(crate) fn set_reset(&self, status: Status) {
        let _ = self.0.reset.set(status);
    }

    fn reset_status(&self) -> Option<Status> {
        self.0.reset.get().cloned()
    }

    /// Messages this side has sent on the stream.
    pub fn sent(&self) -> u64 {
        self.0.sent.load(Ordering::Relaxed)
    }

    /// Messages this side has received on the stream (taken by its application).
    pub fn received(&self) -> u64 {
        self.0.received.load(Ordering::Relaxed)
    }

    fn count_sent(&self, n: u64) {
        self.0.sent.fetch_add(n, Ordering::Relaxed);
    }

    /// The receiving half (the only writer) took its `n`-th message.
    fn set_received(&self, n: u64) {
        self.0.received.store(n, Ordering::Relaxed);
    }

    /// What this side has sent and received on the stream so far.
    pub fn counts(&self) -> Counts {
        Counts {
            sent: self.sent(),
            received: self.received(),
        }
    }
}

/// Messages one side of a stream sent and received, as the errors that end it report them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Messages this side sent (queued to the connection).
    pub sent: u64,
    /// Messages this side's application took from its `Streaming`.
    pub received: u64,
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let noun = if self.sent == 1 { "message" } else { "messages" };
        write!(f, "{} {noun} sent and {} received", self.sent, self.received)
    }
}

/// Credit the application gives back to its connection's driver, which turns it into WINDOW
/// frames: per stream in batches of half the stream's window (a list, bounded by the streams open
/// on the connection: an entry per stream per pass), and for the connection as a count of every
/// byte consumed on any stream, given back once it reaches a quarter of the connection window. So
/// consumed bytes never stay held against the connection by the batching of their own stream
/// (which, summed over many streams, would spend the connection window for good).
#[derive(Debug, Default)]
pub(crate) struct Returned {
    streams: Mutex<Vec<(u64, u32)>>,
    /// `streams` has entries: the driver, which looks every pass, takes the lock only then.
    streams_pending: std::sync::atomic::AtomicBool,
    connection: AtomicU64,
    /// A quarter of this side's connection window.
    connection_batch: u64,
}

impl Returned {
    pub(crate) fn new(connection_window: u32) -> Self {
        Returned {
            streams: Mutex::default(),
            streams_pending: Default::default(),
            connection: AtomicU64::new(0),
            connection_batch: u64::from(connection_window / 4).max(1),
        }
    }

    pub(crate) fn push(&self, id: u64, bytes: u32) {
        if bytes > 0 {
            let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
            streams.push((id, bytes));
            self.streams_pending.store(true, Ordering::Release);
        }
    }

    /// Bytes consumed on some stream; true when the connection's batch is due (wake the driver).
    pub(crate) fn consumed(&self, bytes: usize) -> bool {
        let before = self.connection.fetch_add(bytes as u64, Ordering::AcqRel);
        before < self.connection_batch && before + bytes as u64 >= self.connection_batch
    }

    pub(crate) fn take(&self) -> Vec<(u64, u32)> {
        if !self.streams_pending.load(Ordering::Acquire) {
            return Vec::new(); // no lock on a connection whose streams gave nothing back
        }
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        self.streams_pending.store(false, Ordering::Release);
        std::mem::take(&mut *streams)
    }

    /// The connection credit to give back now, if a batch is due.
    pub(crate) fn take_connection(&self) -> u32 {
        if self.connection.load(Ordering::Acquire) < self.connection_batch {
            return 0;
        }
        u32::try_from(self.connection.swap(0, Ordering::AcqRel)).unwrap_or(u32::MAX)
    }
}

/// What the driver hands a stream's receiver for one DATA frame: its body, one message or (packed)
/// several, each prefixed by its 4-byte big-endian length. Credit is the body's length either way.
#[derive(Debug)]
pub struct Chunk {
    pub(crate) body: Bytes,
    pub(crate) packed: bool,
}

/// Decodes one message of a stream.
pub type Decode<T> = fn(Bytes) -> Result<T, Status>;

/// The receiving half of a stream: the peer's messages, in order, then its end (`None`), or an
/// error that ends it. Dropping it before the end cancels the stream (a client sends CANCEL).
pub struct Streaming<T> {
    messages: mpsc::UnboundedReceiver<Chunk>,
    /// What is left of a packed chunk, taken a message at a time.
    packed: Bytes,
    /// Client side: the stream's final RESPONSE (status and trailers), or why there is none.
    end: Option<oneshot::Receiver<CallResult>>,
    decode: Decode<T>,
    key: StreamKey,
    /// Where consumed bytes go back, and how to wake the driver for it.
    conn: Option<ConnectionHandle>,
    returns: crate::driver::flow::Returns,
    received: u64,
    trailers: Option<Metadata>,
    close_reason: Option<CloseReason>,
    may_have_executed: bool,
    broken: bool,
    done: bool,
    /// Client side: counts the stream in flight until it ends; dropped early, it tells the driver
    /// the caller gave up.
    _in_flight: Option<InFlightGuard>,
}

impl<T> std::fmt::Debug for Streaming<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streaming")
            .field("id", &self.key.id())
            .field("received", &self.received)
            .field("done", &self.done)
            .finish()
    }
}

/// What the driver gives the application for one stream it receives on.
pub(crate) struct Incoming {
    pub(crate) messages: mpsc::UnboundedReceiver<Chunk>,
    pub(crate) key: StreamKey,
    pub(crate) conn: ConnectionHandle,
    pub(crate) window: u32,
}

impl Streaming<Bytes> {
    /// The messages of a stream the driver receives on (a server's requests).
    pub(crate) fn incoming(incoming: Incoming) -> Self {
        Self::build(incoming, None, None)
    }

    /// The responses of a stream a client opened.
    pub(crate) fn responses(incoming: Incoming, end: oneshot::Receiver<CallResult>, in_flight: InFlightGuard) -> Self {
        Self::build(incoming, Some(end), Some(in_flight))
    }

    fn build(incoming: Incoming, end: Option<oneshot::Receiver<CallResult>>, in_flight: Option<InFlightGuard>) -> Self {
        Streaming {
            messages: incoming.messages,
            packed: Bytes::new(),
            end,
            decode: Ok,
            key: incoming.key,
            conn: Some(incoming.conn),
            returns: crate::driver::flow::Returns::new(incoming.window),
            received: 0,
            trailers: None,
            close_reason: None,
            may_have_executed: true,
            broken: false,
            done: false,
            _in_flight: in_flight,
        }
    }

    /// A stream of decoded messages.
    pub fn decoded<T>(mut self, decode: Decode<T>) -> Streaming<T> {
        Streaming {
            messages: std::mem::replace(&mut self.messages, mpsc::unbounded_channel().1),
            packed: std::mem::take(&mut self.packed),
            end: self.end.take(),
            decode,
            key: self.key.clone(),
            conn: self.conn.take(),
            returns: std::mem::replace(&mut self.returns, crate::driver::flow::Returns::new(0)),
            received: self.received,
            trailers: self.trailers.take(),
            close_reason: self.close_reason.take(),
            may_have_executed: self.may_have_executed,
            broken: self.broken,
            done: self.done,
            _in_flight: self._in_flight.take(),
        }
    }
}

impl<T> Streaming<T> {
    /// The next message; `Ok(None)` at the stream's end (tonic's `message()`).
    pub async fn message(&mut self) -> Result<Option<T>, Status> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx))
            .await
            .transpose()
    }

    /// Messages received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// The trailing metadata the server ended the stream with (once it has ended well).
    pub fn trailers(&self) -> Option<&Metadata> {
        self.trailers.as_ref()
    }

    /// After the stream ended in error: false when it is proven the server never started its
    /// handler (a refusal flagged NOT_EXECUTED, a GOAWAY naming a lower id, never written), so
    /// the stream may be opened again elsewhere; true otherwise, and while it runs.
    pub fn may_have_executed(&self) -> bool {
        self.may_have_executed
    }

    /// After the stream ended in error: true when it was broken rather than ended by the server's
    /// handler: its connection closed or went away (GOAWAY, heartbeats), it was refused before it
    /// ran because the server was busy or stopping (SERVER_BUSY, UNAVAILABLE), or the runtime of
    /// either side reset it for a reason that says nothing of the call (a stall,
    /// `stream_idle_timeout`, a server draining: see [`crate::resume::BREAK_KEY`]). What a
    /// resumable stream opens again after; false for the handler's own status, any other
    /// refusal (an unknown method, an interceptor's, a request that does not decode), a deadline,
    /// and a message too large to send (each would end the same way again).
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Why the connection under the stream closed, if that is what ended it.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        self.close_reason.as_ref()
    }

    /// The stream's id on its connection (0 before the opening request is written).
    pub fn id(&self) -> u64 {
        self.key.id()
    }

    /// `consumed` bytes were taken (or will never be); `stream` is the stream's batch due now.
    fn give_back(&mut self, consumed: usize, stream: Option<u32>) {
        if let Some(conn) = &self.conn {
            let mut wake = conn.shared.returned.consumed(consumed);
            if let Some(n) = stream {
                conn.shared.returned.push(self.key.id(), n);
                wake = true;
            }
            if wake {
                conn.shared.wake.wake();
            }
        }
    }

    /// The end of a client's stream: its RESPONSE, or why it has none.
    fn finish(&mut self, end: Result<CallResult, oneshot::error::RecvError>) -> Option<Result<T, Status>> {
        self.done = true;
        if let Some(g) = self._in_flight.as_mut() {
            g.answered();
        }
        let counts = self.key.counts();
        let status = match end {
            Ok(Ok(frame)) if frame.code == Code::Ok => {
                self.trailers = Some(frame.metadata);
                return None;
            }
            Ok(Ok(frame)) => {
                self.may_have_executed = !frame.not_executed;
                let status = Status::from_parts(frame.code, frame.message, frame.metadata);
                // Of the refusals, only overload and a server stopping go away on another try (an
                // unknown method, an interceptor's refusal, a bad request would end the same way).
                let transient = frame.not_executed && matches!(frame.code, Code::ServerBusy | Code::Unavailable);
                self.broken = transient || crate::resume::is_break(&status);
                status
            }
            Ok(Err(e)) => {
                self.close_reason = e.close_reason().cloned();
                self.may_have_executed = e.may_have_executed();
                self.broken = matches!(
                    e,
                    ConnectionError::NotWritten(_)
                        | ConnectionError::ClosedAfterWrite(_)
                        | ConnectionError::GoAway { .. }
                        | ConnectionError::Draining
                );
                let proof = if e.may_have_executed() { "" } else { " (not executed)" };
                Status::unavailable(format!("stream broken after {counts} on this side{proof}: {e}"))
            }
            Err(_) => {
                let status = self.key.reset_status();
                // No status: the driver went without a word (its runtime stopped).
                self.broken = status.as_ref().is_none_or(crate::resume::is_break);
                status.unwrap_or_else(|| Status::unavailable(format!("stream reset after {counts} on this side")))
            }
        };
        Some(Err(status))
    }
}

impl<T> Streaming<T> {
    /// The next message of the packed chunk being taken apart (its frame was checked whole when
    /// decoded).
    fn next_packed(&mut self) -> Option<Bytes> {
        if self.packed.len() < 4 {
            return None;
        }
        let len = u32::from_be_bytes([self.packed[0], self.packed[1], self.packed[2], self.packed[3]]) as usize;
        let mut msg = self.packed.split_to((4 + len).min(self.packed.len()));
        let _ = msg.split_to(4);
        Some(msg)
    }

    /// The application takes `msg` (which cost `overhead` more bytes of credit: its length prefix).
    fn consumed(&mut self, msg: Bytes, overhead: usize) -> Result<T, Status> {
        self.received += 1;
        self.key.set_received(self.received);
        let cost = (msg.len() + overhead).max(1);
        let batch = self.returns.on_consumed(cost);
        // Counted back to the connection at once: a consumer that takes one message and then
        // works for an hour holds no connection credit for it.
        self.give_back(cost, batch);
        (self.decode)(msg)
    }
}

impl<T> Unpin for Streaming<T> {}

impl<T> Stream for Streaming<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(msg) = this.next_packed() {
            return Poll::Ready(Some(this.consumed(msg, 4)));
        }
        match this.messages.poll_recv(cx) {
            Poll::Ready(Some(Chunk { body, packed: false })) => Poll::Ready(Some(this.consumed(body, 0))),
            Poll::Ready(Some(Chunk { body, packed: true })) => {
                this.packed = body;
                match this.next_packed() {
                    Some(msg) => Poll::Ready(Some(this.consumed(msg, 4))),
                    None => Poll::Ready(Some(Err(Status::internal("an empty packed DATA frame")))),
                }
            }
            Poll::Ready(None) => match this.end.as_mut() {
                None => {
                    this.done = true;
                    Poll::Ready(None)
                }
                Some(end) => {
                    let end = std::task::ready!(Pin::new(end).poll(cx));
                    Poll::Ready(this.finish(end))
                }
            },
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T> Drop for Streaming<T> {
    /// Gives back what was received and never consumed, so the connection's window does not
    /// shrink by what a dropped stream held.
    fn drop(&mut self) {
        self.messages.close();
        let mut unread = self.packed.len();
        while let Ok(m) = self.messages.try_recv() {
            unread += m.body.len().max(1);
        }
        // A batch due now is part of what goes back, as is the remainder.
        let n = self.returns.on_consumed(unread).unwrap_or(0) + self.returns.take();
        self.give_back(unread, Some(n));
    }
}

/// Why a message could not be sent on a stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The receiver granted no credit for `stream_stall_timeout`: the stream was reset.
    #[error("stream stalled: the receiver took nothing for {0:?}, after {1} on this side; stream reset")]
    Stalled(Duration, Counts),
    /// The stream ended (the peer ended it, or this side finished it).
    #[error("stream closed after {0} on this side")]
    Closed(Counts),
    /// The connection closed.
    #[error("connection closed ({0}) after {1} on this side")]
    Connection(CloseReason, Counts),
}

/// The sending half of a stream: one message at a time, each waiting for the flow-control credit
/// the receiver grants (at most a window's worth buffered on this side).
#[derive(Debug)]
pub struct StreamSender<T> {
    conn: ConnectionHandle,
    key: StreamKey,
    /// Bytes this side may hold for the stream (queued or waiting for credit): the peer's window.
    buffer: Arc<Semaphore>,
    buffer_size: u32,
    stall_timeout: Option<Duration>,
    encode: fn(T) -> Bytes,
    ended: bool,
    /// A client's sender resets its stream itself on a stall; a server's leaves that to its
    /// handler's error answer, which ends the stream at once.
    client: bool,
}

impl StreamSender<Bytes> {
    pub(crate) fn new(
        conn: ConnectionHandle,
        key: StreamKey,
        window: u32,
        stall_timeout: Option<Duration>,
        client: bool,
    ) -> Self {
        let size = window.clamp(1, Semaphore::MAX_PERMITS as u32);
        StreamSender {
            conn,
            key,
            buffer: Arc::new(Semaphore::new(size as usize)),
            buffer_size: size,
            stall_timeout,
            encode: |b: Bytes| b,
            ended: false,
            client,
        }
    }

    /// A sender of typed messages.
    pub fn encoded<T>(mut self, encode: fn(T) -> Bytes) -> StreamSender<T> {
        let typed = StreamSender {
            conn: self.conn.clone(),
            key: self.key.clone(),
            buffer: self.buffer.clone(),
            buffer_size: self.buffer_size,
            stall_timeout: self.stall_timeout,
            encode,
            ended: self.ended,
            client: self.client,
        };
        self.ended = true; // the typed sender carries the stream on: this one's drop ends nothing
        typed
    }
}

impl<T> StreamSender<T> {
    /// Bytes this side may hold for the stream before `send` waits (the peer's stream window):
    /// what a batch should stay within.
    pub fn window(&self) -> usize {
        self.buffer_size as usize
    }

    /// Messages sent so far (queued to the connection: those still waiting for credit when the
    /// stream fails never reach the peer).
    pub fn sent(&self) -> u64 {
        self.key.sent()
    }

    /// Sends one message, waiting for credit; fails if the stream or its connection ended, or the
    /// receiver grants nothing for `stream_stall_timeout` (the stream is then reset).
    pub async fn send(&mut self, msg: T) -> Result<(), SendError> {
        let payload = (self.encode)(msg);
        self.send_frame(payload, false).await?;
        self.key.count_sent(1);
        Ok(())
    }

    /// Sends several messages at once (one trip to the connection for all of them), each within
    /// the receiver's credit as [`StreamSender::send`] does.
    pub async fn send_batch(&mut self, msgs: Vec<T>) -> Result<(), SendError> {
        let payloads: Vec<Bytes> = msgs.into_iter().map(self.encode).collect();
        let n = payloads.len() as u64;
        // What the batch may cost on the wire: each message's length (at least 1) and, packed,
        // its 4-byte prefix.
        let total: usize = payloads.iter().map(|p| p.len().max(1) + 4).sum();
        let permit = self.acquire(total).await?;
        let msg = Outbound::DataBatch {
            key: self.key.clone(),
            payloads,
            permit,
        };
        if self.conn.send(msg).await.is_err() {
            let reason = self.conn.closed().await;
            return Err(SendError::Connection(reason, self.key.counts()));
        }
        self.key.count_sent(n);
        Ok(())
    }

    /// Ends this side of the stream (the peer's `Streaming` ends after the messages sent).
    pub async fn finish(mut self) -> Result<(), SendError> {
        self.send_frame(Bytes::new(), true).await
    }

    /// Waits until everything sent so far has left this side (within the receiver's credit and
    /// `stream_stall_timeout`), so that what follows (a server's final status) comes after it.
    pub async fn flush(&mut self) -> Result<(), SendError> {
        let all = self.buffer.clone().acquire_many_owned(self.buffer_size);
        let done = match self.stall_timeout {
            Some(t) => match tokio::time::timeout(t, all).await {
                Ok(p) => p,
                Err(_) => return Err(SendError::Stalled(t, self.key.counts())),
            },
            None => all.await,
        };
        drop(done);
        if self.key.is_closed() {
            return Err(self.gone().await);
        }
        Ok(())
    }

    /// Why the stream can take nothing more.
    async fn gone(&self) -> SendError {
        match self.conn.state() {
            crate::driver::ConnectionState::Closed(reason) => SendError::Connection(reason, self.key.counts()),
            _ => SendError::Closed(self.key.counts()),
        }
    }

    async fn send_frame(&mut self, payload: Bytes, end: bool) -> Result<(), SendError> {
        let permit = self.acquire(crate::driver::flow::cost(payload.len(), end)).await?;
        self.ended = end;
        let msg = Outbound::Data {
            key: self.key.clone(),
            end,
            payload,
            permit,
        };
        if self.conn.send(msg).await.is_err() {
            let reason = self.conn.closed().await;
            return Err(SendError::Connection(reason, self.key.counts()));
        }
        Ok(())
    }

    /// `len` bytes of the send buffer (at most all of it), waiting for them within the stall
    /// timeout; fails if the stream is gone.
    async fn acquire(&mut self, len: usize) -> Result<Option<Held>, SendError> {
        if self.ended {
            return Err(SendError::Closed(self.key.counts()));
        }
        if self.key.is_closed() {
            self.ended = true;
            return Err(self.gone().await);
        }
        let want = u32::try_from(len).unwrap_or(u32::MAX).min(self.buffer_size);
        let permit = if want == 0 {
            None
        } else {
            let acquire = self.buffer.clone().acquire_many_owned(want);
            let permit = match self.stall_timeout {
                Some(t) => match tokio::time::timeout(t, acquire).await {
                    Ok(p) => p,
                    Err(_) => {
                        self.ended = true;
                        if self.client {
                            self.reset(crate::resume::mark_break(
                                Status::resource_exhausted(format!(
                                    "stream stalled: the server took nothing for {t:?}"
                                )),
                                "stall",
                            ))
                            .await;
                        }
                        return Err(SendError::Stalled(t, self.key.counts()));
                    }
                },
                None => acquire.await,
            };
            Some(permit.map_err(|_| SendError::Closed(self.key.counts()))?)
        };
        // The wait may have ended because the stream did (its parked messages were dropped).
        if self.key.is_closed() {
            self.ended = true;
            return Err(self.gone().await);
        }
        Ok(permit.map(Held))
    }

    /// Resets a client's stream: its receiver then reports `status`, and the server is sent CANCEL.
    async fn reset(&self, status: Status) {
        self.key.set_reset(status.clone());
        let _ = self
            .conn
            .send(Outbound::Reset {
                key: self.key.clone(),
                status,
            })
            .await;
    }
}

/// A sender dropped without `finish` ends its half of the stream anyway, so the peer's
/// `Streaming` sees its end instead of waiting for ever.
impl<T> Drop for StreamSender<T> {
    fn drop(&mut self) {
        if !self.ended && !self.key.is_closed() {
            self.conn.tx.try_send(Outbound::Data {
                key: self.key.clone(),
                end: true,
                payload: Bytes::new(),
                permit: None,
            });
        }
    }
}

/// Bytes of a stream's send buffer, released when its frame is encoded.
#[derive(Debug)]
pub struct Held(#[allow(dead_code)] OwnedSemaphorePermit);
