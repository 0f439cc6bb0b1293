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
//! The stream cases give the server the clients' heartbeat settings too (it heartbeats only while
//! a stream or handler runs, since idle eviction waits for those), and hold a Feed.Watch stream of
//! an event every 100 ms beside a unary load.

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
        "--no-heartbeat",
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

/// Server heartbeats as the clients': 500 ms / 250 ms / 3 (sent only while streams or handlers run).
const SERVER_HEARTBEATS: [&str; 6] = [
    "--heartbeat-interval",
    "500ms",
    "--heartbeat-timeout",
    "250ms",
    "--heartbeat-max-failures",
    "3",
];

/// A client holding a Watch stream (an event every `interval`) beside `rate` unary requests a second.
const STREAM: [&str; 2] = ["--stream-interval", "100ms"];

fn is_stream_end(v: &Value) -> bool {
    is_event(v, "stream_end")
}

fn stream_message(v: &Value) -> bool {
    is_event(v, "stream_message")
}

/// `base` (`--flag value` pairs) with each flag `extra` also names left to `extra`.
fn overridden<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
    let mut out: Vec<&str> = base
        .chunks(2)
        .filter(|pair| !extra.contains(&pair[0]))
        .flatten()
        .copied()
        .collect();
    out.extend_from_slice(extra);
    out
}

/// Starts a server with heartbeats and a client with a stream and unary load; returns once both flow.
async fn streaming(h: &Hosts, server_extra: &[&str], duration: &str, client_extra: &[&str]) -> (Probe, Probe) {
    let server_flags = overridden(&SERVER_HEARTBEATS, server_extra);
    let client_flags = overridden(&STREAM, client_extra);
    let (server, mut client) = running(h, &server_flags, 5, duration, &client_flags).await;
    client
        .wait(Duration::from_secs(5), stream_message)
        .await
        .expect("the stream flows");
    (server, client)
}

/// The server closed no connection before the client printed its summary (after which it closes
/// its own). Judged by the processes' own clocks (`t_ms`, one machine): the order in which the
/// test happens to read the two processes' lines says nothing.
fn assert_no_close_before_the_end(server: &mut Probe, client: &mut Probe) {
    let (_, summary) = client
        .matching(|v| is_event(v, "summary"))
        .next()
        .cloned()
        .expect("summary");
    let end = summary["t_ms"].as_u64().expect("summary time");
    let early: Vec<_> = server
        .matching(is_closed)
        .filter(|(_, v)| v["t_ms"].as_u64().is_some_and(|t| t < end))
        .collect();
    assert!(early.is_empty(), "a stalled stream closed its connection: {early:?}");
}

/// The first stream event of a stream opened after `after` (the stream reopened and flows).
async fn stream_back_after(client: &mut Probe, after: Instant, limit: Duration) -> Option<Duration> {
    let reopened = |v: &Value| stream_message(v) && v["stream"].as_u64() > Some(1);
    if let Some((t, _)) = client.matching(reopened).find(|(t, _)| *t > after) {
        return Some(*t - after);
    }
    let (t, _) = client.wait(limit, reopened).await?;
    Some(t.saturating_duration_since(after))
}

/// Power loss during a server stream: the client ends the stream with the connection's reason
/// within its heartbeat bound, the server drops the stream's producer within its own (its
/// heartbeats run because the stream does), and the stream reopens after the heal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_during_a_server_stream() {
    if skip_unless_ready() {
        return;
    }
    let h = Hosts::new(10);
    let (mut server, mut client) = streaming(&h, &[], "9s", &[]).await;

    h.drop_all();
    let t0 = Instant::now();
    let (tc, cv) = client
        .wait(HEARTBEAT_BOUND + SLACK * 2, is_stream_end)
        .await
        .expect("client ends the stream");
    assert_eq!(cv["outcome"], "error", "{cv}");
    assert_eq!(cv["close_reason"], "heartbeat_timeout", "{cv}");
    assert!(cv["error"].as_str().is_some_and(|e| e.contains("received")), "{cv}");
    let client_detect = tc - t0;
    assert!(client_detect <= HEARTBEAT_BOUND + SLACK, "client {client_detect:?}");
    let (ts, sv) = server
        .wait(HEARTBEAT_BOUND + SLACK * 2, is_stream_end)
        .await
        .expect("server drops the stream");
    assert_eq!(sv["cancelled"], true, "{sv}");
    let server_detect = ts - t0;
    assert!(server_detect <= HEARTBEAT_BOUND + SLACK, "server {server_detect:?}");
    let seen = server.matching(is_closed).next().cloned();
    let closed = match seen {
        Some((_, v)) => v,
        None => server.wait(SLACK, is_closed).await.expect("server closed").1,
    };
    assert_eq!(closed["reason"], "heartbeat_timeout", "{closed}");

    h.heal();
    let healed = Instant::now();
    let recovery = stream_back_after(&mut client, healed, Duration::from_secs(5))
        .await
        .expect("the stream reopens");
    let unresolved = finish_client(&mut client, true).await;
    report(Row {
        fault: "power loss during a server stream",
        bound: format!(
            "client {}; server {} (heartbeats while streaming)",
            secs(HEARTBEAT_BOUND),
            secs(HEARTBEAT_BOUND)
        ),
        client: format!("{} (stream ended: heartbeat_timeout)", secs(client_detect)),
        server: format!("{} (producer dropped; heartbeat_timeout)", secs(server_detect)),
        recovery: format!("{} (stream reopened)", secs(recovery)),
        unresolved,
    });
}

/// A NAT forgets the flow of a connection carrying a server stream: both sides end the stream
/// within their heartbeat bounds; the client's new connection carries the reopened stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nat_forgets_the_flow_during_a_server_stream() {
    if skip_unless_ready() {
        return;
    }
    let h = Hosts::new(11);
    let (mut server, mut client) = streaming(&h, &[], "8s", &[]).await;
    let (_, connected) = server
        .matching(|v| is_event(v, "connected"))
        .next()
        .cloned()
        .expect("connected");
    let port: u16 = connected["peer"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();

    h.drop_flow(port);
    let t0 = Instant::now();
    let (tc, cv) = client
        .wait(HEARTBEAT_BOUND + SLACK * 2, is_stream_end)
        .await
        .expect("client ends the stream");
    assert_eq!(cv["close_reason"], "heartbeat_timeout", "{cv}");
    let client_detect = tc - t0;
    assert!(client_detect <= HEARTBEAT_BOUND + SLACK, "client {client_detect:?}");
    let (ts, sv) = server
        .wait(HEARTBEAT_BOUND + SLACK * 2, is_stream_end)
        .await
        .expect("server drops the stream");
    assert_eq!(sv["cancelled"], true, "{sv}");
    let server_detect = ts - t0;
    assert!(server_detect <= HEARTBEAT_BOUND + SLACK, "server {server_detect:?}");
    let recovery = stream_back_after(&mut client, tc, Duration::from_secs(3))
        .await
        .expect("the stream reopens on a new flow");
    let unresolved = finish_client(&mut client, true).await;
    report(Row {
        fault: "NAT forgets the flow of a server stream",
        bound: format!("client {}; server {}", secs(HEARTBEAT_BOUND), secs(HEARTBEAT_BOUND)),
        client: format!("{} (stream ended: heartbeat_timeout)", secs(client_detect)),
        server: format!("{} (producer dropped)", secs(server_detect)),
        recovery: format!("{} (new flow)", secs(recovery)),
        unresolved,
    });
}

/// The server process killed mid-stream: the client's stream ends at once with the connection's
/// reason (not as if complete), and reopens when a server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_mid_stream() {
    if skip_unless_ready() {
        return;
    }
    let h = Hosts::new(12);
    let (server, mut client) = streaming(&h, &[], "8s", &[]).await;

    server.signal("KILL");
    let t0 = Instant::now();
    let (tc, cv) = client
        .wait(SLACK * 2, is_stream_end)
        .await
        .expect("client ends the stream");
    assert_eq!(cv["outcome"], "error", "{cv}");
    assert!(
        matches!(cv["close_reason"].as_str(), Some("peer_closed" | "reset")),
        "{cv}"
    );
    let client_detect = tc - t0;
    assert!(client_detect <= SLACK, "client {client_detect:?}");
    drop(server);
    let _restarted = start_server(&h, &SERVER_HEARTBEATS).await;
    let up = Instant::now();
    let recovery = stream_back_after(&mut client, up, Duration::from_secs(6))
        .await
        .expect("the stream reopens");
    let unresolved = finish_client(&mut client, true).await;
    report(Row {
        fault: "server SIGKILL mid-stream",
        bound: "client immediate".into(),
        client: format!(
            "{} (stream ended: {})",
            secs(client_detect),
            cv["close_reason"].as_str().unwrap_or("?")
        ),
        server: "—".into(),
        recovery: format!("{} (stream reopened)", secs(recovery)),
        unresolved,
    });
}

/// Flags for the zero-window cases: 16 KiB events every 10 ms against a 32 KiB stream window, so
/// the window is spent in a few events and the kernels' buffers (which a stopped reader fills)
/// hold all of it: only the stream stalls, never the connection's writes.
const FAST_STREAM: [&str; 6] = [
    "--stream-interval",
    "10ms",
    "--stream-size",
    "16384",
    "--stream-window",
    "32768",
];

/// A client frozen mid-stream (SIGSTOP: its kernel still acknowledges, then advertises zero): the
/// server's stream stalls and is reset after `stream_stall_timeout`, alone; the connection is not
/// closed, and once resumed the client gets the buffered events, then the reset's reason, and
/// reopens the stream on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_frozen_mid_stream_stalls_only_its_stream() {
    if skip_unless_ready() {
        return;
    }
    let h = Hosts::new(13);
    let stall = Duration::from_secs(1);
    // Server heartbeats slower than the stall, so the stall is what acts first.
    let server_extra = [
        "--stream-stall-timeout",
        "1s",
        "--heartbeat-interval",
        "6s",
        "--idle-timeout",
        "10s",
    ];
    let client_extra = overridden(
        &FAST_STREAM,
        &["--heartbeat-interval", "2s", "--heartbeat-timeout", "1s"],
    );
    let (mut server, mut client) = streaming(&h, &server_extra, "9s", &client_extra).await;

    client.signal("STOP");
    let t0 = Instant::now();
    let (ts, sv) = server
        .wait(stall + SLACK * 2, is_stream_end)
        .await
        .expect("server resets the stalled stream");
    assert_eq!(sv["cancelled"], false, "a stall reset, not the connection: {sv}");
    let server_detect = ts - t0;
    assert!(server_detect <= stall + SLACK, "server {server_detect:?}");
    tokio::time::sleep(Duration::from_millis(500)).await; // frozen a while past the reset
    client.signal("CONT");
    let resumed = Instant::now();
    let (_, cv) = client
        .wait(SLACK * 4, is_stream_end)
        .await
        .expect("client learns the reset");
    assert_eq!(cv["outcome"], "error", "{cv}");
    assert_eq!(cv["code"], "RESOURCE_EXHAUSTED", "{cv}");
    assert!(cv["close_reason"].is_null(), "the connection stays: {cv}");
    let recovery = stream_back_after(&mut client, resumed, Duration::from_secs(3))
        .await
        .expect("the stream reopens");
    let unresolved = finish_client(&mut client, false).await;
    assert_no_close_before_the_end(&mut server, &mut client);
    report(Row {
        fault: "client SIGSTOP mid-stream (zero window)",
        bound: format!("stream_stall_timeout {}", secs(stall)),
        client: "frozen; then the reset's reason, connection kept".into(),
        server: format!("{} (stream reset alone)", secs(server_detect)),
        recovery: format!("{} after resume (same connection)", secs(recovery)),
        unresolved,
    });
}

/// A consumer that hangs inside a live client: its stream stalls and is reset after
/// `stream_stall_timeout` while the same connection's unary requests keep completing on time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_consumer_stalls_its_stream_while_unary_calls_go_on() {
    if skip_unless_ready() {
        return;
    }
    let h = Hosts::new(14);
    let stall = Duration::from_secs(1);
    let client_extra = overridden(
        &FAST_STREAM,
        &["--stream-stop-after", "20", "--connections-per-endpoint", "1"],
    );
    let (mut server, mut client) = streaming(&h, &["--stream-stall-timeout", "1s"], "6s", &client_extra).await;
    let (ts, sv) = server
        .wait(Duration::from_secs(5), is_stream_end)
        .await
        .expect("server resets the stalled stream");
    assert_eq!(sv["cancelled"], false, "{sv}");
    let (tfirst, _) = client
        .matching(stream_message)
        .last()
        .cloned()
        .expect("stream events before the hang");
    let server_detect = ts.saturating_duration_since(tfirst);
    assert!(
        server_detect <= stall + SLACK,
        "reset {server_detect:?} after the consumer hung"
    );
    // Every unary request resolved ok and on time, before, during and after the stall.
    let unresolved = finish_client(&mut client, true).await;
    let failed: Vec<_> = client
        .matching(|v| is_event(v, "request") && v["outcome"] != "ok")
        .collect();
    assert!(
        failed.is_empty(),
        "unary requests failed beside a stalled stream: {failed:?}"
    );
    assert_no_close_before_the_end(&mut server, &mut client);
    report(Row {
        fault: "consumer hangs mid-stream (client alive)",
        bound: format!("stream_stall_timeout {}", secs(stall)),
        client: "unary requests all ok, on time".into(),
        server: format!("{} (stream reset alone)", secs(server_detect)),
        recovery: "—".into(),
        unresolved,
    });
}

/// Three `pubsub serve` processes of one topic (1,000 messages a second) on the server host, on
/// ports 7000-7002, with the server heartbeats; returns them once each listens.
async fn topic_servers(h: &Hosts, epoch_ms: u64) -> Vec<Probe> {
    let mut servers = Vec::new();
    for port in 7000..7003 {
        let mut args = s(&[
            "serve",
            "--addr",
            &format!("{}:{port}", h.server_ip),
            "--epoch-ms",
            &epoch_ms.to_string(),
        ]);
        args.extend(s(&SERVER_HEARTBEATS));
        let mut p = h.spawn(&h.server_ns, "pubsub", &args);
        assert!(
            p.wait(Duration::from_secs(5), |v| is_event(v, "listening"))
                .await
                .is_some(),
            "topic server on {port} did not start"
        );
        servers.push(p);
    }
    servers
}

/// A subscriber of the three servers, with the suite's client heartbeats, for `duration`;
/// returns once it has its first message.
async fn subscriber(h: &Hosts, duration: &str) -> (Probe, Value) {
    let endpoints: Vec<String> = (7000..7003).map(|p| format!("{}:{p}", h.server_ip)).collect();
    let args = s(&[
        "subscribe",
        "--endpoints",
        &endpoints.join(","),
        "--duration",
        duration,
        "--connect-timeout",
        "500ms",
        "--backoff",
        "200ms",
        "--heartbeat-interval",
        "500ms",
        "--heartbeat-timeout",
        "250ms",
        "--heartbeat-max-failures",
        "3",
    ]);
    let mut p = h.spawn(&h.client_ns, "pubsub", &args);
    let (_, first) = p
        .wait(Duration::from_secs(5), |v| is_event(v, "subscribed"))
        .await
        .expect("the subscriber gets its first message");
    (p, first)
}

/// Reads the subscriber to its end: its summary must show every position from its first to its
/// last exactly once, in order, and the subscription running to the end.
async fn ledger_holds(sub: &mut Probe) -> Value {
    let (_, summary) = sub
        .wait(Duration::from_secs(15), |v| is_event(v, "summary"))
        .await
        .expect("summary");
    assert_eq!(summary["outcome"], "ok", "{summary}");
    assert_eq!(summary["missing"], 0, "{summary}");
    assert_eq!(summary["duplicates"], 0, "{summary}");
    let (first, last, received) = (
        summary["first"].as_u64().unwrap(),
        summary["last"].as_u64().unwrap(),
        summary["received"].as_u64().unwrap(),
    );
    assert_eq!(received, last - first + 1, "{summary}");
    sub.finish(Duration::from_secs(2)).await;
    summary
}

/// Power loss between the hosts under a resumable subscription (issue 16): every server out of
/// reach at once. The subscriber notices within its heartbeat bound, keeps trying within
/// `resume_timeout`, and once the power is back resumes after the last message it delivered: the
/// servers replay what was published meanwhile, and the subscriber's ledger has every position
/// exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_under_a_resumable_subscription() {
    if skip_unless_ready() {
        return;
    }
    let h = Hosts::new(15);
    let epoch = examples::cli::unix_ms() as u64;
    let _servers = topic_servers(&h, epoch).await;
    let (mut sub, _) = subscriber(&h, "9s").await;
    tokio::time::sleep(Duration::from_millis(500)).await; // steady state before the fault

    h.drop_all();
    let t0 = Instant::now();
    let (tc, closed) = sub
        .wait(HEARTBEAT_BOUND + SLACK * 2, is_closed)
        .await
        .expect("the subscriber's connection closes");
    assert_eq!(closed["reason"], "heartbeat_timeout", "{closed}");
    let detect = tc - t0;
    assert!(detect <= HEARTBEAT_BOUND + SLACK, "detected after {detect:?}");
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(t0.elapsed())).await; // the outage lasts 3 s
    h.heal();
    let healed = Instant::now();
    let (tr, resumed) = sub
        .wait(Duration::from_secs(5), |v| is_event(v, "resumed"))
        .await
        .expect("the subscription resumes once the power is back");
    let replayed = resumed["replayed"].as_u64().unwrap();
    assert!(replayed >= 2500, "the 3 s without power are replayed: {resumed}");
    let summary = ledger_holds(&mut sub).await;
    report(Row {
        fault: "power loss under a resumable subscription (3 servers, 1,000 msg/s)",
        bound: format!("client {}", secs(HEARTBEAT_BOUND)),
        client: format!("{} (heartbeat_timeout)", secs(detect)),
        server: "—".into(),
        recovery: format!(
            "resumed {} after the heal, {replayed} replayed; {} ms without messages; every position once, in order",
            secs(tr.saturating_duration_since(healed)),
            summary["longest_silence_ms"]
        ),
        unresolved: 0,
    });
}

/// A NAT forgets the flows to the subscriber's server (the others stay reachable): the
/// subscriber notices within its heartbeat bound and resumes on another server, with every
/// position once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nat_loss_to_its_server_moves_a_resumable_subscription() {
    if skip_unless_ready() {
        return;
    }
    let h = Hosts::new(16);
    let epoch = examples::cli::unix_ms() as u64;
    let _servers = topic_servers(&h, epoch).await;
    let (mut sub, first) = subscriber(&h, "6s").await;
    let port: u16 = first["endpoint"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await; // steady state before the fault

    h.drop_port(port);
    let t0 = Instant::now();
    let (tr, resumed) = sub
        .wait(HEARTBEAT_BOUND + SLACK * 3, |v| is_event(v, "resumed"))
        .await
        .expect("the subscription resumes on another server");
    let took = tr - t0;
    assert!(took <= HEARTBEAT_BOUND + SLACK * 2, "resumed after {took:?}");
    let summary = ledger_holds(&mut sub).await;
    report(Row {
        fault: "NAT forgets the flows to a resumable subscription's server",
        bound: format!("client {}", secs(HEARTBEAT_BOUND)),
        client: format!("{} to resume on another server", secs(took)),
        server: "—".into(),
        recovery: format!(
            "{} replayed; {} ms without messages; every position once, in order",
            resumed["replayed"], summary["longest_silence_ms"]
        ),
        unresolved: 0,
    });
}

/// A registered server's host loses power. etcd and a second server run on the client's host. The
/// client stops using the dead server within its heartbeat bound, and the dead server's
/// registration (its lease no longer renewed) leaves etcd, and so the client's endpoints, within
/// the lease TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(etcd_missing, ignore = "etcd is not installed (Debian package etcd-server)")]
async fn power_loss_of_a_registered_servers_host() {
    if skip_unless_ready() {
        return;
    }
    let h = Hosts::new(17);
    let etcd = tests::etcd::Etcd::single_in(&h.client_ns, h.client_ip.parse().unwrap());
    let registry = etcd.endpoints()[0].clone();
    let ttl = Duration::from_secs(3);
    let reg = [
        "--registry",
        registry.as_str(),
        "--registry-ttl",
        "3s",
        "--registry-timeout",
        "500ms",
        "--registry-keep-alive",
        "500ms",
    ];
    let mut dying = h.spawn(&h.server_ns, "echo-server", &server_args(&h, &reg));
    let other_addr = format!("{}:7001", h.client_ip);
    let mut other_reg = reg.to_vec();
    other_reg.extend(["--addr", other_addr.as_str()]);
    let mut other = h.spawn(&h.client_ns, "echo-server", &server_args(&h, &other_reg));
    for p in [&mut dying, &mut other] {
        p.wait(Duration::from_secs(20), |v| is_event(v, "registered"))
            .await
            .expect("the server registers in etcd");
    }
    let mut client = h.spawn(&h.client_ns, "echo-client", &client_args(&h, 50, "8s", &reg));
    client
        .wait(Duration::from_secs(5), |v| {
            is_event(v, "discovery") && v["endpoints"].as_array().is_some_and(|e| e.len() == 2)
        })
        .await
        .expect("the client discovers both servers");
    client
        .wait(Duration::from_secs(5), ok_request)
        .await
        .expect("traffic flows");
    tokio::time::sleep(Duration::from_millis(500)).await; // steady state before the fault

    h.drop_all();
    let t0 = Instant::now();
    let (tc, closed) = client
        .wait(HEARTBEAT_BOUND + SLACK * 2, |v| {
            is_closed(v) && v["peer"].as_str() == Some(h.server_addr().as_str())
        })
        .await
        .expect("the client's connection to the dead server closes");
    assert_eq!(closed["reason"], "heartbeat_timeout", "{closed}");
    let detect = tc - t0;
    assert!(detect <= HEARTBEAT_BOUND + SLACK, "detected after {detect:?}");
    let (tg, gone) = client
        .wait(ttl + SLACK * 3, |v| {
            is_event(v, "discovery") && v["endpoints"].as_array().is_some_and(|e| e.len() == 1)
        })
        .await
        .expect("the dead server's registration expires");
    assert_eq!(gone["endpoints"][0], other_addr.as_str(), "{gone}");
    assert_eq!(gone["held_back"], false, "{gone}");
    let deregistered = tg - t0;
    // etcd checks for expired leases every 500 ms.
    assert!(
        deregistered <= ttl + SLACK * 2,
        "registration gone after {deregistered:?}"
    );
    let unresolved = finish_client(&mut client, true).await;
    let failed = client
        .matching(|v| is_event(v, "request") && v["outcome"] != "ok")
        .filter(|(t, _)| *t > tg + SLACK)
        .count();
    assert_eq!(failed, 0, "requests failed after the dead server left the endpoints");
    drop(etcd);
    report(Row {
        fault: "power loss of a registered server's host (etcd and a 2nd server elsewhere)",
        bound: format!("client {}, lease TTL {}", secs(HEARTBEAT_BOUND), secs(ttl)),
        client: format!("{} (heartbeat_timeout)", secs(detect)),
        server: "—".into(),
        recovery: format!(
            "registration gone from etcd and the client's endpoints {} after the power loss",
            secs(deregistered)
        ),
        unresolved,
    });
}
