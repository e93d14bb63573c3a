"""The flow table of ipc-udpd (daemons/engine/flows.py), with a fake clock:
limits in total and per source, expiry in order of last activity."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemons.engine.flows import FlowLimits, FlowTable


def table(max_flows: int = 10, per_source: int = 3, timeout: float = 60.0) -> FlowTable[str]:
    return FlowTable(FlowLimits(max_flows, per_source, timeout))


def test_open_get_remove_and_counts() -> None:
    t = table()
    flow = t.open("a:1", "a", 0.0, state="x")
    assert t.get("a:1") is flow and "a:1" in t and len(t) == 1
    assert flow.state == "x" and t.count("a") == 1
    assert t.remove(flow) and not t.remove(flow)
    assert t.get("a:1") is None and t.count("a") == 0 and len(t) == 0
    with pytest.raises(KeyError):
        t.open("b:1", "b", 0.0)
        t.open("b:1", "b", 0.0)


def test_per_source_limit() -> None:
    t = table(per_source=2)
    t.open("a:1", "a", 0.0)
    assert t.refusal("a") is None
    second = t.open("a:2", "a", 0.0)
    kind, reason = t.refusal("a") or ("", "")
    assert kind == "too many flows from one address" and "--max-flows-per-ip" in reason
    assert t.refusal("b") is None  # another source
    assert t.refusal(None) is None  # no source: not limited per source
    t.remove(second)
    assert t.refusal("a") is None


def test_total_limit_wins() -> None:
    t = table(max_flows=2, per_source=0)
    t.open("a:1", "a", 0.0)
    t.open("a:2", "a", 0.0)  # per_source 0: no per-source limit
    kind, reason = t.refusal("b") or ("", "")
    assert kind == "too many flows" and "--max-flows 2" in reason


def test_expiry_in_order_of_last_activity() -> None:
    t = table(timeout=10.0)
    a = t.open("a", "s", 0.0)
    b = t.open("b", "s", 1.0)
    c = t.open("c", "s", 2.0)
    t.touch(a, 5.0)  # a is now the newest
    assert a.datagrams == 1
    assert t.next_expiry() == 11.0  # b
    assert t.expired(10.9) == []
    assert t.expired(12.0) == [b, c]
    assert list(t) == [a] and t.count("s") == 1
    assert t.expired(15.0) == [a]
    assert t.next_expiry() is None


def test_no_timeout_never_expires() -> None:
    t = table(timeout=0)
    t.open("a", None, 0.0)
    assert t.expired(1e9) == [] and t.next_expiry() is None


def test_touching_a_removed_flow_does_not_revive_it() -> None:
    t = table()
    flow = t.open("a", "s", 0.0)
    t.remove(flow)
    t.touch(flow, 1.0)
    assert "a" not in t and len(t) == 0


def test_bad_limits() -> None:
    for args in ((0, 1, 1.0), (1, -1, 1.0), (1, 1, -1.0)):
        with pytest.raises(ValueError):
            FlowLimits(*args)


@given(
    st.lists(
        st.tuples(st.sampled_from(["open", "touch", "remove", "expire"]), st.integers(0, 7)),
        max_size=80,
    )
)
def test_counts_stay_consistent(ops: list[tuple[str, int]]) -> None:
    """Whatever happens, the per-source counts are the flows in the table,
    and the limits hold."""
    t: FlowTable[int] = FlowTable(FlowLimits(5, 2, 3.0))
    now = 0.0
    for op, n in ops:
        now += 1.0
        source = str(n % 3)
        flow = t.get(n)
        if op == "open" and flow is None and t.refusal(source) is None:
            t.open(n, source, now)
        elif op == "touch" and flow is not None:
            t.touch(flow, now)
        elif op == "remove" and flow is not None:
            t.remove(flow)
        elif op == "expire":
            for gone in t.expired(now):
                assert now - gone.last >= 3.0
        assert len(t) <= 5
        for s in "012":
            assert t.count(s) == sum(1 for f in t if f.source == s) <= 2
