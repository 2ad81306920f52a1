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
import ctypes
import fcntl
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
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from ..common import RequestType, WebRequest

if TYPE_CHECKING:
    from ..common import UserInfo
    from ..confighelper import ConfigHelper

try:
    import msgpack
except ImportError:  # reported by the component as a warning, not a crash
    msgpack = None

PROTOCOL_VERSION = 1
MAGIC = b"age-encryption.org/v1\n"
ARMOR = b"-----BEGIN AGE ENCRYPTED FILE-----"
MAX_RECORD = 65536
MAX_MESSAGE = 16 << 20
ALL_SEALS = 0x1 | 0x2 | 0x4 | 0x8  # F_SEAL_SEAL|SHRINK|GROW|WRITE
F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)


def is_encrypted_file(path: str) -> bool:
    """True if the file starts with the age v1 intro line, or is ASCII-armored
    age (which must be refused with a reason, not printed as G-code)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(ARMOR))
    except OSError:
        return False
    return head.startswith(MAGIC) or head == ARMOR


class HelperError(Exception):
    """An operation failed; ``code`` is a protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


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
        body = frame(msg)
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
        self.pid: Optional[int] = None  # of the running helper, if any

    async def version(self) -> Tuple[int, str]:
        """The helper's protocol and build version, from its hello."""
        proto, ver, _ = await self._run(None, None, self.hello_timeout)
        return proto, ver

    async def recipient(self) -> str:
        """The printer's public recipient; only the helper reads the identity."""
        _, _, (res, _) = await self._run(
            self._request("recipient", "/", "/"), None, self.inspect_timeout)
        return str(res["recipient"])

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
                    f"{PROTOCOL_VERSION} (updated without rebuilding the helper?): "
                    f"{self.rebuild_hint}")
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


# --------------------------------------------------------------------------
# The Moonraker component
# --------------------------------------------------------------------------

NAMESPACE = "encrypted_print"            # print counts per file id
JOBS_NAMESPACE = "encrypted_print_jobs"  # the audit trail
REMOTE_METHOD = "encrypted_print_prepare"
REGISTER_ENDPOINT = "encrypted_file_bridge/register"
REFUSE_ENDPOINT = "encrypted_file_bridge/refuse"
BRIDGE_OBJECT = "encrypted_file_bridge"
DEFAULT_IDENTITY = "~/.config/encprint/printer.key"
PUBKEY_RE = re.compile(r"^encprint-pub:[A-Za-z0-9+/]{43}$")
# Klipper's extended G-code parser stops at these; a name holding one cannot
# be sent in SDCARD_PRINT_FILE or REGISTER_ENCRYPTED_FILE.
UNSENDABLE = re.compile(r"[\x00-\x1f\x7f;#*]")
GCODE_UNSAFE = re.compile(r"[\x00-\x1f\x7f;#*\"]")
FINISHED_STATES = ("complete", "cancelled", "error")


class PrintRefused(Exception):
    """A print start was refused; the message is for the user."""


class ActiveJob:
    def __init__(self, filename: str, df: DecryptedFile, record_id: str,
                 record: Dict[str, Any]) -> None:
        self.filename = filename
        self.df = df
        self.record_id = record_id
        self.record = record
        self.seen_running = False
        self.wake = asyncio.Event()


class EncryptedPrint:
    def __init__(self, config: ConfigHelper) -> None:
        self.server = config.get_server()
        self.eventloop = self.server.get_event_loop()
        repo = pathlib.Path(os.path.realpath(__file__)).parent.parent
        self.helper_path = os.path.expanduser(
            config.get("helper", str(repo / "bin" / "encprint-helper")))
        self.identity_path = os.path.expanduser(config.get("identity", DEFAULT_IDENTITY))
        self.max_memory = config.getint("max_memory", 0, minval=0) * 1024 * 1024
        self.swap_protection = config.getchoice(
            "swap_protection", ["none", "refuse_disk_swap", "mlock"], "none")
        self.trusted: List[str] = config.getlist("trusted_publishers", [])
        for key in self.trusted:
            if not PUBKEY_RE.match(key):
                raise config.error(
                    f"[encrypted_print] trusted_publishers: {key!r} is not a publisher "
                    "key (encprint-pub:..., as printed by `encprint sign-keygen`)")
        self.require_signature = config.getboolean("require_signature", False)
        # Moonraker's requests to Klipper have no timeout of their own.
        self.klipper_timeout = config.getfloat("klipper_timeout", 30., above=0.)
        self.client = HelperClient(
            self.helper_path, self.identity_path,
            inspect_timeout=config.getfloat("inspect_timeout", 20., above=0.),
            decrypt_timeout=config.getfloat("decrypt_timeout", 600., above=0.),
            rebuild_hint=f"run {repo / 'install.sh'}")
        self.file_manager = self.server.lookup_component("file_manager")
        self.mdst = self.file_manager.get_metadata_storage()
        self.kapis = self.server.lookup_component("klippy_apis")
        database = self.server.lookup_component("database")
        self.counts = database.register_local_namespace(NAMESPACE, forbidden=True)
        self.jobs = database.register_local_namespace(JOBS_NAMESPACE, forbidden=True)
        self.active: Optional[ActiveJob] = None
        self.start_lock = asyncio.Lock()
        self.bridge_loaded = False
        self.ready = False  # klippy_ready checks done, print_stats subscribed
        self.recipient = ""
        self.helper_version = ""
        self.problems: Dict[str, str] = {}
        self.decrypting: Optional[Dict[str, Any]] = None
        # Every start path of Moonraker goes through klippy_apis.start_print
        # (print button, reprint, upload print=true, job queue, OctoPrint).
        self._orig_start_print = self.kapis.start_print
        self.kapis.start_print = self._start_print
        self.server.register_event_handler(
            "file_manager:metadata_processed", self._on_metadata_processed)
        self.server.register_event_handler("server:klippy_ready", self._on_klippy_ready)
        self.server.register_event_handler(
            "server:klippy_disconnect", self._on_klippy_gone)
        self.server.register_event_handler(
            "server:klippy_shutdown", self._on_klippy_shutdown)
        self.server.register_remote_method(REMOTE_METHOD, self._on_remote_prepare)
        self.server.register_notification("encrypted_print:progress",
                                          "encrypted_print_progress")
        self.server.register_notification("encrypted_print:error",
                                          "encrypted_print_error")
        self.server.register_endpoint(
            "/server/encrypted_print/status", RequestType.GET, self._handle_status)
        self.server.register_endpoint(
            "/server/encrypted_print/recipient", RequestType.GET, self._handle_recipient)
        self.server.register_endpoint(
            "/server/encrypted_print/jobs", RequestType.GET, self._handle_jobs)

    # -- start-up checks; each problem is one warning in Moonraker's list --

    def _problem(self, key: str, msg: Optional[str]) -> None:
        warn_id = f"encrypted_print_{key}"
        if msg is None:
            if self.problems.pop(key, None) is not None:
                self.server.remove_warning(warn_id)
            return
        self.problems[key] = msg
        logging.warning(f"encrypted_print: {msg}")
        self.server.add_warning(f"[encrypted_print]: {msg}", warn_id)

    async def component_init(self) -> None:
        if msgpack is None:
            self._problem("msgpack", "the Python package msgpack is missing in Moonraker's "
                          "virtualenv; run `~/moonraker-env/bin/pip install msgpack` "
                          "(install.sh does this)")
            return
        self._problem("identity", self._identity_problem())
        try:
            _, self.helper_version = await self.client.version()
            self._problem("helper", None)
        except HelperError as e:
            self._problem("helper", e.message)
        if "identity" not in self.problems and "helper" not in self.problems:
            try:
                self.recipient = await self.client.recipient()
            except HelperError as e:
                self._problem("identity", e.message)
        analysis = self.server.lookup_component("analysis", None)
        if analysis is not None and getattr(analysis, "auto_analyze", False):
            self._problem("analysis", "[analysis] enable_auto_analysis is on: the "
                          "estimator cannot read encrypted files and may rewrite them; "
                          "turn it off")
        if getattr(self.mdst, "enable_object_proc", False):
            self._problem("object_processing", "[file_manager] enable_object_processing "
                          "is on: it cannot process encrypted files; turn it off")

    def _identity_problem(self) -> Optional[str]:
        path = self.identity_path
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

    async def _on_klippy_ready(self) -> None:
        objects = await self.kapis.get_object_list(default=[])
        self.bridge_loaded = BRIDGE_OBJECT in objects
        self._problem("bridge", None if self.bridge_loaded else (
            "Klipper has no [encrypted_file_bridge]: add the section to printer.cfg "
            "(install.sh does this) and restart Klipper; encrypted files cannot print"))
        kinfo = self.server.get_klippy_info()
        uid = kinfo.get("user_id")
        self._problem("uid", None if uid in (None, os.getuid()) else (
            f"Klipper runs as uid {uid} and Moonraker as uid {os.getuid()}: Klipper "
            "can only open Moonraker's in-memory file when both run as the same user"))
        # Our own subscription also gives job_state the updates it otherwise
        # misses on a headless printer (see docs/development.md).
        await self.kapis.subscribe_objects(
            {"print_stats": ["state", "filename"]}, self._on_status, default=None)
        self.ready = True

    # -- metadata on upload --

    async def _on_metadata_processed(self, fname: str) -> None:
        path = str(self.file_manager.get_full_path("gcodes", fname))
        if not is_encrypted_file(path):
            return
        root = self.file_manager.get_directory("gcodes")
        md = self.mdst.get(fname, {})
        try:
            res = await self.client.inspect(path, root)
        except HelperError as e:
            logging.warning(f"encrypted_print: {fname}: {e.message}")
            self._store_metadata(fname, md, {"encrypted": True, "authenticated": False,
                                             "reason": e.message, "reason_code": e.code})
            return
        info: Dict[str, Any] = {
            "encrypted": True,
            "authenticated": bool(res.get("authenticated")),
            "file_id": bytes(res.get("file_id") or b"").hex(),
            "recipients": res.get("recipients", 0),
            "policy": self._policy_view(res.get("policy")),
            "publisher": res.get("publisher"),
            "signature_valid": bool(res.get("signature_valid")),
            "plaintext_size": res.get("plaintext_size", 0),
        }
        if not info["authenticated"]:
            info["reason"] = res.get("reason", "")
            info["reason_code"] = res.get("reason_code", "")
            logging.warning(f"encrypted_print: {fname} is listed but cannot be printed "
                            f"here: {info['reason']}")
        else:
            refusal = self._policy_refusal(fname, res, count=None)
            if refusal is not None:
                info["reason"] = refusal
        pub = res.get("metadata") or {}
        thumbs = self._write_thumbnails(path, pub.pop("thumbnails", None) or [])
        self._store_metadata(fname, md, info, pub, thumbs)

    def _store_metadata(self, fname: str, md: Dict[str, Any], info: Dict[str, Any],
                        public: Optional[Dict[str, Any]] = None,
                        thumbs: Optional[List[Dict[str, Any]]] = None) -> None:
        # What Moonraker's parser guessed from ciphertext is meaningless.
        keep = {k: md[k] for k in ("size", "modified", "uuid", "file_processors",
                                   "print_start_time", "job_id") if k in md}
        keep.update({k: v for k, v in (public or {}).items()
                     if isinstance(v, (int, float, str)) and v not in ("", 0)})
        keep.setdefault("slicer", "Unknown")
        if thumbs:
            keep["thumbnails"] = thumbs
        keep["encrypted_print"] = info
        self.mdst.insert(fname, keep)

    def _write_thumbnails(self, path: str, thumbs: List[Dict[str, Any]]
                          ) -> List[Dict[str, Any]]:
        """Write the published previews where Moonraker writes a slicer's."""
        out: List[Dict[str, Any]] = []
        thumb_dir = os.path.join(os.path.dirname(path), ".thumbs")
        base = os.path.splitext(os.path.basename(path))[0]
        for t in thumbs:
            ext = {"png": "png", "jpg": "jpg"}.get(str(t.get("format")))
            data = t.get("data")
            if ext is None or not isinstance(data, bytes):
                continue  # QOI previews: no UI shows them
            name = f"{base}-{t['width']}x{t['height']}.{ext}"
            try:
                os.makedirs(thumb_dir, exist_ok=True)
                with open(os.path.join(thumb_dir, name), "wb") as f:
                    f.write(data)
            except OSError as e:
                logging.warning(f"encrypted_print: cannot write thumbnail {name}: {e}")
                continue
            out.append({"width": t["width"], "height": t["height"], "size": len(data),
                        "relative_path": os.path.join(".thumbs", name)})
        return out

    @staticmethod
    def _policy_view(policy: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        if not policy:
            return None
        return {"max_prints": policy.get("max_prints", 0),
                "not_before": policy.get("not_before", 0),
                "not_after": policy.get("not_after", 0)}

    # -- policy --

    def _policy_refusal(self, fname: str, res: Dict[str, Any],
                        count: Optional[int]) -> Optional[str]:
        pol = res.get("policy") or {}
        now = time.time()
        nb, na = pol.get("not_before", 0), pol.get("not_after", 0)
        if nb and now < nb:
            return (f"{fname} may not be printed before "
                    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(nb))}")
        if na and now > na:
            return (f"{fname} expired on "
                    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(na))}")
        publisher = res.get("publisher")
        if publisher and not res.get("signature_valid"):
            return f"{fname} carries an invalid publisher signature: it was altered"
        if self.require_signature and not publisher:
            return (f"{fname} is not signed, and this printer only prints files signed "
                    "by a trusted publisher")
        if publisher and self.trusted and publisher not in self.trusted:
            return (f"{fname} is signed by {publisher}, which is not among this "
                    "printer's trusted_publishers")
        limit = pol.get("max_prints", 0)
        if limit and count is not None and count >= limit:
            return (f"{fname} may be printed {limit} time(s) and all {limit} have been "
                    "used on this printer")
        return None

    async def _print_count(self, file_id: bytes) -> int:
        return int(await self.counts.get(file_id.hex(), 0))

    # -- printing --

    async def _start_print(self, filename: str, wait_klippy_started: bool = False,
                           user: Optional[UserInfo] = None) -> str:
        name = filename[1:] if filename.startswith("/") else filename
        path = str(self.file_manager.get_full_path("gcodes", name))
        if not is_encrypted_file(path):
            return await self._orig_start_print(filename, wait_klippy_started, user)
        if wait_klippy_started:
            await self.server.lookup_component("klippy_connection").wait_started()
        try:
            await self._prepare(name, user)
        except PrintRefused as e:
            self._report_error(str(e))
            raise self.server.error(str(e), 400) from None
        try:
            ret = await self._orig_start_print(name, False, user)
        except Exception as e:
            await self._abort_start(name, f"Klipper refused to start {name}: {e}")
            raise
        await self._started(name)
        return ret

    async def _prepare(self, name: str, user: Optional[UserInfo]) -> bool:
        """Check everything, decrypt, and register the memfd with Klipper.
        True when a console start waiting in Klipper took the registration."""
        # First: from here on messages name the file, and they are echoed to
        # Klipper's console; a newline in a name would be a G-code line.
        if UNSENDABLE.search(name):
            raise PrintRefused(f"cannot print {name!r}: Klipper cannot take file "
                               "names with control characters, ';', '#' or '*'; "
                               "rename the file")
        if self.start_lock.locked():
            raise PrintRefused(f"cannot start {name}: another encrypted file is being "
                               "prepared")
        async with self.start_lock:
            if self.active is not None:
                # The previous print may have ended since the last check
                # (the job queue starts the next one within milliseconds).
                await self._klipper(name, self._check_job(self.active))
            if self.active is not None:
                raise PrintRefused(f"cannot start {name}: {self.active.filename} is "
                                   "still printing")
            for key in ("msgpack", "helper", "identity", "uid"):
                if key in self.problems:
                    raise PrintRefused(f"cannot print {name}: {self.problems[key]}")
            objects = await self._klipper(name, self.kapis.get_object_list(default=[]))
            if BRIDGE_OBJECT not in objects:
                raise PrintRefused(f"cannot print {name}: Klipper has no "
                                   "[encrypted_file_bridge] section in printer.cfg")
            if self.swap_protection == "refuse_disk_swap":
                swap = disk_swap()
                if swap:
                    raise PrintRefused(f"cannot print {name}: swap on {swap} is active and "
                                       "[encrypted_print] swap_protection forbids "
                                       "cleartext pages that could be written to disk")
            path = str(self.file_manager.get_full_path("gcodes", name))
            root = self.file_manager.get_directory("gcodes")
            try:
                res = await self.client.inspect(path, root)
            except HelperError as e:
                raise PrintRefused(e.message) from None
            if not res.get("authenticated"):
                raise PrintRefused(res.get("reason") or f"{name} cannot be opened here")
            file_id = bytes(res["file_id"])
            refusal = self._policy_refusal(name, res, await self._print_count(file_id))
            if refusal is not None:
                raise PrintRefused(refusal)
            self.decrypting = {"filename": name, "done": 0, "total": res["plaintext_size"]}
            try:
                df = await self.client.decrypt(path, root, self.max_memory, self._progress)
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
            try:
                # An API request, not G-code: nothing of it reaches the
                # console, gcode_store or a macro. The token is used once.
                reply = await self._klipper(name, self._bridge_request(REGISTER_ENDPOINT, {
                    "filename": name, "pid": os.getpid(), "fd": df.fd, "size": df.size,
                    "token": df.memfd_name}))
            except PrintRefused:
                df.close()
                raise
            except Exception as e:
                df.close()
                raise PrintRefused(f"Klipper refused {name}: {e}") from None
            record = {"filename": name, "file_id": file_id.hex(), "sha256": df.sha256.hex(),
                      "size": df.size, "publisher": df.publisher,
                      "user": getattr(user, "username", None), "start_time": None,
                      "end_time": None, "result": "starting",
                      "decrypt_ms": df.elapsed_ms}
            rid = f"{time.time():017.6f}-{secrets.token_hex(3)}"
            self.active = ActiveJob(name, df, rid, record)
            logging.info(f"encrypted_print: {name} decrypted ({df.size} bytes in "
                         f"{df.elapsed_ms:.0f} ms) and registered with Klipper")
            return bool((reply or {}).get("consumed"))

    async def _bridge_request(self, endpoint: str, params: Dict[str, Any]) -> Any:
        klippy = self.server.lookup_component("klippy_connection")
        return await klippy.request(WebRequest(endpoint, params))

    async def _klipper(self, name: str, request: Any) -> Any:
        """A request to Klipper on a start path, bounded by klipper_timeout."""
        try:
            return await asyncio.wait_for(request, self.klipper_timeout)
        except asyncio.TimeoutError:
            raise PrintRefused(f"cannot print {name}: Klipper did not answer within "
                               f"{self.klipper_timeout:g} s (busy or hung?); try again") from None

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

    async def _started(self, name: str) -> None:
        job = self.active
        if job is None or job.filename != name:
            return
        file_id = job.record["file_id"]
        count = int(await self.counts.get(file_id, 0)) + 1
        self.counts[file_id] = count
        job.record.update(start_time=time.time(), result="printing", print_number=count)
        self.jobs[job.record_id] = job.record
        self.eventloop.create_task(self._watch(job))

    async def _check_job(self, job: ActiveJob) -> None:
        """Finish the job if its print has ended."""
        res = await self.kapis.query_objects(
            {"print_stats": ["state", "filename"]}, default=None)
        ps = (res or {}).get("print_stats")
        if not ps or self.active is not job or job.record["result"] == "starting":
            return
        state = ps.get("state")
        if ps.get("filename") != job.filename:
            self._finish("replaced")
        elif state in FINISHED_STATES:
            self._finish(state)
        elif state in ("printing", "paused"):
            job.seen_running = True
        elif state == "standby" and job.seen_running:
            self._finish("reset")

    async def _watch(self, job: ActiveJob) -> None:
        """Release the memfd when the print ends. A short print can go
        standby -> printing -> complete between two status pushes, so the
        subscription only wakes this loop; the state is queried."""
        while self.active is job:
            await self._check_job(job)
            try:
                await asyncio.wait_for(job.wake.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
            job.wake.clear()

    async def _abort_start(self, name: str, msg: str) -> None:
        job = self.active
        if job is not None and job.filename == name:
            self.active = None
            job.df.close()
            esc = name.replace("\\", "\\\\").replace('"', '\\"')
            await self.kapis.run_gcode(f'UNREGISTER_ENCRYPTED_FILE FILENAME="{esc}"',
                                       default=None)
        self._report_error(msg)

    def _report_error(self, msg: str) -> None:
        logging.warning(f"encrypted_print: {msg!r}")
        self.server.send_event("encrypted_print:error", {"message": msg})
        # Shown in the UI console; the upload print=true path drops our
        # error, and a console start has no other way to hear about it. The
        # message goes into a G-code line: nothing in it may end that line
        # (newline) or cut it short (Klipper's parser stops at ; # *).
        quoted = GCODE_UNSAFE.sub("?", msg)
        self.eventloop.create_task(self.kapis.run_gcode(
            f'RESPOND TYPE=error MSG="encrypted_print: {quoted}"', default=None))

    def _on_remote_prepare(self, filename: str = "", start: bool = True) -> None:
        """Klipper's bridge asks: a console/macro/M23 start of an encrypted file."""
        self.eventloop.create_task(self._remote_prepare(filename, bool(start)))

    async def _remote_prepare(self, filename: str, start: bool) -> None:
        """SDCARD_PRINT_FILE or M23 waits in Klipper while this decrypts and
        registers the file; the waiting command then loads it, so the rest
        of the script or macro runs as for a clear file."""
        try:
            consumed = await self._prepare(filename, None)
        except Exception as e:
            msg = str(e) if isinstance(e, PrintRefused) else f"cannot prepare {filename}: {e}"
            if not isinstance(e, PrintRefused):
                logging.exception("encrypted_print: remote prepare")
            # The waiting command fails with this message in the console.
            logging.warning(f"encrypted_print: {msg!r}")
            self.server.send_event("encrypted_print:error", {"message": msg})
            try:
                await self._bridge_request(REFUSE_ENDPOINT, {"filename": filename,
                                                             "message": msg})
            except self.server.error:
                pass  # Klipper is gone; its command ended with it
            return
        if not consumed:
            await self._abort_start(filename, f"Klipper stopped waiting for {filename}; "
                                    "start it again")
            return
        await self._started(filename)

    # -- the print's lifetime: the memfd is held until the print ends --

    def _on_status(self, status: Dict[str, Any], eventtime: float) -> None:
        if self.active is not None and "print_stats" in status:
            self.active.wake.set()

    def _finish(self, result: str) -> None:
        job, self.active = self.active, None
        if job is None:
            return
        job.df.close()
        job.record.update(end_time=time.time(), result=result)
        self.jobs[job.record_id] = job.record
        logging.info(f"encrypted_print: {job.filename} ended ({result}); "
                     "cleartext released")

    def _on_klippy_gone(self) -> None:
        self.ready = False
        self._finish("klippy_disconnect")

    def _on_klippy_shutdown(self) -> None:
        self._finish("klippy_shutdown")

    def close(self) -> None:
        self._finish("moonraker_shutdown")

    # -- API --

    async def _handle_status(self, web_request: WebRequest) -> Dict[str, Any]:
        job = self.active
        return {
            "helper": {"path": self.helper_path, "version": self.helper_version,
                       "protocol": PROTOCOL_VERSION, "ok": "helper" not in self.problems},
            "identity": {"path": self.identity_path, "ok": "identity" not in self.problems},
            "recipient": self.recipient,
            "bridge_loaded": self.bridge_loaded,
            "ready": self.ready,
            "problems": dict(self.problems),
            "decrypting": self.decrypting,
            "active_job": None if job is None else dict(job.record),
            "require_signature": self.require_signature,
            "trusted_publishers": list(self.trusted),
        }

    async def _handle_recipient(self, web_request: WebRequest) -> Dict[str, Any]:
        if not self.recipient:
            try:
                self.recipient = await self.client.recipient()
            except HelperError as e:
                raise self.server.error(e.message, 503) from None
        return {"recipient": self.recipient}

    async def _handle_jobs(self, web_request: WebRequest) -> Dict[str, Any]:
        rows = [(str(k), v) for k, v in await self.jobs.items()]
        rows.sort(key=lambda kv: kv[0], reverse=True)  # newest first
        return {"jobs": [dict(v, id=k) for k, v in rows]}


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


def load_component(config: ConfigHelper) -> EncryptedPrint:
    return EncryptedPrint(config)
