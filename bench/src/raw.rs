//! The raw floor: tokio + `LengthDelimitedCodec` + prost, no framework. Each frame is an 8-byte
//! request id then the protobuf message; many requests in flight per connection, answers written
//! in batches (feed, then one flush), the handler run inline on the reader.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::SinkExt;
use prost::Message;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use crate::systems::pb;

fn frame(id: u64, msg: &impl Message) -> Bytes {
    let mut b = BytesMut::with_capacity(8 + msg.encoded_len());
    b.put_u64(id);
    msg.encode(&mut b).expect("buffer has room");
    b.freeze()
}

/// Writes everything queued so far, then flushes once.
async fn writer(stream: tokio::net::tcp::OwnedWriteHalf, mut rx: mpsc::Receiver<Bytes>) {
    let mut sink = FramedWrite::new(stream, LengthDelimitedCodec::new());
    while let Some(first) = rx.recv().await {
        if sink.feed(first).await.is_err() {
            return;
        }
        while let Ok(more) = rx.try_recv() {
            if sink.feed(more).await.is_err() {
                return;
            }
        }
        if SinkExt::<Bytes>::flush(&mut sink).await.is_err() {
            return;
        }
    }
}

pub(crate) async fn serve(listener: TcpListener) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            use futures_util::StreamExt;
            let (r, w) = stream.into_split();
            let (tx, rx) = mpsc::channel(1024);
            tokio::spawn(writer(w, rx));
            let mut frames = FramedRead::new(r, LengthDelimitedCodec::new());
            while let Some(Ok(mut f)) = frames.next().await {
                if f.len() < 8 {
                    return;
                }
                let id = u64::from_be_bytes(f.split_to(8)[..].try_into().expect("8 bytes"));
                let Ok(req) = pb::EchoRequest::decode(f.freeze()) else {
                    return;
                };
                if id == STREAM {
                    // The streaming floor: `delay_ms` events of `reply_size` bytes, then an end
                    // frame; TCP's own backpressure is the only flow control.
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let payload = Bytes::from(vec![0x5A; req.reply_size as usize]);
                        for seq in 1..=u64::from(req.delay_ms) {
                            let event = crate::systems::feed::Event {
                                seq,
                                payload: payload.clone(),
                            };
                            if tx.send(frame(0, &event)).await.is_err() {
                                return;
                            }
                        }
                        let _ = tx.send(frame(STREAM, &pb::EchoReply::default())).await;
                    });
                    continue;
                }
                let reply = pb::EchoReply {
                    message: req.message,
                    payload: req.payload,
                    remaining_deadline_ms: 0,
                };
                if tx.send(frame(id, &reply)).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// The request id that asks the raw server for a stream (see `serve`).
pub(crate) const STREAM: u64 = u64::MAX;

/// The raw streaming floor's client: asks for `count` events of `size` bytes on a connection of
/// its own and reads them; returns how many arrived.
pub(crate) async fn stream(addr: SocketAddr, count: u32, size: u32) -> std::io::Result<u64> {
    use futures_util::StreamExt;
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (r, w) = stream.into_split();
    let mut sink = FramedWrite::new(w, LengthDelimitedCodec::new());
    let req = pb::EchoRequest {
        delay_ms: count,
        reply_size: size,
        ..Default::default()
    };
    sink.send(frame(STREAM, &req)).await?;
    let mut frames = FramedRead::new(r, LengthDelimitedCodec::new());
    let mut n = 0;
    while let Some(f) = frames.next().await {
        let mut f = f?;
        let id = u64::from_be_bytes(f.split_to(8)[..].try_into().expect("8 bytes"));
        if id == STREAM {
            break;
        }
        let event = crate::systems::feed::Event::decode(f.freeze())?;
        std::hint::black_box(&event);
        n += 1;
    }
    Ok(n)
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Bytes>>>>;

/// One multiplexed raw connection.
#[derive(Clone)]
pub(crate) struct RawClient {
    tx: mpsc::Sender<Bytes>,
    pending: Pending,
    next: Arc<AtomicU64>,
}

impl RawClient {
    pub(crate) async fn connect(addr: SocketAddr) -> std::io::Result<RawClient> {
        use futures_util::StreamExt;
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(writer(w, rx));
        let pending: Pending = Arc::default();
        let p = pending.clone();
        tokio::spawn(async move {
            let mut frames = FramedRead::new(r, LengthDelimitedCodec::new());
            while let Some(Ok(mut f)) = frames.next().await {
                if f.len() < 8 {
                    return;
                }
                let id = u64::from_be_bytes(f.split_to(8)[..].try_into().expect("8 bytes"));
                if let Some(waiter) = p.lock().expect("lock").remove(&id) {
                    let _ = waiter.send(f.freeze());
                }
            }
        });
        Ok(RawClient {
            tx,
            pending,
            next: Arc::new(AtomicU64::new(1)),
        })
    }

    pub(crate) async fn call(&self, req: &pb::EchoRequest) -> Option<pb::EchoReply> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("lock").insert(id, tx);
        self.tx.send(frame(id, req)).await.ok()?;
        pb::EchoReply::decode(rx.await.ok()?).ok()
    }
}
