//! The connection driver both sides share: one task per connection that owns the byte stream.
//!
//! It reads, writes and runs its timers in a single hand-written `poll` (hand-written because a
//! `select!` loop that awaits a write cannot read at the same time, and reading must go on while a
//! slow peer stalls our writes, or heartbeats and GOAWAY would go unseen). Each pass:
//! 1. reads what the socket has and decodes every complete frame, answering heartbeats at once;
//! 2. takes frames from the bounded outbound queue while fewer than `max_outbound_bytes` wait,
//!    encoding them into one write buffer, so a burst is written with one syscall;
//! 3. writes and flushes, tracking stalls; when more frames are expected soon (responses of running
//!    handlers, requests of callers just answered), the write first waits for the tasks ready on
//!    this worker thread, up to 16 frames (see `coalesce.rs`);
//! 4. re-arms one timer for the earliest of: heartbeat, idle eviction, write stall, partial
//!    frame, drain deadline.
//!
//! Generic over `AsyncRead + AsyncWrite`, so TLS slots in without a second driver.
//!
//! The API of this module is what users inspect: [`ConnectionHandle`] (state, requests in
//! flight, heartbeats, backpressure), [`ConnectionState`], [`ConnectionError`], [`Room`],
//! [`InFlightGuard`]. The driver itself and the types rpc-client and rpc-server use to talk to it
//! (`Driver`, `DriverConfig`, `Dispatch`, `Responder`, `Outbound`, `Reply`, ...) are public only
//! because those crates are separate: they are hidden from the documentation, are not part of
//! tether's API, and change without notice.

mod coalesce;
mod dispatch;
pub(crate) mod flow;
mod handle;
mod queue;
mod readsize;
mod session;
mod streams;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};
use tokio_util::codec::Decoder;
use tokio_util::io::poll_read_buf;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

use coalesce::Coalescer;
#[doc(hidden)]
pub use dispatch::{refusal_frame, status_frame, Dispatch, Responder, StreamIo};
#[doc(hidden)]
pub use handle::{CallResult, Outbound, Reply};
pub use handle::{ConnectionError, ConnectionHandle, ConnectionState, InFlightGuard};
use handle::{OutboundSender, Shared};
use queue::OutboundReceiver;
pub use queue::Room;
use session::{Admission, Session};
pub use streams::{StreamInfo, StreamsView};

use crate::codec::FrameCodec;
use crate::config::{ConnectionConfig, HeartbeatConfig};
use crate::error::{CloseReason, CodecError, GoAwayReason, ProtocolError};
use crate::event::{ConnectionEvent, EventSender};
use crate::frame::{features, Frame, FrameKind, GoAway, RequestFrame, ResponseFrame, Settings};
use crate::liveness::{Liveness, LivenessAction, PartialFrame, WriteStall};
use crate::metrics::{ConnectionMetrics, Side};
use crate::status::Status;

static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

// What every connection holds a copy of, and most hold equal copies of: kept once per distinct
// value (a connection's config is 136 bytes, its TCP options 96, its peer's settings 112).
static CONNECTION_CONFIGS: crate::intern::Interner<ConnectionConfig> = crate::intern::Interner::new();
static TCP_OPTIONS: crate::intern::Interner<crate::config::TcpConfig> = crate::intern::Interner::new();
static PEER_SETTINGS: crate::intern::Interner<Settings> = crate::intern::Interner::new();

/// How many read or write syscalls one pass may make before yielding to other tasks.
const IO_BUDGET: usize = 32;
/// A read (or write) this long after the previous one marks a quiet connection, whose buffers are
/// released once they are empty (see [`Driver::release_idle_buffers`]).
const QUIET_GAP: Duration = Duration::from_millis(200);
/// Everything a driver needs besides the stream. Internal (see the module docs).
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// Client or server.
    pub side: Side,
    /// Frame size, outbound bytes, stall and partial-frame limits.
    pub connection: ConnectionConfig,
    /// Heartbeats (`None` or disabled: none sent). A client's are sent whenever it has read
    /// nothing for their interval; a server's only while handlers or streams are in flight.
    pub heartbeat: Option<HeartbeatConfig>,
    /// Server idle eviction (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// The settings this side sends in the handshake.
    pub settings: Settings,
    /// How long a graceful drain may take before the connection is closed anyway.
    pub drain_timeout: Duration,
    /// After this side sends GOAWAY and closes, how long it keeps reading (and discarding) so the
    /// peer reads the GOAWAY before any RST could destroy it.
    pub linger: Duration,
    /// The peer's address, for events and logs.
    pub peer: Option<SocketAddr>,
    /// Where connection events go.
    pub events: Option<EventSender>,
    /// The socket options read back from the TCP socket under the stream, if the caller set them.
    pub tcp_options: Option<crate::config::TcpConfig>,
    /// Cancelling this token starts a graceful drain of the connection (a server cancels one token
    /// for all its connections). Each connection gets a child token of it.
    pub shutdown: Option<CancellationToken>,
}

impl DriverConfig {
    /// Defaults for `side`.
    pub fn new(side: Side) -> Self {
        DriverConfig {
            side,
            connection: ConnectionConfig::default(),
            heartbeat: None,
            idle_timeout: None,
            settings: Settings::default(),
            drain_timeout: Duration::from_secs(30),
            linger: Duration::from_secs(1),
            peer: None,
            events: None,
            tcp_options: None,
            shutdown: None,
        }
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What a driver keeps of its [`DriverConfig`] once built: what it reads as it runs. The settings
/// it announced, the heartbeat and the TCP options are used up when it is built (half the
/// config, and every idle connection holds its driver).
struct Kept {
    side: Side,
    /// Shared by the connections made with an equal config (see [`crate::intern`]).
    connection: std::sync::Arc<ConnectionConfig>,
    /// The features this side announced.
    features: u64,
    drain_timeout: Duration,
    linger: Duration,
    peer: Option<SocketAddr>,
    events: Option<EventSender>,
}

/// The I/O task of one connection. Run it with [`Driver::run`] (usually spawned). Internal (see
/// the module docs).
#[doc(hidden)]
pub struct Driver<S> {
    io: S,
    cfg: Kept,
    codec: FrameCodec,
    rbuf: BytesMut,
    /// The room the next read gets (see `readsize.rs`).
    read_size: readsize::ReadSize,
    wbuf: BytesMut,
    needs_flush: bool,
    rx: OutboundReceiver,
    rx_closed: bool,
    /// Server only: responders send through it. A client driver holds none, so its queue closes
    /// when the last handle is dropped.
    responder_tx: Option<OutboundSender>,
    shared: Arc<Shared>,
    liveness: Liveness,
    stall: WriteStall,
    partial: PartialFrame,
    timer: Pin<Box<Sleep>>,
    timer_at: Option<Instant>,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    shutdown_seen: bool,
    /// The shutdown future has been polled once (and holds the connection's waker).
    shutdown_polled: bool,
    /// The waker last registered in `Shared::driver_task`.
    task_waker: Option<std::task::Waker>,
    /// When the next idle scan of the streams is due (with `stream_idle_timeout` and streams open).
    stream_idle_at: Option<Instant>,
    /// The session rules: ids, calls waiting, what was written, GOAWAY, drain, close outcomes.
    session: Session<oneshot::Sender<CallResult>, oneshot::Sender<Result<(), ConnectionError>>>,
    dispatch: Option<Box<dyn Dispatch>>,
    tasks: TaskTracker,
    tasks_idle: Option<BoxFuture>,
    /// The handshake completed in the read being decoded; `Open` is published after it.
    open_pending: bool,
    /// Until the peer's SETTINGS arrive, when the connection is closed for not sending them.
    handshake_deadline: Instant,
    /// Frames left undecoded in the read buffer while the write budget was full.
    decode_paused: bool,
    /// The features both sides announced in their SETTINGS (see [`downgrade_for_v1`] and CANCEL).
    peer_features: u64,
    /// The streams open on this connection, their credit and what waits for it.
    streams: streams::Streams,
    /// Write coalescing: whether a write waits for the frames other tasks are about to queue.
    coalesce: Coalescer,
    /// When the last read and the last write returned data, and whether each came after a quiet gap.
    read_at: Option<Instant>,
    write_at: Option<Instant>,
    read_quiet: bool,
    write_quiet: bool,
    metrics: ConnectionMetrics,
}

/// A driver dropped without closing (its task panicked, was aborted, or its runtime shut down)
/// still tells everyone: `Closed(Aborted)` is published and every pending request fails with what
/// is known of it (written or not), so no caller waits on a connection that is gone.
impl<S> Drop for Driver<S> {
    fn drop(&mut self) {
        self.finish(CloseReason::Aborted);
    }
}

/// Idle scans per `stream_idle_timeout` (a stream is reset after this many with nothing moved).
const IDLE_SCANS: u32 = 4;

/// Messages in a DATA body (a packed one was checked when decoded, or built by `pack`).
fn messages_in(packed: bool, body: &[u8]) -> u64 {
    if packed {
        crate::frame::packed_messages(body).unwrap_or(0) as u64
    } else {
        1
    }
}

/// A response for a peer that predates [`features::NOT_EXECUTED_FLAG`] (a version-1 peer): it
/// knows codes 0 to 11 only, and reads SERVER_BUSY, NOT_FOUND and UNAVAILABLE as "the handler did
/// not run". So those codes go to it only as the runtime's refusals (true for it too),
/// UNIMPLEMENTED as NOT_FOUND (its "no such method"), another refusal with a newer code
/// (RESOURCE_EXHAUSTED) as SERVER_BUSY, and a handler's SERVER_BUSY, NOT_FOUND, UNAVAILABLE or
/// newer code as APPLICATION_ERROR (which it reads as "may have run"); a changed code is named
/// in the message.
fn downgrade_for_v1(r: &mut ResponseFrame) {
    use crate::status::Code;
    const V1_LAST: u16 = 11; // INTERNAL
    let newer = r.code.as_u16() > V1_LAST;
    let to = match (r.code, r.not_executed) {
        (Code::Unimplemented, true) => Code::NotFound,
        (_, true) if newer => Code::ServerBusy,
        (Code::ServerBusy | Code::NotFound | Code::Unavailable, false) => Code::ApplicationError,
        (_, false) if newer => Code::ApplicationError,
        _ => return,
    };
    r.message = format!("{}: {}", r.code, r.message);
    r.code = to;
}

/// What does not touch the stream, so `Drop` can use it too.
impl<S> Driver<S> {
    /// Fails everything pending with what is known of it and publishes `Closed`; once per
    /// connection (a later call does nothing).
    fn finish(&mut self, reason: CloseReason) {
        let Some(closing) = self.session.close(&reason) else {
            return;
        };
        // Closed is visible before any caller is woken, so a retry never picks this connection.
        self.shared.state.set(ConnectionState::Closed(reason.clone()));
        for (reply, e) in closing.calls {
            let _ = reply.send(Err(e));
        }
        for (written, outcome) in closing.oneways {
            let _ = written.send(outcome);
        }
        self.responder_tx = None;
        // Their receivers see the end, then the call's error; their senders' buffers free up.
        for _ in 0..self.streams.clear() {
            self.metrics.stream_closed("connection");
        }
        self.shared.open_streams.store(0, Ordering::Relaxed);
        self.shared.stream_bytes_waiting.store(0, Ordering::Relaxed);
        for msg in self.rx.close() {
            if let Outbound::Request { reply, .. } = msg {
                reply.fail(ConnectionError::NotWritten(reason.clone()));
            }
        }
        self.tasks.close();
        self.metrics.closed(&reason);
        self.emit(ConnectionEvent::Closed {
            id: self.shared.id,
            peer: self.cfg.peer,
            reason,
        });
    }

    fn emit(&self, event: ConnectionEvent) {
        if let Some(tx) = &self.cfg.events {
            tx.send(event);
        }
    }
}

impl<S> std::fmt::Debug for Driver<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("id", &self.shared.id)
            .field("side", &self.cfg.side)
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Driver<S> {
    /// A client-side driver: it sends requests and matches responses by id.
    pub fn client(io: S, cfg: DriverConfig) -> (ConnectionHandle, Self) {
        Self::build(io, cfg, None)
    }

    /// A server-side driver: requests go to `dispatch`, which runs them off this task.
    pub fn server(io: S, cfg: DriverConfig, dispatch: impl Dispatch) -> (ConnectionHandle, Self) {
        Self::build(io, cfg, Some(Box::new(dispatch)))
    }

    fn build(io: S, cfg: DriverConfig, dispatch: Option<Box<dyn Dispatch>>) -> (ConnectionHandle, Self) {
        let now = Instant::now();
        let (tx, rx) = queue::outbound_queue(cfg.connection.outbound_queue, cfg.connection.max_outbound_bytes);
        let token = cfg
            .shutdown
            .as_ref()
            .map_or_else(CancellationToken::new, CancellationToken::child_token);
        let shared = Arc::new(Shared {
            id: NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed),
            state: handle::StateCell::new(),
            peer_settings: OnceLock::new(),
            in_flight: Default::default(),
            last_write_ms: AtomicU64::new(0),
            epoch: now,
            shutdown: token.clone(),
            outbound_buffered: Default::default(),
            heartbeats_sent: Default::default(),
            heartbeats_acked: Default::default(),
            heartbeat_rtt_us: Default::default(),
            bytes_read: Default::default(),
            bytes_written: Default::default(),
            heartbeat_failures: Default::default(),
            tcp_options: cfg.tcp_options.map(|t| TCP_OPTIONS.get(t)),
            cancelled: Default::default(),
            shutdown_fired: Default::default(),
            driver_task: Default::default(),
            pending_calls: Default::default(),
            open_streams: Default::default(),
            stream_bytes_waiting: Default::default(),
            wake: tx.waker(),
            returned: crate::stream::Returned::new(cfg.settings.connection_window.unwrap_or(streams::DEFAULT_WINDOW)),
            stream_window: cfg.settings.stream_window.unwrap_or(streams::DEFAULT_WINDOW),
            stream_stall_timeout: cfg.connection.stream_stall_timeout,
        });
        let mut codec = FrameCodec::new(cfg.connection.max_frame_size);
        codec.set_max_metadata_entries(cfg.connection.max_metadata_entries);
        codec.set_max_metadata_bytes(cfg.connection.max_metadata_bytes);
        let mut wbuf = BytesMut::new();
        codec
            .encode_frame(&Frame::Settings(cfg.settings), &mut wbuf)
            .expect("settings always fit a frame");
        let liveness = match cfg.side {
            Side::Client => Liveness::new(now, cfg.heartbeat, None),
            Side::Server => Liveness::server(now, cfg.heartbeat, cfg.idle_timeout),
        };
        let mut session = Session::new();
        session.on_encoded(wbuf.len());
        let driver = Driver {
            io,
            codec,
            rbuf: BytesMut::new(),
            read_size: readsize::ReadSize::default(),
            wbuf,
            needs_flush: false,
            rx,
            rx_closed: false,
            responder_tx: dispatch.is_some().then(|| tx.clone()),
            liveness,
            stall: WriteStall::default(),
            partial: PartialFrame::default(),
            timer: Box::pin(tokio::time::sleep_until(now)),
            timer_at: None,
            shutdown: Box::pin(token.cancelled_owned()),
            shutdown_seen: false,
            shutdown_polled: false,
            task_waker: None,
            stream_idle_at: None,
            session,
            dispatch,
            tasks: TaskTracker::new(),
            tasks_idle: None,
            open_pending: false,
            peer_features: 0,
            streams: streams::Streams::new(cfg.settings.stream_window, cfg.settings.connection_window),
            handshake_deadline: now + cfg.connection.handshake_timeout,
            decode_paused: false,
            coalesce: Coalescer::default(),
            read_at: None,
            write_at: None,
            read_quiet: true,
            write_quiet: true,
            metrics: ConnectionMetrics::new(cfg.side),
            cfg: Kept {
                side: cfg.side,
                connection: CONNECTION_CONFIGS.get(cfg.connection),
                features: cfg.settings.features.unwrap_or(0),
                drain_timeout: cfg.drain_timeout,
                linger: cfg.linger,
                peer: cfg.peer,
                events: cfg.events,
            },
            shared: shared.clone(),
        };
        (ConnectionHandle { tx, shared }, driver)
    }

    /// Runs the connection until it closes and returns why. After a close in which this side sent
    /// GOAWAY, it half-closes and lingers (reading and discarding) for up to `linger`.
    ///
    /// A plain function returning an `async move` block, not an `async fn`: an `async fn` keeps
    /// its argument twice in its future (as captured, and moved into a local), and the driver is
    /// most of a connection's idle memory.
    #[allow(clippy::manual_async_fn)] // deliberately not an `async fn` (see above)
    pub fn run(mut self) -> impl Future<Output = CloseReason> + Send + 'static {
        async move {
            let reason = std::future::poll_fn(|cx| self.poll_drive(cx)).await;
            let (conn, side) = (self.shared.id, self.cfg.side.as_str());
            // Logged once per connection, at a level that says whether someone should look.
            match &reason {
                CloseReason::Protocol(_)
                | CloseReason::SlowConsumer
                | CloseReason::HeartbeatTimeout
                | CloseReason::PartialFrameTimeout
                | CloseReason::Io { .. } => tracing::warn!(conn, side, %reason, "connection closed"),
                CloseReason::Reset
                | CloseReason::PeerClosed
                | CloseReason::IdleTimeout
                | CloseReason::GoAway { .. } => {
                    tracing::info!(conn, side, %reason, "connection closed")
                }
                _ => tracing::debug!(conn, side, %reason, "connection closed"),
            }
            if self.session.goaway_sent() && !matches!(reason, CloseReason::Reset | CloseReason::SlowConsumer) {
                let io = &mut self.io;
                // Boxed: the linger's timer and reads would otherwise make every connection's
                // task larger for a state only a closing connection is in.
                let _ = Box::pin(tokio::time::timeout(self.cfg.linger, async move {
                    let _ = io.shutdown().await;
                    // On the heap: a buffer in this future would sit in every connection's task.
                    let mut scratch = vec![0u8; 4096];
                    while let Ok(n) = io.read(&mut scratch).await {
                        if n == 0 {
                            break;
                        }
                    }
                }))
                .await;
            }
            reason
        }
    }

    fn poll_drive(&mut self, cx: &mut Context<'_>) -> Poll<CloseReason> {
        match self.poll_inner(cx) {
            Poll::Ready(reason) => {
                self.close(reason.clone(), cx);
                Poll::Ready(reason)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<CloseReason> {
        loop {
            let now = Instant::now();
            if !self.shutdown_seen && self.shutdown_due(cx) {
                self.shutdown_seen = true;
                self.start_drain(now, GoAwayReason::Shutdown);
            }
            if self.shared.cancelled.load(Ordering::Relaxed) && self.shared.cancelled.swap(false, Ordering::Acquire) {
                self.on_callers_gone();
            }
            let mut budget_used = true;
            let mut deferred = false;
            for _ in 0..IO_BUDGET {
                let read = match self.poll_read(cx, now) {
                    Ok(r) => r,
                    Err(reason) => return Poll::Ready(reason),
                };
                let pulled = self.poll_outbound(cx, now);
                if self.coalesce.hold(cx, pulled, self.wbuf.len()) {
                    deferred = true;
                    budget_used = false;
                    break;
                }
                let wrote = match self.poll_write(cx, now) {
                    Ok(w) => w,
                    Err(reason) => return Poll::Ready(reason),
                };
                if !(read || pulled || wrote) {
                    budget_used = false;
                    break;
                }
            }
            if let Err(reason) = self.on_timers(now) {
                return Poll::Ready(reason);
            }
            // Timers may have encoded a heartbeat: write it in this pass (or with the deferred write).
            if !deferred {
                if let Err(reason) = self.poll_write(cx, now) {
                    return Poll::Ready(reason);
                }
            }
            if let Some(reason) = self.poll_drained(cx) {
                return Poll::Ready(reason);
            }
            self.shared.outbound_buffered.store(self.wbuf.len(), Ordering::Relaxed);
            self.shared
                .pending_calls
                .store(self.session.pending(), Ordering::Relaxed);
            self.shared.open_streams.store(self.streams.len(), Ordering::Relaxed);
            self.shared
                .stream_bytes_waiting
                .store(self.streams.parked_bytes(), Ordering::Relaxed);
            if !budget_used {
                self.release_idle_buffers();
            }
            if budget_used {
                // Used the whole budget with work still coming: let other tasks run, then go on.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            match self.next_deadline() {
                Some(at) => {
                    if self.timer_at != Some(at) {
                        self.timer.as_mut().reset(at);
                        self.timer_at = Some(at);
                    }
                    if self.timer.as_mut().poll(cx).is_ready() {
                        self.timer_at = None;
                        continue;
                    }
                }
                None => self.timer_at = None,
            }
            return Poll::Pending;
        }
    }

    /// True once the connection's shutdown token fired. The token's future is polled at the first
    /// pass, with the connection's own waker (see `Shared`'s `Wake`), and after that only once
    /// that waker has marked the token fired: the token's `is_cancelled` takes a lock, which
    /// every pass paid (3 % of an idle client's CPU).
    fn shutdown_due(&mut self, cx: &Context<'_>) -> bool {
        // The task's waker, for the connection's waker to wake: registered again only if it
        // changed (a tokio task keeps one waker, so a pass compares two pointers).
        if !self.task_waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            self.shared.driver_task.register(cx.waker());
            self.task_waker = Some(cx.waker().clone());
        }
        if self.shutdown_polled && !self.shared.shutdown_fired.load(Ordering::Acquire) {
            return false;
        }
        self.shutdown_polled = true;
        let waker = std::task::Waker::from(self.shared.clone());
        self.shutdown.as_mut().poll(&mut Context::from_waker(&waker)).is_ready()
    }

    /// An idle connection should cost little memory: a buffer left empty by a pass goes back to the
    /// allocator when that pass's read (or write) came after a quiet gap, as a heartbeat on an idle
    /// connection does. A busy connection keeps its buffers (reallocating them on every pass would
    /// cost an allocation of tens of KiB per read); once it falls quiet, it releases them at its next
    /// heartbeat. Even a heartbeat's few hundred bytes go back: the allocator hands the same small
    /// block to the next one, which costs less than every idle connection keeping one.
    fn release_idle_buffers(&mut self) {
        if self.read_quiet && self.rbuf.is_empty() && self.rbuf.capacity() > 0 {
            self.rbuf = BytesMut::new();
            self.read_size.reset();
        }
        if self.write_quiet && self.wbuf.is_empty() && !self.needs_flush && self.wbuf.capacity() > 0 {
            self.wbuf = BytesMut::new();
        }
        if self.write_quiet {
            self.rx.release_memory();
        }
    }

    /// Records traffic at `now`; true if it came after a quiet gap.
    fn after_quiet(last: &mut Option<Instant>, now: Instant) -> bool {
        let quiet = last.is_none_or(|t| now.saturating_duration_since(t) >= QUIET_GAP);
        *last = Some(now);
        quiet
    }

    /// True while the write buffer is over the budget that every byte this side writes shares
    /// (responses, acks, refusals): the peer is not reading, so nothing more is read from it and no
    /// more work is taken. A server pauses at the budget; a client, whose own requests may fill
    /// the budget, only at twice it (what a hostile server's heartbeats could add), so a client
    /// always reads the responses that free the server and the two cannot wait on each other.
    fn write_budget_full(&self) -> bool {
        let budget = self.cfg.connection.max_outbound_bytes;
        match self.cfg.side {
            Side::Server => self.wbuf.len() >= budget,
            Side::Client => self.wbuf.len() >= budget.saturating_mul(2),
        }
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, now: Instant) -> Result<bool, CloseReason> {
        if self.write_budget_full() {
            return Ok(false);
        }
        if self.decode_paused {
            // Frames read before the budget filled: decode them before reading more.
            self.decode_paused = false;
            self.decode_all(now)?;
            return Ok(true);
        }
        if let Some(want) = self.read_size.reserve(self.rbuf.capacity() - self.rbuf.len()) {
            self.rbuf.reserve(want);
        }
        let room = self.rbuf.capacity() - self.rbuf.len();
        match poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf) {
            Poll::Ready(Ok(0)) => Err(self.session.peer_closed_reason()),
            Poll::Ready(Ok(n)) => {
                self.read_size.on_read(n, room);
                self.shared.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
                self.read_quiet = Self::after_quiet(&mut self.read_at, now);
                // Bytes are proof of life, whole frames or not.
                self.liveness.on_read(now);
                let c = &self.cfg.connection;
                self.partial.on_bytes(n, now, c.partial_frame_grace, c.min_receive_rate);
                self.decode_all(now)?;
                Ok(true)
            }
            Poll::Ready(Err(e)) => Err(CloseReason::from_io(&e)),
            Poll::Pending => Ok(false),
        }
    }

    fn decode_all(&mut self, now: Instant) -> Result<(), CloseReason> {
        let decoded = self.decode_frames(now);
        // Requests accepted before any error count as received (a GOAWAY names them): start them.
        if let Some(dispatch) = self.dispatch.as_mut() {
            dispatch.flush(&self.tasks);
        }
        if std::mem::take(&mut self.open_pending) && decoded.is_ok() && !self.session.is_draining() {
            self.shared.state.set(ConnectionState::Open);
        }
        decoded
    }

    fn decode_frames(&mut self, now: Instant) -> Result<(), CloseReason> {
        loop {
            if self.write_budget_full() {
                self.decode_paused = true;
                break;
            }
            match self.codec.decode(&mut self.rbuf) {
                Ok(Some(frame)) => {
                    self.partial.on_frame();
                    self.on_frame(frame, now)?;
                }
                Ok(None) => break,
                Err(CodecError::Rejected { kind, id, error }) => {
                    self.partial.on_frame();
                    self.on_rejected(kind, id, error)?;
                }
                Err(CodecError::Protocol(e)) => return Err(CloseReason::Protocol(e)),
                Err(CodecError::Io(e)) => return Err(CloseReason::from_io(&e)),
            }
        }
        if self.decode_paused {
            // What waits in the buffer waits for us, not for the peer.
            self.partial.on_frame();
        } else {
            self.partial
                .on_decoded(self.rbuf.len(), now, self.cfg.connection.partial_frame_grace);
        }
        if self.shared.heartbeat_failures.load(Ordering::Relaxed) != 0 && self.liveness.failures() == 0 {
            self.shared.heartbeat_failures.store(0, Ordering::Relaxed);
        }
        Ok(())
    }

    fn on_frame(&mut self, frame: Frame, now: Instant) -> Result<(), CloseReason> {
        if !self.session.handshake_done() {
            return match frame {
                Frame::Settings(s) => self.on_settings(s),
                // Refused before the handshake (for example over max_connections): close with its reason.
                Frame::GoAway(g) => {
                    let reason = CloseReason::GoAway {
                        reason: g.reason,
                        last_request_id: g.last_request_id,
                    };
                    self.on_goaway(g, now);
                    Err(reason)
                }
                other => Err(match other.kind() {
                    Some(kind) => ProtocolError::UnexpectedFrame(kind),
                    None => ProtocolError::Handshake("the first frame must be SETTINGS"),
                }
                .into()),
            };
        }
        match frame {
            // A newer peer's extension: its body is skipped, the connection goes on.
            Frame::Unknown(_) => self.metrics.frame_ignored(),
            Frame::Data {
                id,
                end,
                packed,
                payload,
            } => {
                if !(end && payload.is_empty()) {
                    self.metrics
                        .counters
                        .stream_messages_in
                        .increment(messages_in(packed, &payload));
                    self.metrics.counters.stream_bytes_in.increment(payload.len() as u64);
                }
                let granted = self.streams.on_data(id, end, packed, payload)?;
                if let Some(increment) = granted.connection {
                    self.encode(&Frame::Window { id: 0, increment });
                }
                if let Some(increment) = granted.stream {
                    self.encode(&Frame::Window { id, increment });
                }
            }
            Frame::Window { id, increment } => {
                self.streams.on_window(id, increment)?;
                self.flush_parked(now);
            }
            Frame::Settings(_) => {} // later settings updates are reserved; ignore them
            Frame::Cancel { id } => {
                if self.cfg.side == Side::Client {
                    return Err(ProtocolError::UnexpectedFrame(FrameKind::Cancel).into());
                }
                // Its handler is dropped, and its responder sends nothing (an answer already
                // queued is written; the client discards it).
                if let Some(d) = self.dispatch.as_mut() {
                    d.cancel(id);
                }
                // A stream whose handler already returned may still have messages parked.
                self.end_stream(id, "cancelled");
            }
            Frame::Heartbeat { id } => self.encode(&Frame::HeartbeatAck { id }),
            Frame::HeartbeatAck { id } => {
                self.metrics.counters.heartbeats_acked.increment(1);
                self.shared.heartbeats_acked.fetch_add(1, Ordering::Relaxed);
                if let Some(rtt) = self.liveness.on_ack(id, now) {
                    let us = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX).max(1);
                    self.shared.heartbeat_rtt_us.store(us, Ordering::Relaxed);
                }
            }
            Frame::GoAway(g) => self.on_goaway(g, now),
            Frame::Response(r) => {
                if self.cfg.side == Side::Server {
                    return Err(ProtocolError::UnexpectedFrame(crate::frame::FrameKind::Response).into());
                }
                // A stream's end: its receiver sees the end of its messages, then this.
                self.end_stream(
                    r.id,
                    if r.code == crate::status::Code::Ok {
                        "ok"
                    } else {
                        "error"
                    },
                );
                match self.session.on_response(r.id) {
                    Some(reply) => {
                        // The caller is likely to send again soon: a write may wait for it.
                        self.coalesce.expect_one();
                        let _ = reply.send(Ok(r));
                    }
                    // Its caller gave up (and was swept): nobody to tell.
                    None => self.metrics.late_response(),
                }
            }
            Frame::Request(r) => {
                let kind = if r.oneway {
                    crate::frame::FrameKind::Oneway
                } else {
                    crate::frame::FrameKind::Request
                };
                if self.cfg.side == Side::Client {
                    return Err(ProtocolError::UnexpectedFrame(kind).into());
                }
                if self.session.on_request(kind, r.id)? == Admission::Run {
                    self.on_request(r, now);
                }
            }
        }
        Ok(())
    }

    /// A request or response the codec refused on its own (over a metadata limit): only that call
    /// fails. A request is answered RESOURCE_EXHAUSTED, "not executed"; a response fails its
    /// caller with the handler's work possibly done.
    fn on_rejected(&mut self, kind: FrameKind, id: u64, error: ProtocolError) -> Result<(), CloseReason> {
        if !self.session.handshake_done() {
            return Err(ProtocolError::UnexpectedFrame(kind).into());
        }
        self.metrics.frame_rejected();
        match (self.cfg.side, kind) {
            (Side::Server, FrameKind::Request | FrameKind::Oneway) => {
                if self.session.on_request(kind, id)? == Admission::Run && kind == FrameKind::Request {
                    let status = Status::resource_exhausted(format!("request refused: {error}"));
                    self.encode(&Frame::Response(refusal_frame(id, status)));
                }
                Ok(())
            }
            (Side::Client, FrameKind::Response) => {
                if let Some(reply) = self.session.on_response(id) {
                    let _ = reply.send(Err(ConnectionError::ResponseRejected(error)));
                }
                Ok(())
            }
            _ => Err(ProtocolError::UnexpectedFrame(kind).into()),
        }
    }

    fn on_settings(&mut self, s: Settings) -> Result<(), CloseReason> {
        if let Some(max) = s.max_frame_size {
            if max < 64 {
                return Err(ProtocolError::Handshake("peer max_frame_size below 64 bytes").into());
            }
            self.codec.set_max_send_frame_size(max);
        }
        // The peer's metadata limits are checked before sending: a call over them fails alone,
        // locally, never written. A peer that advertises none enforces the defaults (a version-1
        // peer closes its connection on 16 KiB of metadata without saying so).
        let limit = |v: Option<u32>, default: usize| v.map_or(default, |v| v as usize);
        self.codec.set_max_send_metadata(
            limit(s.max_metadata_entries, crate::codec::DEFAULT_MAX_METADATA_ENTRIES),
            limit(s.max_metadata_bytes, crate::codec::DEFAULT_MAX_METADATA_BYTES),
        );
        let _ = self.shared.peer_settings.set(PEER_SETTINGS.get(s));
        // A feature is used only when both sides announced it.
        self.peer_features = s.features.unwrap_or(0) & self.cfg.features;
        self.streams.on_peer_settings(&s);
        self.session.on_handshake();
        // Published once the whole read is decoded: a GOAWAY that came with the SETTINGS (a server
        // over max_connections sends both at once) must not let a waiter see the connection open.
        self.open_pending = true;
        self.emit(ConnectionEvent::Connected {
            id: self.shared.id,
            peer: self.cfg.peer,
        });
        Ok(())
    }

    fn on_request(&mut self, r: RequestFrame, now: Instant) {
        let Some(dispatch) = self.dispatch.as_mut() else {
            return;
        };
        let Some(tx) = self.responder_tx.clone() else {
            return;
        };
        let oneway = r.oneway;
        let id = r.id;
        let stream = r.stream.then(|| {
            // A stream opened by the client: its messages go to the handler, whose own go back
            // through the same queue as responses, each within the client's credit.
            let (messages_tx, messages) = tokio::sync::mpsc::unbounded_channel();
            let key = crate::stream::StreamKey::with_id(id);
            self.streams.open(id, key.clone(), messages_tx, r.method.clone(), now);
            self.metrics.stream_opened();
            let conn = ConnectionHandle {
                tx: tx.clone(),
                shared: self.shared.clone(),
            };
            StreamIo {
                requests: crate::stream::Streaming::incoming(crate::stream::Incoming {
                    messages,
                    key: key.clone(),
                    conn: conn.clone(),
                    window: self.streams.own_stream_window(),
                }),
                responses: crate::stream::StreamSender::new(
                    conn,
                    key,
                    self.streams.peer_stream_window(),
                    self.cfg.connection.stream_stall_timeout,
                    false,
                ),
            }
        });
        let responder = Responder::new(id, oneway, tx);
        match dispatch.dispatch(r, now, responder, stream, &self.tasks) {
            Some(resp) => {
                self.end_stream(id, "error");
                self.encode_response(resp)
            }
            // Its response will come through the queue: a write may wait for it.
            None if !oneway => self.coalesce.expect_one(),
            None => {}
        }
    }

    fn on_goaway(&mut self, g: GoAway, now: Instant) {
        self.metrics.goaway_received(g.reason);
        let (not_run, newly) = self.session.on_goaway(now, &g, self.cfg.drain_timeout);
        self.emit(ConnectionEvent::GoAwayReceived {
            id: self.shared.id,
            reason: g.reason,
            // The lowest seen: a repeated GOAWAY never raises it.
            last_request_id: self.session.goaway_last_id().unwrap_or(g.last_request_id),
        });
        // Draining is visible before any caller is woken, so a retry never picks this connection.
        if newly {
            self.shared.state.set(ConnectionState::Draining {
                reason: g.reason,
                by_peer: true,
            });
        }
        // Requests above the peer's last id were not run: they fail now so callers can retry.
        for (reply, e) in not_run {
            let _ = reply.send(Err(e));
        }
        // A server's GOAWAY tells a client which of its streams never started. A client's names
        // no stream of the server's (streams are the client's requests), so it removes nothing.
        if self.cfg.side == Side::Client {
            if let Some(last) = self.session.goaway_last_id() {
                for _ in 0..self.streams.remove_above(last) {
                    self.metrics.stream_closed("goaway");
                }
            }
        }
        self.tasks.close();
    }

    /// Sends GOAWAY (once) and stops taking new work; in-flight work finishes within `drain_timeout`.
    fn start_drain(&mut self, now: Instant, reason: GoAwayReason) {
        let peer_first = self.session.goaway_received();
        let Some(g) = self.session.start_drain(now, reason, self.cfg.drain_timeout) else {
            return;
        };
        self.encode(&Frame::GoAway(g));
        if !peer_first {
            self.shared
                .state
                .set(ConnectionState::Draining { reason, by_peer: false });
        }
        self.tasks.close();
    }

    /// Once draining, the connection closes when nothing is left in flight.
    fn poll_drained(&mut self, cx: &mut Context<'_>) -> Option<CloseReason> {
        // A stream whose last messages wait for credit is not done either.
        if !self.session.drained()
            || !self.wbuf.is_empty()
            || self.needs_flush
            || !self.rx.is_empty()
            || self.streams.len() > 0
        {
            return None;
        }
        if self.cfg.side == Side::Server {
            // The wait future completes once and must not be polled again: once it has, the
            // tracker is closed and empty for good, which `is_empty` then tells directly.
            if !self.tasks.is_empty() {
                let tasks = self.tasks.clone();
                let idle = self
                    .tasks_idle
                    .get_or_insert_with(|| Box::pin(async move { tasks.wait().await }));
                if idle.as_mut().poll(cx).is_pending() {
                    return None;
                }
                self.tasks_idle = None;
            }
            // A task's response may have been queued between our last pull and its exit.
            if !self.rx.is_empty() {
                cx.waker().wake_by_ref();
                return None;
            }
        }
        Some(self.session.drain_reason())
    }

    fn poll_outbound(&mut self, cx: &mut Context<'_>, now: Instant) -> bool {
        let before = self.wbuf.len();
        self.flush_parked(now);
        let mut progressed = self.wbuf.len() > before;
        while !self.rx_closed && self.wbuf.len() < self.cfg.connection.max_outbound_bytes {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(msg)) => {
                    progressed = true;
                    if !matches!(msg, Outbound::Inspect { .. }) {
                        self.coalesce.on_pulled(); // a look is no frame to coalesce
                    }
                    self.on_outbound(msg, now);
                }
                Poll::Ready(None) => {
                    // Every handle is gone: close gracefully once the pending requests are answered.
                    self.rx_closed = true;
                    self.start_drain(now, GoAwayReason::Shutdown);
                }
                Poll::Pending => break,
            }
        }
        progressed
    }

    fn on_outbound(&mut self, msg: Outbound, now: Instant) {
        match msg {
            Outbound::Request {
                mut frame,
                deadline,
                reply,
            } => {
                if reply.is_closed() {
                    return reply.fail(ConnectionError::Draining); // the caller gave up before we got to it
                }
                let (id, timeout) = match self.session.admit(now, deadline) {
                    Ok(admitted) => admitted,
                    Err(e) => return reply.fail(e),
                };
                frame.id = id;
                frame.timeout = timeout;
                frame.stream = matches!(reply, Reply::Stream { .. });
                if frame.stream && self.peer_features & features::STREAMS == 0 {
                    let e = ProtocolError::Handshake("the peer does not support streams");
                    return reply.fail(ConnectionError::Encode(e));
                }
                let method = frame.stream.then(|| frame.method.clone());
                if let Err(e) = self.try_encode(&Frame::Request(frame)) {
                    return reply.fail(ConnectionError::Encode(e));
                }
                match reply {
                    Reply::Response(reply) => self.session.on_request_sent(id, reply),
                    Reply::Written(written) => self.session.on_oneway_sent(id, written),
                    Reply::Stream { end, messages, key } => {
                        key.set_id(id);
                        let method = method.unwrap_or_else(|| crate::Method::from_static(""));
                        self.streams.open(id, key, messages, method, now);
                        self.metrics.stream_opened();
                        self.session.on_request_sent(id, end);
                    }
                }
            }
            Outbound::Response(r) => {
                // A request just finished: the idle clock counts from here.
                self.liveness.busy(now);
                if let Some(d) = self.dispatch.as_mut() {
                    d.finished(r.id);
                }
                if !self.streams.contains(r.id) {
                    return self.encode_response(r); // a unary call's
                }
                if r.code != crate::status::Code::Ok {
                    // A stream that ends in error ends now: what waits for credit is dropped.
                    self.end_stream(r.id, "error");
                    return self.encode_response(r);
                }
                // A stream's end follows its last messages.
                if let Some(ready) = self.streams.offer(r.id, streams::Waiting::End(r), now) {
                    self.encode_ready(ready);
                }
            }
            Outbound::Data {
                key,
                end,
                payload,
                permit,
            } => {
                if self.over_max_frame(key.id(), payload.len()) {
                    return;
                }
                let w = streams::Waiting::Data {
                    end,
                    packed: false,
                    payload,
                    permit,
                };
                if let Some(ready) = self.streams.offer(key.id(), w, now) {
                    self.encode_ready(ready);
                }
            }
            Outbound::DataBatch {
                key,
                payloads,
                mut permit,
            } => {
                // Small messages go several to a DATA frame (flag PACKED): one header, one
                // hand-off to the consumer, for all of them.
                let id = key.id();
                let max_body = if self.peer_features & features::PACKED_DATA != 0 {
                    self.codec.max_send_frame_size() as usize
                } else {
                    0 // a peer that does not know PACKED gets every message alone
                };
                let mut frames = streams::pack(payloads, max_body).peekable();
                while let Some((packed, payload)) = frames.next() {
                    if self.over_max_frame(id, payload.len()) {
                        return;
                    }
                    let permit = if frames.peek().is_none() { permit.take() } else { None };
                    let w = streams::Waiting::Data {
                        end: false,
                        packed,
                        payload,
                        permit,
                    };
                    if let Some(ready) = self.streams.offer(id, w, now) {
                        self.encode_ready(ready);
                    }
                }
            }
            Outbound::Reset { key, status } => self.reset_stream(key.id(), status, "reset"),
            Outbound::Inspect { max, reply } => {
                let _ = reply.send(self.streams.inspect(now, max));
            }
        }
    }

    /// A message too large for the peer's max frame size fails its stream at once, typed, before
    /// any credit is spent on it (a frame that cannot be encoded would take its credit with it).
    fn over_max_frame(&mut self, id: u64, len: usize) -> bool {
        let max = self.codec.max_send_frame_size() as usize;
        if len <= max {
            return false;
        }
        let status = Status::resource_exhausted(format!(
            "stream message of {len} bytes is over the peer's max_frame_size {max}; stream reset"
        ));
        self.reset_stream(id, status, "too_large");
        true
    }

    /// Resets stream `id` from this side: a client's receiver reports the key's reset status and
    /// the server is sent CANCEL (it drops the handler); a server drops its handler and ends the
    /// stream with `status`.
    fn reset_stream(&mut self, id: u64, status: Status, reason: &'static str) {
        if self.cfg.side == Side::Client {
            if let Some(key) = self.streams.key(id) {
                key.set_reset(status.clone());
            }
        }
        self.end_stream(id, reason);
        match self.cfg.side {
            Side::Client => {
                // Pending: its REQUEST is written or in the write buffer ahead of this CANCEL,
                // and the server runs it until told.
                if self.session.forget(id).is_some() && self.peer_features & features::CANCEL != 0 {
                    self.encode(&Frame::Cancel { id });
                }
            }
            Side::Server => {
                if let Some(d) = self.dispatch.as_mut() {
                    d.cancel(id);
                }
                self.encode_response(status_frame(id, status));
            }
        }
    }

    /// `stream_idle_timeout`: a scan every quarter of it while streams are open; a stream with
    /// nothing moved for four scans in a row is reset.
    fn scan_idle_streams(&mut self, now: Instant) {
        let Some(timeout) = self.cfg.connection.stream_idle_timeout else {
            return;
        };
        if self.streams.len() == 0 {
            self.stream_idle_at = None;
            return;
        }
        let every = timeout / IDLE_SCANS;
        match self.stream_idle_at {
            None => self.stream_idle_at = Some(now + every),
            Some(at) if now >= at => {
                self.stream_idle_at = Some(now + every);
                for (id, key) in self.streams.scan_idle(IDLE_SCANS) {
                    let status = crate::resume::mark_break(
                        Status::deadline_exceeded(format!(
                            "stream idle: no message either way for {timeout:?} (stream_idle_timeout), after {} on this side",
                            key.counts()
                        )),
                        "idle",
                    );
                    self.reset_stream(id, status, "idle");
                }
            }
            Some(_) => {}
        }
    }

    fn encode_ready(&mut self, ready: streams::Ready) {
        match ready {
            streams::Ready::Data(frame, permit) => {
                if let Frame::Data {
                    payload, end, packed, ..
                } = &frame
                {
                    if !(*end && payload.is_empty()) {
                        self.metrics
                            .counters
                            .stream_messages_out
                            .increment(messages_in(*packed, payload));
                        self.metrics.counters.stream_bytes_out.increment(payload.len() as u64);
                    }
                }
                if let Err(e) = self.try_encode(&frame) {
                    // A message over the peer's max frame size: the stream fails, typed, rather
                    // than losing it (and its credit) silently.
                    if let Frame::Data { id, .. } = frame {
                        let status = Status::resource_exhausted(format!("stream message not sent: {e}"));
                        self.reset_stream(id, status, "too_large");
                    }
                }
                drop(permit);
            }
            streams::Ready::End(r) => {
                self.metrics.stream_closed("ok");
                self.encode_response(r)
            }
        }
    }

    /// Forgets stream `id`, counting why it ended.
    fn end_stream(&mut self, id: u64, reason: &'static str) {
        if self.streams.remove(id) {
            self.metrics.stream_closed(reason);
        }
    }

    /// Sends what waited for credit and now has it, within the write budget; and gives back the
    /// credit the application consumed.
    fn flush_parked(&mut self, now: Instant) {
        let returned = self.shared.returned.take();
        let connection = self.shared.returned.take_connection();
        if !returned.is_empty() || connection > 0 {
            for frame in self.streams.on_returned(returned, connection) {
                self.encode(&frame);
            }
        }
        while self.wbuf.len() < self.cfg.connection.max_outbound_bytes {
            match self.streams.next_ready(now) {
                Some(ready) => self.encode_ready(ready),
                None => break,
            }
        }
    }

    fn encode_response(&mut self, mut r: ResponseFrame) {
        if self.peer_features & features::NOT_EXECUTED_FLAG == 0 {
            downgrade_for_v1(&mut r);
        }
        let id = r.id;
        if let Err(e) = self.try_encode(&Frame::Response(r)) {
            let status = Status::internal(format!("response not sent: {e}"));
            self.encode(&Frame::Response(status_frame(id, status)));
        }
    }

    /// Encodes a control frame (or anything known to fit) into the write buffer.
    fn encode(&mut self, frame: &Frame) {
        if let Err(e) = self.try_encode(frame) {
            tracing::error!(conn = self.shared.id, error = %e, "control frame did not encode");
        }
    }

    /// Appends `frame` to the write buffer and counts its bytes as enqueued; on error the buffer
    /// is left as it was.
    fn try_encode(&mut self, frame: &Frame) -> Result<(), ProtocolError> {
        let before = self.wbuf.len();
        if let Err(e) = self.codec.encode_frame(frame, &mut self.wbuf) {
            self.wbuf.truncate(before);
            return Err(e);
        }
        self.session.on_encoded(self.wbuf.len() - before);
        Ok(())
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, now: Instant) -> Result<bool, CloseReason> {
        let mut progressed = false;
        while !self.wbuf.is_empty() {
            match Pin::new(&mut self.io).poll_write(cx, &self.wbuf) {
                Poll::Ready(Ok(0)) => {
                    return Err(CloseReason::Io {
                        kind: std::io::ErrorKind::WriteZero,
                        message: "write returned 0".into(),
                    })
                }
                Poll::Ready(Ok(n)) => {
                    self.shared.bytes_written.fetch_add(n as u64, Ordering::Relaxed);
                    self.wbuf.advance(n);
                    self.write_quiet = Self::after_quiet(&mut self.write_at, now);
                    self.coalesce.on_written();
                    self.session.on_flushed(n);
                    self.confirm_oneways();
                    self.needs_flush = true;
                    progressed = true;
                    let c = &self.cfg.connection;
                    self.stall
                        .on_written(n, self.wbuf.len(), now, c.write_stall_timeout, c.min_send_rate);
                    let ms = (now - self.shared.epoch).as_millis() as u64;
                    self.shared.last_write_ms.store(ms, Ordering::Relaxed);
                }
                Poll::Ready(Err(e)) => return Err(CloseReason::from_io(&e)),
                Poll::Pending => {
                    self.stall.on_blocked(now, self.cfg.connection.write_stall_timeout);
                    return Ok(progressed);
                }
            }
        }
        self.stall.on_empty();
        if self.needs_flush {
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.needs_flush = false,
                Poll::Ready(Err(e)) => return Err(CloseReason::from_io(&e)),
                Poll::Pending => {}
            }
        }
        Ok(progressed)
    }

    /// Server: work is in flight (handlers running, responses queued or unwritten), so the
    /// connection is not idle.
    fn busy(&self) -> bool {
        self.cfg.side == Side::Server
            && (!self.tasks.is_empty() || !self.rx.is_empty() || !self.wbuf.is_empty() || self.streams.len() > 0)
    }

    /// Forgets the calls whose callers gave up, and tells a server that understands CANCEL to drop
    /// their handlers (the ones it may be running: written, and not above its GOAWAY).
    fn on_callers_gone(&mut self) {
        let gone = self.session.sweep_cancelled();
        for (id, _) in &gone {
            self.end_stream(*id, "cancelled");
        }
        if self.peer_features & features::CANCEL == 0 {
            return;
        }
        // Every swept call was admitted, so its request is written or in the write buffer ahead
        // of this CANCEL; after a GOAWAY, what is still pending is at or below its last id and
        // still runs on the server: a stream would run for ever.
        for (id, _) in gone {
            self.encode(&Frame::Cancel { id });
        }
    }

    /// Tells the callers of oneways whose frames have reached the socket.
    fn confirm_oneways(&mut self) {
        while let Some(written) = self.session.pop_written() {
            let _ = written.send(Ok(()));
        }
    }

    fn on_timers(&mut self, now: Instant) -> Result<(), CloseReason> {
        if self.liveness.idle_due(now) && self.busy() {
            self.liveness.busy(now);
        }
        self.scan_idle_streams(now);
        if self.cfg.connection.min_send_rate > 0 && (self.write_budget_full() || self.stall.deadline().is_some()) {
            // This side's writes wait on the peer: a heartbeat queues behind them, and with the
            // budget full nothing the peer sends is read, so its silence proves nothing. The
            // write-stall bucket judges the peer meanwhile (it closes one that takes too little).
            self.liveness.on_read(now);
        }
        if self.cfg.side == Side::Server {
            // Handlers or streams in flight: the server heartbeats a client that went quiet.
            let working = !self.tasks.is_empty() || self.streams.len() > 0;
            self.liveness.set_busy(working, now);
        }
        while let Some(action) = self.liveness.poll(now) {
            match action {
                LivenessAction::SendHeartbeat { id } => {
                    self.metrics.counters.heartbeats_sent.increment(1);
                    self.shared.heartbeats_sent.fetch_add(1, Ordering::Relaxed);
                    self.encode(&Frame::Heartbeat { id });
                }
                LivenessAction::HeartbeatMissed { failures } => {
                    self.metrics.counters.heartbeats_failed.increment(1);
                    self.shared.heartbeat_failures.store(failures, Ordering::Relaxed);
                    self.emit(ConnectionEvent::HeartbeatFailed {
                        id: self.shared.id,
                        failures,
                    });
                }
                // Idle eviction drains: GOAWAY names the last request taken, and a request the
                // client sent meanwhile is above it, so the client knows it did not run.
                LivenessAction::Close(CloseReason::IdleTimeout) => self.start_drain(now, GoAwayReason::Idle),
                LivenessAction::Close(reason) => {
                    if reason == CloseReason::HeartbeatTimeout {
                        self.metrics.counters.heartbeats_failed.increment(1);
                        let failures = self.liveness.failures();
                        self.emit(ConnectionEvent::HeartbeatFailed {
                            id: self.shared.id,
                            failures,
                        });
                    }
                    return Err(reason);
                }
            }
        }
        let c = &self.cfg.connection;
        if self.stall.deadline().is_some_and(|d| now >= d) {
            return Err(CloseReason::SlowConsumer);
        }
        if self.partial.deadline(c.min_receive_rate).is_some_and(|d| now >= d) {
            return Err(CloseReason::PartialFrameTimeout);
        }
        if !self.session.handshake_done() && now >= self.handshake_deadline {
            return Err(CloseReason::HandshakeTimeout);
        }
        if self.session.drain_deadline().is_some_and(|d| now >= d) {
            return Err(self.session.drain_reason());
        }
        Ok(())
    }

    fn next_deadline(&self) -> Option<Instant> {
        let c = &self.cfg.connection;
        [
            self.liveness.next_deadline(),
            self.stall.deadline(),
            (!self.session.handshake_done()).then_some(self.handshake_deadline),
            self.partial.deadline(c.min_receive_rate),
            self.session.drain_deadline(),
            self.stream_idle_at,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Ends the connection: a best-effort GOAWAY when the stream still works, every waiter told why.
    fn close(&mut self, reason: CloseReason, cx: &mut Context<'_>) {
        let stream_usable = !matches!(
            reason,
            CloseReason::Reset
                | CloseReason::PeerClosed
                | CloseReason::Io { .. }
                | CloseReason::SlowConsumer
                | CloseReason::GoAway { .. }
        );
        if stream_usable {
            if let Some(g) = self.session.goaway_for_close(&reason) {
                self.encode(&Frame::GoAway(g));
            }
        }
        if stream_usable {
            // One non-blocking attempt: the peer is told why if its window allows.
            let _ = self.poll_write(cx, Instant::now());
        }
        self.finish(reason);
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

    /// An idle connection's memory is mostly its task, and the task is mostly the driver: its run
    /// future must hold the driver once and little else (an `async fn run(self)` held it twice,
    /// 3.2 KiB for a 1.5 KiB driver; the linger's timer inline was 240 bytes more).
    #[tokio::test]
    async fn the_run_future_holds_the_driver_once() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (_handle, driver) = Driver::client(stream, DriverConfig::new(Side::Client));
        let driver_size = std::mem::size_of_val(&driver);
        let run = driver.run();
        let run_size = std::mem::size_of_val(&run);
        println!("driver {driver_size} bytes, its run future {run_size} bytes");
        assert!(
            run_size <= driver_size + 128,
            "the run future ({run_size} bytes) holds more than its driver ({driver_size} bytes)"
        );
    }
}
