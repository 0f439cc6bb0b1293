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
    Server::builder()
        .config(config)
        .add_service(FeedServer::new(FeedService))
        .add_service(examples::echo::echo_server::EchoServer::new(
            examples::services::EchoService::default(),
        ))
        .bind("127.0.0.1:0")
        .await
        .unwrap()
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
    let raw = Client::connect(server.local_addr(), config).await.unwrap();
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
    assert!(err.message().contains("messages received"), "{err:?}");
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
