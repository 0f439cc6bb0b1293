//! Gray failure: endpoints whose connections are fine but whose requests are not. Heartbeats are
//! answered on the I/O task, so a server with hung handlers heartbeats perfectly; outlier
//! detection (`ClientConfig::outlier`) judges endpoints by their requests instead, and ejects the
//! bad ones for a while.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rpc_client::{Balance, Client, ClientConfig, HealthState, HedgeDelay, OutlierConfig, PoolState};
use rpc_core::event::ConnectionEvent;
use rpc_core::{Code, Request, Response, Status};
use rpc_server::{Server, ServerConfig, ServerHandle};
use tokio::sync::broadcast;
use tokio::time::Instant;

const METHOD: &str = "/o.O/Do";

/// How a test server behaves, switchable while it runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Fine,
    /// Handlers hang (until the mode changes); heartbeats are still answered.
    Hang,
    /// Every request fails at once with INTERNAL.
    FailFast,
}

struct TestServer {
    handle: ServerHandle,
    mode: Arc<Mutex<Mode>>,
    ran: Arc<AtomicUsize>,
}

impl TestServer {
    async fn start(mode: Mode) -> TestServer {
        let mode = Arc::new(Mutex::new(mode));
        let ran = Arc::new(AtomicUsize::new(0));
        let (m, r) = (mode.clone(), ran.clone());
        let handle = Server::builder()
            .config(ServerConfig {
                shutdown_grace: Duration::from_millis(100),
                ..ServerConfig::default()
            })
            .route(
                METHOD,
                rpc_server::handler_fn(move |_req: Request<Bytes>| {
                    let (m, r) = (m.clone(), r.clone());
                    async move {
                        r.fetch_add(1, Ordering::Relaxed);
                        loop {
                            let now = *m.lock().unwrap();
                            match now {
                                Mode::Fine => {
                                    tokio::time::sleep(Duration::from_millis(1)).await;
                                    return Ok(Response::new(Bytes::new()));
                                }
                                Mode::FailFast => return Err(Status::new(Code::Internal, "broken")),
                                // A handler stuck on a dead dependency: it polls its mode so a
                                // heal lets it go.
                                Mode::Hang => tokio::time::sleep(Duration::from_millis(10)).await,
                            }
                        }
                    }
                }),
            )
            .bind("127.0.0.1:0")
            .await
            .unwrap();
        TestServer { handle, mode, ran }
    }

    fn addr(&self) -> SocketAddr {
        self.handle.local_addr()
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn ran(&self) -> usize {
        self.ran.load(Ordering::Relaxed)
    }
}

fn config(outlier: OutlierConfig) -> ClientConfig {
    ClientConfig {
        request_timeout: Duration::from_millis(200),
        heartbeat: rpc_core::config::HeartbeatConfig {
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(80),
            max_failures: 3,
            ..rpc_core::config::HeartbeatConfig::default()
        },
        outlier,
        ..ClientConfig::default()
    }
}

async fn all_connected(client: &Client, n: usize) {
    tests::wait_until(Duration::from_secs(5), || {
        client
            .holder()
            .endpoints()
            .iter()
            .filter(|e| e.state == PoolState::Alive)
            .count()
            == n
    })
    .await;
}

async fn next_event(
    events: &mut broadcast::Receiver<ConnectionEvent>,
    limit: Duration,
    pred: impl Fn(&ConnectionEvent) -> bool,
) -> ConnectionEvent {
    let deadline = Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(ev)) if pred(&ev) => return ev,
            Ok(Ok(_)) => continue,
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
            Ok(Err(e)) => panic!("events ended: {e}"),
            Err(_) => panic!("no such event within {limit:?}"),
        }
    }
}

/// `callers` tasks sending requests until `count` have ended; returns (ok, failed, latencies).
async fn run(client: &Client, callers: usize, count: usize) -> (usize, usize, Vec<Duration>) {
    run_marked(client, callers, count, false).await
}

/// [`run`], with the requests marked idempotent or not.
async fn run_marked(client: &Client, callers: usize, count: usize, idempotent: bool) -> (usize, usize, Vec<Duration>) {
    let left = Arc::new(AtomicUsize::new(count));
    let results = Arc::new(Mutex::new((0usize, 0usize, Vec::new())));
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let (client, left, results) = (client.clone(), left.clone(), results.clone());
            tokio::spawn(async move {
                while left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
                {
                    let start = Instant::now();
                    let mut req = Request::for_method(METHOD, Bytes::new());
                    req.set_idempotent(idempotent);
                    let r = client.unary(req).await;
                    let mut res = results.lock().unwrap();
                    res.2.push(start.elapsed());
                    match r {
                        Ok(_) => res.0 += 1,
                        Err(_) => res.1 += 1,
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let mut res = results.lock().unwrap();
    res.2.sort();
    (res.0, res.1, std::mem::take(&mut res.2))
}

fn p99(latencies: &[Duration]) -> Duration {
    latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_handlers_hang_while_heartbeats_answer_is_ejected_then_trusted_again() {
    tests::trace();
    let servers = [
        TestServer::start(Mode::Fine).await,
        TestServer::start(Mode::Fine).await,
        TestServer::start(Mode::Hang).await,
    ];
    let outlier = OutlierConfig {
        base_ejection_time: Duration::from_secs(1),
        ..OutlierConfig::default()
    };
    let client = Client::with_endpoints(servers.iter().map(TestServer::addr), config(outlier.clone())).unwrap();
    all_connected(&client, 3).await;
    let mut events = client.events();
    let hung = servers[2].addr();

    // Four callers: the hung server is ejected after `consecutive_failures` timeouts in a row
    // (plus the ones already in flight to it then).
    let (_, failed, _) = run(&client, 4, 200).await;
    let ev = next_event(&mut events, Duration::from_secs(1), |e| {
        matches!(e, ConnectionEvent::EndpointEjected { .. })
    })
    .await;
    let ConnectionEvent::EndpointEjected { addr, reason, .. } = ev else {
        unreachable!()
    };
    assert_eq!((addr, reason), (hung, "consecutive_failures"));
    let stated = outlier.consecutive_failures as usize + 4;
    assert!(
        failed <= stated,
        "{failed} requests failed before the ejection (at most {stated})"
    );
    assert!(failed >= outlier.consecutive_failures as usize);
    eprintln!(
        "outlier: hung server ejected after {failed} failed requests (consecutive_failures {})",
        outlier.consecutive_failures
    );
    let status = client
        .holder()
        .endpoints()
        .into_iter()
        .find(|e| e.addr == hung)
        .unwrap();
    assert!(
        matches!(status.state, PoolState::Ejected { times: 1, .. }),
        "{status:?}"
    );
    assert_eq!(status.connections, 1, "its connection is fine: heartbeats answer");

    // Ejected: the error rate is back to zero and the p99 to the healthy servers'.
    let ran_before = servers[2].ran();
    let (ok, failed, latencies) = run(&client, 4, 400).await;
    assert_eq!((ok, failed), (400, 0));
    assert_eq!(servers[2].ran(), ran_before, "requests went to the ejected server");
    eprintln!("outlier: while it is ejected: 400 of 400 ok, p99 {:?}", p99(&latencies));
    assert!(
        p99(&latencies) < Duration::from_millis(100),
        "p99 {:?}",
        p99(&latencies)
    );

    // It heals; after its ejection it is on probation, then trusted, then shares the load again.
    servers[2].set(Mode::Fine);
    next_event(
        &mut events,
        Duration::from_secs(3),
        |e| matches!(e, ConnectionEvent::EndpointProbation { addr } if *addr == hung),
    )
    .await;
    let probing = tokio::spawn({
        let client = client.clone();
        async move { run(&client, 2, 400).await }
    });
    next_event(
        &mut events,
        Duration::from_secs(3),
        |e| matches!(e, ConnectionEvent::EndpointTrusted { addr } if *addr == hung),
    )
    .await;
    let (ok, failed, _) = probing.await.unwrap();
    assert_eq!((ok, failed), (400, 0));
    let before = servers[2].ran();
    run(&client, 3, 300).await;
    assert!(
        servers[2].ran() - before >= 50,
        "trusted again, it takes a share: {}",
        servers[2].ran() - before
    );
    let status = client
        .holder()
        .endpoints()
        .into_iter()
        .find(|e| e.addr == hung)
        .unwrap();
    assert_eq!((status.state, status.health), (PoolState::Alive, HealthState::Trusted));
}

async fn fail_fast_share(outlier: OutlierConfig) -> (f64, Vec<ConnectionEvent>) {
    let servers = [
        TestServer::start(Mode::Fine).await,
        TestServer::start(Mode::Fine).await,
        TestServer::start(Mode::FailFast).await,
    ];
    let mut cfg = config(outlier);
    cfg.balance = Balance::LeastInFlight;
    let client = Client::with_endpoints(servers.iter().map(TestServer::addr), cfg).unwrap();
    all_connected(&client, 3).await;
    let mut events = client.events();
    run(&client, 8, 2000).await;
    let total: usize = servers.iter().map(TestServer::ran).sum();
    let mut seen = Vec::new();
    while let Ok(ev) = events.try_recv() {
        seen.push(ev);
    }
    (servers[2].ran() as f64 / total as f64, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_fast_is_ejected_rather_than_favoured_by_least_in_flight() {
    // Without outlier detection, the endpoint that fails in no time has the fewest requests in
    // flight and draws the most load.
    let (share, _) = fail_fast_share(OutlierConfig::disabled()).await;
    assert!(share > 0.4, "control: the failing endpoint drew {:.0} %", share * 100.0);
    let (ejected_share, events) = fail_fast_share(OutlierConfig::default()).await;
    eprintln!(
        "outlier: an endpoint failing fast drew {:.1} % of 2,000 requests under least-in-flight, {:.2} % with outlier detection",
        share * 100.0,
        ejected_share * 100.0
    );
    assert!(ejected_share < 0.01, "it still drew {:.2} %", ejected_share * 100.0);
    assert!(events.iter().any(|e| matches!(
        e,
        ConnectionEvent::EndpointEjected {
            reason: "consecutive_failures",
            ..
        }
    )));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_max_ejection_percent_are_ejected_and_a_lone_endpoint_never_is() {
    // Three endpoints, all failing: 10 % of 3 allows the one that may always go, no second.
    let servers = [
        TestServer::start(Mode::FailFast).await,
        TestServer::start(Mode::FailFast).await,
        TestServer::start(Mode::FailFast).await,
    ];
    let client =
        Client::with_endpoints(servers.iter().map(TestServer::addr), config(OutlierConfig::default())).unwrap();
    all_connected(&client, 3).await;
    let (ok, failed, _) = run(&client, 4, 300).await;
    assert_eq!((ok, failed), (0, 300));
    let ejected = client
        .holder()
        .endpoints()
        .iter()
        .filter(|e| matches!(e.state, PoolState::Ejected { .. }))
        .count();
    assert_eq!(ejected, 1);
    // With a cap of 100 %, all but the last usable one go.
    let all = OutlierConfig {
        max_ejection_percent: 100,
        ..OutlierConfig::default()
    };
    let client = Client::with_endpoints(servers.iter().map(TestServer::addr), config(all)).unwrap();
    all_connected(&client, 3).await;
    run(&client, 4, 300).await;
    let states: HashMap<SocketAddr, HealthState> =
        client.holder().endpoints().iter().map(|e| (e.addr, e.health)).collect();
    let ejected = states
        .values()
        .filter(|h| matches!(h, HealthState::Ejected { .. }))
        .count();
    assert_eq!(ejected, 2, "{states:?}");

    // A lone endpoint failing every request is never ejected into "no endpoint": its callers get
    // its errors, not NO_ENDPOINT.
    let lone = TestServer::start(Mode::FailFast).await;
    let client = Client::with_endpoints([lone.addr()], config(OutlierConfig::default())).unwrap();
    all_connected(&client, 1).await;
    for _ in 0..50 {
        let e = client
            .unary(Request::for_method(METHOD, Bytes::new()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Internal, "{e}");
    }
    assert_eq!(client.holder().endpoints()[0].health, HealthState::Trusted);
}

/// A server layer that refuses every request before its handler (UNAVAILABLE, "not executed"),
/// counting the attempts that reach it: a service down behind healthy connections.
#[derive(Clone)]
struct RefuseAll(Arc<AtomicUsize>);

impl<S> tower::Layer<S> for RefuseAll {
    type Service = Refusing;
    fn layer(&self, _inner: S) -> Refusing {
        Refusing(self.0.clone())
    }
}

#[derive(Clone)]
struct Refusing(Arc<AtomicUsize>);

impl tower::Service<Request<Bytes>> for Refusing {
    type Response = Response<Bytes>;
    type Error = rpc_core::BoxError;
    type Future = std::future::Ready<Result<Response<Bytes>, rpc_core::BoxError>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<Bytes>) -> Self::Future {
        self.0.fetch_add(1, Ordering::Relaxed);
        std::future::ready(Err(Box::new(rpc_server::Refused::new(Status::new(
            Code::Unavailable,
            "down",
        )))))
    }
}

/// Requests sent by 4 callers in 2 s against 3 servers that refuse everything, and the attempts
/// that reached the servers.
async fn outage_load(budget: rpc_client::RetryBudgetConfig) -> (usize, usize) {
    let seen = Arc::new(AtomicUsize::new(0));
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(
            Server::builder()
                .layer(RefuseAll(seen.clone()))
                .route(
                    METHOD,
                    rpc_server::handler_fn(|_r: Request<Bytes>| async { Ok(Response::new(Bytes::new())) }),
                )
                .bind("127.0.0.1:0")
                .await
                .unwrap(),
        );
    }
    let mut cfg = config(OutlierConfig::disabled());
    cfg.retry_budget = budget;
    let client = Client::with_endpoints(servers.iter().map(ServerHandle::local_addr), cfg).unwrap();
    all_connected(&client, 3).await;
    let stop = Instant::now() + Duration::from_secs(2);
    let sent = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (client, sent) = (client.clone(), sent.clone());
            tokio::spawn(async move {
                while Instant::now() < stop {
                    sent.fetch_add(1, Ordering::Relaxed);
                    let e = client
                        .unary(Request::for_method(METHOD, Bytes::new()))
                        .await
                        .unwrap_err();
                    assert!(!e.may_have_executed(), "{e}");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    (sent.load(Ordering::Relaxed), seen.load(Ordering::Relaxed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_total_outage_retries_stay_within_the_budget() {
    // Without a budget every request is tried max_attempts (3) times.
    let (sent, seen) = outage_load(rpc_client::RetryBudgetConfig::unlimited()).await;
    assert!(
        seen as f64 >= sent as f64 * 2.9,
        "control: {seen} attempts for {sent} requests"
    );
    let unlimited = seen as f64 / sent as f64;
    let budget = rpc_client::RetryBudgetConfig::default();
    let (sent, seen) = outage_load(budget.clone()).await;
    // 20 % of the requests, plus the floor of 10 a second over the 10 s window.
    let floor = f64::from(budget.min_per_second) * budget.window.as_secs_f64();
    let allowed = sent as f64 * (1.0 + budget.ratio) + floor;
    eprintln!(
        "outlier: total outage, 4 callers for 2 s: {unlimited:.2} attempts per request without a budget, {:.3} with (allowed {:.3})",
        seen as f64 / sent as f64,
        allowed / sent as f64
    );
    assert!(
        seen as f64 <= allowed,
        "{seen} attempts for {sent} requests (allowed {allowed})"
    );
}

/// A server whose n-th request (from 0) takes 1 ms plus `extra_ms(n)`; `ran` counts the
/// handler runs started.
async fn delaying_server(ran: Arc<AtomicUsize>, extra_ms: fn(usize) -> u64) -> ServerHandle {
    let count = Arc::new(AtomicUsize::new(0));
    Server::builder()
        .route(
            METHOD,
            rpc_server::handler_fn(move |_r: Request<Bytes>| {
                let (ran, count) = (ran.clone(), count.clone());
                async move {
                    ran.fetch_add(1, Ordering::Relaxed);
                    let n = count.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(1 + extra_ms(n))).await;
                    Ok(Response::new(Bytes::new()))
                }
            }),
        )
        .bind("127.0.0.1:0")
        .await
        .unwrap()
}

/// Two servers answering in about 1 ms and a third 40 ms slower, all connected, under a client
/// judging 300 ms intervals with 10 latencies; `tweak` adjusts its config. Returns the servers,
/// the slow one's address and handler runs, the client and its events.
async fn one_slow_of_three(
    tweak: impl FnOnce(&mut ClientConfig),
) -> (
    Vec<ServerHandle>,
    SocketAddr,
    Arc<AtomicUsize>,
    Client,
    broadcast::Receiver<ConnectionEvent>,
) {
    let ran = Arc::new(AtomicUsize::new(0));
    let slow_ran = Arc::new(AtomicUsize::new(0));
    let servers = vec![
        delaying_server(ran.clone(), |_| 0).await,
        delaying_server(ran, |_| 0).await,
        delaying_server(slow_ran.clone(), |_| 40).await,
    ];
    let slow = servers[2].local_addr();
    let mut cfg = config(OutlierConfig {
        interval: Duration::from_millis(300),
        latency_min_requests: 10,
        ..OutlierConfig::default()
    });
    cfg.request_timeout = Duration::from_secs(2);
    tweak(&mut cfg);
    let client = Client::with_endpoints(servers.iter().map(ServerHandle::local_addr), cfg).unwrap();
    all_connected(&client, 3).await;
    let events = client.events();
    (servers, slow, slow_ran, client, events)
}

/// The first ejection in `events` is of `slow`, for latency.
async fn ejected_for_latency(events: &mut broadcast::Receiver<ConnectionEvent>, slow: SocketAddr) {
    let ev = next_event(events, Duration::from_secs(1), |e| {
        matches!(e, ConnectionEvent::EndpointEjected { .. })
    })
    .await;
    let ConnectionEvent::EndpointEjected { addr, reason, .. } = ev else {
        unreachable!()
    };
    assert_eq!((addr, reason), (slow, "latency"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_answers_but_slowly_is_ejected_for_latency() {
    let (_servers, slow, slow_ran, client, mut events) = one_slow_of_three(|_| {}).await;
    // Every request succeeds: only its latency gives the slow server away, within the first
    // 300 ms interval (about 25 requests reach it by then).
    let (ok, failed, _) = run(&client, 4, 1500).await;
    assert_eq!((ok, failed), (1500, 0));
    ejected_for_latency(&mut events, slow).await;
    let status = client
        .holder()
        .endpoints()
        .into_iter()
        .find(|e| e.addr == slow)
        .unwrap();
    assert!(matches!(status.state, PoolState::Ejected { .. }), "{status:?}");
    // Ejected (for 30 s): the p99 is the fast servers'.
    let before = slow_ran.load(Ordering::Relaxed);
    let (ok, failed, latencies) = run(&client, 4, 400).await;
    assert_eq!((ok, failed), (400, 0));
    assert_eq!(
        slow_ran.load(Ordering::Relaxed),
        before,
        "requests went to the ejected server"
    );
    eprintln!(
        "outlier: a server 40 ms slower ejected for latency; p99 after: {:?}",
        p99(&latencies)
    );
    assert!(
        p99(&latencies) < Duration::from_millis(100),
        "p99 {:?}",
        p99(&latencies)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_server_whose_every_attempt_loses_a_hedge_is_still_ejected_for_latency() {
    let (_servers, slow, _, client, mut events) = one_slow_of_three(|cfg| {
        cfg.outlier.latency_min = Duration::from_millis(5);
        // Every attempt on the slow server is hedged after 25 ms and loses: its answers never
        // come, only the time each had waited (a lower bound, 25 ms and more).
        cfg.hedge_delay = Some(HedgeDelay::After(Duration::from_millis(25)));
        cfg.retry_budget = rpc_client::RetryBudgetConfig::unlimited();
    })
    .await;
    let (ok, failed, _) = run_marked(&client, 4, 1500, true).await;
    assert_eq!((ok, failed), (1500, 0));
    ejected_for_latency(&mut events, slow).await;
}

/// Three servers; every 20th request to the `slow` one takes 200 ms more. Returns the p99 of 600
/// idempotent requests by 2 callers, and the handler runs (started, on all servers).
async fn straggler_p99(hedge_delay: Option<HedgeDelay>) -> (Duration, usize, usize) {
    let ran = Arc::new(AtomicUsize::new(0));
    let mut servers = Vec::new();
    for slow in [false, false, true] {
        let extra: fn(usize) -> u64 = if slow {
            |n| if n % 20 == 19 { 200 } else { 0 }
        } else {
            |_| 0
        };
        servers.push(delaying_server(ran.clone(), extra).await);
    }
    let mut cfg = config(OutlierConfig::default());
    cfg.request_timeout = Duration::from_secs(2);
    cfg.hedge_delay = hedge_delay;
    let client = Client::with_endpoints(servers.iter().map(ServerHandle::local_addr), cfg).unwrap();
    all_connected(&client, 3).await;
    let (ok, failed, l) = run_marked(&client, 2, 600, true).await;
    assert_eq!((ok, failed), (600, 0));
    // Losers are cancelled, not awaited: let their handlers' starts all be counted.
    client.close();
    (p99(&l), ran.load(Ordering::Relaxed), l.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedging_cuts_the_p99_a_straggler_causes_within_the_budget() {
    let (plain, plain_runs, n) = straggler_p99(None).await;
    assert_eq!(plain_runs, n, "without hedging each request runs once");
    assert!(
        plain >= Duration::from_millis(150),
        "control: the straggler sets the p99 ({plain:?})"
    );
    let (hedged, hedged_runs, n) = straggler_p99(Some(HedgeDelay::After(Duration::from_millis(20)))).await;
    let extra = hedged_runs - n;
    eprintln!(
        "outlier: one of 3 servers adds 200 ms to 5 % of its requests: p99 {plain:?} plain, {hedged:?} hedged after 20 ms; {extra} extra runs for {n} requests"
    );
    assert!(hedged < Duration::from_millis(100), "hedged p99 {hedged:?}");
    // Extra load within the budget: 20 % of the requests plus the floor (10/s over 10 s).
    assert!(extra as f64 <= n as f64 * 0.2 + 100.0, "{extra} extra runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedging_at_each_endpoints_p95_cuts_the_p99_within_the_budget() {
    let p95 = Some(HedgeDelay::P95 {
        at_least: Duration::from_millis(2),
    });
    let (hedged, hedged_runs, n) = straggler_p99(p95).await;
    let extra = hedged_runs - n;
    eprintln!(
        "outlier: one of 3 servers adds 200 ms to 5 % of its requests: p99 {hedged:?} hedged at each endpoint's p95; {extra} extra runs for {n} requests"
    );
    assert!(hedged < Duration::from_millis(100), "hedged p99 {hedged:?}");
    assert!(extra as f64 <= n as f64 * 0.2 + 100.0, "{extra} extra runs");
}
