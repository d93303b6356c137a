//! Adopting the user's own VirtualService and DestinationRule, and giving them back exactly.

use serde_json::{Value, json};

use crate::support::*;

/// Whether a destination (a `route` item) goes to the `frontend` Service of the test namespace.
fn to_frontend(d: &Value, ns: &str) -> bool {
    let host = d
        .pointer("/destination/host")
        .and_then(Value::as_str)
        .unwrap_or_default();
    host == "frontend"
        || host == format!("frontend.{ns}")
        || host == format!("frontend.{ns}.svc")
        || host == format!("frontend.{ns}.svc.cluster.local")
}

/// The user's spec with every subset-less `frontend` destination split at `percent`: the pair
/// stable/recording keeps every field of the original destination, adds the subset, and shares
/// the original weight (100 for a lone destination without weight), recording rounded half up.
fn expected_split(original: &Value, ns: &str, percent: i64) -> Value {
    let mut spec = original.clone();
    for route in spec["http"].as_array_mut().expect("spec.http") {
        let Some(ds) = route.get_mut("route").and_then(Value::as_array_mut) else {
            continue;
        };
        let single = ds.len() == 1;
        let mut out = Vec::new();
        for d in ds.iter() {
            if !to_frontend(d, ns) || d.pointer("/destination/subset").is_some() {
                out.push(d.clone());
                continue;
            }
            let w = d
                .get("weight")
                .and_then(Value::as_i64)
                .unwrap_or(if single { 100 } else { 0 });
            let rec = (w * percent + 50) / 100;
            for (subset, weight) in [(STABLE_SUBSET, w - rec), (RECORDING_SUBSET, rec)] {
                let mut x = d.clone();
                x["destination"]["subset"] = json!(subset);
                x["weight"] = json!(weight);
                out.push(x);
            }
        }
        *ds = out;
    }
    spec
}

fn annotations(obj: &Value) -> serde_json::Map<String, Value> {
    obj.pointer("/metadata/annotations")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_vs_is_changed_only_where_the_split_requires_and_restored_exactly() {
    let mut h = Harness::start("adopt").await;
    h.apply_example("app.yaml").await;
    h.apply_example("adopt/user-vs-dr.yaml").await;
    let vs0 = h.vs("frontend").await.expect("user VirtualService");
    let dr0 = h.dr("frontend").await.expect("user DestinationRule");

    h.apply_example("adopt/canary.yaml").await;
    h.patch_canary("frontend", &json!({"spec": {"propagationDelay": "1s"}}))
        .await;
    h.wait_ready("frontend").await;
    h.wait_status("frontend", "Ready", 10).await;

    // The VirtualService: only the frontend destinations differ.
    let vs = h.vs("frontend").await.expect("VirtualService");
    let weights: Vec<Vec<(Option<String>, Option<i64>)>> = http_destinations(&vs)
        .into_iter()
        .map(|ds| ds.into_iter().map(|(_, s, w)| (s, w)).collect())
        .collect();
    let sub = |s: &str| Some(s.to_string());
    assert_eq!(
        weights,
        vec![
            vec![
                (sub(STABLE_SUBSET), Some(90)),
                (sub(RECORDING_SUBSET), Some(10))
            ],
            vec![
                (sub(STABLE_SUBSET), Some(72)),
                (sub(RECORDING_SUBSET), Some(8)),
                (None, Some(20)),
            ],
        ],
        "route weights (single destination 90/10; the 80/20 route 72/8/20): {}",
        vs["spec"]
    );
    let expected = expected_split(&vs0["spec"], &h.ns, 10);
    assert_eq!(
        vs["spec"], expected,
        "the VirtualService may differ from the user's only in the split frontend destinations\n\
         original: {}",
        vs0["spec"]
    );
    for (i, field) in [(0, "retries"), (0, "timeout"), (0, "match"), (1, "retries")] {
        assert_eq!(
            vs["spec"]["http"][i][field], vs0["spec"]["http"][i][field],
            "http[{i}].{field}"
        );
    }
    assert_eq!(
        vs["spec"]["http"][1]["route"][2], vs0["spec"]["http"][1]["route"][1],
        "the frontend-legacy destination"
    );
    assert!(
        annotations(&vs).contains_key(RESTORE_ANNOTATION),
        "the adopted VirtualService records what to restore in {RESTORE_ANNOTATION}"
    );
    assert_eq!(
        vs.pointer("/metadata/ownerReferences"),
        vs0.pointer("/metadata/ownerReferences"),
        "the user's VirtualService must not become owned by the canary"
    );

    // The DestinationRule: the user's spec plus the two subsets.
    let dr = h.dr("frontend").await.expect("DestinationRule");
    let mut dr_expected = dr0["spec"].clone();
    dr_expected["subsets"] = json!([
        {"name": STABLE_SUBSET, "labels": {ROLE_LABEL: "stable"}},
        {"name": RECORDING_SUBSET, "labels": {ROLE_LABEL: "recording"}},
    ]);
    assert_eq!(dr["spec"], dr_expected, "DestinationRule while adopted");

    // Delete: everything back as it was.
    h.k(&["delete", "rcanary", "frontend", "--timeout=60s"])
        .await;
    h.wait_gone(&h.canary_api(), "RecordingCanary", "frontend", WAIT)
        .await;
    let vs1 = h
        .vs("frontend")
        .await
        .expect("the user's VirtualService must survive");
    let dr1 = h
        .dr("frontend")
        .await
        .expect("the user's DestinationRule must survive");
    assert_eq!(vs1["spec"], vs0["spec"], "VirtualService spec after delete");
    assert_eq!(
        dr1["spec"], dr0["spec"],
        "DestinationRule spec after delete"
    );
    for (what, obj, orig) in [
        ("VirtualService", &vs1, &vs0),
        ("DestinationRule", &dr1, &dr0),
    ] {
        let ann = annotations(obj);
        assert!(
            !ann.contains_key(RESTORE_ANNOTATION),
            "{what} still carries {RESTORE_ANNOTATION}: {ann:?}"
        );
        assert_eq!(ann, annotations(orig), "{what} annotations after delete");
        assert_eq!(
            obj.pointer("/metadata/labels"),
            orig.pointer("/metadata/labels"),
            "{what} labels after delete"
        );
    }
    h.until(
        "clone gone and no pod labelled role=stable",
        WAIT,
        || async {
            let stable = h.pods(Some(&format!("{ROLE_LABEL}=stable"))).await;
            let clone = h.deployment(CLONE).await;
            if stable.is_empty() && clone.is_none() {
                Ok(())
            } else {
                Err(format!(
                    "{} stable pods, clone exists: {}",
                    stable.len(),
                    clone.is_some()
                ))
            }
        },
    )
    .await;

    h.finish(true).await;
}
