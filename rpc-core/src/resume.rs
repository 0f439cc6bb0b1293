//! Resumable server streams, the parts both sides share: the positions a resumable stream's
//! messages carry, how a client asks to resume, how the runtime marks a stream it broke (so the
//! client knows to resume it), and the typed gap a resume can end with.
//!
//! A resumable stream is an ordinary server stream whose messages each start with a tag and a
//! position (`PROTOCOL.md`, *Resumable streams*): the client runtime remembers the position of the
//! last message it delivered and, when the stream breaks short of the server ending it, opens it
//! again (on any healthy connection) asking for what comes after. The positions are the handler's
//! own (an offset in its log), strictly increasing along a stream.

use bytes::{BufMut, Bytes, BytesMut};

use crate::message::Metadata;
use crate::status::{Code, Status};

/// Request metadata of a resumable call: `new` for a fresh subscription, or the position (in
/// decimal) after which the stream is to resume. A request without it is a plain server stream,
/// which a resumable method serves without positions.
pub const RESUME_KEY: &str = "tether-resume";

/// Status metadata naming why the runtime (not the handler) ended a stream it could not keep:
/// `stall` (its consumer granted no credit for `stream_stall_timeout`), `idle`
/// (`stream_idle_timeout`), `shutdown` (its server is draining). Such a stream is broken, not
/// ended: a resumable stream is opened again.
pub const BREAK_KEY: &str = "tether-break";

/// Status metadata of a [`ResumeGap`]: `from-to`, inclusive.
pub const GAP_KEY: &str = "tether-resume-gap";

/// Marks `status` as a break of the runtime's (see [`BREAK_KEY`]).
pub fn mark_break(mut status: Status, why: &'static str) -> Status {
    status
        .metadata_mut()
        .insert(BREAK_KEY, Bytes::from_static(why.as_bytes()));
    status
}

/// True when `status` says the runtime broke its stream (see [`BREAK_KEY`]).
pub fn is_break(status: &Status) -> bool {
    status.metadata().get(BREAK_KEY).is_some()
}

/// One item of a resumable stream as a handler produces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Positioned<T> {
    /// A message at its position.
    Message(u64, T),
    /// Everything up to and including this position has been sent (or was never meant for this
    /// subscriber): a resume may start after it. A fresh subscription starts with one (where it
    /// begins), and a replay ends with one (where it caught up); a filtering handler sends one
    /// now and then, so a resume need not scan what it skipped.
    Checkpoint(u64),
}

impl<T> Positioned<T> {
    /// The item's position.
    pub fn position(&self) -> u64 {
        match self {
            Positioned::Message(p, _) | Positioned::Checkpoint(p) => *p,
        }
    }

    /// The same item with its message mapped.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Positioned<U> {
        match self {
            Positioned::Message(p, m) => Positioned::Message(p, f(m)),
            Positioned::Checkpoint(p) => Positioned::Checkpoint(p),
        }
    }
}

const TAG_MESSAGE: u8 = 0;
const TAG_CHECKPOINT: u8 = 1;
/// Tag and position.
const HEADER: usize = 9;

/// The body of one message of a resumable stream: a tag byte (0 message, 1 checkpoint), the
/// position as 8 bytes big-endian, then the message (nothing for a checkpoint).
pub fn encode(item: Positioned<Bytes>) -> Bytes {
    let (tag, position, payload) = match item {
        Positioned::Message(p, m) => (TAG_MESSAGE, p, m),
        Positioned::Checkpoint(p) => (TAG_CHECKPOINT, p, Bytes::new()),
    };
    let mut b = BytesMut::with_capacity(HEADER + payload.len());
    b.put_u8(tag);
    b.put_u64(position);
    b.put_slice(&payload);
    b.freeze()
}

/// Reads one message of a resumable stream (INTERNAL if it is not one: the server is not
/// serving the method as resumable).
pub fn decode(mut body: Bytes) -> Result<Positioned<Bytes>, Status> {
    if body.len() < HEADER {
        return Err(Status::internal(format!(
            "a resumable stream's message of {} bytes has no position",
            body.len()
        )));
    }
    let header = body.split_to(HEADER);
    let mut p = [0u8; 8];
    p.copy_from_slice(&header[1..]);
    let position = u64::from_be_bytes(p);
    match header[0] {
        TAG_MESSAGE => Ok(Positioned::Message(position, body)),
        TAG_CHECKPOINT if body.is_empty() => Ok(Positioned::Checkpoint(position)),
        tag => Err(Status::internal(format!(
            "a resumable stream's message has an unknown tag {tag} (or a checkpoint with a body)"
        ))),
    }
}

/// How a resumable call starts, as its request metadata says (see [`RESUME_KEY`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Not a resumable call: a plain server stream.
    Plain,
    /// A fresh subscription.
    New,
    /// Resume after this position.
    After(u64),
}

impl Resume {
    /// Reads it from a request's metadata (an unreadable value is an INVALID_ARGUMENT).
    pub fn of(metadata: &Metadata) -> Result<Resume, Status> {
        match metadata.get_str(RESUME_KEY) {
            None => Ok(Resume::Plain),
            Some("new") => Ok(Resume::New),
            Some(v) => v
                .parse()
                .map(Resume::After)
                .map_err(|_| Status::invalid_argument(format!("{RESUME_KEY}: {v:?} is neither `new` nor a position"))),
        }
    }

    /// Writes it into a request's metadata.
    pub fn write(self, metadata: &mut Metadata) {
        match self {
            Resume::Plain => {
                metadata.remove(RESUME_KEY);
            }
            Resume::New => metadata.insert(RESUME_KEY, Bytes::from_static(b"new")),
            Resume::After(p) => metadata.insert(RESUME_KEY, Bytes::from(p.to_string())),
        }
    }

    /// The position to resume after, if any.
    pub fn after(self) -> Option<u64> {
        match self {
            Resume::After(p) => Some(p),
            _ => None,
        }
    }
}

/// The positions `from..=to` a resume asked for are no longer there (older than what the
/// server keeps): instead of skipping them silently, the stream ends with this, as an
/// OUT_OF_RANGE status ([`ResumeGap::of`] reads it back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("resume gap: positions {from} to {to} are no longer kept by the server")]
pub struct ResumeGap {
    /// The first missing position.
    pub from: u64,
    /// The last missing position.
    pub to: u64,
}

impl ResumeGap {
    /// The gap a status carries, if it is one.
    pub fn of(status: &Status) -> Option<ResumeGap> {
        if status.code() != Code::OutOfRange {
            return None;
        }
        let (from, to) = status.metadata().get_str(GAP_KEY)?.split_once('-')?;
        Some(ResumeGap {
            from: from.parse().ok()?,
            to: to.parse().ok()?,
        })
    }
}

impl From<ResumeGap> for Status {
    fn from(gap: ResumeGap) -> Status {
        let mut status = Status::new(Code::OutOfRange, gap.to_string());
        status
            .metadata_mut()
            .insert(GAP_KEY, Bytes::from(format!("{}-{}", gap.from, gap.to)));
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn items_round_trip(p in any::<u64>(), body in proptest::collection::vec(any::<u8>(), 0..64), checkpoint: bool) {
            let item = if checkpoint { Positioned::Checkpoint(p) } else { Positioned::Message(p, Bytes::from(body)) };
            prop_assert_eq!(decode(encode(item.clone())).unwrap(), item);
        }

        #[test]
        fn resume_round_trips(p in any::<u64>()) {
            for r in [Resume::New, Resume::After(p), Resume::Plain] {
                let mut m = Metadata::new();
                r.write(&mut m);
                prop_assert_eq!(Resume::of(&m).unwrap(), r);
            }
        }

        #[test]
        fn gaps_round_trip(from in any::<u64>(), to in any::<u64>()) {
            let gap = ResumeGap { from, to };
            prop_assert_eq!(ResumeGap::of(&Status::from(gap)), Some(gap));
        }
    }

    #[test]
    fn a_body_without_a_position_is_refused() {
        assert_eq!(decode(Bytes::from_static(b"short")).unwrap_err().code(), Code::Internal);
        assert_eq!(decode(Bytes::from_static(&[9; 9])).unwrap_err().code(), Code::Internal);
        let mut m = Metadata::new();
        m.insert(RESUME_KEY, Bytes::from_static(b"soon"));
        assert_eq!(Resume::of(&m).unwrap_err().code(), Code::InvalidArgument);
    }
}
