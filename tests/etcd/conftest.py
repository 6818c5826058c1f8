from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.etcd.server import ETCD, EtcdServer


@pytest.fixture
def etcd(tmp_path) -> Iterator[EtcdServer]:
    if not os.access(ETCD, os.X_OK):
        pytest.skip("etcd is not installed (Debian package etcd-server)")
    server = EtcdServer(tmp_path / "etcd-data")
    server.start()
    yield server
    server.stop()
