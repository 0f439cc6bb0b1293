//! What a `Client` and a server cost in memory before anyone asks for their events (issue 22):
//! measured with a counting global allocator, not timed.

#![allow(clippy::unwrap_used)]

use rpc_client::{Client, ClientConfig};

// dhat's allocator counts what is live (its heap statistics), with no unsafe code of ours.
#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn live() -> isize {
    dhat::HeapStats::get().curr_bytes as isize
}

/// A `Client` nobody subscribes to allocates no event buffer: a hundred of them (one per
/// service a process calls) cost a few KiB each, not the 96 KiB a 1,024-slot broadcast channel
/// takes. Subscribing allocates it.
#[test]
fn a_client_nobody_subscribes_to_allocates_no_event_buffer() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // A port with nothing listening (bound, then released): no connection is made.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let before = live();
        let clients: Vec<Client> = (0..100)
            .map(|_| Client::with_endpoints([addr], ClientConfig::default()).unwrap())
            .collect();
        // Their checkers have started and parked.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let each = (live() - before) / 100;
        println!("a Client with one endpoint and no connection: {each} bytes");
        // 3.3 KiB: an endpoint's state (most of a KiB) with no spare slots, the holder, the
        // checker's task and its close queue (6.5 KiB before: four endpoint slots and an
        // unbounded channel's first block).
        assert!(each < 4 * 1024, "{each} bytes per Client");
        let subscribed = live();
        let _events = clients[0].events();
        let grew = live() - subscribed;
        println!("its first subscriber: {grew} bytes");
        assert!(
            grew > 16 * 1024,
            "subscribing allocates the event buffer ({grew} bytes)"
        );
        drop(clients);
    });
}
