"""``since=SERIAL`` over HTTP: a real control plane answering changes, and the poller applying them as deltas."""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from bench.generate import generate_view
from edge.config import ViewConfig
from edge.errors import SourceError
from edge.view.changes import CHANGES_FORMAT, changes_between
from edge.view.formats import decode_view
from edge.view.keyspace import PreparedView
from edge.view.poller import Poller
from edge.view.sources import HttpSource, open_source
from edge.view.statefile import StateFile, restore
from edge.view.store import ViewStore


@dataclass
class ControlPlane:
    """An HTTP control plane that keeps every serial it published and answers ``since=``."""

    document: dict[str, Any]
    history: dict[int, dict[str, Any]] = field(default_factory=dict)
    speaks_changes: bool = True
    keep: int = 100
    """Serials remembered; an older ``since`` is answered ``too_old``."""
    requests: list[tuple[str, str, int]] = field(default_factory=list)
    """(target, what was answered, body bytes) per request."""
    forced_answer: bytes | None = None
    _server: ThreadingHTTPServer | None = None

    def publish(self, document: dict[str, Any]) -> None:
        self.history[self.document["serial"]] = self.document
        self.document = copy.deepcopy(document)
        for serial in sorted(self.history)[:-self.keep]:
            del self.history[serial]

    def answer(self, target: str, etag: str | None) -> tuple[int, bytes, str]:
        serial = self.document["serial"]
        since = parse_qs(urlsplit(target).query).get("since")
        if since and self.speaks_changes:
            if self.forced_answer is not None:
                return 200, self.forced_answer, "forced"
            asked = int(since[0])
            if asked == serial:
                if etag == f'"{serial}"':
                    return 304, b"", "not modified"
                changes: dict[str, Any] = {"format": CHANGES_FORMAT, "since": asked, "serial": serial,
                                           "changed": [], "removed": []}
            elif asked in self.history:
                changes = changes_between(self.history[asked], self.document)
            else:
                changes = {"format": CHANGES_FORMAT, "since": asked, "too_old": True}
            kind = "too old" if changes.get("too_old") else "changes"
            return 200, json.dumps(changes).encode(), kind
        if etag == f'"{serial}"':
            return 304, b"", "not modified"
        return 200, json.dumps(self.document).encode(), "full"

    def start(self) -> ControlPlane:
        plane = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                status, body, kind = plane.answer(self.path, self.headers.get("If-None-Match"))
                plane.requests.append((self.path, kind, len(body)))
                self.send_response(status)
                self.send_header("ETag", f'"{plane.document["serial"]}"')
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/edge/view.json"

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@pytest.fixture
def plane() -> Iterator[ControlPlane]:
    server = ControlPlane(generate_view(instances=300, networks=2, serial=1)).start()
    yield server
    server.close()


def changed(document: dict[str, Any], serial: int, index: int, instance_type: str) -> dict[str, Any]:
    new = copy.deepcopy(document)
    new["serial"] = serial
    new["instances"][index]["instance_type"] = instance_type
    return new


FAST = ViewConfig(connect_timeout=1.0, read_timeout=3.0)


def test_the_poller_follows_changes_and_builds_deltas(plane, tmp_path) -> None:
    source = open_source(plane.url, FAST)
    assert isinstance(source, HttpSource)
    store = ViewStore()
    state = StateFile(str(tmp_path / "state"), source.description)
    poller = Poller(FAST, source, store, state)

    async def scenario() -> None:
        assert (await poller.poll_once()).result == "accepted"
        first_full = plane.requests[-1]
        assert first_full[0] == "/edge/view.json" and first_full[1] == "full"
        assert (await poller.poll_once()).result == "unchanged"
        assert plane.requests[-1] == ("/edge/view.json?since=1", "not modified", 0)

        # The first changes answer: the source takes the whole view once more, part by part,
        # and from then on only changes cross the wire.
        plane.publish(changed(plane.document, 2, 10, "m5.large"))
        assert (await poller.poll_once()).result == "accepted"
        assert [kind for _, kind, _ in plane.requests[-2:]] == ["changes", "full"]
        assert not poller.last_build_was_delta  # the served objects came from the bytes of serial 1
        plane.publish(changed(plane.document, 3, 11, "m5.xlarge"))
        before = store.current
        assert (await poller.poll_once()).result == "accepted"
        after = store.current
        assert before is not None and after is not None and after.serial == 3 and poller.last_build_was_delta
        target, kind, size = plane.requests[-1]
        assert target == "/edge/view.json?since=2" and kind == "changes" and size < 4096
        assert sum(after.instances[i] is before.instances[i] for i in before.instances) == len(before.instances) - 1
        assert after.instances[plane.document["instances"][11]["id"]].instance_type == "m5.xlarge"

        # A removed instance goes; nothing new is "unchanged" (304 by ETag).
        gone = copy.deepcopy(plane.document)
        gone["serial"] = 4
        removed = gone["instances"].pop(0)["id"]
        plane.publish(gone)
        assert (await poller.poll_once()).result == "accepted"
        assert store.current is not None and removed not in store.current.instances and poller.last_build_was_delta
        assert (await poller.poll_once()).result == "unchanged"
        assert plane.requests[-1][1] == "not modified"

    asyncio.run(scenario())
    # Serial 2 was written whole (its change set was relative to serial 1's bytes); 3 and 4 are
    # journal records, each holding the changed instance alone.
    assert decode_view(state.read()).serial == 2
    records = state.read_journal().records
    assert len(records) == 2 and all(len(record) < 4096 for record in records)
    restored = restore(state)
    assert restored is not None and isinstance(restored.data, PreparedView)
    assert restored.data.view.serial == 4 and restored.applied == 2 and not restored.damage
    assert source.changes_applied == 2


def test_too_old_takes_the_full_document_in_the_same_poll(plane) -> None:
    plane.keep = 1
    source = open_source(plane.url, FAST)
    assert isinstance(source, HttpSource)
    assert isinstance(asyncio.run(source.fetch()), bytes)
    plane.publish(changed(plane.document, 2, 1, "a"))
    plane.publish(changed(plane.document, 3, 2, "b"))  # serial 1 is forgotten now
    result = asyncio.run(source.fetch())
    assert isinstance(result, PreparedView) and result.view.serial == 3
    assert [kind for _, kind, _ in plane.requests[-2:]] == ["too old", "full"]
    # cloud or networks changed: a changes document cannot carry that, so too_old again.
    network_change = copy.deepcopy(plane.document)
    network_change["serial"] = 4
    network_change["networks"][1]["cidrs"] = network_change["networks"][1]["cidrs"] + ["192.168.0.0/16"]
    plane.publish(network_change)
    result = asyncio.run(source.fetch())
    assert isinstance(result, PreparedView) and result.view.serial == 4
    assert [kind for _, kind, _ in plane.requests[-2:]] == ["too old", "full"]


def test_a_control_plane_that_ignores_since_is_served_as_before(plane) -> None:
    plane.speaks_changes = False
    source = open_source(plane.url, FAST)
    assert isinstance(asyncio.run(source.fetch()), bytes)
    assert asyncio.run(source.fetch()) is None  # 304 by ETag
    plane.publish(changed(plane.document, 2, 1, "a"))
    data = asyncio.run(source.fetch())
    assert isinstance(data, bytes) and decode_view(data).serial == 2
    assert [kind for _, kind, _ in plane.requests] == ["full", "not modified", "full"]


def test_bad_changes_are_problems_of_their_instances_or_source_errors(plane) -> None:
    source = open_source(plane.url, FAST)
    asyncio.run(source.fetch())
    plane.publish(changed(plane.document, 2, 20, "c4.large"))
    first = asyncio.run(source.fetch())  # incremental from here on
    assert isinstance(first, PreparedView) and first.view.serial == 2
    victim = plane.document["instances"][3]["id"]
    kept = next(i for i in first.view.instances if i.id == victim)
    plane.forced_answer = json.dumps({"format": CHANGES_FORMAT, "since": 2, "serial": 3,
                                      "changed": [{"id": victim, "interfaces": "not a list"}, {"no": "id"}],
                                      "removed": []}).encode()
    result = asyncio.run(source.fetch())
    assert isinstance(result, PreparedView) and result.view.serial == 3
    assert next(i for i in result.view.instances if i.id == victim) is kept
    assert source._mirror is not None and source._mirror.problems == 2
    # An answer for another serial than asked is not applied.
    plane.forced_answer = json.dumps({"format": CHANGES_FORMAT, "since": 1, "serial": 4, "changed": [],
                                      "removed": []}).encode()
    with pytest.raises(SourceError, match="since=3"):
        asyncio.run(source.fetch())



def test_gateways_follow_an_http_control_plane_by_changes(plane, tmp_path) -> None:
    from tests.fleet.gateway import Gateway
    from tests.support import wait_until

    demo = __import__("edge.view.demo", fromlist=["demo_document"]).demo_document()
    demo["serial"] = 1
    plane.document = demo
    gateways = [Gateway(name, host, plane.url, tmp_path / name,
                        env={"EDGE_VIEW_POLL_INTERVAL": "0.2", "EDGE_WORKERS": workers})
                for name, host, workers in (("one", "127.0.1.1", "1"), ("two", "127.0.1.2", "2"))]
    for gateway in gateways:
        gateway.start()
    try:
        for serial, instance_type in ((2, "m6.large"), (3, "m6.xlarge")):
            plane.publish(changed(plane.document, serial, 0, instance_type))
            for gateway in gateways:
                wait_until(lambda: gateway.serial() == serial, timeout=20)
                # The supervisor's serial moves first; its workers read the change when told it landed.
                wait_until(lambda: gateway.get("/latest/meta-data/instance-type").body == instance_type.encode(),
                           timeout=10)
        kinds = {kind for target, kind, _ in plane.requests if "since=" in target}
        assert "changes" in kinds
        assert "build=delta" in gateways[0].log()
        metrics = gateways[0].admin("/metrics").body.decode()
        assert 'edge_view_source_events_total{event="changes_applied"}' in metrics
    finally:
        for gateway in gateways:
            gateway.stop()
