//! Wire status: what the peer said about a request. Transport failures are in [`crate::error`].
//!
//! The codes are gRPC's set (same names and meanings, so a service ported from tonic keeps its
//! error handling), plus tether's own SERVER_BUSY, APPLICATION_ERROR and PROTOCOL_ERROR. Their
//! values on the wire are tether's (version 1 assigned 0 to 11 before the gRPC set was complete,
//! and peers of that version must keep reading them); [`Code::grpc`] gives the gRPC number.
//!
//! A code never says whether the server ran the request: a handler may return any of them after
//! doing its work. Only the runtime can prove a request did not run, and it says so with a flag
//! on the response (see `PROTOCOL.md`, *Flags*), which clients read as
//! `may_have_executed() == false`.

use std::fmt;

use crate::message::Metadata;

macro_rules! codes {
    ($($(#[$doc:meta])* $name:ident = $value:literal, $text:literal, $grpc:literal;)*) => {
        /// The status code of a response.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum Code {
            $($(#[$doc])* $name,)*
            /// A code this build does not know (kept with its wire value).
            Unknown(u16),
        }

        impl Code {
            /// Every known code, in wire order.
            pub const ALL: &'static [Code] = &[$(Code::$name),*];

            /// The code's value on the wire.
            pub fn as_u16(self) -> u16 {
                match self {
                    $(Code::$name => $value,)*
                    Code::Unknown(v) => v,
                }
            }

            /// The code for a wire value; unknown values are kept as `Unknown`.
            pub fn from_u16(v: u16) -> Self {
                match v {
                    $($value => Code::$name,)*
                    v => Code::Unknown(v),
                }
            }

            /// The name, as gRPC spells it (`SUCCESS` for `Ok`, tether's own codes by their names).
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Code::$name => $text,)*
                    Code::Unknown(_) => "UNKNOWN",
                }
            }

            /// The gRPC status number with the same meaning (tether's own codes map to the closest:
            /// SERVER_BUSY to RESOURCE_EXHAUSTED, APPLICATION_ERROR to UNKNOWN, PROTOCOL_ERROR to
            /// INTERNAL).
            pub fn grpc(self) -> u16 {
                match self {
                    $(Code::$name => $grpc,)*
                    Code::Unknown(_) => 2,
                }
            }
        }
    };
}

codes! {
    /// Success.
    Ok = 0, "SUCCESS", 0;
    /// The server was at a concurrency limit. Sent by the runtime, which then also states that
    /// the handler did not run.
    ServerBusy = 1, "SERVER_BUSY", 8;
    /// The deadline passed before the server finished (or started) the request.
    DeadlineExceeded = 2, "DEADLINE_EXCEEDED", 4;
    /// Something the request names does not exist (gRPC's NOT_FOUND). For a method the server
    /// does not have, the runtime answers [`Code::Unimplemented`].
    NotFound = 3, "NOT_FOUND", 5;
    /// The handler's work failed (tether's catch-all for application errors).
    ApplicationError = 4, "APPLICATION_ERROR", 2;
    /// The request broke the protocol.
    ProtocolError = 5, "PROTOCOL_ERROR", 13;
    /// The request is invalid (for example its body did not decode as the method's input).
    InvalidArgument = 6, "INVALID_ARGUMENT", 3;
    /// Missing or bad credentials.
    Unauthenticated = 7, "UNAUTHENTICATED", 16;
    /// The caller is not allowed to do this.
    PermissionDenied = 8, "PERMISSION_DENIED", 7;
    /// The service is unavailable right now (gRPC's idiom for a failing dependency, too).
    Unavailable = 9, "UNAVAILABLE", 14;
    /// The request was cancelled.
    Cancelled = 10, "CANCELLED", 1;
    /// A bug on the server side (for example a handler that panicked).
    Internal = 11, "INTERNAL", 13;
    /// The server has no such method.
    Unimplemented = 12, "UNIMPLEMENTED", 12;
    /// What the request tried to create exists already.
    AlreadyExists = 13, "ALREADY_EXISTS", 6;
    /// The system is not in a state the operation requires.
    FailedPrecondition = 14, "FAILED_PRECONDITION", 9;
    /// The operation was aborted (for example by a concurrency conflict).
    Aborted = 15, "ABORTED", 10;
    /// A resource (quota, space, a size limit) is exhausted.
    ResourceExhausted = 16, "RESOURCE_EXHAUSTED", 8;
    /// The operation went past a valid range.
    OutOfRange = 17, "OUT_OF_RANGE", 11;
    /// Unrecoverable data loss or corruption.
    DataLoss = 18, "DATA_LOSS", 15;
    /// An error of an unknown kind (gRPC's UNKNOWN).
    UnknownError = 19, "UNKNOWN", 2;
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Code::Unknown(v) => write!(f, "UNKNOWN({v})"),
            c => f.write_str(c.as_str()),
        }
    }
}

/// A non-success answer: a code, a message and metadata. Handlers return it; clients receive it.
///
/// Whatever its code, a status a handler returns means the handler may have done its work:
/// whether a request ran is stated by the runtime, never by a code (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    code: Code,
    message: String,
    metadata: Metadata,
}

macro_rules! constructors {
    ($($(#[$doc:meta])* $fn:ident => $code:ident;)*) => {
        impl Status {
            $($(#[$doc])* pub fn $fn(message: impl Into<String>) -> Self {
                Self::new(Code::$code, message)
            })*
        }
    };
}

constructors! {
    /// CANCELLED.
    cancelled => Cancelled;
    /// UNKNOWN (gRPC's code for an error of no known kind).
    unknown => UnknownError;
    /// INVALID_ARGUMENT.
    invalid_argument => InvalidArgument;
    /// DEADLINE_EXCEEDED.
    deadline_exceeded => DeadlineExceeded;
    /// NOT_FOUND: something the request names does not exist.
    not_found => NotFound;
    /// ALREADY_EXISTS.
    already_exists => AlreadyExists;
    /// PERMISSION_DENIED.
    permission_denied => PermissionDenied;
    /// RESOURCE_EXHAUSTED.
    resource_exhausted => ResourceExhausted;
    /// FAILED_PRECONDITION.
    failed_precondition => FailedPrecondition;
    /// ABORTED.
    aborted => Aborted;
    /// OUT_OF_RANGE.
    out_of_range => OutOfRange;
    /// UNIMPLEMENTED.
    unimplemented => Unimplemented;
    /// INTERNAL.
    internal => Internal;
    /// UNAVAILABLE.
    unavailable => Unavailable;
    /// DATA_LOSS.
    data_loss => DataLoss;
    /// UNAUTHENTICATED.
    unauthenticated => Unauthenticated;
    /// SERVER_BUSY. From a handler this is an ordinary error (the handler ran); the runtime's
    /// own SERVER_BUSY answers also state that nothing ran.
    busy => ServerBusy;
    /// APPLICATION_ERROR: what a handler returns when its work failed.
    application => ApplicationError;
    /// PROTOCOL_ERROR.
    protocol_error => ProtocolError;
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

    /// UNIMPLEMENTED for a method the server does not have.
    pub fn unknown_method(method: &str) -> Self {
        Self::new(Code::Unimplemented, format!("no such method: {method}"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_its_wire_value_and_names_are_unique() {
        let mut names = std::collections::HashSet::new();
        for c in Code::ALL {
            assert_eq!(Code::from_u16(c.as_u16()), *c);
            assert!(names.insert(c.as_str()), "duplicate name {}", c.as_str());
        }
        assert_eq!(Code::from_u16(999), Code::Unknown(999));
        // Version 1's values are unchanged, so a v1 peer reads them as it always did.
        assert_eq!(Code::ServerBusy.as_u16(), 1);
        assert_eq!(Code::Internal.as_u16(), 11);
        assert_eq!(Code::Unimplemented.grpc(), 12);
    }
}
