//! Soak: steady load from several clients to three servers while a fault is injected every few
//! seconds through the fault proxy (blackhole, reset, server restart, slow consumer). At the end
//! every request resolved exactly once (a response or a typed error, by its deadline plus slack),
//! and resident memory and open descriptors are back within a stated margin of where they started.
//!
//! Not part of the default test command:
//! `SOAK_SECONDS=180 cargo test --release -p tests --test soak -- --ignored --nocapture`

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use examples::echo::echo_client::EchoClient;
use examples::echo::EchoRequest;
use examples::services::EchoService;
use rpc_client::{BackoffConfig, Client, ClientConfig};
use rpc_core::config::{ConnectionConfig, HeartbeatConfig};
use rpc_server::{ServerConfig, ServerHandle};
use tests::proxy::{Direction, Fault, FaultProxy};
use tokio::time::Instant;

/// Allowed growth between the start (after warm-up) and the end (after the faults stop).
const RSS_MARGIN_KIB: u64 = 32 * 1024;
const FD_MARGIN: usize = 16;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
const SLACK: Duration = Duration::from_millis(500);

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn server_config() -> ServerConfig {
    ServerConfig {
        idle_timeout: Some(Duration::from_secs(2)),
        shutdown_grace: Duration::from_secs(2),
        connection: ConnectionConfig {
            write_stall_timeout: Duration::from_millis(500),
            ..ConnectionConfig::default()
        },
        ..ServerConfig::default()
    }
}

/// An echo server on `addr` (port 0 the first time, the same port after a restart).
async fn start_server(addr: SocketAddr) -> ServerHandle {
    rpc_server::Server::builder()
        .config(server_config())
        .add_service(examples::echo::echo_server::EchoServer::new(EchoService::default()))
        .bind(addr)
        .await
        .unwrap()
}

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    ok: AtomicU64,
    late: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: minutes long; run with --ignored"]
async fn soak_under_rotating_faults() {
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(180);
    let mut servers = Vec::new();
    let mut proxies = Vec::new();
    for _ in 0..3 {
        let s = start_server("127.0.0.1:0".parse().unwrap()).await;
        proxies.push(FaultProxy::start(s.local_addr()).await);
        servers.push(Some(s));
    }
    let config = ClientConfig {
        request_timeout: REQUEST_TIMEOUT,
        connect_timeout: Duration::from_millis(300),
        check_interval: Duration::from_millis(200),
        heartbeat: HeartbeatConfig {
            enabled: true,
            interval: Duration::from_millis(200),
            timeout: Duration::from_millis(100),
            max_failures: 3,
            ..Default::default()
        },
        backoff: BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            ..BackoffConfig::default()
        },
        ..ClientConfig::default()
    };
    let clients: Vec<Client> = (0..4)
        .map(|_| Client::with_endpoints(proxies.iter().map(FaultProxy::addr), config.clone()).unwrap())
        .collect();

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for client in &clients {
        for _ in 0..4 {
            let (mut echo, tally, stop) = (EchoClient::new(client.clone()), tally.clone(), stop.clone());
            load.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    tally.sent.fetch_add(1, Ordering::Relaxed);
                    let start = Instant::now();
                    let req = EchoRequest {
                        payload: Bytes::from(vec![7u8; 1024]),
                        reply_size: 16 * 1024,
                        ..Default::default()
                    };
                    let result = echo.say(req).await;
                    if start.elapsed() > REQUEST_TIMEOUT + SLACK {
                        tally.late.fetch_add(1, Ordering::Relaxed);
                    }
                    match result {
                        Ok(_) => {
                            tally.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            let key = format!(
                                "{} {} (may have executed: {})",
                                e.kind_str(),
                                e.code(),
                                e.may_have_executed()
                            );
                            *tally.errors.lock().unwrap().entry(key).or_default() += 1;
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                }
            }));
        }
    }

    tokio::time::sleep(Duration::from_secs(3)).await; // warm-up: pools, buffers, allocator
    let (rss_start, fds_start) = (rss_kib(), open_fds());
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut round = 0usize;
    let mut injected: BTreeMap<&str, u32> = BTreeMap::new();
    while Instant::now() < end {
        let i = round % 3;
        let fault = ["blackhole", "reset", "restart", "slow consumer"][round % 4];
        match fault {
            "blackhole" => {
                proxies[i].set(Fault::Blackhole);
                tokio::time::sleep(Duration::from_millis(1500)).await;
                proxies[i].set(Fault::Pass);
            }
            "reset" => proxies[i].reset_all(),
            "restart" => {
                let old = servers[i].take().unwrap();
                let addr = old.local_addr();
                old.abort().await; // killed: no GOAWAY
                tokio::time::sleep(Duration::from_millis(500)).await;
                servers[i] = Some(start_server(addr).await);
            }
            _ => {
                proxies[i].set(Fault::StopReading(Direction::ToClient));
                tokio::time::sleep(Duration::from_millis(1500)).await;
                proxies[i].set(Fault::Pass);
            }
        }
        *injected.entry(fault).or_default() += 1;
        round += 1;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await; // let closes, lingers and reconnects settle
    let (rss_end, fds_end) = (rss_kib(), open_fds());
    let server_conns: usize = servers.iter().flatten().map(|s| s.connections().len()).sum();
    let client_conns: usize = clients.iter().map(|c| c.connections().len()).sum();
    println!("connections at the end: {client_conns} in the clients' pools, {server_conns} on the servers");

    let sent = tally.sent.load(Ordering::Relaxed);
    let ok = tally.ok.load(Ordering::Relaxed);
    let errors = tally.errors.lock().unwrap().clone();
    let failed: u64 = errors.values().sum();
    println!("soak: {seconds} s, faults injected {injected:?}");
    println!(
        "requests sent {sent}, succeeded {ok}, failed by typed error {failed}, unresolved {}",
        sent - ok - failed
    );
    for (kind, n) in &errors {
        println!("  {n:>7}  {kind}");
    }
    println!("resident memory {rss_start} KiB -> {rss_end} KiB; open descriptors {fds_start} -> {fds_end}");
    assert_eq!(sent, ok + failed, "every request resolved exactly once");
    assert_eq!(
        tally.late.load(Ordering::Relaxed),
        0,
        "requests resolved after their deadline plus slack"
    );
    assert!(
        ok > sent / 2,
        "most requests succeed under rotating faults on one of three endpoints"
    );
    assert!(
        rss_end <= rss_start + RSS_MARGIN_KIB,
        "memory grew {rss_start} -> {rss_end} KiB"
    );
    assert!(
        fds_end <= fds_start + FD_MARGIN,
        "descriptors grew {fds_start} -> {fds_end}"
    );
}
