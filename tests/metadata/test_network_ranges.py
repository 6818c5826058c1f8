"""The network ranges of an interface's MAC tree: each leaf serves one address family.

A VPC network may list IPv4 and IPv6 CIDRs in any order, and a subnet carries
its IPv6 ranges in ``ipv6_cidrs``: ``vpc-ipv4-*`` leaves show only IPv4 ranges,
``vpc-ipv6-cidr-blocks`` and ``subnet-ipv6-cidr-blocks`` only IPv6 ones, and
the top-level ``ipv6`` is the primary interface's first IPv6 address.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from imds_harness import demo, parse, request

from edge.config import Listen
from tests.support import cloud_init_pythonpath

VPC_INSTANCE = "i-0de1000000000001"


def dual_stack_view() -> dict:
    document = demo()
    vpc = next(n for n in document["networks"] if n["id"] == "vpc-demo")
    vpc["cidrs"] = ["2001:db8:1::/56", "127.0.0.0/8", "fd00:1::/64"]  # IPv6 first: item 17's case
    vpc["subnets"][0]["ipv6_cidrs"] = ["2001:db8:1:1::/64"]
    instance = next(i for i in document["instances"] if i["id"] == VPC_INSTANCE)
    primary = instance["interfaces"][0]
    primary["ipv6s"] = ["2001:db8:1:1::10", "2001:db8:1:1::11"]
    second = {**primary, "id": "eni-second", "device_index": 1, "mac": "d0:0d:de:00:01:99",
              "private_ips": ["127.0.0.99"], "public_ip": None, "ipv6s": ["2001:db8:1:1::99"]}
    instance["interfaces"].append(second)
    return document


@pytest.fixture
def vpc_server(start):
    return start(dual_stack_view(), listen=(Listen("127.0.0.1", 0, "vpc-demo"),))


def get(server, path: str, source: str = "127.0.0.1") -> tuple[int, str]:
    status, _, body = parse(request(server.port, "GET", "/latest/meta-data/" + path, source=source))
    return status, body.decode()


def test_each_range_leaf_serves_one_family(vpc_server):
    assert get(vpc_server, "instance-id") == (200, VPC_INSTANCE)
    macs = "network/interfaces/macs/"
    for mac in ("d0:0d:de:00:01:01", "d0:0d:de:00:01:99"):
        assert get(vpc_server, macs + mac + "/vpc-ipv4-cidr-block") == (200, "127.0.0.0/8")
        assert get(vpc_server, macs + mac + "/vpc-ipv4-cidr-blocks") == (200, "127.0.0.0/8")
        assert get(vpc_server, macs + mac + "/vpc-ipv6-cidr-blocks") == (200, "2001:db8:1::/56\nfd00:1::/64")
        assert get(vpc_server, macs + mac + "/subnet-ipv4-cidr-block") == (200, "127.0.0.0/24")
        assert get(vpc_server, macs + mac + "/subnet-ipv6-cidr-blocks") == (200, "2001:db8:1:1::/64")
    listing = get(vpc_server, macs + "d0:0d:de:00:01:99/")[1].split("\n")
    assert {"ipv6s", "subnet-ipv6-cidr-blocks", "vpc-ipv6-cidr-blocks"} <= set(listing)
    assert get(vpc_server, "ipv6") == (200, "2001:db8:1:1::10")
    assert "ipv6" in get(vpc_server, "")[1].split("\n")


def test_ipv4_only_networks_have_no_ipv6_leaves(start):
    server = start(listen=(Listen("127.0.0.1", 0, "vpc-demo"),))
    mac = "d0:0d:de:00:01:01"
    assert get(server, f"network/interfaces/macs/{mac}/vpc-ipv4-cidr-blocks") == (200, "127.0.0.0/8")
    for leaf in ("vpc-ipv6-cidr-blocks", "subnet-ipv6-cidr-blocks"):
        assert get(server, f"network/interfaces/macs/{mac}/{leaf}")[0] == 404, leaf
    assert get(server, "ipv6")[0] == 404
    assert "ipv6" not in get(server, "")[1].split("\n")


def test_an_ipv6_range_in_a_subnets_cidr_is_served_as_ipv6(start):
    # Views written before ipv6_cidrs existed could only put an IPv6 range in cidr.
    document = dual_stack_view()
    subnet = next(n for n in document["networks"] if n["id"] == "vpc-demo")["subnets"][0]
    subnet["cidr"] = "2001:db8:1:2::/64"
    del subnet["ipv6_cidrs"]
    server = start(document, listen=(Listen("127.0.0.1", 0, "vpc-demo"),))
    mac = "d0:0d:de:00:01:01"
    assert get(server, f"network/interfaces/macs/{mac}/subnet-ipv4-cidr-block")[0] == 404
    assert get(server, f"network/interfaces/macs/{mac}/subnet-ipv6-cidr-blocks") == (200, "2001:db8:1:2::/64")


CLOUD_INIT = textwrap.dedent("""
    import json, sys
    from cloudinit.sources.helpers import ec2
    from cloudinit.sources import DataSourceEc2
    md = ec2.get_instance_metadata(api_version="2021-03-23", metadata_address=sys.argv[1], retries=0, timeout=5)
    config = DataSourceEc2.convert_ec2_metadata_network_config(
        md["network"], macs_to_nics={"d0:0d:de:00:01:01": "eth0", "d0:0d:de:00:01:99": "eth1"})
    print(json.dumps({"md": md, "config": config}, default=str))
""")


def test_cloud_init_reads_the_ipv6_ranges(vpc_server):
    # cloud-init's EC2 datasource crawls the tree and converts the MAC tree to its network
    # configuration.  Debian 12's 22.4 reads ipv6s there; later releases also route a
    # secondary interface's IPv6 traffic by subnet-ipv6-cidr-blocks (policy routing), which
    # therefore has to be in the crawl.
    pythonpath = cloud_init_pythonpath()
    if pythonpath is None:
        pytest.skip("cloud-init is not extracted in .venv/debroot (bash tests/run does it with apt-get download)")
    result = subprocess.run([sys.executable, "-c", CLOUD_INIT, vpc_server.base.rstrip("/")],
                            capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": pythonpath,
                                 "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    md, config = out["md"], out["config"]
    assert md["ipv6"] == "2001:db8:1:1::10"
    second = md["network"]["interfaces"]["macs"]["d0:0d:de:00:01:99"]
    assert second["subnet-ipv6-cidr-blocks"] == "2001:db8:1:1::/64"
    assert second["vpc-ipv6-cidr-blocks"] == ["2001:db8:1::/56", "fd00:1::/64"]  # cloud-init splits lines
    assert second["vpc-ipv4-cidr-blocks"] == "127.0.0.0/8"
    assert config["ethernets"]["eth1"]["dhcp6"] is True
    assert config["ethernets"]["eth0"]["addresses"] == ["2001:db8:1:1::11/128"]
