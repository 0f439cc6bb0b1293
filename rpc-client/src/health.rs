//! Asking a server's health service (`grpc.health.v1.Health`, see [`rpc_core::health`]), as a
//! load balancer or an orchestrator's probe would.

use rpc_core::health::{HealthCheckRequest, HealthCheckResponse, CHECK, WATCH};
use rpc_core::stream::Streaming;
use rpc_core::Request;

use crate::{Client, Error};

pub use rpc_core::health::{HealthCheckResponse as Response, ServingStatus};

/// `service`'s status now (`""`: the server's). A service the server does not know fails with
/// NOT_FOUND; a server without the health service with UNIMPLEMENTED.
pub async fn check(client: &Client, service: &str) -> Result<ServingStatus, Error> {
    let req = Request::new(HealthCheckRequest {
        service: service.to_owned(),
    });
    let resp: rpc_core::Response<HealthCheckResponse> = crate::codegen::unary(&mut client.clone(), CHECK, req).await?;
    Ok(resp.into_body().status())
}

/// `service`'s status as a stream: the current one, then each change (SERVICE_UNKNOWN while
/// the server does not know it). The stream ends with the server; a dead connection ends it with
/// that connection's error, within the same bound as a unary call.
pub async fn watch(client: &Client, service: &str) -> Result<Streaming<HealthCheckResponse>, Error> {
    let req = Request::new(HealthCheckRequest {
        service: service.to_owned(),
    });
    crate::codegen::server_streaming(client, WATCH, req).await
}
