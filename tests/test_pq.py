"""A printer with a post-quantum hybrid identity (encprint keygen -pq)
prints files encrypted to its age1pq1... recipient, end to end."""
from __future__ import annotations

import pathlib

from conftest import Keys
from gcodegen import sample_gcode
from test_component import EncStack


class PQKeys(Keys):
    def __init__(self, binaries: pathlib.Path, dir: pathlib.Path) -> None:
        self.bin = binaries
        self.dir = dir
        dir.mkdir(parents=True, exist_ok=True)
        self.identity = dir / "printer.key"
        self.recipient = self.encprint("keygen", "-pq", "-o", str(self.identity)).strip()


def test_post_quantum_printer_prints_end_to_end(request, binaries, tmp_path):
    keys = PQKeys(binaries, tmp_path / "keys")
    assert keys.recipient.startswith("age1pq1")
    stack = EncStack(tmp_path / "stack", keys)
    request.node._encprint_stack = stack
    try:
        stack.start()
        status = stack.ui.get("/server/encrypted_print/status")["result"]
        assert status["recipient"] == keys.recipient and not status["problems"]
        plain = sample_gcode(layers=6)
        stack.upload_encrypted("pq.gcode", plain)
        md = stack.metadata("pq.gcode")
        assert md["encrypted_print"]["authenticated"] is True and md["slicer"] == "PrusaSlicer"
        stack.ui.start_print("pq.gcode")
        stack.wait_state("complete")
        stack.wait_released()
        rec = stack.jobs()[0]
        assert rec["result"] == "complete" and rec["size"] == len(plain)
    finally:
        stack.stop()
