"""The classic design edge replaces, for the boot storm: nginx in front of a slow metadata service.

In the classic layout every metadata request crosses a proxy on the node
(nginx here, one worker) to a central metadata service that looks the caller
up and answers; DNS comes from a dnsmasq with one ``host-record`` per instance
that forwards everything else.  The central service is modelled by
:func:`serve_upstream`: it answers the same EC2 paths for the same instances
(the caller is named by ``X-Real-IP``, which nginx sets, or by
``X-Forwarded-For`` when edge asks it for credentials), holds each request
for ``delay`` seconds, and handles at most ``workers`` requests at a time, like
a service with a fixed worker thread pool doing a database round trip per
request.  Both knobs are printed with the results.

    python -m bench.classic upstream --view VIEW.json [--delay-ms 10] [--workers 64]

prints ``port=N`` once listening and serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench.common import CorePlan, free_port, read_port_line, start_dnsmasq, wait_tcp

if TYPE_CHECKING:
    from edge.metadata.tree import Directory
    from edge.view.snapshot import Snapshot

ROOT = Path(__file__).resolve().parent.parent

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed"}
_CREDENTIALS = json.dumps({
    "Code": "Success", "LastUpdated": "2026-11-24T08:00:00Z", "Type": "AWS-HMAC",
    "AccessKeyId": "ASIACLASSIC", "SecretAccessKey": "classic-secret", "Token": "classic-token",
    "Expiration": "2099-01-01T00:00:00Z",
}, indent=2).encode()


@dataclass(slots=True)
class UpstreamState:
    """The metadata service's own data: the view's instances and the tokens it handed out."""

    snapshot: Snapshot
    trees: dict[str, Directory] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)


def _response(status: int, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def answer(state: UpstreamState, method: str, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """What the central service answers (pure apart from the token table)."""
    from edge.metadata.tree import VERSION_LISTING, CredentialsLeaf, Directory, Leaf, resolve, split_path, version_root

    # nginx names the caller in X-Real-IP; edge's http credential source in X-Forwarded-For.
    caller = headers.get("x-real-ip") or headers.get("x-forwarded-for", "").split(",")[0].strip()
    attachment = state.snapshot.attachment_for("", caller)
    if attachment is None:
        return 404, b"unknown instance"
    parts = split_path(target.encode())
    if parts is None:
        return 400, b"bad path"
    if method == "PUT":
        if parts != ["latest", "api", "token"]:
            return 405, b""
        token = secrets.token_urlsafe(32)
        state.tokens[token] = caller
        return 200, token.encode()
    if method != "GET":
        return 405, b""
    presented = headers.get("x-aws-ec2-metadata-token")
    if presented is not None and state.tokens.get(presented) != caller:
        return 401, b""
    if not parts:
        return 200, VERSION_LISTING
    if parts[0] != "latest":
        return 404, b""
    instance = attachment.instance
    tree = state.trees.get(instance.id)
    if tree is None:
        tree = state.trees[instance.id] = version_root(instance, state.snapshot)
    node = resolve(tree, parts[1:])
    if isinstance(node, Directory):
        return 200, node.listing
    if isinstance(node, Leaf):
        return 200, node.body
    if isinstance(node, CredentialsLeaf):
        return 200, _CREDENTIALS
    return 404, b""


async def serve_upstream(view_path: Path, host: str, port: int, delay: float, workers: int) -> None:
    from edge.view.formats import decode_view
    from edge.view.snapshot import build_snapshot

    state = UpstreamState(build_snapshot(decode_view(view_path.read_bytes())))
    pool = asyncio.Semaphore(workers)

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0") or 0)
                if length:
                    await reader.readexactly(length)
                async with pool:
                    await asyncio.sleep(delay)
                    status, body = answer(state, method, target, headers)
                writer.write(_response(status, body))
                if headers.get("connection", "").lower() == "close":
                    await writer.drain()
                    return
        except (ConnectionError, ValueError):
            return
        finally:
            writer.close()

    server = await asyncio.start_server(connection, host, port, backlog=4096)
    print(f"port={server.sockets[0].getsockname()[1]}", flush=True)
    # SIGTERM keeps its default action: the stand-in has nothing to flush.
    await server.serve_forever()


# -- the whole classic stack -------------------------------------------------------------------

@dataclass(slots=True)
class ClassicStack:
    """Running processes of the classic design and where they listen."""

    metadata_port: int
    dns_port: int
    processes: list[subprocess.Popen]
    server_pids: list[int]
    commands: list[str]


def nginx_conf(directory: Path, port: int, upstream_port: int) -> str:
    return f"""
worker_processes 1;
master_process off;
daemon off;
pid {directory}/nginx.pid;
error_log {directory}/nginx-error.log error;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    server_tokens off;
    client_body_temp_path {directory}/nginx-body;
    proxy_temp_path {directory}/nginx-proxy;
    fastcgi_temp_path {directory}/nginx-fastcgi;
    uwsgi_temp_path {directory}/nginx-uwsgi;
    scgi_temp_path {directory}/nginx-scgi;
    upstream metadata {{
        server 127.0.0.1:{upstream_port};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://metadata;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_read_timeout 60s;
        }}
    }}
}}
"""


def dnsmasq_lines(document: dict, forward_zone: str, forward_port: int) -> list[str]:
    """One host-record per instance address of the flat network (dnsmasq derives the PTRs), plus forwarding."""
    internal = document["cloud"]["internal_domain"]
    template = document["cloud"]["private_name_template"]
    lines = []
    for instance in document["instances"]:
        for interface in instance["interfaces"]:
            if interface["network"] != "":
                continue
            for address in interface["private_ips"]:
                label = template.replace("{ip}", address.replace(".", "-"))
                lines.append(f"host-record={label}.{internal},{address}")
    lines.append(f"server=/{forward_zone}/127.0.0.1#{forward_port}")
    return lines


def start_upstream(view_path: Path, cores: CorePlan, delay: float, workers: int) -> tuple[subprocess.Popen, int, str]:
    """The slow central metadata service on the server cores: (process, port, command)."""
    argv = cores.pin_server([sys.executable, "-m", "bench.classic", "upstream", "--view", str(view_path),
                             "--delay-ms", f"{delay * 1000:g}", "--workers", str(workers)])
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    return process, read_port_line(process, "classic metadata upstream"), " ".join(argv)


def start_classic(document: dict, view_path: Path, directory: Path, cores: CorePlan, forward_zone: str,
                  forward_port: int, delay: float, workers: int) -> ClassicStack:
    """nginx -> upstream metadata service, and dnsmasq, all pinned to the server cores."""
    processes: list[subprocess.Popen] = []
    commands: list[str] = []
    try:
        upstream, upstream_port, command = start_upstream(view_path, cores, delay, workers)
        processes.append(upstream)
        commands.append(command)

        port = free_port()
        conf = directory / "classic-nginx.conf"
        conf.write_text(nginx_conf(directory, port, upstream_port))
        nginx_argv = cores.pin_server(["nginx", "-p", str(directory), "-c", str(conf)])
        processes.append(subprocess.Popen(nginx_argv, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        commands.append(" ".join(nginx_argv) + f"   # reverse proxy to 127.0.0.1:{upstream_port}")
        wait_tcp(port)

        dns_port = free_port()
        dnsmasq = start_dnsmasq(dnsmasq_lines(document, forward_zone, forward_port), directory, dns_port,
                                cores.pin_server([]), ("--cache-size=10000",))
        processes.append(dnsmasq)
        commands.append(f"taskset -c {cores.server_list} dnsmasq --port={dns_port} --cache-size=10000 "
                        "(one host-record per instance, forwarding the upstream zone)")
        return ClassicStack(port, dns_port, processes, [p.pid for p in processes], commands)
    except BaseException:
        for process in processes:
            process.kill()
            process.wait()
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    upstream = commands.add_parser("upstream", help="run the slow central metadata service")
    upstream.add_argument("--view", type=Path, required=True)
    upstream.add_argument("--listen", default="127.0.0.1:0")
    upstream.add_argument("--delay-ms", type=float, default=10.0)
    upstream.add_argument("--workers", type=int, default=64)
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    import uvloop
    uvloop.run(serve_upstream(args.view, host, int(port), args.delay_ms / 1000, max(1, args.workers)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
