"""The exceptions edge raises, under one root.

Protocol-facing errors (HTTP statuses, DNS RCODEs) live with their protocol;
these are the errors of the view pipeline and configuration.
"""

from __future__ import annotations


class EdgeError(Exception):
    """Root of every error edge raises on purpose."""


class ConfigError(EdgeError):
    """The configuration (file, environment or command line) is not valid."""


class ViewError(EdgeError):
    """A view could not be obtained or accepted."""


class ViewInvalid(ViewError):
    """A view document was rejected; ``problems`` lists every reason."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        shown = "; ".join(problems[:5])
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(f"view rejected: {len(problems)} problem(s): {shown}{more}")


class SourceError(ViewError):
    """The view source could not be read (unreachable, timeout, HTTP error, too large)."""


class ViewTooLarge(SourceError):
    """The view document is bigger than the configured cap."""


class StaleSerial(ViewError):
    """The source offered a view whose serial is lower than the one being served."""


class StateError(ViewError):
    """The last-good-view state directory could not be read or written."""
