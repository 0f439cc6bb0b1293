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
//! and in the crate, `rpc_server::include_proto!("echo");` (or `rpc_client::include_proto!`), one
//! file per package, in a module tree that mirrors the packages (`package shop.v1` in
//! `mod shop { pub mod v1 { .. } }`) so messages imported across packages resolve. The files go
//! to `$OUT_DIR/tether/`, apart from tonic's `$OUT_DIR/<package>.rs`: one crate can compile the
//! same `.proto` for both (a migration's first step).
//!
//! A crate that is only a client (or only a server) generates only that side, and needs only that
//! crate: `rpc_proto::configure().build_server(false).compile(..)` (or `build_client(false)`);
//! with both sides generated, the code names `rpc_server` and `rpc_client` both.
//!
//! Well-known types (`google.protobuf.Empty`, `Timestamp`, ...) may be fields, inputs and
//! outputs; they are `prost_types` types, so the crate depends on `prost-types`.
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
    /// A method marked resumable is missing or not server-streaming.
    #[error("resumable method: {0}")]
    Resumable(String),
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
        resumable: Vec::new(),
    }
}

/// Code generation options.
#[derive(Debug, Clone)]
pub struct Builder {
    build_client: bool,
    build_server: bool,
    out_dir: Option<PathBuf>,
    resumable: Vec<String>,
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

    /// Marks a server-streaming method resumable, by its full name (`package.Service.Method`):
    /// its stream survives the death of its connection (see `rpc_client::Client::subscribe`).
    /// The server's handler then takes where the subscriber resumes after and returns
    /// positioned messages; the client's method returns an `rpc_client::Resumable`. A method
    /// that is not server-streaming only (or that no compiled file has) is an error.
    pub fn resumable(mut self, method: impl Into<String>) -> Self {
        self.resumable.push(method.into());
        self
    }

    /// Where to write the generated files (default `$OUT_DIR/tether`, read by `include_proto!`).
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
        for name in &self.resumable {
            check_resumable(&fds, name)?;
        }
        let mut config = prost_build::Config::new();
        let dir = match &self.out_dir {
            Some(dir) => dir.clone(),
            None => {
                let out = std::env::var_os("OUT_DIR").ok_or_else(|| {
                    Error::Generate(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "OUT_DIR is not set: run from a build script, or set out_dir",
                    ))
                })?;
                PathBuf::from(out).join("tether")
            }
        };
        std::fs::create_dir_all(&dir).map_err(Error::Generate)?;
        config.out_dir(&dir);
        // `bytes` fields as `bytes::Bytes`: decoding slices the frame instead of copying.
        config.bytes(["."]);
        config.service_generator(Box::new(
            TetherServiceGenerator::new(self.build_client, self.build_server).resumable(self.resumable.clone()),
        ));
        config.compile_fds(fds).map_err(Error::Generate)
    }
}

/// A method marked resumable exists and is server-streaming only.
fn check_resumable(fds: &prost_types::FileDescriptorSet, name: &str) -> Result<(), Error> {
    let found = fds.file.iter().find_map(|f| {
        f.service.iter().find_map(|s| {
            s.method.iter().find(|m| {
                let full = match f.package() {
                    "" => format!("{}.{}", s.name(), m.name()),
                    p => format!("{p}.{}.{}", s.name(), m.name()),
                };
                full == name
            })
        })
    });
    match found {
        None => Err(Error::Resumable(format!("{name}: no such method"))),
        Some(m) if m.client_streaming() || !m.server_streaming() => Err(Error::Resumable(format!(
            "{name}: only a server-streaming method (one request, a stream of responses) can be resumable"
        ))),
        Some(_) => Ok(()),
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
    fn well_known_types_as_inputs_and_outputs_are_named_absolutely() {
        let dir = tempfile::tempdir().expect("tempdir");
        let proto = write(
            dir.path(),
            "c.proto",
            r#"syntax = "proto3"; package clock;
               import "google/protobuf/empty.proto";
               import "google/protobuf/timestamp.proto";
               service Clock {
                 rpc Now(google.protobuf.Empty) returns (google.protobuf.Timestamp);
                 rpc Ticks(google.protobuf.Timestamp) returns (stream google.protobuf.Timestamp);
               }"#,
        );
        configure()
            .out_dir(dir.path())
            .compile(&[proto], &[dir.path()])
            .expect("compile");
        let code = std::fs::read_to_string(dir.path().join("clock.rs")).expect("generated file");
        let flat: String = code.chars().filter(|c| !c.is_whitespace()).collect();
        assert!(!flat.contains("super::::"), "a path the compiler rejects:\n{code}");
        assert!(!flat.contains("super::()"), "a path the compiler rejects:\n{code}");
        for needle in [
            "pub async fn now(&mut self, request: impl ::rpc_client::IntoRequest<()>",
            "-> Result<::rpc_client::Response<::prost_types::Timestamp>, ::rpc_client::Error",
            "fn ticks(&self, request: ::rpc_server::Request<::prost_types::Timestamp>",
            "::rpc_server::codegen::BoxStream<::prost_types::Timestamp>",
        ] {
            let needle: String = needle.chars().filter(|c| !c.is_whitespace()).collect();
            assert!(flat.contains(&needle), "missing {needle} in:\n{code}");
        }
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
    fn only_a_server_streaming_method_that_exists_can_be_resumable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let proto = write(
            dir.path(),
            "t.proto",
            r#"syntax = "proto3"; package t.v1;
               message A {} message B {}
               service T { rpc Sub(A) returns (stream B); rpc One(A) returns (B); rpc Chat(stream A) returns (stream B); }"#,
        );
        for bad in ["t.v1.T.One", "t.v1.T.Chat", "t.v1.T.Missing"] {
            let err = configure()
                .out_dir(dir.path())
                .resumable(bad)
                .compile(&[&proto], &[dir.path()])
                .expect_err(bad);
            assert!(matches!(err, Error::Resumable(_)), "{bad}: {err:?}");
        }
        configure()
            .out_dir(dir.path())
            .resumable("t.v1.T.Sub")
            .compile(&[&proto], &[dir.path()])
            .expect("compile");
        let code = std::fs::read_to_string(dir.path().join("t.v1.rs")).expect("generated file");
        let flat: String = code.chars().filter(|c| !c.is_whitespace()).collect();
        for needle in [
            "pub async fn sub(",
            "-> Result<::rpc_client::Resumable<super::B>, ::rpc_client::Error>",
            "pub async fn sub_after(",
            "request: ::rpc_server::Request<super::A>, after: Option<u64>,",
            "::rpc_server::codegen::resumable_streaming(request",
        ] {
            let needle: String = needle.chars().filter(|c| !c.is_whitespace()).collect();
            assert!(flat.contains(&needle), "missing {needle} in:\n{code}");
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
