#!/usr/bin/env python3
"""Sums up the e2e tests' make-before-break figures (one JSON line per test, written by
testkit/src/support.rs) into the tables of the README's Safety section: what the watcher checked
(VirtualService, DestinationRule and EndpointSlice revisions, weights checked against Ready
endpoints, waits checked against the canary's propagationDelay) and the faults injected, by kind.
Exits non-zero if any violation was recorded or if no test recorded anything."""
import collections
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


def total(key):
    # Lines written before a figure existed count 0 for it.
    return sum(r.get(key, 0) for r in rows)


kinds = collections.Counter()
for r in rows:
    by_kind = r.get("faults_by_kind")
    if by_kind is None:
        # A line without kinds (an older harness): its faults under one kind.
        by_kind = {"unnamed": r.get("faults", 0)}
    kinds.update({k: n for k, n in by_kind.items() if n})
faults = sum(kinds.values())
violations = total("violations")
waits = total("waits_checked")
print(
    "| e2e tests with the make-before-break watcher | faults injected | VirtualService revisions checked "
    "| DestinationRule revisions checked | EndpointSlice revisions checked | weights checked against Ready endpoints "
    "| waits checked against propagationDelay (ended by Istio's report) | violations |"
)
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
print(
    f"| {len(rows)} | {faults} | {total('vs_revisions')} | {total('dr_revisions')} | {total('eps_revisions')} "
    f"| {total('endpoint_checks')} | {waits} ({total('waits_by_istio')}) | {violations} |"
)
print()
print("| fault kind | faults injected |")
print("| --- | --- |")
for kind, n in sorted(kinds.items()):
    print(f"| {kind} | {n} |")
if not kinds:
    print("| (none) | 0 |")
if violations:
    bad = [r["namespace"] for r in rows if r.get("violations")]
    print(f"\n{violations} violations, in: {', '.join(bad)}", file=sys.stderr)
sys.exit(1 if violations else 0)
