"""Token issue/verify and key files (pure), plus the rate limiter."""

from __future__ import annotations

import base64
import os
import stat

import pytest

from edge.errors import ConfigError
from edge.metadata import tokens
from edge.ratelimit import RateLimiter

NOW = 1_800_000_000.0


def keys_of(*secrets: bytes) -> tokens.TokenKeys:
    return tokens.TokenKeys.of([tokens.TokenKey.from_secret(f"k{i}", s) for i, s in enumerate(secrets)])


KEYS = keys_of(b"a" * 32)


def test_roundtrip_and_remaining_lifetime():
    token = tokens.issue(KEYS, "i-1", 600, NOW)
    assert tokens.verify(KEYS, token, "i-1", NOW) == 600
    assert tokens.verify(KEYS, token, "i-1", NOW + 599.5) == 1
    assert tokens.verify(KEYS, token, "i-1", NOW + 600) == 0


def test_token_is_bound_to_instance_and_key():
    token = tokens.issue(KEYS, "i-1", 600, NOW)
    assert tokens.verify(KEYS, token, "i-2", NOW) == 0
    assert tokens.verify(keys_of(b"b" * 32), token, "i-1", NOW) == 0


def test_token_is_opaque_url_safe_and_unique():
    first = tokens.issue(KEYS, "i-0123456789abcdef0", 600, NOW)
    second = tokens.issue(KEYS, "i-0123456789abcdef0", 600, NOW)
    assert first != second
    assert len(first) == tokens.TOKEN_LENGTH == 56
    assert set(first.decode()) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    raw = base64.urlsafe_b64decode(first + b"=" * (-len(first) % 4))
    assert b"i-0123456789abcdef0" not in raw and b"k0" not in raw and b"a" * 8 not in raw


def test_tampering_is_rejected():
    token = bytearray(tokens.issue(KEYS, "i-1", 600, NOW))
    for index in range(len(token)):
        changed = bytearray(token)
        changed[index] = ord("A") if changed[index] != ord("A") else ord("B")
        assert tokens.verify(KEYS, bytes(changed), "i-1", NOW) == 0, index
    for junk in (b"", b"x", b"=" * 56, b"\xff" * 56, bytes(token) + b"A"):
        assert tokens.verify(KEYS, junk, "i-1", NOW) == 0


def test_rotation_first_signs_all_verify():
    old = keys_of(b"o" * 32)
    rotated = keys_of(b"n" * 32, b"o" * 32)
    from_old = tokens.issue(old, "i-1", 60, NOW)
    assert tokens.verify(rotated, from_old, "i-1", NOW) == 60
    from_new = tokens.issue(rotated, "i-1", 60, NOW)
    assert tokens.verify(old, from_new, "i-1", NOW) == 0
    assert tokens.verify(keys_of(b"n" * 32), from_new, "i-1", NOW) == 60


def test_parse_ttl():
    assert tokens.parse_ttl(b"1") == 1 and tokens.parse_ttl(b"21600") == 21600 and tokens.parse_ttl(b" 60 ") == 60
    for bad in (None, b"", b"0", b"21601", b"-1", b"1e3", b"abc", b"9" * 40):
        assert tokens.parse_ttl(bad) is None


def test_key_file_generate_rotate_and_load(tmp_path):
    path = tmp_path / "keys"
    tokens.generate_token_key_file(path, name="first")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    first = tokens.load_key_file(path)
    assert first.signing.name == "first"
    with pytest.raises(ConfigError):
        tokens.generate_token_key_file(path)
    tokens.generate_token_key_file(path, name="second", add=True)
    rotated = tokens.load_key_file(path)
    assert rotated.signing.name == "second" and len(rotated.by_id) == 2
    assert first.signing.key_id in rotated.by_id


def test_key_file_errors(tmp_path):
    for text, message in (("", "no keys"), ("name\n", "NAME BASE64KEY"), ("k !!!\n", "base64"),
                          (f"k {base64.b64encode(b'short').decode()}\n", "shorter")):
        with pytest.raises(ConfigError, match=message):
            tokens.parse_key_file(text)
    with pytest.raises(ConfigError, match="cannot read"):
        tokens.load_key_file(tmp_path / "missing")


def test_ensure_key_file_creates_once(tmp_path):
    path = tmp_path / "state" / "token-keys"
    created = tokens.ensure_key_file(path)
    again = tokens.ensure_key_file(path)
    assert created.signing.secret == again.signing.secret
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_rate_limiter_bucket():
    limiter = RateLimiter(rate=10, burst=3, max_entries=100)
    assert [limiter.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b", 0.0)
    assert not limiter.allow("a", 0.05)
    assert limiter.allow("a", 0.2)


def test_rate_limiter_memory_is_bounded():
    limiter = RateLimiter(rate=1, burst=2, max_entries=50)
    for n in range(10_000):
        limiter.allow(f"i-{n}", n * 0.001)
        assert len(limiter) <= 50
    # Full buckets are forgotten without granting more than the burst.
    fresh = RateLimiter(rate=1, burst=2, max_entries=2)
    assert fresh.allow("x", 0) and fresh.allow("x", 0) and not fresh.allow("x", 0)
    fresh.allow("y", 0)
    fresh.allow("z", 0)
    assert len(fresh) <= 2
