"""One gateway as operators run it: workers, restarts, refreshes, signals, health, metrics."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from edge.view.demo import demo_document
from tests.support import free_port, serve_argv, wait_until


def _get(url: str, source: str | None = None, timeout: float = 3.0) -> tuple[int, bytes]:
    """GET over a fresh connection, optionally from a given loopback source address."""
    host_port = url.split("/")[2]
    host, port = host_port.rsplit(":", 1)
    path = "/" + url.split("/", 3)[3] if url.count("/") >= 3 else "/"
    with socket.create_connection((host, int(port)), timeout=timeout,
                                  source_address=(source, 0) if source else None) as connection:
        connection.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := connection.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _metric(text: bytes, name: bytes) -> float:
    for line in text.splitlines():
        if line.startswith(name + b" "):
            return float(line.split()[1])
    return 0.0


class Gateway:
    def __init__(self, tmp_path, view: str, workers: int, extra: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.ports = {name: free_port() for name in ("metadata", "dns", "admin")}
        self.admin = f"http://127.0.0.1:{self.ports['admin']}"
        self.metadata = f"http://127.0.0.1:{self.ports['metadata']}"
        self.args = serve_argv(tmp_path / "state", view=view, workers=workers, metadata_port=self.ports["metadata"],
                               dns_port=self.ports["dns"], admin_port=self.ports["admin"], extra=tuple(extra or ()))
        self.log = open(tmp_path / "edge.log", "w+")
        self.process = subprocess.Popen(self.args, stderr=self.log, env={**os.environ, **(env or {})},
                                        start_new_session=True)

    def ready(self) -> bool:
        return _get(f"{self.admin}/readyz")[0] == 200

    def view(self) -> dict:
        return json.loads(_get(f"{self.admin}/view")[1])

    def logs(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def workers(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=20)
        finally:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def gateways() -> Iterator[list[Gateway]]:
    started: list[Gateway] = []
    yield started
    for gateway in started:
        gateway.stop()


def _published(control_plane, serial: int = 1, extra_instance: bool = False, dns_ttl: int | None = None) -> dict:
    document = demo_document()
    document["serial"] = serial
    if dns_ttl is not None:
        document["cloud"]["dns_ttl"] = dns_ttl  # a change of cloud settings: a full build, never a delta
    if extra_instance:
        late = copy.deepcopy(document["instances"][3])
        late["id"] = "i-0de00000000late9"
        late["interfaces"][0].update(id="eni-late9", mac="d0:0d:de:00:00:99", private_ips=["127.0.0.9"])
        document["instances"].append(late)
    control_plane.publish(document)
    return document


def test_workers_share_the_listeners_and_a_dead_worker_is_replaced(tmp_path, control_plane, gateways) -> None:
    _published(control_plane)
    gateway = Gateway(tmp_path, control_plane.url, workers=2, extra=["--poll-interval", "0.5"])
    gateways.append(gateway)
    wait_until(gateway.ready, timeout=20)
    wait_until(lambda: len(gateway.workers()) == 2, timeout=10)
    assert _get(f"{gateway.metadata}/latest/meta-data/instance-id") == (200, b"i-0de0000000000001")

    # The view is polled once per gateway, not once per worker.
    polls_before = len(control_plane.requests)
    time.sleep(2.0)
    assert len(control_plane.requests) - polls_before <= 2.0 / 0.5 + 2

    victim, survivor = gateway.workers()
    os.kill(victim, signal.SIGKILL)
    # The other worker keeps serving while the dead one is restarted.
    answered = 0
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            status, body = _get(f"{gateway.metadata}/latest/meta-data/instance-id")
            assert (status, body) == (200, b"i-0de0000000000001")  # never a wrong answer
            answered += 1
        except OSError:
            pass  # a connection that was queued on the dead worker's socket
        time.sleep(0.02)  # stay under the per-instance rate limit
    assert answered > 0
    wait_until(lambda: len(gateway.workers()) == 2 and victim not in gateway.workers(), timeout=10)
    assert survivor in gateway.workers()
    assert "worker exited; restarting" in gateway.logs()
    wait_until(lambda: _metric(_get(f"{gateway.admin}/metrics")[1], b"edge_worker_restarts_total") >= 1, timeout=10)
    assert gateway.stop() == 0


def test_workers_started_before_the_first_view_do_not_answer_without_it(tmp_path, control_plane, gateways) -> None:
    # A fresh gateway (nothing on disk) whose control plane takes a while to answer: a worker
    # bound before the view arrives would make a known instance wait and then get "not found".
    _published(control_plane)
    control_plane.mode, control_plane.hang_seconds = "hang", 4.0
    gateway = Gateway(tmp_path, control_plane.url, workers=2)
    gateways.append(gateway)
    answers: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + 30
    while not answers and time.monotonic() < deadline:
        try:
            answers.append(_get(f"{gateway.metadata}/latest/meta-data/instance-id", timeout=10))
        except OSError:
            time.sleep(0.05)  # nothing listening yet
    assert answers == [(200, b"i-0de0000000000001")], gateway.logs()
    control_plane.mode = "normal"
    assert gateway.stop() == 0


def test_unknown_instance_triggers_one_supervised_refresh(tmp_path, control_plane, gateways) -> None:
    _published(control_plane, serial=1)
    gateway = Gateway(tmp_path, control_plane.url, workers=2, extra=["--poll-interval", "60"])
    gateways.append(gateway)
    wait_until(gateway.ready, timeout=20)
    wait_until(lambda: len(gateway.workers()) == 2, timeout=10)
    # The instance boots after the last poll; the next scheduled poll is a minute away.
    _published(control_plane, serial=2, extra_instance=True)
    polls_before = len(control_plane.requests)
    status, body = _get(f"{gateway.metadata}/latest/meta-data/instance-id", source="127.0.0.9")
    assert (status, body) == (200, b"i-0de00000000late9")
    assert len(control_plane.requests) - polls_before == 1
    assert gateway.view()["serial"] == 2


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_reloads_configuration_and_keeps_serving(tmp_path, control_plane, gateways, workers: int) -> None:
    # One reload path (edge.process) for a single process and for a supervisor with its workers.
    _published(control_plane)
    config = tmp_path / "edge.toml"
    config.write_text("[view]\nmax_view_age = 0.0\n")
    gateway = Gateway(tmp_path, control_plane.url, workers=workers,
                      extra=["--config", str(config), "--poll-interval", "60"])
    gateways.append(gateway)
    wait_until(gateway.ready, timeout=20)
    config.write_text("[view]\nmax_view_age = 1.0\n")
    gateway.process.send_signal(signal.SIGHUP)
    wait_until(lambda: _get(f"{gateway.admin}/readyz")[0] == 503, timeout=10)
    assert b"max_view_age" in _get(f"{gateway.admin}/readyz")[1]
    assert _get(f"{gateway.metadata}/latest/meta-data/instance-id") == (200, b"i-0de0000000000001")
    assert "configuration reloaded" in gateway.logs()
    # A broken file on reload keeps the running configuration.
    config.write_text("[view]\nmax_view_age = \"later\"\n")
    gateway.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload failed" in gateway.logs(), timeout=10)
    assert _get(f"{gateway.metadata}/latest/meta-data/instance-id")[0] == 200


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_turns_unready_first_then_exits_cleanly(tmp_path, control_plane, gateways, workers: int) -> None:
    _published(control_plane)
    gateway = Gateway(tmp_path, control_plane.url, workers=workers, env={"EDGE_ADMIN_SHUTDOWN_DELAY": "3"})
    gateways.append(gateway)
    wait_until(gateway.ready, timeout=20)
    assert _get(f"{gateway.admin}/healthz") == (200, b"ok\n")
    signalled = time.monotonic()
    gateway.process.send_signal(signal.SIGTERM)
    wait_until(lambda: _get(f"{gateway.admin}/readyz")[0] == 503, timeout=2, interval=0.01)
    assert time.monotonic() - signalled < 3
    assert b"shutting down" in _get(f"{gateway.admin}/readyz")[1]
    # During the lame-duck delay instances are still answered.
    assert _get(f"{gateway.metadata}/latest/meta-data/instance-id")[0] == 200
    assert gateway.process.wait(timeout=20) == 0
    assert "edge stopped" in gateway.logs()


def test_metrics_and_view_summary(tmp_path, control_plane, gateways) -> None:
    _published(control_plane, serial=5)
    gateway = Gateway(tmp_path, control_plane.url, workers=1, extra=["--poll-interval", "0.3"])
    gateways.append(gateway)
    wait_until(gateway.ready, timeout=20)
    summary = gateway.view()
    assert summary["serial"] == 5 and summary["source"] == control_plane.url
    assert summary["counts"]["instances"] == 6 and summary["loaded_from"] == "source"
    control_plane.status = 500
    wait_until(lambda: gateway.view()["consecutive_failures"] >= 2, timeout=10)
    assert "HTTP 500" in gateway.view()["last_poll_error"]
    metrics = _get(f"{gateway.admin}/metrics")[1].decode()
    assert "edge_view_serial 5.0" in metrics
    assert 'edge_view_polls_total{result="accepted"} 1.0' in metrics
    assert 'edge_view_polls_total{result="error"}' in metrics
    assert _get(f"{gateway.admin}/nope")[0] == 404


def test_requests_are_counted_by_protocol_family_and_status(tmp_path, control_plane, gateways) -> None:
    import dns.message
    import dns.query

    _published(control_plane)
    gateway = Gateway(tmp_path, control_plane.url, workers=2)
    gateways.append(gateway)
    wait_until(gateway.ready, timeout=20)
    for _ in range(3):
        dns.query.udp(dns.message.make_query("ip-127-0-0-1.demo.internal", "A"), "127.0.0.1",
                      port=gateway.ports["dns"], timeout=3)
    dns.query.udp(dns.message.make_query("nope.demo.internal", "A"), "127.0.0.1", port=gateway.ports["dns"], timeout=3)
    for _ in range(2):
        _get(f"{gateway.metadata}/latest/meta-data/instance-id")
    _get(f"{gateway.metadata}/latest/meta-data/nope")

    def counted() -> bool:
        text = _get(f"{gateway.admin}/metrics")[1]
        return (_metric(text, b'edge_requests_total{family="local",protocol="dns",status="NOERROR"}') == 3
                and _metric(text, b'edge_requests_total{family="local",protocol="dns",status="NXDOMAIN"}') == 1
                and _metric(text, b'edge_requests_total{family="meta-data",protocol="http",status="200"}') == 2
                and _metric(text, b'edge_requests_total{family="meta-data",protocol="http",status="404"}') == 1)

    # Workers sync once a second; the supervisor's /metrics sums them.
    wait_until(counted, timeout=10)


def test_large_view_is_swapped_in_by_replacing_workers(tmp_path, control_plane, gateways) -> None:
    """Every accepted view counts as large here: replacement workers build it, then take over."""
    import threading

    _published(control_plane, serial=1)
    gateway = Gateway(tmp_path, control_plane.url, workers=2, extra=["--poll-interval", "0.3"],
                      env={"EDGE_VIEW_SWAP_BY_RESTART_INSTANCES": "1", "EDGE_VIEW_SHARED_VIEW": "false"})
    gateways.append(gateway)
    wait_until(gateway.ready, timeout=20)
    wait_until(lambda: len(gateway.workers()) == 2, timeout=10)
    first_generation = set(gateway.workers())
    answers: list[tuple[int, bytes]] = []
    errors: list[str] = []
    running = True

    def client() -> None:
        while running:
            try:
                answers.append(_get(f"{gateway.metadata}/latest/meta-data/instance-id", source="127.0.0.2"))
            except OSError as exc:
                errors.append(repr(exc))
            time.sleep(0.02)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        _published(control_plane, serial=2, extra_instance=True, dns_ttl=30)
        wait_until(lambda: len(gateway.workers()) == 2 and not set(gateway.workers()) & first_generation, timeout=30)
        assert _get(f"{gateway.metadata}/latest/meta-data/instance-id", source="127.0.0.9") == \
            (200, b"i-0de00000000late9")
    finally:
        running = False
        thread.join()
    assert answers and all(answer == (200, b"i-0de0000000000002") for answer in answers)  # never a wrong answer
    with open("/proc/sys/net/ipv4/tcp_migrate_req") as handle:
        migrating = handle.read().strip() == "1"
    # Without tcp_migrate_req a connection queued on a retiring worker's listener can be reset.
    assert len(errors) <= (0 if migrating else 3), errors
    logs = gateway.logs()
    assert "swapping the view by restarting workers" in logs and logs.count("worker replaced") >= 2
    # A new serial that only adds an instance is a delta: built in place, no workers replaced.
    second_generation = set(gateway.workers())
    document = _published(control_plane, serial=3, extra_instance=True, dns_ttl=30)
    late = copy.deepcopy(document["instances"][-1])
    late["id"], late["interfaces"][0]["private_ips"] = "i-0de0000000late10", ["127.0.0.10"]
    late["interfaces"][0].update(id="eni-late10", mac="d0:0d:de:00:00:9a")
    document["instances"].append(late)
    control_plane.publish(document)
    wait_until(lambda: _get(f"{gateway.metadata}/latest/meta-data/instance-id", source="127.0.0.10")
               == (200, b"i-0de0000000late10"), timeout=20)
    assert set(gateway.workers()) == second_generation
