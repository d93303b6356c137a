//! Time-boxed recordings (`spec.duration`): a 20 s recording ends by itself, also when the
//! controller is killed during it; the user's VirtualService and DestinationRule (or HTTPRoute)
//! come back byte-equal, the clone stays at zero replicas, the canary stays as a `Completed`
//! record; `kubectl get` shows the time left while it runs.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use crate::support::*;

/// Waits until the canary is `Completed` (at most `timeout`); returns it.
async fn wait_completed(h: &Harness, timeout: Duration) -> Value {
    h.until("the recording to complete", timeout, || async {
        let c = h.canary("frontend").await.ok_or("gone")?;
        if c["status"]["phase"] == "Completed" {
            Ok(c)
        } else {
            Err(c["status"].to_string())
        }
    })
    .await
}

fn time(v: &Value) -> Timestamp {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a time: {v}"))
}

/// The user's part of an object: what a restore must give back.
fn users_part(v: &Value) -> Value {
    json!({"spec": v["spec"], "annotations": v["metadata"]["annotations"], "labels": v["metadata"]["labels"]})
}

fn clone_replicas(d: &k8s_openapi::api::apps::v1::Deployment) -> Option<i32> {
    d.spec.as_ref().and_then(|s| s.replicas)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20s_recording_ends_by_itself_with_the_routes_as_before_also_when_the_controller_is_killed()
 {
    let mut h = Harness::start_without_controller("timebox").await;
    let kubeconfig = h.env.kubeconfig.clone();
    let args: Vec<String> = controller_args(&h.ns);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    h.apply_example("app.yaml").await;
    h.apply_example("adopt/user-vs-dr.yaml").await;
    let vs_before = h.vs("frontend").await.expect("the user's VirtualService");
    let dr_before = h.dr("frontend").await.expect("the user's DestinationRule");
    h.apply_example("adopt/canary.yaml").await;
    h.patch_canary(
        "frontend",
        &json!({"spec": {"duration": "20s", "propagationDelay": "1s"}}),
    )
    .await;
    let mut first = h.spawn_controller("first", &args, &kubeconfig);
    h.wait_ready("frontend").await;
    let c = h.wait_status("frontend", "Ready", 10).await;
    assert!(
        c["status"]["recordingStartTime"].is_string(),
        "{}",
        c["status"]
    );
    // kubectl get shows the time left.
    let row = h.k(&["get", "rcanary", "frontend"]).await;
    assert!(
        row.lines()
            .nth(1)
            .is_some_and(|l| l.contains("10s") || l.contains("0s")),
        "no time left in:\n{row}"
    );
    // Killed mid-recording; the next process keeps the same clock (it lives in the status).
    tokio::time::sleep(Duration::from_secs(3)).await;
    first.kill();
    h.faults_injected(1);
    let _second = h.spawn_controller("second", &args, &kubeconfig);

    let c = wait_completed(&h, Duration::from_secs(60)).await;
    let st = &c["status"];
    let start = time(&st["recordingStartTime"]);
    let end = time(&st["recordingEndTime"]);
    let done = time(&st["completionTime"]);
    assert_eq!(end.duration_since(start).as_secs(), 20, "{st}");
    let ran = done.duration_since(start).as_secs_f64();
    assert!(
        (20.0..28.0).contains(&ran),
        "completed {ran:.1} s after the clone first got traffic: {st}"
    );
    assert_eq!(st["recordedPercent"], 10);
    assert_eq!(st["currentPercent"], 0);
    assert!(st["timeLeft"].is_null(), "{st}");
    let ready = st["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap();
    assert_eq!(ready["reason"], "RecordingCompleted");
    // Production as it was: the user's objects byte-equal, no role label, the clone at zero.
    let vs_after = h.vs("frontend").await.expect("the user's VirtualService");
    let dr_after = h.dr("frontend").await.expect("the user's DestinationRule");
    assert_eq!(users_part(&vs_after), users_part(&vs_before));
    assert_eq!(users_part(&dr_after), users_part(&dr_before));
    let clone = h
        .deployment(CLONE)
        .await
        .expect("the clone stays, scaled to zero");
    assert_eq!(clone_replicas(&clone), Some(0));
    assert!(
        h.pods(Some(ROLE_LABEL)).await.is_empty(),
        "no pod carries the role label"
    );
    // The record stays; deleting it removes the clone too.
    h.k(&["delete", "rcanary", "frontend", "--timeout=60s"])
        .await;
    assert!(h.deployment(CLONE).await.is_none(), "the clone is gone");
    h.finish(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20s_recording_through_the_gateway_api_ends_with_the_users_route_as_before() {
    let mut h = Harness::start("timeboxgw").await;
    let mesh = crate::gateway::mesh_accepts_routes(&h);
    h.apply_example("app.yaml").await;
    let route_yaml = example("../gateway-api/route.yaml");
    h.k(&["apply", "-f", route_yaml.to_str().unwrap()]).await;
    let before = h
        .until("the user's route accepted", WAIT, || async {
            let r = crate::gateway::route(&h, "frontend")
                .await
                .ok_or("no route")?;
            if r["status"]["parents"].is_array() {
                Ok(r)
            } else {
                Err(r.to_string())
            }
        })
        .await;
    let canary_yaml = example("../gateway-api/canary.yaml");
    h.k(&["apply", "-f", canary_yaml.to_str().unwrap()]).await;
    h.patch_canary(
        "frontend",
        &json!({"spec": {"duration": "20s", "propagationDelay": "1s"}}),
    )
    .await;
    h.wait_status("frontend", "Ready", 10).await;
    let c = wait_completed(&h, Duration::from_secs(60)).await;
    assert_eq!(c["status"]["router"], "GatewayAPI");
    let after = crate::gateway::route(&h, "frontend")
        .await
        .expect("the route");
    assert_eq!(users_part(&after), users_part(&before));
    let clone = h.deployment(CLONE).await.expect("the clone stays");
    assert_eq!(clone_replicas(&clone), Some(0));
    for svc in ["frontend-stable", "frontend-recording"] {
        let api: kube::Api<k8s_openapi::api::core::v1::Service> =
            kube::Api::namespaced(h.client.clone(), &h.ns);
        assert!(
            api.get_opt(svc).await.unwrap().is_none(),
            "Service {svc} is gone"
        );
    }
    mesh.abort();
    h.finish(false).await;
}
