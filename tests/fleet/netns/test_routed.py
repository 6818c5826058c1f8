"""The documented fleet on a real routed network (topology.py): anycast through a BIRD router, real clients.

Needs root (network namespaces), BIRD 2 and curl; skipped with the reason
otherwise.  One topology for the module; the failures are injected one after
the other, each during a boot storm from both instance subnets, and each test
leaves the three gateways announced again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.fleet.netns.topology import (
    CONTAINER_ADDRESS,
    DNS_ADDRESS,
    INTERNAL_DOMAIN,
    METADATA_ADDRESS,
    ROLE_ACCESS_KEY,
    RoutedFleet,
    instance_addresses,
)
from tests.support import cloud_init_pythonpath, extracted_client

BASE = f"http://{METADATA_ADDRESS}"


def curl(namespace, *argv: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return namespace.run("curl", "-sS", "--noproxy", "*", *argv, check=False, timeout=timeout)


def admin(gateway, path: str) -> tuple[int, str]:
    result = gateway.namespace.run("curl", "-s", "-o", "-", "-w", "\n%{http_code}", f"http://127.0.0.1:9169{path}",
                                   check=False)
    body, _, status = result.stdout.rpartition("\n")
    return int(status or 0), body


def client_environment(**extra: str) -> dict[str, str]:
    """The environment for a client in an instance namespace: no proxy, the venv's Python path left out."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "PYTHONPATH"}
    return {**env, **extra}


def ec2_metadata_command() -> str | None:
    """amazon-ec2-utils' ec2-metadata: extracted by tests/run, or installed."""
    extracted = extracted_client("ec2-metadata")
    return str(extracted) if extracted is not None else shutil.which("ec2-metadata")


CLOUD_INIT_CRAWL = textwrap.dedent("""
    import json, sys
    from cloudinit import url_helper
    from cloudinit.sources.helpers import ec2
    base = sys.argv[1]
    token = url_helper.readurl(base + "/latest/api/token", request_method="PUT", timeout=5, retries=2,
                               headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"}).contents.decode()
    headers = lambda _url: {"X-aws-ec2-metadata-token": token}
    md = ec2.get_instance_metadata(api_version="2021-03-23", metadata_address=base, timeout=5, retries=2,
                                   headers_cb=headers)
    ud = ec2.get_instance_userdata(api_version="2021-03-23", metadata_address=base, timeout=5, retries=2,
                                   headers_cb=headers)
    print(json.dumps({"md": md, "ud": ud.decode() if isinstance(ud, bytes) else ud}, default=str))
""")

BOTOCORE_CREDENTIALS = textwrap.dedent("""
    import json
    from botocore.utils import InstanceMetadataFetcher
    credentials = InstanceMetadataFetcher(timeout=5, num_attempts=2).retrieve_iam_role_credentials()
    print(json.dumps({"access_key": credentials.get("access_key"), "token": credentials.get("token")}))
""")


def storm_summary(report: dict) -> str:
    return (f"boots={report['boots']} failed_boots={report['failed_boots']} requests={report['requests']} "
            f"failed_attempts={report['failed_attempts']} longest_gap={report['longest_gap']:.2f}s")


def during_storm(fleet: RoutedFleet, inject, settle: float = 1.5, duration: float = 6.0) -> dict:
    storm = fleet.start_storm(duration=duration)
    time.sleep(settle)  # the storm is under way on every gateway
    inject()
    return fleet.finish_storm(storm)


def survivors(fleet: RoutedFleet, gone) -> list[str]:
    return [g.link_address for g in fleet.gateways if g is not gone]


def test_1_three_next_hops_for_both_service_addresses(routed_fleet: RoutedFleet) -> None:
    assert routed_fleet.next_hops(METADATA_ADDRESS) == routed_fleet.gateway_hops()
    assert routed_fleet.next_hops(DNS_ADDRESS) == routed_fleet.gateway_hops()
    for gateway in routed_fleet.gateways:
        assert gateway.announcing()


def test_2_real_clients_through_the_router(routed_fleet: RoutedFleet) -> None:
    fleet = routed_fleet
    a, b = fleet.instances["a"], fleet.instances["b"]
    first_a = instance_addresses("a", 1)[0]  # a's own address; its instance requires tokens
    # ec2-metadata (amazon-ec2-utils) always uses IMDSv2; its token PUT has no timeout, so a token answer
    # dying at the router would hang it: the subprocess timeout turns that into a failure.
    ec2_metadata = ec2_metadata_command()
    if ec2_metadata is None:
        pytest.skip("ec2-metadata is not available (amazon-ec2-utils; bash tests/run extracts it)")
    result = a.run(ec2_metadata, "--instance-id", "--local-ipv4", check=False, timeout=30, env=client_environment())
    assert result.returncode == 0, result.stderr
    assert f"instance-id: {fleet.expected[first_a]}" in result.stdout
    assert f"local-ipv4: {first_a}" in result.stdout

    # cloud-init's EC2 crawl with a token, from subnet B.
    pythonpath = cloud_init_pythonpath()
    if pythonpath is None:
        pytest.skip("cloud-init is not extracted into .venv/debroot (bash tests/run does it)")
    crawl = b.run(sys.executable, "-c", CLOUD_INIT_CRAWL, BASE, check=False, timeout=60,
                  env=client_environment(PYTHONPATH=pythonpath))
    assert crawl.returncode == 0, crawl.stderr
    document = json.loads(crawl.stdout)
    first_b = instance_addresses("b", 1)[0]
    assert document["md"]["instance-id"] == fleet.expected[first_b]
    assert document["md"]["local-ipv4"] == first_b
    assert document["ud"].startswith("#cloud-config")

    # botocore's credential provider (IMDSv2, then the role's credentials).
    boto = a.run(sys.executable, "-c", BOTOCORE_CREDENTIALS, check=False, timeout=60, env=client_environment())
    assert boto.returncode == 0, boto.stderr
    assert json.loads(boto.stdout)["access_key"] == ROLE_ACCESS_KEY

    # DNS through the anycast address: dig, and glibc's resolver with the namespace's resolv.conf.
    neighbour = instance_addresses("a", 2)[1]
    name = "ip-" + neighbour.replace(".", "-")
    dig = b.run("dig", "+short", "+tries=3", "+time=2", f"@{DNS_ADDRESS}", f"{name}.{INTERNAL_DOMAIN}", check=False)
    assert dig.stdout.split() == [neighbour], dig
    reverse = b.run("dig", "+short", "+tries=3", "+time=2", f"@{DNS_ADDRESS}", "-x", neighbour, check=False)
    assert reverse.stdout.split() == [f"{name}.{INTERNAL_DOMAIN}."], reverse
    getent = b.run("getent", "ahostsv4", name, check=False)
    assert getent.returncode == 0 and getent.stdout.split()[0] == neighbour, getent


def test_3_a_container_behind_an_instance_is_refused_a_token(routed_fleet: RoutedFleet) -> None:
    fleet = routed_fleet
    container = fleet.container
    # The view knows the container's address (as NAT would make it the instance's): reads work...
    read = curl(container, "-f", "--max-time", "10", f"{BASE}/latest/meta-data/instance-id")
    assert read.returncode == 0 and read.stdout == fleet.expected[CONTAINER_ADDRESS], read
    # ... but the token answer, with TTL hop_limit (1) + gateway_hops (1), dies at the instance.
    token = curl(container, "-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60", "--max-time", "3",
                 f"{BASE}/latest/api/token")
    assert token.returncode == 28 and token.stdout == "", token  # 28: timed out
    # One hop closer, the instance itself gets its token.
    own = curl(fleet.instances["a"], "-f", "-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60",
               "--max-time", "10", f"{BASE}/latest/api/token")
    assert own.returncode == 0 and len(own.stdout) == 56, own


def test_4_kill_9_withdraws_the_route_at_once_and_no_boot_fails(routed_fleet: RoutedFleet) -> None:
    fleet = routed_fleet
    victim = fleet.gateways[0]  # two workers behind a supervisor
    health_log = victim.root / "health.log"
    health_before = health_log.read_text()
    stop_posts = victim.stop_posts
    killed: list[float] = []

    def kill() -> None:
        killed.append(time.monotonic())
        os.kill(victim.edge.popen.pid, signal.SIGKILL)
        fleet.wait_routes(survivors(fleet, victim), timeout=15)
        killed.append(time.monotonic())

    report = during_storm(fleet, kill)
    print(f"\nkill -9 gw1: route gone after {killed[1] - killed[0]:.2f}s; storm {storm_summary(report)}")
    # The unit's stop path withdrew it, not edge-route-health (whose checks had not failed twice yet).
    assert victim.stop_posts == stop_posts + 1
    assert "disable edge_service:" not in health_log.read_text()[len(health_before):]
    assert report["failed_boots"] == 0, report["failures"][:10]
    assert report["boots"] > 50
    victim.start_edge()
    fleet.wait_routes(fleet.gateway_hops(), timeout=30)


def test_5_sigterm_drains_without_losing_a_request(routed_fleet: RoutedFleet) -> None:
    fleet = routed_fleet
    victim = fleet.gateways[1]
    report = during_storm(fleet, lambda: victim.edge.popen.send_signal(signal.SIGTERM))
    print(f"\nSIGTERM gw2: storm {storm_summary(report)}")
    victim.wait_edge_gone()
    assert victim.edge.popen.returncode == 0
    assert fleet.next_hops() == survivors(fleet, victim)
    # No request reached a gateway that had stopped listening while its route was still up. (The
    # router's hash-threshold ECMP moves a few flows of the surviving gateways when a next hop leaves:
    # a connection in flight at that instant is reset, and its client retries.)
    refused = [failure for failure in report["failures"] if "Refused" in failure[2]]
    assert not refused, refused[:10]
    assert report["failed_attempts"] <= 3, report["failures"][:10]
    assert report["failed_boots"] == 0
    victim.start_edge()
    fleet.wait_routes(fleet.gateway_hops(), timeout=30)


def test_6_link_down_bfd_moves_the_flows(routed_fleet: RoutedFleet) -> None:
    fleet = routed_fleet
    victim = fleet.gateways[2]
    timing: list[float] = []

    def cut() -> None:
        victim.link(up=False)
        timing.append(fleet.wait_routes(survivors(fleet, victim), timeout=15))

    report = during_storm(fleet, cut)
    print(f"\nlink down gw3: route gone after {timing[0]:.2f}s (BFD); storm {storm_summary(report)}")
    assert report["failed_boots"] == 0, report["failures"][:10]
    victim.link(up=True)
    # After the BFD-reported failure each side's BGP session waits BIRD's "error wait time" (60 s
    # by default) before it connects again, counted from the cut: the route comes back some 60-70 s
    # after the link went down, so a minute from the link coming up is too tight a bound.
    fleet.wait_routes(fleet.gateway_hops(), timeout=150)


def test_7_restart_while_the_control_plane_is_down(routed_fleet: RoutedFleet) -> None:
    fleet = routed_fleet
    victim = fleet.gateways[0]  # two workers: the supervisor loads the last good view, the workers follow it
    fleet.stop_control_plane()
    try:
        for gateway in fleet.gateways:
            wait = time.monotonic() + 20
            while json.loads(admin(gateway, "/view")[1] or "{}").get("consecutive_failures", 0) < 1:
                assert time.monotonic() < wait, f"gw{gateway.number} did not notice the control plane is down"
                time.sleep(0.1)
        restarted: list[float] = []

        def restart() -> None:
            victim.edge.popen.send_signal(signal.SIGTERM)
            victim.wait_edge_gone()
            victim.start_edge()
            began = time.monotonic()
            while admin(victim, "/readyz")[0] != 200:
                assert time.monotonic() - began < 30, victim.edge_log()
                time.sleep(0.02)
            restarted.append(time.monotonic() - began)

        report = during_storm(fleet, restart, duration=8.0)
        print(f"\nrestart gw1 with the control plane down: ready after {restarted[0]:.2f}s; "
              f"storm {storm_summary(report)}")
        view = json.loads(admin(victim, "/view")[1])
        assert view["serial"] == 1 and view["loaded_from"] == "state"
        assert report["failed_boots"] == 0, report["failures"][:10]
        fleet.wait_routes(fleet.gateway_hops(), timeout=30)
    finally:
        fleet.start_control_plane()
