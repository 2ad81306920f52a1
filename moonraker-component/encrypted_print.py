# Encrypted G-code printing for Moonraker
#
# [encrypted_print] in moonraker.conf loads this component. It recognises
# encrypted G-code files (age v1, docs/format.md), publishes their metadata,
# and prints them: a helper process decrypts into a sealed memfd that Klipper's
# [encrypted_file_bridge] opens through /proc. See docs/ and proto/PROTOCOL.md.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import array
import asyncio
import fcntl
import logging
import os
import secrets
import socket
import struct
from typing import Any, Callable, Dict, List, Optional, Tuple

try:
    import msgpack
except ImportError:  # reported by the component as a warning, not a crash
    msgpack = None

PROTOCOL_VERSION = 1
MAGIC = b"age-encryption.org/v1\n"
MAX_RECORD = 65536
MAX_MESSAGE = 16 << 20
ALL_SEALS = 0x1 | 0x2 | 0x4 | 0x8  # F_SEAL_SEAL|SHRINK|GROW|WRITE
F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)


def is_encrypted_file(path: str) -> bool:
    """True if the file starts with the age v1 intro line."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


class HelperError(Exception):
    """An operation failed; ``code`` is a protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class DecryptedFile:
    """A sealed memfd holding cleartext G-code, owned by the component."""

    def __init__(self, fd: int, result: Dict[str, Any]) -> None:
        self.fd = fd
        self.size: int = result["size"]
        self.sha256: bytes = result["sha256"]
        self.file_id: bytes = result["file_id"]
        self.memfd_name: str = result["memfd_name"]
        self.seals: int = result["seals"]
        self.elapsed_ms: float = result["elapsed_ms"]
        self.publisher: Optional[str] = result.get("publisher")
        self.signature_valid: bool = bool(result.get("signature_valid"))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def closed(self) -> bool:
        return self.fd < 0


def _close_all(fds: List[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class _Channel:
    """Records of a non-blocking SOCK_SEQPACKET socket, read through the loop."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    async def recv_record(self) -> Tuple[bytes, List[int]]:
        fut: asyncio.Future = self.loop.create_future()
        fileno = self.sock.fileno()

        def on_readable() -> None:
            if fut.done():
                return
            try:
                data, anc, flags, _ = self.sock.recvmsg(
                    MAX_RECORD, socket.CMSG_SPACE(4), socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                fut.set_exception(HelperError("internal", f"reading from the helper: {e}"))
                return
            fds: List[int] = []
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    n = len(cdata) // 4
                    fds.extend(array.array("i", cdata[:n * 4]))
            if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
                _close_all(fds)
                fut.set_exception(HelperError(
                    "internal", "the helper sent a truncated record or more "
                    "descriptors than allowed; all were closed"))
                return
            fut.set_result((data, fds))

        self.loop.add_reader(fileno, on_readable)
        try:
            return await fut
        finally:
            self.loop.remove_reader(fileno)

    async def recv_message(self) -> Tuple[Dict[str, Any], Optional[int]]:
        data, fds = await self.recv_record()
        try:
            if not data:
                raise HelperError("internal", "the helper closed the connection "
                                  "without answering (it crashed or was killed)")
            if len(data) < 4:
                raise HelperError("internal", "the helper sent a record too short "
                                  "for a message")
            want = struct.unpack(">I", data[:4])[0]
            if want > MAX_MESSAGE:
                raise HelperError("internal", f"the helper announced a {want}-byte "
                                  "message, over the protocol's limit")
            body = bytearray(data[4:])
            while len(body) < want:
                more, extra = await self.recv_record()
                if extra:
                    _close_all(extra)
                    raise HelperError("internal", "the helper attached a descriptor "
                                      "to a continuation record")
                if not more:
                    raise HelperError("internal", "the helper closed the connection "
                                      "in the middle of a message")
                body += more
            if len(body) != want:
                raise HelperError("internal", "the helper's message is longer than "
                                  "its length prefix")
            if len(fds) > 1:
                raise HelperError("internal", f"the helper sent {len(fds)} descriptors; "
                                  "all were closed")
            try:
                msg = msgpack.unpackb(bytes(body), raw=False)
            except Exception as e:  # noqa: BLE001 - any decode failure is garbage
                raise HelperError("internal", f"the helper sent garbage: {e}") from None
            if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
                raise HelperError("internal", "the helper sent a message without a type")
        except BaseException:
            _close_all(fds)
            raise
        return msg, (fds[0] if fds else None)

    async def send_message(self, msg: Dict[str, Any]) -> None:
        body = msgpack.packb(msg, use_bin_type=True)
        data = struct.pack(">I", len(body)) + body
        for i in range(0, len(data), MAX_RECORD):
            await self.loop.sock_sendall(self.sock, data[i:i + MAX_RECORD])


def frame(msg: Dict[str, Any]) -> bytes:
    """The msgpack body of a message, as the golden vectors encode it."""
    return msgpack.packb(msg, use_bin_type=True)


def check_memfd(fd: int, name: str, size: int) -> None:
    """Raise HelperError unless fd is the sealed memfd the helper announced."""
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
        if link != f"/memfd:{name} (deleted)":
            raise HelperError("internal", f"the helper sent {link!r}, not the memfd {name}")
        seals = fcntl.fcntl(fd, F_GET_SEALS)
        st = os.fstat(fd)
    except OSError as e:
        raise HelperError("internal", f"cannot check the received file: {e}") from None
    if seals & ALL_SEALS != ALL_SEALS:
        raise HelperError("internal", f"the received memfd is not sealed (seals {seals:#x})")
    if st.st_size != size:
        raise HelperError("internal", f"the received memfd has {st.st_size} bytes, "
                          f"the helper announced {size}")


class HelperClient:
    """Runs encprint-helper for one operation at a time (proto/PROTOCOL.md)."""

    def __init__(self, helper_path: str, identity_path: str,
                 inspect_timeout: float = 20.0, decrypt_timeout: float = 600.0,
                 hello_timeout: float = 10.0) -> None:
        self.helper_path = helper_path
        self.identity_path = identity_path
        self.inspect_timeout = inspect_timeout
        self.decrypt_timeout = decrypt_timeout
        self.hello_timeout = hello_timeout
        self.last_stderr = ""
        self.helper_version = ""
        self.pid: Optional[int] = None  # of the running helper, if any

    async def version(self) -> Tuple[int, str]:
        """The helper's protocol and build version, from its hello."""
        proto, ver, _ = await self._run(None, None, self.hello_timeout)
        return proto, ver

    async def inspect(self, path: str, root: str) -> Dict[str, Any]:
        _, _, (res, _) = await self._run(
            self._request("inspect", path, root), None, self.inspect_timeout)
        return res

    async def decrypt(self, path: str, root: str, max_bytes: int = 0,
                      progress: Optional[Callable[[int, int], None]] = None
                      ) -> DecryptedFile:
        req = self._request("decrypt", path, root)
        req["max_bytes"] = max_bytes
        req["memfd_name"] = "encprint-" + secrets.token_hex(8)
        _, _, (res, fd) = await self._run(req, progress, self.decrypt_timeout)
        if fd is None:
            raise HelperError("internal", "the helper's decrypt result came without "
                              "the memfd")
        try:
            if res.get("memfd_name") != req["memfd_name"]:
                raise HelperError("internal", "the helper answered with another memfd name")
            check_memfd(fd, req["memfd_name"], res["size"])
            return DecryptedFile(fd, res)
        except BaseException:
            os.close(fd)
            raise

    def _request(self, op: str, path: str, root: str) -> Dict[str, Any]:
        return {"type": "request", "protocol": PROTOCOL_VERSION, "op": op,
                "path": os.path.abspath(path), "root": os.path.abspath(root),
                "identity": self.identity_path, "max_bytes": 0, "memfd_name": ""}

    async def _run(self, request: Optional[Dict[str, Any]],
                   progress: Optional[Callable[[int, int], None]],
                   timeout: float) -> Tuple[int, str, Tuple[Dict[str, Any], Optional[int]]]:
        if msgpack is None:
            raise HelperError("internal", "the Python package msgpack is missing in "
                              "Moonraker's virtualenv: run ~/moonraker-env/bin/pip "
                              "install msgpack")
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        proc: Optional[asyncio.subprocess.Process] = None
        fd: Optional[int] = None
        try:
            try:
                proc = await asyncio.create_subprocess_exec(
                    self.helper_path, "--socket-fd", str(child.fileno()),
                    pass_fds=(child.fileno(),), stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE)
            except OSError as e:
                raise HelperError("helper_missing", f"cannot start the helper "
                                  f"{self.helper_path}: {e.strerror}") from None
            finally:
                child.close()
            self.pid = proc.pid
            parent.setblocking(False)
            chan = _Channel(parent)
            try:
                hello, extra = await asyncio.wait_for(chan.recv_message(), self.hello_timeout)
            except asyncio.TimeoutError:
                raise HelperError("helper_timeout", f"the helper did not say hello within "
                                  f"{self.hello_timeout:g}s") from None
            if extra is not None:
                os.close(extra)
                raise HelperError("internal", "the helper attached a descriptor to its hello")
            if hello.get("type") != "hello" or not isinstance(hello.get("protocol"), int):
                raise HelperError("internal", "the helper did not start with a hello")
            self.helper_version = str(hello.get("version", "?"))
            if hello["protocol"] != PROTOCOL_VERSION:
                raise HelperError(
                    "protocol_mismatch",
                    f"the helper {self.helper_path} (version {self.helper_version}) speaks "
                    f"protocol {hello['protocol']} but this component speaks "
                    f"{PROTOCOL_VERSION}: rebuild it with `make -C <encprint checkout> "
                    "build` or re-run install.sh")
            if request is None:
                return hello["protocol"], self.helper_version, ({}, None)
            await chan.send_message(request)

            async def answer() -> Tuple[Dict[str, Any], Optional[int]]:
                while True:
                    msg, got = await chan.recv_message()
                    kind = msg["type"]
                    if kind == "progress":
                        if got is not None:
                            os.close(got)
                            raise HelperError("internal", "descriptor on a progress message")
                        if progress is not None:
                            progress(int(msg.get("done", 0)), int(msg.get("total", 0)))
                        continue
                    if kind == "error":
                        if got is not None:
                            os.close(got)
                        raise HelperError(str(msg.get("code", "internal")),
                                          str(msg.get("message", "unknown error")))
                    if kind == "result" and msg.get("op") == request["op"]:
                        if got is not None and request["op"] != "decrypt":
                            os.close(got)
                            raise HelperError("internal", "descriptor on an inspect result")
                        return msg, got
                    if got is not None:
                        os.close(got)
                    raise HelperError("internal", f"unexpected {kind!r} message from the helper")

            try:
                res, fd = await asyncio.wait_for(answer(), timeout)
            except asyncio.TimeoutError:
                raise HelperError("helper_timeout", f"the helper did not finish "
                                  f"{request['op']} within {timeout:g}s; it was stopped"
                                  ) from None
            got_fd, fd = fd, None
            return PROTOCOL_VERSION, self.helper_version, (res, got_fd)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        finally:
            parent.close()
            if proc is not None:
                await self._reap(proc)
            self.pid = None

    async def _reap(self, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            try:
                await asyncio.wait_for(proc.wait(), 2.0)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        if proc.stderr is not None:
            err = await proc.stderr.read()
            self.last_stderr = err.decode(errors="replace").strip()
            if self.last_stderr:
                logging.info(f"encrypted_print: helper said: {self.last_stderr}")
