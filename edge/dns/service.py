"""The DNS service as the composition root sees it (a :class:`edge.lifecycle.Service`).

It owns the listeners (UDP and TCP on every ``dns.listen``), the forwarder
and its cache, the recursion policy and the rate limiter, and offers the
preparer that builds each snapshot's DNS data before the swap.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import socket
import time
from collections.abc import Callable

from edge.config import Config
from edge.dns.acl import RecursionPolicy
from edge.dns.engine import Engine, Forward
from edge.dns.forwarder import Forwarder
from edge.dns.protocol import DnsDatagramProtocol, DnsStats, DnsStreamProtocol
from edge.dns.zonedata import EXTRAS_KEY, DnsData, build_dns_data
from edge.lifecycle import Service
from edge.metrics import Tally
from edge.ratelimit import RateLimiter
from edge.view.snapshot import Preparer, Snapshot
from edge.view.store import ViewStore

log = logging.getLogger("edge.dns")


class DnsService(Service):
    """Owns the listeners; what they use of it is :class:`edge.dns.protocol.ListenerHost`."""

    name = "dns"

    def __init__(self, config: Config, store: ViewStore, rate_table: mmap.mmap | None = None) -> None:
        self.config = config
        self.store = store
        dns = config.dns
        self.forwarder = Forwarder(dns)
        self.policy = RecursionPolicy(dns.recursion_cidrs)
        # The AWS resolver allows 1024 packets/s per interface; a burst of one second of that.
        # ``rate_table``: the table a gateway's workers share (from the supervisor); None: a private one.
        self.limiter = RateLimiter(dns.rate_limit, max(dns.rate_limit, 1.0), dns.rate_limit_clients, rate_table)
        self.engine = Engine(dns, self.forwarder, self.policy)
        self.preparers: list[Preparer] = [self._prepare]
        self._last_data: DnsData | None = None
        self.stats = DnsStats()
        self.tally = Tally("dns")
        """Per-request counts and latencies; the composition root exports them as metrics."""
        self.connections: set[DnsStreamProtocol] = set()
        self.tcp_per_source: dict[str, int] = {}
        """Source address -> open TCP connections (only addresses with one open: bounded by the total cap)."""
        self.closing = False
        self._udp: list[DnsDatagramProtocol] = []
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def _prepare(self, snapshot: Snapshot) -> None:
        # Reads the configuration at build time, so a reload applies to the next snapshot.  The data
        # built last is passed on: a delta of its snapshot updates it from the changed names alone.
        dns = self.config.dns
        data = build_dns_data(snapshot, dns.nameserver, dns.instance_data_address, dns.answer_memo_size,
                              self._last_data)
        snapshot.extras[EXTRAS_KEY] = data
        self._last_data = data

    @property
    def addresses(self) -> list[tuple[str, int, str]]:
        """(host, port, network) actually bound, UDP listeners first (ports resolved when 0 was asked)."""
        out = []
        for listener in self._udp:
            # Optional only for listeners built without a socket (tests of the protocol); ours have one.
            name = listener.sock.getsockname()  # type: ignore[union-attr]
            out.append((name[0], name[1], listener.network))
        return out

    @property
    def ready(self) -> bool:
        return bool(self._udp) and not self.closing

    async def start(self, reuse_port: bool = False) -> None:
        for listen in self.config.dns.listen:
            await self._listen(listen.host, listen.port, listen.network, reuse_port)

    async def _listen(self, host: str, port: int, network: str, reuse_port: bool) -> None:
        """UDP and TCP on the same port; with port 0, retry until one port is free for both."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for attempt in range(1 if port else 20):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind((host, port))
                sock.setblocking(False)
            except OSError:
                sock.close()
                raise
            bound = sock.getsockname()[1]
            try:
                server = await loop.create_server(
                    lambda: DnsStreamProtocol(self, network), host=host, port=bound, family=family,
                    reuse_address=True, reuse_port=reuse_port or None, backlog=self.config.dns.listen_backlog)
            except OSError:
                sock.close()
                if port or attempt == 19:
                    raise
                continue
            self._grow_receive_buffer(sock)
            listener = DnsDatagramProtocol(self, network, sock)
            listener.start()
            self._udp.append(listener)
            self._servers.append(server)
            log.info("dns listening on %s port %d (udp+tcp) network=%r", host, bound, network)
            return

    def _grow_receive_buffer(self, sock: socket.socket) -> None:
        size = self.config.dns.udp_receive_buffer
        if not size:
            return
        try:
            # FORCE passes net.core.rmem_max when we have CAP_NET_ADMIN; otherwise take what is allowed.
            sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), size)
        except OSError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
            except OSError as exc:
                log.warning("dns: cannot set the UDP receive buffer: %s", exc)

    def forward(self, forward: Forward, send: Callable[[bytes | None], None], udp: bool) -> None:
        """Resolve ``forward`` in a task and ``send`` the reply (None if the query is dropped)."""
        self.stats.forwarded += 1
        task = asyncio.get_running_loop().create_task(self._forward(forward, send, udp))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward(self, forward: Forward, send: Callable[[bytes | None], None], udp: bool) -> None:
        reply: bytes | None = None
        try:
            entry = await self.forwarder.resolve(forward.query, forward.upstreams)
            reply = self.engine.forwarded(forward, entry, time.monotonic(), udp)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a DNS answer
            reply = self.engine.failed(forward, exc)
        finally:
            send(reply)

    async def stop(self, grace: float) -> None:
        self.closing = True
        for server in self._servers:
            server.close()
        # UDP listeners stay open (ignoring new queries) so answers still in flight can be sent.
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        for connection in list(self.connections):
            connection.close()
        for listener in self._udp:
            listener.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        self._udp.clear()

    def export_metrics(self) -> None:
        """Copy the plain counters into the tally's subsystem totals (called once a second)."""
        events = self.tally.events
        stats = self.forwarder.stats
        events[("dns_cache", "hit")] = stats.cache_hits
        events[("dns_cache", "miss")] = stats.cache_misses
        events[("dns_cache", "stale")] = stats.served_stale
        events[("dns_upstream_errors", "failure")] = stats.upstream_failures
        events[("dns_upstream_errors", "mismatched")] = stats.mismatched
        events[("dns_not_ready", "")] = self.engine.not_ready
        events[("connections_refused", "dns")] = self.stats.tcp_refused
        events[("dns_tcp_message_timeouts", "")] = self.stats.tcp_message_timeouts
        events[("replies_dropped", "dns")] = self.stats.udp_replies_dropped

    def reload(self, config: Config) -> None:
        """New limits, upstreams and recursion CIDRs; the cache and open connections are kept."""
        dns = config.dns
        if dns.listen != self.config.dns.listen:
            log.warning("dns: listener changes need a restart; keeping %s",
                        ", ".join(str(listen) for listen in self.config.dns.listen))
        if dns.listen_backlog != self.config.dns.listen_backlog:
            log.warning("dns: a new listen_backlog applies at the next restart; the listeners keep %d",
                        self.config.dns.listen_backlog)
        self.config = config
        self.forwarder.reconfigure(dns)
        self.engine.configure(dns)
        self.policy.configure(dns.recursion_cidrs)
        self.limiter.rate = dns.rate_limit
        self.limiter.burst = max(dns.rate_limit, 1.0)
        self.limiter.max_entries = dns.rate_limit_clients
