//! A frozen implementation of protocol version 1 (tether as of a8f8238), kept apart from
//! `rpc-core` so that changes to the real codec cannot change it: the peer that proves version-2
//! builds still serve and call version-1 builds.
//!
//! It is as strict as version 1 was: a header version other than 1, a kind above 7, any bytes
//! after a HEARTBEAT, HEARTBEAT_ACK, GOAWAY or SETTINGS body, more than 64 metadata entries or
//! 16 KiB of metadata keys and values in a frame (its unannounced defaults), and a method not
//! starting with `/` are errors; flags are ignored; unknown setting ids are ignored. Do not edit it to make a test pass: a failure here means a
//! version-2 build sent a version-1 peer something it cannot read.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A version-1 frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum V1Frame {
    Request {
        id: u64,
        oneway: bool,
        timeout_ms: u32,
        method: String,
        metadata: Vec<(String, Bytes)>,
        payload: Bytes,
    },
    Response {
        id: u64,
        code: u16,
        message: String,
        metadata: Vec<(String, Bytes)>,
        payload: Bytes,
    },
    Heartbeat(u64),
    HeartbeatAck(u64),
    GoAway {
        reason: u8,
        last_request_id: u64,
        message: String,
    },
    /// (id, value) pairs as sent; version 1 knew ids 1 to 5.
    Settings(Vec<(u16, u64)>),
}

/// Version 1's status codes (0 SUCCESS .. 11 INTERNAL); anything else it shows as UNKNOWN.
pub const V1_CODES: std::ops::RangeInclusive<u16> = 0..=11;

/// Why a version-1 decoder refused bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum V1Error {
    BadMagic(u8),
    UnsupportedVersion(u8),
    UnknownKind(u8),
    Malformed(&'static str),
}

pub fn encode(frame: &V1Frame) -> BytesMut {
    let mut body = BytesMut::new();
    let put_md = |b: &mut BytesMut, md: &[(String, Bytes)]| {
        b.put_u16(md.len() as u16);
        for (k, v) in md {
            b.put_u16(k.len() as u16);
            b.put_slice(k.as_bytes());
            b.put_u32(v.len() as u32);
            b.put_slice(v);
        }
    };
    let (kind, id) = match frame {
        V1Frame::Request {
            id,
            oneway,
            timeout_ms,
            method,
            metadata,
            payload,
        } => {
            body.put_u32(*timeout_ms);
            body.put_u16(method.len() as u16);
            body.put_slice(method.as_bytes());
            put_md(&mut body, metadata);
            body.put_slice(payload);
            (if *oneway { 3 } else { 1 }, *id)
        }
        V1Frame::Response {
            id,
            code,
            message,
            metadata,
            payload,
        } => {
            body.put_u16(*code);
            body.put_u32(message.len() as u32);
            body.put_slice(message.as_bytes());
            put_md(&mut body, metadata);
            body.put_slice(payload);
            (2, *id)
        }
        V1Frame::Heartbeat(id) => (4, *id),
        V1Frame::HeartbeatAck(id) => (5, *id),
        V1Frame::GoAway {
            reason,
            last_request_id,
            message,
        } => {
            body.put_u8(*reason);
            body.put_u64(*last_request_id);
            body.put_u16(message.len() as u16);
            body.put_slice(message.as_bytes());
            (6, 0)
        }
        V1Frame::Settings(entries) => {
            body.put_u16(entries.len() as u16);
            for (k, v) in entries {
                body.put_u16(*k);
                body.put_u64(*v);
            }
            (7, 0)
        }
    };
    let mut out = BytesMut::with_capacity(16 + body.len());
    out.put_u8(0x54);
    out.put_u8(1);
    out.put_u8(kind);
    out.put_u8(0);
    out.put_u64(id);
    out.put_u32(body.len() as u32);
    out.put_slice(&body);
    out
}

/// Decodes one frame from the front of `src`: `Ok(None)` until it is whole.
pub fn decode(src: &mut BytesMut) -> Result<Option<V1Frame>, V1Error> {
    if let Some(&m) = src.first() {
        if m != 0x54 {
            return Err(V1Error::BadMagic(m));
        }
    }
    if let Some(&v) = src.get(1) {
        if v != 1 {
            return Err(V1Error::UnsupportedVersion(v));
        }
    }
    if src.len() < 16 {
        return Ok(None);
    }
    let kind = src[2];
    if !(1..=7).contains(&kind) {
        return Err(V1Error::UnknownKind(kind));
    }
    let len = u32::from_be_bytes(src[12..16].try_into().unwrap()) as usize;
    if src.len() < 16 + len {
        return Ok(None);
    }
    let id = u64::from_be_bytes(src[4..12].try_into().unwrap());
    src.advance(16);
    let mut b = src.split_to(len).freeze();
    let need = |b: &Bytes, n: usize| {
        if b.remaining() < n {
            Err(V1Error::Malformed("short body"))
        } else {
            Ok(())
        }
    };
    let string = |b: &mut Bytes, n: usize| -> Result<String, V1Error> {
        need(b, n)?;
        String::from_utf8(b.split_to(n).to_vec()).map_err(|_| V1Error::Malformed("utf-8"))
    };
    let metadata = |b: &mut Bytes| -> Result<Vec<(String, Bytes)>, V1Error> {
        need(b, 2)?;
        let n = b.get_u16();
        if n > 64 {
            return Err(V1Error::Malformed("too many metadata entries"));
        }
        let mut md = Vec::new();
        let mut size = 0usize;
        for _ in 0..n {
            need(b, 2)?;
            let kl = b.get_u16() as usize;
            let k = string(b, kl)?;
            need(b, 4)?;
            let vl = b.get_u32() as usize;
            size += kl + vl;
            if size > 16 * 1024 {
                return Err(V1Error::Malformed("metadata over 16 KiB"));
            }
            need(b, vl)?;
            md.push((k, b.split_to(vl)));
        }
        Ok(md)
    };
    let end = |b: &Bytes| {
        if b.has_remaining() {
            Err(V1Error::Malformed("trailing bytes"))
        } else {
            Ok(())
        }
    };
    let frame = match kind {
        1 | 3 => {
            need(&b, 6)?;
            let timeout_ms = b.get_u32();
            let ml = b.get_u16() as usize;
            let method = string(&mut b, ml)?;
            if !method.starts_with('/') {
                return Err(V1Error::Malformed("method must start with '/'"));
            }
            let metadata = metadata(&mut b)?;
            V1Frame::Request {
                id,
                oneway: kind == 3,
                timeout_ms,
                method,
                metadata,
                payload: b,
            }
        }
        2 => {
            need(&b, 6)?;
            let code = b.get_u16();
            let ml = b.get_u32() as usize;
            let message = string(&mut b, ml)?;
            let metadata = metadata(&mut b)?;
            V1Frame::Response {
                id,
                code,
                message,
                metadata,
                payload: b,
            }
        }
        4 => {
            end(&b)?;
            V1Frame::Heartbeat(id)
        }
        5 => {
            end(&b)?;
            V1Frame::HeartbeatAck(id)
        }
        6 => {
            need(&b, 11)?;
            let reason = b.get_u8();
            let last_request_id = b.get_u64();
            let ml = b.get_u16() as usize;
            let message = string(&mut b, ml)?;
            end(&b)?;
            V1Frame::GoAway {
                reason,
                last_request_id,
                message,
            }
        }
        _ => {
            need(&b, 2)?;
            let n = b.get_u16();
            let mut entries = Vec::new();
            for _ in 0..n {
                need(&b, 10)?;
                entries.push((b.get_u16(), b.get_u64()));
            }
            end(&b)?;
            V1Frame::Settings(entries)
        }
    };
    Ok(Some(frame))
}

/// The settings a version-1 client sent: max_frame_size and heartbeat interval.
pub fn client_settings() -> V1Frame {
    V1Frame::Settings(vec![(1, 4 << 20), (4, 15_000), (5, 64)])
}

/// The settings a version-1 server sent: max_frame_size, idle timeout, max_concurrent_requests.
pub fn server_settings() -> V1Frame {
    V1Frame::Settings(vec![(1, 4 << 20), (2, 90_000), (3, 1024), (5, 64)])
}

/// One side of a connection that speaks version 1 only.
pub struct V1Peer {
    pub stream: TcpStream,
    buf: BytesMut,
}

impl V1Peer {
    pub fn new(stream: TcpStream) -> Self {
        V1Peer {
            stream,
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, frame: &V1Frame) {
        self.stream.write_all(&encode(frame)).await.unwrap();
    }

    /// The next frame; `Ok(None)` at EOF or when `limit` passes; `Err` for bytes version 1
    /// cannot read.
    pub async fn next(&mut self, limit: Duration) -> Result<Option<V1Frame>, V1Error> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(f) = decode(&mut self.buf)? {
                return Ok(Some(f));
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Ok(None),
                Ok(Ok(_)) => {}
            }
        }
    }
}
