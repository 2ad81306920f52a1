"""proto/testdata/messages.json, decoded and re-encoded by the Python side
exactly as the Go tests do (helper/ipc/ipc_test.go)."""
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
                     "recipient_result", "error"}


def test_component_metadata_fields_match_the_contract(binaries):
    from moonraker.components import encrypted_print as ep
    contract = json.loads((ROOT / "proto" / "contract.json").read_text())
    assert list(ep.METADATA_FIELDS.items()) == [tuple(f) for f in contract["metadata_fields"]]
