//! A `tower::retry::Policy` with tether's safe-retry rule, for users who stack `RetryLayer` over the
//! client (the client also retries internally, see `ClientConfig::max_attempts`).

use std::future::{ready, Ready};

use bytes::Bytes;
use rpc_core::{Request, Response};

use crate::error::Error;

/// Retries a request that provably did not run ([`Error::may_have_executed`] is false), or any
/// failed request marked idempotent, up to `attempts` more times.
#[derive(Debug, Clone, Copy)]
pub struct SafeRetry {
    attempts: usize,
}

impl SafeRetry {
    /// Up to `attempts` retries per request.
    pub fn new(attempts: usize) -> Self {
        SafeRetry { attempts }
    }
}

impl tower::retry::Policy<Request<Bytes>, Response<Bytes>, Error> for SafeRetry {
    type Future = Ready<()>;

    fn retry(&mut self, req: &mut Request<Bytes>, result: &mut Result<Response<Bytes>, Error>) -> Option<Self::Future> {
        let Err(e) = result else { return None };
        if self.attempts == 0 || (e.may_have_executed() && !req.is_idempotent()) {
            return None;
        }
        if req.deadline().is_some_and(|d| d <= tokio::time::Instant::now()) {
            return None;
        }
        self.attempts -= 1;
        metrics::counter!(crate::REQUEST_RETRIES, "cause" => e.kind_str()).increment(1);
        Some(ready(()))
    }

    fn clone_request(&mut self, req: &Request<Bytes>) -> Option<Request<Bytes>> {
        Some(req.clone())
    }
}
