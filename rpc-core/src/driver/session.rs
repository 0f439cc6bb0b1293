//! The session rules of one connection as a pure state machine, apart from the I/O pump: the
//! handshake, request ids, the calls waiting for an answer, what has been written, GOAWAY in both
//! directions and the last request id, the drain, and the outcome of every call when the
//! connection closes. As quinn-proto's `Connection`, it never touches a socket or a clock: the
//! driver feeds it events with `now` (bytes encoded and flushed, frames read, timers, a close) and
//! delivers what it returns. So every rule that decides a call's outcome is tested here without
//! sockets, including a property test over random interleavings.
//!
//! The waiters are generic (`R` for a call's response, `W` for a oneway's "written"), so the tests
//! use plain tags where the driver uses oneshot senders.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Duration;

use tokio::time::Instant;

use super::handle::ConnectionError;
use crate::error::{CloseReason, GoAwayReason, ProtocolError};
use crate::frame::{FrameKind, GoAway};

/// A caller waiting on the session; closed once the caller has given up (dropped its future).
pub(crate) trait Waiter {
    /// True when nobody waits for the answer any more.
    fn is_closed(&self) -> bool;
}

impl<T> Waiter for tokio::sync::oneshot::Sender<T> {
    fn is_closed(&self) -> bool {
        tokio::sync::oneshot::Sender::is_closed(self)
    }
}

/// Request ids are sequential; a Fibonacci multiply spreads them over the hash table's buckets and
/// control bytes. (No crate offers this tiny hasher without pulling in much more.)
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

struct Pending<R> {
    reply: R,
    /// Bytes encoded on this connection once this request was; it is written when `flushed`
    /// reaches this offset.
    end_offset: u64,
}

/// What the server does with a request it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Run it.
    Run,
    /// Above the last id our GOAWAY named: the client knows it did not run, so drop it.
    Ignore,
}

/// Every waiter's outcome when the session closes.
pub(crate) struct Closing<R, W> {
    pub(crate) calls: Vec<(R, ConnectionError)>,
    /// `Ok` for a oneway whose bytes were all written (not yet confirmed), else why not.
    pub(crate) oneways: Vec<(W, Result<(), ConnectionError>)>,
}

/// The session state of one connection.
pub(crate) struct Session<R, W> {
    handshake_done: bool,
    /// Client: the id the next request gets.
    next_id: u64,
    /// Server: the highest request id taken.
    last_request_id: u64,
    /// The last id our GOAWAY named, once sent.
    goaway_sent: Option<u64>,
    /// The reason of the drain this side started.
    drain_sent: Option<GoAwayReason>,
    /// The peer's GOAWAY (reason, last id), once received.
    goaway_received: Option<(GoAwayReason, u64)>,
    drain_deadline: Option<Instant>,
    pending: HashMap<u64, Pending<R>, BuildHasherDefault<IdHasher>>,
    /// Oneways encoded but not yet written, by the byte offset that completes each.
    unwritten: VecDeque<(u64, W)>,
    /// Bytes encoded into the write buffer since the connection started.
    encoded: u64,
    /// Bytes handed to the socket since the connection started.
    flushed: u64,
    closed: bool,
}

impl<R: Waiter, W> Session<R, W> {
    pub(crate) fn new() -> Self {
        Session {
            handshake_done: false,
            next_id: 1,
            last_request_id: 0,
            goaway_sent: None,
            drain_sent: None,
            goaway_received: None,
            drain_deadline: None,
            pending: HashMap::default(),
            unwritten: VecDeque::new(),
            encoded: 0,
            flushed: 0,
            closed: false,
        }
    }

    /// The peer's SETTINGS arrived.
    pub(crate) fn on_handshake(&mut self) {
        self.handshake_done = true;
    }

    pub(crate) fn handshake_done(&self) -> bool {
        self.handshake_done
    }

    /// GOAWAY sent or received: no new requests.
    pub(crate) fn is_draining(&self) -> bool {
        self.goaway_sent.is_some() || self.goaway_received.is_some()
    }

    /// This side sent GOAWAY.
    pub(crate) fn goaway_sent(&self) -> bool {
        self.goaway_sent.is_some()
    }

    /// The peer sent GOAWAY.
    pub(crate) fn goaway_received(&self) -> bool {
        self.goaway_received.is_some()
    }

    /// `n` bytes of frames were encoded into the write buffer.
    pub(crate) fn on_encoded(&mut self, n: usize) {
        self.encoded += n as u64;
    }

    /// `n` bytes were handed to the socket.
    pub(crate) fn on_flushed(&mut self, n: usize) {
        self.flushed += n as u64;
    }

    /// A oneway whose frame has now been written completely, if any (call until `None`).
    pub(crate) fn pop_written(&mut self) -> Option<W> {
        match self.unwritten.front() {
            Some((end, _)) if *end <= self.flushed => self.unwritten.pop_front().map(|(_, w)| w),
            _ => None,
        }
    }

    /// Client: may a request with `deadline` be sent now? Returns its id and the time left to
    /// put on the wire, or why not (all "not executed": nothing is written).
    pub(crate) fn admit(
        &self,
        now: Instant,
        deadline: Option<Instant>,
    ) -> Result<(u64, Option<Duration>), ConnectionError> {
        if let Some((reason, last_request_id)) = self.goaway_received {
            return Err(ConnectionError::GoAway {
                reason,
                last_request_id,
            });
        }
        if self.goaway_sent.is_some() || !self.handshake_done || self.closed {
            return Err(ConnectionError::Draining);
        }
        let timeout = match deadline {
            Some(d) if d <= now => return Err(ConnectionError::Expired),
            Some(d) => Some(d - now),
            None => None,
        };
        Ok((self.next_id, timeout))
    }

    /// Client: the request admitted as `id` has been encoded (after its bytes were counted with
    /// [`Session::on_encoded`]); its caller waits for the response.
    pub(crate) fn on_request_sent(&mut self, id: u64, reply: R) {
        self.next_id = id + 1;
        let end_offset = self.encoded;
        self.pending.insert(id, Pending { reply, end_offset });
    }

    /// Client: the oneway admitted as `id` has been encoded; its caller waits for it to be written.
    pub(crate) fn on_oneway_sent(&mut self, id: u64, written: W) {
        self.next_id = id + 1;
        self.unwritten.push_back((self.encoded, written));
    }

    /// Client: a response arrived; its caller, if still pending.
    pub(crate) fn on_response(&mut self, id: u64) -> Option<R> {
        self.pending.remove(&id).map(|p| p.reply)
    }

    /// Calls waiting for a response.
    pub(crate) fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Forgets calls whose callers gave up; returns their ids (whose requests were written, so
    /// the peer may be running them). A response that arrives for one later is discarded
    /// ([`Session::on_response`] returns `None`).
    pub(crate) fn sweep_cancelled(&mut self) -> Vec<(u64, bool)> {
        let flushed = self.flushed;
        let mut gone = Vec::new();
        self.pending.retain(|id, p| {
            let keep = !p.reply.is_closed();
            if !keep {
                gone.push((*id, p.end_offset <= flushed));
            }
            keep
        });
        gone
    }

    /// The last request id the peer's GOAWAYs named (the lowest), if it sent one.
    pub(crate) fn goaway_last_id(&self) -> Option<u64> {
        self.goaway_received.map(|(_, last)| last)
    }

    /// Forgets call `id` (this side reset it); whether its request reached the socket.
    pub(crate) fn forget(&mut self, id: u64) -> Option<bool> {
        let p = self.pending.remove(&id)?;
        Some(p.end_offset <= self.flushed)
    }

    /// Server: a request (or oneway) with `id` was read.
    pub(crate) fn on_request(&mut self, kind: FrameKind, id: u64) -> Result<Admission, ProtocolError> {
        if id <= self.last_request_id {
            return Err(ProtocolError::Malformed {
                kind,
                what: "request id not increasing",
            });
        }
        if self.goaway_sent.is_some_and(|last| id > last) {
            // Above the id our GOAWAY named: the client knows it was not run and retries it.
            return Ok(Admission::Ignore);
        }
        self.last_request_id = id;
        Ok(Admission::Run)
    }

    /// The peer's GOAWAY: returns the calls it proves were not run (ids above its last), which
    /// fail now so their callers can retry; the rest finish or fail at the close. True in the
    /// second value when the connection starts draining because of it.
    pub(crate) fn on_goaway(
        &mut self,
        now: Instant,
        g: &GoAway,
        drain_timeout: Duration,
    ) -> (Vec<(R, ConnectionError)>, bool) {
        let newly = !self.is_draining();
        // A repeated GOAWAY may lower the last id, never raise it: what one GOAWAY proved not
        // run (and its callers were told) stays not run.
        let last = match self.goaway_received {
            Some((_, earlier)) => earlier.min(g.last_request_id),
            None => g.last_request_id,
        };
        self.goaway_received = Some((g.reason, last));
        self.drain_deadline.get_or_insert(now + drain_timeout);
        let not_run: Vec<u64> = self.pending.keys().copied().filter(|id| *id > last).collect();
        let failed = not_run
            .into_iter()
            .filter_map(|id| self.pending.remove(&id))
            .map(|p| {
                let e = ConnectionError::GoAway {
                    reason: g.reason,
                    last_request_id: last,
                };
                (p.reply, e)
            })
            .collect();
        (failed, newly)
    }

    /// Starts a graceful drain: the GOAWAY to send (once), naming the last request taken.
    pub(crate) fn start_drain(
        &mut self,
        now: Instant,
        reason: GoAwayReason,
        drain_timeout: Duration,
    ) -> Option<GoAway> {
        if self.goaway_sent.is_some() {
            return None;
        }
        let last = self.last_request_id;
        self.goaway_sent = Some(last);
        self.drain_sent = Some(reason);
        self.drain_deadline.get_or_insert(now + drain_timeout);
        Some(GoAway {
            reason,
            last_request_id: last,
            message: String::new(),
        })
    }

    /// The GOAWAY to send when closing for `reason`, if one is owed and not yet sent.
    pub(crate) fn goaway_for_close(&mut self, reason: &CloseReason) -> Option<GoAway> {
        if self.goaway_sent.is_some() {
            return None;
        }
        let g = reason.goaway_reason()?;
        self.goaway_sent = Some(self.last_request_id);
        Some(GoAway {
            reason: g,
            last_request_id: self.last_request_id,
            message: reason.to_string(),
        })
    }

    /// When a drain must end even with work left.
    pub(crate) fn drain_deadline(&self) -> Option<Instant> {
        self.drain_deadline
    }

    /// Draining and nothing is waiting on this session any more.
    pub(crate) fn drained(&self) -> bool {
        self.is_draining() && self.pending.is_empty() && self.unwritten.is_empty()
    }

    /// Why a drained (or drain-timed-out) connection closes.
    pub(crate) fn drain_reason(&self) -> CloseReason {
        match self.goaway_received {
            Some((reason, last_request_id)) => CloseReason::GoAway {
                reason,
                last_request_id,
            },
            None if self.drain_sent == Some(GoAwayReason::Idle) => CloseReason::IdleTimeout,
            None => CloseReason::Shutdown,
        }
    }

    /// Why the connection ended when the peer closed its side (EOF).
    pub(crate) fn peer_closed_reason(&self) -> CloseReason {
        match self.goaway_received {
            Some((reason, last_request_id)) => CloseReason::GoAway {
                reason,
                last_request_id,
            },
            None => CloseReason::PeerClosed,
        }
    }

    /// Closes the session for `reason`: every waiter's outcome, with what is known of it. A call
    /// above the peer's GOAWAY id did not run; one whose bytes were all written may have run; one
    /// not completely written cannot have (the peer never decodes half a frame). `None` if it
    /// was closed already.
    pub(crate) fn close(&mut self, reason: &CloseReason) -> Option<Closing<R, W>> {
        if std::mem::replace(&mut self.closed, true) {
            return None;
        }
        let flushed = self.flushed;
        let peer_last = self.goaway_received;
        let calls = self
            .pending
            .drain()
            .map(|(id, p)| {
                let err = match peer_last {
                    Some((r, last)) if id > last => ConnectionError::GoAway {
                        reason: r,
                        last_request_id: last,
                    },
                    _ if flushed >= p.end_offset => ConnectionError::ClosedAfterWrite(reason.clone()),
                    _ => ConnectionError::NotWritten(reason.clone()),
                };
                (p.reply, err)
            })
            .collect();
        let oneways = self
            .unwritten
            .drain(..)
            .map(|(end, w)| {
                let outcome = if flushed >= end {
                    Ok(())
                } else {
                    Err(ConnectionError::NotWritten(reason.clone()))
                };
                (w, outcome)
            })
            .collect();
        Some(Closing { calls, oneways })
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::collections::HashMap;
    use std::rc::Rc;

    use proptest::prelude::*;

    use super::*;

    /// A caller in the tests: a tag, and whether it gave up.
    #[derive(Debug, Clone)]
    struct Caller {
        tag: usize,
        gone: Rc<Cell<bool>>,
    }

    impl Waiter for Caller {
        fn is_closed(&self) -> bool {
            self.gone.get()
        }
    }

    type S = Session<Caller, usize>;

    fn client() -> S {
        let mut s = S::new();
        s.on_handshake();
        s
    }

    #[test]
    fn a_request_cut_mid_write_did_not_run_and_one_written_may_have() {
        let now = Instant::now();
        let mut s = client();
        let (id1, _) = s.admit(now, None).unwrap();
        s.on_encoded(100);
        s.on_request_sent(id1, caller(1));
        let (id2, _) = s.admit(now, None).unwrap();
        s.on_encoded(100);
        s.on_request_sent(id2, caller(2));
        s.on_flushed(150);
        let closing = s.close(&CloseReason::Reset).unwrap();
        let mut out: Vec<(usize, bool)> = closing
            .calls
            .into_iter()
            .map(|(c, e)| (c.tag, e.may_have_executed()))
            .collect();
        out.sort();
        assert_eq!(out, vec![(1, true), (2, false)]);
        assert!(s.close(&CloseReason::Reset).is_none(), "closed once");
    }

    #[test]
    fn the_peers_goaway_fails_at_once_only_what_it_proves_unrun() {
        let now = Instant::now();
        let mut s = client();
        for tag in 1..=3 {
            let (id, _) = s.admit(now, None).unwrap();
            s.on_encoded(10);
            s.on_request_sent(id, caller(tag));
        }
        s.on_flushed(30);
        let g = GoAway {
            reason: GoAwayReason::Shutdown,
            last_request_id: 2,
            message: String::new(),
        };
        let (failed, newly) = s.on_goaway(now, &g, Duration::from_secs(1));
        assert!(newly);
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].0.tag, 3);
        assert!(!failed[0].1.may_have_executed());
        assert!(matches!(s.admit(now, None), Err(ConnectionError::GoAway { .. })));
        assert!(s.on_response(1).is_some());
        assert!(!s.drained());
        assert!(s.on_response(2).is_some());
        assert!(s.drained());
        assert_eq!(
            s.drain_reason(),
            CloseReason::GoAway {
                reason: GoAwayReason::Shutdown,
                last_request_id: 2
            }
        );
    }

    #[test]
    fn a_repeated_goaway_may_lower_the_last_id_but_never_raise_it() {
        let now = Instant::now();
        let mut s = client();
        for tag in 1..=4 {
            let (id, _) = s.admit(now, None).unwrap();
            s.on_encoded(10);
            s.on_request_sent(id, caller(tag));
        }
        s.on_flushed(40);
        let goaway = |last| GoAway {
            reason: GoAwayReason::Shutdown,
            last_request_id: last,
            message: String::new(),
        };
        let (failed, _) = s.on_goaway(now, &goaway(3), Duration::from_secs(1));
        assert_eq!(failed.iter().map(|f| f.0.tag).collect::<Vec<_>>(), [4]);
        // Raising it changes nothing; lowering it fails what the new id proves unrun.
        let (failed, newly) = s.on_goaway(now, &goaway(9), Duration::from_secs(1));
        assert!(failed.is_empty() && !newly);
        let (failed, _) = s.on_goaway(now, &goaway(1), Duration::from_secs(1));
        let mut tags: Vec<_> = failed.iter().map(|f| f.0.tag).collect();
        tags.sort();
        assert_eq!(tags, [2, 3]);
        assert!(failed.iter().all(|f| !f.1.may_have_executed()));
        assert_eq!(
            s.drain_reason(),
            CloseReason::GoAway {
                reason: GoAwayReason::Shutdown,
                last_request_id: 1
            }
        );
    }

    #[test]
    fn a_server_ignores_requests_above_its_goaway_and_rejects_ids_that_do_not_increase() {
        let now = Instant::now();
        let mut s = S::new();
        s.on_handshake();
        assert_eq!(s.on_request(FrameKind::Request, 1), Ok(Admission::Run));
        assert_eq!(s.on_request(FrameKind::Request, 5), Ok(Admission::Run));
        assert!(s.on_request(FrameKind::Request, 5).is_err());
        let g = s.start_drain(now, GoAwayReason::Idle, Duration::from_secs(1)).unwrap();
        assert_eq!(g.last_request_id, 5);
        assert!(s
            .start_drain(now, GoAwayReason::Shutdown, Duration::from_secs(1))
            .is_none());
        assert_eq!(s.on_request(FrameKind::Request, 6), Ok(Admission::Ignore));
        assert_eq!(s.drain_reason(), CloseReason::IdleTimeout);
    }

    #[test]
    fn cancelled_calls_are_swept_and_their_late_responses_discarded() {
        let now = Instant::now();
        let mut s = client();
        let c = caller(1);
        let (id, _) = s.admit(now, None).unwrap();
        s.on_encoded(10);
        s.on_request_sent(id, c.clone());
        c.gone.set(true);
        s.on_flushed(10);
        assert_eq!(s.sweep_cancelled(), vec![(id, true)]);
        assert_eq!(s.pending(), 0);
        assert!(s.on_response(id).is_none());
    }

    fn caller(tag: usize) -> Caller {
        Caller {
            tag,
            gone: Rc::new(Cell::new(false)),
        }
    }

    /// One step of a random session, as the driver would feed it.
    #[derive(Debug, Clone)]
    enum Op {
        /// A caller sends a request (or a oneway) of `len` bytes, with a deadline `ms` ahead.
        Send { oneway: bool, len: u8, expired: bool },
        /// The socket takes `n` bytes.
        Flush(u16),
        /// The peer answers the `k`-th oldest pending request (if it was written).
        Respond(u8),
        /// The peer sends GOAWAY naming the `k`-th written id (or 0).
        GoAway(u8),
        /// The `k`-th caller gives up.
        Cancel(u8),
        /// The connection closes.
        Close,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (any::<bool>(), 1u8..200, prop::bool::weighted(0.1))
                .prop_map(|(oneway, len, expired)| Op::Send { oneway, len, expired }),
            4 => (1u16..600).prop_map(Op::Flush),
            3 => any::<u8>().prop_map(Op::Respond),
            1 => any::<u8>().prop_map(Op::GoAway),
            1 => any::<u8>().prop_map(Op::Cancel),
            1 => Just(Op::Close),
        ]
    }

    /// What the test knows independently of the session, per caller.
    #[derive(Debug, Default)]
    struct Truth {
        id: u64,
        end: u64,
        oneway: bool,
        outcomes: u32,
        /// The peer processed it (answered it).
        answered: bool,
        ok: bool,
        cancelled: bool,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Each call gets exactly one outcome; "not executed" only when proven: its frame was not
        /// completely written, or the peer's GOAWAY named a lower id; and never for a call the
        /// peer answered.
        #[test]
        fn every_call_has_one_outcome_and_not_executed_is_never_a_lie(ops in prop::collection::vec(op(), 1..80)) {
            let now = Instant::now();
            let mut s = client();
            let mut truth: Vec<Truth> = Vec::new();
            let mut callers: Vec<Caller> = Vec::new();
            let mut peer_last: Option<u64> = None;
            let mut encoded = 0u64;
            let mut flushed = 0u64;
            let mut closed = false;
            let record = |truth: &mut Vec<Truth>, tag: usize, result: Result<(), ConnectionError>, peer_last: Option<u64>, flushed: u64| {
                let t = &mut truth[tag];
                t.outcomes += 1;
                match result {
                    Ok(()) => {
                        prop_assert!(flushed >= t.end && t.id != 0, "Ok before written: {t:?}");
                        t.ok = true
                    }
                    Err(e) if !e.may_have_executed() => {
                        let unwritten = flushed < t.end || t.id == 0;
                        let above_goaway = peer_last.is_some_and(|l| t.id > l);
                        prop_assert!(unwritten || above_goaway, "not executed without proof: {e:?} {t:?}");
                        prop_assert!(!t.answered, "answered yet reported not executed");
                    }
                    Err(_) => {}
                }
                Ok(())
            };
            for op in ops {
                match op {
                    Op::Send { oneway, len, expired } => {
                        let tag = truth.len();
                        truth.push(Truth { oneway, ..Truth::default() });
                        let c = caller(tag);
                        callers.push(c.clone());
                        let deadline = if expired { now } else { now + Duration::from_secs(1) };
                        match s.admit(now, Some(deadline)) {
                            Ok((id, _)) => {
                                encoded += u64::from(len);
                                s.on_encoded(len as usize);
                                truth[tag].id = id;
                                truth[tag].end = encoded;
                                if oneway { s.on_oneway_sent(id, tag) } else { s.on_request_sent(id, c) }
                            }
                            Err(e) => record(&mut truth, tag, Err(e), peer_last, flushed)?,
                        }
                    }
                    Op::Flush(n) => {
                        let n = u64::from(n).min(encoded - flushed);
                        flushed += n;
                        s.on_flushed(n as usize);
                        while let Some(tag) = s.pop_written() {
                            prop_assert!(truth[tag].end <= flushed);
                            record(&mut truth, tag, Ok(()), peer_last, flushed)?;
                        }
                    }
                    Op::Respond(k) => {
                        // A well-behaved peer answers only what it read and processed.
                        let candidates: Vec<usize> = (0..truth.len())
                            .filter(|&i| !truth[i].oneway && truth[i].id != 0 && truth[i].end <= flushed
                                && !truth[i].answered && peer_last.is_none_or(|l| truth[i].id <= l))
                            .collect();
                        if candidates.is_empty() || closed { continue; }
                        let i = candidates[k as usize % candidates.len()];
                        truth[i].answered = true;
                        if let Some(c) = s.on_response(truth[i].id) {
                            record(&mut truth, c.tag, Ok(()), peer_last, flushed)?;
                        }
                    }
                    Op::GoAway(k) => {
                        if closed || peer_last.is_some() { continue; }
                        // The peer names an id it has read, at least as high as any it answered.
                        let answered_max = truth.iter().filter(|t| t.answered).map(|t| t.id).max().unwrap_or(0);
                        let written: Vec<u64> = truth.iter().filter(|t| t.id != 0 && t.end <= flushed && t.id >= answered_max).map(|t| t.id).collect();
                        let last = if written.is_empty() { answered_max } else { written[k as usize % written.len()] };
                        peer_last = Some(last);
                        let g = GoAway { reason: GoAwayReason::Shutdown, last_request_id: last, message: String::new() };
                        let (failed, _) = s.on_goaway(now, &g, Duration::from_secs(1));
                        for (c, e) in failed {
                            record(&mut truth, c.tag, Err(e), peer_last, flushed)?;
                        }
                    }
                    Op::Cancel(k) => {
                        if callers.is_empty() { continue; }
                        let i = k as usize % callers.len();
                        callers[i].gone.set(true);
                        truth[i].cancelled = true;
                        s.sweep_cancelled();
                    }
                    Op::Close => {
                        closed = true;
                        if let Some(closing) = s.close(&CloseReason::Reset) {
                            for (c, e) in closing.calls { record(&mut truth, c.tag, Err(e), peer_last, flushed)?; }
                            for (tag, r) in closing.oneways { record(&mut truth, tag, r, peer_last, flushed)?; }
                        }
                    }
                }
            }
            if let Some(closing) = s.close(&CloseReason::Reset) {
                for (c, e) in closing.calls { record(&mut truth, c.tag, Err(e), peer_last, flushed)?; }
                for (tag, r) in closing.oneways { record(&mut truth, tag, r, peer_last, flushed)?; }
            }
            let by_outcomes: HashMap<u32, usize> = truth.iter().fold(HashMap::new(), |mut m, t| {
                *m.entry(t.outcomes).or_default() += 1;
                m
            });
            for (i, t) in truth.iter().enumerate() {
                // A cancelled caller may be forgotten (nobody listens), never answered twice.
                if t.cancelled && !t.oneway {
                    prop_assert!(t.outcomes <= 1, "caller {i} answered {} times", t.outcomes);
                } else {
                    prop_assert_eq!(t.outcomes, 1, "caller {} ({:?}); outcome counts {:?}", i, t, by_outcomes);
                }
            }
        }
    }
}
