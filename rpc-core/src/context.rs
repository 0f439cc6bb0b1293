//! What the request a handler serves passes on to the work it does: its deadline, and its
//! cancellation.
//!
//! A tether server runs every handler inside a [`Context`] holding the request's deadline (the
//! one the client sent, or the server's `max_request_duration`), and gives its `Request` a
//! [`Cancellation`] that the runtime fires when it gives up on the request: the client sent CANCEL
//! (its caller dropped the call or its deadline passed), the deadline passed on the server, the
//! connection closed, or the server was aborted or ran out of `shutdown_grace`. Right after firing
//! it, the runtime drops the handler's future, so a handler stops at its next `.await` without
//! code of its own. (At the deadline the handler is dropped first and the cancellation fires once
//! the DEADLINE_EXCEEDED answer is queued.)
//!
//! **Deadline propagation.** A tether client called inside a context uses the context's deadline
//! when it is earlier than the call's own (its `Request` deadline or `request_timeout`): a
//! downstream call never outlives the call it serves, and fails with DEADLINE_EXCEEDED, "not
//! executed", if the time is already gone. Nothing to write in the handler.
//!
//! The context is a task-local, as tracing's spans are: a task the handler spawns starts without
//! one. Carry it into a task with [`current`] and [`Context::scope`]; run a call outside it (work
//! that must not inherit the deadline) with `Context::none().scope(..)`.
//!
//! ```
//! use std::time::Duration;
//! use rpc_core::context::{self, Context};
//! use tokio::time::Instant;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let served = Context::new(Some(Instant::now() + Duration::from_millis(300)));
//! served
//!     .scope(async {
//!         // What a tether client called here would use as its deadline.
//!         assert!(context::deadline().is_some());
//!         // A spawned task carries it explicitly.
//!         let ctx = context::current().unwrap();
//!         tokio::spawn(ctx.scope(async { assert!(context::deadline().is_some()) })).await.unwrap();
//!     })
//!     .await;
//! assert!(context::deadline().is_none());
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use futures_util::task::AtomicWaker;
use tokio::sync::Notify;
use tokio::time::Instant;

tokio::task_local! {
    static CURRENT: Context;
}

/// What the request being served passes on to the calls made for it: its deadline. (Its
/// [`Cancellation`] is on the `Request`; calls need none, since dropping the handler drops them.)
#[derive(Debug, Clone, Copy, Default)]
pub struct Context {
    deadline: Option<Instant>,
}

impl Context {
    /// A context with `deadline`.
    pub fn new(deadline: Option<Instant>) -> Self {
        Context { deadline }
    }

    /// No deadline: what a call made outside any handler sees.
    pub fn none() -> Self {
        Context::default()
    }

    /// The deadline of the request being served.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Runs `fut` with this context as the current one.
    pub fn scope<F: Future>(self, fut: F) -> impl Future<Output = F::Output> {
        CURRENT.scope(self, fut)
    }
}

/// The context of the request this task serves, if any.
pub fn current() -> Option<Context> {
    CURRENT.try_with(|c| *c).ok()
}

/// The deadline of the request this task serves, if any: what a tether client called here caps
/// its own deadline with.
pub fn deadline() -> Option<Instant> {
    CURRENT.try_with(|c| c.deadline).ok().flatten()
}

/// A request's cancellation: fired once by the server's runtime when it gives up on the request,
/// right before it drops the handler's future. Cheap to clone; clones share the state.
///
/// A handler's own future needs nothing: it is dropped. What it hands off (a task spawned with
/// `rpc_server::detach`, a cleanup task) can watch this to learn that the request is over.
#[derive(Clone, Default)]
pub struct Cancellation(Arc<CancelState>);

#[derive(Default)]
struct CancelState {
    fired: AtomicBool,
    /// Everyone awaiting [`Cancellation::cancelled`].
    waiters: Notify,
    /// The one [`GuardToken::guard`] future (the runtime's), woken without a lock.
    guard: AtomicWaker,
}

impl std::fmt::Debug for Cancellation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cancellation")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl Cancellation {
    /// A cancellation nobody has fired.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fires it: every waiter and the guarded future are woken. Later calls do nothing.
    pub fn cancel(&self) {
        if !self.0.fired.swap(true, Ordering::AcqRel) {
            self.0.waiters.notify_waiters();
            self.0.guard.wake();
        }
    }

    /// True once fired.
    pub fn is_cancelled(&self) -> bool {
        self.0.fired.load(Ordering::Acquire)
    }

    /// Resolves once fired (at once if it was already).
    pub async fn cancelled(&self) {
        loop {
            let notified = self.0.waiters.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the check, so a cancel between the two is not missed.
            notified.as_mut().enable();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }

    /// A handle that does not keep the cancellation alive: for a registry of running work, whose
    /// entries go when the work does.
    pub fn downgrade(&self) -> WeakCancellation {
        WeakCancellation(Arc::downgrade(&self.0))
    }

    /// A cancellation and the one token that may guard a future with it (the server's runtime
    /// guards each handler so; everyone else observes with [`Cancellation::cancelled`]).
    pub fn with_guard() -> (Self, GuardToken) {
        let c = Cancellation::new();
        (c.clone(), GuardToken(c))
    }
}

/// A [`Cancellation`] that does not keep it alive (see [`Cancellation::downgrade`]).
#[derive(Debug, Clone)]
pub struct WeakCancellation(std::sync::Weak<CancelState>);

impl WeakCancellation {
    /// The cancellation, while anyone else still holds it.
    pub fn upgrade(&self) -> Option<Cancellation> {
        self.0.upgrade().map(Cancellation)
    }

    /// True once nobody else holds it (its work is gone).
    pub fn is_gone(&self) -> bool {
        self.0.strong_count() == 0
    }
}

impl std::fmt::Debug for CancelState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelState").finish_non_exhaustive()
    }
}

/// The right to guard one future with a [`Cancellation`]: one per cancellation, so no other
/// future can take over the wake-up the guard relies on.
#[derive(Debug)]
pub struct GuardToken(Cancellation);

impl GuardToken {
    /// Runs `fut` until it completes (`Some`) or the cancellation fires (`None`, and `fut` is
    /// dropped at once, at its next poll).
    pub fn guard<F: Future>(self, fut: F) -> Guarded<F> {
        Guarded {
            cancellation: self.0,
            inner: Some(fut),
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`GuardToken::guard`].
    #[must_use = "futures do nothing unless polled"]
    pub struct Guarded<F> {
        cancellation: Cancellation,
        #[pin]
        inner: Option<F>,
    }
}

impl<F: Future> Future for Guarded<F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<F::Output>> {
        let mut this = self.project();
        let state = &this.cancellation.0;
        if !state.fired.load(Ordering::Acquire) {
            state.guard.register(cx.waker());
        }
        if state.fired.load(Ordering::Acquire) {
            // Dropped now, not when the guard is: its permits and resources go at once.
            this.inner.set(None);
            return Poll::Ready(None);
        }
        match this.inner.as_mut().as_pin_mut() {
            Some(inner) => {
                let out = std::task::ready!(inner.poll(cx));
                this.inner.set(None);
                Poll::Ready(Some(out))
            }
            None => Poll::Ready(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cancel_wakes_waiters_and_drops_the_guarded_future() {
        let (c, token) = Cancellation::with_guard();
        let dropped = Arc::new(AtomicBool::new(false));
        struct OnDrop(Arc<AtomicBool>);
        impl Drop for OnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let guard_flag = OnDrop(dropped.clone());
        let guarded = tokio::spawn(token.guard(async move {
            let _keep = guard_flag;
            std::future::pending::<()>().await
        }));
        let waiter = tokio::spawn({
            let c = c.clone();
            async move { c.cancelled().await }
        });
        tokio::task::yield_now().await;
        assert!(!c.is_cancelled());
        c.cancel();
        assert_eq!(guarded.await.unwrap(), None);
        assert!(dropped.load(Ordering::SeqCst), "dropped when the guard returned");
        waiter.await.unwrap();
        // After the fact too.
        c.cancelled().await;
    }

    #[tokio::test]
    async fn a_guarded_future_that_finishes_first_returns_its_output() {
        let (_, token) = Cancellation::with_guard();
        assert_eq!(token.guard(async { 7 }).await, Some(7));
        let (c, token) = Cancellation::with_guard();
        c.cancel();
        assert_eq!(
            token.guard(async { 7 }).await,
            None,
            "a fired cancellation runs nothing"
        );
    }

    #[tokio::test]
    async fn the_context_is_task_local_and_scoped() {
        assert!(current().is_none());
        let d = Instant::now();
        Context::new(Some(d))
            .scope(async move {
                assert_eq!(deadline(), Some(d));
                Context::none().scope(async { assert_eq!(deadline(), None) }).await;
                assert!(tokio::spawn(async { deadline() }).await.unwrap().is_none());
            })
            .await;
    }
}
