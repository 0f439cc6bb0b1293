//! Arbitrary bytes as the first thing a server reads: a real server-side connection driver over an
//! in-memory stream must end with a typed close reason (or keep running), never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rpc_core::driver::{Dispatch, Driver, DriverConfig, Responder};
use rpc_core::frame::{RequestFrame, ResponseFrame};
use rpc_core::metrics::Side;
use rpc_core::Status;
use tokio::io::AsyncWriteExt;

struct Busy;

impl Dispatch for Busy {
    fn dispatch(
        &mut self,
        _request: RequestFrame,
        _received_at: tokio::time::Instant,
        responder: Responder,
        _stream: Option<rpc_core::driver::StreamIo>,
        _tasks: &tokio_util::task::TaskTracker,
    ) -> Option<ResponseFrame> {
        responder.immediate(Status::busy("fuzz"))
    }
}

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().expect("runtime");
    rt.block_on(async {
        let (mut peer, server_side) = tokio::io::duplex(64 * 1024);
        let mut cfg = DriverConfig::new(Side::Server);
        cfg.idle_timeout = Some(std::time::Duration::from_secs(1));
        cfg.linger = std::time::Duration::from_millis(10);
        let (_handle, driver) = Driver::server(server_side, cfg, Busy);
        let run = tokio::spawn(driver.run());
        let _ = peer.write_all(data).await;
        drop(peer);
        // Idle timeout and linger are bounded, and time is paused: this always finishes.
        let _reason = run.await.expect("driver did not panic");
    });
});
