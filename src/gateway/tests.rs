//! Unit tests of the HTTPRoute split, one behaviour each, and the hostile routes of issue 27:
//! each is split correctly or refused with a reason, never half-applied.

use serde_json::{Value, json};

use super::precedence::{self, Request};
use super::*;

const STABLE: &str = "frontend-rcanary-stable";
const RECORDING: &str = "frontend-rcanary-recording";

fn target() -> Target {
    Target::new("frontend", "shop", STABLE, RECORDING)
}

fn service_parent() -> Value {
    json!({"group": "", "kind": "Service", "name": "frontend"})
}

fn route_in(ns: &str, parents: Value, rules: Value) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "frontend", "namespace": ns, "generation": 1},
        "spec": {"parentRefs": parents, "rules": rules, "futureField": {"x": 1}},
    })
}

fn route(rules: Value) -> Value {
    route_in("shop", json!([service_parent()]), rules)
}

fn s_ref(weight: i64) -> Value {
    json!({"group": "", "kind": "Service", "name": "frontend", "port": 80, "weight": weight})
}

fn other_ref(name: &str, weight: i64) -> Value {
    json!({"group": "", "kind": "Service", "name": name, "port": 80, "weight": weight})
}

fn with_rules(route: &Value, rules: Value) -> Value {
    let mut r = route.clone();
    r["spec"]["rules"] = rules;
    r
}

fn split(route: &Value, shape: &Shape) -> Split {
    split_rules(route, &target(), shape, None, "c").expect("splits")
}

/// Splits, checks that restoring gives back the route exactly, and returns the split route.
fn split_and_check_restore(r: &Value, shape: &Shape) -> (Value, Split) {
    let s = split(r, shape);
    let after = with_rules(r, s.rules.clone());
    let back = unsplit_rules(&after, &target(), Some(&s.note));
    assert_eq!(back, r["spec"]["rules"], "restore of {after:#}");
    (after, s)
}

/// Each backendRef's name and effective weight (absent: 1).
fn refs_of(rule: &Value) -> Vec<(String, i64)> {
    rule["backendRefs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let w = b.get("weight").map_or(1, |w| w.as_i64().unwrap());
            (b["name"].as_str().unwrap().to_string(), w)
        })
        .collect()
}

fn names(rules: &Value) -> Vec<String> {
    rules
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap_or("-").to_string())
        .collect()
}

fn problem_of(r: &Value, shape: &Shape) -> Problem {
    let p = shape_problem(r, &target(), shape).expect("a problem");
    // Never half-applied: the split itself refuses too (except NoTraffic, which is the
    // planner's call).
    if p.kind != ProblemKind::NoTraffic {
        assert_eq!(
            split_rules(r, &target(), shape, None, "c").err(),
            Some(p.clone())
        );
    }
    p
}

fn req(path: &str, headers: &[(&str, &str)]) -> Request {
    Request {
        path: path.into(),
        method: "GET".into(),
        headers: headers
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
        query: vec![],
    }
}

// ---------------------------------------------------------------------------------------------
// Weights

#[test]
fn a_lone_backend_of_default_weight_splits_exactly_with_defaults_written_and_restores_byte_exact() {
    let r = route(json!([{"backendRefs": [{"name": "frontend", "port": 80}]}]));
    let (after, s) = split_and_check_restore(&r, &Shape::weights(10));
    assert_eq!(
        after["spec"]["rules"][0]["backendRefs"],
        json!([
            {"group": "", "kind": "Service", "name": STABLE, "port": 80, "weight": 9},
            {"group": "", "kind": "Service", "name": RECORDING, "port": 80, "weight": 1},
        ])
    );
    let note: Value = serde_json::from_str(&s.note).unwrap();
    assert_eq!(
        note,
        json!({"canary": "c", "rules": [{"scale": 10, "refs": [{}]}]})
    );
    let st = read_split(&after, &target());
    assert_eq!((st.pairs, st.unsplit, st.percent), (1, 0, Some(10)));
    assert!(st.recording_gets_traffic);
}

#[test]
fn other_backends_keep_their_share_and_are_scaled_only_when_exactness_needs_it() {
    // 80 to the Service at 10 %: 72/8 exactly, legacy untouched.
    let r = route(json!([{"backendRefs": [s_ref(80), other_ref("legacy", 20)]}]));
    let (after, _) = split_and_check_restore(&r, &Shape::weights(10));
    assert_eq!(
        refs_of(&after["spec"]["rules"][0]),
        [
            (STABLE.into(), 72),
            (RECORDING.into(), 8),
            ("legacy".into(), 20)
        ]
    );
    // 1 and 1 (absent) at 10 %: 0.9/0.1/1 has no integer form; ×10 is the smallest that does.
    let r = route(json!([{"backendRefs": [
        {"name": "frontend", "port": 80}, {"name": "legacy", "port": 80}]}]));
    let (after, s) = split_and_check_restore(&r, &Shape::weights(10));
    assert_eq!(
        refs_of(&after["spec"]["rules"][0]),
        [
            (STABLE.into(), 9),
            (RECORDING.into(), 1),
            ("legacy".into(), 10)
        ]
    );
    assert!(s.note.contains(r#""others":[{}]"#), "{}", s.note);
    // At 50 %: 1/1/2.
    let (after, _) = split_and_check_restore(&r, &Shape::weights(50));
    assert_eq!(
        refs_of(&after["spec"]["rules"][0]),
        [
            (STABLE.into(), 1),
            (RECORDING.into(), 1),
            ("legacy".into(), 2)
        ]
    );
    // 0 % and 100 % need no scaling.
    let (after, _) = split_and_check_restore(&r, &Shape::weights(0));
    assert_eq!(
        refs_of(&after["spec"]["rules"][0]),
        [
            (STABLE.into(), 1),
            (RECORDING.into(), 0),
            ("legacy".into(), 1)
        ]
    );
}

#[test]
fn backend_filters_and_unknown_fields_go_to_both_and_everything_else_stays_byte_equal() {
    let rule = json!({
        "name": "api",
        "matches": [{"path": {"type": "PathPrefix", "value": "/api"}, "headers": [{"name": "x", "type": "Exact", "value": "1"}]}],
        "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "a", "value": "b"}]}}],
        "timeouts": {"request": "10s"},
        "futureRuleField": true,
        "backendRefs": [{"group": "", "kind": "Service", "name": "frontend", "port": 80, "weight": 3,
                         "filters": [{"type": "ResponseHeaderModifier", "responseHeaderModifier": {"add": [{"name": "c", "value": "d"}]}}],
                         "futureRefField": 7}],
    });
    let untouched = json!({"matches": [{"path": {"type": "PathPrefix", "value": "/web"}}],
                           "backendRefs": [other_ref("web", 1)]});
    let r = route(json!([rule.clone(), untouched.clone()]));
    let (after, _) = split_and_check_restore(&r, &Shape::weights(25));
    let split = &after["spec"]["rules"][0];
    for (i, b) in split["backendRefs"].as_array().unwrap().iter().enumerate() {
        assert_eq!(b["filters"], rule["backendRefs"][0]["filters"], "ref {i}");
        assert_eq!(b["futureRefField"], 7);
    }
    assert_eq!(refs_of(split), [(STABLE.into(), 9), (RECORDING.into(), 3)]);
    let strip = |r: &Value| {
        let mut r = r.clone();
        r["backendRefs"] = Value::Null;
        r.to_string()
    };
    assert_eq!(strip(split), strip(&rule));
    assert_eq!(after["spec"]["rules"][1].to_string(), untouched.to_string());
    assert_eq!(after["spec"]["futureField"], json!({"x": 1}));
}

#[test]
fn splitting_a_split_route_at_another_percent_reshapes_it_from_the_original() {
    let r = route(json!([{"backendRefs": [s_ref(80), other_ref("legacy", 20)]}]));
    let first = split(&r, &Shape::weights(10));
    let v = with_rules(&r, first.rules.clone());
    let second = split_rules(&v, &target(), &Shape::weights(33), Some(&first.note), "c").unwrap();
    assert_eq!(second, split(&r, &Shape::weights(33)));
    // 80·100/gcd(100, 80·33) = ×5: 268/132/100.
    assert_eq!(
        refs_of(&second.rules[0]),
        [
            (STABLE.into(), 268),
            (RECORDING.into(), 132),
            ("legacy".into(), 100)
        ]
    );
    let v = with_rules(&r, second.rules);
    assert_eq!(
        unsplit_rules(&v, &target(), Some(&second.note)),
        r["spec"]["rules"]
    );
}

#[test]
fn edits_to_other_rules_while_split_survive_the_restore() {
    let r = route(json!([
        {"backendRefs": [other_ref("web", 1)]},
        {"name": "api", "backendRefs": [{"name": "frontend", "port": 80}, {"name": "legacy", "port": 80}]},
        {"backendRefs": [other_ref("docs", 1)]},
    ]));
    let s = split(&r, &Shape::weights(10));
    let mut edited = s.rules.clone();
    let rules = edited.as_array_mut().unwrap();
    rules.remove(0);
    rules[1]["timeouts"] = json!({"request": "1s"});
    rules.insert(0, json!({"backendRefs": [other_ref("new", 1)]}));
    let back = unsplit_rules(&with_rules(&r, edited), &target(), Some(&s.note));
    let mut want = r["spec"]["rules"].clone();
    let w = want.as_array_mut().unwrap();
    w.remove(0);
    w[1]["timeouts"] = json!({"request": "1s"});
    w.insert(0, json!({"backendRefs": [other_ref("new", 1)]}));
    assert_eq!(back, want);
}

#[test]
fn a_rule_whose_weights_changed_since_the_split_keeps_every_share_it_has_now() {
    let r = route(
        json!([{"backendRefs": [{"name": "frontend", "port": 80}, {"name": "legacy", "port": 80}]}]),
    );
    let s = split(&r, &Shape::weights(10));
    let mut v = with_rules(&r, s.rules.clone());
    // Someone doubles the pair by hand: the note's weights no longer fit, and the Service keeps
    // the share it has now (2:1) rather than the one the note remembers.
    v["spec"]["rules"][0]["backendRefs"][0]["weight"] = json!(10);
    v["spec"]["rules"][0]["backendRefs"][1]["weight"] = json!(10);
    let back = unsplit_rules(&v, &target(), Some(&s.note));
    assert_eq!(
        refs_of(&back[0]),
        [("frontend".into(), 20), ("legacy".into(), 10)]
    );
    // A change that keeps the pair's total is still the split: restored exactly.
    v["spec"]["rules"][0]["backendRefs"][0]["weight"] = json!(5);
    v["spec"]["rules"][0]["backendRefs"][1]["weight"] = json!(5);
    assert_eq!(
        unsplit_rules(&v, &target(), Some(&s.note)),
        r["spec"]["rules"]
    );
}

#[test]
fn weights_that_an_exact_split_would_push_past_the_limit_are_refused_for_every_percent() {
    // 999,999 and 1: at 1 % the rule would need ×100.
    let r = route(json!([{"backendRefs": [s_ref(999_999), other_ref("legacy", 1)]}]));
    for p in [1, 50, 100] {
        let e = problem_of(&r, &Shape::weights(p));
        assert_eq!(e.kind, ProblemKind::WeightTooLarge, "{p}: {e}");
        assert!(e.message.contains("1000000"), "{e}");
    }
    // The largest weight splits when it divides by 100.
    let r = route(json!([{"backendRefs": [s_ref(1_000_000)]}]));
    let (after, _) = split_and_check_restore(&r, &Shape::weights(37));
    assert_eq!(
        refs_of(&after["spec"]["rules"][0]),
        [(STABLE.into(), 630_000), (RECORDING.into(), 370_000)]
    );
}

#[test]
fn weights_near_the_i64_limit_neither_overflow_nor_panic() {
    let big = i64::MAX - 1;
    let r = route(json!([{"backendRefs": [s_ref(big), other_ref("legacy", big)]}]));
    assert_eq!(
        problem_of(&r, &Shape::weights(50)).kind,
        ProblemKind::WeightTooLarge
    );
    let mut split = route(json!([{"backendRefs": [
        {"name": STABLE, "port": 80, "weight": big}, {"name": RECORDING, "port": 80, "weight": big}]}]));
    let st = read_split(&split, &target());
    assert_eq!(st.percent, Some(50));
    split["spec"]["rules"] = unsplit_rules(&split, &target(), None);
    assert_eq!(
        split["spec"]["rules"][0]["backendRefs"][0]["weight"],
        json!(i64::MAX)
    );
}

// ---------------------------------------------------------------------------------------------
// Reading

#[test]
fn read_split_takes_the_percent_from_the_first_pair_that_carries_traffic() {
    let pair = |s: i64, r: i64| {
        json!([{"group": "", "kind": "Service", "name": STABLE, "port": 80, "weight": s},
               {"group": "", "kind": "Service", "name": RECORDING, "port": 80, "weight": r}])
    };
    let r = route(json!([
        {"backendRefs": pair(0, 0)},
        {"backendRefs": pair(3, 1)},
        {"backendRefs": [s_ref(1)]},
    ]));
    let st = read_split(&r, &target());
    assert_eq!(st.pairs, 2);
    assert_eq!(st.unsplit, 1);
    assert_eq!(st.percent, Some(25));
    assert!(st.recording_gets_traffic && st.references_backends && !st.mirrored);
    let dark = route(json!([{"backendRefs": pair(5, 0)}]));
    let st = read_split(&dark, &target());
    assert_eq!((st.percent, st.recording_gets_traffic), (Some(0), false));
    assert_eq!(
        read_split(&route(json!([])), &target()),
        SplitState::default()
    );
}

// ---------------------------------------------------------------------------------------------
// Modes

#[test]
fn mirror_mode_gives_stable_the_whole_weight_and_mirrors_the_percent_after_the_users_filters() {
    let header = json!({"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "a", "value": "b"}]}});
    let r = route(json!([
        {"backendRefs": [{"name": "frontend", "port": 80}]},
        {"filters": [header.clone()], "backendRefs": [s_ref(4)]},
        {"filters": [], "backendRefs": [s_ref(4)]},
    ]));
    let shape = Shape {
        mirror: true,
        ..Shape::weights(25)
    };
    let (after, s) = split_and_check_restore(&r, &shape);
    let mirror = json!({"type": "RequestMirror", "requestMirror": {
        "backendRef": {"group": "", "kind": "Service", "name": RECORDING, "port": 80}, "percent": 25}});
    let rules = &after["spec"]["rules"];
    assert_eq!(
        rules[0],
        json!({"backendRefs": [{"group": "", "kind": "Service", "name": STABLE, "port": 80, "weight": 1}],
               "filters": [mirror.clone()]})
    );
    assert_eq!(rules[1]["filters"], json!([header, mirror.clone()]));
    assert_eq!(refs_of(&rules[1]), [(STABLE.into(), 4)]);
    assert_eq!(rules[2]["filters"], json!([mirror]));
    let st = read_split(&after, &target());
    assert!(st.mirrored && st.recording_gets_traffic);
    assert_eq!((st.pairs, st.percent), (3, Some(25)));
    // Back to a weighted split, live.
    let back = split_rules(&after, &target(), &Shape::weights(25), Some(&s.note), "c").unwrap();
    assert_eq!(back, split(&r, &Shape::weights(25)));
}

#[test]
fn mirror_percent_needs_the_crds_of_v1_3_or_later() {
    for (v, ok) in [
        (Some("v1.6.1"), true),
        (Some("v1.3.0"), true),
        (Some("v2.0.0-rc.1"), true),
        (Some("v1.2.1"), false),
        (Some("v1.10.0"), true),
        (Some("garbage"), false),
        (None, false),
    ] {
        assert_eq!(mirror_percent_supported(v), ok, "{v:?}");
    }
}

#[test]
fn mirror_mode_refuses_a_rule_that_also_sends_requests_elsewhere_or_to_two_ports() {
    let shape = Shape {
        mirror: true,
        ..Shape::weights(25)
    };
    let r = route(json!([{"backendRefs": [s_ref(90), other_ref("legacy", 10)]}]));
    let p = problem_of(&r, &shape);
    assert_eq!(p.kind, ProblemKind::MirrorCopiesOtherBackends);
    assert!(p.message.contains("legacy"), "{p}");
    // A backend of weight 0 receives nothing, so nothing of it is copied.
    let r = route(json!([{"backendRefs": [s_ref(90), other_ref("legacy", 0)]}]));
    assert_eq!(shape_problem(&r, &target(), &shape), None);
    let mut other_port = s_ref(1);
    other_port["port"] = json!(8080);
    let r = route(json!([{"backendRefs": [s_ref(1), other_port]}]));
    assert_eq!(problem_of(&r, &shape).kind, ProblemKind::MirrorPorts);
    // Split mode takes both ports.
    assert_eq!(shape_problem(&r, &target(), &Shape::weights(25)), None);
}

#[test]
fn never_and_always_rules_go_before_the_split_rule_with_its_fields_and_anded_matches() {
    let r = route(json!([{
        "name": "api",
        "matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
        "timeouts": {"request": "3s"},
        "backendRefs": [s_ref(80), other_ref("legacy", 20)],
    }]));
    let always = [json!({"headers": {"x-record": {"exact": "1"}}})];
    let never = [json!({"uri": {"exact": "/api/admin"}})];
    let shape = Shape {
        percent: 10,
        mirror: false,
        always: &always,
        never: &never,
    };
    let (after, _) = split_and_check_restore(&r, &shape);
    let rules = &after["spec"]["rules"];
    assert_eq!(names(rules), ["rcanary-never-0", "rcanary-always-0", "api"]);
    assert_eq!(
        rules[0],
        json!({"name": "rcanary-never-0",
               "matches": [{"path": {"type": "Exact", "value": "/api/admin"}}],
               "timeouts": {"request": "3s"},
               "backendRefs": [{"group": "", "kind": "Service", "name": STABLE, "port": 80, "weight": 80},
                               other_ref("legacy", 20)]})
    );
    assert_eq!(
        rules[1],
        json!({"name": "rcanary-always-0",
               "matches": [{"path": {"type": "PathPrefix", "value": "/api"},
                            "headers": [{"name": "x-record", "type": "Exact", "value": "1"}]}],
               "timeouts": {"request": "3s"},
               "backendRefs": [{"group": "", "kind": "Service", "name": RECORDING, "port": 80, "weight": 80}]})
    );
    let st = read_split(&after, &target());
    assert_eq!((st.always_rules, st.never_rules, st.pairs), (1, 1, 1));
    // Without forced requests (a drained clone) the always rule goes, the never rule stays.
    let drained = Shape {
        always: &[],
        percent: 0,
        ..shape
    };
    let note = split(&r, &shape).note;
    let d = split_rules(&after, &target(), &drained, Some(&note), "c").unwrap();
    assert_eq!(names(&d.rules), ["rcanary-never-0", "api"]);
    // The documented precedence: never wins, then always, then the split rule.
    let rules = rules.as_array().unwrap();
    let win = |p: &str, h: &[(&str, &str)]| precedence::winner(rules, &req(p, h));
    assert_eq!(win("/api/admin", &[("x-record", "1")]), Some(0));
    assert_eq!(win("/api/users", &[("x-record", "1")]), Some(1));
    assert_eq!(win("/api/users", &[]), Some(2));
    assert_eq!(win("/web", &[("x-record", "1")]), None);
}

#[test]
fn mirror_mode_always_rules_mirror_everything_and_never_rules_mirror_nothing() {
    let r = route(json!([{"backendRefs": [s_ref(1)]}]));
    let always = [json!({"headers": {"x-record": {"exact": "1"}}})];
    let never = [json!({"headers": {"x-pii": {"regex": ".+"}}})];
    let shape = Shape {
        percent: 5,
        mirror: true,
        always: &always,
        never: &never,
    };
    let (after, _) = split_and_check_restore(&r, &shape);
    let rules = &after["spec"]["rules"];
    assert_eq!(names(rules), ["rcanary-never-0", "rcanary-always-0", "-"]);
    assert_eq!(rules[0].get("filters"), None);
    assert_eq!(rules[1]["filters"][0]["requestMirror"]["percent"], 100);
    assert_eq!(rules[2]["filters"][0]["requestMirror"]["percent"], 5);
    for r in rules.as_array().unwrap() {
        assert_eq!(refs_of(r), [(STABLE.into(), 1)]);
    }
    // The never entry ranks as high as the always one (one header each) and comes first: it
    // needs no extra entry.
    assert_eq!(rules[0]["matches"].as_array().map(Vec::len), Some(1));
}

#[test]
fn a_never_entry_that_ranks_below_an_always_entry_gets_the_always_conditions_too() {
    let r = route(json!([{"backendRefs": [s_ref(1)]}]));
    // An exact path outranks a header: without help, /api/x with x-pii would go to always.
    let always = [json!({"uri": {"exact": "/api/x"}})];
    let never = [json!({"headers": {"x-pii": {"exact": "1"}}})];
    let shape = Shape {
        percent: 10,
        mirror: false,
        always: &always,
        never: &never,
    };
    let (after, _) = split_and_check_restore(&r, &shape);
    let rules = &after["spec"]["rules"];
    assert_eq!(
        rules[0]["matches"],
        json!([
            {"path": {"type": "PathPrefix", "value": "/"}, "headers": [{"name": "x-pii", "type": "Exact", "value": "1"}]},
            {"path": {"type": "Exact", "value": "/api/x"}, "headers": [{"name": "x-pii", "type": "Exact", "value": "1"}]},
        ])
    );
    let rules = rules.as_array().unwrap();
    let win = |p: &str, h: &[(&str, &str)]| precedence::winner(rules, &req(p, h));
    assert_eq!(win("/api/x", &[("x-pii", "1")]), Some(0));
    assert_eq!(win("/api/x", &[]), Some(1));
    assert_eq!(win("/other", &[("x-pii", "1")]), Some(0));
    assert_eq!(win("/other", &[]), Some(2));
}

#[test]
fn a_generated_rule_that_would_take_requests_from_a_rule_winning_over_the_split_rule_is_refused() {
    // /api/v2 goes to `v2` today; an always entry /api/v2/users (longer) would take its requests.
    let r = route(json!([
        {"matches": [{"path": {"type": "PathPrefix", "value": "/api/v2"}}], "backendRefs": [other_ref("v2", 1)]},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}], "backendRefs": [s_ref(1)]},
    ]));
    let always = [json!({"uri": {"exact": "/api/v2/users"}})];
    let shape = Shape {
        percent: 10,
        mirror: false,
        always: &always,
        never: &[],
    };
    let p = problem_of(&r, &shape);
    assert_eq!(p.kind, ProblemKind::Precedence);
    assert!(
        p.message.contains("rule 0") && p.message.contains("rule 1"),
        "{p}"
    );
    // An always entry that cannot meet the other rule's requests is fine.
    let always = [json!({"uri": {"exact": "/api/v1/users"}})];
    let shape = Shape {
        always: &always,
        ..shape
    };
    assert_eq!(shape_problem(&r, &target(), &shape), None);
}

// ---------------------------------------------------------------------------------------------
// Which routes concern the Service

#[test]
fn service_and_listed_gateway_parents_concern_the_service_others_do_not() {
    let mut t = target();
    t.gateways = vec!["public".into(), "infra/edge".into()];
    let concerns_with =
        |parent: Value, ns: &str| concerns(&route_in(ns, json!([parent]), json!([])), &t);
    assert!(concerns_with(service_parent(), "shop"));
    assert!(concerns_with(
        json!({"group": "core", "kind": "Service", "name": "frontend", "namespace": "shop"}),
        "other"
    ));
    assert!(!concerns_with(service_parent(), "other"), "other/frontend");
    // A parentRef's defaults are a Gateway's: without group and kind it names Gateway frontend.
    assert!(!concerns_with(json!({"name": "frontend"}), "shop"));
    assert!(concerns_with(json!({"name": "public"}), "shop"));
    assert!(concerns_with(
        json!({"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "edge", "namespace": "infra"}),
        "shop"
    ));
    assert!(concerns_with(
        json!({"name": "edge", "sectionName": "https"}),
        "infra"
    ));
    assert!(!concerns_with(json!({"name": "edge"}), "shop"));
    assert!(!concerns_with(json!({"name": "public"}), "other"));
}

#[test]
fn a_parent_ref_on_another_port_or_section_does_not_concern_the_canarys_port() {
    let mut t = target();
    let on = |parent: Value, t: &Target| {
        concerns(
            &route(json!([])).tap(|r| r["spec"]["parentRefs"] = json!([parent])),
            t,
        )
    };
    let port = |p: i64| json!({"group": "", "kind": "Service", "name": "frontend", "port": p});
    let section =
        |s: &str| json!({"group": "", "kind": "Service", "name": "frontend", "sectionName": s});
    // Every port split: any port or section concerns it.
    assert!(on(port(8080), &t) && on(section("grpc"), &t));
    t.port = Some(ServicePort {
        number: 80,
        name: Some("http".into()),
    });
    assert!(on(port(80), &t) && on(section("http"), &t) && on(service_parent(), &t));
    assert!(!on(port(8080), &t));
    assert!(!on(section("grpc"), &t));
    t.port = Some(ServicePort {
        number: 80,
        name: None,
    });
    assert!(!on(section("http"), &t), "a section names a port by name");
}

trait Tap: Sized {
    fn tap(self, f: impl FnOnce(&mut Self)) -> Self;
}

impl Tap for Value {
    fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile routes (issue 27, "Done when")

#[test]
fn hostile_several_parent_refs_are_split_once_for_every_parent() {
    let r = route_in(
        "shop",
        json!([service_parent(),
               {"group": "", "kind": "Service", "name": "frontend-canary"},
               {"name": "public", "sectionName": "http"}]),
        json!([{"backendRefs": [s_ref(1)]}]),
    );
    assert!(concerns(&r, &target()));
    assert_eq!(concerning_parents(&r, &target()), [&service_parent()]);
    let (after, _) = split_and_check_restore(&r, &Shape::weights(20));
    assert_eq!(after["spec"]["parentRefs"], r["spec"]["parentRefs"]);
    assert_eq!(
        refs_of(&after["spec"]["rules"][0]),
        [(STABLE.into(), 4), (RECORDING.into(), 1)]
    );
}

#[test]
fn hostile_a_route_for_another_port_or_section_is_not_the_canarys() {
    let mut t = target();
    t.port = Some(ServicePort {
        number: 80,
        name: Some("http".into()),
    });
    let r = route_in(
        "shop",
        json!([{"group": "", "kind": "Service", "name": "frontend", "port": 9090, "sectionName": "admin"}]),
        json!([{"backendRefs": [s_ref(1)]}]),
    );
    assert!(!concerns(&r, &t));
    assert!(concerning_parents(&r, &t).is_empty());
}

#[test]
fn hostile_a_cross_namespace_backend_allowed_by_a_reference_grant_is_left_as_it_is() {
    let granted = json!({"group": "", "kind": "Service", "name": "payments", "namespace": "billing", "port": 443, "weight": 1});
    let r = route(json!([{"backendRefs": [s_ref(3), granted.clone()]}]));
    let (after, _) = split_and_check_restore(&r, &Shape::weights(50));
    let refs = after["spec"]["rules"][0]["backendRefs"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(refs.len(), 3);
    // 3 at 50 % is 1.5: ×2, and the granted backend keeps its share.
    assert_eq!(
        refs_of(&after["spec"]["rules"][0])[..2],
        [(STABLE.into(), 3), (RECORDING.into(), 3)]
    );
    let mut scaled = granted;
    scaled["weight"] = json!(2);
    assert_eq!(refs[2], scaled);
}

#[test]
fn hostile_a_route_in_another_namespace_sending_to_the_service_is_refused() {
    // A consumer route: parent and backend in namespace shop, the route in namespace web.
    let r = route_in(
        "web",
        json!([{"group": "", "kind": "Service", "name": "frontend", "namespace": "shop"}]),
        json!([{"backendRefs": [{"group": "", "kind": "Service", "name": "frontend", "namespace": "shop", "port": 80}]}]),
    );
    assert!(concerns(&r, &target()));
    let p = problem_of(&r, &Shape::weights(10));
    assert_eq!(p.kind, ProblemKind::CrossNamespace);
    assert!(p.message.contains("ReferenceGrant"), "{p}");
    // The same route's backendRef without a namespace names web/frontend: not ours, nothing to do.
    let local = with_rules(
        &r,
        json!([{"backendRefs": [{"name": "frontend", "port": 80}]}]),
    );
    assert_eq!(
        split(&local, &Shape::weights(10)).rules,
        local["spec"]["rules"]
    );
}

#[test]
fn hostile_a_rule_already_mirroring_to_the_service_is_refused_and_one_mirroring_elsewhere_is_kept()
{
    let to_s = json!({"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "frontend", "port": 80}, "percent": 10}});
    let r = route(json!([{"filters": [to_s.clone()], "backendRefs": [s_ref(1)]}]));
    for shape in [
        Shape::weights(10),
        Shape {
            mirror: true,
            ..Shape::weights(10)
        },
    ] {
        let p = problem_of(&r, &shape);
        assert_eq!(p.kind, ProblemKind::MirrorsToService, "{p}");
    }
    // On the backendRef too.
    let mut b = s_ref(1);
    b["filters"] = json!([to_s]);
    assert_eq!(
        problem_of(&route(json!([{"backendRefs": [b]}])), &Shape::weights(10)).kind,
        ProblemKind::MirrorsToService
    );
    let audit = json!({"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "audit", "port": 80}}});
    let r = route(json!([{"filters": [audit.clone()], "backendRefs": [s_ref(1)]}]));
    let mirror = Shape {
        mirror: true,
        ..Shape::weights(10)
    };
    let (after, _) = split_and_check_restore(&r, &mirror);
    let fs = after["spec"]["rules"][0]["filters"].as_array().unwrap();
    assert_eq!(fs.len(), 2);
    assert_eq!(fs[0], audit);
}

#[test]
fn hostile_weights_zero_everywhere_are_reported_and_a_dark_rule_beside_a_live_one_splits() {
    let r = route(json!([{"backendRefs": [s_ref(0), other_ref("legacy", 1)]}]));
    let p = problem_of(&r, &Shape::weights(10));
    assert_eq!(p.kind, ProblemKind::NoTraffic);
    // The split itself is exact and harmless: 0/0.
    let (after, _) = split_and_check_restore(&r, &Shape::weights(10));
    assert_eq!(
        refs_of(&after["spec"]["rules"][0])[..2],
        [(STABLE.into(), 0), (RECORDING.into(), 0)]
    );
    let r = route(json!([
        {"matches": [{"path": {"type": "PathPrefix", "value": "/dark"}}], "backendRefs": [s_ref(0)]},
        {"backendRefs": [s_ref(2)]},
    ]));
    assert_eq!(shape_problem(&r, &target(), &Shape::weights(10)), None);
    let always = [json!({"headers": {"x-record": {"exact": "1"}}})];
    let shape = Shape {
        always: &always,
        ..Shape::weights(10)
    };
    let (after, _) = split_and_check_restore(&r, &shape);
    // The dark rule carries nothing to the Service: no always rule is carved out of it.
    assert_eq!(
        names(&after["spec"]["rules"]),
        ["-", "rcanary-always-1", "-"]
    );
}

#[test]
fn hostile_sixteen_rules_split_as_they_are_and_refuse_rules_added_for_always() {
    let rules: Vec<Value> = (0..16)
        .map(|i| json!({"matches": [{"path": {"type": "PathPrefix", "value": format!("/p{i}")}}], "backendRefs": [s_ref(1)]}))
        .collect();
    let r = route(Value::Array(rules));
    split_and_check_restore(&r, &Shape::weights(10));
    let never = [json!({"headers": {"x-pii": {"exact": "1"}}})];
    let shape = Shape {
        never: &never,
        ..Shape::weights(10)
    };
    let p = problem_of(&r, &shape);
    assert_eq!(p.kind, ProblemKind::TooManyRules);
    assert!(p.message.contains("32 rules"), "{p}");
}

#[test]
fn hostile_a_rule_whose_backend_refs_would_pass_sixteen_is_refused() {
    let mut refs: Vec<Value> = (0..14).map(|i| other_ref(&format!("b{i}"), 1)).collect();
    refs.push(s_ref(1));
    let r = route(json!([{"backendRefs": refs.clone()}]));
    split_and_check_restore(&r, &Shape::weights(10));
    refs.push(other_ref("b15", 1));
    let p = problem_of(&route(json!([{"backendRefs": refs}])), &Shape::weights(10));
    assert_eq!(p.kind, ProblemKind::TooManyBackendRefs);
    assert!(p.message.contains("17 backendRefs"), "{p}");
}

#[test]
fn hostile_a_grpc_route_attached_to_the_service_is_named() {
    let grpc = route(json!([{"backendRefs": [s_ref(1)]}])).tap(|r| {
        r["kind"] = json!("GRPCRoute");
        r["metadata"]["name"] = json!("rpc");
    });
    let p = other_route_problem("GRPCRoute", &grpc, &target()).expect("named");
    assert_eq!(p.kind, ProblemKind::OtherRouteKind);
    assert!(p.message.contains("GRPCRoute (rpc)"), "{p}");
    let elsewhere = grpc.tap(|r| {
        r["spec"]["parentRefs"] = json!([{"group": "", "kind": "Service", "name": "other"}])
    });
    assert_eq!(
        other_route_problem("GRPCRoute", &elsewhere, &target()),
        None
    );
}

#[test]
fn hostile_a_prefix_rewrite_keeps_its_one_prefix_match_or_is_refused() {
    let rule = json!({
        "matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
        "filters": [{"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}}],
        "backendRefs": [s_ref(1)],
    });
    let r = route(json!([rule]));
    // A header keeps the rule's one PathPrefix match: fine.
    let always = [json!({"headers": {"x-record": {"exact": "1"}}})];
    let ok = Shape {
        always: &always,
        ..Shape::weights(10)
    };
    split_and_check_restore(&r, &ok);
    // A longer path would change which prefix the rewrite replaces.
    let never = [json!({"uri": {"exact": "/api/admin"}})];
    let bad = Shape {
        never: &never,
        ..Shape::weights(10)
    };
    assert_eq!(problem_of(&r, &bad).kind, ProblemKind::PrefixRewrite);
    // Without always/never the rewrite is left as it is.
    split_and_check_restore(&r, &Shape::weights(10));
}

#[test]
fn hostile_a_users_rule_named_like_an_inserted_rule_is_refused() {
    let r = route(json!([
        {"name": "rcanary-never-1", "matches": [{"path": {"type": "PathPrefix", "value": "/x"}}], "backendRefs": [other_ref("x", 1)]},
        {"backendRefs": [s_ref(1)]},
    ]));
    let never = [json!({"headers": {"x-pii": {"exact": "1"}}})];
    let shape = Shape {
        never: &never,
        ..Shape::weights(10)
    };
    assert_eq!(problem_of(&r, &shape).kind, ProblemKind::RuleName);
    // Not a problem while nothing is inserted: the user's rule is none of ours.
    split_and_check_restore(&r, &Shape::weights(10));
}

#[test]
fn hostile_a_header_regex_on_the_rule_and_an_exact_header_in_never_are_refused() {
    let r = route(json!([{
        "matches": [{"path": {"type": "PathPrefix", "value": "/"}, "headers": [{"name": "x-pii", "type": "RegularExpression", "value": "a.*"}]}],
        "backendRefs": [s_ref(1)],
    }]));
    let never = [json!({"headers": {"x-pii": {"exact": "abc"}}})];
    let shape = Shape {
        never: &never,
        ..Shape::weights(10)
    };
    let p = problem_of(&r, &shape);
    assert_eq!(p.kind, ProblemKind::Matches);
    assert!(
        p.message.contains("spec.never[0]") && p.message.contains("x-pii"),
        "{p}"
    );
    // A never uri prefix without a trailing slash has no exact Gateway API form.
    let never = [json!({"uri": {"prefix": "/health"}})];
    let p = problem_of(
        &route(json!([{"backendRefs": [s_ref(1)]}])),
        &Shape {
            never: &never,
            ..Shape::weights(10)
        },
    );
    assert_eq!(p.kind, ProblemKind::Matches);
    assert!(
        p.message.contains("/healthz") || p.message.contains("string prefix"),
        "{p}"
    );
}

#[test]
fn hostile_a_regex_path_rule_takes_header_conditions_and_keeps_its_path() {
    let regex = json!({"path": {"type": "RegularExpression", "value": "/v[0-9]+/.*"}});
    let r = route(json!([{"matches": [regex.clone()], "backendRefs": [s_ref(1)]}]));
    let always = [json!({"headers": {"x-record": {"exact": "1"}}})];
    let shape = Shape {
        always: &always,
        ..Shape::weights(10)
    };
    let (after, _) = split_and_check_restore(&r, &shape);
    assert_eq!(
        after["spec"]["rules"][0]["matches"][0]["path"],
        regex["path"]
    );
}

#[test]
fn hostile_a_redirect_rule_and_a_rule_to_another_kind_are_left_alone() {
    let redirect =
        json!({"filters": [{"type": "RequestRedirect", "requestRedirect": {"scheme": "https"}}]});
    let import = json!({"backendRefs": [{"group": "multicluster.x-k8s.io", "kind": "ServiceImport", "name": "frontend", "port": 80}]});
    let r = route(json!([redirect, import, {"backendRefs": [s_ref(1)]}]));
    let (after, _) = split_and_check_restore(&r, &Shape::weights(10));
    assert_eq!(after["spec"]["rules"][0], r["spec"]["rules"][0]);
    assert_eq!(after["spec"]["rules"][1], r["spec"]["rules"][1]);
}

#[test]
fn hostile_a_route_reapplied_by_gitops_while_split_is_split_again_from_what_it_is_now() {
    let r = route(json!([{"name": "a", "backendRefs": [s_ref(80), other_ref("legacy", 20)]}]));
    let s = split(&r, &Shape::weights(10));
    // A GitOps tool puts its own version back (another weight), our annotation left in place.
    let reapplied =
        route(json!([{"name": "a", "backendRefs": [s_ref(50), other_ref("legacy", 50)]}]));
    let again = split_rules(
        &reapplied,
        &target(),
        &Shape::weights(10),
        Some(&s.note),
        "c",
    )
    .unwrap();
    assert_eq!(again, split(&reapplied, &Shape::weights(10)));
    assert_eq!(
        unsplit_rules(&reapplied, &target(), Some(&s.note)),
        reapplied["spec"]["rules"]
    );
}

#[test]
fn hostile_a_half_restored_pair_goes_back_to_the_service_with_the_weight_it_carries() {
    let r = route(json!([{"backendRefs": [
        {"group": "", "kind": "Service", "name": RECORDING, "port": 80, "weight": 3},
        other_ref("legacy", 1)]}]));
    let back = unsplit_rules(&r, &target(), None);
    assert_eq!(
        refs_of(&back[0]),
        [("frontend".into(), 3), ("legacy".into(), 1)]
    );
}

#[test]
fn hostile_too_many_matches_after_anding_are_refused() {
    let entries: Vec<Value> = (0..33)
        .map(|i| json!({"path": {"type": "PathPrefix", "value": format!("/p{i}")}}))
        .collect();
    let r = route(json!([{"matches": entries, "backendRefs": [s_ref(1)]}]));
    let always = [
        json!({"headers": {"x-a": {"exact": "1"}}}),
        json!({"headers": {"x-b": {"exact": "1"}}}),
    ];
    let shape = Shape {
        always: &always,
        ..Shape::weights(10)
    };
    let p = problem_of(&r, &shape);
    assert_eq!(p.kind, ProblemKind::TooManyMatches);
    assert!(p.message.contains("66"), "{p}");
}

#[test]
fn hostile_spellings_of_the_service_ref_restore_exactly() {
    let r = route(json!([{"backendRefs": [
        {"group": "core", "name": "frontend", "namespace": "shop", "port": 80},
        {"kind": "Service", "name": "frontend", "port": 8080, "weight": 0},
    ]}]));
    let (after, _) = split_and_check_restore(&r, &Shape::weights(30));
    let refs = after["spec"]["rules"][0]["backendRefs"].as_array().unwrap();
    assert_eq!(refs.len(), 4);
    assert_eq!(refs[0]["namespace"], "shop");
    assert_eq!(refs[0]["group"], "");
}

// ---------------------------------------------------------------------------------------------
// The canary's own route and the note

#[test]
fn the_own_route_has_the_service_as_parent_and_one_catch_all_rule_split_into_the_shape() {
    let mut t = target();
    t.port = Some(ServicePort {
        number: 80,
        name: None,
    });
    let own = own_route("frontend-recording", "c", &t, 80, &Shape::weights(10)).unwrap();
    assert_eq!(own["metadata"]["labels"][CANARY_LABEL], "c");
    assert_eq!(
        own["spec"]["parentRefs"],
        json!([{"group": "", "kind": "Service", "name": "frontend", "port": 80}])
    );
    let rules = own["spec"]["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0]["matches"],
        json!([{"path": {"type": "PathPrefix", "value": "/"}}])
    );
    assert_eq!(
        refs_of(&rules[0]),
        [(STABLE.into(), 90), (RECORDING.into(), 10)]
    );
    assert!(concerns(&own, &t));
    assert_eq!(note_owner(restore_note_of(&own)).as_deref(), Some("c"));
    // Every request matches it.
    assert_eq!(
        precedence::winner(rules, &req("/anything/at/all", &[])),
        Some(0)
    );
    let back = unsplit_rules(&own, &t, restore_note_of(&own));
    assert_eq!(refs_of(&back[0]), [("frontend".into(), 100)]);
}

#[test]
fn a_note_that_is_not_ours_or_not_json_restores_without_it() {
    assert_eq!(note_owner(Some("not json")), None);
    assert_eq!(note_owner(None), None);
    let r = route(json!([{"backendRefs": [s_ref(1)]}]));
    let s = split(&r, &Shape::weights(50));
    let v = with_rules(&r, s.rules);
    let back = unsplit_rules(&v, &target(), Some("{\"rules\": 7}"));
    assert_eq!(refs_of(&back[0]), [("frontend".into(), 2)]);
}
