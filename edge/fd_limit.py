"""File descriptors: raise the soft limit to the hard one at start, and say when even that is too few.

Every connection is a descriptor.  Below the connection caps of the
configuration, a process out of descriptors cannot accept: the kernel's queue
fills, clients are reset or time out, and nothing says why.  So each process
raises its soft ``RLIMIT_NOFILE`` to the hard limit (no privilege needed), and
the first process of a gateway warns, with the numbers, when the hard limit is
still below what the caps allow (raise it with ``LimitNOFILE=`` in systemd or
``ulimit -Hn``).
"""

from __future__ import annotations

import logging
import resource
from typing import TypedDict

from edge.config import Config
from edge.logs import event

log = logging.getLogger("edge.server")

SLACK = 256
"""Descriptors besides client connections: listeners, upstream DNS and control-plane sockets,
state and key files, the credential helper, the worker control sockets."""


class DescriptorNeeds(TypedDict):
    """Descriptors one process may hold open at once, by cause, and their total (``needed``)."""

    metadata: int
    dns_tcp: int
    admin: int
    slack: int
    needed: int


def descriptors_needed(config: Config) -> DescriptorNeeds:
    """What the configuration may hold open at once in one process, by cause (and the total)."""
    metadata = config.metadata.max_connections if config.metadata.listen else 0
    dns_tcp = config.dns.tcp_max_connections if config.dns.listen else 0
    admin = config.admin.max_connections if config.admin.listen is not None else 0
    return {"metadata": metadata, "dns_tcp": dns_tcp, "admin": admin, "slack": SLACK,
            "needed": metadata + dns_tcp + admin + SLACK}


def raise_fd_limit(config: Config, warn: bool = True) -> tuple[int, int]:
    """Raise the soft descriptor limit to the hard one; warn when the hard one is below the need.

    Returns the (soft, hard) limits now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            event(log, logging.INFO, "file descriptor limit raised", soft=hard, was=soft)
            soft = hard
        except (OSError, ValueError) as exc:
            event(log, logging.WARNING, "cannot raise the file descriptor limit", soft=soft, hard=hard, error=str(exc))
    needs = descriptors_needed(config)
    if warn and soft != resource.RLIM_INFINITY and soft < needs["needed"]:
        event(log, logging.WARNING, "file descriptor limit below what the configuration needs; "
              "connections beyond it will be refused or reset", soft=soft, hard=hard, **needs)
    return soft, hard
