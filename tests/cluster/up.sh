#!/usr/bin/env bash
# Starts (or reuses) a local Kubernetes control plane for the end-to-end tests:
#   etcd + kube-apiserver + kube-controller-manager + kube-scheduler (real, built from Go modules by build.sh)
#   + kwok-controller, which fakes 3 nodes and makes scheduled pods Running/Ready within a second or so.
# No containers, no Docker, nothing downloaded at run time (every binary comes from the build.sh cache).
#
# Usage: tests/cluster/up.sh [NAME]        (default NAME: rcanary)
#        RC_K8S_VERSION=1.35 tests/cluster/up.sh NAME   (Kubernetes 1.37 by default; see versions.sh)
# Then:  export KUBECONFIG=$RC_CACHE_DIR/clusters/NAME/kubeconfig   (printed at the end)
#
# Idempotent: a healthy cluster of that name is reused; a stale one (e.g. after a reboot) is deleted and recreated.
# After start: this repo's crds/*.yaml, the Istio CRDs (istio.io/api) and the Gateway API standard channel
# CRDs (sigs.k8s.io/gateway-api, with its safe-upgrades ValidatingAdmissionPolicy) are applied server-side
# and waited for.
# Env: RC_SMOKE=0 skips the Deployment smoke check done on a freshly created cluster.
#      RC_NODE_LEASE_SECONDS=N: the fake nodes' leases last N times kwokctl's heartbeat factor (5) seconds
#      (default: kwokctl's, 200 s). tests/run.sh sets 8 (40 s, a kubelet's) for tests/restart.rs: with
#      200 s, a kwok-controller restarted with the control plane cannot take its nodes over, and so
#      runs no new pod, for minutes.
#      RC_UNLIMITED_QPS=1: kwokctl's --disable-qps-limits, on a newly created cluster only. The
#      controller-manager and scheduler then call the apiserver as fast as it answers, instead of at
#      their default client rate (20 requests/s for the controller-manager: about 4 new single-pod
#      Deployments a second). For fleet benchmarks of thousands of canaries; a running cluster keeps
#      the setting it was created with.
#      RC_ETCD_NO_FSYNC=1: etcd's --unsafe-no-fsync, on a newly created cluster only (data lost on a
#      crash of the machine; fine for a throw-away cluster). Takes the disk's fsync time out of every
#      write, so that latency benchmarks time the tools rather than this machine's disk.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck disable=SC2034 # RC_TAG is used by rc_say (lib.sh)
RC_TAG=up
# shellcheck source=lib.sh
source "$here/lib.sh"

name=${1:-$RC_CLUSTER_NAME}
kubeconfig=$(rc_kubeconfig "$name")
kwok_dir=$(rc_kwok_dir "$name")
nodes=${RC_NODES:-3}

rc_say "building/checking binaries (cached after the first run)"
bash "$here/build.sh"

k() { "$RC_KUBECTL" --kubeconfig "$kubeconfig" "$@"; }
kwokctl() { "$RC_KWOKCTL" --name "$name" "$@"; }

healthy() {
  [ -d "$kwok_dir" ] && [ -s "$kubeconfig" ] || return 1
  k --request-timeout=5s get --raw /readyz >/dev/null 2>&1 || return 1
  # All 5 component processes of this cluster must still be alive (pid files are kept by kwokctl).
  [ "$(rc_prune_pidfiles "$name")" -ge 5 ] || return 1
  # A cluster created before the MutatingAdmissionPolicy switches were added lacks the API: recreate it.
  # GA (v1) from 1.36; beta (v1beta1, switched on by versions.sh) in 1.34-1.35.
  local v
  for v in v1 v1beta1; do
    k --request-timeout=5s get --raw "/apis/admissionregistration.k8s.io/$v" 2>/dev/null |
      grep -q '"mutatingadmissionpolicies"' && return 0
  done
  return 1
}
# The Kubernetes version a running cluster reports (empty when it does not answer).
server_version() {
  k --request-timeout=5s get --raw /version 2>/dev/null | sed -n 's/.*"gitVersion": *"\(v[^"]*\)".*/\1/p' | head -1
}

fresh=0
if healthy; then
  running=$(server_version)
  # Never replace a healthy cluster of another version behind its user's back (RC_K8S_VERSION picks ours).
  [ "$running" = "$K8S_VERSION" ] ||
    rc_die "cluster '$name' runs Kubernetes ${running:-?}, this checkout wants $K8S_VERSION (RC_K8S_VERSION=${RC_K8S_VERSION}): stop it with tests/cluster/down.sh $name, or pick another name"
  rc_say "cluster '$name' is already running and healthy; reusing it"
else
  if [ -e "$kwok_dir" ]; then
    rc_say "cluster '$name' exists but is not healthy; deleting it"
    rc_prune_pidfiles "$name" >/dev/null
    kwokctl delete cluster --kubeconfig "$kubeconfig" >&2 || true
    rm -rf "$kwok_dir"
  fi
  mkdir -p "$(dirname "$kubeconfig")"
  rm -f "$kubeconfig"
  rc_say "creating cluster '$name' (kube $K8S_VERSION, etcd $ETCD_VERSION, kwok $KWOK_VERSION)"
  if ! kwokctl create cluster \
      --runtime binary \
      --kubeconfig "$kubeconfig" \
      --wait 120s \
      ${RC_NODE_LEASE_SECONDS:+--node-lease-duration-seconds "$RC_NODE_LEASE_SECONDS"} \
      $([ "${RC_UNLIMITED_QPS:-0}" = 1 ] && echo --disable-qps-limits) \
      $([ "${RC_ETCD_NO_FSYNC:-0}" = 1 ] && echo --extra-args etcd=unsafe-no-fsync=true) \
      --kube-feature-gates "$K8S_FEATURE_GATES" \
      --kube-runtime-config "$K8S_RUNTIME_CONFIG" \
      --etcd-binary "$ETCD_BIN/etcd" \
      --kube-apiserver-binary "$K8S_BIN/kube-apiserver" \
      --kube-controller-manager-binary "$K8S_BIN/kube-controller-manager" \
      --kube-scheduler-binary "$K8S_BIN/kube-scheduler" \
      --kwok-controller-binary "$KWOK_BIN/kwok" >&2; then
    rc_say "kwokctl create cluster failed; component logs:"
    for f in "$kwok_dir"/logs/*.log; do
      [ -f "$f" ] && { echo "--- $f (last 20 lines)" >&2; tail -20 "$f" >&2; }
    done
    kwokctl delete cluster --kubeconfig "$kubeconfig" >&2 || true
    exit 1
  fi
  fresh=1
fi

rc_say "scaling fake nodes to $nodes"
kwokctl scale node --replicas "$nodes" >&2
k wait --for=condition=Ready node --all --timeout=60s >/dev/null

running=$(server_version)
[ "$running" = "$K8S_VERSION" ] || rc_die "apiserver reports '$running', expected $K8S_VERSION"

# Our CRDs first, Istio's second, the Gateway API's last: the GC probe below uses a Gateway API kind,
# so once the garbage collector watches that kind it also watches every CRD created before it.
if compgen -G "$repo/crds/*.yaml" >/dev/null || compgen -G "$repo/crds/*.yml" >/dev/null; then
  rc_say "applying this repo's CRDs from crds/"
  k apply --server-side --force-conflicts -f "$repo/crds/" >&2
fi
rc_say "applying Istio CRDs (istio.io/api $ISTIO_API_VERSION)"
k apply --server-side --force-conflicts -f "$ISTIO_DIR/crds.yaml" >/dev/null
# 1.2 MB, about 4 s to apply: skipped on a cluster that has them all at this version already.
gateway_api_installed() {
  local want have
  want=$(grep -c '^kind: CustomResourceDefinition$' "$GATEWAY_API_DIR/crds.yaml")
  have=$(k get crd -o jsonpath='{range .items[*]}{.metadata.annotations.gateway\.networking\.k8s\.io/bundle-version}{"\n"}{end}' |
    grep -cx "$GATEWAY_API_VERSION" || true)
  [ "$have" = "$want" ] && k get validatingadmissionpolicybinding safe-upgrades.gateway.networking.k8s.io >/dev/null 2>&1
}
if gateway_api_installed; then
  rc_say "Gateway API CRDs $GATEWAY_API_VERSION (standard channel) already installed"
else
  rc_say "applying Gateway API CRDs (sigs.k8s.io/gateway-api $GATEWAY_API_VERSION, standard channel)"
  k apply --server-side --force-conflicts -f "$GATEWAY_API_DIR/crds.yaml" >/dev/null
fi
k wait --for condition=established crd --all --timeout=60s >/dev/null
rc_say "all CRDs established ($(k get crd --no-headers | wc -l) CRDs)"

# No istiod here: a MutatingAdmissionPolicy plays its sidecar injector (tests/cluster/istio-injector.yaml),
# labelling the pods of namespaces labelled istio-injection=enabled as injected pods are.
map_api=v1beta1
if k get --raw /apis/admissionregistration.k8s.io/v1 | grep -q '"mutatingadmissionpolicies"'; then map_api=v1; fi
rc_say "applying the stand-in for Istio's sidecar injector (MutatingAdmissionPolicy $map_api)"
sed "s/API_VERSION/$map_api/" "$repo/tests/cluster/istio-injector.yaml" | k apply --server-side --force-conflicts -f - >/dev/null

# kube-controller-manager's garbage collector picks up new resource types only on its discovery
# resync, every 30 s (hard-coded). Until then, objects owned by a custom resource (e.g. the clone
# Deployment owned by a RecordingCanary) are NOT deleted with their owner. Wait until it watches them:
# owner = a Gateway API HTTPRoute (the kind applied last), dependent = a ConfigMap; retry until
# deleting the owner removes the dependent.
gc_probe() {
  local ns=rc-gc-probe i uid deadline=$(( $(date +%s) + 90 ))
  k create namespace "$ns" --dry-run=client -o yaml | k apply -f - >/dev/null
  for ((i = 0; ; i++)); do
    printf 'apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: owner-%s}\nspec: {}\n' "$i" |
      k -n "$ns" apply -f - >/dev/null
    uid=$(k -n "$ns" get httproute.gateway.networking.k8s.io "owner-$i" -o jsonpath='{.metadata.uid}')
    printf '%s\n' "apiVersion: v1" "kind: ConfigMap" "metadata:" "  name: dependent-$i" \
      "  ownerReferences: [{apiVersion: gateway.networking.k8s.io/v1, kind: HTTPRoute, name: owner-$i, uid: \"$uid\"}]" |
      k -n "$ns" apply -f - >/dev/null
    sleep 1 # let the GC see the dependent before its owner goes
    k -n "$ns" delete httproute.gateway.networking.k8s.io "owner-$i" >/dev/null
    for _ in 1 2 3 4 5 6; do
      if ! k -n "$ns" get configmap "dependent-$i" >/dev/null 2>&1; then
        k delete namespace "$ns" --wait=false >/dev/null
        return 0
      fi
      sleep 0.5
    done
    [ "$(date +%s)" -lt "$deadline" ] || return 1
  done
}
rc_say "waiting until the garbage collector watches the CRDs (up to 30 s on a new cluster)"
gc_probe || rc_die "the garbage collector did not start watching custom resources within 90 s"
rc_say "garbage collection of custom-resource-owned objects works"

if [ "$fresh" = 1 ] && [ "${RC_SMOKE:-1}" = 1 ]; then
  rc_say "smoke check: a Deployment gets Ready pods on the fake nodes"
  ns=rc-smoke
  k create namespace "$ns" --dry-run=client -o yaml | k apply -f - >/dev/null
  k -n "$ns" create deployment smoke --image=registry.invalid/smoke:1 --replicas=2 >/dev/null
  k -n "$ns" rollout status deployment/smoke --timeout=60s >/dev/null ||
    rc_die "smoke Deployment did not become available: $(k -n "$ns" get pods -o wide 2>&1)"
  k delete namespace "$ns" --wait=false >/dev/null
  rc_say "smoke check passed"
fi

rc_say "cluster '$name' is up: $(k get --raw /version | sed -n 's/.*"gitVersion": *"\([^"]*\)".*/\1/p' | head -1), $(k get nodes --no-headers | wc -l) nodes"
echo "export KUBECONFIG=$kubeconfig"
echo "export RC_KUBECTL=$RC_KUBECTL"
echo "export RC_HELM=$RC_HELM"
echo "export PATH=$(rc_path):\$PATH"
