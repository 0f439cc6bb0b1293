//! Write coalescing: whether a connection's next write waits for the frames other tasks are
//! about to queue, so a burst goes out in one syscall instead of one per frame.
//!
//! Frames reach the outbound queue from other tasks, typically many woken together (callers woken
//! by a read of responses, handlers of one batch); writing as soon as the first arrives costs a
//! syscall per frame. So once per write, when frames were just pulled and the buffer is small,
//! writes wait until the tasks ready on this worker have run: tokio wakes a deferred task once its
//! run queue is empty (or at the latest at its next maintenance tick). Only when more frames are
//! expected: a lone caller's request goes out at once. Frames queued meanwhile wake the driver too;
//! it pulls them and keeps waiting, so they go out in one syscall when the deferred wake comes, or
//! as soon as [`COALESCE_FRAMES`] frames or [`COALESCE_LIMIT`] bytes are waiting.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Waker};

/// Frames up to which a write waits for more. Waiting for every ready task maximises the batch
/// but stalls the pipeline: the peer sits idle until the whole batch arrives. Measured at 64
/// callers on one connection, 8 to 24 frames per write gave the most requests per second; this is
/// the middle of that range.
const COALESCE_FRAMES: usize = 16;
/// Encoded bytes up to which a write waits for the other ready tasks to queue theirs; beyond it
/// the driver writes at once.
const COALESCE_LIMIT: usize = 64 * 1024;

/// The waker a driver defers its writes with: records that the scheduler has run it, then wakes
/// the driver's task.
struct DeferredWake {
    fired: AtomicBool,
    task: Waker,
}

impl std::task::Wake for DeferredWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake_by_ref();
    }
}

/// The coalescing state of one connection.
pub(super) struct Coalescer {
    /// True when the next frames pulled from the queue may wait for the others.
    armed: bool,
    /// Writes are held until this deferred wake fires.
    deferred: Option<Arc<DeferredWake>>,
    /// Frames pulled from the queue since the last write.
    unwritten: usize,
    /// Frames likely to be queued soon: responses of requests handed to handlers (server), or
    /// requests of callers just handed their replies (client). With none expected, waiting would
    /// only add latency (a lone caller), so the driver writes at once.
    expected: usize,
}

impl Default for Coalescer {
    fn default() -> Self {
        Coalescer {
            armed: true,
            deferred: None,
            unwritten: 0,
            expected: 0,
        }
    }
}

impl Coalescer {
    /// A frame is likely to be queued soon.
    pub(super) fn expect_one(&mut self) {
        self.expected += 1;
    }

    /// A frame was pulled from the queue.
    pub(super) fn on_pulled(&mut self) {
        self.unwritten += 1;
        self.expected = self.expected.saturating_sub(1);
    }

    /// Bytes were written: the next frames pulled may wait for others again.
    pub(super) fn on_written(&mut self) {
        self.armed = true;
        self.unwritten = 0;
    }

    /// True while writes wait (`buffered` bytes are encoded, frames were just `pulled`).
    pub(super) fn hold(&mut self, cx: &mut Context<'_>, pulled: bool, buffered: usize) -> bool {
        if buffered >= COALESCE_LIMIT || self.unwritten >= COALESCE_FRAMES {
            self.deferred = None;
            return false;
        }
        if let Some(d) = &self.deferred {
            if !d.fired.load(Ordering::Acquire) {
                return true;
            }
            self.deferred = None;
            return false;
        }
        if !(pulled && self.armed) || buffered == 0 || self.expected == 0 {
            return false;
        }
        self.armed = false;
        let d = Arc::new(DeferredWake {
            fired: AtomicBool::new(false),
            task: cx.waker().clone(),
        });
        let waker = Waker::from(d.clone());
        // `yield_now` hands the waker to the scheduler's deferred list on its first poll; the
        // future itself is not needed after that.
        let mut yielded = std::pin::pin!(tokio::task::yield_now());
        if yielded.as_mut().poll(&mut Context::from_waker(&waker)).is_ready() {
            return false;
        }
        self.deferred = Some(d);
        true
    }
}
