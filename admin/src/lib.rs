//! # rpc-admin
//!
//! A live view of a tether client's pools for an operator who wants to look rather than grep:
//! each endpoint's pool (alive, retry, discarded, ejected) and health, each pooled connection's
//! state, requests in flight, heartbeats and idle time, and the latest connections to close with
//! their `CloseReason`. Served over HTTP by axum (already in tether's dependency tree through
//! tonic's): `GET /api/v1/state` is the JSON document (schema in the README, *Admin page*), `GET /`
//! a page over it that refreshes itself every second.
//!
//! It exposes internals (addresses, close reasons, load): bind it to loopback (the probe binaries'
//! `--admin-addr` defaults to none; pass `127.0.0.1:PORT`), never to the internet, and set a
//! bearer token when the host is shared. Nothing on the request path pays for it: each look
//! reads what the holder already keeps, under its lock, once per request to the page. Open
//! streams are listed too (method, age, messages each way, what waits for credit and since
//! when): a connection with streams open is asked by its driver, through its outbound queue.
//!
//! ```no_run
//! # async fn run(client: rpc_client::Client) -> std::io::Result<()> {
//! let admin = rpc_admin::Admin::new().client("orders", &client).serve("127.0.0.1:9901").await?;
//! println!("admin page on http://{}/", admin.local_addr());
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rpc_client::{Client, HealthState, PoolState};
use rpc_core::driver::{ConnectionHandle, ConnectionState, StreamsView};
use rpc_core::metrics::MethodStats;
use rpc_core::{CloseReason, Code};
use serde_json::{json, Value};
use tokio::time::Instant;

/// What the admin page shows: named clients, and an optional bearer token.
#[derive(Clone, Default)]
pub struct Admin {
    clients: Vec<(String, Client)>,
    servers: Vec<(String, rpc_server::ServerView)>,
    token: Option<String>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("clients", &self.clients.iter().map(|(n, _)| n).collect::<Vec<_>>())
            .field("token", &self.token.as_ref().map(|_| "set"))
            .finish()
    }
}

impl Admin {
    /// An admin page showing nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Shows `client`'s pools under `name` (a clone is kept; it shares the client's holder).
    pub fn client(mut self, name: impl Into<String>, client: &Client) -> Self {
        self.clients.push((name.into(), client.clone()));
        self
    }

    /// Shows `server`'s connections under `name`.
    pub fn server(mut self, name: impl Into<String>, server: &rpc_server::ServerHandle) -> Self {
        self.servers.push((name.into(), server.view()));
        self
    }

    /// Requires `Authorization: Bearer <token>` (or `?token=<token>`, which the page passes on)
    /// for the page and the API.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The JSON document of `GET /api/v1/state`, now. Connections with streams open are asked
    /// what each stream is doing, at most [`STREAMS_LISTED`] each, waiting at most
    /// [`STREAMS_WAIT`] for their drivers.
    pub async fn state(&self) -> Value {
        let now = Instant::now();
        let mut clients = Vec::with_capacity(self.clients.len());
        for (name, client) in &self.clients {
            clients.push(client_state(name, client, now).await);
        }
        let mut servers = Vec::with_capacity(self.servers.len());
        for (name, view) in &self.servers {
            servers.push(server_state(name, view, now).await);
        }
        json!({ "version": 1, "clients": clients, "servers": servers })
    }

    /// Serves the page and the API on `addr` in the background, until the handle is dropped.
    pub async fn serve(self, addr: impl tokio::net::ToSocketAddrs) -> std::io::Result<AdminHandle> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let app = axum::Router::new()
            .route("/", get(page))
            .route("/api/v1/state", get(api))
            .with_state(Arc::new(self));
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                report_end(&e);
            }
        });
        Ok(AdminHandle { local_addr, task })
    }

    fn allowed(&self, headers: &HeaderMap, query: &Query<Vec<(String, String)>>) -> bool {
        let Some(token) = &self.token else { return true };
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let param = query.0.iter().find(|(k, _)| k == "token").map(|(_, v)| v.as_str());
        bearer == Some(token.as_str()) || param == Some(token.as_str())
    }
}

fn report_end(e: &std::io::Error) {
    eprintln!("rpc-admin: server ended: {e}");
}

/// A running admin page; dropping it stops serving.
#[derive(Debug)]
pub struct AdminHandle {
    local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl AdminHandle {
    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for AdminHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn pool_state(state: &PoolState, now: Instant) -> Value {
    match state {
        PoolState::Alive => json!({ "pool": "alive" }),
        PoolState::Retry { attempts, next_attempt } => json!({
            "pool": "retry",
            "attempts": attempts,
            "next_attempt_ms": millis(next_attempt.saturating_duration_since(now)),
        }),
        PoolState::Discarded => json!({ "pool": "discarded" }),
        PoolState::Ejected { until, times } => json!({
            "pool": "ejected",
            "ejected_for_ms": millis(until.saturating_duration_since(now)),
            "times_ejected": times,
        }),
        _ => json!({ "pool": "unknown" }),
    }
}

fn health(state: &HealthState) -> &'static str {
    match state {
        HealthState::Trusted => "trusted",
        HealthState::Ejected { .. } => "ejected",
        HealthState::Probation { .. } => "probation",
    }
}

/// The most streams listed per connection (`open_streams` counts them all).
pub const STREAMS_LISTED: usize = 32;

/// How long a look waits for a connection's driver to list its streams. A driver busy for longer
/// than this shows `"streams": null`: that is news too.
pub const STREAMS_WAIT: Duration = Duration::from_millis(250);

/// Each connection's `streams` field, in order: an empty list when it has none open (its driver
/// is not asked), the list its driver gave, or `null` when it did not answer within
/// [`STREAMS_WAIT`]. All of one client's (or one server's) are asked at once.
async fn streams_of(conns: &[&ConnectionHandle]) -> Vec<Value> {
    futures_util::future::join_all(conns.iter().map(|c| async move {
        if c.open_streams() == 0 {
            return json!([]);
        }
        match tokio::time::timeout(STREAMS_WAIT, c.streams(STREAMS_LISTED)).await {
            Ok(Some(view)) => streams_json(&view),
            _ => Value::Null,
        }
    }))
    .await
}

fn streams_json(view: &StreamsView) -> Value {
    Value::Array(
        view.streams
            .iter()
            .map(|s| {
                json!({
                    "id": s.id,
                    "method": s.method.as_str(),
                    "age_ms": millis(s.age),
                    "sent": s.sent,
                    "received": s.received,
                    "waiting_bytes": s.waiting_bytes,
                    "blocked_ms": s.blocked_for.map(millis),
                    "send_credit": s.send_credit,
                    "recv_credit": s.recv_credit,
                    "peer_finished": s.peer_finished,
                })
            })
            .collect(),
    )
}

fn connection(c: &ConnectionHandle, now: Instant) -> Value {
    let (state, detail) = match c.state() {
        ConnectionState::Handshaking => ("handshaking", String::new()),
        ConnectionState::Open => ("open", String::new()),
        ConnectionState::Draining { reason, by_peer } => (
            "draining",
            format!("GOAWAY {reason} {}", if by_peer { "from the peer" } else { "sent" }),
        ),
        ConnectionState::Closed(reason) => ("closed", reason.to_string()),
    };
    json!({
        "id": c.id(),
        "state": state,
        "detail": detail,
        "in_flight": c.in_flight(),
        "open_streams": c.open_streams(),
        "heartbeats_sent": c.heartbeats_sent(),
        "heartbeats_acked": c.heartbeats_acked(),
        "heartbeat_failures": c.heartbeat_failures(),
        "idle_ms": millis(now.saturating_duration_since(c.last_write())),
        "age_ms": millis(now.saturating_duration_since(c.opened_at())),
        "heartbeat_rtt_us": c.heartbeat_rtt().map(micros),
        "bytes_read": c.bytes_read(),
        "bytes_written": c.bytes_written(),
        "outbound_buffered": c.outbound_buffered(),
    })
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn methods(stats: &[MethodStats]) -> Value {
    Value::Array(
        stats
            .iter()
            .map(|m| {
                let errors: serde_json::Map<String, Value> = m
                    .by_code
                    .iter()
                    .filter(|(code, _)| *code != Code::Ok.as_str())
                    .map(|(code, n)| ((*code).to_owned(), json!(n)))
                    .collect();
                json!({
                    "method": m.method,
                    "total": m.total(),
                    "ok": m.count(Code::Ok),
                    "errors": errors,
                    "p50_us": m.latency.quantile(0.5).map(micros),
                    "p99_us": m.latency.quantile(0.99).map(micros),
                    "mean_us": m.latency.mean().map(micros),
                })
            })
            .collect(),
    )
}

fn close_reason(reason: Option<&CloseReason>) -> (String, &'static str) {
    reason.map_or_else(
        || ("dropped from the pool".to_owned(), "dropped"),
        |r| (r.to_string(), r.as_str()),
    )
}

async fn server_state(name: &str, view: &rpc_server::ServerView, now: Instant) -> Value {
    let open = view.open_connections();
    let handles: Vec<&ConnectionHandle> = open.iter().map(|c| &c.handle).collect();
    let streams = streams_of(&handles).await;
    let conns: Vec<Value> = open
        .iter()
        .zip(streams)
        .map(|(c, streams)| {
            let mut v = connection(&c.handle, now);
            v["peer"] = json!(c.peer.map(|p| p.to_string()));
            v["streams"] = streams;
            v
        })
        .collect();
    let closes: Vec<Value> = view
        .recent_closes()
        .iter()
        .rev()
        .map(|c| {
            let (reason, code) = close_reason(Some(&c.reason));
            json!({
                "id": c.id,
                "peer": c.peer.map(|p| p.to_string()),
                "reason": reason,
                "reason_code": code,
                "ago_ms": millis(now.saturating_duration_since(c.at)),
                "age_ms": millis(c.age),
                "bytes_read": c.bytes.0,
                "bytes_written": c.bytes.1,
            })
        })
        .collect();
    json!({
        "name": name,
        "addr": view.local_addr().to_string(),
        "connections": conns,
        "recent_closes": closes,
        "methods": methods(&view.methods()),
    })
}

async fn client_state(name: &str, client: &Client, now: Instant) -> Value {
    let holder = client.holder();
    let pools = holder.endpoint_connections();
    let handles: Vec<&ConnectionHandle> = pools.iter().flat_map(|(_, conns)| conns).collect();
    let mut streams = streams_of(&handles).await.into_iter();
    let endpoints: Vec<Value> = pools
        .iter()
        .map(|(e, conns)| {
            let mut v = pool_state(&e.state, now);
            v["addr"] = json!(e.addr.to_string());
            v["health"] = json!(health(&e.health));
            v["in_flight"] = json!(e.in_flight);
            v["latency_p50_us"] = json!(e.latency.map(|(p50, _)| micros(p50)));
            v["latency_p99_us"] = json!(e.latency.map(|(_, p99)| micros(p99)));
            v["heartbeat_rtt_us"] = json!(conns
                .iter()
                .filter_map(ConnectionHandle::heartbeat_rtt)
                .min()
                .map(micros));
            v["connections"] = Value::Array(
                conns
                    .iter()
                    .map(|c| {
                        let mut v = connection(c, now);
                        v["streams"] = streams.next().unwrap_or(Value::Null);
                        v
                    })
                    .collect(),
            );
            v
        })
        .collect();
    let closes: Vec<Value> = holder
        .recent_closes()
        .iter()
        .rev()
        .map(|c| {
            let (reason, code) = close_reason(c.reason.as_ref());
            json!({
                "addr": c.addr.to_string(),
                "id": c.id,
                "reason": reason,
                "reason_code": code,
                "ago_ms": millis(now.saturating_duration_since(c.at)),
            })
        })
        .collect();
    json!({
        "name": name,
        "endpoints": endpoints,
        "recent_closes": closes,
        "methods": methods(&client.method_stats()),
    })
}

async fn api(State(admin): State<Arc<Admin>>, headers: HeaderMap, query: Query<Vec<(String, String)>>) -> Response {
    if !admin.allowed(&headers, &query) {
        return (StatusCode::UNAUTHORIZED, "bearer token required\n").into_response();
    }
    let body = admin.state().await.to_string();
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

async fn page(State(admin): State<Arc<Admin>>, headers: HeaderMap, query: Query<Vec<(String, String)>>) -> Response {
    if !admin.allowed(&headers, &query) {
        return (StatusCode::UNAUTHORIZED, "bearer token required\n").into_response();
    }
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE).into_response()
}

/// The page: it fetches the API every second and draws each client's endpoints (pools as
/// coloured states, an in-flight sparkline each), their connections and the latest closes.
const PAGE: &str = include_str!("page.html");
