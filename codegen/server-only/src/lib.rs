//! A server-only crate: no `rpc-client` in its dependencies.

#![allow(missing_docs, unreachable_pub)] // generated code

pub mod shop {
    pub mod v1 {
        rpc_server::include_proto!("shop.v1");
    }
}
pub mod common {
    pub mod v1 {
        rpc_server::include_proto!("common.v1");
    }
}

use rpc_server::{Request, Response, Status};

/// A clock, with well-known types in and out.
#[derive(Debug, Clone, Default)]
pub struct Clock;

impl shop::v1::clock_server::Clock for Clock {
    async fn now(&self, _request: Request<()>) -> Result<Response<prost_types::Timestamp>, Status> {
        Ok(Response::new(prost_types::Timestamp { seconds: 1, nanos: 0 }))
    }

    async fn sleep(&self, _request: Request<prost_types::Duration>) -> Result<Response<()>, Status> {
        Ok(Response::new(()))
    }
}
