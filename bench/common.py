"""Helpers shared by the load benchmarks: ports, readiness, core pinning, server CPU accounting.

Server CPU is read from ``/proc/PID/stat`` (utime + stime) of a server's whole
process tree, so a supervisor and its workers are counted together.  With
``children=True`` the CPU of exited children that the tree has reaped
(cutime + cstime) is added too: that is where short helper processes, such as
a credential ``process`` source, show up.
"""

from __future__ import annotations

import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

TICKS = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both TCP and UDP on ``host`` at the time of the call.

    Chosen below the kernel's ephemeral range: a port from ``bind(0)`` comes from that range, where
    any client connection opened meanwhile (the tests and benchmarks open thousands) can take it as
    its local port before the server binds, and the server then fails with "address already in use".
    """
    low = _ephemeral_ports()[0]
    for _ in range(200):
        port = random.randrange(max(1024, low - 20000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, \
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            try:
                udp.bind((host, port))
                tcp.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range of local ports for outgoing connections (Linux default 32768-60999)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            low, high = (int(value) for value in ports.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def wait_tcp(port: int, host: str = "127.0.0.1", timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {host}:{port}")


def raise_open_files_limit() -> int:
    """Lift the soft descriptor limit to the hard one (a storm holds thousands of sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- cores --------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CorePlan:
    """Which cores the servers and the load generators are pinned to (disjoint when possible)."""

    server: tuple[int, ...]
    client: tuple[int, ...]

    @property
    def server_list(self) -> str:
        return ",".join(map(str, self.server))

    @property
    def client_list(self) -> str:
        return ",".join(map(str, self.client))

    def pin_server(self, argv: Sequence[str]) -> list[str]:
        return ["taskset", "-c", self.server_list, *argv]

    def pin_client(self, argv: Sequence[str]) -> list[str]:
        return ["taskset", "-c", self.client_list, *argv]

    def repin_server_threads(self, pid: int) -> None:
        """Move every thread of ``pid`` back to the server cores.

        Some servers set their workers' affinity themselves after start, over the one they were started
        with: Knot DNS pins UDP worker N to CPU N, which on two cores puts its only worker on the load
        generator's core.  Called once the server is ready, so its threads exist."""
        subprocess.run(["taskset", "-a", "-p", "-c", self.server_list, str(pid)], check=True,
                       stdout=subprocess.DEVNULL)


def core_plan(cores: Iterable[int] | None = None) -> CorePlan:
    """Half the usable cores (at least one) for the load generator, the rest for the servers.

    On a 2-core machine this is one core each: the servers of every comparison
    get the same single core, so ``--workers 2`` shares it with itself.
    """
    usable = sorted(cores if cores is not None else os.sched_getaffinity(0))
    if len(usable) == 1:
        return CorePlan(server=(usable[0],), client=(usable[0],))
    clients = max(1, len(usable) // 2)
    return CorePlan(server=tuple(usable[clients:]), client=tuple(usable[:clients]))


# -- CPU accounting ----------------------------------------------------------------------------

def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (a supervisor and its workers), from ``/proc/PID/task/*/children``."""
    members = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            members.extend(process_tree(int(child)))
    return members


def _stat_ticks(pid: int, children: bool) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    # Fields after the command: state is [0], utime [11], stime [12], cutime [13], cstime [14].
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks


def cpu_seconds(pids: Iterable[int], children: bool = False) -> float:
    """CPU seconds used so far by the process trees rooted at ``pids``."""
    seen: set[int] = set()
    ticks = 0
    for root in pids:
        for member in process_tree(root):
            if member not in seen:
                seen.add(member)
                ticks += _stat_ticks(member, children)
    return ticks / TICKS


def generator_cpu_seconds() -> float:
    """CPU seconds used so far by this process's waited-for children: the load generators (dnsperf, wrk)
    run through ``subprocess.run``, so the difference around one run is that run's generator CPU."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


GENERATOR_LIMITED = 0.9
"""Share of its core above which the load generator, not the server, sets the rate of a closed-loop run."""


def cpu_user_system(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds used so far by the process tree rooted at ``pid``."""
    user = system = 0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
    return user / TICKS, system / TICKS


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime


# -- processes ---------------------------------------------------------------------------------

def stop(process: subprocess.Popen, timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def read_port_line(process: subprocess.Popen, what: str) -> int:
    """The ``port=N`` line a helper server prints once it listens."""
    line = process.stdout.readline() if process.stdout else ""  # type: ignore[union-attr]
    if isinstance(line, bytes):
        line = line.decode()
    if not line.startswith("port="):
        process.kill()
        process.wait()
        errors = process.stderr.read() if process.stderr else ""  # type: ignore[union-attr]
        raise RuntimeError(f"{what} did not start (printed {line!r}){': ' + errors[-2000:] if errors else ''}")
    return int(line.strip().split("=", 1)[1])


def start_helper_server(script: str, *args: str, prefix: Sequence[str] = (), stderr: int | IO[str] | None = None,
                        env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
    """Start ``bench/SCRIPT``, a helper server that prints ``port=N`` once it listens: (process, N).

    ``prefix`` goes before the interpreter (``taskset -c CORE``, ``ip netns exec NAME``); the
    repository root is put on ``PYTHONPATH`` so the script imports this tree's edge and bench.
    Stop it with :func:`stop` (by its PID).
    """
    environment = dict(os.environ if env is None else env)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    process = subprocess.Popen([*prefix, sys.executable, str(ROOT / "bench" / script), *args],
                               stdout=subprocess.PIPE, stderr=stderr, text=True, env=environment)
    return process, read_port_line(process, script)


def start_metadata_server(*args: str, prefix: Sequence[str] = (), stderr: int | IO[str] | None = None,
                          env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
    """edge's metadata service alone on one loop (``bench/metadata_server.py ARGS``): (process, port).

    The one way tests and benchmarks start it; see that script for its options
    (``--listen``, ``--state-dir``, ``--view``, ``--token-key-file``, ``--limits``).
    """
    return start_helper_server("metadata_server.py", *args, prefix=prefix, stderr=stderr, env=env)


def start_dnsmasq(conf_lines: Iterable[str], directory: Path, port: int, argv_prefix: Sequence[str] = (),
                  extra: Sequence[str] = ()) -> subprocess.Popen:
    """A foreground dnsmasq on 127.0.0.1:``port`` answering only from ``conf_lines`` (no resolv.conf, no hosts)."""
    conf = directory / f"dnsmasq-{port}.conf"
    conf.write_text("".join(line + "\n" for line in conf_lines))
    return subprocess.Popen(
        [*argv_prefix, "dnsmasq", "--keep-in-foreground", f"--conf-file={conf}", "--no-resolv", "--no-hosts",
         "--bind-interfaces", "--listen-address=127.0.0.1", "--except-interface=nonexistent0", f"--port={port}",
         "--pid-file=", "--user=root", "--group=root", *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# -- statistics --------------------------------------------------------------------------------

def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, int(round(fraction * len(sorted_values) + 0.5 - 1e-9)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def median_range(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of repeated measurements."""
    return statistics.median(values), min(values), max(values)


# -- the machine -------------------------------------------------------------------------------

def machine() -> dict[str, str]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        found = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
        total_kb = int(found.group(1))  # type: ignore[union-attr]
        memory = f"{total_kb / 2**20:.1f} GiB"
    except (OSError, AttributeError):
        pass
    return {
        "cores": str(os.cpu_count() or 0),
        "usable cores": str(len(os.sched_getaffinity(0))),
        "cpu model": model or platform.processor() or "unknown",
        "memory": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def tool_version(argv: Sequence[str], pattern: str = r"(\d+\.\d+(?:\.\d+)?\S*)") -> str:
    """First version-looking token printed by ``argv`` (stdout or stderr); ``missing`` if not installed."""
    if shutil.which(argv[0]) is None:
        return "missing"
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    match = re.search(pattern, done.stdout + "\n" + done.stderr)
    return match.group(1) if match else "unknown"
