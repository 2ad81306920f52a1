"""A real klippy prints a seekable gzip memfd: RAM held, klippy's RSS, time.

Encodes a G-code file (default: the dense PrusaSlicer tower of
bench/dense_gcode.py, sliced once into --cache) with the Go encoder
(bench/seekgz_encode, 64 KiB blocks) with its E words made comments (the
test printer has no extruder), puts the payload into a sealed memfd
held by this process, registers it with a real klippy (tests/stack.py:
debug-output mode, -o /dev/null, the pinned package; KLIPPY_PATH and
KLIPPER_DICT run a Klipper checkout, e.g. master) through the extra's
register endpoint, as the helper's memfd is registered, and prints it to
completion. Measured: the memfd's allocated bytes (st_blocks), klippy's RSS
before and during the print (sampled every 0.2 s) and at its peak, the
print's wall time and how far virtual_sdcard got, and the worst inflate
cost of one block (thread CPU, the reactor's stall where the reactor reads).
--plain also prints the clear G-code from a plain sealed memfd, for the
same figures. JSON in bench/results/seekgz_print.json.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
import dense_gcode  # noqa: E402
import inflate_stall  # noqa: E402
import report  # noqa: E402
from stack import Klippy, install_plugins, wait_for  # noqa: E402

F_ADD_SEALS, ALL_SEALS = 1033, 0xF
MIB = 1 << 20


def sealed_memfd(path: pathlib.Path, name: str) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    with open(path, "rb") as f:
        while True:
            b = f.read(4 * MIB)
            if not b:
                break
            os.write(fd, b)
    fcntl.fcntl(fd, F_ADD_SEALS, ALL_SEALS)
    return fd


def rss_kib(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Sampler(threading.Thread):
    """klippy's RSS every 0.2 s while the print runs."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.samples, self.stop = pid, [], threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            self.samples.append(rss_kib(self.pid))


def status(api) -> Dict:
    return api.call("objects/query", objects={"print_stats": None,
                                              "virtual_sdcard": None})["result"]["status"]


def print_memfd(work: pathlib.Path, payload: pathlib.Path, label: str,
                timeout: float) -> Dict:
    gcodes = work / "gcodes"
    gcodes.mkdir(exist_ok=True)
    kdir = work / f"k-{label}"
    kdir.mkdir()
    name = f"{label}.gcode"
    # Any file the extra takes for an encrypted one (it reads its first bytes).
    (gcodes / name).write_bytes(b"age-encryption.org/v1\n-> bench\n")
    install_plugins()
    klippy = Klippy(kdir, gcodes, "[encrypted_file_bridge]\nregistration_timeout: 60\n")
    klippy.start()
    token = "encprint-" + os.urandom(6).hex()
    fd = sealed_memfd(payload, token)
    try:
        api = klippy.api()
        api.sock.settimeout(60)
        size = os.fstat(fd).st_size
        held = os.fstat(fd).st_blocks * 512
        idle = rss_kib(klippy.pid)
        r = api.call("encrypted_file_bridge/register", filename=name, pid=os.getpid(),
                     fd=fd, size=size, token=token)
        if "error" in r:
            raise SystemExit(f"register: {r['error']['message']}")
        os.close(fd)
        fd = -1
        before = rss_kib(klippy.pid)
        sampler = Sampler(klippy.pid)
        sampler.start()
        t = time.monotonic()
        r = api.call("gcode/script", script=f'SDCARD_PRINT_FILE FILENAME="{name}"')
        if "error" in r:
            raise SystemExit(f"print: {r['error']['message']}")

        def done() -> bool:
            return status(api)["print_stats"]["state"] in ("complete", "error", "paused")
        wait_for(done, timeout, f"the {label} print to end")
        secs = time.monotonic() - t
        sampler.stop.set()
        sampler.join()
        st = status(api)
        api.close()
        peak = max(sampler.samples + [before])
        return {"payload": label, "memfd_bytes": size, "memfd_allocated_bytes": held,
                "state": st["print_stats"]["state"],
                "file_size": st["virtual_sdcard"]["file_size"],
                "file_position": st["virtual_sdcard"]["file_position"],
                "print_s": round(secs, 1),
                "print_mbps": round(st["virtual_sdcard"]["file_position"] / secs / 1e6, 2),
                "klippy_rss_idle_mib": round(idle / 1024, 1),
                "klippy_rss_registered_mib": round(before / 1024, 1),
                "klippy_rss_peak_mib": round(peak / 1024, 1),
                "klippy_rss_growth_mib": round((peak - before) / 1024, 2),
                "klippy_rss_samples": len(sampler.samples)}
    finally:
        if fd >= 0:
            os.close(fd)
        klippy.stop()


def printable(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    """The G-code with every E word made a comment (" E.5" -> " ;E.5"): the
    test printer has no extruder (kinematics none, no pins in debug-output
    mode), where an E move is an error. One byte more per extruding move;
    the stream stays the slicer's, and what is measured is what is printed."""
    with open(src, "rb") as f, open(dst, "wb") as out:
        for chunk in iter(lambda: f.read(8 * MIB), b""):
            while not chunk.endswith(b"\n"):
                more = f.read(4096)
                if not more:
                    break
                chunk += more
            out.write(chunk.replace(b" E", b" ;E"))
    return dst


def typical(path: pathlib.Path, size: int) -> pathlib.Path:
    import slicer_samples
    first, rest = slicer_samples.prusaslicer().split("G21 ; set units to millimeters\n", 1)
    body, footer = rest.split("; filament used [mm]", 1)
    with open(path, "w") as f:
        f.write(first + "G21 ; set units to millimeters\n")
        for _ in range(size // len(body) + 1):
            f.write(body)
        f.write("; filament used [mm]" + footer)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gcode", help="G-code to print (default: the dense tower, sliced "
                    "once into --cache)")
    ap.add_argument("--typical-mb", type=int, help="print this many MB of typical slicer "
                    "output instead (the real PrusaSlicer 2.5 cube of tests/slicer_samples.py, "
                    "its body repeated)")
    ap.add_argument("--cache", help="folder for the sliced G-code (default: a new temp dir)")
    ap.add_argument("--plain", action="store_true", help="print the clear G-code too")
    ap.add_argument("--only-plain", action="store_true",
                    help="print only the clear G-code (the reference for klippy's RSS)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "seekgz_print.json"))
    args = ap.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="encprint-seekgz-print-"))
    try:
        if args.gcode:
            gcode = pathlib.Path(args.gcode)
        elif args.typical_mb:
            gcode = typical(work / "typical.gcode", args.typical_mb * 10**6)
        else:
            cache = pathlib.Path(args.cache or tempfile.mkdtemp(prefix="encprint-dense-"))
            gcode = cache / "dense.gcode"
            if not gcode.exists():
                dense_gcode.slice_dense(gcode)
        gcode = printable(gcode, work / "print.gcode")
        enc = work / "seekgz_encode"
        subprocess.run(["go", "build", "-o", str(enc), "./bench/seekgz_encode"], cwd=ROOT,
                       check=True)
        payload = work / "payload.gz"
        encode_s = float(subprocess.run([str(enc), str(gcode), str(payload)], check=True,
                                        capture_output=True, text=True).stdout)
        load = os.getloadavg()
        stall = inflate_stall.measure(payload, 1)
        rows: List[Dict] = []
        if not args.only_plain:
            rows.append(print_memfd(work, payload, "seekgz", args.timeout))
        if args.plain or args.only_plain:
            rows.append(print_memfd(work, gcode, "plain", args.timeout))
        clear = gcode.stat().st_size
        for row in rows:
            row["ram_held_share"] = round(row["memfd_allocated_bytes"] / clear, 4)
        summary = {"machine": report.machine(loadavg_at_start=load,
                                             loadavg_at_end=os.getloadavg()),
                   "klippy": os.environ.get("KLIPPY_PATH", "pinned package"),
                   "gcode_bytes": clear, "encode_s": encode_s, "block_kib": 64,
                   "inflate_worst_block_cpu_ms": stall["cpu_ms_max"],
                   "inflate_p999_block_cpu_ms": stall["cpu_ms_p999"],
                   "inflate_median_block_cpu_ms": stall["cpu_ms_median"],
                   "results": rows}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = report.write(args.out, summary)
    print(f"G-code {clear / 1e6:.1f} MB; worst block {summary['inflate_worst_block_cpu_ms']}"
          f" ms CPU (p99.9 {summary['inflate_p999_block_cpu_ms']} ms)")
    print("| memfd | RAM held (st_blocks) | share of G-code | klippy RSS growth "
          "| RSS peak | print time | result |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['payload']} | {r['memfd_allocated_bytes'] / MIB:.1f} MiB | "
              f"{r['ram_held_share'] * 100:.1f}% | {r['klippy_rss_growth_mib']} MiB | "
              f"{r['klippy_rss_peak_mib']} MiB | {r['print_s']} s | {r['state']} at "
              f"{r['file_position']}/{r['file_size']} |")
    print(f"\n(load {summary['machine']['loadavg_at_start']}; JSON in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
