//! Metric names and per-connection handles. Handles are created once per connection (or per
//! service), never looked up per request.

use metrics::{counter, Counter, Label};

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

    pub(crate) fn goaway_received(&self, reason: crate::GoAwayReason) {
        counter!(GOAWAY_RECEIVED, "side" => self.side.as_str(), "reason" => reason.as_str())
            .increment(1);
    }
}
