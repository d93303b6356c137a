#!/usr/bin/env bash
# Checks the Helm chart against a running cluster:
#   helm lint; helm install (cluster-wide mode) into recording-canary-system; `kubectl auth can-i`
#   as the controller's ServiceAccount for what it must and must not be allowed; helm uninstall;
#   then the same for namespaced mode (watchNamespaces), where the rights hold only in the
#   watched namespace; then the update strategy across changes of shards (install, upgrades).
#   The fences (ValidatingAdmissionPolicies): rendered by default, refused on a cluster without the
#   API unless turned off, installed without CEL type-checking warnings, and which stay on uninstall.
#   (tests/e2e/fences.rs tries what they refuse.)
# Env:
#   KUBECONFIG   kubeconfig of the cluster (its user must be allowed to impersonate)
#   RC_KUBECTL   kubectl binary (default: kubectl)
#   RC_HELM      helm binary (default: helm); Helm 3 and Helm 4 both work (tests/run.sh runs it with each)
#   RC_CHART_NAMESPACE  release namespace (default: recording-canary-system)
#   RC_CHART     chart directory (default: charts/recording-canary of this repo)
# The image need not be pullable: the install does not wait for pods.
# Prints one line per check and exits non-zero if any check failed.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
chart=${RC_CHART:-$root/charts/recording-canary}
kubectl=${RC_KUBECTL:-kubectl}
helm=${RC_HELM:-helm}
ns=${RC_CHART_NAMESPACE:-recording-canary-system}
release=recording-canary
sa=recording-canary   # the chart's fullname for this release name
watched=rc-chart-check-watched
other=rc-chart-check-other

: "${KUBECONFIG:?KUBECONFIG must point at the cluster}"
export KUBECONFIG

passed=0 failed=0
ok()   { passed=$((passed + 1)); printf 'PASS  %s\n' "$*"; }
bad()  { failed=$((failed + 1)); printf 'FAIL  %s\n' "$*"; }
step() { printf '\n== %s\n' "$*"; }

created_ns=()
cleanup() {
  "$helm" uninstall "$release" -n "$ns" >/dev/null 2>&1 || true
  local n
  for n in "${created_ns[@]}"; do "$kubectl" delete namespace "$n" --wait=false >/dev/null 2>&1 || true; done
}
trap cleanup EXIT

ensure_ns() {
  if ! "$kubectl" get namespace "$1" >/dev/null 2>&1; then
    "$kubectl" create namespace "$1" >/dev/null && created_ns+=("$1")
  fi
}

# can <yes|no> <verb> <resource>[/<name>] <namespace> [--subresource=S]:
# the ServiceAccount's answer must be <yes|no>.
can() {
  local want=$1 verb=$2 res=$3 where=$4 got
  shift 4
  got=$("$kubectl" auth can-i "$verb" "$res" "$@" -n "$where" --as="system:serviceaccount:$ns:$sa" 2>/dev/null)
  got=${got:-error}
  if [ "$got" = "$want" ]; then ok "can-i $verb $res $* -n $where: $got"
  else bad "can-i $verb $res $* -n $where: got '$got', want '$want'"; fi
}

install() { # extra helm args
  local out
  # No --wait: neither Helm 3 (default false) nor Helm 4 (default hookOnly) waits for the pods then,
  # and Helm 4 warns about the boolean --wait=false.
  if out=$("$helm" install "$release" "$chart" -n "$ns" --create-namespace \
      --set replicaCount=1 "$@" 2>&1); then
    ok "helm install $*"
    return 0
  fi
  bad "helm install $*: $out"
  return 1
}

uninstall() {
  local out
  if out=$("$helm" uninstall "$release" -n "$ns" --wait 2>&1); then ok "helm uninstall"
  else bad "helm uninstall: $out"; fi
}

# What the controller must be able to do in <namespace>, and what it must never do.
controller_rights() {
  local where=$1
  can yes patch  virtualservices.networking.istio.io "$where"
  can yes create virtualservices.networking.istio.io "$where"
  can yes patch  destinationrules.networking.istio.io "$where"
  can yes create deployments.apps "$where"
  can yes delete deployments.apps "$where"
  can yes patch  pods "$where"
  can yes watch  services "$where"
  can yes create services "$where"
  can yes patch  services "$where"
  can yes delete services "$where"
  can yes watch  httproutes.gateway.networking.k8s.io "$where"
  can yes create httproutes.gateway.networking.k8s.io "$where"
  can yes patch  httproutes.gateway.networking.k8s.io "$where"
  can yes delete httproutes.gateway.networking.k8s.io "$where"
  can yes watch  grpcroutes.gateway.networking.k8s.io "$where"
  can yes watch  endpointslices.discovery.k8s.io "$where"
  can yes patch  recordingcanaries.recordingcanary.dev "$where"
  can yes patch  recordingcanaries.recordingcanary.dev "$where" --subresource=status
  can yes update recordingcanaries.recordingcanary.dev "$where" --subresource=finalizers
  can yes create events.events.k8s.io "$where"
  can no  get    secrets "$where"
  can no  list   configmaps "$where"
  can no  delete pods "$where"
  can no  update services "$where"
  can no  update httproutes.gateway.networking.k8s.io "$where"
  can no  patch  grpcroutes.gateway.networking.k8s.io "$where"
  can no  create grpcroutes.gateway.networking.k8s.io "$where"
  can no  delete grpcroutes.gateway.networking.k8s.io "$where"
  can no  patch  gateways.gateway.networking.k8s.io "$where"
  can no  create referencegrants.gateway.networking.k8s.io "$where"
  can no  patch  namespaces/"$where" "$where"
  can no  create recordingcanaries.recordingcanary.dev "$where"
  can no  update recordingcanaries.recordingcanary.dev "$where"
  can no  delete recordingcanaries.recordingcanary.dev "$where"
  can no  update virtualservices.networking.istio.io "$where"
}

no_rights() {
  local where=$1
  can no patch  virtualservices.networking.istio.io "$where"
  can no create deployments.apps "$where"
  can no create services "$where"
  can no patch  httproutes.gateway.networking.k8s.io "$where"
  can no get    namespaces/"$where" "$where"
  can no patch  pods "$where"
  can no list   recordingcanaries.recordingcanary.dev "$where"
}

lease_rights() {
  can yes create leases.coordination.k8s.io "$ns"
  can yes update leases.coordination.k8s.io/recording-canary "$ns"
  can no  update leases.coordination.k8s.io/some-other-lease "$ns"
  can no  create leases.coordination.k8s.io default
  # The partition record; a Lease of a build before partitions is only read.
  can yes update leases.coordination.k8s.io/recording-canary-partition "$ns"
  can no  delete leases.coordination.k8s.io/recording-canary-partition "$ns"
  can yes get    leases.coordination.k8s.io/recording-canary-shard-0 "$ns"
  can no  update leases.coordination.k8s.io/recording-canary-shard-0 "$ns"
  can no  get    leases.coordination.k8s.io/some-other-lease "$ns"
}

# The stable-label MutatingAdmissionPolicy: installed where the API is served, readable (and only it)
# by the controller, named in its args. <namespace-selector-expected: yes|no>
policy=$release-stable-label
stable_label_policy() {
  local scoped=$1 api args sel served="" rendered
  for api in v1 v1beta1; do
    if "$kubectl" get --raw "/apis/admissionregistration.k8s.io/$api" 2>/dev/null | grep -q '"mutatingadmissionpolicies"'; then
      served=$api; break
    fi
  done
  if [ -z "$served" ]; then
    bad "the cluster serves no MutatingAdmissionPolicy API (tests/cluster/up.sh enables it)"
    return
  fi
  # The chart installs the policy with the newest version the cluster serves (v1 from Kubernetes 1.36).
  rendered=$("$helm" get manifest "$release" -n "$ns" 2>/dev/null | grep -B1 '^kind: MutatingAdmissionPolicy$' | sed -n 's#^apiVersion: admissionregistration.k8s.io/##p')
  if [ "$rendered" = "$served" ]; then ok "policy installed as admissionregistration.k8s.io/$served"
  else bad "policy installed as admissionregistration.k8s.io/${rendered:-?}, the cluster serves $served"; fi
  for api in mutatingadmissionpolicy mutatingadmissionpolicybinding; do
    if "$kubectl" get "$api" "$policy" >/dev/null 2>&1; then ok "$api $policy installed"
    else bad "$api $policy not installed"; fi
  done
  can yes get "mutatingadmissionpolicies.admissionregistration.k8s.io/$policy" default
  can yes get "mutatingadmissionpolicybindings.admissionregistration.k8s.io/$policy" default
  can no  get "mutatingadmissionpolicies.admissionregistration.k8s.io/someone-elses" default
  can no  list mutatingadmissionpolicies.admissionregistration.k8s.io default
  can no  update "mutatingadmissionpolicies.admissionregistration.k8s.io/$policy" default
  args=$("$kubectl" -n "$ns" get deployment "$release" -o jsonpath='{.spec.template.spec.containers[0].args}' 2>/dev/null)
  case $args in
    *"--stable-label-policy=$policy"*) ok "controller args carry --stable-label-policy=$policy" ;;
    *) bad "controller args lack --stable-label-policy=$policy: $args" ;;
  esac
  sel=$("$kubectl" get mutatingadmissionpolicybinding "$policy" -o jsonpath='{.spec.matchResources.namespaceSelector.matchExpressions[0].values}' 2>/dev/null)
  case $scoped:$sel in
    yes:*"$watched"*|no:) ok "binding namespaces: ${sel:-all}" ;;
    *) bad "binding namespaces: '${sel}' (scoped to the watched namespaces expected: $scoped)" ;;
  esac
}

# The fences: every policy installed with its binding, and none with a CEL type-checking warning
# (the API server checks each expression against the schemas of the kinds it matches).
fences=(namespaces owners deployments clone-templates pods pod-roles virtualservices destinationrules services httproutes canaries)
fence_policies() {
  local f name gen seen warn
  for f in "${fences[@]}"; do
    name=$release-fence-$f
    if ! "$kubectl" get validatingadmissionpolicybinding "$name" >/dev/null 2>&1; then
      bad "fence $name: no binding"; continue
    fi
    # The API server type-checks a policy after it is written; wait for its observedGeneration.
    gen=$("$kubectl" get validatingadmissionpolicy "$name" -o jsonpath='{.metadata.generation}' 2>/dev/null)
    for _ in $(seq 1 20); do
      seen=$("$kubectl" get validatingadmissionpolicy "$name" -o jsonpath='{.status.observedGeneration}' 2>/dev/null)
      [ -n "$gen" ] && [ "$seen" = "$gen" ] && break
      sleep 0.5
    done
    warn=$("$kubectl" get validatingadmissionpolicy "$name" -o jsonpath='{.status.typeChecking.expressionWarnings}' 2>/dev/null)
    if [ -z "$gen" ]; then bad "fence $name: no policy"
    elif [ "$seen" != "$gen" ]; then bad "fence $name: not type-checked (observedGeneration '$seen' of $gen)"
    elif [ -n "$warn" ]; then bad "fence $name: type-checking warnings: $warn"
    else ok "fence $name installed, type-checked without warnings"; fi
  done
}

helm_version=$("$helm" version --short 2>/dev/null) || helm_version="$helm: no version"
kube_version=$("$kubectl" get --raw /version 2>/dev/null | sed -n 's/.*"gitVersion": *"\(v[^"]*\)".*/\1/p' | head -1)
step "helm lint (Helm $helm_version, Kubernetes ${kube_version:-?})"
if out=$("$helm" lint "$chart" 2>&1); then ok "helm lint"; else bad "helm lint"; printf '%s\n' "$out"; fi
for api in v1 v1beta1; do
  if out=$("$helm" template "$release" "$chart" --api-versions "admissionregistration.k8s.io/$api/MutatingAdmissionPolicy" 2>&1) &&
     grep -q "apiVersion: admissionregistration.k8s.io/$api" <<<"$out"; then ok "helm template renders the admission policy ($api)"
  else bad "helm template (admission policy $api)"; printf '%s\n' "$out"; fi
done
if out=$("$helm" lint "$chart" --set "watchNamespaces={a,b}" 2>&1); then ok "helm lint (namespaced)"
else bad "helm lint (namespaced)"; printf '%s\n' "$out"; fi
# A cluster that lists its kinds (an install) but serves no ValidatingAdmissionPolicy: refused,
# naming the value that turns the fences off; with it off, rendered without them.
vap=admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy
n_fences() { grep -c '^kind: ValidatingAdmissionPolicy$' <<<"$1"; }
if out=$("$helm" template "$release" "$chart" --api-versions apps/v1/Deployment 2>&1); then
  bad "helm template on a cluster without ValidatingAdmissionPolicy rendered"
elif grep -q 'fencePolicies.enabled=false' <<<"$out"; then ok "no ValidatingAdmissionPolicy API: refused, naming fencePolicies.enabled"
else bad "no ValidatingAdmissionPolicy API: refused without naming fencePolicies.enabled: $out"; fi
if out=$("$helm" template "$release" "$chart" --api-versions apps/v1/Deployment --set fencePolicies.enabled=false 2>&1) &&
   [ "$(n_fences "$out")" = 0 ]; then ok "fencePolicies.enabled=false: rendered without fences"
else bad "fencePolicies.enabled=false: $(head -c 300 <<<"$out")"; fi
if out=$("$helm" template "$release" "$chart" --api-versions apps/v1/Deployment --api-versions "$vap" 2>&1) &&
   [ "$(n_fences "$out")" = "${#fences[@]}" ]; then ok "with the API: ${#fences[@]} fences rendered"
else bad "with the API: $(n_fences "$out") fences rendered, want ${#fences[@]}: $(head -c 300 <<<"$out")"; fi

# A namespace that an earlier run (the other Helm major's, say) deleted may still be terminating.
for n in "$ns" "$watched" "$other"; do
  if [ "$("$kubectl" get namespace "$n" -o jsonpath='{.status.phase}' 2>/dev/null)" = Terminating ]; then
    "$kubectl" wait --for=delete "namespace/$n" --timeout=120s >/dev/null 2>&1 || true
  fi
done

step "cluster-wide mode"
"$kubectl" get namespace "$ns" >/dev/null 2>&1 || created_ns+=("$ns")
"$helm" uninstall "$release" -n "$ns" >/dev/null 2>&1 || true   # leftovers of an earlier run
ensure_ns "$watched"
if install; then
  if "$kubectl" get crd recordingcanaries.recordingcanary.dev >/dev/null 2>&1; then ok "CRD recordingcanaries.recordingcanary.dev installed"
  else bad "CRD recordingcanaries.recordingcanary.dev not installed"; fi
  if "$kubectl" -n "$ns" get deployment "$release" >/dev/null 2>&1; then ok "Deployment $ns/$release exists"
  else bad "Deployment $ns/$release missing"; fi
  controller_rights default
  controller_rights "$watched"
  # Namespaces (their Istio ambient labels): read, every one.
  can yes watch namespaces default
  can yes get   namespaces/"$other" default
  can no  patch namespaces/"$watched" default
  lease_rights
  stable_label_policy no
  fence_policies
  uninstall
  if "$kubectl" get mutatingadmissionpolicy "$policy" >/dev/null 2>&1; then bad "helm uninstall left the policy $policy"
  else ok "helm uninstall removed the policy"; fi
  # All fences go but the one with Deployment parameters, which stays (see fence-policies.yaml):
  # the next install adopts it.
  if "$kubectl" get validatingadmissionpolicy "$release-fence-pods" >/dev/null 2>&1; then bad "helm uninstall left the fence $release-fence-pods"
  else ok "helm uninstall removed the fences"; fi
  if "$kubectl" get validatingadmissionpolicybinding "$release-fence-clone-templates" >/dev/null 2>&1; then ok "helm uninstall kept $release-fence-clone-templates"
  else bad "helm uninstall removed $release-fence-clone-templates (the API server may stop its Deployment parameter cache)"; fi
fi

step "namespaced mode (watchNamespaces={$watched})"
ensure_ns "$other"
if install --set "watchNamespaces={$watched}"; then
  args=$("$kubectl" -n "$ns" get deployment "$release" -o jsonpath='{.spec.template.spec.containers[0].args}' 2>/dev/null)
  case $args in
    *"--namespace=$watched"*) ok "controller args carry --namespace=$watched" ;;
    *) bad "controller args lack --namespace=$watched: $args" ;;
  esac
  controller_rights "$watched"
  # Namespaces: only the watched ones, by name (get, or watch with a metadata.name field selector).
  can yes get   namespaces/"$watched" default
  can yes watch namespaces/"$watched" default
  can no  list  namespaces default
  can no  watch namespaces default
  no_rights "$other"
  no_rights default
  lease_rights
  stable_label_policy yes
  fence_policies
  sel=$("$kubectl" get validatingadmissionpolicybinding "$release-fence-pods" -o jsonpath='{.spec.matchResources.namespaceSelector.matchExpressions[0].values}' 2>/dev/null)
  case $sel in
    *"$watched"*) ok "fence bindings scoped to the watched namespaces: $sel" ;;
    *) bad "fence bindings not scoped to the watched namespaces: '$sel'" ;;
  esac
  uninstall
fi

# The Deployment's update strategy: every old pod deleted as the new ones are created (maxSurge 0,
# maxUnavailable 100%) while there are several shards, now or in the running release (a change of
# shards moves namespaces between shards: no two processes may reconcile one namespace during the
# rollout); with one shard the new replica comes first (25%/25%). Every change keeps working under
# Helm 4's server-side apply.
strategy_is() { # <want> <what>
  local got
  got=$("$kubectl" -n "$ns" get deployment "$release" -o jsonpath='{.spec.strategy.type}/{.spec.strategy.rollingUpdate.maxSurge}/{.spec.strategy.rollingUpdate.maxUnavailable}' 2>/dev/null)
  if [ "$got" = "$1" ]; then ok "$2: strategy $got"
  else bad "$2: strategy '$got', want '$1'"; fi
}
upgrade() { # extra helm args
  local out
  if out=$("$helm" upgrade "$release" "$chart" -n "$ns" "$@" 2>&1); then ok "helm upgrade $*"; return 0; fi
  bad "helm upgrade $*: $out"
  return 1
}
step "update strategy and shards"
if install --set shards=2 --set replicaCount=2; then
  strategy_is RollingUpdate/0/100% "2 shards"
  # The shard Leases carry the count; the plain name is another count's, only read.
  can yes update leases.coordination.k8s.io/recording-canary-shard-1-of-2 "$ns"
  can no  update leases.coordination.k8s.io/recording-canary "$ns"
  can yes get    leases.coordination.k8s.io/recording-canary "$ns"
  can no  update leases.coordination.k8s.io/recording-canary-shard-0-of-3 "$ns"
  upgrade --set shards=1 --set replicaCount=2 && strategy_is RollingUpdate/0/100% "2 shards -> 1 (the running release has 2)"
  # The running release's replicas keep renewing their Leases until the rollout stops them.
  can yes update leases.coordination.k8s.io/recording-canary "$ns"
  can yes update leases.coordination.k8s.io/recording-canary-shard-1-of-2 "$ns"
  upgrade --set shards=1 --set replicaCount=2 && strategy_is RollingUpdate/25%/25% "1 shard, running 1"
  can no  update leases.coordination.k8s.io/recording-canary-shard-1-of-2 "$ns"
  args=$("$kubectl" -n "$ns" get deployment "$release" -o jsonpath='{.spec.template.spec.containers[0].args}' 2>/dev/null)
  case $args in
    *'--partition-generation=3"'*) ok "the partition generation is the release revision (3)" ;;
    *) bad "controller args lack --partition-generation=3: $args" ;;
  esac
  upgrade --set shards=3 --set replicaCount=3 && strategy_is RollingUpdate/0/100% "1 shard -> 3"
  upgrade --set shards=3 --set replicaCount=3 --set updateStrategy.type=Recreate && strategy_is Recreate// "updateStrategy set"
  uninstall
fi

printf '\n%d passed, %d failed\n' "$passed" "$failed"
[ "$failed" -eq 0 ]
