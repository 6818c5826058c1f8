"""Each peer's configuration at its documented best for the benchmark's workload, written once.

Every comparison edge is measured in starts its peers from these functions, so
the settings shown in bench/RESULTS.md's peer-configuration table
(``SETTINGS`` below, rendered by ``settings_table``) are the settings that ran.
The rules, from each peer's own manual:

* one server process or thread per peer, as edge runs one worker
  (``SERVERS``), all pinned to the same server core;
* no rate limiting anywhere: the load comes from one source address, which
  any per-source limit (edge's ``dns.rate_limit``/``metadata.rate``, NSD's
  RRL, Knot's ``mod-rrl``) would throttle;
* the same socket buffers where the server lets us set them (edge's
  ``dns.udp_receive_buffer`` is 4 MiB; NSD's ``receive-buffer-size``), so a
  burst queues in the kernel instead of being dropped;
* caches large enough for every name asked (dnsmasq's ``cache-size``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

SERVERS = 1
"""Server processes (or UDP threads) per peer: edge runs ``--workers 1`` in every peer comparison."""

SOCKET_BUFFER = 4 * 1024 * 1024
"""Bytes: edge's default ``dns.udp_receive_buffer``; the peers that let us set one get the same."""

DNSMASQ_CACHE = 10000
"""dnsmasq's hard limit (man dnsmasq, NOTES: "the hard limit is 10000 names"); 1,000 forwarded names fit."""

DNSPERF_OUTSTANDING = 100
"""dnsperf ``-q``: queries in flight.  Enough to keep a one-thread server busy at 400k qps with 0.25 ms
round trips (Little's law: 100), few enough that every burst fits a 208 KiB default socket buffer, the
only one dnsmasq can have (it has no buffer option)."""


@dataclass(frozen=True, slots=True)
class Setting:
    """One option of one peer: what it is set to and why, with the manual that documents it."""

    peer: str
    option: str
    value: str
    why: str
    manual: str


SETTINGS: tuple[Setting, ...] = (
    Setting("edge", "--workers", str(SERVERS), "one worker, as every peer runs one server", "README, One gateway"),
    Setting("edge", "dns.rate_limit", "0", "per-source limit off: all load is one address", "README, Configuration"),
    Setting("edge", "metadata.rate", "0", "per-instance limit off: all load is one instance",
            "README, Configuration"),
    Setting("NSD", "server-count", str(SERVERS), "one server process", "nsd.conf(5)"),
    Setting("NSD", "reuseport", "yes", "SO_REUSEPORT socket per server, as edge's workers", "nsd.conf(5)"),
    Setting("NSD", "rrl-ratelimit", "0", "response rate limiting off (Debian builds NSD with RRL on at 200 qps)",
            "nsd.conf(5)"),
    Setting("NSD", "rrl-whitelist-ratelimit", "0", "the whitelist limit off too, so no RRL processing at all",
            "nsd.conf(5)"),
    Setting("NSD", "receive-buffer-size / send-buffer-size", str(SOCKET_BUFFER), "edge's UDP buffer size",
            "nsd.conf(5)"),
    Setting("NSD", "verbosity", "0", "no per-query logging", "nsd.conf(5)"),
    Setting("NSD", "control-enable / control-interface", "yes / a unix socket", "to read NSD's own counters "
            "(num.rxerr, num.txerr, num.dropped) around each counted run; served by NSD's xfrd process, not the "
            "server process", "nsd.conf(5), nsd-control(8)"),
    Setting("Knot DNS", "udp-workers", str(SERVERS), "one UDP thread", "knot.conf(5)"),
    Setting("Knot DNS", "thread affinity", "every thread on the server core (taskset -a after start)",
            "knotd pins UDP worker N to CPU N itself, over the affinity it was started with: on two cores its "
            "only worker landed on the generator's core", "knotd source (udp-handler.c, udp_master), taskset(1)"),
    Setting("Knot DNS", "tcp-workers / background-workers", "1", "no extra threads competing for the core",
            "knot.conf(5)"),
    Setting("Knot DNS", "module", "none (no mod-rrl)", "no response rate limiting", "knot.conf(5), Modules"),
    Setting("Knot DNS", "zonefile-load / journal-content", "whole / none", "zones served from memory, no journal",
            "knot.conf(5)"),
    Setting("dnsmasq", "--cache-size", str(DNSMASQ_CACHE), "every forwarded name stays cached (hard limit)",
            "dnsmasq(8)"),
    Setting("dnsmasq", "--no-resolv --no-hosts --server", "upstream 127.0.0.1", "forwards to the same upstream "
            "dnsmasq as edge's forwarded test, nothing else", "dnsmasq(8)"),
    Setting("dnsmasq", "--dns-forward-max", "1000", "forwarding never refused while the cache fills",
            "dnsmasq(8)"),
    Setting("dnsmasq", "host-record / ptr-record", "every A and PTR", "local hits answered from configuration, "
            "like edge's view", "dnsmasq(8)"),
    Setting("nginx", "worker_processes / master_process", "1 / off", "one process", "nginx core module"),
    Setting("nginx", "access_log", "off", "no per-request logging", "ngx_http_log_module"),
    Setting("nginx", "keepalive_requests", "100000000", "a keep-alive connection is never closed by count",
            "ngx_http_core_module"),
    Setting("nginx", "listen ... reuseport", "on", "as edge's listeners", "ngx_http_core_module"),
    Setting("nginx", "return 200", "the answer", "floor: one fixed answer", "ngx_http_rewrite_module"),
    Setting("nginx", "map $remote_addr", "1,000 addresses", "realistic static peer: the answer depends on the "
            "source address, as an instance's metadata does", "ngx_http_map_module"),
    Setting("dnsperf", "-c / -q / -t", f"4 / {DNSPERF_OUTSTANDING} / 2 s", "one generator thread's sockets, "
            "queries in flight, timeout", "dnsperf(1)"),
    Setting("wrk", "-t / -c", "1 / 64 (keep-alive), 1 / 32 (new connection)", "one generator thread",
            "wrk README"),
)


def settings_table(settings: Iterable[Setting] = SETTINGS) -> str:
    """The peer-configuration table of bench/RESULTS.md and of every report."""
    lines = ["| peer | option | value | why | documented in |", "|---|---|---|---|---|"]
    lines += [f"| {s.peer} | `{s.option}` | {s.value} | {s.why} | {s.manual} |" for s in settings]
    return "\n".join(lines)


# -- DNS ---------------------------------------------------------------------------------------------

def nsd_conf(directory: Path, port: int, zones: Iterable[str], servers: int = SERVERS) -> str:
    """nsd.conf serving ``zones`` (files ``APEX.zone`` in ``directory``) on 127.0.0.1:``port``, RRL off."""
    return (
        "server:\n"
        f"  ip-address: 127.0.0.1@{port}\n"
        f"  port: {port}\n"
        "  do-ip6: no\n"
        f"  server-count: {servers}\n"
        "  reuseport: yes\n"
        "  rrl-ratelimit: 0\n"
        "  rrl-whitelist-ratelimit: 0\n"
        f"  receive-buffer-size: {SOCKET_BUFFER}\n"
        f"  send-buffer-size: {SOCKET_BUFFER}\n"
        '  username: ""\n'
        '  chroot: ""\n'
        f'  zonesdir: "{directory}"\n'
        '  database: ""\n'
        f'  zonelistfile: "{directory}/zone.list"\n'
        f'  xfrdfile: "{directory}/xfrd.state"\n'
        f'  pidfile: "{directory}/nsd.pid"\n'
        f'  logfile: "{directory}/nsd.log"\n'
        "  verbosity: 0\n"
        "remote-control:\n"
        "  control-enable: yes\n"
        f"  control-interface: {directory}/nsd.ctl\n"
        + "".join(f"zone:\n  name: {apex}\n  zonefile: {apex}.zone\n" for apex in zones))


def write_nsd(directory: Path, port: int, zone_texts: Mapping[str, str], servers: int = SERVERS) -> Path:
    """Zone files and nsd.conf in ``directory``; returns the configuration's path."""
    directory.mkdir(parents=True, exist_ok=True)
    for apex, text in zone_texts.items():
        (directory / f"{apex}.zone").write_text(text)
    conf = directory / "nsd.conf"
    conf.write_text(nsd_conf(directory, port, zone_texts, servers))
    return conf


def knot_conf(directory: Path, port: int, zones: Iterable[str], servers: int = SERVERS) -> str:
    """knot.conf serving ``zones`` from ``directory`` on 127.0.0.1@``port``: no modules, so no RRL."""
    return (
        f"server:\n    listen: 127.0.0.1@{port}\n    rundir: {directory}\n    udp-workers: {servers}\n"
        "    tcp-workers: 1\n    background-workers: 1\n"
        f"database:\n    storage: {directory}\n"
        "log:\n  - target: stderr\n    any: error\n"
        f"template:\n  - id: default\n    storage: {directory}\n    file: \"%s.zone\"\n    journal-content: none\n"
        "    zonefile-sync: -1\n    zonefile-load: whole\n"
        "zone:\n" + "".join(f"  - domain: {apex}\n" for apex in zones))


def write_knot(directory: Path, port: int, zone_texts: Mapping[str, str], servers: int = SERVERS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for apex, text in zone_texts.items():
        (directory / f"{apex}.zone").write_text(text)
    conf = directory / "knot.conf"
    conf.write_text(knot_conf(directory, port, zone_texts, servers))
    return conf


def dnsmasq_local_args() -> tuple[str, ...]:
    """Extra dnsmasq options for local hits (answers from host-record lines)."""
    return (f"--cache-size={DNSMASQ_CACHE}",)


def dnsmasq_forwarding_lines(upstream_port: int) -> list[str]:
    """dnsmasq configuration lines of the forwarding peer: the same upstream as edge's ``dns.upstreams``."""
    return [f"server=127.0.0.1#{upstream_port}"]


def dnsmasq_forwarding_args() -> tuple[str, ...]:
    return (f"--cache-size={DNSMASQ_CACHE}", "--dns-forward-max=1000")


# -- HTTP --------------------------------------------------------------------------------------------

NGINX_MODES = ("return", "map")


def nginx_conf(directory: Path, port: int, body: str, mode: str = "return",
               addresses: Mapping[str, str] | None = None) -> str:
    """nginx.conf, one process, answering ``body`` to every request.

    ``mode="return"``: ``return 200 "body"``, the floor.  ``mode="map"``: the answer comes
    from a ``map`` of the client's address (``addresses``, which must give ``body`` for
    127.0.0.1), as a static metadata server would be configured.
    """
    if mode not in NGINX_MODES:
        raise ValueError(f"nginx mode {mode!r} is not one of {NGINX_MODES}")
    if mode == "map":
        table = dict(addresses or {})
        table.setdefault("127.0.0.1", body)
        entries = "".join(f"        {address} \"{answer}\";\n" for address, answer in table.items())
        maps = (f"    map_hash_max_size {max(2048, 2 * len(table))};\n"
                f"    map $remote_addr $instance_id {{\n        default \"\";\n{entries}    }}\n")
        answer = 'return 200 "$instance_id"'
    else:
        maps = ""
        answer = f'return 200 "{body}"'
    return f"""
worker_processes {SERVERS};
master_process off;
daemon off;
pid {directory}/nginx-{port}.pid;
error_log {directory}/nginx-{port}-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    server_tokens off;
    client_body_temp_path {directory}/nginx-body;
    proxy_temp_path {directory}/nginx-proxy;
    fastcgi_temp_path {directory}/nginx-fastcgi;
    uwsgi_temp_path {directory}/nginx-uwsgi;
    scgi_temp_path {directory}/nginx-scgi;
{maps}    server {{
        listen 127.0.0.1:{port} reuseport;
        default_type text/plain;
        location / {{ {answer}; }}
    }}
}}
"""


def instance_addresses(count: int, body: str) -> dict[str, str]:
    """``count`` source addresses and instance ids for the ``map`` peer; 127.0.0.1 answers ``body``."""
    table = {"127.0.0.1": body}
    for number in range(1, count):
        table[f"10.{number // 65536 % 256}.{number // 256 % 256}.{number % 256}"] = f"i-{number:017x}"
    return table
