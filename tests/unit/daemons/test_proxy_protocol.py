"""The PROXY protocol parser, gate and policy (pure: bytes in, results out).

The ``HAPROXY_*`` constants are the bytes HAProxy 2.6.12 (Debian bookworm)
really sent to a capture listener, with these backend lines:

* ``send-proxy`` (v1) and ``send-proxy-v2``, frontends on 127.0.0.1 and ::1;
* ``send-proxy-v2 proxy-v2-options ssl,crc32c,unique-id,authority,ssl-cipher,
  cert-sig,cert-key`` behind ``bind ... ssl crt ... alpn h2,http/1.1``, the
  client ``openssl s_client -servername www.example.test -alpn http/1.1``;
* ``send-proxy-v2-ssl-cn proxy-v2-options crc32c`` behind ``verify optional``
  with a client certificate ``CN=alice client``;
* ``send-proxy-v2 check`` (the health check: a LOCAL header).

Each is followed by the first application bytes the client wrote.
"""

from __future__ import annotations

import contextlib
import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemons.codecs.proxy import (
    MAX_V1_BYTES,
    MAX_V2_TLV_BYTES,
    NEED_DATA,
    V2_SIGNATURE,
    Endpoint,
    ProxyGate,
    ProxyHeaderParser,
    ProxyPolicy,
    ProxyProtocolError,
    ProxyResult,
    crc32c,
    encode_v1,
    encode_v2,
)
from daemons.engine.trust import BadNetwork, TrustedNetworks
from ipc_core.errors import PeerClosed, ProtocolError, UsageError

HAPROXY_V1_TCP4 = bytes.fromhex(
    "50524f58592054435034203132372e302e302e31203132372e302e302e312034333234302031383434330d0a"
    "706f6e67"
)
HAPROXY_V1_TCP6 = bytes.fromhex(
    "50524f58592054435036203a3a31203a3a312034343138382031383434330d0a706f6e6736"
)
HAPROXY_V2_TCP4 = bytes.fromhex("0d0a0d0a000d0a515549540a2111000c7f0000017f000001cd6a480a706f6e67")
HAPROXY_V2_TCP6 = bytes.fromhex(
    "0d0a0d0a000d0a515549540a21210024000000000000000000000000000000010000000000000000000000"
    "0000000001935e480a706f6e6736"
)
HAPROXY_V2_TLS = bytes.fromhex(
    "0d0a0d0a000d0a515549540a2111009f7f0000017f0000019cca480903000414aa4284010008687474702f"
    "312e310200107777772e6578616d706c652e7465737405002937463030303030313a394343415f3746303030"
    "3030313a343830395f36423046453143465f3030303020003f0100000000210007544c5376312e3325000752"
    "5341323034382400" + "0a5253412d534841323536230016544c535f4145535f3235365f47434d5f5348413338"
    "3468656c6c6f2d746c73"
)
HAPROXY_V2_MTLS = bytes.fromhex(
    "0d0a0d0a000d0a515549540a211100347f0000017f000001ee10480c0300043a6e3cca20001e070000000021"
    "0007544c5376312e3322000c616c69636520636c69656e746869"
)
HAPROXY_V2_CHECK = bytes.fromhex("0d0a0d0a000d0a515549540a20000000")


def parse(data: bytes, **kwargs: int) -> ProxyResult:
    result = ProxyHeaderParser(**kwargs).feed(data)
    assert isinstance(result, ProxyResult)
    return result


def refused(data: bytes, match: str, **kwargs: int) -> None:
    with pytest.raises(ProxyProtocolError, match=match):
        ProxyHeaderParser(**kwargs).feed(data)


def feed_in_pieces(parser: ProxyHeaderParser | ProxyGate, data: bytes, cuts: list[int]):
    """Feed ``data`` split at ``cuts`` as a socket would deliver it; once a
    result comes, the pieces left belong to the next layer (added to rest)."""
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    for start, end in itertools.pairwise(bounds):
        result = parser.feed(data[start:end])
        if isinstance(result, ProxyResult):
            return ProxyResult(result.header, result.rest + data[end:])
    return NEED_DATA


# -- real HAProxy bytes --------------------------------------------------------


def test_haproxy_v1_tcp4():
    result = parse(HAPROXY_V1_TCP4)
    header = result.header
    assert header is not None
    assert (header.version, header.command, header.family) == (1, "PROXY", "inet")
    assert header.source == Endpoint("127.0.0.1", 43240)
    assert header.destination == Endpoint("127.0.0.1", 18443)
    assert result.rest == b"pong"


def test_haproxy_v1_tcp6():
    result = parse(HAPROXY_V1_TCP6)
    assert result.header is not None
    assert result.header.family == "inet6"
    assert result.header.source == Endpoint("::1", 44188)
    assert str(result.header.source) == "[::1]:44188"
    assert result.rest == b"pong6"


def test_haproxy_v2_tcp4_and_tcp6():
    four = parse(HAPROXY_V2_TCP4)
    assert four.header is not None
    assert four.header.version == 2
    assert four.header.source == Endpoint("127.0.0.1", 52586)
    assert four.header.destination == Endpoint("127.0.0.1", 18442)
    assert four.header.tlvs == ()
    assert four.rest == b"pong"
    six = parse(HAPROXY_V2_TCP6)
    assert six.header is not None
    assert six.header.family == "inet6"
    assert six.header.source == Endpoint("::1", 37726)
    assert six.rest == b"pong6"


def test_haproxy_v2_tls_tlvs_decoded_and_crc_verified():
    result = parse(HAPROXY_V2_TLS)
    header = result.header
    assert header is not None
    assert header.alpn == b"http/1.1"
    assert header.authority == "www.example.test"
    assert header.unique_id == b"7F000001:9CCA_7F000001:4809_6B0FE1CF_0000"
    assert [kind for kind, _ in header.tlvs] == [0x03, 0x01, 0x02, 0x05, 0x20]
    ssl = header.ssl
    assert ssl is not None
    assert ssl.tls and not ssl.has_certificate and not ssl.verified
    assert ssl.version == "TLSv1.3"
    assert ssl.cipher == "TLS_AES_256_GCM_SHA384"
    assert (ssl.sig_alg, ssl.key_alg) == ("RSA-SHA256", "RSA2048")
    assert result.rest == b"hello-tls"


def test_haproxy_v2_client_certificate_cn():
    header = parse(HAPROXY_V2_MTLS).header
    assert header is not None and header.ssl is not None
    assert header.ssl.common_name == "alice client"
    assert header.ssl.has_certificate and header.ssl.verified


def test_haproxy_health_check_is_local():
    result = parse(HAPROXY_V2_CHECK)
    assert result.header is not None
    assert result.header.command == "LOCAL"
    assert result.header.uses_real_endpoints
    assert result.rest == b""


def test_a_corrupted_crc_is_refused():
    data = bytearray(HAPROXY_V2_TLS)
    data[40] ^= 0x01  # inside the ALPN value: the CRC no longer matches
    refused(bytes(data), "CRC32C")


@pytest.mark.parametrize(
    "capture",
    [HAPROXY_V1_TCP4, HAPROXY_V1_TCP6, HAPROXY_V2_TCP6, HAPROXY_V2_TLS, HAPROXY_V2_MTLS],
)
def test_byte_at_a_time_gives_the_same_result(capture):
    whole = parse(capture)
    parser = ProxyHeaderParser()
    result = feed_in_pieces(parser, capture, list(range(len(capture))))
    assert result == whole
    assert parser.buffered == 0


# -- version 1 -----------------------------------------------------------------


def test_v1_unknown_short_and_long_forms():
    for line in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 65535 65535\r\n"):
        result = parse(line + b"rest")
        assert result.header is not None
        assert result.header.uses_real_endpoints and result.header.version == 1
        assert result.rest == b"rest"


def test_v1_longest_line_is_accepted_one_more_byte_is_not():
    six = ":".join(["ffff"] * 8)
    longest = f"PROXY UNKNOWN {six} {six} 65535 65535\r\n".encode()
    assert len(longest) == MAX_V1_BYTES
    assert parse(longest).header is not None
    refused(longest.replace(b"UNKNOWN", b"UNKNOWN "), "without CRLF in its first 107")


def test_v1_gives_up_at_107_bytes_without_waiting_for_more():
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY UNKNOWN " + b"x" * 90) is NEED_DATA
    with pytest.raises(ProxyProtocolError, match="without CRLF"):
        parser.feed(b"y" * 3)


def test_v1_ipv4_mapped_is_reported_as_ipv4():
    header = parse(b"PROXY TCP6 ::ffff:192.0.2.7 ::ffff:10.0.0.1 1 2\r\n").header
    assert header is not None
    assert header.source == Endpoint("192.0.2.7", 1)
    assert header.destination == Endpoint("10.0.0.1", 2)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"PROXY TCP4 192.0.2.007 10.0.0.1 1 2\r\n", "address"),
        (b"PROXY TCP4 192.0.2.256 10.0.0.1 1 2\r\n", "address"),
        (b"PROXY TCP4 192.0.2 10.0.0.1 1 2\r\n", "address"),
        (b"PROXY TCP4 ::1 ::1 1 2\r\n", "address"),
        (b"PROXY TCP6 192.0.2.7 10.0.0.1 1 2\r\n", "address"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "malformed"),
        (b"PROXY TCP4 192.0.2.7 10.0.0.1 01 2\r\n", "malformed"),
        (b"PROXY TCP4 192.0.2.7 10.0.0.1 1 65536\r\n", "over 65535"),
        (b"PROXY TCP4 192.0.2.7 10.0.0.1 1 -2\r\n", "malformed"),
        (b"PROXY TCP4  192.0.2.7 10.0.0.1 1 2\r\n", "malformed"),
        (b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2 \r\n", "malformed"),
        (b"PROXY TCP4 192.0.2.7 10.0.0.1 1\r\n", "malformed"),
        (b"PROXY tcp4 192.0.2.7 10.0.0.1 1 2\r\n", "unknown protocol"),
        (b"PROXY TCP5 192.0.2.7 10.0.0.1 1 2\r\n", "unknown protocol"),
        (b"PROXY UNKNOWNX\r\n", "malformed"),
        (b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2\n", "lone CR or LF"),
        (b"PROXY TCP4 192.0.2.7\r10.0.0.1 1 2\r\n", "lone CR or LF"),
        (b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2\r\r\n", "lone CR or LF"),
        ("PROXY TCP4 192.0.2.7 10.0.0.\u0661 1 2\r\n".encode(), "malformed"),  # Arabic 1
    ],
)
def test_v1_malformed_lines_are_refused(line, reason):
    refused(line, reason)


def test_v1_unknown_protocol_fails_before_the_line_ends():
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY TC") is NEED_DATA
    with pytest.raises(ProxyProtocolError, match="unknown protocol"):
        parser.feed(b"P9")


# -- not a header at all -------------------------------------------------------


@pytest.mark.parametrize(
    "first",
    [b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\x02\x00", b"pong", b"P\x00", b"\r\n\r\nGET"],
)
def test_a_trusted_source_without_a_header_is_refused_at_once(first):
    refused(first, "no PROXY protocol header")


def test_eof_before_and_inside_a_header():
    with pytest.raises(PeerClosed, match="before"):
        ProxyHeaderParser().feed(b"")
    parser = ProxyHeaderParser()
    assert parser.feed(HAPROXY_V2_TLS[:20]) is NEED_DATA
    with pytest.raises(PeerClosed, match="after 20 bytes"):
        parser.feed(b"")


def test_feeding_after_the_header_is_a_usage_error():
    parser = ProxyHeaderParser()
    parser.feed(HAPROXY_V2_TCP4)
    with pytest.raises(UsageError):
        parser.feed(b"more")


def test_errors_are_protocol_errors():
    assert issubclass(ProxyProtocolError, ProtocolError)


# -- version 2 -----------------------------------------------------------------


def v2(ver_cmd: int, fam: int, body: bytes) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", ver_cmd, fam, len(body)) + body


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


IP4_BLOCK = bytes([192, 0, 2, 7, 10, 0, 0, 1]) + struct.pack("!HH", 51000, 9000)


def test_v2_local_skips_whatever_block_it_carries():
    result = parse(v2(0x20, 0x11, IP4_BLOCK + b"\xff\xff") + b"next")
    assert result.header is not None
    assert result.header.command == "LOCAL" and result.header.tlvs == ()
    assert result.rest == b"next"


def test_v2_unspec_proxy_uses_real_endpoints_but_reads_tlvs():
    header = parse(v2(0x21, 0x00, tlv(0x02, b"example.test"))).header
    assert header is not None
    assert header.uses_real_endpoints and header.authority == "example.test"


def test_v2_udp_and_unix_families():
    udp = parse(v2(0x21, 0x12, IP4_BLOCK)).header
    assert udp is not None
    assert (udp.transport, udp.source) == ("dgram", Endpoint("192.0.2.7", 51000))
    src = b"/run/haproxy.sock".ljust(108, b"\x00")
    dst = (b"\x00abstract").ljust(108, b"\x00")
    unix = parse(v2(0x21, 0x31, src + dst)).header
    assert unix is not None
    assert unix.family == "unix"
    assert unix.source == Endpoint("/run/haproxy.sock", None)
    assert unix.destination == Endpoint("@abstract", None)
    assert str(unix.source) == "/run/haproxy.sock"


def test_v2_ipv4_mapped_source_is_reported_as_ipv4():
    mapped = bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 7])
    header = parse(v2(0x21, 0x21, mapped + bytes(15) + b"\x01" + b"\x00\x01\x00\x02")).header
    assert header is not None
    assert header.source == Endpoint("192.0.2.7", 1)
    assert header.destination == Endpoint("::1", 2)


def test_v2_tlvs_kept_raw_in_order_unknown_ones_too():
    tlvs = tlv(0xE1, b"custom") + tlv(0x04, b"") + tlv(0x30, b"blue") + tlv(0xF0, b"\x00")
    header = parse(v2(0x21, 0x11, IP4_BLOCK + tlvs)).header
    assert header is not None
    assert header.tlvs == ((0xE1, b"custom"), (0x04, b""), (0x30, b"blue"), (0xF0, b"\x00"))
    assert header.netns == "blue"


def test_v2_ssl_tlv_with_every_subtype():
    subs = (
        tlv(0x21, b"TLSv1.2")
        + tlv(0x22, "Zoë".encode())
        + tlv(0x23, b"ECDHE-RSA-AES128-GCM-SHA256")
        + tlv(0x24, b"RSA-SHA256")
        + tlv(0x25, b"RSA2048")
        + tlv(0x26, b"secp256r1")
        + tlv(0x27, b"rsa_pss_rsae_sha256")
        + tlv(0x28, b"\x30\x82DER")
        + tlv(0x99, b"future")
    )
    ssl = parse(v2(0x21, 0x11, IP4_BLOCK + tlv(0x20, b"\x05\x00\x00\x00\x01" + subs))).header
    assert ssl is not None and ssl.ssl is not None
    info = ssl.ssl
    assert info.tls and info.has_certificate and not info.verified  # verify = 1
    assert info.common_name == "Zoë"
    assert (info.group, info.sig_scheme) == ("secp256r1", "rsa_pss_rsae_sha256")
    assert info.client_cert == b"\x30\x82DER"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (v2(0x11, 0x11, IP4_BLOCK), "version 1"),
        (v2(0x22, 0x11, IP4_BLOCK), "unknown command 2"),
        (v2(0x21, 0x41, IP4_BLOCK), "family byte 0x41"),
        (v2(0x21, 0x10, IP4_BLOCK), "family byte 0x10"),
        (v2(0x21, 0x13, IP4_BLOCK), "family byte 0x13"),
        (v2(0x21, 0x11, IP4_BLOCK[:11]), "11 address bytes, inet needs 12"),
        (v2(0x21, 0x21, IP4_BLOCK), "inet6 needs 36"),
        (v2(0x21, 0x11, IP4_BLOCK + b"\x01\x00"), "inside a TLV header"),
        (v2(0x21, 0x11, IP4_BLOCK + b"\x01\x00\x05abc"), "overruns"),
        (v2(0x21, 0x11, IP4_BLOCK + tlv(1, b"h2") + tlv(1, b"h2")), "twice"),
        (v2(0x21, 0x11, IP4_BLOCK + tlv(2, b"\xff\xfe")), "not UTF-8"),
        (v2(0x21, 0x11, IP4_BLOCK + tlv(2, b"a\nb")), "control characters"),
        (v2(0x21, 0x11, IP4_BLOCK + tlv(2, b"a" * 256)), "authority of 256"),
        (v2(0x21, 0x11, IP4_BLOCK + tlv(5, b"u" * 129)), "unique id of 129"),
        (v2(0x21, 0x11, IP4_BLOCK + tlv(0x30, b"\xff")), "not printable"),
        (v2(0x21, 0x11, IP4_BLOCK + tlv(3, b"\x00\x00\x00")), "CRC32C TLV of 3"),
        (v2(0x21, 0x11, IP4_BLOCK + tlv(3, b"\x00\x00\x00\x00")), "fails its CRC32C"),
        (v2(0x21, 0x11, IP4_BLOCK + tlv(0x20, b"\x01\x00\x00")), "SSL TLV of 3"),
        (
            v2(0x21, 0x11, IP4_BLOCK + tlv(0x20, b"\x01" + bytes(4) + tlv(0x23, b"A") * 2)),
            "sub-TLV 0x23 twice",
        ),
        (
            v2(0x21, 0x11, IP4_BLOCK + tlv(0x20, b"\x01" + bytes(4) + tlv(0x28, b"A") * 2)),
            "certificate twice",
        ),
        (v2(0x21, 0x11, IP4_BLOCK + tlv(0x20, b"\x01" + bytes(4) + b"\x21\x00")), "inside"),
    ],
)
def test_v2_malformed_headers_are_refused(data, reason):
    refused(data, reason)


def test_v2_oversize_is_refused_from_the_first_16_bytes():
    parser = ProxyHeaderParser()
    head = V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 12 + MAX_V2_TLV_BYTES + 1)
    with pytest.raises(ProxyProtocolError, match="limit is 4124"):
        parser.feed(head)


def test_v2_tlv_cap_is_exact_and_configurable():
    body = IP4_BLOCK + tlv(0xE0, b"x" * (MAX_V2_TLV_BYTES - 3))
    assert parse(v2(0x21, 0x11, body)).header is not None
    bigger = IP4_BLOCK + tlv(0xE0, b"x" * MAX_V2_TLV_BYTES)
    refused(v2(0x21, 0x11, bigger), "limit")
    assert parse(v2(0x21, 0x11, bigger), max_tlv_bytes=8192).header is not None
    refused(v2(0x21, 0x11, IP4_BLOCK + tlv(0xE0, b"")), "limit", max_tlv_bytes=0)


def test_local_is_capped_like_the_largest_family():
    refused(v2(0x20, 0x00, bytes(216 + MAX_V2_TLV_BYTES + 1)), "limit")
    assert parse(v2(0x20, 0x00, bytes(216 + MAX_V2_TLV_BYTES))).header is not None


@pytest.mark.parametrize("bad", [-1, 65536, 65535 - 216 + 1])
def test_max_tlv_bytes_is_bounded(bad):
    with pytest.raises(UsageError):
        ProxyHeaderParser(max_tlv_bytes=bad)


def test_crc32c_known_answer():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


# -- properties ----------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).filter(lambda ip: ip.ipv4_mapped is None).map(str)
ports = st.integers(0, 65535)
custom_tlvs = st.lists(st.tuples(st.integers(0xE0, 0xF7), st.binary(max_size=40)), max_size=6).map(
    tuple
)


@st.composite
def endpoints(draw):
    addresses = draw(st.sampled_from([ipv4, ipv6]))
    return Endpoint(draw(addresses), draw(ports)), Endpoint(draw(addresses), draw(ports))


@given(endpoints(), custom_tlvs, st.booleans(), st.binary(max_size=30), st.data())
def test_v2_round_trip_in_any_pieces(ends, tlvs, with_crc, rest, data):
    source, destination = ends
    wire = encode_v2(source, destination, tlvs, with_crc=with_crc) + rest
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=8))
    result = feed_in_pieces(ProxyHeaderParser(), wire, cuts)
    assert isinstance(result, ProxyResult)
    assert result.header is not None
    assert (result.header.source, result.header.destination) == (source, destination)
    kept = tuple(t for t in result.header.tlvs if t[0] != 0x03)
    assert kept == tlvs
    assert result.rest == rest


@given(endpoints(), st.binary(max_size=30), st.data())
def test_v1_round_trip_in_any_pieces(ends, rest, data):
    source, destination = ends
    wire = encode_v1(source, destination) + rest
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=8))
    result = feed_in_pieces(ProxyHeaderParser(), wire, cuts)
    assert isinstance(result, ProxyResult) and result.header is not None
    assert (result.header.source, result.header.destination) == (source, destination)
    assert result.rest == rest


@settings(max_examples=300)
@given(
    st.sampled_from([HAPROXY_V1_TCP6, HAPROXY_V2_TLS, HAPROXY_V2_MTLS, HAPROXY_V2_TCP4]),
    st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=4),
    st.lists(st.integers(0, 400), max_size=6),
)
def test_corrupted_headers_fail_cleanly_and_stay_bounded(capture, flips, cuts):
    data = bytearray(capture)
    for where, value in flips:
        data[where % len(data)] = value
    parser = ProxyHeaderParser()
    bounds = [0, *sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    try:
        for start, end in itertools.pairwise(bounds):
            if start == end:
                continue
            result = parser.feed(bytes(data[start:end]))
            if result is not NEED_DATA:
                break
            assert parser.buffered <= 16 + 216 + MAX_V2_TLV_BYTES
            assert parser.buffered <= MAX_V1_BYTES or bytes(data[:1]) == b"\r"
    except ProxyProtocolError:
        pass


@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_protocol_errors(data):
    with contextlib.suppress(ProxyProtocolError):
        ProxyHeaderParser().feed(data or b"x")


# -- the gate and the policy -----------------------------------------------------


def test_gate_for_an_untrusted_peer_passes_ordinary_bytes_at_once():
    gate = ProxyGate(trusted=False)
    assert gate.feed(b"pong\n") == ProxyResult(None, b"pong\n")
    with pytest.raises(UsageError):
        gate.feed(b"more")


@pytest.mark.parametrize("capture", [HAPROXY_V1_TCP4, HAPROXY_V2_TCP4, HAPROXY_V2_CHECK])
def test_gate_refuses_a_header_from_an_untrusted_peer(capture):
    with pytest.raises(ProxyProtocolError, match="not listed in --proxy-protocol"):
        ProxyGate(trusted=False).feed(capture)


def test_gate_holds_an_ambiguous_prefix_then_decides():
    gate = ProxyGate(trusted=False)
    assert gate.feed(b"PRO") is NEED_DATA
    assert gate.feed(b"XIMA") == ProxyResult(None, b"PROXIMA")
    spoof = ProxyGate(trusted=False)
    for byte in b"PROXY":
        assert spoof.feed(bytes([byte])) is NEED_DATA
    with pytest.raises(ProxyProtocolError):
        spoof.feed(b" TCP4 1.2.3.4 5.6.7.8 1 2\r\n")
    with pytest.raises(PeerClosed):
        ProxyGate(trusted=False).feed(b"")


def test_gate_for_a_trusted_peer_requires_the_header():
    assert ProxyGate(trusted=True).feed(HAPROXY_V2_TCP4) == parse(HAPROXY_V2_TCP4)
    with pytest.raises(ProxyProtocolError, match="no PROXY protocol header"):
        ProxyGate(trusted=True).feed(b"pong")


def test_policy_decides_per_peer():
    policy = ProxyPolicy.from_cidrs(["10.0.0.0/8", "2001:db8::/32", "unix"])
    assert policy.enabled
    assert policy.requires_header(("10.1.2.3", 4000))
    assert policy.requires_header(("::ffff:10.1.2.3", 4000, 0, 0))
    assert policy.requires_header(("2001:db8::5", 4000, 0, 0))
    assert policy.requires_header("")  # an unnamed Unix peer
    assert not policy.requires_header(("192.0.2.7", 4000))
    assert policy.gate(("10.1.2.3", 1)).trusted
    assert not policy.gate(("192.0.2.7", 1)).trusted
    assert not ProxyPolicy.from_cidrs([]).enabled
    assert not ProxyPolicy.from_cidrs(["127.0.0.1"]).requires_header("")


def test_policy_names_the_flag_in_errors():
    with pytest.raises(BadNetwork, match="--proxy-protocol 'ten'"):
        ProxyPolicy.from_cidrs(["ten"])
    with pytest.raises(UsageError):
        ProxyPolicy.from_cidrs(["10.0.0.0/8"], max_tlv_bytes=-1)


def test_gate_releases_a_held_prefix_when_no_more_bytes_come():
    """``PROX`` from an unlisted peer that then pauses is a name, not a header."""
    gate = ProxyGate(trusted=False)
    assert not gate.holding
    assert gate.feed(b"PROX") is NEED_DATA
    assert gate.holding
    assert gate.release() == ProxyResult(None, b"PROX")
    assert not gate.holding
    with pytest.raises(UsageError):
        gate.feed(b"Y ")
    with pytest.raises(UsageError):
        ProxyGate(trusted=True).release()


def test_trusted_networks_union_and_messages_without_a_flag():
    a = TrustedNetworks.parse(["10.0.0.0/8"])
    b = TrustedNetworks.parse(["10.0.0.0/8", "::1", "unix"])
    both = a.union(b)
    assert [str(n) for n in both.networks] == ["10.0.0.0/8", "::1/128"]
    assert both.trusts_unix and both.trusts_peer(("::1", 1, 0, 0))
    assert a.union(None) is a
    with pytest.raises(BadNetwork, match=r"^'ten' is not an IP network"):
        TrustedNetworks.parse(["ten"], flag=None)
    with pytest.raises(BadNetwork, match=r"^'10.0.0.1/8': host bits set \(did you mean 10.0.0.0/8"):
        TrustedNetworks.parse(["10.0.0.1/8"], flag=None)
