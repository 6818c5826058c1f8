"""``edge view publish``: write a view document into an etcd keyspace as the fewest changes.

The document is validated whole first (a view a gateway would reject is never
written), then split into the keys of the keyspace layout
(:mod:`edge.view.keyspace`), compared with what the prefix holds, and only the
keys whose value differs are put or deleted.  Changes go in transactions of
at most :data:`MAX_TXN_OPS` operations and about :data:`MAX_TXN_BYTES` bytes,
inside etcd's defaults (``--max-txn-ops`` 128, ``--max-request-bytes``
1.5 MiB), so no cluster limit needs raising.  Networks are written before the
instances in them and deleted after, and the serial is written last, in the
final transaction: gateways serve the keyspace when its serial rises, so they
never serve a publication half done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from edge.etcd.client import EtcdAccess, EtcdAddress, EtcdClient, EtcdError, prefix_end
from edge.view.formats import decode_view
from edge.view.keyspace import CLOUD, INSTANCES, NETWORKS, SERIAL

MAX_TXN_OPS = 128
MAX_TXN_BYTES = 1024 * 1024
"""Request bytes per transaction, base64 and JSON included, well under etcd's default 1.5 MiB."""
LAYOUT_NAMES = (SERIAL, CLOUD)
LAYOUT_PREFIXES = (NETWORKS, INSTANCES)


class PublishError(EtcdError):
    """The view cannot be published (invalid, a value too large, a serial not above the one in etcd)."""


@dataclass(frozen=True, slots=True)
class Published:
    serial: int
    puts: int
    deletes: int
    transactions: int
    revision: int
    """The cluster's revision after the last transaction (its revision before, when nothing changed)."""


def keys_of(data: bytes) -> dict[str, bytes]:
    """The keyspace names and values of a view document; raises ViewInvalid when the view is not valid."""
    view = decode_view(data)
    document: dict[str, Any] = json.loads(data)
    keys = {SERIAL: str(view.serial).encode(), CLOUD: _compact(document.get("cloud") or {})}
    for network in document.get("networks") or ():
        keys[NETWORKS + network["id"]] = _compact(network)
    for instance in document["instances"]:
        keys[INSTANCES + instance["id"]] = _compact(instance)
    return keys


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def publish(data: bytes, client: EtcdClient) -> Published:
    """Make the keyspace at ``client.address.key`` (a prefix) hold the view ``data``."""
    prefix = client.address.key
    wanted = keys_of(data)
    present, revision = _read(client, prefix)
    serial = int(wanted[SERIAL])
    puts = {name: value for name, value in wanted.items() if present.get(name) != value}
    deletes = [name for name in present if name not in wanted and _in_layout(name)]
    if not puts and not deletes:
        return Published(serial, 0, 0, 0, revision)
    current = present.get(SERIAL)
    if current is not None and current.strip().isdigit() and int(current) >= serial:
        raise PublishError(f"{client.address}: serial {serial} is not above the serial in etcd ({int(current)}); "
                           "gateways would not take the changes")
    # Networks before the instances in them, deleted networks after the instances leaving them,
    # and the serial last: only then do gateways serve what was written.
    order = ([("put", n) for n in puts if n == CLOUD or n.startswith(NETWORKS)]
             + [("put", n) for n in puts if n.startswith(INSTANCES)]
             + [("delete", n) for n in deletes if n.startswith(INSTANCES)]
             + [("delete", n) for n in deletes if not n.startswith(INSTANCES)]
             + [("put", SERIAL)])
    transactions = 0
    batch_puts: list[tuple[bytes, bytes]] = []
    batch_deletes: list[bytes] = []
    size = 0
    for kind, name in order:
        key = prefix + name.encode()
        cost = (len(key) + len(puts.get(name, b""))) * 4 // 3 + 64
        if cost > MAX_TXN_BYTES:
            raise PublishError(f"{client.address}: the value of {name!r} ({len(puts[name])} bytes) is over what "
                               f"one etcd request may carry")
        if len(batch_puts) + len(batch_deletes) >= MAX_TXN_OPS or size + cost > MAX_TXN_BYTES:
            revision = client.txn(batch_puts, batch_deletes)
            transactions += 1
            batch_puts, batch_deletes, size = [], [], 0
        if kind == "put":
            batch_puts.append((key, puts[name]))
        else:
            batch_deletes.append(key)
        size += cost
    revision = client.txn(batch_puts, batch_deletes)
    transactions += 1
    return Published(serial, len(puts), len(deletes), transactions, revision)


def _in_layout(name: str) -> bool:
    return name in LAYOUT_NAMES or name.startswith(LAYOUT_PREFIXES)


def _read(client: EtcdClient, prefix: bytes) -> tuple[dict[str, bytes], int]:
    """Every key under ``prefix`` (name -> value) at one revision, and that revision."""
    # Pages sized by bytes, as a gateway's fresh read: etcd counts every key left in the range for
    # each page, so 1,000-key pages of a 100k keyspace cost it seconds of counting.
    present: dict[str, bytes] = {}
    revision = 0
    for page in client.range_pages(prefix, prefix_end(prefix)):
        revision = page.revision
        present.update((kv.key[len(prefix):].decode("utf-8", "replace"), kv.value) for kv in page.kvs)
    return present, revision


def publish_client(spec: str, connect_timeout: float, read_timeout: float, max_size: int,
                   access: EtcdAccess) -> EtcdClient:
    address = EtcdAddress.parse(spec)
    if not address.key.endswith(b"/"):
        raise PublishError(f"{spec!r}: a keyspace address ends with '/' (etcd://HOST:PORT/PREFIX/)")
    return EtcdClient(address, connect_timeout, read_timeout, max_size, access)
