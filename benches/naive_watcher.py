#!/usr/bin/env python3
"""The naive reference of benches/side_by_side.rs: what a person would write in 20 lines.

Watches one RecordingCanary and, on every event, GETs the VirtualService and PUTs it back with the
weights of the routes to subsets rcanary-stable / rcanary-recording set to 100-p / p
(p = spec.percent). No cache, no retry logic, no status. Python 3 stdlib only; talks to the API
server through `kubectl proxy` (plain HTTP on loopback).

Usage: naive_watcher.py PROXY_URL NAMESPACE CANARY VIRTUALSERVICE
Prints "watching" on stdout when a watch is open. Its request counts go to stderr as one JSON line
on SIGUSR1 (and it goes on) and on SIGTERM (and it exits).
"""
import json
import signal
import sys
import urllib.error
import urllib.request

base, ns, canary, vs_name = sys.argv[1:5]
rc_url = f"{base}/apis/recordingcanary.dev/v1alpha1/namespaces/{ns}/recordingcanaries"
vs_url = f"{base}/apis/networking.istio.io/v1/namespaces/{ns}/virtualservices/{vs_name}"
counts = {"watch": 0, "get": 0, "put": 0}


def report(signum, _frame):
    print(json.dumps({"requests": sum(counts.values()), **counts}), file=sys.stderr, flush=True)
    if signum == signal.SIGTERM:
        sys.exit(0)


def call(method, url, body=None):
    counts[method.lower()] += 1
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method=method)
    with urllib.request.urlopen(req) as resp:
        return json.load(resp)


signal.signal(signal.SIGTERM, report)
signal.signal(signal.SIGUSR1, report)
while True:  # the API server ends a watch after 30-60 min: open a new one
    counts["watch"] += 1
    with urllib.request.urlopen(f"{rc_url}?watch=true&fieldSelector=metadata.name%3D{canary}") as stream:
        print("watching", flush=True)
        for line in stream:
            event = json.loads(line)
            if event["type"] not in ("ADDED", "MODIFIED"):
                continue
            p = event["object"]["spec"]["percent"]
            try:
                vs = call("GET", vs_url)
                for http in vs["spec"].get("http", []):
                    for dest in http.get("route", []):
                        subset = dest["destination"].get("subset")
                        if subset in ("rcanary-stable", "rcanary-recording"):
                            dest["weight"] = p if subset == "rcanary-recording" else 100 - p
                call("PUT", vs_url, vs)
            except urllib.error.HTTPError as e:  # a 409 on a concurrent change, say: wait for the next event
                print(f"naive_watcher: {e}", file=sys.stderr, flush=True)
