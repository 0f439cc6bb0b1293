//! # rpc-proto
//!
//! Build-time code generation for tether. From `.proto` files it generates, next to prost's message
//! types, a typed client and a server trait for every service. Files are parsed with `protox`, so
//! no `protoc` binary is needed.
//!
//! In `build.rs`:
//!
//! ```no_run
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     rpc_proto::compile_protos("proto/echo.proto")?;
//!     Ok(())
//! }
//! ```
//!
//! and in the crate, `include!(concat!(env!("OUT_DIR"), "/echo.rs"));` (one file per package).
//!
//! For a service `Echo` in package `echo` this produces:
//! - `echo_client::EchoClient<T>`: one `async fn` per method, generic over the transport `T` (an
//!   `rpc_client::Client`, or any tower stack over one);
//! - `echo_server::Echo`: the trait to implement, one method per RPC;
//! - `echo_server::EchoServer<T>`: the adapter to pass to `rpc_server::Server::builder().add_service(..)`.
//!
//! Protobuf `bytes` fields are generated as `bytes::Bytes`, so decoding a payload does not copy it.
//!
//! Streaming methods of all three kinds are generated: on the client, as methods of the client
//! over an `rpc_client::Client` (returning an `rpc_client::Streaming` of responses, and taking a
//! `futures::Stream` of requests); on the server, as trait methods taking a
//! `Request<rpc_server::Streaming<M>>` and returning a `Response<rpc_server::codegen::BoxStream<R>>`.

mod generator;

use std::path::{Path, PathBuf};

pub use generator::TetherServiceGenerator;

/// A build-time error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A `.proto` file did not parse or resolve.
    #[error("failed to parse .proto files: {0}")]
    Parse(#[source] Box<protox::Error>),
    /// Writing the generated code failed.
    #[error("code generation failed: {0}")]
    Generate(#[source] std::io::Error),
}

/// Compiles one `.proto` file, with its own directory as the include path, into `OUT_DIR`.
pub fn compile_protos(proto: impl AsRef<Path>) -> Result<(), Error> {
    let proto = proto.as_ref();
    let include = proto.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    configure().compile(&[proto], &[include])
}

/// A builder for more control: which sides to generate, where to write.
pub fn configure() -> Builder {
    Builder {
        build_client: true,
        build_server: true,
        out_dir: None,
    }
}

/// Code generation options.
#[derive(Debug, Clone)]
pub struct Builder {
    build_client: bool,
    build_server: bool,
    out_dir: Option<PathBuf>,
}

impl Builder {
    /// Generate typed clients (default `true`).
    pub fn build_client(mut self, yes: bool) -> Self {
        self.build_client = yes;
        self
    }

    /// Generate server traits and adapters (default `true`).
    pub fn build_server(mut self, yes: bool) -> Self {
        self.build_server = yes;
        self
    }

    /// Where to write the generated files (default `OUT_DIR`).
    pub fn out_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.out_dir = Some(dir.into());
        self
    }

    /// Parses `protos` (searching `includes` for imports) and writes one Rust file per package.
    pub fn compile(self, protos: &[impl AsRef<Path>], includes: &[impl AsRef<Path>]) -> Result<(), Error> {
        for p in protos {
            println!("cargo:rerun-if-changed={}", p.as_ref().display());
        }
        for i in includes {
            println!("cargo:rerun-if-changed={}", i.as_ref().display());
        }
        let fds = protox::compile(protos, includes).map_err(|e| Error::Parse(Box::new(e)))?;
        let mut config = prost_build::Config::new();
        if let Some(dir) = &self.out_dir {
            config.out_dir(dir);
        }
        // `bytes` fields as `bytes::Bytes`: decoding slices the frame instead of copying.
        config.bytes(["."]);
        config.service_generator(Box::new(TetherServiceGenerator::new(
            self.build_client,
            self.build_server,
        )));
        config.compile_fds(fds).map_err(Error::Generate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write proto");
        p
    }

    #[test]
    fn streaming_methods_of_all_three_kinds_generate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let proto = write(
            dir.path(),
            "s.proto",
            r#"syntax = "proto3"; package demo;
               message A {} message B {}
               service Feed {
                 rpc Get(A) returns (B);
                 rpc Watch(A) returns (stream B);
                 rpc Upload(stream A) returns (B);
                 rpc Chat(stream A) returns (stream B);
               }"#,
        );
        configure()
            .out_dir(dir.path())
            .compile(&[proto], &[dir.path()])
            .expect("compile");
        let code = std::fs::read_to_string(dir.path().join("demo.rs")).expect("generated file");
        // prost-build formats the code: compare without whitespace.
        let flat: String = code.chars().filter(|c| !c.is_whitespace()).collect();
        for needle in [
            "impl FeedClient<::rpc_client::Client>",
            "pub async fn watch(&self, request: impl ::rpc_client::IntoRequest<super::A>",
            "-> Result<::rpc_client::Streaming<super::B>, ::rpc_client::Error>",
            "pub async fn upload<S>(",
            "pub async fn chat<S>(",
            "fn watch(&self, request: ::rpc_server::Request<super::A>",
            "Output = Result<::rpc_server::Response<::rpc_server::codegen::BoxStream<super::B>>",
            "fn upload(&self, request: ::rpc_server::Request<::rpc_server::Streaming<super::A>>",
            "::rpc_server::codegen::bidi_streaming(request",
        ] {
            let needle: String = needle.chars().filter(|c| !c.is_whitespace()).collect();
            assert!(flat.contains(&needle), "missing {needle} in:\n{code}");
        }
    }

    #[test]
    fn unary_service_generates_client_and_server() {
        let dir = tempfile::tempdir().expect("tempdir");
        let proto = write(
            dir.path(),
            "g.proto",
            r#"syntax = "proto3"; package greet.v1;
               message Hi { string name = 1; } message Ho { string text = 1; }
               // Says hello.
               service Greeter { rpc SayHello(Hi) returns (Ho); rpc SayBye(Hi) returns (Ho); }"#,
        );
        configure()
            .out_dir(dir.path())
            .compile(&[proto], &[dir.path()])
            .expect("compile");
        let code = std::fs::read_to_string(dir.path().join("greet.v1.rs")).expect("generated file");
        for needle in [
            "pub mod greeter_client",
            "pub struct GreeterClient<T>",
            "pub async fn say_hello(",
            "\"/greet.v1.Greeter/SayHello\"",
            "pub trait Greeter: Send + Sync + 'static",
            "const NAME: &'static str = \"greet.v1.Greeter\"",
        ] {
            assert!(code.contains(needle), "missing {needle} in:\n{code}");
        }
    }

    #[test]
    fn parse_errors_are_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let proto = write(dir.path(), "bad.proto", "syntax = \"proto3\"; message {");
        let err = configure()
            .out_dir(dir.path())
            .compile(&[proto], &[dir.path()])
            .expect_err("must fail");
        assert!(matches!(err, Error::Parse(_)), "{err:?}");
    }
}
