//! The health-checking protocol, in the shape of gRPC's `grpc.health.v1` (the same service name,
//! methods, messages and field numbers), so load balancers and orchestrators that speak it know
//! what to ask: `Check` answers a service's status at once (NOT_FOUND for a service the server
//! does not know), `Watch` streams it, the current status first, then every change. The service
//! `""` stands for the whole server.

/// The service's full name.
pub const SERVICE: &str = "grpc.health.v1.Health";
/// The `Check` method's path.
pub const CHECK: &str = "/grpc.health.v1.Health/Check";
/// The `Watch` method's path.
pub const WATCH: &str = "/grpc.health.v1.Health/Watch";

/// Which service to report on (`""`: the server as a whole).
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct HealthCheckRequest {
    /// `package.Service`, or `""`.
    #[prost(string, tag = "1")]
    pub service: String,
}

/// A service's status.
#[derive(Clone, Copy, PartialEq, Eq, Hash, prost::Message)]
pub struct HealthCheckResponse {
    /// A [`ServingStatus`].
    #[prost(enumeration = "ServingStatus", tag = "1")]
    pub status: i32,
}

impl HealthCheckResponse {
    /// A response with `status`.
    pub fn new(status: ServingStatus) -> Self {
        HealthCheckResponse { status: status as i32 }
    }
}

/// Whether a service takes requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ServingStatus {
    /// Not known.
    Unknown = 0,
    /// Takes requests.
    Serving = 1,
    /// Takes no requests (stopping, draining, or told so by its application).
    NotServing = 2,
    /// Only in `Watch`: the server does not know the service (yet).
    ServiceUnknown = 3,
}
