//! The planner: a pure function from what was observed to what should be, and in which order.
//!
//! It never talks to the API server. [`plan`] takes a snapshot ([`Observed`]) and returns the
//! ordered [`Action`]s, the status to report and the events to publish. Every step that must wait
//! (propagation of a DestinationRule to the Envoys, a ramp interval) is expressed as a requeue,
//! and the times it waits from live in the status, so a restarted controller resumes where it was.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    Condition, LabelSelector, ObjectMeta, OwnerReference, Time,
};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub use crate::api::labels::{MANAGED_BY, clone_of, meta_of_deployment};
use crate::api::status::{Phase, Router, StableLabelling};
use crate::api::{
    CANARY_LABEL, FINALIZER, Mode, ROLE_LABEL, ROLE_RECORDING, ROLE_STABLE, RecordingCanary,
    RecordingCanaryStatus, SOURCE_HASH_ANNOTATION, ValidSpec,
};
use crate::facts::pods::PodFacts;
use crate::istio::{self, ServiceHost};

mod block;
mod progress;
mod rollback;
mod router;
mod safety;
mod timebox;

pub use block::Block;

/// Another RecordingCanary in the same namespace, as far as conflicts go.
#[derive(Debug, Clone, PartialEq)]
pub struct Rival {
    pub name: String,
    pub created: Option<Timestamp>,
    pub target: String,
    pub service: String,
    pub deleting: bool,
}

/// One of the Gateway API router's two Services (see
/// [`backend_service_names`](crate::api::labels::backend_service_names)), as observed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BackendService {
    pub name: String,
    pub uid: String,
    pub resource_version: String,
    /// The UID of its controlling owner (ours: the canary's).
    pub controller_uid: Option<String>,
    pub deleting: bool,
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<Value>,
    /// The pods that are Ready endpoints in its EndpointSlices.
    pub endpoints: BTreeSet<String>,
    /// When its EndpointSlices last changed (the newest, to the second), if known.
    pub endpoints_changed: Option<Timestamp>,
}

/// Everything the planner looks at, read by the controller just before planning.
#[derive(Debug, Clone)]
pub struct Observed<'a> {
    pub canary: &'a RecordingCanary,
    pub now: Timestamp,
    /// Waits are measured from no earlier than this: the start of this controller process, or
    /// its last write to this canary's VirtualService or DestinationRule, whichever is later
    /// (a write whose time has not reached the status yet, or never will after a crash).
    pub started: Timestamp,
    pub cluster_domain: &'a str,
    pub target: Option<&'a Deployment>,
    pub service_exists: bool,
    /// The Service's pod selector (empty when it has none or is missing).
    pub service_selector: BTreeMap<String, String>,
    pub clone: Option<&'a Deployment>,
    /// Pods that may belong to the target or the clone (the controller lists them by the target's selector).
    pub pods: &'a [PodFacts],
    /// The pods that are Ready endpoints in the Service's EndpointSlices: what the mesh routes to.
    /// A pod counts towards a subset's capacity only once it is one (see [`crate::facts::endpoints`]).
    pub endpoints: &'a BTreeSet<String>,
    /// VirtualServices in the canary's namespace (full objects as JSON).
    pub virtual_services: &'a [Value],
    /// HTTPRoutes of the canary's namespace that have the Service (or a listed Gateway) as a
    /// parent (full objects as JSON).
    pub http_routes: &'a [Value],
    /// GRPCRoutes of the canary's namespace that refer to the Service (never split: one attached
    /// to it blocks the Gateway API router).
    pub grpc_routes: &'a [Value],
    /// The Service's namespace is in Istio's ambient mode (`istio.io/dataplane-mode: ambient`).
    pub ambient: bool,
    /// The waypoint of the Service (its `istio.io/use-waypoint` label, else its namespace's).
    pub waypoint: Option<&'a str>,
    /// The Service's `spec.ports`.
    pub service_ports: &'a [Value],
    /// The Gateway API router's Services of this canary, stable then recording, where they exist.
    pub backend_services: [Option<&'a BackendService>; 2],
    /// DestinationRules in the canary's namespace, and any elsewhere whose host is the Service's.
    pub destination_rules: &'a [Value],
    pub rivals: &'a [Rival],
    /// Who labels the target's new pods (reported in the status).
    pub stable_labelling: StableLabelling,
}

pub use crate::api::MeshKind;

/// One write, in the order the plan lists them.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    AddFinalizer,
    RemoveFinalizer,
    /// Record in the status when the ramp stepped, before the weight moves (so that a failure
    /// between the two cannot let the ramp step twice).
    RecordRampStep(String),
    LabelPod {
        name: String,
    },
    UnlabelPod {
        name: String,
    },
    CreateClone(Box<Deployment>),
    /// Replace the clone (carries the resourceVersion it was built from).
    ReplaceClone(Box<Deployment>),
    /// Scale the clone from `from` replicas (the write's guard: the status churn of the
    /// Deployment does not make it fail, a concurrent scale does).
    ScaleClone {
        replicas: i32,
        from: Option<i32>,
    },
    DeleteClone {
        uid: String,
    },
    CreateMesh {
        kind: MeshKind,
        object: Value,
    },
    /// A JSON patch whose first operation tests the resourceVersion.
    PatchMesh {
        kind: MeshKind,
        name: String,
        ops: Vec<Value>,
    },
    DeleteMesh {
        kind: MeshKind,
        name: String,
        uid: String,
    },
    /// One of the Gateway API router's own Services.
    CreateService(Box<Value>),
    /// A JSON patch of one of its own Services whose first operation tests the resourceVersion.
    PatchService {
        name: String,
        ops: Vec<Value>,
    },
    DeleteService {
        name: String,
        uid: String,
    },
}

/// An Event to publish on the RecordingCanary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventNote {
    pub warning: bool,
    pub reason: String,
    pub note: String,
}

/// Drops from `events` the one that announces the Ready reason of `status`: a status that is
/// not written (transient, or too late) is not announced either; the plan that writes one does.
pub fn drop_ready_event(status: &RecordingCanaryStatus, events: &mut Vec<EventNote>) {
    let reason = status.ready_reason();
    events.retain(|e| Some(e.reason.as_str()) != reason);
}

/// The planner's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub status: RecordingCanaryStatus,
    pub events: Vec<EventNote>,
    /// Come back after this long even if nothing changes (a wait is running).
    pub requeue_after: Option<Duration>,
    /// The status is not worth a write: this plan's own writes (Services created, pods
    /// labelled) wake the canary again at once, and the next plan reports what they changed.
    pub transient_status: bool,
    /// The status holds only until then: it says Ready within the grace the mesh has to accept
    /// the routes. A report written later (it waited for a turn) would say what may no longer
    /// be true; the next plan reports instead.
    pub status_holds_until: Option<Timestamp>,
}

struct Builder<'a> {
    o: &'a Observed<'a>,
    prev: RecordingCanaryStatus,
    status: RecordingCanaryStatus,
    actions: Vec<Action>,
    events: Vec<EventNote>,
    requeue: Option<Duration>,
    /// See [`Plan::transient_status`].
    transient: bool,
    /// See [`Plan::status_holds_until`].
    holds_until: Option<Timestamp>,
}

impl<'a> Builder<'a> {
    fn new(o: &'a Observed<'a>) -> Self {
        let prev = o.canary.status.clone().unwrap_or_default();
        let mut status = prev.clone();
        status.observed_generation = o.canary.metadata.generation;
        status.clone_name = Some(o.canary.spec.clone_name());
        status.stable_labelling = Some(o.stable_labelling);
        Self {
            o,
            prev,
            status,
            actions: Vec::new(),
            events: Vec::new(),
            requeue: None,
            transient: false,
            holds_until: None,
        }
    }

    fn requeue(&mut self, d: Duration) {
        let d = d.max(Duration::from_millis(100));
        self.requeue = Some(self.requeue.map_or(d, |r| r.min(d)));
    }

    fn event(&mut self, warning: bool, reason: &str, note: String) {
        self.events.push(EventNote {
            warning,
            reason: reason.into(),
            note,
        });
    }

    fn condition(&mut self, type_: &str, ok: bool, reason: &str, message: &str) {
        let status = if ok { "True" } else { "False" };
        let now = Time(self.o.now);
        let previous = self.prev.conditions.iter().find(|c| c.type_ == type_);
        let last_transition_time = match previous {
            Some(c) if c.status == status => c.last_transition_time.clone(),
            _ => now,
        };
        let cond = Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time,
            observed_generation: self.o.canary.metadata.generation,
        };
        self.status.conditions.retain(|c| c.type_ != type_);
        self.status.conditions.push(cond);
        self.status.conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
    }

    /// Sets phase and the three conditions together, and an Event when the phase changes.
    fn report(&mut self, phase: Phase, reason: &str, message: &str) {
        let ready = phase == Phase::Ready;
        let degraded = phase == Phase::Degraded;
        let progressing = phase == Phase::Progressing;
        // The reason belongs to the condition it explains; the others say where things stand.
        let ready_reason = reason;
        let progressing_reason = if progressing { reason } else { phase.as_str() };
        let degraded_reason = if degraded { reason } else { "NotDegraded" };
        self.condition("Ready", ready, ready_reason, message);
        self.condition("Progressing", progressing, progressing_reason, message);
        self.condition("Degraded", degraded, degraded_reason, message);
        // Events mark transitions: a new phase, or a new problem (Blocked, Degraded); progress
        // within a phase shows in the conditions.
        let warning = degraded || phase == Phase::Blocked;
        let said = self.events.iter().any(|e| e.reason == reason);
        if !said && (self.prev.phase != Some(phase) || (warning && self.reason_changed(reason))) {
            self.event(warning, reason, message.to_string());
        }
        self.status.phase = Some(phase);
    }

    fn reason_changed(&self, reason: &str) -> bool {
        self.prev.ready_reason().is_none_or(|r| r != reason)
    }

    fn finish(mut self) -> Plan {
        if self.transient {
            // Its report is about to change: no Event for it either.
            drop_ready_event(&self.status, &mut self.events);
        }
        Plan {
            actions: self.actions,
            status: self.status,
            events: self.events,
            requeue_after: self.requeue,
            transient_status: self.transient,
            status_holds_until: self.holds_until,
        }
    }

    /// Progress stops here; the reason is reported, with what the safety stage did meanwhile.
    fn blocked(mut self, why: &Block, meanwhile: Option<String>) -> Plan {
        let message = match meanwhile {
            Some(m) => format!("{}. Meanwhile: {m}", why.message()),
            None => why.message(),
        };
        self.report(Phase::Blocked, &why.reason(), &message);
        self.finish()
    }
}

fn parse_time(s: Option<&str>) -> Option<Timestamp> {
    s.and_then(|s| s.parse::<Timestamp>().ok())
}

fn fmt_time(t: Timestamp) -> String {
    t.to_string()
}

fn after(t: Timestamp, d: Duration) -> Timestamp {
    let d = SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX);
    t.checked_add(d).unwrap_or(Timestamp::MAX)
}

/// Time left from `now` until `t`, or `None` when `t` has passed.
fn remaining(now: Timestamp, t: Timestamp) -> Option<Duration> {
    if now >= t {
        return None;
    }
    Duration::try_from(t.duration_since(now)).ok()
}

fn meta_name(v: &Value) -> &str {
    v.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn meta_ns(v: &Value) -> &str {
    v.pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn meta_uid(v: &Value) -> &str {
    v.pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn empty() -> Value {
    json!({})
}

fn spec_of(v: &Value) -> &Value {
    static EMPTY: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    v.get("spec").unwrap_or_else(|| EMPTY.get_or_init(empty))
}

fn owned_by(v: &Value, uid: &str) -> bool {
    v.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .is_some_and(|refs| {
            refs.iter()
                .any(|r| r.get("uid").and_then(Value::as_str) == Some(uid))
        })
}

/// The canary's owner reference for objects it creates.
pub fn owner_reference(c: &RecordingCanary) -> OwnerReference {
    OwnerReference {
        api_version: "recordingcanary.dev/v1alpha1".into(),
        kind: "RecordingCanary".into(),
        name: c.name_any(),
        uid: c.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

fn our_labels(c: &RecordingCanary) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
        (CANARY_LABEL.to_string(), c.name_any()),
    ])
}

/// Whether the pod's controlling ReplicaSet belongs to Deployment `deploy`
/// (a Deployment names its ReplicaSets `<deployment>-<pod-template-hash>`).
pub fn pod_of_deployment(p: &PodFacts, deploy: &str) -> bool {
    meta_of_deployment(&p.metadata, deploy)
}

/// Hash of what the clone is built from: the target's pod template and the extra pod metadata.
pub fn source_hash(target_template: &PodTemplateSpec, c: &RecordingCanary) -> String {
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(target_template).unwrap_or_default());
    h.update(serde_json::to_vec(&c.spec.sidecar.pod_labels).unwrap_or_default());
    h.update(serde_json::to_vec(&c.spec.sidecar.pod_annotations).unwrap_or_default());
    let digest = h.finalize();
    digest.iter().take(10).map(|b| format!("{b:02x}")).collect()
}

/// The labels of the clone's pods: the target's template labels, `sidecar.podLabels` over
/// them, and the recording role.
pub fn clone_pod_labels(c: &RecordingCanary, target: &Deployment) -> BTreeMap<String, String> {
    let mut labels = target
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    labels.extend(c.spec.sidecar.pod_labels.clone());
    labels.insert(ROLE_LABEL.into(), ROLE_RECORDING.into());
    labels
}

/// Whether the target's pod template or selector carries the role label, which only the
/// controller may set.
pub fn target_carries_role_label(target: &Deployment) -> bool {
    target.spec.as_ref().is_some_and(|s| {
        s.template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.as_ref())
            .is_some_and(|l| l.contains_key(ROLE_LABEL))
            || s.selector
                .match_labels
                .as_ref()
                .is_some_and(|l| l.contains_key(ROLE_LABEL))
    })
}

/// What in the target's pod spec asks for privileges the controller does not give a clone (the
/// chart's admission fences refuse them on clones): host namespaces, hostPath volumes,
/// privileged containers, added capabilities. Empty: none.
pub fn privileges(target: &Deployment) -> Vec<String> {
    let Some(spec) = target.spec.as_ref().and_then(|s| s.template.spec.as_ref()) else {
        return Vec::new();
    };
    let mut what = Vec::new();
    for (on, name) in [
        (spec.host_network, "hostNetwork"),
        (spec.host_pid, "hostPID"),
        (spec.host_ipc, "hostIPC"),
    ] {
        if on == Some(true) {
            what.push(name.to_string());
        }
    }
    if spec.volumes.iter().flatten().any(|v| v.host_path.is_some()) {
        what.push("hostPath volumes".to_string());
    }
    let containers = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    for ct in containers {
        let sc = ct.security_context.as_ref();
        if sc.and_then(|s| s.privileged) == Some(true) {
            what.push(format!("a privileged container ({})", ct.name));
        }
        if sc
            .and_then(|s| s.capabilities.as_ref())
            .and_then(|c| c.add.as_ref())
            .is_some_and(|a| !a.is_empty())
        {
            what.push(format!("added capabilities ({})", ct.name));
        }
    }
    what
}

/// The clone Deployment for `target` at `replicas`.
pub fn build_clone(c: &RecordingCanary, target: &Deployment, replicas: i32) -> Deployment {
    let tspec = target.spec.clone().unwrap_or_default();
    let mut template = tspec.template.clone();
    let hash = source_hash(&template, c);
    let tmeta = template.metadata.get_or_insert_with(ObjectMeta::default);
    tmeta.labels = Some(clone_pod_labels(c, target));
    if !c.spec.sidecar.pod_annotations.is_empty() {
        tmeta
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .extend(c.spec.sidecar.pod_annotations.clone());
    }
    let mut selector: LabelSelector = tspec.selector.clone();
    selector
        .match_labels
        .get_or_insert_with(BTreeMap::new)
        .insert(ROLE_LABEL.into(), ROLE_RECORDING.into());
    let mut annotations = c.spec.clone_annotations();
    annotations.insert(SOURCE_HASH_ANNOTATION.into(), hash);
    Deployment {
        metadata: ObjectMeta {
            name: Some(c.spec.clone_name()),
            namespace: c.namespace(),
            labels: Some(our_labels(c)),
            annotations: Some(annotations),
            owner_references: Some(vec![owner_reference(c)]),
            ..Default::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector,
            template,
            strategy: tspec.strategy.clone(),
            min_ready_seconds: tspec.min_ready_seconds,
            progress_deadline_seconds: tspec.progress_deadline_seconds,
            revision_history_limit: Some(2),
            paused: None,
        }),
        status: None,
    }
}

/// Replicas for the clone: `ceil(target × percent / 100)`, at least 1 while `spec_percent > 0`,
/// at most `max`.
pub fn clone_replicas(
    target_replicas: i32,
    sizing_percent: i32,
    spec_percent: i32,
    max: Option<i32>,
) -> i32 {
    if spec_percent <= 0 {
        return 0;
    }
    let t = i64::from(target_replicas.max(0));
    let p = i64::from(sizing_percent.clamp(0, 100));
    let r = ((t * p + 99) / 100).max(1) as i32;
    match max {
        Some(m) => r.min(m.max(1)),
        None => r,
    }
}

/// The first older RecordingCanary that claims the same target or Service, if any.
fn first_rival<'r>(o: &'r Observed<'r>) -> Option<&'r Rival> {
    let c = o.canary;
    let me = (
        c.metadata.creation_timestamp.as_ref().map(|t| t.0),
        c.name_any(),
    );
    // Holding the clone settles it.
    if o.clone
        .is_some_and(|cl| cl.labels().get(CANARY_LABEL) == Some(&c.name_any()))
    {
        return None;
    }
    o.rivals
        .iter()
        .filter(|r| r.name != me.1)
        .filter(|r| r.target == c.spec.target_ref.name || r.service == c.spec.service_name())
        .filter(|r| (r.created, r.name.clone()) < me)
        .min_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)))
}

/// Whether the role label is someone else's on this canary's pods: the target's template carries
/// it, or the Service selects on it. Then the controller neither sets it nor removes it (the
/// canary blocks with `TargetCarriesRoleLabel` or `ServiceSelectsRoleLabel`): relabelling would
/// release pods from their ReplicaSet, or move the Service's endpoints.
fn role_label_is_not_ours(o: &Observed) -> bool {
    o.service_selector.contains_key(ROLE_LABEL) || o.target.is_some_and(target_carries_role_label)
}

/// Istio's root namespace: its DestinationRules are the last resort, so they don't shadow ours.
fn is_root_namespace(ns: &str) -> bool {
    ns == istio::ROOT_NAMESPACE
}

/// The DestinationRule for a wildcard host whose traffic policy applies to the Service's host
/// now: the most specific one in the Service's namespace, else in the root namespace (Istio's
/// lookup for clients elsewhere). A DestinationRule for the exact host, which a canary creates
/// when there is none, replaces it for that host, so the canary carries its policy over.
fn wildcard_policy<'o>(o: &'o Observed, host: &ServiceHost) -> Option<(&'o Value, &'o Value)> {
    let best_in = |ns: &str| {
        o.destination_rules
            .iter()
            .filter(|d| meta_ns(d) == ns && d.pointer("/spec/workloadSelector").is_none())
            .filter_map(|d| {
                let w = istio::Wildcard::of(
                    d.pointer("/spec/host").and_then(Value::as_str)?,
                    o.cluster_domain,
                )?;
                w.matches(&host.name, &host.namespace)
                    .then_some((w.specificity(), d))
            })
            .max_by_key(|(specificity, d)| (*specificity, std::cmp::Reverse(meta_name(d))))
            .map(|(_, d)| d)
    };
    let d = best_in(&host.namespace).or_else(|| best_in(istio::ROOT_NAMESPACE))?;
    Some((d, d.pointer("/spec/trafficPolicy")?))
}

/// Plans one reconcile of a RecordingCanary, in stages: safety (in every phase), the checks
/// that may block progress, progress, the report.
pub fn plan(o: &Observed) -> Plan {
    let mut b = Builder::new(o);
    let c = o.canary;
    let has_finalizer = c.finalizers().iter().any(|f| f == FINALIZER);
    let router = router::chosen(o);
    b.status.router = Some(router);
    if c.metadata.deletion_timestamp.is_some() {
        if !has_finalizer {
            return b.finish();
        }
        return rollback::plan_rollback(b);
    }
    if !has_finalizer {
        b.actions.push(Action::AddFinalizer);
    }
    // A time-boxed recording whose time ran out: production put back, the canary kept.
    if timebox::is_over(o) {
        return rollback::plan_put_back(b, rollback::End::Duration);
    }
    timebox::clock(o, plan_running(b, router))
}

/// The stages of a running canary.
fn plan_running(mut b: Builder, router: Router) -> Plan {
    let o = b.o;
    let c = o.canary;
    // 1. Safety, whatever blocks: the target's pods join the stable subset as they appear (no
    // subset without routes: the Replicas router splits by endpoints alone).
    if router != Router::Replicas {
        safety::label_target_pods(&mut b);
    }
    let health = safety::clone_health(&b);
    // 2. The checks that may block progress; blocked, a sick clone is still drained.
    let checked = match block::check(o) {
        Ok(k) => k,
        Err(why) => {
            let spec = c.spec.validate().ok();
            let meanwhile = safety::while_blocked(&mut b, health, spec.as_ref());
            return b.blocked(&why, meanwhile);
        }
    };
    // 3. Progress, and the report.
    match checked.routing {
        router::Routing::Replicas => router::replicas::plan_progress(b, &checked, health),
        _ => progress::plan_progress(b, &checked, health),
    }
}

/// The Deployment controller gave up waiting for the clone's rollout (ProgressDeadlineExceeded).
fn clone_stalled(d: &Deployment) -> bool {
    d.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.type_ == "Progressing"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
            })
        })
}

/// Whether the VirtualService's routes are exactly its split at `percent`.
fn splits_at(v: &Value, host: &ServiceHost, shape: &istio::Shape, canary: &str) -> bool {
    let note = istio::restore_note_of(v);
    let s = istio::split_http(spec_of(v), host, meta_ns(v), shape, note, canary);
    spec_of(v).get("http") == Some(&s.http)
}

/// The split's shape at a percent, owned: what the routes are written with.
struct Shaped {
    /// The weight the canary gives the clone (what the status reports).
    nominal: i32,
    /// The weight of the split route: `nominal`, or 0 when a session key keeps the requests
    /// without a key off the clone.
    split: i32,
    mirror: bool,
    always: Vec<Value>,
    never: Vec<Value>,
}

impl Shaped {
    /// The shape as the routing modules take it.
    fn view(&self) -> istio::Shape<'_> {
        istio::Shape {
            percent: self.split,
            mirror: self.mirror,
            always: &self.always,
            never: &self.never,
        }
    }
}

/// The split's shape at `percent`: the spec's mode and excluded requests, and its forced ones
/// only while the clone may get traffic (`clone_serves`). With a session key, the keys in the
/// share at `percent` are forced onto the clone (while it may get traffic) and the others kept
/// off it (see [`crate::api::session`]).
fn shape(spec: &ValidSpec, percent: i32, clone_serves: bool) -> Shaped {
    let mut always = if clone_serves {
        spec.always.clone()
    } else {
        Vec::new()
    };
    let mut never = spec.never.clone();
    let mut split = percent;
    if let Some(k) = &spec.session_key {
        let m = k.matches(percent);
        if clone_serves {
            always.extend(m.inside);
        }
        never.extend(m.outside);
        if k.without_key == crate::api::session::WithoutKey::Stable {
            split = 0;
        }
    }
    Shaped {
        nominal: percent,
        split,
        mirror: spec.mode == Mode::Mirror,
        always,
        never,
    }
}

/// Whether the clone's capture and sidecar annotations are not what the spec asks for: one
/// missing or different, or the annotation of another capture mode still there.
fn sidecar_annotations_differ(c: &RecordingCanary, clone: &Deployment) -> bool {
    let have = clone.annotations();
    c.spec
        .clone_annotations()
        .iter()
        .any(|(k, v)| have.get(k) != Some(v))
        || c.spec
            .unwanted_capture_annotations()
            .iter()
            .any(|k| have.contains_key(*k))
}

/// Name of a VirtualService or DestinationRule the canary creates: never the name a user's
/// object would have, so that re-applying a user's object can never update one of ours.
pub fn owned_mesh_name(c: &RecordingCanary) -> String {
    format!("{}-recording", c.name_any())
}

fn owned_meta(c: &RecordingCanary) -> Value {
    json!({
        "name": owned_mesh_name(c),
        "namespace": c.namespace(),
        "labels": our_labels(c),
        "ownerReferences": [owner_reference(c)],
    })
}

fn owned_vs(c: &RecordingCanary, host: &ServiceHost) -> Value {
    let vs = istio::virtual_service_resource();
    json!({
        "apiVersion": vs.api_version,
        "kind": vs.kind,
        "metadata": owned_meta(c),
        "spec": {"hosts": [host.fqdn()], "http": [{"route": [{"destination": {"host": host.fqdn()}}]}]},
    })
}

fn owned_dr(c: &RecordingCanary, host: &ServiceHost, policy: Option<&Value>) -> Value {
    let dr = istio::destination_rule_resource();
    let mut spec = json!({"host": host.fqdn(), "subsets": istio::our_subsets()});
    if let Some(p) = policy {
        spec["trafficPolicy"] = p.clone();
    }
    json!({
        "apiVersion": dr.api_version,
        "kind": dr.kind,
        "metadata": owned_meta(c),
        "spec": spec,
    })
}

#[cfg(test)]
mod tests;
