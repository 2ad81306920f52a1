#!/usr/bin/env python3
"""Adds and removes the owner page's link in Mainsail's sidebar, for
install.sh and uninstall.sh.

Mainsail reads config/.theme/navi.json, a JSON list of links
({"title", "href", "icon" (an SVG path), "target", "position"}). Our entry is
the one whose href is the page's path. It is inserted as one line before the
list's closing bracket and removed as exactly that text, so the other entries
and the file's bytes come back as they were; a file we created is deleted.

    mainsail_navi.py add CONFIG_DIR      -> prints created|added|present
    mainsail_navi.py remove CONFIG_DIR   -> prints removed|deleted|absent
Exit status 1, with the reason, when navi.json is not a JSON list.
"""
from __future__ import annotations

import json
import os
import sys

HREF = "/server/encrypted_print/page"
# A padlock, drawn for this project in Mainsail's 24x24 icon box.
ICON = ("M12 2a5 5 0 0 0-5 5v3H6a2 2 0 0 0-2 2v8a2 2 0 0 0 2 2h12a2 2 0 0 0 2-2v-8"
        "a2 2 0 0 0-2-2h-1V7a5 5 0 0 0-5-5zm-3 8V7a3 3 0 0 1 6 0v3zm3 3.5a1.5 1.5 0 0 1 "
        ".75 2.8V18h-1.5v-1.7A1.5 1.5 0 0 1 12 13.5z")
ENTRY = json.dumps({"title": "Encrypted prints", "href": HREF, "icon": ICON,
                    "target": "_blank"})
CREATED = "[\n    " + ENTRY + "\n]\n"


class NaviError(Exception):
    pass


def _entries(path: str, text: str) -> list:
    try:
        data = json.loads(text)
    except ValueError as e:
        raise NaviError(f"{path} is not valid JSON ({e}); fix or remove it, then run "
                        "install.sh again") from None
    if not isinstance(data, list):
        raise NaviError(f"{path} is not a JSON list as Mainsail expects; left as is")
    return data


def add(config_dir: str) -> str:
    theme = os.path.join(config_dir, ".theme")
    path = os.path.join(theme, "navi.json")
    if not os.path.exists(path):
        os.makedirs(theme, exist_ok=True)
        with open(path, "w") as f:
            f.write(CREATED)
        return "created"
    with open(path) as f:
        text = f.read()
    entries = _entries(path, text)
    if any(isinstance(e, dict) and e.get("href") == HREF for e in entries):
        return "present"
    end = text.rindex("]")
    at = len(text[:end].rstrip())
    new = text[:at] + ("," if entries else "") + "\n    " + ENTRY + text[at:]
    _entries(path, new)  # still a list
    with open(path, "w") as f:
        f.write(new)
    return "added"


def remove(config_dir: str) -> str:
    theme = os.path.join(config_dir, ".theme")
    path = os.path.join(theme, "navi.json")
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return "absent"
    if text == CREATED:
        os.remove(path)
        if not os.listdir(theme):
            os.rmdir(theme)
        return "deleted"
    for ours in (",\n    " + ENTRY, "\n    " + ENTRY):
        if ours in text:
            new = text.replace(ours, "", 1)
            break
    else:  # moved or reformatted by hand: drop our entry, keep the others
        entries = _entries(path, text)
        kept = [e for e in entries if not (isinstance(e, dict) and e.get("href") == HREF)]
        if len(kept) == len(entries):
            return "absent"
        new = json.dumps(kept, indent=4) + "\n"
    with open(path, "w") as f:
        f.write(new)
    return "removed"


def main(argv: list) -> int:
    if len(argv) == 3 and argv[1] in ("add", "remove"):
        try:
            print((add if argv[1] == "add" else remove)(argv[2]))
        except NaviError as e:
            print(e, file=sys.stderr)
            return 1
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
