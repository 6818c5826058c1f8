"""The last good view on disk: what a gateway serves when it restarts without its control plane.

Every accepted document is written as-is (temporary file, fsync, rename, fsync
of the directory), so a crash mid-write leaves the previous good copy intact.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

from edge.errors import StateError

LAST_GOOD_NAME = "last-good-view"


class StateFile:
    """One last-good file per source, so pointing a gateway at another source starts clean.

    (A view from the old source could otherwise carry a higher serial and block
    every view of the new one.)
    """

    def __init__(self, state_dir: str, source: str) -> None:
        self.directory = state_dir
        tag = hashlib.sha256(source.encode()).hexdigest()[:12]
        self.path = os.path.join(state_dir, f"{LAST_GOOD_NAME}.{tag}")

    def read(self) -> bytes | None:
        """The last good document, or None if there is none yet."""
        try:
            with open(self.path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read {self.path}: {exc.strerror or exc}") from None

    def write(self, data: bytes) -> None:
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
            directory = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as exc:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise StateError(f"cannot write {self.path}: {exc.strerror or exc}") from None
