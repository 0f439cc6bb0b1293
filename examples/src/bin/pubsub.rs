//! The pub/sub example across processes: `pubsub serve` runs one server of a topic published at
//! `--rate` messages a second, `pubsub subscribe` follows it across servers and faults, counting
//! what it receives.
//!
//! Several `serve` processes share one topic without talking to each other: position `p` is
//! published at `--epoch-ms + p * 1000 / rate` (wall-clock milliseconds, one machine's clock) with
//! a payload made from `p`, so every server holds the same messages at the same positions. A
//! server keeps the last `--capacity` of them (a restarted one only what it published since).
//!
//! ```text
//! pubsub serve --addr 127.0.0.1:7000 --epoch-ms 1700000000000 &
//! pubsub serve --addr 127.0.0.1:7001 --epoch-ms 1700000000000 &
//! pubsub subscribe --endpoints 127.0.0.1:7000,127.0.0.1:7001 --duration 30s
//! ```
//!
//! Both print one JSON object per line (`--json` is implied): the subscriber its first message,
//! each resume (`resumed`, with the gap and the messages replayed), each connection event, and a
//! `summary` with what it received, what was missing or duplicated, and the longest silence.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use examples::cli::{event_json, init_tracing, parse_duration, unix_ms, HeartbeatFlags};
use examples::services::TopicService;
use examples::topic::v1::topic_client::TopicClient;
use examples::topic::v1::topic_server::TopicServer;
use examples::topic::v1::{Subscription, Tick};
use rpc_client::{Client, ClientConfig};
use rpc_core::event::ConnectionEvent;
use rpc_server::{ReplayLog, Server, ServerConfig};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(about = "tether pub/sub example: a resumable topic across servers")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the topic.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7000")]
        addr: SocketAddr,
        /// The topic's epoch (Unix milliseconds): position 1 is published then. Every server of
        /// the topic must be given the same.
        #[arg(long)]
        epoch_ms: u64,
        /// Messages a second.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Messages kept for resumes.
        #[arg(long, default_value_t = 60_000)]
        capacity: usize,
        /// Grace period for a graceful shutdown (SIGTERM).
        #[arg(long, value_parser = parse_duration, default_value = "5s")]
        shutdown_grace: Duration,
        /// The server's heartbeats (sent while streams run).
        #[command(flatten)]
        heartbeat: HeartbeatFlags,
    },
    /// Subscribe and count.
    Subscribe {
        /// The topic's servers, comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        endpoints: Vec<SocketAddr>,
        /// How long to follow the topic.
        #[arg(long, value_parser = parse_duration, default_value = "10s")]
        duration: Duration,
        /// Give up a broken subscription after this long.
        #[arg(long, value_parser = parse_duration)]
        resume_timeout: Option<Duration>,
        /// Connect timeout.
        #[arg(long, value_parser = parse_duration)]
        connect_timeout: Option<Duration>,
        /// First reconnect backoff.
        #[arg(long, value_parser = parse_duration)]
        backoff: Option<Duration>,
        #[command(flatten)]
        heartbeat: HeartbeatFlags,
    },
}

fn line(v: serde_json::Value) {
    println!("{v}");
}

/// The tick at `position`: its payload is made from its position, so every server has the same.
fn tick(position: u64) -> Tick {
    Tick {
        position,
        payload: Bytes::from(position.to_be_bytes().to_vec()),
    }
}

/// The last position due by now.
fn due(epoch_ms: u64, rate: u64) -> u64 {
    let now = unix_ms() as u64;
    now.saturating_sub(epoch_ms) * rate / 1000
}

async fn serve(
    addr: SocketAddr,
    epoch_ms: u64,
    rate: u64,
    capacity: usize,
    grace: Duration,
    heartbeat: HeartbeatFlags,
) -> Result<(), Box<dyn std::error::Error>> {
    let log = ReplayLog::starting_at(due(epoch_ms, rate).max(1), capacity);
    let publisher = log.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            every.tick().await;
            let to = due(epoch_ms, rate);
            let from = publisher.head() + 1;
            for p in from..=to {
                publisher.publish_at(p, tick(p));
            }
        }
    });
    let mut config = ServerConfig {
        shutdown_grace: grace,
        ..ServerConfig::default()
    };
    heartbeat.apply(&mut config.heartbeat);
    let server = Server::builder()
        .config(config)
        .add_service(TopicServer::new(TopicService::new(log.clone())))
        .bind(addr)
        .await?;
    let mut events = server.events();
    line(
        json!({"t_ms": unix_ms() as u64, "side": "server", "event": "listening", "addr": server.local_addr().to_string(), "first": log.head() + 1}),
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(ev) => line(event_json("server", &ev)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => break,
            },
            _ = term.recv() => {
                line(json!({"t_ms": unix_ms() as u64, "side": "server", "event": "shutting_down"}));
                server.shutdown().await;
                break;
            }
        }
    }
    Ok(())
}

#[derive(Debug, Default)]
struct Ledger {
    first: Option<u64>,
    last: Option<u64>,
    received: u64,
    /// Positions skipped (a message after a hole).
    missing: u64,
    /// Messages at or below one already received.
    duplicates: u64,
    longest_silence: Duration,
    /// When the longest silence ended (Unix ms).
    silence_ended_ms: u64,
}

impl Ledger {
    fn take(&mut self, position: u64, silence: Duration) {
        match self.last {
            Some(l) if position <= l => {
                self.duplicates += 1;
                return;
            }
            Some(l) => self.missing += position - l - 1,
            None => self.first = Some(position),
        }
        self.last = Some(position);
        self.received += 1;
        if silence > self.longest_silence {
            self.longest_silence = silence;
            self.silence_ended_ms = unix_ms() as u64;
        }
    }
}

async fn subscribe(
    endpoints: Vec<SocketAddr>,
    duration: Duration,
    config: ClientConfig,
) -> Result<(), Box<dyn std::error::Error>> {
    let client = Client::with_endpoints(endpoints, config)?;
    let mut events = client.events();
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(ConnectionEvent::StreamResumed {
                    after,
                    attempts,
                    gap,
                    replayed,
                    ..
                }) => line(
                    json!({"t_ms": unix_ms() as u64, "side": "client", "event": "resumed", "after": after, "attempts": attempts, "gap_ms": gap.as_millis() as u64, "replayed": replayed}),
                ),
                Ok(ConnectionEvent::ResumeFailed {
                    after,
                    attempts,
                    waited,
                    ..
                }) => line(
                    json!({"t_ms": unix_ms() as u64, "side": "client", "event": "resume_failed", "after": after, "attempts": attempts, "waited_ms": waited.as_millis() as u64}),
                ),
                Ok(ev) => line(event_json("client", &ev)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
    });
    let until = tokio::time::Instant::now() + duration;
    let mut ledger = Ledger::default();
    let mut outcome = "ok".to_string();
    let mut stream = match TopicClient::new(client.clone())
        .subscribe(Subscription { topic: "ticks".into() })
        .await
    {
        Ok(s) => s,
        Err(e) => {
            line(
                json!({"t_ms": unix_ms() as u64, "side": "client", "event": "subscribe_failed", "error": e.to_string()}),
            );
            return Ok(());
        }
    };
    let mut last_at = tokio::time::Instant::now();
    loop {
        let next = tokio::time::timeout_at(until, stream.message()).await;
        let now = tokio::time::Instant::now();
        match next {
            Err(_) => break,
            Ok(Ok(Some(t))) => {
                if t.payload != tick(t.position).payload {
                    outcome = format!("wrong payload at {}", t.position);
                    break;
                }
                if ledger.first.is_none() {
                    let endpoint = stream.endpoint().map(|e| e.to_string());
                    line(
                        json!({"t_ms": unix_ms() as u64, "side": "client", "event": "subscribed", "position": t.position, "endpoint": endpoint}),
                    );
                }
                ledger.take(t.position, now - last_at);
                last_at = now;
            }
            Ok(Ok(None)) => {
                outcome = "ended by the server".into();
                break;
            }
            Ok(Err(status)) => {
                outcome = status.to_string();
                break;
            }
        }
    }
    line(json!({
        "t_ms": unix_ms() as u64, "side": "client", "event": "summary", "outcome": outcome,
        "first": ledger.first, "last": ledger.last, "received": ledger.received,
        "missing": ledger.missing, "duplicates": ledger.duplicates,
        "longest_silence_ms": ledger.longest_silence.as_millis() as u64,
        "silence_ended_ms": ledger.silence_ended_ms,
    }));
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    init_tracing();
    match Args::parse().command {
        Command::Serve {
            addr,
            epoch_ms,
            rate,
            capacity,
            shutdown_grace,
            heartbeat,
        } => serve(addr, epoch_ms, rate, capacity, shutdown_grace, heartbeat).await,
        Command::Subscribe {
            endpoints,
            duration,
            resume_timeout,
            connect_timeout,
            backoff,
            heartbeat,
        } => {
            let mut config = ClientConfig::default();
            heartbeat.apply(&mut config.heartbeat);
            if let Some(t) = resume_timeout {
                config.resume_timeout = t;
            }
            if let Some(t) = connect_timeout {
                config.connect_timeout = t;
            }
            if let Some(b) = backoff {
                config.backoff.initial = b;
            }
            subscribe(endpoints, duration, config).await
        }
    }
}
