"""Adversarial input for the text parsers a peer or a client controls.

``IPC_NETWORK`` and the router's look-up message (ipc_core.routing, ipcd's
resolve_target), routing URIs (daemons.engine.addresses.parse_uri), service names
(service_name_error, ipc_core.rundir.validate_name) and the access policy
(ServiceAccess). Each must answer any input with a value or its documented
error (ProtocolError, ValueError, InvalidServiceName), never anything else.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemons.engine.addresses import Uri, parse_uri
from daemons.engine.policy import (
    DEFAULT_PROTECTED,
    MAX_SERVICE_NAME_BYTES,
    ServiceAccess,
    service_name_error,
)
from daemons.ipcd import resolve_target
from ipc_core.errors import InvalidServiceName, ProtocolError
from ipc_core.routing import lookup_message, parse_lookup, parse_network
from ipc_core.rundir import socket_path, validate_name

# Text biased towards the characters the parsers care about. No lone
# surrogates: whatever comes from a peer was decoded as strict UTF-8.
SPECIAL = " ;:/[]@.\t\n\r\x00\x7f%\\*?-_"
_chars = st.characters(blacklist_categories=("Cs",))
tricky_text = st.text(
    alphabet=st.one_of(st.sampled_from(SPECIAL), _chars, st.sampled_from("abc09")),
    max_size=120,
)

ADVERSARIAL_NAMES = [
    "a/b",
    "../pong",
    "..",
    ".",
    "po\x00ng",
    "x" * 2000,
    "",
    " ",
    "\n",
    "tab\there",
    "del\x7f",
    "\udc80",
    "é" * 60,
    "*",
    "ipc",
    "tcp.ctl",
]


# -- IPC_NETWORK --------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(value=tricky_text)
def test_parse_network_answers_routes_or_protocol_error(value: str) -> None:
    try:
        routes = parse_network(value)
    except ProtocolError as exc:
        assert "IPC_NETWORK" in str(exc)
        return
    for name, target in routes.items():
        for part in (name, target):
            assert part and ";" not in part and part == part.strip()
            assert not any(c.isspace() for c in part)


tokens = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters=";"),
    min_size=1,
    max_size=20,
).filter(lambda t: t.split() == [t])
spaces = st.sampled_from(["", " ", "  ", "\t", " \n "])


@settings(max_examples=300, deadline=None)
@given(directives=st.lists(st.tuples(tokens, tokens, spaces, spaces), max_size=8))
def test_parse_network_round_trip_first_directive_wins(
    directives: list[tuple[str, str, str, str]],
) -> None:
    value = ";".join(f"{lead}{name} {target}{trail}" for name, target, lead, trail in directives)
    expected: dict[str, str] = {}
    for name, target, _, _ in directives:
        expected.setdefault(name, target)
    assert parse_network(value) == expected


@settings(max_examples=500, deadline=None)
@given(payload=st.one_of(st.binary(max_size=200), tricky_text.map(str.encode)))
def test_parse_lookup_answers_a_pair_or_protocol_error(payload: bytes) -> None:
    try:
        service, network = parse_lookup(payload)
    except ProtocolError:
        return
    assert service and service == service.strip() and ";" not in service
    assert parse_lookup(lookup_message(service, network)) == (service, network)


@settings(max_examples=300, deadline=None)
@given(service=tokens, network=tricky_text)
def test_lookup_message_round_trip(service: str, network: str) -> None:
    assert parse_lookup(lookup_message(service, network)) == (service, network)


@settings(max_examples=500, deadline=None)
@given(target=tricky_text)
def test_resolve_target_answers_or_protocol_error(target: str) -> None:
    try:
        local, uri = resolve_target(target)
    except ProtocolError:
        return
    assert uri is None or uri == target
    # What ipcd then does with ``local``: validate it as a service name (an
    # IPCError, which the router answers with an error message).
    with contextlib.suppress(InvalidServiceName):
        socket_path(local, Path("/tmp/.libipc-run"))


@pytest.mark.parametrize("name", ADVERSARIAL_NAMES)
def test_adversarial_names_in_ipc_network(name: str) -> None:
    """A route whose service or target is a hostile name: parsed as text, then
    refused by validation, never crashing the router's helpers."""
    if name.split() != [name]:
        with pytest.raises(ProtocolError):
            parse_network(f"{name} unix://{name}")
        return
    routes = parse_network(f"{name} unix://{name} ; {name} tcp://h/{name}")
    assert routes == {name: f"unix://{name}"}
    local, uri = resolve_target(routes[name])
    assert (local, uri) == (name, None)
    if name in ("*", "ipc", "tcp.ctl", "\udc80"):  # "\udc80": the file name b"\x80"
        assert validate_name(name, Path("/tmp/x")) == name
    else:
        with pytest.raises(InvalidServiceName):
            socket_path(name, Path("/tmp/.libipc-run"))


# -- URIs ---------------------------------------------------------------------------------


@settings(max_examples=800, deadline=None)
@given(
    uri=st.one_of(
        tricky_text,
        st.builds(
            lambda s, a, p: f"{s}://{a}/{p}",
            st.sampled_from(["tcp", "tls", "ws", "wss", "unix", "TCP", "x+y", "1tcp", ""]),
            tricky_text,
            tricky_text,
        ),
    )
)
def test_parse_uri_answers_a_valid_uri_or_value_error(uri: str) -> None:
    try:
        parsed = parse_uri(uri)
    except ValueError:
        return
    assert isinstance(parsed, Uri)
    assert service_name_error(parsed.service) is None
    if not parsed.is_local:
        assert 0 <= parsed.port <= 65535 and parsed.host
        assert parsed.address == (parsed.host, parsed.port)
    # What it prints parses back to the same URI.
    assert parse_uri(str(parsed)) == parsed


@pytest.mark.parametrize("name", ADVERSARIAL_NAMES)
@pytest.mark.parametrize("scheme", ["tcp://127.0.0.1:9000/", "tls://[::1]/", "unix://"])
def test_parse_uri_refuses_hostile_service_names(scheme: str, name: str) -> None:
    uri = scheme + name
    if service_name_error(name) is None:
        assert parse_uri(uri).service == name
    else:
        with pytest.raises(ValueError, match=r"bad service|missing service"):
            parse_uri(uri)


@pytest.mark.parametrize(
    "uri",
    [
        "tcp://[::1/pong",
        "tcp://[zz]:1/pong",
        "tcp://h:99999/pong",
        "tcp://h:-1/pong",
        "tcp://h:1:2/pong",
        "tcp://1.2.3/pong",
        "tcp://-h/pong",
        "tcp://h/",
        "tcp://",
        "tcp:/h/p",
        "foo://h/p",
        "tcp://" + "a" * 300 + "/p",
        "tcp://h\x00/p",
        "tcp://h /p",
        "tcp://h:९/p",
    ],
)
def test_parse_uri_refuses_bad_authorities(uri: str) -> None:
    with pytest.raises(ValueError):
        parse_uri(uri)


# -- service names and the access policy ----------------------------------------------------


@settings(max_examples=800, deadline=None)
@given(
    name=st.one_of(tricky_text, st.text(_chars, max_size=300), st.sampled_from(ADVERSARIAL_NAMES))
)
def test_service_name_error_never_raises_and_agrees_with_validate_name(name: str) -> None:
    reason = service_name_error(name)
    assert reason is None or isinstance(reason, str)
    if reason is None:
        assert len(name.encode()) <= MAX_SERVICE_NAME_BYTES
        assert "/" not in name and "\0" not in name and name not in (".", "..")
        # Short enough for any run directory of up to 1 byte: the socket
        # path limit is the run directory's business (see test_faults.py).
        validate_name(name, Path("/"))
    else:
        try:
            validate_name(name, Path("/tmp/.libipc-run"))
        except InvalidServiceName:
            pass
        else:
            # Only the 100-byte policy is stricter than the socket layer, and
            # lone surrogates (which os.fsencode maps back to raw bytes).
            assert len(name.encode(errors="surrogateescape")) > MAX_SERVICE_NAME_BYTES or any(
                0xD800 <= ord(c) <= 0xDFFF for c in name
            )


globs = st.text(alphabet="ab*?[]!.-/", max_size=6)


@settings(max_examples=500, deadline=None)
@given(
    name=st.one_of(tricky_text, st.sampled_from(ADVERSARIAL_NAMES + list(DEFAULT_PROTECTED))),
    allow=st.lists(globs, max_size=3),
    deny=st.lists(globs, max_size=3),
)
def test_service_access_never_raises_and_never_lets_a_bad_name_through(
    name: str, allow: list[str], deny: list[str]
) -> None:
    access = ServiceAccess(allow, deny)
    refusal = access.check(name)
    if service_name_error(name) is not None:
        assert refusal is not None
    if refusal is None and name in ("ipc", "tcp", "tls", "ws", "wss"):
        assert name in allow  # only the exact name opens them, never a glob
    if name.endswith((".ctl", ".lock")):
        assert refusal is not None  # never, whatever the lists say


@pytest.mark.parametrize("name", ["ipc", "tcp", "tls", "ws", "wss"])
def test_protected_names_are_not_opened_by_a_catch_all(name: str) -> None:
    assert ServiceAccess(allow=["*", "**"]).check(name) is not None
    assert ServiceAccess(allow=[name]).check(name) is None


@pytest.mark.parametrize("name", ["tcp.ctl", "x.ctl", "pong.lock"])
def test_control_services_and_locks_are_never_opened(name: str) -> None:
    assert ServiceAccess(allow=[name]).check(name) is not None
