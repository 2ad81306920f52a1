from __future__ import annotations

import pathlib
import sys
from typing import Iterator

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from stack import Stack  # noqa: E402


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if rep.failed:
        stack = getattr(item, "_encprint_stack", None)
        if stack is not None:
            rep.sections.append(("printer stack logs", stack.logs()))
    return rep


def make_stack(request, tmp_path: pathlib.Path, printer_cfg: str = "",
               moonraker_cfg: str = "") -> Iterator[Stack]:
    stack = Stack(tmp_path / "stack", printer_cfg, moonraker_cfg)
    request.node._encprint_stack = stack
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def plain_stack(request, tmp_path) -> Iterator[Stack]:
    """klippy + Moonraker with no plugin configured."""
    yield from make_stack(request, tmp_path)
