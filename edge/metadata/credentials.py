"""IAM role credentials: sources, and a cache that keeps them off the hot path.

Credentials rotate and are secret, so they are not in the view: a source
configured on the gateway produces them (an external ``credential_process``
style command, or an IMDS-compatible upstream).  The cache answers from memory,
starts a background refresh once ``refresh_fraction`` of the credentials'
lifetime has passed, does not hand out credentials with less than
``refresh_ahead`` seconds left while the source may give fresher ones (SDKs
such as botocore take credentials that close to ``Expiration`` for an outage of
the metadata service), runs at most one fetch per (instance, role) however many
requests wait for it,
remembers a failed fetch for ``retry_interval`` (requests meanwhile get the
cached credentials or an error, without asking the source again), and keeps
serving cached credentials while the source fails, but never past their
expiration.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from cachetools import LRUCache

from edge.config import CredentialsConfig
from edge.errors import EdgeError
from edge.metadata.responses import Response, text
from edge.metadata.spawner import DEFAULT_MAX_OUTPUT, CommandError, CommandRunner
from edge.redact import redact_url
from edge.view.model import Instance

log = logging.getLogger("edge.metadata.credentials")

MAX_OUTPUT = 64 * 1024


class CredentialSourceError(EdgeError):
    """The credential source failed or answered something that is not credentials."""


@dataclass(frozen=True, slots=True)
class Credentials:
    access_key_id: str
    secret_access_key: str
    token: str
    expiration: float
    """Unix time after which they must not be served."""
    last_updated: float
    response: Response
    """The ``iam/security-credentials/<role>`` answer, rendered once."""


def _timestamp(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def _parse_time(value: object) -> float:
    if not isinstance(value, str):
        raise CredentialSourceError("Expiration is missing or not a string")
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise CredentialSourceError(f"Expiration {value!r} is not an ISO 8601 time") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.timezone.utc)
    return parsed.timestamp()


def make_credentials(access_key_id: object, secret_access_key: object, token: object, expiration: object,
                     now: float) -> Credentials:
    if not all(isinstance(v, str) and v for v in (access_key_id, secret_access_key)):
        raise CredentialSourceError("AccessKeyId and SecretAccessKey must be non-empty strings")
    if token is not None and not isinstance(token, str):
        raise CredentialSourceError("the session token must be a string")
    expires = _parse_time(expiration)
    body = json.dumps({
        "Code": "Success",
        "LastUpdated": _timestamp(now),
        "Type": "AWS-HMAC",
        "AccessKeyId": access_key_id,
        "SecretAccessKey": secret_access_key,
        "Token": token or "",
        "Expiration": _timestamp(expires),
    }, indent=2, separators=(",", " : ")).encode()
    return Credentials(str(access_key_id), str(secret_access_key), token or "", expires, now, text(body))


Fetch = Callable[[Instance, str, str], Awaitable[Credentials]]
"""``fetch(instance, address, role)``: one call to a credential source."""


class ProcessSource:
    """Runs ``command`` and reads its JSON.

    ``{instance_id}``, ``{account_id}``, ``{role}`` and ``{address}`` in the arguments are
    replaced; the command inherits edge's environment unchanged.  Calls that come to the
    same command line while it runs share that run: in a boot storm every instance of an
    account asks for its role at about the same moment, and a command that takes only the
    account and role then runs once instead of once per instance.
    """

    def __init__(self, command: tuple[str, ...], runner: CommandRunner | None = None,
                 max_output: int = DEFAULT_MAX_OUTPUT) -> None:
        self.command = command
        self.max_output = max_output
        """Bytes the command may print; more fails the call (the command is stopped)."""
        # Commands are started by a small helper process: forking the server itself
        # would copy its page tables and stall the event loop on every call.
        self.runner = runner or CommandRunner()
        self._running: dict[tuple[str, ...], _SharedRun] = {}
        self.runs = 0
        """Commands started (calls that joined a running one do not count)."""

    async def _run(self, argv: list[str]) -> tuple[int, bytes, bytes]:
        key = tuple(argv)
        shared = self._running.get(key)
        if shared is None:
            self.runs += 1
            shared = self._running[key] = _SharedRun(asyncio.ensure_future(self.runner.run(argv, self.max_output)))
            shared.task.add_done_callback(lambda _task: self._running.pop(key, None)
                                          if self._running.get(key) is shared else None)
        shared.callers += 1
        try:
            return await asyncio.shield(shared.task)
        finally:
            shared.callers -= 1
            if not shared.callers and not shared.task.done():
                # Every caller gave up (timeouts): stop the command, as a lone caller would.
                shared.task.cancel()

    async def __call__(self, instance: Instance, address: str, role: str) -> Credentials:
        values = {"instance_id": instance.id, "account_id": instance.account_id or "", "role": role,
                  "address": address}
        argv = [_substitute(part, values) for part in self.command]
        try:
            returncode, stdout, stderr = await self._run(argv)
        except CommandError as exc:
            raise CredentialSourceError(str(exc)) from None
        if returncode != 0:
            raise CredentialSourceError(
                f"{argv[0]} exited with {returncode}: {stderr[:200].decode(errors='replace').strip()}")
        try:
            document = json.loads(stdout)
        except ValueError:
            raise CredentialSourceError(f"{argv[0]} did not print JSON") from None
        if not isinstance(document, dict) or document.get("Version") != 1:
            raise CredentialSourceError(f"{argv[0]} printed JSON without \"Version\": 1")
        return make_credentials(document.get("AccessKeyId"), document.get("SecretAccessKey"),
                                document.get("SessionToken"), document.get("Expiration"), time.time())


@dataclass(slots=True)
class _SharedRun:
    task: asyncio.Future[tuple[int, bytes, bytes]]
    callers: int = 0


def _substitute(template: str, values: dict[str, str]) -> str:
    # Plain replacement, not str.format: other braces in an argument stay as they are.
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    return template


class HttpSource:
    """Asks an IMDS-compatible upstream for ``URL + role`` on behalf of the instance."""

    def __init__(self, url: str) -> None:
        self.url = url if url.endswith("/") else url + "/"
        self.shown = redact_url(self.url)
        """The URL as errors show it (without a password or query values)."""
        parts = urlsplit(self.url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        self.path = parts.path or "/"
        self.host_header = parts.netloc

    async def __call__(self, instance: Instance, address: str, role: str) -> Credentials:
        context = ssl.create_default_context() if self.https else None
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port, ssl=context)
        except OSError as exc:
            raise CredentialSourceError(f"cannot connect to {self.shown}: {exc}") from None
        try:
            writer.write(f"GET {self.path}{role} HTTP/1.1\r\nHost: {self.host_header}\r\n"
                         f"X-Forwarded-For: {address}\r\nAccept: application/json\r\n"
                         f"Connection: close\r\n\r\n".encode())
            data = await reader.read(MAX_OUTPUT + 1)
            while data and len(data) <= MAX_OUTPUT:
                more = await reader.read(MAX_OUTPUT + 1 - len(data))
                if not more:
                    break
                data += more
        except OSError as exc:
            raise CredentialSourceError(f"{self.shown}: {exc}") from None
        finally:
            writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0].split()
        if len(status_line) < 2 or status_line[1] != b"200":
            answered = b" ".join(status_line[1:]).decode(errors="replace")
            raise CredentialSourceError(f"{self.shown}{role} answered {answered!r}")
        if b"transfer-encoding: chunked" in head.lower():
            raise CredentialSourceError(f"{self.shown}{role} answered with chunked encoding")
        try:
            document = json.loads(body)
        except ValueError:
            raise CredentialSourceError(f"{self.shown}{role} did not answer JSON") from None
        if not isinstance(document, dict) or document.get("Code", "Success") != "Success":
            raise CredentialSourceError(f"{self.shown}{role} answered Code {document.get('Code')!r}"
                                        if isinstance(document, dict) else f"{self.shown}{role} answered a non-object")
        return make_credentials(document.get("AccessKeyId"), document.get("SecretAccessKey"),
                                document.get("Token"), document.get("Expiration"), time.time())


def source_from_config(config: CredentialsConfig) -> Fetch | None:
    if config.kind == "process":
        return ProcessSource(config.command, max_output=config.max_output)
    if config.kind == "http":
        return HttpSource(config.url)
    return None


Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class _Cached:
    credentials: Credentials
    fetched: float
    """When the cache received them (its clock): the start of their lifetime as far as edge knows."""


def refresh_schedule(fetched: float, expiration: float, fraction: float, ahead: float) -> tuple[float, float]:
    """(refresh_at, renew_by) of credentials received at ``fetched``.

    From ``refresh_at`` (``fraction`` of their lifetime) a request starts a background refresh
    and is answered from the cache; from ``renew_by`` (``ahead`` seconds before expiration) a
    request waits for fresher credentials, and the cached ones answer only if the source fails.
    ``renew_by`` is never before ``refresh_at``: a source that hands out credentials living less
    than ``ahead`` is not asked again on every request.
    """
    refresh_at = fetched + fraction * (expiration - fetched)
    return refresh_at, max(expiration - ahead, refresh_at)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class CredentialCache:
    """(instance id, role) -> credentials; at most one fetch per key in flight."""

    def __init__(self, source: Fetch | None, config: CredentialsConfig,
                 clock: Callable[[], float] = time.time) -> None:
        # One helper process for every ``process`` source this cache has, across reloads; its
        # failure counts stay with the cache so the exported counters never go backwards.
        self.runner = source.runner if isinstance(source, ProcessSource) else CommandRunner()
        self.source = source
        self.timeout = config.timeout
        self.refresh_ahead = config.refresh_ahead
        self.refresh_fraction = config.refresh_fraction
        self.retry_interval = config.retry_interval
        self.clock = clock
        self._cache: LRUCache[Key, _Cached] = LRUCache(maxsize=config.cache_size)
        self._retry_after: dict[Key, float] = {}
        self._inflight: dict[Key, asyncio.Task[None]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.fetches = 0
        self.failures = 0

    def configure(self, source: Fetch | None, config: CredentialsConfig) -> None:
        previous = self.source
        if isinstance(source, ProcessSource):
            source.runner = self.runner
        elif isinstance(previous, ProcessSource) and _loop_running():
            task = asyncio.get_running_loop().create_task(self.runner.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        self.source = source
        self.timeout = config.timeout
        self.refresh_ahead = config.refresh_ahead
        self.refresh_fraction = config.refresh_fraction
        self.retry_interval = config.retry_interval

    def lookup(self, instance: Instance, address: str, role: str, now: float) -> Response | None:
        """Cached credentials fit to hand out now, starting a background refresh when they are due
        one; None when the caller should ``fetch`` (nothing cached, or too close to expiry)."""
        key = (instance.id, role)
        entry = self._cache.get(key)
        if entry is None:
            return None
        credentials = entry.credentials
        if now >= credentials.expiration:
            return None
        refresh_at, renew_by = refresh_schedule(entry.fetched, credentials.expiration, self.refresh_fraction,
                                                self.refresh_ahead)
        if now >= refresh_at and key not in self._inflight:
            if now < self._retry_after.get(key, 0.0):
                return credentials.response  # the source failed moments ago: what we have is the best answer
            if now >= renew_by:
                return None  # fetch() waits for fresher ones (and falls back to these if the source fails)
            self._start(key, instance, address, role)
        elif now >= renew_by:
            return None  # a refresh is under way: wait for it
        return credentials.response

    async def fetch(self, instance: Instance, address: str, role: str) -> Response | None:
        """Wait (bounded by the source timeout) for credentials; None when the source cannot give any."""
        if self.source is None:
            return None
        key = (instance.id, role)
        task = self._inflight.get(key)
        if task is None:
            if self.clock() < self._retry_after.get(key, 0.0):
                # The source failed for this role moments ago: do not ask it again on every request.
                return self._valid(key)
            task = self._start(key, instance, address, role)
        try:
            await asyncio.wait_for(asyncio.shield(task), self.timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            pass  # a slow source: whatever is cached and unexpired still answers
        return self._valid(key)

    def _valid(self, key: Key) -> Response | None:
        entry = self._cache.get(key)
        if entry is None or self.clock() >= entry.credentials.expiration:
            return None
        return entry.credentials.response

    def _start(self, key: Key, instance: Instance, address: str, role: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._refresh(key, instance, address, role))
        self._inflight[key] = task
        return task

    async def _refresh(self, key: Key, instance: Instance, address: str, role: str) -> None:
        source = self.source
        try:
            if source is None:
                raise CredentialSourceError("no credential source is configured")
            self.fetches += 1
            credentials = await asyncio.wait_for(source(instance, address, role), self.timeout)
            now = self.clock()
            if credentials.expiration <= now:
                raise CredentialSourceError("the source returned credentials that have already expired")
            self._cache[key] = _Cached(credentials, now)
            self._retry_after.pop(key, None)
        except asyncio.CancelledError:
            raise
        except (CredentialSourceError, asyncio.TimeoutError, OSError) as exc:
            self.failures += 1
            self._retry_after.pop(key, None)
            if len(self._retry_after) >= self._cache.maxsize:
                del self._retry_after[next(iter(self._retry_after))]  # the oldest failure
            self._retry_after[key] = self.clock() + self.retry_interval
            reason = str(exc) or "timed out"
            cached = self._cache.get(key)
            log.warning("credential fetch failed instance=%s role=%s serving_cached_until=%s error=%s",
                        key[0], role, _timestamp(cached.credentials.expiration) if cached else "-", reason)
        except Exception:
            self.failures += 1
            log.exception("credential fetch crashed instance=%s role=%s", key[0], role)
        finally:
            self._inflight.pop(key, None)

    async def close(self) -> None:
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.runner.close()
