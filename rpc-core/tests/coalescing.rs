//! Write coalescing in the connection driver: frames queued by tasks woken together leave in one
//! write. The peer is a scripted server on an in-memory stream that counts the driver's writes.

#![allow(clippy::unwrap_used)]

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use rpc_core::codec::FrameCodec;
use rpc_core::driver::{ConnectionHandle, Driver, DriverConfig, Outbound};
use rpc_core::frame::{Frame, RequestFrame, ResponseFrame, Settings};
use rpc_core::metrics::Side;
use rpc_core::{Code, Metadata};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::sync::oneshot;
use tokio_util::codec::FramedRead;

/// The driver's side of the stream: counts writes that carried bytes.
struct Counting {
    inner: DuplexStream,
    writes: Arc<AtomicUsize>,
}

impl AsyncRead for Counting {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counting {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.writes.fetch_add(1, Ordering::SeqCst);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The scripted server.
struct Peer {
    frames: FramedRead<tokio::io::ReadHalf<DuplexStream>, FrameCodec>,
    out: tokio::io::WriteHalf<DuplexStream>,
}

impl Peer {
    async fn send(&mut self, frames: &[Frame]) {
        let codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        for f in frames {
            codec.encode_frame(f, &mut buf).unwrap();
        }
        // One write: every response arrives in the same read.
        self.out.write_all(&buf).await.unwrap();
    }

    async fn requests(&mut self, n: usize) -> Vec<u64> {
        let mut ids = Vec::new();
        while ids.len() < n {
            match self.frames.next().await.unwrap().unwrap() {
                Frame::Request(r) => ids.push(r.id),
                other => panic!("unexpected {other:?}"),
            }
        }
        ids
    }
}

async fn connect() -> (ConnectionHandle, Peer, Arc<AtomicUsize>) {
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let writes = Arc::new(AtomicUsize::new(0));
    let io = Counting {
        inner: ours,
        writes: writes.clone(),
    };
    let (handle, driver) = Driver::client(io, DriverConfig::new(Side::Client));
    tokio::spawn(driver.run());
    let (r, w) = tokio::io::split(theirs);
    let mut peer = Peer {
        frames: FramedRead::new(r, FrameCodec::default()),
        out: w,
    };
    match peer.frames.next().await.unwrap().unwrap() {
        Frame::Settings(_) => {}
        other => panic!("expected SETTINGS, got {other:?}"),
    }
    peer.send(&[Frame::Settings(Settings::default())]).await;
    handle.ready().await.unwrap();
    (handle, peer, writes)
}

/// One request through the handle; resolves with the response.
async fn call(handle: &ConnectionHandle) {
    let (tx, rx) = oneshot::channel();
    let msg = Outbound::Request {
        frame: RequestFrame {
            id: 0,
            oneway: false,
            stream: false,
            timeout: None,
            method: "/t.T/M".into(),
            metadata: Metadata::new(),
            payload: Bytes::from_static(b"x"),
        },
        deadline: None,
        reply: rpc_core::driver::Reply::Response(tx),
    };
    assert!(handle.send(msg).await.is_ok());
    rx.await.unwrap().unwrap();
}

fn ok(id: u64) -> Frame {
    Frame::Response(ResponseFrame {
        id,
        code: Code::Ok,
        message: String::new(),
        metadata: Metadata::new(),
        payload: Bytes::new(),
        not_executed: false,
    })
}

// One worker thread: the multi-thread scheduler (LIFO slot, deferred wakes) without the
// nondeterminism of a second worker stealing tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn callers_woken_by_one_read_send_their_next_requests_in_one_write() {
    let (handle, mut peer, writes) = connect().await;
    const CALLERS: usize = 16;
    let mut callers = Vec::new();
    for _ in 0..CALLERS {
        let handle = handle.clone();
        callers.push(tokio::spawn(async move {
            call(&handle).await;
            call(&handle).await;
        }));
    }
    let first = peer.requests(CALLERS).await;
    let before = writes.load(Ordering::SeqCst);
    // All answers in one read: every caller wakes at once and sends its second request.
    peer.send(&first.iter().map(|&id| ok(id)).collect::<Vec<_>>()).await;
    let second = peer.requests(CALLERS).await;
    let used = writes.load(Ordering::SeqCst) - before;
    assert!(
        used <= 2,
        "{CALLERS} requests queued together took {used} writes (one each would be {CALLERS})"
    );
    peer.send(&second.iter().map(|&id| ok(id)).collect::<Vec<_>>()).await;
    for c in callers {
        c.await.unwrap();
    }
}
