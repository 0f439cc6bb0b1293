//! Gray-failure detection per endpoint (outlier detection), as pure logic: the holder feeds each
//! request's outcome and `now`, and asks which endpoints take requests.
//!
//! Heartbeats are answered on the I/O task, so a server whose handlers hang (a dead database, a
//! deadlock) heartbeats perfectly. What gives it away is its requests: timeouts and errors. The
//! rules, after Envoy's outlier detection and gRPC's gRFC A50:
//!
//! - `consecutive_failures` failures in a row eject an endpoint at once.
//! - Every `interval`, an endpoint with at least `failure_percentage_min_requests` requests in the
//!   interval and at least `failure_percentage` % of them failed is ejected; and with at least
//!   `success_rate_min_hosts` endpoints that had `success_rate_min_requests` each, an endpoint
//!   whose success rate is below the mean by more than `success_rate_stdev_factor` standard
//!   deviations is ejected.
//! - An ejected endpoint takes no requests for `base_ejection_time × times ejected` (at most
//!   `max_ejection_time`), then is on probation: one request at a time, until
//!   `probe_successes` succeed in a row (trusted again) or one fails (ejected again, for longer).
//!   Each interval an endpoint spends trusted lowers its ejection count by one.
//! - Latency: with at least `latency_min_hosts` endpoints that had `latency_min_requests`
//!   successes each in the interval, an endpoint whose median latency is at least
//!   `latency_factor` times the median of their medians, and at least `latency_min`, is ejected:
//!   slow but successful (a swapping host, a throttled disk) is a gray failure too.
//! - At most `max_ejection_percent` of the endpoints are ejected at once (one always may be), and
//!   an endpoint is never ejected when no other could take its requests: a lone endpoint stays.

use std::time::Duration;

use rpc_core::latency::{self, BUCKETS};
use rpc_core::Code;
use tokio::time::Instant;

/// Outlier detection settings ([`crate::ClientConfig::outlier`]).
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default, deny_unknown_fields)
)]
pub struct OutlierConfig {
    /// Off: endpoints are judged by their connections alone.
    pub enabled: bool,
    /// Failures in a row that eject an endpoint at once (0: this rule is off).
    pub consecutive_failures: u32,
    /// How often the rate rules are evaluated, over the requests of the interval just ended.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub interval: Duration,
    /// Failure percentage (0 to 100) that ejects an endpoint (100 or more: never).
    pub failure_percentage: u32,
    /// Requests an endpoint needs in an interval for its failure percentage to count.
    pub failure_percentage_min_requests: u32,
    /// How far below the mean success rate, in standard deviations, ejects an endpoint.
    pub success_rate_stdev_factor: f64,
    /// Endpoints with enough requests needed for the success-rate rule to run.
    pub success_rate_min_hosts: usize,
    /// Requests an endpoint needs in an interval to count for the success-rate rule.
    pub success_rate_min_requests: u32,
    /// The first ejection's length; the n-th lasts n times this.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub base_ejection_time: Duration,
    /// The longest ejection.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub max_ejection_time: Duration,
    /// The most endpoints ejected at once, as a percentage (one may always be).
    pub max_ejection_percent: u32,
    /// Successes in a row, one request at a time, that make an endpoint on probation trusted.
    pub probe_successes: u32,
    /// A probe whose outcome is not heard of within this (its caller gave up, or it went to a
    /// stream, whose outcomes are not counted) frees the probe slot for another.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub probe_timeout: Duration,
    /// Status codes that count as the endpoint failing. Connection failures and client-side
    /// deadlines always do; other codes (APPLICATION_ERROR, NOT_FOUND, ...) are answers, and count
    /// as successes. Borrowed by default, so cloning a default config allocates nothing (a 12-byte
    /// vector cloned with each `ClientConfig` on the thread that made the clients left holes in
    /// its allocator's arena: 3.5 KiB per idle `Client`); set it with `vec![...].into()`.
    #[cfg_attr(feature = "serde", serde(with = "codes_by_name"))]
    pub failure_codes: std::borrow::Cow<'static, [Code]>,
    /// How many times the median latency of the endpoints an endpoint's own median must be to
    /// eject it (0: the latency rule is off). Latency counts answers (successes, and codes that
    /// are not failures) from send to answer, and attempts that lost a hedge (how long they had
    /// waited). Medians are read from half-octave buckets, so the factor holds to within about
    /// 1.5 either way (5 ejects somewhere between about 3.5 and 7 times slower).
    pub latency_factor: f64,
    /// The least median latency that ejects (below it, being slower than the others is no
    /// failure: 5 × 100 µs is still fast).
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub latency_min: Duration,
    /// Endpoints with enough successes in an interval needed for the latency rule to run.
    pub latency_min_hosts: usize,
    /// Latencies an endpoint needs in an interval to count for the latency rule.
    pub latency_min_requests: u32,
    /// Not a setting: struct literals outside tether must end in `..Default::default()` (or
    /// start from a constructor), so adding a setting is not a breaking change.
    #[doc(hidden)]
    #[cfg_attr(feature = "serde", serde(skip))]
    pub __non_exhaustive: (),
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            enabled: true,
            consecutive_failures: 5,
            interval: Duration::from_secs(10),
            failure_percentage: 85,
            failure_percentage_min_requests: 50,
            success_rate_stdev_factor: 1.9,
            success_rate_min_hosts: 5,
            success_rate_min_requests: 100,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            probe_successes: 3,
            probe_timeout: Duration::from_secs(5),
            failure_codes: std::borrow::Cow::Borrowed(&[Code::DeadlineExceeded, Code::Unavailable, Code::Internal]),
            latency_factor: 5.0,
            latency_min: Duration::from_millis(10),
            latency_min_hosts: 3,
            latency_min_requests: 50,
            __non_exhaustive: (),
        }
    }
}

impl OutlierConfig {
    /// Outlier detection off.
    pub fn disabled() -> Self {
        OutlierConfig {
            enabled: false,
            ..OutlierConfig::default()
        }
    }

    /// Checks values that cannot work.
    pub fn validate(&self) -> Result<(), rpc_core::config::ConfigError> {
        use rpc_core::config::ConfigError;
        if !self.enabled {
            return Ok(());
        }
        if self.interval.is_zero() {
            return Err(ConfigError::Zero("outlier.interval"));
        }
        if self.base_ejection_time.is_zero() {
            return Err(ConfigError::Zero("outlier.base_ejection_time"));
        }
        if self.max_ejection_time < self.base_ejection_time {
            return Err(ConfigError::OutOfRange {
                field: "outlier.max_ejection_time",
                why: "must be at least base_ejection_time",
            });
        }
        if self.probe_successes == 0 {
            return Err(ConfigError::Zero("outlier.probe_successes"));
        }
        if self.probe_timeout.is_zero() {
            return Err(ConfigError::Zero("outlier.probe_timeout"));
        }
        if self.success_rate_stdev_factor.is_nan() || self.success_rate_stdev_factor <= 0.0 {
            return Err(ConfigError::OutOfRange {
                field: "outlier.success_rate_stdev_factor",
                why: "must be above zero",
            });
        }
        if !(self.latency_factor == 0.0 || (self.latency_factor > 1.0 && self.latency_factor <= 1000.0)) {
            return Err(ConfigError::OutOfRange {
                field: "outlier.latency_factor",
                why: "must be 0 (off), or above 1 and at most 1000",
            });
        }
        Ok(())
    }
}

#[cfg(feature = "serde")]
mod codes_by_name {
    use rpc_core::Code;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(codes: &[Code], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(codes.iter().map(|c| c.as_str()))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<std::borrow::Cow<'static, [Code]>, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        names
            .iter()
            .map(|n| {
                Code::ALL
                    .iter()
                    .copied()
                    .find(|c| c.as_str().eq_ignore_ascii_case(n))
                    .ok_or_else(|| serde::de::Error::custom(format!("unknown status code {n:?}")))
            })
            .collect()
    }
}

/// Where an endpoint stands for gray failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthState {
    /// Takes requests.
    Trusted,
    /// Takes no new requests until `until`.
    Ejected {
        /// When it goes on probation.
        until: Instant,
        /// Its ejections not yet forgiven (this one included).
        times: u32,
    },
    /// Back from an ejection: one request at a time until enough succeed in a row.
    Probation {
        /// Successes in a row so far.
        successes: u32,
    },
}

/// Why an endpoint was ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EjectReason {
    /// `consecutive_failures` in a row.
    ConsecutiveFailures,
    /// Its failure percentage over an interval.
    FailurePercentage,
    /// Its success rate far below the others'.
    SuccessRate,
    /// A request on probation failed.
    ProbeFailed,
    /// Its median latency far above the others'.
    Latency,
}

impl EjectReason {
    /// A short label, as in metrics and events.
    pub fn as_str(self) -> &'static str {
        match self {
            EjectReason::ConsecutiveFailures => "consecutive_failures",
            EjectReason::FailurePercentage => "failure_percentage",
            EjectReason::SuccessRate => "success_rate",
            EjectReason::ProbeFailed => "probe_failed",
            EjectReason::Latency => "latency",
        }
    }
}

/// What recording an outcome calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to do.
    None,
    /// Eject it, if the caps allow ([`may_eject`]).
    Eject(EjectReason),
    /// Its probation ended well: trusted again.
    Trusted,
}

/// A histogram of latencies in buckets half an octave wide: values within a factor of 1.5 share
/// a bucket, which is plenty to tell an endpoint five times slower than the others, or to place a
/// hedge. 260 bytes, no allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Latencies {
    buckets: [u32; BUCKETS],
    count: u32,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            buckets: [0; BUCKETS],
            count: 0,
        }
    }
}

impl Latencies {
    /// Adds one latency.
    pub fn add(&mut self, d: Duration) {
        let b = &mut self.buckets[latency::bucket(d)];
        *b = b.saturating_add(1);
        self.count = self.count.saturating_add(1);
    }

    /// How many latencies it holds.
    pub fn count(&self) -> u32 {
        self.count
    }

    fn locate(&self, q: f64) -> Option<(usize, u64, u64)> {
        latency::locate(self.buckets.iter().map(|n| u64::from(*n)), u64::from(self.count), q)
    }

    /// The `q` quantile (0 to 1), as the upper bound of its bucket: never below the true value,
    /// and within 1.5 times above it (for latencies up to 71 minutes; the last bucket holds all
    /// longer ones). `None` when empty. For hedging, where late is safer than early.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let (i, _, _) = self.locate(q)?;
        Some(latency::upper_bound(i))
    }

    /// The `q` quantile, interpolated within its bucket (geometrically, by its rank among the
    /// bucket's values): within 1.5 times of the true value either way, and for values spread
    /// over a bucket much closer. For comparing endpoints.
    pub fn estimate(&self, q: f64) -> Option<Duration> {
        let (i, before, n) = self.locate(q)?;
        Some(latency::interpolate(i, before, n))
    }
}

/// One interval of an endpoint, for the rate and latency rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Requests that succeeded (or got an answer that is not a failure).
    pub successes: u32,
    /// Requests that failed.
    pub failures: u32,
    /// Latencies recorded (answers, and attempts that lost a hedge).
    pub timed: u32,
    /// Their median (`None`: none).
    pub p50: Option<Duration>,
}

impl Window {
    /// A window of these counts and no latencies.
    pub fn counts(successes: u32, failures: u32) -> Window {
        Window {
            successes,
            failures,
            timed: 0,
            p50: None,
        }
    }
}

/// Successes an interval needs for its latencies to place hedges ([`Health::hedge_p95`]).
const HEDGE_SAMPLES: u32 = 20;

/// The health of one endpoint.
#[derive(Debug, Clone)]
pub struct Health {
    state: HealthState,
    times_ejected: u32,
    consecutive: u32,
    /// Outcomes in the current interval (none counted while ejected).
    successes: u32,
    failures: u32,
    /// Ejected at any time during the current interval: its counts say nothing of it now.
    ejected_in_interval: bool,
    /// On probation: when the probe now out was handed out. Its outcome frees the slot; so does
    /// `probe_timeout` passing without one (its caller gave up, or it went to a stream).
    probe_reserved: Option<Instant>,
    /// Latencies of the current interval's successes (none yet: nothing allocated; 260 bytes
    /// each, and an idle endpoint holds neither after an interval).
    latency: Option<Box<Latencies>>,
    /// The latest interval's with at least [`HEDGE_SAMPLES`] successes (an endpoint that stopped
    /// answering keeps the latencies it had while it answered).
    known_latency: Option<Box<Latencies>>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            state: HealthState::Trusted,
            times_ejected: 0,
            consecutive: 0,
            successes: 0,
            failures: 0,
            ejected_in_interval: false,
            probe_reserved: None,
            latency: None,
            known_latency: None,
        }
    }
}

impl Health {
    /// A trusted endpoint with no history.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current state.
    pub fn state(&self) -> HealthState {
        self.state
    }

    /// Whether it is trusted (takes any number of requests).
    pub fn is_trusted(&self) -> bool {
        self.state == HealthState::Trusted
    }

    /// Whether it may be given a request at `now`: trusted; or on probation (an ejection that is
    /// over counts, even before [`Health::tick`] moves it there) with no probe out.
    pub fn takes_requests(&self, now: Instant, config: &OutlierConfig) -> bool {
        match self.state {
            HealthState::Trusted => true,
            HealthState::Ejected { until, .. } if now < until => false,
            _ => self
                .probe_reserved
                .is_none_or(|at| now.saturating_duration_since(at) >= config.probe_timeout),
        }
    }

    /// Hands out the probe slot at `now` (the caller checked [`Health::takes_requests`]); no-op
    /// when trusted.
    pub fn reserve_probe(&mut self, now: Instant) {
        self.tick(now);
        if let HealthState::Probation { .. } = self.state {
            self.probe_reserved = Some(now);
        }
    }

    /// When its ejection ends, if it is ejected.
    pub fn ejected_until(&self) -> Option<Instant> {
        match self.state {
            HealthState::Ejected { until, .. } => Some(until),
            _ => None,
        }
    }

    /// Whether it is ejected.
    pub fn is_ejected(&self) -> bool {
        matches!(self.state, HealthState::Ejected { .. })
    }

    /// One request's outcome at `now` (`failed`: it counts as the endpoint failing).
    pub fn record(&mut self, now: Instant, failed: bool, config: &OutlierConfig) -> Verdict {
        self.tick(now);
        // Requests sent before an ejection may still end during it: they change nothing, and
        // count in no interval.
        if self.is_ejected() {
            return Verdict::None;
        }
        if failed {
            self.failures = self.failures.saturating_add(1);
            self.consecutive = self.consecutive.saturating_add(1);
        } else {
            self.successes = self.successes.saturating_add(1);
            self.consecutive = 0;
        }
        match self.state {
            HealthState::Ejected { .. } => Verdict::None,
            HealthState::Probation { .. } if failed => {
                // In a row: a failed probe starts the count again, even if the caps keep it.
                self.state = HealthState::Probation { successes: 0 };
                self.probe_reserved = None;
                Verdict::Eject(EjectReason::ProbeFailed)
            }
            HealthState::Probation { successes } => {
                self.probe_reserved = None;
                let successes = successes + 1;
                if successes >= config.probe_successes {
                    self.state = HealthState::Trusted;
                    Verdict::Trusted
                } else {
                    self.state = HealthState::Probation { successes };
                    Verdict::None
                }
            }
            HealthState::Trusted
                if failed && config.consecutive_failures > 0 && self.consecutive >= config.consecutive_failures =>
            {
                Verdict::Eject(EjectReason::ConsecutiveFailures)
            }
            HealthState::Trusted => Verdict::None,
        }
    }

    /// Ejects it at `now`; returns how long for. What it did before counts no more.
    pub fn eject(&mut self, now: Instant, config: &OutlierConfig) -> Duration {
        self.times_ejected = self.times_ejected.saturating_add(1);
        let length = config
            .base_ejection_time
            .saturating_mul(self.times_ejected)
            .min(config.max_ejection_time.max(config.base_ejection_time));
        self.state = HealthState::Ejected {
            until: now + length,
            times: self.times_ejected,
        };
        self.consecutive = 0;
        self.successes = 0;
        self.failures = 0;
        self.probe_reserved = None;
        self.ejected_in_interval = true;
        length
    }

    /// A successful request's latency (from send to answer). Ignored while ejected, like its
    /// outcome.
    pub fn record_latency(&mut self, latency: Duration) {
        if !self.is_ejected() {
            self.latency.get_or_insert_with(Default::default).add(latency);
        }
    }

    /// Its 95th percentile latency, from the current interval or the latest one with enough
    /// successes (20); `None` until one had. For hedging
    /// ([`crate::HedgeDelay::P95`]).
    pub fn hedge_p95(&self) -> Option<Duration> {
        self.recent_latencies().and_then(|l| l.quantile(0.95))
    }

    /// The latencies of the current interval, or of the latest one with enough successes (20).
    fn recent_latencies(&self) -> Option<&Latencies> {
        [&self.latency, &self.known_latency]
            .into_iter()
            .flatten()
            .map(|l| &**l)
            .find(|l| l.count() >= HEDGE_SAMPLES)
    }

    /// Its recent `q` latency quantile, interpolated (from the same interval as
    /// [`Health::hedge_p95`]), for an operator's view.
    pub fn recent_latency(&self, q: f64) -> Option<Duration> {
        self.recent_latencies().and_then(|l| l.estimate(q))
    }

    /// Moves an ejection that is over to probation; true when it did.
    pub fn tick(&mut self, now: Instant) -> bool {
        match self.state {
            HealthState::Ejected { until, .. } if now >= until => {
                self.state = HealthState::Probation { successes: 0 };
                self.probe_reserved = None;
                true
            }
            _ => false,
        }
    }

    /// Its endpoint connected again after losing every connection (the connection-level fault
    /// that may have caused the failures was caught by liveness): an ejection gives way to
    /// probation at once, so a fresh connection proves itself with a few requests instead of
    /// waiting out the ejection. True when it did. Its ejection count stays: a failed probe
    /// ejects it for longer.
    pub fn on_reconnected(&mut self) -> bool {
        if self.is_ejected() {
            self.state = HealthState::Probation { successes: 0 };
            self.probe_reserved = None;
            return true;
        }
        false
    }

    /// Ends the interval and starts the next: its window for the rate and latency rules, or
    /// `None` when it says nothing of it now (not trusted, or ejected during the interval). An
    /// endpoint that spent the interval trusted has one ejection forgiven.
    pub fn end_interval(&mut self) -> Option<Window> {
        let judged = self.state == HealthState::Trusted && !self.ejected_in_interval;
        let window = judged.then(|| Window {
            successes: self.successes,
            failures: self.failures,
            timed: self.latency.as_ref().map_or(0, |l| l.count()),
            p50: self.latency.as_ref().and_then(|l| l.estimate(0.5)),
        });
        if judged {
            self.times_ejected = self.times_ejected.saturating_sub(1);
        }
        match self.latency.take() {
            Some(l) if l.count() >= HEDGE_SAMPLES => self.known_latency = Some(l),
            _ => {}
        }
        self.successes = 0;
        self.failures = 0;
        self.ejected_in_interval = false;
        window
    }
}

/// May one more endpoint be ejected, with `ejected` of `total` ejected already and
/// `others_usable` other endpoints able to take its requests (alive and not ejected)?
pub fn may_eject(ejected: usize, total: usize, others_usable: usize, max_percent: u32) -> bool {
    others_usable > 0 && (ejected == 0 || (ejected + 1) * 100 <= total.saturating_mul(max_percent as usize))
}

/// The rate and latency rules over one interval's window per endpoint (endpoints already ejected
/// or on probation are passed as `None`): the endpoints to eject, worst first (the rate rules
/// before the latency rule).
pub fn evaluate(windows: &[Option<Window>], config: &OutlierConfig) -> Vec<(usize, EjectReason)> {
    let mut out: Vec<(usize, EjectReason, f64)> = Vec::new();
    // Success rate: against the others that had enough requests.
    let rated: Vec<(usize, f64)> = windows
        .iter()
        .enumerate()
        .filter_map(|(i, w)| {
            let Window {
                successes: s,
                failures: f,
                ..
            } = (*w)?;
            let n = s + f;
            (n >= config.success_rate_min_requests && n > 0).then(|| (i, f64::from(s) / f64::from(n)))
        })
        .collect();
    if rated.len() >= config.success_rate_min_hosts.max(1) {
        let mean = rated.iter().map(|(_, r)| r).sum::<f64>() / rated.len() as f64;
        let var = rated.iter().map(|(_, r)| (r - mean).powi(2)).sum::<f64>() / rated.len() as f64;
        let limit = mean - config.success_rate_stdev_factor * var.sqrt();
        for (i, r) in &rated {
            if *r < limit {
                out.push((*i, EjectReason::SuccessRate, *r));
            }
        }
    }
    // Failure percentage: each on its own.
    if config.failure_percentage < 100 {
        for (i, w) in windows.iter().enumerate() {
            let Some(Window {
                successes: s,
                failures: f,
                ..
            }) = *w
            else {
                continue;
            };
            let n = s + f;
            if n == 0 || n < config.failure_percentage_min_requests || out.iter().any(|(j, _, _)| *j == i) {
                continue;
            }
            if u64::from(f) * 100 >= u64::from(n) * u64::from(config.failure_percentage) {
                out.push((i, EjectReason::FailurePercentage, f64::from(s) / f64::from(n)));
            }
        }
    }
    out.sort_by(|a, b| a.2.total_cmp(&b.2));
    let mut out: Vec<(usize, EjectReason)> = out.into_iter().map(|(i, r, _)| (i, r)).collect();
    // Latency: against the median of the medians of those with enough successes (robust to the
    // slow ones themselves, while they are fewer than half).
    if config.latency_factor > 0.0 {
        let timed: Vec<(usize, Duration)> = windows
            .iter()
            .enumerate()
            .filter_map(|(i, w)| {
                let w = (*w)?;
                (w.timed >= config.latency_min_requests.max(1)).then_some((i, w.p50?))
            })
            .collect();
        if timed.len() >= config.latency_min_hosts.max(2) {
            let mut medians: Vec<Duration> = timed.iter().map(|(_, d)| *d).collect();
            medians.sort();
            let typical = medians[(medians.len() - 1) / 2];
            let scaled = Duration::try_from_secs_f64(typical.as_secs_f64() * config.latency_factor);
            let limit = scaled.unwrap_or(Duration::MAX).max(config.latency_min);
            let mut slow: Vec<(usize, Duration)> = timed
                .into_iter()
                .filter(|(i, d)| *d >= limit && !out.iter().any(|(j, _)| j == i))
                .collect();
            slow.sort_by_key(|s| std::cmp::Reverse(s.1));
            out.extend(slow.into_iter().map(|(i, _)| (i, EjectReason::Latency)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn config() -> OutlierConfig {
        OutlierConfig::default()
    }

    #[test]
    fn five_failures_in_a_row_eject_and_a_success_between_resets_the_count() {
        let c = config();
        let t0 = Instant::now();
        let mut h = Health::new();
        for _ in 0..4 {
            assert_eq!(h.record(t0, true, &c), Verdict::None);
        }
        assert_eq!(h.record(t0, false, &c), Verdict::None);
        for _ in 0..4 {
            assert_eq!(h.record(t0, true, &c), Verdict::None);
        }
        assert_eq!(h.record(t0, true, &c), Verdict::Eject(EjectReason::ConsecutiveFailures));
    }

    #[test]
    fn ejections_grow_to_the_cap_then_probation_decides_one_probe_at_a_time() {
        let c = config();
        let t0 = Instant::now();
        let mut h = Health::new();
        assert_eq!(h.eject(t0, &c), Duration::from_secs(30));
        assert!(!h.takes_requests(t0 + Duration::from_secs(29), &c));
        // Over: it takes a probe even before the tick.
        let t1 = t0 + Duration::from_secs(30);
        assert!(h.takes_requests(t1, &c));
        h.reserve_probe(t1);
        assert_eq!(h.state(), HealthState::Probation { successes: 0 });
        assert!(!h.takes_requests(t1, &c), "one probe at a time");
        // A probe never heard of frees the slot after probe_timeout.
        assert!(h.takes_requests(t1 + c.probe_timeout, &c));
        // A failed probe: ejected again, for longer.
        assert_eq!(h.record(t1, true, &c), Verdict::Eject(EjectReason::ProbeFailed));
        assert_eq!(h.eject(t1, &c), Duration::from_secs(60));
        for n in 3..=12 {
            assert_eq!(
                h.eject(t1, &c),
                Duration::from_secs(30 * n).min(Duration::from_secs(300))
            );
        }
        let t2 = t1 + Duration::from_secs(301);
        for _ in 0..2 {
            h.reserve_probe(t2);
            assert_eq!(h.record(t2, false, &c), Verdict::None);
            assert!(
                h.takes_requests(t2, &c),
                "the slot is free again once the probe is back"
            );
        }
        h.reserve_probe(t2);
        assert_eq!(h.record(t2, false, &c), Verdict::Trusted);
        assert!(h.takes_requests(t2, &c));
    }

    #[test]
    fn an_outcome_after_the_ejection_ended_is_a_probe_not_lost() {
        let c = config();
        let t0 = Instant::now();
        let mut h = Health::new();
        h.eject(t0, &c);
        // No tick ran: the outcome at `until` still counts, as a failed probe.
        assert_eq!(
            h.record(t0 + Duration::from_secs(30), true, &c),
            Verdict::Eject(EjectReason::ProbeFailed)
        );
    }

    #[test]
    fn a_failed_probe_the_caps_keep_starts_the_count_again() {
        let c = config();
        let t0 = Instant::now();
        let mut h = Health::new();
        h.eject(t0, &c);
        let t1 = t0 + Duration::from_secs(30);
        h.tick(t1);
        h.record(t1, false, &c);
        h.record(t1, false, &c);
        // Failed; the caller could not eject it (caps): it stays on probation, at zero.
        assert_eq!(h.record(t1, true, &c), Verdict::Eject(EjectReason::ProbeFailed));
        assert_eq!(h.state(), HealthState::Probation { successes: 0 });
        assert_eq!(h.record(t1, false, &c), Verdict::None);
        assert_eq!(h.record(t1, false, &c), Verdict::None);
        assert_eq!(h.record(t1, false, &c), Verdict::Trusted);
    }

    #[test]
    fn failures_during_an_ejection_do_not_eject_it_again_later() {
        let c = config();
        let t0 = Instant::now();
        let mut h = Health::new();
        for _ in 0..40 {
            h.record(t0, true, &c);
        }
        h.eject(t0, &c);
        // Hung requests keep timing out during the ejection: not counted.
        for _ in 0..200 {
            h.record(t0, true, &c);
        }
        h.on_reconnected();
        for _ in 0..3 {
            h.record(t0, false, &c);
        }
        assert!(h.is_trusted());
        assert_eq!(
            h.end_interval(),
            None,
            "ejected during the interval: its counts say nothing"
        );
        h.record(t0, false, &c);
        assert_eq!(h.end_interval(), Some(Window::counts(1, 0)));
    }

    #[test]
    fn a_reconnect_turns_an_ejection_into_probation() {
        let c = config();
        let t0 = Instant::now();
        let mut h = Health::new();
        assert!(!h.on_reconnected());
        h.eject(t0, &c);
        assert!(h.on_reconnected());
        assert_eq!(h.state(), HealthState::Probation { successes: 0 });
        assert_eq!(h.record(t0, true, &c), Verdict::Eject(EjectReason::ProbeFailed));
        assert_eq!(h.eject(t0, &c), Duration::from_secs(60), "the count stays");
    }

    #[test]
    fn trusted_intervals_forgive_ejections_one_at_a_time() {
        let c = config();
        let t0 = Instant::now();
        let mut h = Health::new();
        h.eject(t0, &c);
        let t1 = t0 + Duration::from_secs(30);
        for _ in 0..3 {
            h.record(t1, false, &c);
        }
        h.end_interval(); // ejected during it: not forgiven
        h.end_interval(); // trusted throughout: forgiven
        assert_eq!(h.eject(t0, &c), Duration::from_secs(30));
    }

    #[test]
    fn caps_one_always_never_the_last_usable() {
        assert!(may_eject(0, 3, 2, 10), "one may always be ejected");
        assert!(!may_eject(1, 3, 1, 10), "10 % of 3 is below two");
        assert!(may_eject(1, 20, 18, 10));
        assert!(!may_eject(2, 20, 17, 10));
        assert!(!may_eject(0, 1, 0, 100), "a lone endpoint stays");
        assert!(!may_eject(0, 3, 0, 100), "nor the last one still usable");
    }

    #[test]
    fn failure_percentage_needs_volume_and_success_rate_needs_hosts() {
        let c = config();
        // 85 % of 100 failed, the others fine: failure percentage.
        let w = [
            Some(Window::counts(15, 85)),
            Some(Window::counts(100, 0)),
            Some(Window::counts(100, 0)),
        ];
        assert_eq!(evaluate(&w, &c), vec![(0, EjectReason::FailurePercentage)]);
        // Too few requests: nothing.
        assert!(evaluate(&[Some(Window::counts(1, 40)), Some(Window::counts(100, 0))], &c).is_empty());
        // Success rate: five hosts, one far below.
        let w = [
            Some(Window::counts(1000, 0)),
            Some(Window::counts(995, 5)),
            Some(Window::counts(1000, 0)),
            Some(Window::counts(998, 2)),
            Some(Window::counts(700, 300)),
            None,
        ];
        assert_eq!(evaluate(&w, &c), vec![(4, EjectReason::SuccessRate)]);
        // Four hosts: the success-rate rule does not run (and 30 % is no failure percentage).
        assert!(evaluate(&w[1..], &c).is_empty());
    }

    fn timed(successes: u32, p50_ms: u64) -> Option<Window> {
        Some(Window {
            successes,
            failures: 0,
            timed: successes,
            p50: Some(Duration::from_millis(p50_ms)),
        })
    }

    /// The window of a trusted endpoint after `n` answers of about `ms` (spread ±10 %).
    fn measured(n: u32, ms: f64, seed: u64) -> Option<Window> {
        let mut h = Health::new();
        let c = config();
        let mut x = seed | 1;
        for _ in 0..n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let jitter = 0.9 + 0.2 * (x % 1000) as f64 / 1000.0;
            h.record(Instant::now(), false, &c);
            h.record_latency(Duration::from_secs_f64(ms * jitter / 1000.0));
        }
        h.end_interval()
    }

    #[test]
    fn a_slow_endpoint_among_fast_ones_is_ejected_for_latency_and_only_when_it_matters() {
        let c = config();
        // 60 ms against 2 ms: ejected.
        let w = [timed(100, 2), timed(100, 2), timed(100, 60)];
        assert_eq!(evaluate(&w, &c), vec![(2, EjectReason::Latency)]);
        // 5 times slower but under latency_min (10 ms): fast enough.
        assert!(evaluate(&[timed(100, 1), timed(100, 1), timed(100, 6)], &c).is_empty());
        // 4 times slower: within the factor.
        assert!(evaluate(&[timed(100, 20), timed(100, 20), timed(100, 80)], &c).is_empty());
        // Too few successes on the slow one, or too few endpoints with enough: nothing.
        assert!(evaluate(&[timed(100, 2), timed(100, 2), timed(10, 60)], &c).is_empty());
        assert!(evaluate(&[timed(100, 2), timed(100, 60), None], &c).is_empty());
        // Off.
        let off = OutlierConfig {
            latency_factor: 0.0,
            ..config()
        };
        assert!(evaluate(&[timed(100, 2), timed(100, 2), timed(100, 60)], &off).is_empty());
        // An endpoint both failing and slow is ejected once, for its failures.
        let both = Some(Window {
            successes: 10,
            failures: 90,
            timed: 100,
            p50: Some(Duration::from_millis(60)),
        });
        let w = [timed(100, 2), timed(100, 2), both];
        assert_eq!(evaluate(&w, &c), vec![(2, EjectReason::FailurePercentage)]);
    }

    #[test]
    fn the_hedge_p95_survives_an_interval_without_answers() {
        let mut h = Health::new();
        assert_eq!(h.hedge_p95(), None, "nothing known yet");
        for i in 0..100u64 {
            h.record_latency(Duration::from_millis(if i < 95 { 2 } else { 50 }));
        }
        let p95 = h.hedge_p95().unwrap();
        assert!(
            p95 >= Duration::from_millis(2) && p95 <= Duration::from_millis(3),
            "{p95:?}"
        );
        let w = h.end_interval().unwrap();
        let p50 = w.p50.unwrap();
        assert!(
            p50 >= Duration::from_micros(1333) && p50 <= Duration::from_millis(3),
            "{p50:?}"
        );
        // The next interval has no answers (its handlers hang): the last known p95 stays.
        assert_eq!(h.end_interval().unwrap().p50, None);
        assert_eq!(h.hedge_p95(), Some(p95));
        // Ejected, its latencies are ignored like its outcomes.
        h.eject(Instant::now(), &config());
        h.record_latency(Duration::from_secs(1));
        assert_eq!(h.hedge_p95(), Some(p95));
    }

    proptest! {
        /// Whatever the outcomes, times, probes and reconnects: an ejected endpoint takes nothing
        /// until its time is up; on probation at most one probe is out (until probe_timeout); a
        /// trusted one takes everything; an ejection lasts base × times, capped; and an interval
        /// during which it was ejected reports no counts.
        #[test]
        fn the_states_mean_what_they_say(
            steps in proptest::collection::vec((0u8..5, any::<bool>(), 0u64..40_000), 1..200)
        ) {
            let c = config();
            let t0 = Instant::now();
            let mut now = t0;
            let mut h = Health::new();
            let mut ejected_since_interval = false;
            for (op, failed, advance_ms) in steps {
                now += Duration::from_millis(advance_ms);
                let takes = h.takes_requests(now, &c);
                match h.state() {
                    HealthState::Ejected { until, .. } if now < until => prop_assert!(!takes),
                    HealthState::Trusted => prop_assert!(takes),
                    _ => {}
                }
                match op {
                    0 if takes => {
                        h.reserve_probe(now);
                        if !h.is_trusted() {
                            prop_assert!(!h.takes_requests(now, &c), "a second probe at once");
                            prop_assert!(h.takes_requests(now + c.probe_timeout, &c));
                        }
                    }
                    1 => {
                        if let Verdict::Eject(_) = h.record(now, failed, &c) {
                            let len = h.eject(now, &c);
                            ejected_since_interval = true;
                            let HealthState::Ejected { times, until } = h.state() else { unreachable!() };
                            prop_assert_eq!(len, (c.base_ejection_time * times).min(c.max_ejection_time));
                            prop_assert_eq!(until, now + len);
                        }
                    }
                    2 => {
                        if h.on_reconnected() {
                            prop_assert_eq!(h.state(), HealthState::Probation { successes: 0 });
                        }
                    }
                    3 => {
                        let counts = h.end_interval();
                        if ejected_since_interval {
                            prop_assert_eq!(counts, None);
                        }
                        ejected_since_interval = false;
                    }
                    _ => {
                        h.tick(now);
                    }
                }
            }
        }

        /// Through real histograms: an endpoint 2.5 times slower than the others is never
        /// ejected, one 8 times slower (and over latency_min) always is, whatever the base
        /// latency and the bucket edges.
        #[test]
        fn the_latency_factor_holds_through_the_buckets(
            base_ms in 0.05f64..200.0,
            seed in any::<u64>(),
            others in 2usize..6,
        ) {
            let c = config();
            let mut w: Vec<Option<Window>> = (0..others).map(|i| measured(60, base_ms, seed.wrapping_add(i as u64))).collect();
            w.push(measured(60, base_ms * 2.5, seed ^ 0xABCD));
            prop_assert!(evaluate(&w, &c).is_empty(), "2.5 times slower ejected: {w:?}");
            let slow = base_ms * 8.0;
            w.pop();
            w.push(measured(60, slow, seed ^ 0xABCD));
            let ejected = evaluate(&w, &c);
            let floor_ms = c.latency_min.as_secs_f64() * 1000.0;
            if slow * 0.9 >= floor_ms * 1.5 {
                prop_assert_eq!(ejected, vec![(others, EjectReason::Latency)]);
            } else if slow * 1.1 * 1.5 < floor_ms {
                prop_assert!(ejected.is_empty(), "under latency_min ejected");
            }
        }

        /// A quantile of the histogram is never below the true one, and at most 1.5 times it
        /// (plus the 1 µs resolution); the interpolated estimate is within 1.5 times of it either
        /// way.
        #[test]
        fn quantiles_are_within_a_bucket_of_the_truth(
            mut us in proptest::collection::vec(0u64..10_000_000, 1..300),
            q in 0.0f64..1.0,
        ) {
            let mut l = Latencies::default();
            for v in &us {
                l.add(Duration::from_micros(*v));
            }
            us.sort_unstable();
            let rank = ((q * us.len() as f64).ceil() as usize).max(1);
            let truth = us[rank - 1].max(1);
            let got = l.quantile(q).unwrap().as_micros() as u64;
            prop_assert!(got > truth || (truth == 1 && got >= 1), "{got} for {truth}");
            prop_assert!(got as f64 <= truth as f64 * 1.5 + 1.0, "{got} for {truth}");
            let (got, truth) = (l.estimate(q).unwrap().as_secs_f64() * 1e6, truth as f64);
            prop_assert!(got <= truth * 1.5 + 1.0 && got * 1.5 + 1.0 >= truth, "estimate {got} for {truth}");
        }

        /// The latency rule never ejects an endpoint faster than latency_min or within the
        /// factor of the typical median, nor more than the slower half.
        #[test]
        fn the_latency_rule_ejects_only_real_outliers(
            p50s in proptest::collection::vec((0u64..200, 0u32..200), 1..12)
        ) {
            let c = config();
            let w: Vec<Option<Window>> = p50s.iter().map(|(ms, n)| timed(*n, *ms)).collect();
            let mut medians: Vec<u64> = p50s.iter().filter(|(_, n)| *n >= c.latency_min_requests).map(|(ms, _)| *ms).collect();
            medians.sort_unstable();
            let ejected: Vec<usize> = evaluate(&w, &c).into_iter().map(|(i, r)| { assert_eq!(r, EjectReason::Latency); i }).collect();
            for i in &ejected {
                let (ms, n) = p50s[*i];
                prop_assert!(n >= c.latency_min_requests);
                prop_assert!(medians.len() >= c.latency_min_hosts);
                let typical = medians[(medians.len() - 1) / 2];
                prop_assert!(Duration::from_millis(ms) >= c.latency_min);
                prop_assert!(ms as f64 >= typical as f64 * c.latency_factor);
            }
            prop_assert!(ejected.len() * 2 <= medians.len());
            // And the other way: with enough endpoints, every one over the limit is ejected.
            if medians.len() >= c.latency_min_hosts {
                let typical = medians[(medians.len() - 1) / 2];
                let limit = (Duration::from_millis(typical).mul_f64(c.latency_factor)).max(c.latency_min);
                for (i, (ms, n)) in p50s.iter().enumerate() {
                    if *n >= c.latency_min_requests && Duration::from_millis(*ms) >= limit {
                        prop_assert!(ejected.contains(&i), "{i} ({ms} ms) over the limit {limit:?} stayed");
                    }
                }
            }
        }

        /// The caps: starting from none ejected, ejecting every endpoint that asks never exceeds
        /// max(1, max_percent of total) and never leaves no usable endpoint.
        #[test]
        fn caps_hold_for_any_sequence(total in 1usize..40, pct in 0u32..101, asks in proptest::collection::vec(0usize..40, 1..80)) {
            let mut ejected = vec![false; total];
            for a in asks {
                let a = a % total;
                if ejected[a] { continue; }
                let n = ejected.iter().filter(|e| **e).count();
                let others = total - n - 1;
                if may_eject(n, total, others, pct) {
                    ejected[a] = true;
                }
                let n = ejected.iter().filter(|e| **e).count();
                prop_assert!(n < total, "every endpoint ejected");
                prop_assert!(n <= 1 || n * 100 <= total * pct as usize);
            }
        }
    }
}
