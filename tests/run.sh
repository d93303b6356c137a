#!/usr/bin/env bash
# The test command: formatting, lints, unit tests, then the integration/end-to-end tests under tests/
# against a real Kubernetes control plane.
#
#   bash tests/run.sh
#
# By default it builds (once, cached under ~/.cache/recording-canary; ~16-20 min cold on 2 cores)
# and starts a local control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
# kwok fake nodes; see tests/cluster/up.sh), and deletes it again on exit.
#
# Env:
#   RC_KUBECONFIG=path   use this existing cluster instead (e.g. kind with Istio installed); nothing is
#                        built or started; only this repo's crds/ are applied (Istio CRDs must exist there).
#                        RC_KUBECTL / RC_HELM may point at the binaries to use with it.
#   RC_KEEP_CLUSTER=1    leave the local cluster running after the tests (tests/cluster/down.sh NAME stops it).
#   RC_CLUSTER_NAME=...  name of the local cluster (default: rcanary-e2e).
#   RC_TEST_THREADS=N    test threads for the integration tests (default 2).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
export RC_CLUSTER_NAME=${RC_CLUSTER_NAME:-rcanary-e2e}
export RC_T0=${RC_T0:-$(date +%s)}
# shellcheck disable=SC2034 # RC_TAG is used by rc_say (lib.sh)
RC_TAG=run
user_kubectl=${RC_KUBECTL:-}
user_helm=${RC_HELM:-}
# shellcheck source=cluster/lib.sh
source "$repo/tests/cluster/lib.sh"

section_t0=$RC_T0
section() {
  local now; now=$(date +%s)
  printf '\n==== [%4ss total] %s\n' "$((now - RC_T0))" "$*" >&2
  section_t0=$now
}
done_section() { rc_say "ok ($(( $(date +%s) - section_t0 ))s)"; }

# --- toolchain ---------------------------------------------------------------------------------
section "toolchain"
command -v cargo >/dev/null || rc_die "cargo is not on PATH"
if command -v rustup >/dev/null; then
  missing=()
  installed=$(rustup component list --installed 2>/dev/null || true)
  grep -q '^rustfmt' <<<"$installed" || missing+=(rustfmt)
  grep -q '^clippy' <<<"$installed" || missing+=(clippy)
  if [ ${#missing[@]} -gt 0 ]; then
    rc_say "installing rustup components: ${missing[*]}"
    rustup component add "${missing[@]}"
  fi
fi
cargo fmt --version >/dev/null 2>&1 || rc_die "cargo fmt is not available (rustup component add rustfmt)"
cargo clippy --version >/dev/null 2>&1 || rc_die "cargo clippy is not available (rustup component add clippy)"
rc_say "$(cargo --version); $(rustc --version)"

# --- cluster -----------------------------------------------------------------------------------
started_cluster=0
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ "$started_cluster" = 1 ]; then
    if [ "${RC_KEEP_CLUSTER:-}" = 1 ]; then
      rc_say "RC_KEEP_CLUSTER=1: leaving cluster '$RC_CLUSTER_NAME' running; stop it with: bash tests/cluster/down.sh $RC_CLUSTER_NAME"
      rc_say "  export KUBECONFIG=$kubeconfig"
    else
      section "tearing down cluster '$RC_CLUSTER_NAME'"
      bash "$repo/tests/cluster/down.sh" "$RC_CLUSTER_NAME" || rc_say "WARNING: down.sh failed"
    fi
  fi
  if [ "$rc" = 0 ]; then
    printf '\n==== [%4ss total] PASSED\n' "$(( $(date +%s) - RC_T0 ))" >&2
  else
    printf '\n==== [%4ss total] FAILED (exit %s)\n' "$(( $(date +%s) - RC_T0 ))" "$rc" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ -n "${RC_KUBECONFIG:-}" ]; then
  section "using the existing cluster from RC_KUBECONFIG=$RC_KUBECONFIG"
  [ -r "$RC_KUBECONFIG" ] || rc_die "RC_KUBECONFIG=$RC_KUBECONFIG is not readable"
  kubeconfig=$RC_KUBECONFIG
  # RC_KUBECTL / RC_HELM from the environment win; then the pinned binaries if built; then PATH.
  if [ -n "$user_kubectl" ]; then RC_KUBECTL=$user_kubectl
  elif [ ! -x "$RC_KUBECTL" ]; then RC_KUBECTL=$(command -v kubectl) || rc_die "kubectl not found"; fi
  if [ -n "$user_helm" ]; then RC_HELM=$user_helm
  elif [ ! -x "$RC_HELM" ]; then RC_HELM=$(command -v helm || echo helm); fi
  "$RC_KUBECTL" --kubeconfig "$kubeconfig" version >&2
  if compgen -G "crds/*.yaml" >/dev/null || compgen -G "crds/*.yml" >/dev/null; then
    crd_names=$("$RC_KUBECTL" --kubeconfig "$kubeconfig" apply --server-side --force-conflicts -f crds/ -o name)
    echo "$crd_names" >&2
    # shellcheck disable=SC2086 # one word per CRD
    "$RC_KUBECTL" --kubeconfig "$kubeconfig" wait --for condition=established $crd_names --timeout=60s >/dev/null
    # The garbage collector notices new resource types only every 30 s: wait until our CRDs are 35 s old,
    # otherwise objects owned by our custom resources would not be deleted with them.
    for c in $crd_names; do
      created=$("$RC_KUBECTL" --kubeconfig "$kubeconfig" get "$c" -o jsonpath='{.metadata.creationTimestamp}')
      age=$(( $(date +%s) - $(date -d "$created" +%s) ))
      if [ "$age" -lt 35 ]; then
        rc_say "$c is new (${age}s); waiting $((35 - age))s for the garbage collector to watch it"
        sleep $((35 - age))
      fi
    done
  fi
  done_section
else
  section "building the local control plane (cached after the first run; ~9-20 min cold)"
  bash "$repo/tests/cluster/build.sh"
  done_section
  section "starting local cluster '$RC_CLUSTER_NAME'"
  kubeconfig=$(rc_kubeconfig "$RC_CLUSTER_NAME")
  started_cluster=1 # from here on, the trap tears it down (also when up.sh fails half-way)
  bash "$repo/tests/cluster/up.sh" "$RC_CLUSTER_NAME" >/dev/null
  done_section
fi

# --- static checks and unit tests --------------------------------------------------------------
section "cargo fmt --all -- --check"
cargo fmt --all -- --check
done_section

section "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
done_section

section "unit tests: cargo test --lib --bins"
cargo test --lib --bins
done_section

# --- integration / end-to-end tests ------------------------------------------------------------
export RC_E2E_KUBECONFIG=$kubeconfig
export KUBECONFIG=$kubeconfig
export RC_KUBECTL RC_HELM
# `kubectl` and `helm` on PATH are the same binaries as RC_KUBECTL and RC_HELM.
if [ -z "${RC_KUBECONFIG:-}" ]; then PATH="$(rc_path):$PATH"; fi
for b in "$RC_HELM" "$RC_KUBECTL"; do
  case $b in /*) [ -x "$b" ] && PATH="$(dirname "$b"):$PATH" ;; esac
done
export PATH

section "chart: helm lint, install, RBAC proven with kubectl auth can-i (tests/chart/check.sh)"
bash "$repo/tests/chart/check.sh"
done_section

# Every integration test target (tests/*.rs, or [[test]] in Cargo.toml), by name.
test_args=()
if meta=$(cargo metadata --no-deps --format-version 1 2>/dev/null); then
  if command -v python3 >/dev/null; then
    names=$(python3 -c 'import json,sys
for p in json.load(sys.stdin)["packages"]:
    for t in p["targets"]:
        if "test" in t["kind"]: print(t["name"])' <<<"$meta")
  elif command -v jq >/dev/null; then
    names=$(jq -r '.packages[].targets[] | select(.kind | index("test")) | .name' <<<"$meta")
  else
    names=__all__
  fi
  if [ "$names" = __all__ ]; then test_args=(--tests)
  else for n in $names; do test_args+=(--test "$n"); done; fi
else
  test_args=(--tests)
fi

if [ ${#test_args[@]} -eq 0 ]; then
  section "integration tests: none found under tests/"
else
  section "integration tests: cargo test ${test_args[*]} -- --test-threads=${RC_TEST_THREADS:-2}"
  rc_say "RC_E2E_KUBECONFIG=$RC_E2E_KUBECONFIG"
  rc_say "RC_KUBECTL=$RC_KUBECTL ($("$RC_KUBECTL" version --client 2>/dev/null | head -1))"
  rc_say "RC_HELM=$RC_HELM"
  safety_log=$(cargo metadata --no-deps --format-version 1 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])' 2>/dev/null || echo "$repo/target")/e2e-logs/safety.jsonl
  rm -f "$safety_log"
  cargo test "${test_args[@]}" -- --test-threads="${RC_TEST_THREADS:-2}"
  done_section
  section "safety summary (from the e2e run: $safety_log)"
  python3 "$repo/tests/safety_summary.py" "$safety_log"
  done_section
fi
