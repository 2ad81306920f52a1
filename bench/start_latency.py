"""Print start latency, encrypted vs clear, side by side in one run.

On a real local stack (klippy in debug-output mode, Moonraker with the
component): for each size, the same G-code uploaded in clear and encrypted,
then POST /printer/print/start until print_stats says "printing" (polled
with /printer/objects/query; a UI sees it at its next 250 ms status push).
Also Moonraker's RSS idle and while printing an encrypted file. JSON in
bench/results/start_latency.json, a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from stack import Stack, wait_for  # noqa: E402

import report  # noqa: E402 - bench/report.py, beside this script

MiB = 1 << 20


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="1,64,256")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "start_latency.json"))
    args = ap.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="encprint-bench-start-"))
    key = work / "printer.key"
    recipient = subprocess.run([ROOT / "bin" / "encprint", "keygen", "-o", key],
                               capture_output=True, text=True, check=True).stdout.strip()
    stack = Stack(work / "stack", printer_cfg="[encrypted_file_bridge]\n",
                  moonraker_cfg=(f"[encrypted_print]\nhelper: {ROOT / 'bin/encprint-helper'}\n"
                                 f"identity: {key}\n"))
    results = []
    try:
        stack.start()
        wait_for(lambda: stack.ui.get("/server/encrypted_print/status")["result"]["ready"],
                 30, "the component")
        idle_rss = rss_kib(stack.moonraker.pid)
        print_rss = 0
        for size in [int(s) for s in args.sizes.split(",")]:
            line = b"G1 X10.5 Y20.5 F6000 ; start latency benchmark\n"
            plain = (line * (size * MiB // len(line) + 1))[:size * MiB]
            enc = subprocess.run([ROOT / "bin" / "encprint", "encrypt", "-r", recipient,
                                  "--metadata", "none", "-o", "-", "-"], input=plain,
                                 capture_output=True, check=True).stdout
            stack.ui.upload(f"clear-{size}.gcode", plain)
            stack.ui.upload(f"enc-{size}.gcode", enc)
            del plain, enc
            row = {"size_mib": size, "clear_ms": [], "encrypted_ms": []}
            for _ in range(args.runs):
                for kind in ("clear", "encrypted"):
                    name = f"{'clear' if kind == 'clear' else 'enc'}-{size}.gcode"
                    t = time.perf_counter()
                    stack.ui.start_print(name)
                    def started(n=name) -> bool:
                        ps = stack.ui.query("print_stats")["print_stats"]
                        return ps["state"] in ("printing", "complete") and ps["filename"] == n
                    wait_for(started, 120, "printing", interval=0)
                    row[f"{kind}_ms"].append((time.perf_counter() - t) * 1000)
                    if kind == "encrypted":
                        print_rss = max(print_rss, rss_kib(stack.moonraker.pid))
                    stack.ui.post("/printer/print/cancel")
                    wait_for(lambda: stack.ui.query("print_stats")["print_stats"]["state"]
                             in ("cancelled", "complete"), 60, "the cancel")
                    wait_for(lambda: stack.ui.get("/server/encrypted_print/status")["result"]
                             ["active_job"] is None, 10, "the release")
            for kind in ("clear", "encrypted"):
                row[f"{kind}_ms_median"] = round(statistics.median(row[f"{kind}_ms"]), 1)
            row["overhead_ms"] = round(row["encrypted_ms_median"] - row["clear_ms_median"], 1)
            results.append(row)
            print(f"  {size} MiB done", file=sys.stderr)
    finally:
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)
    out = report.write(args.out, {
        "machine": report.machine(), "command": "make bench", "runs": args.runs,
        "results": results,
        "moonraker_rss_kib": {"idle": idle_rss, "printing_encrypted": print_rss}})
    print("| size | clear: start → printing | encrypted: start → printing | overhead |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['size_mib']} MiB | {r['clear_ms_median']} ms | "
              f"{r['encrypted_ms_median']} ms | {r['overhead_ms']} ms |")
    print(f"\nMoonraker RSS: {idle_rss / 1024:.1f} MiB idle, "
          f"{print_rss / 1024:.1f} MiB while printing an encrypted file")
    print(f"(median of {args.runs} runs; JSON in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
