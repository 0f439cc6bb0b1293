//! Arbitrary bytes as everything a client reads from its server, while callers send requests and
//! oneways: the client driver never panics, ends with a typed close reason, and every call
//! resolves exactly once (a response or a typed error), with "not executed" only for calls whose
//! frames were never completely written or that a GOAWAY named.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "client_support.rs"]
mod client_support;

fuzz_target!(|data: &[u8]| {
    client_support::run_client(data.to_vec());
});
