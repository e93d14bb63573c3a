"""ipc-websocketd's tokens: signed expiring tokens, the token file, where a
browser puts a token, and the combined check (pure, but for the two loaders,
which read files under tmp_path)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemons.engine.tokens import (
    DEFAULT_SKEW,
    MIN_SECRET_BYTES,
    TokenAuthority,
    TokenConfigError,
    TokenFileError,
    TokenStatus,
    find_token,
    load_secret_file,
    load_token_file,
    mint,
    parse_token_file,
    verify_signed,
)
from ipc_core.errors import UsageError

SECRET = b"s" * 24 + b"0123456789"  # 34 bytes
NOW = 1_800_000_000.0
OK, BAD, EXPIRED = TokenStatus.OK, TokenStatus.BAD, TokenStatus.EXPIRED
FILE_TOKEN = "Xq0w3GvJ4eW8kM2pZr7tYb5n"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(payload: bytes, secret: bytes = SECRET, version: str = "v1") -> str:
    """A token with a valid MAC over any payload bytes (to reach the payload checks)."""
    body = f"{version}.{b64(payload)}"
    return f"{body}.{b64(hmac.new(secret, body.encode(), hashlib.sha256).digest())}"


def verify(token: str, service: str = "pong", now: float = NOW, **kwargs: float):
    return verify_signed(token, SECRET, service, now=now, **kwargs)


# -- signed tokens ---------------------------------------------------------------


def test_mint_and_verify():
    token = mint(SECRET, "alice", ["pong", "chat-*"], now=NOW, ttl=3600)
    assert re.fullmatch(r"v1\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{43}", token)
    result = verify(token)
    assert result.ok and result.http_status is None
    assert (result.name, result.services, result.kind) == ("alice", ("pong", "chat-*"), "signed")
    assert result.expires == int(NOW + 3600)
    assert verify(token, "chat-room").ok


def test_payload_is_the_documented_json():
    token = mint(SECRET, "zoë", ["pong"], now=NOW, ttl=60, not_before=NOW - 5)
    payload = token.split(".")[1]
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert data == {"n": "zoë", "s": ["pong"], "exp": int(NOW + 60), "nbf": int(NOW - 5)}
    assert token == signed(json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode())


def test_another_service_is_403():
    result = verify(mint(SECRET, "alice", ["chat"], now=NOW, ttl=60), "pong")
    assert result.status is TokenStatus.WRONG_SERVICE and result.http_status == 403
    assert result.name == "alice" and "not for service 'pong'" in result.reason


def test_star_reaches_any_service():
    assert verify(mint(SECRET, "ops", ["*"], now=NOW, ttl=60), "anything").ok


def test_expiry_with_skew():
    token = mint(SECRET, "alice", ["pong"], now=NOW, ttl=60)
    assert verify(token, now=NOW + 60 + DEFAULT_SKEW).ok
    late = verify(token, now=NOW + 61 + DEFAULT_SKEW)
    assert late.status is EXPIRED and late.http_status == 401
    assert "expired 61 s ago" in late.reason
    assert verify(token, now=NOW + 61, skew=0).status is EXPIRED


def test_not_yet_valid_with_skew():
    token = mint(SECRET, "alice", ["pong"], now=NOW, ttl=600, not_before=NOW + 120)
    assert verify(token, now=NOW + 60).ok  # within the 60 s skew
    early = verify(token, now=NOW + 59)
    assert early.status is TokenStatus.NOT_YET_VALID and early.http_status == 401


def test_another_secret_is_bad():
    token = mint(b"x" * 40, "alice", ["pong"], now=NOW, ttl=60)
    result = verify(token)
    assert result.status is BAD and "wrong signature" in result.reason
    assert result.name is None  # nothing from an unverified payload leaks out


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda t: "v2" + t[2:], "unknown token version 'v2'"),
        (lambda t: "V1" + t[2:], "unknown token version"),
        (lambda t: t.split(".", 1)[1], "unknown token version"),
        (lambda t: t + ".x", "not v1.PAYLOAD.MAC"),
        (lambda t: t.rsplit(".", 1)[0], "not v1.PAYLOAD.MAC"),
        (lambda t: t.replace("-", "+").replace("_", "/") + "+", "bad base64"),
        (lambda t: t + "=", "bad base64"),
        (lambda t: t[:-1], "bad base64"),  # 42 characters: 31.5 bytes
        (lambda t: t[:-4], "wrong signature"),  # a 30-byte MAC
        (lambda t: "v1.." + t.split(".")[2], "bad base64"),
        (lambda t: "x" * 5000, "5000 characters"),
    ],
)
def test_malformed_tokens_are_bad(mangle, reason):
    token = mint(SECRET, "alice", ["pong"], now=NOW, ttl=60)
    result = verify(mangle(token))
    assert result.status is BAD and reason in result.reason


def test_non_canonical_base64_is_bad():
    token = mint(SECRET, "alice", ["pong"], now=NOW, ttl=60)
    head, mac = token.rsplit(".", 1)
    # The last of 43 characters carries 4 spare bits: set one, same bytes.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = alphabet[alphabet.index(mac[-1]) | 1]
    if twin == mac[-1]:
        twin = alphabet[alphabet.index(mac[-1]) | 2]
    assert verify(f"{head}.{mac[:-1]}{twin}").reason == "signed token with bad base64"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff", "not JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"n":"a","s":["p"],"exp":1900000000,"role":"admin"}', "unknown keys ['role']"),
        (b'{"n":"a","n":"b","s":["p"],"exp":1900000000}', "duplicate key"),
        (b'{"n":"a","s":["p"],"exp":NaN}', "JSON NaN"),
        (b'{"n":"","s":["p"],"exp":1900000000}', "bad name"),
        (b'{"n":"a b","s":["p"],"exp":1900000000}', "bad name"),
        (b'{"n":"a\\u0000","s":["p"],"exp":1900000000}', "bad name"),
        (b'{"n":1,"s":["p"],"exp":1900000000}', "bad name"),
        (b'{"n":"a","s":"p","exp":1900000000}', "bad service list"),
        (b'{"n":"a","s":[],"exp":1900000000}', "no service"),
        (b'{"n":"a","s":["../x"],"exp":1900000000}', "contains '/'"),
        (b'{"n":"a","s":["p"]}', "no exp"),
        (b'{"n":"a","s":["p"],"exp":1.9e9}', "exp is not a time"),
        (b'{"n":"a","s":["p"],"exp":true}', "exp is not a time"),
        (b'{"n":"a","s":["p"],"exp":-1}', "exp is not a time"),
        (b'{"n":"a","s":["p"],"exp":1900000000,"nbf":"soon"}', "nbf is not a time"),
        (b'{"n":"a","s":["p"],"exp":' + b"9" * 2000 + b"}", "exp is not a time"),
        (b"[" * 2000, "not JSON"),  # deeper than the recursion limit
        (b"[" * 4000, "token of 5"),  # the length cap comes first
    ],
)
def test_payload_checks_after_a_valid_mac(payload, reason):
    result = verify(signed(payload))
    assert result.status is BAD and reason in result.reason, result.reason


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "a b"}, "spaces"),
        ({"name": ""}, "1 to 64"),
        ({"services": []}, "no service"),
        ({"services": ["a/b"]}, "contains '/'"),
        ({"ttl": 0}, "positive"),
        ({"secret": b"short"}, "at least 32"),
    ],
)
def test_mint_refuses_what_verify_would(kwargs, message):
    args = {"secret": SECRET, "name": "alice", "services": ["pong"], "ttl": 60.0}
    args.update(kwargs)
    with pytest.raises(TokenConfigError, match=message):
        mint(args.pop("secret"), args.pop("name"), args.pop("services"), now=NOW, **args)


@settings(max_examples=200)
@given(st.data())
def test_any_single_change_breaks_a_token(data):
    token = mint(SECRET, "alice", ["pong"], now=NOW, ttl=60)
    where = data.draw(st.integers(0, len(token) - 1))
    char = data.draw(st.sampled_from("ABCxyz019-_.=+/v"))
    changed = token[:where] + char + token[where + 1 :]
    if changed != token:
        assert verify(changed).status is BAD


@given(st.text(max_size=200))
def test_arbitrary_text_never_raises(text):
    assert verify(text).status in (BAD, OK)
    assert TokenAuthority(secret=SECRET).check(text, "pong", now=NOW).status is not OK


# -- the secret file ----------------------------------------------------------------


def write(path, data: bytes, mode: int):
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def test_secret_file_trailing_newline_removed(tmp_path):
    text = base64.b64encode(os.urandom(32)) + b"\n"
    assert load_secret_file(write(tmp_path / "s", text, 0o600)) == text[:-1]
    assert load_secret_file(write(tmp_path / "g", text + b"\r\n", 0o640)) == text[:-1]


@pytest.mark.parametrize(
    ("data", "mode", "message"),
    [
        (b"x" * 40, 0o644, r"accessible to others \(mode 0644\): chmod o= "),
        (b"x" * 40, 0o602, "accessible to others"),
        (b"x" * 31 + b"\n", 0o600, "31 bytes, at least 32"),
        (b"", 0o600, "0 bytes"),
        (b"x" * 5000, 0o600, "over 4096 bytes"),
    ],
)
def test_secret_file_refusals(tmp_path, data, mode, message):
    path = write(tmp_path / "secret", data, mode)
    with pytest.raises(TokenConfigError, match=message) as caught:
        load_secret_file(path)
    assert str(path) in str(caught.value)
    assert isinstance(caught.value, UsageError)


def test_secret_file_missing_or_not_a_file(tmp_path):
    with pytest.raises(TokenConfigError, match="No such file"):
        load_secret_file(tmp_path / "nope")
    with pytest.raises(TokenConfigError, match="not a regular file"):
        load_secret_file(tmp_path)


# -- the token file -------------------------------------------------------------------

GOOD_FILE = f"""\
# TOKEN  NAME  SERVICES
{FILE_TOKEN}   alice   pong,chat-*
   # an indented comment

{"b" * 16}	bob	pong   # the monitoring job
"""


def test_token_file_parses_with_comments_and_blank_lines():
    table = parse_token_file(GOOD_FILE)
    assert len(table) == 2
    entry = table.lookup(FILE_TOKEN)
    assert entry is not None and (entry.name, entry.services, entry.line) == (
        "alice",
        ("pong", "chat-*"),
        2,
    )
    assert table.check("b" * 16, "pong").ok
    assert table.check("b" * 16, "chat").status is TokenStatus.WRONG_SERVICE
    assert table.check("b" * 17, "pong").status is BAD
    assert table.lookup(FILE_TOKEN.lower()) is None


def test_token_file_reports_every_bad_line_with_its_number():
    text = (
        f"{FILE_TOKEN} alice pong\n"
        "tooshort alice pong\n"
        f"{FILE_TOKEN} carol pong\n"
        f"{'c' * 20} carol\n"
        f"{'d' * 20}+ dave pong\n"
        f"{'e' * 20} eve a/b\n"
        f"{'f' * 20} fr\x01ed pong\n"
        f"{'g' * 20} gina pong extra\n"
        f"{'h' * 300} hal pong\n"
    )
    with pytest.raises(TokenFileError) as caught:
        parse_token_file(text, "tokens.txt")
    problems = caught.value.problems
    assert problems == [
        "line 2: the token is 8 characters, it must have 16 to 256",
        "line 3: the token of line 1 again",
        "line 4: 2 fields, expected TOKEN NAME SERVICE[,SERVICE...]",
        "line 5: the token has characters outside A-Z a-z 0-9 - _ . ~",
        "line 6: service name 'a/b' contains '/'",
        "line 7: name 'fr\\x01ed' holds spaces or unprintable characters",
        "line 8: 4 fields, expected TOKEN NAME SERVICE[,SERVICE...]",
        "line 9: the token is 300 characters, it must have 16 to 256",
    ]
    assert str(caught.value).startswith("tokens.txt: 8 problems: line 2: ")
    assert FILE_TOKEN not in str(caught.value)  # a duplicate is named by its line


def test_token_file_error_message_is_bounded():
    with pytest.raises(TokenFileError, match=r"and 5 more$"):
        parse_token_file("x\n" * 15)


def test_load_token_file(tmp_path):
    path = write(tmp_path / "tokens", GOOD_FILE.encode(), 0o600)
    assert len(load_token_file(path)) == 2
    os.chmod(path, 0o604)
    with pytest.raises(TokenConfigError, match="chmod o="):
        load_token_file(path)
    bad = write(tmp_path / "latin1", b"\xe9" * 20 + b" a b\n", 0o600)
    with pytest.raises(TokenConfigError, match="not UTF-8"):
        load_token_file(bad)
    broken = write(tmp_path / "broken", b"x y\n", 0o600)
    with pytest.raises(TokenFileError, match=f"token file {broken}: 1 problem: line 1"):
        load_token_file(broken)


# -- where the browser puts it ---------------------------------------------------------


def test_token_in_the_query():
    found = find_token(f"/pong?a=1&token={FILE_TOKEN}&b=2", [])
    assert (found.token, found.where, found.problem) == (FILE_TOKEN, "query", None)
    assert found.target == "/pong?a=1&b=2"
    assert found.echo is None
    assert find_token("/pong?token=abc%2Edef", []).token == "abc.def"
    assert find_token(f"/pong?token={FILE_TOKEN}", []).target == "/pong"


def test_token_in_a_cookie():
    headers = [("Cookie", f'theme=dark; ipc_token="{FILE_TOKEN}"'), ("cookie", "b=2")]
    found = find_token("/pong", headers)
    assert (found.token, found.where) == (FILE_TOKEN, "cookie")
    assert found.cookie == "theme=dark; b=2"
    assert find_token("/pong", [("Cookie", f"ipc_token={FILE_TOKEN}")]).cookie is None


def test_token_in_a_subprotocol_and_what_to_echo():
    only = find_token("/pong", [("Sec-WebSocket-Protocol", f"ipc.token.{FILE_TOKEN}")])
    assert (only.token, only.where) == (FILE_TOKEN, "subprotocol")
    assert only.echo == f"ipc.token.{FILE_TOKEN}" and only.subprotocols == ()
    headers = [("Sec-WebSocket-Protocol", f"chat.v2, ipc.token.{FILE_TOKEN}"), ("X", "y")]
    with_other = find_token("/pong", headers)
    assert with_other.echo == "chat.v2" and with_other.subprotocols == ("chat.v2",)
    assert find_token("/pong", [("Sec-WebSocket-Protocol", "chat")]).echo == "chat"


def test_explicit_carriers_win_over_the_cookie():
    headers = [("Cookie", "ipc_token=" + "c" * 20)]
    assert find_token(f"/p?token={FILE_TOKEN}", headers).token == FILE_TOKEN
    same = find_token(
        f"/p?token={FILE_TOKEN}", [("Sec-WebSocket-Protocol", f"ipc.token.{FILE_TOKEN}")]
    )
    assert (same.token, same.where, same.problem) == (FILE_TOKEN, "subprotocol", None)


@pytest.mark.parametrize(
    ("target", "headers", "problem"),
    [
        (f"/p?token={FILE_TOKEN}&token=other", [], "two different tokens"),
        ("/p?token=a", [("Sec-WebSocket-Protocol", "ipc.token.b")], "two different tokens"),
        ("/p", [("Cookie", "ipc_token=a; ipc_token=b")], "two different ipc_token cookies"),
        ("/p?token=", [], "an empty token"),
        ("/p?token=a%20b", [], "characters outside"),
        ("/p", [("Sec-WebSocket-Protocol", "ipc.token.")], "an empty token"),
    ],
)
def test_ambiguous_or_malformed_presentations(target, headers, problem):
    found = find_token(target, headers)
    assert found.token is None and problem in (found.problem or "")
    result, _ = TokenAuthority(secret=SECRET).authenticate(target, headers, "p", now=NOW)
    assert result.status is BAD and result.http_status == 401


def test_nothing_presented():
    found = find_token("/pong?x=1", [("Cookie", "a=b")])
    assert (found.token, found.where, found.problem, found.target) == (
        None,
        None,
        None,
        "/pong?x=1",
    )


# -- both kinds together ---------------------------------------------------------------


def authority() -> TokenAuthority:
    return TokenAuthority(parse_token_file(GOOD_FILE), SECRET)


def test_authority_statuses_map_to_http():
    auth = authority()
    signed_token = mint(SECRET, "web", ["pong"], now=NOW, ttl=60)
    cases = {
        None: (TokenStatus.MISSING, 401),
        FILE_TOKEN: (OK, None),
        "b" * 16: (OK, None),
        signed_token: (OK, None),
        "z" * 20: (BAD, 401),
        "v9.abc.def": (BAD, 401),
    }
    for token, (status, http) in cases.items():
        result = auth.check(token, "pong", now=NOW)
        assert (result.status, result.http_status) == (status, http), token
    assert auth.check(signed_token, "pong", now=NOW + 3600).http_status == 401
    assert auth.check(signed_token, "chat", now=NOW).http_status == 403
    assert auth.check("b" * 16, "chat", now=NOW).http_status == 403
    assert auth.check("x" * 5000, "pong", now=NOW).status is BAD


def test_authority_needs_a_secret_for_signed_tokens():
    token = mint(SECRET, "web", ["pong"], now=NOW, ttl=60)
    result = TokenAuthority(parse_token_file(GOOD_FILE)).check(token, "pong", now=NOW)
    assert result.status is BAD and "no --token-secret" in result.reason


def test_authority_reload_swaps_the_table():
    auth = authority()
    auth.replace_table(parse_token_file(f"{'n' * 16} nina pong\n"))
    assert not auth.check(FILE_TOKEN, "pong", now=NOW).ok
    assert auth.check("n" * 16, "pong", now=NOW).name == "nina"


def test_authority_configuration_bounds():
    assert not TokenAuthority().enabled and authority().enabled
    with pytest.raises(TokenConfigError, match="at least 32"):
        TokenAuthority(secret=b"short")
    with pytest.raises(TokenConfigError, match="skew"):
        TokenAuthority(secret=SECRET, skew=-1)


def test_authenticate_a_browser_request():
    token = mint(SECRET, "alice", ["pong"], now=NOW, ttl=3600)
    headers = [
        ("Host", "example.test"),
        ("Sec-WebSocket-Protocol", f"ipc.token.{token}"),
        ("Cookie", "session=1"),
    ]
    result, presented = authority().authenticate("/pong?room=1", headers, "pong", now=NOW)
    assert result.ok and result.name == "alice"
    assert presented.echo == f"ipc.token.{token}"
    assert (presented.target, presented.cookie) == ("/pong?room=1", "session=1")


def test_reasons_never_contain_the_token():
    auth = authority()
    token = mint(SECRET, "alice", ["chat"], now=NOW, ttl=60)
    for candidate in (token, FILE_TOKEN, "z" * 20, token[:-2] + "AA"):
        for service in ("pong", "chat"):
            for now in (NOW, NOW + 999):
                assert candidate not in auth.check(candidate, service, now=now).reason


def test_minimum_secret_is_documented_size():
    assert MIN_SECRET_BYTES == 32
