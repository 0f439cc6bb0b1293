//! Server configuration.

use std::time::Duration;

use rpc_core::config::{ConfigError, ConnectionConfig, HeartbeatConfig, TcpConfig};

/// Server settings. Plain struct with `Default`; checked by [`ServerConfig::validate`] when the
/// server is built.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default, deny_unknown_fields)
)]
pub struct ServerConfig {
    /// A connection that sends nothing for this long gets GOAWAY(idle) and is closed. `None`: never.
    /// Default 90 s, as SOFABolt's server idle time; it must stay above the clients' heartbeat
    /// interval, and is advertised to clients in the handshake so their pools can avoid it.
    #[cfg_attr(feature = "serde", serde(with = "rpc_core::config::off::duration"))]
    pub idle_timeout: Option<Duration>,
    /// Heartbeats the server sends, only while a connection has handlers or streams in flight
    /// and has read nothing for `heartbeat.interval`: idle eviction waits for that work, so this
    /// is what notices a client that vanished under a running stream or a long handler (closed
    /// as `HeartbeatTimeout` within `interval + max_failures × timeout`, the work cancelled).
    /// Default: on, 15 s / 1 s / 3, as the client's.
    pub heartbeat: HeartbeatConfig,
    /// Connections served at once; the excess is accepted and closed at once. Default 10 000.
    pub max_connections: usize,
    /// The listen backlog of a socket the server binds itself ([`crate::ServerBuilder::bind`]):
    /// connections the kernel completes before the server accepts them. Default 4096 (the
    /// kernel caps it at `net.core.somaxconn`). A burst beyond it (a pool of thousands of
    /// connections dialing at once) is dropped by the kernel after the client saw its handshake
    /// complete: half-open connections that only a heartbeat finds. A listener passed to
    /// [`crate::ServerBuilder::serve`] keeps the backlog it was made with (`TcpListener::bind`: 128).
    pub listen_backlog: u32,
    /// Requests run at once across all connections; over it the server answers SERVER_BUSY at
    /// once rather than queueing. Default 1024.
    pub max_concurrent_requests: usize,
    /// Requests run at once on one connection; over it that connection's requests are answered
    /// SERVER_BUSY, so one client cannot take the whole server-wide limit. Default 256.
    pub max_requests_per_connection: usize,
    /// On graceful shutdown, how long requests in flight may take to finish; the handlers still
    /// running then are dropped. Default 30 s.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub shutdown_grace: Duration,
    /// The deadline of a request that carries none (`timeout_ms = 0` on the wire): no request runs
    /// forever. Default 60 s.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub max_request_duration: Duration,
    /// Per-connection limits (frame size, outbound bytes, write stall, partial frame).
    pub connection: ConnectionConfig,
    /// Socket options for accepted sockets.
    pub tcp: TcpConfig,
    /// TLS; `None` (the default) serves plain TCP.
    pub tls: Option<rpc_core::tls::TlsServerConfig>,
    /// Read and write compressed messages (feature `compression`: gzip and zstd) with clients
    /// that ask: announced to clients, so `false` makes them send plain bodies. Default `true`.
    pub compression: bool,
    /// Not a setting: struct literals outside tether must end in `..Default::default()` (or
    /// start from a constructor), so adding a setting is not a breaking change.
    #[doc(hidden)]
    #[cfg_attr(feature = "serde", serde(skip))]
    pub __non_exhaustive: (),
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            idle_timeout: Some(Duration::from_secs(90)),
            heartbeat: HeartbeatConfig::default(),
            max_connections: 10_000,
            listen_backlog: 4096,
            max_concurrent_requests: 1024,
            max_requests_per_connection: 256,
            shutdown_grace: Duration::from_secs(30),
            max_request_duration: Duration::from_secs(60),
            compression: true,
            connection: ConnectionConfig::default(),
            tcp: TcpConfig::default(),
            tls: None,
            __non_exhaustive: (),
        }
    }
}

impl ServerConfig {
    /// Checks the settings for values that cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.idle_timeout.is_some_and(|t| t.is_zero()) {
            return Err(ConfigError::Zero("idle_timeout"));
        }
        if self.listen_backlog == 0 {
            return Err(ConfigError::Zero("listen_backlog"));
        }
        if self.max_connections == 0 {
            return Err(ConfigError::Zero("max_connections"));
        }
        if self.max_concurrent_requests == 0 {
            return Err(ConfigError::Zero("max_concurrent_requests"));
        }
        if self.max_requests_per_connection == 0 {
            return Err(ConfigError::Zero("max_requests_per_connection"));
        }
        if self.max_request_duration.is_zero() {
            return Err(ConfigError::Zero("max_request_duration"));
        }
        self.heartbeat.validate()?;
        self.connection.validate()
    }
}
