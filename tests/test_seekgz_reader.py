"""The extra's seekable gzip reader (SeekgzIndex, SeekgzRaw in
klippy-extras/encrypted_file_bridge.py, in the file stack the bridge hands
virtual_sdcard) on payloads made by the Go encoder (helper/seekgz), from real
sealed memfds: random access at block boundaries gives the clear file's bytes
and positions, reads stop after shutdown, a bad payload is refused. The same
reader inside a real klippy: tests/test_bridge_seekgz.py."""
from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import os
import pathlib
import subprocess
from typing import Callable, Iterator

import pytest

from bridge_module import load_bridge
from gcodegen import sample_gcode

ROOT = pathlib.Path(__file__).resolve().parent.parent


sr = load_bridge()
FOOTER_SIZE = sr.SEEKGZ_FOOTER_SIZE


def open_text(fd: int, size: int, path: str, printer) -> io.TextIOWrapper:
    """The file the bridge's registration hands virtual_sdcard for a
    seekable gzip memfd (what _check_memfd builds; it closes fd when the
    index is refused, as _handle_register does)."""
    try:
        index = sr.SeekgzIndex(fd, size)
    except Exception:
        os.close(fd)
        raise
    return sr._Registration("part.gcode", path, fd, size, printer, 0, index).file
BLOCK = 4096
F_ADD_SEALS, ALL_SEALS = 1033, 0xF


class Printer:
    def __init__(self) -> None:
        self.shutdown = False

    def is_shutdown(self) -> bool:
        return self.shutdown


@pytest.fixture(scope="module")
def clear() -> bytes:
    data = sample_gcode(layers=40, moves_per_layer=60, thumbnails=False)
    # Not a multiple of the block size, several blocks, a non-ASCII comment.
    data += "; Ünïcode comment\n".encode() * 3
    assert len(data) % BLOCK and len(data) > 8 * BLOCK
    return data


@pytest.fixture(scope="module")
def payload(encoder, clear, tmp_path_factory) -> bytes:
    d = tmp_path_factory.mktemp("payload")
    (d / "in").write_bytes(clear)
    subprocess.run([str(encoder), "-block", str(BLOCK), str(d / "in"), str(d / "out")],
                   check=True, capture_output=True)
    data = (d / "out").read_bytes()
    (d / "in").unlink()
    (d / "out").unlink()
    return data


def sealed_memfd(data: bytes) -> int:
    fd = os.memfd_create("encprint-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    fcntl.fcntl(fd, F_ADD_SEALS, ALL_SEALS)
    return fd


@pytest.fixture
def opener(tmp_path) -> Iterator[Callable]:
    files = []

    def open_(data: bytes, printer=None):
        f = open_text(sealed_memfd(data), len(data), str(tmp_path / "part.gcode"),
                         printer or Printer())
        files.append(f)
        return f
    yield open_
    for f in files:
        f.close()


def clear_file(tmp_path: pathlib.Path, data: bytes):
    """The clear G-code opened as virtual_sdcard opens a file, kept off the
    disk: io.open(path, 'r', newline='') of an (unsealed) memfd."""
    fd = os.memfd_create("clear", os.MFD_CLOEXEC)
    os.write(fd, data)
    try:
        return open(f"/proc/self/fd/{fd}", newline="", encoding="utf-8")
    finally:
        os.close(fd)


def test_stock_gzip_reads_the_gcode(payload, clear):
    """`age -d | gunzip` gives the G-code: Python's gzip reads it whole too."""
    assert gzip.decompress(payload) == clear
    assert len(payload) < len(clear) / 3


def test_size_and_sequential_read_like_the_clear_file(opener, payload, clear, tmp_path):
    f, ref = opener(payload), clear_file(tmp_path, clear)
    for g in (f, ref):
        g.seek(0, os.SEEK_END)
    assert f.tell() == ref.tell() == len(clear)
    f.seek(0)
    ref.seek(0)
    chunks = []
    while True:             # virtual_sdcard's loop
        data = f.read(8192)
        assert data == ref.read(8192)
        if not data:
            break
        chunks.append(data)
    assert "".join(chunks).encode() == clear
    ref.close()


@pytest.mark.parametrize("pos", [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK - 1,
                                 3 * BLOCK + BLOCK // 2, "last-block", "last-byte", "eof"])
def test_random_access_at_block_boundaries(opener, payload, clear, tmp_path, pos):
    """Every position (first/last byte of a block, middle, the last block,
    EOF) reads the clear file's bytes, as virtual_sdcard's resume and M26
    seek there."""
    n = len(clear)
    pos = {"last-block": (n // BLOCK) * BLOCK, "last-byte": n - 1, "eof": n}.get(pos, pos)
    f, ref = opener(payload), clear_file(tmp_path, clear)
    for size in (1, 2, 100, BLOCK + 7, 3 * BLOCK):
        f.seek(pos)
        ref.seek(pos)
        assert f.read(size) == ref.read(size), (pos, size)
        assert f.tell() == ref.tell()
    f.seek(pos)
    assert f.buffer.read(5) == clear[pos:pos + 5]
    ref.close()


def test_seek_back_and_forth_many_blocks(opener, payload, clear):
    f = opener(payload)
    raw = f.buffer.raw
    for pos in (5 * BLOCK + 3, BLOCK - 1, 7 * BLOCK, 0, len(clear) - 3):
        f.seek(pos)
        assert f.buffer.read(3) == clear[pos:pos + 3]
    assert raw.tell() >= len(clear) - 3


def test_reads_refused_after_shutdown(opener, payload):
    """virtual_sdcard logs the text around the position on shutdown: after
    shutdown neither the raw reader nor the buffer gives a byte."""
    printer = Printer()
    f = opener(payload, printer)
    f.seek(BLOCK - 10)
    assert f.buffer.peek(1)           # something is buffered now
    printer.shutdown = True
    f.seek(BLOCK - 10)
    assert f.read(1) == ""            # virtual_sdcard's dump gets nothing
    with pytest.raises(sr.ShutdownRead):
        f.buffer.read(1)
    with pytest.raises(sr.ShutdownRead):
        f.buffer.raw.readinto(bytearray(10))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def corrupt_footer(p: bytearray) -> None:
    p[-FOOTER_SIZE + 16 + 9] ^= 0x10       # the G-code size, one block more


def corrupt_index(p: bytearray) -> None:
    off = len(p) - FOOTER_SIZE - 30        # inside the last index member
    p[off] ^= 0x40


@pytest.mark.parametrize("damage", [corrupt_footer, corrupt_index,
                                    lambda p: p.__delitem__(slice(-1, None)),
                                    lambda p: p.__setitem__(slice(-10, None), b"\0" * 10)])
def test_bad_index_refused_and_fd_closed(payload, damage, tmp_path):
    p = bytearray(payload)
    damage(p)
    before = open_fds()
    with pytest.raises(sr.SeekgzError):
        open_text(sealed_memfd(bytes(p)), len(p), str(tmp_path / "x.gcode"), Printer())
    assert open_fds() == before


def test_gcode_size_off_by_one_refused_on_read(opener, payload, clear):
    """A footer whose G-code size is one byte short still lists the right
    blocks; the last block then inflates to a byte more than it should."""
    p = bytearray(payload)
    p[-FOOTER_SIZE + 16 + 8] ^= 1
    f = opener(bytes(p))
    f.seek(len(clear) - 5)
    with pytest.raises(sr.SeekgzError, match="inflates to"):
        f.read(2)


def test_tampered_block_refused_on_read(opener, payload):
    """The helper refuses such a payload before the fd leaves; the reader
    still never returns a wrong byte."""
    p = bytearray(payload)
    p[2 * 0 + 60] ^= 0x08                     # deflate data of block 0
    f = opener(bytes(p))
    with pytest.raises(sr.SeekgzError):
        f.read(10)


def bomb_payload(clear_bytes: int) -> bytes:
    """One 4 KiB block whose deflate data inflates to clear_bytes zeros."""
    import struct
    import zlib
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = c.compress(b"\0" * clear_bytes) + c.flush()
    member = sr.SEEKGZ_MAGIC + b"\0\0\0\0" + body + struct.pack("<II", 0, BLOCK)
    member = member[:16] + struct.pack("<I", len(member)) + member[20:]
    index = (sr._GZ_HEAD + struct.pack("<H2sH", 8, b"Ei", 4) + struct.pack("<I", len(member))
             + sr.SEEKGZ_EMPTY_TAIL)
    footer = (sr.SEEKGZ_FOOTER_HEAD + struct.pack("<IIQQII", 1, BLOCK, BLOCK, len(member), 1,
                                                  len(index)) + sr.SEEKGZ_EMPTY_TAIL)
    return member + index + footer


def test_bomb_block_refused(tmp_path):
    """A block whose deflate data inflates far past its block size (2 MiB
    from a member that fits a 4 KiB block's bound) stops at block size + 1
    bytes and is refused; a member larger than any deflate of a block (an
    8 MiB bomb) is refused by the index, before anything is inflated."""
    data = bomb_payload(2 << 20)
    f = open_text(sealed_memfd(data), len(data), str(tmp_path / "b.gcode"), Printer())
    try:
        with pytest.raises(sr.SeekgzError, match="inflates to 4097 bytes, not 4096"):
            f.buffer.read(10)
        assert f.buffer.raw._data == b"", "nothing of the bomb is kept"
    finally:
        f.close()
    data = bomb_payload(8 << 20)
    with pytest.raises(sr.SeekgzError, match="impossible size"):
        open_text(sealed_memfd(data), len(data), str(tmp_path / "b.gcode"), Printer())


def test_close_closes_the_memfd(payload, tmp_path):
    before = open_fds()
    f = open_text(sealed_memfd(payload), len(payload), str(tmp_path / "c.gcode"), Printer())
    assert open_fds() == before + 1
    assert f.name == str(tmp_path / "c.gcode")
    f.close()
    assert open_fds() == before
    with pytest.raises(ValueError):
        f.read(1)


def test_text_wrapper_is_what_the_bridge_builds(opener, payload):
    f = opener(payload)
    assert isinstance(f, io.TextIOWrapper) and f.seekable() and f.readable()


VECTORS = ROOT / "proto" / "testdata" / "seekgz"


@pytest.mark.parametrize("case", json.loads((VECTORS / "vectors.json").read_text()),
                         ids=lambda c: c["file"])
def test_format_vectors(case, tmp_path):
    """proto/testdata/seekgz: the valid payloads read back to their G-code,
    every bad one is refused, at open (index) or at the bad block's read."""
    data = (VECTORS / case["file"]).read_bytes()
    before = open_fds()
    if case["expect"] in ("index_error", "not_seekable"):
        with pytest.raises(sr.SeekgzError):
            open_text(sealed_memfd(data), len(data), str(tmp_path / "v.gcode"), Printer())
        assert open_fds() == before
        return
    f = open_text(sealed_memfd(data), len(data), str(tmp_path / "v.gcode"), Printer())
    try:
        if case["expect"] == "block_error":
            with pytest.raises(sr.SeekgzError):
                while f.buffer.read(4096):
                    pass
            return
        got = f.buffer.read()
        assert len(got) == case.get("gcode_size", 0)
        assert hashlib.sha256(got).hexdigest() == case["gcode_sha256"]
        assert f.buffer.raw._index.blocks() == case.get("blocks", 0)
        assert gzip.decompress(data) == got
    finally:
        f.close()
    assert open_fds() == before


class ThreadExecutor:
    """A stand-in for Klipper master's aio_executor (klippy/extras/
    aio_executor.py: one worker thread, submit waits for the result), named
    as such: the real one needs a reactor. Holds each read until released,
    so the test can act while a read is in flight."""

    def __init__(self) -> None:
        import threading
        self.started, self.release = threading.Event(), threading.Event()
        self.threads: list = []

    def submit(self, fn, *args):
        import threading
        out: list = []

        def run() -> None:
            self.threads.append(threading.current_thread().name)
            self.started.set()
            self.release.wait(10)
            out.append(fn(*args))
        t = threading.Thread(target=run, name="vsd-io")
        t.start()
        self.thread = t
        return out


def test_reads_run_on_the_io_thread_and_close_waits_for_them(payload, clear, tmp_path):
    """On Klipper master a read runs on virtual_sdcard's I/O thread while the
    reactor goes on; closing the file then (a shutdown, a cancel) must not
    close the memfd under that read, and closes it once the read is done."""
    fd = sealed_memfd(payload)
    raw = sr.SeekgzRaw(fd, str(tmp_path / "t.gcode"), "t.gcode", Printer(),
                       sr.SeekgzIndex(fd, len(payload)), ThreadExecutor())
    ex = raw._executor
    raw.seek(BLOCK - 2)
    buf = bytearray(10)
    out = raw.readinto(buf)               # in flight on the I/O thread
    assert ex.started.wait(5)
    before = open_fds()
    raw.close()                           # from the "reactor" meanwhile
    assert open_fds() == before, "the memfd was closed under a read in flight"
    ex.release.set()
    ex.thread.join(5)
    assert out == [2] and bytes(buf[:2]) == clear[BLOCK - 2:BLOCK]
    assert ex.threads == ["vsd-io"]
    assert raw.closed and open_fds() == before - 1
    with pytest.raises(ValueError):
        raw.readinto(bytearray(1))


@pytest.mark.parametrize("block", [4096, 1 << 20])
def test_incompressible_blocks_are_not_taken_for_a_lying_index(encoder, tmp_path, block):
    """The index's bound on a block member's size stays above what the
    encoder writes for data deflate cannot shrink (stored blocks)."""
    data = os.urandom(3 * block + 5)
    (tmp_path / "in").write_bytes(data)
    subprocess.run([str(encoder), "-block", str(block), str(tmp_path / "in"),
                    str(tmp_path / "out")], check=True, capture_output=True)
    payload = (tmp_path / "out").read_bytes()
    fd = sealed_memfd(payload)
    try:
        ix = sr.SeekgzIndex(fd, len(payload))
        raw = sr.SeekgzRaw(os.dup(fd), "r.gcode", "r.gcode", Printer(), ix)
        raw.seek(2 * block - 1)
        assert raw.read(1) + raw.read(1) == data[2 * block - 1:2 * block + 1]
        raw.close()
    finally:
        os.close(fd)


def test_the_sniff_takes_an_empty_gcode_and_refuses_other_gzip(encoder, tmp_path):
    """What registration decides from a memfd's first bytes: the footer
    member alone is an empty G-code (docs/format.md), gzip's own output is
    refused, G-code is G-code."""
    class Bridge:
        printer = type("P", (), {"command_error": RuntimeError})()
    (tmp_path / "in").write_bytes(b"")
    subprocess.run([str(encoder), str(tmp_path / "in"), str(tmp_path / "out")], check=True)
    empty = (tmp_path / "out").read_bytes()
    assert len(empty) == FOOTER_SIZE
    fd = sealed_memfd(gzip.compress(b"G28\n"))
    with pytest.raises(RuntimeError, match="not a seekable gzip"):
        sr.EncryptedFileBridge._seekgz_index(Bridge(), fd, len(gzip.compress(b"G28\n")), "x")
    os.close(fd)
    fd = sealed_memfd(b"G28\n")
    assert sr.EncryptedFileBridge._seekgz_index(Bridge(), fd, 4, "x") is None
    os.close(fd)
    fd = sealed_memfd(empty)
    ix = sr.EncryptedFileBridge._seekgz_index(Bridge(), fd, len(empty), "x")
    assert (ix.blocks(), ix.clear_size) == (0, 0)
    f = sr._Registration("x.gcode", "x", fd, len(empty), Printer(), 0, ix).file
    assert (f.read(), f.seek(0, os.SEEK_END)) == ("", 0)
    f.close()
