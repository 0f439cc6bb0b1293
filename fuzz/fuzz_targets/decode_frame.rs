//! Arbitrary bytes through the frame decoder, in the chunk sizes the input itself picks: no panic,
//! no allocation past the limit, and every decoded frame re-encodes to a frame that decodes equal.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rpc_core::codec::FrameCodec;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else { return };
    let chunk = usize::from(split).max(1);
    let mut codec = FrameCodec::new(64 * 1024);
    let mut buf = BytesMut::new();
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    let mut out = BytesMut::new();
                    codec.encode_frame(&frame, &mut out).expect("a decoded frame re-encodes");
                    let again = codec.decode(&mut out).expect("re-encoded frame decodes").expect("whole frame");
                    assert_eq!(again, frame);
                }
                Ok(None) => break,
                Err(_) => return, // a typed protocol error: the connection would close
            }
        }
        assert!(buf.capacity() <= 64 * 1024 + 16 + 64 * 1024, "decoder reserved past max_frame_size");
    }
});
