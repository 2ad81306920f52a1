"""proto/contract.json is the one source of every name and number that
crosses a process boundary; the component's and the extra's own definitions
must equal it (the Go side is checked by helper/contract's test)."""
from __future__ import annotations

import fcntl
import json
import re
import struct
import subprocess

import pytest
from bridge_module import load_bridge
from conftest import ROOT

CONTRACT = json.loads((ROOT / "proto" / "contract.json").read_text())


@pytest.fixture(scope="module")
def ep(binaries):
    from moonraker.components import encrypted_print
    return encrypted_print


def test_component_protocol_values_equal_the_contract(ep):
    fr = CONTRACT["framing"]
    assert ep.PROTOCOL_VERSION == CONTRACT["protocol_version"]
    assert ep.LENGTH_PREFIX == fr["length_prefix_bytes"]
    assert ep.MAX_RECORD == fr["max_record"] and fr["max_record_includes_prefix"]
    assert ep.MAX_MESSAGE == fr["max_message"]
    assert ep.AGE_MAGIC == CONTRACT["age"]["magic"].encode()
    assert ep.AGE_ARMOR == CONTRACT["age"]["armor_begin"].encode()
    assert set(ep.CLIENT_ERROR_CODES) == set(CONTRACT["client_error_codes"])
    assert ep.PUBLISHER_KEY_RE.pattern == CONTRACT["publisher_key"]["regex"]


def test_component_memfd_values_equal_the_contract_and_the_kernel(ep):
    m = CONTRACT["memfd"]
    assert ep.F_GET_SEALS == m["F_GET_SEALS"] == getattr(fcntl, "F_GET_SEALS", m["F_GET_SEALS"])
    assert ep.REQUIRED_SEALS == m["required_seals"] == sum(m["seals"].values())
    for name, value in m["seals"].items():
        assert getattr(fcntl, name, value) == value, name
    assert ep.MEMFD_TOKEN_PREFIX == m["token_prefix"]
    assert ep.MEMFD_LINK == m["link_format"]
    token = ep.MEMFD_TOKEN_PREFIX + "0123456789abcdef"  # what decrypt() asks for
    assert re.fullmatch(m["token_regex"], token)


def test_component_klipper_names_equal_the_contract(ep):
    k = CONTRACT["klipper"]
    assert ep.BRIDGE_OBJECT == k["bridge_object"]
    assert ep.REGISTER_ENDPOINT == k["register_endpoint"]
    assert list(ep.REGISTER_PARAMS) == k["register_params"]
    assert [ep.REGISTER_REPLY] == k["register_reply"]
    assert ep.REFUSE_ENDPOINT == k["refuse_endpoint"]
    assert list(ep.REFUSE_PARAMS) == k["refuse_params"]
    assert ep.UNREGISTER_COMMAND == k["unregister_command"]
    assert ep.REMOTE_METHOD == k["remote_method"]


def test_extra_values_equal_the_contract():
    """The Klipper extra is stdlib-only and cannot import the component:
    it defines its own copy of each value, checked here."""
    bridge = load_bridge()
    k, m = CONTRACT["klipper"], CONTRACT["memfd"]
    assert bridge.MAGIC == CONTRACT["age"]["magic"].encode()
    assert bridge.ARMOR == CONTRACT["age"]["armor_begin"].encode()
    assert bridge.ALL_SEALS == m["required_seals"]
    assert bridge.F_GET_SEALS == m["F_GET_SEALS"]
    assert bridge.TOKEN_RE.pattern == m["token_regex"]
    assert list(bridge.VALID_EXTS) == k["gcode_extensions"]
    assert bridge.REMOTE_METHOD == k["remote_method"]
    assert bridge.REGISTER_ENDPOINT == k["register_endpoint"]
    assert list(bridge.REGISTER_PARAMS) == k["register_params"]
    assert bridge.REFUSE_ENDPOINT == k["refuse_endpoint"]
    assert list(bridge.REFUSE_PARAMS) == k["refuse_params"]
    p = CONTRACT["payload"]
    assert bridge.SEEKGZ_MAGIC == bytes.fromhex(p["seekgz_magic"])
    assert bridge.SEEKGZ_MAGIC.startswith(bytes.fromhex(p["gzip_magic"]))
    assert bridge.SEEKGZ_FOOTER_SIZE == p["footer_size"]
    assert (bridge.SEEKGZ_MIN_BLOCK, bridge.SEEKGZ_MAX_BLOCK) == (p["min_block_size"],
                                                                  p["max_block_size"])
    text = (ROOT / "klippy-extras" / "encrypted_file_bridge.py").read_text()
    assert f"'{k['unregister_command']}'" in text
    # Klipper names the object after the section, and the section after the file.
    assert (ROOT / "klippy-extras" / f"{k['bridge_object']}.py").exists()


def test_component_requests_carry_exactly_the_required_keys(ep):
    client = ep.HelperClient("/nonexistent", "/id.key")
    for op, spec in CONTRACT["ops"].items():
        path = "" if op in ("recipient", "records") else "/g/x.gcode"
        req = client._request(op, path, "/g")
        if op == "decrypt":
            req.update(max_bytes=0, memfd_name="encprint-x")  # as decrypt() adds
        assert sorted(req) == sorted(spec["required"]), op


def test_payload_values_describe_the_committed_seekable_gzips():
    """The payload section (which the extra sniffs and the helper writes)
    matches the committed seekgz vectors: every valid one starts with
    seekgz_magic (or, empty, is its footer alone) and ends in a footer member
    of footer_size bytes with the stated version and block-size bounds."""
    p = CONTRACT["payload"]
    magic, gz = bytes.fromhex(p["seekgz_magic"]), bytes.fromhex(p["gzip_magic"])
    assert magic.startswith(gz) and len(magic) == 16
    vectors = json.loads((ROOT / "proto/testdata/seekgz/vectors.json").read_text())
    for v in (v for v in vectors if v["expect"] == "success"):
        data = (ROOT / "proto/testdata/seekgz" / v["file"]).read_bytes()
        footer = data[-p["footer_size"]:]
        assert footer.startswith(gz) and footer[12:14] == b"Ef", v["file"]
        version, block = struct.unpack_from("<II", footer, 16)
        assert version == p["footer_version"], v["file"]
        assert p["min_block_size"] <= block <= p["max_block_size"], v["file"]
        assert data.startswith(magic) or len(data) == p["footer_size"], v["file"]
    assert p["min_block_size"] <= p["default_block_size"] <= p["max_block_size"]


def test_installed_helper_paths_agree_in_scripts_makefile_and_helper():
    """install.sh and uninstall.sh (scripts/system_layout.sh), the Makefile's
    SYSTEM_ROOT build and privsep's compiled-in defaults name the same files."""
    def layout(root: str) -> list:
        out = subprocess.run(
            ["bash", "-c", '. scripts/system_layout.sh; system_layout; '
             'echo "$SYS_IDENTITY $SYS_POLICY $SYS_STATE"'],
            cwd=ROOT, env={"SYSTEM_ROOT": root, "PATH": "/usr/bin:/bin"},
            capture_output=True, text=True, check=True).stdout.split()
        return out
    go = (ROOT / "helper/privsep/start.go").read_text()
    defaults = [re.search(rf'\t{name}\s*=\s*"([^"]+)"', go).group(1)
                for name in ("IdentityPath", "PolicyPath", "StateDir")]
    assert layout("") == defaults
    make = subprocess.run(["make", "-n", "-B", "bin/encprint-helper-sysroot",
                           "SYSTEM_ROOT=/sysroot"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout
    got = [re.search(rf"privsep\.{name}=([^\s']+)", make).group(1)
           for name in ("IdentityPath", "PolicyPath", "StateDir")]
    assert got == layout("/sysroot")
