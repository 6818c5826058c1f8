"""The open-loop generator and the report's pictures: counts and parsing through real sockets, no timings."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from bench.common import free_port, stop, wait_tcp
from bench.open_loop import (
    Point,
    Sweep,
    _response_end,
    equal_load,
    http_point,
    latency_point,
    markdown,
    parse_dnsperf_verbose,
    sweep,
)
from bench.peer_configs import nginx_conf

DNSPERF_VERBOSE = """DNS Performance Testing Tool
> NOERROR ip-10-0-0-1.demo.example A 0.000210
> NOERROR ip-10-0-0-2.demo.example A 0.000120
> SERVFAIL ip-10-0-0-3.demo.example A 0.000900
Statistics:

  Queries sent:         4
  Queries completed:    3 (75.00%)
  Queries lost:         1 (25.00%)
"""


def test_dnsperf_verbose_output_gives_each_latency_errors_and_lost_queries() -> None:
    sent, latencies, errors, lost = parse_dnsperf_verbose(DNSPERF_VERBOSE)
    assert (sent, sorted(latencies), errors, lost) == (4, [0.00012, 0.00021, 0.0009], 1, 1)


def test_response_end_waits_for_the_whole_body() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\ncontent-length: 5\r\n\r\n"
    assert _response_end(head + b"abc") == (-1, 0)
    assert _response_end(head + b"abcde") == (len(head) + 5, 200)
    assert _response_end(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")[1] == 404
    assert _response_end(b"HTTP/1.1 200 OK\r\n") == (-1, 0)


def test_a_point_is_generator_limited_when_the_rate_was_not_offered() -> None:
    offered = latency_point("nsd", 1000, 1.0, 990, [0.001] * 990, 0, 0)
    assert not offered.generator_limited and not offered.saturated and offered.p99_ms == 1.0
    assert latency_point("nsd", 1000, 1.0, 500, [0.001] * 500, 0, 0).generator_limited
    assert latency_point("nsd", 1000, 1.0, 1000, [0.001] * 1000, 0, 0, generator_busy=0.97).generator_limited
    assert latency_point("nsd", 1000, 1.0, 1000, [0.001] * 990, 0, 10).saturated


def test_a_sweep_stops_after_the_first_saturated_point() -> None:
    def measure(rate: float) -> Point:
        answered = min(rate, 250.0)
        return latency_point("edge", rate, 1.0, int(rate), [0.001] * int(answered), 0, int(rate - answered))

    result = sweep("edge", "dns", [100, 200, 300, 400], measure, log=lambda _: None)
    assert [p.offered for p in result.points] == [100, 200, 300]
    table = markdown([result], "queries/s").splitlines()
    assert table[-1].startswith("| edge | 300 | 250 |") and table[-1].endswith("| 0 / 50 | - | saturated |")


def test_equal_load_compares_cpu_only_where_both_servers_answered_cleanly() -> None:
    def point(server: str, rate: float, cpu: float, answered: float | None = None) -> Point:
        done = int(rate if answered is None else answered)
        measured = latency_point(server, rate, 1.0, int(rate), [0.001] * done, 0, int(rate) - done)
        measured.server_cpu_us = cpu
        return measured

    edge = Sweep("edge", "dns", [point("edge", 100, 9.0), point("edge", 200, 8.0), point("edge", 300, 7.0, 200)])
    nsd = Sweep("nsd", "dns", [point("nsd", 100, 7.5), point("nsd", 200, 6.4), point("nsd", 300, 6.0)])
    table = equal_load([edge, nsd], "edge", "queries/s").splitlines()
    assert table[2:] == ["| 100 | nsd | 7.5 | 9.0 | 1.20x |", "| 200 | nsd | 6.4 | 8.0 | 1.25x |"]
    assert "| 9.0 |" in markdown([edge], "queries/s").splitlines()[2]
    assert equal_load([edge], "edge", "queries/s").startswith("_no offered rate")


class _Answering(threading.Thread):
    """A keep-alive HTTP server in a thread answering every request with ``status``."""

    def __init__(self, status: int) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.status = status

    def run(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(connection,), daemon=True).start()

    def serve(self, connection: socket.socket) -> None:
        answer = f"HTTP/1.1 {self.status} X\r\nContent-Length: 2\r\n\r\nok".encode()
        with connection:
            buffer = b""
            while True:
                data = connection.recv(4096)
                if not data:
                    return
                buffer += data
                while b"\r\n\r\n" in buffer:
                    _, buffer = buffer.split(b"\r\n\r\n", 1)
                    connection.sendall(answer)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("status, errors", [(200, 0), (503, 40)])
def test_http_point_counts_every_answer_and_the_non_200_ones(status: int, errors: int) -> None:
    server = _Answering(status)
    server.start()
    try:
        sent, latencies, counted_errors, timeouts, _ = http_point(server.port, "/x", rate=80, seconds=0.5,
                                                                   connections=4)
    finally:
        server.listener.close()
    assert (len(latencies), counted_errors, timeouts) == (40, errors, 0)
    assert 0 < sent <= 40  # sent on schedule; one sent late on a busy machine is not counted here


@pytest.mark.timeout(30)
def test_http_point_counts_requests_a_silent_server_never_answers_as_timeouts() -> None:
    listener = socket.create_server(("127.0.0.1", 0))  # accepts (kernel backlog) but never answers
    try:
        sent, latencies, errors, timeouts, _ = http_point(listener.getsockname()[1], "/x", rate=40, seconds=0.25,
                                                          connections=2)
    finally:
        listener.close()
    assert latencies == [] and errors == 0 and timeouts == 10 and sent <= 2


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
@pytest.mark.timeout(60)
def test_the_generator_process_measures_nginx_without_errors(tmp_path: Path) -> None:
    from bench.open_loop import http_sweep_point

    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_conf(tmp_path, port, "i-0de0000000000001"))
    nginx = subprocess.Popen(["nginx", "-p", str(tmp_path), "-c", str(conf)], stdin=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        wait_tcp(port)
        point = http_sweep_point("nginx", port, "/latest/meta-data/instance-id", 200, 0.5, [0], connections=4)
    finally:
        stop(nginx)
    assert (point.server, point.completed, point.errors, point.timeouts) == ("nginx", 100, 0, 0)
    assert 0 < point.p50_ms <= point.p90_ms <= point.p99_ms


def test_plots_are_written_as_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from bench.plots import latency_plot, scale_plot

    edge = Sweep("edge", "dns", [latency_point("edge", rate, 1.0, rate, [0.0002] * rate, 0, 0)
                                 for rate in (1000, 2000)])
    limited = Sweep("nsd", "dns", [latency_point("nsd", 1000, 1.0, 10, [0.0001] * 10, 0, 0)])
    path = latency_plot([edge, limited], tmp_path / "plots" / "dns.png", "DNS", "queries/s")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [{"instances": n, "first_build_median_s": n / 5e4, "swap_all_build_s": n / 5e4,
             "swap_1pct_build_median_s": n / 2e5, "resident_first_mb": n * 4 / 1024, "resident_mb": n * 7 / 1024}
            for n in (1000, 10000)]
    assert scale_plot(rows, tmp_path / "scale.png").read_bytes()[:4] == b"\x89PNG"
