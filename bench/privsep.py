"""The cost of the helper's privilege step (ADR-007), side by side.

The same helper binary, the same file (a 152 KiB stock-age vector), the same
unprivileged caller over a real socket: once installed set-user-ID (opens its
own identity, policy and state, starts the state keeper, drops the
privilege, and for decrypt counts the print on disk), once as a plain copy
naming its identity. Runs the Go benchmarks of helper/cmd/encprint-helper
(they need root to install the set-user-ID copy) and writes
bench/results/privsep.json with the median per operation and the
difference; the budget is 5 ms.
"""
from __future__ import annotations

import argparse
import pathlib
import re
import statistics
import subprocess
import sys

import report  # bench/report.py, beside this script

ROOT = pathlib.Path(__file__).resolve().parent.parent
LINE = re.compile(r"^Benchmark(Inspect|Decrypt)(Plain|Installed)-\d+\s+\d+\s+(\d+) ns/op")
BUDGET_MS = 5.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "privsep.json"))
    args = ap.parse_args()
    res = subprocess.run(
        ["go", "test", "-count", str(args.runs), "-run", "^$", "-bench", ".",
         "-benchtime", f"{args.iterations}x", "./helper/cmd/encprint-helper"],
        cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stdout + res.stderr, file=sys.stderr)
        return 1
    samples: dict = {}
    for line in res.stdout.splitlines():
        m = LINE.match(line)
        if m:
            samples.setdefault((m[1].lower(), m[2].lower()), []).append(int(m[3]) / 1e6)
    if not samples:
        print("no benchmark ran (not root?):\n" + res.stdout, file=sys.stderr)
        return 1
    rows = []
    for op in ("inspect", "decrypt"):
        plain = statistics.median(samples[(op, "plain")])
        inst = statistics.median(samples[(op, "installed")])
        rows.append({"op": op, "plain_ms": round(plain, 2), "installed_ms": round(inst, 2),
                     "added_ms": round(inst - plain, 2), "budget_ms": BUDGET_MS,
                     "samples_plain_ms": samples[(op, "plain")],
                     "samples_installed_ms": samples[(op, "installed")]})
    report.write(args.out, {"machine": report.machine(), "command": "make bench",
                            "runs": args.runs, "iterations": args.iterations,
                            "results": rows})
    print("| op | plain helper | installed helper | added | budget |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['op']} | {r['plain_ms']} ms | {r['installed_ms']} ms | "
              f"{r['added_ms']} ms | {BUDGET_MS} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
