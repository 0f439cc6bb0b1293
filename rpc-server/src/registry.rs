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

/// Metric (gauge): 1 while this server's registration is live in etcd, 0 otherwise; label `addr`
/// (the advertised address).
pub const REGISTERED: &str = "tether_registry_registered";

/// Sets the registration gauge of the server advertised at `addr`.
pub(crate) fn set_gauge(addr: SocketAddr, value: f64) {
    metrics::gauge!(REGISTERED, "addr" => addr.to_string()).set(value);
}
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
    /// Graceful shutdown began.
    LameDuck,
    /// etcd failed or could not be reached; the lease may still be live.
    Failed(String),
    /// etcd says the lease is gone: register again under a new one.
    Expired,
}

/// Cancels the server's graceful shutdown when dropped once the lame duck has begun: on the
/// normal end of [`Registrar::run`], and if the task panics or is dropped during deregistration.
/// A panic while merely registering leaves the server serving (unregistered), as losing etcd would.
struct ThenShutdown {
    then: CancellationToken,
    lame_duck: CancellationToken,
}

impl Drop for ThenShutdown {
    fn drop(&mut self) {
        if self.lame_duck.is_cancelled() {
            self.then.cancel();
        }
    }
}

impl Registrar {
    /// Registers and renews until `lame_duck` is cancelled, then deregisters and waits the lame
    /// duck period, then cancels `then` (the server's graceful shutdown).
    pub(crate) async fn run(self, lame_duck: CancellationToken, then: CancellationToken) {
        let _then = ThenShutdown {
            then,
            lame_duck: lame_duck.clone(),
        };
        let mut lease: Option<i64> = None;
        let mut etcd: Option<etcd_client::Client> = None;
        let mut registrations = 0u64;
        let mut attempt = 0u32;
        loop {
            let session = self.session(&mut etcd, &mut lease, &mut registrations, &mut attempt, &lame_duck);
            let ended = session.await;
            self.gauge(0.0);
            match ended {
                Ended::LameDuck => break,
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
            // Boxed: deregistering holds an etcd client and its calls, rare and large.
            Some(id) => Box::pin(self.deregister(etcd, id, attempt)).await,
            None => false,
        };
        self.gauge(0.0);
        self.state.send_replace(RegistrationState::Deregistered { removed });
        if removed {
            tokio::time::sleep(self.config.lame_duck).await;
        }
    }

    /// Sets this server's `tether_registry_registered` gauge (labelled by its address, so several
    /// servers in one process each have their own).
    pub(crate) fn gauge(&self, value: f64) {
        set_gauge(self.instance.addr, value);
    }

    fn connect_options(&self) -> etcd_client::ConnectOptions {
        etcd_client::ConnectOptions::new()
            .with_connect_timeout(self.config.dial_timeout)
            .with_keep_alive(self.config.keep_alive, self.config.keep_alive_timeout)
            .with_keep_alive_while_idle(true)
            // A member cut off from its cluster's leader refuses instead of answering stale.
            .with_require_leader(true)
    }

    async fn connect(&self, failures: u32) -> Result<etcd_client::Client, String> {
        let connect = etcd_client::Client::connect([self.config.member(failures)], Some(self.connect_options()));
        match tokio::time::timeout(self.config.dial_timeout, connect).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(format!("connecting to etcd: {e}")),
            Err(_) => Err("connecting to etcd timed out".into()),
        }
    }

    /// How long to wait for one renewal's answer: never longer than the renewal interval, so a
    /// lost answer leaves time for another try before the lease expires.
    fn renewal_wait(&self) -> std::time::Duration {
        self.config.request_timeout.min(self.config.renew_interval())
    }

    /// Connects (if needed), registers (if there is no live lease), then renews until something
    /// fails or `lame_duck` is cancelled. A registration, once its lease is asked for, is not
    /// interrupted (it takes at most `request_timeout`): a lease granted but not yet known here
    /// could not be revoked.
    async fn session(
        &self,
        etcd: &mut Option<etcd_client::Client>,
        lease: &mut Option<i64>,
        registrations: &mut u64,
        attempt: &mut u32,
        lame_duck: &CancellationToken,
    ) -> Ended {
        let timeout = self.config.request_timeout;
        let client = match etcd {
            Some(c) => c,
            None => {
                let connected = tokio::select! {
                    _ = lame_duck.cancelled() => return Ended::LameDuck,
                    c = self.connect(*attempt) => c,
                };
                match connected {
                    Ok(c) => etcd.insert(c),
                    Err(why) => return Ended::Failed(why),
                }
            }
        };
        let id = match *lease {
            Some(id) => id,
            None => match tokio::time::timeout(timeout, self.register(client, lease)).await {
                Ok(Ok(id)) => {
                    *registrations += 1;
                    metrics::counter!(REGISTRATIONS, "result" => "ok").increment(1);
                    tracing::info!(lease = id, addr = %self.instance.addr, services = ?self.services, "registered");
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
        if lame_duck.is_cancelled() {
            return Ended::LameDuck;
        }
        let opened = tokio::select! {
            _ = lame_duck.cancelled() => return Ended::LameDuck,
            r = tokio::time::timeout(timeout, client.lease_keep_alive(id)) => r,
        };
        let (mut keeper, mut answers) = match opened {
            Ok(Ok(k)) => k,
            // The first renewal is sent and answered inside `lease_keep_alive`: a lease that
            // expired while etcd was out of reach is reported here, as not found.
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(why))) if why.contains("not found") => {
                metrics::counter!(LEASE_RENEWALS, "result" => "expired").increment(1);
                tracing::debug!(lease = id, %why, "lease gone");
                return Ended::Expired;
            }
            Ok(Err(e)) => return Ended::Failed(format!("lease keepalive: {e}")),
            Err(_) => return Ended::Failed("lease keepalive timed out".into()),
        };
        let mut confirmed = false;
        loop {
            let renewal = tokio::time::timeout(self.renewal_wait(), async {
                keeper.keep_alive().await?;
                answers.message().await
            });
            let renewed = tokio::select! {
                _ = lame_duck.cancelled() => return Ended::LameDuck,
                r = renewal => r,
            };
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
                self.gauge(1.0);
                self.state.send_replace(RegistrationState::Registered {
                    lease: id,
                    registrations: *registrations,
                });
            }
            tokio::select! {
                _ = lame_duck.cancelled() => return Ended::LameDuck,
                _ = tokio::time::sleep(self.config.renew_interval()) => {}
            }
        }
    }

    /// A new lease (recorded in `lease` at once, so a shutdown from here on deregisters it), and
    /// every service's key under it, in one transaction.
    async fn register(
        &self,
        etcd: &mut etcd_client::Client,
        lease: &mut Option<i64>,
    ) -> Result<i64, etcd_client::Error> {
        let id = etcd.lease_grant(self.config.ttl_secs(), None).await?.id();
        *lease = Some(id);
        self.put_all(etcd, id, &self.instance).await?;
        Ok(id)
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

    /// Lame duck: announce `leaving`, then revoke the lease (which deletes the keys), on the
    /// session's connection or any member in turn, within `2 × (dial_timeout + request_timeout)`.
    /// True when the keys are gone.
    async fn deregister(&self, mut etcd: Option<etcd_client::Client>, lease: i64, attempt: u32) -> bool {
        let mut leaving = self.instance.clone();
        leaving.state = InstanceState::Leaving;
        let budget = (self.config.dial_timeout + self.config.request_timeout) * 2;
        let members = self.config.endpoints.len() as u32;
        let tries = async {
            for i in 0..members.max(1) {
                let mut client = match etcd.take() {
                    Some(c) => c,
                    None => match self.connect(attempt + i).await {
                        Ok(c) => c,
                        Err(why) => {
                            tracing::debug!(error = %why, "deregistering: member unreachable");
                            continue;
                        }
                    },
                };
                let steps = async {
                    self.put_all(&mut client, lease, &leaving).await?;
                    client.lease_revoke(lease).await?;
                    Ok::<_, etcd_client::Error>(())
                };
                match tokio::time::timeout(self.config.request_timeout, steps).await {
                    Ok(Ok(())) => return true,
                    // Already gone: the keys went with it.
                    Ok(Err(etcd_client::Error::GRpcStatus(s))) if s.message().contains("lease not found") => {
                        return true
                    }
                    Ok(Err(e)) => tracing::debug!(lease, error = %e, "deregistering failed on one member"),
                    Err(_) => tracing::debug!(lease, "deregistering timed out on one member"),
                }
            }
            false
        };
        match tokio::time::timeout(budget, tries).await {
            Ok(true) => {
                tracing::info!(lease, addr = %self.instance.addr, "deregistered (lame duck)");
                true
            }
            _ => {
                tracing::warn!(lease, "deregistering failed; the lease will expire");
                false
            }
        }
    }
}
