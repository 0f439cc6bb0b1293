//! The streams of one connection as its driver keeps them: where each stream's messages go, the
//! credit each side has, and the frames that wait for credit. No I/O: the driver feeds it frames
//! and the application's messages, and encodes what it hands back.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;

use super::flow::Credit;
use crate::error::ProtocolError;
use crate::frame::{Frame, ResponseFrame, Settings};
use crate::message::Method;
use crate::stream::{Chunk, Held};

/// Messages at most this large are packed several to a DATA frame.
pub(crate) const PACK_MESSAGE_MAX: usize = 4 * 1024;
/// A packed DATA body grows to about this much (one message may take it past).
pub(crate) const PACK_BODY_TARGET: usize = 16 * 1024;

/// The DATA bodies for a batch of messages, in order, as `(packed, body)`: runs of small messages
/// packed together (each prefixed by its 4-byte big-endian length, up to about
/// [`PACK_BODY_TARGET`], never past `max_body`), any other message alone and as it is. A run of
/// one stays unpacked.
pub(crate) fn pack(payloads: Vec<Bytes>, max_body: usize) -> impl Iterator<Item = (bool, Bytes)> {
    // Never past the peer's largest frame.
    let limit = PACK_BODY_TARGET.min(max_body);
    fn flush(run: &mut Vec<Bytes>, run_bytes: &mut usize, out: &mut Vec<(bool, Bytes)>) {
        match run.len() {
            0 => {}
            1 => out.push((false, run.pop().unwrap_or_default())),
            _ => {
                let mut body = bytes::BytesMut::with_capacity(*run_bytes);
                for m in run.drain(..) {
                    body.extend_from_slice(&(m.len() as u32).to_be_bytes());
                    body.extend_from_slice(&m);
                }
                out.push((true, body.freeze()));
            }
        }
        *run_bytes = 0;
    }
    let mut out: Vec<(bool, Bytes)> = Vec::new();
    let mut run: Vec<Bytes> = Vec::new();
    let mut run_bytes = 0;
    for m in payloads {
        if m.len() > PACK_MESSAGE_MAX || 4 + m.len() > limit {
            flush(&mut run, &mut run_bytes, &mut out);
            out.push((false, m));
            continue;
        }
        if run_bytes + 4 + m.len() > limit {
            flush(&mut run, &mut run_bytes, &mut out);
        }
        run_bytes += 4 + m.len();
        run.push(m);
    }
    flush(&mut run, &mut run_bytes, &mut out);
    out.into_iter()
}

/// Credit a DATA frame gives back at once (nobody will consume it): for the connection, and for
/// its stream when the stream is open but its receiver is gone.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Granted {
    pub(crate) connection: Option<u32>,
    pub(crate) stream: Option<u32>,
}

/// The window a peer that announces none is taken to grant (PROTOCOL.md, *Streams*).
pub(crate) const DEFAULT_WINDOW: u32 = 64 * 1024;

/// What waits for credit on a stream, in order.
#[derive(Debug)]
pub(crate) enum Waiting {
    /// A message (or END).
    Data {
        end: bool,
        /// The body packs several messages (flag PACKED).
        packed: bool,
        payload: Bytes,
        permit: Option<Held>,
    },
    /// The stream's final RESPONSE (server): it follows the stream's last message.
    End(ResponseFrame),
}

/// What may be encoded now.
#[derive(Debug)]
pub(crate) enum Ready {
    /// A DATA frame; the permit is released once it is encoded.
    Data(Frame, Option<Held>),
    /// A stream's final RESPONSE; the stream is gone.
    End(ResponseFrame),
}

/// One open stream as its connection's driver sees it ([`crate::driver::ConnectionHandle::streams`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StreamInfo {
    /// The stream id (the id of the request that opened it).
    pub id: u64,
    /// The method it calls.
    pub method: Method,
    /// How long it has been open.
    pub age: Duration,
    /// Messages this side sent on it (queued to the connection).
    pub sent: u64,
    /// Messages this side's application took from it.
    pub received: u64,
    /// Message bytes this side holds for it, waiting for the peer's credit.
    pub waiting_bytes: usize,
    /// How long this side's sending has waited for the peer (`None` while nothing waits): since
    /// the first message parked, or since the last frame went while more waited. A consumer
    /// that still reads, slowly, keeps this short; one that stopped makes it grow.
    pub blocked_for: Option<Duration>,
    /// Bytes this side may still send on it before the peer grants more (negative: a frame went
    /// past the credit, as one may).
    pub send_credit: i64,
    /// Bytes the peer may still send on it before this side grants more.
    pub recv_credit: i64,
    /// The peer ended its half (sent END).
    pub peer_finished: bool,
}

/// A connection's streams as its driver sees them.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct StreamsView {
    /// Streams open (there may be more than `streams` lists).
    pub open: usize,
    /// The open streams, lowest id first, at most [`crate::driver::ConnectionHandle::streams`]'s `max`.
    pub streams: Vec<StreamInfo>,
    /// Connection-level credit: what this side may still send on all streams together.
    pub send_credit: i64,
    /// Connection-level credit: what the peer may still send on all streams together.
    pub recv_credit: i64,
}

#[derive(Debug)]
struct Entry {
    /// Tells this side's producer when the stream is gone.
    key: crate::stream::StreamKey,
    /// Where the peer's messages go; `None` once the peer sent END.
    messages: Option<UnboundedSender<Chunk>>,
    /// What we granted the peer for this stream, minus what it sent.
    recv: Credit,
    /// What the peer granted us for this stream, minus what we sent.
    send: Credit,
    waiting: VecDeque<Waiting>,
    /// A message moved either way since the last idle scan.
    moved: bool,
    /// Idle scans in a row with nothing moved.
    idle_scans: u32,
    /// The stream's message counts (sent, taken by the application) at the last idle scan: a
    /// consumer taking what was buffered is activity, though no frame moves.
    seen: (u64, u64),
    /// For a look at the stream (the admin page): its method, when it opened, and since when
    /// what this side sends has waited for the peer's credit.
    method: Method,
    opened: Instant,
    blocked_since: Option<Instant>,
}

#[derive(Debug)]
pub(crate) struct Streams {
    own_stream_window: u32,
    peer_stream_window: u32,
    conn_send: Credit,
    conn_recv: Credit,
    table: HashMap<u64, Entry>,
    /// Streams with frames waiting for credit, served in turn.
    parked: VecDeque<u64>,
    /// Message bytes waiting for credit, all streams.
    parked_bytes: usize,
}

impl Entry {
    fn waiting_bytes(&self) -> usize {
        self.waiting
            .iter()
            .map(|w| match w {
                Waiting::Data { payload, .. } => payload.len(),
                Waiting::End(_) => 0,
            })
            .sum()
    }
}

impl Streams {
    pub(crate) fn new(stream_window: Option<u32>, connection_window: Option<u32>) -> Self {
        let own_stream_window = stream_window.unwrap_or(DEFAULT_WINDOW);
        let own_connection_window = connection_window.unwrap_or(DEFAULT_WINDOW);
        Streams {
            own_stream_window,
            peer_stream_window: DEFAULT_WINDOW,
            conn_send: Credit::new(DEFAULT_WINDOW),
            conn_recv: Credit::new(own_connection_window),
            table: HashMap::new(),
            parked: VecDeque::new(),
            parked_bytes: 0,
        }
    }

    pub(crate) fn on_peer_settings(&mut self, s: &Settings) {
        const MAX: u32 = (1 << 31) - 1;
        self.peer_stream_window = s.stream_window.unwrap_or(DEFAULT_WINDOW).min(MAX);
        self.conn_send = Credit::new(s.connection_window.unwrap_or(DEFAULT_WINDOW).min(MAX));
    }

    /// The window this side grants each stream.
    pub(crate) fn own_stream_window(&self) -> u32 {
        self.own_stream_window
    }

    /// The window the peer grants each stream.
    pub(crate) fn peer_stream_window(&self) -> u32 {
        self.peer_stream_window
    }

    pub(crate) fn open(
        &mut self,
        id: u64,
        key: crate::stream::StreamKey,
        messages: UnboundedSender<Chunk>,
        method: Method,
        now: Instant,
    ) {
        self.table.insert(
            id,
            Entry {
                key,
                messages: Some(messages),
                recv: Credit::new(self.own_stream_window),
                send: Credit::new(self.peer_stream_window),
                waiting: VecDeque::new(),
                moved: true,
                idle_scans: 0,
                seen: (0, 0),
                method,
                opened: now,
                blocked_since: None,
            },
        );
    }

    /// What each open stream is doing, lowest id first, at most `max` of them.
    pub(crate) fn inspect(&self, now: Instant, max: usize) -> StreamsView {
        let mut open: Vec<(&u64, &Entry)> = self.table.iter().collect();
        open.sort_unstable_by_key(|(id, _)| **id);
        let streams = open
            .into_iter()
            .take(max)
            .map(|(&id, e)| StreamInfo {
                id,
                method: e.method.clone(),
                age: now.saturating_duration_since(e.opened),
                sent: e.key.sent(),
                received: e.key.received(),
                waiting_bytes: e.waiting_bytes(),
                blocked_for: e.blocked_since.map(|t| now.saturating_duration_since(t)),
                send_credit: e.send.remaining(),
                recv_credit: e.recv.remaining(),
                peer_finished: e.messages.is_none(),
            })
            .collect();
        StreamsView {
            open: self.table.len(),
            streams,
            send_credit: self.conn_send.remaining(),
            recv_credit: self.conn_recv.remaining(),
        }
    }

    /// Streams open.
    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }

    /// Message bytes waiting for credit, on all streams.
    pub(crate) fn parked_bytes(&self) -> usize {
        self.parked_bytes
    }

    fn forget_waiting(&mut self, e: &Entry) {
        self.parked_bytes -= e.waiting_bytes();
    }

    /// True while stream `id` is open here.
    pub(crate) fn contains(&self, id: u64) -> bool {
        self.table.contains_key(&id)
    }

    /// Forgets a stream: what waited for credit is dropped (its permits released), its receiver
    /// sees the end of its messages.
    pub(crate) fn remove(&mut self, id: u64) -> bool {
        match self.table.remove(&id) {
            Some(e) => {
                self.forget_waiting(&e);
                e.key.close();
                true
            }
            None => false,
        }
    }

    /// One idle scan (the driver runs one every quarter of `stream_idle_timeout`): the streams
    /// on which nothing moved for `scans` scans in a row, with their keys. A message or a WINDOW
    /// either way, a message queued or taken by the application, or data waiting for credit,
    /// restarts a stream's count, so a stream is named
    /// between `scans` and `scans + 1` scan intervals after the last of them.
    pub(crate) fn scan_idle(&mut self, scans: u32) -> Vec<(u64, crate::stream::StreamKey)> {
        let mut idle = Vec::new();
        for (id, e) in &mut self.table {
            // Data waiting for credit is the stall timeout's to judge, not this.
            let counts = (e.key.sent(), e.key.received());
            let consumed = std::mem::replace(&mut e.seen, counts) != counts;
            if std::mem::take(&mut e.moved) || consumed || !e.waiting.is_empty() {
                e.idle_scans = 0;
            } else {
                e.idle_scans += 1;
                if e.idle_scans >= scans {
                    idle.push((*id, e.key.clone()));
                }
            }
        }
        idle
    }

    /// The key of stream `id`, while it is open.
    pub(crate) fn key(&self, id: u64) -> Option<crate::stream::StreamKey> {
        self.table.get(&id).map(|e| e.key.clone())
    }

    /// Forgets the streams above `last` (the peer's GOAWAY says it never started them).
    pub(crate) fn remove_above(&mut self, last: u64) -> usize {
        let before = self.table.len();
        let mut dropped = 0;
        self.table.retain(|id, e| {
            let keep = *id <= last;
            if !keep {
                dropped += e.waiting_bytes();
                e.key.close();
            }
            keep
        });
        self.parked_bytes -= dropped;
        before - self.table.len()
    }

    /// Forgets every stream (the connection closed); how many there were.
    pub(crate) fn clear(&mut self) -> usize {
        let n = self.table.len();
        for e in self.table.values() {
            e.key.close();
        }
        self.table.clear();
        self.parked.clear();
        self.parked_bytes = 0;
        n
    }

    /// A DATA frame from the peer. Returns connection credit to give back at once (for bytes
    /// nobody will consume), or the violation that closes the connection.
    pub(crate) fn on_data(
        &mut self,
        id: u64,
        end: bool,
        packed: bool,
        payload: Bytes,
    ) -> Result<Granted, ProtocolError> {
        let len = super::flow::cost(payload.len(), end);
        if !self.conn_recv.allows(len) {
            return Err(ProtocolError::FlowControl("DATA beyond the connection's window"));
        }
        self.conn_recv.spend(len);
        let mut back = len;
        let mut stream_back = None;
        if let Some(e) = self.table.get_mut(&id) {
            if let Some(tx) = &e.messages {
                if !e.recv.allows(len) {
                    return Err(ProtocolError::FlowControl("DATA beyond the stream's window"));
                }
                e.recv.spend(len);
                e.moved = true;
                // Delivered: its bytes come back when the application consumes them. An END alone
                // carries no message (an empty message is a DATA without END).
                if len == 0 || tx.send(Chunk { body: payload, packed }).is_ok() {
                    back = 0;
                } else if e.recv.grant(len as u32).is_ok() {
                    // Its receiver is gone (a handler that dropped its request stream): the
                    // stream's credit comes back too, so the peer's sender is not stalled by it.
                    stream_back = Some(len as u32);
                }
                if end {
                    e.messages = None;
                }
            }
        }
        let mut granted = Granted {
            connection: None,
            stream: stream_back,
        };
        if back > 0 {
            // Never consumed: given back now.
            let n = back as u32;
            let _ = self.conn_recv.grant(n);
            granted.connection = Some(n);
        }
        Ok(granted)
    }

    /// A WINDOW frame from the peer.
    pub(crate) fn on_window(&mut self, id: u64, n: u32) -> Result<(), ProtocolError> {
        let credit = if id == 0 {
            &mut self.conn_send
        } else {
            match self.table.get_mut(&id) {
                Some(e) => {
                    e.moved = true;
                    &mut e.send
                }
                None => return Ok(()), // ended meanwhile
            }
        };
        credit
            .grant(n)
            .map_err(|_| ProtocolError::FlowControl("WINDOW past 2^31 - 1"))
    }

    /// The application consumed bytes: the WINDOW frames that give them back, per stream (its
    /// batches) and for the connection (`connection` bytes).
    pub(crate) fn on_returned(&mut self, returned: Vec<(u64, u32)>, connection: u32) -> Vec<Frame> {
        let mut frames = Vec::new();
        for (id, n) in returned {
            if let Some(e) = self.table.get_mut(&id) {
                if e.messages.is_some() && e.recv.grant(n).is_ok() {
                    e.moved = true;
                    frames.push(Frame::Window { id, increment: n });
                }
            }
        }
        if connection > 0 && self.conn_recv.grant(connection).is_ok() {
            frames.push(Frame::Window {
                id: 0,
                increment: connection,
            });
        }
        frames
    }

    /// What this side wants to send on stream `id`: ready now, or parked behind the credit.
    /// `None` when it waits (or the stream is gone, and it is dropped).
    pub(crate) fn offer(&mut self, id: u64, w: Waiting, now: Instant) -> Option<Ready> {
        let e = self.table.get_mut(&id)?;
        if e.waiting.is_empty() {
            match w {
                Waiting::Data {
                    end,
                    packed,
                    payload,
                    permit,
                } => {
                    let len = super::flow::cost(payload.len(), end);
                    if e.send.allows(len) && self.conn_send.allows(len) {
                        e.send.spend(len);
                        self.conn_send.spend(len);
                        e.moved = true;
                        let frame = Frame::Data {
                            id,
                            end,
                            packed,
                            payload,
                        };
                        return Some(Ready::Data(frame, permit));
                    }
                    self.parked_bytes += payload.len();
                    e.blocked_since = Some(now);
                    e.waiting.push_back(Waiting::Data {
                        end,
                        packed,
                        payload,
                        permit,
                    });
                }
                Waiting::End(r) => {
                    if let Some(e) = self.table.remove(&id) {
                        e.key.close();
                    }
                    return Some(Ready::End(r));
                }
            }
        } else {
            if let Waiting::Data { payload, .. } = &w {
                self.parked_bytes += payload.len();
            }
            e.waiting.push_back(w);
        }
        if !self.parked.contains(&id) {
            self.parked.push_back(id);
        }
        None
    }

    /// The next waiting frame the credit now allows, taking the parked streams in turn.
    pub(crate) fn next_ready(&mut self, now: Instant) -> Option<Ready> {
        for _ in 0..self.parked.len() {
            let id = self.parked.pop_front()?;
            let Some(e) = self.table.get_mut(&id) else { continue };
            let ready = match e.waiting.front() {
                Some(Waiting::Data { payload, end, .. }) => {
                    let len = super::flow::cost(payload.len(), *end);
                    if e.send.allows(len) && self.conn_send.allows(len) {
                        e.send.spend(len);
                        self.conn_send.spend(len);
                        e.moved = true;
                        match e.waiting.pop_front() {
                            Some(Waiting::Data {
                                end,
                                packed,
                                payload,
                                permit,
                            }) => {
                                self.parked_bytes -= payload.len();
                                let frame = Frame::Data {
                                    id,
                                    end,
                                    packed,
                                    payload,
                                };
                                Some(Ready::Data(frame, permit))
                            }
                            _ => None,
                        }
                    } else {
                        None
                    }
                }
                Some(Waiting::End(_)) => match self.table.remove(&id) {
                    Some(mut e) => {
                        e.key.close();
                        match e.waiting.pop_front() {
                            Some(Waiting::End(r)) => return Some(Ready::End(r)),
                            _ => None,
                        }
                    }
                    None => None,
                },
                None => continue,
            };
            match self.table.get_mut(&id) {
                Some(e) if !e.waiting.is_empty() => {
                    // A frame went: what is left has waited since now, not since the first park
                    // (a slow consumer that still reads is not a stall).
                    if ready.is_some() {
                        e.blocked_since = Some(now);
                    }
                    self.parked.push_back(id);
                }
                Some(e) => e.blocked_since = None,
                None => {}
            }
            if ready.is_some() {
                return ready;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The messages of the bodies `pack` made, unpacked as a receiver does.
    fn unpack(frames: Vec<(bool, Bytes)>) -> Vec<Bytes> {
        let mut out = Vec::new();
        for (packed, mut body) in frames {
            if !packed {
                out.push(body);
                continue;
            }
            let n = crate::frame::packed_messages(&body).expect("a well-formed packed body");
            for _ in 0..n {
                let len = u32::from_be_bytes(body[..4].try_into().unwrap()) as usize;
                let mut m = body.split_to(4 + len);
                let _ = m.split_to(4);
                out.push(m);
            }
        }
        out
    }

    proptest! {
        /// Whatever the batch, packing loses, reorders and adds nothing; only small messages
        /// are packed, never one alone; and a packed body stays near its target.
        #[test]
        fn packing_keeps_every_message_in_order(sizes in proptest::collection::vec(
            prop_oneof![0usize..100, 100usize..5000, Just(PACK_MESSAGE_MAX), Just(PACK_MESSAGE_MAX + 1)], 0..120),
            max_body in prop_oneof![Just(64usize), 64usize..20_000, Just(4 << 20)]) {
            let msgs: Vec<Bytes> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| Bytes::from(vec![i as u8; n]))
                .collect();
            let frames: Vec<(bool, Bytes)> = pack(msgs.clone(), max_body).collect();
            for (packed, body) in &frames {
                if *packed {
                    let n = crate::frame::packed_messages(body).unwrap();
                    prop_assert!(n >= 2, "a packed body of one message");
                    prop_assert!(body.len() <= PACK_BODY_TARGET.min(max_body), "{} B packed", body.len());
                }
            }
            prop_assert_eq!(unpack(frames), msgs);
        }
    }

    #[test]
    fn a_stream_is_idle_after_the_scans_with_nothing_moved_and_a_message_restarts_the_count() {
        let mut s = Streams::new(None, None);
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        s.open(
            1,
            crate::stream::StreamKey::with_id(1),
            tx,
            Method::from_static("/t.T/S"),
            Instant::now(),
        );
        // Opening counts as movement: the first scan only clears it.
        for _ in 0..4 {
            assert!(s.scan_idle(4).is_empty());
        }
        assert_eq!(s.scan_idle(4).len(), 1);
        s.on_data(1, false, false, Bytes::from_static(b"x")).unwrap();
        for _ in 0..4 {
            assert!(s.scan_idle(4).is_empty());
        }
        assert_eq!(s.scan_idle(4)[0].0, 1);
    }

    fn data(n: usize) -> Waiting {
        Waiting::Data {
            end: false,
            packed: false,
            payload: Bytes::from(vec![7u8; n]),
            permit: None,
        }
    }

    #[test]
    fn a_look_tells_what_waits_for_credit_since_when_and_forgets_it_once_sent() {
        let mut s = Streams::new(Some(1000), None);
        s.on_peer_settings(&Settings {
            stream_window: Some(100),
            ..Settings::default()
        });
        let t0 = Instant::now();
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        s.open(
            3,
            crate::stream::StreamKey::with_id(3),
            tx,
            Method::from_static("/t.T/S"),
            t0,
        );
        let (tx, _rx2) = tokio::sync::mpsc::unbounded_channel();
        s.open(
            1,
            crate::stream::StreamKey::with_id(1),
            tx,
            Method::from_static("/t.T/B"),
            t0,
        );
        // 150 bytes go at once (the credit was positive), the next 40 wait.
        assert!(s.offer(3, data(150), t0).is_some());
        let t1 = t0 + Duration::from_secs(1);
        assert!(s.offer(3, data(40), t1).is_none());
        assert!(s.offer(3, data(10), t1 + Duration::from_secs(1)).is_none());
        s.on_data(1, true, false, Bytes::from_static(b"abc")).unwrap();

        let at = t0 + Duration::from_secs(5);
        let v = s.inspect(at, 10);
        assert_eq!(v.open, 2);
        assert_eq!(
            v.streams.iter().map(|i| i.id).collect::<Vec<_>>(),
            [1, 3],
            "lowest id first"
        );
        let (b, w) = (&v.streams[0], &v.streams[1]);
        assert_eq!(b.method.as_str(), "/t.T/B");
        assert!(b.peer_finished);
        assert_eq!(b.recv_credit, 1000 - 3);
        assert_eq!((b.waiting_bytes, b.blocked_for), (0, None));
        assert_eq!(w.age, Duration::from_secs(5));
        assert_eq!(w.waiting_bytes, 50);
        assert_eq!(
            w.blocked_for,
            Some(Duration::from_secs(4)),
            "since the first frame that waited"
        );
        assert_eq!(w.send_credit, 100 - 150);
        assert!(!w.peer_finished);
        assert_eq!(v.send_credit, i64::from(DEFAULT_WINDOW) - 150);
        assert_eq!(s.inspect(at, 1).streams.len(), 1, "at most max listed");

        // A little credit: one frame goes, the rest has waited since then, not since the first park.
        let later = at + Duration::from_secs(1);
        s.on_window(3, 100).unwrap();
        assert!(s.next_ready(later).is_some());
        let w = s.inspect(later + Duration::from_secs(2), 10).streams[1].clone();
        assert_eq!((w.waiting_bytes, w.blocked_for), (10, Some(Duration::from_secs(2))));

        // Credit comes: everything waiting goes, and the stream no longer counts as blocked.
        s.on_window(3, 1000).unwrap();
        while s.next_ready(at).is_some() {}
        let w = s.inspect(at, 10).streams[1].clone();
        assert_eq!((w.waiting_bytes, w.blocked_for), (0, None));
        assert_eq!(w.send_credit, 100 - 150 + 100 + 1000 - 50);
    }

    #[test]
    fn a_packed_body_must_be_whole_messages() {
        assert_eq!(crate::frame::packed_messages(b""), None);
        assert_eq!(crate::frame::packed_messages(b"\0\0\0"), None);
        assert_eq!(crate::frame::packed_messages(b"\0\0\0\x02a"), None);
        assert_eq!(crate::frame::packed_messages(b"\0\0\0\x01a\0\0\0\0"), Some(2));
    }
}
