//! What Istio reports in the status of a VirtualService or DestinationRule: whether the object's
//! current generation has reached every proxy.
//!
//! With `PILOT_ENABLE_STATUS=true` and `PILOT_ENABLE_CONFIG_DISTRIBUTION_TRACKING=true`, istiod
//! writes the status subresource of the config it distributes (`istio.io/api` `meta/v1alpha1`
//! `IstioStatus`):
//!
//! ```yaml
//! status:
//!   observedGeneration: "7"          # int64: protojson writes it as a string
//!   conditions:
//!   - type: Reconciled
//!     status: "True"                 # "False" while proxies are still catching up
//!     message: 3/3 proxies up to date.
//! ```
//!
//! `status.observedGeneration` is "the generation to which the Reconciled condition refers";
//! newer API versions also give each condition its own `observedGeneration`, which then takes
//! precedence. Both may be a string or a number.

use serde_json::{Map, Value};

/// The condition type istiod sets once a config generation has reached every proxy.
pub const RECONCILED: &str = "Reconciled";

/// An int64 as Istio's status carries it: a number, or a decimal string (protojson).
fn generation(v: &Value) -> Option<i64> {
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

/// The `Reconciled` condition of an object's status, if any.
fn reconciled_condition(status: &Value) -> Option<&Value> {
    status
        .get("conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(RECONCILED))
}

/// Whether Istio reports that the object's current generation (`metadata.generation` of this
/// very revision) has reached every proxy: its `Reconciled` condition is `True` for exactly
/// that generation. An older generation, a condition that is `False` or `Unknown`, or no
/// status at all (Istio does not report) is `false`.
pub fn reconciled(obj: &Value) -> bool {
    let Some(current) = obj.pointer("/metadata/generation").and_then(generation) else {
        return false;
    };
    let Some(status) = obj.get("status") else {
        return false;
    };
    let Some(cond) = reconciled_condition(status) else {
        return false;
    };
    if cond.get("status").and_then(Value::as_str) != Some("True") {
        return false;
    }
    let observed = cond
        .get("observedGeneration")
        .and_then(generation)
        .or_else(|| status.get("observedGeneration").and_then(generation));
    observed == Some(current)
}

/// What a cache keeps of an Istio status: `observedGeneration` and the `Reconciled` condition's
/// type, status and own `observedGeneration` (no messages, probe times or analysis results, which
/// istiod rewrites as proxies catch up). `None` when nothing of it is left.
pub fn compact(status: &Value) -> Option<Value> {
    let mut out = Map::new();
    if let Some(g) = status.get("observedGeneration") {
        out.insert("observedGeneration".into(), g.clone());
    }
    if let Some(c) = reconciled_condition(status) {
        let kept: Map<String, Value> = ["type", "status", "observedGeneration"]
            .into_iter()
            .filter_map(|k| c.get(k).map(|v| (k.to_string(), v.clone())))
            .collect();
        out.insert("conditions".into(), Value::Array(vec![Value::Object(kept)]));
    }
    (!out.is_empty()).then_some(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(generation: i64, status: Value) -> Value {
        json!({"metadata": {"name": "d", "generation": generation}, "spec": {}, "status": status})
    }

    fn cond(status: &str) -> Value {
        json!({"type": "Reconciled", "status": status, "message": "3/3 proxies up to date.",
               "lastTransitionTime": "2026-01-01T00:00:00Z", "lastProbeTime": "2026-01-01T00:00:00Z"})
    }

    #[test]
    fn reconciled_for_the_current_generation_as_a_string_or_a_number() {
        for g in [json!("4"), json!(4)] {
            let o = obj(
                4,
                json!({"observedGeneration": g, "conditions": [cond("True")]}),
            );
            assert!(reconciled(&o), "{o}");
        }
    }

    #[test]
    fn an_older_generation_a_false_condition_or_no_status_is_not_reconciled() {
        assert!(!reconciled(&obj(
            5,
            json!({"observedGeneration": "4", "conditions": [cond("True")]})
        )));
        assert!(!reconciled(&obj(
            4,
            json!({"observedGeneration": "4", "conditions": [cond("False")]})
        )));
        assert!(!reconciled(&obj(
            4,
            json!({"observedGeneration": "4", "conditions": [cond("Unknown")]})
        )));
        assert!(!reconciled(&obj(4, json!({"observedGeneration": "4"}))));
        assert!(!reconciled(&obj(4, json!({"conditions": [cond("True")]}))));
        let mut none = obj(4, Value::Null);
        none.as_object_mut().map(|o| o.remove("status"));
        assert!(!reconciled(&none));
        // A generation that is not a number is not a match.
        assert!(!reconciled(&obj(
            4,
            json!({"observedGeneration": "four", "conditions": [cond("True")]})
        )));
    }

    #[test]
    fn the_conditions_own_generation_takes_precedence() {
        let mut c = cond("True");
        c["observedGeneration"] = json!("3");
        assert!(!reconciled(&obj(
            4,
            json!({"observedGeneration": "4", "conditions": [c.clone()]})
        )));
        c["observedGeneration"] = json!(4);
        assert!(reconciled(&obj(
            4,
            json!({"observedGeneration": "3", "conditions": [c]})
        )));
    }

    #[test]
    fn other_conditions_do_not_count() {
        let mut c = cond("True");
        c["type"] = json!("PassedAnalysis");
        assert!(!reconciled(&obj(
            4,
            json!({"observedGeneration": "4", "conditions": [c]})
        )));
    }

    #[test]
    fn compact_keeps_only_what_reconciled_reads() {
        let status = json!({
            "observedGeneration": "4",
            "conditions": [
                {"type": "PassedAnalysis", "status": "True"},
                cond("True"),
            ],
            "validationMessages": [{"level": "WARNING", "type": {"code": "IST0102"}}],
        });
        let kept = compact(&status).expect("something kept");
        assert_eq!(
            kept,
            json!({"observedGeneration": "4", "conditions": [{"type": "Reconciled", "status": "True"}]})
        );
        assert!(reconciled(&obj(4, kept.clone())));
        assert_eq!(reconciled(&obj(4, status)), reconciled(&obj(4, kept)));
        assert_eq!(compact(&json!({"validationMessages": []})), None);
    }
}
