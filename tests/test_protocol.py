"""proto/testdata/messages.json, decoded and re-encoded by the Python side
exactly as the Go tests do (helper/ipc/ipc_test.go); proto/testdata/requests.json
against the real helper binary, as helper/cmd/encprint-helper runs them against
serve()."""
from __future__ import annotations

import json

import msgpack
import pytest
from conftest import ROOT

VECTORS = json.loads((ROOT / "proto" / "testdata" / "messages.json").read_text())


def from_json(v):
    if isinstance(v, dict):
        if set(v) == {"$bin"}:
            return bytes.fromhex(v["$bin"])
        return {k: from_json(e) for k, e in v.items()}
    if isinstance(v, list):
        return [from_json(e) for e in v]
    return v


@pytest.mark.parametrize("vec", VECTORS, ids=[v["name"] for v in VECTORS])
def test_golden_vector_decodes_and_reencodes_byte_exact(vec, binaries):
    from moonraker.components import encrypted_print as ep
    raw = bytes.fromhex(vec["hex"])
    decoded = msgpack.unpackb(raw, raw=False)
    assert decoded == from_json(vec["decoded"])
    assert ep.frame(decoded) == raw


def test_vectors_cover_every_message_kind():
    kinds = {v["kind"] for v in VECTORS}
    assert kinds == {"hello", "request", "progress", "inspect_result", "decrypt_result",
                     "recipient_result", "records_result", "error"}


# -- proto/testdata/requests.json against the real helper --------------------
#
# A small framing of our own (not the component's), so that these cases test
# the helper against the spec alone.

import os  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402

CONTRACT = json.loads((ROOT / "proto" / "contract.json").read_text())
REQUESTS = json.loads((ROOT / "proto" / "testdata" / "requests.json").read_text())["cases"]
VECTOR_DIR = ROOT / "proto" / "testdata" / "vectors"
MAX_RECORD = CONTRACT["framing"]["max_record"]
PREFIX = CONTRACT["framing"]["length_prefix_bytes"]


def case_value(v, subst):
    """A case's JSON value as the msgpack value it stands for."""
    if isinstance(v, dict):
        if set(v) == {"$bin"}:
            return bytes.fromhex(v["$bin"])
        return {k: case_value(e, subst) for k, e in v.items()}
    if isinstance(v, list):
        return [case_value(e, subst) for e in v]
    if isinstance(v, str):
        for k, r in subst.items():
            v = v.replace(k, r)
    return v


def case_records(framing: dict, req: dict) -> list:
    if framing.get("empty_record"):
        return [b""]
    if "raw_records" in framing:
        return [bytes.fromhex(h) for h in framing["raw_records"]]
    if framing.get("pad"):
        req["pad"] = "x" * framing["pad"]
    size = framing.get("record_size")
    if size:
        n = 0
        req["pad"] = ""
        while (got := PREFIX + len(msgpack.packb(req, use_bin_type=True))) != size:
            n += size - got
            req["pad"] = "x" * n
    body = msgpack.packb(req, use_bin_type=True) + bytes.fromhex(framing.get("body_suffix", ""))
    msg = struct.pack(">I", framing.get("declared_length", len(body))) + body
    msg += bytes.fromhex(framing.get("after_body", ""))
    if size:
        return [msg]
    cuts = framing.get("split_at") or list(range(MAX_RECORD, len(msg), MAX_RECORD))
    bounds = [0, *cuts, len(msg)]
    return [msg[a:b] for a, b in zip(bounds, bounds[1:])]


def recv_message(sock: socket.socket, resets: list):
    """One message from the helper, or None at the end of the connection.
    ECONNRESET means the helper ended with records of ours unread; what it
    sent before is still queued, so reading goes on. Descriptors are closed
    and counted."""
    body, want, nfds = b"", None, 0
    while True:
        try:
            data, anc, flags, _ = sock.recvmsg(MAX_RECORD, socket.CMSG_SPACE(4))
        except ConnectionResetError:
            resets.append(True)
            continue
        assert not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for fd in struct.unpack(f"{len(cdata) // 4}i", cdata[:len(cdata) // 4 * 4]):
                    os.close(fd)
                    nfds += 1
        if not data:
            assert want is None, "the helper ended inside a message"
            return None, nfds
        if want is None:
            want, data = struct.unpack(">I", data[:PREFIX])[0], data[PREFIX:]
        body += data
        if len(body) == want:
            return msgpack.unpackb(body, raw=False), nfds


def make_case_files(case: dict, root, keep: list) -> None:
    for f in case["files"]:
        p = root / f["name"]
        if "vector" in f:
            p.write_bytes((VECTOR_DIR / f["vector"]).read_bytes())
        elif f["kind"] == "fifo":
            os.mkfifo(p)
        elif f["kind"] == "directory":
            p.mkdir()
        elif f["kind"] == "socket":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(str(p))
            keep.append(s)
        else:
            raise AssertionError(f"unknown file {f}")


def run_case(case: dict, helper, tmp_path):
    """The case against the real helper binary; returns (answer, descriptors,
    exit status, whether ECONNRESET was seen)."""
    root = tmp_path / "gcodes"
    root.mkdir()
    identity = tmp_path / "printer.key"
    identity.write_bytes((VECTOR_DIR / "printer.key").read_bytes())
    keep: list = []
    make_case_files(case, root, keep)
    req = case_value(case["request"], {"{root}": str(root), "{identity}": str(identity)})
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen([str(helper), "--socket-fd", str(child.fileno())],
                            pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
    child.close()
    resets: list = []
    try:
        parent.settimeout(10)
        # Queued before the hello is read: a helper that answers early
        # leaves the rest unread.
        for rec in case_records(case.get("framing", {}), req):
            parent.sendmsg([rec])
        hello, _ = recv_message(parent, resets)
        assert hello["type"] == "hello" and hello["protocol"] == CONTRACT["protocol_version"]
        msg, nfds = recv_message(parent, resets)
        while msg is not None and msg["type"] == "progress":
            msg, nfds = recv_message(parent, resets)
        if msg is not None:
            end, _ = recv_message(parent, resets)
            assert end is None, f"a second answer: {end}"
        return msg, nfds, proc.wait(10), bool(resets)
    finally:
        parent.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for s in keep:
            s.close()


@pytest.mark.parametrize("case", REQUESTS, ids=[c["name"] for c in REQUESTS])
def test_request_case_against_the_real_helper(case, binaries, tmp_path):
    msg, nfds, status, _ = run_case(case, binaries / "encprint-helper", tmp_path)
    want = case["expect"]
    assert status == 0, f"helper exit status {status}"
    if want["type"] == "none":
        assert msg is None
        return
    assert msg is not None and msg["type"] == want["type"], msg
    assert nfds == (1 if want["type"] == "result" and want["op"] == "decrypt" else 0)
    if want["type"] == "error":
        assert (msg["code"], msg.get("key", "")) == (want["code"], want.get("key", "")), msg
        assert msg["code"] in CONTRACT["error_codes"]
        for w in want.get("words", []):
            assert w in msg["message"], msg["message"]
        return
    assert msg["op"] == want["op"]
    for k, v in want.get("fields", {}).items():
        assert msg.get(k) == v, (k, msg.get("reason"))  # null: the key is absent


def test_request_cases_cover_every_required_key():
    for op, spec in CONTRACT["ops"].items():
        for key in spec["required"]:
            assert any(key not in c["request"] and c["expect"].get("key") == key
                       and c["expect"].get("code") == "bad_request"
                       and (key == "op" or c["request"].get("op") == op)
                       for c in REQUESTS), f"no case of {op} without {key}"


def test_a_receiver_sees_econnreset_before_the_final_error(binaries, tmp_path):
    """PROTOCOL.md: when the helper ends with records of the component
    unread, the kernel reports ECONNRESET first; the error record is still
    there after it."""
    case = next(c for c in REQUESTS if c["name"] == "length prefix split across records")
    msg, _, status, reset = run_case(case, binaries / "encprint-helper", tmp_path)
    assert reset, "no ECONNRESET: the statement in PROTOCOL.md is not needed"
    assert msg["code"] == "bad_request" and status == 0
def test_component_metadata_fields_match_the_contract(binaries):
    from moonraker.components import encrypted_print as ep
    contract = json.loads((ROOT / "proto" / "contract.json").read_text())
    assert list(ep.METADATA_FIELDS.items()) == [tuple(f) for f in contract["metadata_fields"]]
