//! Latency histograms in buckets half an octave wide: values within a factor of 1.5 share a
//! bucket, which is plenty to tell an endpoint five times slower than the others, to place a
//! hedge, or to show an operator a method's p50 and p99. The bucket scheme is pure; the client's
//! outlier detection keeps its own small counts over it, and [`AtomicLatencies`] is the
//! lock-free one a server or client records every request into.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Buckets in a histogram: the last holds every latency from about 71 minutes up.
pub const BUCKETS: usize = 64;

/// The bucket of latency `d`: 1 µs resolution, half an octave wide.
pub fn bucket(d: Duration) -> usize {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
    let octave = 63 - us.leading_zeros();
    let half = if octave == 0 { 0 } else { (us >> (octave - 1)) & 1 };
    (2 * octave as usize + half as usize).min(BUCKETS - 1)
}

/// The smallest latency in bucket `i`, in µs.
fn lower_us(i: usize) -> u64 {
    match (i / 2, i % 2) {
        (octave, 0) => 1 << octave,
        (0, _) => 2, // bucket 1 stays empty: 1 µs has no half octave
        (octave, _) => 3 << (octave - 1),
    }
}

/// Where the `q` quantile's rank falls in `counts` (which hold `total` values): its bucket, how
/// many values come before it in that bucket, and how many the bucket holds. `None` when empty.
pub fn locate(counts: impl IntoIterator<Item = u64>, total: u64, q: f64) -> Option<(usize, u64, u64)> {
    if total == 0 {
        return None;
    }
    let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
    let mut seen = 0u64;
    for (i, n) in counts.into_iter().enumerate() {
        if seen.saturating_add(n) >= rank {
            return Some((i, rank - seen - 1, n));
        }
        seen = seen.saturating_add(n);
    }
    None
}

/// The upper bound of bucket `i`: a quantile reported this way is never below the true value,
/// and within 1.5 times above it. For hedging, where late is safer than early.
pub fn upper_bound(i: usize) -> Duration {
    Duration::from_micros(lower_us(i + 1))
}

/// The value of rank `before` among the `n` values of bucket `i`, interpolated geometrically:
/// within 1.5 times of the true value either way, and for values spread over a bucket much closer.
pub fn interpolate(i: usize, before: u64, n: u64) -> Duration {
    let (lo, hi) = (lower_us(i) as f64, lower_us(i + 1) as f64);
    let at = (before as f64 + 0.5) / n.max(1) as f64;
    Duration::from_secs_f64(lo * (hi / lo).powf(at) / 1e6)
}

/// A histogram every request can record into at once: one relaxed atomic add per bucket hit,
/// one for the count and one for the sum. 528 bytes.
#[derive(Debug)]
pub struct AtomicLatencies {
    buckets: [AtomicU64; BUCKETS],
    sum_us: AtomicU64,
}

impl Default for AtomicLatencies {
    fn default() -> Self {
        AtomicLatencies {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl AtomicLatencies {
    /// Records one latency.
    pub fn record(&self, d: Duration) {
        self.buckets[bucket(d)].fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// What it holds now (each bucket read once; values recorded meanwhile may be half seen).
    pub fn snapshot(&self) -> LatencySnapshot {
        let buckets: [u64; BUCKETS] = std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed));
        LatencySnapshot {
            count: buckets.iter().sum(),
            sum_us: self.sum_us.load(Ordering::Relaxed),
            buckets,
        }
    }
}

/// A histogram read at one moment, for quantiles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencySnapshot {
    buckets: [u64; BUCKETS],
    count: u64,
    sum_us: u64,
}

impl LatencySnapshot {
    /// How many latencies it holds.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Their mean (`None` when empty).
    pub fn mean(&self) -> Option<Duration> {
        (self.count > 0).then(|| Duration::from_micros(self.sum_us / self.count))
    }

    /// The `q` quantile (0 to 1), interpolated within its bucket: within 1.5 times of the true
    /// value either way. `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let (i, before, n) = locate(self.buckets.iter().copied(), self.count, q)?;
        Some(interpolate(i, before, n))
    }

    /// What was recorded between `earlier` and this snapshot (of the same histogram).
    pub fn since(&self, earlier: &LatencySnapshot) -> LatencySnapshot {
        let buckets: [u64; BUCKETS] = std::array::from_fn(|i| self.buckets[i].saturating_sub(earlier.buckets[i]));
        LatencySnapshot {
            count: buckets.iter().sum(),
            sum_us: self.sum_us.saturating_sub(earlier.sum_us),
            buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Every latency lands in a bucket whose bounds hold it, and buckets are ordered.
        #[test]
        fn a_latency_lies_within_its_bucket(us in 1u64..4_000_000_000) {
            let i = bucket(Duration::from_micros(us));
            prop_assert!(lower_us(i) <= us);
            prop_assert!(i == BUCKETS - 1 || us < lower_us(i + 1));
        }

        /// The atomic histogram's quantiles are within 1.5 times of the true ones either way, its
        /// mean is exact to the µs, and `since` subtracts exactly.
        #[test]
        fn atomic_quantiles_are_within_a_bucket_of_the_truth(
            mut us in proptest::collection::vec(1u64..10_000_000, 1..300),
            q in 0.0f64..1.0,
        ) {
            let h = AtomicLatencies::default();
            let before = h.snapshot();
            for v in &us {
                h.record(Duration::from_micros(*v));
            }
            let snap = h.snapshot().since(&before);
            prop_assert_eq!(snap.count(), us.len() as u64);
            let sum: u64 = us.iter().sum();
            prop_assert_eq!(snap.mean(), Some(Duration::from_micros(sum / us.len() as u64)));
            us.sort_unstable();
            let rank = ((q * us.len() as f64).ceil() as usize).max(1);
            let truth = us[rank - 1] as f64;
            let got = snap.quantile(q).unwrap().as_secs_f64() * 1e6;
            prop_assert!(got <= truth * 1.5 + 1.0 && got * 1.5 + 1.0 >= truth, "{got} for {truth}");
        }
    }

    #[test]
    fn an_empty_histogram_has_no_quantile_or_mean() {
        let s = AtomicLatencies::default().snapshot();
        assert_eq!((s.count(), s.quantile(0.5), s.mean()), (0, None, None));
    }
}
