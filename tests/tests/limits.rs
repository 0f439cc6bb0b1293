//! Limits that hold under abuse: max_connections, a frame trickled in (slowloris), per-connection
//! requests in flight.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use rpc_client::{Client, Code, ErrorKind, Request};
use rpc_core::config::ConnectionConfig;
use rpc_core::event::ConnectionEvent;
use rpc_core::frame::{Frame, RequestFrame};
use rpc_core::{CloseReason, GoAwayReason};
use rpc_server::{Server, ServerConfig};
use tests::{named_server, quiet_client, wait_event, who, Gate, RawPeer};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_max_connections_are_refused_and_the_first_keep_working() {
    let max = 20;
    let config = ServerConfig {
        max_connections: max,
        ..ServerConfig::default()
    };
    let server = named_server("s", "127.0.0.1:0".parse().unwrap(), config, Duration::ZERO).await;
    let mut kept = Vec::new();
    for _ in 0..max {
        kept.push(Client::connect(server.addr(), quiet_client()).await.unwrap());
    }
    let mut refused = 0;
    let mut attempts = Vec::new();
    for _ in 0..100 {
        let addr = server.addr();
        attempts.push(tokio::spawn(async move { Client::connect(addr, quiet_client()).await }));
    }
    for a in attempts {
        match a.await.unwrap() {
            Ok(_) => panic!("a connection over max_connections was accepted"),
            Err(e) => {
                assert!(!e.may_have_executed());
                match e.kind() {
                    ErrorKind::Handshake(CloseReason::GoAway {
                        reason: GoAwayReason::Overloaded,
                        ..
                    }) => refused += 1,
                    _ => panic!("refused without the typed reason: {e}"),
                }
            }
        }
    }
    assert_eq!(refused, 100);
    for c in &kept {
        assert_eq!(who(c, ms(2000)).await.unwrap(), "s");
    }
    assert_eq!(server.handle.connections().len(), max);
}

#[tokio::test]
async fn a_frame_trickled_one_byte_per_second_is_closed_after_the_partial_frame_grace() {
    // One byte a second is far below the minimum rate: cut off when the grace ends.
    let timeout = ms(2500);
    let config = ServerConfig {
        connection: ConnectionConfig {
            partial_frame_grace: timeout,
            ..ConnectionConfig::default()
        },
        ..ServerConfig::default()
    };
    let server = Server::builder().config(config).bind("127.0.0.1:0").await.unwrap();
    let mut events = server.events();
    let mut raw = RawPeer::connect(server.local_addr()).await;
    raw.send_settings().await;
    let mut frame = bytes::BytesMut::new();
    let request = RequestFrame {
        id: 1,
        method: "/t.T/Slow".into(),
        payload: Bytes::from(vec![0u8; 64]),
        ..Default::default()
    };
    rpc_core::codec::FrameCodec::default()
        .encode_frame(&Frame::Request(request), &mut frame)
        .unwrap();
    let start = Instant::now();
    let trickle = tokio::spawn(async move {
        for b in frame.iter() {
            if raw.stream.write_all(&[*b]).await.is_err() {
                return raw;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        raw
    });
    let closed = wait_event(&mut events, timeout + Duration::from_secs(2), |e| {
        matches!(e, ConnectionEvent::Closed { .. })
    })
    .await;
    let took = start.elapsed();
    assert!(
        matches!(
            closed,
            Some(ConnectionEvent::Closed {
                reason: CloseReason::PartialFrameTimeout,
                ..
            })
        ),
        "{closed:?}"
    );
    assert!(took >= timeout && took < timeout + ms(700), "closed after {took:?}");
    let mut raw = trickle.await.unwrap();
    let frames = raw.read_until_close(Duration::from_secs(2)).await;
    assert!(
        frames
            .iter()
            .any(|f| matches!(f, Frame::GoAway(g) if g.reason == GoAwayReason::ProtocolError)),
        "told why: {frames:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_per_connection_cap_get_server_busy() {
    let (gate, mut control) = Gate::new();
    let config = ServerConfig {
        max_requests_per_connection: 3,
        ..ServerConfig::default()
    };
    let server = Server::builder()
        .config(config)
        .route("/test.Gate/Hold", gate.handler())
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let greedy = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    let mut held = Vec::new();
    for i in 0..3u8 {
        let c = greedy.clone();
        held.push(tokio::spawn(async move {
            c.unary(Request::for_method("/test.Gate/Hold", Bytes::from(vec![i])).with_timeout(ms(10_000)))
                .await
        }));
    }
    control.wait_arrivals(3).await;
    let err = greedy
        .unary(Request::for_method("/test.Gate/Hold", Bytes::new()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ServerBusy);
    assert!(!err.may_have_executed());
    // Another connection still gets in.
    let other = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    let fourth = tokio::spawn(async move {
        other
            .unary(Request::for_method("/test.Gate/Hold", Bytes::new()).with_timeout(ms(10_000)))
            .await
    });
    control.wait_arrivals(1).await;
    control.release(4);
    for h in held {
        h.await.unwrap().unwrap();
    }
    fourth.await.unwrap().unwrap();
}
