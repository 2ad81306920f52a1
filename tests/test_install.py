"""install.sh and uninstall.sh against a fake home that holds real git
checkouts of the pinned Klipper and Moonraker code, run as a real
unprivileged printer user with a passwordless sudo rule (as on Raspberry Pi
OS) and real sudo; then klippy and Moonraker started from that layout, as
that user, print an encrypted upload.

install.sh's privilege step runs with --system-root: every system file goes
under a root-owned temporary folder, never /usr/local or /etc. The one
machine-wide thing it creates is the system user `encprint`; the tests fail
clearly if one exists that they did not make, and remove theirs."""
from __future__ import annotations

import grp
import hashlib
import json
import os
import pathlib
import pwd
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
PRINTER_USER = "encprint-test-pi"
PRINTER_GECOS = "klipper-encprint test printer user"
HELPER_USER = "encprint"
HELPER_GECOS = "klipper-encprint helper"  # install.sh's
SUDOERS = pathlib.Path("/etc/sudoers.d/encprint-test-pi")
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}
AS_USER: list = []  # set by the printer_user fixture

if os.geteuid() != 0:
    pytest.skip("needs root to create the printer's user and its sudo rule (CI runs as root)",
                allow_module_level=True)


def git_checkout(path: pathlib.Path, origin: str) -> None:
    env = {**os.environ, **GIT_ENV}
    for cmd in (["init", "-q", "-b", "master"], ["add", "-A"], ["commit", "-qm", "import"],
                ["remote", "add", "origin", origin]):
        subprocess.run(["git", "-C", str(path), *cmd], check=True, env=env)


# Paths that change for reasons of their own (caches, Go's telemetry counter).
NOT_OURS = ("klipper-encprint/bin", "printer_data/logs", ".cache", ".config/go/telemetry")


def user_gecos(name: str) -> str | None:
    try:
        return pwd.getpwnam(name).pw_gecos
    except KeyError:
        return None


def remove_user(name: str) -> None:
    subprocess.run(["userdel", name], capture_output=True)
    try:
        grp.getgrnam(name)
        subprocess.run(["groupdel", name], capture_output=True)
    except KeyError:
        pass


def grant_sudo() -> None:
    SUDOERS.write_text(f"{PRINTER_USER} ALL=(ALL) NOPASSWD: ALL\n")
    SUDOERS.chmod(0o440)
    subprocess.run(["visudo", "-cqf", str(SUDOERS)], check=True)


@pytest.fixture(scope="module")
def printer_user():
    """A real printer user with passwordless sudo; the helper's user must
    not exist yet (install.sh creates it), and is removed afterwards."""
    global AS_USER
    if user_gecos(HELPER_USER) not in (None, HELPER_GECOS):
        pytest.fail(f"a user {HELPER_USER!r} exists on this machine that these tests did not "
                    "create; they would remove it. Remove or rename it to run them")
    remove_user(HELPER_USER)  # a leftover of an interrupted run of these tests
    if user_gecos(PRINTER_USER) == PRINTER_GECOS:
        remove_user(PRINTER_USER)
    elif user_gecos(PRINTER_USER) is not None:
        pytest.fail(f"a user {PRINTER_USER!r} exists that these tests did not create")
    subprocess.run(["useradd", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                    "--shell", "/bin/bash", "--comment", PRINTER_GECOS, PRINTER_USER], check=True)
    grant_sudo()
    pw = pwd.getpwnam(PRINTER_USER)
    AS_USER = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups"]
    try:
        yield pw
    finally:
        SUDOERS.unlink(missing_ok=True)
        remove_user(PRINTER_USER)
        if user_gecos(HELPER_USER) == HELPER_GECOS:
            remove_user(HELPER_USER)


class Home:
    def __init__(self, base: pathlib.Path) -> None:
        self.base = base
        self.home = base / "home"
        self.klipper = self.home / "klipper"
        self.moonraker = self.home / "moonraker"
        self.repo = self.home / "klipper-encprint"
        self.data = self.home / "printer_data"
        self.config = self.data / "config"
        self.sysroot = base / "system"  # root-owned, as / is
        self.libexec = self.sysroot / "usr/local/libexec/encprint"
        self.helper = self.libexec / "encprint-helper"
        self.identity = self.sysroot / "var/lib/encprint/identity"
        self.state = self.sysroot / "var/lib/encprint/state"
        self.policy = self.sysroot / "etc/encprint/policy.json"
        self.user_identity = self.home / ".config/encprint/printer.key"
        self.env = {
            "HOME": str(self.home), "PATH": os.environ["PATH"],
            "GOMODCACHE": str(base / "gomod"), "GOCACHE": str(base / "gocache"),
            "GOPROXY": "off", "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local",
            **GIT_ENV}

    def run(self, *args: str, user: bool = True, check: bool = False,
            env: dict = None) -> subprocess.CompletedProcess:
        res = subprocess.run((AS_USER if user else []) + list(args), capture_output=True,
                             text=True, env={**self.env, **(env or {})}, cwd=self.home,
                             stdin=subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise AssertionError(f"{args}: {res.returncode}\n{res.stdout}\n{res.stderr}")
        return res

    def install(self, *args: str, privileged: bool = True, **kw) -> subprocess.CompletedProcess:
        """install.sh as the printer's user; with the privilege step under
        the test's system root, or without it (--no-privilege-step)."""
        opts = ["--system-root", str(self.sysroot)] if privileged else ["--no-privilege-step"]
        return self.run("bash", str(self.repo / "install.sh"), "--no-restart", *opts, *args, **kw)

    def uninstall(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run("bash", str(self.repo / "uninstall.sh"), "--no-restart",
                        "--system-root", str(self.sysroot), *args, **kw)

    def snapshot(self) -> dict:
        out = {}
        for top in (self.home, self.sysroot):
            for p in sorted(top.rglob("*")):
                rel = str(p.relative_to(self.base))
                if "/.git/objects" in rel or rel.startswith(tuple("home/" + n for n in NOT_OURS)):
                    continue
                st = p.lstat()
                meta = f"{st.st_uid}:{st.st_gid}:{st.st_mode:o}"
                if p.is_symlink():
                    out[rel] = "-> " + os.readlink(p)
                elif p.is_file():
                    out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() + " " + meta
                elif top == self.sysroot:
                    out[rel] = meta
        return out


def site_packages(venv: pathlib.Path, pkg: str) -> pathlib.Path:
    return sorted(venv.glob(f"lib/python3*/site-packages/{pkg}"))[0]


@pytest.fixture(scope="module")
def home(binaries, printer_user) -> Home:
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
    subprocess.run(["chown", "-R", f"{printer_user.pw_uid}:{printer_user.pw_gid}", str(base)],
                   check=True)
    h.uid, h.gid = printer_user.pw_uid, printer_user.pw_gid
    h.sysroot.mkdir(mode=0o755)  # root's
    yield h
    shutil.rmtree(base, ignore_errors=True)


def start_installed(h: Home) -> tuple:
    """klippy and Moonraker from the fake home's checkouts, as its user."""
    kdir = h.home / "klippy-run"
    kdir.mkdir(exist_ok=True)
    os.chown(kdir, h.uid, h.gid)
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


def stop(k, m, ui) -> None:
    ui.close()
    m.stop()
    k.stop()


def encrypt(binaries, recipient: str, plain: bytes, *flags: str) -> bytes:
    keys = Keys.__new__(Keys)
    keys.bin, keys.recipient = binaries, recipient
    return keys.encrypt(plain, *flags)


def print_once(ui: UIClient, name: str) -> None:
    """Print name to the end: its audit record says complete."""
    def done() -> int:
        return sum(1 for j in ui.get("/server/encrypted_print/jobs")["result"]["jobs"]
                   if j["filename"] == name and j["result"] == "complete")
    before = done()
    ui.start_print(name)
    wait_for(lambda: done() > before, 60, f"the print of {name}")
    wait_for(lambda: ui.get("/server/encrypted_print/status")["result"]["active_job"] is None,
             20, "the job's release")


def recipient_of(res: subprocess.CompletedProcess) -> str:
    recipient = res.stdout.strip().splitlines()[-1].strip()
    assert recipient.startswith("age1"), res.stdout
    return recipient




def test_refuses_root_and_reports_missing_pieces(home):
    res = home.run("bash", str(home.repo / "install.sh"), user=False)
    assert res.returncode != 0 and "do not run install.sh as root" in res.stderr
    res = home.install("--moonraker", "/nonexistent")
    assert res.returncode != 0
    assert "no Moonraker checkout at /nonexistent" in res.stderr and "--moonraker" in res.stderr
    res = home.install("--instance", "7")
    assert "printer_7_data/config/moonraker.conf" in res.stderr


def owner(path: pathlib.Path) -> tuple:
    st = path.stat()
    return pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name, st.st_mode & 0o7777


def test_install_print_reinstall_and_uninstall(home, binaries):
    before = home.snapshot()
    res = home.install(check=True)
    recipient = recipient_of(res)
    extra = home.klipper / "klippy/extras/encrypted_file_bridge.py"
    comp = home.moonraker / "moonraker/components/encrypted_print.py"
    assert os.readlink(extra) == str(home.repo / "klippy-extras/encrypted_file_bridge.py")
    assert os.readlink(comp) == str(home.repo / "moonraker-component/encrypted_print.py")
    # The update manager sees pristine checkouts: the links are excluded.
    for repo in (home.klipper, home.moonraker):
        status = home.run("git", "-C", str(repo), "status", "--porcelain", check=True).stdout
        assert status == "", f"{repo}: {status}"
    # The privilege step: the helper set-user-ID to its own system user in a
    # directory only root writes; the identity and the state that user's,
    # the policy root's.
    assert user_gecos(HELPER_USER) == HELPER_GECOS
    assert pwd.getpwnam(HELPER_USER).pw_shell == "/usr/sbin/nologin"
    assert owner(home.libexec) == ("root", "root", 0o755)
    assert owner(home.helper) == (HELPER_USER, HELPER_USER, 0o6755)
    assert owner(home.identity) == (HELPER_USER, HELPER_USER, 0o600)
    assert owner(home.state) == (HELPER_USER, HELPER_USER, 0o700)
    assert {owner(home.state / s)[0] for s in ("state.a", "state.b")} == {HELPER_USER}
    assert owner(home.policy) == ("root", "root", 0o644)
    assert json.loads(home.policy.read_text()) == {"require_signature": False,
                                                   "trusted_publishers": []}
    assert not home.user_identity.exists()
    printer_cfg = (home.config / "printer.cfg").read_text()
    assert printer_cfg.endswith(SAVE_CONFIG), "SAVE_CONFIG must stay last"
    assert printer_cfg.index("[encrypted_file_bridge]") < printer_cfg.index("#*# <----")
    conf = (home.config / "moonraker.conf").read_text()
    assert f"helper: {home.helper}\n" in conf and "identity:" not in conf
    assert "[update_manager encrypted_print]" in conf
    assert "managed_services: klipper moonraker" in conf

    # The printer's user (what a macro runs as) cannot read the key, nor
    # read, replace or remove the counts, nor change the policy.
    for cmd in (["cat", str(home.identity)], ["ls", str(home.state)],
                ["cat", str(home.state / "state.a")], ["touch", str(home.state / "state.b")],
                ["rm", "-rf", str(home.state)], ["mv", str(home.state), str(home.home / "x")],
                ["sh", "-c", f"echo '{{}}' > {home.policy}"],
                ["cp", str(home.repo / "bin/encprint-helper"), str(home.helper)]):
        res = home.run(*cmd)
        assert res.returncode != 0 and "Permission denied" in res.stderr, (cmd, res)

    # The installed stack prints an encrypted upload through the installed
    # helper, which records the decryption.
    k, m, ui = start_installed(home)
    try:
        ui.upload("part.gcode", encrypt(binaries, recipient, sample_gcode(layers=5)))
        print_once(ui, "part.gcode")
        assert ui.get("/server/encrypted_print/recipient")["result"]["recipient"] == recipient
        status = ui.get("/server/encrypted_print/status")["result"]
        assert status["identity"]["protected"] is True and status["problems"] == {}
        assert str(home.identity) not in json.dumps(status)
        decryptions = ui.get("/server/encrypted_print/jobs")["result"]["decryptions"]
        assert [d["uid"] for d in decryptions] == [home.uid]
    finally:
        stop(k, m, ui)
    # What docs/install.md says: Klipper counts every untracked or ignored .py
    # under klippy/extras as its own modification (by design, so bug reports
    # show third-party code), so its version says -dirty; Moonraker's update
    # manager, which runs the git status above, sees a clean checkout.
    log = k.log.read_text()
    assert "Untracked files: klippy/extras/encrypted_file_bridge.py" in log
    assert "-dirty'" in log.split("Git version: ", 1)[1].split("\n", 1)[0]

    # A second run changes nothing, in the home or the system files.
    installed = home.snapshot()
    res = home.install(check=True)
    for said in ("already links", "already has our sections", f"{home.helper} is up to date",
                 "keeping the installed identity", "keeping the existing state",
                 "keeping it; change it with: sudoedit"):
        assert said in res.stdout, said
    assert recipient_of(res) == recipient
    after = home.snapshot()
    changed = {k for k in set(installed) | set(after) if installed.get(k) != after.get(k)
               and not k.startswith(tuple("home/" + d for d in (
                   "printer_data/database", "printer_data/gcodes", "klippy-run",
                   "printer_data/logs")))}
    assert changed == set(), changed

    # Uninstall restores the config files byte for byte, removes the system
    # files and user, and gives the identity back with a copy of the counts.
    res = home.uninstall(check=True)
    assert (home.config / "moonraker.conf").read_text() == home.moonraker_conf
    assert (home.config / "printer.cfg").read_text() == home.printer_cfg
    assert not extra.exists() and not comp.exists()
    for gone in (home.libexec, home.sysroot / "var/lib/encprint", home.sysroot / "etc/encprint"):
        assert not gone.exists(), gone
    assert user_gecos(HELPER_USER) is None
    with pytest.raises(KeyError):
        grp.getgrnam(HELPER_USER)
    assert "anyone with the web UI can now obtain it" in res.stdout
    assert (home.user_identity.stat().st_uid, home.user_identity.stat().st_mode & 0o777) == (
        home.uid, 0o600)
    given_back = subprocess.run([str(binaries / "encprint"), "recipient", str(home.user_identity)],
                                capture_output=True, text=True, check=True).stdout.strip()
    assert given_back == recipient
    copies = list(home.user_identity.parent.glob("state-*"))
    assert len(copies) == 1 and any((copies[0] / s).read_text().startswith("encprint-state v2")
                                    for s in ("state.a", "state.b"))
    assert f"kept a copy of the print counts and records: {copies[0]}" in res.stdout
    final = home.snapshot()
    for key in ("home/klipper/.git/info/exclude", "home/moonraker/.git/info/exclude"):
        assert final.get(key) == before.get(key), key
    shutil.rmtree(home.user_identity.parent)


def test_migration_keeps_identity_recipient_and_counts(home, binaries):
    """A printer installed before the privilege step (identity in the
    printer's home, counts in Moonraker's database): a file with 1 of 3
    prints used still has exactly 2 left after install.sh moved both."""
    res = home.install(privileged=False, check=True)
    assert "No privilege step: --no-privilege-step was given" in res.stdout
    recipient = recipient_of(res)
    key = home.user_identity.read_bytes()
    k, m, ui = start_installed(home)
    try:
        ui.upload("three.gcode", encrypt(binaries, recipient, sample_gcode(layers=2),
                                         "--max-prints", "3"))
        print_once(ui, "three.gcode")
    finally:
        stop(k, m, ui)

    res = home.install(check=True)
    try:
        assert recipient_of(res) == recipient
        assert "same recipient, and the printer's user no longer holds it" in res.stdout
        # (Earlier tests of this module leave counts of their own files in
        # Moonraker's database: they are imported too.)
        assert "print(s) of" in res.stdout and "imported 0 print(s)" not in res.stdout
        assert not home.user_identity.exists()
        assert home.identity.read_bytes() == key
        assert f"helper: {home.helper}\n" in (home.config / "moonraker.conf").read_text()
        assert "identity:" not in (home.config / "moonraker.conf").read_text()
        k, m, ui = start_installed(home)
        try:
            assert ui.get("/server/encrypted_print/status")["result"]["identity"]["protected"]
            print_once(ui, "three.gcode")
            print_once(ui, "three.gcode")
            with pytest.raises(Exception) as ei:
                ui.start_print("three.gcode")
            assert "all 3 prints have been used" in str(ei.value)
            # The helper's own record: the imported print, then the two since.
            jobs = ui.get("/server/encrypted_print/jobs")["result"]
            file_id = next(j["file_id"] for j in jobs["jobs"] if j["filename"] == "three.gcode")
            assert sorted((d["count"], d["pid"] == 0) for d in jobs["decryptions"]
                          if d["file_id"] == file_id) == [(1, True), (2, False), (3, False)]
        finally:
            stop(k, m, ui)
    finally:
        home.uninstall(check=True)
        shutil.rmtree(home.user_identity.parent, ignore_errors=True)


def test_update_to_a_new_protocol_refuses_with_the_command_then_reinstall_fixes(home, binaries):
    recipient = recipient_of(home.install(check=True))
    # The update manager pulls a commit that changes the helper but not the
    # protocol, and does not rebuild it: the installed helper keeps printing.
    main = home.repo / "helper/cmd/encprint-helper/main.go"
    main.write_text(main.read_text() + "\n// a change after the install\n")
    home.run("git", "-C", str(home.repo), "commit", "-qam", "helper change", check=True)
    k, m, ui = start_installed(home)
    try:
        ui.upload("p1.gcode", encrypt(binaries, recipient, sample_gcode(layers=2)))
        print_once(ui, "p1.gcode")
    finally:
        stop(k, m, ui)
    # Then a commit whose component and helper speak protocol 3.
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
        assert f"the helper {home.helper} (version" in msg
        assert "speaks protocol 2 but this component speaks 3" in msg
        assert f"run {home.repo}/install.sh" in msg
        ui.upload("p2.gcode", encrypt(binaries, recipient, sample_gcode(layers=2)))
        with pytest.raises(Exception) as ei:
            ui.start_print("p2.gcode")
        assert "install.sh" in str(ei.value)
    finally:
        stop(k, m, ui)
    # Running the one command fixes it: the installed helper is replaced,
    # the identity and the counts stay.
    res = home.install(check=True)
    try:
        assert f"installed {home.helper}" in res.stdout and recipient_of(res) == recipient
        k, m, ui = start_installed(home)
        try:
            assert "helper" not in ui.get("/server/encrypted_print/status")["result"]["problems"]
            print_once(ui, "p2.gcode")
            decs = ui.get("/server/encrypted_print/jobs")["result"]["decryptions"]
            # p1 before the update, p2 after it (pid 0: counts that this
            # module's earlier tests left in Moonraker's database, imported).
            assert len([d for d in decs if d["pid"] != 0]) == 2
        finally:
            stop(k, m, ui)
    finally:
        home.uninstall(check=True)
        shutil.rmtree(home.user_identity.parent, ignore_errors=True)
        home.run("git", "-C", str(home.repo), "reset", "-q", "--hard", "HEAD~2", check=True)


def test_without_sudo_the_fallback_installs_and_says_what_is_exposed(home):
    # With the NOPASSWD rule of Raspberry Pi OS: named once, with the remedy.
    res = home.install(check=True)
    assert res.stdout.count("can use sudo without a password") == 1, res.stdout
    assert "is root on this printer" in res.stdout and "NOPASSWD" in res.stdout
    SUDOERS.unlink()
    try:
        # sudo now wants a password and there is no terminal. Over an
        # installed helper install.sh stops rather than make a new key.
        res = home.install()
        assert res.returncode != 0
        assert "needs sudo to update it" in res.stderr and "from a terminal" in res.stderr
        assert owner(home.helper)[0] == HELPER_USER
        res = home.uninstall()
        assert res.returncode != 0 and "Nothing was changed" in res.stderr
        assert home.identity.exists()
        grant_sudo()
        home.uninstall(check=True)
        shutil.rmtree(home.user_identity.parent)
        SUDOERS.unlink()
        # On a printer without it, the fallback: today's layout, said so,
        # and a plain identity of an earlier install put in the envelope.
        home.run("mkdir", "-m", "700", "-p", str(home.user_identity.parent), check=True)
        plain = home.run(str(home.repo / "bin/encprint"), "keygen", "-plain", "-o",
                         str(home.user_identity), check=True).stdout.strip()
        assert b"\nAGE-SECRET-KEY-1" in home.user_identity.read_bytes()
        res = home.install(check=True)
        assert "now in an envelope that config readers refuse" in res.stdout
        assert home.user_identity.read_bytes().startswith(b"\xffencprint printer identity v1")
        assert home.run(str(home.repo / "bin/encprint"), "recipient", str(home.user_identity),
                        check=True).stdout.strip() == plain
        assert ("No privilege step: sudo needs a password and there is no terminal to type it on"
                in res.stdout)
        assert "can read\n    the key and decrypt every file" in res.stdout
        assert "Fix: make sudo work" in res.stdout
        assert "without a password" not in res.stdout
        assert not home.helper.exists() and user_gecos(HELPER_USER) is None
        assert home.user_identity.stat().st_mode & 0o777 == 0o600
        conf = (home.config / "moonraker.conf").read_text()
        assert f"identity: {home.user_identity}\n" in conf
        assert f"helper: {home.repo}/bin/encprint-helper\n" in conf
        k, m, ui = start_installed(home)
        try:
            assert ui.get("/server/encrypted_print/status")["result"]["identity"][
                "protected"] is False
            warnings = " ".join(ui.get("/server/info")["result"]["warnings"])
            assert "can read the key and decrypt every file" in warnings
        finally:
            stop(k, m, ui)
        home.uninstall(check=True)
        assert (home.config / "moonraker.conf").read_text() == home.moonraker_conf
    finally:
        grant_sudo()
        home.uninstall()
        shutil.rmtree(home.user_identity.parent, ignore_errors=True)


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
        subprocess.run(["chown", "-R", f"{home.uid}:{home.gid}", str(kalico), str(env)], check=True)
    res = home.install("--klipper", str(kalico), privileged=False, check=True)
    assert "extras in klippy/plugins" in res.stdout
    link = kalico / "klippy/plugins/encrypted_file_bridge.py"
    assert os.readlink(link) == str(home.repo / "klippy-extras/encrypted_file_bridge.py")
    assert "klippy/plugins/encrypted_file_bridge.py" in (kalico / ".git/info/exclude").read_text()
    kdir = home.home / "kalico-run"
    kdir.mkdir(exist_ok=True)
    os.chown(kdir, home.uid, home.gid)
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
    home.uninstall("--klipper", str(kalico), check=True)
    assert not link.exists()


def test_without_go_or_a_release_the_error_names_the_remedy(home):
    # No Go on PATH, and the checkout is not at a release tag.
    path = ":".join(d for d in os.environ["PATH"].split(":")
                    if not (pathlib.Path(d) / "go").exists())
    res = home.install(env={"PATH": path})
    assert res.returncode != 0
    assert "Go 1.24.0 or newer is needed" in res.stderr
    assert "release tag 'none'" in res.stderr
    assert f"run: {home.repo}/install.sh" in res.stderr
    home.uninstall()


def test_mainsail_link_is_added_beside_other_entries_and_removed_alone(home):
    theme = home.config / ".theme"
    navi = theme / "navi.json"
    theirs = ('[\n  {"title": "Spoolman", "href": "http://printer.local:7912",\n'
              '   "icon": "M3 3h18v18H3z", "position": 85}\n]\n')

    def write(text: str) -> None:
        theme.mkdir(exist_ok=True)
        navi.write_text(text)
        subprocess.run(["chown", "-R", f"{home.uid}:{home.gid}", str(theme)], check=True)

    # Beside an entry of someone else's: that entry stays as it was.
    write(theirs)
    res = home.install(privileged=False, check=True)
    assert "added the link" in res.stdout
    entries = json.loads(navi.read_text())
    assert entries[0] == json.loads(theirs)[0]
    assert entries[1]["href"] == "/server/encrypted_print/page"
    assert entries[1]["title"] == "Encrypted prints" and entries[1]["target"] == "_blank"
    assert entries[1]["icon"].startswith("M")  # an SVG path, as Mainsail draws icons
    installed = navi.read_text()
    res = home.install(privileged=False, check=True)
    assert "already has the link" in res.stdout and navi.read_text() == installed
    home.uninstall(check=True)
    assert navi.read_text() == theirs

    # No navi.json yet: install creates it, uninstall deletes it again.
    navi.unlink()
    theme.rmdir()
    res = home.install(privileged=False, check=True)
    assert "created navi.json" in res.stdout
    assert [e["href"] for e in json.loads(navi.read_text())] == ["/server/encrypted_print/page"]
    home.uninstall(check=True)
    assert not theme.exists()

    # A broken navi.json is left alone, and the install goes on.
    write("{not json")
    res = home.install(privileged=False, check=True)
    assert "not linked:" in res.stdout and "is not valid JSON" in res.stdout
    assert navi.read_text() == "{not json"
    home.uninstall(check=True)
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
    subprocess.run(["chown", "-R", f"{home.uid}:{home.gid}", str(releases)], check=True)
    path = ":".join(d for d in os.environ["PATH"].split(":")
                    if not (pathlib.Path(d) / "go").exists())
    env = {"PATH": path, "ENCPRINT_RELEASE_URL": f"file://{releases}"}
    home.run("git", "-C", str(home.repo), "tag", tag, check=True)
    try:
        shutil.rmtree(home.repo / "bin", ignore_errors=True)
        # The installed helper's paths cannot be moved in a release binary.
        res = home.install(env=env)
        assert res.returncode != 0
        assert "--system-root needs Go" in res.stderr and "compiled in" in res.stderr
        res = home.install(privileged=False, env=env, check=True)
        assert f"downloaded release {tag} for {arch}, checksums verified" in res.stdout
        for cmd in ("encprint-helper", "encprint"):
            assert (home.repo / "bin" / cmd).read_bytes() == (binaries / cmd).read_bytes()
        assert res.stdout.strip().splitlines()[-1].strip().startswith("age1")

        # A binary that is not the one SHA256SUMS names is refused.
        helper = rel / f"encprint-helper-linux-{arch}"
        helper.write_bytes(helper.read_bytes() + b"\0")
        shutil.rmtree(home.repo / "bin")
        res = home.install(privileged=False, env=env)
        assert res.returncode != 0
        assert f"checksum mismatch for the {tag} release binaries; do not use them" in res.stderr
        assert not (home.repo / "bin" / "encprint-helper").exists()
    finally:
        home.run("git", "-C", str(home.repo), "tag", "-d", tag)


def test_klipper_running_as_root_gets_the_fallback_and_is_told(home):
    """Creality K1-class images run Klipper and Moonraker as root: install.sh
    run as root, with a moonraker.conf of root's, installs the layout
    without the privilege step and says what it exposes. (The last test on the
    shared home: the checkouts become root's, as on such a printer, and are
    given back to the printer's user at the end.)"""
    (home.base / "gocache").mkdir(exist_ok=True)
    mine = [str(home.home), str(home.base / "gomod"), str(home.base / "gocache")]
    subprocess.run(["chown", "-R", "0:0", *mine], check=True)
    data = home.base / "root_printer_data"
    for sub in ("config", "logs", "gcodes", "database"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    (data / "config/moonraker.conf").write_text(home.moonraker_conf)
    (data / "config/printer.cfg").write_text(home.printer_cfg)
    identity = home.base / "root_identity/printer.key"
    args = ("--data", str(data), "--identity", str(identity))
    try:
        res = home.install(*args, user=False, check=True)
        assert ("No privilege step: Klipper and Moonraker run as root here, so no user on this "
                "printer is kept from the key") in res.stdout
        assert "Fix: run Klipper and Moonraker as a user of their own" in res.stdout
        assert "without a password" not in res.stdout
        assert recipient_of(res).startswith("age1")
        assert identity.stat().st_mode & 0o777 == 0o600
        assert f"identity: {identity}\n" in (data / "config/moonraker.conf").read_text()
        assert not home.helper.exists() and user_gecos(HELPER_USER) is None
        home.uninstall(*args, user=False, check=True)
        assert (data / "config/moonraker.conf").read_text() == home.moonraker_conf
        assert (data / "config/printer.cfg").read_text() == home.printer_cfg
    finally:
        subprocess.run(["chown", "-R", f"{home.uid}:{home.gid}", *mine], check=True)


def test_counts_export_reads_moonraker_database_and_skips_what_is_not_a_count(tmp_path):
    """scripts/moonraker_counts.py against a database laid out as Moonraker
    0.11's (namespace_store, an integer as b"q" and 8 bytes)."""
    import sqlite3
    import struct
    script = [str(ROOT / "scripts/moonraker_counts.py")]
    db = tmp_path / "moonraker-sql.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE namespace_store (namespace TEXT NOT NULL, key TEXT NOT NULL, "
                 "value record NOT NULL, PRIMARY KEY (namespace, key))")
    rows = [("encrypted_print", "ab" * 16, b"q" + struct.pack("q", 2)),
            ("encrypted_print", "cd" * 16, b"q" + struct.pack("q", 0)),
            ("encrypted_print", "not-a-file-id", b"q" + struct.pack("q", 9)),
            ("encrypted_print", "ef" * 16, b"s" + b"three"),
            ("encrypted_print_jobs", "12" * 16, b"q" + struct.pack("q", 5))]
    conn.executemany("INSERT INTO namespace_store VALUES (?, ?, ?)", rows)
    conn.commit()
    conn.close()
    res = subprocess.run(["python3", *script, str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"uid": os.getuid(), "counts": {"ab" * 16: 2}}
    assert "skipping 'not-a-file-id', not a print count" in res.stderr
    assert f"skipping '{'ef' * 16}'" in res.stderr
    # No database yet (a new printer): nothing to import.
    empty = tmp_path / "empty"
    empty.mkdir()
    res = subprocess.run(["python3", *script, str(empty)], capture_output=True, text=True)
    assert res.returncode == 0 and json.loads(res.stdout)["counts"] == {}
    # Moonraker's old LMDB database: the remedy, and no export.
    (empty / "data.mdb").write_bytes(b"\0" * 16)
    res = subprocess.run(["python3", *script, str(empty)], capture_output=True, text=True)
    assert res.returncode == 1 and res.stdout == ""
    assert "old (LMDB) database" in res.stderr and "start Moonraker once" in res.stderr


def test_policy_comes_from_moonraker_conf_and_a_bad_value_is_named(tmp_path):
    conf = tmp_path / "moonraker.conf"
    key1, key2 = "encprint-pub:" + "A" * 43, "encprint-pub:" + "B" * 43
    conf.write_text("[server]\nhost: 0.0.0.0\n\n[encrypted_print]\nhelper: /x\n"
                    f"require_signature: True  # signed only\ntrusted_publishers:\n  {key1}\n"
                    f"  {key2}\n")
    edit = ["python3", str(ROOT / "scripts/config_edit.py")]
    res = subprocess.run([*edit, "policy", str(conf)], capture_output=True, text=True, check=True)
    assert json.loads(res.stdout) == {"require_signature": True,
                                      "trusted_publishers": [key1, key2]}
    conf.write_text("[encrypted_print]\nrequire_signature: maybe\n")
    res = subprocess.run([*edit, "policy", str(conf)], capture_output=True, text=True)
    assert res.returncode == 1 and f"cannot read the trust options of {conf}" in res.stderr
