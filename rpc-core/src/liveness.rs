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
//!
//! # Server heartbeats while work runs
//!
//! Idle eviction waits for what is in flight, so it cannot tell a quiet client from a dead one
//! while a handler or a stream runs: a server stream's client reads without writing, and a client
//! gone in a power cut leaves its stream (and the handler feeding it) running until the kernel
//! gives up, if it ever does. So a server also heartbeats, with the same rules and bound as a
//! client, but only while it is busy ([`Liveness::set_busy`]): the first heartbeat is due
//! `interval` after the later of the last read and the moment the connection became busy. A
//! connection with nothing in flight is left to idle eviction, and sends nothing.

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
    /// The latest heartbeat sent and when, until its ack comes (for its round trip).
    last_sent: Option<(u64, Instant)>,
    /// A server's: heartbeats only while work is in flight.
    only_while_busy: bool,
    /// Whether work is in flight, and since when (a server's).
    busy: Option<Instant>,
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
            last_sent: None,
            only_while_busy: false,
            busy: None,
        }
    }

    /// A server's liveness: idle eviction at `idle_timeout`, and `heartbeat` only while work is
    /// in flight (see the module docs).
    pub fn server(now: Instant, heartbeat: Option<HeartbeatConfig>, idle_timeout: Option<Duration>) -> Self {
        Liveness {
            only_while_busy: true,
            ..Liveness::new(now, heartbeat, idle_timeout)
        }
    }

    /// A server's connection has work in flight at `now` (`true`), or none (`false`). Becoming
    /// idle forgets an unanswered heartbeat: idle eviction takes over.
    pub fn set_busy(&mut self, busy: bool, now: Instant) {
        match (busy, self.busy) {
            (true, None) => self.busy = Some(now),
            (false, Some(_)) => {
                self.busy = None;
                self.awaiting_ack = None;
                self.failures = 0;
            }
            _ => {}
        }
    }

    /// When the next heartbeat is due if nothing is read (none while a server is idle).
    fn heartbeat_due(&self, h: &HeartbeatConfig) -> Option<Instant> {
        if !self.only_while_busy {
            return Some(self.last_read + h.interval);
        }
        self.busy.map(|since| self.last_read.max(since) + h.interval)
    }

    /// Bytes were read at `now`: proof of life.
    pub fn on_read(&mut self, now: Instant) {
        self.last_read = now;
        self.idle_since = self.idle_since.max(now);
        self.awaiting_ack = None;
        self.failures = 0;
    }

    /// The ack of heartbeat `id` was read at `now`: the heartbeat's round trip, if it is the latest
    /// one sent (an ack of an older one, or a repeated ack, measures nothing). The round trip runs
    /// from when the heartbeat was due (it may have queued behind this side's writes) to when its
    /// ack was decoded, so it includes both sides' queues: what a request would wait.
    pub fn on_ack(&mut self, id: u64, now: Instant) -> Option<Duration> {
        match self.last_sent {
            Some((sent, at)) if sent == id => {
                self.last_sent = None;
                Some(now.saturating_duration_since(at))
            }
            _ => None,
        }
    }

    /// Requests were in flight at `now`: the connection is not idle, and its idle clock restarts.
    pub fn busy(&mut self, now: Instant) {
        self.idle_since = self.idle_since.max(now);
    }

    /// True when the idle clock has run out at `now` (so the driver checks whether requests are
    /// in flight before [`Liveness::poll`] evicts: a check it need not make on every pass).
    pub fn idle_due(&self, now: Instant) -> bool {
        self.idle_timeout.is_some_and(|t| now >= self.idle_since + t)
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
        let hb = self.heartbeat.as_ref().and_then(|h| match self.awaiting_ack {
            Some(deadline) => Some(deadline),
            // After a miss, the connection is already idle past `interval`: the next heartbeat is due now.
            None => self.heartbeat_due(h),
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
            None if self.heartbeat_due(hb).is_some_and(|due| now >= due) => {
                self.awaiting_ack = Some(now + hb.timeout);
                let id = self.next_heartbeat_id;
                self.next_heartbeat_id += 1;
                self.last_sent = Some((id, now));
                Some(LivenessAction::SendHeartbeat { id })
            }
            None => None,
        }
    }
}

/// Judges whether the peer reads what this side writes, by the rate the write buffer drains,
/// not by whether the last byte moved (a trickle reader taking one byte every few seconds would
/// defeat that and hold the connection and its buffers forever). A leaky bucket, as
/// [`PartialFrame`]: while bytes wait, the connection has at most `timeout` of credit; time spends
/// it and each byte the socket takes earns `1 / min_rate` seconds. It is a slow consumer when the
/// credit runs out; the bucket starts full again whenever the buffer empties. So a peer that does
/// not read at all is closed `timeout` after bytes start waiting, a large response on a slow but
/// moving link is not, and a trickle is cut off about `timeout` after it falls behind `min_rate`.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteStall {
    /// When the credit was last brought up to date, while bytes wait.
    last: Option<Instant>,
    credit: f64,
}

impl WriteStall {
    /// The socket took `n` bytes at `now` and `waiting` remain.
    pub fn on_written(&mut self, n: usize, waiting: usize, now: Instant, timeout: Duration, min_rate: u32) {
        if waiting == 0 {
            self.last = None;
            return;
        }
        match self.last {
            None => {
                self.last = Some(now);
                self.credit = timeout.as_secs_f64();
            }
            Some(last) => {
                let spent = now.saturating_duration_since(last).as_secs_f64();
                let earned = if min_rate == 0 {
                    timeout.as_secs_f64()
                } else {
                    n as f64 / f64::from(min_rate)
                };
                self.credit = (self.credit - spent + earned).min(timeout.as_secs_f64());
                self.last = Some(now);
            }
        }
    }

    /// The socket took nothing at `now` with bytes waiting.
    pub fn on_blocked(&mut self, now: Instant, timeout: Duration) {
        if self.last.is_none() {
            self.last = Some(now);
            self.credit = timeout.as_secs_f64();
        }
    }

    /// Nothing is waiting any more.
    pub fn on_empty(&mut self) {
        self.last = None;
    }

    /// When the connection becomes a slow consumer if the socket takes nothing more.
    pub fn deadline(&self) -> Option<Instant> {
        let last = self.last?;
        Some(last + Duration::from_secs_f64(self.credit.max(0.0)))
    }
}

/// Judges a partially received frame by the rate its bytes arrive, as Kestrel's
/// MinRequestBodyDataRate, with a leaky bucket so early bytes cannot buy late silence: the frame
/// starts with `grace` seconds of credit, time spends it, and each byte earns `1 / min_rate`
/// seconds, never more than `grace` in hand. The frame fails when the credit runs out. So a frame
/// may take as long as it needs while its bytes keep coming at `min_rate` or faster (a 4 MiB frame
/// on a slow but moving link completes), while a trickle, or a burst followed by silence, is cut
/// off about `grace` after its bytes stop keeping up.
#[derive(Debug, Clone, Copy, Default)]
pub struct PartialFrame {
    /// When the credit was last brought up to date, if a partial frame is waiting.
    last: Option<Instant>,
    /// Seconds of credit at `last` (negative: already out).
    credit: f64,
}

impl PartialFrame {
    /// After decoding: `buffered` bytes of an incomplete frame remain at `now` (0: none). A new
    /// partial frame starts with the full grace.
    pub fn on_decoded(&mut self, buffered: usize, now: Instant, grace: Duration) {
        if buffered == 0 {
            self.last = None;
        } else if self.last.is_none() {
            self.last = Some(now);
            self.credit = grace.as_secs_f64();
        }
    }

    /// `n` more bytes of the waiting partial frame arrived at `now`.
    pub fn on_bytes(&mut self, n: usize, now: Instant, grace: Duration, min_rate: u32) {
        let Some(last) = self.last else { return };
        if min_rate == 0 {
            return;
        }
        let spent = now.saturating_duration_since(last).as_secs_f64();
        let earned = n as f64 / f64::from(min_rate);
        self.credit = (self.credit - spent + earned).min(grace.as_secs_f64());
        self.last = Some(now);
    }

    /// A complete frame was decoded, so the next partial frame starts its own clock.
    pub fn on_frame(&mut self) {
        self.last = None;
    }

    /// When the credit runs out if no more bytes arrive (`min_rate` 0: never).
    pub fn deadline(&self, min_rate: u32) -> Option<Instant> {
        let last = self.last?;
        if min_rate == 0 {
            return None;
        }
        Some(last + Duration::from_secs_f64(self.credit.max(0.0)))
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
            __non_exhaustive: (),
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
        let t = ms(100);
        let mut w = WriteStall::default();
        w.on_blocked(t0, t);
        w.on_blocked(t0 + ms(10), t);
        assert_eq!(w.deadline(), Some(t0 + ms(100)));
        w.on_empty();
        assert_eq!(w.deadline(), None);

        let g = ms(100);
        let mut p = PartialFrame::default();
        p.on_decoded(3, t0, g);
        p.on_decoded(5, t0 + ms(50), g);
        assert_eq!(p.deadline(100), Some(t0 + ms(100)));
        p.on_frame();
        p.on_decoded(2, t0 + ms(60), g);
        assert_eq!(p.deadline(100), Some(t0 + ms(160)));
        p.on_decoded(0, t0 + ms(70), g);
        assert_eq!(p.deadline(100), None);
    }

    /// Feeds `per_second` bytes each second for `secs` seconds after a first read of `first`
    /// bytes; returns the second at which the frame is cut off, if it is.
    fn cut_at(first: usize, per_second: usize, secs: u64) -> Option<u64> {
        let t0 = Instant::now();
        let (grace, rate) = (Duration::from_secs(5), 240);
        let mut p = PartialFrame::default();
        p.on_decoded(first, t0, grace);
        for s in 1..=secs {
            let now = t0 + Duration::from_secs(s);
            if p.deadline(rate).unwrap() <= now {
                return Some(s);
            }
            p.on_bytes(per_second, now, grace, rate);
        }
        None
    }

    #[test]
    fn a_large_frame_arriving_at_the_minimum_rate_is_never_cut_off_and_a_trickle_is() {
        // 100 KB/s for 40 s: a 4 MiB frame on a slow link.
        assert_eq!(cut_at(16, 100_000, 40), None);
        // Exactly the minimum rate, for a long time.
        assert_eq!(cut_at(16, 240, 600), None);
        // One byte a second: cut off once the grace is spent.
        assert_eq!(cut_at(1, 1, 60), Some(6));
        // Early bytes buy no late silence: 4 MiB at once, then nothing.
        assert_eq!(cut_at(4 << 20, 0, 60), Some(5));
        assert_eq!(PartialFrame::default().deadline(0), None);
    }

    /// The peer takes `per_second` bytes each second while 1 MiB waits; the second at which it is
    /// a slow consumer (10 s timeout, 1 KiB/s minimum), if it is.
    fn slow_at(per_second: usize, secs: u64) -> Option<u64> {
        let t0 = Instant::now();
        let (timeout, rate) = (Duration::from_secs(10), 1024);
        let mut w = WriteStall::default();
        w.on_blocked(t0, timeout);
        for s in 1..=secs {
            let now = t0 + Duration::from_secs(s);
            if w.deadline().unwrap() <= now {
                return Some(s);
            }
            w.on_written(per_second, 1 << 20, now, timeout, rate);
        }
        None
    }

    #[test]
    fn a_slow_but_moving_reader_is_no_slow_consumer_and_a_trickle_is() {
        assert_eq!(slow_at(0, 60), Some(10), "a peer that reads nothing");
        assert_eq!(slow_at(100_000, 120), None, "100 KB/s");
        assert_eq!(slow_at(1024, 600), None, "exactly the minimum rate");
        assert_eq!(slow_at(20, 60), Some(11), "20 B/s: the trickle");
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

    #[test]
    fn an_idle_server_sends_no_heartbeat() {
        let t0 = Instant::now();
        let mut l = Liveness::server(t0, Some(hb(100, 50, 3)), Some(ms(1000)));
        // Only idle eviction is due.
        assert_eq!(l.next_deadline(), Some(t0 + ms(1000)));
        for t in (0..1000).step_by(10) {
            assert_eq!(l.poll(t0 + ms(t)), None, "at {t} ms");
        }
    }

    #[test]
    fn a_busy_server_closes_a_silent_client_at_the_bound_from_when_work_began() {
        let t0 = Instant::now();
        let mut l = Liveness::server(t0, Some(hb(100, 50, 3)), Some(ms(10_000)));
        // Nothing read since t0; a stream opens at 1 s (its request was read then).
        l.on_read(t0 + ms(1000));
        l.set_busy(true, t0 + ms(1000));
        assert_eq!(l.next_deadline(), Some(t0 + ms(1100)));
        let mut now = t0 + ms(1000);
        let closed_at = loop {
            l.busy(now);
            match l.poll(now) {
                Some(LivenessAction::Close(reason)) => {
                    assert_eq!(reason, CloseReason::HeartbeatTimeout);
                    break now;
                }
                Some(_) => continue,
                None => now = l.next_deadline().unwrap(),
            }
        };
        assert_eq!(closed_at, t0 + ms(1000 + 100 + 3 * 50));
    }

    #[test]
    fn a_server_that_falls_idle_forgets_its_unanswered_heartbeat() {
        let t0 = Instant::now();
        let mut l = Liveness::server(t0, Some(hb(100, 50, 3)), Some(ms(10_000)));
        l.set_busy(true, t0);
        assert_eq!(l.poll(t0 + ms(100)), Some(LivenessAction::SendHeartbeat { id: 1 }));
        l.set_busy(false, t0 + ms(120));
        assert_eq!(l.next_deadline(), Some(t0 + ms(10_000)));
        assert_eq!(l.poll(t0 + ms(200)), None);
        // Busy again: a fresh interval from then.
        l.set_busy(true, t0 + ms(300));
        assert_eq!(l.next_deadline(), Some(t0 + ms(400)));
    }

    proptest::proptest! {
        /// A heartbeat's round trip is reported once, for the latest heartbeat sent only, and is
        /// exactly the time from its sending to its ack, whatever reads, stale acks and repeats
        /// come between.
        #[test]
        fn heartbeat_round_trips_are_measured_for_the_latest_heartbeat_once(
            ops in proptest::collection::vec((0u8..4, 0u64..400), 1..120)
        ) {
            let t0 = Instant::now();
            let mut l = Liveness::new(t0, Some(hb(100, 10_000, 1_000)), None);
            let mut now = t0;
            let mut sent: Vec<(u64, Instant)> = Vec::new();
            let mut acked_latest = false;
            for (op, dt) in ops {
                now += ms(dt);
                match op {
                    0 => {
                        while let Some(a) = l.poll(now) {
                            if let LivenessAction::SendHeartbeat { id } = a {
                                sent.push((id, now));
                                acked_latest = false;
                            }
                        }
                    }
                    1 | 2 => {
                        let Some(&(latest, _)) = sent.last() else { continue };
                        // 1: the latest heartbeat's ack; 2: an older one's (or id 0, never sent).
                        let (id, at) = if op == 1 { sent[sent.len() - 1] } else if sent.len() > 1 { sent[0] } else { (0, now) };
                        let got = l.on_ack(id, now);
                        if id == latest && !acked_latest {
                            proptest::prop_assert_eq!(got, Some(now - at));
                            acked_latest = true;
                        } else {
                            proptest::prop_assert_eq!(got, None);
                        }
                    }
                    _ => l.on_read(now),
                }
            }
        }

        /// Whatever reads and busy spells a server sees, it sends a heartbeat only while busy and
        /// closes for heartbeats only when the peer was silent for at least the bound since the
        /// later of its last read and the start of the busy spell; and a server kept busy with a
        /// silent peer closes no later than the bound (plus the step it is polled at).
        #[test]
        fn server_heartbeats_only_while_busy_and_within_the_bound(
            steps in proptest::collection::vec((0u64..40, 0u8..4), 1..200),
        ) {
            let (interval, timeout, max) = (100u64, 30u64, 3u32);
            let bound = ms(interval + timeout * u64::from(max));
            let t0 = Instant::now();
            let mut l = Liveness::server(t0, Some(hb(interval, timeout, max)), None);
            let mut now = t0;
            let mut last_read = t0;
            let mut busy_since: Option<Instant> = None;
            for (dt, op) in steps {
                let target = now + ms(dt);
                // The driver polls at every deadline on the way to the next event, as its timer does.
                loop {
                    let at = match l.next_deadline() {
                        Some(d) if d <= target => d.max(now),
                        _ => target,
                    };
                    now = at;
                    while let Some(a) = l.poll(now) {
                        match a {
                            LivenessAction::SendHeartbeat { .. } => {
                                proptest::prop_assert!(busy_since.is_some(), "heartbeat while idle");
                            }
                            LivenessAction::Close(CloseReason::HeartbeatTimeout) => {
                                let since = busy_since.expect("closed while idle").max(last_read);
                                proptest::prop_assert!(now - since >= bound, "closed after {:?}", now - since);
                                return Ok(());
                            }
                            LivenessAction::HeartbeatMissed { .. } => {}
                            other => proptest::prop_assert!(false, "{other:?}"),
                        }
                    }
                    if let Some(since) = busy_since {
                        let since = since.max(last_read);
                        proptest::prop_assert!(now - since < bound, "silent and busy for {:?}, still open", now - since);
                    }
                    if at == target {
                        break;
                    }
                }
                match op {
                    0 => { l.on_read(now); last_read = now; }
                    1 => { l.set_busy(true, now); busy_since.get_or_insert(now); }
                    2 => { l.set_busy(false, now); busy_since = None; }
                    _ => {}
                }
            }
        }
    }
}
