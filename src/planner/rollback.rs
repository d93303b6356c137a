//! Rollback on deletion: traffic back to stable, wait, subsets out, clone gone, labels off,
//! finalizer off. The end of a time-boxed recording (`spec.duration`) takes the same steps but
//! scales the clone to zero and keeps the canary, as a record in phase `Completed`.

use std::time::Duration;

use kube::ResourceExt;

use super::router;
use super::{
    Action, Builder, CANARY_LABEL, Plan, ROLE_LABEL, ROLE_STABLE, after, first_rival, fmt_time,
    parse_time, pod_of_deployment, remaining, role_label_is_not_ours,
};
use crate::api::status::{Phase, PropagationWait};
use crate::istio::ServiceHost;

/// Why production is put back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    /// The canary is being deleted: everything goes, then the finalizer.
    Deletion,
    /// Its `spec.duration` ran out: the clone is scaled to zero and the canary stays, `Completed`.
    Duration,
}

/// Rollback on deletion: traffic back to stable, wait, subsets out, clone gone, labels off,
/// finalizer off. Every step tolerates objects that are already gone.
pub(super) fn plan_rollback(b: Builder) -> Plan {
    plan_put_back(b, End::Deletion)
}

/// Production put back, for `end`.
pub(super) fn plan_put_back(mut b: Builder, end: End) -> Plan {
    let o = b.o;
    let c = o.canary;
    let ns = c.namespace().unwrap_or_default();
    match end {
        End::Deletion => {
            if b.prev.phase != Some(Phase::Terminating) {
                b.event(
                    false,
                    "RollbackStarted",
                    format!(
                        "Deleting: traffic goes back to stable, then {}, clone and labels are removed",
                        backends_word(&b)
                    ),
                );
            }
            b.status.phase = Some(Phase::Terminating);
        }
        End::Duration if b.prev.phase == Some(Phase::Completed) => {}
        End::Duration => {
            b.report(
                Phase::Progressing,
                "RecordingEnding",
                &format!(
                    "spec.duration ({}) ran out at {}: traffic goes back to stable, then the clone is scaled to zero",
                    c.spec.duration.as_deref().unwrap_or_default(),
                    b.prev.recording_end_time.as_deref().unwrap_or_default()
                ),
            );
        }
    }
    if first_rival(o).is_some() {
        // This one never changed anything.
        return finish(b, end, "");
    }
    let delay = c
        .spec
        .validate()
        .map(|s| s.propagation_delay)
        .unwrap_or(Duration::from_secs(3));
    let host = ServiceHost::new(c.spec.service_name(), &ns, o.cluster_domain);
    let now = o.now;

    // 1. Traffic back to stable.
    let vs_writes = router::restore(&b, &host);
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

    // 2. Wait for the routes to reach the sidecars: until Istio reports every VirtualService
    // this canary split Reconciled without them, at most propagationDelay.
    let reconciled = router::restored_and_reported(&b, &host);
    let since = parse_time(b.prev.routes_removed_time.as_deref())
        .unwrap_or(o.started)
        .max(o.started);
    if !reconciled && let Some(wait) = remaining(now, after(since, delay)) {
        b.requeue(wait);
        return b.finish();
    }
    let gateway = b.status.router == Some(crate::api::status::Router::GatewayApi);
    let waited = if reconciled && gateway {
        b.status.last_propagation_wait = Some(PropagationWait::RoutesAccepted);
        "once every parent accepted the restored HTTPRoutes".to_string()
    } else if reconciled {
        b.status.last_propagation_wait = Some(PropagationWait::IstioReconciled);
        "once Istio reported the VirtualServices Reconciled without the routes".to_string()
    } else {
        b.status.last_propagation_wait = Some(PropagationWait::PropagationDelay);
        format!(
            "propagationDelay ({}) after the routes went",
            humantime::format_duration(delay)
        )
    };

    // 3.-6. Subsets, clone, labels, finalizer.
    remove_the_rest(b, &waited, end)
}

/// The rest of the rollback once the routes have reached the proxies: the subsets out of the
/// DestinationRule (or the Gateway API router's Services), the clone, the labels on the target's pods, the finalizer.
fn remove_the_rest(mut b: Builder, waited: &str, end: End) -> Plan {
    let o = b.o;
    let c = o.canary;
    let me = c.name_any();
    // 3. Subsets out of the DestinationRule, or the Gateway API router's Services deleted.
    router::remove_backends(&mut b);

    // 4. The clone: deleted, or (the recording over) scaled to zero.
    if let Some(cl) = o.clone
        && cl.labels().get(CANARY_LABEL) == Some(&me)
        && cl.metadata.deletion_timestamp.is_none()
    {
        let replicas = cl.spec.as_ref().and_then(|s| s.replicas);
        match end {
            End::Deletion => b.actions.push(Action::DeleteClone {
                uid: cl.metadata.uid.clone().unwrap_or_default(),
            }),
            End::Duration if replicas != Some(0) => b.actions.push(Action::ScaleClone {
                replicas: 0,
                from: replicas,
            }),
            End::Duration => {}
        }
    }
    b.status.clone_replicas = 0;

    // 5. Labels on the target's pods (never a label that is not ours: see
    // `role_label_is_not_ours`), unless a younger canary of the same target stays: it takes
    // over, and its split needs them (the chart's fences refuse the removal then, too).
    let taken_over = o
        .rivals
        .iter()
        .any(|r| r.name != me && r.target == c.spec.target_ref.name && !r.deleting);
    for p in o.pods.iter().filter(|p| {
        pod_of_deployment(p, &c.spec.target_ref.name) && !role_label_is_not_ours(o) && !taken_over
    }) {
        if p.labels().get(ROLE_LABEL).map(String::as_str) == Some(ROLE_STABLE) {
            b.actions.push(Action::UnlabelPod { name: p.name_any() });
        }
    }

    // 6. Done.
    finish(b, end, waited)
}

/// What the router split between: the Gateway API router's Services, or subsets.
fn backends_word(b: &Builder) -> &'static str {
    if b.status.router == Some(crate::api::status::Router::GatewayApi) {
        "Services"
    } else {
        "subsets"
    }
}

/// The last step: the finalizer off (deletion), or the record kept, `Completed` (duration).
fn finish(mut b: Builder, end: End, waited: &str) -> Plan {
    let c = b.o.canary;
    let backends = backends_word(&b);
    match end {
        End::Deletion => {
            b.actions.push(Action::RemoveFinalizer);
            if !waited.is_empty() {
                b.event(
                    false,
                    "RolledBack",
                    format!(
                        "Traffic, {backends}, clone and labels of {} removed; {waited}",
                        c.spec.target_ref.name,
                    ),
                );
            }
        }
        End::Duration => {
            b.status.time_left = None;
            if b.prev.phase != Some(Phase::Completed) {
                b.status.completion_time = Some(fmt_time(b.o.now));
            }
            let message = format!(
                "The recording ran for spec.duration ({}) at {}% and ended {}; traffic, {backends} and labels are back as they were and {} is at zero replicas. Delete the RecordingCanary to remove this record (and the clone)",
                c.spec.duration.as_deref().unwrap_or_default(),
                b.status.recorded_percent.unwrap_or_default(),
                b.status
                    .completion_time
                    .clone()
                    .or_else(|| b.status.recording_end_time.clone())
                    .unwrap_or_default(),
                c.spec.clone_name()
            );
            let ready = b
                .prev
                .conditions
                .iter()
                .any(|c| c.reason == "RecordingCompleted");
            b.condition("Ready", false, "RecordingCompleted", &message);
            b.condition("Progressing", false, "Completed", &message);
            b.condition("Degraded", false, "NotDegraded", &message);
            if b.prev.phase != Some(Phase::Completed) || !ready {
                b.event(false, "RecordingCompleted", message);
            }
            b.status.phase = Some(Phase::Completed);
        }
    }
    b.finish()
}
