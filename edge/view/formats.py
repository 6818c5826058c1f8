"""Turn document bytes into a :class:`View`, whatever format the source speaks.

A large JSON document is decoded piece by piece rather than with one call: a
single C call over a 100 MB document would hold the interpreter lock for a
second and stall the event loop that keeps serving while the new view is built
in a thread.  The fast path (:class:`_ByteStream`) cuts the document's bytes
into batches of a few hundred instances (:mod:`edge.view.scan`) and decodes
each instance by type with msgspec (:mod:`edge.view.wire`).  Anything it does
not expect sends the whole document to the reference path
(:class:`_StreamingObject`: one ``json`` ``raw_decode`` per instance, then the
explaining parser), which reports problems exactly.

:func:`decode_view_reusing` goes further for a new serial of a view already
served: an instance whose document text is exactly that of the previous
document is neither decoded nor validated again; its previous
:class:`~edge.view.model.Instance` is reused (see :mod:`edge.view.delta`).
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from edge.config import Config
from edge.errors import ConfigError, ViewInvalid
from edge.view.model import FORMAT, Instance, View
from edge.view.parse import Reused, cidr_table_of, instance_validator, parse_view
from edge.view.scan import elements_end, likely_elements_ends, skip_whitespace, string_end, value_end
from edge.view.wire import INSTANCE_DECODER, Cidrs, Problems, instance_from_wire

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_LEADING_ID = re.compile(r'\{[ \t\n\r]*"id"[ \t\n\r]*:[ \t\n\r]*"([^"\\]*)"')
_DECODER = json.JSONDecoder()
# Below this size one json.loads call is short enough not to matter.
_INCREMENTAL_THRESHOLD = 1 << 20


Sniffer = Callable[[bytes], bool]
"""Whether document bytes are in a format (looks at the head only)."""
DecoderFactory = Callable[[Config], Callable[[bytes], View]]
"""Builds a format's decoder from the configuration (an adapter's options)."""


class ViewFormats:
    """Document formats other than ``edge-view/1``, by name, each with its sniffer.

    The composition root registers the formats its adapters bring (the Eucalyptus GNI);
    ``view.format = "auto"`` picks the first whose sniffer recognises the document, and
    ``edge-view/1`` otherwise.
    """

    def __init__(self) -> None:
        self.formats: dict[str, tuple[Sniffer, DecoderFactory]] = {}

    def add(self, name: str, sniff: Sniffer, decoder: DecoderFactory) -> None:
        self.formats[name] = (sniff, decoder)

    def decoder(self, config: Config) -> FormatDecoder:
        return FormatDecoder(config, self)


class FormatDecoder:
    """The decoder for the configured view format (``auto``: by the document's head).

    ``speaks_view(data)`` tells the poller when ``data`` is an ``edge-view/1`` document,
    which it may then decode with :func:`decode_view_reusing`.
    """

    __slots__ = ("chosen", "others")

    def __init__(self, config: Config, formats: ViewFormats | None = None) -> None:
        self.chosen = config.view.format
        registered = formats.formats if formats is not None else {}
        if self.chosen not in ("auto", "edge-view") and self.chosen not in registered:
            raise ConfigError(f"view.format {self.chosen!r} is not a format this program registers "
                              f"(known: auto, edge-view{''.join(', ' + name for name in registered)})")
        self.others = [(name, sniff, make(config)) for name, (sniff, make) in registered.items()
                       if self.chosen in ("auto", name)]

    def _other(self, data: bytes) -> tuple[str, Callable[[bytes], View]] | None:
        """(name, decoder) of the registered format that takes ``data``; None for ``edge-view/1``."""
        if self.chosen == "edge-view":
            return None
        for name, sniff, decode in self.others:
            if name == self.chosen or sniff(data):
                return name, decode
        return None

    def speaks_view(self, data: bytes) -> bool:
        return self._other(data) is None

    def format_of(self, data: bytes) -> str:
        """The format ``data`` is read as: ``edge-view/1`` or a registered one (``eucalyptus-gni``).

        The decoded :class:`View` is always ``edge-view/1``; this is what the document itself is.
        """
        other = self._other(data)
        return FORMAT if other is None else other[0]

    def __call__(self, data: bytes) -> View:
        other = self._other(data)
        return decode_view(data) if other is None else other[1](data)


def make_decoder(config: Config, formats: ViewFormats | None = None) -> Callable[[bytes], View]:
    """The decoder for the configured view format, knowing the formats registered in ``formats``."""
    return FormatDecoder(config, formats)


def decode_view(data: bytes) -> View:
    """Validate ``data`` as a view document; raises :class:`ViewInvalid`."""
    head = data[:64].lstrip()
    if head.startswith(b"<"):
        raise ViewInvalid(["XML documents are not an edge-view/1 view"])
    try:
        if len(data) < _INCREMENTAL_THRESHOLD:
            document = json.loads(data.decode("utf-8"))
        else:
            fast = _ByteStream(data, None, record=False)
            document = fast.result if fast.decode() else _StreamingObject(data).decode()
    except UnicodeDecodeError as exc:
        raise ViewInvalid([f"not valid UTF-8: {exc}"]) from None
    except json.JSONDecodeError as exc:
        raise ViewInvalid([f"not valid JSON: {exc}"]) from None
    except RecursionError:
        raise ViewInvalid(["not valid JSON: nested too deeply"]) from None
    try:
        return parse_view(document)
    finally:
        _drop_gradually(document)


Fingerprint = tuple[int, int]
"""(length, hash) of an instance's document text."""


@dataclass(slots=True)
class DecodeMemo:
    """What :func:`decode_view_reusing` remembers of the last accepted document.

    Instances are recognised by the length and hash of their text rather than by keeping
    the text (about 1 KB per instance).  Python's string hash is SipHash keyed at random per
    process (PEP 456), so two different texts of equal length that also collide on 64 bits
    are not a practical concern; the memo never leaves the process.
    """

    by_id: dict[str, tuple[int, int, Instance]]
    order: list[str]
    """Instance ids in document order: the candidate for elements that do not start with ``id``."""
    cloud: object
    networks: object
    by_hash: dict[int, tuple[int, int, Instance]]
    """The same entries by the hash of their text: the fast path, which sees each element's
    bytes before decoding it, needs neither its position nor its id to recognise it."""


@dataclass(slots=True)
class Decoded:
    view: View
    memo: DecodeMemo
    reused: int
    """Instances taken over from the previous document unchanged."""
    cross_checked: bool
    """False: rules across instances (unique ids, addresses, MACs) are left to the build."""
    delta: bool = False
    """The document keeps ``memo``'s cloud and networks and reuses at least half of its
    instances: build it as a delta (:mod:`edge.view.delta`), which enforces the rules across
    instances itself."""


def decode_view_reusing(data: bytes, memo: DecodeMemo | None, defer_cross_check: bool = False) -> Decoded:
    """:func:`decode_view`, reusing the instances of ``memo``'s document whose text is unchanged.

    Rules that span instances are skipped (``cross_checked`` False) when the result is a
    ``delta``, or always with ``defer_cross_check``: the caller then enforces them as it
    builds (a delta, or ``build_snapshot_tracked(check_unique=True)``, where the indexes find
    duplicates at no extra cost).  A document with other problems is still reported with
    every problem, those across instances included.  Raises :class:`ViewInvalid`.
    """
    if data[:64].lstrip().startswith(b"<"):
        raise ViewInvalid(["XML documents are not an edge-view/1 view"])
    try:
        stream = _decode_stream(data, memo)
    except ViewInvalid:
        # Not JSON at all: report it exactly as decode_view does.
        decode_view(data)
        raise
    document = stream.result
    same_networks = memo is not None and type(document) is dict and document.get("networks") == memo.networks
    if stream.reused and not same_networks:
        # Instances were validated against the old networks' CIDRs: decode them afresh.
        stream = _decode_stream(data, None)
        document = stream.result
    delta = (same_networks and memo is not None and document.get("cloud") == memo.cloud
             and stream.reused * 2 >= len(stream.spans))
    check = not delta and not defer_cross_check
    try:
        try:
            view = parse_view(document, cross_check=check)
        except ViewInvalid:
            if not check:
                parse_view(document)  # raises too, listing the problems across instances as well
            raise
        if len(view.instances) != len(stream.spans):
            raise ViewInvalid(["$.instances: not one instance per element"])  # pragma: no cover - parse drops none
        by_id = {}
        by_hash = {}
        for instance, entry in zip(view.instances, stream.spans):
            if len(entry) != 3:
                entry = (entry[0], entry[1], instance)
            by_id[instance.id] = by_hash[entry[1]] = entry
        kept = DecodeMemo(by_id, [i.id for i in view.instances], document.get("cloud"), document.get("networks"),
                          by_hash)
        document.pop("cloud", None)
        document.pop("networks", None)
    finally:
        _drop_gradually(document)
    return Decoded(view, kept, stream.reused, cross_checked=check, delta=delta)


def _decode_stream(data: bytes, memo: DecodeMemo | None) -> _ByteStream | _StreamingObject:
    fast = _ByteStream(data, memo, record=True)
    if fast.decode():
        return fast
    stream = _StreamingObject(data, memo, record=True)
    try:
        stream.result = stream.decode()
    except UnicodeDecodeError as exc:
        raise ViewInvalid([f"not valid UTF-8: {exc}"]) from None
    except json.JSONDecodeError as exc:
        raise ViewInvalid([f"not valid JSON: {exc}"]) from None
    except RecursionError:
        raise ViewInvalid(["not valid JSON: nested too deeply"]) from None
    return stream


def _drop_gradually(document: Any) -> None:
    """Free the decoded document member by member (one huge free would stall the loop)."""
    if type(document) is dict:
        for value in document.values():
            if type(value) is list:
                while value:
                    del value[-500:]


class _StreamingObject:
    """``json.loads`` of a top-level object, in small steps.

    The bytes are decoded to text one chunk at a time and every member of a
    top-level array is decoded by its own ``raw_decode`` call, so no single C
    call runs long enough to stall the event loop.  A member that straddles a
    chunk boundary is retried once the next chunk is appended.
    """

    CHUNK = 1 << 20

    def __init__(self, data: bytes, memo: DecodeMemo | None = None, record: bool = False) -> None:
        self.data = memoryview(data)
        self.offset = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text = ""
        self.pos = 0
        self.dropped = 0
        """Characters of the document before ``text`` (consumed and let go)."""
        self.memo = memo
        self.record = record
        self.spans: list[Fingerprint | tuple[int, int, Instance]] = []
        """Per element of ``instances``: its fingerprint, or the memo entry it reused."""
        self.reused = 0
        self.result: Any = None

    def _more(self) -> bool:
        if self.offset >= len(self.data):
            return False
        chunk = self.data[self.offset:self.offset + self.CHUNK]
        self.offset += len(chunk)
        final = self.offset >= len(self.data)
        # Drop what has been consumed so the window stays about one chunk long.
        self.dropped += self.pos
        self.text = self.text[self.pos:] + self.decoder.decode(chunk, final)
        self.pos = 0
        return True

    def _skip_ws(self) -> str:
        """Skip whitespace; the next character ('' at the very end)."""
        while True:
            self.pos = _WHITESPACE.match(self.text, self.pos).end()  # type: ignore[union-attr]  # "[ \t\n\r]*" always matches
            if self.pos < len(self.text) or not self._more():
                return self.text[self.pos:self.pos + 1]

    def _value(self) -> Any:
        while True:
            try:
                value, end = _DECODER.raw_decode(self.text, self.pos)
            except json.JSONDecodeError:
                if self._more():
                    continue
                raise
            # A number at the window's end may continue in the next chunk.
            if end == len(self.text) and self.offset < len(self.data):
                self._more()
                continue
            self.pos = end
            return value

    def _expect(self, char: str, message: str) -> None:
        if self._skip_ws() != char:
            raise json.JSONDecodeError(message, self.text, self.pos)
        self.pos += 1

    def decode(self) -> Any:
        self._more()
        if self._skip_ws() != "{":
            # Not an object: let the plain decoder report what it is.
            return json.loads(bytes(self.data).decode("utf-8"))
        self.pos += 1
        result: dict[str, Any] = {}
        if self._skip_ws() == "}":
            self.pos += 1
        else:
            while True:
                self._skip_ws()
                key = self._value()
                if not isinstance(key, str):
                    raise json.JSONDecodeError("Expecting property name enclosed in double quotes", self.text, self.pos)
                self._expect(":", "Expecting ':' delimiter")
                if self._skip_ws() == "[":
                    self.pos += 1
                    if key == "instances":
                        result[key] = self._instances(instance_validator(result))
                    else:
                        result[key] = self._array()
                else:
                    result[key] = self._value()
                following = self._skip_ws()
                self.pos += 1
                if following == "}":
                    break
                if following != ",":
                    raise json.JSONDecodeError("Expecting ',' delimiter", self.text, self.pos - 1)
        if self._skip_ws() != "":
            raise json.JSONDecodeError("Extra data", self.text, self.pos)
        return result

    def _array(self) -> list[Any]:
        items: list[Any] = []
        if self._skip_ws() == "]":
            self.pos += 1
            return items
        while True:
            self._skip_ws()
            items.append(self._value())
            following = self._skip_ws()
            self.pos += 1
            if following == "]":
                return items
            if following != ",":
                raise json.JSONDecodeError("Expecting ',' delimiter", self.text, self.pos - 1)

    def _instances(self, validate: Callable[[Any], Any] | None) -> list[Any]:
        """``_array`` for the instances: each element validated as soon as it is decoded.

        With ``record``, each element is also fingerprinted, and elements unchanged since
        the memo's document are reused rather than decoded.
        """
        items: list[Any] = []
        spans = self.spans = []
        record = self.record
        self.reused = 0
        memo = self.memo
        if self._skip_ws() == "]":
            self.pos += 1
            return items
        while True:
            self._skip_ws()
            item = self._reuse(memo, len(items)) if memo is not None else None
            if item is None:
                start = self.dropped + self.pos
                item = self._value()
                if record:
                    text = self.text[start - self.dropped:self.pos]
                    spans.append((len(text), hash(text)))
                if validate is not None:
                    item = validate(item)
            items.append(item)
            following = self._skip_ws()
            self.pos += 1
            if following == "]":
                return items
            if following != ",":
                raise json.JSONDecodeError("Expecting ',' delimiter", self.text, self.pos - 1)

    def _reuse(self, memo: DecodeMemo, index: int) -> Reused | None:
        """The previous instance if the element at ``pos`` has exactly its previous text.

        The candidate is the previous element at the same position (right unless instances
        were added or removed before this one), else the previous instance with the id the
        element starts with.
        """
        if index < len(memo.order):
            entry = memo.by_id.get(memo.order[index])
            if entry is not None and self._same_text(entry):
                return self._reused(entry)
        leading = _LEADING_ID.match(self.text, self.pos)
        if leading is None:
            return None
        entry = memo.by_id.get(leading.group(1))
        if entry is not None and self._same_text(entry):
            return self._reused(entry)
        return None

    def _same_text(self, entry: tuple[int, int, Instance]) -> bool:
        length = entry[0]
        while self.pos + length > len(self.text):
            if not self._more():
                return False
        return hash(self.text[self.pos:self.pos + length]) == entry[1]

    def _reused(self, entry: tuple[int, int, Instance]) -> Reused:
        self.pos += entry[0]
        self.spans.append(entry)
        self.reused += 1
        return Reused(entry[2])


_RAWS = msgspec.json.Decoder(list[msgspec.Raw])
_MEMBERS = msgspec.json.Decoder(dict[str, msgspec.Raw])


class _GiveUp(Exception):
    """The fast path met something it leaves to the reference path."""


class _ByteStream:
    """The fast path of the streaming decoder, on the document's bytes.

    Top-level members other than ``instances`` are small and decoded whole.  The
    ``instances`` array is cut into batches of about :attr:`BATCH` bytes; each batch is
    split into its elements' raw bytes by one msgspec call, and each element is then
    recognised (``memo``), or decoded by type and validated (:mod:`edge.view.wire`), or,
    when the typed path doubts it, decoded as plain JSON for the validators of
    :mod:`edge.view.parse`.  :meth:`decode` returns False, having decided nothing, when
    the document is not what this path expects: not UTF-8 JSON, ``networks`` missing or
    invalid, or brackets inside strings that defeat the cutting.
    """

    BATCH = 1 << 18
    TRIES = 4
    """Candidate cuts tried before counting brackets to find one."""

    def __init__(self, data: bytes, memo: DecodeMemo | None, record: bool) -> None:
        self.data = data
        self.memo = memo
        self.record = record
        self.spans: list[Fingerprint | tuple[int, int, Instance]] = []
        """Per element of ``instances``: its fingerprint, or the memo entry it reused."""
        self.reused = 0
        self.result: Any = None

    def decode(self) -> bool:
        try:
            self.result = self._object()
        except (_GiveUp, msgspec.DecodeError, UnicodeDecodeError, RecursionError, json.JSONDecodeError):
            self.spans, self.reused, self.result = [], 0, None
            return False
        return True

    def _object(self) -> dict[str, Any]:
        data = self.data
        pos = skip_whitespace(data, 0)
        if data[pos:pos + 1] != b"{":
            raise _GiveUp
        pos = skip_whitespace(data, pos + 1)
        result: dict[str, Any] = {}
        if data[pos:pos + 1] == b"}":
            pos += 1
        else:
            while True:
                end = string_end(data, pos)
                if end is None:
                    raise _GiveUp
                key = msgspec.json.decode(data[pos:end])
                pos = skip_whitespace(data, end)
                if data[pos:pos + 1] != b":":
                    raise _GiveUp
                pos = skip_whitespace(data, pos + 1)
                if key == "instances" and data[pos:pos + 1] == b"[":
                    table = cidr_table_of(result)
                    if table is None:
                        return self._members_at_once()
                    if key in result:
                        raise _GiveUp
                    result[key], end = self._instances(pos + 1, table)
                else:
                    end = value_end(data, pos)
                    if end is None:
                        raise _GiveUp
                    result[key] = msgspec.json.decode(data[pos:end])
                pos = skip_whitespace(data, end)
                following = data[pos:pos + 1]
                pos += 1
                if following == b"}":
                    break
                if following != b",":
                    raise _GiveUp
                pos = skip_whitespace(data, pos)
        if skip_whitespace(data, pos) != len(data):
            raise _GiveUp
        return result

    def _members_at_once(self) -> dict[str, Any]:
        """:meth:`_object` for a document whose ``instances`` come before ``networks``.

        Instances are checked against the networks, and keys in alphabetical order (Go's
        encoding/json on a map, ``json.dumps(sort_keys=True)``) put them first.  Finding
        where each member ends takes one msgspec call over the whole document, which holds
        the interpreter lock for about 70 ms per 100k instances; the instances are then
        decoded in batches as usual.
        """
        members = _MEMBERS.decode(self.data)
        raw = members.pop("instances")
        result: dict[str, Any] = {key: msgspec.json.decode(value) for key, value in members.items()}
        table = cidr_table_of(result)
        text = bytes(raw)
        if table is None or text[:1] != b"[":
            raise _GiveUp
        whole, self.data = self.data, text
        try:
            result["instances"], end = self._instances(1, table)
        finally:
            self.data = whole
        if end != len(text):
            raise _GiveUp
        return result

    def _instances(self, pos: int, cidrs: Cidrs) -> tuple[list[Any], int]:
        """The elements of the array whose first element is at or after ``pos``, and the end of the array."""
        data = self.data
        items: list[Any] = []
        pos = skip_whitespace(data, pos)
        if data[pos:pos + 1] == b"]":
            return items, pos + 1
        end: int | None
        while True:
            raws: list[msgspec.Raw] | list[bytes] | None = None
            for end in likely_elements_ends(data, pos + self.BATCH, self.TRIES):
                raws = self._batch(pos, end)
                if raws is not None:
                    break
            else:
                end = elements_end(data, pos, pos + self.BATCH)
                raws = self._batch(pos, end)
            if raws is None:
                # The guess was wrong (a string holds brackets, or the array ended early):
                # take the elements one at a time until the cutting works again.
                end = elements_end(data, pos, pos)
                raws = self._batch(pos, end)
                if raws is None:
                    end = self._exact_end(pos)
                    raws = [data[pos:end]]
            self._elements(raws, items, cidrs)
            assert end is not None
            pos = skip_whitespace(data, end)
            following = data[pos:pos + 1]
            if following == b"]":
                return items, pos + 1
            if following != b",":
                raise _GiveUp
            pos = skip_whitespace(data, pos + 1)

    def _exact_end(self, pos: int) -> int:
        """The end of the object at ``pos``, found by a JSON decoder (which brackets in strings cannot fool)."""
        data = self.data
        if data[pos:pos + 1] != b"{":
            raise _GiveUp
        window = 1 << 16
        while True:
            text, _ = codecs.utf_8_decode(data[pos:pos + window], "strict", False)
            try:
                _, end = _DECODER.raw_decode(text)
            except json.JSONDecodeError:
                if pos + window >= len(data):
                    raise _GiveUp from None
                window *= 4
                continue
            return pos + len(text[:end].encode("utf-8"))

    def _batch(self, start: int, end: int | None) -> list[msgspec.Raw] | None:
        if end is None or end <= start:
            return None
        try:
            raws = _RAWS.decode(b"[" + self.data[start:end] + b"]")
        except msgspec.DecodeError:
            return None
        return raws or None

    def _elements(self, raws: list[msgspec.Raw] | list[bytes], items: list[Any], cidrs: Cidrs) -> None:
        """The elements of a batch: recognised from ``memo`` (unchanged text), or decoded and validated.

        An element with a problem is left decoded as plain JSON, for :func:`parse_view` to explain.
        With ``record``, each element's fingerprint (or the memo entry it reused) goes to ``spans``.
        """
        spans, items_append = self.spans, items.append
        decode = INSTANCE_DECODER.decode
        record = self.record
        by_hash = self.memo.by_hash if self.memo is not None else None
        problems = Problems()
        for raw in raws:
            text = bytes(raw)
            if record:
                length, digest = len(text), hash(text)
                if by_hash is not None:
                    entry = by_hash.get(digest)
                    if entry is not None and entry[0] == length:
                        spans.append(entry)
                        self.reused += 1
                        items_append(Reused(entry[2]))
                        continue
                spans.append((length, digest))
            try:
                instance = instance_from_wire(decode(text), cidrs, problems)
            except msgspec.ValidationError:
                instance = None
            if instance is None:
                problems.items.clear()
                items_append(json.loads(text))
            else:
                items_append(Reused(instance))
