"""One typed, frozen configuration, loaded once: TOML file, then ``EDGE_*`` environment, then CLI.

Every section is a frozen dataclass; the loader walks their fields, so a key
exists in the file, the environment and the documentation exactly when a field
exists here.  Unknown keys are errors naming the key.  Nothing else in edge
reads the environment or configuration files.

Environment names are ``EDGE_`` + the dotted key upper-cased with ``.`` -> ``_``:
``view.poll_interval`` is ``EDGE_VIEW_POLL_INTERVAL``, ``workers`` is
``EDGE_WORKERS``.  Lists in the environment are comma separated.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edge.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Listen:
    """``ADDR:PORT`` with an optional ``@NETWORK``: which view network the listener serves."""

    host: str
    port: int
    network: str = ""

    @classmethod
    def parse(cls, text: str) -> Listen:
        spec, _, network = text.partition("@")
        if spec.startswith("["):
            host, sep, rest = spec[1:].partition("]")
            port_text = rest[1:] if sep and rest.startswith(":") else ""
        else:
            host, _, port_text = spec.rpartition(":")
        if not host or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
            raise ConfigError(f"listen address must be ADDR:PORT[@NETWORK] (IPv6 as [ADDR]:PORT), got {text!r}")
        return cls(host=host, port=int(port_text), network=network)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}" + (f"@{self.network}" if self.network else "")


class Secret(str):
    """A string setting that is never shown: ``repr`` (``edge config show``, tracebacks) redacts it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'<redacted>'" if self else "''"


def _default_state_dir() -> str:
    # systemd's StateDirectory= exports STATE_DIRECTORY; otherwise a per-user directory.
    return os.environ.get("STATE_DIRECTORY") or str(Path.home() / ".local" / "state" / "edge")


@dataclass(frozen=True, slots=True)
class ViewConfig:
    source: str = "demo"
    """File path, ``http(s)://`` URL, ``etcd://HOST:PORT[,HOST:PORT...]/KEY`` or ``.../PREFIX/`` for a watched keyspace (``etcds://`` for TLS), or ``demo`` (the embedded demo view)."""
    state_dir: str = field(default_factory=_default_state_dir)
    """Where the last good view is kept (written atomically on every accepted view)."""
    poll_interval: float = 5.0
    """Seconds between polls of the source."""
    poll_jitter: float = 0.2
    """Random extra delay, as a fraction of the interval, so gateways do not poll in lockstep."""
    backoff_max: float = 60.0
    """Cap of the exponential backoff while the source fails (seconds)."""
    refresh_min_interval: float = 0.5
    """Minimum seconds between polls triggered by "refresh now" requests."""
    connect_timeout: float = 3.0
    """HTTP and etcd sources: seconds to connect (to each etcd endpoint tried)."""
    read_timeout: float = 10.0
    """HTTP and etcd sources: seconds allowed for the whole response."""
    max_size: int = 256 * 1024 * 1024
    """Largest view document accepted, in bytes."""
    ca_file: str = ""
    """HTTPS and ``etcds://`` sources (and ``fleet.token_key_source``): CA bundle to verify the server with (system CAs when empty)."""
    cert_file: str = ""
    """``etcds://`` sources (and ``fleet.token_key_source``): client certificate (PEM) presented to etcd, as ``--client-cert-auth`` requires."""
    key_file: str = ""
    """Private key (PEM) of ``cert_file``; empty when ``cert_file`` holds both."""
    etcd_username: str = ""
    """etcd sources (and ``fleet.token_key_source``): user to authenticate as, when the cluster has authentication enabled."""
    etcd_password_file: str = ""
    """File whose first line is the password of ``etcd_username`` (read at every login, so it can be rotated without a restart)."""
    etcd_password: Secret = Secret("")
    """The password itself, when not in a file: set it in the environment (``EDGE_VIEW_ETCD_PASSWORD``) rather than the configuration file. Never logged or shown."""
    format: str = "auto"
    """View document format: ``auto`` (by content), ``edge-view`` or ``eucalyptus-gni``."""
    swap_by_restart_instances: int = 20000
    """With several workers and ``shared_view`` false, a view with at least this many instances that needs a full
    build (not a delta of the served one) is swapped in by starting new workers on it and retiring the old ones, so
    no serving process stalls while it is built (0: always in place)."""
    shared_view: bool = True
    """With several workers, the supervisor writes the served view into ``served-view/`` in the state directory and
    every worker answers from that one memory-mapped copy; false: each worker builds and holds a copy of its own."""
    shared_view_memo: int = 2048
    """With ``shared_view``: decoded entries each worker keeps per index (instances, addresses, names), so repeat
    askers skip the decode (about 10 us); when full it starts over.  About 3.5 KB per instance kept."""
    max_view_age: float = 0.0
    """Readiness fails when the source has not confirmed the view for this many seconds (0: never)."""
    journal_compact_ratio: float = 0.25
    """The last-good journal (changes appended per accepted serial) is folded into a new document once it is this
    fraction of the document's size, and at a clean stop."""


@dataclass(frozen=True, slots=True)
class CredentialsConfig:
    kind: str = "none"
    """Where IAM role credentials come from: ``none``, ``process`` or ``http``."""
    command: tuple[str, ...] = ()
    """``process``: argv printing ``credential_process`` JSON; ``{instance_id}``, ``{account_id}``, ``{role}``, ``{address}`` in it are substituted."""
    url: str = ""
    """``http``: IMDS-compatible base URL; edge asks ``URL`` + role with ``X-Forwarded-For`` set to the instance address (e.g. ``http://ctl:8773/latest/meta-data/iam/security-credentials/``)."""
    timeout: float = 3.0
    """Seconds one call to the credential source may take (a request waits at most this long)."""
    refresh_ahead: float = 1800.0
    """Credentials with less than this many seconds left are not handed out while the source may give fresher ones: the request waits (up to ``timeout``) for a refresh. Keep it above 1500: botocore takes less than 15 min plus up to 10 min of jitter for an outage of the metadata service."""
    refresh_fraction: float = 0.5
    """Once this fraction of the credentials' lifetime has passed, a request starts a background refresh (and is answered from the cache)."""
    retry_interval: float = 10.0
    """After a failed fetch, seconds before the source is asked again for that (instance, role); requests meanwhile get the cached credentials or 503."""
    cache_size: int = 100_000
    """Most (instance, role) credentials kept in memory."""
    max_output: int = 65_536
    """``process``: bytes the command may print (at most 16 MiB); a command printing more is stopped and that call fails."""


@dataclass(frozen=True, slots=True)
class MetadataConfig:
    listen: tuple[Listen, ...] = (Listen("127.0.0.1", 8169),)
    """Metadata listeners, ``ADDR:PORT[@NETWORK]``."""
    token_key_file: str = ""
    """IMDSv2 token keys (first signs, all verify); empty: ``STATE_DIR/token-keys`` is created once and reused."""
    identity_key_file: str = ""
    """PEM RSA private key signing the instance identity document; empty: generated once in the state directory."""
    identity_cert_file: str = ""
    """PEM certificate of ``identity_key_file`` (what clients verify against)."""
    trusted_proxies: tuple[str, ...] = ()
    """CIDRs whose ``X-Forwarded-For`` and ``X-Edge-Network-Id``/``X-Neutron-Network-ID`` name the instance."""
    unknown_source_wait: float = 2.0
    """Seconds a request from an unknown address waits for a refreshed view before 404."""
    rate: float = 100.0
    """Requests per second allowed per instance (token bucket refill); 0 disables the limit."""
    burst: int = 200
    """Token bucket size per instance."""
    rate_limit_entries: int = 100_000
    """Instances whose bucket state is kept: a table of 24 bytes each; with workers it is made at start (a change needs a restart)."""
    max_connections: int = 10_000
    """Concurrent connections per worker; further connections are closed at once."""
    max_connections_per_source: int = 64
    """Concurrent connections per source address."""
    listen_backlog: int = 2048
    """Accept queue of each metadata listener (capped by ``net.core.somaxconn``)."""
    header_timeout: float = 5.0
    """Seconds a client has to send a complete request head (also the keep-alive idle time)."""
    keep_alive: bool = True
    """Keep HTTP/1.1 connections open between requests when the client allows it."""
    max_url_bytes: int = 8192
    """Longest request target; longer is 414."""
    max_header_bytes: int = 16384
    """Largest request header block; larger is 431."""
    render_cache_size: int = 100_000
    """Most pre-rendered (instance, request target) answers kept per snapshot (identical answers are shared)."""
    gateway_hops: int = 0
    """Routed hops between the instances and this gateway (routers in between): a token answer leaves with IP TTL
    ``hop_limit + gateway_hops``, so an instance's ``hop_limit`` keeps its AWS meaning (1 = the instance itself)."""
    gateway_hops_by_network: tuple[str, ...] = ()
    """``NETWORK=HOPS`` entries: ``gateway_hops`` for the listeners of one view network (``=HOPS``: the flat network),
    e.g. ``vpc-0a1b2c3d=0`` for a listener on that network's own segment."""
    credentials: CredentialsConfig = field(default_factory=CredentialsConfig)
    """IAM credential source (``[metadata.credentials]``)."""


@dataclass(frozen=True, slots=True)
class DnsConfig:
    listen: tuple[Listen, ...] = (Listen("127.0.0.1", 8053),)
    """DNS listeners (UDP and TCP), ``ADDR:PORT[@NETWORK]``."""
    upstreams: tuple[str, ...] = ()
    """Upstream resolvers (``ip``, ``ip:port``, ``[v6]:port``); when set, replaces the view's ``upstream_resolvers``."""
    recursion_cidrs: tuple[str, ...] = ()
    """Clients besides the view's instances that may use recursion (CIDRs)."""
    upstream_timeout: float = 1.5
    """Seconds to wait for one upstream before trying the next."""
    cache_size: int = 65536
    """Forwarded answers kept in the cache (entries)."""
    cache_min_ttl: int = 0
    """Lower clamp on the TTL of cached forwarded answers (seconds)."""
    cache_max_ttl: int = 86400
    """Upper clamp on the TTL of cached forwarded answers (seconds)."""
    negative_max_ttl: int = 3600
    """Upper clamp on how long NXDOMAIN/NODATA from upstream are cached (seconds)."""
    serve_stale: float = 86400.0
    """Seconds past expiry a cached answer may still be served when every upstream fails (RFC 8767); 0 disables."""
    stale_ttl: int = 30
    """TTL given to answers served stale."""
    edns_payload: int = 1232
    """Largest UDP response edge sends to EDNS clients (bytes)."""
    rate_limit: float = 1024.0
    """Packets per second allowed per client source address; 0 disables."""
    rate_limit_clients: int = 65536
    """Client addresses tracked by the rate limiter: a table of 24 bytes each; with workers it is made at start (a change needs a restart)."""
    tcp_idle_timeout: float = 10.0
    """Seconds a DNS TCP connection may stay idle before it is closed."""
    tcp_max_connections: int = 1024
    """Concurrent DNS TCP connections per worker; more are closed on accept."""
    tcp_max_connections_per_source: int = 64
    """Concurrent DNS TCP connections per client source address (per worker); more are closed on accept."""
    tcp_message_timeout: float = 5.0
    """Seconds a TCP client has to send the rest of a DNS message once its first byte arrived; more data does not extend it (RFC 7766 6.2.2)."""
    listen_backlog: int = 2048
    """Accept queue of each DNS TCP listener (capped by ``net.core.somaxconn``)."""
    tcp_max_pipelined: int = 64
    """Forwarded queries one TCP connection may have outstanding at once."""
    nameserver: str = ""
    """Name in the NS and SOA records of the local zones; ``ns.<internal_domain>`` when empty."""
    instance_data_address: str = "169.254.169.254"
    """Address answered for ``instance-data`` and ``instance-data.<internal_domain>`` (Eucalyptus); empty disables."""
    answer_memo_size: int = 200_000
    """Rendered local answers (and not-local markers) kept per view, over all networks; it starts over when full."""
    udp_receive_buffer: int = 4 * 1024 * 1024
    """Receive buffer of each DNS UDP socket in bytes, so bursts queue instead of dropping; 0 keeps the system default."""


@dataclass(frozen=True, slots=True)
class FleetConfig:
    token_key_source: str = ""
    """``etcd://HOST:PORT[,HOST:PORT...]/KEY`` holding the IMDSv2 token keys (key file format) for every gateway; replaces ``metadata.token_key_file``."""
    token_key_refresh: float = 10.0
    """Seconds between re-reads of the token keys from etcd: a rotation reaches every gateway within this."""


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: Listen | None = Listen("127.0.0.1", 9169)
    """Operations listener (health, readiness, metrics); empty string disables it."""
    metrics: bool = True
    """Count requests for ``/metrics``; off, the hot paths skip even their plain counters."""
    shutdown_delay: float = 2.0
    """On SIGTERM, seconds readiness answers 503 before the listeners close (time to withdraw routes: edge-route-health
    at its defaults withdraws within one check interval, 1 s, of the first 503)."""
    shutdown_grace: float = 5.0
    """Then, seconds in-flight requests get to finish before connections are closed."""
    max_connections: int = 64
    """Concurrent admin connections (also per source address); more get 429 and are closed. Target and header sizes and the head timeout are ``[metadata]``'s."""


@dataclass(frozen=True, slots=True)
class EucalyptusConfig:
    version: str = "auto"
    """Eucalyptus generation whose names edge gives: ``5`` (ip-/ec2-A-B-C-D.compute...), ``4`` (euca-A-B-C-D.eucalyptus...), or ``auto``: 4 when the GNI's instanceDNSDomain is eucalyptus.internal, else 5."""
    use_instance_dns: bool = False
    """The cloud's ``bootstrap.webservices.use_instance_dns``: hostnames in metadata are DNS names, not addresses."""
    instance_subdomain: str = ""
    """The cloud's ``cloud.vmstate.instance_subdomain``; empty: the GNI's instanceDNSDomain without ``.internal``."""
    private_prefix: str = "ip-"
    """The cloud's ``cloud.vmstate.instance_private_prefix`` (5.x; 4.x names always start ``euca-``)."""
    public_prefix: str = "ec2-"
    """The cloud's ``cloud.vmstate.instance_public_prefix`` (5.x; 4.x names always start ``euca-``)."""
    dns_domain: str = "localhost"
    """The cloud's ``system.dns.dnsdomain``; public names live under it."""
    region: str = "eucalyptus"
    """Region reported to instances for a GNI view."""
    intip_map_file: str = ""
    mido_md_cidr: str = "255.0.0.0/8"
    """eucanetd's ``MIDO_MD_CIDR`` (``eucalyptus.conf``): the range of the intip map's metadata addresses."""
    eucalyptus_conf: str = ""
    """eucanetd's ``eucalyptus.conf``: its ``MIDO_MD_CIDR``, when set there, replaces ``mido_md_cidr``."""
    """eucanetd's ``eucanetd_intip_eni_map`` (VPC mode): 255.x.y.z metadata addresses -> interfaces."""
    controller_url: str = ""
    """The controller's metadata service (e.g. ``http://CLC:8773/``): answers what the GNI lacks."""
    controller_identity: str = "instance-id"
    """How the controller learns the instance: ``instance-id`` (Euca-Instance-Id from 127.0.0.1, VPCMIDO) or ``source-address`` (connect from the instance's own address, EDGE)."""
    controller_ttl: float = 60.0
    """Seconds a controller answer is fresh."""
    controller_stale_if_error: float = 86400.0
    """Seconds a controller answer may still be served while the controller is unreachable."""
    controller_timeout: float = 2.0
    """Seconds to wait for the controller before serving stale or failing."""
    controller_cache_entries: int = 250000
    """Most (instance, path) answers kept: prefetching keeps about 25 per instance (10,000 instances by default)."""
    prefetch: bool = True
    """Fetch every controller-only path of an instance as soon as it appears in the GNI (survives a controller outage)."""
    prefetch_concurrency: int = 4
    """Controller requests prefetching may have in flight at once."""


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    """``debug``, ``info``, ``warning`` or ``error``."""
    format: str = "kv"
    """``kv`` (key=value) or ``json``."""


@dataclass(frozen=True, slots=True)
class Config:
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    """Worker processes sharing the listeners (default: the number of cores; 1 runs everything in one process)."""
    view: ViewConfig = field(default_factory=ViewConfig)
    metadata: MetadataConfig = field(default_factory=MetadataConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    eucalyptus: EucalyptusConfig = field(default_factory=EucalyptusConfig)
    log: LogConfig = field(default_factory=LogConfig)


# -- loading -----------------------------------------------------------------------------------

def load_config(path: str | None = None, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """File, then environment (``EDGE_*``), then ``overrides`` (dotted key -> value, from the CLI)."""
    values: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as handle:
                document = tomllib.load(handle)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        _merge_file(values, document, Config, "")
    for key, text in _env_items(env if env is not None else os.environ):
        _set_dotted(values, key, text, source=f"environment variable EDGE_{key.upper().replace('.', '_')}")
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(values, key, value, source=f"option for {key}")
    return _build(Config, values, "")


def key_table() -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every configuration key: the README table."""
    rows: list[tuple[str, str, str, str]] = []
    _walk_docs(Config, "", rows)
    return rows


def config_toml(config: Config) -> str:
    """``config`` as a TOML document that loads back to the same settings (``edge config show``).

    A secret that is set is shown as a comment, never its value; a key without a value
    (TOML has no null) is a comment too.
    """
    lines: list[str] = []
    _toml_table(config, "", lines)
    return "\n".join(lines).strip("\n") + "\n"


def _toml_table(section: Any, prefix: str, lines: list[str]) -> None:
    hints = _hints(type(section))
    subsections = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if _is_section(hints[f.name]):
            subsections.append((f.name, value))
        elif _hides_its_value(value) and value:
            lines.append(f"# {f.name} is set (secret, not shown)")
        elif value is None:
            lines.append(f"# {f.name} is not set")
        else:
            lines.append(f"{f.name} = {_toml_value(value)}")
    for name, value in subsections:
        lines.extend(["", f"[{prefix}{name}]"])
        _toml_table(value, f"{prefix}{name}.", lines)


def _hides_its_value(value: Any) -> bool:
    """A secret setting: a string type whose ``repr`` does not show it."""
    return isinstance(value, str) and type(value).__repr__ is not str.__repr__


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # inf and nan are spelt as in TOML
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    # A JSON string is a TOML basic string (the same escapes, \uXXXX for control characters).
    return json.dumps(str(value), ensure_ascii=False)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(hint: Any) -> bool:
    return dataclasses.is_dataclass(hint) and hint is not Listen


def _merge_file(values: dict[str, Any], document: Mapping[str, Any], cls: type, prefix: str) -> None:
    hints = _hints(cls)
    for key, value in document.items():
        dotted = prefix + key
        if key not in hints:
            raise ConfigError(f"unknown configuration key {dotted!r}")
        if _is_section(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"configuration key {dotted!r} must be a table")
            _merge_file(values.setdefault(key, {}), value, hints[key], dotted + ".")
        else:
            values[key] = (value, f"config key {dotted}")


def _env_items(env: Mapping[str, str]) -> list[tuple[str, str]]:
    """Map ``EDGE_VIEW_POLL_INTERVAL`` to ``view.poll_interval`` by walking the sections."""
    known: dict[str, str] = {}

    def collect(cls: type, prefix: str) -> None:
        for name, hint in _hints(cls).items():
            if _is_section(hint):
                collect(hint, prefix + name + ".")
            else:
                known["EDGE_" + (prefix + name).upper().replace(".", "_")] = prefix + name

    collect(Config, "")
    items = []
    for name, text in env.items():
        if not name.startswith("EDGE_") or name.startswith("EDGE_INTERNAL_"):
            continue
        if name not in known:
            raise ConfigError(f"unknown configuration key in environment variable {name}")
        items.append((known[name], text))
    return items


def _set_dotted(values: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    cls: type = Config
    target = values
    parts = dotted.split(".")
    for part in parts[:-1]:
        hint = _hints(cls).get(part)
        if hint is None or not _is_section(hint):
            raise ConfigError(f"unknown configuration key {dotted!r}")
        target = target.setdefault(part, {})
        cls = hint
    if parts[-1] not in _hints(cls):
        raise ConfigError(f"unknown configuration key {dotted!r}")
    target[parts[-1]] = (value, source)


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        hint = hints[f.name]
        if _is_section(hint):
            kwargs[f.name] = _build(hint, values[f.name], prefix + f.name + ".")
        else:
            raw, source = values[f.name]
            kwargs[f.name] = _coerce(hint, raw, f"{source} ({prefix + f.name})")
    config = cls(**kwargs)
    _check(config, prefix)
    return config


def _coerce(hint: Any, raw: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    try:
        if origin is tuple:
            item = args[0]
            if isinstance(raw, str):
                raw = [part.strip() for part in raw.split(",") if part.strip()]
            if not isinstance(raw, (list, tuple)):
                raise ValueError("expected a list")
            return tuple(_coerce(item, element, where) for element in raw)
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            inner = next(a for a in args if a is not type(None))
            if raw in ("", None):
                return None
            return _coerce(inner, raw, where)
        if hint is Listen:
            if isinstance(raw, Listen):
                return raw
            if not isinstance(raw, str):
                raise ValueError("expected 'ADDR:PORT[@NETWORK]'")
            return Listen.parse(raw)
        if hint is bool:
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return raw.lower() in ("1", "true", "yes", "on")
            raise ValueError("expected a boolean")
        if hint is int:
            if isinstance(raw, bool) or isinstance(raw, float):
                raise ValueError("expected an integer")
            return int(raw)
        if hint is float:
            if isinstance(raw, bool):
                raise ValueError("expected a number")
            return float(raw)
        if hint is str:
            if not isinstance(raw, str):
                raise ValueError("expected a string")
            return raw
        if hint is Secret:
            if not isinstance(raw, str):
                raise ValueError("expected a string")
            return Secret(raw)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            raise ValueError("expected a table")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except (ValueError, TypeError, StopIteration) as exc:
        raise ConfigError(f"{where}: invalid value {raw!r}: {exc}") from None
    raise ConfigError(f"{where}: unsupported type {hint}")


def hops_by_network(entries: tuple[str, ...], where: str = "metadata.gateway_hops_by_network") -> dict[str, int]:
    """``NETWORK=HOPS`` entries as a mapping; ConfigError naming the entry that does not parse."""
    found: dict[str, int] = {}
    for entry in entries:
        network, sep, hops = entry.rpartition("=")
        if not sep or not hops.isdigit() or not 0 <= int(hops) <= 64 or network in found:
            raise ConfigError(f"{where}: {entry!r} is not NETWORK=HOPS (0..64, each network once)")
        found[network] = int(hops)
    return found


def _check(config: Any, prefix: str) -> None:
    """Range checks that types alone cannot express."""
    if isinstance(config, Config):
        if config.workers < 1:
            raise ConfigError("workers must be at least 1")
    if isinstance(config, ViewConfig):
        for name in ("poll_interval", "backoff_max", "connect_timeout", "read_timeout"):
            if getattr(config, name) <= 0:
                raise ConfigError(f"{prefix}{name} must be positive")
        if not 0 <= config.poll_jitter <= 1:
            raise ConfigError(f"{prefix}poll_jitter must be between 0 and 1")
        if config.max_view_age < 0:
            raise ConfigError(f"{prefix}max_view_age must not be negative")
        if config.journal_compact_ratio <= 0:
            raise ConfigError(f"{prefix}journal_compact_ratio must be positive")
        if config.shared_view_memo < 1:
            raise ConfigError(f"{prefix}shared_view_memo must be at least 1")
        if config.max_size < 1024:
            raise ConfigError(f"{prefix}max_size must be at least 1024 bytes")
        if config.key_file and not config.cert_file:
            raise ConfigError(f"{prefix}key_file is set without cert_file")
        if config.etcd_password and config.etcd_password_file:
            raise ConfigError(f"{prefix}etcd_password and etcd_password_file are both set; use one")
        if (config.etcd_password or config.etcd_password_file) and not config.etcd_username:
            raise ConfigError(f"{prefix}an etcd password is set without etcd_username")
    if isinstance(config, DnsConfig):
        from edge.view.addresses import parse_resolver_address
        for upstream in config.upstreams:
            if parse_resolver_address(upstream) is None:
                raise ConfigError(f"{prefix}upstreams: not an address or address:port: {upstream!r}")
        from ipaddress import ip_network
        for cidr in config.recursion_cidrs:
            try:
                ip_network(cidr, strict=False)
            except ValueError:
                raise ConfigError(f"{prefix}recursion_cidrs: not a CIDR: {cidr!r}") from None
        for name in ("upstream_timeout", "tcp_idle_timeout", "tcp_message_timeout"):
            if getattr(config, name) <= 0:
                raise ConfigError(f"{prefix}{name} must be positive")
        for name in ("cache_min_ttl", "cache_max_ttl", "negative_max_ttl", "stale_ttl", "serve_stale", "rate_limit"):
            if getattr(config, name) < 0:
                raise ConfigError(f"{prefix}{name} must not be negative")
        if config.cache_min_ttl > config.cache_max_ttl:
            raise ConfigError(f"{prefix}cache_min_ttl must not exceed cache_max_ttl")
        if not 512 <= config.edns_payload <= 65535:
            raise ConfigError(f"{prefix}edns_payload must be between 512 and 65535")
        from edge.view.addresses import canonical_ip
        if config.instance_data_address and canonical_ip(config.instance_data_address) != config.instance_data_address:
            raise ConfigError(f"{prefix}instance_data_address: not an address: {config.instance_data_address!r}")
        if config.udp_receive_buffer < 0:
            raise ConfigError(f"{prefix}udp_receive_buffer must not be negative")
        for name in ("cache_size", "rate_limit_clients", "tcp_max_connections", "tcp_max_connections_per_source",
                     "tcp_max_pipelined", "answer_memo_size", "listen_backlog"):
            if getattr(config, name) < 1:
                raise ConfigError(f"{prefix}{name} must be at least 1")
    if isinstance(config, MetadataConfig):
        for name in ("unknown_source_wait", "header_timeout"):
            if getattr(config, name) <= 0:
                raise ConfigError(f"{prefix}{name} must be positive")
        if config.rate < 0 or config.burst < 1:
            raise ConfigError(f"{prefix}rate must be >= 0 and burst >= 1")
        for name in ("rate_limit_entries", "max_connections", "max_connections_per_source", "render_cache_size",
                     "listen_backlog"):
            if getattr(config, name) < 1:
                raise ConfigError(f"{prefix}{name} must be at least 1")
        if not 0 <= config.gateway_hops <= 64:
            raise ConfigError(f"{prefix}gateway_hops must be between 0 and 64")
        hops_by_network(config.gateway_hops_by_network, f"{prefix}gateway_hops_by_network")
        if config.max_url_bytes < 256 or config.max_header_bytes < 1024:
            raise ConfigError(f"{prefix}max_url_bytes must be >= 256 and max_header_bytes >= 1024")
        if bool(config.identity_key_file) != bool(config.identity_cert_file):
            raise ConfigError(f"{prefix}identity_key_file and identity_cert_file must be set together")
        for cidr in config.trusted_proxies:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ConfigError(f"{prefix}trusted_proxies: {cidr!r} is not an address or CIDR") from None
    if isinstance(config, CredentialsConfig):
        if config.kind not in ("none", "process", "http"):
            raise ConfigError(f"{prefix}kind must be none, process or http")
        if config.kind == "process" and not config.command:
            raise ConfigError(f"{prefix}command is required when kind is process")
        if config.kind == "http" and not config.url.startswith(("http://", "https://")):
            raise ConfigError(f"{prefix}url must be an http:// or https:// URL when kind is http")
        if config.timeout <= 0 or config.refresh_ahead < 0 or config.retry_interval <= 0 or config.cache_size < 1:
            raise ConfigError(f"{prefix}timeout and retry_interval must be positive, refresh_ahead >= 0, cache_size >= 1")
        if not 0 < config.refresh_fraction <= 1:
            raise ConfigError(f"{prefix}refresh_fraction must be more than 0 and at most 1")
        from edge.metadata.spawner import MAX_OUTPUT_LIMIT
        if not 0 < config.max_output <= MAX_OUTPUT_LIMIT:
            raise ConfigError(f"{prefix}max_output must be between 1 and {MAX_OUTPUT_LIMIT} bytes")
    if isinstance(config, FleetConfig):
        if config.token_key_source:
            from edge.etcd.client import EtcdAddress, EtcdError
            try:
                EtcdAddress.parse(config.token_key_source)
            except EtcdError as exc:
                raise ConfigError(f"{prefix}token_key_source: {exc}") from None
        if config.token_key_refresh <= 0:
            raise ConfigError(f"{prefix}token_key_refresh must be positive")
    if isinstance(config, ViewConfig) and config.format not in ("auto", "edge-view", "eucalyptus-gni"):
        raise ConfigError(f"{prefix}format must be auto, edge-view or eucalyptus-gni")
    if isinstance(config, EucalyptusConfig):
        if config.version not in ("auto", "4", "5"):
            raise ConfigError(f"{prefix}version must be auto, 4 or 5")
        if config.controller_identity not in ("instance-id", "source-address"):
            raise ConfigError(f"{prefix}controller_identity must be instance-id or source-address")
        if config.prefetch_concurrency < 1:
            raise ConfigError(f"{prefix}prefetch_concurrency must be at least 1")
        try:
            ipaddress.IPv4Network(config.mido_md_cidr, strict=False)
        except ValueError:
            raise ConfigError(f"{prefix}mido_md_cidr {config.mido_md_cidr!r} is not an IPv4 CIDR") from None
        if config.controller_url and config.controller_identity == "instance-id" and \
                urlsplit(config.controller_url).hostname not in ("127.0.0.1", "localhost"):
            # MetadataPipeline trusts Euca-Instance-Id only from 127.0.0.1: elsewhere every path is a 404.
            raise ConfigError(f"{prefix}controller_identity = \"instance-id\" needs controller_url on 127.0.0.1 "
                              "(the controller trusts Euca-Instance-Id only from there, in VPC mode); "
                              "use \"source-address\" in EDGE mode")
        if config.controller_url and not config.controller_url.startswith(("http://", "https://")):
            raise ConfigError(f"{prefix}controller_url must be an http(s) URL")
        if min(config.controller_ttl, config.controller_stale_if_error, config.controller_timeout) < 0:
            raise ConfigError(f"{prefix}controller_ttl, controller_stale_if_error and controller_timeout "
                              "must not be negative")
    if isinstance(config, AdminConfig):
        if config.shutdown_delay < 0 or config.shutdown_grace < 0:
            raise ConfigError(f"{prefix}shutdown_delay and shutdown_grace must not be negative")
        if config.max_connections < 1:
            raise ConfigError(f"{prefix}max_connections must be at least 1")
    if isinstance(config, LogConfig):
        if config.level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"{prefix}level must be debug, info, warning or error")
        if config.format not in ("kv", "json"):
            raise ConfigError(f"{prefix}format must be kv or json")


def _walk_docs(cls: type, prefix: str, rows: list[tuple[str, str, str, str]]) -> None:
    docs = _field_docs(cls)
    hints = _hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if _is_section(hint):
            _walk_docs(hint, prefix + f.name + ".", rows)
            continue
        default = getattr(defaults, f.name)
        if f.default_factory is _default_state_dir:
            shown = "$STATE_DIRECTORY, else ~/.local/state/edge"
        elif f.name == "workers" and cls is Config:
            shown = "number of cores"
        elif isinstance(default, tuple):
            shown = ", ".join(str(d) for d in default)
        elif default is None or hint is Secret:
            shown = ""
        else:
            shown = str(default)
        rows.append((prefix + f.name, _type_text(hint), shown, docs.get(f.name, "")))


def _type_text(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is tuple:
        return f"list of {_type_text(typing.get_args(hint)[0])}"
    if hint is Listen:
        return "ADDR:PORT[@NETWORK]"
    if hint is Secret:
        return "secret"
    if typing.get_args(hint):
        return _type_text(next(a for a in typing.get_args(hint) if a is not type(None)))
    return getattr(hint, "__name__", str(hint))


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal after a field) from the class source."""
    import ast
    import inspect
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    if not tree.body or not isinstance(tree.body[0], ast.ClassDef):
        return docs
    body = tree.body[0].body
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs
