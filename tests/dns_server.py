"""A DNS server for the tests' own "internet": one zone of A records, over UDP.

    python -m tests.dns_server ADDRESS NAME=IPV4 [NAME=IPV4 ...]

answers A queries for the names given, an empty answer for their other
types (AAAA: glibc asks for both) and NXDOMAIN for every other name. It
prints "ready" once it listens on ADDRESS port 53.
"""

from __future__ import annotations

import socket
import struct
import sys

HEADER = struct.Struct("!HHHHHH")
TYPE_A, CLASS_IN = 1, 1
FLAG_RESPONSE, FLAG_AUTHORITATIVE, FLAG_RD = 0x8000, 0x0400, 0x0100
NXDOMAIN = 3


def parse_question(packet: bytes) -> tuple[str, int, int, int] | None:
    """(name, type, class, end offset) of the first question, or None."""
    offset, labels = HEADER.size, []
    while offset < len(packet):
        length = packet[offset]
        offset += 1
        if length == 0:
            if offset + 4 > len(packet):
                return None
            qtype, qclass = struct.unpack_from("!HH", packet, offset)
            return ".".join(labels).lower(), qtype, qclass, offset + 4
        if length > 63:  # compression pointers never appear in a question
            return None
        labels.append(packet[offset:offset + length].decode("ascii", "replace"))
        offset += length
    return None


def answer(packet: bytes, zone: dict[str, str]) -> bytes | None:
    if len(packet) < HEADER.size:
        return None
    ident, flags, qdcount, _, _, _ = HEADER.unpack_from(packet)
    question = parse_question(packet) if qdcount == 1 else None
    if question is None:
        return None
    name, qtype, qclass, end = question
    records = b""
    rcode = 0
    if name not in zone:
        rcode = NXDOMAIN
    elif qtype == TYPE_A and qclass == CLASS_IN:
        # the name by a pointer to the question (offset 12), TTL 60
        records = struct.pack("!HHHIH", 0xC000 | HEADER.size, TYPE_A, CLASS_IN, 60, 4)
        records += socket.inet_aton(zone[name])
    reply_flags = FLAG_RESPONSE | FLAG_AUTHORITATIVE | (flags & FLAG_RD) | rcode
    header = HEADER.pack(ident, reply_flags, 1, 1 if records else 0, 0, 0)
    return header + packet[HEADER.size:end] + records


def main(argv: list[str]) -> None:
    address, entries = argv[0], argv[1:]
    zone = {}
    for entry in entries:
        name, _, ip = entry.partition("=")
        zone[name.lower().rstrip(".")] = ip
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, 53))
    print("ready", flush=True)
    while True:
        packet, peer = sock.recvfrom(512)
        reply = answer(packet, zone)
        if reply is not None:
            sock.sendto(reply, peer)


if __name__ == "__main__":
    main(sys.argv[1:])
