"""The whole system as a printer owner uses it: real Moonraker with the
encrypted_print component, real klippy with encrypted_file_bridge, the real
helper, and a client that talks like Mainsail and Fluidd."""
from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import time

import pytest
from conftest import Keys
from gcodegen import new_canary, sample_gcode
from stack import HTTPError, Stack, files_holding, wait_for


def parent_of(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def all_memfds(roots: tuple = ()) -> list:
    """Every encprint memfd held by the given processes and their children
    (all processes on the machine if none are given)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        if roots and int(pid) not in roots and parent_of(pid) not in roots:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("/memfd:encprint-"):
                out.append((int(pid), link))
    return out


def assert_no_canary(root: pathlib.Path, canary: str) -> None:
    """No file under the stack (data folder, logs, database, .thumbs) nor in
    the system temp folder holds the canary."""
    needle = canary.encode()
    found = files_holding(lambda data: needle in data, root,
                          pathlib.Path(tempfile.gettempdir()))
    assert not found, f"cleartext canary found in {found}"


class EncStack(Stack):
    def __init__(self, root: pathlib.Path, keys: Keys, moonraker_extra: str = "") -> None:
        self.keys = keys
        super().__init__(
            root, printer_cfg="[encrypted_file_bridge]\n",
            moonraker_cfg=(f"[encrypted_print]\nhelper: {keys.bin / 'encprint-helper'}\n"
                           f"identity: {keys.identity}\n" + moonraker_extra))

    def start(self, env=None) -> EncStack:
        super().start(env)
        # /server/info says "ready" before the klippy_ready handlers ran; the
        # component reports when its own ready checks are done.
        wait_for(lambda: self.ui.get("/server/encrypted_print/status")["result"]["ready"],
                 20, "the component's ready checks")
        return self

    def upload_encrypted(self, name: str, plain: bytes, *flags: str, print_: bool = False,
                         **kw) -> dict:
        return self.ui.upload(name, self.keys.encrypt(plain, *flags), print_=print_, **kw)

    def start_long_print(self, name: str, moves: int = 1_000_000) -> None:
        """Upload and start an encrypted file long enough (debug-output
        klippy prints at CPU speed) to act on while it prints."""
        self.upload_encrypted(name, b"G1 X10 Y10 F6000\nG1 X20 Y20 F6000\n" * moves)
        self.ui.start_print(name)
        self.wait_state("printing")

    def metadata(self, name: str) -> dict:
        return self.ui.get("/server/files/metadata", filename=name)["result"]

    def jobs(self) -> list:
        return self.ui.get("/server/encrypted_print/jobs")["result"]["jobs"]

    def memfds(self) -> list:
        return all_memfds((self.klippy.pid, self.moonraker.pid))

    def wait_released(self) -> None:
        wait_for(lambda: self.memfds() == [], 10, "klippy and Moonraker (and the helper) "
                 f"to release every memfd: {self.memfds()}")

    def refused_while_stopped(self, name: str) -> str:
        with pytest.raises(HTTPError) as ei:
            self.ui.start_print(name)
        return ei.value.message

    def refused(self, name: str) -> str:
        with pytest.raises(HTTPError) as ei:
            self.ui.start_print(name)
        assert self.klippy.state() == "ready"
        assert self.ui.query("print_stats")["print_stats"]["state"] != "printing"
        return ei.value.message


@pytest.fixture
def make_stack(request, binaries, tmp_path):
    stacks = []

    def make(moonraker_extra: str = "", keys: Keys = None) -> EncStack:
        keys = keys or Keys(binaries, tmp_path / "keys")
        st = EncStack(tmp_path / f"stack{len(stacks)}", keys, moonraker_extra)
        request.node._encprint_stack = st
        stacks.append(st)
        return st.start()

    yield make
    for st in stacks:
        st.stop()


@pytest.fixture
def stack(make_stack) -> EncStack:
    return make_stack()


def test_mainsail_upload_shows_metadata_prints_and_reprints(stack):
    canary = new_canary()
    plain = sample_gcode(layers=15, canary=canary)
    stack.upload_encrypted("part.enc.gcode", plain)
    md = stack.metadata("part.enc.gcode")
    # The UI shows what Moonraker shows for the same G-code uploaded in clear.
    stack.ui.upload("clear-copy.gcode", sample_gcode(layers=15))  # its own canary
    clear = stack.metadata("clear-copy.gcode")
    for key in ("slicer", "slicer_version", "estimated_time", "filament_total",
                "filament_weight_total", "filament_type", "layer_height",
                "first_layer_height", "nozzle_diameter", "object_height"):
        assert md.get(key) == clear.get(key), f"{key}: {md.get(key)!r} != {clear.get(key)!r}"
    assert md["estimated_time"] == 754 and md["slicer"] == "PrusaSlicer"
    (stack.gcodes / "clear-copy.gcode").unlink()
    assert md["encrypted_print"]["authenticated"] is True
    # The cleartext's offsets, not what Moonraker guessed from the ciphertext.
    assert md["gcode_start_byte"] == clear["gcode_start_byte"]
    assert md["gcode_end_byte"] == clear["gcode_end_byte"]
    sizes = sorted((t["width"], t["height"]) for t in md["thumbnails"])
    assert sizes == [(32, 32), (300, 300)]
    for t in md["thumbnails"]:
        png = stack.gcodes / t["relative_path"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size == t["size"]
    listed = stack.ui.get("/server/files/list")["result"]
    assert any(f["path"] == "part.enc.gcode" for f in listed)

    stack.ui.start_print("part.enc.gcode")
    stack.wait_state("complete")
    ps = stack.ui.query("print_stats")["print_stats"]
    assert ps["filename"] == "part.enc.gcode" and ps["info"]["total_layer"] == 15
    stack.wait_released()

    def history():
        jobs = stack.ui.get("/server/history/list")["result"]["jobs"]
        return jobs and jobs[0]["status"] == "completed" and jobs[0]
    job = wait_for(history, 10, "the job in history")
    assert job["filename"] == "part.enc.gcode" and job["exists"] is True
    assert job["metadata"]["slicer"] == "PrusaSlicer"

    # Reprint, as the history's reprint button does.
    stack.ui.start_print("part.enc.gcode")
    stack.wait_state("printing", "complete")
    stack.wait_state("complete")
    stack.wait_released()
    wait_for(lambda: len([j for j in stack.jobs() if j["result"] == "complete"]) == 2, 10,
             "two completed audit records")
    rec = stack.jobs()[0]
    assert rec["filename"] == "part.enc.gcode" and rec["print_number"] == 2
    # encprint's default: compressed, unsigned, so no serial SHA-256 at all
    assert rec["sha256"] is None and rec["size"] == len(plain) and rec["memfd_size"] < len(plain)
    assert_no_canary(stack.root, canary)


def test_upload_with_print_true_starts_the_print(stack):
    res = stack.upload_encrypted("now.gcode", sample_gcode(layers=5), print_=True)
    assert res["print_started"] is True
    stack.wait_state("complete")
    stack.wait_released()


def test_slicer_upload_through_octoprint_api_prints(stack):
    data = stack.keys.encrypt(sample_gcode(layers=5))
    res = stack.ui.upload("slicer.gcode", data, print_=True, endpoint="/api/files/local")
    assert res["print_started"] is True
    stack.wait_state("complete")
    assert stack.ui.query("print_stats")["print_stats"]["filename"] == "slicer.gcode"


def test_job_queue_prints_encrypted_files(stack):
    stack.upload_encrypted("q1.gcode", sample_gcode(layers=3))
    stack.upload_encrypted("q2.gcode", sample_gcode(layers=4))
    stack.ui.post("/server/job_queue/job", {"filenames": ["q1.gcode", "q2.gcode"]})
    stack.ui.post("/server/job_queue/start")

    def both_done():
        recs = [j for j in stack.jobs() if j["result"] == "complete"]
        return sorted(j["filename"] for j in recs) == ["q1.gcode", "q2.gcode"]
    wait_for(both_done, 60, "both queued jobs to complete")
    stack.wait_released()


def test_console_sdcard_print_file_goes_through_moonraker(stack):
    stack.upload_encrypted("console.gcode", sample_gcode(layers=4))
    stack.ui.gcode('SDCARD_PRINT_FILE FILENAME="console.gcode"')  # waits, as a clear file
    stack.wait_state("complete")
    assert stack.ui.query("print_stats")["print_stats"]["filename"] == "console.gcode"
    stack.wait_released()


def test_m23_selects_then_m24_prints(stack):
    stack.upload_encrypted("sel.gcode", sample_gcode(layers=3))
    stack.ui.gcode("M23 sel.gcode")
    wait_for(lambda: stack.ui.query("virtual_sdcard")["virtual_sdcard"]["file_path"], 10,
             "the file to be selected")
    stack.ui.gcode("M24")
    stack.wait_state("complete")
    stack.wait_released()


def test_pause_resume_cancel(stack):
    stack.start_long_print("long.gcode")
    stack.pause_resume_cancel()
    stack.wait_released()
    wait_for(lambda: stack.jobs()[0]["result"] == "cancelled", 10, "the audit record")


def test_policies_and_bad_files_are_refused_clearly(stack):
    g = sample_gcode(layers=2)
    other = stack.keys.other()
    stack.upload_encrypted("once.gcode", g, "--max-prints", "1")
    stack.upload_encrypted("later.gcode", g, "--not-before", "2099-01-01")
    stack.upload_encrypted("old.gcode", g, "--not-after", "2020-01-01")
    stack.ui.upload("theirs.gcode", other.encrypt(g))
    data = bytearray(stack.keys.encrypt(g))
    data[-10] ^= 1
    stack.ui.upload("tampered.gcode", bytes(data))

    stack.ui.start_print("once.gcode")
    stack.wait_state("complete")
    stack.wait_released()
    assert ("may be printed only once, and it has been printed already"
            in stack.refused("once.gcode"))
    assert "may not be printed before 2099-01-01" in stack.refused("later.gcode")
    assert "expired on 2020-01-01" in stack.refused("old.gcode")
    assert "encrypted for other printers, not this one" in stack.refused("theirs.gcode")
    assert "incomplete or has extra bytes" in stack.refused("tampered.gcode")
    md = stack.metadata("theirs.gcode")
    assert md["encrypted_print"]["authenticated"] is False
    assert md["encrypted_print"]["reason_code"] == "wrong_identity"
    assert "expired" in stack.metadata("old.gcode")["encrypted_print"]["reason"]
    errors = stack.ui.seen("notify_encrypted_print_error")
    assert len(errors) >= 5
    assert stack.memfds() == []


def test_signature_policy(make_stack, binaries, tmp_path):
    keys = Keys(binaries, tmp_path / "keys")
    pub = keys.encprint("sign-keygen", "-o", str(tmp_path / "pub.key")).strip()
    untrusted = tmp_path / "untrusted.key"
    keys.encprint("sign-keygen", "-o", str(untrusted))
    st = make_stack(f"require_signature: True\ntrusted_publishers:\n  {pub}\n", keys)
    g = sample_gcode(layers=2)
    st.upload_encrypted("signed.gcode", g, "--sign", str(tmp_path / "pub.key"))
    st.upload_encrypted("unsigned.gcode", g)
    st.upload_encrypted("stranger.gcode", g, "--sign", str(untrusted))
    assert "is not signed" in st.refused("unsigned.gcode")
    assert "not among this printer's trusted_publishers" in st.refused("stranger.gcode")
    st.ui.start_print("signed.gcode")
    st.wait_state("complete")
    assert st.jobs()[0]["publisher"] == pub


def test_status_and_recipient_endpoints(stack):
    rec = stack.ui.get("/server/encrypted_print/recipient")["result"]
    assert rec["recipient"] == stack.keys.recipient
    status = stack.ui.get("/server/encrypted_print/status")["result"]
    assert status["bridge_loaded"] is True and status["problems"] == {}
    assert status["helper"]["ok"] and status["identity"]["ok"]
    # Not installed set-user-ID: the key is exposed, and the UI says so.
    assert status["identity"]["protected"] is False
    warnings = stack.ui.get("/server/info")["result"]["warnings"]
    assert any("can read the key and decrypt every file" in w and "docs/install.md" in w
               for w in warnings), warnings
    # Also reachable over the websocket, as JSON-RPC.
    assert stack.ui.rpc("server.encrypted_print.recipient")["recipient"] == stack.keys.recipient


def test_missing_identity_and_missing_bridge_leave_one_clear_warning_each(binaries, tmp_path,
                                                                           request):
    keys = Keys(binaries, tmp_path / "keys")
    st = Stack(tmp_path / "s", printer_cfg="",
               moonraker_cfg=(f"[encrypted_print]\nhelper: {binaries / 'encprint-helper'}\n"
                              f"identity: {tmp_path / 'missing.key'}\n"))
    request.node._encprint_stack = st
    try:
        st.start()
        warnings = wait_for(lambda: [w for w in st.ui.get("/server/info")["result"]["warnings"]
                                     if "encrypted_print" in w and "set-user-ID" not in w] if any(
            "encrypted_file_bridge" in w for w in st.ui.get("/server/info")["result"]["warnings"]
        ) else None, 10, "the warnings")
        assert len(warnings) == 2, warnings
        assert any("no printer identity at" in w and "encprint keygen" in w for w in warnings)
        assert any("no [encrypted_file_bridge]" in w for w in warnings)
        st.ui.upload("x.gcode", keys.encrypt(b"G1 X1\n"))
        with pytest.raises(HTTPError) as ei:
            st.ui.start_print("x.gcode")
        assert "no printer identity" in ei.value.message
        assert st.klippy.state() == "ready"
    finally:
        st.stop()


def test_moonraker_restart_mid_print(stack):
    stack.start_long_print("long.gcode", 600_000)
    pid = stack.moonraker.pid
    stack.ui.post("/server/restart")
    # The restart is in-process: same PID; the component's fd is closed.
    wait_for(lambda: not any(p == pid for p, _ in all_memfds()), 20,
             "Moonraker to close its copy of the memfd")
    stack.ui.close()
    stack.moonraker.wait_ready()
    stack.ui.connect_ws()
    assert stack.moonraker.pid == pid
    stack.wait_state("complete", timeout=120)
    stack.wait_released()
    wait_for(lambda: stack.jobs()[0]["result"] == "complete", 10,
             f"the audit record to say complete: {stack.jobs()[:1]}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_audit_record_says_complete_after_moonraker_was_stopped_mid_print(stack, sig):
    stack.start_long_print("long.gcode", 600_000)
    stack.moonraker.proc.send_signal(sig)
    stack.moonraker.proc.wait(20)
    stack.ui.close()
    stack.moonraker.start()
    stack.ui.connect_ws()
    stack.wait_state("complete", timeout=120)
    wait_for(lambda: stack.jobs()[0]["result"] == "complete", 15,
             f"the audit record to say complete: {stack.jobs()[:1]}")
    assert len(stack.jobs()) == 1
    stack.wait_released()


def test_klipper_restart_mid_print_releases_and_next_print_works(stack):
    stack.start_long_print("long.gcode")
    stack.ui.post("/printer/firmware_restart")
    stack.moonraker.wait_ready()
    stack.wait_released()
    stack.upload_encrypted("next.gcode", sample_gcode(layers=3))
    stack.ui.start_print("next.gcode")
    stack.wait_state("complete")
    assert stack.ui.query("print_stats")["print_stats"]["filename"] == "next.gcode"


def rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_a_hundred_prints_in_a_row_leak_nothing(stack):
    canary = new_canary()
    stack.upload_encrypted("soak.gcode", sample_gcode(layers=3, canary=canary))
    procs = {"moonraker": stack.moonraker.pid, "klippy": stack.klippy.pid}

    def done() -> bool:
        st = stack.ui.get("/server/encrypted_print/status")["result"]
        return st["active_job"] is None and stack.ui.print_state() == "complete"

    def one() -> None:
        stack.ui.start_print("soak.gcode")
        wait_for(done, 30, "the print to end")

    def measure() -> dict:
        return {name: (len(os.listdir(f"/proc/{pid}/fd")), rss_kb(pid))
                for name, pid in procs.items()}
    for _ in range(5):  # warm up caches and pools
        one()
    stack.wait_released()
    start = measure()
    for _ in range(100):
        one()
    stack.wait_released()
    end = measure()
    for name in procs:
        (fds0, rss0), (fds1, rss1) = start[name], end[name]
        assert fds1 <= fds0, f"{name}'s descriptors went from {fds0} to {fds1}"
        assert rss1 < rss0 + 8 * 1024, f"{name}'s RSS went from {rss0} to {rss1} KiB"
    assert stack.memfds() == []
    assert len([j for j in stack.jobs() if j["result"] == "complete"]) == 105
    assert_no_canary(stack.root, canary)


def test_large_file_shows_progress_and_does_not_block_moonraker(stack):
    """About 400 MiB of G-code: decryption takes a while; the UI sees
    progress notifications and the display message, and Moonraker keeps
    answering meanwhile."""
    import threading
    line = b"G1 X12.345 Y67.890 F3000 ; padding to make a long file\n"
    plain = line * (400 * 1024 * 1024 // len(line))
    # Uncompressed: this repeated line would compress a thousandfold.
    (stack.gcodes / "huge.gcode").write_bytes(stack.keys.encrypt(plain, "--no-compress"))
    del plain
    wait_for(lambda: stack.metadata("huge.gcode").get("encrypted_print"), 30, "the metadata")
    answered = []
    done = threading.Event()

    def poll():
        while not done.is_set():
            t = time.monotonic()
            stack.ui.get("/server/info")
            answered.append((t, time.monotonic() - t))
            time.sleep(0.02)
    th = threading.Thread(target=poll, daemon=True)
    th.start()
    t0 = time.monotonic()
    stack.ui.start_print("huge.gcode")
    t1 = time.monotonic()
    done.set()
    th.join()
    during = [lat for t, lat in answered if t0 < t < t1]
    assert len(during) >= 3, f"Moonraker answered {len(during)} times in {t1 - t0:.2f} s"
    assert max(during) < 0.5, f"slowest answer during the decrypt: {max(during):.2f} s"
    progress = stack.ui.seen("notify_encrypted_print_progress")
    assert progress, "no progress notification"
    last = progress[-1]["params"][0]
    assert last["filename"] == "huge.gcode"
    assert last["total"] == 400 * 1024 * 1024 // len(line) * len(line)
    messages = [n["params"][0]["display_status"].get("message")
                for n in stack.ui.seen("notify_status_update")
                if "display_status" in n["params"][0]]
    assert any(m and m.startswith("Decrypting") for m in messages), messages
    stack.ui.post("/printer/print/cancel")
    stack.wait_state("cancelled")
    stack.wait_released()


def test_upload_over_the_file_being_printed_is_refused(stack):
    line = "G1 X10 Y10 F6000\nG1 X20 Y20 F6000\n"
    data = stack.keys.encrypt((line * 800_000).encode())
    stack.ui.upload("busy.gcode", data)
    before = sha256(stack.gcodes / "busy.gcode")
    stack.ui.start_print("busy.gcode")
    stack.wait_state("printing")
    with pytest.raises(HTTPError) as ei:
        stack.ui.upload("busy.gcode", stack.keys.encrypt(sample_gcode(layers=2)))
    assert ei.value.status == 403
    assert sha256(stack.gcodes / "busy.gcode") == before
    stack.ui.post("/printer/print/cancel")
    stack.wait_state("cancelled")
    stack.wait_released()
    assert stack.memfds() == []


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_unsafe_settings_get_a_warning_each(make_stack, binaries, tmp_path):
    keys = Keys(binaries, tmp_path / "keys")
    keys.identity.chmod(0o644)
    st = make_stack("[file_manager]\nenable_object_processing: True\n", keys)
    warnings = [w for w in st.ui.get("/server/info")["result"]["warnings"]
                if "encrypted_print" in w and "set-user-ID" not in w]
    assert any("readable by others (mode 0644)" in w and "chmod 600" in w for w in warnings)
    assert any("enable_object_processing is on" in w for w in warnings)
    assert len(warnings) == 2, warnings
    st.upload_encrypted("x.gcode", sample_gcode(layers=1))
    assert "readable by others" in st.refused("x.gcode")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file to another user")
def test_identity_of_another_user_gets_a_warning(make_stack, binaries, tmp_path):
    keys = Keys(binaries, tmp_path / "keys")
    os.chown(keys.identity, 65534, 65534)
    st = make_stack("", keys)
    warnings = [w for w in st.ui.get("/server/info")["result"]["warnings"]
                if "encrypted_print" in w]
    assert any("belongs to uid 65534, not to Moonraker's user" in w for w in warnings), warnings


def test_unresponsive_klipper_refuses_in_time_and_leaks_nothing(make_stack):
    import signal
    st = make_stack("klipper_timeout: 2\n")
    st.upload_encrypted("stuck.gcode", sample_gcode(layers=2))
    os.kill(st.klippy.pid, signal.SIGSTOP)
    try:
        t = time.monotonic()
        message = st.refused_while_stopped("stuck.gcode")
        assert time.monotonic() - t < 10
        assert "Klipper did not answer within 2 s" in message
        assert st.memfds() == []
    finally:
        os.kill(st.klippy.pid, signal.SIGCONT)
    wait_for(lambda: st.klippy.state() == "ready", 10, "klippy to go on")
    st.ui.start_print("stuck.gcode")
    st.wait_state("complete")
    st.wait_released()


def vm_locked_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmLck:"):
            return int(line.split()[1])
    return 0


def test_mlock_keeps_the_cleartext_locked_for_the_print(make_stack):
    st = make_stack("swap_protection: mlock\n")
    st.start_long_print("locked.gcode", 1_000_000)   # 34 MB of G-code, compressed
    # What is locked is the memfd: the compressed payload Klipper reads.
    size_kib = st.jobs()[0]["memfd_size"] // 1024
    assert size_kib > 0 and vm_locked_kib(st.moonraker.pid) >= size_kib
    st.ui.post("/printer/print/cancel")
    st.wait_state("cancelled")
    st.wait_released()
    assert vm_locked_kib(st.moonraker.pid) == 0


@pytest.mark.skipif(shutil.which("prlimit") is None or shutil.which("setpriv") is None,
                    reason="needs prlimit and setpriv")
def test_mlock_beyond_the_limit_is_refused_with_the_remedy(binaries, tmp_path, request):
    keys = Keys(binaries, tmp_path / "keys")
    st = EncStack(tmp_path / "s", keys, "swap_protection: mlock\n")
    # As a service with the default LimitMEMLOCK and without CAP_IPC_LOCK.
    st.moonraker.prefix = ["setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock",
                           "prlimit", "--memlock=65536:65536", "--"]
    request.node._encprint_stack = st
    try:
        st.start()
        # Uncompressed, so that the memfd exceeds the 64 KiB Moonraker may lock.
        st.upload_encrypted("big.gcode", sample_gcode(layers=100), "--no-compress")
        message = st.refused("big.gcode")
        assert "cannot lock" in message and "LimitMEMLOCK=infinity" in message
        assert "Moonraker may lock 64 KiB" in message
        assert st.memfds() == []
    finally:
        st.stop()


def can_mount() -> bool:
    if os.geteuid() != 0:
        return False
    probe = pathlib.Path(tempfile.mkdtemp(prefix="encprint-mount-"))
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                        capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(probe)])
    probe.rmdir()
    return ok


@pytest.mark.skipif(not can_mount(), reason="needs to mount a small tmpfs (root)")
def test_upload_onto_a_nearly_full_disk(binaries, tmp_path, request):
    keys = Keys(binaries, tmp_path / "keys")
    st = EncStack(tmp_path / "s", keys)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(st.gcodes)],
                   check=True)
    request.node._encprint_stack = st
    try:
        st.start()
        st.upload_encrypted("first.gcode", sample_gcode(layers=5))
        before = sha256(st.gcodes / "first.gcode")
        big = b"G1 X10 Y10 F6000 ; filling the disk\n" * 100_000  # 3.6 MB
        with pytest.raises(HTTPError) as ei:
            st.upload_encrypted("big.gcode", big, "--no-compress")  # compressed it would fit
        # Moonraker's own upload path fails (a bare 500: upstream behaviour).
        assert ei.value.status == 500
        partial = st.gcodes / "big.gcode"
        if partial.exists():  # whatever Moonraker left is refused, never printed
            assert "incomplete" in st.refused("big.gcode")
        assert st.klippy.state() == "ready"
        assert sha256(st.gcodes / "first.gcode") == before
        st.ui.start_print("first.gcode")
        st.wait_state("complete")
        st.wait_released()
    finally:
        st.stop()
        subprocess.run(["umount", str(st.gcodes)])


def test_a_crafted_file_name_cannot_inject_gcode_through_error_messages(stack):
    """The refusal is echoed to the console with RESPOND; a name holding a
    newline must not become a G-code line of its own (here: M112)."""
    evil = "a\nM112\nb.gcode"
    (stack.gcodes / evil).write_bytes(stack.keys.encrypt(sample_gcode(layers=2)))
    stack.start_long_print("long.gcode")
    with pytest.raises(HTTPError) as ei:
        stack.ui.start_print(evil)       # refused: another file is printing
    assert "still printing" in ei.value.message or "';', '#' or '*'" in ei.value.message
    time.sleep(1.0)  # the RESPOND echo is sent asynchronously
    assert stack.klippy.state() == "ready", "a G-code line was injected"
    stack.ui.post("/printer/print/cancel")
    stack.wait_state("cancelled")
    stack.wait_released()


def test_refusal_keeps_its_text_for_any_file_name(stack):
    name = "零件 <v2>.gcode"
    stack.ui.upload(name, stack.keys.other().encrypt(sample_gcode(layers=2)))
    msg = stack.refused(name)
    assert "encrypted for other printers, not this one" in msg, msg
    assert "\\u96f6\\u4ef6 \\x3cv2>.gcode" in msg, msg
    # The websocket notification carries the name as it is.
    errors = stack.ui.seen("notify_encrypted_print_error")
    assert any(name in e["params"][0]["message"] for e in errors), errors
