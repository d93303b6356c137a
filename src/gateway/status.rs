//! What a mesh reports in an HTTPRoute's status: whether a parent has accepted the route's
//! current generation (make before break waits for it), and Istio's verdict on waypoints.
//!
//! Each controller that handles a parent writes one `status.parents[]` entry for it:
//!
//! ```yaml
//! status:
//!   parents:
//!   - parentRef: {group: "", kind: Service, name: frontend}
//!     controllerName: istio.io/gateway-controller
//!     conditions:
//!     - {type: Accepted, status: "True", observedGeneration: 7, reason: Accepted}
//!     - {type: ResolvedRefs, status: "True", observedGeneration: 7, reason: ResolvedRefs}
//!     - {type: ResolvedWaypoints, status: "False", reason: MissingUseWaypointLabel}   # Istio
//! ```
//!
//! `observedGeneration` on a condition is the `metadata.generation` it was set for: a condition
//! of an older generation says nothing about the current rules.

use serde_json::{Map, Value};

use super::GROUP;

/// The condition a parent sets once it has attached the route.
pub const ACCEPTED: &str = "Accepted";
/// The condition a parent sets once every backendRef (and mirror) of the route resolves.
pub const RESOLVED_REFS: &str = "ResolvedRefs";
/// Istio's condition on a route in ambient mode: whether its parent has a waypoint
/// (`istio.io/use-waypoint` on the Service or its namespace) to apply it.
pub const RESOLVED_WAYPOINTS: &str = "ResolvedWaypoints";
/// The reason of `ResolvedWaypoints: False` when there is no waypoint: Istio ignores the route.
pub const MISSING_USE_WAYPOINT_LABEL: &str = "MissingUseWaypointLabel";

/// A parentRef with its defaults applied (group and kind of a Gateway, the route's namespace),
/// for comparing the spec's parentRefs with those of `status.parents[]`.
fn normalized(p: &Value, route_ns: &str) -> (String, String, String, String, String, Option<i64>) {
    let s = |k: &str, default: &str| {
        p.get(k)
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_string()
    };
    let group = match s("group", GROUP).as_str() {
        "core" => String::new(),
        g => g.to_string(),
    };
    (
        group,
        s("kind", "Gateway"),
        s("namespace", route_ns),
        s("name", ""),
        s("sectionName", ""),
        p.get("port").and_then(Value::as_i64),
    )
}

fn route_ns(route: &Value) -> &str {
    route
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn generation(v: &Value) -> Option<i64> {
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

fn parent_entries(route: &Value) -> impl Iterator<Item = &Value> {
    route
        .pointer("/status/parents")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

fn condition<'a>(entry: &'a Value, kind: &str) -> Option<&'a Value> {
    entry
        .get("conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))
}

/// Whether every `status.parents[]` entry for `parent` (a parentRef of the route's spec), and
/// at least one, has `Accepted` and `ResolvedRefs` `True` for the route's current generation. An
/// older generation, a condition `False` or `Unknown`, or no entry at all (no controller handles
/// the parent, or it has not caught up) is `false`.
pub fn accepted_for_current_generation(route: &Value, parent: &Value) -> bool {
    let Some(current) = route.pointer("/metadata/generation").and_then(generation) else {
        return false;
    };
    let ns = route_ns(route);
    let want = normalized(parent, ns);
    let mut entries = parent_entries(route)
        .filter(|e| {
            e.get("parentRef")
                .is_some_and(|p| normalized(p, ns) == want)
        })
        .peekable();
    entries.peek().is_some()
        && entries.all(|e| {
            [ACCEPTED, RESOLVED_REFS].iter().all(|kind| {
                condition(e, kind).is_some_and(|c| {
                    c.get("status").and_then(Value::as_str) == Some("True")
                        && c.get("observedGeneration").and_then(generation) == Some(current)
                })
            })
        })
}

/// Istio's `ResolvedWaypoints` over the route's parents: `Some(false)` when a parent reports it
/// `False` (with reason [`MISSING_USE_WAYPOINT_LABEL`], Istio ignores the route: no waypoint
/// applies it), `Some(true)` when it is reported and `True` everywhere, `None` when no parent
/// reports it (sidecar mode, or another mesh).
pub fn resolved_waypoints(route: &Value) -> Option<bool> {
    let mut seen = None;
    for c in parent_entries(route).filter_map(|e| condition(e, RESOLVED_WAYPOINTS)) {
        let ok = c.get("status").and_then(Value::as_str) == Some("True");
        if !ok {
            return Some(false);
        }
        seen = Some(true);
    }
    seen
}

/// The reason and message of a `ResolvedWaypoints: False`, for a Blocked reason or an Event.
pub fn unresolved_waypoint(route: &Value) -> Option<(String, String)> {
    parent_entries(route)
        .filter_map(|e| condition(e, RESOLVED_WAYPOINTS))
        .find(|c| c.get("status").and_then(Value::as_str) != Some("True"))
        .map(|c| {
            let s = |k: &str| {
                c.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            (s("reason"), s("message"))
        })
}

/// What a cache keeps of a route's status: per parent, its `parentRef` and the type, status,
/// reason and `observedGeneration` of the conditions read here (no messages or transition times,
/// which change without meaning anything to the controller). `None` when nothing is left.
pub fn compact(status: &Value) -> Option<Value> {
    let parents: Vec<Value> = status
        .get("parents")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|e| {
            let mut out = Map::new();
            if let Some(p) = e.get("parentRef") {
                out.insert("parentRef".into(), p.clone());
            }
            let conditions: Vec<Value> = [ACCEPTED, RESOLVED_REFS, RESOLVED_WAYPOINTS]
                .iter()
                .filter_map(|k| condition(e, k))
                .map(|c| {
                    Value::Object(
                        ["type", "status", "reason", "observedGeneration"]
                            .into_iter()
                            .filter_map(|k| c.get(k).map(|v| (k.to_string(), v.clone())))
                            .collect(),
                    )
                })
                .collect();
            out.insert("conditions".into(), Value::Array(conditions));
            Value::Object(out)
        })
        .collect();
    (!parents.is_empty()).then(|| serde_json::json!({ "parents": parents }))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn cond(kind: &str, status: &str, generation: i64) -> Value {
        json!({"type": kind, "status": status, "observedGeneration": generation,
               "reason": kind, "message": "m", "lastTransitionTime": "2026-01-01T00:00:00Z"})
    }

    fn route(generation: i64, parents: Value) -> Value {
        json!({"metadata": {"name": "r", "namespace": "shop", "generation": generation},
               "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "frontend"}]},
               "status": {"parents": parents}})
    }

    fn service_parent() -> Value {
        json!({"group": "", "kind": "Service", "name": "frontend"})
    }

    fn entry(parent: Value, conditions: Value) -> Value {
        json!({"parentRef": parent, "controllerName": "istio.io/gateway-controller", "conditions": conditions})
    }

    #[test]
    fn accepted_and_resolved_for_the_current_generation_is_live() {
        let r = route(
            3,
            json!([entry(
                json!({"group": "", "kind": "Service", "name": "frontend", "namespace": "shop"}),
                json!([cond("Accepted", "True", 3), cond("ResolvedRefs", "True", 3)])
            )]),
        );
        // The spec's parentRef leaves the namespace out; the status writes it: the same parent.
        assert!(accepted_for_current_generation(&r, &service_parent()));
    }

    #[test]
    fn an_older_generation_a_false_condition_or_no_entry_is_not_live() {
        let both =
            |a: &str, g: i64| json!([cond("Accepted", a, g), cond("ResolvedRefs", "True", 3)]);
        let p = service_parent();
        assert!(!accepted_for_current_generation(
            &route(3, json!([entry(p.clone(), both("True", 2))])),
            &p
        ));
        assert!(!accepted_for_current_generation(
            &route(3, json!([entry(p.clone(), both("False", 3))])),
            &p
        ));
        assert!(!accepted_for_current_generation(
            &route(
                3,
                json!([entry(p.clone(), json!([cond("Accepted", "True", 3)]))])
            ),
            &p
        ));
        assert!(!accepted_for_current_generation(&route(3, json!([])), &p));
        // An entry for another parent (another port of the Service) does not count.
        let other = json!({"group": "", "kind": "Service", "name": "frontend", "port": 8080});
        assert!(!accepted_for_current_generation(
            &route(3, json!([entry(other, both("True", 3))])),
            &p
        ));
    }

    #[test]
    fn every_controller_reporting_for_the_parent_must_have_caught_up() {
        let p = service_parent();
        let ok = json!([cond("Accepted", "True", 3), cond("ResolvedRefs", "True", 3)]);
        let stale = json!([cond("Accepted", "True", 2), cond("ResolvedRefs", "True", 2)]);
        let r = route(3, json!([entry(p.clone(), ok), entry(p.clone(), stale)]));
        assert!(!accepted_for_current_generation(&r, &p));
    }

    #[test]
    fn resolved_waypoints_false_names_the_missing_label() {
        let p = service_parent();
        let mut missing = cond("ResolvedWaypoints", "False", 3);
        missing["reason"] = json!(MISSING_USE_WAYPOINT_LABEL);
        let r = route(3, json!([entry(p.clone(), json!([missing]))]));
        assert_eq!(resolved_waypoints(&r), Some(false));
        assert_eq!(
            unresolved_waypoint(&r).map(|(reason, _)| reason),
            Some(MISSING_USE_WAYPOINT_LABEL.to_string())
        );
        let ok = route(
            3,
            json!([entry(
                p.clone(),
                json!([cond("ResolvedWaypoints", "True", 3)])
            )]),
        );
        assert_eq!(resolved_waypoints(&ok), Some(true));
        assert_eq!(unresolved_waypoint(&ok), None);
        let sidecar = route(3, json!([entry(p, json!([cond("Accepted", "True", 3)]))]));
        assert_eq!(resolved_waypoints(&sidecar), None);
    }

    #[test]
    fn compact_keeps_what_the_readers_read() {
        let p = service_parent();
        let full = route(
            3,
            json!([entry(
                p.clone(),
                json!([
                    cond("Accepted", "True", 3),
                    cond("ResolvedRefs", "True", 3),
                    cond("PartiallyInvalid", "True", 3)
                ])
            )]),
        );
        let kept = compact(&full["status"]).expect("kept");
        assert_eq!(
            kept["parents"][0]["conditions"].as_array().map(Vec::len),
            Some(2)
        );
        assert_eq!(kept["parents"][0]["conditions"][0].get("message"), None);
        let mut small = full.clone();
        small["status"] = kept;
        assert!(accepted_for_current_generation(&small, &p));
        assert_eq!(compact(&json!({})), None);
    }
}
