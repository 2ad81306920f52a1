#!/usr/bin/env python3
"""Prints the encrypted-print counts that Moonraker's database holds, as the
JSON that `encprint-helper --import` reads, for install.sh's migration to
the installed helper (docs/install.md).

    moonraker_counts.py DATABASE_DIR    -> {"uid": N, "counts": {"<file id>": n}}

DATABASE_DIR is Moonraker's database folder (~/printer_data/database). The
component keeps one count per file id in the namespace "encrypted_print"
(COUNTS_NAMESPACE in moonraker-component/encrypted_print.py); Moonraker 0.9
and later store namespaces in the SQLite file moonraker-sql.db, table
namespace_store, an integer as b"q" and its 8 native-endian bytes. The file
is opened read-only; a database without counts gives an empty export.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import sqlite3
import struct
import sys

NAMESPACE = "encrypted_print"  # COUNTS_NAMESPACE of the component
DB_FILE = "moonraker-sql.db"
FILE_ID = re.compile(r"^[0-9a-f]{32}$")


def counts(db: pathlib.Path) -> dict:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        rows = conn.execute("SELECT key, value FROM namespace_store WHERE namespace = ?",
                            (NAMESPACE,)).fetchall()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return {}
        raise
    finally:
        conn.close()
    out = {}
    for key, value in rows:
        value = bytes(value)
        if not FILE_ID.match(key) or len(value) != 9 or value[:1] != b"q":
            print(f"moonraker_counts.py: {db}: skipping {key!r}, not a print count",
                  file=sys.stderr)
            continue
        n = struct.unpack("q", value[1:])[0]
        if n > 0:
            out[key] = n
    return out


def main(argv: list) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    folder = pathlib.Path(argv[1])
    db = folder / DB_FILE
    found: dict = {}
    if db.is_file():
        try:
            found = counts(db)
        except sqlite3.Error as e:
            print(f"moonraker_counts.py: cannot read {db}: {e}", file=sys.stderr)
            return 1
    elif (folder / "data.mdb").exists():
        print(f"moonraker_counts.py: {folder} holds an old (LMDB) database that Moonraker "
              "converts to SQLite when it starts: start Moonraker once, then run install.sh "
              "again", file=sys.stderr)
        return 1
    json.dump({"uid": os.getuid(), "counts": found}, sys.stdout, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
