//! Frames: the unit of the tether wire protocol. `PROTOCOL.md` documents every byte.

use std::time::Duration;

use bytes::Bytes;

use crate::error::GoAwayReason;
use crate::message::{Metadata, Method};
use crate::status::Code;

/// The first byte of every frame: ASCII `T`.
pub const MAGIC: u8 = 0x54;
/// The header version byte written in every frame: the layout of the 16-byte header. Versions 1
/// and 2 of the protocol share this layout, so every frame carries 1; a later version that changes
/// the header may use another byte only after both sides announced it (see [`PROTOCOL_VERSION`]).
pub const VERSION: u8 = 1;
/// The protocol version this build speaks, announced in SETTINGS (`VERSION`, id 9). A peer that
/// announces none speaks version 1. Version 2 adds the extension rules of `PROTOCOL.md`
/// ("Extending the protocol"): unknown frame kinds are skipped, unknown critical flags close the
/// connection, and bodies of fixed layout may grow at the end.
pub const PROTOCOL_VERSION: u8 = 2;
/// Length of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 16;

/// The kind byte of a frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// A request that expects a response.
    Request = 1,
    /// A response to a request.
    Response = 2,
    /// A request that expects no response.
    Oneway = 3,
    /// A liveness probe; the peer answers with `HeartbeatAck` on its I/O path.
    Heartbeat = 4,
    /// The answer to a heartbeat, carrying the heartbeat's id.
    HeartbeatAck = 5,
    /// The sender will process no request above `last_request_id` and is closing.
    GoAway = 6,
    /// Handshake: each side sends its settings first.
    Settings = 7,
    /// The client gave up on a request: the server drops its handler and answers nothing.
    Cancel = 8,
    /// One message of a stream, either way (feature [`features::STREAMS`]).
    Data = 9,
    /// Flow-control credit for a stream, or (id 0) for the connection.
    Window = 10,
}

impl FrameKind {
    /// The kind for a header byte, if known.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Request,
            2 => Self::Response,
            3 => Self::Oneway,
            4 => Self::Heartbeat,
            5 => Self::HeartbeatAck,
            6 => Self::GoAway,
            7 => Self::Settings,
            8 => Self::Cancel,
            9 => Self::Data,
            10 => Self::Window,
            _ => return None,
        })
    }
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A request or a oneway request.
    Request(RequestFrame),
    /// A response.
    Response(ResponseFrame),
    /// A heartbeat with its sequence number.
    Heartbeat {
        /// Sequence number, echoed in the ack.
        id: u64,
    },
    /// A heartbeat ack.
    HeartbeatAck {
        /// The acknowledged heartbeat's sequence number.
        id: u64,
    },
    /// The peer is going away.
    GoAway(GoAway),
    /// The peer's settings (handshake).
    Settings(Settings),
    /// The client gave up on request `id` (sent only to a peer that announced
    /// [`features::CANCEL`]).
    Cancel {
        /// The request's id.
        id: u64,
    },
    /// One message of stream `id` (or, `packed`, several); `end` closes the sender's half (the
    /// last message, or none).
    Data {
        /// The stream (its opening request's id).
        id: u64,
        /// The sender sends nothing more on this stream (flag [`flags::END`]).
        end: bool,
        /// The body is several messages, each a 4-byte big-endian length and that many bytes
        /// (flag [`flags::PACKED`]; see [`packed_messages`]).
        packed: bool,
        /// The encoded message (or, `packed`, the messages); empty with `end` alone.
        payload: Bytes,
    },
    /// The receiver of stream `id` (or, with id 0, of the whole connection) may be sent
    /// `increment` more bytes of DATA.
    Window {
        /// The stream, or 0 for the connection.
        id: u64,
        /// Bytes of credit added.
        increment: u32,
    },
    /// A frame of a kind this build does not know: skipped by the driver (its body is length
    /// delimited), counted in `tether_frames_ignored_total`. Encodable, so tests and newer
    /// extensions can send one.
    Unknown(UnknownFrame),
}

/// A frame whose kind byte this build does not know, kept as it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownFrame {
    /// The kind byte.
    pub kind: u8,
    /// The flags byte.
    pub flags: u8,
    /// The header's id field.
    pub id: u64,
    /// The body, unread.
    pub body: Bytes,
}

impl Frame {
    /// The frame's kind, if this build knows it.
    pub fn kind(&self) -> Option<FrameKind> {
        Some(match self {
            Frame::Request(r) if r.oneway => FrameKind::Oneway,
            Frame::Request(_) => FrameKind::Request,
            Frame::Response(_) => FrameKind::Response,
            Frame::Heartbeat { .. } => FrameKind::Heartbeat,
            Frame::HeartbeatAck { .. } => FrameKind::HeartbeatAck,
            Frame::GoAway(_) => FrameKind::GoAway,
            Frame::Settings(_) => FrameKind::Settings,
            Frame::Cancel { .. } => FrameKind::Cancel,
            Frame::Data { .. } => FrameKind::Data,
            Frame::Window { .. } => FrameKind::Window,
            Frame::Unknown(_) => return None,
        })
    }

    /// The kind byte this frame is encoded with.
    pub fn kind_byte(&self) -> u8 {
        match self {
            Frame::Unknown(u) => u.kind,
            known => known.kind().map_or(0, |k| k as u8),
        }
    }
}

/// A request on the wire.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RequestFrame {
    /// Request id, unique and increasing on one connection; assigned by the connection driver.
    pub id: u64,
    /// True for a oneway request: no response will be sent.
    pub oneway: bool,
    /// True when the request opens a stream (flag [`flags::STREAM`]): its messages follow as
    /// DATA frames either way, and its RESPONSE ends it.
    pub stream: bool,
    /// Time left until the caller's deadline when the request was written. `None`: no deadline.
    pub timeout: Option<Duration>,
    /// `/package.Service/Method`.
    pub method: Method,
    /// Request metadata.
    pub metadata: Metadata,
    /// The encoded protobuf message.
    pub payload: Bytes,
}

/// A response on the wire.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseFrame {
    /// The id of the request this answers.
    pub id: u64,
    /// Status code.
    pub code: Code,
    /// Error message; empty on success.
    pub message: String,
    /// Response metadata.
    pub metadata: Metadata,
    /// The encoded protobuf message; empty unless `code` is `Ok`.
    pub payload: Bytes,
    /// Set only by the server's runtime, when the handler never started (over a limit, no such
    /// method, deadline passed before start, body did not decode, shutting down): the proof that
    /// lets a client report "not executed" and retry. On the wire, flag [`flags::NOT_EXECUTED`].
    pub not_executed: bool,
}

/// Header flag bits. Each kind has its own: the low four bits ([`IGNORABLE`](flags::IGNORABLE)) are
/// flags a receiver that does not know them ignores; the high four ([`CRITICAL`](flags::CRITICAL))
/// are flags it must understand, and one it does not know closes the connection
/// (`ProtocolError::UnknownCriticalFlags`). A sender sets no flag it has not been told the peer
/// reads (a feature both announced), and leaves every unassigned bit zero.
pub mod flags {
    /// RESPONSE: the handler did not run (the runtime answered without starting it). Ignorable: a
    /// peer that does not know it loses only the proof.
    pub const NOT_EXECUTED: u8 = 0x01;
    /// REQUEST: it opens a stream (must be understood: the request's messages come as DATA).
    pub const STREAM: u8 = 0x10;
    /// DATA: the sender's last frame on this stream.
    pub const END: u8 = 0x10;
    /// DATA: the body packs several messages, each prefixed by its 4-byte big-endian length
    /// (must be understood; sent only to a peer announcing feature PACKED_DATA).
    pub const PACKED: u8 = 0x20;
    /// The flag bits a receiver may ignore when it does not know them.
    pub const IGNORABLE: u8 = 0x0F;
    /// The flag bits a receiver must understand.
    pub const CRITICAL: u8 = 0xF0;

    /// The critical flags this build understands on a frame of `kind`.
    pub fn known_critical(kind: super::FrameKind) -> u8 {
        match kind {
            super::FrameKind::Request => STREAM,
            super::FrameKind::Data => END | PACKED,
            _ => 0,
        }
    }
}

/// GOAWAY: why the sender is closing and the last request id it will process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoAway {
    /// Why.
    pub reason: GoAwayReason,
    /// Every request with an id above this one was not and will not be processed.
    pub last_request_id: u64,
    /// Human-readable detail.
    pub message: String,
}

/// Handshake settings. Each side sends its own as its first frame; unknown ids are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settings {
    /// The largest frame body the sender accepts.
    pub max_frame_size: Option<u32>,
    /// Server: it closes a connection that sends nothing for this long.
    pub idle_timeout: Option<Duration>,
    /// Server: requests it runs at once across all connections before answering SERVER_BUSY.
    pub max_concurrent_requests: Option<u32>,
    /// Client: how often it sends heartbeats when idle.
    pub heartbeat_interval: Option<Duration>,
    /// The most metadata entries the sender accepts in one frame.
    pub max_metadata_entries: Option<u32>,
    /// The most bytes of metadata keys and values the sender accepts in one frame.
    pub max_metadata_bytes: Option<u32>,
    /// Server: requests it runs at once on one connection before answering SERVER_BUSY.
    pub max_requests_per_connection: Option<u32>,
    /// Optional protocol features the sender supports (bits of [`features`]); a feature is used
    /// only when both sides announce it. `None` (a peer that predates features) means none.
    pub features: Option<u64>,
    /// The highest protocol version the sender speaks ([`PROTOCOL_VERSION`] here); both sides use
    /// the lower of the two. `None`: a version-1 peer.
    pub version: Option<u8>,
    /// The credit, in bytes, the sender grants each new stream for DATA sent to it.
    pub stream_window: Option<u32>,
    /// The credit, in bytes, the sender grants the whole connection for DATA sent to it.
    pub connection_window: Option<u32>,
}

impl Settings {
    /// The protocol version both sides speak, given the peer's settings.
    pub fn negotiated_version(&self) -> u8 {
        self.version.unwrap_or(1).clamp(1, PROTOCOL_VERSION)
    }
}

/// Feature bits announced in SETTINGS.
pub mod features {
    /// The sender reads a status code as carrying no proof of execution, and the NOT_EXECUTED
    /// response flag as the proof. A server talking to a peer without it never sends that peer a
    /// handler's SERVER_BUSY, NOT_FOUND or UNAVAILABLE (which such a peer reads as "not run").
    pub const NOT_EXECUTED_FLAG: u64 = 1 << 0;
    /// The sender understands CANCEL frames (kind 8): a client sends one when a caller gives up, a
    /// server drops the request's handler.
    pub const CANCEL: u64 = 1 << 1;
    /// The sender understands streams: REQUEST with flag STREAM, DATA and WINDOW frames.
    pub const STREAMS: u64 = 1 << 2;
    /// The sender understands DATA frames with flag PACKED (several messages in one body).
    pub const PACKED_DATA: u64 = 1 << 3;
    /// The sender reads message bodies compressed with gzip (metadata `tether-encoding: gzip`);
    /// announced by builds with feature `compression`.
    pub const GZIP: u64 = 1 << 4;
    /// The sender reads message bodies compressed with zstd (`tether-encoding: zstd`).
    pub const ZSTD: u64 = 1 << 5;
    /// Every feature this build supports (the compression codecs only with feature
    /// `compression`).
    pub const ALL: u64 = NOT_EXECUTED_FLAG
        | CANCEL
        | STREAMS
        | PACKED_DATA
        | if cfg!(feature = "compression") { GZIP | ZSTD } else { 0 };
}

/// Setting identifiers on the wire.
pub(crate) mod setting_id {
    pub(crate) const MAX_FRAME_SIZE: u16 = 1;
    pub(crate) const IDLE_TIMEOUT_MS: u16 = 2;
    pub(crate) const MAX_CONCURRENT_REQUESTS: u16 = 3;
    pub(crate) const HEARTBEAT_INTERVAL_MS: u16 = 4;
    pub(crate) const MAX_METADATA_ENTRIES: u16 = 5;
    pub(crate) const MAX_METADATA_BYTES: u16 = 6;
    pub(crate) const MAX_REQUESTS_PER_CONNECTION: u16 = 7;
    pub(crate) const FEATURES: u16 = 8;
    pub(crate) const VERSION: u16 = 9;
    pub(crate) const STREAM_WINDOW: u16 = 10;
    pub(crate) const CONNECTION_WINDOW: u16 = 11;
}

/// How many messages a packed DATA body holds: each is a 4-byte big-endian length and that many
/// bytes, and the body is exactly a whole number of them, at least one (`None` otherwise: the
/// frame is malformed).
pub fn packed_messages(body: &[u8]) -> Option<usize> {
    let mut rest = body;
    let mut n = 0;
    while !rest.is_empty() {
        let (len, tail) = rest.split_first_chunk::<4>()?;
        let len = u32::from_be_bytes(*len) as usize;
        if tail.len() < len {
            return None;
        }
        rest = &tail[len..];
        n += 1;
    }
    (n > 0).then_some(n)
}
