//! Discovery on etcd (feature `etcd`): [`Client::with_registry`] lists a service's instances,
//! watches their prefix from the listing's revision (so no change between the two is lost), and
//! feeds the holder: a new instance is connected, a removed one drained (its requests in flight
//! finish, no new ones go to it), never cut.
//!
//! When etcd cannot be reached the client keeps the endpoints it knows, and lists again from
//! scratch once it can. An update that would leave no endpoint is held back unless every instance
//! deregistered gracefully (see [`directory`]). The key layout is in [`rpc_core::registry`].

pub mod directory;

use std::net::SocketAddr;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions};
use rpc_core::registry::{service_prefix, Instance, RegistryConfig};
use tokio::sync::{oneshot, watch};

use crate::backoff::BackoffConfig;
use crate::holder::WeakHolder;
use crate::{Client, ClientConfig, Error, ErrorKind};
use directory::{Decision, Directory, Update};

/// Metric: registry updates applied to the holder, label `service`.
pub const REGISTRY_UPDATES: &str = "tether_registry_updates_total";
/// Metric: updates held back because they would have left no endpoint, label `service`.
pub const REGISTRY_HELD_BACK: &str = "tether_registry_held_back_total";
/// Metric: watches re-established (etcd unreachable, watch cancelled or compacted), label `service`.
pub const REGISTRY_WATCH_RESTARTS: &str = "tether_registry_watch_restarts_total";
/// Metric (gauge): instances registered for a service (serving or leaving), labels `service` and
/// `prefix` (0 once the client is gone).
pub const REGISTRY_INSTANCES: &str = "tether_registry_instances";

/// Where a client's discovery stands ([`Client::discovery`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiscoveryState {
    /// The etcd revision of the last listing or watch batch applied.
    pub revision: i64,
    /// Instances registered (serving or leaving).
    pub instances: usize,
    /// The endpoints the holder was given (sorted).
    pub endpoints: Vec<SocketAddr>,
    /// The last update was held back: it would have left no endpoint.
    pub held_back: bool,
    /// A watch is established; false while etcd is unreachable (the endpoints are kept).
    pub watching: bool,
    /// Why the last watch ended, if one did.
    pub last_error: Option<String>,
}

impl Client {
    /// A client for the instances of `service` (its full protobuf name, such as `echo.v1.Echo`)
    /// registered in etcd. Returns once the first listing is applied; fails with
    /// [`ErrorKind::Registry`] if no etcd member gives it (each is tried in turn, within its
    /// `dial_timeout` and `request_timeout`).
    /// Discovery then follows the registry until the client is closed or dropped.
    pub async fn with_registry(service: &str, registry: RegistryConfig, config: ClientConfig) -> Result<Self, Error> {
        registry
            .validate()
            .map_err(|e| Error::new(ErrorKind::Config(e), false))?;
        let mut client = Client::with_endpoints([], config)?;
        let (state_tx, state_rx) = watch::channel(DiscoveryState::default());
        let (first_tx, first_rx) = oneshot::channel();
        let watcher = Watcher {
            service: service.to_string(),
            prefix: service_prefix(&registry.prefix, service),
            config: registry,
            holder: client.holder.downgrade(),
            directory: Directory::new(),
            state: state_tx,
        };
        tokio::spawn(watcher.run(first_tx));
        match first_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(why)) => return Err(Error::new(ErrorKind::Registry(why), false)),
            Err(_) => return Err(Error::new(ErrorKind::Registry("discovery stopped".into()), false)),
        }
        client.discovery = Some(state_rx);
        Ok(client)
    }

    /// Where discovery stands, for a client made by [`Client::with_registry`] (a receiver: `borrow`
    /// it, or wait for `changed`).
    pub fn discovery(&self) -> Option<watch::Receiver<DiscoveryState>> {
        self.discovery.clone()
    }
}

struct Watcher {
    service: String,
    prefix: String,
    config: RegistryConfig,
    holder: WeakHolder,
    directory: Directory,
    state: watch::Sender<DiscoveryState>,
}

/// Between attempts to reach etcd again.
const RECONNECT_BACKOFF: BackoffConfig = BackoffConfig {
    initial: Duration::from_millis(100),
    multiplier: 2.0,
    jitter: 0.2,
    max: Duration::from_secs(5),
    __non_exhaustive: (),
};

impl Watcher {
    async fn run(mut self, first: oneshot::Sender<Result<(), String>>) {
        let stopped = self.holder.stopped().clone();
        let mut first = Some(first);
        let mut attempt = 0u32;
        loop {
            let why = tokio::select! {
                _ = stopped.cancelled() => break,
                why = self.session(&mut first, &mut attempt) => why,
            };
            // The first listing gives up only once every member has failed it.
            if attempt + 1 >= self.config.endpoints.len() as u32 {
                if let Some(first) = first.take() {
                    let _ = first.send(Err(why));
                    return;
                }
            }
            tracing::warn!(service = %self.service, error = %why, "registry watch lost; keeping the known endpoints");
            metrics::counter!(REGISTRY_WATCH_RESTARTS, "service" => self.service.clone()).increment(1);
            self.state.send_modify(|s| {
                s.watching = false;
                s.last_error = Some(why);
            });
            // The next member at once, until each has failed; then back off.
            attempt = attempt.saturating_add(1);
            let members = self.config.endpoints.len() as u32;
            let delay = match attempt.checked_sub(members) {
                None => Duration::ZERO,
                Some(n) => RECONNECT_BACKOFF.delay(n, rand::random::<f64>()),
            };
            tokio::select! {
                _ = stopped.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        self.gauge(0.0);
    }

    /// Lists, then watches until the watch fails; returns why. `attempt` (failed sessions in a
    /// row) picks the etcd member, and is reset once a watch is established.
    async fn session(&mut self, first: &mut Option<oneshot::Sender<Result<(), String>>>, attempt: &mut u32) -> String {
        let timeout = self.config.request_timeout;
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(self.config.dial_timeout)
            .with_keep_alive(self.config.keep_alive, self.config.keep_alive_timeout)
            .with_keep_alive_while_idle(true)
            // A member cut off from its cluster's leader cancels the watch rather than keeping it
            // open and silent.
            .with_require_leader(true);
        let mut etcd = match tokio::time::timeout(
            self.config.dial_timeout,
            etcd_client::Client::connect([self.config.member(*attempt)], Some(options)),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return format!("connecting to etcd: {e}"),
            Err(_) => return "connecting to etcd timed out".to_string(),
        };
        let listing = match tokio::time::timeout(
            timeout,
            etcd.get(self.prefix.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await
        {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return format!("listing {}: {e}", self.prefix),
            Err(_) => return format!("listing {} timed out", self.prefix),
        };
        let revision = listing.header().map_or(0, |h| h.revision());
        let entries: Vec<(String, Option<Instance>)> = listing
            .kvs()
            .iter()
            .map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), self.read(kv.value())))
            .collect();
        let decision = self.directory.reset(entries);
        self.apply(decision, revision);
        if let Some(first) = first.take() {
            let _ = first.send(Ok(()));
        }
        // From the listing's revision on: no change between the listing and the watch is lost.
        let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
        let mut stream = match tokio::time::timeout(timeout, etcd.watch(self.prefix.as_str(), Some(options))).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return format!("watching {}: {e}", self.prefix),
            Err(_) => return format!("watching {} timed out", self.prefix),
        };
        self.state.send_modify(|s| s.watching = true);
        loop {
            let response = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return "the watch ended".to_string(),
                Err(e) => return format!("watch: {e}"),
            };
            if response.canceled() {
                // Compacted past our revision, or cancelled by etcd: list again.
                return format!(
                    "watch cancelled (compact revision {}): {}",
                    response.compact_revision(),
                    response.cancel_reason()
                );
            }
            if response.created() {
                *attempt = 0;
            }
            if response.events().is_empty() {
                continue; // created, or a progress notification
            }
            let revision = response.header().map_or(0, |h| h.revision());
            let batch: Vec<Update> = response
                .events()
                .iter()
                .filter_map(|ev| {
                    let kv = ev.kv()?;
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    Some(match ev.event_type() {
                        EventType::Put => Update::Put {
                            key,
                            instance: self.read(kv.value()),
                        },
                        EventType::Delete => Update::Delete { key },
                    })
                })
                .collect();
            let decision = self.directory.apply(batch);
            self.apply(decision, revision);
        }
    }

    /// `tether_registry_instances` of this client's service and prefix.
    fn gauge(&self, value: f64) {
        metrics::gauge!(REGISTRY_INSTANCES, "service" => self.service.clone(), "prefix" => self.prefix.clone())
            .set(value);
    }

    fn read(&self, value: &[u8]) -> Option<Instance> {
        match Instance::decode(value) {
            Ok(i) => Some(i),
            Err(e) => {
                tracing::warn!(service = %self.service, error = %e, "ignoring an unreadable registry entry");
                None
            }
        }
    }

    fn apply(&mut self, decision: Decision, revision: i64) {
        let was_held = self.state.borrow().held_back;
        let endpoints = match decision {
            Decision::Unchanged => None,
            Decision::Set(addrs) => {
                tracing::info!(service = %self.service, endpoints = ?addrs, "registry update");
                metrics::counter!(REGISTRY_UPDATES, "service" => self.service.clone()).increment(1);
                Some(addrs)
            }
            Decision::HeldBack(kept) => {
                if !was_held {
                    tracing::warn!(
                        service = %self.service,
                        kept = ?kept,
                        "registry update would leave no endpoint and not every instance deregistered: held back (empty push protection)"
                    );
                }
                metrics::counter!(REGISTRY_HELD_BACK, "service" => self.service.clone()).increment(1);
                Some(kept)
            }
        };
        if let Some(addrs) = &endpoints {
            self.holder.set_endpoints(addrs);
        }
        self.gauge(self.directory.instances() as f64);
        let held_back = self.directory.held_back();
        let instances = self.directory.instances();
        self.state.send_modify(|s| {
            s.revision = s.revision.max(revision);
            s.instances = instances;
            s.held_back = held_back;
            if let Some(addrs) = endpoints {
                s.endpoints = addrs;
            }
        });
    }
}
