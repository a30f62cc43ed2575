#!/usr/bin/env python3
"""Builds the example SQLite database of Dutch parliamentary motions.

    scripts/make-motions-db.py [SOURCE.jsonl] [DATABASE]

SOURCE defaults to ../shared/data/motions/tk_moties_fulltext.jsonl when it exists, else to the
sample shipped in data/motions_sample.jsonl. DATABASE defaults to data/motions.db. The table
`motions(id, title, text, dossier_title, date, explanation, embedding)` gets one row per motion
with an empty `explanation` and `embedding`, the columns the example jobs fill
(jobs/motions_nl.toml and jobs/motions_embed.toml). Rerunning replaces the database.
Sources and licences: data/README.md.
"""
import json
import os
import sqlite3
import sys

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)
shared = os.path.join(root, "..", "shared", "data", "motions", "tk_moties_fulltext.jsonl")
sample = os.path.join(root, "data", "motions_sample.jsonl")

source = sys.argv[1] if len(sys.argv) > 1 else (shared if os.path.exists(shared) else sample)
database = sys.argv[2] if len(sys.argv) > 2 else os.path.join(root, "data", "motions.db")

for suffix in ("", "-wal", "-shm"):
    if os.path.exists(database + suffix):
        os.remove(database + suffix)
db = sqlite3.connect(database)
db.execute(
    "CREATE TABLE motions (id TEXT PRIMARY KEY, title TEXT NOT NULL, text TEXT NOT NULL, "
    "dossier_title TEXT, date TEXT, explanation TEXT, embedding BLOB)"
)
rows = 0
with open(source, encoding="utf-8") as lines:
    for line in lines:
        if not line.strip():
            continue
        m = json.loads(line)
        db.execute(
            "INSERT OR IGNORE INTO motions (id, title, text, dossier_title, date) VALUES (?, ?, ?, ?, ?)",
            (m["id"], m["title"], m["text"], m.get("dossier_title"), m.get("date")),
        )
        rows += 1
db.commit()
db.close()
print(f"{database}: {rows} motions from {os.path.relpath(source)}", file=sys.stderr)
