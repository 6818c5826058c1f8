"""Fleet failover, longer: three gateways under a client population, repeated kills and view changes.

Each round: clients load the fleet for ``--duration`` seconds and one gateway
(a different one each round) is killed with SIGKILL a third of the way in,
then restarted; then the control plane publishes a new serial and the time
each gateway first serves it is measured (convergence spread), once with the
control plane up all along and once after ``--outage`` seconds of outage.
Bounded: ``--rounds`` rounds, loopback only.

    python bench/fleet_failover.py --rounds 5 --duration 6 --instances 200
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fleet import conftest as fleet_setup  # noqa: E402
from tests.fleet.gateway import Gateway  # noqa: E402
from tests.fleet.load import LoadReport, run_clients, run_dns_clients  # noqa: E402

HOSTS = ("127.0.1.1", "127.0.1.2", "127.0.1.3")


def document(instances: int, serial: int) -> dict:
    from bench.generate import generate_view
    view = generate_view(instances=instances, networks=1, loopback=True, serial=serial, user_data_bytes=64)
    for instance in view["instances"]:
        instance["instance_type"] = f"serial-{serial}"
    return view


def convergence(gateways: list[Gateway], source: str, serial: int, since: float,
                timeout: float = 30) -> dict[str, float]:
    seen: dict[str, float] = {}

    def watch(gateway: Gateway) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                answer = gateway.get("/latest/meta-data/instance-type", source, timeout=1)
                if answer.body == f"serial-{serial}".encode():
                    seen[gateway.name] = time.monotonic() - since
                    return
            except OSError:
                pass
            time.sleep(0.005)

    threads = [threading.Thread(target=watch, args=(g,)) for g in gateways]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds of load per round")
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--threads", type=int, default=8, help="metadata client threads")
    parser.add_argument("--dns-threads", type=int, default=2, help="DNS resolver threads (UDP, 0.5 s timeout)")
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--jitter", type=float, default=0.2)
    parser.add_argument("--outage", type=float, default=3.0, help="seconds the control plane is down per round")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="edge-fleet-bench-"))
    key_file = root / "token-keys"
    from edge.metadata.tokens import generate_token_key_file
    generate_token_key_file(key_file)
    plane = fleet_setup.StoppableControlPlane()
    plane.start()
    serial = 1
    view = document(args.instances, serial)
    plane.publish(view)
    expected = fleet_setup.expected_ids(view)
    probe = sorted(expected)[0]
    common = ["--poll-interval", str(args.poll_interval), "--token-key-file", str(key_file), "--workers", "1"]
    env = {"EDGE_VIEW_BACKOFF_MAX": str(args.poll_interval), "EDGE_VIEW_POLL_JITTER": str(args.jitter),
           "EDGE_METADATA_RATE": "0", "EDGE_LOG_LEVEL": "warning"}
    gateways = [Gateway(f"gw{n + 1}", host, plane.url, root / f"gw{n + 1}", list(common), dict(env), probe)
                for n, host in enumerate(HOSTS)]
    fleet_setup.start_gateways(gateways)
    endpoints = [(g.host, g.metadata_port) for g in gateways]
    dns_endpoints = [(g.host, g.dns_port) for g in gateways]
    totals = LoadReport()
    dns_totals = LoadReport()
    dns_lost: list[int] = []
    in_flight: list[int] = []
    spreads_up: list[float] = []
    spreads_after_outage: list[float] = []
    worst_up: list[float] = []
    worst_after_outage: list[float] = []
    restart_to_answer: list[float] = []
    try:
        for round_number in range(args.rounds):
            victim = gateways[round_number % len(gateways)]
            dns_reports: list[LoadReport] = []
            resolvers = threading.Thread(target=lambda: dns_reports.append(run_dns_clients(
                dns_endpoints, expected, "gen.internal", duration=args.duration, threads=args.dns_threads)))
            resolvers.start()
            killer = threading.Timer(args.duration / 3, victim.kill)
            killer.start()
            report = run_clients(endpoints, expected, duration=args.duration, threads=args.threads)
            killer.join()
            resolvers.join()
            totals.merge(report)
            totals.seconds += report.seconds
            in_flight.append(report.in_flight_errors)
            dns_totals.merge(dns_reports[0])
            dns_totals.seconds += dns_reports[0].seconds
            dns_lost.append(dns_reports[0].in_flight_errors)
            print(f"round {round_number + 1}: kill -9 {victim.name}: metadata {report.summary()}", flush=True)
            print(f"round {round_number + 1}: kill -9 {victim.name}: DNS {dns_reports[0].summary()}", flush=True)
            victim.start(wait=False)
            restart_to_answer.append(victim.wait_answering())

            serial += 1
            plane.publish(document(args.instances, serial))
            seen = convergence(gateways, probe, serial, time.monotonic())
            spread = max(seen.values()) - min(seen.values())
            spreads_up.append(spread)
            worst_up.append(max(seen.values()))
            print(f"round {round_number + 1}: serial {serial} (plane up) served after "
                  f"{ {k: round(v, 3) for k, v in sorted(seen.items())} } spread {spread:.3f}s", flush=True)

            plane.stop()
            time.sleep(args.outage)
            serial += 1
            plane.publish(document(args.instances, serial))
            plane.restart()
            seen = convergence(gateways, probe, serial, time.monotonic())
            spread = max(seen.values()) - min(seen.values())
            spreads_after_outage.append(spread)
            worst_after_outage.append(max(seen.values()))
            print(f"round {round_number + 1}: serial {serial} (after {args.outage:g}s outage) served after "
                  f"{ {k: round(v, 3) for k, v in sorted(seen.items())} } spread {spread:.3f}s", flush=True)
    finally:
        for gateway in gateways:
            gateway.stop()
        plane.stop()

    print()
    print(f"summary: {args.rounds} rounds, {args.instances} instances, {args.threads} client threads, "
          f"poll interval {args.poll_interval:g}s, jitter {args.jitter:.0%}")
    print(f"  requests answered      {totals.answered} ({totals.answered / totals.seconds:.0f}/s)")
    print(f"  wrong answers          {totals.wrong}")
    print(f"  unanswered             {totals.unanswered}")
    print(f"  errors in flight       {sum(in_flight)} over {args.rounds} kills "
          f"(max {max(in_flight)} per kill, {args.threads} client threads)")
    print(f"  connections refused    {totals.refused} (then retried on the next gateway)")
    print(f"  DNS answered           {dns_totals.answered} ({dns_totals.answered / dns_totals.seconds:.0f}/s), "
          f"wrong {dns_totals.wrong}, unanswered {dns_totals.unanswered}, "
          f"queries lost with the gateway {sum(dns_lost)} (max {max(dns_lost)} per kill, "
          f"{args.dns_threads} resolver threads)")
    print(f"  restart to first answer median {statistics.median(restart_to_answer):.2f}s "
          f"max {max(restart_to_answer):.2f}s")
    print(f"  convergence, plane up: spread median {statistics.median(spreads_up):.3f}s "
          f"max {max(spreads_up):.3f}s; last gateway median {statistics.median(worst_up):.3f}s "
          f"max {max(worst_up):.3f}s")
    print(f"  convergence after outage: spread median {statistics.median(spreads_after_outage):.3f}s "
          f"max {max(spreads_after_outage):.3f}s; last gateway median {statistics.median(worst_after_outage):.3f}s "
          f"max {max(worst_after_outage):.3f}s")
    clean = totals.wrong == 0 and totals.unanswered == 0 and dns_totals.wrong == 0 and dns_totals.unanswered == 0
    return 0 if clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
