//! Shared support for the integration tests: servers with the example services, fast configs,
//! raw-socket helpers, and the fault-injecting proxy.

#![allow(missing_docs, clippy::unwrap_used)]

pub mod etcd;
pub mod netns;
pub mod pki;
pub mod proxy;
pub mod v1;

use std::net::SocketAddr;
use std::time::Duration;

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use examples::echo::echo_server::EchoServer;
use examples::greeter::v1::greeter_server::GreeterServer;
use examples::services::{EchoService, GreeterService};
use rpc_client::ClientConfig;
use rpc_core::codec::FrameCodec;
use rpc_core::event::ConnectionEvent;
use rpc_core::frame::{Frame, Settings};
use rpc_core::{Request, Response, Status};
use rpc_server::{Server, ServerConfig, ServerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::broadcast;
use tokio_util::codec::{Decoder, Encoder};

/// Logs to the test output when `RUST_LOG` is set.
pub fn trace() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A server with the echo and greeter services on 127.0.0.1:0.
/// A server with default settings whose one method, `/test.Gate/Hold`, is a [`Gate`]: each
/// request reports its arrival and waits to be released.
pub async fn gate_server() -> (ServerHandle, GateControl) {
    let (gate, control) = Gate::new();
    let server = Server::builder()
        .route("/test.Gate/Hold", gate.handler())
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    (server, control)
}

pub async fn echo_server(config: ServerConfig) -> ServerHandle {
    echo_server_with(config, EchoService::default()).await
}

/// A server with a configured echo service.
pub async fn echo_server_with(config: ServerConfig, echo: EchoService) -> ServerHandle {
    Server::builder()
        .config(config)
        .add_service(EchoServer::new(echo))
        .add_service(GreeterServer::new(GreeterService))
        .bind("127.0.0.1:0")
        .await
        .unwrap()
}

/// Client config without heartbeats (tests that want them turn them on).
pub fn quiet_client() -> ClientConfig {
    ClientConfig {
        heartbeat: rpc_core::config::HeartbeatConfig::disabled(),
        ..ClientConfig::default()
    }
}

/// Waits for the first event matching `pred`, up to `limit`.
pub async fn wait_event(
    rx: &mut broadcast::Receiver<ConnectionEvent>,
    limit: Duration,
    pred: impl Fn(&ConnectionEvent) -> bool,
) -> Option<ConnectionEvent> {
    tokio::time::timeout(limit, async {
        loop {
            match rx.recv().await {
                Ok(ev) if pred(&ev) => return Some(ev),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// A raw TCP peer that speaks frames by hand, for protocol abuse tests.
pub struct RawPeer {
    pub stream: TcpStream,
    codec: FrameCodec,
    buf: BytesMut,
    next_id: u64,
}

impl RawPeer {
    pub async fn connect(addr: SocketAddr) -> RawPeer {
        RawPeer::from_stream(TcpStream::connect(addr).await.unwrap())
    }

    /// A raw server on 127.0.0.1: its address, and the peer of the first connection it accepts,
    /// once it has sent `settings` (playing a server whose SETTINGS a test chooses).
    pub async fn server(settings: Settings) -> (SocketAddr, impl std::future::Future<Output = RawPeer>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut raw = RawPeer::from_stream(stream);
            raw.send(Frame::Settings(settings)).await;
            raw
        };
        (addr, peer)
    }

    pub fn from_stream(stream: TcpStream) -> RawPeer {
        RawPeer {
            stream,
            codec: FrameCodec::default(),
            buf: BytesMut::new(),
            next_id: 0,
        }
    }

    /// The next request id (1, 2, ...).
    pub fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub async fn send(&mut self, frame: Frame) {
        let mut out = BytesMut::new();
        self.codec.encode(frame, &mut out).unwrap();
        self.stream.write_all(&out).await.unwrap();
    }

    pub async fn send_settings(&mut self) {
        self.send(Frame::Settings(Settings {
            max_frame_size: Some(1 << 20),
            ..Settings::default()
        }))
        .await;
    }

    /// Reads frames until EOF (or an error), returning them; bounded by `limit`.
    pub async fn read_until_close(&mut self, limit: Duration) -> Vec<Frame> {
        self.read_to_eof(limit).await.0
    }

    /// The frames read until EOF (or an error), and whether it came within `limit`.
    pub async fn read_to_eof(&mut self, limit: Duration) -> (Vec<Frame>, bool) {
        let mut frames = Vec::new();
        let closed = tokio::time::timeout(limit, async {
            loop {
                while let Ok(Some(f)) = self.codec.decode(&mut self.buf) {
                    frames.push(f);
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok();
        (frames, closed)
    }

    /// The next frame, bounded by `limit`.
    pub async fn next_frame(&mut self, limit: Duration) -> Option<Frame> {
        tokio::time::timeout(limit, async {
            loop {
                if let Ok(Some(f)) = self.codec.decode(&mut self.buf) {
                    return Some(f);
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .ok()
        .flatten()
    }
}

/// A handler that reports each request's arrival and holds it until released: lets tests know a
/// request reached the server without sleeping.
#[derive(Clone)]
pub struct Gate {
    arrived: tokio::sync::mpsc::UnboundedSender<Bytes>,
    release: Arc<tokio::sync::Semaphore>,
}

/// The test side of a [`Gate`].
pub struct GateControl {
    pub arrived: tokio::sync::mpsc::UnboundedReceiver<Bytes>,
    release: Arc<tokio::sync::Semaphore>,
}

impl Gate {
    pub fn new() -> (Gate, GateControl) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        (
            Gate {
                arrived: tx,
                release: release.clone(),
            },
            GateControl { arrived: rx, release },
        )
    }

    /// The handler: echoes the body once released.
    pub fn handler(
        self,
    ) -> impl tower::Service<
        Request<Bytes>,
        Response = Response<Bytes>,
        Error = Status,
        Future = impl std::future::Future<Output = Result<Response<Bytes>, Status>> + Send,
    > + Clone
           + Send
           + Sync
           + 'static {
        rpc_server::handler_fn(move |req: Request<Bytes>| {
            let gate = self.clone();
            async move {
                let body = req.into_body();
                let _ = gate.arrived.send(body.clone());
                let permit = gate
                    .release
                    .acquire()
                    .await
                    .map_err(|_| Status::internal("gate closed"))?;
                permit.forget();
                Ok(Response::new(body))
            }
        })
    }
}

impl GateControl {
    /// Waits until `n` requests have arrived; returns their bodies.
    pub async fn wait_arrivals(&mut self, n: usize) -> Vec<Bytes> {
        let mut out = Vec::new();
        while out.len() < n {
            let got = tokio::time::timeout(Duration::from_secs(10), self.arrived.recv()).await;
            out.push(got.expect("requests did not arrive in 10 s").expect("gate dropped"));
        }
        out
    }

    /// Lets `n` held requests finish.
    pub fn release(&self, n: usize) {
        self.release.add_permits(n);
    }
}

/// A server whose `/t.T/Who` answers its `name` and counts the calls it ran.
pub struct NamedServer {
    pub handle: ServerHandle,
    pub calls: Arc<std::sync::atomic::AtomicUsize>,
    pub name: &'static str,
}

/// Starts a [`NamedServer`] on `addr` (use port 0 for any), with an optional handler delay.
pub async fn named_server(name: &'static str, addr: SocketAddr, config: ServerConfig, delay: Duration) -> NamedServer {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = calls.clone();
    let handle = Server::builder()
        .config(config)
        .route(
            "/t.T/Who",
            rpc_server::handler_fn(move |_req: Request<Bytes>| {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    Ok(Response::new(Bytes::from_static(name.as_bytes())))
                }
            }),
        )
        .bind(addr)
        .await
        .unwrap();
    NamedServer { handle, calls, name }
}

impl NamedServer {
    pub fn addr(&self) -> SocketAddr {
        self.handle.local_addr()
    }

    pub fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Calls `/t.T/Who` and returns the answering server's name.
pub async fn who(client: &rpc_client::Client, timeout: Duration) -> Result<String, rpc_client::Error> {
    let resp = client
        .unary(Request::for_method("/t.T/Who", Bytes::new()).with_timeout(timeout))
        .await?;
    Ok(String::from_utf8_lossy(resp.body()).into_owned())
}

/// Polls `cond` every 5 ms until it holds; returns how long that took, or fails the test after
/// `limit`. For state that has no event to wait on.
pub async fn wait_until(limit: Duration, cond: impl Fn() -> bool) -> Duration {
    let start = tokio::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "condition not met within {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}

/// The one permit of a server with `max_concurrent_requests` 1 is free: a request to its
/// `/t.T/Echo` succeeds next.
///
/// Called once the handler holding it is over (its drop signal fired, or its request was
/// cancelled): the permit goes the moment the handler's drop returns (so the limit bounds the
/// handlers that exist), a few microseconds later in the handler's task, which a request sent at
/// once can beat. So SERVER_BUSY is asked again for up to 100 ms; anything else fails.
pub async fn permit_is_free(client: &rpc_client::Client) {
    let until = tokio::time::Instant::now() + Duration::from_millis(100);
    loop {
        match client
            .unary(Request::for_method("/t.T/Echo", Bytes::from_static(b"next")).with_timeout(Duration::from_secs(2)))
            .await
        {
            Ok(resp) => {
                assert_eq!(resp.into_body(), Bytes::from_static(b"next"));
                return;
            }
            Err(e) if e.code() == rpc_core::Code::ServerBusy && tokio::time::Instant::now() < until => {
                tokio::task::yield_now().await
            }
            Err(e) => panic!("the permit is not free: {e}"),
        }
    }
}
