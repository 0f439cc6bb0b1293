//! Resumable subscriptions end to end (issue 16): a topic publishing 1,000 messages a second,
//! three servers sharing it, one subscriber that checks every message against the publisher's
//! ledger (each position once, in order, none missing) through each fault: a server killed and
//! restarted, a graceful restart, a NAT forgetting the flow, a stall reset. A resume beyond the
//! replay window is a typed `ResumeGap` with exact bounds; a plain stream under the same fault
//! ends with its error; a resume with nowhere to go gives up within `resume_timeout`.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use examples::feed::v1::feed_client::FeedClient;
use examples::feed::v1::feed_server::FeedServer;
use examples::feed::v1::Subscribe;
use examples::services::{FeedService, TopicService};
use examples::topic::v1::topic_client::TopicClient;
use examples::topic::v1::topic_server::TopicServer;
use examples::topic::v1::{Subscription, Tick};
use rpc_client::{Client, ClientConfig, ResumeGap};
use rpc_core::config::{ConnectionConfig, HeartbeatConfig};
use rpc_core::event::ConnectionEvent;
use rpc_core::{Code, Request};
use rpc_server::{ReplayLog, Server, ServerConfig, ServerHandle};
use tests::proxy::{Fault, FaultProxy};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Publishes a tick every millisecond into `log` until dropped (`stop`).
struct Publisher {
    log: ReplayLog<Tick>,
    stop: Arc<AtomicBool>,
}

impl Publisher {
    fn start(log: ReplayLog<Tick>) -> Publisher {
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (log.clone(), stop.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(ms(1));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            while !s.load(Ordering::Relaxed) {
                every.tick().await;
                publish(&l);
            }
        });
        Publisher { log, stop }
    }

    fn head(&self) -> u64 {
        self.log.head()
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One tick at the next position, which it carries (the ledger the subscriber checks).
fn publish(log: &ReplayLog<Tick>) -> u64 {
    let position = log.head() + 1;
    let p = log.publish(Tick {
        position,
        payload: Bytes::from(position.to_be_bytes().to_vec()),
    });
    assert_eq!(p, position, "one publisher");
    p
}

fn server_config() -> ServerConfig {
    ServerConfig {
        shutdown_grace: ms(2000),
        ..ServerConfig::default()
    }
}

async fn topic_server(log: &ReplayLog<Tick>, addr: SocketAddr, config: ServerConfig) -> ServerHandle {
    Server::builder()
        .config(config)
        .add_service(TopicServer::new(TopicService::new(log.clone())))
        .add_service(FeedServer::new(FeedService))
        .bind(addr)
        .await
        .unwrap()
}

/// What the subscriber received: each tick's position and when, in order of arrival, or how the
/// stream ended.
#[derive(Debug)]
enum Got {
    Tick(u64, Instant, SocketAddr),
    End(Result<(), rpc_core::Status>),
}

/// Consumes `stream` into a channel, checking that each tick is the one after the last and
/// matches the stream's position; `paused` holds it (a consumer that stops reading).
fn consume(mut stream: rpc_client::Resumable<Tick>, paused: Arc<AtomicBool>) -> mpsc::UnboundedReceiver<Got> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut last: Option<u64> = None;
        let resumed = tokio::sync::Notify::new();
        loop {
            while paused.load(Ordering::Relaxed) {
                let _ = tokio::time::timeout(ms(10), resumed.notified()).await;
            }
            match stream.message().await {
                Ok(Some(t)) => {
                    if let Some(l) = last {
                        assert_eq!(t.position, l + 1, "each position once, in order, none missing");
                    }
                    assert_eq!(Some(t.position), stream.position());
                    assert_eq!(t.payload, Bytes::from(t.position.to_be_bytes().to_vec()));
                    last = Some(t.position);
                    let on = stream.endpoint().unwrap();
                    if tx.send(Got::Tick(t.position, Instant::now(), on)).is_err() {
                        return;
                    }
                }
                Ok(None) => {
                    let _ = tx.send(Got::End(Ok(())));
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Got::End(Err(e)));
                    return;
                }
            }
        }
    });
    rx
}

/// What the subscriber received, read in phases.
struct Ticks {
    rx: mpsc::UnboundedReceiver<Got>,
    /// When the last tick read arrived: a silence spans the phases it falls between.
    last_at: Option<Instant>,
}

impl Ticks {
    /// The ticks received until one at or past `position`: the longest silence between two (the
    /// one before the first counted too), the last position, and the endpoint it came from.
    /// Fails on the stream's end.
    async fn until(&mut self, position: u64, limit: Duration) -> (Duration, u64, SocketAddr) {
        let mut longest = Duration::ZERO;
        let deadline = Instant::now() + limit;
        loop {
            let got = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("position {position} not reached within {limit:?}"))
                .expect("subscriber running");
            match got {
                Got::Tick(p, at, on) => {
                    if let Some(prev) = self.last_at {
                        longest = longest.max(at - prev);
                    }
                    self.last_at = Some(at);
                    if p >= position {
                        return (longest, p, on);
                    }
                }
                Got::End(r) => panic!("the subscription ended: {r:?}"),
            }
        }
    }
}

/// Forgets the events so far: what follows belongs to the next fault.
fn drain(events: &mut broadcast::Receiver<ConnectionEvent>) {
    while events.try_recv().is_ok() {}
}

async fn resumed_event(events: &mut broadcast::Receiver<ConnectionEvent>) -> (u32, Duration, u64) {
    match tests::wait_event(events, ms(5000), |e| matches!(e, ConnectionEvent::StreamResumed { .. })).await {
        Some(ConnectionEvent::StreamResumed {
            attempts,
            gap,
            replayed,
            method,
            ..
        }) => {
            assert_eq!(method, "/topic.v1.Topic/Subscribe");
            (attempts, gap, replayed)
        }
        other => panic!("no StreamResumed event: {other:?}"),
    }
}

/// Reads `stream` until it ends in error, within `limit`: the error (an end without one fails).
async fn error_end<T, S>(stream: &mut S, limit: Duration) -> rpc_core::Status
where
    S: futures_util::Stream<Item = Result<T, rpc_core::Status>> + Unpin,
{
    use futures_util::StreamExt;
    loop {
        match tokio::time::timeout(limit, stream.next())
            .await
            .expect("the stream ends")
        {
            Some(Ok(_)) => {}
            None => panic!("a broken stream ended as if complete"),
            Some(Err(e)) => return e,
        }
    }
}

fn subscription() -> Subscription {
    Subscription { topic: "ticks".into() }
}

/// The pub/sub example under each fault in turn, every message checked against the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_receives_every_message_once_in_order_through_every_fault() {
    let log = ReplayLog::new(20_000);
    let publisher = Publisher::start(log.clone());
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let stall = ms(300);
    let config = ServerConfig {
        connection: ConnectionConfig {
            stream_stall_timeout: Some(stall),
            ..ConnectionConfig::default()
        },
        ..server_config()
    };
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(Some(topic_server(&log, any, config.clone()).await));
    }
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.as_ref().unwrap().local_addr()).collect();
    // Each server behind a proxy of its own: the NAT that forgets a flow.
    let mut proxies = Vec::new();
    for a in &addrs {
        proxies.push(FaultProxy::start(*a).await);
    }
    let beat = HeartbeatConfig {
        enabled: true,
        interval: ms(200),
        timeout: ms(100),
        max_failures: 2,
        ..Default::default()
    };
    let client = Client::with_endpoints(
        proxies.iter().map(FaultProxy::addr),
        ClientConfig {
            heartbeat: beat,
            connection: ConnectionConfig {
                // A small window: a paused consumer stalls its stream within milliseconds.
                stream_window: 4096,
                ..ConnectionConfig::default()
            },
            backoff: rpc_client::BackoffConfig {
                initial: ms(100),
                ..rpc_client::BackoffConfig::default()
            },
            ..ClientConfig::default()
        },
    )
    .unwrap();
    let mut events = client.events();
    let stream = TopicClient::new(client.clone())
        .subscribe(subscription())
        .await
        .unwrap();
    let on = |endpoint: SocketAddr| proxies.iter().position(|p| p.addr() == endpoint).unwrap();
    let paused = Arc::new(AtomicBool::new(false));
    let mut ticks = Ticks {
        rx: consume(stream, paused.clone()),
        last_at: None,
    };
    let (_, first_phase, endpoint) = ticks.until(publisher.head() + 200, ms(5000)).await;
    let mut table = Vec::new();

    // 1. The subscriber's server is killed (no GOAWAY, sockets closed), then restarted.
    let i = on(endpoint);
    drain(&mut events);
    servers[i].take().unwrap().abort().await;
    let (longest, _, endpoint) = ticks.until(publisher.head() + 500, ms(5000)).await;
    assert_ne!(on(endpoint), i, "resumed on another server");
    let (attempts, gap, replayed) = resumed_event(&mut events).await;
    table.push(("server killed", longest, gap, replayed, attempts));
    servers[i] = Some(topic_server(&log, addrs[i], config.clone()).await);

    // 2. Graceful restart of the server the stream is on now: it ends the stream at once, as a
    // break, and the subscriber moves without waiting out the 2 s grace.
    let now_on = on(endpoint);
    drain(&mut events);
    let old = servers[now_on].take().unwrap();
    let shutting = tokio::spawn(old.shutdown());
    let (longest, _, endpoint) = ticks.until(publisher.head() + 500, ms(5000)).await;
    assert_ne!(on(endpoint), now_on, "resumed on another server");
    let (attempts, gap, replayed) = resumed_event(&mut events).await;
    assert!(
        gap < ms(1000),
        "a draining server's stream resumes without waiting for its grace: {gap:?}"
    );
    table.push(("graceful restart", longest, gap, replayed, attempts));
    shutting.await.unwrap();
    servers[now_on] = Some(topic_server(&log, addrs[now_on], config.clone()).await);

    // 3. The NAT forgets the flow: nothing passes, no FIN, no RST. Heartbeats notice.
    let (_, _, endpoint) = ticks.until(publisher.head() + 10, ms(5000)).await;
    let now_on = on(endpoint);
    drain(&mut events);
    proxies[now_on].set(Fault::Blackhole);
    let (longest, _, endpoint) = ticks.until(publisher.head() + 1000, ms(5000)).await;
    assert_ne!(on(endpoint), now_on, "resumed on another server");
    let (attempts, gap, replayed) = resumed_event(&mut events).await;
    assert!(
        longest >= beat.interval,
        "the stream was silent until the heartbeats noticed: {longest:?}"
    );
    assert!(longest <= beat.detection_bound() + ms(1000), "{longest:?}");
    table.push(("NAT flow loss", longest, gap, replayed, attempts));
    proxies[now_on].set(Fault::Pass);

    // 4. The consumer stops reading for longer than the stall timeout: the server resets the
    // stream as stalled; once the consumer reads again, the stream resumes where it stopped.
    drain(&mut events);
    paused.store(true, Ordering::Relaxed);
    tokio::time::sleep(stall * 4).await; // the consumer's own pause: the workload, not a wait for an event
    paused.store(false, Ordering::Relaxed);
    let (longest, last, _) = ticks.until(publisher.head() + 500, ms(5000)).await;
    let (attempts, gap, replayed) = resumed_event(&mut events).await;
    assert!(replayed > 0, "the messages published during the pause are replayed");
    table.push(("stall reset", longest, gap, replayed, attempts));

    println!("fault | longest silence | resume gap | replayed | attempts");
    for (fault, longest, gap, replayed, attempts) in &table {
        println!("{fault} | {longest:?} | {gap:?} | {replayed} | {attempts}");
    }
    println!("received every position from {first_phase} to {last}, each once, in order");
    drop(servers);
}

/// The endpoint whose connection carries the client's stream.
async fn stream_endpoint(client: &Client) -> SocketAddr {
    let busy = || client.holder().endpoints().into_iter().find(|e| e.in_flight > 0);
    tests::wait_until(ms(2000), || busy().is_some()).await;
    busy().expect("the stream's endpoint").addr
}

/// A resume after a position the log no longer keeps gets `ResumeGap` naming exactly the
/// positions lost, whether asked for directly or reached through a real outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_beyond_the_replay_window_is_a_typed_gap_with_exact_bounds() {
    let log = ReplayLog::new(100);
    for _ in 0..500 {
        publish(&log);
    }
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let server = topic_server(&log, any, server_config()).await;
    let addr = server.local_addr();
    let client = Client::connect(addr, tests::quiet_client()).await.unwrap();
    let topics = TopicClient::new(client.clone());
    let mut old = topics.subscribe_after(subscription(), 10).await.unwrap();
    let err = old.message().await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err}");
    assert_eq!(ResumeGap::of(&err), Some(ResumeGap { from: 11, to: 400 }), "{err}");
    assert!(old.message().await.unwrap().is_none(), "a gap ends the stream");

    // Through an outage: the subscriber has up to some position, its only server dies, the log
    // moves past what it keeps, the server comes back: the resume is a gap, never a skip.
    // After a known position (a fresh subscription would start wherever the log's head is when
    // the server takes it).
    let mut live = topics.subscribe_after(subscription(), 500).await.unwrap();
    publish(&log);
    let got = live.message().await.unwrap().unwrap();
    assert_eq!(got.position, 501);
    server.abort().await;
    for _ in 0..150 {
        publish(&log);
    }
    let oldest = log.oldest().unwrap();
    let _back = topic_server(&log, addr, server_config()).await;
    let err = tokio::time::timeout(ms(10_000), live.message())
        .await
        .expect("the resume answers")
        .unwrap_err();
    assert_eq!(
        ResumeGap::of(&err),
        Some(ResumeGap {
            from: 502,
            to: oldest - 1
        }),
        "{err}"
    );
    assert_eq!(live.position(), Some(501));
}

/// The same kill under a plain (not resumable) server stream: it ends with its typed error and
/// the connection's close reason, and nothing resumes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_stream_under_the_same_fault_ends_with_its_error() {
    let log = ReplayLog::new(100);
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let a = topic_server(&log, any, server_config()).await;
    let b = topic_server(&log, any, server_config()).await;
    let client = Client::with_endpoints([a.local_addr(), b.local_addr()], tests::quiet_client()).unwrap();
    let mut watch = FeedClient::new(client.clone())
        .watch(Subscribe {
            count: 0,
            size: 8,
            interval_ms: 5,
        })
        .await
        .unwrap();
    watch.message().await.unwrap().unwrap();
    let on_a = stream_endpoint(&client).await == a.local_addr();
    let (victim, _other) = if on_a { (a, b) } else { (b, a) };
    victim.abort().await;
    let err = error_end(&mut watch, ms(5000)).await;
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(watch.close_reason().is_some(), "{err}");
    assert!(watch.is_broken());
    assert!(
        watch.message().await.unwrap().is_none(),
        "nothing resumes a plain stream"
    );
}

/// A plain client (no resume metadata) calling a resumable method gets its messages without
/// positions, as any server stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_client_of_a_resumable_method_gets_plain_messages() {
    let log = ReplayLog::new(100);
    let _publisher = Publisher::start(log.clone());
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let server = topic_server(&log, any, server_config()).await;
    let client = Client::connect(server.local_addr(), tests::quiet_client())
        .await
        .unwrap();
    let (mut sender, responses) = client
        .open_stream(Request::for_method("/topic.v1.Topic/Subscribe", ()))
        .await
        .unwrap();
    sender
        .send(Bytes::from(prost::Message::encode_to_vec(&subscription())))
        .await
        .unwrap();
    sender.finish().await.unwrap();
    let mut responses = responses
        .decoded(|b| <Tick as prost::Message>::decode(b).map_err(|e| rpc_core::Status::internal(e.to_string())));
    let first = responses.message().await.unwrap().unwrap();
    for n in 1..=20 {
        let tick = responses.message().await.unwrap().unwrap();
        assert_eq!(
            tick.position,
            first.position + n,
            "plain messages, in order, no checkpoint among them"
        );
    }
}

/// With every server gone, the resume gives up within `resume_timeout`, reports it, and the
/// consumer gets the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_with_nowhere_to_go_gives_up_within_the_resume_timeout() {
    let log = ReplayLog::new(100);
    let _publisher = Publisher::start(log.clone());
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let server = topic_server(&log, any, server_config()).await;
    let client = Client::connect(
        server.local_addr(),
        ClientConfig {
            resume_timeout: ms(1500),
            max_resume_attempts: 100,
            backoff: rpc_client::BackoffConfig {
                initial: ms(100),
                ..rpc_client::BackoffConfig::default()
            },
            ..tests::quiet_client()
        },
    )
    .await
    .unwrap();
    let mut events = client.events();
    let mut live = TopicClient::new(client.clone())
        .subscribe(subscription())
        .await
        .unwrap();
    live.message().await.unwrap().unwrap();
    server.abort().await;
    let broke = Instant::now();
    let err = error_end(&mut live, ms(10_000)).await;
    let took = broke.elapsed();
    assert!(err.message().contains("resume failed"), "{err}");
    assert!(took >= ms(1400) && took < ms(4000), "gave up after {took:?}");
    let failed = tests::wait_event(&mut events, ms(1000), |e| {
        matches!(e, ConnectionEvent::ResumeFailed { .. })
    })
    .await;
    assert!(
        matches!(failed, Some(ConnectionEvent::ResumeFailed { attempts, .. }) if attempts >= 2),
        "{failed:?}"
    );
}

/// A refusal that would end every attempt the same way (here an unknown method: a server
/// without the topic) ends the subscription at once with it, not after `resume_timeout` of
/// reopening. Found in review.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_refusal_that_would_repeat_is_not_resumed() {
    let server = tests::echo_server(server_config()).await;
    let client = Client::connect(server.local_addr(), tests::quiet_client())
        .await
        .unwrap();
    let start = Instant::now();
    let mut sub = TopicClient::new(client.clone())
        .subscribe(subscription())
        .await
        .unwrap();
    let err = tokio::time::timeout(ms(5000), sub.message())
        .await
        .expect("answers")
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err}");
    assert!(start.elapsed() < ms(1000), "ended after {:?}", start.elapsed());
}

/// A subscription with a deadline whose server dies is not reopened past its deadline, and ends
/// with DEADLINE_EXCEEDED, not a resume failure. Found in review.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_subscription_with_a_deadline_is_not_resumed_past_it() {
    let log = ReplayLog::new(100);
    let _publisher = Publisher::start(log.clone());
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let server = topic_server(&log, any, server_config()).await;
    let client = Client::connect(
        server.local_addr(),
        ClientConfig {
            backoff: rpc_client::BackoffConfig {
                initial: ms(50),
                ..rpc_client::BackoffConfig::default()
            },
            ..tests::quiet_client()
        },
    )
    .await
    .unwrap();
    let deadline = ms(1500);
    let start = Instant::now();
    let mut sub = TopicClient::new(client.clone())
        .subscribe(Request::for_method("", subscription()).with_timeout(deadline))
        .await
        .unwrap();
    sub.message().await.unwrap().unwrap();
    server.abort().await;
    let err = error_end(&mut sub, ms(10_000)).await;
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    let took = start.elapsed();
    assert!(took < deadline + ms(1000), "ended after {took:?}");
}

/// A graceful shutdown ends a resumable stream at once even while the stream waits for its
/// consumer's credit (its handler's stream is not being polled then): the server does not wait
/// out its grace for it, and the subscriber, reading again, resumes on the other server with
/// every position once, in order. Found in review.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_draining_server_ends_a_resumable_stream_blocked_on_credit() {
    let log = ReplayLog::new(10_000);
    for _ in 0..2000 {
        publish(&log);
    }
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let grace = ServerConfig {
        shutdown_grace: Duration::from_secs(20),
        ..ServerConfig::default()
    };
    let a = topic_server(&log, any, grace.clone()).await;
    let b = topic_server(&log, any, grace).await;
    let client = Client::with_endpoints(
        [a.local_addr(), b.local_addr()],
        ClientConfig {
            connection: ConnectionConfig {
                stream_window: 4096,
                ..ConnectionConfig::default()
            },
            ..tests::quiet_client()
        },
    )
    .unwrap();
    // 2,000 messages to replay against a 4 KiB window: the server blocks on credit at once.
    let mut sub = TopicClient::new(client.clone())
        .subscribe_after(subscription(), 0)
        .await
        .unwrap();
    assert_eq!(sub.message().await.unwrap().unwrap().position, 1);
    let on = sub.endpoint().unwrap();
    let (draining, other) = if on == a.local_addr() { (a, b) } else { (b, a) };
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), draining.shutdown())
        .await
        .expect("the drain does not wait out the 20 s grace for a resumable stream");
    println!("drained in {:?}", start.elapsed());
    for expect in 2..=2000 {
        let t = tokio::time::timeout(Duration::from_secs(5), sub.message())
            .await
            .expect("the subscription goes on")
            .unwrap()
            .unwrap();
        assert_eq!(t.position, expect);
    }
    assert_eq!(sub.endpoint(), Some(other.local_addr()));
}
