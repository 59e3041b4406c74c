#!/usr/bin/env python3
"""Writes the seed inputs of the dns_message fuzz target (corpus/dns_message/): real queries as
stub resolvers send them, with upstream answers, in the target's framing (flags byte, u16
length + query, u16 length + answer; see fuzz_targets/dns_message.rs)."""
import os
import struct

TCP, ANSWERS, PATCH_ID = 1, 2, 4
A, NS, CNAME, SOA, PTR, TXT, AAAA, OPT = 1, 2, 5, 6, 12, 16, 28, 41


def name(n):
    out = b""
    for label in n.rstrip(".").split("."):
        if label:
            out += bytes([len(label)]) + label.encode()
    return out + b"\0"


def header(id_, flags, qd=1, an=0, ns=0, ar=0):
    return struct.pack(">HHHHHH", id_, flags, qd, an, ns, ar)


def edns(payload=1232):
    return b"\0" + struct.pack(">HHIH", OPT, payload, 0, 0)


def query(qname, qtype, id_=0x1234, with_edns=False):
    q = header(id_, 0x0100, ar=1 if with_edns else 0) + name(qname) + struct.pack(">HH", qtype, 1)
    return q + (edns() if with_edns else b"")


def answer(qname, qtype, records, id_=0x1234, rcode=0, with_edns=False):
    body = name(qname) + struct.pack(">HH", qtype, 1)
    for rtype, ttl, rdata in records:
        body += b"\xc0\x0c" + struct.pack(">HHIH", rtype, 1, ttl, len(rdata)) + rdata
    flags = 0x8180 | rcode
    return header(id_, flags, an=len(records), ar=1 if with_edns else 0) + body + (edns() if with_edns else b"")


def frame(flags, q, a=b""):
    return bytes([flags]) + struct.pack(">H", len(q)) + q + struct.pack(">H", len(a)) + a


seeds = {
    # Mesh names, answered from the state: full name, short name (search path), AAAA, headless.
    "mesh_full": frame(0, query("reviews.demo.svc.cluster.local.", A)),
    "mesh_short_edns": frame(0, query("reviews.", A, with_edns=True)),
    "mesh_aaaa_tcp": frame(TCP, query("reviews.demo.", AAAA)),
    "mesh_headless": frame(0, query("db.demo.svc.", A)),
    # Forwarded, answered by the upstream, then asked again (from the cache) 20 s later.
    "forward_and_cache": frame(ANSWERS | PATCH_ID, query("example.com.", A, with_edns=True),
                               answer("example.com.", A, [(A, 300, bytes([93, 184, 216, 34]))], with_edns=True))
    + frame(ANSWERS | PATCH_ID | (2 << 3), query("example.com.", A, id_=0x4321, with_edns=True)),
    # NXDOMAIN with an SOA for negative caching, over TCP.
    "nxdomain_tcp": frame(TCP | ANSWERS | PATCH_ID, query("nope.example.", A),
                          header(0x1234, 0x8183, an=0, ns=1) + name("nope.example.") + struct.pack(">HH", A, 1)
                          + name("example.") + struct.pack(">HHIH", SOA, 1, 60, 2 + 2 + 20)
                          + b"\xc0\x11" + b"\xc0\x11" + struct.pack(">IIIII", 1, 7200, 900, 1209600, 30)),
    # A big TXT answer a UDP client without EDNS cannot take: truncated.
    "big_txt_udp": frame(ANSWERS | PATCH_ID, query("big.example.", TXT),
                         answer("big.example.", TXT, [(TXT, 60, bytes([255]) + b"x" * 255)] * 4)),
    # The upstream never answers: SERVFAIL at the deadline.
    "silent_upstream": frame(0, query("slow.example.", PTR)),
    # Not a query: a response sent to the proxy, a short message, an unknown opcode.
    "a_response": frame(0, answer("example.com.", A, [(A, 5, bytes([1, 2, 3, 4]))])),
    "short": frame(0, b"\x12\x34\x01\x00\x00\x01"),
    "notify_opcode": frame(0, header(7, 0x2000) + name("demo.") + struct.pack(">HH", SOA, 1)),
}

here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "dns_message")
os.makedirs(here, exist_ok=True)
for file, data in seeds.items():
    with open(os.path.join(here, file), "wb") as f:
        f.write(data)
