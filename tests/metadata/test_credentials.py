"""IAM credentials from a process or an upstream IMDS: caching, refresh ahead, single flight, failures."""

from __future__ import annotations

import calendar
import json
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from imds_harness import demo, exchange, parse, request

from edge.config import CredentialsConfig
from tests.support import wait_until

CREDENTIALS = "/latest/meta-data/iam/security-credentials/demo-role"

SCRIPT = textwrap.dedent("""
    import json, sys, time
    plan_path, log_path = sys.argv[1], sys.argv[2]
    plan = json.load(open(plan_path))
    with open(log_path, "a") as log:
        log.write(json.dumps({"argv": sys.argv[3:]}) + "\\n")
    count = sum(1 for _ in open(log_path))
    time.sleep(plan.get("sleep", 0))
    if plan.get("fail"):
        sys.exit("source down")
    expires = time.gmtime(time.time() + plan.get("clock_offset", 0) + plan.get("expires_in", 3600))
    document = {"Version": 1, "AccessKeyId": f"AKIA{count:04d}", "SecretAccessKey": "secret",
                "SessionToken": "token", "Expiration": time.strftime("%Y-%m-%dT%H:%M:%SZ", expires)}
    if plan.get("pad"):
        document["Padding"] = "x" * plan["pad"]
    print(json.dumps(document))
""")


class Source:
    def __init__(self, tmp_path, **plan):
        self.script = tmp_path / "source.py"
        self.script.write_text(SCRIPT)
        self.plan = tmp_path / "plan.json"
        self.log = tmp_path / "calls.log"
        self.set(**plan)

    def set(self, **plan):
        self.plan.write_text(json.dumps(plan))

    @property
    def calls(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def config(self, **options) -> CredentialsConfig:
        return CredentialsConfig(kind="process", command=(
            sys.executable, str(self.script), str(self.plan), str(self.log), "{instance_id}", "{account_id}", "{role}",
            "{address}", "{unknown}"),
            **options)


def get_credentials(port, source="127.0.0.1"):
    status, headers, body = parse(request(port, "GET", CREDENTIALS, source=source))
    return status, (json.loads(body) if status == 200 else None)


def test_process_source_and_cache(start, tmp_path):
    source = Source(tmp_path)
    server = start(credentials=source.config())
    assert parse(request(server.port, "GET", "/latest/meta-data/iam/security-credentials/"))[2] == b"demo-role"
    status, document = get_credentials(server.port)
    assert status == 200
    assert document["Code"] == "Success" and document["Type"] == "AWS-HMAC"
    assert document["AccessKeyId"] == "AKIA0001" and document["SecretAccessKey"] == "secret"
    assert document["Token"] == "token"
    assert time.strptime(document["Expiration"], "%Y-%m-%dT%H:%M:%SZ")
    raw = request(server.port, "GET", CREDENTIALS)
    assert b'\n  "Code" : "Success",\n' in raw and not raw.endswith(b"\n")
    assert get_credentials(server.port)[1]["AccessKeyId"] == "AKIA0001"
    assert source.calls == [{"argv": ["i-0de0000000000001", "000123456789", "demo-role", "127.0.0.1", "{unknown}"]}]
    # Another role name is 404; an instance without a profile has no iam/ at all.
    assert parse(request(server.port, "GET", CREDENTIALS + "x"))[0] == 404
    assert parse(request(server.port, "GET", CREDENTIALS, source="127.0.0.2"))[0] == 404


def test_single_flight_and_slow_source_does_not_delay_others(start, tmp_path):
    source = Source(tmp_path, sleep=2.0)
    server = start(credentials=source.config())
    with ThreadPoolExecutor(max_workers=24) as pool:
        waiting = [pool.submit(get_credentials, server.port) for _ in range(20)]
        time.sleep(0.2)
        begun = time.monotonic()
        other = parse(request(server.port, "GET", "/latest/meta-data/instance-id"))
        elapsed = time.monotonic() - begun
        results = [f.result() for f in waiting]
    assert other[0] == 200 and elapsed < 1.0  # the waiting requests need 1.8 s more
    assert all(status == 200 and doc["AccessKeyId"] == "AKIA0001" for status, doc in results)
    assert len(source.calls) == 1


def test_background_refresh_serves_cached_meanwhile(start, tmp_path):
    source = Source(tmp_path, expires_in=600)
    # Due a refresh after 0.6 s (0.1 % of 600 s); nowhere near refresh_ahead of their expiration.
    server = start(credentials=source.config(refresh_fraction=0.001, refresh_ahead=60.0))
    assert get_credentials(server.port)[1]["AccessKeyId"] == "AKIA0001"
    time.sleep(1.1)
    # Within the refresh window: answered from the cache at once, refreshed in the background.
    assert get_credentials(server.port)[1]["AccessKeyId"] == "AKIA0001"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and get_credentials(server.port)[1]["AccessKeyId"] == "AKIA0001":
        time.sleep(0.05)
    assert get_credentials(server.port)[1]["AccessKeyId"] == "AKIA0002"


def test_source_failure_serves_cached_until_expiration_never_after(start, tmp_path):
    # A lifetime of seconds, long enough that starting the command on a loaded machine fits well inside it.
    source = Source(tmp_path, expires_in=8)
    server = start(credentials=source.config(refresh_ahead=7.5, retry_interval=0.2, timeout=4.0))
    status, first = get_credentials(server.port)
    assert status == 200
    source.set(fail=True)
    expiration = calendar.timegm(time.strptime(first["Expiration"], "%Y-%m-%dT%H:%M:%SZ"))
    while time.time() < expiration - 0.3:
        status, document = get_credentials(server.port)
        assert status == 200 and document["AccessKeyId"] == first["AccessKeyId"]
        time.sleep(0.1)
    assert len(source.calls) >= 3  # refreshes were retried, at the retry interval
    time.sleep(max(0.0, expiration - time.time()) + 0.1)
    raw = request(server.port, "GET", CREDENTIALS)
    assert raw == b"HTTP/1.1 503 Service Unavailable\r\nServer: EC2ws\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    # The source recovers: fresh credentials again, once the retry interval after the last failure is over.
    source.set()
    wait_until(lambda: get_credentials(server.port)[0] == 200, timeout=10)


def test_no_source_configured_is_unavailable(server):
    assert parse(request(server.port, "GET", CREDENTIALS))[0] == 503
    assert parse(request(server.port, "GET", "/latest/meta-data/iam/security-credentials/"))[2] == b"demo-role"


def test_http_source_asks_upstream_for_the_instance(start, tmp_path):
    iam = {"instance_profile_arn": "arn:aws:iam::000123456789:instance-profile/demo-role",
           "instance_profile_id": "AIPADEMO00000000004", "role": "demo-role"}
    document = demo(**{"i-0de0000000000004": {"iam": iam}})
    source = Source(tmp_path)
    # The upstream trusts the gateway (it dials from 127.0.0.1) to name the instance.
    upstream = start(document, credentials=source.config(), trusted_proxies=("127.0.0.1/32",))
    gateway = start(document, credentials=CredentialsConfig(
        kind="http", url=f"http://127.0.0.1:{upstream.port}/latest/meta-data/iam/security-credentials/"))
    status, answer = get_credentials(gateway.port, source="127.0.0.4")
    assert status == 200 and answer["AccessKeyId"] == "AKIA0001"
    assert [call["argv"][0] for call in source.calls] == ["i-0de0000000000004"]
    # Cached on the gateway: the upstream is not asked again.
    assert get_credentials(gateway.port, source="127.0.0.4")[0] == 200
    assert len(source.calls) == 1


def test_http_source_refused_upstream_is_unavailable(start):
    gateway = start(credentials=CredentialsConfig(kind="http", url="http://127.0.0.1:9/creds/", timeout=1.0))
    assert parse(request(gateway.port, "GET", CREDENTIALS))[0] == 503


def test_pipelined_requests_behind_a_slow_one_keep_their_order(start, tmp_path):
    source = Source(tmp_path, sleep=0.5)
    server = start(credentials=source.config())
    paths = [CREDENTIALS, "/latest/meta-data/instance-id", "/latest/meta-data/nothing", CREDENTIALS,
             "/latest/meta-data/local-ipv4"]
    data = b"".join(f"GET {p} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for p in paths)
    raw = exchange(server.port, data + b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
    order = [raw.index(marker) for marker in (b'"AccessKeyId" : "AKIA0001"', b"i-0de0000000000001",
                                              b"404 - Not Found", b"127.0.0.1", b"\nlatest")]
    assert order == sorted(order)
    assert raw.count(b"HTTP/1.1 200 OK") == 5 and raw.count(b'"AccessKeyId"') == 2
    assert len(source.calls) == 1


def test_large_and_oversized_output_fails_only_that_call(start, tmp_path, caplog):
    source = Source(tmp_path, pad=60 * 1024)
    server = start(credentials=source.config(retry_interval=0.2, timeout=10.0))  # slow machines: not a timeout
    status, document = get_credentials(server.port)
    assert status == 200 and len(document) == 7  # 60 KB printed, then served (Padding is not passed on)
    # 1 MB: over the 64 KiB default cap; that call fails at once, clearly, and is counted.
    source.set(pad=1024 * 1024)
    with caplog.at_level("WARNING", logger="edge.metadata"):
        server.call(lambda: server.service.handler.credentials._cache.clear())
        assert parse(request(server.port, "GET", CREDENTIALS))[0] == 503
    assert "printed more than 65536 bytes" in caplog.text
    assert "credential command helper" not in caplog.text  # the helper itself is fine
    server.call(server.service.export_metrics)
    events = server.service.tally.events
    assert events[("credential_fetches", "error")] == 1
    assert events[("credential_helper_failures", "protocol")] == 0
    # The next call (after retry_interval) works.
    source.set()
    wait_until(lambda: get_credentials(server.port)[0] == 200, timeout=10)
    assert len(source.calls) == 3


def test_a_failing_source_is_asked_once_per_retry_interval_not_once_per_request(start, tmp_path):
    source = Source(tmp_path, fail=True)
    server = start(credentials=source.config(retry_interval=60.0, timeout=10.0), rate=0)
    statuses = [parse(request(server.port, "GET", CREDENTIALS))[0] for _ in range(150)]
    assert statuses == [503] * 150
    assert len(source.calls) == 1
    # Concurrent requests inside the window do not run it either.
    with ThreadPoolExecutor(max_workers=16) as pool:
        assert set(pool.map(lambda _: get_credentials(server.port)[0], range(50))) == {503}
    assert len(source.calls) == 1
    # Once the interval has passed, the next request asks the source again (and it has recovered).
    source.set()
    cache = server.service.handler.credentials
    server.call(lambda: setattr(cache, "clock", lambda: time.time() + 61.0))
    assert get_credentials(server.port)[0] == 200
    assert len(source.calls) == 2


@pytest.mark.parametrize("lifetime", [3600, 6 * 3600])
def test_botocore_always_gets_credentials_with_more_than_its_refresh_window_left(start, tmp_path, monkeypatch,
                                                                              caplog, lifetime):
    """botocore's own IMDS fetcher and refresh logic against edge, over hours of simulated time.

    botocore refreshes credentials with less than 15 minutes left, and takes an answer with less
    than its refresh window (15 minutes in a session) plus 2 to 10 minutes of jitter left for an
    outage of the metadata service ("credential expiration extension").  Edge's clock, the
    source's and botocore's are moved forward together, a minute at a time.
    """
    import datetime

    import botocore.utils
    from botocore.credentials import RefreshableCredentials
    from botocore.utils import InstanceMetadataFetcher
    from dateutil.parser import parse as parse_time
    from dateutil.tz import tzlocal

    import edge.metadata.handler

    offset = [0.0]
    source = Source(tmp_path, expires_in=lifetime)
    server = start(credentials=source.config(timeout=10.0))  # the default refresh settings

    def edge_now() -> float:
        return time.time() + offset[0]

    # The handler reads the wall clock for every answer (the protocol passes none).
    monkeypatch.setattr(edge.metadata.handler, "_time", edge_now)
    cache = server.service.handler.credentials
    server.call(lambda: setattr(cache, "clock", edge_now))
    monkeypatch.setattr(botocore.utils, "get_current_datetime", lambda remove_tzinfo=True: (
        datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=offset[0])).replace(tzinfo=None))

    def botocore_now() -> datetime.datetime:
        return datetime.datetime.now(tzlocal()) + datetime.timedelta(seconds=offset[0])

    fetcher = InstanceMetadataFetcher(timeout=15, num_attempts=1, base_url=server.base,
                                      config={"ec2_credential_refresh_window": 15 * 60})
    with caplog.at_level("INFO", logger="botocore"):
        metadata = fetcher.retrieve_iam_role_credentials()
        assert metadata["role_name"] == "demo-role"
        credentials = RefreshableCredentials(
            metadata["access_key"], metadata["secret_key"], metadata["token"], parse_time(metadata["expiry_time"]),
            fetcher.retrieve_iam_role_credentials, "iam-role", time_fetcher=botocore_now)
        keys = {credentials.get_frozen_credentials().access_key}
        for minute in range(1, 8 * 60):
            offset[0] = minute * 60.0
            source.set(expires_in=lifetime, clock_offset=offset[0])
            keys.add(credentials.get_frozen_credentials().access_key)  # refreshes when botocore wants to
            left = (credentials._expiry_time - botocore_now()).total_seconds()
            assert left > 15 * 60, (minute, left)
            assert not credentials.refresh_needed(), minute
    assert "expiration extension" not in caplog.text
    assert "Refreshing temporary credentials failed" not in caplog.text
    # Renewed as botocore needed them, not on every request: about once per lifetime minus 15 minutes.
    assert len(keys) == len(source.calls) <= 8 * 3600 // (lifetime - 30 * 60) + 2
    assert len(keys) >= 8 * 3600 // lifetime


def test_a_helper_that_dies_is_counted_and_the_next_request_is_answered(start, tmp_path, caplog):
    import os
    import signal

    source = Source(tmp_path)
    server = start(credentials=source.config())
    assert get_credentials(server.port)[0] == 200
    cache = server.service.handler.credentials
    helper = cache.runner._process
    assert helper is not None
    with caplog.at_level("WARNING", logger="edge.metadata"):
        os.kill(helper.pid, signal.SIGKILL)
        wait_until(lambda: cache.runner.failures["exited"] == 1, timeout=10)
    assert "credential command helper exited" in caplog.text
    server.call(server.service.export_metrics)
    assert server.service.tally.events[("credential_helper_failures", "exited")] == 1
    server.call(lambda: cache._cache.clear())
    status, document = get_credentials(server.port)  # a new helper runs the command
    assert status == 200 and document["AccessKeyId"] == "AKIA0002"
    assert cache.runner._process is not None and cache.runner._process.pid != helper.pid
