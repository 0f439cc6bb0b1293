//! The admin page (rpc-admin): what an operator sees of a client's pools after a server dies.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use examples::echo::echo_server::{Echo, EchoServer};
use examples::echo::{EchoReply, EchoRequest};
use examples::services::EchoService;
use futures_util::StreamExt;
use rpc_client::Client;
use rpc_server::{Request, Response, Server, ServerHandle, Status};
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
async fn dump_dom(url: &str) -> String {
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
            url,
        ])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("chromium within 60 s")
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(chromium_missing, ignore = "chromium not installed (Debian package chromium)")]
async fn the_page_in_a_real_browser_shows_the_killed_endpoint_in_retry_and_the_others_alive() {
    let (mut servers, addrs, client) = three_servers().await;
    let killed = addrs[2];
    kill(servers.remove(2), &client).await;
    // Three calls after the kill, answered by the two that are left.
    let mut echo = examples::echo::echo_client::EchoClient::new(client.clone());
    for _ in 0..3 {
        echo.say(EchoRequest::default()).await.unwrap();
    }
    let admin = rpc_admin::Admin::new()
        .client("echo", &client)
        .server("survivor", &servers[0])
        .serve("127.0.0.1:0")
        .await
        .unwrap();
    let dom = dump_dom(&format!("http://{}/", admin.local_addr())).await;
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
    // The client's calls per method: three, all answered.
    let say = dom
        .find("/Say</td>")
        .map(|at| dom[at..].split("</tr>").next().unwrap())
        .unwrap_or_else(|| panic!("no row for Say in:\n{dom}"));
    assert!(say.starts_with("/Say</td><td>3</td><td>3</td>"), "{say}");
    // A server's own table: its one connection, open, with who is at the other end.
    let server = &dom[dom.find("server survivor").expect("the server's section")..];
    let conn = server.split("</tr>").nth(1).unwrap();
    assert!(conn.contains("<td>open</td>") && conn.contains("127.0.0.1:"), "{conn}");
}

/// The server's ledger: what its handlers actually ran.
#[derive(Clone, Default)]
struct Ledger {
    said: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

impl Echo for Ledger {
    async fn say(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        self.said.fetch_add(1, Ordering::SeqCst);
        let req = request.into_body();
        Ok(Response::new(EchoReply {
            message: req.message,
            ..EchoReply::default()
        }))
    }

    async fn fail(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        self.failed.fetch_add(1, Ordering::SeqCst);
        Err(Status::application(request.into_body().message))
    }
}

/// The method `name` (or whose path ends with `/{name}`) in a `methods` array of the document.
fn method<'a>(methods: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    methods
        .as_array()
        .unwrap()
        .iter()
        .find(|m| {
            let m = m["method"].as_str().unwrap();
            m == name || m.ends_with(&format!("/{name}"))
        })
        .unwrap_or_else(|| panic!("no {name} in {methods}"))
}

/// Per-method counts on both sides agree with what the server's handlers ran; heartbeats have a
/// measured round trip; and the connection the client closes is in the server's ring of closes,
/// with exactly the bytes the client wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_counts_what_ran_measures_heartbeats_and_remembers_server_closes() {
    let ledger = Ledger::default();
    let server = Server::builder()
        .add_service(EchoServer::new(ledger.clone()))
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let mut cfg = tests::quiet_client();
    cfg.heartbeat = rpc_core::config::HeartbeatConfig {
        interval: Duration::from_millis(40),
        timeout: Duration::from_millis(30),
        ..Default::default()
    };
    let client = Client::with_endpoints(vec![server.local_addr()], cfg).unwrap();
    let mut echo = examples::echo::echo_client::EchoClient::new(client.clone());
    let (says, fails, unknown) = (40u64, 7u64, 3u64);
    let mut ok = 0;
    for i in 0..says {
        let r = echo
            .say(EchoRequest {
                message: format!("m{i}"),
                ..Default::default()
            })
            .await;
        ok += u64::from(r.is_ok());
    }
    for _ in 0..fails {
        assert!(echo.fail(EchoRequest::default()).await.is_err());
    }
    for _ in 0..unknown {
        let req = rpc_client::Request::for_method("/echo.Echo/Nope", bytes::Bytes::new());
        let e = client.unary(req).await.unwrap_err();
        assert!(!e.may_have_executed(), "{e}");
    }
    assert_eq!(ok, says);
    let conn = client.connections().pop().unwrap();
    // A few heartbeats on the now quiet connection, each answered.
    tests::wait_until(Duration::from_secs(5), || conn.heartbeats_acked() >= 3).await;

    let admin = rpc_admin::Admin::new()
        .client("echo", &client)
        .server("echo", &server)
        .serve("127.0.0.1:0")
        .await
        .unwrap();
    let (code, body) = get(admin.local_addr(), "/api/v1/state", None).await;
    assert_eq!(code, 200, "{body}");
    let state: serde_json::Value = serde_json::from_str(&body).unwrap();
    let sv = &state["servers"][0];
    let ran = ledger.said.load(Ordering::SeqCst);
    assert_eq!(ran, says, "each call ran once");
    let say = method(&sv["methods"], "Say");
    assert_eq!(
        (say["total"].as_u64(), say["ok"].as_u64()),
        (Some(ran), Some(ran)),
        "{say}"
    );
    assert!(
        say["p50_us"].as_u64().unwrap() <= say["p99_us"].as_u64().unwrap(),
        "{say}"
    );
    let fail = method(&sv["methods"], "Fail");
    let failed = ledger.failed.load(Ordering::SeqCst);
    assert_eq!(
        (fail["ok"].as_u64(), fail["errors"]["APPLICATION_ERROR"].as_u64()),
        (Some(0), Some(failed)),
        "{fail}"
    );
    assert_eq!(failed, fails);
    let nope = method(&sv["methods"], "unknown").clone();
    assert_eq!(
        nope["total"].as_u64(),
        Some(unknown),
        "refused, counted as unknown: {nope}"
    );
    // The client counts the same calls, from its side.
    let c = &state["clients"][0];
    assert_eq!(method(&c["methods"], "Say")["ok"].as_u64(), Some(says));
    assert_eq!(
        method(&c["methods"], "Fail")["errors"]["APPLICATION_ERROR"].as_u64(),
        Some(fails)
    );
    // Heartbeats: a round trip was measured, on the connection and for the endpoint.
    let e = &c["endpoints"][0];
    let rtt = e["connections"][0]["heartbeat_rtt_us"]
        .as_u64()
        .expect("a heartbeat round trip");
    assert!(rtt > 0 && rtt < 1_000_000, "{e}");
    assert_eq!(e["heartbeat_rtt_us"].as_u64(), Some(rtt));
    assert!(
        e["latency_p50_us"].as_u64().is_some(),
        "40 answers give the endpoint a latency: {e}"
    );
    // Bytes: the server's connection has read what the client's wrote (or is about to).
    let written = e["connections"][0]["bytes_written"].as_u64().unwrap();
    assert!(
        written > 0 && sv["connections"][0]["bytes_read"].as_u64().unwrap() > 0,
        "{state}"
    );

    // The client goes: the server remembers the connection, why it closed, and its bytes.
    let id_seen_by_server = sv["connections"][0]["id"].as_u64().unwrap();
    // Closed, not only dropped: the admin page's task holds a clone of the client until it has
    // stopped, and a client still alive would reconnect. A closed one never does.
    client.close();
    drop((echo, client, admin));
    let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("closed");
    let view = server.view();
    tests::wait_until(Duration::from_secs(5), || !view.recent_closes().is_empty()).await;
    let admin = rpc_admin::Admin::new()
        .server("echo", &server)
        .serve("127.0.0.1:0")
        .await
        .unwrap();
    let (_, body) = get(admin.local_addr(), "/api/v1/state", None).await;
    let state: serde_json::Value = serde_json::from_str(&body).unwrap();
    let sv = &state["servers"][0];
    // Found by id: another connection the client had begun to open just before its close may
    // also be listed (shut down as its connect finished; see the holder's review tests).
    let id_of = |v: &serde_json::Value| v["id"].as_u64();
    assert!(
        !sv["connections"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| id_of(c) == Some(id_seen_by_server)),
        "{sv}"
    );
    let close = sv["recent_closes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| id_of(c) == Some(id_seen_by_server))
        .unwrap_or_else(|| panic!("connection {id_seen_by_server} not among the closes: {sv}"));
    assert_eq!(
        close["bytes_read"].as_u64(),
        Some(conn.bytes_written()),
        "the server read exactly what the client wrote: {close}"
    );
    assert!(close["bytes_written"].as_u64().unwrap() >= conn.bytes_read(), "{close}");
    let code = close["reason_code"].as_str().unwrap();
    assert!(
        ["goaway", "peer_closed"].contains(&code),
        "a client that left: {close} (client side: {reason})"
    );
    assert!(close["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{close}");
}

/// A feed whose `Watch` pushes 16 KiB events for ever and counts each one it makes: the
/// server's ledger of what its handler produced.
#[derive(Clone, Default)]
struct CountingFeed {
    produced: Arc<AtomicU64>,
}

impl examples::feed::v1::feed_server::Feed for CountingFeed {
    async fn watch(
        &self,
        _request: Request<examples::feed::v1::Subscribe>,
    ) -> Result<Response<rpc_server::codegen::BoxStream<examples::feed::v1::Event>>, Status> {
        let produced = self.produced.clone();
        let events = futures_util::stream::unfold(0u64, move |seq| {
            let produced = produced.clone();
            async move {
                produced.fetch_add(1, Ordering::SeqCst);
                let event = examples::feed::v1::Event {
                    seq: seq + 1,
                    payload: vec![0x5A; 16 * 1024].into(),
                };
                Some((Ok(event), seq + 1))
            }
        });
        Ok(Response::new(Box::pin(events)))
    }

    async fn upload(
        &self,
        request: Request<rpc_server::Streaming<examples::feed::v1::Event>>,
    ) -> Result<Response<examples::feed::v1::Summary>, Status> {
        examples::services::FeedService.upload(request).await
    }

    async fn echo(
        &self,
        request: Request<rpc_server::Streaming<examples::feed::v1::Event>>,
    ) -> Result<Response<rpc_server::codegen::BoxStream<examples::feed::v1::Event>>, Status> {
        examples::services::FeedService.echo(request).await
    }
}

/// A server pushing to a consumer that took `taken` events and stopped reading (the WebSocket
/// incident's slow agent), after another stream on the same connection ran to its end; and an
/// admin page over both sides. Returns once the push has waited for credit for 200 ms.
struct Stalled {
    _server: ServerHandle,
    _client: Client,
    _watch: rpc_client::Streaming<examples::feed::v1::Event>,
    admin: rpc_admin::AdminHandle,
    produced: Arc<AtomicU64>,
    taken: u64,
}

async fn stalled_stream() -> Stalled {
    use examples::feed::v1::feed_client::FeedClient;
    use examples::feed::v1::feed_server::FeedServer;
    let feed = CountingFeed::default();
    let server = Server::builder()
        .add_service(FeedServer::new(feed.clone()))
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let client = Client::connect(server.local_addr(), tests::quiet_client())
        .await
        .unwrap();
    let feed_client = FeedClient::new(client.clone());
    // A stream that runs to its end first: it must not be listed afterwards.
    let done: Vec<_> = feed_client
        .echo(futures_util::stream::iter((1..=5).map(|seq| {
            examples::feed::v1::Event {
                seq,
                payload: Default::default(),
            }
        })))
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(done.len(), 5);
    let taken = 3;
    let mut watch = feed_client
        .watch(examples::feed::v1::Subscribe::default())
        .await
        .unwrap();
    for seq in 1..=taken {
        assert_eq!(watch.message().await.unwrap().unwrap().seq, seq);
    }
    let admin = rpc_admin::Admin::new()
        .client("feed", &client)
        .server("feed", &server)
        .serve("127.0.0.1:0")
        .await
        .unwrap();
    Stalled {
        _server: server,
        _client: client,
        _watch: watch,
        admin,
        produced: feed.produced,
        taken,
    }
}

/// The document's streams of the first connection of `side` (a client's first endpoint's, or a
/// server's).
fn first_streams(side: &serde_json::Value) -> &serde_json::Value {
    let conns = side["endpoints"][0]["connections"]
        .as_array()
        .or_else(|| side["connections"].as_array())
        .unwrap();
    &conns[0]["streams"]
}

/// The admin page lists each open stream on both sides of a connection: the push to a consumer
/// that stopped reading shows as waiting for credit, for how long, with credit the two sides
/// agree on and message counts that match what the handler made and the consumer took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_lists_a_stalled_stream_on_both_sides_as_it_is() {
    let s = stalled_stream().await;
    let at = s.admin.local_addr();
    let start = tokio::time::Instant::now();
    let state = loop {
        let (code, body) = get(at, "/api/v1/state", None).await;
        assert_eq!(code, 200, "{body}");
        let state: serde_json::Value = serde_json::from_str(&body).unwrap();
        let blocked = first_streams(&state["servers"][0])[0]["blocked_ms"].as_u64();
        if blocked.is_some_and(|ms| ms >= 200) {
            break state;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the push never waited for credit: {state}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let server_side = first_streams(&state["servers"][0]).as_array().unwrap();
    let client_side = first_streams(&state["clients"][0]).as_array().unwrap();
    assert_eq!(
        server_side.len(),
        1,
        "only the open stream, not the one that ended: {state}"
    );
    assert_eq!(client_side.len(), 1, "{state}");
    let (sv, cl) = (&server_side[0], &client_side[0]);
    assert_eq!(sv["id"], cl["id"], "the same stream on both sides");
    assert_eq!(sv["method"], "/feed.v1.Feed/Watch");
    assert_eq!(cl["method"], "/feed.v1.Feed/Watch");
    // Messages: the consumer took exactly what this test read; the server sent what its handler
    // made, but for the batch its sender waits to queue (at most the client's window of events,
    // and one more).
    assert_eq!(cl["received"].as_u64(), Some(s.taken), "{cl}");
    let window = u64::from(tests::quiet_client().connection.stream_window);
    let (sent, produced) = (sv["sent"].as_u64().unwrap(), s.produced.load(Ordering::SeqCst));
    assert!(
        sent <= produced && produced - sent <= window / (16 * 1024) + 1,
        "sent {sent}, produced {produced}"
    );
    assert!(
        sent > s.taken,
        "the server ran ahead of the consumer by its window: {sv}"
    );
    // The other way, the subscription: what the client sent is what the server's handler took.
    assert_eq!(sv["received"], cl["sent"], "{sv} {cl}");
    assert!(cl["sent"].as_u64().unwrap() <= 1, "{cl}");
    // Credit: the push waits because the consumer granted nothing more; with nothing in flight
    // either way, what the server may still send is what the client may still receive.
    let waiting = sv["waiting_bytes"].as_u64().unwrap();
    // A stalled stream holds at most its window and one message (an event is 16 KiB and a few
    // bytes of protobuf).
    let event = 16 * 1024 + 16;
    assert!(
        waiting > 0 && waiting <= window + event,
        "at most the window and one event wait: {sv}"
    );
    assert!(sv["send_credit"].as_i64().unwrap() <= 0, "{sv}");
    assert_eq!(sv["send_credit"], cl["recv_credit"], "both sides agree: {sv} {cl}");
    assert_eq!(cl["waiting_bytes"], 0);
    assert!(cl["blocked_ms"].is_null(), "{cl}");
    assert_eq!(cl["peer_finished"], false);
    assert!(sv["age_ms"].as_u64().unwrap() >= sv["blocked_ms"].as_u64().unwrap());
}

/// The same stalled stream in the page, as a browser renders it: a row marked blocked, with the
/// method and what waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(chromium_missing, ignore = "chromium not installed (Debian package chromium)")]
async fn the_page_in_a_real_browser_marks_the_stalled_stream() {
    let s = stalled_stream().await;
    let view = s._server.view();
    tests::wait_until(Duration::from_secs(10), || {
        view.open_connections()
            .iter()
            .any(|c| c.handle.stream_bytes_waiting() > 0)
    })
    .await;
    let dom = dump_dom(&format!("http://{}/", s.admin.local_addr())).await;
    let server = &dom[dom.find("server feed").expect("the server's section")..];
    let row = server
        .find(r#"<tr class="stream blocked">"#)
        .map(|at| server[at..].split("</tr>").next().unwrap())
        .unwrap_or_else(|| panic!("no blocked stream row in:\n{server}"));
    assert!(row.contains("/feed.v1.Feed/Watch") && row.contains("KiB for"), "{row}");
    // The client's side of it is listed too, not blocked: it is the consumer.
    let client = &dom[dom.find("client feed").expect("the client's section")..dom.find("server feed").unwrap()];
    assert!(
        client.contains(r#"<tr class="stream">"#) && client.contains("/feed.v1.Feed/Watch"),
        "{client}"
    );
}
