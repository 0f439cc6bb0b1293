//! The client handle: cheap to clone, shared by many tasks, a `tower::Service`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use rpc_core::driver::{ConnectionHandle, Outbound};
use rpc_core::event::{ConnectionEvent, EventSender};
use rpc_core::frame::RequestFrame;
use rpc_core::{Code, Metadata, Request, Response, Status};
use tokio::net::ToSocketAddrs;
use tokio::sync::{broadcast, oneshot, OnceCell};
use tokio::time::Instant;
use tower::Service;

use crate::config::ClientConfig;
use crate::connection::connect;
use crate::error::{Error, ErrorKind};

/// Metric: requests retried because they provably did not run, label `cause`.
pub const REQUEST_RETRIES: &str = "tether_client_retries_total";

/// A tether client for one endpoint: `connections_per_endpoint` multiplexed connections, opened
/// lazily and replaced when they close. Clone it freely; clones share the connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    addr: SocketAddr,
    config: ClientConfig,
    slots: Vec<Slot>,
    next: AtomicUsize,
    events: EventSender,
}

/// One connection position. The cell is replaced (never reset in place) when its connection is
/// found closed, so concurrent callers share one connect attempt and no lock is held across it.
#[derive(Default)]
struct Slot {
    cell: Mutex<Arc<OnceCell<ConnectionHandle>>>,
}

impl Slot {
    fn cell(&self) -> Arc<OnceCell<ConnectionHandle>> {
        self.cell.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn open(&self) -> Option<ConnectionHandle> {
        self.cell().get().filter(|h| h.is_open()).cloned()
    }

    fn discard(&self, stale: &Arc<OnceCell<ConnectionHandle>>) {
        let mut guard = self.cell.lock().unwrap_or_else(|e| e.into_inner());
        if Arc::ptr_eq(&guard, stale) {
            *guard = Arc::new(OnceCell::new());
        }
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.inner.addr)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for `addr` that connects on first use.
    pub async fn new(addr: impl ToSocketAddrs, config: ClientConfig) -> Result<Self, Error> {
        config
            .validate()
            .map_err(|e| Error::new(ErrorKind::Config(e), false))?;
        let addr = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| Error::new(ErrorKind::Connect(e), false))?
            .next()
            .ok_or_else(|| {
                let e = std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "address resolved to nothing",
                );
                Error::new(ErrorKind::Connect(e), false)
            })?;
        let (events, _) = broadcast::channel(1024);
        let slots = (0..config.connections_per_endpoint)
            .map(|_| Slot::default())
            .collect();
        Ok(Client {
            inner: Arc::new(Inner {
                addr,
                config,
                slots,
                next: AtomicUsize::new(0),
                events,
            }),
        })
    }

    /// A client for `addr` whose first connection is open (handshake done) before this returns.
    pub async fn connect(addr: impl ToSocketAddrs, config: ClientConfig) -> Result<Self, Error> {
        let client = Self::new(addr, config).await?;
        client.checkout(None).await?;
        Ok(client)
    }

    /// The endpoint.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// The config.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// Subscribes to connection events (bounded: a slow subscriber lags rather than blocking).
    pub fn events(&self) -> broadcast::Receiver<ConnectionEvent> {
        self.inner.events.subscribe()
    }

    /// The open connections right now.
    pub fn connections(&self) -> Vec<ConnectionHandle> {
        self.inner
            .slots
            .iter()
            .filter_map(|s| s.cell().get().cloned())
            .collect()
    }

    /// An open connection, connecting if none is. A connection that is closed or draining is never
    /// handed out.
    pub async fn checkout(&self, deadline: Option<Instant>) -> Result<ConnectionHandle, Error> {
        let slots = &self.inner.slots;
        let start = self.inner.next.fetch_add(1, Ordering::Relaxed) % slots.len();
        for i in 0..slots.len() {
            if let Some(h) = slots[(start + i) % slots.len()].open() {
                return Ok(h);
            }
        }
        let slot = &slots[start];
        loop {
            let cell = slot.cell();
            if let Some(h) = cell.get() {
                if h.is_open() {
                    return Ok(h.clone());
                }
                slot.discard(&cell);
                continue;
            }
            let inner = &self.inner;
            let h = cell
                .get_or_try_init(|| {
                    connect(
                        inner.addr,
                        &inner.config,
                        Some(inner.events.clone()),
                        deadline,
                    )
                })
                .await?;
            return Ok(h.clone());
        }
    }

    /// Sends a request and waits for its response, until the request's deadline (or
    /// `request_timeout` if it has none). A request that provably did not run is retried on a
    /// fresh checkout within its deadline; one that may have run is retried only when marked
    /// idempotent.
    pub async fn unary(&self, req: Request<Bytes>) -> Result<Response<Bytes>, Error> {
        let deadline = req
            .deadline()
            .unwrap_or_else(|| Instant::now() + self.inner.config.request_timeout);
        let idempotent = req.is_idempotent();
        let mut frame = Some(to_frame(req, false));
        let max = self.inner.config.max_attempts;
        let mut attempt = 1;
        loop {
            // Clone only while another attempt may follow.
            let this = if attempt < max {
                frame.clone()
            } else {
                frame.take()
            };
            let Some(this) = this else {
                return Err(Error::deadline(false));
            };
            let result = self.attempt(this, deadline).await;
            match result {
                Err(e)
                    if attempt < max && Instant::now() < deadline && retryable(&e, idempotent) =>
                {
                    metrics::counter!(REQUEST_RETRIES, "cause" => e.kind_str()).increment(1);
                    tracing::debug!(error = %e, attempt, "retrying request");
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    async fn attempt(
        &self,
        frame: RequestFrame,
        deadline: Instant,
    ) -> Result<Response<Bytes>, Error> {
        let conn = self.checkout(Some(deadline)).await?;
        let _in_flight = conn.track_in_flight();
        let (tx, rx) = oneshot::channel();
        let msg = Outbound::Request {
            frame,
            deadline: Some(deadline),
            reply: Some(tx),
        };
        match tokio::time::timeout_at(deadline, conn.send(msg)).await {
            Err(_) => return Err(Error::deadline(false)),
            Ok(Err(_)) => {
                let reason = conn.closed().await;
                return Err(rpc_core::driver::ConnectionError::NotWritten(reason).into());
            }
            Ok(Ok(())) => {}
        }
        match tokio::time::timeout_at(deadline, rx).await {
            // Sent but unanswered: the server may be running it.
            Err(_) => Err(Error::deadline(true)),
            Ok(Err(_)) => Err(Error::new(
                ErrorKind::Handshake(rpc_core::CloseReason::Local),
                true,
            )),
            Ok(Ok(Err(e))) => Err(e.into()),
            Ok(Ok(Ok(r))) if r.code == Code::Ok => Ok(Response::from_parts(r.metadata, r.payload)),
            Ok(Ok(Ok(r))) => Err(Error::status(Status::from_parts(
                r.code, r.message, r.metadata,
            ))),
        }
    }

    /// Sends a oneway request: resolves once it is queued on a connection; no response comes back.
    pub async fn oneway(&self, req: Request<Bytes>) -> Result<(), Error> {
        let deadline = req
            .deadline()
            .unwrap_or_else(|| Instant::now() + self.inner.config.request_timeout);
        let conn = self.checkout(Some(deadline)).await?;
        let msg = Outbound::Request {
            frame: to_frame(req, true),
            deadline: Some(deadline),
            reply: None,
        };
        match tokio::time::timeout_at(deadline, conn.send(msg)).await {
            Err(_) => Err(Error::deadline(false)),
            Ok(Err(_)) => {
                Err(rpc_core::driver::ConnectionError::NotWritten(conn.closed().await).into())
            }
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Gracefully closes every connection: GOAWAY, then close once requests in flight are answered.
    pub fn close(&self) {
        for s in &self.inner.slots {
            if let Some(h) = s.cell().get() {
                h.shutdown();
            }
        }
    }
}

fn to_frame(req: Request<Bytes>, oneway: bool) -> RequestFrame {
    let method = req.method().to_owned();
    let metadata: Metadata = req.metadata().clone();
    RequestFrame {
        id: 0,
        oneway,
        timeout: None,
        method,
        metadata,
        payload: req.into_body(),
    }
}

/// Whether a failed attempt may be tried again.
fn retryable(e: &Error, idempotent: bool) -> bool {
    match e.kind() {
        ErrorKind::Connection(c) => {
            use rpc_core::driver::ConnectionError as C;
            match c {
                C::NotWritten(_) | C::GoAway { .. } | C::Draining => true,
                C::ClosedAfterWrite(_) => idempotent,
                _ => false,
            }
        }
        ErrorKind::Status(s) => s.code() == Code::Unavailable,
        _ => false,
    }
}

impl Service<Request<Bytes>> for Client {
    type Response = Response<Bytes>;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Bytes>, Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        // Capacity is reserved per connection inside the call (its outbound queue), where the
        // connection is chosen.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let client = self.clone();
        Box::pin(async move { client.unary(req).await })
    }
}
