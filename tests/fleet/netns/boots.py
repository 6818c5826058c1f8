"""A boot storm from inside an instance namespace: cloud-init's EC2 request sequence, with its retries.

Run as ``ip netns exec NS python -m tests.fleet.netns.boots --expected FILE --sources A,B,...``;
prints one JSON report.  Every boot speaks from one instance address, opens a
new connection per request (as cloud-init's url_helper does) to
``169.254.169.254`` and:

1. ``PUT /latest/api/token`` (IMDSv2), then every request carries the token;
2. ``GET`` instance-id (checked against the view), the meta-data listing,
   local-ipv4 (checked), local-hostname, placement/availability-zone,
   public-keys/, user-data and the instance identity document.

Each request is tried as cloud-init's ``readurl`` tries it for the EC2 crawl:
a timeout of 5 s, up to 5 retries, 1 s apart.  A boot fails when a request
runs out of attempts or an answer belongs to another instance.  Reported: boots
started, failed, failed attempts (each a request some gateway did not
answer), the longest gap a boot saw (first attempt of a request to its
answer), and when failures happened (wall clock, so a test can relate them to
the failure it injected).
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import threading
import time
from dataclasses import asdict, dataclass, field

ADDRESS = "169.254.169.254"
TIMEOUT = 5.0
RETRIES = 5
SECONDS_BETWEEN = 1.0
TOKEN_TTL = "21600"
PATHS = ("/latest/meta-data/", "/latest/meta-data/local-hostname", "/latest/meta-data/placement/availability-zone",
         "/latest/meta-data/public-keys/", "/latest/user-data", "/latest/dynamic/instance-identity/document")


@dataclass
class Report:
    boots: int = 0
    failed_boots: int = 0
    requests: int = 0
    failed_attempts: int = 0
    longest_gap: float = 0.0
    failures: list[tuple[float, str, str]] = field(default_factory=list)
    """(wall-clock time, source, what) of every failed attempt and failed boot, the first 200."""
    started: float = 0.0
    finished: float = 0.0

    def note(self, source: str, what: str) -> None:
        if len(self.failures) < 200:
            self.failures.append((time.time(), source, what))


class BootFailed(Exception):
    pass


class Boot:
    def __init__(self, source: str, instance_id: str, report: Report, lock: threading.Lock) -> None:
        self.source = source
        self.instance_id = instance_id
        self.report = report
        self.lock = lock
        self.token = ""

    def attempt(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(ADDRESS, 80, timeout=TIMEOUT, source_address=(self.source, 0))
        try:
            connection.request(method, path, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def request(self, method: str, path: str) -> bytes:
        headers = {"X-aws-ec2-metadata-token-ttl-seconds": TOKEN_TTL} if method == "PUT" else {}
        if self.token:
            headers["X-aws-ec2-metadata-token"] = self.token
        first = time.monotonic()
        for attempt in range(RETRIES + 1):
            if attempt:
                time.sleep(SECONDS_BETWEEN)
            try:
                status, body = self.attempt(method, path, headers)
                if status == 200:
                    gap = time.monotonic() - first
                    with self.lock:
                        self.report.requests += 1
                        self.report.longest_gap = max(self.report.longest_gap, gap)
                    return body
                what = f"{method} {path}: HTTP {status}"
            except (OSError, http.client.HTTPException) as exc:
                what = f"{method} {path}: {type(exc).__name__}: {exc}"
            with self.lock:
                self.report.failed_attempts += 1
                self.report.note(self.source, what)
        raise BootFailed(f"{method} {path}: no answer after {RETRIES + 1} attempts")

    def run(self) -> None:
        self.token = self.request("PUT", "/latest/api/token").decode()
        found = self.request("GET", "/latest/meta-data/instance-id").decode()
        if found != self.instance_id:
            raise BootFailed(f"instance-id {found} is not {self.instance_id}")
        address = self.request("GET", "/latest/meta-data/local-ipv4").decode()
        if address != self.source:
            raise BootFailed(f"local-ipv4 {address} is not {self.source}")
        for path in PATHS:
            self.request("GET", path)


def storm(expected: dict[str, str], sources: list[str], duration: float, max_boots: int, threads: int,
          pause: float) -> Report:
    report = Report(started=time.time())
    lock = threading.Lock()
    turns = itertools.cycle(sources)
    deadline = time.monotonic() + duration

    def worker() -> None:
        while time.monotonic() < deadline:
            with lock:
                if report.boots >= max_boots:
                    return
                report.boots += 1
                source = next(turns)
            try:
                Boot(source, expected[source], report, lock).run()
            except BootFailed as exc:
                with lock:
                    report.failed_boots += 1
                    report.note(source, f"boot failed: {exc}")
            time.sleep(pause)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    report.finished = time.time()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--expected", required=True, help="JSON file: instance address -> instance id")
    parser.add_argument("--sources", required=True, help="comma-separated addresses of this namespace to boot from")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds during which boots start")
    parser.add_argument("--max-boots", type=int, default=300)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--pause", type=float, default=0.05, help="seconds a thread waits between its boots")
    args = parser.parse_args()
    with open(args.expected) as handle:
        expected = json.load(handle)
    report = storm(expected, args.sources.split(","), args.duration, args.max_boots, args.threads, args.pause)
    print(json.dumps(asdict(report)))


if __name__ == "__main__":
    main()
