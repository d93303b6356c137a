//! Property tests of the HTTPRoute split and its restore, on generated routes: whatever the
//! user's rules look like and whatever the shape (percent, Split or Mirror, `always`, `never`),
//! when the split is accepted, restoring gives back exactly the original (also after a live change
//! of shape, and after unrelated edits to other rules), rules not concerning the Service stay
//! byte-equal, every split rule keeps its weight ratios, splitting twice equals once, and, by the
//! Gateway API's documented precedence ([`super::precedence`]), `never` wins over `always`, both
//! over the split rule, and every other request reaches the rule it reached before.

use proptest::prelude::*;
use serde_json::{Value, json};

use super::precedence::{self, Request};
use super::*;

const NS: &str = "shop";
const STABLE: &str = "frontend-rcanary-stable";
const RECORDING: &str = "frontend-rcanary-recording";

fn target() -> Target {
    Target::new("frontend", NS, STABLE, RECORDING)
}

/// A weight as the user may write it: absent (1), 0, small, round, large.
fn weight() -> impl Strategy<Value = Option<i64>> {
    prop_oneof![
        2 => Just(None),
        1 => Just(Some(0)),
        3 => (1i64..=5).prop_map(Some),
        1 => Just(Some(100)),
        1 => Just(Some(1000)),
    ]
}

/// A backendRef to the Service, spelt every way the API allows.
fn service_ref() -> impl Strategy<Value = Value> {
    (
        prop_oneof![Just(None), Just(Some("")), Just(Some("core"))],
        any::<bool>(),
        any::<bool>(),
        prop_oneof![3 => Just(80), 1 => Just(8080)],
        weight(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(group, kind, namespace, port, w, filters, unknown)| {
            let mut r = json!({"name": "frontend", "port": port});
            if let Some(g) = group {
                r["group"] = json!(g);
            }
            if kind {
                r["kind"] = json!("Service");
            }
            if namespace {
                r["namespace"] = json!(NS);
            }
            if let Some(w) = w {
                r["weight"] = json!(w);
            }
            if filters {
                r["filters"] = json!([{"type": "RequestHeaderModifier",
                    "requestHeaderModifier": {"set": [{"name": "x-env", "value": "prod"}]}}]);
            }
            if unknown {
                r["futureRefField"] = json!({"kept": true});
            }
            r
        })
}

/// A backendRef to another Service (one in another namespace, as a ReferenceGrant allows).
fn other_ref() -> impl Strategy<Value = Value> {
    (
        prop_oneof![Just("legacy"), Just("docs"), Just("payments")],
        weight(),
    )
        .prop_map(|(name, w)| {
            let mut r = json!({"group": "", "kind": "Service", "name": name, "port": 80});
            if name == "payments" {
                r["namespace"] = json!("billing");
            }
            if let Some(w) = w {
                r["weight"] = json!(w);
            }
            r
        })
}

fn backend_ref() -> impl Strategy<Value = Value> {
    prop_oneof![3 => service_ref(), 2 => other_ref()]
}

/// One match entry, as the apiserver stores it or as written (types left to their default).
fn match_entry() -> impl Strategy<Value = Value> {
    (
        prop_oneof![Just("Exact"), Just("PathPrefix")],
        prop_oneof![
            Just("/"),
            Just("/api"),
            Just("/api/v2"),
            Just("/web"),
            Just("/api/admin")
        ],
        proptest::option::of((any::<bool>(), prop_oneof![Just("qa"), Just("dev")])),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(ty, path, header, method, query)| {
            let mut m = json!({"path": {"type": ty, "value": path}});
            if let Some((typed, v)) = header {
                let mut h = json!({"name": "x-team", "value": v});
                if typed {
                    h["type"] = json!("Exact");
                }
                m["headers"] = json!([h]);
            }
            if method {
                m["method"] = json!("GET");
            }
            if query {
                m["queryParams"] = json!([{"name": "q", "type": "Exact", "value": "1"}]);
            }
            m
        })
}

/// One rule: 1 to 3 backendRefs, matches now and then, filters (absent, empty, a header
/// modifier, a mirror elsewhere), timeouts and an unknown field now and then.
fn rule() -> impl Strategy<Value = Value> {
    (
        proptest::collection::vec(backend_ref(), 1..=3),
        proptest::option::of(proptest::collection::vec(match_entry(), 1..=2)),
        0u8..4,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(refs, matches, filters, timeouts, unknown)| {
            let mut r = json!({"backendRefs": refs});
            if let Some(m) = matches {
                r["matches"] = json!(m);
            }
            match filters {
                1 => r["filters"] = json!([]),
                2 => {
                    r["filters"] = json!([{"type": "RequestHeaderModifier",
                        "requestHeaderModifier": {"add": [{"name": "x-a", "value": "b"}]}}])
                }
                3 => {
                    r["filters"] = json!([{"type": "RequestMirror",
                        "requestMirror": {"backendRef": {"name": "audit", "port": 80}, "percent": 5}}])
                }
                _ => {}
            }
            if timeouts {
                r["timeouts"] = json!({"request": "3s"});
            }
            if unknown {
                r["futureRuleField"] = json!([1, 2]);
            }
            r
        })
}

/// A route: 1 to 4 rules (named now and then), the Service as parent, unknown fields.
fn route() -> impl Strategy<Value = Value> {
    (
        proptest::collection::vec((rule(), any::<bool>()), 1..=4),
        any::<bool>(),
    )
        .prop_map(|(rules, hostnames)| {
            let rules: Vec<Value> = rules
                .into_iter()
                .enumerate()
                .map(|(i, (mut r, named))| {
                    if named {
                        r["name"] = json!(format!("r{i}"));
                    }
                    r
                })
                .collect();
            let mut spec = json!({
                "parentRefs": [{"group": "", "kind": "Service", "name": "frontend"}],
                "rules": rules,
                "futureSpecField": "kept",
            });
            if hostnames {
                spec["hostnames"] = json!(["frontend.shop.svc.cluster.local"]);
            }
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                   "metadata": {"name": "frontend", "namespace": NS}, "spec": spec})
        })
}

/// A shape's owned parts: percent, mirror, `always`, `never` (Istio-shaped, as in the spec).
type ShapeParts = (i32, bool, Vec<Value>, Vec<Value>);

fn shape_parts() -> impl Strategy<Value = ShapeParts> {
    let always = prop_oneof![
        2 => Just(vec![]),
        1 => Just(vec![json!({"headers": {"x-record": {"exact": "1"}}})]),
        1 => Just(vec![
            json!({"uri": {"exact": "/api/v2/users"}}),
            json!({"method": {"exact": "POST"}})
        ]),
        1 => Just(vec![json!({"queryParams": {"debug": {"exact": "1"}}})]),
    ];
    let never = prop_oneof![
        2 => Just(vec![]),
        1 => Just(vec![json!({"uri": {"exact": "/health"}})]),
        1 => Just(vec![json!({"headers": {"x-pii": {"regex": ".+"}}})]),
        1 => Just(vec![
            json!({"uri": {"prefix": "/api/admin/"}}),
            json!({"headers": {"x-team": {"prefix": "d"}}})
        ]),
    ];
    (0i32..=100, proptest::bool::weighted(0.3), always, never)
}

fn shape(p: &ShapeParts) -> Shape<'_> {
    Shape {
        percent: p.0,
        mirror: p.1,
        always: &p.2,
        never: &p.3,
    }
}

fn with_rules(route: &Value, rules: Value) -> Value {
    let mut r = route.clone();
    r["spec"]["rules"] = rules;
    r
}

fn rules_of(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

fn is_inserted(r: &Value) -> bool {
    r.get("name")
        .and_then(Value::as_str)
        .is_some_and(|n| n.starts_with(ALWAYS_RULE) || n.starts_with(NEVER_RULE))
}

/// Whether a rule sends to the Service or to one of the canary's Services.
fn touches(r: &Value) -> bool {
    r["backendRefs"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|b| matches!(b["name"].as_str(), Some("frontend" | STABLE | RECORDING)))
}

fn eff_weight(b: &Value) -> i64 {
    b.get("weight").map_or(1, |w| w.as_i64().unwrap_or(1))
}

/// An edit of a rule that does not concern the Service.
#[derive(Debug, Clone)]
enum Edit {
    Touch(usize),
    Remove(usize),
    Insert,
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (0usize..4).prop_map(Edit::Touch),
        (0usize..4).prop_map(Edit::Remove),
        Just(Edit::Insert),
    ]
}

/// Applies an edit to the rules that do not concern the Service (the `k`-th of them).
fn apply(rules: &Value, e: &Edit) -> Value {
    let mut rules = rules_of(rules);
    let others: Vec<usize> = (0..rules.len()).filter(|i| !touches(&rules[*i])).collect();
    match e {
        Edit::Insert => rules.insert(
            0,
            json!({"matches": [{"path": {"type": "Exact", "value": "/new"}}],
                   "backendRefs": [{"name": "new", "port": 80}]}),
        ),
        Edit::Touch(k) => {
            if let Some(i) = others.get(*k) {
                rules[*i]["timeouts"] = json!({"request": "9s"});
            }
        }
        Edit::Remove(k) => {
            if let Some(i) = others.get(*k) {
                rules.remove(*i);
            }
        }
    }
    Value::Array(rules)
}

fn requests() -> impl Strategy<Value = Vec<Request>> {
    let one = (
        prop_oneof![
            Just("/"),
            Just("/api"),
            Just("/api/"),
            Just("/api/v2"),
            Just("/api/v2/users"),
            Just("/api/admin"),
            Just("/api/admin/x"),
            Just("/apix"),
            Just("/health"),
            Just("/healthz"),
            Just("/web/a"),
        ],
        prop_oneof![Just("GET"), Just("POST")],
        proptest::option::of(prop_oneof![Just("qa"), Just("dev")]),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(path, method, team, record, pii, q, debug)| {
            let mut headers = Vec::new();
            if let Some(t) = team {
                headers.push(("X-Team".to_string(), t.to_string()));
            }
            if record {
                headers.push(("x-record".into(), "1".into()));
            }
            if pii {
                headers.push(("x-pii".into(), "secret".into()));
            }
            let mut query = Vec::new();
            if q {
                query.push(("q".to_string(), "1".to_string()));
            }
            if debug {
                query.push(("debug".to_string(), "1".to_string()));
            }
            Request {
                path: path.into(),
                method: method.into(),
                headers,
                query,
            }
        });
    proptest::collection::vec(one, 24)
}

/// Where a rule of the split route comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Rule(usize),
    Never(usize),
    Always(usize),
}

fn origins(split: &[Value]) -> Vec<Origin> {
    let mut next = 0;
    split
        .iter()
        .map(|r| {
            let name = r["name"].as_str().unwrap_or_default();
            let index = |p: &str| name.strip_prefix(p).and_then(|n| n.parse::<usize>().ok());
            if let Some(i) = index("rcanary-never-") {
                Origin::Never(i)
            } else if let Some(i) = index("rcanary-always-") {
                Origin::Always(i)
            } else {
                next += 1;
                Origin::Rule(next - 1)
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(384))]

    #[test]
    fn split_then_restore_gives_back_exactly_the_original(r in route(), parts in shape_parts()) {
        if let Ok(s) = split_rules(&r, &target(), &shape(&parts), None, "c") {
            let back = unsplit_rules(&with_rules(&r, s.rules), &target(), Some(&s.note));
            prop_assert_eq!(&back, &r["spec"]["rules"]);
        }
    }

    #[test]
    fn a_live_change_of_shape_still_restores_exactly(r in route(), a in shape_parts(), b in shape_parts()) {
        let Ok(first) = split_rules(&r, &target(), &shape(&a), None, "c") else { return Ok(()) };
        let v = with_rules(&r, first.rules);
        if let Ok(second) = split_rules(&v, &target(), &shape(&b), Some(&first.note), "c") {
            let back = unsplit_rules(&with_rules(&r, second.rules), &target(), Some(&second.note));
            prop_assert_eq!(&back, &r["spec"]["rules"]);
        }
    }

    #[test]
    fn unrelated_edits_to_other_rules_survive_a_reshape_and_the_restore(
        r in route(), a in shape_parts(), b in shape_parts(), e in edit()
    ) {
        let Ok(first) = split_rules(&r, &target(), &shape(&a), None, "c") else { return Ok(()) };
        let want = apply(&r["spec"]["rules"], &e);
        let edited = apply(&first.rules, &e);
        let back = unsplit_rules(&with_rules(&r, edited.clone()), &target(), Some(&first.note));
        prop_assert_eq!(&back, &want);
        if let Ok(second) = split_rules(&with_rules(&r, edited), &target(), &shape(&b), Some(&first.note), "c") {
            let back = unsplit_rules(&with_rules(&r, second.rules), &target(), Some(&second.note));
            prop_assert_eq!(&back, &want);
        }
    }

    #[test]
    fn other_rules_stay_byte_equal_and_split_rules_keep_their_weight_ratios(r in route(), parts in shape_parts()) {
        let sh = shape(&parts);
        let Ok(s) = split_rules(&r, &target(), &sh, None, "c") else { return Ok(()) };
        let before = rules_of(&r["spec"]["rules"]);
        let after: Vec<Value> = rules_of(&s.rules).into_iter().filter(|x| !is_inserted(x)).collect();
        prop_assert_eq!(before.len(), after.len());
        for (b, a) in before.iter().zip(&after) {
            if !touches(b) {
                prop_assert_eq!(b.to_string(), a.to_string());
                continue;
            }
            let (brefs, arefs) = (rules_of(&b["backendRefs"]), rules_of(&a["backendRefs"]));
            for x in &arefs {
                let w = eff_weight(x);
                prop_assert!((0..=MAX_WEIGHT).contains(&w), "weight {} in {}", w, a);
            }
            // Align: each backendRef to the Service became two (Split) or one (Mirror).
            let mut k: Option<i64> = None;
            let mut j = 0;
            let mut checks: Vec<(i64, i64)> = Vec::new(); // (original, new total)
            for x in &brefs {
                if x["name"] == "frontend" {
                    let s = &arefs[j];
                    prop_assert_eq!(&s["name"], STABLE);
                    prop_assert_eq!(&s["group"], "");
                    prop_assert_eq!(&s["kind"], "Service");
                    if sh.mirror {
                        prop_assert_eq!(eff_weight(s), eff_weight(x));
                        j += 1;
                        continue;
                    }
                    let rec = &arefs[j + 1];
                    prop_assert_eq!(&rec["name"], RECORDING);
                    let (sw, rw) = (eff_weight(s), eff_weight(rec));
                    prop_assert_eq!(i128::from(rw) * 100, i128::from(parts.0) * i128::from(sw + rw), "{}", a);
                    checks.push((eff_weight(x), sw + rw));
                    j += 2;
                } else {
                    let o = &arefs[j];
                    let mut unweighted = o.clone();
                    let mut orig = x.clone();
                    unweighted.as_object_mut().map(|m| m.remove("weight"));
                    orig.as_object_mut().map(|m| m.remove("weight"));
                    prop_assert_eq!(unweighted, orig);
                    checks.push((eff_weight(x), eff_weight(o)));
                    j += 1;
                }
            }
            prop_assert_eq!(j, arefs.len());
            // One factor k >= 1 for the whole rule: every backend keeps its share exactly.
            for (orig, now) in &checks {
                if *orig > 0 {
                    let f = now / orig;
                    prop_assert!(f >= 1 && f * orig == *now, "{} -> {} in {}", orig, now, a);
                    prop_assert_eq!(*k.get_or_insert(f), f, "one factor per rule: {}", a);
                } else {
                    prop_assert_eq!(*now, 0);
                }
            }
            // Everything but the backendRefs and our mirror is untouched.
            let strip = |r: &Value| {
                let mut r = r.clone();
                r["backendRefs"] = Value::Null;
                if let Some(fs) = r.get_mut("filters").and_then(Value::as_array_mut) {
                    fs.retain(|f| f.pointer("/requestMirror/backendRef/name") != Some(&json!(RECORDING)));
                    if fs.is_empty() && b.get("filters").is_none() {
                        r.as_object_mut().map(|m| m.remove("filters"));
                    }
                }
                r
            };
            prop_assert_eq!(strip(b), strip(a));
            if sh.mirror {
                let ours: Vec<&Value> = a["filters"].as_array().into_iter().flatten()
                    .filter(|f| f.pointer("/requestMirror/backendRef/name") == Some(&json!(RECORDING)))
                    .collect();
                prop_assert_eq!(ours.len(), 1);
                prop_assert_eq!(&ours[0]["requestMirror"]["percent"], &json!(parts.0));
            }
        }
    }

    #[test]
    fn splitting_twice_equals_splitting_once(r in route(), a in shape_parts(), b in shape_parts()) {
        let Ok(first) = split_rules(&r, &target(), &shape(&a), None, "c") else { return Ok(()) };
        let once = split_rules(&r, &target(), &shape(&b), None, "c");
        let twice = split_rules(&with_rules(&r, first.rules), &target(), &shape(&b), Some(&first.note), "c");
        prop_assert_eq!(&once, &twice);
        if let Ok(t) = twice {
            let again = split_rules(&with_rules(&r, t.rules.clone()), &target(), &shape(&b), Some(&t.note), "c");
            prop_assert_eq!(again, Ok(t));
        }
    }

    #[test]
    fn after_a_split_nothing_is_left_unsplit_and_the_percent_reads_back(r in route(), parts in shape_parts()) {
        let sh = shape(&parts);
        let Ok(s) = split_rules(&r, &target(), &sh, None, "c") else { return Ok(()) };
        let st = read_split(&with_rules(&r, s.rules), &target());
        prop_assert_eq!(st.unsplit, 0);
        let live = rules_of(&r["spec"]["rules"]).iter().flat_map(|x| rules_of(&x["backendRefs"]))
            .any(|b| b["name"] == "frontend" && eff_weight(&b) > 0);
        prop_assert_eq!(st.pairs > 0, rules_of(&r["spec"]["rules"]).iter().any(touches));
        prop_assert_eq!(st.mirrored, sh.mirror && st.pairs > 0);
        if live {
            // Exact weights: the percent reads back exactly.
            prop_assert_eq!(st.percent, Some(parts.0));
        }
    }

    #[test]
    fn never_wins_then_always_then_the_split_rule_and_other_requests_keep_their_rule(
        r in route(), parts in shape_parts(), reqs in requests()
    ) {
        let sh = shape(&parts);
        let Ok(s) = split_rules(&r, &target(), &sh, None, "c") else { return Ok(()) };
        let base = rules_of(&r["spec"]["rules"]);
        let split = rules_of(&s.rules);
        let origin = origins(&split);
        let never: Vec<Value> = sh.never.iter().enumerate()
            .map(|(i, m)| matches::from_istio(m, matches::Role::Never, i).unwrap()).collect();
        for req in &reqs {
            let before = precedence::winner(&base, req);
            let after = precedence::winner(&split, req).map(|i| origin[i]);
            let istio_never = sh.never.iter().any(|m| precedence::istio_matches(m, req));
            let gateway_never = never.iter().any(|m| precedence::matches(m, req));
            // The Gateway API form of never selects at least what Istio's does.
            prop_assert!(!istio_never || gateway_never, "{:?}", req);
            let want = before.map(|j| {
                let live = rules_of(&base[j]["backendRefs"]).iter()
                    .any(|b| b["name"] == "frontend" && eff_weight(b) > 0);
                if !live {
                    Origin::Rule(j)
                } else if gateway_never {
                    Origin::Never(j)
                } else if sh.always.iter().any(|m| precedence::istio_matches(m, req)) {
                    Origin::Always(j)
                } else {
                    Origin::Rule(j)
                }
            });
            prop_assert_eq!(after, want, "{:?}\n{:#}", req, Value::Array(split.clone()));
        }
    }

    #[test]
    fn a_prefix_regex_selects_exactly_the_values_with_the_prefix(
        prefix in "[a-z.+*?()|\\[\\]{}^$\\\\ /-]{0,6}", value in "[a-z.+*?()|\\[\\]{}^$\\\\ /-]{0,8}"
    ) {
        let re = matches::prefix_regex(&prefix);
        let full = regex::Regex::new(&format!("^(?:{re})$")).unwrap();
        let search = regex::Regex::new(&re).unwrap();
        let joined = format!("{prefix}{value}");
        prop_assert!(full.is_match(&joined) && search.is_match(&joined));
        prop_assert_eq!(full.is_match(&value), value.starts_with(&prefix));
        prop_assert_eq!(search.is_match(&value), value.starts_with(&prefix));
    }
}

/// The generators are not so hostile that nearly every split is refused: the properties above
/// would then hold vacuously.
#[test]
fn most_generated_splits_are_accepted() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let (mut ok, mut with_forced, n) = (0, 0, 400);
    for _ in 0..n {
        let r = route().new_tree(&mut runner).unwrap().current();
        let parts = shape_parts().new_tree(&mut runner).unwrap().current();
        if let Ok(s) = split_rules(&r, &target(), &shape(&parts), None, "c") {
            ok += 1;
            if rules_of(&s.rules).iter().any(is_inserted) {
                with_forced += 1;
            }
        }
    }
    assert!(ok * 2 > n, "only {ok} of {n} splits accepted");
    assert!(
        with_forced * 5 > n,
        "only {with_forced} of {n} with always/never rules"
    );
}
