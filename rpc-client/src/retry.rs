//! A `tower::retry::Policy` with tether's safe-retry rule, for users who stack `RetryLayer` over the
//! client (the client also retries internally, see `ClientConfig::max_attempts`).

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use rpc_core::{Request, Response};

use crate::backoff::BackoffConfig;
use crate::error::{Error, ErrorKind, History};

/// Retries a request that provably did not run ([`Error::may_have_executed`] is false) for a
/// reason that may pass (the connection, no endpoint, UNAVAILABLE, SERVER_BUSY; not a refusal
/// that would come again, such as an interceptor's UNAUTHENTICATED or a body over a limit), or
/// any failed request marked idempotent that may have run, up to `attempts` more times. As in the client's own retries,
/// "may have executed" is sticky: the final error of a request one of whose attempts may have run
/// says so, lists the attempts, and keeps the first such attempt's error as its source. The first
/// retry goes at once, later ones after `backoff` (by default the client's `retry_backoff`: 10 ms
/// doubling to 200 ms). A retry whose wait would reach the request's deadline (its own, or the one
/// it inherited from the request it serves) is not made: the request ends with its last error.
#[derive(Debug, Clone)]
pub struct SafeRetry {
    attempts: usize,
    /// Retries of this request so far.
    retried: u32,
    backoff: BackoffConfig,
    /// Shared with a client, if given one: retries draw on it.
    budget: Option<crate::budget::RetryBudget>,
    /// This request's earlier attempts (tower's `Retry` clones the policy per request).
    history: History,
}

impl SafeRetry {
    /// Up to `attempts` retries per request.
    pub fn new(attempts: usize) -> Self {
        SafeRetry {
            attempts,
            retried: 0,
            backoff: crate::config::ClientConfig::default().retry_backoff,
            budget: None,
            history: History::default(),
        }
    }

    /// Retries also draw on `budget` (usually [`crate::Client::retry_budget`], shared with the
    /// client's own retries): none goes once it is spent.
    pub fn with_budget(mut self, budget: crate::budget::RetryBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// The delay before the second and later retries.
    pub fn with_backoff(mut self, backoff: BackoffConfig) -> Self {
        self.backoff = backoff;
        self
    }
}

impl tower::retry::Policy<Request<Bytes>, Response<Bytes>, Error> for SafeRetry {
    type Future = RetryDelay;

    fn retry(&mut self, req: &mut Request<Bytes>, result: &mut Result<Response<Bytes>, Error>) -> Option<Self::Future> {
        let Err(e) = result else { return None };
        let now = tokio::time::Instant::now();
        let deadline = [req.deadline(), rpc_core::context::deadline()]
            .into_iter()
            .flatten()
            .min();
        // The first retry goes at once; later ones back off.
        let wait = (self.retried > 0).then(|| self.backoff.delay(self.retried, rand::random::<f64>()));
        let at = wait.and_then(|w| now.checked_add(w));
        let worth = if e.may_have_executed() {
            req.is_idempotent()
        } else {
            refusal_may_pass(e)
        };
        let retry = self.attempts > 0
            && worth
            && deadline.is_none_or(|d| d > now && at.is_none_or(|at| at < d))
            && (wait.is_none() || at.is_some())
            && self
                .budget
                .as_ref()
                .is_none_or(crate::budget::RetryBudget::try_withdraw);
        // Take the error out: recorded in the history if retried, or rebuilt with it if final.
        let placeholder = Error::new(ErrorKind::DeadlineExceeded, true);
        let err = std::mem::replace(e, placeholder);
        if !retry {
            *e = err.after(std::mem::take(&mut self.history));
            return None;
        }
        self.attempts -= 1;
        self.retried += 1;
        metrics::counter!(crate::REQUEST_RETRIES, "cause" => err.kind_str()).increment(1);
        self.history.record(None, err);
        Some(RetryDelay {
            sleep: at.map(|at| Box::pin(tokio::time::sleep_until(at))),
        })
    }

    fn clone_request(&mut self, req: &Request<Bytes>) -> Option<Request<Bytes>> {
        Some(req.clone())
    }
}

/// The wait before a [`SafeRetry`] retry: none for the first, the backoff for later ones.
#[derive(Debug)]
pub struct RetryDelay {
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Future for RetryDelay {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        match self.sleep.as_mut() {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => std::task::Poll::Ready(()),
        }
    }
}

/// Whether a request refused without running may succeed if sent again.
fn refusal_may_pass(e: &Error) -> bool {
    use rpc_core::driver::ConnectionError;
    match e.kind() {
        ErrorKind::Status(s) => matches!(s.code(), rpc_core::Code::Unavailable | rpc_core::Code::ServerBusy),
        ErrorKind::Connection(ConnectionError::Encode(_) | ConnectionError::ResponseRejected(_))
        | ErrorKind::NoMethod
        | ErrorKind::Closed
        | ErrorKind::Config(_)
        | ErrorKind::TlsConfig(_) => false,
        _ => true,
    }
}
