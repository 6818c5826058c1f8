"""The documented fleet built from real parts in network namespaces.

::

    instances A (10.1.0.0/24) ──┐                 ┌── gw1: edge, BIRD (packaging/bird as shipped), edge-route-health
      └─ container C (10.1.1.0/30)  router: BIRD ──┼── gw2
    instances B (10.2.0.0/24) ──┘   BGP+BFD, ECMP  └── gw3
                                  control plane (HTTP) on 10.255.255.1

* The router runs BIRD 2 with a BGP session (and BFD) to every gateway and
  exports what it learns to its kernel with ``merge paths`` (ECMP), hashing
  flows on the 5-tuple (``fib_multipath_hash_policy = 1``).  Each gateway link
  goes through a bridge on the router, as through a switch: a gateway whose
  link goes down leaves the router's side up, so only BGP (or BFD) notices.
* Each gateway holds ``169.254.169.254`` and the DNS address ``10.0.0.53`` on
  ``lo``, runs ``edge serve`` (metadata on port 80, DNS on 53, admin on the
  default ``127.0.0.1:9169``), BIRD 2 with ``packaging/bird/bird.conf`` and
  ``edge-service.conf`` (only the site-specific lines changed: router id,
  neighbour, include path, log file; the second ToR is left out) and
  ``packaging/bird/edge-route-health`` at its defaults.  A small service
  manager does for edge what ``packaging/systemd/edge.service`` asks systemd to
  do: when edge ends, it waits for the unit's processes, then runs its
  ``ExecStopPost`` commands.
* Instances sit one routed hop from the gateways (``metadata.gateway_hops =
  1``); the container namespace sits one hop behind instance A, with an
  address the view knows (as if NAT made it the instance's), so the only thing
  keeping a token from it is the hop limit.

Every namespace, process and file belongs to one ``RoutedFleet``; ``close()``
stops its processes by PID and deletes its namespaces.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PACKAGING = ROOT / "packaging"
METADATA_ADDRESS = "169.254.169.254"
DNS_ADDRESS = "10.0.0.53"
CONTROL_ADDRESS = "10.255.255.1"
CONTROL_PORT = 8080
ROUTER_AS = 65000
SUBNETS = {"a": "10.1.0", "b": "10.2.0"}
CONTAINER_ADDRESS = "10.1.1.2"
FIRST_HOST = 16
INTERNAL_DOMAIN = "gen.internal"
ROLE_ACCESS_KEY = "AKIAROUTEDFLEET"
STOP_TIMEOUT = 30.0
"""edge.service's TimeoutStopSec: the unit's processes get this long before SIGKILL."""

CREDENTIAL_PROCESS = """#!/bin/sh
printf '{"Version": 1, "AccessKeyId": "%s", "SecretAccessKey": "secret-%s", "SessionToken": "token-%s", \
"Expiration": "%s"}' "{access}" "$1" "$1" "$(date -u -d '+1 hour' +%Y-%m-%dT%H:%M:%SZ)"
"""


def unavailable() -> str | None:
    """Why the routed fleet cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, BIRD)"
    for tool in ("ip", "bird", "birdc", "curl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian packages iproute2, bird2, curl)"
    probe = f"edge-probe-{uuid.uuid4().hex[:8]}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "cannot create network namespaces (ip netns add failed)"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def instance_addresses(subnet: str, count: int) -> list[str]:
    return [f"{SUBNETS[subnet]}.{FIRST_HOST + n}" for n in range(count)]


def fleet_view(per_subnet: int, serial: int = 1) -> dict:
    """A view whose instances are the namespace addresses: ``per_subnet`` in each subnet, and the container."""
    from bench.generate import generate_view

    addresses = instance_addresses("a", per_subnet) + instance_addresses("b", per_subnet) + [CONTAINER_ADDRESS]
    document = generate_view(instances=len(addresses), networks=1, loopback=True, serial=serial,
                             user_data_bytes=64)
    network = document["networks"][0]
    network["cidrs"] = ["10.0.0.0/8"]
    network["subnets"][0]["cidr"] = "10.0.0.0/8"
    for instance, address in zip(document["instances"], addresses):
        instance["interfaces"][0]["private_ips"] = [address]
    # The first instance of subnet A refuses IMDSv1: whatever reads its metadata used a token.
    document["instances"][0]["metadata_options"]["http_tokens"] = "required"
    return document


def expected_ids(document: dict) -> dict[str, str]:
    return {i["interfaces"][0]["private_ips"][0]: i["id"] for i in document["instances"]}


@dataclass
class Namespace:
    name: str

    def argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        result = subprocess.run(self.argv(*argv), timeout=timeout, **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"{self.name}: {shlex.join(argv)} failed: {result.stderr or result.stdout}")
        return result

    def ip(self, *argv: str) -> None:
        result = subprocess.run(["ip", "-n", self.name, *argv], capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"ip -n {self.name} {shlex.join(argv)}: {result.stderr}")

    def sysctl(self, setting: str) -> None:
        self.run("sysctl", "-qw", setting)


@dataclass
class Process:
    """A process this fleet started (its own session, so its helpers can be stopped with it)."""

    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def group_alive(self) -> bool:
        """Any process of its session left (edge's workers, a health check's curl)?"""
        return bool(_group_members(self.popen.pid))

    def signal_group(self, number: int) -> None:
        try:
            os.killpg(self.popen.pid, number)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 15) -> None:
        if self.alive:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.signal_group(signal.SIGKILL)
        if self.popen.poll() is None:
            self.popen.wait(5)


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


def start_process(name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> Process:
    handle = open(log, "ab")
    popen = subprocess.Popen(argv, stdout=handle, stderr=handle, stdin=subprocess.DEVNULL,
                             env={**os.environ, **(env or {})}, start_new_session=True, cwd=ROOT)
    handle.close()
    return Process(name, popen, log)


def unit_exec_stop_post() -> list[list[str]]:
    """``ExecStopPost`` command lines of ``packaging/systemd/edge.service``, prefixes stripped."""
    commands = []
    for line in (PACKAGING / "systemd" / "edge.service").read_text().splitlines():
        if line.startswith("ExecStopPost="):
            commands.append(shlex.split(line.split("=", 1)[1].lstrip("-+@:!")))
    return commands


@dataclass
class GatewayNode:
    """One gateway namespace: edge under a service manager, BIRD, and edge-route-health."""

    number: int
    namespace: Namespace
    root: Path
    fleet: RoutedFleet
    workers: int
    edge: Process | None = None
    bird: Process | None = None
    health: Process | None = None
    stop_posts: int = 0
    """How many times the service manager ran edge.service's ExecStopPost (after edge ended)."""
    _watcher: threading.Thread | None = field(default=None, repr=False)

    @property
    def link_address(self) -> str:
        return f"192.0.2.{8 * self.number + 2}"

    @property
    def router_address(self) -> str:
        return f"192.0.2.{8 * self.number + 1}"

    @property
    def bird_socket(self) -> Path:
        return self.root / "bird.ctl"

    @property
    def birdc(self) -> list[str]:
        return ["birdc", "-s", str(self.bird_socket)]

    @property
    def config_path(self) -> Path:
        return self.root / "edge.toml"

    # -- edge, as edge.service runs it ---------------------------------------------------------

    def write_config(self, **admin: float) -> None:
        fleet = self.fleet
        admin_lines = "".join(f"{key} = {value}\n" for key, value in admin.items())
        self.config_path.write_text(f"""workers = {self.workers}

[view]
source = "http://{CONTROL_ADDRESS}:{CONTROL_PORT}/view.json"
state_dir = "{self.root / 'state'}"
poll_interval = 1.0
backoff_max = 2.0
connect_timeout = 1.0
read_timeout = 5.0

[metadata]
listen = ["{METADATA_ADDRESS}:80"]
token_key_file = "{fleet.key_file}"
gateway_hops = 1

[metadata.credentials]
kind = "process"
command = ["{fleet.credential_process}", "{{role}}"]

[dns]
listen = ["{DNS_ADDRESS}:53"]

[admin]
{admin_lines}
[log]
level = "info"
""")

    def start_edge(self) -> None:
        assert self.edge is None or not self.edge.group_alive(), "edge is already running"
        if self._watcher is not None:
            self._watcher.join(STOP_TIMEOUT + 10)
        self.edge = start_process(f"gw{self.number}-edge", self.namespace.argv(
            sys.executable, "-m", "edge", "serve", "--config", str(self.config_path)), self.root / "edge.log")
        self._watcher = threading.Thread(target=self._supervise, args=(self.edge,), daemon=True)
        self._watcher.start()

    def _supervise(self, edge: Process) -> None:
        """What systemd does when the main process of edge.service ends, however it ends."""
        edge.popen.wait()
        deadline = time.monotonic() + STOP_TIMEOUT
        while edge.group_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        edge.signal_group(signal.SIGKILL)
        for command in unit_exec_stop_post() if self.fleet.stop_post else []:
            if command[0].endswith("birdc"):
                command = [*self.birdc, *command[1:]]
            self.namespace.run(*command, check=False)
        self.stop_posts += 1

    def wait_edge_gone(self, timeout: float = STOP_TIMEOUT + 10) -> None:
        """Until edge's processes are gone and the service manager has run ExecStopPost."""
        assert self._watcher is not None
        self._watcher.join(timeout)
        assert not self._watcher.is_alive(), f"gw{self.number}: edge did not stop:\n{self.edge_log()}"

    def edge_log(self) -> str:
        try:
            return (self.root / "edge.log").read_text()[-6000:]
        except OSError:
            return ""

    # -- BIRD and the health check ------------------------------------------------------------

    def write_bird_config(self) -> Path:
        """``packaging/bird/bird.conf`` as shipped, with this site's addresses."""
        text = (PACKAGING / "bird" / "bird.conf").read_text()
        text = text.replace("log syslog all;", f'log "{self.root / "bird.log"}" all;')
        text = re.sub(r"router id [0-9.]+;", f"router id {self.link_address};", text)
        text = text.replace('"/etc/bird/edge-service.conf"', f'"{PACKAGING / "bird" / "edge-service.conf"}"')
        text = re.sub(r"neighbor 192\.0\.2\.1 as", f"neighbor {self.router_address} as", text)
        # One router here, not two top-of-rack switches: the second session is left out.
        text = re.sub(r"protocol bgp tor_b from tor \{.*?\}\n", "", text, flags=re.S)
        path = self.root / "bird.conf"
        path.write_text(text)
        return path

    def start_bird(self) -> None:
        config = self.write_bird_config()
        self.bird = start_process(f"gw{self.number}-bird", self.namespace.argv(
            "bird", "-f", "-c", str(config), "-s", str(self.bird_socket), "-P", str(self.root / "bird.pid")),
            self.root / "bird.out")

    def start_health(self) -> None:
        self.health = start_process(f"gw{self.number}-health", self.namespace.argv(
            str(self.fleet.health_script)), self.root / "health.log",
            env={"BIRDC": shlex.join(self.birdc)})

    def announcing(self) -> bool:
        out = self.namespace.run(*self.birdc, "show", "protocols", "edge_service", check=False).stdout
        return any(line.split()[:1] == ["edge_service"] and line.split()[3] == "up" for line in out.splitlines()
                   if len(line.split()) > 3)

    def link(self, up: bool) -> None:
        self.namespace.ip("link", "set", "up0", "up" if up else "down")
        if up:
            # The kernel dropped the default route with the link; the gateway's network setup puts it back.
            self.namespace.ip("route", "replace", "default", "via", self.router_address)


class RoutedFleet:
    def __init__(self, root: Path, gateways: int = 3, per_subnet: int = 40, bfd: bool = True,
                 workers: tuple[int, ...] = (2, 1, 1), shutdown_delay: float | None = None,
                 health_script: Path = PACKAGING / "bird" / "edge-route-health", stop_post: bool = True) -> None:
        self.root = root
        self.prefix = f"e{uuid.uuid4().hex[:6]}"
        self.router = Namespace(f"{self.prefix}-r")
        self.instances = {name: Namespace(f"{self.prefix}-{name}") for name in SUBNETS}
        self.container = Namespace(f"{self.prefix}-c")
        self.per_subnet = per_subnet
        self.bfd = bfd
        self.shutdown_delay = shutdown_delay
        self.health_script = health_script
        self.stop_post = stop_post
        """Run edge.service's ExecStopPost when edge ends (benchmarks turn it off to measure without it)."""
        self.key_file = root / "token-keys"
        self.credential_process = root / "credentials"
        self.view_dir = root / "control-plane"
        self.document = fleet_view(per_subnet)
        self.expected = expected_ids(self.document)
        self.processes: list[Process] = []
        self.router_bird: Process | None = None
        self.control_plane: Process | None = None
        self.namespaces: list[Namespace] = []
        self.gateways = [GatewayNode(n + 1, Namespace(f"{self.prefix}-g{n + 1}"), root / f"gw{n + 1}", self,
                                     workers[n % len(workers)]) for n in range(gateways)]

    # -- building ------------------------------------------------------------------------------

    def build(self) -> None:
        self._files()
        for namespace in [self.router, *self.instances.values(), self.container, *(g.namespace for g in self.gateways)]:
            subprocess.run(["ip", "netns", "add", namespace.name], check=True, capture_output=True)
            self.namespaces.append(namespace)
            namespace.ip("link", "set", "lo", "up")
        self._router()
        for subnet, namespace in self.instances.items():
            self._instance_subnet(subnet, namespace)
        self._container()
        for gateway in self.gateways:
            self._gateway_links(gateway)
        self.router_bird = self._start(start_process("router-bird", self.router.argv(
            "bird", "-f", "-c", str(self._router_bird_config()), "-s", str(self.root / "router.ctl"),
            "-P", str(self.root / "router.pid")), self.root / "router-bird.out"))
        self.start_control_plane()
        for gateway in self.gateways:
            gateway.root.mkdir(parents=True, exist_ok=True)
            gateway.write_config(**({"shutdown_delay": self.shutdown_delay} if self.shutdown_delay is not None
                                    else {}))
            gateway.start_bird()
            self._start(gateway.bird)
            gateway.start_edge()
            gateway.start_health()
            self._start(gateway.health)

    def _start(self, process: Process | None) -> Process:
        assert process is not None
        self.processes.append(process)
        return process

    def _files(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        generated = subprocess.run([sys.executable, "-m", "edge", "keys", "generate", str(self.key_file)],
                                   capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert generated.returncode == 0, generated.stderr
        self.credential_process.write_text(CREDENTIAL_PROCESS.replace("{access}", ROLE_ACCESS_KEY))
        self.credential_process.chmod(0o755)
        self.view_dir.mkdir(exist_ok=True)
        self.publish(self.document)
        for namespace in (*self.instances.values(), self.container):
            # glibc's resolver in that namespace asks the anycast DNS address (ip netns exec bind-mounts this).
            etc = Path("/etc/netns") / namespace.name
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text(f"nameserver {DNS_ADDRESS}\nsearch {INTERNAL_DOMAIN}\n"
                                             "options timeout:1 attempts:3\n")

    def publish(self, document: dict) -> None:
        temporary = self.view_dir / "view.json.tmp"
        temporary.write_text(json.dumps(document))
        temporary.rename(self.view_dir / "view.json")

    def _router(self) -> None:
        router = self.router
        router.sysctl("net.ipv4.ip_forward=1")
        router.sysctl("net.ipv4.fib_multipath_hash_policy=1")
        router.ip("addr", "add", f"{CONTROL_ADDRESS}/32", "dev", "lo")

    def _instance_subnet(self, subnet: str, namespace: Namespace) -> None:
        prefix = SUBNETS[subnet]
        self.router.ip("link", "add", f"s{subnet}", "type", "veth", "peer", "name", "eth0", "netns", namespace.name)
        self.router.ip("addr", "add", f"{prefix}.1/24", "dev", f"s{subnet}")
        self.router.ip("link", "set", f"s{subnet}", "up")
        addresses = instance_addresses(subnet, self.per_subnet)
        for address in addresses:
            namespace.ip("addr", "add", f"{address}/24", "dev", "eth0")
        namespace.ip("link", "set", "eth0", "up")
        namespace.ip("route", "add", "default", "via", f"{prefix}.1", "src", addresses[0])

    def _container(self) -> None:
        """A namespace one hop behind instance A's first address, as a container behind its bridge."""
        host = self.instances["a"]
        host.sysctl("net.ipv4.ip_forward=1")
        host.ip("link", "add", "c0", "type", "veth", "peer", "name", "eth0", "netns", self.container.name)
        host.ip("addr", "add", "10.1.1.1/30", "dev", "c0")
        host.ip("link", "set", "c0", "up")
        self.container.ip("addr", "add", f"{CONTAINER_ADDRESS}/30", "dev", "eth0")
        self.container.ip("link", "set", "eth0", "up")
        self.container.ip("route", "add", "default", "via", "10.1.1.1")
        self.router.ip("route", "add", "10.1.1.0/30", "via", instance_addresses("a", 1)[0])

    def _gateway_links(self, gateway: GatewayNode) -> None:
        n, router, space = gateway.number, self.router, gateway.namespace
        # Router side: a bridge with the gateway's link and a spare port that keeps the bridge up.
        router.ip("link", "add", f"br{n}", "type", "bridge")
        router.ip("link", "add", f"g{n}", "type", "veth", "peer", "name", "up0", "netns", space.name)
        router.ip("link", "add", f"k{n}", "type", "veth", "peer", "name", f"kp{n}")
        for port in (f"g{n}", f"k{n}"):
            router.ip("link", "set", port, "master", f"br{n}")
            router.ip("link", "set", port, "up")
        router.ip("link", "set", f"kp{n}", "up")
        router.ip("addr", "add", f"{gateway.router_address}/29", "dev", f"br{n}")
        router.ip("link", "set", f"br{n}", "up")
        space.ip("addr", "add", f"{gateway.link_address}/29", "dev", "up0")
        space.ip("link", "set", "up0", "up")
        space.ip("route", "add", "default", "via", gateway.router_address)
        for address in (METADATA_ADDRESS, DNS_ADDRESS):
            space.ip("addr", "add", f"{address}/32", "dev", "lo")

    def _router_bird_config(self) -> Path:
        sessions = "".join(f"protocol bgp gw{g.number} from edge_gateways {{ neighbor {g.link_address} as 65021; }}\n"
                           for g in self.gateways)
        path = self.root / "router-bird.conf"
        path.write_text(f"""log "{self.root / 'router-bird.log'}" all;
router id {CONTROL_ADDRESS};
protocol device {{ scan time 10; }}
protocol kernel {{
    ipv4 {{ import none; export all; }};
    merge paths on;
}}
protocol bfd {{ }}
template bgp edge_gateways {{
    local as {ROUTER_AS};
    ipv4 {{ import all; export none; }};
    bfd {'on' if self.bfd else 'off'};
}}
{sessions}""")
        return path

    def start_control_plane(self) -> None:
        self.control_plane = self._start(start_process("control-plane", self.router.argv(
            sys.executable, "-m", "http.server", str(CONTROL_PORT), "--bind", CONTROL_ADDRESS,
            "--directory", str(self.view_dir)), self.root / "control-plane.log"))

    def stop_control_plane(self) -> None:
        if self.control_plane is not None:
            self.control_plane.stop()
            self.processes.remove(self.control_plane)
            self.control_plane = None

    # -- clients -------------------------------------------------------------------------------

    def start_storm(self, duration: float = 6.0, max_boots: int = 150, threads: int = 4) -> list[subprocess.Popen]:
        """A boot storm from both instance subnets (``tests/fleet/netns/boots.py``), ``max_boots`` from each."""
        expected = self.root / "expected.json"
        expected.write_text(json.dumps(self.expected))
        storms = []
        for subnet, namespace in self.instances.items():
            sources = ",".join(instance_addresses(subnet, self.per_subnet)[1:])
            storms.append(subprocess.Popen(namespace.argv(
                sys.executable, "-m", "tests.fleet.netns.boots", "--expected", str(expected), "--sources", sources,
                "--duration", str(duration), "--max-boots", str(max_boots), "--threads", str(threads)),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT))
        return storms

    @staticmethod
    def finish_storm(storms: list[subprocess.Popen], timeout: float = 120) -> dict:
        """The storms' reports merged: boots, failed_boots, failed_attempts, longest_gap, failures."""
        merged: dict = {"boots": 0, "failed_boots": 0, "requests": 0, "failed_attempts": 0, "longest_gap": 0.0,
                        "failures": [], "started": None, "finished": None}
        for storm in storms:
            out, err = storm.communicate(timeout=timeout)
            assert storm.returncode == 0, err
            report = json.loads(out)
            for key in ("boots", "failed_boots", "requests", "failed_attempts"):
                merged[key] += report[key]
            merged["longest_gap"] = max(merged["longest_gap"], report["longest_gap"])
            merged["failures"] += report["failures"]
            merged["started"] = min(filter(None, (merged["started"], report["started"])))
            merged["finished"] = max(filter(None, (merged["finished"], report["finished"])))
        merged["failures"].sort()
        return merged

    # -- observing -----------------------------------------------------------------------------

    def next_hops(self, address: str = METADATA_ADDRESS) -> list[str]:
        """The gateways the router's kernel sends ``address`` to."""
        out = subprocess.run(["ip", "-n", self.router.name, "route", "show", f"{address}/32"],
                             capture_output=True, text=True, timeout=10).stdout
        return sorted(re.findall(r"via ([0-9.]+)", out))

    def gateway_hops(self) -> list[str]:
        return sorted(g.link_address for g in self.gateways)

    def wait_routes(self, expected: list[str], timeout: float = 30.0) -> float:
        """Seconds until the router's table holds exactly ``expected`` next hops (both service addresses)."""
        began = time.monotonic()
        deadline = began + timeout
        while time.monotonic() < deadline:
            if self.next_hops() == sorted(expected) and self.next_hops(DNS_ADDRESS) == sorted(expected):
                return time.monotonic() - began
            time.sleep(0.01)
        raise AssertionError(f"router next hops {self.next_hops()} != {sorted(expected)} after {timeout}s\n"
                             + self.diagnostics())

    def diagnostics(self) -> str:
        parts = []
        for gateway in self.gateways:
            parts.append(f"--- gw{gateway.number} edge.log\n{gateway.edge_log()[-2000:]}")
            try:
                parts.append(f"--- gw{gateway.number} health.log\n{(gateway.root / 'health.log').read_text()[-1000:]}")
            except OSError:
                pass
        return "\n".join(parts)

    # -- teardown ------------------------------------------------------------------------------

    def close(self) -> None:
        for gateway in self.gateways:
            if gateway.edge is not None:
                gateway.edge.stop()
        for process in reversed(self.processes):
            process.stop()
        for gateway in self.gateways:
            if gateway._watcher is not None:
                gateway._watcher.join(10)
        for namespace in self.namespaces:
            subprocess.run(["ip", "netns", "delete", namespace.name], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / namespace.name, ignore_errors=True)
        for namespace in (*self.instances.values(), self.container):
            shutil.rmtree(Path("/etc/netns") / namespace.name, ignore_errors=True)
