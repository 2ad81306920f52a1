# Encrypted G-code printing for Moonraker
#
# [encrypted_print] in moonraker.conf loads this component. It recognises
# encrypted G-code files (age v1, docs/format.md), publishes their metadata,
# and prints them: a helper process decrypts into a sealed memfd that Klipper's
# [encrypted_file_bridge] opens through /proc. See docs/ and proto/PROTOCOL.md.
#
# The parts, one concern each, wired together by EncryptedPrint:
#   HelperClient       runs encprint-helper for one operation (the protocol)
#   DecryptedFile      the sealed memfd this process holds during a print
#   TrustPolicy        may an authenticated file print here, now?
#   JobRecords         print counts and the audit trail in Moonraker's database
#   Diagnostics        start-up checks, each problem one warning in the UI
#   MetadataPublisher  metadata and thumbnails of uploaded encrypted files
#   JobTracker         the print's lifetime: the memfd is held until it ends
#   PrintStarter       every start path: check, decrypt, register, start
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import array
import asyncio
import ctypes
import fcntl
import io
import logging
import os
import pathlib
import re
import resource
import secrets
import socket
import stat
import struct
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Dict, List, Optional, Tuple

from ..common import RequestType, TransportType, WebRequest

if TYPE_CHECKING:
    from ..common import UserInfo
    from ..confighelper import ConfigHelper
    from ..server import Server
    from .database import NamespaceWrapper
    from .file_manager.file_manager import FileManager, MetadataStorage
    from .klippy_apis import KlippyAPI
    from .klippy_connection import KlippyConnection

try:
    import msgpack
except ImportError:  # reported by the component as a warning, not a crash
    msgpack = None
try:
    import segno  # the owner page's QR code
except ImportError:  # the page then shows the recipient without it
    segno = None

# -- the contract with the helper and the Klipper extra -----------------------
# Every value here is in proto/contract.json; tests/test_contract.py fails when
# one differs.
PROTOCOL_VERSION = 2
AGE_MAGIC = b"age-encryption.org/v1\n"
AGE_ARMOR = b"-----BEGIN AGE ENCRYPTED FILE-----"
LENGTH_PREFIX = 4            # bytes of the message length, in the first record
MAX_RECORD = 65536           # largest record, length prefix included
MAX_MESSAGE = 16 << 20       # largest message body
F_GET_SEALS = 1034
REQUIRED_SEALS = 0x1 | 0x2 | 0x4 | 0x8  # F_SEAL_SEAL|SHRINK|GROW|WRITE
MEMFD_TOKEN_PREFIX = "encprint-"
MEMFD_LINK = "/memfd:{token} (deleted)"
BRIDGE_OBJECT = "encrypted_file_bridge"
REGISTER_ENDPOINT = "encrypted_file_bridge/register"
REGISTER_PARAMS = ("filename", "pid", "fd", "size", "token")
REGISTER_REPLY = "consumed"
REFUSE_ENDPOINT = "encrypted_file_bridge/refuse"
REFUSE_PARAMS = ("filename", "message")
UNREGISTER_COMMAND = "UNREGISTER_ENCRYPTED_FILE"
REMOTE_METHOD = "encrypted_print_prepare"
PUBLISHER_KEY_RE = re.compile(r"^encprint-pub:[A-Za-z0-9+/]{43}$")
# Codes of errors raised here rather than sent by the helper.
CLIENT_ERROR_CODES = ("helper_missing", "helper_timeout", "helper_protocol",
                      "mlock_failed")
ALL_SEALS = REQUIRED_SEALS  # the name the tests and benchmarks know

# -- this component's own names ------------------------------------------------
EXPOSED_WARNING = (
    "the printer's key is a file of Moonraker's own user, so any macro or shell "
    "command running as that user (by default anyone on the network with the web UI) "
    "can read the key and decrypt every file sent to this printer, and print counts "
    "and trust settings can be rolled back. Fix: run install.sh again where sudo "
    "works, which installs the helper set-user-ID to a user of its own and gives it "
    "the key, the counts and the policy (docs/install.md, 'The installed helper')")
COUNTS_NAMESPACE = "encrypted_print"     # print counts per file id
JOBS_NAMESPACE = "encrypted_print_jobs"  # the audit trail
DEFAULT_IDENTITY = "~/.config/encprint/printer.key"
# Klipper's extended G-code parser stops at these; a name holding one cannot
# be sent in SDCARD_PRINT_FILE or REGISTER_ENCRYPTED_FILE.
UNSENDABLE = re.compile(r"[\x00-\x1f\x7f;#*]")
GCODE_UNSAFE = re.compile(r"[\x00-\x1f\x7f;#*\"]")
FINISHED_STATES = ("complete", "cancelled", "error")
# The public metadata fields a file may carry (docs/format.md), as Moonraker's
# parser types them: the only keys the component copies into Moonraker's
# metadata, so a crafted file cannot set size, job_id or encrypted_print.
METADATA_FIELDS = {
    "slicer": "str", "slicer_version": "str", "estimated_time": "number",
    "filament_total": "number", "filament_weight_total": "number",
    "filament_type": "str", "filament_name": "str", "layer_height": "number",
    "first_layer_height": "number", "object_height": "number",
    "nozzle_diameter": "number", "layer_count": "int", "gcode_start_byte": "int",
    "gcode_end_byte": "int", "first_layer_extr_temp": "number",
    "first_layer_bed_temp": "number", "chamber_temp": "number",
    "filament_colors": "str_list", "extruder_colors": "str_list",
    "filament_temps": "int_list", "referenced_tools": "int_list", "mmu_print": "int",
    "filament_change_count": "int", "filament_weights": "float_list",
    "printer_vendor": "str", "printer_model": "str", "printer_variant": "str",
    "profile_version": "str",
}
# Tornado replaces an HTTP reason phrase holding anything else (or a '<') by
# "Unknown", and Moonraker sends that phrase as the error message.
_REASON_OK = re.compile(r"[\t !-;=-~\x80-\xff]")


def _is_kind(value: Any, kind: str) -> bool:
    """value has the type METADATA_FIELDS gives a field."""
    def num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return num(value)
    if not isinstance(value, list):
        return False
    if kind == "str_list":
        return all(isinstance(v, str) for v in value)
    if kind == "int_list":
        return all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return all(isinstance(v, float) for v in value)


def is_encrypted_file(path: str) -> bool:
    """True if the file starts with the age v1 intro line, or is ASCII-armored
    age (which must be refused with a reason, not printed as G-code)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(AGE_ARMOR))
    except OSError:
        return False
    return head.startswith(AGE_MAGIC) or head == AGE_ARMOR


def gcode_quote(name: str) -> str:
    """A file name inside a double-quoted G-code parameter."""
    return name.replace("\\", "\\\\").replace('"', '\\"')


def http_safe(msg: str) -> str:
    """msg with every character an HTTP reason phrase cannot carry written as
    a Python escape, so that the text survives Moonraker's HTTP errors."""
    return "".join(c if _REASON_OK.fullmatch(c) else
                   (f"\\x{ord(c):02x}" if ord(c) < 0x100 else
                    f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}")
                   for c in msg)


class HelperError(Exception):
    """An operation failed. ``code`` is one of the helper's error codes
    (proto/PROTOCOL.md) or, for failures seen on this side of the socket, one
    of CLIENT_ERROR_CODES."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _close_all(fds: List[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# -- the decrypted file --------------------------------------------------------

_libc: Any = None


def _c() -> Any:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                             ctypes.c_int, ctypes.c_long]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc = lib
    return _libc


def check_memfd(fd: int, token: str, size: int) -> None:
    """Raise HelperError unless fd is the sealed memfd the helper announced."""
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
        if link != MEMFD_LINK.format(token=token):
            raise HelperError("helper_protocol", f"the helper sent {link!r}, "
                              f"not the memfd {token}")
        seals = fcntl.fcntl(fd, F_GET_SEALS)
        st = os.fstat(fd)
    except OSError as e:
        raise HelperError("helper_protocol", f"cannot check the received file: {e}") from None
    if seals & REQUIRED_SEALS != REQUIRED_SEALS:
        raise HelperError("helper_protocol", f"the received memfd is not sealed "
                          f"(seals {seals:#x})")
    if st.st_size != size:
        raise HelperError("helper_protocol", f"the received memfd has {st.st_size} "
                          f"bytes, the helper announced {size}")


class DecryptedFile:
    """A sealed memfd holding cleartext G-code, owned by the component."""

    def __init__(self, fd: int, result: Dict[str, Any]) -> None:
        self.fd = fd
        self.size: int = result["size"]  # of the memfd: the payload, maybe compressed
        self.gcode_size: int = result["gcode_size"]
        self.sha256: Optional[bytes] = result.get("sha256")  # only for sig v1 files
        self.file_id: bytes = result["file_id"]
        self.memfd_name: str = result["memfd_name"]
        self.seals: int = result["seals"]
        self.elapsed_ms: float = result["elapsed_ms"]
        self.publisher: Optional[str] = result.get("publisher")
        self.signature_valid: bool = bool(result.get("signature_valid"))
        self.locked_at: Optional[int] = None

    def lock_in_memory(self) -> None:
        """Keep the cleartext out of swap until close(): map the sealed memfd
        read-only and mlock the mapping. Fails with a clear HelperError when
        RLIMIT_MEMLOCK (LimitMEMLOCK= of the service) is too low."""
        if self.size == 0 or self.locked_at is not None:
            return
        libc = _c()
        addr = libc.mmap(None, self.size, 0x1, 0x01, self.fd, 0)  # PROT_READ, MAP_SHARED
        if addr is None or addr == ctypes.c_void_p(-1).value:
            err = ctypes.get_errno()
            raise HelperError("mlock_failed", f"cannot map the decrypted file: "
                              f"{os.strerror(err)}")
        if libc.mlock(addr, self.size) != 0:
            err = ctypes.get_errno()
            libc.munmap(addr, self.size)
            soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
            limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft // 1024} KiB"
            raise HelperError(
                "mlock_failed",
                f"cannot lock {self.size / 1048576:.1f} MiB of G-code in memory "
                f"({os.strerror(err)}; Moonraker may lock {limit}): add a drop-in with "
                "[Service] LimitMEMLOCK=infinity to moonraker.service, or set "
                "[encrypted_print] swap_protection to refuse_disk_swap or none")
        self.locked_at = addr

    def close(self) -> None:
        if self.locked_at is not None:
            _c().munmap(self.locked_at, self.size)  # unlocks too
            self.locked_at = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# -- the helper protocol (proto/PROTOCOL.md) ------------------------------------

Reply = Tuple[Dict[str, Any], Optional[int]]  # a message and the fd it carried


def frame(msg: Dict[str, Any]) -> bytes:
    """The msgpack body of a message, as the golden vectors encode it."""
    return msgpack.packb(msg, use_bin_type=True)


def _protocol_error(msg: str) -> HelperError:
    return HelperError("helper_protocol", msg)


class _Channel:
    """Messages over a non-blocking SOCK_SEQPACKET socket, read through the
    loop. Every descriptor received is closed on every error path."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    def _read_record(self) -> Tuple[bytes, List[int]]:
        data, anc, flags, _ = self.sock.recvmsg(
            MAX_RECORD, socket.CMSG_SPACE(4), socket.MSG_CMSG_CLOEXEC)
        fds: List[int] = []
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", cdata[:len(cdata) // 4 * 4]))
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            _close_all(fds)
            raise _protocol_error("the helper sent a truncated record or more "
                                  "descriptors than allowed; all were closed")
        return data, fds

    async def recv_record(self) -> Tuple[bytes, List[int]]:
        fut: asyncio.Future = self.loop.create_future()

        def on_readable() -> None:
            if fut.done():
                return
            try:
                try:
                    fut.set_result(self._read_record())
                except ConnectionResetError:
                    # The helper exited with our records unread; its own last
                    # records are queued behind the reset, then end-of-file
                    # (proto/PROTOCOL.md). Read them now: uvloop does not
                    # call a reader again after the error event.
                    fut.set_result(self._read_record())
            except (BlockingIOError, InterruptedError):
                return
            except HelperError as e:
                fut.set_exception(e)
            except OSError as e:
                fut.set_exception(_protocol_error(f"reading from the helper: {e}"))

        fileno = self.sock.fileno()
        self.loop.add_reader(fileno, on_readable)
        try:
            return await fut
        finally:
            self.loop.remove_reader(fileno)

    async def recv_message(self) -> Reply:
        data, fds = await self.recv_record()
        try:
            msg = await self._assemble(data)
            if len(fds) > 1:
                raise _protocol_error(f"the helper sent {len(fds)} descriptors; "
                                      "all were closed")
        except BaseException:
            _close_all(fds)
            raise
        return msg, (fds[0] if fds else None)

    async def _assemble(self, first: bytes) -> Dict[str, Any]:
        if not first:
            raise _protocol_error("the helper closed the connection without "
                                  "answering (it crashed or was killed)")
        if len(first) < LENGTH_PREFIX:
            raise _protocol_error("the helper sent a record too short for a message")
        want = struct.unpack(">I", first[:LENGTH_PREFIX])[0]
        if want > MAX_MESSAGE:
            raise _protocol_error(f"the helper announced a {want}-byte message, "
                                  "over the protocol's limit")
        body = bytearray(first[LENGTH_PREFIX:])
        while len(body) < want:
            more, extra = await self.recv_record()
            if extra:
                _close_all(extra)
                raise _protocol_error("the helper attached a descriptor to a "
                                      "continuation record")
            if not more:
                raise _protocol_error("the helper closed the connection in the "
                                      "middle of a message")
            body += more
        if len(body) != want:
            raise _protocol_error("the helper's message is longer than its length prefix")
        try:
            msg = msgpack.unpackb(bytes(body), raw=False)
        except Exception as e:  # noqa: BLE001 - any decode failure is garbage
            raise _protocol_error(f"the helper sent garbage: {e}") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            raise _protocol_error("the helper sent a message without a type")
        return msg

    async def send_message(self, msg: Dict[str, Any]) -> None:
        body = frame(msg)
        data = struct.pack(">I", len(body)) + body
        for i in range(0, len(data), MAX_RECORD):
            await self.loop.sock_sendall(self.sock, data[i:i + MAX_RECORD])


class HelperClient:
    """Runs encprint-helper for one operation at a time (proto/PROTOCOL.md)."""

    def __init__(self, helper_path: str, identity_path: str,
                 inspect_timeout: float = 20.0, decrypt_timeout: float = 600.0,
                 hello_timeout: float = 10.0,
                 rebuild_hint: str = "rebuild it with `make build` in the "
                 "klipper-encprint checkout") -> None:
        self.helper_path = helper_path
        self.rebuild_hint = rebuild_hint
        self.identity_path = identity_path
        self.inspect_timeout = inspect_timeout
        self.decrypt_timeout = decrypt_timeout
        self.hello_timeout = hello_timeout
        self.last_stderr = ""
        self.helper_version = ""

    @property
    def installed(self) -> bool:
        """The helper is installed set-user-ID to a user of its own
        (docs/adr/007-privilege-boundary.md): it reads its own identity,
        policy and print counts, and ignores identity_path."""
        try:
            st = os.stat(self.helper_path)
        except OSError:
            return False
        return bool(st.st_mode & stat.S_ISUID) and st.st_uid != os.geteuid()

    async def version(self) -> Tuple[int, str]:
        """The helper's protocol and build version, from its hello."""
        hello, _ = await self._run(None, None, self.hello_timeout)
        return hello["protocol"], self.helper_version

    async def recipient(self) -> str:
        """The printer's public recipient; only the helper reads the identity."""
        res, _ = await self._run(self._request("recipient"), None, self.inspect_timeout)
        return str(res["recipient"])

    async def records(self) -> List[Dict[str, Any]]:
        """The installed helper's record of every decryption, oldest first
        (empty for a helper that is not installed set-user-ID)."""
        res, _ = await self._run(self._request("records"), None, self.inspect_timeout)
        return [dict(r) for r in res.get("records") or []]

    async def inspect(self, path: str, root: str) -> Dict[str, Any]:
        res, _ = await self._run(self._request("inspect", path, root), None,
                                 self.inspect_timeout)
        return res

    async def decrypt(self, path: str, root: str, max_bytes: int = 0,
                      progress: Optional[Callable[[int, int], None]] = None
                      ) -> DecryptedFile:
        req = self._request("decrypt", path, root)
        req["max_bytes"] = max_bytes
        req["memfd_name"] = MEMFD_TOKEN_PREFIX + secrets.token_hex(8)
        res, fd = await self._run(req, progress, self.decrypt_timeout)
        if fd is None:
            raise _protocol_error("the helper's decrypt result came without the memfd")
        try:
            if res.get("memfd_name") != req["memfd_name"]:
                raise _protocol_error("the helper answered with another memfd name")
            check_memfd(fd, req["memfd_name"], res["size"])
            return DecryptedFile(fd, res)
        except BaseException:
            os.close(fd)
            raise

    def _request(self, op: str, path: str = "", root: str = "") -> Dict[str, Any]:
        req: Dict[str, Any] = {"type": "request", "protocol": PROTOCOL_VERSION, "op": op}
        if path:
            req.update(path=os.path.abspath(path), root=os.path.abspath(root))
        if op != "records":
            req["identity"] = self.identity_path
        return req

    async def _run(self, request: Optional[Dict[str, Any]],
                   progress: Optional[Callable[[int, int], None]],
                   timeout: float) -> Reply:
        """One helper process: hello, then (unless request is None) the
        request and its answer. Returns the hello for None."""
        if msgpack is None:
            raise HelperError("helper_missing", "the Python package msgpack is missing "
                              "in Moonraker's virtualenv: run ~/moonraker-env/bin/pip "
                              "install msgpack")
        parent, proc = await self._spawn()
        try:
            chan = _Channel(parent)
            hello = await self._hello(chan)
            if request is None:
                return hello, None
            await chan.send_message(request)
            try:
                return await asyncio.wait_for(
                    self._answer(chan, request["op"], progress), timeout)
            except asyncio.TimeoutError:
                raise HelperError("helper_timeout", f"the helper did not finish "
                                  f"{request['op']} within {timeout:g}s; it was stopped"
                                  ) from None
        finally:
            parent.close()
            await self._reap(proc)

    async def _spawn(self) -> Tuple[socket.socket, asyncio.subprocess.Process]:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = await asyncio.create_subprocess_exec(
                self.helper_path, "--socket-fd", str(child.fileno()),
                pass_fds=(child.fileno(),), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        except OSError as e:
            parent.close()
            raise HelperError("helper_missing", f"cannot start the helper "
                              f"{self.helper_path}: {e.strerror}") from None
        finally:
            child.close()  # the helper's exit now reads as end-of-file
        parent.setblocking(False)
        return parent, proc

    async def _hello(self, chan: _Channel) -> Dict[str, Any]:
        try:
            hello, extra = await asyncio.wait_for(chan.recv_message(), self.hello_timeout)
        except asyncio.TimeoutError:
            raise HelperError("helper_timeout", f"the helper did not say hello within "
                              f"{self.hello_timeout:g}s") from None
        if extra is not None:
            os.close(extra)
            raise _protocol_error("the helper attached a descriptor to its hello")
        if hello.get("type") != "hello" or not isinstance(hello.get("protocol"), int):
            raise _protocol_error("the helper did not start with a hello")
        self.helper_version = str(hello.get("version", "?"))
        if hello["protocol"] != PROTOCOL_VERSION:
            raise HelperError(
                "protocol_mismatch",
                f"the helper {self.helper_path} (version {self.helper_version}) speaks "
                f"protocol {hello['protocol']} but this component speaks "
                f"{PROTOCOL_VERSION} (updated without rebuilding the helper?): "
                f"{self.rebuild_hint}")
        return hello

    async def _answer(self, chan: _Channel, op: str,
                      progress: Optional[Callable[[int, int], None]]) -> Reply:
        """Progress messages until the result or error of op."""
        while True:
            msg, fd = await chan.recv_message()
            kind = msg["type"]
            if kind == "result" and msg.get("op") == op and (fd is None or op == "decrypt"):
                return msg, fd
            if fd is not None:
                os.close(fd)
            if kind == "progress" and fd is None:
                if progress is not None:
                    progress(int(msg.get("done", 0)), int(msg.get("total", 0)))
                continue
            if kind == "error":
                raise HelperError(str(msg.get("code", "internal")),
                                  str(msg.get("message", "unknown error")))
            raise _protocol_error(f"unexpected {kind!r} message from the helper"
                                  + (" with a descriptor" if fd is not None else ""))

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


# -- policy ---------------------------------------------------------------------

class PrintRefused(Exception):
    """A print start was refused; the message is for the user."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class TrustPolicy:
    """Whether an authenticated file may print here now: moonraker.conf's
    publisher trust and the print count. The helper decides the time window
    (its inspect answers reason_code not_yet_valid or expired)."""

    def __init__(self, config: ConfigHelper) -> None:
        self.trusted: List[str] = config.getlist("trusted_publishers", [])
        for key in self.trusted:
            if not PUBLISHER_KEY_RE.match(key):
                raise config.error(
                    f"[encrypted_print] trusted_publishers: {key!r} is not a publisher "
                    "key (encprint-pub:..., as printed by `encprint sign-keygen`)")
        self.require_signature = config.getboolean("require_signature", False)

    def refusal(self, fname: str, res: Dict[str, Any],
                used: Optional[int]) -> Optional[str]:
        """Why the inspected file res may not print, or None. used is the
        count of prints so far (None: not checked, e.g. on upload)."""
        if res.get("reason"):
            return str(res["reason"])
        publisher = res.get("publisher")
        if publisher and not res.get("signature_valid"):
            return f"{fname} carries an invalid publisher signature: it was altered"
        if self.require_signature and not publisher:
            return (f"{fname} is not signed, and this printer only prints files signed "
                    "by a trusted publisher")
        if publisher and self.trusted and publisher not in self.trusted:
            return (f"{fname} is signed by {publisher}, which is not among this "
                    "printer's trusted_publishers")
        limit = (res.get("policy") or {}).get("max_prints", 0)
        if limit and used is not None and used >= limit:
            if limit == 1:
                return f"{fname} may be printed only once, and it has been printed already"
            return (f"{fname} may be printed {limit} times, and all {limit} prints have "
                    "been used on this printer")
        return None


class JobRecords:
    """Print counts per file id and the audit record of each encrypted job,
    in Moonraker's database (namespaces clients cannot write)."""

    def __init__(self, server: Server) -> None:
        database = server.lookup_component("database")
        self.counts: NamespaceWrapper = database.register_local_namespace(
            COUNTS_NAMESPACE, forbidden=True)
        self.jobs: NamespaceWrapper = database.register_local_namespace(
            JOBS_NAMESPACE, forbidden=True)

    async def used(self, file_id_hex: str) -> int:
        return int(await self.counts.get(file_id_hex, 0))

    async def count_print(self, file_id_hex: str) -> int:
        count = await self.used(file_id_hex) + 1
        self.counts[file_id_hex] = count
        return count

    def save(self, record_id: str, record: Dict[str, Any]) -> None:
        self.jobs[record_id] = record

    async def newest_first(self) -> List[Dict[str, Any]]:
        rows = [(str(k), v) for k, v in await self.jobs.items()]
        rows.sort(key=lambda kv: kv[0], reverse=True)
        return [dict(v, id=k) for k, v in rows]


# -- start-up checks ------------------------------------------------------------

class Diagnostics:
    """What stops encrypted printing on this printer, each problem shown once
    in the UI's warning list and kept until it is fixed."""

    BLOCKING = ("msgpack", "helper", "identity", "uid")

    def __init__(self, server: Server, client: HelperClient) -> None:
        self.server = server
        self.client = client
        self.problems: Dict[str, str] = {}
        self.bridge_loaded = False
        self.recipient = ""
        self.key_exposed = False

    def set(self, key: str, msg: Optional[str]) -> None:
        warn_id = f"encrypted_print_{key}"
        if msg is None:
            if self.problems.pop(key, None) is not None:
                self.server.remove_warning(warn_id)
            return
        self.problems[key] = msg
        logging.warning(f"encrypted_print: {msg}")
        self.server.add_warning(f"[encrypted_print]: {msg}", warn_id)

    def blocking(self) -> Optional[str]:
        for key in self.BLOCKING:
            if key in self.problems:
                return self.problems[key]
        return None

    async def check_install(self, mdst: MetadataStorage) -> None:
        if msgpack is None:
            self.set("msgpack", "the Python package msgpack is missing in Moonraker's "
                     "virtualenv; run `~/moonraker-env/bin/pip install msgpack` "
                     "(install.sh does this)")
            return
        # An installed helper's identity is not Moonraker's to check: its
        # problems come back from the recipient request below.
        self.set("identity", None if self.client.installed else self._identity_problem())
        self.warn_exposure()
        try:
            await self.client.version()
            self.set("helper", None)
        except HelperError as e:
            self.set("helper", e.message)
        if "identity" not in self.problems and "helper" not in self.problems:
            try:
                self.recipient = await self.client.recipient()
            except HelperError as e:
                self.set("identity", e.message)
        analysis = self.server.lookup_component("analysis", None)
        if analysis is not None and getattr(analysis, "auto_analyze", False):
            self.set("analysis", "[analysis] enable_auto_analysis is on: the "
                     "estimator cannot read encrypted files and may rewrite them; "
                     "turn it off")
        if getattr(mdst, "enable_object_proc", False):
            self.set("object_processing", "[file_manager] enable_object_processing "
                     "is on: it cannot process encrypted files; turn it off")

    def warn_exposure(self) -> None:
        """Without the installed helper the key, the counts and the policy
        belong to Moonraker's user: say so, persistently (not blocking)."""
        self.key_exposed = not self.client.installed
        if self.key_exposed:
            self.server.add_warning(f"[encrypted_print]: {EXPOSED_WARNING}",
                                    "encrypted_print_exposed")

    def _identity_problem(self) -> Optional[str]:
        path = self.client.identity_path
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return (f"no printer identity at {path}: create one with "
                    f"`encprint keygen -o {path}` (install.sh does this)")
        except OSError as e:
            return f"cannot check the printer identity {path}: {e.strerror}"
        if not stat.S_ISREG(st.st_mode):
            return f"the printer identity {path} is not a file"
        if st.st_uid != os.getuid():
            return (f"the printer identity {path} belongs to uid {st.st_uid}, not to "
                    f"Moonraker's user (uid {os.getuid()})")
        if st.st_mode & 0o077:
            return (f"the printer identity {path} is readable by others (mode "
                    f"{stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {path}`")
        return None

    def check_klipper(self, objects: List[str]) -> None:
        self.bridge_loaded = BRIDGE_OBJECT in objects
        self.set("bridge", None if self.bridge_loaded else (
            "Klipper has no [encrypted_file_bridge]: add the section to printer.cfg "
            "(install.sh does this) and restart Klipper; encrypted files cannot print"))
        uid = self.server.get_klippy_info().get("user_id")
        self.set("uid", None if uid in (None, os.getuid()) else (
            f"Klipper runs as uid {uid} and Moonraker as uid {os.getuid()}: Klipper "
            "can only open Moonraker's in-memory file when both run as the same user"))


# -- metadata on upload ---------------------------------------------------------

class MetadataPublisher:
    """Replaces what Moonraker's parser guessed from ciphertext with the
    file's authenticated public metadata, and writes its thumbnails."""

    # Moonraker's own bookkeeping, kept from its parse of the file.
    KEEP = ("size", "modified", "uuid", "file_processors", "print_start_time", "job_id")

    def __init__(self, file_manager: FileManager, client: HelperClient,
                 policy: TrustPolicy) -> None:
        self.file_manager = file_manager
        self.eventloop = file_manager.server.get_event_loop()
        self.mdst: MetadataStorage = file_manager.get_metadata_storage()
        self.client = client
        self.policy = policy

    async def on_metadata_processed(self, fname: str) -> None:
        path = str(self.file_manager.get_full_path("gcodes", fname))
        if not is_encrypted_file(path):
            return
        root = self.file_manager.get_directory("gcodes")
        md = self.mdst.get(fname, {})
        try:
            res = await self.client.inspect(path, root)
        except HelperError as e:
            logging.warning(f"encrypted_print: {fname}: {e.message}")
            self._store(fname, md, {"encrypted": True, "authenticated": False,
                                    "reason": e.message, "reason_code": e.code})
            return
        info = self._info(fname, res)
        pub = res.get("metadata") or {}
        thumbs = await self.eventloop.run_in_thread(
            self._write_thumbnails, path, pub.pop("thumbnails", None) or [])
        self._store(fname, md, info, pub, thumbs)

    def _info(self, fname: str, res: Dict[str, Any]) -> Dict[str, Any]:
        """The component's own view of the file, under metadata's
        encrypted_print key."""
        info: Dict[str, Any] = {
            "encrypted": True,
            "authenticated": bool(res.get("authenticated")),
            "file_id": bytes(res.get("file_id") or b"").hex(),
            "recipients": res.get("recipients", 0),
            "policy": self.policy_view(res.get("policy")),
            "publisher": res.get("publisher"),
            "signature_valid": bool(res.get("signature_valid")),
            "plaintext_size": res.get("plaintext_size", 0),
        }
        if not info["authenticated"]:
            info["reason"] = res.get("reason", "")
            info["reason_code"] = res.get("reason_code", "")
            logging.warning(f"encrypted_print: {fname} is listed but cannot be printed "
                            f"here: {info['reason']}")
            return info
        refusal = self.policy.refusal(fname, res, used=None)
        if refusal is not None:
            info["reason"] = refusal
            if res.get("reason_code"):
                info["reason_code"] = res["reason_code"]
        return info

    def _store(self, fname: str, md: Dict[str, Any], info: Dict[str, Any],
               public: Optional[Dict[str, Any]] = None,
               thumbs: Optional[List[Dict[str, Any]]] = None) -> None:
        """Replace what Moonraker's parser guessed from the ciphertext by the
        fields the encryptor published: Moonraker's own field names and
        types, computed on the cleartext (docs/adr/006-metadata-parity.md)."""
        keep = {k: md[k] for k in self.KEEP if k in md}
        for key, value in (public or {}).items():
            kind = METADATA_FIELDS.get(key)
            if kind is not None and _is_kind(value, kind):
                keep[key] = value
        keep.setdefault("slicer", "Unknown")
        if thumbs:
            keep["thumbnails"] = thumbs
        keep["encrypted_print"] = info
        self.mdst.insert(fname, keep)

    def _write_thumbnails(self, path: str, thumbs: List[Dict[str, Any]]
                          ) -> List[Dict[str, Any]]:
        """Write the published previews as Moonraker writes a slicer's: QOI
        converted to PNG, and a 32x32 PNG made from the largest when the
        slicer gave none. Blocking (Pillow): run it in a thread."""
        thumb_dir = os.path.join(os.path.dirname(path), ".thumbs")
        base = os.path.splitext(os.path.basename(path))[0]
        out = [e for e in (self._write_one(thumb_dir, base, t) for t in thumbs) if e]
        if out and not any(e["width"] == e["height"] == 32 for e in out):
            small = self._miniature(thumb_dir, base, max(out, key=lambda e: e["size"]))
            if small is not None:
                out.insert(0, small)
        return out

    @staticmethod
    def _write_one(thumb_dir: str, base: str, t: Dict[str, Any]
                   ) -> Optional[Dict[str, Any]]:
        fmt, data = t.get("format"), t.get("data")
        w, h = t.get("width"), t.get("height")
        if (fmt not in ("png", "jpg", "qoi") or not isinstance(data, bytes)
                or not isinstance(w, int) or not isinstance(h, int)):
            return None
        ext = "png" if fmt == "qoi" else fmt
        name = f"{base}-{w}x{h}.{ext}"
        dest = os.path.join(thumb_dir, name)
        try:
            os.makedirs(thumb_dir, exist_ok=True)
            if ext != fmt:
                from PIL import Image  # Moonraker's own dependency
                with Image.open(io.BytesIO(data)) as im:
                    im.save(dest)
            else:
                with open(dest, "wb") as f:
                    f.write(data)
            size = os.path.getsize(dest)
        except Exception as e:  # noqa: BLE001 - a bad image is skipped, as Moonraker does
            logging.warning(f"encrypted_print: cannot write thumbnail {name}: {e}")
            return None
        return {"width": w, "height": h, "size": size,
                "relative_path": os.path.join(".thumbs", name)}

    @staticmethod
    def _miniature(thumb_dir: str, base: str, largest: Dict[str, Any]
                   ) -> Optional[Dict[str, Any]]:
        """Moonraker's extra 32x32 thumbnail, made the way it makes it."""
        small = os.path.join(thumb_dir, f"{base}-32x32.png")
        try:
            from PIL import Image
            src = os.path.join(thumb_dir, os.path.basename(largest["relative_path"]))
            with Image.open(src) as im:
                im.thumbnail((32, 32))
                im.save(small, format="PNG")
                return {"width": im.width, "height": im.height,
                        "size": os.path.getsize(small),
                        "relative_path": os.path.join(".thumbs", os.path.basename(small))}
        except Exception as e:  # noqa: BLE001 - as Moonraker: no miniature then
            logging.warning(f"encrypted_print: cannot make the 32x32 thumbnail of "
                            f"{base}: {e}")
            return None

    @staticmethod
    def policy_view(policy: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        if not policy:
            return None
        return {"max_prints": policy.get("max_prints", 0),
                "not_before": policy.get("not_before", 0),
                "not_after": policy.get("not_after", 0)}


# -- the print's lifetime -------------------------------------------------------

class ActiveJob:
    """An encrypted print this Moonraker started: the memfd it holds and the
    audit record it keeps."""

    def __init__(self, filename: str, df: DecryptedFile, record_id: str,
                 record: Dict[str, Any]) -> None:
        self.filename = filename
        self.df = df
        self.record_id = record_id
        self.record = record
        self.seen_running = False
        self.wake = asyncio.Event()


class JobTracker:
    """Holds the memfd of the active encrypted print until the print ends,
    and keeps its audit record true, also across Moonraker restarts."""

    def __init__(self, server: Server, kapis: KlippyAPI, records: JobRecords) -> None:
        self.server = server
        self.eventloop = server.get_event_loop()
        self.kapis = kapis
        self.records = records
        self.active: Optional[ActiveJob] = None

    def begin(self, name: str, df: DecryptedFile, user: Optional[UserInfo]) -> None:
        """The memfd df was registered with Klipper for name."""
        record = {"filename": name, "file_id": df.file_id.hex(),
                  "sha256": df.sha256.hex() if df.sha256 else None,
                  "size": df.gcode_size, "memfd_size": df.size, "publisher": df.publisher,
                  "user": getattr(user, "username", None), "start_time": None,
                  "end_time": None, "result": "starting", "decrypt_ms": df.elapsed_ms}
        rid = f"{time.time():017.6f}-{secrets.token_hex(3)}"
        self.active = ActiveJob(name, df, rid, record)

    async def started(self, name: str) -> None:
        """Klipper started printing name: count it and watch it."""
        job = self.active
        if job is None or job.filename != name:
            return
        count = await self.records.count_print(job.record["file_id"])
        job.record.update(start_time=time.time(), result="printing", print_number=count)
        self.records.save(job.record_id, job.record)
        self.eventloop.create_task(self._watch(job))

    async def abort(self, name: str) -> None:
        """The start of name failed after registering: release everything."""
        job = self.active
        if job is None or job.filename != name:
            return
        self.active = None
        job.df.close()
        await self.kapis.run_gcode(
            f'{UNREGISTER_COMMAND} FILENAME="{gcode_quote(name)}"', default=None)

    async def check(self, job: ActiveJob) -> None:
        """Finish the job if its print has ended."""
        ps = await self._print_stats()
        if ps is None or self.active is not job or job.record["result"] == "starting":
            return
        state = ps.get("state")
        if ps.get("filename") != job.filename:
            self.finish("replaced")
        elif state in FINISHED_STATES:
            self.finish(state)
        elif state in ("printing", "paused"):
            job.seen_running = True
        elif state == "standby" and job.seen_running:
            self.finish("reset")

    async def _print_stats(self) -> Optional[Dict[str, Any]]:
        res = await self.kapis.query_objects(
            {"print_stats": ["state", "filename"]}, default=None)
        return (res or {}).get("print_stats") or None

    async def _watch(self, job: ActiveJob) -> None:
        """Release the memfd when the print ends. A short print can go
        standby -> printing -> complete between two status pushes, so the
        subscription only wakes this loop; the state is queried."""
        while self.active is job:
            await self.check(job)
            try:
                await asyncio.wait_for(job.wake.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
            job.wake.clear()

    def on_status(self, status: Dict[str, Any], eventtime: float) -> None:
        if self.active is not None and "print_stats" in status:
            self.active.wake.set()

    def finish(self, result: str) -> None:
        job, self.active = self.active, None
        if job is None:
            return
        job.df.close()
        job.record.update(end_time=time.time(), result=result)
        self.records.save(job.record_id, job.record)
        logging.info(f"encrypted_print: {job.filename} ended ({result}); "
                     "cleartext released")

    def release(self) -> None:
        """Moonraker stops while Klipper may go on printing from its own
        descriptor: close ours and leave the record open for reconcile()."""
        job, self.active = self.active, None
        if job is not None:
            job.df.close()
            logging.info(f"encrypted_print: Moonraker stops during {job.filename}; "
                         "its record is completed when Moonraker is back")

    def on_klippy_gone(self) -> None:
        if self.server.is_running():
            self.finish("klippy_disconnect")
        else:
            self.release()

    async def reconcile(self) -> None:
        """Complete records left open by a Moonraker restart or crash, from
        what Klipper reports now."""
        ps = await self._print_stats() or {}
        for rec in await self.records.newest_first():
            if rec.get("result") not in ("starting", "printing"):
                continue
            rid = rec.pop("id")
            if ps.get("filename") == rec["filename"] and rec["result"] == "printing":
                self.eventloop.create_task(self._follow(rid, rec))
            else:
                self._close_record(rid, rec, "interrupted")
            ps = {}  # only the newest open record can match Klipper's state

    async def _follow(self, rid: str, rec: Dict[str, Any]) -> None:
        """Klipper prints on from its own descriptor of a memfd an earlier
        Moonraker held: record how that print ends."""
        while True:
            ps = await self._print_stats()
            if ps is None:  # Klipper went away: the print is over
                return self._close_record(rid, rec, "klippy_disconnect")
            if ps.get("filename") != rec["filename"]:
                return self._close_record(rid, rec, "interrupted")
            if ps.get("state") in FINISHED_STATES:
                return self._close_record(rid, rec, ps["state"])
            if ps.get("state") == "standby":
                return self._close_record(rid, rec, "reset")
            await asyncio.sleep(1.0)

    def _close_record(self, rid: str, rec: Dict[str, Any], result: str) -> None:
        rec.update(result=result, end_time=rec.get("end_time") or time.time())
        self.records.save(rid, rec)
        logging.info(f"encrypted_print: the record of {rec['filename']} left open "
                     f"by a restart is now {result!r}")


# -- starting a print -----------------------------------------------------------

class PrintStarter:
    """Every start of an encrypted file: Moonraker's (print button, reprint,
    upload print=true, job queue, OctoPrint API, which all go through
    klippy_apis.start_print) and Klipper's (console, macros, M23), which the
    bridge hands over through the remote method."""

    def __init__(self, config: ConfigHelper, client: HelperClient, policy: TrustPolicy,
                 records: JobRecords, diagnostics: Diagnostics, jobs: JobTracker) -> None:
        self.server = config.get_server()
        self.eventloop = self.server.get_event_loop()
        self.client = client
        self.policy = policy
        self.records = records
        self.diagnostics = diagnostics
        self.jobs = jobs
        self.max_memory = config.getint("max_memory", 0, minval=0) * 1024 * 1024
        self.swap_protection = config.getchoice(
            "swap_protection", ["none", "refuse_disk_swap", "mlock"], "none")
        # Moonraker's requests to Klipper have no timeout of their own.
        self.klipper_timeout = config.getfloat("klipper_timeout", 30., above=0.)
        self.file_manager: FileManager = self.server.lookup_component("file_manager")
        self.kapis: KlippyAPI = self.server.lookup_component("klippy_apis")
        self.kconn: KlippyConnection = self.server.lookup_component("klippy_connection")
        self.lock = asyncio.Lock()
        self.decrypting: Optional[Dict[str, Any]] = None
        self._orig_start_print = self.kapis.start_print
        self.kapis.start_print = self.start_print

    # the wrapper of klippy_apis.start_print
    async def start_print(self, filename: str, wait_klippy_started: bool = False,
                          user: Optional[UserInfo] = None) -> str:
        name = filename[1:] if filename.startswith("/") else filename
        if not is_encrypted_file(self._path(name)):
            return await self._orig_start_print(filename, wait_klippy_started, user)
        if wait_klippy_started:
            await self.kconn.wait_started()
        try:
            await self.prepare(name, user)
        except PrintRefused as e:
            self.report_error(str(e))
            raise self.server.error(http_safe(str(e)), e.status) from None
        try:
            ret = await self._orig_start_print(name, False, user)
        except Exception as e:
            await self.jobs.abort(name)
            self.report_error(f"Klipper refused to start {name}: {e}")
            raise
        await self.jobs.started(name)
        return ret

    def _path(self, name: str) -> str:
        return str(self.file_manager.get_full_path("gcodes", name))

    async def prepare(self, name: str, user: Optional[UserInfo]) -> bool:
        """Check everything, decrypt, and register the memfd with Klipper.
        True when a console start waiting in Klipper took the registration."""
        # First: from here on messages name the file, and they are echoed to
        # Klipper's console; a newline in a name would be a G-code line.
        if UNSENDABLE.search(name):
            raise PrintRefused(f"cannot print {name!r}: Klipper cannot take file "
                               "names with control characters, ';', '#' or '*'; "
                               "rename the file")
        if self.lock.locked():
            raise PrintRefused(f"cannot start {name}: another encrypted file is being "
                               "prepared")
        async with self.lock:
            await self._check_printer(name)
            res = await self._authorise(name)
            df = await self._decrypt(name, res)
            consumed = await self._register(name, df)
            self.jobs.begin(name, df, user)
            logging.info(f"encrypted_print: {name} decrypted ({df.gcode_size} bytes of G-code, "
                         f"{df.size} in memory, in "
                         f"{df.elapsed_ms:.0f} ms) and registered with Klipper")
            return consumed

    async def _check_printer(self, name: str) -> None:
        """The printer can take an encrypted print now."""
        if self.jobs.active is not None:
            # The previous print may have ended since the last check
            # (the job queue starts the next one within milliseconds).
            await self._klipper(name, self.jobs.check(self.jobs.active))
        if self.jobs.active is not None:
            raise PrintRefused(f"cannot start {name}: {self.jobs.active.filename} is "
                               "still printing")
        problem = self.diagnostics.blocking()
        if problem is not None:
            raise PrintRefused(f"cannot print {name}: {problem}")
        if not self.kconn.is_ready():
            raise PrintRefused(f"cannot print {name}: Klipper is not ready "
                               f"({self.kconn.state.name.lower()}); start the print "
                               "again when it is", 503)
        objects = await self._klipper(name, self.kapis.get_object_list(default=None))
        if objects is None:
            raise PrintRefused(f"cannot print {name}: Klipper went away; start the "
                               "print again when it is ready", 503)
        if BRIDGE_OBJECT not in objects:
            raise PrintRefused(f"cannot print {name}: Klipper has no "
                               "[encrypted_file_bridge] section in printer.cfg")
        if self.swap_protection == "refuse_disk_swap":
            swap = disk_swap()
            if swap:
                raise PrintRefused(f"cannot print {name}: swap on {swap} is active and "
                                   "[encrypted_print] swap_protection forbids "
                                   "cleartext pages that could be written to disk")

    async def _authorise(self, name: str) -> Dict[str, Any]:
        """Inspect the file and apply the policy; the inspect result."""
        try:
            res = await self.client.inspect(self._path(name),
                                            self.file_manager.get_directory("gcodes"))
        except HelperError as e:
            raise PrintRefused(e.message) from None
        if not res.get("authenticated"):
            raise PrintRefused(res.get("reason") or f"{name} cannot be opened here")
        used = await self.records.used(bytes(res["file_id"]).hex())
        refusal = self.policy.refusal(name, res, used)
        if refusal is not None:
            raise PrintRefused(refusal)
        return res

    async def _decrypt(self, name: str, res: Dict[str, Any]) -> DecryptedFile:
        self.decrypting = {"filename": name, "done": 0, "total": res["plaintext_size"]}
        try:
            df = await self.client.decrypt(self._path(name),
                                           self.file_manager.get_directory("gcodes"),
                                           self.max_memory, self._progress)
        except HelperError as e:
            raise PrintRefused(e.message) from None
        finally:
            self.decrypting = None
        if self.swap_protection == "mlock":
            try:
                df.lock_in_memory()
            except HelperError as e:
                df.close()
                raise PrintRefused(f"cannot print {name}: {e.message}") from None
        return df

    async def _register(self, name: str, df: DecryptedFile) -> bool:
        """Hand the memfd to Klipper: an API request, not G-code, so nothing
        of it reaches the console, gcode_store or a macro (ADR-009). True when
        a console start waiting in Klipper took it."""
        values = (name, os.getpid(), df.fd, df.size, df.memfd_name)
        try:
            reply = await self._klipper(name, self.bridge_request(
                REGISTER_ENDPOINT, dict(zip(REGISTER_PARAMS, values))))
            return bool((reply or {}).get(REGISTER_REPLY))
        except PrintRefused:
            df.close()
            raise
        except Exception as e:
            df.close()
            raise PrintRefused(f"Klipper refused {name}: {e}") from None

    async def bridge_request(self, endpoint: str, params: Dict[str, Any]) -> Any:
        """A request to the bridge's endpoints over Klipper's API socket."""
        return await self.kconn.request(WebRequest(endpoint, params))

    async def _klipper(self, name: str, request: Awaitable[Any]) -> Any:
        """A request to Klipper on a start path, bounded by klipper_timeout."""
        try:
            return await asyncio.wait_for(request, self.klipper_timeout)
        except asyncio.TimeoutError:
            raise PrintRefused(f"cannot print {name}: Klipper did not answer within "
                               f"{self.klipper_timeout:g} s (busy or hung?); try again"
                               ) from None

    def _progress(self, done: int, total: int) -> None:
        """Decrypt progress: a websocket notification each time, and the
        printer's display message at every 10%."""
        info = self.decrypting
        if info is None:
            return
        info.update(done=done, total=total)
        self.server.send_event("encrypted_print:progress", dict(info))
        pct = int(done * 100 / total) if total else 100
        if pct // 10 > info.get("shown", -1):
            info["shown"] = pct // 10
            self.eventloop.create_task(self.kapis.run_gcode(
                f"M117 Decrypting {pct}%", default=None))

    def report_error(self, msg: str) -> None:
        logging.warning(f"encrypted_print: {msg!r}")
        self.server.send_event("encrypted_print:error", {"message": msg})
        # Shown in the UI console; the upload print=true path drops our
        # error, and a console start has no other way to hear about it. The
        # message goes into a G-code line: nothing in it may end that line
        # (newline) or cut it short (Klipper's parser stops at ; # *).
        quoted = GCODE_UNSAFE.sub("?", msg)
        self.eventloop.create_task(self.kapis.run_gcode(
            f'RESPOND TYPE=error MSG="encrypted_print: {quoted}"', default=None))

    # Klipper's side: the bridge asks for a console/macro/M23 start
    def on_remote_prepare(self, filename: str = "", start: bool = True) -> None:
        self.eventloop.create_task(self._remote_prepare(filename, bool(start)))

    async def _remote_prepare(self, filename: str, start: bool) -> None:
        """SDCARD_PRINT_FILE or M23 waits in Klipper while this decrypts and
        registers the file; the waiting command then loads it, so the rest
        of the script or macro runs as for a clear file."""
        try:
            consumed = await self.prepare(filename, None)
        except Exception as e:
            msg = str(e) if isinstance(e, PrintRefused) else f"cannot prepare {filename}: {e}"
            if not isinstance(e, PrintRefused):
                logging.exception("encrypted_print: remote prepare")
            # The waiting command fails with this message in the console.
            logging.warning(f"encrypted_print: {msg!r}")
            self.server.send_event("encrypted_print:error", {"message": msg})
            # It becomes Klipper's error for the command, which Moonraker
            # passes on as an HTTP reason phrase too: keep it representable.
            try:
                await self.bridge_request(REFUSE_ENDPOINT, dict(zip(REFUSE_PARAMS,
                                                                    (filename, http_safe(msg)))))
            except self.server.error:
                pass  # Klipper is gone; its command ended with it
            return
        if not consumed:
            await self.jobs.abort(filename)
            self.report_error(f"Klipper stopped waiting for {filename}; start it again")
            return
        await self.jobs.started(filename)


class OwnerPage:
    """The printer owner's page (moonraker-component/page/) and the two
    endpoints only it needs. It reads the component through a narrow
    interface, so the component can change around it:

    - ``server``, ``metadata.mdst`` (Moonraker's metadata storage),
      ``diagnostics.problems``, ``jobs.active`` (the running ActiveJob or None);
    - ``await records.used(file_id_hex) -> int``: prints used so far;
    - ``policy.refusal(name, res, used) -> Optional[str]``: why a file with
      inspect result ``res`` (policy, publisher, signature_valid) won't print;
    - ``await _handle_recipient(web_request) -> {"recipient": str}``.

    The page's HTML, CSS and JS are public and hold no data (the browser that
    navigates to the page sends no Authorization header); everything shown
    comes from the authorised API, with the visitor's own credentials.
    """

    PREFIX = "/server/encrypted_print/page"
    FILES = {"": ("index.html", "text/html; charset=utf-8"),
             "/owner.js": ("owner.js", "text/javascript; charset=utf-8"),
             "/owner.css": ("owner.css", "text/css; charset=utf-8")}
    # A file refused for one of these refuses every file.
    BLOCKING = ("msgpack", "helper", "identity", "uid", "bridge")

    def __init__(self, component: EncryptedPrint) -> None:
        self.ep = component
        here = pathlib.Path(os.path.realpath(__file__)).parent
        page_dir = here / "page"
        self.requirements = here / "requirements.txt"
        server = component.server
        try:  # at start-up: a few KiB
            bodies = {sfx: (page_dir / name).read_text()
                      for sfx, (name, _) in self.FILES.items()}
        except OSError as e:
            bodies = {}
            msg = (f"the owner page is missing ({e.strerror}: {e.filename}); the "
                   "component must be linked from a full checkout: run install.sh")
            logging.warning(f"encrypted_print: {msg}")
            server.add_warning(f"[encrypted_print]: {msg}", "encrypted_print_page")
        for suffix, body in bodies.items():
            server.register_endpoint(
                self.PREFIX + suffix, RequestType.GET, self._static(body),
                transports=TransportType.HTTP, wrap_result=False,
                content_type=self.FILES[suffix][1], auth_required=False)
        server.register_endpoint(
            "/server/encrypted_print/files", RequestType.GET, self._handle_files)
        server.register_endpoint(
            "/server/encrypted_print/recipient/qr", RequestType.GET, self._handle_qr,
            transports=TransportType.HTTP, wrap_result=False,
            content_type="image/svg+xml")

    @staticmethod
    def _static(body: str) -> Callable[[WebRequest], Any]:
        async def handler(web_request: WebRequest) -> str:
            return body
        return handler

    async def _handle_qr(self, web_request: WebRequest) -> str:
        recipient = (await self.ep._handle_recipient(web_request))["recipient"]
        if segno is None:
            raise self.ep.server.error(
                "the Python package segno is missing in Moonraker's virtualenv: run "
                f"~/moonraker-env/bin/pip install -r {self.requirements} "
                "(install.sh does this)", 503)
        out = io.BytesIO()
        segno.make(recipient, error="m", micro=False).save(
            out, kind="svg", scale=1, border=4, xmldecl=False,
            title="QR code of this printer's recipient")
        return out.getvalue().decode()

    async def _handle_files(self, web_request: WebRequest) -> Dict[str, Any]:
        """Every encrypted file in gcodes/ with what it may still do."""
        files = []
        problems = self.ep.diagnostics.problems
        blocked = next((problems[k] for k in self.BLOCKING if k in problems), None)
        active = self.ep.jobs.active
        for name, md in sorted(self.ep.metadata.mdst.metadata.items()):
            info = md.get("encrypted_print") if isinstance(md, dict) else None
            if isinstance(info, dict):
                files.append(await self._file_view(name, md, info, blocked))
        return {"files": files,
                "printing": None if active is None else active.filename}

    async def _file_view(self, name: str, md: Dict[str, Any], info: Dict[str, Any],
                         blocked: Optional[str]) -> Dict[str, Any]:
        policy = info.get("policy") or {}
        limit = int(policy.get("max_prints") or 0)
        used = 0
        if info.get("file_id"):
            used = await self.ep.records.used(info["file_id"])
        reason: Optional[str]
        if not info.get("authenticated"):
            reason = info.get("reason") or f"{name} cannot be opened on this printer"
        else:
            reason = self.ep.policy.refusal(name, info, used) or blocked
        return {
            "filename": name, "size": md.get("size"), "modified": md.get("modified"),
            "publisher": info.get("publisher"),
            "signature_valid": bool(info.get("signature_valid")),
            "authenticated": bool(info.get("authenticated")),
            "max_prints": limit, "not_before": policy.get("not_before", 0),
            "not_after": policy.get("not_after", 0),
            "prints_used": used, "prints_left": max(limit - used, 0) if limit else None,
            "printable": reason is None, "reason": reason,
        }


def disk_swap() -> str:
    """The first active swap area that is not zram, or ''."""
    try:
        with open("/proc/swaps") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return ""
    for line in lines:
        dev = line.split()[0] if line.split() else ""
        if dev and not dev.startswith("/dev/zram"):
            return dev
    return ""


# -- the component --------------------------------------------------------------

class EncryptedPrint:
    def __init__(self, config: ConfigHelper) -> None:
        self.server = config.get_server()
        repo = pathlib.Path(os.path.realpath(__file__)).parent.parent
        self.helper_path = os.path.expanduser(
            config.get("helper", str(repo / "bin" / "encprint-helper")))
        self.client = HelperClient(
            self.helper_path,
            os.path.expanduser(config.get("identity", DEFAULT_IDENTITY)),
            inspect_timeout=config.getfloat("inspect_timeout", 20., above=0.),
            decrypt_timeout=config.getfloat("decrypt_timeout", 600., above=0.),
            rebuild_hint=f"run {repo / 'install.sh'}")
        self.policy = TrustPolicy(config)
        self.records = JobRecords(self.server)
        self.diagnostics = Diagnostics(self.server, self.client)
        self.file_manager: FileManager = self.server.lookup_component("file_manager")
        self.kapis: KlippyAPI = self.server.lookup_component("klippy_apis")
        self.metadata = MetadataPublisher(self.file_manager, self.client, self.policy)
        self.jobs = JobTracker(self.server, self.kapis, self.records)
        self.starter = PrintStarter(config, self.client, self.policy, self.records,
                                    self.diagnostics, self.jobs)
        self.ready = False  # klippy_ready checks done, print_stats subscribed
        self._reconciled = False
        self._register_events()
        self._register_endpoints()
        self.owner_page = OwnerPage(self)

    def _register_events(self) -> None:
        self.server.register_event_handler(
            "file_manager:metadata_processed", self.metadata.on_metadata_processed)
        self.server.register_event_handler("server:klippy_ready", self._on_klippy_ready)
        self.server.register_event_handler("server:klippy_disconnect", self._on_klippy_gone)
        self.server.register_event_handler(
            "server:klippy_shutdown", lambda: self.jobs.finish("klippy_shutdown"))
        self.server.register_remote_method(REMOTE_METHOD, self.starter.on_remote_prepare)
        self.server.register_notification("encrypted_print:progress",
                                          "encrypted_print_progress")
        self.server.register_notification("encrypted_print:error",
                                          "encrypted_print_error")

    def _register_endpoints(self) -> None:
        for path, handler in (("status", self._handle_status),
                              ("recipient", self._handle_recipient),
                              ("jobs", self._handle_jobs)):
            self.server.register_endpoint(
                f"/server/encrypted_print/{path}", RequestType.GET, handler)

    async def component_init(self) -> None:
        await self.diagnostics.check_install(self.file_manager.get_metadata_storage())

    async def _on_klippy_ready(self) -> None:
        self.diagnostics.check_klipper(await self.kapis.get_object_list(default=[]))
        # Our own subscription also gives job_state the updates it otherwise
        # misses on a headless printer (see docs/development.md).
        await self.kapis.subscribe_objects(
            {"print_stats": ["state", "filename"]}, self.jobs.on_status, default=None)
        if not self._reconciled:
            self._reconciled = True
            await self.jobs.reconcile()
        self.ready = True

    def _on_klippy_gone(self) -> None:
        self.ready = False
        self.jobs.on_klippy_gone()

    def close(self) -> None:
        self.jobs.release()

    async def _handle_status(self, web_request: WebRequest) -> Dict[str, Any]:
        job = self.jobs.active
        diag = self.diagnostics
        return {
            "helper": {"path": self.helper_path, "version": self.client.helper_version,
                       "protocol": PROTOCOL_VERSION, "ok": "helper" not in diag.problems},
            # No paths of secrets here: anyone with the UI reads this.
            "identity": {"ok": "identity" not in diag.problems,
                         "protected": not diag.key_exposed},
            "recipient": diag.recipient,
            "bridge_loaded": diag.bridge_loaded,
            "ready": self.ready,
            "problems": dict(diag.problems),
            "decrypting": self.starter.decrypting,
            "active_job": None if job is None else dict(job.record),
            "require_signature": self.policy.require_signature,
            "trusted_publishers": list(self.policy.trusted),
        }

    async def _handle_recipient(self, web_request: WebRequest) -> Dict[str, Any]:
        if not self.diagnostics.recipient:
            try:
                self.diagnostics.recipient = await self.client.recipient()
            except HelperError as e:
                raise self.server.error(e.message, 503) from None
        return {"recipient": self.diagnostics.recipient}

    async def _handle_jobs(self, web_request: WebRequest) -> Dict[str, Any]:
        """Moonraker's view of each encrypted job (file, user, result), and
        with an installed helper its own record of every decryption, newest
        first: that one no database restore changes."""
        out: Dict[str, Any] = {"jobs": await self.records.newest_first()}
        if self.client.installed:
            try:
                out["decryptions"] = list(reversed(await self.client.records()))
            except HelperError as e:
                raise self.server.error(e.message, 503) from None
        return out


def load_component(config: ConfigHelper) -> EncryptedPrint:
    return EncryptedPrint(config)
