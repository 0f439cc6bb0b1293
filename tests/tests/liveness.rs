//! Liveness: each fault is injected for real (the fault proxy, a raw peer, a peer that stops
//! reading) with short configured intervals, and detection is asserted against the documented
//! bound plus a stated slack.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use examples::echo::echo_client::EchoClient;
use examples::echo::EchoRequest;
use rpc_client::{Client, ClientConfig, Code, Request};
use rpc_core::config::{ConnectionConfig, HeartbeatConfig, KeepaliveConfig, TcpConfig};
use rpc_core::event::ConnectionEvent;
use rpc_core::frame::{Frame, ResponseFrame, Settings};
use rpc_core::{CloseReason, GoAwayReason, Metadata};
use rpc_server::{Server, ServerConfig};
use tests::proxy::{Fault, FaultProxy};
use tests::{echo_server, gate_server, quiet_client, wait_event, wait_until, Gate, RawPeer};
use tokio::time::Instant;

/// Scheduling and loopback latency allowed on top of a documented bound. The suite runs on shared
/// 2-core machines, so this is generous; the bounds themselves are exact in the pure logic tests.
const SLACK: Duration = Duration::from_millis(300);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn heartbeat(interval: u64, timeout: u64, max_failures: u32) -> HeartbeatConfig {
    HeartbeatConfig {
        enabled: true,
        interval: ms(interval),
        timeout: ms(timeout),
        max_failures,
        ..Default::default()
    }
}

fn client_with(hb: HeartbeatConfig) -> ClientConfig {
    ClientConfig {
        heartbeat: hb,
        ..ClientConfig::default()
    }
}

fn server_idle(idle: u64) -> ServerConfig {
    ServerConfig {
        idle_timeout: Some(ms(idle)),
        ..ServerConfig::default()
    }
}

fn is_closed(ev: &ConnectionEvent) -> bool {
    matches!(ev, ConnectionEvent::Closed { .. })
}

fn close_reason(ev: Option<ConnectionEvent>) -> CloseReason {
    match ev {
        Some(ConnectionEvent::Closed { reason, .. }) => reason,
        other => panic!("expected a close, got {other:?}"),
    }
}

#[tokio::test]
async fn blackholed_idle_connection_client_heartbeat_timeout_and_server_idle_eviction() {
    let hb = heartbeat(200, 100, 3);
    let bound = hb.detection_bound(); // 500 ms
    let idle = ms(800);
    let server = echo_server(server_idle(800)).await;
    let mut server_events = server.events();
    let proxy = FaultProxy::start(server.local_addr()).await;
    let client = Client::connect(proxy.addr(), client_with(hb)).await.unwrap();
    let mut events = client.events();
    let conn = client.connections()[0].clone();
    // Heartbeats flow and are answered while the path works.
    wait_until(ms(2000), || conn.heartbeats_acked() >= 2).await;

    proxy.set(Fault::Blackhole);
    let fault_at = Instant::now();
    let reason = close_reason(wait_event(&mut events, bound + SLACK, is_closed).await);
    let detected = fault_at.elapsed();
    assert_eq!(reason, CloseReason::HeartbeatTimeout);
    assert!(
        detected <= bound + SLACK,
        "client detected after {detected:?}, bound {bound:?}"
    );
    assert!(detected >= hb.timeout * 2, "closed suspiciously early: {detected:?}");

    let reason = close_reason(wait_event(&mut server_events, idle + SLACK, is_closed).await);
    let evicted = fault_at.elapsed();
    assert_eq!(reason, CloseReason::IdleTimeout);
    assert!(
        evicted <= idle + SLACK,
        "server evicted after {evicted:?}, idle timeout {idle:?}"
    );
}

#[tokio::test]
async fn blackhole_with_requests_in_flight_fails_them_by_their_deadline_as_maybe_executed() {
    let hb = heartbeat(200, 100, 3);
    let (server, mut control) = gate_server().await;
    let proxy = FaultProxy::start(server.local_addr()).await;
    let client = Client::connect(proxy.addr(), client_with(hb)).await.unwrap();
    let mut events = client.events();

    let deadline = ms(2000);
    let start = Instant::now();
    let mut calls = Vec::new();
    for i in 0..5u8 {
        let client = client.clone();
        calls.push(tokio::spawn(async move {
            client
                .unary(Request::for_method("/test.Gate/Hold", Bytes::from(vec![i])).with_timeout(deadline))
                .await
        }));
    }
    control.wait_arrivals(5).await; // written and running on the server
    proxy.set(Fault::Blackhole);
    let fault_at = Instant::now();

    for c in calls {
        let err = c.await.unwrap().unwrap_err();
        assert!(
            start.elapsed() <= deadline + SLACK,
            "resolved after its deadline: {:?}",
            start.elapsed()
        );
        assert!(err.may_have_executed(), "the server had the request: {err}");
        assert!(err.is_connection() || err.is_deadline_exceeded(), "{err}");
    }
    let reason = close_reason(wait_event(&mut events, hb.detection_bound() + SLACK, is_closed).await);
    assert_eq!(reason, CloseReason::HeartbeatTimeout);
    assert!(fault_at.elapsed() <= hb.detection_bound() + SLACK);
    control.release(5);
}

#[tokio::test]
async fn idle_client_with_heartbeats_is_never_evicted_by_a_server_idle_timeout_three_intervals_long() {
    let hb = heartbeat(100, 50, 3);
    let server = echo_server(server_idle(300)).await;
    let mut server_events = server.events();
    let client = Client::connect(server.local_addr(), client_with(hb)).await.unwrap();
    let mut events = client.events();
    let conn = client.connections()[0].clone();

    // Ten intervals with no requests at all: nothing closes on either side.
    assert_eq!(wait_event(&mut server_events, hb.interval * 10, is_closed).await, None);
    assert!(events.try_recv().is_err(), "no client event either");
    assert!(conn.is_open());
    assert!(
        conn.heartbeats_sent() >= 5,
        "heartbeats kept it alive: {}",
        conn.heartbeats_sent()
    );
    assert_eq!(server.connections().len(), 1);
}

#[tokio::test]
async fn idle_client_without_heartbeats_is_evicted_and_sees_goaway_idle_then_close() {
    let idle = ms(300);
    let server = echo_server(server_idle(300)).await;
    // Before the connect: the server's idle clock starts at the handshake, which is later, so the
    // eviction is at least `idle` after this (taken after the connect, it came out 1 ms short
    // once in a CI dry run).
    let start = Instant::now();
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    let mut events = client.events();

    let goaway = wait_event(&mut events, idle + SLACK, |e| {
        matches!(e, ConnectionEvent::GoAwayReceived { .. })
    })
    .await;
    let evicted = start.elapsed();
    assert!(
        matches!(
            goaway,
            Some(ConnectionEvent::GoAwayReceived {
                reason: GoAwayReason::Idle,
                last_request_id: 0,
                ..
            })
        ),
        "{goaway:?}"
    );
    assert!(evicted >= idle && evicted <= idle + SLACK, "evicted after {evicted:?}");
    let reason = close_reason(wait_event(&mut events, SLACK, is_closed).await);
    assert_eq!(
        reason,
        CloseReason::GoAway {
            reason: GoAwayReason::Idle,
            last_request_id: 0
        }
    );

    // The next request reconnects and succeeds.
    let mut echo = EchoClient::new(client.clone());
    let reply = echo
        .say(EchoRequest {
            message: "again".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(reply.into_body().message, "again");
}

/// A hand-written server that drops the acks of the first `lose` heartbeats and answers
/// everything else.
async fn raw_server_losing_acks(lose: u64) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut peer = RawPeer::from_stream(stream);
        peer.send(Frame::Settings(Settings {
            max_frame_size: Some(1 << 20),
            ..Settings::default()
        }))
        .await;
        let mut heartbeats = 0;
        while let Some(frame) = peer.next_frame(Duration::from_secs(30)).await {
            match frame {
                Frame::Heartbeat { id } => {
                    heartbeats += 1;
                    if heartbeats > lose {
                        peer.send(Frame::HeartbeatAck { id }).await;
                    }
                }
                Frame::Request(r) => {
                    let resp = ResponseFrame {
                        id: r.id,
                        code: Code::Ok,
                        message: String::new(),
                        metadata: Metadata::new(),
                        payload: r.payload,
                        not_executed: false,
                    };
                    peer.send(Frame::Response(resp)).await;
                }
                _ => {}
            }
        }
    });
    addr
}

#[tokio::test]
async fn one_lost_heartbeat_ack_followed_by_traffic_does_not_close_the_connection() {
    // Two failures would close; the server ignores the first two heartbeats, but a request's
    // response in between is proof of life and resets the count.
    let hb = heartbeat(300, 200, 2);
    let addr = raw_server_losing_acks(2).await;
    let client = Client::connect(addr, client_with(hb)).await.unwrap();
    let mut events = client.events();
    let failed = wait_event(&mut events, hb.interval + hb.timeout + SLACK, |e| {
        matches!(e, ConnectionEvent::HeartbeatFailed { .. })
    })
    .await;
    assert!(
        matches!(failed, Some(ConnectionEvent::HeartbeatFailed { failures: 1, .. })),
        "{failed:?}"
    );
    // Traffic right after the miss, while the second heartbeat is also going unanswered.
    let reply = client
        .unary(Request::for_method("/raw.Echo/Say", Bytes::from_static(b"ping")))
        .await
        .unwrap();
    assert_eq!(reply.into_body(), Bytes::from_static(b"ping"));
    // Several more intervals: later heartbeats are acked and nothing closes.
    assert_eq!(wait_event(&mut events, hb.interval * 4, is_closed).await, None);
    let conn = client.connections()[0].clone();
    assert!(conn.is_open());
    assert!(conn.heartbeats_acked() >= 1);
}

#[tokio::test]
async fn without_traffic_the_same_lost_acks_do_close_the_connection() {
    // The control for the test above: proves the raw server's lost acks are enough to close.
    let hb = heartbeat(300, 200, 2);
    let addr = raw_server_losing_acks(2).await;
    let client = Client::connect(addr, client_with(hb)).await.unwrap();
    let mut events = client.events();
    let reason = close_reason(wait_event(&mut events, hb.detection_bound() + SLACK, is_closed).await);
    assert_eq!(reason, CloseReason::HeartbeatTimeout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handlers_and_a_full_handler_pool_do_not_delay_heartbeat_acks() {
    let hb = heartbeat(100, 50, 3);
    let (gate, mut control) = Gate::new();
    let server = Server::builder()
        .config(ServerConfig {
            max_concurrent_requests: 2,
            ..ServerConfig::default()
        })
        .route("/test.Gate/Hold", gate.handler())
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let client = Client::connect(server.local_addr(), client_with(hb)).await.unwrap();
    let mut events = client.events();
    let conn = client.connections()[0].clone();
    // Two handlers that stay busy far longer than the heartbeat timeout fill the pool.
    let mut slow = Vec::new();
    for i in 0..2u8 {
        let client = client.clone();
        slow.push(tokio::spawn(async move {
            client
                .unary(Request::for_method("/test.Gate/Hold", Bytes::from(vec![i])).with_timeout(ms(10_000)))
                .await
        }));
    }
    control.wait_arrivals(2).await;
    // The pool is full: another request is answered SERVER_BUSY at once, and did not run.
    let busy = client
        .unary(Request::for_method("/test.Gate/Hold", Bytes::new()))
        .await
        .unwrap_err();
    assert_eq!(busy.code(), Code::ServerBusy);
    assert!(!busy.may_have_executed());

    let sent_before = conn.heartbeats_sent();
    // While the handlers hold the pool, every heartbeat is answered within its 50 ms timeout.
    let failed = wait_event(&mut events, ms(1000), |e| {
        matches!(e, ConnectionEvent::HeartbeatFailed { .. })
    })
    .await;
    assert_eq!(failed, None, "a heartbeat waited behind the handlers");
    let sent = conn.heartbeats_sent() - sent_before;
    assert!(sent >= 5, "heartbeats were sent during the wait: {sent}");
    assert!(conn.heartbeats_acked() + 1 >= conn.heartbeats_sent());
    control.release(2);
    for s in slow {
        s.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_stops_reading_is_closed_as_slow_consumer_with_bounded_server_memory() {
    let max_outbound = 256 * 1024;
    let reply = 128 * 1024;
    let stall = ms(300);
    let config = ServerConfig {
        connection: ConnectionConfig {
            max_outbound_bytes: max_outbound,
            write_stall_timeout: stall,
            ..ConnectionConfig::default()
        },
        tcp: TcpConfig {
            send_buffer_size: Some(64 * 1024),
            ..TcpConfig::default()
        },
        ..ServerConfig::default()
    };
    let server = echo_server(config).await;
    let mut server_events = server.events();
    let mut good = EchoClient::connect(server.local_addr(), quiet_client()).await.unwrap();
    good.say(EchoRequest::default()).await.unwrap();
    let good_id = server.connections()[0].id();

    // A raw client with a small receive buffer asks for 64 large responses and never reads.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let stream = socket.connect(server.local_addr()).await.unwrap();
    let mut raw = RawPeer::from_stream(stream);
    raw.send_settings().await;
    let start = Instant::now();
    for _ in 0..64 {
        let body = prost::Message::encode_to_vec(&EchoRequest {
            reply_size: reply as u32,
            ..Default::default()
        });
        let id = raw.next_id();
        raw.send(Frame::Request(rpc_core::frame::RequestFrame {
            id,
            method: "/echo.Echo/Say".into(),
            timeout: Some(ms(30_000)),
            payload: Bytes::from(body),
            ..Default::default()
        }))
        .await;
    }

    // Watch the slow connection's buffered bytes until it closes; meanwhile the good one works.
    let mut peak = 0;
    let mut good_calls = 0;
    let closed = loop {
        if let Ok(ConnectionEvent::Closed { id, reason, .. }) = server_events.try_recv() {
            if id != good_id {
                break reason;
            }
        }
        for c in server.connections().iter().filter(|c| c.id() != good_id) {
            peak = peak.max(c.outbound_buffered());
        }
        let t = Instant::now();
        good.say(EchoRequest {
            message: "still here".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        assert!(
            t.elapsed() < ms(500),
            "the other connection was slowed down: {:?}",
            t.elapsed()
        );
        good_calls += 1;
        assert!(start.elapsed() < Duration::from_secs(10), "slow consumer never closed");
    };
    let took = start.elapsed();
    assert_eq!(closed, CloseReason::SlowConsumer);
    assert!(took >= stall, "closed before the stall timeout: {took:?}");
    assert!(took <= stall + Duration::from_secs(2), "closed late: {took:?}");
    // Queue and write buffer are each bounded by max_outbound_bytes (the write buffer by one more frame).
    let frame = reply + 64;
    assert!(
        peak <= 2 * max_outbound + frame,
        "server buffered {peak} bytes for a peer that does not read"
    );
    assert!(peak > 0, "the test never saw buffered bytes");
    assert!(good_calls > 0);
    good.say(EchoRequest::default()).await.unwrap();
}

#[tokio::test]
async fn peer_reset_is_detected_at_once_and_pending_requests_fail() {
    peer_gone(true).await;
}

#[tokio::test]
async fn peer_fin_is_detected_at_once_and_pending_requests_fail() {
    peer_gone(false).await;
}

async fn peer_gone(reset: bool) {
    let (server, mut control) = gate_server().await;
    let proxy = FaultProxy::start(server.local_addr()).await;
    // Heartbeats off: only the driver's reading of EOF/RST can notice.
    let client = Client::connect(proxy.addr(), quiet_client()).await.unwrap();
    let mut events = client.events();
    let mut calls = Vec::new();
    for i in 0..4u8 {
        let client = client.clone();
        calls.push(tokio::spawn(async move {
            client
                .unary(Request::for_method("/test.Gate/Hold", Bytes::from(vec![i])).with_timeout(ms(10_000)))
                .await
        }));
    }
    control.wait_arrivals(4).await;
    let at = Instant::now();
    if reset {
        proxy.reset_all();
    } else {
        proxy.close_all();
    }
    let expected = if reset {
        CloseReason::Reset
    } else {
        CloseReason::PeerClosed
    };
    for c in calls {
        let err = c.await.unwrap().unwrap_err();
        assert!(err.is_connection(), "{err}");
        assert_eq!(err.close_reason(), Some(&expected), "{err}");
        assert!(err.may_have_executed(), "the requests had been written: {err}");
    }
    assert!(at.elapsed() < ms(200), "detection took {:?}", at.elapsed());
    assert_eq!(close_reason(wait_event(&mut events, SLACK, is_closed).await), expected);
    control.release(4);
}

#[tokio::test]
async fn socket_options_are_applied_to_both_the_client_and_the_accepted_socket() {
    let tcp = TcpConfig {
        nodelay: true,
        keepalive: Some(KeepaliveConfig {
            time: Duration::from_secs(7),
            interval: Duration::from_secs(3),
            retries: 4,
            ..Default::default()
        }),
        user_timeout: Some(Duration::from_millis(12_345)),
        send_buffer_size: Some(96 * 1024),
        recv_buffer_size: Some(80 * 1024),
        ..Default::default()
    };
    let server = echo_server(ServerConfig {
        tcp,
        ..ServerConfig::default()
    })
    .await;
    let client = Client::connect(server.local_addr(), ClientConfig { tcp, ..quiet_client() })
        .await
        .unwrap();
    let client_side = client.connections()[0].tcp_options().expect("client options read back");
    let server_side = server.connections()[0].tcp_options().expect("server options read back");
    for (side, got) in [("client", client_side), ("server", server_side)] {
        assert!(got.nodelay, "{side}: TCP_NODELAY");
        assert_eq!(got.keepalive, tcp.keepalive, "{side}: keepalive");
        assert_eq!(got.user_timeout, tcp.user_timeout, "{side}: TCP_USER_TIMEOUT");
        // Linux doubles the requested size for bookkeeping; it must be at least what was asked.
        assert!(
            got.send_buffer_size.unwrap() >= 96 * 1024,
            "{side}: SO_SNDBUF {:?}",
            got.send_buffer_size
        );
        assert!(
            got.recv_buffer_size.unwrap() >= 80 * 1024,
            "{side}: SO_RCVBUF {:?}",
            got.recv_buffer_size
        );
    }

    // And "off" really is off.
    let off = TcpConfig {
        nodelay: false,
        keepalive: None,
        user_timeout: None,
        ..TcpConfig::default()
    };
    let client = Client::connect(
        server.local_addr(),
        ClientConfig {
            tcp: off,
            ..quiet_client()
        },
    )
    .await
    .unwrap();
    let got = client.connections()[0].tcp_options().unwrap();
    assert!(!got.nodelay);
    assert_eq!(got.keepalive, None);
    assert_eq!(got.user_timeout, None);
}
