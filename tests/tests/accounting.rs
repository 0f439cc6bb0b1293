//! Accounting: the truth of every request's outcome, checked against a server-side ledger of
//! handler executions, under rotating faults (blackhole, reset, close, slow consumer, server abort
//! and graceful restart on the same port, overload bursts, idle eviction of pooled connections).
//!
//! tether promises: every request resolves exactly once, by its deadline plus a small slack; `Ok`
//! means the handler ran exactly once (for a request not marked idempotent); an error with
//! `may_have_executed() == false` means the handler ran 0 times; a non-idempotent request never
//! runs twice.
//!
//! Default 8 s; a long run is just the env var:
//! `TETHER_ACCOUNTING_SECS=120 cargo test -p tests --test accounting -- --nocapture`

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use rand::Rng;
use rpc_client::{BackoffConfig, Client, ClientConfig, Error};
use rpc_core::config::{ConnectionConfig, HeartbeatConfig};
use rpc_core::{Code, Request, Response, Status};
use rpc_server::{Server, ServerConfig, ServerHandle};
use tests::proxy::{Direction, Fault, FaultProxy};
use tokio::time::Instant;

const METHOD: &str = "/acct.A/Do";
/// Allowed lateness past a request's own deadline.
const SLACK: Duration = Duration::from_millis(250);
/// A call not resolved this long after its deadline is counted unresolved (the harness stops
/// waiting so the test always ends).
const HANG_LIMIT: Duration = Duration::from_secs(5);
/// Requests per caller at most (bounds a long run in count as well as time).
const MAX_PER_CALLER: u64 = 1_000_000;
/// Status codes the handler returns, in rotation, after recording its execution.
const HANDLER_CODES: [Code; 8] = [
    Code::ApplicationError,
    Code::Unavailable,
    Code::ServerBusy,
    Code::NotFound,
    Code::Internal,
    Code::InvalidArgument,
    Code::DeadlineExceeded,
    Code::PermissionDenied,
];

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

// ---------------------------------------------------------------------------------------------
// The request body and the server-side ledger.

/// What the handler does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Answer Ok at once.
    Ok,
    /// Sleep this many ms, then Ok.
    Sleep(u16),
    /// Return `HANDLER_CODES[i]` (after recording).
    Fail(u8),
    /// Answer Ok with a large body (fills a stalled consumer's window).
    Big,
}

fn encode(key: u64, mode: Mode) -> Bytes {
    let mut b = BytesMut::with_capacity(11);
    b.put_u64_le(key);
    let (tag, param) = match mode {
        Mode::Ok => (0u8, 0u16),
        Mode::Sleep(n) => (1, n),
        Mode::Fail(i) => (2, u16::from(i)),
        Mode::Big => (3, 0),
    };
    b.put_u8(tag);
    b.put_u16_le(param);
    b.freeze()
}

fn decode(body: &[u8]) -> Option<(u64, Mode)> {
    if body.len() != 11 {
        return None;
    }
    let key = u64::from_le_bytes(body[..8].try_into().ok()?);
    let param = u16::from_le_bytes(body[9..11].try_into().ok()?);
    let mode = match body[8] {
        0 => Mode::Ok,
        1 => Mode::Sleep(param),
        2 => Mode::Fail(u8::try_from(param).ok()?),
        3 => Mode::Big,
        _ => return None,
    };
    Some((key, mode))
}

/// Handler executions per request key, across every server (and every restart).
#[derive(Clone, Default)]
struct Ledger(Arc<Mutex<HashMap<u64, u32>>>);

impl Ledger {
    fn record(&self, key: u64) {
        *self.0.lock().unwrap().entry(key).or_default() += 1;
    }

    fn snapshot(&self) -> HashMap<u64, u32> {
        self.0.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------------------------------------
// Servers.

/// The three servers' roles.
#[derive(Debug, Clone, Copy)]
enum Role {
    /// Default limits, short write stall (slow consumer) and short shutdown grace.
    Plain,
    /// `max_concurrent_requests` 2: SERVER_BUSY under bursts.
    Overload,
    /// `idle_timeout` 150 ms: pooled connections are evicted between requests.
    Idle,
}

const ROLES: [Role; 3] = [Role::Plain, Role::Overload, Role::Idle];

fn server_config(role: Role) -> ServerConfig {
    let base = ServerConfig {
        idle_timeout: Some(Duration::from_secs(5)),
        shutdown_grace: ms(300),
        connection: ConnectionConfig {
            write_stall_timeout: ms(300),
            ..ConnectionConfig::default()
        },
        ..ServerConfig::default()
    };
    match role {
        Role::Plain => base,
        Role::Overload => ServerConfig {
            max_concurrent_requests: 2,
            ..base
        },
        Role::Idle => ServerConfig {
            idle_timeout: Some(ms(150)),
            ..base
        },
    }
}

fn big_body(key: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(128 * 1024);
    b.put_u64_le(key);
    b.resize(128 * 1024, 0xAB);
    b.freeze()
}

/// A server whose handler records every execution in `ledger` at entry, then acts on the mode.
async fn start_server(role: Role, addr: SocketAddr, ledger: Ledger) -> ServerHandle {
    let handler = rpc_server::handler_fn(move |req: Request<Bytes>| {
        let ledger = ledger.clone();
        async move {
            // Recorded when the handler runs (polled), not when the dispatcher builds it: a
            // request dropped before it started did not execute.
            let Some((key, mode)) = decode(req.body()) else {
                return Err(Status::new(Code::ProtocolError, "accounting: bad body"));
            };
            ledger.record(key);
            let ok = || {
                let mut b = BytesMut::with_capacity(8);
                b.put_u64_le(key);
                Ok(Response::new(b.freeze()))
            };
            match mode {
                Mode::Ok => ok(),
                Mode::Sleep(n) => {
                    tokio::time::sleep(ms(u64::from(n))).await;
                    ok()
                }
                Mode::Fail(i) => {
                    let code = HANDLER_CODES[usize::from(i) % HANDLER_CODES.len()];
                    Err(Status::new(code, format!("handler ran and chose {code}")))
                }
                Mode::Big => Ok(Response::new(big_body(key))),
            }
        }
    });
    let give_up = Instant::now() + Duration::from_secs(5);
    loop {
        // Rebinding the port of a server that just went away can briefly fail.
        match Server::builder()
            .config(server_config(role))
            .route(METHOD, handler.clone())
            .bind(addr)
            .await
        {
            Ok(h) => return h,
            Err(e) => {
                assert!(Instant::now() < give_up, "could not rebind {addr}: {e}");
                tokio::time::sleep(ms(20)).await;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client-side records and the check.

#[derive(Debug, Clone)]
enum Outcome {
    Ok {
        echoed: Option<u64>,
    },
    Err {
        code: Code,
        kind: &'static str,
        may_have_executed: bool,
        display: String,
    },
    /// The harness stopped waiting `HANG_LIMIT` after the deadline.
    Unresolved,
}

#[derive(Debug, Clone)]
struct Record {
    key: u64,
    client: &'static str,
    idempotent: bool,
    mode: Mode,
    timeout: Duration,
    elapsed: Duration,
    outcome: Outcome,
}

fn describe(o: &Outcome) -> String {
    match o {
        Outcome::Ok { echoed } => format!("Ok (echoed key {echoed:?})"),
        Outcome::Err {
            code,
            kind,
            may_have_executed,
            display,
        } => format!("Err {kind} {code} may_have_executed={may_have_executed}: \"{display}\""),
        Outcome::Unresolved => "unresolved".to_string(),
    }
}

fn outcome_of(result: &Result<Response<Bytes>, Error>) -> Outcome {
    match result {
        Ok(resp) => Outcome::Ok {
            echoed: resp.body().get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap())),
        },
        Err(e) => Outcome::Err {
            code: e.code(),
            kind: e.kind_str(),
            may_have_executed: e.may_have_executed(),
            display: e.to_string(),
        },
    }
}

/// The broken promises, by category.
#[derive(Default)]
struct Report {
    total: usize,
    ok: usize,
    errors: BTreeMap<String, usize>,
    not_executed_errors: usize,
    executions: u64,
    idempotent_reexecutions: u64,
    violations: Vec<(String, String)>,
}

impl Report {
    fn violation(&mut self, category: &str, detail: String) {
        self.violations.push((category.to_string(), detail));
    }

    fn by_category(&self) -> BTreeMap<&str, usize> {
        let mut m = BTreeMap::new();
        for (c, _) in &self.violations {
            *m.entry(c.as_str()).or_default() += 1;
        }
        m
    }
}

/// Checks every record against the ledger (after the servers have quiesced).
fn check(records: &[Record], issued: u64, ledger: &HashMap<u64, u32>) -> Report {
    let mut r = Report {
        total: records.len(),
        executions: ledger.values().map(|&n| u64::from(n)).sum(),
        ..Report::default()
    };
    // 1. Exactly one outcome per issued key.
    let mut per_key: HashMap<u64, usize> = HashMap::new();
    for rec in records {
        *per_key.entry(rec.key).or_default() += 1;
    }
    for key in 0..issued {
        match per_key.get(&key).copied().unwrap_or(0) {
            1 => {}
            n => r.violation("1a resolved != once", format!("key {key}: {n} outcomes")),
        }
    }
    for key in ledger.keys() {
        if *key >= issued {
            r.violation("5 executed but never issued", format!("key {key}"));
        }
    }
    for rec in records {
        let ran = ledger.get(&rec.key).copied().unwrap_or(0);
        let what = format!(
            "key {} ({}, {}, {:?}, timeout {:?}, elapsed {:?}): ran {ran}x, outcome {}",
            rec.key,
            rec.client,
            if rec.idempotent { "idempotent" } else { "non-idempotent" },
            rec.mode,
            rec.timeout,
            rec.elapsed,
            describe(&rec.outcome)
        );
        // 1. Within its own deadline plus slack.
        if rec.elapsed > rec.timeout + SLACK {
            r.violation("1b resolved after deadline + slack", what.clone());
        }
        match &rec.outcome {
            Outcome::Unresolved => r.violation("1c unresolved", what.clone()),
            Outcome::Ok { echoed } => {
                r.ok += 1;
                if *echoed != Some(rec.key) {
                    r.violation("6 Ok carried another request's answer", what.clone());
                }
                // 2. Ok => ran exactly once (non-idempotent), at least once (idempotent).
                if (!rec.idempotent && ran != 1) || (rec.idempotent && ran == 0) {
                    r.violation("2 Ok but ran != once", what.clone());
                }
            }
            Outcome::Err {
                code,
                kind,
                may_have_executed,
                ..
            } => {
                *r.errors
                    .entry(format!("{kind} {code} may_have_executed={may_have_executed}"))
                    .or_default() += 1;
                if !may_have_executed {
                    r.not_executed_errors += 1;
                    // 3. Not executed => ran 0 times.
                    if ran > 0 {
                        r.violation(&format!("3 not-executed but ran ({kind} {code})"), what.clone());
                    }
                }
            }
        }
        // 4. Non-idempotent => never more than once.
        if !rec.idempotent && ran > 1 {
            let cause = match rec.mode {
                Mode::Fail(i) => format!("handler chose {}", HANDLER_CODES[usize::from(i) % HANDLER_CODES.len()]),
                _ => "no handler error".to_string(),
            };
            r.violation(&format!("4 non-idempotent ran > 1 ({cause})"), what.clone());
        }
        if rec.idempotent && ran > 1 {
            r.idempotent_reexecutions += u64::from(ran - 1);
        }
    }
    r
}

fn print_report(r: &Report, secs: u64, faults: &BTreeMap<&str, u32>) {
    println!("accounting: {secs} s, faults injected {faults:?}");
    println!(
        "requests {}, ok {}, errors {}, of which not-executed {}; handler executions {} (idempotent re-runs {})",
        r.total,
        r.ok,
        r.total - r.ok,
        r.not_executed_errors,
        r.executions,
        r.idempotent_reexecutions
    );
    println!("errors by kind and code:");
    for (k, n) in &r.errors {
        println!("  {n:>7}  {k}");
    }
    println!("violations: {}", r.violations.len());
    for (c, n) in r.by_category() {
        println!("  {n:>7}  {c}");
    }
    // The first few of each category, then the first 20 overall.
    let mut shown: BTreeMap<&str, usize> = BTreeMap::new();
    let mut lines = 0;
    for (c, d) in &r.violations {
        let seen = shown.entry(c.as_str()).or_default();
        if *seen < 3 && lines < 40 {
            println!("  [{c}] {d}");
            *seen += 1;
            lines += 1;
        }
    }
    for (c, d) in r.violations.iter().take(20) {
        println!("  first-20 [{c}] {d}");
    }
}

// ---------------------------------------------------------------------------------------------
// Load.

fn client_config(heartbeats: bool) -> ClientConfig {
    ClientConfig {
        request_timeout: ms(400),
        connect_timeout: ms(200),
        check_interval: ms(50),
        heartbeat: if heartbeats {
            HeartbeatConfig {
                enabled: true,
                interval: ms(100),
                timeout: ms(50),
                max_failures: 2,
                ..Default::default()
            }
        } else {
            HeartbeatConfig::disabled()
        },
        backoff: BackoffConfig {
            initial: ms(50),
            multiplier: 1.6,
            jitter: 0.2,
            max: ms(300),
            ..Default::default()
        },
        // Reuse pooled connections right up to the server's idle timeout: the race with its
        // GOAWAY(idle) is part of what is checked.
        idle_margin: Duration::ZERO,
        ..ClientConfig::default()
    }
}

fn pick_mode(rng: &mut impl Rng, seq: u64) -> Mode {
    match rng.random_range(0..100) {
        0..55 => Mode::Ok,
        55..75 => Mode::Sleep(rng.random_range(1..20)),
        75..78 => Mode::Sleep(rng.random_range(200..600)), // past the deadline at times
        78..94 => Mode::Fail(u8::try_from(seq % HANDLER_CODES.len() as u64).unwrap()),
        _ => Mode::Big,
    }
}

struct Shared {
    next_key: AtomicU64,
    stop: AtomicBool,
}

/// One request: unique key, recorded outcome.
async fn one_request(client: &Client, name: &'static str, shared: &Shared, mode: Option<Mode>) -> Record {
    let key = shared.next_key.fetch_add(1, Ordering::Relaxed);
    let (idempotent, mode, timeout) = {
        let mut rng = rand::rng();
        let idempotent = rng.random_bool(0.3);
        let mode = mode.unwrap_or_else(|| pick_mode(&mut rng, key));
        (idempotent, mode, ms(rng.random_range(300..=500)))
    };
    let mut req = Request::for_method(METHOD, encode(key, mode)).with_timeout(timeout);
    req.set_idempotent(idempotent);
    let start = Instant::now();
    let outcome = match tokio::time::timeout(timeout + HANG_LIMIT, client.unary(req)).await {
        Ok(result) => outcome_of(&result),
        Err(_) => Outcome::Unresolved,
    };
    Record {
        key,
        client: name,
        idempotent,
        mode,
        timeout,
        elapsed: start.elapsed(),
        outcome,
    }
}

/// A caller: requests in a loop until stopped; `pace` spaces them (for the idle-eviction race).
fn caller(
    client: Client,
    name: &'static str,
    shared: Arc<Shared>,
    pace: Option<(u64, u64)>,
) -> tokio::task::JoinHandle<Vec<Record>> {
    tokio::spawn(async move {
        let mut out = Vec::new();
        while !shared.stop.load(Ordering::Relaxed) && (out.len() as u64) < MAX_PER_CALLER {
            let rec = one_request(&client, name, &shared, None).await;
            let failed = !matches!(rec.outcome, Outcome::Ok { .. });
            out.push(rec);
            match pace {
                Some((lo, hi)) => {
                    let gap = rand::rng().random_range(lo..=hi);
                    tokio::time::sleep(ms(gap)).await;
                }
                None if failed => tokio::time::sleep(ms(5)).await,
                None => {}
            }
        }
        out
    })
}

// ---------------------------------------------------------------------------------------------
// Faults.

const FAULTS: [&str; 8] = [
    "blackhole",
    "reset_all",
    "slow consumer",
    "abort+restart",
    "close_all",
    "overload burst",
    "shutdown+restart",
    "idle pause",
];

/// Applies one fault to target `i` and undoes it; returns its name.
async fn apply_fault(
    round: usize,
    proxies: &[FaultProxy],
    servers: &mut [Option<ServerHandle>],
    ledger: &Ledger,
    burst: &(Client, Arc<Shared>),
    burst_records: &mut Vec<tokio::task::JoinHandle<Record>>,
) -> &'static str {
    let fault = FAULTS[round % FAULTS.len()];
    let i = round % proxies.len();
    match fault {
        "blackhole" => {
            proxies[i].set(Fault::Blackhole);
            tokio::time::sleep(ms(rand::rng().random_range(250..600))).await;
            proxies[i].set(Fault::Pass);
        }
        "reset_all" => proxies[i].reset_all(),
        "close_all" => proxies[i].close_all(),
        "slow consumer" => {
            proxies[i].set(Fault::StopReading(Direction::ToClient));
            tokio::time::sleep(ms(600)).await; // past the server's 300 ms write stall
            proxies[i].set(Fault::Pass);
        }
        "abort+restart" | "shutdown+restart" => {
            let old = servers[i].take().unwrap();
            let addr = old.local_addr();
            if fault == "abort+restart" {
                old.abort().await; // killed: no GOAWAY
            } else {
                old.shutdown().await; // GOAWAY, drain within the 300 ms grace
            }
            tokio::time::sleep(ms(rand::rng().random_range(50..200))).await;
            servers[i] = Some(start_server(ROLES[i], addr, ledger.clone()).await);
        }
        "overload burst" => {
            // Slow requests at once, past the overload server's limit of 2.
            let (client, shared) = burst;
            for _ in 0..24 {
                let (client, shared) = (client.clone(), shared.clone());
                let mode = Mode::Sleep(rand::rng().random_range(20..80));
                burst_records.push(tokio::spawn(async move {
                    one_request(&client, "burst", &shared, Some(mode)).await
                }));
            }
        }
        _ => {} // idle pause: pooled connections of the paced client go idle and are evicted
    }
    fault
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_matches_the_server_ledger_under_rotating_faults() {
    tests::trace();
    let secs: u64 = std::env::var("TETHER_ACCOUNTING_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let ledger = Ledger::default();
    let mut servers = Vec::new();
    let mut proxies = Vec::new();
    for role in ROLES {
        let s = start_server(role, "127.0.0.1:0".parse().unwrap(), ledger.clone()).await;
        proxies.push(FaultProxy::start(s.local_addr()).await);
        servers.push(Some(s));
    }
    let addrs: Vec<SocketAddr> = proxies.iter().map(FaultProxy::addr).collect();
    // One client on a single endpoint, one on all three, and a paced client without heartbeats on
    // the idle server alone (its pooled connection is evicted between requests).
    let single = Client::with_endpoints([addrs[0]], client_config(true)).unwrap();
    let multi = Client::with_endpoints(addrs.clone(), client_config(true)).unwrap();
    let idle = Client::with_endpoints([addrs[2]], client_config(false)).unwrap();
    let overload = Client::with_endpoints([addrs[1]], client_config(true)).unwrap();

    let shared = Arc::new(Shared {
        next_key: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let mut callers = Vec::new();
    for _ in 0..16 {
        callers.push(caller(single.clone(), "single", shared.clone(), None));
        callers.push(caller(multi.clone(), "multi", shared.clone(), None));
    }
    for _ in 0..6 {
        callers.push(caller(idle.clone(), "idle", shared.clone(), Some((120, 180))));
    }

    let end = Instant::now() + Duration::from_secs(secs);
    let mut round = 0usize;
    let mut injected: BTreeMap<&str, u32> = BTreeMap::new();
    let mut bursts = Vec::new();
    let burst = (overload.clone(), shared.clone());
    while Instant::now() < end {
        let fault = apply_fault(round, &proxies, &mut servers, &ledger, &burst, &mut bursts).await;
        *injected.entry(fault).or_default() += 1;
        round += 1;
        tokio::time::sleep(ms(rand::rng().random_range(250..350))).await;
    }

    // Stop: faults off, callers finish their current request (each bounded by HANG_LIMIT).
    for p in &proxies {
        p.set(Fault::Pass);
    }
    shared.stop.store(true, Ordering::Relaxed);
    let mut records = Vec::new();
    for c in callers {
        records.extend(c.await.unwrap());
    }
    for b in bursts {
        records.push(b.await.unwrap());
    }
    // Quiesce: after the servers are shut down no handler can still run.
    for c in [&single, &multi, &idle, &overload] {
        c.close();
    }
    for s in servers.into_iter().flatten() {
        s.shutdown().await;
    }
    let issued = shared.next_key.load(Ordering::Relaxed);
    let ledger_now = ledger.snapshot();
    let report = check(&records, issued, &ledger_now);
    print_report(&report, secs, &injected);

    assert!(
        report.ok > report.total / 4,
        "harness sanity: too few successes ({} of {})",
        report.ok,
        report.total
    );
    assert!(
        report.violations.is_empty(),
        "{} accounting violations: {:?}",
        report.violations.len(),
        report.by_category()
    );
}
