//! Real etcd servers for the registry tests: Debian's `etcd-server` (`/usr/bin/etcd`), on loopback,
//! each member with a temporary data dir, killed when dropped.
//!
//! Without etcd the registry tests are compiled as ignored (the tests crate's build script checks),
//! so `cargo test` reports them ignored, not passed; under `CI=true` they always run, and a missing
//! etcd fails them.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rpc_core::registry::RegistryConfig;

/// The etcd binary: `$TETHER_ETCD`, or `etcd` on the `PATH`.
pub fn etcd_bin() -> String {
    std::env::var("TETHER_ETCD").unwrap_or_else(|_| "etcd".to_string())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// One member of a test cluster.
struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    child: Option<Child>,
}

/// A network namespace to run a member in (`ip netns exec`), or none.
fn command(netns: Option<&str>) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(etcd_bin());
            c
        }
        None => Command::new(etcd_bin()),
    }
}

/// A running etcd cluster of one or more members on loopback.
pub struct Etcd {
    members: Vec<Member>,
    dir: tempfile::TempDir,
    token: String,
    netns: Option<String>,
}

impl Etcd {
    /// A single-member etcd.
    pub async fn single() -> Etcd {
        Etcd::cluster(1).await
    }

    /// A cluster of `n` members, every one serving before this returns.
    pub async fn cluster(n: usize) -> Etcd {
        let dir = tempfile::tempdir().expect("temp dir for etcd");
        let members = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: SocketAddr::from(([127, 0, 0, 1], free_port())),
                peer: SocketAddr::from(([127, 0, 0, 1], free_port())),
                child: None,
            })
            .collect();
        let mut etcd = Etcd {
            members,
            dir,
            token: format!("tether-test-{}", rand::random::<u64>()),
            netns: None,
        };
        for i in 0..n {
            etcd.start(i);
        }
        etcd.wait_ready().await;
        etcd
    }

    /// A single member inside network namespace `ns`, on `ip` ports 2379 (clients) and 2380. Not
    /// waited for: this process cannot reach into the namespace; the probes there can.
    pub fn single_in(ns: &str, ip: std::net::IpAddr) -> Etcd {
        let mut etcd = Etcd {
            members: vec![Member {
                name: "m0".into(),
                client: SocketAddr::new(ip, 2379),
                peer: SocketAddr::new(ip, 2380),
                child: None,
            }],
            dir: tempfile::tempdir().expect("temp dir for etcd"),
            token: format!("tether-test-{}", rand::random::<u64>()),
            netns: Some(ns.to_string()),
        };
        etcd.start(0);
        etcd
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts member `i` (again, after [`Etcd::kill`]: it keeps its data dir and rejoins).
    pub fn start(&mut self, i: usize) {
        let initial = self.initial_cluster();
        let data = self.dir.path().join(&self.members[i].name);
        let m = &mut self.members[i];
        assert!(m.child.is_none(), "member {i} already running");
        let child = command(self.netns.as_deref())
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(format!("http://{}", m.client))
            .arg("--advertise-client-urls")
            .arg(format!("http://{}", m.client))
            .arg("--listen-peer-urls")
            .arg(format!("http://{}", m.peer))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://{}", m.peer))
            .arg("--initial-cluster")
            .arg(&initial)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(&self.token)
            // Fast elections on loopback, so a lost member is replaced quickly.
            .arg("--heartbeat-interval")
            .arg("50")
            .arg("--election-timeout")
            .arg("500")
            // The tests' clients ping every 500 ms; etcd's default minimum is 5 s.
            .arg("--grpc-keepalive-min-time")
            .arg("100ms")
            .arg("--logger")
            .arg("zap")
            .arg("--log-level")
            .arg("error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} (Debian package etcd-server): {e}", etcd_bin()));
        m.child = Some(child);
    }

    /// Kills member `i` (SIGKILL) and waits for it to be gone.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills every member.
    pub fn kill_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }

    /// Starts every member that is not running and waits until the cluster serves again.
    pub async fn restart_all(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                self.start(i);
            }
        }
        self.wait_ready().await;
    }

    /// Every member's client address.
    pub fn client_addrs(&self) -> Vec<SocketAddr> {
        self.members.iter().map(|m| m.client).collect()
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| format!("http://{}", m.client)).collect()
    }

    /// A registry config for this cluster, with timings short enough for tests: a 3 s lease (the
    /// shortest that leaves room for a retried renewal with 500 ms timeouts), 500 ms dial and
    /// request timeouts, 500 ms keepalive pings, 100 ms lame duck.
    pub fn config(&self) -> RegistryConfig {
        let mut c = RegistryConfig::new(self.endpoints());
        c.ttl = Duration::from_secs(3);
        c.dial_timeout = Duration::from_millis(500);
        c.request_timeout = Duration::from_millis(500);
        c.keep_alive = Duration::from_millis(500);
        c.keep_alive_timeout = Duration::from_millis(500);
        c.lame_duck = Duration::from_millis(100);
        c
    }

    /// A client of the running members (for the tests' own reads and writes).
    pub async fn client(&self) -> etcd_client::Client {
        let running: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("http://{}", m.client))
            .collect();
        etcd_client::Client::connect(running, None).await.expect("etcd client")
    }

    /// Waits until a write through every running member's endpoint succeeds (a leader is elected
    /// and the members serve), within 20 s.
    async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            loop {
                let attempt = async {
                    let mut c = etcd_client::Client::connect([format!("http://{}", m.client)], None).await?;
                    c.put("/tether-test/ready", m.name.as_str(), None).await?;
                    Ok::<_, etcd_client::Error>(())
                };
                match tokio::time::timeout(Duration::from_secs(1), attempt).await {
                    Ok(Ok(())) => break,
                    _ if tokio::time::Instant::now() > deadline => {
                        panic!("etcd member {} not serving within 20 s", m.name)
                    }
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
    }

    /// The keys under `prefix` and their values, straight from etcd.
    pub async fn list(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        let mut c = self.client().await;
        let resp = c
            .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
            .await
            .expect("etcd get");
        resp.kvs()
            .iter()
            .map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.value().to_vec()))
            .collect()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill_all();
    }
}
