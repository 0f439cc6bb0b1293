//! Runs requests read by a connection's driver: off the I/O task, behind the server-wide
//! concurrency limit, within the deadline the client sent.

use std::sync::Arc;

use bytes::Bytes;
use rpc_core::driver::{Dispatch, Responder};
use rpc_core::frame::{RequestFrame, ResponseFrame};
use std::time::Duration;

use rpc_core::metrics::RequestMetrics;
use rpc_core::{BoxError, Code, Request, Status};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tower::util::{BoxCloneService, ServiceExt};

/// The server's service after its layers: errors are boxed so tower middleware can add its own.
pub(crate) type ServerService = BoxCloneService<Request<Bytes>, rpc_core::Response<Bytes>, BoxError>;

/// Turns an error from the service stack into the status sent to the client.
pub fn status_from_error(err: BoxError) -> Status {
    let err = match err.downcast::<Status>() {
        Ok(status) => return *status,
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

/// One per connection; shares the service and the concurrency limit with every other connection.
pub(crate) struct ServerDispatch {
    pub(crate) service: ServerService,
    pub(crate) limit: Arc<Semaphore>,
    /// This connection's own cap on requests in flight.
    pub(crate) per_connection: Arc<Semaphore>,
    pub(crate) metrics: Arc<RequestMetrics>,
}

impl Dispatch for ServerDispatch {
    fn dispatch(
        &mut self,
        frame: RequestFrame,
        received_at: Instant,
        responder: Responder,
        tasks: &TaskTracker,
    ) -> Option<ResponseFrame> {
        // Never an unbounded queue: over either limit the client learns at once that nothing ran.
        let Ok(conn_permit) = self.per_connection.clone().try_acquire_owned() else {
            self.metrics.record(&frame.method, Code::ServerBusy, Duration::ZERO);
            return responder.immediate(Status::busy("connection at max_requests_per_connection"));
        };
        let Ok(permit) = self.limit.clone().try_acquire_owned() else {
            self.metrics.record(&frame.method, Code::ServerBusy, Duration::ZERO);
            return responder.immediate(Status::busy("server at max_concurrent_requests"));
        };
        let deadline = frame.timeout.map(|t| received_at + t);
        let method = frame.method.clone();
        let mut req = Request::new(frame.method, frame.payload);
        *req.metadata_mut() = frame.metadata;
        req.set_deadline(deadline);
        let svc = self.service.clone();
        let metrics = self.metrics.clone();
        let span = tracing::debug_span!("request", %method, id = responder.id());
        let work = async move {
            let _permits = (permit, conn_permit);
            if deadline.is_some_and(|d| Instant::now() >= d) {
                metrics.record(&method, Code::DeadlineExceeded, received_at.elapsed());
                responder
                    .error(Status::deadline_exceeded("deadline passed before the handler started"))
                    .await;
                return;
            }
            let call = svc.oneshot(req);
            let result = match deadline {
                Some(d) => match tokio::time::timeout_at(d, call).await {
                    Ok(r) => r,
                    Err(_) => Err(Status::deadline_exceeded("deadline passed while the handler ran").into()),
                },
                None => call.await,
            };
            match result {
                Ok(resp) => {
                    metrics.record(&method, Code::Ok, received_at.elapsed());
                    let (metadata, body) = resp.into_parts();
                    responder.ok(metadata, body).await;
                }
                Err(e) => {
                    let status = status_from_error(e);
                    // Unknown methods share one label, so clients cannot grow the label set.
                    let label = if status.code() == Code::NotFound {
                        "unknown"
                    } else {
                        method.as_str()
                    };
                    metrics.record(label, status.code(), received_at.elapsed());
                    responder.error(status).await;
                }
            }
        };
        tasks.spawn(tracing::Instrument::instrument(work, span));
        None
    }
}
