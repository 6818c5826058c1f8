"""A small etcd v3 client over etcd's HTTP/JSON gateway (``/v3/kv/range``, ``/v3/kv/txn``, ``/v3/watch``).

The gateway speaks JSON with base64 keys and values and 64-bit integers as
strings.  Reads are linearizable (etcd's default): a member cut off from the
quorum answers with an error instead of old data, so the client moves on to the
next endpoint rather than serving a view the cluster has already replaced.

Endpoints are tried in turn starting with the one that answered last; every
attempt is bounded by the connect and read timeouts and the body by a size
cap, so a dead or hanging member costs one timeout, not a stuck poller.

Clusters as production runs them are reached with :class:`EtcdAccess`: TLS
verified against a CA bundle, a client certificate for ``--client-cert-auth``,
and a user and password when authentication is enabled (the client
authenticates once, sends the token with every request, and authenticates
again when the cluster says the token is no longer valid, as simple tokens
expire after five idle minutes and do not survive a restart).

Addresses are written ``etcd://HOST:PORT[,HOST:PORT...]/KEY`` (``etcds://``
for HTTPS).  The key is the URL path without its first slash, percent-decoded:
``etcd://10.0.0.5:2379/edge/view`` names the key ``edge/view`` and
``etcd://10.0.0.5:2379//edge/view`` the key ``/edge/view``.

This module is the client only: it knows nothing of views, token keys or the
configuration (callers hand it what it needs).
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import msgspec

from edge.errors import EdgeError

USER_AGENT = "edge-etcd/1"
SCHEMES = {"etcd": "http", "etcds": "https"}
_JSON_OVERHEAD = 64 * 1024
PAGE_BYTES = 8 * 1024 * 1024
"""Keys and values per page of :meth:`EtcdClient.range_pages`, about: etcd walks the index of every key
left in the range for each page (1,000-key pages of a 100k-key range cost it more than the values), and
it answers 8 MB in about a tenth of a second; far inside any answer cap and etcd's own limits."""
FIRST_PAGE_KEYS = 1000
"""Most keys of a range's first page, before the size of its keys is known."""
ASSUMED_KEY_BYTES = 1024
"""What a key and its value are taken to weigh until a page says (a view's instance is one to a few KB)."""
MAX_PAGE_KEYS = 50_000
MAX_WATCH_MESSAGE = 64 * 1024 * 1024
"""Longest line of a watch stream kept in memory (one message; etcd splits large batches)."""


class EtcdError(EdgeError):
    """No etcd endpoint gave a usable answer, or the address is malformed."""


class EtcdValueTooLarge(EtcdError):
    """The stored value is bigger than the caller's cap (every endpoint would say the same)."""


class EtcdCompacted(EtcdError):
    """The revision asked for has been compacted away: read the keys afresh."""


class EtcdAccessDenied(EtcdError):
    """Authentication failed or the user may not do this (every endpoint would say the same)."""


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
        if "@" in authority:
            raise EtcdError(f"{spec!r}: credentials do not belong in the address (use etcd.username and "
                            "etcd.password_file)")
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
class EtcdAccess:
    """How to reach a cluster that requires more than plain HTTP: TLS files and a login."""

    ca_file: str = ""
    """CA bundle the members' certificates are verified with (system CAs when empty)."""
    cert_file: str = ""
    """Client certificate (PEM) for clusters run with ``--client-cert-auth``."""
    key_file: str = ""
    """Its private key (PEM); empty when ``cert_file`` holds both."""
    username: str = ""
    password: str = ""
    password_file: str = ""
    """Read at every login (its first line), so a rotated password is picked up without a restart."""

    def __repr__(self) -> str:
        # Never show the password, even in a traceback's locals.
        return (f"EtcdAccess(ca_file={self.ca_file!r}, cert_file={self.cert_file!r}, key_file={self.key_file!r}, "
                f"username={self.username!r}, password={'<redacted>' if self.password else ''!r}, "
                f"password_file={self.password_file!r})")

    def current_password(self) -> str:
        return read_password_file(self.password_file) if self.password_file else self.password

    def tls_context(self) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(cafile=self.ca_file or None)
            if self.cert_file:
                context.load_cert_chain(self.cert_file, self.key_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise EtcdError(f"cannot load the etcd TLS files: {exc}") from None
        return context


def read_password_file(path: str) -> str:
    """The password in ``path``: its first line, without the line end."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise EtcdError(f"cannot read the etcd password file {path}: {exc.strerror}") from None
    return text.splitlines()[0] if text else ""


class KeyValue(msgspec.Struct, frozen=True, gc=False):
    """One key as the gateway sends it (base64 decoded by msgspec, in C; other members ignored)."""

    key: bytes
    mod_revision: int
    value: bytes = b""
    """Absent from the JSON when empty (protobuf's JSON mapping leaves out zero values), as in a deletion."""


class _Header(msgspec.Struct):
    revision: int = 0
    """Left out when 0, as in the header of a watch's compaction notice."""


class _RangeAnswer(msgspec.Struct):
    header: _Header
    kvs: tuple[KeyValue, ...] = ()
    count: int = 0
    more: bool = False


class _TxnAnswer(msgspec.Struct):
    header: _Header


class _WatchEventAnswer(msgspec.Struct):
    kv: KeyValue
    type: str = "PUT"


class _WatchResult(msgspec.Struct):
    header: _Header
    events: tuple[_WatchEventAnswer, ...] = ()
    canceled: bool = False
    cancel_reason: str = ""
    compact_revision: int = 0


class _WatchMessage(msgspec.Struct):
    result: _WatchResult | None = None
    error: Any = None


_ANY_ANSWER = msgspec.json.Decoder()
_WATCH_MESSAGE = msgspec.json.Decoder(_WatchMessage, strict=False)
# The gateway writes 64-bit integers as strings ("783"): strict=False reads them as the ints they are.
_RANGE_ANSWER = msgspec.json.Decoder(_RangeAnswer, strict=False)
_TXN_ANSWER = msgspec.json.Decoder(_TxnAnswer, strict=False)


@dataclass(frozen=True, slots=True)
class RangeResult:
    revision: int
    """The cluster's revision when it answered."""
    count: int
    """How many keys match, before ``min_mod_revision`` filtering."""
    kv: KeyValue | None
    """The key with its value, or None when absent or filtered out as unchanged."""


@dataclass(frozen=True, slots=True)
class RangePage:
    revision: int
    count: int
    """How many keys the whole range holds (before ``min_mod_revision`` filtering)."""
    kvs: tuple[KeyValue, ...]
    more: bool
    """More keys follow the last one (ask again from just past it)."""


@dataclass(frozen=True, slots=True)
class WatchEvent:
    deleted: bool
    kv: KeyValue
    """For a deletion, the key and the deletion's revision (no value)."""


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that makes a range cover every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


class EtcdClient:
    """Blocking calls (run them in a thread); safe to share between threads."""

    def __init__(self, address: EtcdAddress, connect_timeout: float, read_timeout: float, max_value: int,
                 access: EtcdAccess | None = None) -> None:
        self.address = address
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_value = max_value
        self.access = access or EtcdAccess()
        self.preferred = 0
        """Index of the endpoint that answered last: asked first next time."""
        self._lock = threading.Lock()
        self._context: ssl.SSLContext | None = None
        self._token = ""
        self.authentications = 0
        """Logins made (one at the start, one more each time the cluster forgot the token)."""

    @property
    def endpoint(self) -> str:
        host, port = self.address.endpoints[self.preferred]
        return f"{host}:{port}"

    # -- requests -----------------------------------------------------------------------------

    def get(self, key: bytes, min_mod_revision: int = 0) -> RangeResult:
        """The key's value, or only the header when its ``mod_revision`` is below ``min_mod_revision``."""
        request: dict[str, object] = {"key": _b64(key)}
        if min_mod_revision > 0:
            request["min_mod_revision"] = str(min_mod_revision)
        answer: _RangeAnswer = self.call("/v3/kv/range", request, _RANGE_ANSWER)
        kv = answer.kvs[0] if answer.kvs else None
        if kv is not None and len(kv.value) > self.max_value:
            raise EtcdValueTooLarge(f"{self.address}: value of {len(kv.value)} bytes is over the "
                                    f"{self.max_value}-byte cap")
        return RangeResult(answer.header.revision, answer.count, kv)

    def range_page(self, start: bytes, end: bytes, limit: int, revision: int = 0,
                   min_mod_revision: int = 0) -> RangePage:
        """One page of the keys in [start, end), at ``revision`` (0: now, linearizable)."""
        request: dict[str, object] = {"key": _b64(start), "range_end": _b64(end), "limit": str(limit)}
        if revision:
            request["revision"] = str(revision)
        if min_mod_revision:
            request["min_mod_revision"] = str(min_mod_revision)
        answer: _RangeAnswer = self.call("/v3/kv/range", request, _RANGE_ANSWER)
        page = RangePage(answer.header.revision, answer.count, answer.kvs, answer.more)
        for kv in page.kvs:
            if len(kv.value) > self.max_value:
                raise EtcdValueTooLarge(f"{self.address}: value of {kv.key!r} ({len(kv.value)} bytes) is over "
                                        f"the {self.max_value}-byte cap")
        return page

    def range_pages(self, start: bytes, end: bytes, revision: int = 0, min_mod_revision: int = 0,
                    page_bytes: int = PAGE_BYTES) -> Iterator[RangePage]:
        """Every key in [start, end), page by page, all at one revision.

        The first page is read at ``revision`` (0: now, linearizable) and the others at the
        revision it answered with.  etcd counts every key left in the range to answer each
        page, so pages are sized to about ``page_bytes`` of keys and values (from the size of
        the keys read so far; at most half the answer cap) rather than a fixed, small number
        of keys; a page over the cap is asked again in smaller pieces.  At least one page is
        yielded, empty when the range is.
        """
        target = max(1, min(page_bytes, self.max_value // 2))
        limit = max(1, min(FIRST_PAGE_KEYS, target // ASSUMED_KEY_BYTES))
        while True:
            try:
                page = self.range_page(start, end, limit, revision, min_mod_revision)
            except EtcdValueTooLarge:
                if limit == 1:
                    raise  # one value is over the cap
                limit = max(1, limit // 8)
                continue
            yield page
            if not page.more or not page.kvs:
                return
            revision = page.revision
            start = page.kvs[-1].key + b"\0"
            size = sum([len(kv.value) + len(kv.key) for kv in page.kvs])
            limit = max(1, min(MAX_PAGE_KEYS, target * len(page.kvs) // max(1, size)))

    def count(self, start: bytes, end: bytes) -> tuple[int, int]:
        """(the cluster's revision, how many keys are in [start, end)): answered from etcd's index alone."""
        answer: _RangeAnswer = self.call("/v3/kv/range", {"key": _b64(start), "range_end": _b64(end),
                                                          "count_only": True}, _RANGE_ANSWER)
        return answer.header.revision, answer.count

    def txn(self, puts: list[tuple[bytes, bytes]], deletes: list[bytes]) -> int:
        """Put and delete keys in one transaction; the new revision."""
        operations: list[dict[str, object]] = [
            {"request_put": {"key": _b64(key), "value": _b64(value)}} for key, value in puts]
        operations += [{"request_delete_range": {"key": _b64(key)}} for key in deletes]
        answer: _TxnAnswer = self.call("/v3/kv/txn", {"success": operations}, _TXN_ANSWER)
        return answer.header.revision

    def call(self, path: str, request: dict[str, object], decoder: msgspec.json.Decoder = _ANY_ANSWER) -> Any:
        """POST ``request`` to each endpoint in turn until one answers; raises EtcdError listing every failure.

        The answer is decoded by ``decoder`` (a typed one reads the values' base64 in C);
        one it cannot decode is a failure of that endpoint, unless etcd says why.
        """
        body = json.dumps(request).encode()
        count = len(self.address.endpoints)
        with self._lock:
            first = self.preferred
        failures: list[str] = []
        for step in range(count):
            index = (first + step) % count
            host, port = self.address.endpoints[index]
            try:
                answer = self._call_endpoint(host, port, path, body, decoder)
            except (EtcdValueTooLarge, EtcdCompacted, EtcdAccessDenied) as exc:
                raise type(exc)(f"{self.address}: {host}:{port}: {exc}") from None
            except EtcdError as exc:
                failures.append(f"{host}:{port}: {exc}")
                continue
            with self._lock:
                self.preferred = index
            return answer
        raise EtcdError(f"{self.address}: no endpoint answered ({'; '.join(failures)})")

    def _call_endpoint(self, host: str, port: int, path: str, body: bytes, decoder: msgspec.json.Decoder) -> Any:
        token = self._login(host, port)
        try:
            return self._post(host, port, path, body, token, decoder)
        except _TokenRejected:
            # The cluster forgot the token (it expired, or the members restarted): log in once more.
            with self._lock:
                if self._token == token:
                    self._token = ""
            return self._post(host, port, path, body, self._login(host, port), decoder)

    def _login(self, host: str, port: int) -> str:
        access = self.access
        if not access.username:
            return ""
        with self._lock:
            if self._token:
                return self._token
        request = json.dumps({"name": access.username, "password": access.current_password()}).encode()
        try:
            answer = self._post(host, port, "/v3/auth/authenticate", request, "", _ANY_ANSWER)
        except _TokenRejected as exc:
            raise EtcdAccessDenied(f"authentication as {access.username!r} failed: {exc}") from None
        except EtcdError as exc:
            if "authentication is not enabled" in str(exc):
                return ""
            raise
        token = answer.get("token")
        if not isinstance(token, str) or not token:
            raise EtcdError("authentication answer has no token")
        with self._lock:
            self._token = token
            self.authentications += 1
        return token

    def _connection(self, host: str, port: int, timeout: float) -> http.client.HTTPConnection:
        if self.address.scheme == "https":
            with self._lock:
                if self._context is None:
                    self._context = self.access.tls_context()
                context = self._context
            return http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
        return http.client.HTTPConnection(host, port, timeout=timeout)

    def _headers(self, token: str) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        if token:
            headers["Authorization"] = token
        return headers

    def _post(self, host: str, port: int, path: str, body: bytes, token: str, decoder: msgspec.json.Decoder) -> Any:
        # base64 makes the value a third bigger; the JSON around it is small.
        cap = self.max_value * 4 // 3 + _JSON_OVERHEAD
        connection = self._connection(host, port, self.connect_timeout)
        deadline = time.monotonic() + self.read_timeout
        try:
            connection.connect()
            if connection.sock is not None:
                connection.sock.settimeout(self.read_timeout)
            connection.request("POST", path, body=body, headers=self._headers(token))
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
        data = b"".join(chunks)
        del chunks
        problem = ""
        if status == 200:
            try:
                answer = decoder.decode(data)
            except msgspec.DecodeError as exc:
                problem = str(exc)  # an error object, or no answer at all: told apart below
            else:
                if not isinstance(answer, dict) or "error" not in answer:
                    return answer
        try:
            answer = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise EtcdError(f"HTTP {status}: answer is not JSON") from None
        if not isinstance(answer, dict):
            raise EtcdError(f"HTTP {status}: answer is not a JSON object")
        if status != 200 or "error" in answer:
            raise _answer_error(status, answer)
        raise EtcdError(f"HTTP {status}: malformed answer to {path}: {problem}")

    # -- watch --------------------------------------------------------------------------------

    def watch(self, start: bytes, end: bytes, start_revision: int) -> Watch:
        """A watch on [start, end) from ``start_revision``, on the first endpoint that accepts it."""
        return Watch(self, start, end, start_revision)


class _TokenRejected(EtcdError):
    """The cluster refused the login or the token (gRPC code 16, Unauthenticated)."""


_UNAUTHENTICATED = 16
_PERMISSION_DENIED = 7


def _answer_error(status: int, answer: dict) -> EtcdError:
    message = str(answer.get("message") or answer.get("error") or "no message")
    code = answer.get("code")
    text = f"HTTP {status}: {message} (code {code if code is not None else '?'})"
    if "compacted" in message:
        return EtcdCompacted(text)
    if code == _UNAUTHENTICATED or "invalid auth token" in message or "user name is empty" in message:
        return _TokenRejected(text)
    if code == _PERMISSION_DENIED or "permission denied" in message or "authentication failed" in message:
        return EtcdAccessDenied(text)
    return EtcdError(text)


class Watch:
    """One streaming watch (``POST /v3/watch``): iterate for batches of events; ``close`` from any thread.

    Iterating blocks until etcd sends something.  Raises :class:`EtcdCompacted` when the
    start revision is gone, and :class:`EtcdError` when the stream breaks or carries
    anything but watch messages (the caller reads the keys afresh).
    """

    def __init__(self, client: EtcdClient, start: bytes, end: bytes, start_revision: int) -> None:
        self.client = client
        self.request = json.dumps({"create_request": {
            "key": _b64(start), "range_end": _b64(end), "start_revision": str(start_revision)}}).encode()
        self._connection: http.client.HTTPConnection | None = None
        self._closed = False
        self.endpoint = ""

    def close(self) -> None:
        self._closed = True
        connection = self._connection
        if connection is not None and connection.sock is not None:
            try:
                connection.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __iter__(self) -> Iterator[tuple[int, list[WatchEvent]]]:
        """(revision of the message's header, events) per message; the first is the creation (no events)."""
        client = self.client
        address = client.address
        count = len(address.endpoints)
        failures: list[str] = []
        for step in range(count):
            index = (client.preferred + step) % count
            host, port = address.endpoints[index]
            try:
                response = self._open(host, port)
            except (EtcdCompacted, EtcdAccessDenied):
                raise
            except EtcdError as exc:
                failures.append(f"{host}:{port}: {exc}")
                continue
            self.endpoint = f"{host}:{port}"
            yield from self._messages(response)
            return
        raise EtcdError(f"{address}: no endpoint accepted the watch ({'; '.join(failures)})")

    def _open(self, host: str, port: int) -> http.client.HTTPResponse:
        client = self.client
        token = client._login(host, port)
        connection = client._connection(host, port, client.connect_timeout)
        self._connection = connection
        try:
            connection.connect()
            if self._closed:
                raise EtcdError("watch closed")
            if connection.sock is not None:
                connection.sock.settimeout(client.read_timeout)
            connection.request("POST", "/v3/watch", body=self.request, headers=client._headers(token))
            response = connection.getresponse()
            if response.status != 200:
                body = response.read(1 << 16)
                try:
                    answer = json.loads(body)
                except ValueError:
                    answer = {}
                raise _answer_error(response.status, answer if isinstance(answer, dict) else {})
            # Watches are idle for as long as nothing changes: no read timeout from here on
            # (the poller's safety-net reads notice a watch that stalls).
            if connection.sock is not None:
                connection.sock.settimeout(None)
            return response
        except EtcdError:
            connection.close()
            raise
        except ssl.SSLError as exc:
            connection.close()
            raise EtcdError(f"TLS error: {exc.reason or exc}") from None
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise EtcdError(f"{type(exc).__name__}: {exc}") from None

    def _messages(self, response: http.client.HTTPResponse) -> Iterator[tuple[int, list[WatchEvent]]]:
        buffer = b""
        try:
            while True:
                try:
                    chunk = response.read1(1 << 16)
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    if self._closed:
                        return
                    raise EtcdError(f"watch stream broke: {type(exc).__name__}: {exc}") from None
                if not chunk:
                    if self._closed:
                        return
                    raise EtcdError("watch stream ended")
                buffer += chunk
                while (end := buffer.find(b"\n")) >= 0:
                    line, buffer = buffer[:end], buffer[end + 1:]
                    if line.strip():
                        yield self._message(line)
                if len(buffer) > MAX_WATCH_MESSAGE:
                    raise EtcdError("watch message over the size cap")
        finally:
            if self._connection is not None:
                self._connection.close()

    def _message(self, line: bytes) -> tuple[int, list[WatchEvent]]:
        try:
            message = _WATCH_MESSAGE.decode(line)
        except msgspec.DecodeError as exc:
            raise EtcdError(f"malformed watch message: {exc}") from None
        if message.error is not None:
            error = message.error
            raise _answer_error(200, error if isinstance(error, dict) else {"error": error})
        result = message.result
        if result is None:
            raise EtcdError("malformed watch message: neither a result nor an error")
        if result.compact_revision:
            raise EtcdCompacted(f"watch start revision compacted (now {result.compact_revision})")
        if result.canceled:
            raise EtcdError(f"watch canceled: {result.cancel_reason or 'no reason given'}")
        # A deletion's kv has the key and the deletion's revision, no value.
        return result.header.revision, [WatchEvent(item.type == "DELETE", item.kv) for item in result.events]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
