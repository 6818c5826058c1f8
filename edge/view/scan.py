"""Find where JSON values end in a document's bytes, without decoding them.

A large view is decoded in small steps so that no single C call holds the
interpreter lock long enough to stall the event loop serving beside the build.
These helpers cut the document into pieces a decoder takes one at a time: they
count brackets, which is fast (``bytes.count`` and one regular expression run
in C) but can be fooled by brackets inside strings.  Every cut is therefore
only a guess that the caller confirms by decoding the piece: a cut inside a
string leaves that string unterminated, and a cut inside an object or array
leaves it unclosed, so a piece that decodes is a piece of whole values.
"""

from __future__ import annotations

import re

_WHITESPACE = re.compile(rb"[ \t\n\r]*")
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_SCALAR = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|true|false|null")
_CLOSING = re.compile(rb"[\]}]")
_BETWEEN_OBJECTS = re.compile(rb"}[ \t\n\r]*,[ \t\n\r]*{")


def skip_whitespace(data: bytes, pos: int) -> int:
    return _WHITESPACE.match(data, pos).end()  # type: ignore[union-attr]  # "[ \t\n\r]*" always matches


def string_end(data: bytes, pos: int) -> int | None:
    """The end of the JSON string starting at ``pos``, or None if none starts there."""
    match = _STRING.match(data, pos)
    return None if match is None else match.end()


def _balance(data: bytes, start: int, end: int) -> int:
    """Opening minus closing brackets in ``data[start:end]``."""
    return (data.count(b"{", start, end) + data.count(b"[", start, end)
            - data.count(b"}", start, end) - data.count(b"]", start, end))


def value_end(data: bytes, pos: int) -> int | None:
    """Where the value starting at ``pos`` probably ends (exclusive); None if it cannot tell."""
    first = data[pos:pos + 1]
    if first == b'"':
        return string_end(data, pos)
    if first not in (b"{", b"["):
        match = _SCALAR.match(data, pos)
        return None if match is None else match.end()
    closed = _first_close_to(data, pos, 0)
    return None if closed is None or closed[1] != 0 else closed[0]


def _first_close_to(data: bytes, counted: int, balance: int) -> tuple[int, int] | None:
    """The first closing bracket from ``counted`` on at which ``balance`` (brackets open so far)
    drops to 0 or below: the position after it and the balance there; None if there is none."""
    while True:
        found = _CLOSING.search(data, counted)
        if found is None:
            return None
        end = found.end()
        balance += _balance(data, counted, end)
        counted = end
        if balance <= 0:
            return end, balance


def likely_elements_ends(data: bytes, at_least: int, tries: int) -> list[int]:
    """Up to ``tries`` places after ``at_least`` that look like the end of an object in an array of objects.

    Cheaper than :func:`elements_end` (no counting), but nested arrays of objects look the
    same, so each is only a candidate.
    """
    ends = []
    for match in _BETWEEN_OBJECTS.finditer(data, at_least):
        ends.append(match.start() + 1)
        if len(ends) == tries:
            break
    return ends


def elements_end(data: bytes, start: int, at_least: int) -> int | None:
    """Where a run of whole array elements starting at ``start`` probably ends.

    ``start`` is the first byte of an element of an array of objects.  The answer is just
    after the first element end at or beyond ``at_least``, or the position of the array's
    closing ``]`` if the array ends first; None when the brackets do not add up.
    """
    counted = start
    balance = 0
    if at_least > start:
        balance = _balance(data, start, at_least)
        counted = at_least
        if balance < 0:
            # Past the end of the array already: find it element by element.
            balance, counted = 0, start
    closed = _first_close_to(data, counted, balance)
    if closed is None:
        return None
    end, balance = closed
    if balance == 0:
        return end  # after an element (an array element, if any, is the validator's to refuse)
    if balance == -1 and data[end - 1:end] == b"]":
        return end - 1
    return None
