//! Foundation: generated clients and servers, multiplexing, statuses, deadlines, protocol abuse,
//! oneway, graceful shutdown.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use examples::echo::echo_client::EchoClient;
use examples::echo::EchoRequest;
use examples::greeter::v1::greeter_client::GreeterClient;
use examples::greeter::v1::{person, CountRequest, HelloRequest, Person, Tag};
use rpc_client::{Client, Code, Request};
use rpc_core::event::ConnectionEvent;
use rpc_core::frame::{Frame, FrameKind, MAGIC, VERSION};
use rpc_core::{CloseReason, GoAwayReason, ProtocolError, Response, Status};
use rpc_server::{handler_fn, Server, ServerConfig};
use tests::{echo_server, gate_server, quiet_client, wait_event, Gate, RawPeer};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

const SECOND: Duration = Duration::from_secs(1);

fn person(name: &str, city: &str) -> Person {
    Person {
        name: name.into(),
        address: Some(person::Address {
            city: city.into(),
            lines: vec!["1 Main St".into(), "Flat 2".into()],
        }),
        tags: vec![Tag {
            key: "team".into(),
            value: "core".into(),
        }],
    }
}

#[tokio::test]
async fn generated_client_calls_generated_server_with_nested_messages() {
    let server = echo_server(ServerConfig::default()).await;
    let mut greeter = GreeterClient::connect(server.local_addr(), quiet_client())
        .await
        .unwrap();

    let reply = greeter
        .say_hello(HelloRequest {
            person: Some(person("Ada", "London")),
        })
        .await
        .unwrap()
        .into_body();
    assert_eq!(reply.greeting, "Hello, Ada [team=core]!");
    let addr = reply.address.unwrap();
    assert_eq!(addr.city, "London");
    assert_eq!(addr.lines, vec!["1 Main St", "Flat 2"]);

    let people = vec![person("a", "Oslo"), person("b", "Lima"), person("c", "Oslo")];
    let count = greeter.count(CountRequest { people }).await.unwrap().into_body();
    assert_eq!(count.count, 3);
    assert_eq!(count.by_city.get("Oslo"), Some(&2));
    assert_eq!(count.by_city.get("Lima"), Some(&1));

    // A missing required field comes back as the handler's typed status.
    let err = greeter.say_hello(HelloRequest { person: None }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_requests_from_64_tasks_over_one_connection_answered_out_of_order() {
    let server = echo_server(ServerConfig::default()).await;
    let mut server_events = server.events();
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    // Completion order across all tasks; request n is the n-th sent by the test overall.
    let finished = Arc::new(std::sync::Mutex::new(Vec::with_capacity(10_000)));
    let mut tasks = Vec::new();
    for t in 0..64u32 {
        let mut echo = EchoClient::new(client.clone());
        let finished = finished.clone();
        tasks.push(tokio::spawn(async move {
            for n in (t..10_000).step_by(64) {
                let payload = Bytes::from(n.to_be_bytes().to_vec());
                // Handler delays of 0..=3 ms vary per request, so answers overtake each other.
                let req = EchoRequest {
                    message: n.to_string(),
                    payload: payload.clone(),
                    delay_ms: n % 4,
                    reply_size: 0,
                };
                let reply = echo.say(req).await.unwrap().into_body();
                assert_eq!(reply.message, n.to_string());
                assert_eq!(reply.payload, payload);
                finished.lock().unwrap().push(n);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let finished = finished.lock().unwrap();
    assert_eq!(finished.len(), 10_000);
    let mut sorted = finished.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..10_000).collect::<Vec<_>>(), "each request answered once");
    assert_ne!(
        *finished, sorted,
        "answers came back in a different order than requests were made"
    );
    let conns = client.connections();
    assert_eq!(conns.len(), 1, "one connection");
    assert!(conns[0].is_open());
    let mut connected = 0;
    while let Ok(ev) = server_events.try_recv() {
        if matches!(ev, ConnectionEvent::Connected { .. }) {
            connected += 1;
        }
    }
    assert_eq!(connected, 1, "the server saw exactly one connection");
}

#[tokio::test]
async fn responses_arrive_in_any_order_on_one_connection() {
    // A request held by the server, sent first, finishes after one sent later on the same connection.
    let (gate, mut control) = Gate::new();
    let server = Server::builder()
        .route("/test.Gate/Hold", gate.handler())
        .add_service(examples::echo::echo_server::EchoServer::new(
            examples::services::EchoService::default(),
        ))
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    let held = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .unary(Request::for_method("/test.Gate/Hold", Bytes::from_static(b"first")))
                .await
        })
    };
    control.wait_arrivals(1).await;
    let mut echo = EchoClient::new(client.clone());
    let fast = echo
        .say(EchoRequest {
            message: "second".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(fast.into_body().message, "second");
    assert!(!held.is_finished(), "the first request is still held");
    control.release(1);
    assert_eq!(held.await.unwrap().unwrap().into_body(), Bytes::from_static(b"first"));
    assert_eq!(client.connections().len(), 1);
}

#[tokio::test]
async fn unknown_method_is_unimplemented_and_handler_error_is_application_error() {
    let server = echo_server(ServerConfig::default()).await;
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();

    let err = client
        .unary(Request::for_method("/echo.Echo/NoSuchMethod", Bytes::new()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    assert!(err.as_status().unwrap().message().contains("/echo.Echo/NoSuchMethod"));
    assert!(
        !err.may_have_executed(),
        "UNIMPLEMENTED from the runtime proves nothing ran"
    );

    let err = client
        .unary(Request::for_method("/no.Such/Service", Bytes::new()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);

    let mut echo = EchoClient::new(client);
    let err = echo
        .fail(EchoRequest {
            message: "the disk is full".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ApplicationError);
    assert_eq!(err.as_status().unwrap().message(), "the disk is full");
    assert!(err.may_have_executed());
}

#[tokio::test]
async fn deadline_fails_on_the_client_at_the_deadline_and_the_handler_sees_it() {
    let server = echo_server(ServerConfig::default()).await;
    let mut echo = EchoClient::connect(server.local_addr(), quiet_client()).await.unwrap();

    // The handler reads the remaining deadline it was sent.
    let req = Request::for_method(
        "",
        EchoRequest {
            message: "x".into(),
            ..Default::default()
        },
    )
    .with_timeout(1500 * ms(1));
    let seen = echo.say(req).await.unwrap().into_body().remaining_deadline_ms;
    assert!((1000..=1500).contains(&seen), "handler saw {seen} ms");

    // A handler slower than the deadline: the client fails at its deadline, not when the handler ends.
    let deadline = 200 * ms(1);
    let req = Request::for_method(
        "",
        EchoRequest {
            message: "x".into(),
            delay_ms: 5_000,
            ..Default::default()
        },
    )
    .with_timeout(deadline);
    let start = Instant::now();
    let err = echo.say(req).await.unwrap_err();
    let took = start.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    assert!(took >= deadline, "failed early: {took:?}");
    assert!(took < deadline + 300 * ms(1), "failed late: {took:?}");

    // Without a deadline of its own a request gets request_timeout.
    let mut cfg = quiet_client();
    cfg.request_timeout = 150 * ms(1);
    let mut echo = EchoClient::connect(server.local_addr(), cfg).await.unwrap();
    let start = Instant::now();
    let err = echo
        .say(EchoRequest {
            delay_ms: 5_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert!(start.elapsed() < 450 * ms(1));
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Sends `bytes` on a raw socket and checks the server closes that connection with `expected`,
/// while a well-behaved client keeps working.
async fn abuse(bytes: Vec<u8>, settings_first: bool, expected: ProtocolError) {
    let server = echo_server(ServerConfig {
        connection: rpc_core::config::ConnectionConfig {
            max_frame_size: 4096,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let mut events = server.events();
    let mut good = EchoClient::connect(server.local_addr(), quiet_client()).await.unwrap();
    good.say(EchoRequest {
        message: "before".into(),
        ..Default::default()
    })
    .await
    .unwrap();

    let mut raw = RawPeer::connect(server.local_addr()).await;
    if settings_first {
        raw.send_settings().await;
    }
    raw.stream.write_all(&bytes).await.unwrap();
    let frames = raw.read_until_close(5 * SECOND).await;
    // The server says why before it closes.
    let goaway = frames.iter().find_map(|f| match f {
        Frame::GoAway(g) => Some(g.clone()),
        _ => None,
    });
    let goaway = goaway.unwrap_or_else(|| panic!("no GOAWAY in {frames:?}"));
    assert_eq!(goaway.reason, GoAwayReason::ProtocolError);
    assert!(goaway.message.contains("protocol error"), "{}", goaway.message);

    let want = CloseReason::Protocol(expected);
    let ev = wait_event(
        &mut events,
        5 * SECOND,
        |e| matches!(e, ConnectionEvent::Closed { reason, .. } if *reason == want),
    )
    .await;
    assert!(ev.is_some(), "server did not report the close with {want:?}");

    // The other connection is untouched.
    let reply = good
        .say(EchoRequest {
            message: "after".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(reply.into_body().message, "after");
}

fn header(magic: u8, version: u8, kind: u8, len: u32) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u8(magic);
    b.put_u8(version);
    b.put_u8(kind);
    b.put_u8(0);
    b.put_u64(1);
    b.put_u32(len);
    b.to_vec()
}

#[tokio::test]
async fn frame_over_max_frame_size_closes_only_that_connection() {
    let bytes = header(MAGIC, VERSION, FrameKind::Request as u8, 1 << 30);
    abuse(
        bytes,
        true,
        ProtocolError::FrameTooLarge {
            len: 1 << 30,
            max: 4096,
        },
    )
    .await;
}

#[tokio::test]
async fn bad_magic_closes_only_that_connection() {
    abuse(b"GET / HTTP/1.1\r\n\r\n".to_vec(), false, ProtocolError::BadMagic(b'G')).await;
}

#[tokio::test]
async fn unknown_version_closes_only_that_connection() {
    abuse(
        header(MAGIC, 2, FrameKind::Settings as u8, 0),
        false,
        ProtocolError::UnsupportedVersion(2),
    )
    .await;
}

#[tokio::test]
async fn request_before_handshake_is_a_protocol_error() {
    let mut b = BytesMut::new();
    let codec = rpc_core::codec::FrameCodec::default();
    codec.encode_frame(&Frame::Heartbeat { id: 1 }, &mut b).unwrap();
    abuse(b.to_vec(), false, ProtocolError::UnexpectedFrame(FrameKind::Heartbeat)).await;
}

#[tokio::test]
async fn oneway_requests_arrive() {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let server = Server::builder()
        .route(
            "/log.Log/Write",
            handler_fn(move |req: Request<Bytes>| {
                let tx = tx.clone();
                async move {
                    tx.send(req.into_body())
                        .await
                        .map_err(|_| Status::internal("test gone"))?;
                    Ok(Response::new(Bytes::new()))
                }
            }),
        )
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    for i in 0..10u8 {
        client
            .oneway(Request::for_method("/log.Log/Write", Bytes::from(vec![i])))
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..10 {
        got.push(tokio::time::timeout(5 * SECOND, rx.recv()).await.unwrap().unwrap()[0]);
    }
    got.sort();
    assert_eq!(got, (0..10).collect::<Vec<u8>>());
    // A response the server does not send back never confuses later requests.
    let err = client
        .unary(Request::for_method("/log.Log/Nope", Bytes::new()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_refuses_new_and_sends_goaway() {
    let (server, mut control) = gate_server().await;
    let addr = server.local_addr();
    let client = Client::connect(addr, quiet_client()).await.unwrap();
    let mut client_events = client.events();

    let mut in_flight = Vec::new();
    for i in 0..8u8 {
        let client = client.clone();
        in_flight.push(tokio::spawn(async move {
            client
                .unary(Request::for_method("/test.Gate/Hold", Bytes::from(vec![i])).with_timeout(10 * SECOND))
                .await
        }));
    }
    control.wait_arrivals(8).await;
    let shutdown = tokio::spawn(server.shutdown());

    let goaway = wait_event(&mut client_events, 5 * SECOND, |e| {
        matches!(e, ConnectionEvent::GoAwayReceived { .. })
    })
    .await;
    match goaway {
        Some(ConnectionEvent::GoAwayReceived {
            reason,
            last_request_id,
            ..
        }) => {
            assert_eq!(reason, GoAwayReason::Shutdown);
            assert_eq!(last_request_id, 8, "GOAWAY names the last request in flight");
        }
        other => panic!("no GOAWAY: {other:?}"),
    }
    // New connections are refused once shutdown has begun.
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener still accepting"
    );
    assert!(!shutdown.is_finished(), "shutdown waits for requests in flight");

    control.release(8);
    for (i, t) in in_flight.into_iter().enumerate() {
        let reply = t
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("in-flight request {i} failed: {e}"));
        assert_eq!(reply.into_body(), Bytes::from(vec![i as u8]));
    }
    tokio::time::timeout(5 * SECOND, shutdown).await.unwrap().unwrap();
    let closed = wait_event(&mut client_events, 5 * SECOND, |e| {
        matches!(e, ConnectionEvent::Closed { .. })
    })
    .await;
    assert!(
        matches!(
            closed,
            Some(ConnectionEvent::Closed {
                reason: CloseReason::GoAway {
                    reason: GoAwayReason::Shutdown,
                    ..
                },
                ..
            })
        ),
        "{closed:?}"
    );
}

/// The GOAWAY's promise, raced: a client that has read it is refused a new connection. The
/// connections used to send their GOAWAY as the accept loop was told to stop, so now and then one
/// arrived while the listener still accepted (found by CI).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_has_read_goaway_is_refused_a_new_connection_every_time() {
    for round in 0..300 {
        let server = echo_server(ServerConfig::default()).await;
        let addr = server.local_addr();
        let client = Client::connect(addr, quiet_client()).await.unwrap();
        let mut events = client.events();
        let shutdown = tokio::spawn(server.shutdown());
        let goaway = wait_event(&mut events, 5 * SECOND, |e| {
            matches!(e, ConnectionEvent::GoAwayReceived { .. })
        })
        .await;
        assert!(goaway.is_some(), "round {round}: no GOAWAY");
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "round {round}: the listener still accepted after the GOAWAY"
        );
        tokio::time::timeout(5 * SECOND, shutdown).await.unwrap().unwrap();
    }
}
