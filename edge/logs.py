"""Structured event logs: one line per event that matters, ``key=value`` or JSON."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from edge.redact import redact

_FIELDS = "edge_fields"
_EVENT = "edge_event"


def event(logger: logging.Logger, level: int, name: str, *, exc_info: bool = False, **fields: Any) -> None:
    """Log event ``name`` with ``fields`` (and, with ``exc_info``, the exception being handled).

    The plain message carries the fields as ``key=value`` too, so any handler
    (a test's capture, a foreign formatter) shows the whole event.  URLs in string
    fields are shown without their user information and query values (``edge.redact``).
    """
    if logger.isEnabledFor(level):
        # Sources are often logged, and their URLs may carry a password or a token.
        fields = {key: redact(value) if isinstance(value, str) else value for key, value in fields.items()}
        rendered = " ".join([name] + [f"{key}={_quote(value)}" for key, value in fields.items()])
        logger.log(level, "%s", rendered, exc_info=exc_info, extra={_FIELDS: fields, _EVENT: name})


def _quote(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return json.dumps(text)
    return text


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        parts = [f"ts={stamp}", f"level={record.levelname.lower()}", f"logger={record.name}",
                 f"event={_quote(getattr(record, _EVENT, None) or record.getMessage())}"]
        for key, value in getattr(record, _FIELDS, {}).items():
            parts.append(f"{key}={_quote(value)}")
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return redact(" ".join(parts))  # plain log calls and tracebacks too


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document = {"ts": record.created, "level": record.levelname.lower(), "logger": record.name,
                    "event": getattr(record, _EVENT, None) or record.getMessage()}
        document.update(getattr(record, _FIELDS, {}))
        if record.exc_info:
            document["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(document, default=str))  # plain log calls and tracebacks too


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger("edge")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
