"""Real client addresses from X-Forwarded-For / Forwarded (rightmost untrusted),
and the trusted-network lists both --trust-proxy and --proxy-protocol use."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemons.codecs.forwarded import (
    MAX_HOPS,
    ClientAddress,
    ForwardedHeader,
    Hop,
    parse_forwarded,
    parse_x_forwarded_for,
    real_client,
)
from daemons.engine.trust import BadNetwork, TrustedNetworks, parse_ip, peer_ip
from ipc_core.errors import UsageError

TRUSTED = TrustedNetworks.parse(["10.0.0.0/8", "2001:db8:ffff::/48", "unix"])
NGINX = ("10.0.0.1", 40000)
FWD = ForwardedHeader.FORWARDED


def xff(*values: str) -> list[tuple[str, str]]:
    return [("X-Forwarded-For", v) for v in values]


def fwd(*values: str) -> list[tuple[str, str]]:
    return [("Forwarded", v) for v in values]


# -- trusted networks ------------------------------------------------------------


def test_networks_parse_addresses_prefixes_and_unix():
    nets = TrustedNetworks.parse([" 192.0.2.7 ", "10.0.0.0/8", "::1", "UNIX"])
    assert [str(n) for n in nets.networks] == ["192.0.2.7/32", "10.0.0.0/8", "::1/128"]
    assert nets.trusts_unix and nets
    assert "unix" in repr(nets)
    assert not TrustedNetworks.parse([])


def test_networks_compare_ipv4_mapped_peers_as_ipv4():
    nets = TrustedNetworks.parse(["10.0.0.0/8"])
    assert nets.trusts_peer(("::ffff:10.2.3.4", 1, 0, 0))
    assert nets.contains(ipaddress.ip_address("::ffff:10.2.3.4"))
    mapped_entry = TrustedNetworks.parse(["::ffff:10.0.0.0/104"])
    assert [str(n) for n in mapped_entry.networks] == ["10.0.0.0/8"]
    assert mapped_entry.trusts_peer(("10.9.9.9", 1))


def test_networks_peer_forms():
    nets = TrustedNetworks.parse(["fe80::/10"])
    assert nets.trusts_peer(("fe80::1%eth0", 1, 0, 2))
    assert not nets.trusts_peer("/run/sock")  # no "unix" in the list
    assert not nets.trusts_peer(None)
    assert not nets.contains(None)
    assert TrustedNetworks.parse(["unix"]).trusts_peer(b"")
    assert peer_ip(("::ffff:192.0.2.1", 5)) == ipaddress.ip_address("192.0.2.1")
    assert peer_ip("/path") is None
    assert parse_ip("nonsense") is None


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("10.0.0.1/8", "host bits set .did you mean 10.0.0.0/8"),
        ("ten", "is not an IP network"),
        ("10.0.0.0/33", "is not an IP network"),
        ("", "is not an IP network"),
    ],
)
def test_networks_refuse_typos_with_the_flag_name(entry, message):
    with pytest.raises(BadNetwork, match=message) as caught:
        TrustedNetworks.parse([entry], flag="--trust-proxy")
    assert "--trust-proxy" in str(caught.value)
    assert isinstance(caught.value, UsageError)


# -- the rightmost-untrusted walk, X-Forwarded-For ----------------------------------


def test_an_untrusted_peer_is_the_client_whatever_it_says():
    client = real_client(("198.51.100.9", 5555), TRUSTED, xff("10.0.0.5"))
    assert client == ClientAddress("198.51.100.9", 5555, "transport")


def test_a_trusted_peer_without_a_header_is_the_client():
    assert real_client(NGINX, TRUSTED, []) == ClientAddress("10.0.0.1", 40000, "transport")


def test_one_proxy():
    client = real_client(NGINX, TRUSTED, xff("203.0.113.5"))
    assert (client.address, client.port, client.source) == ("203.0.113.5", None, "x-forwarded-for")
    assert client.proxy == "10.0.0.1"
    assert client.ip == ipaddress.ip_address("203.0.113.5")


def test_a_client_cannot_spoof_by_sending_its_own_header():
    # The client wrote "1.1.1.1, 10.0.0.9"; nginx appended the real peer.
    client = real_client(NGINX, TRUSTED, xff("1.1.1.1, 10.0.0.9, 203.0.113.5"))
    assert client.address == "203.0.113.5"


def test_a_chain_of_trusted_proxies_is_walked():
    client = real_client(NGINX, TRUSTED, xff("198.51.100.1, 10.0.0.3", "10.0.0.2"))
    assert (client.address, client.proxy) == ("198.51.100.1", "10.0.0.3")


def test_all_trusted_gives_the_leftmost():
    client = real_client(NGINX, TRUSTED, xff("10.0.0.7, 10.0.0.3"))
    assert (client.address, client.proxy) == ("10.0.0.7", "10.0.0.3")


def test_header_names_are_case_insensitive_and_repeats_are_one_list():
    headers = [("x-forwarded-for", "203.0.113.5"), ("X-FORWARDED-FOR", "10.0.0.2")]
    assert real_client(NGINX, TRUSTED, headers).address == "203.0.113.5"


@pytest.mark.parametrize(
    ("item", "address", "port"),
    [
        ("203.0.113.5:4711", "203.0.113.5", 4711),
        ("2001:db8::1", "2001:db8::1", None),
        ("[2001:db8::1]", "2001:db8::1", None),
        ("[2001:db8::1]:443", "2001:db8::1", 443),
        ("[::ffff:203.0.113.5]:443", "203.0.113.5", 443),
        ("::ffff:203.0.113.5", "203.0.113.5", None),
        ("  203.0.113.5\t", "203.0.113.5", None),
    ],
)
def test_xff_item_forms(item, address, port):
    client = real_client(NGINX, TRUSTED, xff(item))
    assert (client.address, client.port) == (address, port)


@pytest.mark.parametrize(
    "garbage",
    ["not-an-ip", "1.2.3.4:99999", "fe80::1%eth0", "[1.2.3.4]", "1.2.3", "[::1", "::1:80:"],
)
def test_garbage_stops_the_walk_at_the_last_known_hop(garbage):
    client = real_client(NGINX, TRUSTED, xff(f"203.0.113.5, {garbage}"))
    assert (client.address, client.source) == ("10.0.0.1", "transport")
    assert client.problem is not None and "not an address" in client.problem
    deeper = real_client(NGINX, TRUSTED, xff(f"{garbage}, 10.0.0.4"))
    assert (deeper.address, deeper.source) == ("10.0.0.4", "x-forwarded-for")
    assert deeper.problem is not None


def test_garbage_left_of_the_client_is_never_read():
    client = real_client(NGINX, TRUSTED, xff("\x00garbage\xff, 203.0.113.5"))
    assert client.address == "203.0.113.5" and client.problem is None


def test_empty_items_are_skipped():
    assert parse_x_forwarded_for(" , 203.0.113.5,,") == [Hop("203.0.113.5")]
    assert parse_x_forwarded_for("") == []


def test_unknown_ends_the_walk_without_an_ip():
    client = real_client(NGINX, TRUSTED, xff("203.0.113.5, unknown"))
    assert client.address == "unknown" and client.ip is None
    assert client.limit_key_address == "10.0.0.1"


def test_limit_key_is_the_client_ip_when_known():
    assert real_client(NGINX, TRUSTED, xff("203.0.113.5")).limit_key_address == "203.0.113.5"


def test_too_many_trusted_hops():
    chain = ", ".join(f"10.0.{i // 250}.{i % 250 + 1}" for i in range(MAX_HOPS + 5))
    client = real_client(NGINX, TRUSTED, xff(chain))
    assert client.problem == f"more than {MAX_HOPS} trusted hops"
    assert real_client(NGINX, TRUSTED, xff(chain), max_hops=100).problem is None


def test_unix_peers():
    nginx_on_unix = real_client("/run/ws.sock", TRUSTED, xff("203.0.113.5"))
    assert (nginx_on_unix.address, nginx_on_unix.proxy) == ("203.0.113.5", "/run/ws.sock")
    untrusted = TrustedNetworks.parse(["10.0.0.0/8"])
    assert real_client("", untrusted, xff("203.0.113.5")) == ClientAddress(
        "unix-peer", None, "transport"
    )
    assert real_client(b"/x", untrusted, []).address == "/x"


# -- only the header the operator named is honoured ----------------------------------


def test_forwarded_is_ignored_when_proxies_write_x_forwarded_for():
    headers = [("Forwarded", "for=1.1.1.1"), ("X-Forwarded-For", "203.0.113.5")]
    assert real_client(NGINX, TRUSTED, headers).address == "203.0.113.5"
    assert real_client(NGINX, TRUSTED, headers, header=FWD).address == "1.1.1.1"
    only_fwd = [("Forwarded", "for=203.0.113.5")]
    assert real_client(NGINX, TRUSTED, only_fwd).source == "transport"


# -- Forwarded (RFC 7239) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "address", "port"),
    [
        ('for="_gazonk"', "_gazonk", None),
        ('For="[2001:db8:cafe::17]:4711"', "2001:db8:cafe::17", 4711),
        ("for=192.0.2.60;proto=http;by=203.0.113.43", "192.0.2.60", None),
        ("for=192.0.2.43, for=198.51.100.17", "198.51.100.17", None),
        ('for="192.0.2.43:47011"', "192.0.2.43", 47011),
        ("for=unknown", "unknown", None),
        ('for="unknown:4711"', "unknown", 4711),
        ('for="192.0.2.43:_port"', "192.0.2.43", None),
        ('for="_hidden:_port"', "_hidden", None),
        ('for="[2001:db8::1]"', "2001:db8::1", None),
        ("for=2001:db8::1", "2001:db8::1", None),  # lenient: unquoted, unbracketed
        ("for=[2001:db8::1]:80", "2001:db8::1", 80),  # lenient: unquoted
        ("for=192.0.2.60 ; proto=https", "192.0.2.60", None),
        ('for="\\1\\9\\2.0.2.60"', "192.0.2.60", None),  # quoted-pairs
        ("proto=https", "unknown", None),  # no for=: the client is not named
    ],
)
def test_rfc7239_nodes(value, address, port):
    client = real_client(NGINX, TRUSTED, fwd(value), header=FWD)
    assert (client.address, client.port, client.source) == (address, port, "forwarded")
    assert client.problem is None


def test_proto_and_host_of_the_clients_element():
    value = 'for=203.0.113.5;proto=HTTPS;host="example.com:8443", for=10.0.0.2;proto=http'
    client = real_client(NGINX, TRUSTED, fwd(value), header=FWD)
    assert (client.proto, client.host, client.proxy) == ("https", "example.com:8443", "10.0.0.2")


def test_quoted_commas_and_semicolons_do_not_split():
    elements = parse_forwarded('for=192.0.2.1;host="a,b;c", for=192.0.2.2')
    assert [e.hop.node for e in elements] == ["192.0.2.1", "192.0.2.2"]
    assert elements[0].params == (("for", "192.0.2.1"), ("host", "a,b;c"))


def test_invalid_proto_and_host_are_dropped_not_fatal():
    client = real_client(NGINX, TRUSTED, fwd('for=203.0.113.5;proto=1x;host="a b"'), header=FWD)
    assert (client.address, client.proto, client.host) == ("203.0.113.5", None, None)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("for=", "empty value"),
        ("for", "not name=value"),
        ("for=1.2.3.4;for=5.6.7.8", "repeats for="),
        ('for="1.2.3.4', "unterminated"),
        ("for=1.2.3.4 junk", "not name=value"),
        ("for=1.2.3.4=5", "not name=value"),
        ('for="1.2.3.4"x', "not name=value"),
        ('for="a\x01b"', "bad quoted string"),
        ("for=1.2.3.4:80:90", "not a node"),
        ("for=1.2.3.4:99999", "not a node"),
        ("for=[1.2.3.4]", "not a node"),
        ("for=_", "not a node"),
        ("for=_bad!", "not a node"),
        ("for=fe80::1%25eth0", "not a node"),
        ("for=example.com", "not a node"),
    ],
)
def test_malformed_elements_stop_the_walk(value, reason):
    client = real_client(NGINX, TRUSTED, fwd(f"for=203.0.113.5, {value}"), header=FWD)
    assert (client.address, client.source) == ("10.0.0.1", "transport")
    assert client.problem is not None and reason in client.problem


def test_empty_forwarded_items_and_pairs_are_allowed():
    elements = parse_forwarded(" , for=192.0.2.1;;proto=http ,")
    assert len(elements) == 1 and elements[0].hop.proto == "http"


# -- properties ------------------------------------------------------------------

untrusted_ips = st.ip_addresses(v=4).filter(lambda ip: ip not in ipaddress.ip_network("10.0.0.0/8"))
trusted_ips = st.integers(1, 2**24 - 2).map(lambda n: ipaddress.IPv4Address(0x0A000000 + n))


@settings(max_examples=300)
@given(st.text(max_size=80), untrusted_ips, st.lists(trusted_ips, max_size=3))
def test_whatever_the_client_writes_the_result_is_the_real_client(prefix, real, proxies):
    """The client controls everything left of what the first trusted proxy
    appended; the answer is the real client or, if the client broke the
    syntax so badly that the walk cannot pass it, a trusted hop: never an
    address the client chose."""
    chain = ", ".join([str(real), *map(str, proxies)])
    for header, joined in (
        (ForwardedHeader.X_FORWARDED_FOR, f"{prefix}, {chain}"),
        (FWD, f"{prefix}, " + ", ".join(f"for={hop.strip()}" for hop in chain.split(","))),
    ):
        name = "Forwarded" if header is FWD else "X-Forwarded-For"
        client = real_client(NGINX, TRUSTED, [(name, joined)], header=header)
        allowed = {str(real), "10.0.0.1", *map(str, proxies)}
        assert client.address in allowed, (header, joined, client)
        if header is ForwardedHeader.X_FORWARDED_FOR:
            assert client.address == str(real)


@given(st.lists(st.tuples(st.sampled_from(["X-Forwarded-For", "Forwarded"]), st.text())))
def test_arbitrary_headers_never_raise(headers):
    for header in ForwardedHeader:
        client = real_client(NGINX, TRUSTED, headers, header=header)
        assert isinstance(client, ClientAddress)
        assert real_client(("192.0.2.1", 1), TRUSTED, headers, header=header).source == "transport"
