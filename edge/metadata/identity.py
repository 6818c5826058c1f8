"""The instance identity document and its signatures.

Clients verify ``signature`` (RSA-SHA256 over the exact document bytes) and the
PKCS#7 forms (``pkcs7``, ``rsa2048``: SignedData with the document embedded,
DER, base64 without PEM armour) against the cloud's certificate.  Signing is
slow (an RSA private-key operation), so signatures are cached by document.
"""

from __future__ import annotations

import base64
import datetime
import fcntl
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from cachetools import LRUCache
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from edge.errors import ConfigError
from edge.view.model import Cloud, Instance

DOCUMENT_VERSION = "2017-09-30"


def identity_document(instance: Instance, cloud: Cloud) -> bytes:
    """The pretty-printed JSON document, ``"key" : value`` like EC2's; nulls kept."""
    interface = instance.primary_interface
    fields = {
        "accountId": instance.account_id,
        "architecture": instance.architecture,
        "availabilityZone": instance.availability_zone,
        "billingProducts": None,
        "devpayProductCodes": None,
        "marketplaceProductCodes": list(instance.product_codes) or None,
        "imageId": instance.image_id,
        "instanceId": instance.id,
        "instanceType": instance.instance_type,
        "kernelId": instance.kernel_id,
        "pendingTime": instance.launch_time,
        "privateIp": interface.primary_ip,
        "ramdiskId": instance.ramdisk_id,
        "region": cloud.region,
        "version": DOCUMENT_VERSION,
    }
    return json.dumps(fields, indent=2, separators=(",", " : ")).encode()


@dataclass(frozen=True, slots=True)
class Signatures:
    signature: bytes
    pkcs7: bytes
    rsa2048: bytes


class IdentitySigner:
    """Signs documents with the gateway's identity key; thread-safe, memoized by document."""

    def __init__(self, key: rsa.RSAPrivateKey, certificate: x509.Certificate, cache_size: int = 10_000) -> None:
        self.key = key
        self.certificate = certificate
        self._cache: LRUCache[bytes, Signatures] = LRUCache(maxsize=cache_size)
        self._lock = threading.Lock()

    def sign(self, document: bytes) -> Signatures:
        with self._lock:
            cached = self._cache.get(document)
        if cached is not None:
            return cached
        raw = self.key.sign(document, padding.PKCS1v15(), hashes.SHA256())
        # EC2 signs pkcs7 and rsa2048 with different keys; edge has one RSA key, so both leaves
        # carry the same SignedData (signed once: this runs on the loop, on first request).
        signed_data = _wrap(base64.b64encode(self._pkcs7(document)))
        signed = Signatures(signature=_wrap(base64.b64encode(raw)), pkcs7=signed_data, rsa2048=signed_data)
        with self._lock:
            self._cache[document] = signed
        return signed

    def _pkcs7(self, document: bytes) -> bytes:
        builder = pkcs7.PKCS7SignatureBuilder().set_data(document).add_signer(
            self.certificate, self.key, hashes.SHA256())
        return builder.sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


def _wrap(encoded: bytes, width: int = 64) -> bytes:
    # EC2 serves the base64 wrapped at 64 columns, as PEM bodies are.
    return b"\n".join(encoded[i:i + width] for i in range(0, len(encoded), width))


def load_signer(key_file: str, cert_file: str) -> IdentitySigner:
    try:
        key_data = Path(key_file).read_bytes()
        cert_data = Path(cert_file).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read identity key or certificate: {exc.filename}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
        certificate = x509.load_pem_x509_certificate(cert_data)
    except ValueError as exc:
        raise ConfigError(f"identity key {key_file} or certificate {cert_file} is not valid PEM: {exc}") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError(f"identity key {key_file} must be an RSA key")
    certified = certificate.public_key()
    if not isinstance(certified, rsa.RSAPublicKey) or certified.public_numbers() != key.public_key().public_numbers():
        raise ConfigError(f"identity certificate {cert_file} does not match key {key_file}")
    return IdentitySigner(key, certificate)


def ensure_signer(state_dir: str | Path, common_name: str = "edge instance identity") -> IdentitySigner:
    """Load ``identity-key.pem``/``identity-cert.pem`` from the state directory, creating them once."""
    directory = Path(state_dir)
    key_path = directory / "identity-key.pem"
    cert_path = directory / "identity-cert.pem"
    if not (key_path.exists() and cert_path.exists()):
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / ".identity.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # workers starting together must agree on one pair
            if not (key_path.exists() and cert_path.exists()):
                key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
                certificate = self_signed_certificate(key, common_name)
                _write_new(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()), 0o600)
                _write_new(cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    return load_signer(str(key_path), str(cert_path))


def self_signed_certificate(key: rsa.RSAPrivateKey, common_name: str, days: int = 3650) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # Written aside and renamed so a concurrent worker never reads half a key; the pair is
    # rewritten as a whole when either file is missing.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.replace(temporary, path)
