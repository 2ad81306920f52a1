"""A real browser for tests: Debian's headless Chromium, driven over the
Chrome DevTools Protocol with the websockets package the suite already pins.

It records what a person would see in the developer console (console.error,
uncaught exceptions, failed loads) so that a test can assert there were none.
"""
from __future__ import annotations

import base64
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading
import urllib.request
from typing import Any, Dict, List, Optional

from stack import StackError, answer_pending, wait_for

FLAGS = ["--headless=new", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--no-default-browser-check", "--disable-extensions", "--mute-audio",
         "--remote-debugging-port=0", "--hide-scrollbars"]


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise StackError("no Chromium: run scripts/bootstrap.sh (it installs Debian's chromium)")


class Browser:
    """One Chromium with one tab."""

    def __init__(self, width: int = 1280, height: int = 900) -> None:
        self.profile = pathlib.Path(tempfile.mkdtemp(prefix="encprint-chromium-"))
        args = [chromium_path(), *FLAGS, f"--user-data-dir={self.profile}",
                f"--window-size={width},{height}", "about:blank"]
        # Chromium's sandbox refuses to run as root.
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        self.console_errors: List[str] = []
        self._events: List[Dict[str, Any]] = []
        self._lock = threading.Lock()
        self._pending: Dict[int, Any] = {}
        self._next = 1
        try:
            port_file = self.profile / "DevToolsActivePort"
            wait_for(lambda: port_file.exists() and port_file.read_text().strip(), 30,
                     "Chromium's DevTools port")
            port = int(port_file.read_text().split()[0])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                pages = [t for t in json.loads(r.read()) if t["type"] == "page"]
            from websockets.sync.client import connect
            self._ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, legacy=True)
            self._thread = threading.Thread(target=self._reader, daemon=True)
            self._thread.start()
            for domain in ("Page", "Runtime", "Log", "Network"):
                self.call(f"{domain}.enable")
        except BaseException:
            self.close()
            raise

    # -- protocol --

    def call(self, method: str, timeout: float = 30, **params: Any) -> Dict[str, Any]:
        ev = threading.Event()
        with self._lock:
            mid = self._next
            self._next += 1
            self._pending[mid] = ev
        self._ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        if not ev.wait(timeout):
            raise StackError(f"Chromium did not answer {method} within {timeout}s")
        reply = self._pending.pop(mid)
        if "error" in reply:
            raise StackError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def _reader(self) -> None:
        try:
            for raw in self._ws:
                msg = json.loads(raw)
                with self._lock:
                    if answer_pending(self._pending, msg):
                        continue
                    self._events.append(msg)
                self._note_error(msg)
        except Exception:  # noqa: BLE001 - the socket closes at teardown
            pass

    def _note_error(self, msg: Dict[str, Any]) -> None:
        method, p = msg.get("method"), msg.get("params", {})
        text = None
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"])
        elif method == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            text = d.get("exception", {}).get("description") or d.get("text")
        elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
            text = f"{p['entry'].get('text')} ({p['entry'].get('url', '')})"
        if text is not None:
            with self._lock:
                self.console_errors.append(text)

    # -- what a test does --

    def open(self, url: str, timeout: float = 30) -> None:
        with self._lock:
            self._events.clear()
        self.call("Page.navigate", url=url)
        wait_for(lambda: any(e.get("method") == "Page.loadEventFired" for e in self._events),
                 timeout, f"{url} to load")

    def js(self, expression: str) -> Any:
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                        awaitPromise=True)
        if "exceptionDetails" in res:
            raise StackError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait_js(self, expression: str, timeout: float = 20, what: str = "") -> Any:
        return wait_for(lambda: self.js(expression), timeout, what or expression, 0.1)

    KEYS = {"Tab": (9, ""), "Enter": (13, "\r"), "Space": (32, " ")}

    def press(self, key: str) -> None:
        """A key press as the keyboard makes it (focus moves, buttons fire)."""
        code, text = self.KEYS[key]
        down = {"key": " " if key == "Space" else key, "code": key,
                "windowsVirtualKeyCode": code, "nativeVirtualKeyCode": code}
        self.call("Input.dispatchKeyEvent", type="keyDown", text=text, **down)
        self.call("Input.dispatchKeyEvent", type="keyUp", **down)

    def viewport(self, width: int, height: int, mobile: bool = False) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=mobile)

    def screenshot(self, path: pathlib.Path, full_page: bool = True,
                   clip: Optional[Dict[str, float]] = None) -> pathlib.Path:
        params: Dict[str, Any] = {"format": "png", "captureBeyondViewport": full_page}
        if clip is not None:
            params["clip"] = dict(clip, scale=1)
        data = self.call("Page.captureScreenshot", **params)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def rect(self, selector: str) -> Dict[str, float]:
        return self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                       ".getBoundingClientRect(); return {x: r.x + scrollX, y: r.y + scrollY,"
                       " width: r.width, height: r.height}; })()")

    def close(self) -> None:
        ws = getattr(self, "_ws", None)
        if ws is not None:
            try:
                self.call("Browser.close", timeout=5)
            except Exception:  # noqa: BLE001 - it may be gone already
                pass
            ws.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)
