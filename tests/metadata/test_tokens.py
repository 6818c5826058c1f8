"""Token issue/verify and key files (pure), plus the rate limiter."""

from __future__ import annotations

import base64
import os
import stat

import pytest

from edge.errors import ConfigError
from edge.metadata import tokens
from edge.ratelimit import RateLimiter, create_shared_table, map_table

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
    """AWS documents the lifetime as an integer number of seconds in 1..21600 and answers 400 otherwise.

    Decisions where that leaves room, following AWS: spaces and tabs around the value are HTTP's
    optional whitespace (RFC 9110 5.5), which AWS's HTTP server strips like any other, so `` 60 ``
    is 60; the value is read as a decimal integer (AWS's own IMDS mock uses Go's strconv.Atoi), so
    ``0060`` is 60 too, and however many zeros lead, the number is what counts.  Signs, inner
    spaces, fractions, exponents, non-ASCII digits and other whitespace are refused.
    """
    assert tokens.parse_ttl(b"1") == 1 and tokens.parse_ttl(b"21600") == 21600
    assert tokens.parse_ttl(b" 60 ") == 60 and tokens.parse_ttl(b"\t60\t") == 60
    assert tokens.parse_ttl(b"0060") == 60 and tokens.parse_ttl(b"0" * 50 + b"21600") == 21600
    for bad in (None, b"", b" ", b"0", b"000", b"21601", b"021601", b"-1", b"+60", b"6 0", b"60\r", b"60\x0b",
                b"1e3", b"1.5", b"abc", b"9" * 40, b"9" * 5000, "\u0661\u0662".encode()):
        assert tokens.parse_ttl(bad) is None, bad


def test_only_the_issued_spelling_of_a_token_verifies():
    """The decoder would also take the standard alphabet's "+" and "/" (and skip stray characters):
    a token has exactly one accepted form, the URL-safe unpadded one it was issued in."""
    for attempt in range(200):
        token = tokens.issue(KEYS, "i-1", 600, NOW, nonce=attempt.to_bytes(8, "big"))
        if b"-" in token or b"_" in token:
            break
    assert b"-" in token or b"_" in token
    assert tokens.verify(KEYS, token, "i-1", NOW) == 600
    standard = token.replace(b"-", b"+").replace(b"_", b"/")
    assert len(standard) == len(token) and tokens.verify(KEYS, standard, "i-1", NOW) == 0
    assert tokens.verify(KEYS, token[:-1] + b"=", "i-1", NOW) == 0
    assert tokens.verify(KEYS, token[:20] + b"." + token[21:], "i-1", NOW) == 0


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


def test_rate_limiters_on_one_shared_table_share_every_bucket():
    """What two workers of a gateway do: each maps the supervisor's table, and an instance's bucket
    is one, whichever worker takes from it (also a worker started after the bucket was used)."""
    fd = create_shared_table(100)
    try:
        first, second = RateLimiter(10, 3, 100, map_table(fd)), RateLimiter(10, 3, 100, map_table(fd))
        assert first.allow("i-1", 0.0) and second.allow("i-1", 0.0) and first.allow("i-1", 0.0)
        assert not second.allow("i-1", 0.0) and not first.allow("i-1", 0.01)
        restarted = RateLimiter(10, 3, 100, map_table(fd))
        assert not restarted.allow("i-1", 0.02)
        # Refilled at 10/s to 2 tokens, for everyone.
        assert restarted.allow("i-1", 0.2) and first.allow("i-1", 0.2) and not second.allow("i-1", 0.2)
        assert second.allow("i-2", 0.2)  # another instance, another bucket
    finally:
        os.close(fd)


def test_rate_limiter_slots_go_to_whoever_needs_one_when_all_are_busy():
    limiter = RateLimiter(rate=1, burst=2, max_entries=1)
    assert limiter.entries == 1
    assert limiter.allow("a", 0.0) and limiter.allow("a", 0.0) and not limiter.allow("a", 0.0)
    # "a" is busy and holds the only slot: "b" takes it anyway (a fresh bucket, never a shared one).
    assert limiter.allow("b", 0.0) and limiter.allow("b", 0.0) and not limiter.allow("b", 0.0)
    assert len(limiter) == 1


def test_a_reload_resizes_a_private_table_and_leaves_a_shared_one():
    private = RateLimiter(rate=1, burst=1, max_entries=10)
    assert private.allow("a", 0.0) and not private.allow("a", 0.0)
    private.max_entries = 10  # unchanged: the buckets stay
    assert not private.allow("a", 0.0)
    private.max_entries = 20
    assert private.entries == 20 and private.allow("a", 0.0)  # a new table
    fd = create_shared_table(10)
    try:
        shared = RateLimiter(rate=1, burst=1, max_entries=10, table=map_table(fd))
        assert shared.allow("a", 0.0)
        shared.max_entries = 20
        assert shared.entries == 10 and not shared.allow("a", 0.0)
    finally:
        os.close(fd)
