"""The Eucalyptus controller's metadata service, behind a cache that outlives it.

The GNI carries identity and network facts only; image, type, keys,
user-data, block devices, IAM and the identity document come from the cloud
controller's metadata service (``http://CLC:8773/latest/...``).  The
controller identifies the instance in one of two ways only
(``compute/metadata/MetadataPipeline.java`` and ``VmMetadata.java``): by the
``Euca-Instance-Id`` header when the connection comes from 127.0.0.1 and the
cloud is in VPC mode, or else by the connection's source address (public
first, then private) in EDGE (EC2-Classic) mode.  It never reads
``X-Forwarded-For``.  So this client either asks from the controller's own host
with the header (``instance-id``, VPCMIDO) or connects *from the instance's
address* (``source-address``, EDGE: edge must sit in the instance's address
path, see ``packaging/eucalyptus/README.md``).

Every answer is cached per (instance, path); one request is in flight per key
however many wait; what was cached keeps being served while the controller is
unreachable (``stale_if_error``).  After a failure the controller is left alone
for a short, growing pause, during which requests get what is cached at once
instead of each waiting for a timeout.  "System is still starting up" and
"System shutting down" are 200 answers to every path and are never cached.

Credentials are the exception: a credential document is never served after
its ``Expiration``, stale or not.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import logging
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from cachetools import LRUCache

from edge.config import EucalyptusConfig
from edge.logs import event

log = logging.getLogger("edge.eucalyptus")

MAX_BODY = 1 << 20
CREDENTIALS_PREFIX = "meta-data/iam/security-credentials/"
SAVED_FORMAT = "edge-eucalyptus-controller-cache/1"
NOT_READY_BODIES = (b"System is still starting up", b"System shutting down")
"""``MetadataPipeline``: what the controller answers (200) for every path while it is not serving."""
PAUSE_FIRST = 1.0
PAUSE_MAX = 30.0
"""After a failure, the controller is not asked again for this long (doubling while it keeps failing)."""
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = getattr(socket, "IPV6_TRANSPARENT", 75)


@dataclass(frozen=True, slots=True)
class ControllerAnswer:
    status: int
    body: bytes
    content_type: str
    fetched_at: float
    fresh_until: float
    usable_until: float
    """Past this, the answer is not served even when the controller is down."""

    @property
    def stale(self) -> bool:
        return time.time() >= self.fresh_until


class ControllerUnavailable(Exception):
    """The controller did not answer and nothing usable was cached."""


class ControllerNotReady(OSError):
    """The controller answered, but with its starting-up (or shutting-down) text."""


@dataclass(slots=True)
class ControllerStats:
    fetches: int = 0
    failures: int = 0
    hits: int = 0
    stale_served: int = 0
    coalesced: int = 0
    not_ready: int = 0
    paused: int = 0


class ControllerMetadata:
    def __init__(self, config: EucalyptusConfig) -> None:
        self.configure(config)
        self.cache: LRUCache[tuple[str, str], ControllerAnswer] = LRUCache(config.controller_cache_entries)
        self.inflight: dict[tuple[str, str], asyncio.Future[ControllerAnswer]] = {}
        self.stats = ControllerStats()
        self.paused_until = 0.0
        """Monotonic time before which the controller is not asked (it just failed)."""
        self.pause = 0.0
        self.stored = 0
        """Answers stored so far: whether the cache changed since it was last saved."""

    def configure(self, config: EucalyptusConfig) -> None:
        self.config = config
        parts = urlsplit(config.controller_url)
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.tls = parts.scheme == "https"
        self.prefix = parts.path.rstrip("/")

    @property
    def enabled(self) -> bool:
        return bool(self.host)

    def cached(self, instance_id: str, path: str, now: float | None = None) -> ControllerAnswer | None:
        """A fresh cached answer, without I/O (the hot path's first look)."""
        answer = self.cache.get((instance_id, path))
        if answer is not None and (time.time() if now is None else now) < answer.fresh_until:
            self.stats.hits += 1
            return answer
        return None

    async def fetch(self, instance_id: str, address: str, path: str) -> ControllerAnswer:
        """The controller's answer for ``path`` (relative, e.g. ``latest/meta-data/ami-id``).

        Raises :class:`ControllerUnavailable` when the controller fails and no
        cached answer may still be served.
        """
        key = (instance_id, path)
        fresh = self.cached(instance_id, path)
        if fresh is not None:
            return fresh
        pending = self.inflight.get(key)
        if pending is not None:
            self.stats.coalesced += 1
            return await asyncio.shield(pending)
        future: asyncio.Future[ControllerAnswer] = asyncio.get_running_loop().create_future()
        self.inflight[key] = future
        try:
            answer = await self._refresh(key, address)
            future.set_result(answer)
            return answer
        except ControllerUnavailable as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters get it through shield
            raise
        finally:
            del self.inflight[key]

    async def _refresh(self, key: tuple[str, str], address: str) -> ControllerAnswer:
        instance_id, path = key
        paused = time.monotonic() < self.paused_until
        try:
            if paused:
                self.stats.paused += 1
                raise OSError("controller failed moments ago; not asked again yet")
            self.stats.fetches += 1
            status, content_type, body = await asyncio.wait_for(self._get(instance_id, address, path),
                                                                self.config.controller_timeout)
            if status >= 500:
                raise OSError(f"controller answered HTTP {status}")
            if status == 200 and body in NOT_READY_BODIES:
                self.stats.not_ready += 1
                raise ControllerNotReady(f"controller answered {body.decode()!r}")
        except (OSError, asyncio.TimeoutError, ValueError) as exc:
            error = str(exc) or type(exc).__name__
            if not paused:
                self._failed(error)
            previous = self.cache.get(key)
            if previous is not None and time.time() < previous.usable_until:
                self.stats.stale_served += 1
                return previous
            raise ControllerUnavailable(error) from None
        if self.pause:
            event(log, logging.INFO, "controller answering again")
        self.pause = 0.0
        now = time.time()
        fresh_until = now + self.config.controller_ttl
        usable_until = fresh_until + self.config.controller_stale_if_error
        if status != 200:
            # "Not there" is an answer too, but a short-lived one.
            usable_until = fresh_until = now + min(self.config.controller_ttl, 5.0)
        elif CREDENTIALS_PREFIX in path and not path.endswith("/"):
            expires = _expiration(body)
            if expires is not None:
                fresh_until = min(fresh_until, expires - 300)
                usable_until = expires
        answer = ControllerAnswer(status, body, content_type, now, fresh_until, usable_until)
        if status == 200 or key not in self.cache:
            self.cache[key] = answer
            self.stored += 1
        return answer

    def _failed(self, error: str) -> None:
        """Count a failure and pause asking (logged once per pause, not once per request)."""
        self.stats.failures += 1
        if time.monotonic() < self.paused_until:
            return  # another request's failure already paused asking
        first = self.pause == 0.0
        self.pause = PAUSE_FIRST if first else min(self.pause * 2, PAUSE_MAX)
        self.paused_until = time.monotonic() + self.pause
        event(log, logging.WARNING, "controller unavailable; serving what is cached", error=error,
              retry_in=self.pause, first=first)

    async def _get(self, instance_id: str, address: str, path: str) -> tuple[int, str, bytes]:
        headers = [f"GET {self.prefix}/{path} HTTP/1.1", f"Host: {self.host}", "Connection: close",
                   "User-Agent: edge-controller-fallback/1"]
        if self.config.controller_identity == "instance-id":
            headers.append(f"Euca-Instance-Id: {instance_id}")
            reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.tls or None)
        else:
            reader, writer = await asyncio.open_connection(sock=await self._connect_from(address),
                                                           ssl=self.tls or None,
                                                           server_hostname=self.host if self.tls else None)
        try:
            writer.write(("\r\n".join(headers) + "\r\n\r\n").encode("latin-1"))
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            fields = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                fields[name.strip().lower()] = value.strip()
            length = fields.get("content-length")
            if length is not None:
                if int(length) > MAX_BODY:
                    raise ValueError("controller answer too large")
                body = await reader.readexactly(int(length))
            else:
                body = await reader.read(MAX_BODY + 1)
                if len(body) > MAX_BODY:
                    raise ValueError("controller answer too large")
            return status, fields.get("content-type", "text/plain"), body
        except asyncio.IncompleteReadError as exc:
            raise OSError(f"controller closed the connection early ({len(exc.partial)} bytes)") from None
        except (IndexError, asyncio.LimitOverrunError) as exc:
            raise ValueError(f"malformed controller answer: {exc}") from None
        finally:
            writer.close()


    async def _connect_from(self, address: str) -> socket.socket:
        """A socket connected to the controller from the instance's own address.

        The address is not this host's: ``IP_TRANSPARENT`` (``CAP_NET_ADMIN``) lets the connection
        use it, and the controller's answers come back because this host is on its route to the
        instances (EDGE deployment).  A local address (tests, an edge on the instance's host) needs
        no privilege.
        """
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.IPPROTO_IP if family == socket.AF_INET else socket.IPPROTO_IPV6,
                                IP_TRANSPARENT if family == socket.AF_INET else IPV6_TRANSPARENT, 1)
                transparent = ""
            except OSError as exc:
                transparent = f"; IP_TRANSPARENT refused ({exc.strerror or exc}): it needs CAP_NET_ADMIN"
            try:
                sock.bind((address, 0))
            except OSError as exc:
                raise OSError(f"cannot connect from the instance's address {address} "
                              f"({exc.strerror or exc}){transparent}") from None
            infos = await asyncio.get_running_loop().getaddrinfo(self.host, self.port, family=family,
                                                                  type=socket.SOCK_STREAM)
            await asyncio.get_running_loop().sock_connect(sock, infos[0][4])
        except BaseException:
            sock.close()
            raise
        return sock

    def saved(self, now: float) -> bytes:
        """The answers worth keeping across a restart: 200s still usable, never credentials."""
        rows = []
        for key in list(self.cache.keys()):
            answer = self.cache.get(key)  # touching every key in order keeps the LRU order
            if answer is None or answer.status != 200 or answer.usable_until <= now or CREDENTIALS_PREFIX in key[1]:
                continue
            rows.append([key[0], key[1], answer.content_type, base64.b64encode(answer.body).decode("ascii"),
                         answer.fetched_at, answer.fresh_until, answer.usable_until])
        return json.dumps({"format": SAVED_FORMAT, "answers": rows}, separators=(",", ":")).encode()

    def restore(self, data: bytes, now: float) -> int:
        """Answers saved by :meth:`saved` that are still usable (the cache's own are kept); raises ValueError."""
        document = json.loads(data)
        if not isinstance(document, dict) or document.get("format") != SAVED_FORMAT:
            raise ValueError("not a saved controller cache")
        restored = 0
        for instance_id, path, content_type, body, fetched_at, fresh_until, usable_until in document["answers"]:
            key = (str(instance_id), str(path))
            if float(usable_until) <= now or key in self.cache:
                continue
            self.cache[key] = ControllerAnswer(200, base64.b64decode(body), str(content_type), float(fetched_at),
                                               float(fresh_until), float(usable_until))
            restored += 1
        return restored


def _expiration(body: bytes) -> float | None:
    try:
        text = json.loads(body)["Expiration"]
        return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC).timestamp()
    except (ValueError, KeyError, TypeError):
        return None
