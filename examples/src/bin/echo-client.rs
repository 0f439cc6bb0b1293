//! The echo client, the other half of the liveness probe: a steady request rate (or an idle
//! connection) against an echo server, printing every connection event and request outcome.
//!
//! `echo-client --addr 10.0.0.1:7000 --rate 20 --duration 60s --heartbeat-interval 1s --json`

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use examples::cli::{event_json, init_tracing, parse_duration, unix_ms, HeartbeatFlags, RegistryFlags, TcpFlags};
use examples::echo::echo_client::EchoClient;
use examples::echo::EchoRequest;
use rpc_client::{Balance, Client, ClientConfig, Request};
use serde_json::json;

/// The service the probe calls, as registered in etcd.
const ECHO_SERVICE: &str = "echo.Echo";
use tokio::time::{Instant, MissedTickBehavior};

#[derive(Debug, Parser)]
#[command(about = "tether echo client (liveness probe, client half)")]
struct Args {
    /// Server address; repeat for several endpoints (the client balances over them and moves
    /// dead ones to its retry pool).
    #[arg(long = "addr", default_value = "127.0.0.1:7000")]
    addrs: Vec<SocketAddr>,
    /// Endpoint selection: round-robin, random or least-in-flight.
    #[arg(long, default_value = "round-robin", value_parser = parse_balance)]
    balance: Balance,
    /// Multiplexed connections per endpoint.
    #[arg(long)]
    connections_per_endpoint: Option<usize>,
    #[command(flatten)]
    heartbeat: HeartbeatFlags,
    /// Deadline of each request (default 3s).
    #[arg(long, value_parser = parse_duration)]
    request_timeout: Option<Duration>,
    /// Bound on each connection attempt (default 1s).
    #[arg(long, value_parser = parse_duration)]
    connect_timeout: Option<Duration>,
    #[command(flatten)]
    tcp: TcpFlags,
    /// Requests per second; 0 holds the connection open and idle.
    #[arg(long, default_value_t = 10)]
    rate: u32,
    /// How long to run.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    duration: Duration,
    /// Payload bytes per request.
    #[arg(long, default_value_t = 0)]
    payload: usize,
    /// Bytes the server answers each request with (large replies fill a client that stops reading).
    #[arg(long, default_value_t = 0)]
    reply_size: u32,
    /// Also hold a server stream (Feed.Watch) sending an event this often, printing each event
    /// and the stream's end; reopened after it breaks (default: no stream).
    #[arg(long, value_parser = parse_duration)]
    stream_interval: Option<Duration>,
    /// Payload bytes per stream event.
    #[arg(long, default_value_t = 64)]
    stream_size: u32,
    /// Stop consuming the stream after this many events (until the run ends), as a consumer
    /// that hangs while the rest of the process goes on.
    #[arg(long)]
    stream_stop_after: Option<u64>,
    /// Print one JSON object per line for each connection event and each finished request, and a summary.
    #[arg(long)]
    json: bool,
    /// Connect with TLS, trusting the CAs in this PEM file.
    #[arg(long)]
    tls_ca: Option<std::path::PathBuf>,
    /// Client certificate for mutual TLS (needs --tls-key and --tls-ca).
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Name to verify the server certificate against (default: the server's IP address).
    #[arg(long, requires = "tls_ca")]
    tls_server_name: Option<String>,
    /// Serve Prometheus metrics on http://HOST:PORT/metrics.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Serve the admin page (pools, connections, recent closes) on http://HOST:PORT/; it exposes
    /// internals: use a loopback address.
    #[arg(long)]
    admin_addr: Option<SocketAddr>,
    /// Find the servers of the echo service in etcd (instead of `--addr`).
    #[command(flatten)]
    registry: RegistryFlags,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    init_tracing();
    let args = Args::parse();
    if let Some(addr) = args.metrics_addr {
        examples::cli::serve_prometheus(addr)?;
    }
    let mut config = ClientConfig::default();
    args.heartbeat.apply(&mut config.heartbeat);
    if let Some(d) = args.request_timeout {
        config.request_timeout = d;
    }
    if let Some(d) = args.connect_timeout {
        config.connect_timeout = d;
    }
    args.tcp.apply(&mut config.tcp, &mut config.connection);
    if let Some(ca) = &args.tls_ca {
        let mut tls = rpc_core::tls::TlsClientConfig::new(ca);
        tls.cert_file = args.tls_cert.clone();
        tls.key_file = args.tls_key.clone();
        tls.server_name = args.tls_server_name.clone();
        config.tls = Some(tls);
    }
    let json = args.json;

    config.balance = args.balance;
    if let Some(n) = args.connections_per_endpoint {
        config.connections_per_endpoint = n;
    }
    let client = match args.registry.config() {
        Some(registry) => Client::with_registry(ECHO_SERVICE, registry, config).await?,
        None => Client::with_endpoints(args.addrs.iter().copied(), config)?,
    };
    let _admin = examples::cli::serve_admin(args.admin_addr, rpc_admin::Admin::new().client("echo", &client)).await?;
    if let Some(mut discovery) = client.discovery() {
        tokio::spawn(async move {
            loop {
                let d = discovery.borrow_and_update().clone();
                let endpoints: Vec<String> = d.endpoints.iter().map(ToString::to_string).collect();
                report(
                    json,
                    &json!({"t_ms": unix_ms() as u64, "side": "client", "event": "discovery", "endpoints": endpoints,
                            "instances": d.instances, "held_back": d.held_back, "watching": d.watching, "revision": d.revision}),
                );
                if discovery.changed().await.is_err() {
                    break;
                }
            }
        });
    }
    let mut events = client.events();
    let printer = tokio::spawn(async move {
        while let Ok(ev) = events.recv().await {
            if json {
                println!("{}", event_json("client", &ev));
            } else {
                println!("{ev:?}");
            }
        }
    });
    // Connect up front so an idle run (--rate 0) has a connection to hold.
    if let Err(e) = client.checkout(None).await {
        report(
            json,
            &json!({"t_ms": unix_ms() as u64, "side": "client", "event": "connect_failed", "error": e.to_string()}),
        );
    }

    let echo = EchoClient::new(client.clone());
    let end = Instant::now() + args.duration;
    let stream = args.stream_interval.map(|interval| {
        let feed = examples::feed::v1::feed_client::FeedClient::new(client.clone());
        let sub = examples::feed::v1::Subscribe {
            count: 0,
            size: args.stream_size,
            interval_ms: u32::try_from(interval.as_millis()).unwrap_or(u32::MAX),
        };
        tokio::spawn(subscriber(feed, sub, args.stream_stop_after, end, json))
    });
    let payload = Bytes::from(vec![0x5A; args.payload]);
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut sent = 0u64;
    let mut tasks = tokio::task::JoinSet::new();
    if args.rate == 0 {
        tokio::time::sleep_until(end).await;
    } else {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / args.rate);
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        while Instant::now() < end {
            tick.tick().await;
            sent += 1;
            let mut echo = echo.clone();
            let req = EchoRequest {
                message: sent.to_string(),
                payload: payload.clone(),
                reply_size: args.reply_size,
                ..Default::default()
            };
            let seq = sent;
            tasks.spawn(async move {
                let start = Instant::now();
                let result = echo.say(Request::for_method("", req)).await;
                (seq, start.elapsed(), result.map(|_| ()))
            });
            while let Some(done) = tasks.try_join_next() {
                record(json, done?, &mut outcomes);
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        record(json, done?, &mut outcomes);
    }
    if let Some(stream) = stream {
        stream.await?;
    }
    let ok = outcomes.get("ok").copied().unwrap_or(0);
    let resolved: u64 = outcomes.values().sum();
    report(
        json,
        &json!({"t_ms": unix_ms() as u64, "side": "client", "event": "summary", "sent": sent, "ok": ok,
                "failed": resolved - ok, "unresolved": sent - resolved, "by_outcome": outcomes}),
    );
    client.close();
    drop(client);
    drop(echo);
    let _ = tokio::time::timeout(Duration::from_secs(1), printer).await;
    Ok(())
}

/// Holds a Watch stream until `end`: prints each event, and each end of the stream (with what
/// this side had received, the error, and the connection's reason); reopens it after a break.
async fn subscriber(
    feed: examples::feed::v1::feed_client::FeedClient<Client>,
    sub: examples::feed::v1::Subscribe,
    stop_after: Option<u64>,
    end: Instant,
    json: bool,
) {
    let mut opened = 0u64;
    while Instant::now() < end {
        opened += 1;
        let mut events = match feed.watch(sub).await {
            Ok(s) => s,
            Err(e) => {
                report(
                    json,
                    &json!({"t_ms": unix_ms() as u64, "side": "client", "event": "stream_open_failed", "stream": opened,
                            "error": e.to_string(), "may_have_executed": e.may_have_executed()}),
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        report(
            json,
            &json!({"t_ms": unix_ms() as u64, "side": "client", "event": "stream_open", "stream": opened}),
        );
        let outcome = loop {
            if stop_after.is_some_and(|n| events.received() >= n) {
                // A consumer that hangs: it takes nothing more until the run ends.
                tokio::time::sleep_until(end).await;
                break None;
            }
            let next = tokio::select! {
                next = events.message() => next,
                () = tokio::time::sleep_until(end) => break None,
            };
            match next {
                Ok(Some(e)) => report(
                    json,
                    &json!({"t_ms": unix_ms() as u64, "side": "client", "event": "stream_message", "stream": opened, "seq": e.seq}),
                ),
                Ok(None) => break Some(Ok(())),
                Err(status) => break Some(Err(status)),
            }
        };
        let line = match &outcome {
            None => json!({"t_ms": unix_ms() as u64, "side": "client", "event": "stream_end", "stream": opened,
                           "outcome": "run_over", "received": events.received()}),
            Some(Ok(())) => json!({"t_ms": unix_ms() as u64, "side": "client", "event": "stream_end", "stream": opened,
                                   "outcome": "complete", "received": events.received()}),
            Some(Err(status)) => {
                json!({"t_ms": unix_ms() as u64, "side": "client", "event": "stream_end", "stream": opened,
                                        "outcome": "error", "received": events.received(), "code": status.code().to_string(),
                                        "error": status.message(), "may_have_executed": events.may_have_executed(),
                                        "close_reason": events.close_reason().map(|r| r.as_str())})
            }
        };
        report(json, &line);
        if outcome.is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn parse_balance(s: &str) -> Result<Balance, String> {
    match s {
        "round-robin" => Ok(Balance::RoundRobin),
        "random" => Ok(Balance::Random),
        "least-in-flight" => Ok(Balance::LeastInFlight),
        other => Err(format!(
            "unknown balance {other:?} (round-robin, random, least-in-flight)"
        )),
    }
}

fn record(
    json: bool,
    (seq, latency, result): (u64, Duration, Result<(), rpc_client::Error>),
    outcomes: &mut BTreeMap<String, u64>,
) {
    let line = match &result {
        Ok(()) => {
            json!({"t_ms": unix_ms() as u64, "side": "client", "event": "request", "seq": seq, "outcome": "ok",
                         "latency_ms": latency.as_secs_f64() * 1e3})
        }
        Err(e) => {
            json!({"t_ms": unix_ms() as u64, "side": "client", "event": "request", "seq": seq, "outcome": "error",
                         "error_kind": e.kind_str(), "code": e.code().to_string(), "may_have_executed": e.may_have_executed(),
                         "error": e.to_string(), "latency_ms": latency.as_secs_f64() * 1e3})
        }
    };
    let key = match &result {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("{}:{}", e.kind_str(), e.code()),
    };
    *outcomes.entry(key).or_default() += 1;
    report(json, &line);
}

fn report(json: bool, line: &serde_json::Value) {
    // Without --json, successful requests are counted in the summary only.
    let quiet = !json && line["event"] == "request" && line["outcome"] == "ok";
    if !quiet {
        println!("{line}");
    }
}
