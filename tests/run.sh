#!/usr/bin/env bash
# The test command: formatting, lints, unit tests, the container image (a static build and an OCI
# image layout, inspected by tests/image.rs), then the integration/end-to-end tests under tests/
# against a real Kubernetes control plane.
#
#   bash tests/run.sh        (or: cargo xtask test)
#
# By default it builds (once, cached under ~/.cache/recording-canary; see docs/development.md for the cold
# times on 2 cores) and starts a local control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kwok fake nodes; see tests/cluster/up.sh), and deletes it again on exit. It does so
# for each Kubernetes version of RC_K8S_VERSIONS, one after the other:
#   - the first (1.37, the default): the whole suite with Helm 4, tests/chart/check.sh with
#     Helm 4 and Helm 3, and tests/alerts/check.sh (the chart's alerts and dashboard, with
#     promtool) (tests/restart.rs, which stops and starts its control plane, on a cluster of its
#     own, NAME-restart);
#   - each further one (1.35, the oldest supported): the core user flow, that is tests/chart/check.sh
#     with Helm 4 and Helm 3 and the e2e tests `flows::`, `chart::` and `stable_labels::` with Helm 3.
#
# Env:
#   RC_K8S_VERSIONS="1.37 1.35"  the Kubernetes versions of the local control plane, in that order
#                        (see tests/cluster/versions.sh). RC_K8S_VERSIONS=1.37 runs only the first pass.
#   RC_CORE_TESTS="flows:: chart:: stable_labels::"  the e2e filters of the further versions' pass.
#   RC_KUBECONFIG=path   use this existing cluster instead (e.g. kind with Istio installed); nothing is
#                        built or started; only this repo's crds/ are applied (Istio CRDs must exist there).
#                        RC_KUBECTL / RC_HELM may point at the binaries to use with it. One pass only.
#   RC_KEEP_CLUSTER=1    leave the local clusters running after the tests (tests/cluster/down.sh NAME stops one).
#   RC_CLUSTER_NAME=...  name of the first local cluster (default: rcanary-e2e); the further versions'
#                        clusters are NAME-v135 and so on.
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
read -r -a k8s_versions <<<"${RC_K8S_VERSIONS:-1.37 1.35}"
[ ${#k8s_versions[@]} -gt 0 ] || { echo "RC_K8S_VERSIONS is empty" >&2; exit 1; }
export RC_K8S_VERSION=${k8s_versions[0]}
read -r -a core_tests <<<"${RC_CORE_TESTS:-flows:: chart:: stable_labels::}"
base_path=$PATH
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
running_clusters=() # started by this run and not torn down yet
# Tears down (or, with RC_KEEP_CLUSTER=1, leaves running) the clusters this run started.
stop_clusters() {
  local c
  for c in "${running_clusters[@]}"; do
    if [ "${RC_KEEP_CLUSTER:-}" = 1 ]; then
      rc_say "RC_KEEP_CLUSTER=1: leaving cluster '$c' running; stop it with: bash tests/cluster/down.sh $c"
      rc_say "  export KUBECONFIG=$(rc_kubeconfig "$c")"
    else
      section "tearing down cluster '$c'"
      bash "$repo/tests/cluster/down.sh" "$c" || rc_say "WARNING: down.sh failed"
    fi
  done
  running_clusters=()
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_clusters
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
  section "building the local control plane, Kubernetes $K8S_VERSION, Helm $HELM4_VERSION and $HELM3_VERSION (cached after the first run)"
  bash "$repo/tests/cluster/build.sh"
  RC_HELM_MAJOR=3 bash "$repo/tests/cluster/build.sh" # adds Helm 3 only
  done_section
  section "starting local cluster '$RC_CLUSTER_NAME' (Kubernetes $K8S_VERSION)"
  kubeconfig=$(rc_kubeconfig "$RC_CLUSTER_NAME")
  running_clusters+=("$RC_CLUSTER_NAME") # from here on, the trap tears it down (also when up.sh fails half-way)
  bash "$repo/tests/cluster/up.sh" "$RC_CLUSTER_NAME" >/dev/null
  done_section
fi

# --- static checks and unit tests --------------------------------------------------------------
section "cargo fmt --all -- --check"
cargo fmt --all -- --check
done_section

# --workspace: the controller, testkit/ (the shared test code) and xtask/ (the developer commands).
section "cargo clippy --workspace --all-targets -- -D warnings (and with --features failpoints, as the integration tests build)"
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy --workspace --all-targets --features failpoints -- -D warnings
done_section

# xtask's doc comments are its --help text (`<DIR>` and the like), not rustdoc.
section "docs: RUSTDOCFLAGS=-D warnings cargo doc --workspace --exclude xtask --no-deps (every intra-doc link resolves)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --exclude xtask --no-deps --quiet
done_section

section "unit tests: cargo test --workspace --lib --bins (the controller's, testkit's and xtask's)"
cargo test --workspace --lib --bins
done_section

target_dir=$(cargo metadata --no-deps --format-version 1 2>/dev/null |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])' 2>/dev/null || echo "$repo/target")

# --- the container image -----------------------------------------------------------------------
# The image tool, xtask/ (its lints and unit tests, among them the same bytes for the same binary,
# ran above with the workspace's): the static release build (a build of its own: about 15 min cold
# on 2 cores, seconds warm) and the OCI image layout;
# tests/image.rs, among the integration tests below, inspects this layout. The static build's target
# directory is cached outside the work tree, like the control plane (a fresh clone then rebuilds only
# this crate); RC_STATIC_TARGET_DIR overrides it.
section "image: static build and OCI layout (cargo xtask image)"
export RC_OCI_LAYOUT=$target_dir/oci/recording-canary
cargo xtask image --target-dir "${RC_STATIC_TARGET_DIR:-$RC_CACHE_DIR/cargo-static}" --out "$RC_OCI_LAYOUT"
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

# tests/chart/check.sh with each Helm major built here (with RC_KUBECONFIG: with RC_HELM only).
chart_checks() {
  local helms=("$RC_HELM") h
  [ -n "${RC_KUBECONFIG:-}" ] || helms=("$RC_HELM4" "$RC_HELM3")
  for h in "${helms[@]}"; do
    section "chart: helm lint, install, RBAC proven with kubectl auth can-i (tests/chart/check.sh; $h)"
    RC_HELM=$h bash "$repo/tests/chart/check.sh"
    done_section
  done
}
chart_checks

# The chart's alert rules and dashboard, with promtool (built and cached by tests/cluster/build.sh;
# with RC_KUBECONFIG, by `build.sh promtool` here): no cluster. A missing promtool fails the run.
section "alerts and dashboard: promtool check rules and test rules, every metric named is exported (tests/alerts/check.sh)"
if [ -n "${RC_KUBECONFIG:-}" ]; then bash "$repo/tests/cluster/build.sh" promtool; fi
RC_HELM=$RC_HELM bash "$repo/tests/alerts/check.sh"
done_section

# The e2e tests' make-before-break figures (testkit/src/support.rs), summed up after each e2e run.
safety_log=$target_dir/e2e-logs/safety.jsonl

# Every integration test target of the workspace's packages (tests/*.rs, or [[test]] in a
# Cargo.toml), by name; the shared test code is testkit/, a library, not a test target.
test_args=()
restart_test=0
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
  else
    for n in $names; do
      # tests/restart.rs stops and starts its cluster: it runs on a cluster of its own, below.
      if [ "$n" = restart ]; then restart_test=1; else test_args+=(--test "$n"); fi
    done
  fi
else
  test_args=(--tests)
fi

rm -f "$safety_log"
if [ ${#test_args[@]} -eq 0 ]; then
  section "integration tests: none found under tests/"
else
  # --features failpoints: the controller under test takes FAILPOINTS (tests/e2e/failpoints.rs).
  section "integration tests: cargo test --workspace --features failpoints ${test_args[*]} -- --test-threads=${RC_TEST_THREADS:-2}"
  rc_say "RC_E2E_KUBECONFIG=$RC_E2E_KUBECONFIG"
  rc_say "RC_KUBECTL=$RC_KUBECTL ($("$RC_KUBECTL" version --client 2>/dev/null | head -1))"
  rc_say "RC_HELM=$RC_HELM"
  cargo test --workspace --features failpoints "${test_args[@]}" -- --test-threads="${RC_TEST_THREADS:-2}"
  done_section
fi
if [ "$restart_test" = 1 ]; then
  if [ -n "${RC_KUBECONFIG:-}" ]; then
    rc_say "skipping tests/restart.rs: it stops and starts its cluster, and RC_KUBECONFIG names yours"
  else
    stop_clusters # one cluster at a time on the 2 cores
    restart_cluster="$RC_CLUSTER_NAME-restart"
    section "starting local cluster '$restart_cluster' for tests/restart.rs, which stops and starts it (Kubernetes $K8S_VERSION)"
    running_clusters+=("$restart_cluster")
    RC_NODE_LEASE_SECONDS=8 bash "$repo/tests/cluster/up.sh" "$restart_cluster" >/dev/null
    done_section
    section "integration test: cargo test --test restart"
    RC_RESTART_CLUSTER=$restart_cluster RC_KWOKCTL=$RC_KWOKCTL RC_E2E_KUBECONFIG=$(rc_kubeconfig "$restart_cluster") \
      KUBECONFIG=$(rc_kubeconfig "$restart_cluster") cargo test --features failpoints --test restart -- --test-threads="${RC_TEST_THREADS:-2}"
    done_section
  fi
fi
if [ ${#test_args[@]} -gt 0 ] || [ -s "$safety_log" ]; then
  section "safety summary (from the e2e run on Kubernetes $K8S_VERSION: $safety_log)"
  python3 "$repo/tests/safety_summary.py" "$safety_log"
  done_section
fi

# --- the further Kubernetes versions: the core user flow ----------------------------------------
if [ -z "${RC_KUBECONFIG:-}" ]; then
  for v in "${k8s_versions[@]:1}"; do
    stop_clusters # one cluster at a time on the 2 cores
    export RC_K8S_VERSION=$v
    # shellcheck source=cluster/lib.sh
    source "$repo/tests/cluster/lib.sh" # the binaries of this version
    name="$RC_CLUSTER_NAME-v${v//./}"
    section "building the local control plane, Kubernetes $K8S_VERSION (cached after the first run)"
    bash "$repo/tests/cluster/build.sh"
    done_section
    section "starting local cluster '$name' (Kubernetes $K8S_VERSION)"
    kubeconfig=$(rc_kubeconfig "$name")
    running_clusters+=("$name")
    bash "$repo/tests/cluster/up.sh" "$name" >/dev/null
    done_section
    export RC_E2E_KUBECONFIG=$kubeconfig KUBECONFIG=$kubeconfig RC_KUBECTL
    PATH="$(rc_path):$base_path"
    chart_checks
    # The e2e chart tests with Helm 3 here (the first pass ran them with Helm 4).
    export RC_HELM=$RC_HELM3
    section "core user flow on Kubernetes $K8S_VERSION with Helm $HELM3_VERSION: cargo test --test e2e -- ${core_tests[*]}"
    rm -f "$safety_log"
    cargo test --features failpoints --test e2e -- --test-threads="${RC_TEST_THREADS:-2}" "${core_tests[@]}"
    done_section
    section "safety summary (from the e2e run on Kubernetes $K8S_VERSION: $safety_log)"
    python3 "$repo/tests/safety_summary.py" "$safety_log"
    done_section
  done
fi
