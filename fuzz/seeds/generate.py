#!/usr/bin/env python3
"""Writes the committed seed corpus (seeds/<target>/*). Run from fuzz/: python3 seeds/generate.py

Seeds are small, valid-looking protocol exchanges plus a few known-bad ones, so the fuzzer
starts from inputs that reach deep into each parser instead of rediscovering the protocol.
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def u32(n):
    return struct.pack(">I", n)


def packet(body):
    """An untagged startup-phase packet: length (including itself) + body."""
    return u32(len(body) + 4) + body


def startup(params, version=196608):
    body = u32(version)
    for k, v in params:
        body += k.encode() + b"\0" + v.encode() + b"\0"
    return packet(body + b"\0")


def msg(tag, body=b""):
    return tag.encode() + u32(len(body) + 4) + body


def cstr(s):
    return s.encode() + b"\0"


SSL = packet(u32(80877103))
GSS = packet(u32(80877104))
CANCEL = packet(u32(80877102) + u32(12345) + u32(0xDEADBEEF))
NORMAL = startup([("user", "app"), ("database", "app"), ("application_name", "web")])


def startup_seeds():
    # byte 0: read chunk size (0 = whole) | 0x80 when TLS is offered; then the client's bytes
    return {
        "plain": b"\0" + NORMAL,
        "bytewise": b"\x01" + NORMAL,
        "ssl_then_startup": b"\x03" + SSL + NORMAL,
        "ssl_gss_then_startup": b"\x07" + SSL + GSS + NORMAL,
        "cancel": b"\0" + CANCEL,
        "cancel_32_long_key": b"\x05" + packet(u32(80877102) + u32(7) + bytes(range(32))),
        "protocol_3_2_options": b"\0"
        + startup([("user", "u"), ("_pq_.x", "1"), ("options", "-c a=b")], version=196610),
        "user_only": b"\x02" + startup([("user", "alice")]),
        "startup_then_query": b"\0" + NORMAL + msg("Q", cstr("SELECT 1")),
        "too_short": b"\0" + u32(4),
        "too_long": b"\0" + u32(10001) + bytes(16),
        "protocol_2": b"\0" + startup([("user", "old")], version=131072),
        "three_ssl": b"\0" + SSL + SSL + SSL + NORMAL,
        "no_user": b"\0" + startup([("database", "d")]),
        "no_terminator": b"\0" + packet(u32(196608) + b"user\0bob"),
        "truncated": b"\x04" + NORMAL[:-5],
        "tls_offered_ssl": b"\x80" + SSL + NORMAL,
        "tls_offered_gss_then_ssl": b"\x82" + GSS + SSL,
        "tls_offered_plain": b"\x81" + NORMAL,
        "gss_with_trailing_bytes": b"\x07" + packet(u32(80877104) + b"\0\0") + NORMAL,
        # 0x40: the client waits for each answer before sending its next packet.
        "patient_ssl_gss_ssl_then_startup": b"\x40" + SSL + GSS + SSL + NORMAL,
        "patient_ssl_twice": b"\x43" + SSL + SSL + NORMAL,
        "patient_tls_offered_gss_then_ssl": b"\xc0" + GSS + SSL + NORMAL,
        "patient_ssl_with_trailing_bytes": b"\x40" + packet(u32(80877103) + b"xx") + NORMAL,
    }


def frame_input(server, stream, cuts):
    head = bytes([1 if server else 0, len(cuts)])
    return head + b"".join(struct.pack(">H", c) for c in cuts) + stream


def frame_seeds():
    client_simple = msg("Q", cstr("BEGIN")) + msg("Q", cstr("SELECT * FROM app.user_sessions FOR UPDATE")) + msg("X")
    client_extended = (
        msg("P", cstr("s1") + cstr("SELECT $1::int") + struct.pack(">H", 0))
        + msg("B", cstr("") + cstr("s1") + bytes(6))
        + msg("D", b"P" + cstr(""))
        + msg("E", cstr("") + u32(0))
        + msg("S")
    )
    client_copy = msg("Q", cstr("COPY t FROM STDIN")) + msg("d", b"1\tx\n" * 20) + msg("c") + msg("f", cstr("oops"))
    client_long = msg("Q", cstr("SELECT '" + "x" * 1500 + "'"))
    server = (
        msg("R", u32(0))
        + msg("S", cstr("server_version") + cstr("15.18"))
        + msg("K", u32(4242) + u32(0xCAFEBABE))
        + msg("Z", b"I")
        + msg("T", struct.pack(">H", 1) + cstr("x") + bytes(18))
        + b"".join(msg("D", struct.pack(">H", 1) + u32(3) + b"abc") for _ in range(5))
        + msg("C", cstr("SELECT 5"))
        + msg("Z", b"T")
        + msg("E", b"SERROR\0VERROR\0C40P01\0Mdeadlock detected\0\0")
        + msg("Z", b"E")
    )
    server_32_key = msg("K", u32(1) + bytes(range(32))) + msg("Z", b"I")
    return {
        "client_simple_whole": frame_input(False, client_simple, []),
        "client_simple_cuts": frame_input(False, client_simple, [1, 5, 6, 11, 20]),
        "client_extended": frame_input(False, client_extended, [3, 17, 40]),
        "client_copy": frame_input(False, client_copy, [9, 30]),
        "client_long_statement": frame_input(False, client_long, [100, 1157]),
        "server_session": frame_input(True, server, [2, 9, 14, 30, 31, 90]),
        "server_32_key": frame_input(True, server_32_key, [6]),
        "bad_length": frame_input(False, msg("Q", cstr("x"))[:1] + u32(3) + msg("X"), [2]),
        "huge_length": frame_input(True, b"D" + u32(0x40000005), []),
        "partial_header": frame_input(True, msg("Z", b"I") + b"Z\0\0", [7]),
    }


def admin_seeds():
    # the text an operator types on the admin console
    return {
        "show_clients": b"SHOW CLIENTS;",
        "show_lower": b"show locks",
        "show_events": b"Show Events",
        "show_stats_config_version": b"SHOW STATS; SHOW CONFIG; SHOW VERSION",
        "kill_client": b"KILL 7",
        "kill_pid": b"kill pid 12345;",
        "kill_bad_pid": b"KILL PID -1",
        "set_dry_run": b"SET dry_run=on",
        "set_to": b"set DRY_RUN to 'off'",
        "reload": b"  RELOAD\t ;",
        "unknown": b"DROP TABLE app.user_sessions",
        "long": b"SHOW " + b"x" * 200,
        "non_ascii": "SHOW \u00c9V\u00c9NEMENTS \u0000\u007f".encode(),
        "empty": b"",
    }


def write(target, seeds):
    out = os.path.join(HERE, target)
    os.makedirs(out, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    write("startup_packet", startup_seeds())
    write("frame_split", frame_seeds())
    write("admin_command", admin_seeds())
