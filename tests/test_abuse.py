"""Hostile and broken inputs through the public paths (HTTP upload and print
start, the G-code console, Klipper's registration endpoint called by a user), on one
real stack. Each case: a specific error (or a normal print where the input is
legitimate), the printer stays ready, no memfd is left anywhere, and the
uploaded file is unchanged."""
from __future__ import annotations

import hashlib
import subprocess
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
from conftest import Keys
from gcodegen import sample_gcode
from stack import HTTPError, wait_for
from test_component import EncStack

SMALL = sample_gcode(layers=3)


def tamper_policy(data: bytes) -> bytes:
    b = bytearray(data)
    i = data.index(b"-> encprint/policy v1\n") + len(b"-> encprint/policy v1\n") + 20
    b[i] = ord("A") if b[i] != ord("A") else ord("B")
    return bytes(b)


@dataclass
class Case:
    name: str
    filename: str
    data: Optional[Callable[[EncStack], bytes]]
    expect: str                      # "complete", or a phrase of the error
    start: Optional[str] = None      # the name to start, if not filename
    via: str = "http"                # http: POST /printer/print/start; console: SDCARD_PRINT_FILE
    script: Optional[Callable[[EncStack], str]] = None  # a console command instead
    register: Optional[Callable[[EncStack], dict]] = None  # a registration instead
    copied: bool = False             # put in gcodes/ directly (scp), not uploaded


def enc(plain: bytes = SMALL, *flags: str):
    return lambda st: st.keys.encrypt(plain, *flags)


CASES = [
    Case("truncated", "trunc.gcode", lambda st: st.keys.encrypt(SMALL)[:-200], "incomplete"),
    Case("tampered header", "tamp.gcode", lambda st: tamper_policy(st.keys.encrypt(SMALL)),
         "header or metadata was altered"),
    Case("wrong recipient", "theirs.gcode", lambda st: st.keys.other().encrypt(SMALL),
         "encrypted for other printers"),
    Case("zero-length plain file", "empty.gcode", lambda st: b"", "complete"),
    Case("encrypted empty G-code", "empty.enc.gcode", enc(b""), "complete"),
    # The budget applies to the memfd: uncompressed, as this line would
    # compress a thousandfold.
    Case("over the memory budget", "big.gcode", enc(b"G1 X1 Y1\n" * 300_000, "--no-compress"),
         "more than the 1.0 MiB allowed"),
    Case("plaintext named like an encrypted file", "plain.enc.gcode",
         lambda st: sample_gcode(layers=2), "complete"),
    Case("encrypted file named .gco", "part.gco", enc(), "complete"),
    Case("encrypted file named .g", "part.g", enc(), "complete"),
    Case("quote in the name (copied in by scp)", 'a"b.gcode', enc(), "complete", copied=True),
    Case("spaces in the name", "my part v2.gcode", enc(), "complete"),
    Case("unicode name", "Teil-ü-部品.gcode", enc(), "complete"),
    Case("G-code injection with ';'", "evil;M112.gcode", enc(), "';', '#' or '*'"),
    Case("G-code injection with '#'", "evil#x.gcode", enc(), "';', '#' or '*'"),
    Case("path outside the gcodes folder", "inside.gcode", enc(),
         "outside the gcodes folder", start="../outside.gcode"),
    Case("armored age file", "armored.gcode",
         lambda st: subprocess.run(["age", "-a", "-r", st.keys.recipient], input=SMALL,
                                   capture_output=True, check=True).stdout, "armored"),
    Case("garbage after the magic line", "garbage.gcode",
         lambda st: b"age-encryption.org/v1\n-> X25519 !!!\n\x00\xff\n", "malformed header"),
    Case("unsupported stanza version", "future.gcode",
         lambda st: st.keys.encrypt(SMALL).replace(b"-> encprint/policy v1",
                                                   b"-> encprint/policy v9", 1),
         "unsupported version"),
    Case("made by stock age", "stock.gcode",
         lambda st: subprocess.run(["age", "-r", st.keys.recipient], input=SMALL,
                                   capture_output=True, check=True).stdout, "complete"),
    Case("console start of a tampered file", "tamp2.gcode",
         lambda st: tamper_policy(st.keys.encrypt(SMALL)), "header or metadata was altered",
         via="console"),
    Case("register another process's fd", "reg1.gcode", enc(),
         "pid 1 is not the process that sent this request",
         register=lambda st: dict(filename="reg1.gcode", pid=1, fd=0, size=1,
                                  token="encprint-x")),
    Case("register a descriptor that is no memfd", "reg2.gcode", enc(),
         "is not the memfd named by token",
         register=lambda st: dict(filename="reg2.gcode", pid=st.moonraker.pid, fd=0, size=1,
                                  token="encprint-x")),
    Case("register a path in filename", "reg3.gcode", enc(), "without '..'",
         register=lambda st: dict(filename="../../etc/x.gcode", pid=1, fd=0, size=1,
                                  token="encprint-x")),
]


@pytest.fixture(scope="module")
def stack(binaries, tmp_path_factory):
    keys = Keys(binaries, tmp_path_factory.mktemp("abuse-keys"))
    st = EncStack(tmp_path_factory.mktemp("abuse"), keys, "max_memory: 1\n")
    st.start()
    yield st
    st.stop()


@pytest.fixture(autouse=True)
def _logs(request, stack):
    request.node._encprint_stack = stack


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input(stack, case):
    if case.data is not None and case.copied:
        (stack.gcodes / case.filename).write_bytes(case.data(stack))
        wait_for(lambda: stack.ui.get("/server/files/metadata", filename=case.filename)
                 ["result"].get("encrypted_print"), 10, "Moonraker to see the file")
    elif case.data is not None:
        stack.ui.upload(case.filename, case.data(stack))
    if case.start and case.start.startswith("../"):
        (stack.data / case.start[3:]).write_bytes(stack.keys.encrypt(SMALL))
    stored = stack.gcodes / case.filename
    before = sha(stored) if stored.exists() else None
    name = case.start or case.filename
    error = None
    try:
        if case.register is not None:
            stack.ui.post("/printer/encrypted_file_bridge/register", case.register(stack))
        elif case.script is not None:
            stack.ui.gcode(case.script(stack))
        elif case.via == "console":
            stack.ui.gcode(f'SDCARD_PRINT_FILE FILENAME="{name}"')
        else:
            stack.ui.start_print(name)
    except HTTPError as e:
        error = e.message
    if case.via == "console" and case.expect != "complete":
        # The console start waits for Moonraker and fails with its reason.
        assert error and case.expect in error, error
        wait_for(lambda: any(case.expect in n["params"][0]["message"]
                             for n in stack.ui.seen("notify_encrypted_print_error")),
                 10, f"the refusal {case.expect!r} as a notification")
    elif case.expect == "complete":
        assert error is None, error
        wait_for(lambda: stack.ui.query("print_stats")["print_stats"]["state"] == "complete"
                 and stack.ui.query("print_stats")["print_stats"]["filename"] == name,
                 30, "the print to complete")
    else:
        assert error is not None, "no error"
        assert case.expect in error, error
    assert stack.klippy.state() == "ready"
    assert stack.ui.query("print_stats")["print_stats"]["state"] != "printing"
    stack.wait_released()
    if before is not None:
        assert sha(stored) == before, "the uploaded file was modified"


def test_concurrent_starts_print_once_and_refuse_the_other(stack):
    # Long files: the first print is still running when the second start
    # is decided, so exactly one start may win.
    long = b"G1 X10 Y10 F6000\nG1 X20 Y20 F6000\n" * 25_000  # under max_memory
    stack.upload_encrypted("c1.gcode", long)
    stack.upload_encrypted("c2.gcode", long)
    earlier = len(stack.jobs())  # this stack is shared by the module's tests
    results = {}

    def start(name):
        try:
            stack.ui.start_print(name)
            results[name] = "ok"
        except HTTPError as e:
            results[name] = e.message
    threads = [threading.Thread(target=start, args=(n,)) for n in ("c1.gcode", "c2.gcode")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert list(results.values()).count("ok") == 1, results
    refused = [m for m in results.values() if m != "ok"]
    assert any(w in refused[0] for w in ("being prepared", "still printing")), refused
    winner = next(n for n, m in results.items() if m == "ok")
    assert stack.ui.query("print_stats")["print_stats"]["filename"] == winner
    jobs = stack.jobs()  # newest first
    assert [j["filename"] for j in jobs[:len(jobs) - earlier]] == [winner]
    stack.ui.post("/printer/print/cancel")
    stack.wait_state("cancelled", "complete")
    stack.wait_released()
