"""The fleet's shared token keys come from the provider the composition root plugs in (etcd's in edge).

The metadata service defines the interface (:class:`edge.metadata.service.TokenKeyProvider`)
and names no store; here a provider holding the key text in memory stands in for one, and
tokens are asked for and used over real loopback sockets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from imds_harness import Harness, make_config, parse, request, token

from edge.config import Config, FleetConfig
from edge.errors import ConfigError
from edge.metadata.service import load_token_keys
from edge.metadata.tokens import generate_token_key_file
from edge.view.demo import demo_document

PATH = "/latest/meta-data/instance-id"
SOURCE = "memory://fleet-keys"


class Follower:
    def __init__(self, apply: Callable[[str], bool]) -> None:
        self.apply = apply
        self.configured: list[str] = []
        self.stopped = False

    def configure(self, config: Config) -> None:
        self.configured.append(config.fleet.token_key_source)

    async def stop(self) -> None:
        self.stopped = True


class MemoryKeys:
    def __init__(self, text: str) -> None:
        self.text = text
        self.followers: list[Follower] = []

    def read(self, config: Config) -> str:
        return self.text

    def follow(self, apply: Callable[[str], bool]) -> Follower:
        follower = Follower(apply)
        self.followers.append(follower)
        return follower


def _shared(tmp_path) -> Config:
    return dataclasses.replace(make_config(tmp_path), fleet=FleetConfig(token_key_source=SOURCE))


def _get(port: int, value: str) -> int:
    return parse(request(port, "GET", PATH, {"X-aws-ec2-metadata-token": value}, "127.0.0.3"))[0]


def test_shared_keys_are_read_and_followed_through_the_provider(tmp_path) -> None:
    first = generate_token_key_file(tmp_path / "first").read_text()
    second = generate_token_key_file(tmp_path / "second").read_text()
    provider = MemoryKeys(first)
    harness = Harness(_shared(tmp_path), demo_document(), token_keys=provider)
    try:
        old = token(harness.port, source="127.0.0.3")
        assert _get(harness.port, old) == 200
        [follower] = provider.followers
        assert follower.configured == [SOURCE]
        assert harness.call(lambda: follower.apply(second)) is True
        assert harness.call(lambda: follower.apply(second)) is False, "the same keys again change nothing"
        assert _get(harness.port, old) == 401
        assert _get(harness.port, token(harness.port, source="127.0.0.3")) == 200
        harness.call(lambda: harness.service.reload(_shared(tmp_path)))
        assert follower.configured == [SOURCE, SOURCE]
    finally:
        harness.close()
    assert follower.stopped
    assert not (tmp_path / "state" / "token-keys").exists(), "shared keys never fall back to a generated file"


def test_a_shared_key_source_without_a_provider_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match=f"fleet.token_key_source '{SOURCE}': no token key provider"):
        load_token_keys(_shared(tmp_path))
