//! Property tests of the split and its restore, on generated VirtualServices: whatever the user's
//! routes look like and whatever the shape (percent, Split or Mirror, forced and excluded
//! requests), splitting then restoring gives back exactly the original (also after a live change
//! of shape), every split route's weights sum to 100 (or stay as they were, mirroring), what is
//! not split stays byte-equal, and splitting twice equals once.

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;

const NS: &str = "shop";

fn host() -> ServiceHost {
    ServiceHost::new("frontend", NS, "cluster.local")
}

/// Ways a destination can name a host: ours in three spellings, and others.
fn dest_host_name() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("frontend"),
        Just("frontend.shop"),
        Just("frontend.shop.svc.cluster.local"),
        Just("backend"),
        Just("frontend.payments.svc.cluster.local"),
    ]
}

/// Splits 100 into `n` non-negative parts.
fn weights(n: usize) -> impl Strategy<Value = Vec<i64>> {
    proptest::collection::vec(0i64..=100, n.saturating_sub(1)).prop_map(move |mut cuts| {
        cuts.sort_unstable();
        let mut out = Vec::with_capacity(n);
        let mut last = 0;
        for c in cuts {
            out.push(c - last);
            last = c;
        }
        out.push(100 - last);
        out
    })
}

/// One HTTP route: 1 to 3 destinations (a user subset now and then, a port now and then),
/// weights that sum to 100 (absent on a single destination now and then), and some other fields.
fn route() -> impl Strategy<Value = Value> {
    (1usize..=3)
        .prop_flat_map(|n| {
            (
                proptest::collection::vec(
                    (
                        dest_host_name(),
                        proptest::option::of(Just("v1")),
                        any::<bool>(),
                    ),
                    n,
                ),
                weights(n),
                any::<bool>(),
                any::<bool>(),
            )
        })
        .prop_map(|(dests, ws, omit_single_weight, with_match)| {
            let single = dests.len() == 1;
            let route: Vec<Value> = dests
                .into_iter()
                .zip(ws)
                .map(|((h, subset, port), w)| {
                    let mut dest = json!({"host": h});
                    if let Some(s) = subset {
                        dest["subset"] = json!(s);
                    }
                    if port {
                        dest["port"] = json!({"number": 8080});
                    }
                    let mut d = json!({"destination": dest});
                    if !(single && omit_single_weight) {
                        d["weight"] = json!(w);
                    }
                    d["headers"] = json!({"request": {"set": {"x-env": "prod"}}});
                    d
                })
                .collect();
            let mut r = json!({"route": route, "timeout": "3s"});
            if with_match {
                r["match"] = json!([{"uri": {"prefix": "/api"}}]);
                r["name"] = json!("api");
            }
            r
        })
}

/// A VirtualService spec: 1 to 4 HTTP routes, and TCP routes and unknown fields left alone.
fn vs_spec() -> impl Strategy<Value = Value> {
    (proptest::collection::vec(route(), 1..=4), any::<bool>()).prop_map(|(http, tcp)| {
        let mut spec = json!({"hosts": ["frontend"], "http": http, "x-unknown": {"kept": true}});
        if tcp {
            spec["tcp"] = json!([{"route": [{"destination": {"host": "frontend"}}]}]);
        }
        spec
    })
}

fn touches_host(route: &Value) -> bool {
    route
        .get("route")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|d| {
            d.pointer("/destination/host")
                .and_then(Value::as_str)
                .is_some_and(|h| host().matches(h, NS))
                && d.pointer("/destination/subset").is_none()
        })
}

fn with_http(spec: &Value, http: Value) -> Value {
    let mut s = spec.clone();
    s["http"] = http;
    s
}

/// A shape's owned parts: percent, mirror, `always`, `never`.
type ShapeParts = (i32, bool, Vec<Value>, Vec<Value>);

fn shape_parts() -> impl Strategy<Value = ShapeParts> {
    let always = prop_oneof![
        Just(vec![]),
        Just(vec![json!({"headers": {"x-record": {"exact": "1"}}})]),
        Just(vec![
            json!({"uri": {"prefix": "/api/v2"}}),
            json!({"method": {"exact": "POST"}})
        ]),
    ];
    let never = prop_oneof![
        Just(vec![]),
        Just(vec![json!({"uri": {"prefix": "/health"}})]),
        Just(vec![
            json!({"uri": {"exact": "/api/admin"}}),
            json!({"headers": {"x-pii": {"regex": ".+"}}})
        ]),
    ];
    (0i32..=100, any::<bool>(), always, never)
}

fn shape(p: &ShapeParts) -> Shape<'_> {
    Shape {
        percent: p.0,
        mirror: p.1,
        always: &p.2,
        never: &p.3,
    }
}

fn is_inserted_route(r: &Value) -> bool {
    r.get("name")
        .and_then(Value::as_str)
        .is_some_and(|n| n.ends_with(ALWAYS_ROUTE) || n.ends_with(NEVER_ROUTE))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn split_then_restore_gives_back_exactly_the_original(spec in vs_spec(), parts in shape_parts()) {
        let split = split_http(&spec, &host(), NS, &shape(&parts), None, "c");
        let restored = unsplit_http(&with_http(&spec, split.http.clone()), &host(), NS, Some(&split.note));
        prop_assert_eq!(&restored, &spec["http"]);
    }

    #[test]
    fn a_live_change_of_shape_still_restores_exactly(spec in vs_spec(), a in shape_parts(), b in shape_parts()) {
        let first = split_http(&spec, &host(), NS, &shape(&a), None, "c");
        let second = split_http(&with_http(&spec, first.http.clone()), &host(), NS, &shape(&b), Some(&first.note), "c");
        let restored = unsplit_http(&with_http(&spec, second.http.clone()), &host(), NS, Some(&second.note));
        prop_assert_eq!(&restored, &spec["http"]);
    }

    #[test]
    fn every_split_route_weighs_100_and_other_routes_stay_byte_equal(spec in vs_spec(), parts in shape_parts()) {
        let sh = shape(&parts);
        let split = split_http(&spec, &host(), NS, &sh, None, "c");
        let before = spec["http"].as_array().cloned().unwrap_or_default();
        let after: Vec<Value> = split.http.as_array().cloned().unwrap_or_default()
            .into_iter().filter(|r| !is_inserted_route(r)).collect();
        prop_assert_eq!(before.len(), after.len());
        for (b, a) in before.iter().zip(&after) {
            if !touches_host(b) {
                prop_assert_eq!(b.to_string(), a.to_string());
                continue;
            }
            let weights = |r: &Value| -> Vec<i64> { r["route"].as_array().into_iter().flatten()
                .map(|d| d.get("weight").and_then(Value::as_i64).unwrap_or(0)).collect() };
            let sum: i64 = weights(a).iter().sum();
            if sh.mirror {
                // Mirroring moves no weight: the same destinations, the same weights.
                prop_assert_eq!(weights(a), weights(b), "route {}", a);
                let ours: Vec<&Value> = a["mirrors"].as_array().into_iter().flatten()
                    .filter(|m| m.pointer("/destination/subset") == Some(&json!(RECORDING_SUBSET))).collect();
                prop_assert_eq!(ours.len(), 1, "route {}", a);
                prop_assert_eq!(&ours[0]["percentage"]["value"], &json!(sh.percent));
            } else {
                prop_assert_eq!(sum, 100, "route {}", a);
            }
            // Everything but the destinations and the mirrors is untouched.
            let strip = |r: &Value| { let mut r = r.clone(); r["route"] = Value::Null; r["mirrors"] = Value::Null; r };
            prop_assert_eq!(strip(b), strip(a));
        }
    }

    #[test]
    fn forced_and_excluded_routes_go_ahead_of_their_route_never_first(spec in vs_spec(), parts in shape_parts()) {
        let sh = shape(&parts);
        let split = split_http(&spec, &host(), NS, &sh, None, "c");
        let after = split.http.as_array().cloned().unwrap_or_default();
        let mut pending: Vec<&str> = Vec::new();
        for r in &after {
            if is_inserted_route(r) {
                let kind = if r["name"].as_str().unwrap_or_default().ends_with(NEVER_ROUTE) { "never" } else { "always" };
                // never before always, and both straight ahead of the route they copy.
                prop_assert!(!(kind == "never" && pending.contains(&"always")), "{:#?}", after);
                pending.push(kind);
                let dests = r["route"].as_array().cloned().unwrap_or_default();
                prop_assert_eq!(dests.len(), 1);
                let want = if kind == "always" && !sh.mirror { RECORDING_SUBSET } else { STABLE_SUBSET };
                prop_assert_eq!(&dests[0]["destination"]["subset"], &json!(want));
                prop_assert!(r["match"].as_array().is_some_and(|m| !m.is_empty()));
                let mirrors_ours = r["mirrors"].as_array().into_iter().flatten()
                    .any(|m| m.pointer("/destination/subset") == Some(&json!(RECORDING_SUBSET)));
                // An excluded request is never recorded, not even by a mirror.
                prop_assert_eq!(mirrors_ours, kind == "always" && sh.mirror);
            } else {
                prop_assert!(pending.is_empty() || touches_host(&unsplit_http(&json!({"http": [r]}), &host(), NS, None)[0]),
                    "inserted routes ahead of a route that is not split: {:#?}", after);
                pending.clear();
            }
        }
        let st = read_split(&with_http(&spec, split.http.clone()), &host(), NS);
        prop_assert_eq!(st.mirrored, sh.mirror && st.pairs > 0);
    }

    #[test]
    fn after_a_split_no_destination_to_the_host_is_left_unsplit(spec in vs_spec(), parts in shape_parts()) {
        let split = split_http(&spec, &host(), NS, &shape(&parts), None, "c");
        let st = read_split(&with_http(&spec, split.http.clone()), &host(), NS);
        prop_assert!(st.pairs > 0 || !spec["http"].as_array().into_iter().flatten().any(touches_host));
        prop_assert_eq!(st.unsplit, 0);
        if st.pairs > 0 {
            prop_assert_eq!(st.percent, Some(parts.0).filter(|_| parts.1).or(st.percent));
        }
    }

    #[test]
    fn splitting_twice_equals_splitting_once(spec in vs_spec(), a in shape_parts(), b in shape_parts()) {
        let once = split_http(&spec, &host(), NS, &shape(&b), None, "c");
        let first = split_http(&spec, &host(), NS, &shape(&a), None, "c");
        let twice = split_http(&with_http(&spec, first.http.clone()), &host(), NS, &shape(&b), Some(&first.note), "c");
        prop_assert_eq!(&twice.http, &once.http);
        prop_assert_eq!(&twice.note, &once.note);
        // And the same split again changes nothing.
        let again = split_http(&with_http(&spec, twice.http.clone()), &host(), NS, &shape(&b), Some(&twice.note), "c");
        prop_assert_eq!(&again.http, &twice.http);
    }
}
