//! Stream flow control as pure arithmetic: what a sender may send, what a receiver must refuse,
//! and when a receiver gives credit back. No I/O, no clock.
//!
//! The rule on the wire (PROTOCOL.md, *Streams*): a sender may send a DATA frame with a body
//! while its credit, for the stream and for the connection, is above zero, and the body's length
//! is then taken from both (so one message may overdraw: a message larger than the window still
//! goes, alone). Empty DATA frames (an END alone) need no credit. The receiver checks the same
//! rule in the order frames arrive; a peer that breaks it is closed. Credit comes back in WINDOW
//! frames as the application consumes messages, not as the driver buffers them, so what a slow
//! consumer's peer can make it hold is bounded by the window plus one message.

/// The credit a DATA frame with `len` body bytes costs: its length, and at least 1 for a frame
/// that carries a message (an empty message too, so a flood of them is flow controlled); an END
/// with no body costs nothing.
pub(crate) fn cost(len: usize, end: bool) -> usize {
    if len == 0 && end {
        0
    } else {
        len.max(1)
    }
}

/// Credit one side may still spend: the peer's grants minus what was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Credit(i64);

/// The largest credit a window may reach (a peer granting more is broken).
const MAX_CREDIT: i64 = (1 << 31) - 1;

/// A WINDOW would take the credit past 2^31 - 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Overflow;

impl Credit {
    pub(crate) fn new(initial: u32) -> Self {
        Credit(i64::from(initial))
    }

    /// True when a DATA frame with `len` body bytes may go now.
    pub(crate) fn allows(self, len: usize) -> bool {
        len == 0 || self.0 > 0
    }

    /// A DATA frame with `len` body bytes went.
    pub(crate) fn spend(&mut self, len: usize) {
        self.0 -= len as i64;
    }

    /// What may still be spent (negative once a frame went past it).
    pub(crate) fn remaining(self) -> i64 {
        self.0
    }

    /// The peer granted `n` more bytes.
    pub(crate) fn grant(&mut self, n: u32) -> Result<(), Overflow> {
        let next = self.0 + i64::from(n);
        if next > MAX_CREDIT {
            return Err(Overflow);
        }
        self.0 = next;
        Ok(())
    }
}

/// Consumed bytes not yet given back, batched: credit goes back once half the window is
/// consumed, so a steady stream costs one WINDOW per half window, not one per message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Returns {
    window: u32,
    consumed: u64,
}

impl Returns {
    pub(crate) fn new(window: u32) -> Self {
        Returns { window, consumed: 0 }
    }

    /// The application took `len` bytes; the credit to give back now, if any.
    pub(crate) fn on_consumed(&mut self, len: usize) -> Option<u32> {
        self.consumed += len as u64;
        (self.consumed >= u64::from(self.window / 2).max(1)).then(|| self.take())
    }

    /// Everything consumed and not yet given back (when the stream ends).
    pub(crate) fn take(&mut self) -> u32 {
        let n = u32::try_from(self.consumed).unwrap_or(u32::MAX);
        self.consumed -= u64::from(n);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn one_message_may_overdraw_and_then_nothing_goes_until_credit_comes() {
        let mut c = Credit::new(10);
        assert!(c.allows(64));
        c.spend(64);
        assert!(!c.allows(1));
        assert!(c.allows(0), "an END alone needs no credit");
        c.grant(54).unwrap();
        assert!(!c.allows(1), "back to zero: still nothing");
        c.grant(1).unwrap();
        assert!(c.allows(1000));
        assert_eq!(Credit::new(0).grant(u32::MAX), Err(Overflow));
    }

    #[test]
    fn credit_goes_back_at_half_the_window() {
        let mut r = Returns::new(100);
        assert_eq!(r.on_consumed(30), None);
        assert_eq!(r.on_consumed(30), Some(60));
        assert_eq!(r.on_consumed(10), None);
        assert_eq!(r.take(), 10);
        assert_eq!(r.take(), 0);
    }

    /// What happens on one stream: the sender sends what its credit allows, the wire delivers in
    /// order, the application consumes at any pace, and grants travel back in order.
    #[derive(Debug, Clone)]
    enum Step {
        /// The producer offers a message of this size.
        Offer(usize),
        /// The wire delivers the oldest frame in flight to the receiver.
        Deliver,
        /// The application consumes the oldest buffered message.
        Consume,
        /// The oldest grant in flight reaches the sender.
        Grant,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0usize..300).prop_map(Step::Offer),
            Just(Step::Deliver),
            Just(Step::Consume),
            Just(Step::Grant),
        ]
    }

    proptest! {
        /// A sender that follows `allows` never breaks the receiver's check, the receiver never
        /// holds more than its window plus one message, and nothing is lost or stuck: once the
        /// application consumes everything, all credit is back.
        #[test]
        fn a_conforming_sender_never_trips_the_receiver_and_memory_stays_bounded(
            window in 1u32..1000,
            steps in proptest::collection::vec(step(), 1..400),
        ) {
            const MAX_MESSAGE: usize = 299;
            let mut send = Credit::new(window);
            let mut recv = Credit::new(window); // what the receiver granted minus what arrived
            let mut returns = Returns::new(window);
            let mut wire: std::collections::VecDeque<usize> = Default::default();
            let mut buffered: std::collections::VecDeque<usize> = Default::default();
            let mut grants: std::collections::VecDeque<u32> = Default::default();
            let mut waiting: Option<usize> = None;
            for s in steps {
                match s {
                    Step::Offer(n) => {
                        if waiting.is_none() {
                            waiting = Some(n);
                        }
                    }
                    Step::Deliver => {
                        if let Some(n) = wire.pop_front() {
                            prop_assert!(recv.allows(n), "a conforming sender tripped the receiver");
                            recv.spend(n);
                            buffered.push_back(n);
                        }
                    }
                    Step::Consume => {
                        if let Some(n) = buffered.pop_front() {
                            if let Some(g) = returns.on_consumed(n) {
                                recv.grant(g).unwrap();
                                grants.push_back(g);
                            }
                        }
                    }
                    Step::Grant => {
                        if let Some(g) = grants.pop_front() {
                            send.grant(g).unwrap();
                        }
                    }
                }
                if let Some(n) = waiting {
                    if send.allows(n) {
                        send.spend(n);
                        wire.push_back(n);
                        waiting = None;
                    }
                }
                let held: usize = buffered.iter().sum::<usize>() + wire.iter().sum::<usize>();
                prop_assert!(held <= window as usize + MAX_MESSAGE, "holding {held} with window {window}");
            }
        }
    }
}
