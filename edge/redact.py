"""Hide the secrets a source address may carry before it is shown (``/view``, logs, ``edge view check``).

A view, token-key or credential source URL can hold a user and password
(``https://user:pass@host/``, ``etcd://user:pass@host:2379/key``) or a token in
its query (``?token=...``, a pre-signed URL's signature).  Edge cannot tell a
harmless query value from a secret one, so every query value is hidden; the
parameter names stay, so an operator can still tell the addresses apart.
"""

from __future__ import annotations

import re

HIDDEN = "REDACTED"

_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*[^\s'\"<>.,:;)]")
"""A URL in running text; punctuation right after it (``URL: HTTP 500``) is not part of it."""


def redact_url(url: str) -> str:
    """``url`` with its user information, query values and fragment replaced by ``REDACTED``."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url
    rest, hash_mark, fragment = rest.partition("#")
    rest, question_mark, query = rest.partition("?")
    if "@" in rest:
        # Everything up to the last "@" is user information, even if a password holds a "/":
        # hiding too much of an odd path is better than showing part of a password.
        rest = HIDDEN + "@" + rest.rpartition("@")[2]
    if question_mark:
        rest += "?" + "&".join(_redact_parameter(part) for part in query.split("&"))
    if hash_mark:
        rest += "#" + (HIDDEN if fragment else "")
    return f"{scheme}://{rest}"


def _redact_parameter(parameter: str) -> str:
    name, equals, value = parameter.partition("=")
    if not equals:
        return HIDDEN if name else ""  # a bare ``?TOKEN`` is a value
    return f"{name}={HIDDEN if value else ''}"


def redact(text: str) -> str:
    """``text`` (a message, an error) with every URL in it redacted as ``redact_url`` does."""
    if "://" not in text:
        return text
    return _URL.sub(lambda match: redact_url(match.group(0)), text)
