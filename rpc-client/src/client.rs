//! The client handle: cheap to clone, shared by many tasks, a `tower::Service`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use rpc_core::driver::{ConnectionError, ConnectionHandle, Outbound, Reply};
use rpc_core::event::ConnectionEvent;
use rpc_core::frame::RequestFrame;
use rpc_core::metrics::{RequestMetrics, Side};
use rpc_core::{Code, Request, Response, Status};
use tokio::net::ToSocketAddrs;
use tokio::sync::{broadcast, oneshot};
use tokio::time::Instant;
use tower::Service;

use crate::config::ClientConfig;
use crate::error::{Error, ErrorKind, History};
use crate::holder::ConnectionHolder;

/// What an attempt's result says about its endpoint, for outlier detection: `Some(true)` when it
/// counts as the endpoint failing (a code in `failure_codes`, this side's deadline passing when
/// DEADLINE_EXCEEDED is one of them, a connection that broke under it), `Some(false)` for an
/// answer (success, or any other code), `None` when it says nothing about the endpoint (a
/// SERVER_BUSY refusal, a draining connection, a request this side could not encode or a
/// response it refused).
fn endpoint_failed(result: &Result<Response<Bytes>, Error>, failure_codes: &[Code]) -> Option<bool> {
    let e = match result {
        Ok(_) => return Some(false),
        Err(e) => e,
    };
    match e.kind() {
        // A refusal for overload is no answer about the endpoint's health (and a hung server's
        // fast refusals would otherwise pass for successes between its timeouts).
        ErrorKind::Status(s) if s.code() == Code::ServerBusy && !e.may_have_executed() => None,
        ErrorKind::Status(s) => Some(failure_codes.contains(&s.code())),
        ErrorKind::DeadlineExceeded => failure_codes.contains(&Code::DeadlineExceeded).then_some(true),
        ErrorKind::Connection(ConnectionError::NotWritten(_) | ConnectionError::ClosedAfterWrite(_)) => Some(true),
        _ => None,
    }
}

/// Metric: hedged attempts sent (a second attempt of an idempotent request that had no answer
/// after `hedge_delay`).
pub const HEDGES: &str = "tether_client_hedges_total";

/// Metric: requests retried because they provably did not run, label `cause`.
pub const REQUEST_RETRIES: &str = "tether_client_retries_total";

/// A tether client: a [`ConnectionHolder`] over one or more endpoints and the request logic on
/// top (deadlines, safe retry). Clone it freely; clones share the holder.
pub struct Client {
    pub(crate) holder: ConnectionHolder,
    metrics: Arc<RequestMetrics>,
    budget: crate::budget::RetryBudget,
    /// Where registry discovery stands, for a client made by `with_registry`.
    #[cfg(feature = "etcd")]
    pub(crate) discovery: Option<tokio::sync::watch::Receiver<crate::registry::DiscoveryState>>,
    /// `poll_ready` waiting for room on the full connections, by connection id (this clone's
    /// own).
    rooms: Vec<(u64, rpc_core::driver::Room)>,
}

impl Clone for Client {
    fn clone(&self) -> Self {
        Client {
            holder: self.holder.clone(),
            metrics: self.metrics.clone(),
            budget: self.budget.clone(),
            #[cfg(feature = "etcd")]
            discovery: self.discovery.clone(),
            rooms: Vec::new(),
        }
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("holder", &self.holder).finish()
    }
}

async fn resolve(addr: impl ToSocketAddrs) -> Result<Vec<SocketAddr>, Error> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| Error::new(ErrorKind::Connect(e), false))?
        .collect();
    if addrs.is_empty() {
        let e = std::io::Error::new(std::io::ErrorKind::NotFound, "address resolved to nothing");
        return Err(Error::new(ErrorKind::Connect(e), false));
    }
    Ok(addrs)
}

impl Client {
    /// A client for one endpoint (the first address `addr` resolves to) that connects on first use.
    pub async fn new(addr: impl ToSocketAddrs, config: ClientConfig) -> Result<Self, Error> {
        let addrs = resolve(addr).await?;
        Self::with_endpoints(addrs.into_iter().take(1), config)
    }

    /// A client for one endpoint whose first connection is open (handshake done) before this returns.
    pub async fn connect(addr: impl ToSocketAddrs, config: ClientConfig) -> Result<Self, Error> {
        let client = Self::new(addr, config).await?;
        client.checkout(None).await?;
        Ok(client)
    }

    /// A client balancing over `addrs`; connections open in the background.
    pub fn with_endpoints(addrs: impl IntoIterator<Item = SocketAddr>, config: ClientConfig) -> Result<Self, Error> {
        config.validate().map_err(|e| Error::new(ErrorKind::Config(e), false))?;
        Ok(Client {
            budget: crate::budget::RetryBudget::new(config.retry_budget.clone()),
            holder: ConnectionHolder::new(addrs, config)?,
            metrics: Arc::new(RequestMetrics::new(Side::Client)),
            #[cfg(feature = "etcd")]
            discovery: None,
            rooms: Vec::new(),
        })
    }

    /// A client whose endpoints are `host` (`name:port`) re-resolved every `interval`.
    pub async fn with_dns(host: &str, interval: std::time::Duration, config: ClientConfig) -> Result<Self, Error> {
        let addrs = resolve(host).await?;
        let client = Self::with_endpoints(addrs, config)?;
        client.holder.resolve_periodically(host.to_string(), interval);
        Ok(client)
    }

    /// The connection holder (endpoints, pools, discovery).
    pub fn holder(&self) -> &ConnectionHolder {
        &self.holder
    }

    /// Calls finished per method so far, by status code, with their latency from the call to its
    /// outcome (retries and hedges included), for an admin page. Kept in process beside the
    /// `tether_requests_total` metrics.
    pub fn method_stats(&self) -> Vec<rpc_core::metrics::MethodStats> {
        self.metrics.methods()
    }

    /// The retry budget this client and its clones share (give it to
    /// [`crate::SafeRetry::with_budget`] so retries stacked over the client draw on it too).
    pub fn retry_budget(&self) -> crate::budget::RetryBudget {
        self.budget.clone()
    }

    /// The config.
    pub fn config(&self) -> &ClientConfig {
        self.holder.config()
    }

    /// Subscribes to connection and endpoint events (bounded: a slow subscriber lags rather than blocking).
    pub fn events(&self) -> broadcast::Receiver<ConnectionEvent> {
        self.holder.events()
    }

    /// The open connections right now.
    pub fn connections(&self) -> Vec<ConnectionHandle> {
        self.holder.connections()
    }

    /// A validated connection (connecting if none is alive), within `deadline`.
    pub async fn checkout(&self, deadline: Option<Instant>) -> Result<ConnectionHandle, Error> {
        self.holder.checkout(deadline, None).await.map(|(_, c)| c)
    }

    /// Sends a request and waits for its response, until the request's deadline (or
    /// `request_timeout` if it has none; inside a handler, never past the deadline of the request
    /// it serves: see `rpc_core::context`). A request that provably did not run is retried on a
    /// fresh checkout within its deadline; one that may have run is retried only when marked
    /// idempotent.
    pub async fn unary(&self, req: Request<Bytes>) -> Result<Response<Bytes>, Error> {
        let start = Instant::now();
        let method = req.method_path().clone();
        let span = tracing::debug_span!("request", %method);
        let result = tracing::Instrument::instrument(self.unary_with_retries(req), span).await;
        let code = match &result {
            Ok(_) => Code::Ok,
            Err(e) => e.code(),
        };
        self.metrics.record(&method, code, start.elapsed());
        result
    }

    /// The deadline of a call: its own (or `request_timeout` from now), capped by the deadline of
    /// the request this task serves, if it serves one (`rpc_core::context`).
    fn deadline_of<T>(&self, req: &Request<T>) -> Instant {
        let own = req
            .deadline()
            .unwrap_or_else(|| Instant::now() + self.config().request_timeout);
        rpc_core::context::deadline().map_or(own, |served| own.min(served))
    }

    async fn unary_with_retries(&self, req: Request<Bytes>) -> Result<Response<Bytes>, Error> {
        has_method(&req)?;
        let deadline = self.deadline_of(&req);
        if Instant::now() >= deadline {
            // Gone before the call began (an inherited deadline, usually): never sent.
            return Err(Error::deadline(false));
        }
        let idempotent = req.is_idempotent();
        self.budget.deposit();
        let codec = self.codec_for(&req);
        let mut frame = Some(to_frame(req, false));
        let max = self.config().max_attempts;
        let mut attempt = 1;
        let mut avoid = None;
        // Earlier attempts: once one may have run, the final error says so (sticky).
        let mut history = History::default();
        loop {
            // Clone only while another attempt may follow.
            let this = if attempt < max { frame.clone() } else { frame.take() };
            let Some(this) = this else {
                return Err(Error::deadline(false).after(history));
            };
            let (addr, result) = match self.config().hedge_delay {
                // Boxed: hedging holds two attempts, and inline it would size every call's future.
                Some(hedge) if idempotent => Box::pin(self.hedged_attempt(this, deadline, avoid, hedge, codec)).await,
                _ => self.attempt(this, deadline, avoid, codec).await,
            };
            match result {
                Err(e)
                    if attempt < max
                        && Instant::now() < deadline
                        && self.retryable(&e, idempotent)
                        && self.budget.try_withdraw() =>
                {
                    metrics::counter!(REQUEST_RETRIES, "cause" => e.kind_str()).increment(1);
                    tracing::debug!(error = %e, attempt, "retrying request");
                    history.record(addr, e);
                    avoid = addr; // prefer another endpoint for the retry
                    attempt += 1;
                    // The first retry goes at once; later ones back off, within the deadline.
                    if attempt > 2 {
                        let delay = self.config().retry_backoff.delay(attempt - 2, rand::random::<f64>());
                        tokio::time::sleep_until((Instant::now() + delay).min(deadline)).await;
                        if Instant::now() >= deadline {
                            return Err(Error::deadline(false).after(history));
                        }
                    }
                }
                Err(e) => return Err(e.after(history)),
                Ok(r) => return Ok(r),
            }
        }
    }

    /// How a request's messages are compressed (see [`rpc_core::compression`]).
    fn codec_for(&self, req: &Request<Bytes>) -> Codec {
        let config = self.config();
        Codec {
            encoding: config.compression,
            compress_body: req.compress() && req.body().len() >= config.connection.compression_min_size as usize,
            limit: config.connection.max_frame_size as usize,
        }
    }

    /// One attempt; also returns the endpoint it used, if it got that far.
    async fn attempt(
        &self,
        frame: RequestFrame,
        deadline: Instant,
        avoid: Option<SocketAddr>,
        codec: Codec,
    ) -> (Option<SocketAddr>, Result<Response<Bytes>, Error>) {
        let (addr, conn) = match self.holder.checkout(Some(deadline), avoid).await {
            Ok(x) => x,
            Err(e) => return (None, Err(e)),
        };
        (
            Some(addr),
            self.send_recorded(addr, &conn, frame, deadline, codec).await,
        )
    }

    /// Sends on `conn` (to `addr`) and records the outcome for outlier detection. Dropped before
    /// it ends (a caller that gave up, a hedge that lost), it records nothing.
    async fn send_recorded(
        &self,
        addr: SocketAddr,
        conn: &ConnectionHandle,
        frame: RequestFrame,
        deadline: Instant,
        codec: Codec,
    ) -> Result<Response<Bytes>, Error> {
        let sent = Instant::now();
        let result = send_on(conn, codec.apply(frame, conn), deadline)
            .await
            .and_then(|r| codec.expand(r));
        if let Some(failed) = endpoint_failed(&result, &self.config().outlier.failure_codes) {
            self.holder.record(addr, failed, sent.elapsed());
        }
        result
    }

    /// One attempt of an idempotent request, hedged: when it has no answer after `hedge`'s delay
    /// (fixed, or the first endpoint's p95), a second goes to another endpoint (drawn from the retry budget), the first answer wins, and
    /// the other is dropped, which cancels it (CANCEL). If one fails the other is waited for; if
    /// both fail, the later error is returned with the earlier one in its history ("may have
    /// executed" stays sticky). Returns the endpoint of the attempt whose result it is.
    async fn hedged_attempt(
        &self,
        frame: RequestFrame,
        deadline: Instant,
        avoid: Option<SocketAddr>,
        hedge: crate::HedgeDelay,
        codec: Codec,
    ) -> (Option<SocketAddr>, Result<Response<Bytes>, Error>) {
        let (a, conn_a) = match self.holder.checkout(Some(deadline), avoid).await {
            Ok(x) => x,
            Err(e) => return (None, Err(e)),
        };
        let delay = match hedge {
            crate::HedgeDelay::After(d) => d,
            crate::HedgeDelay::P95 { at_least } => match self.holder.hedge_p95(a) {
                Some(p95) => p95.max(at_least),
                // Nothing known of any endpoint yet: the floor, if there is one; else no hedge.
                None if !at_least.is_zero() => at_least,
                None => return (Some(a), self.send_recorded(a, &conn_a, frame, deadline, codec).await),
            },
        };
        let hedge = frame.clone();
        let started = Instant::now();
        let first = self.send_recorded(a, &conn_a, frame, deadline, codec);
        tokio::pin!(first);
        let hedge_at = started.checked_add(delay).map_or(deadline, |at| at.min(deadline));
        tokio::select! {
            biased;
            r = &mut first => return (Some(a), r),
            _ = tokio::time::sleep_until(hedge_at) => {}
        }
        let other = tokio::select! {
            biased;
            r = &mut first => return (Some(a), r),
            c = self.holder.checkout(Some(deadline), Some(a)) => c,
        };
        // No other endpoint (or none could be had), or the budget is spent: no hedge.
        let (b, conn_b) = match other {
            Ok((b, c)) if b != a && self.budget.try_withdraw() => (b, c),
            _ => return (Some(a), first.await),
        };
        metrics::counter!(HEDGES).increment(1);
        let second = self.send_recorded(b, &conn_b, hedge, deadline, codec);
        tokio::pin!(second);
        let (failed_at, error, then_at, then) = tokio::select! {
            r = &mut first => match r {
                Ok(resp) => return (Some(a), Ok(resp)),
                Err(e) => (a, e, b, second.await),
            },
            r = &mut second => match r {
                Ok(resp) => {
                    // The first attempt lost and is cancelled unheard: it had waited this long at
                    // least, which its endpoint's latencies should know (a slow endpoint that
                    // always loses would otherwise look like one that is never asked).
                    self.holder.record_lost_hedge(a, started.elapsed());
                    return (Some(b), Ok(resp));
                }
                Err(e) => (b, e, a, first.await),
            },
        };
        match then {
            Ok(resp) => (Some(then_at), Ok(resp)),
            Err(last) => {
                let mut history = History::default();
                history.record(Some(failed_at), error);
                (Some(then_at), Err(last.after(history)))
            }
        }
    }

    /// Sends a oneway request: no response comes back. Resolves once the frame has been written to
    /// the socket (`Ok` says it left this process, not that the server ran it), or fails if it
    /// never is: not written, refused before sending (over a limit of the server), or caught by a
    /// GOAWAY first, all "not executed". A oneway still unwritten at its deadline fails with
    /// DEADLINE_EXCEEDED, "may have executed" (it may yet be written).
    pub async fn oneway(&self, req: Request<Bytes>) -> Result<(), Error> {
        has_method(&req)?;
        let deadline = self.deadline_of(&req);
        if Instant::now() >= deadline {
            return Err(Error::deadline(false));
        }
        let conn = self.checkout(Some(deadline)).await?;
        let (tx, rx) = oneshot::channel();
        let msg = Outbound::Request {
            frame: to_frame(req, true),
            deadline: Some(deadline),
            reply: Reply::Written(tx),
        };
        match tokio::time::timeout_at(deadline, conn.send(msg)).await {
            Err(_) => return Err(Error::deadline(false)),
            Ok(Err(_)) => return Err(ConnectionError::NotWritten(closed_reason(&conn, deadline).await).into()),
            Ok(Ok(())) => {}
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Err(_) => Err(Error::deadline(true)),
            Ok(Err(_)) => Err(ConnectionError::NotWritten(rpc_core::CloseReason::Aborted).into()),
            Ok(Ok(r)) => r.map_err(Error::from),
        }
    }

    /// Opens a stream to `req`'s method on a validated connection: the sender of this side's
    /// messages and the receiver of the server's, which ends with the server's final status (or
    /// why the stream broke: a stalled stream, its connection's close, a GOAWAY before it began,
    /// each as a `Status` that says how many messages arrived; [`Streaming::close_reason`] gives
    /// the connection's `CloseReason`). A stream has no deadline unless `req` sets one (or the
    /// handler this task serves has one, which caps it); it ends when either side ends it.
    /// Dropping the receiver cancels the stream: the server drops its handler.
    ///
    /// [`Streaming::close_reason`]: rpc_core::stream::Streaming::close_reason
    pub async fn open_stream<T>(
        &self,
        req: Request<T>,
    ) -> Result<
        (
            rpc_core::stream::StreamSender<Bytes>,
            rpc_core::stream::Streaming<Bytes>,
        ),
        Error,
    > {
        has_method(&req)?;
        let deadline = stream_deadline(req.deadline());
        let (method, metadata, _) = req.into_parts();
        let (_, sender, responses) = self.open_stream_on(method, metadata, deadline, None).await?;
        Ok((sender, responses))
    }

    /// Opens a stream on a validated connection, preferring another endpoint than `avoid`.
    pub(crate) async fn open_stream_on(
        &self,
        method: rpc_core::Method,
        metadata: rpc_core::Metadata,
        deadline: Option<Instant>,
        avoid: Option<SocketAddr>,
    ) -> Result<
        (
            SocketAddr,
            rpc_core::stream::StreamSender<Bytes>,
            rpc_core::stream::Streaming<Bytes>,
        ),
        Error,
    > {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(Error::deadline(false));
        }
        let connect_by = deadline.unwrap_or_else(|| Instant::now() + self.config().request_timeout);
        let (addr, conn) = self.holder.checkout(Some(connect_by), avoid).await?;
        if !conn.supports_streams() {
            return Err(Error::status(rpc_core::Status::unimplemented(
                "the server does not support streams (a version-1 tether server)",
            )));
        }
        let frame = RequestFrame {
            method,
            metadata,
            ..RequestFrame::default()
        };
        let (sender, responses) = conn.open_stream(frame, deadline).await.map_err(Error::from)?;
        Ok((addr, sender, responses))
    }

    /// Subscribes to a resumable server-streaming method (`req`'s body is its one request
    /// message, encoded), fresh (`after` `None`) or after a position the application kept. The
    /// returned stream survives the death of the streams under it: when one breaks short of the
    /// server ending it (its connection closed for any reason, a GOAWAY, a stall or idle reset,
    /// its server draining), it is opened again through the holder (preferring another
    /// endpoint) asking for what comes after the last message delivered, within
    /// `resume_timeout` and `max_resume_attempts`, the first at once and then after the
    /// `backoff` delays. The consumer sees one stream, in order, without gap or duplicate.
    pub async fn subscribe(&self, req: Request<Bytes>, after: Option<u64>) -> Result<crate::Resumable<Bytes>, Error> {
        has_method(&req)?;
        let deadline = stream_deadline(req.deadline());
        let (method, metadata, body) = req.into_parts();
        crate::Resumable::open(self.clone(), method, metadata, body, deadline, after).await
    }

    /// Gracefully closes every connection: GOAWAY, then close once requests in flight are answered.
    pub fn close(&self) {
        self.holder.close();
    }

    /// Whether a failed attempt may be tried again: it provably did not run (or the caller marked it
    /// idempotent). A refusal is retried only where another attempt can do better: SERVER_BUSY
    /// when another endpoint is alive to take it, UNAVAILABLE (shutting down) always; an
    /// undecodable body or an unknown method would fail the same way again.
    fn retryable(&self, e: &Error, idempotent: bool) -> bool {
        match e.kind() {
            // Deterministic: over the server's limits, every attempt would fail the same way.
            ErrorKind::Connection(ConnectionError::Encode(_) | ConnectionError::ResponseRejected(_)) => false,
            ErrorKind::Connection(c) if !c.may_have_executed() => true,
            ErrorKind::Connection(_) => idempotent,
            ErrorKind::Status(s) if !e.may_have_executed() => match s.code() {
                Code::ServerBusy => self.holder.alive_endpoints() > 1,
                Code::Unavailable => true,
                _ => false,
            },
            // The handler ran and said "try later": only an idempotent request may run again.
            ErrorKind::Status(s) => idempotent && s.code() == Code::Unavailable,
            _ => false,
        }
    }
}

/// A stream's deadline: its own, capped by that of the request this task serves; none if neither.
fn stream_deadline(own: Option<Instant>) -> Option<Instant> {
    match (own, rpc_core::context::deadline()) {
        (Some(own), Some(served)) => Some(own.min(served)),
        (own, served) => own.or(served),
    }
}

async fn send_on(conn: &ConnectionHandle, frame: RequestFrame, deadline: Instant) -> Result<Response<Bytes>, Error> {
    // Declared first, dropped last: a caller that gives up (deadline, or its future dropped)
    // drops the reply receiver before this guard tells the driver to forget the call.
    let mut in_flight = conn.track_in_flight();
    let (tx, rx) = oneshot::channel();
    let msg = Outbound::Request {
        frame,
        deadline: Some(deadline),
        reply: Reply::Response(tx),
    };
    match tokio::time::timeout_at(deadline, conn.send(msg)).await {
        Err(_) => return Err(Error::deadline(false)),
        Ok(Err(_)) => return Err(ConnectionError::NotWritten(closed_reason(conn, deadline).await).into()),
        Ok(Ok(())) => {}
    }
    let answer = tokio::time::timeout_at(deadline, rx).await;
    if answer.is_ok() {
        in_flight.answered();
    }
    match answer {
        // Sent but unanswered: the server may be running it.
        Err(_) => Err(Error::deadline(true)),
        // The driver always answers; a dropped reply means its task was torn down.
        Ok(Err(_)) => Err(ConnectionError::ClosedAfterWrite(rpc_core::CloseReason::Aborted).into()),
        Ok(Ok(Err(e))) => Err(e.into()),
        Ok(Ok(Ok(r))) if r.code == Code::Ok => Ok(Response::from_parts(r.metadata, r.payload)),
        Ok(Ok(Ok(r))) => {
            let status = Status::from_parts(r.code, r.message, r.metadata);
            Err(if r.not_executed {
                Error::refused(status)
            } else {
                Error::status(status)
            })
        }
    }
}

/// Why a connection whose queue refused a message closed, waiting at most until `deadline` for the
/// driver to say (it publishes `Closed` however it ends; this bound is for the moment in between).
async fn closed_reason(conn: &ConnectionHandle, deadline: Instant) -> rpc_core::CloseReason {
    tokio::time::timeout_at(deadline, conn.closed())
        .await
        .unwrap_or(rpc_core::CloseReason::Aborted)
}

/// How one request's messages are compressed: with the client's codec when the connection's
/// server reads it (its body if large enough and not opted out; its response on request), and
/// responses expanded to at most `limit` bytes.
#[derive(Debug, Clone, Copy)]
struct Codec {
    encoding: Option<rpc_core::compression::Encoding>,
    #[cfg_attr(not(feature = "compression"), allow(dead_code))]
    compress_body: bool,
    limit: usize,
}

impl Codec {
    /// The frame to send on `conn`.
    fn apply(self, frame: RequestFrame, conn: &ConnectionHandle) -> RequestFrame {
        use rpc_core::compression::{ACCEPT_ENCODING, ENCODING};
        let Some(encoding) = self.encoding else { return frame };
        let settings = conn.peer_settings().unwrap_or_default();
        if !encoding.read_by(settings.features.unwrap_or(0)) {
            return frame; // this server reads (and writes) no such codec
        }
        // The two entries must fit the server's metadata limit, or the request would fail for them.
        if frame.metadata.len() + 2 > settings.max_metadata_entries.map_or(usize::MAX, |m| m as usize) {
            return frame;
        }
        let mut frame = frame;
        frame.metadata.insert(ACCEPT_ENCODING, encoding.as_str());
        // A body its caller compressed itself is sent as it is.
        #[cfg(feature = "compression")]
        if self.compress_body && frame.metadata.get(ENCODING).is_none() {
            frame.payload = rpc_core::compression::compress(encoding, &frame.payload);
            frame.metadata.insert(ENCODING, encoding.as_str());
        }
        #[cfg(not(feature = "compression"))]
        let _ = ENCODING;
        frame
    }

    /// A response with its body expanded, if it came compressed.
    fn expand(self, resp: Response<Bytes>) -> Result<Response<Bytes>, Error> {
        let Some(name) = resp
            .metadata()
            .get_str(rpc_core::compression::ENCODING)
            .map(str::to_owned)
        else {
            return Ok(resp);
        };
        let (mut metadata, body) = resp.into_parts();
        match rpc_core::compression::decompress(&name, &body, self.limit) {
            Ok(body) => {
                metadata.remove(rpc_core::compression::ENCODING);
                Ok(Response::from_parts(metadata, body))
            }
            Err(e) => Err(Error::new(ErrorKind::Decompress(e), true)),
        }
    }
}

/// A request without a method path is never sent (`Request::new` is for generated clients).
fn has_method<T>(req: &Request<T>) -> Result<(), Error> {
    if req.method().is_empty() {
        return Err(Error::new(ErrorKind::NoMethod, false));
    }
    Ok(())
}

fn to_frame(req: Request<Bytes>, oneway: bool) -> RequestFrame {
    let (method, metadata, payload) = req.into_parts();
    RequestFrame {
        id: 0,
        oneway,
        stream: false,
        timeout: None,
        method,
        metadata,
        payload,
    }
}

impl Service<Request<Bytes>> for Client {
    type Response = Response<Bytes>;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Bytes>, Error>> + Send>>;

    /// Ready when a request could be queued at once: some open connection has room in its
    /// outbound queue (a free slot of `ConnectionConfig::outbound_queue` frames and an eighth of
    /// `max_outbound_bytes`), or there is none (the call then connects, or fails with a typed
    /// error). Pending while every open connection's queue is full, as when the server or the
    /// network stopped taking bytes, so tower's `LoadShed` sheds and `Buffer` waits; woken when
    /// any of them has room again. Nothing is reserved: the call still chooses its connection
    /// (and waits for room there if it filled up in between). A connection opened while this
    /// waits is seen at the next poll.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let full = self.holder.full_connections();
        if full.is_empty() {
            self.rooms.clear();
            return Poll::Ready(Ok(()));
        }
        // Wait on each full connection; keep the waits of those still full.
        self.rooms.retain(|(id, _)| full.iter().any(|c| c.id() == *id));
        for c in &full {
            if !self.rooms.iter().any(|(id, _)| *id == c.id()) {
                self.rooms.push((c.id(), c.room()));
            }
        }
        let mut ready = false;
        for (_, room) in &mut self.rooms {
            ready |= room.poll_room(cx).is_ready();
        }
        if ready {
            self.rooms.clear();
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let client = self.clone();
        Box::pin(async move { client.unary(req).await })
    }
}

#[cfg(test)]
mod outcome_tests {
    use super::*;

    #[test]
    fn what_an_attempt_says_about_its_endpoint() {
        let codes = crate::holder::OutlierConfig::default().failure_codes;
        let status = |code, executed| Err(Error::new(ErrorKind::Status(Status::new(code, "x")), executed));
        assert_eq!(endpoint_failed(&Ok(Response::new(Bytes::new())), &codes), Some(false));
        assert_eq!(endpoint_failed(&status(Code::Internal, true), &codes), Some(true));
        assert_eq!(
            endpoint_failed(&status(Code::ApplicationError, true), &codes),
            Some(false)
        );
        assert_eq!(endpoint_failed(&status(Code::NotFound, true), &codes), Some(false));
        // An overload refusal says nothing either way.
        assert_eq!(endpoint_failed(&status(Code::ServerBusy, false), &codes), None);
        assert_eq!(endpoint_failed(&Err(Error::deadline(true)), &codes), Some(true));
        // Without DEADLINE_EXCEEDED among the codes, this side's deadlines do not count.
        let no_deadlines = vec![Code::Unavailable, Code::Internal];
        assert_eq!(endpoint_failed(&Err(Error::deadline(true)), &no_deadlines), None);
        let broken = Err(Error::from(ConnectionError::ClosedAfterWrite(
            rpc_core::CloseReason::PeerClosed,
        )));
        assert_eq!(endpoint_failed(&broken, &codes), Some(true));
        assert_eq!(
            endpoint_failed(&Err(Error::from(ConnectionError::Draining)), &codes),
            None
        );
    }
}
