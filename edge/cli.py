"""``edge`` command line: ``serve``, ``view check``, ``keys generate``, ``config keys``."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from edge.config import Config, config_toml, key_table, load_config
from edge.errors import ConfigError, EdgeError, ViewInvalid
from edge.logs import configure_logging
from edge.redact import redact

# CLI flag -> configuration key; flags override the file and the environment.
_SERVE_FLAGS: dict[str, str] = {
    "view": "view.source",
    "state_dir": "view.state_dir",
    "metadata_listen": "metadata.listen",
    "dns_listen": "dns.listen",
    "admin_listen": "admin.listen",
    "poll_interval": "view.poll_interval",
    "token_key_file": "metadata.token_key_file",
    "token_key_source": "fleet.token_key_source",
    "workers": "workers",
    "log_level": "log.level",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge", description="Instance metadata and DNS edge server.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the metadata and DNS server")
    serve.add_argument("--config", help="TOML configuration file")
    serve.add_argument("--view", metavar="SOURCE",
                       help="view source: file path, http(s):// URL, etcd://HOST:PORT[,HOST:PORT...]/KEY, or demo")
    serve.add_argument("--state-dir", metavar="DIR", help="where the last good view is kept")
    serve.add_argument("--metadata-listen", metavar="ADDR:PORT[@NETWORK]", action="append",
                       help="metadata listener (repeatable)")
    serve.add_argument("--dns-listen", metavar="ADDR:PORT[@NETWORK]", action="append",
                       help="DNS listener, UDP and TCP (repeatable)")
    serve.add_argument("--admin-listen", metavar="ADDR:PORT", help="operations listener (health, metrics)")
    serve.add_argument("--poll-interval", metavar="SECONDS", type=float, help="seconds between view polls")
    serve.add_argument("--token-key-file", metavar="FILE", help="IMDSv2 token keys shared by the fleet")
    serve.add_argument("--token-key-source", metavar="etcd://HOST:PORT[,...]/KEY",
                       help="IMDSv2 token keys read from etcd (one write rotates the whole fleet)")
    serve.add_argument("--workers", metavar="N", type=int, help="worker processes")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))

    view = commands.add_parser("view", help="work with view documents")
    view_commands = view.add_subparsers(dest="view_command", required=True)
    publish = view_commands.add_parser(
        "publish", help="write a view into an etcd keyspace as the fewest changes (one transaction per batch)")
    publish.add_argument("path", metavar="FILE", help="an edge-view/1 document")
    publish.add_argument("--etcd", required=True, metavar="etcd://HOST:PORT[,...]/PREFIX/",
                         help="the keyspace: an etcd(s) address ending in /")
    publish.add_argument("--config", help="TOML configuration file (etcd TLS files, user, password, timeouts)")
    check = view_commands.add_parser("check", help="validate a view and summarise it")
    check.add_argument("source", metavar="FILE_OR_URL")
    check.add_argument("--config", help="TOML configuration file (for HTTP timeouts, CA file, size cap)")
    view_commands.add_parser("schema", help="print the JSON Schema of edge-view/1 documents")
    view_commands.add_parser("example", help="print a valid starter edge-view/1 document")

    keys = commands.add_parser("keys", help="IMDSv2 token keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    generate = keys_commands.add_parser("generate", help="write a new token key file (or add a key to one)")
    generate.add_argument("path", metavar="FILE")
    generate.add_argument("--add", action="store_true",
                          help="add a new primary key in front of the existing ones (rotation)")

    config = commands.add_parser("config", help="configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    config_commands.add_parser("keys", help="list every configuration key (Markdown table)")
    show = config_commands.add_parser("show", help="print the effective configuration")
    show.add_argument("--config", help="TOML configuration file")
    return parser


def _serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for attribute, key in _SERVE_FLAGS.items():
        value = getattr(args, attribute, None)
        if value is not None:
            overrides[key] = value
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, where a reader that went away is caught, not at exit
        return code
    except BrokenPipeError:
        # The reader stopped reading (`edge config keys | head`): stop quietly, as shell tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        if args.command == "view" and args.view_command == "publish":
            return _view_publish(args)
        if args.command == "serve":
            return _serve(args, argv)
        if args.command == "view":
            return _view_document(args.view_command) if args.view_command in ("schema", "example") \
                else _view_check(args)
        if args.command == "keys":
            return _keys_generate(args)
        if args.command == "config":
            return _config(args)
    except ConfigError as exc:
        print(f"edge: configuration error: {redact(str(exc))}", file=sys.stderr)
        return 2
    return 2


def _serve(args: argparse.Namespace, argv: list[str]) -> int:
    from edge.server import serve

    overrides = _serve_overrides(args)

    def load() -> Config:
        return load_config(args.config, os.environ, overrides)

    config = load()
    configure_logging(config.log.level, config.log.format)
    return serve(config, load, argv)


def _view_document(which: str) -> int:
    """``view schema`` (the file shipped in the package) or ``view example``."""
    if which == "schema":
        from importlib.resources import files

        sys.stdout.write(files("edge.view").joinpath("schema.json").read_text(encoding="utf-8"))
    else:
        from edge.view.example import example_text

        sys.stdout.write(example_text())
    return 0


def _view_check(args: argparse.Namespace) -> int:
    from edge.server import adapters
    from edge.view.snapshot import build_snapshot
    from edge.view.sources import open_source

    config = load_config(args.config, os.environ, {})
    shown = redact(args.source)  # a URL's password or token is not printed
    plugged = adapters()
    source = open_source(args.source, config.view, plugged.sources)
    try:
        data = asyncio.run(source.fetch())
    except EdgeError as exc:
        # The source's message names it already ("PATH: no such file", "URL: HTTP 500").
        message = redact(str(exc))
        print(f"edge: cannot read the view: {message if shown in message else f'{shown}: {message}'}",
              file=sys.stderr)
        return 1
    from edge.view.keyspace import PreparedView
    if isinstance(data, PreparedView):
        data = data.document()  # an etcd keyspace's view, checked again as one document
    if data is None:
        print(f"edge: cannot read the view: {shown}: no content", file=sys.stderr)
        return 1
    decoder = plugged.formats.decoder(config)
    try:
        view = decoder(data)
    except ViewInvalid as exc:
        print(f"{shown}: REJECTED, {len(exc.problems)} problem(s):")
        for problem in exc.problems:
            print(f"  - {problem}")
        return 1
    snapshot = build_snapshot(view)
    counts = snapshot.counts()
    print(f"{shown}: OK")
    print(f"  format      {decoder.format_of(data)}")  # the document's own (a GNI is read as edge-view/1)
    print(f"  serial      {view.serial}" if view.ordered else f"  version     {view.version}")
    print(f"  generated   {view.generated or '-'}")
    print(f"  networks    {counts['networks']}")
    print(f"  instances   {counts['instances']}")
    print(f"  interfaces  {counts['interfaces']}")
    print(f"  names       {counts['names']}")
    print(f"  zones       {len(snapshot.zones)}")
    print(f"  domains     internal {view.cloud.internal_domain}, public {view.cloud.public_domain}")
    print("  problems    none")
    return 0


def _view_publish(args: argparse.Namespace) -> int:
    from edge.etcd.client import EtcdError
    from edge.etcd.publish import publish, publish_client
    from edge.etcd.view_source import etcd_access

    config = load_config(args.config, os.environ, {})
    try:
        with open(args.path, "rb") as handle:
            data = handle.read(config.view.max_size + 1)
    except OSError as exc:
        print(f"edge: cannot read {args.path}: {exc.strerror}", file=sys.stderr)
        return 1
    if len(data) > config.view.max_size:
        print(f"edge: {args.path} is over view.max_size ({config.view.max_size} bytes)", file=sys.stderr)
        return 1
    view = config.view
    try:
        client = publish_client(args.etcd, view.connect_timeout, view.read_timeout, view.max_size, etcd_access(view))
        done = publish(data, client)
    except ViewInvalid as exc:
        print(f"{args.path}: REJECTED, {len(exc.problems)} problem(s); nothing written:")
        for problem in exc.problems:
            print(f"  - {problem}")
        return 1
    except EtcdError as exc:
        print(f"edge: {redact(str(exc))}", file=sys.stderr)
        return 1
    if not done.transactions:
        print(f"{args.etcd}: serial {done.serial} already published, nothing to change")
        return 0
    plural = "" if done.transactions == 1 else "s"
    print(f"published serial {done.serial}: {done.puts} put{'' if done.puts == 1 else 's'}, "
          f"{done.deletes} delete{'' if done.deletes == 1 else 's'} in {done.transactions} transaction{plural} "
          f"(revision {done.revision})")
    return 0


def _keys_generate(args: argparse.Namespace) -> int:
    from edge.metadata.tokens import generate_token_key_file

    generate_token_key_file(args.path, add=args.add)
    print(f"wrote {args.path}")
    return 0


def _config(args: argparse.Namespace) -> int:
    if args.config_command == "keys":
        print("| key | type | default | meaning |")
        print("|---|---|---|---|")
        for key, kind, default, text in key_table():
            env = "EDGE_" + key.upper().replace(".", "_")
            shown = f"`{default}`" if default else "(empty)"
            print(f"| `{key}` (`{env}`) | {kind} | {shown} | {text.replace('``', '`')} |")
        return 0
    config = load_config(getattr(args, "config", None), os.environ, {})
    sys.stdout.write(config_toml(config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
