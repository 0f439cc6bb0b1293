//! Generated code and service implementations shared by the example binaries and the tests.

#![allow(missing_docs, unreachable_pub)] // generated code

/// `echo.proto`: messages, `echo_client::EchoClient`, `echo_server::{Echo, EchoServer}`.
pub mod echo {
    include!(concat!(env!("OUT_DIR"), "/echo.rs"));
}

/// `greeter.proto`.
pub mod greeter {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/greeter.v1.rs"));
    }
}

/// `feed.proto`: the three kinds of streaming method.
pub mod feed {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/feed.v1.rs"));
    }
}

/// `topic.proto`: a resumable subscription (pub/sub).
pub mod topic {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/topic.v1.rs"));
    }
}

pub mod auth;
pub mod cli;
pub mod services;
