//! Cancellation end to end: when the caller gives up (drops its future, or its deadline passes),
//! the client disconnects, or the server is aborted, the handler's future is dropped within a
//! few milliseconds and its permits are free at once; a request without a deadline ends at
//! `max_request_duration`; a server that does not announce CANCEL is never sent one.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rpc_client::{Client, ClientConfig};
use rpc_core::frame::{Frame, RequestFrame, Settings};
use rpc_core::{Code, Request, Response};
use rpc_server::{handler_fn, Server, ServerConfig, ServerHandle};
use tests::permit_is_free;
use tests::{quiet_client, RawPeer};
use tokio::sync::mpsc;
use tokio::time::Instant;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Reports when it is dropped: the handler's future holds one.
struct DropSignal(Option<mpsc::UnboundedSender<Instant>>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(Instant::now());
        }
    }
}

/// A server allowing one request at a time: `/t.T/Hang` waits forever (reporting its start and
/// its drop), `/t.T/Echo` answers at once.
async fn server(
    config: ServerConfig,
) -> (
    ServerHandle,
    mpsc::UnboundedReceiver<()>,
    mpsc::UnboundedReceiver<Instant>,
) {
    let (dropped_tx, dropped) = mpsc::unbounded_channel();
    let (server, started) = server_holding(config, move || DropSignal(Some(dropped_tx.clone()))).await;
    (server, started, dropped)
}

/// The same server, whose `/t.T/Hang` handler holds what `guard` makes for it until dropped
/// (reporting its start).
async fn server_holding<G: Send + 'static>(
    config: ServerConfig,
    guard: impl Fn() -> G + Clone + Send + Sync + 'static,
) -> (ServerHandle, mpsc::UnboundedReceiver<()>) {
    let (started_tx, started) = mpsc::unbounded_channel();
    let server = Server::builder()
        .config(ServerConfig {
            max_concurrent_requests: 1,
            ..config
        })
        .route(
            "/t.T/Hang",
            handler_fn(move |_req: Request<Bytes>| {
                let held = guard();
                let started = started_tx.clone();
                async move {
                    let _held = held;
                    let _ = started.send(());
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
    (server, started)
}

async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) -> T {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within 5 s"))
        .unwrap()
}

fn hang(timeout: Duration) -> Request<Bytes> {
    Request::for_method("/t.T/Hang", Bytes::new()).with_timeout(timeout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_dropping_its_future_drops_the_handler_and_frees_its_permit() {
    let (server, mut started, mut dropped) = server(ServerConfig::default()).await;
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    let call = {
        let client = client.clone();
        tokio::spawn(async move { client.unary(hang(Duration::from_secs(60))).await })
    };
    next(&mut started, "the handler start").await;
    let gave_up = Instant::now();
    call.abort();
    let at = next(&mut dropped, "the handler drop").await;
    println!("handler dropped {:?} after the caller gave up", at - gave_up);
    assert!(at - gave_up < ms(500), "dropped after {:?}", at - gave_up);
    permit_is_free(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_deadline_drops_the_handler() {
    let (server, mut started, mut dropped) = server(ServerConfig::default()).await;
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    let start = Instant::now();
    let err = client.unary(hang(ms(300))).await.unwrap_err();
    assert!(err.is_deadline_exceeded(), "{err}");
    next(&mut started, "the handler start").await;
    let at = next(&mut dropped, "the handler drop").await;
    println!("handler dropped {:?} after a 300 ms deadline", at - start);
    assert!(at - start < ms(800), "dropped after {:?}", at - start);
    permit_is_free(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_disconnecting_drops_its_handlers() {
    let (server, mut started, mut dropped) = server(ServerConfig::default()).await;
    // A client whose process dies with a request running: its socket just closes.
    let mut raw = RawPeer::connect(server.local_addr()).await;
    raw.send_settings().await;
    raw.send(Frame::Request(RequestFrame {
        id: 1,
        timeout: Some(Duration::from_secs(60)),
        method: "/t.T/Hang".into(),
        ..Default::default()
    }))
    .await;
    next(&mut started, "the handler start").await;
    let gone = Instant::now();
    drop(raw);
    let at = next(&mut dropped, "the handler drop").await;
    println!("handler dropped {:?} after the client disconnected", at - gone);
    assert!(at - gone < ms(500), "dropped after {:?}", at - gone);
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    permit_is_free(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_returns_only_after_the_handlers_are_gone() {
    let (server, mut started, mut dropped) = server(ServerConfig::default()).await;
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    let _call = {
        let client = client.clone();
        tokio::spawn(async move { client.unary(hang(Duration::from_secs(60))).await })
    };
    next(&mut started, "the handler start").await;
    tokio::time::timeout(Duration::from_secs(5), server.abort())
        .await
        .expect("abort returned");
    assert!(
        dropped.try_recv().is_ok(),
        "abort() returned while the handler still ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drops_what_is_left_when_the_grace_ends() {
    let (server, mut started, mut dropped) = server(ServerConfig {
        shutdown_grace: ms(300),
        ..ServerConfig::default()
    })
    .await;
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    let _call = {
        let client = client.clone();
        tokio::spawn(async move { client.unary(hang(Duration::from_secs(60))).await })
    };
    next(&mut started, "the handler start").await;
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), server.shutdown())
        .await
        .expect("shutdown returned");
    assert!(
        dropped.try_recv().is_ok(),
        "shutdown() returned while the handler still ran"
    );
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "shutdown took {:?}",
        start.elapsed()
    );
}

/// A request that carries no deadline (`timeout_ms = 0`) ends at `max_request_duration`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_a_deadline_ends_at_max_request_duration() {
    let (server, _started, mut dropped) = server(ServerConfig {
        max_request_duration: ms(300),
        ..ServerConfig::default()
    })
    .await;
    let mut raw = RawPeer::connect(server.local_addr()).await;
    raw.send_settings().await;
    let start = Instant::now();
    raw.send(Frame::Request(RequestFrame {
        id: 1,
        timeout: None,
        method: "/t.T/Hang".into(),
        ..Default::default()
    }))
    .await;
    let answer = loop {
        match raw.next_frame(Duration::from_secs(3)).await {
            Some(Frame::Response(r)) => break r,
            Some(_) => {}
            None => panic!("no answer to a request without a deadline"),
        }
    };
    assert_eq!(answer.code, Code::DeadlineExceeded);
    let took = start.elapsed();
    assert!(took >= ms(290) && took < ms(1500), "answered after {took:?}");
    next(&mut dropped, "the handler drop").await;
}

/// A server that does not announce CANCEL (a version-1 peer, which would close on an unknown
/// frame kind) is never sent one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_the_cancel_feature_is_never_sent_cancel() {
    let (addr, accept) = RawPeer::server(Settings {
        max_frame_size: Some(1 << 20),
        ..Settings::default()
    })
    .await;
    let peer = tokio::spawn(async move {
        let mut raw = accept.await;
        // Read everything the client sends for a while; never answer.
        raw.read_until_close(ms(1500)).await
    });
    let client = Client::connect(addr, quiet_client()).await.unwrap();
    let err = client.unary(hang(ms(200))).await.unwrap_err();
    assert!(err.is_deadline_exceeded());
    let frames = peer.await.unwrap();
    assert!(frames.iter().any(|f| matches!(f, Frame::Request(_))), "{frames:?}");
    assert!(
        !frames.iter().any(|f| matches!(f, Frame::Cancel { .. })),
        "CANCEL sent to a server that did not announce it: {frames:?}"
    );
}

/// 64 callers, each cancelling half its requests at a random point, for a few seconds: afterwards
/// no pending call, in-flight count or permit is left, and the server never ran more than its
/// limit at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_half_the_requests_at_random_points_leaks_nothing() {
    let limit = 8;
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let server = {
        let (running, peak) = (running.clone(), peak.clone());
        Server::builder()
            .config(ServerConfig {
                max_concurrent_requests: limit,
                ..ServerConfig::default()
            })
            .route(
                "/t.T/Work",
                handler_fn(move |req: Request<Bytes>| {
                    let (running, peak) = (running.clone(), peak.clone());
                    async move {
                        struct Count(Arc<AtomicUsize>);
                        impl Drop for Count {
                            fn drop(&mut self) {
                                self.0.fetch_sub(1, Ordering::SeqCst);
                            }
                        }
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        let _count = Count(running);
                        peak.fetch_max(now, Ordering::SeqCst);
                        let us = u64::from(req.body().first().copied().unwrap_or(0)) * 20;
                        tokio::time::sleep(Duration::from_micros(us)).await;
                        Ok(Response::new(Bytes::new()))
                    }
                }),
            )
            .bind("127.0.0.1:0")
            .await
            .unwrap()
    };
    let config = ClientConfig {
        max_attempts: 1,
        ..quiet_client()
    };
    let client = Client::connect(server.local_addr(), config).await.unwrap();
    let secs: u64 = std::env::var("TETHER_CANCEL_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let until = Instant::now() + Duration::from_secs(secs);
    let (done, cancelled) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut callers = Vec::new();
    for _ in 0..64 {
        let (client, done, cancelled) = (client.clone(), done.clone(), cancelled.clone());
        callers.push(tokio::spawn(async move {
            while Instant::now() < until {
                let work: u8 = rand::random::<u8>() % 100;
                let call =
                    client.unary(Request::for_method("/t.T/Work", Bytes::from(vec![work])).with_timeout(ms(2000)));
                if rand::random::<bool>() {
                    // Give up at a random point: anywhere from before the send to after the answer.
                    let after = Duration::from_micros(u64::from(rand::random::<u16>() % 3000));
                    if tokio::time::timeout(after, call).await.is_err() {
                        cancelled.fetch_add(1, Ordering::Relaxed);
                    }
                } else {
                    let _ = call.await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for c in callers {
        c.await.unwrap();
    }
    println!(
        "{} requests completed, {} cancelled; server peak concurrency {} (limit {limit})",
        done.load(Ordering::Relaxed),
        cancelled.load(Ordering::Relaxed),
        peak.load(Ordering::SeqCst)
    );
    assert!(
        cancelled.load(Ordering::Relaxed) > 100,
        "too few cancellations to mean anything"
    );
    assert!(peak.load(Ordering::SeqCst) <= limit);
    tests::wait_until(Duration::from_secs(3), || {
        running.load(Ordering::SeqCst) == 0
            && client
                .connections()
                .iter()
                .all(|c| c.in_flight() == 0 && c.pending_calls() == 0)
    })
    .await;
    // Every permit is back: `limit` requests at once all run.
    let burst: Vec<_> = (0..limit)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .unary(Request::for_method("/t.T/Work", Bytes::from_static(&[50])))
                    .await
            })
        })
        .collect();
    for b in burst {
        b.await.unwrap().unwrap();
    }
}

/// Review finding: a request that reached its deadline while the outbound queue was full was
/// dropped in the middle of sending its DEADLINE_EXCEEDED (the deadline fired the cancellation
/// that also guards the work), and was never answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_deadline_answer_waiting_for_a_full_queue_still_goes() {
    use prost::Message;
    let config = ServerConfig {
        connection: rpc_core::config::ConnectionConfig {
            outbound_queue: 1,
            max_outbound_bytes: 4096,
            ..Default::default()
        },
        ..ServerConfig::default()
    };
    let server = tests::echo_server(config).await;
    let mut raw = RawPeer::connect(server.local_addr()).await;
    raw.send_settings().await;
    let say = |delay_ms, reply_size| {
        Bytes::from(
            examples::echo::EchoRequest {
                delay_ms,
                reply_size,
                ..Default::default()
            }
            .encode_to_vec(),
        )
    };
    // The slow one first (its deadline passes while it sleeps), then enough large answers to
    // fill the socket, the write budget and the one-frame queue while this peer reads nothing.
    let slow = raw.next_id();
    raw.send(Frame::Request(RequestFrame {
        id: slow,
        timeout: Some(ms(150)),
        method: "/echo.Echo/Say".into(),
        payload: say(400, 0),
        ..Default::default()
    }))
    .await;
    for _ in 0..64 {
        let id = raw.next_id();
        raw.send(Frame::Request(RequestFrame {
            id,
            timeout: Some(ms(20_000)),
            method: "/echo.Echo/Say".into(),
            payload: say(0, 256 * 1024),
            ..Default::default()
        }))
        .await;
    }
    // Long enough for the slow request's deadline to pass while its answer cannot be queued.
    tests::wait_until(ms(5000), || !server.connections().is_empty()).await;
    let conn = server.connections()[0].clone();
    tests::wait_until(ms(5000), || conn.outbound_buffered() >= 4096).await;
    tokio::time::sleep(ms(600)).await; // the fault is the passage of time itself
    let mut answered = None;
    let mut seen = 0;
    while let Some(frame) = raw.next_frame(ms(5000)).await {
        if let Frame::Response(r) = frame {
            seen += 1;
            if r.id == slow {
                answered = Some(r.code);
            }
            if seen == 65 {
                break;
            }
        }
    }
    assert_eq!(answered, Some(Code::DeadlineExceeded), "{seen} answers read");
}

/// Holds a handler's drop until the test lets it go, reporting when the drop began and ended.
struct SlowDrop {
    began: mpsc::UnboundedSender<()>,
    release: std::sync::mpsc::Receiver<()>,
    ended: mpsc::UnboundedSender<()>,
}

impl Drop for SlowDrop {
    fn drop(&mut self) {
        let _ = self.began.send(());
        // A drop that does real work (a rollback, a flush): this worker's other tasks move on.
        tokio::task::block_in_place(|| {
            let _ = self.release.recv_timeout(Duration::from_secs(10));
        });
        let _ = self.ended.send(());
    }
}

/// `max_concurrent_requests` bounds the handlers that exist, not only those being polled: a
/// handler still being dropped (at its deadline) holds its permit until its drop has returned,
/// so a request arriving meanwhile is refused as busy rather than run beside it. Seen in the CI
/// run as a peak of 9 handlers under a limit of 8 in
/// `cancelling_half_the_requests_at_random_points_leaks_nothing`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_handler_being_dropped_still_holds_its_permit() {
    let (began_tx, mut began) = mpsc::unbounded_channel();
    let (ended_tx, mut ended) = mpsc::unbounded_channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel();
    let slow = Arc::new(std::sync::Mutex::new(Some(SlowDrop {
        began: began_tx,
        release: release_rx,
        ended: ended_tx,
    })));
    let (server, _started) = server_holding(ServerConfig::default(), move || slow.lock().unwrap().take()).await;
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    let err = client.unary(hang(ms(100))).await.unwrap_err();
    assert!(err.is_deadline_exceeded(), "{err}");
    next(&mut began, "the handler's drop").await;
    let busy = client
        .unary(Request::for_method("/t.T/Echo", Bytes::from_static(b"beside")).with_timeout(ms(2000)))
        .await;
    release_tx.send(()).unwrap();
    next(&mut ended, "the end of the handler's drop").await;
    let err = busy.expect_err("a second handler ran while the first was still being dropped");
    assert_eq!(err.code(), Code::ServerBusy, "{err}");
    assert!(!err.may_have_executed(), "{err}");
    // The drop has returned: its permit is back.
    permit_is_free(&client).await;
}
