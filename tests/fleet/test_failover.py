"""Failover, proven: three gateways, a client population, and the failures a fleet exists for.

Scenarios run in order on one fleet (module fixture); each leaves every gateway
running and serving the newest good view.
"""

from __future__ import annotations

import threading
import time

import dns.message
import dns.query
import dns.rdatatype

from tests.fleet.conftest import BACKOFF_MAX, JITTER, POLL_INTERVAL, Fleet, fleet_document, start_gateways
from tests.fleet.load import LoadReport, run_clients, run_dns_clients
from tests.support import wait_until

INSTANCE_ID = "/latest/meta-data/instance-id"


def answers_everyone(fleet: Fleet, path: str = INSTANCE_ID, expected: dict[str, str] | None = None) -> None:
    """Every gateway gives every client address its own metadata answer, and resolves its neighbours' names."""
    expected = expected or fleet.expected
    for gateway in fleet.gateways:
        for source, instance_id in expected.items():
            answer = gateway.get(path, source=source)
            assert (answer.status, answer.body.decode()) == (200, instance_id), (gateway.name, source)
        for address in sorted(expected)[:5]:
            name = "ip-" + address.replace(".", "-") + ".gen.internal."
            query = dns.message.make_query(name, dns.rdatatype.A)
            response = dns.query.udp(query, gateway.host, port=gateway.dns_port, timeout=2,
                                     source=sorted(expected)[-1])
            assert [r.address for rrset in response.answer for r in rrset] == [address], (gateway.name, name)


def time_until_served(fleet: Fleet, path: str, value: str, timeout: float) -> dict[str, float]:
    """Monotonic time at which each gateway first answered ``value`` at ``path``."""
    seen: dict[str, float] = {}
    source = sorted(fleet.expected)[0]

    def watch(gateway) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if gateway.get(path, source=source, timeout=1).body.decode() == value:
                    seen[gateway.name] = time.monotonic()
                    return
            except OSError:
                pass
            time.sleep(0.01)

    threads = [threading.Thread(target=watch, args=(g,)) for g in fleet.gateways]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return seen


def test_1_kill_9_mid_load_clients_move_on_and_never_see_a_wrong_answer(fleet: Fleet) -> None:
    victim = fleet.gateways[0]
    dns_endpoints = [(g.host, g.dns_port) for g in fleet.gateways]
    dns_report: list[LoadReport] = []
    resolvers = threading.Thread(target=lambda: dns_report.append(
        run_dns_clients(dns_endpoints, fleet.expected, "gen.internal", duration=3.0, threads=2)))
    resolvers.start()
    killer = threading.Timer(1.0, victim.kill)
    killer.start()
    report = run_clients(fleet.endpoints, fleet.expected, duration=3.0, threads=6)
    killer.join()
    resolvers.join()
    print(f"\nscenario 1 (kill -9 one of 3 gateways mid-load): metadata {report.summary()}")
    print(f"scenario 1: DNS {dns_report[0].summary()}")
    assert report.wrong == 0 and report.unanswered == 0 and report.bad_status == 0
    dns = dns_report[0]
    assert dns.wrong == 0 and dns.unanswered == 0 and dns.bad_status == 0 and dns.answered > 50
    # A UDP query lost with the gateway costs one timeout, at most once per resolver thread.
    assert dns.in_flight_errors <= 2
    assert dns.per_gateway[f"{victim.host}:{victim.dns_port}"] > 0
    assert report.answered > 100
    # Errors only for requests in flight on the dead gateway: at most one per client thread.
    assert report.in_flight_errors <= 6
    # It served before it died, and the survivors took its clients.
    victim_name = f"{victim.host}:{victim.metadata_port}"
    assert report.per_gateway[victim_name] > 0
    assert all(report.per_gateway[f"{g.host}:{g.metadata_port}"] > 0 for g in fleet.gateways[1:])
    start_gateways([victim])
    answers_everyone(fleet)


def test_2_a_token_from_one_gateway_is_accepted_by_the_others(fleet: Fleet) -> None:
    source, instance_id = sorted(fleet.expected.items())[1]
    other_source = sorted(fleet.expected)[2]
    a, b, c = fleet.gateways
    token = a.token(source=source)
    for gateway in (a, b, c):
        answer = gateway.get(INSTANCE_ID, source=source, token=token)
        assert (answer.status, answer.body.decode()) == (200, instance_id)
        # The token is the instance's own: another instance cannot use it anywhere.
        assert gateway.get(INSTANCE_ID, source=other_source, token=token).status == 401
    token_c = c.token(source=source)
    assert a.get(INSTANCE_ID, source=source, token=token_c).status == 200


def test_3_4_5_control_plane_outage_restart_and_return(fleet: Fleet) -> None:
    a, b, c = fleet.gateways
    # 3. Control plane stopped: everyone keeps answering from the last view.
    fleet.plane.stop()
    for gateway in fleet.gateways:
        wait_until(lambda g=gateway: g.view_summary()["consecutive_failures"] >= 2, timeout=10)
    answers_everyone(fleet)
    assert a.admin("/readyz").status == 200 and b.admin("/readyz").status == 200
    # ... unless a maximum view age says otherwise (gw3 has 2 s): then it reports 503 but still answers.
    wait_until(lambda: c.admin("/readyz").status == 503, timeout=10)
    assert b"view" in c.admin("/readyz").body
    answers_everyone(fleet)

    # 4. A gateway restarted while the control plane is down answers from its last good view at once.
    b.stop()
    b.start(wait=False)
    to_first_answer = b.wait_answering(timeout=10)
    print(f"\nscenario 4: restarted gateway answered {to_first_answer:.2f}s after start, control plane down")
    assert to_first_answer < 10
    assert b.view_summary()["serial"] == 1 and b.view_summary()["loaded_from"] == "state"
    answers_everyone(fleet)
    assert b.admin("/readyz").status == 200

    # 5. The control plane comes back with a new serial: every gateway serves it within a poll or so.
    fleet.publish(fleet_document(2, instance_type="x9.fleet"))
    fleet.plane.restart()
    published = time.monotonic()
    seen = time_until_served(fleet, "/latest/meta-data/instance-type", "x9.fleet", timeout=15)
    assert set(seen) == {g.name for g in fleet.gateways}, seen
    delays = {name: round(at - published, 3) for name, at in sorted(seen.items())}
    spread = max(seen.values()) - min(seen.values())
    print(f"scenario 5: new serial served after {delays}s, spread {spread:.3f}s "
          f"(poll interval {POLL_INTERVAL}s, backoff cap {BACKOFF_MAX}s, jitter {JITTER:.0%})")
    bound = max(POLL_INTERVAL, BACKOFF_MAX) * (1 + JITTER)
    # A generous multiple: the bound checks correctness (every gateway converges), not speed.
    assert max(delays.values()) < bound + 5
    for gateway in fleet.gateways:
        wait_until(lambda g=gateway: g.admin("/readyz").status == 200, timeout=5)
        assert gateway.serial() == 2


def test_6_a_bad_view_is_rejected_everywhere_and_nobody_stops_serving(fleet: Fleet) -> None:
    bad = fleet_document(3, instance_type="x9.bad")
    bad["instances"][0]["interfaces"][0]["mac"] = "not-a-mac"
    bad["instances"][1]["interfaces"][0]["private_ips"] = ["10.99.0.1"]
    fleet.publish(bad)
    for gateway in fleet.gateways:
        wait_until(lambda g=gateway: g.view_summary()["last_poll_result"] == "rejected", timeout=10)
        summary = gateway.view_summary()
        assert summary["serial"] == 2 and "not-a-mac" in summary["last_poll_error"]
        assert "view rejected" in gateway.log()
    answers_everyone(fleet)
    for gateway in fleet.gateways:
        assert gateway.get("/latest/meta-data/instance-type", gateway.probe_source).body == b"x9.fleet"
        assert gateway.admin("/readyz").status == 200
    # Not even valid JSON: same outcome.
    fleet.plane.body = b'{"format": "edge-view/1", "serial": 4, '
    for gateway in fleet.gateways:
        wait_until(lambda g=gateway: "not valid JSON" in (g.view_summary()["last_poll_error"] or ""), timeout=10)
    answers_everyone(fleet)
    # A good view afterwards is taken as usual.
    fleet.publish(fleet_document(5))
    for gateway in fleet.gateways:
        wait_until(lambda g=gateway: g.serial() == 5, timeout=10)
    answers_everyone(fleet)
