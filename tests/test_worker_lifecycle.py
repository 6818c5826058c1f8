"""Workers never outlive their supervisor: not when it cannot start, not when it is killed before they serve."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from tests.support import free_port, serve_argv, wait_until

ROOT = Path(__file__).resolve().parent.parent


def processes_mentioning(marker: str) -> list[int]:
    """PIDs whose command line contains ``marker`` (a per-test path): the edge processes of this test."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state != "Z":
            found.append(int(entry))
    return found


def serve(tmp_path: Path, view: str, admin_port: int, metadata_port: int, *extra: str,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    log = open(tmp_path / "edge.log", "ab")
    try:
        return subprocess.Popen(
            serve_argv(tmp_path / "state", view=view, workers=2, metadata_port=metadata_port, dns_port=free_port(),
                       admin_port=admin_port, extra=extra),
            stdout=log, stderr=log, cwd=ROOT,
            env={**os.environ, "EDGE_VIEW_CONNECT_TIMEOUT": "60", "EDGE_VIEW_READ_TIMEOUT": "60", **(env or {})})
    finally:
        log.close()


def port_bound(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def kill_leftovers(marker: str) -> None:
    for pid in processes_mentioning(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_supervisor_that_cannot_bind_its_admin_port_leaves_no_workers(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    admin_port = taken.getsockname()[1]
    metadata_port = free_port()
    marker = str(tmp_path / "state")
    try:
        process = serve(tmp_path, "demo", admin_port, metadata_port)
        assert process.wait(30) == 1
        assert "edge cannot start" in (tmp_path / "edge.log").read_text()
        # No worker is left to bind the service ports later (next to another edge, with SO_REUSEPORT).
        wait_until(lambda: not processes_mentioning(marker), timeout=10)
        assert not port_bound(metadata_port)
    finally:
        taken.close()
        kill_leftovers(marker)


def test_workers_waiting_for_their_first_view_exit_with_a_killed_supervisor(tmp_path: Path) -> None:
    # A control plane that accepts and never answers: the supervisor's first poll hangs, the workers
    # (with nothing on disk) wait for it before they bind.
    plane = socket.socket()
    plane.bind(("127.0.0.1", 0))
    plane.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:
        try:
            while True:
                held.append(plane.accept()[0])
        except OSError:  # closed at the end of the test
            pass

    accepting = threading.Thread(target=accept, daemon=True)
    accepting.start()
    metadata_port = free_port()
    marker = str(tmp_path / "state")
    try:
        process = serve(tmp_path, f"http://127.0.0.1:{plane.getsockname()[1]}/view.json", free_port(),
                        metadata_port, "--poll-interval", "30")
        wait_until(lambda: len(processes_mentioning(marker)) == 3, timeout=20)
        wait_until(lambda: (tmp_path / "edge.log").read_text().count("worker started") >= 2, timeout=20)
        process.kill()
        process.wait(5)
        # Orphaned before they served, the workers leave at once instead of binding up to 60 s later.
        wait_until(lambda: not processes_mentioning(marker), timeout=10)
        assert not port_bound(metadata_port)
    finally:
        plane.close()
        for connection in held:
            connection.close()
        kill_leftovers(marker)


def test_a_restart_with_etcd_hung_answers_from_the_cached_token_keys(tmp_path: Path) -> None:
    """etcd that accepts and never answers (a member gone mid-request, or behind a black hole) costs
    ``view.read_timeout`` per read; a gateway with a cached copy of the keys must not wait for it."""
    import http.client

    from edge.etcd.token_keys import TOKEN_KEY_CACHE

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)  # never accepted: connections complete in the backlog and nothing is ever answered
    keys = tmp_path / "keys"
    subprocess.run([sys.executable, "-m", "edge", "keys", "generate", str(keys)], check=True, cwd=ROOT,
                   capture_output=True, timeout=30)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / TOKEN_KEY_CACHE).write_text(keys.read_text())
    metadata_port = free_port()
    marker = str(tmp_path / "state")
    process = None
    try:
        process = serve(tmp_path, "demo", free_port(), metadata_port,
                        "--token-key-source", f"etcd://127.0.0.1:{hung.getsockname()[1]}/edge/token-keys")

        def token_answered() -> bool:
            connection = http.client.HTTPConnection("127.0.0.1", metadata_port, timeout=2)
            try:
                connection.request("PUT", "/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
                return connection.getresponse().status == 200
            finally:
                connection.close()

        # Well before the first read from etcd could time out (view.read_timeout = 60 s below).
        wait_until(token_answered, timeout=30)
        assert "using the cached copy" in (tmp_path / "edge.log").read_text()
    finally:
        if process is not None:
            process.kill()
            process.wait(5)
        hung.close()
        kill_leftovers(marker)


def children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry))
    return found


def test_a_worker_kept_on_its_view_during_a_swap_does_not_404_a_new_instance(tmp_path: Path) -> None:
    """During a swap by restart, old workers keep their view; an instance that is only in the new one
    must not be told 404 by them (it would stop looking), but wait for a worker that knows it."""
    import http.client
    import json
    import time

    from bench.generate import generate_view

    view = tmp_path / "view.json"

    def publish(document: dict) -> None:
        temporary = tmp_path / "view.json.tmp"
        temporary.write_text(json.dumps(document))
        temporary.rename(view)

    def get(source: str, timeout: float) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", metadata_port, timeout=timeout,
                                                source_address=(source, 0))
        try:
            connection.request("GET", "/latest/meta-data/instance-id")
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    first = generate_view(instances=30, networks=1, loopback=True, serial=1, user_data_bytes=16)
    publish(first)
    metadata_port = free_port()
    marker = str(tmp_path / "state")
    process = serve(tmp_path, str(view), free_port(), metadata_port, "--poll-interval", "0.5",
                    env={"EDGE_VIEW_SWAP_BY_RESTART_INSTANCES": "10", "EDGE_VIEW_SHARED_VIEW": "false"})
    stopped: list[int] = []
    try:
        known = first["instances"][0]["interfaces"][0]["private_ips"][0]
        wait_until(lambda: get(known, 2)[0] == 200, timeout=30)
        wait_until(lambda: len(children(process.pid)) == 2, timeout=10)
        serving = children(process.pid)
        # The next serial needs a full build (the cloud changed) and has one instance more.
        second = generate_view(instances=31, networks=1, loopback=True, serial=2, user_data_bytes=16)
        second["cloud"]["region"] = "generated-2"
        newcomer = second["instances"][30]
        address = newcomer["interfaces"][0]["private_ips"][0]
        publish(second)
        # Hold the swap: the first replacement is stopped before it can bind, so only the old
        # workers (told to keep their view) are listening.
        deadline = time.monotonic() + 20
        while not stopped and time.monotonic() < deadline:
            for pid in children(process.pid) - serving:
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
            time.sleep(0.002)
        assert stopped, (tmp_path / "edge.log").read_text()[-3000:]
        try:
            status, body = get(address, timeout=4)
        except (TimeoutError, OSError):
            status, body = 0, b""  # held: no answer (the old worker will close it when it is retired)
        assert status != 404, body
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        stopped.clear()
        wait_until(lambda: get(address, 2) == (200, newcomer["id"].encode()), timeout=60, interval=0.2)
        assert get(known, 2)[0] == 200
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        process.kill()
        process.wait(5)
        kill_leftovers(marker)
