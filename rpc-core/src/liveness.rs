//! Liveness rules as pure logic: idle tracking, heartbeat failure counting, idle eviction, write
//! stalls and partial frames. Nothing here touches a socket or a clock; the driver passes `now`.
//!
//! # Heartbeat detection bound
//!
//! With heartbeats on, a peer that stops answering is detected no later than
//! `interval + max_failures × timeout` after the last frame was read from it: the first heartbeat
//! goes out when the connection has been read-idle for `interval`; each heartbeat that gets no
//! inbound frame within `timeout` counts one failure, and the next heartbeat is sent at once; the
//! `max_failures`-th failure closes the connection with [`CloseReason::HeartbeatTimeout`]. Any inbound
//! byte, not only an ack, is proof of life and resets the count: a large frame arriving slowly
//! keeps its connection alive while it moves (the ack sits behind it on the stream).
//!
//! # Idle eviction
//!
//! A server's connection is idle when nothing has been read from it and no request has been in
//! flight for `idle_timeout` (as gRPC's MAX_CONNECTION_IDLE, which counts only time with no
//! outstanding call): the driver calls [`Liveness::busy`] while requests run.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::HeartbeatConfig;
use crate::error::CloseReason;

/// What the driver must do after [`Liveness::poll`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LivenessAction {
    /// Send a heartbeat with this id.
    SendHeartbeat {
        /// Heartbeat sequence number.
        id: u64,
    },
    /// A heartbeat went unanswered; `failures` in a row so far (below `max_failures`).
    HeartbeatMissed {
        /// Consecutive failures.
        failures: u32,
    },
    /// Close the connection.
    Close(CloseReason),
}

/// Per-connection liveness state.
#[derive(Debug, Clone)]
pub struct Liveness {
    heartbeat: Option<HeartbeatConfig>,
    idle_timeout: Option<Duration>,
    last_read: Instant,
    /// The idle clock's start: the later of the last read and the last moment requests were in flight.
    idle_since: Instant,
    awaiting_ack: Option<Instant>,
    failures: u32,
    next_heartbeat_id: u64,
}

impl Liveness {
    /// Liveness for a connection that opened at `now`. `heartbeat` is the client's heartbeat policy
    /// (ignored when disabled); `idle_timeout` the server's eviction timeout.
    pub fn new(now: Instant, heartbeat: Option<HeartbeatConfig>, idle_timeout: Option<Duration>) -> Self {
        Liveness {
            heartbeat: heartbeat.filter(|h| h.enabled),
            idle_timeout,
            last_read: now,
            idle_since: now,
            awaiting_ack: None,
            failures: 0,
            next_heartbeat_id: 1,
        }
    }

    /// Bytes were read at `now`: proof of life.
    pub fn on_read(&mut self, now: Instant) {
        self.last_read = now;
        self.idle_since = self.idle_since.max(now);
        self.awaiting_ack = None;
        self.failures = 0;
    }

    /// Requests were in flight at `now`: the connection is not idle, and its idle clock restarts.
    pub fn busy(&mut self, now: Instant) {
        self.idle_since = self.idle_since.max(now);
    }

    /// When the last frame was read.
    pub fn last_read(&self) -> Instant {
        self.last_read
    }

    /// Consecutive unanswered heartbeats.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The earliest instant at which [`Liveness::poll`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let idle = self.idle_timeout.map(|t| self.idle_since + t);
        let hb = self.heartbeat.as_ref().map(|h| match self.awaiting_ack {
            Some(deadline) => deadline,
            // After a miss, the connection is already idle past `interval`: the next heartbeat is due now.
            None => self.last_read + h.interval,
        });
        match (idle, hb) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// What is due at `now`. Call until it returns `None`.
    pub fn poll(&mut self, now: Instant) -> Option<LivenessAction> {
        if let Some(t) = self.idle_timeout {
            if now >= self.idle_since + t {
                // Once: the driver drains the connection, and the clock has nothing left to say.
                self.idle_timeout = None;
                return Some(LivenessAction::Close(CloseReason::IdleTimeout));
            }
        }
        let hb = self.heartbeat.as_ref()?;
        match self.awaiting_ack {
            Some(deadline) if now >= deadline => {
                self.awaiting_ack = None;
                self.failures += 1;
                if self.failures >= hb.max_failures {
                    Some(LivenessAction::Close(CloseReason::HeartbeatTimeout))
                } else {
                    Some(LivenessAction::HeartbeatMissed {
                        failures: self.failures,
                    })
                }
            }
            Some(_) => None,
            None if now >= self.last_read + hb.interval => {
                self.awaiting_ack = Some(now + hb.timeout);
                let id = self.next_heartbeat_id;
                self.next_heartbeat_id += 1;
                Some(LivenessAction::SendHeartbeat { id })
            }
            None => None,
        }
    }
}

/// Tracks how long writes have made no progress while bytes were waiting to be written.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteStall {
    since: Option<Instant>,
}

impl WriteStall {
    /// Bytes were written, or nothing is waiting.
    pub fn on_progress(&mut self) {
        self.since = None;
    }

    /// A write could not proceed at `now` with bytes waiting.
    pub fn on_blocked(&mut self, now: Instant) {
        self.since.get_or_insert(now);
    }

    /// When the stall becomes a slow-consumer close.
    pub fn deadline(&self, timeout: Duration) -> Option<Instant> {
        self.since.map(|s| s + timeout)
    }
}

/// Judges a partially received frame by the rate its bytes arrive, as Kestrel's
/// MinRequestBodyDataRate: a frame may take as long as it needs while its bytes keep coming at
/// `min_rate` bytes per second or faster, measured from its first byte and forgiven for the first
/// `grace`. So a 4 MiB frame on a slow but moving link completes, and a slowloris trickle is cut
/// off soon after the grace period.
#[derive(Debug, Clone, Copy, Default)]
pub struct PartialFrame {
    since: Option<Instant>,
    bytes: u64,
}

impl PartialFrame {
    /// After decoding: `buffered` bytes of an incomplete frame remain at `now` (0: none).
    pub fn on_decoded(&mut self, buffered: usize, now: Instant) {
        if buffered == 0 {
            self.since = None;
            self.bytes = 0;
        } else if self.since.is_none() {
            self.since = Some(now);
            self.bytes = buffered as u64;
        }
    }

    /// `n` more bytes of the incomplete frame arrived.
    pub fn on_bytes(&mut self, n: usize) {
        if self.since.is_some() {
            self.bytes += n as u64;
        }
    }

    /// A complete frame was decoded, so the next partial frame starts its own clock.
    pub fn on_frame(&mut self) {
        self.since = None;
        self.bytes = 0;
    }

    /// When the frame falls below the minimum rate if no more bytes arrive (`min_rate` 0: never).
    pub fn deadline(&self, grace: Duration, min_rate: u32) -> Option<Instant> {
        let since = self.since?;
        if min_rate == 0 {
            return None;
        }
        let earned = Duration::from_secs_f64(self.bytes as f64 / f64::from(min_rate));
        Some(since + grace.max(earned))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(interval_ms: u64, timeout_ms: u64, max_failures: u32) -> HeartbeatConfig {
        HeartbeatConfig {
            enabled: true,
            interval: Duration::from_millis(interval_ms),
            timeout: Duration::from_millis(timeout_ms),
            max_failures,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Runs the policy against a silent peer and returns when it closes, relative to the start.
    fn time_to_close(l: &mut Liveness, t0: Instant) -> Duration {
        let mut now = t0;
        loop {
            while let Some(a) = l.poll(now) {
                if let LivenessAction::Close(_) = a {
                    return now - t0;
                }
            }
            now = l.next_deadline().expect("a deadline while heartbeats are on");
        }
    }

    #[test]
    fn silent_peer_closes_exactly_at_the_documented_bound() {
        let t0 = Instant::now();
        for (interval, timeout, max) in [(15_000, 1_000, 3), (100, 50, 3), (200, 100, 1), (1000, 10, 5)] {
            let mut l = Liveness::new(t0, Some(hb(interval, timeout, max)), None);
            let bound = ms(interval) + ms(timeout) * max;
            assert_eq!(
                time_to_close(&mut l, t0),
                bound,
                "interval {interval} timeout {timeout} max {max}"
            );
        }
    }

    #[test]
    fn one_heartbeat_when_idle_not_one_per_tick() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, Some(hb(100, 50, 3)), None);
        assert_eq!(l.poll(t0 + ms(99)), None);
        assert_eq!(l.poll(t0 + ms(100)), Some(LivenessAction::SendHeartbeat { id: 1 }));
        // Still idle, still waiting for the ack: nothing more is sent.
        assert_eq!(l.poll(t0 + ms(120)), None);
        assert_eq!(l.poll(t0 + ms(149)), None);
        assert_eq!(l.next_deadline(), Some(t0 + ms(150)));
    }

    #[test]
    fn any_frame_resets_the_failure_count() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, Some(hb(100, 50, 2)), None);
        assert!(matches!(
            l.poll(t0 + ms(100)),
            Some(LivenessAction::SendHeartbeat { .. })
        ));
        assert_eq!(
            l.poll(t0 + ms(150)),
            Some(LivenessAction::HeartbeatMissed { failures: 1 })
        );
        assert!(matches!(
            l.poll(t0 + ms(150)),
            Some(LivenessAction::SendHeartbeat { .. })
        ));
        // A response (not an ack) arrives: proof of life.
        l.on_read(t0 + ms(170));
        assert_eq!(l.failures(), 0);
        assert_eq!(l.poll(t0 + ms(269)), None);
        assert!(matches!(
            l.poll(t0 + ms(270)),
            Some(LivenessAction::SendHeartbeat { .. })
        ));
        assert_eq!(
            l.poll(t0 + ms(320)),
            Some(LivenessAction::HeartbeatMissed { failures: 1 })
        );
    }

    #[test]
    fn traffic_means_no_heartbeat() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, Some(hb(100, 50, 3)), None);
        for i in 1..100 {
            l.on_read(t0 + ms(i * 60));
            assert_eq!(l.poll(t0 + ms(i * 60 + 59)), None);
        }
    }

    #[test]
    fn disabled_heartbeat_never_fires() {
        let t0 = Instant::now();
        let mut cfg = hb(100, 50, 3);
        cfg.enabled = false;
        let mut l = Liveness::new(t0, Some(cfg), None);
        assert_eq!(l.next_deadline(), None);
        assert_eq!(l.poll(t0 + Duration::from_secs(3600)), None);
    }

    #[test]
    fn idle_eviction_at_idle_timeout_since_last_read() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, None, Some(ms(300)));
        l.on_read(t0 + ms(100));
        assert_eq!(l.next_deadline(), Some(t0 + ms(400)));
        assert_eq!(l.poll(t0 + ms(399)), None);
        assert_eq!(
            l.poll(t0 + ms(400)),
            Some(LivenessAction::Close(CloseReason::IdleTimeout))
        );
    }

    #[test]
    fn write_stall_and_partial_frame_clocks() {
        let t0 = Instant::now();
        let mut w = WriteStall::default();
        w.on_blocked(t0);
        w.on_blocked(t0 + ms(10));
        assert_eq!(w.deadline(ms(100)), Some(t0 + ms(100)));
        w.on_progress();
        assert_eq!(w.deadline(ms(100)), None);

        let mut p = PartialFrame::default();
        p.on_decoded(3, t0);
        p.on_decoded(5, t0 + ms(50));
        // 3 bytes at 100 B/s earn 30 ms, less than the grace.
        assert_eq!(p.deadline(ms(100), 100), Some(t0 + ms(100)));
        p.on_frame();
        p.on_decoded(2, t0 + ms(60));
        assert_eq!(p.deadline(ms(100), 100), Some(t0 + ms(160)));
        p.on_decoded(0, t0 + ms(70));
        assert_eq!(p.deadline(ms(100), 100), None);
    }

    #[test]
    fn a_large_frame_arriving_at_the_minimum_rate_is_never_cut_off_and_a_trickle_is() {
        let t0 = Instant::now();
        let (grace, rate) = (Duration::from_secs(5), 240);
        // 100 KB/s for 40 s: a 4 MiB frame on a slow link. Its deadline stays ahead of the clock.
        let mut p = PartialFrame::default();
        p.on_decoded(16, t0);
        for s in 1..=40u64 {
            p.on_bytes(100_000);
            let now = t0 + Duration::from_secs(s);
            assert!(p.deadline(grace, rate).unwrap() > now, "cut off at {s} s");
        }
        // One byte a second: cut off once the grace is over and the bytes stop earning time.
        let mut p = PartialFrame::default();
        p.on_decoded(1, t0);
        let mut cut = None;
        for s in 1..=60u64 {
            p.on_bytes(1);
            let now = t0 + Duration::from_secs(s);
            if p.deadline(grace, rate).unwrap() <= now {
                cut = Some(s);
                break;
            }
        }
        assert_eq!(cut, Some(5));
        assert_eq!(PartialFrame::default().deadline(grace, 0), None);
    }

    #[test]
    fn idle_counts_only_time_with_nothing_read_and_nothing_in_flight() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, None, Some(ms(500)));
        // A request runs from 100 ms to 1100 ms: the driver reports it busy on each pass.
        l.on_read(t0 + ms(100));
        for t in [400, 700, 1000, 1100] {
            l.busy(t0 + ms(t));
            assert_eq!(l.poll(t0 + ms(t)), None, "evicted at {t} ms with a request in flight");
        }
        assert_eq!(l.next_deadline(), Some(t0 + ms(1600)));
        assert_eq!(l.poll(t0 + ms(1599)), None);
        assert_eq!(
            l.poll(t0 + ms(1600)),
            Some(LivenessAction::Close(CloseReason::IdleTimeout))
        );
        // Once only: the driver is draining by then.
        assert_eq!(l.poll(t0 + ms(5000)), None);
    }
}
