"""make demo: a local printer stack prints an encrypted part, end to end.

Starts klippy (debug-output mode, no hardware) with [encrypted_file_bridge]
and Moonraker with [encrypted_print] on loopback in a temporary folder,
creates a printer identity, encrypts a generated slicer-style part, uploads it
exactly as Mainsail does, prints it, and reports what happened.
"""
from __future__ import annotations

import argparse
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from gcodegen import new_canary, sample_gcode  # noqa: E402
from stack import ROOT, Stack, files_holding, wait_for  # noqa: E402

TTY = sys.stdout.isatty()


def say(msg: str) -> None:
    print(msg, flush=True)


def bar(frac: float, width: int = 40) -> str:
    n = int(frac * width)
    return "[" + "#" * n + "." * (width - n) + f"] {frac * 100:5.1f}%"


def encprint(*args: str, input: bytes = None) -> bytes:
    res = subprocess.run([str(ROOT / "bin" / "encprint"), *args], input=input,
                         capture_output=True)
    if res.returncode != 0:
        sys.exit(f"encprint {args[0]} failed: {res.stderr.decode()}")
    return res.stdout


def scan(root: pathlib.Path, canary: bytes) -> list:
    return files_holding(lambda data: canary in data, root,
                         pathlib.Path(tempfile.gettempdir()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--keep", action="store_true",
                    help="leave the stack running and print the Moonraker URL")
    ap.add_argument("--layers", type=int, default=400)
    args = ap.parse_args()

    root = pathlib.Path(tempfile.mkdtemp(prefix="encprint-demo-"))
    keydir = root / "keys"
    keydir.mkdir()
    identity = keydir / "printer.key"
    say("1. Creating the printer's identity (stays on the printer, 0600)")
    recipient = encprint("keygen", "-o", str(identity)).decode().strip()
    say(f"   recipient (what designers encrypt to): {recipient}")

    canary = new_canary()
    plain = sample_gcode(layers=args.layers, moves_per_layer=200, canary=canary)
    say(f"2. Designer side: encrypting a {len(plain) // 1024} KiB slicer-style part, "
        "max 3 prints")
    encrypted = encprint("encrypt", "-r", recipient, "--max-prints", "3", "-o", "-", "-",
                         input=plain)
    first_line = encrypted.split(b"\n", 1)[0].decode()
    say(f"   part.enc.gcode: {len(encrypted) // 1024} KiB, starts with {first_line!r}")

    say("3. Starting the printer stack: klippy + Moonraker on loopback")
    stack = Stack(root / "printer", printer_cfg="[encrypted_file_bridge]\n",
                  moonraker_cfg=(f"[encrypted_print]\nhelper: {ROOT / 'bin' / 'encprint-helper'}"
                                 f"\nidentity: {identity}\n"))
    try:
        stack.start()
        wait_for(lambda: stack.ui.get("/server/encrypted_print/status")["result"]["ready"],
                 30, "the encrypted_print component")
        say(f"   Moonraker at {stack.moonraker.url}")

        say("4. Uploading part.enc.gcode as Mainsail does (POST /server/files/upload)")
        stack.ui.upload("part.enc.gcode", encrypted)
        md = stack.ui.get("/server/files/metadata", filename="part.enc.gcode")["result"]
        say(f"   the file list shows: slicer {md.get('slicer')} {md.get('slicer_version')}, "
            f"estimated {md.get('estimated_time', 0):.0f} s, filament "
            f"{md.get('filament_total', 0):.0f} mm, thumbnails "
            + ", ".join(f"{t['width']}x{t['height']}" for t in md.get("thumbnails", [])))

        say("5. Printing (POST /printer/print/start)")
        t0 = time.monotonic()
        stack.ui.start_print("part.enc.gcode")
        last = -1.0
        while True:
            st = stack.ui.query("print_stats", "virtual_sdcard")
            state = st["print_stats"]["state"]
            prog = st["virtual_sdcard"]["progress"] if state != "complete" else 1.0
            if TTY:
                print(f"\r   {bar(prog)} {state:<9}", end="", flush=True)
            elif prog - last >= 0.25 or state == "complete":
                say(f"   {bar(prog)} {state}")
                last = prog
            if state in ("complete", "error", "cancelled"):
                break
            if time.monotonic() - t0 > 300:
                sys.exit("\nthe print did not finish within 5 minutes")
            time.sleep(0.1)
        if TTY:
            print()
        wait_for(lambda: stack.ui.get("/server/encrypted_print/status")["result"]
                 ["active_job"] is None, 10, "the component to release the file")
        rec = stack.ui.get("/server/encrypted_print/jobs")["result"]["jobs"][0]

        say("6. Summary")
        say(f"   print result:      {state}")
        say(f"   audit record:      {rec['filename']}, file id {rec['file_id']}, "
            f"print {rec['print_number']} of 3")
        say(f"   decrypt time:      {rec['decrypt_ms']:.1f} ms for "
            f"{rec['size'] / 1048576:.1f} MiB of G-code "
            f"({rec['memfd_size'] / 1048576:.1f} MiB in memory)")
        found = scan(root, canary.encode())
        say(f"   cleartext scan:    {'NONE FOUND' if not found else 'FOUND IN ' + str(found)}"
            f" (canary searched in {root} and {tempfile.gettempdir()})")
        if found or state != "complete":
            return 1
        if args.keep:
            say(f"\nThe stack keeps running: point Mainsail or Fluidd at {stack.moonraker.url}"
                "\nPress Ctrl-C to stop it.")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return 0
    finally:
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
