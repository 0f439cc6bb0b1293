//! Metrics: each fault scenario moves its own counter, and a normal request moves the request
//! counter and latency histogram, as seen by `metrics-util`'s debugging recorder. One test, so the
//! scenarios run in order against one global recorder.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use examples::echo::echo_client::EchoClient;
use examples::echo::EchoRequest;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::MetricKind;
use rpc_client::{Client, ClientConfig, Request};
use rpc_core::config::{ConnectionConfig, HeartbeatConfig, TcpConfig};
use rpc_core::event::ConnectionEvent;
use rpc_core::frame::{Frame, RequestFrame};
use rpc_core::Status;
use rpc_server::{handler_fn, Server, ServerConfig};
use tests::proxy::{Fault, FaultProxy};
use tests::{echo_server, quiet_client, wait_event, RawPeer};
use tokio::io::AsyncWriteExt;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

type Labels = Vec<(String, String)>;

/// Totals across snapshots: the debugging recorder's snapshot drains counters and histograms.
struct Metrics {
    snapshotter: Snapshotter,
    totals: std::sync::Mutex<std::collections::HashMap<(MetricKind, String, Labels), f64>>,
}

impl Metrics {
    fn new(snapshotter: Snapshotter) -> Self {
        Metrics {
            snapshotter,
            totals: Default::default(),
        }
    }

    fn query(&self, kind: MetricKind, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut totals = self.totals.lock().unwrap();
        for (ck, _, _, v) in self.snapshotter.snapshot().into_vec() {
            let key = ck.key();
            let labels: Labels = key
                .labels()
                .map(|l| (l.key().to_string(), l.value().to_string()))
                .collect();
            let slot = totals.entry((ck.kind(), key.name().to_string(), labels)).or_insert(0.0);
            match v {
                DebugValue::Counter(n) => *slot += n as f64,
                DebugValue::Histogram(samples) => *slot += samples.len() as f64,
                DebugValue::Gauge(g) => *slot = g.into_inner(),
            }
        }
        totals
            .iter()
            .filter(|((k, n, _), _)| *k == kind && n == name)
            .filter(|((_, _, l), _)| labels.iter().all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v)))
            .map(|(_, v)| *v)
            .sum()
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.query(MetricKind::Counter, name, labels) as u64
    }

    fn histogram_samples(&self, name: &str, labels: &[(&str, &str)]) -> usize {
        self.query(MetricKind::Histogram, name, labels) as usize
    }

    fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.query(MetricKind::Gauge, name, labels)
    }

    /// Waits until the counter has grown past `before` (events are published asynchronously).
    async fn grows(&self, name: &str, labels: &[(&str, &str)], before: u64) -> u64 {
        for _ in 0..200 {
            let now = self.counter(name, labels);
            if now > before {
                return now;
            }
            tokio::time::sleep(ms(10)).await;
        }
        panic!("{name} {labels:?} did not move from {before}");
    }
}

const CLOSED: &str = "tether_connections_closed_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_scenario_moves_its_own_metric() {
    let recorder = DebuggingRecorder::new();
    let m = Metrics::new(recorder.snapshotter());
    recorder.install().unwrap();

    // A normal request: request counters and latency histograms on both sides.
    let server = echo_server(ServerConfig::default()).await;
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    let mut echo = EchoClient::new(client.clone());
    echo.say(EchoRequest::default()).await.unwrap();
    let say = ("method", "/echo.Echo/Say");
    // Read first: a gauge is drained by each snapshot until it is set again.
    assert_eq!(m.gauge("tether_client_pool_endpoints", &[("pool", "alive")]), 1.0);
    assert_eq!(
        m.counter("tether_requests_total", &[("side", "server"), say, ("code", "SUCCESS")]),
        1
    );
    assert_eq!(
        m.counter("tether_requests_total", &[("side", "client"), say, ("code", "SUCCESS")]),
        1
    );
    assert_eq!(
        m.histogram_samples("tether_request_duration_seconds", &[("side", "client"), say]),
        1
    );
    assert_eq!(
        m.histogram_samples("tether_request_duration_seconds", &[("side", "server"), say]),
        1
    );
    assert!(m.counter("tether_connections_opened_total", &[("side", "server")]) >= 1);

    // A method the server does not serve is counted under one `unknown` method label.
    client
        .unary(Request::for_method("/no.Such/Method", Bytes::new()))
        .await
        .unwrap_err();
    assert_eq!(
        m.counter(
            "tether_requests_total",
            &[("side", "server"), ("method", "unknown"), ("code", "UNIMPLEMENTED")]
        ),
        1
    );

    // Heartbeat timeout (blackhole): heartbeats failed and a close with that reason.
    let proxy = FaultProxy::start(server.local_addr()).await;
    let hb = HeartbeatConfig {
        enabled: true,
        interval: ms(100),
        timeout: ms(50),
        max_failures: 2,
        ..Default::default()
    };
    let hb_client = Client::connect(
        proxy.addr(),
        ClientConfig {
            heartbeat: hb,
            ..ClientConfig::default()
        },
    )
    .await
    .unwrap();
    let before = m.counter(CLOSED, &[("side", "client"), ("reason", "heartbeat_timeout")]);
    let sent = m.counter("tether_heartbeats_sent_total", &[("side", "client")]);
    proxy.set(Fault::Blackhole);
    m.grows(CLOSED, &[("side", "client"), ("reason", "heartbeat_timeout")], before)
        .await;
    assert!(m.counter("tether_heartbeats_failed_total", &[("side", "client")]) >= 2);
    assert!(m.counter("tether_heartbeats_sent_total", &[("side", "client")]) > sent);
    drop(hb_client);

    // Peer reset.
    proxy.set(Fault::Pass);
    let reset_client = Client::connect(proxy.addr(), quiet_client()).await.unwrap();
    let before = m.counter(CLOSED, &[("side", "client"), ("reason", "reset")]);
    proxy.reset_all();
    m.grows(CLOSED, &[("side", "client"), ("reason", "reset")], before)
        .await;
    drop(reset_client);

    // Idle eviction: the server's close reason and the client's GOAWAY(idle).
    let idle_server = echo_server(ServerConfig {
        idle_timeout: Some(ms(200)),
        ..ServerConfig::default()
    })
    .await;
    let before = m.counter(CLOSED, &[("side", "server"), ("reason", "idle_timeout")]);
    let goaways = m.counter(
        "tether_goaway_received_total",
        &[("side", "client"), ("reason", "idle")],
    );
    let idle_client = Client::connect(idle_server.local_addr(), quiet_client()).await.unwrap();
    m.grows(CLOSED, &[("side", "server"), ("reason", "idle_timeout")], before)
        .await;
    // The client counts the GOAWAY when it reads it, a moment after the server closed.
    m.grows(
        "tether_goaway_received_total",
        &[("side", "client"), ("reason", "idle")],
        goaways,
    )
    .await;

    // Validation before reuse: a connection idle past the server's timeout minus the margin is
    // not handed out (the idle time here is the scenario, not a synchronisation).
    let before = m.counter("tether_client_validation_rejected_total", &[("reason", "idle_expired")]);
    let mut echo_idle = EchoClient::new(idle_client.clone());
    echo_idle.say(EchoRequest::default()).await.unwrap();
    tokio::time::sleep(ms(170)).await;
    echo_idle.say(EchoRequest::default()).await.unwrap();
    assert!(m.counter("tether_client_validation_rejected_total", &[("reason", "idle_expired")]) > before);

    // Protocol error: a bad magic byte closes that connection with reason protocol_error.
    let before = m.counter(CLOSED, &[("side", "server"), ("reason", "protocol_error")]);
    let mut raw = RawPeer::connect(server.local_addr()).await;
    raw.stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    m.grows(CLOSED, &[("side", "server"), ("reason", "protocol_error")], before)
        .await;

    // Slow consumer: a peer that stops reading large responses.
    let slow_server = echo_server(ServerConfig {
        connection: ConnectionConfig {
            max_outbound_bytes: 64 * 1024,
            write_stall_timeout: ms(200),
            ..Default::default()
        },
        tcp: TcpConfig {
            send_buffer_size: Some(32 * 1024),
            ..TcpConfig::default()
        },
        ..ServerConfig::default()
    })
    .await;
    let before = m.counter(CLOSED, &[("side", "server"), ("reason", "slow_consumer")]);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(8 * 1024).unwrap();
    let mut raw = RawPeer::from_stream(socket.connect(slow_server.local_addr()).await.unwrap());
    raw.send_settings().await;
    for _ in 0..16 {
        let id = raw.next_id();
        let body = prost::Message::encode_to_vec(&EchoRequest {
            reply_size: 128 * 1024,
            ..Default::default()
        });
        let frame = RequestFrame {
            id,
            method: "/echo.Echo/Say".into(),
            payload: Bytes::from(body),
            ..Default::default()
        };
        raw.send(Frame::Request(frame)).await;
    }
    m.grows(CLOSED, &[("side", "server"), ("reason", "slow_consumer")], before)
        .await;

    // Reconnect attempts that fail, against a port with nothing listening.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let before = m.counter("tether_client_reconnect_attempts_total", &[("result", "failed")]);
    let dead_client = Client::with_endpoints([dead], quiet_client()).unwrap();
    let mut events = dead_client.events();
    wait_event(&mut events, Duration::from_secs(3), |e| {
        matches!(e, ConnectionEvent::Reconnecting { .. })
    })
    .await
    .unwrap();
    assert!(m.counter("tether_client_reconnect_attempts_total", &[("result", "failed")]) > before);

    // Retries by cause.
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = calls.clone();
    let flaky = Server::builder()
        .route(
            "/t.T/Flaky",
            handler_fn(move |_req: Request<Bytes>| {
                let n = c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    if n == 0 {
                        Err(Status::new(rpc_core::Code::Unavailable, "not yet"))
                    } else {
                        Ok(rpc_core::Response::new(Bytes::new()))
                    }
                }
            }),
        )
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let before = m.counter("tether_client_retries_total", &[("cause", "status")]);
    let flaky_client = Client::connect(flaky.local_addr(), quiet_client()).await.unwrap();
    // The handler ran and said UNAVAILABLE: only an idempotent request is tried again.
    let mut req = Request::for_method("/t.T/Flaky", Bytes::new());
    req.set_idempotent(true);
    flaky_client.unary(req).await.unwrap();
    assert_eq!(
        m.counter("tether_client_retries_total", &[("cause", "status")]),
        before + 1
    );
}
