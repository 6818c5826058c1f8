"""The embedded demo view: lets ``edge serve`` answer with no control plane.

The flat network ``""`` covers ``127.0.0.0/8``, so a request from
``127.0.0.1`` is the instance ``i-0de0000000000001`` (and ``127.0.0.2`` ..
``127.0.0.4`` are its neighbours).  A second network, ``vpc-demo``, reuses the
same loopback addresses to show overlapping address spaces; listeners bound to
it (``--metadata-listen 127.0.0.1:8170@vpc-demo``) see those instances.
"""

from __future__ import annotations

import base64
from typing import Any

DEMO_SOURCE = "demo"

_USER_DATA = b"#cloud-config\nhostname: demo-1\n"


def _instance(number: int, network: str, address: str, public: str | None, role: str | None,
              tokens: str = "optional") -> dict[str, Any]:
    mac = f"d0:0d:de:00:{0 if network == '' else 1:02x}:{number:02x}"
    instance: dict[str, Any] = {
        "id": f"i-0de{'0' if network == '' else '1'}{number:012x}",
        "reservation_id": f"r-0de{number:05x}",
        "account_id": "000123456789",
        "image_id": "emi-0de00001",
        "kernel_id": None,
        "ramdisk_id": None,
        "instance_type": "t2.micro",
        "architecture": "x86_64",
        "launch_index": number - 1,
        "launch_time": "2026-11-24T08:00:00Z",
        "availability_zone": "demo-1a",
        "interfaces": [{
            "id": f"eni-0de{'0' if network == '' else '1'}{number:05x}", "mac": mac, "device_index": 0,
            "network": network, "subnet": "subnet-0de00001" if network == "" else "subnet-0de10001",
            "private_ips": [address], "public_ip": public, "ipv6s": [],
            "security_groups": [{"id": "sg-0de00001", "name": "default"}],
        }],
        "public_keys": [{"name": "demo", "openssh": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDemoKeyDemoKeyDemoKeyDemoKeyDemoKey demo"}],
        "user_data": base64.b64encode(_USER_DATA).decode() if number == 1 else None,
        "tags": {"Name": f"demo-{number}"},
        "block_devices": {"ami": "/dev/sda1", "root": "/dev/sda1", "ephemeral0": "sdb"},
        "metadata_options": {"http_tokens": tokens, "hop_limit": 1, "tags": True, "endpoint": "enabled"},
    }
    if role:
        instance["iam"] = {
            "instance_profile_arn": f"arn:aws:iam::000123456789:instance-profile/{role}",
            "instance_profile_id": "AIPADEMO00000000001",
            "role": role,
        }
    return instance


def demo_document() -> dict[str, Any]:
    """A fresh copy of the demo view document (``edge-view/1``)."""
    instances = [
        _instance(1, "", "127.0.0.1", "198.51.100.1", "demo-role"),
        _instance(2, "", "127.0.0.2", "198.51.100.2", None),
        _instance(3, "", "127.0.0.3", None, None, tokens="required"),
        _instance(4, "", "127.0.0.4", None, None),
        _instance(1, "vpc-demo", "127.0.0.1", "198.51.100.11", None),
        _instance(2, "vpc-demo", "127.0.0.2", None, None),
    ]
    return {
        "format": "edge-view/1",
        "serial": 1,
        "generated": "2026-11-24T08:00:00Z",
        "cloud": {
            "region": "demo-1",
            "partition": "aws",
            "services_domain": "amazonaws.com",
            "internal_domain": "demo.internal",
            "public_domain": "demo.example",
            "private_name_template": "ip-{ip}",
            "public_name_template": "ec2-{ip}",
            "dns_ttl": 60,
            "negative_ttl": 30,
            "upstream_resolvers": [],
            "dns_records": [
                {"name": "gateway.demo.internal", "type": "A", "value": "127.0.0.254", "ttl": 300},
                {"name": "www.demo.example", "type": "CNAME", "value": "ec2-198-51-100-1.demo.example", "ttl": 300},
                {"name": "demo.example", "type": "MX", "value": "10 mail.demo.example", "ttl": 300},
                {"name": "mail.demo.example", "type": "A", "value": "198.51.100.25", "ttl": 300},
                {"name": "demo.example", "type": "TXT", "value": "v=spf1 -all", "ttl": 300},
                {"name": "_ldap._tcp.demo.internal", "type": "SRV", "value": "0 5 389 gateway.demo.internal", "ttl": 300},
            ],
        },
        "networks": [
            {"id": "", "cidrs": ["127.0.0.0/8"],
             "subnets": [{"id": "subnet-0de00001", "cidr": "127.0.0.0/8", "availability_zone": "demo-1a"}]},
            {"id": "vpc-demo", "cidrs": ["127.0.0.0/8"],
             "subnets": [{"id": "subnet-0de10001", "cidr": "127.0.0.0/24", "availability_zone": "demo-1a"}]},
        ],
        "instances": instances,
    }
