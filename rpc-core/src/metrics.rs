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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    pub(crate) counters: std::sync::Arc<ConnectionCounters>,
}

/// The counters every connection on one side moves on its hot paths, made once per (recorder,
/// side) in the process and shared by its connections (a handle per connection was 7 counters
/// and 8 allocations each).
#[derive(Debug)]
pub(crate) struct ConnectionCounters {
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
        static SHARED: PerRecorder<Side, ConnectionCounters> = PerRecorder::new();
        let counters = SHARED.get(side, || ConnectionCounters {
            heartbeats_sent: counter!(HEARTBEATS_SENT, "side" => s),
            heartbeats_acked: counter!(HEARTBEATS_ACKED, "side" => s),
            heartbeats_failed: counter!(HEARTBEATS_FAILED, "side" => s),
            stream_messages_in: counter!(STREAM_MESSAGES, "side" => s, "direction" => "in"),
            stream_messages_out: counter!(STREAM_MESSAGES, "side" => s, "direction" => "out"),
            stream_bytes_in: counter!(STREAM_BYTES, "side" => s, "direction" => "in"),
            stream_bytes_out: counter!(STREAM_BYTES, "side" => s, "direction" => "out"),
        });
        ConnectionMetrics { side, counters }
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

/// Status codes a method's requests are counted by: every code this build knows, and one slot
/// for the codes it does not.
const CODES: usize = crate::Code::ALL.len() + 1;

/// The `code` label of count slot `i` (in the order of `Code::ALL`, the last for the codes this
/// build does not know).
fn code_name(i: usize) -> &'static str {
    crate::Code::ALL.get(i).map_or(UNRECOGNIZED, |c| c.as_str())
}

/// The `metrics` handles of one method on one side: a latency histogram and a counter per code.
/// Made once per (recorder, side, method) in the process and shared by every [`RequestMetrics`]
/// (a process holding a `Client` per target makes them once, not once per `Client`: 21 counters
/// and about 60 label strings each time). See [`PerRecorder`].
#[derive(Debug)]
struct Registered {
    duration: metrics::Histogram,
    by_code: Box<[Counter]>,
}

/// Handles made once per recorder and key in the process, and shared (see [`Registered`] and
/// [`ConnectionCounters`]). A handle made with no recorder in effect records nothing, so handles
/// are kept per recorder: the no-op one before a global recorder is installed, the global one
/// after (installed once, and never freed, so its address names it for good). A local recorder
/// (`metrics::with_local_recorder`, a testing tool) gets handles of its own every time and none
/// are kept: its address is reused once it is dropped, and a later one there would otherwise
/// count into the dead one's storage. At most [`MAX_SHARED`] are kept; past it each caller gets
/// handles of its own, so memory stays bounded whatever the keys.
struct PerRecorder<K, V> {
    kept: std::sync::Mutex<Option<HandleSets<K, V>>>,
}

/// Handle sets by (recorder, key).
type HandleSets<K, V> = std::collections::HashMap<(usize, K), std::sync::Arc<V>>;

/// The most handle sets [`PerRecorder`] keeps.
const MAX_SHARED: usize = 4 * MAX_METHODS;

impl<K: std::hash::Hash + Eq, V> PerRecorder<K, V> {
    const fn new() -> Self {
        PerRecorder {
            kept: std::sync::Mutex::new(None),
        }
    }

    /// The handles for `key` with the recorder in effect, made by `make` if there are none yet.
    fn get(&self, key: K, make: impl FnOnce() -> V) -> std::sync::Arc<V> {
        let recorder = recorder_in_effect();
        if !is_process_wide(recorder) {
            return std::sync::Arc::new(make());
        }
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        let kept = kept.get_or_insert_with(Default::default);
        let key = (recorder, key);
        if let Some(v) = kept.get(&key) {
            return v.clone();
        }
        let made = std::sync::Arc::new(make());
        if kept.len() < MAX_SHARED {
            kept.insert(key, made.clone());
        }
        made
    }
}

/// The address of the recorder in effect on this thread.
fn recorder_in_effect() -> usize {
    metrics::with_recorder(|r| r as *const dyn metrics::Recorder as *const () as usize)
}

/// Is `recorder` the one a thread with no local recorder sees (the global one, or the no-op one
/// before it is installed)? Remembered; asked again of a fresh thread, which has no local
/// recorder, only when the answer could have changed: a local recorder is in effect, or the
/// global one was installed since.
fn is_process_wide(recorder: usize) -> bool {
    static PROCESS_WIDE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    if PROCESS_WIDE.load(Ordering::Acquire) == recorder {
        return true;
    }
    let Ok(seen) = std::thread::spawn(recorder_in_effect).join() else {
        return false;
    };
    PROCESS_WIDE.store(seen, Ordering::Release);
    seen == recorder
}

impl Registered {
    /// The handles of `method` on `side` with the recorder in effect.
    fn get(side: Side, method: &str) -> std::sync::Arc<Registered> {
        static SHARED: PerRecorder<(Side, Box<str>), Registered> = PerRecorder::new();
        SHARED.get((side, method.into()), || Registered::make(side, method))
    }

    fn make(side: Side, method: &str) -> Registered {
        let side = side.as_str();
        let m = method.to_string();
        let by_code = (0..CODES)
            .map(|i| counter!(REQUESTS, "side" => side, "method" => m.clone(), "code" => code_name(i)))
            .collect();
        let duration = metrics::histogram!(REQUEST_DURATION, "side" => side, "method" => m);
        Registered { duration, by_code }
    }
}

/// One method's requests on one [`RequestMetrics`]: the shared `metrics` handles, and the same
/// counts and latencies kept in process for an admin page.
#[derive(Debug)]
struct MethodHandles {
    registered: std::sync::Arc<Registered>,
    /// Requests per code, in the order of `Code::ALL` (the last: codes this build does not know).
    counts: [AtomicU64; CODES],
    latency: AtomicLatencies,
}

impl MethodHandles {
    fn record(&self, code: usize, elapsed: std::time::Duration) {
        self.registered.duration.record(elapsed.as_secs_f64());
        self.registered.by_code[code].increment(1);
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
                    .map(|(i, n)| (code_name(i), n.load(Ordering::Relaxed)))
                    .filter(|(_, n)| *n > 0)
                    .collect(),
                latency: h.latency.snapshot(),
            })
            .collect();
        out.sort_by(|a, b| a.method.cmp(&b.method));
        out
    }

    fn handles(&self, method: &str) -> MethodHandles {
        MethodHandles {
            registered: Registered::get(self.side, method),
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
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

    /// Requests counted in a debugging recorder, over every side and method: with `code`, only
    /// those with that code.
    fn requests(snapshotter: &metrics_util::debugging::Snapshotter, code: Option<&str>) -> u64 {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(k, ..)| k.key().name() == REQUESTS)
            .filter(|(k, ..)| code.is_none_or(|c| k.key().labels().any(|l| l.key() == "code" && l.value() == c)))
            .map(|(.., v)| match v {
                metrics_util::debugging::DebugValue::Counter(n) => n,
                _ => 0,
            })
            .sum()
    }

    /// Two `RequestMetrics` of one side (two `Client`s) share a method's `metrics` handles, and
    /// a recorder in effect later gets handles of its own that count: sharing never leaves a
    /// recorder with the no-op handles made before it.
    #[test]
    fn handles_are_shared_per_recorder_and_count_in_each() {
        let (a, b) = (RequestMetrics::new(Side::Client), RequestMetrics::new(Side::Client));
        let method = "/shared.S/M";
        assert!(std::sync::Arc::ptr_eq(
            &a.register(method).registered,
            &b.register(method).registered
        ));
        assert!(!std::sync::Arc::ptr_eq(
            &a.register(method).registered,
            &RequestMetrics::new(Side::Server).register(method).registered
        ));
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            let c = RequestMetrics::new(Side::Client);
            c.record(method, crate::Code::Ok, Duration::from_micros(10));
            c.record(method, crate::Code::Ok, Duration::from_micros(10));
            RequestMetrics::new(Side::Client).record(method, crate::Code::Ok, Duration::from_micros(10));
        });
        assert_eq!(requests(&snapshotter, Some("SUCCESS")), 3);
        // The counts a RequestMetrics keeps are its own.
        assert_eq!(a.methods()[0].total(), 0);
    }

    /// A local recorder made where an earlier, dropped one was (the same address, as a helper
    /// called twice makes it) counts its own requests: handles are never shared with a local
    /// recorder, whose address can be reused once it is gone.
    #[test]
    fn each_local_recorder_counts_its_own_requests_even_at_a_reused_address() {
        fn one_pass() -> (usize, u64) {
            let recorder = metrics_util::debugging::DebuggingRecorder::new();
            let snapshotter = recorder.snapshotter();
            let at = &recorder as *const _ as usize;
            metrics::with_local_recorder(&recorder, || {
                RequestMetrics::new(Side::Client).record("/reused.S/M", crate::Code::Ok, Duration::from_micros(1));
            });
            (at, requests(&snapshotter, None))
        }
        let (first_at, first) = one_pass();
        let (second_at, second) = one_pass();
        assert_eq!((first, second), (1, 1), "recorders at {first_at:#x} and {second_at:#x}");
    }
}
