//! The prost-build `ServiceGenerator` that writes tether clients and servers.
//!
//! Generated code names everything by absolute path (`::rpc_client::...`, `::rpc_server::...`) so
//! it cannot clash with user types; message types are referenced relative to the package module.

use std::fmt::Write;

use prost_build::{Method, Service, ServiceGenerator};

/// Writes a typed client and a server trait plus adapter for each service.
#[derive(Debug, Clone)]
pub struct TetherServiceGenerator {
    client: bool,
    server: bool,
    /// Server-streaming methods marked resumable, by full name (`package.Service.Method`).
    resumable: Vec<String>,
}

impl TetherServiceGenerator {
    /// Generates the client side, the server side, or both.
    pub fn new(client: bool, server: bool) -> Self {
        TetherServiceGenerator {
            client,
            server,
            resumable: Vec::new(),
        }
    }

    /// Marks server-streaming methods resumable, by full name (`package.Service.Method`).
    pub fn resumable(mut self, methods: impl IntoIterator<Item = String>) -> Self {
        self.resumable.extend(methods);
        self
    }

    fn is_resumable(&self, s: &Service, m: &Method) -> bool {
        let name = format!("{}.{}", full_name(s), m.proto_name);
        self.resumable.contains(&name)
    }
}

fn full_name(s: &Service) -> String {
    if s.package.is_empty() {
        s.proto_name.clone()
    } else {
        format!("{}.{}", s.package, s.proto_name)
    }
}

/// A message type as named from inside the generated client or server module: prost names the
/// package's own and imported messages relative to the package module (one `super::` more from
/// here), and well-known types absolutely (`::prost_types::Timestamp`, or `()` for `Empty`), which
/// stay as they are.
fn ty(prost_path: &str) -> String {
    if prost_path.starts_with("::") || prost_path.starts_with('(') {
        prost_path.to_owned()
    } else {
        format!("super::{prost_path}")
    }
}

fn path(s: &Service, m: &Method) -> String {
    format!("/{}/{}", full_name(s), m.proto_name)
}

fn snake(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn doc(comments: &prost_build::Comments, indent: &str, buf: &mut String) {
    for line in comments.leading.iter().flat_map(|c| c.lines()) {
        let _ = writeln!(buf, "{indent}///{line}");
    }
}

impl TetherServiceGenerator {
    fn client(&self, s: &Service, buf: &mut String) {
        let name = &s.name;
        let module = format!("{}_client", snake(&s.name));
        let full = full_name(s);
        let _ = writeln!(buf, "/// Typed client for `{full}`.");
        let _ = writeln!(buf, "pub mod {module} {{");
        let _ = writeln!(buf, "    #![allow(clippy::all, unused_imports)]");
        let _ = writeln!(buf, "    use ::rpc_client::codegen::{{BoxError, Bytes, Service}};");
        let _ = writeln!(buf);
        doc(&s.comments, "    ", buf);
        let _ = writeln!(buf, "    /// Typed client for `{full}`, generic over the transport: an `rpc_client::Client` or any tower stack over one.");
        let _ = writeln!(buf, "    #[derive(Debug, Clone)]");
        let _ = writeln!(buf, "    pub struct {name}Client<T> {{ inner: T }}");
        let _ = writeln!(
            buf,
            r#"
    impl {name}Client<::rpc_client::Client> {{
        /// Connects to `addr` (handshake done) and returns a client over the connection.
        pub async fn connect(addr: impl ::rpc_client::ToSocketAddrs, config: ::rpc_client::ClientConfig) -> Result<Self, ::rpc_client::Error> {{
            Ok(Self::new(::rpc_client::Client::connect(addr, config).await?))
        }}
    }}

    impl<T> {name}Client<T>
    where
        T: Service<::rpc_client::Request<Bytes>, Response = ::rpc_client::Response<Bytes>>,
        T::Error: Into<BoxError>,
    {{
        /// Wraps a transport.
        pub fn new(inner: T) -> Self {{ Self {{ inner }} }}
        /// The transport.
        pub fn get_ref(&self) -> &T {{ &self.inner }}
        /// The transport, mutably.
        pub fn get_mut(&mut self) -> &mut T {{ &mut self.inner }}
        /// Unwraps the transport.
        pub fn into_inner(self) -> T {{ self.inner }}"#
        );
        for m in s.methods.iter().filter(|m| !m.client_streaming && !m.server_streaming) {
            let _ = writeln!(buf);
            doc(&m.comments, "        ", buf);
            let _ = writeln!(buf, "        /// Calls `{}`.", path(s, m));
            let _ = writeln!(
                buf,
                r#"        pub async fn {method}(&mut self, request: impl ::rpc_client::IntoRequest<{input}>) -> Result<::rpc_client::Response<{output}>, ::rpc_client::Error> {{
            ::rpc_client::codegen::unary(&mut self.inner, "{path}", request.into_request()).await
        }}"#,
                method = m.name,
                input = ty(&m.input_type),
                output = ty(&m.output_type),
                path = path(s, m),
            );
        }
        let _ = writeln!(buf, "    }}");
        let streaming: Vec<&Method> = s
            .methods
            .iter()
            .filter(|m| m.client_streaming || m.server_streaming)
            .collect();
        if !streaming.is_empty() {
            let _ = writeln!(
                buf,
                "\n    /// Streaming methods: over an `rpc_client::Client` itself (a tower stack carries single requests).\n    impl {name}Client<::rpc_client::Client> {{"
            );
            for m in streaming {
                doc(&m.comments, "        ", buf);
                let (input, output, p) = (ty(&m.input_type), ty(&m.output_type), path(s, m));
                if self.is_resumable(s, m) {
                    let _ = writeln!(
                        buf,
                        r#"        /// Subscribes to `{p}`, a resumable stream: one request, then the server's messages
        /// in order across the breaks of the streams under it (see `rpc_client::Client::subscribe`).
        pub async fn {method}(&self, request: impl ::rpc_client::IntoRequest<{input}>) -> Result<::rpc_client::Resumable<{output}>, ::rpc_client::Error> {{
            ::rpc_client::codegen::resumable_streaming(&self.inner, "{p}", request.into_request(), None).await
        }}
        /// Subscribes to `{p}` after a position kept from an earlier subscription.
        pub async fn {method}_after(&self, request: impl ::rpc_client::IntoRequest<{input}>, after: u64) -> Result<::rpc_client::Resumable<{output}>, ::rpc_client::Error> {{
            ::rpc_client::codegen::resumable_streaming(&self.inner, "{p}", request.into_request(), Some(after)).await
        }}"#,
                        method = m.name
                    );
                    continue;
                }
                let _ = match (m.client_streaming, m.server_streaming) {
                    (false, _) => writeln!(
                        buf,
                        r#"        /// Calls `{p}`: one request, a stream of responses.
        pub async fn {method}(&self, request: impl ::rpc_client::IntoRequest<{input}>) -> Result<::rpc_client::Streaming<{output}>, ::rpc_client::Error> {{
            ::rpc_client::codegen::server_streaming(&self.inner, "{p}", request.into_request()).await
        }}"#,
                        method = m.name
                    ),
                    (true, false) => writeln!(
                        buf,
                        r#"        /// Calls `{p}`: a stream of requests, one response.
        pub async fn {method}<S>(&self, requests: impl ::rpc_client::IntoRequest<S>) -> Result<::rpc_client::Response<{output}>, ::rpc_client::Error>
        where S: ::rpc_client::codegen::Stream<Item = {input}> + Send + 'static {{
            ::rpc_client::codegen::client_streaming(&self.inner, "{p}", requests.into_request()).await
        }}"#,
                        method = m.name
                    ),
                    (true, true) => writeln!(
                        buf,
                        r#"        /// Calls `{p}`: streams both ways (the requests are sent by a task of their own).
        pub async fn {method}<S>(&self, requests: impl ::rpc_client::IntoRequest<S>) -> Result<::rpc_client::Streaming<{output}>, ::rpc_client::Error>
        where S: ::rpc_client::codegen::Stream<Item = {input}> + Send + 'static {{
            ::rpc_client::codegen::bidi_streaming(&self.inner, "{p}", requests.into_request()).await
        }}"#,
                        method = m.name
                    ),
                };
            }
            let _ = writeln!(buf, "    }}");
        }
        let _ = writeln!(buf, "}}");
    }

    fn server(&self, s: &Service, buf: &mut String) {
        let name = &s.name;
        let module = format!("{}_server", snake(&s.name));
        let full = full_name(s);
        let _ = writeln!(buf, "/// Server trait and adapter for `{full}`.");
        let _ = writeln!(buf, "pub mod {module} {{");
        let _ = writeln!(buf, "    #![allow(clippy::all, unused_imports)]");
        let _ = writeln!(
            buf,
            "    use ::rpc_server::codegen::{{BoxFuture, Bytes, Context, Poll, Service}};"
        );
        let _ = writeln!(buf);
        doc(&s.comments, "    ", buf);
        let _ = writeln!(
            buf,
            "    /// Implement this to serve `{full}`; pass it to the server wrapped in [`{name}Server`]."
        );
        let _ = writeln!(buf, "    pub trait {name}: Send + Sync + 'static {{");
        for m in &s.methods {
            doc(&m.comments, "        ", buf);
            let _ = writeln!(buf, "        /// Handles `{}`.", path(s, m));
            let input = if m.client_streaming {
                format!("::rpc_server::Streaming<{}>", ty(&m.input_type))
            } else {
                ty(&m.input_type)
            };
            if self.is_resumable(s, m) {
                let _ = writeln!(
                    buf,
                    "        /// Resumable: `after` is `None` for a fresh subscription, or the position of the last\n        /// message the subscriber has; every message carries its position.\n        fn {}(&self, request: ::rpc_server::Request<{input}>, after: Option<u64>) -> impl ::core::future::Future<Output = Result<::rpc_server::Response<::rpc_server::codegen::PositionedStream<{}>>, ::rpc_server::Status>> + Send;",
                    m.name,
                    ty(&m.output_type)
                );
                continue;
            }
            let output = if m.server_streaming {
                format!("::rpc_server::codegen::BoxStream<{}>", ty(&m.output_type))
            } else {
                ty(&m.output_type)
            };
            let _ = writeln!(
                buf,
                "        fn {}(&self, request: ::rpc_server::Request<{input}>) -> impl ::core::future::Future<Output = Result<::rpc_server::Response<{output}>, ::rpc_server::Status>> + Send;",
                m.name
            );
        }
        let _ = writeln!(buf, "    }}");
        let paths: Vec<String> = s.methods.iter().map(|m| format!("{:?}", path(s, m))).collect();
        let paths = paths.join(", ");
        let _ = writeln!(
            buf,
            r#"
    /// Routes `{full}` requests to a [`{name}`] implementation.
    pub struct {name}Server<T> {{ inner: ::std::sync::Arc<T> }}

    impl<T> {name}Server<T> {{
        /// Wraps an implementation.
        pub fn new(inner: T) -> Self {{ Self {{ inner: ::std::sync::Arc::new(inner) }} }}
        /// Wraps a shared implementation.
        pub fn from_arc(inner: ::std::sync::Arc<T>) -> Self {{ Self {{ inner }} }}
    }}

    impl<T> Clone for {name}Server<T> {{
        fn clone(&self) -> Self {{ Self {{ inner: self.inner.clone() }} }}
    }}

    impl<T> ::core::fmt::Debug for {name}Server<T> {{
        fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {{ f.write_str("{name}Server") }}
    }}

    impl<T: {name}> ::rpc_server::NamedService for {name}Server<T> {{
        const NAME: &'static str = "{full}";
        const MARKS_ENTRY: bool = true;
        const METHODS: ::core::option::Option<&'static [&'static str]> = ::core::option::Option::Some(&[{paths}]);
    }}

    impl<T: {name}> Service<::rpc_server::Request<Bytes>> for {name}Server<T> {{
        type Response = ::rpc_server::Response<Bytes>;
        type Error = ::rpc_server::Status;
        type Future = BoxFuture;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {{
            Poll::Ready(Ok(()))
        }}

        fn call(&mut self, request: ::rpc_server::Request<Bytes>) -> Self::Future {{
            let inner = self.inner.clone();
            match request.method() {{"#
        );
        for m in &s.methods {
            if self.is_resumable(s, m) {
                let _ = writeln!(
                    buf,
                    r#"                "{path}" => Box::pin(::rpc_server::codegen::resumable_streaming(request, move |r, after| async move {{ inner.{method}(r, after).await }})),"#,
                    path = path(s, m),
                    method = m.name
                );
                continue;
            }
            let helper = match (m.client_streaming, m.server_streaming) {
                (false, false) => "unary",
                (false, true) => "server_streaming",
                (true, false) => "client_streaming",
                (true, true) => "bidi_streaming",
            };
            let _ = writeln!(
                buf,
                r#"                "{path}" => Box::pin(::rpc_server::codegen::{helper}(request, move |r| async move {{ inner.{method}(r).await }})),"#,
                path = path(s, m),
                method = m.name
            );
        }
        let _ = writeln!(
            buf,
            r#"                _ => Box::pin(::rpc_server::codegen::not_found(request)),
            }}
        }}
    }}
}}"#
        );
    }
}

impl ServiceGenerator for TetherServiceGenerator {
    fn generate(&mut self, service: Service, buf: &mut String) {
        if self.client {
            self.client(&service, buf);
        }
        if self.server {
            self.server(&service, buf);
        }
    }
}
