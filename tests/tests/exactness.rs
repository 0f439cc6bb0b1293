//! Exactness regressions: each test states what a caller relies on about whether a request ran,
//! whether it ends at all, and whether one request's trouble stays its own. Written against
//! defects reproduced by reviewers; each runs in a few seconds and never waits unbounded.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rand::Rng;
use rpc_client::{BackoffConfig, Client, ClientConfig, Error};
use rpc_core::config::{ConnectionConfig, HeartbeatConfig};
use rpc_core::driver::ConnectionState;
use rpc_core::frame::{Frame, RequestFrame, Settings};
use rpc_core::{BoxError, Code, Request, Response, Status};
use rpc_server::{handler_fn, Server, ServerConfig, ServerHandle};
use tests::proxy::{Fault, FaultProxy};
use tests::{named_server, quiet_client, wait_until, who, Gate, RawPeer};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tower::{Service, ServiceExt};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn any_port() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn fast_backoff() -> BackoffConfig {
    BackoffConfig {
        initial: ms(100),
        multiplier: 1.6,
        jitter: 0.2,
        max: ms(500),
        ..Default::default()
    }
}

/// Awaits `fut` for at most `limit`; a hang fails the test with `what`.
async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within {limit:?} (hung)"),
    }
}

fn count(c: &AtomicUsize) -> usize {
    c.load(Ordering::SeqCst)
}

/// A server whose `/t.Side/Effect` records a run in `ledger` and then answers `code`.
async fn side_effect_then(code: Code, ledger: Arc<AtomicUsize>) -> ServerHandle {
    Server::builder()
        .route(
            "/t.Side/Effect",
            handler_fn(move |_req: Request<Bytes>| {
                let ledger = ledger.clone();
                async move {
                    ledger.fetch_add(1, Ordering::SeqCst);
                    Err::<Response<Bytes>, _>(Status::new(code, "side effect done, then the handler failed"))
                }
            }),
        )
        .bind("127.0.0.1:0")
        .await
        .unwrap()
}

/// Defect 1: a handler that ran, then answered UNAVAILABLE/SERVER_BUSY/NOT_FOUND, ran once and may_have_executed.
#[tokio::test]
async fn handler_returned_unavailable_busy_or_not_found_runs_once_and_may_have_executed() {
    let mut wrong = Vec::new();
    for code in [Code::Unavailable, Code::ServerBusy, Code::NotFound] {
        // Two endpoints sharing one ledger, so a retry (SERVER_BUSY is retried only with another
        // endpoint alive) is reachable and counted wherever it lands.
        let ledger = Arc::new(AtomicUsize::new(0));
        let a = side_effect_then(code, ledger.clone()).await;
        let b = side_effect_then(code, ledger.clone()).await;
        let client = Client::with_endpoints([a.local_addr(), b.local_addr()], quiet_client()).unwrap();
        wait_until(Duration::from_secs(3), || client.holder().alive_endpoints() == 2).await;
        let req = Request::for_method("/t.Side/Effect", Bytes::from_static(b"x")).with_timeout(ms(2000));
        let err = within(ms(3000), "the request", client.unary(req)).await.unwrap_err();
        let runs = count(&ledger);
        assert_eq!(err.code(), code, "{err}");
        if runs != 1 || !err.may_have_executed() {
            wrong.push(format!(
                "{code}: ran {runs} times, may_have_executed={}",
                err.may_have_executed()
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "expected 1 run and may_have_executed=true; got {}",
        wrong.join("; ")
    );
}

/// Defect 2: an idempotent request that ran, then lost its connection, ends may_have_executed though no retry connects.
#[tokio::test]
async fn idempotent_retry_that_cannot_connect_still_reports_may_have_executed() {
    let (gate, mut control) = Gate::new();
    let ledger = Arc::new(AtomicUsize::new(0));
    let held = gate.handler();
    let server = {
        let ledger = ledger.clone();
        Server::builder()
            .route(
                "/t.Hold/Run",
                handler_fn(move |req: Request<Bytes>| {
                    ledger.fetch_add(1, Ordering::SeqCst);
                    held.clone().oneshot(req)
                }),
            )
            .bind("127.0.0.1:0")
            .await
            .unwrap()
    };
    let config = ClientConfig {
        connect_timeout: ms(300),
        backoff: fast_backoff(),
        ..quiet_client()
    };
    let client = Client::connect(server.local_addr(), config).await.unwrap();
    let call = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut req = Request::for_method("/t.Hold/Run", Bytes::from_static(b"once")).with_timeout(ms(2000));
            req.set_idempotent(true);
            client.unary(req).await
        })
    };
    control.wait_arrivals(1).await; // written and running: it has executed
    within(ms(2000), "server abort", server.abort()).await;
    let err = within(ms(3000), "the request", call).await.unwrap().unwrap_err();
    control.release(1);
    assert_eq!(count(&ledger), 1, "the handler ran once");
    assert!(
        err.may_have_executed(),
        "the handler ran, yet the final error says not executed: {err}"
    );
}

/// Defect 3: a caller cancelled during its on-demand connect leaves no wedge: requests succeed once the path heals.
#[tokio::test]
async fn cancelled_caller_during_on_demand_connect_does_not_wedge_the_endpoint() {
    let server = named_server("s", any_port(), ServerConfig::default(), Duration::ZERO).await;
    let proxy = FaultProxy::start(server.addr()).await;
    proxy.set(Fault::Blackhole); // TCP connects, the handshake never completes
    let config = ClientConfig {
        connect_timeout: Duration::from_secs(30),
        check_interval: ms(100),
        backoff: fast_backoff(),
        ..quiet_client()
    };
    // Built and used in the same poll: on this single-threaded runtime the checker has not run
    // yet, so the request's own checkout makes the on-demand connect.
    let client = Client::with_endpoints([proxy.addr()], config).unwrap();
    let cancelled = tokio::time::timeout(
        ms(50),
        client.unary(Request::for_method("/t.T/Who", Bytes::new()).with_timeout(ms(10_000))),
    )
    .await;
    assert!(cancelled.is_err(), "the blackholed request finished: {cancelled:?}");
    proxy.set(Fault::Pass);
    proxy.reset_all(); // the stuck handshake dies
    let healed = Instant::now();
    loop {
        let last_error = match who(&client, ms(300)).await {
            Ok(name) => {
                assert_eq!(name, "s");
                break;
            }
            Err(e) => e.to_string(),
        };
        assert!(
            healed.elapsed() < ms(2500),
            "no success {:?} after the path healed (endpoints {:?}); last error: {last_error}",
            healed.elapsed(),
            client.holder().endpoints()
        );
        tokio::time::sleep(ms(20)).await; // poll interval between attempts
    }
    assert_eq!(server.calls(), 1);
}

/// Defect 4: drains racing finishing handlers answer or provably skip each request and close every connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_drain_with_handlers_finishing_during_it_never_panics_the_driver() {
    const ITERATIONS: usize = 1500;
    // Connections per server: each drains on its own, so one shutdown races several drains.
    const CLIENTS: usize = 4;
    let budget = Duration::from_secs(12);
    let started = Instant::now();
    let (mut ok, mut not_executed, mut drains) = (0usize, 0usize, 0usize);
    let mut wrong = Vec::new();
    for i in 0..ITERATIONS {
        if started.elapsed() > budget {
            break;
        }
        // Runs per request body.
        let ledger: Arc<Mutex<HashMap<Bytes, usize>>> = Arc::default();
        let (arrived_tx, mut arrived) = tokio::sync::mpsc::unbounded_channel::<()>();
        let server = {
            let ledger = ledger.clone();
            Server::builder()
                .route(
                    "/t.Drain/Work",
                    handler_fn(move |req: Request<Bytes>| {
                        let ledger = ledger.clone();
                        let arrived_tx = arrived_tx.clone();
                        async move {
                            let body = req.into_body();
                            *ledger.lock().unwrap().entry(body.clone()).or_default() += 1;
                            let _ = arrived_tx.send(());
                            let pause = rand::rng().random_range(0..=2000u64);
                            tokio::time::sleep(Duration::from_micros(pause)).await;
                            Ok(Response::new(body))
                        }
                    }),
                )
                .bind("127.0.0.1:0")
                .await
                .unwrap()
        };
        let config = ClientConfig {
            connect_timeout: ms(500),
            ..quiet_client()
        };
        let mut calls = Vec::new();
        // Kept until the checks: a dropped client would close its connection before the drain.
        let mut clients = Vec::new();
        for c in 0..CLIENTS {
            let client = Client::connect(server.local_addr(), config.clone()).await.unwrap();
            clients.push(client.clone());
            let body = Bytes::from(format!("{i}/{c}"));
            calls.push((
                body.clone(),
                tokio::spawn(async move {
                    client
                        .unary(Request::for_method("/t.Drain/Work", body).with_timeout(ms(3000)))
                        .await
                }),
            ));
        }
        if i % 2 == 0 {
            // Surely in flight: every handler has started.
            for _ in 0..CLIENTS {
                within(ms(3000), "request arrival", arrived.recv()).await;
            }
        } else {
            tokio::task::yield_now().await; // some may not have been written yet
        }
        let server_conns = server.connections();
        let shutdown = tokio::spawn(server.shutdown());
        let mut results = Vec::new();
        for (body, call) in calls {
            results.push((body, within(ms(5000), "a request during the drain", call).await));
        }
        within(ms(5000), "server shutdown", shutdown).await.unwrap();
        for (body, result) in results {
            let runs = ledger.lock().unwrap().get(&body).copied().unwrap_or(0);
            match result {
                Ok(Ok(_)) if runs == 1 => ok += 1,
                Ok(Err(e)) if !e.may_have_executed() && runs == 0 => not_executed += 1,
                Ok(Ok(_)) => wrong.push(format!("iteration {i}: succeeded but ran {runs}x")),
                Ok(Err(e)) => wrong.push(format!("iteration {i}: {e} (handler ran {runs}x)")),
                Err(join) => wrong.push(format!("iteration {i}: request task failed: {join}")),
            }
        }
        let open: Vec<ConnectionState> = server_conns
            .iter()
            .map(|c| c.state())
            .filter(|s| !matches!(s, ConnectionState::Closed(_)))
            .collect();
        if !open.is_empty() {
            wrong.push(format!(
                "iteration {i}: after shutdown, connections not closed: {open:?}"
            ));
        }
        drains += server_conns.len();
        drop(clients);
    }
    println!(
        "{drains} connection drains in {:?}: {ok} requests ok, {not_executed} not executed, {} wrong",
        started.elapsed(),
        wrong.len()
    );
    assert!(drains >= 400, "only {drains} drains fit the time budget");
    assert!(
        wrong.is_empty(),
        "{} outcomes wrong over {drains} drains: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(4)]
    );
}

/// Defect 5: a request on a connection whose driver died with its runtime resolves; the connection reports Closed.
#[tokio::test]
async fn driver_that_dies_with_its_runtime_fails_requests_instead_of_hanging() {
    let server = named_server("s", any_port(), ServerConfig::default(), Duration::ZERO).await;
    let addr = server.addr();
    let (runtime, client, conn) = within(
        ms(5000),
        "building the client in its own runtime",
        tokio::task::spawn_blocking(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let client = runtime.block_on(async {
                let client = Client::connect(addr, quiet_client()).await.unwrap();
                assert_eq!(who(&client, ms(1000)).await.unwrap(), "s");
                client
            });
            let conn = client.connections()[0].clone();
            (runtime, client, conn)
        }),
    )
    .await
    .unwrap();
    runtime.shutdown_background(); // the driver and checker tasks are dropped
    let outcome = tokio::time::timeout(ms(1500), who(&client, ms(500))).await;
    let state = conn.state();
    assert!(
        outcome.is_ok() && matches!(state, ConnectionState::Closed(_)),
        "request with a 500 ms timeout {}; connection state {state:?}",
        match &outcome {
            Ok(r) => format!("resolved: {r:?}"),
            Err(_) => "still unresolved after 1.5 s".into(),
        }
    );
}

/// Defect 6: one panicking handler fails only its own request (INTERNAL, may have run); its batch mates succeed.
#[tokio::test]
async fn one_handler_panic_fails_only_its_own_request_in_the_batch() {
    let ledger: Arc<Mutex<HashMap<Bytes, usize>>> = Arc::default();
    let server = {
        let ledger = ledger.clone();
        Server::builder()
            .route(
                "/t.Batch/Echo",
                handler_fn(move |req: Request<Bytes>| {
                    let ledger = ledger.clone();
                    async move {
                        let body = req.into_body();
                        *ledger.lock().unwrap().entry(body.clone()).or_default() += 1;
                        if body.as_ref() == b"panic" {
                            panic!("handler panics on purpose");
                        }
                        Ok(Response::new(body))
                    }
                }),
            )
            .bind("127.0.0.1:0")
            .await
            .unwrap()
    };
    let config = ClientConfig {
        connections_per_endpoint: 1,
        ..quiet_client()
    };
    let client = Client::connect(server.local_addr(), config).await.unwrap();
    let call = |body: &'static [u8]| {
        client.unary(Request::for_method("/t.Batch/Echo", Bytes::from_static(body)).with_timeout(ms(3000)))
    };
    // Joined in one task: all six are queued before the connection writes, so they travel (and
    // are read by the server) together.
    // Boxed: six request futures joined are large.
    let (r0, r1, bad, r3, r4, r5) = within(
        ms(5000),
        "six concurrent requests",
        Box::pin(async {
            tokio::join!(
                call(b"r0"),
                call(b"r1"),
                call(b"panic"),
                call(b"r3"),
                call(b"r4"),
                call(b"r5")
            )
        }),
    )
    .await;
    let mut wrong = Vec::new();
    for (name, r) in [("r0", r0), ("r1", r1), ("r3", r3), ("r4", r4), ("r5", r5)] {
        match r {
            Ok(resp) if resp.body().as_ref() == name.as_bytes() => {}
            other => wrong.push(format!("{name}: {other:?}")),
        }
    }
    match &bad {
        Err(e) if e.code() == Code::Internal && e.may_have_executed() => {}
        other => wrong.push(format!("panic: expected INTERNAL, may have executed; got {other:?}")),
    }
    assert_eq!(client.connections().len(), 1, "one connection carried them");
    assert!(
        wrong.is_empty(),
        "innocent requests failed with the panicking one: {}",
        wrong.join("; ")
    );
    assert!(
        ledger.lock().unwrap().values().all(|n| *n == 1),
        "each ran once: {ledger:?}"
    );
}

/// Defect 7: idle eviction does not cut off a request whose handler is still running.
#[tokio::test]
async fn idle_eviction_waits_for_requests_in_flight() {
    let ledger = Arc::new(AtomicUsize::new(0));
    let server = {
        let ledger = ledger.clone();
        Server::builder()
            .config(ServerConfig {
                idle_timeout: Some(ms(500)),
                ..ServerConfig::default()
            })
            .route(
                "/t.Slow/Work",
                handler_fn(move |req: Request<Bytes>| {
                    let ledger = ledger.clone();
                    async move {
                        ledger.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(ms(1000)).await;
                        Ok(Response::new(req.into_body()))
                    }
                }),
            )
            .bind("127.0.0.1:0")
            .await
            .unwrap()
    };
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    let req = Request::for_method("/t.Slow/Work", Bytes::from_static(b"slow")).with_timeout(ms(3000));
    let result = within(ms(4000), "the slow request", client.unary(req)).await;
    assert_eq!(count(&ledger), 1, "ran once");
    let resp = result.unwrap_or_else(|e| panic!("request in flight was cut off by idle eviction: {e}"));
    assert_eq!(resp.into_body(), Bytes::from_static(b"slow"));
}

/// Defect 8a: a 300 KB request frame arriving at 100 KB/s outlives a 1 s partial_frame_timeout and is answered.
#[tokio::test]
async fn partial_frame_timeout_spares_a_large_frame_that_keeps_arriving() {
    let server = Server::builder()
        .config(ServerConfig {
            connection: ConnectionConfig {
                partial_frame_grace: ms(1000),
                ..ConnectionConfig::default()
            },
            ..ServerConfig::default()
        })
        .route(
            "/t.Echo/Say",
            handler_fn(|req: Request<Bytes>| async move { Ok(Response::new(req.into_body())) }),
        )
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let mut raw = RawPeer::connect(server.local_addr()).await;
    raw.send_settings().await;
    let settings = raw.next_frame(ms(2000)).await;
    assert!(matches!(settings, Some(Frame::Settings(_))), "{settings:?}");

    let payload = Bytes::from(vec![7u8; 300 * 1024]);
    let id = raw.next_id();
    let mut encoded = BytesMut::new();
    rpc_core::codec::FrameCodec::default()
        .encode_frame(
            &Frame::Request(RequestFrame {
                id,
                method: "/t.Echo/Say".into(),
                timeout: Some(ms(30_000)),
                payload: payload.clone(),
                ..Default::default()
            }),
            &mut encoded,
        )
        .unwrap();
    // The trickle is the fault: 10 KB every 100 ms, about 3 s for the frame.
    let start = Instant::now();
    let mut write_error = None;
    for chunk in encoded.chunks(10 * 1024) {
        if let Err(e) = raw.stream.write_all(chunk).await {
            write_error = Some(format!("{e} after {:?}", start.elapsed()));
            break;
        }
        tokio::time::sleep(ms(100)).await;
    }
    let mut seen = Vec::new();
    let answer = loop {
        match raw.next_frame(ms(3000)).await {
            Some(Frame::Response(r)) if r.id == id => break Some(r),
            Some(other) => seen.push(format!("{:?}", other.kind())),
            None => break None,
        }
    };
    match answer {
        Some(r) => {
            assert_eq!(r.code, Code::Ok, "{}", r.message);
            assert_eq!(r.payload, payload);
            assert!(seen.is_empty(), "unexpected frames before the answer: {seen:?}");
        }
        None => panic!(
            "no answer: the server closed a frame that was still arriving (frames {seen:?}, write error {write_error:?})"
        ),
    }
}

/// Defect 8b: a 2 MiB response still arriving is proof of life: 200/100 ms heartbeats (1 failure) keep it open.
#[tokio::test]
async fn heartbeat_counts_a_large_response_still_arriving_as_proof_of_life() {
    let big = Bytes::from(vec![1u8; 2 * 1024 * 1024]);
    let server = {
        let big = big.clone();
        Server::builder()
            .route(
                "/t.Big/Get",
                handler_fn(move |_req: Request<Bytes>| {
                    let big = big.clone();
                    async move { Ok(Response::new(big)) }
                }),
            )
            .bind("127.0.0.1:0")
            .await
            .unwrap()
    };
    let proxy = FaultProxy::start(server.local_addr()).await;
    let config = ClientConfig {
        heartbeat: HeartbeatConfig {
            enabled: true,
            interval: ms(200),
            timeout: ms(100),
            max_failures: 1,
            ..Default::default()
        },
        ..ClientConfig::default()
    };
    let client = Client::connect(proxy.addr(), config).await.unwrap();
    // 25 ms per forwarded read of at most 64 KiB: the response takes at least 800 ms, and bytes
    // arrive every 25 ms throughout.
    proxy.set(Fault::Delay(ms(25)));
    let started = Instant::now();
    let result = within(
        ms(6000),
        "the large response",
        client.unary(Request::for_method("/t.Big/Get", Bytes::new()).with_timeout(ms(5000))),
    )
    .await;
    let took = started.elapsed();
    let resp = result.unwrap_or_else(|e| panic!("2 MiB response arriving steadily was cut off after {took:?}: {e}"));
    assert_eq!(resp.body().len(), big.len());
    assert!(
        took > ms(300),
        "the path was not slow enough to test anything: {took:?}"
    );
}

/// Defect 9: a request over the metadata limit fails alone, unexecuted; its neighbour succeeds on the same connection.
#[tokio::test]
async fn request_over_the_metadata_limit_fails_alone_and_spares_its_neighbours() {
    let (gate, mut control) = Gate::new();
    let ledger = Arc::new(AtomicUsize::new(0));
    let server = {
        let ledger = ledger.clone();
        Server::builder()
            .route("/t.Gate/Hold", gate.handler())
            .route("/t.Echo/Say", recording(ledger.clone(), |body| Ok(Response::new(body))))
            .bind("127.0.0.1:0")
            .await
            .unwrap()
    };
    let config = ClientConfig {
        connections_per_endpoint: 1,
        ..quiet_client()
    };
    let client = Client::connect(server.local_addr(), config).await.unwrap();
    let conn_id = client.connections()[0].id();
    let innocent = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .unary(Request::for_method("/t.Gate/Hold", Bytes::from_static(b"innocent")).with_timeout(ms(5000)))
                .await
        })
    };
    control.wait_arrivals(1).await;

    let mut bad = Request::for_method("/t.Echo/Say", Bytes::from_static(b"bad")).with_timeout(ms(2000));
    for i in 0..65 {
        bad.metadata_mut().insert(format!("k{i}"), Bytes::from_static(b"v"));
    }
    let err: Error = within(ms(3000), "the over-limit request", client.unary(bad))
        .await
        .unwrap_err();
    control.release(1);
    let innocent = within(ms(3000), "the innocent request", innocent).await.unwrap();
    assert_eq!(count(&ledger), 0, "the over-limit request never ran");
    assert!(!err.may_have_executed(), "over-limit request: {err}");
    let reply = innocent.unwrap_or_else(|e| panic!("the innocent neighbour failed with the bad request: {e}"));
    assert_eq!(reply.into_body(), Bytes::from_static(b"innocent"));
    assert!(
        client.connections().iter().any(|c| c.id() == conn_id),
        "the shared connection was closed"
    );
}

/// Defect 10: a oneway over the server's max_frame_size returns a not-executed error, not Ok and a silent drop.
#[tokio::test]
async fn oneway_over_the_peer_max_frame_size_returns_a_not_executed_error() {
    let ledger = Arc::new(AtomicUsize::new(0));
    let server = {
        let ledger = ledger.clone();
        Server::builder()
            .config(ServerConfig {
                connection: ConnectionConfig {
                    max_frame_size: 1024,
                    ..ConnectionConfig::default()
                },
                ..ServerConfig::default()
            })
            .route(
                "/t.Log/Write",
                recording(ledger.clone(), |body| Ok(Response::new(body))),
            )
            .bind("127.0.0.1:0")
            .await
            .unwrap()
    };
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    let big = Request::for_method("/t.Log/Write", Bytes::from(vec![0u8; 4096])).with_timeout(ms(2000));
    let result = within(ms(3000), "the oneway call", client.oneway(big)).await;
    match result {
        Err(e) => assert!(!e.may_have_executed(), "nothing was sent: {e}"),
        Ok(()) => panic!("oneway of 4096 bytes to a server with max_frame_size 1024 returned Ok (dropped silently)"),
    }
    // The connection is fine for requests that fit.
    let small = Request::for_method("/t.Log/Write", Bytes::from_static(b"fits")).with_timeout(ms(2000));
    let reply = within(ms(3000), "a request that fits", client.unary(small))
        .await
        .unwrap();
    assert_eq!(reply.into_body(), Bytes::from_static(b"fits"));
    assert_eq!(count(&ledger), 1, "only the request that fits ran");
}

// Defects found in review of the first fix, each a failing test before its fix.

/// A layer that runs the inner call on its own task (isolation / run-to-completion layers do).
#[derive(Clone)]
struct SpawnLayer;

impl<S> tower::Layer<S> for SpawnLayer {
    type Service = SpawnSvc<S>;
    fn layer(&self, inner: S) -> SpawnSvc<S> {
        SpawnSvc(inner)
    }
}

#[derive(Clone)]
struct SpawnSvc<S>(S);

impl<S> Service<Request<Bytes>> for SpawnSvc<S>
where
    S: Service<Request<Bytes>, Response = Response<Bytes>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
{
    type Response = Response<Bytes>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Bytes>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let fut = self.0.call(req);
        Box::pin(async move {
            match tokio::spawn(fut).await {
                Ok(r) => r.map_err(Into::into),
                Err(e) => Err(Box::new(e) as BoxError),
            }
        })
    }
}

/// A handler that records each run in `ledger`, then answers `answer(body)`.
fn recording(
    ledger: Arc<AtomicUsize>,
    answer: fn(Bytes) -> Result<Response<Bytes>, Status>,
) -> impl tower::Service<
    Request<Bytes>,
    Response = Response<Bytes>,
    Error = Status,
    Future = impl Future<Output = Result<Response<Bytes>, Status>> + Send,
> + Clone
       + Send
       + Sync
       + 'static {
    handler_fn(move |req: Request<Bytes>| {
        let ledger = ledger.clone();
        async move {
            ledger.fetch_add(1, Ordering::SeqCst);
            answer(req.into_body())
        }
    })
}

/// Calls `/t.Side/Effect` once: the error, and how many times the handler ran.
async fn call_side_effect(server: &ServerHandle, ledger: &AtomicUsize) -> (Error, usize) {
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    let req = Request::for_method("/t.Side/Effect", Bytes::from_static(b"x")).with_timeout(ms(3000));
    let err = client.unary(req).await.unwrap_err();
    (err, ledger.load(Ordering::SeqCst))
}

/// The entry mark is a task-local: a handler polled on another task is never marked, so its
/// error is sent flagged "not executed", and the client retries a handler that already ran.
#[tokio::test]
async fn review_handler_run_on_a_task_spawned_by_a_layer_may_have_executed() {
    let ledger = Arc::new(AtomicUsize::new(0));
    let server = Server::builder()
        .layer(SpawnLayer)
        .route(
            "/t.Side/Effect",
            recording(ledger.clone(), |_| {
                Err(Status::unavailable("side effect done, dependency down"))
            }),
        )
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let (err, runs) = call_side_effect(&server, &ledger).await;
    assert!(
        runs == 1 && err.may_have_executed(),
        "handler ran {runs} time(s); final error may_have_executed={} ({err})",
        err.may_have_executed()
    );
}

/// A oneway whose frame reached the peer is confirmed only when the whole write buffer drains;
/// if the connection dies first, `finish` fails it NotWritten ("not executed") though the peer
/// has every byte of it.
#[tokio::test]
async fn review_oneway_delivered_before_a_reset_is_not_reported_not_executed() {
    let (addr, accept) = RawPeer::server(Settings {
        max_frame_size: Some(64 << 20),
        ..Settings::default()
    })
    .await;
    let peer = tokio::spawn(async move {
        let mut raw = accept.await;
        let first = raw.next_frame(ms(3000)).await;
        assert!(matches!(first, Some(Frame::Settings(_))), "{first:?}");
        // The small oneway, fully received: a real server would run it now.
        let a = raw.next_frame(ms(3000)).await;
        let got_a = matches!(&a, Some(Frame::Request(r)) if r.oneway && r.payload.is_empty());
        socket2::SockRef::from(&raw.stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(raw); // RST while the big oneway behind it is still in the client's buffer
        got_a
    });
    let config = ClientConfig {
        connection: ConnectionConfig {
            max_outbound_bytes: 64 << 20,
            ..ConnectionConfig::default()
        },
        ..quiet_client()
    };
    let client = Client::connect(addr, config).await.unwrap();
    let a = client.oneway(Request::for_method("/t.Log/A", Bytes::new()).with_timeout(ms(5000)));
    let b = client.oneway(Request::for_method("/t.Log/B", Bytes::from(vec![0u8; 32 << 20])).with_timeout(ms(5000)));
    let (ra, _rb) = tokio::join!(a, b);
    assert!(peer.await.unwrap(), "the peer did not receive oneway A whole");
    if let Err(e) = ra {
        assert!(
            e.may_have_executed(),
            "oneway A reached the peer whole, yet the client says it did not run: {e}"
        );
    }
}

/// An encode failure (over the peer's max_frame_size) is deterministic, yet counts as a
/// retryable "not executed" connection error: every attempt fails the same way.
#[tokio::test]
async fn review_request_over_peer_max_frame_size_is_not_retried() {
    let server = Server::builder()
        .config(ServerConfig {
            connection: ConnectionConfig {
                max_frame_size: 1024,
                ..ConnectionConfig::default()
            },
            ..ServerConfig::default()
        })
        .route(
            "/t.Echo/Say",
            handler_fn(|req: Request<Bytes>| async move { Ok(Response::new(req.into_body())) }),
        )
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    let big = Request::for_method("/t.Echo/Say", Bytes::from(vec![0u8; 4096])).with_timeout(ms(2000));
    let err = client.unary(big).await.unwrap_err();
    assert!(!err.may_have_executed());
    assert!(
        err.attempts().is_empty(),
        "a request that can never be encoded was retried {} time(s): {err}",
        err.attempts().len()
    );
}

/// Judging by the average rate since the first byte lets a peer front-load a frame and then
/// hold it (and its buffer) open for bytes / min_rate: hours for a 4 MiB frame at the defaults,
/// where the old partial_frame_timeout capped it at 30 s.
#[test]
fn review_burst_then_stall_partial_frame_is_not_held_for_hours() {
    let t0 = tokio::time::Instant::now();
    let c = ConnectionConfig::default();
    let mut p = rpc_core::liveness::PartialFrame::default();
    p.on_decoded(c.max_frame_size as usize - 1, t0, c.partial_frame_grace); // all but the last byte, at once
    let held = p.deadline(c.min_receive_rate).unwrap() - t0;
    assert!(
        held <= Duration::from_secs(300),
        "a stalled 4 MiB partial frame is kept for {held:?} with no byte arriving"
    );
}

/// Control: tower's Buffer polls the inner future on the caller's task, so the mark survives.
#[tokio::test]
async fn review_buffer_layer_keeps_the_entry_mark() {
    let ledger = Arc::new(AtomicUsize::new(0));
    let server = Server::builder()
        .layer(tower::buffer::BufferLayer::new(16))
        .route(
            "/t.Side/Effect",
            recording(ledger.clone(), |_| {
                Err(Status::unavailable("side effect done, dependency down"))
            }),
        )
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let (err, runs) = call_side_effect(&server, &ledger).await;
    assert_eq!(runs, 1);
    assert!(err.may_have_executed(), "{err}");
}

/// Review finding: a version-1 client reads SERVER_BUSY, NOT_FOUND and UNAVAILABLE as "not run".
/// A server never sends it a handler's such code as is (only as APPLICATION_ERROR naming it), and
/// sends its own refusals in the codes that client reads as "not run"; a client that announces
/// the NOT_EXECUTED flag gets the codes unchanged.
#[tokio::test]
async fn review_a_version_1_client_is_never_sent_a_handler_code_it_reads_as_not_executed() {
    let server = Server::builder()
        .route(
            "/t.T/Down",
            handler_fn(|_req: Request<Bytes>| async move {
                Err::<Response<Bytes>, _>(Status::unavailable("database down"))
            }),
        )
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let answers = |features: Option<u64>| {
        let addr = server.local_addr();
        async move {
            let mut raw = RawPeer::connect(addr).await;
            raw.send(Frame::Settings(Settings {
                max_frame_size: Some(1 << 20),
                features,
                ..Settings::default()
            }))
            .await;
            let mut out = Vec::new();
            for (id, method) in [(1, "/t.T/Down"), (2, "/t.T/Nope")] {
                raw.send(Frame::Request(RequestFrame {
                    id,
                    method: method.into(),
                    ..Default::default()
                }))
                .await;
                loop {
                    match raw.next_frame(ms(3000)).await {
                        Some(Frame::Response(r)) => {
                            out.push((r.code, r.not_executed, r.message));
                            break;
                        }
                        Some(_) => {}
                        None => panic!("no response to {method}"),
                    }
                }
            }
            out
        }
    };
    let v1 = answers(None).await;
    assert_eq!((v1[0].0, v1[0].1), (Code::ApplicationError, false), "{v1:?}");
    assert!(v1[0].2.starts_with("UNAVAILABLE"), "{v1:?}");
    assert_eq!((v1[1].0, v1[1].1), (Code::NotFound, true), "{v1:?}");
    let v2 = answers(Some(rpc_core::frame::features::NOT_EXECUTED_FLAG)).await;
    assert_eq!((v2[0].0, v2[0].1), (Code::Unavailable, false), "{v2:?}");
    assert_eq!((v2[1].0, v2[1].1), (Code::Unimplemented, true), "{v2:?}");
}
