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
"""
from __future__ import annotations

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
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
