"""Secrets in source URLs (user information, query values) never reach /view, the logs or `edge view check`."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import urllib.request

from edge.logs import event
from edge.redact import redact, redact_url
from edge.view.demo import demo_document
from tests.support import free_port, serve_argv, wait_until


def test_user_information_query_values_and_fragments_are_hidden() -> None:
    assert redact_url("https://viewer:s3cret@ctl.example:8443/view.json?token=abc&format=gni#k=v") == (
        "https://REDACTED@ctl.example:8443/view.json?token=REDACTED&format=REDACTED#REDACTED")
    assert redact_url("http://only-a-token@ctl/view") == "http://REDACTED@ctl/view"
    assert redact_url("etcds://root:pw@10.0.0.1:2379,10.0.0.2:2379/edge/view") == (
        "etcds://REDACTED@10.0.0.1:2379,10.0.0.2:2379/edge/view")
    assert redact_url("https://ctl/view?SIGNATURE&empty=") == "https://ctl/view?REDACTED&empty="
    # A password holding an unescaped "/" or "@" is hidden whole.
    assert redact_url("http://u:pa/ss@w@ctl/view") == "http://REDACTED@ctl/view"
    # Nothing secret: unchanged.
    for plain in ("etcd://10.0.0.1:2379/edge/view", "http://ctl:8773/latest/", "/var/lib/view.json", "demo"):
        assert redact_url(plain) == plain


def test_urls_inside_messages_are_redacted_and_the_text_around_them_kept() -> None:
    message = "'http://u:pw@ctl/v.json?token=abc': HTTP 500 Internal Server Error (see https://docs/x?a=b)."
    assert redact(message) == ("'http://REDACTED@ctl/v.json?token=REDACTED': HTTP 500 Internal Server Error "
                               "(see https://docs/x?a=REDACTED).")
    assert redact("etcd://root:pw@h:2379/k: no endpoint answered") == "etcd://REDACTED@h:2379/k: no endpoint answered"
    assert redact("no url here: a=b") == "no url here: a=b"


def test_event_fields_are_redacted_for_every_handler(caplog) -> None:
    log = logging.getLogger("edge.test_redact")
    with caplog.at_level(logging.INFO, logger="edge.test_redact"):
        event(log, logging.WARNING, "token keys from etcd unavailable",
              source="etcd://root:hunter2@127.0.0.1:2379/edge/token-keys", error="etcd://root:hunter2@127.0.0.1:2379"
              "/edge/token-keys: no endpoint answered", count=3)
    assert "hunter2" not in caplog.text
    record = caplog.records[-1]
    assert record.edge_fields["source"] == "etcd://REDACTED@127.0.0.1:2379/edge/token-keys"  # what JSON logs show
    assert record.edge_fields["count"] == 3


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_view_summary_logs_and_view_check_hide_the_source_secrets(tmp_path, control_plane) -> None:
    secret_url = control_plane.url.replace("http://", "http://viewer:PASSWORD-1@") + "?token=TOKEN-2&format=edge"
    shown = control_plane.url.replace("http://", "http://REDACTED@") + "?token=REDACTED&format=REDACTED"
    control_plane.status = 500
    admin = free_port()
    log = open(tmp_path / "edge.log", "w+")
    process = subprocess.Popen(
        serve_argv(tmp_path / "state", view=secret_url, metadata_port=free_port(), dns_port=free_port(),
                   admin_port=admin),
        stderr=log, env={**os.environ, "EDGE_VIEW_POLL_INTERVAL": "0.2"}, start_new_session=True)
    try:
        def summary() -> dict:
            return json.loads(_get(f"http://127.0.0.1:{admin}/view")[1])

        wait_until(lambda: (summary().get("last_poll_error") or "").endswith("HTTP 500 Internal Server Error"),
                   timeout=20)
        failing = summary()
        assert failing["source"] == shown
        assert failing["last_poll_error"].startswith(shown)
        control_plane.status = 200
        control_plane.publish(demo_document())
        wait_until(lambda: summary()["ready"], timeout=20)
        log.flush()
        log.seek(0)
        logs = log.read()
        assert "view source error" in logs and "view accepted" in logs and shown in logs
        assert "PASSWORD-1" not in logs and "TOKEN-2" not in logs and "viewer" not in logs
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            log.close()
    # The command line tool: what it prints names the source without its secrets.
    control_plane.status = 500
    result = subprocess.run([sys.executable, "-m", "edge", "view", "check", secret_url], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert shown in output and "PASSWORD-1" not in output and "TOKEN-2" not in output
    control_plane.status = 200
    result = subprocess.run([sys.executable, "-m", "edge", "view", "check", secret_url], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0 and f"{shown}: OK" in result.stdout and "PASSWORD-1" not in result.stdout
