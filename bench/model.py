"""What a suite hands to the report: tables of figures, checked targets, notes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field


@dataclass
class Check:
    """One target: `value op target` (e.g. ratio >= 1.5)."""

    suite: str
    name: str
    value: float | None
    op: str  # ">=" or "<="
    target: float
    unit: str = "x"  # "x" for ratios, else the unit of value (ms, KiB, ...)
    detail: str = ""  # the two figures behind a ratio
    aim: float | None = None  # a stretch goal, reported but not checked

    @property
    def ok(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.target if self.op == ">=" else self.value <= self.target


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)


@dataclass
class SuiteResult:
    name: str
    title: str
    tables: list[Table] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    seconds: float = 0.0
    commands: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict)

    def check(self, name: str, value: float | None, op: str, target: float, **kw) -> Check:
        c = Check(self.name, name, value, op, target, **kw)
        self.checks.append(c)
        return c

    def check_ratio(
        self,
        name: str,
        ours: float | None,
        peer: float | None,
        op: str,
        target: float,
        unit: str,
        show: Callable[[float | None], str] | None = None,
    ) -> Check:
        """A target on ours / peer, with both figures behind it ("a vs b unit")."""
        show = show or fmt
        return self.check(
            name, ratio(ours, peer), op, target, detail=f"{show(ours)} vs {show(peer)} {unit}"
        )

    def table(self, title: str, headers: list[str]) -> Table:
        t = Table(title, headers)
        self.tables.append(t)
        return t

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SuiteResult:
        d = dict(d)
        d["tables"] = [Table(**t) for t in d.get("tables", [])]
        d["checks"] = [Check(**c) for c in d.get("checks", [])]
        return cls(**d)


# --- formatting helpers shared by the suites -------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt(v: float | None, digits: int = 0, suffix: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}{suffix}"


def fmt1(v: float | None) -> str:
    """One decimal (latencies in µs)."""
    return fmt(v, 1)


def fmt_rate(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1000:,.1f}k" if v >= 10000 else f"{v:,.0f}"


def fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def fairness(r: dict) -> float | None:
    """max/min replies per connection (inf: a connection got none)."""
    lo, hi = r.get("per_conn_min"), r.get("per_conn_max")
    if lo is None or hi is None:
        return None
    return hi / lo if lo else float("inf")


def fmt_fair(r: dict) -> str:
    f = fairness(r)
    if f == float("inf"):
        return "∞ (a connection got 0)"
    return fmt(f, 2)


def spread(r: dict, key: str = "rate") -> str:
    """(max - min) / median of the runs, in percent: how noisy this figure was."""
    vals = [v for v in r.get(f"all_{key}", []) if v is not None]
    if len(vals) < 2 or not r.get(key):
        return "-"
    return f"{(max(vals) - min(vals)) / r[key] * 100:.0f}%"


def status(r: dict) -> str:
    """'' if every run went fine, else a short failure note."""
    if not r.get("ok_runs"):
        return f"FAILED: {r.get('error', 'no result')}"
    if r.get("failed_runs"):
        lost = r["runs"] - r["ok_runs"]
        what = f"{lost} run(s) failed" if lost else f"{r['failed_runs']} run(s) had errors"
        return f"{what}: {r.get('error', '')}"
    if r.get("errors") or r.get("mismatches"):
        return f"errors={r.get('errors', 0):.0f} mismatches={r.get('mismatches', 0):.0f}"
    return ""
