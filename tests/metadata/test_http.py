"""The wire contract over real loopback sockets: exact bytes, headers and status codes."""

from __future__ import annotations

import re
import socket
import time

import pytest
from imds_harness import add_instance, connect, demo, exchange, make_config, parse, read_all, request, token

from edge.metadata.responses import NOT_FOUND_PAGE
from edge.metadata.tree import VERSIONS

I1 = "i-0de0000000000001"


def statuses_of(raw: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) [A-Z]", raw)]


def test_version_listing_exact_bytes(server):
    raw = request(server.port, "GET", "/")
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.split(b"\r\n") == [b"HTTP/1.1 200 OK", b"Server: EC2ws", b"Content-Type: text/plain",
                                   b"Content-Length: %d" % len(body), b"Connection: close"]
    assert body == "\n".join(VERSIONS).encode()
    assert body.endswith(b"latest") and b"2009-04-04\n" in body


def test_every_dated_version_answers(server):
    for version in VERSIONS:
        status, _, body = parse(request(server.port, "GET", f"/{version}/meta-data/instance-id"))
        assert (status, body) == (200, I1.encode()), version
    assert parse(request(server.port, "GET", "/2099-01-01/meta-data/instance-id"))[0] == 404


def test_version_root_lists_user_data_only_when_present(server):
    assert parse(request(server.port, "GET", "/latest/"))[2] == b"dynamic\nmeta-data\nuser-data"
    assert parse(request(server.port, "GET", "/latest/", source="127.0.0.2"))[2] == b"dynamic\nmeta-data"
    assert parse(request(server.port, "GET", "/latest/user-data", source="127.0.0.2"))[0] == 404


def test_meta_data_listing_format(server):
    status, headers, body = parse(request(server.port, "GET", "/latest/meta-data/"))
    assert status == 200 and headers["content-type"] == "text/plain"
    lines = body.split(b"\n")
    assert not body.endswith(b"\n")
    assert lines == sorted(lines)
    for directory in (b"block-device-mapping/", b"iam/", b"network/", b"placement/", b"public-keys/", b"services/"):
        assert directory in lines
    for leaf in (b"ami-id", b"instance-id", b"local-ipv4", b"mac", b"public-ipv4", b"hostname"):
        assert leaf in lines
    # 127.0.0.2 has no IAM profile and 127.0.0.4 no public address: absent, and 404.
    assert b"iam/" not in parse(request(server.port, "GET", "/latest/meta-data/", source="127.0.0.2"))[2]
    assert parse(request(server.port, "GET", "/latest/meta-data/public-ipv4", source="127.0.0.4"))[0] == 404


def test_leaves(server):
    def get(path, source="127.0.0.1"):
        status, _, body = parse(request(server.port, "GET", "/latest/meta-data/" + path, source=source))
        assert status == 200, path
        return body.decode()

    assert get("instance-id") == I1
    assert get("local-ipv4") == "127.0.0.1"
    assert get("public-ipv4") == "198.51.100.1"
    assert get("local-hostname") == get("hostname") == "ip-127-0-0-1.demo.internal"
    assert get("public-hostname") == "ec2-198-51-100-1.demo.example"
    assert get("placement/availability-zone") == "demo-1a"
    assert get("placement/region") == "demo-1"
    assert get("services/domain") == "amazonaws.com"
    assert get("services/partition") == "aws"
    assert get("block-device-mapping/") == "ami\nephemeral0\nroot"
    assert get("block-device-mapping/ephemeral0") == "sdb"
    assert get("ami-launch-index") == "0"
    assert get("security-groups") == "default"
    assert get("events/maintenance/scheduled") == "[]"
    assert get("public-keys/") == "0=demo"
    assert get("public-keys/0/") == "openssh-key"
    assert get("public-keys/0/openssh-key").startswith("ssh-ed25519 ")
    assert get("tags/instance") == "Name"
    assert get("tags/instance/Name") == "demo-1"
    mac = get("mac")
    assert get("network/interfaces/macs/") == mac + "/"
    listing = get(f"network/interfaces/macs/{mac}/").split("\n")
    assert "ipv4-associations/" in listing and "local-ipv4s" in listing and "subnet-id" in listing
    assert get(f"network/interfaces/macs/{mac}/ipv4-associations/198.51.100.1") == "127.0.0.1"
    assert get(f"network/interfaces/macs/{mac}/subnet-ipv4-cidr-block") == "127.0.0.0/8"
    assert get(f"network/interfaces/macs/{mac}/security-group-ids") == "sg-0de00001"
    assert get("iam/security-credentials/") == "demo-role"
    assert get("instance-id", source="127.0.0.4") == "i-0de0000000000004"


def test_iam_info_and_vpc_fields(server):
    _, _, body = parse(request(server.port, "GET", "/latest/meta-data/iam/info"))
    assert b'"InstanceProfileArn" : "arn:aws:iam::000123456789:instance-profile/demo-role"' in body
    assert b'"Code" : "Success"' in body


def test_tags_absent_unless_enabled(start):
    server = start(demo(**{"i-0de0000000000002": {"metadata_options": {"tags": False}}}))
    assert parse(request(server.port, "GET", "/latest/meta-data/tags/instance", source="127.0.0.2"))[0] == 404
    assert parse(request(server.port, "GET", "/latest/meta-data/tags/instance"))[0] == 200


def test_user_data_is_binary(server):
    status, headers, body = parse(request(server.port, "GET", "/latest/user-data"))
    assert status == 200
    assert headers["content-type"] == "application/octet-stream"
    assert body == b"#cloud-config\nhostname: demo-1\n"


def test_slash_tolerance(server):
    expected = parse(request(server.port, "GET", "/latest/meta-data/placement/availability-zone"))[2]
    for path in ("/latest/meta-data/placement/availability-zone/", "/latest//meta-data//placement/availability-zone",
                 "//latest/meta-data/placement/availability-zone?x=1"):
        assert parse(request(server.port, "GET", path))[2] == expected, path
    assert parse(request(server.port, "GET", "/latest/meta-data/placement"))[2] == b"availability-zone\nregion"
    assert parse(request(server.port, "GET", "/latest//meta-data/ramdisk-id"))[0] == 404


def test_not_found_page(server):
    raw = request(server.port, "GET", "/latest/meta-data/nothing-here")
    status, headers, body = parse(raw)
    assert status == 404
    assert raw.startswith(b"HTTP/1.1 404 Not Found\r\nServer: EC2ws\r\nContent-Type: text/html\r\n")
    assert body == NOT_FOUND_PAGE and b"<title>404 - Not Found</title>" in body
    assert headers["content-length"] == str(len(body))


def test_head(server):
    raw = request(server.port, "HEAD", "/latest/meta-data/instance-id")
    status, headers, body = parse(raw)
    assert status == 200 and headers["content-length"] == str(len(I1)) and body == b""


def test_token_put_and_use(server):
    raw = request(server.port, "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
    status, headers, body = parse(raw)
    assert status == 200
    assert headers["x-aws-ec2-metadata-token-ttl-seconds"] == "21600"
    assert headers["server"] == "EC2ws" and headers["connection"] == "close"
    value = body.decode()
    assert len(value) == 56 and value.replace("-", "").replace("_", "").isalnum()
    status, headers, body = parse(request(server.port, "GET", "/latest/meta-data/instance-id",
                                          {"X-aws-ec2-metadata-token": value}))
    assert (status, body) == (200, I1.encode())
    assert 21590 < int(headers["x-aws-ec2-metadata-token-ttl-seconds"]) <= 21600


def test_token_ttl_validation(server):
    for ttl in (None, "0", "21601", "abc", "-5", "1.5", ""):
        headers = {} if ttl is None else {"X-aws-ec2-metadata-token-ttl-seconds": ttl}
        raw = request(server.port, "PUT", "/latest/api/token", headers)
        assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n"), ttl
        assert parse(raw)[1]["content-length"] == "0"
    for ttl in ("1", "21600"):
        assert parse(request(server.port, "PUT", "/latest/api/token",
                             {"X-aws-ec2-metadata-token-ttl-seconds": ttl}))[0] == 200


def test_token_put_refusals(server):
    ttl = {"X-aws-ec2-metadata-token-ttl-seconds": "60"}
    raw = request(server.port, "PUT", "/latest/api/token", {**ttl, "X-Forwarded-For": "127.0.0.1"})
    assert raw == b"HTTP/1.1 403 Forbidden\r\nServer: EC2ws\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    assert parse(request(server.port, "PUT", "/2021-03-23/api/token", ttl))[0] == 403
    raw = request(server.port, "GET", "/latest/api/token")
    assert raw == (b"HTTP/1.1 405 Method Not Allowed\r\nServer: EC2ws\r\nAllow: OPTIONS, PUT\r\n"
                   b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    status, headers, _ = parse(request(server.port, "POST", "/latest/meta-data/"))
    assert status == 405 and headers["allow"] == "GET, HEAD"


def test_every_other_method_on_the_token_path_names_options_and_put(server):
    for method in ("GET", "HEAD", "POST", "DELETE", "PATCH", "TRACE"):
        raw = request(server.port, method, "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        assert raw.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n"), method
        assert parse(raw)[1]["allow"] == "OPTIONS, PUT", method
    status, headers, _ = parse(request(server.port, "OPTIONS", "/latest/api/token"))
    assert status == 200 and headers["allow"] == "OPTIONS, PUT"
    for method in ("POST", "PUT", "OPTIONS", "DELETE"):
        status, headers, _ = parse(request(server.port, method, "/latest/meta-data/"))
        assert status == 405 and headers["allow"] == "GET, HEAD", method


def test_the_token_path_is_the_same_path_for_every_method(server):
    """A spelling of the token path is normalised once, the same way for every method: wherever PUT
    issues a token, GET is refused with 405 rather than looked up as a metadata path (404)."""
    ttl = {"X-aws-ec2-metadata-token-ttl-seconds": "60"}
    for path in ("/latest/api/token", "//latest//api//token", "/latest/api/%74oken", "/%6catest/api/token/",
                 "/latest/api/token?x=1", "http://169.254.169.254/latest/api/token"):
        assert parse(request(server.port, "PUT", path, ttl))[0] == 200, path
        status, headers, _ = parse(request(server.port, "GET", path))
        assert (status, headers.get("allow")) == (405, "OPTIONS, PUT"), path
        assert parse(request(server.port, "OPTIONS", path))[0] == 200, path
    for path in ("//2021-03-23//api//token", "/2021-03-23/api/%74oken"):
        assert parse(request(server.port, "PUT", path, ttl))[0] == 403, path
        assert parse(request(server.port, "GET", path))[0] == 405, path
    for path in ("/latest/api/tokens", "/latest/api/Token", "/latest/api/token/x", "/latest/api/%2e%2e/token"):
        assert parse(request(server.port, "PUT", path, ttl))[0] == 405, path
        assert parse(request(server.port, "GET", path))[0] == 404, path


def test_token_lifetime_sent_twice_is_400_whatever_the_values(server):
    for first, second in (("60", "60"), ("60", "120"), ("abc", "60"), ("60", "")):
        raw = exchange(server.port, ("PUT /latest/api/token HTTP/1.1\r\nHost: x\r\n"
                                     f"X-aws-ec2-metadata-token-ttl-seconds: {first}\r\n"
                                     f"x-aws-ec2-metadata-token-ttl-seconds: {second}\r\n"
                                     "Connection: close\r\n\r\n").encode())
        assert statuses_of(raw) == [400], (first, second)
    # The next request on the connection starts afresh.
    raw = exchange(server.port, b"PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n"
                                b"X-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n"
                                b"PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n")
    assert statuses_of(raw) == [400, 200]


def test_token_sent_twice_is_refused(server):
    value = token(server.port)
    get = "GET /latest/meta-data/instance-id HTTP/1.1\r\nX-aws-ec2-metadata-token: {}\r\n"
    raw = exchange(server.port, (get.format(value) + f"X-aws-ec2-metadata-token: {value}\r\n"
                                 "Connection: close\r\n\r\n").encode())
    assert statuses_of(raw) == [401]
    raw = exchange(server.port, (get.format(value) + get.format(value).split("\r\n")[1] + "\r\n"
                                 + "Connection: close\r\n\r\n").encode())
    assert statuses_of(raw) == [401]
    # Then one token header on the same kind of request is served.
    raw = exchange(server.port, (get.format(value) + "Connection: close\r\n\r\n").encode())
    assert statuses_of(raw) == [200]


def test_token_lifetime_spellings(server):
    """What AWS takes (see test_tokens.test_parse_ttl): surrounding spaces are HTTP's optional
    whitespace and leading zeros still make a decimal number; anything else is 400."""
    for ttl, status in (("60", 200), ("  60  ", 200), ("\t60", 200), ("0060", 200), ("021600", 200),
                        ("+60", 400), ("6 0", 400), ("021601", 400), ("0", 400)):
        raw = exchange(server.port, ("PUT /latest/api/token HTTP/1.1\r\n"
                                     f"X-aws-ec2-metadata-token-ttl-seconds:{ttl}\r\nConnection: close\r\n\r\n")
                       .encode())
        assert statuses_of(raw) == [status], ttl
        if status == 200:
            assert parse(raw)[1]["x-aws-ec2-metadata-token-ttl-seconds"] == str(int(ttl.strip()))


@pytest.mark.parametrize("upgrade", [
    "Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
    "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\n",
])
def test_a_protocol_upgrade_gets_one_plain_answer_and_the_connection_closes(server, upgrade):
    # What follows the request (an HTTP/2 preface, or anything) is never parsed nor answered.
    after = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"GET /latest/meta-data/ HTTP/1.1\r\n\r\n"
    with connect(server.port) as sock:
        sock.sendall(f"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n{upgrade}\r\n".encode() + after)
        raw = read_all(sock)
    assert statuses_of(raw) == [200]
    status, headers, body = parse(raw)
    assert headers["connection"] == "close" and body == I1.encode()
    assert len(raw) == raw.index(b"\r\n\r\n") + 4 + len(I1)
    # CONNECT switches protocols too: one 405, nothing else, and the connection closes.
    with connect(server.port) as sock:
        sock.sendall(b"CONNECT 169.254.169.254:80 HTTP/1.1\r\nHost: x\r\n\r\n" + after)
        raw = read_all(sock)
    assert statuses_of(raw) == [405] and parse(raw)[1]["connection"] == "close"
    assert parse(request(server.port, "GET", "/latest/meta-data/instance-id"))[0] == 200


def test_tokens_required_instance(server):
    source = "127.0.0.3"
    raw = request(server.port, "GET", "/latest/meta-data/instance-id", source=source)
    assert raw == b"HTTP/1.1 401 Unauthorized\r\nServer: EC2ws\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    value = token(server.port, source=source)
    status, _, body = parse(request(server.port, "GET", "/latest/meta-data/instance-id",
                                    {"X-aws-ec2-metadata-token": value}, source))
    assert (status, body) == (200, b"i-0de0000000000003")
    for bad in ("garbage", value[:-1] + ("A" if value[-1] != "A" else "B"), "x" * 56):
        assert parse(request(server.port, "GET", "/latest/meta-data/instance-id",
                             {"X-aws-ec2-metadata-token": bad}, source))[0] == 401


def test_optional_instance_rejects_invalid_token(server):
    assert parse(request(server.port, "GET", "/latest/meta-data/instance-id"))[0] == 200
    assert parse(request(server.port, "GET", "/latest/meta-data/instance-id",
                         {"X-aws-ec2-metadata-token": "not-a-token"}))[0] == 401


def test_token_bound_to_instance(server):
    foreign = token(server.port, source="127.0.0.2")
    assert parse(request(server.port, "GET", "/latest/meta-data/instance-id",
                         {"X-aws-ec2-metadata-token": foreign}))[0] == 401
    assert parse(request(server.port, "GET", "/latest/meta-data/instance-id",
                         {"X-aws-ec2-metadata-token": foreign}, "127.0.0.2"))[0] == 200
    # Once verified (and remembered) for its owner it is still refused to anyone else.
    assert parse(request(server.port, "GET", "/latest/meta-data/instance-id",
                         {"X-aws-ec2-metadata-token": foreign}))[0] == 401


def test_token_expires(server):
    value = token(server.port, ttl=1)
    assert parse(request(server.port, "GET", "/latest/meta-data/instance-id",
                         {"X-aws-ec2-metadata-token": value}))[0] == 200
    time.sleep(2.05)
    assert parse(request(server.port, "GET", "/latest/meta-data/instance-id",
                         {"X-aws-ec2-metadata-token": value}))[0] == 401


def test_endpoint_disabled_is_403_for_everything(start):
    server = start(demo(**{"i-0de0000000000004": {"metadata_options": {"endpoint": "disabled"}}}))
    for method, path, headers in (("GET", "/latest/meta-data/", {}), ("GET", "/latest/user-data", {}),
                                  ("PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "5"})):
        raw = request(server.port, method, path, headers, source="127.0.0.4")
        assert raw.startswith(b"HTTP/1.1 403 Forbidden\r\n"), (method, path)
        assert parse(raw)[2] == b""


def test_unknown_source_is_404_after_wait(start):
    server = start(unknown_source_wait=0.2)
    begun = time.monotonic()
    assert parse(request(server.port, "GET", "/latest/meta-data/instance-id", source="127.0.9.9"))[0] == 404
    assert time.monotonic() - begun < 5
    assert server.refreshes >= 1


def test_listener_network_selects_instances(start):
    from edge.config import Listen
    server = start(listen=(Listen("127.0.0.1", 0), Listen("127.0.0.1", 0, "vpc-demo")))
    flat, vpc = server.ports
    assert parse(request(flat, "GET", "/latest/meta-data/instance-id"))[2] == I1.encode()
    assert parse(request(vpc, "GET", "/latest/meta-data/instance-id"))[2] == b"i-0de1000000000001"
    mac = parse(request(vpc, "GET", "/latest/meta-data/mac"))[2].decode()
    assert parse(request(vpc, "GET", f"/latest/meta-data/network/interfaces/macs/{mac}/vpc-id"))[2] == b"vpc-demo"


def test_trusted_proxy_headers(start):
    server = start(trusted_proxies=("127.0.0.100/32",))
    path = "/latest/meta-data/instance-id"
    # From the proxy: X-Forwarded-For names the instance, the network header the network.
    assert parse(request(server.port, "GET", path, {"X-Forwarded-For": "127.0.0.2"}, "127.0.0.100"))[2] == \
        b"i-0de0000000000002"
    assert parse(request(server.port, "GET", path, {"X-Forwarded-For": "127.0.0.2",
                                                    "X-Neutron-Network-ID": "vpc-demo"}, "127.0.0.100"))[2] == \
        b"i-0de1000000000002"
    assert parse(request(server.port, "GET", path, {"X-Forwarded-For": "10.9.9.9, 127.0.0.1",
                                                    "X-Edge-Network-Id": "vpc-demo"}, "127.0.0.100"))[2] == \
        b"i-0de1000000000001"
    # A proxy may fetch tokens on behalf of the instance.
    proxied = parse(request(server.port, "PUT", "/latest/api/token", {
        "X-Forwarded-For": "127.0.0.3", "X-aws-ec2-metadata-token-ttl-seconds": "60"}, "127.0.0.100"))
    assert proxied[0] == 200
    # From anyone else the headers change nothing.
    assert parse(request(server.port, "GET", path, {"X-Forwarded-For": "127.0.0.2",
                                                    "X-Edge-Network-Id": "vpc-demo"}, "127.0.0.4"))[2] == \
        b"i-0de0000000000004"
    assert parse(request(server.port, "PUT", "/latest/api/token", {
        "X-Forwarded-For": "127.0.0.4", "X-aws-ec2-metadata-token-ttl-seconds": "60"}, "127.0.0.4"))[0] == 403


def test_keep_alive_and_pipelining_in_order(server):
    paths = ["/latest/meta-data/instance-id", "/latest/meta-data/nothing", "/latest/meta-data/local-ipv4",
             "/", "/latest/meta-data/mac"]
    data = b"".join(f"GET {p} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for p in paths)
    data += b"GET /latest/meta-data/ami-id HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    raw = exchange(server.port, data)
    statuses = statuses_of(raw)
    assert statuses == [200, 404, 200, 200, 200, 200]
    assert raw.index(I1.encode()) < raw.index(b"404 - Not Found") < raw.index(b"127.0.0.1") < raw.index(b"emi-0de")
    assert raw.count(b"Connection: close") == 1


def test_keep_alive_connection_serves_many_requests(server):
    with connect(server.port) as sock:
        for _ in range(20):
            sock.sendall(b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n")
            expected = (b"HTTP/1.1 200 OK\r\nServer: EC2ws\r\nContent-Type: text/plain\r\nContent-Length: 18\r\n\r\n"
                        + I1.encode())
            got = b""
            while len(got) < len(expected):
                got += sock.recv(4096)
            assert got == expected


def test_malformed_request_is_400_and_closed(server):
    raw = exchange(server.port, b"GARBAGE\x00\x01 / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n")
    assert raw == b"HTTP/1.1 400 Bad Request\r\nServer: EC2ws\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def test_url_too_long_is_414(server):
    raw = exchange(server.port, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw == b"HTTP/1.1 414 URI Too Long\r\nServer: EC2ws\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def test_header_block_too_large_is_431(server):
    headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 1000) for i in range(20))
    raw = exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert raw == (b"HTTP/1.1 431 Request Header Fields Too Large\r\nServer: EC2ws\r\nContent-Length: 0\r\n"
                   b"Connection: close\r\n\r\n")
    # One endless header line is cut off too, without waiting for its end.
    with connect(server.port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nX-Long: ")
        try:
            for _ in range(100):
                sock.sendall(b"v" * 4096)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert read_all(sock).startswith(b"HTTP/1.1 431 ")


def test_body_too_large_is_413(server):
    raw = exchange(server.port, b"PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
                   + b"x" * 100000)
    assert raw == b"HTTP/1.1 413 Payload Too Large\r\nServer: EC2ws\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def test_slow_client_is_closed(start):
    server = start(header_timeout=0.3)
    with connect(server.port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost")
        begun = time.monotonic()
        assert read_all(sock) == b""
        assert time.monotonic() - begun < 3
    # An idle keep-alive connection is closed after the same time.
    with connect(server.port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 200 OK")
    assert server.service.timeouts >= 2


def test_connection_caps(start):
    server = start(max_connections_per_source=3, max_connections=5)
    held = [connect(server.port, "127.0.0.1") for _ in range(3)]
    try:
        time.sleep(0.1)
        refused = exchange(server.port, b"GET / HTTP/1.1\r\n\r\n", "127.0.0.1")
        assert refused == (b"HTTP/1.1 429 Too Many Requests\r\nServer: EC2ws\r\nContent-Length: 0\r\n"
                           b"Connection: close\r\n\r\n")
        # Another source still gets in, up to the total cap.
        assert parse(request(server.port, "GET", "/latest/meta-data/instance-id", source="127.0.0.2"))[0] == 200
        held += [connect(server.port, "127.0.0.2") for _ in range(2)]
        time.sleep(0.1)
        assert exchange(server.port, b"GET / HTTP/1.1\r\n\r\n", "127.0.0.4").startswith(b"HTTP/1.1 429 ")
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    assert parse(request(server.port, "GET", "/latest/meta-data/instance-id"))[0] == 200
    assert server.call(lambda: len(server.service.per_source)) == 0


def test_connections_are_counted_out_however_they_end(start):
    server = start(max_connections_per_source=4, max_connections=8)
    for _ in range(50):
        assert parse(request(server.port, "GET", "/latest/meta-data/instance-id"))[0] == 200
    with connect(server.port) as sock:  # several answers on one connection, then the client closes
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
        while len(statuses_of(sock.recv(65536))) < 1:
            pass
    assert exchange(server.port, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    held = [connect(server.port) for _ in range(4)]
    try:
        time.sleep(0.1)
        assert exchange(server.port, b"GET / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 429 ")
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    assert server.call(lambda: (len(server.service.connections), server.service.per_source)) == (0, {})
    # The cap still counts from zero: four at once are let in again.
    held = [connect(server.port) for _ in range(4)]
    try:
        for sock in held:
            sock.sendall(b"GET /latest/meta-data/instance-id HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert [parse(read_all(sock))[0] for sock in held] == [200] * 4
    finally:
        for sock in held:
            sock.close()


def test_each_connection_is_identified_in_the_current_view(start):
    server = start(unknown_source_wait=0.2)
    path = "/latest/meta-data/instance-id"
    assert parse(request(server.port, "GET", path, source="127.0.0.5"))[0] == 404
    server.swap(add_instance(demo(), 5, "127.0.0.5"))
    assert parse(request(server.port, "GET", path, source="127.0.0.5"))[2] == b"i-0ad0000000000005"
    server.swap(demo())
    assert parse(request(server.port, "GET", path, source="127.0.0.5"))[0] == 404


def test_same_source_on_listeners_of_two_networks(start):
    from edge.config import Listen
    server = start(listen=(Listen("127.0.0.1", 0), Listen("127.0.0.1", 0, "vpc-demo")))
    flat, vpc = server.ports
    path = "/latest/meta-data/instance-id"
    for _ in range(3):
        assert parse(request(flat, "GET", path))[2] == I1.encode()
        assert parse(request(vpc, "GET", path))[2] == b"i-0de1000000000001"


def test_remembered_sources_are_bounded(start, monkeypatch):
    import edge.metadata.protocol
    monkeypatch.setattr(edge.metadata.protocol, "PEERS_REMEMBERED", 3)
    server = start(unknown_source_wait=0.1)
    path = "/latest/meta-data/instance-id"
    expected = {"127.0.0.1": 200, "127.0.0.2": 200, "127.0.0.3": 401, "127.0.0.4": 200, "127.0.9.9": 404}
    for _ in range(2):
        assert {source: parse(request(server.port, "GET", path, source=source))[0] for source in expected} == expected
    assert server.call(lambda: list(server.service.peers)) == ["127.0.0.3", "127.0.0.4", "127.0.9.9"]


def test_reload_decides_anew_who_is_a_trusted_proxy(start, tmp_path):
    server = start(unknown_source_wait=0.2)
    path = "/latest/meta-data/instance-id"
    forwarded = {"X-Forwarded-For": "127.0.0.2"}
    assert parse(request(server.port, "GET", path, forwarded, "127.0.0.100"))[0] == 404
    with connect(server.port, "127.0.0.100") as held:  # opened before the reload: keeps its old standing
        while server.call(lambda: len(server.service.connections)) == 0:
            time.sleep(0.01)
        trusting = make_config(tmp_path, unknown_source_wait=0.2, trusted_proxies=("127.0.0.100/32",))
        server.call(lambda: server.service.reload(trusting))
        assert parse(request(server.port, "GET", path, forwarded, "127.0.0.100"))[2] == b"i-0de0000000000002"
        held.sendall(b"GET /latest/meta-data/instance-id HTTP/1.1\r\nX-Forwarded-For: 127.0.0.2\r\n"
                     b"Connection: close\r\n\r\n")
        assert parse(read_all(held))[0] == 404
    server.call(lambda: server.service.reload(make_config(tmp_path, unknown_source_wait=0.2)))
    assert parse(request(server.port, "GET", path, forwarded, "127.0.0.100"))[0] == 404
    assert parse(request(server.port, "GET", path, source="127.0.0.2"))[2] == b"i-0de0000000000002"


def test_rate_limit_per_instance(start):
    server = start(rate=1.0, burst=5)
    data = b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n" * 8
    raw = exchange(server.port, data + b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
    statuses = statuses_of(raw)
    assert statuses[:5] == [200] * 5 and statuses[5:] == [429] * 4
    assert raw.count(b"HTTP/1.1 429 Too Many Requests\r\nServer: EC2ws\r\nContent-Length: 0\r\n") == 4
    # Other instances have their own bucket.
    assert parse(request(server.port, "GET", "/latest/meta-data/instance-id", source="127.0.0.2"))[0] == 200


def test_server_keeps_serving_after_abuse(server):
    for payload in (b"\xff" * 100, b"GET / HTTP/9.9\r\n\r\n", b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                    b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", b"\r\n\r\n"):
        with connect(server.port) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            read_all(sock)
    assert parse(request(server.port, "GET", "/latest/meta-data/instance-id"))[0] == 200


def test_ipv6_listener(start):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    from edge.config import Listen
    document = demo(**{"i-0de0000000000004": {}})
    document["networks"][0]["cidrs"].append("::1/128")
    document["instances"][3]["interfaces"][0]["private_ips"] = ["127.0.0.4", "::1"]
    try:
        server = start(document, listen=(Listen("::1", 0),))
    except OSError as exc:
        pytest.skip(f"cannot listen on ::1: {exc}")
    with socket.create_connection(("::1", server.port), timeout=5) as sock:
        sock.sendall(b"PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 30\r\n\r\n")
        status, _, value = parse(read_all(sock))
    assert status == 200
    with socket.create_connection(("::1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /latest/meta-data/instance-id HTTP/1.1\r\nX-aws-ec2-metadata-token: " + value
                     + b"\r\nConnection: close\r\n\r\n")
        assert parse(read_all(sock))[2] == b"i-0de0000000000004"

