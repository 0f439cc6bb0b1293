//! Work a handler hands off so that it finishes even if the request is cancelled.
//!
//! A handler's future is dropped when its request is cancelled (the client's CANCEL, the
//! deadline, the connection closing): right for work whose only purpose is the answer, wrong
//! for work that must not stop half way (a write to two stores, a payment). [`detach`] runs
//! such work on a task of its own, as dropshot's detached handler mode does, so it runs to its
//! end whatever happens to the request.
//!
//! What that costs, by design:
//! - The work's result is lost if the request is cancelled first; nobody is told but the work
//!   itself (it can watch [`Request::cancellation`](rpc_core::Request::cancellation)).
//! - It holds no permit once its request has ended: `max_concurrent_requests` and
//!   `max_requests_per_connection` count requests, not detached work. Keep it short, or bound it
//!   with a semaphore of your own.
//! - It is still the server's: [`ServerHandle::shutdown`](crate::ServerHandle::shutdown) waits for
//!   it until `shutdown_grace` ends, then drops it; [`ServerHandle::abort`](crate::ServerHandle::abort)
//!   drops it at once. Both return only after it is gone. That holds for `detach` called on the
//!   handler's own task (the server is found through a task-local, as the request's context is);
//!   called from a task the handler spawned, or from detached work, it is a plain `tokio::spawn`
//!   the server neither waits for nor stops.
//! - It runs outside the request's [`Context`](rpc_core::context::Context): calls it makes do not
//!   inherit the request's deadline (they would fail once the request is cancelled). Carry it with
//!   `rpc_core::context::current()` and `Context::scope` if they should.

use std::future::Future;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What every handler of one server shares: the tracker `shutdown()` and `abort()` wait on, and
/// the token that stops detached and oneway work when the server is done.
#[derive(Debug, Default)]
pub(crate) struct ServerTasks {
    /// Every handler, and every detached task, holds a token of it.
    pub(crate) tracker: TaskTracker,
    /// Fired by `abort()`, or when `shutdown_grace` ends: work not tied to a connection stops.
    pub(crate) stop: CancellationToken,
    /// Fired when the server starts a graceful shutdown: resumable streams end at once, so
    /// their clients resume them elsewhere instead of waiting out the grace.
    pub(crate) draining: CancellationToken,
}

/// Runs `work` to its end on a task of its own, even if the request whose handler calls this is
/// cancelled meanwhile; resolves to its output (a panic in it is resumed in the caller). Called
/// outside a handler, it is a plain `tokio::spawn`. See the module documentation for what
/// detached work costs.
///
/// ```
/// # async fn store(_: &str) {}
/// use rpc_server::{detach, Request, Response, Status};
///
/// async fn transfer(req: Request<String>) -> Result<Response<String>, Status> {
///     let order = req.into_body();
///     // Both writes happen, or neither started: the client giving up cannot stop it half way.
///     detach(async move {
///         store(&order).await;
///         store(&order).await;
///     })
///     .await;
///     Ok(Response::new("done".into()))
/// }
/// ```
pub async fn detach<F>(work: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let joined = match crate::entry::server_tasks() {
        Some(tasks) => {
            let stop = tasks.stop.clone();
            tasks
                .tracker
                .spawn(async move { stop.run_until_cancelled(work).await })
                .await
        }
        None => tokio::spawn(async move { Some(work.await) }).await,
    };
    match joined {
        Ok(Some(out)) => out,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Stopped by the server (abort, or the end of shutdown_grace), which drops this handler
        // too: it never resumes.
        Ok(None) | Err(_) => std::future::pending().await,
    }
}
