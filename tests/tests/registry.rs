//! The etcd registry against real etcd (Debian's `etcd-server`, started by the tests on loopback):
//! registration with a lease, discovery by watch, lame-duck deregistration, a crashed server's
//! lease expiring, empty-push protection, one etcd member killed, and all of etcd down for 10 s.
//!
//! Every request here is accounted against a server-side ledger: an `Ok` from server S ran once,
//! at S; an error that says "not executed" ran nowhere; nothing ran twice.
//!
//! Without etcd installed these tests are compiled as ignored (see `tests/build.rs`); under
//! `CI=true` they always run.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rpc_client::registry::DiscoveryState;
use rpc_client::{Client, ClientConfig, ErrorKind};
use rpc_core::registry::{service_prefix, Instance, InstanceState, RegistryConfig};
use rpc_core::{Request, Response, Status};
use rpc_server::registry::RegistrationState;
use rpc_server::{Server, ServerConfig, ServerHandle};
use tests::etcd::Etcd;
use tests::proxy::{Fault, FaultProxy};
use tokio::sync::watch;
use tokio::time::Instant;

const SERVICE: &str = "reg.Ledger";
const METHOD: &str = "/reg.Ledger/Do";

/// What ran where: request key -> the servers whose handler ran it, and when each server ran its
/// first request.
#[derive(Clone, Default)]
struct Ledger {
    runs: Arc<Mutex<HashMap<u64, Vec<&'static str>>>>,
    first: Arc<Mutex<HashMap<&'static str, Instant>>>,
}

impl Ledger {
    fn record(&self, key: u64, server: &'static str) {
        self.runs.lock().unwrap().entry(key).or_default().push(server);
        self.first.lock().unwrap().entry(server).or_insert_with(Instant::now);
    }

    fn first_run(&self, server: &'static str) -> Option<Instant> {
        self.first.lock().unwrap().get(server).copied()
    }

    fn runs_at(&self, server: &'static str) -> usize {
        self.runs
            .lock()
            .unwrap()
            .values()
            .map(|v| v.iter().filter(|s| **s == server).count())
            .sum()
    }
}

/// A server of `reg.Ledger` registered in etcd as `name`.
async fn ledger_server(name: &'static str, registry: RegistryConfig, ledger: &Ledger) -> ServerHandle {
    let ledger = ledger.clone();
    Server::builder()
        .config(ServerConfig {
            shutdown_grace: Duration::from_secs(5),
            ..ServerConfig::default()
        })
        .registry(registry)
        .route(
            METHOD,
            rpc_server::handler_fn(move |req: Request<Bytes>| {
                let ledger = ledger.clone();
                async move {
                    let key = req
                        .body()
                        .get(..8)
                        .and_then(|b| b.try_into().ok())
                        .map(u64::from_be_bytes)
                        .ok_or_else(|| Status::invalid_argument("the body is an 8-byte key"))?;
                    ledger.record(key, name);
                    // A little work, so graceful leaves happen with requests in flight.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    Ok(Response::new(Bytes::from_static(name.as_bytes())))
                }
            }),
        )
        .bind("127.0.0.1:0")
        .await
        .unwrap()
}

/// Waits (up to `limit`) until `cond` holds for the watched value; returns how long it took.
async fn wait_for<T>(rx: &mut watch::Receiver<T>, limit: Duration, what: &str, cond: impl Fn(&T) -> bool) -> Duration {
    let start = Instant::now();
    match tokio::time::timeout(limit, rx.wait_for(|v| cond(v))).await {
        Ok(Ok(_)) => start.elapsed(),
        Ok(Err(_)) => panic!("{what}: the sender is gone"),
        Err(_) => panic!("{what}: not within {limit:?}"),
    }
}

async fn registered(server: &ServerHandle) {
    let mut rx = server.registration().unwrap();
    wait_for(&mut rx, Duration::from_secs(10), "registered", |s| {
        matches!(s, RegistrationState::Registered { .. })
    })
    .await;
}

fn discovery(client: &Client) -> watch::Receiver<DiscoveryState> {
    client.discovery().unwrap()
}

async fn sees(client: &Client, addrs: &[SocketAddr], limit: Duration) -> Duration {
    let mut want = addrs.to_vec();
    want.sort();
    wait_for(&mut discovery(client), limit, "client sees the endpoints", |s| {
        s.endpoints == want
    })
    .await
}

fn client_config() -> ClientConfig {
    ClientConfig {
        heartbeat: rpc_core::config::HeartbeatConfig {
            interval: Duration::from_millis(200),
            timeout: Duration::from_millis(150),
            max_failures: 2,
            ..rpc_core::config::HeartbeatConfig::default()
        },
        ..ClientConfig::default()
    }
}

/// Callers sending requests with unique keys until stopped, each outcome kept for the ledger check.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<(u64, Outcome)>>>,
}

#[derive(Debug)]
enum Outcome {
    Ok(String),
    Failed { executed: bool, error: String },
}

static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

impl Load {
    fn start(client: &Client, callers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..callers)
            .map(|_| {
                let client = client.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut outcomes = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let key = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
                        let req = Request::for_method(METHOD, Bytes::copy_from_slice(&key.to_be_bytes()))
                            .with_timeout(Duration::from_secs(2));
                        let outcome = match client.unary(req).await {
                            Ok(r) => Outcome::Ok(String::from_utf8_lossy(r.body()).into_owned()),
                            Err(e) => {
                                // A failure can come back without the caller ever waiting (no
                                // endpoint to try): pace the loop as a real caller would, or it
                                // keeps its worker thread from everything else.
                                tokio::time::sleep(Duration::from_millis(5)).await;
                                Outcome::Failed {
                                    executed: e.may_have_executed(),
                                    error: e.to_string(),
                                }
                            }
                        };
                        outcomes.push((key, outcome));
                    }
                    outcomes
                })
            })
            .collect();
        Load { stop, tasks }
    }

    /// [`Load::finish`], and every request succeeded; returns how many there were.
    async fn finish_without_failures(self, ledger: &Ledger) -> usize {
        let (ok, failed) = self.finish(ledger).await;
        assert!(
            failed.is_empty(),
            "{} of {} requests failed: {:?}",
            failed.len(),
            ok + failed.len(),
            &failed[..failed.len().min(5)]
        );
        ok
    }

    /// Stops the callers and checks every outcome against the ledger; returns (ok, failed).
    async fn finish(self, ledger: &Ledger) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut ok = 0;
        let mut failed = Vec::new();
        for t in self.tasks {
            for (key, outcome) in t.await.unwrap() {
                let ran = ledger.runs.lock().unwrap().get(&key).cloned().unwrap_or_default();
                assert!(ran.len() <= 1, "request {key} ran {} times: {ran:?}", ran.len());
                match outcome {
                    Outcome::Ok(server) => {
                        assert_eq!(ran.len(), 1, "request {key} answered by {server} but ran {ran:?}");
                        assert_eq!(ran[0], server, "request {key}: answer and ledger disagree");
                        ok += 1;
                    }
                    Outcome::Failed { executed, error } => {
                        if !executed {
                            assert!(
                                ran.is_empty(),
                                "request {key} said not executed ({error}) but ran at {ran:?}"
                            );
                        }
                        failed.push(error);
                    }
                }
            }
        }
        (ok, failed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(etcd_missing, ignore = "etcd is not installed (Debian package etcd-server)")]
async fn servers_that_register_share_the_load_a_new_one_gets_it_at_once_and_a_graceful_leave_fails_nothing() {
    tests::trace();
    let etcd = Etcd::single().await;
    let ledger = Ledger::default();
    let mut servers = Vec::new();
    for name in ["s1", "s2", "s3"] {
        servers.push(ledger_server(name, etcd.config(), &ledger).await);
    }
    for s in &servers {
        registered(s).await;
    }
    let client = Client::with_registry(SERVICE, etcd.config(), client_config())
        .await
        .unwrap();
    let addrs: Vec<SocketAddr> = servers.iter().map(ServerHandle::local_addr).collect();
    sees(&client, &addrs, Duration::from_secs(1)).await;

    let load = Load::start(&client, 8);
    tests::wait_until(Duration::from_secs(5), || {
        ["s1", "s2", "s3"].iter().all(|s| ledger.runs_at(s) >= 20)
    })
    .await;

    // A fourth registers: it takes requests within one watch round trip of its registration.
    let started = Instant::now();
    let s4 = ledger_server("s4", etcd.config(), &ledger).await;
    registered(&s4).await;
    let registered_at = Instant::now();
    tests::wait_until(Duration::from_secs(3), || ledger.first_run("s4").is_some()).await;
    let first = ledger.first_run("s4").unwrap();
    eprintln!(
        "registry: 4th server: lease confirmed {:?} after it started, first request {:?} after it started",
        registered_at - started,
        first - started
    );
    assert!(first - started < Duration::from_secs(1), "{:?}", first - started);

    // One leaves gracefully under load: deregistered (lame duck), drained, gone.
    let leaving = servers.remove(0);
    let leaving_addr = leaving.local_addr();
    leaving.shutdown().await;
    let mut remaining: Vec<SocketAddr> = servers.iter().map(ServerHandle::local_addr).collect();
    remaining.push(s4.local_addr());
    sees(&client, &remaining, Duration::from_secs(1)).await;
    let after_leave = ledger.runs_at("s1");
    tests::wait_until(Duration::from_secs(3), || ledger.runs_at("s4") >= after_leave.min(20)).await;
    assert_eq!(
        ledger.runs_at("s1"),
        after_leave,
        "s1 ran requests after its shutdown returned"
    );
    assert!(!discovery(&client).borrow().endpoints.contains(&leaving_addr));
    let keys = etcd
        .list(&service_prefix(&RegistryConfig::default().prefix, SERVICE))
        .await;
    assert_eq!(keys.len(), 3, "etcd still lists the server that left: {keys:?}");

    let ok = load.finish_without_failures(&ledger).await;
    eprintln!("registry: scale-out and graceful leave: {ok} requests, 0 failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(etcd_missing, ignore = "etcd is not installed (Debian package etcd-server)")]
async fn the_record_names_the_instance_its_protocol_and_its_labels_and_goes_with_a_graceful_leave() {
    let etcd = Etcd::single().await;
    let ledger = Ledger::default();
    let mut config = etcd.config();
    config.zone = Some("eu-1a".into());
    config.weight = 50;
    config.metadata.insert("build".into(), "42".into());
    let server = ledger_server("s1", config, &ledger).await;
    registered(&server).await;
    let prefix = service_prefix(rpc_core::registry::DEFAULT_PREFIX, SERVICE);
    let keys = etcd.list(&prefix).await;
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].0, format!("{prefix}{}", server.local_addr()));
    let record = Instance::decode(&keys[0].1).unwrap();
    assert_eq!(record.addr, server.local_addr());
    assert_eq!(record.state, InstanceState::Serving);
    assert_eq!(record.zone.as_deref(), Some("eu-1a"));
    assert_eq!(record.weight, 50);
    assert_eq!(record.protocol_version, rpc_core::frame::PROTOCOL_VERSION);
    assert_eq!(record.features, rpc_core::frame::features::ALL);
    assert_eq!(record.metadata.get("build").map(String::as_str), Some("42"));

    // A watcher sees "leaving" before the key goes.
    let mut etcd_client = etcd.client().await;
    let mut watch = etcd_client
        .watch(prefix.as_str(), Some(etcd_client::WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    let mut rx = server.registration().unwrap();
    server.shutdown().await;
    assert_eq!(
        *rx.borrow_and_update(),
        RegistrationState::Deregistered { removed: true }
    );
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let resp = tokio::time::timeout(Duration::from_secs(2), watch.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        for ev in resp.events() {
            let kv = ev.kv().unwrap();
            seen.push(match ev.event_type() {
                etcd_client::EventType::Put => format!("put {:?}", Instance::decode(kv.value()).unwrap().state),
                etcd_client::EventType::Delete => "delete".to_string(),
            });
        }
    }
    assert_eq!(seen, ["put Leaving", "delete"]);
    assert!(etcd.list(&prefix).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(etcd_missing, ignore = "etcd is not installed (Debian package etcd-server)")]
async fn a_crashed_server_leaves_the_registry_within_its_ttl_and_the_last_one_is_held_back() {
    tests::trace();
    let etcd = Etcd::single().await;
    let ledger = Ledger::default();
    let (a, b, client, load) = two_servers_under_load(&etcd, &ledger).await;
    tests::wait_until(Duration::from_secs(5), || {
        ledger.runs_at("a") >= 10 && ledger.runs_at("b") >= 10
    })
    .await;

    // `a` crashes: no deregistration; its lease expires within the TTL (2 s) and the client drops it.
    let a_addr = a.local_addr();
    let crashed = Instant::now();
    a.abort().await;
    sees(&client, &[b.local_addr()], Duration::from_secs(5)).await;
    let gone = crashed.elapsed();
    let ttl = etcd.config().ttl;
    // etcd expires leases up to about half a second late (its expiry check runs every 500 ms).
    assert!(gone <= ttl + Duration::from_secs(1), "lease outlived its TTL: {gone:?}");
    eprintln!("registry: crashed server left the client's endpoints {gone:?} after the crash (TTL {ttl:?})");
    assert!(!discovery(&client).borrow().held_back);

    // `b`, the last one, vanishes too: the update would empty the client, so it is held back.
    let b_addr = b.local_addr();
    b.abort().await;
    let mut rx = discovery(&client);
    wait_for(&mut rx, Duration::from_secs(5), "held back", |s| s.held_back).await;
    assert_eq!(rx.borrow().endpoints, vec![b_addr]);
    assert_eq!(rx.borrow().instances, 0);
    assert!(client.holder().endpoints().iter().any(|e| e.addr == b_addr));
    assert!(!client.holder().endpoints().iter().any(|e| e.addr == a_addr));

    // A new instance registers: it replaces the held-back one.
    let c = ledger_server("c", etcd.config(), &ledger).await;
    registered(&c).await;
    sees(&client, &[c.local_addr()], Duration::from_secs(2)).await;
    tests::wait_until(Duration::from_secs(5), || ledger.runs_at("c") >= 10).await;
    assert!(!discovery(&client).borrow().held_back);

    // And when it deregisters gracefully, the service really is empty: that is not held back.
    c.shutdown().await;
    sees(&client, &[], Duration::from_secs(2)).await;
    assert!(!discovery(&client).borrow().held_back);

    // The crashes fail requests in flight (may have run), nothing else; the ledger agrees with all.
    let (ok, failed) = load.finish(&ledger).await;
    eprintln!("registry: crashes: {ok} ok, {} failed", failed.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(etcd_missing, ignore = "etcd is not installed (Debian package etcd-server)")]
async fn instances_registering_while_the_client_starts_are_all_seen() {
    // The watch starts at the listing's revision: a registration between the two is not lost.
    let etcd = Etcd::single().await;
    let ledger = Ledger::default();
    for round in 0..5 {
        let mut config = etcd.config();
        config.prefix = format!("/round{round}");
        let starting = (0..6).map(|_| ledger_server("x", config.clone(), &ledger));
        let (servers, client) = tokio::join!(
            futures_util::future::join_all(starting),
            Client::with_registry(SERVICE, config.clone(), client_config())
        );
        let client = client.unwrap();
        let addrs: Vec<SocketAddr> = servers.iter().map(ServerHandle::local_addr).collect();
        sees(&client, &addrs, Duration::from_secs(5)).await;
        for s in servers {
            s.abort().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(etcd_missing, ignore = "etcd is not installed (Debian package etcd-server)")]
async fn without_etcd_a_client_fails_typed_and_a_server_serves_unregistered() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut config = RegistryConfig::new([format!("http://{dead}")]);
    config.dial_timeout = Duration::from_millis(300);
    config.request_timeout = Duration::from_millis(300);
    let started = Instant::now();
    let err = Client::with_registry(SERVICE, config.clone(), client_config())
        .await
        .unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::Registry(_)), "{err}");
    assert!(!err.may_have_executed());
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());

    let ledger = Ledger::default();
    let server = ledger_server("alone", config, &ledger).await;
    let direct = Client::with_endpoints([server.local_addr()], client_config()).unwrap();
    let resp = direct
        .unary(Request::for_method(METHOD, Bytes::copy_from_slice(&7u64.to_be_bytes())))
        .await
        .unwrap();
    assert_eq!(resp.body().as_ref(), b"alone");
    let state = server.registration().unwrap().borrow().clone();
    assert!(
        matches!(state, RegistrationState::Unregistered { last_error: Some(_) }),
        "{state:?}"
    );
    // Shutting down unregistered skips the lame duck, and does not hang on etcd.
    let stopping = Instant::now();
    server.shutdown().await;
    assert!(stopping.elapsed() < Duration::from_secs(2), "{:?}", stopping.elapsed());

    // An unspecified bind address with no advertised one cannot be registered: typed, at bind.
    let err = Server::builder()
        .registry(RegistryConfig::default())
        .route(
            METHOD,
            rpc_server::handler_fn(|_r: Request<Bytes>| async { Ok(Response::new(Bytes::new())) }),
        )
        .bind("0.0.0.0:0")
        .await
        .unwrap_err();
    assert!(matches!(err, rpc_server::ServerError::Registry(_)), "{err}");
}

/// Servers `a` and `b` registered, a client that sees both, and 4 callers loading it.
async fn two_servers_under_load(etcd: &Etcd, ledger: &Ledger) -> (ServerHandle, ServerHandle, Client, Load) {
    let a = ledger_server("a", etcd.config(), ledger).await;
    let b = ledger_server("b", etcd.config(), ledger).await;
    registered(&a).await;
    registered(&b).await;
    let client = Client::with_registry(SERVICE, etcd.config(), client_config())
        .await
        .unwrap();
    sees(&client, &[a.local_addr(), b.local_addr()], Duration::from_secs(1)).await;
    let load = Load::start(&client, 4);
    (a, b, client, load)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(etcd_missing, ignore = "etcd is not installed (Debian package etcd-server)")]
async fn one_etcd_member_killed_the_registry_keeps_working() {
    tests::trace();
    let mut etcd = Etcd::cluster(3).await;
    let ledger = Ledger::default();
    let (a, b, client, load) = two_servers_under_load(&etcd, &ledger).await;

    etcd.kill(0);
    // Registrations go on: a new server is seen, a graceful leave is seen.
    let started = Instant::now();
    let c = ledger_server("c", etcd.config(), &ledger).await;
    sees(
        &client,
        &[a.local_addr(), b.local_addr(), c.local_addr()],
        Duration::from_secs(5),
    )
    .await;
    eprintln!(
        "registry: with one of 3 etcd members killed, a new server was seen {:?} after it started",
        started.elapsed()
    );
    registered(&c).await;
    a.shutdown().await;
    sees(&client, &[b.local_addr(), c.local_addr()], Duration::from_secs(5)).await;
    // Leases keep being renewed through the other members: nothing expires after several TTLs.
    let keys_before = etcd
        .list(&service_prefix(rpc_core::registry::DEFAULT_PREFIX, SERVICE))
        .await
        .len();
    tokio::time::sleep(etcd.config().ttl * 2).await; // waiting out leases: time itself is the subject
    let keys_after = etcd
        .list(&service_prefix(rpc_core::registry::DEFAULT_PREFIX, SERVICE))
        .await
        .len();
    assert_eq!((keys_before, keys_after), (2, 2));

    load.finish_without_failures(&ledger).await;
    c.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(etcd_missing, ignore = "etcd is not installed (Debian package etcd-server)")]
async fn all_of_etcd_down_for_ten_seconds_fails_no_request_and_both_sides_recover() {
    tests::trace();
    let mut etcd = Etcd::cluster(3).await;
    let ledger = Ledger::default();
    let (a, b, client, load) = two_servers_under_load(&etcd, &ledger).await;

    etcd.kill_all();
    let mut rx = discovery(&client);
    wait_for(
        &mut rx,
        Duration::from_secs(5),
        "the client notices etcd is gone",
        |s| !s.watching,
    )
    .await;
    let mut ra = a.registration().unwrap();
    wait_for(
        &mut ra,
        Duration::from_secs(5),
        "the server notices etcd is gone",
        |s| matches!(s, RegistrationState::Unregistered { .. }),
    )
    .await;
    let before = ledger.runs_at("a") + ledger.runs_at("b");
    // Ten seconds without etcd: the outage is the subject, so it is waited out.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = ledger.runs_at("a") + ledger.runs_at("b") - before;
    assert_eq!(
        discovery(&client).borrow().endpoints.len(),
        2,
        "the client kept its endpoints"
    );
    assert!(ledger.runs_at("a") > 0 && ledger.runs_at("b") > 0);
    assert!(during > 100, "only {during} requests served during the outage");

    etcd.restart_all().await;
    let recovered = Instant::now();
    registered(&a).await;
    registered(&b).await;
    wait_for(&mut rx, Duration::from_secs(10), "the client watches again", |s| {
        s.watching
    })
    .await;
    eprintln!(
        "registry: after a 10 s etcd outage, client and servers recovered in {:?}",
        recovered.elapsed()
    );
    // The watch is real again: a new server is seen, and both old ones are registered.
    let c = ledger_server("c", etcd.config(), &ledger).await;
    registered(&c).await;
    sees(
        &client,
        &[a.local_addr(), b.local_addr(), c.local_addr()],
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        etcd.list(&service_prefix(rpc_core::registry::DEFAULT_PREFIX, SERVICE))
            .await
            .len(),
        3
    );

    let ok = load.finish_without_failures(&ledger).await;
    eprintln!("registry: etcd outage: {ok} requests, {during} of them during the outage, 0 failed");
}

/// A registry config that reaches etcd only through `proxy`.
fn through(etcd: &Etcd, proxy: &FaultProxy) -> RegistryConfig {
    let mut c = etcd.config();
    c.endpoints = vec![format!("http://{}", proxy.addr())];
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(etcd_missing, ignore = "etcd is not installed (Debian package etcd-server)")]
async fn a_server_cut_off_from_etcd_past_its_ttl_registers_again_when_it_is_back() {
    tests::trace();
    let etcd = Etcd::single().await;
    let proxy = FaultProxy::start(etcd.client_addrs()[0]).await;
    let ledger = Ledger::default();
    let a = ledger_server("a", through(&etcd, &proxy), &ledger).await;
    let b = ledger_server("b", etcd.config(), &ledger).await;
    registered(&a).await;
    registered(&b).await;
    let client = Client::with_registry(SERVICE, etcd.config(), client_config())
        .await
        .unwrap();
    sees(&client, &[a.local_addr(), b.local_addr()], Duration::from_secs(1)).await;

    // Only `a` loses etcd (etcd itself stays up, so its lease really expires).
    proxy.set(Fault::Blackhole);
    let ttl = etcd.config().ttl;
    sees(&client, &[b.local_addr()], ttl + Duration::from_secs(2)).await;
    // It serves on meanwhile.
    let direct = Client::with_endpoints([a.local_addr()], client_config()).unwrap();
    direct
        .unary(Request::for_method(
            METHOD,
            Bytes::copy_from_slice(&u64::MAX.to_be_bytes()),
        ))
        .await
        .unwrap();

    proxy.set(Fault::Pass);
    let mut state = a.registration().unwrap();
    wait_for(
        &mut state,
        Duration::from_secs(10),
        "registered under a new lease",
        |s| matches!(s, RegistrationState::Registered { registrations: 2, .. }),
    )
    .await;
    sees(&client, &[a.local_addr(), b.local_addr()], Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(etcd_missing, ignore = "etcd is not installed (Debian package etcd-server)")]
async fn the_first_etcd_member_down_at_start_is_passed_over() {
    let mut etcd = Etcd::cluster(3).await;
    etcd.kill(0);
    let ledger = Ledger::default();
    let a = ledger_server("a", etcd.config(), &ledger).await;
    registered(&a).await;
    let client = Client::with_registry(SERVICE, etcd.config(), client_config())
        .await
        .unwrap();
    sees(&client, &[a.local_addr()], Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(etcd_missing, ignore = "etcd is not installed (Debian package etcd-server)")]
async fn the_keys_go_before_the_goaway_even_when_the_shutdown_future_is_dropped() {
    let etcd = Etcd::single().await;
    let ledger = Ledger::default();
    let a = ledger_server("a", etcd.config(), &ledger).await;
    registered(&a).await;
    let key = format!(
        "{}{}",
        service_prefix(rpc_core::registry::DEFAULT_PREFIX, SERVICE),
        a.local_addr()
    );
    // An observer connected to `a` directly (it never drops it for the registry): it sees the
    // server's GOAWAY.
    let observer = Client::with_endpoints([a.local_addr()], client_config()).unwrap();
    observer.checkout(None).await.unwrap();
    let mut events = observer.events();
    let mut etcd_client = etcd.client().await;
    let mut watch = etcd_client.watch(key.as_str(), None).await.unwrap();

    // Given up on 1 ms in: the lame duck goes on without the future.
    let _ = tokio::time::timeout(Duration::from_millis(1), a.shutdown()).await;
    let deleted_at = loop {
        let resp = tokio::time::timeout(Duration::from_secs(3), watch.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if resp
            .events()
            .iter()
            .any(|e| e.event_type() == etcd_client::EventType::Delete)
        {
            break Instant::now();
        }
    };
    let goaway_at = loop {
        match tokio::time::timeout(Duration::from_secs(3), events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            rpc_core::event::ConnectionEvent::GoAwayReceived { .. } => break Instant::now(),
            _ => continue,
        }
    };
    assert!(goaway_at > deleted_at, "GOAWAY came before the keys went");
    let lame_duck = etcd.config().lame_duck;
    assert!(
        goaway_at - deleted_at >= lame_duck / 2,
        "GOAWAY only {:?} after the delete (lame duck {lame_duck:?})",
        goaway_at - deleted_at
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(etcd_missing, ignore = "etcd is not installed (Debian package etcd-server)")]
async fn a_server_shut_down_while_it_registers_leaves_no_key_behind() {
    tests::trace();
    let etcd = Etcd::single().await;
    // Every byte to and from etcd delayed, so the shutdown lands between the grant and the put.
    let proxy = FaultProxy::start(etcd.client_addrs()[0]).await;
    proxy.set(Fault::Delay(Duration::from_millis(100)));
    let mut watcher = etcd.client().await;
    let ledger = Ledger::default();
    let mut config = through(&etcd, &proxy);
    config.request_timeout = Duration::from_secs(1); // room for the delayed round trips
    config.ttl = Duration::from_secs(5);
    let a = ledger_server("a", config, &ledger).await;
    // The lease is granted, the keys not yet written.
    let granted = Instant::now();
    loop {
        if !watcher.leases().await.unwrap().leases().is_empty() {
            break;
        }
        assert!(granted.elapsed() < Duration::from_secs(5), "no lease granted");
        tokio::time::sleep(Duration::from_millis(5)).await; // polling etcd: nothing to wait on
    }
    a.shutdown().await;
    let prefix = service_prefix(rpc_core::registry::DEFAULT_PREFIX, SERVICE);
    assert!(etcd.list(&prefix).await.is_empty(), "a key outlived the shutdown");
    assert!(
        watcher.leases().await.unwrap().leases().is_empty(),
        "the lease outlived the shutdown"
    );
}
