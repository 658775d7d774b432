"""Run the CPU benchmarks one after another and print a summary table of each ratio against its target.

Each benchmark runs in its own process (its output is passed through as it comes); the table is built from the
``BENCH_JSON`` line each prints last. Missed targets are reported, never turned into a failing exit status; the exit
status is non-zero only when a benchmark itself failed.

    python -m bench.run_all [--all]        # `make bench`
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from bench.common import JSON_PREFIX

BENCHES: list[list[str]] = [
    ["bench.trim_overhead"],
    ["bench.window_scaling"],
    ["bench.checkpoint_overhead"],
    ["bench.gpu", "--preset", "tiny", "--device", "cpu"],
]


def run_one(args: list[str]) -> tuple[int, dict[str, Any] | None, float]:
    """Run ``python -m <args>``, echoing its output; returns (exit status, its JSON payload, seconds)."""
    command = [sys.executable, "-m", *args]
    print(f"\n$ python -m {' '.join(args)}", flush=True)
    began = time.perf_counter()
    payload = None
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None  # guaranteed by stdout=PIPE
        for line in proc.stdout:
            if line.startswith(JSON_PREFIX):
                payload = json.loads(line[len(JSON_PREFIX):])
            else:
                print(line, end="", flush=True)
    return proc.returncode, payload, time.perf_counter() - began


def summary(rows: list[dict[str, Any]], show_all: bool) -> str:
    """A fixed-width table: bench, figure, value, target, status."""
    lines = [f"{'bench':<20} {'figure':<68} {'value':>10} {'target':>10}  status", "-" * 118]
    for r in rows:
        if r["target"] is None and not show_all:
            continue
        target = "-" if r["target"] is None else f"{r['op']} {r['target']:g}"
        status = "info" if r["target"] is None else _status(r)
        lines.append(f"{r['bench']:<20} {r['name'][:68]:<68} {r['value']:>8.3f}{r['unit']:<3}{target:>9}  {status}")
    return "\n".join(lines)


def _status(r: dict[str, Any]) -> str:
    value, target = r["value"], r["target"]
    if value != value:
        return "n/a"
    ok = value <= target if r["op"] == "<=" else value >= target
    return "ok" if ok else "MISSED"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="list the information rows in the table too")
    args = parser.parse_args()
    began = time.perf_counter()
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    for bench in BENCHES:
        code, payload, seconds = run_one(bench)
        print(f"  ({seconds:.0f} s, exit status {code})", flush=True)
        if code != 0 or payload is None:
            failed.append(" ".join(bench))
        if payload is not None:
            rows += payload["results"]
    print(f"\nSummary ({time.perf_counter() - began:.0f} s in all; every figure is a ratio measured in one run):")
    print(summary(rows, args.all))
    missed = [r["name"] for r in rows if r["target"] is not None and _status(r) == "MISSED"]
    if missed:
        print(f"\nMissed targets: {missed}")
    if failed:
        print(f"\nBenchmarks that failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
