//! The Replicas router, for clusters with no mesh: at 10 % beside 9 target pods, one clone pod
//! joins the Service's endpoints; an HPA-like scale of the target from 9 to 3 and back moves the
//! clone with it; deletion leaves the Service's endpoints exactly the target's pods. An
//! EndpointSlice watch records the clone's share at every revision: it never passes 10 % while
//! the target is steady or grows (the clone grows only once the target's new pods are
//! endpoints); when the target shrinks, its pods can leave the endpoints before the clone's,
//! and that window must close within a second (docs/limits.md).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

use crate::support::{CLONE, Harness, WAIT};

/// The clone's and all Ready endpoints of the Service at every EndpointSlice revision, and when
/// the watch delivered it.
type Shares = Arc<Mutex<Vec<(u64, usize, usize, Instant)>>>;

fn watch_shares(h: &Harness) -> (Shares, tokio::task::JoinHandle<()>) {
    let shares: Shares = Arc::new(Mutex::new(Vec::new()));
    let api: Api<EndpointSlice> = Api::namespaced(h.client.clone(), &h.ns);
    let cfg = watcher::Config::default().labels("kubernetes.io/service-name=frontend");
    let out = shares.clone();
    let task = tokio::spawn(async move {
        let mut slices: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        let mut stream = watcher(api, cfg).default_backoff().boxed();
        while let Some(Ok(ev)) = stream.next().await {
            let (s, deleted) = match ev {
                watcher::Event::Apply(s) | watcher::Event::InitApply(s) => (s, false),
                watcher::Event::Delete(s) => (s, true),
                _ => continue,
            };
            let name = s.metadata.name.clone().unwrap_or_default();
            let rv = s
                .metadata
                .resource_version
                .as_deref()
                .and_then(|r| r.parse().ok())
                .unwrap_or(0);
            if deleted {
                slices.remove(&name);
            } else {
                let ready = s
                    .endpoints
                    .iter()
                    .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false));
                let names: Vec<String> = ready
                    .filter_map(|e| e.target_ref.as_ref().and_then(|r| r.name.clone()))
                    .collect();
                let clone = names.iter().filter(|n| n.starts_with(CLONE)).count();
                slices.insert(name, (clone, names.len()));
            }
            let (clone, total) = slices
                .values()
                .fold((0, 0), |(c, t), (c2, t2)| (c + c2, t + t2));
            if let Ok(mut v) = out.lock() {
                v.push((rv, clone, total, Instant::now()));
            }
        }
    });
    (shares, task)
}

fn last_rv(shares: &Shares) -> u64 {
    shares
        .lock()
        .ok()
        .and_then(|v| v.last().map(|r| r.0))
        .unwrap_or(0)
}

async fn scale_target(h: &Harness, replicas: u32) {
    h.k(&[
        "scale",
        "deployment",
        "frontend",
        &format!("--replicas={replicas}"),
    ])
    .await;
    h.until(
        &format!("the target at {replicas} Ready replicas"),
        WAIT,
        || async {
            let ready = h
                .deployment("frontend")
                .await
                .and_then(|d| d.status)
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0);
            if ready == replicas as i32 {
                Ok(())
            } else {
                Err(format!("{ready} Ready"))
            }
        },
    )
    .await;
}

/// The canary's status once it says `reason` with `current` percent.
async fn wait_reason(h: &Harness, reason: &str, current: i64) {
    h.until(
        &format!("rcanary/frontend {reason} at {current}%"),
        WAIT,
        || async {
            let c = h.canary("frontend").await.ok_or("gone")?;
            let st = &c["status"];
            let r = st["conditions"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
                .map(|c| c["reason"].clone());
            if r == Some(json!(reason)) && st["currentPercent"].as_i64() == Some(current) {
                Ok(())
            } else {
                Err(st.to_string())
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_router_puts_one_clone_pod_beside_nine_and_follows_the_target_without_a_mesh() {
    let mut h = Harness::start("replicas").await;
    h.apply_example("app.yaml").await;
    // No HPA here: the test scales the target itself, as an HPA does (the scale subresource).
    h.k(&["delete", "hpa", "frontend", "--ignore-not-found"])
        .await;
    scale_target(&h, 9).await;
    let (shares, watch) = watch_shares(&h);
    // The router is chosen at creation (spec.router is immutable).
    let canary = h.manifest(
        "canary-replicas.yaml",
        "apiVersion: recordingcanary.dev/v1alpha1\nkind: RecordingCanary\nmetadata: {name: frontend}\nspec: {targetRef: {name: frontend}, percent: 10, router: Replicas, capture: EBPF}\n",
    );
    h.k(&["apply", "-f", &canary.to_string_lossy()]).await;
    wait_reason(&h, "ShareReached", 10).await;
    let c = h.canary("frontend").await.expect("canary");
    assert_eq!(c["status"]["router"], "Replicas");
    assert_eq!(c["status"]["cloneReplicas"], 1);
    assert!(
        h.vs(crate::support::OWNED).await.is_none(),
        "no VirtualService"
    );
    assert!(
        h.dr(crate::support::OWNED).await.is_none(),
        "no DestinationRule"
    );

    // 9 → 3: one clone pod would be 25 %: it goes, and the status says why.
    let scaled_down_at = last_rv(&shares);
    scale_target(&h, 3).await;
    wait_reason(&h, "ShareTooCoarse", 0).await;
    // 3 → 9: back to one clone pod at 10 %.
    let back_up_at = last_rv(&shares) + 1;
    scale_target(&h, 9).await;
    wait_reason(&h, "ShareReached", 10).await;
    h.faults_injected_of_kind("hpa-scale", 2);

    // Deletion: the Service's endpoints are exactly the target's pods again.
    h.k(&["delete", "rcanary", "frontend"]).await;
    h.until("the clone gone from the endpoints", WAIT, || async {
        let last = shares.lock().ok().and_then(|v| v.last().copied());
        match last {
            Some((_, 0, 9, _)) if h.deployment(CLONE).await.is_none() => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    watch.abort();
    let shares = shares.lock().map(|v| v.clone()).unwrap_or_default();
    let over = |(_, c, t, _): &(u64, usize, usize, Instant)| *t > 0 && c * 100 > 10 * t;
    // Every revision over 10 % comes during the scale-down, and each such window closes within
    // a second.
    let mut windows: Vec<(u64, Duration)> = Vec::new();
    let mut open: Option<(u64, Instant)> = None;
    for r in &shares {
        match (open, over(r)) {
            (None, true) => open = Some((r.0, r.3)),
            (Some((rv, at)), false) => {
                windows.push((rv, r.3.duration_since(at)));
                open = None;
            }
            _ => {}
        }
    }
    eprintln!(
        "[e2e] {}: {} EndpointSlice revisions; windows over 10 % (from rv, how long): {windows:?}",
        h.ns,
        shares.len()
    );
    assert!(open.is_none(), "the share stayed over 10 %: {shares:?}");
    for (rv, long) in &windows {
        assert!(
            *rv > scaled_down_at && *rv < back_up_at,
            "over 10 % outside the scale-down, from rv {rv}: {shares:?}"
        );
        assert!(
            *long < Duration::from_secs(1),
            "over 10 % for {long:?} from rv {rv}: {shares:?}"
        );
    }
    h.finish(false).await;
}
