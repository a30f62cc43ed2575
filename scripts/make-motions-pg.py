#!/usr/bin/env python3
"""Loads the example Dutch parliamentary motions into PostgreSQL (with psql; no Python driver).

    scripts/make-motions-pg.py [--database URL] [--schema SCHEMA] [SOURCE.jsonl]

SOURCE defaults to ../shared/data/motions/tk_moties_fulltext.jsonl when it exists, else to the
sample shipped in data/motions_sample.jsonl. URL defaults to postgres://postgres@127.0.0.1:5432/test
and SCHEMA to motions_demo. The table SCHEMA.motions(id, title, text, dossier_title, date,
explanation) gets one row per motion with an empty `explanation`, the column the example job
fills (the same table as scripts/make-motions-db.py builds in SQLite). Rerunning replaces the
table. Run the job against it with

    backfill run jobs/motions_nl.toml --database "URL?options=-c%20search_path%3DSCHEMA"

so the job's `motions` table and the runner tables are found in SCHEMA.
"""
import argparse
import csv
import io
import json
import os
import re
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)
shared = os.path.join(root, "..", "shared", "data", "motions", "tk_moties_fulltext.jsonl")
sample = os.path.join(root, "data", "motions_sample.jsonl")

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("source", nargs="?", default=shared if os.path.exists(shared) else sample)
parser.add_argument("--database", default="postgres://postgres@127.0.0.1:5432/test")
parser.add_argument("--schema", default="motions_demo")
args = parser.parse_args()
if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", args.schema):
    sys.exit(f"--schema {args.schema!r}: use a plain SQL identifier (letters, digits, _)")

rows, seen = io.StringIO(), set()
out = csv.writer(rows)  # an unquoted empty field is NULL to COPY
with open(args.source, encoding="utf-8") as lines:
    for line in lines:
        if not line.strip():
            continue
        m = json.loads(line)
        if m["id"] in seen:
            continue
        seen.add(m["id"])
        out.writerow([m["id"], m["title"], m["text"], m.get("dossier_title") or None, m.get("date") or None])


def psql(command, data=None):
    try:
        result = subprocess.run(["psql", args.database, "-q", "-X", "-v", "ON_ERROR_STOP=1", "-c", command],
                                input=data, capture_output=True, text=True,
                                env={**os.environ, "PGOPTIONS": "-c client_min_messages=warning"})
    except FileNotFoundError:
        sys.exit("psql is not installed; install the PostgreSQL client (e.g. apt-get install postgresql-client)")
    if result.returncode != 0:
        sys.exit(f"psql failed: {result.stderr.strip()}")


schema = args.schema
psql(f"CREATE SCHEMA IF NOT EXISTS {schema}; DROP TABLE IF EXISTS {schema}.motions; "
     f"CREATE TABLE {schema}.motions (id TEXT PRIMARY KEY, title TEXT NOT NULL, text TEXT NOT NULL, "
     f"dossier_title TEXT, date TEXT, explanation TEXT)")
psql(f"\\copy {schema}.motions (id, title, text, dossier_title, date) FROM STDIN WITH (FORMAT csv)", rows.getvalue())
print(f"{schema}.motions: {len(seen)} motions from {os.path.relpath(args.source)}", file=sys.stderr)
