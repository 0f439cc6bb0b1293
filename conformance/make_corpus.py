#!/usr/bin/env python3
"""Writes conformance/frames.json: frames of every kind, built byte by byte from PROTOCOL.md's
layout (independently of any encoder), each with what a receiver must make of it. Run from the
repository root; the Rust codec tests (rpc-core/tests/conformance.rs) read the output, and so can
any other implementation."""
import json
import struct

def header(kind, rid, body, flags=0, magic=0x54, version=1, length=None):
    n = len(body) if length is None else length
    return struct.pack(">BBBBQI", magic, version, kind, flags, rid, n), body

def md(entries):
    out = struct.pack(">H", len(entries))
    for k, v in entries:
        out += struct.pack(">H", len(k)) + k + struct.pack(">I", len(v)) + v
    return out

def request(rid, method=b"/echo.Echo/Say", timeout_ms=1500, meta=(), payload=b"\x0a\x02hi", oneway=False, flags=0):
    body = struct.pack(">IH", timeout_ms, len(method)) + method + md(list(meta)) + payload
    return header(3 if oneway else 1, rid, body, flags=flags)

def response(rid, status=0, message=b"", meta=(), payload=b"\x0a\x02hi", flags=0):
    body = struct.pack(">HI", status, len(message)) + message + md(list(meta)) + payload
    return header(2, rid, body, flags=flags)

def settings(entries, rid=0):
    body = struct.pack(">H", len(entries)) + b"".join(struct.pack(">HQ", i, v) for i, v in entries)
    return header(7, rid, body)

def goaway(reason, last, msg=b"", extra=b""):
    return header(6, 0, struct.pack(">BQH", reason, last, len(msg)) + msg + extra)

def fmt(frame):
    """Header in its three groups (magic..flags, id, length), then the body, 16 bytes a line."""
    head, body = frame
    h = head.hex(" ")
    groups = h[:11] + "  " + h[12:35] + "  " + h[36:]
    lines = [groups]
    for i in range(0, len(body), 16):
        lines.append(body[i:i + 16].hex(" "))
    return "\n".join(lines)

NAMES = {1: "MAX_FRAME_SIZE", 2: "IDLE_TIMEOUT_MS", 3: "MAX_CONCURRENT_REQUESTS", 4: "HEARTBEAT_INTERVAL_MS",
         5: "MAX_METADATA_ENTRIES", 6: "MAX_METADATA_BYTES", 7: "MAX_REQUESTS_PER_CONNECTION", 8: "FEATURES",
         9: "VERSION", 10: "STREAM_WINDOW", 11: "CONNECTION_WINDOW"}

def known(entries):
    return {NAMES[i]: v for i, v in entries if i in NAMES}

def meta_json(entries):
    return [{"key": k.decode(), "value_hex": v.hex()} for k, v in entries]

cases = []

def case(name, frame, about, expect=None, error=None, canonical=None, limits=None):
    c = {"name": name, "about": about, "hex": fmt(frame)}
    if limits:
        c["limits"] = limits
    if expect is not None:
        c["expect"] = expect
        c["canonical"] = bool(canonical)
    else:
        c["error"] = error
    cases.append(c)

client = [(1, 4 << 20), (4, 15000), (5, 64), (6, 16384), (8, 15), (9, 2), (10, 256 << 10), (11, 4 << 20)]
server = [(1, 4 << 20), (2, 90000), (3, 1024), (5, 64), (6, 16384), (7, 256), (8, 15), (9, 2), (10, 256 << 10),
          (11, 4 << 20)]
v1_client = [(1, 4 << 20), (4, 15000), (5, 64)]
case("settings-client", settings(client), "A version-2 client's SETTINGS: max frame 4 MiB, heartbeat 15 s, "
     "metadata limits, features NOT_EXECUTED_FLAG, CANCEL, STREAMS and PACKED_DATA, version 2, stream window 256 KiB, "
     "connection window 4 MiB.",
     {"kind": "SETTINGS", "settings": known(client)}, canonical=True)
case("settings-server", settings(server), "A version-2 server's SETTINGS: idle 90 s, 1024 requests at once, "
     "256 per connection.", {"kind": "SETTINGS", "settings": known(server)}, canonical=True)
case("settings-v1-client", settings(v1_client), "A version-1 client's SETTINGS: no features, no version "
     "(so version 1).", {"kind": "SETTINGS", "settings": known(v1_client)}, canonical=True)
unknown_setting = [(1, 1 << 20), (0x7777, 42), (9, 7)]
case("settings-unknown-id", settings(unknown_setting), "An unassigned setting id (0x7777) is ignored; a "
     "newer version (7) is announced: both sides use the lower one.",
     {"kind": "SETTINGS", "settings": known(unknown_setting)})
idle_off = [(1, 1 << 20), (2, 0), (3, 64)]
case("settings-idle-timeout-zero", settings(idle_off), "IDLE_TIMEOUT_MS 0: the server evicts no idle "
     "connection, as if it sent no IDLE_TIMEOUT_MS.",
     {"kind": "SETTINGS", "settings": {"MAX_FRAME_SIZE": 1 << 20, "MAX_CONCURRENT_REQUESTS": 64}})
case("request", request(1, meta=[(b"authorization", b"Bearer x")]), "REQUEST id 1, 1500 ms left, "
     "/echo.Echo/Say, one metadata entry, payload 0a 02 68 69 (an EchoRequest with message \"hi\").",
     {"kind": "REQUEST", "id": 1, "timeout_ms": 1500, "method": "/echo.Echo/Say",
      "metadata": meta_json([(b"authorization", b"Bearer x")]), "payload_hex": "0a026869", "stream": False},
     canonical=True)
case("request-no-deadline", request(4, timeout_ms=0, payload=b""), "timeout_ms 0: no deadline (the server "
     "applies its max_request_duration).",
     {"kind": "REQUEST", "id": 4, "timeout_ms": 0, "method": "/echo.Echo/Say", "metadata": [],
      "payload_hex": "", "stream": False}, canonical=True)
case("oneway", request(2, oneway=True), "ONEWAY id 2: no response will come.",
     {"kind": "ONEWAY", "id": 2, "timeout_ms": 1500, "method": "/echo.Echo/Say", "metadata": [],
      "payload_hex": "0a026869", "stream": False}, canonical=True)
case("request-stream", request(9, method=b"/feed.v1.Feed/Watch", timeout_ms=0, payload=b"", flags=0x10),
     "REQUEST id 9 with flag STREAM (0x10, must-understand): opens a stream; its messages follow as DATA.",
     {"kind": "REQUEST", "id": 9, "timeout_ms": 0, "method": "/feed.v1.Feed/Watch", "metadata": [],
      "payload_hex": "", "stream": True}, canonical=True)
case("data", header(9, 9, b"\x08\x01"), "DATA on stream 9: one message (an Event with seq 1).",
     {"kind": "DATA", "id": 9, "end": False, "packed": False, "payload_hex": "0801"}, canonical=True)
case("data-end", header(9, 9, b"", flags=0x10), "DATA with flag END and no message: the sender's half ends.",
     {"kind": "DATA", "id": 9, "end": True, "packed": False, "payload_hex": ""}, canonical=True)
PACKED = struct.pack(">I", 2) + b"\x08\x02" + struct.pack(">I", 2) + b"\x08\x03" + struct.pack(">I", 0)
case("data-packed", header(9, 9, PACKED, flags=0x20), "DATA with flag PACKED (0x20, must-understand): three "
     "messages, each a 4-byte big-endian length and its bytes: `08 02`, `08 03` and an empty one.",
     {"kind": "DATA", "id": 9, "end": False, "packed": True, "payload_hex": PACKED.hex()}, canonical=True)
case("data-packed-short", header(9, 9, struct.pack(">I", 5) + b"\x08\x02", flags=0x20), "PACKED whose "
     "length prefix runs past the body: malformed, the framing is broken.", error={"close": "Malformed"})
case("data-packed-empty", header(9, 9, b"", flags=0x20), "PACKED with no message at all: malformed.",
     error={"close": "Malformed"})
case("window-stream", header(10, 9, struct.pack(">I", 131072)), "WINDOW: 128 KiB more credit for stream 9.",
     {"kind": "WINDOW", "id": 9, "increment": 131072}, canonical=True)
case("window-connection", header(10, 0, struct.pack(">I", 1 << 20)), "WINDOW with id 0: 1 MiB more for the "
     "connection.", {"kind": "WINDOW", "id": 0, "increment": 1 << 20}, canonical=True)
case("oneway-stream-flag", request(2, oneway=True, flags=0x10), "STREAM is not a flag of ONEWAY: an "
     "unknown must-understand flag there.", error={"close": "UnknownCriticalFlags"})
case("response-ok", response(1), "RESPONSE to request 1: SUCCESS with its payload.",
     {"kind": "RESPONSE", "id": 1, "status": 0, "not_executed": False, "message": "", "metadata": [],
      "payload_hex": "0a026869"}, canonical=True)
case("response-error", response(3, status=4, message=b"the disk is full", payload=b""),
     "APPLICATION_ERROR from a handler: it may have run.",
     {"kind": "RESPONSE", "id": 3, "status": 4, "not_executed": False, "message": "the disk is full",
      "metadata": [], "payload_hex": ""}, canonical=True)
case("response-not-executed", response(5, status=1, message=b"server busy", payload=b"", flags=0x01),
     "SERVER_BUSY with flag NOT_EXECUTED: the runtime refused it before any handler ran; safe to retry.",
     {"kind": "RESPONSE", "id": 5, "status": 1, "not_executed": True, "message": "server busy",
      "metadata": [], "payload_hex": ""}, canonical=True)
case("heartbeat", header(4, 7, b""), "HEARTBEAT with sequence 7.", {"kind": "HEARTBEAT", "id": 7},
     canonical=True)
case("heartbeat-ack", header(5, 7, b""), "Its HEARTBEAT_ACK.", {"kind": "HEARTBEAT_ACK", "id": 7},
     canonical=True)
case("goaway", goaway(2, 7, b"shutdown"), "GOAWAY(shutdown): requests above 7 were not and will not be run.",
     {"kind": "GOAWAY", "reason": 2, "last_request_id": 7, "message": "shutdown"}, canonical=True)
case("goaway-idle", goaway(1, 0, b""), "GOAWAY(idle) on a connection that never carried a request.",
     {"kind": "GOAWAY", "reason": 1, "last_request_id": 0, "message": ""}, canonical=True)
case("cancel", header(8, 5, b""), "CANCEL of request 5.", {"kind": "CANCEL", "id": 5}, canonical=True)
case("unknown-kind", header(0x42, 3, b"ext", flags=0x80), "Kind 0x42 is unknown here: skipped whole, "
     "flags and all; the connection goes on.",
     {"kind": "UNKNOWN", "kind_byte": 0x42, "flags": 0x80, "id": 3, "body_hex": b"ext".hex()}, canonical=True)
case("heartbeat-grown", header(4, 7, b"more"), "A HEARTBEAT from a later version with four more body bytes: "
     "the bytes after the known fields are ignored.", {"kind": "HEARTBEAT", "id": 7})
case("goaway-grown", goaway(2, 7, b"bye", extra=b"\x00\x01"), "A GOAWAY with two bytes a later version added.",
     {"kind": "GOAWAY", "reason": 2, "last_request_id": 7, "message": "bye"})
case("ignorable-flag", header(4, 7, b"", flags=0x0e), "Unassigned ignorable flags (low four bits) are ignored.",
     {"kind": "HEARTBEAT", "id": 7})

case("bad-magic", header(4, 7, b"", magic=0x47), "Not a tether frame (an HTTP client's \"G\").",
     error={"close": "BadMagic"})
case("header-version-2", header(4, 7, b"", version=2), "Header version 2 has not been negotiated "
     "(versions 1 and 2 both write 1).", error={"close": "UnsupportedVersion"})
case("unknown-critical-flag", header(4, 7, b"", flags=0x10), "A must-understand flag this version "
     "does not know.", error={"close": "UnknownCriticalFlags"})
case("settings-nonzero-id", settings([(1, 1 << 20)], rid=1), "The id of SETTINGS is reserved: zero.",
     error={"close": "Malformed"})
case("too-large", header(1, 1, b"", length=2048), "A body over the receiver's max_frame_size (1024 here) "
     "is refused from the header, before any byte of it is read or reserved.",
     error={"close": "FrameTooLarge"}, limits={"max_frame_size": 1024})
case("method-without-slash", request(1, method=b"echo.Echo/Say"), "A method must start with '/'.",
     error={"close": "Malformed"})
case("truncated-request", header(1, 1, b"\x00\x00\x05"), "A body shorter than its fixed fields.",
     error={"close": "Malformed"})
case("response-message-not-utf8", response(1, status=4, message=b"\xff\xfe", payload=b""),
     "Strings are UTF-8.", error={"close": "Malformed"})
case("window-short", header(10, 9, b"\x00\x01"), "A WINDOW body shorter than its increment.",
     error={"close": "Malformed"})
case("metadata-over-limit", request(6, meta=[(b"a", b"1"), (b"b", b"2")]), "Two metadata entries to a "
     "receiver that accepts one: that call alone is refused (RESOURCE_EXHAUSTED, not executed); the "
     "connection stays.", error={"reject_call": "TooManyMetadataEntries", "id": 6},
     limits={"max_metadata_entries": 1})
case("metadata-bytes-over-limit", request(7, meta=[(b"k", b"x" * 40)]), "41 bytes of metadata to a "
     "receiver that accepts 32: that call alone is refused.",
     error={"reject_call": "MetadataTooLarge", "id": 7}, limits={"max_metadata_bytes": 32})

with open("conformance/frames.json", "w") as f:
    json.dump({"protocol_version": 2, "cases": cases}, f, indent=2)
    f.write("\n")
print(f"{len(cases)} cases")
