//! Unit tests of the planner, one file per stage or concern, one test per behaviour; the
//! fixtures (a canary, a target, a world of observed objects) and the plan inspection helpers here.

use std::collections::BTreeSet;

use k8s_openapi::api::apps::v1::DeploymentStatus;

use super::*;
use crate::api::status::PropagationWait;
use crate::api::{RECORDING_SUBSET, RESTORE_ANNOTATION, STABLE_SUBSET};

mod block;
mod clone;
mod gateway;
mod gitops;
mod make_before_break;
mod modes;
mod ramp_and_scale;
mod report;
mod rollback;
mod routers;
mod routes;
mod safety;
mod simulation;
mod timebox;

// The helpers a file shares with the others.
use block::*;
use make_before_break::*;
use ramp_and_scale::*;
use rollback::*;
use routes::*;
use safety::*;

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

const NS: &str = "shop";
const TARGET: &str = "frontend";
const CLONE: &str = "frontend-recording";
const CANARY: &str = "rec";
const CANARY_UID: &str = "uid-rec";
const FQDN: &str = "frontend.shop.svc.cluster.local";
const T0: i64 = 1_700_000_000;
const INJECT: &str = "sidecar.speedscale.com/inject";

fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(T0 + secs).unwrap()
}

fn at_ms(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(T0 * 1000 + ms).unwrap()
}

fn rfc(t: Timestamp) -> String {
    t.to_string()
}

/// A RecordingCanary builder: `rec` in `shop`, target `frontend`, 10 %, delay 3s, finalizer set.
#[derive(Clone)]
struct CanaryB {
    v: Value,
    status: Option<RecordingCanaryStatus>,
}

fn canary() -> CanaryB {
    CanaryB {
        v: json!({
            "apiVersion": "recordingcanary.dev/v1alpha1",
            "kind": "RecordingCanary",
            "metadata": {
                "name": CANARY, "namespace": NS, "uid": CANARY_UID, "generation": 3,
                "creationTimestamp": rfc(at(-3600)), "finalizers": [FINALIZER],
            },
            "spec": {"targetRef": {"name": TARGET}, "percent": 10, "propagationDelay": "3s"},
        }),
        status: None,
    }
}

impl CanaryB {
    fn spec(mut self, key: &str, value: Value) -> Self {
        self.v["spec"][key] = value;
        self
    }
    fn percent(self, p: i64) -> Self {
        self.spec("percent", json!(p))
    }
    fn ramp(self, step: i64, interval: &str) -> Self {
        self.spec("ramp", json!({"stepPercent": step, "interval": interval}))
    }
    fn delay(self, d: &str) -> Self {
        self.spec("propagationDelay", json!(d))
    }
    fn max_replicas(self, m: i64) -> Self {
        self.spec("maxReplicas", json!(m))
    }
    fn named(mut self, name: &str, uid: &str, created: i64) -> Self {
        self.v["metadata"]["name"] = json!(name);
        self.v["metadata"]["uid"] = json!(uid);
        self.v["metadata"]["creationTimestamp"] = json!(rfc(at(created)));
        self
    }
    fn without_finalizer(mut self) -> Self {
        self.v["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("finalizers");
        self
    }
    fn deleting(mut self) -> Self {
        self.v["metadata"]["deletionTimestamp"] = json!(rfc(at(-1)));
        self
    }
    fn status(mut self, s: RecordingCanaryStatus) -> Self {
        self.status = Some(s);
        self
    }
    fn build(&self) -> RecordingCanary {
        let mut c: RecordingCanary =
            serde_json::from_value(self.v.clone()).expect("canary fixture");
        c.status = self.status.clone();
        c
    }
}

fn ready_condition(reason: &str, ok: bool) -> Condition {
    Condition {
        type_: "Ready".into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: String::new(),
        last_transition_time: Time(at(-600)),
        observed_generation: Some(3),
    }
}

/// Status of a canary whose subsets were added long ago and that routes `current` %.
fn status(phase_: Phase, reason: &str, current: i32) -> RecordingCanaryStatus {
    RecordingCanaryStatus {
        phase: Some(phase_),
        current_percent: current,
        subsets_added_time: Some(rfc(at(-600))),
        conditions: vec![ready_condition(reason, phase_ == Phase::Ready)],
        ..Default::default()
    }
}

fn target_with(replicas: i32, image: &str) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": TARGET, "namespace": NS, "uid": "uid-target", "resourceVersion": "10",
                     "labels": {"app": "frontend"}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "frontend"}},
            "template": {
                "metadata": {"labels": {"app": "frontend", "tier": "web"}, "annotations": {"team": "shop"}},
                "spec": {"containers": [{"name": "app", "image": image, "ports": [{"containerPort": 8080}]}]},
            },
        },
        "status": {"replicas": replicas, "readyReplicas": replicas},
    }))
    .expect("target fixture")
}

fn target(replicas: i32) -> Deployment {
    target_with(replicas, "frontend:v1")
}

/// The clone as it is live: built by the planner's own builder, then stamped by the API server.
fn live_clone(c: &RecordingCanary, t: &Deployment, replicas: i32, ready: i32) -> Deployment {
    let mut d = build_clone(c, t, replicas);
    d.metadata.uid = Some("uid-clone".into());
    d.metadata.resource_version = Some("55".into());
    d.status = Some(DeploymentStatus {
        replicas: Some(replicas),
        ready_replicas: Some(ready),
        ..Default::default()
    });
    d
}

/// A pod owned by ReplicaSet `<deploy>-<hash>`.
#[derive(Clone)]
struct PodB {
    v: Value,
}

fn pod_of(deploy: &str, hash: &str, name: &str) -> PodB {
    let rs = format!("{deploy}-{hash}");
    PodB {
        v: json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": name, "namespace": NS,
                "labels": {"app": "frontend", "pod-template-hash": hash, "security.istio.io/tlsMode": "istio"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs,
                                      "uid": format!("uid-{rs}"), "controller": true}],
            },
            "spec": {"containers": [{"name": "app", "image": "frontend:v1"}]},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
        }),
    }
}

/// `a`, `b`, … for pod names.
fn pod_suffix(i: i32) -> String {
    u8::try_from(i)
        .ok()
        .filter(|i| *i < 26)
        .map(|i| char::from(b'a' + i).to_string())
        .unwrap_or_else(|| i.to_string())
}

fn target_pod(name: &str) -> PodB {
    pod_of(TARGET, "7d9f", name)
}

fn clone_pod(name: &str) -> PodB {
    pod_of(CLONE, "5c4b", name).role(ROLE_RECORDING)
}

impl PodB {
    fn role(mut self, role: &str) -> Self {
        self.v["metadata"]["labels"][ROLE_LABEL] = json!(role);
        self
    }
    fn stable(self) -> Self {
        self.role(ROLE_STABLE)
    }
    fn not_ready(mut self) -> Self {
        self.v["status"]["conditions"] = json!([{"type": "Ready", "status": "False"}]);
        self
    }
    fn crash_looping(mut self) -> Self {
        self.v["status"]["containerStatuses"] = json!([{
            "name": "app", "image": "frontend:v1", "imageID": "", "ready": false, "restartCount": 7,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 5m0s"}},
        }]);
        self.not_ready()
    }
    fn terminating(mut self) -> Self {
        self.v["metadata"]["deletionTimestamp"] = json!(rfc(at(-5)));
        self
    }
    fn build(&self) -> PodFacts {
        serde_json::from_value(self.v.clone()).expect("pod fixture")
    }
}

fn mesh_obj(kind: &str, ns: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": kind,
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{kind}-{ns}-{name}"), "resourceVersion": "100"},
        "spec": spec,
    })
}

fn vs(name: &str, spec: Value) -> Value {
    mesh_obj("VirtualService", NS, name, spec)
}

fn dr_in(ns: &str, name: &str, spec: Value) -> Value {
    mesh_obj("DestinationRule", ns, name, spec)
}

fn owned(mut v: Value) -> Value {
    v["metadata"]["ownerReferences"] = json!([{
        "apiVersion": "recordingcanary.dev/v1alpha1", "kind": "RecordingCanary",
        "name": CANARY, "uid": CANARY_UID, "controller": true, "blockOwnerDeletion": true,
    }]);
    v
}

/// The user's VirtualService: one mesh route to `frontend`, no weight.
fn user_vs() -> Value {
    vs(
        "frontend",
        json!({"hosts": ["frontend"], "http": [{"route": [{"destination": {"host": "frontend"}}]}]}),
    )
}

/// The user's VirtualService after our split at `pct`.
fn split_vs(pct: i64) -> Value {
    let mut v = user_vs();
    v["spec"]["http"][0]["route"] = json!([
        {"destination": {"host": "frontend", "subset": STABLE_SUBSET}, "weight": 100 - pct},
        {"destination": {"host": "frontend", "subset": RECORDING_SUBSET}, "weight": pct},
    ]);
    v["metadata"]["annotations"] =
        json!({RESTORE_ANNOTATION: json!({"canary": CANARY, "weights": [null]}).to_string()});
    v
}

/// The user's DestinationRule: no subsets, no annotations.
fn user_dr() -> Value {
    dr_in(
        NS,
        "frontend",
        json!({"host": "frontend", "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": 100}}}}),
    )
}

fn both_subsets() -> Vec<String> {
    vec![STABLE_SUBSET.to_string(), RECORDING_SUBSET.to_string()]
}

/// The user's DestinationRule with our subsets in it.
fn split_dr() -> Value {
    let mut d = user_dr();
    d["metadata"]["annotations"] =
        json!({RESTORE_ANNOTATION: istio::dr_restore_note(true, CANARY, &both_subsets())});
    d["spec"]["subsets"] = json!(istio::our_subsets());
    d
}

#[derive(Clone)]
struct World {
    canary: RecordingCanary,
    now: Timestamp,
    started: Timestamp,
    target: Option<Deployment>,
    service: bool,
    clone: Option<Deployment>,
    pods: Vec<PodFacts>,
    vss: Vec<Value>,
    drs: Vec<Value>,
    rivals: Vec<Rival>,
    service_selector: BTreeMap<String, String>,
    stable_labelling: StableLabelling,
    /// The pods that are Ready endpoints of the Service; `None`: every serving pod is one.
    endpoints: Option<BTreeSet<String>>,
    http_routes: Vec<Value>,
    grpc_routes: Vec<Value>,
    ambient: bool,
    waypoint: Option<String>,
    service_ports: Vec<Value>,
    /// The Gateway API router's Services, stable then recording, as created (their endpoints:
    /// the serving pods they select, unless `backend_endpoints` says otherwise).
    backends: [Option<BackendService>; 2],
    backend_endpoints: Option<[BTreeSet<String>; 2]>,
}

impl World {
    /// The backend Services as the planner sees them, with their endpoints.
    fn backend_services(&self) -> [Option<BackendService>; 2] {
        let mut out = self.backends.clone();
        for (i, b) in out.iter_mut().enumerate() {
            if let Some(b) = b.as_mut() {
                b.endpoints = match &self.backend_endpoints {
                    Some(e) => e[i].clone(),
                    None => self
                        .pods
                        .iter()
                        .filter(|p| {
                            p.serving()
                                && b.selector.iter().all(|(k, v)| p.labels().get(k) == Some(v))
                        })
                        .filter_map(|p| p.metadata.name.clone())
                        .collect(),
                };
            }
        }
        out
    }

    fn plan(&self) -> Plan {
        let endpoints = self.endpoints.clone().unwrap_or_else(|| {
            self.pods
                .iter()
                .filter(|p| p.serving())
                .filter_map(|p| p.metadata.name.clone())
                .collect()
        });
        let backends = self.backend_services();
        plan(&Observed {
            canary: &self.canary,
            now: self.now,
            started: self.started,
            cluster_domain: "cluster.local",
            target: self.target.as_ref(),
            service_exists: self.service,
            service_selector: self.service_selector.clone(),
            clone: self.clone.as_ref(),
            pods: &self.pods,
            endpoints: &endpoints,
            virtual_services: &self.vss,
            http_routes: &self.http_routes,
            grpc_routes: &self.grpc_routes,
            ambient: self.ambient,
            waypoint: self.waypoint.as_deref(),
            service_ports: &self.service_ports,
            backend_services: [backends[0].as_ref(), backends[1].as_ref()],
            destination_rules: &self.drs,
            rivals: &self.rivals,
            stable_labelling: self.stable_labelling,
        })
    }

    fn with_canary(mut self, c: CanaryB) -> Self {
        self.canary = c.build();
        self
    }

    /// `ready` of the clone's pods Ready (what the planner counts), and its Deployment's
    /// status saying the same. Clone pods that are not Ready (crash looping, say) stay.
    fn clone_ready(mut self, ready: i32) -> Self {
        if let Some(cl) = self.clone.as_mut() {
            cl.status
                .get_or_insert_with(Default::default)
                .ready_replicas = Some(ready);
        }
        self.pods
            .retain(|p| !(pod_of_deployment(p, CLONE) && p.serving()));
        for i in 0..ready {
            self.pods
                .push(clone_pod(&format!("frontend-recording-5c4b-{}", pod_suffix(i))).build());
        }
        self
    }

    /// The Deployment controller and kubelet: the clone's pods, as many as it asks for, Ready.
    fn clone_pods_come_up(&mut self) {
        self.pods.retain(|p| !pod_of_deployment(p, CLONE));
        if let Some(cl) = self.clone.as_mut() {
            let r = cl.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            cl.status = Some(DeploymentStatus {
                replicas: Some(r),
                ready_replicas: Some(r),
                ..Default::default()
            });
            for i in 0..r {
                self.pods
                    .push(clone_pod(&format!("frontend-recording-5c4b-{i}")).build());
            }
        }
    }

    fn vs_named(&self, name: &str) -> &Value {
        self.vss
            .iter()
            .find(|v| meta_name(v) == name)
            .expect("vs exists")
    }
}

/// Nothing done yet: two ready, unlabeled target pods, the user's VS and DR, no clone, no status.
fn fresh_world() -> World {
    World {
        canary: canary().build(),
        now: at(0),
        started: at(-3600),
        target: Some(target(4)),
        service: true,
        clone: None,
        pods: vec![
            target_pod("frontend-7d9f-a").build(),
            target_pod("frontend-7d9f-b").build(),
        ],
        vss: vec![user_vs()],
        drs: vec![user_dr()],
        rivals: vec![],
        stable_labelling: StableLabelling::Controller,
        service_selector: BTreeMap::from([("app".to_string(), "frontend".to_string())]),
        endpoints: None,
        http_routes: Vec::new(),
        grpc_routes: Vec::new(),
        ambient: false,
        waypoint: None,
        service_ports: vec![
            json!({"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}),
        ],
        backends: [None, None],
        backend_endpoints: None,
    }
}

/// Subsets in the DR since long ago, pods labeled, VS not split yet, no clone.
fn subsets_world() -> World {
    let mut w = fresh_world();
    w.canary = canary()
        .status(status(Phase::Progressing, "WaitingForStablePods", 0))
        .build();
    w.pods = vec![
        target_pod("frontend-7d9f-a").stable().build(),
        target_pod("frontend-7d9f-b").stable().build(),
    ];
    w.drs = vec![split_dr()];
    w
}

/// Serving `pct` %: everything in place and healthy.
fn serving_world(pct: i32) -> World {
    let c = canary()
        .percent(pct.into())
        .status(status(Phase::Ready, "TargetReached", pct));
    let built = c.build();
    let t = target(4);
    // Ready replicas enough for any weight of a 4-replica target.
    let clone = live_clone(&built, &t, clone_replicas(4, pct, pct, None), 4);
    let w = World {
        canary: built,
        now: at(0),
        started: at(-3600),
        target: Some(t),
        service: true,
        clone: Some(clone),
        pods: vec![
            target_pod("frontend-7d9f-a").stable().build(),
            target_pod("frontend-7d9f-b").stable().build(),
        ],
        vss: vec![split_vs(pct.into())],
        drs: vec![split_dr()],
        rivals: vec![],
        stable_labelling: StableLabelling::Controller,
        service_selector: BTreeMap::from([("app".to_string(), "frontend".to_string())]),
        endpoints: None,
        http_routes: Vec::new(),
        grpc_routes: Vec::new(),
        ambient: false,
        waypoint: None,
        service_ports: vec![
            json!({"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}),
        ],
        backends: [None, None],
        backend_endpoints: None,
    };
    w.clone_ready(4)
}

/// Split at 0 % toward 10 %, the canary waiting for its clone (which `serving_world` makes Ready).
fn waiting_for_clone_world() -> World {
    let mut w = serving_world(10);
    w.vss = vec![split_vs(0)];
    w.canary = canary()
        .status(status(Phase::Progressing, "WaitingForClone", 0))
        .build();
    w
}

// ---------------------------------------------------------------------------------------------
// Plan inspection helpers
// ---------------------------------------------------------------------------------------------

fn pos(p: &Plan, f: impl Fn(&Action) -> bool) -> Option<usize> {
    p.actions.iter().position(f)
}

fn has(p: &Plan, f: impl Fn(&Action) -> bool) -> bool {
    pos(p, f).is_some()
}

fn is_vs_write(a: &Action) -> bool {
    matches!(
        a,
        Action::PatchMesh {
            kind: MeshKind::VirtualService,
            ..
        } | Action::CreateMesh {
            kind: MeshKind::VirtualService,
            ..
        } | Action::DeleteMesh {
            kind: MeshKind::VirtualService,
            ..
        }
    )
}

fn is_dr_write(a: &Action) -> bool {
    matches!(
        a,
        Action::PatchMesh {
            kind: MeshKind::DestinationRule,
            ..
        } | Action::CreateMesh {
            kind: MeshKind::DestinationRule,
            ..
        } | Action::DeleteMesh {
            kind: MeshKind::DestinationRule,
            ..
        }
    )
}

fn is_mesh_write(a: &Action) -> bool {
    is_vs_write(a) || is_dr_write(a)
}

fn patch_of<'p>(p: &'p Plan, kind: MeshKind, name: &str) -> Option<&'p Vec<Value>> {
    p.actions.iter().find_map(|a| match a {
        Action::PatchMesh {
            kind: k,
            name: n,
            ops,
        } if *k == kind && n == name => Some(ops),
        _ => None,
    })
}

fn created_clone(p: &Plan) -> Option<&Deployment> {
    p.actions.iter().find_map(|a| match a {
        Action::CreateClone(d) => Some(d.as_ref()),
        _ => None,
    })
}

/// The Deployment of the plan's `ReplaceClone`.
fn replaced_clone(p: &Plan) -> &Deployment {
    p.actions
        .iter()
        .find_map(|a| match a {
            Action::ReplaceClone(d) => Some(d.as_ref()),
            _ => None,
        })
        .expect("ReplaceClone")
}

fn ready_reason(p: &Plan) -> String {
    p.status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.reason.clone())
        .unwrap_or_default()
}

fn ready_message(p: &Plan) -> String {
    p.status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

fn event_reasons(p: &Plan) -> Vec<&str> {
    p.events.iter().map(|e| e.reason.as_str()).collect()
}

fn assert_blocked(p: &Plan, reason: &str) {
    assert_eq!(p.status.phase, Some(Phase::Blocked), "{p:#?}");
    assert_eq!(ready_reason(p), reason, "{p:#?}");
    assert!(
        p.events.iter().any(|e| e.warning && e.reason == reason),
        "a warning event {reason}: {:?}",
        p.events
    );
}

/// A blocked canary changes nothing but keeps the target's pods in the stable subset.
fn assert_only_pod_labels(p: &Plan) {
    assert!(
        p.actions
            .iter()
            .all(|a| matches!(a, Action::LabelPod { .. })),
        "{:#?}",
        p.actions
    );
}

/// The pods a plan labels stable, in order.
fn labelled(p: &Plan) -> Vec<String> {
    p.actions
        .iter()
        .filter_map(|a| match a {
            Action::LabelPod { name } => Some(name.clone()),
            _ => None,
        })
        .collect()
}

/// Applies JSON-patch operations the way the API server would (the `test` op included).
fn apply_ops(obj: &Value, ops: &[Value]) -> Value {
    let patch: json_patch::Patch =
        serde_json::from_value(Value::Array(ops.to_vec())).expect("valid JSON patch");
    let mut doc = obj.clone();
    json_patch::patch(&mut doc, &patch)
        .unwrap_or_else(|e| panic!("patch {ops:#?} does not apply to {obj:#?}: {e}"));
    doc
}

/// The weights of route `i` of a VirtualService.
fn weights(vs: &Value, i: usize) -> Vec<i64> {
    vs["spec"]["http"][i]["route"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["weight"].as_i64().unwrap_or(-1))
        .collect()
}

fn subsets_of_route(vs: &Value, i: usize) -> Vec<Option<String>> {
    vs["spec"]["http"][i]["route"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["destination"]["subset"].as_str().map(String::from))
        .collect()
}
