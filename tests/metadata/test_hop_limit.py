"""The token PUT answer leaves with IP TTL = the instance's hop limit: captured off ``lo`` with AF_PACKET."""

from __future__ import annotations

import ctypes
import socket
import struct
import time

import pytest
from imds_harness import demo, parse, request

ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26


def tcp_source_port_filter(port: int) -> list[tuple[int, int, int, int]]:
    """Classic BPF for ``ip and tcp src port PORT`` on an Ethernet-framed device (lo)."""
    return [
        (0x28, 0, 0, 12),          # ldh [12]             ethertype
        (0x15, 0, 8, 0x0800),      # jeq IPv4, else drop
        (0x30, 0, 0, 23),          # ldb [23]             protocol
        (0x15, 0, 6, 6),           # jeq TCP, else drop
        (0x28, 0, 0, 20),          # ldh [20]             fragment offset
        (0x45, 4, 0, 0x1FFF),      # jset -> drop fragments
        (0xB1, 0, 0, 14),          # ldxb 4*([14]&0xf)    IP header length
        (0x48, 0, 0, 14),          # ldh [x+14]           TCP source port
        (0x15, 0, 1, port),        # jeq PORT
        (0x06, 0, 0, 0x40000),     # ret: accept
        (0x06, 0, 0, 0),           # ret: drop
    ]


def capture_socket(port: int) -> socket.socket:
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    except (PermissionError, OSError, AttributeError) as exc:
        pytest.skip(f"cannot capture on lo with AF_PACKET: {exc}")
    # Other tests load loopback heavily: filter in the kernel so only the server's packets queue up.
    program = b"".join(struct.pack("HBBI", *instruction) for instruction in tcp_source_port_filter(port))
    buffer = ctypes.create_string_buffer(program)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                    struct.pack("HL", len(program) // 8, ctypes.addressof(buffer)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("lo", 0))
    sock.settimeout(0.2)
    return sock


def responses_seen(sock: socket.socket, server_port: int, marker: bytes, seconds: float = 5.0) -> list[int]:
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
    sock = capture_socket(server.port)
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


def test_gateway_hops_are_added_to_the_token_answers_hop_limit(start):
    """A gateway two routers away from its instances sends the token answer with TTL hop_limit + 2."""
    server = start(demo(**{"i-0de0000000000002": {"metadata_options": {"hop_limit": 3}}}), gateway_hops=2)
    sock = capture_socket(server.port)
    with sock:
        assert parse(request(server.port, "PUT", "/latest/api/token",
                             {"X-aws-ec2-metadata-token-ttl-seconds": "79"}, source="127.0.0.2"))[0] == 200
        ttls = responses_seen(sock, server.port, b"X-aws-ec2-metadata-token-ttl-seconds: 79")
        assert ttls and set(ttls) == {5}
        assert parse(request(server.port, "PUT", "/latest/api/token",
                             {"X-aws-ec2-metadata-token-ttl-seconds": "80"}, source="127.0.0.4"))[0] == 200
        ttls = responses_seen(sock, server.port, b"X-aws-ec2-metadata-token-ttl-seconds: 80")
        assert ttls and set(ttls) == {3}


def test_gateway_hops_by_network_overrides_the_default_for_that_networks_listeners(start):
    """A listener on the instances' own segment (hops 0) next to routed ones (gateway_hops 2)."""
    server = start(demo(**{"i-0de0000000000002": {"metadata_options": {"hop_limit": 3}}}), gateway_hops=2,
                   gateway_hops_by_network=("vpc-elsewhere=5", "=0"))
    sock = capture_socket(server.port)
    with sock:
        assert parse(request(server.port, "PUT", "/latest/api/token",
                             {"X-aws-ec2-metadata-token-ttl-seconds": "81"}, source="127.0.0.2"))[0] == 200
        ttls = responses_seen(sock, server.port, b"X-aws-ec2-metadata-token-ttl-seconds: 81")
        assert ttls and set(ttls) == {3}


@pytest.mark.parametrize("entries", [("vpc-1",), ("vpc-1=x",), ("vpc-1=65",), ("vpc-1=1", "vpc-1=2")])
def test_gateway_hops_by_network_entries_that_do_not_parse_are_refused(entries):
    from edge.config import load_config
    from edge.errors import ConfigError

    with pytest.raises(ConfigError, match="gateway_hops_by_network"):
        load_config(env={"EDGE_METADATA_GATEWAY_HOPS_BY_NETWORK": ",".join(entries)})
