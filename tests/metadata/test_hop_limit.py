"""The token PUT answer leaves with IP TTL = the instance's hop limit: captured off ``lo`` with AF_PACKET."""

from __future__ import annotations

import socket
import time

import pytest
from imds_harness import demo, parse, request

ETH_P_ALL = 0x0003


def capture_socket() -> socket.socket:
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.bind(("lo", 0))
    except (PermissionError, OSError, AttributeError) as exc:
        pytest.skip(f"cannot capture on lo with AF_PACKET: {exc}")
    sock.settimeout(0.2)
    return sock


def responses_seen(sock: socket.socket, server_port: int, marker: bytes, seconds: float = 2.0) -> list[int]:
    """IP TTLs of IPv4/TCP packets from ``server_port`` whose payload contains ``marker``."""
    ttls = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            frame = sock.recv(65535)
        except TimeoutError:
            if ttls:
                break
            continue
        packet = frame[14:]  # lo frames carry an all-zero Ethernet header
        if len(packet) < 40 or packet[0] >> 4 != 4 or packet[9] != socket.IPPROTO_TCP:
            continue
        header = (packet[0] & 0x0F) * 4
        source_port = int.from_bytes(packet[header:header + 2], "big")
        if source_port == server_port and marker in packet:
            ttls.append(packet[8])
    return ttls


def test_token_answer_carries_the_hop_limit_and_reads_do_not(start):
    server = start(demo(**{"i-0de0000000000002": {"metadata_options": {"hop_limit": 3}}}))
    sock = capture_socket()
    with sock:
        raw = request(server.port, "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "77"},
                      source="127.0.0.2")
        assert parse(raw)[0] == 200
        ttls = responses_seen(sock, server.port, b"X-aws-ec2-metadata-token-ttl-seconds: 77")
        assert ttls and set(ttls) == {3}

        # The default hop limit is 1.
        assert parse(request(server.port, "PUT", "/latest/api/token",
                             {"X-aws-ec2-metadata-token-ttl-seconds": "78"}, source="127.0.0.4"))[0] == 200
        ttls = responses_seen(sock, server.port, b"X-aws-ec2-metadata-token-ttl-seconds: 78")
        assert ttls and set(ttls) == {1}

        # Reads are not limited: the system default TTL.
        assert parse(request(server.port, "GET", "/latest/meta-data/instance-id", source="127.0.0.2"))[0] == 200
        ttls = responses_seen(sock, server.port, b"i-0de0000000000002")
        assert ttls and all(ttl > 3 for ttl in ttls)
