//! The planner: a pure function from what was observed to what should be, and in which order.
//!
//! It never talks to the API server. [`plan`] takes a snapshot ([`Observed`]) and returns the
//! ordered [`Action`]s, the status to report and the events to publish. Every step that must wait
//! (propagation of a DestinationRule to the Envoys, a ramp interval) is expressed as a requeue,
//! and the times it waits from live in the status, so a restarted controller resumes where it was.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    Condition, LabelSelector, ObjectMeta, OwnerReference, Time,
};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::admission::StableLabelling;
use crate::api::{
    CANARY_LABEL, FINALIZER, ROLE_LABEL, ROLE_RECORDING, ROLE_STABLE, RecordingCanary,
    RecordingCanaryStatus, SOURCE_HASH_ANNOTATION, ValidSpec,
};
use crate::istio::{self, ServiceHost};

/// Label every object created by the controller carries.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "recording-canary");

/// Another RecordingCanary in the same namespace, as far as conflicts go.
#[derive(Debug, Clone, PartialEq)]
pub struct Rival {
    pub name: String,
    pub created: Option<Timestamp>,
    pub target: String,
    pub service: String,
    pub deleting: bool,
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
    pub pods: &'a [Pod],
    /// VirtualServices in the canary's namespace (full objects as JSON).
    pub virtual_services: &'a [Value],
    /// DestinationRules in the canary's namespace, and any elsewhere whose host is the Service's.
    pub destination_rules: &'a [Value],
    pub rivals: &'a [Rival],
    /// Who labels the target's new pods (reported in the status).
    pub stable_labelling: StableLabelling,
}

/// Which Istio kind an action is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshKind {
    VirtualService,
    DestinationRule,
}

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
}

/// An Event to publish on the RecordingCanary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventNote {
    pub warning: bool,
    pub reason: String,
    pub note: String,
}

/// The planner's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub status: RecordingCanaryStatus,
    pub events: Vec<EventNote>,
    /// Come back after this long even if nothing changes (a wait is running).
    pub requeue_after: Option<Duration>,
}

/// Phases shown in `kubectl get rcanary`.
pub mod phase {
    pub const PROGRESSING: &str = "Progressing";
    pub const READY: &str = "Ready";
    pub const DEGRADED: &str = "Degraded";
    pub const BLOCKED: &str = "Blocked";
    pub const TERMINATING: &str = "Terminating";
}

struct Builder<'a> {
    o: &'a Observed<'a>,
    prev: RecordingCanaryStatus,
    status: RecordingCanaryStatus,
    actions: Vec<Action>,
    events: Vec<EventNote>,
    requeue: Option<Duration>,
}

impl<'a> Builder<'a> {
    fn new(o: &'a Observed<'a>) -> Self {
        let prev = o.canary.status.clone().unwrap_or_default();
        let mut status = prev.clone();
        status.observed_generation = o.canary.metadata.generation;
        status.clone_name = Some(o.canary.spec.clone_name());
        status.stable_labelling = Some(o.stable_labelling.as_str().into());
        Self {
            o,
            prev,
            status,
            actions: Vec::new(),
            events: Vec::new(),
            requeue: None,
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
    fn report(&mut self, phase: &str, reason: &str, message: &str) {
        let ready = phase == phase::READY;
        let degraded = phase == phase::DEGRADED;
        let progressing = phase == phase::PROGRESSING;
        // The reason belongs to the condition it explains; the others say where things stand.
        let ready_reason = reason;
        let progressing_reason = if progressing { reason } else { phase };
        let degraded_reason = if degraded { reason } else { "NotDegraded" };
        self.condition("Ready", ready, ready_reason, message);
        self.condition("Progressing", progressing, progressing_reason, message);
        self.condition("Degraded", degraded, degraded_reason, message);
        // Events mark transitions: a new phase, or a new problem (Blocked, Degraded); progress
        // within a phase shows in the conditions.
        let warning = degraded || phase == phase::BLOCKED;
        if self.prev.phase.as_deref() != Some(phase) || (warning && self.reason_changed(reason)) {
            self.event(warning, reason, message.to_string());
        }
        self.status.phase = Some(phase.into());
    }

    fn reason_changed(&self, reason: &str) -> bool {
        self.prev
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .is_none_or(|c| c.reason != reason)
    }

    fn finish(self) -> Plan {
        Plan {
            actions: self.actions,
            status: self.status,
            events: self.events,
            requeue_after: self.requeue,
        }
    }

    /// Stop here: nothing is changed, the reason is reported.
    fn blocked(mut self, reason: &str, message: String) -> Plan {
        self.report(phase::BLOCKED, reason, &message);
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

fn pod_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_crash_looping(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.state
                    .as_ref()
                    .and_then(|s| s.waiting.as_ref())
                    .and_then(|w| w.reason.as_deref())
                    == Some("CrashLoopBackOff")
            })
        })
}

/// Whether the pod's controlling ReplicaSet belongs to Deployment `deploy`
/// (a Deployment names its ReplicaSets `<deployment>-<pod-template-hash>`).
pub fn pod_of_deployment(p: &Pod, deploy: &str) -> bool {
    meta_of_deployment(&p.metadata, deploy)
}

/// [`pod_of_deployment`] on a pod's metadata alone (what a metadata-only watch delivers).
pub fn meta_of_deployment(meta: &ObjectMeta, deploy: &str) -> bool {
    let Some(hash) = meta
        .labels
        .as_ref()
        .and_then(|l| l.get("pod-template-hash"))
    else {
        return false;
    };
    let rs = format!("{deploy}-{hash}");
    meta.owner_references.as_ref().is_some_and(|o| {
        o.iter()
            .any(|r| r.controller == Some(true) && r.kind == "ReplicaSet" && r.name == rs)
    })
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

/// The clone Deployment for `target` at `replicas`.
pub fn build_clone(c: &RecordingCanary, target: &Deployment, replicas: i32) -> Deployment {
    let tspec = target.spec.clone().unwrap_or_default();
    let mut template = tspec.template.clone();
    let hash = source_hash(&template, c);
    let tmeta = template.metadata.get_or_insert_with(ObjectMeta::default);
    let labels = tmeta.labels.get_or_insert_with(BTreeMap::new);
    labels.extend(c.spec.sidecar.pod_labels.clone());
    labels.insert(ROLE_LABEL.into(), ROLE_RECORDING.into());
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

enum Choice<'v> {
    Adopt(&'v Value),
    /// Create one of our own (or it exists already and is ours).
    Own(Option<&'v Value>),
}

fn choose_vs<'v>(
    o: &'v Observed<'v>,
    host: &ServiceHost,
    uid: &str,
) -> Result<Choice<'v>, (String, String)> {
    let ns = o.canary.namespace().unwrap_or_default();
    let (mesh, elsewhere): (Vec<&Value>, Vec<&Value>) = o
        .virtual_services
        .iter()
        .filter(|v| {
            istio::is_mesh_bound(spec_of(v)) && istio::vs_has_host(spec_of(v), host, meta_ns(v))
        })
        .partition(|v| meta_ns(v) == ns);
    if let Some(other) = elsewhere.first() {
        return Err((
            "AmbiguousVirtualService".into(),
            format!(
                "VirtualService {}/{} in another namespace routes host {} for the mesh; Istio applies only one VirtualService per host, so a split here might not take effect. Move the routing into namespace {ns}",
                meta_ns(other),
                meta_name(other),
                host.fqdn()
            ),
        ));
    }
    choose(
        ("VirtualService", "virtualService"),
        o.canary.spec.virtual_service.as_deref(),
        o.virtual_services,
        mesh,
        (&ns, uid),
        host,
    )
}

fn choose_dr<'v>(
    o: &'v Observed<'v>,
    host: &ServiceHost,
    uid: &str,
) -> Result<Choice<'v>, (String, String)> {
    let ns = o.canary.namespace().unwrap_or_default();
    let dr_host = |v: &Value| {
        v.pointer("/spec/host")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    if let Some(other) = o.destination_rules.iter().find(|v| {
        meta_ns(v) != ns && host.matches(&dr_host(v), meta_ns(v)) && !is_root_namespace(meta_ns(v))
    }) {
        return Err((
            "ShadowingDestinationRule".into(),
            format!(
                "DestinationRule {}/{} also configures host {}; for clients in its namespace it takes precedence over the subsets here",
                meta_ns(other),
                meta_name(other),
                host.fqdn()
            ),
        ));
    }
    let local: Vec<&Value> = o
        .destination_rules
        .iter()
        .filter(|v| {
            meta_ns(v) == ns
                && host.matches(&dr_host(v), &ns)
                && v.pointer("/spec/workloadSelector").is_none()
        })
        .collect();
    choose(
        ("DestinationRule", "destinationRule"),
        o.canary.spec.destination_rule.as_deref(),
        o.destination_rules,
        local,
        (&ns, uid),
        host,
    )
}

/// The object to work on: the one `named` in the spec, else the only candidate for the host
/// (ours or the user's), else one to create. Never a guess between several.
fn choose<'v>(
    (kind, field): (&str, &str),
    named: Option<&str>,
    all: &'v [Value],
    candidates: Vec<&'v Value>,
    (ns, uid): (&str, &str),
    host: &ServiceHost,
) -> Result<Choice<'v>, (String, String)> {
    if let Some(name) = named {
        return match all
            .iter()
            .find(|v| meta_name(v) == name && meta_ns(v) == ns)
        {
            Some(v) if owned_by(v, uid) => Ok(Choice::Own(Some(v))),
            Some(v) => Ok(Choice::Adopt(v)),
            None => Err((
                format!("{kind}NotFound"),
                format!("{kind} {ns}/{name} named in spec.{field} does not exist"),
            )),
        };
    }
    let (owned, foreign): (Vec<&Value>, Vec<&Value>) =
        candidates.into_iter().partition(|v| owned_by(v, uid));
    match (foreign.as_slice(), owned.as_slice()) {
        ([], []) => Ok(Choice::Own(None)),
        ([], [mine]) => Ok(Choice::Own(Some(mine))),
        ([one], []) => Ok(Choice::Adopt(one)),
        _ => {
            let names: Vec<&str> = foreign
                .iter()
                .chain(owned.iter())
                .map(|v| meta_name(v))
                .collect();
            Err((
                format!("Ambiguous{kind}"),
                format!(
                    "{} {kind}s configure host {} ({}); Istio would apply only one of them. Merge them, or name one in spec.{field}",
                    names.len(),
                    host.fqdn(),
                    names.join(", ")
                ),
            ))
        }
    }
}

/// Istio's root namespace: its DestinationRules are the last resort, so they don't shadow ours.
fn is_root_namespace(ns: &str) -> bool {
    ns == "istio-system"
}

/// Plans one reconcile of a RecordingCanary.
pub fn plan(o: &Observed) -> Plan {
    let mut b = Builder::new(o);
    let c = o.canary;
    let has_finalizer = c.finalizers().iter().any(|f| f == FINALIZER);
    if c.metadata.deletion_timestamp.is_some() {
        if !has_finalizer {
            return b.finish();
        }
        return plan_rollback(b);
    }
    if !has_finalizer {
        b.actions.push(Action::AddFinalizer);
    }
    let spec = match c.spec.validate() {
        Ok(s) => s,
        Err(e) => return b.blocked("InvalidSpec", e.0),
    };
    if let Some(r) = first_rival(o) {
        return b.blocked(
            "Conflict",
            format!(
                "RecordingCanary {} already records Deployment {} / Service {}; this one changes nothing while it exists",
                r.name, r.target, r.service
            ),
        );
    }
    let Some(target) = o.target else {
        return b.blocked(
            "TargetNotFound",
            format!(
                "Deployment {} not found in namespace {}",
                c.spec.target_ref.name,
                c.namespace().unwrap_or_default()
            ),
        );
    };
    // The target's pods join the stable subset as soon as they exist, whatever else blocks this
    // canary: a VirtualService already split must never see its stable subset shrink (for
    // instance while the target rolls out a new version and this canary reports a problem).
    label_target_pods(&mut b, &c.spec.target_ref.name);
    if !o.service_exists {
        return b.blocked(
            "ServiceNotFound",
            format!(
                "Service {} not found in namespace {}",
                c.spec.service_name(),
                c.namespace().unwrap_or_default()
            ),
        );
    }
    if let Some(cl) = o.clone
        && cl.labels().get(CANARY_LABEL) != Some(&c.name_any())
    {
        return b.blocked(
            "CloneNameTaken",
            format!(
                "Deployment {} exists and was not created by this RecordingCanary",
                c.spec.clone_name()
            ),
        );
    }
    plan_active(b, &spec, target)
}

/// Labels the target's pods that lack the stable role (never the clone's, never terminating ones).
fn label_target_pods(b: &mut Builder, target_name: &str) {
    for p in b.o.pods.iter() {
        if pod_of_deployment(p, target_name)
            && p.metadata.deletion_timestamp.is_none()
            && !matches!(
                p.labels().get(ROLE_LABEL).map(String::as_str),
                Some(ROLE_STABLE) | Some(ROLE_RECORDING)
            )
        {
            b.actions.push(Action::LabelPod { name: p.name_any() });
        }
    }
}

fn plan_active(mut b: Builder, spec: &ValidSpec, target: &Deployment) -> Plan {
    let o = b.o;
    let c = o.canary;
    let ns = c.namespace().unwrap_or_default();
    let uid = c.metadata.uid.clone().unwrap_or_default();
    let host = ServiceHost::new(c.spec.service_name(), &ns, o.cluster_domain);
    let vs_choice = match choose_vs(o, &host, &uid) {
        Ok(v) => v,
        Err((reason, msg)) => return b.blocked(&reason, msg),
    };
    let dr_choice = match choose_dr(o, &host, &uid) {
        Ok(v) => v,
        Err((reason, msg)) => return b.blocked(&reason, msg),
    };
    if let Choice::Adopt(vs) = vs_choice {
        if !istio::vs_routes_to_host(spec_of(vs), &host, meta_ns(vs)) {
            return b.blocked(
                "NoRouteToService",
                format!(
                    "VirtualService {} has no HTTP route to host {}",
                    meta_name(vs),
                    host.fqdn()
                ),
            );
        }
        let st = istio::read_split(spec_of(vs), &host, meta_ns(vs));
        if st.pairs == 0 && st.unsplit == 0 {
            return b.blocked(
                "NoSplittableRoute",
                format!(
                    "every route of VirtualService {} to host {} names a subset of its own; only destinations without a subset can be split",
                    meta_name(vs),
                    host.fqdn()
                ),
            );
        }
        let (owner, _) = istio::parse_restore_note(istio::restore_note_of(vs));
        if let Some(owner) = owner.filter(|n| *n != c.name_any()) {
            return b.blocked(
                "Conflict",
                format!(
                    "VirtualService {} is already split by RecordingCanary {owner}",
                    meta_name(vs)
                ),
            );
        }
    }
    if let Choice::Adopt(dr) = dr_choice {
        let dr_host = dr
            .pointer("/spec/host")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !host.matches(dr_host, meta_ns(dr)) {
            return b.blocked(
                "DestinationRuleHostMismatch",
                format!(
                    "DestinationRule {} is for host {dr_host:?}, not {}; subsets there would not apply to this Service",
                    meta_name(dr),
                    host.fqdn()
                ),
            );
        }
    }
    if let Choice::Adopt(dr) = dr_choice
        && let Some(name) = istio::foreign_subset_with_our_name(spec_of(dr))
    {
        return b.blocked(
            "SubsetNameTaken",
            format!(
                "DestinationRule {} already has a subset {name} with other labels",
                meta_name(dr)
            ),
        );
    }
    let gateway_vss: Vec<&Value> = if c.spec.gateways.is_empty() {
        Vec::new()
    } else {
        o.virtual_services
            .iter()
            .filter(|v| {
                meta_ns(v) == ns
                    && !matches!(vs_choice, Choice::Adopt(a) if meta_name(a) == meta_name(v))
                    && istio::is_bound_to_gateways(spec_of(v), meta_ns(v), &c.spec.gateways, &ns)
                    && istio::vs_routes_to_host(spec_of(v), &host, meta_ns(v))
            })
            .collect()
    };

    // Every gateway listed must have a route to split: a typo would otherwise go unnoticed.
    let gateway_routes = |g: &String| {
        o.virtual_services.iter().any(|v| {
            meta_ns(v) == ns
                && istio::is_bound_to_gateways(spec_of(v), &ns, std::slice::from_ref(g), &ns)
                && istio::vs_routes_to_host(spec_of(v), &host, &ns)
        })
    };
    if let Some(g) = c.spec.gateways.iter().find(|g| !gateway_routes(g)) {
        return b.blocked(
            "GatewayRouteNotFound",
            format!(
                "no VirtualService in namespace {ns} bound to gateway {g} routes to host {}",
                host.fqdn()
            ),
        );
    }

    // The Service must front only the target (and the clone): the stable subset holds the
    // target's pods alone, so other workloads behind it would silently lose their mesh traffic.
    let target_name = &c.spec.target_ref.name;
    let clone_name = c.spec.clone_name();
    if !o.service_selector.is_empty() {
        let others: Vec<String> = o
            .pods
            .iter()
            .filter(|p| {
                p.metadata.deletion_timestamp.is_none()
                    && o.service_selector
                        .iter()
                        .all(|(k, v)| p.labels().get(k) == Some(v))
                    && !pod_of_deployment(p, target_name)
                    && !pod_of_deployment(p, &clone_name)
            })
            .map(|p| p.name_any())
            .collect();
        if !others.is_empty() {
            return b.blocked(
                "ServiceSelectsOtherPods",
                format!(
                    "Service {} also selects pods that are not Deployment {target_name}'s ({}); they would get no mesh traffic while split",
                    c.spec.service_name(),
                    others.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
                ),
            );
        }
    }

    // Pods: the target's (labelled above) and the clone's.
    let target_pods: Vec<&Pod> = o
        .pods
        .iter()
        .filter(|p| {
            pod_of_deployment(p, target_name)
                && p.labels().get(ROLE_LABEL).map(String::as_str) != Some(ROLE_RECORDING)
        })
        .collect();
    let clone_pods: Vec<&Pod> = o
        .pods
        .iter()
        .filter(|p| pod_of_deployment(p, &clone_name))
        .collect();
    let ready_target = target_pods.iter().filter(|p| pod_ready(p)).count();
    let ready_labeled = target_pods
        .iter()
        .filter(|p| {
            pod_ready(p) && p.labels().get(ROLE_LABEL).map(String::as_str) == Some(ROLE_STABLE)
        })
        .count();
    let stable_ready = ready_target > 0 && ready_labeled == ready_target;

    // 1. Subsets in the DestinationRule.
    b.status.destination_rule = Some(match dr_choice {
        Choice::Adopt(d) | Choice::Own(Some(d)) => format!("{}/{}", meta_ns(d), meta_name(d)),
        Choice::Own(None) => format!("{ns}/{}", owned_mesh_name(c)),
    });
    let dr_ok = match dr_choice {
        Choice::Adopt(d) | Choice::Own(Some(d)) => istio::has_our_subsets(spec_of(d)),
        Choice::Own(None) => false,
    };
    let now = o.now;
    if !dr_ok {
        // The time is reported with the status after the write; a crash in between is covered
        // by `Observed::started` (no earlier than the last write of this process, or its start).
        b.status.subsets_added_time = Some(fmt_time(now));
        match dr_choice {
            Choice::Adopt(d) | Choice::Own(Some(d)) => {
                let mut ops = istio::rv_test(d);
                let path = if spec_of(d).get("subsets").is_some() {
                    "replace"
                } else {
                    "add"
                };
                ops.push(json!({"op": path, "path": "/spec/subsets", "value": istio::with_our_subsets(spec_of(d))}));
                if matches!(dr_choice, Choice::Adopt(_)) && istio::restore_note_of(d).is_none() {
                    ops.extend(istio::annotation_ops(
                        d,
                        Some(&istio::dr_restore_note(spec_of(d), &c.name_any())),
                    ));
                }
                b.actions.push(Action::PatchMesh {
                    kind: MeshKind::DestinationRule,
                    name: meta_name(d).into(),
                    ops,
                });
            }
            Choice::Own(None) => b.actions.push(Action::CreateMesh {
                kind: MeshKind::DestinationRule,
                object: owned_dr(c, &host),
            }),
        }
    }
    let subsets_since = parse_time(b.status.subsets_added_time.as_deref())
        .unwrap_or(o.started)
        .max(o.started);
    let subsets_propagated_at = after(subsets_since, spec.propagation_delay);

    // 2. The VirtualService split.
    let vs_obj: Option<&Value> = match vs_choice {
        Choice::Adopt(v) | Choice::Own(Some(v)) => Some(v),
        Choice::Own(None) => None,
    };
    let split = vs_obj
        .map(|v| istio::read_split(spec_of(v), &host, meta_ns(v)))
        .unwrap_or_default();
    let is_split = split.pairs > 0;
    // The percent read back from rounded weights is ambiguous on a shared route (80 at 7% and at
    // 8% both give 74/6): when the VS is exactly the split at the last reported percent, that is it.
    let current = match vs_obj {
        Some(v) if is_split && splits_at(v, &host, b.prev.current_percent, &c.name_any()) => {
            b.prev.current_percent
        }
        _ if is_split => split.percent.unwrap_or(0),
        _ => 0,
    };
    b.status.virtual_services = std::iter::once(match vs_obj {
        Some(v) => format!("{}/{}", meta_ns(v), meta_name(v)),
        None => format!("{ns}/{}", owned_mesh_name(c)),
    })
    .chain(
        gateway_vss
            .iter()
            .map(|v| format!("{}/{}", meta_ns(v), meta_name(v))),
    )
    .collect();

    if !is_split {
        if !dr_ok {
            b.status.current_percent = 0;
            b.requeue(spec.propagation_delay);
            b.report(
                phase::PROGRESSING,
                "AddingSubsets",
                "Waiting for the DestinationRule subsets to reach the sidecars",
            );
            return b.finish();
        }
        if let Some(wait) = remaining(now, subsets_propagated_at) {
            b.status.current_percent = 0;
            b.requeue(wait);
            b.report(
                phase::PROGRESSING,
                "AddingSubsets",
                "Waiting for the DestinationRule subsets to reach the sidecars",
            );
            return b.finish();
        }
        if !stable_ready {
            b.status.current_percent = 0;
            b.report(
                phase::PROGRESSING,
                "WaitingForStablePods",
                &format!("{ready_labeled} of {ready_target} ready pods of Deployment {target_name} are in the stable subset"),
            );
            return b.finish();
        }
    }

    // 3. The clone, and the weight it may take.
    let target_replicas = target.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    b.status.target_replicas = target_replicas;
    let clone_ready = o
        .clone
        .and_then(|d| d.status.as_ref())
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    b.status.clone_ready_replicas = clone_ready;
    let crash = clone_pods.iter().any(|p| pod_crash_looping(p));
    let healthy = o.clone.is_some() && clone_ready >= 1 && !crash;
    let prev_step = parse_time(b.prev.last_step_time.as_deref());
    let (desired, sizing) = if spec.percent == 0 || !healthy {
        let sizing = match spec.ramp {
            Some((step, _)) => step.min(spec.percent),
            None => spec.percent,
        };
        (0, sizing)
    } else {
        match spec.ramp {
            None => (spec.percent, spec.percent),
            Some(_) if current >= spec.percent => (spec.percent, spec.percent),
            Some((step, interval)) => {
                let due = prev_step.map(|t| after(t, interval));
                match due.and_then(|d| remaining(now, d)) {
                    Some(wait) => {
                        b.requeue(wait);
                        (current, (current + step).min(spec.percent))
                    }
                    None => {
                        let next = (current + step).min(spec.percent);
                        b.status.last_step_time = Some(fmt_time(now));
                        if next < spec.percent {
                            b.requeue(interval);
                        }
                        (next, (next + step).min(spec.percent))
                    }
                }
            }
        }
    };

    // The weight rises only as far as the clone's Ready replicas carry it: the replicas sized
    // for a weight are Ready before it gets that weight. This never lowers a weight (an HPA
    // scaling the target up must not move weights).
    let capacity = (0..=100)
        .rev()
        .find(|w| {
            clone_replicas(target_replicas, *w, spec.percent, spec.max_replicas) <= clone_ready
        })
        .unwrap_or(0);
    let capped = desired > current && desired > capacity;
    let desired = if capped {
        current.max(capacity)
    } else {
        desired
    };
    if capped {
        // The step is taken when the capacity is there, not an interval later.
        b.status.last_step_time = b.prev.last_step_time.clone();
    }
    if let Some(t) = b.status.last_step_time.clone()
        && b.status.last_step_time != b.prev.last_step_time
    {
        b.actions.push(Action::RecordRampStep(t));
    }

    // The VS write: split it, or move its weights.
    let mut vs_targets: Vec<(Option<&Value>, bool)> =
        vec![(vs_obj, matches!(vs_choice, Choice::Own(_)))];
    vs_targets.extend(gateway_vss.iter().map(|v| (Some(*v), false)));
    let mut wrote_weight = false;
    for (v, own) in vs_targets {
        match v {
            None => {
                let base = owned_vs(c, &host);
                let s = istio::split_http(spec_of(&base), &host, &ns, desired, None, &c.name_any());
                let mut obj = base;
                obj["spec"]["http"] = s.http;
                b.actions.push(Action::CreateMesh {
                    kind: MeshKind::VirtualService,
                    object: obj,
                });
                wrote_weight = true;
            }
            Some(v) => {
                let st = istio::read_split(spec_of(v), &host, meta_ns(v));
                if st.pairs > 0 && st.unsplit == 0 && splits_at(v, &host, desired, &c.name_any()) {
                    continue;
                }
                let note = istio::restore_note_of(v);
                let s =
                    istio::split_http(spec_of(v), &host, meta_ns(v), desired, note, &c.name_any());
                let mut ops = istio::rv_test(v);
                let op = if spec_of(v).get("http").is_some() {
                    "replace"
                } else {
                    "add"
                };
                ops.push(json!({"op": op, "path": "/spec/http", "value": s.http}));
                if !own {
                    ops.extend(istio::annotation_ops(v, Some(&s.note)));
                }
                b.actions.push(Action::PatchMesh {
                    kind: MeshKind::VirtualService,
                    name: meta_name(v).into(),
                    ops,
                });
                wrote_weight = true;
            }
        }
    }
    // One Event when the clone first gets traffic, one per weight change after that.
    if wrote_weight && desired > 0 && current == 0 {
        b.event(
            false,
            "RoutesSplit",
            format!(
                "Routes to {} split between subsets {} and {}; {desired}% go to the recording clone",
                host.fqdn(),
                crate::api::STABLE_SUBSET,
                crate::api::RECORDING_SUBSET
            ),
        );
    } else if wrote_weight && desired != current {
        b.event(
            false,
            "WeightChanged",
            format!(
                "{}% of requests to {} now go to the recording clone (was {current}%)",
                desired,
                host.fqdn()
            ),
        );
    }
    b.status.current_percent = desired;

    // The clone follows the target's template and replicas.
    let replicas = clone_replicas(
        target_replicas,
        sizing.max(desired),
        spec.percent,
        spec.max_replicas,
    );
    b.status.clone_replicas = replicas;
    match o.clone {
        None => {
            b.actions.push(Action::CreateClone(Box::new(build_clone(
                c, target, replicas,
            ))));
        }
        Some(cl) => {
            let want_hash = target
                .spec
                .as_ref()
                .map(|s| source_hash(&s.template, c))
                .unwrap_or_default();
            let have_hash = cl
                .annotations()
                .get(SOURCE_HASH_ANNOTATION)
                .cloned()
                .unwrap_or_default();
            let have_replicas = cl.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            if want_hash != have_hash || sidecar_annotations_differ(c, cl) {
                let mut desired_clone = build_clone(c, target, replicas);
                desired_clone.metadata.resource_version = cl.resource_version();
                // Keep what others (e.g. an injecting webhook) put on the clone's metadata.
                let mut ann = cl.annotations().clone();
                ann.extend(
                    desired_clone
                        .metadata
                        .annotations
                        .take()
                        .unwrap_or_default(),
                );
                desired_clone.metadata.annotations = Some(ann);
                let mut labels = cl.labels().clone();
                labels.extend(desired_clone.metadata.labels.take().unwrap_or_default());
                desired_clone.metadata.labels = Some(labels);
                // The selector is immutable: keep the live one.
                if let (Some(ds), Some(ls)) = (desired_clone.spec.as_mut(), cl.spec.as_ref()) {
                    ds.selector = ls.selector.clone();
                }
                b.actions
                    .push(Action::ReplaceClone(Box::new(desired_clone)));
                b.event(
                    false,
                    "CloneSynced",
                    format!(
                        "Deployment {clone_name} follows the new pod template of {target_name}"
                    ),
                );
            } else if have_replicas != replicas {
                b.actions.push(Action::ScaleClone {
                    replicas,
                    from: cl.spec.as_ref().and_then(|s| s.replicas),
                });
                b.event(false, "CloneScaled", format!("Deployment {clone_name} scaled from {have_replicas} to {replicas} replicas ({target_name} has {target_replicas})"));
            }
        }
    }

    // 4. What to report.
    let msg_target = format!(
        "{desired}% of requests go to the recording clone (target {}%)",
        spec.percent
    );
    if spec.percent > 0 && !healthy {
        let was_serving = current > 0 || b.prev.phase.as_deref() == Some(phase::DEGRADED);
        if crash {
            b.report(
                phase::DEGRADED,
                "CloneCrashLooping",
                &format!(
                    "A pod of {clone_name} is in CrashLoopBackOff; no traffic goes to the clone"
                ),
            );
        } else if o.clone.is_some_and(clone_stalled) {
            b.report(
                phase::DEGRADED,
                "CloneStalled",
                &format!(
                    "{clone_name} has made no progress within its progressDeadlineSeconds (image pull, scheduling or readiness?); no traffic goes to the clone"
                ),
            );
        } else if o.clone.is_some() && was_serving {
            b.report(
                phase::DEGRADED,
                "CloneNotReady",
                &format!("{clone_name} has no ready replica; no traffic goes to the clone"),
            );
        } else {
            b.report(
                phase::PROGRESSING,
                "WaitingForClone",
                &format!("Waiting for a ready replica of {clone_name}"),
            );
        }
    } else if capped {
        b.report(
            phase::PROGRESSING,
            "WaitingForCloneCapacity",
            &format!(
                "{clone_ready} of {replicas} replicas of {clone_name} are Ready; the weight stays at {desired}% until the clone can carry more (target {}%)",
                spec.percent
            ),
        );
    } else if desired == spec.percent {
        b.report(phase::READY, "TargetReached", &msg_target);
    } else {
        b.report(phase::PROGRESSING, "Ramping", &msg_target);
    }
    b.finish()
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
fn splits_at(v: &Value, host: &ServiceHost, percent: i32, canary: &str) -> bool {
    let note = istio::restore_note_of(v);
    let s = istio::split_http(spec_of(v), host, meta_ns(v), percent, note, canary);
    spec_of(v).get("http") == Some(&s.http)
}

fn sidecar_annotations_differ(c: &RecordingCanary, clone: &Deployment) -> bool {
    let have = clone.annotations();
    c.spec
        .clone_annotations()
        .iter()
        .any(|(k, v)| have.get(k) != Some(v))
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

fn owned_dr(c: &RecordingCanary, host: &ServiceHost) -> Value {
    let dr = istio::destination_rule_resource();
    json!({
        "apiVersion": dr.api_version,
        "kind": dr.kind,
        "metadata": owned_meta(c),
        "spec": {"host": host.fqdn(), "subsets": istio::our_subsets()},
    })
}

/// Rollback on deletion: traffic back to stable, wait, subsets out, clone gone, labels off,
/// finalizer off. Every step tolerates objects that are already gone.
fn plan_rollback(mut b: Builder) -> Plan {
    let o = b.o;
    let c = o.canary;
    let ns = c.namespace().unwrap_or_default();
    let uid = c.metadata.uid.clone().unwrap_or_default();
    let me = c.name_any();
    if b.prev.phase.as_deref() != Some(phase::TERMINATING) {
        b.event(
            false,
            "RollbackStarted",
            "Deleting: traffic goes back to stable, then subsets, clone and labels are removed"
                .into(),
        );
    }
    b.status.phase = Some(phase::TERMINATING.into());
    if first_rival(o).is_some() {
        // This one never changed anything.
        b.actions.push(Action::RemoveFinalizer);
        return b.finish();
    }
    let delay = c
        .spec
        .validate()
        .map(|s| s.propagation_delay)
        .unwrap_or(Duration::from_secs(3));
    let host = ServiceHost::new(c.spec.service_name(), &ns, o.cluster_domain);
    let now = o.now;

    // 1. Traffic back to stable.
    let mut vs_writes = Vec::new();
    for v in o.virtual_services.iter().filter(|v| meta_ns(v) == ns) {
        let st = istio::read_split(spec_of(v), &host, meta_ns(v));
        let (note_owner, _) = istio::parse_restore_note(istio::restore_note_of(v));
        let ours = owned_by(v, &uid) || note_owner.as_deref() == Some(me.as_str());
        if owned_by(v, &uid) {
            vs_writes.push(Action::DeleteMesh {
                kind: MeshKind::VirtualService,
                name: meta_name(v).into(),
                uid: meta_uid(v).into(),
            });
            continue;
        }
        if !(st.references_subsets && (ours || note_owner.is_none()))
            && !(ours && istio::restore_note_of(v).is_some())
        {
            continue;
        }
        let http = istio::unsplit_http(spec_of(v), &host, meta_ns(v), istio::restore_note_of(v));
        let mut ops = istio::rv_test(v);
        if spec_of(v).get("http").is_some() {
            ops.push(json!({"op": "replace", "path": "/spec/http", "value": http}));
        }
        ops.extend(istio::annotation_ops(v, None));
        vs_writes.push(Action::PatchMesh {
            kind: MeshKind::VirtualService,
            name: meta_name(v).into(),
            ops,
        });
    }
    if !vs_writes.is_empty() {
        // Reported after the write; see `Observed::started` for a crash in between.
        b.status.routes_removed_time = Some(fmt_time(now));
        b.status.current_percent = 0;
        b.actions.extend(vs_writes);
        b.event(
            false,
            "TrafficRestored",
            format!(
                "Routes to {} restored; the recording clone gets no traffic",
                host.fqdn()
            ),
        );
        b.requeue(delay);
        return b.finish();
    }
    b.status.current_percent = 0;

    // 2. Wait for the routes to reach the sidecars.
    let since = parse_time(b.prev.routes_removed_time.as_deref())
        .unwrap_or(o.started)
        .max(o.started);
    if let Some(wait) = remaining(now, after(since, delay)) {
        b.requeue(wait);
        return b.finish();
    }

    // 3. Subsets out of the DestinationRule.
    for d in o.destination_rules.iter().filter(|d| meta_ns(d) == ns) {
        if owned_by(d, &uid) {
            b.actions.push(Action::DeleteMesh {
                kind: MeshKind::DestinationRule,
                name: meta_name(d).into(),
                uid: meta_uid(d).into(),
            });
            continue;
        }
        let (note_owner, absent) = istio::parse_dr_restore_note(istio::restore_note_of(d));
        let ours = note_owner.as_deref() == Some(me.as_str());
        let dr_host = d
            .pointer("/spec/host")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let for_host = host.matches(dr_host, &ns);
        if !(ours
            || (note_owner.is_none() && for_host && istio::has_any_of_our_subsets(spec_of(d))))
        {
            continue;
        }
        let mut ops = istio::rv_test(d);
        match istio::without_our_subsets(spec_of(d), absent) {
            Some(s) if spec_of(d).get("subsets").is_some() => {
                ops.push(json!({"op": "replace", "path": "/spec/subsets", "value": s}))
            }
            Some(_) => {}
            None => {
                if spec_of(d).get("subsets").is_some() {
                    ops.push(json!({"op": "remove", "path": "/spec/subsets"}));
                }
            }
        }
        ops.extend(istio::annotation_ops(d, None));
        b.actions.push(Action::PatchMesh {
            kind: MeshKind::DestinationRule,
            name: meta_name(d).into(),
            ops,
        });
    }

    // 4. The clone.
    if let Some(cl) = o.clone
        && cl.labels().get(CANARY_LABEL) == Some(&me)
        && cl.metadata.deletion_timestamp.is_none()
    {
        b.actions.push(Action::DeleteClone {
            uid: cl.metadata.uid.clone().unwrap_or_default(),
        });
    }

    // 5. Labels on the target's pods.
    for p in o
        .pods
        .iter()
        .filter(|p| pod_of_deployment(p, &c.spec.target_ref.name))
    {
        if p.labels().get(ROLE_LABEL).map(String::as_str) == Some(ROLE_STABLE) {
            b.actions.push(Action::UnlabelPod { name: p.name_any() });
        }
    }

    // 6. Done.
    b.actions.push(Action::RemoveFinalizer);
    b.event(
        false,
        "RolledBack",
        format!(
            "Traffic, subsets, clone and labels of {} removed",
            c.spec.target_ref.name
        ),
    );
    b.finish()
}

#[cfg(test)]
#[path = "planner_tests.rs"]
mod tests;
