#!/usr/bin/env python3
"""Sums up the e2e tests' make-before-break figures (one JSON line per test, written by
tests/e2e/support.rs) into the table of the README's Safety section. Exits non-zero if any
violation was recorded or if no test recorded anything."""
import json
import sys

path = sys.argv[1]
try:
    rows = [json.loads(l) for l in open(path) if l.strip()]
except FileNotFoundError:
    print(f"no safety figures at {path}: did the e2e tests run?", file=sys.stderr)
    sys.exit(1)
if not rows:
    print(f"{path} is empty: no e2e test finished", file=sys.stderr)
    sys.exit(1)
tests = len(rows)
faults = sum(r["faults"] for r in rows)
vs = sum(r["vs_revisions"] for r in rows)
dr = sum(r["dr_revisions"] for r in rows)
violations = sum(r["violations"] for r in rows)
print("| e2e tests with the make-before-break watcher | faults injected | VirtualService revisions checked | DestinationRule revisions checked | violations |")
print("| --- | --- | --- | --- | --- |")
print(f"| {tests} | {faults} | {vs} | {dr} | {violations} |")
sys.exit(1 if violations else 0)
