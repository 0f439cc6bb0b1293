//! Reconnect backoff: exponential with jitter, as pure logic (the caller passes the random value).

use std::time::Duration;

/// Exponential backoff with jitter. Defaults follow gRPC's connection backoff: 1 s, ×1.6,
/// ±20 % jitter, at most 120 s.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default, deny_unknown_fields)
)]
pub struct BackoffConfig {
    /// Delay before the first retry. Default 1 s.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub initial: Duration,
    /// Growth per failed attempt. Default 1.6.
    pub multiplier: f64,
    /// Fraction of the delay added or removed at random. Default 0.2 (±20 %).
    pub jitter: f64,
    /// Largest delay before jitter. Default 120 s.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub max: Duration,
    /// Not a setting: struct literals outside tether must end in `..Default::default()` (or
    /// start from a constructor), so adding a setting is not a breaking change.
    #[doc(hidden)]
    #[cfg_attr(feature = "serde", serde(skip))]
    pub __non_exhaustive: (),
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: Duration::from_secs(1),
            multiplier: 1.6,
            jitter: 0.2,
            max: Duration::from_secs(120),
            __non_exhaustive: (),
        }
    }
}

impl BackoffConfig {
    /// The delay before retry number `attempt` (1 for the first retry), without jitter.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let exp = self.multiplier.powi(attempt.saturating_sub(1).min(1000) as i32);
        let secs = (self.initial.as_secs_f64() * exp).min(self.max.as_secs_f64());
        Duration::from_secs_f64(secs)
    }

    /// The delay with jitter; `unit` is a random value in `[0, 1)` (0.5 means no jitter).
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let base = self.base_delay(attempt).as_secs_f64();
        let factor = 1.0 + self.jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        Duration::from_secs_f64((base * factor).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_grows_by_the_multiplier_up_to_the_max() {
        let b = BackoffConfig::default();
        let secs: Vec<f64> = (1..=12)
            .map(|a| (b.base_delay(a).as_secs_f64() * 1000.0).round() / 1000.0)
            .collect();
        assert_eq!(
            secs,
            vec![1.0, 1.6, 2.56, 4.096, 6.554, 10.486, 16.777, 26.844, 42.950, 68.719, 109.951, 120.0]
        );
        assert_eq!(b.base_delay(500), Duration::from_secs(120));
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let b = BackoffConfig::default();
        for attempt in 1..=15 {
            let base = b.base_delay(attempt).as_secs_f64();
            assert!((b.delay(attempt, 0.0).as_secs_f64() - base * 0.8).abs() < 1e-9);
            assert!((b.delay(attempt, 0.5).as_secs_f64() - base).abs() < 1e-9);
            for i in 0..100 {
                let d = b.delay(attempt, f64::from(i) / 100.0).as_secs_f64();
                assert!(
                    d >= base * 0.8 - 1e-9 && d < base * 1.2,
                    "attempt {attempt}: {d} vs {base}"
                );
            }
        }
    }
}
