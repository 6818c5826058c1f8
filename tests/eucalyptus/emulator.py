"""A Eucalyptus controller's metadata service, written from its source, for edge to be compared against.

Read in ``Corymbia/eucalyptus`` (the maintained fork; 4.x in ``eucalyptus/eucalyptus`` serves
the same maps):

* ``clc/modules/compute-backend/src/main/java/com/eucalyptus/compute/metadata/MetadataPipeline.java``:
  which URIs it takes, ``Euca-Instance-Id`` honoured only from 127.0.0.1 (and only when it looks
  like an instance id), every version stripped to the same request, ``/`` answered with its own
  version list, "System is still starting up" (200) before bootstrap finishes, a fixed XHTML page
  with 404 for anything that fails, ``Content-Type: text/plain`` and ``Connection: close`` always.
* ``.../compute/metadata/VmMetadata.java``: an instance id is honoured only in VPC mode and a
  source address only in EC2-Classic (EDGE) mode; addresses are looked up public first, then
  private; the top listing names the endpoints that answer.
* ``.../vm/MetadataRequest.java``: repeated slashes collapse; the first segment picks the endpoint.
* ``.../vm/VmInstanceMetadata.java``: the maps per group (core, network, block devices, IAM,
  public keys, dynamic, identity), their listings (``addListingEntries``), lookups with and
  without a trailing slash, upper-case ``mac``, addresses as hostnames unless
  ``use_instance_dns``, ``0.0.0.0`` for no public address, the identity document (version
  ``2010-08-31``, architecture defaulting to ``x86_64``) signed SHA1withRSA, base64 in lines of 76.

This is written independently of edge's own profile code so that it can disagree with it.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from xml.etree import ElementTree

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

VERSIONS = ("1.0", "2007-01-19", "2007-03-01", "2007-08-29", "2007-10-10", "2007-12-15", "2008-02-01",
            "2008-09-01", "2009-04-04", "2011-01-01", "2011-05-01", "2012-01-12", "2014-02-25", "latest")
ERROR_PAGE = ('<?xml version="1.0" encoding="iso-8859-1"?>\n'
              '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"\n'
              '         "http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">\n'
              '<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">\n'
              ' <head>\n  <title>404 - Not Found</title>\n </head>\n'
              ' <body>\n  <h1>404 - Not Found</h1>\n </body>\n</html>\n').encode()
ACCEPTS = re.compile(r"/latest(/.*)*|/\d\d\d\d-\d\d-\d\d/.*|/1.0/.*")
INSTANCE_ID = re.compile(r"i-[0-9a-fA-F]{8}(?:[0-9a-fA-F]{9})?")
STARTING = b"System is still starting up"


class NoSuchElement(Exception):
    pass


@dataclass
class Nic:
    id: str
    mac: str
    device_index: int
    private_ip: str
    public_ip: str | None
    owner: str
    group_ids: list[str]
    group_names: list[str]
    subnet: str
    subnet_cidr: str
    vpc: str
    vpc_cidr: str


@dataclass
class VmRecord:
    """What the controller's database holds for one instance (GNI facts plus its own)."""

    id: str
    private_ip: str
    public_ip: str
    mac: str
    owner: str
    zone: str
    group_names: list[str]
    nics: list[Nic] = field(default_factory=list)
    image_id: str = "emi-12345678"
    instance_type: str = "m1.small"
    reservation_id: str = "r-12345678"
    launch_index: int = 0
    kernel_id: str | None = None
    ramdisk_id: str | None = None
    key_name: str | None = None
    public_key: str = ""
    user_data: bytes | None = None
    monitoring: bool = False
    created: str = "2026-12-01T10:00:00.000Z"
    manifest: str = "bucket/image.manifest.xml"


@dataclass
class Cloud:
    vpc: bool
    dns_domain: str = "cloud.example"
    use_instance_dns: bool = False
    version: str = "5"
    region: str = "eucalyptus"
    instance_subdomain: str = ".compute"
    private_prefix: str = "ip-"
    public_prefix: str = "ec2-"

    def dns_name(self, address: str, public: bool) -> str:
        """``VmInstances.generateDnsName``/``dnsName`` (4.x: always ``euca-``, subdomain ``.eucalyptus``)."""
        if address == "0.0.0.0":
            return ""
        if self.version == "4":
            prefix, subdomain = "euca-", ".eucalyptus"
        else:
            prefix, subdomain = (self.public_prefix if public else self.private_prefix), self.instance_subdomain
        return prefix + address.replace(".", "-") + subdomain + "." + (self.dns_domain if public else "internal")


def records_from_gni(document: bytes, group_names: dict[str, str]) -> list[VmRecord]:
    """The instances of a GNI, as the controller's database would hold them (group ids -> names)."""
    root = ElementTree.fromstring(document)
    vpc_cidr: dict[str, str] = {}
    subnet_cidr: dict[str, str] = {}
    for vpc in root.iter("vpc"):
        vpc_cidr[vpc.get("name", "")] = vpc.findtext("cidr", "")
        for subnet in vpc.iter("subnet"):
            subnet_cidr[subnet.get("name", "")] = subnet.findtext("cidr", "")
    zones: dict[str, str] = {}
    for cluster in root.iter("cluster"):
        for node in cluster.iter("node"):
            for value in node.iter("value"):
                zones[(value.text or "").strip()] = cluster.get("name", "")
    records = []
    holder = root.find("instances")
    for element in holder.findall("instance") if holder is not None else []:
        instance_id = element.get("name", "")
        groups = [(v.text or "").strip() for v in element.findall("securityGroups/value")]
        nics = []
        for nic in element.findall("networkInterfaces/networkInterface"):
            public = nic.findtext("publicIp", "").strip()
            nics.append(Nic(nic.get("name", ""), nic.findtext("macAddress", "").strip(),
                            int(nic.findtext("deviceIndex", "0")), nic.findtext("privateIp", "").strip(),
                            None if public in ("", "0.0.0.0") else public, nic.findtext("ownerId", "").strip(),
                            [(v.text or "").strip() for v in nic.findall("securityGroups/value")],
                            [group_names.get((v.text or "").strip(), "") for v in nic.findall("securityGroups/value")],
                            nic.findtext("subnet", "").strip(), subnet_cidr.get(nic.findtext("subnet", ""), ""),
                            nic.findtext("vpc", "").strip(), vpc_cidr.get(nic.findtext("vpc", ""), "")))
        public = element.findtext("publicIp", "").strip() or "0.0.0.0"
        subnet_zone = {s.get("name", ""): s.findtext("cluster", "") for s in root.iter("subnet")}
        zone = zones.get(instance_id) or subnet_zone.get(element.findtext("subnet", ""), "") or ""
        records.append(VmRecord(instance_id, element.findtext("privateIp", "").strip(), public,
                                element.findtext("macAddress", "").strip(), element.findtext("ownerId", "").strip(),
                                zone, sorted(group_names.get(g, g) for g in groups), nics))
    return records


def _listing_entries(entries: dict[str, str], roots: list[str] | None = None) -> dict[str, str]:
    """``MetadataGroup.addListingEntries``."""
    listing: dict[str, set[str]] = {}
    for path in list(entries):
        segments = path.split("/")
        for i, segment in enumerate(segments):
            listing.setdefault("/".join(segments[:i]), set()).add(segment + ("/" if i < len(segments) - 1 else ""))
    for root in roots or []:
        listing.setdefault("", set()).add(root + "/")
    for key in sorted(listing):
        values = sorted(v for v in listing[key] if v + "/" not in listing[key])
        if key not in entries:
            entries[key] = "\n".join(values)
        elif key + "/" not in entries:
            entries[key + "/"] = "\n".join(values)
    return entries


class Controller:
    """The metadata service of one cloud controller, on a loopback port."""

    def __init__(self, cloud: Cloud, records: list[VmRecord]) -> None:
        self.cloud = cloud
        self.records = {r.id: r for r in records}
        self.starting = False
        self.asked: list[tuple[str, str]] = []
        """(who, uri) per request: who is the instance id or address the controller identified by."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "eucalyptus")])
        import datetime
        now = datetime.datetime.now(datetime.UTC)
        self.key = key
        self.certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
                            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
        self.server: ThreadingHTTPServer | None = None
        self.port = 0
        self._signed: dict[str, dict[str, str]] = {}

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = ThreadingHTTPServer((host, port), _handler(self))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kill(self) -> None:
        """Gone: nothing listens on the port any more."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    # -- MetadataPipeline ------------------------------------------------------------------------

    def respond(self, peer: str, uri: str, host: str, instance_header: str | None) -> tuple[int, bytes]:
        if not (ACCEPTS.fullmatch(uri) or (uri == "/" and host == "169.254.169.254")):
            return 404, ERROR_PAGE
        who = peer
        if peer == "127.0.0.1" and instance_header is not None and INSTANCE_ID.fullmatch(instance_header):
            who = instance_header
        if uri.startswith("/latest/"):
            new_uri = re.sub(r"/latest/+", who + ":", uri)
        elif uri.startswith("/1.0/"):
            new_uri = re.sub(r"/1.0/+", who + ":", uri)
        else:
            new_uri = re.sub(r"/\d\d\d\d-\d\d-\d\d/+", who + ":", uri)
        self.asked.append((who, uri))
        if uri in ("/", ""):
            return 200, "\n".join(VERSIONS).encode()
        if self.starting:
            return 200, STARTING
        try:
            reply = self.handle(new_uri)
        except NoSuchElement:
            return 404, ERROR_PAGE
        if isinstance(reply, str):
            return 404, ERROR_PAGE
        return 200, reply

    # -- VmMetadata ------------------------------------------------------------------------------

    def handle(self, path: str) -> bytes | str:
        head, _, rest = path.partition(":")
        has_rest = ":" in path
        is_instance_id = head.startswith("i-")
        vm_id = head if is_instance_id else self._by_address(head)
        request_url = re.sub("/+", "/", rest if has_rest else "/")
        name, _, local = request_url.partition("/")
        local = local.lstrip("/")
        if name in ("", "api", "dynamic", "user-data", "meta-data") and vm_id is not None:
            if (is_instance_id and not self.cloud.vpc) or (not is_instance_id and self.cloud.vpc):
                raise NoSuchElement("invalid for platform")
            record = self.records.get(vm_id)
            if record is None:
                raise NoSuchElement(vm_id)
            return self._endpoint(record, name, local)
        if name == "":
            return b""  # the public endpoints' listing: only "" itself
        return f"Metadata request failed: {path}"

    def _by_address(self, address: str) -> str | None:
        for record in self.records.values():
            if record.public_ip == address:
                return record.id
        for record in self.records.values():
            if record.private_ip == address:
                return record.id
        return None

    def _endpoint(self, record: VmRecord, name: str, local: str) -> bytes:
        if name == "":
            answering = []
            for endpoint in ("dynamic", "meta-data", "user-data"):
                try:
                    self._endpoint(record, endpoint, "")
                    answering.append(endpoint)
                except NoSuchElement:
                    pass
            return "\n".join(answering).encode()
        if name == "user-data":
            if record.user_data is None:
                raise NoSuchElement("no user data")
            return record.user_data
        kind = {"meta-data": "instance", "dynamic": "dynamic", "api": "api"}[name]
        value = self._by_key(record, local, kind)
        if value is None:
            raise NoSuchElement(local)
        return value.encode()

    # -- VmInstanceMetadata ----------------------------------------------------------------------

    def _groups(self, record: VmRecord) -> list[tuple[str | None, str, bool]]:
        """(prefix, type, present) per MetadataGroup, in declaration order."""
        return [(None, "instance", True), ("network", "instance", True), ("block-device-mapping", "instance", True),
                ("iam", "instance", False), ("public-keys", "instance", record.key_name is not None),
                (None, "dynamic", True), ("instance-identity", "dynamic", True), (None, "api", True)]

    def _by_key(self, record: VmRecord, path: str, kind: str) -> str | None:
        no_slash = path[:-1] if path.endswith("/") else path
        chosen: str | None = None
        for prefix, group_kind, _ in self._groups(record):
            if group_kind == kind and prefix is not None and (no_slash.startswith(prefix) or path.startswith(prefix)):
                chosen = prefix
        entries = self._map(record, kind, chosen)
        value = entries.get(path)
        return entries.get(no_slash) if value is None else value

    def _map(self, record: VmRecord, kind: str, group: str | None) -> dict[str, str]:
        if group is None:
            roots = [p for p, k, present in self._groups(record) if k == kind and p is not None and present]
            core = {"instance": self._core, "dynamic": self._core_dynamic, "api": lambda r: {"token": "tok"}}[kind]
            return _listing_entries(core(record), roots)
        build = {"network": self._network, "block-device-mapping": self._block_devices, "iam": lambda r: {},
                 "public-keys": self._public_keys, "instance-identity": self._identity}[group]
        return _listing_entries(build(record))

    def _core(self, vm: VmRecord) -> dict[str, str]:
        dns = self.cloud.use_instance_dns
        m = {"ami-id": vm.image_id, "ami-launch-index": str(vm.launch_index), "ami-manifest-path": vm.manifest,
             "hostname": self.cloud.dns_name(vm.private_ip, False) if dns else vm.private_ip,
             "instance-id": vm.id, "instance-type": vm.instance_type,
             "local-hostname": self.cloud.dns_name(vm.private_ip, False) if dns else vm.private_ip,
             "local-ipv4": vm.private_ip, "mac": vm.mac.upper(),
             "public-hostname": self.cloud.dns_name(vm.public_ip, True) if dns else vm.public_ip,
             "public-ipv4": vm.public_ip, "reservation-id": vm.reservation_id,
             "security-groups": "\n".join(sorted(vm.group_names)),
             "services/domain": self.cloud.dns_domain, "placement/availability-zone": vm.zone}
        if vm.kernel_id:
            m["kernel-id"] = vm.kernel_id
        if vm.ramdisk_id:
            m["ramdisk-id"] = vm.ramdisk_id
        return m

    def _core_dynamic(self, vm: VmRecord) -> dict[str, str]:
        return {"fws/instance-monitoring": "enabled" if vm.monitoring else "disabled"}

    def _network(self, vm: VmRecord) -> dict[str, str]:
        m: dict[str, str] = {}
        if vm.nics:
            for nic in vm.nics:
                prefix = f"network/interfaces/macs/{nic.mac}/"
                m[prefix + "device-number"] = str(nic.device_index)
                m[prefix + "interface-id"] = nic.id
                if nic.public_ip:
                    m[prefix + f"ipv4-associations/{nic.public_ip}"] = nic.private_ip
                m[prefix + "local-hostname"] = self.cloud.dns_name(nic.private_ip, False)
                m[prefix + "local-ipv4s"] = nic.private_ip
                m[prefix + "mac"] = nic.mac
                m[prefix + "owner-id"] = nic.owner
                # The VPCs here have DNS hostnames off: an association has no name.
                m[prefix + "public-hostname"] = ""
                m[prefix + "public-ipv4s"] = nic.public_ip or ""
                m[prefix + "security-groups"] = "\n".join(nic.group_names)
                m[prefix + "security-group-ids"] = "\n".join(nic.group_ids)
                m[prefix + "subnet-id"] = nic.subnet
                m[prefix + "subnet-ipv4-cidr-block"] = nic.subnet_cidr
                m[prefix + "vpc-id"] = nic.vpc
                m[prefix + "vpc-ipv4-cidr-block"] = nic.vpc_cidr
            return m
        dns = self.cloud.use_instance_dns
        prefix = f"network/interfaces/macs/{vm.mac}/"
        m[prefix + "device-number"] = "0"
        m[prefix + "local-hostname"] = self.cloud.dns_name(vm.private_ip, False) if dns else vm.private_ip
        m[prefix + "local-ipv4s"] = vm.private_ip
        m[prefix + "mac"] = vm.mac
        m[prefix + "owner-id"] = vm.owner
        m[prefix + "public-hostname"] = self.cloud.dns_name(vm.public_ip, True) if dns else vm.public_ip
        m[prefix + "public-ipv4s"] = vm.public_ip
        return m

    def _block_devices(self, vm: VmRecord) -> dict[str, str]:
        # An instance-store image whose root is a partition (MachineImageInfo, ImageManager.isPathAPartition).
        return {"block-device-mapping/emi": "sda1", "block-device-mapping/root": "/dev/sda1",
                "block-device-mapping/ephemeral0": "sda2", "block-device-mapping/swap": "sda3"}

    def _public_keys(self, vm: VmRecord) -> dict[str, str]:
        if vm.key_name is None:
            return {}
        return {"public-keys": f"0={vm.key_name}", "public-keys/": f"0={vm.key_name}",
                "public-keys/0/openssh-key": vm.public_key}

    def _identity(self, vm: VmRecord) -> dict[str, str]:
        # MetadataGroup.InstanceIdentity is kept in VM_METADATA_GENERATED_CACHE: one signing per instance.
        known = self._signed.get(vm.id)
        if known is None:
            known = self._signed[vm.id] = self._sign_identity(vm)
        return dict(known)

    def _sign_identity(self, vm: VmRecord) -> dict[str, str]:
        document = json.dumps({
            "privateIp": vm.private_ip, "devpayProductCodes": None, "availabilityZone": vm.zone,
            "version": "2010-08-31", "region": self.cloud.region, "instanceId": vm.id, "billingProducts": None,
            "instanceType": vm.instance_type, "accountId": vm.owner, "pendingTime": vm.created,
            "imageId": vm.image_id, "architecture": "x86_64", "kernelId": vm.kernel_id, "ramdiskId": vm.ramdisk_id,
        }, indent=2)
        signed = pkcs7.PKCS7SignatureBuilder().set_data(document.encode()).add_signer(
            self.certificate, self.key, hashes.SHA256()).sign(serialization.Encoding.DER, [])
        signature = self.key.sign(document.encode(), padding.PKCS1v15(), hashes.SHA1())
        return {"instance-identity/document": document, "instance-identity/pkcs7": _b64_76(signed),
                "instance-identity/signature": _b64_76(signature)}


def _b64_76(data: bytes) -> str:
    """Guava ``BaseEncoding.base64().withSeparator("\\n", 76)``."""
    text = base64.b64encode(data).decode()
    return "\n".join(text[i:i + 76] for i in range(0, len(text), 76))


def _handler(controller: Controller) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            status, body = controller.respond(self.client_address[0], self.path, self.headers.get("Host", ""),
                                              self.headers.get("Euca-Instance-Id"))
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

    return Handler


def get(port: int, uri: str, source: str = "127.0.0.1", headers: dict[str, str] | None = None,
        host: str = "127.0.0.1") -> tuple[int, bytes]:
    """One GET from ``source`` (a loopback address), as an instance or a proxy would send it."""
    with socket.create_connection((host, port), timeout=10, source_address=(source, 0)) as connection:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        connection.sendall(f"GET {uri} HTTP/1.1\r\nHost: 169.254.169.254\r\n{extra}Connection: close\r\n\r\n"
                           .encode())
        data = b""
        while chunk := connection.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def walk(fetch, start: tuple[str, ...] = ("/latest/", "/latest/meta-data/", "/latest/dynamic/",
                                            "/latest/user-data")) -> dict[str, tuple[int, bytes]]:
    """Every URI reachable from the listings, with its answer (``fetch(uri) -> (status, body)``)."""
    seen: dict[str, tuple[int, bytes]] = {}
    pending = list(start)
    while pending and len(seen) < 400:
        uri = pending.pop(0)
        if uri in seen:
            continue
        seen[uri] = answer = fetch(uri)
        if answer[0] != 200 or not uri.endswith("/") or uri == "/latest/":
            continue
        for line in answer[1].decode().splitlines():
            if not line:
                continue
            if "=" in line and line.partition("=")[0].isdigit():
                line = line.partition("=")[0] + "/"
            pending.append(uri + line)
            if line.endswith("/"):
                pending.append(uri + line[:-1])  # a directory asked without its slash
    return seen
