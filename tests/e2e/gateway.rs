//! The Gateway API router against a real apiserver with the Gateway API CRDs (v1.6.3, standard
//! channel): the user's HTTPRoute (a GAMMA route, the Service as parent) split between the
//! canary's two Services and restored exactly; the canary's own route when the Service has
//! none; an ambient namespace without a waypoint blocked until it has one. The test plays the
//! mesh: it accepts every route's current generation in its status, as Istio and other GAMMA
//! meshes do. A watcher records every revision of the namespace's HTTPRoutes, the two Services
//! and their EndpointSlices and replays them in etcd order: no route sends to a Service that does
//! not exist, weight goes to the recording Service only while it has a Ready endpoint, and the
//! stable Service has every Ready endpoint of the target before a route sends to it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

use crate::support::controller_args;
use crate::support::*;

const STABLE_SVC: &str = "frontend-stable";
const RECORDING_SVC: &str = "frontend-recording";

fn routes_api(h: &Harness) -> Api<DynamicObject> {
    Api::namespaced_with(
        h.client.clone(),
        &h.ns,
        &recording_canary::gateway::http_route_resource(),
    )
}

/// Plays the mesh: every HTTPRoute of the namespace gets, per parentRef, `Accepted` and
/// `ResolvedRefs` True for its current generation.
pub(crate) fn mesh_accepts_routes(h: &Harness) -> tokio::task::JoinHandle<()> {
    let api = routes_api(h);
    tokio::spawn(async move {
        let mut stream = watcher(api.clone(), watcher::Config::default())
            .applied_objects()
            .default_backoff()
            .boxed();
        while let Some(Ok(r)) = stream.next().await {
            let generation = r.metadata.generation.unwrap_or(1);
            let v = serde_json::to_value(&r).unwrap_or_default();
            let parents = v["spec"]["parentRefs"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let cond = |t: &str| {
                json!({"type": t, "status": "True", "reason": t,
                "message": "accepted by the e2e mesh", "observedGeneration": generation,
                "lastTransitionTime": "2026-01-01T00:00:00Z"})
            };
            let want: Vec<Value> = parents
                .iter()
                .map(|p| {
                    json!({"parentRef": p, "controllerName": "e2e.recordingcanary.dev/mesh",
                                "conditions": [cond("Accepted"), cond("ResolvedRefs")]})
                })
                .collect();
            let current = v["status"]["parents"].as_array().is_some_and(|ps| {
                ps.len() == want.len()
                    && ps.iter().all(|p| {
                        p["conditions"][0]["observedGeneration"].as_i64() == Some(generation)
                    })
            });
            if current {
                continue;
            }
            let _ = api
                .patch_status(
                    &r.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": {"parents": want}})),
                )
                .await;
        }
    })
}

/// One revision seen by the watcher.
#[derive(Debug, Clone)]
enum Seen {
    /// An HTTPRoute: the weights it gives each backend Service (summed over its rules).
    Route {
        name: String,
        weights: BTreeMap<String, i64>,
        deleted: bool,
    },
    /// One of the two Services.
    Service { name: String, deleted: bool },
    /// An EndpointSlice of a Service: its Ready endpoints (pod names).
    Slice {
        service: String,
        name: String,
        ready: BTreeSet<String>,
    },
}

/// Every revision with its resourceVersion and when the watch delivered it.
type Revisions = Arc<Mutex<Vec<(u64, Seen, std::time::Instant)>>>;

fn rv_of(meta: &kube::api::ObjectMeta) -> u64 {
    meta.resource_version
        .as_deref()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn route_weights(v: &Value) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for rule in v["spec"]["rules"].as_array().into_iter().flatten() {
        for b in rule["backendRefs"].as_array().into_iter().flatten() {
            *out.entry(b["name"].as_str().unwrap_or_default().to_string())
                .or_default() += b["weight"].as_i64().unwrap_or(1);
        }
    }
    out
}

/// Records every revision `api` delivers, as `seen` makes it of the object (and whether it was
/// deleted), with its resourceVersion and when it came.
fn record<K>(
    api: Api<K>,
    out: Revisions,
    seen: impl Fn(&K, bool) -> Seen + Send + 'static,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    tokio::spawn(async move {
        let mut s = watcher(api, watcher::Config::default()).boxed();
        while let Some(Ok(ev)) = s.next().await {
            let (o, deleted) = match ev {
                watcher::Event::Apply(o) | watcher::Event::InitApply(o) => (o, false),
                watcher::Event::Delete(o) => (o, true),
                _ => continue,
            };
            let rv = rv_of(o.meta());
            out.lock()
                .unwrap()
                .push((rv, seen(&o, deleted), std::time::Instant::now()));
        }
    })
}

/// Records every revision of the namespace's HTTPRoutes, Services and EndpointSlices.
fn watch_revisions(h: &Harness) -> (Revisions, Vec<tokio::task::JoinHandle<()>>) {
    let out: Revisions = Arc::new(Mutex::new(Vec::new()));
    let routes = record(routes_api(h), out.clone(), |r: &DynamicObject, deleted| {
        Seen::Route {
            name: r.name_any(),
            weights: route_weights(&serde_json::to_value(r).unwrap_or_default()),
            deleted,
        }
    });
    let services = record(
        Api::<Service>::namespaced(h.client.clone(), &h.ns),
        out.clone(),
        |s: &Service, deleted| Seen::Service {
            name: s.name_any(),
            deleted,
        },
    );
    let slices = record(
        Api::<EndpointSlice>::namespaced(h.client.clone(), &h.ns),
        out.clone(),
        |sl: &EndpointSlice, deleted| Seen::Slice {
            service: sl
                .labels()
                .get("kubernetes.io/service-name")
                .cloned()
                .unwrap_or_default(),
            name: sl.name_any(),
            ready: if deleted {
                BTreeSet::new()
            } else {
                sl.endpoints
                    .iter()
                    .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
                    .filter_map(|e| e.target_ref.as_ref().and_then(|r| r.name.clone()))
                    .collect()
            },
        },
    );
    (out, vec![routes, services, slices])
}

/// How much earlier than the write a watch may deliver a revision it follows (the slack of the
/// wait check: both are seen through watches).
const WATCH_SLACK: Duration = Duration::from_millis(150);

/// Replays the revisions in etcd order; returns the violations and how many route revisions
/// were checked. With `delay`, the first route revision that sends to the stable Service must
/// come at least `delay` after the stable Service first listed every Ready target pod.
fn check_revisions(revisions: &Revisions) -> (Vec<String>, usize) {
    check_revisions_with(revisions, None)
}

fn check_revisions_with(revisions: &Revisions, delay: Option<Duration>) -> (Vec<String>, usize) {
    let mut all = revisions.lock().unwrap().clone();
    all.sort_by_key(|(rv, _, _)| *rv);
    let mut complete_since: Option<std::time::Instant> = None;
    let mut sent = false;
    let mut services: BTreeSet<String> = BTreeSet::new();
    let mut slices: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    let mut routes: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    let mut violations = Vec::new();
    let mut checked = 0;
    let ready_of = |slices: &BTreeMap<(String, String), BTreeSet<String>>, svc: &str| {
        slices
            .iter()
            .filter(|((s, _), _)| s == svc)
            .flat_map(|(_, r)| r.iter().cloned())
            .collect::<BTreeSet<String>>()
    };
    for (rv, seen, at) in all {
        match seen {
            Seen::Service { name, deleted } => {
                if deleted {
                    services.remove(&name);
                    if routes.values().any(|w| w.contains_key(&name)) {
                        violations.push(format!(
                            "rv {rv}: Service {name} deleted while a route sends to it"
                        ));
                    }
                } else {
                    services.insert(name);
                }
            }
            Seen::Slice {
                service,
                name,
                ready,
            } => {
                slices.insert((service, name), ready);
                let stable = ready_of(&slices, STABLE_SVC);
                let target: BTreeSet<String> = ready_of(&slices, "frontend")
                    .into_iter()
                    .filter(|p| !p.starts_with(CLONE))
                    .collect();
                if complete_since.is_none() && !target.is_empty() && target.is_subset(&stable) {
                    complete_since = Some(at);
                }
            }
            Seen::Route {
                name,
                weights,
                deleted,
            } => {
                if deleted {
                    routes.remove(&name);
                    continue;
                }
                checked += 1;
                for svc in [STABLE_SVC, RECORDING_SVC] {
                    if weights.contains_key(svc) && !services.contains(svc) {
                        violations.push(format!(
                            "rv {rv}: route {name} sends to Service {svc}, which does not exist"
                        ));
                    }
                }
                if weights.get(RECORDING_SVC).copied().unwrap_or(0) > 0
                    && ready_of(&slices, RECORDING_SVC).is_empty()
                {
                    violations.push(format!(
                        "rv {rv}: route {name} gives weight to {RECORDING_SVC} without a Ready endpoint"
                    ));
                }
                if weights.get(STABLE_SVC).copied().unwrap_or(0) > 0 {
                    let stable = ready_of(&slices, STABLE_SVC);
                    let target: BTreeSet<String> = ready_of(&slices, "frontend")
                        .into_iter()
                        .filter(|p| !p.starts_with(CLONE))
                        .collect();
                    if !target.is_subset(&stable) && !sent {
                        violations.push(format!(
                            "rv {rv}: route {name} sends to {STABLE_SVC}, whose endpoints {stable:?} lack some of the target's {target:?}"
                        ));
                    }
                    if let (Some(delay), false) = (delay, sent) {
                        match complete_since {
                            Some(t) if at + WATCH_SLACK >= t + delay => {}
                            Some(t) => violations.push(format!(
                                "rv {rv}: route {name} sends to {STABLE_SVC} {:?} after it listed every target pod, less than propagationDelay ({delay:?})",
                                at.saturating_duration_since(t)
                            )),
                            None => violations.push(format!(
                                "rv {rv}: route {name} sends to {STABLE_SVC} before it listed every target pod"
                            )),
                        }
                    }
                    sent = true;
                }
                routes.insert(name, weights);
            }
        }
    }
    (violations, checked)
}

pub(crate) async fn route(h: &Harness, name: &str) -> Option<Value> {
    get_json(&routes_api(h), name).await
}

/// `kubectl apply -f path` of a user route `frontend`; returns it once the mesh accepted it.
async fn apply_route(h: &Harness, path: &std::path::Path) -> Value {
    h.k(&["apply", "-f", path.to_str().unwrap()]).await;
    h.until("the user's route accepted", WAIT, || async {
        let r = route(h, "frontend").await.ok_or("no route")?;
        if r["status"]["parents"].is_array() {
            Ok(r)
        } else {
            Err(r.to_string())
        }
    })
    .await
}

/// The example canary (examples/gateway-api/canary.yaml), with `patch` merged into its spec.
async fn apply_gateway_canary(h: &Harness, spec: Value) {
    let canary_yaml = example("../gateway-api/canary.yaml");
    h.k(&["apply", "-f", canary_yaml.to_str().unwrap()]).await;
    h.patch_canary("frontend", &json!({ "spec": spec })).await;
}

/// Waits until route `name` gives the recording Service `share` of every 100 to the Service.
async fn wait_route_share(h: &Harness, name: &str, percent: i64) -> Value {
    h.until(
        &format!("HTTPRoute {name} to send {percent}% to {RECORDING_SVC}"),
        WAIT,
        || async {
            let r = route(h, name).await.ok_or("no route")?;
            let w = route_weights(&r);
            let (s, rec) = (
                w.get(STABLE_SVC).copied().unwrap_or(0),
                w.get(RECORDING_SVC).copied().unwrap_or(0),
            );
            if s + rec > 0 && rec * 100 == percent * (s + rec) {
                Ok(r)
            } else {
                Err(r["spec"].to_string())
            }
        },
    )
    .await
}

async fn service_selector(h: &Harness, name: &str) -> Option<BTreeMap<String, String>> {
    let api: Api<Service> = Api::namespaced(h.client.clone(), &h.ns);
    api.get_opt(name)
        .await
        .unwrap()
        .map(|s| s.spec.and_then(|s| s.selector).unwrap_or_default())
}

/// The spec and annotations of a route, as the user wrote them (what a restore must give back).
fn users_part(r: &Value) -> Value {
    json!({"spec": r["spec"], "annotations": r["metadata"]["annotations"]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_api_router_splits_the_users_route_after_its_services_carry_endpoints_and_restores_it_exactly()
 {
    let mut h = Harness::start("gw").await;
    let mesh = mesh_accepts_routes(&h);
    let (revisions, watchers) = watch_revisions(&h);
    h.apply_example("app.yaml").await;
    let original = apply_route(&h, &example("../gateway-api/route.yaml")).await;

    // The example canary, at 20 %, with a short propagationDelay.
    apply_gateway_canary(&h, json!({"percent": 20, "propagationDelay": "1s"})).await;
    h.wait_ready("frontend").await;
    let c = h.wait_status("frontend", "Ready", 20).await;
    assert_eq!(c["status"]["router"], "GatewayAPI");
    assert_eq!(
        c["status"]["backendServices"],
        json!([
            format!("{}/{STABLE_SVC}", h.ns),
            format!("{}/{RECORDING_SVC}", h.ns)
        ])
    );
    assert_eq!(
        c["status"]["httpRoutes"],
        json!([format!("{}/frontend", h.ns)])
    );

    // Both rules split 80/20 between the two Services; everything else of the route as it was.
    let split = wait_route_share(&h, "frontend", 20).await;
    for (i, rule) in split["spec"]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let names: Vec<&str> = rule["backendRefs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, vec![STABLE_SVC, RECORDING_SVC], "rule {i}");
        assert_eq!(rule["name"], original["spec"]["rules"][i]["name"]);
        assert_eq!(rule["matches"], original["spec"]["rules"][i]["matches"]);
        assert_eq!(rule["timeouts"], original["spec"]["rules"][i]["timeouts"]);
    }
    assert_eq!(split["spec"]["parentRefs"], original["spec"]["parentRefs"]);
    // The Services select the Service's pods by role; the clone carries the eBPF capture.
    let sel = service_selector(&h, STABLE_SVC)
        .await
        .expect("stable Service");
    assert_eq!(sel.get(ROLE_LABEL).map(String::as_str), Some("stable"));
    assert_eq!(sel.get("app").map(String::as_str), Some("frontend"));
    let sel = service_selector(&h, RECORDING_SVC)
        .await
        .expect("recording Service");
    assert_eq!(sel.get(ROLE_LABEL).map(String::as_str), Some("recording"));
    let clone = h.deployment(CLONE).await.expect("the clone");
    let ann = clone.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        ann.get("capture.speedscale.com/enabled")
            .map(String::as_str),
        Some("true"),
        "{ann:?}"
    );
    // kubectl get -o wide shows the router.
    let row = h.k(&["get", "rcanary", "frontend", "-o", "wide"]).await;
    assert!(row.contains("GatewayAPI"), "{row}");

    // Ramp up by patch: 20 → 50.
    h.patch_canary("frontend", &json!({"spec": {"percent": 50}}))
        .await;
    h.wait_status("frontend", "Ready", 50).await;
    wait_route_share(&h, "frontend", 50).await;

    // Rollback: the route exactly as the user wrote it, then the Services and the clone go.
    h.k(&["delete", "rcanary", "frontend", "--wait=false"])
        .await;
    h.wait_gone(&h.canary_api(), "rcanary", "frontend", WAIT)
        .await;
    let restored = route(&h, "frontend").await.expect("the user's route stays");
    assert_eq!(users_part(&restored), users_part(&original));
    assert!(
        service_selector(&h, STABLE_SVC).await.is_none(),
        "stable Service gone"
    );
    assert!(
        service_selector(&h, RECORDING_SVC).await.is_none(),
        "recording Service gone"
    );
    h.until("the clone gone", WAIT, || async {
        match h.deployment(CLONE).await {
            None => Ok(()),
            Some(_) => Err("still there".to_string()),
        }
    })
    .await;
    let labelled = h.pods(Some(&format!("{ROLE_LABEL}=stable"))).await.len();
    assert_eq!(labelled, 0, "the role label is off the target's pods");

    mesh.abort();
    // Let the watchers deliver the last revisions (they lag the API by milliseconds).
    tokio::time::sleep(Duration::from_millis(500)).await;
    for t in watchers {
        t.abort();
    }
    let (violations, checked) = check_revisions(&revisions);
    println!("gateway make-before-break: checked {checked} HTTPRoute revisions");
    assert!(checked >= 3, "split, ramp and restore seen: {checked}");
    assert!(violations.is_empty(), "{}", violations.join("\n"));
    h.finish(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_api_router_creates_its_own_route_when_the_service_has_none_and_deletes_it() {
    let mut h = Harness::start("gwown").await;
    let mesh = mesh_accepts_routes(&h);
    let (revisions, watchers) = watch_revisions(&h);
    h.apply_example("app.yaml").await;
    apply_gateway_canary(&h, json!({"propagationDelay": "1s"})).await;
    h.wait_ready("frontend").await;
    h.wait_status("frontend", "Ready", 10).await;
    // Its own route: the Service as parent, one catch-all rule, owned by the canary.
    let own = wait_route_share(&h, OWNED, 10).await;
    assert_eq!(
        own["spec"]["parentRefs"],
        json!([{"group": "", "kind": "Service", "name": "frontend"}])
    );
    assert_eq!(
        own["metadata"]["ownerReferences"][0]["kind"],
        "RecordingCanary"
    );
    assert_eq!(
        own["spec"]["rules"][0]["matches"],
        json!([{"path": {"type": "PathPrefix", "value": "/"}}])
    );

    h.k(&["delete", "rcanary", "frontend", "--wait=false"])
        .await;
    h.wait_gone(&h.canary_api(), "rcanary", "frontend", WAIT)
        .await;
    assert!(route(&h, OWNED).await.is_none(), "its own route is deleted");
    assert!(service_selector(&h, RECORDING_SVC).await.is_none());
    mesh.abort();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for t in watchers {
        t.abort();
    }
    let (violations, checked) = check_revisions(&revisions);
    assert!(checked >= 1, "the own route seen");
    assert!(violations.is_empty(), "{}", violations.join("\n"));
    h.finish(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ambient_namespace_without_a_waypoint_is_blocked_until_it_names_one() {
    let mut h = Harness::start("gwamb").await;
    let namespaces: Api<Namespace> = Api::all(h.client.clone());
    let label = |v: Value| {
        let namespaces = namespaces.clone();
        let ns = h.ns.clone();
        async move {
            namespaces
                .patch(
                    &ns,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": v}})),
                )
                .await
                .unwrap();
        }
    };
    label(json!({"istio.io/dataplane-mode": "ambient"})).await;
    let mesh = mesh_accepts_routes(&h);
    h.apply_example("app.yaml").await;
    // router: Auto (the default): the ambient namespace makes it the Gateway API's.
    let canary = h.manifest(
        "canary",
        "apiVersion: recordingcanary.dev/v1alpha1\nkind: RecordingCanary\nmetadata:\n  name: frontend\nspec:\n  targetRef:\n    name: frontend\n  percent: 10\n  capture: EBPF\n  propagationDelay: 1s\n",
    );
    h.k(&["apply", "-f", canary.to_str().unwrap()]).await;
    let c = h
        .until("Blocked with NoWaypoint", WAIT, || async {
            let c = h.canary("frontend").await.ok_or("gone")?;
            let reason = c["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Ready")
                .map(|c| c["reason"].clone());
            if reason == Some(json!("NoWaypoint")) {
                Ok(c)
            } else {
                Err(c["status"].to_string())
            }
        })
        .await;
    assert_eq!(c["status"]["phase"], "Blocked");
    assert_eq!(c["status"]["router"], "GatewayAPI");
    assert!(
        service_selector(&h, STABLE_SVC).await.is_none(),
        "nothing written"
    );
    // The namespace gets its waypoint: the canary goes on by itself (the namespace watch).
    label(json!({"istio.io/use-waypoint": "waypoint"})).await;
    h.wait_ready("frontend").await;
    h.wait_status("frontend", "Ready", 10).await;
    mesh.abort();
    h.finish(false).await;
}

#[test]
fn the_revision_check_catches_a_route_ahead_of_its_services_and_endpoints() {
    let route = |rv: u64, stable: i64, recording: i64| {
        (
            rv,
            Seen::Route {
                name: "frontend".into(),
                weights: BTreeMap::from([
                    (STABLE_SVC.to_string(), stable),
                    (RECORDING_SVC.to_string(), recording),
                ]),
                deleted: false,
            },
        )
    };
    let service = |rv: u64, name: &str, deleted: bool| {
        (
            rv,
            Seen::Service {
                name: name.into(),
                deleted,
            },
        )
    };
    let slice = |rv: u64, service: &str, pods: &[&str]| {
        (
            rv,
            Seen::Slice {
                service: service.into(),
                name: format!("{service}-x"),
                ready: pods.iter().map(|p| p.to_string()).collect(),
            },
        )
    };
    let now = std::time::Instant::now();
    let check = |seen: Vec<(u64, Seen)>| {
        let timed = seen.into_iter().map(|(rv, s)| (rv, s, now)).collect();
        check_revisions(&Arc::new(Mutex::new(timed)))
    };
    let target = slice(1, "frontend", &["frontend-a", "frontend-b"]);
    // In order: Services, their endpoints, then the route: clean.
    let good = vec![
        target.clone(),
        service(2, STABLE_SVC, false),
        service(3, RECORDING_SVC, false),
        slice(4, STABLE_SVC, &["frontend-a", "frontend-b"]),
        slice(5, RECORDING_SVC, &["frontend-recording-a"]),
        route(6, 4, 1),
    ];
    assert_eq!(check(good.clone()), (Vec::new(), 1));
    // Delivered out of order by the watches, but in etcd order the same: clean.
    let mut shuffled = good.clone();
    shuffled.reverse();
    assert!(check(shuffled).0.is_empty());
    // The route before the recording Service's endpoint.
    let mut early = good.clone();
    early[4].0 = 7;
    assert_eq!(check(early).0.len(), 1);
    // The route before the stable Service lists every target pod.
    let mut partial = good.clone();
    partial[3] = slice(4, STABLE_SVC, &["frontend-a"]);
    assert_eq!(check(partial).0.len(), 1);
    // A Service deleted while the route still sends to it.
    let mut deleted = good;
    deleted.push(service(8, RECORDING_SVC, true));
    assert_eq!(check(deleted).0.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_route_attached_to_the_service_blocks_until_it_goes() {
    let mut h = Harness::start("gwgrpc").await;
    let mesh = mesh_accepts_routes(&h);
    h.apply_example("app.yaml").await;
    let grpc = h.manifest(
        "grpcroute",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata:\n  name: frontend-grpc\nspec:\n  parentRefs:\n    - group: \"\"\n      kind: Service\n      name: frontend\n  rules:\n    - backendRefs:\n        - name: frontend\n          port: 80\n",
    );
    h.k(&["apply", "-f", grpc.to_str().unwrap()]).await;
    apply_gateway_canary(&h, json!({"propagationDelay": "1s"})).await;
    let c = h
        .until("Blocked with OtherRouteKind", WAIT, || async {
            let c = h.canary("frontend").await.ok_or("gone")?;
            let ready = c["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Ready")
                .cloned();
            match ready {
                Some(r) if r["reason"] == "OtherRouteKind" => Ok(r),
                _ => Err(c["status"].to_string()),
            }
        })
        .await;
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("GRPCRoute (frontend-grpc)"),
        "{c}"
    );
    assert!(
        service_selector(&h, STABLE_SVC).await.is_none(),
        "nothing written"
    );
    // The GRPCRoute goes: the canary goes on by itself (the GRPCRoute watch).
    h.k(&["delete", "grpcroute", "frontend-grpc"]).await;
    h.wait_ready("frontend").await;
    h.wait_status("frontend", "Ready", 10).await;
    mesh.abort();
    h.finish(false).await;
}

#[test]
fn the_revision_check_catches_a_split_sooner_than_propagation_delay() {
    let t0 = std::time::Instant::now();
    let seen = |split_after: Duration| {
        let revs = vec![
            (
                1,
                Seen::Slice {
                    service: "frontend".into(),
                    name: "f".into(),
                    ready: BTreeSet::from(["frontend-a".to_string()]),
                },
                t0,
            ),
            (
                2,
                Seen::Service {
                    name: STABLE_SVC.into(),
                    deleted: false,
                },
                t0,
            ),
            (
                3,
                Seen::Service {
                    name: RECORDING_SVC.into(),
                    deleted: false,
                },
                t0,
            ),
            (
                4,
                Seen::Slice {
                    service: STABLE_SVC.into(),
                    name: "s".into(),
                    ready: BTreeSet::from(["frontend-a".to_string()]),
                },
                t0,
            ),
            (
                5,
                Seen::Route {
                    name: "frontend".into(),
                    weights: BTreeMap::from([
                        (STABLE_SVC.to_string(), 1),
                        (RECORDING_SVC.to_string(), 0),
                    ]),
                    deleted: false,
                },
                t0 + split_after,
            ),
        ];
        check_revisions_with(&Arc::new(Mutex::new(revs)), Some(Duration::from_secs(1))).0
    };
    assert!(seen(Duration::from_millis(1000)).is_empty());
    assert_eq!(seen(Duration::from_millis(500)).len(), 1);
}

/// The user's route of three rules with filters: a header rule with a timeout and a request
/// header filter, a path rule whose backendRef has a filter of its own, and a default rule.
const THREE_RULES: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: frontend
  annotations:
    team: shop
spec:
  parentRefs:
    - group: ""
      kind: Service
      name: frontend
      port: 80
  rules:
    - name: canary-test
      matches:
        - headers:
            - name: x-canary-test
              value: "1"
      timeouts:
        request: 10s
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            add:
              - name: x-routed-by
                value: frontend-route
      backendRefs:
        - name: frontend
          port: 80
    - name: api
      matches:
        - path:
            type: PathPrefix
            value: /api
      backendRefs:
        - name: frontend
          port: 80
          weight: 3
          filters:
            - type: ResponseHeaderModifier
              responseHeaderModifier:
                set:
                  - name: x-api
                    value: "1"
    - name: default
      backendRefs:
        - name: frontend
          port: 80
"#;

/// Runs a controller (`tag`) that dies right after its next HTTPRoute write (the failpoint
/// `after-http-route-write`, before the status write that follows it), and waits for it to die.
async fn die_after_a_route_write(h: &Harness, tag: &str, args: &[&str]) {
    let mut p = h.spawn_controller_with(
        tag,
        args,
        &h.env.kubeconfig,
        &[("FAILPOINTS", "after-http-route-write=return")],
    );
    let died = p.exited_within(Duration::from_secs(90)).await;
    assert!(
        died.is_some_and(|s| !s.success()),
        "{tag}: it did not die after an HTTPRoute write: {died:?}"
    );
    h.faults_injected(1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_api_router_keeps_its_guarantees_through_kills_scale_image_and_a_gitops_revert() {
    let mut h = Harness::start_without_controller("gwtrials").await;
    let kubeconfig = h.env.kubeconfig.clone();
    let args: Vec<String> = controller_args(&h.ns);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mesh = mesh_accepts_routes(&h);
    let (revisions, watchers) = watch_revisions(&h);
    h.apply_example("app.yaml").await;
    let route_file = h.manifest("route", THREE_RULES);
    let original = apply_route(&h, &route_file).await;
    apply_gateway_canary(&h, json!({"percent": 20, "propagationDelay": "2s"})).await;

    // A controller that dies right after its first HTTPRoute write (the split, at 0 % while the
    // clone comes up); the next one resumes.
    die_after_a_route_write(&h, "killed", &args).await;
    let _resumed = h.spawn_controller("resumed", &args, &kubeconfig);
    h.wait_ready("frontend").await;
    h.wait_status("frontend", "Ready", 20).await;
    let split = wait_route_share(&h, "frontend", 20).await;
    // Each rule keeps its matches, timeouts and filters; the backendRef's filter is on both halves.
    for (i, rule) in split["spec"]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        for key in ["name", "matches", "timeouts", "filters"] {
            assert_eq!(
                rule[key], original["spec"]["rules"][i][key],
                "rule {i} {key}"
            );
        }
    }
    let api_refs = split["spec"]["rules"][1]["backendRefs"].as_array().unwrap();
    assert_eq!(api_refs.len(), 2);
    for b in api_refs {
        assert_eq!(
            b["filters"],
            original["spec"]["rules"][1]["backendRefs"][0]["filters"]
        );
    }

    // An HPA-like scale of the target: the clone follows.
    h.k(&["scale", "deployment/frontend", "--replicas=10"])
        .await;
    h.until("the clone to follow the target's scale", WAIT, || async {
        let c = h.canary("frontend").await.ok_or("gone")?;
        let d = h.deployment(CLONE).await.ok_or("no clone")?;
        let want = c["status"]["cloneReplicas"].as_i64().unwrap_or(0);
        let have = i64::from(d.spec.and_then(|s| s.replicas).unwrap_or(0));
        if c["status"]["targetReplicas"] == 10 && want >= 2 && have == want {
            Ok(())
        } else {
            Err(format!("status {} clone {have}", c["status"]))
        }
    })
    .await;
    // A new image: the clone follows.
    h.k(&[
        "set",
        "image",
        "deployment/frontend",
        "server=us-central1-docker.pkg.dev/google-samples/microservices-demo/frontend:v0.10.3",
    ])
    .await;
    h.until("the clone to follow the new image", WAIT, || async {
        let d = h.deployment(CLONE).await.ok_or("no clone")?;
        let image = d
            .spec
            .and_then(|s| s.template.spec)
            .map(|s| s.containers[0].image.clone().unwrap_or_default())
            .unwrap_or_default();
        if image.ends_with(":v0.10.3") {
            Ok(())
        } else {
            Err(image)
        }
    })
    .await;
    h.wait_status("frontend", "Ready", 20).await;

    // A GitOps tool puts the route back: the canary says so and splits it again.
    h.k(&["apply", "-f", route_file.to_str().unwrap()]).await;
    h.faults_injected(1);
    wait_event(&h, "SplitReverted").await;
    wait_route_share(&h, "frontend", 20).await;
    h.wait_status("frontend", "Ready", 20).await;

    // Rollback, with a controller killed right after it restored the route.
    drop(_resumed);
    h.k(&["delete", "rcanary", "frontend", "--wait=false"])
        .await;
    die_after_a_route_write(&h, "killed-restore", &args).await;
    let _last = h.spawn_controller("last", &args, &kubeconfig);
    h.wait_gone(&h.canary_api(), "rcanary", "frontend", WAIT)
        .await;
    let restored = route(&h, "frontend").await.expect("the user's route stays");
    assert_eq!(users_part(&restored), users_part(&original));
    assert!(service_selector(&h, STABLE_SVC).await.is_none());
    assert!(service_selector(&h, RECORDING_SVC).await.is_none());

    mesh.abort();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for t in watchers {
        t.abort();
    }
    let (violations, checked) = check_revisions_with(&revisions, Some(Duration::from_secs(2)));
    println!("gateway make-before-break: checked {checked} HTTPRoute revisions");
    // The GitOps revert itself puts back a route to the Service: not a violation of ours.
    assert!(violations.is_empty(), "{}", violations.join("\n"));
    h.finish(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_of_the_canarys_deleted_mid_flight_sends_the_route_back_then_splits_again() {
    let mut h = Harness::start("gwlost").await;
    let mesh = mesh_accepts_routes(&h);
    h.apply_example("app.yaml").await;
    let original = apply_route(&h, &example("../gateway-api/route.yaml")).await;
    apply_gateway_canary(&h, json!({"propagationDelay": "1s"})).await;
    h.wait_status("frontend", "Ready", 10).await;
    wait_route_share(&h, "frontend", 10).await;

    // Someone deletes the stable Service: the route goes back to frontend at once.
    h.k(&["delete", "service", STABLE_SVC, "--wait=false"])
        .await;
    h.faults_injected(1);
    h.until("the route back to the Service", WAIT, || async {
        let r = route(&h, "frontend").await.ok_or("no route")?;
        if r["spec"] == original["spec"] {
            Ok(())
        } else {
            Err(r["spec"].to_string())
        }
    })
    .await;
    // The Event is published after the write that sent the route back: wait for it.
    wait_event(&h, "BackendServiceLost").await;
    // The Service comes back, and the split with it.
    h.wait_status("frontend", "Ready", 10).await;
    wait_route_share(&h, "frontend", 10).await;
    assert!(service_selector(&h, STABLE_SVC).await.is_some());
    mesh.abort();
    h.finish(false).await;
}

/// Waits until the namespace holds an Event with `reason`.
async fn wait_event(h: &Harness, reason: &str) {
    let selector = format!("reason={reason}");
    h.until(&format!("a {reason} Event"), WAIT, || async {
        let events = h
            .k(&["get", "events", "--field-selector", &selector, "-o", "name"])
            .await;
        if events.trim().is_empty() {
            Err("none yet".to_string())
        } else {
            Ok(())
        }
    })
    .await;
}
