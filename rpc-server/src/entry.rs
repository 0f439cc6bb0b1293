//! Whether a request's handler was entered: the fact behind "not executed".
//!
//! The dispatcher runs each request inside a scope; the runtime marks the moment the user's
//! handler is about to run (generated code after the body decoded, the router for routed
//! functions and hand-written services). A request that ends without that mark provably did not
//! run its handler (a layer refused it, the deadline passed while it waited, no such method, the
//! body did not decode), and its error response says so. Whatever status a handler returns after
//! the mark means "may have executed".
//!
//! A task-local rather than a flag in the request: the mark must be set when the handler's future
//! is first polled (inside the spawned task), not when the router builds it, and a task-local costs
//! no allocation per request.

use std::cell::Cell;
use std::future::Future;

tokio::task_local! {
    static ENTERED: Cell<bool>;
}

/// Marks the current request's handler as entered. Called by the runtime (router and generated
/// code), right before user code runs; outside a request scope it does nothing.
pub(crate) fn mark() {
    let _ = ENTERED.try_with(|e| e.set(true));
}

/// Runs `f` as one request's work and reports whether its handler was entered.
pub(crate) async fn track<F: Future>(f: F) -> (F::Output, bool) {
    ENTERED
        .scope(Cell::new(false), async move {
            let out = f.await;
            (out, ENTERED.with(Cell::get))
        })
        .await
}
