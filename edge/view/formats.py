"""Turn document bytes into a :class:`View`, whatever format the source speaks.

A large JSON document is decoded piece by piece (one ``raw_decode`` per
instance) rather than with one ``json.loads`` call: a single C call over a
100 MB document would hold the interpreter lock for a second and stall the
event loop that keeps serving while the new view is built in a thread.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable
from typing import Any

from edge.config import Config
from edge.errors import ViewInvalid
from edge.view.model import View
from edge.view.parse import parse_view

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
# Below this size one json.loads call is short enough not to matter.
_INCREMENTAL_THRESHOLD = 1 << 20


def make_decoder(config: Config) -> Callable[[bytes], View]:
    """The decoder for the configured view format (``auto``: Eucalyptus GNI by its XML root)."""
    from edge.eucalyptus.gni import GniOptions, decode_gni, is_gni

    euca = config.eucalyptus
    options = GniOptions(name_style=euca.name_style, dns_domain=euca.dns_domain, region=euca.region)
    chosen = config.view.format

    def decode(data: bytes) -> View:
        if chosen == "eucalyptus-gni" or (chosen == "auto" and is_gni(data)):
            return decode_gni(data, options)
        return decode_view(data)

    return decode


def decode_view(data: bytes) -> View:
    """Validate ``data`` as a view document; raises :class:`ViewInvalid`."""
    head = data[:64].lstrip()
    if head.startswith(b"<"):
        raise ViewInvalid(["XML documents are not an edge-view/1 view"])
    try:
        if len(data) < _INCREMENTAL_THRESHOLD:
            document = json.loads(data.decode("utf-8"))
        else:
            document = _StreamingObject(data).decode()
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

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.offset = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text = ""
        self.pos = 0

    def _more(self) -> bool:
        if self.offset >= len(self.data):
            return False
        chunk = self.data[self.offset:self.offset + self.CHUNK]
        self.offset += len(chunk)
        final = self.offset >= len(self.data)
        # Drop what has been consumed so the window stays about one chunk long.
        self.text = self.text[self.pos:] + self.decoder.decode(chunk, final)
        self.pos = 0
        return True

    def _skip_ws(self) -> str:
        """Skip whitespace; the next character ('' at the very end)."""
        while True:
            self.pos = _WHITESPACE.match(self.text, self.pos).end()
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
