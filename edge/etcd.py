"""A small etcd v3 client over etcd's HTTP/JSON gateway (``POST /v3/kv/range``).

The gateway speaks JSON with base64 keys and values and 64-bit integers as
strings.  Reads are linearizable (etcd's default): a member cut off from the
quorum answers with an error instead of old data, so the client moves on to the
next endpoint rather than serving a view the cluster has already replaced.

Endpoints are tried in turn starting with the one that answered last; every
attempt is bounded by the connect and read timeouts and the body by a size
cap, so a dead or hanging member costs one timeout, not a stuck poller.

Addresses are written ``etcd://HOST:PORT[,HOST:PORT...]/KEY`` (``etcds://``
for HTTPS).  The key is the URL path without its first slash, percent-decoded:
``etcd://10.0.0.5:2379/edge/view`` names the key ``edge/view`` and
``etcd://10.0.0.5:2379//edge/view`` the key ``/edge/view``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import http.client
import json
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from edge.config import Config
from edge.errors import ConfigError, EdgeError
from edge.logs import event

log = logging.getLogger("edge.fleet")

USER_AGENT = "edge-etcd/1"
SCHEMES = {"etcd": "http", "etcds": "https"}
_JSON_OVERHEAD = 64 * 1024


class EtcdError(EdgeError):
    """No etcd endpoint gave a usable answer, or the address is malformed."""


class EtcdValueTooLarge(EtcdError):
    """The stored value is bigger than the caller's cap (every endpoint would say the same)."""


@dataclass(frozen=True, slots=True)
class EtcdAddress:
    scheme: str
    """``http`` or ``https`` (the gateway's transport)."""
    endpoints: tuple[tuple[str, int], ...]
    key: bytes

    @classmethod
    def parse(cls, spec: str) -> EtcdAddress:
        scheme, sep, rest = spec.partition("://")
        if not sep or scheme not in SCHEMES:
            raise EtcdError(f"not an etcd address (etcd://HOST:PORT[,HOST:PORT...]/KEY): {spec!r}")
        authority, slash, path = rest.partition("/")
        key = unquote(path)
        if not slash or not key:
            raise EtcdError(f"{spec!r}: no key after the endpoints (etcd://HOST:PORT/KEY)")
        endpoints = tuple(_endpoint(part.strip(), spec) for part in authority.split(",") if part.strip())
        if not endpoints:
            raise EtcdError(f"{spec!r}: no endpoints")
        return cls(SCHEMES[scheme], endpoints, key.encode())

    def __str__(self) -> str:
        names = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.endpoints)
        scheme = "etcds" if self.scheme == "https" else "etcd"
        return f"{scheme}://{names}/{self.key.decode(errors='replace')}"


def _endpoint(text: str, spec: str) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise EtcdError(f"{spec!r}: endpoint {text!r} is not HOST:PORT")
    return host, int(port_text)


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int


@dataclass(frozen=True, slots=True)
class RangeResult:
    revision: int
    """The cluster's revision when it answered."""
    count: int
    """How many keys match, before ``min_mod_revision`` filtering."""
    kv: KeyValue | None
    """The key with its value, or None when absent or filtered out as unchanged."""


class EtcdClient:
    """Blocking calls (run them in a thread); safe to share between threads."""

    def __init__(self, address: EtcdAddress, connect_timeout: float, read_timeout: float, max_value: int,
                 ca_file: str | None = None) -> None:
        self.address = address
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_value = max_value
        self.ca_file = ca_file or None
        self.preferred = 0
        """Index of the endpoint that answered last: asked first next time."""
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        host, port = self.address.endpoints[self.preferred]
        return f"{host}:{port}"

    def get(self, key: bytes, min_mod_revision: int = 0) -> RangeResult:
        """The key's value, or only the header when its ``mod_revision`` is below ``min_mod_revision``."""
        request: dict[str, object] = {"key": _b64(key)}
        if min_mod_revision > 0:
            request["min_mod_revision"] = str(min_mod_revision)
        answer = self.call("/v3/kv/range", request)
        try:
            revision = int(answer["header"]["revision"])
            count = int(answer.get("count", 0))
            kvs = answer.get("kvs") or []
            kv = None
            if kvs:
                item = kvs[0]
                value = base64.b64decode(item.get("value", ""), validate=True)
                kv = KeyValue(base64.b64decode(item["key"]), value, int(item["mod_revision"]))
        except (KeyError, TypeError, ValueError, IndexError, binascii.Error) as exc:
            raise EtcdError(f"{self.address}: malformed range answer from {self.endpoint}: {exc!r}") from None
        if kv is not None and len(kv.value) > self.max_value:
            raise EtcdValueTooLarge(f"{self.address}: value of {len(kv.value)} bytes is over the "
                                    f"{self.max_value}-byte cap")
        return RangeResult(revision, count, kv)

    def call(self, path: str, request: dict[str, object]) -> dict:
        """POST ``request`` to each endpoint in turn until one answers; raises EtcdError listing every failure."""
        body = json.dumps(request).encode()
        count = len(self.address.endpoints)
        with self._lock:
            first = self.preferred
        failures: list[str] = []
        for step in range(count):
            index = (first + step) % count
            host, port = self.address.endpoints[index]
            try:
                answer = self._post(host, port, path, body)
            except EtcdValueTooLarge as exc:
                raise EtcdValueTooLarge(f"{self.address}: {host}:{port}: {exc}") from None
            except EtcdError as exc:
                failures.append(f"{host}:{port}: {exc}")
                continue
            with self._lock:
                self.preferred = index
            return answer
        raise EtcdError(f"{self.address}: no endpoint answered ({'; '.join(failures)})")

    def _connection(self, host: str, port: int) -> http.client.HTTPConnection:
        if self.address.scheme == "https":
            context = ssl.create_default_context(cafile=self.ca_file)
            return http.client.HTTPSConnection(host, port, timeout=self.connect_timeout, context=context)
        return http.client.HTTPConnection(host, port, timeout=self.connect_timeout)

    def _post(self, host: str, port: int, path: str, body: bytes) -> dict:
        # base64 makes the value a third bigger; the JSON around it is small.
        cap = self.max_value * 4 // 3 + _JSON_OVERHEAD
        connection = self._connection(host, port)
        deadline = time.monotonic() + self.read_timeout
        try:
            connection.connect()
            if connection.sock is not None:
                connection.sock.settimeout(self.read_timeout)
            connection.request("POST", path, body=body, headers={
                "Content-Type": "application/json", "User-Agent": USER_AGENT})
            response = connection.getresponse()
            length = response.getheader("Content-Length")
            if length and length.isdigit() and int(length) > cap:
                raise EtcdValueTooLarge(f"answer of {length} bytes is over the cap")
            chunks: list[bytes] = []
            total = 0
            while chunk := response.read1(1 << 16):
                total += len(chunk)
                if total > cap:
                    raise EtcdValueTooLarge("answer is over the size cap")
                if time.monotonic() > deadline:
                    raise EtcdError(f"answer not complete within {self.read_timeout:g}s")
                chunks.append(chunk)
            status = response.status
        except EtcdError:
            raise
        except ssl.SSLError as exc:
            raise EtcdError(f"TLS error: {exc.reason or exc}") from None
        except TimeoutError:
            raise EtcdError("timed out") from None
        except (OSError, http.client.HTTPException) as exc:
            raise EtcdError(f"{type(exc).__name__}: {exc}") from None
        finally:
            connection.close()
        try:
            answer = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError):
            raise EtcdError(f"HTTP {status}: answer is not JSON") from None
        if not isinstance(answer, dict):
            raise EtcdError(f"HTTP {status}: answer is not a JSON object")
        if status != 200 or "error" in answer:
            message = answer.get("message") or answer.get("error") or "no message"
            raise EtcdError(f"HTTP {status}: {message} (code {answer.get('code', '?')})")
        return answer


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- token keys shared by the fleet ---------------------------------------------------------------

TOKEN_KEY_CACHE = "token-keys.etcd"
"""The last key text read from etcd, in the state directory."""
MAX_KEY_TEXT = 1024 * 1024


def token_key_client(config: Config) -> EtcdClient:
    view = config.view
    return EtcdClient(EtcdAddress.parse(config.fleet.token_key_source), view.connect_timeout, view.read_timeout,
                      MAX_KEY_TEXT, view.ca_file)


def read_key_text(client: EtcdClient) -> str:
    """The token key file text stored under the client's key; raises EtcdError."""
    result = client.get(client.address.key)
    if result.kv is None:
        raise EtcdError(f"{client.address}: key not found")
    try:
        return result.kv.value.decode("utf-8")
    except UnicodeDecodeError:
        raise EtcdError(f"{client.address}: token keys are not UTF-8 text") from None


def read_fleet_token_keys(config: Config) -> str:
    """The fleet's token key text from etcd; the cached copy when etcd cannot be reached (blocking).

    A gateway that starts while etcd is down keeps verifying the tokens its
    peers issued, from the keys it last saw; raises ConfigError when there is
    neither etcd nor a cached copy.
    """
    cache = TokenKeyCache(Path(config.view.state_dir) / TOKEN_KEY_CACHE)
    try:
        text = read_key_text(token_key_client(config))
    except EtcdError as exc:
        cached = cache.read()
        if cached is None:
            raise ConfigError(f"token keys: {exc}; no cached copy in {cache.path}") from None
        event(log, logging.WARNING, "token keys from etcd unavailable; using the cached copy", error=str(exc),
              path=str(cache.path))
        return cached
    try:
        cache.write(text)
    except EtcdError as exc:
        event(log, logging.WARNING, "token keys not cached", error=str(exc))
    return text


class TokenKeyCache:
    """The last key text read from etcd, kept on disk so a gateway that starts while etcd is down still verifies."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def read(self) -> str | None:
        try:
            return self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            event(log, logging.ERROR, "cached token keys unreadable", path=str(self.path), error=exc.strerror)
            return None

    def write(self, text: str) -> None:
        try:
            if self.path.exists() and self.path.read_text() == text:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(text)
            temporary.replace(self.path)
        except OSError as exc:
            raise EtcdError(f"cannot write cached token keys {self.path}: {exc.strerror}") from None


class FleetTokenKeys:
    """Keeps a service's token keys in step with etcd while ``fleet.token_key_source`` is set.

    Re-reads every ``fleet.token_key_refresh`` seconds and at once on
    :meth:`configure` (SIGHUP); hands changed text to ``apply``, which parses
    it, installs it if the keys differ from those in use and says whether it
    did.  A failed read or a text ``apply`` rejects keeps the keys in use:
    tokens keep verifying while etcd is away.
    """

    def __init__(self, apply: Callable[[str], bool]) -> None:
        self.apply = apply
        self.config: Config | None = None
        self.applied = ""
        self.reads = 0
        self.failures = 0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def configure(self, config: Config) -> None:
        """Start, re-point or stop watching for ``config``; call on the running loop."""
        self.config = config
        if not config.fleet.token_key_source:
            if self._task is not None:
                self._task.cancel()
                self._task = None
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="fleet-token-keys")
        else:
            self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        while True:
            assert self.config is not None
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.fleet.token_key_refresh)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self.read_once()

    async def read_once(self) -> bool:
        """One read from etcd; True when new keys were installed."""
        config = self.config
        if config is None or not config.fleet.token_key_source:
            return False
        self.reads += 1
        try:
            text = await asyncio.to_thread(self._read, config)
        except EtcdError as exc:
            self.failures += 1
            event(log, logging.WARNING, "token keys not refreshed from etcd; keeping the current ones",
                  error=str(exc))
            return False
        if text == self.applied:
            return False
        try:
            changed = self.apply(text)
        except ConfigError as exc:
            self.failures += 1
            event(log, logging.ERROR, "token keys from etcd rejected; keeping the current ones", error=str(exc))
            return False
        self.applied = text
        if not changed:
            return False
        event(log, logging.INFO, "token keys updated from etcd", source=config.fleet.token_key_source)
        return True

    @staticmethod
    def _read(config: Config) -> str:
        text = read_key_text(token_key_client(config))
        try:
            TokenKeyCache(Path(config.view.state_dir) / TOKEN_KEY_CACHE).write(text)
        except EtcdError as exc:
            event(log, logging.WARNING, "token keys not cached", error=str(exc))
        return text
