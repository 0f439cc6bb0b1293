//! # rpc-server
//!
//! The tether server: a [`Server`] builder that routes `/package.Service/Method` to tower services,
//! runs handlers off the connection's I/O task behind a server-wide concurrency limit (SERVER_BUSY
//! over it, never an unbounded queue), enforces the deadline each request carries, evicts idle
//! connections with GOAWAY(idle), and shuts down gracefully.
//!
//! Generated code from `rpc-proto` produces a server adapter to pass to [`ServerBuilder::add_service`];
//! single methods can be routed with [`ServerBuilder::route`]:
//!
//! ```no_run
//! use bytes::Bytes;
//! use rpc_core::{Request, Response, Status};
//! use rpc_server::{handler_fn, Server};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let server = Server::builder()
//!     .route("/echo.Echo/Say", handler_fn(|req: Request<Bytes>| async move {
//!         Ok::<_, Status>(Response::new(req.into_body()))
//!     }))
//!     .bind("127.0.0.1:0")
//!     .await?;
//! println!("listening on {}", server.local_addr());
//! server.shutdown().await;
//! # Ok(()) }
//! ```

pub mod codegen;
mod config;
mod detach;
mod dispatch;
mod entry;
pub mod health;
mod intercept;
#[cfg(feature = "etcd")]
pub mod registry;
pub mod resume;
mod router;
mod server;
pub mod streaming;

pub use config::ServerConfig;
pub use detach::detach;
pub use dispatch::status_from_error;
pub use entry::Refused;
pub use intercept::InterceptedService;
pub use resume::{Positioned, ReplayLog, ResumeGap, Subscription};
pub use router::{handler_fn, BoxHandler, Handler, HandlerFuture, NamedService, Router, RouterFuture};
pub use rpc_core::include_proto;
#[cfg(feature = "etcd")]
pub use rpc_core::registry::RegistryConfig;
pub use rpc_core::stream::{Counts, SendError, StreamSender, Streaming};
pub use rpc_core::{Code, Metadata, Request, Response, Status};
pub use server::{
    OpenConnection, Server, ServerBuilder, ServerClose, ServerError, ServerHandle, ServerView, CONNECTIONS_REFUSED,
    RECENT_CLOSES, TLS_HANDSHAKE_FAILURES,
};
