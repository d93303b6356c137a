//! Rollback on deletion: traffic back to stable, wait, subsets out, clone gone, labels off,
//! finalizer off.

use std::time::Duration;

use kube::ResourceExt;
use serde_json::json;

use super::{
    Action, Builder, CANARY_LABEL, MeshKind, Plan, ROLE_LABEL, ROLE_STABLE, after, first_rival,
    fmt_time, meta_name, meta_ns, meta_uid, owned_by, parse_time, pod_of_deployment, remaining,
    role_label_is_not_ours, spec_of,
};
use crate::api::status::{Phase, PropagationWait};
use crate::istio::{self, ServiceHost};

/// Rollback on deletion: traffic back to stable, wait, subsets out, clone gone, labels off,
/// finalizer off. Every step tolerates objects that are already gone.
pub(super) fn plan_rollback(mut b: Builder) -> Plan {
    let o = b.o;
    let c = o.canary;
    let ns = c.namespace().unwrap_or_default();
    if b.prev.phase != Some(Phase::Terminating) {
        b.event(
            false,
            "RollbackStarted",
            "Deleting: traffic goes back to stable, then subsets, clone and labels are removed"
                .into(),
        );
    }
    b.status.phase = Some(Phase::Terminating);
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
    let vs_writes = restore_routes(&b, &host);
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
    let reconciled = routes_reconciled(&b, &host);
    let since = parse_time(b.prev.routes_removed_time.as_deref())
        .unwrap_or(o.started)
        .max(o.started);
    if !reconciled && let Some(wait) = remaining(now, after(since, delay)) {
        b.requeue(wait);
        return b.finish();
    }
    let waited = if reconciled {
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
    remove_the_rest(b, &waited)
}

/// The rest of the rollback once the routes have reached the proxies: the subsets out of the
/// DestinationRule, the clone, the labels on the target's pods, the finalizer.
fn remove_the_rest(mut b: Builder, waited: &str) -> Plan {
    let o = b.o;
    let c = o.canary;
    let me = c.name_any();
    // 3. Subsets out of the DestinationRule.
    remove_subsets(&mut b);

    // 4. The clone.
    if let Some(cl) = o.clone
        && cl.labels().get(CANARY_LABEL) == Some(&me)
        && cl.metadata.deletion_timestamp.is_none()
    {
        b.actions.push(Action::DeleteClone {
            uid: cl.metadata.uid.clone().unwrap_or_default(),
        });
    }

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
    b.actions.push(Action::RemoveFinalizer);
    b.event(
        false,
        "RolledBack",
        format!(
            "Traffic, subsets, clone and labels of {} removed; the subsets left the DestinationRule {waited}",
            c.spec.target_ref.name
        ),
    );
    b.finish()
}

/// Whether Istio reports that the routes' removal reached every proxy: each VirtualService this
/// canary split (`status.virtualServices`) is still there, no longer routes to our subsets, and
/// is `Reconciled` for its current generation. A deleted VirtualService (our own) has no status
/// to tell, so its removal is waited for with `propagationDelay`.
fn routes_reconciled(b: &Builder, host: &ServiceHost) -> bool {
    let split = &b.prev.virtual_services;
    !split.is_empty()
        && split.iter().all(|key| {
            let Some((ns, name)) = key.split_once('/') else {
                return false;
            };
            b.o.virtual_services
                .iter()
                .find(|v| meta_ns(v) == ns && meta_name(v) == name)
                .is_some_and(|v| {
                    !istio::read_split(spec_of(v), host, ns).references_subsets
                        && istio::status::reconciled(v)
                })
        })
}

/// The writes that take every route of this canary's split back to the stable pods: our own
/// VirtualServices deleted, the user's restored from the note.
fn restore_routes(b: &Builder, host: &ServiceHost) -> Vec<Action> {
    let c = b.o.canary;
    let ns = c.namespace().unwrap_or_default();
    let uid = c.metadata.uid.clone().unwrap_or_default();
    let me = c.name_any();
    let mut vs_writes = Vec::new();
    for v in b.o.virtual_services.iter().filter(|v| meta_ns(v) == ns) {
        let st = istio::read_split(spec_of(v), host, meta_ns(v));
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
        let http = istio::unsplit_http(spec_of(v), host, meta_ns(v), istio::restore_note_of(v));
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
    vs_writes
}

/// Our subsets out of every DestinationRule that has them: our own deleted, the user's restored.
fn remove_subsets(b: &mut Builder) {
    let o = b.o;
    let c = o.canary;
    let ns = c.namespace().unwrap_or_default();
    let uid = c.metadata.uid.clone().unwrap_or_default();
    let me = c.name_any();
    for d in o.destination_rules.iter().filter(|d| meta_ns(d) == ns) {
        if owned_by(d, &uid) {
            b.actions.push(Action::DeleteMesh {
                kind: MeshKind::DestinationRule,
                name: meta_name(d).into(),
                uid: meta_uid(d).into(),
            });
            continue;
        }
        // Only subsets this canary's note says it added: a user's subset with our name (in git,
        // say, with its own policy) is never removed, whatever its name.
        let note = istio::parse_dr_restore_note(istio::restore_note_of(d));
        if note.canary.as_deref() != Some(me.as_str()) {
            continue;
        }
        let mut ops = istio::rv_test(d);
        match istio::without_our_subsets(spec_of(d), note.subsets_absent, &note.added) {
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
}
