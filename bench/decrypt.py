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
import json
import os
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


def age_identity(key: pathlib.Path) -> pathlib.Path:
    """The identity for `age -i`: the AGE-SECRET-KEY line of an encprint
    identity file, whose first line (not UTF-8, by design) age refuses."""
    out = key.with_name(key.name + ".age")
    lines = [ln for ln in key.read_bytes().splitlines() if ln.startswith(b"AGE-SECRET-KEY-")]
    out.write_bytes(b"\n".join(lines) + b"\n")
    out.chmod(0o600)
    return out


def own_rss_kib(peak_kib: int, memfd_bytes: int) -> int:
    """The helper's own peak RSS: without the memfd's pages if it mapped
    them (its own memory is far below the dense file's memfd)."""
    mapped = memfd_bytes // 1024
    return peak_kib - mapped if peak_kib > mapped else peak_kib


def dense_gcode_path(given: str) -> pathlib.Path:
    """The dense worst case (bench/dense_gcode.py), sliced once and cached
    outside the repository (it is synthetic, but 425 MB)."""
    if given:
        return pathlib.Path(given)
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
    path = cache / "encprint-bench" / "dense.gcode"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"  slicing the dense tower into {path} (a minute or two)", file=sys.stderr)
        subprocess.run(["xvfb-run", "-a", sys.executable, str(ROOT / "bench" / "dense_gcode.py"),
                        str(path)], check=True, stdout=subprocess.DEVNULL)
    return path


# The helper, timed from request to sealed memfd inside one Python process
# (helper start-up included, Python's not) for every run.
PAYLOAD_RUNNER = """
import asyncio, json, sys, time
sys.path.insert(0, sys.argv[1])
import decrypt as b
ep = b.load_client()
c = ep.HelperClient(sys.argv[2], sys.argv[3], decrypt_timeout=3600)
times = []
for _ in range(int(sys.argv[6])):
    t = time.perf_counter()
    df = asyncio.run(c.decrypt(sys.argv[4], sys.argv[5]))
    times.append(time.perf_counter() - t)
    size, gcode_size = df.size, df.gcode_size
    df.close()
print(json.dumps({"times": times, "size": size, "gcode_size": gcode_size}))
"""


def payload_bench(args) -> int:
    """Issue 16's decrypt goals on the dense PrusaSlicer file: the helper
    (request to sealed memfd) against `age -d` to /dev/shm and, for a
    compressed payload, `age -d | gunzip` to /dev/shm (the stock way to get
    the G-code), for a stock-age file, encprint's default (compressed,
    unsigned), and signed files, on one core and on two (taskset)."""
    gcode = dense_gcode_path(args.dense)
    work = pathlib.Path(tempfile.mkdtemp(prefix="encprint-bench-", dir="/dev/shm"))
    key, pub = work / "printer.key", work / "publisher.key"
    recipient = subprocess.run([BIN / "encprint", "keygen", "-o", key], capture_output=True,
                               text=True, check=True).stdout.strip()
    subprocess.run([BIN / "encprint", "sign-keygen", "-o", pub], capture_output=True, check=True)
    age_key = age_identity(key)
    gcodes = work / "gcodes"
    gcodes.mkdir()
    enc = ["encprint", "encrypt", "-r", recipient, "--metadata", "none"]
    kinds = [
        ("stock age (plain)", ["age", "-r", recipient], False),
        ("encprint default (compressed)", enc, True),
        ("signed v2, compressed (default)", enc + ["--sign", str(pub)], True),
        ("signed v2, --no-compress", enc + ["--sign", str(pub), "--no-compress"], False),
    ]
    runner = work / "payload_runner.py"
    runner.write_text(PAYLOAD_RUNNER)
    # The helper's own peak RSS, from GNU time wrapped around it alone (the
    # runner may have other children).
    rss_log = work / "helper_rss"
    timed_helper = work / "timed-helper"
    timed_helper.write_text(f"#!/bin/sh\nexec /usr/bin/time -a -o {rss_log} -f %M "
                            f"{BIN / 'encprint-helper'} \"$@\"\n")
    timed_helper.chmod(0o755)
    results = []
    try:
        for i, (name, argv, compressed) in enumerate(kinds):
            path = gcodes / f"kind{i}.gcode"
            t = time.perf_counter()
            tool = argv[0] if argv[0] == "age" else str(BIN / argv[0])
            subprocess.run([tool, *argv[1:], "-o", path, gcode], check=True, capture_output=True)
            enc_s = time.perf_counter() - t
            for cpus in args.cpus.split(";"):
                taskset = ["taskset", "-c", cpus]
                out = subprocess.run(
                    [*taskset, sys.executable, str(runner), str(ROOT / "bench"),
                     str(BIN / "encprint-helper"), str(key), str(path), str(gcodes),
                     str(args.runs)], capture_output=True, text=True, check=True).stdout
                h = json.loads(out)
                rss_log.write_text("")
                subprocess.run([*taskset, sys.executable, str(runner), str(ROOT / "bench"),
                                str(timed_helper), str(key), str(path), str(gcodes), "1"],
                               capture_output=True, check=True)
                h["rss_kib"] = max(int(x) for x in rss_log.read_text().split())
                row = {"kind": name, "cpus": cpus, "file_bytes": path.stat().st_size,
                       "gcode_bytes": h["gcode_size"], "memfd_bytes": h["size"],
                       "encrypt_s": round(enc_s, 2), "helper_s": h["times"],
                       # Its peak RSS minus the memfd pages it maps to check them
                       # (a compressed payload; a plain one is written with pwrite
                       # and never mapped, so its pages are not in the RSS).
                       "helper_rss_own_kib": own_rss_kib(h["rss_kib"], h["size"]),
                       "age_s": [], "age_gunzip_s": []}
                dst = work / "out"
                for _ in range(args.runs):
                    secs, _ = child_peak_kib([*taskset, "age", "-d", "-i", str(age_key), "-o",
                                              str(dst), str(path)])
                    row["age_s"].append(secs)
                    dst.unlink()
                    if compressed:
                        secs, _ = child_peak_kib([*taskset, "sh", "-c",
                                                  f"age -d -i {age_key} {path} | gunzip > {dst}"])
                        row["age_gunzip_s"].append(secs)
                        dst.unlink()
                hs = statistics.median(row["helper_s"])
                row["helper_mbps"] = round(row["gcode_bytes"] / hs / 1e6, 1)
                row["vs_age"] = round(statistics.median(row["age_s"]) / hs, 2)
                if compressed:
                    row["vs_age_gunzip"] = round(statistics.median(row["age_gunzip_s"]) / hs, 2)
                results.append(row)
                print(f"  {name}, cpus {cpus} done", file=sys.stderr)
            path.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = report.write(args.out_payloads, {
        "machine": report.machine(loadavg=os.getloadavg()), "gcode": str(gcode),
        "command": "bench/decrypt.py --payloads", "runs": args.runs, "results": results})
    print("| file | cores | file / memfd / G-code | helper → sealed memfd | age -d → /dev/shm "
          "| age -d \\| gunzip → /dev/shm | helper vs age -d | helper vs age -d \\| gunzip "
          "| helper RSS (own) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        med = {k: statistics.median(r[k]) if r[k] else None
               for k in ("helper_s", "age_s", "age_gunzip_s")}
        gz = f"{med['age_gunzip_s']:.2f} s" if med["age_gunzip_s"] else "-"
        print(f"| {r['kind']} | {r['cpus']} | {r['file_bytes'] / 1e6:.0f} / "
              f"{r['memfd_bytes'] / 1e6:.0f} / {r['gcode_bytes'] / 1e6:.0f} MB "
              f"({100 * r['memfd_bytes'] / r['gcode_bytes']:.1f}%) | {med['helper_s']:.2f} s | "
              f"{med['age_s']:.2f} s | {gz} | {r['vs_age']}x | {r.get('vs_age_gunzip', '-')}"
              f"{'x' if 'vs_age_gunzip' in r else ''} | "
              f"{r['helper_rss_own_kib'] / 1024:.1f} MiB |")
    print(f"\n(median of {args.runs} runs; JSON in {out})")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="16,256,1024", help="MiB, comma separated")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "decrypt.json"))
    ap.add_argument("--payloads", action="store_true",
                    help="instead: stock-age, compressed and signed files of the dense G-code")
    ap.add_argument("--dense", default="", help="the dense G-code (default: sliced and cached)")
    ap.add_argument("--cpus", default="0;0,1", help="taskset CPU lists, ';' separated")
    ap.add_argument("--out-payloads",
                    default=str(ROOT / "bench" / "results" / "decrypt_payloads.json"))
    args = ap.parse_args()
    if shutil.which("age") is None:
        sys.exit("bench: the age command is missing (scripts/bootstrap.sh installs it)")
    if args.payloads:
        return payload_bench(args)
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
                secs, rss = child_peak_kib(["age", "-d", "-i", str(age_identity(key)), "-o",
                                            str(dst), str(enc)])
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
