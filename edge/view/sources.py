"""Where views come from: the only module of the pipeline that does I/O on sources.

A source's ``fetch()`` returns the document bytes when they (may) have changed
since the last fetch, or None when the source says they have not.  Sources do
not parse: the poller validates before anything is swapped, so a half-written
file or a truncated body is rejected, never served.

Blocking reads run in a thread (``asyncio.to_thread``) so a slow disk or a
hanging server never stalls the event loop; every read is bounded in time and
size.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import ssl
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from edge.config import Config, ViewConfig
from edge.errors import SourceError, ViewInvalid, ViewTooLarge
from edge.view.changes import apply_changes, decode_changes, load_document, serial_of
from edge.view.inflate import gunzip_capped
from edge.view.keyspace import Keyspace, PreparedView

USER_AGENT = "edge-view-poller/1"


class ViewSource(ABC):
    """What the poller asks of a source.  Only :meth:`fetch` is required: a source that keeps
    nothing open, cannot push and counts nothing inherits the rest as they are."""

    description: str
    """Names the source in logs, metrics and the state file."""

    @abstractmethod
    async def fetch(self) -> bytes | PreparedView | None:
        """New document bytes, or None when unchanged; raises SourceError.

        A source that decodes and checks the view itself, part by part (a keyspace such as
        the etcd adapter's), returns a :class:`edge.view.keyspace.PreparedView` instead of bytes.
        """

    def subscribe(self, changed: Callable[[], None]) -> None:
        """Call ``changed`` on the running loop whenever the source has news, so the poller polls
        then rather than at the next interval.  By default nothing is kept: a source that cannot
        push never calls ``changed``."""
        return None

    def counters(self) -> dict[str, int]:
        """Running totals exported as ``edge_view_source_events_total{event=...}``; none by default."""
        return {}

    def close(self) -> None:
        """Release what the source holds open (a watch, a connection) when the poller stops."""
        return None


class DemoSource(ViewSource):
    """The embedded demo view: delivered once, unchanged afterwards."""

    description = "demo"

    def __init__(self) -> None:
        self._delivered = False

    async def fetch(self) -> bytes | None:
        if self._delivered:
            return None
        import json

        from edge.view.demo import demo_document
        self._delivered = True
        return json.dumps(demo_document()).encode()


@dataclass(frozen=True, slots=True)
class _FileStamp:
    inode: int
    size: int
    mtime_ns: int


class FileSource(ViewSource):
    """A local file, re-read when its inode, size or mtime changes.

    Producers should write a temporary file and rename it over the view; a file
    that changes while it is being read is discarded and read again next poll.
    """

    def __init__(self, path: str, max_size: int) -> None:
        self.path = path
        self.description = f"file:{path}"
        self.max_size = max_size
        self._stamp: _FileStamp | None = None

    async def fetch(self) -> bytes | None:
        return await asyncio.to_thread(self._read)

    def _read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as handle:
                before = _stamp_of(os.fstat(handle.fileno()))
                if before == self._stamp:
                    return None
                if before.size > self.max_size:
                    raise ViewTooLarge(f"{self.path}: {before.size} bytes is over the {self.max_size}-byte cap")
                data = handle.read(self.max_size + 1)
                after = _stamp_of(os.fstat(handle.fileno()))
            current = _stamp_of(os.stat(self.path))
        except FileNotFoundError:
            raise SourceError(f"{self.path}: no such file") from None
        except OSError as exc:
            raise SourceError(f"{self.path}: {exc.strerror or exc}") from None
        if len(data) > self.max_size:
            raise ViewTooLarge(f"{self.path}: over the {self.max_size}-byte cap")
        if after != before or current != before or len(data) != before.size:
            raise SourceError(f"{self.path}: file changed while it was read; will read again")
        self._stamp = before
        return data

    def forget(self) -> None:
        """Read the file again next time even if unchanged (after a rejected document)."""
        self._stamp = None


def _stamp_of(st: os.stat_result) -> _FileStamp:
    return _FileStamp(st.st_ino, st.st_size, st.st_mtime_ns)


class HttpSource(ViewSource):
    """An ``http://`` or ``https://`` URL polled with conditional GETs, asking for changes only once it can.

    Once it holds a view with serial S, each poll asks ``URL?since=S``
    (:mod:`edge.view.changes`).  A control plane that answers with a changes
    document moves the source to incremental mode: it keeps the view part by
    part and delivers prepared views the poller builds as deltas.  A control
    plane that ignores ``since`` answers as before (304, or the full document),
    and nothing changes for it.
    """

    def __init__(self, url: str, config: ViewConfig) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SourceError(f"not an http(s) URL: {url!r}")
        self.url = url
        self.description = url
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._connect_timeout = config.connect_timeout
        self._read_timeout = config.read_timeout
        self._max_size = config.max_size
        self._ca_file = config.ca_file or None
        self._etag: str | None = None
        self._last_modified: str | None = None
        self._serial: int | None = None
        """Serial of the last full ``edge-view/1`` document delivered as bytes (asked ``since`` next)."""
        self._mirror: Keyspace | None = None
        """In incremental mode, the view part by part; None until the control plane sends changes."""
        self._delivered: int | None = None
        self.changes_applied = 0
        """Changes documents applied (incremental polls)."""
        self._refused_before = 0
        """Instances refused by mirrors since dropped."""

    async def fetch(self) -> bytes | PreparedView | None:
        # The thread is bounded by socket timeouts; wait_for bounds the whole exchange (two
        # requests when a changes answer sends the source to the full document).
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._poll),
                                          2 * (self._connect_timeout + self._read_timeout) + 1)
        except asyncio.TimeoutError:
            raise SourceError(f"{self.url}: no complete answer within {self._read_timeout:g}s") from None

    def forget(self) -> None:
        self._etag = self._last_modified = None
        self._serial = self._delivered = None
        self._drop_mirror()

    def counters(self) -> dict[str, int]:
        """Running totals for ``edge_view_source_events_total`` (incremental mode)."""
        refused = self._refused_before + (self._mirror.problems if self._mirror is not None else 0)
        return {"changes_applied": self.changes_applied, "key_refused": refused}

    def _drop_mirror(self) -> None:
        if self._mirror is not None:
            self._refused_before += self._mirror.problems
        self._mirror = None

    def _poll(self) -> bytes | PreparedView | None:
        mirror = self._mirror
        since = mirror.serial if mirror is not None else self._serial
        if since is None:
            body = self._get(self._target)
            return None if body is None else self._full(body)
        body = self._get(f"{self._target}{'&' if '?' in self._target else '?'}since={since}")
        if body is None:
            return None
        changes = decode_changes(body)
        if changes is None:
            return self._full(body)
        if changes.since != since:
            raise SourceError(f"{self.url}: changes since {changes.since} sent for since={since}")
        if changes.too_old or mirror is None:
            # The control plane cannot say what changed (or this is its first changes answer):
            # take the full document now, and keep it part by part from here on (parts whose
            # text is unchanged keep their objects).
            if mirror is None:
                self._mirror = Keyspace(self.url)
            body = self._get(self._target, conditional=False)
            assert body is not None
            return self._full(body)
        apply_changes(mirror, changes)
        self.changes_applied += 1
        return self._prepared()

    def _full(self, body: bytes) -> bytes | PreparedView | None:
        """A full document: bytes for the poller, or (incremental mode) taken into the mirror."""
        if self._mirror is not None and load_document(self._mirror, body):
            return self._prepared()
        # Not incremental, or a document the mirror cannot take (the poller explains why).
        self._drop_mirror()
        self._delivered = None
        self._serial = serial_of(body)
        return body

    def _prepared(self) -> PreparedView | None:
        assert self._mirror is not None
        try:
            view, _ = self._mirror.view()
        except ViewInvalid as exc:
            raise SourceError(f"{self.url}: {'; '.join(exc.problems)}") from None
        if view.serial == self._delivered:
            return None
        incremental = self._delivered is not None
        self._delivered = view.serial
        return self._mirror.prepared(incremental)

    def _connection(self) -> http.client.HTTPConnection:
        if self._scheme == "https":
            context = ssl.create_default_context(cafile=self._ca_file)
            return http.client.HTTPSConnection(self._host, self._port, timeout=self._connect_timeout,
                                               context=context)
        return http.client.HTTPConnection(self._host, self._port, timeout=self._connect_timeout)

    def _get(self, target: str, conditional: bool = True) -> bytes | None:
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "gzip", "Accept": "application/json, */*"}
        if self._etag and conditional:
            headers["If-None-Match"] = self._etag
        if self._last_modified and conditional:
            headers["If-Modified-Since"] = self._last_modified
        connection = self._connection()
        deadline = time.monotonic() + self._read_timeout
        try:
            connection.connect()
            if connection.sock is not None:
                connection.sock.settimeout(self._read_timeout)
            connection.request("GET", target, headers=headers)
            response = connection.getresponse()
            if response.status == 304:
                return None
            if response.status != 200:
                raise SourceError(f"{self.url}: HTTP {response.status} {response.reason}")
            length = response.getheader("Content-Length")
            if length and length.isdigit() and int(length) > self._max_size:
                raise ViewTooLarge(f"{self.url}: Content-Length {length} is over the {self._max_size}-byte cap")
            body = self._read_body(response, deadline)
            if length and length.isdigit() and len(body) != int(length):
                raise SourceError(f"{self.url}: body truncated after {len(body)} of {length} bytes")
            encoding = (response.getheader("Content-Encoding") or "identity").lower()
            if encoding == "gzip":
                body = gunzip_capped(body, self._max_size, self.url, "body")
            elif encoding != "identity":
                raise SourceError(f"{self.url}: unsupported Content-Encoding {encoding!r}")
            self._etag = response.getheader("ETag")
            self._last_modified = response.getheader("Last-Modified")
            return body
        except (SourceError, ViewTooLarge):
            raise
        except http.client.IncompleteRead as exc:
            raise SourceError(f"{self.url}: body truncated after {len(exc.partial)} bytes") from None
        except ssl.SSLError as exc:
            raise SourceError(f"{self.url}: TLS error: {exc.reason or exc}") from None
        except TimeoutError:
            raise SourceError(f"{self.url}: timed out") from None
        except (OSError, http.client.HTTPException) as exc:
            raise SourceError(f"{self.url}: {type(exc).__name__}: {exc}") from None
        finally:
            connection.close()

    def _read_body(self, response: http.client.HTTPResponse, deadline: float) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            if time.monotonic() > deadline:
                raise SourceError(f"{self.url}: body not complete within {self._read_timeout:g}s")
            chunk = response.read1(1 << 16)
            if not chunk:
                break
            total += len(chunk)
            if total > self._max_size:
                raise ViewTooLarge(f"{self.url}: body is over the {self._max_size}-byte cap")
            chunks.append(chunk)
        return b"".join(chunks)


SourceOpener = Callable[[str, ViewConfig], ViewSource]
"""Opens a source from its ``view.source`` text (``scheme://...``)."""
SourceWrapper = Callable[[ViewSource, Config], ViewSource]
"""Wraps the configured source (an adapter bundling a side file in); returns it unchanged when not configured."""


class SourceKinds:
    """Which source a ``view.source`` names: ``demo``, a file path, or a registered ``scheme://``.

    The built-in schemes (http, https) are registered by :func:`builtin_source_kinds` exactly as
    an adapter (etcd's ``etcd``/``etcds``) registers its own from the composition root: the
    pipeline names none of them.
    """

    def __init__(self) -> None:
        self.schemes: dict[str, SourceOpener] = {}
        self.wrappers: list[SourceWrapper] = []

    def add_scheme(self, scheme: str, opener: SourceOpener) -> None:
        self.schemes[scheme.lower()] = opener

    def add_wrapper(self, wrapper: SourceWrapper) -> None:
        self.wrappers.append(wrapper)

    def open(self, spec: str, config: ViewConfig) -> ViewSource:
        """``demo``, a registered ``scheme://`` source, or a file path (``file://`` accepted)."""
        if spec == "demo":
            return DemoSource()
        scheme, separator, _ = spec.partition("://")
        if not separator:
            return FileSource(spec, config.max_size)
        if scheme.lower() == "file":
            return FileSource(spec[len("file://"):], config.max_size)
        opener = self.schemes.get(scheme.lower())
        if opener is None:
            known = ", ".join(f"{name}://" for name in sorted(self.schemes))
            raise SourceError(f"unsupported view source {spec!r} (use a file path, demo, or one of {known})")
        return opener(spec, config)

    def configured(self, config: Config) -> ViewSource:
        """The gateway's view source: ``view.source``, wrapped by every registered wrapper."""
        source = self.open(config.view.source, config.view)
        for wrap in self.wrappers:
            source = wrap(source, config)
        return source


def builtin_source_kinds() -> SourceKinds:
    """The sources the core knows: http(s) URLs (plus ``demo`` and files); adapters add the rest."""
    kinds = SourceKinds()
    kinds.add_scheme("http", HttpSource)
    kinds.add_scheme("https", HttpSource)
    return kinds


def open_source(spec: str, config: ViewConfig, kinds: SourceKinds | None = None) -> ViewSource:
    """``demo``, an ``http(s)://`` URL, a file path, or a scheme ``kinds`` adds (an adapter's ``etcd://``)."""
    return (kinds or builtin_source_kinds()).open(spec, config)


def configured_source(config: Config, kinds: SourceKinds | None = None) -> ViewSource:
    """The gateway's view source, with the wrappers of ``kinds`` (the composition root's) applied."""
    return (kinds or builtin_source_kinds()).configured(config)
