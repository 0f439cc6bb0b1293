//! The facts behind "not executed": whether a request's handler was entered, and whether the
//! runtime refused the request before it.
//!
//! "Not executed" must be proven, never inferred from a missing fact. So a request is answered
//! "not executed" only when a refusal was stated positively and the handler was not entered:
//! - the dispatcher's own refusals (over a limit, deadline passed before start) are answered
//!   directly;
//! - the router refuses a method it does not serve, generated code a body that does not decode
//!   (both call [`refuse`] in the request's task);
//! - a tower layer refuses by failing with [`Refused`], or tower's load shedding with its
//!   `Overloaded` error, which it returns only without calling the inner service.
//!
//! Any other error (a handler's status, a timeout, a layer that answered on its own) means "may
//! have executed". Entry is marked by the router or generated code right before user code runs;
//! a refusal after an entry in the same task is not believed.
//!
//! A task-local rather than a flag in the request: the marks must be set when the handler's future
//! is polled (inside the spawned task), not when the router builds it, and a task-local costs no
//! allocation per request. A mark set on another task (a layer that spawns the inner call) is lost,
//! which can only turn a refusal into "may have executed", never the reverse.

use std::cell::Cell;
use std::future::Future;
use std::sync::Arc;

use rpc_core::Status;

use crate::detach::ServerTasks;

const ENTERED: u8 = 1;
const REFUSED: u8 = 2;
const ENDS_ON_DRAIN: u8 = 4;

/// One request's task-local state on the server.
struct Scope {
    marks: Cell<u8>,
    /// Where [`crate::detach`] spawns the work a handler hands off.
    tasks: Arc<ServerTasks>,
}

tokio::task_local! {
    static SCOPE: Scope;
}

fn set(bit: u8) {
    let _ = SCOPE.try_with(|s| s.marks.set(s.marks.get() | bit));
}

/// The server whose handler runs on this task, if one does.
pub(crate) fn server_tasks() -> Option<Arc<ServerTasks>> {
    SCOPE.try_with(|s| s.tasks.clone()).ok()
}

/// Marks the current request's handler as entered, right before user code runs.
pub(crate) fn mark() {
    set(ENTERED);
}

/// States that the runtime refused the current request without running its handler.
pub(crate) fn refuse() {
    set(REFUSED);
}

/// States that the current request's response stream ends the moment its server starts a
/// graceful shutdown (a resumable stream: its client resumes elsewhere), even while it waits for
/// its consumer's credit.
pub(crate) fn end_on_drain() {
    set(ENDS_ON_DRAIN);
}

/// The server's draining token, if the current request's stream ends on drain.
pub(crate) fn drain_ends_stream() -> Option<tokio_util::sync::CancellationToken> {
    SCOPE
        .try_with(|s| (s.marks.get() & ENDS_ON_DRAIN != 0).then(|| s.tasks.draining.clone()))
        .ok()
        .flatten()
}

/// What the marks of one request say.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Marks(u8);

impl Marks {
    /// The runtime stated a refusal (believed only if the handler was not entered).
    pub(crate) fn refused(self) -> bool {
        self.0 & REFUSED != 0
    }

    /// The handler was entered.
    pub(crate) fn entered(self) -> bool {
        self.0 & ENTERED != 0
    }
}

/// Runs `f` as one request's work of the server with `tasks`, and reports its marks.
///
/// A combinator, not an `async fn`: each async layer would hold `f` twice (as its argument and
/// as the future it awaits), and this future is in every request's task.
pub(crate) fn track<F: Future>(f: F, tasks: Arc<ServerTasks>) -> impl Future<Output = (F::Output, Marks)> {
    use futures_util::FutureExt;
    let scope = Scope {
        marks: Cell::new(0),
        tasks,
    };
    // The marks are read in the poll that finishes `f`, still inside the scope.
    SCOPE.scope(scope, f.map(|out| (out, Marks(SCOPE.with(|s| s.marks.get())))))
}

/// The error a tower layer returns to refuse a request before calling the service inside it (an
/// interceptor rejecting bad credentials, a rate limit): the client is told the handler did not
/// run, and may retry. Return it only when the inner service was not called for this request.
#[derive(Debug, Clone, thiserror::Error)]
#[error("refused before the handler: {0}")]
pub struct Refused(pub Status);

impl Refused {
    /// Refuses with `status`.
    pub fn new(status: Status) -> Self {
        Refused(status)
    }
}
