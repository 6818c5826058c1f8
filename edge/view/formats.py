"""Turn document bytes into a :class:`View`, whatever format the source speaks.

A large JSON document is decoded piece by piece (one ``raw_decode`` per
instance) rather than with one ``json.loads`` call: a single C call over a
100 MB document would hold the interpreter lock for a second and stall the
event loop that keeps serving while the new view is built in a thread.
"""

from __future__ import annotations

import json
import re
from typing import Any

from edge.errors import ViewInvalid
from edge.view.model import View
from edge.view.parse import parse_view

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
# Below this size one json.loads call is short enough not to matter.
_INCREMENTAL_THRESHOLD = 1 << 20


def decode_view(data: bytes) -> View:
    """Validate ``data`` as a view document; raises :class:`ViewInvalid`."""
    head = data[:64].lstrip()
    if head.startswith(b"<"):
        raise ViewInvalid(["XML documents are not an edge-view/1 view"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ViewInvalid([f"not valid UTF-8: {exc}"]) from None
    try:
        document = _loads(text)
    except json.JSONDecodeError as exc:
        raise ViewInvalid([f"not valid JSON: {exc}"]) from None
    except RecursionError:
        raise ViewInvalid(["not valid JSON: nested too deeply"]) from None
    return parse_view(document)


def _loads(text: str) -> Any:
    if len(text) < _INCREMENTAL_THRESHOLD:
        return json.loads(text)
    return _loads_incremental(text)


def _loads_incremental(text: str) -> Any:
    """``json.loads`` for a top-level object, decoding array members one at a time."""
    ws = _WHITESPACE.match
    decode = _DECODER.raw_decode
    index = ws(text, 0).end()
    if text[index:index + 1] != "{":
        return json.loads(text)
    result: dict[str, Any] = {}
    index = ws(text, index + 1).end()
    if text[index:index + 1] == "}":
        return _expect_end(text, index + 1, result)
    while True:
        key, index = decode(text, index)
        if not isinstance(key, str):
            raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, index)
        index = ws(text, index).end()
        if text[index:index + 1] != ":":
            raise json.JSONDecodeError("Expecting ':' delimiter", text, index)
        index = ws(text, index + 1).end()
        if text[index:index + 1] == "[":
            value, index = _decode_array(text, index + 1)
        else:
            value, index = decode(text, index)
        result[key] = value
        index = ws(text, index).end()
        separator = text[index:index + 1]
        if separator == "}":
            return _expect_end(text, index + 1, result)
        if separator != ",":
            raise json.JSONDecodeError("Expecting ',' delimiter", text, index)
        index = ws(text, index + 1).end()


def _decode_array(text: str, index: int) -> tuple[list[Any], int]:
    ws = _WHITESPACE.match
    decode = _DECODER.raw_decode
    items: list[Any] = []
    index = ws(text, index).end()
    if text[index:index + 1] == "]":
        return items, index + 1
    while True:
        value, index = decode(text, index)
        items.append(value)
        index = ws(text, index).end()
        separator = text[index:index + 1]
        if separator == "]":
            return items, index + 1
        if separator != ",":
            raise json.JSONDecodeError("Expecting ',' delimiter", text, index)
        index = ws(text, index + 1).end()


def _expect_end(text: str, index: int, result: dict[str, Any]) -> dict[str, Any]:
    index = _WHITESPACE.match(text, index).end()
    if index != len(text):
        raise json.JSONDecodeError("Extra data", text, index)
    return result
