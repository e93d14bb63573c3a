"""Tests for daemons.engine.metrics: exact text rendering, snapshot, and the HTTP responder."""

from __future__ import annotations

import json

import pytest

from daemons.engine.metrics import Counter, Gauge, Registry


@pytest.fixture
def registry() -> Registry:
    reg = Registry()
    conns = reg.gauge("ipc_connections", "Open connections.")
    conns.set(3)
    accepted = reg.counter("ipc_accepted_total", "Accepted connections.", ["proto"])
    accepted.inc(proto="tcp")
    accepted.inc(2, proto="tcp")
    accepted.inc(proto="tls")
    reg.counter("ipc_refused_total", 'Refused "peers"\nby reason \\ policy.', ["reason"])
    return reg


def test_render_exact(registry: Registry) -> None:
    registry.counter("ipc_bytes_total", "Bytes relayed.").inc(1.5)
    assert registry.render() == (
        "# HELP ipc_connections Open connections.\n"
        "# TYPE ipc_connections gauge\n"
        "ipc_connections 3\n"
        "# HELP ipc_accepted_total Accepted connections.\n"
        "# TYPE ipc_accepted_total counter\n"
        'ipc_accepted_total{proto="tcp"} 3\n'
        'ipc_accepted_total{proto="tls"} 1\n'
        '# HELP ipc_refused_total Refused "peers"\\nby reason \\\\ policy.\n'
        "# TYPE ipc_refused_total counter\n"
        "# HELP ipc_bytes_total Bytes relayed.\n"
        "# TYPE ipc_bytes_total counter\n"
        "ipc_bytes_total 1.5\n"
    )


def test_label_value_escaping_and_special_values() -> None:
    g = Gauge("g", "h", ["a", "b"])
    g.set(float("inf"), a='q"uote', b="back\\slash\nnl")
    g.set(float("-inf"), a="x", b="y")
    g.set(float("nan"), a="x", b="z")
    g.set(-2, a="n", b="1")
    g.set(0.25, a="f", b="1")
    g.set(1e20, a="big", b="1")
    assert g.render().splitlines()[2:] == [
        'g{a="q\\"uote",b="back\\\\slash\\nnl"} +Inf',
        'g{a="x",b="y"} -Inf',
        'g{a="x",b="z"} NaN',
        'g{a="n",b="1"} -2',
        'g{a="f",b="1"} 0.25',
        'g{a="big",b="1"} 1e+20',
    ]


def test_counter_rules() -> None:
    c = Counter("c_total", "h", ["peer"])
    with pytest.raises(ValueError, match="cannot decrease"):
        c.inc(-1, peer="a")
    with pytest.raises(ValueError, match="takes labels"):
        c.inc()
    with pytest.raises(ValueError, match="takes labels"):
        c.inc(peer="a", extra="b")
    c.inc(peer=7)  # values are stringified
    assert c.value(peer="7") == 1
    assert c.value(peer="never") == 0
    c.remove(peer="7")
    assert c.samples() == []


def test_gauge_ops_and_function() -> None:
    g = Gauge("g", "h")
    g.inc(5)
    g.dec(2)
    assert g.value() == 3
    items = [1, 2]
    g.set_function(lambda: len(items))
    items.append(3)
    assert g.render().endswith("g 3\n")
    with pytest.raises(ValueError, match="without labels"):
        Gauge("l", "h", ["x"]).set_function(lambda: 1)


@pytest.mark.parametrize(
    ("name", "labels"),
    [
        ("1bad", ()),
        ("with-dash", ()),
        ("", ()),
        ("ok", ("bad-label",)),
        ("ok", ("__x",)),
        ("ok", ("a", "a")),
    ],
)
def test_invalid_names(name: str, labels: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        Counter(name, "h", labels)


def test_duplicate_registration(registry: Registry) -> None:
    with pytest.raises(ValueError, match="already registered"):
        registry.gauge("ipc_connections", "again")


def test_snapshot(registry: Registry) -> None:
    snap = registry.snapshot()
    assert snap == {
        "ipc_connections": 3,
        "ipc_accepted_total": [
            {"labels": {"proto": "tcp"}, "value": 3},
            {"labels": {"proto": "tls"}, "value": 1},
        ],
        "ipc_refused_total": [],
    }
    json.dumps(snap)
