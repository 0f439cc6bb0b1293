//! Streaming methods on the server: sending a handler's messages, and the adapters generated code
//! uses for the three kinds of streaming method.

use bytes::Bytes;
use futures_util::{FutureExt, Stream, StreamExt};
use rpc_core::context::Cancellation;
use rpc_core::stream::{ResponseStream, SendError, StreamSender, Streaming};
use rpc_core::{BoxError, Request, Response, Status};

/// Sends `messages` through `sender`, each within the client's credit, until they end (`Ok`) or
/// one is an error, the client stalls the stream, or the connection goes (`Err`: the status the
/// stream ends with). When the stream is gone (its connection closed, or the client cancelled or
/// reset it), `cancellation` fires before the handler's stream is dropped, so work the handler
/// handed off learns it at once (not at its next send into a dropped channel).
pub(crate) async fn send_all(
    messages: ResponseStream,
    mut sender: StreamSender<Bytes>,
    cancellation: Cancellation,
) -> Result<(), BoxError> {
    // Fused: the batching below may see the end before the loop does. Owned here, so the
    // handler's stream is dropped only after the cancellation fired.
    let mut messages = messages.fuse();
    let sent = match crate::entry::drain_ends_stream() {
        // A resumable stream ends as its server starts draining, even blocked on credit.
        Some(draining) => tokio::select! {
            r = send_each(&mut messages, &mut sender) => r,
            () = draining.cancelled() => Err(Ended::Handler(rpc_core::resume::mark_break(
                Status::unavailable("server draining: the stream resumes on another server"),
                "shutdown",
            ))),
        },
        None => send_each(&mut messages, &mut sender).await,
    };
    match sent {
        Ok(()) => Ok(()),
        Err(Ended::Handler(status)) => Err(status.into()),
        Err(Ended::Send(e)) => {
            if matches!(e, SendError::Closed(_) | SendError::Connection(..)) {
                cancellation.cancel();
            }
            Err(send_failed(e))
        }
    }
}

/// Why a stream's sending stopped early.
enum Ended {
    /// The handler's stream yielded an error: the status the stream ends with.
    Handler(Status),
    /// A message could not be sent.
    Send(SendError),
}

async fn send_each(
    messages: &mut futures_util::stream::Fuse<ResponseStream>,
    sender: &mut StreamSender<Bytes>,
) -> Result<(), Ended> {
    while let Some(item) = messages.next().await {
        // What the handler has ready goes in one trip to the connection (up to a batch).
        let first = item.map_err(Ended::Handler)?;
        // Within the window too: a stalled stream holds at most a window and one message.
        let mut bytes = first.len();
        let mut batch = vec![first];
        let mut failed = None;
        while batch.len() < MAX_BATCH && bytes < sender.window() {
            match messages.next().now_or_never() {
                Some(Some(Ok(m))) => {
                    bytes += m.len();
                    batch.push(m);
                }
                Some(Some(Err(status))) => {
                    failed = Some(status);
                    break;
                }
                Some(None) | None => break,
            }
        }
        let sent = if batch.len() == 1 {
            sender.send(batch.pop().unwrap_or_default()).await
        } else {
            sender.send_batch(batch).await
        };
        sent.map_err(Ended::Send)?;
        if let Some(status) = failed {
            return Err(Ended::Handler(status));
        }
    }
    // The final status goes only after every message has left (within the client's credit and
    // the stall timeout), holding the request's permits until then.
    sender.flush().await.map_err(Ended::Send)
}

/// The size of the blocks a stream's small messages are encoded into.
const ENCODE_BLOCK: usize = 8 * 1024;
/// Messages up to this size share blocks (so a block is held by at most a few kilobytes of
/// messages beyond its own); larger ones get their own allocation.
const ENCODE_SHARED_MAX: usize = 1024;

/// The most messages a handler had ready that go to the connection in one trip.
const MAX_BATCH: usize = 256;

/// The status a stream ends with when its messages could not be sent.
fn send_failed(e: SendError) -> BoxError {
    rpc_core::metrics::stream_send_failed(&e);
    // The client reads this: "this side" is the server.
    let status = match e {
        SendError::Stalled(..) => {
            rpc_core::resume::mark_break(Status::resource_exhausted(format!("server: {e}")), "stall")
        }
        _ => Status::unavailable(format!("server: {e}")),
    };
    status.into()
}

/// Encodes a handler's typed messages.
pub fn encode_stream<R, S>(messages: S) -> ResponseStream
where
    R: prost::Message + 'static,
    S: Stream<Item = Result<R, Status>> + Send + 'static,
{
    // Encoded into shared blocks of a few KiB rather than one allocation each: a stream of small
    // messages then costs an allocation per block. A block lives while any of its messages does,
    // so what a stalled stream holds is its window plus at most one block.
    let mut scratch = bytes::BytesMut::new();
    Box::pin(messages.map(move |item| {
        item.map(|m| {
            let len = m.encoded_len();
            if len > ENCODE_SHARED_MAX {
                return Bytes::from(m.encode_to_vec()); // its own allocation, exactly its size
            }
            if scratch.capacity() < len {
                scratch = bytes::BytesMut::with_capacity(ENCODE_BLOCK.max(len));
            }
            // Cannot fail: the capacity is there.
            let _ = m.encode(&mut scratch);
            scratch.split().freeze()
        })
    }))
}

/// Decodes one message of a stream (INVALID_ARGUMENT if it does not decode).
pub fn decode_message<M: prost::Message + Default>(b: Bytes) -> Result<M, Status> {
    M::decode(b).map_err(|e| Status::invalid_argument(format!("stream message did not decode: {e}")))
}

/// The client's messages of a stream, typed; an empty stream for a request that opened none.
pub fn request_stream<M: prost::Message + Default>(request: &mut Request<Bytes>) -> Option<Streaming<M>> {
    request.take_stream().map(|s| s.decoded(decode_message::<M>))
}

/// A handler's response stream as the runtime sends it.
pub fn response_stream<R, S>(response: Response<S>) -> Response<Bytes>
where
    R: prost::Message + 'static,
    S: Stream<Item = Result<R, Status>> + Send + 'static,
{
    let (metadata, messages) = response.into_parts();
    let mut out = Response::streaming(encode_stream(messages));
    *out.metadata_mut() = metadata;
    out
}
