//! tarpc 0.38 as its users run it: the bincode serde transport over a length-delimited TCP
//! stream, TCP_NODELAY on both sides, each request spawned on the server, the client's pending
//! request buffer sized for the callers. tarpc has no protobuf codegen: the same echo is a serde
//! struct with the payload as `bytes::Bytes` (serialized as a byte string, as binary data should
//! be, and cloned without a copy, as tether's and tonic's payloads are).

use std::net::SocketAddr;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tarpc::server::Channel;
use tarpc::tokio_serde::formats::Bincode;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::LengthDelimitedCodec;

/// The echo request and reply (the fields of `echo.proto`'s messages the benchmark uses).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Echo {
    pub(crate) message: String,
    pub(crate) payload: bytes::Bytes,
    /// The handler waits this long first (the open-loop benchmark's slow path), as tether's and
    /// tonic's echo do with `delay_ms`.
    pub(crate) delay_ms: u32,
}

#[tarpc::service]
pub(crate) trait EchoService {
    /// Answers with the request.
    async fn say(request: Echo) -> Echo;
}

#[derive(Clone)]
struct EchoImpl;

impl EchoService for EchoImpl {
    async fn say(self, _: tarpc::context::Context, request: Echo) -> Echo {
        if request.delay_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(u64::from(request.delay_ms))).await;
        }
        request
    }
}

/// Serves the echo until the listener fails.
pub(crate) async fn serve(listener: TcpListener) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let transport =
            tarpc::serde_transport::new(LengthDelimitedCodec::builder().new_framed(stream), Bincode::default());
        tokio::spawn(
            tarpc::server::BaseChannel::with_defaults(transport)
                .execute(EchoImpl.serve())
                .for_each(|response| async move {
                    tokio::spawn(response);
                }),
        );
    }
}

/// A client on a fresh connection; `callers` is how many will share it.
pub(crate) async fn connect(addr: SocketAddr, callers: usize) -> std::io::Result<EchoServiceClient> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let transport = tarpc::serde_transport::new(LengthDelimitedCodec::builder().new_framed(stream), Bincode::default());
    let mut config = tarpc::client::Config::default();
    config.pending_request_buffer = config.pending_request_buffer.max(callers * 2);
    config.max_in_flight_requests = config.max_in_flight_requests.max(callers * 2);
    Ok(EchoServiceClient::new(config, transport).spawn())
}
