"""The handler as a pure function of (snapshot, peer, request, clock, keys): outcomes and their order."""

from __future__ import annotations

import pytest
from imds_harness import demo, make_config

from edge.metadata import tokens
from edge.metadata.handler import NeedCredentials, Request, UnknownSource
from edge.metadata.identify import Peer
from edge.metadata.identity import ensure_signer
from edge.metadata.service import build_handler
from edge.view.parse import parse_view
from edge.view.snapshot import build_snapshot

NOW = 1_900_000_000.0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    directory = tmp_path_factory.mktemp("handler")
    keys = tokens.ensure_key_file(directory / "keys")
    handler = build_handler(make_config(directory, rate=0.0), keys, ensure_signer(directory))
    disabled = {"i-0de0000000000004": {"metadata_options": {"endpoint": "disabled"}}}
    snapshot = build_snapshot(parse_view(demo(**disabled)))
    return handler, snapshot, keys


def status(result) -> int:
    assert isinstance(result, bytes), result
    return int(result.split(b" ", 2)[1])


def answer(world, method, target, address="127.0.0.1", trusted=False, **fields):
    handler, snapshot, _ = world
    return handler.answer(snapshot, Peer(address, "", trusted), Request(method, target, **fields), NOW, 0.0)


def test_outcomes(world):
    _, _, keys = world
    own = tokens.issue(keys, "i-0de0000000000003", 60, NOW)
    cases = [
        (("GET", "/latest/meta-data/instance-id"), {}, 200),
        (("HEAD", "/latest/meta-data/instance-id"), {}, 200),
        (("GET", "/latest/api/token"), {}, 405),
        (("GET", "/latest/api/token"), {"address": "127.9.9.9"}, 405),  # no waiting for an unknown source
        (("DELETE", "/latest/meta-data/"), {}, 405),
        (("PUT", "/latest/meta-data/"), {}, 405),
        (("PUT", "/latest/api/token"), {}, 400),
        (("PUT", "/latest/api/token"), {"token_ttl": b"60", "forwarded_for": b"127.0.0.1"}, 403),
        (("PUT", "/2016-09-02/api/token"), {"token_ttl": b"60"}, 403),
        (("PUT", "/latest/api/token"), {"token_ttl": b"60", "address": "127.0.0.4"}, 403),
        (("GET", "/latest/meta-data/"), {"address": "127.0.0.4"}, 403),
        (("GET", "/latest/meta-data/"), {"address": "127.0.0.3"}, 401),
        (("GET", "/latest/meta-data/nothing"), {"address": "127.0.0.3"}, 401),  # authorisation before lookup
        (("GET", "/latest/meta-data/nothing"), {"address": "127.0.0.3", "token": own}, 404),
        (("GET", "/latest/meta-data/"), {"address": "127.0.0.2", "token": own}, 401),
        (("GET", "/latest/meta-data/instance-id"), {"address": "127.9.9.9", "waited": True}, 404),
    ]
    for (method, target), fields, expected in cases:
        got = answer(world, method.encode(), target.encode(), **fields)
        assert status(got) == expected, (method, target, fields)


def test_head_has_no_body_and_token_reads_carry_the_lifetime(world):
    _, _, keys = world
    head = answer(world, b"HEAD", b"/latest/meta-data/instance-id")
    assert head.endswith(b"\r\n\r\n") and b"Content-Length: 18\r\n" in head
    own = tokens.issue(keys, "i-0de0000000000003", 60, NOW - 15)
    read = answer(world, b"GET", b"/latest/meta-data/instance-id", address="127.0.0.3", token=own)
    assert b"\r\nX-aws-ec2-metadata-token-ttl-seconds: 45\r\n" in read and read.endswith(b"i-0de0000000000003")


def test_put_sets_the_hop_limit_and_closes(world):
    handler, snapshot, _ = world
    request = Request(b"PUT", b"/latest/api/token", token_ttl=b"120")
    result = handler.answer(snapshot, Peer("127.0.0.1", "", False), request, NOW, 0.0)
    assert status(result) == 200 and request.hop_limit == 1 and request.keep_alive is False
    assert b"Connection: close\r\n" in result and b"X-aws-ec2-metadata-token-ttl-seconds: 120\r\n" in result


def test_slow_paths_are_returned_not_awaited(world):
    unknown = answer(world, b"GET", b"/latest/meta-data/instance-id", address="127.9.9.9")
    assert unknown == UnknownSource("", "127.9.9.9")
    pending = answer(world, b"GET", b"/latest/meta-data/iam/security-credentials/demo-role")
    assert isinstance(pending, NeedCredentials) and pending.role == "demo-role" and pending.address == "127.0.0.1"


def test_proxy_headers_count_only_from_trusted_peers(world):
    proxied = answer(world, b"GET", b"/latest/meta-data/instance-id", address="10.0.0.1", trusted=True,
                     forwarded_for=b"127.0.0.2", network_header=b"vpc-demo")
    assert proxied.endswith(b"i-0de1000000000002")
    ignored = answer(world, b"GET", b"/latest/meta-data/instance-id", address="127.0.0.1",
                     forwarded_for=b"127.0.0.2", network_header=b"vpc-demo")
    assert ignored.endswith(b"i-0de0000000000001")
    garbage = answer(world, b"GET", b"/latest/meta-data/instance-id", address="10.0.0.1", trusted=True,
                     forwarded_for=b"not-an-address")
    assert status(garbage) == 404
