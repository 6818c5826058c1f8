"""Gzip inflation under a size cap, shared by the view sources that accept compressed views.

Its own module so that the sources (the HTTP source in :mod:`edge.view.sources`, the etcd
source in :mod:`edge.etcd.view_source`) share it without importing one another.
"""

from __future__ import annotations

import zlib

from edge.errors import SourceError, ViewTooLarge


def gunzip_capped(data: bytes, max_size: int, where: str, what: str) -> bytes:
    """Inflate a gzip ``what`` (body, value) without ever holding more than ``max_size`` bytes."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        plain = inflater.decompress(data, max_size + 1)
    except zlib.error as exc:
        raise SourceError(f"{where}: corrupt gzip {what}: {exc}") from None
    if len(plain) > max_size or inflater.unconsumed_tail:
        raise ViewTooLarge(f"{where}: decompressed {what} is over the {max_size}-byte cap")
    if not inflater.eof:
        raise SourceError(f"{where}: gzip {what} truncated")
    return plain
