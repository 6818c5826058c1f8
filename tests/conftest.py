"""Fixtures shared across suites: a real local HTTP control plane whose behaviour each test sets, and edge built and installed as operators install it."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.installed import Dist, InstalledRoot, build_dist, namespaces_unavailable
from tests.leaks import adopt_orphans, stop_leftovers


@dataclass
class ControlPlane:
    """What the server answers; tests change these fields between polls."""

    body: bytes = b""
    status: int = 200
    mode: str = "normal"
    """``normal``, ``truncate``, ``hang``, ``gzip``, ``bad-gzip``, ``lie-length``."""
    hang_seconds: float = 5.0
    requests: list[dict[str, str]] = field(default_factory=list)
    url: str = ""

    def publish(self, document: dict) -> None:
        self.body = json.dumps(document).encode()


def _handler(plane: ControlPlane) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            plane.requests.append(dict(self.headers))
            if plane.mode == "hang":
                time.sleep(plane.hang_seconds)
            if plane.status != 200:
                body = b"error page"
                self.send_response(plane.status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            etag = '"' + hashlib.sha256(plane.body).hexdigest()[:16] + '"'
            if self.headers.get("If-None-Match") == etag:
                self.send_response(304)
                self.send_header("ETag", etag)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = plane.body
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", "Mon, 23 Nov 2026 22:10:00 GMT")
            if plane.mode in ("gzip", "bad-gzip"):
                body = gzip.compress(body)
                if plane.mode == "bad-gzip":
                    body = body[: len(body) // 2]
                self.send_header("Content-Encoding", "gzip")
            if plane.mode == "truncate":
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@pytest.fixture
def control_plane() -> Iterator[ControlPlane]:
    plane = ControlPlane()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(plane))
    server.daemon_threads = True
    plane.url = f"http://127.0.0.1:{server.server_address[1]}/view.json"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield plane
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    """The wheel and sdist of this tree, built once per test session."""
    if importlib.util.find_spec("build") is None:
        pytest.skip("the 'build' package is not installed (pip install build)")
    return build_dist(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="session")
def installed_edge(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> InstalledRoot:
    """``packaging/install --wheel`` run once, into overlays of /etc and /opt (tests/installed.py)."""
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    root = InstalledRoot(tmp_path_factory.mktemp("installed"))
    root.install(dist.wheel)
    return root


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_ADOPTING] = adopt_orphans()


def pytest_sessionfinish(session: pytest.Session) -> None:
    if session.config.stash.get(_ADOPTING, False):
        session.config.stash[_LEFTOVERS] = stop_leftovers(os.getpid())


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    leftovers = config.stash.get(_LEFTOVERS, {})
    if leftovers:
        terminalreporter.section("processes the tests left running (stopped at the end)", yellow=True)
        for pid, command in sorted(leftovers.items()):
            terminalreporter.line(f"{pid} {command}")


_ADOPTING = pytest.StashKey[bool]()
_LEFTOVERS = pytest.StashKey[dict]()
