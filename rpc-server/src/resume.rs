//! Resumable server streams on the server: the adapter generated code calls for a method marked
//! resumable, and [`ReplayLog`], a bounded in-memory log a topic can publish into and serve
//! resumes from.
//!
//! A resumable handler is told where its subscriber stands (`None` for a fresh subscription, or
//! the position of the last message the client delivered) and returns a stream of
//! [`Positioned`] items. The runtime checks that positions increase, prefixes each message with
//! its position for a resumable client (and strips them for a plain one), and ends the stream
//! at once, as a break the client resumes elsewhere, when the server starts draining.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::Stream;
use rpc_core::resume::{mark_break, Resume};
pub use rpc_core::resume::{Positioned, ResumeGap};
use rpc_core::{Request, Response, Status};
use tokio::sync::watch;
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::codegen::BoxStream;

/// What a resumable handler returns: its items, each a message at its position or a checkpoint.
pub type PositionedStream<R> = BoxStream<Positioned<R>>;

/// A resumable server-streaming method: reads the client's one message and where it resumes
/// from, runs `handler`, and sends its items.
pub async fn resumable_streaming<M, R, F, Fut>(request: Request<Bytes>, handler: F) -> Result<Response<Bytes>, Status>
where
    M: prost::Message + Default,
    R: prost::Message + 'static,
    F: FnOnce(Request<M>, Option<u64>) -> Fut,
    Fut: Future<Output = Result<Response<PositionedStream<R>>, Status>>,
{
    let resume = Resume::of(request.metadata()).inspect_err(|_| crate::entry::refuse())?;
    let request = crate::codegen::first_message::<M>(request).await?;
    crate::entry::mark();
    // A plain client is not told to resume elsewhere: its stream runs on within the grace. A
    // resumable one ends at once: here when next polled, and in `send_all` while it waits for
    // credit (when the handler ran on the request's own task, as it does without a layer that
    // moves it).
    let draining = crate::entry::server_tasks()
        .filter(|_| resume != Resume::Plain)
        .map(|t| Box::pin(t.draining.clone().cancelled_owned()));
    if resume != Resume::Plain {
        crate::entry::end_on_drain();
    }
    let response = handler(request, resume.after()).await?;
    let (metadata, items) = response.into_parts();
    let mut out = Response::streaming(Box::pin(Positioning {
        items,
        plain: resume == Resume::Plain,
        floor: resume.after(),
        last: None,
        draining,
        done: false,
    }));
    *out.metadata_mut() = metadata;
    Ok(out)
}

/// A handler's positioned items as the runtime sends them.
struct Positioning<R> {
    items: PositionedStream<R>,
    /// The client did not ask for positions: messages go as they are, checkpoints not at all.
    plain: bool,
    /// Where the client resumes after: messages at or below it are not sent again.
    floor: Option<u64>,
    /// The position of the last item sent.
    last: Option<u64>,
    /// Fires when the server starts a graceful shutdown.
    draining: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    done: bool,
}

impl<R: prost::Message> Positioning<R> {
    /// The body of `item`, or `None` for what a plain client is not sent.
    fn body(&mut self, item: Positioned<R>) -> Result<Option<Bytes>, Status> {
        let p = item.position();
        if matches!(item, Positioned::Message(..)) && self.floor.is_some_and(|f| p <= f) {
            return Ok(None); // the client has it
        }
        let in_order = match (&item, self.last) {
            (_, None) => true,
            (Positioned::Message(..), Some(last)) => p > last,
            (Positioned::Checkpoint(_), Some(last)) => p >= last,
        };
        if !in_order {
            return Err(Status::internal(format!(
                "a resumable stream's positions must increase: {p} after {}",
                self.last.unwrap_or_default()
            )));
        }
        self.last = Some(p);
        Ok(match (item, self.plain) {
            (Positioned::Checkpoint(_), true) => None,
            (Positioned::Message(_, m), true) => Some(Bytes::from(m.encode_to_vec())),
            (Positioned::Checkpoint(p), false) => Some(rpc_core::resume::encode(Positioned::Checkpoint(p))),
            (Positioned::Message(p, m), false) => {
                let mut b = BytesMut::with_capacity(9 + m.encoded_len());
                b.put_u8(0);
                b.put_u64(p);
                // Cannot fail: the capacity is there.
                let _ = m.encode(&mut b);
                Some(b.freeze())
            }
        })
    }
}

impl<R: prost::Message> Stream for Positioning<R> {
    type Item = Result<Bytes, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(d) = this.draining.as_mut() {
            if d.as_mut().poll(cx).is_ready() {
                this.done = true;
                let status = Status::unavailable("server draining: the stream resumes on another server");
                return Poll::Ready(Some(Err(mark_break(status, "shutdown"))));
            }
        }
        loop {
            match this.items.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(item))) => match this.body(item) {
                    Ok(Some(b)) => return Poll::Ready(Some(Ok(b))),
                    Ok(None) => continue,
                    Err(status) => {
                        this.done = true;
                        return Poll::Ready(Some(Err(status)));
                    }
                },
                Poll::Ready(Some(Err(status))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A bounded in-memory log of one topic's messages, at contiguous positions: publish into it,
/// and serve each subscription, fresh or resumed, from it with [`ReplayLog::subscribe`].
///
/// It keeps the last `capacity` messages. A resume after a position older than that gets
/// [`ResumeGap`] instead of a silent skip, and so does a subscriber so slow that the log dropped
/// messages it had not yet taken. Cloning it shares the log.
#[derive(Debug)]
pub struct ReplayLog<T> {
    inner: Arc<LogInner<T>>,
}

impl<T> Clone for ReplayLog<T> {
    fn clone(&self) -> Self {
        ReplayLog {
            inner: self.inner.clone(),
        }
    }
}

#[derive(Debug)]
struct LogInner<T> {
    state: Mutex<LogState<T>>,
    /// The last position published: what subscribers wait on.
    head: watch::Sender<u64>,
}

#[derive(Debug)]
struct LogState<T> {
    /// Contiguous positions, the oldest first.
    entries: VecDeque<T>,
    /// The position of `entries[0]` (the next one to publish, when empty).
    first: u64,
    capacity: usize,
}

impl<T> LogState<T> {
    fn head(&self) -> u64 {
        self.first + self.entries.len() as u64 - 1
    }
}

impl<T: Clone + Send + Sync + 'static> ReplayLog<T> {
    /// An empty log keeping the last `capacity` messages (at least 1); the first message
    /// published is at position 1.
    pub fn new(capacity: usize) -> Self {
        Self::starting_at(1, capacity)
    }

    /// An empty log whose first message is at position `first` (at least 1): a log that
    /// continues a topic's numbering, as a restarted server's must.
    pub fn starting_at(first: u64, capacity: usize) -> Self {
        let first = first.max(1);
        ReplayLog {
            inner: Arc::new(LogInner {
                state: Mutex::new(LogState {
                    entries: VecDeque::new(),
                    first,
                    capacity: capacity.max(1),
                }),
                head: watch::Sender::new(first - 1),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LogState<T>> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends `message` at the next position, which it returns.
    pub fn publish(&self, message: T) -> u64 {
        let p = {
            let mut s = self.state();
            if s.entries.len() == s.capacity {
                s.entries.pop_front();
                s.first += 1;
            }
            s.entries.push_back(message);
            s.head()
        };
        self.inner.head.send_replace(p);
        p
    }

    /// Appends `message` at `position`, for a log that replicates a topic numbered elsewhere.
    /// The next position (`head() + 1`) appends; a later one starts the log again there (the
    /// positions between were never published here: a resume into them gets [`ResumeGap`]); an
    /// earlier one is already in the log and is ignored (false).
    pub fn publish_at(&self, position: u64, message: T) -> bool {
        {
            let mut s = self.state();
            let next = s.first + s.entries.len() as u64;
            if position < next {
                return false;
            }
            if position > next {
                s.entries.clear();
                s.first = position;
            } else if s.entries.len() == s.capacity {
                s.entries.pop_front();
                s.first += 1;
            }
            s.entries.push_back(message);
        }
        self.inner.head.send_replace(position);
        true
    }

    /// The last position published (one before the first, before any).
    pub fn head(&self) -> u64 {
        self.state().head()
    }

    /// The oldest position still kept, if any is.
    pub fn oldest(&self) -> Option<u64> {
        let s = self.state();
        (!s.entries.is_empty()).then_some(s.first)
    }

    /// A subscription: `None` starts at the head (a checkpoint there, then every message
    /// published after it); `Some(p)` resumes after position `p` (the messages after it still
    /// kept, a checkpoint where the replay caught up, then every message published after). A
    /// resume older than what is kept is a [`ResumeGap`]; one past the head waits for it.
    pub fn subscribe(&self, after: Option<u64>) -> Result<Subscription<T>, ResumeGap> {
        let (head, first) = {
            let s = self.state();
            (s.head(), s.first)
        };
        let start = match after {
            None => head,
            Some(a) if a.saturating_add(1) < first => {
                return Err(ResumeGap {
                    from: a + 1,
                    to: first - 1,
                })
            }
            Some(a) => a,
        };
        let state = Cursor {
            log: self.clone(),
            next: start.saturating_add(1),
            // A fresh subscription's checkpoint goes first; a resume's once it has caught up.
            checkpoint: Some(start.max(head)),
            rx: self.inner.head.subscribe(),
            ended: false,
        };
        let items = futures_util::stream::unfold(state, |mut c| async move {
            let item = c.next_item().await?;
            Some((item, c))
        });
        Ok(Subscription { items: Box::pin(items) })
    }
}

/// Where one subscription stands in its log.
struct Cursor<T> {
    log: ReplayLog<T>,
    next: u64,
    /// The checkpoint still to send, once every message up to it has been.
    checkpoint: Option<u64>,
    rx: watch::Receiver<u64>,
    ended: bool,
}

impl<T: Clone + Send + Sync + 'static> Cursor<T> {
    async fn next_item(&mut self) -> Option<Result<Positioned<T>, ResumeGap>> {
        if self.ended {
            return None;
        }
        loop {
            if let Some(cp) = self.checkpoint.filter(|&cp| self.next > cp) {
                self.checkpoint = None;
                return Some(Ok(Positioned::Checkpoint(cp)));
            }
            // Seen before looking: a message published after this wakes the wait below.
            self.rx.borrow_and_update();
            {
                let s = self.log.state();
                if self.next < s.first {
                    // Dropped from the log before this subscriber took it.
                    self.ended = true;
                    return Some(Err(ResumeGap {
                        from: self.next,
                        to: s.first - 1,
                    }));
                }
                if let Some(m) = s.entries.get((self.next - s.first) as usize) {
                    let item = Positioned::Message(self.next, m.clone());
                    self.next += 1;
                    return Some(Ok(item));
                }
            }
            if self.rx.changed().await.is_err() {
                return None; // the log is gone
            }
        }
    }
}

/// One subscription to a [`ReplayLog`]: its items in order, ending with a [`ResumeGap`] if the
/// subscriber fell behind what the log keeps.
pub struct Subscription<T> {
    items: Pin<Box<dyn Stream<Item = Result<Positioned<T>, ResumeGap>> + Send>>,
}

impl<T> std::fmt::Debug for Subscription<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Subscription")
    }
}

impl<T> Stream for Subscription<T> {
    type Item = Result<Positioned<T>, ResumeGap>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.items.as_mut().poll_next(cx)
    }
}

impl<T: Send + 'static> Subscription<T> {
    /// The items as a resumable handler returns them (a gap as its OUT_OF_RANGE status).
    pub fn into_stream(self) -> PositionedStream<T> {
        use futures_util::StreamExt;
        Box::pin(self.map(|item| item.map_err(Status::from)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{FutureExt, StreamExt};
    use proptest::prelude::*;

    async fn take(sub: &mut Subscription<u64>, n: usize) -> Vec<Result<Positioned<u64>, ResumeGap>> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(sub.next().await.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn a_fresh_subscription_starts_at_the_head_with_a_checkpoint() {
        let log = ReplayLog::new(10);
        log.publish(1);
        log.publish(2);
        let mut sub = log.subscribe(None).unwrap();
        log.publish(3);
        assert_eq!(
            take(&mut sub, 2).await,
            vec![Ok(Positioned::Checkpoint(2)), Ok(Positioned::Message(3, 3))]
        );
    }

    #[tokio::test]
    async fn a_resume_replays_then_checkpoints_where_it_caught_up() {
        let log = ReplayLog::new(10);
        for m in 1..=5 {
            log.publish(m);
        }
        let mut sub = log.subscribe(Some(3)).unwrap();
        log.publish(6);
        assert_eq!(
            take(&mut sub, 4).await,
            vec![
                Ok(Positioned::Message(4, 4)),
                Ok(Positioned::Message(5, 5)),
                Ok(Positioned::Checkpoint(5)),
                Ok(Positioned::Message(6, 6)),
            ]
        );
    }

    #[tokio::test]
    async fn a_resume_older_than_the_log_is_a_gap_and_so_is_falling_behind() {
        let log = ReplayLog::new(3);
        for m in 1..=5 {
            log.publish(m);
        }
        assert_eq!(log.oldest(), Some(3));
        assert_eq!(log.subscribe(Some(1)).unwrap_err(), ResumeGap { from: 2, to: 2 });
        assert!(log.subscribe(Some(2)).is_ok());
        let mut slow = log.subscribe(Some(2)).unwrap();
        assert_eq!(take(&mut slow, 1).await, vec![Ok(Positioned::Message(3, 3))]);
        for m in 6..=9 {
            log.publish(m);
        }
        assert_eq!(take(&mut slow, 1).await, vec![Err(ResumeGap { from: 4, to: 6 })]);
        assert!(slow.next().await.is_none());
    }

    #[tokio::test]
    async fn publish_at_continues_or_starts_again_and_ignores_what_it_has() {
        let log = ReplayLog::starting_at(100, 10);
        assert_eq!(log.head(), 99);
        assert!(log.publish_at(100, 0));
        assert!(!log.publish_at(100, 0));
        assert!(log.publish_at(105, 5));
        assert_eq!(log.oldest(), Some(105));
        assert_eq!(log.subscribe(Some(100)).unwrap_err(), ResumeGap { from: 101, to: 104 });
        // A resume past the head waits for it.
        let mut ahead = log.subscribe(Some(106)).unwrap();
        log.publish_at(106, 6);
        log.publish_at(107, 7);
        assert_eq!(
            take(&mut ahead, 2).await,
            vec![Ok(Positioned::Checkpoint(106)), Ok(Positioned::Message(107, 7))]
        );
    }

    proptest! {
        /// Whatever is published and wherever a subscriber resumes, it sees every kept message
        /// after its position once, in order, or a gap naming exactly what it missed.
        #[test]
        fn a_subscription_misses_nothing_silently(capacity in 1usize..8, before in 0u64..20, after in 0u64..25, more in 0u64..20) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let log = ReplayLog::new(capacity);
                for m in 1..=before { log.publish(m); }
                let sub = log.subscribe(Some(after));
                let first_kept = before.saturating_sub(capacity as u64) + 1;
                if after + 1 < first_kept {
                    prop_assert_eq!(sub.unwrap_err(), ResumeGap { from: after + 1, to: first_kept - 1 });
                    return Ok(());
                }
                let mut sub = sub.unwrap();
                let mut expect = after + 1;
                let mut seen_checkpoint = false;
                for m in before..=before + more {
                    if m > before {
                        log.publish(m);
                    }
                    // Take what is there now, so the log never drops it first.
                    while let Some(Some(item)) = sub.next().now_or_never() {
                        match item {
                            Ok(Positioned::Message(p, v)) => { prop_assert_eq!(p, expect); prop_assert_eq!(v, p); expect += 1; }
                            Ok(Positioned::Checkpoint(p)) => { prop_assert!(!seen_checkpoint); prop_assert_eq!(p, after.max(before)); seen_checkpoint = true; }
                            Err(g) => prop_assert!(false, "gap {g:?}"),
                        }
                    }
                }
                prop_assert_eq!(expect, (after + 1).max(before + more + 1));
                Ok(())
            })?;
        }
    }
}
