//! Protocol evolution: version-1 peers (the frozen codec in `tests/src/v1.rs`) keep working with
//! this build in both directions, and the extension rules of PROTOCOL.md hold on a live
//! connection (an unknown kind is skipped, an unknown critical flag closes with a clear reason, a
//! grown body is read, an unknown feature, setting or higher version is served).

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use examples::echo::{EchoReply, EchoRequest};
use prost::Message;
use rpc_client::{Client, ClientConfig};
use rpc_core::config::HeartbeatConfig;
use rpc_core::frame::{Frame, GoAway, RequestFrame, Settings, UnknownFrame};
use rpc_core::{CloseReason, GoAwayReason, ProtocolError, Request, Response, Status};
use rpc_server::{Server, ServerConfig};
use tests::v1::{self, V1Frame, V1Peer, V1_CODES};
use tests::{echo_server, wait_until, RawPeer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn say(message: &str) -> Bytes {
    EchoRequest {
        message: message.into(),
        ..EchoRequest::default()
    }
    .encode_to_vec()
    .into()
}

fn v1_request(id: u64, method: &str, payload: Bytes) -> V1Frame {
    V1Frame::Request {
        id,
        oneway: false,
        timeout_ms: 5000,
        method: method.into(),
        metadata: vec![],
        payload,
    }
}

/// The next frame a version-1 peer reads, which must be one it can read.
async fn next_v1(peer: &mut V1Peer) -> V1Frame {
    match peer.next(ms(5000)).await {
        Ok(Some(f)) => f,
        Ok(None) => panic!("no frame within 5 s"),
        Err(e) => panic!("this build sent a version-1 peer bytes it cannot read: {e:?}"),
    }
}

#[tokio::test]
async fn a_version_1_client_is_served_and_never_sent_what_it_cannot_read() {
    let server = Server::builder()
        .add_service(examples::echo::echo_server::EchoServer::new(
            examples::services::EchoService::default(),
        ))
        .route(
            "/t.Conflict/Now",
            tower::service_fn(|_req: Request<Bytes>| async { Err::<Response<Bytes>, _>(Status::aborted("try again")) }),
        )
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let mut peer = V1Peer::new(TcpStream::connect(server.local_addr()).await.unwrap());
    peer.send(&v1::client_settings()).await;
    assert!(matches!(next_v1(&mut peer).await, V1Frame::Settings(_)));

    peer.send(&v1_request(1, "/echo.Echo/Say", say("hello"))).await;
    peer.send(&v1_request(2, "/no.Such/Method", Bytes::new())).await;
    peer.send(&v1_request(3, "/echo.Echo/Fail", say("bad"))).await;
    peer.send(&v1_request(4, "/t.Conflict/Now", Bytes::new())).await;
    peer.send(&V1Frame::Heartbeat(9)).await;
    let mut answers = std::collections::BTreeMap::new();
    let mut acked = false;
    while answers.len() < 4 || !acked {
        match next_v1(&mut peer).await {
            V1Frame::Response {
                id,
                code,
                message,
                payload,
                ..
            } => {
                assert!(
                    V1_CODES.contains(&code),
                    "code {code} is unknown to version 1 ({message})"
                );
                answers.insert(id, (code, message, payload));
            }
            V1Frame::HeartbeatAck(9) => acked = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    let reply = EchoReply::decode(answers[&1].2.clone()).unwrap();
    assert_eq!((answers[&1].0, reply.message.as_str()), (0, "hello"));
    assert_eq!(answers[&2].0, 3, "version 1's NOT_FOUND: no such method, not run");
    assert_eq!(answers[&3].0, 4, "APPLICATION_ERROR");
    assert_eq!(answers[&4].0, 4, "a newer code reaches version 1 as APPLICATION_ERROR");
    assert!(answers[&4].1.starts_with("ABORTED"), "{:?}", answers[&4].1);

    // The server's GOAWAY is readable to it too.
    let shutdown = tokio::spawn(server.shutdown());
    assert!(matches!(next_v1(&mut peer).await, V1Frame::GoAway { reason: 2, .. }));
    assert_eq!(peer.next(ms(5000)).await, Ok(None), "then the server closes");
    shutdown.await.unwrap();
}

/// A version-1 server: answers every request but `/t.Hold/Forever` with its own payload,
/// acknowledges heartbeats, and records what it could not read.
async fn v1_server() -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let errors = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (errors2, seen2) = (errors.clone(), seen.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (errors, seen) = (errors2.clone(), seen2.clone());
            tokio::spawn(async move {
                let mut peer = V1Peer::new(stream);
                peer.send(&v1::server_settings()).await;
                loop {
                    let frame = match peer.next(ms(30_000)).await {
                        Ok(Some(f)) => f,
                        Ok(None) => return,
                        Err(e) => {
                            errors.lock().unwrap().push(format!("{e:?}"));
                            return;
                        }
                    };
                    seen.lock()
                        .unwrap()
                        .push(format!("{frame:?}").chars().take(60).collect());
                    match frame {
                        V1Frame::Request {
                            id, method, payload, ..
                        } if method != "/t.Hold/Forever" => {
                            let answer = V1Frame::Response {
                                id,
                                code: 0,
                                message: String::new(),
                                metadata: vec![],
                                payload,
                            };
                            peer.send(&answer).await;
                        }
                        V1Frame::Heartbeat(id) => peer.send(&V1Frame::HeartbeatAck(id)).await,
                        _ => {}
                    }
                }
            });
        }
    });
    (addr, errors, seen)
}

#[tokio::test]
async fn this_client_calls_a_version_1_server_and_never_sends_it_what_it_cannot_read() {
    let (addr, errors, seen) = v1_server().await;
    let config = ClientConfig {
        connections_per_endpoint: 1,
        heartbeat: HeartbeatConfig {
            interval: ms(50),
            timeout: ms(40),
            ..HeartbeatConfig::default()
        },
        ..ClientConfig::default()
    };
    let client = Client::connect(addr, config).await.unwrap();
    let call = |body: &'static [u8]| {
        let client = client.clone();
        async move {
            client
                .unary(Request::for_method("/t.Echo/Say", Bytes::from_static(body)).with_timeout(ms(5000)))
                .await
        }
    };
    assert_eq!(call(b"one").await.unwrap().into_body(), Bytes::from_static(b"one"));

    // A caller that gives up: on a version-1 server it sends no CANCEL (kind 8 is unknown there).
    let timed_out = client
        .unary(Request::for_method("/t.Hold/Forever", Bytes::new()).with_timeout(ms(50)))
        .await
        .unwrap_err();
    assert!(timed_out.is_deadline_exceeded(), "{timed_out}");
    let dropped = tokio::time::timeout(
        ms(50),
        client.unary(Request::for_method("/t.Hold/Forever", Bytes::new()).with_timeout(ms(5000))),
    )
    .await;
    assert!(dropped.is_err(), "the hold was answered");

    // More metadata than version 1 took (16 KiB, never announced) fails that call alone, here,
    // unsent, instead of closing the server's connection.
    let mut big = Request::for_method("/t.Echo/Say", Bytes::new()).with_timeout(ms(5000));
    big.metadata_mut().insert("k", Bytes::from(vec![b'x'; 20 * 1024]));
    let refused = client.unary(big).await.unwrap_err();
    assert!(!refused.may_have_executed(), "{refused}");

    // Heartbeats flow while idle, and the connection still serves.
    let conn = client.connections()[0].clone();
    wait_until(ms(5000), || conn.heartbeats_acked() >= 3).await;
    assert_eq!(call(b"two").await.unwrap().into_body(), Bytes::from_static(b"two"));
    assert_eq!(client.connections().len(), 1);
    assert_eq!(
        conn.id(),
        client.connections()[0].id(),
        "the same connection throughout"
    );
    drop(client);
    wait_until(ms(2000), || seen.lock().unwrap().len() >= 4).await;
    assert!(
        errors.lock().unwrap().is_empty(),
        "the version-1 server could not read: {:?} (after {:?})",
        errors.lock().unwrap(),
        seen.lock().unwrap()
    );
}

/// A raw client past the handshake with the echo server; `settings` is what it announces.
async fn handshaken(settings: Settings) -> (rpc_server::ServerHandle, RawPeer) {
    let server = echo_server(ServerConfig::default()).await;
    let mut raw = RawPeer::connect(server.local_addr()).await;
    raw.send(Frame::Settings(settings)).await;
    assert!(matches!(raw.next_frame(ms(5000)).await, Some(Frame::Settings(_))));
    (server, raw)
}

async fn echo_over(raw: &mut RawPeer, message: &str) -> String {
    let id = raw.next_id();
    raw.send(Frame::Request(RequestFrame {
        id,
        timeout: Some(ms(5000)),
        method: "/echo.Echo/Say".into(),
        payload: say(message),
        ..RequestFrame::default()
    }))
    .await;
    loop {
        match raw.next_frame(ms(5000)).await {
            Some(Frame::Response(r)) if r.id == id => return EchoReply::decode(r.payload).unwrap().message,
            Some(_) => {}
            None => panic!("no answer to request {id}"),
        }
    }
}

#[tokio::test]
async fn a_peer_announcing_a_newer_version_unknown_features_and_settings_is_served() {
    let server = echo_server(ServerConfig::default()).await;
    // SETTINGS by hand: version 7, every feature bit, and a setting id nobody has assigned.
    let mut body = BytesMut::new();
    body.put_u16(3);
    for (id, v) in [(8u16, u64::MAX), (9, 7), (0x7777, 42)] {
        body.put_u16(id);
        body.put_u64(v);
    }
    let mut raw = RawPeer::connect(server.local_addr()).await;
    raw.send(Frame::Unknown(UnknownFrame {
        kind: 7,
        flags: 0,
        id: 0,
        body: body.freeze(),
    }))
    .await;
    let Some(Frame::Settings(theirs)) = raw.next_frame(ms(5000)).await else {
        panic!("no SETTINGS")
    };
    assert_eq!(theirs.version, Some(rpc_core::frame::PROTOCOL_VERSION));
    assert_eq!(echo_over(&mut raw, "newer").await, "newer");
    let conn = &server.connections()[0];
    let peer = conn.peer_settings().unwrap();
    assert_eq!(
        peer.negotiated_version(),
        rpc_core::frame::PROTOCOL_VERSION,
        "the lower of the two"
    );
}

#[tokio::test]
async fn an_unknown_frame_kind_is_skipped_and_the_connection_goes_on() {
    let (server, mut raw) = handshaken(Settings::default()).await;
    raw.send(Frame::Unknown(UnknownFrame {
        kind: 0x42,
        flags: 0xFF,
        id: 3,
        body: Bytes::from(vec![7u8; 1000]),
    }))
    .await;
    assert_eq!(echo_over(&mut raw, "after an extension").await, "after an extension");
    assert_eq!(server.connections().len(), 1);
}

#[tokio::test]
async fn grown_bodies_are_read() {
    let (_server, mut raw) = handshaken(Settings::default()).await;
    // A HEARTBEAT with four bytes a later version added: acknowledged.
    let mut grown = BytesMut::new();
    grown.put_slice(&[0x54, 1, 4, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 4]);
    grown.put_slice(b"more");
    raw.stream.write_all(&grown).await.unwrap();
    assert_eq!(raw.next_frame(ms(5000)).await, Some(Frame::HeartbeatAck { id: 5 }));
}

#[tokio::test]
async fn an_unknown_critical_flag_closes_the_connection_with_a_reason_both_sides_see() {
    let (server, mut raw) = handshaken(Settings::default()).await;
    let conn = server.connections()[0].clone();
    let mut frame = BytesMut::new();
    frame.put_slice(&[0x54, 1, 4, 0x20, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]);
    raw.stream.write_all(&frame).await.unwrap();
    let frames = raw.read_until_close(ms(5000)).await;
    let goaway = frames.iter().find_map(|f| match f {
        Frame::GoAway(g) => Some(g.clone()),
        _ => None,
    });
    let Some(GoAway { reason, message, .. }) = goaway else {
        panic!("no GOAWAY before the close: {frames:?}")
    };
    assert_eq!(reason, GoAwayReason::ProtocolError);
    assert!(message.contains("critical flags 0x20"), "{message}");
    assert_eq!(
        conn.closed().await,
        CloseReason::Protocol(ProtocolError::UnknownCriticalFlags {
            kind: rpc_core::frame::FrameKind::Heartbeat,
            flags: 0x20,
        })
    );
}

#[tokio::test]
async fn a_clients_goaway_lets_its_requests_finish_then_the_server_closes() {
    let (server, mut raw) = handshaken(Settings::default()).await;
    let slow = EchoRequest {
        message: "slow".into(),
        delay_ms: 200,
        ..EchoRequest::default()
    };
    for _ in 0..2 {
        let id = raw.next_id();
        raw.send(Frame::Request(RequestFrame {
            id,
            timeout: Some(ms(5000)),
            method: "/echo.Echo/Say".into(),
            payload: slow.encode_to_vec().into(),
            ..RequestFrame::default()
        }))
        .await;
    }
    raw.send(Frame::GoAway(GoAway {
        reason: GoAwayReason::Shutdown,
        last_request_id: 0,
        message: "client closing".into(),
    }))
    .await;
    let frames = raw.read_until_close(ms(5000)).await;
    let answered: Vec<u64> = frames
        .iter()
        .filter_map(|f| match f {
            Frame::Response(r) if r.code == rpc_core::Code::Ok => Some(r.id),
            _ => None,
        })
        .collect();
    assert_eq!(answered, [1, 2], "both requests answered before the close: {frames:?}");
    wait_until(ms(5000), || server.connections().is_empty()).await;
}
