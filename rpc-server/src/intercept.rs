//! Per-service interceptors, as tonic's `InterceptedService`: a function that sees each request of
//! one service before its handler and may refuse it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use rpc_core::{Request, Response, Status};
use tower::Service;

use crate::router::NamedService;

/// Wraps a service (usually a generated one) with `interceptor`, which runs before every request
/// of that service only: it may read or change the request (metadata, `Request::peer`), or refuse
/// it with a status. A refusal is answered "not executed": the handler never ran (clients retry
/// such a refusal only when it may pass: UNAVAILABLE, SERVER_BUSY). Add the result with
/// `ServerBuilder::add_service` like the service itself (under `route`, refusals count as "may
/// have executed").
///
/// ```no_run
/// # use rpc_server::{InterceptedService, Status};
/// # fn wrap<S>(svc: S) -> InterceptedService<S, impl FnMut(rpc_server::Request<bytes::Bytes>) -> Result<rpc_server::Request<bytes::Bytes>, Status> + Clone> {
/// InterceptedService::new(svc, |req: rpc_server::Request<bytes::Bytes>| match req.metadata().get_str("authorization") {
///     Some("Bearer s3cret") => Ok(req),
///     _ => Err(Status::unauthenticated("no valid token")),
/// })
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct InterceptedService<S, F> {
    inner: S,
    interceptor: F,
}

impl<S, F> InterceptedService<S, F> {
    /// `inner`, with `interceptor` run before each of its requests.
    pub fn new(inner: S, interceptor: F) -> Self {
        InterceptedService { inner, interceptor }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: NamedService, F> NamedService for InterceptedService<S, F> {
    const NAME: &'static str = S::NAME;
    // Entry is marked here (or by a generated service inside), after the interceptor let the
    // request through, so its refusals count as "not executed".
    const MARKS_ENTRY: bool = true;
    const METHODS: Option<&'static [&'static str]> = S::METHODS;
}

impl<S, F> Service<Request<Bytes>> for InterceptedService<S, F>
where
    S: NamedService + Service<Request<Bytes>, Response = Response<Bytes>, Error = Status>,
    S::Future: Send + 'static,
    F: FnMut(Request<Bytes>) -> Result<Request<Bytes>, Status>,
{
    type Response = Response<Bytes>;
    type Error = Status;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Bytes>, Status>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        // Refused: stated in the request's task, where the router polls this.
        match (self.interceptor)(req) {
            Ok(req) => {
                // The router calls this from the request's task (through `oneshot`), so the
                // mark lands before any of a hand-written service's code runs.
                if !S::MARKS_ENTRY {
                    crate::entry::mark();
                }
                Box::pin(self.inner.call(req))
            }
            Err(status) => {
                crate::entry::refuse();
                Box::pin(std::future::ready(Err(status)))
            }
        }
    }
}
