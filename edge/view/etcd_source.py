"""The view stored under one etcd key, polled by revision.

Each poll is one range request with ``min_mod_revision`` set just past the
revision last delivered: while the key is unchanged etcd answers with the
header and the match count only, so an idle fleet costs etcd a few hundred
bytes per gateway per poll however large the view is.  A count of zero means
the key is gone (an error: the gateway keeps its view); a cluster revision
lower than the one delivered means the cluster was restored from a backup,
and the value is fetched again.

Values may be stored gzip-compressed (recognised by the gzip magic bytes) to
stay under etcd's request size limit (``--max-request-bytes``, 1.5 MiB by
default).
"""

from __future__ import annotations

import asyncio

from edge.config import ViewConfig
from edge.errors import SourceError, ViewTooLarge
from edge.etcd import EtcdAccess, EtcdAddress, EtcdClient, EtcdError, EtcdValueTooLarge, RangeResult
from edge.view.sources import gunzip_capped

_GZIP_MAGIC = b"\x1f\x8b"


def etcd_access(config: ViewConfig) -> EtcdAccess:
    """The TLS files and login of ``config``."""
    return EtcdAccess(ca_file=config.ca_file, cert_file=config.cert_file, key_file=config.key_file,
                      username=config.etcd_username, password=str(config.etcd_password),
                      password_file=config.etcd_password_file)


class EtcdSource:
    def __init__(self, spec: str, config: ViewConfig) -> None:
        try:
            address = EtcdAddress.parse(spec)
        except EtcdError as exc:
            raise SourceError(str(exc)) from None
        self.description = str(address)
        self.max_size = config.max_size
        self.config = config
        self.client = EtcdClient(address, config.connect_timeout, config.read_timeout, config.max_size,
                                 etcd_access(config))
        self.revision = 0
        """``mod_revision`` of the value last delivered (0: none yet)."""
        self._timeout = len(address.endpoints) * (config.connect_timeout + config.read_timeout) + 1
        self.value_fetches = 0
        """Polls that transferred the value (the rest were header-only)."""

    async def fetch(self) -> bytes | None:
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._poll), self._timeout)
        except asyncio.TimeoutError:
            raise SourceError(f"{self.description}: no answer within {self._timeout:g}s") from None

    def forget(self) -> None:
        """Deliver the value again next poll even if unchanged."""
        self.revision = 0

    def _poll(self) -> bytes | None:
        result = self._range(self.revision + 1 if self.revision else 0)
        if result.kv is None and result.count and result.revision < self.revision:
            self.revision = 0
            result = self._range(0)
        if result.count == 0:
            raise SourceError(f"{self.description}: key not found")
        if result.kv is None:
            return None
        self.value_fetches += 1
        data = result.kv.value
        if data.startswith(_GZIP_MAGIC):
            data = gunzip_capped(data, self.max_size, self.description, "value")
        self.revision = result.kv.mod_revision
        return data

    def _range(self, min_mod_revision: int) -> RangeResult:
        try:
            return self.client.get(self.client.address.key, min_mod_revision)
        except EtcdValueTooLarge as exc:
            raise ViewTooLarge(str(exc)) from None
        except EtcdError as exc:
            raise SourceError(str(exc)) from None


