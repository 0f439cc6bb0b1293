//! The admin page (rpc-admin): what an operator sees of a client's pools after a server dies.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use examples::echo::echo_server::EchoServer;
use examples::services::EchoService;
use rpc_client::Client;
use rpc_server::{Server, ServerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A plain HTTP/1.1 GET; returns the status code and the body.
async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, body.to_owned())
}

/// Three echo servers and a client connected to all of them.
async fn three_servers() -> (Vec<ServerHandle>, Vec<SocketAddr>, Client) {
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(
            Server::builder()
                .add_service(EchoServer::new(EchoService::default()))
                .bind("127.0.0.1:0")
                .await
                .unwrap(),
        );
    }
    let addrs: Vec<SocketAddr> = servers.iter().map(ServerHandle::local_addr).collect();
    let client = Client::with_endpoints(addrs.clone(), tests::quiet_client()).unwrap();
    tests::wait_until(Duration::from_secs(5), || alive(&client) == 3).await;
    (servers, addrs, client)
}

fn alive(client: &Client) -> usize {
    client.holder().alive_endpoints()
}

/// Kills `server` like a killed process (no GOAWAY, its connections just go) and waits until
/// `client` has moved it out of the alive pool.
async fn kill(server: ServerHandle, client: &Client) {
    let before = alive(client);
    server.abort().await;
    tests::wait_until(Duration::from_secs(5), || alive(client) < before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_page_shows_a_killed_endpoint_in_retry_with_its_close_reason_and_the_others_alive() {
    let (mut servers, addrs, client) = three_servers().await;
    let admin = rpc_admin::Admin::new()
        .client("echo", &client)
        .server("first", &servers[0])
        .token("s3cret")
        .serve("127.0.0.1:0")
        .await
        .unwrap();
    let at = admin.local_addr();
    assert_eq!(get(at, "/api/v1/state", None).await.0, 401, "the token is required");

    // One server dies like a killed process.
    let killed = addrs[1];
    kill(servers.remove(1), &client).await;

    let (code, body) = get(at, "/api/v1/state", Some("s3cret")).await;
    assert_eq!(code, 200, "{body}");
    let state: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(state["version"], 1);
    let c = &state["clients"][0];
    assert_eq!(c["name"], "echo");
    for e in c["endpoints"].as_array().unwrap() {
        let addr: SocketAddr = e["addr"].as_str().unwrap().parse().unwrap();
        if addr == killed {
            assert_eq!(e["pool"], "retry", "{e}");
            assert!(e["connections"].as_array().unwrap().is_empty(), "{e}");
        } else {
            assert_eq!(e["pool"], "alive", "{e}");
            assert_eq!(e["connections"][0]["state"], "open", "{e}");
        }
    }
    let close = c["recent_closes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["addr"] == killed.to_string())
        .unwrap_or_else(|| panic!("no close of {killed} in {c}"));
    let reason = close["reason_code"].as_str().unwrap();
    assert!(
        ["peer_closed", "reset", "io"].contains(&reason),
        "the close reason of a killed peer: {close}"
    );
    // The server side: the first server's connection from this client, open.
    let sv = &state["servers"][0];
    assert_eq!(
        (sv["name"].as_str(), sv["addr"].as_str()),
        (Some("first"), Some(addrs[0].to_string().as_str()))
    );
    assert_eq!(sv["connections"][0]["state"], "open", "{sv}");

    // The page itself, with the token as a parameter (which it passes on to the API).
    let (code, html) = get(at, "/?token=s3cret", None).await;
    assert_eq!(code, 200);
    assert!(
        html.contains("tether admin") && html.contains("/api/v1/state"),
        "{html}"
    );
    let (code, _) = get(at, "/", None).await;
    assert_eq!(code, 401);
}

/// The page as a person sees it: loaded in headless chromium, its script run, the DOM dumped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(chromium_missing, ignore = "chromium not installed (Debian package chromium)")]
async fn the_page_in_a_real_browser_shows_the_killed_endpoint_in_retry_and_the_others_alive() {
    let (mut servers, addrs, client) = three_servers().await;
    let killed = addrs[2];
    kill(servers.remove(2), &client).await;
    let admin = rpc_admin::Admin::new()
        .client("echo", &client)
        .serve("127.0.0.1:0")
        .await
        .unwrap();
    let url = format!("http://{}/", admin.local_addr());
    let profile = tempfile::tempdir().unwrap();
    // The page renders after its first fetch; --virtual-time-budget lets chromium run the
    // script (and its timers) before it dumps the DOM, without waiting for the wall clock.
    let out = tokio::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=3000",
            &format!("--user-data-dir={}", profile.path().display()),
            "--dump-dom",
            &url,
        ])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("chromium within 60 s")
        .expect("run chromium");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Each endpoint's row: its address, then its pool state as coloured text.
    let row = |addr: SocketAddr| {
        let at = dom
            .find(&format!("<td>{addr}</td>"))
            .unwrap_or_else(|| panic!("no row for {addr} in:\n{dom}"));
        dom[at..].split("</tr>").next().unwrap().to_owned()
    };
    let dead = row(killed);
    assert!(dead.contains(r#"class="pool retry">retry<"#), "{dead}");
    for a in &addrs[..2] {
        let r = row(*a);
        assert!(r.contains(r#"class="pool alive">alive<"#), "{r}");
    }
    // The close that sent it there, with its reason.
    let closes = &dom[dom.find("recent closes").expect("the closes table")..];
    let close = closes
        .find(&format!("<td>{killed}</td>"))
        .map(|at| closes[at..].split("</tr>").next().unwrap())
        .unwrap_or_else(|| panic!("no close of {killed} in:\n{closes}"));
    assert!(
        close.contains("peer closed the connection") || close.contains("reset by peer"),
        "{close}"
    );
}
