"""Realistic generated views for tests and benchmarks (``from bench.generate import generate_view``).

It lives in bench/, not in the installed package: tests and benchmarks both
run from the repository root, and a server needs no view generator.

``generate_view(instances=N, networks=M)`` spreads N instances over M VPC-like
networks whose CIDRs overlap (every network uses ``10.0.0.0/16`` ..), gives
about a third of them public IPs, and fills in user-data, keys, tags, IAM
profiles and block devices the way a real cloud's view would.  The same seed
gives the same document.  ``loopback=True`` puts the instances of the flat
network on ``127.x.y.z`` so load generators can speak as each instance.
"""

from __future__ import annotations

import base64
import random
from typing import Any

_TYPES = ("t2.micro", "t2.small", "m5.large", "c5.xlarge", "r5.2xlarge")


def _address(base: tuple[int, int], index: int) -> str:
    # Skip .0/.255 host bytes and the first 16 addresses of every /24 (gateways, resolvers).
    per_subnet = 230
    subnet, host = divmod(index, per_subnet)
    return f"{base[0]}.{base[1] + subnet // 256}.{subnet % 256}.{host + 16}"


def generate_view(instances: int = 1000, networks: int = 4, seed: int = 1, serial: int = 1,
                  loopback: bool = False, user_data_bytes: int = 256) -> dict[str, Any]:
    """An ``edge-view/1`` document with ``instances`` instances over ``networks`` networks."""
    rng = random.Random(seed)
    network_ids = [f"vpc-{n:08x}" for n in range(networks)]
    docs_networks: list[dict[str, Any]] = []
    for number, network_id in enumerate(network_ids):
        cidr = "127.0.0.0/8" if loopback and number == 0 else "10.0.0.0/8"
        docs_networks.append({
            "id": "" if loopback and number == 0 else network_id,
            "cidrs": [cidr],
            "subnets": [{"id": f"subnet-{number:08x}", "cidr": cidr, "availability_zone": f"zone-{number % 3}"}],
        })
    counters = [0] * networks
    docs_instances = []
    public_counter = 0
    for index in range(instances):
        number = index % networks
        network = docs_networks[number]["id"]
        host_index = counters[number]
        counters[number] += 1
        base = (127, 0) if loopback and number == 0 else (10, 0)
        private_ip = _address(base, host_index)
        public_ip = None
        if index % 3 == 0:
            public_counter += 1
            public_ip = f"100.{64 + public_counter // 65536}.{(public_counter // 256) % 256}.{public_counter % 256}"
        iid = f"i-{rng.getrandbits(64):016x}"
        mac = "d0:0d:" + ":".join(f"{(index >> shift) & 0xff:02x}" for shift in (24, 16, 8, 0))
        user_data = None
        if user_data_bytes:
            raw = (f"#cloud-config\nhostname: host-{index}\n" + "#" * user_data_bytes)[:user_data_bytes]
            user_data = base64.b64encode(raw.encode()).decode()
        instance: dict[str, Any] = {
            "id": iid,
            "reservation_id": f"r-{rng.getrandbits(32):08x}",
            "account_id": f"{100000000000 + index % 50:012d}",
            "image_id": f"emi-{rng.getrandbits(32):08x}",
            "kernel_id": None,
            "ramdisk_id": None,
            "instance_type": _TYPES[index % len(_TYPES)],
            "architecture": "x86_64",
            "launch_index": 0,
            "launch_time": "2026-11-24T08:00:00Z",
            "availability_zone": f"zone-{number % 3}",
            "interfaces": [{
                "id": f"eni-{rng.getrandbits(32):08x}", "mac": mac, "device_index": 0,
                "network": network, "subnet": f"subnet-{number:08x}",
                "private_ips": [private_ip], "public_ip": public_ip, "ipv6s": [],
                "security_groups": [{"id": f"sg-{number:08x}", "name": "default"}],
            }],
            "public_keys": [{"name": f"key-{index % 20}",
                             "openssh": f"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{index:030d} key-{index % 20}"}],
            "user_data": user_data,
            "tags": {"Name": f"host-{index}", "team": f"team-{index % 7}"},
            "block_devices": {"ami": "/dev/sda1", "root": "/dev/sda1"},
            "metadata_options": {"http_tokens": "optional", "hop_limit": 1, "tags": index % 2 == 0,
                                 "endpoint": "enabled"},
        }
        if index % 2 == 0:
            instance["iam"] = {
                "instance_profile_arn": f"arn:aws:iam::{instance['account_id']}:instance-profile/role-{index % 10}",
                "instance_profile_id": f"AIPA{index:016d}",
                "role": f"role-{index % 10}",
            }
        docs_instances.append(instance)
    return {
        "format": "edge-view/1",
        "serial": serial,
        "generated": "2026-11-24T08:00:00Z",
        "cloud": {
            "region": "generated-1",
            "partition": "aws",
            "services_domain": "amazonaws.com",
            "internal_domain": "gen.internal",
            "public_domain": "gen.example",
            "private_name_template": "ip-{ip}",
            "public_name_template": "ec2-{ip}",
            "dns_ttl": 60,
            "negative_ttl": 30,
            "upstream_resolvers": [],
            "dns_records": [{"name": "api.gen.example", "type": "A", "value": "100.64.255.1", "ttl": 300}],
        },
        "networks": docs_networks,
        "instances": docs_instances,
    }
