//! TLS (rustls): calls over TLS, refusals with clear errors, mutual TLS, and liveness over TLS.
//! Certificates are generated at run time.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use rpc_client::{Client, ClientConfig, ErrorKind};
use rpc_core::config::HeartbeatConfig;
use rpc_core::event::ConnectionEvent;
use rpc_core::tls::{TlsClientConfig, TlsServerConfig};
use rpc_core::GoAwayReason;
use rpc_server::ServerConfig;
use tests::pki::TestPki;
use tests::{named_server, quiet_client, wait_event, who, NamedServer};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

async fn tls_server(pki: &TestPki, mutual: bool, idle: Option<Duration>) -> NamedServer {
    let mut tls = TlsServerConfig::new(pki.path("server.pem"), pki.path("server-key.pem"));
    if mutual {
        tls.client_ca_file = Some(pki.path("ca.pem"));
    }
    let config = ServerConfig {
        tls: Some(tls),
        idle_timeout: idle,
        ..ServerConfig::default()
    };
    named_server("tls", "127.0.0.1:0".parse().unwrap(), config, Duration::ZERO).await
}

fn tls_client(pki: &TestPki, ca: &str, with_cert: bool) -> ClientConfig {
    let mut tls = TlsClientConfig::new(pki.path(ca));
    if with_cert {
        tls.cert_file = Some(pki.path("client.pem"));
        tls.key_file = Some(pki.path("client-key.pem"));
    }
    ClientConfig {
        tls: Some(tls),
        connect_timeout: ms(2000),
        ..quiet_client()
    }
}

#[tokio::test]
async fn tls_client_calls_tls_server() {
    let pki = TestPki::new();
    let server = tls_server(&pki, false, None).await;
    let client = Client::connect(server.addr(), tls_client(&pki, "ca.pem", false))
        .await
        .unwrap();
    for _ in 0..10 {
        assert_eq!(who(&client, ms(2000)).await.unwrap(), "tls");
    }
    // By name as well as by IP address.
    let mut by_name = tls_client(&pki, "ca.pem", false);
    by_name.tls.as_mut().unwrap().server_name = Some("localhost".into());
    let client = Client::connect(server.addr(), by_name).await.unwrap();
    assert_eq!(who(&client, ms(2000)).await.unwrap(), "tls");
    assert_eq!(server.calls(), 11);
}

#[tokio::test]
async fn plain_client_is_refused_by_a_tls_server() {
    let pki = TestPki::new();
    let server = tls_server(&pki, false, None).await;
    let err = Client::connect(server.addr(), quiet_client()).await.unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::Handshake(_)), "{err}");
    assert!(!err.may_have_executed());
    assert_eq!(server.calls(), 0);
}

#[tokio::test]
async fn client_that_trusts_another_ca_is_refused_with_a_certificate_error() {
    let pki = TestPki::new();
    let server = tls_server(&pki, false, None).await;
    let err = Client::connect(server.addr(), tls_client(&pki, "other-ca.pem", false))
        .await
        .unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::Tls(_)), "{err}");
    let text = err.to_string();
    assert!(text.contains("certificate") && text.contains("UnknownIssuer"), "{text}");
    assert_eq!(server.calls(), 0);
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate() {
    let pki = TestPki::new();
    let server = tls_server(&pki, true, None).await;
    let err = Client::connect(server.addr(), tls_client(&pki, "ca.pem", false))
        .await
        .unwrap_err();
    // TLS 1.3: the client finishes its side first; the server's alert arrives on the first read.
    assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");
    assert!(!err.may_have_executed());
    assert_eq!(server.calls(), 0);

    let client = Client::connect(server.addr(), tls_client(&pki, "ca.pem", true))
        .await
        .unwrap();
    assert_eq!(who(&client, ms(2000)).await.unwrap(), "tls");
}

#[tokio::test]
async fn heartbeats_and_idle_eviction_work_over_tls() {
    let pki = TestPki::new();
    let server = tls_server(&pki, false, Some(ms(300))).await;
    // Heartbeats every 100 ms keep a connection alive past the 300 ms idle timeout...
    let mut config = tls_client(&pki, "ca.pem", false);
    config.heartbeat = HeartbeatConfig {
        enabled: true,
        interval: ms(100),
        timeout: ms(50),
        max_failures: 3,
        ..Default::default()
    };
    let client = Client::connect(server.addr(), config).await.unwrap();
    let mut events = client.events();
    assert_eq!(
        wait_event(&mut events, ms(1000), |e| matches!(e, ConnectionEvent::Closed { .. })).await,
        None
    );
    let conn = client.connections()[0].clone();
    assert!(conn.heartbeats_acked() >= 5, "acked {}", conn.heartbeats_acked());
    // ...and without heartbeats the server evicts it with GOAWAY(idle).
    let quiet = Client::connect(server.addr(), tls_client(&pki, "ca.pem", false))
        .await
        .unwrap();
    let mut events = quiet.events();
    let goaway = wait_event(&mut events, ms(1000), |e| {
        matches!(e, ConnectionEvent::GoAwayReceived { .. })
    })
    .await;
    assert!(
        matches!(
            goaway,
            Some(ConnectionEvent::GoAwayReceived {
                reason: GoAwayReason::Idle,
                ..
            })
        ),
        "{goaway:?}"
    );
}

#[tokio::test]
async fn missing_tls_files_are_a_typed_error_at_build_time() {
    let mut config = quiet_client();
    config.tls = Some(TlsClientConfig::new("/nonexistent/ca.pem"));
    let err = Client::with_endpoints([], config).unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::TlsConfig(_)), "{err}");
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    let server_config = ServerConfig {
        tls: Some(TlsServerConfig::new("/nonexistent/cert.pem", "/nonexistent/key.pem")),
        ..ServerConfig::default()
    };
    let err = rpc_server::Server::builder()
        .config(server_config)
        .bind("127.0.0.1:0")
        .await
        .unwrap_err();
    assert!(matches!(err, rpc_server::ServerError::Tls(_)), "{err}");
}
