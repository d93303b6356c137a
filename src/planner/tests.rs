//! Unit tests of the planner: fixtures, one test per behaviour, a property test over weights and
//! a simulated reconcile loop that applies the planned JSON patches.

use std::collections::BTreeSet;

use k8s_openapi::api::apps::v1::DeploymentStatus;

use super::*;
use crate::api::status::PropagationWait;
use crate::api::{RECORDING_SUBSET, RESTORE_ANNOTATION, STABLE_SUBSET};

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
}

impl World {
    fn plan(&self) -> Plan {
        let endpoints = self.endpoints.clone().unwrap_or_else(|| {
            self.pods
                .iter()
                .filter(|p| p.serving())
                .filter_map(|p| p.metadata.name.clone())
                .collect()
        });
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

// ---------------------------------------------------------------------------------------------
// 1. The clone
// ---------------------------------------------------------------------------------------------

#[test]
fn clone_is_named_after_the_target_and_its_pods_carry_the_recording_role() {
    let p = subsets_world().plan();
    let d = created_clone(&p).expect("clone created");
    assert_eq!(d.metadata.name.as_deref(), Some(CLONE));
    assert_eq!(d.metadata.namespace.as_deref(), Some(NS));
    assert_eq!(p.status.clone_name.as_deref(), Some(CLONE));
    let spec = d.spec.as_ref().unwrap();
    let labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    assert_eq!(
        labels.get(ROLE_LABEL).map(String::as_str),
        Some(ROLE_RECORDING)
    );
    // The target's own template labels and containers are kept.
    assert_eq!(labels.get("app").map(String::as_str), Some("frontend"));
    assert_eq!(labels.get("tier").map(String::as_str), Some("web"));
    let containers = &spec.template.spec.as_ref().unwrap().containers;
    assert_eq!(containers.len(), 1);
    assert_eq!(containers[0].image.as_deref(), Some("frontend:v1"));
}

#[test]
fn clone_selector_is_the_target_selector_plus_the_role_label() {
    let p = subsets_world().plan();
    let d = created_clone(&p).expect("clone created");
    let sel = d
        .spec
        .as_ref()
        .unwrap()
        .selector
        .match_labels
        .clone()
        .unwrap();
    assert_eq!(
        sel,
        BTreeMap::from([
            ("app".to_string(), "frontend".to_string()),
            (ROLE_LABEL.to_string(), ROLE_RECORDING.to_string()),
        ])
    );
}

#[test]
fn sidecar_annotations_go_on_the_clone_deployment_metadata_not_its_pods() {
    let w = subsets_world().with_canary(
        canary()
            .spec(
                "sidecar",
                json!({"annotations": {INJECT: "true", "sidecar.speedscale.com/tls-out": "true"}}),
            )
            .status(status(Phase::Progressing, "WaitingForStablePods", 0)),
    );
    let p = w.plan();
    let d = created_clone(&p).expect("clone created");
    let ann = d.metadata.annotations.as_ref().unwrap();
    assert_eq!(ann.get(INJECT).map(String::as_str), Some("true"));
    assert_eq!(
        ann.get("sidecar.speedscale.com/tls-out")
            .map(String::as_str),
        Some("true")
    );
    let pod_ann = d
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .clone()
        .unwrap_or_default();
    assert!(!pod_ann.contains_key(INJECT), "{pod_ann:?}");
    assert_eq!(pod_ann.get("team").map(String::as_str), Some("shop"));
}

#[test]
fn default_sidecar_annotation_asks_for_injection() {
    let p = subsets_world().plan();
    let d = created_clone(&p).expect("clone created");
    assert_eq!(
        d.metadata
            .annotations
            .as_ref()
            .unwrap()
            .get(INJECT)
            .map(String::as_str),
        Some("true")
    );
}

#[test]
fn clone_keeps_the_inject_annotation_when_users_add_other_sidecar_annotations() {
    let c = canary()
        .spec(
            "sidecar",
            json!({"annotations": {"sidecar.speedscale.com/capture-mode": "proxy"}}),
        )
        .build();
    let d = build_clone(&c, &target(4), 1);
    let ann = d.metadata.annotations.unwrap();
    assert_eq!(ann.get(INJECT).map(String::as_str), Some("true"));
    assert_eq!(
        ann.get("sidecar.speedscale.com/capture-mode")
            .map(String::as_str),
        Some("proxy")
    );
    // Set explicitly, it wins.
    let c = canary()
        .spec("sidecar", json!({"annotations": {INJECT: "false"}}))
        .build();
    let d = build_clone(&c, &target(4), 1);
    assert_eq!(
        d.metadata
            .annotations
            .unwrap()
            .get(INJECT)
            .map(String::as_str),
        Some("false")
    );
}

#[test]
fn clone_is_owned_by_the_canary_and_records_the_source_hash() {
    let w = subsets_world();
    let p = w.plan();
    let d = created_clone(&p).expect("clone created");
    let refs = d.metadata.owner_references.as_ref().unwrap();
    assert_eq!(refs.len(), 1);
    assert_eq!(refs[0].uid, CANARY_UID);
    assert_eq!(refs[0].kind, "RecordingCanary");
    assert_eq!(refs[0].name, CANARY);
    assert_eq!(refs[0].controller, Some(true));
    let labels = d.metadata.labels.as_ref().unwrap();
    assert_eq!(labels.get(CANARY_LABEL).map(String::as_str), Some(CANARY));
    assert_eq!(
        labels.get(MANAGED_BY.0).map(String::as_str),
        Some(MANAGED_BY.1)
    );
    let hash = d
        .metadata
        .annotations
        .as_ref()
        .unwrap()
        .get(SOURCE_HASH_ANNOTATION)
        .cloned();
    let want = source_hash(
        &w.target.as_ref().unwrap().spec.as_ref().unwrap().template,
        &w.canary,
    );
    assert_eq!(hash, Some(want.clone()));
    assert!(!want.is_empty());
    // A different template gives a different hash.
    let other = source_hash(
        &target_with(4, "frontend:v2").spec.unwrap().template,
        &w.canary,
    );
    assert_ne!(other, want);
}

#[test]
fn extra_pod_labels_and_annotations_go_on_the_clone_template_and_into_the_hash() {
    let c = canary()
        .spec(
            "sidecar",
            json!({"podLabels": {"recording": "yes"}, "podAnnotations": {"note": "rec"}}),
        )
        .build();
    let t = target(4);
    let d = build_clone(&c, &t, 2);
    let tm = d.spec.as_ref().unwrap().template.metadata.clone().unwrap();
    assert_eq!(
        tm.labels.unwrap().get("recording").map(String::as_str),
        Some("yes")
    );
    assert_eq!(
        tm.annotations.unwrap().get("note").map(String::as_str),
        Some("rec")
    );
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(2));
    let plain = canary().build();
    assert_ne!(
        source_hash(&t.spec.as_ref().unwrap().template, &c),
        source_hash(&t.spec.as_ref().unwrap().template, &plain)
    );
}

#[test]
fn target_template_change_replaces_the_clone_keeping_its_selector_and_foreign_metadata() {
    let mut w = serving_world(10);
    let cl = w.clone.as_mut().unwrap();
    cl.metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert("deployment.kubernetes.io/revision".into(), "4".into());
    // A selector the live clone was created with (immutable) that differs from today's build.
    cl.spec
        .as_mut()
        .unwrap()
        .selector
        .match_labels
        .as_mut()
        .unwrap()
        .insert("legacy".into(), "x".into());
    w.target = Some(target_with(4, "frontend:v2"));
    let p = w.plan();
    let replaced = replaced_clone(&p);
    assert!(!has(&p, |a| matches!(
        a,
        Action::ScaleClone { .. } | Action::CreateClone(_)
    )));
    assert_eq!(replaced.metadata.resource_version.as_deref(), Some("55"));
    let spec = replaced.spec.as_ref().unwrap();
    assert_eq!(
        spec.template.spec.as_ref().unwrap().containers[0]
            .image
            .as_deref(),
        Some("frontend:v2")
    );
    assert_eq!(
        spec.selector
            .match_labels
            .as_ref()
            .unwrap()
            .get("legacy")
            .map(String::as_str),
        Some("x"),
        "the live selector is kept"
    );
    let ann = replaced.metadata.annotations.as_ref().unwrap();
    assert_eq!(
        ann.get("deployment.kubernetes.io/revision")
            .map(String::as_str),
        Some("4")
    );
    let want = source_hash(
        &w.target.as_ref().unwrap().spec.as_ref().unwrap().template,
        &w.canary,
    );
    assert_eq!(ann.get(SOURCE_HASH_ANNOTATION), Some(&want));
    assert!(event_reasons(&p).contains(&"CloneSynced"));
    // Traffic is untouched by a template change.
    assert!(!has(&p, is_mesh_write));
}

#[test]
fn webhook_changes_to_the_live_clone_do_not_trigger_a_replace() {
    let mut w = serving_world(10);
    let cl = w.clone.as_mut().unwrap();
    let tspec = cl.spec.as_mut().unwrap().template.spec.as_mut().unwrap();
    tspec.containers.push(
        serde_json::from_value(json!({"name": "goproxy", "image": "speedscale/goproxy"})).unwrap(),
    );
    tspec.init_containers = Some(vec![
        serde_json::from_value(json!({"name": "init", "image": "speedscale/init"})).unwrap(),
    ]);
    cl.spec
        .as_mut()
        .unwrap()
        .template
        .metadata
        .as_mut()
        .unwrap()
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert("sidecar.speedscale.com/injected".into(), "true".into());
    let p = w.plan();
    assert!(p.actions.is_empty(), "{:#?}", p.actions);
}

#[test]
fn target_replica_change_only_scales_the_clone() {
    let mut w = serving_world(25);
    w.target = Some(target(12));
    let p = w.plan();
    assert_eq!(
        p.actions,
        vec![Action::ScaleClone {
            replicas: 3,
            from: Some(1)
        }]
    );
    assert!(event_reasons(&p).contains(&"CloneScaled"));
    assert_eq!(p.status.target_replicas, 12);
    assert_eq!(p.status.clone_replicas, 3);
}

#[test]
fn changed_sidecar_annotations_replace_the_clone() {
    let w = serving_world(10).with_canary(
        canary()
            .spec("sidecar", json!({"annotations": {INJECT: "true", "sidecar.speedscale.com/capture-mode": "proxy"}}))
            .status(status(Phase::Ready, "TargetReached", 10)),
    );
    let p = w.plan();
    let replaced = p.actions.iter().find_map(|a| match a {
        Action::ReplaceClone(d) => Some(d.as_ref()),
        _ => None,
    });
    let ann = replaced
        .expect("ReplaceClone")
        .metadata
        .annotations
        .clone()
        .unwrap();
    assert_eq!(
        ann.get("sidecar.speedscale.com/capture-mode")
            .map(String::as_str),
        Some("proxy")
    );
}

const EBPF: &str = "capture.speedscale.com/enabled";

fn clone_annotations_of(c: &RecordingCanary) -> BTreeMap<String, String> {
    build_clone(c, &target(4), 1)
        .metadata
        .annotations
        .unwrap_or_default()
}

#[test]
fn ebpf_capture_puts_the_collector_annotation_on_the_clone_and_never_the_inject_one() {
    let ann = clone_annotations_of(&canary().spec("capture", json!("EBPF")).build());
    assert_eq!(ann.get(EBPF).map(String::as_str), Some("true"));
    assert!(!ann.contains_key(INJECT), "{ann:?}");
    // The pods keep the documented role label, the one to target with eBPF capture.
    let c = canary().spec("capture", json!("EBPF")).build();
    let d = build_clone(&c, &target(4), 1);
    let pod_labels = d.spec.unwrap().template.metadata.unwrap().labels.unwrap();
    assert_eq!(
        pod_labels.get(ROLE_LABEL).map(String::as_str),
        Some(ROLE_RECORDING)
    );
}

#[test]
fn no_capture_puts_only_the_users_annotations_on_the_clone() {
    let ann = clone_annotations_of(
        &canary()
            .spec("capture", json!("None"))
            .spec(
                "sidecar",
                json!({"annotations": {"recorder.example.com/on": "yes"}}),
            )
            .build(),
    );
    assert!(
        !ann.contains_key(INJECT) && !ann.contains_key(EBPF),
        "{ann:?}"
    );
    assert_eq!(
        ann.get("recorder.example.com/on").map(String::as_str),
        Some("yes")
    );
}

#[test]
fn a_spec_that_would_put_both_capture_annotations_on_the_clone_is_invalid() {
    for (capture, annotations) in [
        ("Sidecar", json!({EBPF: "true"})),
        ("EBPF", json!({INJECT: "true"})),
        ("None", json!({INJECT: "true", EBPF: "true"})),
    ] {
        let c = canary()
            .spec("capture", json!(capture))
            .spec("sidecar", json!({ "annotations": annotations }))
            .build();
        let err = c.spec.validate().expect_err(capture);
        assert!(err.0.contains("spec.capture"), "{capture}: {err}");
    }
    // Turning the other one off explicitly is fine.
    for (capture, annotations) in [
        ("Sidecar", json!({EBPF: "false"})),
        ("EBPF", json!({INJECT: "false"})),
        ("Sidecar", json!({INJECT: "false", EBPF: "true"})),
    ] {
        let c = canary()
            .spec("capture", json!(capture))
            .spec("sidecar", json!({ "annotations": annotations }))
            .build();
        assert!(c.spec.validate().is_ok(), "{capture} {annotations}");
    }
}

#[test]
fn switching_a_live_clone_from_sidecar_to_ebpf_removes_the_inject_annotation() {
    // serving_world's clone was built for the default (Sidecar) capture, and carries what a
    // webhook added since.
    let mut w = serving_world(10).with_canary(
        canary()
            .spec("capture", json!("EBPF"))
            .status(status(Phase::Ready, "TargetReached", 10)),
    );
    if let Some(cl) = w.clone.as_mut() {
        cl.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert("webhook.example.com/seen".into(), "1".into());
    }
    let p = w.plan();
    let replaced = replaced_clone(&p);
    let ann = replaced.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(ann.get(EBPF).map(String::as_str), Some("true"));
    assert!(!ann.contains_key(INJECT), "{ann:?}");
    assert_eq!(
        ann.get("webhook.example.com/seen").map(String::as_str),
        Some("1"),
        "what others put on the clone stays"
    );
    // Once switched, nothing more to do.
    let mut w2 = w;
    w2.clone = Some(replaced.clone());
    let p2 = w2.plan();
    assert!(
        !p2.actions
            .iter()
            .any(|a| matches!(a, Action::ReplaceClone(_))),
        "{:#?}",
        p2.actions
    );
}

#[test]
fn the_target_deployment_is_never_written() {
    let mut w = serving_world(10);
    w.target = Some(target_with(9, "frontend:v3"));
    for p in [fresh_world().plan(), subsets_world().plan(), w.plan()] {
        for a in &p.actions {
            match a {
                Action::CreateClone(d) | Action::ReplaceClone(d) => {
                    assert_eq!(d.metadata.name.as_deref(), Some(CLONE))
                }
                Action::LabelPod { name } | Action::UnlabelPod { name } => {
                    assert!(name.starts_with("frontend-7d9f-"), "{name}")
                }
                _ => {}
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Subsets and pod labels
// ---------------------------------------------------------------------------------------------

#[test]
fn target_pods_are_labeled_stable_and_clone_pods_never() {
    let mut w = fresh_world();
    w.pods.push(clone_pod("frontend-recording-5c4b-a").build());
    // A clone pod whose role label was stripped is still not the target's.
    let mut stripped = clone_pod("frontend-recording-5c4b-b");
    stripped.v["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove(ROLE_LABEL);
    w.pods.push(stripped.build());
    let p = w.plan();
    let labeled: Vec<&str> = p
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::LabelPod { name } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(labeled, vec!["frontend-7d9f-a", "frontend-7d9f-b"]);
}

#[test]
fn pods_of_other_deployments_and_terminating_pods_are_not_labeled() {
    let mut w = fresh_world();
    w.pods = vec![
        target_pod("frontend-7d9f-a").build(),
        target_pod("frontend-7d9f-gone").terminating().build(),
        // Same selector labels, but owned by ReplicaSet frontend-admin-7d9f.
        pod_of("frontend-admin", "7d9f", "frontend-admin-7d9f-a").build(),
        // A pod without a controller owner.
        {
            let mut b = target_pod("bare");
            b.v["metadata"]
                .as_object_mut()
                .unwrap()
                .remove("ownerReferences");
            b.build()
        },
    ];
    let p = w.plan();
    let labeled: Vec<Action> = p
        .actions
        .iter()
        .filter(|a| matches!(a, Action::LabelPod { .. }))
        .cloned()
        .collect();
    assert_eq!(
        labeled,
        vec![Action::LabelPod {
            name: "frontend-7d9f-a".into()
        }]
    );
}

#[test]
fn already_labeled_target_pods_are_left_alone() {
    let p = subsets_world().plan();
    assert!(!has(&p, |a| matches!(a, Action::LabelPod { .. })));
}

#[test]
fn no_split_until_every_ready_target_pod_is_in_the_stable_subset() {
    let mut w = subsets_world();
    w.pods[1] = target_pod("frontend-7d9f-b").build();
    let p = w.plan();
    assert_eq!(
        p.actions,
        vec![Action::LabelPod {
            name: "frontend-7d9f-b".into()
        }]
    );
    assert_eq!(ready_reason(&p), "WaitingForStablePods");
    assert_eq!(p.status.current_percent, 0);
    // Once labeled, the split follows.
    w.pods[1] = target_pod("frontend-7d9f-b").stable().build();
    assert!(patch_of(&w.plan(), MeshKind::VirtualService, "frontend").is_some());
}

#[test]
fn unready_unlabeled_target_pods_do_not_hold_back_the_split() {
    let mut w = subsets_world();
    w.pods
        .push(target_pod("frontend-7d9f-c").not_ready().build());
    let p = w.plan();
    assert!(has(&p, |a| *a
        == Action::LabelPod {
            name: "frontend-7d9f-c".into()
        }));
    assert!(patch_of(&p, MeshKind::VirtualService, "frontend").is_some());
}

#[test]
fn no_split_while_the_target_has_no_ready_pod() {
    let mut w = subsets_world();
    w.pods = vec![target_pod("frontend-7d9f-a").stable().not_ready().build()];
    let p = w.plan();
    assert!(!has(&p, is_vs_write));
    assert!(created_clone(&p).is_none());
    assert_eq!(ready_reason(&p), "WaitingForStablePods");
}

#[test]
fn subsets_are_added_to_the_user_dr_selecting_exactly_the_role_labels() {
    let mut w = fresh_world();
    w.drs[0]["spec"]["subsets"] =
        json!([{"name": "v1", "labels": {"version": "v1"}, "futureField": 1}]);
    let p = w.plan();
    let ops = patch_of(&p, MeshKind::DestinationRule, "frontend").expect("DR patch");
    let after = apply_ops(&w.drs[0], ops);
    assert_eq!(
        after["spec"]["subsets"],
        json!([
            {"name": "v1", "labels": {"version": "v1"}, "futureField": 1},
            {"name": STABLE_SUBSET, "labels": {ROLE_LABEL: ROLE_STABLE}},
            {"name": RECORDING_SUBSET, "labels": {ROLE_LABEL: ROLE_RECORDING}},
        ])
    );
    assert_eq!(p.status.subsets_added_time, Some(rfc(at(0))));
    assert_eq!(p.status.destination_rule.as_deref(), Some("shop/frontend"));
}

// ---------------------------------------------------------------------------------------------
// 3. User VirtualService and DestinationRule
// ---------------------------------------------------------------------------------------------

fn rich_user_vs() -> Value {
    vs(
        "frontend",
        json!({
            "hosts": ["frontend", "frontend.example.com"],
            "exportTo": ["."],
            "futureTopLevel": {"keep": [1, 2, 3]},
            "http": [
                {
                    "name": "beta-users",
                    "match": [{"headers": {"x-beta": {"exact": "1"}}, "uri": {"prefix": "/api"}}],
                    "route": [{
                        "destination": {"host": "frontend.shop.svc.cluster.local", "port": {"number": 8080}},
                        "headers": {"request": {"set": {"x-route": "beta"}}},
                    }],
                    "retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx"},
                    "timeout": "10s",
                    "futureRouteField": {"x": true},
                },
                {
                    "name": "shared",
                    "route": [
                        {"destination": {"host": "frontend"}, "weight": 80},
                        {"destination": {"host": "legacy"}, "weight": 20},
                    ],
                    "mirror": {"host": "audit"},
                },
                {
                    "name": "pinned",
                    "route": [{"destination": {"host": "frontend", "subset": "v1"}}],
                },
                {"name": "elsewhere", "route": [{"destination": {"host": "backend"}}]},
            ],
            "tcp": [{"route": [{"destination": {"host": "frontend", "port": {"number": 9000}}}]}],
        }),
    )
}

#[test]
fn only_the_split_changes_in_a_user_virtual_service() {
    let mut w = serving_world(10);
    let original = rich_user_vs();
    w.vss = vec![original.clone()];
    let p = w.plan();
    let ops = patch_of(&p, MeshKind::VirtualService, "frontend").expect("VS patch");
    assert_eq!(
        ops[0],
        json!({"op": "test", "path": "/metadata/resourceVersion", "value": "100"})
    );
    let after = apply_ops(&original, ops);

    let mut expected = original.clone();
    expected["spec"]["http"][0]["route"] = json!([
        {"destination": {"host": "frontend.shop.svc.cluster.local", "port": {"number": 8080}, "subset": STABLE_SUBSET},
         "headers": {"request": {"set": {"x-route": "beta"}}}, "weight": 90},
        {"destination": {"host": "frontend.shop.svc.cluster.local", "port": {"number": 8080}, "subset": RECORDING_SUBSET},
         "headers": {"request": {"set": {"x-route": "beta"}}}, "weight": 10},
    ]);
    expected["spec"]["http"][1]["route"] = json!([
        {"destination": {"host": "frontend", "subset": STABLE_SUBSET}, "weight": 72},
        {"destination": {"host": "frontend", "subset": RECORDING_SUBSET}, "weight": 8},
        {"destination": {"host": "legacy"}, "weight": 20},
    ]);
    // Only our restore annotation is added to the metadata.
    let note = after["metadata"]["annotations"][RESTORE_ANNOTATION].clone();
    assert!(note.is_string(), "{after:#?}");
    expected["metadata"]["annotations"] = json!({RESTORE_ANNOTATION: note});
    assert_eq!(after, expected);
}

#[test]
fn a_shared_route_is_split_in_proportion_and_keeps_its_sum() {
    let mut w = serving_world(10);
    w.vss = vec![vs(
        "frontend",
        json!({"hosts": ["frontend"], "http": [{"route": [
            {"destination": {"host": "frontend"}, "weight": 80},
            {"destination": {"host": "legacy"}, "weight": 20},
        ]}]}),
    )];
    let p = w.plan();
    let after = apply_ops(
        &w.vss[0],
        patch_of(&p, MeshKind::VirtualService, "frontend").unwrap(),
    );
    assert_eq!(weights(&after, 0), vec![72, 8, 20]);
    assert_eq!(weights(&after, 0).iter().sum::<i64>(), 100);
    assert_eq!(
        subsets_of_route(&after, 0),
        vec![
            Some(STABLE_SUBSET.into()),
            Some(RECORDING_SUBSET.into()),
            None
        ]
    );
    assert_eq!(
        after["spec"]["http"][0]["route"][2]["destination"]["host"],
        "legacy"
    );
}

fn shared_route_vs(frontend: i64, legacy: i64) -> Value {
    vs(
        "frontend",
        json!({"hosts": ["frontend"], "http": [{"route": [
            {"destination": {"host": "frontend"}, "weight": frontend},
            {"destination": {"host": "legacy"}, "weight": legacy},
        ]}]}),
    )
}

#[test]
fn a_shared_route_at_an_ambiguous_percent_stays_put_and_ramps_exactly() {
    // 80 at 7% is 74/6, which reads back as 8%: the planner must not rewrite it every pass.
    let mut w = serving_world(7);
    w.vss = vec![shared_route_vs(80, 20)];
    let p = w.plan();
    let split = apply_ops(
        &w.vss[0],
        patch_of(&p, MeshKind::VirtualService, "frontend").unwrap(),
    );
    assert_eq!(weights(&split, 0), vec![74, 6, 20]);
    assert_eq!(p.status.current_percent, 7);
    w.vss = vec![split.clone()];
    w.canary.status = Some(p.status.clone());
    let p = w.plan();
    assert!(p.actions.is_empty(), "{:#?}", p.actions);
    assert!(p.events.is_empty(), "{:?}", p.events);
    assert_eq!(p.status.current_percent, 7);

    // A ramp of 7-point steps goes 7 -> 14, not 8 -> 15.
    let mut w = serving_world(14);
    w.vss = vec![split];
    w.canary = canary()
        .percent(14)
        .ramp(7, "30s")
        .status(RecordingCanaryStatus {
            last_step_time: Some(rfc(at(-30))),
            ..status(Phase::Progressing, "Ramping", 7)
        })
        .build();
    let p = w.plan();
    let after = apply_ops(
        &w.vss[0],
        patch_of(&p, MeshKind::VirtualService, "frontend").unwrap(),
    );
    assert_eq!(p.status.current_percent, 14);
    assert_eq!(weights(&after, 0), vec![69, 11, 20]);
    assert_eq!(p.status.phase, Some(Phase::Ready));
}

#[test]
fn the_user_dr_keeps_every_other_field_when_subsets_are_added() {
    let mut w = fresh_world();
    let mut original = user_dr();
    original["metadata"]["annotations"] = json!({"owner": "team-shop"});
    original["metadata"]["labels"] = json!({"app": "frontend"});
    original["spec"]["futureField"] = json!({"a": 1});
    original["spec"]["exportTo"] = json!(["*"]);
    w.drs = vec![original.clone()];
    let p = w.plan();
    let after = apply_ops(
        &original,
        patch_of(&p, MeshKind::DestinationRule, "frontend").unwrap(),
    );
    let mut expected = original.clone();
    expected["spec"]["subsets"] = json!(istio::our_subsets());
    expected["metadata"]["annotations"][RESTORE_ANNOTATION] =
        after["metadata"]["annotations"][RESTORE_ANNOTATION].clone();
    assert!(expected["metadata"]["annotations"][RESTORE_ANNOTATION].is_string());
    assert_eq!(after, expected);
}

#[test]
fn owned_dr_and_vs_are_created_when_none_exist() {
    let mut w = fresh_world();
    w.vss.clear();
    w.drs.clear();
    let p = w.plan();
    let dr = p
        .actions
        .iter()
        .find_map(|a| match a {
            Action::CreateMesh {
                kind: MeshKind::DestinationRule,
                object,
            } => Some(object.clone()),
            _ => None,
        })
        .expect("owned DR created");
    assert_eq!(dr["metadata"]["name"], format!("{CANARY}-recording"));
    assert_eq!(dr["metadata"]["namespace"], NS);
    assert_eq!(dr["metadata"]["ownerReferences"][0]["uid"], CANARY_UID);
    assert_eq!(dr["metadata"]["labels"][CANARY_LABEL], CANARY);
    assert_eq!(dr["spec"]["host"], FQDN);
    assert_eq!(dr["spec"]["subsets"], json!(istio::our_subsets()));
    assert!(dr["metadata"].get("annotations").is_none());
    assert!(
        !has(&p, is_vs_write),
        "no VS in the pass that adds the subsets"
    );

    // Later: the DR (ours) is there, long enough: the owned VS is created, already split.
    let mut w = subsets_world();
    w.vss.clear();
    let mut owned_dr = dr.clone();
    owned_dr["metadata"]["uid"] = json!("uid-owned-dr");
    owned_dr["metadata"]["resourceVersion"] = json!("7");
    w.drs = vec![owned_dr];
    let p = w.plan();
    assert!(!has(&p, is_dr_write));
    let vs_obj = p
        .actions
        .iter()
        .find_map(|a| match a {
            Action::CreateMesh {
                kind: MeshKind::VirtualService,
                object,
            } => Some(object.clone()),
            _ => None,
        })
        .expect("owned VS created");
    assert_eq!(vs_obj["metadata"]["ownerReferences"][0]["uid"], CANARY_UID);
    assert_eq!(vs_obj["spec"]["hosts"], json!([FQDN]));
    assert_eq!(weights(&vs_obj, 0), vec![100, 0]);
    assert!(vs_obj["metadata"].get("annotations").is_none());
    assert_eq!(
        p.status.virtual_services,
        vec![format!("{NS}/{CANARY}-recording")]
    );
    assert_eq!(
        p.status.destination_rule.as_deref(),
        Some("shop/rec-recording")
    );
}

#[test]
fn two_mesh_virtual_services_for_the_host_block_without_mesh_actions() {
    let mut w = fresh_world();
    let mut second = user_vs();
    second["metadata"]["name"] = json!("frontend-canary");
    second["spec"]["hosts"] = json!([FQDN]);
    w.vss.push(second);
    let p = w.plan();
    assert_blocked(&p, "AmbiguousVirtualService");
    assert_only_pod_labels(&p);
}

#[test]
fn a_gateway_only_virtual_service_does_not_make_the_mesh_choice_ambiguous() {
    let mut w = serving_world(10);
    let mut gw = user_vs();
    gw["metadata"]["name"] = json!("frontend-public");
    gw["spec"]["gateways"] = json!(["istio-system/public"]);
    gw["spec"]["hosts"] = json!(["shop.example.com"]);
    w.vss.push(gw);
    let p = w.plan();
    assert_eq!(p.status.phase, Some(Phase::Ready), "{p:#?}");
    // It is not split either, since spec.gateways does not name it.
    assert!(patch_of(&p, MeshKind::VirtualService, "frontend-public").is_none());
}

#[test]
fn a_gateway_virtual_service_named_in_the_spec_is_split_too() {
    let mut w = serving_world(10);
    w.canary = canary()
        .spec("gateways", json!(["istio-system/public"]))
        .status(status(Phase::Ready, "TargetReached", 10))
        .build();
    let mut gw = vs(
        "frontend-public",
        json!({"hosts": ["shop.example.com"], "gateways": ["istio-system/public"],
               "http": [{"route": [{"destination": {"host": FQDN, "port": {"number": 80}}}]}]}),
    );
    gw["metadata"]["annotations"] = json!({"owner": "edge"});
    w.vss.push(gw.clone());
    let p = w.plan();
    let after = apply_ops(
        &gw,
        patch_of(&p, MeshKind::VirtualService, "frontend-public").expect("gateway VS split"),
    );
    assert_eq!(weights(&after, 0), vec![90, 10]);
    assert_eq!(after["metadata"]["annotations"]["owner"], "edge");
    assert!(
        p.status
            .virtual_services
            .contains(&"shop/frontend-public".to_string())
    );
}

#[test]
fn a_destination_rule_in_another_namespace_for_the_host_blocks() {
    let mut w = fresh_world();
    w.drs.push(dr_in(
        "payments",
        "frontend-tls",
        json!({"host": FQDN, "trafficPolicy": {}}),
    ));
    let p = w.plan();
    assert_blocked(&p, "ShadowingDestinationRule");
    assert_only_pod_labels(&p);
}

#[test]
fn a_destination_rule_in_the_istio_root_namespace_does_not_block() {
    let mut w = fresh_world();
    w.drs
        .push(dr_in("istio-system", "mesh-default", json!({"host": FQDN})));
    let p = w.plan();
    assert_ne!(p.status.phase, Some(Phase::Blocked), "{p:#?}");
    assert!(patch_of(&p, MeshKind::DestinationRule, "frontend").is_some());
}

/// No mesh write, no clone write: a configuration that would empty a subset is refused before
/// anything changes.
fn assert_no_mesh_or_clone_write(p: &Plan) {
    assert!(
        p.actions
            .iter()
            .all(|a| matches!(a, Action::LabelPod { .. } | Action::AddFinalizer)),
        "{:#?}",
        p.actions
    );
}

#[test]
fn pod_labels_that_override_a_key_the_service_selects_on_block_before_any_write() {
    // The Service selects tier=web; podLabels would give the clone tier=recording: its pods
    // would never be endpoints, and the recording subset would have no upstream.
    let mut w = fresh_world().with_canary(canary().spec(
        "sidecar",
        json!({"podLabels": {"tier": "recording", "extra": "yes"}}),
    ));
    w.service_selector.insert("tier".into(), "web".into());
    let p = w.plan();
    assert_blocked(&p, "CloneNotSelectedByService");
    assert_no_mesh_or_clone_write(&p);
    assert!(
        p.status
            .conditions
            .iter()
            .any(|c| c.message.contains("tier=web"))
    );
    // A podLabels key the Service does not select on is fine.
    let mut w =
        fresh_world().with_canary(canary().spec("sidecar", json!({"podLabels": {"extra": "yes"}})));
    w.service_selector.insert("tier".into(), "web".into());
    assert_ne!(w.plan().status.phase, Some(Phase::Blocked));
}

#[test]
fn a_service_selecting_on_the_role_label_blocks_and_no_pod_is_labelled_or_unlabelled() {
    let mut w = fresh_world();
    w.service_selector
        .insert(ROLE_LABEL.into(), ROLE_STABLE.into());
    let p = w.plan();
    assert_blocked(&p, "ServiceSelectsRoleLabel");
    assert!(
        p.actions.iter().all(|a| matches!(a, Action::AddFinalizer)),
        "{:#?}",
        p.actions
    );
    // Rollback leaves the label alone too: removing it would take the pods out of the Service.
    let mut w = serving_world(10);
    w.service_selector
        .insert(ROLE_LABEL.into(), ROLE_STABLE.into());
    w.canary.metadata.deletion_timestamp = Some(Time(at(-10)));
    w.vss = vec![user_vs()];
    w.drs = vec![user_dr()];
    w.clone = None;
    let p = w.plan();
    assert!(
        !has(&p, |a| matches!(a, Action::UnlabelPod { .. })),
        "{:#?}",
        p.actions
    );
    assert!(has(&p, |a| matches!(a, Action::RemoveFinalizer)));
}

#[test]
fn a_target_whose_template_carries_the_role_label_blocks_and_its_pods_are_never_relabelled() {
    // Relabelling would take each pod out of its ReplicaSet's selector (an endless stream of
    // replacement pods), and rollback would orphan every target pod.
    let mut w = fresh_world();
    let mut t = target(4);
    if let Some(spec) = t.spec.as_mut() {
        spec.template
            .metadata
            .get_or_insert_with(Default::default)
            .labels
            .get_or_insert_with(Default::default)
            .insert(ROLE_LABEL.into(), "web".into());
    }
    w.target = Some(t.clone());
    w.pods = vec![target_pod("frontend-7d9f-a").role("web").build()];
    let p = w.plan();
    assert_blocked(&p, "TargetCarriesRoleLabel");
    assert!(
        p.actions.iter().all(|a| matches!(a, Action::AddFinalizer)),
        "{:#?}",
        p.actions
    );
    // Rollback: the label is the template's, never removed.
    let mut w = serving_world(10);
    w.target = Some(t);
    w.canary.metadata.deletion_timestamp = Some(Time(at(-10)));
    w.vss = vec![user_vs()];
    w.drs = vec![user_dr()];
    w.clone = None;
    let p = w.plan();
    assert!(
        !has(&p, |a| matches!(a, Action::UnlabelPod { .. })),
        "{:#?}",
        p.actions
    );
}

#[test]
fn a_target_that_needs_privileges_blocks_before_a_clone_is_created() {
    for (what, spec) in [
        (
            "hostNetwork",
            json!({"hostNetwork": true, "containers": [{"name": "app", "image": "a"}]}),
        ),
        (
            "hostPath volumes",
            json!({"volumes": [{"name": "v", "hostPath": {"path": "/"}}],
                                    "containers": [{"name": "app", "image": "a"}]}),
        ),
        (
            "a privileged container (app)",
            json!({"containers": [{"name": "app", "image": "a",
                                    "securityContext": {"privileged": true}}]}),
        ),
        (
            "added capabilities (init)",
            json!({"containers": [{"name": "app", "image": "a"}],
                                    "initContainers": [{"name": "init", "image": "a",
                                    "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}}]}),
        ),
    ] {
        let mut w = fresh_world();
        let mut t = target(4);
        if let Some(s) = t.spec.as_mut() {
            s.template.spec = Some(serde_json::from_value(spec).expect("pod spec"));
        }
        w.target = Some(t);
        let p = w.plan();
        assert_blocked(&p, "PrivilegedTarget");
        assert!(
            ready_message(&p).contains(what),
            "{what}: {}",
            ready_message(&p)
        );
        assert_no_mesh_or_clone_write(&p);
    }
}

#[test]
fn an_adopted_destination_rule_exported_more_narrowly_than_the_routes_blocks() {
    // Clients outside the namespace would see the split routes but not the subsets: 503 NC.
    let mut w = fresh_world();
    w.drs[0]["spec"]["exportTo"] = json!(["."]);
    let p = w.plan();
    assert_blocked(&p, "DestinationRuleNotExported");
    assert_no_mesh_or_clone_write(&p);
    // The VirtualService seen as narrowly (or more): fine.
    for vs_export in [json!(["."]), json!(["~"])] {
        let mut w = fresh_world();
        w.drs[0]["spec"]["exportTo"] = json!(["."]);
        w.vss[0]["spec"]["exportTo"] = vs_export.clone();
        let p = w.plan();
        assert_ne!(p.status.phase, Some(Phase::Blocked), "{vs_export}: {p:#?}");
    }
    // A DR exported to a list that holds every namespace of the VS's list: fine; one missing: not.
    let mut w = fresh_world();
    w.drs[0]["spec"]["exportTo"] = json!([".", "istio-system"]);
    w.vss[0]["spec"]["exportTo"] = json!(["istio-system", "shop"]);
    assert_ne!(w.plan().status.phase, Some(Phase::Blocked));
    w.vss[0]["spec"]["exportTo"] = json!(["istio-system", "shop", "edge"]);
    assert_blocked(&w.plan(), "DestinationRuleNotExported");
}

#[test]
fn a_root_namespace_destination_rule_for_the_host_blocks_when_gateways_are_listed() {
    // The ingress gateways run in the root namespace: its DestinationRule is theirs first.
    let mut w =
        fresh_world().with_canary(canary().spec("gateways", json!(["istio-system/public"])));
    w.vss.push(vs(
        "frontend-public",
        json!({"hosts": ["shop.example.com"], "gateways": ["istio-system/public"],
               "http": [{"route": [{"destination": {"host": FQDN}}]}]}),
    ));
    w.drs
        .push(dr_in("istio-system", "mesh-default", json!({"host": FQDN})));
    let p = w.plan();
    assert_blocked(&p, "RootDestinationRuleForGateways");
    assert_no_mesh_or_clone_write(&p);
}

#[test]
fn a_propagation_delay_of_zero_is_refused() {
    // It would turn make-before-break off: the routes would follow the subsets at once.
    for d in ["0s", "0ms", "0m0s"] {
        let w = fresh_world().with_canary(canary().delay(d));
        let p = w.plan();
        assert_blocked(&p, "InvalidSpec");
        assert!(ready_message(&p).contains("propagationDelay"), "{d}");
    }
}

#[test]
fn max_replicas_below_the_proportional_size_caps_the_weight_at_what_they_carry() {
    // 50 % of a 100-replica target on at most 2 replicas: 2 % is what they carry, not 50.
    let c = canary().percent(50).max_replicas(2).status(status(
        Phase::Progressing,
        "WaitingForClone",
        0,
    ));
    let mut w = waiting_for_clone_world().with_canary(c);
    w.target = Some(target(100));
    let p = w.plan();
    assert_eq!(vs_weight_after(&w, &p), Some(vec![98, 2]));
    assert_eq!(ready_reason(&p), "LimitedByMaxReplicas");
    assert_eq!(p.status.clone_replicas, 2);
    assert!(
        p.events
            .iter()
            .any(|e| e.warning && e.reason == "LimitedByMaxReplicas"),
        "{:?}",
        p.events
    );
    // A canary serving 50 % whose target grows past what maxReplicas carry is brought down.
    let mut w = serving_world(50).with_canary(canary().percent(50).max_replicas(2).status(status(
        Phase::Ready,
        "TargetReached",
        50,
    )));
    w.target = Some(target(100));
    let p = w.plan();
    assert_eq!(vs_weight_after(&w, &p), Some(vec![98, 2]));
}

#[test]
fn a_users_destination_rule_that_already_holds_our_subsets_is_never_written_nor_stripped() {
    // Committed to git with the subsets (so that a GitOps tool does not fight) and a policy on
    // one of them: the canary uses them as they are, and rollback leaves them.
    let mut d = user_dr();
    d["spec"]["subsets"] = json!([
        {"name": STABLE_SUBSET, "labels": {ROLE_LABEL: ROLE_STABLE},
         "trafficPolicy": {"outlierDetection": {"consecutive5xxErrors": 3}}},
        {"name": RECORDING_SUBSET, "labels": {ROLE_LABEL: ROLE_RECORDING}}
    ]);
    let mut w = subsets_world();
    w.drs = vec![d.clone()];
    let p = w.plan();
    assert!(!has(&p, is_dr_write), "{:#?}", p.actions);
    // Rollback of a split that used them: the routes go back, the DestinationRule stays.
    let mut w = serving_world(10);
    w.drs = vec![d];
    w.canary.metadata.deletion_timestamp = Some(Time(at(-10)));
    w.vss = vec![user_vs()];
    w.canary.status = Some(RecordingCanaryStatus {
        routes_removed_time: Some(rfc(at(-3600))),
        ..status(Phase::Terminating, "RolledBack", 0)
    });
    let p = w.plan();
    assert!(
        has(&p, |a| matches!(a, Action::RemoveFinalizer)),
        "{:#?}",
        p.actions
    );
    assert!(!has(&p, is_dr_write), "{:#?}", p.actions);
}

#[test]
fn only_the_missing_subset_is_added_and_only_it_is_removed_on_rollback() {
    let users = json!({"name": STABLE_SUBSET, "labels": {ROLE_LABEL: ROLE_STABLE},
                       "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"}}});
    let mut d = user_dr();
    d["spec"]["subsets"] = json!([users.clone()]);
    let mut w = fresh_world();
    w.drs = vec![d.clone()];
    let p = w.plan();
    let added = apply_ops(
        &d,
        patch_of(&p, MeshKind::DestinationRule, "frontend").expect("DR write"),
    );
    assert_eq!(
        added["spec"]["subsets"][0], users,
        "the user's subset untouched"
    );
    assert_eq!(added["spec"]["subsets"][1]["name"], RECORDING_SUBSET);
    let note = istio::parse_dr_restore_note(istio::restore_note_of(&added));
    assert_eq!(note.added, [RECORDING_SUBSET]);
    // Rollback takes out what was added, nothing else.
    let mut w = serving_world(10);
    w.drs = vec![added];
    w.canary.metadata.deletion_timestamp = Some(Time(at(-10)));
    w.vss = vec![user_vs()];
    w.canary.status = Some(RecordingCanaryStatus {
        routes_removed_time: Some(rfc(at(-3600))),
        ..status(Phase::Terminating, "RolledBack", 0)
    });
    let p = w.plan();
    let after = apply_ops(
        &w.drs[0],
        patch_of(&p, MeshKind::DestinationRule, "frontend").expect("DR restore"),
    );
    assert_eq!(after, d);
}

#[test]
fn our_own_destination_rule_carries_the_policy_of_the_wildcard_one_it_displaces() {
    // Without a DestinationRule for the host, the most specific wildcard one applies to it (its
    // namespace's before the root namespace's); the exact-host DR the canary creates would drop
    // its connection pools, outlier detection and mTLS for this host.
    let ns_policy = json!({"connectionPool": {"http": {"http1MaxPendingRequests": 7}},
                           "tls": {"mode": "ISTIO_MUTUAL"}});
    let mut w = fresh_world();
    w.drs = vec![
        dr_in(
            "istio-system",
            "mesh-wide",
            json!({"host": "*.local", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}}),
        ),
        dr_in(
            NS,
            "shop-wide",
            json!({"host": "*.shop.svc.cluster.local", "trafficPolicy": ns_policy}),
        ),
        dr_in(
            NS,
            "other-app",
            json!({"host": "*.cart.svc.cluster.local", "trafficPolicy": {"tls": {"mode": "DISABLE"}}}),
        ),
    ];
    let p = w.plan();
    let created = p
        .actions
        .iter()
        .find_map(|a| match a {
            Action::CreateMesh {
                kind: MeshKind::DestinationRule,
                object,
            } => Some(object.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{:#?}", p.actions));
    assert_eq!(created["spec"]["trafficPolicy"], ns_policy);
    assert!(
        event_reasons(&p).contains(&"TrafficPolicyCarried"),
        "{:?}",
        p.events
    );
    // The namespace's wildcard DR gone: the root namespace's applies, and ours follows it.
    let ours = owned(dr_in(
        NS,
        "rec-recording",
        json!({"host": FQDN, "subsets": istio::our_subsets(), "trafficPolicy": ns_policy}),
    ));
    let mut w = serving_world(10);
    w.drs = vec![
        ours.clone(),
        dr_in(
            "istio-system",
            "mesh-wide",
            json!({"host": "*.local", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}}),
        ),
    ];
    let p = w.plan();
    let after = apply_ops(
        &ours,
        patch_of(&p, MeshKind::DestinationRule, "rec-recording").expect("policy sync"),
    );
    assert_eq!(
        after["spec"]["trafficPolicy"],
        json!({"tls": {"mode": "ISTIO_MUTUAL"}})
    );
    assert_eq!(after["spec"]["subsets"], json!(istio::our_subsets()));
}

#[test]
fn a_wildcard_destination_rule_with_tls_other_than_istio_mutual_blocks_instead_of_being_carried() {
    let mut w = fresh_world();
    w.drs = vec![dr_in(
        NS,
        "shop-wide",
        json!({"host": "*.shop.svc.cluster.local",
        "trafficPolicy": {"portLevelSettings": [{"port": {"number": 80}, "tls": {"mode": "DISABLE"}}]}}),
    )];
    let p = w.plan();
    assert_blocked(&p, "WildcardDestinationRuleTls");
    assert_no_mesh_or_clone_write(&p);
    // A wildcard DR with a workloadSelector applies to some workloads only: not carried.
    let mut w = fresh_world();
    w.drs = vec![dr_in(
        NS,
        "shop-wide",
        json!({"host": "*.shop.svc.cluster.local",
        "workloadSelector": {"matchLabels": {"app": "x"}}, "trafficPolicy": {"tls": {"mode": "DISABLE"}}}),
    )];
    assert_ne!(w.plan().status.phase, Some(Phase::Blocked));
}

#[test]
fn a_virtual_service_named_in_the_spec_that_does_not_exist_blocks() {
    let w = fresh_world().with_canary(canary().spec("virtualService", json!("nope")));
    let p = w.plan();
    assert_blocked(&p, "VirtualServiceNotFound");
    assert_only_pod_labels(&p);
}

#[test]
fn a_virtual_service_split_by_another_canary_blocks() {
    let mut w = subsets_world();
    let mut other = split_vs(10);
    other["metadata"]["annotations"][RESTORE_ANNOTATION] =
        json!(json!({"canary": "other", "weights": [null]}).to_string());
    w.vss = vec![other];
    let p = w.plan();
    assert_blocked(&p, "Conflict");
    assert_only_pod_labels(&p);
}

#[test]
fn a_foreign_subset_with_our_name_blocks() {
    let mut w = fresh_world();
    w.drs[0]["spec"]["subsets"] = json!([{"name": STABLE_SUBSET, "labels": {"version": "v1"}}]);
    let p = w.plan();
    assert_blocked(&p, "SubsetNameTaken");
    assert!(!has(&p, is_mesh_write));
}

#[test]
fn a_virtual_service_without_a_route_to_the_service_blocks() {
    let mut w = fresh_world();
    w.vss[0]["spec"]["http"] = json!([{"route": [{"destination": {"host": "backend"}}]}]);
    let p = w.plan();
    assert_blocked(&p, "NoRouteToService");
    assert_only_pod_labels(&p);
}

// ---------------------------------------------------------------------------------------------
// 4. Make before break
// ---------------------------------------------------------------------------------------------

#[test]
fn subsets_reach_the_dr_before_any_route_uses_them() {
    let w = fresh_world();
    let p = w.plan();
    assert!(has(&p, is_dr_write), "DR patch: {:#?}", p.actions);
    assert!(
        !has(&p, is_vs_write),
        "no VS write in the same pass: {:#?}",
        p.actions
    );
    assert!(created_clone(&p).is_none());
    assert_eq!(p.status.subsets_added_time, Some(rfc(at(0))));
    let rq = p.requeue_after.expect("requeue");
    assert!(
        rq <= Duration::from_secs(3) && rq > Duration::ZERO,
        "{rq:?}"
    );
    assert_eq!(ready_reason(&p), "AddingSubsets");
}

#[test]
fn the_vs_waits_a_full_propagation_delay_after_the_subsets() {
    let mut w = subsets_world();
    w.canary = canary()
        .delay("3s")
        .status(RecordingCanaryStatus {
            subsets_added_time: Some(rfc(at(0))),
            ..status(Phase::Progressing, "AddingSubsets", 0)
        })
        .build();
    w.now = at_ms(2_999);
    let p = w.plan();
    assert!(!has(&p, is_vs_write));
    assert!(created_clone(&p).is_none());
    assert_eq!(
        p.requeue_after,
        Some(Duration::from_millis(100)),
        "rounded up to the minimum"
    );
    w.now = at_ms(1_000);
    assert_eq!(w.plan().requeue_after, Some(Duration::from_secs(2)));
    w.now = at(3);
    let p = w.plan();
    assert!(
        patch_of(&p, MeshKind::VirtualService, "frontend").is_some(),
        "{:#?}",
        p.actions
    );
}

#[test]
fn a_restarted_controller_waits_the_propagation_delay_from_its_start() {
    let mut w = subsets_world();
    w.canary = canary()
        .status(RecordingCanaryStatus {
            subsets_added_time: Some(rfc(at(0))),
            ..status(Phase::Progressing, "AddingSubsets", 0)
        })
        .build();
    w.started = at(2);
    w.now = at(3);
    let p = w.plan();
    assert!(!has(&p, is_vs_write));
    assert_eq!(p.requeue_after, Some(Duration::from_secs(2)));
    w.now = at(5);
    assert!(has(&w.plan(), is_vs_write));
}

#[test]
fn the_first_split_sends_nothing_to_the_clone_and_creates_it_after_the_vs_patch() {
    let w = subsets_world();
    let p = w.plan();
    let vs_at = pos(&p, is_vs_write).expect("VS patch");
    let clone_at = pos(&p, |a| matches!(a, Action::CreateClone(_))).expect("clone created");
    assert!(vs_at < clone_at, "{:#?}", p.actions);
    let after = apply_ops(
        &w.vss[0],
        patch_of(&p, MeshKind::VirtualService, "frontend").unwrap(),
    );
    assert_eq!(weights(&after, 0), vec![100, 0]);
    assert_eq!(p.status.current_percent, 0);
    assert_eq!(ready_reason(&p), "WaitingForClone");
    assert!(
        p.events.is_empty(),
        "a split at 0% and a clone being created are no transition: {:?}",
        p.events
    );
    assert_eq!(
        created_clone(&p).unwrap().spec.as_ref().unwrap().replicas,
        Some(1),
        "ceil(4 x 10 / 100)"
    );
}

#[test]
fn a_clone_without_a_ready_replica_gets_no_weight() {
    let mut w = waiting_for_clone_world();
    w = w.clone_ready(0);
    w.pods
        .push(clone_pod("frontend-recording-5c4b-a").not_ready().build());
    let p = w.plan();
    assert!(!has(&p, is_vs_write), "{:#?}", p.actions);
    assert_eq!(p.status.phase, Some(Phase::Progressing));
    assert_eq!(ready_reason(&p), "WaitingForClone");
    assert!(p.events.is_empty(), "no transition: {:?}", p.events);
}

#[test]
fn weight_goes_to_the_clone_once_it_has_a_ready_replica() {
    let w = waiting_for_clone_world();
    let p = w.plan();
    let after = apply_ops(
        &w.vss[0],
        patch_of(&p, MeshKind::VirtualService, "frontend").unwrap(),
    );
    assert_eq!(weights(&after, 0), vec![90, 10]);
    assert_eq!(p.status.current_percent, 10);
    assert_eq!(p.status.phase, Some(Phase::Ready));
    assert_eq!(event_reasons(&p), vec!["RoutesSplit", "TargetReached"]);
}

#[test]
fn a_ready_clone_pod_gets_the_weight_before_its_deployment_status_says_so() {
    // The kube-controller-manager's deployment controller writes `readyReplicas` a pass of its
    // work queue after the pod is Ready: minutes, when thousands of Deployments change at once.
    let mut w = waiting_for_clone_world();
    w = w.clone_ready(1);
    if let Some(st) = w.clone.as_mut().and_then(|c| c.status.as_mut()) {
        st.ready_replicas = None;
    }
    let p = w.plan();
    let after = apply_ops(
        &w.vss[0],
        patch_of(&p, MeshKind::VirtualService, "frontend").expect("the split"),
    );
    assert_eq!(weights(&after, 0), vec![90, 10]);
    assert_eq!(p.status.clone_ready_replicas, 1);
}

#[test]
fn a_clone_whose_status_still_says_ready_but_whose_pods_are_not_gets_no_weight() {
    // The other way round: the pod stopped being Ready (or is being deleted) and the
    // Deployment's status has not caught up. The weight drains at once.
    for how in ["not-ready", "terminating", "gone"] {
        let mut w = serving_world(10).clone_ready(0);
        if let Some(st) = w.clone.as_mut().and_then(|c| c.status.as_mut()) {
            st.ready_replicas = Some(4);
        }
        match how {
            "not-ready" => w
                .pods
                .push(clone_pod("frontend-recording-5c4b-a").not_ready().build()),
            "terminating" => w
                .pods
                .push(clone_pod("frontend-recording-5c4b-a").terminating().build()),
            _ => {}
        }
        let p = w.plan();
        assert_eq!(vs_weight_after(&w, &p), Some(vec![100, 0]), "{how}");
        assert_eq!(ready_reason(&p), "CloneNotReady", "{how}");
        assert_eq!(p.status.clone_ready_replicas, 0, "{how}");
    }
}

/// The serving pods of the target alone: the Service's Ready endpoints before any clone pod
/// is one.
fn target_endpoints(w: &World) -> BTreeSet<String> {
    w.pods
        .iter()
        .filter(|p| p.serving() && pod_of_deployment(p, TARGET))
        .filter_map(|p| p.metadata.name.clone())
        .collect()
}

#[test]
fn a_ready_clone_pod_gets_no_weight_until_it_is_a_ready_endpoint_of_the_service() {
    // The mesh routes to EndpointSlice endpoints, which the endpoint-slice controller writes
    // after the pod is Ready: weight before that is answered with 503 (no healthy upstream).
    let mut w = waiting_for_clone_world();
    w.endpoints = Some(target_endpoints(&w));
    let p = w.plan();
    assert!(!has(&p, is_vs_write), "{:#?}", p.actions);
    assert_eq!(p.status.current_percent, 0);
    assert_eq!(p.status.clone_ready_replicas, 0);
    assert_eq!(ready_reason(&p), "WaitingForCloneEndpoints");
    assert_eq!(p.status.phase, Some(Phase::Progressing));
    // One clone pod listed as a Ready endpoint: the weight goes to what one replica carries.
    let mut eps = target_endpoints(&w);
    eps.insert(format!("frontend-recording-5c4b-{}", pod_suffix(0)));
    w.endpoints = Some(eps);
    let p = w.plan();
    assert_eq!(vs_weight_after(&w, &p), Some(vec![90, 10]));
    assert_eq!(p.status.clone_ready_replicas, 1);
}

#[test]
fn the_weight_rises_only_as_far_as_the_clones_ready_endpoints_carry_it() {
    // 4 Ready clone pods, 1 of them an endpoint: the capacity is one replica's worth.
    let mut w = waiting_for_clone_world().with_canary(canary().percent(100).status(status(
        Phase::Progressing,
        "WaitingForClone",
        0,
    )));
    let mut eps = target_endpoints(&w);
    eps.insert(format!("frontend-recording-5c4b-{}", pod_suffix(0)));
    w.endpoints = Some(eps);
    let p = w.plan();
    // Target of 4: one replica carries 25 %.
    assert_eq!(vs_weight_after(&w, &p), Some(vec![75, 25]));
    assert_eq!(ready_reason(&p), "WaitingForCloneCapacity");
}

#[test]
fn a_serving_clone_whose_pods_stop_being_endpoints_is_drained() {
    let mut w = serving_world(10);
    w.endpoints = Some(target_endpoints(&w));
    let p = w.plan();
    assert_eq!(vs_weight_after(&w, &p), Some(vec![100, 0]));
    assert_eq!(ready_reason(&p), "CloneNotAnEndpoint");
    assert_eq!(p.status.phase, Some(Phase::Degraded));
}

#[test]
fn the_split_waits_until_a_stable_pod_is_a_ready_endpoint_of_the_service() {
    // The stable subset needs an upstream too: labelled, Ready target pods that the Service's
    // EndpointSlices do not list yet.
    let mut w = subsets_world();
    w.endpoints = Some(BTreeSet::new());
    let p = w.plan();
    assert!(!has(&p, is_vs_write), "{:#?}", p.actions);
    assert_eq!(ready_reason(&p), "WaitingForStableEndpoints");
    w.endpoints = None;
    let p = w.plan();
    assert!(has(&p, is_vs_write), "{:#?}", p.actions);
}

#[test]
fn a_sick_clone_is_drained_from_a_virtual_service_whose_first_split_route_gives_the_host_weight_0()
{
    // A "dark" route first (the host at weight 0 beside a new version), then the default route:
    // the percent read from the first pair is 0, but the later route still sends 10 % to the
    // clone, which must be drained whatever blocks.
    let spec = json!({"hosts": ["frontend"], "http": [
        {"name": "dark", "match": [{"headers": {"x-dark": {"exact": "1"}}}], "route": [
            {"destination": {"host": "frontend", "subset": STABLE_SUBSET}, "weight": 0},
            {"destination": {"host": "frontend", "subset": RECORDING_SUBSET}, "weight": 0},
            {"destination": {"host": "frontend-v2"}, "weight": 100}]},
        {"name": "default", "route": [
            {"destination": {"host": "frontend", "subset": STABLE_SUBSET}, "weight": 90},
            {"destination": {"host": "frontend", "subset": RECORDING_SUBSET}, "weight": 10}]}
    ]});
    let mut user = vs("frontend", spec);
    user["metadata"]["annotations"] =
        json!({RESTORE_ANNOTATION: json!({"canary": CANARY, "weights": [0, null]}).to_string()});
    let mut w = serving_world(10);
    w.vss = vec![user];
    // Blocked (an unknown VirtualService named in the spec) with a crash-looping clone.
    w.canary.spec.virtual_service = Some("missing".into());
    let w = sicken(&w, "crash-looping").expect("sick");
    let p = w.plan();
    let ops = patch_of(&p, MeshKind::VirtualService, "frontend")
        .unwrap_or_else(|| panic!("no drain: {:#?}", p.actions));
    let after = apply_ops(&w.vss[0], ops);
    assert_eq!(weights(&after, 1), vec![100, 0], "{after:#}");
    assert!(event_reasons(&p).contains(&"TrafficDrained"));
}

#[test]
fn missing_subsets_are_added_back_before_the_vs_moves() {
    // Someone removed our subsets from the DR while the VS is split.
    let mut w = serving_world(10);
    w.drs = vec![user_dr()];
    let p = w.plan();
    let dr = pos(&p, is_dr_write).expect("DR patch");
    assert_eq!(p.status.subsets_added_time, Some(rfc(at(0))));
    if let Some(v) = pos(&p, is_vs_write) {
        assert!(dr < v);
    }
}

// ---------------------------------------------------------------------------------------------
// 4b. Observed propagation: Istio's Reconciled condition ends the wait early
// ---------------------------------------------------------------------------------------------

/// `obj` at `generation`, with the status istiod writes: `observedGeneration` (a string, as
/// protojson writes an int64, or a number) and a `Reconciled` condition.
fn istio_reported(mut obj: Value, generation: i64, observed: Value, cond: &str) -> Value {
    obj["metadata"]["generation"] = json!(generation);
    obj["status"] = json!({
        "observedGeneration": observed,
        "conditions": [{"type": "Reconciled", "status": cond, "message": "3/3 proxies up to date."}],
    });
    obj
}

/// Subsets added at 0 with `propagationDelay` `delay`, pods labelled, VS not split; now is 1 s.
fn waiting_world(delay: &str) -> World {
    let mut w = subsets_world();
    w.canary = canary()
        .delay(delay)
        .status(RecordingCanaryStatus {
            subsets_added_time: Some(rfc(at(0))),
            ..status(Phase::Progressing, "AddingSubsets", 0)
        })
        .build();
    w.now = at(1);
    w
}

#[test]
fn without_istio_status_the_split_waits_the_full_propagation_delay() {
    let mut w = waiting_world("60s");
    let p = w.plan();
    assert!(!has(&p, is_vs_write), "{:#?}", p.actions);
    assert_eq!(p.requeue_after, Some(Duration::from_secs(59)));
    assert_eq!(ready_reason(&p), "AddingSubsets");
    assert_eq!(p.status.last_propagation_wait, None);
    w.now = at(60);
    let p = w.plan();
    assert!(has(&p, is_vs_write), "{:#?}", p.actions);
    assert_eq!(
        p.status.last_propagation_wait,
        Some(PropagationWait::PropagationDelay)
    );
}

#[test]
fn the_split_goes_in_as_soon_as_istio_reports_the_destination_rule_reconciled_for_its_generation() {
    for observed in [json!("2"), json!(2)] {
        let mut w = waiting_world("60s");
        w.drs = vec![istio_reported(split_dr(), 2, observed.clone(), "True")];
        let p = w.plan();
        assert!(
            patch_of(&p, MeshKind::VirtualService, "frontend").is_some(),
            "observedGeneration {observed}: {:#?}",
            p.actions
        );
        assert_eq!(
            p.status.last_propagation_wait,
            Some(PropagationWait::IstioReconciled)
        );
        assert_ne!(ready_reason(&p), "AddingSubsets");
    }
}

#[test]
fn an_older_generation_or_a_condition_not_true_does_not_end_the_wait() {
    for dr in [
        istio_reported(split_dr(), 3, json!("2"), "True"),
        istio_reported(split_dr(), 3, json!(2), "True"),
        istio_reported(split_dr(), 2, json!("2"), "False"),
        istio_reported(split_dr(), 2, json!("2"), "Unknown"),
    ] {
        let mut w = waiting_world("60s");
        w.drs = vec![dr.clone()];
        let p = w.plan();
        assert!(!has(&p, is_vs_write), "{}: {:#?}", dr["status"], p.actions);
        assert_eq!(p.requeue_after, Some(Duration::from_secs(59)));
        assert_eq!(ready_reason(&p), "AddingSubsets");
    }
}

#[test]
fn the_condition_of_a_destination_rule_without_our_subsets_never_counts() {
    // The user's DR, reported Reconciled before the subsets go in: this plan adds them, and the
    // revision that will hold them is reported on by nobody yet.
    let mut w = fresh_world();
    w.pods = subsets_world().pods;
    w.drs = vec![istio_reported(user_dr(), 1, json!("1"), "True")];
    let p = w.plan();
    assert!(has(&p, is_dr_write), "{:#?}", p.actions);
    assert!(!has(&p, is_vs_write), "{:#?}", p.actions);
    assert_eq!(ready_reason(&p), "AddingSubsets");
}

#[test]
fn istio_reconciled_also_ends_the_wait_of_a_restarted_controller() {
    let mut w = waiting_world("3s");
    w.started = at(1);
    assert!(!has(&w.plan(), is_vs_write));
    w.drs = vec![istio_reported(split_dr(), 2, json!("2"), "True")];
    assert!(has(&w.plan(), is_vs_write));
}

#[test]
fn a_status_only_change_of_the_destination_rule_after_the_split_changes_nothing() {
    let mut prev = status(Phase::Ready, "TargetReached", 10);
    prev.last_propagation_wait = Some(PropagationWait::IstioReconciled);
    let mut w = serving_world(10);
    w.canary = canary().status(prev).build();
    let quiet = w.plan();
    for dr in [
        istio_reported(split_dr(), 2, json!("2"), "True"),
        istio_reported(split_dr(), 3, json!("2"), "False"),
    ] {
        w.drs = vec![dr];
        let p = w.plan();
        assert!(p.actions.is_empty(), "{:#?}", p.actions);
        assert!(p.events.is_empty(), "{:?}", p.events);
        assert_eq!(p.status, quiet.status, "no status write");
        assert_eq!(
            p.status.last_propagation_wait,
            Some(PropagationWait::IstioReconciled)
        );
    }
}

/// Rolling back: the user's VS restored at 0 (routes gone), with `propagationDelay` 60s, now 1s.
fn routes_removed_world() -> World {
    let mut w = deleting_world();
    w.canary = canary()
        .deleting()
        .delay("60s")
        .status(RecordingCanaryStatus {
            routes_removed_time: Some(rfc(at(0))),
            virtual_services: vec!["shop/frontend".into()],
            ..status(Phase::Terminating, "TargetReached", 0)
        })
        .build();
    w.vss = vec![user_vs()];
    w.now = at(1);
    w
}

#[test]
fn rollback_removes_the_subsets_once_istio_reports_the_restored_virtual_service_reconciled() {
    let mut w = routes_removed_world();
    let p = w.plan();
    assert!(p.actions.is_empty(), "{:#?}", p.actions);
    assert_eq!(p.requeue_after, Some(Duration::from_secs(59)));
    for observed in [json!("7"), json!(7)] {
        w.vss = vec![istio_reported(user_vs(), 7, observed, "True")];
        let p = w.plan();
        assert!(has(&p, is_dr_write), "{:#?}", p.actions);
        assert_eq!(p.actions.last(), Some(&Action::RemoveFinalizer));
        assert_eq!(
            p.status.last_propagation_wait,
            Some(PropagationWait::IstioReconciled)
        );
        let note = &p
            .events
            .iter()
            .find(|e| e.reason == "RolledBack")
            .unwrap()
            .note;
        assert!(note.contains("Istio reported"), "{note}");
    }
}

#[test]
fn rollback_keeps_the_subsets_while_istio_reports_an_older_generation_or_routes_to_them() {
    for v in [
        istio_reported(user_vs(), 8, json!("7"), "True"),
        istio_reported(user_vs(), 7, json!("7"), "False"),
        // Still routing to the subsets (another writer put the split back): never early.
        istio_reported(split_vs(10), 7, json!("7"), "True"),
    ] {
        let mut w = routes_removed_world();
        w.vss = vec![v.clone()];
        let p = w.plan();
        assert!(!has(&p, is_dr_write), "{}: {:#?}", v["status"], p.actions);
    }
}

#[test]
fn rollback_after_deleting_our_own_virtual_service_waits_the_propagation_delay() {
    // A deleted VirtualService has no status to report: only the delay tells.
    let mut w = routes_removed_world();
    w.vss = vec![];
    w.drs = vec![owned(dr_in(
        NS,
        "rec-recording",
        json!({"host": "frontend", "subsets": istio::our_subsets()}),
    ))];
    w.canary.status.as_mut().unwrap().virtual_services = vec!["shop/rec-recording".into()];
    let p = w.plan();
    assert!(p.actions.is_empty(), "{:#?}", p.actions);
    assert_eq!(p.requeue_after, Some(Duration::from_secs(59)));
    w.now = at(60);
    let p = w.plan();
    assert!(
        has(&p, |a| matches!(
            a,
            Action::DeleteMesh {
                kind: MeshKind::DestinationRule,
                ..
            }
        )),
        "{:#?}",
        p.actions
    );
    assert_eq!(
        p.status.last_propagation_wait,
        Some(PropagationWait::PropagationDelay)
    );
    let note = &p
        .events
        .iter()
        .find(|e| e.reason == "RolledBack")
        .unwrap()
        .note;
    assert!(note.contains("propagationDelay (1m)"), "{note}");
}

// ---------------------------------------------------------------------------------------------
// 5. Ramp
// ---------------------------------------------------------------------------------------------

fn ramp_world(vs_pct: i64, last_step: Option<i64>) -> World {
    let mut w = serving_world(30);
    w.vss = vec![split_vs(vs_pct)];
    w.canary = canary()
        .percent(30)
        .ramp(10, "30s")
        .status(RecordingCanaryStatus {
            last_step_time: last_step.map(|s| rfc(at(s))),
            ..status(Phase::Progressing, "Ramping", vs_pct as i32)
        })
        .build();
    w
}

fn vs_weight_after(w: &World, p: &Plan) -> Option<Vec<i64>> {
    patch_of(p, MeshKind::VirtualService, "frontend")
        .map(|ops| weights(&apply_ops(&w.vss[0], ops), 0))
}

#[test]
fn the_first_ramp_step_is_immediate() {
    let w = ramp_world(0, None);
    let p = w.plan();
    assert_eq!(vs_weight_after(&w, &p), Some(vec![90, 10]));
    assert_eq!(p.status.current_percent, 10);
    assert_eq!(p.status.last_step_time, Some(rfc(at(0))));
    assert_eq!(p.requeue_after, Some(Duration::from_secs(30)));
    assert_eq!(ready_reason(&p), "Ramping");
    assert_eq!(p.status.phase, Some(Phase::Progressing));
}

#[test]
fn the_ramp_waits_for_the_interval_between_steps() {
    let w = ramp_world(10, Some(-10));
    let p = w.plan();
    assert!(!has(&p, is_vs_write), "{:#?}", p.actions);
    assert_eq!(p.status.current_percent, 10);
    assert_eq!(p.status.last_step_time, Some(rfc(at(-10))));
    assert_eq!(p.requeue_after, Some(Duration::from_secs(20)));
}

#[test]
fn the_ramp_steps_after_the_interval_and_stops_at_the_target() {
    let w = ramp_world(10, Some(-30));
    let p = w.plan();
    assert_eq!(vs_weight_after(&w, &p), Some(vec![80, 20]));
    assert_eq!(p.requeue_after, Some(Duration::from_secs(30)));
    let w = ramp_world(20, Some(-30));
    let p = w.plan();
    assert_eq!(vs_weight_after(&w, &p), Some(vec![70, 30]));
    assert_eq!(p.status.phase, Some(Phase::Ready));
    assert_eq!(p.requeue_after, None, "no further step");
    // At the target, nothing moves any more.
    let w = ramp_world(30, Some(-300));
    let p = w.plan();
    assert!(!has(&p, is_vs_write));
    assert_eq!(p.status.current_percent, 30);
}

#[test]
fn the_last_ramp_step_does_not_overshoot() {
    let mut w = ramp_world(20, Some(-30));
    w.canary = canary()
        .percent(25)
        .ramp(10, "30s")
        .status(RecordingCanaryStatus {
            last_step_time: Some(rfc(at(-30))),
            ..status(Phase::Progressing, "Ramping", 20)
        })
        .build();
    let p = w.plan();
    assert_eq!(vs_weight_after(&w, &p), Some(vec![75, 25]));
}

#[test]
fn the_ramp_resumes_from_the_status_after_a_restart() {
    // Restarted a second ago: the interval still runs from status.lastStepTime.
    let mut w = ramp_world(10, Some(-31));
    w.started = at(-1);
    assert_eq!(vs_weight_after(&w, &w.plan()), Some(vec![80, 20]));
    let mut w = ramp_world(10, Some(-10));
    w.started = at(-1);
    let p = w.plan();
    assert!(!has(&p, is_vs_write));
    assert_eq!(p.requeue_after, Some(Duration::from_secs(20)));
}

#[test]
fn decreasing_the_percent_applies_at_once_even_with_a_ramp() {
    let mut w = ramp_world(30, Some(-1));
    w.canary = canary()
        .percent(5)
        .ramp(10, "30s")
        .status(RecordingCanaryStatus {
            last_step_time: Some(rfc(at(-1))),
            ..status(Phase::Ready, "TargetReached", 30)
        })
        .build();
    let p = w.plan();
    assert_eq!(vs_weight_after(&w, &p), Some(vec![95, 5]));
    assert_eq!(p.status.current_percent, 5);
}

#[test]
fn the_ramp_does_not_rise_while_the_clone_is_unhealthy() {
    let w = ramp_world(10, Some(-300)).clone_ready(0);
    let p = w.plan();
    assert_eq!(vs_weight_after(&w, &p), Some(vec![100, 0]));
    assert_eq!(
        p.status.last_step_time,
        Some(rfc(at(-300))),
        "no step taken"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. HPA
// ---------------------------------------------------------------------------------------------

#[test]
fn target_scaling_changes_clone_replicas_but_not_weights() {
    let mut w = serving_world(10);
    for (t, want) in [(20, 2), (4, 1), (35, 4)] {
        w.target = Some(target(t));
        let p = w.plan();
        assert!(!has(&p, is_mesh_write), "{:#?}", p.actions);
        assert_eq!(p.status.current_percent, 10);
        let scaled = p.actions.iter().find_map(|a| match a {
            Action::ScaleClone { replicas, .. } => Some(*replicas),
            _ => None,
        });
        if want == 1 {
            assert_eq!(scaled, None, "already at 1");
        } else {
            assert_eq!(scaled, Some(want), "target {t}");
        }
    }
}

#[test]
fn clone_replicas_are_the_ceiling_of_the_target_share() {
    for (t, p, max, want) in [
        (4, 10, None, 1),
        (10, 10, None, 1),
        (11, 10, None, 2),
        (7, 30, None, 3),
        (20, 50, None, 10),
        (20, 50, Some(2), 2),
        (1, 1, None, 1),
        (0, 10, None, 1),
        (3, 100, None, 3),
        (20, 0, None, 0),
    ] {
        assert_eq!(
            clone_replicas(t, p, p, max),
            want,
            "T={t} p={p} max={max:?}"
        );
    }
    // Through the planner: maxReplicas caps the clone.
    let mut w = serving_world(50);
    w.target = Some(target(20));
    w.canary = canary()
        .percent(50)
        .max_replicas(3)
        .status(status(Phase::Ready, "TargetReached", 50))
        .build();
    let p = w.plan();
    assert!(
        has(&p, |a| matches!(a, Action::ScaleClone { replicas: 3, .. })),
        "{:#?}",
        p.actions
    );
}

#[test]
fn percent_zero_scales_the_clone_to_zero_and_routes_nothing() {
    let mut w = serving_world(10);
    w.canary = canary()
        .percent(0)
        .status(status(Phase::Ready, "TargetReached", 10))
        .build();
    let p = w.plan();
    assert_eq!(vs_weight_after(&w, &p), Some(vec![100, 0]));
    assert!(
        has(&p, |a| matches!(a, Action::ScaleClone { replicas: 0, .. })),
        "{:#?}",
        p.actions
    );
    assert_eq!(p.status.clone_replicas, 0);
    assert_eq!(p.status.current_percent, 0);
    assert!(pos(&p, is_vs_write) < pos(&p, |a| matches!(a, Action::ScaleClone { .. })));
}

// ---------------------------------------------------------------------------------------------
// 7. Unhealthy clone
// ---------------------------------------------------------------------------------------------

#[test]
fn a_clone_that_loses_its_ready_replicas_gets_weight_zero_and_a_warning() {
    let w = serving_world(10).clone_ready(0);
    let p = w.plan();
    assert_eq!(vs_weight_after(&w, &p), Some(vec![100, 0]));
    assert_eq!(p.status.current_percent, 0);
    assert_eq!(p.status.phase, Some(Phase::Degraded));
    assert_eq!(ready_reason(&p), "CloneNotReady");
    assert!(
        p.events
            .iter()
            .any(|e| e.warning && e.reason == "CloneNotReady"),
        "{:?}",
        p.events
    );
    let degraded = p
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(degraded.status, "True");
}

#[test]
fn a_crash_looping_clone_gets_weight_zero_at_once() {
    let mut w = serving_world(10);
    w.pods.push(
        clone_pod("frontend-recording-5c4b-b")
            .crash_looping()
            .build(),
    );
    let p = w.plan();
    assert_eq!(vs_weight_after(&w, &p), Some(vec![100, 0]));
    assert_eq!(p.status.phase, Some(Phase::Degraded));
    assert_eq!(ready_reason(&p), "CloneCrashLooping");
    assert!(
        p.events
            .iter()
            .any(|e| e.warning && e.reason == "CloneCrashLooping"),
        "{:?}",
        p.events
    );
}

#[test]
fn a_crash_looping_target_pod_does_not_degrade_the_canary() {
    let mut w = serving_world(10);
    w.pods.push(
        target_pod("frontend-7d9f-c")
            .stable()
            .crash_looping()
            .build(),
    );
    let p = w.plan();
    assert!(!has(&p, is_vs_write));
    assert_eq!(p.status.phase, Some(Phase::Ready));
}

#[test]
fn a_degraded_clone_gets_its_weight_back_when_healthy() {
    let mut w = serving_world(10);
    w.vss = vec![split_vs(0)];
    w.canary = canary()
        .status(status(Phase::Degraded, "CloneNotReady", 0))
        .build();
    let p = w.plan();
    assert_eq!(vs_weight_after(&w, &p), Some(vec![90, 10]));
    assert_eq!(p.status.phase, Some(Phase::Ready));
    assert!(
        p.events
            .iter()
            .any(|e| !e.warning && e.reason == "TargetReached"),
        "{:?}",
        p.events
    );
}

#[test]
fn staying_degraded_repeats_no_event_and_no_write() {
    let mut w = serving_world(10).clone_ready(0);
    w.vss = vec![split_vs(0)];
    w.canary = canary()
        .status(status(Phase::Degraded, "CloneNotReady", 0))
        .build();
    let p = w.plan();
    assert!(p.actions.is_empty(), "{:#?}", p.actions);
    assert!(p.events.is_empty(), "{:?}", p.events);
    assert_eq!(p.status.phase, Some(Phase::Degraded));
}

// ---------------------------------------------------------------------------------------------
// 8. Rollback
// ---------------------------------------------------------------------------------------------

fn deleting_world() -> World {
    let mut w = serving_world(10);
    w.canary = canary()
        .deleting()
        .status(status(Phase::Ready, "TargetReached", 10))
        .build();
    w
}

#[test]
fn rollback_restores_the_vs_first_and_then_waits() {
    let w = deleting_world();
    let p = w.plan();
    assert_eq!(p.actions.len(), 1, "{:#?}", p.actions);
    assert!(
        matches!(&p.actions[0], Action::PatchMesh { kind: MeshKind::VirtualService, name, .. } if name == "frontend")
    );
    assert!(p.requeue_after.expect("requeue") >= Duration::from_secs(3));
    assert_eq!(p.status.phase, Some(Phase::Terminating));
    assert_eq!(p.status.current_percent, 0);
    assert_eq!(p.status.routes_removed_time, Some(rfc(at(0))));
    assert!(event_reasons(&p).contains(&"TrafficRestored"));
    assert!(event_reasons(&p).contains(&"RollbackStarted"));
}

#[test]
fn rollback_restores_the_user_vs_exactly() {
    // Split through the planner, then roll back through the planner.
    for original in [user_vs(), rich_user_vs()] {
        let mut w = serving_world(10);
        w.vss = vec![original.clone()];
        let p = w.plan();
        let split = apply_ops(
            &original,
            patch_of(&p, MeshKind::VirtualService, "frontend").unwrap(),
        );
        assert_ne!(split, original);
        let mut w = deleting_world();
        w.vss = vec![split];
        let p = w.plan();
        let restored = apply_ops(
            &w.vss[0],
            patch_of(&p, MeshKind::VirtualService, "frontend").unwrap(),
        );
        assert_eq!(restored, original);
    }
    // And the hand-written split fixture.
    let w = deleting_world();
    let p = w.plan();
    assert_eq!(
        apply_ops(
            &w.vss[0],
            patch_of(&p, MeshKind::VirtualService, "frontend").unwrap()
        ),
        user_vs()
    );
}

#[test]
fn rollback_waits_the_propagation_delay_before_removing_subsets() {
    let mut w = deleting_world();
    w.vss = vec![user_vs()];
    w.canary.status.as_mut().unwrap().routes_removed_time = Some(rfc(at(-1)));
    let p = w.plan();
    assert!(p.actions.is_empty(), "{:#?}", p.actions);
    assert_eq!(p.requeue_after, Some(Duration::from_secs(2)));
    assert_eq!(p.status.phase, Some(Phase::Terminating));
}

#[test]
fn a_restarted_controller_waits_again_before_removing_subsets() {
    let mut w = deleting_world();
    w.vss = vec![user_vs()];
    w.canary.status.as_mut().unwrap().routes_removed_time = Some(rfc(at(-10)));
    w.started = at(-1);
    let p = w.plan();
    assert!(p.actions.is_empty(), "{:#?}", p.actions);
    assert_eq!(p.requeue_after, Some(Duration::from_secs(2)));
}

#[test]
fn rollback_then_removes_subsets_deletes_the_clone_unlabels_pods_and_removes_the_finalizer_last() {
    let mut w = deleting_world();
    w.vss = vec![user_vs()];
    w.canary.status.as_mut().unwrap().routes_removed_time = Some(rfc(at(-3)));
    let p = w.plan();
    let dr = pos(&p, is_dr_write).expect("DR patch");
    let clone = pos(&p, |a| {
        *a == Action::DeleteClone {
            uid: "uid-clone".into(),
        }
    })
    .expect("DeleteClone");
    let unlabel: Vec<usize> = p
        .actions
        .iter()
        .enumerate()
        .filter(|(_, a)| matches!(a, Action::UnlabelPod { .. }))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(unlabel.len(), 2, "{:#?}", p.actions);
    assert!(
        dr < clone && unlabel.iter().all(|u| clone < *u),
        "{:#?}",
        p.actions
    );
    assert_eq!(p.actions.last(), Some(&Action::RemoveFinalizer));
    assert!(!has(&p, |a| *a
        == Action::UnlabelPod {
            name: "frontend-recording-5c4b-a".into()
        }));
    assert!(!has(&p, is_vs_write));
    assert!(event_reasons(&p).contains(&"RolledBack"));
}

#[test]
fn a_rollback_leaves_the_stable_labels_to_a_younger_canary_of_the_same_target() {
    // The younger one takes over once this one is gone; its split needs the labels (and the
    // chart's fences refuse their removal while a live canary targets the pods).
    let mut w = deleting_world();
    w.vss = vec![user_vs()];
    w.canary.status.as_mut().unwrap().routes_removed_time = Some(rfc(at(-3)));
    w.rivals = vec![rival("younger", 100)];
    let p = w.plan();
    assert!(
        !has(&p, |a| matches!(a, Action::UnlabelPod { .. })),
        "{:#?}",
        p.actions
    );
    assert_eq!(p.actions.last(), Some(&Action::RemoveFinalizer));
    // A younger one being deleted too takes nothing over: the labels go.
    w.rivals = vec![Rival {
        deleting: true,
        ..rival("younger", 100)
    }];
    assert!(has(&w.plan(), |a| matches!(a, Action::UnlabelPod { .. })));
}

#[test]
fn rollback_restores_the_user_dr_exactly() {
    // Subsets and annotations were absent: both go away again.
    let mut w = fresh_world();
    let original = user_dr();
    let added = apply_ops(
        &original,
        patch_of(&w.plan(), MeshKind::DestinationRule, "frontend").unwrap(),
    );
    assert!(added["metadata"]["annotations"].is_object());
    w = deleting_world();
    w.vss = vec![user_vs()];
    w.drs = vec![added];
    w.canary.status.as_mut().unwrap().routes_removed_time = Some(rfc(at(-3)));
    let p = w.plan();
    let restored = apply_ops(
        &w.drs[0],
        patch_of(&p, MeshKind::DestinationRule, "frontend").unwrap(),
    );
    assert_eq!(restored, original);
    assert!(restored["spec"].get("subsets").is_none());
    assert!(restored["metadata"].get("annotations").is_none());
}

#[test]
fn rollback_keeps_the_user_subsets_and_annotations_of_a_dr() {
    let mut original = user_dr();
    original["spec"]["subsets"] = json!([{"name": "v1", "labels": {"version": "v1"}}]);
    original["metadata"]["annotations"] = json!({"owner": "team-shop"});
    let mut w = fresh_world();
    w.drs = vec![original.clone()];
    let added = apply_ops(
        &original,
        patch_of(&w.plan(), MeshKind::DestinationRule, "frontend").unwrap(),
    );
    let mut w = deleting_world();
    w.vss = vec![user_vs()];
    w.drs = vec![added];
    w.canary.status.as_mut().unwrap().routes_removed_time = Some(rfc(at(-3)));
    let p = w.plan();
    let restored = apply_ops(
        &w.drs[0],
        patch_of(&p, MeshKind::DestinationRule, "frontend").unwrap(),
    );
    assert_eq!(restored, original);

    // An empty subsets list that was there stays there.
    let mut original = user_dr();
    original["spec"]["subsets"] = json!([]);
    let mut w = fresh_world();
    w.drs = vec![original.clone()];
    let added = apply_ops(
        &original,
        patch_of(&w.plan(), MeshKind::DestinationRule, "frontend").unwrap(),
    );
    let mut w = deleting_world();
    w.vss = vec![user_vs()];
    w.drs = vec![added];
    w.canary.status.as_mut().unwrap().routes_removed_time = Some(rfc(at(-3)));
    let p = w.plan();
    assert_eq!(
        apply_ops(
            &w.drs[0],
            patch_of(&p, MeshKind::DestinationRule, "frontend").unwrap()
        ),
        original
    );
}

#[test]
fn rollback_deletes_owned_vs_and_dr_instead_of_patching_them() {
    let mut w = deleting_world();
    let mut ovs = owned(vs(
        CANARY,
        json!({"hosts": [FQDN], "http": [{"route": [
            {"destination": {"host": FQDN, "subset": STABLE_SUBSET}, "weight": 90},
            {"destination": {"host": FQDN, "subset": RECORDING_SUBSET}, "weight": 10},
        ]}]}),
    ));
    ovs["metadata"]["uid"] = json!("uid-owned-vs");
    let mut odr = owned(dr_in(
        NS,
        CANARY,
        json!({"host": FQDN, "subsets": istio::our_subsets()}),
    ));
    odr["metadata"]["uid"] = json!("uid-owned-dr");
    w.vss = vec![ovs];
    w.drs = vec![odr];
    let p = w.plan();
    assert_eq!(
        p.actions,
        vec![Action::DeleteMesh {
            kind: MeshKind::VirtualService,
            name: CANARY.into(),
            uid: "uid-owned-vs".into()
        },]
    );
    w.vss.clear();
    w.canary.status.as_mut().unwrap().routes_removed_time = Some(rfc(at(-3)));
    let p = w.plan();
    assert_eq!(
        p.actions[0],
        Action::DeleteMesh {
            kind: MeshKind::DestinationRule,
            name: CANARY.into(),
            uid: "uid-owned-dr".into()
        }
    );
    assert!(!has(&p, |a| matches!(a, Action::PatchMesh { .. })));
    assert_eq!(p.actions.last(), Some(&Action::RemoveFinalizer));
}

#[test]
fn rollback_completes_when_everything_is_already_gone() {
    let w = World {
        canary: canary().deleting().build(),
        now: at(0),
        started: at(-3600),
        target: None,
        service: false,
        clone: None,
        pods: vec![],
        vss: vec![],
        drs: vec![],
        rivals: vec![],
        stable_labelling: StableLabelling::Controller,
        service_selector: BTreeMap::from([("app".to_string(), "frontend".to_string())]),
        endpoints: None,
    };
    let p = w.plan();
    assert_eq!(p.actions, vec![Action::RemoveFinalizer]);
    // Also with an invalid spec.
    let mut w2 = w.clone();
    w2.canary = canary().deleting().delay("abc").build();
    assert_eq!(w2.plan().actions, vec![Action::RemoveFinalizer]);
}

#[test]
fn rollback_leaves_a_clone_it_does_not_own_and_unrelated_objects() {
    let mut w = deleting_world();
    w.vss = vec![
        user_vs(),
        vs(
            "backend",
            json!({"hosts": ["backend"], "http": [{"route": [{"destination": {"host": "backend"}}]}]}),
        ),
    ];
    w.drs.push(dr_in(
        NS,
        "backend",
        json!({"host": "backend", "subsets": [{"name": "v1", "labels": {"v": "1"}}]}),
    ));
    w.canary.status.as_mut().unwrap().routes_removed_time = Some(rfc(at(-3)));
    w.clone
        .as_mut()
        .unwrap()
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert(CANARY_LABEL.into(), "someone-else".into());
    let p = w.plan();
    assert!(!has(&p, |a| matches!(a, Action::DeleteClone { .. })));
    assert!(patch_of(&p, MeshKind::DestinationRule, "backend").is_none());
    assert_eq!(p.actions.last(), Some(&Action::RemoveFinalizer));
}

#[test]
fn deletion_without_our_finalizer_plans_nothing() {
    let mut w = deleting_world();
    w.canary = canary().deleting().without_finalizer().build();
    let p = w.plan();
    assert!(p.actions.is_empty());
}

// ---------------------------------------------------------------------------------------------
// 9. Two canaries on one target
// ---------------------------------------------------------------------------------------------

fn rival(name: &str, created: i64) -> Rival {
    Rival {
        name: name.into(),
        created: Some(at(created)),
        target: TARGET.into(),
        service: TARGET.into(),
        deleting: false,
    }
}

#[test]
fn a_younger_canary_on_the_same_target_is_blocked_and_only_labels_the_targets_pods() {
    let mut w = fresh_world();
    w.rivals = vec![rival("alpha", -7200)];
    let p = w.plan();
    assert_blocked(&p, "Conflict");
    assert_only_pod_labels(&p);
    assert_eq!(labelled(&p).len(), 2, "{:#?}", p.actions);
    w.canary = canary().without_finalizer().build();
    let p = w.plan();
    assert_blocked(&p, "Conflict");
    assert_eq!(p.actions.first(), Some(&Action::AddFinalizer));
    assert_only_pod_labels(&Plan {
        actions: p.actions[1..].to_vec(),
        ..p.clone()
    });
}

#[test]
fn a_canary_for_the_same_service_conflicts_too() {
    let mut w = fresh_world();
    w.rivals = vec![Rival {
        target: "frontend-v2".into(),
        ..rival("alpha", -7200)
    }];
    assert_blocked(&w.plan(), "Conflict");
    // But not one for another target and Service.
    w.rivals = vec![Rival {
        target: "backend".into(),
        service: "backend".into(),
        ..rival("beta", -7200)
    }];
    assert_ne!(w.plan().status.phase, Some(Phase::Blocked));
}

#[test]
fn an_older_canary_still_rolling_back_keeps_the_younger_one_blocked() {
    // Acting while the older one removes its subsets could route to a subset about to go.
    let mut w = fresh_world();
    w.rivals = vec![Rival {
        deleting: true,
        ..rival("gamma", -7200)
    }];
    let p = w.plan();
    assert_blocked(&p, "Conflict");
    // Not even labels: the older one is taking them off.
    assert!(p.actions.is_empty(), "{:#?}", p.actions);
}

#[test]
fn the_older_canary_is_not_blocked_by_a_younger_one() {
    let mut w = fresh_world();
    w.rivals = vec![rival("zeta", 0)];
    // Seen from the younger one, the same pair is a conflict.
    let mut younger = fresh_world().with_canary(canary().named("zeta", "uid-zeta", 0));
    younger.rivals = vec![rival(CANARY, -3600)];
    assert_blocked(&younger.plan(), "Conflict");
    let p = w.plan();
    assert_ne!(p.status.phase, Some(Phase::Blocked), "{p:#?}");
    assert!(has(&p, is_dr_write));
    // Same creation time: the name decides, deterministically.
    w.rivals = vec![rival("aaa", -3600)];
    assert_blocked(&w.plan(), "Conflict");
    w.rivals = vec![rival("zzz", -3600)];
    assert_ne!(w.plan().status.phase, Some(Phase::Blocked));
}

#[test]
fn deleting_the_blocked_younger_canary_only_removes_its_finalizer() {
    // The older canary "alpha" owns the split, the subsets, the clone and the labels.
    let mut w = serving_world(10);
    let mut v = split_vs(10);
    v["metadata"]["annotations"][RESTORE_ANNOTATION] =
        json!(json!({"canary": "alpha", "weights": [null]}).to_string());
    w.vss = vec![v];
    let mut d = split_dr();
    d["metadata"]["annotations"][RESTORE_ANNOTATION] =
        json!(istio::dr_restore_note(true, "alpha", &both_subsets()));
    w.drs = vec![d];
    w.clone
        .as_mut()
        .unwrap()
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert(CANARY_LABEL.into(), "alpha".into());
    w.canary = canary().deleting().build();
    w.rivals = vec![rival("alpha", -7200)];
    let p = w.plan();
    assert_eq!(p.actions, vec![Action::RemoveFinalizer]);
}

// ---------------------------------------------------------------------------------------------
// Validation, missing objects, finalizer
// ---------------------------------------------------------------------------------------------

#[test]
fn invalid_specs_block_and_only_label_the_targets_pods() {
    let cases = [
        canary().delay("abc"),
        canary().ramp(10, "0s"),
        canary().ramp(10, "soon"),
        canary().ramp(0, "30s"),
        canary().ramp(101, "30s"),
        canary().percent(150),
        canary().percent(-1),
        canary().max_replicas(0),
        canary().spec("targetRef", json!({"name": " "})),
        canary().spec("service", json!("")),
        canary()
            .spec("capture", json!("EBPF"))
            .spec("sidecar", json!({"annotations": {INJECT: "true"}})),
    ];
    for c in cases {
        let mut w = serving_world(10).with_canary(c.clone());
        w.vss = vec![user_vs()];
        w.drs = vec![user_dr()];
        w.pods = vec![target_pod("frontend-7d9f-a").build()];
        let p = w.plan();
        assert_blocked(&p, "InvalidSpec");
        assert_only_pod_labels(&p);
        // The target's name is known unless it is the invalid part.
        if c.v["spec"]["targetRef"]["name"] == "frontend" {
            assert_eq!(
                labelled(&p),
                vec!["frontend-7d9f-a"],
                "{:?}: {:#?}",
                c.v["spec"],
                p.actions
            );
        }
    }
}

#[test]
fn a_missing_target_blocks() {
    let mut w = fresh_world();
    w.target = None;
    let p = w.plan();
    assert_blocked(&p, "TargetNotFound");
    assert_only_pod_labels(&p);
}

/// The caches keep a clone without its pod template, and a target without its status
/// (`deployments::strip`): the planner must reach the same decisions as from the
/// whole objects.
#[test]
fn deployments_as_the_caches_keep_them_are_planned_as_the_whole_ones() {
    for pct in [0, 10, 50] {
        let w = serving_world(pct);
        let full = w.plan();
        let mut stripped = w.clone();
        let mut cl = stripped.clone.take().expect("a clone");
        crate::facts::deployments::strip(&mut cl);
        assert_eq!(
            cl.spec.as_ref().map(|s| s.template.clone()),
            Some(Default::default()),
            "the cache drops a clone's template"
        );
        stripped.clone = Some(cl);
        if let Some(t) = stripped.target.as_mut() {
            t.status = Some(Default::default());
            crate::facts::deployments::strip(t);
            assert!(t.status.is_none(), "the cache drops a target's status");
            assert!(t.spec.as_ref().is_some_and(|s| s.template.spec.is_some()));
        }
        assert_eq!(stripped.plan(), full, "at {pct} %");
    }
    // A new target template still replaces the clone with the whole template, built from the
    // target.
    let mut w = serving_world(10);
    if let Some(cl) = w.clone.as_mut() {
        crate::facts::deployments::strip(cl);
    }
    w.target = Some(target_with(4, "frontend:v2"));
    let p = w.plan();
    let replaced = replaced_clone(&p);
    let template = &replaced.spec.as_ref().expect("spec").template;
    assert_eq!(
        template.spec.as_ref().expect("pod spec").containers[0]
            .image
            .as_deref(),
        Some("frontend:v2")
    );
}

#[test]
fn a_canary_whose_target_is_another_canarys_clone_blocks() {
    let mut w = fresh_world();
    let other = canary().build();
    let t = w.target.take().expect("a target");
    let mut of_other = build_clone(&other, &t, 1);
    if let Some(l) = of_other.metadata.labels.as_mut() {
        l.insert(CANARY_LABEL.into(), "other".into());
    }
    w.target = Some(of_other);
    let p = w.plan();
    assert_blocked(&p, "TargetIsAClone");
    assert!(
        p.events
            .iter()
            .any(|e| e.note.contains("recording clone of RecordingCanary other")),
        "{:?}",
        p.events
    );
    assert!(
        !has(&p, |a| matches!(
            a,
            Action::CreateClone(_) | Action::ReplaceClone(_) | Action::ScaleClone { .. }
        )),
        "{:#?}",
        p.actions
    );
}

#[test]
fn a_missing_service_blocks() {
    let mut w = fresh_world();
    w.service = false;
    let p = w.plan();
    assert_blocked(&p, "ServiceNotFound");
    assert_only_pod_labels(&p);
}

#[test]
fn a_clone_name_taken_by_a_deployment_that_is_not_ours_blocks() {
    let mut w = fresh_world();
    let mut foreign = target(2);
    foreign.metadata.name = Some(CLONE.into());
    w.clone = Some(foreign.clone());
    let p = w.plan();
    assert_blocked(&p, "CloneNameTaken");
    assert_only_pod_labels(&p);
    // One made by another canary is not ours either.
    foreign
        .metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(CANARY_LABEL.into(), "other".into());
    w.clone = Some(foreign);
    assert_blocked(&w.plan(), "CloneNameTaken");
}

#[test]
fn the_finalizer_is_added_first_when_absent() {
    let mut w = fresh_world();
    w.canary = canary().without_finalizer().build();
    let p = w.plan();
    assert_eq!(p.actions.first(), Some(&Action::AddFinalizer));
    assert_eq!(
        p.actions
            .iter()
            .filter(|a| **a == Action::AddFinalizer)
            .count(),
        1
    );
    // Present: not added again.
    assert!(!has(&fresh_world().plan(), |a| *a == Action::AddFinalizer));
    // Also when blocked.
    w.target = None;
    let p = w.plan();
    assert_eq!(p.actions.first(), Some(&Action::AddFinalizer));
    assert!(
        p.actions[1..]
            .iter()
            .all(|a| matches!(a, Action::LabelPod { .. })),
        "{:#?}",
        p.actions
    );
}

// ---------------------------------------------------------------------------------------------
// 10. Status and events
// ---------------------------------------------------------------------------------------------

#[test]
fn a_steady_state_plans_nothing_and_publishes_no_event() {
    let w = serving_world(10);
    let p = w.plan();
    assert!(p.actions.is_empty(), "{:#?}", p.actions);
    assert!(p.events.is_empty(), "{:?}", p.events);
    assert_eq!(p.requeue_after, None);
    assert_eq!(p.status.phase, Some(Phase::Ready));
    assert_eq!(p.status.current_percent, 10);
    assert_eq!(p.status.target_replicas, 4);
    assert_eq!(p.status.clone_replicas, 1);
    assert_eq!(p.status.clone_ready_replicas, 4);
    assert_eq!(p.status.virtual_services, vec!["shop/frontend".to_string()]);
    assert_eq!(p.status.destination_rule.as_deref(), Some("shop/frontend"));
    assert_eq!(p.status.observed_generation, Some(3));
    let cond = |t: &str| {
        p.status
            .conditions
            .iter()
            .find(|c| c.type_ == t)
            .unwrap()
            .status
            .clone()
    };
    assert_eq!(cond("Ready"), "True");
    assert_eq!(cond("Progressing"), "False");
    assert_eq!(cond("Degraded"), "False");
}

#[test]
fn a_phase_change_publishes_an_event_and_keeps_transition_times_otherwise() {
    let w = serving_world(10);
    let p = w.plan();
    // Same phase and reason: the Ready condition keeps its transition time.
    let ready = p
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.last_transition_time, Time(at(-600)));
    // Blocked from Ready: a warning, and a new transition time.
    let mut w = serving_world(10);
    w.service = false;
    let p = w.plan();
    assert_eq!(p.events.len(), 1, "{:?}", p.events);
    let ready = p
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "False");
    assert_eq!(ready.last_transition_time, Time(at(0)));
}

// ---------------------------------------------------------------------------------------------
// Property: split sums and exact restore over many weights and percents
// ---------------------------------------------------------------------------------------------

#[test]
fn split_weights_keep_route_sums_and_rollback_restores_exactly_for_all_weights() {
    for w_host in (1..=100).step_by(3).chain([1, 2, 99, 100]) {
        for p in (0..=100).step_by(1) {
            let route = if w_host == 100 {
                json!([{"destination": {"host": "frontend"}, "weight": 100}])
            } else {
                json!([
                    {"destination": {"host": "legacy"}, "weight": 100 - w_host},
                    {"destination": {"host": "frontend"}, "weight": w_host},
                ])
            };
            let original = vs(
                "frontend",
                json!({"hosts": ["frontend"], "http": [{"route": route}]}),
            );
            let mut w = serving_world(p);
            w.vss = vec![original.clone()];
            let plan1 = w.plan();
            let ops = patch_of(&plan1, MeshKind::VirtualService, "frontend")
                .unwrap_or_else(|| panic!("w={w_host} p={p}: {:#?}", plan1.actions));
            let split = apply_ops(&original, ops);
            let ws = weights(&split, 0);
            assert_eq!(ws.iter().sum::<i64>(), 100, "w={w_host} p={p} {ws:?}");
            let (s, r) = if w_host == 100 {
                (ws[0], ws[1])
            } else {
                (ws[1], ws[2])
            };
            assert_eq!(s + r, w_host, "w={w_host} p={p}");
            let exact = w_host as f64 * f64::from(p) / 100.0;
            assert!((r as f64 - exact).abs() <= 0.5, "w={w_host} p={p} r={r}");
            if w_host != 100 {
                assert_eq!(ws[0], 100 - w_host, "the other destination is untouched");
            }

            // Planning again on the split VS writes nothing more.
            let mut w2 = w.clone();
            w2.vss = vec![split.clone()];
            w2.canary.status = Some(plan1.status.clone());
            w2.now = at(1);
            let plan2 = w2.plan();
            assert!(
                !has(&plan2, is_vs_write),
                "w={w_host} p={p}: re-split {:#?}",
                plan2.actions
            );

            // Rollback puts the route back exactly.
            let mut w3 = deleting_world();
            w3.vss = vec![split];
            let plan3 = w3.plan();
            let restored = apply_ops(
                &w3.vss[0],
                patch_of(&plan3, MeshKind::VirtualService, "frontend").unwrap(),
            );
            assert_eq!(restored, original, "w={w_host} p={p}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Round trip: a small simulated reconcile loop
// ---------------------------------------------------------------------------------------------

fn referenced_subsets(vss: &[Value]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for v in vss {
        for r in v["spec"]["http"].as_array().into_iter().flatten() {
            for d in r["route"].as_array().into_iter().flatten() {
                if let Some(s) = d["destination"]["subset"].as_str()
                    && (s == STABLE_SUBSET || s == RECORDING_SUBSET)
                {
                    out.insert(s.to_string());
                }
            }
        }
    }
    out
}

fn dr_subsets(drs: &[Value]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for d in drs.iter().filter(|d| meta_ns(d) == NS) {
        for s in d["spec"]["subsets"].as_array().into_iter().flatten() {
            if let Some(n) = s["name"].as_str() {
                out.insert(n.to_string());
            }
        }
    }
    out
}

fn recording_weight(vss: &[Value]) -> i64 {
    vss.iter()
        .flat_map(|v| v["spec"]["http"].as_array().cloned().unwrap_or_default())
        .flat_map(|r| r["route"].as_array().cloned().unwrap_or_default())
        .filter(|d| d["destination"]["subset"] == RECORDING_SUBSET)
        .map(|d| d["weight"].as_i64().unwrap_or(0))
        .sum()
}

struct Sim {
    w: World,
    delay: Duration,
    /// When the DR last got both subsets (None while it lacks them).
    subsets_since: Option<Timestamp>,
    /// When the VSs last stopped referencing the subsets.
    routes_clear_since: Option<Timestamp>,
    gone: bool,
    next_uid: u32,
    plans: Vec<(Timestamp, Plan)>,
}

impl Sim {
    fn new(w: World) -> Self {
        let delay = w.canary.spec.validate().unwrap().propagation_delay;
        let subsets_since = (dr_subsets(&w.drs).len() == 2).then_some(at(-100_000));
        Sim {
            w,
            delay,
            subsets_since,
            routes_clear_since: Some(at(-100_000)),
            gone: false,
            next_uid: 0,
            plans: Vec::new(),
        }
    }

    fn bump_rv(obj: &mut Value) {
        let rv: u64 = obj["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        obj["metadata"]["resourceVersion"] = json!((rv + 1).to_string());
    }

    fn mesh_list(&mut self, kind: MeshKind) -> &mut Vec<Value> {
        match kind {
            MeshKind::VirtualService => &mut self.w.vss,
            MeshKind::DestinationRule => &mut self.w.drs,
        }
    }

    fn apply(&mut self, a: &Action) {
        let refs_before = referenced_subsets(&self.w.vss);
        let had_subsets = dr_subsets(&self.w.drs).len() == 2;
        match a {
            Action::AddFinalizer => self
                .w
                .canary
                .metadata
                .finalizers
                .get_or_insert_with(Vec::new)
                .push(FINALIZER.into()),
            Action::RemoveFinalizer => self.gone = true,
            Action::RecordRampStep(t) => {
                let st = self.w.canary.status.get_or_insert_with(Default::default);
                {
                    st.last_step_time = Some(t.clone());
                }
            }
            Action::LabelPod { name } | Action::UnlabelPod { name } => {
                let label = matches!(a, Action::LabelPod { .. });
                let p = self
                    .w
                    .pods
                    .iter_mut()
                    .find(|p| p.metadata.name.as_deref() == Some(name))
                    .expect("pod");
                assert!(
                    pod_of_deployment(p, TARGET),
                    "only target pods get the stable label: {name}"
                );
                let labels = p.metadata.labels.get_or_insert_with(BTreeMap::new);
                if label {
                    labels.insert(ROLE_LABEL.into(), ROLE_STABLE.into());
                } else {
                    labels.remove(ROLE_LABEL);
                }
            }
            Action::CreateClone(d) => {
                assert!(self.w.clone.is_none());
                assert!(
                    !referenced_subsets(&self.w.vss).is_empty(),
                    "the clone is created only once the VS is split"
                );
                let mut d = d.as_ref().clone();
                d.metadata.uid = Some("uid-clone".into());
                d.metadata.resource_version = Some("1".into());
                self.w.clone = Some(d);
            }
            Action::ReplaceClone(d) => {
                let cl = self.w.clone.as_mut().expect("clone");
                assert_eq!(d.metadata.resource_version, cl.metadata.resource_version);
                let status = cl.status.clone();
                *cl = d.as_ref().clone();
                cl.status = status;
            }
            Action::ScaleClone { replicas, from } => {
                let cl = self.w.clone.as_mut().expect("clone");
                assert_eq!(*from, cl.spec.as_ref().and_then(|s| s.replicas));
                cl.spec.as_mut().unwrap().replicas = Some(*replicas);
            }
            Action::DeleteClone { uid } => {
                assert_eq!(
                    self.w.clone.as_ref().and_then(|c| c.metadata.uid.as_ref()),
                    Some(uid)
                );
                self.w.clone = None;
            }
            Action::CreateMesh { kind, object } => {
                self.next_uid += 1;
                let mut o = object.clone();
                o["metadata"]["uid"] = json!(format!("uid-created-{}", self.next_uid));
                o["metadata"]["resourceVersion"] = json!("1");
                let name = meta_name(&o).to_string();
                let list = self.mesh_list(*kind);
                assert!(
                    list.iter().all(|v| meta_name(v) != name),
                    "create of an existing {name}"
                );
                list.push(o);
            }
            Action::PatchMesh { kind, name, ops } => {
                assert_eq!(
                    ops[0]["op"], "test",
                    "every patch tests the resourceVersion first"
                );
                assert_eq!(ops[0]["path"], "/metadata/resourceVersion");
                let list = self.mesh_list(*kind);
                let obj = list
                    .iter_mut()
                    .find(|v| meta_name(v) == name && meta_ns(v) == NS)
                    .expect("patched object exists");
                *obj = apply_ops(obj, ops);
                Self::bump_rv(obj);
            }
            Action::DeleteMesh { kind, name, uid } => {
                let list = self.mesh_list(*kind);
                let before = list.len();
                list.retain(|v| !(meta_name(v) == name && meta_uid(v) == uid));
                assert_eq!(
                    list.len() + 1,
                    before,
                    "delete of {name} with the right uid"
                );
            }
        }

        // Invariants after every single write.
        let now = self.w.now;
        let refs = referenced_subsets(&self.w.vss);
        let have = dr_subsets(&self.w.drs);
        assert!(
            refs.is_subset(&have),
            "a VS references {refs:?} but the DR has {have:?} after {a:#?}"
        );
        let has_subsets = have.len() == 2;
        if has_subsets && !had_subsets {
            self.subsets_since = Some(now);
        }
        if !has_subsets {
            if had_subsets {
                let clear = self
                    .routes_clear_since
                    .expect("routes cleared before subsets go");
                assert!(
                    now >= after(clear, self.delay),
                    "subsets removed {now} only since {clear}"
                );
            }
            self.subsets_since = None;
        }
        if is_vs_write(a) && !refs.is_empty() {
            let since = self.subsets_since.expect("subsets present");
            assert!(
                now >= after(since, self.delay),
                "VS uses subsets at {now}, added {since}"
            );
            self.routes_clear_since = None;
        }
        if is_vs_write(a) && refs.is_empty() && !refs_before.is_empty() {
            self.routes_clear_since = Some(now);
        }
        if recording_weight(&self.w.vss) > 0 {
            let ready = self
                .w
                .pods
                .iter()
                .filter(|p| pod_of_deployment(p, CLONE) && p.serving())
                .count();
            assert!(ready >= 1, "weight to a clone without a ready pod");
        }
    }

    /// The Deployment controller and kubelet: the clone's pods come up, ready.
    fn cluster_reacts(&mut self) {
        self.w.pods.retain(|p| !pod_of_deployment(p, CLONE));
        if let Some(cl) = self.w.clone.as_mut() {
            let r = cl.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            cl.status = Some(DeploymentStatus {
                replicas: Some(r),
                ready_replicas: Some(r),
                ..Default::default()
            });
            for i in 0..r {
                self.w
                    .pods
                    .push(clone_pod(&format!("frontend-recording-5c4b-{i}")).build());
            }
        }
    }

    fn step(&mut self) -> Plan {
        let p = self.w.plan();
        if let Some(i) = pos(&p, |a| *a == Action::RemoveFinalizer) {
            assert_eq!(i + 1, p.actions.len(), "RemoveFinalizer is last");
        }
        let prev_phase = self.w.canary.status.as_ref().and_then(|s| s.phase);
        let weight_before = recording_weight(&self.w.vss);
        for a in &p.actions {
            self.apply(a);
        }
        if prev_phase != p.status.phase && p.status.phase != Some(Phase::Terminating) {
            assert!(
                !p.events.is_empty(),
                "phase {prev_phase:?} -> {:?} without an event",
                p.status.phase
            );
        }
        if recording_weight(&self.w.vss) != weight_before && !self.gone {
            assert!(
                p.events
                    .iter()
                    .any(|e| ["RoutesSplit", "WeightChanged", "TrafficRestored"]
                        .contains(&e.reason.as_str())),
                "weight change without an event: {:?}",
                p.events
            );
        }
        if !self.gone {
            self.w.canary.status = Some(p.status.clone());
        }
        self.cluster_reacts();
        self.plans.push((self.w.now, p.clone()));
        p
    }

    /// Plans, applies, advances time, until nothing is left to do.
    fn run(&mut self, max_steps: usize) {
        for _ in 0..max_steps {
            let p = self.step();
            if self.gone || (p.actions.is_empty() && p.requeue_after.is_none()) {
                return;
            }
            let d = p.requeue_after.unwrap_or(Duration::from_millis(200));
            self.w.now = after(self.w.now, d);
        }
        panic!(
            "not steady after {max_steps} steps: {:#?}",
            self.plans.last()
        );
    }
}

fn strip_rv(mut v: Value) -> Value {
    v["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    v
}

#[test]
fn simulated_loop_converges_and_never_routes_to_missing_subsets() {
    let original_vs = rich_user_vs();
    let original_dr = user_dr();
    let mut w = fresh_world();
    w.canary = canary().without_finalizer().build();
    w.started = at(-1);
    w.vss = vec![original_vs.clone()];
    w.drs = vec![original_dr.clone()];
    let mut sim = Sim::new(w);
    sim.run(40);

    let v = sim.w.vs_named("frontend").clone();
    assert_eq!(weights(&v, 0), vec![90, 10]);
    assert_eq!(weights(&v, 1), vec![72, 8, 20]);
    assert_eq!(v["spec"]["http"][2], original_vs["spec"]["http"][2]);
    assert_eq!(v["spec"]["tcp"], original_vs["spec"]["tcp"]);
    let st = sim.w.canary.status.clone().unwrap();
    assert_eq!(st.phase, Some(Phase::Ready));
    assert_eq!(st.current_percent, 10);
    assert!(sim.w.canary.finalizers().contains(&FINALIZER.to_string()));
    assert_eq!(
        sim.w
            .clone
            .as_ref()
            .unwrap()
            .spec
            .as_ref()
            .unwrap()
            .replicas,
        Some(1)
    );
    for p in sim.w.pods.iter().filter(|p| pod_of_deployment(p, TARGET)) {
        assert_eq!(
            p.labels().get(ROLE_LABEL).map(String::as_str),
            Some(ROLE_STABLE)
        );
    }
    // The first VS write came a full propagation delay after the DR write.
    let dr_at = sim
        .plans
        .iter()
        .find(|(_, p)| has(p, is_dr_write))
        .unwrap()
        .0;
    let vs_at = sim
        .plans
        .iter()
        .find(|(_, p)| has(p, is_vs_write))
        .unwrap()
        .0;
    assert!(
        vs_at >= after(dr_at, Duration::from_secs(3)),
        "{dr_at} {vs_at}"
    );

    // HPA scales the target: only the clone follows.
    sim.w.target = Some(target(30));
    sim.w.now = after(sim.w.now, Duration::from_secs(60));
    let p = sim.step();
    assert!(!has(&p, is_mesh_write));
    assert_eq!(
        sim.w
            .clone
            .as_ref()
            .unwrap()
            .spec
            .as_ref()
            .unwrap()
            .replicas,
        Some(3)
    );

    // Deletion: everything goes back exactly.
    sim.w.canary.metadata.deletion_timestamp = Some(Time(sim.w.now));
    sim.w.now = after(sim.w.now, Duration::from_secs(1));
    sim.run(20);
    assert!(sim.gone);
    assert_eq!(
        strip_rv(sim.w.vs_named("frontend").clone()),
        strip_rv(original_vs)
    );
    assert_eq!(strip_rv(sim.w.drs[0].clone()), strip_rv(original_dr));
    assert!(sim.w.clone.is_none());
    for p in sim.w.pods.iter().filter(|p| pod_of_deployment(p, TARGET)) {
        assert!(!p.labels().contains_key(ROLE_LABEL));
    }
}

#[test]
fn simulated_loop_with_owned_objects_ramps_in_steps_and_rolls_back() {
    let mut w = fresh_world();
    w.canary = canary().percent(12).ramp(5, "10s").build();
    w.vss.clear();
    w.drs.clear();
    let mut sim = Sim::new(w);
    sim.run(40);
    let v = sim.w.vs_named(&format!("{CANARY}-recording")).clone();
    assert_eq!(weights(&v, 0), vec![88, 12]);
    assert_eq!(
        sim.w.canary.status.as_ref().unwrap().phase,
        Some(Phase::Ready)
    );

    // The weights the VS went through, and when.
    let mut seen: Vec<(Timestamp, i64)> = Vec::new();
    for (t, p) in &sim.plans {
        for a in &p.actions {
            let obj = match a {
                Action::CreateMesh {
                    kind: MeshKind::VirtualService,
                    object,
                } => Some(object.clone()),
                Action::PatchMesh {
                    kind: MeshKind::VirtualService,
                    ops,
                    ..
                } => ops
                    .iter()
                    .find(|o| o["path"] == "/spec/http")
                    .map(|o| json!({"spec": {"http": o["value"]}})),
                _ => None,
            };
            if let Some(o) = obj {
                seen.push((*t, recording_weight(&[o])));
            }
        }
    }
    let ws: Vec<i64> = seen.iter().map(|(_, w)| *w).collect();
    assert_eq!(ws, vec![0, 5, 10, 12], "{seen:?}");
    for pair in seen.windows(2).skip(1) {
        assert!(
            pair[1].0 >= after(pair[0].0, Duration::from_secs(10)),
            "{seen:?}"
        );
    }

    sim.w.canary.metadata.deletion_timestamp = Some(Time(sim.w.now));
    sim.run(20);
    assert!(sim.gone);
    assert!(sim.w.vss.is_empty() && sim.w.drs.is_empty());
    assert!(sim.w.clone.is_none());
}

#[test]
fn a_blocked_canary_keeps_new_target_pods_in_the_stable_subset() {
    // Split and serving, then a second mesh VirtualService appears (Blocked), and the target
    // rolls out: its new pods must still be labelled, or the stable subset would empty out.
    let mut w = serving_world(10);
    let mut second = user_vs();
    second["metadata"]["name"] = json!("frontend-copy");
    second["metadata"]["uid"] = json!("uid-vs-copy");
    w.vss.push(second);
    w.pods
        .push(pod_of(TARGET, "8e0a", "frontend-8e0a-new").build());
    let p = w.plan();
    assert_blocked(&p, "AmbiguousVirtualService");
    assert!(
        p.actions.contains(&Action::LabelPod {
            name: "frontend-8e0a-new".into()
        }),
        "{:#?}",
        p.actions
    );
    assert_only_pod_labels(&p);
}

#[test]
fn a_user_virtual_service_next_to_ours_is_ambiguous_not_a_silent_switch() {
    // Ours was created when none existed; then the user applied one for the same host.
    let mut w = serving_world(10);
    let mut ours = user_vs();
    ours["metadata"]["name"] = json!(CANARY);
    ours["metadata"]["uid"] = json!("uid-vs-ours");
    w.vss = vec![owned(ours), user_vs()];
    let p = w.plan();
    assert_blocked(&p, "AmbiguousVirtualService");
    assert_only_pod_labels(&p);
}

#[test]
fn a_clone_whose_rollout_stalled_is_reported_degraded_with_no_traffic() {
    let mut w = waiting_for_clone_world();
    w = w.clone_ready(0);
    if let Some(cl) = w.clone.as_mut()
        && let Some(st) = cl.status.as_mut()
    {
        st.conditions = Some(vec![
            serde_json::from_value(json!({
                "type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                "message": "ReplicaSet has timed out progressing."
            }))
            .expect("condition"),
        ]);
    }
    let p = w.plan();
    assert!(!has(&p, is_vs_write), "{:#?}", p.actions);
    assert_eq!(p.status.phase, Some(Phase::Degraded));
    assert_eq!(ready_reason(&p), "CloneStalled");
    assert!(
        p.events
            .iter()
            .any(|e| e.warning && e.reason == "CloneStalled")
    );
}

#[test]
fn the_weight_rises_only_as_far_as_the_clones_ready_replicas_carry_it() {
    // 10% of a 4-replica target, one clone replica Ready; the user asks for 100%.
    let mut w = serving_world(10).clone_ready(1);
    w.canary = canary()
        .percent(100)
        .status(status(Phase::Ready, "TargetReached", 10))
        .build();
    let p = w.plan();
    // One Ready replica carries ceil(4 × w / 100) <= 1, i.e. w <= 25.
    let after = apply_ops(
        &w.vss[0],
        patch_of(&p, MeshKind::VirtualService, "frontend").unwrap(),
    );
    assert_eq!(weights(&after, 0), vec![75, 25]);
    assert_eq!(p.status.phase, Some(Phase::Progressing));
    assert_eq!(ready_reason(&p), "WaitingForCloneCapacity");
    // The clone is asked for what 100% needs.
    assert!(
        p.actions
            .iter()
            .any(|a| matches!(a, Action::ScaleClone { replicas: 4, .. })),
        "{:#?}",
        p.actions
    );
    // Once the replicas are Ready, the weight follows.
    let w2 = serving_world(25).clone_ready(4);
    let mut w2 = w2;
    w2.canary = canary()
        .percent(100)
        .status(status(Phase::Progressing, "WaitingForCloneCapacity", 25))
        .build();
    let p2 = w2.plan();
    let after2 = apply_ops(
        &w2.vss[0],
        patch_of(&p2, MeshKind::VirtualService, "frontend").unwrap(),
    );
    assert_eq!(weights(&after2, 0), vec![0, 100]);
}

#[test]
fn capacity_never_lowers_a_weight_when_the_target_scales_up() {
    // The HPA takes the target from 4 to 40 replicas: the clone (1 Ready) is now small for
    // 10%, but the weight must not move; the clone grows instead.
    let mut w = serving_world(10).clone_ready(1);
    w.target = Some(target(40));
    let p = w.plan();
    assert!(!has(&p, is_vs_write), "{:#?}", p.actions);
    assert!(
        p.actions
            .iter()
            .any(|a| matches!(a, Action::ScaleClone { replicas: 4, .. })),
        "{:#?}",
        p.actions
    );
    assert_eq!(p.status.current_percent, 10);
}

#[test]
fn a_destination_rule_named_in_the_spec_for_another_host_blocks() {
    let mut w = fresh_world().with_canary(canary().spec("destinationRule", json!("other")));
    w.drs.push(dr_in(NS, "other", json!({"host": "other"})));
    let p = w.plan();
    assert_blocked(&p, "DestinationRuleHostMismatch");
    assert_only_pod_labels(&p);
}

#[test]
fn a_virtual_service_whose_routes_all_name_a_user_subset_blocks() {
    let mut w = fresh_world();
    w.vss = vec![vs(
        "frontend",
        json!({"hosts": ["frontend"], "http": [{"route": [{"destination": {"host": "frontend", "subset": "v1"}}]}]}),
    )];
    let p = w.plan();
    assert_blocked(&p, "NoSplittableRoute");
    assert_only_pod_labels(&p);
}

#[test]
fn a_mesh_virtual_service_for_the_host_in_another_namespace_blocks() {
    let mut w = fresh_world();
    w.vss = vec![mesh_obj(
        "VirtualService",
        "elsewhere",
        "frontend-routing",
        json!({"hosts": [FQDN], "http": [{"route": [{"destination": {"host": FQDN}}]}]}),
    )];
    let p = w.plan();
    assert_blocked(&p, "AmbiguousVirtualService");
    assert_only_pod_labels(&p);
}

#[test]
fn a_listed_gateway_without_a_route_to_the_service_blocks() {
    let w = fresh_world().with_canary(canary().spec("gateways", json!(["istio-system/typo-gw"])));
    let p = w.plan();
    assert_blocked(&p, "GatewayRouteNotFound");
    assert_only_pod_labels(&p);
}

#[test]
fn a_service_that_also_selects_another_workload_blocks() {
    let mut w = fresh_world();
    w.pods
        .push(pod_of("frontend-v2", "9a9a", "frontend-v2-9a9a-a").build());
    let p = w.plan();
    assert_blocked(&p, "ServiceSelectsOtherPods");
    assert_only_pod_labels(&p);
    // Pods the Service does not select do not matter.
    w.service_selector = BTreeMap::from([
        ("app".to_string(), "frontend".to_string()),
        ("tier".to_string(), "web".to_string()),
    ]);
    assert_ne!(w.plan().status.phase, Some(Phase::Blocked));
}

#[test]
fn a_ramp_step_is_recorded_before_the_weight_moves() {
    let w = ramp_world(10, Some(-30));
    let p = w.plan();
    let rec = pos(
        &p,
        |a| matches!(a, Action::RecordRampStep(t) if *t == rfc(at(0))),
    )
    .expect("the step time is recorded");
    let write = pos(&p, is_vs_write).expect("the weight moves");
    assert!(rec < write, "{:#?}", p.actions);
}

// ---------------------------------------------------------------------------------------------
// Who labels the stable pods
// ---------------------------------------------------------------------------------------------

#[test]
fn the_status_says_who_labels_the_targets_new_pods() {
    let mut w = serving_world(10);
    assert_eq!(
        w.plan().status.stable_labelling,
        Some(StableLabelling::Controller)
    );
    w.stable_labelling = StableLabelling::AdmissionPolicy;
    assert_eq!(
        w.plan().status.stable_labelling,
        Some(StableLabelling::AdmissionPolicy)
    );
}

#[test]
fn the_controller_still_labels_the_targets_pods_when_the_admission_policy_is_in_force() {
    let mut w = subsets_world();
    w.pods = vec![target_pod("frontend-7d9f-c").build()];
    w.stable_labelling = StableLabelling::AdmissionPolicy;
    let p = w.plan();
    assert!(
        p.actions
            .iter()
            .any(|a| matches!(a, Action::LabelPod { name } if name == "frontend-7d9f-c")),
        "{:?}",
        p.actions
    );
}

// ---------------------------------------------------------------------------------------------
// Safety actions run whatever blocks
// ---------------------------------------------------------------------------------------------

/// The serving canary at 10 %, with `f` applied to its builder.
fn serving_canary(f: impl Fn(CanaryB) -> CanaryB) -> RecordingCanary {
    f(canary()
        .percent(10)
        .status(status(Phase::Ready, "TargetReached", 10)))
    .build()
}

/// Every way a canary serving 10 % can become blocked while its split is live.
fn blocked_serving_worlds() -> Vec<(&'static str, World)> {
    let base = serving_world(10);
    let with = |f: &dyn Fn(&mut World)| {
        let mut w = base.clone();
        f(&mut w);
        w
    };
    let mut foreign_clone = base.clone.clone().expect("a clone");
    if let Some(l) = foreign_clone.metadata.labels.as_mut() {
        l.remove(CANARY_LABEL);
    }
    vec![
        (
            "InvalidSpec",
            with(&|w| w.canary = serving_canary(|c| c.delay("abc"))),
        ),
        ("TargetNotFound", with(&|w| w.target = None)),
        ("ServiceNotFound", with(&|w| w.service = false)),
        (
            "VirtualServiceNotFound",
            with(&|w| w.canary = serving_canary(|c| c.spec("virtualService", json!("nope")))),
        ),
        (
            "DestinationRuleNotFound",
            with(&|w| w.canary = serving_canary(|c| c.spec("destinationRule", json!("nope")))),
        ),
        (
            "AmbiguousVirtualService",
            with(&|w| {
                let mut second = user_vs();
                second["metadata"]["name"] = json!("frontend-copy");
                second["metadata"]["uid"] = json!("uid-vs-copy");
                w.vss.push(second);
            }),
        ),
        (
            "AmbiguousVirtualService",
            with(&|w| {
                w.vss.push(mesh_obj(
                    "VirtualService",
                    "elsewhere",
                    "frontend-routing",
                    json!({"hosts": [FQDN], "http": [{"route": [{"destination": {"host": FQDN}}]}]}),
                ))
            }),
        ),
        (
            "AmbiguousDestinationRule",
            with(&|w| {
                w.drs
                    .push(dr_in(NS, "frontend-copy", json!({"host": FQDN})))
            }),
        ),
        (
            "ShadowingDestinationRule",
            with(&|w| {
                w.drs
                    .push(dr_in("payments", "frontend-tls", json!({"host": FQDN})))
            }),
        ),
        (
            "DestinationRuleHostMismatch",
            with(&|w| {
                w.canary = serving_canary(|c| c.spec("destinationRule", json!("other")));
                w.drs.push(dr_in(NS, "other", json!({"host": "other"})));
            }),
        ),
        (
            "SubsetNameTaken",
            with(&|w| {
                w.drs[0]["spec"]["subsets"] =
                    json!([{"name": STABLE_SUBSET, "labels": {"version": "v1"}}])
            }),
        ),
        (
            "GatewayRouteNotFound",
            with(&|w| {
                w.canary = serving_canary(|c| c.spec("gateways", json!(["istio-system/typo-gw"])))
            }),
        ),
        (
            "ServiceSelectsOtherPods",
            with(&|w| {
                w.pods
                    .push(pod_of("frontend-v2", "9a9a", "frontend-v2-9a9a-a").build())
            }),
        ),
        (
            "ServiceWithoutSelector",
            with(&|w| w.service_selector.clear()),
        ),
        // Blocks only once this canary no longer holds its clone.
        (
            "Conflict",
            with(&|w| {
                w.rivals = vec![rival("alpha", -7200)];
                w.clone = None;
                w.pods.retain(|p| !pod_of_deployment(p, CLONE));
            }),
        ),
        (
            "CloneNameTaken",
            with(&|w| {
                w.clone = Some(foreign_clone.clone());
                w.pods.retain(|p| !pod_of_deployment(p, CLONE));
            }),
        ),
    ]
}

/// The ways a clone can fall sick; `None` where the world already has no clone of ours.
fn sicken(w: &World, how: &str) -> Option<World> {
    let mut w = w.clone();
    let ours = w
        .clone
        .as_ref()
        .is_some_and(|c| c.labels().get(CANARY_LABEL).is_some());
    if !ours {
        // Already without a clone of its own: that is the "deleted" case.
        return (how == "deleted").then_some(w);
    }
    match how {
        "deleted" => {
            w.clone = None;
            w.pods.retain(|p| !pod_of_deployment(p, CLONE));
        }
        "crash-looping" => {
            w.pods.retain(|p| !pod_of_deployment(p, CLONE));
            w.pods.push(
                clone_pod("frontend-recording-5c4b-a")
                    .crash_looping()
                    .build(),
            );
        }
        "not-ready" => {
            w = w.clone_ready(0);
            w.pods.retain(|p| !pod_of_deployment(p, CLONE));
            w.pods
                .push(clone_pod("frontend-recording-5c4b-a").not_ready().build());
        }
        "not-an-endpoint" => {
            // Ready pods that the Service's EndpointSlices do not list (as Ready) any more.
            w.endpoints = Some(target_endpoints(&w));
        }
        _ => unreachable!("{how}"),
    }
    Some(w)
}

#[test]
fn every_block_reason_still_drains_a_sick_clone_and_labels_new_target_pods() {
    let mut checked = 0;
    for (reason, blocked) in blocked_serving_worlds() {
        // Blocked with a healthy clone: the live split stays as it is.
        let p = blocked.plan();
        assert_blocked(&p, reason);
        if blocked
            .clone
            .as_ref()
            .is_some_and(|c| c.labels().get(CANARY_LABEL).is_some())
        {
            assert!(!has(&p, is_vs_write), "{reason}: {:#?}", p.actions);
        }
        for how in ["crash-looping", "deleted", "not-ready", "not-an-endpoint"] {
            let Some(mut w) = sicken(&blocked, how) else {
                continue;
            };
            w.pods
                .push(pod_of(TARGET, "8e0a", "frontend-8e0a-new").build());
            let p = w.plan();
            let case = format!("{reason}, clone {how}");
            assert_eq!(p.status.phase, Some(Phase::Blocked), "{case}: {p:#?}");
            assert_eq!(ready_reason(&p), reason, "{case}");
            let ops = patch_of(&p, MeshKind::VirtualService, "frontend")
                .unwrap_or_else(|| panic!("{case}: no drain of the split: {:#?}", p.actions));
            let after = apply_ops(w.vs_named("frontend"), ops);
            assert_eq!(weights(&after, 0), vec![100, 0], "{case}");
            assert_eq!(p.status.current_percent, 0, "{case}");
            assert!(
                labelled(&p).contains(&"frontend-8e0a-new".to_string()),
                "{case}: {:#?}",
                p.actions
            );
            // Nothing else: no subset, clone or delete write while blocked.
            assert!(
                p.actions.iter().all(|a| matches!(
                    a,
                    Action::LabelPod { .. }
                        | Action::PatchMesh {
                            kind: MeshKind::VirtualService,
                            ..
                        }
                )),
                "{case}: {:#?}",
                p.actions
            );
            assert!(
                p.events
                    .iter()
                    .any(|e| e.warning && e.reason == "TrafficDrained"),
                "{case}: {:?}",
                p.events
            );
            // The next reconcile, from the drained VirtualService, writes nothing more.
            let mut next = w.clone();
            next.vss = next
                .vss
                .iter()
                .map(|v| {
                    if meta_name(v) == "frontend" {
                        after.clone()
                    } else {
                        v.clone()
                    }
                })
                .collect();
            next.canary.status = Some(p.status.clone());
            assert!(!has(&next.plan(), is_vs_write), "{case}: drained twice");
            checked += 1;
        }
    }
    // Four ways to be sick; two blocked worlds have no clone of their own (only "deleted").
    assert_eq!(checked, 16 * 4 - 2 * 3, "cases checked");
}

#[test]
fn a_blocked_canary_whose_split_is_not_its_own_drains_nothing() {
    // Split by another canary: its VirtualService is not this one's to drain.
    let mut w = serving_world(10);
    w.vss[0]["metadata"]["annotations"][RESTORE_ANNOTATION] =
        json!(json!({"canary": "other", "weights": [null]}).to_string());
    w.clone = None;
    let p = w.plan();
    assert_blocked(&p, "Conflict");
    assert!(!has(&p, is_vs_write), "{:#?}", p.actions);
}

#[test]
fn a_blocked_canary_with_a_healthy_clone_keeps_it_sized_for_its_live_weight() {
    // Blocked (a second VirtualService appeared) while the HPA takes the target from 4 to 40:
    // the clone carrying 10 % grows with it, and never shrinks while blocked.
    let mut w = blocked_serving_worlds()
        .into_iter()
        .find(|(r, _)| *r == "AmbiguousDestinationRule")
        .map(|(_, w)| w)
        .expect("world");
    w.target = Some(target(40));
    let p = w.plan();
    assert_blocked(&p, "AmbiguousDestinationRule");
    assert!(
        p.actions
            .iter()
            .any(|a| matches!(a, Action::ScaleClone { replicas: 4, .. })),
        "{:#?}",
        p.actions
    );
    w.target = Some(target(1));
    assert!(
        !w.plan()
            .actions
            .iter()
            .any(|a| matches!(a, Action::ScaleClone { .. })),
        "shrank while blocked"
    );
}

// ---------------------------------------------------------------------------------------------
// A writer that puts the routes back (GitOps self-heal)
// ---------------------------------------------------------------------------------------------

/// The serving world after `manager` put the user's routes back into the VirtualService.
fn reverted_by(manager: &str, pct: i32) -> World {
    let mut w = serving_world(pct);
    let mut v = split_vs(pct.into());
    v["spec"]["http"] = user_vs()["spec"]["http"].clone();
    v["metadata"]["managedFields"] = json!([
        {"manager": "recording-canary", "operation": "Update", "time": rfc(at(-120)),
         "fieldsV1": {"f:spec": {"f:http": {}}}},
        {"manager": manager, "operation": "Update", "time": rfc(at(-1)),
         "fieldsV1": {"f:spec": {"f:http": {}}}},
    ]);
    w.vss = vec![v];
    w
}

#[test]
fn a_split_put_back_by_another_writer_is_reapplied_at_once_and_the_writer_is_named() {
    let w = reverted_by("argocd-controller", 10);
    let p = w.plan();
    let after = apply_ops(
        w.vs_named("frontend"),
        patch_of(&p, MeshKind::VirtualService, "frontend").expect("the split again"),
    );
    assert_eq!(weights(&after, 0), vec![90, 10]);
    let e = p
        .events
        .iter()
        .find(|e| e.reason == "SplitReverted")
        .expect("a SplitReverted event");
    assert!(e.warning && e.note.contains("argocd-controller"), "{e:?}");
    assert_eq!(p.status.revert_count, 1);
    assert_eq!(p.status.phase, Some(Phase::Ready));
}

#[test]
fn a_split_put_back_again_and_again_is_reapplied_after_a_doubling_delay() {
    // The second revert in a row: wait 2 s, Degraded, no write.
    let mut w = reverted_by("kubectl-client-side-apply", 10);
    let mut st = status(Phase::Ready, "TargetReached", 10);
    st.revert_count = 1;
    st.last_revert_time = Some(rfc(at(-5)));
    w.canary = canary().percent(10).status(st).build();
    let p = w.plan();
    assert!(!has(&p, is_vs_write), "{:#?}", p.actions);
    assert_eq!(p.status.revert_count, 2);
    assert_eq!(p.status.phase, Some(Phase::Degraded));
    assert_eq!(ready_reason(&p), "SplitReverted");
    assert_eq!(p.requeue_after, Some(Duration::from_secs(2)));
    assert_eq!(
        p.events
            .iter()
            .filter(|e| e.reason == "SplitReverted")
            .count(),
        1,
        "one Event per revert: {:?}",
        p.events
    );
    // 2 s later (the VS still reverted, status from the first plan): the split goes back, and
    // it is not counted as another revert.
    let mut later = w.clone();
    later.canary.status = Some(p.status.clone());
    later.now = at(2);
    let p2 = later.plan();
    assert!(has(&p2, is_vs_write), "{:#?}", p2.actions);
    assert_eq!(p2.status.revert_count, 2);
    assert!(!p2.events.iter().any(|e| e.reason == "SplitReverted"));
}

#[test]
fn the_revert_count_starts_over_once_a_split_has_held_for_ten_minutes() {
    let mut w = serving_world(10);
    let mut st = status(Phase::Ready, "TargetReached", 10);
    st.revert_count = 5;
    st.last_revert_time = Some(rfc(at(-60)));
    w.canary = canary().percent(10).status(st.clone()).build();
    assert_eq!(
        w.plan().status.revert_count,
        5,
        "a minute is not long enough"
    );
    st.last_revert_time = Some(rfc(at(-601)));
    w.canary = canary().percent(10).status(st).build();
    let p = w.plan();
    assert_eq!(p.status.revert_count, 0);
    assert_eq!(p.status.last_revert_time, None);
}

#[test]
fn the_revert_backoff_doubles_up_to_five_minutes() {
    let secs: Vec<u64> = (1..=12)
        .map(|n| progress::revert_backoff(n).as_secs())
        .collect();
    assert_eq!(secs, vec![0, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
}

// ---------------------------------------------------------------------------------------------
// Hostile input
// ---------------------------------------------------------------------------------------------

#[test]
fn a_service_without_a_selector_blocks_before_any_mesh_write() {
    let mut w = fresh_world();
    w.service_selector.clear();
    let p = w.plan();
    assert_blocked(&p, "ServiceWithoutSelector");
    assert_only_pod_labels(&p);
}

#[test]
fn a_virtual_service_with_only_tcp_and_tls_routes_blocks() {
    let mut w = fresh_world();
    w.vss = vec![vs(
        "frontend",
        json!({"hosts": ["frontend"],
               "tcp": [{"route": [{"destination": {"host": "frontend"}}]}],
               "tls": [{"match": [{"sniHosts": ["frontend"]}], "route": [{"destination": {"host": "frontend"}}]}]}),
    )];
    let p = w.plan();
    assert_blocked(&p, "NoRouteToService");
    assert_only_pod_labels(&p);
}

#[test]
fn a_delegating_virtual_service_blocks_and_its_delegate_is_left_alone() {
    let mut w = fresh_world();
    w.vss = vec![
        vs(
            "frontend",
            json!({"hosts": ["frontend"], "http": [{"match": [{"uri": {"prefix": "/"}}], "delegate": {"name": "frontend-routes"}}]}),
        ),
        vs(
            "frontend-routes",
            json!({"http": [{"route": [{"destination": {"host": "frontend"}}]}]}),
        ),
    ];
    let p = w.plan();
    assert_blocked(&p, "NoRouteToService");
    assert!(!has(&p, is_mesh_write), "{:#?}", p.actions);
}

#[test]
fn weights_that_do_not_sum_to_100_keep_their_sum_when_split() {
    // Istio's validation refuses such a VirtualService; if one exists anyway, the split must
    // not make it worse: each route keeps its total.
    let mut w = fresh_world();
    w.vss = vec![vs(
        "frontend",
        json!({"hosts": ["frontend"], "http": [{"route": [
            {"destination": {"host": "frontend"}, "weight": 60},
            {"destination": {"host": "backend"}, "weight": 30}]}]}),
    )];
    w.drs = vec![split_dr()];
    w.pods = vec![
        target_pod("frontend-7d9f-a").stable().build(),
        target_pod("frontend-7d9f-b").stable().build(),
    ];
    w.canary = canary()
        .status(status(Phase::Progressing, "WaitingForStablePods", 0))
        .build();
    w.clone = Some(live_clone(&w.canary, &target(4), 1, 1));
    let w = w.clone_ready(1);
    let p = w.plan();
    let after = apply_ops(
        w.vs_named("frontend"),
        patch_of(&p, MeshKind::VirtualService, "frontend").expect("split"),
    );
    let total: i64 = after["spec"]["http"][0]["route"]
        .as_array()
        .expect("route")
        .iter()
        .map(|d| d["weight"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(total, 90, "{after:#}");
}

#[test]
fn a_deployment_of_another_kind_named_as_the_target_is_not_found() {
    // targetRef names a StatefulSet (or anything that is not an apps/v1 Deployment): the
    // controller sees no Deployment of that name and says so.
    let mut w = fresh_world();
    w.target = None;
    let p = w.plan();
    assert_blocked(&p, "TargetNotFound");
    assert!(
        p.status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.message.contains("Deployment frontend not found")),
        "{:#?}",
        p.status.conditions
    );
}

// ---------------------------------------------------------------------------------------------
// Modes: forced and excluded requests, Mirror
// ---------------------------------------------------------------------------------------------

fn always_qa() -> Value {
    json!([{"headers": {"x-team": {"exact": "qa"}}}])
}

fn never_health() -> Value {
    json!([{"uri": {"prefix": "/healthz"}}])
}

/// The user's VS after the planner's own write for canary `c`, from serving_world(pct).
fn planned_vs(c: CanaryB, pct: i32) -> (World, Value) {
    let w = serving_world(pct).with_canary(c);
    let p = w.plan();
    let ops = patch_of(&p, MeshKind::VirtualService, "frontend")
        .unwrap_or_else(|| panic!("a VirtualService write: {:#?}", p.actions));
    let v = apply_ops(&w.vss[0], ops);
    (w, v)
}

fn route_names(v: &Value) -> Vec<String> {
    v["spec"]["http"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r["name"].as_str().unwrap_or("-").to_string())
        .collect()
}

#[test]
fn forced_and_excluded_requests_are_routed_ahead_of_the_split_once_the_clone_is_ready() {
    let c = canary()
        .spec("always", always_qa())
        .spec("never", never_health())
        .status(status(Phase::Ready, "TargetReached", 10));
    let (mut w, v) = planned_vs(c.clone(), 10);
    assert_eq!(route_names(&v), ["rcanary-never", "rcanary-always", "-"]);
    assert_eq!(subsets_of_route(&v, 0), [Some(STABLE_SUBSET.to_string())]);
    assert_eq!(
        subsets_of_route(&v, 1),
        [Some(RECORDING_SUBSET.to_string())]
    );
    assert_eq!(weights(&v, 2), [90, 10]);
    // Written once: the next plan over the result changes nothing.
    w.vss = vec![v.clone()];
    let p = w.plan();
    assert!(!has(&p, is_vs_write), "{:#?}", p.actions);
    // Rollback takes both routes out and restores the user's VS exactly.
    let mut d = w.with_canary(c.deleting());
    d.vss = vec![v];
    let p = d.plan();
    let restored = apply_ops(
        &d.vss[0],
        patch_of(&p, MeshKind::VirtualService, "frontend").expect("restore"),
    );
    assert_eq!(restored, user_vs());
}

#[test]
fn percent_zero_with_always_records_only_the_forced_requests_on_one_replica() {
    let c = canary()
        .percent(0)
        .spec("always", always_qa())
        .status(status(Phase::Ready, "TargetReached", 0));
    let mut w = serving_world(0).with_canary(c);
    // serving_world(0) has no clone replica: it is sized to one, and nothing is forced yet.
    w = w.clone_ready(0);
    let p = w.plan();
    assert_eq!(p.status.clone_replicas, 1, "{:#?}", p.actions);
    let forced = patch_of(&p, MeshKind::VirtualService, "frontend")
        .map(|ops| route_names(&apply_ops(&w.vss[0], ops)))
        .unwrap_or_else(|| route_names(&w.vss[0]));
    assert!(!forced.iter().any(|n| n == "rcanary-always"), "{forced:?}");
    // With a Ready replica, the forced route goes in; the weight stays 0.
    let w = w.clone_ready(1);
    let p = w.plan();
    let v = apply_ops(
        &w.vss[0],
        patch_of(&p, MeshKind::VirtualService, "frontend").expect("a VS write"),
    );
    assert_eq!(route_names(&v), ["rcanary-always", "-"]);
    assert_eq!(weights(&v, 1), [100, 0]);
    assert_eq!(p.status.current_percent, 0);
}

#[test]
fn a_sick_clone_loses_its_forced_requests_too() {
    let c = canary()
        .spec("always", always_qa())
        .spec("never", never_health())
        .status(status(Phase::Ready, "TargetReached", 10));
    let (mut w, v) = planned_vs(c, 10);
    w.vss = vec![v];
    w.pods = vec![
        target_pod("frontend-7d9f-a").stable().build(),
        clone_pod("frontend-recording-5c4b-a")
            .crash_looping()
            .build(),
    ];
    let w = w.clone_ready(0);
    let p = w.plan();
    let drained = apply_ops(
        &w.vss[0],
        patch_of(&p, MeshKind::VirtualService, "frontend").expect("a drain"),
    );
    assert!(
        !route_names(&drained).iter().any(|n| n == "rcanary-always"),
        "{drained:#}"
    );
    assert!(
        !drained
            .to_string()
            .contains(&format!("\"{RECORDING_SUBSET}\",\"weight\":1")),
        "{drained:#}"
    );
    assert!(
        event_reasons(&p).contains(&"TrafficDrained") || p.status.phase == Some(Phase::Degraded)
    );
}

#[test]
fn mirror_mode_needs_the_side_effects_acknowledged() {
    let c = canary().spec("mode", json!("Mirror")).build();
    let err = c.spec.validate().expect_err("not acknowledged");
    assert!(err.0.contains("acknowledgeMirrorSideEffects"), "{err}");
    let c = canary()
        .spec("mode", json!("Mirror"))
        .spec("acknowledgeMirrorSideEffects", json!(true))
        .build();
    assert!(c.spec.validate().is_ok());
}

#[test]
fn switching_a_live_split_to_mirror_is_one_write_that_keeps_the_subsets() {
    let c = canary()
        .spec("mode", json!("Mirror"))
        .spec("acknowledgeMirrorSideEffects", json!(true))
        .status(status(Phase::Ready, "TargetReached", 10));
    let w = serving_world(10).with_canary(c);
    let p = w.plan();
    let vs_writes = p.actions.iter().filter(|a| is_vs_write(a)).count();
    assert_eq!(vs_writes, 1, "{:#?}", p.actions);
    assert!(!has(&p, is_dr_write), "{:#?}", p.actions);
    let v = apply_ops(
        &w.vss[0],
        patch_of(&p, MeshKind::VirtualService, "frontend").expect("VS write"),
    );
    assert_eq!(subsets_of_route(&v, 0), [Some(STABLE_SUBSET.to_string())]);
    assert_eq!(
        v["spec"]["http"][0]["mirrors"],
        json!([{"destination": {"host": "frontend", "subset": RECORDING_SUBSET}, "percentage": {"value": 10}}])
    );
    assert!(
        event_reasons(&p).contains(&"RoutesReshaped"),
        "{:?}",
        p.events
    );
    assert_eq!(p.status.current_percent, 10);
}

#[test]
fn a_route_that_cannot_take_the_shape_blocks_with_its_reason() {
    let mut legacy = user_vs();
    legacy["spec"]["http"][0]["mirror"] = json!({"host": "audit"});
    let c = canary()
        .spec("mode", json!("Mirror"))
        .spec("acknowledgeMirrorSideEffects", json!(true));
    let mut w = fresh_world().with_canary(c);
    w.vss = vec![legacy];
    let p = w.plan();
    assert_blocked(&p, "UnsupportedRoute");
    assert!(!has(&p, is_mesh_write), "{:#?}", p.actions);

    let mut regex = user_vs();
    regex["spec"]["http"][0]["match"] = json!([{"uri": {"regex": "/api/.*"}}]);
    let mut w = fresh_world().with_canary(canary().spec("never", never_health()));
    w.vss = vec![regex];
    let p = w.plan();
    assert_blocked(&p, "UnsupportedRoute");
}

#[test]
fn target_pods_without_istio_sidecars_are_reported_once_without_stopping_progress() {
    let mut w = serving_world(10);
    for p in &mut w.pods {
        p.metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .remove("security.istio.io/tlsMode");
    }
    let p = w.plan();
    let cond = p
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "SidecarInjected")
        .expect("the SidecarInjected condition");
    assert_eq!(
        (cond.status.as_str(), cond.reason.as_str()),
        ("False", "NoIstioSidecar")
    );
    assert!(
        cond.message.contains("sidecar injection"),
        "{}",
        cond.message
    );
    assert!(
        p.events
            .iter()
            .any(|e| e.warning && e.reason == "NoIstioSidecar")
    );
    assert_eq!(p.status.phase, Some(Phase::Ready));
    assert!(!has(&p, is_mesh_write), "{:#?}", p.actions);
    // Said once: the next plan, with that status, keeps the condition and sends no Event.
    let mut again = w;
    let mut c = again.canary.clone();
    c.status = Some(p.status.clone());
    again.canary = c;
    let p2 = again.plan();
    assert!(
        !p2.events.iter().any(|e| e.reason == "NoIstioSidecar"),
        "{:?}",
        p2.events
    );
    // With the sidecar, the condition is True.
    let p3 = serving_world(10).plan();
    let cond = p3
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "SidecarInjected")
        .expect("condition");
    assert_eq!(cond.status, "True");
}
