"""The reactor stall one block costs, and the compression, per block size.

Klipper's extra inflates one block of a seekable gzip memfd (docs/format.md)
inside Klipper's reactor when virtual_sdcard reads into it. This measures,
for each block size, the time to inflate every block of a dense PrusaSlicer
file (bench/dense_gcode.py) with the reader the extra uses (SeekgzRaw in
klippy-extras/encrypted_file_bridge.py) from a real memfd: the thread CPU
time (the block's own cost, immune to the other sessions sharing the machine; min of --repeat)
and the wall time (with the noise). JSON in bench/results/inflate_stall.json.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
import dense_gcode  # noqa: E402
import report  # noqa: E402
from bridge_module import load_bridge  # noqa: E402


bridge = load_bridge()


class Running:
    def is_shutdown(self) -> bool:
        return False


def memfd_of(path: pathlib.Path) -> int:
    fd = os.memfd_create("encprint-bench", os.MFD_CLOEXEC)
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            os.write(fd, b)
    return fd


def rss_kib() -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def sequential(fd: int, size: int, name: str) -> dict:
    """Read the whole G-code as virtual_sdcard does (text, 8 KiB reads):
    how fast, and how much this process's RSS grows meanwhile."""
    dup = os.dup(fd)
    f = bridge._Registration("bench.gcode", name, dup, size, Running(), 0,
                             bridge.SeekgzIndex(dup, size)).file
    f.printer = Running()
    before = peak = rss_kib()
    t = time.perf_counter()
    n = 0
    while True:
        data = f.read(8192)
        if not data:
            break
        n += len(data)
        if n % (64 << 20) < 8192:
            peak = max(peak, rss_kib())
    secs = time.perf_counter() - t
    peak = max(peak, rss_kib())
    f.close()
    return {"text_read_mbps": round(n / secs / 1e6, 1), "rss_growth_kib": peak - before}


def measure(payload: pathlib.Path, repeat: int) -> dict:
    size = payload.stat().st_size
    fd = memfd_of(payload)
    ix = bridge.SeekgzIndex(fd, size)
    raw = bridge.SeekgzRaw(fd, str(payload), "bench.gcode", Running(), ix)
    cpu, wall = [], []
    for i in range(ix.blocks()):
        best_cpu, best_wall = float("inf"), 0.0
        for _ in range(repeat):
            t, c = time.perf_counter(), time.thread_time()
            raw._load(i)
            best_cpu = min(best_cpu, time.thread_time() - c)
            best_wall = max(best_wall, time.perf_counter() - t)
        cpu.append(best_cpu)
        wall.append(best_wall)
    seq = sequential(fd, size, str(payload))
    raw.close()
    cpu.sort()
    return {"blocks": ix.blocks(), "clear_bytes": ix.clear_size, "payload_bytes": size,
            "ratio": round(size / ix.clear_size, 4),
            "cpu_ms_max": round(cpu[-1] * 1e3, 3),
            "cpu_ms_p999": round(cpu[int(len(cpu) * 0.999)] * 1e3, 3),
            "cpu_ms_median": round(statistics.median(cpu) * 1e3, 3),
            "wall_ms_max": round(max(wall) * 1e3, 3),
            "inflate_mbps": round(ix.clear_size / sum(cpu) / 1e6, 1), **seq}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gcode", help="G-code to use (default: slice the dense tower)")
    ap.add_argument("--blocks", default="16,32,64,128,256", help="block sizes in KiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pi-factor", type=float, default=10.0,
                    help="how many times slower a Pi Zero 2 W core inflates (estimate)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "inflate_stall.json"))
    args = ap.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="encprint-stall-", dir="/dev/shm"))
    try:
        enc = work / "seekgz_encode"
        subprocess.run(["go", "build", "-o", str(enc), "./bench/seekgz_encode"], cwd=ROOT,
                       check=True)
        gcode = pathlib.Path(args.gcode) if args.gcode else dense_gcode.slice_dense(
            work / "dense.gcode")
        load = os.getloadavg()
        rows = []
        for kib in [int(k) for k in args.blocks.split(",")]:
            payload = work / "payload.gz"
            secs = float(subprocess.run([str(enc), "-block", str(kib << 10), str(gcode),
                                         str(payload)], check=True, capture_output=True,
                                        text=True).stdout)
            row = {"block_kib": kib, "encode_s": secs, **measure(payload, args.repeat)}
            row["pi_zero_2w_ms_estimate"] = round(row["cpu_ms_max"] * args.pi_factor, 1)
            rows.append(row)
            payload.unlink()
            print(f"  {kib} KiB done", file=sys.stderr)
        summary = {"machine": report.machine(loadavg_at_start=load,
                                             loadavg_at_end=os.getloadavg()),
                  "gcode_bytes": gcode.stat().st_size, "repeat": args.repeat,
                  "pi_factor": args.pi_factor, "results": rows}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = report.write(args.out, summary)
    print("| block | compressed/clear | worst block, CPU | p99.9, CPU | median, CPU "
          "| worst wall (noisy) | Pi Zero 2 W worst (est.) | text read | RSS growth |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['block_kib']} KiB | {r['ratio'] * 100:.1f}% | {r['cpu_ms_max']} ms | "
              f"{r['cpu_ms_p999']} ms | {r['cpu_ms_median']} ms | {r['wall_ms_max']} ms | "
              f"{r['pi_zero_2w_ms_estimate']} ms | {r['text_read_mbps']} MB/s | "
              f"{r['rss_growth_kib'] / 1024:.1f} MiB |")
    print(f"\n(load {summary['machine']['loadavg_at_start']}; JSON in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
