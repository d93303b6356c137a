//! The recording modes, each from its example under examples/istio/: eBPF capture, Mirror, and
//! forced (`always`) and excluded (`never`) requests, with live switches and exact rollback.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::support::*;

const INJECT: &str = "sidecar.speedscale.com/inject";
const EBPF: &str = "capture.speedscale.com/enabled";

/// The clone's annotations once `probe` accepts them.
async fn wait_clone_annotations(
    h: &Harness,
    what: &str,
    probe: impl Fn(&BTreeMap<String, String>) -> bool,
) -> BTreeMap<String, String> {
    h.until(what, WAIT, || async {
        let d = h.deployment(CLONE).await.ok_or("no clone")?;
        let ann = d.metadata.annotations.clone().unwrap_or_default();
        if probe(&ann) {
            Ok(ann)
        } else {
            Err(format!("{ann:?}"))
        }
    })
    .await
}

/// The names of the VirtualService's HTTP routes, `-` for an unnamed one.
fn route_names(vs: &Value) -> Vec<String> {
    vs["spec"]["http"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r["name"].as_str().unwrap_or("-").to_string())
        .collect()
}

/// Waits until VirtualService `name` satisfies `probe`.
async fn wait_vs(h: &Harness, name: &str, what: &str, probe: impl Fn(&Value) -> bool) -> Value {
    h.until(what, WAIT, || async {
        let vs = h.vs(name).await.ok_or("no VirtualService")?;
        if probe(&vs) {
            Ok(vs)
        } else {
            Err(vs["spec"]["http"].to_string())
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_capture_annotates_the_clone_for_the_collector_and_a_live_switch_swaps_the_annotation()
{
    let mut h = Harness::start("ebpf").await;
    h.app_and_canary("canary-ebpf.yaml").await;
    h.wait_ready("frontend").await;
    h.wait_status("frontend", "Ready", 10).await;
    let ann = wait_clone_annotations(&h, "the clone annotated for eBPF capture", |a| {
        a.get(EBPF).map(String::as_str) == Some("true")
    })
    .await;
    assert!(
        !ann.contains_key(INJECT),
        "with capture EBPF the clone must not carry {INJECT}: {ann:?}"
    );
    let pods = h.pods(Some("recordingcanary.dev/role=recording")).await;
    assert!(
        pods.iter().any(|p| pod_of(p, CLONE)),
        "the clone's pods carry the documented label to target: {:?}",
        pods.iter().map(pod_name).collect::<Vec<_>>()
    );

    // Back to the sidecar, live: one annotation replaces the other, the weight stays.
    h.patch_canary("frontend", &json!({"spec": {"capture": "Sidecar"}}))
        .await;
    let ann = wait_clone_annotations(&h, "the clone annotated for the sidecar only", |a| {
        a.get(INJECT).map(String::as_str) == Some("true") && !a.contains_key(EBPF)
    })
    .await;
    eprintln!(
        "[e2e] {}: clone annotations after the switch: {ann:?}",
        h.ns
    );
    let vs = h.vs(OWNED).await.expect("the VirtualService");
    assert_eq!(split_weights(&vs), Some((90, 10)), "{}", vs["spec"]);
    h.finish(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_mode_serves_every_response_from_stable_and_switches_to_a_split_live() {
    let mut h = Harness::start("mirror").await;
    h.app_and_canary("canary-mirror.yaml").await;
    h.wait_ready("frontend").await;
    h.wait_status("frontend", "Ready", 20).await;
    let vs = h.vs(OWNED).await.expect("the VirtualService");
    let route = &vs["spec"]["http"][0];
    let dests = http_destinations(&vs);
    assert_eq!(
        dests[0].iter().map(|d| d.1.clone()).collect::<Vec<_>>(),
        vec![Some(STABLE_SUBSET.to_string())],
        "every response from the stable subset: {route}"
    );
    assert_eq!(
        route["mirrors"],
        json!([{"destination": {"host": format!("frontend.{}.svc.cluster.local", h.ns), "subset": RECORDING_SUBSET}, "percentage": {"value": 20}}]),
        "{route}"
    );
    assert!(
        route.get("mirror").is_none(),
        "never both mirror and mirrors"
    );

    // Mirror → Split on the live canary: one VirtualService write, make-before-break kept.
    h.patch_canary("frontend", &json!({"spec": {"mode": "Split"}}))
        .await;
    let vs = wait_vs(&h, OWNED, "the VirtualService split 80/20", |v| {
        split_weights(v) == Some((80, 20))
    })
    .await;
    assert!(
        vs["spec"]["http"][0].get("mirrors").is_none(),
        "the mirror went with the switch: {}",
        vs["spec"]
    );
    h.wait_status("frontend", "Ready", 20).await;

    h.k(&["delete", "rcanary", "frontend"]).await;
    h.wait_gone(&h.vs_api(), "VirtualService", OWNED, WAIT)
        .await;
    h.finish(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_and_excluded_requests_go_ahead_of_each_split_route_and_roll_back_exactly() {
    let mut h = Harness::start("always").await;
    h.apply_example("app.yaml").await;
    h.apply_example("adopt/user-vs-dr.yaml").await;
    let original = h.vs("frontend").await.expect("the user's VirtualService");
    // Discovered as the mesh VirtualService for the host; percent 0, always and never.
    h.apply_example("canary-always-never.yaml").await;
    h.patch_canary("frontend", &json!({"spec": {"propagationDelay": "1s"}}))
        .await;
    h.wait_ready("frontend").await;
    let names = [
        "canary-test-rcanary-never",
        "canary-test-rcanary-always",
        "canary-test",
        "default-rcanary-never",
        "default-rcanary-always",
        "default",
    ];
    let vs = wait_vs(
        &h,
        "frontend",
        "never and always routes ahead of both split routes",
        |v| route_names(v) == names,
    )
    .await;
    let http = vs["spec"]["http"].as_array().cloned().unwrap_or_default();
    // The never routes: the route's own match ANDed with each entry of `never`, to stable.
    assert_eq!(
        http[0]["match"],
        json!([
            {"headers": {"x-canary-test": {"exact": "1"}}, "uri": {"prefix": "/healthz"}},
            {"headers": {"x-canary-test": {"exact": "1"}, "x-contains-pii": {"regex": ".+"}}},
        ]),
        "{}",
        http[0]
    );
    assert_eq!(http[0]["route"][0]["destination"]["subset"], STABLE_SUBSET);
    // The always route: to the recording subset, the route's retries and timeout kept.
    assert_eq!(
        http[1]["match"],
        json!([{"headers": {"x-canary-test": {"exact": "1"}, "x-record": {"exact": "1"}}}]),
    );
    assert_eq!(
        http[1]["route"][0]["destination"]["subset"],
        RECORDING_SUBSET
    );
    assert_eq!(http[1]["timeout"], http[2]["timeout"]);
    assert_eq!(http[1]["retries"], http[2]["retries"]);
    // percent 0: the default route's share to the host stays on stable, frontend-legacy keeps 20.
    let default: Vec<(Option<String>, Option<i64>)> = http_destinations(&vs)[5]
        .iter()
        .map(|d| (d.1.clone(), d.2))
        .collect();
    assert_eq!(
        default,
        vec![
            (Some(STABLE_SUBSET.to_string()), Some(80)),
            (Some(RECORDING_SUBSET.to_string()), Some(0)),
            (None, Some(20)),
        ]
    );
    let clone = h.deployment(CLONE).await.expect("the clone");
    assert_eq!(
        clone.spec.as_ref().and_then(|s| s.replicas),
        Some(1),
        "percent 0 with always: one replica records the forced requests"
    );

    // Ramp to 10: the weights move, the inserted routes stay as they are.
    h.patch_canary("frontend", &json!({"spec": {"percent": 10}}))
        .await;
    let vs2 = wait_vs(&h, "frontend", "the default route at 72/8/20", |v| {
        http_destinations(v).get(5).is_some_and(|d| {
            d.iter().map(|x| x.2).collect::<Vec<_>>() == [Some(72), Some(8), Some(20)]
        })
    })
    .await;
    let first_two = |v: &Value| v["spec"]["http"].as_array().map(|a| a[..2].to_vec());
    assert_eq!(first_two(&vs2), first_two(&vs));

    // Rollback: the user's VirtualService exactly as it was.
    h.k(&["delete", "rcanary", "frontend"]).await;
    let restored = h.vs("frontend").await.expect("the user's VirtualService");
    assert_eq!(restored["spec"], original["spec"]);
    assert_eq!(
        restored["metadata"]["annotations"], original["metadata"]["annotations"],
        "the restore note is gone"
    );
    h.finish(true).await;
}

/// The clone's side of `key` in the VirtualService: the `rcanary-always` route's `x-session`
/// regex matches it (RE2 syntax, the `regex` crate, as Envoy's RE2 would).
fn on_clone_side(vs: &Value, keys: &[String]) -> Vec<bool> {
    let always = vs["spec"]["http"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "rcanary-always")
        .expect("the rcanary-always route");
    let re = always["match"][0]["headers"]["x-session"]["regex"]
        .as_str()
        .expect("a regex on x-session");
    let re = regex::Regex::new(re).expect("an RE2 regex");
    keys.iter().map(|k| re.is_match(k)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_key_canary_routes_by_the_key_and_keeps_every_keys_side_through_a_ramp() {
    let mut h = Harness::start("session").await;
    h.app_and_canary("canary.yaml").await;
    h.patch_canary(
        "frontend",
        &json!({"spec": {"sessionKey": {"header": "x-session"}}}),
    )
    .await;
    h.wait_status("frontend", "Ready", 10).await;
    // 4,096 keys ending in every pair of hex digits, 16 times: the share is exact.
    let keys: Vec<String> = (0..4096)
        .map(|i| format!("5f0c2a91-{:04x}-{:02x}", i / 256, i % 256))
        .collect();
    let vs = wait_vs(&h, OWNED, "routes by x-session", |v| {
        route_names(v).contains(&"rcanary-always".to_string())
    })
    .await;
    let at10 = on_clone_side(&vs, &keys);
    let n10 = at10.iter().filter(|b| **b).count();
    assert_eq!(n10, 26 * 16, "26 of 256 buckets at 10 %");
    h.patch_canary("frontend", &json!({"spec": {"percent": 30}}))
        .await;
    h.wait_status("frontend", "Ready", 30).await;
    let vs = h.vs(OWNED).await.expect("the VirtualService");
    let at30 = on_clone_side(&vs, &keys);
    assert_eq!(
        at30.iter().filter(|b| **b).count(),
        77 * 16,
        "77 of 256 at 30 %"
    );
    for (k, (a, b)) in keys.iter().zip(at10.iter().zip(&at30)) {
        assert!(!a || *b, "{k} was recorded at 10 % but not at 30 %");
    }
    let c = h.canary("frontend").await.expect("the canary");
    let ready = c["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap()
        .clone();
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .contains("77 of 256 buckets"),
        "{ready}"
    );
    h.finish(true).await;
}
