//! The service registry's key layout, instance record and configuration, shared by registration
//! (rpc-server, feature `etcd`) and discovery (rpc-client, feature `etcd`).
//!
//! ## Key layout
//!
//! One key per (service, instance), attached to the instance's etcd lease:
//!
//! ```text
//! {prefix}/{service}/{host}:{port}   ->   {"addr":"10.0.0.7:7000","state":"serving",...}
//! ```
//!
//! `prefix` is [`RegistryConfig::prefix`] (default [`DEFAULT_PREFIX`]), `service` the full
//! protobuf name (`echo.v1.Echo`), and the value an [`Instance`] as JSON. A client watches
//! `{prefix}/{service}/`. An instance that shuts down gracefully first rewrites its keys with
//! `"state":"leaving"`, then revokes its lease (which deletes them): watchers stop picking it
//! before it sends GOAWAY, and can tell a deregistration from an instance that vanished (lease
//! expired, key deleted by hand).
//!
//! ```
//! use rpc_core::registry::{instance_key, service_prefix, Instance, InstanceState};
//!
//! let addr = "10.0.0.7:7000".parse().unwrap();
//! assert_eq!(service_prefix("/tether/services", "echo.v1.Echo"), "/tether/services/echo.v1.Echo/");
//! assert_eq!(instance_key("/tether/services", "echo.v1.Echo", addr), "/tether/services/echo.v1.Echo/10.0.0.7:7000");
//! let me = Instance::new(addr);
//! assert_eq!(Instance::decode(&me.encode()).unwrap(), me);
//! assert_eq!(me.state, InstanceState::Serving);
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The key prefix used when [`RegistryConfig::prefix`] is left at its default.
pub const DEFAULT_PREFIX: &str = "/tether/services";

/// `{prefix}/{service}/`: what a client of `service` watches. A trailing `/` on `prefix` is
/// ignored.
pub fn service_prefix(prefix: &str, service: &str) -> String {
    format!("{}/{service}/", prefix.trim_end_matches('/'))
}

/// `{prefix}/{service}/{addr}`: the key one instance registers for one service.
pub fn instance_key(prefix: &str, service: &str, addr: SocketAddr) -> String {
    format!("{}{addr}", service_prefix(prefix, service))
}

/// Whether an instance takes requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Registered and serving.
    Serving,
    /// Shutting down gracefully: take no new requests to it (its keys go next).
    Leaving,
}

/// What an instance publishes about itself, as the JSON value of its keys. Unknown fields are
/// ignored when read, so later versions may add some.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Serving, or leaving (graceful shutdown has begun).
    pub state: InstanceState,
    /// Zone or rack, if configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Relative weight (default 100). Informational: the holder balances by load, not weight.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// The protocol version the instance speaks ([`crate::frame::PROTOCOL_VERSION`]).
    pub protocol_version: u8,
    /// The protocol features it announces (bits of [`crate::frame::features`]).
    pub features: u64,
    /// Whether it serves TLS.
    #[serde(default)]
    pub tls: bool,
    /// Free-form labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

fn default_weight() -> u32 {
    100
}

/// A registry value that is not an [`Instance`].
#[derive(Debug, thiserror::Error)]
#[error("registry value is not a tether instance record: {0}")]
pub struct DecodeError(#[from] serde_json::Error);

impl Instance {
    /// A serving instance at `addr` speaking this build's protocol, weight 100, no zone.
    pub fn new(addr: SocketAddr) -> Self {
        Instance {
            addr,
            state: InstanceState::Serving,
            zone: None,
            weight: default_weight(),
            protocol_version: crate::frame::PROTOCOL_VERSION,
            features: crate::frame::features::ALL,
            tls: false,
            metadata: BTreeMap::new(),
        }
    }

    /// The JSON value written to etcd.
    pub fn encode(&self) -> Vec<u8> {
        // A struct of plain fields and string maps always serialises.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a value written by [`Instance::encode`] (or by another tool in the same layout).
    pub fn decode(value: &[u8]) -> Result<Self, DecodeError> {
        Ok(serde_json::from_slice(value)?)
    }
}

/// Where the registry is and how a server registers in it. One struct for both sides: a client
/// reads only the connection fields (`endpoints` to `keep_alive_timeout`, and `prefix`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default, deny_unknown_fields)
)]
#[non_exhaustive]
pub struct RegistryConfig {
    /// etcd endpoints, `http://host:port`: every member of the cluster. One member is used at a
    /// time; when it fails the next is tried.
    pub endpoints: Vec<String>,
    /// Key prefix (see the module docs for the layout).
    pub prefix: String,
    /// Timeout for connecting to an etcd member.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub dial_timeout: Duration,
    /// Timeout for each etcd request (get, put, grant, keepalive answer, revoke).
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub request_timeout: Duration,
    /// HTTP/2 ping interval on the etcd connection, so a watch on a connection that died silently
    /// is noticed (after this plus `keep_alive_timeout`) and re-established. Must not be below
    /// etcd's `--grpc-keepalive-min-time` (default 5 s): etcd closes the connection of a client
    /// that pings more often.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub keep_alive: Duration,
    /// How long a ping may go unanswered.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub keep_alive_timeout: Duration,
    /// Server: the lease TTL (whole seconds, at least 2, and long enough that one failed renewal
    /// can be retried: `ttl/3 + dial_timeout + 2 × min(request_timeout, ttl/3) < ttl`). An instance
    /// that stops renewing (killed, power cut, partitioned from etcd) disappears from the registry
    /// within this.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub ttl: Duration,
    /// Server: the address clients connect to; the bound address when `None` (which then must not
    /// be unspecified, such as `0.0.0.0`).
    pub advertise_addr: Option<SocketAddr>,
    /// Server: zone published in the instance record.
    pub zone: Option<String>,
    /// Server: weight published in the instance record.
    pub weight: u32,
    /// Server: labels published in the instance record.
    pub metadata: BTreeMap<String, String>,
    /// Server: on graceful shutdown, how long to wait between deregistering and sending GOAWAY,
    /// so watchers stop picking this instance first (lame duck).
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub lame_duck: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            endpoints: vec!["http://127.0.0.1:2379".to_string()],
            prefix: DEFAULT_PREFIX.to_string(),
            dial_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(2),
            keep_alive: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(5),
            ttl: Duration::from_secs(10),
            advertise_addr: None,
            zone: None,
            weight: default_weight(),
            metadata: BTreeMap::new(),
            lame_duck: Duration::from_millis(500),
        }
    }
}

impl RegistryConfig {
    /// The default config for the etcd `endpoints`.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        RegistryConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ..RegistryConfig::default()
        }
    }

    /// Checks the values that etcd or the renewal timer cannot work with.
    pub fn validate(&self) -> Result<(), crate::config::ConfigError> {
        use crate::config::ConfigError;
        if self.endpoints.is_empty() {
            return Err(ConfigError::OutOfRange {
                field: "registry.endpoints",
                why: "must name at least one etcd endpoint",
            });
        }
        if self.ttl < Duration::from_secs(2) {
            return Err(ConfigError::OutOfRange {
                field: "registry.ttl",
                why: "must be at least 2s (etcd's shortest lease)",
            });
        }
        if self.ttl.subsec_nanos() != 0 {
            return Err(ConfigError::OutOfRange {
                field: "registry.ttl",
                why: "must be whole seconds (etcd's lease TTL unit)",
            });
        }
        let named = [
            ("registry.dial_timeout", self.dial_timeout),
            ("registry.request_timeout", self.request_timeout),
            ("registry.keep_alive", self.keep_alive),
            ("registry.keep_alive_timeout", self.keep_alive_timeout),
        ];
        if let Some((field, _)) = named.iter().find(|(_, d)| d.is_zero()) {
            return Err(ConfigError::Zero(field));
        }
        // A renewal that fails once (its answer waited for, then a new connection and a second
        // renewal) must still land before the lease expires.
        let renew = self.renew_interval();
        let wait = self.request_timeout.min(renew);
        if renew + self.dial_timeout + wait * 2 >= self.ttl {
            return Err(ConfigError::OutOfRange {
                field: "registry.ttl",
                why: "too short for its timeouts: ttl/3 + dial_timeout + 2 x min(request_timeout, ttl/3) must be below ttl, so one failed renewal can be retried before the lease expires",
            });
        }
        Ok(())
    }

    /// The etcd member to use after `failures` failed attempts in a row: one at a time, in turn
    /// (a client over all of them would keep sending a share of its calls to a dead one).
    pub fn member(&self, failures: u32) -> &str {
        let n = self.endpoints.len().max(1);
        self.endpoints.get(failures as usize % n).map_or("", String::as_str)
    }

    /// The lease TTL in whole seconds, as etcd takes it.
    pub fn ttl_secs(&self) -> i64 {
        i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX)
    }

    /// How often a server renews its lease: a third of the TTL, so two renewals may be lost before
    /// it expires.
    pub fn renew_interval(&self) -> Duration {
        Duration::from_secs(self.ttl.as_secs().max(1)) / 3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_from_a_later_version_with_fields_we_do_not_know_still_reads() {
        let v = br#"{"addr":"127.0.0.1:1","state":"leaving","protocol_version":3,"features":15,"shard":"7"}"#;
        let i = Instance::decode(v).expect("decodes");
        assert_eq!(i.state, InstanceState::Leaving);
        assert_eq!(i.weight, 100);
        assert!(Instance::decode(b"not json").is_err());
        assert!(Instance::decode(br#"{"addr":"nowhere"}"#).is_err());
    }

    #[test]
    fn a_trailing_slash_on_the_prefix_does_not_double() {
        assert_eq!(service_prefix("/x/", "a.B"), "/x/a.B/");
    }

    #[test]
    fn short_ttls_and_empty_endpoints_are_refused() {
        let mut c = RegistryConfig::default();
        assert!(c.validate().is_ok());
        c.ttl = Duration::from_secs(1);
        assert!(c.validate().is_err());
        c.ttl = Duration::from_millis(2500);
        assert!(c.validate().is_err(), "fractional seconds");
        // 3 s with the default 2 s timeouts: one failed renewal could not be retried in time.
        c.ttl = Duration::from_secs(3);
        assert!(c.validate().is_err());
        c.dial_timeout = Duration::from_millis(500);
        c.request_timeout = Duration::from_millis(500);
        assert!(c.validate().is_ok());
        let c = RegistryConfig::new(Vec::<String>::new());
        assert!(c.validate().is_err());
        assert_eq!(
            RegistryConfig::default().renew_interval(),
            Duration::from_millis(3333) + Duration::from_nanos(333_333)
        );
    }
}
