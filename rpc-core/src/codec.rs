//! The frame codec: a tokio-util `Encoder`/`Decoder` for [`Frame`]s.
//!
//! The decoder reads the 16-byte header, rejects a bad magic byte, an unknown header version, an
//! unknown critical flag and a body longer than `max_frame_size` before reserving any memory for
//! it; "need more bytes" is `Ok(None)`, never an error. A frame of an unknown kind is returned as
//! [`Frame::Unknown`] for the driver to skip, and a body of fixed layout may carry bytes after the
//! fields this build knows (a newer peer's additions), which are ignored: the rules of
//! `PROTOCOL.md`, "Extending the protocol". Bodies are sliced out of the read buffer without
//! copying.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::error::{CodecError, GoAwayReason, ProtocolError};
use crate::frame::{
    flags, setting_id, Frame, FrameKind, GoAway, RequestFrame, ResponseFrame, Settings, UnknownFrame, HEADER_LEN,
    MAGIC, VERSION,
};
use crate::message::{Metadata, Method};
use crate::status::Code;

/// Default `max_frame_size`: 4 MiB, gRPC's default maximum receive message size.
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 4 * 1024 * 1024;
/// Default cap on metadata entries in one frame.
pub const DEFAULT_MAX_METADATA_ENTRIES: usize = 64;
/// Default cap on the bytes of metadata keys and values in one frame: 16 KiB.
pub const DEFAULT_MAX_METADATA_BYTES: usize = 16 * 1024;

/// Encodes and decodes tether frames.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame_size: u32,
    max_send_frame_size: u32,
    max_metadata_entries: usize,
    max_metadata_bytes: usize,
    /// The peer's metadata limits (from its SETTINGS): checked before a frame is encoded.
    max_send_metadata: (usize, usize),
    methods: MethodCache,
}

/// The method paths a connection has received, so each request shares one string rather than
/// allocating its own. Bounded: past [`MethodCache::MAX`] distinct paths, new ones are allocated
/// per request and not kept, so a peer cannot grow it without limit.
#[derive(Debug, Clone, Default)]
struct MethodCache {
    paths: std::collections::HashSet<Method>,
}

impl MethodCache {
    const MAX: usize = 256;

    fn get(&mut self, path: &str) -> Method {
        if let Some(m) = self.paths.get(path) {
            return m.clone();
        }
        let m = Method::from(std::sync::Arc::<str>::from(path));
        if self.paths.len() < Self::MAX {
            self.paths.insert(m.clone());
        }
        m
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_FRAME_SIZE)
    }
}

impl FrameCodec {
    /// A codec that accepts frame bodies up to `max_frame_size` bytes and sends bodies of the same size.
    pub fn new(max_frame_size: u32) -> Self {
        FrameCodec {
            max_frame_size,
            max_send_frame_size: max_frame_size,
            max_metadata_entries: DEFAULT_MAX_METADATA_ENTRIES,
            max_metadata_bytes: DEFAULT_MAX_METADATA_BYTES,
            max_send_metadata: (usize::MAX, usize::MAX),
            methods: MethodCache::default(),
        }
    }

    /// The largest body accepted from the peer.
    pub fn max_frame_size(&self) -> u32 {
        self.max_frame_size
    }

    /// Sets the largest body this side sends: the peer's advertised `max_frame_size`.
    pub fn set_max_send_frame_size(&mut self, max: u32) {
        self.max_send_frame_size = max;
    }

    /// The largest body this side sends.
    pub fn max_send_frame_size(&self) -> u32 {
        self.max_send_frame_size
    }

    /// Sets the peer's metadata limits (entries, bytes of keys and values): a frame over them is
    /// refused before it is encoded, so the call fails locally instead of on the peer.
    pub fn set_max_send_metadata(&mut self, entries: usize, bytes: usize) {
        self.max_send_metadata = (entries, bytes);
    }

    /// Sets the cap on metadata entries accepted in one frame.
    pub fn set_max_metadata_entries(&mut self, max: usize) {
        self.max_metadata_entries = max;
    }

    /// Sets the cap on the bytes of metadata keys and values accepted in one frame.
    pub fn set_max_metadata_bytes(&mut self, max: usize) {
        self.max_metadata_bytes = max;
    }

    /// Checks a complete or partial header at the front of `src` without consuming it. Returns the
    /// kind byte and body length once all 16 header bytes are there.
    fn check_header(&self, src: &[u8]) -> Result<Option<(u8, usize)>, ProtocolError> {
        // Reject a bad magic byte or version as soon as that byte arrives, not after 16 bytes.
        if let Some(&m) = src.first() {
            if m != MAGIC {
                return Err(ProtocolError::BadMagic(m));
            }
        }
        if let Some(&v) = src.get(1) {
            if v != VERSION {
                return Err(ProtocolError::UnsupportedVersion(v));
            }
        }
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[12], src[13], src[14], src[15]]);
        if len > self.max_frame_size {
            return Err(ProtocolError::FrameTooLarge {
                len: u64::from(len),
                max: self.max_frame_size,
            });
        }
        if let Some(kind) = FrameKind::from_u8(src[2]) {
            let unknown = src[3] & flags::CRITICAL & !flags::known_critical(kind);
            if unknown != 0 {
                return Err(ProtocolError::UnknownCriticalFlags { kind, flags: unknown });
            }
            if matches!(kind, FrameKind::Settings | FrameKind::GoAway) && src[4..12] != [0; 8] {
                return Err(ProtocolError::Malformed {
                    kind,
                    what: "reserved id field must be zero",
                });
            }
        }
        Ok(Some((src[2], len as usize)))
    }

    /// Encodes a frame by reference into `dst`.
    pub fn encode_frame(&self, frame: &Frame, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        if let Frame::Request(RequestFrame { metadata, .. }) | Frame::Response(ResponseFrame { metadata, .. }) = frame {
            let (max_entries, max_bytes) = self.max_send_metadata;
            if metadata.len() > max_entries {
                return Err(ProtocolError::TooManyMetadataEntries {
                    count: metadata.len(),
                    max: max_entries,
                });
            }
            if max_bytes != usize::MAX && metadata.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() > max_bytes {
                return Err(ProtocolError::MetadataTooLarge { max: max_bytes });
            }
        }
        let body_len = body_len(frame);
        if body_len > u64::from(self.max_send_frame_size) {
            return Err(ProtocolError::FrameTooLarge {
                len: body_len,
                max: self.max_send_frame_size,
            });
        }
        dst.reserve(HEADER_LEN + body_len as usize);
        let id = match frame {
            Frame::Request(r) => r.id,
            Frame::Response(r) => r.id,
            Frame::Heartbeat { id } | Frame::HeartbeatAck { id } | Frame::Cancel { id } => *id,
            Frame::Data { id, .. } | Frame::Window { id, .. } => *id,
            Frame::GoAway(_) | Frame::Settings(_) => 0,
            Frame::Unknown(u) => u.id,
        };
        dst.put_u8(MAGIC);
        dst.put_u8(VERSION);
        dst.put_u8(frame.kind_byte());
        dst.put_u8(match frame {
            Frame::Response(r) if r.not_executed => flags::NOT_EXECUTED,
            Frame::Request(r) if r.stream => flags::STREAM,
            Frame::Data { end, packed, .. } => {
                (if *end { flags::END } else { 0 }) | (if *packed { flags::PACKED } else { 0 })
            }
            Frame::Unknown(u) => u.flags,
            _ => 0,
        });
        dst.put_u64(id);
        dst.put_u32(body_len as u32);
        match frame {
            Frame::Request(r) => {
                dst.put_u32(timeout_to_ms(r.timeout));
                dst.put_u16(r.method.len() as u16);
                dst.put_slice(r.method.as_bytes());
                put_metadata(dst, &r.metadata);
                dst.put_slice(&r.payload);
            }
            Frame::Response(r) => {
                dst.put_u16(r.code.as_u16());
                dst.put_u32(r.message.len() as u32);
                dst.put_slice(r.message.as_bytes());
                put_metadata(dst, &r.metadata);
                dst.put_slice(&r.payload);
            }
            Frame::Heartbeat { .. } | Frame::HeartbeatAck { .. } | Frame::Cancel { .. } => {}
            Frame::GoAway(g) => {
                dst.put_u8(g.reason.as_u8());
                dst.put_u64(g.last_request_id);
                dst.put_u16(g.message.len() as u16);
                dst.put_slice(g.message.as_bytes());
            }
            Frame::Settings(s) => {
                let entries = settings_entries(s);
                dst.put_u16(entries.len() as u16);
                for (id, v) in entries {
                    dst.put_u16(id);
                    dst.put_u64(v);
                }
            }
            Frame::Data { payload, .. } => dst.put_slice(payload),
            Frame::Window { increment, .. } => dst.put_u32(*increment),
            Frame::Unknown(u) => dst.put_slice(&u.body),
        }
        Ok(())
    }
}

fn timeout_to_ms(t: Option<Duration>) -> u32 {
    match t {
        None => 0,
        // Round up so a request with 0.4 ms left is not sent as "no deadline".
        Some(d) => u32::try_from(d.as_micros().div_ceil(1000)).unwrap_or(u32::MAX).max(1),
    }
}

fn metadata_len(m: &Metadata) -> u64 {
    2 + m
        .iter()
        .map(|(k, v)| 2 + k.len() as u64 + 4 + v.len() as u64)
        .sum::<u64>()
}

fn put_metadata(dst: &mut BytesMut, m: &Metadata) {
    dst.put_u16(m.len() as u16);
    for (k, v) in m.iter() {
        dst.put_u16(k.len() as u16);
        dst.put_slice(k.as_bytes());
        dst.put_u32(v.len() as u32);
        dst.put_slice(v);
    }
}

fn settings_entries(s: &Settings) -> Vec<(u16, u64)> {
    let mut v = Vec::with_capacity(11);
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if let Some(x) = s.max_frame_size {
        v.push((setting_id::MAX_FRAME_SIZE, u64::from(x)));
    }
    if let Some(x) = s.idle_timeout {
        v.push((setting_id::IDLE_TIMEOUT_MS, ms(x)));
    }
    if let Some(x) = s.max_concurrent_requests {
        v.push((setting_id::MAX_CONCURRENT_REQUESTS, u64::from(x)));
    }
    if let Some(x) = s.heartbeat_interval {
        v.push((setting_id::HEARTBEAT_INTERVAL_MS, ms(x)));
    }
    if let Some(x) = s.max_metadata_entries {
        v.push((setting_id::MAX_METADATA_ENTRIES, u64::from(x)));
    }
    if let Some(x) = s.max_metadata_bytes {
        v.push((setting_id::MAX_METADATA_BYTES, u64::from(x)));
    }
    if let Some(x) = s.max_requests_per_connection {
        v.push((setting_id::MAX_REQUESTS_PER_CONNECTION, u64::from(x)));
    }
    if let Some(x) = s.features {
        v.push((setting_id::FEATURES, x));
    }
    if let Some(x) = s.version {
        v.push((setting_id::VERSION, u64::from(x)));
    }
    if let Some(x) = s.stream_window {
        v.push((setting_id::STREAM_WINDOW, u64::from(x)));
    }
    if let Some(x) = s.connection_window {
        v.push((setting_id::CONNECTION_WINDOW, u64::from(x)));
    }
    v
}

/// Length of the body `encode_frame` writes. Lengths that do not fit their wire field are reported
/// as too large for any frame so the encoder rejects them.
fn body_len(frame: &Frame) -> u64 {
    const TOO_BIG: u64 = u64::MAX;
    match frame {
        Frame::Request(r) => {
            if r.method.len() > usize::from(u16::MAX) || !metadata_fits(&r.metadata) {
                return TOO_BIG;
            }
            4 + 2 + r.method.len() as u64 + metadata_len(&r.metadata) + r.payload.len() as u64
        }
        Frame::Response(r) => {
            if !metadata_fits(&r.metadata) {
                return TOO_BIG;
            }
            2 + 4 + r.message.len() as u64 + metadata_len(&r.metadata) + r.payload.len() as u64
        }
        Frame::Heartbeat { .. } | Frame::HeartbeatAck { .. } | Frame::Cancel { .. } => 0,
        Frame::GoAway(g) => {
            if g.message.len() > usize::from(u16::MAX) {
                return TOO_BIG;
            }
            1 + 8 + 2 + g.message.len() as u64
        }
        Frame::Settings(s) => 2 + 10 * settings_entries(s).len() as u64,
        Frame::Data { payload, .. } => payload.len() as u64,
        Frame::Window { .. } => 4,
        Frame::Unknown(u) => u.body.len() as u64,
    }
}

fn metadata_fits(m: &Metadata) -> bool {
    m.len() <= usize::from(u16::MAX)
        && m.iter()
            .all(|(k, v)| k.len() <= usize::from(u16::MAX) && u32::try_from(v.len()).is_ok())
}

/// Reads a frame body field by field; every read checks the remaining length first.
struct BodyReader {
    buf: Bytes,
    kind: FrameKind,
}

impl BodyReader {
    fn malformed(&self, what: &'static str) -> ProtocolError {
        ProtocolError::Malformed { kind: self.kind, what }
    }

    fn need(&self, n: usize, what: &'static str) -> Result<(), ProtocolError> {
        if self.buf.remaining() < n {
            Err(self.malformed(what))
        } else {
            Ok(())
        }
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, ProtocolError> {
        self.need(1, what)?;
        Ok(self.buf.get_u8())
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, ProtocolError> {
        self.need(2, what)?;
        Ok(self.buf.get_u16())
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, ProtocolError> {
        self.need(4, what)?;
        Ok(self.buf.get_u32())
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, ProtocolError> {
        self.need(8, what)?;
        Ok(self.buf.get_u64())
    }

    fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, ProtocolError> {
        self.need(n, what)?;
        Ok(self.buf.split_to(n))
    }

    fn string(&mut self, n: usize, what: &'static str) -> Result<String, ProtocolError> {
        let b = self.bytes(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.malformed(what))
    }

    fn metadata(&mut self, max_entries: usize, max_bytes: usize) -> Result<Metadata, ProtocolError> {
        let count = usize::from(self.u16("metadata count")?);
        if count > max_entries {
            return Err(ProtocolError::TooManyMetadataEntries {
                count,
                max: max_entries,
            });
        }
        let mut m = Metadata::with_capacity(count);
        let mut size = 0usize;
        for _ in 0..count {
            let kl = usize::from(self.u16("metadata key length")?);
            let key = self.string(kl, "metadata key")?;
            let vl = self.u32("metadata value length")? as usize;
            size = size.saturating_add(kl).saturating_add(vl);
            if size > max_bytes {
                return Err(ProtocolError::MetadataTooLarge { max: max_bytes });
            }
            let value = self.bytes(vl, "metadata value")?;
            m.push_raw(key, value);
        }
        Ok(m)
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        let Some((kind_byte, len)) = self.check_header(src)? else {
            return Ok(None);
        };
        if src.len() < HEADER_LEN + len {
            // The length is within max_frame_size, checked above, so this reservation is bounded.
            src.reserve(HEADER_LEN + len - src.len());
            return Ok(None);
        }
        let flags = src[3];
        let id = u64::from_be_bytes(src[4..12].try_into().expect("8 header bytes"));
        src.advance(HEADER_LEN);
        let body = src.split_to(len).freeze();
        let Some(kind) = FrameKind::from_u8(kind_byte) else {
            return Ok(Some(Frame::Unknown(UnknownFrame {
                kind: kind_byte,
                flags,
                id,
                body,
            })));
        };
        match decode_body(
            kind,
            (id, flags),
            body,
            (self.max_metadata_entries, self.max_metadata_bytes),
            &mut self.methods,
        ) {
            Ok(frame) => Ok(Some(frame)),
            // Over a metadata limit: the body was well framed and is consumed, so the connection
            // stays in sync and only this call is refused.
            Err(error @ (ProtocolError::TooManyMetadataEntries { .. } | ProtocolError::MetadataTooLarge { .. }))
                if matches!(kind, FrameKind::Request | FrameKind::Oneway | FrameKind::Response) =>
            {
                Err(CodecError::Rejected { kind, id, error })
            }
            Err(e) => Err(e.into()),
        }
    }
}

fn decode_body(
    kind: FrameKind,
    (id, flags): (u64, u8),
    body: Bytes,
    max_metadata: (usize, usize),
    methods: &mut MethodCache,
) -> Result<Frame, ProtocolError> {
    let mut r = BodyReader { buf: body, kind };
    // Bytes after the fields a fixed-layout body defines are a newer peer's additions: ignored.
    let frame = match kind {
        FrameKind::Request | FrameKind::Oneway => {
            let ms = r.u32("deadline")?;
            let ml = usize::from(r.u16("method length")?);
            let raw = r.bytes(ml, "method")?;
            let method = std::str::from_utf8(&raw).map_err(|_| r.malformed("method"))?;
            if !method.starts_with('/') {
                return Err(r.malformed("method must start with '/'"));
            }
            let method = methods.get(method);
            let metadata = r.metadata(max_metadata.0, max_metadata.1)?;
            let payload = std::mem::take(&mut r.buf);
            Frame::Request(RequestFrame {
                id,
                oneway: kind == FrameKind::Oneway,
                stream: kind == FrameKind::Request && flags & crate::frame::flags::STREAM != 0,
                timeout: (ms != 0).then(|| Duration::from_millis(u64::from(ms))),
                method,
                metadata,
                payload,
            })
        }
        FrameKind::Response => {
            let code = Code::from_u16(r.u16("status")?);
            let ml = r.u32("message length")? as usize;
            let message = r.string(ml, "message")?;
            let metadata = r.metadata(max_metadata.0, max_metadata.1)?;
            let payload = std::mem::take(&mut r.buf);
            Frame::Response(ResponseFrame {
                id,
                code,
                message,
                metadata,
                payload,
                not_executed: flags & crate::frame::flags::NOT_EXECUTED != 0,
            })
        }
        FrameKind::Heartbeat => Frame::Heartbeat { id },
        FrameKind::HeartbeatAck => Frame::HeartbeatAck { id },
        FrameKind::Cancel => Frame::Cancel { id },
        FrameKind::Data => {
            let packed = flags & crate::frame::flags::PACKED != 0;
            if packed && crate::frame::packed_messages(&r.buf).is_none() {
                return Err(r.malformed("packed messages"));
            }
            Frame::Data {
                id,
                end: flags & crate::frame::flags::END != 0,
                packed,
                payload: std::mem::take(&mut r.buf),
            }
        }
        FrameKind::Window => Frame::Window {
            id,
            increment: r.u32("window increment")?,
        },
        FrameKind::GoAway => {
            let reason = GoAwayReason::from_u8(r.u8("reason")?);
            let last_request_id = r.u64("last request id")?;
            let ml = usize::from(r.u16("message length")?);
            let message = r.string(ml, "message")?;
            Frame::GoAway(GoAway {
                reason,
                last_request_id,
                message,
            })
        }
        FrameKind::Settings => {
            let count = r.u16("settings count")?;
            let mut s = Settings::default();
            for _ in 0..count {
                let sid = r.u16("setting id")?;
                let v = r.u64("setting value")?;
                let clamp32 = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
                match sid {
                    setting_id::MAX_FRAME_SIZE => s.max_frame_size = Some(clamp32(v)),
                    // 0: the sender evicts no idle connection, as if it sent nothing.
                    setting_id::IDLE_TIMEOUT_MS => s.idle_timeout = (v != 0).then(|| Duration::from_millis(v)),
                    setting_id::MAX_CONCURRENT_REQUESTS => s.max_concurrent_requests = Some(clamp32(v)),
                    setting_id::HEARTBEAT_INTERVAL_MS => s.heartbeat_interval = Some(Duration::from_millis(v)),
                    setting_id::MAX_METADATA_ENTRIES => s.max_metadata_entries = Some(clamp32(v)),
                    setting_id::MAX_METADATA_BYTES => s.max_metadata_bytes = Some(clamp32(v)),
                    setting_id::MAX_REQUESTS_PER_CONNECTION => s.max_requests_per_connection = Some(clamp32(v)),
                    setting_id::FEATURES => s.features = Some(v),
                    setting_id::VERSION => s.version = Some(u8::try_from(v).unwrap_or(u8::MAX)),
                    setting_id::STREAM_WINDOW => s.stream_window = Some(clamp32(v)),
                    setting_id::CONNECTION_WINDOW => s.connection_window = Some(clamp32(v)),
                    _ => {} // unknown settings are ignored so newer peers can add some
                }
            }
            Frame::Settings(s)
        }
    };
    Ok(frame)
}

impl Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        Ok(self.encode_frame(&frame, dst)?)
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        Ok(self.encode_frame(frame, dst)?)
    }
}
