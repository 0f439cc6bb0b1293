//! What a handler sees of its request's end, and what it passes on: the request's cancellation
//! fires for the work it handed off, detached work runs to its end (and no further than the
//! server's shutdown or abort), and a tether call made in a handler inherits its deadline, so a
//! caller giving up cancels the whole chain.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use examples::echo::{EchoReply, EchoRequest};
use prost::Message;
use rpc_client::{Client, ClientConfig};
use rpc_core::context::Context;
use rpc_core::{Request, Response, Status};
use rpc_server::{detach, handler_fn, Server, ServerConfig, ServerHandle};
use tests::{echo_server, quiet_client};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) -> T {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within 5 s"))
        .unwrap()
}

/// Sends on drop: held by a future to see when it is dropped.
struct OnDrop(Option<mpsc::UnboundedSender<&'static str>>, &'static str);

impl Drop for OnDrop {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(self.1);
        }
    }
}

/// `/t.T/Watch` hands its cancellation to a watcher task, reports "started", and waits forever;
/// the watcher reports "cancelled" when it fires. `/t.T/Echo` answers at once.
async fn watching_server(config: ServerConfig) -> (ServerHandle, mpsc::UnboundedReceiver<&'static str>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let server = Server::builder()
        .config(ServerConfig {
            max_concurrent_requests: 1,
            ..config
        })
        .route(
            "/t.T/Watch",
            handler_fn(move |req: Request<Bytes>| {
                let tx = tx.clone();
                async move {
                    let cancellation = req.cancellation().cloned().expect("a server request has one");
                    let watcher = tx.clone();
                    tokio::spawn(async move {
                        cancellation.cancelled().await;
                        let _ = watcher.send("cancelled");
                    });
                    let _ = tx.send("started");
                    std::future::pending::<()>().await;
                    Ok(Response::new(Bytes::new()))
                }
            }),
        )
        .route(
            "/t.T/Echo",
            handler_fn(|req: Request<Bytes>| async move { Ok(Response::new(req.into_body())) }),
        )
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    (server, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_requests_cancellation_fires_for_the_work_it_handed_off() {
    // The caller drops its call: CANCEL.
    let (server, mut events) = watching_server(ServerConfig::default()).await;
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    let call = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .unary(Request::for_method("/t.T/Watch", Bytes::new()).with_timeout(ms(60_000)))
                .await
        })
    };
    assert_eq!(next(&mut events, "start").await, "started");
    call.abort();
    assert_eq!(next(&mut events, "the cancellation").await, "cancelled");

    // The server's own deadline for a request that carries none.
    let (server, mut events) = watching_server(ServerConfig {
        max_request_duration: ms(200),
        ..ServerConfig::default()
    })
    .await;
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    let mut raw = tests::RawPeer::connect(server.local_addr()).await;
    raw.send_settings().await;
    let id = raw.next_id();
    raw.send(rpc_core::frame::Frame::Request(rpc_core::frame::RequestFrame {
        id,
        method: "/t.T/Watch".into(),
        ..Default::default()
    }))
    .await;
    assert_eq!(next(&mut events, "start").await, "started");
    assert_eq!(next(&mut events, "the cancellation at the deadline").await, "cancelled");
    // And its permit is free.
    let echo = client
        .unary(Request::for_method("/t.T/Echo", Bytes::from_static(b"x")).with_timeout(ms(2000)))
        .await
        .unwrap();
    assert_eq!(echo.into_body(), Bytes::from_static(b"x"));
}

/// `/t.T/Pay` reports "started", then runs its two writes detached (the second waits for a
/// permit of `gate`), then reports "answered".
async fn paying_server(
    config: ServerConfig,
    gate: Arc<Semaphore>,
) -> (ServerHandle, mpsc::UnboundedReceiver<&'static str>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let server = Server::builder()
        .config(ServerConfig {
            max_concurrent_requests: 1,
            ..config
        })
        .route(
            "/t.T/Pay",
            handler_fn(move |_req: Request<Bytes>| {
                let (tx, gate) = (tx.clone(), gate.clone());
                async move {
                    let _ = tx.send("started");
                    let writes = tx.clone();
                    detach(async move {
                        let dropped = OnDrop(Some(writes.clone()), "detached work dropped");
                        let _ = writes.send("first write");
                        let _permit = gate.acquire().await.unwrap();
                        let _ = writes.send("second write");
                        std::mem::forget(dropped);
                    })
                    .await;
                    let _ = tx.send("answered");
                    Ok(Response::new(Bytes::new()))
                }
            }),
        )
        .route(
            "/t.T/Echo",
            handler_fn(|req: Request<Bytes>| async move { Ok(Response::new(req.into_body())) }),
        )
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    (server, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_work_runs_to_its_end_after_its_request_is_cancelled() {
    let gate = Arc::new(Semaphore::new(0));
    let (server, mut events) = paying_server(ServerConfig::default(), gate.clone()).await;
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    let err = client
        .unary(Request::for_method("/t.T/Pay", Bytes::new()).with_timeout(ms(300)))
        .await
        .unwrap_err();
    assert!(err.is_deadline_exceeded(), "{err}");
    assert_eq!(next(&mut events, "start").await, "started");
    assert_eq!(next(&mut events, "the first write").await, "first write");
    // The request is over and its permit free (detached work holds none, as documented)...
    tests::permit_is_free(&client).await;
    // ...and the detached work still finishes.
    gate.add_permits(1);
    assert_eq!(next(&mut events, "the second write").await, "second write");
    server.shutdown().await;
    let rest: Vec<_> = std::iter::from_fn(|| events.try_recv().ok()).collect();
    assert!(!rest.contains(&"answered"), "the cancelled handler went on: {rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_detached_work_within_the_grace_then_drops_it() {
    // Finishing within the grace: shutdown waits for it.
    let gate = Arc::new(Semaphore::new(0));
    let (server, mut events) = paying_server(ServerConfig::default(), gate.clone()).await;
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    let _ = client
        .unary(Request::for_method("/t.T/Pay", Bytes::new()).with_timeout(ms(200)))
        .await;
    assert_eq!(next(&mut events, "start").await, "started");
    assert_eq!(next(&mut events, "the first write").await, "first write");
    let mut shutdown = tokio::spawn(server.shutdown());
    assert!(
        tokio::time::timeout(ms(300), &mut shutdown).await.is_err(),
        "shutdown returned while detached work ran"
    );
    gate.add_permits(1);
    assert_eq!(next(&mut events, "the second write").await, "second write");
    tokio::time::timeout(ms(5000), shutdown).await.unwrap().unwrap();

    // Not finishing: dropped when the grace ends, before shutdown returns.
    let gate = Arc::new(Semaphore::new(0));
    let config = ServerConfig {
        shutdown_grace: ms(300),
        ..ServerConfig::default()
    };
    let (server, mut events) = paying_server(config, gate).await;
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    let _ = client
        .unary(Request::for_method("/t.T/Pay", Bytes::new()).with_timeout(ms(200)))
        .await;
    assert_eq!(next(&mut events, "start").await, "started");
    assert_eq!(next(&mut events, "the first write").await, "first write");
    let start = Instant::now();
    tokio::time::timeout(ms(5000), server.shutdown()).await.unwrap();
    assert!(
        start.elapsed() >= ms(250),
        "returned before the grace: {:?}",
        start.elapsed()
    );
    assert_eq!(events.try_recv(), Ok("detached work dropped"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_drops_detached_work_and_oneway_handlers_before_it_returns() {
    let (tx, mut events) = mpsc::unbounded_channel();
    let (tx2, tx3) = (tx.clone(), tx.clone());
    let server = Server::builder()
        .route(
            "/t.T/Detach",
            handler_fn(move |_req: Request<Bytes>| {
                let tx = tx2.clone();
                async move {
                    detach(async move {
                        let _dropped = OnDrop(Some(tx.clone()), "detached dropped");
                        let _ = tx.send("detached started");
                        std::future::pending::<()>().await
                    })
                    .await;
                    Ok(Response::new(Bytes::new()))
                }
            }),
        )
        .route(
            "/t.T/Oneway",
            handler_fn(move |_req: Request<Bytes>| {
                let tx = tx3.clone();
                async move {
                    let _dropped = OnDrop(Some(tx.clone()), "oneway dropped");
                    let _ = tx.send("oneway started");
                    std::future::pending::<()>().await;
                    Ok(Response::new(Bytes::new()))
                }
            }),
        )
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    drop(tx);
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    client
        .oneway(Request::for_method("/t.T/Oneway", Bytes::new()).with_timeout(ms(60_000)))
        .await
        .unwrap();
    let held = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .unary(Request::for_method("/t.T/Detach", Bytes::new()).with_timeout(ms(60_000)))
                .await
        })
    };
    let mut started = vec![next(&mut events, "a start").await, next(&mut events, "a start").await];
    started.sort();
    assert_eq!(started, ["detached started", "oneway started"]);
    tokio::time::timeout(ms(5000), server.abort())
        .await
        .expect("abort returned within 5 s");
    let mut dropped: Vec<_> = std::iter::from_fn(|| events.try_recv().ok()).collect();
    dropped.sort();
    assert_eq!(
        dropped,
        ["detached dropped", "oneway dropped"],
        "gone before abort returned"
    );
    drop(held);
}

/// A server whose `/t.Front/Call` calls `downstream`'s echo (with no deadline of its own) and
/// answers with the deadline the echo saw.
async fn front(downstream: Client, isolate: bool) -> ServerHandle {
    Server::builder()
        .route(
            "/t.Front/Call",
            handler_fn(move |_req: Request<Bytes>| {
                let downstream = downstream.clone();
                async move {
                    let body = EchoRequest::default().encode_to_vec();
                    let call = downstream.unary(Request::for_method("/echo.Echo/Say", Bytes::from(body)));
                    let reply = if isolate {
                        Context::none().scope(call).await
                    } else {
                        call.await
                    }
                    // As a handler should: a downstream deadline is this call's deadline too. (It
                    // fires in the same instant as the server's own timer for this request.)
                    .map_err(|e| match e.is_deadline_exceeded() {
                        true => Status::deadline_exceeded(e.to_string()),
                        false => Status::internal(e.to_string()),
                    })?;
                    Ok(Response::new(reply.into_body()))
                }
            }),
        )
        .bind("127.0.0.1:0")
        .await
        .unwrap()
}

fn seen_deadline_ms(reply: Response<Bytes>) -> u64 {
    EchoReply::decode(reply.into_body()).unwrap().remaining_deadline_ms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downstream_call_inherits_the_deadline_of_the_request_it_serves() {
    let back = echo_server(ServerConfig::default()).await;
    let downstream_config = ClientConfig {
        request_timeout: Duration::from_secs(30),
        ..quiet_client()
    };
    let downstream = Client::connect(back.local_addr(), downstream_config).await.unwrap();
    let front_server = front(downstream.clone(), false).await;
    let isolated = front(downstream, true).await;
    let call = |addr| async move {
        let client = Client::connect(addr, quiet_client()).await.unwrap();
        client
            .unary(Request::for_method("/t.Front/Call", Bytes::new()).with_timeout(ms(800)))
            .await
            .unwrap()
    };
    let inherited = seen_deadline_ms(call(front_server.local_addr()).await);
    assert!(0 < inherited && inherited <= 800, "the echo saw {inherited} ms");
    let own = seen_deadline_ms(call(isolated.local_addr()).await);
    assert!(
        own > 10_000,
        "Context::none() keeps the call's own deadline: the echo saw {own} ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_giving_up_cancels_the_whole_chain() {
    // back: a handler that never answers, reporting its drop.
    let (tx, mut events) = mpsc::unbounded_channel();
    let back = Server::builder()
        .route(
            "/echo.Echo/Say",
            handler_fn(move |_req: Request<Bytes>| {
                let tx = tx.clone();
                async move {
                    let _dropped = OnDrop(Some(tx.clone()), "back dropped");
                    let _ = tx.send("back started");
                    std::future::pending::<()>().await;
                    Ok(Response::new(Bytes::new()))
                }
            }),
        )
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let downstream = Client::connect(back.local_addr(), quiet_client()).await.unwrap();
    let front_server = front(downstream, false).await;
    let client = Client::connect(front_server.local_addr(), quiet_client())
        .await
        .unwrap();
    // No deadline does the work here: the caller drops its call after the back handler started.
    let call = tokio::spawn(async move {
        client
            .unary(Request::for_method("/t.Front/Call", Bytes::new()).with_timeout(ms(60_000)))
            .await
    });
    assert_eq!(next(&mut events, "the back handler's start").await, "back started");
    let gave_up = Instant::now();
    call.abort();
    assert_eq!(next(&mut events, "the back handler's drop").await, "back dropped");
    assert!(
        gave_up.elapsed() < ms(1000),
        "the chain ended {:?} after the caller gave up",
        gave_up.elapsed()
    );
}

#[tokio::test]
async fn a_call_whose_inherited_deadline_has_passed_is_not_sent() {
    let runs = Arc::new(AtomicUsize::new(0));
    let back = {
        let runs = runs.clone();
        Server::builder()
            .route(
                "/t.T/Count",
                handler_fn(move |_req: Request<Bytes>| {
                    runs.fetch_add(1, Ordering::SeqCst);
                    async { Ok(Response::new(Bytes::new())) }
                }),
            )
            .bind("127.0.0.1:0")
            .await
            .unwrap()
    };
    let client = Client::connect(back.local_addr(), quiet_client()).await.unwrap();
    let gone = Context::new(Some(Instant::now() - ms(1)));
    let err = gone
        .scope(client.unary(Request::for_method("/t.T/Count", Bytes::new()).with_timeout(ms(5000))))
        .await
        .unwrap_err();
    assert!(err.is_deadline_exceeded(), "{err}");
    assert!(!err.may_have_executed(), "{err}");
    let ok = client
        .unary(Request::for_method("/t.T/Count", Bytes::new()).with_timeout(ms(5000)))
        .await;
    assert!(ok.is_ok());
    assert_eq!(runs.load(Ordering::SeqCst), 1, "only the call outside the context ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_oneways_cancellation_fires_when_its_client_goes() {
    let (server, mut events) = watching_server(ServerConfig::default()).await;
    // A client whose process dies after its oneway: its socket just closes.
    let mut raw = tests::RawPeer::connect(server.local_addr()).await;
    raw.send_settings().await;
    let id = raw.next_id();
    raw.send(rpc_core::frame::Frame::Request(rpc_core::frame::RequestFrame {
        id,
        oneway: true,
        timeout: Some(ms(60_000)),
        method: "/t.T/Watch".into(),
        ..Default::default()
    }))
    .await;
    assert_eq!(next(&mut events, "start").await, "started");
    let gone = Instant::now();
    drop(raw);
    assert_eq!(next(&mut events, "the cancellation").await, "cancelled");
    assert!(gone.elapsed() < ms(2000), "after {:?}", gone.elapsed());
}

#[tokio::test]
async fn safe_retry_does_not_spend_attempts_on_an_inherited_deadline_already_gone() {
    use tower::ServiceExt;
    let back = echo_server(ServerConfig::default()).await;
    let client = Client::connect(back.local_addr(), quiet_client()).await.unwrap();
    let svc = tower::ServiceBuilder::new()
        .layer(tower::retry::RetryLayer::new(rpc_client::SafeRetry::new(3)))
        .service(client);
    let body = EchoRequest::default().encode_to_vec();
    let err = Context::new(Some(Instant::now() - ms(1)))
        .scope(svc.oneshot(Request::for_method("/echo.Echo/Say", Bytes::from(body)).with_timeout(ms(5000))))
        .await
        .unwrap_err();
    assert!(err.is_deadline_exceeded(), "{err}");
    assert_eq!(err.attempts().len(), 0, "no attempt was retried: {err:?}");
}
