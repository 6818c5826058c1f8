"""The identity document and its signatures, verified with openssl against the certificate."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess

import pytest
from imds_harness import parse, request

from edge.metadata.identity import ensure_signer, load_signer

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


def fetch(server, leaf: str) -> bytes:
    status, headers, body = parse(request(server.port, "GET", f"/latest/dynamic/instance-identity/{leaf}"))
    assert status == 200 and headers["content-type"] == "text/plain"
    return body


def test_listing_and_document(server):
    assert parse(request(server.port, "GET", "/latest/dynamic/"))[2] == b"instance-identity/"
    assert parse(request(server.port, "GET", "/latest/dynamic/instance-identity/"))[2] == \
        b"document\npkcs7\nsignature\nrsa2048"
    document = fetch(server, "document")
    assert b'  "instanceId" : "i-0de0000000000001",\n' in document and b'"kernelId" : null' in document
    fields = json.loads(document)
    assert fields["privateIp"] == "127.0.0.1" and fields["region"] == "demo-1" and fields["version"] == "2017-09-30"
    assert set(fields) >= {"accountId", "architecture", "availabilityZone", "billingProducts", "devpayProductCodes",
                           "marketplaceProductCodes", "imageId", "instanceType", "pendingTime", "ramdiskId"}


def test_signatures_verify_with_openssl(server, tmp_path):
    document = fetch(server, "document")
    cert = tmp_path.parent / tmp_path.name / "state" / "identity-cert.pem"
    assert cert.exists()
    (tmp_path / "document").write_bytes(document)
    subprocess.run(["openssl", "x509", "-in", cert, "-pubkey", "-noout", "-out", tmp_path / "pub.pem"], check=True)

    (tmp_path / "signature").write_bytes(base64.b64decode(fetch(server, "signature")))
    result = subprocess.run(["openssl", "dgst", "-sha256", "-verify", tmp_path / "pub.pem", "-signature",
                             tmp_path / "signature", tmp_path / "document"], capture_output=True, text=True)
    assert result.returncode == 0 and "Verified OK" in result.stdout

    for leaf in ("pkcs7", "rsa2048"):
        body = fetch(server, leaf)
        assert not body.startswith(b"-----")
        pem = b"-----BEGIN PKCS7-----\n" + body + b"\n-----END PKCS7-----\n"
        (tmp_path / leaf).write_bytes(pem)
        result = subprocess.run(["openssl", "smime", "-verify", "-in", tmp_path / leaf, "-inform", "PEM",
                                 "-certfile", cert, "-CAfile", cert, "-purpose", "any"], capture_output=True)
        assert result.returncode == 0, result.stderr
        assert result.stdout == document, leaf
        # Detached verification against the served document, as the EC2 guide shows.
        result = subprocess.run(["openssl", "smime", "-verify", "-in", tmp_path / leaf, "-inform", "PEM",
                                 "-content", tmp_path / "document", "-certfile", cert, "-noverify"],
                                capture_output=True)
        assert result.returncode == 0, result.stderr

    # A document that was changed does not verify.
    (tmp_path / "document").write_bytes(document.replace(b"127.0.0.1", b"127.0.0.9"))
    result = subprocess.run(["openssl", "dgst", "-sha256", "-verify", tmp_path / "pub.pem", "-signature",
                             tmp_path / "signature", tmp_path / "document"], capture_output=True, text=True)
    assert result.returncode != 0


def test_generated_identity_is_reused_and_configured_files_load(tmp_path):
    first = ensure_signer(tmp_path)
    second = ensure_signer(tmp_path)
    assert first.certificate_pem() == second.certificate_pem()
    assert (tmp_path / "identity-key.pem").stat().st_mode & 0o077 == 0
    loaded = load_signer(str(tmp_path / "identity-key.pem"), str(tmp_path / "identity-cert.pem"))
    assert loaded.certificate_pem() == first.certificate_pem()


def test_a_certificate_for_a_key_of_another_kind_is_a_configuration_error(tmp_path):
    """An Ed25519 certificate beside the RSA key: refused as not matching, not an AttributeError."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.x509.oid import NameOID

    from edge.errors import ConfigError

    ensure_signer(tmp_path)
    other = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not the identity key")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(other.public_key())
                   .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                   .sign(other, None))
    (tmp_path / "other-cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ConfigError, match="does not match"):
        load_signer(str(tmp_path / "identity-key.pem"), str(tmp_path / "other-cert.pem"))
