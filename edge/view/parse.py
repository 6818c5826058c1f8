"""Validate an ``edge-view/1`` document into a :class:`View`, and explain what is wrong with one.

A view is accepted whole or rejected whole: every problem found is collected
(with a JSON-path-like location) and reported together in :class:`ViewInvalid`,
so an operator fixes a bad producer in one round trip.

What is accepted is decided by the schema of :mod:`edge.view.wire` alone (its
types, then its checks).  This module runs it over a decoded document, adds the
rules across instances (unique ids, addresses, MACs), and, when a part breaks a
type, walks that part along the same types to word every problem in it
(:func:`explain`): msgspec stops at the first.
"""

from __future__ import annotations

import json
import re
import typing
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from edge.errors import ViewInvalid
from edge.view.addresses import canonical_ipv4  # noqa: F401 - still imported from here by the GNI adapter
from edge.view.model import DEFAULT_NETWORK, FORMAT, Instance, View
from edge.view.wire import (
    Cidrs,
    Problems,
    WireDocument,
    WireInstance,
    WireNetwork,
    cloud_from_wire,
    instance_from_wire,
    networks_from_wire,
)

__all__ = ["Reused", "cidr_table_of", "cross_instance_problems", "explain", "instance_validator", "parse_view",
           "parse_view_bytes"]


def _type_name(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def parse_view_bytes(data: bytes) -> View:
    """Decode JSON bytes and validate them; raises :class:`ViewInvalid`."""
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ViewInvalid([f"not valid JSON: {exc}"]) from None
    except RecursionError:
        raise ViewInvalid(["not valid JSON: nested too deeply"]) from None
    return parse_view(document)


class Reused:
    """An element of ``instances`` that is already a validated :class:`Instance`.

    The decoder puts these in place of decoded objects when it recognises unchanged text
    (so neither decoding nor validating is repeated for it) or when it validated the
    element as soon as it was decoded (see :func:`instance_validator`).
    """

    __slots__ = ("instance",)

    def __init__(self, instance: Instance) -> None:
        self.instance = instance


# -- typing a decoded part, and wording what breaks the types -----------------------------------------

_MEMBER_TYPES = typing.get_type_hints(WireDocument, include_extras=True)
_DOCUMENT_INFO = msgspec.inspect.type_info(WireDocument)
assert isinstance(_DOCUMENT_INFO, msgspec.inspect.StructType)
_MEMBER_INFO = {field.name: field for field in _DOCUMENT_INFO.fields}


def _typed(value: Any, kind: Any, info: msgspec.inspect.Type, where: str, problems: Problems) -> Any:
    """``value`` converted to ``kind``; on a type problem, every problem in it is worded and None returned."""
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        before = len(problems.items)
        explain(value, info, where, problems)
        if len(problems.items) == before:
            problems.add(where, str(exc))  # a rule explain does not word: msgspec's own words
        return None


def explain(value: Any, info: msgspec.inspect.Type, where: str, problems: Problems, field: bool = True) -> None:
    """Add a problem for each place ``value`` breaks the type ``info`` describes (none when it fits).

    ``field``: ``value`` is an object member, where null means absent.
    """
    extra: dict[str, Any] = {}
    while isinstance(info, msgspec.inspect.Metadata):
        extra = info.extra or extra
        info = info.type
    if isinstance(info, msgspec.inspect.UnionType):
        if value is None and any(isinstance(t, msgspec.inspect.NoneType) for t in info.types):
            return
        others = [t for t in info.types if not isinstance(t, msgspec.inspect.NoneType)]
        if len(others) == 1:
            explain(value, others[0], where, problems, field)
        return
    if value is None and field:
        problems.add(where, "required field is missing")
        return
    if isinstance(info, msgspec.inspect.StructType):
        if type(value) is not dict:
            problems.add(where, f"expected object, got {_type_name(value)}")
            return
        for member in info.fields:
            item = value.get(member.encode_name)
            if item is None and not member.required:
                continue
            explain(item, member.type, f"{where}.{member.encode_name}", problems)
    elif isinstance(info, (msgspec.inspect.ListType, msgspec.inspect.VarTupleType)):
        if type(value) is not list:
            problems.add(where, f"expected array, got {_type_name(value)}")
            return
        if info.min_length is not None and len(value) < info.min_length:
            problems.add(where, extra.get("problem") or f"at least {info.min_length} element(s) required")
        for index, item in enumerate(value):
            explain(item, info.item_type, f"{where}[{index}]", problems, field=False)
    elif isinstance(info, msgspec.inspect.DictType):
        if type(value) is not dict:
            problems.add(where, f"expected object, got {_type_name(value)}")
            return
        for key, item in value.items():
            explain(item, info.value_type, f"{where}.{key}", problems, field=False)
    elif isinstance(info, msgspec.inspect.StrType):
        if type(value) is not str and info.pattern is not None and extra.get("problem"):
            problems.add(where, extra["problem"].format(value=repr(value)))
        elif type(value) is not str:
            problems.add(where, f"expected string, got {_type_name(value)}")
        elif info.min_length is not None and len(value) < info.min_length:
            problems.add(where, "must not be empty" if info.min_length == 1 else f"shorter than {info.min_length}")
        elif info.pattern is not None and re.search(info.pattern, value) is None:
            wording = extra.get("problem") or "does not match {value}"
            problems.add(where, wording.format(value=repr(value)))
    elif isinstance(info, msgspec.inspect.IntType):
        if type(value) is not int:
            problems.add(where, f"expected integer, got {_type_name(value)}")
        elif not -(2**63) <= value < 2**64:
            problems.add(where, f"out of range: {value}")
        elif info.ge is not None and info.le is not None and not info.ge <= value <= info.le:
            problems.add(where, f"must be {info.ge}..{info.le}, got {value}")
        elif info.ge is not None and value < info.ge:
            problems.add(where, "must not be negative" if info.ge == 0 else f"must be at least {info.ge}, got {value}")
    elif isinstance(info, msgspec.inspect.BoolType):
        if type(value) is not bool:
            problems.add(where, f"expected boolean, got {_type_name(value)}")
    elif isinstance(info, msgspec.inspect.BytesType):
        if type(value) is not str:
            problems.add(where, f"expected string, got {_type_name(value)}")
        else:
            try:
                msgspec.convert(value, bytes)
            except msgspec.ValidationError:
                problems.add(where, "not valid base64")
    elif isinstance(info, msgspec.inspect.LiteralType):
        if value not in info.values or type(value) is not type(info.values[0]):
            if all(type(v) is str for v in info.values) and type(value) is not str:
                problems.add(where, f"expected string, got {_type_name(value)}")
            else:
                problems.add(where, f"must be {' or '.join(map(repr, info.values))}, got {value!r}")


_INSTANCE_INFO = msgspec.inspect.type_info(WireInstance)
_NETWORK_INFO = msgspec.inspect.type_info(WireNetwork)


def instance_of(item: Any, cidrs: Cidrs, problems: Problems, where: str = "$") -> Instance | None:
    """One decoded element of ``instances`` typed and checked; None with its problems in ``problems``."""
    wire = _typed(item, WireInstance, _INSTANCE_INFO, where, problems)
    return None if wire is None else instance_from_wire(wire, cidrs, problems, where)


def cidr_table_of(document_so_far: dict[str, Any]) -> Cidrs | None:
    """The CIDRs of each network in ``networks``; None when it is missing or has problems."""
    networks = document_so_far.get("networks")
    if networks is None or type(networks) is not list:
        return None
    problems = Problems()
    _, cidrs = _parse_networks(document_so_far, problems)
    return None if problems else cidrs


def instance_validator(document_so_far: dict[str, Any]) -> Callable[[Any], Any] | None:
    """A function that validates one decoded element of ``instances`` on its own, or None.

    A streaming decoder calls it on each element as soon as the element is decoded, so the
    decoded objects of one instance are freed before the next one is decoded: peak memory
    stays near one instance's worth, and the long-lived objects of the snapshot are not left
    scattered among freed ones (a fragmented heap the allocator cannot give back).  Elements
    with a problem are returned unchanged for :func:`parse_view` to explain.  None when
    ``networks`` has not been decoded yet or has problems (instances are checked against
    its CIDRs).
    """
    cidrs = cidr_table_of(document_so_far)
    if cidrs is None:
        return None

    def validate(item: Any) -> Any:
        if type(item) is not dict:
            return item
        instance = instance_of(item, cidrs, Problems())
        return item if instance is None else Reused(instance)

    return validate


def parse_view(document: object, cross_check: bool = True) -> View:
    """Validate a decoded document; raises :class:`ViewInvalid` listing every problem.

    Elements of ``instances`` may be :class:`Reused` (already validated).
    ``cross_check=False`` skips the rules that span instances (unique ids, addresses,
    MACs): only for a caller that enforces them itself (see :mod:`edge.view.delta`).
    """
    problems = Problems()
    if type(document) is not dict:
        raise ViewInvalid([f"$: expected a JSON object, got {_type_name(document)}"])
    fmt = document.get("format")
    if fmt is None:
        problems.add("$.format", "required field is missing")
    elif type(fmt) is not str:
        problems.add("$.format", f"expected string, got {_type_name(fmt)}")
    elif fmt != FORMAT:
        # Nothing else can be trusted in a document of another format.
        raise ViewInvalid([f"$.format: expected {FORMAT!r}, got {fmt!r}"])
    serial = _member(document, "serial", problems)
    generated = _member(document, "generated", problems)
    cloud = cloud_from_wire(_member(document, "cloud", problems), problems)
    networks, cidrs = _parse_networks(document, problems)
    instances = _parse_instances(document, cidrs, problems, cross_check)
    if problems:
        raise ViewInvalid(problems.items)
    return View(serial=serial, generated=generated, cloud=cloud, networks=networks, instances=instances)


def _member(document: dict[str, Any], name: str, problems: Problems) -> Any:
    value = document.get(name)
    info = _MEMBER_INFO[name]
    if value is None and not info.required:
        return None
    return _typed(value, _MEMBER_TYPES[name], info.type, f"$.{name}", problems)


def _parse_networks(document: dict[str, Any], problems: Problems) -> tuple[tuple[Any, ...], Cidrs]:
    items = document.get("networks")
    typed = []
    if items is not None and type(items) is not list:
        problems.add("$.networks", f"expected array, got {_type_name(items)}")
    for index, item in enumerate(items if type(items) is list else ()):
        where = f"$.networks[{index}]"
        wire = _typed(item, WireNetwork, _NETWORK_INFO, where, problems)
        if wire is not None:
            typed.append((where, wire))
    return networks_from_wire(typed, problems)


def _parse_instances(document: dict[str, Any], cidrs: Cidrs, problems: Problems,
                     cross_check: bool = True) -> tuple[Instance, ...]:
    items = document.get("instances")
    if items is None:
        problems.add("$.instances", "required field is missing")
        return ()
    if type(items) is not list:
        problems.add("$.instances", f"expected array, got {_type_name(items)}")
        return ()
    instances: list[Instance] = []
    uniqueness = _Uniqueness()
    for index, item in enumerate(items):
        if type(item) is Reused:
            instance = item.instance
        else:
            built = instance_of(item, cidrs, problems, f"$.instances[{index}]")
            if built is None:
                continue
            instance = built
        if not cross_check or uniqueness.check(instance, f"$.instances[{index}]", problems):
            instances.append(instance)
    return tuple(instances)


class _Uniqueness:
    """The rules that span instances: unique ids, (network, private address), public addresses, MACs."""

    __slots__ = ("ids", "private", "public", "macs")

    def __init__(self) -> None:
        self.ids: dict[str, str] = {}
        self.private: dict[tuple[str, str], str] = {}
        self.public: dict[str, str] = {}
        self.macs: dict[str, str] = {}

    def check(self, instance: Instance, where: str, problems: Problems) -> bool:
        """Record ``instance``; False when its id was seen before (it is then left out)."""
        previous = self.ids.get(instance.id)
        if previous is not None:
            problems.add(f"{where}.id", f"duplicate instance id {instance.id!r} (also at {previous})")
            return False
        self.ids[instance.id] = where
        seen_private, seen_public, seen_macs = self.private, self.public, self.macs
        for interface in instance.interfaces:
            keys = [(interface.network, a) for a in interface.private_ips + interface.ipv6s]
            keys += [(DEFAULT_NETWORK, a) for a in interface.metadata_sources]
            for key in keys:
                address = key[1]
                owner = seen_private.get(key)
                if owner is not None:
                    problems.add(where, f"private address {address} in network {key[0]!r} "
                                        f"is also used by {owner}")
                else:
                    seen_private[key] = instance.id
            if interface.public_ip is not None:
                owner = seen_public.get(interface.public_ip)
                if owner is not None:
                    problems.add(where, f"public address {interface.public_ip} is also used by {owner}")
                else:
                    seen_public[interface.public_ip] = instance.id
            owner = seen_macs.get(interface.mac) if interface.mac else None
            if owner is not None:
                problems.add(where, f"MAC {interface.mac} is also used by {owner}")
            elif interface.mac:
                seen_macs[interface.mac] = instance.id
        return True


def cross_instance_problems(instances: Iterable[Instance]) -> list[str]:
    """What :func:`parse_view` reports about the rules across ``instances``, taken in document order."""
    problems = Problems()
    uniqueness = _Uniqueness()
    for index, instance in enumerate(instances):
        uniqueness.check(instance, f"$.instances[{index}]", problems)
    return problems.items
