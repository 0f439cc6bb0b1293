//! Connection events users can subscribe to.

use std::net::SocketAddr;

use crate::error::{CloseReason, GoAwayReason};

/// Something that happened to a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionEvent {
    /// The handshake completed.
    Connected {
        /// Connection id.
        id: u64,
        /// The peer's address, when known.
        peer: Option<SocketAddr>,
    },
    /// A heartbeat went unanswered (`failures` in a row, below the maximum).
    HeartbeatFailed {
        /// Connection id.
        id: u64,
        /// Consecutive failures.
        failures: u32,
    },
    /// The peer sent GOAWAY.
    GoAwayReceived {
        /// Connection id.
        id: u64,
        /// Why.
        reason: GoAwayReason,
        /// Last request id the peer processes.
        last_request_id: u64,
    },
    /// Client: an endpoint's connect attempt failed; the next is due after `delay`.
    Reconnecting {
        /// The endpoint.
        addr: SocketAddr,
        /// The attempt that just failed (1 for the first).
        attempt: u32,
        /// Delay before the next attempt.
        delay: std::time::Duration,
    },
    /// Client: an endpoint that had lost its connections (or never had one) is alive again.
    Reconnected {
        /// The endpoint.
        addr: SocketAddr,
    },
    /// Client: an endpoint was given up after `max_reconnect_attempts`.
    Discarded {
        /// The endpoint.
        addr: SocketAddr,
        /// Attempts made.
        attempts: u32,
    },
    /// Client: an endpoint was ejected for gray failure (outlier detection): it takes no new
    /// requests for `duration`, then goes on probation.
    EndpointEjected {
        /// The endpoint.
        addr: SocketAddr,
        /// Why (`consecutive_failures`, `failure_percentage`, `success_rate`, `probe_failed`).
        reason: &'static str,
        /// How long it is ejected.
        duration: std::time::Duration,
        /// Its ejections not yet forgiven, this one included.
        times: u32,
    },
    /// Client: an ejection ended; the endpoint takes one request at a time until enough succeed.
    EndpointProbation {
        /// The endpoint.
        addr: SocketAddr,
    },
    /// Client: an endpoint on probation answered well enough to be trusted again.
    EndpointTrusted {
        /// The endpoint.
        addr: SocketAddr,
    },
    /// Client: a resumable stream broke and was opened again; the consumer's stream went on.
    StreamResumed {
        /// The method.
        method: String,
        /// The position it resumed after (`None`: before any message or checkpoint arrived).
        after: Option<u64>,
        /// Attempts it took (1: the first reopen worked).
        attempts: u32,
        /// From the moment the break was seen to the resumed stream's first item (the silence
        /// before it, while the break went unnoticed, is the liveness bound's: heartbeats).
        gap: std::time::Duration,
        /// Messages the resumed stream delivered before its first checkpoint (where a
        /// `ReplayLog` says its replay caught up): what the subscriber would have lost.
        replayed: u64,
    },
    /// Client: a resumable stream could not be opened again within `resume_timeout` or
    /// `max_resume_attempts`; its consumer gets the last error.
    ResumeFailed {
        /// The method.
        method: String,
        /// The position it tried to resume after.
        after: Option<u64>,
        /// Attempts made.
        attempts: u32,
        /// From the break to giving up.
        waited: std::time::Duration,
    },
    /// The connection closed.
    Closed {
        /// Connection id.
        id: u64,
        /// The peer's address, when known.
        peer: Option<SocketAddr>,
        /// Why.
        reason: CloseReason,
    },
}

/// Where connections publish their events: a bounded broadcast channel, so a slow subscriber
/// lags (and is told how many events it missed) instead of holding memory or blocking the I/O
/// task. The channel is made on the first [`EventSender::subscribe`]: until someone listens,
/// publishing costs nothing and a client or server holds no event buffer (1,024 slots take about
/// 96 KiB). Clones share the channel.
#[derive(Clone)]
pub struct EventSender {
    inner: std::sync::Arc<Shared>,
}

struct Shared {
    channel: std::sync::OnceLock<tokio::sync::broadcast::Sender<ConnectionEvent>>,
    capacity: usize,
    /// Told the id of every connection that closes, subscribers or not (a holder's checker).
    on_closed: Option<Box<dyn Fn(u64, bool) + Send + Sync>>,
}

impl std::fmt::Debug for EventSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSender")
            .field("capacity", &self.inner.capacity)
            .field("subscribed", &self.inner.channel.get().is_some())
            .finish()
    }
}

impl EventSender {
    /// A sender whose channel, once made, holds `capacity` events per subscriber.
    pub fn new(capacity: usize) -> Self {
        Self::build(capacity, None)
    }

    /// Also calls `on_closed` with the id of every connection that closes (`true`) or receives
    /// a GOAWAY and so drains (`false`): each leaves a pool at once.
    pub fn with_close_hook(capacity: usize, on_closed: impl Fn(u64, bool) + Send + Sync + 'static) -> Self {
        Self::build(capacity, Some(Box::new(on_closed)))
    }

    fn build(capacity: usize, on_closed: Option<Box<dyn Fn(u64, bool) + Send + Sync>>) -> Self {
        EventSender {
            inner: std::sync::Arc::new(Shared {
                channel: std::sync::OnceLock::new(),
                capacity: capacity.max(1),
                on_closed,
            }),
        }
    }

    /// A receiver of the events published from now on (the first one makes the channel).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<ConnectionEvent> {
        self.inner
            .channel
            .get_or_init(|| tokio::sync::broadcast::channel(self.inner.capacity).0)
            .subscribe()
    }

    /// Publishes `event` to the subscribers, if there are any.
    pub fn send(&self, event: ConnectionEvent) {
        match (&self.inner.on_closed, &event) {
            (Some(hook), ConnectionEvent::Closed { id, .. }) => hook(*id, true),
            (Some(hook), ConnectionEvent::GoAwayReceived { id, .. }) => hook(*id, false),
            _ => {}
        }
        if let Some(tx) = self.inner.channel.get() {
            let _ = tx.send(event);
        }
    }
}
