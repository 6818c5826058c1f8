"""IMDSv2 session tokens: stateless, bound to one instance, verifiable by every gateway.

A token is ``base64url(version | key id | expiry | nonce | mac)`` without padding,
where ``mac = HMAC-SHA256(key, instance id | expiry | nonce)`` truncated.  Nothing
is stored server side: any gateway holding the same key file verifies it, also
after a restart.  The instance id is only inside the MAC, and the key id is
derived from the key (``HMAC(key, "edge token key id")``), so a token reveals
neither the instance nor which named key signed it.

Key files hold one key per line, ``NAME BASE64KEY`` (``#`` comments allowed);
the first key signs, every key verifies, which is how keys are rotated: add the
new key as the first line on every gateway, wait the longest token lifetime
(6 hours), then drop the old line.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import secrets
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from edge.errors import ConfigError

TTL_MIN = 1
TTL_MAX = 21600

_VERSION = b"\x01"
_KEY_ID_SIZE = 4
_NONCE_SIZE = 8
_MAC_SIZE = 25
_HEADER = struct.Struct(">4sI8s")  # key id, expiry (unix seconds), nonce
_RAW_SIZE = 1 + _HEADER.size + _MAC_SIZE
TOKEN_LENGTH = len(base64.urlsafe_b64encode(b"\0" * _RAW_SIZE).rstrip(b"="))
"""Length of every token edge issues (56 characters, like AWS's)."""
MIN_KEY_BYTES = 32


@dataclass(frozen=True, slots=True)
class TokenKey:
    name: str
    secret: bytes
    key_id: bytes

    @classmethod
    def from_secret(cls, name: str, secret: bytes) -> TokenKey:
        key_id = hmac.digest(secret, b"edge token key id", "sha256")[:_KEY_ID_SIZE]
        return cls(name=name, secret=secret, key_id=key_id)


@dataclass(frozen=True, slots=True)
class TokenKeys:
    """The signing key first; ``by_id`` finds the verifying key of a token."""

    signing: TokenKey
    by_id: dict[bytes, TokenKey]

    @classmethod
    def of(cls, keys: list[TokenKey]) -> TokenKeys:
        if not keys:
            raise ConfigError("a token key file needs at least one key")
        return cls(signing=keys[0], by_id={k.key_id: k for k in reversed(keys)})


def _mac(secret: bytes, instance_id: str, header: bytes) -> bytes:
    return hmac.digest(secret, instance_id.encode() + header, "sha256")[:_MAC_SIZE]


def issue(keys: TokenKeys, instance_id: str, ttl: int, now: float, nonce: bytes | None = None) -> bytes:
    """A token for ``instance_id`` valid for ``ttl`` seconds from ``now``."""
    key = keys.signing
    header = _HEADER.pack(key.key_id, int(now) + ttl, nonce if nonce is not None else secrets.token_bytes(_NONCE_SIZE))
    raw = _VERSION + header + _mac(key.secret, instance_id, header)
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def verify(keys: TokenKeys, token: bytes, instance_id: str, now: float) -> int:
    """Remaining seconds of a valid token for ``instance_id``; 0 when invalid, expired or foreign."""
    if len(token) != TOKEN_LENGTH:
        return 0
    try:
        raw = base64.urlsafe_b64decode(token + b"=" * (-TOKEN_LENGTH % 4))
    except (binascii.Error, ValueError):
        return 0
    # The decoder also takes the standard alphabet's "+" and "/" and skips characters outside both:
    # only the one spelling edge issues is the token, so that a token has a single accepted form.
    if len(raw) != _RAW_SIZE or base64.urlsafe_b64encode(raw).rstrip(b"=") != token:
        return 0
    if raw[:1] != _VERSION:
        return 0
    header = raw[1:1 + _HEADER.size]
    key_id, expiry, _ = _HEADER.unpack(header)
    remaining = expiry - int(now)
    if remaining <= 0:
        return 0
    key = keys.by_id.get(key_id)
    if key is None or not hmac.compare_digest(raw[1 + _HEADER.size:], _mac(key.secret, instance_id, header)):
        return 0
    return remaining


TTL_DIGITS = len(str(TTL_MAX))


def parse_ttl(value: bytes | None) -> int | None:
    """The requested lifetime if the header is a decimal integer in 1..21600, else None (400).

    Spaces and tabs around the value are HTTP's optional whitespace, not part of it (RFC 9110
    section 5.5; the parser strips the leading ones only).  The value itself is digits only, read as
    a decimal integer as AWS's own IMDS mock reads it (Go's ``strconv.Atoi``), so leading zeros are
    allowed (``0060`` is 60); a sign, inner spaces, a fraction or an exponent are not.  Leading zeros
    are skipped before the length check so that a long run of them cannot make a huge integer.
    """
    if value is None:
        return None
    text = value.strip(b" \t")
    if not text.isdigit():
        return None
    significant = text.lstrip(b"0")
    if len(significant) > TTL_DIGITS:
        return None
    ttl = int(significant or b"0")
    return ttl if TTL_MIN <= ttl <= TTL_MAX else None


# -- key files -----------------------------------------------------------------------------------

def parse_key_file(text: str, where: str = "token key file") -> TokenKeys:
    keys: list[TokenKey] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ConfigError(f"{where}:{number}: expected 'NAME BASE64KEY'")
        name, encoded = parts
        try:
            standard = encoded.replace("-", "+").replace("_", "/")
            secret = base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{where}:{number}: key {name!r} is not valid base64") from None
        if len(secret) < MIN_KEY_BYTES:
            raise ConfigError(f"{where}:{number}: key {name!r} is shorter than {MIN_KEY_BYTES} bytes")
        keys.append(TokenKey.from_secret(name, secret))
    if not keys:
        raise ConfigError(f"{where}: no keys")
    return TokenKeys.of(keys)


def load_key_file(path: str | Path) -> TokenKeys:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read token key file {path}: {exc.strerror}") from None
    return parse_key_file(text, where=str(path))


def _key_line(name: str | None = None) -> str:
    label = name or time.strftime("key-%Y%m%dT%H%M%SZ", time.gmtime())
    return f"{label} {base64.b64encode(secrets.token_bytes(MIN_KEY_BYTES)).decode()}\n"


def generate_token_key_file(path: str | Path, name: str | None = None, add: bool = False) -> Path:
    """Write a new key file (mode 0600), or with ``add`` put a new signing key first and keep the rest (rotation)."""
    target = Path(path)
    previous = ""
    if add and target.exists():
        previous = target.read_text()
        parse_key_file(previous, where=str(target))
    elif target.exists():
        raise ConfigError(f"token key file {target} exists (add a key to it to rotate)")
    if name is None:
        # A key's name identifies it in tokens and logs: two keys added within one second
        # (the resolution of the default name) must still get different names.
        taken = {line.split()[0] for line in map(str.strip, previous.splitlines()) if line and not line.startswith("#")}
        base = name = time.strftime("key-%Y%m%dT%H%M%SZ", time.gmtime())
        suffix = 2
        while name in taken:
            name, suffix = f"{base}-{suffix}", suffix + 1
    header = "# edge IMDSv2 token keys: NAME BASE64KEY; the first signs, all verify\n"
    body = header + _key_line(name) + "".join(
        line + "\n" for line in previous.splitlines() if line.strip() and not line.startswith("#"))
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(body)
    os.replace(temporary, target)
    return target


def ensure_key_file(path: str | Path) -> TokenKeys:
    """Load ``path``, creating it first when it does not exist (zero-configuration gateways)."""
    target = Path(path)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write("# edge IMDSv2 token keys: NAME BASE64KEY; the first signs, all verify\n" + _key_line())
        try:
            os.link(temporary, target)  # atomic create-if-absent: concurrent workers agree on one key
        except FileExistsError:
            pass
        finally:
            os.unlink(temporary)
    return load_key_file(target)
