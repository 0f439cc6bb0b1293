//! Endpoint selection over the alive pool.

/// How a request picks among alive endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "kebab-case")
)]
#[non_exhaustive]
pub enum Balance {
    /// Each alive endpoint in turn. The default.
    #[default]
    RoundRobin,
    /// Uniformly at random.
    Random,
    /// Power of two choices: two endpoints at random, the one with fewer requests in flight.
    LeastInFlight,
}

/// Picks one of `n` candidates; `load(k)` is candidate k's requests in flight (asked only by
/// [`Balance::LeastInFlight`]). `counter` is a round-robin counter; `r1` and `r2` are random values.
pub(crate) fn pick(
    strategy: Balance,
    n: usize,
    load: impl Fn(usize) -> usize,
    counter: usize,
    r1: usize,
    r2: usize,
) -> Option<usize> {
    if n == 0 {
        return None;
    }
    Some(match strategy {
        Balance::RoundRobin => counter % n,
        Balance::Random => r1 % n,
        Balance::LeastInFlight => {
            let a = r1 % n;
            // A second, different candidate when there is one.
            let b = if n > 1 { (a + 1 + r2 % (n - 1)) % n } else { a };
            if load(b) < load(a) {
                b
            } else {
                a
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_is_exact() {
        let loads = [0, 0, 0];
        let mut counts = [0; 3];
        for c in 0..300 {
            counts[pick(Balance::RoundRobin, loads.len(), |k| loads[k], c, 0, 0).unwrap()] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
    }

    #[test]
    fn least_in_flight_prefers_the_less_loaded_of_two_distinct_candidates() {
        let loads = [5, 0, 9];
        for r1 in 0..30 {
            for r2 in 0..30 {
                let i = pick(Balance::LeastInFlight, loads.len(), |k| loads[k], 0, r1, r2).unwrap();
                let a = r1 % 3;
                assert_ne!(i, 2, "the most loaded never wins a pair");
                assert!(loads[i] <= loads[a]);
            }
        }
        assert_eq!(pick(Balance::LeastInFlight, 1, |_| 3, 0, 7, 7), Some(0));
        assert_eq!(pick(Balance::Random, 0, |_| 0, 0, 0, 0), None);
    }
}
