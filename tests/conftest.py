from __future__ import annotations

import pathlib
import sys
from typing import Iterator

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from stack import TOOLPATH_CANARIES, TOOLPATH_LEAKS, Stack, toolpath_hits  # noqa: E402


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


# -- encrypted files and identities, made with the real encprint CLI --

import os  # noqa: E402
import subprocess  # noqa: E402

from stack import ROOT, files_holding, install_plugins  # noqa: E402

BIN = ROOT / "bin"


@pytest.fixture(scope="session")
def binaries() -> pathlib.Path:
    if not (BIN / "encprint").exists() or not (BIN / "encprint-helper").exists():
        subprocess.run(["make", "-s", "build"], cwd=ROOT, check=True)
    install_plugins()
    return BIN


class Keys:
    """A printer identity and helpers to make encrypted files for it."""

    def __init__(self, binaries: pathlib.Path, dir: pathlib.Path) -> None:
        self.bin = binaries
        self.dir = dir
        dir.mkdir(parents=True, exist_ok=True)
        self.identity = dir / "printer.key"
        self.recipient = self.encprint("keygen", "-o", str(self.identity)).strip()

    def encprint(self, *args: str, input: bytes = None) -> str:
        res = subprocess.run([str(self.bin / "encprint"), *args], input=input,
                             capture_output=True, check=False)
        if res.returncode != 0:
            raise AssertionError(f"encprint {args}: {res.stderr.decode()}")
        return res.stdout.decode()

    def encrypt(self, plain: bytes, *flags: str, recipients=None) -> bytes:
        SECRET_CANARIES.update(CANARY_RE.findall(plain))
        args = ["encrypt", "-o", "-"]
        for r in recipients or [self.recipient]:
            args += ["-r", r]
        res = subprocess.run([str(self.bin / "encprint"), *args, *flags, "-"],
                             input=plain, capture_output=True, check=False)
        if res.returncode != 0:
            raise AssertionError(f"encprint encrypt: {res.stderr.decode()}")
        return res.stdout

    def other(self, name: str = "other") -> Keys:
        return Keys(self.bin, self.dir / name)


@pytest.fixture(scope="session")
def encoder(tmp_path_factory) -> pathlib.Path:
    """The Go seekable gzip encoder alone (bench/seekgz_encode), for tests
    that build compressed payloads without encrypting them."""
    exe = tmp_path_factory.mktemp("enc") / "seekgz_encode"
    subprocess.run(["go", "build", "-o", str(exe), "./bench/seekgz_encode"], cwd=ROOT,
                   check=True)
    return exe


@pytest.fixture
def keys(binaries, tmp_path) -> Keys:
    return Keys(binaries, tmp_path / "keys")


def open_fds() -> set:
    return set(os.listdir("/proc/self/fd"))


# -- the suite-wide canary scan --

import re  # noqa: E402
import tempfile  # noqa: E402

CANARY_RE = re.compile(rb"CANARY-[0-9a-f]{32}")
SECRET_CANARIES: set = set()  # canaries of every cleartext that was encrypted


@pytest.fixture(scope="session", autouse=True)
def no_cleartext_anywhere_after_the_suite(tmp_path_factory):
    """After every test ran: no canary of an encrypted file is in any file
    under the test roots (data folders, logs, databases, .thumbs) or in the
    system's temp folders."""
    yield
    assert not TOOLPATH_LEAKS, ("toolpath of an encrypted file in an API response or "
                                "websocket message:\n" + "\n".join(TOOLPATH_LEAKS[:20]))
    if not SECRET_CANARIES and not TOOLPATH_CANARIES:
        return
    roots = [tmp_path_factory.getbasetemp(), pathlib.Path(tempfile.gettempdir()),
             pathlib.Path("/dev/shm")]
    found = files_holding(
        lambda data: (set(CANARY_RE.findall(data)) & SECRET_CANARIES) | toolpath_hits(data),
        *roots)
    assert not found, ("cleartext or toolpath of encrypted files found on disk:\n"
                       + "\n".join(found))
