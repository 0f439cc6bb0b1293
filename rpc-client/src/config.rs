//! Client configuration.

use std::time::Duration;

use rpc_core::config::{ConfigError, ConnectionConfig, HeartbeatConfig, TcpConfig};

/// Client settings. Plain struct with `Default`; checked by [`ClientConfig::validate`] when a client
/// is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// Per connection attempt, TCP connect plus handshake; also capped by the request's remaining
    /// deadline. Default 1 s, as SOFABolt's connect timeout: a short bound keeps a dead switch from
    /// tying up callers.
    pub connect_timeout: Duration,
    /// Deadline for a request that sets none. Default 3 s, as SOFARPC's invoke timeout.
    pub request_timeout: Duration,
    /// Multiplexed connections kept to each endpoint. Default 1: one connection carries many
    /// requests at once.
    pub connections_per_endpoint: usize,
    /// Attempts for a request that provably did not run (never written, GOAWAY above its id,
    /// SERVER_BUSY), all within its deadline. Default 3.
    pub max_attempts: u32,
    /// Heartbeats on idle connections.
    pub heartbeat: HeartbeatConfig,
    /// Per-connection limits.
    pub connection: ConnectionConfig,
    /// Socket options.
    pub tcp: TcpConfig,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(3),
            connections_per_endpoint: 1,
            max_attempts: 3,
            heartbeat: HeartbeatConfig::default(),
            connection: ConnectionConfig::default(),
            tcp: TcpConfig::default(),
        }
    }
}

impl ClientConfig {
    /// Checks the settings for values that cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.connect_timeout.is_zero() {
            return Err(ConfigError::Zero("connect_timeout"));
        }
        if self.request_timeout.is_zero() {
            return Err(ConfigError::Zero("request_timeout"));
        }
        if self.connections_per_endpoint == 0 {
            return Err(ConfigError::Zero("connections_per_endpoint"));
        }
        if self.max_attempts == 0 {
            return Err(ConfigError::Zero("max_attempts"));
        }
        self.heartbeat.validate()?;
        self.connection.validate()
    }
}
