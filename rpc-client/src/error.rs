//! The client's error: what went wrong and whether the server may have run the request.

use std::fmt;
use std::io;

use rpc_core::config::ConfigError;
use rpc_core::driver::ConnectionError;
use rpc_core::{BoxError, CloseReason, Code, Status};

/// What kind of failure an [`Error`] is.
#[derive(Debug)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The server answered with a non-success status.
    Status(Status),
    /// The request's deadline passed on the client.
    DeadlineExceeded,
    /// The connection failed under the request.
    Connection(ConnectionError),
    /// Connecting failed (refused, unreachable, ...).
    Connect(io::Error),
    /// Connecting took longer than `connect_timeout` (or the request's remaining deadline).
    ConnectTimeout,
    /// The peer did not complete the handshake.
    Handshake(CloseReason),
    /// The TLS handshake failed (untrusted certificate, no client certificate, not TLS, ...).
    Tls(io::Error),
    /// The TLS configuration could not be loaded.
    TlsConfig(rpc_core::tls::TlsConfigError),
    /// No endpoint is alive and none is due for a reconnect attempt (all backing off or discarded).
    NoEndpoint,
    /// The response body did not decode as the method's output message.
    Decode(prost::DecodeError),
    /// The client configuration is invalid.
    Config(ConfigError),
    /// A tower layer around the client failed the request.
    Middleware(BoxError),
    /// The service registry could not be reached to list a service's instances
    /// (`Client::with_registry`, feature `etcd`).
    Registry(String),
    /// A compressed response did not expand (corrupt, an unknown codec, or past
    /// `max_frame_size`: a compression bomb). The server ran the request.
    Decompress(rpc_core::compression::DecompressError),
    /// The request names no method (`Request::new` is for generated clients, which set it; a
    /// call without generated code needs `Request::for_method`). Never sent.
    NoMethod,
    /// The client was closed ([`crate::Client::close`], or every handle on it dropped) before the
    /// request could be sent. Never sent.
    Closed,
}

/// A failed request. Every request ends exactly once, in a response or in one of these, and the
/// error says whether the server may have run it ([`Error::may_have_executed`]).
///
/// After retries it is the last attempt's error, with the earlier attempts listed in
/// [`Error::attempts`]; if any earlier attempt may have run, so may the request, and the first
/// such attempt's error is the [`std::error::Error::source`].
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    may_have_executed: bool,
    /// Earlier attempts; `None` for a request tried once (no allocation on that path).
    history: Option<Box<History>>,
}

/// One attempt of a request that was tried more than once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// The endpoint it went to, if it got as far as choosing one.
    pub endpoint: Option<std::net::SocketAddr>,
    /// What ended it ([`Error::kind_str`]).
    pub kind: &'static str,
    /// Whether the server may have run this attempt.
    pub may_have_executed: bool,
}

/// The attempts a retrying caller made before the last one. "May have executed" is sticky: once
/// an attempt may have run, the request's final error says so whatever later attempts found.
#[derive(Debug, Clone, Default)]
pub struct History {
    attempts: Vec<Attempt>,
    first_executed: Option<std::sync::Arc<Error>>,
}

impl History {
    /// Records a failed attempt that will be retried.
    pub fn record(&mut self, endpoint: Option<std::net::SocketAddr>, err: Error) {
        self.attempts.push(Attempt {
            endpoint,
            kind: err.kind_str(),
            may_have_executed: err.may_have_executed,
        });
        if err.may_have_executed && self.first_executed.is_none() {
            self.first_executed = Some(std::sync::Arc::new(err));
        }
    }

    /// True when an earlier attempt may have run.
    pub fn may_have_executed(&self) -> bool {
        self.first_executed.is_some()
    }

    /// True before any attempt was recorded.
    pub fn is_empty(&self) -> bool {
        self.attempts.is_empty()
    }
}

impl Error {
    /// A connect failure as another caller that waited on the same attempt should see it: the
    /// same kind (I/O errors rebuilt from their kind and text), for connect errors only.
    pub(crate) fn replay_connect(&self) -> Option<Error> {
        let io = |e: &io::Error| io::Error::new(e.kind(), e.to_string());
        let kind = match &self.kind {
            ErrorKind::Connect(e) => ErrorKind::Connect(io(e)),
            ErrorKind::Tls(e) => ErrorKind::Tls(io(e)),
            ErrorKind::ConnectTimeout => ErrorKind::ConnectTimeout,
            ErrorKind::Handshake(r) => ErrorKind::Handshake(r.clone()),
            _ => return None,
        };
        Some(Error::new(kind, self.may_have_executed))
    }

    pub(crate) fn new(kind: ErrorKind, may_have_executed: bool) -> Self {
        Error {
            kind,
            may_have_executed,
            history: None,
        }
    }

    /// The server's answer was not SUCCESS. Whatever its code, the server may have run the request:
    /// only the server's runtime can state that it did not, and errors built from a `Status`
    /// never claim it.
    pub fn status(status: Status) -> Self {
        Error::new(ErrorKind::Status(status), true)
    }

    /// The server's runtime answered `status` without starting the handler.
    pub(crate) fn refused(status: Status) -> Self {
        Error::new(ErrorKind::Status(status), false)
    }

    /// This error as the last of several attempts: lists the earlier ones, and may have executed
    /// if any of them may have.
    pub fn after(mut self, mut history: History) -> Self {
        if history.is_empty() {
            return self;
        }
        self.may_have_executed |= history.may_have_executed();
        // This error may carry attempts of its own (a client's retries under a retry layer):
        // they came after the ones recorded here.
        if let Some(own) = self.history.take() {
            history.attempts.extend(own.attempts);
            if history.first_executed.is_none() {
                history.first_executed = own.first_executed;
            }
        }
        self.history = Some(Box::new(history));
        self
    }

    /// The attempts made before the one this error ended (empty for a request tried once).
    pub fn attempts(&self) -> &[Attempt] {
        self.history.as_ref().map_or(&[], |h| &h.attempts)
    }

    pub(crate) fn deadline(may_have_executed: bool) -> Self {
        Error::new(ErrorKind::DeadlineExceeded, may_have_executed)
    }

    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// False proves the server did not run the request (so it is safe to retry); true means it may have.
    pub fn may_have_executed(&self) -> bool {
        self.may_have_executed
    }

    /// The status code: the server's, or `DEADLINE_EXCEEDED` for a client-side deadline, or
    /// `UNAVAILABLE` for connection failures.
    pub fn code(&self) -> Code {
        match &self.kind {
            ErrorKind::Status(s) => s.code(),
            ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
            ErrorKind::Decode(_) => Code::Internal,
            ErrorKind::Decompress(_) => Code::ResourceExhausted,
            ErrorKind::Config(_) | ErrorKind::TlsConfig(_) | ErrorKind::NoMethod => Code::InvalidArgument,
            ErrorKind::Middleware(_) => Code::Unknown(0xFFFF),
            // As gRPC reports a call on a closed channel.
            ErrorKind::Closed => Code::Cancelled,
            _ => Code::Unavailable,
        }
    }

    /// The server's status, if it answered (`None` for failures of this side or the connection;
    /// [`Error::code`] covers both, and `Status::from(err)` turns any error into a status, as a
    /// handler passing on a downstream failure wants).
    pub fn as_status(&self) -> Option<&Status> {
        match &self.kind {
            ErrorKind::Status(s) => Some(s),
            _ => None,
        }
    }

    /// True when the deadline passed (on the client, or as the server's answer).
    pub fn is_deadline_exceeded(&self) -> bool {
        self.code() == Code::DeadlineExceeded
    }

    /// True when the connection failed (or could not be made).
    pub fn is_connection(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Connection(_)
                | ErrorKind::Connect(_)
                | ErrorKind::ConnectTimeout
                | ErrorKind::Handshake(_)
                | ErrorKind::NoEndpoint
                | ErrorKind::Tls(_)
        )
    }

    /// Why the connection closed, when that is the failure.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        match &self.kind {
            ErrorKind::Connection(c) => c.close_reason(),
            ErrorKind::Handshake(r) => Some(r),
            _ => None,
        }
    }

    /// A short lowercase name for the kind, for logs and metric labels.
    pub fn kind_str(&self) -> &'static str {
        match &self.kind {
            ErrorKind::Status(_) => "status",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::Connection(_) => "connection",
            ErrorKind::Connect(_) => "connect",
            ErrorKind::ConnectTimeout => "connect_timeout",
            ErrorKind::Handshake(_) => "handshake",
            ErrorKind::NoEndpoint => "no_endpoint",
            ErrorKind::Tls(_) => "tls",
            ErrorKind::TlsConfig(_) => "tls_config",
            ErrorKind::Decode(_) => "decode",
            ErrorKind::Config(_) => "config",
            ErrorKind::Middleware(_) => "middleware",
            ErrorKind::Registry(_) => "registry",
            ErrorKind::NoMethod => "no_method",
            ErrorKind::Decompress(_) => "decompress",
            ErrorKind::Closed => "closed",
        }
    }

    /// Turns an error from a tower stack around the client back into an `Error`.
    pub fn from_box(err: BoxError) -> Self {
        let err = match err.downcast::<Error>() {
            Ok(e) => return *e,
            Err(e) => e,
        };
        let err = match err.downcast::<Status>() {
            Ok(s) => return Error::status(*s),
            Err(e) => e,
        };
        if err.is::<tower::timeout::error::Elapsed>() {
            return Error::deadline(true);
        }
        // Load shed and rate limits refuse before the request reaches the client: never run.
        let executed = !err.is::<tower::load_shed::error::Overloaded>();
        Error::new(ErrorKind::Middleware(err), executed)
    }
}

impl From<ConnectionError> for Error {
    fn from(e: ConnectionError) -> Self {
        let executed = e.may_have_executed();
        Error::new(ErrorKind::Connection(e), executed)
    }
}

impl From<Status> for Error {
    fn from(s: Status) -> Self {
        Error::status(s)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ErrorKind::Status(s) => write!(f, "server answered {s}")?,
            ErrorKind::DeadlineExceeded => f.write_str("deadline exceeded")?,
            ErrorKind::Connection(e) => write!(f, "{e}")?,
            ErrorKind::Connect(e) => write!(f, "connect failed: {e}")?,
            ErrorKind::ConnectTimeout => f.write_str("connect timed out")?,
            ErrorKind::Handshake(r) => write!(f, "handshake failed: {r}")?,
            ErrorKind::NoEndpoint => f.write_str("no endpoint available (all backing off or discarded)")?,
            ErrorKind::Tls(e) => write!(f, "TLS handshake failed: {e}")?,
            ErrorKind::TlsConfig(e) => write!(f, "TLS configuration: {e}")?,
            ErrorKind::Decode(e) => write!(f, "response did not decode: {e}")?,
            ErrorKind::Config(e) => write!(f, "invalid client config: {e}")?,
            ErrorKind::Middleware(e) => write!(f, "middleware: {e}")?,
            ErrorKind::Registry(e) => write!(f, "service registry: {e}")?,
            ErrorKind::Decompress(e) => write!(f, "response did not decompress: {e}")?,
            ErrorKind::NoMethod => {
                f.write_str("request has no method path (Request::for_method, or a generated client)")?
            }
            ErrorKind::Closed => f.write_str("the client is closed")?,
        }
        if !self.may_have_executed {
            f.write_str(" (not executed)")?;
        }
        let attempts = self.attempts();
        if !attempts.is_empty() {
            write!(f, "; after {} earlier attempt(s):", attempts.len())?;
            for a in attempts {
                let ran = if a.may_have_executed {
                    "may have executed"
                } else {
                    "not executed"
                };
                match a.endpoint {
                    Some(ep) => write!(f, " [{} at {ep}, {ran}]", a.kind)?,
                    None => write!(f, " [{}, {ran}]", a.kind)?,
                }
            }
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        if let Some(first) = self.history.as_ref().and_then(|h| h.first_executed.as_deref()) {
            return Some(first);
        }
        match &self.kind {
            ErrorKind::Status(s) => Some(s),
            ErrorKind::Connection(e) => Some(e),
            ErrorKind::Connect(e) => Some(e),
            ErrorKind::Handshake(r) => Some(r),
            ErrorKind::Tls(e) => Some(e),
            ErrorKind::TlsConfig(e) => Some(e),
            ErrorKind::Decode(e) => Some(e),
            ErrorKind::Decompress(e) => Some(e),
            ErrorKind::Config(e) => Some(e),
            ErrorKind::Middleware(e) => Some(e.as_ref()),
            ErrorKind::DeadlineExceeded
            | ErrorKind::ConnectTimeout
            | ErrorKind::NoEndpoint
            | ErrorKind::Registry(_)
            | ErrorKind::NoMethod
            | ErrorKind::Closed => None,
        }
    }
}

/// An error as a status: the server's own, or for any other failure its [`Error::code`] and the
/// error's text (with the attempts). For a handler that returns a downstream call's failure:
/// `client.unary(req).await.map_err(Status::from)?`. Whether the downstream request ran is not
/// carried: the handler that returns it has run.
impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let text = e.to_string();
        match e.kind {
            ErrorKind::Status(s) if e.history.is_none() => s,
            ErrorKind::Status(s) => {
                let (code, _, metadata) = s.into_parts();
                Status::from_parts(code, text, metadata)
            }
            _ => Status::new(e.code(), text),
        }
    }
}
