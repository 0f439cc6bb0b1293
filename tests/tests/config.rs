//! Config files: TOML into the config structs with human-readable durations, round trips, and
//! typed errors for contradictions.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use rpc_client::{Balance, ClientConfig, HedgeDelay};
use rpc_core::config::{check_idle_vs_heartbeat, ConfigError};
use rpc_server::ServerConfig;

#[derive(Debug, PartialEq, serde::Deserialize, serde::Serialize)]
struct Deployment {
    client: ClientConfig,
    server: ServerConfig,
}

const FILE: &str = r#"
[client]
connect_timeout = "250ms"
request_timeout = "2s"
connections_per_endpoint = 2
balance = "least-in-flight"
max_reconnect_attempts = 10
hedge_delay = "p95>=5ms"

[client.heartbeat]
interval = "5s"
timeout = "500ms"
max_failures = 4

[client.backoff]
initial = "200ms"
max = "30s"

[client.tcp]
user_timeout = "20s"
send_buffer_size = 262144

[client.tcp.keepalive]
time = "15s"
interval = "5s"
retries = 5

[server]
idle_timeout = "60s"
max_concurrent_requests = 512
shutdown_grace = "10s"

[server.connection]
max_frame_size = 1048576
write_stall_timeout = "3s"
"#;

#[test]
fn toml_file_loads_into_the_config_structs_with_defaults_for_the_rest() {
    let d: Deployment = toml::from_str(FILE).unwrap();
    let c = &d.client;
    assert_eq!(c.connect_timeout, Duration::from_millis(250));
    assert_eq!(c.request_timeout, Duration::from_secs(2));
    assert_eq!(c.connections_per_endpoint, 2);
    assert_eq!(c.balance, Balance::LeastInFlight);
    assert_eq!(c.max_reconnect_attempts, Some(10));
    assert_eq!(
        c.hedge_delay,
        Some(HedgeDelay::P95 {
            at_least: Duration::from_millis(5)
        })
    );
    assert_eq!(c.heartbeat.interval, Duration::from_secs(5));
    assert_eq!(c.heartbeat.timeout, Duration::from_millis(500));
    assert_eq!(c.heartbeat.max_failures, 4);
    assert!(c.heartbeat.enabled, "unset fields keep their defaults");
    assert_eq!(c.backoff.initial, Duration::from_millis(200));
    assert_eq!(c.backoff.multiplier, 1.6);
    assert_eq!(c.tcp.user_timeout, Some(Duration::from_secs(20)));
    assert_eq!(c.tcp.keepalive.unwrap().retries, 5);
    assert_eq!(c.tcp.send_buffer_size, Some(262_144));
    assert_eq!(c.check_interval, ClientConfig::default().check_interval);
    let s = &d.server;
    assert_eq!(s.idle_timeout, Some(Duration::from_secs(60)));
    assert_eq!(s.max_concurrent_requests, 512);
    assert_eq!(s.connection.max_frame_size, 1 << 20);
    assert_eq!(s.connection.write_stall_timeout, Duration::from_secs(3));
    assert_eq!(s.max_connections, ServerConfig::default().max_connections);
    c.validate().unwrap();
    s.validate().unwrap();
    c.validate_against(s.idle_timeout).unwrap();
}

#[test]
fn config_round_trips_through_toml() {
    let d: Deployment = toml::from_str(FILE).unwrap();
    let text = toml::to_string(&d).unwrap();
    assert!(
        text.contains("\"250ms\""),
        "durations are written human-readable:\n{text}"
    );
    let back: Deployment = toml::from_str(&text).unwrap();
    assert_eq!(back, d);
    let defaults = Deployment {
        client: ClientConfig::default(),
        server: ServerConfig::default(),
    };
    let back: Deployment = toml::from_str(&toml::to_string(&defaults).unwrap()).unwrap();
    assert_eq!(back, defaults);
}

#[test]
fn hedge_delays_are_written_as_durations_or_p95() {
    for (text, delay) in [
        ("20ms", HedgeDelay::After(Duration::from_millis(20))),
        (
            "p95",
            HedgeDelay::P95 {
                at_least: Duration::ZERO,
            },
        ),
        (
            "p95>=1s 500ms",
            HedgeDelay::P95 {
                at_least: Duration::from_millis(1500),
            },
        ),
    ] {
        assert_eq!(text.parse::<HedgeDelay>(), Ok(delay));
        assert_eq!(delay.to_string().parse::<HedgeDelay>(), Ok(delay));
    }
    for bad in ["p9", "p95>", "p95 5ms", "fast"] {
        let err = bad.parse::<HedgeDelay>().unwrap_err();
        assert!(err.contains(bad), "{err}");
    }
    let c = ClientConfig {
        hedge_delay: Some(HedgeDelay::After(Duration::ZERO)),
        ..ClientConfig::default()
    };
    assert_eq!(c.validate(), Err(ConfigError::Zero("hedge_delay")));
}

#[test]
fn settings_that_can_be_off_say_so_and_stay_off_through_a_round_trip() {
    let d: Deployment = toml::from_str(
        r#"
[client]
hedge_delay = "off"
[client.tcp]
keepalive = "off"
user_timeout = "off"
[server]
idle_timeout = "off"
[server.connection]
stream_stall_timeout = "off"
"#,
    )
    .unwrap();
    assert_eq!(d.client.tcp.keepalive, None);
    assert_eq!(d.client.tcp.user_timeout, None);
    assert_eq!(d.client.hedge_delay, None);
    assert_eq!(d.server.idle_timeout, None);
    assert_eq!(d.server.connection.stream_stall_timeout, None);
    assert!(d.server.tcp.keepalive.is_some(), "the rest keeps its defaults");

    // Off in the structs: written "off", read back off (not the defaults).
    let mut off = Deployment {
        client: ClientConfig::default(),
        server: ServerConfig::default(),
    };
    off.server.idle_timeout = None;
    off.server.tcp.keepalive = None;
    off.client.tcp.user_timeout = None;
    let text = toml::to_string(&off).unwrap();
    assert!(text.contains("idle_timeout = \"off\""), "{text}");
    assert!(text.contains("keepalive = \"off\""), "{text}");
    let back: Deployment = toml::from_str(&text).unwrap();
    assert_eq!(back, off);

    // A keepalive table still reads as one; anything else is a clear error.
    let c: ClientConfig = toml::from_str("[tcp.keepalive]\ntime = \"20s\"").unwrap();
    assert_eq!(c.tcp.keepalive.unwrap().time, Duration::from_secs(20));
    let err = toml::from_str::<ServerConfig>("idle_timeout = \"never\"").unwrap_err();
    assert!(err.to_string().contains("neither a duration nor \"off\""), "{err}");
    let err = toml::from_str::<ClientConfig>("[tcp]\nkeepalive = \"no\"").unwrap_err();
    assert!(
        err.to_string().contains("expected \"off\" or a KeepaliveConfig"),
        "{err}"
    );
}

#[test]
fn unknown_fields_are_rejected() {
    let err = toml::from_str::<ClientConfig>("conect_timeout = \"1s\"").unwrap_err();
    assert!(err.to_string().contains("conect_timeout"), "{err}");
}

#[test]
fn contradictions_give_typed_errors() {
    let mut c = ClientConfig::default();
    c.heartbeat.timeout = c.heartbeat.interval;
    assert_eq!(
        c.validate(),
        Err(ConfigError::HeartbeatTimeoutNotBelowInterval {
            timeout: c.heartbeat.interval,
            interval: c.heartbeat.interval
        })
    );

    let c = ClientConfig::default();
    let idle = Some(Duration::from_secs(10));
    assert_eq!(
        c.validate_against(idle),
        Err(ConfigError::IdleTimeoutNotAboveHeartbeat {
            idle_timeout: Duration::from_secs(10),
            interval: Duration::from_secs(15)
        })
    );
    let mut quiet = ClientConfig::default();
    quiet.heartbeat.enabled = false;
    assert_eq!(
        quiet.validate_against(idle),
        Ok(()),
        "no heartbeats, nothing to contradict"
    );
    assert_eq!(check_idle_vs_heartbeat(None, &c.heartbeat), Ok(()));

    let d: Deployment =
        toml::from_str("[client]\n[client.heartbeat]\ninterval = \"30s\"\n[server]\nidle_timeout = \"30s\"").unwrap();
    assert!(matches!(
        d.client.validate_against(d.server.idle_timeout),
        Err(ConfigError::IdleTimeoutNotAboveHeartbeat { .. })
    ));

    let s = ServerConfig {
        max_concurrent_requests: 0,
        ..ServerConfig::default()
    };
    assert_eq!(s.validate(), Err(ConfigError::Zero("max_concurrent_requests")));
    let c = ClientConfig {
        connect_timeout: Duration::ZERO,
        ..ClientConfig::default()
    };
    assert_eq!(c.validate(), Err(ConfigError::Zero("connect_timeout")));
    // And a client built from a bad config fails at build time with the typed error.
    let err = rpc_client::Client::with_endpoints([], c).unwrap_err();
    assert!(
        matches!(
            err.kind(),
            rpc_client::ErrorKind::Config(ConfigError::Zero("connect_timeout"))
        ),
        "{err}"
    );
}
