"""make demo, the README's first command, keeps working."""
from __future__ import annotations

import subprocess
import sys

from stack import ROOT


def test_demo_prints_an_encrypted_part_and_finds_no_cleartext(binaries):
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "demo.py"), "--layers", "30"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "print result:      complete" in out
    assert "cleartext scan:    NONE FOUND" in out
    assert "print 1 of 3" in out
    assert "\x1b[" not in out, "control sequences in non-terminal output"
