"""Answers rendered once per (snapshot generation, instance, request target) and reused.

A request target is looked up by its raw bytes, so a repeated request costs two
dictionary lookups: no path parsing, JSON encoding or formatting.  The memo is
bounded (it is dropped whole when full, then refilled by what is asked for)
and keyed by snapshot generation, so a swap invalidates it.  Each instance's rendered responses are one table (:meth:`Renderer.answers_of`),
which a connection may hold to answer a plain GET with one lookup.

The tree an answer is rendered from is kept for the instances asked most recently only
(:data:`TREES_KEPT`): a booting instance asks for a few dozen paths within seconds, and a
tree holds every value of its instance (some kilobytes), which the rendered answers do not.
"""

from __future__ import annotations

from cachetools import LRUCache

from edge.metadata import responses
from edge.metadata.identity import IdentitySigner
from edge.metadata.responses import Response
from edge.metadata.tree import (
    VERSION_LISTING,
    VERSION_SET,
    CredentialsLeaf,
    Directory,
    Leaf,
    SignedLeaf,
    resolve,
    split_path,
    version_root,
)
from edge.view.model import Instance
from edge.view.snapshot import Snapshot

Answer = Response | CredentialsLeaf

TREES_KEPT = 1024
"""Instances whose rendered trees are kept (per process): more than boot at once on one gateway worker.
A tree is about 12 KB (measured over the bench's generated instances) and takes about 100 us to render
again; kept for every instance that ever asked, trees were most of what answering added to a process."""

_ROOT = responses.text(VERSION_LISTING)
_MISSING = CredentialsLeaf("")
"""Memoized "no such path" (404s are asked for repeatedly too: probes of absent items)."""


class Renderer:
    def __init__(self, signer: IdentitySigner, max_entries: int) -> None:
        self.signer = signer
        self.max_entries = max_entries
        self._generation = -1
        """Snapshot generation the memo belongs to."""
        self._answers: dict[str, dict[bytes, Response]] = {}
        """instance id -> raw target -> rendered response (see :meth:`answers_of`)."""
        self._others: dict[str, dict[bytes, CredentialsLeaf]] = {}
        """instance id -> raw target -> what is not a rendered response: a credentials leaf, or _MISSING
        for a 404.  Both tables are read and written by :meth:`lookup` only."""
        self._trees: LRUCache[str, Directory] = LRUCache(TREES_KEPT)
        self._shared: dict[tuple[bool, bytes], Response] = {}
        """One Response per distinct body: most leaves (region, "[]", listings) repeat across instances."""
        self._entries = 0
        self.renders = 0

    def lookup(self, snapshot: Snapshot, instance: Instance, target: bytes) -> Answer | None:
        """The answer for ``target`` (raw request target) as ``instance`` sees it; None is 404."""
        if snapshot.generation != self._generation:
            self._reset(snapshot.generation)
        answers = self._answers.get(instance.id)
        if answers is not None:
            found = answers.get(target)
            if found is not None:
                return found
        others = self._others.get(instance.id)
        if others is not None:
            other = others.get(target)
            if other is not None:
                return None if other is _MISSING else other
        rendered = self._render(snapshot, instance, target)
        if self._entries >= self.max_entries:
            self._reset(snapshot.generation)
        if isinstance(rendered, Response):
            self.answers_of(snapshot, instance)[target] = rendered
        else:
            self._others.setdefault(instance.id, {})[target] = _MISSING if rendered is None else rendered
        self._entries += 1
        return rendered

    def answers_of(self, snapshot: Snapshot, instance: Instance) -> dict[bytes, Response]:
        """The table of ``instance``'s rendered responses in ``snapshot`` by raw target, which :meth:`lookup`
        fills: a caller may hold it for the rest of the snapshot.  A reset empties the tables in place, so a
        table held is never wrong and never pins answers the memo has let go."""
        if snapshot.generation != self._generation:
            self._reset(snapshot.generation)
        answers = self._answers.get(instance.id)
        if answers is None:
            answers = self._answers[instance.id] = {}
        return answers

    def _reset(self, generation: int) -> None:
        for answers in self._answers.values():
            answers.clear()
        self._generation = generation
        self._answers = {}
        self._others = {}
        self._trees = LRUCache(TREES_KEPT)
        self._shared = {}
        self._entries = 0

    def _render(self, snapshot: Snapshot, instance: Instance, target: bytes) -> Answer | None:
        parts = split_path(target)
        if parts is None:
            return None
        if not parts:
            return _ROOT
        if parts[0] not in VERSION_SET:
            return None
        tree = self._trees.get(instance.id)
        if tree is None:
            tree = self._trees[instance.id] = version_root(instance, snapshot)
        node = resolve(tree, parts[1:])
        self.renders += 1
        if node is None or isinstance(node, CredentialsLeaf):
            return node
        if isinstance(node, Directory):
            return self._response(node.listing, False)
        if isinstance(node, SignedLeaf):
            signed = self.signer.sign(node.document)
            return self._response(getattr(signed, node.kind), False)
        assert isinstance(node, Leaf)
        return self._response(node.body, node.binary)

    def _response(self, body: bytes, binary: bool) -> Response:
        key = (binary, body)
        found = self._shared.get(key)
        if found is None:
            found = self._shared[key] = responses.binary(body) if binary else responses.text(body)
        return found
