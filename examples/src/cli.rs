//! Command-line helpers shared by the example binaries.

use std::time::Duration;

/// A duration flag like `500ms` or `15s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("bad duration {s:?}: {e}"))
}

/// A duration flag that also accepts `off`.
pub fn parse_opt_duration(s: &str) -> Result<Option<Duration>, String> {
    if s.eq_ignore_ascii_case("off") {
        Ok(None)
    } else {
        parse_duration(s).map(Some)
    }
}

/// The value of a flag that takes a value or `off` (`None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrOff<T>(pub Option<T>);

/// `500ms`, `15s` or `off`.
pub fn duration_or_off(s: &str) -> Result<OrOff<Duration>, String> {
    parse_opt_duration(s).map(OrOff)
}

/// A count or `off`.
pub fn count_or_off(s: &str) -> Result<OrOff<u32>, String> {
    parse_opt_u32(s).map(OrOff)
}

/// Logs to stderr, filtered by `RUST_LOG` (default `warn`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_opt_duration("off"), Ok(None));
        assert!(parse_duration("soon").is_err());
    }
}

/// Socket option flags shared by the probe binaries. Leaving a flag out keeps the default; each
/// accepts `off`.
#[derive(Debug, Clone, clap::Args)]
pub struct TcpFlags {
    /// TCP keepalive idle time before the first probe (default 30s; `off` disables keepalive).
    #[arg(long, value_parser = duration_or_off)]
    pub keepalive_time: Option<OrOff<Duration>>,
    /// Time between keepalive probes (default 10s; `off` disables keepalive).
    #[arg(long, value_parser = duration_or_off)]
    pub keepalive_interval: Option<OrOff<Duration>>,
    /// Unanswered keepalive probes before the kernel drops the connection (default 3; `off` disables keepalive).
    #[arg(long, value_parser = count_or_off)]
    pub keepalive_retries: Option<OrOff<u32>>,
    /// TCP_USER_TIMEOUT (default 30s; `off` keeps the kernel's default, about 15 minutes).
    #[arg(long, value_parser = duration_or_off)]
    pub user_timeout: Option<OrOff<Duration>>,
    /// Close a connection whose writes make no progress for this long (default 10s).
    #[arg(long, value_parser = parse_duration)]
    pub write_stall_timeout: Option<Duration>,
    /// SO_SNDBUF in bytes (default: the kernel's autotuning).
    #[arg(long)]
    pub send_buffer: Option<usize>,
    /// SO_RCVBUF in bytes (default: the kernel's autotuning).
    #[arg(long)]
    pub recv_buffer: Option<usize>,
    /// Reset a stream whose receiver grants no credit for this long (default 30s; `off`: never).
    #[arg(long, value_parser = duration_or_off)]
    pub stream_stall_timeout: Option<OrOff<Duration>>,
    /// Bytes a stream's receiver lets its sender have in flight (default 256 KiB).
    #[arg(long)]
    pub stream_window: Option<u32>,
}

/// A count flag that also accepts `off`.
pub fn parse_opt_u32(s: &str) -> Result<Option<u32>, String> {
    if s.eq_ignore_ascii_case("off") {
        Ok(None)
    } else {
        s.parse().map(Some).map_err(|e| format!("bad number {s:?}: {e}"))
    }
}

impl TcpFlags {
    /// Applies the flags over defaults.
    pub fn apply(&self, tcp: &mut rpc_core::config::TcpConfig, conn: &mut rpc_core::config::ConnectionConfig) {
        let mut ka = tcp.keepalive.unwrap_or_default();
        let mut off = false;
        match self.keepalive_time {
            Some(OrOff(Some(d))) => ka.time = d,
            Some(OrOff(None)) => off = true,
            None => {}
        }
        match self.keepalive_interval {
            Some(OrOff(Some(d))) => ka.interval = d,
            Some(OrOff(None)) => off = true,
            None => {}
        }
        match self.keepalive_retries {
            Some(OrOff(Some(n))) => ka.retries = n,
            Some(OrOff(None)) => off = true,
            None => {}
        }
        tcp.keepalive = if off { None } else { Some(ka) };
        if let Some(OrOff(u)) = self.user_timeout {
            tcp.user_timeout = u;
        }
        if let Some(w) = self.write_stall_timeout {
            conn.write_stall_timeout = w;
        }
        if self.send_buffer.is_some() {
            tcp.send_buffer_size = self.send_buffer;
        }
        if self.recv_buffer.is_some() {
            tcp.recv_buffer_size = self.recv_buffer;
        }
        if let Some(OrOff(t)) = self.stream_stall_timeout {
            conn.stream_stall_timeout = t;
        }
        if let Some(w) = self.stream_window {
            conn.stream_window = w;
        }
    }
}

/// Milliseconds since the Unix epoch, for JSON lines that two processes' outputs can be merged by.
pub fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// One JSON object for a connection event.
pub fn event_json(side: &str, ev: &rpc_core::event::ConnectionEvent) -> serde_json::Value {
    use rpc_core::event::ConnectionEvent as E;
    use serde_json::json;
    let t = unix_ms() as u64;
    match ev {
        E::Connected { id, peer } => {
            json!({"t_ms": t, "side": side, "event": "connected", "conn": id, "peer": peer.map(|p| p.to_string())})
        }
        E::HeartbeatFailed { id, failures } => {
            json!({"t_ms": t, "side": side, "event": "heartbeat_failed", "conn": id, "failures": failures})
        }
        E::GoAwayReceived {
            id,
            reason,
            last_request_id,
        } => {
            json!({"t_ms": t, "side": side, "event": "goaway_received", "conn": id, "reason": reason.as_str(), "last_request_id": last_request_id})
        }
        E::Closed { id, peer, reason } => {
            json!({"t_ms": t, "side": side, "event": "closed", "conn": id, "peer": peer.map(|p| p.to_string()), "reason": reason.as_str(), "detail": reason.to_string()})
        }
        other => json!({"t_ms": t, "side": side, "event": format!("{other:?}")}),
    }
}

/// Heartbeat flags shared by the probe binaries (a client heartbeats when it has read nothing for
/// the interval; a server only while handlers or streams run).
#[derive(Debug, Clone, clap::Args)]
pub struct HeartbeatFlags {
    /// Read-idle time before a heartbeat (default 15s).
    #[arg(long, value_parser = parse_duration)]
    pub heartbeat_interval: Option<Duration>,
    /// Time to wait for an answer to a heartbeat (default 1s).
    #[arg(long, value_parser = parse_duration)]
    pub heartbeat_timeout: Option<Duration>,
    /// Unanswered heartbeats in a row that close the connection (default 3).
    #[arg(long)]
    pub heartbeat_max_failures: Option<u32>,
    /// Send no heartbeats.
    #[arg(long)]
    pub no_heartbeat: bool,
}

impl HeartbeatFlags {
    /// Applies the flags over defaults.
    pub fn apply(&self, hb: &mut rpc_core::config::HeartbeatConfig) {
        if let Some(d) = self.heartbeat_interval {
            hb.interval = d;
        }
        if let Some(d) = self.heartbeat_timeout {
            hb.timeout = d;
        }
        if let Some(n) = self.heartbeat_max_failures {
            hb.max_failures = n;
        }
        hb.enabled = !self.no_heartbeat;
    }
}

/// Serves the process's metrics in the Prometheus text format on `http://ADDR/metrics`
/// (metrics-exporter-prometheus; request latencies as histograms with buckets from 100 µs to 10 s).
pub fn serve_prometheus(addr: std::net::SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let buckets = [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Full(rpc_core::metrics::REQUEST_DURATION.to_string()), &buckets)?
        .install()?;
    Ok(())
}

/// Serves `admin` on `addr` when one is given (`--admin-addr`), and says where on stderr; keep
/// the handle for as long as the page should be served.
pub async fn serve_admin(
    addr: Option<std::net::SocketAddr>,
    admin: rpc_admin::Admin,
) -> std::io::Result<Option<rpc_admin::AdminHandle>> {
    let Some(addr) = addr else { return Ok(None) };
    let handle = admin.serve(addr).await?;
    eprintln!("admin page on http://{}/", handle.local_addr());
    Ok(Some(handle))
}

/// Registry flags shared by the probe binaries: `--registry URL` (repeat for every etcd member)
/// turns service registration (server) or discovery (client) on.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RegistryFlags {
    /// etcd endpoint, `http://host:port`; repeat for every member. Server: register there.
    /// Client: find the servers there instead of `--addr`.
    #[arg(long = "registry")]
    pub registry: Vec<String>,
    /// Key prefix in etcd (default `/tether/services`).
    #[arg(long)]
    pub registry_prefix: Option<String>,
    /// Server: lease TTL, whole seconds, at least 2s (default 10s).
    #[arg(long, value_parser = parse_duration)]
    pub registry_ttl: Option<Duration>,
    /// Server: the address to publish (default: the bound address, which must then be specific).
    #[arg(long)]
    pub registry_advertise: Option<std::net::SocketAddr>,
    /// Server: the zone to publish.
    #[arg(long)]
    pub registry_zone: Option<String>,
    /// Server: on graceful shutdown, the wait between deregistering and GOAWAY (default 500ms).
    #[arg(long, value_parser = parse_duration)]
    pub registry_lame_duck: Option<Duration>,
    /// Timeout for connecting to an etcd member and for each etcd call (default 2s each).
    #[arg(long, value_parser = parse_duration)]
    pub registry_timeout: Option<Duration>,
    /// HTTP/2 ping interval on the etcd connection (default 10s; at least etcd's
    /// `--grpc-keepalive-min-time`, 5s unless changed).
    #[arg(long, value_parser = parse_duration)]
    pub registry_keep_alive: Option<Duration>,
}

impl RegistryFlags {
    /// The registry config the flags describe, or `None` without `--registry`.
    pub fn config(&self) -> Option<rpc_core::registry::RegistryConfig> {
        if self.registry.is_empty() {
            return None;
        }
        let mut c = rpc_core::registry::RegistryConfig::new(self.registry.iter().cloned());
        if let Some(p) = &self.registry_prefix {
            c.prefix = p.clone();
        }
        if let Some(t) = self.registry_ttl {
            c.ttl = t;
        }
        c.advertise_addr = self.registry_advertise;
        c.zone = self.registry_zone.clone();
        if let Some(d) = self.registry_lame_duck {
            c.lame_duck = d;
        }
        if let Some(t) = self.registry_timeout {
            c.dial_timeout = t;
            c.request_timeout = t;
        }
        if let Some(k) = self.registry_keep_alive {
            c.keep_alive = k;
            c.keep_alive_timeout = c.keep_alive_timeout.min(k);
        }
        Some(c)
    }
}
