//! Benchmark: how long from `kubectl patch rcanary … percent` to the VirtualService weights, from
//! scaling a target to its clone's new replica count, and how the controller's memory responds to
//! unrelated Deployments and pods. Prints figures; asserts none.
//!
//! Each sample starts on a settled canary, as a user's patch or an HPA's scale (at most one
//! every 15 s by default) meets it: the previous change's last write (the canary's status) seen,
//! and for a scale the target's new pods Ready. The scale is also timed back to back, each
//! scale sent as soon as the clone asks for the previous one's replicas, while the controller is
//! still labelling the target's new pods and reporting the clone's.
//!
//!   RC_E2E_KUBECONFIG=<kubeconfig> cargo bench --bench patch_to_weights
//!
//! Env: RC_BENCH_CANARIES (default 20), RC_BENCH_ROUNDS (default 10), RC_BENCH_UNRELATED
//! (Deployments, default 500), RC_BENCH_UNRELATED_PODS (default 2000; pods that are never
//! scheduled, so that only the API server and the controller see them).
//! Uses a namespace of its own and deletes it at the end.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Config};
use recording_canary::api::{RECORDING_SUBSET, RecordingCanary};
use recording_canary::istio;
use serde_json::{Value, json};
use tokio::sync::mpsc;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Killer(Child);
impl Drop for Killer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Stops the controller (a plain exit would orphan it) and fails.
fn bail(controller: Killer, msg: &str) -> ! {
    drop(controller);
    eprintln!("{msg}");
    std::process::exit(1);
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn recording_weight(vs: &Value) -> Option<i64> {
    vs.pointer("/spec/http/0/route")?
        .as_array()?
        .iter()
        .find_map(|d| {
            (d.pointer("/destination/subset")?.as_str()? == RECORDING_SUBSET)
                .then(|| d.get("weight")?.as_i64())?
        })
}

/// The latest state a watch reported of each object, by name.
struct Latest<T> {
    rx: mpsc::UnboundedReceiver<(String, T, Instant)>,
    seen: HashMap<String, T>,
}

impl<T: Send + 'static> Latest<T> {
    /// Watches `api`, keeping of each object what `read` takes from it.
    fn watch<K>(api: Api<K>, read: fn(&K) -> T) -> Self
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut s = watcher(api, watcher::Config::default())
                .default_backoff()
                .applied_objects()
                .boxed();
            while let Some(ev) = s.next().await {
                let Ok(o) = ev else { continue };
                let _ = tx.send((
                    o.meta().name.clone().unwrap_or_default(),
                    read(&o),
                    Instant::now(),
                ));
            }
        });
        Self {
            rx,
            seen: HashMap::new(),
        }
    }

    /// When `name` was seen with `pred` true: at once if its latest state already is, else when
    /// the watch reports it so (60 s at most).
    async fn wait(&mut self, name: &str, pred: impl Fn(&T) -> bool) -> Option<Instant> {
        if self.seen.get(name).is_some_and(&pred) {
            return Some(Instant::now());
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let Ok(Some((n, v, at))) =
                tokio::time::timeout_at(deadline.into(), self.rx.recv()).await
            else {
                return None;
            };
            let hit = n == name && pred(&v);
            self.seen.insert(n, v);
            if hit {
                return Some(at);
            }
        }
    }
}

/// A Deployment as the scale samples read it: spec replicas and Ready replicas.
#[derive(Clone, Copy)]
struct Scale {
    replicas: i32,
    ready: i32,
}

fn deployment(name: &str, replicas: i32) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": "app", "image": "example/app:1"}]}}}
    }))
    .expect("deployment")
}

#[tokio::main]
async fn main() {
    let Some(kc) = std::env::var_os("RC_E2E_KUBECONFIG") else {
        eprintln!(
            "RC_E2E_KUBECONFIG is not set: start a cluster with `bash tests/cluster/up.sh` and export it"
        );
        std::process::exit(2);
    };
    let canaries = env_usize("RC_BENCH_CANARIES", 20);
    let rounds = env_usize("RC_BENCH_ROUNDS", 10);
    let unrelated = env_usize("RC_BENCH_UNRELATED", 500);
    let unrelated_pods = env_usize("RC_BENCH_UNRELATED_PODS", 2000);
    let kubeconfig = Kubeconfig::read_from(&kc).expect("read kubeconfig");
    let cfg = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig");
    let client = Client::try_from(cfg).expect("client");
    let ns = format!("rc-bench-{}", std::process::id());
    let pp = PostParams::default();
    Api::<Namespace>::all(client.clone())
        .create(
            &pp,
            &serde_json::from_value(
                json!({"metadata": {"name": ns, "labels": {"istio-injection": "enabled"}}}),
            )
            .expect("ns"),
        )
        .await
        .expect("create namespace");
    let controller = Command::new(env!("CARGO_BIN_EXE_recording-canary"))
        .args([
            "run",
            "--namespace",
            &ns,
            "--leader-elect=false",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .env("KUBECONFIG", &kc)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("start the controller");
    let controller = Killer(controller);
    let pid = controller.0.id();

    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let rcs: Api<RecordingCanary> = Api::namespaced(client.clone(), &ns);
    let vss: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &istio::virtual_service_resource());

    // Every VS revision, as (name, recording weight, when seen).
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, i64, Instant)>();
    let watch_api = vss.clone();
    tokio::spawn(async move {
        let mut s = watcher(watch_api, watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(ev) = s.next().await {
            // A watch error is retried by the backoff; the stream goes on.
            let Ok(vs) = ev else { continue };
            let v = serde_json::to_value(&vs).unwrap_or_default();
            if let (Some(name), Some(w)) = (vs.metadata.name.clone(), recording_weight(&v)) {
                let _ = tx.send((name, w, Instant::now()));
            }
        }
    });

    // Every canary status, as (name, status, when seen).
    let mut status = Latest::watch(rcs.clone(), |c: &RecordingCanary| {
        serde_json::to_value(&c.status).unwrap_or_default()
    });

    let setup = Instant::now();
    for i in 0..canaries {
        let name = format!("app-{i}");
        deploys
            .create(&pp, &deployment(&name, 2))
            .await
            .expect("deployment");
        let svc: Service = serde_json::from_value(json!({"metadata": {"name": name},
            "spec": {"selector": {"app": name}, "ports": [{"port": 80}]}}))
        .expect("service");
        services.create(&pp, &svc).await.expect("service");
        let rc: RecordingCanary =
            serde_json::from_value(json!({"apiVersion": "recordingcanary.dev/v1alpha1",
            "kind": "RecordingCanary", "metadata": {"name": name},
            "spec": {"targetRef": {"name": name}, "percent": 10, "propagationDelay": "1s",
                     // One clone replica whatever the weight: the figure is the controller's
                     // latency, not the time a clone takes to scale up (the capacity gate).
                     "maxReplicas": 1}}))
            .expect("canary");
        rcs.create(&pp, &rc).await.expect("canary");
    }
    let mut latest: HashMap<String, i64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while latest.values().filter(|w| **w == 10).count() < canaries {
        let Ok(Some((name, w, _))) = tokio::time::timeout_at(deadline.into(), rx.recv()).await
        else {
            bail(controller, "not all canaries reached 10% within 300 s");
        };
        latest.insert(name, w);
    }
    println!("setup: {canaries} canaries at 10% in {:?}", setup.elapsed());
    let rss_before = rss_kib(pid);

    // Patch → weights.
    let mut lat = Vec::new();
    let ppatch = PatchParams::default();
    for round in 0..rounds {
        for i in 0..canaries {
            let name = format!("app-{i}");
            let target = 11 + ((round * 7 + i) % 80) as i64;
            let t0 = Instant::now();
            rcs.patch(
                &name,
                &ppatch,
                &Patch::Merge(json!({"spec": {"percent": target}})),
            )
            .await
            .expect("patch");
            loop {
                let Ok(Some((n, w, at))) =
                    tokio::time::timeout(Duration::from_secs(30), rx.recv()).await
                else {
                    bail(
                        controller,
                        &format!(
                            "{name} did not reach {target}% within 30 s (namespace {ns} is kept)"
                        ),
                    );
                };
                // The VirtualService the controller creates is `<canary>-recording`.
                if n == format!("{name}-recording") && w == target {
                    lat.push(at.duration_since(t0));
                    break;
                }
            }
            // Settled: the status, the reconcile's last write, shows the new weight.
            if status
                .wait(&name, |s| s["currentPercent"].as_i64() == Some(target))
                .await
                .is_none()
            {
                bail(
                    controller,
                    &format!("{name}'s status did not show {target}% within 60 s"),
                );
            }
        }
    }
    lat.sort();
    println!(
        "patch-to-weights over {} patches: p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
        lat.len(),
        percentile(&lat, 0.50),
        percentile(&lat, 0.90),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or_default()
    );

    // Target scale → clone replicas: a canary at 50% sizes its clone to half the target.
    let mut deploy_events = Latest::watch(deploys.clone(), |d: &Deployment| Scale {
        replicas: d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0),
        ready: d
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0),
    });
    deploys
        .create(&pp, &deployment("scaled", 2))
        .await
        .expect("deployment");
    services
        .create(
            &pp,
            &serde_json::from_value(json!({"metadata": {"name": "scaled"},
                "spec": {"selector": {"app": "scaled"}, "ports": [{"port": 80}]}}))
            .expect("service"),
        )
        .await
        .expect("service");
    rcs.create(
        &pp,
        &serde_json::from_value(json!({"apiVersion": "recordingcanary.dev/v1alpha1",
            "kind": "RecordingCanary", "metadata": {"name": "scaled"},
            "spec": {"targetRef": {"name": "scaled"}, "percent": 50, "propagationDelay": "1s"}}))
        .expect("canary"),
    )
    .await
    .expect("canary");
    let scales = (rounds * 3).max(30);
    let mut figures = Vec::new();
    for settled in [true, false] {
        let mut scale_lat = Vec::new();
        for round in 0..scales {
            let target_replicas = if round % 2 == 0 { 4 } else { 2 };
            let want_clone = target_replicas / 2;
            let previous = 6 - target_replicas;
            if settled || round == 0 {
                // The previous scale done with: the target's pods Ready, the clone's replicas
                // Ready and reported in the canary's status.
                let done = deploy_events
                    .wait("scaled", |d| d.replicas == previous && d.ready == previous)
                    .await
                    .is_some()
                    && deploy_events
                        .wait("scaled-recording", |d| d.ready == previous / 2)
                        .await
                        .is_some()
                    && status
                        .wait("scaled", |s| {
                            s["targetReplicas"].as_i64() == Some(i64::from(previous))
                                && s["cloneReadyReplicas"].as_i64() == Some(i64::from(previous / 2))
                        })
                        .await
                        .is_some();
                if !done {
                    bail(
                        controller,
                        &format!("`scaled` did not settle at {previous} replicas within 60 s"),
                    );
                }
            }
            let t0 = Instant::now();
            deploys
                .patch(
                    "scaled",
                    &ppatch,
                    &Patch::Merge(json!({"spec": {"replicas": target_replicas}})),
                )
                .await
                .expect("scale");
            let Some(at) = deploy_events
                .wait("scaled-recording", |d| d.replicas == want_clone)
                .await
            else {
                bail(
                    controller,
                    &format!("the clone did not reach {want_clone} replicas within 60 s"),
                );
            };
            scale_lat.push(at.duration_since(t0));
        }
        scale_lat.sort();
        figures.push(format!(
            "target-scale-to-clone-replicas over {} scales{}: p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
            scale_lat.len(),
            if settled {
                ", each on a settled canary"
            } else {
                ", back to back"
            },
            percentile(&scale_lat, 0.50),
            percentile(&scale_lat, 0.90),
            percentile(&scale_lat, 0.99),
            scale_lat.last().copied().unwrap_or_default()
        ));
    }
    for f in figures {
        println!("{f}");
    }

    // Memory among unrelated Deployments and pods (pods never scheduled, to measure the
    // controller, not the cluster).
    let t = Instant::now();
    futures::stream::iter(0..unrelated)
        .for_each_concurrent(16, |i| {
            let deploys = deploys.clone();
            let pp = pp.clone();
            async move {
                deploys
                    .create(&pp, &deployment(&format!("unrelated-{i}"), 0))
                    .await
                    .expect("deployment");
            }
        })
        .await;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &ns);
    futures::stream::iter(0..unrelated_pods)
        .for_each_concurrent(16, |i| {
            let pods = pods.clone();
            let pp = pp.clone();
            async move {
                let pod = serde_json::from_value(json!({"metadata": {"name": format!("unrelated-pod-{i}"),
                    "labels": {"app": format!("unrelated-{}", i % 100)}},
                    "spec": {"schedulerName": "nobody", "containers": [{"name": "app", "image": "example/app:1"}]}}))
                .expect("pod");
                pods.create(&pp, &pod).await.expect("pod");
            }
        })
        .await;
    let created_in = t.elapsed();
    // The controller has seen them all once its pod and Deployment watches are idle again.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let rss_after = rss_kib(pid);
    println!(
        "controller RSS: {} KiB with {canaries} canaries; {} KiB after {unrelated} unrelated Deployments and {unrelated_pods} unrelated pods (created in {:?}): +{} KiB",
        rss_before,
        rss_after,
        created_in,
        rss_after.saturating_sub(rss_before)
    );

    // The controller rolls the canaries back while the namespace goes; stop it only after.
    let namespaces = Api::<Namespace>::all(client);
    let _ = namespaces.delete(&ns, &Default::default()).await;
    let gone_by = Instant::now() + Duration::from_secs(180);
    while Instant::now() < gone_by && matches!(namespaces.get_opt(&ns).await, Ok(Some(_))) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(controller);
}
