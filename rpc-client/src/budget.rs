//! A client-wide retry budget, after Finagle's: retries at most `ratio` of the requests of the
//! last `window`, plus a floor of `min_per_second`, so that in a total outage a client multiplies
//! its load by at most `1 + ratio` (plus the floor) instead of by `max_attempts`.
//!
//! [`Budget`] is the pure rule (time in, decisions out); [`RetryBudget`] the handle a [`Client`]
//! and its clones share, which [`crate::SafeRetry::with_budget`] can share too.
//!
//! [`Client`]: crate::Client

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Metric: retries the budget refused (the request ended with its last attempt's error).
pub const RETRIES_REFUSED: &str = "tether_client_retries_refused_total";

/// Retry budget settings ([`crate::ClientConfig::retry_budget`]).
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default, deny_unknown_fields)
)]
pub struct RetryBudgetConfig {
    /// Retries allowed per request of the window (0.2: one retry for every five requests).
    pub ratio: f64,
    /// Retries allowed per second of the window whatever the request count, so a client with
    /// little traffic can still retry.
    pub min_per_second: u32,
    /// How far back requests and retries are counted.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub window: Duration,
    /// Not a setting: struct literals outside tether must end in `..Default::default()` (or
    /// start from a constructor), so adding a setting is not a breaking change.
    #[doc(hidden)]
    #[cfg_attr(feature = "serde", serde(skip))]
    pub __non_exhaustive: (),
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        RetryBudgetConfig {
            ratio: 0.2,
            min_per_second: 10,
            window: Duration::from_secs(10),
            __non_exhaustive: (),
        }
    }
}

impl RetryBudgetConfig {
    /// No budget: every retry the other rules allow happens.
    pub fn unlimited() -> Self {
        RetryBudgetConfig {
            ratio: f64::INFINITY,
            ..RetryBudgetConfig::default()
        }
    }

    /// Checks values that cannot work.
    pub fn validate(&self) -> Result<(), rpc_core::config::ConfigError> {
        use rpc_core::config::ConfigError;
        if self.ratio.is_nan() || self.ratio < 0.0 {
            return Err(ConfigError::OutOfRange {
                field: "retry_budget.ratio",
                why: "must be zero or more",
            });
        }
        if self.window < Duration::from_millis(SLOTS as u64) {
            return Err(ConfigError::OutOfRange {
                field: "retry_budget.window",
                why: "must be at least 10 ms",
            });
        }
        Ok(())
    }
}

/// Slots the window is counted in: old requests leave it a tenth of the window at a time.
const SLOTS: usize = 10;

/// The budget's counts, as pure logic.
#[derive(Debug, Clone)]
pub struct Budget {
    config: RetryBudgetConfig,
    /// (requests, retries) per slot; `current` is the newest.
    slots: [(u64, u64); SLOTS],
    current: usize,
    /// When the current slot began.
    started: Instant,
}

impl Budget {
    /// An empty budget at `now`.
    pub fn new(config: RetryBudgetConfig, now: Instant) -> Self {
        Budget {
            config,
            slots: [(0, 0); SLOTS],
            current: 0,
            started: now,
        }
    }

    fn slot_length(&self) -> Duration {
        self.config.window / SLOTS as u32
    }

    /// Forgets the slots that have left the window by `now`.
    fn advance(&mut self, now: Instant) {
        let len = self.slot_length();
        let mut moved = 0;
        while now.saturating_duration_since(self.started) >= len && moved < SLOTS {
            self.current = (self.current + 1) % SLOTS;
            self.slots[self.current] = (0, 0);
            self.started += len;
            moved += 1;
        }
        if now.saturating_duration_since(self.started) >= len {
            // Idle for more than a window: everything is gone.
            self.started = now;
        }
    }

    /// A request began at `now` (its first attempt).
    pub fn on_request(&mut self, now: Instant) {
        self.advance(now);
        self.slots[self.current].0 += 1;
    }

    /// Whether a retry may go at `now`; if so it is counted.
    pub fn try_retry(&mut self, now: Instant) -> bool {
        if self.config.ratio.is_infinite() {
            return true; // unlimited (and ∞ × 0 requests would be NaN)
        }
        self.advance(now);
        let (requests, retries) = self
            .slots
            .iter()
            .fold((0u64, 0u64), |(q, r), (sq, sr)| (q + sq, r + sr));
        let floor = f64::from(self.config.min_per_second) * self.config.window.as_secs_f64();
        let allowed = self.config.ratio * requests as f64 + floor;
        if retries as f64 + 1.0 <= allowed {
            self.slots[self.current].1 += 1;
            true
        } else {
            false
        }
    }
}

/// A retry budget shared by a client and its clones (and any [`crate::SafeRetry`] given it).
#[derive(Debug, Clone)]
pub struct RetryBudget(Arc<Mutex<Budget>>);

impl RetryBudget {
    /// A new, empty budget.
    pub fn new(config: RetryBudgetConfig) -> Self {
        RetryBudget(Arc::new(Mutex::new(Budget::new(config, Instant::now()))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Budget> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a request (its first attempt).
    pub fn deposit(&self) {
        self.lock().on_request(Instant::now());
    }

    /// Takes one retry from the budget; false (and counted in [`RETRIES_REFUSED`]) when it is
    /// spent.
    pub fn try_withdraw(&self) -> bool {
        let ok = self.lock().try_retry(Instant::now());
        if !ok {
            metrics::counter!(RETRIES_REFUSED).increment(1);
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn config(ratio: f64, min_per_second: u32) -> RetryBudgetConfig {
        RetryBudgetConfig {
            ratio,
            min_per_second,
            window: Duration::from_secs(10),
            __non_exhaustive: (),
        }
    }

    #[test]
    fn a_fifth_of_the_requests_plus_the_floor() {
        let t0 = Instant::now();
        let mut b = Budget::new(config(0.2, 1), t0);
        for _ in 0..100 {
            b.on_request(t0);
        }
        // 0.2 × 100 + 1 × 10 s = 30.
        let granted = (0..100).filter(|_| b.try_retry(t0)).count();
        assert_eq!(granted, 30);
    }

    #[test]
    fn the_window_forgets_old_requests_and_retries() {
        let t0 = Instant::now();
        let mut b = Budget::new(config(0.5, 0), t0);
        for _ in 0..10 {
            b.on_request(t0);
        }
        assert_eq!((0..10).filter(|_| b.try_retry(t0)).count(), 5);
        // A window later: the requests are gone, and so is the budget they made.
        let later = t0 + Duration::from_secs(11);
        assert!(!b.try_retry(later));
        b.on_request(later);
        b.on_request(later);
        assert!(b.try_retry(later));
        assert!(!b.try_retry(later));
    }

    #[test]
    fn unlimited_never_refuses() {
        let t0 = Instant::now();
        let mut b = Budget::new(RetryBudgetConfig::unlimited(), t0);
        assert!((0..10_000).all(|_| b.try_retry(t0)));
    }

    proptest! {
        /// Over any traffic: retries granted in any window never exceed ratio × the requests in
        /// it plus the floor (counted by slots, so against the requests of the slots it spans).
        #[test]
        fn granted_retries_stay_within_the_budget(
            steps in proptest::collection::vec((0u64..2_000, 0u32..20, 0u32..20), 1..200),
            ratio in 0.0f64..1.0,
            floor in 0u32..5,
        ) {
            let c = config(ratio, floor);
            let t0 = Instant::now();
            let mut b = Budget::new(c.clone(), t0);
            let mut now = t0;
            // (time, requests, granted) per step, to check every window afterwards.
            let mut log: Vec<(Instant, u64, u64)> = Vec::new();
            for (advance_ms, requests, asks) in steps {
                now += Duration::from_millis(advance_ms);
                for _ in 0..requests {
                    b.on_request(now);
                }
                let granted = (0..asks).filter(|_| b.try_retry(now)).count() as u64;
                log.push((now, u64::from(requests), granted));
            }
            // The retries granted in any span of 9 slots were all counted at the span's last
            // grant, so they are within the budget of the requests of the window before it.
            let span = c.window - c.window / SLOTS as u32;
            for (i, (t, _, _)) in log.iter().enumerate() {
                let (mut q, mut r) = (0u64, 0u64);
                for (u, rq, g) in &log[..=i] {
                    if t.saturating_duration_since(*u) < span {
                        r += g;
                    }
                    // The last grant in the span counted the requests of the window before it.
                    if t.saturating_duration_since(*u) < c.window + span {
                        q += rq;
                    }
                }
                let allowed = ratio * q as f64 + f64::from(floor) * c.window.as_secs_f64();
                prop_assert!(r as f64 <= allowed + 1e-9, "granted {} in a window with {} requests (allowed {})", r, q, allowed);
            }
        }
    }
}
