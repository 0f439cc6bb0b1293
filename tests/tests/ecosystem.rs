//! The conventions tonic users bring, and what tower users rely on: backpressure through
//! `poll_ready`, per-service interceptors, the peer's address and certificate in handlers,
//! `serve_with_shutdown`, tonic-style requests, and errors as statuses.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use examples::echo::echo_client::EchoClient;
use examples::echo::echo_server::{Echo, EchoServer};
use examples::echo::{EchoReply, EchoRequest};
use examples::greeter::v1::greeter_client::GreeterClient;
use examples::greeter::v1::greeter_server::GreeterServer;
use examples::greeter::v1::HelloRequest;
use examples::services::{EchoService, GreeterService};
use rpc_client::{Client, ClientConfig, Code, ErrorKind};
use rpc_core::config::ConnectionConfig;
use rpc_server::{InterceptedService, Request, Response, Server, ServerConfig, Status};
use tests::proxy::{Direction, Fault, FaultProxy};
use tower::{Service, ServiceExt};

const ECHO_SAY: &str = "/echo.Echo/Say";

fn echo(message: &str, payload: usize) -> Bytes {
    use prost::Message;
    EchoRequest {
        message: message.into(),
        payload: Bytes::from(vec![7; payload]),
        ..EchoRequest::default()
    }
    .encode_to_vec()
    .into()
}

/// Polls `svc.poll_ready` once, without waiting.
fn ready_now<S: Service<rpc_client::Request<Bytes>>>(svc: &mut S) -> Poll<Result<(), S::Error>> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    svc.poll_ready(&mut cx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_shed_over_a_client_sheds_while_the_connections_queue_is_full() {
    let server = Server::builder()
        .add_service(EchoServer::new(EchoService::default()))
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let proxy = FaultProxy::start(server.local_addr()).await;
    let config = ClientConfig {
        request_timeout: Duration::from_secs(30),
        // The default queue (1024 frames, 1 MiB): the bytes run out first.
        connection: ConnectionConfig::default(),
        tcp: rpc_core::config::TcpConfig {
            send_buffer_size: Some(64 * 1024),
            ..rpc_core::config::TcpConfig::default()
        },
        ..tests::quiet_client()
    };
    let client = Client::connect(proxy.addr(), config).await.unwrap();
    let mut probe = client.clone();
    assert!(
        matches!(ready_now(&mut probe), Poll::Ready(Ok(()))),
        "an idle connection is ready"
    );

    // The server side stops reading: requests pile up in the socket buffers, the write buffer,
    // then the connection's queue, and poll_ready turns pending.
    proxy.set(Fault::StopReading(Direction::ToServer));
    let mut queued = Vec::new();
    while queued.len() < 2000 {
        if ready_now(&mut probe).is_pending() {
            break;
        }
        let c = client.clone();
        queued.push(tokio::spawn(async move {
            c.unary(Request::for_method(ECHO_SAY, echo("queued", 64 * 1024))).await
        }));
        tokio::task::yield_now().await;
    }
    assert!(
        ready_now(&mut probe).is_pending(),
        "still ready after {} requests of 64 KiB into a stalled connection",
        queued.len()
    );
    eprintln!(
        "ecosystem: poll_ready pending after {} requests of 64 KiB into a stalled connection",
        queued.len()
    );

    // Over the full queue, LoadShed refuses at once, without sending.
    let shed = tower::ServiceBuilder::new().load_shed().service(client.clone());
    for _ in 0..20 {
        let err = shed
            .clone()
            .oneshot(Request::for_method(ECHO_SAY, echo("shed", 16)))
            .await
            .unwrap_err();
        assert!(err.is::<tower::load_shed::error::Overloaded>(), "{err}");
    }

    // The server reads again: everything queued is answered (nothing lost), and the client is
    // ready again, so LoadShed lets requests through.
    proxy.set(Fault::Pass);
    for q in queued {
        q.await.unwrap().unwrap();
    }
    tokio::time::timeout(Duration::from_secs(5), probe.ready())
        .await
        .unwrap()
        .unwrap();
    shed.oneshot(Request::for_method(ECHO_SAY, echo("through", 16)))
        .await
        .unwrap();
}

/// An echo reply carrying `message`.
fn reply(message: String) -> Result<Response<EchoReply>, Status> {
    Ok(Response::new(EchoReply {
        message,
        ..EchoReply::default()
    }))
}

/// Echo that counts its executions; gated, it says when a request entered it and answers only
/// once released.
#[derive(Clone, Default)]
struct Entered {
    ran: Arc<AtomicUsize>,
    gated: bool,
    entered: Arc<tokio::sync::Notify>,
    release: Arc<tokio::sync::Notify>,
}

impl Entered {
    fn gated() -> Self {
        Entered {
            gated: true,
            ..Entered::default()
        }
    }
}

impl Echo for Entered {
    async fn say(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        self.ran.fetch_add(1, Ordering::SeqCst);
        if self.gated {
            self.entered.notify_one();
            self.release.notified().await;
        }
        reply(request.into_body().message)
    }

    async fn fail(&self, _request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        Err(Status::application("failed"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_service_interceptor_guards_one_service_and_its_refusals_are_not_executed() {
    let echo_service = Entered::default();
    let ran = echo_service.ran.clone();
    let guarded = InterceptedService::new(EchoServer::new(echo_service), |req: Request<Bytes>| {
        match req.metadata().get_str("authorization") {
            Some("Bearer s3cret") => Ok(req),
            _ => Err(Status::unauthenticated("no valid token")),
        }
    });
    let server = Server::builder()
        .add_service(guarded)
        .add_service(GreeterServer::new(GreeterService))
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let client = Client::connect(server.local_addr(), tests::quiet_client())
        .await
        .unwrap();
    let mut echo = EchoClient::new(client.clone());
    let msg = || EchoRequest {
        message: "hi".into(),
        ..EchoRequest::default()
    };

    let err = echo.say(msg()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(!err.may_have_executed(), "refused by the interceptor: {err}");
    assert_eq!(ran.load(Ordering::SeqCst), 0);

    // The tonic form: a Request around the message, with metadata; the generated client sets
    // the method.
    let mut req = Request::new(msg());
    req.metadata_mut().insert("authorization", "Bearer s3cret");
    let reply = echo.say(req).await.unwrap();
    assert_eq!(reply.into_inner().message, "hi");
    assert_eq!(ran.load(Ordering::SeqCst), 1);

    // The other service on the same server has no interceptor.
    let mut greeter = GreeterClient::new(client);
    greeter
        .say_hello(HelloRequest {
            person: Some(examples::greeter::v1::Person {
                name: "ann".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
}

/// Answers with what the handler saw of its peer: the address, and the client certificate's
/// subject (or "none").
#[derive(Clone)]
struct WhoAmI;

impl Echo for WhoAmI {
    async fn say(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let addr = request.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let subject = match request.peer_certs() {
            Some(chain) => {
                let (_, cert) = x509_parser::parse_x509_certificate(chain[0].as_ref())
                    .map_err(|e| Status::internal(e.to_string()))?;
                cert.subject().to_string()
            }
            None => "none".to_owned(),
        };
        reply(format!("{addr} {subject}"))
    }

    async fn fail(&self, _request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        Err(Status::application("failed"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_reads_the_peer_address_and_the_client_certificates_subject() {
    // Plain TCP: the address, no certificate.
    let server = Server::builder()
        .add_service(EchoServer::new(WhoAmI))
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let mut echo = EchoClient::connect(server.local_addr(), tests::quiet_client())
        .await
        .unwrap();
    let seen = echo.say(EchoRequest::default()).await.unwrap().into_inner().message;
    let (addr, subject) = seen.split_once(' ').unwrap();
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    assert_eq!(addr.ip(), server.local_addr().ip());
    assert_ne!(
        addr.port(),
        server.local_addr().port(),
        "the client's end, not the server's"
    );
    assert_eq!(subject, "none");

    // Mutual TLS: the verified client certificate's subject.
    let pki = tests::pki::TestPki::new();
    let mut tls = rpc_core::tls::TlsServerConfig::new(pki.path("server.pem"), pki.path("server-key.pem"));
    tls.client_ca_file = Some(pki.path("ca.pem"));
    let server = Server::builder()
        .config(ServerConfig {
            tls: Some(tls),
            ..ServerConfig::default()
        })
        .add_service(EchoServer::new(WhoAmI))
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let mut client_tls = rpc_core::tls::TlsClientConfig::new(pki.path("ca.pem"));
    client_tls.cert_file = Some(pki.path("client.pem"));
    client_tls.key_file = Some(pki.path("client-key.pem"));
    let config = ClientConfig {
        tls: Some(client_tls),
        ..tests::quiet_client()
    };
    let mut echo = EchoClient::connect(server.local_addr(), config).await.unwrap();
    let seen = echo.say(EchoRequest::default()).await.unwrap().into_inner().message;
    assert!(seen.ends_with(" CN=tether test client"), "{seen}");
    assert!(seen.starts_with("127.0.0.1:"), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_shutdown_serves_until_the_signal_then_drains_the_requests_in_flight() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let gate = Entered::gated();
    let server = tokio::spawn(
        Server::builder()
            .add_service(EchoServer::new(gate.clone()))
            .serve_with_shutdown(addr, async {
                let _ = stopped.await;
            }),
    );
    let echo = loop {
        match EchoClient::connect(addr, tests::quiet_client()).await {
            Ok(c) => break c,
            Err(_) => tokio::task::yield_now().await, // not bound yet
        }
    };
    // A request in flight when the signal comes runs to its end.
    let slow = tokio::spawn({
        let mut echo = echo.clone();
        async move {
            echo.say(EchoRequest {
                message: "slow".into(),
                ..EchoRequest::default()
            })
            .await
        }
    });
    gate.entered.notified().await;
    stop.send(()).unwrap();
    // The server is draining, its request still in flight: new connections are refused.
    tests::wait_until(Duration::from_secs(5), || std::net::TcpStream::connect(addr).is_err()).await;
    assert!(!slow.is_finished());
    gate.release.notify_one();
    assert_eq!(slow.await.unwrap().unwrap().into_inner().message, "slow");
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after serve_with_shutdown returned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_a_method_fails_typed_and_errors_become_statuses() {
    let server = Server::builder()
        .add_service(EchoServer::new(EchoService::default()))
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let client = Client::connect(server.local_addr(), tests::quiet_client())
        .await
        .unwrap();
    // The tonic form on the raw client: no method, never sent.
    let err = client.unary(Request::new(echo("hi", 0))).await.unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::NoMethod), "{err}");
    assert!(!err.may_have_executed());
    assert_eq!(err.code(), Code::InvalidArgument);

    // A handler passing on a downstream failure: the server's status as it was...
    let failed = client
        .unary(Request::for_method("/echo.Echo/Fail", echo("why", 0)))
        .await
        .unwrap_err();
    let status = Status::from(failed);
    assert_eq!((status.code(), status.message()), (Code::ApplicationError, "why"));
    // ...and a failure of this side or the connection, by its code.
    server.shutdown().await;
    let gone = client
        .unary(Request::for_method(ECHO_SAY, echo("hi", 0)))
        .await
        .unwrap_err();
    let status = Status::from(gone);
    assert_eq!(status.code(), Code::Unavailable, "{status}");
}

/// The next status of a health watch (`None` when it ended), within 5 s.
async fn next(
    w: &mut rpc_client::Streaming<rpc_client::health::Response>,
) -> Option<rpc_client::health::ServingStatus> {
    use futures_util::StreamExt;
    tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .expect("a status within 5 s")
        .map(|r| r.unwrap().status())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_service_reports_each_service_and_a_graceful_shutdown_as_not_serving() {
    use rpc_client::health::{self, ServingStatus};
    let gate = Entered::gated();
    let server = Server::builder()
        .config(ServerConfig {
            shutdown_grace: Duration::from_secs(20),
            ..ServerConfig::default()
        })
        .health()
        .add_service(EchoServer::new(gate.clone()))
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let client = Client::connect(server.local_addr(), tests::quiet_client())
        .await
        .unwrap();
    assert_eq!(health::check(&client, "").await.unwrap(), ServingStatus::Serving);
    assert_eq!(
        health::check(&client, "echo.Echo").await.unwrap(),
        ServingStatus::Serving
    );
    let unknown = health::check(&client, "no.Such").await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown}");

    // The application marks a service down and up again; watchers see each change.
    let mut watch = health::watch(&client, "echo.Echo").await.unwrap();
    assert_eq!(next(&mut watch).await, Some(ServingStatus::Serving));
    let reporter = server.health().unwrap().clone();
    reporter.set_not_serving("echo.Echo");
    assert_eq!(next(&mut watch).await, Some(ServingStatus::NotServing));
    assert_eq!(
        health::check(&client, "echo.Echo").await.unwrap(),
        ServingStatus::NotServing
    );
    reporter.set_serving("echo.Echo");
    assert_eq!(next(&mut watch).await, Some(ServingStatus::Serving));
    // A service the server learns of later: unknown, then serving.
    let mut later = health::watch(&client, "later.Service").await.unwrap();
    assert_eq!(next(&mut later).await, Some(ServingStatus::ServiceUnknown));
    reporter.set_serving("later.Service");
    assert_eq!(next(&mut later).await, Some(ServingStatus::Serving));

    // A graceful shutdown with a request in flight: the watch says NOT_SERVING and ends while the
    // request still runs, and the shutdown does not wait out its 20 s grace for watchers.
    let slow = tokio::spawn({
        let mut echo = EchoClient::new(client.clone());
        async move {
            echo.say(EchoRequest {
                message: "slow".into(),
                ..EchoRequest::default()
            })
            .await
        }
    });
    gate.entered.notified().await;
    let started = tokio::time::Instant::now();
    let stopping = tokio::spawn(server.shutdown());
    assert_eq!(next(&mut watch).await, Some(ServingStatus::NotServing));
    assert_eq!(next(&mut watch).await, None, "the watch ends with the drain");
    // Stopping is for good: the application cannot turn a draining server back to SERVING.
    reporter.set_serving("echo.Echo");
    assert_eq!(reporter.status("echo.Echo"), Some(ServingStatus::NotServing));
    assert!(!slow.is_finished(), "the request in flight is still running");
    gate.release.notify_one();
    assert_eq!(slow.await.unwrap().unwrap().into_inner().message, "slow");
    stopping.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
}

/// A server whose Say handler counts its runs and echoes, behind a proxy that counts bytes.
async fn compressing_pair(
    server_config: ServerConfig,
    compression: Option<rpc_core::compression::Encoding>,
) -> (rpc_server::ServerHandle, FaultProxy, Client, Arc<AtomicUsize>) {
    let ran = Arc::new(AtomicUsize::new(0));
    let counter = ran.clone();
    let server = Server::builder()
        .config(server_config)
        .route(
            ECHO_SAY,
            rpc_server::handler_fn(move |req: Request<Bytes>| {
                counter.fetch_add(1, Ordering::SeqCst);
                async move { Ok(Response::new(req.into_body())) }
            }),
        )
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let proxy = FaultProxy::start(server.local_addr()).await;
    let config = ClientConfig {
        compression,
        ..tests::quiet_client()
    };
    let client = Client::connect(proxy.addr(), config).await.unwrap();
    (server, proxy, client, ran)
}

/// 1 MiB of text that compresses well.
fn compressible() -> Bytes {
    let line = b"every request resolves exactly once with a typed answer\n";
    Bytes::from(line.iter().copied().cycle().take(1 << 20).collect::<Vec<u8>>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_round_trips_and_shrinks_a_compressible_mebibyte_both_ways() {
    use rpc_core::compression::Encoding;
    for encoding in [Encoding::Zstd, Encoding::Gzip] {
        let (_server, proxy, client, _) = compressing_pair(ServerConfig::default(), Some(encoding)).await;
        let (up0, down0) = (proxy.bytes(Direction::ToServer), proxy.bytes(Direction::ToClient));
        let resp = client
            .unary(Request::for_method(ECHO_SAY, compressible()))
            .await
            .unwrap();
        assert_eq!(resp.body(), &compressible(), "{encoding:?}: the body round trips");
        let up = proxy.bytes(Direction::ToServer) - up0;
        let down = proxy.bytes(Direction::ToClient) - down0;
        eprintln!("ecosystem: 1 MiB each way with {encoding:?}: {up} bytes up, {down} bytes down");
        assert!(
            up < (1 << 20) / 20 && down < (1 << 20) / 20,
            "{encoding:?}: {up} up, {down} down"
        );

        // Opted out per message: sent as it is (and answered compressed still).
        let mut req = Request::for_method(ECHO_SAY, compressible());
        req.set_compress(false);
        let up0 = proxy.bytes(Direction::ToServer);
        client.unary(req).await.unwrap();
        assert!(
            proxy.bytes(Direction::ToServer) - up0 >= 1 << 20,
            "{encoding:?}: opted out"
        );
    }
    // A server with compression off announces no codec: the client sends plain bodies.
    let off = ServerConfig {
        compression: false,
        ..ServerConfig::default()
    };
    let (_server, proxy, client, _) = compressing_pair(off, Some(Encoding::Zstd)).await;
    let resp = client
        .unary(Request::for_method(ECHO_SAY, compressible()))
        .await
        .unwrap();
    assert_eq!(resp.body(), &compressible());
    assert!(proxy.bytes(Direction::ToServer) >= 1 << 20);
    assert!(proxy.bytes(Direction::ToClient) >= 1 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compression_bomb_is_refused_unexpanded_and_the_connection_serves_on() {
    use rpc_core::compression::{compress, Encoding, ENCODING};
    let (_server, _proxy, client, ran) = compressing_pair(ServerConfig::default(), None).await;
    // 64 MiB of zeros, about 2 KiB compressed, against the server's 4 MiB max_frame_size.
    for encoding in [Encoding::Zstd, Encoding::Gzip] {
        let bomb = compress(encoding, &vec![0u8; 64 << 20]);
        assert!(bomb.len() < 256 * 1024, "{} bytes", bomb.len());
        let mut req = Request::for_method(ECHO_SAY, bomb);
        req.metadata_mut().insert(ENCODING, encoding.as_str());
        let err = client.unary(req).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
        assert!(!err.may_have_executed(), "refused before the handler: {err}");
        assert!(err.to_string().contains("expands past"), "{err}");
    }
    // A corrupt body, and an unknown codec: refused as such.
    for (name, body, code) in [
        ("zstd", Bytes::from_static(b"not zstd at all"), Code::InvalidArgument),
        ("br", Bytes::from_static(b"whatever"), Code::Unimplemented),
    ] {
        let mut req = Request::for_method(ECHO_SAY, body);
        req.metadata_mut().insert(ENCODING, name);
        let err = client.unary(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{err}");
        assert!(!err.may_have_executed(), "{err}");
    }
    assert_eq!(ran.load(Ordering::SeqCst), 0, "the handler never ran");
    // Only those requests failed: the connection serves the next.
    client
        .unary(Request::for_method(ECHO_SAY, echo("after", 0)))
        .await
        .unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 1);

    // A server with compression off expands nothing: a compressed body is refused unread.
    let off = ServerConfig {
        compression: false,
        ..ServerConfig::default()
    };
    let (_server, _proxy, client, ran) = compressing_pair(off, None).await;
    let mut req = Request::for_method(ECHO_SAY, compress(Encoding::Zstd, &compressible()));
    req.metadata_mut().insert(ENCODING, "zstd");
    let err = client.unary(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err}");
    assert!(!err.may_have_executed());
    assert_eq!(ran.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_that_expands_past_the_clients_max_frame_size_is_refused() {
    use rpc_core::compression::{compress, Encoding, ENCODING};
    let server = Server::builder()
        .route(
            "/t.T/Bomb",
            rpc_server::handler_fn(|_req: Request<Bytes>| async move {
                let mut resp = Response::new(compress(Encoding::Zstd, &vec![0u8; 64 << 20]));
                resp.metadata_mut().insert(ENCODING, "zstd");
                Ok(resp)
            }),
        )
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let config = ClientConfig {
        compression: Some(Encoding::Zstd),
        ..tests::quiet_client()
    };
    let client = Client::connect(server.local_addr(), config).await.unwrap();
    let err = client
        .unary(Request::for_method("/t.T/Bomb", Bytes::new()))
        .await
        .unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::Decompress(_)), "{err}");
    assert!(err.may_have_executed(), "the handler ran: {err}");
}
