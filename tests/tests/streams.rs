//! Streams end to end: the three kinds round trip through generated code; flow control keeps a
//! consumer that stops reading from stalling anything but its own stream, and bounds what both
//! sides hold; a stalled stream is reset alone; a stream on a dying connection ends with the
//! connection's reason; a dropped stream cancels its handler.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use examples::feed::v1::feed_client::FeedClient;
use examples::feed::v1::feed_server::FeedServer;
use examples::feed::v1::{Event, Subscribe};
use examples::services::FeedService;
use futures_util::StreamExt;
use rpc_client::{Client, ClientConfig};
use rpc_core::config::ConnectionConfig;
use rpc_core::Code;
use rpc_server::{Server, ServerConfig, ServerHandle};
use tests::{quiet_client, wait_until};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

async fn feed_server(config: ServerConfig) -> ServerHandle {
    serve_feed(config, FeedService).await
}

/// A server of `feed` (and the echo service) with `config`.
async fn serve_feed<F>(config: ServerConfig, feed: F) -> ServerHandle
where
    F: examples::feed::v1::feed_server::Feed + Send + Sync + 'static,
{
    Server::builder()
        .config(config)
        .add_service(FeedServer::new(feed))
        .add_service(examples::echo::echo_server::EchoServer::new(
            examples::services::EchoService::default(),
        ))
        .bind("127.0.0.1:0")
        .await
        .unwrap()
}

/// The largest value `read` gives, sampled at every turn of the scheduler for `period`.
async fn peak_for(period: Duration, read: impl Fn() -> usize) -> usize {
    let mut most = 0;
    let start = tokio::time::Instant::now();
    while start.elapsed() < period {
        most = most.max(read());
        tokio::task::yield_now().await;
    }
    most
}

/// A raw bidirectional Echo stream on `client`, its responses decoded.
async fn open_echo(client: &Client) -> (rpc_client::StreamSender<bytes::Bytes>, rpc_client::Streaming<Event>) {
    let (sender, responses) = client
        .open_stream(rpc_core::Request::for_method("/feed.v1.Feed/Echo", ()))
        .await
        .unwrap();
    let responses = responses
        .decoded(|b| <Event as prost::Message>::decode(b).map_err(|e| rpc_core::Status::internal(e.to_string())));
    (sender, responses)
}

/// A feed server and a client on one connection, both with `connection`'s stream settings.
async fn pair(connection: ConnectionConfig) -> (ServerHandle, Client) {
    let server = feed_server(ServerConfig {
        connection,
        ..ServerConfig::default()
    })
    .await;
    let config = ClientConfig {
        connections_per_endpoint: 1,
        connection,
        ..quiet_client()
    };
    let client = Client::connect(server.local_addr(), config).await.unwrap();
    (server, client)
}

fn events(n: u64, size: usize) -> impl futures_util::Stream<Item = Event> + Send + 'static {
    futures_util::stream::iter((1..=n).map(move |seq| Event {
        seq,
        payload: vec![7u8; size].into(),
    }))
}

#[tokio::test]
async fn the_three_kinds_round_trip_through_generated_code() {
    let server = feed_server(ServerConfig::default()).await;
    let client = FeedClient::new(Client::connect(server.local_addr(), quiet_client()).await.unwrap());

    let mut watch = client
        .watch(Subscribe {
            count: 300,
            size: 1000,
            interval_ms: 0,
        })
        .await
        .unwrap();
    let mut seqs = Vec::new();
    while let Some(e) = watch.message().await.unwrap() {
        assert_eq!(e.payload.len(), 1000);
        seqs.push(e.seq);
    }
    assert_eq!(seqs, (1..=300).collect::<Vec<_>>(), "every event, in order, once");
    assert!(watch.trailers().is_some(), "ended with a status");

    let summary = client.upload(events(500, 100)).await.unwrap().into_body();
    assert_eq!((summary.count, summary.bytes, summary.last_seq), (500, 50_000, 500));

    let echoed: Vec<u64> = client
        .echo(events(200, 10))
        .await
        .unwrap()
        .map(|e| e.unwrap().seq)
        .collect()
        .await;
    assert_eq!(echoed, (1..=200).collect::<Vec<_>>());

    // Unary calls share the connection.
    let conn = client.get_ref().connections();
    assert_eq!(conn.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_stops_reading_stalls_only_its_own_stream_until_it_is_reset() {
    let window = 64 * 1024;
    let connection = ConnectionConfig {
        stream_window: window,
        stream_stall_timeout: Some(ms(800)),
        ..ConnectionConfig::default()
    };
    let (server, raw) = pair(connection).await;
    let client = FeedClient::new(raw.clone());
    let forever = Subscribe {
        count: 0,
        size: 16 * 1024,
        interval_ms: 0,
    };
    // This consumer takes one event and then stops reading.
    let mut stalled = client.watch(forever).await.unwrap();
    assert_eq!(stalled.message().await.unwrap().unwrap().seq, 1);

    // Another stream on the same connection keeps flowing, and so do unary calls.
    let mut flowing = client
        .watch(Subscribe {
            count: 2000,
            size: 1024,
            interval_ms: 0,
        })
        .await
        .unwrap();
    let mut n = 0;
    while let Some(e) = flowing.message().await.unwrap() {
        n += 1;
        assert_eq!(e.seq, n);
    }
    assert_eq!(n, 2000);
    let echo = examples::echo::echo_client::EchoClient::new(raw.clone())
        .say(examples::echo::EchoRequest {
            message: "still here".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(echo.into_body().message, "still here");

    // Bounded on both sides while it stalls: the server holds at most the window in its send
    // buffer plus what waits in the queue, the client at most its window plus one event.
    let sconn = server.connections()[0].clone();
    assert!(
        sconn.outbound_buffered() <= window as usize + 64 * 1024,
        "server buffered {} B for a stalled stream",
        sconn.outbound_buffered()
    );

    // Reset after stream_stall_timeout (the server forgets it), while the connection stays; the
    // consumer then gets what was buffered, then the reason.
    let start = tokio::time::Instant::now();
    wait_until(ms(5000), || sconn.open_streams() == 0).await;
    println!("server reset the stalled stream {:?} after the check", start.elapsed());
    let mut after = 0;
    let err = loop {
        match stalled.message().await {
            Ok(Some(_)) => after += 1,
            Ok(None) => panic!("a stalled stream ended as if complete"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("stalled"), "{err:?}");
    let buffered_events = (window as usize).div_ceil(16 * 1024) + 1;
    assert!(
        after <= buffered_events + 1,
        "{after} events arrived after the stall, window {window}"
    );
    println!("{after} buffered events delivered before the reason");
    // The connection stays.
    assert_eq!(raw.connections().len(), 1);
    assert!(raw.connections()[0].is_open());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_on_a_dying_connection_ends_with_the_connections_reason_on_both_sides() {
    let server = feed_server(ServerConfig::default()).await;
    let client = FeedClient::new(Client::connect(server.local_addr(), quiet_client()).await.unwrap());
    let mut watch = client
        .watch(Subscribe {
            count: 0,
            size: 100,
            interval_ms: 5,
        })
        .await
        .unwrap();
    for _ in 0..3 {
        watch.message().await.unwrap().unwrap();
    }
    tokio::time::timeout(ms(5000), server.abort()).await.unwrap();
    let err = loop {
        match tokio::time::timeout(ms(5000), watch.message()).await.unwrap() {
            Ok(Some(_)) => {}
            Ok(None) => panic!("ended as if complete"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        watch.close_reason().is_some(),
        "the connection's reason is kept: {err:?}"
    );
    // The error tells what this side had sent (the subscription) and received when it broke.
    let counts = format!("1 message sent and {} received", watch.received());
    assert!(err.message().contains(&counts), "{err:?} lacks {counts:?}");
}

/// Both halves of a bidirectional stream say, when their connection goes, what had been sent and
/// received on it: the consumer's error and the producer's failed `send` alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_bidirectional_stream_reports_what_each_half_moved() {
    let server = feed_server(ServerConfig::default()).await;
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    let (mut sender, mut responses) = open_echo(&client).await;
    for seq in 1..=5u64 {
        let e = Event {
            seq,
            payload: vec![1u8; 10].into(),
        };
        sender.send(prost::Message::encode_to_vec(&e).into()).await.unwrap();
        let echoed = responses.message().await.unwrap().unwrap();
        assert_eq!(echoed.seq, seq);
    }
    tokio::time::timeout(ms(5000), server.abort()).await.unwrap();
    let err = tokio::time::timeout(ms(5000), responses.message())
        .await
        .unwrap()
        .expect_err("the stream breaks");
    assert!(err.message().contains("5 messages sent and 5 received"), "{err:?}");
    let failed = tokio::time::timeout(ms(5000), sender.send(bytes::Bytes::from_static(b"\x08\x06")))
        .await
        .unwrap()
        .expect_err("the producer learns the connection went");
    match failed {
        rpc_client::SendError::Connection(_, counts) => {
            assert_eq!(counts, rpc_client::Counts { sent: 5, received: 5 })
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_cancels_the_handler_and_its_permit() {
    let server = feed_server(ServerConfig {
        max_concurrent_requests: 1,
        ..ServerConfig::default()
    })
    .await;
    let client = FeedClient::new(Client::connect(server.local_addr(), quiet_client()).await.unwrap());
    let forever = Subscribe {
        count: 0,
        size: 10,
        interval_ms: 1,
    };
    let mut watch = client.watch(forever).await.unwrap();
    watch.message().await.unwrap().unwrap();
    drop(watch);
    // The client forgets it at once; the one permit comes back as soon as the CANCEL lands: a
    // new stream is served (SERVER_BUSY, "not executed", until then).
    let conn = client.get_ref().connections()[0].clone();
    assert_eq!(conn.in_flight(), 0);
    let start = tokio::time::Instant::now();
    let seq = loop {
        let mut again = client.watch(forever).await.unwrap();
        match again.message().await {
            Ok(Some(e)) => break e.seq,
            Err(e) if e.code() == Code::ServerBusy && start.elapsed() < ms(2000) => tokio::task::yield_now().await,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(seq, 1);
    println!("permit back after {:?}", start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_under_way_finishes_during_a_graceful_shutdown() {
    let server = feed_server(ServerConfig::default()).await;
    let client = FeedClient::new(Client::connect(server.local_addr(), quiet_client()).await.unwrap());
    let mut watch = client
        .watch(Subscribe {
            count: 100,
            size: 10,
            interval_ms: 2,
        })
        .await
        .unwrap();
    watch.message().await.unwrap().unwrap();
    let shutdown = tokio::spawn(server.shutdown());
    let mut n = 1;
    while let Some(e) = watch.message().await.unwrap() {
        n += 1;
        assert_eq!(e.seq, n);
    }
    assert_eq!(n, 100, "the stream ran to its end inside the grace");
    shutdown.await.unwrap();
}

// Review findings (each failed, or would hang, on the first version of streams).

/// Consumed bytes were given back to the connection only in their own stream's half-window
/// batches, so streams that each consumed less than that spent the connection window for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_streams_that_each_consume_little_do_not_spend_the_connection_window() {
    let connection = ConnectionConfig {
        stream_window: 64 * 1024,
        connection_window: 64 * 1024,
        ..ConnectionConfig::default()
    };
    let (_server, client) = pair(connection).await;
    let client = FeedClient::new(client);
    for round in 0..8 {
        let mut watch = client
            .watch(Subscribe {
                count: 30,
                size: 1000,
                interval_ms: 0,
            })
            .await
            .unwrap();
        let all = tokio::time::timeout(ms(5000), async {
            let mut n = 0;
            while watch.message().await.unwrap().is_some() {
                n += 1;
            }
            n
        })
        .await
        .unwrap_or_else(|_| panic!("stream {round} hung"));
        assert_eq!(all, 30);
    }
}

/// A handler that returned while its last messages waited for credit: a graceful shutdown closed
/// the connection under them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_shutdown_delivers_the_messages_still_waiting_for_credit() {
    let connection = ConnectionConfig {
        stream_window: 64 * 1024,
        ..ConnectionConfig::default()
    };
    let (server, client) = pair(connection).await;
    let client = FeedClient::new(client);
    let mut watch = client
        .watch(Subscribe {
            count: 64,
            size: 16 * 1024,
            interval_ms: 0,
        })
        .await
        .unwrap();
    let sconn = {
        let s = &server;
        wait_until(ms(5000), || {
            s.connections().first().is_some_and(|c| c.open_streams() == 1)
        })
        .await;
        s.connections()[0].clone()
    };
    let shutdown = tokio::spawn(server.shutdown());
    let mut n = 0;
    while let Some(e) = watch.message().await.unwrap() {
        n += 1;
        assert_eq!(e.seq, n);
    }
    assert_eq!(n, 64, "every event, then the end");
    tokio::time::timeout(ms(5000), shutdown).await.unwrap().unwrap();
    assert_eq!(sconn.open_streams(), 0);
}

/// A stream the server's GOAWAY names as never started hung its consumer, and lost the proof
/// that it did not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_stream_above_the_goaway_id_fails_at_once_as_not_executed() {
    use rpc_core::frame::{features, Frame, GoAway, Settings};
    let (addr, accept) = tests::RawPeer::server(Settings {
        max_frame_size: Some(1 << 20),
        features: Some(features::ALL),
        ..Settings::default()
    })
    .await;
    let peer = tokio::spawn(async move {
        let mut raw = accept.await;
        loop {
            match raw.next_frame(ms(5000)).await {
                Some(Frame::Request(r)) if r.stream => break,
                Some(_) => {}
                None => panic!("no stream opened"),
            }
        }
        raw.send(Frame::GoAway(GoAway {
            reason: rpc_core::GoAwayReason::Shutdown,
            last_request_id: 0,
            message: "going".into(),
        }))
        .await;
        raw
    });
    let client = Client::connect(addr, quiet_client()).await.unwrap();
    let (_sender, mut responses) = client
        .open_stream(rpc_core::Request::for_method("/feed.v1.Feed/Watch", ()))
        .await
        .unwrap();
    let _raw = peer.await.unwrap();
    let err = tokio::time::timeout(ms(2000), responses.message())
        .await
        .expect("the stream ended at the GOAWAY")
        .unwrap_err();
    assert!(!responses.may_have_executed(), "{err:?}");
    assert!(err.message().contains("not executed"), "{err:?}");
}

/// A producer whose stream had ended kept "sending" into nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_producer_learns_that_its_stream_is_gone() {
    let server = feed_server(ServerConfig::default()).await;
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    let (mut sender, responses) = client
        .open_stream(rpc_core::Request::for_method("/feed.v1.Feed/Echo", ()))
        .await
        .unwrap();
    sender.send(bytes::Bytes::from_static(b"\x08\x01")).await.unwrap();
    drop(responses); // the consumer goes: the stream is cancelled
    let failed = tokio::time::timeout(ms(2000), async {
        loop {
            if let Err(e) = sender.send(bytes::Bytes::from_static(b"\x08\x02")).await {
                break e;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("send went on succeeding after the stream was cancelled");
    assert!(matches!(failed, rpc_client::SendError::Closed(_)), "{failed:?}");
}

/// A sender dropped without `finish` left the server's handler waiting for the end for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_dropped_sender_ends_its_half_of_the_stream() {
    use prost::Message;
    let server = feed_server(ServerConfig::default()).await;
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    let (mut sender, responses) = client
        .open_stream(rpc_core::Request::for_method("/feed.v1.Feed/Upload", ()))
        .await
        .unwrap();
    for seq in 1..=3 {
        let e = Event {
            seq,
            payload: vec![1u8; 10].into(),
        };
        sender.send(e.encode_to_vec().into()).await.unwrap();
    }
    drop(sender);
    let mut responses = responses
        .decoded(|b| examples::feed::v1::Summary::decode(b).map_err(|e| rpc_core::Status::internal(e.to_string())));
    let summary = tokio::time::timeout(ms(2000), responses.message())
        .await
        .expect("the handler saw the end")
        .unwrap()
        .unwrap();
    assert_eq!((summary.count, summary.last_seq), (3, 3));
}

/// After the server's GOAWAY the client sent no CANCEL, and a stream has no deadline: a dropped
/// stream's handler ran until the grace ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_stream_dropped_during_a_drain_is_cancelled() {
    let server = feed_server(ServerConfig {
        shutdown_grace: Duration::from_secs(30),
        ..ServerConfig::default()
    })
    .await;
    let client = FeedClient::new(Client::connect(server.local_addr(), quiet_client()).await.unwrap());
    let mut watch = client
        .watch(Subscribe {
            count: 0,
            size: 10,
            interval_ms: 2,
        })
        .await
        .unwrap();
    watch.message().await.unwrap().unwrap();
    let conn = client.get_ref().connections()[0].clone();
    let start = tokio::time::Instant::now();
    let shutdown = tokio::spawn(server.shutdown());
    wait_until(ms(5000), || !conn.is_open()).await; // the GOAWAY arrived
    drop(watch);
    tokio::time::timeout(ms(5000), shutdown)
        .await
        .expect("shutdown waited for the grace")
        .unwrap();
    assert!(start.elapsed() < ms(5000));
}

#[test]
fn review_stream_windows_are_validated() {
    let bad = [
        ConnectionConfig {
            stream_window: 0,
            ..ConnectionConfig::default()
        },
        ConnectionConfig {
            stream_window: 1 << 20,
            connection_window: 1 << 19,
            ..ConnectionConfig::default()
        },
        ConnectionConfig {
            connection_window: u32::MAX,
            ..ConnectionConfig::default()
        },
    ];
    for c in bad {
        assert!(c.validate().is_err(), "{c:?}");
    }
    assert!(ConnectionConfig::default().validate().is_ok());
}

/// A Feed whose `Watch` streams record, in a ledger, when the server dropped them: the moment
/// their producer learns the subscriber is gone.
/// Also counts the streams whose request's cancellation had fired by then (what work the handler
/// handed off would have seen).
/// With `empty_events`, its `Watch` yields empty events (0 bytes each), always ready.
#[derive(Clone, Default)]
struct LedgerFeed {
    dropped: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    cancelled: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    empty_events: bool,
    /// Its `Echo` reads one request, drops the client's stream, and streams events back.
    drop_requests: bool,
}

struct DropMark(LedgerFeed, Option<rpc_core::context::Cancellation>);

impl Drop for DropMark {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::SeqCst;
        if self.1.as_ref().is_some_and(|c| c.is_cancelled()) {
            self.0.cancelled.fetch_add(1, SeqCst);
        }
        self.0.dropped.fetch_add(1, SeqCst);
    }
}

impl examples::feed::v1::feed_server::Feed for LedgerFeed {
    async fn watch(
        &self,
        request: rpc_core::Request<Subscribe>,
    ) -> Result<rpc_core::Response<rpc_server::codegen::BoxStream<Event>>, rpc_core::Status> {
        let cancellation = request.cancellation().cloned();
        let inner: rpc_server::codegen::BoxStream<Event> = if self.empty_events {
            Box::pin(futures_util::stream::repeat_with(|| Ok(Event::default())))
        } else {
            FeedService.watch(request).await?.into_body()
        };
        let mark = DropMark(self.clone(), cancellation);
        let events = inner.map(move |e| {
            let _held = &mark;
            e
        });
        Ok(rpc_core::Response::new(Box::pin(events)))
    }

    async fn upload(
        &self,
        request: rpc_core::Request<rpc_server::Streaming<Event>>,
    ) -> Result<rpc_core::Response<examples::feed::v1::Summary>, rpc_core::Status> {
        FeedService.upload(request).await
    }

    async fn echo(
        &self,
        request: rpc_core::Request<rpc_server::Streaming<Event>>,
    ) -> Result<rpc_core::Response<rpc_server::codegen::BoxStream<Event>>, rpc_core::Status> {
        if !self.drop_requests {
            return FeedService.echo(request).await;
        }
        // Reads one request, drops the rest of the client's stream, and answers with events.
        let mut requests = request.into_body();
        requests.message().await?;
        drop(requests);
        let events = futures_util::stream::unfold(0u64, |seq| async move {
            tokio::time::sleep(ms(20)).await;
            Some((
                Ok(Event {
                    seq: seq + 1,
                    payload: Default::default(),
                }),
                seq + 1,
            ))
        });
        Ok(rpc_core::Response::new(Box::pin(events)))
    }
}

/// The power cut under a server stream, at the application level: a proxy that forwards nothing
/// while both its sockets stay open, so neither kernel ever reports a thing. Idle eviction waits
/// for the stream, and the server's writes are all acknowledged by the proxy's kernel: only the
/// server's own heartbeats (sent while work runs) can tell. Both sides end within their heartbeat
/// bound, and the server drops the stream's producer; with the server's heartbeats off, the
/// server holds the stream (and its producer) long past that bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_stream_whose_client_vanishes_ends_on_both_sides_within_the_heartbeat_bound() {
    use rpc_core::config::HeartbeatConfig;
    use rpc_core::event::ConnectionEvent;
    use rpc_core::CloseReason;
    use std::sync::atomic::Ordering;
    let beat = HeartbeatConfig {
        enabled: true,
        interval: ms(200),
        timeout: ms(100),
        max_failures: 2,
        ..Default::default()
    };
    let bound = ms(200 + 2 * 100);
    let slack = ms(400);
    for server_heartbeats in [true, false] {
        let feed = LedgerFeed::default();
        let server = Server::builder()
            .config(ServerConfig {
                heartbeat: if server_heartbeats {
                    beat
                } else {
                    HeartbeatConfig::disabled()
                },
                idle_timeout: Some(ms(300)),
                ..ServerConfig::default()
            })
            .add_service(FeedServer::new(feed.clone()))
            .bind("127.0.0.1:0")
            .await
            .unwrap();
        let mut server_events = server.events();
        let proxy = tests::proxy::FaultProxy::start(server.local_addr()).await;
        let client = Client::connect(
            proxy.addr(),
            ClientConfig {
                heartbeat: beat,
                ..quiet_client()
            },
        )
        .await
        .unwrap();
        let mut watch = FeedClient::new(client.clone())
            .watch(Subscribe {
                count: 0,
                size: 64,
                interval_ms: 20,
            })
            .await
            .unwrap();
        for _ in 0..5 {
            watch.message().await.unwrap().unwrap();
        }
        proxy.set(tests::proxy::Fault::Blackhole);
        let cut = tokio::time::Instant::now();
        if server_heartbeats {
            let closed = tests::wait_event(&mut server_events, bound + slack, |e| {
                matches!(e, ConnectionEvent::Closed { .. })
            })
            .await
            .expect("the server notices its client is gone");
            let server_took = cut.elapsed();
            assert!(
                matches!(
                    closed,
                    ConnectionEvent::Closed {
                        reason: CloseReason::HeartbeatTimeout,
                        ..
                    }
                ),
                "{closed:?}"
            );
            wait_until(ms(1000), || feed.dropped.load(Ordering::SeqCst) == 1).await;
            // The request's cancellation fired before the producer was dropped.
            assert_eq!(feed.cancelled.load(Ordering::SeqCst), 1);
            let err = loop {
                match tokio::time::timeout(bound + slack, watch.message())
                    .await
                    .expect("client ends the stream")
                {
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("ended as if complete"),
                    Err(e) => break e,
                }
            };
            let client_took = cut.elapsed();
            assert_eq!(watch.close_reason(), Some(&CloseReason::HeartbeatTimeout), "{err:?}");
            assert!(client_took <= bound + slack, "client took {client_took:?}");
            println!("server ended the stream after {server_took:?}, client after {client_took:?}");
        } else {
            // Five bounds later the server still holds the stream and feeds its producer.
            tokio::time::sleep(bound * 5).await;
            assert_eq!(feed.dropped.load(Ordering::SeqCst), 0, "dropped without heartbeats");
            // (The client, heartbeating, has left it and dialled again through the proxy.)
            let holding = server.connections().iter().filter(|c| c.open_streams() == 1).count();
            assert_eq!(holding, 1, "the stream's connection is still held");
        }
    }
}

/// Consumers that each take a message and then hold their stream without reading on (busy with
/// it) hold no connection credit for what they took: many of them on one connection whose
/// window their messages add up past leave it open for the next stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_streams_that_took_their_message_leave_the_connection_window_open() {
    let connection = ConnectionConfig {
        stream_window: 16 * 1024,
        connection_window: 16 * 1024,
        ..ConnectionConfig::default()
    };
    let (_server, client) = pair(connection).await;
    let client = FeedClient::new(client);
    let one = Subscribe {
        count: 1,
        size: 1000,
        interval_ms: 0,
    };
    let mut held = Vec::new();
    for i in 0..40 {
        let mut watch = client.watch(one).await.unwrap();
        tokio::time::timeout(ms(5000), watch.message())
            .await
            .unwrap_or_else(|_| panic!("stream {i} got nothing: the connection window is spent"))
            .unwrap()
            .unwrap();
        held.push(watch); // taken, and held without reading on
    }
    assert_eq!(held.len(), 40);
}

/// `stream_idle_timeout`: a stream on which nothing moves either way is reset by the side that
/// set it (DEADLINE_EXCEEDED, "stream idle"), between the timeout and 1.25 times it, while a
/// stream that keeps moving on the same connection is left alone and the connection stays; the
/// server's handler is cancelled either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_idle_past_stream_idle_timeout_is_reset_alone_by_either_side() {
    use std::sync::atomic::Ordering;
    let timeout = ms(400);
    for server_side in [true, false] {
        let idle = ConnectionConfig {
            stream_idle_timeout: Some(timeout),
            ..ConnectionConfig::default()
        };
        let feed = LedgerFeed::default();
        let server = Server::builder()
            .config(ServerConfig {
                connection: if server_side { idle } else { ConnectionConfig::default() },
                ..ServerConfig::default()
            })
            .add_service(FeedServer::new(feed.clone()))
            .bind("127.0.0.1:0")
            .await
            .unwrap();
        let config = ClientConfig {
            connections_per_endpoint: 1,
            connection: if server_side { ConnectionConfig::default() } else { idle },
            ..quiet_client()
        };
        let client = FeedClient::new(Client::connect(server.local_addr(), config).await.unwrap());
        let mut quiet = client
            .watch(Subscribe {
                count: 0,
                size: 10,
                interval_ms: 60_000,
            })
            .await
            .unwrap();
        let mut busy = client
            .watch(Subscribe {
                count: 0,
                size: 10,
                interval_ms: 20,
            })
            .await
            .unwrap();
        let start = tokio::time::Instant::now();
        let busy_reader = tokio::spawn(async move {
            let mut n = 0u64;
            while tokio::time::Instant::now() < start + ms(1200) {
                busy.message().await.unwrap().unwrap();
                n += 1;
            }
            n
        });
        let err = tokio::time::timeout(ms(3000), quiet.message())
            .await
            .expect("the quiet stream is reset")
            .expect_err("reset, not ended");
        let took = start.elapsed();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
        assert!(err.message().contains("stream idle"), "{err:?}");
        assert!(took >= timeout, "reset after {took:?}, before the timeout");
        assert!(took <= timeout * 5 / 4 + ms(300), "reset after {took:?}");
        // The quiet stream's handler is gone (the busy one's still runs).
        wait_until(ms(500), || feed.dropped.load(Ordering::SeqCst) == 1).await;
        // The busy stream kept flowing past the quiet one's reset, on the same connection.
        assert!(busy_reader.await.unwrap() > 30);
        assert_eq!(server.connections().len(), 1, "server side {server_side}");
        println!("server side {server_side}: reset after {took:?}");
    }
}

/// Review: packed frames were built up to ~20 KiB whatever the peer's max frame size, and a frame
/// over it was dropped with its credit spent: messages lost, the stream ending "OK".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_packed_frames_respect_the_peers_max_frame_size() {
    let server = feed_server(ServerConfig::default()).await;
    let config = ClientConfig {
        connection: ConnectionConfig {
            max_frame_size: 8192,
            ..ConnectionConfig::default()
        },
        ..quiet_client()
    };
    let client = FeedClient::new(Client::connect(server.local_addr(), config).await.unwrap());
    let mut watch = client
        .watch(Subscribe {
            count: 2000,
            size: 1000,
            interval_ms: 0,
        })
        .await
        .unwrap();
    let mut n = 0;
    while let Some(e) = tokio::time::timeout(ms(5000), watch.message()).await.unwrap().unwrap() {
        n += 1;
        assert_eq!(e.seq, n);
    }
    assert_eq!(n, 2000);
}

/// Review: empty messages cost no credit and no send buffer, so a producer of empty messages
/// facing a consumer that stopped parked frames without bound and never stalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_stream_of_empty_messages_is_flow_controlled_and_stalls() {
    let window = 16 * 1024;
    let connection = ConnectionConfig {
        stream_window: window,
        stream_stall_timeout: Some(ms(500)),
        ..ConnectionConfig::default()
    };
    let server = serve_feed(
        ServerConfig {
            connection,
            ..ServerConfig::default()
        },
        LedgerFeed {
            empty_events: true,
            ..LedgerFeed::default()
        },
    )
    .await;
    let config = ClientConfig {
        connection,
        ..quiet_client()
    };
    let raw = Client::connect(server.local_addr(), config).await.unwrap();
    let mut watch = FeedClient::new(raw.clone()).watch(Subscribe::default()).await.unwrap();
    watch.message().await.unwrap().unwrap(); // one, then the consumer stops
    wait_until(ms(2000), || !server.connections().is_empty()).await;
    let sconn = server.connections()[0].clone();
    let most = peak_for(ms(300), || sconn.stream_bytes_waiting()).await;
    assert!(
        most <= 2 * window as usize,
        "{most} B parked against a {window} B window"
    );
    // Stalled, then reset alone.
    wait_until(ms(3000), || sconn.open_streams() == 0).await;
    assert!(sconn.is_open());
}

/// Review: a batch of ready messages had no byte cap, so a stalled stream of large messages
/// parked up to a batch of them (256) against its window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_batch_of_large_messages_stays_within_the_window() {
    let (server, raw) = pair(ConnectionConfig::default()).await;
    let size = 512 * 1024;
    let mut watch = FeedClient::new(raw.clone())
        .watch(Subscribe {
            count: 0,
            size,
            interval_ms: 0,
        })
        .await
        .unwrap();
    watch.message().await.unwrap().unwrap();
    wait_until(ms(2000), || !server.connections().is_empty()).await;
    let sconn = server.connections()[0].clone();
    let window = ConnectionConfig::default().stream_window as usize;
    let most = peak_for(ms(300), || sconn.stream_bytes_waiting() + sconn.outbound_buffered()).await;
    let bound = window + 2 * size as usize;
    assert!(most <= bound, "{most} B held on the server, bound {bound}");
}

/// Review: a receiver that took some messages of a packed frame and was dropped gives back the
/// whole frame's credit, so the connection window stays whole for the next stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_partly_read_packed_frame_gives_back_all_its_credit_when_dropped() {
    let connection = ConnectionConfig {
        stream_window: 16 * 1024,
        connection_window: 16 * 1024,
        ..ConnectionConfig::default()
    };
    let (_server, client) = pair(connection).await;
    let client = FeedClient::new(client);
    for round in 0..20 {
        let mut watch = client
            .watch(Subscribe {
                count: 1000,
                size: 60,
                interval_ms: 0,
            })
            .await
            .unwrap();
        for _ in 0..3 {
            tokio::time::timeout(ms(5000), watch.message())
                .await
                .unwrap_or_else(|_| panic!("round {round}: the connection window is spent"))
                .unwrap()
                .unwrap();
        }
        drop(watch);
    }
}

/// Review: a client's GOAWAY (`Client::close`) carries last id 0, and the server read it as "the
/// streams above 0 were never run": it dropped every stream the client had open, which then
/// hung until the client's drain timeout. A closing client's streams run on, as its calls do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_closing_clients_streams_keep_flowing() {
    let server = feed_server(ServerConfig::default()).await;
    let client = Client::connect(server.local_addr(), quiet_client()).await.unwrap();
    let mut watch = FeedClient::new(client.clone())
        .watch(Subscribe {
            count: 0,
            size: 10,
            interval_ms: 5,
        })
        .await
        .unwrap();
    watch.message().await.unwrap().unwrap();
    client.close();
    for i in 0..20 {
        tokio::time::timeout(ms(1000), watch.message())
            .await
            .unwrap_or_else(|_| panic!("the stream hung after close ({i} more)"))
            .unwrap()
            .unwrap();
    }
}

/// Review: while a server's writes wait on a slow link (a large answer draining at its pace), a
/// heartbeat queues behind them and its answer cannot come back in time; the server's
/// heartbeats, which run while a stream is open, then closed a live connection as
/// HeartbeatTimeout. The write-stall bucket is what judges a peer behind a backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_server_behind_its_own_backlog_does_not_count_heartbeat_misses() {
    use rpc_core::config::{HeartbeatConfig, TcpConfig};
    use rpc_core::event::ConnectionEvent;
    let beat = HeartbeatConfig {
        enabled: true,
        interval: ms(200),
        timeout: ms(100),
        max_failures: 2,
        ..Default::default()
    };
    let server = Server::builder()
        .config(ServerConfig {
            heartbeat: beat,
            tcp: TcpConfig {
                send_buffer_size: Some(32 * 1024),
                ..TcpConfig::default()
            },
            ..ServerConfig::default()
        })
        .add_service(FeedServer::new(FeedService))
        .add_service(examples::echo::echo_server::EchoServer::new(
            examples::services::EchoService::default(),
        ))
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let mut events = server.events();
    let proxy = tests::proxy::FaultProxy::start(server.local_addr()).await;
    let client = Client::connect(
        proxy.addr(),
        ClientConfig {
            connections_per_endpoint: 1,
            request_timeout: Duration::from_secs(20),
            connection: ConnectionConfig {
                max_frame_size: 8 << 20,
                ..ConnectionConfig::default()
            },
            tcp: TcpConfig {
                recv_buffer_size: Some(32 * 1024),
                ..TcpConfig::default()
            },
            ..quiet_client()
        },
    )
    .await
    .unwrap();
    // A stream keeps the server's heartbeats running.
    let mut watch = FeedClient::new(client.clone())
        .watch(Subscribe {
            count: 0,
            size: 10,
            interval_ms: 50,
        })
        .await
        .unwrap();
    watch.message().await.unwrap().unwrap();
    // A slow link from the server (about 1 MB/s), and a 2 MiB answer to drain through it.
    proxy.set(tests::proxy::Fault::Throttle(
        tests::proxy::Direction::ToClient,
        1 << 20,
    ));
    let mut echo = examples::echo::echo_client::EchoClient::new(client.clone());
    let big = tokio::spawn(async move {
        echo.say(examples::echo::EchoRequest {
            message: "big".into(),
            reply_size: 2 << 20,
            ..Default::default()
        })
        .await
    });
    let reply = tokio::time::timeout(ms(15_000), big).await.unwrap().unwrap().unwrap();
    assert_eq!(reply.into_body().payload.len(), 2 << 20);
    let closed = tests::wait_event(&mut events, ms(1), |e| matches!(e, ConnectionEvent::Closed { .. })).await;
    assert!(closed.is_none(), "closed while draining: {closed:?}");
    proxy.set(tests::proxy::Fault::Pass);
    tokio::time::timeout(ms(2000), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(server.connections().len(), 1);
}

/// Second review: a message over the peer's max frame size spent its frame's credit before the
/// encode failed, wedging every stream of the connection; and its stream's reset sent no CANCEL
/// while the opening request still sat in the write buffer, so the server's handler ran on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_an_oversized_message_fails_its_stream_alone_and_cancels_the_handler() {
    let server = feed_server(ServerConfig {
        connection: ConnectionConfig {
            max_frame_size: 64 * 1024,
            ..ConnectionConfig::default()
        },
        ..ServerConfig::default()
    })
    .await;
    let config = ClientConfig {
        connections_per_endpoint: 1,
        connection: ConnectionConfig {
            // The client's own window small, so a lost frame's credit would wedge what follows.
            stream_window: 64 * 1024,
            connection_window: 64 * 1024,
            ..ConnectionConfig::default()
        },
        ..quiet_client()
    };
    let client = Client::connect(server.local_addr(), config).await.unwrap();
    for _ in 0..3 {
        let (mut sender, mut responses) = open_echo(&client).await;
        let big = Event {
            seq: 1,
            payload: vec![0u8; 100 * 1024].into(),
        };
        let _ = sender.send(prost::Message::encode_to_vec(&big).into()).await;
        let err = tokio::time::timeout(ms(2000), responses.message())
            .await
            .unwrap()
            .expect_err("the oversized message fails its stream");
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(err.message().contains("max_frame_size"), "{err:?}");
    }
    // The server's handlers were cancelled, and the connection's other streams still flow.
    wait_until(ms(2000), || server.connections()[0].open_streams() == 0).await;
    let mut watch = FeedClient::new(client.clone())
        .watch(Subscribe {
            count: 200,
            size: 1000,
            interval_ms: 0,
        })
        .await
        .unwrap();
    let mut n = 0;
    while tokio::time::timeout(ms(2000), watch.message())
        .await
        .unwrap()
        .unwrap()
        .is_some()
    {
        n += 1;
    }
    assert_eq!(n, 200);
}

/// Second review: only DATA frames counted as activity for `stream_idle_timeout`, so a steady
/// consumer slower than half a window per timeout (its credit goes back a half window at a time)
/// was reset as idle while it read every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_slow_steady_consumer_is_not_idle() {
    let connection = ConnectionConfig {
        stream_window: 8 * 1024,
        connection_window: 8 * 1024,
        stream_idle_timeout: Some(ms(200)),
        ..ConnectionConfig::default()
    };
    let (_server, client) = pair(connection).await;
    let mut watch = FeedClient::new(client.clone())
        .watch(Subscribe {
            count: 0,
            size: 1000,
            interval_ms: 0,
        })
        .await
        .unwrap();
    // 10 a second for 3 s, against a window of 8 events: credit goes back every 4 events (0.4 s),
    // twice the idle timeout, and nothing but the consumer moves meanwhile.
    for i in 0..30 {
        watch
            .message()
            .await
            .unwrap_or_else(|e| panic!("reset while being read, at {i}: {e:?}"))
            .unwrap();
        tokio::time::sleep(ms(100)).await;
    }
}

/// Second review: a handler that dropped its request stream left the client's messages to it
/// costing stream credit that never came back, so the client's sender stalled and was reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_handler_that_drops_its_requests_does_not_stall_the_client() {
    let connection = ConnectionConfig {
        stream_window: 16 * 1024,
        stream_stall_timeout: Some(ms(500)),
        ..ConnectionConfig::default()
    };
    let server = serve_feed(
        ServerConfig {
            connection,
            ..ServerConfig::default()
        },
        LedgerFeed {
            drop_requests: true,
            ..LedgerFeed::default()
        },
    )
    .await;
    let client = Client::connect(
        server.local_addr(),
        ClientConfig {
            connection,
            ..quiet_client()
        },
    )
    .await
    .unwrap();
    let (mut sender, mut responses) = open_echo(&client).await;
    let e = Event {
        seq: 1,
        payload: vec![1u8; 1000].into(),
    };
    let msg: bytes::Bytes = prost::Message::encode_to_vec(&e).into();
    sender.send(msg.clone()).await.unwrap();
    responses.message().await.unwrap().unwrap();
    // Five windows' worth to a receiver that is gone: every send goes through.
    for i in 0..80 {
        tokio::time::timeout(ms(2000), sender.send(msg.clone()))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("send {i}: {e}"));
    }
    responses.message().await.unwrap().unwrap();
}
