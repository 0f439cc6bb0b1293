//! Real-kernel fault suite: tether across two network namespaces, faults made for real (nftables
//! drop rules, SIGKILL, SIGSTOP), detection and recovery measured against the configured bounds.
//!
//! Needs Linux, root, iproute2 and nftables; under `CI=true` a missing prerequisite fails the
//! suite, elsewhere it is skipped with the reason. Each case writes a row to
//! `target/<profile>/liveness-report.md`.
//!
//! Settings used throughout: client heartbeats every 500 ms idle, 250 ms timeout, 3 failures
//! (bound 1.25 s); request timeout 1 s; connect timeout 500 ms; server idle timeout 3 s; write
//! stall timeout 1 s; TCP keepalive 2 s + 2 × 1 s; TCP_USER_TIMEOUT 3 s unless a case says otherwise.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::Value;
use tests::netns::{is_event, report, secs, skip_unless_ready, Hosts, Probe, Row};
use tokio::time::Instant;

const HEARTBEAT_BOUND: Duration = Duration::from_millis(1250);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const IDLE_TIMEOUT: Duration = Duration::from_secs(3);
/// Scheduling, process start-up and retransmission-timer granularity on a shared 2-core machine.
const SLACK: Duration = Duration::from_millis(500);

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// `defaults` as `--flag value` pairs, with any flag that `extra` also names left to `extra`.
fn merge(defaults: &[(&str, &str)], extra: &[&str]) -> Vec<String> {
    let mut a = Vec::new();
    for (flag, value) in defaults {
        if !extra.contains(flag) {
            a.push(flag.to_string());
            a.push(value.to_string());
        }
    }
    a.extend(s(extra));
    a
}

const KEEPALIVE: [(&str, &str); 4] = [
    ("--keepalive-time", "2s"),
    ("--keepalive-interval", "1s"),
    ("--keepalive-retries", "2"),
    ("--user-timeout", "3s"),
];

fn server_args(h: &Hosts, extra: &[&str]) -> Vec<String> {
    let addr = h.server_addr();
    let mut d = vec![
        ("--addr", addr.as_str()),
        ("--idle-timeout", "3s"),
        ("--write-stall-timeout", "1s"),
    ];
    d.extend(KEEPALIVE);
    let mut a = merge(&d, extra);
    a.push("--json".into());
    a
}

fn client_args(h: &Hosts, rate: u32, duration: &str, extra: &[&str]) -> Vec<String> {
    let addr = h.server_addr();
    let rate = rate.to_string();
    let mut d = vec![
        ("--addr", addr.as_str()),
        ("--rate", rate.as_str()),
        ("--duration", duration),
        ("--request-timeout", "1s"),
        ("--connect-timeout", "500ms"),
        ("--heartbeat-interval", "500ms"),
        ("--heartbeat-timeout", "250ms"),
        ("--heartbeat-max-failures", "3"),
    ];
    d.extend(KEEPALIVE);
    let mut a = merge(&d, extra);
    a.push("--json".into());
    a
}

async fn start_server(h: &Hosts, extra: &[&str]) -> Probe {
    let mut p = h.spawn(&h.server_ns, "echo-server", &server_args(h, extra));
    assert!(
        p.wait(Duration::from_secs(5), |v| is_event(v, "listening"))
            .await
            .is_some(),
        "server did not start"
    );
    p
}

/// Starts the server and a client with steady load, and returns once traffic flows.
async fn running(h: &Hosts, server_extra: &[&str], rate: u32, duration: &str, client_extra: &[&str]) -> (Probe, Probe) {
    let server = start_server(h, server_extra).await;
    let mut client = h.spawn(
        &h.client_ns,
        "echo-client",
        &client_args(h, rate, duration, client_extra),
    );
    client
        .wait(Duration::from_secs(5), ok_request)
        .await
        .expect("traffic flows");
    tokio::time::sleep(Duration::from_millis(500)).await; // steady state before the fault
    (server, client)
}

fn is_closed(v: &Value) -> bool {
    is_event(v, "closed")
}

fn ok_request(v: &Value) -> bool {
    is_event(v, "request") && v["outcome"] == "ok"
}

/// Waits for the first successful request that completed after `after`.
async fn recovered_after(client: &mut Probe, after: Instant, limit: Duration) -> Option<Duration> {
    if let Some((t, _)) = client.matching(ok_request).find(|(t, _)| *t > after) {
        return Some(*t - after);
    }
    let deadline = after + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (t, _) = client.wait(left, ok_request).await?;
        if t > after {
            return Some(t - after);
        }
    }
}

/// Reads the client to its summary; checks every request resolved, and (unless the client itself
/// was frozen) none later than its deadline plus slack. Returns the unresolved count.
async fn finish_client(client: &mut Probe, check_latency: bool) -> u64 {
    let summary = client
        .wait(Duration::from_secs(30), |v| is_event(v, "summary"))
        .await
        .expect("client summary");
    client.finish(Duration::from_secs(2)).await;
    let sent = summary.1["sent"].as_u64().unwrap();
    let unresolved = summary.1["unresolved"].as_u64().unwrap();
    let requests = client.matching(|v| is_event(v, "request")).count() as u64;
    assert_eq!(requests, sent, "one outcome line per request sent");
    assert_eq!(unresolved, 0, "requests unresolved: {}", summary.1);
    if check_latency {
        for (_, v) in client.matching(|v| is_event(v, "request")) {
            let latency = Duration::from_secs_f64(v["latency_ms"].as_f64().unwrap() / 1e3);
            assert!(
                latency <= REQUEST_TIMEOUT + SLACK,
                "request resolved after its deadline: {v}"
            );
        }
    }
    unresolved
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_between_the_hosts() {
    if skip_unless_ready() {
        return;
    }
    let h = Hosts::new(1);
    let (mut server, mut client) = running(&h, &[], 20, "9s", &[]).await;

    h.drop_all();
    let t0 = Instant::now();
    let (tc, cv) = client
        .wait(HEARTBEAT_BOUND + SLACK * 2, is_closed)
        .await
        .expect("client detects");
    assert_eq!(cv["reason"], "heartbeat_timeout", "{cv}");
    let client_detect = tc - t0;
    let (ts, sv) = server
        .wait(IDLE_TIMEOUT + SLACK * 2, is_closed)
        .await
        .expect("server detects");
    let server_detect = ts - t0;
    assert!(client_detect <= HEARTBEAT_BOUND + SLACK, "client {client_detect:?}");
    assert!(
        server_detect <= IDLE_TIMEOUT + SLACK,
        "server {server_detect:?} ({})",
        sv["reason"]
    );

    h.heal();
    let healed = Instant::now();
    let recovery = recovered_after(&mut client, healed, Duration::from_secs(5))
        .await
        .expect("traffic resumes");
    let unresolved = finish_client(&mut client, true).await;
    report(Row {
        fault: "power loss (all packets dropped)",
        bound: format!("client {}; server {}", secs(HEARTBEAT_BOUND), secs(IDLE_TIMEOUT)),
        client: format!("{} (heartbeat_timeout)", secs(client_detect)),
        server: format!("{} ({})", secs(server_detect), sv["reason"].as_str().unwrap_or("?")),
        recovery: secs(recovery),
        unresolved,
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nat_forgets_the_flow_of_a_quiet_connection() {
    if skip_unless_ready() {
        return;
    }
    let h = Hosts::new(2);
    let mut server = start_server(&h, &[]).await;
    let mut client = h.spawn(&h.client_ns, "echo-client", &client_args(&h, 2, "8s", &[]));
    let (_, connected) = server
        .wait(Duration::from_secs(5), |v| is_event(v, "connected"))
        .await
        .expect("connected");
    let port: u16 = connected["peer"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    client
        .wait(Duration::from_secs(5), ok_request)
        .await
        .expect("traffic flows");
    tokio::time::sleep(Duration::from_secs(1)).await;

    h.drop_flow(port); // only the established flow: new connections still pass
    let t0 = Instant::now();
    let (tc, cv) = client
        .wait(HEARTBEAT_BOUND + SLACK * 2, is_closed)
        .await
        .expect("client detects");
    assert_eq!(cv["reason"], "heartbeat_timeout", "{cv}");
    let client_detect = tc - t0;
    assert!(client_detect <= HEARTBEAT_BOUND + SLACK, "client {client_detect:?}");
    let recovery = recovered_after(&mut client, tc, Duration::from_secs(3))
        .await
        .expect("a new flow works");
    let (ts, sv) = server
        .wait(IDLE_TIMEOUT + SLACK * 2, |v| {
            is_closed(v) && v["conn"] == connected["conn"]
        })
        .await
        .expect("server evicts");
    let server_detect = ts - t0;
    assert!(server_detect <= IDLE_TIMEOUT + SLACK, "server {server_detect:?}");
    let unresolved = finish_client(&mut client, true).await;
    report(Row {
        fault: "NAT forgets the flow",
        bound: format!("client {}; server {}", secs(HEARTBEAT_BOUND), secs(IDLE_TIMEOUT)),
        client: format!("{} (heartbeat_timeout)", secs(client_detect)),
        server: format!("{} ({})", secs(server_detect), sv["reason"].as_str().unwrap_or("?")),
        recovery: format!("{} (new flow)", secs(recovery)),
        unresolved,
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_process_killed_and_restarted() {
    if skip_unless_ready() {
        return;
    }
    let h = Hosts::new(3);
    let (server, mut client) = running(&h, &[], 20, "8s", &[]).await;

    server.signal("KILL");
    let t0 = Instant::now();
    let (tc, cv) = client.wait(SLACK * 2, is_closed).await.expect("client detects");
    let client_detect = tc - t0;
    assert!(matches!(cv["reason"].as_str(), Some("peer_closed" | "reset")), "{cv}");
    assert!(client_detect <= SLACK, "client {client_detect:?}");
    drop(server);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _restarted = start_server(&h, &[]).await;
    let up = Instant::now();
    // Reconnect backoff: 1 s, 1.6 s, ... ±20 %; the server was down about 1 s.
    let bound = Duration::from_millis(1600 * 12 / 10) + CONNECT_TIMEOUT;
    let recovery = recovered_after(&mut client, up, Duration::from_secs(6))
        .await
        .expect("traffic resumes");
    assert!(recovery <= bound + SLACK, "recovery {recovery:?}");
    let unresolved = finish_client(&mut client, true).await;
    report(Row {
        fault: "server SIGKILL, restarted after 1 s",
        bound: format!("client immediate; recovery {}", secs(bound)),
        client: format!("{} ({})", secs(client_detect), cv["reason"].as_str().unwrap_or("?")),
        server: "—".into(),
        recovery: secs(recovery),
        unresolved,
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_process_frozen_then_resumed() {
    if skip_unless_ready() {
        return;
    }
    let h = Hosts::new(4);
    let (mut server, mut client) = running(&h, &[], 20, "9s", &[]).await;

    server.signal("STOP"); // its kernel still acknowledges: only application liveness can see it
    let t0 = Instant::now();
    let (tc, cv) = client
        .wait(HEARTBEAT_BOUND + SLACK * 2, is_closed)
        .await
        .expect("client detects");
    assert_eq!(cv["reason"], "heartbeat_timeout", "{cv}");
    let client_detect = tc - t0;
    assert!(client_detect <= HEARTBEAT_BOUND + SLACK, "client {client_detect:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.signal("CONT");
    let resumed = Instant::now();
    let recovery = recovered_after(&mut client, resumed, Duration::from_secs(6))
        .await
        .expect("traffic resumes");
    let (ts, sv) = server
        .wait(SLACK * 2, is_closed)
        .await
        .expect("server sees the old connection gone");
    let unresolved = finish_client(&mut client, true).await;
    report(Row {
        fault: "server SIGSTOP for 3 s",
        bound: format!("client {}", secs(HEARTBEAT_BOUND)),
        client: format!("{} (heartbeat_timeout)", secs(client_detect)),
        server: format!(
            "{} after resume ({})",
            secs(ts - resumed),
            sv["reason"].as_str().unwrap_or("?")
        ),
        recovery: format!("{} after resume", secs(recovery)),
        unresolved,
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_window_client_stops_reading_large_responses() {
    if skip_unless_ready() {
        return;
    }
    let h = Hosts::new(5);
    // Handlers take 300 ms, so requests are always waiting on the server; small socket buffers on
    // both sides, so their 256 KiB answers cannot all fit in the kernels once the client stops.
    let server_extra = ["--handler-delay", "300ms", "--send-buffer", "65536"];
    let extra = ["--reply-size", "262144", "--recv-buffer", "65536"];
    let (mut server, mut client) = running(&h, &server_extra, 20, "10s", &extra).await;

    client.signal("STOP"); // the client's kernel fills its receive window, then advertises zero
    let t0 = Instant::now();
    let stall = Duration::from_secs(1);
    // The answers pending at the freeze fill both kernels' buffers within the handler delay.
    let fill = Duration::from_millis(300);
    let (ts, sv) = server
        .wait(stall + fill + SLACK, is_closed)
        .await
        .expect("server closes the slow consumer");
    assert_eq!(sv["reason"], "slow_consumer", "{sv}");
    let server_detect = ts - t0;
    client.signal("CONT");
    let resumed = Instant::now();
    let recovery = recovered_after(&mut client, resumed, Duration::from_secs(5))
        .await
        .expect("traffic resumes");
    // The client was frozen, so its own deadlines could not fire on time: check resolution only.
    let unresolved = finish_client(&mut client, false).await;
    report(Row {
        fault: "zero window (client SIGSTOP, 256 KiB replies)",
        bound: format!("server write stall {} after the buffers fill", secs(stall)),
        client: "frozen".into(),
        server: format!("{} (slow_consumer)", secs(server_detect)),
        recovery: format!("{} after resume", secs(recovery)),
        unresolved,
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syn_blackholed_while_connecting() {
    if skip_unless_ready() {
        return;
    }
    let h = Hosts::new(6);
    let _server = start_server(&h, &[]).await;
    h.drop_syn();
    let mut client = h.spawn(&h.client_ns, "echo-client", &client_args(&h, 5, "7s", &[]));
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Every request ended by the connect timeout (or at once while backing off), never by hanging.
    let failures: Vec<Duration> = client
        .matching(|v| is_event(v, "request"))
        .map(|(_, v)| Duration::from_secs_f64(v["latency_ms"].as_f64().unwrap() / 1e3))
        .collect();
    let longest = failures.iter().max().copied().unwrap_or_default();
    h.heal();
    let healed = Instant::now();
    let recovery = recovered_after(&mut client, healed, Duration::from_secs(6))
        .await
        .expect("connects once SYNs pass");
    assert!(!failures.is_empty());
    assert!(
        longest <= CONNECT_TIMEOUT + SLACK,
        "a request waited {longest:?} on a blackholed connect"
    );
    for (_, v) in client.matching(|v| is_event(v, "request") && v["outcome"] == "error") {
        assert_eq!(v["may_have_executed"], false, "never connected, never executed: {v}");
    }
    let unresolved = finish_client(&mut client, true).await;
    report(Row {
        fault: "SYN blackholed during connect",
        bound: format!("connect timeout {}", secs(CONNECT_TIMEOUT)),
        client: format!("longest wait {}", secs(longest)),
        server: "—".into(),
        recovery: secs(recovery),
        unresolved,
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_in_flight_under_total_loss_ends_at_tcp_user_timeout_with_heartbeats_off() {
    if skip_unless_ready() {
        return;
    }
    let h = Hosts::new(7);
    let user_timeout = Duration::from_secs(2);
    let extra = [
        "--no-heartbeat",
        "--keepalive-time",
        "off",
        "--user-timeout",
        "2s",
        "--request-timeout",
        "30s",
    ];
    let (_server, mut client) = running(&h, &["--idle-timeout", "off"], 5, "9s", &extra).await;

    h.drop_all();
    let t0 = Instant::now();
    // The kernel checks the user timeout when a retransmission timer fires (200 ms, doubling).
    let rto_slack = Duration::from_secs(2);
    let (tc, cv) = client
        .wait(user_timeout + rto_slack + SLACK, is_closed)
        .await
        .expect("kernel ends the connection");
    assert_eq!(cv["reason"], "timed_out", "{cv}");
    let client_detect = tc - t0;
    h.heal();
    let recovery = recovered_after(&mut client, Instant::now(), Duration::from_secs(5))
        .await
        .expect("traffic resumes");
    let summary = client
        .wait(Duration::from_secs(30), |v| is_event(v, "summary"))
        .await
        .expect("summary");
    assert_eq!(summary.1["unresolved"], 0);
    client.finish(Duration::from_secs(2)).await;
    report(Row {
        fault: "total loss, data in flight, heartbeats off",
        bound: format!("TCP_USER_TIMEOUT {} (+ retransmission timer)", secs(user_timeout)),
        client: format!("{} (timed_out)", secs(client_detect)),
        server: "—".into(),
        recovery: secs(recovery),
        unresolved: 0,
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_with_every_liveness_mechanism_off_the_connection_stays_established() {
    if skip_unless_ready() {
        return;
    }
    let h = Hosts::new(8);
    let off = [
        "--idle-timeout",
        "off",
        "--keepalive-time",
        "off",
        "--user-timeout",
        "off",
    ];
    let extra = [
        "--no-heartbeat",
        "--keepalive-time",
        "off",
        "--user-timeout",
        "off",
        "--request-timeout",
        "30s",
    ];
    let (_server, mut client) = running(&h, &off, 5, "10s", &extra).await;

    h.drop_all();
    let watch = Duration::from_secs(6);
    // What the seed incidents describe: nothing notices.
    assert!(
        client.wait(watch, is_closed).await.is_none(),
        "something detected the loss with everything off"
    );
    let established = h.client_established();
    assert!(
        established.iter().any(|l| l.contains(&h.server_addr())),
        "the dead connection should still be ESTABLISHED: {established:?}"
    );
    report(Row {
        fault: "control: power loss with heartbeats, keepalive, user timeout all off",
        bound: "none (kernel default ~15 min)".into(),
        client: format!("not detected in {} (still ESTABLISHED)", secs(watch)),
        server: "not detected".into(),
        recovery: "—".into(),
        unresolved: 0,
    });
    let _ = client.child.kill().await;
}
