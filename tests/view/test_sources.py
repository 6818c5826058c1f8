"""File and HTTP sources against real files and a real local HTTP server."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os

import pytest

from edge.config import ViewConfig
from edge.errors import SourceError, ViewTooLarge
from edge.view.demo import demo_document
from edge.view.sources import DemoSource, FileSource, HttpSource, open_source

CONFIG = ViewConfig(state_dir="/nonexistent", connect_timeout=1.0, read_timeout=1.0, max_size=64 * 1024)


def run(coroutine):
    return asyncio.run(coroutine)


def test_open_source_kinds(tmp_path) -> None:
    assert isinstance(open_source("demo", CONFIG), DemoSource)
    assert isinstance(open_source("http://127.0.0.1:1/v", CONFIG), HttpSource)
    assert isinstance(open_source(str(tmp_path / "v.json"), CONFIG), FileSource)
    assert isinstance(open_source(f"file://{tmp_path}/v.json", CONFIG), FileSource)
    with pytest.raises(SourceError, match="unsupported view source"):
        open_source("ftp://example/v", CONFIG)


def test_demo_source_delivers_once() -> None:
    source = DemoSource()
    assert json.loads(run(source.fetch()))["format"] == "edge-view/1"
    assert run(source.fetch()) is None


def test_file_source_rereads_only_on_change(tmp_path) -> None:
    path = tmp_path / "view.json"
    path.write_text('{"serial": 1}')
    source = FileSource(str(path), CONFIG.max_size)
    assert run(source.fetch()) == b'{"serial": 1}'
    assert run(source.fetch()) is None
    # Producers write then rename: a new inode is a change even with the same size.
    replacement = tmp_path / "view.json.tmp"
    replacement.write_text('{"serial": 2}')
    os.replace(replacement, path)
    assert run(source.fetch()) == b'{"serial": 2}'


def test_file_source_errors(tmp_path) -> None:
    with pytest.raises(SourceError, match="no such file"):
        run(FileSource(str(tmp_path / "missing.json"), CONFIG.max_size).fetch())
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (CONFIG.max_size + 1))
    with pytest.raises(ViewTooLarge):
        run(FileSource(str(big), CONFIG.max_size).fetch())


def test_file_replaced_mid_read_is_not_used(tmp_path, monkeypatch) -> None:
    path = tmp_path / "view.json"
    path.write_text('{"serial": 1, "padding": "' + "x" * 1000 + '"}')
    source = FileSource(str(path), CONFIG.max_size)
    real_stat = os.stat

    def stat_after_replace(target, *args, **kwargs):
        # The producer renames a new file into place between our read and our check.
        if str(target) == str(path) and not stat_after_replace.done:
            stat_after_replace.done = True
            fresh = tmp_path / "fresh.json"
            fresh.write_text('{"serial": 2}')
            os.replace(fresh, path)
        return real_stat(target, *args, **kwargs)

    stat_after_replace.done = False
    monkeypatch.setattr("edge.view.sources.os.stat", stat_after_replace)
    with pytest.raises(SourceError, match="changed while it was read"):
        run(source.fetch())
    monkeypatch.setattr("edge.view.sources.os.stat", real_stat)
    assert run(source.fetch()) == b'{"serial": 2}'


def test_http_conditional_get(control_plane) -> None:
    control_plane.publish(demo_document())
    source = HttpSource(control_plane.url, CONFIG)
    assert json.loads(run(source.fetch()))["serial"] == 1
    assert run(source.fetch()) is None  # 304
    second = control_plane.requests[1]
    assert second["If-None-Match"].startswith('"')
    assert second["If-Modified-Since"] == "Mon, 23 Nov 2026 22:10:00 GMT"
    assert "gzip" in second["Accept-Encoding"]
    document = demo_document()
    document["serial"] = 2
    control_plane.publish(document)
    assert json.loads(run(source.fetch()))["serial"] == 2


def test_http_gzip_body(control_plane) -> None:
    control_plane.publish(demo_document())
    control_plane.mode = "gzip"
    assert json.loads(run(HttpSource(control_plane.url, CONFIG).fetch()))["serial"] == 1
    control_plane.mode = "bad-gzip"
    with pytest.raises(SourceError, match="gzip"):
        run(HttpSource(control_plane.url, CONFIG).fetch())


@pytest.mark.parametrize("status", [404, 500])
def test_http_error_status(control_plane, status: int) -> None:
    control_plane.status = status
    with pytest.raises(SourceError, match=f"HTTP {status}"):
        run(HttpSource(control_plane.url, CONFIG).fetch())


def test_http_truncated_body(control_plane) -> None:
    control_plane.publish(demo_document())
    control_plane.mode = "truncate"
    with pytest.raises(SourceError, match="truncated"):
        run(HttpSource(control_plane.url, CONFIG).fetch())


def test_http_hanging_source_times_out(control_plane) -> None:
    control_plane.publish(demo_document())
    control_plane.mode = "hang"
    control_plane.hang_seconds = 3
    with pytest.raises(SourceError, match="timed out|no complete answer"):
        run(HttpSource(control_plane.url, CONFIG).fetch())


def test_http_view_bigger_than_cap(control_plane) -> None:
    control_plane.body = b"{" + b" " * (CONFIG.max_size + 10) + b"}"
    with pytest.raises(ViewTooLarge):
        run(HttpSource(control_plane.url, CONFIG).fetch())
    control_plane.mode = "gzip"  # small on the wire, too big once inflated
    with pytest.raises(ViewTooLarge):
        run(HttpSource(control_plane.url, CONFIG).fetch())


def test_http_unreachable() -> None:
    config = dataclasses.replace(CONFIG, connect_timeout=0.5)
    with pytest.raises(SourceError):
        run(HttpSource("http://127.0.0.1:9/view.json", config).fetch())
