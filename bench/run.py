"""Run the benchmarks against their peers and write docs/performance.md (+ .png).

python -m bench.run                    # everything, 3 runs per figure (make bench)
python -m bench.run --quick --only core --no-write
python -m bench.run --report-from bench/results/last.json   # rewrite the docs only
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from . import report
from .harness import C_DIR, ROOT, BenchError, Config, Harness
from .model import SuiteResult
from .servers import c_tools_missing
from .suites import SUITES


def _interrupt(signum, frame):  # SIGTERM/SIGHUP: stop like Ctrl-C (everything gets cleaned)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--runs", type=int, help="runs per figure (default 3; the median is kept)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 run, short durations, fewer connections; "
        "does not write the docs unless --write",
    )
    ap.add_argument(
        "--only",
        default=",".join(SUITES),
        help=f"comma-separated suites (default: {','.join(SUITES)})",
    )
    ap.add_argument("--duration", type=float, help="seconds per measurement (default 3)")
    ap.add_argument(
        "--cpu", default="0", help="CPU the pinned figures use (taskset -c); '' to not pin"
    )
    ap.add_argument("--no-write", action="store_true", help="print only, write no files")
    ap.add_argument("--write", action="store_true", help="with --quick: write the docs anyway")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md")
    ap.add_argument(
        "--json",
        type=Path,
        default=ROOT / "bench" / "results" / "last.json",
        help="where the raw results go (not with --no-write)",
    )
    ap.add_argument(
        "--report-from",
        type=Path,
        metavar="JSON",
        help="rewrite the report from saved results, run nothing",
    )
    args = ap.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SUITES)
    if unknown:
        ap.error(f"unknown suite(s) {', '.join(sorted(unknown))}; known: {', '.join(SUITES)}")
    return args


def _build_c_tools() -> str | None:
    if c_tools_missing():
        subprocess.run(["make", "-s", "-C", str(C_DIR)], capture_output=True)
    return c_tools_missing()


def _run_suite(name: str, cfg: Config) -> SuiteResult:
    suite = SUITES[name]
    res = SuiteResult(name, suite.TITLE)
    reason = suite.missing()
    if reason:
        res.skipped = reason
        print(f"[{name}] skipped: {reason}", file=sys.stderr)
        return res
    print(f"[{name}] running...", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    with Harness(cfg) as h:
        try:
            suite.run(h, res)
        except BenchError as e:
            res.skipped = f"failed: {e}"
        except KeyboardInterrupt:
            raise
        except Exception as e:  # report it, carry on with the other suites
            res.skipped = f"crashed: {e!r}"
            res.notes.append("```\n" + traceback.format_exc() + "```")
        res.commands = list(h.commands)
        res.notes += [f"**{i}**" for i in h.incidents]
    res.seconds = time.monotonic() - t0
    print(
        f"[{name}] done in {res.seconds:.0f} s" + (f" ({res.skipped})" if res.skipped else ""),
        file=sys.stderr,
        flush=True,
    )
    return res


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.report_from:
        run = json.loads(args.report_from.read_text())
        report.write(run, args.out)
        print(report.console(run))
        return 0

    cfg = Config.quick_config() if args.quick else Config()
    if args.runs:
        cfg.runs = args.runs
    if args.duration:
        cfg.duration = args.duration
    cfg.cpu = args.cpu or None
    write = not args.no_write and (not args.quick or args.write)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    # Ctrl-C, even when started in the background (where SIGINT starts ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    missing = _build_c_tools()
    started, t0 = time.time(), time.monotonic()
    run = {
        "argv": "python -m bench.run " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "config": asdict(cfg),
        "started": started,
        "machine": report.machine(),
        "loadavg_before": os.getloadavg(),
        "suites": [],
    }
    try:
        for name in args.only.split(","):
            if missing:
                res = SuiteResult(name, SUITES[name].TITLE, skipped=missing)
            else:
                res = _run_suite(name, cfg)
            run["suites"].append(res.to_dict())
            run.setdefault("loadavg_suites", {})[name] = os.getloadavg()[0]
    except KeyboardInterrupt:
        print("\ninterrupted: every process stopped, nothing written", file=sys.stderr)
        return 130
    run["seconds"] = time.monotonic() - t0
    run["loadavg_after"] = os.getloadavg()

    print(report.console(run))
    if write:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(run, indent=1, default=str))
        report.write(run, args.out)
        print(f"wrote {args.out} and {args.out.with_suffix('.png')} (raw: {args.json})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
