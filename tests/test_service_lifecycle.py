"""The Service lifecycle as the composition root uses it: readiness asks every service whether it listens."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import urllib.error
import urllib.request

import pytest

from edge.admin import AdminListener, AdminRoutes, Readiness
from edge.config import AdminConfig, Config, DnsConfig, Listen, MetadataConfig, ViewConfig
from edge.dns.service import DnsService
from edge.lifecycle import Service
from edge.metadata.service import MetadataService
from edge.server import Gateway, adapters
from edge.view.demo import demo_document
from edge.view.statefile import StateFile
from tests.dns.conftest import EdgeDns
from tests.support import wait_until


def _readyz(port: int) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.parametrize("kind", [DnsService, MetadataService, AdminListener])
def test_every_service_is_a_service(kind: type) -> None:
    # The composition root calls start, stop, reload, ready, export_metrics and hold_unknown_sources
    # on each without probing for them; an implementation missing one cannot be built.
    assert issubclass(kind, Service)
    assert not getattr(kind, "__abstractmethods__", None)


def test_readiness_reports_a_service_that_stopped_listening() -> None:
    server = EdgeDns({"format": "edge-view/1", "serial": 1, "instances": []})
    try:
        config = dataclasses.replace(server.config, admin=AdminConfig(listen=Listen.parse("127.0.0.1:0"), shutdown_delay=0.0))
        readiness = Readiness(server.store)
        readiness.services = [server.service]
        admin = AdminListener(config, AdminRoutes(server.store, readiness))
        server.call(admin.start())
        port = admin.sockets[0].getsockname()[1]
        assert server.service.ready and admin.ready
        assert _readyz(port) == (200, b"ready\n")

        server.call(server.service.stop(0.5))
        assert not server.service.ready
        wait_until(lambda: _readyz(port)[0] == 503, timeout=5)
        assert _readyz(port) == (503, b"not ready: dns is not listening\n")

        server.call(admin.stop(0.5))
        assert not admin.ready
    finally:
        server.close()


def test_a_gateway_is_not_ready_until_it_has_finished_starting(tmp_path, monkeypatch) -> None:
    # A gateway stopped while it starts leaves without the drain delay, so /readyz must not say
    # "ready" before start() is over; here the last step (writing the first view to the state
    # directory) is held back after the view is already being served.
    view = tmp_path / "view.json"
    view.write_text(json.dumps(demo_document()))
    config = Config(workers=1, view=ViewConfig(source=str(view), state_dir=str(tmp_path / "state")),
                    metadata=MetadataConfig(listen=()), dns=DnsConfig(listen=(Listen.parse("127.0.0.1:0"),)),
                    admin=AdminConfig(listen=Listen.parse("127.0.0.1:0"), shutdown_delay=0.0))
    release = threading.Event()
    write = StateFile.write

    def held_write(self: StateFile, data: bytes) -> None:
        release.wait(30)
        write(self, data)

    monkeypatch.setattr(StateFile, "write", held_write)
    gateway = Gateway(config, plugged=adapters())
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    starting = asyncio.run_coroutine_threadsafe(gateway.start(), loop)
    try:
        wait_until(lambda: gateway.store.current is not None and gateway.admin is not None, timeout=20)
        port = gateway.admin.sockets[0].getsockname()[1]
        assert _readyz(port) == (503, b"not ready: starting\n")
        release.set()
        starting.result(20)
        assert _readyz(port) == (200, b"ready\n")
    finally:
        release.set()
        if starting.done():
            asyncio.run_coroutine_threadsafe(gateway.stop(), loop).result(20)
        else:
            starting.cancel()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
