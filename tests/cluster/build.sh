#!/usr/bin/env bash
# Builds the local control plane from Go modules into a per-user cache, keyed by version:
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok, kwokctl, helm,
#   the Istio CRDs from the istio.io/api module, and the Gateway API standard channel CRDs (with
#   their safe-upgrades ValidatingAdmissionPolicy) from the sigs.k8s.io/gateway-api module;
#   Prometheus's promtool and tests/alerts/promql-names (for tests/alerts/check.sh) from the
#   github.com/prometheus/prometheus module.
# `build.sh promtool` builds only the last two (tests/run.sh with RC_KUBECONFIG, which builds no
# control plane).
# Versions: tests/cluster/versions.sh. RC_K8S_VERSION=1.37|1.35 picks Kubernetes (default 1.37),
# RC_HELM_MAJOR=4|3 picks Helm (default 4); each version has its own cache dir, so building the
# other one later (e.g. RC_K8S_VERSION=1.35 bash tests/cluster/build.sh) adds only what is missing.
# Each component is built once; a second run only checks that the binaries are there (about a second).
# Cold, on 2 cores: see the set-up table in docs/development.md (Kubernetes is most of it); a few GB of Go caches
# per Kubernetes version (GOMODCACHE, GOCACHE), all outside the work tree.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.sh
source "$here/versions.sh"

command -v go >/dev/null || { echo "build.sh: Go is required (https://go.dev/dl); it is not on PATH" >&2; exit 1; }
export GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN=local
start=$(date +%s)
say() { printf '[build %4ss] %s\n' "$(( $(date +%s) - start ))" "$*" >&2; }

# CPU seconds (user + sys) used so far by this script's finished child processes (from /proc).
cpu_seconds() {
  local stat
  stat=$(cat "/proc/$$/stat" 2>/dev/null) || { echo 0; return; }
  stat=${stat##*) } # fields from the 3rd on; cutime and cstime are the 16th and 17th
  # shellcheck disable=SC2086 # split into fields
  set -- $stat
  echo $(( (${14} + ${15}) / $(getconf CLK_TCK) ))
}

# $1: final dir; the rest: a command that fills "$tmp". The dir appears only when the build succeeded.
build_into() {
  local dest=$1; shift
  if [ -f "$dest/.complete" ]; then say "cached: $dest"; return 0; fi
  local tmp="$dest.tmp.$$" t0 cpu0
  t0=$(date +%s) cpu0=$(cpu_seconds)
  rm -rf "$tmp"; mkdir -p "$tmp"
  "$@" "$tmp"
  touch "$tmp/.complete"
  rm -rf "$dest"; mv "$tmp" "$dest"
  say "built: $dest ($(( $(date +%s) - t0 ))s, $(( $(cpu_seconds) - cpu0 )) CPU s)"
}

wrapper_module() { # $1 dir, $2 name
  mkdir -p "$1"; cd "$1"
  rm -f go.mod go.sum
  go mod init "$2" >/dev/null 2>&1
}

build_kubernetes() {
  local out=$1 w="$RC_CACHE_DIR/src/kubernetes-$K8S_VERSION"
  say "kubernetes $K8S_VERSION: downloading the module (about 1 minute cold)"
  wrapper_module "$w" rc-build-kubernetes
  local dir
  dir=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -n "$dir" ] || { echo "could not download k8s.io/kubernetes@$K8S_VERSION" >&2; exit 1; }
  go mod edit -require="k8s.io/kubernetes@$K8S_VERSION"
  # Every staging module k8s.io/<name> => its published v0.x version.
  local m
  for m in $(sed -n 's#.*=> \./staging/src/\(k8s.io/[A-Za-z0-9._-]*\).*#\1#p' "$dir/go.mod" | sort -u); do
    go mod edit -replace="$m=$m@$K8S_STAGING_VERSION"
  done
  local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local ld="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
  local c
  for c in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    say "kubernetes $K8S_VERSION: building $c$([ "$c" = kube-apiserver ] && echo ' (the longest: 8-17 minutes cold on 2 cores)')"
    go build -trimpath -ldflags "$ld" -o "$out/$c" "k8s.io/kubernetes/cmd/$c"
  done
}

build_etcd() {
  local out=$1 w="$RC_CACHE_DIR/src/etcd-$ETCD_VERSION"
  say "etcd $ETCD_VERSION: building"
  wrapper_module "$w" rc-build-etcd
  go mod edit -require="go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  go build -trimpath -ldflags "-s -w" -o "$out/etcd" go.etcd.io/etcd/server/v3
}

build_kwok() {
  local out=$1
  say "kwok $KWOK_VERSION: building kwok and kwokctl"
  GOFLAGS='' GOBIN="$out" go install -trimpath -ldflags "-s -w" \
    "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwokctl@$KWOK_VERSION"
}

build_helm() {
  local out=$1 major=${HELM_VERSION%%.*}
  say "helm $HELM_VERSION: building"
  GOFLAGS='' GOBIN="$out" go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/$major/internal/version.version=$HELM_VERSION" "helm.sh/helm/$major/cmd/helm@$HELM_VERSION"
}

fetch_istio_crds() {
  local out=$1 dir
  say "istio.io/api $ISTIO_API_VERSION: fetching the CRDs"
  dir=$(cd /tmp && GOFLAGS='' go mod download -json "istio.io/api@$ISTIO_API_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  cp "$dir/kubernetes/customresourcedefinitions.gen.yaml" "$out/crds.yaml"
}

# The standard channel only: config/crd/standard/*.yaml (every CRD, then the safe-upgrades
# ValidatingAdmissionPolicy and its binding) as one file; no experimental CRD (that policy refuses
# them over standard ones).
fetch_gateway_api_crds() {
  local out=$1 dir f
  say "sigs.k8s.io/gateway-api $GATEWAY_API_VERSION: fetching the standard channel CRDs"
  dir=$(cd /tmp && GOFLAGS='' go mod download -json "sigs.k8s.io/gateway-api@$GATEWAY_API_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -n "$dir" ] || { echo "could not download sigs.k8s.io/gateway-api@$GATEWAY_API_VERSION" >&2; exit 1; }
  for f in "$dir"/config/crd/standard/*.yaml; do
    { echo "---"; cat "$f"; } >>"$out/crds.yaml"
  done
  grep -q '^kind: CustomResourceDefinition$' "$out/crds.yaml" && grep -q '^kind: ValidatingAdmissionPolicy$' "$out/crds.yaml" ||
    { echo "gateway-api: config/crd/standard lacks its CRDs or its safe-upgrades ValidatingAdmissionPolicy" >&2; exit 1; }
}

# promtool alone, without the service discovery plugins (-tags remove_all_sd: the cloud SDKs are
# most of Prometheus's dependencies, and rule checks and tests need none of them).
build_promtool() {
  local out=$1 w="$RC_CACHE_DIR/src/prometheus-$PROMETHEUS_VERSION"
  say "promtool $PROMETHEUS_VERSION: building (github.com/prometheus/prometheus@$PROMETHEUS_MODULE_VERSION)"
  wrapper_module "$w" rc-build-prometheus
  go mod edit -require="github.com/prometheus/prometheus@$PROMETHEUS_MODULE_VERSION"
  go build -trimpath -tags remove_all_sd \
    -ldflags "-s -w -X github.com/prometheus/common/version.Version=${PROMETHEUS_VERSION#v}" \
    -o "$out/promtool" github.com/prometheus/prometheus/cmd/promtool
}

# tests/alerts/promql-names, with the parser of the same module version as promtool.
build_promql_names() {
  local out=$1 w="$RC_CACHE_DIR/src/promql-names-$PROMETHEUS_VERSION"
  say "promql-names: building (Prometheus's PromQL parser $PROMETHEUS_MODULE_VERSION)"
  wrapper_module "$w" rc-promql-names
  go mod edit -require="github.com/prometheus/prometheus@$PROMETHEUS_MODULE_VERSION"
  cp "$PROMQL_NAMES_SRC"/*.go .
  go build -trimpath -ldflags "-s -w" -o "$out/promql-names" .
}

mkdir -p "$RC_CACHE_DIR"
if [ "${1:-}" = promtool ]; then
  build_into "$PROMTOOL_BIN" build_promtool
  build_into "$PROMQL_NAMES_BIN" build_promql_names
  exit 0
fi
build_into "$ISTIO_DIR" fetch_istio_crds
build_into "$GATEWAY_API_DIR" fetch_gateway_api_crds
build_into "$ETCD_BIN" build_etcd
build_into "$KWOK_BIN" build_kwok
build_into "$K8S_BIN" build_kubernetes
if [ "${RC_SKIP_HELM:-}" != 1 ]; then build_into "$HELM_BIN" build_helm; fi
build_into "$PROMTOOL_BIN" build_promtool
build_into "$PROMQL_NAMES_BIN" build_promql_names
say "done; binaries under $RC_CACHE_DIR"
