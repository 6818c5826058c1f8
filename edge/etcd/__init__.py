"""The etcd adapter: views and IMDSv2 token keys kept in an etcd cluster.

Plugged in at the composition root (:func:`edge.server.adapters`), as the
Eucalyptus adapter is; nothing under ``edge/view``, ``edge/metadata`` or
``edge/dns`` imports it.

- :mod:`edge.etcd.client`: the etcd v3 client (HTTP/JSON gateway), knowing nothing of views or keys.
- :mod:`edge.etcd.view_source`: the ``etcd://`` and ``etcds://`` view sources (one key, or a
  keyspace under a prefix kept by :class:`edge.view.keyspace.Keyspace`).
- :mod:`edge.etcd.publish`: ``edge view publish``, a view document written into a keyspace.
- :mod:`edge.etcd.token_keys`: the fleet's token keys (``fleet.token_key_source``), handed to the
  metadata service as its token key provider.

This module imports nothing at load time, so the client stays importable without
the view pipeline or the configuration.  (Its functions are not named after its
modules: importing ``edge.etcd.token_keys`` sets the package attribute ``token_keys``.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge.config import ViewConfig
    from edge.metadata.service import TokenKeyProvider
    from edge.view.sources import SourceKinds, ViewSource

SCHEMES = ("etcd", "etcds")


def register(sources: SourceKinds) -> None:
    """Add the ``etcd://`` and ``etcds://`` view sources to ``sources``."""
    for scheme in SCHEMES:
        sources.add_scheme(scheme, open_view_source)


def open_view_source(spec: str, config: ViewConfig) -> ViewSource:
    """The view under one etcd key, or (an address ending in ``/``) the keyspace under that prefix."""
    from edge.etcd.view_source import open_etcd_source
    return open_etcd_source(spec, config)


def token_key_provider() -> TokenKeyProvider:
    """The metadata service's provider of ``fleet.token_key_source`` keys."""
    from edge.etcd.token_keys import EtcdTokenKeys
    return EtcdTokenKeys()
