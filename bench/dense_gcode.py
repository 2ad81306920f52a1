"""Slices a dense worst-case G-code file with Debian's prusa-slicer.

The mesh is a rippled tower generated here (no asset to ship): 160 mm tall,
the wall rippled around and along its height, sliced at 0.1 mm layers with
4 perimeters and 25% gyroid infill. Its output is the "dense worst case" of
issue 16 (few repeated lines, many short moves). Used by the benchmarks;
the G-code is synthetic and written where the caller says (a tmpfs).
"""
from __future__ import annotations

import argparse
import math
import pathlib
import shutil
import struct
import subprocess
import sys


def rippled_tower(path: pathlib.Path, height: float = 160.0, radius: float = 30.0,
                  around: int = 720, rows: int = 400) -> None:
    """A closed binary STL: a rippled wall with flat top and bottom."""
    def point(i: int, k: int) -> tuple:
        a = 2 * math.pi * (i % around) / around
        z = height * k / rows
        r = radius + 2.0 * math.sin(12 * a) * (0.6 + 0.4 * math.sin(2 * math.pi * z / 20))
        return (100 + r * math.cos(a), 100 + r * math.sin(a), z)
    tris = []
    for k in range(rows):
        for i in range(around):
            p00, p10 = point(i, k), point(i + 1, k)
            p01, p11 = point(i, k + 1), point(i + 1, k + 1)
            tris.append((p00, p10, p11))
            tris.append((p00, p11, p01))
    bottom, top = (100, 100, 0.0), (100, 100, height)
    for i in range(around):
        tris.append((bottom, point(i + 1, 0), point(i, 0)))
        tris.append((top, point(i, rows), point(i + 1, rows)))
    with open(path, "wb") as f:
        f.write(b"encprint benchmark rippled tower".ljust(80, b" "))
        f.write(struct.pack("<I", len(tris)))
        for t in tris:
            f.write(struct.pack("<3f", 0, 0, 0))
            for p in t:
                f.write(struct.pack("<3f", *p))
            f.write(b"\0\0")


def slice_dense(out: pathlib.Path, height: float = 160.0, radius: float = 55.0) -> pathlib.Path:
    exe = shutil.which("prusa-slicer")
    if exe is None:
        raise RuntimeError("prusa-slicer is missing (apt-get install prusa-slicer)")
    stl = out.with_suffix(".stl")
    rippled_tower(stl, height=height, radius=radius)
    subprocess.run([exe, "--export-gcode", "--gcode-flavor", "marlin2",
                    "--layer-height", "0.1", "--first-layer-height", "0.2",
                    "--perimeters", "4", "--fill-density", "25%", "--fill-pattern", "gyroid",
                    "--bed-shape", "0x0,200x0,200x200,0x200", "--max-print-height", "200",
                    "--output", str(out), str(stl)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stl.unlink()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out")
    ap.add_argument("--height", type=float, default=160.0)
    args = ap.parse_args()
    path = slice_dense(pathlib.Path(args.out), args.height)
    print(f"{path}: {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
