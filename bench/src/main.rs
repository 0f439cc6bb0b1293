//! `tether-bench`: the same protobuf echo service on three systems, measured side by side in one
//! run so a shared machine's noise hits all of them alike.
//!
//! - `tether-bench run` runs the whole matrix: for each (connections, callers, payload) cell and
//!   each system, it starts that system's server as a child process, drives it from this process
//!   with a closed-loop load generator, and reports QPS, latency percentiles (hdrhistogram) and
//!   CPU microseconds per request for the client (this process) and the server (from /proc).
//! - `tether-bench server --system S` is the child.

mod open;
mod raw;
mod scale;
mod systems;
mod tarpc_sys;

use std::process::Stdio;
use std::time::Duration;

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::Instant;

use systems::{System, Target};

#[derive(Debug, Parser)]
#[command(about = "tether vs tonic vs a raw framed-TCP floor")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Everything, with the defaults: the matrix, the checkout microbenchmark, then idle
    /// connections (10 000). About 7 minutes.
    All,
    /// Run the matrix and print the tables.
    Run {
        /// Warm-up per cell.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
        warmup: Duration,
        /// Measured time per cell.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
        duration: Duration,
        /// Only these systems (default all).
        #[arg(long, value_delimiter = ',')]
        systems: Vec<System>,
        /// Only this cell, as `connections,callers,payload` (default the whole matrix); for profiling.
        #[arg(long, value_parser = parse_cell)]
        cell: Option<Cell>,
        /// Skip the checkout microbenchmark.
        #[arg(long)]
        no_checkout: bool,
    },
    /// The cost of idle connections: open N, make one call on each, heartbeat every interval,
    /// measure memory per connection and steady CPU on both sides, for each setup.
    Idle {
        /// Connections to open.
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// Steady-state window over which CPU is measured.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        window: Duration,
        /// Heartbeat (tonic: HTTP/2 keepalive ping) interval.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
        interval: Duration,
        /// Only these setups (default all; each is measured in a fresh process).
        #[arg(long, value_delimiter = ',')]
        setups: Vec<systems::IdleSetup>,
        /// Print the table's row only (the fresh process of one setup).
        #[arg(long, hide = true)]
        row: bool,
    },
    /// Idle connections beyond one process's open-file limit: `connections` split over pairs of
    /// a client process and its own server process, `per-process` each, all open and
    /// heartbeating at once, measured together.
    Scale {
        /// Connections in all.
        #[arg(long, default_value_t = 100_000)]
        connections: usize,
        /// Connections per client process (and per server process).
        #[arg(long, default_value_t = 10_000)]
        per_process: usize,
        /// Steady-state window over which CPU is measured (at least one heartbeat interval, so
        /// every connection heartbeats in it).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
        window: Duration,
        /// Heartbeat (tonic: HTTP/2 keepalive ping) interval; default tether's default.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "15s")]
        interval: Duration,
        /// Only these setups (default a tether Client per connection, and tonic).
        #[arg(long, value_delimiter = ',')]
        setups: Vec<systems::IdleSetup>,
    },
    /// One client process of `scale` (used by it).
    #[command(hide = true)]
    ScaleClient {
        #[arg(long)]
        setup: systems::IdleSetup,
        #[arg(long)]
        addr: std::net::SocketAddr,
        #[arg(long)]
        connections: usize,
        #[arg(long, value_parser = humantime::parse_duration)]
        interval: Duration,
    },
    /// Streams: server-stream messages per second at 64 B and MB/s at 16 KiB on one connection,
    /// and a bidirectional ping-pong's latency (the raw floor's ping-pong is its unary echo).
    Stream {
        /// Messages of 64 B in the server stream.
        #[arg(long, default_value_t = 300_000)]
        small: u32,
        /// Messages of 16 KiB in the server stream.
        #[arg(long, default_value_t = 30_000)]
        large: u32,
        /// Round trips in the ping-pong.
        #[arg(long, default_value_t = 20_000)]
        pings: usize,
        /// Only these systems (default all).
        #[arg(long, value_delimiter = ',')]
        systems: Vec<System>,
    },
    /// Unary latency beside a stopped stream: 64 callers on one connection, alone and then while
    /// a server stream on the same connection has a consumer that stopped reading.
    Stall {
        /// Unary callers.
        #[arg(long, default_value_t = 64)]
        callers: usize,
        /// Measured time per phase (after 1 s of warm-up each).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
        duration: Duration,
        /// Only these systems (default tether and tonic).
        #[arg(long, value_delimiter = ',')]
        systems: Vec<System>,
    },
    /// Open-loop latency: requests at fixed rates (shares of each system's own closed-loop peak,
    /// and 75 % of tonic's peak for every system), one connection, 64 B, every 100th request
    /// taking a 5 ms handler path; latency from each request's due time.
    Open {
        /// Measured time per rate (after 1 s of warm-up at that rate).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "3s")]
        duration: Duration,
        /// Shares of each system's own peak, in percent.
        #[arg(long, value_delimiter = ',', default_values_t = [25u32, 50, 75, 90])]
        rates: Vec<u32>,
        /// Every this many requests, one takes the slow path.
        #[arg(long, default_value_t = 100)]
        slow_every: u64,
        /// The slow path's handler time, ms.
        #[arg(long, default_value_t = 5)]
        slow_ms: u32,
        /// Only these systems (default tonic, tether, tarpc; the raw floor has no slow path).
        #[arg(long, value_delimiter = ',')]
        systems: Vec<System>,
    },
    /// Serve one system's echo service (used by `run`).
    Server {
        #[arg(long)]
        system: System,
        /// tether only: serve on this many listeners (the checkout benchmark's endpoints), one
        /// `LISTENING` line each.
        #[arg(long, default_value_t = 1)]
        listeners: usize,
    },
}

/// Parses `connections,callers,payload`.
fn parse_cell(s: &str) -> Result<Cell, String> {
    let n: Vec<usize> = s
        .split(',')
        .map(|v| v.trim().parse::<usize>().map_err(|e| format!("{v:?}: {e}")))
        .collect::<Result<_, _>>()?;
    match n[..] {
        [connections, callers, payload] if connections > 0 && callers > 0 => Ok(Cell {
            connections,
            callers,
            payload,
        }),
        _ => Err("expected connections,callers,payload (connections and callers at least 1)".into()),
    }
}

/// One cell of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cell {
    connections: usize,
    callers: usize,
    payload: usize,
}

const MATRIX: [Cell; 4] = [
    Cell {
        connections: 1,
        callers: 1,
        payload: 64,
    },
    Cell {
        connections: 1,
        callers: 64,
        payload: 64,
    },
    Cell {
        connections: 4,
        callers: 256,
        payload: 64,
    },
    Cell {
        connections: 1,
        callers: 64,
        payload: 16 * 1024,
    },
];

#[derive(Debug, Clone)]
struct Outcome {
    qps: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    client_cpu_us: f64,
    server_cpu_us: f64,
    errors: u64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    raise_open_files();
    match args.cmd {
        Cmd::All => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let Cmd::Run { warmup, duration, .. } = Args::parse_from(["tether-bench", "run"]).cmd else {
                unreachable!("parsed as `run`");
            };
            rt.block_on(run(warmup, duration, System::ALL.to_vec(), MATRIX.to_vec(), true))?;
            println!();
            // In a fresh process: memory the matrix freed would otherwise hide the idle cost.
            let status = std::process::Command::new(std::env::current_exe()?)
                .arg("idle")
                .status()?;
            if !status.success() {
                return Err(format!("idle measurement failed: {status}").into());
            }
            Ok(())
        }
        Cmd::Server { system, listeners } => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            if listeners > 1 {
                rt.block_on(systems::serve_tether_on(listeners))
            } else {
                rt.block_on(systems::serve(system))
            }
        }
        Cmd::Stream {
            small,
            large,
            pings,
            systems,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(streams(or_all(systems), small, large, pings))
        }
        Cmd::Open {
            duration,
            rates,
            slow_every,
            slow_ms,
            systems,
        } => {
            let systems = if systems.is_empty() {
                vec![System::Tonic, System::Tether, System::Tarpc]
            } else {
                systems
            };
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(open_loop(systems, duration, rates, slow_every.max(1), slow_ms))
        }
        Cmd::Stall {
            callers,
            duration,
            systems,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(stall(or_all(systems), callers, duration))
        }
        Cmd::Idle {
            connections,
            window,
            interval,
            setups,
            row,
        } => {
            let setups = if setups.is_empty() {
                systems::IdleSetup::ALL.to_vec()
            } else {
                setups
            };
            if !row {
                idle_header(connections, window, interval);
            }
            if let [setup] = setups[..] {
                let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
                return rt.block_on(idle(connections, window, interval, setup));
            }
            // Each in a process of its own: memory one setup freed stays in this process's
            // resident set (the allocator keeps it) and would hide the next one's cost.
            for setup in setups {
                let status = std::process::Command::new(std::env::current_exe()?)
                    .arg("idle")
                    .args(["--connections", &connections.to_string()])
                    .args(["--window", &humantime::format_duration(window).to_string()])
                    .args(["--interval", &humantime::format_duration(interval).to_string()])
                    .args([
                        "--setups",
                        clap::ValueEnum::to_possible_value(&setup).expect("named").get_name(),
                    ])
                    .arg("--row")
                    .status()?;
                if !status.success() {
                    return Err(format!("idle measurement of {} failed: {status}", setup.name()).into());
                }
            }
            Ok(())
        }
        Cmd::Scale {
            connections,
            per_process,
            window,
            interval,
            setups,
        } => {
            if window < interval {
                return Err("the window must be at least one heartbeat interval".into());
            }
            let setups = if setups.is_empty() {
                vec![systems::IdleSetup::TetherEach, systems::IdleSetup::Tonic]
            } else {
                setups
            };
            scale::header(connections, per_process, window, interval);
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            for setup in setups {
                rt.block_on(scale::row(setup, connections, per_process, window, interval))?;
            }
            Ok(())
        }
        Cmd::ScaleClient {
            setup,
            addr,
            connections,
            interval,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(scale::client(setup, addr, connections, interval))
        }
        Cmd::Run {
            warmup,
            duration,
            systems,
            cell,
            no_checkout,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(run(
                warmup,
                duration,
                or_all(systems),
                cell.map_or(MATRIX.to_vec(), |c| vec![c]),
                !no_checkout,
            ))
        }
    }
}

/// Raises this process's open-file limit (its servers inherit it) as far as the kernel lets
/// it, for the idle benchmark's connections: as root to `fs.nr_open`, else to the hard limit.
fn raise_open_files() {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    if rlimit::setrlimit(rlimit::Resource::NOFILE, nr_open, nr_open).is_err() {
        let _ = rlimit::increase_nofile_limit(u64::MAX);
    }
}

/// The systems asked for, or all of them when none were.
fn or_all(systems: Vec<System>) -> Vec<System> {
    if systems.is_empty() {
        System::ALL.to_vec()
    } else {
        systems
    }
}

async fn run(
    warmup: Duration,
    duration: Duration,
    systems: Vec<System>,
    cells: Vec<Cell>,
    checkout: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "machine: {} cores; warm-up {warmup:?}, measured {duration:?} per cell",
        std::thread::available_parallelism()?
    );
    let mut results = Vec::new();
    for &cell in &cells {
        for &system in &systems {
            let outcome = measure(system, cell, warmup, duration).await?;
            eprintln!("{system:?} {cell:?}: {outcome:?}");
            results.push((cell, system, outcome));
        }
    }
    println!();
    println!("| connections, callers, payload | system | QPS | p50 µs | p99 µs | p99.9 µs | client CPU µs/req | server CPU µs/req | errors |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (cell, system, o) in &results {
        println!(
            "| {}, {}, {} B | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {} |",
            cell.connections,
            cell.callers,
            cell.payload,
            system.name(),
            o.qps,
            o.p50_us,
            o.p99_us,
            o.p999_us,
            o.client_cpu_us,
            o.server_cpu_us,
            o.errors
        );
    }
    println!();
    println!("Ratios (targets at 1 connection, 64 callers, 64 B: QPS at least 4x tonic and 2x tarpc, CPU per request at most 1.1x the floor):");
    println!();
    println!("| connections, callers, payload | tether QPS / tonic | / tarpc | / raw floor | tether CPU / raw CPU (client + server) | tether p99 / tonic p99 | / tarpc p99 |");
    println!("|---|---|---|---|---|---|---|");
    for &cell in &cells {
        let get = |s: System| outcome(&results, cell, s).cloned();
        let Some(t) = get(System::Tether) else { continue };
        let qps = |o: Option<Outcome>| o.map_or("-".to_string(), |o| format!("{:.2}x", t.qps / o.qps));
        let p99 = |o: Option<Outcome>| o.map_or("-".to_string(), |o| format!("{:.2}", t.p99_us / o.p99_us));
        let cpu = get(System::Raw).map_or("-".to_string(), |r| {
            format!(
                "{:.2}x",
                (t.client_cpu_us + t.server_cpu_us) / (r.client_cpu_us + r.server_cpu_us)
            )
        });
        println!(
            "| {}, {}, {} B | {} | {} | {} | {} | {} | {} |",
            cell.connections,
            cell.callers,
            cell.payload,
            qps(get(System::Tonic)),
            qps(get(System::Tarpc)),
            qps(get(System::Raw)),
            cpu,
            p99(get(System::Tonic)),
            p99(get(System::Tarpc)),
        );
    }
    for &cell in &cells {
        let get = |s: System| outcome(&results, cell, s);
        if let (Some(t), Some(a)) = (get(System::Tether), get(System::TetherAdmin)) {
            println!();
            println!(
                "With the admin page open ({}, {}, {} B): QPS {:.2}x tether's without, CPU per request {:.2}x (client + server), p99 {:.2}x",
                cell.connections,
                cell.callers,
                cell.payload,
                a.qps / t.qps,
                (a.client_cpu_us + a.server_cpu_us) / (t.client_cpu_us + t.server_cpu_us),
                a.p99_us / t.p99_us,
            );
        }
    }
    if checkout {
        checkout_cost().await?;
    }
    Ok(())
}

/// What `system` did in `cell`, if it ran there.
fn outcome(results: &[(Cell, System, Outcome)], cell: Cell, system: System) -> Option<&Outcome> {
    results
        .iter()
        .find(|(c, s, _)| *c == cell && *s == system)
        .map(|(_, _, o)| o)
}

/// What one system did in the stream benchmark.
#[derive(Debug, Clone)]
struct StreamOutcome {
    small_msgs_per_s: f64,
    /// CPU per 64 B message, consumer's and producer's process (ns).
    small_client_cpu_ns: f64,
    small_server_cpu_ns: f64,
    large_mb_per_s: f64,
    ping_p50_us: f64,
    ping_p99_us: f64,
}

async fn streams(systems: Vec<System>, small: u32, large: u32, pings: usize) -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "machine: {} cores; one connection; server stream of {small} x 64 B and {large} x 16 KiB; {pings} ping-pongs of 64 B",
        std::thread::available_parallelism()?
    );
    let mut results = Vec::new();
    // tarpc has no streams; the raw floor's are a framed loop (its ping-pong is its unary echo).
    for &system in systems.iter().filter(|s| s.streams() || **s == System::Raw) {
        let (_child, pid, addr) = spawn_server(system).await?;
        // Warm-up: a short stream first.
        systems::stream_once(system, addr, 1000, 64).await?;
        let start = Instant::now();
        let (client0, server0) = (cpu_ticks("self"), cpu_ticks(&pid));
        let n = systems::stream_once(system, addr, small, 64).await?;
        let (client1, server1) = (cpu_ticks("self"), cpu_ticks(&pid));
        let small_msgs_per_s = n as f64 / start.elapsed().as_secs_f64();
        let per_msg = |ticks: u64| ticks as f64 / TICKS_PER_SEC * 1e9 / n.max(1) as f64;
        let start = Instant::now();
        let n = systems::stream_once(system, addr, large, 16 * 1024).await?;
        let large_mb_per_s = (n as f64 * 16.0 * 1024.0) / (1024.0 * 1024.0) / start.elapsed().as_secs_f64();
        let hist = systems::ping_pong(system, addr, pings).await?;
        let outcome = StreamOutcome {
            small_msgs_per_s,
            small_client_cpu_ns: per_msg(client1 - client0),
            small_server_cpu_ns: per_msg(server1 - server0),
            large_mb_per_s,
            ping_p50_us: hist.value_at_quantile(0.5) as f64,
            ping_p99_us: hist.value_at_quantile(0.99) as f64,
        };
        eprintln!("{system:?}: {outcome:?}");
        results.push((system, outcome));
    }
    println!();
    println!(
        "| system | server stream, 64 B msgs/s | 64 B CPU ns/msg, consumer + producer | server stream, 16 KiB MB/s | ping-pong p50 µs | ping-pong p99 µs |"
    );
    println!("|---|---|---|---|---|---|");
    for (system, o) in &results {
        println!(
            "| {} | {:.0} | {:.0} + {:.0} | {:.0} | {:.0} | {:.0} |",
            system.name(),
            o.small_msgs_per_s,
            o.small_client_cpu_ns,
            o.small_server_cpu_ns,
            o.large_mb_per_s,
            o.ping_p50_us,
            o.ping_p99_us
        );
    }
    let get = |s: System| results.iter().find(|(sys, _)| *sys == s).map(|r| r.1.clone());
    if let (Some(t), Some(g)) = (get(System::Tether), get(System::Tonic)) {
        println!();
        println!(
            "tether / tonic: 64 B stream {:.2}x (CPU per message {:.2}), 16 KiB stream {:.2}x, ping-pong p50 {:.2}, p99 {:.2}",
            t.small_msgs_per_s / g.small_msgs_per_s,
            (t.small_client_cpu_ns + t.small_server_cpu_ns) / (g.small_client_cpu_ns + g.small_server_cpu_ns),
            t.large_mb_per_s / g.large_mb_per_s,
            t.ping_p50_us / g.ping_p50_us,
            t.ping_p99_us / g.ping_p99_us
        );
    }
    if let (Some(t), Some(r)) = (get(System::Tether), get(System::Raw)) {
        println!(
            "tether / raw floor: 64 B stream {:.0} %, 16 KiB stream {:.0} %, ping-pong p50 {:.2}",
            100.0 * t.small_msgs_per_s / r.small_msgs_per_s,
            100.0 * t.large_mb_per_s / r.large_mb_per_s,
            t.ping_p50_us / r.ping_p50_us
        );
    }
    Ok(())
}

/// The cost of one checkout with validation (pick an alive endpoint, validate its connection:
/// open, not draining, heartbeats answered, not idle past the server's timeout), per call, with
/// 1, 3 and 1 000 endpoints of 2 connections each (their servers in a child process), and the
/// client's memory per endpoint with its connections.
async fn checkout_cost() -> Result<(), Box<dyn std::error::Error>> {
    const MOST: usize = 1000;
    let (_child, addrs) = spawn_servers(MOST).await?;
    let mut costs = Vec::new();
    for endpoints in [1usize, 3, MOST] {
        let config = rpc_client::ClientConfig {
            connections_per_endpoint: 2,
            ..Default::default()
        };
        let rss0 = rss_kib("self");
        let client = rpc_client::Client::with_endpoints(addrs[..endpoints].iter().copied(), config)?;
        client.checkout(None).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while client.holder().alive_endpoints() < endpoints || client.connections().len() < 2 * endpoints {
            if Instant::now() > deadline {
                return Err(format!("{endpoints} endpoints did not all connect within 60 s").into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let per_endpoint = rss_kib("self").saturating_sub(rss0) as f64 / endpoints as f64;
        let n = 1_000_000u32;
        let start = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(client.holder().checkout(None, None).await?);
        }
        let ns = start.elapsed().as_nanos() as f64 / f64::from(n);
        println!(
            "checkout with validation, {endpoints} endpoint(s) x 2 connections: {ns:.0} ns per call; client memory {per_endpoint:.1} KiB per endpoint (with its connections)"
        );
        costs.push(ns);
        client.close();
    }
    println!(
        "checkout at {MOST} endpoints / at 1 endpoint: {:.2}x (target: at most 2x)",
        costs[2] / costs[0]
    );
    Ok(())
}

/// Starts a tether server on `n` listeners in a child process; returns it and the addresses.
async fn spawn_servers(
    n: usize,
) -> Result<(tokio::process::Child, Vec<std::net::SocketAddr>), Box<dyn std::error::Error>> {
    let (child, _pid, addrs) = spawn_child(System::Tether, n).await?;
    Ok((child, addrs))
}

/// Starts `system`'s server as a child process; returns it, its pid and the address it printed.
async fn spawn_server(
    system: System,
) -> Result<(tokio::process::Child, String, std::net::SocketAddr), Box<dyn std::error::Error>> {
    let (child, pid, addrs) = spawn_child(system, 1).await?;
    Ok((child, pid, addrs[0]))
}

/// `system`'s server on `listeners` listeners in a child process: it, its pid and the
/// addresses it printed.
async fn spawn_child(
    system: System,
    listeners: usize,
) -> Result<(tokio::process::Child, String, Vec<std::net::SocketAddr>), Box<dyn std::error::Error>> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args([
            "server",
            "--system",
            system.name(),
            "--listeners",
            &listeners.to_string(),
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().ok_or("server exited")?.to_string();
    let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
    let mut addrs = Vec::with_capacity(listeners + 1);
    // tether-admin: its admin page's address follows, last.
    let admin = usize::from(system == System::TetherAdmin);
    while addrs.len() < listeners + admin {
        let line = lines.next_line().await?.ok_or("server printed too few addresses")?;
        if let Some(a) = line.strip_prefix("LISTENING ").or(line.strip_prefix("ADMIN ")) {
            addrs.push(a.parse()?);
        }
    }
    Ok((child, pid, addrs))
}

/// Resident memory of a process in KiB, from /proc.
fn rss_kib(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn idle_header(connections: usize, window: Duration, interval: Duration) {
    let open_files = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(0, |l| l.0);
    println!(
        "{connections} idle connections, each having made one call, heartbeats (HTTP/2 keepalive pings for tonic) every {interval:?}; CPU over {window:?}; open-file limit {open_files}"
    );
    println!();
    println!("| setup | client KiB per connection | server KiB per connection | client CPU (% of a core) | server CPU (% of a core) | CPU per 10 000 connections, client + server (% of a core) |");
    println!("|---|---|---|---|---|---|");
}

/// One row of the idle table: `setup` measured in this process.
async fn idle(
    connections: usize,
    window: Duration,
    interval: Duration,
    setup: systems::IdleSetup,
) -> Result<(), Box<dyn std::error::Error>> {
    {
        let (mut child, pid, addr) = spawn_server(setup.system()).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (client0, server0) = (rss_kib("self"), rss_kib(&pid));
        let held = systems::open_idle(setup, addr, connections, interval).await?;
        // Settle: every connection falls quiet (its buffers released) and heartbeats.
        tokio::time::sleep(Duration::from_secs(3).max(interval * 3)).await;
        let (client1, server1) = (rss_kib("self"), rss_kib(&pid));
        let (c0, s0) = (cpu_ticks("self"), cpu_ticks(&pid));
        tokio::time::sleep(window).await;
        let (c1, s1) = (cpu_ticks("self"), cpu_ticks(&pid));
        let open = held.len();
        if open != connections {
            return Err(format!("{}: only {open} of {connections} connections stayed open", setup.name()).into());
        }
        let pct = |t: u64| 100.0 * t as f64 / TICKS_PER_SEC / window.as_secs_f64();
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            setup.name(),
            client1.saturating_sub(client0) as f64 / connections as f64,
            server1.saturating_sub(server0) as f64 / connections as f64,
            pct(c1 - c0),
            pct(s1 - s0),
            pct(c1 - c0 + s1 - s0) * 10_000.0 / connections as f64,
        );
        drop(held);
        let _ = child.kill().await;
    }
    Ok(())
}

/// Clock ticks of user + system CPU time of a process, from /proc.
fn cpu_ticks(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12) // utime, stime (fields 14 and 15 of stat)
}

/// Linux's USER_HZ: /proc times are in 1/100 s on every mainstream architecture.
const TICKS_PER_SEC: f64 = 100.0;

async fn measure(
    system: System,
    cell: Cell,
    warmup: Duration,
    duration: Duration,
) -> Result<Outcome, Box<dyn std::error::Error>> {
    let (mut child, pid, addrs) = spawn_child(system, 1).await?;
    let target = Target::connect(system, addrs[0], cell.connections, cell.callers).await?;
    let _page = match addrs.get(1) {
        Some(admin) => Some(systems::PageOpen::start(&target, *admin).await?),
        None => None,
    };
    let payload = bytes::Bytes::from(vec![0x5Au8; cell.payload]);

    let warm_end = Instant::now() + warmup;
    let end = warm_end + duration;
    let load = tokio::spawn(load(&target, cell.callers, payload, warm_end, end));
    tokio::time::sleep_until(warm_end).await;
    let (client0, server0) = (cpu_ticks("self"), cpu_ticks(&pid));
    tokio::time::sleep_until(end).await;
    let (client1, server1) = (cpu_ticks("self"), cpu_ticks(&pid));
    let (hist, count, errors) = load.await??;
    drop(target);
    let _ = child.kill().await;
    let per_req = |ticks: u64| ticks as f64 / TICKS_PER_SEC * 1e6 / count.max(1) as f64;
    Ok(Outcome {
        qps: count as f64 / duration.as_secs_f64(),
        p50_us: hist.value_at_quantile(0.5) as f64,
        p99_us: hist.value_at_quantile(0.99) as f64,
        p999_us: hist.value_at_quantile(0.999) as f64,
        client_cpu_us: per_req(client1 - client0),
        server_cpu_us: per_req(server1 - server0),
        errors,
    })
}

/// A latency histogram in µs, up to a minute, 3 significant digits (every table's).
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram")
}

/// `callers` tasks calling echo back to back until `end`; what they measured after `warm_end`:
/// the latency histogram, successes and failures.
fn load(
    target: &Target,
    callers: usize,
    payload: bytes::Bytes,
    warm_end: Instant,
    end: Instant,
) -> impl std::future::Future<Output = Result<(Histogram<u64>, u64, u64), hdrhistogram::AdditionError>> + Send + 'static
{
    let tasks: Vec<_> = (0..callers)
        .map(|i| {
            let mut caller = target.caller(i);
            let payload = payload.clone();
            tokio::spawn(async move {
                let mut hist = histogram();
                let (mut count, mut errors) = (0u64, 0u64);
                loop {
                    let start = Instant::now();
                    if start >= end {
                        break;
                    }
                    let ok = caller.call(payload.clone()).await;
                    if start >= warm_end {
                        if ok {
                            hist.record(start.elapsed().as_micros().max(1) as u64).expect("record");
                            count += 1;
                        } else {
                            errors += 1;
                        }
                    }
                }
                (hist, count, errors)
            })
        })
        .collect();
    async move {
        let mut hist = histogram();
        let (mut count, mut errors) = (0u64, 0u64);
        for t in tasks {
            let (h, c, e) = t.await.expect("load task");
            hist.add(h)?;
            count += c;
            errors += e;
        }
        Ok((hist, count, errors))
    }
}

/// Unary latency beside a stopped stream: `callers` echo callers on one connection, measured
/// alone, then while a server stream of 16 KiB events on the same connection has a consumer that
/// took one event and stopped (its window spent, its sender waiting for credit).
async fn stall(systems: Vec<System>, callers: usize, duration: Duration) -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "machine: {} cores; one connection; {callers} unary callers of 64 B, {duration:?} alone, then {duration:?} beside a stopped stream",
        std::thread::available_parallelism()?
    );
    let payload = bytes::Bytes::from(vec![0x5Au8; 64]);
    let mut rows = Vec::new();
    for system in systems {
        if !system.streams() {
            continue; // the raw floor and tarpc have no streams
        }
        let (mut child, _pid, addr) = spawn_server(system).await?;
        let target = Target::connect(system, addr, 1, callers).await?;
        let mut phases = Vec::new();
        let mut stopped = None;
        for phase in 0..2 {
            if phase == 1 {
                stopped = Some(systems::stop_a_stream(&target).await?);
            }
            let warm_end = Instant::now() + Duration::from_secs(1);
            let (hist, count, errors) = load(&target, callers, payload.clone(), warm_end, warm_end + duration).await?;
            phases.push((hist, count, errors));
        }
        let stopped = stopped.ok_or("no stream")?;
        let still_stopped = stopped.still_open(&target);
        drop(stopped);
        drop(target);
        let _ = child.kill().await;
        rows.push((system, phases, still_stopped));
    }
    println!();
    println!("| system | alone p50 µs | alone p99 µs | beside a stopped stream p50 µs | p99 µs | p99 ratio | QPS alone / beside | errors | stream still stopped |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (system, phases, still) in &rows {
        let (a, b) = (&phases[0], &phases[1]);
        println!(
            "| {} | {} | {} | {} | {} | {:.2}x | {:.0} / {:.0} | {} | {} |",
            system.name(),
            a.0.value_at_quantile(0.5),
            a.0.value_at_quantile(0.99),
            b.0.value_at_quantile(0.5),
            b.0.value_at_quantile(0.99),
            b.0.value_at_quantile(0.99) as f64 / a.0.value_at_quantile(0.99).max(1) as f64,
            a.1 as f64 / duration.as_secs_f64(),
            b.1 as f64 / duration.as_secs_f64(),
            a.2 + b.2,
            still
        );
    }
    Ok(())
}

/// The open-loop table: for each system, its closed-loop peak (64 callers, no slow path), then
/// each share of it, then 75 % of tonic's peak, each rate on a fresh connection to the same
/// server process.
async fn open_loop(
    mut systems: Vec<System>,
    duration: Duration,
    rates: Vec<u32>,
    slow_every: u64,
    slow_ms: u32,
) -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "machine: {} cores; one connection, 64 B; every {slow_every}th request takes a {slow_ms} ms handler path; 1 s warm-up then {duration:?} per rate; latency from each request's due time",
        std::thread::available_parallelism()?
    );
    // tonic first: the other systems also run at 75 % of its peak.
    systems.sort_by_key(|s| *s != System::Tonic);
    let payload = bytes::Bytes::from(vec![0x5Au8; 64]);
    let mut tonic_peak = None;
    let mut rows = Vec::new();
    for system in systems {
        let (mut child, _pid, addr) = spawn_server(system).await?;
        let peak = {
            let target = Target::connect(system, addr, 1, 64).await?;
            let warm_end = Instant::now() + Duration::from_secs(1);
            let (_, count, _) = load(&target, 64, payload.clone(), warm_end, warm_end + duration).await?;
            count as f64 / duration.as_secs_f64()
        };
        if system == System::Tonic {
            tonic_peak = Some(peak);
        }
        let mut plan: Vec<(String, f64)> = rates
            .iter()
            .map(|&r| (format!("{r} % of its peak"), peak * f64::from(r) / 100.0))
            .collect();
        if let Some(t) = tonic_peak {
            plan.push(("75 % of tonic's peak".to_string(), t * 0.75));
        }
        for (label, rate) in plan {
            let target = std::sync::Arc::new(Target::connect(system, addr, 1, 1024).await?);
            let o = open::run(
                target,
                rate,
                payload.clone(),
                Duration::from_secs(1),
                duration,
                slow_every,
                slow_ms,
            )
            .await;
            eprintln!("{system:?} at {rate:.0}/s ({label}): {o:?}");
            rows.push((system, peak, label, rate, o));
        }
        let _ = child.kill().await;
    }
    println!();
    println!("| system | closed-loop peak QPS | rate | offered QPS | answered QPS | p50 µs | p99 µs | p99.9 µs | errors | generator lag p99 µs |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (system, peak, label, _, o) in &rows {
        println!(
            "| {} | {:.0} | {} | {:.0} | {:.0} | {} | {} | {} | {} | {} |",
            system.name(),
            peak,
            label,
            o.offered,
            o.achieved,
            o.p50_us,
            o.p99_us,
            o.p999_us,
            o.errors,
            o.lag_p99_us
        );
    }
    let at_tonic = |s: System| {
        rows.iter()
            .find(|(sys, _, label, _, _)| *sys == s && label.starts_with("75 % of tonic"))
            .map(|r| r.4.clone())
    };
    if let (Some(t), Some(g)) = (at_tonic(System::Tether), at_tonic(System::Tonic)) {
        println!();
        println!(
            "At 75 % of tonic's peak ({:.0}/s): tether p99 {} µs, tonic p99 {} µs: tether / tonic {:.2} (target at most 0.33); p99.9 {:.2}",
            g.offered,
            t.p99_us,
            g.p99_us,
            t.p99_us as f64 / g.p99_us.max(1) as f64,
            t.p999_us as f64 / g.p999_us.max(1) as f64
        );
    }
    if let (Some(t), Some(r)) = (at_tonic(System::Tether), at_tonic(System::Tarpc)) {
        println!(
            "At the same rate: tether / tarpc p99 {:.2}, p99.9 {:.2}",
            t.p99_us as f64 / r.p99_us.max(1) as f64,
            t.p999_us as f64 / r.p999_us.max(1) as f64
        );
    }
    Ok(())
}
