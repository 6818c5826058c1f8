"""Follow the GNI and eucanetd's intip map together, as one view source."""

from __future__ import annotations

from edge.config import Config
from edge.errors import SourceError
from edge.eucalyptus.gni import bundle, configured_md_cidr, parse_intip_map
from edge.view.sources import FileSource, ViewSource


class GniWithIntipMap(ViewSource):
    """Delivers the GNI with the intip map bundled in whenever either of them changes.

    A missing map file is not an error (EDGE mode has none, and eucanetd may not
    have written it yet): the GNI is delivered alone.
    """

    def __init__(self, gni: ViewSource, map_path: str, max_size: int, md_cidr: str = "255.0.0.0/8") -> None:
        self.gni = gni
        self.md_cidr = md_cidr
        self.lines_ignored = 0
        """Map lines that were not entries (torn while eucanetd rewrote it, or outside MIDO_MD_CIDR)."""
        self.map = FileSource(map_path, max_size)
        self.description = f"{gni.description}+intip:{map_path}"
        self._gni: bytes | None = None
        self._map: bytes | None = None

    async def fetch(self) -> bytes | None:
        gni = await self.gni.fetch()
        if gni is not None and not isinstance(gni, bytes):
            # Only an edge-view source (etcd, a changes feed) delivers a prepared view, never a GNI.
            raise SourceError(f"{self.gni.description} delivered a prepared view, not a GNI document")
        try:
            intip = await self.map.fetch()
        except SourceError as exc:
            if "no such file" not in str(exc):
                raise
            intip = None
            changed_map = self._map is not None
            self._map = None
        else:
            changed_map = intip is not None
            if intip is not None:
                self._map = intip
                self.lines_ignored += len(parse_intip_map(intip.decode("utf-8", "replace"), self.md_cidr)[1])
        if gni is not None:
            self._gni = gni
        if self._gni is None or (gni is None and not changed_map):
            return None
        return bundle(self._gni, self._map)

    def counters(self) -> dict[str, int]:
        """Exported as ``edge_view_source_events_total{event="intip_lines_ignored"}``."""
        return {"intip_lines_ignored": self.lines_ignored}


def with_intip_map(source: ViewSource, config: Config) -> ViewSource:
    """The source wrapper the composition root registers: bundle the intip map when one is configured."""
    if not config.eucalyptus.intip_map_file:
        return source
    return GniWithIntipMap(source, config.eucalyptus.intip_map_file, config.view.max_size,
                           configured_md_cidr(config))
