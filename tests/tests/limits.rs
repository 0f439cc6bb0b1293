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

/// A pool of thousands dialing at once must not overflow the accept queue: the kernel drops
/// the handshake's last ACK of a connection over the backlog after the client saw it complete,
/// a half-open connection only a heartbeat finds (the idle benchmark's pooled client of 10 000
/// hit it with tokio's `TcpListener::bind`, backlog 128). The kernel reports a listener's backlog as its Send-Q.
#[tokio::test]
async fn a_bound_server_listens_with_the_configured_backlog() {
    let Some(ss) = which_ss() else {
        assert!(std::env::var_os("CI").is_none(), "ss (iproute2) is missing in CI");
        eprintln!("SKIPPED a_bound_server_listens_with_the_configured_backlog: ss (iproute2) not installed");
        return;
    };
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    for backlog in [ServerConfig::default().listen_backlog, 100] {
        let config = ServerConfig {
            listen_backlog: backlog,
            ..ServerConfig::default()
        };
        let server = Server::builder().config(config).bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().port();
        let out = std::process::Command::new(&ss)
            .args(["-ltnH", &format!("sport = :{port}")])
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let reported: u32 = text
            .split_whitespace()
            .nth(2)
            .unwrap_or_else(|| panic!("no listener in {text:?}"))
            .parse()
            .unwrap();
        assert_eq!(reported, backlog.min(somaxconn), "{text}");
        server.shutdown().await;
    }
    assert_eq!(ServerConfig::default().listen_backlog, 4096);
    let zero = ServerConfig {
        listen_backlog: 0,
        ..ServerConfig::default()
    };
    assert!(zero.validate().is_err());
}

fn which_ss() -> Option<std::path::PathBuf> {
    ["/usr/bin/ss", "/bin/ss", "/usr/sbin/ss", "/sbin/ss"]
        .into_iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
}
