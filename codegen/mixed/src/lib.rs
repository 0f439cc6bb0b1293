//! One `.proto`, two frameworks: `tether::*` is tether's code, `grpc::*` tonic's, side by side.

#![allow(missing_docs, unreachable_pub)] // generated code

/// tether's code, in a module tree that mirrors the packages.
pub mod tether {
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
}

/// tonic's code for the same files.
pub mod grpc {
    pub mod shop {
        pub mod v1 {
            tonic::include_proto!("shop.v1");
        }
    }
    pub mod common {
        pub mod v1 {
            tonic::include_proto!("common.v1");
        }
    }
}
