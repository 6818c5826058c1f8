"""A real etcd member on loopback for tests, and a recording proxy to watch what clients ask it."""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import signal
import socket
import ssl
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


@dataclass(frozen=True)
class Tls:
    ca_file: Path
    cert_file: Path
    key_file: Path
    client_cert_file: Path
    """A client certificate signed by the same CA, for the test's own calls."""
    client_key_file: Path
    gateway_cert_file: Path
    """The client certificate a gateway presents."""
    gateway_key_file: Path
    client_cert_auth: bool = False
    """Start etcd with ``--client-cert-auth``: clients must present a certificate of the CA."""


def make_tls(directory: Path, client_cert_auth: bool = False) -> Tls:
    """A private CA, a server certificate for 127.0.0.1 and a client certificate signed by it."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge test etcd CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    def client_certificate(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        client_key = ec.generate_private_key(ec.SECP256R1())
        return (x509.CertificateBuilder()
                # No common name: with authentication on, etcd's JSON gateway refuses a client
                # certificate that has one (it cannot pass the name on as the user).
                .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)]))
                .issuer_name(ca_name).public_key(client_key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256())), client_key

    client, client_key = client_certificate("root")
    gateway, gateway_key = client_certificate("gateway")
    directory.mkdir(parents=True, exist_ok=True)
    tls = Tls(directory / "ca.pem", directory / "server.pem", directory / "server.key",
              directory / "client.pem", directory / "client.key", directory / "gateway.pem",
              directory / "gateway.key", client_cert_auth)

    def private(path: Path, private_key: ec.EllipticCurvePrivateKey) -> None:
        path.write_bytes(private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))

    tls.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    tls.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    private(tls.key_file, key)
    tls.client_cert_file.write_bytes(client.public_bytes(serialization.Encoding.PEM))
    private(tls.client_key_file, client_key)
    tls.gateway_cert_file.write_bytes(gateway.public_bytes(serialization.Encoding.PEM))
    private(tls.gateway_key_file, gateway_key)
    return tls


class EtcdServer:
    """One-member cluster on 127.0.0.1 with its own data directory; restartable on the same ports."""

    def __init__(self, data_dir: Path, tls: Tls | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.tls = tls
        self.extra_args = extra_args
        self.client_port = free_port()
        self.peer_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self.root_password = ""
        """Set by :meth:`enable_auth`: the test's own calls then log in as root."""

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def url(self, key: str) -> str:
        return f"{'etcds' if self.tls else 'etcd'}://{self.endpoint}/{key}"

    def _context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        context = ssl.create_default_context(cafile=str(self.tls.ca_file))
        context.load_cert_chain(str(self.tls.client_cert_file), str(self.tls.client_key_file))
        return context

    def start(self, timeout: float = 20.0) -> None:
        client = f"{self.scheme}://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        tls = ["--cert-file", str(self.tls.cert_file), "--key-file", str(self.tls.key_file)] if self.tls else []
        if self.tls is not None and self.tls.client_cert_auth:
            tls += ["--client-cert-auth", "--trusted-ca-file", str(self.tls.ca_file)]
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [ETCD, "--name", "default", "--data-dir", str(self.data_dir),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"default={peer}", "--log-level", "warn", *tls, *self.extra_args],
            stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.process.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{client}/health", timeout=1, context=self._context()) as response:
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

    def call(self, path: str, request: dict, token: str | None = None) -> dict:
        if token is None and self.root_password:
            token = self.login("root", self.root_password)
        body = json.dumps(request).encode()
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = token
        req = urllib.request.Request(f"{self.scheme}://{self.endpoint}{path}", data=body, method="POST",
                                     headers=headers)
        with urllib.request.urlopen(req, timeout=5, context=self._context()) as response:
            return json.loads(response.read())

    def login(self, name: str, password: str) -> str:
        return self.call("/v3/auth/authenticate", {"name": name, "password": password}, token="")["token"]

    def add_reader(self, user: str, password: str, prefix: str) -> None:
        """A user whose one role may read every key under ``prefix`` (etcdctl user add, role add,
        role grant-permission --prefix read, user grant-role)."""
        role = f"{user}-reader"
        self.call("/v3/auth/user/add", {"name": user, "password": password})
        self.call("/v3/auth/role/add", {"name": role})
        self.call("/v3/auth/role/grant", {"name": role, "perm": {
            "permType": "READ", "key": _b64(prefix.encode()), "range_end": _b64(_prefix_end(prefix.encode()))}})
        self.call("/v3/auth/user/grant", {"user": user, "role": role})

    def enable_auth(self, root_password: str) -> None:
        """A root user (etcd requires one) and ``auth enable``; later calls log in as root."""
        self.call("/v3/auth/user/add", {"name": "root", "password": root_password})
        self.call("/v3/auth/user/grant", {"user": "root", "role": "root"})
        self.call("/v3/auth/enable", {})
        self.root_password = root_password

    def forget_tokens(self) -> None:
        """``auth disable`` and ``auth enable`` again: every token handed out so far is invalid."""
        self.call("/v3/auth/disable", {})
        self.call("/v3/auth/enable", {}, token="")

    def put(self, key: str, value: bytes | str) -> int:
        """Write through the JSON gateway, as a control plane would; the new revision."""
        raw = value.encode() if isinstance(value, str) else value
        answer = self.call("/v3/kv/put", {"key": _b64(key.encode()), "value": _b64(raw)})
        return int(answer["header"]["revision"])

    def delete(self, key: str) -> None:
        self.call("/v3/kv/deleterange", {"key": _b64(key.encode())})


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


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
                if self.path == "/v3/watch" and proxy.mode == "forward":
                    self._relay_stream(body)  # streamed through as it comes, and not recorded
                    return
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

            def _relay_stream(self, body: bytes) -> None:
                host, _, port = proxy.target.rpartition(":")
                upstream = http.client.HTTPConnection(host, int(port), timeout=None)
                try:
                    upstream.request("POST", self.path, body=body, headers={"Content-Type": "application/json"})
                    response = upstream.getresponse()
                    self.send_response(response.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    while chunk := response.read1(65536):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    pass
                finally:
                    upstream.close()

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


class TcpProxy:
    """A byte-level proxy in front of a member, for streams (watches) the recording proxy cannot carry.

    ``freeze()`` holds what the member sends (a watch that stalls), ``inject()`` sends
    bytes of its own to every client (garbage in a stream), ``cut()`` closes every
    connection (a watch that breaks).
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._pairs: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        self._lock = threading.Lock()
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            thawed = threading.Event()
            thawed.set()
            with self._lock:
                self._pairs.append((client, upstream, thawed))
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, thawed), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, thawed: threading.Event | None) -> None:
        try:
            while data := source.recv(65536):
                if thawed is not None:
                    thawed.wait()
                with self._lock:
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def freeze(self) -> None:
        """Hold what the member sends on the connections open now (later ones flow)."""
        with self._lock:
            for _, _, thawed in self._pairs:
                thawed.clear()

    def thaw(self) -> None:
        with self._lock:
            for _, _, thawed in self._pairs:
                thawed.set()

    def inject(self, data: bytes) -> None:
        with self._lock:
            for client, _, _ in self._pairs:
                try:
                    client.sendall(data)
                except OSError:
                    pass

    def cut(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for client, upstream, thawed in pairs:
            thawed.set()
            for end in (client, upstream):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                end.close()

    def close(self) -> None:
        self._listener.close()
        self.cut()
