//! Open-loop latency, as brpc reports it: requests sent at a fixed rate whatever the answers do,
//! each one's latency counted from when it was due to be sent (no coordinated omission), with a
//! small share of requests taking a slow handler path.
//!
//! The schedule runs on a thread of its own (a blocking task) that sleeps until the next request
//! is due and hands every request then due to the runtime, one task each. Its own lateness (from
//! a request's due time to its hand-off) is part of each latency and is reported on its own, so a
//! reader can see the generator's floor: thread sleeps on Linux end about 50 µs late.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::histogram;
use crate::systems::Target;
use bytes::Bytes;

/// What one rate did.
#[derive(Debug, Clone)]
pub(crate) struct OpenOutcome {
    /// Requests due in the measured window, per second.
    pub(crate) offered: f64,
    /// Requests answered, per second of the measured window.
    pub(crate) achieved: f64,
    pub(crate) p50_us: u64,
    pub(crate) p99_us: u64,
    pub(crate) p999_us: u64,
    /// Failed, or not answered within the grace after the window.
    pub(crate) errors: u64,
    /// The generator's own lateness (due to handed off), p99.
    pub(crate) lag_p99_us: u64,
}

/// Sends echo requests of `payload` to `target` at `rate` per second for `warmup` then
/// `duration`, every `slow_every`-th one taking a `slow_ms` handler path; measures the requests
/// due after the warm-up.
pub(crate) async fn run(
    target: Arc<Target>,
    rate: f64,
    payload: Bytes,
    warmup: Duration,
    duration: Duration,
    slow_every: u64,
    slow_ms: u32,
) -> OpenOutcome {
    let latency = Arc::new(Mutex::new(histogram()));
    let (answered, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let rt = tokio::runtime::Handle::current();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now() + Duration::from_millis(10);
    let (warm_end, end) = (start + warmup, start + warmup + duration);
    let schedule = {
        let (latency, answered, failed) = (latency.clone(), answered.clone(), failed.clone());
        tokio::task::spawn_blocking(move || {
            let mut lag = histogram();
            let (mut issued, mut measured) = (0u64, 0u64);
            loop {
                let due = start + interval.mul_f64(issued as f64);
                if due >= end {
                    break;
                }
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let sent = Instant::now();
                let counted = due >= warm_end;
                if counted {
                    lag.saturating_record((sent - due).as_micros() as u64);
                    measured += 1;
                }
                let delay = if issued % slow_every == slow_every - 1 {
                    slow_ms
                } else {
                    0
                };
                let mut caller = target.caller(issued as usize);
                let (payload, latency, answered, failed) =
                    (payload.clone(), latency.clone(), answered.clone(), failed.clone());
                rt.spawn(async move {
                    let ok = caller.call_delayed(payload, delay).await;
                    if counted {
                        if ok {
                            let us = due.elapsed().as_micros().max(1) as u64;
                            latency.lock().expect("latency").saturating_record(us);
                            answered.fetch_add(1, Ordering::Relaxed);
                        } else {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
                issued += 1;
            }
            (lag, measured)
        })
    };
    let (lag, measured) = schedule.await.expect("schedule");
    // The requests still out get a grace to finish; any not answered by then count as errors.
    let grace = Instant::now() + Duration::from_secs(10);
    while answered.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < measured && Instant::now() < grace {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ok = answered.load(Ordering::Relaxed);
    let hist = latency.lock().expect("latency").clone();
    OpenOutcome {
        offered: measured as f64 / duration.as_secs_f64(),
        achieved: ok as f64 / duration.as_secs_f64(),
        p50_us: hist.value_at_quantile(0.5),
        p99_us: hist.value_at_quantile(0.99),
        p999_us: hist.value_at_quantile(0.999),
        errors: measured - ok,
        lag_p99_us: lag.value_at_quantile(0.99),
    }
}
