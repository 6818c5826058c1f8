"""A GET without a token from a peer whose answers need no other check is answered from the table of its
instance's rendered answers (Peer.answers, set by MetadataHandler.identify), after the rate limit when it is on:
over real sockets, that table follows the view, the configuration and everything else answer() checks."""

from __future__ import annotations

import socket
import time

import pytest
from imds_harness import connect, demo, make_config, token

I1 = "i-0de0000000000001"
PATH = "/latest/meta-data/instance-type"


def ask(sock: socket.socket, method: str = "GET", path: str = PATH, headers: str = "") -> tuple[int, bytes, bytes]:
    """(status, head, body) of one request on a kept-alive connection."""
    sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{headers}\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, data
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
    if method == "HEAD":
        length = 0
    while len(body) < length:
        piece = sock.recv(65536)
        assert piece, body
        body += piece
    assert len(body) == length
    return int(head.split()[1]), head, body


@pytest.fixture
def server(start):  # type: ignore[no-untyped-def]
    return start(rate=0.0)


def held_peer(server):  # type: ignore[no-untyped-def]
    """The Peer of the one open connection (waits for it to be counted)."""
    deadline = time.monotonic() + 5
    while not server.call(lambda: len(server.service.connections)):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return server.call(lambda: next(iter(server.service.connections)).peer)


def test_a_held_connection_answers_from_the_new_view_after_a_swap(server):
    with connect(server.port) as held:
        assert ask(held)[::2] == (200, b"t2.micro")
        assert ask(held)[::2] == (200, b"t2.micro")
        assert held_peer(server).answers  # the table is what answers
        server.swap(demo(**{I1: {"instance_type": "m5.large"}}))
        assert ask(held)[::2] == (200, b"m5.large")
        assert ask(held)[::2] == (200, b"m5.large")
        server.swap(demo())
        assert ask(held)[::2] == (200, b"t2.micro")
    # A new connection from the same source (its Peer is remembered) sees the current view too.
    server.swap(demo(**{I1: {"instance_type": "c5.xlarge"}}))
    with connect(server.port) as fresh:
        assert ask(fresh)[::2] == (200, b"c5.xlarge")


def test_the_rate_limit_holds_for_answers_from_the_table(start):
    server = start(rate=0.001, burst=3)
    with connect(server.port) as held:
        assert [ask(held)[0] for _ in range(5)] == [200, 200, 200, 429, 429]
        peer = held_peer(server)
        assert peer.answers and peer.limited == I1
        assert server.call(lambda: server.service.handler.throttled) == 2
        status, head, body = ask(held, headers="Connection: close\r\n")
        assert (status, body) == (429, b"") and b"Connection: close" in head
    # Other instances have their own bucket.
    with connect(server.port, "127.0.0.2") as other:
        assert ask(other)[0] == 200


def test_reload_turning_the_rate_limit_on_and_off_reaches_open_connections(start, tmp_path):
    server = start(rate=0.0)
    with connect(server.port) as held:
        assert [ask(held)[0] for _ in range(3)] == [200] * 3
        limited = make_config(tmp_path, rate=0.001, burst=2)
        server.call(lambda: server.service.reload(limited))
        assert [ask(held)[0] for _ in range(4)] == [200, 200, 429, 429]
        server.call(lambda: server.service.reload(make_config(tmp_path, rate=0.0)))
        assert [ask(held)[0] for _ in range(3)] == [200] * 3


def test_a_token_is_checked_on_a_connection_the_table_answers(server):
    with connect(server.port) as held:
        assert ask(held)[0] == 200
        assert ask(held)[0] == 200
        assert ask(held, headers="X-aws-ec2-metadata-token: forged\r\n")[0] == 401
        value = token(server.port)
        status, head, body = ask(held, headers=f"X-aws-ec2-metadata-token: {value}\r\n")
        assert (status, body) == (200, b"t2.micro")
        assert b"X-aws-ec2-metadata-token-ttl-seconds: " in head
        assert ask(held)[::2] == (200, b"t2.micro")


def test_an_instance_requiring_tokens_is_refused_every_tokenless_get(server):
    with connect(server.port, "127.0.0.3") as held:
        assert ask(held)[0] == 401
        assert ask(held)[0] == 401
        value = token(server.port, source="127.0.0.3")
        assert ask(held, headers=f"X-aws-ec2-metadata-token: {value}\r\n")[0] == 200
        assert ask(held)[0] == 401
        assert held_peer(server).answers is None


def test_head_and_close_on_a_connection_the_table_answers(server):
    with connect(server.port) as held:
        assert ask(held)[::2] == (200, b"t2.micro")
        status, head, body = ask(held, "HEAD")
        assert (status, body) == (200, b"") and b"Content-Length: 8" in head
        status, head, body = ask(held, headers="Connection: close\r\n")
        assert (status, body) == (200, b"t2.micro") and b"Connection: close" in head
        assert held.recv(10) == b""


def test_paths_not_in_the_table_take_the_full_path(server):
    with connect(server.port) as held:
        assert ask(held)[0] == 200
        assert ask(held, path="/latest/api/token")[0] == 405
        assert ask(held, path="/latest/meta-data/no-such-thing")[0] == 404
        assert ask(held, path="/latest/meta-data/no-such-thing")[0] == 404
        assert ask(held, "POST")[0] == 405
