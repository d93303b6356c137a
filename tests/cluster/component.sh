#!/usr/bin/env bash
# Stops one control-plane component of a local cluster, or starts the ones that are not running,
# as a node's kubelet would for its static pods. For fault tests (tests/restart.rs) that take
# down etcd or the kube-apiserver alone.
#
# Usage: tests/cluster/component.sh NAME stop COMPONENT   SIGKILL one component (etcd, kube-apiserver,
#                                                         kube-controller-manager, kube-scheduler,
#                                                         kwok-controller), as kwokctl stop does
#        tests/cluster/component.sh NAME start            start every component of NAME that does not
#                                                         run (with kwokctl's own command lines); the
#                                                         running ones are left alone
# kwokctl has no command for one component, but `kwokctl start cluster` skips every component
# whose pid file names a live process, so removing one pid file and starting the cluster starts
# exactly that component again.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck disable=SC2034 # RC_TAG is used by rc_say (lib.sh)
RC_TAG=component
# shellcheck source=lib.sh
source "$here/lib.sh"

name=${1:?usage: component.sh NAME stop COMPONENT | component.sh NAME start}
action=${2:?usage: component.sh NAME stop COMPONENT | component.sh NAME start}
dir=$(rc_kwok_dir "$name")
[ -d "$dir/pids" ] || rc_die "no cluster '$name' ($dir)"

case $action in
  stop)
    component=${3:?usage: component.sh NAME stop COMPONENT}
    pidfile=$dir/pids/$component.pid
    [ -f "$pidfile" ] || rc_die "cluster '$name' has no running $component ($pidfile)"
    pid=$(cat "$pidfile")
    # Only a process of this cluster (kwokctl starts each in the cluster dir); never a reused pid.
    [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$(cd "$dir" && pwd -P)" ] ||
      rc_die "pid $pid of $pidfile is not a process of cluster '$name'"
    kill -KILL "$pid"
    for _ in $(seq 1 50); do rc_pid_alive "$pid" || break; sleep 0.1; done
    rc_pid_alive "$pid" && rc_die "$component (pid $pid) is still running"
    rm -f "$pidfile"
    rc_say "stopped $component of cluster '$name' (pid $pid)"
    ;;
  start)
    # Pid files of exited processes (zombies included, which kwokctl counts as running) go first.
    live=$(rc_prune_pidfiles "$name")
    rc_say "cluster '$name': $live components running; starting the others"
    "$RC_KWOKCTL" --name "$name" start cluster >&2
    rc_say "cluster '$name': $(rc_prune_pidfiles "$name") components running"
    ;;
  *) rc_die "unknown action '$action' (stop or start)" ;;
esac
