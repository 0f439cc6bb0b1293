#!/usr/bin/env python3
"""Writes the seed corpus: valid frames of every kind, built from the byte layout in PROTOCOL.md."""
import os
import struct

def header(kind, rid, body):
    return struct.pack(">BBBBQI", 0x54, 1, kind, 0, rid, len(body)) + body

def metadata(entries):
    out = struct.pack(">H", len(entries))
    for k, v in entries:
        out += struct.pack(">H", len(k)) + k + struct.pack(">I", len(v)) + v
    return out

def request(rid, method=b"/echo.Echo/Say", timeout_ms=1500, md=(), payload=b"\x0a\x02hi", oneway=False):
    body = struct.pack(">IH", timeout_ms, len(method)) + method + metadata(list(md)) + payload
    return header(3 if oneway else 1, rid, body)

def response(rid, code=0, message=b"", md=(), payload=b"\x0a\x02hi"):
    body = struct.pack(">HI", code, len(message)) + message + metadata(list(md)) + payload
    return header(2, rid, body)

def settings(entries):
    body = struct.pack(">H", len(entries)) + b"".join(struct.pack(">HQ", i, v) for i, v in entries)
    return header(7, 0, body)

def goaway(reason, last, msg=b""):
    return header(6, 0, struct.pack(">BQH", reason, last, len(msg)) + msg)

client_settings = settings([(1, 4 << 20), (4, 15000), (5, 64)])
frames = {
    "settings": client_settings,
    "settings_server": settings([(1, 4 << 20), (2, 90000), (3, 1024), (5, 64)]),
    "request": request(1, md=[(b"authorization", b"Bearer x")]),
    "oneway": request(2, oneway=True, timeout_ms=0),
    "response_ok": response(1),
    "response_error": response(2, code=4, message=b"the disk is full", payload=b""),
    "heartbeat": header(4, 9, b""),
    "heartbeat_ack": header(5, 9, b""),
    "goaway": goaway(2, 7, b"shutdown"),
}
os.makedirs("seeds/decode_frame", exist_ok=True)
os.makedirs("seeds/handshake", exist_ok=True)
for name, data in frames.items():
    # decode_frame: the first byte picks the chunk size.
    for chunk in (1, 7, 255):
        with open(f"seeds/decode_frame/{name}_{chunk}", "wb") as f:
            f.write(bytes([chunk]) + data)
# handshake: what a client sends first.
sessions = {
    "hello_then_request": client_settings + request(1) + header(4, 1, b"") + request(2, oneway=True),
    "hello_then_goaway": client_settings + goaway(2, 0),
    "request_first": request(1),
    "all_kinds": client_settings + b"".join(frames.values()),
}
for name, data in sessions.items():
    with open(f"seeds/handshake/{name}", "wb") as f:
        f.write(data)
# client: what a server sends to a client (settings, then answers, GOAWAYs and heartbeats).
server_settings = settings([(1, 4 << 20), (2, 90000), (3, 1024), (5, 64), (6, 16384), (7, 256), (8, 1)])
os.makedirs("seeds/client", exist_ok=True)
client_sessions = {
    "answers_in_order": server_settings + b"".join(response(i) for i in (1, 2, 4, 5, 7, 8)),
    "answers_then_goaway": server_settings + response(2) + goaway(2, 4, b"shutdown") + response(1),
    "goaway_lowered": server_settings + goaway(2, 8) + goaway(1, 3) + response(4),
    "refusals": server_settings + struct.pack(">BBBBQI", 0x54, 1, 2, 1, 1, 6) + struct.pack(">HI", 1, 0),
    "v1_server": settings([(1, 4 << 20), (2, 90000)]) + response(1, code=9, payload=b""),
}
for name, data in client_sessions.items():
    with open(f"seeds/client/{name}", "wb") as f:
        f.write(data)
# client_sequences: three bytes per frame (kind, a, b), see fuzz_targets/client_support.rs.
os.makedirs("seeds/client_sequences", exist_ok=True)
with open("seeds/client_sequences/mixed", "wb") as f:
    f.write(bytes([0, 200, 1, 2, 1, 0, 3, 2, 0x89, 1, 2, 2, 1, 1, 1, 4, 7, 0, 5, 7, 0]))
