"""``edge serve`` subprocesses as a fleet's gateways, and an IMDS client that speaks as an instance."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import free_port


@dataclass
class Answer:
    status: int
    body: bytes


def imds(host: str, port: int, method: str, path: str, source: str = "127.0.0.1",
         headers: dict[str, str] | None = None, timeout: float = 2.0) -> Answer:
    """One request to a metadata listener from ``source`` (an instance's address).

    Raises OSError when the gateway is gone.
    """
    connection = http.client.HTTPConnection(host, port, timeout=timeout, source_address=(source, 0))
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return Answer(response.status, response.read())
    except http.client.HTTPException as exc:
        raise ConnectionError(f"{type(exc).__name__}: {exc}") from None
    finally:
        connection.close()


def get_token(host: str, port: int, source: str = "127.0.0.1", ttl: int = 300) -> bytes:
    answer = imds(host, port, "PUT", "/latest/api/token", source,
                  {"X-aws-ec2-metadata-token-ttl-seconds": str(ttl)})
    assert answer.status == 200, answer
    return answer.body


@dataclass
class Gateway:
    """One ``edge serve`` on its own loopback address, state directory and log."""

    name: str
    host: str
    view: str
    state_dir: Path
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    probe_source: str = "127.0.0.1"
    """An instance address of the view, used to tell that the gateway answers."""
    metadata_port: int = 0
    dns_port: int = 0
    admin_port: int = 0
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    def __post_init__(self) -> None:
        self.metadata_port = self.metadata_port or free_port(self.host)
        self.dns_port = self.dns_port or free_port(self.host)
        self.admin_port = self.admin_port or free_port(self.host)
        self.state_dir.mkdir(parents=True, exist_ok=True)

    @property
    def log_path(self) -> Path:
        return self.state_dir.parent / f"{self.name}.log"

    def start(self, wait: bool = True) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edge", "serve", "--view", self.view, "--state-dir", str(self.state_dir),
             "--metadata-listen", f"{self.host}:{self.metadata_port}",
             "--dns-listen", f"{self.host}:{self.dns_port}",
             "--admin-listen", f"{self.host}:{self.admin_port}", *self.extra_args],
            stdout=log, stderr=log, env={**os.environ, "EDGE_LOG_LEVEL": "info", **self.env})
        log.close()
        self.started_at = time.monotonic()
        if wait:
            self.wait_answering()

    def wait_answering(self, timeout: float = 20.0) -> float:
        """Seconds from start until the metadata listener answered an instance."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.log()}")
            try:
                if self.get("/latest/meta-data/instance-id", self.probe_source, timeout=0.5).status in (200, 401):
                    answered = time.monotonic() - self.started_at
                    self._wait_admin(deadline)
                    return answered
            except OSError:
                pass
            time.sleep(0.02)
        raise AssertionError(f"{self.name} did not answer within {timeout}s:\n{self.log()}")

    def _wait_admin(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                self.admin("/healthz")
                return
            except OSError:
                time.sleep(0.02)

    def get(self, path: str, source: str = "127.0.0.1", token: bytes | None = None,
            timeout: float = 2.0) -> Answer:
        headers = {"X-aws-ec2-metadata-token": token.decode()} if token else {}
        return imds(self.host, self.metadata_port, "GET", path, source, headers, timeout)

    def token(self, source: str = "127.0.0.1", ttl: int = 300) -> bytes:
        return get_token(self.host, self.metadata_port, source, ttl)

    def admin(self, path: str) -> Answer:
        connection = http.client.HTTPConnection(self.host, self.admin_port, timeout=2)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return Answer(response.status, response.read())
        finally:
            connection.close()

    def view_summary(self) -> dict:
        return json.loads(self.admin("/view").body)

    def serial(self) -> int | None:
        return self.view_summary()["serial"]

    def signal(self, number: int) -> None:
        assert self.process is not None
        self.process.send_signal(number)

    def kill(self) -> None:
        """``kill -9``: no goodbye, connections reset, routes would be withdrawn by health checks."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        code = self.process.returncode
        self.process = None
        return code

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-4000:]
        except OSError:
            return ""
