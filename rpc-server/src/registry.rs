//! Registration on etcd (feature `etcd`): [`ServerBuilder::registry`](crate::ServerBuilder::registry)
//! makes a server register every service it serves, under the key layout of
//! [`rpc_core::registry`], with an etcd lease that it renews every third of the TTL.
//!
//! - A server that loses etcd keeps serving. Its lease expires after the TTL if etcd stays
//!   reachable to others; when it reaches etcd again it renews the same lease, or registers under a
//!   new one if that expired.
//! - Graceful shutdown is lame duck: the keys are rewritten as `leaving` and the lease revoked
//!   (deleting them), then the server waits [`RegistryConfig::lame_duck`] and only then sends
//!   GOAWAY, so clients stop picking it before it drains. [`ServerHandle::abort`] stops renewing
//!   without deregistering, as a crash would.
//!
//! [`ServerHandle::abort`]: crate::ServerHandle::abort

use std::net::SocketAddr;

use etcd_client::{PutOptions, Txn, TxnOp};
use rpc_core::registry::{instance_key, Instance, InstanceState, RegistryConfig};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Metric (gauge): 1 while this server's registration is live in etcd, 0 otherwise.
pub const REGISTERED: &str = "tether_registry_registered";
/// Metric: leases granted and keys written (the first registration, and each one after a lease
/// expired), label `result`.
pub const REGISTRATIONS: &str = "tether_registry_registrations_total";
/// Metric: lease renewals, label `result` (`ok`, `expired`, `failed`).
pub const LEASE_RENEWALS: &str = "tether_registry_lease_renewals_total";

/// Where a server's registration stands ([`crate::ServerHandle::registration`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrationState {
    /// Not registered yet, or etcd was lost before the lease could be confirmed.
    Unregistered {
        /// Why the last attempt failed, if one did.
        last_error: Option<String>,
    },
    /// The keys are written under a live lease.
    Registered {
        /// The etcd lease.
        lease: i64,
        /// Registrations so far (1 for the first; more after leases expired).
        registrations: u64,
    },
    /// Lame duck: deregistered (or tried to) on graceful shutdown.
    Deregistered {
        /// Whether the keys were removed (false: etcd was unreachable; the lease expires).
        removed: bool,
    },
}

/// What one server registers.
pub(crate) struct Registrar {
    pub(crate) config: RegistryConfig,
    pub(crate) services: Vec<String>,
    pub(crate) instance: Instance,
    pub(crate) state: watch::Sender<RegistrationState>,
}

/// The instance record a server at `local` with this config publishes; an error when there is no
/// address a client could reach.
pub(crate) fn instance(config: &RegistryConfig, local: SocketAddr, tls: bool) -> Result<Instance, String> {
    let addr = config.advertise_addr.unwrap_or(local);
    if addr.ip().is_unspecified() || addr.port() == 0 {
        return Err(format!(
            "cannot register {addr}: bound to an unspecified address, set registry.advertise_addr"
        ));
    }
    let mut me = Instance::new(addr);
    me.zone = config.zone.clone();
    me.weight = config.weight;
    me.metadata = config.metadata.clone();
    me.tls = tls;
    Ok(me)
}

/// How a registration session ended.
enum Ended {
    /// etcd failed or could not be reached; the lease may still be live.
    Failed(String),
    /// etcd says the lease is gone: register again under a new one.
    Expired,
}

impl Registrar {
    /// Registers and renews until `lame_duck` is cancelled, then deregisters and waits the lame
    /// duck period; `then` (the server's graceful shutdown) is cancelled when this returns or is
    /// dropped, whatever happens.
    pub(crate) async fn run(self, lame_duck: CancellationToken, then: CancellationToken) {
        let _then = then.drop_guard();
        let mut lease: Option<i64> = None;
        let mut etcd: Option<etcd_client::Client> = None;
        let mut registrations = 0u64;
        let mut attempt = 0u32;
        loop {
            let ended = tokio::select! {
                _ = lame_duck.cancelled() => break,
                e = self.session(&mut etcd, &mut lease, &mut registrations, &mut attempt) => e,
            };
            metrics::gauge!(REGISTERED).set(0.0);
            match ended {
                Ended::Expired => {
                    tracing::warn!(?lease, "registry lease expired; registering again");
                    lease = None;
                    self.state.send_replace(RegistrationState::Unregistered {
                        last_error: Some("lease expired".into()),
                    });
                }
                Ended::Failed(why) => {
                    tracing::warn!(error = %why, "registry unreachable; serving on, retrying");
                    etcd = None;
                    self.state
                        .send_replace(RegistrationState::Unregistered { last_error: Some(why) });
                }
            }
            // The next member at once, until each has failed; then back off (capped at the renewal
            // interval, so a lease that is still live is renewed in time once etcd answers).
            attempt = attempt.saturating_add(1);
            let members = self.config.endpoints.len() as u32;
            let delay = match attempt.checked_sub(members) {
                None => std::time::Duration::ZERO,
                Some(n) => std::time::Duration::from_millis(100 * 2u64.pow(n.min(6))).min(self.config.renew_interval()),
            };
            tokio::select! {
                _ = lame_duck.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        let removed = match lease {
            Some(id) => {
                let etcd = match etcd {
                    Some(c) => Some(c),
                    None => {
                        let connect =
                            etcd_client::Client::connect([self.member(attempt)], Some(self.connect_options()));
                        tokio::time::timeout(self.config.dial_timeout, connect)
                            .await
                            .ok()
                            .and_then(Result::ok)
                    }
                };
                match etcd {
                    Some(mut etcd) => self.deregister(&mut etcd, id).await,
                    None => false,
                }
            }
            None => false,
        };
        metrics::gauge!(REGISTERED).set(0.0);
        self.state.send_replace(RegistrationState::Deregistered { removed });
        if removed {
            tokio::time::sleep(self.config.lame_duck).await;
        }
    }

    /// The etcd member to use after `failures` failed sessions in a row: one at a time, in turn.
    fn member(&self, failures: u32) -> &str {
        let n = self.config.endpoints.len().max(1);
        self.config
            .endpoints
            .get(failures as usize % n)
            .map_or("", String::as_str)
    }

    fn connect_options(&self) -> etcd_client::ConnectOptions {
        etcd_client::ConnectOptions::new()
            .with_connect_timeout(self.config.dial_timeout)
            .with_keep_alive(self.config.keep_alive, self.config.keep_alive_timeout)
            .with_keep_alive_while_idle(true)
    }

    /// Connects (if needed), registers (if there is no live lease), then renews until something
    /// fails.
    async fn session(
        &self,
        etcd: &mut Option<etcd_client::Client>,
        lease: &mut Option<i64>,
        registrations: &mut u64,
        attempt: &mut u32,
    ) -> Ended {
        let timeout = self.config.request_timeout;
        let client = match etcd {
            Some(c) => c,
            None => {
                let connect = etcd_client::Client::connect([self.member(*attempt)], Some(self.connect_options()));
                match tokio::time::timeout(self.config.dial_timeout, connect).await {
                    Ok(Ok(c)) => etcd.insert(c),
                    Ok(Err(e)) => return Ended::Failed(format!("connecting to etcd: {e}")),
                    Err(_) => return Ended::Failed("connecting to etcd timed out".into()),
                }
            }
        };
        let id = match *lease {
            Some(id) => id,
            None => match tokio::time::timeout(timeout, self.register(client)).await {
                Ok(Ok(id)) => {
                    *registrations += 1;
                    metrics::counter!(REGISTRATIONS, "result" => "ok").increment(1);
                    tracing::info!(lease = id, addr = %self.instance.addr, services = ?self.services, "registered");
                    *lease = Some(id);
                    id
                }
                Ok(Err(e)) => {
                    metrics::counter!(REGISTRATIONS, "result" => "failed").increment(1);
                    return Ended::Failed(format!("registering: {e}"));
                }
                Err(_) => {
                    metrics::counter!(REGISTRATIONS, "result" => "failed").increment(1);
                    return Ended::Failed("registering timed out".into());
                }
            },
        };
        let (mut keeper, mut answers) = match tokio::time::timeout(timeout, client.lease_keep_alive(id)).await {
            Ok(Ok(k)) => k,
            Ok(Err(e)) => return Ended::Failed(format!("lease keepalive: {e}")),
            Err(_) => return Ended::Failed("lease keepalive timed out".into()),
        };
        let mut confirmed = false;
        loop {
            let renewed = tokio::time::timeout(timeout, async {
                keeper.keep_alive().await?;
                answers.message().await
            })
            .await;
            match renewed {
                Ok(Ok(Some(answer))) if answer.ttl() > 0 => {
                    metrics::counter!(LEASE_RENEWALS, "result" => "ok").increment(1);
                }
                Ok(Ok(Some(_))) => {
                    metrics::counter!(LEASE_RENEWALS, "result" => "expired").increment(1);
                    return Ended::Expired;
                }
                Ok(Ok(None)) => {
                    metrics::counter!(LEASE_RENEWALS, "result" => "failed").increment(1);
                    return Ended::Failed("lease keepalive stream ended".into());
                }
                Ok(Err(e)) => {
                    metrics::counter!(LEASE_RENEWALS, "result" => "failed").increment(1);
                    return Ended::Failed(format!("lease keepalive: {e}"));
                }
                Err(_) => {
                    metrics::counter!(LEASE_RENEWALS, "result" => "failed").increment(1);
                    return Ended::Failed("lease keepalive timed out".into());
                }
            }
            if !confirmed {
                // Registered (or, after etcd came back, still registered) for sure.
                confirmed = true;
                *attempt = 0;
                metrics::gauge!(REGISTERED).set(1.0);
                self.state.send_replace(RegistrationState::Registered {
                    lease: id,
                    registrations: *registrations,
                });
            }
            tokio::time::sleep(self.config.renew_interval()).await;
        }
    }

    /// A new lease, and every service's key under it, in one transaction.
    async fn register(&self, etcd: &mut etcd_client::Client) -> Result<i64, etcd_client::Error> {
        let lease = etcd.lease_grant(self.config.ttl_secs(), None).await?.id();
        self.put_all(etcd, lease, &self.instance).await?;
        Ok(lease)
    }

    async fn put_all(
        &self,
        etcd: &mut etcd_client::Client,
        lease: i64,
        record: &Instance,
    ) -> Result<(), etcd_client::Error> {
        let value = record.encode();
        let ops: Vec<TxnOp> = self
            .services
            .iter()
            .map(|s| {
                let key = instance_key(&self.config.prefix, s, record.addr);
                TxnOp::put(key, value.clone(), Some(PutOptions::new().with_lease(lease)))
            })
            .collect();
        etcd.txn(Txn::new().and_then(ops)).await?;
        Ok(())
    }

    /// Lame duck: announce `leaving`, then revoke the lease (which deletes the keys). True when
    /// the keys are gone.
    async fn deregister(&self, etcd: &mut etcd_client::Client, lease: i64) -> bool {
        let mut leaving = self.instance.clone();
        leaving.state = InstanceState::Leaving;
        let steps = async {
            self.put_all(etcd, lease, &leaving).await?;
            etcd.lease_revoke(lease).await?;
            Ok::<_, etcd_client::Error>(())
        };
        match tokio::time::timeout(self.config.request_timeout, steps).await {
            Ok(Ok(())) => {
                tracing::info!(lease, addr = %self.instance.addr, "deregistered (lame duck)");
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(lease, error = %e, "deregistering failed; the lease will expire");
                false
            }
            Err(_) => {
                tracing::warn!(lease, "deregistering timed out; the lease will expire");
                false
            }
        }
    }
}
