"""Reload (SIGHUP) without dropping connections, and graceful stop."""

from __future__ import annotations

import dataclasses
import sys
import threading
import time

import pytest
from imds_harness import connect, make_config, parse, read_all, request, token

from edge.config import CredentialsConfig
from edge.metadata.tokens import generate_token_key_file

PATH = "/latest/meta-data/instance-id"


def keep_alive_get(sock, path=PATH) -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(parse(head + b"\r\n\r\n")[1]["content-length"])
    while len(body) < length:
        body += sock.recv(4096)
    return head + b"\r\n\r\n" + body


def test_reload_rotates_keys_and_limits_keeping_connections(start, tmp_path):
    keys = generate_token_key_file(tmp_path / "keys")
    server = start(token_key_file=str(keys))
    old_token = token(server.port, source="127.0.0.3")
    with connect(server.port) as held:
        assert parse(keep_alive_get(held))[0] == 200

        generate_token_key_file(keys, add=True)
        server.call(lambda: server.service.reload(make_config(tmp_path, token_key_file=str(keys))))
        new_token = token(server.port, source="127.0.0.3")
        assert new_token[:6] != old_token[:6]  # a different signing key id
        for value in (old_token, new_token):
            assert parse(request(server.port, "GET", PATH, {"X-aws-ec2-metadata-token": value}, "127.0.0.3"))[0] == 200

        # Dropping the old key revokes its tokens.
        keys.write_text("\n".join(keys.read_text().splitlines()[:2]) + "\n")
        server.call(lambda: server.service.reload(make_config(tmp_path, token_key_file=str(keys))))
        assert parse(request(server.port, "GET", PATH, {"X-aws-ec2-metadata-token": old_token}, "127.0.0.3"))[0] == 401
        assert parse(request(server.port, "GET", PATH, {"X-aws-ec2-metadata-token": new_token}, "127.0.0.3"))[0] == 200

        # The connection opened before the reloads still works, under the new rate limit.
        config = make_config(tmp_path, token_key_file=str(keys), rate=1.0, burst=2)
        server.call(lambda: server.service.reload(config))
        statuses = [parse(keep_alive_get(held))[0] for _ in range(4)]
        assert statuses[-1] == 429


def test_reload_with_a_broken_key_file_keeps_the_old_keys(start, tmp_path):
    keys = generate_token_key_file(tmp_path / "keys")
    server = start(token_key_file=str(keys))
    value = token(server.port, source="127.0.0.3")
    keys.write_text("garbage\n")
    server.call(lambda: server.service.reload(make_config(tmp_path, token_key_file=str(keys))))
    assert parse(request(server.port, "GET", PATH, {"X-aws-ec2-metadata-token": value}, "127.0.0.3"))[0] == 200


def test_stop_finishes_in_flight_requests_and_closes_idle_ones(start, tmp_path):
    script = tmp_path / "slow.py"
    script.write_text("import json, time\ntime.sleep(0.6)\nprint(json.dumps({'Version': 1, 'AccessKeyId': 'A',"
                      " 'SecretAccessKey': 'S', 'SessionToken': 'T', 'Expiration': '2999-01-01T00:00:00Z'}))\n")
    server = start(credentials=CredentialsConfig(kind="process", command=(sys.executable, str(script))))
    idle = connect(server.port)
    assert parse(keep_alive_get(idle))[0] == 200
    answers: list[bytes] = []
    in_flight = threading.Thread(target=lambda: answers.append(
        request(server.port, "GET", "/latest/meta-data/iam/security-credentials/demo-role")))
    in_flight.start()
    time.sleep(0.2)
    begun = time.monotonic()
    server.run(server.service.stop(3.0))
    in_flight.join(5)
    assert time.monotonic() - begun < 2.5
    assert parse(answers[0])[0] == 200
    assert read_all(idle) == b""
    idle.close()
    with pytest.raises(OSError):
        connect(server.port).recv(1)
    # The fixture stops it again at teardown: stop is idempotent.


def test_config_keys_are_checked():
    from edge.config import load_config
    from edge.errors import ConfigError

    assert load_config(env={}).metadata.unknown_source_wait == 2.0
    for env in ({"EDGE_METADATA_RATE": "-1"}, {"EDGE_METADATA_TRUSTED_PROXIES": "not-a-cidr"},
                {"EDGE_METADATA_CREDENTIALS_KIND": "process"}, {"EDGE_METADATA_CREDENTIALS_KIND": "magic"},
                {"EDGE_METADATA_IDENTITY_KEY_FILE": "/x"}, {"EDGE_METADATA_HEADER_TIMEOUT": "0"}):
        with pytest.raises(ConfigError):
            load_config(env=env)
    config = load_config(env={"EDGE_METADATA_CREDENTIALS_KIND": "process",
                              "EDGE_METADATA_CREDENTIALS_COMMAND": "/bin/creds,{role}"})
    assert config.metadata.credentials.command == ("/bin/creds", "{role}")
    assert dataclasses.is_dataclass(config.metadata.credentials)
