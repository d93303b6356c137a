# shellcheck shell=bash disable=SC2034
# Pinned versions of the local control plane. Sourced by build.sh, up.sh and down.sh.
# Changing one of these rebuilds only that component (the cache is keyed by version).
#
# Two Kubernetes versions are supported, picked with RC_K8S_VERSION:
#   1.37 (default, the current release)   1.35 (the oldest supported)
# and two Helm majors, picked with RC_HELM_MAJOR: 4 (default) or 3. RC_HELM is the picked one;
# RC_HELM3 and RC_HELM4 name both (build.sh builds the picked one; RC_HELM_MAJOR=3 build.sh the other).
RC_K8S_VERSION=${RC_K8S_VERSION:-1.37}
case ${RC_K8S_VERSION#v} in
  1.37 | 1.37.2)
    K8S_VERSION=v1.37.2
    K8S_STAGING_VERSION=v0.37.2
    # MutatingAdmissionPolicy is GA from 1.36 (admissionregistration.k8s.io/v1, served by default):
    # no switch needed.
    K8S_FEATURE_GATES=
    K8S_RUNTIME_CONFIG=
    ;;
  1.35 | 1.35.4)
    K8S_VERSION=v1.35.4
    K8S_STAGING_VERSION=v0.35.4
    # MutatingAdmissionPolicy is beta (off by default) in 1.34-1.35: the chart's policy that labels
    # the target's pods at admission needs both switches here.
    K8S_FEATURE_GATES=MutatingAdmissionPolicy=true
    K8S_RUNTIME_CONFIG=admissionregistration.k8s.io/v1beta1=true
    ;;
  *)
    echo "RC_K8S_VERSION=$RC_K8S_VERSION is not supported: use 1.37 (default) or 1.35" >&2
    return 1 2>/dev/null || exit 1
    ;;
esac
ETCD_VERSION=v3.7.3
# KWOK v0.8.0 is the newest release the Go module proxy serves; it passes our flags through and
# works with both Kubernetes versions above (its own tested list ends at 1.36).
KWOK_VERSION=v0.8.0
HELM4_VERSION=v4.3.1
HELM3_VERSION=v3.22.0
RC_HELM_MAJOR=${RC_HELM_MAJOR:-4}
case $RC_HELM_MAJOR in
  4) HELM_VERSION=$HELM4_VERSION ;;
  3) HELM_VERSION=$HELM3_VERSION ;;
  *)
    echo "RC_HELM_MAJOR=$RC_HELM_MAJOR is not supported: use 4 (default) or 3" >&2
    return 1 2>/dev/null || exit 1
    ;;
esac
ISTIO_API_VERSION=v1.32.0
# The Gateway API standard channel (config/crd/standard of the Go module sigs.k8s.io/gateway-api):
# its CRDs and its safe-upgrades ValidatingAdmissionPolicy, as `standard-install.yaml` installs them.
GATEWAY_API_VERSION=v1.6.3
# Prometheus's promtool (`promtool check rules`, `promtool test rules` on the chart's alerts;
# tests/alerts/check.sh), from the Go module github.com/prometheus/prometheus, whose versions are
# v0.<major><minor, two digits>.<patch> for the release v<major>.<minor>.<patch>.
PROMETHEUS_VERSION=v3.16.0
PROMETHEUS_MODULE_VERSION=v0.316.0

RC_CACHE_DIR=${RC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/recording-canary}
K8S_BIN=$RC_CACHE_DIR/kubernetes-$K8S_VERSION
ETCD_BIN=$RC_CACHE_DIR/etcd-$ETCD_VERSION
KWOK_BIN=$RC_CACHE_DIR/kwok-$KWOK_VERSION
HELM_BIN=$RC_CACHE_DIR/helm-$HELM_VERSION
HELM3_BIN=$RC_CACHE_DIR/helm-$HELM3_VERSION
HELM4_BIN=$RC_CACHE_DIR/helm-$HELM4_VERSION
ISTIO_DIR=$RC_CACHE_DIR/istio-api-$ISTIO_API_VERSION
GATEWAY_API_DIR=$RC_CACHE_DIR/gateway-api-$GATEWAY_API_VERSION
PROMTOOL_BIN=$RC_CACHE_DIR/promtool-$PROMETHEUS_VERSION
# The PromQL metric-name lister of tests/alerts/ (tests/alerts/promql-names, built with promtool's
# module version), keyed by its source as well: a change to it builds it again.
PROMQL_NAMES_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/../alerts/promql-names" && pwd)
PROMQL_NAMES_BIN=$RC_CACHE_DIR/promql-names-$PROMETHEUS_VERSION-$(cat "$PROMQL_NAMES_SRC"/*.go | sha256sum | cut -c1-12)
