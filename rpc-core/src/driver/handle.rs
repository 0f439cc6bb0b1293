//! The cheap side of a connection: a handle shared by every task that sends on it, the state it
//! exposes, and the errors a call can end with.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::{oneshot, Notify};

pub(crate) use super::queue::{OutboundSender, QueueWaker};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::{CloseReason, GoAwayReason, ProtocolError};
use crate::frame::{RequestFrame, ResponseFrame, Settings};

/// The lifecycle of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionState {
    /// Waiting for the peer's settings.
    Handshaking,
    /// Open for requests.
    Open,
    /// GOAWAY was sent or received: requests in flight finish, no new ones are taken.
    Draining {
        /// The GOAWAY's reason.
        reason: GoAwayReason,
        /// True when the peer sent it.
        by_peer: bool,
    },
    /// Closed for good.
    Closed(CloseReason),
}

/// Why a call on a connection failed, and whether the peer may have run it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectionError {
    /// The connection closed before the request was completely written: the peer cannot have run it.
    #[error("connection closed before the request was written ({0})")]
    NotWritten(CloseReason),
    /// The connection closed after the request was written and before its response arrived: the
    /// peer may have run it.
    #[error("connection closed after the request was written ({0})")]
    ClosedAfterWrite(CloseReason),
    /// The peer's GOAWAY named a last request id below this request's: the peer did not run it.
    #[error("peer sent GOAWAY ({reason}) before processing this request")]
    GoAway {
        /// The GOAWAY's reason.
        reason: GoAwayReason,
        /// The last id the peer processes.
        last_request_id: u64,
    },
    /// The connection is draining and takes no new requests; nothing was written.
    #[error("connection is draining")]
    Draining,
    /// The request could not be encoded (for example larger than the peer's max frame size); nothing was written.
    #[error("request rejected before sending: {0}")]
    Encode(ProtocolError),
    /// The request's deadline passed before it could be written; nothing was written.
    #[error("deadline passed before the request was written")]
    Expired,
    /// The response broke a limit of this side (too much metadata) and was refused; the server
    /// ran the request.
    #[error("response refused: {0}")]
    ResponseRejected(ProtocolError),
}

impl ConnectionError {
    /// True when the peer may have run the request. False proves it did not.
    pub fn may_have_executed(&self) -> bool {
        matches!(
            self,
            ConnectionError::ClosedAfterWrite(_) | ConnectionError::ResponseRejected(_)
        )
    }

    /// The close reason, if the connection closed.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        match self {
            ConnectionError::NotWritten(r) | ConnectionError::ClosedAfterWrite(r) => Some(r),
            _ => None,
        }
    }
}

/// The answer a caller waits for.
pub type CallResult = Result<ResponseFrame, ConnectionError>;

/// Where the outcome of a request goes. Every request's reply is answered exactly once.
#[derive(Debug)]
pub enum Reply {
    /// A request's response, or why it has none.
    Response(oneshot::Sender<CallResult>),
    /// A oneway request: `Ok` once its frame is written to the socket, or why it never was.
    Written(oneshot::Sender<Result<(), ConnectionError>>),
    /// A stream: its messages go to `messages` as they arrive, its end (the RESPONSE, or why
    /// there is none) to `end`, and `key` learns its id when the opening request is written.
    Stream {
        /// The stream's final answer.
        end: oneshot::Sender<CallResult>,
        /// The peer's messages (bounded by the stream's flow-control window).
        messages: tokio::sync::mpsc::UnboundedSender<crate::stream::Chunk>,
        /// Gets the stream's id.
        key: crate::stream::StreamKey,
    },
}

impl Reply {
    /// True when the caller stopped waiting.
    pub(crate) fn is_closed(&self) -> bool {
        match self {
            Reply::Response(r) | Reply::Stream { end: r, .. } => r.is_closed(),
            Reply::Written(r) => r.is_closed(),
        }
    }

    /// Tells the caller why the request fails.
    pub(crate) fn fail(self, e: ConnectionError) {
        match self {
            Reply::Response(r) => {
                let _ = r.send(Err(e));
            }
            Reply::Stream { end, key, .. } => {
                key.close();
                let _ = end.send(Err(e));
            }
            Reply::Written(r) => {
                let _ = r.send(Err(e));
            }
        }
    }
}

/// A message for a connection's I/O task.
#[derive(Debug)]
pub enum Outbound {
    /// Send a request; `reply` gets the response, or `None` for a oneway request.
    Request {
        /// The request; its id is assigned by the driver.
        frame: RequestFrame,
        /// The caller's deadline; the remaining time is computed when the request is written.
        deadline: Option<Instant>,
        /// Where the outcome goes.
        reply: Reply,
    },
    /// Send a response.
    Response(ResponseFrame),
    /// Send one message of a stream (or its END), when the peer's credit allows.
    Data {
        /// The stream.
        key: crate::stream::StreamKey,
        /// The sender's last frame on the stream.
        end: bool,
        /// The encoded message.
        payload: bytes::Bytes,
        /// The message's share of the stream's send buffer, released once it is encoded.
        permit: Option<crate::stream::Held>,
    },
    /// Several messages of one stream at once (a producer that had them ready): one trip through
    /// the queue instead of one each.
    DataBatch {
        /// The stream.
        key: crate::stream::StreamKey,
        /// The encoded messages, in order.
        payloads: Vec<bytes::Bytes>,
        /// Their share of the stream's send buffer, released once the last is encoded.
        permit: Option<crate::stream::Held>,
    },
    /// This side resets a stream (a stall): a client forgets it and sends CANCEL; a server ends
    /// it with `status` at once, dropping what waits for credit.
    Reset {
        /// The stream.
        key: crate::stream::StreamKey,
        /// Why.
        status: crate::status::Status,
    },
    /// Report what each open stream is doing (at most `max` of them), for a look from outside
    /// (the admin page): see [`ConnectionHandle::streams`].
    Inspect {
        /// The most streams to list.
        max: usize,
        /// Where the answer goes.
        reply: oneshot::Sender<super::StreamsView>,
    },
}

impl Outbound {
    pub(crate) fn payload_len(&self) -> usize {
        match self {
            Outbound::Request { frame, .. } => frame.payload.len() + frame.method.len(),
            Outbound::Response(r) => r.payload.len() + r.message.len(),
            Outbound::Data { payload, .. } => payload.len(),
            Outbound::DataBatch { payloads, .. } => payloads.iter().map(|p| p.len()).sum(),
            Outbound::Reset { .. } | Outbound::Inspect { .. } => 0,
        }
    }
}

/// A connection's state, set by its driver and read by every handle: a lock for the state, an
/// atomic for the hot "is it open" check, and one `Notify` for those waiting on a change (a
/// `watch` channel allocated about 380 bytes per connection, mostly wait lists nobody used).
#[derive(Debug)]
pub(crate) struct StateCell {
    open: std::sync::atomic::AtomicBool,
    state: std::sync::Mutex<ConnectionState>,
    changed: Notify,
}

impl StateCell {
    pub(crate) fn new() -> Self {
        StateCell {
            open: false.into(),
            state: std::sync::Mutex::new(ConnectionState::Handshaking),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConnectionState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the state and wakes everyone waiting for a change.
    pub(crate) fn set(&self, state: ConnectionState) {
        let mut s = self.lock();
        self.open
            .store(matches!(state, ConnectionState::Open), Ordering::Release);
        *s = state;
        drop(s);
        self.changed.notify_waiters();
    }

    pub(crate) fn get(&self) -> ConnectionState {
        self.lock().clone()
    }

    pub(crate) fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Waits until `f` maps the state to something. A change between the check and the wait is
    /// not missed: the wait is registered before the check.
    pub(crate) async fn wait_for<T>(&self, f: impl Fn(&ConnectionState) -> Option<T>) -> T {
        loop {
            let changed = self.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            if let Some(t) = f(&self.lock()) {
                return t;
            }
            changed.await;
        }
    }
}

pub(crate) struct Shared {
    pub(crate) id: u64,
    pub(crate) state: StateCell,
    /// Shared with the connections whose peers sent equal settings (see [`crate::intern`]).
    pub(crate) peer_settings: OnceLock<Arc<Settings>>,
    pub(crate) in_flight: AtomicUsize,
    /// Milliseconds since `epoch` of the last frame written; readers judge idleness as the peer sees it.
    pub(crate) last_write_ms: AtomicU64,
    pub(crate) epoch: Instant,
    pub(crate) shutdown: CancellationToken,
    pub(crate) outbound_buffered: AtomicUsize,
    pub(crate) heartbeats_sent: AtomicU64,
    pub(crate) heartbeats_acked: AtomicU64,
    pub(crate) heartbeat_failures: std::sync::atomic::AtomicU32,
    /// The latest heartbeat's round trip in µs (0: none measured yet).
    pub(crate) heartbeat_rtt_us: AtomicU64,
    /// Bytes read from and written to the socket.
    pub(crate) bytes_read: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    pub(crate) tcp_options: Option<Arc<crate::config::TcpConfig>>,
    /// A caller gave up on a call: the driver forgets the calls nobody waits for at its next pass.
    pub(crate) cancelled: std::sync::atomic::AtomicBool,
    /// The connection's shutdown token fired (set by this struct's waker, which the driver's
    /// shutdown future holds): the driver polls that future only then.
    pub(crate) shutdown_fired: std::sync::atomic::AtomicBool,
    /// The driver task's waker, which that waker wakes. Not the outbound queue's: a driver whose
    /// write buffer is full waits on the socket alone, not on its queue (found in review: the
    /// shutdown then waited for the write stall).
    pub(crate) driver_task: futures_util::task::AtomicWaker,
    /// Calls waiting for a response, as of the driver's last pass.
    pub(crate) pending_calls: AtomicUsize,
    /// Streams open, as of the driver's last pass.
    pub(crate) open_streams: AtomicUsize,
    /// Stream message bytes waiting for the peer's credit, as of the driver's last pass.
    pub(crate) stream_bytes_waiting: AtomicUsize,
    /// Wakes the driver (to sweep cancelled calls, or to give stream credit back).
    pub(crate) wake: QueueWaker,
    /// Stream bytes the application consumed, for the driver to give back as WINDOW frames.
    pub(crate) returned: crate::stream::Returned,
    /// The window this side grants each stream.
    pub(crate) stream_window: u32,
    /// See `ConnectionConfig::stream_stall_timeout`.
    pub(crate) stream_stall_timeout: Option<std::time::Duration>,
}

/// The waker the driver's shutdown future holds: a cancelled token marks the connection's
/// shutdown fired and wakes the driver. So a pass of the driver looks at an atomic instead of
/// locking the token (which `CancellationToken::is_cancelled` does) on every pass.
impl std::task::Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.shutdown_fired.store(true, Ordering::Release);
        self.driver_task.wake();
    }
}

/// A handle on one connection: cheap to clone, shared by every task that uses the connection.
#[derive(Clone)]
pub struct ConnectionHandle {
    pub(crate) tx: OutboundSender,
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for ConnectionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionHandle")
            .field("id", &self.shared.id)
            .field("state", &self.state())
            .finish()
    }
}

impl ConnectionHandle {
    /// Process-unique connection id.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// The current state.
    pub fn state(&self) -> ConnectionState {
        self.shared.state.get()
    }

    /// Whether a request could be queued on the connection now without waiting for the I/O task
    /// (its outbound queue, `outbound_queue` frames, has a free slot).
    pub fn has_room(&self) -> bool {
        self.tx.has_room()
    }

    /// A poller that is ready once the outbound queue has a free slot (or the connection is
    /// gone), for backpressure to callers (`tower::Service::poll_ready`).
    pub fn room(&self) -> super::queue::Room {
        self.tx.room()
    }

    /// True while the connection takes new requests.
    pub fn is_open(&self) -> bool {
        self.shared.state.is_open()
    }

    /// Waits until the handshake completes and the connection is open, or returns the close
    /// reason. A connection the peer drains right away (a GOAWAY with its handshake) is not ready:
    /// this waits for its close and returns why.
    pub async fn ready(&self) -> Result<(), CloseReason> {
        self.shared
            .state
            .wait_for(|s| match s {
                ConnectionState::Open => Some(Ok(())),
                ConnectionState::Closed(r) => Some(Err(r.clone())),
                _ => None,
            })
            .await
    }

    /// Waits until the connection is closed and returns why.
    pub async fn closed(&self) -> CloseReason {
        self.shared
            .state
            .wait_for(|s| match s {
                ConnectionState::Closed(r) => Some(r.clone()),
                _ => None,
            })
            .await
    }

    /// The settings the peer sent in the handshake.
    pub fn peer_settings(&self) -> Option<Settings> {
        self.shared.peer_settings.get().map(|s| **s)
    }

    /// Requests sent and not yet answered, as counted by callers through [`InFlightGuard`].
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Relaxed)
    }

    /// Counts one request in flight until the guard drops. A guard dropped before
    /// [`InFlightGuard::answered`] marks a caller that gave up: the driver then forgets its call at
    /// once (its next pass) instead of when a response comes, which may be never.
    pub fn track_in_flight(&self) -> InFlightGuard {
        self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlightGuard {
            shared: self.shared.clone(),
            answered: false,
        }
    }

    /// Calls on this connection waiting for a response, as of the driver's last pass (a cancelled
    /// call is forgotten then).
    pub fn pending_calls(&self) -> usize {
        self.shared.pending_calls.load(Ordering::Relaxed)
    }

    /// Stream message bytes this side holds for the peer, waiting for its credit (as of the
    /// driver's last pass): what a consumer that stops reading makes this side hold, besides
    /// [`ConnectionHandle::outbound_buffered`].
    pub fn stream_bytes_waiting(&self) -> usize {
        self.shared.stream_bytes_waiting.load(Ordering::Relaxed)
    }

    /// Streams open on this connection, as of the driver's last pass.
    pub fn open_streams(&self) -> usize {
        self.shared.open_streams.load(Ordering::Relaxed)
    }

    /// When this side last wrote a frame (the peer's idle clock restarts then).
    pub fn last_write(&self) -> Instant {
        self.shared.epoch + std::time::Duration::from_millis(self.shared.last_write_ms.load(Ordering::Relaxed))
    }

    /// Bytes this side holds for the peer and has not written yet: queued for the I/O task (at most
    /// `max_outbound_bytes`) plus encoded in its write buffer (at most `max_outbound_bytes` plus one
    /// frame, as of the driver's last pass).
    pub fn outbound_buffered(&self) -> usize {
        self.tx.queued_bytes() + self.shared.outbound_buffered.load(Ordering::Relaxed)
    }

    /// The socket options the kernel applied to the TCP socket under this connection, read back
    /// with getsockopt when it was set up (`None` for a stream that is not plain TCP or if the read failed).
    pub fn tcp_options(&self) -> Option<crate::config::TcpConfig> {
        self.shared.tcp_options.as_deref().copied()
    }

    /// Heartbeats this side has sent on the connection.
    pub fn heartbeats_sent(&self) -> u64 {
        self.shared.heartbeats_sent.load(Ordering::Relaxed)
    }

    /// Heartbeats in a row that went unanswered (0 once anything is read again).
    pub fn heartbeat_failures(&self) -> u32 {
        self.shared.heartbeat_failures.load(Ordering::Relaxed)
    }

    /// Heartbeat acks this side has received on the connection.
    pub fn heartbeats_acked(&self) -> u64 {
        self.shared.heartbeats_acked.load(Ordering::Relaxed)
    }

    /// The round trip of the latest heartbeat this side sent and got an ack for: from when it was
    /// due to when its ack was read, so it includes the queues of both sides (`None` until one
    /// was answered; a busy connection sends none, so this can be old).
    pub fn heartbeat_rtt(&self) -> Option<std::time::Duration> {
        match self.shared.heartbeat_rtt_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(std::time::Duration::from_micros(us)),
        }
    }

    /// Bytes read from the socket so far (after TLS, the protocol's own bytes).
    pub fn bytes_read(&self) -> u64 {
        self.shared.bytes_read.load(Ordering::Relaxed)
    }

    /// Bytes written to the socket so far (after TLS, the protocol's own bytes).
    pub fn bytes_written(&self) -> u64 {
        self.shared.bytes_written.load(Ordering::Relaxed)
    }

    /// When the connection was set up (its TCP connection was already made).
    pub fn opened_at(&self) -> Instant {
        self.shared.epoch
    }

    /// Queues a message for the I/O task, waiting while the outbound queue is full (in frames or
    /// in bytes). Gives the message back if the connection is gone. Internal (see the module
    /// docs): requests go through `rpc_client::Client`.
    #[doc(hidden)]
    pub async fn send(&self, msg: Outbound) -> Result<(), Outbound> {
        self.tx.send(msg).await
    }

    /// What the connection's open streams are doing (at most `max` listed), as its driver
    /// answers through the outbound queue: `None` if the connection is gone. The answer waits for
    /// the queue and the driver, so bound the wait: a driver that does not answer is itself news.
    pub async fn streams(&self, max: usize) -> Option<super::StreamsView> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Outbound::Inspect { max, reply }).await.ok()?;
        answer.await.ok()
    }

    /// True when the peer announced streams (and so did this side).
    pub fn supports_streams(&self) -> bool {
        let ours = crate::frame::features::STREAMS;
        self.peer_settings()
            .is_some_and(|s| s.features.unwrap_or(0) & ours != 0)
    }

    /// Opens a stream with `frame` (method, metadata; its id is assigned when it is written):
    /// the sender of this side's messages, and the receiver of the peer's, which ends with the
    /// peer's final status. `deadline` bounds the whole stream (`None`: it runs until ended).
    /// Fails at once only if the connection is gone; anything later (a GOAWAY, a close, a
    /// refusal) ends the receiver.
    pub async fn open_stream(
        &self,
        mut frame: RequestFrame,
        deadline: Option<Instant>,
    ) -> Result<
        (
            crate::stream::StreamSender<bytes::Bytes>,
            crate::stream::Streaming<bytes::Bytes>,
        ),
        ConnectionError,
    > {
        let key = crate::stream::StreamKey::default();
        let (end_tx, end_rx) = oneshot::channel();
        let (messages_tx, messages) = tokio::sync::mpsc::unbounded_channel();
        frame.stream = true;
        let in_flight = self.track_in_flight();
        let msg = Outbound::Request {
            frame,
            deadline,
            reply: Reply::Stream {
                end: end_tx,
                messages: messages_tx,
                key: key.clone(),
            },
        };
        if self.send(msg).await.is_err() {
            let mut in_flight = in_flight;
            in_flight.answered();
            return Err(ConnectionError::NotWritten(self.closed().await));
        }
        let peer_window = self
            .peer_settings()
            .and_then(|s| s.stream_window)
            .unwrap_or(super::streams::DEFAULT_WINDOW);
        let incoming = crate::stream::Incoming {
            messages,
            key: key.clone(),
            conn: self.clone(),
            window: self.shared.stream_window,
        };
        let sender =
            crate::stream::StreamSender::new(self.clone(), key, peer_window, self.shared.stream_stall_timeout, true);
        Ok((sender, crate::stream::Streaming::responses(incoming, end_rx, in_flight)))
    }

    /// Starts a graceful close: GOAWAY, let requests in flight finish (within the drain timeout), close.
    pub fn shutdown(&self) {
        self.shared.shutdown.cancel();
    }
}

/// Decrements a connection's in-flight count on drop, and tells the driver when its caller gave
/// up before an answer.
#[derive(Debug)]
pub struct InFlightGuard {
    shared: Arc<Shared>,
    answered: bool,
}

impl InFlightGuard {
    /// The call has its answer: dropping the guard is not a cancellation.
    pub fn answered(&mut self) {
        self.answered = true;
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        if !self.answered {
            self.shared.cancelled.store(true, Ordering::Release);
            self.shared.wake.wake();
        }
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("id", &self.id).finish()
    }
}
