//! The whole control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler)
//! stopped and started again in the middle of a ramp: the controller rides it out and finishes
//! the ramp, and make-before-break holds across the outage.
//!
//! This test stops its cluster, so it runs only against a cluster of its own: tests/run.sh starts
//! one and sets RC_RESTART_CLUSTER (its kwokctl name), RC_KWOKCTL and RC_E2E_KUBECONFIG (its
//! kubeconfig). It shares the e2e harness.

#[path = "e2e/mbb.rs"]
#[allow(dead_code)]
mod mbb;
#[path = "e2e/support.rs"]
#[allow(dead_code)]
mod support;

use std::time::Duration;

use serde_json::json;

use support::{Harness, OWNED, split_weights};

/// How long the control plane stays down: several renewals and watch timeouts of the controller.
const OUTAGE: Duration = Duration::from_secs(8);

fn kwokctl(cluster: &str, args: &[&str]) {
    let bin = std::env::var("RC_KWOKCTL").unwrap_or_else(|_| "kwokctl".into());
    let out = std::process::Command::new(&bin)
        .args(["--name", cluster])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {bin} (RC_KWOKCTL): {e}"));
    assert!(
        out.status.success(),
        "`kwokctl --name {cluster} {}` failed:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_restarted_mid_ramp_is_ridden_out() {
    let cluster = std::env::var("RC_RESTART_CLUSTER").unwrap_or_else(|_| {
        panic!(
            "RC_RESTART_CLUSTER is not set: this test stops and starts its cluster, so it needs one of \
             its own. Run `bash tests/run.sh`, or `bash tests/cluster/up.sh rc-restart` and set \
             RC_RESTART_CLUSTER=rc-restart, RC_KWOKCTL=<kwokctl> and RC_E2E_KUBECONFIG=<its kubeconfig>"
        )
    });
    let kubeconfig = std::env::var("RC_E2E_KUBECONFIG").unwrap_or_default();
    assert!(
        kubeconfig.contains(&format!("/{cluster}/")),
        "RC_E2E_KUBECONFIG ({kubeconfig}) is not the kubeconfig of cluster {cluster}: this test would \
         stop another cluster"
    );
    let mut h = Harness::start("restart").await;
    h.apply_example("app.yaml").await;
    h.apply_example("canary-ramp.yaml").await;
    h.patch_canary(
        "frontend",
        &json!({"spec": {"propagationDelay": "1s", "ramp": {"stepPercent": 10, "interval": "4s"}}}),
    )
    .await;
    h.wait_ramp_under_way("frontend", 50).await;

    kwokctl(&cluster, &["stop", "cluster"]);
    h.faults_injected(1);
    // The outage itself: nothing to wait for, the control plane is down.
    tokio::time::sleep(OUTAGE).await;
    kwokctl(&cluster, &["start", "cluster"]);
    h.until(
        "the API server to serve again",
        Duration::from_secs(60),
        || async {
            let o = h.kubectl(&["get", "--raw", "/readyz"]).await;
            if o.ok { Ok(()) } else { Err(o.stderr) }
        },
    )
    .await;

    // The same controller process finishes the ramp.
    h.until(
        "the ramp to finish at 50%",
        // A bound, not a target: after a restart the controller-manager first waits for its
        // old lease to expire, and the clone's new replicas come only after that.
        Duration::from_secs(300),
        || async {
            let c = h.canary("frontend").await.ok_or("rcanary is gone")?;
            let st = &c["status"];
            if st["phase"] == "Ready" && st["currentPercent"] == 50 {
                Ok(())
            } else {
                Err(st.to_string())
            }
        },
    )
    .await;
    let vs = h.vs(OWNED).await.expect("the VirtualService");
    assert_eq!(split_weights(&vs), Some((50, 50)), "{vs:#}");
    h.k(&["delete", "rcanary", "frontend", "--timeout=60s"])
        .await;
    h.finish(true).await;
}
