//! The outbound queue from callers and handlers to a connection's I/O task.
//!
//! Bounded twice, in frames (`outbound_queue`) and in bytes (`max_outbound_bytes`), by two
//! semaphores that senders wait on; the driver gives the permits back once it has encoded a frame
//! (its write buffer has a bound of its own). The queue itself is a `VecDeque` under a mutex that
//! starts with no allocation and can be released when the connection falls quiet, so an idle
//! connection holds no queue memory. The driver takes everything queued in one lock, and is woken
//! once per batch: a sender wakes it only if it is waiting on an empty queue.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::sync::Semaphore;

use super::handle::Outbound;

/// A message on its way to the I/O task with the permits it holds.
#[derive(Debug)]
pub(crate) struct Queued {
    pub(crate) msg: Outbound,
    /// Frame permits held (0 for a message queued without waiting).
    frames: u32,
    /// Byte permits held.
    bytes: u32,
}

#[derive(Debug)]
struct State {
    items: VecDeque<Queued>,
    /// The driver, waiting for the queue to become non-empty.
    waiting: Option<Waker>,
    /// A [`QueueWaker`] fired while the driver was not waiting (it was mid-pass): its next wait
    /// must not sleep, or the wake-up (a swept call, stream credit to give back) would be lost.
    woken: bool,
    /// The driver has closed the queue: nothing more is taken.
    closed: bool,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    /// Live senders. Atomic, not in `State`: a sender is cloned and dropped for every request a
    /// server answers, and only the last drop needs the lock (to wake the driver).
    senders: AtomicUsize,
    frames: Semaphore,
    bytes: Semaphore,
    max_bytes: usize,
    /// Woken when permits come back, for [`Room`] pollers; only while some wait (`room_waiters`),
    /// so the driver's hot path pays an atomic load, not a lock.
    room: Arc<tokio::sync::Notify>,
    room_waiters: AtomicUsize,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `q`, or gives it back if the driver has closed the queue.
    fn push(&self, q: Queued) -> Option<Queued> {
        let waiting = {
            let mut s = self.lock();
            if s.closed {
                return Some(q);
            }
            s.items.push_back(q);
            s.waiting.take()
        };
        if let Some(w) = waiting {
            w.wake();
        }
        None
    }
}

/// Waits for room in a connection's outbound queue without taking any (what
/// `tower::Service::poll_ready` over a client reports): room is a free frame slot and an eighth
/// of the byte budget (at most 64 KiB) free. Holds no permit while it waits. Send, Sync and
/// 'static.
pub struct Room {
    inner: Arc<Inner>,
    wait: Option<Pin<Box<tokio::sync::futures::OwnedNotified>>>,
}

impl std::fmt::Debug for Room {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Room").field("waiting", &self.wait.is_some()).finish()
    }
}

impl Inner {
    fn has_room(&self) -> bool {
        self.frames.available_permits() > 0
            && self.bytes.available_permits() >= (self.max_bytes / 8).clamp(1, 64 * 1024)
    }

    /// Permits came back (or the queue closed): wake the [`Room`] pollers, if any wait.
    fn room_freed(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.room_waiters.load(Ordering::Relaxed) > 0 {
            self.room.notify_waiters();
        }
    }
}

impl Room {
    /// Ready once there is room, or the connection is gone (a request then fails at once).
    pub fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.inner.has_room() || self.inner.frames.is_closed() {
                self.stop_waiting();
                return Poll::Ready(());
            }
            match self.wait.as_mut() {
                None => {
                    // Counted and registered before the check above runs again, so permits given
                    // back in between are seen by that check or wake this wait.
                    self.inner.room_waiters.fetch_add(1, Ordering::SeqCst);
                    let mut wait = Box::pin(self.inner.room.clone().notified_owned());
                    wait.as_mut().enable();
                    std::sync::atomic::fence(Ordering::SeqCst);
                    self.wait = Some(wait);
                }
                Some(wait) => match wait.as_mut().poll(cx) {
                    Poll::Ready(()) => self.stop_waiting(),
                    Poll::Pending => return Poll::Pending,
                },
            }
        }
    }

    fn stop_waiting(&mut self) {
        if self.wait.take().is_some() {
            self.inner.room_waiters.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        self.stop_waiting();
    }
}

/// The sending side: cheap to clone, held by every handle and responder of the connection.
#[derive(Debug)]
pub(crate) struct OutboundSender {
    inner: Arc<Inner>,
}

/// The I/O task's side. Dropping it closes the queue: waiting and later senders get their
/// message back.
#[derive(Debug)]
pub(crate) struct OutboundReceiver {
    inner: Arc<Inner>,
    /// Taken from the shared queue in one lock, drained from here.
    taken: VecDeque<Queued>,
}

/// A queue bounded to `max_frames` frames and `max_bytes` payload bytes.
pub(crate) fn outbound_queue(max_frames: usize, max_bytes: usize) -> (OutboundSender, OutboundReceiver) {
    let max_bytes = max_bytes.min(Semaphore::MAX_PERMITS);
    let inner = Arc::new(Inner {
        state: Mutex::new(State {
            items: VecDeque::new(),
            waiting: None,
            woken: false,
            closed: false,
        }),
        senders: AtomicUsize::new(1),
        frames: Semaphore::new(max_frames.min(Semaphore::MAX_PERMITS)),
        bytes: Semaphore::new(max_bytes),
        max_bytes,
        room: Arc::new(tokio::sync::Notify::new()),
        room_waiters: AtomicUsize::new(0),
    });
    (
        OutboundSender { inner: inner.clone() },
        OutboundReceiver {
            inner,
            taken: VecDeque::new(),
        },
    )
}

impl Clone for OutboundSender {
    fn clone(&self) -> Self {
        self.inner.senders.fetch_add(1, Ordering::Relaxed);
        OutboundSender {
            inner: self.inner.clone(),
        }
    }
}

impl Drop for OutboundSender {
    fn drop(&mut self) {
        if self.inner.senders.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        // The last sender is gone: the driver learns it on its next pull. Taking the waker under
        // the lock orders this after any pull that saw a sender still alive and registered.
        let waiting = self.inner.lock().waiting.take();
        if let Some(w) = waiting {
            w.wake();
        }
    }
}

/// Wakes the driver if it waits on its queue, without being a sender (it keeps no queue open).
#[derive(Debug, Clone)]
pub(crate) struct QueueWaker(Arc<Inner>);

impl QueueWaker {
    pub(crate) fn wake(&self) {
        let waiting = {
            let mut s = self.0.lock();
            let w = s.waiting.take();
            if w.is_none() {
                s.woken = true;
            }
            w
        };
        if let Some(w) = waiting {
            w.wake();
        }
    }
}

impl OutboundSender {
    /// A waker for the driver that does not keep the queue open.
    pub(crate) fn waker(&self) -> QueueWaker {
        QueueWaker(self.inner.clone())
    }

    /// Waits for a frame slot and byte budget, then queues `msg`. Fails if the connection is gone.
    pub(crate) async fn send(&self, msg: Outbound) -> Result<(), Outbound> {
        let bytes = msg.payload_len().min(self.inner.max_bytes) as u32;
        let Ok(frame) = self.inner.frames.acquire().await else {
            return Err(msg);
        };
        let budget = if bytes == 0 {
            None
        } else {
            match self.inner.bytes.acquire_many(bytes).await {
                Ok(p) => Some(p),
                Err(_) => return Err(msg),
            }
        };
        // The driver gives the permits back when it has encoded the frame.
        frame.forget();
        if let Some(p) = budget {
            p.forget();
        }
        match self.inner.push(Queued { msg, frames: 1, bytes }) {
            Some(rejected) => Err(rejected.msg),
            None => Ok(()),
        }
    }

    /// Queues a small message without waiting or taking permits (the answer of a handler that
    /// panicked; its request already holds a place in the connection's request limit).
    pub(crate) fn try_send(&self, msg: Outbound) {
        let _ = self.inner.push(Queued {
            msg,
            frames: 0,
            bytes: 0,
        });
    }

    /// Whether there is room for a request now (see [`Room`]).
    pub(crate) fn has_room(&self) -> bool {
        self.inner.has_room()
    }

    /// A poller that is ready once there is room (or the queue closed).
    pub(crate) fn room(&self) -> Room {
        Room {
            inner: self.inner.clone(),
            wait: None,
        }
    }

    /// Bytes queued and not yet taken by the driver.
    pub(crate) fn queued_bytes(&self) -> usize {
        self.inner
            .max_bytes
            .saturating_sub(self.inner.bytes.available_permits())
    }
}

impl OutboundReceiver {
    /// The next message: `Ready(None)` once every sender is gone and the queue is empty.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Outbound>> {
        if self.taken.is_empty() {
            let mut s = self.inner.lock();
            if s.items.is_empty() {
                if self.inner.senders.load(Ordering::Acquire) == 0 {
                    return Poll::Ready(None);
                }
                if std::mem::take(&mut s.woken) {
                    // Woken mid-pass: run another pass instead of sleeping.
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                match &mut s.waiting {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    slot => *slot = Some(cx.waker().clone()),
                }
                return Poll::Pending;
            }
            // Swap buffers rather than move items: both keep their capacity while busy.
            std::mem::swap(&mut s.items, &mut self.taken);
        }
        let Some(q) = self.taken.pop_front() else {
            return Poll::Pending; // unreachable: `taken` was just filled
        };
        // Encoding follows at once; the permits go back now (the write buffer has its own bound).
        if q.frames > 0 {
            self.inner.frames.add_permits(q.frames as usize);
        }
        if q.bytes > 0 {
            self.inner.bytes.add_permits(q.bytes as usize);
        }
        if q.frames > 0 || q.bytes > 0 {
            self.inner.room_freed();
        }
        Poll::Ready(Some(q.msg))
    }

    /// True when nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.taken.is_empty() && self.inner.lock().items.is_empty()
    }

    /// Gives the queue's memory back to the allocator when it is empty (an idle connection).
    pub(crate) fn release_memory(&mut self) {
        if self.taken.is_empty() && self.taken.capacity() > 0 {
            self.taken = VecDeque::new();
        }
        let mut s = self.inner.lock();
        if s.items.is_empty() && s.items.capacity() > 0 {
            s.items = VecDeque::new();
        }
    }
}

impl OutboundReceiver {
    /// Closes the queue: senders waiting for permits and later ones get their message back. Returns
    /// what was queued and not taken.
    pub(crate) fn close(&mut self) -> Vec<Outbound> {
        self.inner.frames.close();
        self.inner.bytes.close();
        self.inner.room_freed();
        let items = {
            let mut s = self.inner.lock();
            s.closed = true;
            std::mem::take(&mut s.items)
        };
        self.taken.drain(..).chain(items).map(|q| q.msg).collect()
    }
}

impl Drop for OutboundReceiver {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::ResponseFrame;
    use std::future::poll_fn;

    /// Counts its wake-ups.
    struct Count(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Review finding (a CI dry run): a wake-up that came while the driver was mid-pass (not
    /// waiting on the queue) was lost, so a swept call or stream credit waited for some other event.
    #[test]
    fn a_wake_while_the_driver_is_not_waiting_is_kept_for_its_next_wait() {
        let (tx, mut rx) = outbound_queue(8, 1024);
        let count = Arc::new(Count(Default::default()));
        let waker = std::task::Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        tx.waker().wake(); // the driver is mid-pass: nobody is registered
        assert!(rx.poll_recv(&mut cx).is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "the next wait wakes at once");
        assert!(rx.poll_recv(&mut cx).is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "only once");
        tx.waker().wake(); // now it waits: woken the usual way
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
    }

    fn response(id: u64, payload: usize) -> Outbound {
        Outbound::Response(ResponseFrame {
            id,
            code: crate::Code::Ok,
            message: String::new(),
            metadata: crate::Metadata::new(),
            payload: bytes::Bytes::from(vec![0u8; payload]),
            not_executed: false,
        })
    }

    fn id(m: Outbound) -> u64 {
        match m {
            Outbound::Response(r) => r.id,
            Outbound::Request { frame, .. } => frame.id,
            Outbound::Data { key, .. } | Outbound::DataBatch { key, .. } | Outbound::Reset { key, .. } => key.id(),
            Outbound::Inspect { .. } => 0,
        }
    }

    #[tokio::test]
    async fn delivers_in_order_and_closes_when_every_sender_is_gone() {
        let (tx, mut rx) = outbound_queue(8, 1024);
        let tx2 = tx.clone();
        tx.send(response(1, 10)).await.unwrap();
        tx2.send(response(2, 10)).await.unwrap();
        assert_eq!(id(poll_fn(|cx| rx.poll_recv(cx)).await.unwrap()), 1);
        assert_eq!(id(poll_fn(|cx| rx.poll_recv(cx)).await.unwrap()), 2);
        drop(tx);
        tx2.send(response(3, 10)).await.unwrap();
        drop(tx2);
        assert_eq!(id(poll_fn(|cx| rx.poll_recv(cx)).await.unwrap()), 3);
        assert!(poll_fn(|cx| rx.poll_recv(cx)).await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn senders_wait_for_frame_slots_and_bytes_until_the_driver_takes_frames() {
        let (tx, mut rx) = outbound_queue(2, 100);
        tx.send(response(1, 60)).await.unwrap();
        assert_eq!(tx.queued_bytes(), 60);
        // 60 + 60 bytes is over the budget: waits.
        let blocked = tokio::time::timeout(std::time::Duration::from_secs(1), tx.send(response(2, 60))).await;
        assert!(blocked.is_err(), "a send over the byte budget must wait");
        let tx2 = tx.clone();
        let waiter = tokio::spawn(async move { tx2.send(response(3, 60)).await.is_ok() });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        assert_eq!(id(poll_fn(|cx| rx.poll_recv(cx)).await.unwrap()), 1);
        assert!(waiter.await.unwrap(), "taking a frame frees its budget");
        assert_eq!(id(poll_fn(|cx| rx.poll_recv(cx)).await.unwrap()), 3);
        // Two frame slots: the third send waits though bytes are free.
        tx.send(response(4, 0)).await.unwrap();
        tx.send(response(5, 0)).await.unwrap();
        let blocked = tokio::time::timeout(std::time::Duration::from_secs(1), tx.send(response(6, 0))).await;
        assert!(blocked.is_err(), "a send over the frame bound must wait");
    }

    #[tokio::test]
    async fn a_dropped_receiver_gives_senders_their_message_back() {
        let (tx, rx) = outbound_queue(1, 1024);
        tx.send(response(1, 1)).await.unwrap();
        let tx2 = tx.clone();
        let waiter = tokio::spawn(async move { tx2.send(response(2, 1)).await.map_err(id) });
        tokio::task::yield_now().await;
        drop(rx);
        assert_eq!(waiter.await.unwrap(), Err(2));
        assert_eq!(tx.send(response(3, 1)).await.map_err(id), Err(3));
    }

    #[tokio::test]
    async fn an_idle_queue_releases_its_memory() {
        let (tx, mut rx) = outbound_queue(64, 1 << 20);
        for i in 0..40 {
            tx.send(response(i, 1)).await.unwrap();
        }
        while rx.taken.len() + rx.inner.lock().items.len() > 0 {
            poll_fn(|cx| rx.poll_recv(cx)).await.unwrap();
        }
        assert!(rx.taken.capacity() + rx.inner.lock().items.capacity() > 0);
        rx.release_memory();
        assert_eq!(rx.taken.capacity() + rx.inner.lock().items.capacity(), 0);
    }
}
