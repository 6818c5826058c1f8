"""A real etcd member on loopback for tests, and a recording proxy to watch what clients ask it."""

from __future__ import annotations

import base64
import json
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.support import free_port

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


class EtcdServer:
    """One-member cluster on 127.0.0.1 with its own data directory; restartable on the same ports."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.client_port = free_port()
        self.peer_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}.log"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def url(self, key: str) -> str:
        return f"etcd://{self.endpoint}/{key}"

    def start(self, timeout: float = 20.0) -> None:
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [ETCD, "--name", "default", "--data-dir", str(self.data_dir),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"default={peer}", "--log-level", "warn"],
            stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.process.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{client}/health", timeout=1) as response:
                    if json.loads(response.read()).get("health") == "true":
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"etcd not healthy within {timeout}s: {self.log_path.read_text()[-2000:]}")

    def stop(self, hard: bool = False) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def wipe(self) -> None:
        """Throw the data away (a cluster restored from nothing: revisions start again at 1)."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def call(self, path: str, request: dict) -> dict:
        body = json.dumps(request).encode()
        req = urllib.request.Request(f"http://{self.endpoint}{path}", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as response:
            return json.loads(response.read())

    def put(self, key: str, value: bytes | str) -> int:
        """Write through the JSON gateway, as a control plane would; the new revision."""
        raw = value.encode() if isinstance(value, str) else value
        answer = self.call("/v3/kv/put", {"key": _b64(key.encode()), "value": _b64(raw)})
        return int(answer["header"]["revision"])

    def delete(self, key: str) -> None:
        self.call("/v3/kv/deleterange", {"key": _b64(key.encode())})


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class Exchange:
    path: str
    request: dict
    status: int
    response: dict


@dataclass
class RecordingProxy:
    """An HTTP proxy in front of etcd's gateway that records every exchange; ``mode`` breaks it on purpose."""

    target: str
    mode: str = "forward"
    """``forward``, ``hang`` (accept, never answer) or ``error`` (HTTP 503)."""
    exchanges: list[Exchange] = field(default_factory=list)
    port: int = 0
    _server: ThreadingHTTPServer | None = None

    def start(self) -> RecordingProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if proxy.mode == "hang":
                    time.sleep(5)
                    return
                if proxy.mode == "error":
                    payload = b'{"error":"etcdserver: request timed out","code":14,"message":"request timed out"}'
                    status = 503
                else:
                    req = urllib.request.Request(f"http://{proxy.target}{self.path}", data=body, method="POST",
                                                 headers={"Content-Type": "application/json"})
                    try:
                        with urllib.request.urlopen(req, timeout=5) as response:
                            payload, status = response.read(), response.status
                    except urllib.error.HTTPError as exc:
                        payload, status = exc.read(), exc.code
                proxy.exchanges.append(Exchange(self.path, json.loads(body or b"{}"), status,
                                                json.loads(payload or b"{}")))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
