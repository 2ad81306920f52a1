#!/usr/bin/env python3
"""Adds and removes klipper-encprint's sections in moonraker.conf and
printer.cfg, for install.sh and uninstall.sh.

Every addition sits between marker lines and is removed byte for byte, so
uninstalling restores the file exactly. Nothing is added when the section
already exists (added by hand, say). In printer.cfg the block goes above
Klipper's SAVE_CONFIG block, which must stay last.

    config_edit.py add FILE SECTION_TEXT_FILE    -> prints added|present|exists
                                                    (FILE.encprint-backup: the file before)
    config_edit.py remove FILE                   -> prints removed|absent
    config_edit.py has-section FILE SECTION      -> exit 0 if [SECTION] exists
    config_edit.py set FILE SECTION KEY [VALUE]  -> prints updated|unchanged|absent
                                                    (only inside our block; no VALUE:
                                                    the KEY line is removed)
    config_edit.py policy FILE                   -> the [encrypted_print] trust options
                                                    as the helper's policy.json
"""
from __future__ import annotations

import configparser
import json
import re
import sys

BEGIN = "# BEGIN klipper-encprint (added by install.sh; uninstall.sh removes it)\n"
END = "# END klipper-encprint\n"
SAVE_CONFIG = "#*# <---------------------- SAVE_CONFIG ---------------------->"


def sections(text: str) -> set:
    return {m.group(1).strip() for m in re.finditer(r"^\[([^\]]+)\]", text, re.M)}


def add(path: str, block: str) -> str:
    with open(path) as f:
        text = f.read()
    if BEGIN in text:
        return "present"
    wanted = sections(block)
    if wanted & sections(text):
        return "exists: " + ", ".join(sorted(wanted & sections(text)))
    body = BEGIN + block.rstrip("\n") + "\n" + END
    pos = text.find(SAVE_CONFIG)
    if pos >= 0:
        # Above the SAVE_CONFIG block, separated by a blank line.
        new = text[:pos] + body + "\n" + text[pos:]
    else:
        # Appended; the leading newline ends a last line that has none, or
        # leaves a blank line before the block.
        new = text + "\n" + body
    with open(path + ".encprint-backup", "w") as f:
        f.write(text)
    with open(path, "w") as f:
        f.write(new)
    return "added"


def remove(path: str) -> str:
    with open(path) as f:
        text = f.read()
    start = text.find(BEGIN)
    if start < 0:
        return "absent"
    end = text.index(END, start) + len(END)
    if text[end:].startswith("\n" + SAVE_CONFIG):
        new = text[:start] + text[end + 1:]
    elif start > 0 and text[start - 1] == "\n" and end == len(text):
        new = text[:start - 1] + text[end:]
    else:
        new = text[:start] + text[end:]
    with open(path, "w") as f:
        f.write(new)
    return "removed"


def set_key(path: str, section: str, key: str, value: str | None) -> str:
    """Sets (or with value None removes) one option of a section inside our
    block, leaving every other line, the user's own included, as it is."""
    with open(path) as f:
        text = f.read()
    start = text.find(BEGIN)
    if start < 0:
        return "absent"
    end = text.index(END, start)
    lines = text[start:end].splitlines(keepends=True)
    try:
        head = next(i for i, ln in enumerate(lines) if ln.strip() == f"[{section}]")
    except StopIteration:
        return "absent"
    stop = next((i for i in range(head + 1, len(lines)) if lines[i].startswith("[")),
                len(lines))
    option = re.compile(rf"^{re.escape(key)}\s*[:=]")
    at = next((i for i in range(head + 1, stop) if option.match(lines[i])), None)
    new = None if value is None else f"{key}: {value}\n"
    if at is None and new is None:
        return "unchanged"
    if at is None:
        lines.insert(head + 1, new)
    elif new is None:
        del lines[at]
    elif lines[at] == new:
        return "unchanged"
    else:
        lines[at] = new
    with open(path, "w") as f:
        f.write(text[:start] + "".join(lines) + text[end:])
    return "updated"


def policy(path: str) -> dict:
    """require_signature and trusted_publishers of [encrypted_print], as
    Moonraker reads them (a boolean; one key a line), for policy.json."""
    cp = configparser.ConfigParser(interpolation=None, strict=False,
                                   comment_prefixes=("#", ";"),
                                   inline_comment_prefixes=("#", ";"))
    with open(path) as f:
        cp.read_file(f, path)
    out = {"require_signature": False, "trusted_publishers": []}
    if cp.has_section("encrypted_print"):
        sec = cp["encrypted_print"]
        out["require_signature"] = sec.getboolean("require_signature", False)
        out["trusted_publishers"] = [k.strip() for k in
                                     sec.get("trusted_publishers", "").splitlines()
                                     if k.strip()]
    return out


def main(argv: list) -> int:
    if len(argv) >= 3 and argv[1] == "add":
        with open(argv[3]) as f:
            print(add(argv[2], f.read()))
        return 0
    if len(argv) == 3 and argv[1] == "remove":
        print(remove(argv[2]))
        return 0
    if len(argv) == 4 and argv[1] == "has-section":
        with open(argv[2]) as f:
            return 0 if argv[3] in sections(f.read()) else 1
    if len(argv) in (5, 6) and argv[1] == "set":
        print(set_key(argv[2], argv[3], argv[4], argv[5] if len(argv) == 6 else None))
        return 0
    if len(argv) == 3 and argv[1] == "policy":
        try:
            print(json.dumps(policy(argv[2]), indent=2))
        except (configparser.Error, ValueError) as e:
            print(f"cannot read the trust options of {argv[2]}: {e}", file=sys.stderr)
            return 1
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
