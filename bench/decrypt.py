"""Decrypt benchmarks, side by side in one run (make bench).

For each size: the helper decrypting into a sealed memfd (request to fd, as
Moonraker sees it), `age -d` writing to /dev/shm, and `cat` of the cleartext
to /dev/shm; the peak RSS of each; and `inspect` latency, which should not
depend on the size. Results go to bench/results/decrypt.json and a markdown
table on stdout. The cleartext here is synthetic and lives in /dev/shm.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import report  # bench/report.py, beside this script

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = ROOT / "bin"
MiB = 1 << 20


def load_client():
    """The component's helper client, imported the way Moonraker imports it."""
    sys.path.insert(0, str(ROOT / "tests"))
    from stack import install_plugins
    install_plugins()
    return importlib.import_module("moonraker.components.encrypted_print")


def child_peak_kib(argv: list) -> tuple:
    """Run argv in a fresh Python whose only child is the measured process;
    returns (seconds, peak RSS of that child in KiB)."""
    code = ("import resource,subprocess,sys,time;t=time.perf_counter();"
            "subprocess.run(sys.argv[1:],check=True,stdout=subprocess.DEVNULL);"
            "print(time.perf_counter()-t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True,
                         text=True, check=True).stdout.split()
    return float(out[0]), int(out[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="16,256,1024", help="MiB, comma separated")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "decrypt.json"))
    args = ap.parse_args()
    if shutil.which("age") is None:
        sys.exit("bench: the age command is missing (scripts/bootstrap.sh installs it)")
    ep = load_client()
    work = pathlib.Path(tempfile.mkdtemp(prefix="encprint-bench-", dir="/dev/shm"))
    gcodes = work / "gcodes"
    gcodes.mkdir()
    key = work / "printer.key"
    # -plain: stock `age -d -i` reads it too (the default envelope it cannot).
    recipient = subprocess.run([BIN / "encprint", "keygen", "-plain", "-o", key],
                               capture_output=True, text=True, check=True).stdout.strip()
    client = ep.HelperClient(str(BIN / "encprint-helper"), str(key), decrypt_timeout=3600)
    # The helper's peak RSS: a wrapper makes it the only child of a runner.
    runner = work / "one_decrypt.py"
    runner.write_text(
        "import asyncio,sys\n"
        f"sys.path.insert(0,{str(ROOT / 'bench')!r})\n"
        "import decrypt as b\n"
        "ep=b.load_client()\n"
        "c=ep.HelperClient(sys.argv[1],sys.argv[2],decrypt_timeout=3600)\n"
        "df=asyncio.run(c.decrypt(sys.argv[3],sys.argv[4]))\n"
        "df.close()\n")
    results = []
    try:
        for size_mib in [int(s) for s in args.sizes.split(",")]:
            plain = work / "plain.gcode"
            line = b"G1 X123.456 Y78.901 E0.04567 F2400 ; benchmark line\n"
            with open(plain, "wb") as f:
                block = line * (MiB // len(line) + 1)
                for _ in range(size_mib):
                    f.write(block[:MiB])
            enc = gcodes / "part.enc.gcode"
            subprocess.run([BIN / "encprint", "encrypt", "-r", recipient, "--metadata", "none",
                            "-o", enc, plain], check=True, capture_output=True)
            row = {"size_mib": size_mib, "helper_s": [], "age_s": [], "cat_s": [],
                   "helper_rss_kib": 0, "age_rss_kib": 0, "inspect_ms": []}
            for _ in range(args.runs):
                t = time.perf_counter()
                df = asyncio.run(client.decrypt(str(enc), str(gcodes)))
                row["helper_s"].append(time.perf_counter() - t)
                df.close()
                dst = work / "age.out"
                secs, rss = child_peak_kib(["age", "-d", "-i", str(key), "-o", str(dst), str(enc)])
                row["age_s"].append(secs)
                row["age_rss_kib"] = max(row["age_rss_kib"], rss)
                dst.unlink()
                secs, _ = child_peak_kib(["sh", "-c", f"cat {plain} > {work / 'cat.out'}"])
                row["cat_s"].append(secs)
                (work / "cat.out").unlink()
                t = time.perf_counter()
                asyncio.run(client.inspect(str(enc), str(gcodes)))
                row["inspect_ms"].append((time.perf_counter() - t) * 1000)
            _, row["helper_rss_kib"] = child_peak_kib(
                [sys.executable, str(runner), str(BIN / "encprint-helper"), str(key), str(enc),
                 str(gcodes)])
            # The runner's only child is the helper. Its peak RSS includes the
            # memfd pages it maps while filling them (the product, charged to
            # Moonraker's cgroup either way); its own memory is the rest.
            row["helper_rss_kib"] = max(row["helper_rss_kib"] - size_mib * 1024, 0)
            for k in ("helper_s", "age_s", "cat_s"):
                row[k.replace("_s", "_mibps")] = round(size_mib / statistics.median(row[k]), 1)
            row["speedup_vs_age"] = round(statistics.median(row["age_s"])
                                          / statistics.median(row["helper_s"]), 2)
            row["inspect_ms_median"] = round(statistics.median(row["inspect_ms"]), 2)
            results.append(row)
            plain.unlink()
            enc.unlink()
            print(f"  {size_mib} MiB done", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = report.write(args.out, {"machine": report.machine(), "command": "make bench",
                                  "runs": args.runs, "results": results})
    print("| size | helper → sealed memfd | age -d → /dev/shm | cat → /dev/shm | helper vs age "
          "| helper peak RSS (own) | age peak RSS | inspect |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['size_mib']} MiB | {r['helper_mibps']} MiB/s | {r['age_mibps']} MiB/s | "
              f"{r['cat_mibps']} MiB/s | {r['speedup_vs_age']}x | "
              f"{r['helper_rss_kib'] / 1024:.1f} MiB | {r['age_rss_kib'] / 1024:.1f} MiB | "
              f"{r['inspect_ms_median']} ms |")
    print(f"\n(median of {args.runs} runs; JSON in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
