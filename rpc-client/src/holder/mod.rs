//! The connection holder: per endpoint, `connections_per_endpoint` multiplexed connections in an
//! alive pool or a retry pool, moved by events and by one background checker.
//!
//! - A connection that closes leaves the alive pool the moment its `Closed` event is seen (and
//!   every checkout re-validates, so a closed one is never handed out even before that).
//! - The checker runs every `check_interval`, and earlier when a reconnect falls due: it validates
//!   alive connections, moves endpoints without usable connections to the retry pool, reconnects
//!   retry entries whose backoff has elapsed, and tops up endpoints below their connection count.
//! - Every checkout validates the connection: open, not draining (no GOAWAY, FIN or RST seen), no
//!   heartbeat failing, and not idle past the server's advertised idle timeout minus a margin.
//! - With no alive endpoint, a checkout connects on demand to an endpoint whose backoff has
//!   elapsed, within the request's deadline.
//! - A checkout takes no lock while every alive endpoint takes requests unconditionally (the
//!   usual state): it reads a snapshot of the alive endpoints and their connections, which every
//!   change rebuilds under the lock, picks an endpoint and its least loaded connection, and
//!   validates that connection only. Its cost does not grow with the number of endpoints. A
//!   connection that fails validation, an ejected endpoint or one on probation sends checkouts
//!   to the locked path, which validates and prunes every connection and publishes the result.

mod balance;
mod health;
mod pool;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rpc_core::driver::ConnectionHandle;
use rpc_core::event::{ConnectionEvent, EventSender};
use tokio::sync::{broadcast, Notify};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tower::discover::{Change, Discover};

pub use balance::Balance;
pub use health::{evaluate, may_eject, EjectReason, Health, HealthState, Latencies, OutlierConfig, Verdict, Window};
pub use pool::{AfterFailure, EndpointPool, PoolState};

use crate::config::ClientConfig;
use crate::connection::connect;
use crate::error::{Error, ErrorKind};

/// Metric: checkouts that rejected a pooled connection, label `reason`.
pub const VALIDATION_REJECTED: &str = "tether_client_validation_rejected_total";
/// Metric: reconnect attempts, label `result` (`ok` or `failed`).
pub const RECONNECT_ATTEMPTS: &str = "tether_client_reconnect_attempts_total";
/// Metric (gauge): endpoints per pool, label `pool` (`alive`, `retry`, `discarded`, `ejected`;
/// an ejected endpoint counts only as ejected).
pub const POOL_ENDPOINTS: &str = "tether_client_pool_endpoints";
/// Metric: endpoints ejected for gray failure, label `reason`.
pub const EJECTIONS: &str = "tether_client_ejections_total";
/// Metric: ejections the caps refused (`max_ejection_percent`, or no other endpoint usable),
/// label `reason`.
pub const EJECTIONS_REFUSED: &str = "tether_client_ejections_refused_total";

/// Why a pooled connection was not handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Closed (FIN, RST, error, heartbeat timeout).
    Closed,
    /// Draining: GOAWAY sent or received.
    Draining,
    /// Heartbeats are going unanswered.
    HeartbeatFailing,
    /// Idle for longer than the server's idle timeout minus the margin: the server may be closing it.
    IdleExpired,
}

impl Rejection {
    fn as_str(self) -> &'static str {
        match self {
            Rejection::Closed => "closed",
            Rejection::Draining => "draining",
            Rejection::HeartbeatFailing => "heartbeat_failing",
            Rejection::IdleExpired => "idle_expired",
        }
    }
}

/// Validation before reuse. `margin` is subtracted from the server's advertised idle timeout (at
/// most a fifth of it is taken, so short timeouts keep a usable window).
pub fn validate(conn: &ConnectionHandle, now: Instant, margin: Duration) -> Result<(), Rejection> {
    match conn.state() {
        rpc_core::driver::ConnectionState::Open => {}
        rpc_core::driver::ConnectionState::Closed(_) => return Err(Rejection::Closed),
        _ => return Err(Rejection::Draining),
    }
    if conn.heartbeat_failures() > 0 {
        return Err(Rejection::HeartbeatFailing);
    }
    if let Some(idle) = conn.peer_settings().and_then(|s| s.idle_timeout) {
        let limit = idle.saturating_sub(margin.min(idle / 5));
        if now.saturating_duration_since(conn.last_write()) >= limit {
            return Err(Rejection::IdleExpired);
        }
    }
    Ok(())
}

/// What users can see of one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointStatus {
    /// The address.
    pub addr: SocketAddr,
    /// Alive, retry, discarded, or (alive but) ejected for gray failure.
    pub state: PoolState,
    /// Trusted, ejected, or on probation (outlier detection).
    pub health: HealthState,
    /// Open connections in the alive pool.
    pub connections: usize,
    /// Requests in flight on them.
    pub in_flight: usize,
    /// Its recent median and 99th percentile latency, from send to answer, as outlier detection
    /// measures it (the current interval, or the latest with 20 answers; `None` until one had).
    pub latency: Option<(Duration, Duration)>,
}

struct Endpoint {
    addr: SocketAddr,
    pool: EndpointPool,
    conns: Vec<ConnectionHandle>,
    connecting: usize,
    /// Set once the endpoint has lost its connections or failed to connect, so its return is
    /// reported as `Reconnected`.
    lost: bool,
    /// When and why its last connect attempt failed, for the checkouts that waited on it (boxed:
    /// rare, and 96 bytes in every endpoint inline).
    last_failure: Option<Box<(Instant, Error)>>,
    /// Gray failure: whether its requests succeed.
    health: Health,
    /// Its latest connections that validation found closed (see [`ConnectionHolder::recent_closes`]).
    pruned: Vec<RecentClose>,
}

impl Endpoint {
    fn new(addr: SocketAddr, now: Instant) -> Self {
        Endpoint {
            addr,
            pool: EndpointPool::new(now),
            conns: Vec::new(),
            connecting: 0,
            lost: false,
            last_failure: None,
            health: Health::new(),
            pruned: Vec::new(),
        }
    }

    fn in_flight(&self) -> usize {
        self.conns.iter().map(ConnectionHandle::in_flight).sum()
    }

    /// The state users see: an alive endpoint that is ejected shows as ejected.
    fn status(&self) -> EndpointStatus {
        EndpointStatus {
            addr: self.addr,
            state: self.reported_state(),
            health: self.health.state(),
            connections: self.conns.len(),
            in_flight: self.in_flight(),
            latency: self.health.recent_latency(0.5).zip(self.health.recent_latency(0.99)),
        }
    }

    fn reported_state(&self) -> PoolState {
        match (self.pool.state(), self.health.state()) {
            (PoolState::Alive, HealthState::Ejected { until, times }) => PoolState::Ejected { until, times },
            (s, _) => s,
        }
    }
}

struct Inner {
    /// Shared with every other holder made with an equal config (see [`shared_config`]).
    config: Arc<ClientConfig>,
    tls: Option<tokio_rustls::TlsConnector>,
    endpoints: Mutex<Vec<Endpoint>>,
    events: EventSender,
    /// Wakes the checker (endpoints changed, a connection was lost).
    wake: Notify,
    /// Wakes checkouts waiting for a connect attempt to finish.
    connect_done: Notify,
    rr: AtomicUsize,
    shutdown: CancellationToken,
    /// The latest connections to close, newest last (at most [`RECENT_CLOSES`]).
    closes: Mutex<std::collections::VecDeque<RecentClose>>,
    /// What a checkout reads without the lock; rebuilt under the lock by every change to the
    /// endpoints, their pools, connections or health ([`Inner::publish`]).
    snapshot: arc_swap::ArcSwap<Snapshot>,
}

/// The endpoints as a checkout sees them, published under the holder's lock after each change.
#[derive(Default)]
struct Snapshot {
    /// The alive endpoints with connections, when every alive endpoint takes requests without
    /// conditions (trusted, or outlier detection off): a checkout picks among them without the
    /// lock and validates only the connection it picks. `None` while some alive endpoint is
    /// ejected or on probation (its probe slot is reserved under the lock): checkouts take the
    /// locked path.
    fast: Option<Box<[Candidate]>>,
    /// Where each endpoint was in the holder's list at publication (a hint: checked before use).
    index: std::collections::HashMap<SocketAddr, usize>,
}

struct Candidate {
    addr: SocketAddr,
    conns: Box<[ConnectionHandle]>,
}

impl Candidate {
    fn in_flight(&self) -> usize {
        self.conns.iter().map(ConnectionHandle::in_flight).sum()
    }
}

/// The open ones of `conns` if none has room for a request; empty as soon as one has (or none
/// is open).
fn full_of<'a>(conns: impl Iterator<Item = &'a ConnectionHandle>) -> Vec<ConnectionHandle> {
    let mut full = Vec::new();
    for c in conns.filter(|c| c.is_open()) {
        if c.has_room() {
            return Vec::new();
        }
        full.push(c.clone());
    }
    full
}

/// The connection of an endpoint a request goes to: healthy before heartbeat-failing, then the
/// fewest requests in flight; ties go round from `turn` (the checkout counter over the number
/// of candidate endpoints, so it advances at each visit to an endpoint under round robin), so
/// requests one at a time use every connection in turn rather than always the first.
fn least_loaded(conns: &[ConnectionHandle], turn: usize) -> Option<&ConnectionHandle> {
    let start = turn.checked_rem(conns.len())?;
    conns[start..]
        .iter()
        .chain(&conns[..start])
        .min_by_key(|c| (c.heartbeat_failures() > 0, c.in_flight()))
}

/// How many closed connections [`ConnectionHolder::recent_closes`] remembers.
pub const RECENT_CLOSES: usize = 64;

/// A connection of the pool that closed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentClose {
    /// Its endpoint.
    pub addr: SocketAddr,
    /// Its connection id.
    pub id: u64,
    /// Why it closed (`None`: it had not closed when the pool dropped it).
    pub reason: Option<rpc_core::CloseReason>,
    /// When the pool learned it.
    pub at: Instant,
}

/// The pools of a client. Cheap to clone; the checker stops when the last clone is dropped.
#[derive(Clone)]
pub struct ConnectionHolder {
    inner: Arc<Inner>,
    _guard: Arc<DropGuard>,
}

impl std::fmt::Debug for ConnectionHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionHolder")
            .field("endpoints", &self.endpoints())
            .finish()
    }
}

enum Next {
    Use(SocketAddr, ConnectionHandle),
    Connect(SocketAddr),
    Wait,
    Unavailable,
    /// The holder was closed: nothing is connected again.
    Closed,
}

impl ConnectionHolder {
    /// A holder for `addrs` (more can be added later). Starts the checker; needs a Tokio runtime.
    /// Loads the TLS configuration, if any, once here.
    pub fn new(addrs: impl IntoIterator<Item = SocketAddr>, config: ClientConfig) -> Result<Self, Error> {
        let tls = match &config.tls {
            Some(t) => Some(tokio_rustls::TlsConnector::from(
                rpc_core::tls::client_config(t).map_err(|e| Error::new(ErrorKind::TlsConfig(e), false))?,
            )),
            None => None,
        };
        // The checker hears of every close at once, whether or not anyone subscribes to events.
        // (A queue and a notify, not a channel: an unbounded channel allocates about 1 KiB up
        // front, in every Client.)
        let closes = Arc::new(CloseQueue::default());
        let hook = closes.clone();
        let events = EventSender::with_close_hook(1024, move |id, closed| hook.push(id, closed));
        let shutdown = CancellationToken::new();
        let now = Instant::now();
        let mut endpoints: Vec<Endpoint> = Vec::new();
        for addr in addrs {
            // One endpoint per address: a repeated address would never come alive.
            if !endpoints.iter().any(|e| e.addr == addr) {
                endpoints.push(Endpoint::new(addr, now));
            }
        }
        // An endpoint is most of a KiB: no spare slots (a Client of one endpoint had four).
        endpoints.shrink_to_fit();
        let inner = Arc::new(Inner {
            config: shared_config(config),
            tls,
            endpoints: Mutex::new(endpoints),
            events,
            wake: Notify::new(),
            connect_done: Notify::new(),
            rr: AtomicUsize::new(0),
            shutdown: shutdown.clone(),
            closes: Mutex::new(std::collections::VecDeque::new()),
            snapshot: arc_swap::ArcSwap::from_pointee(Snapshot::default()),
        });
        inner.publish(&inner.lock());
        tokio::spawn(checker(inner.clone(), closes));
        Ok(ConnectionHolder {
            inner,
            _guard: Arc::new(shutdown.drop_guard()),
        })
    }

    /// The config.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// Connection and endpoint events (bounded: a slow subscriber lags rather than blocking).
    pub fn events(&self) -> broadcast::Receiver<ConnectionEvent> {
        self.inner.events.subscribe()
    }

    /// Publishes `event` to the subscribers of [`ConnectionHolder::events`].
    pub(crate) fn emit(&self, event: ConnectionEvent) {
        self.inner.events.send(event);
    }

    /// Every endpoint and where it stands.
    pub fn endpoints(&self) -> Vec<EndpointStatus> {
        self.inner.refreshed().iter().map(Endpoint::status).collect()
    }

    /// Endpoints in the alive pool.
    pub fn alive_endpoints(&self) -> usize {
        self.inner
            .refreshed()
            .iter()
            .filter(|e| e.pool.state() == PoolState::Alive)
            .count()
    }

    /// The open connections of every endpoint.
    pub fn connections(&self) -> Vec<ConnectionHandle> {
        self.inner
            .refreshed()
            .iter()
            .flat_map(|e| e.conns.iter().cloned())
            .collect()
    }

    /// Each endpoint with its status and its pooled connections, in one look under the lock.
    pub fn endpoint_connections(&self) -> Vec<(EndpointStatus, Vec<ConnectionHandle>)> {
        self.inner
            .refreshed()
            .iter()
            .map(|e| (e.status(), e.conns.clone()))
            .collect()
    }

    /// The latest pooled connections to close (at most [`RECENT_CLOSES`], oldest first), with
    /// their close reasons: what an operator looks at first when a pool misbehaves.
    pub fn recent_closes(&self) -> Vec<RecentClose> {
        let mut all: Vec<RecentClose> = self
            .inner
            .refreshed()
            .iter()
            .flat_map(|e| e.pruned.iter().cloned())
            .collect();
        all.extend(
            self.inner
                .closes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned(),
        );
        all.sort_by_key(|c| c.at);
        let excess = all.len().saturating_sub(RECENT_CLOSES);
        all.drain(..excess);
        all
    }

    /// Adds an endpoint, or brings a discarded one back.
    pub fn add_endpoint(&self, addr: SocketAddr) {
        self.inner.add_endpoint(addr);
    }

    /// Removes an endpoint; its connections drain gracefully.
    pub fn remove_endpoint(&self, addr: SocketAddr) {
        self.inner.remove_endpoint(addr);
    }

    /// Replaces the endpoint set: adds the new, removes the missing.
    pub fn set_endpoints(&self, addrs: &[SocketAddr]) {
        self.inner.set_endpoints(addrs);
    }

    /// Re-resolves `host` (`name:port`) every `interval` and replaces the endpoint set with the
    /// answer; a failed or empty lookup keeps the current set. Stops with the holder.
    pub fn resolve_periodically(&self, host: String, interval: Duration) {
        let weak = Arc::downgrade(&self.inner);
        let token = self.inner.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let resolved: Vec<SocketAddr> = match tokio::net::lookup_host(&host).await {
                    Ok(it) => it.collect(),
                    Err(e) => {
                        tracing::warn!(%host, error = %e, "DNS re-resolution failed; keeping endpoints");
                        Vec::new()
                    }
                };
                let Some(inner) = weak.upgrade() else { return };
                if !resolved.is_empty() {
                    inner.set_endpoints(&resolved);
                }
                drop(inner);
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
            }
        });
    }

    /// Follows a `tower::discover::Discover` stream of endpoint changes (`Insert(key, addr)`,
    /// `Remove(key)`). Stops when the stream ends or the holder is dropped.
    pub fn discover<D>(&self, discover: D)
    where
        D: Discover<Service = SocketAddr> + Send + 'static,
        D::Key: Eq + std::hash::Hash + Send,
        D::Error: std::fmt::Display,
    {
        let weak = Arc::downgrade(&self.inner);
        let token = self.inner.shutdown.clone();
        tokio::spawn(async move {
            let mut discover = std::pin::pin!(discover);
            let mut keys: std::collections::HashMap<D::Key, SocketAddr> = std::collections::HashMap::new();
            loop {
                let change = tokio::select! {
                    _ = token.cancelled() => return,
                    c = std::future::poll_fn(|cx| discover.as_mut().poll_discover(cx)) => c,
                };
                let Some(holder) = weak.upgrade() else { return };
                match change {
                    Some(Ok(Change::Insert(k, addr))) => {
                        if let Some(old) = keys.insert(k, addr) {
                            if old != addr {
                                holder.remove_endpoint(old);
                            }
                        }
                        holder.add_endpoint(addr);
                    }
                    Some(Ok(Change::Remove(k))) => {
                        if let Some(addr) = keys.remove(&k) {
                            holder.remove_endpoint(addr);
                        }
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, "discovery stream error"),
                    None => return,
                }
            }
        });
    }

    /// A validated connection, chosen by the balance strategy among alive endpoints (`avoid` is
    /// skipped when another endpoint is alive). With none alive, connects on demand to an endpoint
    /// whose backoff has elapsed, within `deadline`.
    pub async fn checkout(
        &self,
        deadline: Option<Instant>,
        avoid: Option<SocketAddr>,
    ) -> Result<(SocketAddr, ConnectionHandle), Error> {
        let limit = deadline.unwrap_or_else(|| Instant::now() + self.inner.config.connect_timeout);
        // When this checkout's own connect attempt failed, that error says more than "no endpoint".
        let mut last_error = None;
        loop {
            let next = match self.inner.next(avoid) {
                // Registering for a wakeup takes a lock: only a checkout that may wait does it,
                // then decides again, so a connect finishing in between is not missed.
                Next::Wait => {
                    let notified = self.inner.connect_done.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    match self.inner.next(avoid) {
                        Next::Wait => {
                            if tokio::time::timeout_at(limit, notified).await.is_err() {
                                return Err(last_error.unwrap_or_else(|| Error::new(ErrorKind::ConnectTimeout, false)));
                            }
                            continue;
                        }
                        other => other,
                    }
                }
                other => other,
            };
            match next {
                Next::Use(addr, conn) => return Ok((addr, conn)),
                // Boxed: connecting is rare, and inline its state would make every checkout's
                // future (and so every request's) kilobytes larger.
                Next::Connect(addr) => {
                    // Made before the first await: if this checkout is dropped at any point from
                    // here on, the guard lowers the endpoint's `connecting` count again.
                    let guard = Connecting::new(self.inner.clone(), addr);
                    match Box::pin(self.inner.connect_endpoint(guard, Some(limit))).await {
                        Ok(conn) => return Ok((addr, conn)),
                        Err(e) if Instant::now() >= limit => return Err(e),
                        Err(e) => last_error = Some(e), // backoff recorded; another endpoint may be due
                    }
                }
                Next::Wait => continue, // handled above
                Next::Closed => return Err(Error::new(ErrorKind::Closed, false)),
                // Every endpoint backing off: why the last attempt (its own, or another's, such
                // as the checker's that it waited on or that ended just before it looked)
                // failed, not only that no endpoint is left.
                Next::Unavailable => {
                    return Err(last_error
                        .or_else(|| self.inner.last_failure())
                        .unwrap_or_else(|| Error::new(ErrorKind::NoEndpoint, false)))
                }
            }
        }
    }

    /// For backpressure: empty when a request could be queued now (some open connection of an
    /// alive endpoint that takes requests has room in its outbound queue, or there is no such
    /// connection at all, so a request fails or connects at once), else the full connections,
    /// to wait on.
    pub(crate) fn full_connections(&self) -> Vec<ConnectionHandle> {
        // Without the lock when every alive endpoint takes requests (the snapshot has them all).
        if let Some(eps) = self.inner.snapshot.load().fast.as_deref() {
            return full_of(eps.iter().flat_map(|e| e.conns.iter()));
        }
        let eps = self.inner.lock();
        full_of(
            eps.iter()
                .filter(|e| e.pool.state() == PoolState::Alive && !e.health.is_ejected())
                .flat_map(|e| e.conns.iter()),
        )
    }

    /// A reference for a background follower (the registry watcher) that does not keep the
    /// holder alive.
    #[cfg(feature = "etcd")]
    pub(crate) fn downgrade(&self) -> WeakHolder {
        WeakHolder {
            inner: Arc::downgrade(&self.inner),
            stopped: self.inner.shutdown.clone(),
        }
    }

    /// Records a request's outcome at `addr` for outlier detection (`failed`: it counts as the
    /// endpoint failing) and, for an answer, its latency (for the latency rule and hedging).
    pub(crate) fn record(&self, addr: SocketAddr, failed: bool, latency: Duration) {
        self.inner.record(addr, failed, latency);
    }

    /// The 95th percentile latency of `addr`'s recent answers, once it has had 20 in an outlier
    /// interval; for an endpoint with none yet, the median of the other endpoints' (see
    /// [`crate::HedgeDelay::P95`]).
    pub(crate) fn hedge_p95(&self, addr: SocketAddr) -> Option<Duration> {
        let eps = self.inner.lock();
        if let Some(p95) = eps.iter().find(|e| e.addr == addr)?.health.hedge_p95() {
            return Some(p95);
        }
        let mut others: Vec<Duration> = eps.iter().filter_map(|e| e.health.hedge_p95()).collect();
        others.sort_unstable();
        others.get(others.len().checked_sub(1)? / 2).copied()
    }

    /// A latency sample of an attempt that lost a hedge at `addr`: it had taken at least this
    /// long with no answer (a lower bound), and would otherwise count nowhere.
    pub(crate) fn record_lost_hedge(&self, addr: SocketAddr, waited: Duration) {
        let timed = self.inner.config.hedges_at_p95();
        if !self.inner.config.outlier.enabled && !timed {
            return;
        }
        if let Some(e) = self.inner.lock().iter_mut().find(|e| e.addr == addr) {
            e.health.record_latency(waited);
        }
    }

    /// Gracefully closes every connection and stops the checker.
    pub fn close(&self) {
        self.inner.shutdown.cancel();
        for c in self.connections() {
            c.shutdown();
        }
    }
}

/// A holder that may be gone: what a background follower of it keeps.
#[cfg(feature = "etcd")]
#[derive(Clone)]
pub(crate) struct WeakHolder {
    inner: std::sync::Weak<Inner>,
    stopped: CancellationToken,
}

#[cfg(feature = "etcd")]
impl WeakHolder {
    /// Cancelled when the holder is closed or its last clone dropped.
    pub(crate) fn stopped(&self) -> &CancellationToken {
        &self.stopped
    }

    /// [`ConnectionHolder::set_endpoints`]; false when the holder is gone.
    pub(crate) fn set_endpoints(&self, addrs: &[SocketAddr]) -> bool {
        match self.inner.upgrade() {
            Some(inner) => {
                inner.set_endpoints(addrs);
                true
            }
            None => false,
        }
    }
}

impl Inner {
    /// The most recent connect failure of any endpoint not discarded: why it is backing off (a
    /// connect that works, or a revive, clears it).
    fn last_failure(&self) -> Option<Error> {
        self.lock()
            .iter()
            .filter(|e| e.pool.state() != PoolState::Discarded)
            .filter_map(|e| e.last_failure.as_deref())
            .max_by_key(|(at, _)| *at)
            .and_then(|(_, f)| f.replay_connect())
    }

    /// Adds an endpoint, or brings a discarded one back.
    fn add_endpoint(&self, addr: SocketAddr) {
        let now = Instant::now();
        {
            let mut eps = self.lock();
            match eps.iter_mut().find(|e| e.addr == addr) {
                Some(e) => {
                    // Named again (a discovery update, a DNS refresh): only a discarded endpoint
                    // starts afresh; one backing off keeps the reason it backs off.
                    if e.pool.state() == PoolState::Discarded {
                        e.last_failure = None;
                    }
                    e.pool.revive(now);
                }
                None => eps.push(Endpoint::new(addr, now)),
            }
            self.publish(&eps);
        }
        self.wake.notify_one();
    }

    /// Removes an endpoint; its connections drain gracefully.
    fn remove_endpoint(&self, addr: SocketAddr) {
        let removed = {
            let mut eps = self.lock();
            let i = eps.iter().position(|e| e.addr == addr);
            let removed = i.map(|i| eps.remove(i));
            self.publish(&eps);
            removed
        };
        if let Some(e) = removed {
            e.conns.iter().for_each(ConnectionHandle::shutdown);
        }
        self.publish_pool_sizes();
    }

    /// Replaces the endpoint set (DNS re-resolution): adds the new, removes the missing.
    fn set_endpoints(&self, addrs: &[SocketAddr]) {
        let current: Vec<SocketAddr> = self.lock().iter().map(|e| e.addr).collect();
        for a in current.iter().filter(|a| !addrs.contains(a)) {
            self.remove_endpoint(*a);
        }
        for a in addrs {
            self.add_endpoint(*a);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Endpoint>> {
        self.endpoints.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The endpoints with closed connections already pruned, so a query never shows a connection
    /// (or an alive endpoint) that the checker has not caught up with yet.
    fn refreshed(&self) -> MutexGuard<'_, Vec<Endpoint>> {
        let mut eps = self.lock();
        let (lost_any, pruned_any) = refresh(&mut eps, Instant::now(), self.config.idle_margin);
        if pruned_any {
            self.publish(&eps);
        }
        if lost_any {
            self.wake.notify_one();
        }
        eps
    }

    /// Rebuilds the snapshot checkouts read. Called with the lock held, after each change, so
    /// snapshots are stored in the order of the changes.
    fn publish(&self, eps: &[Endpoint]) {
        let outliers = self.config.outlier.enabled;
        let alive = || eps.iter().filter(|e| e.pool.state() == PoolState::Alive);
        let fast = alive().all(|e| !outliers || e.health.is_trusted()).then(|| {
            alive()
                .filter(|e| !e.conns.is_empty())
                .map(|e| Candidate {
                    addr: e.addr,
                    conns: e.conns.clone().into_boxed_slice(),
                })
                .collect::<Box<[Candidate]>>()
        });
        // A few endpoints are searched faster than hashed (and a Client of one needs no table).
        let index = if eps.len() > 8 {
            eps.iter().enumerate().map(|(i, e)| (e.addr, i)).collect()
        } else {
            std::collections::HashMap::new()
        };
        self.snapshot.store(Arc::new(Snapshot { fast, index }));
    }

    /// The position of `addr` in `eps`: the snapshot's hint if it still holds, else a search.
    fn position(&self, eps: &[Endpoint], addr: SocketAddr) -> Option<usize> {
        match self.snapshot.load().index.get(&addr) {
            Some(&i) if eps.get(i).is_some_and(|e| e.addr == addr) => Some(i),
            _ => eps.iter().position(|e| e.addr == addr),
        }
    }

    /// The checkout without the lock: from the snapshot, when every alive endpoint takes
    /// requests unconditionally, the balance strategy's endpoint and its least loaded
    /// connection, if that connection passes validation. `None`: decide under the lock.
    fn next_fast(&self, avoid: Option<SocketAddr>) -> Option<Next> {
        let snapshot = self.snapshot.load();
        let eps = snapshot.fast.as_deref()?;
        // `avoid` is skipped when another endpoint is there (a retry; rare, so searched).
        let skip = avoid
            .filter(|_| eps.len() > 1)
            .and_then(|a| eps.iter().position(|e| e.addr == a));
        let n = eps.len() - usize::from(skip.is_some());
        if n == 0 {
            return None;
        }
        let at = |k: usize| match skip {
            Some(s) if k >= s => k + 1,
            _ => k,
        };
        let (k, turn) = self.choose(n, |k| eps[at(k)].in_flight());
        let e = &eps[at(k)];
        let conn = least_loaded(&e.conns, turn)?;
        match validate(conn, Instant::now(), self.config.idle_margin) {
            Ok(()) | Err(Rejection::HeartbeatFailing) => Some(Next::Use(e.addr, conn.clone())),
            // The locked path prunes it (and counts the rejection) and publishes.
            Err(_) => None,
        }
    }

    /// The balance strategy's pick among `n` candidate endpoints (`load`: the requests in flight
    /// at the k-th), and the turn for [`least_loaded`] within it.
    fn choose(&self, n: usize, load: impl Fn(usize) -> usize) -> (usize, usize) {
        let counter = self.rr.fetch_add(1, Ordering::Relaxed);
        let (r1, r2) = match self.config.balance {
            Balance::RoundRobin => (0, 0),
            _ => (rand::random::<u32>() as usize, rand::random::<u32>() as usize),
        };
        let k = balance::pick(self.config.balance, n, load, counter, r1, r2).unwrap_or(0);
        (k, counter / n)
    }

    /// Decides what a checkout does next: without the lock when it can ([`Inner::next_fast`]),
    /// else under it, validating and pruning as it goes.
    fn next(&self, avoid: Option<SocketAddr>) -> Next {
        if let Some(next) = self.next_fast(avoid) {
            return next;
        }
        let now = Instant::now();
        let margin = self.config.idle_margin;
        let mut eps = self.lock();
        let (lost_any, pruned_any) = refresh(&mut eps, now, margin);
        // Candidates: alive endpoints, without `avoid` when another one is alive. No allocation:
        // this runs on every request.
        let alive = |e: &Endpoint| e.pool.state() == PoolState::Alive;
        // Health (outlier detection) in tiers: 2 takes requests (trusted, or on probation with its
        // probe slot free); 1 on probation with its probe out; 0 ejected. The best tier any alive
        // endpoint reaches is used, so an ejection never leaves a client with no endpoint.
        let outliers = &self.config.outlier;
        let tier = |e: &Endpoint| -> u8 {
            if !outliers.enabled || e.health.takes_requests(now, outliers) {
                2
            } else if e.health.is_ejected() {
                0
            } else {
                1
            }
        };
        let best = eps.iter().filter(|e| alive(e)).map(tier).max().unwrap_or(2);
        let usable = |e: &Endpoint| alive(e) && tier(e) >= best;
        let avoid = avoid.filter(|a| eps.iter().any(|e| usable(e) && e.addr != *a));
        let candidate = |e: &Endpoint| usable(e) && Some(e.addr) != avoid;
        let n = eps.iter().filter(|e| candidate(e)).count();
        let decision = if n == 0 {
            // Closed: its connections are draining, and none is opened again (the checker has
            // stopped, and nothing would close it).
            if self.shutdown.is_cancelled() {
                Next::Closed
            } else if let Some(e) = eps.iter_mut().find(|e| e.connecting == 0 && e.pool.is_due(now)) {
                e.connecting += 1;
                Next::Connect(e.addr)
            } else if eps.iter().any(|e| e.connecting > 0) {
                Next::Wait
            } else {
                Next::Unavailable
            }
        } else {
            let nth = |k: usize| {
                eps.iter()
                    .enumerate()
                    .filter(|(_, e)| candidate(e))
                    .nth(k)
                    .map_or(0, |(i, _)| i)
            };
            let (k, turn) = self.choose(n, |k| eps[nth(k)].in_flight());
            let i = nth(k);
            let e = &mut eps[i];
            let conn = least_loaded(&e.conns, turn).cloned();
            match conn {
                Some(c) => {
                    if outliers.enabled && !e.health.is_trusted() {
                        e.health.reserve_probe(now); // the probe slot, under the lock
                    }
                    Next::Use(e.addr, c)
                }
                None => Next::Wait,
            }
        };
        if pruned_any {
            self.publish(&eps);
        }
        drop(eps);
        if lost_any {
            self.publish_pool_sizes();
            self.wake.notify_one();
        }
        decision
    }

    /// One connect attempt to the guard's endpoint, whose `connecting` count the caller has
    /// already raised; the guard lowers it however this ends.
    async fn connect_endpoint(
        &self,
        mut guard: Connecting,
        deadline: Option<Instant>,
    ) -> Result<ConnectionHandle, Error> {
        let addr = guard.addr;
        let mut result = connect(
            addr,
            &self.config,
            self.tls.as_ref(),
            Some(self.events.clone()),
            deadline,
        )
        .await;
        let now = Instant::now();
        let mut event = None;
        let mut probation = None;
        {
            let mut eps = self.lock();
            guard.armed = false; // lowered here, under the same lock as the outcome
                                 // Closed while this attempt ran: its connection is not pooled. Decided under the lock
                                 // `close` takes to shut the pool's connections down, so one of the two shuts it.
            let closed = self.shutdown.is_cancelled();
            if let Some(e) = eps.iter_mut().find(|e| e.addr == addr) {
                e.connecting = e.connecting.saturating_sub(1);
                match &result {
                    _ if closed => {}
                    Ok(conn) => {
                        e.conns.push(conn.clone());
                        if e.pool.state() != PoolState::Alive && e.lost {
                            event = Some(ConnectionEvent::Reconnected { addr });
                        }
                        if e.pool.state() != PoolState::Alive && e.health.on_reconnected() {
                            probation = Some(ConnectionEvent::EndpointProbation { addr });
                        }
                        e.lost = false;
                        e.pool.on_connected();
                        e.last_failure = None;
                    }
                    Err(err) => {
                        e.lost = true;
                        e.last_failure = err.replay_connect().map(|f| Box::new((now, f)));
                        let unit = rand::random::<f64>();
                        event = Some(
                            match e.pool.on_connect_failed(
                                now,
                                &self.config.backoff,
                                self.config.max_reconnect_attempts,
                                unit,
                            ) {
                                AfterFailure::RetryIn { attempt, delay } => {
                                    tracing::debug!(%addr, attempt, ?delay, error = %err, "connect failed; backing off");
                                    ConnectionEvent::Reconnecting { addr, attempt, delay }
                                }
                                AfterFailure::Discard { attempts } => {
                                    tracing::warn!(%addr, attempts, "endpoint discarded after max_reconnect_attempts");
                                    ConnectionEvent::Discarded { addr, attempts }
                                }
                            },
                        );
                    }
                }
            } else if let Ok(conn) = &result {
                conn.shutdown(); // the endpoint was removed while connecting
            }
            if closed {
                if let Ok(conn) = &result {
                    conn.shutdown();
                }
                result = Err(Error::new(ErrorKind::Closed, false));
            }
            self.publish(&eps);
        }
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        metrics::counter!(RECONNECT_ATTEMPTS, "result" => outcome).increment(1);
        for ev in [event, probation].into_iter().flatten() {
            self.events.send(ev);
        }
        self.publish_pool_sizes();
        self.connect_done.notify_waiters();
        self.wake.notify_one();
        result
    }

    fn publish_pool_sizes(&self) {
        let (mut alive, mut retry, mut discarded, mut ejected) = (0.0, 0.0, 0.0, 0.0);
        for e in self.lock().iter() {
            match e.reported_state() {
                PoolState::Alive => alive += 1.0,
                PoolState::Retry { .. } => retry += 1.0,
                PoolState::Discarded => discarded += 1.0,
                PoolState::Ejected { .. } => ejected += 1.0,
            }
        }
        metrics::gauge!(POOL_ENDPOINTS, "pool" => "alive").set(alive);
        metrics::gauge!(POOL_ENDPOINTS, "pool" => "retry").set(retry);
        metrics::gauge!(POOL_ENDPOINTS, "pool" => "discarded").set(discarded);
        metrics::gauge!(POOL_ENDPOINTS, "pool" => "ejected").set(ejected);
    }

    /// A request's outcome at `addr` (`failed`: it counts as the endpoint failing; see
    /// [`OutlierConfig::failure_codes`]): may eject the endpoint, or trust it again.
    fn record(&self, addr: SocketAddr, failed: bool, latency: Duration) {
        let config = &self.config.outlier;
        let timed = self.config.hedges_at_p95();
        if !config.enabled && !timed {
            return;
        }
        let now = Instant::now();
        let event = {
            let mut eps = self.lock();
            let Some(i) = self.position(&eps, addr) else {
                return;
            };
            if !failed {
                eps[i].health.record_latency(latency);
            }
            if !config.enabled {
                return;
            }
            let event = match eps[i].health.record(now, failed, config) {
                Verdict::None => return,
                Verdict::Trusted => ConnectionEvent::EndpointTrusted { addr },
                Verdict::Eject(reason) => match self.try_eject(&mut eps, i, reason, now) {
                    Some(ev) => ev,
                    None => return,
                },
            };
            self.publish(&eps);
            event
        };
        if let ConnectionEvent::EndpointEjected { reason, duration, .. } = &event {
            tracing::warn!(%addr, reason, ?duration, "endpoint ejected (outlier detection)");
        }
        self.events.send(event);
        self.publish_pool_sizes();
        self.wake.notify_one(); // the checker schedules its probation
    }

    /// Ejects endpoint `i` if the caps allow; the event to send if it did.
    fn try_eject(&self, eps: &mut [Endpoint], i: usize, reason: EjectReason, now: Instant) -> Option<ConnectionEvent> {
        let config = &self.config.outlier;
        let total = eps.iter().filter(|e| e.pool.state() != PoolState::Discarded).count();
        // Only alive endpoints count as ejected: one in the retry pool takes no requests anyway
        // (and goes on probation when it comes back).
        let ejected = eps
            .iter()
            .filter(|e| e.pool.state() == PoolState::Alive && e.health.is_ejected())
            .count();
        let others = eps
            .iter()
            .enumerate()
            .filter(|(j, e)| *j != i && e.pool.state() == PoolState::Alive && !e.health.is_ejected())
            .count();
        if !may_eject(ejected, total, others, config.max_ejection_percent) {
            metrics::counter!(EJECTIONS_REFUSED, "reason" => reason.as_str()).increment(1);
            return None;
        }
        let duration = eps[i].health.eject(now, config);
        metrics::counter!(EJECTIONS, "reason" => reason.as_str()).increment(1);
        let times = match eps[i].health.state() {
            HealthState::Ejected { times, .. } => times,
            _ => 0,
        };
        Some(ConnectionEvent::EndpointEjected {
            addr: eps[i].addr,
            reason: reason.as_str(),
            duration,
            times,
        })
    }

    /// The end of an outlier interval: the rate rules over the interval's outcomes.
    fn evaluate_outliers(&self, now: Instant) {
        let config = &self.config.outlier;
        let mut events = Vec::new();
        {
            let mut eps = self.lock();
            if !config.enabled {
                // Hedging at p95 only: the interval rotates the latencies, and judges nothing.
                for e in eps.iter_mut() {
                    e.health.end_interval();
                }
                return;
            }
            let windows: Vec<Option<Window>> = eps
                .iter_mut()
                .map(|e| {
                    let counts = e.health.end_interval();
                    counts.filter(|_| e.pool.state() == PoolState::Alive)
                })
                .collect();
            for (i, reason) in evaluate(&windows, config) {
                if let Some(ev) = self.try_eject(&mut eps, i, reason, now) {
                    events.push(ev);
                }
            }
            if !events.is_empty() {
                self.publish(&eps);
            }
        }
        let any = !events.is_empty();
        for ev in events {
            self.events.send(ev);
        }
        if any {
            self.publish_pool_sizes();
        }
    }

    /// One checker pass: validate, move, and start due reconnects and top-ups.
    fn check(self: &Arc<Self>, now: Instant) -> Option<Instant> {
        let margin = self.config.idle_margin;
        let per_endpoint = self.config.connections_per_endpoint;
        let mut to_connect = Vec::new();
        let mut next_due: Option<Instant> = None;
        let mut probation = Vec::new();
        {
            let mut eps = self.lock();
            for e in eps.iter_mut() {
                // An ejection that is over: probation. One still running: wake up when it ends.
                if e.health.tick(now) {
                    probation.push(ConnectionEvent::EndpointProbation { addr: e.addr });
                }
                if let Some(until) = e.health.ejected_until() {
                    next_due = Some(next_due.map_or(until, |n| n.min(until)));
                }
                if e.pool.state() == PoolState::Alive {
                    prune(e, now, margin);
                    if e.conns.is_empty() && e.connecting == 0 {
                        e.pool.on_lost(now);
                        e.lost = true;
                    }
                }
                let wanted = match e.pool.state() {
                    PoolState::Alive => per_endpoint.saturating_sub(e.conns.len() + e.connecting),
                    PoolState::Retry { .. } if e.connecting == 0 && e.pool.is_due(now) => 1,
                    _ => 0,
                };
                for _ in 0..wanted {
                    e.connecting += 1;
                    to_connect.push(e.addr);
                }
                if e.connecting == 0 {
                    if let Some(at) = e.pool.next_attempt() {
                        next_due = Some(next_due.map_or(at, |n| n.min(at)));
                    }
                }
            }
            self.publish(&eps);
        }
        for ev in probation {
            self.events.send(ev);
        }
        self.publish_pool_sizes();
        for addr in to_connect {
            let inner = self.clone();
            let guard = Connecting::new(self.clone(), addr);
            tokio::spawn(async move {
                let _ = inner.connect_endpoint(guard, None).await;
            });
        }
        next_due
    }

    /// A connection closed: it leaves the alive pool now.
    fn on_closed(&self, id: u64) {
        let now = Instant::now();
        let mut changed = false;
        let mut closed = None;
        {
            let mut eps = self.lock();
            for e in eps.iter_mut() {
                let before = e.conns.len();
                if let Some(c) = e.conns.iter().find(|c| c.id() == id) {
                    let reason = match c.state() {
                        rpc_core::driver::ConnectionState::Closed(r) => Some(r),
                        _ => None,
                    };
                    closed = Some(RecentClose {
                        addr: e.addr,
                        id,
                        reason,
                        at: now,
                    });
                }
                e.conns.retain(|c| c.id() != id);
                if e.conns.len() != before {
                    changed = true;
                    if e.conns.is_empty() && e.pool.state() == PoolState::Alive {
                        e.pool.on_lost(now);
                        e.lost = true;
                    }
                }
            }
            if changed {
                self.publish(&eps);
            }
        }
        if let Some(c) = closed {
            let mut closes = self.closes.lock().unwrap_or_else(|e| e.into_inner());
            if closes.len() >= RECENT_CLOSES {
                closes.pop_front();
            }
            closes.push_back(c);
        }
        if changed {
            self.publish_pool_sizes();
        }
    }
}

/// One raised `connecting` count of an endpoint. A connect attempt that finishes lowers it with its
/// outcome; one that is dropped first (its caller cancelled, its task aborted) lowers it here and
/// wakes whoever waits for a connect, so a cancelled caller never wedges the endpoint.
struct Connecting {
    inner: Arc<Inner>,
    addr: SocketAddr,
    armed: bool,
}

impl Connecting {
    fn new(inner: Arc<Inner>, addr: SocketAddr) -> Self {
        Connecting {
            inner,
            addr,
            armed: true,
        }
    }
}

impl Drop for Connecting {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(e) = self.inner.lock().iter_mut().find(|e| e.addr == self.addr) {
            e.connecting = e.connecting.saturating_sub(1);
        }
        self.inner.connect_done.notify_waiters();
        self.inner.wake.notify_one();
    }
}

/// Prunes every alive endpoint and moves those left without connections to the retry pool.
/// Returns whether one moved, and whether anything changed (a connection dropped, or one moved).
fn refresh(eps: &mut [Endpoint], now: Instant, margin: Duration) -> (bool, bool) {
    let (mut lost_any, mut pruned_any) = (false, false);
    for e in eps.iter_mut().filter(|e| e.pool.state() == PoolState::Alive) {
        pruned_any |= prune(e, now, margin);
        if e.conns.is_empty() && e.connecting == 0 {
            e.pool.on_lost(now);
            e.lost = true;
            lost_any = true;
        }
    }
    (lost_any, pruned_any || lost_any)
}

/// Drops connections that fail validation; those idle past the server's timeout are closed
/// gracefully so the server does not have to. A connection whose heartbeats are going unanswered
/// stays (one lost ack is not a dead peer; the driver closes it at `max_failures`) but is chosen
/// only when no healthier connection exists. Whether it dropped any.
fn prune(e: &mut Endpoint, now: Instant, margin: Duration) -> bool {
    let before = e.conns.len();
    let addr = e.addr;
    let mut closed = Vec::new();
    e.conns.retain(|c| match validate(c, now, margin) {
        Ok(()) | Err(Rejection::HeartbeatFailing) => true,
        Err(r) => {
            metrics::counter!(VALIDATION_REJECTED, "reason" => r.as_str()).increment(1);
            if r == Rejection::IdleExpired {
                c.shutdown();
            }
            if let rpc_core::driver::ConnectionState::Closed(reason) = c.state() {
                closed.push(RecentClose {
                    addr,
                    id: c.id(),
                    reason: Some(reason),
                    at: now,
                });
            }
            false
        }
    });
    // Kept here (a few per endpoint) for `recent_closes`: the close hook that follows finds the
    // connection gone.
    e.pruned.extend(closed);
    let excess = e.pruned.len().saturating_sub(PRUNED_KEPT);
    e.pruned.drain(..excess);
    e.conns.len() != before
}

/// Closes found by validation kept per endpoint.
const PRUNED_KEPT: usize = 8;

/// Connections that closed or began to drain, for the checker (filled by the event hook).
#[derive(Default)]
struct CloseQueue {
    /// Connection id, and whether it closed (else it drains).
    items: Mutex<Vec<(u64, bool)>>,
    ready: Notify,
}

impl CloseQueue {
    fn push(&self, id: u64, closed: bool) {
        self.items.lock().unwrap_or_else(|e| e.into_inner()).push((id, closed));
        self.ready.notify_one();
    }

    fn take(&self) -> Vec<(u64, bool)> {
        std::mem::take(&mut *self.items.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The configs of the holders alive, each once: a holder made with a config equal to one in use
/// shares it. A service or gateway holds a `Client` per target, all made from one config cloned,
/// and a config is most of a KiB (issue 22: 800 of an idle `Client`'s 6.8 KiB live).
fn shared_config(config: ClientConfig) -> Arc<ClientConfig> {
    static CONFIGS: rpc_core::intern::Interner<ClientConfig> = rpc_core::intern::Interner::new();
    CONFIGS.get(config)
}

async fn checker(inner: Arc<Inner>, closes: Arc<CloseQueue>) {
    let interval = inner.config.check_interval;
    // The interval also rotates the latencies hedging at p95 reads, with outlier detection off.
    let timed = inner.config.hedges_at_p95();
    let outliers = (inner.config.outlier.enabled || timed).then_some(inner.config.outlier.interval);
    let mut next_check = Instant::now();
    let mut next_evaluation = outliers.map(|i| Instant::now() + i);
    loop {
        // Closed, or every handle dropped: no pass after that, which could open a connection
        // nothing would ever close (a close and the shutdown may be noticed together below).
        if inner.shutdown.is_cancelled() {
            break;
        }
        let now = Instant::now();
        if let (Some(at), Some(every)) = (next_evaluation, outliers) {
            if now >= at {
                inner.evaluate_outliers(now);
                next_evaluation = Some(now + every);
            }
        }
        if now >= next_check {
            let due = inner.check(now);
            next_check = now + interval;
            if let Some(d) = due {
                next_check = next_check.min(d.max(now));
            }
        }
        if let Some(at) = next_evaluation {
            next_check = next_check.min(at);
        }
        tokio::select! {
            biased;
            _ = inner.shutdown.cancelled() => break,
            () = closes.ready.notified() => {
                for (id, closed) in closes.take() {
                    if closed {
                        inner.on_closed(id);
                    }
                }
                // Reconnect (or top up) without waiting for the tick; a draining connection is
                // pruned by the pass (checkouts validate only the connection they pick).
                next_check = Instant::now();
            }
            _ = inner.wake.notified() => next_check = Instant::now(),
            _ = tokio::time::sleep_until(next_check) => {}
        }
    }
    for e in inner.lock().iter() {
        e.conns.iter().for_each(ConnectionHandle::shutdown);
    }
}
