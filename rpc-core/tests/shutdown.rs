//! A connection told to shut down starts its drain at once, whatever it is waiting for: here, a
//! peer that stopped reading with this side's write buffer full (found in review: the shutdown
//! was seen only when the write-stall timer fired, seconds later, and the connection closed as a
//! slow consumer instead of draining).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use rpc_core::codec::FrameCodec;
use rpc_core::driver::{Driver, DriverConfig, Outbound};
use rpc_core::error::CloseReason;
use rpc_core::frame::{Frame, RequestFrame, Settings};
use rpc_core::metrics::Side;
use rpc_core::Metadata;
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;
use tokio_util::codec::FramedRead;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_drains_at_once_while_the_write_buffer_waits_on_a_peer_that_stopped_reading() {
    let (ours, theirs) = tokio::io::duplex(1024);
    let mut cfg = DriverConfig::new(Side::Client);
    cfg.connection.max_outbound_bytes = 4096;
    cfg.connection.write_stall_timeout = Duration::from_secs(3);
    cfg.drain_timeout = Duration::from_millis(100);
    cfg.linger = Duration::ZERO;
    let (handle, driver) = Driver::client(ours, cfg);
    let run = tokio::spawn(driver.run());
    let (r, mut w) = tokio::io::split(theirs);
    let mut frames = FramedRead::new(r, FrameCodec::default());
    match frames.next().await.unwrap().unwrap() {
        Frame::Settings(_) => {}
        other => panic!("expected SETTINGS, got {other:?}"),
    }
    let mut buf = BytesMut::new();
    FrameCodec::default()
        .encode_frame(&Frame::Settings(Settings::default()), &mut buf)
        .unwrap();
    w.write_all(&buf).await.unwrap();
    handle.ready().await.unwrap();
    // The peer reads nothing more: a request larger than the pipe and the budget fills the
    // write buffer and waits there.
    let (tx, _rx) = oneshot::channel();
    let request = Outbound::Request {
        frame: RequestFrame {
            id: 0,
            oneway: false,
            stream: false,
            timeout: None,
            method: "/t.T/M".into(),
            metadata: Metadata::new(),
            payload: Bytes::from(vec![0u8; 16 * 1024]),
        },
        deadline: None,
        reply: rpc_core::driver::Reply::Response(tx),
    };
    assert!(handle.send(request).await.is_ok());
    tokio::time::timeout(Duration::from_secs(5), async {
        while handle.outbound_buffered() < 4096 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the write buffer fills");
    handle.shutdown();
    // The drain starts now and ends at its 100 ms timeout, far before the 3 s write stall.
    let reason = tokio::time::timeout(Duration::from_secs(2), handle.closed())
        .await
        .expect("the connection drained within its drain timeout, not at the write stall");
    assert_ne!(
        reason,
        CloseReason::SlowConsumer,
        "closed by the write stall: the shutdown was not seen"
    );
    let _ = run.await;
    drop(frames);
}
