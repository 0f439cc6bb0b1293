//! Starts a server and a client in one process, makes calls, prints what happened, exits 0.

use std::time::Duration;

use bytes::Bytes;
use examples::echo::echo_client::EchoClient;
use examples::echo::echo_server::EchoServer;
use examples::echo::EchoRequest;
use examples::feed::v1::feed_client::FeedClient;
use examples::feed::v1::feed_server::FeedServer;
use examples::feed::v1::{Event, Subscribe};
use examples::greeter::v1::greeter_client::GreeterClient;
use examples::greeter::v1::greeter_server::GreeterServer;
use examples::greeter::v1::{person, CountRequest, HelloRequest, Person, Tag};
use examples::services::{EchoService, FeedService, GreeterService};
use futures_util::StreamExt;
use rpc_client::{Client, ClientConfig, Request};
use rpc_server::Server;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    examples::cli::init_tracing();
    let server = Server::builder()
        .add_service(EchoServer::new(EchoService::default()))
        .add_service(GreeterServer::new(GreeterService))
        .add_service(FeedServer::new(FeedService))
        .bind("127.0.0.1:0")
        .await?;
    let addr = server.local_addr();
    println!("server listening on {addr}");

    // One client, one multiplexed connection, shared by both typed clients.
    let client = Client::connect(addr, ClientConfig::default()).await?;
    let mut echo = EchoClient::new(client.clone());
    let mut greeter = GreeterClient::new(client.clone());

    let reply = echo
        .say(EchoRequest {
            message: "hello tether".into(),
            ..Default::default()
        })
        .await?;
    println!(
        "Echo/Say            -> {:?} (handler saw {} ms of deadline left)",
        reply.body().message,
        reply.body().remaining_deadline_ms
    );

    let ada = Person {
        name: "Ada".into(),
        address: Some(person::Address {
            city: "London".into(),
            lines: vec!["12 St James's Sq".into()],
        }),
        tags: vec![Tag {
            key: "role".into(),
            value: "engineer".into(),
        }],
    };
    let hello = greeter
        .say_hello(HelloRequest {
            person: Some(ada.clone()),
        })
        .await?;
    println!("Greeter/SayHello    -> {:?}", hello.body().greeting);
    let grace = Person {
        name: "Grace".into(),
        address: Some(person::Address {
            city: "Arlington".into(),
            lines: vec![],
        }),
        tags: vec![],
    };
    let count = greeter
        .count(CountRequest {
            people: vec![ada.clone(), grace, ada],
        })
        .await?;
    let mut cities: Vec<_> = count.body().by_city.iter().collect();
    cities.sort();
    println!(
        "Greeter/Count       -> {} people, by city {:?}",
        count.body().count,
        cities
    );

    // 100 concurrent calls over the same connection.
    let mut tasks = Vec::new();
    for i in 0..100u32 {
        let mut echo = echo.clone();
        tasks.push(tokio::spawn(async move {
            let r = echo
                .say(EchoRequest {
                    message: i.to_string(),
                    delay_ms: (100 - i) % 7,
                    ..Default::default()
                })
                .await?;
            Ok::<bool, rpc_client::Error>(r.into_body().message == i.to_string())
        }));
    }
    let mut correct = 0;
    for t in tasks {
        if t.await?? {
            correct += 1;
        }
    }
    println!(
        "100 concurrent Says -> {correct} answered correctly over {} connection(s)",
        client.connections().len()
    );

    let err = echo
        .fail(EchoRequest {
            message: "the disk is full".into(),
            ..Default::default()
        })
        .await
        .expect_err("Fail fails");
    println!(
        "Echo/Fail           -> {} (may have executed: {})",
        err,
        err.may_have_executed()
    );

    let err = client
        .unary(Request::for_method("/echo.Echo/Nope", Bytes::new()))
        .await
        .expect_err("no such method");
    // The error says itself that nothing ran: "(not executed)".
    println!("Echo/Nope           -> {err}");

    let slow = Request::for_method(
        "",
        EchoRequest {
            message: "slow".into(),
            delay_ms: 500,
            ..Default::default()
        },
    )
    .with_timeout(Duration::from_millis(100));
    let err = echo.say(slow).await.expect_err("deadline");
    println!("Say with 100 ms deadline, 500 ms handler -> {err}");

    client
        .oneway(Request::for_method("/echo.Echo/Say", Bytes::new()))
        .await?;
    println!("oneway Say          -> queued");

    // Streams, the three kinds, on the same connection.
    let feed = FeedClient::new(client.clone());
    let mut watch = feed
        .watch(Subscribe {
            count: 5,
            size: 16,
            interval_ms: 10,
        })
        .await?;
    let mut seqs = Vec::new();
    while let Some(event) = watch.message().await? {
        seqs.push(event.seq);
    }
    println!("Feed/Watch (server stream)  -> events {seqs:?}, then the end");
    let events = |n: u64| {
        futures_util::stream::iter((1..=n).map(|seq| Event {
            seq,
            payload: Bytes::from_static(b"task"),
        }))
    };
    let summary = feed.upload(events(100)).await?.into_body();
    println!(
        "Feed/Upload (client stream) -> the server counted {} events, {} bytes",
        summary.count, summary.bytes
    );
    let echoed: Vec<u64> = feed
        .echo(events(3))
        .await?
        .map(|e| e.map(|e| e.seq).unwrap_or(0))
        .collect()
        .await;
    println!("Feed/Echo (bidirectional)   -> echoed {echoed:?}");

    let mut events = server.events();
    client.close();
    server.shutdown().await;
    while let Ok(ev) = events.try_recv() {
        println!("server event: {ev:?}");
    }
    println!("server shut down gracefully");
    Ok(())
}
