//! The Helm chart's RBAC is enough, and no more: the user flow passes with the controller
//! authenticated as the chart's ServiceAccount, which cannot read Secrets, under the chart's
//! fences (tests/e2e/fences.rs tries every abuse they refuse).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::json;

use crate::support::{CLONE, Harness, OWNED, pod_name, pod_of, split_weights};

/// Runs helm; fails the test unless it succeeds.
pub(crate) async fn helm(h: &Harness, args: &[&str]) -> String {
    let bin = std::env::var("RC_HELM")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "helm".into());
    let out = tokio::process::Command::new(&bin)
        .arg("--kubeconfig")
        .arg(&h.env.kubeconfig)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!("cannot run {bin}: {e}; set RC_HELM to a helm binary (bash tests/cluster/build.sh builds one)")
        });
    assert!(
        out.status.success(),
        "`helm {}` failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A kubeconfig for the same cluster that authenticates with `token` only.
pub(crate) fn token_kubeconfig(h: &Harness, token: &str) -> PathBuf {
    let admin = std::fs::read_to_string(&h.env.kubeconfig).expect("read the kubeconfig");
    let admin: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&admin).expect("parse the kubeconfig");
    let cluster = admin["clusters"][0]["cluster"].clone();
    let cfg = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": serde_json::to_value(&cluster).expect("cluster")}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "sa"}}],
        "current-context": "sa",
    });
    let path = h.log.with_file_name(format!("{}-sa.kubeconfig", h.ns));
    std::fs::write(&path, serde_yaml_ng::to_string(&cfg).expect("yaml")).expect("write kubeconfig");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_flow_passes_with_only_the_charts_service_account_rights() {
    let mut h = Harness::start_without_controller("rbac").await;
    let ns = h.ns.clone();
    let release = ns.clone(); // unique, so that cluster-scoped RBAC objects don't collide
    // The release in a namespace of its own: the fences keep the controller out of it.
    let release_ns = format!("{ns}-rel");
    h.k(&["create", "namespace", &release_ns]).await;
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
            // Namespaced, so that the chart's stable-label admission policy binds to this
            // namespace only and leaves the other tests' pods alone.
            "--set",
            &format!("watchNamespaces={{{ns}}}"),
            "--wait=false",
        ],
    )
    .await;
    let installed = async {
        let sa = h
            .k(&[
                "-n",
                &release_ns,
                "get",
                "serviceaccount",
                "-l",
                &format!("app.kubernetes.io/instance={release}"),
                "-o",
                "name",
            ])
            .await;
        let sa = sa.trim().trim_start_matches("serviceaccount/").to_string();
        assert!(!sa.is_empty(), "the chart created no ServiceAccount");
        let who = format!("system:serviceaccount:{release_ns}:{sa}");
        let secrets = h
            .kubectl(&["auth", "can-i", "get", "secrets", "--as", &who])
            .await;
        assert!(
            !secrets.ok && secrets.stdout.trim() == "no",
            "the ServiceAccount can read Secrets: {secrets:?}"
        );

        // The chart installed the stable-label policy (the cluster serves the API) and passes
        // its name to the controller.
        let policy = format!("{release}-recording-canary-stable-label");
        let deployment_args = h
            .k(&[
                "-n",
                &release_ns,
                "get",
                "deployment",
                "-l",
                &format!("app.kubernetes.io/instance={release}"),
                "-o",
                "jsonpath={.items[0].spec.template.spec.containers[0].args}",
            ])
            .await;
        assert!(
            deployment_args.contains(&format!("--stable-label-policy={policy}")),
            "the chart's Deployment does not name the policy {policy}: {deployment_args}"
        );
        h.k(&["get", "mutatingadmissionpolicybinding", &policy])
            .await;

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
            "--stable-label-policy",
            &policy,
        ];
        let controller = h.spawn_controller("sa", &args, &kubeconfig);

        // The user flow, as the ServiceAccount.
        h.app_and_canary("canary.yaml").await;
        h.wait_ready("frontend").await;
        let c = h.canary("frontend").await.expect("the canary");
        assert_eq!(
            c["status"]["stableLabelling"], "AdmissionPolicy",
            "with only the chart's rights the controller must read the policy; status: {}",
            c["status"]
        );
        let vs = h.vs(OWNED).await.expect("the VirtualService");
        assert_eq!(split_weights(&vs), Some((90, 10)));
        h.patch_canary("frontend", &json!({"spec": {"percent": 25}}))
            .await;
        h.wait_status("frontend", "Ready", 25).await;
        h.k(&["scale", "deployment/frontend", "--replicas=9"]).await;
        h.until(
            "the clone to follow the target's replicas",
            Duration::from_secs(60),
            || async {
                let d = h.deployment(CLONE).await.ok_or("no clone")?;
                let r = d.spec.and_then(|s| s.replicas).unwrap_or(0);
                if r == 3 {
                    Ok(())
                } else {
                    Err(format!("clone replicas {r}"))
                }
            },
        )
        .await;
        h.k(&["delete", "rcanary", "frontend", "--timeout=60s"])
            .await;
        assert!(
            h.deployment(CLONE).await.is_none(),
            "the clone is still there"
        );
        assert!(
            h.vs(OWNED).await.is_none(),
            "the owned VirtualService is still there"
        );

        // The adopt flow too, under the fence: only the routes, our subsets and the restore
        // annotation of the user's objects change, and they come back as they were.
        h.apply_example("adopt/user-vs-dr.yaml").await;
        let user_vs = h.vs("frontend").await.expect("the user's VirtualService");
        h.apply_example("adopt/canary.yaml").await;
        h.wait_ready("frontend").await;
        let split = h.vs("frontend").await.expect("the user's VirtualService");
        assert_eq!(split_weights(&split), Some((90, 10)), "{split}");
        h.k(&["delete", "rcanary", "frontend", "--timeout=60s"])
            .await;
        let restored = h.vs("frontend").await.expect("the user's VirtualService");
        assert_eq!(
            restored["spec"], user_vs["spec"],
            "the user's routes are back"
        );

        // The Gateway API router under the fences: its two Services, the split of the user's
        // HTTPRoute with its restore note, a ramp with forced and excluded requests, and the
        // restore, all written as the ServiceAccount.
        h.k(&[
            "delete",
            "virtualservice/frontend",
            "destinationrule/frontend",
        ])
        .await;
        let mesh = crate::gateway::mesh_accepts_routes(&h);
        let route_yaml = crate::support::example("../gateway-api/route.yaml");
        h.k(&["apply", "-f", route_yaml.to_str().expect("utf-8 path")])
            .await;
        let user_route = crate::gateway::route(&h, "frontend")
            .await
            .expect("the user's HTTPRoute");
        let canary_yaml = crate::support::example("../gateway-api/canary.yaml");
        h.k(&["apply", "-f", canary_yaml.to_str().expect("utf-8 path")])
            .await;
        h.patch_canary(
            "frontend",
            &json!({"spec": {"propagationDelay": "1s", "percent": 20,
                              "never": [{"headers": {"x-no-record": {"exact": "1"}}}]}}),
        )
        .await;
        h.wait_ready("frontend").await;
        h.wait_status("frontend", "Ready", 20).await;
        h.patch_canary(
            "frontend",
            &json!({"spec": {"mode": "Mirror", "acknowledgeMirrorSideEffects": true}}),
        )
        .await;
        h.wait_status("frontend", "Ready", 20).await;
        h.k(&["delete", "rcanary", "frontend", "--timeout=60s"])
            .await;
        let restored = crate::gateway::route(&h, "frontend")
            .await
            .expect("the user's HTTPRoute");
        assert_eq!(
            restored["spec"], user_route["spec"],
            "the user's route is back"
        );
        assert_eq!(
            restored["metadata"]["annotations"], user_route["metadata"]["annotations"],
            "no note left"
        );
        let refused = h
            .k(&[
                "get",
                "events",
                "--field-selector",
                "reason=WriteRefused",
                "-o",
                "name",
            ])
            .await;
        assert!(refused.trim().is_empty(), "a write was refused: {refused}");
        mesh.abort();
        // The user's VirtualService and DestinationRule back, for the fence's turn.
        h.apply_example("adopt/user-vs-dr.yaml").await;

        // The fence: what RBAC allows the ServiceAccount but the chart's policies refuse.
        let pod = h
            .pods(Some("app=frontend"))
            .await
            .into_iter()
            .find(|p| pod_of(p, "frontend"))
            .map(|p| pod_name(&p))
            .expect("a target pod");
        let pod_ref = format!("pod/{pod}");
        for (what, args, says) in [
            (
                "change a pod's image",
                vec![
                    "set",
                    "image",
                    pod_ref.as_str(),
                    "server=registry.example/evil:1",
                ],
                "may not change a pod's spec",
            ),
            (
                "set another label on a pod",
                vec!["label", pod_ref.as_str(), "team=evil"],
                "may change no pod label but recordingcanary.dev/role",
            ),
            (
                "scale a Deployment it does not own",
                vec![
                    "patch",
                    "deployment/frontend",
                    "--type=merge",
                    "-p",
                    r#"{"spec":{"replicas":7}}"#,
                ],
                "only its clone Deployments",
            ),
            (
                "delete the user's VirtualService",
                vec!["delete", "virtualservice/frontend"],
                "only the VirtualServices it owns",
            ),
            (
                "change the hosts of the user's VirtualService",
                vec![
                    "patch",
                    "virtualservice/frontend",
                    "--type=merge",
                    "-p",
                    r#"{"spec":{"hosts":["evil"]}}"#,
                ],
                "may change only .spec.http",
            ),
        ] {
            let mut full = vec!["--as", who.as_str()];
            full.extend(args.iter().copied());
            let out = h.kubectl(&full).await;
            assert!(
                !out.ok && out.stderr.contains(says),
                "as the controller's ServiceAccount, `{what}` must be refused by the fence ({says}); got {out:?}"
            );
        }
        // ...while its own change goes through.
        h.k(&[
            "--as",
            &who,
            "label",
            &pod_ref,
            "recordingcanary.dev/role=stable",
            "--overwrite",
        ])
        .await;
        h.k(&["label", &pod_ref, "recordingcanary.dev/role-"]).await;
        drop(controller);
    };
    installed.await;
    helm(&h, &["uninstall", &release, "-n", &release_ns, "--wait"]).await;
    h.k(&["delete", "namespace", &release_ns, "--wait=false"])
        .await;
    h.finish(true).await;
}
