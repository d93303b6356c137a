#!/usr/bin/env bash
# Checks the chart's alerts and dashboard with Prometheus's promtool; no cluster needed.
#   1. The metric list: tests/alerts/exported-metrics.txt is the names of the samples the
#      controller's registry renders (the unit test
#      runtime::metrics::tests::exported_metric_names_are_the_list_the_alerts_check_reads keeps it
#      so; run here first).
#   2. The PrometheusRule: rendered with `helm template` (alerts.enabled, two shards), its
#      `.spec` (the groups) written to a rules file; `promtool check rules` on it and on the
#      default render (one shard); `promtool test rules tests/alerts/rules-test.yaml`, which makes
#      each alert fire and not fire.
#   3. The dashboard: the ConfigMap (dashboard.enabled) labelled for Grafana's sidecar, holding
#      the chart's dashboards/recording-canary.json; nothing of either rendered by default.
#   4. Every metric that a rule's expression or a dashboard query (panels and variables) names
#      is one of step 1's, as Prometheus's own PromQL parser reads them (tests/alerts/promql-names,
#      built beside promtool by tests/cluster/build.sh).
# Env:
#   RC_HELM          helm binary (default: the cached Helm 4 if built, else helm on PATH)
#   RC_PROMTOOL      promtool (default: the one tests/cluster/build.sh caches)
#   RC_PROMQL_NAMES  promql-names (default: the one tests/cluster/build.sh caches)
# Build both with `bash tests/cluster/build.sh promtool`. A missing one fails the check.
# Prints one line per check and exits non-zero if any check failed.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
# shellcheck source=../cluster/versions.sh
source "$root/tests/cluster/versions.sh"
chart=$root/charts/recording-canary
release=recording-canary
if [ -n "${RC_HELM:-}" ]; then helm=$RC_HELM
elif [ -x "$HELM4_BIN/helm" ]; then helm=$HELM4_BIN/helm
else helm=helm; fi
promtool=${RC_PROMTOOL:-$PROMTOOL_BIN/promtool}
names_bin=${RC_PROMQL_NAMES:-$PROMQL_NAMES_BIN/promql-names}
metrics_file=$here/exported-metrics.txt

passed=0 failed=0
ok()   { passed=$((passed + 1)); printf 'PASS  %s\n' "$*"; }
bad()  { failed=$((failed + 1)); printf 'FAIL  %s\n' "$*"; }
step() { printf '\n== %s\n' "$*"; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for b in "$promtool" "$names_bin"; do
  if [ ! -x "$b" ]; then
    bad "$b is missing: build it with: bash tests/cluster/build.sh promtool"
    printf '\n%d passed, %d failed\n' "$passed" "$failed"
    exit 1
  fi
done

# helm template with the values that render the rule and the dashboard (fences off: no cluster).
render() { "$helm" template "$release" "$chart" --set fencePolicies.enabled=false "$@" 2>"$work/helm.err"; }
# The `.spec` of the PrometheusRule in a rendered document, as a rules file (its groups).
rules_of() { sed -n '/^spec:$/,$p' | sed '1d; s/^  //'; }

step "the metrics the controller exports ($metrics_file)"
if out=$(cd "$root" && cargo test --quiet --lib -- --exact \
    runtime::metrics::tests::exported_metric_names_are_the_list_the_alerts_check_reads 2>&1); then
  ok "$(wc -l <"$metrics_file") metric names, equal to the registry's (unit test)"
else
  bad "the metric list differs from the registry's:"; printf '%s\n' "$out" | tail -20
fi

step "alert rules ($("$promtool" --version 2>&1 | head -1))"
if out=$("$helm" lint "$chart" --set alerts.enabled=true --set dashboard.enabled=true \
    --set 'alerts.labels.release=kube-prometheus-stack' --set alerts.runbookUrl=https://example.com/install.md 2>&1); then
  ok "helm lint (alerts.enabled, dashboard.enabled)"
else bad "helm lint (alerts.enabled, dashboard.enabled)"; printf '%s\n' "$out"; fi
if render --show-only templates/prometheusrule.yaml --set alerts.enabled=true \
    --set shards=2 --set replicaCount=3 >"$work/rule.yaml"; then
  rules_of <"$work/rule.yaml" >"$work/rules.yaml"
  if grep -q '^groups:$' "$work/rules.yaml"; then ok "helm template: the PrometheusRule (alerts.enabled=true, shards=2)"
  else bad "no groups in the rendered PrometheusRule"; cat "$work/rule.yaml"; fi
else
  bad "helm template (alerts.enabled=true): $(cat "$work/helm.err")"
fi
if out=$("$promtool" check rules "$work/rules.yaml" 2>&1); then ok "promtool check rules: $(tail -1 <<<"$out")"
else bad "promtool check rules"; printf '%s\n' "$out"; fi
if render --show-only templates/prometheusrule.yaml --set alerts.enabled=true | rules_of >"$work/rules-1.yaml" &&
   out=$("$promtool" check rules "$work/rules-1.yaml" 2>&1); then ok "promtool check rules (one shard): $(tail -1 <<<"$out")"
else bad "promtool check rules (one shard): $(cat "$work/helm.err")"; printf '%s\n' "${out:-}"; fi
# The test file names rules.yaml, next to it.
cp "$here/rules-test.yaml" "$work/"
if out=$(cd "$work" && "$promtool" test rules rules-test.yaml 2>&1); then ok "promtool test rules tests/alerts/rules-test.yaml"
else bad "promtool test rules tests/alerts/rules-test.yaml"; printf '%s\n' "$out"; fi
# Each alert of the rules has test cases (fire and not fire) in the test file.
for a in $(sed -n 's/^ *- alert: //p' "$work/rules.yaml"); do
  n=$(grep -c "alertname: $a\$" "$here/rules-test.yaml")
  if [ "$n" -ge 2 ]; then ok "$a: $n test cases"; else bad "$a: $n test cases in rules-test.yaml, want at least 2 (fires, does not)"; fi
done

step "dashboard"
if out=$(render 2>&1) && ! grep -qE '^kind: (PrometheusRule|ConfigMap)$' <<<"$out"; then
  ok "by default: no PrometheusRule, no dashboard ConfigMap"
else bad "by default: $(grep -E '^kind: (PrometheusRule|ConfigMap)$' <<<"$out" | tr '\n' ' ')$(cat "$work/helm.err")"; fi
if render --show-only templates/dashboard.yaml --set dashboard.enabled=true >"$work/dashboard.yaml"; then
  if grep -qx '    grafana_dashboard: "1"' "$work/dashboard.yaml"; then ok "ConfigMap labelled grafana_dashboard: \"1\""
  else bad "ConfigMap without the label grafana_dashboard: \"1\""; fi
  # The data is the chart's file, byte for byte.
  if python3 - "$work/dashboard.yaml" "$chart/dashboards/recording-canary.json" <<'PY'
import json, sys
doc = open(sys.argv[1]).read()
body = doc.split("  recording-canary.json: |-\n", 1)[1]
# A block scalar (|-): its lines, indented by 4, up to the end of the document.
data = "\n".join(l[4:] for l in body.rstrip().splitlines())
want = open(sys.argv[2]).read().rstrip("\n")
assert data == want, "the ConfigMap's data differs from dashboards/recording-canary.json"
json.loads(data)
PY
  then ok "ConfigMap data: dashboards/recording-canary.json, valid JSON"
  else bad "ConfigMap data"; fi
else bad "helm template (dashboard.enabled=true): $(cat "$work/helm.err")"; fi
if render --show-only templates/dashboard.yaml --set dashboard.enabled=true \
    --set dashboard.label=my_dashboards --set dashboard.labelValue=yes 2>/dev/null | grep -qx '    my_dashboards: "yes"'; then
  ok "dashboard.label and dashboard.labelValue name the label"
else bad "dashboard.label and dashboard.labelValue do not name the label"; fi

step "every metric named in the rules and the dashboard is one the controller exports"
# One PromQL expression per line: the rules' `expr`s, the dashboard's target queries and the
# selectors of its label_values() variables, with Grafana's interval variables given a value.
python3 - "$work/rules.yaml" "$chart/dashboards/recording-canary.json" >"$work/queries.txt" <<'PY' || bad "could not collect the queries"
import json, re, sys
rules = open(sys.argv[1]).read().splitlines()
out = []
i = 0
while i < len(rules):
    m = re.match(r'^(\s*)expr: ?(.*)$', rules[i])
    if m:
        indent, first = len(m.group(1)), m.group(2)
        if first in ("|-", "|", ">-", ">"):
            body = []
            i += 1
            while i < len(rules) and (not rules[i].strip() or len(rules[i]) - len(rules[i].lstrip()) > indent):
                body.append(rules[i].strip())
                i += 1
            out.append(("rule", " ".join(body)))
            continue
        out.append(("rule", first))
    i += 1

def grafana(q):
    for var, val in (("$__rate_interval", "5m"), ("$__interval", "1m"), ("$__range", "1h")):
        q = q.replace(var, val)
    return " ".join(q.split())

dash = json.load(open(sys.argv[2]))
def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))
for p in panels(dash["panels"]):
    for t in p.get("targets", []):
        out.append(("panel " + p["title"], grafana(t["expr"])))
for v in dash.get("templating", {}).get("list", []):
    q = v.get("query")
    q = q.get("query") if isinstance(q, dict) else q
    if v.get("type") != "query":
        continue
    m = re.fullmatch(r'label_values\((.*),\s*\w+\)', q.strip())
    if not m:
        sys.exit("variable %s: not label_values(selector, label): %s" % (v["name"], q))
    out.append(("variable " + v["name"], grafana(m.group(1))))
for where, q in out:
    print(where + "\t" + q)
PY
cut -f2- "$work/queries.txt" >"$work/exprs.txt"
n_rules=$(grep -c '^rule' "$work/queries.txt")
n_dash=$(grep -vc '^rule' "$work/queries.txt")
if "$names_bin" <"$work/exprs.txt" >"$work/names.txt" 2>"$work/names.err"; then
  ok "$n_rules rule expressions and $n_dash dashboard queries parse ($(basename "$names_bin"))"
else bad "queries that do not parse or name no metric:"; cat "$work/names.err"; fi
unknown=0
while IFS=$'\t' read -r line names; do
  for n in $names; do
    if ! grep -qx "$n" "$metrics_file"; then
      bad "$(sed -n "${line}p" "$work/queries.txt" | cut -f1) names $n, which the controller does not export"
      unknown=$((unknown + 1))
    fi
  done
done <"$work/names.txt"
used=$(cut -f2 "$work/names.txt" | tr ' ' '\n' | sort -u | grep -c .)
if [ "$unknown" = 0 ] && [ "$used" -gt 0 ]; then ok "the $used metric names they use are all exported"
elif [ "$used" = 0 ]; then bad "no metric names found in the queries"; fi

printf '\n%d passed, %d failed\n' "$passed" "$failed"
[ "$failed" -eq 0 ]
