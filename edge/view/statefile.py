"""The last good view on disk: what a gateway serves when it restarts without its control plane.

Two files per source in the state directory:

* ``last-good-view.<tag>``, a whole ``edge-view/1`` document (or the
  source's own format), written atomically (temporary file, fsync, rename,
  fsync of the directory), so a crash mid-write leaves the previous copy;
* ``last-good-view.<tag>.journal``, the changes accepted since that
  document, one ``edge-view-changes/1`` record per accepted serial, appended
  and fsynced: what a source that says which instances changed (an etcd
  keyspace, an HTTP control plane answering ``since``) costs per change is
  the changed instances, not the whole view again.

Each journal record is framed as ``<length> <crc32 hex>\\n<record>\\n``, so a
torn or corrupt tail (a crash mid-append, a bad disk) is found on reading:
everything before it is replayed and the rest ignored, never the document.
When the journal grows past a fraction of the document, it is compacted: it
is renamed ``.journal.compacting`` (new records go to a fresh journal), a
new document is written for the serial the renamed journal ends at, and the
renamed file is deleted.  A crash at any point leaves a document plus records
that replay onto it: records whose serial the document already holds are
skipped, and a record that does not follow on from the serial reached stops
the replay.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from edge.errors import SourceError, StateError, ViewInvalid, ViewTooLarge
from edge.view.changes import CHANGES_FORMAT, apply_changes, decode_changes, load_document
from edge.view.keyspace import Keyspace, PreparedView
from edge.view.sources import ViewSource

LAST_GOOD_NAME = "last-good-view"
JOURNAL_SUFFIX = ".journal"
COMPACTING_SUFFIX = ".journal.compacting"
MAX_HEADER = 40
"""Longest record header (``<length> <crc32>\\n``): a longer first line is damage, not a header."""


@dataclass(slots=True)
class JournalRead:
    """The records of the journal files, oldest first, and where reading them stopped short."""

    records: list[bytes] = field(default_factory=list)
    damage: str = ""
    """Why the rest of a file was ignored (empty: every record was whole)."""
    size: int = 0
    """Bytes of journal read (both files)."""


class StateFile:
    """One last-good file (and its journal) per source, so pointing a gateway at another source starts clean.

    (A view from the old source could otherwise carry a higher serial and block
    every view of the new one.)
    """

    def __init__(self, state_dir: str, source: str) -> None:
        self.directory = state_dir
        tag = hashlib.sha256(source.encode()).hexdigest()[:12]
        self.path = os.path.join(state_dir, f"{LAST_GOOD_NAME}.{tag}")
        self.journal_path = self.path + JOURNAL_SUFFIX
        self.compacting_path = self.path + COMPACTING_SUFFIX

    def read(self) -> bytes | None:
        """The last good document, or None if there is none yet."""
        try:
            with open(self.path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read {self.path}: {exc.strerror or exc}") from None

    def document_size(self) -> int:
        try:
            return os.stat(self.path).st_size
        except OSError:
            return 0

    def write(self, data: bytes) -> None:
        """Replace the document with ``data`` and drop the journal (the document holds everything)."""
        self._write_document(data)
        for path in (self.compacting_path, self.journal_path):
            self._unlink(path)

    # -- the journal --------------------------------------------------------------------------

    def append(self, record: bytes) -> int:
        """Append one record to the journal and fsync it; the journal's size afterwards."""
        frame = b"%d %08x\n" % (len(record), zlib.crc32(record)) + record + b"\n"
        try:
            created = not os.path.exists(self.journal_path)
            fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                view = memoryview(frame)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if created:
                self._sync_directory()
        except OSError as exc:
            raise StateError(f"cannot append to {self.journal_path}: {exc.strerror or exc}") from None
        return size

    def read_journal(self) -> JournalRead:
        """Every whole record of the journal files (the one being compacted first)."""
        read = JournalRead()
        for path in (self.compacting_path, self.journal_path):
            try:
                with open(path, "rb") as handle:
                    data = handle.read()
            except FileNotFoundError:
                continue
            except OSError as exc:
                read.damage = f"cannot read {path}: {exc.strerror or exc}"
                break
            read.size += len(data)
            records, _, damage = parse_records(data)
            read.records += records
            if damage:
                read.damage = f"{path}: {damage}"
                break
        return read

    def compacting(self) -> bool:
        return os.path.exists(self.compacting_path)

    def start_compaction(self) -> None:
        """Set the journal aside (new records start a fresh one); :meth:`finish_compaction` folds it in."""
        try:
            os.replace(self.journal_path, self.compacting_path)
            self._sync_directory()
        except OSError as exc:
            raise StateError(f"cannot set {self.journal_path} aside: {exc.strerror or exc}") from None

    def finish_compaction(self, document: bytes) -> None:
        """Write ``document`` (the view the set-aside journal ends at) and delete that journal."""
        self._write_document(document)
        self._unlink(self.compacting_path)

    # -- files ----------------------------------------------------------------------------------

    def _write_document(self, data: bytes) -> None:
        try:
            os.makedirs(self.directory, mode=0o750, exist_ok=True)
            fd, temporary = tempfile.mkstemp(prefix=f".{LAST_GOOD_NAME}.", dir=self.directory)
        except OSError as exc:
            raise StateError(f"cannot write in {self.directory}: {exc.strerror or exc}") from None
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
            self._sync_directory()
        except OSError as exc:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise StateError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def _unlink(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StateError(f"cannot remove {path}: {exc.strerror or exc}") from None
        self._sync_directory()

    def _sync_directory(self) -> None:
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def parse_records(data: bytes) -> tuple[list[bytes], int, str]:
    """The whole records at the start of ``data``, the bytes they take, and why the rest is not one ('')."""
    records: list[bytes] = []
    offset = 0
    while offset < len(data):
        end = data.find(b"\n", offset, offset + MAX_HEADER)
        if end < 0:
            return records, offset, f"torn or corrupt record header at byte {offset}"
        try:
            length_text, crc_text = data[offset:end].split(b" ")
            length, crc = int(length_text), int(crc_text, 16)
        except ValueError:
            return records, offset, f"corrupt record header at byte {offset}"
        start, stop = end + 1, end + 1 + length
        if stop + 1 > len(data):
            return records, offset, f"torn record at byte {offset} ({len(data) - start} of {length + 1} bytes)"
        record = data[start:stop]
        if data[stop:stop + 1] != b"\n" or zlib.crc32(record) != crc:
            return records, offset, f"record at byte {offset} fails its checksum"
        records.append(record)
        offset = stop + 1
    return records, offset, ""


# -- reading the document and its journal back --------------------------------------------------


@dataclass(slots=True)
class Restored:
    """The last good view as kept: document bytes, or (with a journal) the view the records lead to."""

    data: bytes | PreparedView
    applied: int = 0
    """Journal records replayed onto the document."""
    damage: str = ""
    """Why part of the journal was not replayed (empty: all of it was)."""


def restore(state: StateFile) -> Restored | None:
    """The last good view in ``state``; None when there is none.  Raises StateError when unreadable."""
    document = state.read()
    if document is None:
        return None
    journal = state.read_journal()
    if not journal.records:
        return Restored(document, 0, journal.damage)
    keyspace = Keyspace(state.path)
    if not load_document(keyspace, document):
        return Restored(document, 0, "a journal next to a document that is not edge-view/1 JSON")
    applied, gap = replay(keyspace, journal.records)
    try:
        return Restored(keyspace.prepared(incremental=False), applied, "; ".join(filter(None, (journal.damage, gap))))
    except ViewInvalid:
        return Restored(document, 0, "the journal does not make a view")


def replay(keyspace: Keyspace, records: list[bytes]) -> tuple[int, str]:
    """Apply the records that follow on from the keyspace's serial; (records applied, why it stopped short)."""
    applied = 0
    for number, record in enumerate(records):
        changes = decode_changes(record)
        if changes is None or changes.serial is None or changes.too_old:
            return applied, f"journal record {number} is not a changes record"
        if keyspace.serial is not None and changes.serial <= keyspace.serial:
            continue  # the document already holds it (a compaction that stopped before deleting its journal)
        if changes.since != keyspace.serial:
            return applied, f"journal record {number} follows serial {changes.since}, not {keyspace.serial}"
        apply_changes(keyspace, changes)
        applied += 1
    return applied, ""


def changes_record(since: int, serial: int, changed: Iterable[bytes], removed: Iterable[str]) -> bytes:
    """One journal record: an ``edge-view-changes/1`` document with the changed instances' own texts."""
    return b"".join((b'{"format":"', CHANGES_FORMAT.encode(), b'","since":%d,"serial":%d,"changed":[' % (since, serial),
                     b",".join(changed), b'],"removed":', json.dumps(list(removed)).encode(), b"}"))


class StateFollower(ViewSource):
    """A worker's source: the document and journal its supervisor keeps, read as they grow.

    A document with no journal next to it is handed over as bytes when it changes, as
    the supervisor took it.  Once a journal appears (a source that says what changed),
    the document is kept part by part in a keyspace and each record read from where the
    last poll stopped is applied to it, so a worker too builds each change as a delta,
    from the change alone.
    """

    def __init__(self, state: StateFile, max_size: int) -> None:
        self.state = state
        self.description = state.path
        self._max_size = max_size
        self._stamp: tuple[int, int, int] | None = None
        self._keyspace: Keyspace | None = None
        self._read_to: dict[int, tuple[bytes, int]] = {}
        """Inode of a journal file -> (its first record header, bytes of it applied)."""
        self._delivered: int | None = None
        self._loaded = False
        """The keyspace holds the current document (read once a journal appears next to it)."""

    async def fetch(self) -> bytes | PreparedView | None:
        return await asyncio.to_thread(self._poll)

    def forget(self) -> None:
        self._stamp = None
        self._loaded = False
        self._delivered = None

    def _poll(self) -> bytes | PreparedView | None:
        try:
            st = os.stat(self.state.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SourceError(f"{self.state.path}: {exc.strerror or exc}") from None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        journaled = os.path.exists(self.state.compacting_path) or os.path.exists(self.state.journal_path)
        if stamp != self._stamp:
            if st.st_size > self._max_size:
                raise ViewTooLarge(f"{self.state.path}: {st.st_size} bytes exceeds view.max_size ({self._max_size})")
            self._stamp = stamp
            self._read_to = {}
            self._loaded = False
            if not journaled:
                # A whole document, as most sources give: handed over as the bytes the supervisor took.
                self._keyspace = None
                self._delivered = None
                return self._read_document()
        if self._keyspace is None and not journaled:
            return None
        if not self._loaded:
            # A journal grows next to this document: keep the view part by part to apply its records.
            document = self._read_document()
            if document is None:
                return None
            self._loaded = True
            loading = self._keyspace or Keyspace(self.state.path)
            if not load_document(loading, document):
                self._keyspace = None
                self._delivered = None
                return document
            self._keyspace = loading
        keyspace = self._keyspace
        if keyspace is None:
            return None  # a document in another format, unchanged
        for path in (self.state.compacting_path, self.state.journal_path):
            records = self._new_records(path)
            if records:
                _, gap = replay(keyspace, records)
                if gap:
                    # Records missed (or from another document): read everything again next poll.
                    self._stamp = None
                    self._loaded = False
                    return None
        try:
            view, _ = keyspace.view()
        except ViewInvalid as exc:
            raise SourceError(f"{self.state.path}: {'; '.join(exc.problems)}") from None
        if view.serial == self._delivered:
            return None
        incremental = self._delivered is not None
        self._delivered = view.serial
        return keyspace.prepared(incremental)

    def _read_document(self) -> bytes | None:
        try:
            return self.state.read()
        except StateError as exc:
            raise SourceError(str(exc)) from None

    def _new_records(self, path: str) -> list[bytes]:
        try:
            with open(path, "rb") as handle:
                inode = os.fstat(handle.fileno()).st_ino
                first = handle.readline(MAX_HEADER)
                known, offset = self._read_to.get(inode, (b"", 0))
                if known != first:
                    offset = 0  # a file not seen before (an inode number can be reused)
                handle.seek(offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise SourceError(f"{path}: {exc.strerror or exc}") from None
        # A record being appended right now is not whole yet: it is read next poll.
        records, used, _ = parse_records(data)
        self._read_to[inode] = (first, offset + used)
        return records
