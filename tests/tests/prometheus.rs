//! The Prometheus example: `echo-server` and `echo-client` started with `--metrics-addr` serve their
//! metrics over HTTP while the client runs load; a scrape finds the connection and request metrics.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use tests::netns::{bin_path, is_event, Probe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn scrape(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut body))
        .await
        .unwrap()
        .unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    body
}

#[tokio::test]
async fn scraping_the_probe_binaries_finds_connection_and_request_metrics() {
    assert!(
        bin_path("echo-server").exists(),
        "build the examples first (cargo test --workspace --all-targets does)"
    );
    let (addr, server_metrics, client_metrics) = (free_port(), free_port(), free_port());
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mut server = Probe::local(
        "echo-server",
        &s(&[
            "--addr",
            &addr.to_string(),
            "--metrics-addr",
            &server_metrics.to_string(),
            "--json",
        ]),
    );
    server
        .wait(Duration::from_secs(10), |v| is_event(v, "listening"))
        .await
        .expect("server starts");
    let mut client = Probe::local(
        "echo-client",
        &s(&[
            "--addr",
            &addr.to_string(),
            "--rate",
            "50",
            "--duration",
            "20s",
            "--metrics-addr",
            &client_metrics.to_string(),
            "--json",
        ]),
    );
    for _ in 0..10 {
        client
            .wait(Duration::from_secs(10), |v| {
                is_event(v, "request") && v["outcome"] == "ok"
            })
            .await
            .expect("load runs");
    }

    let body = scrape(server_metrics).await;
    for needle in [
        "tether_connections_opened_total{side=\"server\"}",
        "tether_requests_total{side=\"server\",method=\"/echo.Echo/Say\",code=\"SUCCESS\"}",
        "tether_request_duration_seconds_bucket{side=\"server\",method=\"/echo.Echo/Say\"",
    ] {
        assert!(body.contains(needle), "server metrics lack {needle}:\n{body}");
    }
    let body = scrape(client_metrics).await;
    for needle in [
        "tether_connections_opened_total{side=\"client\"}",
        "tether_requests_total{side=\"client\",method=\"/echo.Echo/Say\",code=\"SUCCESS\"}",
        "tether_client_pool_endpoints{pool=\"alive\"} 1",
        "tether_client_reconnect_attempts_total{result=\"ok\"}",
    ] {
        assert!(body.contains(needle), "client metrics lack {needle}:\n{body}");
    }
    let ok_count = body
        .lines()
        .find(|l| l.starts_with("tether_requests_total{side=\"client\",method=\"/echo.Echo/Say\",code=\"SUCCESS\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap();
    assert!(ok_count >= 10.0, "counted {ok_count} successful requests");
    let _ = client.child.kill().await;
    let _ = server.child.kill().await;
}
