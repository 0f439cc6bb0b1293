//! A fault-injecting TCP proxy for application-level fault tests.
//!
//! Clients connect to [`FaultProxy::addr`]; each connection is forwarded to the upstream server.
//! The fault is switched at runtime for every connection at once:
//! - [`Fault::Pass`]: forward both ways;
//! - [`Fault::Blackhole`]: forward nothing either way but keep both sockets open (bytes are read
//!   and discarded, and an EOF is not passed on), as when a path or a peer silently disappears;
//! - [`Fault::StopReading`]: stop reading from one side, so its sender's window fills;
//! - [`Fault::Delay`]: forward after a delay.
//!
//! [`FaultProxy::reset_all`] ends every connection with RST on both sides, and
//! [`FaultProxy::close_all`] with FIN.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch};

/// Which way bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the client to the server.
    ToServer,
    /// From the server to the client.
    ToClient,
}

/// The fault applied to every proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward both ways.
    Pass,
    /// Forward nothing, keep sockets open.
    Blackhole,
    /// Stop reading bytes flowing in this direction (the sender's window fills).
    StopReading(Direction),
    /// Forward after this delay.
    Delay(Duration),
    /// Forward bytes flowing in this direction at about this many bytes a second (a slow
    /// link); the other direction passes.
    Throttle(Direction, u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kill {
    Reset,
    Close,
}

/// A running proxy; dropping it stops accepting (existing connections end with their sockets).
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    fault: watch::Sender<Fault>,
    kill: broadcast::Sender<Kill>,
    accepted: Arc<AtomicUsize>,
    /// Bytes forwarded to the server and to the client.
    bytes: Arc<[AtomicUsize; 2]>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    /// Starts a proxy on 127.0.0.1 to `upstream`.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (fault, _) = watch::channel(Fault::Pass);
        let (kill, _) = broadcast::channel(16);
        let accepted = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let task = {
            let fault = fault.clone();
            let kill = kill.clone();
            let accepted = accepted.clone();
            let bytes = bytes.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        continue; // upstream down: the client sees the proxy close
                    };
                    tokio::spawn(proxy_connection(
                        client,
                        server,
                        fault.subscribe(),
                        kill.subscribe(),
                        bytes.clone(),
                    ));
                }
            })
        };
        FaultProxy {
            addr,
            fault,
            kill,
            accepted,
            bytes,
            task,
        }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches the fault for every connection, current and future.
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    /// Ends every current connection with RST on both sides.
    pub fn reset_all(&self) {
        let _ = self.kill.send(Kill::Reset);
    }

    /// Ends every current connection with FIN on both sides.
    pub fn close_all(&self) {
        let _ = self.kill.send(Kill::Close);
    }

    /// Bytes forwarded so far in `dir`, over every connection.
    pub fn bytes(&self, dir: Direction) -> usize {
        self.bytes[dir as usize].load(Ordering::Relaxed)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

async fn proxy_connection(
    client: TcpStream,
    server: TcpStream,
    fault: watch::Receiver<Fault>,
    mut kill: broadcast::Receiver<Kill>,
    bytes: Arc<[AtomicUsize; 2]>,
) {
    // Keep a duplicate descriptor of each socket so a reset can set SO_LINGER 0 after the pumps
    // are gone: the last close of a socket with linger 0 sends RST instead of FIN.
    let (Ok((client, client_dup)), Ok((server, server_dup))) = (with_dup(client), with_dup(server)) else {
        return;
    };
    // `io::split`, not `into_split`: tokio's owned write half sends FIN when dropped, which would
    // reach the peer before the RST.
    let (cr, cw) = tokio::io::split(client);
    let (sr, sw) = tokio::io::split(server);
    let mut up = tokio::spawn(pump(cr, sw, Direction::ToServer, fault.clone(), bytes.clone()));
    let mut down = tokio::spawn(pump(sr, cw, Direction::ToClient, fault, bytes));
    let how = tokio::select! {
        k = kill.recv() => k.unwrap_or(Kill::Close),
        // Both directions ended on their own: nothing left to kill.
        _ = async { let _ = (&mut up).await; let _ = (&mut down).await; } => return,
    };
    if how == Kill::Reset {
        for s in [&client_dup, &server_dup] {
            let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
        }
    }
    up.abort();
    down.abort();
    let _ = up.await;
    let _ = down.await;
    drop((client_dup, server_dup));
}

fn with_dup(s: TcpStream) -> std::io::Result<(TcpStream, std::net::TcpStream)> {
    let _ = s.set_nodelay(true);
    let std = s.into_std()?;
    let dup = std.try_clone()?;
    Ok((TcpStream::from_std(std)?, dup))
}

async fn pump(
    mut from: ReadHalf<TcpStream>,
    mut to: WriteHalf<TcpStream>,
    dir: Direction,
    mut fault: watch::Receiver<Fault>,
    bytes: Arc<[AtomicUsize; 2]>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let current = *fault.borrow_and_update();
        if current == Fault::StopReading(dir) {
            if fault.changed().await.is_err() {
                break;
            }
            continue;
        }
        // A throttled direction reads in small steps, so its pace is even.
        let step = match current {
            Fault::Throttle(d, _) if d == dir => 4096,
            _ => buf.len(),
        };
        let n = tokio::select! {
            r = from.read(&mut buf[..step]) => r,
            changed = fault.changed() => {
                if changed.is_err() {
                    break;
                }
                continue;
            }
        };
        let fault_now = *fault.borrow();
        match n {
            Ok(0) | Err(_) => {
                // A silent path does not carry the FIN either: hold it until the path heals, as a
                // retransmitted FIN would arrive then.
                while *fault.borrow_and_update() == Fault::Blackhole {
                    if fault.changed().await.is_err() {
                        break;
                    }
                }
                let _ = to.shutdown().await;
                break;
            }
            Ok(n) => match fault_now {
                Fault::Pass | Fault::StopReading(_) => {
                    if to.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    bytes[dir as usize].fetch_add(n, Ordering::Relaxed);
                }
                Fault::Delay(d) => {
                    tokio::time::sleep(d).await;
                    if to.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    bytes[dir as usize].fetch_add(n, Ordering::Relaxed);
                }
                Fault::Throttle(d, rate) => {
                    if to.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    bytes[dir as usize].fetch_add(n, Ordering::Relaxed);
                    if d == dir && rate > 0 {
                        tokio::time::sleep(Duration::from_secs_f64(n as f64 / f64::from(rate))).await;
                    }
                }
                Fault::Blackhole => {} // discarded
            },
        }
    }
    drop((from, to));
}
