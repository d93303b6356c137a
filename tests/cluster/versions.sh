# shellcheck shell=bash disable=SC2034
# Pinned versions of the local control plane. Sourced by build.sh, up.sh and down.sh.
# Changing one of these rebuilds only that component (the cache is keyed by version).
K8S_VERSION=v1.34.4
K8S_STAGING_VERSION=v0.34.4
ETCD_VERSION=v3.6.16
KWOK_VERSION=v0.8.0
HELM_VERSION=v3.19.5
ISTIO_API_VERSION=v1.31.4
# MutatingAdmissionPolicy is beta (off by default) in 1.34-1.35 and GA from 1.36: the chart's policy that
# labels the target's pods at admission needs both switches here.
K8S_FEATURE_GATES=MutatingAdmissionPolicy=true
K8S_RUNTIME_CONFIG=admissionregistration.k8s.io/v1beta1=true

RC_CACHE_DIR=${RC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/recording-canary}
K8S_BIN=$RC_CACHE_DIR/kubernetes-$K8S_VERSION
ETCD_BIN=$RC_CACHE_DIR/etcd-$ETCD_VERSION
KWOK_BIN=$RC_CACHE_DIR/kwok-$KWOK_VERSION
HELM_BIN=$RC_CACHE_DIR/helm-$HELM_VERSION
ISTIO_DIR=$RC_CACHE_DIR/istio-api-$ISTIO_API_VERSION
