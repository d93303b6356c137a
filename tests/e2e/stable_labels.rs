//! The stable subset stays complete while no controller runs: the chart's MutatingAdmissionPolicy
//! labels the target's new pods at admission (issue "production is never harmed", guarantee 1).
//!
//! The test installs the chart's policy scoped to its own namespace (the chart's
//! `watchNamespaces`), so that it touches no other test; then, with the controller stopped, it
//! rolls the target to a new image, scales it 3 → 6 → 2, and watches every pod event: every Ready
//! target pod must carry the stable label, and `rcanary-stable` must never lose its last Ready pod
//! while the VirtualService sends it weight. The same rollout without the policy's binding must
//! break exactly that (so the check can fail).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::Value;
use tokio::task::JoinHandle;

use crate::chart::helm;
use crate::support::{
    Harness, OWNED, ROLE_LABEL, STABLE_SUBSET, http_destinations, labels, pod_name, pod_of,
    pod_ready,
};

/// Deletes the policy and its binding when the test ends, however it ends.
struct PolicyGuard {
    kubectl: String,
    kubeconfig: std::path::PathBuf,
    name: String,
}

impl Drop for PolicyGuard {
    fn drop(&mut self) {
        for kind in ["mutatingadmissionpolicybinding", "mutatingadmissionpolicy"] {
            let _ = std::process::Command::new(&self.kubectl)
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .args(["delete", kind, &self.name, "--ignore-not-found"])
                .output();
        }
    }
}

/// The MutatingAdmissionPolicy API version the cluster serves (`--api-versions` for helm).
async fn served_policy_api(h: &Harness) -> String {
    for v in ["v1", "v1beta1"] {
        let o = h
            .kubectl(&[
                "get",
                "--raw",
                &format!("/apis/admissionregistration.k8s.io/{v}"),
            ])
            .await;
        if o.ok && o.stdout.contains("\"mutatingadmissionpolicies\"") {
            return format!("admissionregistration.k8s.io/{v}/MutatingAdmissionPolicy");
        }
    }
    panic!(
        "the cluster serves no MutatingAdmissionPolicy API: Kubernetes 1.36+ has it; 1.34-1.35 need the \
         feature gate MutatingAdmissionPolicy=true and --runtime-config admissionregistration.k8s.io/v1beta1=true \
         (bash tests/cluster/up.sh sets both; recreate an older cluster with tests/cluster/down.sh)"
    )
}

/// The chart's stable-label policy, scoped to the test's namespace (`watchNamespaces`), applied;
/// removed when the guard drops.
async fn install_policy(h: &Harness) -> PolicyGuard {
    let ns = h.ns.clone();
    let api = served_policy_api(h).await;
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/recording-canary");
    let policy_yaml = helm(
        h,
        &[
            "template",
            &ns,
            chart,
            "--show-only",
            "templates/stable-label-policy.yaml",
            "--set",
            &format!("watchNamespaces={{{ns}}}"),
            "--set",
            "rbac.create=false",
            "--api-versions",
            &api,
        ],
    )
    .await;
    let name = format!("{ns}-recording-canary-stable-label");
    assert!(
        policy_yaml.contains(&name),
        "unexpected policy name:\n{policy_yaml}"
    );
    let path = h.manifest("policy", &policy_yaml);
    let guard = PolicyGuard {
        kubectl: h.env.kubectl.clone(),
        kubeconfig: h.env.kubeconfig.clone(),
        name,
    };
    h.k(&["apply", "-f", path.to_str().expect("utf-8 path")])
        .await;
    guard
}

/// Whether a pod that the target's ReplicaSet `frontend-<hash>` would create is labelled at
/// admission now (a server-side dry run, which runs admission and stores nothing).
async fn labelled_at_admission(h: &Harness, hash: &str) -> bool {
    let pod = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": format!("probe-{hash}"),
            "labels": {"app": "frontend", "pod-template-hash": hash},
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("frontend-{hash}"),
                "uid": "00000000-0000-0000-0000-000000000000", "controller": true,
            }],
        },
        "spec": {"containers": [{"name": "c", "image": "probe"}]},
    });
    let path = h.manifest(&format!("probe-{hash}"), &pod.to_string());
    let out = h
        .k(&[
            "create",
            "--dry-run=server",
            "-o",
            "json",
            "-f",
            path.to_str().expect("utf-8 path"),
        ])
        .await;
    let v: Value = serde_json::from_str(&out).expect("dry-run pod as JSON");
    v.pointer("/metadata/labels/recordingcanary.dev~1role")
        .and_then(Value::as_str)
        == Some("stable")
}

/// What the pod watcher found.
#[derive(Default)]
struct Seen {
    events: usize,
    violations: Vec<String>,
}

/// Watches the namespace's pods; after each event, checks the two rules.
fn watch_pods(h: &Harness) -> (Arc<Mutex<Seen>>, JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let api = h.pods_api();
    let s = seen.clone();
    let task = tokio::spawn(async move {
        let mut pods: BTreeMap<String, Pod> = BTreeMap::new();
        let mut listed = false;
        let mut stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::Init) => pods.clear(),
                Ok(watcher::Event::InitApply(p)) | Ok(watcher::Event::Apply(p)) => {
                    pods.insert(pod_name(&p), p);
                }
                Ok(watcher::Event::Delete(p)) => {
                    pods.remove(&pod_name(&p));
                }
                Ok(watcher::Event::InitDone) => listed = true,
                Err(e) => {
                    eprintln!("[e2e] pod watch error (retrying): {e}");
                    continue;
                }
            }
            if !listed {
                continue;
            }
            let mut s = s.lock().expect("seen");
            s.events += 1;
            let targets: Vec<&Pod> = pods.values().filter(|p| pod_of(p, "frontend")).collect();
            for p in targets.iter().filter(|p| pod_ready(p)) {
                if labels(p).get(ROLE_LABEL).map(String::as_str) != Some("stable") {
                    s.violations.push(format!(
                        "Ready target pod {} has no stable label",
                        pod_name(p)
                    ));
                }
            }
            let stable_ready = pods
                .values()
                .filter(|p| {
                    pod_ready(p) && labels(p).get(ROLE_LABEL).map(String::as_str) == Some("stable")
                })
                .count();
            if stable_ready == 0 {
                s.violations.push(format!(
                    "no Ready pod in {STABLE_SUBSET} (target pods: {})",
                    targets
                        .iter()
                        .map(|p| pod_name(p))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
    });
    (seen, task)
}

/// Changes the target's image, then scales it 3 → 6 → 2, each time until the rollout is done.
async fn roll_and_scale(h: &Harness, image: &str) {
    h.k(&[
        "set",
        "image",
        "deployment/frontend",
        &format!("server={image}"),
    ])
    .await;
    h.k(&["rollout", "status", "deployment/frontend", "--timeout=120s"])
        .await;
    for n in ["6", "2", "3"] {
        h.k(&["scale", "deployment/frontend", &format!("--replicas={n}")])
            .await;
        h.k(&["rollout", "status", "deployment/frontend", "--timeout=120s"])
            .await;
    }
}

/// Waits until the watcher has seen the pods settle: every target pod is of the current
/// ReplicaSet and Ready (the rollout status says so already; the watch may be a little behind).
async fn settled(h: &Harness, seen: &Arc<Mutex<Seen>>) -> (usize, Vec<String>) {
    h.until(
        "the target's pods to settle",
        Duration::from_secs(60),
        || async {
            let pods = h.pods(Some("app=frontend")).await;
            let targets: Vec<&Pod> = pods.iter().filter(|p| pod_of(p, "frontend")).collect();
            if targets.len() == 3 && targets.iter().all(|p| pod_ready(p)) {
                Ok(())
            } else {
                Err(format!("{} target pods", targets.len()))
            }
        },
    )
    .await;
    // One more event seen after the settled state (the watcher is at least this far).
    let before = seen.lock().expect("seen").events;
    h.k(&[
        "annotate",
        "pods",
        "-l",
        "app=frontend",
        "--overwrite",
        "rc-e2e/settled=yes",
    ])
    .await;
    h.until(
        "the pod watch to catch up",
        Duration::from_secs(30),
        || async {
            let n = seen.lock().expect("seen").events;
            if n > before {
                Ok(())
            } else {
                Err(format!("{n} events"))
            }
        },
    )
    .await;
    let s = seen.lock().expect("seen");
    (s.events, s.violations.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_controller_running_the_admission_policy_keeps_the_stable_subset_complete() {
    let mut h = Harness::start_without_controller("stablepol").await;
    let ns = h.ns.clone();
    let guard = install_policy(&h).await;
    let name = guard.name.clone();

    let args = [
        "run",
        "--namespace",
        &ns,
        "--leader-elect=false",
        "--admin-addr",
        "127.0.0.1:0",
        "--stable-label-policy",
        &name,
    ];
    let kubeconfig = h.env.kubeconfig.clone();
    let mut controller = h.spawn_controller("", &args, &kubeconfig);
    h.app_and_canary("canary.yaml").await;
    h.wait_ready("frontend").await;
    let c = h.canary("frontend").await.expect("the canary");
    assert_eq!(
        c["status"]["stableLabelling"], "AdmissionPolicy",
        "status: {}",
        c["status"]
    );
    let vs = h.vs(OWNED).await.expect("the owned VirtualService");
    let stable_weight: i64 = http_destinations(&vs)
        .iter()
        .flatten()
        .filter(|d| d.1.as_deref() == Some(STABLE_SUBSET))
        .map(|d| d.2.unwrap_or(0))
        .sum();
    assert!(
        stable_weight > 0,
        "the VirtualService sends no weight to {STABLE_SUBSET}: {vs}"
    );
    h.until(
        "the policy to be in force",
        Duration::from_secs(30),
        || async {
            if labelled_at_admission(&h, "aaaaaaaaaa").await {
                Ok(())
            } else {
                Err("not labelled".into())
            }
        },
    )
    .await;

    // No controller from here on.
    controller.kill();
    // The faults: no controller, then a rollout and three scalings, twice.
    h.faults_injected(8);
    drop(controller);

    let (seen, task) = watch_pods(&h);
    roll_and_scale(&h, "registry.example/frontend:v2").await;
    let (events, violations) = settled(&h, &seen).await;
    task.abort();
    assert!(
        events >= 10,
        "only {events} pod events seen: the check saw too little"
    );
    assert!(
        violations.is_empty(),
        "with the policy and no controller, {} violations over {events} pod events:\n{}",
        violations.len(),
        violations.join("\n")
    );
    eprintln!("[e2e] {ns}: with the policy: {events} pod events, 0 violations");

    // The same without the binding: the check must catch the failure it guards against.
    h.k(&["delete", "mutatingadmissionpolicybinding", &name])
        .await;
    h.until(
        "the policy to stop applying",
        Duration::from_secs(30),
        || async {
            if labelled_at_admission(&h, "bbbbbbbbbb").await {
                Err("still labelled".into())
            } else {
                Ok(())
            }
        },
    )
    .await;
    let (seen, task) = watch_pods(&h);
    roll_and_scale(&h, "registry.example/frontend:v3").await;
    let (events, violations) = settled(&h, &seen).await;
    task.abort();
    assert!(
        violations.iter().any(|v| v.starts_with("no Ready pod in")),
        "without the policy the stable subset was expected to lose its Ready pods; \
         {events} pod events, violations: {violations:?}"
    );
    eprintln!(
        "[e2e] {ns}: without the policy: {events} pod events, {} violations (expected)",
        violations.len()
    );

    // The controller, back, labels what the policy did not (its second line), then rolls back.
    let kubeconfig = h.env.kubeconfig.clone();
    let _controller = h.spawn_controller("restarted", &args, &kubeconfig);
    h.until(
        "the restarted controller to label the target's pods",
        Duration::from_secs(60),
        || async {
            let pods = h.pods(Some("app=frontend")).await;
            let unlabelled: Vec<String> = pods
                .iter()
                .filter(|p| pod_of(p, "frontend") && !labels(p).contains_key(ROLE_LABEL))
                .map(pod_name)
                .collect();
            if unlabelled.is_empty() {
                Ok(())
            } else {
                Err(format!("unlabelled: {unlabelled:?}"))
            }
        },
    )
    .await;
    h.k(&["delete", "rcanary", "frontend", "--timeout=60s"])
        .await;
    h.finish(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admission_policy_leaves_the_target_of_a_completed_recording_alone() {
    let mut h = Harness::start_without_controller("stablepolc").await;
    let _guard = install_policy(&h).await;
    // A canary for `frontend`, whose status the test writes (no controller runs).
    h.apply_example("canary.yaml").await;
    let set_phase = |phase: &'static str| {
        let h = &h;
        async move {
            h.k(&[
                "patch",
                "rcanary",
                "frontend",
                "--subresource=status",
                "--type=merge",
                "-p",
                &serde_json::json!({"status": {"phase": phase}}).to_string(),
            ])
            .await;
        }
    };
    set_phase("Ready").await;
    h.until(
        "the policy to label the target's new pods",
        Duration::from_secs(30),
        || async {
            if labelled_at_admission(&h, "bbbbbbbbbb").await {
                Ok(())
            } else {
                Err("not labelled".into())
            }
        },
    )
    .await;
    // The recording completed: new pods of the target are left as they come.
    set_phase("Completed").await;
    h.until(
        "the policy to leave the target's new pods alone",
        Duration::from_secs(30),
        || async {
            if labelled_at_admission(&h, "cccccccccc").await {
                Err("still labelled".into())
            } else {
                Ok(())
            }
        },
    )
    .await;
    h.finish(false).await;
}
