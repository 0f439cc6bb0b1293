//! Routes a request to a service by its method path, `/package.Service/Method`.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use rpc_core::{Request, Response, Status};
use tower::util::ServiceExt;
use tower::Service;

/// A service generated from a protobuf service declares its full name (`package.Service`).
pub trait NamedService {
    /// `package.Service`.
    const NAME: &'static str;
    /// True when the service itself marks the moment its handler is entered (generated code does,
    /// after the request body decoded), so that a body that does not decode is answered "not
    /// executed". Leave it `false` in a hand-written service: the router then marks entry when it
    /// starts the service, and every error the service returns counts as "may have executed".
    #[doc(hidden)]
    const MARKS_ENTRY: bool = false;
    /// The method paths it serves (`/package.Service/Method`), when it knows them (generated code
    /// does): a request for any other path of the service counts as `unknown` in metrics, so a
    /// peer cannot grow the label set by inventing methods. `None` (a hand-written service): every
    /// path of the service counts as its own method.
    #[doc(hidden)]
    const METHODS: Option<&'static [&'static str]> = None;
}

/// The future of a handler started by the router.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Response<Bytes>, Status>> + Send>>;

/// A handler the router can start through a shared reference: each call works on its own clone of
/// the service (generated services clone by bumping a reference count), so routing a request costs
/// one allocation, the future's.
pub trait Handler: Send + Sync + 'static {
    /// Starts the handler for `req`.
    fn start(&self, req: Request<Bytes>) -> HandlerFuture;
}

impl<S> Handler for S
where
    S: Service<Request<Bytes>, Response = Response<Bytes>, Error = Status> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
{
    fn start(&self, req: Request<Bytes>) -> HandlerFuture {
        Box::pin(self.clone().oneshot(req))
    }
}

/// The shared form of every handler service.
pub type BoxHandler = Arc<dyn Handler>;

/// A handler that does not mark its own entry (see [`crate::entry`]): its entry is marked when its
/// future is first polled, before any of its code runs.
struct MarksEntry<S>(S);

impl<S> Handler for MarksEntry<S>
where
    S: Service<Request<Bytes>, Response = Response<Bytes>, Error = Status> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
{
    fn start(&self, req: Request<Bytes>) -> HandlerFuture {
        let fut = self.0.clone().oneshot(req);
        Box::pin(async move {
            crate::entry::mark();
            fut.await
        })
    }
}

/// Maps method paths to handlers: whole services by name, or single methods by path. Unknown
/// methods are answered UNIMPLEMENTED (and "not executed").
#[derive(Clone, Default)]
pub struct Router {
    services: Arc<HashMap<String, RoutedService>>,
    methods: Arc<HashMap<String, BoxHandler>>,
}

/// A whole service: its handler, and the method paths it lists ([`NamedService::METHODS`]).
#[derive(Clone)]
struct RoutedService {
    handler: BoxHandler,
    methods: Option<&'static [&'static str]>,
}

/// The service part of a method path: `package.Service` of `/package.Service/Method`.
fn service_of(method: &str) -> Option<&str> {
    method.strip_prefix('/')?.rsplit_once('/').map(|(service, _)| service)
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("services", &self.services.keys().collect::<Vec<_>>())
            .field("methods", &self.methods.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Router {
    /// An empty router.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a generated service under its [`NamedService::NAME`].
    pub fn add_service<S>(mut self, svc: S) -> Self
    where
        S: NamedService
            + Service<Request<Bytes>, Response = Response<Bytes>, Error = Status>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        let handler: BoxHandler = if S::MARKS_ENTRY {
            Arc::new(svc)
        } else {
            Arc::new(MarksEntry(svc))
        };
        let routed = RoutedService {
            handler,
            methods: S::METHODS,
        };
        Arc::make_mut(&mut self.services).insert(S::NAME.to_string(), routed);
        self
    }

    /// Adds a handler for one method path, for example `/echo.Echo/Say`.
    pub fn route<S>(mut self, path: impl Into<String>, svc: S) -> Self
    where
        S: Service<Request<Bytes>, Response = Response<Bytes>, Error = Status> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
    {
        Arc::make_mut(&mut self.methods).insert(path.into(), Arc::new(MarksEntry(svc)) as BoxHandler);
        self
    }

    /// The services this router serves: every added service, and the service part of every
    /// single-method route (sorted, without repeats).
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) fn service_names(&self) -> Vec<String> {
        let routed = self.methods.keys().filter_map(|m| service_of(m).map(str::to_string));
        let names: std::collections::BTreeSet<String> = self.services.keys().cloned().chain(routed).collect();
        names.into_iter().collect()
    }

    /// True when a handler serves `method` (metric labels use only such paths): a single-method
    /// route, a method a generated service lists, or any path of a service that lists none.
    pub(crate) fn serves(&self, method: &str) -> bool {
        if self.methods.contains_key(method) {
            return true;
        }
        match service_of(method).and_then(|s| self.services.get(s)) {
            Some(RoutedService {
                methods: Some(paths), ..
            }) => paths.contains(&method),
            Some(_) => true,
            None => false,
        }
    }

    fn find(&self, method: &str) -> Option<&BoxHandler> {
        if let Some(h) = self.methods.get(method) {
            return Some(h);
        }
        self.services.get(service_of(method)?).map(|s| &s.handler)
    }
}

pub use future::RouterFuture;

mod future {
    // pin-project-lite cannot document the variants' fields.
    #![allow(missing_docs)]
    use super::*;

    pin_project_lite::pin_project! {
        /// The router's future: the handler's, or an immediate UNIMPLEMENTED.
        #[project = RouterFutureProj]
        pub enum RouterFuture {
            /// The handler runs.
            Handler { fut: HandlerFuture },
            /// No such method.
            NotFound { status: Option<Status> },
        }
    }

    impl std::fmt::Debug for RouterFuture {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("RouterFuture")
        }
    }

    impl std::future::Future for RouterFuture {
        type Output = Result<Response<Bytes>, Status>;

        fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            match self.project() {
                RouterFutureProj::Handler { fut } => fut.as_mut().poll(cx),
                RouterFutureProj::NotFound { status } => {
                    // No handler runs: stated as a refusal in the request's task.
                    crate::entry::refuse();
                    Poll::Ready(Err(status
                        .take()
                        .unwrap_or_else(|| Status::internal("polled after completion"))))
                }
            }
        }
    }
}

impl Service<Request<Bytes>> for Router {
    type Response = Response<Bytes>;
    type Error = Status;
    type Future = RouterFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        // Each request gets its own clone of its handler, driven to readiness by `Oneshot`.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        match self.find(req.method()) {
            Some(h) => RouterFuture::Handler { fut: h.start(req) },
            None => RouterFuture::NotFound {
                status: Some(Status::unknown_method(req.method())),
            },
        }
    }
}

/// A handler from an async function, for routes that are not generated from protobuf.
pub fn handler_fn<F, Fut>(f: F) -> tower::util::ServiceFn<F>
where
    F: FnMut(Request<Bytes>) -> Fut,
    Fut: std::future::Future<Output = Result<Response<Bytes>, Status>>,
{
    tower::service_fn(f)
}
