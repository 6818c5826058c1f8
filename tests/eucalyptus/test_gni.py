"""The Eucalyptus GNI as a view source: both network modes, the intip map, hardening, change detection."""

from __future__ import annotations

import dataclasses
import os

import pytest
import uvloop

from edge.config import Config, EucalyptusConfig, ViewConfig
from edge.errors import ViewInvalid
from edge.eucalyptus.gni import GniOptions, bundle, decode_gni, is_gni
from edge.eucalyptus.source import GniWithIntipMap
from edge.server import adapters
from edge.view.formats import make_decoder
from edge.view.poller import Poller
from edge.view.sources import FileSource
from edge.view.store import ViewStore
from tests.eucalyptus.conftest import FIXTURES, fixture_bytes

OPTIONS = GniOptions(version="4", dns_domain="cloud.example")


def test_edge_mode_document_becomes_a_flat_view() -> None:
    view = decode_gni(fixture_bytes("gni-edge.xml"), OPTIONS)
    assert not view.ordered and view.version == "3f2a9c1b"
    assert view.cloud.internal_domain == "eucalyptus.internal"
    assert view.cloud.public_domain == "eucalyptus.cloud.example"
    assert [n.id for n in view.networks] == [""] and view.networks[0].cidrs == ("172.16.0.0/16",)
    first = view.instances[0]
    assert first.id == "i-ab6b409c" and first.account_id == "856501978207"
    assert first.availability_zone == "one"  # the instance's cluster
    interface = first.primary_interface
    assert (interface.network, interface.private_ips, interface.public_ip) == ("", ("172.16.0.11",), "10.111.200.1")
    assert interface.mac == "d0:0d:ab:6b:40:9c"
    assert [g.id for g in interface.security_groups] == ["sg-c4d8e62e"]
    assert view.instances[2].primary_interface.public_ip is None  # 0.0.0.0 means none


def test_vpc_mode_document_keeps_overlapping_networks_apart() -> None:
    view = decode_gni(fixture_bytes("gni-vpc.xml"), OPTIONS)
    from edge.view.snapshot import build_snapshot
    snapshot = build_snapshot(view)
    assert snapshot.attachment_for("vpc-00000001", "10.0.0.10").instance.id == "i-00000001"
    assert snapshot.attachment_for("vpc-00000002", "10.0.0.10").instance.id == "i-00000003"
    second = snapshot.attachment_for("vpc-00000001", "10.0.0.11")
    assert second.instance.id == "i-00000001" and second.interface.id == "eni-00000011"
    assert second.interface.device_index == 1
    assert snapshot.instances["i-00000003"].availability_zone == "cluster1"
    private = snapshot.names["euca-10-0-0-10.eucalyptus.internal"]
    assert private.records_for("vpc-00000001")[0].value == "10.0.0.10"
    assert private.records_for("vpc-00000002")[0].value == "10.0.0.10"
    assert private.records_for("") == ()
    public = snapshot.names["euca-2-0-0-1.eucalyptus.cloud.example"]
    assert public.records_for("") [0].value == "2.0.0.1"
    assert public.records_for("vpc-00000001")[0].value == "10.0.0.10"  # split horizon
    assert snapshot.names["instance-data"].records_for("")[0].value == "169.254.169.254"
    assert snapshot.names["instance-data.eucalyptus.internal"].records_for("")[0].value == "169.254.169.254"


def test_5x_names() -> None:
    """5.x: ``VmInstances.dnsName`` = prefix + A-B-C-D + INSTANCE_SUBDOMAIN (``.compute``) + the internal
    (``DomainNames.internalSubdomain``: ``internal``) or external (``system.dns.dnsdomain``) domain."""
    document = fixture_bytes("gni-edge.xml").replace(b"<value>eucalyptus.internal</value>",
                                                     b"<value>compute.internal</value>")
    view = decode_gni(document, dataclasses.replace(OPTIONS, version="5"))
    assert view.cloud.internal_domain == "compute.internal"
    assert view.cloud.private_name("172.16.0.11") == "ip-172-16-0-11.compute.internal"
    assert view.cloud.public_name("10.111.200.1") == "ec2-10-111-200-1.compute.cloud.example"
    custom = GniOptions(version="5", dns_domain="cloud.example", instance_subdomain=".vm", private_prefix="int-",
                        public_prefix="pub-")
    view = decode_gni(fixture_bytes("gni-edge.xml"), custom)
    assert view.cloud.private_name("172.16.0.11") == "int-172-16-0-11.vm.internal"
    assert view.cloud.public_name("10.111.200.1") == "pub-10-111-200-1.vm.cloud.example"


def test_4x_names() -> None:
    """4.x: ``VmInstances.dnsName`` hard-codes ``euca-``; INSTANCE_SUBDOMAIN defaults to ``.eucalyptus``."""
    view = decode_gni(fixture_bytes("gni-edge.xml"), dataclasses.replace(OPTIONS, private_prefix="x-"))
    assert view.cloud.private_name("172.16.0.11") == "euca-172-16-0-11.eucalyptus.internal"
    assert view.cloud.public_name("10.111.200.1") == "euca-10-111-200-1.eucalyptus.cloud.example"


def test_intip_map_identifies_interfaces_by_their_internal_address() -> None:
    data = bundle(fixture_bytes("gni-vpc.xml"), fixture_bytes("eucanetd_intip_eni_map") + b"garbage line\n")
    assert is_gni(data)
    view = decode_gni(data, OPTIONS)
    assert view.version.startswith("9e41d7a0+")
    from edge.view.snapshot import build_snapshot
    snapshot = build_snapshot(view)
    assert snapshot.attachment_for("", "255.0.0.10").interface.id == "eni-00000001"
    assert snapshot.attachment_for("", "255.0.0.11").interface.id == "eni-00000011"
    assert snapshot.attachment_for("", "255.0.0.20").instance.id == "i-00000002"  # mapped by instance id
    assert snapshot.attachment_for("", "255.0.0.30").instance.id == "i-00000003"
    assert "255.0.0.10" not in str(sorted(snapshot.names))  # metadata addresses get no names


@pytest.mark.parametrize("document, message", [
    (b"<network-data><instances>", "not well-formed"),
    (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;&a;">]>'
     b"<network-data>&b;</network-data>", "hardened XML parser"),
    (b"<other-root/>", "root element must be <network-data>"),
    (b'<network-data version="1"><instances><instance name="i-1"><macAddress>zz</macAddress>'
     b"<privateIp>10.0.0.1</privateIp></instance></instances></network-data>", "GNI mode must be EDGE or VPCMIDO"),
    (fixture_bytes("gni-edge.xml").replace(b"<macAddress>d0:0d:ab:6b:40:9c</macAddress>",
                                           b"<macAddress>zz</macAddress>"), "not a MAC address"),
])
def test_bad_gni_documents_are_rejected(document: bytes, message: str) -> None:
    with pytest.raises(ViewInvalid) as caught:
        decode_gni(document, OPTIONS)
    assert message in str(caught.value.problems)


def test_auto_detection_by_content() -> None:
    config = Config(eucalyptus=EucalyptusConfig(dns_domain="cloud.example"))
    decode = make_decoder(config, adapters().formats)
    assert not decode(fixture_bytes("gni-edge.xml")).ordered
    import json

    from edge.view.demo import demo_document
    assert decode(json.dumps(demo_document()).encode()).ordered


def test_poller_picks_up_a_changed_version_and_the_map(tmp_path) -> None:
    gni_path, map_path = tmp_path / "global_network_info.xml", tmp_path / "eucanetd_intip_eni_map"
    gni_path.write_bytes(fixture_bytes("gni-vpc.xml"))
    config = Config(view=ViewConfig(state_dir=str(tmp_path / "state"), poll_interval=0.05),
                    eucalyptus=EucalyptusConfig(dns_domain="cloud.example", intip_map_file=str(map_path)))
    source = GniWithIntipMap(FileSource(str(gni_path), 1 << 20), str(map_path), 1 << 20)
    store = ViewStore(source.description)
    poller = Poller(config.view, source, store, None, decode=make_decoder(config, adapters().formats))

    def replace_file(path, data: bytes) -> None:
        temporary = f"{path}.tmp"
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)

    async def scenario():
        assert (await poller.poll_once()).result == "accepted"
        assert store.current.attachment_for("", "255.0.0.10") is None  # no map yet
        assert (await poller.poll_once()).result == "unchanged"
        replace_file(map_path, fixture_bytes("eucanetd_intip_eni_map"))
        assert (await poller.poll_once()).result == "accepted"
        assert store.current.attachment_for("", "255.0.0.10").interface.id == "eni-00000001"
        changed = fixture_bytes("gni-vpc.xml").replace(b'version="9e41d7a0"', b'version="0badc0de"')
        changed = changed.replace(b"<privateIp>10.0.0.20</privateIp>", b"<privateIp>10.0.0.21</privateIp>")
        replace_file(gni_path, changed)
        assert (await poller.poll_once()).result == "accepted"
        assert store.current.view.version.startswith("0badc0de")
        assert store.current.attachment_for("vpc-00000001", "10.0.0.21").instance.id == "i-00000002"
        # A different hash is a new view whatever it says: no serial order to go back against.
        replace_file(gni_path, fixture_bytes("gni-vpc.xml"))
        assert (await poller.poll_once()).result == "accepted"
        assert store.current.view.version.startswith("9e41d7a0")

    uvloop.run(scenario())


def test_view_check_reads_a_gni(tmp_path) -> None:
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "edge", "view", "check", str(FIXTURES / "gni-vpc.xml")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "version     9e41d7a0" in result.stdout and "instances   3" in result.stdout


def test_a_torn_intip_map_line_costs_that_line_is_logged_and_counted(tmp_path, caplog) -> None:
    gni_path, map_path = tmp_path / "global_network_info.xml", tmp_path / "eucanetd_intip_eni_map"
    gni_path.write_bytes(fixture_bytes("gni-vpc.xml"))
    # eucanetd rewrites the map in place: a reader may see half a line.
    map_path.write_bytes(fixture_bytes("eucanetd_intip_eni_map") + b"255.0.0.4")
    config = Config(view=ViewConfig(state_dir=str(tmp_path / "state")),
                    eucalyptus=EucalyptusConfig(dns_domain="cloud.example", intip_map_file=str(map_path)))
    source = adapters().sources.configured(dataclasses.replace(config, view=dataclasses.replace(
        config.view, source=str(gni_path))))
    store = ViewStore(source.description)
    poller = Poller(config.view, source, store, None, decode=make_decoder(config, adapters().formats))

    async def scenario():
        with caplog.at_level("WARNING", logger="edge.eucalyptus"):
            assert (await poller.poll_once()).result == "accepted"
        assert store.current.attachment_for("", "255.0.0.10").interface.id == "eni-00000001"
        assert store.status.source_events == {"intip_lines_ignored": 1}
        assert any("intip map line ignored" in r.getMessage() and "line 5" in r.getMessage()
                   for r in caplog.records)

    uvloop.run(scenario())
