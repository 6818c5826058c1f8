"""The [dns] configuration keys load from TOML and the environment and are range-checked."""

from __future__ import annotations

import pytest

from edge.config import load_config
from edge.errors import ConfigError


def test_dns_keys_from_toml_and_environment(tmp_path):
    path = tmp_path / "edge.toml"
    path.write_text('[dns]\nupstreams = ["127.0.0.1:5353", "[::1]:53"]\nrecursion_cidrs = ["10.0.0.0/8"]\n'
                    "cache_size = 10\nserve_stale = 0\n")
    config = load_config(str(path), env={"EDGE_DNS_RATE_LIMIT": "20", "EDGE_DNS_RECURSION_CIDRS": "192.0.2.0/24"})
    assert config.dns.upstreams == ("127.0.0.1:5353", "[::1]:53")
    assert config.dns.recursion_cidrs == ("192.0.2.0/24",)
    assert config.dns.cache_size == 10 and config.dns.serve_stale == 0.0 and config.dns.rate_limit == 20.0


@pytest.mark.parametrize("key,value", [
    ("EDGE_DNS_UPSTREAMS", "not-an-address"),
    ("EDGE_DNS_RECURSION_CIDRS", "10.0.0.0/33"),
    ("EDGE_DNS_EDNS_PAYLOAD", "100"),
    ("EDGE_DNS_UPSTREAM_TIMEOUT", "0"),
    ("EDGE_DNS_CACHE_SIZE", "0"),
    ("EDGE_DNS_RATE_LIMIT", "-1"),
    ("EDGE_DNS_INSTANCE_DATA_ADDRESS", "169.254.169.254:80"),
    ("EDGE_DNS_ANSWER_MEMO_SIZE", "0"),
])
def test_bad_dns_values_are_rejected(key, value):
    with pytest.raises(ConfigError):
        load_config(None, env={key: value})
