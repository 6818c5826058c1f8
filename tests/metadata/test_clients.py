"""Real clients against edge: botocore, cloud-init's EC2 crawl, amazon-ec2-utils' ec2-metadata, curl."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid

import pytest
from imds_harness import parse, request

from bench.common import start_metadata_server, stop
from edge.config import CredentialsConfig
from tests.support import cloud_init_pythonpath, extracted_client

CREDENTIAL_PROCESS = textwrap.dedent("""
    import json, sys, time
    print(json.dumps({"Version": 1, "AccessKeyId": "AKIAEDGETEST", "SecretAccessKey": "s3cr3t",
                      "SessionToken": "session-" + sys.argv[1],
                      "Expiration": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))}))
""")


def no_proxy_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost,169.254.169.254"
    return env


@pytest.fixture
def with_credentials(start, tmp_path, monkeypatch):
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    script = tmp_path / "creds.py"
    script.write_text(CREDENTIAL_PROCESS)
    return start(credentials=CredentialsConfig(kind="process", command=(sys.executable, str(script), "{instance_id}")))


def test_botocore_v2_credentials_and_region(with_credentials):
    from botocore.utils import InstanceMetadataFetcher, InstanceMetadataRegionFetcher

    server = with_credentials
    fetcher = InstanceMetadataFetcher(timeout=2, num_attempts=1, base_url=server.base)
    credentials = fetcher.retrieve_iam_role_credentials()
    assert credentials["role_name"] == "demo-role"
    assert credentials["access_key"] == "AKIAEDGETEST" and credentials["secret_key"] == "s3cr3t"
    assert credentials["token"] == "session-i-0de0000000000001"
    assert credentials["expiry_time"].endswith("Z")
    issued_before = server.call(lambda: server.service.handler.tokens_issued)
    assert issued_before >= 1  # botocore went through IMDSv2
    region = InstanceMetadataRegionFetcher(timeout=2, num_attempts=1, base_url=server.base).retrieve_region()
    assert region == "demo-1"


def test_botocore_falls_back_to_v1_when_the_token_put_is_refused(with_credentials):
    from botocore.utils import InstanceMetadataFetcher

    class DatedTokenPath(InstanceMetadataFetcher):
        _TOKEN_PATH = "2021-03-23/api/token"  # edge answers 403 here, as EC2 does

    server = with_credentials
    credentials = DatedTokenPath(timeout=2, num_attempts=1, base_url=server.base).retrieve_iam_role_credentials()
    assert credentials["access_key"] == "AKIAEDGETEST"
    assert server.call(lambda: server.service.handler.tokens_issued) == 0


def test_botocore_session_resolves_instance_credentials(with_credentials, monkeypatch):
    import botocore.session

    server = with_credentials
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", server.base)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    session = botocore.session.get_session()
    credentials = session.get_credentials()
    assert credentials is not None and credentials.method == "iam-role"
    assert credentials.get_frozen_credentials().access_key == "AKIAEDGETEST"


CLOUD_INIT_CRAWL = textwrap.dedent("""
    import json, sys
    from cloudinit.sources.helpers import ec2
    url, version, token = sys.argv[1], sys.argv[2], sys.argv[3]
    headers = (lambda _url: {"X-aws-ec2-metadata-token": token}) if token else None
    md = ec2.get_instance_metadata(api_version=version, metadata_address=url, retries=0, timeout=5,
                                   headers_cb=headers)
    ud = ec2.get_instance_userdata(api_version=version, metadata_address=url, retries=0, timeout=5,
                                   headers_cb=headers)
    identity = ec2.get_instance_identity(api_version=version, metadata_address=url, retries=0, timeout=5,
                                         headers_cb=headers)
    print(json.dumps({"md": md, "ud": ud.decode() if isinstance(ud, bytes) else ud, "identity": identity},
                     default=str))
""")


def cloud_init_crawl(base: str, version: str, token: str = "") -> dict:
    pythonpath = cloud_init_pythonpath()
    if pythonpath is None:
        pytest.skip("cloud-init is not extracted in .venv/debroot (bash tests/run does it with apt-get download)")
    env = dict(no_proxy_env(), PYTHONPATH=pythonpath)
    result = subprocess.run([sys.executable, "-c", CLOUD_INIT_CRAWL, base.rstrip("/"), version, token],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_cloud_init_crawls_the_whole_tree(server):
    crawl = cloud_init_crawl(server.base, "2021-03-23")
    md = crawl["md"]
    assert md["instance-id"] == "i-0de0000000000001"
    assert md["local-ipv4"] == "127.0.0.1" and md["public-ipv4"] == "198.51.100.1"
    assert md["placement"] == {"availability-zone": "demo-1a", "region": "demo-1"}
    assert md["block-device-mapping"] == {"ami": "/dev/sda1", "ephemeral0": "sdb", "root": "/dev/sda1"}
    assert md["public-keys"]["demo"].startswith("ssh-ed25519 ")
    assert md["iam"]["info"]["InstanceProfileArn"].endswith("instance-profile/demo-role")
    macs = md["network"]["interfaces"]["macs"]
    assert list(macs) == [md["mac"]]
    assert macs[md["mac"]]["local-ipv4s"] == "127.0.0.1"
    assert macs[md["mac"]]["ipv4-associations"] == {"198.51.100.1": "127.0.0.1"}
    assert md["services"] == {"domain": "amazonaws.com", "partition": "aws"}
    assert md["tags"]["instance"] == {"Name": "demo-1"}
    assert crawl["ud"] == "#cloud-config\nhostname: demo-1\n"
    assert crawl["identity"]["document"]["instanceId"] == "i-0de0000000000001"
    assert crawl["identity"]["document"]["region"] == "demo-1"


def test_cloud_init_old_version_and_v2_token(server):
    crawl = cloud_init_crawl(server.base, "2009-04-04")
    assert crawl["md"]["instance-id"] == "i-0de0000000000001"
    status, _, token = parse(request(server.port, "PUT", "/latest/api/token",
                                     {"X-aws-ec2-metadata-token-ttl-seconds": "300"}, "127.0.0.3"))
    assert status == 200
    # The crawl comes from 127.0.0.1, whose token this is not: every read is refused.
    assert cloud_init_crawl(server.base, "2021-03-23", token.decode())["md"] == {}


def test_curl(server):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    env = no_proxy_env()
    token = subprocess.run(["curl", "-sf", "--interface", "127.0.0.3", "-X", "PUT", "-H",
                            "X-aws-ec2-metadata-token-ttl-seconds: 60", f"{server.base}latest/api/token"],
                           capture_output=True, text=True, env=env, check=True).stdout
    result = subprocess.run(["curl", "-sf", "--interface", "127.0.0.3", "-H", f"X-aws-ec2-metadata-token: {token}",
                             f"{server.base}latest/meta-data/instance-id"], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout == "i-0de0000000000003"
    result = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--interface", "127.0.0.3",
                             f"{server.base}latest/meta-data/instance-id"], capture_output=True, text=True, env=env)
    assert result.stdout == "401"


def netns(name: str, *argv: str, **kwargs):
    return subprocess.run(["ip", "netns", "exec", name, *argv], **kwargs)


def test_ec2_metadata_in_a_network_namespace(tmp_path):
    """``ec2-metadata`` hard-codes http://169.254.169.254, so edge serves it inside a namespace."""
    ec2_metadata = extracted_client("ec2-metadata")
    if ec2_metadata is None:
        pytest.skip("ec2-metadata is not extracted in .venv/debroot (bash tests/run does it from amazon-ec2-utils)")
    name = f"edge-imds-{uuid.uuid4().hex[:8]}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace (ip netns add not permitted)")
    server = None
    try:
        for command in (["ip", "link", "set", "lo", "up"],
                        ["ip", "addr", "add", "169.254.169.254/32", "dev", "lo"],
                        ["ip", "addr", "add", "10.99.0.5/32", "dev", "lo"]):
            netns(name, *command, check=True)
        # Inside the namespace the client reaches 169.254.169.254 from 10.99.0.5, the instance's address.
        netns(name, "ip", "route", "replace", "local", "169.254.169.254", "dev", "lo", "table", "local",
              "src", "10.99.0.5", check=True)
        document = json.loads(json.dumps(__import__("edge.view.demo", fromlist=["x"]).demo_document()))
        instance = document["instances"][2]  # tokens required: ec2-metadata always uses IMDSv2
        instance["interfaces"][0]["private_ips"] = ["10.99.0.5"]
        document["networks"][0]["cidrs"].append("10.99.0.0/24")
        view = tmp_path / "view.json"
        view.write_text(json.dumps(document))
        server, port = start_metadata_server(
            "--limits", "default", "--listen", "169.254.169.254:80", "--state-dir", str(tmp_path / "state"),
            "--view", str(view), prefix=["ip", "netns", "exec", name], stderr=subprocess.PIPE)
        assert port == 80
        result = netns(name, str(ec2_metadata), "--instance-id", "--local-ipv4", "--availability-zone",
                       "--public-keys", capture_output=True, text=True, timeout=30, env=no_proxy_env())
        assert result.returncode == 0, result.stdout + result.stderr
        assert "instance-id: i-0de0000000000003" in result.stdout
        assert "local-ipv4: 10.99.0.5" in result.stdout
        assert "placement: demo-1a" in result.stdout
        assert "ssh-ed25519" in result.stdout
    finally:
        if server is not None:
            stop(server, timeout=5)
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)
