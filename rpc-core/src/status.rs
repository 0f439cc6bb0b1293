//! Wire status: what the peer said about a request. Transport failures are in [`crate::error`].

use std::fmt;

use crate::message::Metadata;

/// The status code of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Code {
    /// Success.
    Ok,
    /// The server was at its concurrency limit and did not run the request.
    ServerBusy,
    /// The deadline passed before the server finished (or started) the request.
    DeadlineExceeded,
    /// No such method.
    NotFound,
    /// The handler returned an error.
    ApplicationError,
    /// The request broke the protocol (bad body, bad metadata).
    ProtocolError,
    /// The request body could not be decoded as the method's input message.
    InvalidArgument,
    /// Missing or bad credentials.
    Unauthenticated,
    /// The caller is not allowed to do this.
    PermissionDenied,
    /// The server is shutting down and did not run the request.
    Unavailable,
    /// The request was cancelled.
    Cancelled,
    /// A bug on the server side (for example a handler panicked).
    Internal,
    /// A code this build does not know.
    Unknown(u16),
}

impl Code {
    /// The code's value on the wire.
    pub fn as_u16(self) -> u16 {
        match self {
            Code::Ok => 0,
            Code::ServerBusy => 1,
            Code::DeadlineExceeded => 2,
            Code::NotFound => 3,
            Code::ApplicationError => 4,
            Code::ProtocolError => 5,
            Code::InvalidArgument => 6,
            Code::Unauthenticated => 7,
            Code::PermissionDenied => 8,
            Code::Unavailable => 9,
            Code::Cancelled => 10,
            Code::Internal => 11,
            Code::Unknown(v) => v,
        }
    }

    /// The code for a wire value; unknown values are kept as `Unknown`.
    pub fn from_u16(v: u16) -> Self {
        match v {
            0 => Code::Ok,
            1 => Code::ServerBusy,
            2 => Code::DeadlineExceeded,
            3 => Code::NotFound,
            4 => Code::ApplicationError,
            5 => Code::ProtocolError,
            6 => Code::InvalidArgument,
            7 => Code::Unauthenticated,
            8 => Code::PermissionDenied,
            9 => Code::Unavailable,
            10 => Code::Cancelled,
            11 => Code::Internal,
            v => Code::Unknown(v),
        }
    }

    /// True when a response with this code proves the server did not run the request's handler.
    pub fn proves_not_executed(self) -> bool {
        matches!(self, Code::ServerBusy | Code::NotFound | Code::Unavailable)
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Code::Ok => "SUCCESS",
            Code::ServerBusy => "SERVER_BUSY",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Code::NotFound => "NOT_FOUND",
            Code::ApplicationError => "APPLICATION_ERROR",
            Code::ProtocolError => "PROTOCOL_ERROR",
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::Unauthenticated => "UNAUTHENTICATED",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::Unavailable => "UNAVAILABLE",
            Code::Cancelled => "CANCELLED",
            Code::Internal => "INTERNAL",
            Code::Unknown(v) => return write!(f, "UNKNOWN({v})"),
        };
        f.write_str(s)
    }
}

/// A non-success answer: a code, a message and metadata. Handlers return it; clients receive it.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    code: Code,
    message: String,
    metadata: Metadata,
}

impl Status {
    /// A status with a code and message.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Status {
            code,
            message: message.into(),
            metadata: Metadata::new(),
        }
    }

    /// APPLICATION_ERROR with a message: what a handler returns when its work failed.
    pub fn application(message: impl Into<String>) -> Self {
        Self::new(Code::ApplicationError, message)
    }

    /// NOT_FOUND for a method.
    pub fn not_found(method: &str) -> Self {
        Self::new(Code::NotFound, format!("no such method: {method}"))
    }

    /// SERVER_BUSY.
    pub fn busy(message: impl Into<String>) -> Self {
        Self::new(Code::ServerBusy, message)
    }

    /// DEADLINE_EXCEEDED.
    pub fn deadline_exceeded(message: impl Into<String>) -> Self {
        Self::new(Code::DeadlineExceeded, message)
    }

    /// INVALID_ARGUMENT.
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    /// UNAUTHENTICATED.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(Code::Unauthenticated, message)
    }

    /// INTERNAL.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Code::Internal, message)
    }

    /// The code.
    pub fn code(&self) -> Code {
        self.code
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// The metadata, mutably.
    pub fn metadata_mut(&mut self) -> &mut Metadata {
        &mut self.metadata
    }

    /// Splits into parts.
    pub fn into_parts(self) -> (Code, String, Metadata) {
        (self.code, self.message, self.metadata)
    }

    /// Builds from parts.
    pub fn from_parts(code: Code, message: String, metadata: Metadata) -> Self {
        Status {
            code,
            message,
            metadata,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() {
            write!(f, "{}", self.code)
        } else {
            write!(f, "{}: {}", self.code, self.message)
        }
    }
}

impl std::error::Error for Status {}
