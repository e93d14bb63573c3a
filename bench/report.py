"""The console summary, docs/performance.md and the chart docs/performance.png."""

from __future__ import annotations

import os
import platform
import subprocess
import textwrap
import time
from pathlib import Path

from .model import Check, SuiteResult

PEER_PACKAGES = {  # name shown -> Debian package
    "socat": "socat",
    "stunnel4": "stunnel4",
    "hitch": "hitch",
    "websocketd": "websocketd",
    "websockify": "python3-websockify",
    "OpenSSL": "openssl",
    "gcc": "gcc",
}


def _package_version(pkg: str) -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "not installed"


def _first_line(cmd: list[str], grep: str = "") -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    lines = [ln for ln in lines if grep in ln] or lines
    return lines[0] if lines else "?"


def machine() -> dict:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {name: _package_version(pkg) for name, pkg in PEER_PACKAGES.items()}
    return {
        "uname": " ".join(platform.uname())
        if not Path("/bin/uname").exists()
        else _first_line(["uname", "-a"]),
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
    }


# --- shared ----------------------------------------------------------------


def _suites(run: dict) -> list[SuiteResult]:
    return [SuiteResult.from_dict(s) for s in run["suites"]]


def _verdict(c: Check) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[c.ok]


def _value(c: Check) -> str:
    if c.value is None:
        return "-"
    if c.unit == "ok":
        return "yes" if c.ok else "no"
    if c.unit == "x":
        return f"{c.value:.2f}x"
    digits = 0 if abs(c.value) >= 100 else 2
    return f"{c.value:,.{digits}f}{(' ' + c.unit) if c.unit else ''}"


def _target(c: Check) -> str:
    if c.unit == "ok":
        return "yes"
    unit = "x" if c.unit == "x" else (f" {c.unit}" if c.unit else "")
    text = f"{'≥' if c.op == '>=' else '≤'} {c.target:g}{unit}"
    if c.aim is not None:
        text += f" (aim {c.aim:g}{unit})"
    return text


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    def esc(cell: str) -> str:
        return str(cell).replace("|", "\\|").replace("\n", " ")

    out = [
        "| " + " | ".join(map(esc, headers)) + " |",
        "|" + "|".join(" --- " for _ in headers) + "|",
    ]
    out += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(out)


def _text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    line = "  ".join(f"{{:{w}}}" for w in widths)
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line.format(*headers), sep, *(line.format(*map(str, r)) for r in rows)])


def _check_rows(suites: list[SuiteResult]) -> list[list[str]]:
    return [
        [s.name, c.name, _value(c), _target(c), _verdict(c), c.detail]
        for s in suites
        for c in s.checks
    ]


CHECK_HEADERS = ["suite", "figure", "value", "target", "result", "behind it"]


def console(run: dict) -> str:
    out = []
    for s in _suites(run):
        out.append(f"\n== {s.name}: {s.title}")
        if s.skipped:
            out.append(f"   SKIPPED: {s.skipped}")
        for t in s.tables:
            out.append(f"-- {t.title}")
            out.append(_text_table(t.headers, t.rows))
        for n in s.notes:
            out.append(f"   note: {n}")
    out.append(f"\n== targets (medians of {run['config']['runs']} run(s) each)")
    out.append(_text_table(CHECK_HEADERS, _check_rows(_suites(run))))
    return "\n".join(out)


# --- markdown ----------------------------------------------------------------


def _noise(run: dict) -> str:
    before = run["loadavg_before"][0]
    during = run.get("loadavg_suites")
    n = run["machine"]["nproc"] or 1
    if during:
        text = f"1-minute load average {before:.2f} at the start, then after each suite: " + (
            ", ".join(f"{k} {v:.2f}" for k, v in during.items())
        )
    else:
        during = {"end": run.get("loadavg_after", [0])[0]}
        text = f"1-minute load average {before:.2f} at the start, {during['end']:.2f} at the end"
    peak = max(before, *during.values())
    text += f", on {n} CPU(s)"
    if peak > 0.5:
        text += (
            ": other work was running on the machine during the benchmarks (up to "
            f"{peak:.1f} processes wanting a CPU), so the figures are noisy; see the "
            "run spread column ((max - min) / median over the runs)"
        )
    return text


def _summary_notes(run: dict, suites: list[SuiteResult]) -> list[str]:
    notes = [f"- Noise: {_noise(run)}."]
    for s in suites:
        if s.skipped:
            notes.append(f"- Suite {s.name} not measured: {s.skipped}")
        for c in s.checks:
            if c.value is None:
                notes.append(f"- Not measured: {s.name}, {c.name}: {c.detail}")
    notes.append(
        "- Each suite's section below has its figures, notes (what a failure "
        "means, what was found) and the exact commands."
    )
    return ["## Notes", "", *notes, ""]


def markdown(run: dict) -> str:
    suites = _suites(run)
    cfg, m = run["config"], run["machine"]
    date = time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(run["started"]))
    checks = [c for s in suites for c in s.checks]
    passed = sum(c.ok is True for c in checks)
    failed = sum(c.ok is False for c in checks)
    out = [
        "# Performance",
        "",
        f"Written by `make bench` (`{run['argv'].strip()}`) on {date}, in "
        f"{run['seconds'] / 60:.1f} min. Every figure is the median of {cfg['runs']} "
        f"run(s); do not edit by hand: run `make bench` again (or `python -m bench.run "
        f"--report-from bench/results/last.json` to re-render saved results).",
        "",
    ]
    if cfg.get("quick"):
        out += [
            "**This is a --quick smoke run: short durations, 1 run, fewer connections. "
            "The figures are not meaningful.**",
            "",
        ]
    out += [
        f"**{passed} of {len(checks)} targets met, {failed} missed"
        + (
            f", {len(checks) - passed - failed} not measured"
            if len(checks) - passed - failed
            else ""
        )
        + ".**",
        "",
        _md_table(CHECK_HEADERS, _check_rows(suites)),
        "",
        "![ratios against their targets](performance.png)",
        "",
        *_summary_notes(run, suites),
        "## Machine",
        "",
        f"- `uname -a`: `{m['uname']}`",
        f"- CPU: {m['cpu']}, `nproc` = {m['nproc']}",
        f"- Python {m['python']}; peers: "
        + "; ".join(f"{k}: `{v}`" for k, v in m["versions"].items()),
        "",
        "## Method",
        "",
        "- Load comes from `bench/c/build/loadgen` (single-threaded C, epoll; see "
        "[bench/c/README.md](../bench/c/README.md)); every relay is put in front of the "
        "same echo service on a Unix socket, the C `echo_server` unless said otherwise, "
        "so that what differs between two rows is the relay alone.",
        f"- Pinned figures: every server and the client run under `taskset -c {cfg['cpu']}` "
        "(the machine is a small VM where cross-CPU wake-ups cost more than the work); a "
        "ratio compares two pinned figures. The core suite also gives unpinned figures.",
        f"- Each measurement: {cfg['warmup']} s warm-up, then {cfg['duration']} s measured; "
        f"the {cfg['runs']} runs of the variants are interleaved (A B C A B C ...) so that a "
        "noisy moment does not fall on one variant only; the tables give medians and the "
        "run spread.",
        "- Memory: VmRSS from /proc/PID/status, summed over the server's process tree "
        "(forking servers: websockify, websocketd's `cat`s, socat's children); PSS "
        "(/proc/PID/smaps_rollup, shared pages split between the processes sharing them) "
        "beside it, the fairer figure for forking servers. Per connection = (held - idle) / N.",
        "- Every process runs in its own process group under a temporary directory, is "
        "stopped with SIGTERM (then SIGKILL) at the end of its suite, also on Ctrl-C; "
        "only 127.0.0.1 and free ports are used.",
        "",
    ]
    for s in suites:
        out += [f"## {s.name}: {s.title}", ""]
        if s.skipped:
            out += [f"**Not measured: {s.skipped}**", ""]
        for t in s.tables:
            out += [f"### {t.title}", "", _md_table(t.headers, t.rows), ""]
        if s.checks:
            out += [
                "Targets:",
                "",
                _md_table(CHECK_HEADERS[1:], [r[1:] for r in _check_rows([s])]),
                "",
            ]
        if s.notes:
            out += ["Notes:", ""] + [f"- {n}" for n in s.notes if not n.startswith("```")]
            out += [n for n in s.notes if n.startswith("```")] + [""]
        if s.commands:
            out += [
                "Commands (`$TMP` = the run's temporary directory, `$PORT` = a free port):",
                "",
                "```sh",
                *s.commands,
                "```",
                "",
            ]
        out += [f"({s.seconds:.0f} s)", ""]
    return "\n".join(out)


# --- chart -------------------------------------------------------------------


def chart(run: dict, path: Path) -> str | None:
    """Bar chart of the checks; returns why not if matplotlib is missing.

    Top: ratios to a peer, with the target as a black mark. Bottom: the other
    targets (latency, memory, ...), as the value relative to its limit.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (pip install -e '.[bench]'): no chart"
    checks = [c for s in _suites(run) for c in s.checks]
    ratios = [c for c in checks if c.unit == "x"]
    limits = [c for c in checks if c.unit != "x"]
    groups = [
        (g, t)
        for g, t in (
            (ratios, "ratio to the peer (bar) and target (black mark)"),
            (limits, "other targets: value relative to its limit (black mark = the limit)"),
        )
        if g
    ]
    if not groups:
        return "no targets measured: no chart"
    colors = {True: "#3a9a4a", False: "#c8413b", None: "#bbbbbb"}
    fig, axes = plt.subplots(
        len(groups),
        1,
        squeeze=False,
        figsize=(12, 0.36 * len(checks) + 1.2 * len(groups) + 0.6),
        gridspec_kw={"height_ratios": [len(g) + 1 for g, _ in groups]},
    )
    for ax, (group, title) in zip(axes[:, 0], groups, strict=True):
        ax.set_title(title, fontsize=10, loc="left")
        group = group[::-1]
        labels = [textwrap.shorten(f"{c.suite}: {c.name}", 75, placeholder="...") for c in group]
        if group is not None and group[0].unit == "x":
            values = [c.value or 0 for c in group]
            targets = [c.target for c in group]
            cap = min(max([*values, *targets]) * 1.05, max(targets) * 2.5)
        else:
            values = [(c.value or 0) / c.target * 100 if c.target else 0 for c in group]
            targets = [100.0 for _ in group]
            cap = 250.0
        shown = [min(v, cap) for v in values]
        y = list(range(len(group)))
        ax.barh(y, shown, color=[colors[c.ok] for c in group], height=0.62)
        ax.scatter(targets, y, marker="|", s=260, color="black", zorder=3)
        for yi, c, v, t in zip(y, group, shown, targets, strict=True):
            text = _value(c) if c.value is not None else "not measured"
            ax.text(
                max(v, t) + cap * 0.01,
                yi,
                f"{text}  (target {_target(c)})",
                va="center",
                fontsize=7.5,
            )
        ax.set_yticks(y, labels, fontsize=8)
        ax.set_xlim(0, cap * 1.35)
        ax.set_ylim(-0.6, len(group) - 0.4)
        ax.grid(axis="x", alpha=0.3)
        if group[0].unit != "x":
            ax.xaxis.set_major_formatter(lambda x, _pos: f"{x:.0f}%")
    date = time.strftime("%Y-%m-%d", time.localtime(run["started"]))
    runs = run["config"]["runs"]
    fig.suptitle(
        f"libipc daemons vs their peers ({date}): pinned to one CPU, medians of {runs} "
        f"run{'s' if runs != 1 else ''}; green = target met, red = missed, grey = not measured",
        fontsize=10.5,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write(run: dict, md_path: Path) -> None:
    png = md_path.with_suffix(".png")
    md = markdown(run)
    why = chart(run, png)
    if why:
        md = md.replace("![ratios against their targets](performance.png)", f"({why})")
    md_path.write_text(md)
