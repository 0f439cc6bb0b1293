//! The three systems behind one interface: serve, connect, call.

use std::net::SocketAddr;

use bytes::Bytes;
use tokio::net::TcpListener;

use crate::raw::{self, RawClient};

/// The tonic side's generated code (`echo.proto`, same service).
pub(crate) mod pb {
    #![allow(missing_docs, unreachable_pub, clippy::all)]
    tonic::include_proto!("echo");
}

/// The tonic side's streaming service (`feed.proto`, the same `Feed` tether serves).
pub(crate) mod feed {
    #![allow(missing_docs, unreachable_pub, clippy::all)]
    tonic::include_proto!("feed.v1");
}

type TonicStream<T> = std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<T, tonic::Status>> + Send>>;

struct TonicFeed;

#[tonic::async_trait]
impl feed::feed_server::Feed for TonicFeed {
    type WatchStream = TonicStream<feed::Event>;
    type EchoStream = TonicStream<feed::Event>;

    async fn watch(
        &self,
        req: tonic::Request<feed::Subscribe>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        let sub = req.into_inner();
        let payload = Bytes::from(vec![0x5A; sub.size as usize]);
        let count = u64::from(sub.count);
        let events = futures_util::stream::iter((1..=count).map(move |seq| {
            Ok(feed::Event {
                seq,
                payload: payload.clone(),
            })
        }));
        Ok(tonic::Response::new(Box::pin(events)))
    }

    async fn upload(
        &self,
        req: tonic::Request<tonic::Streaming<feed::Event>>,
    ) -> Result<tonic::Response<feed::Summary>, tonic::Status> {
        let mut events = req.into_inner();
        let mut summary = feed::Summary::default();
        while let Some(e) = events.message().await? {
            summary.count += 1;
            summary.last_seq = e.seq;
        }
        Ok(tonic::Response::new(summary))
    }

    async fn echo(
        &self,
        req: tonic::Request<tonic::Streaming<feed::Event>>,
    ) -> Result<tonic::Response<Self::EchoStream>, tonic::Status> {
        Ok(tonic::Response::new(Box::pin(req.into_inner())))
    }
}

/// A system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum System {
    /// tether: rpc-server and rpc-client with generated code.
    Tether,
    /// tonic 0.14 with prost (gRPC over HTTP/2).
    Tonic,
    /// The floor: tokio, LengthDelimitedCodec and prost, no framework.
    Raw,
}

impl System {
    pub(crate) const ALL: [System; 3] = [System::Tether, System::Tonic, System::Raw];

    pub(crate) fn name(self) -> &'static str {
        match self {
            System::Tether => "tether",
            System::Tonic => "tonic",
            System::Raw => "raw",
        }
    }
}

struct TonicEcho;

#[tonic::async_trait]
impl pb::echo_server::Echo for TonicEcho {
    async fn say(&self, req: tonic::Request<pb::EchoRequest>) -> Result<tonic::Response<pb::EchoReply>, tonic::Status> {
        let r = req.into_inner();
        Ok(tonic::Response::new(pb::EchoReply {
            message: r.message,
            payload: r.payload,
            remaining_deadline_ms: 0,
        }))
    }

    async fn fail(
        &self,
        req: tonic::Request<pb::EchoRequest>,
    ) -> Result<tonic::Response<pb::EchoReply>, tonic::Status> {
        Err(tonic::Status::unknown(req.into_inner().message))
    }
}

/// Serves `system` on 127.0.0.1 and prints `LISTENING <addr>`.
/// The Feed service as the tonic one above is written (a plain iterator of events), so both
/// systems run the same handler code.
struct TetherFeed;

impl examples::feed::v1::feed_server::Feed for TetherFeed {
    async fn watch(
        &self,
        req: rpc_core::Request<examples::feed::v1::Subscribe>,
    ) -> Result<rpc_core::Response<rpc_server::codegen::BoxStream<examples::feed::v1::Event>>, rpc_core::Status> {
        let sub = req.into_body();
        let payload = Bytes::from(vec![0x5A; sub.size as usize]);
        let count = u64::from(sub.count);
        let events = futures_util::stream::iter((1..=count).map(move |seq| {
            Ok(examples::feed::v1::Event {
                seq,
                payload: payload.clone(),
            })
        }));
        Ok(rpc_core::Response::new(Box::pin(events)))
    }

    async fn upload(
        &self,
        req: rpc_core::Request<rpc_server::Streaming<examples::feed::v1::Event>>,
    ) -> Result<rpc_core::Response<examples::feed::v1::Summary>, rpc_core::Status> {
        examples::services::FeedService.upload(req).await
    }

    async fn echo(
        &self,
        req: rpc_core::Request<rpc_server::Streaming<examples::feed::v1::Event>>,
    ) -> Result<rpc_core::Response<rpc_server::codegen::BoxStream<examples::feed::v1::Event>>, rpc_core::Status> {
        examples::services::FeedService.echo(req).await
    }
}

pub(crate) async fn serve(system: System) -> Result<(), Box<dyn std::error::Error>> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("LISTENING {}", listener.local_addr()?);
    match system {
        System::Tether => {
            let server = rpc_server::Server::builder()
                .add_service(examples::echo::echo_server::EchoServer::new(
                    examples::services::EchoService::default(),
                ))
                .add_service(examples::feed::v1::feed_server::FeedServer::new(TetherFeed))
                .serve(listener)?;
            std::future::pending::<()>().await;
            drop(server);
        }
        System::Tonic => {
            // As tonic's users serve it: TCP_NODELAY on every accepted socket (`tcp_nodelay`
            // applies only to listeners tonic binds itself, so it is set here on each stream).
            let incoming = tokio_stream::StreamExt::map(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                |s: std::io::Result<tokio::net::TcpStream>| {
                    let s = s?;
                    s.set_nodelay(true)?;
                    Ok::<_, std::io::Error>(s)
                },
            );
            tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .add_service(pb::echo_server::EchoServer::new(TonicEcho))
                .add_service(feed::feed_server::FeedServer::new(TonicFeed))
                .serve_with_incoming(incoming)
                .await?;
        }
        System::Raw => raw::serve(listener).await?,
    }
    Ok(())
}

/// A tonic channel to `addr`, as tonic's users dial: TCP_NODELAY on.
async fn tonic_channel(addr: SocketAddr) -> Result<tonic::transport::Channel, Box<dyn std::error::Error>> {
    Ok(tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?)
}

/// Connections to a server under test.
pub(crate) enum Target {
    Tether(rpc_client::Client),
    Tonic(Vec<tonic::transport::Channel>),
    Raw(Vec<RawClient>),
}

impl Target {
    /// Opens `connections` connections to `addr`.
    pub(crate) async fn connect(
        system: System,
        addr: SocketAddr,
        connections: usize,
    ) -> Result<Target, Box<dyn std::error::Error>> {
        Ok(match system {
            System::Tether => {
                let config = rpc_client::ClientConfig {
                    connections_per_endpoint: connections,
                    ..Default::default()
                };
                let client = rpc_client::Client::with_endpoints([addr], config)?;
                client.checkout(None).await?;
                while client.connections().len() < connections {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                Target::Tether(client)
            }
            System::Tonic => {
                let mut channels = Vec::new();
                for _ in 0..connections {
                    channels.push(tonic_channel(addr).await?);
                }
                Target::Tonic(channels)
            }
            System::Raw => {
                let mut conns = Vec::new();
                for _ in 0..connections {
                    conns.push(RawClient::connect(addr).await?);
                }
                Target::Raw(conns)
            }
        })
    }

    /// The caller for load task `i` (spread over the connections).
    pub(crate) fn caller(&self, i: usize) -> Caller {
        match self {
            Target::Tether(c) => Caller::Tether(examples::echo::echo_client::EchoClient::new(c.clone())),
            Target::Tonic(chs) => Caller::Tonic(pb::echo_client::EchoClient::new(chs[i % chs.len()].clone())),
            Target::Raw(conns) => Caller::Raw(conns[i % conns.len()].clone()),
        }
    }
}

/// One load task's handle on a system.
pub(crate) enum Caller {
    Tether(examples::echo::echo_client::EchoClient<rpc_client::Client>),
    Tonic(pb::echo_client::EchoClient<tonic::transport::Channel>),
    Raw(RawClient),
}

impl Caller {
    /// One echo call; true on success with the payload echoed.
    pub(crate) async fn call(&mut self, payload: Bytes) -> bool {
        let len = payload.len();
        match self {
            Caller::Tether(c) => {
                let req = examples::echo::EchoRequest {
                    message: "bench".into(),
                    payload,
                    ..Default::default()
                };
                c.say(req).await.is_ok_and(|r| r.body().payload.len() == len)
            }
            Caller::Tonic(c) => {
                let req = pb::EchoRequest {
                    message: "bench".into(),
                    payload,
                    ..Default::default()
                };
                c.say(req).await.is_ok_and(|r| r.get_ref().payload.len() == len)
            }
            Caller::Raw(c) => {
                let req = pb::EchoRequest {
                    message: "bench".into(),
                    payload,
                    ..Default::default()
                };
                c.call(&req).await.is_some_and(|r| r.payload.len() == len)
            }
        }
    }
}

/// Connections held open and idle for the idle-cost measurement.
pub(crate) enum Idle {
    Tether(Vec<rpc_core::driver::ConnectionHandle>),
    Tonic(Vec<tonic::transport::Channel>),
}

impl Idle {
    /// Connections held.
    pub(crate) fn len(&self) -> usize {
        match self {
            Idle::Tether(v) => v.iter().filter(|c| c.is_open()).count(),
            Idle::Tonic(v) => v.len(),
        }
    }
}

/// Opens `n` connections (100 at a time) that then sit idle, heartbeating every second.
pub(crate) async fn open_idle(system: System, addr: SocketAddr, n: usize) -> Result<Idle, Box<dyn std::error::Error>> {
    use std::time::Duration;
    let batch = 100;
    match system {
        System::Tether => {
            let config = rpc_client::ClientConfig {
                heartbeat: rpc_core::config::HeartbeatConfig {
                    enabled: true,
                    interval: Duration::from_secs(1),
                    timeout: Duration::from_millis(500),
                    max_failures: 3,
                    ..Default::default()
                },
                connect_timeout: Duration::from_secs(10),
                ..Default::default()
            };
            let mut held = Vec::with_capacity(n);
            while held.len() < n {
                let mut set = tokio::task::JoinSet::new();
                for _ in 0..batch.min(n - held.len()) {
                    let config = config.clone();
                    set.spawn(async move { rpc_client::connect(addr, &config, None, None, None).await });
                }
                while let Some(r) = set.join_next().await {
                    held.push(r??);
                }
            }
            Ok(Idle::Tether(held))
        }
        System::Tonic => {
            let mut held = Vec::with_capacity(n);
            while held.len() < n {
                let mut set = tokio::task::JoinSet::new();
                for _ in 0..batch.min(n - held.len()) {
                    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                        .http2_keep_alive_interval(Duration::from_secs(1))
                        .keep_alive_timeout(Duration::from_millis(500))
                        .keep_alive_while_idle(true)
                        .connect_timeout(Duration::from_secs(10));
                    set.spawn(async move { endpoint.connect().await });
                }
                while let Some(r) = set.join_next().await {
                    held.push(r??);
                }
            }
            Ok(Idle::Tonic(held))
        }
        System::Raw => Err("the raw floor has no heartbeats".into()),
    }
}

/// Opens one server stream of `count` events of `size` bytes on a fresh connection and reads it
/// to its end; returns how many arrived.
pub(crate) async fn stream_once(
    system: System,
    addr: SocketAddr,
    count: u32,
    size: u32,
) -> Result<u64, Box<dyn std::error::Error>> {
    let mut n = 0u64;
    match system {
        System::Tether => {
            let client = rpc_client::Client::connect(addr, rpc_client::ClientConfig::default()).await?;
            let feed = examples::feed::v1::feed_client::FeedClient::new(client);
            let mut events = feed
                .watch(examples::feed::v1::Subscribe {
                    count,
                    size,
                    interval_ms: 0,
                })
                .await?;
            while let Some(e) = events.message().await? {
                std::hint::black_box(&e);
                n += 1;
            }
        }
        System::Tonic => {
            let mut client = feed::feed_client::FeedClient::new(tonic_channel(addr).await?);
            let mut events = client
                .watch(feed::Subscribe {
                    count,
                    size,
                    interval_ms: 0,
                })
                .await?
                .into_inner();
            while let Some(e) = events.message().await? {
                std::hint::black_box(&e);
                n += 1;
            }
        }
        System::Raw => n = raw::stream(addr, count, size).await?,
    }
    if n != u64::from(count) {
        return Err(format!("{system:?}: {n} of {count} events").into());
    }
    Ok(n)
}

/// `n` round trips of a 64 B message on one bidirectional stream (the raw floor: its unary echo,
/// one caller); the latency of each.
pub(crate) async fn ping_pong(
    system: System,
    addr: SocketAddr,
    n: usize,
) -> Result<hdrhistogram::Histogram<u64>, Box<dyn std::error::Error>> {
    let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
    let payload = Bytes::from(vec![7u8; 64]);
    match system {
        System::Tether => {
            let client = rpc_client::Client::connect(addr, rpc_client::ClientConfig::default()).await?;
            let feed = examples::feed::v1::feed_client::FeedClient::new(client);
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let mut replies = feed.echo(tokio_stream::wrappers::ReceiverStream::new(rx)).await?;
            for seq in 0..n as u64 {
                let start = tokio::time::Instant::now();
                tx.send(examples::feed::v1::Event {
                    seq,
                    payload: payload.clone(),
                })
                .await?;
                replies.message().await?.ok_or("stream ended")?;
                hist.record(start.elapsed().as_micros() as u64)?;
            }
        }
        System::Tonic => {
            let mut client = feed::feed_client::FeedClient::new(tonic_channel(addr).await?);
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let mut replies = client
                .echo(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            for seq in 0..n as u64 {
                let start = tokio::time::Instant::now();
                tx.send(feed::Event {
                    seq,
                    payload: payload.clone(),
                })
                .await?;
                replies.message().await?.ok_or("stream ended")?;
                hist.record(start.elapsed().as_micros() as u64)?;
            }
        }
        System::Raw => {
            let client = RawClient::connect(addr).await?;
            let req = pb::EchoRequest {
                payload: payload.clone(),
                ..Default::default()
            };
            for _ in 0..n {
                let start = tokio::time::Instant::now();
                client.call(&req).await.ok_or("raw call failed")?;
                hist.record(start.elapsed().as_micros() as u64)?;
            }
        }
    }
    Ok(hist)
}

/// A server stream whose consumer took one event and stopped reading, held open.
#[allow(dead_code)] // held, never read: that is the point
pub(crate) enum Stopped {
    Tether(rpc_client::Streaming<examples::feed::v1::Event>),
    Tonic(tonic::Streaming<feed::Event>),
}

impl Stopped {
    /// Whether the stream is still open, stalled rather than reset (tether can tell; tonic: unknown).
    pub(crate) fn still_open(&self, target: &Target) -> &'static str {
        match (self, target) {
            (Stopped::Tether(_), Target::Tether(c)) => {
                if c.connections().iter().any(|c| c.open_streams() == 1) {
                    "yes"
                } else {
                    "no (reset)"
                }
            }
            _ => "not observable",
        }
    }
}

/// Opens a server stream of 16 KiB events on the target's connection, takes one event, stops
/// reading, and waits until the sender has spent the window.
pub(crate) async fn stop_a_stream(target: &Target) -> Result<Stopped, Box<dyn std::error::Error>> {
    let stopped = match target {
        Target::Tether(client) => {
            let feed = examples::feed::v1::feed_client::FeedClient::new(client.clone());
            let mut events = feed
                .watch(examples::feed::v1::Subscribe {
                    count: u32::MAX,
                    size: 16 * 1024,
                    interval_ms: 0,
                })
                .await?;
            events.message().await?.ok_or("stream ended")?;
            Stopped::Tether(events)
        }
        Target::Tonic(channels) => {
            let mut client = feed::feed_client::FeedClient::new(channels[0].clone());
            let mut events = client
                .watch(feed::Subscribe {
                    count: u32::MAX,
                    size: 16 * 1024,
                    interval_ms: 0,
                })
                .await?
                .into_inner();
            events.message().await?.ok_or("stream ended")?;
            Stopped::Tonic(events)
        }
        Target::Raw(_) => return Err("the raw floor has no streams".into()),
    };
    // The window (256 KiB for tether, 64 KiB for HTTP/2 by default) fills in well under this.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    Ok(stopped)
}
