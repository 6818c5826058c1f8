"""`edge serve --workers 2` with the shared view: every worker answers from the supervisor's one copy."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
from pathlib import Path

import dns.message
import dns.query
import pytest

from bench.generate import generate_view
from tests.support import free_port, serve_argv, stop_session, wait_until

TAG_PATH = "/latest/meta-data/tags/instance/Name"


class SharedGateway:
    def __init__(self, tmp_path: Path, settings: dict[str, str] | None = None, config: Path | None = None) -> None:
        self.view_path = tmp_path / "view.json"
        self.state = tmp_path / "state"
        self.metadata_port, self.dns_port = free_port(), free_port()
        self.log_path = tmp_path / "edge.log"
        self.log = open(self.log_path, "w")
        argv = serve_argv(self.state, workers=2, metadata_port=self.metadata_port, dns_port=self.dns_port,
                          admin_port=free_port(), view=str(self.view_path),
                          extra=("--poll-interval", "0.3", *(("--config", str(config)) if config else ())))
        self.process = subprocess.Popen(argv, stderr=self.log, env={**os.environ, **(settings or {})},
                                        start_new_session=True)

    def workers(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def serving_workers(self) -> int:
        return sum(1 for line in self.log_path.read_text().splitlines() if "worker started" in line and "ready=True" in line)

    def tag(self, source: str) -> tuple[int, bytes]:
        """One request on a new connection (new source port: the kernel picks a worker by it)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.metadata_port, timeout=5, source_address=(source, 0))
        try:
            connection.request("GET", TAG_PATH)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def stop(self) -> None:
        stop_session(self.process)
        self.log.close()


def publish(path: Path, document: dict) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(document))
    temporary.rename(path)


def maps_shared_file(pid: int, directory: Path) -> bool:
    try:
        return str(directory / "served-view" / "data.mdb") in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.fixture
def document():
    found = generate_view(instances=40, networks=1, loopback=True, serial=1, user_data_bytes=16)
    for instance in found["instances"]:
        instance["tags"] = {"Name": "first"}
        instance["metadata_options"]["tags"] = True
    return found


def test_workers_answer_from_the_one_shared_copy_and_see_each_change(tmp_path, document):
    config = tmp_path / "edge.toml"
    config.write_text("[view]\nshared_view = true\n")
    gateway = SharedGateway(tmp_path, config=config)
    publish(gateway.view_path, document)
    try:
        wait_until(lambda: gateway.serving_workers() == 2, timeout=60)
        workers = gateway.workers()
        assert len(workers) == 2
        # Each worker maps the file the supervisor writes: it holds no copy of its own.
        wait_until(lambda: all(maps_shared_file(pid, gateway.state) for pid in workers), timeout=10)
        address = document["instances"][5]["interfaces"][0]["private_ips"][0]
        assert {gateway.tag(address) for _ in range(20)} == {(200, b"first")}

        document["serial"] = 2
        document["instances"][5]["tags"] = {"Name": "second"}
        publish(gateway.view_path, document)
        answers: list[tuple[int, bytes]] = []

        def every_worker_answers_the_change() -> bool:
            batch = [gateway.tag(address) for _ in range(20)]
            answers.extend(batch)
            return set(batch) == {(200, b"second")}

        wait_until(every_worker_answers_the_change, timeout=30)
        # While the change travelled, each answer was the old value or the new one: never an error.
        assert set(answers) <= {(200, b"first"), (200, b"second")}

        # DNS from the same copy: the instance's name, and its reverse.
        name = f"ip-{address.replace('.', '-')}.{document['cloud']['internal_domain']}"
        reply = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=gateway.dns_port, timeout=3,
                              source=address)
        assert [item.address for rrset in reply.answer for item in rrset] == [address]

        # A worker killed outright is replaced by one that serves from the same copy at once, and
        # follows its supervisor, not the configuration file as it reads by then: a worker that read
        # shared_view = false would build a copy of its own from the state file.
        config.write_text("[view]\nshared_view = false\n")
        victim = workers[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(gateway.workers()) == 2 and victim not in gateway.workers(), timeout=30)
        wait_until(lambda: gateway.serving_workers() == 3, timeout=60)
        replacement = (set(gateway.workers()) - {victim} - set(workers)).pop()
        assert maps_shared_file(replacement, gateway.state)
        wait_until(lambda: {gateway.tag(address) for _ in range(20)} == {(200, b"second")}, timeout=10)
        logs = gateway.log_path.read_text()
        assert "serving the shared view" in logs and "shared view unreadable" not in logs
    finally:
        gateway.stop()


def test_without_the_shared_view_each_worker_builds_its_own(tmp_path, document):
    gateway = SharedGateway(tmp_path, {"EDGE_VIEW_SHARED_VIEW": "false"})
    publish(gateway.view_path, document)
    try:
        wait_until(lambda: gateway.serving_workers() == 2, timeout=60)
        address = document["instances"][5]["interfaces"][0]["private_ips"][0]
        assert {gateway.tag(address) for _ in range(10)} == {(200, b"first")}
        assert not (gateway.state / "served-view").exists()
        assert not any(maps_shared_file(pid, gateway.state) for pid in gateway.workers())
    finally:
        gateway.stop()

