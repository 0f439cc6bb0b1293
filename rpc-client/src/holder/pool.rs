//! Which pool each endpoint is in, as pure logic: the holder calls these with `now` and a random
//! value, so every move is testable without sockets or sleeps.

use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::BackoffConfig;

/// Where an endpoint stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolState {
    /// Has open connections; requests are routed to it.
    Alive,
    /// No usable connection; reconnect attempts are due at `next_attempt`. No requests are routed
    /// to it.
    Retry {
        /// Failed connect attempts since it left the alive pool.
        attempts: u32,
        /// When the next attempt may start.
        next_attempt: Instant,
    },
    /// Given up after `max_reconnect_attempts`; only a discovery update brings it back.
    Discarded,
    /// Alive (its connections are fine) but ejected for gray failure until `until` (outlier
    /// detection, [`crate::holder::OutlierConfig`]): no new requests go to it. Only
    /// [`crate::ConnectionHolder::endpoints`] reports this; the pool logic never enters it.
    Ejected {
        /// When it goes on probation.
        until: Instant,
        /// Its ejections not yet forgiven, this one included.
        times: u32,
    },
}

/// What a failed connect attempt led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Try again after `delay`.
    RetryIn {
        /// Attempt number just failed.
        attempt: u32,
        /// Delay before the next attempt.
        delay: Duration,
    },
    /// Too many attempts: discard the endpoint.
    Discard {
        /// Attempts made.
        attempts: u32,
    },
}

/// The pool state of one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointPool {
    state: PoolState,
}

impl EndpointPool {
    /// A new endpoint: in the retry pool, due at once.
    pub fn new(now: Instant) -> Self {
        EndpointPool {
            state: PoolState::Retry {
                attempts: 0,
                next_attempt: now,
            },
        }
    }

    /// The current state.
    pub fn state(&self) -> PoolState {
        self.state
    }

    /// A connection to it opened: it is alive.
    pub fn on_connected(&mut self) {
        self.state = PoolState::Alive;
    }

    /// Its last usable connection closed (or failed validation) at `now`. The first reconnect is
    /// due at once: a closed connection is not a failed endpoint (a server's idle eviction closes
    /// healthy connections); failed attempts back off.
    pub fn on_lost(&mut self, now: Instant) {
        if self.state == PoolState::Alive {
            self.state = PoolState::Retry {
                attempts: 0,
                next_attempt: now,
            };
        }
    }

    /// A connect attempt failed at `now`; `unit` is a random value in `[0, 1)` for the jitter.
    pub fn on_connect_failed(
        &mut self,
        now: Instant,
        backoff: &BackoffConfig,
        max_attempts: Option<u32>,
        unit: f64,
    ) -> AfterFailure {
        let attempts = match self.state {
            PoolState::Retry { attempts, .. } => attempts + 1,
            // Connects that top up an alive endpoint (`Ejected` is only ever reported).
            PoolState::Alive | PoolState::Ejected { .. } => 1,
            PoolState::Discarded => return AfterFailure::Discard { attempts: 0 },
        };
        if max_attempts.is_some_and(|m| attempts >= m) {
            self.state = PoolState::Discarded;
            return AfterFailure::Discard { attempts };
        }
        let delay = backoff.delay(attempts, unit);
        if let PoolState::Retry { .. } = self.state {
            self.state = PoolState::Retry {
                attempts,
                next_attempt: now + delay,
            };
        }
        AfterFailure::RetryIn {
            attempt: attempts,
            delay,
        }
    }

    /// True when a reconnect attempt may start at `now`.
    pub fn is_due(&self, now: Instant) -> bool {
        matches!(self.state, PoolState::Retry { next_attempt, .. } if next_attempt <= now)
    }

    /// When the next attempt is due, if it is in the retry pool.
    pub fn next_attempt(&self) -> Option<Instant> {
        match self.state {
            PoolState::Retry { next_attempt, .. } => Some(next_attempt),
            _ => None,
        }
    }

    /// Brought back (a discovery update named it again).
    pub fn revive(&mut self, now: Instant) {
        if self.state == PoolState::Discarded {
            self.state = PoolState::Retry {
                attempts: 0,
                next_attempt: now,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_then_failures_back_off_then_success_returns_to_alive() {
        let t0 = Instant::now();
        let b = BackoffConfig::default();
        let mut p = EndpointPool::new(t0);
        assert!(p.is_due(t0));
        p.on_connected();
        assert_eq!(p.state(), PoolState::Alive);
        assert!(!p.is_due(t0));

        let t1 = t0 + Duration::from_secs(5);
        p.on_lost(t1);
        assert!(p.is_due(t1), "first reconnect right away");
        assert_eq!(
            p.on_connect_failed(t1, &b, None, 0.5),
            AfterFailure::RetryIn {
                attempt: 1,
                delay: Duration::from_secs(1)
            }
        );
        assert!(!p.is_due(t1 + Duration::from_millis(999)));
        assert!(p.is_due(t1 + Duration::from_secs(1)));
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!(
            p.on_connect_failed(t2, &b, None, 0.5),
            AfterFailure::RetryIn {
                attempt: 2,
                delay: Duration::from_secs_f64(1.6)
            }
        );
        assert_eq!(p.next_attempt(), Some(t2 + Duration::from_secs_f64(1.6)));
        p.on_connected();
        assert_eq!(p.state(), PoolState::Alive);
        // The count starts over after a success.
        p.on_lost(t2);
        assert_eq!(
            p.on_connect_failed(t2, &b, None, 0.5),
            AfterFailure::RetryIn {
                attempt: 1,
                delay: Duration::from_secs(1)
            }
        );
    }

    #[test]
    fn discarded_after_max_attempts_and_revived_by_discovery() {
        let t0 = Instant::now();
        let b = BackoffConfig::default();
        let mut p = EndpointPool::new(t0);
        assert!(matches!(
            p.on_connect_failed(t0, &b, Some(3), 0.1),
            AfterFailure::RetryIn { attempt: 1, .. }
        ));
        assert!(matches!(
            p.on_connect_failed(t0, &b, Some(3), 0.9),
            AfterFailure::RetryIn { attempt: 2, .. }
        ));
        assert_eq!(
            p.on_connect_failed(t0, &b, Some(3), 0.5),
            AfterFailure::Discard { attempts: 3 }
        );
        assert_eq!(p.state(), PoolState::Discarded);
        assert!(!p.is_due(t0 + Duration::from_secs(1000)));
        p.revive(t0);
        assert!(p.is_due(t0));
    }
}
