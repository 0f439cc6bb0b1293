//! The four systems behind one interface: serve, connect, call.

use std::net::SocketAddr;

use bytes::Bytes;

use crate::raw::{self, RawClient};
use crate::tarpc_sys;

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
    /// tarpc 0.38 with its bincode serde transport.
    Tarpc,
    /// The floor: tokio, LengthDelimitedCodec and prost, no framework.
    Raw,
    /// tether with the admin page on both sides (rpc-admin), each page's API fetched every
    /// second as an open page does. Not in `ALL`: asked for by name (`--systems tether,tether-admin`).
    TetherAdmin,
}

impl System {
    pub(crate) const ALL: [System; 4] = [System::Tether, System::Tonic, System::Tarpc, System::Raw];

    /// Whether it has streaming calls (tarpc and the raw floor have none).
    pub(crate) fn streams(self) -> bool {
        matches!(self, System::Tether | System::Tonic)
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            System::Tether => "tether",
            System::Tonic => "tonic",
            System::Tarpc => "tarpc",
            System::Raw => "raw",
            System::TetherAdmin => "tether-admin",
        }
    }
}

struct TonicEcho;

#[tonic::async_trait]
impl pb::echo_server::Echo for TonicEcho {
    async fn say(&self, req: tonic::Request<pb::EchoRequest>) -> Result<tonic::Response<pb::EchoReply>, tonic::Status> {
        let r = req.into_inner();
        if r.delay_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(u64::from(r.delay_ms))).await;
        }
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

/// Serves `system` on every loopback address (so the idle benchmark can reach it at
/// 127.0.0.2, 127.0.0.3, ... when it needs more connections than one address has ephemeral
/// ports) and prints `LISTENING 127.0.0.1:<port>`.
pub(crate) async fn serve(system: System) -> Result<(), Box<dyn std::error::Error>> {
    // The same listener for every system, with the backlog tether binds with (tokio's default
    // of 128 overflows when the idle benchmark's pooled client dials 10 000 at once).
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from(([0, 0, 0, 0], 0)))?;
    let listener = socket.listen(4096)?;
    println!("LISTENING 127.0.0.1:{}", listener.local_addr()?.port());
    match system {
        System::Tether | System::TetherAdmin => {
            // Room for the idle benchmark's connections (the default limit is 10 000) and its
            // pooled client's one call per connection, made all at once.
            let config = rpc_server::ServerConfig {
                max_connections: 1_000_000,
                max_concurrent_requests: 1_000_000,
                ..Default::default()
            };
            let server = rpc_server::Server::builder()
                .config(config)
                .add_service(examples::echo::echo_server::EchoServer::new(
                    examples::services::EchoService::default(),
                ))
                .add_service(examples::feed::v1::feed_server::FeedServer::new(TetherFeed))
                .serve(listener)?;
            let _admin = match system {
                System::TetherAdmin => {
                    let admin = rpc_admin::Admin::new()
                        .server("bench", &server)
                        .serve("127.0.0.1:0")
                        .await?;
                    println!("ADMIN {}", admin.local_addr());
                    Some(admin)
                }
                _ => None,
            };
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
        System::Tarpc => tarpc_sys::serve(listener).await?,
        System::Raw => raw::serve(listener).await?,
    }
    Ok(())
}

/// A tether echo server on each of `n` listeners (the checkout benchmark's endpoints).
pub(crate) async fn serve_tether_on(n: usize) -> Result<(), Box<dyn std::error::Error>> {
    let mut servers = Vec::with_capacity(n);
    for _ in 0..n {
        let server = rpc_server::Server::builder()
            .add_service(examples::echo::echo_server::EchoServer::new(
                examples::services::EchoService::default(),
            ))
            .bind("127.0.0.1:0")
            .await?;
        println!("LISTENING {}", server.local_addr());
        servers.push(server);
    }
    std::future::pending::<()>().await;
    drop(servers);
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
    Tarpc(Vec<tarpc_sys::EchoServiceClient>),
    Raw(Vec<RawClient>),
}

impl Target {
    /// Opens `connections` connections to `addr`.
    pub(crate) async fn connect(
        system: System,
        addr: SocketAddr,
        connections: usize,
        callers: usize,
    ) -> Result<Target, Box<dyn std::error::Error>> {
        Ok(match system {
            System::Tether | System::TetherAdmin => {
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
            System::Tarpc => {
                let mut clients = Vec::new();
                for _ in 0..connections {
                    clients.push(tarpc_sys::connect(addr, callers.div_ceil(connections)).await?);
                }
                Target::Tarpc(clients)
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
            Target::Tarpc(clients) => Caller::Tarpc(clients[i % clients.len()].clone()),
            Target::Raw(conns) => Caller::Raw(conns[i % conns.len()].clone()),
        }
    }
}

/// One load task's handle on a system.
pub(crate) enum Caller {
    Tether(examples::echo::echo_client::EchoClient<rpc_client::Client>),
    Tonic(pb::echo_client::EchoClient<tonic::transport::Channel>),
    Tarpc(tarpc_sys::EchoServiceClient),
    Raw(RawClient),
}

impl Caller {
    /// One echo call; true on success with the payload echoed.
    pub(crate) async fn call(&mut self, payload: Bytes) -> bool {
        self.call_delayed(payload, 0).await
    }

    /// One echo call whose handler first waits `delay_ms` (the open-loop benchmark's slow path;
    /// the raw floor's handler has none and ignores it).
    pub(crate) async fn call_delayed(&mut self, payload: Bytes, delay_ms: u32) -> bool {
        let len = payload.len();
        match self {
            Caller::Tether(c) => {
                let req = examples::echo::EchoRequest {
                    message: "bench".into(),
                    payload,
                    delay_ms,
                    ..Default::default()
                };
                c.say(req).await.is_ok_and(|r| r.body().payload.len() == len)
            }
            Caller::Tonic(c) => {
                let req = pb::EchoRequest {
                    message: "bench".into(),
                    payload,
                    delay_ms,
                    ..Default::default()
                };
                c.say(req).await.is_ok_and(|r| r.get_ref().payload.len() == len)
            }
            Caller::Tarpc(c) => {
                let req = tarpc_sys::Echo {
                    message: "bench".into(),
                    payload,
                    delay_ms,
                };
                c.say(tarpc::context::current(), req)
                    .await
                    .is_ok_and(|r| r.payload.len() == len)
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

/// How the idle benchmark holds its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum IdleSetup {
    /// tether, one `Client` per connection (as tonic's one `Channel` per connection).
    TetherEach,
    /// tether, one `Client` holding all of them (`connections_per_endpoint`).
    TetherPooled,
    /// tonic, one `Channel` per connection, HTTP/2 keepalive pings.
    Tonic,
    /// tarpc, one client per connection (it has no heartbeat).
    Tarpc,
}

impl IdleSetup {
    pub(crate) const ALL: [IdleSetup; 4] = [
        IdleSetup::TetherEach,
        IdleSetup::TetherPooled,
        IdleSetup::Tonic,
        IdleSetup::Tarpc,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            IdleSetup::TetherEach => "tether, a Client per connection",
            IdleSetup::TetherPooled => "tether, one Client holding all",
            IdleSetup::Tonic => "tonic, a Channel per connection",
            IdleSetup::Tarpc => "tarpc, a client per connection (no heartbeat)",
        }
    }

    pub(crate) fn system(self) -> System {
        match self {
            IdleSetup::TetherEach | IdleSetup::TetherPooled => System::Tether,
            IdleSetup::Tonic => System::Tonic,
            IdleSetup::Tarpc => System::Tarpc,
        }
    }
}

/// Connections held open and idle for the idle-cost measurement, each having made one call.
pub(crate) enum Idle {
    TetherEach(Vec<rpc_client::Client>),
    TetherPooled(rpc_client::Client),
    Tonic(Vec<tonic::transport::Channel>),
    Tarpc(Vec<tarpc_sys::EchoServiceClient>),
}

impl Idle {
    /// Connections still open (tonic and tarpc: held; they do not say whether open).
    pub(crate) fn len(&self) -> usize {
        let open = |c: &rpc_client::Client| c.connections().iter().filter(|c| c.is_open()).count();
        match self {
            Idle::TetherEach(v) => v.iter().map(open).sum(),
            Idle::TetherPooled(c) => open(c),
            Idle::Tonic(v) => v.len(),
            Idle::Tarpc(v) => v.len(),
        }
    }
}

/// Connections one loopback address takes before the next is used: one destination address
/// and port leave about 28 000 ephemeral ports.
const PER_ADDRESS: usize = 20_000;

/// The address connection `i` dials: `addr`'s port on 127.0.0.1, then 127.0.0.2, ... (the
/// server listens on all of them).
fn spread(addr: SocketAddr, i: usize) -> SocketAddr {
    let k = u8::try_from(1 + i / PER_ADDRESS).expect("fewer than 5 million connections");
    SocketAddr::from(([127, 0, 0, k], addr.port()))
}

/// The echo request the idle connections make once before they go idle.
fn idle_call(delay_ms: u32) -> examples::echo::EchoRequest {
    examples::echo::EchoRequest {
        message: "idle".into(),
        payload: Bytes::from_static(&[0x5A; 64]),
        delay_ms,
        ..Default::default()
    }
}

/// An error a spawned task can return.
type TaskError = Box<dyn std::error::Error + Send + Sync>;

/// Runs `make(i)` for each `i` in `0..n` as tasks, 100 at a time; their results, or the first
/// error.
async fn in_batches<T, F, Fut>(n: usize, make: F) -> Result<Vec<T>, Box<dyn std::error::Error>>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T, TaskError>> + Send + 'static,
    T: Send + 'static,
{
    let mut done = Vec::with_capacity(n);
    while done.len() < n {
        let mut set = tokio::task::JoinSet::new();
        for i in done.len()..(done.len() + 100).min(n) {
            set.spawn(make(i));
        }
        while let Some(r) = set.join_next().await {
            done.push(r?.map_err(|e| e.to_string())?);
        }
    }
    Ok(done)
}

/// Opens `n` connections (100 at a time), makes one echo call on each, and leaves them idle,
/// heartbeating every `interval` (tonic: HTTP/2 keepalive pings; tarpc: nothing).
pub(crate) async fn open_idle(
    setup: IdleSetup,
    addr: SocketAddr,
    n: usize,
    interval: std::time::Duration,
) -> Result<Idle, Box<dyn std::error::Error>> {
    use std::time::Duration;
    let config = rpc_client::ClientConfig {
        heartbeat: rpc_core::config::HeartbeatConfig {
            enabled: true,
            interval,
            timeout: Duration::from_millis(500),
            max_failures: 3,
            ..Default::default()
        },
        connect_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    match setup {
        IdleSetup::TetherEach => {
            let held = in_batches(n, |i| {
                let config = config.clone();
                async move {
                    let client = rpc_client::Client::connect(spread(addr, i), config).await?;
                    let mut echo = examples::echo::echo_client::EchoClient::new(client.clone());
                    echo.say(idle_call(0)).await?;
                    Ok(client)
                }
            })
            .await?;
            Ok(Idle::TetherEach(held))
        }
        IdleSetup::TetherPooled => {
            let endpoints = n.div_ceil(PER_ADDRESS);
            if n % endpoints != 0 {
                return Err(format!("{n} connections do not spread evenly over {endpoints} addresses").into());
            }
            let config = rpc_client::ClientConfig {
                connections_per_endpoint: n / endpoints,
                ..config
            };
            let client =
                rpc_client::Client::with_endpoints((0..endpoints).map(|k| spread(addr, k * PER_ADDRESS)), config)?;
            client.checkout(None).await?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            while client.connections().iter().filter(|c| c.is_open()).count() < n {
                if tokio::time::Instant::now() > deadline {
                    return Err("the pooled client did not open its connections within 120 s".into());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // One call per connection: the pool takes each connection in turn (ties of in-flight
            // go round), so n calls, 100 at a time, cover them.
            let echo = examples::echo::echo_client::EchoClient::new(client.clone());
            let calls = in_batches(n, |_| {
                let mut echo = echo.clone();
                async move {
                    echo.say(idle_call(0)).await?;
                    Ok(())
                }
            })
            .await;
            if let Err(e) = calls {
                let mut why = std::collections::BTreeMap::new();
                for c in client.holder().recent_closes() {
                    *why.entry(format!("{:?}", c.reason)).or_insert(0) += 1;
                }
                return Err(format!("a pooled connection's call failed: {e}; recent closes: {why:?}").into());
            }
            Ok(Idle::TetherPooled(client))
        }
        IdleSetup::Tonic => {
            let held = in_batches(n, |i| async move {
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", spread(addr, i)))?
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(interval)
                    .keep_alive_timeout(Duration::from_millis(500))
                    .keep_alive_while_idle(true)
                    .connect_timeout(Duration::from_secs(10))
                    .connect()
                    .await?;
                let r = idle_call(0);
                pb::echo_client::EchoClient::new(channel.clone())
                    .say(pb::EchoRequest {
                        message: r.message,
                        payload: r.payload,
                        ..Default::default()
                    })
                    .await?;
                Ok(channel)
            })
            .await?;
            Ok(Idle::Tonic(held))
        }
        IdleSetup::Tarpc => {
            let held = in_batches(n, |i| async move {
                let client = tarpc_sys::connect(spread(addr, i), 1).await?;
                let r = idle_call(0);
                let echo = tarpc_sys::Echo {
                    message: r.message,
                    payload: r.payload,
                    delay_ms: r.delay_ms,
                };
                client.say(tarpc::context::current(), echo).await?;
                Ok(client)
            })
            .await?;
            Ok(Idle::Tarpc(held))
        }
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
        System::Tether | System::TetherAdmin => {
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
        System::Tarpc => return Err("tarpc has no streams".into()),
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
        System::Tether | System::TetherAdmin => {
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
        System::Tarpc => return Err("tarpc has no streams".into()),
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
        Target::Raw(_) | Target::Tarpc(_) => return Err("the raw floor and tarpc have no streams".into()),
    };
    // The window (256 KiB for tether, 64 KiB for HTTP/2 by default) fills in well under this.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    Ok(stopped)
}

/// An admin page open in a browser, as far as the servers see it: the client's page served, and
/// both pages' API (the client's and the server's) fetched every second, as the page's script does.
pub(crate) struct PageOpen {
    _admin: rpc_admin::AdminHandle,
    poller: tokio::task::JoinHandle<()>,
}

impl PageOpen {
    pub(crate) async fn start(
        target: &Target,
        server_admin: SocketAddr,
    ) -> Result<PageOpen, Box<dyn std::error::Error>> {
        let Target::Tether(client) = target else {
            return Err("the admin page is tether's".into());
        };
        let admin = rpc_admin::Admin::new()
            .client("bench", client)
            .serve("127.0.0.1:0")
            .await?;
        let pages = [admin.local_addr(), server_admin];
        // The page itself, once each, as a browser loads it.
        for addr in pages {
            http_get(addr, "/").await.map_err(|e| e.to_string())?;
        }
        let poller = tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tick.tick().await;
                for addr in pages {
                    if let Err(e) = http_get(addr, "/api/v1/state").await {
                        eprintln!("admin page {addr}: {e}");
                    }
                }
            }
        });
        Ok(PageOpen { _admin: admin, poller })
    }
}

impl Drop for PageOpen {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

/// One HTTP/1.1 GET on a fresh connection, as a page's fetch; fails unless the answer is 200.
async fn http_get(addr: SocketAddr, path: &str) -> Result<usize, Box<dyn std::error::Error + Send + Sync>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    if !raw.starts_with(b"HTTP/1.1 200") {
        return Err(format!("{path}: {}", String::from_utf8_lossy(&raw[..raw.len().min(80)])).into());
    }
    Ok(raw.len())
}
