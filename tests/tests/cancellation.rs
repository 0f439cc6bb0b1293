//! Every await on the request path is cancel-safe: a request future dropped after 1, 2, ... N
//! polls leaks no in-flight count, no pending call, no connect slot, and the endpoint keeps
//! serving.

#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use rpc_client::{Client, ClientConfig};
use rpc_core::{Request, Response};
use rpc_server::{handler_fn, Server};
use tests::{quiet_client, wait_until};

/// Polls `fut` `n` times (yielding to the runtime between polls, so the connection's tasks move
/// it through its await points), then drops it. True if it finished first.
async fn poll_n_then_drop<F: Future>(fut: F, n: usize) -> bool {
    let mut fut = std::pin::pin!(fut);
    for _ in 0..n {
        let ready = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx).is_ready())).await;
        if ready {
            return true;
        }
        tokio::task::yield_now().await;
    }
    false
}

async fn server() -> rpc_server::ServerHandle {
    Server::builder()
        .route(
            "/t.T/Slow",
            handler_fn(|req: Request<Bytes>| async move {
                tokio::task::yield_now().await;
                Ok(Response::new(req.into_body()))
            }),
        )
        .bind("127.0.0.1:0")
        .await
        .unwrap()
}

fn request() -> Request<Bytes> {
    Request::for_method("/t.T/Slow", Bytes::from_static(b"x")).with_timeout(Duration::from_secs(2))
}

/// Nothing is left behind on the client's connections, and the client still serves.
async fn assert_clean_and_serving(client: &Client, n: usize) {
    wait_until(Duration::from_secs(2), || {
        client
            .connections()
            .iter()
            .all(|c| c.in_flight() == 0 && c.pending_calls() == 0)
    })
    .await;
    let resp = tokio::time::timeout(Duration::from_secs(2), client.unary(request()))
        .await
        .unwrap_or_else(|_| panic!("client wedged after a drop at poll {n}"))
        .unwrap_or_else(|e| panic!("client failed after a drop at poll {n}: {e}"));
    assert_eq!(resp.into_body(), Bytes::from_static(b"x"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_dropped_at_every_await_point_leaks_nothing() {
    let server = server().await;
    // A pooled client: drops on the send and response path.
    let pooled = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    let mut finished_in_a_row = 0;
    let mut n = 1;
    while finished_in_a_row < 5 {
        assert!(n < 10_000, "a request never finished");
        if poll_n_then_drop(pooled.unary(request()), n).await {
            finished_in_a_row += 1;
        } else {
            finished_in_a_row = 0;
        }
        assert_clean_and_serving(&pooled, n).await;
        // Every poll count at first, then sparser: later polls mostly find the same await.
        n += 1 + n / 16;
    }
    let pooled_polls = n;

    // A fresh client per drop: the checkout's on-demand connect and handshake are cut too.
    let config = ClientConfig {
        connections_per_endpoint: 1,
        ..quiet_client()
    };
    let mut finished_in_a_row = 0;
    let mut n = 1;
    while finished_in_a_row < 5 {
        assert!(n < 10_000, "a request never finished");
        let client = Client::new(server.local_addr(), config.clone()).await.unwrap();
        if poll_n_then_drop(client.unary(request()), n).await {
            finished_in_a_row += 1;
        } else {
            finished_in_a_row = 0;
        }
        assert_clean_and_serving(&client, n).await;
        n += 1 + n / 16;
    }
    println!("dropped pooled requests at polls 1..{pooled_polls}, first requests at polls 1..{n}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_gives_up_frees_its_pending_call_at_once() {
    // A server that never answers: only the caller's giving up can free the call.
    let (gate, mut control) = tests::Gate::new();
    let server = Server::builder()
        .route("/t.T/Hold", gate.handler())
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    let conn = client.connections().pop().unwrap();
    let mut calls = Vec::new();
    for _ in 0..50 {
        let c = client.clone();
        calls.push(tokio::spawn(async move {
            c.unary(Request::for_method("/t.T/Hold", Bytes::new()).with_timeout(Duration::from_secs(30)))
                .await
        }));
    }
    control.wait_arrivals(50).await;
    assert_eq!(conn.pending_calls(), 50);
    for c in &calls {
        c.abort();
    }
    wait_until(Duration::from_secs(2), || {
        conn.pending_calls() == 0 && conn.in_flight() == 0
    })
    .await;
    // The late responses are discarded, and the connection goes on serving.
    control.release(50);
    control.release(1);
    let resp = client
        .unary(Request::for_method("/t.T/Hold", Bytes::from_static(b"after")))
        .await
        .unwrap();
    assert_eq!(resp.into_body(), Bytes::from_static(b"after"));
}
