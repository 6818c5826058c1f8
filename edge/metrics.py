"""Every metric edge exports, and how the hot path feeds them cheaply.

Request handlers never call prometheus-client: they bump plain integers in a
:class:`Tally` (a dict increment, and a bisect for latency).  Once a second,
and just before every scrape, :meth:`Metrics.sync` copies the increments into
the prometheus objects.  With several workers, prometheus-client's
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set by the supervisor before
anything imports prometheus-client) sums the workers' files at scrape time.

Names follow ``edge_<subsystem>_<name>_<unit>``; label values come from small
fixed sets (route families, status codes, rcodes), never from a raw path or
query name.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from time import monotonic
from typing import Any

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_SAMPLE = 8
"""Time one request in this many: reading the clock and bucketing on every request costs more
than the histogram is worth; counts are exact, the latency histogram is a 1-in-8 sample."""
REPLIES_HELD = 256
"""Distinct (target, answer) pairs a tally holds before labelling them (bounds the memory they pin)."""
SHORT_REPLY = 256
"""Answers up to this long are counted by their bytes; longer ones by their status line."""
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(slots=True, eq=False)
class Tally:
    """Plain counters a protocol bumps per request; exported by :meth:`Metrics.sync`."""

    protocol: str
    requests: dict[tuple[str, str], int] = field(default_factory=dict)
    """(route family or query kind, status or rcode) -> count."""
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0
    events: dict[tuple[str, str], int] = field(default_factory=dict)
    """(counter name, label value) -> count, for the subsystem counters below."""
    raw: dict[Any, int] = field(default_factory=dict)
    """Undecoded request keys from the reply fast paths; labelled at sync time."""
    replies: dict[bytes, list[Any]] = field(default_factory=dict)
    """request target -> [answer bytes, count]: the first answer held for each target, not yet
    labelled (see :meth:`fold`).  A target is nearly always answered with one pre-rendered bytes
    object, so a reply is one lookup, an identity check and an increment."""
    others: dict[bytes, dict[bytes, int]] = field(default_factory=dict)
    """answer bytes -> request target -> count: the other answers to targets in ``replies``."""
    held: int = 0
    """Distinct (answer, target) pairs in ``replies`` and ``others``."""
    countdown: int = 1
    """Replies until the next one is timed."""

    def request(self, family: str, status: str) -> None:
        key = (family, status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1

    def dns_reply(self, reply: bytes, started: float) -> None:
        """Count one DNS reply by (authoritative?, rcode), and time one reply in LATENCY_SAMPLE."""
        key = (reply[2] & 4) << 2 | reply[3] & 15
        raw = self.raw
        raw[key] = raw.get(key, 0) + 1
        countdown = self.countdown - 1
        if countdown:
            self.countdown = countdown
        else:
            self.countdown = LATENCY_SAMPLE
            self._sampled(monotonic() - started)

    def dns_replies(self, replies: list[bytes | None], started: float) -> None:
        """Count a batch of DNS replies (None: no reply) as :meth:`dns_reply` does; time one batch in
        LATENCY_SAMPLE, standing for each of its replies (they waited alike)."""
        raw = self.raw
        answered = 0
        for reply in replies:
            if reply is not None:
                key = (reply[2] & 4) << 2 | reply[3] & 15
                raw[key] = raw.get(key, 0) + 1
                answered += 1
        countdown = self.countdown - 1
        if countdown:
            self.countdown = countdown
        else:
            self.countdown = LATENCY_SAMPLE
            seconds = monotonic() - started
            self.latency_buckets[bisect_left(LATENCY_BUCKETS, seconds)] += answered * LATENCY_SAMPLE
            self.latency_sum += seconds * answered * LATENCY_SAMPLE

    def http_reply(self, target: bytes, response: bytes, started: float) -> None:
        """Count one metadata answer, and time one answer in LATENCY_SAMPLE.

        Counted by the objects themselves, target first: the target's hash is already cached by
        the handler's lookups, and the answer held for it is nearly always the very bytes object
        answered again (pre-rendered), so no key is built and the answer is not hashed; route
        family and status are worked out per distinct pair when folded.  Other answers are
        counted in ``others`` (see :meth:`_other`)."""
        cell = self.replies.get(target)
        if cell is not None and cell[0] is response:
            cell[1] += 1
        else:
            self._other(target, response, cell)
        countdown = self.countdown - 1
        if countdown:
            self.countdown = countdown
        else:
            self.countdown = LATENCY_SAMPLE
            self._sampled(monotonic() - started)

    def _other(self, target: bytes, response: bytes, cell: list[Any] | None) -> None:
        """Count a reply that is not the answer held for its target.  A long answer is counted by
        its status line (one built per request, as with a token's lifetime header, would be
        hashed whole, and held)."""
        if len(response) > SHORT_REPLY:
            response = response[:12]
        if cell is None:
            if self.held >= REPLIES_HELD:
                self.fold()
            self.replies[target] = [response, 1]
            self.held += 1
            return
        by_target = self.others.get(response)
        if by_target is not None:
            count = by_target.get(target)
            if count is not None:
                by_target[target] = count + 1
                return
        if self.held >= REPLIES_HELD:
            self.fold()
            self.replies[target] = [response, 1]
            self.held = 1
            return
        if by_target is None:
            by_target = self.others[response] = {}
        by_target[target] = 1
        self.held += 1

    def fold(self) -> None:
        """Label the held metadata answers by (route family, status) into ``raw`` (at sync, or when
        REPLIES_HELD distinct pairs are held: they keep their target and answer bytes alive)."""
        replies = self.replies
        if not replies:
            return
        raw = self.raw
        for target, (response, count) in replies.items():
            key = (http_family(target), response[9:12])
            raw[key] = raw.get(key, 0) + count
        for response, by_target in self.others.items():
            status = response[9:12]
            for target, count in by_target.items():
                key = (http_family(target), status)
                raw[key] = raw.get(key, 0) + count
        replies.clear()
        self.others.clear()
        self.held = 0

    def _sampled(self, seconds: float) -> None:
        # One timed request stands for LATENCY_SAMPLE requests in the histogram.
        self.latency_buckets[bisect_left(LATENCY_BUCKETS, seconds)] += LATENCY_SAMPLE
        self.latency_sum += seconds * LATENCY_SAMPLE

    def latency(self, seconds: float) -> None:
        self.latency_buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def count(self, name: str, label: str = "", amount: int = 1) -> None:
        key = (name, label)
        self.events[key] = self.events.get(key, 0) + amount


class NullTally(Tally):
    """A tally that counts nothing: what services use when metrics are turned off."""

    def request(self, family: str, status: str) -> None:
        pass

    def dns_reply(self, reply: bytes, started: float) -> None:
        pass

    def dns_replies(self, replies: list[bytes | None], started: float) -> None:
        pass

    def http_reply(self, target: bytes, response: bytes, started: float) -> None:
        pass

    def latency(self, seconds: float) -> None:
        pass

    def count(self, name: str, label: str = "", amount: int = 1) -> None:
        pass


# Subsystem counters that tallies may carry: name -> (metric name, help, label name).
EVENT_COUNTERS: dict[str, tuple[str, str, str]] = {
    "tokens": ("edge_metadata_tokens_total", "IMDSv2 tokens by outcome (issued, verified, rejected)", "outcome"),
    "rate_limited": ("edge_rate_limited_total", "Requests refused by the per-client rate limit", "protocol"),
    "unknown_source_refreshes": ("edge_metadata_unknown_source_refreshes_total",
                                 "View refreshes asked for because an unknown address asked", "protocol"),
    "credential_fetches": ("edge_metadata_credential_fetches_total",
                           "Calls to the credential source by result (ok, error)", "result"),
    "credential_helper_failures": ("edge_metadata_credential_helper_failures_total",
                                   "Credential command helpers lost and replaced, by reason (exited, protocol)",
                                   "reason"),
    "metadata_fallback": ("edge_metadata_fallback_total",
                          "Metadata fallback (a cloud's controller) by result: hit, fetched, failed, stale, "
                          "coalesced, starting, prefetched, prefetch_failed, prefetch_dropped", "result"),
    "dns_cache": ("edge_dns_cache_total", "Forwarding cache lookups by result (hit, miss, stale)", "result"),
    "dns_upstream_errors": ("edge_dns_upstream_errors_total", "Upstream resolver failures by kind", "kind"),
    "dns_not_ready": ("edge_dns_not_ready_total",
                      "DNS queries answered SERVFAIL (EDE 14) because no view was loaded yet", "protocol"),
    "dns_tcp_message_timeouts": ("edge_dns_tcp_message_timeouts_total",
                                 "DNS TCP connections closed because a message was not complete in time", "protocol"),
    "connections_refused": ("edge_connections_refused_total", "Connections refused by the connection caps",
                            "protocol"),
    "replies_dropped": ("edge_replies_dropped_total", "Answers the kernel would not take (UDP send buffer full)",
                        "protocol"),
}


class Metrics:
    """The process's prometheus objects (one per process, created by the composition root)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.multiprocess = bool(os.environ.get(MULTIPROCESS_ENV))
        self.registry = CollectorRegistry(auto_describe=True)
        register: Any = None if self.multiprocess else self.registry
        kwargs: dict[str, Any] = {"registry": register} if register is not None else {"registry": None}
        self.requests = Counter("edge_requests_total", "Requests answered, by protocol, route family and status/rcode",
                                ["protocol", "family", "status"], **kwargs)
        self.latency = Histogram("edge_request_duration_seconds", "Time from a complete request to its answer",
                                 ["protocol"], buckets=LATENCY_BUCKETS, **kwargs)
        self.events = {name: Counter(metric, text, [label], **kwargs)
                       for name, (metric, text, label) in EVENT_COUNTERS.items()}
        self.polls = Counter("edge_view_polls_total", "View polls by result", ["result"], **kwargs)
        gauge_mode: dict[str, Any] = {"multiprocess_mode": "max"} if self.multiprocess else {}
        self.view_serial = Gauge("edge_view_serial", "Serial of the view being served", **kwargs, **gauge_mode)
        self.view_loaded = Gauge("edge_view_loaded_timestamp_seconds", "When the served view was loaded",
                                 **kwargs, **gauge_mode)
        self.view_confirmed = Gauge("edge_view_confirmed_timestamp_seconds",
                                    "When the source last delivered or confirmed the served view", **kwargs,
                                    **gauge_mode)
        self.view_failures = Gauge("edge_view_consecutive_failures", "Polls failed in a row", **kwargs, **gauge_mode)
        self.source_events = Counter("edge_view_source_events_total",
                                     "What the view source did: keys refused, watch events and restarts, full reads",
                                     ["event"], **kwargs)
        self._source_events_seen: dict[str, int] = {}
        self.worker_restarts = Counter("edge_worker_restarts_total", "Workers restarted after exiting", **kwargs)
        self._tallies: list[Tally] = []
        self._exported: dict[int, dict[Any, Any]] = {}
        if self.multiprocess:
            from prometheus_client import multiprocess
            multiprocess.MultiProcessCollector(self.registry)

    def tally(self, protocol: str) -> Tally:
        tally = Tally(protocol)
        self._tallies.append(tally)
        return tally

    def adopt(self, tally: Tally) -> None:
        """Export a tally a service created for itself."""
        if all(known is not tally for known in self._tallies):
            self._tallies.append(tally)

    def sync(self) -> None:
        """Copy what the tallies counted since the last sync into the prometheus objects."""
        for tally in self._tallies:
            tally.fold()
            seen = self._exported.setdefault(id(tally), {})
            for raw_key, total in list(tally.raw.items()):
                family, status = _labels_of(raw_key)
                key = ("x", raw_key)
                delta = total - seen.get(key, 0)
                if delta:
                    self.requests.labels(tally.protocol, family, status).inc(delta)
                    seen[key] = total
            for (family, status), total in list(tally.requests.items()):
                delta = total - seen.get(("r", family, status), 0)
                if delta:
                    self.requests.labels(tally.protocol, family, status).inc(delta)
                    seen[("r", family, status)] = total
            histogram = self.latency.labels(tally.protocol)
            for index, total in enumerate(tally.latency_buckets):
                delta = total - seen.get(("l", index), 0)
                if delta:
                    seen[("l", index)] = total
                    _add_to_bucket(histogram, index, delta)
            sum_delta = tally.latency_sum - seen.get("lsum", 0.0)
            if sum_delta:
                seen["lsum"] = tally.latency_sum
                histogram._sum.inc(sum_delta)
            for (name, label), total in list(tally.events.items()):
                delta = total - seen.get(("e", name, label), 0)
                if delta and name in self.events:
                    self.events[name].labels(label or tally.protocol).inc(delta)
                    seen[("e", name, label)] = total

    def observe_poll(self, outcome: Any, store: Any) -> None:
        self.polls.labels(outcome.result).inc()
        self.observe_view(store)

    def observe_view(self, store: Any) -> None:
        status = store.status
        if store.current is not None:
            self.view_serial.set(store.current.serial)
        if status.loaded_at is not None:
            self.view_loaded.set(status.loaded_at)
        if status.confirmed_at is not None:
            self.view_confirmed.set(status.confirmed_at)
        self.view_failures.set(status.consecutive_failures)
        for name, total in status.source_events.items():
            delta = total - self._source_events_seen.get(name, 0)
            if delta > 0:
                self.source_events.labels(name).inc(delta)
            self._source_events_seen[name] = total

    def render(self) -> tuple[str, bytes]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self.sync()
        return CONTENT_TYPE_LATEST, generate_latest(self.registry)


def _add_to_bucket(histogram: Any, index: int, count: int) -> None:
    """Add ``count`` observations to bucket ``index`` in one step.

    prometheus-client stores per-bucket (not cumulative) values in ``_buckets``
    in the order of LATENCY_BUCKETS plus +Inf, which is the layout of a Tally.
    """
    histogram._buckets[index].inc(count)


def prepare_multiprocess_dir(state_dir: str) -> str:
    """A clean directory for the workers' metric files (set before prometheus-client is imported)."""
    directory = os.path.join(state_dir, "metrics")
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.endswith(".db"):
            os.unlink(os.path.join(directory, name))
    os.environ[MULTIPROCESS_ENV] = directory
    return directory


class Syncer:
    """Calls ``sync`` every ``interval`` seconds on the running loop."""

    def __init__(self, metrics: Metrics, interval: float = 1.0,
                 before: Iterable[Callable[[], None]] = ()) -> None:
        self.metrics = metrics
        self.interval = interval
        self.before = list(before)
        self._handle: Any = None
        self.last = 0.0

    def start(self) -> None:
        import asyncio
        loop = asyncio.get_running_loop()

        def tick() -> None:
            for hook in self.before:
                hook()
            self.metrics.sync()
            self.last = time.time()
            self._handle = loop.call_later(self.interval, tick)

        self._handle = loop.call_later(self.interval, tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


# -- label helpers for the hot paths ----------------------------------------------------------

_HTTP_FAMILIES = {b"meta-data": "meta-data", b"user-data": "user-data", b"dynamic": "dynamic", b"api": "token"}
_family_memo: dict[bytes, str] = {}


def http_family(target: bytes) -> str:
    """The route family of a metadata request target (a small fixed set, memoized)."""
    family = _family_memo.get(target)
    if family is None:
        parts = [p for p in target.split(b"?", 1)[0].split(b"/") if p]
        if not parts:
            family = "versions"
        elif len(parts) == 1:
            family = "version"
        elif parts[1] == b"meta-data" and len(parts) > 2 and parts[2] == b"iam":
            family = "iam"
        else:
            family = _HTTP_FAMILIES.get(parts[1], "other")
        if len(_family_memo) > 4096:
            _family_memo.clear()
        _family_memo[target] = family
    return family


def http_status(response: bytes) -> str:
    """``b"HTTP/1.1 200 OK..."`` -> ``"200"``."""
    return response[9:12].decode("ascii", "replace")


_RCODES = ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED")
_INVALID_RCODES = (1, 4)
"""FORMERR and NOTIMP: answers to junk (malformed queries, other opcodes), neither local nor recursive."""


def _dns_family(authoritative: int, rcode: int) -> str:
    if rcode in _INVALID_RCODES:
        return "invalid"
    return "local" if authoritative else "recursive"


def _labels_of(raw_key: Any) -> tuple[str, str]:
    if isinstance(raw_key, int):  # DNS: AA bit << 2 | rcode
        rcode = raw_key & 15
        return _dns_family(raw_key & 16, rcode), (_RCODES[rcode] if rcode < len(_RCODES) else str(rcode))
    family, status = raw_key
    return family, status.decode("ascii", "replace")


def dns_labels(response: bytes) -> tuple[str, str]:
    """(answer kind, rcode) of a DNS response: ``invalid`` for FORMERR and NOTIMP, else ``local`` when
    authoritative, else ``recursive``."""
    if len(response) < 4:
        return "dropped", "NONE"
    rcode = response[3] & 0x0F
    name = _RCODES[rcode] if rcode < len(_RCODES) else str(rcode)
    return _dns_family(response[2] & 0x04, rcode), name
