"""The controller fallback cache against a stand-in controller on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
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
