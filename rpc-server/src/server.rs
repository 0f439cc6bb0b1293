//! The server: builder, accept loop, per-connection drivers, graceful shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rpc_core::config::ConfigError;
use rpc_core::driver::{ConnectionHandle, Driver, DriverConfig};
use rpc_core::event::{ConnectionEvent, EventSender};
use rpc_core::frame::Settings;
use rpc_core::metrics::{RequestMetrics, Side};
use rpc_core::socket::configure_tcp;
use rpc_core::{BoxError, Request, Response, Status};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::{broadcast, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::layer::util::{Identity, Stack};
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceExt};
use tracing::Instrument;

use crate::config::ServerConfig;
use crate::detach::ServerTasks;
use crate::dispatch::{DispatchShared, ServerDispatch, ServerService};
use crate::router::{NamedService, Router};

/// Metric: accepted connections whose TLS handshake failed or timed out.
pub const TLS_HANDSHAKE_FAILURES: &str = "tether_server_tls_handshake_failures_total";
/// Metric: connections accepted and closed at once because `max_connections` were open.
pub const CONNECTIONS_REFUSED: &str = "tether_server_connections_refused_total";

/// Errors starting a server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The configuration is contradictory.
    #[error("invalid server config: {0}")]
    Config(#[from] ConfigError),
    /// The TLS configuration could not be loaded.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rpc_core::tls::TlsConfigError),
    /// Binding the listener failed.
    #[error("bind failed: {0}")]
    Bind(#[source] std::io::Error),
    /// The registry configuration cannot be used (feature `etcd`).
    #[error("registry: {0}")]
    Registry(String),
}

/// Entry point: `Server::builder()`.
#[derive(Debug, Clone, Copy)]
pub struct Server;

impl Server {
    /// A builder with the default config, no layers and no services.
    pub fn builder() -> ServerBuilder<Identity> {
        ServerBuilder {
            config: ServerConfig::default(),
            router: Router::new(),
            layer: Identity::new(),
            layered: false,
            health: None,
            #[cfg(feature = "etcd")]
            registry: None,
        }
    }
}

/// Collects config, layers and services, then binds.
#[derive(Debug, Clone)]
pub struct ServerBuilder<L> {
    config: ServerConfig,
    router: Router,
    layer: L,
    /// Whether any layer was added: without one the stack is the router alone, which is always
    /// ready and keeps no state between calls, so a connection may call it without cloning.
    layered: bool,
    /// The health service's statuses, if it is served.
    health: Option<crate::health::HealthReporter>,
    /// Where to register, if anywhere.
    #[cfg(feature = "etcd")]
    registry: Option<rpc_core::registry::RegistryConfig>,
}

impl<L> ServerBuilder<L> {
    /// Replaces the config.
    pub fn config(mut self, config: ServerConfig) -> Self {
        self.config = config;
        self
    }

    /// Adds a tower layer around every service (the first added is the outermost).
    pub fn layer<N>(self, layer: N) -> ServerBuilder<Stack<N, L>> {
        ServerBuilder {
            config: self.config,
            router: self.router,
            layer: Stack::new(layer, self.layer),
            layered: true,
            health: self.health,
            #[cfg(feature = "etcd")]
            registry: self.registry,
        }
    }

    /// Registers every service this server serves in etcd once it is bound (feature `etcd`; see
    /// [`crate::registry`] for the lease, the key layout and the lame-duck shutdown).
    #[cfg(feature = "etcd")]
    pub fn registry(mut self, config: rpc_core::registry::RegistryConfig) -> Self {
        self.registry = Some(config);
        self
    }

    /// Serves the health service (`grpc.health.v1.Health`, see [`crate::health`]): each service
    /// this server serves, and `""`, start SERVING once it is bound; a graceful shutdown turns
    /// them NOT_SERVING when it begins. Set statuses through [`ServerHandle::health`].
    pub fn health(self) -> Self {
        self.health_reporter(crate::health::HealthReporter::new())
    }

    /// [`ServerBuilder::health`], reporting through `reporter` (a clone of it sets statuses;
    /// the way to reach them with [`ServerBuilder::serve_with_shutdown`], which keeps the
    /// handle).
    pub fn health_reporter(mut self, reporter: crate::health::HealthReporter) -> Self {
        self.health = Some(reporter);
        self
    }

    /// Adds a generated service.
    pub fn add_service<S>(mut self, svc: S) -> Self
    where
        S: NamedService
            + Service<Request<Bytes>, Response = Response<Bytes>, Error = Status>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.router = self.router.add_service(svc);
        self
    }

    /// Adds a handler for one method path.
    pub fn route<S>(mut self, path: impl Into<String>, svc: S) -> Self
    where
        S: Service<Request<Bytes>, Response = Response<Bytes>, Error = Status> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
    {
        self.router = self.router.route(path, svc);
        self
    }

    /// Binds `addr` and starts serving in the background.
    pub async fn bind(self, addr: impl ToSocketAddrs) -> Result<ServerHandle, ServerError>
    where
        L: Layer<Router>,
        L::Service: Service<Request<Bytes>, Response = Response<Bytes>> + Clone + Send + 'static,
        <L::Service as Service<Request<Bytes>>>::Error: Into<BoxError>,
        <L::Service as Service<Request<Bytes>>>::Future: Send + 'static,
    {
        self.config.validate()?;
        let listener = listen(addr, self.config.listen_backlog)
            .await
            .map_err(ServerError::Bind)?;
        self.serve(listener)
    }

    /// Binds `addr` and serves until `signal` completes, then shuts down gracefully (in-flight
    /// requests get `shutdown_grace`; see [`ServerHandle::shutdown`]); returns when that is done.
    /// tonic's `serve_with_shutdown`. For a server that runs until the process ends, pass
    /// `std::future::pending()`, or a signal:
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), rpc_server::ServerError> {
    /// rpc_server::Server::builder()
    ///     // .add_service(...)
    ///     .serve_with_shutdown("0.0.0.0:7000", async {
    ///         let _ = tokio::signal::ctrl_c().await;
    ///     })
    ///     .await
    /// # }
    /// ```
    pub async fn serve_with_shutdown(
        self,
        addr: impl ToSocketAddrs,
        signal: impl std::future::Future<Output = ()>,
    ) -> Result<(), ServerError>
    where
        L: Layer<Router>,
        L::Service: Service<Request<Bytes>, Response = Response<Bytes>> + Clone + Send + 'static,
        <L::Service as Service<Request<Bytes>>>::Error: Into<BoxError>,
        <L::Service as Service<Request<Bytes>>>::Future: Send + 'static,
    {
        let handle = self.bind(addr).await?;
        signal.await;
        handle.shutdown().await;
        Ok(())
    }

    /// Serves connections from `listener` in the background.
    pub fn serve(mut self, listener: TcpListener) -> Result<ServerHandle, ServerError>
    where
        L: Layer<Router>,
        L::Service: Service<Request<Bytes>, Response = Response<Bytes>> + Clone + Send + 'static,
        <L::Service as Service<Request<Bytes>>>::Error: Into<BoxError>,
        <L::Service as Service<Request<Bytes>>>::Future: Send + 'static,
    {
        self.config.validate()?;
        let local_addr = listener.local_addr().map_err(ServerError::Bind)?;
        if let Some(reporter) = &self.health {
            self.router =
                std::mem::take(&mut self.router).add_service(crate::health::HealthService::new(reporter.clone()));
            for name in self.router.service_names() {
                reporter.set_serving(&name);
            }
            reporter.set_serving("");
        }
        let router = Arc::new(self.router.clone());
        let service: ServerService = BoxCloneService::new(self.layer.layer(self.router).map_err(Into::into));
        let events = EventSender::new(1024);
        let shutdown = CancellationToken::new();
        let kill = CancellationToken::new();
        let tls = match &self.config.tls {
            Some(t) => Some(tokio_rustls::TlsAcceptor::from(rpc_core::tls::server_config(t)?)),
            None => None,
        };
        let metrics = Arc::new(RequestMetrics::new(Side::Server));
        let registry = Registry::new(metrics.clone());
        let tasks = Arc::new(ServerTasks {
            draining: shutdown.clone(),
            ..ServerTasks::default()
        });
        let shutdown_grace = self.config.shutdown_grace;
        #[cfg(feature = "etcd")]
        let registration = match &self.registry {
            Some(r) => Some(Registration::start(
                r,
                router.service_names(),
                local_addr,
                self.config.tls.is_some(),
                &shutdown,
            )?),
            None => None,
        };
        let accept = AcceptLoop {
            tls,
            registry: registry.clone(),
            listener,
            dispatch: DispatchShared {
                service,
                stateless: !self.layered,
                limit: Arc::new(Semaphore::new(self.config.max_concurrent_requests)),
                metrics,
                router,
                max_request_duration: self.config.max_request_duration,
                tasks: tasks.clone(),
                codec: crate::dispatch::ServerCodec {
                    respond: self.config.compression,
                    min_size: self.config.connection.compression_min_size as usize,
                    limit: self.config.connection.max_frame_size as usize,
                },
            },
            connections: Arc::new(Semaphore::new(self.config.max_connections)),
            refusing: Arc::new(Semaphore::new(MAX_REFUSING)),
            config: self.config,
            events: events.clone(),
            shutdown: shutdown.clone(),
            drain: CancellationToken::new(),
            kill: kill.clone(),
            tasks: TaskTracker::new(),
        };
        let join = tokio::spawn(accept.run().instrument(tracing::info_span!("server", %local_addr)));
        Ok(ServerHandle {
            local_addr,
            events,
            shutdown,
            kill,
            registry,
            shutdown_grace,
            tasks,
            join: Some(join),
            health: self.health,
            #[cfg(feature = "etcd")]
            registration,
        })
    }
}

/// A server's registration task and how to end it.
#[cfg(feature = "etcd")]
#[derive(Debug)]
struct Registration {
    /// Cancelled to start the lame-duck shutdown: the task deregisters, waits, then cancels the
    /// server's graceful shutdown.
    lame_duck: CancellationToken,
    state: tokio::sync::watch::Receiver<crate::registry::RegistrationState>,
    task: JoinHandle<()>,
    /// The advertised address (the registration gauge's label).
    addr: SocketAddr,
}

#[cfg(feature = "etcd")]
impl Registration {
    fn start(
        config: &rpc_core::registry::RegistryConfig,
        services: Vec<String>,
        local_addr: SocketAddr,
        tls: bool,
        shutdown: &CancellationToken,
    ) -> Result<Self, ServerError> {
        config.validate()?;
        let instance = crate::registry::instance(config, local_addr, tls).map_err(ServerError::Registry)?;
        let addr = instance.addr;
        let (state_tx, state) =
            tokio::sync::watch::channel(crate::registry::RegistrationState::Unregistered { last_error: None });
        let registrar = crate::registry::Registrar {
            config: config.clone(),
            services,
            instance,
            state: state_tx,
        };
        let lame_duck = CancellationToken::new();
        let task = tokio::spawn(
            registrar
                .run(lame_duck.clone(), shutdown.clone())
                .instrument(tracing::info_span!("registry", %local_addr)),
        );
        Ok(Registration {
            lame_duck,
            state,
            task,
            addr,
        })
    }
}

/// A running server. Dropping it starts a graceful shutdown in the background, so keep it for as
/// long as the server should serve (or use [`ServerBuilder::serve_with_shutdown`]).
#[derive(Debug)]
#[must_use = "dropping the ServerHandle shuts the server down at once; keep it, or use serve_with_shutdown"]
pub struct ServerHandle {
    local_addr: SocketAddr,
    events: EventSender,
    shutdown: CancellationToken,
    kill: CancellationToken,
    registry: Registry,
    shutdown_grace: Duration,
    /// Every handler and detached task holds a token of its tracker (see [`ServerHandle::abort`]).
    tasks: Arc<ServerTasks>,
    join: Option<JoinHandle<()>>,
    health: Option<crate::health::HealthReporter>,
    #[cfg(feature = "etcd")]
    registration: Option<Registration>,
}

/// The open connections of a server and the latest to close, for inspection; and its request
/// counts.
#[derive(Debug, Clone)]
struct Registry(Arc<RegistryInner>);

#[derive(Debug)]
struct RegistryInner {
    open: Mutex<HashMap<u64, OpenConnection>>,
    closes: Mutex<std::collections::VecDeque<ServerClose>>,
    metrics: Arc<RequestMetrics>,
}

/// How many closed connections a server remembers ([`ServerView::recent_closes`]).
pub const RECENT_CLOSES: usize = 64;

/// An open connection of a server ([`ServerView::open_connections`]).
#[derive(Debug, Clone)]
pub struct OpenConnection {
    /// Its handle (state, requests in flight, heartbeats, bytes).
    pub handle: ConnectionHandle,
    /// Who connected (`None` only for a stream that is not TCP).
    pub peer: Option<SocketAddr>,
}

/// A connection a server had, and why it closed ([`ServerView::recent_closes`]).
#[derive(Debug, Clone)]
pub struct ServerClose {
    /// Its connection id.
    pub id: u64,
    /// Who had connected.
    pub peer: Option<SocketAddr>,
    /// Why it closed.
    pub reason: rpc_core::CloseReason,
    /// When it closed.
    pub at: tokio::time::Instant,
    /// How long it had been open.
    pub age: Duration,
    /// Bytes read from it and written to it.
    pub bytes: (u64, u64),
}

impl Registry {
    fn new(metrics: Arc<RequestMetrics>) -> Self {
        Registry(Arc::new(RegistryInner {
            open: Mutex::default(),
            closes: Mutex::default(),
            metrics,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, OpenConnection>> {
        self.0.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn handles(&self) -> Vec<ConnectionHandle> {
        self.lock().values().map(|c| c.handle.clone()).collect()
    }

    /// Forgets connection `id`, remembering why it closed.
    fn closed(&self, id: u64, reason: rpc_core::CloseReason) {
        let Some(conn) = self.lock().remove(&id) else { return };
        let at = tokio::time::Instant::now();
        let h = &conn.handle;
        let close = ServerClose {
            id,
            peer: conn.peer,
            reason,
            at,
            age: at.saturating_duration_since(h.opened_at()),
            bytes: (h.bytes_read(), h.bytes_written()),
        };
        let mut closes = self.0.closes.lock().unwrap_or_else(|e| e.into_inner());
        if closes.len() == RECENT_CLOSES {
            closes.pop_front();
        }
        closes.push_back(close);
    }
}

/// A cloneable view of a running server's connections and request counts, for an admin page or a
/// health probe that outlives the borrow of its [`ServerHandle`] (`ServerHandle::view`). Each
/// look takes the registry's lock once; it reads what the server keeps anyway.
#[derive(Debug, Clone)]
pub struct ServerView {
    local_addr: SocketAddr,
    registry: Registry,
}

impl ServerView {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The connections open right now.
    pub fn connections(&self) -> Vec<ConnectionHandle> {
        self.registry.handles()
    }

    /// The connections open right now, with who is at the other end, by id.
    pub fn open_connections(&self) -> Vec<OpenConnection> {
        let mut open: Vec<OpenConnection> = self.registry.lock().values().cloned().collect();
        open.sort_by_key(|c| c.handle.id());
        open
    }

    /// The latest connections to close (at most [`RECENT_CLOSES`]), oldest first.
    pub fn recent_closes(&self) -> Vec<ServerClose> {
        let closes = self.registry.0.closes.lock().unwrap_or_else(|e| e.into_inner());
        closes.iter().cloned().collect()
    }

    /// Requests finished per method (methods it does not serve count as `unknown`), with their
    /// latency from arrival to answer.
    pub fn methods(&self) -> Vec<rpc_core::metrics::MethodStats> {
        self.registry.0.metrics.methods()
    }
}

impl ServerHandle {
    /// The connections open right now (state, requests in flight, bytes waiting to be written).
    pub fn connections(&self) -> Vec<ConnectionHandle> {
        self.registry.handles()
    }

    /// A view of the connections that can be kept and cloned (see [`ServerView`]).
    pub fn view(&self) -> ServerView {
        ServerView {
            local_addr: self.local_addr,
            registry: self.registry.clone(),
        }
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Subscribes to connection events (bounded: a slow subscriber lags rather than blocking).
    pub fn events(&self) -> broadcast::Receiver<ConnectionEvent> {
        self.events.subscribe()
    }

    /// The health service's statuses, for a server built with [`ServerBuilder::health`].
    pub fn health(&self) -> Option<&crate::health::HealthReporter> {
        self.health.as_ref()
    }

    fn report_stopping(&self) {
        if let Some(h) = &self.health {
            h.stopping();
        }
    }

    /// Where the registration stands, for a server built with
    /// [`ServerBuilder::registry`] (a receiver: `borrow` it, or wait for `changed`).
    #[cfg(feature = "etcd")]
    pub fn registration(&self) -> Option<tokio::sync::watch::Receiver<crate::registry::RegistrationState>> {
        self.registration.as_ref().map(|r| r.state.clone())
    }

    /// Graceful shutdown: stop accepting (new connections are refused), send GOAWAY on every
    /// connection, let requests in flight (and [detached](crate::detach) work) finish within
    /// `shutdown_grace`, close; handlers still running then are cancelled and dropped. Returns
    /// when every connection and handler is gone.
    ///
    /// A registered server deregisters first and waits its lame-duck period before the GOAWAY.
    /// With the health service, every status turns NOT_SERVING first of all.
    pub async fn shutdown(mut self) {
        self.report_stopping();
        // Kept in the handle while it runs: if this future is dropped mid-way, the handle's drop
        // leaves the GOAWAY to the registration task, after the keys are gone.
        #[cfg(feature = "etcd")]
        if let Some(r) = self.registration.as_mut() {
            r.lame_duck.cancel();
            let _ = (&mut r.task).await;
            self.registration = None;
        }
        let grace_ends = tokio::time::Instant::now() + self.shutdown_grace;
        self.shutdown.cancel();
        self.finish(Some(grace_ends)).await;
    }

    /// Stops at once, like a killed process: the listener and every connection are dropped
    /// without GOAWAY, and every running handler (oneway and detached work too) is cancelled and
    /// dropped: it stops at its next `.await`. Returns when they are all gone.
    ///
    /// A registered server stops renewing its lease without deregistering, as a crashed one
    /// would: it leaves the registry when the lease expires.
    pub async fn abort(mut self) {
        // Only the kill token: the graceful one would let drivers send GOAWAY first.
        self.kill.cancel();
        #[cfg(feature = "etcd")]
        if let Some(r) = self.registration.take() {
            r.task.abort();
            crate::registry::set_gauge(r.addr, 0.0);
        }
        self.finish(None).await;
    }

    /// Waits for the connections, then for the work not tied to one (oneway handlers, detached
    /// tasks) until `grace_ends`, then stops that too and waits for it to be gone.
    async fn finish(&mut self, grace_ends: Option<tokio::time::Instant>) {
        if let Some(join) = self.join.take() {
            let _ = join.await;
        }
        // The connections are gone, and with them their requests' cancellations: each of their
        // handlers ends at its next poll.
        self.tasks.tracker.close();
        if let Some(at) = grace_ends {
            let _ = tokio::time::timeout_at(at, self.tasks.tracker.wait()).await;
        }
        self.tasks.stop.cancel();
        self.tasks.tracker.wait().await;
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.report_stopping();
        // Registered: the registration task deregisters first, then starts the shutdown (unless it
        // is gone already, after a panic).
        #[cfg(feature = "etcd")]
        if let Some(r) = self.registration.take() {
            r.lame_duck.cancel();
            if !r.task.is_finished() {
                return;
            }
        }
        self.shutdown.cancel();
    }
}

struct AcceptLoop {
    tls: Option<tokio_rustls::TlsAcceptor>,
    registry: Registry,
    listener: TcpListener,
    config: ServerConfig,
    /// What every connection's dispatcher shares (the stack, limits, metrics, handlers).
    dispatch: DispatchShared,
    connections: Arc<Semaphore>,
    /// Refused connections being told why (see [`MAX_REFUSING`]).
    refusing: Arc<Semaphore>,
    events: EventSender,
    shutdown: CancellationToken,
    /// Cancelled by the loop once the listener is closed, after `shutdown`: the connections send
    /// their GOAWAY only then, so a client that has read one is refused a new connection.
    drain: CancellationToken,
    kill: CancellationToken,
    tasks: TaskTracker,
}

impl AcceptLoop {
    async fn run(self) {
        let mut backoff = Duration::from_millis(5);
        loop {
            let accepted = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                _ = self.kill.cancelled() => break,
                r = self.listener.accept() => r,
            };
            match accepted {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(5);
                    self.start_connection(stream, peer);
                }
                Err(e) => {
                    // Out of descriptors or memory: back off instead of spinning; the listener stays.
                    tracing::warn!(error = %e, ?backoff, "accept failed");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
        drop(self.listener);
        self.drain.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    fn start_connection(&self, stream: TcpStream, peer: SocketAddr) {
        let Ok(permit) = self.connections.clone().try_acquire_owned() else {
            metrics::counter!(CONNECTIONS_REFUSED).increment(1);
            tracing::warn!(%peer, max = self.config.max_connections, "max_connections reached; connection refused");
            // Told why in a tracked task (shutdown waits for it), bounded in number: past
            // MAX_REFUSING at once, a refused connection is closed without a word.
            if let Ok(slot) = self.refusing.clone().try_acquire_owned() {
                let tls = self.tls.clone();
                let handshake_timeout = self
                    .config
                    .tls
                    .as_ref()
                    .map_or(Duration::from_secs(10), |t| t.handshake_timeout);
                let kill = self.kill.clone();
                self.tasks.spawn(async move {
                    let _slot = slot;
                    tokio::select! {
                        biased;
                        _ = kill.cancelled() => {}
                        _ = refuse(stream, tls, handshake_timeout) => {}
                    }
                });
            }
            return;
        };
        let tcp_options = configure_tcp(&stream, &self.config.tcp);
        let c = &self.config;
        let mut cfg = DriverConfig::new(Side::Server);
        cfg.connection = c.connection;
        cfg.idle_timeout = c.idle_timeout;
        cfg.heartbeat = Some(c.heartbeat);
        cfg.drain_timeout = c.shutdown_grace;
        cfg.tcp_options = tcp_options;
        cfg.peer = Some(peer);
        cfg.events = Some(self.events.clone());
        cfg.shutdown = Some(self.drain.clone());
        cfg.settings = Settings {
            max_frame_size: Some(c.connection.max_frame_size),
            idle_timeout: c.idle_timeout,
            max_concurrent_requests: Some(u32::try_from(c.max_concurrent_requests).unwrap_or(u32::MAX)),
            heartbeat_interval: None,
            max_metadata_entries: Some(u32::try_from(c.connection.max_metadata_entries).unwrap_or(u32::MAX)),
            max_metadata_bytes: Some(u32::try_from(c.connection.max_metadata_bytes).unwrap_or(u32::MAX)),
            max_requests_per_connection: Some(u32::try_from(c.max_requests_per_connection).unwrap_or(u32::MAX)),
            // Without compression, the codecs go unannounced: clients then send plain bodies.
            features: Some(if c.compression {
                rpc_core::frame::features::ALL
            } else {
                rpc_core::frame::features::ALL & !rpc_core::compression::features()
            }),
            version: Some(rpc_core::frame::PROTOCOL_VERSION),
            stream_window: Some(c.connection.stream_window),
            connection_window: Some(c.connection.connection_window),
        };
        let mut dispatch = ServerDispatch::new(&self.dispatch, c.max_requests_per_connection);
        let kill = self.kill.clone().cancelled_owned();
        let registry = self.registry.clone();
        let Some(acceptor) = self.tls.clone() else {
            dispatch.set_peer(rpc_core::Peer::new(peer, None));
            let conn = run_connection(stream, cfg, dispatch, registry);
            self.tasks.spawn(ConnectionTask {
                kill,
                conn,
                _permit: permit,
            });
            return;
        };
        let handshake_timeout = c.tls.as_ref().map_or(Duration::from_secs(10), |t| t.handshake_timeout);
        // The handshake runs here, in the connection's task, never in the accept loop.
        let conn = async move {
            match Box::pin(tokio::time::timeout(handshake_timeout, acceptor.accept(stream))).await {
                // Boxed: a TLS connection's state is large, and inline it would size the
                // task of every plain connection too.
                Ok(Ok(tls_stream)) => {
                    let certs = tls_stream.get_ref().1.peer_certificates().map(|c| c.to_vec());
                    dispatch.set_peer(rpc_core::Peer::new(peer, certs));
                    Box::pin(run_connection(tls_stream, cfg, dispatch, registry)).await
                }
                Ok(Err(e)) => {
                    metrics::counter!(TLS_HANDSHAKE_FAILURES).increment(1);
                    tracing::warn!(%peer, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    metrics::counter!(TLS_HANDSHAKE_FAILURES).increment(1);
                    tracing::warn!(%peer, ?handshake_timeout, "TLS handshake timed out");
                }
            }
        };
        self.tasks.spawn(ConnectionTask {
            kill,
            conn,
            _permit: permit,
        });
    }
}

pin_project_lite::pin_project! {
    /// A connection's task: it ends when the connection does, or when the server is killed (which
    /// drops the connection mid-run), then gives back its `max_connections` permit. Written by
    /// hand, as is [`Served`], because an idle connection's memory is mostly its task: an `async`
    /// block or `select!` would hold the driver a second time (moved into it, then into the
    /// future it awaits), as `run_connection` did when it was an `async fn` (7 KiB a connection
    /// instead of 2).
    struct ConnectionTask<F> {
        #[pin]
        kill: tokio_util::sync::WaitForCancellationFutureOwned,
        #[pin]
        conn: F,
        _permit: tokio::sync::OwnedSemaphorePermit,
    }
}

impl<F: std::future::Future<Output = ()>> std::future::Future for ConnectionTask<F> {
    type Output = ();

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let this = self.project();
        if this.kill.poll(cx).is_ready() {
            return std::task::Poll::Ready(());
        }
        this.conn.poll(cx)
    }
}

/// One connection's driver over a plain or TLS stream, listed in the registry while it runs.
fn run_connection<S>(
    stream: S,
    cfg: DriverConfig,
    dispatch: ServerDispatch,
    registry: Registry,
) -> Served<impl std::future::Future<Output = rpc_core::CloseReason>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let peer = cfg.peer;
    let (handle, driver) = Driver::server(stream, cfg, dispatch);
    let id = handle.id();
    registry.lock().insert(id, OpenConnection { handle, peer });
    let span = tracing::info_span!("conn", id, peer = ?peer);
    Served {
        run: driver.run().instrument(span),
        // Listed until it returns, or until `abort` drops it mid-run.
        listed: Listed {
            registry,
            id,
            reason: None,
        },
    }
}

pin_project_lite::pin_project! {
    /// A connection's driver running, and its place in the registry (dropped after the driver).
    struct Served<F> {
        #[pin]
        run: F,
        listed: Listed,
    }
}

impl<F: std::future::Future<Output = rpc_core::CloseReason>> std::future::Future for Served<F> {
    type Output = ();

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let this = self.project();
        let reason = std::task::ready!(this.run.poll(cx));
        tracing::debug!(id = this.listed.id, %reason, "closed");
        this.listed.reason = Some(reason);
        std::task::Poll::Ready(())
    }
}

/// Removes a connection from its server's registry when its task ends, however it ends.
struct Listed {
    registry: Registry,
    id: u64,
    /// Why it closed; `None` while it runs (so a drop before it returns was `abort`'s).
    reason: Option<rpc_core::CloseReason>,
}

impl Drop for Listed {
    fn drop(&mut self) {
        let reason = self.reason.take().unwrap_or(rpc_core::CloseReason::Local);
        self.registry.closed(self.id, reason);
    }
}

/// How many refused connections may be told why at once; more are closed without a word.
const MAX_REFUSING: usize = 1024;

/// Tells a connection over `max_connections` why it is refused (SETTINGS, then GOAWAY(overloaded)),
/// over TLS after the TLS handshake (a TLS client would read plaintext as a TLS error), half-closes,
/// and reads what the client sent for at most 500 ms so the close does not become an RST that
/// destroys the GOAWAY. It holds no connection permit; the whole exchange is bounded in time.
async fn refuse(stream: TcpStream, tls: Option<tokio_rustls::TlsAcceptor>, handshake_timeout: Duration) {
    let codec = rpc_core::codec::FrameCodec::default();
    let mut buf = bytes::BytesMut::new();
    let goaway = rpc_core::frame::GoAway {
        reason: rpc_core::GoAwayReason::Overloaded,
        last_request_id: 0,
        message: "max_connections reached".into(),
    };
    let frames = [
        rpc_core::frame::Frame::Settings(Settings::default()),
        rpc_core::frame::Frame::GoAway(goaway),
    ];
    if !frames.iter().all(|f| codec.encode_frame(f, &mut buf).is_ok()) {
        return;
    }
    match tls {
        None => tell_and_linger(stream, &buf).await,
        Some(acceptor) => {
            if let Ok(Ok(tls_stream)) = tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                tell_and_linger(tls_stream, &buf).await;
            }
        }
    }
}

async fn tell_and_linger<S>(mut stream: S, frames: &[u8])
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        stream.write_all(frames).await?;
        stream.shutdown().await?;
        let mut scratch = [0u8; 1024];
        while stream.read(&mut scratch).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// Binds the first of `addr`'s addresses that binds (as `TcpListener::bind`: SO_REUSEADDR on
/// Unix) and listens with `backlog`.
async fn listen(addr: impl ToSocketAddrs, backlog: u32) -> std::io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        #[cfg(unix)]
        socket.set_reuseaddr(true)?;
        match socket.bind(a).and_then(|()| socket.listen(backlog)) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to bind")))
}
