//! tower layers stacked on the tether client and server behave as documented.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use examples::auth::{require_bearer, with_bearer};
use examples::echo::echo_client::EchoClient;
use examples::echo::echo_server::EchoServer;
use examples::echo::EchoRequest;
use examples::services::EchoService;
use rpc_client::{Client, ClientConfig, Code, ErrorKind, Request, SafeRetry};
use rpc_core::{Response, Status};
use rpc_server::{handler_fn, Server, ServerConfig};
use tests::{echo_server, gate_server, quiet_client, Gate};
use tokio::time::Instant;
use tower::limit::{ConcurrencyLimitLayer, RateLimitLayer};
use tower::load_shed::LoadShedLayer;
use tower::retry::RetryLayer;
use tower::timeout::TimeoutLayer;
use tower::{Service, ServiceBuilder, ServiceExt};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn slow(delay_ms: u32) -> EchoRequest {
    EchoRequest {
        message: "x".into(),
        delay_ms,
        ..Default::default()
    }
}

#[tokio::test]
async fn timeout_layer_bounds_a_call_on_the_client() {
    let server = echo_server(ServerConfig::default()).await;
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    let stack = ServiceBuilder::new().layer(TimeoutLayer::new(ms(100))).service(client);
    let mut echo = EchoClient::new(stack);
    let start = Instant::now();
    let err = echo.say(slow(2000)).await.unwrap_err();
    assert!(err.is_deadline_exceeded(), "{err}");
    assert!(err.may_have_executed(), "timed out after sending: it may have run");
    assert!(start.elapsed() < ms(400), "{:?}", start.elapsed());
    // Fast calls pass through.
    echo.say(slow(0)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_layer_caps_requests_in_flight() {
    let (server, mut control) = gate_server().await;
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    // Buffer makes the limited stack cloneable for the callers.
    let stack = ServiceBuilder::new()
        .buffer(64)
        .layer(ConcurrencyLimitLayer::new(2))
        .service(client);
    let mut calls = Vec::new();
    for i in 0..5u8 {
        let mut svc = stack.clone();
        calls.push(tokio::spawn(async move {
            svc.ready()
                .await
                .unwrap()
                .call(Request::for_method("/test.Gate/Hold", Bytes::from(vec![i])))
                .await
        }));
    }
    control.wait_arrivals(2).await;
    // Only two are let through while those two are held.
    assert!(
        tokio::time::timeout(ms(300), control.arrived.recv()).await.is_err(),
        "a third request got through"
    );
    control.release(5);
    control.wait_arrivals(3).await;
    for c in calls {
        c.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn rate_limit_layer_spaces_requests() {
    let server = echo_server(ServerConfig::default()).await;
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    let stack = ServiceBuilder::new()
        .buffer(16)
        .layer(RateLimitLayer::new(2, ms(200)))
        .service(client);
    let mut echo = EchoClient::new(stack);
    let start = Instant::now();
    for _ in 0..6 {
        echo.say(slow(0)).await.unwrap();
    }
    // 2 per 200 ms: the 5th and 6th wait for the third window.
    assert!(start.elapsed() >= ms(400), "{:?}", start.elapsed());
}

#[tokio::test]
async fn load_shed_over_a_concurrency_limit_refuses_at_once_without_sending() {
    let (server, mut control) = gate_server().await;
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    let mut stack = ServiceBuilder::new()
        .layer(LoadShedLayer::new())
        .layer(ConcurrencyLimitLayer::new(1))
        .service(client);
    let held = stack
        .ready()
        .await
        .unwrap()
        .call(Request::for_method("/test.Gate/Hold", Bytes::new()));
    let held = tokio::spawn(held);
    control.wait_arrivals(1).await;
    let start = Instant::now();
    let shed = stack
        .ready()
        .await
        .unwrap()
        .call(Request::for_method("/test.Gate/Hold", Bytes::new()))
        .await
        .unwrap_err();
    let err = rpc_client::Error::from_box(shed);
    assert!(matches!(err.kind(), ErrorKind::Middleware(_)), "{err}");
    assert!(!err.may_have_executed(), "shed before sending");
    assert!(start.elapsed() < ms(50));
    control.release(1);
    held.await.unwrap().unwrap();
    assert!(
        tokio::time::timeout(ms(100), control.arrived.recv()).await.is_err(),
        "the shed request never reached the server"
    );
}

/// A route that answers UNAVAILABLE (proves it did not run) `fail_first` times, then succeeds,
/// or fails with APPLICATION_ERROR every time when `fail_first` is `usize::MAX`.
/// A server whose first `fail_first` requests are refused by a layer before the handler (it fails
/// with `Refused`, so the runtime answers UNAVAILABLE, "not executed"); `usize::MAX`: every request runs and fails.
/// Counts the requests that reached it.
async fn flaky_server(fail_first: usize) -> (rpc_server::ServerHandle, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let server = Server::builder()
        .layer(tower::filter::FilterLayer::new(move |req: Request<Bytes>| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            if fail_first != usize::MAX && n < fail_first {
                Err(rpc_server::Refused(Status::new(Code::Unavailable, "not now")))
            } else {
                Ok(req)
            }
        }))
        .route(
            "/t.T/Flaky",
            handler_fn(move |_req: Request<Bytes>| async move {
                if fail_first == usize::MAX {
                    Err(Status::application("ran and failed"))
                } else {
                    Ok(Response::new(Bytes::from_static(b"ok")))
                }
            }),
        )
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    (server, calls)
}

#[tokio::test]
async fn retry_layer_with_the_safe_retry_policy_retries_only_what_did_not_run() {
    // The client's own retries off, so the layer's work is visible.
    let config = ClientConfig {
        max_attempts: 1,
        ..quiet_client()
    };
    let (server, calls) = flaky_server(2).await;
    let client = Client::connect(server.local_addr(), config.clone()).await.unwrap();
    let mut bare = client.clone();
    let err = bare
        .ready()
        .await
        .unwrap()
        .call(Request::for_method("/t.T/Flaky", Bytes::new()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    let mut retried = ServiceBuilder::new()
        .layer(RetryLayer::new(SafeRetry::new(3)))
        .service(client);
    let resp = retried
        .ready()
        .await
        .unwrap()
        .call(Request::for_method("/t.T/Flaky", Bytes::new()))
        .await
        .unwrap();
    assert_eq!(resp.into_body(), Bytes::from_static(b"ok"));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "one bare call, one refused and one successful retry"
    );

    // A failure after the handler ran is not retried...
    let (server, calls) = flaky_server(usize::MAX).await;
    let client = Client::connect(server.local_addr(), config).await.unwrap();
    let mut retried = ServiceBuilder::new()
        .layer(RetryLayer::new(SafeRetry::new(3)))
        .service(client);
    let err = retried
        .ready()
        .await
        .unwrap()
        .call(Request::for_method("/t.T/Flaky", Bytes::new()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ApplicationError);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // ...unless the caller marks it idempotent.
    let mut req = Request::for_method("/t.T/Flaky", Bytes::new());
    req.set_idempotent(true);
    let _ = retried.ready().await.unwrap().call(req).await.unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 1 + 4);
}

#[tokio::test]
async fn safe_retry_does_not_repeat_a_refusal_that_would_come_again() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let server = Server::builder()
        .layer(tower::filter::FilterLayer::new(move |_req: Request<Bytes>| {
            c.fetch_add(1, Ordering::SeqCst);
            Err::<Request<Bytes>, _>(rpc_server::Refused(Status::unauthenticated("no token")))
        }))
        .route(
            "/t.T/Flaky",
            handler_fn(|_req: Request<Bytes>| async move { Ok(Response::new(Bytes::new())) }),
        )
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let config = ClientConfig {
        max_attempts: 1,
        ..quiet_client()
    };
    let client = Client::connect(server.local_addr(), config).await.unwrap();
    let mut retried = ServiceBuilder::new()
        .layer(RetryLayer::new(SafeRetry::new(3)))
        .service(client);
    let mut req = Request::for_method("/t.T/Flaky", Bytes::new());
    req.set_idempotent(true);
    let err = retried.ready().await.unwrap().call(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(!err.may_have_executed());
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "a refusal that would come again is not retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safe_retry_backs_off_from_the_second_retry_within_the_deadline() {
    let config = ClientConfig {
        max_attempts: 1,
        ..quiet_client()
    };
    let backoff = rpc_client::BackoffConfig {
        initial: Duration::from_millis(60),
        multiplier: 2.0,
        jitter: 0.0,
        max: Duration::from_secs(5),
        ..Default::default()
    };
    // Three refusals, then an answer: retries at once, after 60 ms, after 120 ms.
    let (server, calls) = flaky_server(3).await;
    let client = Client::connect(server.local_addr(), config.clone()).await.unwrap();
    let mut retried = ServiceBuilder::new()
        .layer(RetryLayer::new(SafeRetry::new(3).with_backoff(backoff)))
        .service(client);
    let start = tokio::time::Instant::now();
    retried
        .ready()
        .await
        .unwrap()
        .call(Request::for_method("/t.T/Flaky", Bytes::new()))
        .await
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    assert!(start.elapsed() >= Duration::from_millis(180), "{:?}", start.elapsed());
    // The backoff never outlasts the request's deadline: it fails at the deadline, not after.
    let (server, _) = flaky_server(usize::MAX).await;
    let client = Client::connect(server.local_addr(), config).await.unwrap();
    let long = rpc_client::BackoffConfig {
        initial: Duration::from_secs(30),
        ..backoff
    };
    let mut retried = ServiceBuilder::new()
        .layer(RetryLayer::new(SafeRetry::new(3).with_backoff(long)))
        .service(client);
    let mut req = Request::for_method("/t.T/Flaky", Bytes::new());
    req.set_idempotent(true);
    req.set_timeout(Duration::from_millis(300));
    let start = tokio::time::Instant::now();
    let err = retried.ready().await.unwrap().call(req).await.unwrap_err();
    // One immediate retry, then a 30 s wait that would pass the deadline: not made. The request
    // ends with the handler's error (both attempts ran), well before its deadline.
    assert_eq!(err.code(), Code::ApplicationError, "{err}");
    assert_eq!(err.attempts().len(), 1, "{err}");
    assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_load_shed_over_concurrency_limit_answers_server_busy() {
    let (gate, mut control) = Gate::new();
    let server = Server::builder()
        .layer(LoadShedLayer::new())
        .layer(ConcurrencyLimitLayer::new(1))
        .route("/test.Gate/Hold", gate.handler())
        .add_service(EchoServer::new(EchoService::default()))
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    let held = {
        let client = client.clone();
        tokio::spawn(async move { client.unary(Request::for_method("/test.Gate/Hold", Bytes::new())).await })
    };
    // The held request is running in its handler: it has the only slot.
    control.wait_arrivals(1).await;
    let mut echo = EchoClient::new(client);
    let busy = echo.say(slow(0)).await.unwrap_err();
    assert_eq!(busy.code(), Code::ServerBusy, "{busy}");
    assert!(!busy.may_have_executed());
    control.release(1);
    held.await.unwrap().unwrap();
    // The slot is free again, for a request on another connection too (the refused probe left
    // nothing behind on its connection that holds the slot).
    let other = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    EchoClient::new(other).say(slow(0)).await.unwrap();
    echo.say(slow(0)).await.unwrap();
}

#[tokio::test]
async fn interceptor_refuses_requests_without_the_token() {
    let (server, calls) = {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let server = Server::builder()
            .layer(require_bearer("s3cret"))
            .route(
                "/t.T/Secret",
                handler_fn(move |_req: Request<Bytes>| {
                    c.fetch_add(1, Ordering::SeqCst);
                    async { Ok(Response::new(Bytes::from_static(b"secret"))) }
                }),
            )
            .bind("127.0.0.1:0")
            .await
            .unwrap();
        (server, calls)
    };
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    let err = client
        .unary(Request::for_method("/t.T/Secret", Bytes::new()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(calls.load(Ordering::SeqCst), 0, "the handler never ran");

    let mut wrong = Request::for_method("/t.T/Secret", Bytes::new());
    wrong.metadata_mut().insert("authorization", "Bearer guess");
    assert_eq!(client.unary(wrong).await.unwrap_err().code(), Code::Unauthenticated);

    let mut authed = ServiceBuilder::new().layer(with_bearer("s3cret")).service(client);
    let resp = authed
        .ready()
        .await
        .unwrap()
        .call(Request::for_method("/t.T/Secret", Bytes::new()))
        .await
        .unwrap();
    assert_eq!(resp.into_body(), Bytes::from_static(b"secret"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
