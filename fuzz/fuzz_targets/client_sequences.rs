//! Well-formed frame sequences a server might send (SETTINGS, GOAWAY with any reason and last id,
//! repeated or lowered, responses for any id, heartbeats, acks), chosen by the input and encoded
//! with the real codec, so the fuzzer spends its time on the session rules rather than on framing.
//! The same checks as the `client` target.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "client_support.rs"]
mod client_support;

fuzz_target!(|data: &[u8]| {
    client_support::run_client(client_support::frames_from(data));
});
