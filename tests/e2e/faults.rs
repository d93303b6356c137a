//! The controller SIGKILLed mid-way: a new process picks up where the old one stopped, and the
//! make-before-break watcher checks that no step was skipped (a seed of the fault matrix).

use std::time::Duration;

use serde_json::json;

use crate::support::{CLONE, Harness, OWNED, WAIT, controller_args, split_weights};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_mid_setup_and_mid_rollback_is_resumed_by_the_next_one() {
    let mut h = Harness::start_without_controller("faults").await;
    let ns = h.ns.clone();
    let kubeconfig = h.env.kubeconfig.clone();
    let a: Vec<String> = controller_args(&ns);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();

    // Setup, killed as soon as the DestinationRule has its subsets (before the VS may use them).
    h.apply_example("app.yaml").await;
    h.apply_example("canary.yaml").await;
    h.patch_canary("frontend", &json!({"spec": {"propagationDelay": "2s"}}))
        .await;
    let mut first = h.spawn_controller("1", &a, &kubeconfig);
    h.until("the subsets in the DestinationRule", WAIT, || async {
        match h.dr(OWNED).await {
            Some(d)
                if d["spec"]["subsets"]
                    .as_array()
                    .is_some_and(|s| s.len() == 2) =>
            {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    first.kill();
    h.faults_injected(1);
    let second = h.spawn_controller("2", &a, &kubeconfig);
    h.wait_ready("frontend").await;
    let vs = h.vs(OWNED).await.expect("the VirtualService");
    assert_eq!(split_weights(&vs), Some((90, 10)));

    // Rollback, killed as soon as the routes are back (before the subsets may go).
    h.k(&["delete", "rcanary", "frontend", "--wait=false"])
        .await;
    let mut second = second;
    h.until("traffic back to stable", WAIT, || async {
        match h.vs(OWNED).await {
            None => Ok(()),
            Some(v) => Err(format!("{:?}", split_weights(&v))),
        }
    })
    .await;
    second.kill();
    h.faults_injected(1);
    let third = h.spawn_controller("3", &a, &kubeconfig);
    h.until(
        "the rollback to finish",
        Duration::from_secs(60),
        || async {
            let gone = h.canary("frontend").await.is_none()
                && h.dr(OWNED).await.is_none()
                && h.deployment(CLONE).await.is_none();
            if gone {
                Ok(())
            } else {
                Err("canary, DR or clone still there".to_string())
            }
        },
    )
    .await;
    drop(third);
    h.finish(true).await;
}
