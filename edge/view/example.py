"""A starter ``edge-view/1`` document (``edge view example``): one of everything a producer writes.

Unlike the demo view (loopback addresses, so ``edge serve`` answers on one
machine), this is shaped like a real cloud: a flat network and a dual-stack
VPC with two subnets, an instance on each, one with a second interface.
``docs/view-format.md`` shows the same document (a test keeps them equal).
"""

from __future__ import annotations

import base64
import json
from typing import Any


def example_document() -> dict[str, Any]:
    """A fresh copy of the example document."""
    return {
        "format": "edge-view/1",
        "serial": 1042,
        "generated": "2026-12-01T09:30:00Z",
        "cloud": {
            "region": "region-one",
            "partition": "aws",
            "services_domain": "amazonaws.com",
            "internal_domain": "compute.internal",
            "public_domain": "cloud.example.com",
            "private_name_template": "ip-{ip}",
            "public_name_template": "ec2-{ip}",
            "dns_ttl": 60,
            "negative_ttl": 30,
            "upstream_resolvers": ["192.0.2.53", "[2001:db8::53]:53"],
            "dns_records": [
                {"name": "api.cloud.example.com", "type": "A", "value": "192.0.2.10", "ttl": 300},
                {"name": "www.cloud.example.com", "type": "CNAME", "value": "api.cloud.example.com"},
                {"name": "cloud.example.com", "type": "MX", "value": "10 mail.cloud.example.com"},
            ],
        },
        "networks": [
            {"id": "", "cidrs": ["172.31.0.0/16"],
             "subnets": [{"id": "subnet-flat", "cidr": "172.31.0.0/16", "availability_zone": "zone-a"}]},
            {"id": "vpc-0a1b2c3d", "cidrs": ["10.0.0.0/16", "2001:db8:100::/56"],
             "subnets": [
                 {"id": "subnet-11aa22bb", "cidr": "10.0.1.0/24", "ipv6_cidrs": ["2001:db8:100:1::/64"],
                  "availability_zone": "zone-a"},
                 {"id": "subnet-33cc44dd", "cidr": "10.0.2.0/24", "ipv6_cidrs": ["2001:db8:100:2::/64"],
                  "availability_zone": "zone-b"},
             ]},
        ],
        "instances": [
            {
                "id": "i-0123456789abcdef0",
                "reservation_id": "r-0fedcba987654321",
                "account_id": "000123456789",
                "image_id": "emi-0a1b2c3d",
                "instance_type": "m5.large",
                "architecture": "x86_64",
                "launch_index": 0,
                "launch_time": "2026-12-01T09:00:00Z",
                "availability_zone": "zone-a",
                "interfaces": [
                    {"id": "eni-0aa11bb22cc33dd44", "mac": "d0:0d:12:34:56:78", "device_index": 0,
                     "network": "vpc-0a1b2c3d", "subnet": "subnet-11aa22bb",
                     "private_ips": ["10.0.1.5", "10.0.1.6"], "public_ip": "203.0.113.25",
                     "ipv6s": ["2001:db8:100:1::5"], "owner_id": "000123456789",
                     "security_groups": [{"id": "sg-0a0b0c0d", "name": "web"}]},
                    {"id": "eni-0ee55ff66aa77bb88", "mac": "d0:0d:12:34:56:79", "device_index": 1,
                     "network": "vpc-0a1b2c3d", "subnet": "subnet-33cc44dd",
                     "private_ips": ["10.0.2.5"], "ipv6s": ["2001:db8:100:2::5"],
                     "security_groups": [{"id": "sg-0e0f0a0b", "name": "backend"}]},
                ],
                "public_keys": [{"name": "admin", "openssh": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyOnly admin"}],
                "user_data": base64.b64encode(b"#cloud-config\nhostname: web-1\n").decode(),
                "iam": {"instance_profile_arn": "arn:aws:iam::000123456789:instance-profile/web",
                        "instance_profile_id": "AIPAEXAMPLE0000000001", "role": "web"},
                "tags": {"Name": "web-1", "team": "storefront"},
                "block_devices": {"ami": "/dev/sda1", "root": "/dev/sda1", "ephemeral0": "sdb"},
                "metadata_options": {"http_tokens": "required", "hop_limit": 2, "tags": True,
                                     "endpoint": "enabled"},
            },
            {
                "id": "i-0fedcba9876543210",
                "account_id": "000123456789",
                "image_id": "emi-0a1b2c3d",
                "instance_type": "t3.small",
                "availability_zone": "zone-a",
                "interfaces": [
                    {"id": "eni-0cc99dd00ee11ff22", "mac": "d0:0d:ab:cd:ef:01",
                     "private_ips": ["172.31.4.20"], "public_ip": "203.0.113.26"},
                ],
            },
        ],
    }


def example_text() -> str:
    """The example as ``edge view example`` prints it."""
    return json.dumps(example_document(), indent=2) + "\n"
