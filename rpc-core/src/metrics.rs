//! Metric names and per-connection handles. Handles are created once per connection (or per
//! service), never looked up per request.

use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{counter, Counter, Label};

use crate::latency::{AtomicLatencies, LatencySnapshot};

/// Connections opened, label `side`.
pub const CONNECTIONS_OPENED: &str = "tether_connections_opened_total";
/// Connections closed, labels `side`, `reason` (a [`crate::CloseReason::as_str`] value).
pub const CONNECTIONS_CLOSED: &str = "tether_connections_closed_total";
/// Heartbeats sent, label `side`.
pub const HEARTBEATS_SENT: &str = "tether_heartbeats_sent_total";
/// Heartbeat acks received, label `side`.
pub const HEARTBEATS_ACKED: &str = "tether_heartbeats_acked_total";
/// Heartbeats that got no answer in time, label `side`.
pub const HEARTBEATS_FAILED: &str = "tether_heartbeats_failed_total";
/// GOAWAY frames received, labels `side`, `reason`.
pub const GOAWAY_RECEIVED: &str = "tether_goaway_received_total";
/// Responses that arrived for calls whose callers had given up, label `side`.
pub const LATE_RESPONSES: &str = "tether_late_responses_total";
/// Requests or responses refused alone (over a metadata limit) with their connection kept, label `side`.
pub const FRAMES_REJECTED: &str = "tether_frames_rejected_total";
/// Frames of a kind this build does not know, skipped (a newer peer's extension), label `side`.
pub const FRAMES_IGNORED: &str = "tether_frames_ignored_total";
/// Streams opened, label `side`.
pub const STREAMS_OPENED: &str = "tether_streams_opened_total";
/// Streams ended, labels `side`, `reason` (`ok`, `error`, `cancelled`, `reset`, `connection`).
pub const STREAMS_CLOSED: &str = "tether_streams_closed_total";
/// Stream messages, labels `side`, `direction` (`in`, `out`).
pub const STREAM_MESSAGES: &str = "tether_stream_messages_total";
/// Stream message bytes, labels `side`, `direction`.
pub const STREAM_BYTES: &str = "tether_stream_bytes_total";
/// Streams reset because their receiver granted no credit for `stream_stall_timeout`.
pub const STREAM_STALLS: &str = "tether_stream_stalls_total";
/// Client: resumable streams opened again after a break, by `outcome` (`resumed`, `failed`).
pub const STREAM_RESUMES: &str = "tether_stream_resumes_total";
/// Client: seconds from a resumable stream's break to its resumed stream's first item.
pub const STREAM_RESUME_GAP: &str = "tether_stream_resume_gap_seconds";
/// Client: messages a resumed stream delivered before its first checkpoint (replayed).
pub const STREAM_REPLAYED: &str = "tether_stream_replayed_messages_total";
/// Client: messages a resumable stream dropped as at or below what it had delivered.
pub const STREAM_DUPLICATES: &str = "tether_stream_duplicates_dropped_total";

/// Counts a send that failed on a stream (only stalls are counted here: the rest end the stream
/// and are counted as its close).
pub fn stream_send_failed(e: &crate::stream::SendError) {
    if matches!(e, crate::stream::SendError::Stalled(..)) {
        counter!(STREAM_STALLS).increment(1);
    }
}

/// Which side of a connection a driver runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The side that connected.
    Client,
    /// The side that accepted.
    Server,
}

impl Side {
    /// `client` or `server`, the `side` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Server => "server",
        }
    }
}

/// Counter handles for one connection.
#[derive(Debug, Clone)]
pub struct ConnectionMetrics {
    side: Side,
    pub(crate) heartbeats_sent: Counter,
    pub(crate) heartbeats_acked: Counter,
    pub(crate) heartbeats_failed: Counter,
    pub(crate) stream_messages_in: Counter,
    pub(crate) stream_messages_out: Counter,
    pub(crate) stream_bytes_in: Counter,
    pub(crate) stream_bytes_out: Counter,
}

impl ConnectionMetrics {
    /// Handles for a connection on `side`; counts it as opened.
    pub fn new(side: Side) -> Self {
        let s = side.as_str();
        counter!(CONNECTIONS_OPENED, "side" => s).increment(1);
        ConnectionMetrics {
            side,
            heartbeats_sent: counter!(HEARTBEATS_SENT, "side" => s),
            heartbeats_acked: counter!(HEARTBEATS_ACKED, "side" => s),
            heartbeats_failed: counter!(HEARTBEATS_FAILED, "side" => s),
            stream_messages_in: counter!(STREAM_MESSAGES, "side" => s, "direction" => "in"),
            stream_messages_out: counter!(STREAM_MESSAGES, "side" => s, "direction" => "out"),
            stream_bytes_in: counter!(STREAM_BYTES, "side" => s, "direction" => "in"),
            stream_bytes_out: counter!(STREAM_BYTES, "side" => s, "direction" => "out"),
        }
    }

    /// Counts the close (once per connection).
    pub(crate) fn closed(&self, reason: &crate::CloseReason) {
        let labels = [
            Label::new("side", self.side.as_str()),
            Label::new("reason", reason.as_str()),
        ];
        counter!(CONNECTIONS_CLOSED, labels.iter()).increment(1);
    }

    /// Counts a response nobody waited for any more (a rare path: the handle is looked up here).
    pub(crate) fn late_response(&self) {
        counter!(LATE_RESPONSES, "side" => self.side.as_str()).increment(1);
    }

    /// Counts a frame refused alone (a rare path: the handle is looked up here).
    pub(crate) fn frame_rejected(&self) {
        counter!(FRAMES_REJECTED, "side" => self.side.as_str()).increment(1);
    }

    /// Counts a frame of an unknown kind, skipped (a rare path: the handle is looked up here).
    pub(crate) fn frame_ignored(&self) {
        counter!(FRAMES_IGNORED, "side" => self.side.as_str()).increment(1);
    }

    /// Counts a stream opened (a rare path next to its messages: the handle is looked up here).
    pub(crate) fn stream_opened(&self) {
        counter!(STREAMS_OPENED, "side" => self.side.as_str()).increment(1);
    }

    /// Counts a stream's end.
    pub(crate) fn stream_closed(&self, reason: &'static str) {
        counter!(STREAMS_CLOSED, "side" => self.side.as_str(), "reason" => reason).increment(1);
    }

    pub(crate) fn goaway_received(&self, reason: crate::GoAwayReason) {
        counter!(GOAWAY_RECEIVED, "side" => self.side.as_str(), "reason" => reason.as_str()).increment(1);
    }
}

/// Requests finished, labels `side`, `method`, `code` (a [`crate::Code`] name).
pub const REQUESTS: &str = "tether_requests_total";
/// Request latency in seconds, labels `side`, `method`.
pub const REQUEST_DURATION: &str = "tether_request_duration_seconds";
/// The most methods one side counts on their own (each costs its label set and about 700 bytes);
/// requests for any further method count under [`OTHER_METHODS`]. A server counts the methods it
/// does not serve as `unknown`, so only a service that does not list its methods (a hand-written
/// one) can reach this.
pub const MAX_METHODS: usize = 1024;
/// The `method` label of the requests past [`MAX_METHODS`].
pub const OTHER_METHODS: &str = "other";
/// The `code` label of the codes this build does not know.
const UNRECOGNIZED: &str = "UNRECOGNIZED";

/// Handles for one method: a latency histogram and a counter per status code, registered once
/// when the method is first seen, and the same counts kept in process for an admin page.
#[derive(Debug)]
struct MethodHandles {
    duration: metrics::Histogram,
    by_code: Vec<Counter>,
    /// Requests per code, in the order of `by_code` (the last: codes this build does not know).
    counts: Vec<AtomicU64>,
    latency: AtomicLatencies,
}

impl MethodHandles {
    fn record(&self, code: usize, elapsed: std::time::Duration) {
        self.duration.record(elapsed.as_secs_f64());
        self.by_code[code].increment(1);
        self.counts[code].fetch_add(1, Ordering::Relaxed);
        self.latency.record(elapsed);
    }
}

/// One method's requests as counted so far (see [`RequestMetrics::methods`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodStats {
    /// The method (`unknown` on a server for every method it does not serve).
    pub method: String,
    /// Requests finished with each code that occurred, by the code's name (`SUCCESS`, ...;
    /// `UNRECOGNIZED` for codes this build does not know).
    pub by_code: Vec<(&'static str, u64)>,
    /// Their latencies: on a server from the request's arrival to its answer, on a client from
    /// the call to its outcome.
    pub latency: LatencySnapshot,
}

impl MethodStats {
    /// Requests finished.
    pub fn total(&self) -> u64 {
        self.by_code.iter().map(|(_, n)| n).sum()
    }

    /// Requests finished with `code`.
    pub fn count(&self, code: crate::Code) -> u64 {
        self.by_code
            .iter()
            .find(|(c, _)| *c == code.as_str())
            .map_or(0, |(_, n)| *n)
    }
}

/// Request counters and latency histograms per method for one side (one per server or client,
/// shared by its connections). Each method's handles are registered once; recording is a map
/// lookup under a read lock and a few relaxed atomic adds, never a registry lookup.
#[derive(Debug)]
pub struct RequestMetrics {
    side: Side,
    methods: std::sync::RwLock<std::collections::HashMap<String, std::sync::Arc<MethodHandles>>>,
}

impl RequestMetrics {
    /// Metrics for `side`.
    pub fn new(side: Side) -> Self {
        RequestMetrics {
            side,
            methods: Default::default(),
        }
    }

    /// Records one finished request. A server passes `method = "unknown"` for any method it does
    /// not serve, so that clients cannot grow the label set without bound.
    pub fn record(&self, method: &str, code: crate::Code, elapsed: std::time::Duration) {
        let i = crate::Code::ALL
            .iter()
            .position(|c| *c == code)
            .unwrap_or(crate::Code::ALL.len());
        {
            let map = self.methods.read().unwrap_or_else(|e| e.into_inner());
            // Past the cap, a method of its own is never registered: `other` is found under
            // the read lock, without taking the write lock per request.
            let known = map
                .get(method)
                .or_else(|| (map.len() >= MAX_METHODS).then(|| map.get(OTHER_METHODS)).flatten());
            if let Some(h) = known {
                return h.record(i, elapsed);
            }
        }
        self.register(method).record(i, elapsed);
    }

    /// Its handles for `method`, registered now if new; past [`MAX_METHODS`] methods, the
    /// handles of [`OTHER_METHODS`].
    fn register(&self, method: &str) -> std::sync::Arc<MethodHandles> {
        let mut map = self.methods.write().unwrap_or_else(|e| e.into_inner());
        let method = if map.len() >= MAX_METHODS && !map.contains_key(method) {
            OTHER_METHODS
        } else {
            method
        };
        map.entry(method.to_string())
            .or_insert_with(|| std::sync::Arc::new(self.handles(method)))
            .clone()
    }

    /// Every method's requests so far, sorted by method.
    pub fn methods(&self) -> Vec<MethodStats> {
        let map = self.methods.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<MethodStats> = map
            .iter()
            .map(|(method, h)| MethodStats {
                method: method.clone(),
                by_code: h
                    .counts
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        (
                            crate::Code::ALL.get(i).map_or(UNRECOGNIZED, |c| c.as_str()),
                            n.load(Ordering::Relaxed),
                        )
                    })
                    .filter(|(_, n)| *n > 0)
                    .collect(),
                latency: h.latency.snapshot(),
            })
            .collect();
        out.sort_by(|a, b| a.method.cmp(&b.method));
        out
    }

    fn handles(&self, method: &str) -> MethodHandles {
        let side = self.side.as_str();
        let m = method.to_string();
        let mut by_code: Vec<Counter> = crate::Code::ALL
            .iter()
            .map(|c| counter!(REQUESTS, "side" => side, "method" => m.clone(), "code" => c.to_string()))
            .collect();
        by_code.push(counter!(REQUESTS, "side" => side, "method" => m.clone(), "code" => UNRECOGNIZED));
        let duration = metrics::histogram!(REQUEST_DURATION, "side" => side, "method" => m);
        let counts = by_code.iter().map(|_| AtomicU64::new(0)).collect();
        MethodHandles {
            duration,
            by_code,
            counts,
            latency: AtomicLatencies::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Counts per method and code are exact, and a side that sees more than `MAX_METHODS`
    /// methods counts the rest under `other`: memory stays bounded and no request goes uncounted.
    #[test]
    fn methods_are_counted_exactly_and_bounded() {
        let m = RequestMetrics::new(Side::Server);
        for i in 0..MAX_METHODS + 76 {
            m.record(&format!("/s.S/M{i}"), crate::Code::Ok, Duration::from_micros(100));
        }
        m.record("/s.S/M0", crate::Code::Internal, Duration::from_micros(300));
        m.record("/s.S/late", crate::Code::Ok, Duration::from_micros(5));
        let stats = m.methods();
        assert_eq!(stats.len(), MAX_METHODS + 1);
        let total: u64 = stats.iter().map(MethodStats::total).sum();
        assert_eq!(total, MAX_METHODS as u64 + 76 + 2);
        let other = stats.iter().find(|s| s.method == OTHER_METHODS).unwrap();
        assert_eq!(other.total(), 77);
        let m0 = stats.iter().find(|s| s.method == "/s.S/M0").unwrap();
        assert_eq!((m0.count(crate::Code::Ok), m0.count(crate::Code::Internal)), (1, 1));
        assert_eq!(m0.latency.count(), 2);
        assert_eq!(m0.latency.mean(), Some(Duration::from_micros(200)));
    }
}
