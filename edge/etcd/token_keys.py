"""IMDSv2 token keys shared by the fleet through etcd (``fleet.token_key_source``).

Every gateway reads the same key text (the key file format) from one etcd
key, re-reads it on a schedule and on SIGHUP, and keeps the last text it read
in the state directory so it can start while etcd is away.  The etcd client
itself is :mod:`edge.etcd.client`; the TLS files and login are the view section's
(``view.ca_file``, ``view.cert_file``, ``view.etcd_username``...), as the keys
usually live in the same cluster as the view.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from edge.config import Config
from edge.errors import ConfigError
from edge.etcd.client import EtcdAddress, EtcdClient, EtcdError
from edge.etcd.view_source import etcd_access
from edge.logs import event

log = logging.getLogger("edge.fleet")

TOKEN_KEY_CACHE = "token-keys.etcd"
"""The last key text read from etcd, in the state directory."""
MAX_KEY_TEXT = 1024 * 1024


def token_key_client(config: Config) -> EtcdClient:
    """A client for the key holding the token keys (built at each read: a rotated password file is seen)."""
    view = config.view
    return EtcdClient(EtcdAddress.parse(config.fleet.token_key_source), view.connect_timeout, view.read_timeout,
                      MAX_KEY_TEXT, etcd_access(view))


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
    """The fleet's token key text at start: the cached copy when there is one, else from etcd (blocking).

    Like the last good view, the keys a gateway saw last let it start at once:
    etcd may be down, or slow to refuse (a blackholed member costs
    ``view.connect_timeout`` per endpoint, in the supervisor and again in every
    worker), and :class:`FleetTokenKeys` reads etcd as soon as the gateway runs.
    Raises ConfigError when there is neither a cached copy nor etcd.
    """
    cache = TokenKeyCache(Path(config.view.state_dir) / TOKEN_KEY_CACHE)
    cached = cache.read()
    if cached is not None:
        event(log, logging.INFO, "token keys: using the cached copy until etcd is read", path=str(cache.path))
        return cached
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


class EtcdTokenKeys:
    """The metadata service's token key provider (:class:`edge.metadata.service.TokenKeyProvider`) for etcd."""

    def read(self, config: Config) -> str:
        return read_fleet_token_keys(config)

    def follow(self, apply: Callable[[str], bool]) -> FleetTokenKeys:
        return FleetTokenKeys(apply)


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
        self._client: EtcdClient | None = None
        """Kept between reads, so an authenticated cluster sees one login, not one per read."""

    def configure(self, config: Config) -> None:
        """Start, re-point or stop watching for ``config``; call on the running loop."""
        self.config = config
        self._client = None
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
            # Read at once: a gateway starts from the cached copy (read_fleet_token_keys).
            await self.read_once()
            assert self.config is not None
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.fleet.token_key_refresh)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def read_once(self) -> bool:
        """One read from etcd; True when new keys were installed."""
        config = self.config
        if config is None or not config.fleet.token_key_source:
            return False
        self.reads += 1
        try:
            text = await asyncio.to_thread(self._read, config)
        except (EtcdError, ConfigError) as exc:
            self.failures += 1
            self._client = None  # read the password file and log in afresh next time
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

    def _read(self, config: Config) -> str:
        client = self._client
        if client is None:
            client = self._client = token_key_client(config)
        text = read_key_text(client)
        try:
            TokenKeyCache(Path(config.view.state_dir) / TOKEN_KEY_CACHE).write(text)
        except EtcdError as exc:
            event(log, logging.WARNING, "token keys not cached", error=str(exc))
        return text
