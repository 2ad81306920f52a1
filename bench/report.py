"""What every benchmark writes: the machine it ran on, and its JSON report
in bench/results/."""
from __future__ import annotations

import json
import os
import pathlib
import platform
from typing import Any, Dict


def machine(**extra: Any) -> Dict[str, Any]:
    """The machine a figure was measured on (load averages are worth adding:
    the project's machines are often shared)."""
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), **extra}


def write(path: str, report: Dict[str, Any]) -> pathlib.Path:
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return out
