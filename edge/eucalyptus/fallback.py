"""Metadata answers from the Eucalyptus controller, for the metadata handler.

When a controller is configured, a metadata read (after identification, rate
limit and token checks, which stay edge's) is answered from the controller's
cached answer; a miss becomes a :class:`NeedController` for the slow path.
If the controller cannot answer and nothing usable is cached, the handler
answers from the view instead (what the GNI knows), so instances keep working.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge.eucalyptus.controller import ControllerAnswer, ControllerMetadata, ControllerUnavailable
from edge.metadata.responses import ANSWERS, BINARY, Outcome, Response, response
from edge.metadata.tree import VERSION_SET, split_path
from edge.view.model import Instance

_ASKED = frozenset({"meta-data", "user-data", "dynamic"})


@dataclass(frozen=True, slots=True)
class NeedController:
    instance: Instance
    address: str
    path: str
    ttl_line: bytes | None


def controller_path(target: bytes) -> str | None:
    """The path to ask the controller for (``latest/meta-data/ami-id``), or None if it is edge's own."""
    parts = split_path(target)
    if not parts or len(parts) < 2 or parts[0] not in VERSION_SET or parts[1] not in _ASKED:
        return None
    path = "/".join(parts)
    # Listings are asked for as directories, as cloud-init and the controller expect.
    if target.split(b"?", 1)[0].endswith(b"/") or parts[-1] in _ASKED - {"user-data"}:
        path += "/"
    return path


class ControllerAnswers:
    """Rendered responses for controller answers, built once per answer."""

    def __init__(self, controller: ControllerMetadata) -> None:
        self.controller = controller
        self._rendered: dict[tuple[str, str], tuple[ControllerAnswer, Response]] = {}

    async def fetch(self, instance_id: str, address: str, path: str) -> Response | None:
        """The controller's answer (fresh, or stale while it is down); None if it has none to give."""
        try:
            answer = await self.controller.fetch(instance_id, address, path)
        except ControllerUnavailable:
            return None
        return self.render(instance_id, path, answer)

    def cached(self, instance_id: str, path: str, now: float) -> Response | None:
        answer = self.controller.cached(instance_id, path, now)
        return None if answer is None else self.render(instance_id, path, answer)

    def render(self, instance_id: str, path: str, answer: ControllerAnswer) -> Response:
        key = (instance_id, path)
        known = self._rendered.get(key)
        if known is not None and known[0] is answer:
            return known[1]
        if answer.status == 200:
            user_data = path.endswith("user-data")
            rendered = response(200, answer.body, BINARY) if user_data else response(200, answer.body)
        elif answer.status == 404:
            rendered = ANSWERS[Outcome.NOT_FOUND]
        else:
            rendered = ANSWERS[Outcome.UNAVAILABLE]
        if len(self._rendered) > 4 * self.controller.config.controller_cache_entries:
            self._rendered.clear()
        self._rendered[key] = (answer, rendered)
        return rendered
