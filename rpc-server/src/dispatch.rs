//! Runs requests read by a connection's driver: off the I/O task, behind the server-wide
//! concurrency limit, within the deadline the client sent.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use std::collections::HashMap;

use futures_util::future::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use rpc_core::compression::{Encoding, ACCEPT_ENCODING, ENCODING};
use rpc_core::context::{Cancellation, Context as RequestContext};
use rpc_core::driver::{Dispatch, Responder, StreamIo};
use rpc_core::frame::{RequestFrame, ResponseFrame};
use rpc_core::metrics::RequestMetrics;
use rpc_core::{BoxError, Code, Request, Status};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tower::util::{BoxCloneService, Oneshot, ServiceExt};
use tower::Service;

use crate::detach::ServerTasks;
use crate::router::Router;

/// The server's service after its layers: errors are boxed so tower middleware can add its own.
pub(crate) type ServerService = BoxCloneService<Request<Bytes>, rpc_core::Response<Bytes>, BoxError>;

/// Turns an error from the service stack into the status sent to the client.
pub fn status_from_error(err: BoxError) -> Status {
    let err = match err.downcast::<Status>() {
        Ok(status) => return *status,
        Err(e) => e,
    };
    let err = match err.downcast::<crate::entry::Refused>() {
        Ok(refused) => return refused.0,
        Err(e) => e,
    };
    if err.is::<tower::timeout::error::Elapsed>() {
        return Status::deadline_exceeded("request timed out in the server's timeout layer");
    }
    if err.is::<tower::load_shed::error::Overloaded>() {
        return Status::busy("server overloaded (load shed)");
    }
    Status::internal(err.to_string())
}

/// The metric label for `method`: itself if the server serves it, else `unknown`, so peers cannot
/// grow the label set.
fn label<'a>(router: &Router, method: &'a str) -> &'a str {
    if router.serves(method) {
        method
    } else {
        "unknown"
    }
}

/// True for the errors that state a refusal before the inner service was called: [`Refused`]
/// from any layer, and tower's load shedding (it answers `Overloaded` only without calling
/// its inner service).
///
/// [`Refused`]: crate::entry::Refused
fn is_refusal(err: &BoxError) -> bool {
    err.is::<crate::entry::Refused>() || err.is::<tower::load_shed::error::Overloaded>()
}

type Permits = (OwnedSemaphorePermit, OwnedSemaphorePermit);

pin_project_lite::pin_project! {
    /// A handler's future holding its request's permits: they are released as soon as it
    /// completes, and, if it is dropped first, the moment its drop has returned. A handler
    /// still being dropped (its locals' drops may do real work: a rollback, a flush) still
    /// counts against `max_concurrent_requests`, so the limit bounds the handlers that exist.
    struct HoldingPermits<F> {
        // Fields drop in order: the handler first, then its permits.
        #[pin]
        inner: F,
        permits: Option<Permits>,
    }
}

impl<F: Future> Future for HoldingPermits<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        this.permits.take();
        Poll::Ready(out)
    }
}

/// Drops a value: a function, not a closure, so the futures mapped with it stay `Send` for any
/// lifetime of a panic's payload.
fn discard<T>(_: T) {}

/// The most requests that share one spawned task. Spawning wakes a sleeping worker thread, which
/// costs more than the spawn itself, so the requests of one read share a task; a cap keeps a large
/// read spread over several tasks that other workers can take.
const MAX_BATCH: usize = 16;

type Work = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What every connection's dispatcher shares with the server.
pub(crate) struct DispatchShared {
    /// The service stack after the server's layers.
    pub(crate) service: ServerService,
    /// The stack is the router alone (see [`ServerDispatch::start`]).
    pub(crate) stateless: bool,
    /// The server-wide concurrency limit.
    pub(crate) limit: Arc<Semaphore>,
    pub(crate) metrics: Arc<RequestMetrics>,
    pub(crate) router: Arc<Router>,
    pub(crate) max_request_duration: Duration,
    /// Every handler holds a token of its tracker, so `abort()` can wait for them all.
    pub(crate) tasks: Arc<ServerTasks>,
    /// How messages are compressed.
    pub(crate) codec: ServerCodec,
}

/// The server's side of compression (see `rpc_core::compression`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ServerCodec {
    /// Compress responses for clients that ask (`ServerConfig::compression`).
    pub(crate) respond: bool,
    /// Bodies under this go as they are.
    pub(crate) min_size: usize,
    /// Compressed requests expand to at most this (`max_frame_size`).
    pub(crate) limit: usize,
}

/// One per connection; shares the service and the concurrency limit with every other connection.
pub(crate) struct ServerDispatch {
    /// This connection's copy of the service stack.
    service: ServerService,
    /// The stack is the router alone (see [`ServerDispatch::start`]).
    stateless: bool,
    limit: Arc<Semaphore>,
    /// This connection's own cap on requests in flight.
    per_connection: Arc<Semaphore>,
    metrics: Arc<RequestMetrics>,
    /// The routes, to label metrics with served methods only (shared: one reference count per
    /// request rather than one per map).
    router: Arc<Router>,
    /// The deadline of a request that carries none.
    max_request_duration: Duration,
    /// Cancellations of the requests not yet answered, fired on CANCEL or when the connection
    /// goes (which drops their handlers). Bounded by `max_requests_per_connection`: an entry
    /// leaves when its answer is taken.
    running: HashMap<u64, Cancellation>,
    /// The cancellations of oneway requests whose work may still run, fired when the connection
    /// goes. Pruned of finished work whenever it doubles past 64.
    oneways: Vec<rpc_core::context::WeakCancellation>,
    oneways_kept: usize,
    /// Server-wide: every handler holds a token of its tracker, so `abort()` can wait for them
    /// all; its stop token ends oneway handlers (which no answer or CANCEL ends).
    tasks: Arc<ServerTasks>,
    /// Requests accepted from the current read, not yet spawned.
    batch: Vec<Work>,
    /// Who is at the other end, handed to every request.
    peer: Option<Arc<rpc_core::Peer>>,
    codec: ServerCodec,
}

pin_project_lite::pin_project! {
    /// A handler's call within its deadline, if it has one: its result, and whether the deadline
    /// cut it short. A future of its own, not an async block: that would hold `call` twice (as
    /// what it captured and as what it awaits), in every request's task.
    struct Timed<F> {
        #[pin]
        call: F,
        #[pin]
        deadline: Option<tokio::time::Sleep>,
    }
}

// Generic in the error: bound to `BoxError` itself, rustc cannot prove the task `Send` for every
// lifetime of the trait object.
impl<T, E: From<Status>, F: Future<Output = Result<T, E>>> Future for Timed<F> {
    type Output = (Result<T, E>, bool);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(r) = this.call.poll(cx) {
            return Poll::Ready((r, false));
        }
        match this.deadline.as_pin_mut().map(|d| d.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready((
                Err(Status::deadline_exceeded("deadline passed while the handler ran").into()),
                true,
            )),
            _ => Poll::Pending,
        }
    }
}

/// A request handed to the service stack.
enum Started {
    /// `call` has made the future (nothing of the handler has run yet: it runs when the spawned
    /// task polls it).
    Called(<ServerService as Service<Request<Bytes>>>::Future),
    /// A clone of the stack that the spawned task drives to readiness, then calls.
    Waiting(Oneshot<ServerService, Request<Bytes>>),
    /// A compressed request: the spawned task expands its body (refusing it, not executed, if
    /// it does not expand within the limit), then calls a clone of the stack.
    /// With compression off (`None`), every compressed request is refused.
    Compressed(ServerService, Request<Bytes>, String, Option<usize>),
}

impl ServerDispatch {
    /// Hands `req` to the service stack without waiting. A stack with layers is cloned per request
    /// and driven by the spawned task, as tower expects: a layer may keep state from `poll_ready`
    /// to `call` (a concurrency limit's permit, or a wait for one) that must go with the request,
    /// not stay with the connection. The router alone is always ready and keeps no such state, so
    /// it is called on this connection's copy, which saves a clone per request.
    fn start(&mut self, req: Request<Bytes>) -> Started {
        if self.stateless {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            if let Poll::Ready(Ok(())) = self.service.poll_ready(&mut cx) {
                return Started::Called(self.service.call(req));
            }
        }
        Started::Waiting(self.service.clone().oneshot(req))
    }

    /// A dispatcher for one connection, sharing `server`'s stack, limits and metrics, with its
    /// own cap of `max_requests_per_connection`.
    pub(crate) fn new(server: &DispatchShared, max_requests_per_connection: usize) -> Self {
        ServerDispatch {
            service: server.service.clone(),
            stateless: server.stateless,
            limit: server.limit.clone(),
            per_connection: Arc::new(Semaphore::new(max_requests_per_connection)),
            metrics: server.metrics.clone(),
            router: server.router.clone(),
            max_request_duration: server.max_request_duration,
            running: HashMap::new(),
            oneways: Vec::new(),
            oneways_kept: 0,
            tasks: server.tasks.clone(),
            batch: Vec::new(),
            peer: None,
            codec: server.codec,
        }
    }

    /// The connection's peer, for its requests.
    pub(crate) fn set_peer(&mut self, peer: rpc_core::Peer) {
        self.peer = Some(Arc::new(peer));
    }

    /// Spawns the held requests: one alone as it is, several as one task that runs them
    /// concurrently (each answers as soon as it is done, not when the batch is).
    fn spawn_batch(&mut self, tasks: &TaskTracker) {
        match self.batch.len() {
            0 => {}
            1 => {
                if let Some(work) = self.batch.pop() {
                    let token = self.tasks.tracker.token();
                    tasks.spawn(async move {
                        let _token = token;
                        work.await
                    });
                }
            }
            _ => {
                let mut set: FuturesUnordered<Work> = self.batch.drain(..).collect();
                let token = self.tasks.tracker.token();
                tasks.spawn(async move {
                    let _token = token;
                    while set.next().await.is_some() {}
                });
            }
        }
    }
}

impl Dispatch for ServerDispatch {
    fn dispatch(
        &mut self,
        frame: RequestFrame,
        received_at: Instant,
        responder: Responder,
        stream: Option<StreamIo>,
        tasks: &TaskTracker,
    ) -> Option<ResponseFrame> {
        // Never an unbounded queue: over either limit the client learns at once that nothing ran.
        let Ok(conn_permit) = self.per_connection.clone().try_acquire_owned() else {
            self.metrics
                .record(label(&self.router, &frame.method), Code::ServerBusy, Duration::ZERO);
            return responder.immediate(Status::busy("connection at max_requests_per_connection"));
        };
        let Ok(permit) = self.limit.clone().try_acquire_owned() else {
            self.metrics
                .record(label(&self.router, &frame.method), Code::ServerBusy, Duration::ZERO);
            return responder.immediate(Status::busy("server at max_concurrent_requests"));
        };
        // Every request has a deadline: its own, or max_request_duration. A stream runs until it
        // ends (or is cancelled) unless its client gave it one.
        let deadline = match (&stream, frame.timeout) {
            (_, Some(t)) => Some(received_at + t),
            (Some(_), None) => None,
            (None, None) => Some(received_at + self.max_request_duration),
        };
        let method = frame.method.clone();
        let (cancellation, guard) = Cancellation::with_guard();
        let mut req = Request::for_method(frame.method, frame.payload);
        *req.metadata_mut() = frame.metadata;
        req.set_deadline(deadline);
        req.set_cancellation(Some(cancellation.clone()));
        req.set_peer(self.peer.clone());
        let responses = stream.map(|io| {
            req.set_stream(io.requests);
            io.responses
        });
        let codec = self.codec;
        let accept = codec
            .respond
            .then(|| req.metadata().get_str(ACCEPT_ENCODING).and_then(Encoding::from_name))
            .flatten();
        let started = match req.metadata().get_str(ENCODING).map(str::to_owned) {
            Some(name) => Started::Compressed(self.service.clone(), req, name, codec.respond.then_some(codec.limit)),
            None => self.start(req),
        };
        let metrics = self.metrics.clone();
        let router = self.router.clone();
        let (frame_id, oneway) = (responder.id(), responder.is_oneway());
        let server_tasks = self.tasks.clone();
        let context = RequestContext::new(deadline);
        let on_deadline = cancellation.clone();
        let on_stream_gone = cancellation.clone();
        let mut responder = responder;
        responder.watch(cancellation.clone());
        let span = tracing::debug_span!("request", %method, id = frame_id);
        let work = async move {
            let permits = (permit, conn_permit);
            if deadline.is_some_and(|d| Instant::now() >= d) {
                drop(permits);
                metrics.record(label(&router, &method), Code::DeadlineExceeded, received_at.elapsed());
                responder
                    .refuse(Status::deadline_exceeded("deadline passed before the handler started"))
                    .await;
                return;
            }
            // The handler runs in its request's context: calls it makes inherit the deadline. A
            // streaming handler's messages are sent within it too, holding the request's permits
            // and deadline until the stream ends.
            let call = context.scope(async move {
                let result = match started {
                    Started::Called(fut) => fut.await,
                    Started::Waiting(oneshot) => oneshot.await,
                    Started::Compressed(service, mut req, name, limit) => {
                        use rpc_core::compression::DecompressError;
                        let body = std::mem::take(req.body_mut());
                        let expanded = match limit {
                            Some(limit) => rpc_core::compression::decompress(&name, &body, limit),
                            None => Err(DecompressError::Unsupported(name)),
                        };
                        match expanded {
                            Ok(body) => {
                                *req.body_mut() = body;
                                req.metadata_mut().remove(ENCODING);
                                service.oneshot(req).await
                            }
                            Err(e) => {
                                let status = match &e {
                                    DecompressError::TooLarge { .. } => {
                                        Status::resource_exhausted(format!("request body: {e}"))
                                    }
                                    DecompressError::Unsupported(_) => {
                                        Status::unimplemented(format!("request body: {e}"))
                                    }
                                    _ => Status::invalid_argument(format!("request body: {e}")),
                                };
                                Err(Box::new(crate::entry::Refused(status)) as BoxError)
                            }
                        }
                    }
                };
                match (result, responses) {
                    (Ok(mut resp), Some(sender)) => match resp.take_stream() {
                        // Boxed: inline, the sending's state would size every unary request's task.
                        Some(messages) => Box::pin(crate::streaming::send_all(messages, sender, on_stream_gone))
                            .await
                            .map(|()| resp),
                        None => Err(Status::internal("a streaming method answered without a stream").into()),
                    },
                    (result, _) => result,
                }
            });
            // The permits go the moment the handler is done, or dropped (deadline, CANCEL, the
            // connection gone), not when its answer has been queued.
            let call = HoldingPermits {
                inner: call,
                permits: Some(permits),
            };
            let timed = Timed {
                call,
                deadline: deadline.map(tokio::time::sleep_until),
            };
            let ((result, timed_out), marks) = crate::entry::track(timed, server_tasks).await;
            // A handler that was entered serves the method; only otherwise is the router asked.
            let label = if marks.entered() {
                method.as_str()
            } else {
                label(&router, &method)
            };
            match result {
                Ok(resp) => {
                    metrics.record(label, Code::Ok, received_at.elapsed());
                    let compress = resp.compress();
                    let (mut metadata, mut body) = resp.into_parts();
                    // A body its handler compressed itself is sent as it is.
                    let ready = metadata.get(ENCODING).is_some();
                    if let Some(encoding) = accept.filter(|_| compress && !ready && body.len() >= codec.min_size) {
                        #[cfg(feature = "compression")]
                        {
                            body = rpc_core::compression::compress(encoding, &body);
                            metadata.insert(ENCODING, encoding.as_str());
                        }
                        #[cfg(not(feature = "compression"))]
                        let _ = (encoding, &mut body, &mut metadata);
                    }
                    responder.ok(metadata, body).await;
                }
                Err(e) => {
                    // Proven only by a stated refusal with no entry; anything else may have run.
                    let refused = !marks.entered() && (marks.refused() || is_refusal(&e));
                    let status = status_from_error(e);
                    metrics.record(label, status.code(), received_at.elapsed());
                    if refused {
                        responder.refuse(status).await;
                    } else {
                        responder.error(status).await;
                    }
                }
            }
            // The handler is gone at its deadline; what it handed off learns it once the answer
            // is queued (fired before, it would stop this very answer on its way).
            if timed_out {
                on_deadline.cancel();
            }
        };
        // Each request on its own: a panic fails that request alone (its responder, dropped while
        // unwinding, answers INTERNAL, "may have executed"), never the others of its batch.
        let work = std::panic::AssertUnwindSafe(tracing::Instrument::instrument(work, span))
            .catch_unwind()
            .map(discard);
        // Cancellable: CANCEL, or the connection going, fires the request's cancellation and
        // drops the handler's future (it stops at its next await) and with it the request's
        // permits. A oneway cannot be cancelled by its client, and has no answer that would end
        // an entry here; it runs to its deadline, or until the server stops.
        let work: Work = if oneway {
            // Ended by the connection going (its cancellation, fired from `drop`) or the server
            // stopping; no CANCEL names it.
            if self.oneways.len() >= 64 && self.oneways.len() >= 2 * self.oneways_kept {
                self.oneways.retain(|w| !w.is_gone());
                self.oneways_kept = self.oneways.len();
            }
            self.oneways.push(cancellation.downgrade());
            let stop = self.tasks.stop.clone();
            // Boxed first: the async block then holds a plain `Work` (rustc cannot prove the
            // unboxed one `Send` for every lifetime of a panic payload).
            let work: Work = Box::pin(guard.guard(work).map(discard));
            Box::pin(async move {
                if stop.run_until_cancelled_owned(work).await.is_none() {
                    cancellation.cancel();
                }
            })
        } else {
            self.running.insert(frame_id, cancellation);
            Box::pin(guard.guard(work).map(discard))
        };
        self.batch.push(work);
        if self.batch.len() >= MAX_BATCH {
            self.spawn_batch(tasks);
        }
        None
    }

    fn flush(&mut self, tasks: &TaskTracker) {
        self.spawn_batch(tasks);
    }

    fn cancel(&mut self, id: u64) -> bool {
        match self.running.remove(&id) {
            Some(cancellation) => {
                cancellation.cancel();
                true
            }
            None => false, // answered already: the CANCEL crossed its response
        }
    }

    fn finished(&mut self, id: u64) {
        self.running.remove(&id);
    }
}

/// The connection is gone (closed, aborted, drained past its grace): its handlers go with it.
impl Drop for ServerDispatch {
    fn drop(&mut self) {
        for (_, cancellation) in self.running.drain() {
            cancellation.cancel();
        }
        for weak in self.oneways.drain(..) {
            if let Some(cancellation) = weak.upgrade() {
                cancellation.cancel();
            }
        }
    }
}
