//! The echo server, usable as one half of a liveness probe across a real network.
//!
//! `echo-server --addr 0.0.0.0:7000 --idle-timeout 5s --json` prints one JSON line per connection
//! event. SIGTERM or Ctrl-C shuts it down gracefully (GOAWAY, drain, exit 0).

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use examples::cli::{
    duration_or_off, event_json, init_tracing, parse_duration, unix_ms, HeartbeatFlags, OrOff, RegistryFlags, TcpFlags,
};
use examples::echo::echo_server::EchoServer;
use examples::feed::v1::feed_server::{Feed, FeedServer};
use examples::feed::v1::{Event, Subscribe, Summary};
use examples::greeter::v1::greeter_server::GreeterServer;
use examples::services::FeedService;
use examples::services::{EchoService, GreeterService};
use futures_util::StreamExt;
use rpc_server::codegen::BoxStream;
use rpc_server::{Request, Response, Server, ServerConfig, Status, Streaming};

#[derive(Debug, Parser)]
#[command(about = "tether echo server (liveness probe, server half)")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7000")]
    addr: SocketAddr,
    /// Close connections that send nothing for this long (default 90s; `off`: never).
    #[arg(long, value_parser = duration_or_off)]
    idle_timeout: Option<OrOff<Duration>>,
    /// Every handler sleeps this long before answering.
    #[arg(long, value_parser = parse_duration, default_value = "0ms")]
    handler_delay: Duration,
    /// Requests run at once before answering SERVER_BUSY (default 1024).
    #[arg(long)]
    max_concurrent_requests: Option<usize>,
    /// Grace period for requests in flight on shutdown (default 30s).
    #[arg(long, value_parser = parse_duration)]
    shutdown_grace: Option<Duration>,
    #[command(flatten)]
    tcp: TcpFlags,
    /// The server's heartbeats, sent only while a connection has handlers or streams running.
    #[command(flatten)]
    heartbeat: HeartbeatFlags,
    /// Print one JSON object per line for each connection event (and each Feed stream's end).
    #[arg(long)]
    json: bool,
    /// Serve TLS with this PEM certificate chain (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Require client certificates signed by the CAs in this PEM file (mutual TLS).
    #[arg(long, requires = "tls_cert")]
    tls_ca: Option<std::path::PathBuf>,
    /// Serve Prometheus metrics on http://HOST:PORT/metrics.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Serve the admin page (connections, recent closes, per-method counts and latency) on
    /// http://HOST:PORT/; it exposes internals: use a loopback address.
    #[arg(long)]
    admin_addr: Option<SocketAddr>,
    /// Register the echo, greeter and feed services in etcd.
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
    let mut config = ServerConfig::default();
    if let Some(OrOff(t)) = args.idle_timeout {
        config.idle_timeout = t;
    }
    if let Some(n) = args.max_concurrent_requests {
        config.max_concurrent_requests = n;
    }
    if let Some(g) = args.shutdown_grace {
        config.shutdown_grace = g;
    }
    args.tcp.apply(&mut config.tcp, &mut config.connection);
    args.heartbeat.apply(&mut config.heartbeat);
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let mut tls = rpc_core::tls::TlsServerConfig::new(cert, key);
        tls.client_ca_file = args.tls_ca.clone();
        config.tls = Some(tls);
    }
    let mut builder = Server::builder()
        .config(config)
        .add_service(EchoServer::new(EchoService {
            handler_delay: args.handler_delay,
        }))
        .add_service(GreeterServer::new(GreeterService))
        .add_service(FeedServer::new(ProbeFeed { json: args.json }));
    if let Some(registry) = args.registry.config() {
        builder = builder.registry(registry);
    }
    let server = builder.bind(args.addr).await?;
    let _admin = examples::cli::serve_admin(args.admin_addr, rpc_admin::Admin::new().server("echo", &server)).await?;
    if let Some(mut registration) = server.registration() {
        let json = args.json;
        tokio::spawn(async move {
            loop {
                let line = match &*registration.borrow_and_update() {
                    rpc_server::registry::RegistrationState::Registered { lease, registrations } => {
                        serde_json::json!({"t_ms": unix_ms() as u64, "side": "server", "event": "registered", "lease": lease, "registrations": registrations})
                    }
                    rpc_server::registry::RegistrationState::Unregistered { last_error } => {
                        serde_json::json!({"t_ms": unix_ms() as u64, "side": "server", "event": "unregistered", "error": last_error})
                    }
                    rpc_server::registry::RegistrationState::Deregistered { removed } => {
                        serde_json::json!({"t_ms": unix_ms() as u64, "side": "server", "event": "deregistered", "removed": removed})
                    }
                };
                if json {
                    println!("{line}");
                } else {
                    println!("registry: {line}");
                }
                if registration.changed().await.is_err() {
                    break;
                }
            }
        });
    }
    let mut events = server.events();
    if args.json {
        println!(
            "{}",
            serde_json::json!({"t_ms": examples::cli::unix_ms() as u64, "side": "server", "event": "listening", "addr": server.local_addr().to_string()})
        );
    } else {
        println!("listening on {}", server.local_addr());
    }
    let json = args.json;
    let printer = tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(ev) if json => println!("{}", event_json("server", &ev)),
                Ok(ev) => println!("{ev:?}"),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    eprintln!("missed {n} events")
                }
                Err(_) => break,
            }
        }
    });
    shutdown_signal().await;
    if !json {
        println!("shutting down gracefully");
    }
    server.shutdown().await;
    let _ = printer.await;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The Feed service, printing when each `Watch` stream ends on the server: the moment its
/// producer learns the subscriber is gone (or the stream finished), with how many events it had
/// produced and whether the request was cancelled (CANCEL, or its connection closed).
#[derive(Debug, Clone)]
struct ProbeFeed {
    json: bool,
}

struct StreamEnd {
    json: bool,
    produced: u64,
    cancellation: Option<rpc_core::context::Cancellation>,
}

impl Drop for StreamEnd {
    fn drop(&mut self) {
        let cancelled = self.cancellation.as_ref().is_some_and(|c| c.is_cancelled());
        let line = serde_json::json!({"t_ms": unix_ms() as u64, "side": "server", "event": "stream_end",
                                      "produced": self.produced, "cancelled": cancelled});
        if self.json {
            println!("{line}");
        } else {
            println!("stream ended: {line}");
        }
    }
}

impl Feed for ProbeFeed {
    async fn watch(&self, request: Request<Subscribe>) -> Result<Response<BoxStream<Event>>, Status> {
        let mut end = StreamEnd {
            json: self.json,
            produced: 0,
            cancellation: request.cancellation().cloned(),
        };
        let events = FeedService.watch(request).await?.into_body();
        let counted = events.map(move |e| {
            // The whole guard goes into the closure (not just its field), so it drops with the stream.
            let end = &mut end;
            end.produced += 1;
            e
        });
        Ok(Response::new(Box::pin(counted)))
    }

    async fn upload(&self, request: Request<Streaming<Event>>) -> Result<Response<Summary>, Status> {
        FeedService.upload(request).await
    }

    async fn echo(&self, request: Request<Streaming<Event>>) -> Result<Response<BoxStream<Event>>, Status> {
        FeedService.echo(request).await
    }
}
