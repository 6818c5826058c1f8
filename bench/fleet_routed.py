"""The fleet on a routed network: boot storms through a BIRD router while one of three gateways fails.

Builds the topology of ``tests/fleet/netns`` (a BIRD 2 router with BGP, BFD
and ECMP to three gateways running edge, BIRD and edge-route-health as
shipped; two instance subnets) and, for each failure kind, runs a boot storm
from both subnets (cloud-init's EC2 request sequence with its retries, see
``tests/fleet/netns/boots.py``), injects the failure into one gateway 1.5 s
in, and reports:

* failed boots (a request out of retries, or a wrong answer) and failed
  attempts (requests some gateway did not answer, retried);
* the longest gap a boot saw (first attempt of a request to its answer);
* the time from the failure to the gateway's route leaving the router's
  kernel table;
* for a restart during a control-plane outage, the time from start to ready
  (view loaded, a worker serving).

Failure kinds: ``kill-9`` (edge's supervisor), ``sigterm`` (drain),
``link-down`` (the gateway's link, behind a switch: the router keeps its
carrier), ``restart`` (SIGTERM then start while the control plane is down).
Needs root, BIRD 2 and curl.  Bounded: one storm per kind and round, about
20 s per kind plus 10 s to build the topology.

    python -m bench.fleet_routed [--bfd on|off] [--kinds kill-9,sigterm,link-down,restart] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fleet.netns.topology import PACKAGING, RoutedFleet, unavailable  # noqa: E402

KINDS = ("kill-9", "sigterm", "link-down", "restart")


def ready_after(gateway, timeout: float = 30) -> float:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        result = gateway.namespace.run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "1",
                                       "http://127.0.0.1:9169/readyz", check=False)
        if result.stdout == "200":
            return time.monotonic() - began
        time.sleep(0.01)
    return float("nan")


def route_gone_after(fleet: RoutedFleet, gateway, since: float, timeout: float = 30) -> float:
    deadline = since + timeout
    while time.monotonic() < deadline:
        if gateway.link_address not in fleet.next_hops():
            return time.monotonic() - since
        time.sleep(0.005)
    return float("nan")


def scenario(fleet: RoutedFleet, kind: str, victim, duration: float, max_boots: int) -> dict:
    result: dict = {"kind": kind, "gateway": victim.number}
    storm = fleet.start_storm(duration=duration, max_boots=max_boots)
    time.sleep(1.5)
    began = time.monotonic()
    began_wall = time.time()
    if kind == "kill-9":
        os.kill(victim.edge.popen.pid, signal.SIGKILL)
        result["route_gone"] = route_gone_after(fleet, victim, began)
    elif kind == "sigterm":
        victim.edge.popen.send_signal(signal.SIGTERM)
        result["route_gone"] = route_gone_after(fleet, victim, began)
    elif kind == "link-down":
        victim.link(up=False)
        result["route_gone"] = route_gone_after(fleet, victim, began)
    elif kind == "restart":
        victim.edge.popen.send_signal(signal.SIGTERM)
        result["route_gone"] = route_gone_after(fleet, victim, began)
        victim.wait_edge_gone()
        victim.start_edge()
        result["ready_after_start"] = ready_after(victim)
    report = fleet.finish_storm(storm)
    result.update({key: report[key] for key in ("boots", "failed_boots", "requests", "failed_attempts")})
    result["longest_gap"] = report["longest_gap"]
    result["first_failures"] = [f"{at - began_wall:+.2f}s {source} {what}" for at, source, what in report["failures"][:3]]
    # Back to three announced gateways for the next scenario.
    if kind == "link-down":
        victim.link(up=True)
    elif kind in ("kill-9", "sigterm"):
        victim.wait_edge_gone()
        victim.start_edge()
    fleet.wait_routes(fleet.gateway_hops(), timeout=60)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bfd", choices=("on", "off"), default="on", help="BFD on the router's BGP sessions")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds during which boots start")
    parser.add_argument("--max-boots", type=int, default=150, help="boots per subnet and storm")
    parser.add_argument("--per-subnet", type=int, default=40, help="instances per subnet")
    parser.add_argument("--shutdown-delay", type=float, default=None, help="admin.shutdown_delay (default: edge's)")
    parser.add_argument("--health-script", default=str(PACKAGING / "bird" / "edge-route-health"))
    parser.add_argument("--no-stop-post", action="store_true", help="do not run edge.service's ExecStopPost")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    reason = unavailable()
    if reason:
        print(f"fleet_routed: {reason}", file=sys.stderr)
        return 2
    kinds = [k for k in args.kinds.split(",") if k]
    for kind in kinds:
        if kind not in KINDS:
            parser.error(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
    fleet = RoutedFleet(Path(tempfile.mkdtemp(prefix="edge-routed-bench-")), per_subnet=args.per_subnet,
                        bfd=args.bfd == "on", shutdown_delay=args.shutdown_delay,
                        health_script=Path(args.health_script), stop_post=not args.no_stop_post)
    results = []
    try:
        fleet.build()
        fleet.wait_routes(fleet.gateway_hops(), timeout=60)
        for round_number in range(args.rounds):
            for number, kind in enumerate(kinds):
                # kill -9 and restart hit the gateway with two workers; the others a single-process one.
                victim = fleet.gateways[0] if kind in ("kill-9", "restart") else fleet.gateways[1 + number % 2]
                if kind == "restart":
                    fleet.stop_control_plane()
                    time.sleep(2.5)  # every gateway has seen its source fail
                try:
                    result = scenario(fleet, kind, victim, args.duration, args.max_boots)
                finally:
                    if kind == "restart":
                        fleet.start_control_plane()
                result["round"] = round_number + 1
                results.append(result)
                extra = f" ready_after_start={result['ready_after_start']:.2f}s" if "ready_after_start" in result else ""
                print(f"bfd={args.bfd} {kind:9} gw{victim.number}: boots={result['boots']} "
                      f"failed_boots={result['failed_boots']} failed_attempts={result['failed_attempts']} "
                      f"longest_gap={result['longest_gap']:.2f}s route_gone={result['route_gone']:.2f}s{extra}",
                      flush=True)
    finally:
        fleet.close()
    by_kind: dict[str, list[dict]] = {}
    for result in results:
        by_kind.setdefault(result["kind"], []).append(result)
    print(f"\n| failure (BFD {args.bfd}) | boots | failed boots | failed attempts | longest gap | route gone after |")
    print("|---|---|---|---|---|---|")
    for kind, rows in by_kind.items():
        gone = statistics.median(r["route_gone"] for r in rows)
        print(f"| {kind} | {sum(r['boots'] for r in rows)} | {sum(r['failed_boots'] for r in rows)} | "
              f"{sum(r['failed_attempts'] for r in rows)} | {max(r['longest_gap'] for r in rows):.2f} s | "
              f"{gone:.2f} s |")
    if args.json:
        Path(args.json).write_text(json.dumps({"bfd": args.bfd, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
