//! Transport errors: why a connection closed and what was wrong with a frame. What the peer said
//! about a request is a [`crate::Status`] instead.

use std::fmt;
use std::io;

use crate::frame::FrameKind;

/// Why a peer sent GOAWAY.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GoAwayReason {
    /// The connection sent nothing for the server's idle timeout.
    Idle,
    /// The peer is shutting down gracefully.
    Shutdown,
    /// The receiver broke the protocol.
    ProtocolError,
    /// The receiver did not read what was sent to it.
    SlowConsumer,
    /// The peer's liveness checks failed (heartbeat timeout).
    HeartbeatTimeout,
    /// The server is at `max_connections` and refused this connection.
    Overloaded,
    /// A reason this build does not know.
    Unknown(u8),
}

impl GoAwayReason {
    /// Wire value.
    pub fn as_u8(self) -> u8 {
        match self {
            GoAwayReason::Idle => 1,
            GoAwayReason::Shutdown => 2,
            GoAwayReason::ProtocolError => 3,
            GoAwayReason::SlowConsumer => 4,
            GoAwayReason::HeartbeatTimeout => 5,
            GoAwayReason::Overloaded => 6,
            GoAwayReason::Unknown(v) => v,
        }
    }

    /// From the wire value.
    pub fn from_u8(v: u8) -> Self {
        match v {
            1 => GoAwayReason::Idle,
            2 => GoAwayReason::Shutdown,
            3 => GoAwayReason::ProtocolError,
            4 => GoAwayReason::SlowConsumer,
            5 => GoAwayReason::HeartbeatTimeout,
            6 => GoAwayReason::Overloaded,
            v => GoAwayReason::Unknown(v),
        }
    }

    /// A short lowercase name, used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            GoAwayReason::Idle => "idle",
            GoAwayReason::Shutdown => "shutdown",
            GoAwayReason::ProtocolError => "protocol_error",
            GoAwayReason::SlowConsumer => "slow_consumer",
            GoAwayReason::HeartbeatTimeout => "heartbeat_timeout",
            GoAwayReason::Overloaded => "overloaded",
            GoAwayReason::Unknown(_) => "unknown",
        }
    }
}

impl fmt::Display for GoAwayReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A violation of the wire protocol, found while decoding or in the handshake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The first header byte was not the tether magic byte.
    #[error("bad magic byte {0:#04x} (expected {expected:#04x})", expected = crate::frame::MAGIC)]
    BadMagic(u8),
    /// A frame header version this build does not read (every frame of protocol versions 1 and 2
    /// carries header version 1).
    #[error("unsupported header version {0} (this build reads {supported})", supported = crate::frame::VERSION)]
    UnsupportedVersion(u8),
    /// A flag the sender marked must-understand (the high four bits) that this build does not
    /// know on a frame of this kind.
    #[error("unknown critical flags {flags:#04x} on a {kind:?} frame")]
    UnknownCriticalFlags {
        /// The frame's kind.
        kind: FrameKind,
        /// The unknown critical bits.
        flags: u8,
    },
    /// A frame body larger than the receiver's `max_frame_size`; rejected before any allocation.
    #[error("frame body of {len} bytes exceeds max_frame_size {max}")]
    FrameTooLarge {
        /// The length the header announced.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// A frame body that does not parse.
    #[error("malformed {kind:?} frame: {what}")]
    Malformed {
        /// The frame's kind.
        kind: FrameKind,
        /// What was wrong.
        what: &'static str,
    },
    /// More metadata entries than the receiver accepts.
    #[error("{count} metadata entries exceed the limit of {max}")]
    TooManyMetadataEntries {
        /// Entries sent.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// Metadata keys and values larger in total than the receiver accepts.
    #[error("metadata exceeds {max} bytes")]
    MetadataTooLarge {
        /// The limit.
        max: usize,
    },
    /// A frame that is valid on its own but not allowed here (for example a request before the handshake).
    #[error("unexpected {0:?} frame")]
    UnexpectedFrame(FrameKind),
    /// The peer never completed the handshake.
    #[error("handshake not completed: {0}")]
    Handshake(&'static str),
    /// The peer broke stream flow control (sent DATA without credit, or granted past 2^31 - 1).
    #[error("flow control violated: {0}")]
    FlowControl(&'static str),
}

/// Why a connection closed. Every close carries one, and everyone waiting on the connection gets it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CloseReason {
    /// This side dropped or closed the connection.
    #[error("closed locally")]
    Local,
    /// This side shut down gracefully (sent GOAWAY and drained).
    #[error("closed by local shutdown")]
    Shutdown,
    /// The peer sent GOAWAY, then the connection ended.
    #[error("peer sent GOAWAY ({reason}) and closed")]
    GoAway {
        /// The peer's reason.
        reason: GoAwayReason,
        /// The last request id the peer said it would process.
        last_request_id: u64,
    },
    /// The peer closed the connection (EOF) without GOAWAY.
    #[error("peer closed the connection")]
    PeerClosed,
    /// The peer reset the connection (RST).
    #[error("connection reset by peer")]
    Reset,
    /// Another I/O error, including TCP keepalive and TCP_USER_TIMEOUT expiry (`TimedOut`).
    #[error("i/o error ({kind:?}): {message}")]
    Io {
        /// The error kind.
        kind: io::ErrorKind,
        /// The error text.
        message: String,
    },
    /// Client: `max_failures` consecutive heartbeats went unanswered.
    #[error("heartbeat timeout")]
    HeartbeatTimeout,
    /// Server: nothing was received for `idle_timeout`.
    #[error("idle timeout")]
    IdleTimeout,
    /// The peer did not read what this side wrote fast enough (see `write_stall_timeout`).
    #[error("slow consumer: the peer did not read what was written in time")]
    SlowConsumer,
    /// A frame started arriving but was not complete within the partial-frame timeout.
    #[error("partial frame not completed in time")]
    PartialFrameTimeout,
    /// The peer (or this side) broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    /// The connection's task ended without closing it (a panic, the runtime shutting down, an
    /// abort). Published by the driver's drop, so nobody waits on a connection that is gone.
    #[error("connection task ended without closing (panic, runtime shutdown or abort)")]
    Aborted,
    /// The peer did not complete the handshake within `handshake_timeout`.
    #[error("handshake not completed in time")]
    HandshakeTimeout,
}

impl CloseReason {
    /// A short lowercase name, used as the `reason` metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            CloseReason::Local => "local",
            CloseReason::Shutdown => "shutdown",
            CloseReason::GoAway { .. } => "goaway",
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::Reset => "reset",
            CloseReason::Io {
                kind: io::ErrorKind::TimedOut,
                ..
            } => "timed_out",
            CloseReason::Io { .. } => "io",
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::PartialFrameTimeout => "partial_frame_timeout",
            CloseReason::Protocol(_) => "protocol_error",
            CloseReason::Aborted => "aborted",
            CloseReason::HandshakeTimeout => "handshake_timeout",
        }
    }

    /// The reason for an I/O error on the socket.
    pub fn from_io(err: &io::Error) -> Self {
        match err.kind() {
            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe => {
                CloseReason::Reset
            }
            io::ErrorKind::UnexpectedEof => CloseReason::PeerClosed,
            kind => CloseReason::Io {
                kind,
                message: err.to_string(),
            },
        }
    }

    /// The GOAWAY reason this side sends when it closes for this reason, if it sends one.
    pub fn goaway_reason(&self) -> Option<GoAwayReason> {
        match self {
            CloseReason::Shutdown | CloseReason::Local => Some(GoAwayReason::Shutdown),
            CloseReason::IdleTimeout => Some(GoAwayReason::Idle),
            CloseReason::SlowConsumer => Some(GoAwayReason::SlowConsumer),
            CloseReason::HeartbeatTimeout => Some(GoAwayReason::HeartbeatTimeout),
            CloseReason::Protocol(_) | CloseReason::PartialFrameTimeout | CloseReason::HandshakeTimeout => {
                Some(GoAwayReason::ProtocolError)
            }
            _ => None,
        }
    }
}

/// An error from the frame codec: a protocol violation or an I/O error underneath.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The bytes broke the protocol.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The stream failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// One request or response was refused on its own (too much metadata): its bytes were
    /// consumed, the stream is still in sync, and only that call fails.
    #[error("{kind:?} frame {id} refused: {error}")]
    Rejected {
        /// REQUEST, ONEWAY or RESPONSE.
        kind: FrameKind,
        /// Its request id.
        id: u64,
        /// What was wrong with it.
        error: ProtocolError,
    },
}
