//! A health service as gRPC users know it (`grpc.health.v1.Health`, see [`rpc_core::health`]):
//! per-service serving status for load balancers and orchestrators, `Check` and `Watch`.
//!
//! `ServerBuilder::health()` serves it: every service the server serves, and `""` for the server
//! as a whole, start SERVING; a graceful shutdown turns them all NOT_SERVING the moment it begins
//! (before a registered server's lame duck and the GOAWAY), so watchers learn it while requests
//! in flight still finish. The application sets statuses through [`HealthReporter`]
//! (`ServerHandle::health`): NOT_SERVING while its database is away, say.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::StreamExt;
use rpc_core::health::{HealthCheckRequest, HealthCheckResponse, ServingStatus, CHECK, SERVICE, WATCH};
use rpc_core::{Request, Response, Status};
use tokio::sync::watch;
use tower::Service;

use crate::codegen::{BoxFuture, BoxStream};
use crate::router::NamedService;

/// Sets the statuses the health service reports. Cheap to clone; clones share the statuses.
#[derive(Debug, Clone, Default)]
pub struct HealthReporter {
    statuses: Arc<Mutex<Statuses>>,
}

#[derive(Debug, Default)]
struct Statuses {
    by_service: HashMap<String, watch::Sender<ServingStatus>>,
    /// Entries made by watches of services not (yet) known: capped, so clients asking for
    /// made-up names cannot grow the map.
    unknown: usize,
    /// The server is stopping: every status is NOT_SERVING from now on, whatever is set.
    stopping: bool,
}

/// The most unknown services watched at once; a watch past it gets SERVICE_UNKNOWN and ends.
const MAX_UNKNOWN_WATCHED: usize = 1024;

impl HealthReporter {
    /// A reporter that knows no service yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Statuses> {
        self.statuses.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets `service`'s status (`""`: the server's); its watchers see the change. Once the
    /// server's graceful shutdown began, every status stays NOT_SERVING.
    pub fn set(&self, service: &str, status: ServingStatus) {
        let mut st = self.lock();
        let status = if st.stopping { ServingStatus::NotServing } else { status };
        let was_unknown = match st.by_service.get(service) {
            Some(tx) => tx.send_replace(status) == ServingStatus::ServiceUnknown,
            None => {
                st.by_service.insert(service.to_owned(), watch::Sender::new(status));
                false
            }
        };
        if was_unknown {
            st.unknown = st.unknown.saturating_sub(1);
        }
    }

    /// `service` takes requests.
    pub fn set_serving(&self, service: &str) {
        self.set(service, ServingStatus::Serving);
    }

    /// `service` takes no requests.
    pub fn set_not_serving(&self, service: &str) {
        self.set(service, ServingStatus::NotServing);
    }

    /// Every known service (and the server) at once.
    pub fn set_all(&self, status: ServingStatus) {
        let st = self.lock();
        let status = if st.stopping { ServingStatus::NotServing } else { status };
        for tx in st.by_service.values() {
            if *tx.borrow() != ServingStatus::ServiceUnknown {
                tx.send_replace(status);
            }
        }
    }

    /// The server began a graceful shutdown: everything NOT_SERVING, for good.
    pub(crate) fn stopping(&self) {
        self.set_all(ServingStatus::NotServing);
        self.lock().stopping = true;
    }

    /// `service`'s status, if it is known.
    pub fn status(&self, service: &str) -> Option<ServingStatus> {
        let s = *self.lock().by_service.get(service)?.borrow();
        (s != ServingStatus::ServiceUnknown).then_some(s)
    }

    /// A receiver of `service`'s status, SERVICE_UNKNOWN until it is set (`None`: too many
    /// unknown services are watched already).
    fn watch(&self, service: &str) -> Option<watch::Receiver<ServingStatus>> {
        let mut st = self.lock();
        if let Some(tx) = st.by_service.get(service) {
            return Some(tx.subscribe());
        }
        if st.unknown >= MAX_UNKNOWN_WATCHED {
            return None;
        }
        st.unknown += 1;
        let tx = watch::Sender::new(ServingStatus::ServiceUnknown);
        let rx = tx.subscribe();
        st.by_service.insert(service.to_owned(), tx);
        Some(rx)
    }
}

/// The `grpc.health.v1.Health` service over a [`HealthReporter`].
#[derive(Debug, Clone)]
pub struct HealthService {
    reporter: HealthReporter,
}

impl HealthService {
    /// The service, reporting what `reporter` is told.
    pub fn new(reporter: HealthReporter) -> Self {
        HealthService { reporter }
    }
}

impl NamedService for HealthService {
    const NAME: &'static str = SERVICE;
    const MARKS_ENTRY: bool = true;
    const METHODS: Option<&'static [&'static str]> = Some(&[CHECK, WATCH]);
}

impl Service<Request<Bytes>> for HealthService {
    type Response = Response<Bytes>;
    type Error = Status;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let reporter = self.reporter.clone();
        match request.method() {
            CHECK => Box::pin(crate::codegen::unary(
                request,
                move |r: Request<HealthCheckRequest>| async move {
                    let service = r.into_body().service;
                    match reporter.status(&service) {
                        Some(s) => Ok(Response::new(HealthCheckResponse::new(s))),
                        None => Err(Status::not_found(format!("unknown service {service:?}"))),
                    }
                },
            )),
            WATCH => Box::pin(crate::codegen::server_streaming(
                request,
                move |r: Request<HealthCheckRequest>| async move {
                    let stream: BoxStream<HealthCheckResponse> = match reporter.watch(&r.into_body().service) {
                        Some(rx) => {
                            let draining = crate::entry::server_tasks().map(|t| t.draining.clone());
                            Box::pin(statuses(rx, draining).map(|s| Ok(HealthCheckResponse::new(s))))
                        }
                        None => Box::pin(futures_util::stream::once(async {
                            Ok(HealthCheckResponse::new(ServingStatus::ServiceUnknown))
                        })),
                    };
                    Ok(Response::new(stream))
                },
            )),
            _ => Box::pin(crate::codegen::not_found(request)),
        }
    }
}

/// A watch's statuses: the current one, then each change (intermediate values may be skipped,
/// never the latest). When the server starts draining the stream says NOT_SERVING (if it had not
/// yet) and ends, so a graceful shutdown does not wait out its grace for watchers.
fn statuses(
    rx: watch::Receiver<ServingStatus>,
    draining: Option<tokio_util::sync::CancellationToken>,
) -> impl futures_util::Stream<Item = ServingStatus> + Send {
    struct State {
        rx: watch::Receiver<ServingStatus>,
        draining: Option<tokio_util::sync::CancellationToken>,
        last: Option<ServingStatus>,
        done: bool,
    }
    let state = State {
        rx,
        draining,
        last: None,
        done: false,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        let draining = st.draining.clone();
        let drained = async {
            match &draining {
                Some(d) => d.cancelled().await,
                None => std::future::pending().await,
            }
        };
        let next = if st.last.is_none() {
            Some(*st.rx.borrow_and_update())
        } else {
            tokio::select! {
                biased;
                changed = st.rx.changed() => match changed {
                    Ok(()) => Some(*st.rx.borrow_and_update()),
                    Err(_) => return None,
                },
                () = drained => None,
            }
        };
        let now = match next {
            Some(s) => s,
            None => {
                // Draining: the last word is NOT_SERVING.
                st.done = true;
                if st.last == Some(ServingStatus::NotServing) {
                    return None;
                }
                ServingStatus::NotServing
            }
        };
        if st.draining.as_ref().is_some_and(|d| d.is_cancelled()) && now == ServingStatus::NotServing {
            st.done = true;
        }
        st.last = Some(now);
        Some((now, st))
    })
}
