//! Shared by the client fuzz targets: a client driver over an in-memory stream, fed `server_bytes`.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rpc_core::codec::FrameCodec;
use rpc_core::driver::{ConnectionError, Driver, DriverConfig, Outbound, Reply};
use rpc_core::error::GoAwayReason;
use rpc_core::frame::{Frame, GoAway, RequestFrame, ResponseFrame, Settings};
use rpc_core::metrics::Side;
use rpc_core::Code;
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;

/// Encodes a sequence of valid frames chosen by `data`, three bytes per frame.
pub fn frames_from(data: &[u8]) -> Vec<u8> {
    let codec = FrameCodec::default();
    let mut out = BytesMut::new();
    for op in data.chunks(3) {
        let (a, b) = (op.first().copied().unwrap_or(0), op.get(1).copied().unwrap_or(0));
        let c = op.get(2).copied().unwrap_or(0);
        let frame = match a % 7 {
            0 => Frame::Settings(Settings {
                max_frame_size: Some(64 + u32::from(b) * 64),
                idle_timeout: (c & 1 != 0).then(|| Duration::from_millis(u64::from(b))),
                max_metadata_entries: Some(u32::from(c)),
                features: Some(u64::from(c)),
                ..Settings::default()
            }),
            1 => Frame::GoAway(GoAway {
                reason: GoAwayReason::from_u8(b),
                last_request_id: u64::from(c),
                message: String::new(),
            }),
            2 | 3 => Frame::Response(ResponseFrame {
                id: u64::from(b),
                code: Code::from_u16(u16::from(c % 24)),
                message: String::new(),
                metadata: Default::default(),
                payload: Bytes::new(),
                not_executed: c & 0x80 != 0,
            }),
            4 => Frame::Heartbeat { id: u64::from(b) },
            // A newer peer's extension: skipped.
            5 => Frame::Unknown(rpc_core::frame::UnknownFrame {
                kind: 9 + b % 100,
                flags: c,
                id: u64::from(c),
                body: Bytes::from(vec![c; usize::from(b % 32)]),
            }),
            _ => Frame::HeartbeatAck { id: u64::from(b) },
        };
        let _ = codec.encode_frame(&frame, &mut out);
    }
    out.to_vec()
}

/// Runs a client driver fed `server_bytes` while eight calls (every third a oneway) are sent.
pub fn run_client(server_bytes: Vec<u8>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let (peer, client_side) = tokio::io::duplex(64 * 1024);
        let mut cfg = DriverConfig::new(Side::Client);
        cfg.linger = Duration::from_millis(10);
        cfg.drain_timeout = Duration::from_secs(1);
        let (handle, driver) = Driver::client(client_side, cfg);
        let run = tokio::spawn(driver.run());
        let mut calls = Vec::new();
        let mut oneways = Vec::new();
        for i in 0..8u8 {
            let frame = RequestFrame {
                method: "/f.F/F".into(),
                oneway: i % 3 == 2,
                payload: Bytes::from(vec![i; usize::from(i) * 40]),
                ..Default::default()
            };
            let deadline = Some(tokio::time::Instant::now() + Duration::from_secs(2));
            if frame.oneway {
                let (tx, rx) = oneshot::channel();
                let msg = Outbound::Request { frame, deadline, reply: Reply::Written(tx) };
                if handle.send(msg).await.is_ok() {
                    oneways.push(rx);
                }
            } else {
                let (tx, rx) = oneshot::channel();
                let msg = Outbound::Request { frame, deadline, reply: Reply::Response(tx) };
                if handle.send(msg).await.is_ok() {
                    calls.push(rx);
                }
            }
        }
        // Read what the client writes (so it never stalls), and feed it the server's bytes.
        let (mut read_half, mut write_half) = tokio::io::split(peer);
        let drain = tokio::spawn(async move {
            let mut sink = vec![0u8; 4096];
            use tokio::io::AsyncReadExt;
            while matches!(read_half.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        let _ = write_half.write_all(&server_bytes).await;
        // The driver must end by itself once the server side is gone: drop it and let time pass.
        drop(write_half);
        drop(handle);
        let _reason = tokio::time::timeout(Duration::from_secs(600), run)
            .await
            .expect("the client driver ended")
            .expect("the client driver did not panic");
        for rx in calls {
            // Exactly one answer each: the driver never drops a caller unanswered.
            let _answer: Result<_, ConnectionError> = rx.await.expect("every call answered");
        }
        for rx in oneways {
            let _ = rx.await.expect("every oneway answered");
        }
        drain.abort();
    });
}
