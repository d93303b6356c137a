#!/usr/bin/env bash
# Stops and deletes the local cluster started by up.sh. Kills only that cluster's processes
# (kwokctl tracks them by pid file) and succeeds when nothing is running.
# Usage: tests/cluster/down.sh [NAME]      (default NAME: rcanary)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck disable=SC2034 # RC_TAG is used by rc_say (lib.sh)
RC_TAG=down
# shellcheck source=lib.sh
source "$here/lib.sh"

name=${1:-$RC_CLUSTER_NAME}
kubeconfig=$(rc_kubeconfig "$name")
kwok_dir=$(rc_kwok_dir "$name")

if [ ! -e "$kwok_dir" ]; then
  rc_say "no cluster '$name'; nothing to do"
  rm -rf "$(dirname "$kubeconfig")"
  exit 0
fi
if [ ! -x "$RC_KWOKCTL" ]; then
  rc_die "cluster dir $kwok_dir exists but $RC_KWOKCTL is missing; run tests/cluster/build.sh"
fi
rc_say "deleting cluster '$name' ($(rc_prune_pidfiles "$name") processes)"
pids=""
for f in "$kwok_dir"/pids/*.pid; do [ -f "$f" ] && pids="$pids $(cat "$f")"; done # (no trailing newline in them)
"$RC_KWOKCTL" --name "$name" delete cluster --kubeconfig "$kubeconfig" >&2 ||
  "$RC_KWOKCTL" --name "$name" delete cluster --force --kubeconfig "$kubeconfig" >&2
# kwokctl SIGKILLs the processes; wait until they are really gone (ports free, etcd data unlocked).
for _ in $(seq 1 50); do
  alive=0
  for pid in $pids; do rc_pid_alive "$pid" && alive=1; done
  [ "$alive" = 0 ] && break
  sleep 0.2
done
[ "$alive" = 0 ] || rc_say "WARNING: some processes of '$name' are still running: $pids"
rm -rf "$(dirname "$kubeconfig")"
rc_say "cluster '$name' deleted"
