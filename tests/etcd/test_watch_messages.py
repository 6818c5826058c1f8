"""The watch stream's messages as etcd's JSON gateway writes them, and what is not one."""

from __future__ import annotations

import base64

import pytest

from edge.etcd.client import EtcdAddress, EtcdClient, EtcdCompacted, EtcdError, Watch


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
def watch() -> Watch:
    client = EtcdClient(EtcdAddress.parse("etcd://127.0.0.1:1/p/"), 1.0, 1.0, 1 << 20)
    return client.watch(b"p/", b"p0", 5)


def test_events_puts_and_deletions(watch: Watch) -> None:
    line = ('{"result":{"header":{"cluster_id":"1","revision":"9"},"events":['
            f'{{"kv":{{"key":"{b64("p/a")}","create_revision":"7","mod_revision":"8","version":"2",'
            f'"value":"{b64("{}")}"}}}},'
            f'{{"type":"DELETE","kv":{{"key":"{b64("p/b")}","mod_revision":"9"}}}}]}}}}').encode()
    revision, events = watch._message(line)
    assert revision == 9
    assert [(e.deleted, e.kv.key, e.kv.value, e.kv.mod_revision) for e in events] == [
        (False, b"p/a", b"{}", 8), (True, b"p/b", b"", 9)]
    # The creation message: no events.
    assert watch._message(b'{"result":{"header":{"revision":"5"},"created":true}}') == (5, [])


@pytest.mark.parametrize(("line", "error", "says"), [
    # etcd's compaction notice: its header has no revision.
    (b'{"result":{"header":{"cluster_id":"1","raft_term":"2"},"compact_revision":"10","canceled":true}}',
     EtcdCompacted, "compacted"),
    (b'{"result":{"header":{"revision":"12"},"canceled":true,"cancel_reason":"gone"}}', EtcdError, "canceled: gone"),
    (b'{"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader","http_status":"Unavailable"}}',
     EtcdError, "no leader"),
    (b"garbage", EtcdError, "malformed watch message"),
    (b'{"result":{"events":[]}}', EtcdError, "malformed watch message"),
    (b'{"result":{"header":{"revision":"3"},"events":[{"kv":{"key":"not base64!","mod_revision":"3"}}]}}',
     EtcdError, "malformed watch message"),
    (b'{"result":{"header":{"revision":"3"},"events":[{"kv":{"key":"cC9h"}}]}}', EtcdError,
     "malformed watch message"),
    (b'{"something":"else"}', EtcdError, "neither a result nor an error"),
])
def test_what_is_not_a_usable_message_ends_the_watch(watch: Watch, line: bytes, error: type, says: str) -> None:
    with pytest.raises(error, match=says):
        watch._message(line)
