"""A client population spread over gateways the way ECMP spreads flows, retrying on the next one."""

from __future__ import annotations

import http.client
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

PATH = "/latest/meta-data/instance-id"


@dataclass
class LoadReport:
    answered: int = 0
    """Requests that got the right answer (after retries)."""
    wrong: int = 0
    """Answers that were not the asking instance's own (must stay 0)."""
    bad_status: int = 0
    """Non-200 answers (counted per attempt; the request is retried elsewhere)."""
    refused: int = 0
    """Connections refused: a dead gateway (the route would be withdrawn)."""
    in_flight_errors: int = 0
    """Connections broken after the request was sent: requests in flight on a gateway that died."""
    unanswered: int = 0
    """Requests no gateway answered."""
    per_gateway: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def merge(self, other: LoadReport) -> None:
        for name in ("answered", "wrong", "bad_status", "refused", "in_flight_errors", "unanswered"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.per_gateway.update(other.per_gateway)

    def summary(self) -> str:
        rate = self.answered / self.seconds if self.seconds else 0.0
        return (f"answered={self.answered} wrong={self.wrong} bad_status={self.bad_status} refused={self.refused} "
                f"in_flight_errors={self.in_flight_errors} unanswered={self.unanswered} "
                f"seconds={self.seconds:.2f} rate={rate:.0f}/s per_gateway={dict(sorted(self.per_gateway.items()))}")


def _flow_hash(address: str) -> int:
    return zlib.crc32(address.encode())


Gateway = tuple[str, int]

ANSWERED, WRONG, BAD_STATUS, REFUSED, BROKEN = "answered", "wrong", "bad_status", "refused", "broken"
"""What one attempt on one gateway gave."""

Attempt = Callable[[Gateway], str]
"""One request, already formed, tried on the gateway given; returns one of the outcomes above."""


def _http_attempt(path: str, source: str, expected: str, timeout: float) -> Attempt:
    """GET ``path`` from ``source``; the answer must be ``expected`` (the asking instance's own)."""

    def attempt(gateway: Gateway) -> str:
        connection = http.client.HTTPConnection(*gateway, timeout=timeout, source_address=(source, 0))
        try:
            try:
                connection.connect()
            except OSError:
                # Refused, reset during the handshake (a listener dying with the connection in its
                # backlog) or timed out: nothing was sent.
                return REFUSED
            try:
                connection.request("GET", path)
                response = connection.getresponse()
                status, body = response.status, response.read()
            except (OSError, http.client.HTTPException):
                return BROKEN
        finally:
            connection.close()
        if status != 200:
            return BAD_STATUS
        return ANSWERED if body.decode(errors="replace") == expected else WRONG

    return attempt


def _dns_attempt(name: str, source: str, expected: str, timeout: float) -> Attempt:
    """An A query for ``name`` over UDP from ``source``; the answer must be ``expected`` alone.

    A query that times out counts as BROKEN: a lost UDP query is never "refused".
    """
    import dns.exception
    import dns.message
    import dns.query
    import dns.rdatatype

    def attempt(gateway: Gateway) -> str:
        host, port = gateway
        try:
            response = dns.query.udp(dns.message.make_query(name, dns.rdatatype.A), host, port=port,
                                     timeout=timeout, source=source)
        except (dns.exception.Timeout, OSError):
            return BROKEN
        if response.rcode() != 0:
            return BAD_STATUS
        return ANSWERED if [r.address for rrset in response.answer for r in rrset] == [expected] else WRONG

    return attempt


def _run_pool(worker: Callable[[int], None], threads: int, reports: list[LoadReport],
              duration: float) -> LoadReport:
    """Run ``worker(n)`` on ``threads`` threads; a worker that crashes fails the run instead of vanishing."""
    failures: list[BaseException] = []

    def guarded(number: int) -> None:
        try:
            worker(number)
        except BaseException as exc:  # re-raised below, in the caller's thread
            failures.append(exc)

    began = time.monotonic()
    pool = [threading.Thread(target=guarded, args=(n,), daemon=True) for n in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(duration + 30)
    if failures:
        raise failures[0]
    if any(thread.is_alive() for thread in pool):
        raise RuntimeError("a client thread did not finish")
    total = LoadReport()
    for report in reports:
        total.merge(report)
    total.seconds = time.monotonic() - began
    return total


def run_flows(gateways: list[Gateway], addresses: list[str], request: Callable[[str, int, int], Attempt],
              duration: float, threads: int, max_requests: int | None = None) -> LoadReport:
    """The client loop every load here shares: clients spread over gateways the way ECMP spreads flows.

    Thread ``n`` speaks as every ``threads``-th address in turn, for ``duration`` seconds (or
    ``max_requests`` in all); ``request(source, n, i)`` forms its ``i``-th request. A flow
    goes to the gateway its source address hashes to; when that one refuses or breaks the
    connection, the client retries on the next gateway and keeps avoiding the failed one
    (as flows move after an ECMP route is withdrawn, or a stub resolver moves on).
    """
    reports = [LoadReport() for _ in range(threads)]
    budget = [max_requests] if max_requests is not None else None
    lock = threading.Lock()
    stop_at = time.monotonic() + duration

    def worker(number: int) -> None:
        report = reports[number]
        mine = addresses[number::threads]
        down: set[int] = set()
        index = 0
        while time.monotonic() < stop_at and mine:
            if budget is not None:
                with lock:
                    if budget[0] <= 0:
                        return
                    budget[0] -= 1
            source = mine[index % len(mine)]
            attempt = request(source, number, index)
            index += 1
            start = _flow_hash(source) % len(gateways)
            for step in range(len(gateways)):
                choice = (start + step) % len(gateways)
                if choice in down and step < len(gateways) - 1:
                    continue
                outcome = attempt(gateways[choice])
                if outcome in (REFUSED, BROKEN):
                    if outcome == REFUSED:
                        report.refused += 1
                    else:
                        report.in_flight_errors += 1
                    down.add(choice)
                    continue
                if outcome == BAD_STATUS:
                    report.bad_status += 1
                    continue
                if outcome == WRONG:
                    report.wrong += 1
                else:
                    report.answered += 1
                    report.per_gateway[f"{gateways[choice][0]}:{gateways[choice][1]}"] += 1
                break
            else:
                report.unanswered += 1

    return _run_pool(worker, threads, reports, duration)


def run_clients(gateways: list[Gateway], expected: dict[str, str], duration: float, threads: int = 6,
                timeout: float = 2.0, max_requests: int | None = None) -> LoadReport:
    """Every client address asks its own instance id for ``duration`` seconds (or ``max_requests`` in all)."""
    return run_flows(gateways, sorted(expected),
                     lambda source, _number, _index: _http_attempt(PATH, source, expected[source], timeout),
                     duration, threads, max_requests)


def run_dns_clients(gateways: list[Gateway], expected: dict[str, str], domain: str, duration: float,
                    threads: int = 2, timeout: float = 0.5) -> LoadReport:
    """Every client address resolves a neighbour's name over UDP for ``duration`` seconds.

    ``refused`` stays 0 here: a lost UDP query shows up as ``in_flight_errors``.
    """
    addresses = sorted(expected)

    def request(source: str, number: int, index: int) -> Attempt:
        target = addresses[(index * 7 + number) % len(addresses)]
        name = "ip-" + target.replace(".", "-") + "." + domain + "."
        return _dns_attempt(name, source, target, timeout)

    return run_flows(gateways, addresses, request, duration, threads)
