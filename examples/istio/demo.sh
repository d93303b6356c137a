#!/usr/bin/env bash
# The demo, in one command on a fresh machine:
#   bash examples/istio/demo.sh                 # set up and run (Istio: VirtualService weights)
#   bash examples/istio/demo.sh --gateway-api   # the same through the Gateway API router: an
#                                               # ambient namespace, your HTTPRoute split between
#                                               # the canary's two Services
#   bash examples/istio/demo.sh --down          # stop the controller and the local cluster
#
# It builds (once, cached) and starts the local control plane (tests/cluster/up.sh), builds the
# controller, installs the example app (examples/istio/app.yaml) in namespace `demo`, runs the
# controller in the background, applies the RecordingCanary at 10% and shows `kubectl get rcanary`
# and the VirtualService weights (with --gateway-api: examples/gateway-api/, the HTTPRoute's
# weights). The cluster and the controller keep running so that you can go on (`kubectl patch`,
# `kubectl delete`); the script prints the commands. The local control plane runs no mesh: with
# --gateway-api a stand-in (a loop of kubectl calls, stopped by --down) accepts the routes in
# their status, as a waypoint's controller would.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
export RC_CLUSTER_NAME=${RC_CLUSTER_NAME:-rcanary-demo}
RC_TAG=demo
# shellcheck source=../../tests/cluster/lib.sh
source "$repo/tests/cluster/lib.sh"
ns=${RC_DEMO_NAMESPACE:-demo}
state_dir="$RC_CACHE_DIR/demo"
pidfile="$state_dir/controller.pid"
meshpid="$state_dir/mesh.pid"
log="$state_dir/controller.log"
mkdir -p "$state_dir"

stop_controller() {
  if [ -f "$pidfile" ]; then
    local pid; pid=$(cat "$pidfile")
    if rc_pid_alive "$pid" && grep -q recording-canary "/proc/$pid/cmdline" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do rc_pid_alive "$pid" || break; sleep 0.1; done
    fi
    rm -f "$pidfile"
  fi
}

stop_mesh() {
  if [ -f "$meshpid" ]; then
    kill "$(cat "$meshpid")" 2>/dev/null || true
    rm -f "$meshpid"
  fi
}

gateway_api=0
case "${1:-}" in
  --down)
    stop_mesh
    stop_controller
    bash "$repo/tests/cluster/down.sh" "$RC_CLUSTER_NAME"
    exit 0
    ;;
  --gateway-api) gateway_api=1 ;;
  "") ;;
  *) echo "usage: $0 [--gateway-api | --down]" >&2; exit 2 ;;
esac

rc_say "1/6 local control plane, Kubernetes $K8S_VERSION (first run builds it from Go modules: ~20-35 min; then ~10 s)"
bash "$repo/tests/cluster/up.sh" "$RC_CLUSTER_NAME"
KUBECONFIG=$(rc_kubeconfig "$RC_CLUSTER_NAME"); export KUBECONFIG
k() { "$RC_KUBECTL" "$@"; }

rc_say "2/6 building the controller (cargo build; a few minutes the first time)"
cargo build --quiet --bin recording-canary

rc_say "3/6 example app in namespace $ns"
k create namespace "$ns" --dry-run=client -o yaml | k apply -f - >/dev/null
if [ "$gateway_api" = 1 ]; then
  # Ambient mode, with the namespace's waypoint (examples/gateway-api/).
  k label namespace "$ns" istio.io/dataplane-mode=ambient istio.io/use-waypoint=waypoint --overwrite >/dev/null
  k apply -n "$ns" -f examples/gateway-api/waypoint.yaml
else
  k label namespace "$ns" istio-injection=enabled --overwrite >/dev/null # the cluster's stand-in injector labels its pods
fi
k apply -n "$ns" -f examples/istio/app.yaml
k rollout status -n "$ns" deployment/frontend --timeout=120s

rc_say "4/6 controller (log: $log), and the chart's stable-label admission policy"
# The policy that labels the target's new pods at admission, rendered from the chart as
# `helm install` would on this cluster: MutatingAdmissionPolicy v1 (GA, Kubernetes 1.36+) where
# served, else the v1beta1 of 1.34-1.35 (the local control plane switches it on there).
policy=demo-recording-canary-stable-label
policy_api=v1beta1
if k get --raw /apis/admissionregistration.k8s.io/v1 2>/dev/null | grep -q '"mutatingadmissionpolicies"'; then
  policy_api=v1
fi
"$RC_HELM" template demo charts/recording-canary --show-only templates/stable-label-policy.yaml \
  --set rbac.create=false \
  --api-versions "admissionregistration.k8s.io/$policy_api/MutatingAdmissionPolicy" | k apply -f - >/dev/null
stop_controller
RUST_LOG=${RUST_LOG:-info} nohup "$repo/target/debug/recording-canary" run --leader-elect=false \
  --admin-addr 127.0.0.1:9090 --stable-label-policy "$policy" >"$log" 2>&1 &
echo $! >"$pidfile"

# The stand-in mesh: every HTTPRoute of the namespace accepted (Accepted and ResolvedRefs True
# for its current generation, per parent), as a waypoint's controller reports it.
accept_routes() {
  while true; do
    for r in $(k get httproute -n "$ns" -o name 2>/dev/null); do
      gen=$(k get -n "$ns" "$r" -o jsonpath='{.metadata.generation}')
      seen=$(k get -n "$ns" "$r" -o jsonpath='{.status.parents[0].conditions[0].observedGeneration}')
      [ "$gen" = "$seen" ] && continue
      parents=$(k get -n "$ns" "$r" -o jsonpath='{.spec.parentRefs}')
      cond='{"status":"True","observedGeneration":'"$gen"',"lastTransitionTime":"2026-01-01T00:00:00Z","message":"demo stand-in mesh"'
      status=$(printf '%s' "$parents" | sed -E 's/\{"group"/{"parentRef":{"group"/g; s/\}(,|\])/},"controllerName":"demo.recordingcanary.dev\/mesh","conditions":[CONDS]}\1/g')
      status=${status//CONDS/$cond,\"type\":\"Accepted\",\"reason\":\"Accepted\"\},$cond,\"type\":\"ResolvedRefs\",\"reason\":\"ResolvedRefs\"\}}
      k patch -n "$ns" "$r" --subresource=status --type=merge -p "{\"status\":{\"parents\":$status}}" >/dev/null 2>&1 || true
    done
    sleep 1
  done
}

if [ "$gateway_api" = 1 ]; then
  stop_mesh
  accept_routes &
  echo $! >"$meshpid"
  k apply -n "$ns" -f examples/gateway-api/route.yaml
  rc_say "5/6 RecordingCanary at 10% (router: GatewayAPI)"
  k apply -n "$ns" -f examples/gateway-api/canary.yaml
else
  rc_say "5/6 RecordingCanary at 10%"
  k apply -n "$ns" -f examples/istio/canary.yaml
fi
if ! k wait -n "$ns" --for=condition=Ready rcanary/frontend --timeout=120s; then
  rc_say "the canary did not become Ready; its status and the controller log follow"
  k get rcanary -n "$ns" frontend -o yaml || true
  tail -n 40 "$log" || true
  exit 1
fi

rc_say "6/6 result"
k get rcanary -n "$ns" -o wide
echo
k get deployments -n "$ns"
echo
if [ "$gateway_api" = 1 ]; then
  k get services -n "$ns"
  echo
  echo "HTTPRoute weights:"
  k get httproutes -n "$ns" -o go-template='{{range .items}}{{$r := .metadata.name}}{{range .spec.rules}}{{$rule := .name}}{{range .backendRefs}}  {{$r}} rule {{$rule}}: {{.name}}:{{.port}} weight={{.weight}}{{"\n"}}{{end}}{{end}}{{end}}'
else
  echo "VirtualService weights:"
  k get virtualservices -n "$ns" -o go-template='{{range .items}}{{$vs := .metadata.name}}{{range .spec.http}}{{range .route}}  {{$vs}}: {{.destination.host}} subset={{.destination.subset}} weight={{.weight}}{{"\n"}}{{end}}{{end}}{{end}}'
fi
echo
cat <<TXT
Go on:
  export KUBECONFIG=$KUBECONFIG
  alias kubectl=$RC_KUBECTL
  kubectl patch rcanary frontend -n $ns --type merge -p '{"spec":{"percent":25}}'
  kubectl scale deployment/frontend -n $ns --replicas=9
  kubectl describe rcanary frontend -n $ns          # conditions and events
  curl -s localhost:9090/metrics | grep recording_canary_
  kubectl delete rcanary frontend -n $ns            # rolls everything back
Stop everything:
  bash examples/istio/demo.sh --down
TXT
