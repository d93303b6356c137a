//! Stage 1: what keeps production safe in every phase, whatever blocks progress.
//!
//! - The target's pods join the stable subset as soon as they exist: a VirtualService already
//!   split must never see its stable subset shrink (for instance while the target rolls out a
//!   new version and this canary reports a problem).
//! - A sick or missing clone gets no traffic: while blocked, its weight is drained to 0 in
//!   every VirtualService this canary split (the subsets stay, so make-before-break holds); when
//!   not blocked, the progress stage does the same (the desired weight is 0).
//! - A clone that carries traffic while blocked keeps up with the target's scale (never shrinks).

use kube::ResourceExt;

use super::{
    Action, Builder, CANARY_LABEL, ROLE_LABEL, ROLE_RECORDING, ROLE_STABLE, clone_replicas,
    clone_stalled, first_rival, pod_of_deployment, role_label_is_not_ours,
};
use crate::api::ValidSpec;

/// The clone's fitness to carry traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CloneHealth {
    Healthy,
    /// No clone of this canary (none, or the name is someone else's Deployment).
    Missing,
    /// No Ready replica.
    NotReady,
    /// Ready replicas, but none is a Ready endpoint of the Service yet: the mesh has no upstream
    /// for the recording subset, so weight there would be answered with 503s.
    NoEndpoint,
    CrashLooping,
}

impl CloneHealth {
    pub(super) fn healthy(self) -> bool {
        self == CloneHealth::Healthy
    }

    fn why(self, clone: &str) -> String {
        match self {
            CloneHealth::Healthy => String::new(),
            CloneHealth::Missing => format!("{clone} is missing"),
            CloneHealth::NotReady => format!("{clone} has no ready replica"),
            CloneHealth::NoEndpoint => {
                format!("no ready replica of {clone} is an endpoint of the Service yet")
            }
            CloneHealth::CrashLooping => format!("a pod of {clone} is in CrashLoopBackOff"),
        }
    }
}

/// Labels the target's pods that lack the stable role (never the clone's, never terminating
/// ones). Not while an older canary of the same target rolls back: it is removing these labels,
/// and its split with them.
pub(super) fn label_target_pods(b: &mut Builder) {
    if first_rival(b.o).is_some_and(|r| r.deleting) || role_label_is_not_ours(b.o) {
        return;
    }
    let target = &b.o.canary.spec.target_ref.name;
    for p in b.o.pods.iter() {
        if pod_of_deployment(p, target)
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

/// How fit this canary's clone is to carry traffic.
pub(super) fn clone_health(b: &Builder) -> CloneHealth {
    let o = b.o;
    let c = o.canary;
    if o.clone
        .is_none_or(|cl| cl.labels().get(CANARY_LABEL) != Some(&c.name_any()))
    {
        return CloneHealth::Missing;
    }
    let clone_name = c.spec.clone_name();
    if o.pods
        .iter()
        .any(|p| pod_of_deployment(p, &clone_name) && p.crash_looping)
    {
        return CloneHealth::CrashLooping;
    }
    if clone_ready_pods(b) < 1 {
        let ready = o
            .pods
            .iter()
            .any(|p| p.serving() && pod_of_deployment(p, &clone_name));
        return if ready {
            CloneHealth::NoEndpoint
        } else {
            CloneHealth::NotReady
        };
    }
    CloneHealth::Healthy
}

/// The clone's replicas that can carry traffic: its pods in the watch cache that are Ready, not
/// being deleted, and Ready endpoints in the Service's EndpointSlices (what the mesh routes to;
/// the endpoint-slice controller lists a pod there after it is Ready, minutes later when its
/// queue is deep). Not the Deployment's `status.readyReplicas`, which the
/// kube-controller-manager's deployment controller writes one pass of its work queue after the
/// pods, and which stays stale the other way too: a clone pod that stops being Ready is seen here
/// at once.
pub(super) fn clone_ready_pods(b: &Builder) -> i32 {
    let clone_name = b.o.canary.spec.clone_name();
    let endpoints = super::router::clone_endpoints(b.o);
    let n =
        b.o.pods
            .iter()
            .filter(|p| {
                p.serving()
                    && pod_of_deployment(p, &clone_name)
                    && endpoints.contains(p.metadata.name.as_deref().unwrap_or_default())
            })
            .count();
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// While progress is blocked: a sick clone's weight goes to 0 in every VirtualService this
/// canary split; a healthy one keeps up with the target's scale. Returns what was done, for
/// the status message.
pub(super) fn while_blocked(
    b: &mut Builder,
    health: CloneHealth,
    spec: Option<&ValidSpec>,
) -> Option<String> {
    let o = b.o;
    let c = o.canary;
    let clone_name = c.spec.clone_name();
    if !health.healthy() {
        let drained = super::router::drain(b);
        if drained == 0 {
            return None;
        }
        b.status.current_percent = 0;
        let kind = match super::router::chosen(o) {
            crate::api::status::Router::GatewayApi => "HTTPRoute(s)",
            _ => "VirtualService(s)",
        };
        let what = format!(
            "{}, so its weight went to 0 in {drained} {kind}",
            health.why(&clone_name)
        );
        b.event(true, "TrafficDrained", format!("While blocked: {what}"));
        return Some(what);
    }
    // Healthy and carrying traffic: follow the target's scale upwards.
    let (Some(spec), Some(target), Some(clone)) = (spec, o.target, o.clone) else {
        return None;
    };
    let current = b.prev.current_percent;
    if current == 0 {
        return None;
    }
    let target_replicas = target.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let want = clone_replicas(target_replicas, current, spec.percent, spec.max_replicas);
    let have = clone.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    if want <= have || clone_stalled(clone) {
        return None;
    }
    b.actions.push(Action::ScaleClone {
        replicas: want,
        from: Some(have),
    });
    b.status.target_replicas = target_replicas;
    b.status.clone_replicas = want;
    b.event(
        false,
        "CloneScaled",
        format!("Deployment {clone_name} scaled from {have} to {want} replicas while blocked ({} has {target_replicas})", c.spec.target_ref.name),
    );
    Some(format!(
        "{clone_name} scaled from {have} to {want} replicas to carry {current}% of {target_replicas} replicas' traffic"
    ))
}
