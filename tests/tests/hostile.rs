//! Hostile peers: whatever a well-formed but hostile peer sends, the server holds bounded memory
//! and bounded state, closes the peer with a typed reason, and keeps serving everyone else. Each
//! test is a raw-socket peer running one attack and asserting its bound; the figures they print
//! are the README's table.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rpc_client::{Client, ClientConfig};
use rpc_core::codec::FrameCodec;
use rpc_core::config::{ConnectionConfig, TcpConfig};
use rpc_core::event::ConnectionEvent;
use rpc_core::frame::{Frame, RequestFrame, Settings};
use rpc_core::{CloseReason, Request, Response};
use rpc_server::{handler_fn, Server, ServerConfig, ServerHandle};
use tests::{quiet_client, wait_event, RawPeer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const BUDGET: usize = 64 * 1024;

fn hostile_config() -> ServerConfig {
    ServerConfig {
        connection: ConnectionConfig {
            max_outbound_bytes: BUDGET,
            write_stall_timeout: ms(1000),
            handshake_timeout: ms(500),
            ..ConnectionConfig::default()
        },
        tcp: TcpConfig {
            send_buffer_size: Some(16 * 1024),
            ..TcpConfig::default()
        },
        ..ServerConfig::default()
    }
}

/// A server with `/t.T/Big` (answers `n` KiB, `n` the first body byte) and `/t.T/Echo`.
async fn server(config: ServerConfig) -> ServerHandle {
    Server::builder()
        .config(config)
        .route(
            "/t.T/Big",
            handler_fn(|req: Request<Bytes>| async move {
                let kib = req.body().first().copied().unwrap_or(1) as usize;
                Ok(Response::new(Bytes::from(vec![7u8; kib * 1024])))
            }),
        )
        .route(
            "/t.T/Echo",
            handler_fn(|req: Request<Bytes>| async move { Ok(Response::new(req.into_body())) }),
        )
        .bind("127.0.0.1:0")
        .await
        .unwrap()
}

/// A TCP connection with a small receive buffer, so a peer that does not read fills the server's
/// buffers quickly.
async fn small_window(addr: std::net::SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(addr).await.unwrap()
}

fn encode(frames: &[Frame]) -> BytesMut {
    let codec = FrameCodec::default();
    let mut out = BytesMut::new();
    for f in frames {
        codec.encode_frame(f, &mut out).unwrap();
    }
    out
}

fn hello() -> Frame {
    Frame::Settings(Settings {
        max_frame_size: Some(4 << 20),
        ..Settings::default()
    })
}

/// Samples the largest `outbound_buffered` of the server's connections until `stop`.
fn sample_buffered(server: &ServerHandle, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<usize> {
    let conns = server.connections();
    let server_conns = Arc::new(std::sync::Mutex::new(conns));
    tokio::spawn(async move {
        let mut max = 0;
        while !stop.load(Ordering::Relaxed) {
            for c in server_conns.lock().unwrap().iter() {
                max = max.max(c.outbound_buffered());
            }
            tokio::time::sleep(ms(2)).await;
        }
        max
    })
}

async fn wait_closed(events: &mut tokio::sync::broadcast::Receiver<ConnectionEvent>, limit: Duration) -> CloseReason {
    match wait_event(events, limit, |e| matches!(e, ConnectionEvent::Closed { .. })).await {
        Some(ConnectionEvent::Closed { reason, .. }) => reason,
        other => panic!("no close within {limit:?}: {other:?}"),
    }
}

/// The ping flood (CVE-2019-9512's class): heartbeats from a peer that never reads. Reading
/// stops once the write budget is full, so the acks buffered stay within the budget plus one
/// frame, and the connection is closed as a slow consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_flood_from_a_peer_that_never_reads_stays_within_the_write_budget() {
    let server = server(hostile_config()).await;
    let mut events = server.events();
    let mut stream = small_window(server.local_addr()).await;
    stream.write_all(&encode(&[hello()])).await.unwrap();
    tests::wait_until(ms(2000), || server.connections().len() == 1).await;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_buffered(&server, stop.clone());
    let flood = encode(&vec![Frame::Heartbeat { id: 1 }; 4096]); // 64 KiB of heartbeats
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let writer = tokio::spawn(async move {
        // Up to 15 MiB, as long as the server takes it.
        for _ in 0..240 {
            match tokio::time::timeout(ms(3000), stream.write_all(&flood)).await {
                Ok(Ok(())) => counter.fetch_add(flood.len(), Ordering::Relaxed),
                _ => break,
            };
        }
    });
    let start = Instant::now();
    let reason = wait_closed(&mut events, Duration::from_secs(10)).await;
    let took = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let max = sampler.await.unwrap();
    writer.abort();
    println!(
        "heartbeat flood: peer wrote {} KiB, server buffered at most {max} B (budget {BUDGET} B), closed {reason} after {took:?}",
        sent.load(Ordering::Relaxed) / 1024
    );
    assert_eq!(reason, CloseReason::SlowConsumer);
    assert!(
        max <= BUDGET + 16,
        "buffered {max} bytes against a {BUDGET}-byte budget"
    );
    assert!(server.connections().is_empty());
}

/// A reader that takes 32 KiB every 800 ms (40 KB/s, below this server's 64 KiB/s minimum): the
/// server's writes progress within every stall timeout, which fooled a "no progress" rule
/// forever; judged by drain rate, it is a slow consumer a few seconds after it falls behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_trickles_is_closed_as_a_slow_consumer() {
    let mut config = hostile_config();
    config.connection.min_send_rate = 64 * 1024;
    let server = server(config).await;
    let mut events = server.events();
    let mut stream = small_window(server.local_addr()).await;
    let requests: Vec<Frame> = (1..=8)
        .map(|id| {
            Frame::Request(RequestFrame {
                id,
                method: "/t.T/Big".into(),
                payload: Bytes::from_static(&[255]), // 255 KiB each
                ..Default::default()
            })
        })
        .collect();
    let mut frames = vec![hello()];
    frames.extend(requests);
    stream.write_all(&encode(&frames)).await.unwrap();
    let trickle = tokio::spawn(async move {
        // 32 KiB at a time: enough for the server's socket to become writable again.
        let mut chunk = vec![0u8; 32 * 1024];
        loop {
            tokio::time::sleep(ms(800)).await;
            if stream.read_exact(&mut chunk).await.is_err() {
                return;
            }
        }
    });
    let start = Instant::now();
    let reason = wait_closed(&mut events, Duration::from_secs(10)).await;
    let took = start.elapsed();
    trickle.abort();
    println!(
        "trickle reader (32 KiB / 800 ms against 64 KiB/s): closed {reason} after {took:?} (write stall timeout 1 s)"
    );
    assert_eq!(reason, CloseReason::SlowConsumer);
    // Past the stall timeout (its writes did progress), well before the attack could end.
    assert!(
        took > ms(1200) && took < Duration::from_secs(6),
        "closed after {took:?}"
    );
}

/// A connection that never speaks holds a `max_connections` slot only until the handshake
/// timeout, and so does one that stops halfway through its SETTINGS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_completes_its_handshake_is_closed_at_the_handshake_timeout() {
    let server = server(hostile_config()).await;
    let mut events = server.events();
    for partial in [&b""[..], &encode(&[hello()])[..9]] {
        let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
        stream.write_all(partial).await.unwrap();
        let start = Instant::now();
        let reason = wait_closed(&mut events, Duration::from_secs(3)).await;
        let took = start.elapsed();
        println!(
            "silent connection ({} bytes sent): closed {reason} after {took:?}",
            partial.len()
        );
        assert_eq!(reason, CloseReason::HandshakeTimeout);
        assert!(took >= ms(450) && took < ms(1500), "closed after {took:?}");
        // Told why, then closed (the server lingers until the peer closes too).
        let mut raw = RawPeer::from_stream(stream);
        let frames = raw.read_until_close(Duration::from_secs(2)).await;
        assert!(frames.iter().any(|f| matches!(f, Frame::GoAway(_))), "{frames:?}");
        drop(raw);
        tests::wait_until(ms(2000), || server.connections().is_empty()).await;
    }
}

/// Metric labels come only from the server's own methods: 2,000 made-up methods, refused while
/// the server is busy and answered UNIMPLEMENTED when it is not, add one `unknown` label.
#[test]
fn peer_chosen_method_names_never_become_metric_labels() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let (gate, mut control) = tests::Gate::new();
            let server = Server::builder()
                .config(ServerConfig {
                    max_concurrent_requests: 1,
                    ..ServerConfig::default()
                })
                .route("/t.T/Hold", gate.handler())
                .bind("127.0.0.1:0")
                .await
                .unwrap();
            let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
            let held = {
                let client = client.clone();
                tokio::spawn(async move { client.unary(Request::for_method("/t.T/Hold", Bytes::new())).await })
            };
            control.wait_arrivals(1).await;
            for i in 0..1000 {
                let err = client
                    .unary(Request::for_method(format!("/x.Y/Busy{i}"), Bytes::new()))
                    .await
                    .unwrap_err();
                assert_eq!(err.code(), rpc_core::Code::ServerBusy);
            }
            control.release(1);
            held.await.unwrap().unwrap();
            for i in 0..1000 {
                let err = client
                    .unary(Request::for_method(format!("/x.Y/Nope{i}"), Bytes::new()))
                    .await
                    .unwrap_err();
                assert_eq!(err.code(), rpc_core::Code::Unimplemented);
            }
            server.shutdown().await;
        })
    });
    let mut methods = std::collections::BTreeSet::new();
    for (key, _, _, _) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        let labels: Vec<_> = key.labels().collect();
        if key.name() == "tether_requests_total" && labels.iter().any(|l| l.key() == "side" && l.value() == "server") {
            if let Some(m) = labels.iter().find(|l| l.key() == "method") {
                methods.insert(m.value().to_string());
            }
        }
    }
    println!("server method labels after 2,000 made-up methods: {methods:?}");
    assert_eq!(
        methods,
        ["/t.T/Hold", "unknown"].iter().map(|s| s.to_string()).collect()
    );
}

/// Over `max_connections` on a TLS server, the refusal is sent after the TLS handshake, so the
/// client learns `Overloaded` rather than a TLS error; refusals run in tracked tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_over_max_connections_learns_it_is_refused_for_overload() {
    let pki = tests::pki::TestPki::new();
    let mut tls = rpc_core::tls::TlsServerConfig::new(pki.path("server.pem"), pki.path("server-key.pem"));
    tls.handshake_timeout = ms(2000);
    let config = ServerConfig {
        tls: Some(tls),
        max_connections: 1,
        ..ServerConfig::default()
    };
    let server = server(config).await;
    let client_config = ClientConfig {
        tls: Some(rpc_core::tls::TlsClientConfig::new(pki.path("ca.pem"))),
        connect_timeout: ms(3000),
        ..quiet_client()
    };
    let first = Client::connect(server.local_addr(), client_config.clone())
        .await
        .unwrap();
    let err = Client::connect(server.local_addr(), client_config).await.unwrap_err();
    println!("TLS client over max_connections: {err}");
    assert!(
        matches!(
            err.close_reason(),
            Some(CloseReason::GoAway {
                reason: rpc_core::GoAwayReason::Overloaded,
                ..
            })
        ),
        "{err}"
    );
    // The first keeps working.
    first
        .unary(Request::for_method("/t.T/Echo", Bytes::from_static(b"ok")))
        .await
        .unwrap();
}

fn rss_kib() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

async fn p99(client: &Client, n: usize) -> Duration {
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        client
            .unary(Request::for_method("/t.T/Echo", Bytes::from_static(b"probe")))
            .await
            .unwrap();
        lat.push(start.elapsed());
    }
    lat.sort();
    lat[n * 99 / 100]
}

/// 200 hostile connections at once (heartbeat floods that never read, trickle readers, silent
/// connections): the server's memory grows by at most their budgets, every one of them is
/// closed with its reason, descriptors come back, and a well-behaved client keeps being served
/// with its p99 within 10x (+ 20 ms) of its p99 before the attack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_hostile_connections_cost_bounded_memory_and_a_good_client_is_served() {
    // Long enough stall and handshake timeouts that the attack holds while the good client is
    // measured; the other tests check that they close the attackers.
    let mut config = hostile_config();
    config.connection.write_stall_timeout = ms(4000);
    config.connection.handshake_timeout = ms(4000);
    let server = server(config).await;
    let good = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    p99(&good, 100).await; // warm up
    let before = p99(&good, 300).await;
    let rss_before = rss_kib();
    let fds_before = open_fds();
    let addr = server.local_addr();
    let mut attackers = Vec::new();
    // Each attacker keeps up its attack until the measurement is done (or the server closes it).
    let done = tokio_util::sync::CancellationToken::new();
    for i in 0..200 {
        let done = done.clone();
        attackers.push(tokio::spawn(async move {
            let mut stream = small_window(addr).await;
            match i % 3 {
                // Heartbeat flood, never reading.
                0 => {
                    let _ = stream.write_all(&encode(&[hello()])).await;
                    let flood = encode(&vec![Frame::Heartbeat { id: 1 }; 2048]);
                    for _ in 0..64 {
                        match tokio::time::timeout(ms(3000), stream.write_all(&flood)).await {
                            Ok(Ok(())) => {}
                            _ => break,
                        }
                    }
                }
                // Large responses, read one byte at a time.
                1 => {
                    let mut frames = vec![hello()];
                    frames.extend((1..=4).map(|id| {
                        Frame::Request(RequestFrame {
                            id,
                            method: "/t.T/Big".into(),
                            payload: Bytes::from_static(&[128]),
                            ..Default::default()
                        })
                    }));
                    let _ = stream.write_all(&encode(&frames)).await;
                    let mut b = [0u8; 1];
                    while !done.is_cancelled() {
                        tokio::time::sleep(ms(50)).await;
                        if !matches!(stream.read(&mut b).await, Ok(1)) {
                            break;
                        }
                    }
                }
                // Silent.
                _ => {}
            }
            // Hold the socket, unread, until the measurement is done.
            done.cancelled().await;
        }));
    }
    // Measured once the attack is in place: every connection open, and the floods and the
    // trickle readers' responses filling their budgets.
    tests::wait_until(Duration::from_secs(5), || {
        let conns = server.connections();
        conns.len() > 200 && conns.iter().filter(|c| c.outbound_buffered() >= BUDGET / 2).count() >= 120
    })
    .await;
    let during = p99(&good, 300).await;
    let rss_during = rss_kib();
    done.cancel();
    for a in attackers {
        a.await.unwrap();
    }
    // Only the good client's connection is left.
    tests::wait_until(Duration::from_secs(10), || server.connections().len() == 1).await;
    let grew = rss_during.saturating_sub(rss_before);
    println!(
        "200 hostile connections: RSS +{grew} KiB (bound {} KiB), good client's p99 {before:?} before, {during:?} during",
        200 * (BUDGET + 64 * 1024) / 1024 + 64 * 1024
    );
    assert!(
        grew <= 200 * (BUDGET + 64 * 1024) / 1024 + 64 * 1024,
        "RSS grew by {grew} KiB"
    );
    assert!(
        during <= before * 10 + ms(20),
        "p99 {before:?} before, {during:?} during"
    );
    tests::wait_until(Duration::from_secs(5), || open_fds() <= fds_before).await;
    good.unary(Request::for_method("/t.T/Echo", Bytes::from_static(b"after")))
        .await
        .unwrap();
}
