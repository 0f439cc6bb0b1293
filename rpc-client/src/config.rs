//! Client configuration.

use std::time::Duration;

use rpc_core::config::{ConfigError, ConnectionConfig, HeartbeatConfig, TcpConfig};

use crate::backoff::BackoffConfig;
use crate::holder::Balance;

/// Client settings. Plain struct with `Default`; checked by [`ClientConfig::validate`] when a client
/// is built.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default, deny_unknown_fields)
)]
pub struct ClientConfig {
    /// Per connection attempt, TCP connect plus handshake; also capped by the request's remaining
    /// deadline. Default 1 s, as SOFABolt's connect timeout: a short bound keeps a dead switch from
    /// tying up callers.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub connect_timeout: Duration,
    /// Deadline for a request that sets none. Default 3 s, as SOFARPC's invoke timeout.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub request_timeout: Duration,
    /// Multiplexed connections kept to each endpoint. Default 1: one connection carries many
    /// requests at once.
    pub connections_per_endpoint: usize,
    /// Attempts for a request that provably did not run (never written, GOAWAY above its id,
    /// SERVER_BUSY), all within its deadline. Default 3.
    pub max_attempts: u32,
    /// How often the holder's checker validates alive connections and looks for due reconnects
    /// (it also wakes at once when a connection closes or a backoff elapses). Default 10 s.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub check_interval: Duration,
    /// Reconnect backoff. Default 1 s, ×1.6, ±20 %, at most 120 s, as gRPC.
    pub backoff: BackoffConfig,
    /// A resumable stream that breaks is opened again within this long of the break, or its
    /// consumer gets the error. Default 30 s.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub resume_timeout: Duration,
    /// Attempts to open a broken resumable stream again (the first at once, then after the
    /// `backoff` delays), within `resume_timeout`. Default 10.
    pub max_resume_attempts: u32,
    /// Failed connect attempts in a row after which an endpoint is discarded. `None` (the
    /// default): never discard, keep retrying at the maximum backoff.
    pub max_reconnect_attempts: Option<u32>,
    /// Endpoint selection. Default round robin.
    pub balance: Balance,
    /// A pooled connection is not reused once it has been idle (nothing written) for the server's
    /// advertised idle timeout minus this margin (at most a fifth of the timeout is taken).
    /// Default 1 s.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub idle_margin: Duration,
    /// Heartbeats on idle connections.
    pub heartbeat: HeartbeatConfig,
    /// Per-connection limits.
    pub connection: ConnectionConfig,
    /// Socket options.
    pub tcp: TcpConfig,
    /// TLS; `None` (the default) speaks plain TCP. The TLS handshake counts inside `connect_timeout`.
    pub tls: Option<rpc_core::tls::TlsClientConfig>,
    /// Retries (the client's own, and [`crate::SafeRetry`]'s given [`crate::Client::retry_budget`])
    /// at most a fraction of recent requests plus a floor, shared by the client and its clones.
    pub retry_budget: crate::budget::RetryBudgetConfig,
    /// Delay before a request's second and later retries (the first goes to another endpoint at
    /// once: a GOAWAY or a broken connection is that endpoint's problem). Capped by the deadline.
    pub retry_backoff: BackoffConfig,
    /// Hedging of requests marked idempotent: when an attempt has no answer after this delay
    /// (fixed, or its endpoint's observed p95), a second goes to another endpoint (drawn from
    /// `retry_budget`), the first answer wins and the other is cancelled. `None` (the default):
    /// no hedging. In a config file: `"20ms"`, `"p95"`, `"p95>=5ms"` or `"off"`.
    #[cfg_attr(feature = "serde", serde(with = "rpc_core::config::off"))]
    pub hedge_delay: Option<HedgeDelay>,
    /// Compress requests and ask for compressed responses with this codec (feature
    /// `compression`), with servers that read it; bodies under
    /// `connection.compression_min_size` go as they are. `None` (the default): no compression.
    #[cfg_attr(feature = "serde", serde(with = "rpc_core::config::off"))]
    pub compression: Option<rpc_core::compression::Encoding>,
    /// Gray-failure detection: endpoints whose requests fail or time out while their connections
    /// look fine are ejected for a while (see [`crate::holder::OutlierConfig`]). On by default.
    pub outlier: crate::holder::OutlierConfig,
    /// Not a setting: struct literals outside tether must end in `..Default::default()` (or
    /// start from a constructor), so adding a setting is not a breaking change.
    #[doc(hidden)]
    #[cfg_attr(feature = "serde", serde(skip))]
    pub __non_exhaustive: (),
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(3),
            connections_per_endpoint: 1,
            max_attempts: 3,
            check_interval: Duration::from_secs(10),
            backoff: BackoffConfig::default(),
            resume_timeout: Duration::from_secs(30),
            max_resume_attempts: 10,
            max_reconnect_attempts: None,
            balance: Balance::default(),
            idle_margin: Duration::from_secs(1),
            heartbeat: HeartbeatConfig::default(),
            connection: ConnectionConfig::default(),
            tcp: TcpConfig::default(),
            tls: None,
            outlier: crate::holder::OutlierConfig::default(),
            retry_budget: crate::budget::RetryBudgetConfig::default(),
            hedge_delay: None,
            compression: None,
            retry_backoff: BackoffConfig {
                initial: Duration::from_millis(10),
                multiplier: 2.0,
                jitter: 0.2,
                max: Duration::from_millis(200),
                __non_exhaustive: (),
            },
            __non_exhaustive: (),
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
        if self.check_interval.is_zero() {
            return Err(ConfigError::Zero("check_interval"));
        }
        if self.backoff.initial.is_zero() || self.backoff.multiplier < 1.0 || !(0.0..1.0).contains(&self.backoff.jitter)
        {
            return Err(ConfigError::OutOfRange {
                field: "backoff",
                why: "initial must be positive, multiplier at least 1, jitter in [0, 1)",
            });
        }
        if self.max_resume_attempts == 0 {
            return Err(ConfigError::Zero("max_resume_attempts"));
        }
        if self.resume_timeout.is_zero() {
            return Err(ConfigError::Zero("resume_timeout"));
        }
        if self.max_reconnect_attempts == Some(0) {
            return Err(ConfigError::Zero("max_reconnect_attempts"));
        }
        self.heartbeat.validate()?;
        self.outlier.validate()?;
        self.retry_budget.validate()?;
        if self.hedge_delay == Some(HedgeDelay::After(Duration::ZERO)) {
            return Err(ConfigError::Zero("hedge_delay"));
        }
        if self.retry_backoff.multiplier < 1.0 || !(0.0..1.0).contains(&self.retry_backoff.jitter) {
            return Err(ConfigError::OutOfRange {
                field: "retry_backoff",
                why: "multiplier at least 1, jitter in [0, 1)",
            });
        }
        self.connection.validate()
    }
}

impl ClientConfig {
    /// Whether hedging reads each endpoint's p95 (which needs its latencies kept and rotated).
    pub(crate) fn hedges_at_p95(&self) -> bool {
        matches!(self.hedge_delay, Some(HedgeDelay::P95 { .. }))
    }

    /// Checks this config against a server's idle timeout (see
    /// [`rpc_core::config::check_idle_vs_heartbeat`]). The client also checks the idle timeout
    /// each server advertises in its handshake and logs a warning when it is too short.
    pub fn validate_against(&self, server_idle_timeout: Option<Duration>) -> Result<(), ConfigError> {
        rpc_core::config::check_idle_vs_heartbeat(server_idle_timeout, &self.heartbeat)
    }
}

/// When a hedged request sends its second attempt ([`ClientConfig::hedge_delay`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HedgeDelay {
    /// A fixed delay.
    After(Duration),
    /// The first attempt's endpoint's 95th percentile latency (over its answers in the current
    /// outlier interval, or the latest one with at least 20; within a factor 1.5 above), and at
    /// least `at_least`. An endpoint with no such interval yet gets no hedge: nothing says yet
    /// what is slow for it.
    P95 {
        /// The shortest delay.
        at_least: Duration,
    },
}

impl std::fmt::Display for HedgeDelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HedgeDelay::After(d) => write!(f, "{}", humantime::format_duration(*d)),
            HedgeDelay::P95 { at_least } if at_least.is_zero() => f.write_str("p95"),
            HedgeDelay::P95 { at_least } => write!(f, "p95>={}", humantime::format_duration(*at_least)),
        }
    }
}

impl std::str::FromStr for HedgeDelay {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let duration = |d: &str| humantime::parse_duration(d.trim()).map_err(|e| format!("hedge delay {s:?}: {e}"));
        match s.strip_prefix("p95") {
            Some("") => Ok(HedgeDelay::P95 {
                at_least: Duration::ZERO,
            }),
            Some(rest) => match rest.trim_start().strip_prefix(">=") {
                Some(d) => Ok(HedgeDelay::P95 { at_least: duration(d)? }),
                None => Err(format!("hedge delay {s:?}: expected \"p95\" or \"p95>=DURATION\"")),
            },
            None => Ok(HedgeDelay::After(duration(s)?)),
        }
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for HedgeDelay {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for HedgeDelay {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
