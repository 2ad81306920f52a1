"""The Klipper extra loaded as a plain module (it is stdlib-only and imports
nothing of Klipper's at module level), for tests and benchmarks that use its
classes without a klippy."""
from __future__ import annotations

import importlib.util
import pathlib
import types

PATH = pathlib.Path(__file__).resolve().parent.parent / "klippy-extras" / "encrypted_file_bridge.py"


def load_bridge() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("encrypted_file_bridge", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
