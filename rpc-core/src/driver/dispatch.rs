//! How the server side of a driver hands requests to handlers without running them on the I/O task.

use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::frame::{RequestFrame, ResponseFrame};
use crate::message::Metadata;
use crate::status::{Code, Status};

use super::handle::{Outbound, OutboundSender};

/// The two halves of a stream a client opened, for its handler: the client's messages, and the
/// sender of the handler's (whose RESPONSE, through the [`Responder`], ends the stream).
#[derive(Debug)]
pub struct StreamIo {
    /// The client's messages.
    pub requests: crate::stream::Streaming<bytes::Bytes>,
    /// Sends the handler's messages.
    pub responses: crate::stream::StreamSender<bytes::Bytes>,
}

/// Receives the requests a connection reads. Called on the I/O task: it must not block or await.
pub trait Dispatch: Send + 'static {
    /// Starts the work for `request` (spawned on `tasks`, so graceful shutdown can wait for it) and
    /// answers through `responder`; or returns a response to write at once (for example SERVER_BUSY)
    /// without running anything. The work may be held back until [`Dispatch::flush`], so the
    /// requests of one read can share a spawn. A request that opens a stream comes with its
    /// [`StreamIo`].
    fn dispatch(
        &mut self,
        request: RequestFrame,
        received_at: Instant,
        responder: Responder,
        stream: Option<StreamIo>,
        tasks: &TaskTracker,
    ) -> Option<ResponseFrame>;

    /// Starts any work `dispatch` held back. The driver calls it after every read it decoded
    /// requests from, before it waits again.
    fn flush(&mut self, tasks: &TaskTracker) {
        let _ = tasks;
    }

    /// The client gave up on request `id` (a CANCEL frame): drop its handler if it still runs.
    /// True if it did (its responder then still answers, and the driver drops that answer).
    fn cancel(&mut self, id: u64) -> bool {
        let _ = id;
        false
    }

    /// The response to request `id` has been taken for writing: its work is done.
    fn finished(&mut self, id: u64) {
        let _ = id;
    }
}

/// Sends one request's response back through its connection's outbound queue. Dropped without
/// sending (a handler panicked), it answers INTERNAL so the caller is not left waiting.
#[derive(Debug)]
pub struct Responder {
    id: u64,
    oneway: bool,
    tx: Option<OutboundSender>,
    /// The request's cancellation: once it fired, nobody waits for the answer, so none is sent.
    cancellation: Option<crate::context::Cancellation>,
}

impl Responder {
    pub(crate) fn new(id: u64, oneway: bool, tx: OutboundSender) -> Self {
        Responder {
            id,
            oneway,
            tx: Some(tx),
            cancellation: None,
        }
    }

    /// Sends nothing once `cancellation` fired (the client gave up, or the connection went).
    pub fn watch(&mut self, cancellation: crate::context::Cancellation) {
        self.cancellation = Some(cancellation);
    }

    fn cancelled(&self) -> bool {
        self.cancellation.as_ref().is_some_and(|c| c.is_cancelled())
    }

    /// The request id being answered.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// True for a oneway request: nothing is sent back.
    pub fn is_oneway(&self) -> bool {
        self.oneway
    }

    /// Answers at once from the I/O task (for example SERVER_BUSY) without running anything: returns
    /// the frame for the driver to write, flagged "not executed", or `None` for a oneway request.
    pub fn immediate(mut self, status: Status) -> Option<ResponseFrame> {
        self.tx = None;
        (!self.oneway).then(|| refusal_frame(self.id, status))
    }

    /// Sends an error status for a request whose handler never started, flagged "not executed"
    /// so the client may retry it. Only the runtime knows this; a handler's own errors go through
    /// [`Responder::error`].
    pub async fn refuse(self, status: Status) {
        let frame = refusal_frame(self.id, status);
        self.send(frame).await;
    }

    /// Sends a successful response.
    pub async fn ok(self, metadata: Metadata, payload: bytes::Bytes) {
        let id = self.id;
        self.send(ResponseFrame {
            id,
            code: Code::Ok,
            message: String::new(),
            metadata,
            payload,
            not_executed: false,
        })
        .await;
    }

    /// Sends an error status; the handler may have run.
    pub async fn error(self, status: Status) {
        let frame = status_frame(self.id, status);
        self.send(frame).await;
    }

    async fn send(mut self, frame: ResponseFrame) {
        if self.oneway || self.cancelled() {
            self.tx = None;
            return;
        }
        let Some(tx) = self.tx.as_ref() else { return };
        // Waits while the outbound queue is full; fails only if the connection is gone, and then
        // the caller has already been told why. Dropped while it waits, the responder still
        // answers from `drop`, unless the request was cancelled.
        let _ = tx.send(Outbound::Response(frame)).await;
        self.tx = None;
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            if !self.oneway && !self.cancelled() {
                let frame = status_frame(
                    self.id,
                    Status::internal("handler ended without a response (panicked?)"),
                );
                // Past the queue's limits if need be: an answer is never lost to a full queue.
                tx.try_send(Outbound::Response(frame));
            }
        }
    }
}

/// A response frame for an error status (the handler may have run).
pub fn status_frame(id: u64, status: Status) -> ResponseFrame {
    let (code, message, metadata) = status.into_parts();
    ResponseFrame {
        id,
        code,
        message,
        metadata,
        payload: bytes::Bytes::new(),
        not_executed: false,
    }
}

/// A response frame for an error status, flagged "not executed": for answers the runtime gives
/// without starting the handler.
pub fn refusal_frame(id: u64, status: Status) -> ResponseFrame {
    ResponseFrame {
        not_executed: true,
        ..status_frame(id, status)
    }
}
