"""DNS errors; each carries the RCODE it becomes (mapped to a reply only in :mod:`edge.dns.engine`)."""

from __future__ import annotations

from edge.errors import EdgeError

NOERROR = 0
FORMERR = 1
SERVFAIL = 2
NXDOMAIN = 3
NOTIMP = 4
REFUSED = 5
BADVERS = 16


EDE_STALE_ANSWER = 3
EDE_NOT_READY = 14
EDE_PROHIBITED = 18
EDE_NO_REACHABLE_AUTHORITY = 22


class DnsError(EdgeError):
    """A query that gets an error reply."""

    rcode = SERVFAIL
    ede: int | None = None
    """Extended DNS Error code (RFC 8914) sent to EDNS clients."""


class Unanswerable(DnsError):
    """Not even a header could be read, or the packet is itself a response: drop it."""


class FormErr(DnsError):
    """The query is malformed."""

    rcode = FORMERR


class NotImp(DnsError):
    """The opcode is not QUERY."""

    rcode = NOTIMP


class BadVers(DnsError):
    """The EDNS version is above 0."""

    rcode = BADVERS


class Refused(DnsError):
    """The client may not ask this (recursion for a client that is not allowed to recurse)."""

    rcode = REFUSED
    ede = EDE_PROHIBITED


class ServFail(DnsError):
    """No upstream answered and nothing usable is cached."""

    rcode = SERVFAIL
    ede = EDE_NO_REACHABLE_AUTHORITY
