"""The real encprint-helper through the component's client: real memfds,
real SCM_RIGHTS, real /proc, under the default asyncio loop and uvloop."""
from __future__ import annotations

import asyncio
import base64
import gzip
import importlib
import json
import os
import pathlib
import shutil
import signal
import socket
import struct
import subprocess
import sys

import pytest
from conftest import ROOT, Keys, open_fds
from gcodegen import new_canary, sample_gcode

CONTRACT = json.loads((ROOT / "proto" / "contract.json").read_text())


@pytest.fixture(scope="session")
def ep(binaries):
    return importlib.import_module("moonraker.components.encrypted_print")


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    if request.param == "uvloop":
        import uvloop

        async def spawn_once() -> None:
            proc = await asyncio.create_subprocess_exec("true")
            await proc.wait()
        # uvloop keeps a process-wide pipe pair from its first child process
        # on; create it before tests count descriptors.
        uvloop.run(spawn_once())
        return uvloop.run
    return asyncio.run


@pytest.fixture
def gcodes(tmp_path) -> pathlib.Path:
    d = tmp_path / "gcodes"
    d.mkdir()
    return d


@pytest.fixture
def client(ep, keys, binaries):
    return ep.HelperClient(str(binaries / "encprint-helper"), str(keys.identity))


def put(gcodes: pathlib.Path, name: str, data: bytes) -> pathlib.Path:
    p = gcodes / name
    p.write_bytes(data)
    return p


SEEKGZ_MAGIC = bytes.fromhex(CONTRACT["payload"]["seekgz_magic"])


@pytest.mark.parametrize("flags", [(), ("--no-compress",)], ids=["compressed", "plain"])
def test_decrypt_gives_a_sealed_memfd_with_the_original_content(ep, client, keys, gcodes, run,
                                                                flags):
    """encprint's default payload is a seekable gzip: the memfd holds it
    verbatim (the Klipper extra inflates it), gcode_size is the G-code's."""
    plain = sample_gcode(layers=30)
    path = put(gcodes, "part.gcode", keys.encrypt(plain, *flags))
    df = run(client.decrypt(str(path), str(gcodes)))
    try:
        content = os.pread(df.fd, df.size + 10, 0)
        assert len(content) == df.size and df.gcode_size == len(plain)
        if flags:
            assert content == plain
        else:
            assert content.startswith(SEEKGZ_MAGIC) and df.size < len(plain) // 4
            assert gzip.decompress(content) == plain  # concatenated members, as gunzip reads them
        assert df.sha256 is None  # unsigned: age's AEAD alone, no serial SHA-256
        assert df.seals & ep.ALL_SEALS == ep.ALL_SEALS
        assert os.get_inheritable(df.fd) is False, "received fd must be close-on-exec"
        # Through our own descriptor...
        for attempt in (lambda: os.pwrite(df.fd, b"X", 0),
                        lambda: os.ftruncate(df.fd, 1),
                        lambda: os.ftruncate(df.fd, df.size + 1),
                        lambda: os.fchmod(df.fd, 0o777)):
            with pytest.raises(PermissionError):
                attempt()
        # ...and through a read-write reopen via /proc, as any same-uid process could.
        rw = os.open(f"/proc/{os.getpid()}/fd/{df.fd}", os.O_RDWR)
        try:
            for attempt in (lambda: os.write(rw, b"X"), lambda: os.ftruncate(rw, 0)):
                with pytest.raises(PermissionError):
                    attempt()
        finally:
            os.close(rw)
        assert os.pread(df.fd, df.size, 0) == content
    finally:
        df.close()


def test_another_process_reads_the_memfd_through_proc_from_offset_zero(client, keys, gcodes, run):
    plain = sample_gcode(layers=5)
    path = put(gcodes, "part.gcode", keys.encrypt(plain))
    df = run(client.decrypt(str(path), str(gcodes)))
    try:
        code = ("import sys; f=open(sys.argv[1],'rb'); sys.stdout.buffer.write(f.read())")
        out = subprocess.run([sys.executable, "-c", code, f"/proc/{os.getpid()}/fd/{df.fd}"],
                             capture_output=True, check=True).stdout
        assert gzip.decompress(out) == plain
        # The reader had its own open file description: our offset did not move.
        assert os.lseek(df.fd, 0, os.SEEK_CUR) == 0
    finally:
        df.close()


def test_inspect_reports_authenticated_metadata_and_policy(client, keys, gcodes, run):
    path = put(gcodes, "part.gcode", keys.encrypt(sample_gcode(), "--max-prints", "2",
                                                  "--no-compress"))
    res = run(client.inspect(str(path), str(gcodes)))
    assert res["authenticated"] is True
    assert res["metadata"]["slicer"] == "PrusaSlicer"
    assert res["metadata"]["estimated_time"] == 754
    assert [t["width"] for t in res["metadata"]["thumbnails"]] == [32, 300]
    assert res["policy"]["max_prints"] == 2
    assert len(res["file_id"]) == 16
    assert res["plaintext_size"] == len(sample_gcode())


def test_inspect_of_a_file_for_other_printers_lists_it_with_the_reason(client, keys, gcodes, run):
    other = keys.other()
    path = put(gcodes, "theirs.gcode", other.encrypt(sample_gcode()))
    res = run(client.inspect(str(path), str(gcodes)))
    assert res["authenticated"] is False
    assert res["reason_code"] == "wrong_identity"
    assert "not this one" in res["reason"]
    assert res["metadata"]["slicer"] == "PrusaSlicer"  # public metadata still shown


def test_two_hundred_decrypts_leak_no_fd_and_no_process(client, keys, gcodes, run):
    path = put(gcodes, "part.gcode", keys.encrypt(sample_gcode(layers=2)))

    async def many() -> None:
        for _ in range(200):
            df = await client.decrypt(str(path), str(gcodes))
            df.close()

    before = open_fds()
    run(many())
    assert open_fds() == before
    children = subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True,
                              text=True).stdout.split()
    assert children == [], f"helper processes left: {children}"


def tamper(data: bytes, what: str) -> bytes:
    b = bytearray(data)
    hdr_end = data.index(b"\n--- ") + 1
    mac_end = data.index(b"\n", hdr_end) + 1
    if what == "header":
        stanza = b"-> encprint/policy v1\n"
        i = data.index(stanza) + len(stanza) + 20  # inside the file id
        b[i] = ord("A") if b[i] != ord("A") else ord("B")
    elif what == "chunk":
        b[mac_end + 16 + 100] ^= 1
    elif what == "truncated":
        return bytes(b[:mac_end + 16 + 65536 + 16])
    return bytes(b)


@pytest.mark.parametrize("case,code,words", [
    ("plain", "not_encrypted", "is not an encrypted G-code file"),
    ("wrong_key", "wrong_identity", "encrypted for other printers"),
    ("header", "header_auth_failed", "header or metadata was altered"),
    ("chunk", "payload_corrupt", "payload chunk 0"),
    ("truncated", "truncated", "incomplete"),
    ("budget", "too_large", "more than the"),
    ("missing", "not_found", "does not exist"),
    ("directory", "not_a_file", "not a regular file"),
    ("outside", "outside_root", "outside the gcodes folder"),
    ("no_identity", "identity_error", "encprint keygen"),
    ("fifo", "not_a_file", "not a regular file (a FIFO)"),
    ("armored", "malformed_header", "re-encrypt it without -a/--armor"),
    ("expired", "expired", "expired on 2020-01-01 00:00:00 UTC"),
    ("not_yet_valid", "not_yet_valid", "may not be printed before 2999-01-01 00:00:00 UTC"),
])
def test_bad_input_gets_a_specific_error(ep, binaries, client, keys, gcodes, tmp_path, run,
                                         case, code, words):
    plain = sample_gcode(layers=120)  # > 2 chunks
    data = keys.encrypt(plain, "--no-compress")  # chunk numbers of the G-code itself
    name = f"{case}.gcode"
    kwargs = {}
    if case == "plain":
        put(gcodes, name, sample_gcode(layers=2))  # a cleartext of its own
    elif case == "wrong_key":
        put(gcodes, name, keys.other().encrypt(plain))
    elif case in ("header", "chunk", "truncated"):
        put(gcodes, name, tamper(data, case))
    elif case == "budget":
        put(gcodes, name, data)
        kwargs["max_bytes"] = 1000
    elif case == "directory":
        (gcodes / name).mkdir()
    elif case == "outside":
        outside = put(tmp_path, "outside.gcode", data)
        (gcodes / name).symlink_to(outside)
    elif case == "fifo":
        os.mkfifo(gcodes / name)  # opening it must not wait for a writer
    elif case == "armored":
        b64 = base64.b64encode(data).decode()
        put(gcodes, name, ("-----BEGIN AGE ENCRYPTED FILE-----\n"
                           + "".join(b64[i:i + 64] + "\n" for i in range(0, len(b64), 64))
                           + "-----END AGE ENCRYPTED FILE-----\n").encode())
    elif case == "expired":
        put(gcodes, name, keys.encrypt(plain, "--not-after", "2020-01-01"))
    elif case == "not_yet_valid":
        put(gcodes, name, keys.encrypt(plain, "--not-before", "2999-01-01"))
    elif case == "no_identity":
        put(gcodes, name, data)
        client = ep.HelperClient(str(binaries / "encprint-helper"), str(tmp_path / "nope.key"))
    before = open_fds()
    with pytest.raises(ep.HelperError) as ei:
        run(client.decrypt(str(gcodes / name), str(gcodes), **kwargs))
    assert ei.value.code == code, ei.value.message
    assert words in ei.value.message
    assert name in ei.value.message or case in ("outside", "no_identity")
    assert open_fds() == before


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="needs setpriv")
def test_unreadable_file_is_reported(ep, binaries, keys, run):
    """Root reads every file, so as root the helper runs as nobody (as the
    Moonraker user would), from a folder nobody may enter."""
    import tempfile
    base = pathlib.Path(tempfile.mkdtemp(prefix="encprint-unreadable-"))
    try:
        base.chmod(0o755)
        gcodes = base / "gcodes"
        gcodes.mkdir(mode=0o755)
        put(gcodes, "locked.gcode", keys.encrypt(b"G1 X1\n")).chmod(0o000)
        identity = base / "printer.key"
        shutil.copy(keys.identity, identity)
        helper = binaries / "encprint-helper"
        if os.geteuid() == 0:
            identity.chmod(0o644)
            wrapper = base / "helper-as-nobody"
            wrapper.write_text("#!/bin/sh\nexec setpriv --reuid=65534 --regid=65534 "
                               f"--clear-groups {helper} \"$@\"\n")
            wrapper.chmod(0o755)
            helper = wrapper
        client = ep.HelperClient(str(helper), str(identity))
        with pytest.raises(ep.HelperError) as ei:
            run(client.decrypt(str(gcodes / "locked.gcode"), str(gcodes)))
        assert ei.value.code == "unreadable" and "locked.gcode" in ei.value.message
    finally:
        shutil.rmtree(base)


def raw_helper(binaries, payload: bytes):
    """Start the real helper and send it raw bytes instead of a request."""
    import socket
    import struct
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen([str(binaries / "encprint-helper"), "--socket-fd", str(child.fileno())],
                            pass_fds=(child.fileno(),))
    child.close()
    try:
        parent.settimeout(10)
        parent.recv(65536)  # hello
        parent.send(struct.pack(">I", len(payload)) + payload)
        raw = parent.recv(65536)
        import msgpack
        return msgpack.unpackb(raw[4:])
    finally:
        parent.close()
        proc.wait(10)


@pytest.mark.parametrize("payload,code", [
    (b"\xc1\xc1garbage", "bad_request"),
    (None, "bad_request"),  # unknown op
    ("proto2", "protocol_mismatch"),
])
def test_malformed_requests_are_refused(ep, binaries, payload, code):
    req = {"type": "request", "protocol": ep.PROTOCOL_VERSION, "op": "frobnicate", "path": "/x",
           "root": "/", "identity": "/x", "max_bytes": 0, "memfd_name": ""}
    if payload is None:
        payload = ep.frame(req)
    elif payload == "proto2":
        req["protocol"], req["op"] = ep.PROTOCOL_VERSION + 1, "inspect"
        payload = ep.frame(req)
    msg = raw_helper(binaries, payload)
    assert msg["type"] == "error" and msg["code"] == code, msg


def test_helper_of_another_protocol_version_is_refused_with_the_remedy(ep, binaries, keys,
                                                                        gcodes, tmp_path, run):
    """A real helper built from this source with the next protocol, as after an update
    that changed the protocol (go build -overlay swaps the contract file)."""
    ver = tmp_path / "contract.go"
    contract_go = ROOT / "helper/contract/contract.go"
    original = contract_go.read_text()
    src = original.replace(f"const ProtocolVersion = {ep.PROTOCOL_VERSION}",
                           f"const ProtocolVersion = {ep.PROTOCOL_VERSION + 1}")
    assert src != original, "helper/contract/contract.go no longer defines ProtocolVersion so"
    ver.write_text(src)
    overlay = tmp_path / "overlay.json"
    overlay.write_text(json.dumps({"Replace": {str(contract_go): str(ver)}}))
    newer = tmp_path / "encprint-helper-next"
    subprocess.run(["go", "build", "-overlay", str(overlay), "-o", str(newer),
                    "./helper/cmd/encprint-helper"], cwd=ROOT, check=True)
    path = put(gcodes, "part.gcode", keys.encrypt(b"G1 X1\n"))
    client = ep.HelperClient(str(newer), str(keys.identity))
    with pytest.raises(ep.HelperError) as ei:
        run(client.decrypt(str(path), str(gcodes)))
    assert ei.value.code == "protocol_mismatch"
    assert (f"speaks protocol {ep.PROTOCOL_VERSION + 1} but this component speaks "
            f"{ep.PROTOCOL_VERSION}") in ei.value.message
    assert "make build" in ei.value.message


def test_missing_helper_binary(ep, keys, gcodes, run):
    client = ep.HelperClient("/nonexistent/encprint-helper", str(keys.identity))
    with pytest.raises(ep.HelperError) as ei:
        run(client.inspect(str(gcodes / "x.gcode"), str(gcodes)))
    assert ei.value.code == "helper_missing" and "/nonexistent/encprint-helper" in ei.value.message


@pytest.fixture(scope="session")
def big_encrypted(binaries, tmp_path_factory):
    """About 256 MiB of G-code, encrypted: long enough to act mid-decrypt."""
    keys = Keys(binaries, tmp_path_factory.mktemp("bigkeys"))
    line = b"G1 X12.345 Y67.890 F3000 ; padding to make a long file\n"
    plain = line * (256 * 1024 * 1024 // len(line))
    d = tmp_path_factory.mktemp("big")
    # Uncompressed: this repeated line would compress a thousandfold.
    (d / "big.gcode").write_bytes(keys.encrypt(plain, "--no-compress"))
    return keys, d


def helper_child() -> int:
    """The pid of the encprint-helper this test process is running."""
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                comm, rest = f.read().rsplit(")", 1)
        except (OSError, ValueError):
            continue
        if comm.endswith("(encprint-helper") and int(rest.split()[1]) == os.getpid():
            return int(pid)
    raise AssertionError("no encprint-helper child is running")


def test_helper_killed_mid_decrypt(ep, big_encrypted, run):
    keys, gcodes = big_encrypted
    client = ep.HelperClient(str(keys.bin / "encprint-helper"), str(keys.identity))
    seen = []

    def progress(done, total):
        if not seen:
            seen.append(done)
            os.kill(helper_child(), signal.SIGKILL)

    before = open_fds()
    with pytest.raises(ep.HelperError) as ei:
        run(client.decrypt(str(gcodes / "big.gcode"), str(gcodes), progress=progress))
    assert seen, "no progress message arrived before the end"
    assert "crashed or was killed" in ei.value.message
    assert open_fds() == before


def test_helper_hung_before_hello_times_out_and_is_stopped(ep, keys, binaries, gcodes,
                                                          tmp_path, run):
    """The real helper, started by a wrapper that stops itself (SIGSTOP) first."""
    path = put(gcodes, "part.gcode", keys.encrypt(b"G1 X1\n"))
    wrapper = tmp_path / "stopped-helper"
    wrapper.write_text(f"#!/bin/sh\nkill -STOP $$\nexec {binaries / 'encprint-helper'} \"$@\"\n")
    wrapper.chmod(0o755)
    client = ep.HelperClient(str(wrapper), str(keys.identity), hello_timeout=0.5)
    before = open_fds()
    with pytest.raises(ep.HelperError) as ei:
        run(client.inspect(str(path), str(gcodes)))
    assert ei.value.code == "helper_timeout" and "hello" in ei.value.message
    assert open_fds() == before
    assert subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True).stdout == b""


def test_helper_hung_mid_decrypt_times_out_and_is_stopped(ep, big_encrypted, run):
    keys, gcodes = big_encrypted
    client = ep.HelperClient(str(keys.bin / "encprint-helper"), str(keys.identity),
                             decrypt_timeout=1.0)

    def progress(done, total):
        os.kill(helper_child(), signal.SIGSTOP)

    before = open_fds()
    with pytest.raises(ep.HelperError) as ei:
        run(client.decrypt(str(gcodes / "big.gcode"), str(gcodes), progress=progress))
    assert ei.value.code == "helper_timeout" and "decrypt" in ei.value.message
    assert open_fds() == before
    assert subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True).stdout == b""


def test_progress_is_reported_for_large_files(ep, big_encrypted, run):
    keys, gcodes = big_encrypted
    client = ep.HelperClient(str(keys.bin / "encprint-helper"), str(keys.identity))
    seen = []
    df = run(client.decrypt(str(gcodes / "big.gcode"), str(gcodes),
                            progress=lambda d, t: seen.append((d, t))))
    df.close()
    assert seen and all(t == df.size for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_canary_never_reaches_helper_stderr_or_disk(ep, client, keys, gcodes, run, tmp_path):
    canary = new_canary()
    path = put(gcodes, "part.gcode", keys.encrypt(sample_gcode(canary=canary)))
    df = run(client.decrypt(str(path), str(gcodes)))
    df.close()
    assert canary not in client.last_stderr
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert canary.encode() not in p.read_bytes(), p


def test_memfd_check_rejects_wrong_objects(ep, tmp_path):
    reg = tmp_path / "f"
    reg.write_bytes(b"x")
    fd = os.open(reg, os.O_RDONLY)
    try:
        with pytest.raises(ep.HelperError, match="not the memfd"):
            ep.check_memfd(fd, "encprint-x", 1)
    finally:
        os.close(fd)
    fd = os.memfd_create("encprint-y", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, b"abc")
        with pytest.raises(ep.HelperError, match="not sealed"):
            ep.check_memfd(fd, "encprint-y", 3)
    finally:
        os.close(fd)


def test_recipient_comes_from_the_helper(client, keys, run):
    assert run(client.recipient()) == keys.recipient


def test_recipient_of_a_missing_identity_is_an_identity_error(ep, binaries, tmp_path, run):
    client = ep.HelperClient(str(binaries / "encprint-helper"), str(tmp_path / "none.key"))
    with pytest.raises(ep.HelperError) as ei:
        run(client.recipient())
    assert ei.value.code == "identity_error" and "none.key" in ei.value.message


def test_helper_that_exits_without_a_word(ep, keys, gcodes, run):
    """A real program that is not the helper: it exits at once."""
    client = ep.HelperClient("/bin/true", str(keys.identity))
    before = open_fds()
    with pytest.raises(ep.HelperError) as ei:
        run(client.inspect(str(gcodes / "x.gcode"), str(gcodes)))
    assert "closed the connection without answering" in ei.value.message
    assert open_fds() == before


@pytest.mark.parametrize("records,words", [
    # TEST DOUBLE: no real helper sends these; a shell script stands in for a
    # corrupted or foreign peer, writing records straight to the socket.
    (["\\x00\\x00\\x00\\x05hello"], "garbage"),
    (["\\x00\\x00\\x00\\x03"], "closed the connection in the middle of a message"),
    (["\\xff\\xff\\xff\\xff"], "over the protocol's limit"),
    (["\\x00"], "too short"),
    (["\\x00\\x00\\x00\\x01\\xc0"], "without a type"),  # msgpack nil
])
def test_helper_answering_garbage(ep, keys, gcodes, tmp_path, run, records, words):
    script = tmp_path / "garbage-peer"
    body = "".join(f"printf '{r}' >&\"$2\"\n" for r in records)
    script.write_text(f"#!/bin/bash\n{body}")
    script.chmod(0o755)
    client = ep.HelperClient(str(script), str(keys.identity))
    before = open_fds()
    with pytest.raises(ep.HelperError) as ei:
        run(client.inspect(str(gcodes / "x.gcode"), str(gcodes)))
    assert words in ei.value.message, ei.value.message
    assert open_fds() == before


def test_channel_reads_the_last_record_queued_behind_a_connection_reset(ep, run):
    """A peer that exits with our records unread: Linux reports ECONNRESET
    before the records it sent (proto/PROTOCOL.md); the answer still arrives."""
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    body = ep.frame({"type": "error", "code": "bad_request", "message": "no"})
    try:
        ours.send(b"unread by the peer")
        peer.send(struct.pack(">I", len(body)) + body)
        peer.close()

        async def receive():
            return await ep._Channel(ours).recv_message()
        msg, fd = run(receive())
    finally:
        ours.close()
    assert msg["code"] == "bad_request" and fd is None


PAYLOAD_CASES = json.loads((ROOT / "proto/testdata/vectors/payload.json").read_text())


@pytest.mark.parametrize("case", [c for c in PAYLOAD_CASES if c["expect"] != "success"],
                         ids=lambda c: c["file"])
def test_a_bad_compressed_payload_is_refused_before_any_fd(ep, binaries, gcodes, tmp_path, run,
                                                           case):
    """Designer-crafted payloads inside an authentic encryption (age's AEAD
    passes them): the real helper refuses each with its code and the file's
    name, and no descriptor reaches the component."""
    identity = tmp_path / "printer.key"
    shutil.copy(ROOT / "proto/testdata/vectors/printer.key", identity)
    identity.chmod(0o600)
    shutil.copy(ROOT / "proto/testdata/vectors" / case["file"], gcodes / "part.gcode")
    client = ep.HelperClient(str(binaries / "encprint-helper"), str(identity))
    before = open_fds()
    with pytest.raises(ep.HelperError) as ei:
        run(client.decrypt(str(gcodes / "part.gcode"), str(gcodes)))
    assert ei.value.code == case["expect"], ei.value.message
    assert ei.value.message.startswith("part.gcode")
    assert all(w in ei.value.message for w in case["words"]), ei.value.message
    assert open_fds() == before
