//! Idle connections at a scale one process cannot hold here: `--connections` split over process
//! pairs of `--per-process` each (a client process and its own server process), all open and
//! heartbeating at once, measured together.
//!
//! Why pairs: this machine's hard limit on open files is 20 000 per process and cannot be raised
//! (not even by root), so 100 000 connections need at least six processes per side. Each client
//! process dials its own server process, so one server's ephemeral-port range and accept queue
//! are not the limit either. Memory is each process's resident growth, summed, per connection;
//! CPU is every process's user + system time over one window, as % of a core.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::systems::{self, Idle, IdleSetup};

/// One client process of the run: opens its connections, says `READY rss_before rss_after`, then
/// answers each `CHECK` line with `OPEN open heartbeated` (tether: connections whose heartbeats
/// were answered since the last check; others: `-`), until its stdin closes.
pub(crate) async fn client(
    setup: IdleSetup,
    addr: std::net::SocketAddr,
    connections: usize,
    interval: Duration,
) -> Result<(), Box<dyn std::error::Error>> {
    let before = crate::rss_kib("self");
    let held = systems::open_idle(setup, addr, connections, interval).await?;
    // Settle: every connection has had a heartbeat after its call (which releases its buffers).
    tokio::time::sleep(interval + Duration::from_secs(3)).await;
    let mut acked = acked(&held);
    println!("READY {before} {}", crate::rss_kib("self"));
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim() == "CHECK" {
            let now = self::acked(&held);
            let heartbeated = match (&acked, &now) {
                (Some(a), Some(n)) => a.iter().zip(n).filter(|(a, n)| n > a).count().to_string(),
                _ => "-".into(),
            };
            acked = now;
            println!("OPEN {} {heartbeated}", held.len());
        }
    }
    Ok(())
}

/// Heartbeats answered so far on each of tether's connections (tonic does not say).
fn acked(held: &Idle) -> Option<Vec<u64>> {
    let each = |c: &rpc_client::Client| c.connections().iter().map(|c| c.heartbeats_acked()).collect::<Vec<_>>();
    match held {
        Idle::TetherEach(v) => Some(v.iter().flat_map(each).collect()),
        Idle::TetherPooled(c) => Some(each(c)),
        Idle::Tonic(_) | Idle::Tarpc(_) => None,
    }
}

pub(crate) fn header(connections: usize, per_process: usize, window: Duration, interval: Duration) {
    println!(
        "{connections} idle connections over {} client and {0} server processes ({per_process} each), each having made one call, heartbeats (HTTP/2 keepalive pings for tonic) every {interval:?}; CPU over {window:?}",
        connections.div_ceil(per_process)
    );
    println!();
    println!("| setup | open at the end | heartbeated in the window | client KiB per connection | server KiB per connection | client CPU (% of a core) | server CPU (% of a core) | CPU per 10 000 connections, client + server (% of a core) |");
    println!("|---|---|---|---|---|---|---|---|");
}

struct Pair {
    server: tokio::process::Child,
    server_pid: String,
    server_rss0: u64,
    client: tokio::process::Child,
    client_pid: String,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    client_rss: (u64, u64),
}

/// One row: `setup` over `connections / per_process` process pairs.
pub(crate) async fn row(
    setup: IdleSetup,
    connections: usize,
    per_process: usize,
    window: Duration,
    interval: Duration,
) -> Result<(), Box<dyn std::error::Error>> {
    if per_process == 0 || connections % per_process != 0 {
        return Err(format!("{connections} connections do not split into processes of {per_process}").into());
    }
    let mut pairs = Vec::new();
    for _ in 0..connections / per_process {
        let (server, server_pid, addr) = crate::spawn_server(setup.system()).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let server_rss0 = crate::rss_kib(&server_pid);
        let mut client = tokio::process::Command::new(std::env::current_exe()?)
            .arg("scale-client")
            .args([
                "--setup",
                clap::ValueEnum::to_possible_value(&setup).expect("named").get_name(),
            ])
            .args(["--addr", &addr.to_string()])
            .args(["--connections", &per_process.to_string()])
            .args(["--interval", &humantime::format_duration(interval).to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let client_pid = client.id().ok_or("client exited")?.to_string();
        let stdin = client.stdin.take().ok_or("no stdin")?;
        let lines = BufReader::new(client.stdout.take().ok_or("no stdout")?).lines();
        pairs.push(Pair {
            server,
            server_pid,
            server_rss0,
            client,
            client_pid,
            stdin,
            lines,
            client_rss: (0, 0),
        });
    }
    // The clients open their connections at the same time; each says when it has settled.
    for p in &mut pairs {
        let line = p
            .lines
            .next_line()
            .await?
            .ok_or("a client process ended before it was ready")?;
        let rss: Vec<u64> = line
            .strip_prefix("READY ")
            .ok_or_else(|| format!("unexpected line from a client process: {line}"))?
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        p.client_rss = (rss[0], rss[1]);
    }
    let (client_kib, server_kib) = pairs.iter().fold((0, 0), |(c, s), p| {
        (
            c + p.client_rss.1.saturating_sub(p.client_rss.0),
            s + crate::rss_kib(&p.server_pid).saturating_sub(p.server_rss0),
        )
    });
    // Starts the clients' count of answered heartbeats.
    check(&mut pairs).await?;
    let ticks = |pairs: &[Pair]| -> (u64, u64) {
        pairs.iter().fold((0, 0), |(c, s), p| {
            (c + crate::cpu_ticks(&p.client_pid), s + crate::cpu_ticks(&p.server_pid))
        })
    };
    let (c0, s0) = ticks(&pairs);
    tokio::time::sleep(window).await;
    let (c1, s1) = ticks(&pairs);
    let (open, heartbeated) = check(&mut pairs).await?;
    let pct = |t: u64| 100.0 * t as f64 / crate::TICKS_PER_SEC / window.as_secs_f64();
    println!(
        "| {} | {open} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
        setup.name(),
        heartbeated.map_or("-".into(), |h| h.to_string()),
        client_kib as f64 / connections as f64,
        server_kib as f64 / connections as f64,
        pct(c1 - c0),
        pct(s1 - s0),
        pct(c1 - c0 + s1 - s0) * 10_000.0 / connections as f64,
    );
    if open != connections {
        return Err(format!("{}: only {open} of {connections} connections stayed open", setup.name()).into());
    }
    for mut p in pairs {
        drop(p.stdin);
        let _ = p.client.wait().await;
        let _ = p.server.kill().await;
    }
    Ok(())
}

/// Asks every client process; returns the connections open and (tether) those whose heartbeats
/// were answered since the last check.
async fn check(pairs: &mut [Pair]) -> Result<(usize, Option<usize>), Box<dyn std::error::Error>> {
    let (mut open, mut heartbeated) = (0, Some(0));
    for p in pairs.iter_mut() {
        p.stdin.write_all(b"CHECK\n").await?;
        p.stdin.flush().await?;
        let line = p.lines.next_line().await?.ok_or("a client process ended")?;
        let mut f = line
            .strip_prefix("OPEN ")
            .ok_or_else(|| format!("unexpected line from a client process: {line}"))?
            .split_whitespace();
        open += f.next().ok_or("no count")?.parse::<usize>()?;
        heartbeated = match (heartbeated, f.next().and_then(|h| h.parse::<usize>().ok())) {
            (Some(total), Some(h)) => Some(total + h),
            _ => None,
        };
    }
    Ok((open, heartbeated))
}
