//! Generated code and service implementations shared by the example binaries and the tests.

#![allow(missing_docs, unreachable_pub)] // generated code

/// `echo.proto`: messages, `echo_client::EchoClient`, `echo_server::{Echo, EchoServer}`.
pub mod echo {
    rpc_server::include_proto!("echo");
}

/// `greeter.proto`.
pub mod greeter {
    pub mod v1 {
        rpc_server::include_proto!("greeter.v1");
    }
}

/// `feed.proto`: the three kinds of streaming method.
pub mod feed {
    pub mod v1 {
        rpc_server::include_proto!("feed.v1");
    }
}

/// `topic.proto`: a resumable subscription (pub/sub).
pub mod topic {
    pub mod v1 {
        rpc_server::include_proto!("topic.v1");
    }
}

pub mod auth;
pub mod cli;
pub mod services;
