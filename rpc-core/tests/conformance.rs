//! The conformance corpus (`conformance/frames.json`, written from PROTOCOL.md's layout by
//! `conformance/make_corpus.py`): every case decodes to what it says, whole and one byte at a
//! time; every canonical case re-encodes to its exact bytes; every error case fails as it says
//! (closing the connection, or refusing that call alone). And every worked example in PROTOCOL.md
//! is a corpus case, byte for byte, and every frame kind has one.

#![allow(clippy::unwrap_used)]

use bytes::BytesMut;
use rpc_core::codec::FrameCodec;
use rpc_core::error::CodecError;
use rpc_core::frame::{Frame, Settings};
use rpc_core::ProtocolError;
use serde_json::{json, Map, Value};
use tokio_util::codec::{Decoder, Encoder};

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn corpus() -> Vec<Value> {
    let text = std::fs::read_to_string(root().join("conformance/frames.json")).unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    doc["cases"].as_array().unwrap().clone()
}

fn bytes_of(hex: &str) -> Vec<u8> {
    let digits: String = hex.chars().filter(char::is_ascii_hexdigit).collect();
    assert_eq!(digits.len() % 2, 0, "odd hex: {hex}");
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).unwrap())
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn codec_for(case: &Value) -> FrameCodec {
    let limits = &case["limits"];
    let mut codec = FrameCodec::new(limits["max_frame_size"].as_u64().map_or(4 << 20, |v| v as u32));
    if let Some(n) = limits["max_metadata_entries"].as_u64() {
        codec.set_max_metadata_entries(n as usize);
    }
    if let Some(n) = limits["max_metadata_bytes"].as_u64() {
        codec.set_max_metadata_bytes(n as usize);
    }
    codec
}

fn metadata(m: &rpc_core::Metadata) -> Value {
    Value::Array(m.iter().map(|(k, v)| json!({"key": k, "value_hex": hex(v)})).collect())
}

fn settings(s: &Settings) -> Value {
    let mut m = Map::new();
    let mut put = |k: &str, v: Option<u64>| {
        if let Some(v) = v {
            m.insert(k.into(), json!(v));
        }
    };
    let ms = |d: Option<std::time::Duration>| d.map(|d| d.as_millis() as u64);
    put("MAX_FRAME_SIZE", s.max_frame_size.map(u64::from));
    put("IDLE_TIMEOUT_MS", ms(s.idle_timeout));
    put("MAX_CONCURRENT_REQUESTS", s.max_concurrent_requests.map(u64::from));
    put("HEARTBEAT_INTERVAL_MS", ms(s.heartbeat_interval));
    put("MAX_METADATA_ENTRIES", s.max_metadata_entries.map(u64::from));
    put("MAX_METADATA_BYTES", s.max_metadata_bytes.map(u64::from));
    put(
        "MAX_REQUESTS_PER_CONNECTION",
        s.max_requests_per_connection.map(u64::from),
    );
    put("FEATURES", s.features);
    put("VERSION", s.version.map(u64::from));
    put("STREAM_WINDOW", s.stream_window.map(u64::from));
    put("CONNECTION_WINDOW", s.connection_window.map(u64::from));
    Value::Object(m)
}

/// A decoded frame in the corpus's terms.
fn describe(frame: &Frame) -> Value {
    match frame {
        Frame::Request(r) => json!({
            "kind": if r.oneway { "ONEWAY" } else { "REQUEST" },
            "id": r.id,
            "stream": r.stream,
            "timeout_ms": r.timeout.map_or(0, |t| t.as_millis() as u64),
            "method": r.method.as_str(),
            "metadata": metadata(&r.metadata),
            "payload_hex": hex(&r.payload),
        }),
        Frame::Response(r) => json!({
            "kind": "RESPONSE",
            "id": r.id,
            "status": r.code.as_u16(),
            "not_executed": r.not_executed,
            "message": r.message,
            "metadata": metadata(&r.metadata),
            "payload_hex": hex(&r.payload),
        }),
        Frame::Heartbeat { id } => json!({"kind": "HEARTBEAT", "id": id}),
        Frame::HeartbeatAck { id } => json!({"kind": "HEARTBEAT_ACK", "id": id}),
        Frame::Cancel { id } => json!({"kind": "CANCEL", "id": id}),
        Frame::Data {
            id,
            end,
            packed,
            payload,
        } => json!({"kind": "DATA", "id": id, "end": end, "packed": packed, "payload_hex": hex(payload)}),
        Frame::Window { id, increment } => json!({"kind": "WINDOW", "id": id, "increment": increment}),
        Frame::GoAway(g) => json!({
            "kind": "GOAWAY",
            "reason": g.reason.as_u8(),
            "last_request_id": g.last_request_id,
            "message": g.message,
        }),
        Frame::Settings(s) => json!({"kind": "SETTINGS", "settings": settings(s)}),
        Frame::Unknown(u) => json!({
            "kind": "UNKNOWN",
            "kind_byte": u.kind,
            "flags": u.flags,
            "id": u.id,
            "body_hex": hex(&u.body),
        }),
    }
}

fn variant(e: &ProtocolError) -> &'static str {
    match e {
        ProtocolError::BadMagic(_) => "BadMagic",
        ProtocolError::UnsupportedVersion(_) => "UnsupportedVersion",
        ProtocolError::UnknownCriticalFlags { .. } => "UnknownCriticalFlags",
        ProtocolError::FrameTooLarge { .. } => "FrameTooLarge",
        ProtocolError::Malformed { .. } => "Malformed",
        ProtocolError::TooManyMetadataEntries { .. } => "TooManyMetadataEntries",
        ProtocolError::MetadataTooLarge { .. } => "MetadataTooLarge",
        other => panic!("not a codec error: {other:?}"),
    }
}

/// Decodes `bytes` fed `chunk` bytes at a time: the one result a receiver gets.
fn decode(case: &Value, bytes: &[u8], chunk: usize) -> (Result<Frame, CodecError>, usize) {
    let mut codec = codec_for(case);
    let mut buf = BytesMut::new();
    for piece in bytes.chunks(chunk) {
        buf.extend_from_slice(piece);
        match codec.decode(&mut buf) {
            Ok(None) => {}
            Ok(Some(frame)) => return (Ok(frame), buf.len()),
            Err(e) => return (Err(e), buf.len()),
        }
    }
    panic!("{}: incomplete after all {} bytes", case["name"], bytes.len());
}

#[test]
fn every_case_decodes_as_the_corpus_says() {
    let cases = corpus();
    assert!(cases.len() >= 20, "the corpus went missing");
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let bytes = bytes_of(case["hex"].as_str().unwrap());
        for chunk in [bytes.len(), 1, 7] {
            let (result, left) = decode(case, &bytes, chunk);
            match (result, case.get("expect")) {
                (Ok(frame), Some(expect)) => {
                    assert_eq!(&describe(&frame), expect, "{name} (chunks of {chunk})");
                    assert_eq!(left, 0, "{name}: bytes left over");
                    if case["canonical"] == json!(true) {
                        let mut out = BytesMut::new();
                        codec_for(case).encode(&frame, &mut out).unwrap();
                        assert_eq!(hex(&out), hex(&bytes), "{name}: re-encoded differently");
                    }
                }
                (Err(CodecError::Protocol(e)), None) => {
                    assert_eq!(Some(variant(&e)), case["error"]["close"].as_str(), "{name}: {e}");
                }
                (Err(CodecError::Rejected { id, error, .. }), None) => {
                    assert_eq!(Some(variant(&error)), case["error"]["reject_call"].as_str(), "{name}");
                    assert_eq!(Some(id), case["error"]["id"].as_u64(), "{name}");
                    assert_eq!(
                        left, 0,
                        "{name}: a refused call's bytes are consumed, the stream stays in sync"
                    );
                }
                (other, _) => panic!("{name}: got {other:?}, expected {case}"),
            }
        }
    }
}

/// `<!-- conformance: NAME -->` followed by a fenced block of hex, in PROTOCOL.md.
fn protocol_md_examples() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root().join("PROTOCOL.md")).unwrap();
    let mut out = Vec::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("<!-- conformance: ") {
        rest = &rest[i + "<!-- conformance: ".len()..];
        let name = rest[..rest.find(" -->").unwrap()].to_string();
        let open = rest.find("```").unwrap();
        let body = &rest[open + 3..];
        let body = &body[body.find('\n').unwrap() + 1..];
        let close = body.find("```").unwrap();
        out.push((name, body[..close].to_string()));
        rest = &body[close + 3..];
    }
    out
}

#[test]
fn every_worked_example_in_protocol_md_is_a_corpus_case_and_every_kind_has_one() {
    let cases = corpus();
    let examples = protocol_md_examples();
    let mut kinds = std::collections::BTreeSet::new();
    for (name, block) in &examples {
        let case = cases
            .iter()
            .find(|c| c["name"] == json!(name))
            .unwrap_or_else(|| panic!("PROTOCOL.md shows {name}, which the corpus lacks"));
        assert_eq!(
            bytes_of(block),
            bytes_of(case["hex"].as_str().unwrap()),
            "PROTOCOL.md's {name} differs from the corpus"
        );
        if let Some(kind) = case["expect"]["kind"].as_str() {
            kinds.insert(kind.to_string());
        }
    }
    let all = [
        "REQUEST",
        "RESPONSE",
        "ONEWAY",
        "HEARTBEAT",
        "HEARTBEAT_ACK",
        "GOAWAY",
        "SETTINGS",
        "CANCEL",
        "DATA",
        "WINDOW",
        "UNKNOWN",
    ];
    for kind in all {
        assert!(
            kinds.contains(kind),
            "PROTOCOL.md has no worked example of a {kind} frame"
        );
    }
}
