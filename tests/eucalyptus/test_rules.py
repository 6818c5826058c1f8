"""GNI acceptance as eucanetd's, and the adapter kept out of the core.

The rules are ``gni_validate``, ``gni_instance_validate`` and ``gni_interface_validate`` in
``net/euca_gni.c`` (Corymbia/eucalyptus): what they reject, edge rejects (and keeps serving the
last good view); what they only warn about, edge accepts with a warning.
"""

from __future__ import annotations

import logging

import pytest

from edge.config import Config, EucalyptusConfig, ViewConfig
from edge.errors import ConfigError, ViewInvalid
from edge.eucalyptus.gni import GniOptions, decode_gni
from edge.metadata.render import Renderer
from edge.metadata.tree import split_path
from edge.server import Adapters, adapters
from edge.view.formats import ViewFormats, make_decoder
from edge.view.snapshot import build_snapshot
from edge.view.sources import SourceKinds, ViewSource, builtin_source_kinds, configured_source, open_source
from tests.eucalyptus.conftest import fixture_bytes

OPTIONS = GniOptions(version="5", dns_domain="cloud.example")

# NetworkInfoTest.testParse (clc/modules/cluster-common/src/test/java/com/eucalyptus/cluster/common/broadcast/
# NetworkInfoTest.java): a document the controller's own serializer reads back.  It has no mode property.
NETWORK_INFO_TEST = fixture_bytes("gni-networkinfotest.xml")


def _with_mode(document: bytes, mode: str = "EDGE") -> bytes:
    return document.replace(b"<configuration>", b'<configuration>\n        <property type="simple" name="mode">'
                            b"<value>" + mode.encode() + b"</value></property>", 1)


def test_a_document_without_a_mode_is_rejected_as_eucanetd_does() -> None:
    """``gni_netmode_validate``: only EDGE and VPCMIDO are modes."""
    with pytest.raises(ViewInvalid) as caught:
        decode_gni(NETWORK_INFO_TEST, OPTIONS)
    assert caught.value.problems == ["GNI mode must be EDGE or VPCMIDO, got ''"]
    view = decode_gni(_with_mode(NETWORK_INFO_TEST), OPTIONS)
    assert [i.id for i in view.instances] == ["i-AB6B409C"]
    assert view.instances[0].primary_interface.public_ip == "10.111.200.1"


@pytest.mark.parametrize("change, problem", [
    ((b"<value>10.111.5.11</value>", b"<value>0.0.0.0</value>"), "no enabled CLC address"),
    ((b"<value>eucalyptus.internal</value>", b"<value></value>"), "no instanceDNSDomain"),
    ((b"<value>10.1.1.254</value>", b"<value>0.0.0.0</value>"), "instanceDNSServers missing or 0.0.0.0"),
    ((b"<privateIp>1.0.0.33</privateIp>", b""), "instance i-AB6B409C: no privateIp"),
    ((b"<ownerId>856501978207</ownerId>\n            <macAddress>", b"<macAddress>"), "instance i-AB6B409C: no ownerId"),
    ((b"<value>c4d8e62e-ea5d-49fb-b1e9-b908e9becf8</value>\n            </securityGroups>", b"</securityGroups>"),
     "instance i-AB6B409C: no securityGroups"),
    ((b"<vpcs/>", b'<vpcs><vpc name="vpc-1"><cidr>10.0.0.0/16</cidr></vpc></vpcs>'), "VPC elements"),
])
def test_what_gni_validate_rejects_is_rejected(change: tuple[bytes, bytes], problem: str) -> None:
    document = _with_mode(NETWORK_INFO_TEST)
    assert change[0] in document
    with pytest.raises(ViewInvalid) as caught:
        decode_gni(document.replace(*change), OPTIONS)
    assert any(problem in p for p in caught.value.problems), caught.value.problems


def test_a_missing_mac_is_a_warning_and_the_instance_is_served_without_mac_paths(caplog) -> None:
    """``gni_instance_validate`` only warns about a missing MAC."""
    document = fixture_bytes("gni-edge.xml").replace(b"<macAddress>d0:0d:0c:1d:2e:3f</macAddress>", b"")
    with caplog.at_level(logging.WARNING, logger="edge.eucalyptus"):
        view = decode_gni(document, OPTIONS)
    assert any("i-0c1d2e3f: no macAddress" in r.getMessage() for r in caplog.records)
    snapshot = build_snapshot(view)
    instance = snapshot.instances["i-0c1d2e3f"]
    assert instance.primary_interface.mac == ""
    renderer = Renderer(None, 100)  # type: ignore[arg-type]  # no identity paths asked here
    assert renderer.lookup(snapshot, instance, b"/latest/meta-data/local-ipv4").body == b"172.16.0.12"
    assert renderer.lookup(snapshot, instance, b"/latest/meta-data/mac") is None
    assert renderer.lookup(snapshot, instance, b"/latest/meta-data/services/domain").body == b"cloud.example"
    assert renderer.lookup(snapshot, instance, b"/latest/meta-data/network/interfaces/macs/").body == b""
    assert "d0:0d:ab:6b:40:9c" in snapshot.by_mac  # the others keep theirs
    assert split_path(b"/latest/meta-data/mac") == ["latest", "meta-data", "mac"]


def test_an_address_outside_the_subnets_is_accepted_with_a_warning(caplog) -> None:
    """eucanetd never checks private addresses against the subnets."""
    document = fixture_bytes("gni-edge.xml").replace(b"<privateIp>172.16.0.13</privateIp>",
                                                     b"<privateIp>192.168.7.13</privateIp>")
    with caplog.at_level(logging.WARNING, logger="edge.eucalyptus"):
        view = decode_gni(document, OPTIONS)
    assert any("192.168.7.13 is outside the subnets" in r.getMessage() for r in caplog.records)
    snapshot = build_snapshot(view)
    assert snapshot.attachment_for("", "192.168.7.13").instance.id == "i-77aa88bb"


def test_edge_mode_instances_are_known_by_their_public_address_too() -> None:
    """EDGE nodes SNAT metadata traffic to the public address by default (METADATA_USE_VM_PRIVATE=N)."""
    snapshot = build_snapshot(decode_gni(fixture_bytes("gni-edge.xml"), OPTIONS))
    assert snapshot.attachment_for("", "10.111.200.1").instance.id == "i-ab6b409c"
    assert snapshot.attachment_for("", "172.16.0.11").instance.id == "i-ab6b409c"


def test_intip_entry_of_an_instance_is_its_device_index_0_interface() -> None:
    """An instance id in the intip map is the instance's primary interface, whatever the document order."""
    document = fixture_bytes("gni-vpc.xml")
    first = document.index(b'<networkInterface name="eni-00000001">')
    second = document.index(b'<networkInterface name="eni-00000011">')
    end = document.index(b"</networkInterface>", second) + len(b"</networkInterface>")
    swapped = (document[:first] + document[second:end] + b"\n" + document[first:second] + document[end:])
    from edge.eucalyptus.gni import bundle
    view = decode_gni(bundle(swapped, b"255.0.0.10 i-00000001 vpc-00000001 subnet-00000001\n"), OPTIONS)
    snapshot = build_snapshot(view)
    assert snapshot.attachment_for("", "255.0.0.10").interface.id == "eni-00000001"


# -- the adapter is plugged in, not built in (tests/test_import_graph.py: no core module imports it) ----

def test_without_the_adapters_the_core_knows_no_gni(tmp_path) -> None:
    config = Config(view=ViewConfig(format="eucalyptus-gni"))
    with pytest.raises(ConfigError, match="not a format this program registers"):
        make_decoder(config)
    auto = make_decoder(Config())
    with pytest.raises(ViewInvalid, match="XML documents are not an edge-view/1 view"):
        auto(fixture_bytes("gni-edge.xml"))
    assert not make_decoder(Config(), adapters().formats)(fixture_bytes("gni-edge.xml")).ordered
    config = Config(view=ViewConfig(source=str(tmp_path / "gni.xml")),
                    eucalyptus=EucalyptusConfig(intip_map_file=str(tmp_path / "map")))
    assert "+intip:" not in configured_source(config).description
    assert "+intip:" in configured_source(config, adapters().sources).description


def test_a_second_adapter_plugs_in_the_same_way(tmp_path) -> None:
    """A scheme, a wrapper and a format, registered as the composition root registers Eucalyptus's."""

    class Fixed(ViewSource):
        description = "fixed"

        async def fetch(self) -> bytes | None:
            return b"<other-cloud/>"

    kinds = builtin_source_kinds()
    kinds.add_scheme("othercloud", lambda spec, config: Fixed())
    assert isinstance(open_source("othercloud://x", ViewConfig(), kinds), Fixed)
    with pytest.raises(Exception, match="unsupported view source"):
        open_source("othercloud://x", ViewConfig())
    assert {"http", "https"} <= set(builtin_source_kinds().schemes)
    assert not {"etcd", "etcds"} & set(builtin_source_kinds().schemes), "etcd is an adapter, not built in"
    assert {"etcd", "etcds"} <= set(adapters().sources.schemes)
    formats = ViewFormats()
    demo = make_decoder(Config(view=ViewConfig(source="demo")))
    formats.add("other-cloud", lambda data: data.startswith(b"<other-cloud"),
                lambda config: (lambda data: demo(_demo_bytes())))
    assert make_decoder(Config(), formats)(b"<other-cloud/>").ordered
    assert isinstance(Adapters(SourceKinds(), formats), Adapters)


def _demo_bytes() -> bytes:
    import json

    from edge.view.demo import demo_document
    return json.dumps(demo_document()).encode()


def test_intip_addresses_are_in_mido_md_cidr_whatever_it_is(caplog) -> None:
    """``MIDO_MD_CIDR`` (net/eucanetd.c, default 255.0.0.0/8) is configurable: the map follows it."""
    from edge.eucalyptus.gni import bundle
    intip = b"100.64.0.10 eni-00000001 vpc-00000001 subnet-00000001\n255.0.0.11 eni-00000011 vpc-00000001 subnet-00000001\n"
    options = GniOptions(version="5", dns_domain="cloud.example", mido_md_cidr="100.64.0.0/16")
    with caplog.at_level(logging.WARNING, logger="edge.eucalyptus"):
        snapshot = build_snapshot(decode_gni(bundle(fixture_bytes("gni-vpc.xml"), intip), options))
    assert snapshot.attachment_for("", "100.64.0.10").interface.id == "eni-00000001"
    assert snapshot.attachment_for("", "255.0.0.11") is None
    assert any("intip map line 2" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match="mido_md_cidr"):
        from edge.config import load_config
        load_config(None, env={"EDGE_EUCALYPTUS_MIDO_MD_CIDR": "not-a-cidr"})


# -- the profile against the emulated controller, on Eucalyptus's own test documents ------------

def _paths(entries: dict[str, str]) -> set[str]:
    """Every path of a map, with and without a trailing slash, and every directory above one."""
    paths = set()
    for path in entries:
        segments = path.split("/")
        for depth in range(1, len(segments) + 1):
            paths.update({"/".join(segments[:depth]), "/".join(segments[:depth]) + "/"})
    return paths


@pytest.mark.parametrize("fixture", ["gni-networkinfotest.xml", "gni-4x-networkinfotest.xml"])
@pytest.mark.parametrize("version, use_instance_dns", [("5", False), ("5", True), ("4", False), ("4", True)])
def test_the_profile_answers_as_the_controller_on_eucalyptus_test_documents(fixture: str, version: str,
                                                                            use_instance_dns: bool) -> None:
    """NetworkInfoTest (cluster-common, 5.x) and the 4.x NetworkInfoTest (cluster-manager) documents, with
    the mode eucanetd requires: every path edge answers from the GNI is the controller's answer."""
    from edge.eucalyptus.profile import EucalyptusProfile, ProfileOptions
    from tests.eucalyptus.emulator import Cloud, Controller, records_from_gni

    document = _with_mode(fixture_bytes(fixture))
    options = GniOptions(version=version, dns_domain="cloud.example")
    snapshot = build_snapshot(decode_gni(document, options))
    profile = EucalyptusProfile(ProfileOptions(options, use_instance_dns))
    controller = Controller(Cloud(vpc=False, version=version, use_instance_dns=use_instance_dns,
                                  dns_domain="cloud.example",
                                  # The controller that published instanceDNSDomain eucalyptus.internal.
                                  instance_subdomain=".eucalyptus"),
                            records_from_gni(document, {}))
    compared = 0
    for instance in snapshot.view.instances:
        record = controller.records[instance.id]
        entries = {**controller._core(record), **controller._network(record)}
        for path in sorted(_paths(entries)):
            mine = profile.answer(snapshot, instance, f"latest/meta-data/{path}")
            if mine is None:
                continue  # the controller's to answer (asked, cached, prefetched)
            status, body = controller.respond(record.private_ip, f"/latest/meta-data/{path}", "169.254.169.254", None)
            assert (status, body) == (200, mine), path
            compared += 1
    assert compared >= 20
    assert profile.answer(snapshot, snapshot.view.instances[0], "") == \
        controller.respond("1.0.0.33", "/", "169.254.169.254", None)[1]


@pytest.mark.parametrize("domain, private, public", [
    (b"eucalyptus.internal", "euca-172-16-0-11.eucalyptus.internal", "euca-10-111-200-1.eucalyptus.cloud.example"),
    (b"compute.internal", "ip-172-16-0-11.compute.internal", "ec2-10-111-200-1.compute.cloud.example"),
    (b"vm.internal", "ip-172-16-0-11.vm.internal", "ec2-10-111-200-1.vm.cloud.example"),
])
def test_version_and_subdomain_by_default_from_the_document(domain: bytes, private: str, public: str) -> None:
    """instanceDNSDomain is INSTANCE_SUBDOMAIN + ".internal" (NetworkInfoBroadcaster.java, 4.x
    NetworkInfoBroadcasts.groovy): 4.x's default ".eucalyptus" tells the generation."""
    document = fixture_bytes("gni-edge.xml").replace(b"<value>eucalyptus.internal</value>",
                                                     b"<value>" + domain + b"</value>")
    view = decode_gni(document, GniOptions(dns_domain="cloud.example"))
    assert view.cloud.private_name("172.16.0.11") == private
    assert view.cloud.public_name("10.111.200.1") == public
    forced = decode_gni(document, GniOptions(version="5", instance_subdomain=".compute", dns_domain="cloud.example"))
    assert forced.cloud.private_name("172.16.0.11") == "ip-172-16-0-11.compute.internal"


def test_mido_md_cidr_is_read_from_eucalyptus_conf(tmp_path, caplog) -> None:
    from edge.eucalyptus.gni import configured_md_cidr
    conf = tmp_path / "eucalyptus.conf"
    conf.write_text('EUCAHOME="/"\n# MIDO_MD_CIDR="10.0.0.0/8"\nMIDO_MD_CIDR="169.254.64.0/18"  # ours\n')
    config = Config(eucalyptus=EucalyptusConfig(eucalyptus_conf=str(conf)))
    assert configured_md_cidr(config) == "169.254.64.0/18"
    assert GniOptions.of(config).mido_md_cidr == "169.254.64.0/18"
    conf.write_text('EUCAHOME="/"\n')
    assert configured_md_cidr(config) == "255.0.0.0/8"  # unset there: eucanetd's default
    conf.write_text('MIDO_MD_CIDR="nonsense"\n')
    with caplog.at_level("WARNING", logger="edge.eucalyptus"):
        assert configured_md_cidr(config) == "255.0.0.0/8"
    assert any("not a CIDR" in r.getMessage() for r in caplog.records)
    missing = Config(eucalyptus=EucalyptusConfig(eucalyptus_conf=str(tmp_path / "none"), mido_md_cidr="100.64.0.0/16"))
    assert configured_md_cidr(missing) == "100.64.0.0/16"
