//! The harness of the real-kernel fault suite: a server and a client host, each its own network
//! namespace, joined by a veth pair; the probe binaries run inside them with `--json`; faults are
//! nftables rules and signals. Namespaces are always deleted, even when a test fails.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command as AsyncCommand};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Why the suite cannot run here, if it cannot.
pub fn missing_prerequisite() -> Option<String> {
    if !cfg!(target_os = "linux") {
        return Some("not Linux".into());
    }
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if uid.as_deref() != Some("0") {
        return Some("not running as root".into());
    }
    for tool in ["ip", "nft", "ss"] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .map(|o| o.status.success());
        if !matches!(found, Ok(true)) {
            return Some(format!("`{tool}` not installed (iproute2, nftables)"));
        }
    }
    for bin in ["echo-server", "echo-client"] {
        if !bin_path(bin).exists() {
            return Some(format!(
                "{} not built (cargo build -p examples --bins)",
                bin_path(bin).display()
            ));
        }
    }
    None
}

/// Returns true when the suite should skip; under `CI=true` a missing prerequisite fails instead.
pub fn skip_unless_ready() -> bool {
    match missing_prerequisite() {
        None => false,
        Some(why) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("real-kernel suite cannot run in CI: {why}")
        }
        Some(why) => {
            eprintln!("skipping the real-kernel fault suite: {why}");
            true
        }
    }
}

/// The probe binaries, next to this test executable's `deps/` directory.
pub fn bin_path(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target profile dir")
        .join(name)
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().expect("run command");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two hosts joined by a veth pair: the server at `198.18.<case>.1`, the client at `.2`.
pub struct Hosts {
    pub server_ns: String,
    pub client_ns: String,
    pub server_if: String,
    pub server_ip: String,
    pub client_ip: String,
}

impl Hosts {
    pub fn new(case: u8) -> Hosts {
        let tag = format!("{}{case}", std::process::id() % 100_000);
        let h = Hosts {
            server_ns: format!("tether-s{tag}"),
            client_ns: format!("tether-c{tag}"),
            server_if: format!("ts{tag}"),
            server_ip: format!("198.18.{case}.1"),
            client_ip: format!("198.18.{case}.2"),
        };
        let client_if = format!("tc{tag}");
        // Leftovers of an earlier, killed run of the same case are removed first.
        let _ = Command::new("ip")
            .args(["netns", "del", &h.server_ns])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &h.client_ns])
            .stderr(Stdio::null())
            .status();
        run(&["ip", "netns", "add", &h.server_ns]);
        run(&["ip", "netns", "add", &h.client_ns]);
        run(&[
            "ip",
            "link",
            "add",
            &h.server_if,
            "netns",
            &h.server_ns,
            "type",
            "veth",
            "peer",
            "name",
            &client_if,
            "netns",
            &h.client_ns,
        ]);
        for (ns, ifname, ip) in [
            (&h.server_ns, &h.server_if, &h.server_ip),
            (&h.client_ns, &client_if, &h.client_ip),
        ] {
            run(&["ip", "-n", ns, "addr", "add", &format!("{ip}/24"), "dev", ifname]);
            run(&["ip", "-n", ns, "link", "set", ifname, "up"]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        h
    }

    /// The server's listen address.
    pub fn server_addr(&self) -> String {
        format!("{}:7000", self.server_ip)
    }

    /// Loads nftables rules into the server's namespace (in a table `tether_fault`).
    pub fn nft(&self, chains: &str) {
        let rules = format!("table inet tether_fault {{\n{chains}\n}}\n");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.server_ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nft");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(rules.as_bytes())
            .expect("write rules");
        let out = child.wait_with_output().expect("nft");
        assert!(
            out.status.success(),
            "nft failed: {}\n{rules}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Power loss: every packet between the hosts dropped, both ways.
    pub fn drop_all(&self) {
        let i = &self.server_if;
        self.nft(&format!(
            "chain input {{ type filter hook input priority 0; iifname \"{i}\" drop; }}\n\
             chain output {{ type filter hook output priority 0; oifname \"{i}\" drop; }}"
        ));
    }

    /// A NAT that forgot one flow: only the packets of the client's connection from `port` dropped.
    pub fn drop_flow(&self, port: u16) {
        self.nft(&format!(
            "chain input {{ type filter hook input priority 0; tcp sport {port} drop; }}\n\
             chain output {{ type filter hook output priority 0; tcp dport {port} drop; }}"
        ));
    }

    /// A NAT that forgot every flow to the server's `port` (and drops new ones): that server is
    /// unreachable, the others on the host are not.
    pub fn drop_port(&self, port: u16) {
        self.nft(&format!(
            "chain input {{ type filter hook input priority 0; tcp dport {port} drop; }}\n\
             chain output {{ type filter hook output priority 0; tcp sport {port} drop; }}"
        ));
    }

    /// New connections blackholed: SYNs to the server dropped.
    pub fn drop_syn(&self) {
        self.nft(
            "chain input { type filter hook input priority 0; tcp dport 7000 tcp flags & (syn | ack) == syn drop; }",
        );
    }

    /// Removes the fault rules.
    pub fn heal(&self) {
        run(&[
            "ip",
            "netns",
            "exec",
            &self.server_ns,
            "nft",
            "delete",
            "table",
            "inet",
            "tether_fault",
        ]);
    }

    /// Established TCP connections in the client's namespace, as `ss` prints them.
    pub fn client_established(&self) -> Vec<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.client_ns, "ss", "-tnH", "state", "established"])
            .output()
            .expect("ss");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect()
    }

    /// Starts `bin` in `ns` with `args`, reading its JSON lines.
    pub fn spawn(&self, ns: &str, bin: &str, args: &[String]) -> Probe {
        let mut cmd = AsyncCommand::new("ip");
        cmd.args(["netns", "exec", ns]).arg(bin_path(bin)).args(args);
        Probe::start(cmd)
    }
}

impl Probe {
    /// Starts a probe binary in this network namespace (no `ip netns exec`).
    pub fn local(bin: &str, args: &[String]) -> Probe {
        let mut cmd = AsyncCommand::new(bin_path(bin));
        cmd.args(args);
        Probe::start(cmd)
    }

    fn start(mut cmd: AsyncCommand) -> Probe {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn probe");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if tx.send((Instant::now(), v)).is_err() {
                        break;
                    }
                }
            }
        });
        Probe {
            child,
            rx,
            seen: Vec::new(),
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Deleting a namespace kills the veth pair with it.
        let _ = Command::new("ip").args(["netns", "del", &self.server_ns]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.client_ns]).status();
    }
}

/// A probe process and the JSON lines it printed, each with the time it was read.
pub struct Probe {
    pub child: Child,
    rx: mpsc::UnboundedReceiver<(Instant, Value)>,
    pub seen: Vec<(Instant, Value)>,
}

impl Probe {
    /// Waits for a line matching `pred` (among the lines not yet examined), up to `limit`.
    pub async fn wait(&mut self, limit: Duration, pred: impl Fn(&Value) -> bool) -> Option<(Instant, Value)> {
        let deadline = Instant::now() + limit;
        loop {
            let next = tokio::time::timeout_at(deadline, self.rx.recv()).await.ok().flatten()?;
            self.seen.push(next.clone());
            if pred(&next.1) {
                return Some(next);
            }
        }
    }

    /// Reads every remaining line until the process exits (bounded by `limit`).
    pub async fn finish(&mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            while let Some(line) = self.rx.recv().await {
                self.seen.push(line);
            }
        })
        .await;
        let _ = self.child.kill().await;
    }

    /// Sends a signal (`KILL`, `STOP`, `CONT`) to the process.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("probe still running");
        run(&["kill", &format!("-{sig}"), &pid.to_string()]);
    }

    /// Lines printed so far (including any not yet examined) that match `pred`.
    pub fn matching<'a>(
        &'a mut self,
        pred: impl Fn(&Value) -> bool + 'a,
    ) -> impl Iterator<Item = &'a (Instant, Value)> + 'a {
        while let Ok(line) = self.rx.try_recv() {
            self.seen.push(line);
        }
        self.seen.iter().filter(move |(_, v)| pred(v))
    }
}

/// `event == name` on a JSON line.
pub fn is_event(v: &Value, name: &str) -> bool {
    v["event"] == name
}

/// One row of the suite's report.
pub struct Row<'a> {
    pub fault: &'a str,
    pub bound: String,
    pub client: String,
    pub server: String,
    pub recovery: String,
    pub unresolved: u64,
}

/// Appends a row to `target/liveness-report.md` (and prints it), so a run leaves its table behind.
pub fn report(row: Row<'_>) {
    let line = format!(
        "| {} | {} | {} | {} | {} | {} |",
        row.fault, row.bound, row.client, row.server, row.recovery, row.unresolved
    );
    eprintln!("{line}");
    let path = bin_path("liveness-report.md");
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "{line}");
    }
}

/// Formats a duration as seconds with two decimals.
pub fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}
