//! Configuration shared by client and server: heartbeats, TCP options and per-connection limits.
//! Plain structs with `Default`; each field documents its default and why.

use std::time::Duration;

use crate::codec::{DEFAULT_MAX_FRAME_SIZE, DEFAULT_MAX_METADATA_BYTES, DEFAULT_MAX_METADATA_ENTRIES};

/// Client heartbeats. Worst-case detection of a silent peer: `interval + max_failures × timeout`
/// after the last frame was read (see [`crate::liveness`]). With the defaults, 18 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default, deny_unknown_fields)
)]
pub struct HeartbeatConfig {
    /// Send heartbeats at all. Default `true`.
    pub enabled: bool,
    /// Read-idle time before a heartbeat is sent. Default 15 s, as SOFABolt's client idle time.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub interval: Duration,
    /// How long to wait for any inbound frame after a heartbeat before counting a failure.
    /// Default 1 s, as SOFABolt's heartbeat timeout. Must be below `interval`.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub timeout: Duration,
    /// Consecutive failures that close the connection. Default 3, as SOFABolt's max count.
    pub max_failures: u32,
    /// Not a setting: struct literals outside tether must end in `..Default::default()` (or
    /// start from a constructor), so adding a setting is not a breaking change.
    #[doc(hidden)]
    #[cfg_attr(feature = "serde", serde(skip))]
    pub __non_exhaustive: (),
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            enabled: true,
            interval: Duration::from_secs(15),
            timeout: Duration::from_secs(1),
            max_failures: 3,
            __non_exhaustive: (),
        }
    }
}

impl HeartbeatConfig {
    /// Heartbeats off.
    pub fn disabled() -> Self {
        HeartbeatConfig {
            enabled: false,
            ..Default::default()
        }
    }

    /// The documented worst-case time from the last frame read to a `HeartbeatTimeout` close.
    pub fn detection_bound(&self) -> Duration {
        self.interval + self.timeout * self.max_failures
    }
}

/// TCP keepalive probes (SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default, deny_unknown_fields)
)]
pub struct KeepaliveConfig {
    /// Idle time before the first probe. Default 30 s: well below common NAT idle timeouts (about 5 min).
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub time: Duration,
    /// Time between probes. Default 10 s.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub interval: Duration,
    /// Unanswered probes before the kernel drops the connection. Default 3.
    pub retries: u32,
    /// Not a setting: struct literals outside tether must end in `..Default::default()` (or
    /// start from a constructor), so adding a setting is not a breaking change.
    #[doc(hidden)]
    #[cfg_attr(feature = "serde", serde(skip))]
    pub __non_exhaustive: (),
}

impl Default for KeepaliveConfig {
    fn default() -> Self {
        KeepaliveConfig {
            time: Duration::from_secs(30),
            interval: Duration::from_secs(10),
            retries: 3,
            __non_exhaustive: (),
        }
    }
}

/// Socket options applied through socket2 to every connected and accepted socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default, deny_unknown_fields)
)]
pub struct TcpConfig {
    /// TCP_NODELAY. Default `true`: tether coalesces writes itself, Nagle only adds latency.
    pub nodelay: bool,
    /// TCP keepalive; `None` leaves it off (`"off"` in a config file). Default on, see
    /// [`KeepaliveConfig`].
    #[cfg_attr(feature = "serde", serde(with = "off"))]
    pub keepalive: Option<KeepaliveConfig>,
    /// TCP_USER_TIMEOUT (Linux): unacknowledged data older than this ends the connection, where the
    /// kernel default retransmits for about 15 minutes. `None` keeps the kernel default. Default 30 s.
    #[cfg_attr(feature = "serde", serde(with = "off::duration"))]
    pub user_timeout: Option<Duration>,
    /// SO_SNDBUF; `None` keeps the kernel's autotuning. Default `None`.
    pub send_buffer_size: Option<usize>,
    /// SO_RCVBUF; `None` keeps the kernel's autotuning. Default `None`.
    pub recv_buffer_size: Option<usize>,
    /// Not a setting: struct literals outside tether must end in `..Default::default()` (or
    /// start from a constructor), so adding a setting is not a breaking change.
    #[doc(hidden)]
    #[cfg_attr(feature = "serde", serde(skip))]
    pub __non_exhaustive: (),
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            nodelay: true,
            keepalive: Some(KeepaliveConfig::default()),
            user_timeout: Some(Duration::from_secs(30)),
            send_buffer_size: None,
            recv_buffer_size: None,
            __non_exhaustive: (),
        }
    }
}

/// Limits of one connection, the same on both sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default, deny_unknown_fields)
)]
pub struct ConnectionConfig {
    /// Largest frame body accepted. Default 4 MiB, gRPC's default maximum receive message size.
    pub max_frame_size: u32,
    /// Most metadata entries accepted in one frame. Default 64.
    pub max_metadata_entries: usize,
    /// Most bytes of metadata keys and values accepted in one frame. Default 16 KiB, as common
    /// HTTP/2 header-list limits.
    pub max_metadata_bytes: usize,
    /// Encoded bytes buffered for writing before the connection stops taking frames from its
    /// outbound queue; senders then wait (backpressure). Default 1 MiB.
    pub max_outbound_bytes: usize,
    /// Frames queued for the connection's I/O task. Default 1024; senders wait when it is full.
    pub outbound_queue: usize,
    /// A peer that does not read what this side writes is a slow consumer (closed with
    /// `SlowConsumer`) once its backlog has drained slower than `min_send_rate` for this long: a
    /// leaky bucket of this many seconds of credit, spent by time and earned by the bytes the
    /// socket takes, full again whenever the buffer empties. So a peer reading nothing is closed
    /// this long after bytes start waiting, and a trickle reader about this long after it falls
    /// behind. Default 10 s.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub write_stall_timeout: Duration,
    /// The slowest a peer may read while bytes wait for it, in bytes per second (see
    /// `write_stall_timeout`). `0`: any progress counts. Default 1 KiB/s.
    pub min_send_rate: u32,
    /// A connection whose peer has not completed its SETTINGS within this time is closed with
    /// `HandshakeTimeout`, so a connection that never speaks holds no `max_connections` slot for
    /// long. Default 5 s.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub handshake_timeout: Duration,
    /// How long a partially received frame may arrive at any speed before its bytes must keep
    /// up with `min_receive_rate`. Default 5 s, as Kestrel's MinRequestBodyDataRate grace period.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub partial_frame_grace: Duration,
    /// A partial frame whose bytes do not keep up with this many bytes per second closes the
    /// connection with `PartialFrameTimeout` (slowloris). Judged as a leaky bucket: the frame
    /// starts with `partial_frame_grace` of credit, each byte earns `1 / min_receive_rate`
    /// seconds, never more than the grace in hand, so early bytes buy no late silence. A large
    /// frame on a slow but moving link is never cut off. `0` turns the check off. Default
    /// 240 B/s, as Kestrel's MinRequestBodyDataRate.
    pub min_receive_rate: u32,
    /// Bytes of a stream's messages this side buffers for its application before the sender must
    /// wait (the stream's flow-control window, announced in SETTINGS). Credit goes back as the
    /// application consumes, in batches of half the window. Default 256 KiB: enough for a
    /// loopback stream of 16 KiB messages to run without waiting on credit.
    pub stream_window: u32,
    /// Bytes of all streams' messages this side buffers for its applications, on one connection.
    /// Default 4 MiB: sixteen fully stalled streams before the others share what is left.
    pub connection_window: u32,
    /// A stream whose receiver grants no credit for this long while this side has a message to
    /// send is reset (the producer's `send` fails with `SendError::Stalled`; the connection and its
    /// other streams go on). `None`: a stalled stream waits for ever (its memory stays bounded by
    /// its window). Default 30 s.
    #[cfg_attr(feature = "serde", serde(with = "off::duration"))]
    pub stream_stall_timeout: Option<Duration>,
    /// A stream on which no message has moved either way for this long is reset by this side
    /// (DEADLINE_EXCEEDED, "stream idle"; the connection and its other streams go on), between
    /// this and 1.25 times this after its last message. For subscriptions that should never fall
    /// silent, and to reclaim streams a peer forgot. `None` (the default): a stream may be
    /// quiet for ever (its connection's heartbeats still run).
    #[cfg_attr(feature = "serde", serde(with = "off::duration"))]
    pub stream_idle_timeout: Option<Duration>,
    /// Message bodies smaller than this are never compressed (see `crate::compression`):
    /// compressing them costs more than it saves. Default 1 KiB.
    pub compression_min_size: u32,
    /// Not a setting: struct literals outside tether must end in `..Default::default()` (or
    /// start from a constructor), so adding a setting is not a breaking change.
    #[doc(hidden)]
    #[cfg_attr(feature = "serde", serde(skip))]
    pub __non_exhaustive: (),
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            max_metadata_entries: DEFAULT_MAX_METADATA_ENTRIES,
            max_metadata_bytes: DEFAULT_MAX_METADATA_BYTES,
            max_outbound_bytes: 1024 * 1024,
            outbound_queue: 1024,
            write_stall_timeout: Duration::from_secs(10),
            min_send_rate: 1024,
            handshake_timeout: Duration::from_secs(5),
            partial_frame_grace: Duration::from_secs(5),
            min_receive_rate: 240,
            stream_window: 256 * 1024,
            connection_window: 4 * 1024 * 1024,
            stream_stall_timeout: Some(Duration::from_secs(30)),
            stream_idle_timeout: None,
            compression_min_size: 1024,
            __non_exhaustive: (),
        }
    }
}

/// A contradiction or out-of-range value in a configuration, found when it is built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The heartbeat timeout must be below the interval, or heartbeats would overlap.
    #[error("heartbeat timeout {timeout:?} must be below the heartbeat interval {interval:?}")]
    HeartbeatTimeoutNotBelowInterval {
        /// The timeout.
        timeout: Duration,
        /// The interval.
        interval: Duration,
    },
    /// The server's idle timeout must be above the client's heartbeat interval, or it evicts idle
    /// clients before they send a heartbeat.
    #[error("server idle timeout {idle_timeout:?} must be above the client heartbeat interval {interval:?}")]
    IdleTimeoutNotAboveHeartbeat {
        /// The server's idle timeout.
        idle_timeout: Duration,
        /// The client's heartbeat interval.
        interval: Duration,
    },
    /// A duration or count that must be positive was zero.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    /// A value outside its allowed range.
    #[error("{field} is out of range: {why}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// Why.
        why: &'static str,
    },
}

impl HeartbeatConfig {
    /// Checks the heartbeat settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        if self.interval.is_zero() {
            return Err(ConfigError::Zero("heartbeat.interval"));
        }
        if self.timeout.is_zero() {
            return Err(ConfigError::Zero("heartbeat.timeout"));
        }
        if self.max_failures == 0 {
            return Err(ConfigError::Zero("heartbeat.max_failures"));
        }
        if self.timeout >= self.interval {
            return Err(ConfigError::HeartbeatTimeoutNotBelowInterval {
                timeout: self.timeout,
                interval: self.interval,
            });
        }
        Ok(())
    }
}

impl ConnectionConfig {
    /// Checks the connection limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_frame_size < 64 {
            return Err(ConfigError::OutOfRange {
                field: "max_frame_size",
                why: "must be at least 64 bytes",
            });
        }
        if self.outbound_queue == 0 {
            return Err(ConfigError::Zero("outbound_queue"));
        }
        if self.max_outbound_bytes == 0 {
            return Err(ConfigError::Zero("max_outbound_bytes"));
        }
        if self.write_stall_timeout.is_zero() {
            return Err(ConfigError::Zero("write_stall_timeout"));
        }
        if self.handshake_timeout.is_zero() {
            return Err(ConfigError::Zero("handshake_timeout"));
        }
        if self.partial_frame_grace.is_zero() {
            return Err(ConfigError::Zero("partial_frame_grace"));
        }
        const MAX_WINDOW: u32 = (1 << 31) - 1;
        if !(1024..=MAX_WINDOW).contains(&self.stream_window) {
            return Err(ConfigError::OutOfRange {
                field: "stream_window",
                why: "must be between 1 KiB and 2^31 - 1 bytes",
            });
        }
        if self.connection_window < self.stream_window || self.connection_window > MAX_WINDOW {
            return Err(ConfigError::OutOfRange {
                field: "connection_window",
                why: "must be at least stream_window and at most 2^31 - 1 bytes",
            });
        }
        if self.stream_idle_timeout.is_some_and(|t| t.is_zero()) {
            return Err(ConfigError::Zero("stream_idle_timeout"));
        }
        if self.stream_stall_timeout.is_some_and(|t| t.is_zero()) {
            return Err(ConfigError::Zero("stream_stall_timeout"));
        }
        Ok(())
    }
}

/// Checks a server idle timeout against a client heartbeat policy, when both are known (a
/// deployment's config file holding both, or a client reading the server's handshake).
pub fn check_idle_vs_heartbeat(idle_timeout: Option<Duration>, heartbeat: &HeartbeatConfig) -> Result<(), ConfigError> {
    match idle_timeout {
        Some(idle) if heartbeat.enabled && idle <= heartbeat.interval => {
            Err(ConfigError::IdleTimeoutNotAboveHeartbeat {
                idle_timeout: idle,
                interval: heartbeat.interval,
            })
        }
        _ => Ok(()),
    }
}

/// Serde helpers for optional settings that a config file must be able to turn off: `None` is
/// written `"off"` (so a round trip keeps it off, where omitting it would bring the default back),
/// and `"off"` reads as `None`.
#[cfg(feature = "serde")]
pub mod off {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    const OFF: &str = "off";

    /// `Option<Duration>` as a human-readable duration (`"15s"`, `"1m 30s"`) or `"off"`.
    pub mod duration {
        use super::*;

        /// Writes `"off"` or the duration.
        pub fn serialize<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                None => s.serialize_str(OFF),
                Some(d) => s.collect_str(&humantime::format_duration(*d)),
            }
        }

        /// Reads `"off"` or a duration.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
            if text.trim().eq_ignore_ascii_case(OFF) {
                return Ok(None);
            }
            humantime::parse_duration(text.trim())
                .map(Some)
                .map_err(|e| serde::de::Error::custom(format!("{text:?} is neither a duration nor \"off\": {e}")))
        }
    }

    /// The string `"off"` and nothing else.
    struct Off;

    impl<'de> Deserialize<'de> for Off {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
            if text.trim().eq_ignore_ascii_case(OFF) {
                Ok(Off)
            } else {
                Err(serde::de::Error::custom("not \"off\""))
            }
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OffOr<T> {
        Off(Off),
        Value(T),
    }

    /// `Option<T>` as `T` (a table, or what `T` reads) or `"off"`.
    pub fn serialize<T: Serialize, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            None => s.serialize_str(OFF),
            Some(t) => t.serialize(s),
        }
    }

    /// Reads `"off"` or a `T`.
    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(d: D) -> Result<Option<T>, D::Error> {
        match OffOr::<T>::deserialize(d) {
            Ok(OffOr::Off(Off)) => Ok(None),
            Ok(OffOr::Value(t)) => Ok(Some(t)),
            Err(_) => Err(serde::de::Error::custom(format!(
                "expected \"off\" or a {}",
                std::any::type_name::<T>().rsplit("::").next().unwrap_or("value")
            ))),
        }
    }
}
