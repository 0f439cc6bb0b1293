//! Requests, responses and their metadata, as users and tower services see them.

use std::borrow::Borrow;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

/// Key/value metadata carried by requests and responses. Keys are UTF-8 strings; values are bytes.
///
/// A small vector, not a map: requests carry a handful of entries, and a linear scan over them is
/// cheaper than hashing. An empty `Metadata` does not allocate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    entries: Vec<(String, Bytes)>,
}

impl Metadata {
    /// Empty metadata.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends an entry, replacing an earlier one with the same key.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<Bytes>) {
        let key = key.into();
        let value = value.into();
        if let Some(slot) = self.entries.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = value;
        } else {
            self.entries.push((key, value));
        }
    }

    /// The value for `key`.
    pub fn get(&self, key: &str) -> Option<&Bytes> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The value for `key` if it is UTF-8.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Removes and returns the value for `key`.
    pub fn remove(&mut self, key: &str) -> Option<Bytes> {
        let i = self.entries.iter().position(|(k, _)| k == key)?;
        Some(self.entries.remove(i).1)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Bytes)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Appends without checking for duplicates (the decoder keeps what the peer sent).
    pub(crate) fn push_raw(&mut self, key: String, value: Bytes) {
        self.entries.push((key, value));
    }

    pub(crate) fn with_capacity(n: usize) -> Self {
        Metadata {
            entries: Vec::with_capacity(n),
        }
    }
}

/// A method path, `/package.Service/Method`: a static string (what generated clients use) or a
/// shared one (what a server decodes, interned per connection). Cloning never allocates.
#[derive(Clone)]
pub struct Method(MethodRepr);

#[derive(Clone)]
enum MethodRepr {
    Static(&'static str),
    Shared(Arc<str>),
}

impl Method {
    /// A method path known at compile time.
    pub const fn from_static(path: &'static str) -> Self {
        Method(MethodRepr::Static(path))
    }

    /// The path.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            MethodRepr::Static(s) => s,
            MethodRepr::Shared(s) => s,
        }
    }
}

impl Default for Method {
    /// The empty path (generated clients set the real one).
    fn default() -> Self {
        Method::from_static("")
    }
}

impl std::ops::Deref for Method {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Method {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for Method {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq for Method {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Method {}

impl PartialEq<str> for Method {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Method {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::hash::Hash for Method {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl From<&'static str> for Method {
    fn from(path: &'static str) -> Self {
        Method::from_static(path)
    }
}

impl From<String> for Method {
    fn from(path: String) -> Self {
        Method(MethodRepr::Shared(path.into()))
    }
}

impl From<Arc<str>> for Method {
    fn from(path: Arc<str>) -> Self {
        Method(MethodRepr::Shared(path))
    }
}

/// A value that travels with a request or response through tower layers and is taken once (a
/// stream's halves). Clones share it.
pub(crate) struct Slot<T>(Arc<std::sync::Mutex<Option<T>>>);

impl<T> Clone for Slot<T> {
    fn clone(&self) -> Self {
        Slot(self.0.clone())
    }
}

impl<T> Slot<T> {
    fn new(value: T) -> Self {
        Slot(Arc::new(std::sync::Mutex::new(Some(value))))
    }

    fn take(&self) -> Option<T> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl<T> std::fmt::Debug for Slot<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Slot(..)")
    }
}

/// Who sent a request, as the server saw its connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    addr: std::net::SocketAddr,
    certificates: Option<Vec<rustls::pki_types::CertificateDer<'static>>>,
}

impl Peer {
    /// A peer at `addr`, with the certificate chain it presented over mutual TLS (leaf first).
    pub fn new(
        addr: std::net::SocketAddr,
        certificates: Option<Vec<rustls::pki_types::CertificateDer<'static>>>,
    ) -> Self {
        Peer { addr, certificates }
    }

    /// The address the connection came from.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// The client's certificate chain (DER, leaf first), verified against the server's
    /// `client_ca_file`; `None` without mutual TLS. Parse the subject with an X.509 crate.
    pub fn certificates(&self) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        self.certificates.as_deref()
    }
}

/// An RPC request: the method, metadata, a deadline and a body (`Bytes` on the wire, a message in
/// generated code).
#[derive(Debug, Clone)]
pub struct Request<T> {
    method: Method,
    metadata: Metadata,
    deadline: Option<Instant>,
    idempotent: bool,
    cancellation: Option<crate::context::Cancellation>,
    /// On the server, for a request that opened a stream: the client's messages.
    stream: Option<Slot<crate::stream::Streaming<Bytes>>>,
    /// On the server: who sent it (shared by every request of a connection).
    peer: Option<Arc<Peer>>,
    /// Marked never to be compressed.
    uncompressed: bool,
    body: T,
}

impl<T> Request<T> {
    /// A request with no metadata and the client's default deadline, for a generated client's
    /// method (which sets the method path), as in tonic: build one to add metadata, a timeout or
    /// the idempotent mark, then pass it to the method.
    pub fn new(body: T) -> Self {
        Self::for_method(Method::default(), body)
    }

    /// A request for `method` (`/package.Service/Method`), for calls without generated code
    /// (`rpc_client::Client::unary` and tower stacks over it).
    pub fn for_method(method: impl Into<Method>, body: T) -> Self {
        Request {
            method: method.into(),
            metadata: Metadata::new(),
            deadline: None,
            idempotent: false,
            cancellation: None,
            stream: None,
            peer: None,
            uncompressed: false,
            body,
        }
    }

    /// Whether the body may be compressed (when the client is configured to compress and the
    /// server reads the codec). True unless [`Request::set_compress`] said otherwise.
    pub fn compress(&self) -> bool {
        !self.uncompressed
    }

    /// `false`: never compress this request's body (one that mixes secrets with text an attacker
    /// chooses, as in CRIME and BREACH, or one already compressed).
    pub fn set_compress(&mut self, compress: bool) {
        self.uncompressed = !compress;
    }

    /// On the server: who sent the request (its connection's address and mTLS certificates).
    pub fn peer(&self) -> Option<&Peer> {
        self.peer.as_deref()
    }

    /// On the server: the address the request's connection came from (tonic's `remote_addr`).
    pub fn remote_addr(&self) -> Option<std::net::SocketAddr> {
        self.peer.as_ref().map(|p| p.addr)
    }

    /// On the server: the client's certificate chain over mutual TLS (tonic's `peer_certs`).
    pub fn peer_certs(&self) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        self.peer.as_ref()?.certificates()
    }

    /// Sets who sent the request (the server does, for every request).
    pub fn set_peer(&mut self, peer: Option<Arc<Peer>>) {
        self.peer = peer;
    }

    /// The method path.
    pub fn method(&self) -> &str {
        &self.method
    }

    /// The method path as a [`Method`], which clones without allocating.
    pub fn method_path(&self) -> &Method {
        &self.method
    }

    /// Sets the method path.
    pub fn set_method(&mut self, method: impl Into<Method>) {
        self.method = method.into();
    }

    /// The metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// The metadata, mutably.
    pub fn metadata_mut(&mut self) -> &mut Metadata {
        &mut self.metadata
    }

    /// The deadline. On the server, derived from the remaining time the client sent.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Time left until the deadline, zero if it has passed, `None` without a deadline.
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline.map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Sets an absolute deadline.
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    /// Sets the deadline to `timeout` from now.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.deadline = Some(Instant::now() + timeout);
    }

    /// Builder form of [`Request::set_timeout`].
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.set_timeout(timeout);
        self
    }

    /// True when the caller says the request may safely run twice, so a client may retry it even
    /// when the server may have run it.
    pub fn is_idempotent(&self) -> bool {
        self.idempotent
    }

    /// Marks the request idempotent (or not).
    pub fn set_idempotent(&mut self, idempotent: bool) {
        self.idempotent = idempotent;
    }

    /// On the server, the request's cancellation: fired when the runtime gives up on it (CANCEL
    /// from the client, the connection closing, `abort()`: right before the handler's future is
    /// dropped; its deadline: once the DEADLINE_EXCEEDED answer is queued). For work the handler hands off (see `rpc_server::detach`);
    /// the handler itself simply stops at its next `.await`. `None` on a request a client builds.
    pub fn cancellation(&self) -> Option<&crate::context::Cancellation> {
        self.cancellation.as_ref()
    }

    /// On the server, a request that opened a stream: takes the client's messages (once; a
    /// generated handler gets them as its `Streaming` body).
    pub fn take_stream(&mut self) -> Option<crate::stream::Streaming<Bytes>> {
        self.stream.take().and_then(|s| s.take())
    }

    /// Attaches the client's messages of a stream (the server's runtime does).
    pub fn set_stream(&mut self, stream: crate::stream::Streaming<Bytes>) {
        self.stream = Some(Slot::new(stream));
    }

    /// Sets the cancellation (the server's runtime does).
    pub fn set_cancellation(&mut self, cancellation: Option<crate::context::Cancellation>) {
        self.cancellation = cancellation;
    }

    /// The body.
    pub fn body(&self) -> &T {
        &self.body
    }

    /// The body, mutably.
    pub fn body_mut(&mut self) -> &mut T {
        &mut self.body
    }

    /// The body (tonic's name for [`Request::body`]).
    pub fn get_ref(&self) -> &T {
        &self.body
    }

    /// The body, mutably (tonic's name for [`Request::body_mut`]).
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.body
    }

    /// The body, consuming the request (tonic's name for [`Request::into_body`]).
    pub fn into_inner(self) -> T {
        self.body
    }

    /// The body, consuming the request.
    pub fn into_body(self) -> T {
        self.body
    }

    /// The method, metadata and body, consuming the request.
    pub fn into_parts(self) -> (Method, Metadata, T) {
        (self.method, self.metadata, self.body)
    }

    /// Replaces the body, keeping everything else.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Request<U> {
        Request {
            method: self.method,
            metadata: self.metadata,
            deadline: self.deadline,
            idempotent: self.idempotent,
            cancellation: self.cancellation,
            stream: self.stream,
            peer: self.peer,
            uncompressed: self.uncompressed,
            body: f(self.body),
        }
    }
}

/// An RPC response: metadata and a body.
#[derive(Debug, Clone, Default)]
pub struct Response<T> {
    metadata: Metadata,
    /// A streaming handler's messages; the metadata goes with the stream's end, as trailers.
    stream: Option<Slot<crate::stream::ResponseStream>>,
    /// Marked never to be compressed.
    uncompressed: bool,
    body: T,
}

impl<T> Response<T> {
    /// A response with no metadata.
    pub fn new(body: T) -> Self {
        Response {
            metadata: Metadata::new(),
            stream: None,
            uncompressed: false,
            body,
        }
    }

    /// A response with metadata.
    pub fn from_parts(metadata: Metadata, body: T) -> Self {
        Response {
            metadata,
            stream: None,
            uncompressed: false,
            body,
        }
    }

    /// The messages of a streaming handler, if this response carries them (taken once).
    pub fn take_stream(&mut self) -> Option<crate::stream::ResponseStream> {
        self.stream.take().and_then(|s| s.take())
    }

    /// The metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// The metadata, mutably.
    pub fn metadata_mut(&mut self) -> &mut Metadata {
        &mut self.metadata
    }

    /// The body.
    pub fn body(&self) -> &T {
        &self.body
    }

    /// The body, consuming the response.
    pub fn into_body(self) -> T {
        self.body
    }

    /// The body, mutably.
    pub fn body_mut(&mut self) -> &mut T {
        &mut self.body
    }

    /// Whether the body may be compressed (for a client that asked for it). True unless
    /// [`Response::set_compress`] said otherwise.
    pub fn compress(&self) -> bool {
        !self.uncompressed
    }

    /// `false`: never compress this response's body (see [`Request::set_compress`]).
    pub fn set_compress(&mut self, compress: bool) {
        self.uncompressed = !compress;
    }

    /// The body (tonic's name for [`Response::body`]).
    pub fn get_ref(&self) -> &T {
        &self.body
    }

    /// The body, mutably (tonic's name for [`Response::body_mut`]).
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.body
    }

    /// The body, consuming the response (tonic's name for [`Response::into_body`]).
    pub fn into_inner(self) -> T {
        self.body
    }

    /// Splits into metadata and body.
    pub fn into_parts(self) -> (Metadata, T) {
        (self.metadata, self.body)
    }

    /// Replaces the body, keeping the metadata.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Response<U> {
        Response {
            metadata: self.metadata,
            stream: self.stream,
            uncompressed: self.uncompressed,
            body: f(self.body),
        }
    }
}

impl Response<Bytes> {
    /// The response of a streaming handler: its messages, sent as the client's credit allows;
    /// the stream ends with the response's metadata as trailers when `messages` ends, or with
    /// the status of the first error it yields.
    pub fn streaming(messages: crate::stream::ResponseStream) -> Self {
        Response {
            metadata: Metadata::new(),
            stream: Some(Slot::new(messages)),
            uncompressed: false,
            body: Bytes::new(),
        }
    }
}

/// What generated client methods accept: a bare message or a [`Request`] around one.
pub trait IntoRequest<T> {
    /// Wraps the message in a request (method path set later by the generated client).
    fn into_request(self) -> Request<T>;
}

impl<T> IntoRequest<T> for T {
    fn into_request(self) -> Request<T> {
        Request::new(self)
    }
}

impl<T> IntoRequest<T> for Request<T> {
    fn into_request(self) -> Request<T> {
        self
    }
}
