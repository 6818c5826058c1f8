"""IMDSv2 token keys shared through etcd: one write rotates every gateway."""

from __future__ import annotations

import base64
import signal
import time

import pytest

from edge.metadata.tokens import generate_token_key_file, issue, parse_key_file
from tests.fleet.gateway import Gateway
from tests.support import wait_until

KEY = "edge/token-keys"


def signing_key_id(token: bytes) -> bytes:
    raw = base64.urlsafe_b64decode(token + b"=" * (-len(token) % 4))
    return raw[1:5]


def key_texts(tmp_path) -> tuple[str, str, str]:
    """(old only, new first + old, new only) as an operator's rotation writes them."""
    path = tmp_path / "keys"
    generate_token_key_file(path, name="old")
    old = path.read_text()
    generate_token_key_file(path, name="new", add=True)
    both = path.read_text()
    new_only = "".join(line + "\n" for line in both.splitlines() if not line.startswith("old "))
    return old, both, new_only


def old_then_new(both: str) -> str:
    """Step 1 of the rotation: the new key verifies everywhere but does not sign yet."""
    lines = [line for line in both.splitlines() if line and not line.startswith("#")]
    return "\n".join(sorted(lines, key=lambda line: not line.startswith("old "))) + "\n"


SPREAD = 8
"""Requests per gateway that make it very likely every worker answered at least one."""


@pytest.fixture
def gateways(tmp_path, etcd):
    started: list[Gateway] = []

    def start(name: str, host: str, refresh: str = "0.3") -> Gateway:
        gateway = Gateway(name, host, "demo", tmp_path / name,
                          extra_args=["--token-key-source", etcd.url(KEY)],
                          env={"EDGE_FLEET_TOKEN_KEY_REFRESH": refresh})
        started.append(gateway)
        gateway.start()
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


def test_rotation_through_etcd_reaches_every_gateway(tmp_path, etcd, gateways) -> None:
    old, both, new_only = key_texts(tmp_path)
    old_id = parse_key_file(old).signing.key_id
    new_id = parse_key_file(both).signing.key_id
    etcd.put(KEY, old)
    a, b = gateways("a", "127.0.1.1"), gateways("b", "127.0.1.2")

    token_old = a.token()
    assert signing_key_id(token_old) == old_id
    for gateway in (a, b):
        assert gateway.get("/latest/meta-data/instance-id", token=token_old).status == 200

    # 1. Add the new key second: every gateway verifies it before anyone signs with it.
    instance_id = a.get("/latest/meta-data/instance-id").body.decode()
    early = issue(parse_key_file(both), instance_id, 300, time.time())
    assert a.get("/latest/meta-data/instance-id", token=early).status == 401
    etcd.put(KEY, old_then_new(both))
    # Every worker of every gateway reads etcd on its own schedule: ask each gateway several times
    # (each request is a new connection, spread over its workers) before calling a step done.
    wait_until(lambda: all(g.get("/latest/meta-data/instance-id", token=early).status == 200
                           for g in (a, b) for _ in range(SPREAD)), timeout=20)
    assert signing_key_id(a.token()) == old_id and signing_key_id(b.token()) == old_id

    # 2. Make it primary: it signs everywhere, the old one still verifies.
    etcd.put(KEY, both)
    wait_until(lambda: all(signing_key_id(g.token()) == new_id for g in (a, b) for _ in range(SPREAD)), timeout=20)
    token_new = b.token()
    for gateway in (a, b):
        for _ in range(SPREAD):
            assert gateway.get("/latest/meta-data/instance-id", token=token_old).status == 200
            assert gateway.get("/latest/meta-data/instance-id", token=token_new).status == 200

    # 3. Retire the old key: its tokens stop verifying on every gateway; the new ones keep working.
    etcd.put(KEY, new_only)
    wait_until(lambda: all(g.get("/latest/meta-data/instance-id", token=token_old).status == 401
                           for g in (a, b) for _ in range(SPREAD)), timeout=20)
    for gateway in (a, b):
        for _ in range(SPREAD):
            assert gateway.get("/latest/meta-data/instance-id", token=token_new).status == 200

    # Garbage in etcd is refused and logged; the keys in use stay.
    etcd.put(KEY, "not a key file\n")
    wait_until(lambda: "token keys from etcd rejected" in a.log(), timeout=10)
    assert a.get("/latest/meta-data/instance-id", token=token_new).status == 200


def test_etcd_down_keeps_keys_and_a_restart_uses_the_cached_copy(tmp_path, etcd, gateways) -> None:
    old, _, _ = key_texts(tmp_path)
    etcd.put(KEY, old)
    a = gateways("a", "127.0.1.1")
    token = a.token()
    etcd.stop()
    wait_until(lambda: "token keys not refreshed from etcd" in a.log(), timeout=10)
    assert a.get("/latest/meta-data/instance-id", token=token).status == 200
    # A gateway restarted while etcd is away verifies with the keys it saw last.
    a.stop()
    a.start()
    assert "using the cached copy" in a.log()
    assert a.get("/latest/meta-data/instance-id", token=token).status == 200


def test_sighup_reads_the_keys_at_once(tmp_path, etcd, gateways) -> None:
    old, both, _ = key_texts(tmp_path)
    etcd.put(KEY, old)
    a = gateways("a", "127.0.1.1", refresh="3600")
    assert signing_key_id(a.token()) == parse_key_file(old).signing.key_id
    etcd.put(KEY, both)
    a.signal(signal.SIGHUP)
    wait_until(lambda: signing_key_id(a.token()) == parse_key_file(both).signing.key_id, timeout=5)


def test_no_etcd_and_no_cached_copy_refuses_to_start(tmp_path, etcd) -> None:
    gateway = Gateway("lonely", "127.0.1.1", "demo", tmp_path / "lonely",
                      extra_args=["--token-key-source", etcd.url("edge/absent")])
    gateway.start(wait=False)
    assert gateway.process is not None
    assert gateway.process.wait(20) != 0
    assert "token keys" in gateway.log() and "key not found" in gateway.log()


def test_token_key_source_is_checked_when_the_configuration_loads() -> None:
    from edge.config import load_config
    from edge.errors import ConfigError
    config = load_config(env={"EDGE_FLEET_TOKEN_KEY_SOURCE": "etcd://10.0.0.1:2379,10.0.0.2:2379/edge/keys"})
    assert config.fleet.token_key_source.endswith("/edge/keys")
    for bad in ("http://10.0.0.1/keys", "etcd://10.0.0.1/keys", "etcd://10.0.0.1:2379"):
        with pytest.raises(ConfigError, match="fleet.token_key_source"):
            load_config(env={"EDGE_FLEET_TOKEN_KEY_SOURCE": bad})
    with pytest.raises(ConfigError, match="token_key_refresh"):
        load_config(env={"EDGE_FLEET_TOKEN_KEY_REFRESH": "0"})
