"""etcd as production clusters run it: TLS with client certificates, and a user with a role.

A real etcd is started with ``--client-cert-auth`` and its own CA; a root user and
a user ``edge`` whose one role may read ``edge/`` are added, and authentication is
enabled (what ``etcdctl user add``, ``role add``, ``role grant-permission --prefix``
and ``auth enable`` do, through the same gateway).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.config import ViewConfig, load_config
from edge.errors import SourceError
from edge.etcd import open_view_source
from edge.etcd.view_source import EtcdSource
from edge.metadata.tokens import generate_token_key_file, parse_key_file
from edge.view.demo import demo_document
from edge.view.formats import decode_view
from tests.etcd.server import ETCD, EtcdServer, Tls, make_tls
from tests.fleet.gateway import Gateway
from tests.support import wait_until

PASSWORD = "edge-Pa55-w0rd-not-for-logs"


def view_bytes(serial: int) -> bytes:
    document = demo_document()
    document["serial"] = serial
    return json.dumps(document).encode()


@pytest.fixture
def secure(tmp_path) -> Iterator[tuple[EtcdServer, Tls]]:
    if not os.access(ETCD, os.X_OK):
        pytest.skip("etcd is not installed (Debian package etcd-server)")
    tls = make_tls(tmp_path / "tls", client_cert_auth=True)
    server = EtcdServer(tmp_path / "etcd-secure", tls=tls)
    server.start()
    server.enable_auth("root-password")
    server.add_reader("edge", PASSWORD, "edge/")
    yield server, tls
    server.stop()


def settings(tls: Tls, tmp_path: Path, **changes: object) -> ViewConfig:
    password_file = tmp_path / "etcd-password"
    password_file.write_text(PASSWORD + "\n")
    values: dict[str, object] = dict(connect_timeout=1.0, read_timeout=2.0, ca_file=str(tls.ca_file),
                                     cert_file=str(tls.gateway_cert_file), key_file=str(tls.gateway_key_file),
                                     etcd_username="edge", etcd_password_file=str(password_file))
    values.update(changes)
    return ViewConfig(**values)  # type: ignore[arg-type]


def fetch(source: object) -> bytes | None:
    return asyncio.run(source.fetch())  # type: ignore[attr-defined]


def test_view_read_with_a_client_certificate_and_a_login_renewed_when_the_token_expires(secure, tmp_path) -> None:
    server, tls = secure
    server.put("edge/view", view_bytes(1))
    source = open_view_source(server.url("edge/view"), settings(tls, tmp_path))
    assert isinstance(source, EtcdSource)
    assert decode_view(fetch(source)).serial == 1
    assert fetch(source) is None
    assert source.client.authentications == 1
    # Once the cluster has forgotten the token (expired, or auth switched off and on), the
    # client logs in again by itself: the poll does not fail.
    server.forget_tokens()
    server.put("edge/view", view_bytes(2))
    assert decode_view(fetch(source)).serial == 2
    assert source.client.authentications == 2


def test_what_the_cluster_refuses_is_a_clear_source_error(secure, tmp_path) -> None:
    server, tls = secure
    server.put("edge/view", view_bytes(1))
    server.put("other/view", view_bytes(1))
    # No client certificate: the TLS handshake fails.
    with pytest.raises(SourceError, match="TLS"):
        fetch(open_view_source(server.url("edge/view"), settings(tls, tmp_path, cert_file="", key_file="")))
    # A certificate but no login: the anonymous user may read nothing.
    with pytest.raises(SourceError, match="permission denied"):
        fetch(open_view_source(server.url("edge/view"), settings(tls, tmp_path, etcd_username="",
                                                              etcd_password_file="")))
    # A wrong password.
    with pytest.raises(SourceError, match="authentication failed") as caught:
        fetch(open_view_source(server.url("edge/view"), settings(tls, tmp_path, etcd_password_file="",
                                                              etcd_password="wrong")))
    assert "wrong" not in str(caught.value)
    # The user's role does not cover the key.
    with pytest.raises(SourceError, match="permission denied"):
        fetch(open_view_source(server.url("other/view"), settings(tls, tmp_path)))
    # A password file that cannot be read.
    with pytest.raises(SourceError, match="password file"):
        fetch(open_view_source(server.url("edge/view"),
                          settings(tls, tmp_path, etcd_password_file=str(tmp_path / "absent"))))


def test_a_gateway_reads_view_and_token_keys_from_the_secure_cluster_and_never_shows_the_password(
        secure, tmp_path) -> None:
    server, tls = secure
    keys = tmp_path / "keys"
    generate_token_key_file(keys, name="fleet")
    server.put("edge/token-keys", keys.read_text())
    server.put("edge/view", view_bytes(7))
    env = {"EDGE_VIEW_CA_FILE": str(tls.ca_file), "EDGE_VIEW_CERT_FILE": str(tls.gateway_cert_file),
           "EDGE_VIEW_KEY_FILE": str(tls.gateway_key_file), "EDGE_VIEW_ETCD_USERNAME": "edge",
           "EDGE_VIEW_ETCD_PASSWORD": PASSWORD, "EDGE_WORKERS": "1", "EDGE_LOG_LEVEL": "debug"}
    gateway = Gateway("secure", "127.0.1.1", server.url("edge/view"), tmp_path / "gateway",
                      extra_args=["--token-key-source", server.url("edge/token-keys")], env=env)
    gateway.start()
    try:
        wait_until(lambda: gateway.serial() == 7, timeout=20)
        token = gateway.token()
        raw = __import__("base64").urlsafe_b64decode(token + b"=" * (-len(token) % 4))
        assert raw[1:5] == parse_key_file(keys.read_text()).signing.key_id
        assert gateway.get("/latest/meta-data/instance-id", token=token).status == 200
        server.put("edge/view", view_bytes(8))
        wait_until(lambda: gateway.serial() == 8, timeout=20)
        summary = gateway.admin("/view").body.decode()
        assert PASSWORD not in summary
    finally:
        gateway.stop()
    assert PASSWORD not in gateway.log_path.read_text()
    shown = subprocess.run([sys.executable, "-m", "edge", "config", "show"], capture_output=True, text=True,
                           env={**os.environ, **env}, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert 'etcd_username = "edge"' in shown.stdout and PASSWORD not in shown.stdout
    assert "etcd_password is set" in shown.stdout


def test_access_settings_are_checked_when_the_configuration_loads() -> None:
    from edge.errors import ConfigError
    with pytest.raises(ConfigError, match="key_file"):
        load_config(env={"EDGE_VIEW_KEY_FILE": "/k"})
    with pytest.raises(ConfigError, match="etcd_username"):
        load_config(env={"EDGE_VIEW_ETCD_PASSWORD": "x"})
    with pytest.raises(ConfigError, match="both set"):
        load_config(env={"EDGE_VIEW_ETCD_USERNAME": "u", "EDGE_VIEW_ETCD_PASSWORD": "x",
                         "EDGE_VIEW_ETCD_PASSWORD_FILE": "/p"})
    config = load_config(env={"EDGE_VIEW_ETCD_USERNAME": "u", "EDGE_VIEW_ETCD_PASSWORD": "hunter2"})
    assert config.view.etcd_password == "hunter2" and "hunter2" not in repr(config)


def test_a_keyspace_is_read_and_watched_with_the_same_login(secure, tmp_path) -> None:
    from edge.etcd.view_source import EtcdKeyspaceSource

    server, tls = secure
    document = json.loads(view_bytes(1))
    server.put("edge/keyspace/serial", "1")
    server.put("edge/keyspace/cloud", json.dumps(document["cloud"]))
    for network in document["networks"]:
        server.put("edge/keyspace/networks/" + network["id"], json.dumps(network))
    for instance in document["instances"]:
        server.put("edge/keyspace/instances/" + instance["id"], json.dumps(instance))
    source = open_view_source(server.url("edge/keyspace/"), settings(tls, tmp_path))
    assert isinstance(source, EtcdKeyspaceSource)
    try:
        prepared = fetch(source)
        assert prepared is not None and prepared.view.serial == 1
        wait_until(lambda: source._watch is not None)
        server.put("edge/keyspace/serial", "2")
        wait_until(lambda: source.watch_events == 1)
        assert fetch(source).view.serial == 2
        assert source.client.authentications == 1
    finally:
        source.close()
