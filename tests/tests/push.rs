//! The WebSocket incident, reproduced and survived: a server pushes tasks on one stream per agent
//! to 50 agents; one agent consumes 100x slower than the pushes come. Its stream stalls and is
//! reset after `stream_stall_timeout`, alone: the other 49 get every task at the same rate as when
//! nobody is slow, the server's buffering for the slow agent stays within its window, and no
//! connection is reset.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use examples::feed::v1::feed_client::FeedClient;
use examples::feed::v1::feed_server::FeedServer;
use examples::feed::v1::Subscribe;
use examples::services::FeedService;
use rpc_client::{Client, ClientConfig};
use rpc_core::config::ConnectionConfig;
use rpc_core::Code;
use rpc_server::{Server, ServerConfig};
use tests::quiet_client;
use tokio::time::Instant;

const AGENTS: usize = 50;
const TASKS: u32 = 300;
const INTERVAL_MS: u32 = 10;
const TASK_BYTES: u32 = 4096;
const WINDOW: u32 = 16 * 1024;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

struct Run {
    /// How long each fast agent took to receive all its tasks.
    fast: Vec<Duration>,
    /// The slow agent's end: the error its stream ended with, after how many tasks.
    slow: Option<(Code, u64)>,
    /// The most the server held for writing on any one connection (encoded, queued and waiting
    /// for credit), sampled.
    slow_buffered: usize,
}

async fn run(with_slow: bool) -> Run {
    let connection = ConnectionConfig {
        stream_window: WINDOW,
        stream_stall_timeout: Some(ms(1000)),
        ..ConnectionConfig::default()
    };
    let server = Server::builder()
        .config(ServerConfig {
            connection,
            ..ServerConfig::default()
        })
        .add_service(FeedServer::new(FeedService))
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let config = ClientConfig {
        connections_per_endpoint: 1,
        connection,
        ..quiet_client()
    };
    let mut agents = Vec::new();
    for _ in 0..AGENTS {
        agents.push(Client::connect(server.local_addr(), config.clone()).await.unwrap());
    }
    let ids: Vec<u64> = agents.iter().map(|a| a.connections()[0].id()).collect();
    let subscribe = Subscribe {
        count: TASKS,
        size: TASK_BYTES,
        interval_ms: INTERVAL_MS,
    };
    let mut fast = Vec::new();
    let mut slow = None;
    for (i, agent) in agents.iter().enumerate() {
        let client = FeedClient::new(agent.clone());
        let is_slow = with_slow && i == 0;
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut watch = client.watch(subscribe).await.unwrap();
            let mut n = 0u64;
            loop {
                match watch.message().await {
                    Ok(Some(e)) => {
                        n += 1;
                        assert_eq!(e.seq, n, "in order, none lost");
                        if is_slow {
                            // 100x slower than the pushes.
                            tokio::time::sleep(ms(u64::from(INTERVAL_MS) * 100)).await;
                        }
                    }
                    Ok(None) => return (start.elapsed(), n, None),
                    Err(e) => return (start.elapsed(), n, Some(e.code())),
                }
            }
        });
        if is_slow {
            slow = Some(task);
        } else {
            fast.push(task);
        }
    }
    // What the server holds for writing on any connection, sampled while the pushes run (the
    // sampling interval is not a synchronisation: the assertion is on the maximum seen).
    let sampler = {
        let conns = server.connections();
        tokio::spawn(async move {
            let mut most = 0;
            loop {
                for c in &conns {
                    most = most.max(c.outbound_buffered() + c.stream_bytes_waiting());
                }
                tokio::time::sleep(ms(10)).await;
                if conns.iter().all(|c| c.open_streams() == 0) {
                    return most;
                }
            }
        })
    };
    let mut times = Vec::new();
    for t in fast {
        let (took, n, err) = t.await.unwrap();
        assert_eq!((n, err), (u64::from(TASKS), None), "a fast agent lost tasks");
        times.push(took);
    }
    let slow = match slow {
        Some(t) => {
            let (_, n, err) = t.await.unwrap();
            Some((err.expect("the slow agent's stream ended as if complete"), n))
        }
        None => None,
    };
    let slow_buffered = sampler.await.unwrap();
    // No connection was reset: every agent still has the connection it started with.
    for (agent, id) in agents.iter().zip(&ids) {
        let conns = agent.connections();
        assert_eq!(conns.len(), 1);
        assert_eq!(conns[0].id(), *id, "a connection was replaced");
        assert!(conns[0].is_open());
    }
    times.sort();
    Run {
        fast: times,
        slow,
        slow_buffered,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slow_agent_of_fifty_stalls_only_its_own_stream() {
    let baseline = run(false).await;
    let incident = run(true).await;
    let p50 = |r: &Run| r.fast[r.fast.len() / 2];
    let max = |r: &Run| *r.fast.last().unwrap();
    println!(
        "fast agents, all {TASKS} tasks: baseline p50 {:?} max {:?}; with a slow agent p50 {:?} max {:?}",
        p50(&baseline),
        max(&baseline),
        p50(&incident),
        max(&incident)
    );
    let (code, got) = incident.slow.unwrap();
    println!(
        "slow agent: {got} tasks, then {code}; server buffered at most {} B",
        incident.slow_buffered
    );
    assert_eq!(code, Code::ResourceExhausted, "the slow stream is reset as stalled");
    assert!(got < u64::from(TASKS));
    // Delivery to the others is unaffected (the push interval dominates: 300 x 10 ms = 3 s).
    assert!(
        max(&incident) <= max(&baseline) * 5 / 4 + ms(500),
        "the fast agents slowed down: {:?} vs {:?}",
        max(&incident),
        max(&baseline)
    );
    // The stated bound: the stream's send buffer (the client's window) plus one message.
    assert!(
        incident.slow_buffered <= (WINDOW + TASK_BYTES + 64) as usize,
        "the server held {} B for the slow agent",
        incident.slow_buffered
    );
    assert!(
        incident.slow_buffered > 0,
        "the sampling saw nothing: the test measures nothing"
    );
}
