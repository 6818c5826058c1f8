"""Response bytes, built once, and the one mapping from outcomes to HTTP answers.

Every answer edge writes is a :class:`Response` whose wire forms (keep-alive,
close, HEAD) are concatenated when it is built, so writing one is a single
``transport.write`` of an existing bytes object.  Header lines that vary per
request (the remaining token lifetime) are joined in, never formatted.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

SERVER = b"Server: EC2ws\r\n"
CLOSE = b"Connection: close\r\n"
TEXT = b"text/plain"
BINARY = b"application/octet-stream"
HTML = b"text/html"

_REASONS = {
    200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
    405: b"Method Not Allowed", 413: b"Payload Too Large", 414: b"URI Too Long", 429: b"Too Many Requests",
    431: b"Request Header Fields Too Large", 500: b"Internal Server Error", 503: b"Service Unavailable",
}
STATUS_LINES = {code: b"HTTP/1.1 %d %s\r\n" % (code, reason) for code, reason in _REASONS.items()}


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    head: bytes
    """Status line and headers, without the blank line that ends them."""
    body: bytes
    keep_alive: bytes = field(init=False)
    close: bytes = field(init=False)
    head_keep_alive: bytes = field(init=False)
    head_close: bytes = field(init=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "head_keep_alive", self.head + b"\r\n")
        set_(self, "head_close", self.head + CLOSE + b"\r\n")
        set_(self, "keep_alive", self.head_keep_alive + self.body)
        set_(self, "close", self.head_close + self.body)

    def wire(self, keep_alive: bool, head_only: bool) -> bytes:
        if head_only:
            return self.head_keep_alive if keep_alive else self.head_close
        return self.keep_alive if keep_alive else self.close

    def wire_with(self, line: bytes, keep_alive: bool, head_only: bool) -> bytes:
        """The response with one extra header line (``b"Name: value\\r\\n"``)."""
        return b"".join((self.head, line, b"\r\n" if keep_alive else CLOSE + b"\r\n", b"" if head_only else self.body))


def response(status: int, body: bytes = b"", content_type: bytes | None = TEXT,
             headers: tuple[bytes, ...] = ()) -> Response:
    head = [STATUS_LINES[status], SERVER]
    if content_type is not None:
        head.append(b"Content-Type: " + content_type + b"\r\n")
    head.extend(headers)
    head.append(b"Content-Length: %d\r\n" % len(body))
    return Response(status, b"".join(head), body)


def text(body: bytes) -> Response:
    return response(200, body)


def binary(body: bytes) -> Response:
    return response(200, body, BINARY)


NOT_FOUND_PAGE = b"""<?xml version="1.0" encoding="iso-8859-1"?>
<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"
         "http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">
<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">
 <head>
  <title>404 - Not Found</title>
 </head>
 <body>
  <h1>404 - Not Found</h1>
 </body>
</html>
"""


class Outcome(enum.Enum):
    """Every way a request can fail; :data:`ANSWERS` is the one place they become HTTP."""

    BAD_REQUEST = "malformed request or token lifetime"
    UNAUTHORIZED = "missing, invalid, expired or foreign token"
    FORBIDDEN = "endpoint disabled, forwarded token request or dated token path"
    NOT_FOUND = "no such path or unknown instance"
    TOKEN_METHOD = "token path only takes PUT"
    METHOD = "method not allowed"
    BODY_TOO_LARGE = "request body too large"
    URL_TOO_LONG = "request target too long"
    HEADERS_TOO_LARGE = "request header block too large"
    THROTTLED = "instance over its request rate"
    UNAVAILABLE = "credential source unavailable"
    INTERNAL = "unexpected error while answering"


ANSWERS: dict[Outcome, Response] = {
    Outcome.BAD_REQUEST: response(400, content_type=None),
    Outcome.UNAUTHORIZED: response(401, content_type=None),
    Outcome.FORBIDDEN: response(403, content_type=None),
    Outcome.NOT_FOUND: response(404, NOT_FOUND_PAGE, HTML),
    Outcome.TOKEN_METHOD: response(405, content_type=None, headers=(b"Allow: OPTIONS, PUT\r\n",)),
    Outcome.METHOD: response(405, content_type=None, headers=(b"Allow: GET, HEAD\r\n",)),
    Outcome.BODY_TOO_LARGE: response(413, content_type=None),
    Outcome.URL_TOO_LONG: response(414, content_type=None),
    Outcome.HEADERS_TOO_LARGE: response(431, content_type=None),
    Outcome.THROTTLED: response(429, content_type=None),
    Outcome.UNAVAILABLE: response(503, content_type=None),
    Outcome.INTERNAL: response(500, content_type=None),
}

TOKEN_OPTIONS = response(200, content_type=None, headers=(b"Allow: OPTIONS, PUT\r\n",))
