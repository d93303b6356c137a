# Shared helpers for up.sh, down.sh and tests/run.sh. Source it; it sources versions.sh
# (RC_K8S_VERSION=1.37|1.35 and RC_HELM_MAJOR=4|3 pick the versions; see there).
# shellcheck shell=bash disable=SC2034
# shellcheck source=versions.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/versions.sh"

RC_CLUSTER_NAME=${RC_CLUSTER_NAME:-rcanary}

# kwokctl keeps its own state (pid files, pki, etcd data, logs) under $KWOK_WORKDIR/clusters/<name>.
# Keep it inside our cache so it never mixes with a user's ~/.kwok.
export KWOK_WORKDIR=${KWOK_WORKDIR:-$RC_CACHE_DIR/kwok}
# Tell kwokctl what it is running (it would otherwise assume its own default version)
# and where kubectl is, so that nothing is ever downloaded.
export KWOK_KUBE_VERSION=$K8S_VERSION
export KWOK_KUBECTL_BINARY=$K8S_BIN/kubectl

RC_KWOKCTL=$KWOK_BIN/kwokctl
RC_KUBECTL=$K8S_BIN/kubectl
RC_HELM=$HELM_BIN/helm
# Both Helm majors (RC_HELM is the one RC_HELM_MAJOR picks; build each with RC_HELM_MAJOR=3|4 build.sh).
RC_HELM3=$HELM3_BIN/helm
RC_HELM4=$HELM4_BIN/helm

# The kubeconfig of cluster <name> (written by up.sh): $RC_CACHE_DIR/clusters/<name>/kubeconfig
rc_kubeconfig() { printf '%s\n' "$RC_CACHE_DIR/clusters/${1:-$RC_CLUSTER_NAME}/kubeconfig"; }

# Bin dirs to prepend to PATH so that `kubectl`, `helm`, `kwokctl` are the pinned ones.
rc_path() { printf '%s:%s:%s:%s\n' "$K8S_BIN" "$HELM_BIN" "$KWOK_BIN" "$ETCD_BIN"; }

RC_T0=${RC_T0:-$(date +%s)}
rc_say() { printf '[%s %4ss] %s\n' "${RC_TAG:-rc}" "$(( $(date +%s) - RC_T0 ))" "$*" >&2; }
rc_die() { rc_say "ERROR: $*"; exit 1; }

# True when process <pid> exists and is not a zombie (in containers PID 1 often does not reap orphans).
rc_pid_alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

# kwokctl's state dir for cluster <name>.
rc_kwok_dir() { printf '%s\n' "$KWOK_WORKDIR/clusters/${1:-$RC_CLUSTER_NAME}"; }

# Removes pid files of cluster <name> that no longer belong to one of its processes (e.g. after a
# reboot the pid may have been reused by an unrelated process, which `kwokctl delete` would then kill).
# kwokctl starts every component with its working directory set to the cluster dir, so that is the test.
# Prints the number of live component processes.
rc_prune_pidfiles() {
  local dir pidfile pid cwd n=0
  dir=$(rc_kwok_dir "${1:-}")
  for pidfile in "$dir"/pids/*.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile" 2>/dev/null || true)
    cwd=$(readlink "/proc/$pid/cwd" 2>/dev/null || true)
    if [ -n "$pid" ] && rc_pid_alive "$pid" && [ "$cwd" = "$(cd "$dir" && pwd -P)" ]; then
      n=$((n + 1))
    else
      rm -f "$pidfile"
    fi
  done
  echo "$n"
}
