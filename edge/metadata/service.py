"""The instance metadata service: listeners, keys, caches and the slow paths, wired together.

The composition root creates one per worker, calls :meth:`start` on the running
loop, :meth:`reload` on SIGHUP and :meth:`stop` on shutdown.  Requests from an
address the current view does not know yet ask the view poller to refresh
(one refresh shared by every such request) and wait for it, bounded by
``unknown_source_wait``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import mmap
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from edge.config import Config
from edge.errors import ConfigError
from edge.lifecycle import Service
from edge.metadata import tokens
from edge.metadata.credentials import CredentialCache, source_from_config
from edge.metadata.fallback import MetadataFallback
from edge.metadata.handler import MetadataHandler
from edge.metadata.identify import TrustedProxies
from edge.metadata.identity import IdentitySigner, ensure_signer, load_signer
from edge.metadata.protocol import LeaveUnanswered, Listeners, MetadataProtocol, ProtocolLimits
from edge.metadata.render import Renderer
from edge.metrics import Tally
from edge.ratelimit import RateLimiter
from edge.view.snapshot import Snapshot
from edge.view.store import ViewStore

log = logging.getLogger("edge.metadata")

TOKEN_KEY_FILE = "token-keys"
UNKNOWN_HOLD_MAX = 60.0
"""Longest a worker kept on its view during a swap by restart holds a request from an address it does not know."""

class TokenKeyFollower(Protocol):
    """Keeps a service's token keys in step with ``fleet.token_key_source`` while it is set."""

    def configure(self, config: Config) -> None:
        """Start, re-point or stop following for ``config`` (at start and on SIGHUP); call on the running loop."""

    async def stop(self) -> None: ...


class TokenKeyProvider(Protocol):
    """Where the fleet's shared token keys (``fleet.token_key_source``) come from.

    Plugged in by the composition root (the etcd adapter gives one), so the metadata
    service names no store.
    """

    def read(self, config: Config) -> str:
        """The key file text to start with (blocking); raises ConfigError when there is none."""

    def follow(self, apply: Callable[[str], bool]) -> TokenKeyFollower:
        """A follower handing each changed key text to ``apply``, which says whether it installed new keys."""


def token_key_path(config: Config) -> Path:
    return Path(config.metadata.token_key_file or Path(config.view.state_dir) / TOKEN_KEY_FILE)


def load_token_keys(config: Config, provider: TokenKeyProvider | None = None) -> tokens.TokenKeys:
    """The fleet's shared keys, the configured key file, or the state directory's one (created on first use)."""
    if config.fleet.token_key_source:
        if provider is None:
            raise ConfigError(f"fleet.token_key_source {config.fleet.token_key_source!r}: "
                              "no token key provider is plugged in")
        return tokens.parse_key_file(provider.read(config), where=config.fleet.token_key_source)
    if config.metadata.token_key_file:
        return tokens.load_key_file(config.metadata.token_key_file)
    return tokens.ensure_key_file(token_key_path(config))


def load_identity_signer(config: Config) -> IdentitySigner:
    metadata = config.metadata
    if metadata.identity_key_file:
        return load_signer(metadata.identity_key_file, metadata.identity_cert_file)
    return ensure_signer(config.view.state_dir)


def build_handler(config: Config, keys: tokens.TokenKeys, signer: IdentitySigner,
                  rate_table: mmap.mmap | None = None) -> MetadataHandler:
    metadata = config.metadata
    return MetadataHandler(
        Renderer(signer, metadata.render_cache_size), keys,
        RateLimiter(metadata.rate, metadata.burst, metadata.rate_limit_entries, rate_table),
        CredentialCache(source_from_config(metadata.credentials), metadata.credentials),
    )


FallbackFactory = Callable[[Config, "MetadataFallback | None"], "MetadataFallback | None"]
"""(configuration, fallback in use) -> the fallback to use now: the composition root's choice of a
cloud adapter; it reconfigures the one in use rather than replacing it, so its cache survives SIGHUP."""


class MetadataService(Listeners, Service):
    name = "metadata"

    def __init__(self, config: Config, store: ViewStore, refresh: Callable[[], Awaitable[None]],
                 fallback_for: FallbackFactory | None = None, rate_table: mmap.mmap | None = None,
                 token_keys: TokenKeyProvider | None = None) -> None:
        self.config = config
        self.fallback_for = fallback_for
        self.token_keys = token_keys
        """The composition root's provider of ``fleet.token_key_source`` keys (None: none plugged in)."""
        Listeners.__init__(self, ProtocolLimits.of(config.metadata), store,
                           TrustedProxies(config.metadata.trusted_proxies), Tally("http"))
        self.refresh = refresh
        self.rate_table = rate_table
        """The rate-limit table shared by a gateway's workers (given by the composition root); None: a private one."""
        self.handler: MetadataHandler = None  # type: ignore[assignment]  # set by start()
        self.fleet_keys = token_keys.follow(self._use_fleet_keys) if token_keys is not None else None
        self.servers: list[asyncio.Server] = []
        self._refresh_task: asyncio.Task[None] | None = None
        self._refresh_started = 0.0
        self.refreshes = 0
        """Refreshes asked for by unknown addresses (exported by export_metrics)."""
        self.holding_unknown = False
        """Set by hold_unknown_sources (a worker kept on its view while a replacement builds the next one)."""

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, reuse_port: bool = False) -> None:
        keys, signer = await asyncio.to_thread(lambda: (load_token_keys(self.config, self.token_keys),
                                                        load_identity_signer(self.config)))
        self.handler = build_handler(self.config, keys, signer, self.rate_table)
        self._configure_fallback(self.config)
        self.store.on_swap(self._view_changed)
        if self.fleet_keys is not None:
            self.fleet_keys.configure(self.config)
        loop = asyncio.get_running_loop()
        for listen in self.config.metadata.listen:
            network = listen.network
            # A partial rather than a closure: the loop calls it for every connection, and it makes
            # the protocol without a Python frame of its own.
            factory = functools.partial(MetadataProtocol, self, network)
            server = await loop.create_server(factory, listen.host, listen.port, reuse_port=reuse_port or None,
                                              backlog=self.config.metadata.listen_backlog)
            self.servers.append(server)
            log.info("metadata listening on %s network=%r", _bound(server), network)
        self.start_ticker()

    @property
    def ready(self) -> bool:
        return bool(self.servers) and not self.stopping

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) actually bound, in listener order (port 0 resolved)."""
        return [s.sockets[0].getsockname()[:2] for s in self.servers if s.sockets]

    async def stop(self, grace: float) -> None:
        self.stopping = True
        for server in self.servers:
            server.close()
        await self.close_connections(grace)
        if self.fleet_keys is not None:
            await self.fleet_keys.stop()
        self.stop_ticker()
        if self._refresh_task is not None and not self._refresh_task.done():
            self._refresh_task.cancel()
        if self.handler is not None:
            await self.handler.credentials.close()
            if self.handler.fallback is not None:
                await self.handler.fallback.close()
        for server in self.servers:
            await server.wait_closed()
        self.servers = []

    def reload(self, config: Config) -> None:
        """New limits, keys, proxies and credential source; open connections keep serving."""
        metadata = config.metadata
        try:
            # Shared keys are re-read by fleet_keys off the loop; a reload must not wait for their store.
            keys = self.handler.keys if config.fleet.token_key_source else load_token_keys(config, self.token_keys)
            signer = load_identity_signer(config)
        except Exception as exc:
            log.error("metadata reload kept the previous keys: %s", exc)
            keys, signer = self.handler.keys, self.handler.renderer.signer
        handler = self.handler
        if keys is not handler.keys:
            handler.set_keys(keys)
        if self.fleet_keys is not None:
            self.fleet_keys.configure(config)
        if signer is not handler.renderer.signer:
            handler.renderer = Renderer(signer, metadata.render_cache_size)
        handler.limiter.rate = metadata.rate
        handler.limiter.burst = float(metadata.burst)
        handler.limiter.max_entries = metadata.rate_limit_entries
        handler.credentials.configure(source_from_config(metadata.credentials), metadata.credentials)
        self.limits = ProtocolLimits.of(metadata)
        self.trusted_proxies = TrustedProxies(metadata.trusted_proxies)
        self.peers = OrderedDict()
        # What a peer's plain GETs get (Peer.answers) depends on the rate limit, the fallback and the
        # renderer set above: open connections look it up again.
        for connection in self.connections:
            connection.peer.forget()
        self._configure_fallback(config)
        self.config = config
        log.info("metadata configuration reloaded keys=%d", len(keys.by_id))

    def _use_fleet_keys(self, text: str) -> bool:
        keys = tokens.parse_key_file(text, where=self.config.fleet.token_key_source)
        if keys == self.handler.keys:
            return False
        self.handler.set_keys(keys)
        return True

    def _configure_fallback(self, config: Config) -> None:
        """The cloud's own metadata service, asked before the view (when the composition root gives one)."""
        if self.fallback_for is None:
            return
        before = self.handler.fallback
        self.handler.fallback = self.fallback_for(config, before)
        if self.handler.fallback is not before and self.store.current is not None:
            self._view_changed(self.store.current)

    def _view_changed(self, snapshot: Snapshot) -> None:
        fallback = self.handler.fallback if self.handler is not None else None
        if fallback is not None:
            fallback.view_changed(snapshot)

    def export_metrics(self) -> None:
        """Copy the plain counters into the tally's subsystem totals (called once a second)."""
        events = self.tally.events
        handler = self.handler
        if handler is not None:
            events[("tokens", "issued")] = handler.tokens_issued
            events[("tokens", "verified")] = handler.tokens_verified
            events[("tokens", "rejected")] = handler.tokens_rejected
            events[("rate_limited", "http")] = handler.throttled
            credentials = handler.credentials
            events[("credential_fetches", "ok")] = max(0, credentials.fetches - credentials.failures)
            events[("credential_fetches", "error")] = credentials.failures
            for reason, lost in credentials.runner.failures.items():
                events[("credential_helper_failures", reason)] = lost
            if handler.fallback is not None:
                events.update(handler.fallback.counters())
        events[("unknown_source_refreshes", "http")] = self.refreshes
        events[("connections_refused", "http")] = self.refused_connections

    # -- unknown sources -------------------------------------------------------------------------

    def hold_unknown_sources(self) -> None:
        """This process keeps its view while a replacement builds the next one (a swap by restart).

        An address it does not know may well be in that next view: rather than a 404, a request
        from one waits until this process is retired and is then closed unanswered, so the client's
        retry reaches a worker that serves the new view (at most ``UNKNOWN_HOLD_MAX``, then 404).
        """
        self.holding_unknown = True

    async def await_source(self, network: str, address: str) -> None:
        """Refresh the view (shared with every other waiter) until it knows the address or time is up."""
        loop = asyncio.get_running_loop()
        if self.holding_unknown:
            deadline = loop.time() + UNKNOWN_HOLD_MAX
            while loop.time() < deadline:
                if self.stopping:
                    raise LeaveUnanswered
                await asyncio.sleep(0.05)
            return
        arrived = loop.time()
        deadline = arrived + self.config.metadata.unknown_source_wait
        while True:
            task = self._refresh_task
            if task is None or task.done():
                task = self._refresh_task = loop.create_task(self._refresh_once())
                self._refresh_started = loop.time()
                self.refreshes += 1
            started = self._refresh_started
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            await asyncio.wait({task}, timeout=remaining)
            snapshot = self.store.current
            if snapshot is not None and (network, address) in snapshot.by_private:
                return
            # A refresh already running when this request arrived may have read the source
            # before the instance was in it: wait for one that started afterwards.
            if started >= arrived or not task.done():
                return

    async def _refresh_once(self) -> None:
        try:
            await self.refresh()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("view refresh for an unknown source failed: %s", exc)


def _bound(server: asyncio.Server) -> str:
    return ", ".join(str(s.getsockname()[:2]) for s in server.sockets)
