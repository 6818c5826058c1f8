"""The controller fallback cache against a stand-in controller on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import uvloop

from edge.config import EucalyptusConfig
from edge.eucalyptus.controller import ControllerMetadata, ControllerUnavailable


def _client(controller, **changes) -> ControllerMetadata:
    config = EucalyptusConfig(controller_url=controller.url, controller_ttl=60.0, controller_stale_if_error=3600.0,
                              controller_timeout=1.0)
    return ControllerMetadata(dataclasses.replace(config, **changes))


def test_answers_are_cached_per_instance_and_path(controller) -> None:
    controller.add("i-00000001", "10.0.0.10")
    controller.add("i-00000002", "10.0.0.20")
    client = _client(controller)

    async def scenario():
        first = await client.fetch("i-00000001", "10.0.0.10", "latest/meta-data/ami-id")
        assert (first.status, first.body) == (200, b"emi-00010000")
        again = await client.fetch("i-00000001", "10.0.0.10", "latest/meta-data/ami-id")
        assert again is first
        other = await client.fetch("i-00000002", "10.0.0.20", "latest/meta-data/ami-id")
        assert other.body == b"emi-00020000"
        missing = await client.fetch("i-00000001", "10.0.0.10", "latest/meta-data/nope")
        assert missing.status == 404
        assert controller.requests == [("i-00000001", "latest/meta-data/ami-id"),
                                       ("i-00000002", "latest/meta-data/ami-id"),
                                       ("i-00000001", "latest/meta-data/nope")]

    uvloop.run(scenario())


def test_identity_by_instance_id_header(controller) -> None:
    controller.add("i-00000003", "10.0.0.30")
    client = _client(controller, controller_identity="instance-id")

    async def scenario():
        answer = await client.fetch("i-00000003", "255.0.0.30", "latest/user-data")
        assert answer.body == b"#!/bin/sh\necho i-00000003\n"

    uvloop.run(scenario())


def test_single_flight(controller) -> None:
    controller.add("i-00000001", "10.0.0.10")
    controller.delay = 0.3
    client = _client(controller)

    async def scenario():
        answers = await asyncio.gather(*(client.fetch("i-00000001", "10.0.0.10", "latest/user-data")
                                         for _ in range(50)))
        assert {a.body for a in answers} == {b"#!/bin/sh\necho i-00000001\n"}
        assert len(controller.requests) == 1
        assert client.stats.coalesced == 49

    uvloop.run(scenario())


def test_served_stale_while_the_controller_is_down(controller) -> None:
    controller.add("i-00000001", "10.0.0.10")
    client = _client(controller, controller_ttl=0.0)

    async def scenario():
        fresh = await client.fetch("i-00000001", "10.0.0.10", "latest/meta-data/public-keys/0/openssh-key")
        client.configure(dataclasses.replace(client.config, controller_url="http://127.0.0.1:9/"))  # unreachable
        stale = await client.fetch("i-00000001", "10.0.0.10", "latest/meta-data/public-keys/0/openssh-key")
        assert stale.body == fresh.body == b"ssh-rsa AAAA0001 admin"
        assert client.stats.stale_served == 1 and client.stats.failures == 1
        with pytest.raises(ControllerUnavailable):
            await client.fetch("i-00000001", "10.0.0.10", "latest/meta-data/instance-type")  # never cached

    uvloop.run(scenario())


def test_slow_controller_times_out_to_the_cached_answer(controller) -> None:
    controller.add("i-00000001", "10.0.0.10")
    client = _client(controller, controller_ttl=0.0, controller_timeout=0.3)

    async def scenario():
        await client.fetch("i-00000001", "10.0.0.10", "latest/meta-data/ami-id")
        controller.delay = 1.0
        started = time.monotonic()
        answer = await client.fetch("i-00000001", "10.0.0.10", "latest/meta-data/ami-id")
        assert answer.body == b"emi-00010000"
        assert time.monotonic() - started < 0.9

    uvloop.run(scenario())


def test_credentials_are_never_served_past_their_expiration(controller) -> None:
    soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 2))
    controller.add("i-00000001", "10.0.0.10", credentials_expiration=soon)
    client = _client(controller)
    path = "latest/meta-data/iam/security-credentials/role"

    async def scenario():
        answer = await client.fetch("i-00000001", "10.0.0.10", path)
        assert b"AKID0001" in answer.body
        assert answer.usable_until <= time.time() + 2.5  # bounded by Expiration, not stale_if_error
        client.configure(dataclasses.replace(client.config, controller_url="http://127.0.0.1:9/"))
        # Refresh-ahead made it stale at once (less than 5 minutes left): served while valid...
        assert (await client.fetch("i-00000001", "10.0.0.10", path)).body == answer.body
        await asyncio.sleep(2.6)
        # ...and never after its Expiration.
        with pytest.raises(ControllerUnavailable):
            await client.fetch("i-00000001", "10.0.0.10", path)

    uvloop.run(scenario())


def test_identity_by_source_address(controller) -> None:
    """EDGE mode (VmMetadata.java): the controller knows an instance only by the address it connects from."""
    controller.add("i-00000005", "127.16.0.5")
    client = _client(controller, controller_identity="source-address")

    async def scenario():
        answer = await client.fetch("i-00000005", "127.16.0.5", "latest/user-data")
        assert answer.body == b"#!/bin/sh\necho i-00000005\n"
        assert controller.peers == ["127.16.0.5"]

    uvloop.run(scenario())


def test_still_starting_up_is_never_cached(controller) -> None:
    """MetadataPipeline answers 200 'System is still starting up' to every path while bootstrapping."""
    controller.add("i-00000001", "10.0.0.10")
    client = _client(controller, controller_ttl=0.0)

    async def scenario():
        controller.starting = True
        with pytest.raises(ControllerUnavailable, match="still starting up"):
            await client.fetch("i-00000001", "10.0.0.10", "latest/meta-data/ami-id")
        assert client.cache.get(("i-00000001", "latest/meta-data/ami-id")) is None
        assert client.stats.not_ready == 1
        controller.starting = False
        client.paused_until = 0.0  # the pause after a failure has passed
        assert (await client.fetch("i-00000001", "10.0.0.10", "latest/meta-data/ami-id")).body == b"emi-00010000"
        controller.starting = True
        client.paused_until = 0.0
        # While it restarts, the last real answer is served, not the text.
        assert (await client.fetch("i-00000001", "10.0.0.10", "latest/meta-data/ami-id")).body == b"emi-00010000"

    uvloop.run(scenario())


def _raw_server(reply: bytes) -> tuple[socket.socket, list[int], threading.Thread]:
    """A 'controller' that answers every connection with ``reply`` and counts connections."""
    server = socket.create_server(("127.0.0.1", 0))
    connections: list[int] = []

    def serve() -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            connections.append(1)
            with client:
                client.recv(4096)
                client.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, connections, thread


@pytest.mark.parametrize("reply", [b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\nshort",
                                   b"HTTP/1.1 abc\r\n\r\n", b""])
def test_a_controller_answering_garbage_is_a_failure_and_the_cache_answers(controller, reply: bytes) -> None:
    controller.add("i-00000001", "10.0.0.10")
    client = _client(controller, controller_ttl=0.0)
    server, connections, _ = _raw_server(reply)

    async def scenario():
        good = await client.fetch("i-00000001", "10.0.0.10", "latest/meta-data/ami-id")
        client.configure(dataclasses.replace(client.config, controller_url=f"http://127.0.0.1:{server.getsockname()[1]}/"))
        assert await client.fetch("i-00000001", "10.0.0.10", "latest/meta-data/ami-id") is good
        assert client.stats.failures == 1 and client.stats.stale_served == 1
        with pytest.raises(ControllerUnavailable):
            await client.fetch("i-00000001", "10.0.0.10", "latest/user-data")

    try:
        uvloop.run(scenario())
    finally:
        server.close()


def test_after_a_failure_the_controller_is_left_alone_for_a_while(controller) -> None:
    """Requests during the pause get the cache at once instead of each waiting for a timeout."""
    controller.add("i-00000001", "10.0.0.10")
    client = _client(controller, controller_ttl=0.0)
    server, connections, _ = _raw_server(b"garbage\r\n\r\n")

    async def scenario():
        first = await client.fetch("i-00000001", "10.0.0.10", "latest/meta-data/ami-id")
        client.configure(dataclasses.replace(client.config, controller_url=f"http://127.0.0.1:{server.getsockname()[1]}/"))
        for _ in range(20):
            assert await client.fetch("i-00000001", "10.0.0.10", "latest/meta-data/ami-id") is first
        assert len(connections) == 1 and client.stats.paused == 19
        client.paused_until = 0.0
        await client.fetch("i-00000001", "10.0.0.10", "latest/meta-data/ami-id")
        assert len(connections) == 2 and client.pause == 2.0  # the pause doubles while it keeps failing

    try:
        uvloop.run(scenario())
    finally:
        server.close()


def test_instances_that_appeared_while_the_controller_was_down_are_prefetched_once_it_is_back(controller,
                                                                                              monkeypatch) -> None:
    from edge.config import Config
    from edge.eucalyptus import fallback as fallback_module
    from edge.eucalyptus.gni import GniOptions, decode_gni
    from edge.view.snapshot import build_snapshot
    from tests.eucalyptus.conftest import fixture_bytes

    monkeypatch.setattr(fallback_module, "PREFETCH_RETRY", 0.2)
    snapshot = build_snapshot(decode_gni(fixture_bytes("gni-vpc.xml"), GniOptions()))
    for instance in snapshot.view.instances:
        controller.add(instance.id, instance.primary_interface.primary_ip)
    controller.down = True
    fallback = fallback_module.ControllerFallback(Config(eucalyptus=EucalyptusConfig(
        controller_url=controller.url, controller_timeout=1.0)))

    async def until(condition, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)

    async def scenario():
        fallback.view_changed(snapshot)
        await until(lambda: fallback.counts["prefetch_failed"] >= 3, 10)
        controller.down = False
        await until(lambda: fallback.counts["prefetched"] == 3, 20)
        answer = fallback.controller.cache[("i-00000002", "latest/user-data")]
        assert answer.body == b"#!/bin/sh\necho i-00000002\n"
        await fallback.close()

    uvloop.run(scenario())


def test_saved_answers_round_trip_without_credentials_and_a_corrupt_file_is_ignored(controller, tmp_path,
                                                                                   caplog) -> None:
    from edge.config import Config, ViewConfig
    from edge.eucalyptus.fallback import SAVED_NAME, ControllerFallback

    controller.add("i-00000001", "10.0.0.10")
    config = Config(view=ViewConfig(state_dir=str(tmp_path)),
                    eucalyptus=EucalyptusConfig(controller_url=controller.url, controller_timeout=1.0))
    first = ControllerFallback(config)

    async def fill():
        for path in ("latest/user-data", "latest/meta-data/iam/security-credentials/role", "latest/meta-data/nope"):
            await first.controller.fetch("i-00000001", "10.0.0.10", path)
        await first.save()

    uvloop.run(fill())
    again = ControllerFallback(config)
    assert set(again.controller.cache.keys()) == {("i-00000001", "latest/user-data")}
    assert again.controller.cache[("i-00000001", "latest/user-data")].body == b"#!/bin/sh\necho i-00000001\n"
    (tmp_path / SAVED_NAME).write_bytes(b'{"format": "edge-eucalyptus-controller-cache/1", "answers": [[1]]}')
    with caplog.at_level("WARNING", logger="edge.eucalyptus"):
        assert len(ControllerFallback(config).controller.cache) == 0
    assert any("saved controller answers ignored" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed")
def test_without_cap_net_admin_asking_from_an_instance_address_fails_clearly(controller) -> None:
    """source-address needs IP_TRANSPARENT for an address that is not this host's: without the
    capability the failure says so, instead of a connection that never completes."""
    controller.add("i-00000006", "192.0.2.6")
    code = textwrap.dedent(f"""
        import asyncio
        from edge.config import EucalyptusConfig
        from edge.eucalyptus.controller import ControllerMetadata, ControllerUnavailable
        client = ControllerMetadata(EucalyptusConfig(controller_url="{controller.url}",
                                                     controller_identity="source-address", controller_timeout=3.0))
        try:
            asyncio.run(client.fetch("i-00000006", "192.0.2.6", "latest/user-data"))
        except ControllerUnavailable as exc:
            print("unavailable:", exc)
    """)
    # Without CAP_NET_ADMIN and CAP_NET_RAW, as edge-eucalyptus.service would be without them.
    result = subprocess.run(["setpriv", "--bounding-set", "-net_admin,-net_raw", "--inh-caps", "-net_admin,-net_raw",
                             sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "unavailable: cannot connect from the instance's address 192.0.2.6" in result.stdout, result.stderr
    assert "needs CAP_NET_ADMIN" in result.stdout
