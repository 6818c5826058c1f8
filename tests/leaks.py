"""Processes the tests forgot: the session adopts them, stops them at the end and names them.

Every test stops what it starts, by PID. A daemon whose starter exited without stopping it is
reparented; the test session makes itself the child subreaper (PR_SET_CHILD_SUBREAPER), so such a
process comes back to the session instead of to init. When the session ends, after every fixture
has been torn down, whatever is still a child of the session was left behind by a test: it is
stopped here, by PID, and listed in the summary so the leak can be found and fixed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time

PR_SET_CHILD_SUBREAPER = 36


def adopt_orphans() -> bool:
    """Make this process the subreaper of everything started under it (Linux 3.4 and later)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def running_children(parent: int) -> dict[int, str]:
    """PID -> command line of the live (not zombie) children of ``parent``."""
    children: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                after_name = stat.read().rsplit(")", 1)[1].split()
            if int(after_name[1]) != parent or after_name[0] == "Z":
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                children[int(entry)] = cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError, IndexError):
            continue
    return children


def stop_leftovers(parent: int, grace: float = 5.0) -> dict[int, str]:
    """Stop (TERM, then KILL after ``grace`` seconds) every live child of ``parent``; return them."""
    leftovers = running_children(parent)
    for pid in leftovers:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and running_children(parent):
        _reap()
        time.sleep(0.1)
    for pid in running_children(parent):
        _signal(pid, signal.SIGKILL)
    time.sleep(0.1)
    _reap()
    return leftovers


def _signal(pid: int, signum: signal.Signals) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
