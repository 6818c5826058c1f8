"""The answer to one metadata request: a pure function of (snapshot, peer, request, clock, keys).

``MetadataHandler.answer`` returns the response bytes, or a :class:`Pending`
when the answer needs the slow path (an unknown source waiting for a fresher
view, or credentials not yet cached); the service resolves those off the hot
path and calls back in.  Order of checks: method and token path, who is
asking, endpoint enabled, rate limit, token, then the rendered answer.  Where
all of them come down to the rate limit and the rendered answer for a peer (its
instance known, enabled, no token required, no fallback), :meth:`identify`
hands the peer the renderer's table of its answers, so the connection protocol
can answer a GET without a token by one lookup (after the rate limit, if on).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from edge.metadata import tokens
from edge.metadata.credentials import CredentialCache
from edge.metadata.fallback import MetadataFallback, NeedFallback
from edge.metadata.identify import Peer, attachment_for
from edge.metadata.render import Renderer
from edge.metadata.responses import ANSWERS, TOKEN_OPTIONS, Outcome, Response, response
from edge.metadata.tree import VERSION_SET, CredentialsLeaf, split_path
from edge.ratelimit import RateLimiter
from edge.view.model import Instance, MetadataOptions
from edge.view.snapshot import Attachment, Snapshot

TTL_HEADER = b"X-aws-ec2-metadata-token-ttl-seconds: "
_time = time.time


@dataclass(slots=True)
class Request:
    """What the protocol collected for one request (only the headers edge uses)."""

    method: bytes
    target: bytes
    keep_alive: bool = True
    """Set by the protocol from the client and config; the handler may clear it."""
    token: bytes | None = None
    token_ttl: bytes | None = None
    forwarded_for: bytes | None = None
    network_header: bytes | None = None
    hop_limit: int = 0
    """Set by the handler: send the answer with this IP TTL / hop limit, then close."""
    waited: bool = False
    """The service already waited for a fresher view for this request."""
    started: float = 0.0
    """Monotonic time the request was complete (for the latency histogram)."""
    skip_fallback: bool = False
    """The metadata fallback (a cloud's controller) had no answer for this request: the view answers."""


@dataclass(frozen=True, slots=True)
class UnknownSource:
    network: str
    address: str


@dataclass(frozen=True, slots=True)
class NeedCredentials:
    instance: Instance
    address: str
    role: str
    ttl_line: bytes | None


Pending = UnknownSource | NeedCredentials | NeedFallback


class MetadataHandler:
    def __init__(self, renderer: Renderer, keys: tokens.TokenKeys, limiter: RateLimiter,
                 credentials: CredentialCache) -> None:
        self.renderer = renderer
        self.keys = keys
        self.limiter = limiter
        self.credentials = credentials
        self._ttl_lines: dict[int, bytes] = {}
        self._verified: dict[bytes, tuple[str, int]] = {}
        """token -> (instance id, expiry) of tokens that verified: skips the MAC on repeat reads."""
        self.max_verified = 100_000
        self.fallback: MetadataFallback | None = None
        """A cloud's own metadata service (set by the composition root), asked before the view."""
        self._seen_options: tuple[MetadataOptions | None, bool, bool] = (None, True, False)
        """The options last asked about, with (endpoint enabled, tokens required): instances share
        options objects (most have the default one), and reading the two properties costs more."""
        self.tokens_issued = 0
        self.tokens_verified = 0
        self.tokens_rejected = 0
        self.throttled = 0

    def set_keys(self, keys: tokens.TokenKeys) -> None:
        self.keys = keys
        self._verified = {}

    def answer(self, snapshot: Snapshot | None, peer: Peer, request: Request, now: float | None,
               mono: float) -> bytes | Pending:
        """The answer to ``request``; ``now`` is the wall clock, or None to read it only if the answer
        depends on it (tokens, credentials, the controller's cache): most answers do not.  ``mono``
        is the monotonic clock, for the rate limit."""
        method = request.method
        target = request.target
        # Whether the target names the token path, decided once for every method (see token_path_version).
        token_version = _token_paths.get(target)
        if token_version is None:
            token_version = _remember_token_path(target)
        if method == b"GET":
            head_only = False
        elif method == b"HEAD":
            head_only = True
        elif not token_version:
            return self.refuse(Outcome.METHOD, request)
        elif method == b"PUT":
            return self._put(snapshot, peer, request, token_version, _time() if now is None else now, mono)
        elif method == b"OPTIONS":
            return TOKEN_OPTIONS.wire(request.keep_alive, False)
        else:
            return self.refuse(Outcome.TOKEN_METHOD, request)
        if token_version:
            return self.refuse(Outcome.TOKEN_METHOD, request)

        if snapshot is None:
            return self._unknown(peer.network, peer.address, request)
        if not peer.trusted:
            if peer.generation != snapshot.generation:
                self.identify(snapshot, peer)
            attachment = peer.attachment
            if attachment is None:
                return self._unknown(peer.network, peer.address, request)
        else:
            network, address, attachment = attachment_for(snapshot, peer, request.forwarded_for,
                                                          request.network_header)
            if attachment is None:
                return self._unknown(network, address, request)
        instance = attachment.instance
        options = instance.metadata_options
        seen, enabled, tokens_required = self._seen_options
        if seen is not options:
            seen, enabled, tokens_required = self._seen_options = (options, options.endpoint_enabled,
                                                                   options.tokens_required)
        if not enabled:
            return self.refuse(Outcome.FORBIDDEN, request)
        limiter = self.limiter
        if limiter.rate > 0 and not limiter.allow(instance.id, mono):
            return self.throttle(request.keep_alive, request.method == b"HEAD")
        ttl_line = None
        token = request.token
        if token is not None:
            if now is None:
                now = _time()
            remaining = self._verify(token, instance.id, now)
            if remaining <= 0:
                self.tokens_rejected += 1
                return self.refuse(Outcome.UNAUTHORIZED, request)
            self.tokens_verified += 1
            ttl_line = self._ttl_line(remaining)
        elif tokens_required:
            return self.refuse(Outcome.UNAUTHORIZED, request)

        fallback = self.fallback
        if fallback is not None and not request.skip_fallback:
            path = fallback.path_of(target)
            if path is not None:
                if now is None:
                    now = _time()
                cached = fallback.cached(snapshot, instance, path, now)
                if cached is None:
                    return NeedFallback(instance, attachment.interface.primary_ip, path, ttl_line)
                if cached.status == 200:
                    return self._wire(cached, ttl_line, request.keep_alive, head_only)
                # The fallback has nothing there: the view may (paths edge adds: tokens, tags, events).

        found = self.renderer.lookup(snapshot, instance, target)
        if found is None:
            return self.refuse(Outcome.NOT_FOUND, request)
        if isinstance(found, CredentialsLeaf):
            if now is None:
                now = _time()
            credentials = self.credentials.lookup(instance, attachment.interface.primary_ip, found.role, now)
            if credentials is None:
                return NeedCredentials(instance, attachment.interface.primary_ip, found.role, ttl_line)
            found = credentials
        if ttl_line is None:
            if head_only:
                return found.head_keep_alive if request.keep_alive else found.head_close
            return found.keep_alive if request.keep_alive else found.close
        return found.wire_with(ttl_line, request.keep_alive, head_only)

    def identify(self, snapshot: Snapshot, peer: Peer) -> None:
        """Look up, once per snapshot, what ``peer`` (asking as itself: not a proxy) is attached to, and
        the answers a plain GET from it gets (:attr:`Peer.answers`); remembered on the peer."""
        peer.attachment = attachment = attachment_for(snapshot, peer, None, None)[2]
        peer.answers = peer.limited = None
        if attachment is not None:
            peer.answers = self._plain_answers(snapshot, attachment)
            if peer.answers is not None and self.limiter.rate > 0:
                peer.limited = attachment.instance.id
        peer.generation = snapshot.generation

    def _plain_answers(self, snapshot: Snapshot, attachment: Attachment) -> dict[bytes, Response] | None:
        """The renderer's table of the instance's answers when :meth:`answer` gives a GET without a token
        the rendered response for its target once the rate limit (if on) lets it through, and checks
        nothing else (so the protocol may look it up itself); None when more is checked per request:
        the endpoint disabled or tokens required (by the instance's options), or a metadata fallback
        asked first."""
        if self.fallback is not None:
            return None
        options = attachment.instance.metadata_options
        if not options.endpoint_enabled or options.tokens_required:
            return None
        return self.renderer.answers_of(snapshot, attachment.instance)

    def _put(self, snapshot: Snapshot | None, peer: Peer, request: Request, version: str, now: float,
             mono: float) -> bytes | Pending:
        if version != "latest":
            return self.refuse(Outcome.FORBIDDEN, request)
        if request.forwarded_for is not None and not peer.trusted:
            return self.refuse(Outcome.FORBIDDEN, request)
        ttl = tokens.parse_ttl(request.token_ttl)
        if ttl is None:
            return self.refuse(Outcome.BAD_REQUEST, request)
        if snapshot is None:
            return self._unknown(peer.network, peer.address, request)
        network, address, attachment = attachment_for(snapshot, peer, request.forwarded_for, request.network_header)
        if attachment is None:
            return self._unknown(network, address, request)
        instance = attachment.instance
        if not instance.metadata_options.endpoint_enabled:
            return self.refuse(Outcome.FORBIDDEN, request)
        if not self.limiter.allow(instance.id, mono):
            return self.throttle(request.keep_alive, False)
        token = tokens.issue(self.keys, instance.id, ttl, now)
        self.tokens_issued += 1
        request.keep_alive = False
        request.hop_limit = instance.metadata_options.hop_limit
        return response(200, token, headers=(self._ttl_line(ttl),)).close

    def _unknown(self, network: str, address: str, request: Request) -> bytes | Pending:
        if request.waited or not address:
            return self.refuse(Outcome.NOT_FOUND, request)
        return UnknownSource(network, address)

    def throttle(self, keep_alive: bool, head_only: bool) -> bytes:
        """The answer to a request over its instance's rate limit (counted)."""
        self.throttled += 1
        return ANSWERS[Outcome.THROTTLED].wire(keep_alive, head_only)

    def refuse(self, outcome: Outcome, request: Request) -> bytes:
        return ANSWERS[outcome].wire(request.keep_alive, request.method == b"HEAD")

    @staticmethod
    def _wire(found: Response, ttl_line: bytes | None, keep_alive: bool, head_only: bool) -> bytes:
        if ttl_line is None:
            return found.wire(keep_alive, head_only)
        return found.wire_with(ttl_line, keep_alive, head_only)

    def finish_fallback(self, pending: NeedFallback, found: Response | None, request: Request) -> bytes | None:
        """The fallback's answer, or None when the view should answer instead."""
        if found is None or found.status != 200:
            request.skip_fallback = True
            return None
        return self._wire(found, pending.ttl_line, request.keep_alive, request.method == b"HEAD")

    def finish_credentials(self, pending: NeedCredentials, found: Response | None, request: Request) -> bytes:
        if found is None:
            return self.refuse(Outcome.UNAVAILABLE, request)
        head_only = request.method == b"HEAD"
        if pending.ttl_line is None:
            return found.wire(request.keep_alive, head_only)
        return found.wire_with(pending.ttl_line, request.keep_alive, head_only)

    def _verify(self, token: bytes, instance_id: str, now: float) -> int:
        known = self._verified.get(token)
        if known is not None:
            return known[1] - int(now) if known[0] == instance_id else 0
        remaining = tokens.verify(self.keys, token, instance_id, now)
        if remaining:
            if len(self._verified) >= self.max_verified:
                self._verified = {}
            self._verified[token] = (instance_id, int(now) + remaining)
        return remaining

    def _ttl_line(self, seconds: int) -> bytes:
        line = self._ttl_lines.get(seconds)
        if line is None:
            if len(self._ttl_lines) > tokens.TTL_MAX:
                self._ttl_lines.clear()
            line = self._ttl_lines[seconds] = TTL_HEADER + str(seconds).encode() + b"\r\n"
        return line


_token_paths: dict[bytes, str] = {}
"""Request target -> :func:`token_path_version` of it: a dict lookup per request instead of
splitting the path."""
TOKEN_PATHS_REMEMBERED = 4096
REMEMBERED_TARGET_BYTES = 256
"""Longer targets are not remembered (the memo pins at most about 1 MB)."""


def _remember_token_path(target: bytes) -> str:
    version = token_path_version(target)
    if len(target) <= REMEMBERED_TARGET_BYTES:
        if len(_token_paths) >= TOKEN_PATHS_REMEMBERED:
            _token_paths.clear()
        _token_paths[target] = version
    return version


def token_path_version(target: bytes) -> str:
    """The version (``latest`` or a date) when ``target`` names the token path once normalised
    the one way every path is (:func:`split_path`: percent-decoding, repeated slashes, absolute
    form), else ``""``.  Every method asks this, so no spelling is the token path for one method
    and another path for the next."""
    # A target with neither "token" nor a percent escape cannot normalise to the token path:
    # skip splitting it.  (find, not ``in``: bytes.__contains__ first tries the operand as an
    # integer and formats, then discards, a TypeError.)
    if target.find(b"token") < 0 and target.find(b"%") < 0:
        return ""
    parts = split_path(target)
    if parts is None or len(parts) != 3 or parts[1] != "api" or parts[2] != "token" or parts[0] not in VERSION_SET:
        return ""
    return parts[0]
