//! Stage 3: progress, once nothing blocks: subsets in the DestinationRule, then (after they
//! propagated, and with every Ready target pod in the stable subset) the split, the ramp, the
//! clone following the target, and finally the report.

use std::time::Duration;

use kube::ResourceExt;
use serde_json::Value;

use super::block::Checked;
use super::router::gateway::RouteVerdict;
use super::router::{self, Propagation, Routes, Routing};
use super::safety::{self, CloneHealth};
use super::{
    Action, Builder, MeshKind, Observed, Plan, ROLE_LABEL, ROLE_RECORDING, ROLE_STABLE,
    SOURCE_HASH_ANNOTATION, after, build_clone, clone_replicas, clone_stalled, fmt_time, meta_name,
    parse_time, pod_of_deployment, remaining, shape, sidecar_annotations_differ, source_hash,
};
use crate::api::FIELD_MANAGER;
use crate::api::status::{Phase, PropagationWait};
use crate::facts::pods::PodFacts;

pub(super) fn plan_progress(mut b: Builder, k: &Checked, health: CloneHealth) -> Plan {
    let propagated = router::backends(&mut b, k);
    if let Some(why) = &propagated.lost {
        // The routes back to the Service first, then the Services again; the split comes again
        // once the backends are complete.
        let restore = router::restore(&b, &k.host);
        let services: Vec<Action> = b
            .actions
            .extract_if(.., |a| {
                matches!(a, Action::CreateService(_) | Action::PatchService { .. })
            })
            .collect();
        b.actions.extend(restore);
        b.actions.extend(services);
        b.status.current_percent = 0;
        b.report(Phase::Degraded, "BackendServiceLost", why);
        return b.finish();
    }
    let routes = router::read(&mut b, k);
    b = match after_revert(b, k, &routes) {
        Ok(b) => b,
        Err(waiting) => return *waiting,
    };
    if !routes.is_split {
        b = match wait_before_split(b, k, &propagated) {
            Ok(b) => b,
            Err(waiting) => return *waiting,
        };
    }
    let w = weight(&mut b, k, health, routes.current);
    // Forced requests go to the clone only while it is healthy and has a Ready replica.
    let serves = health.healthy() && w.clone_ready > 0;
    router::write(&mut b, k, &routes, &shape(&k.spec, w.desired, serves));
    sync_clone(&mut b, k, w.replicas);
    report(b, k, health, &w)
}

/// How long reverts are remembered: a revert after a split that held this long starts the
/// count again.
const REVERT_MEMORY: Duration = Duration::from_secs(600);

/// The delay before re-applying a split that was put back `count` times in a row: at once,
/// then 2 s, 4 s, ... at most 5 min.
pub(super) fn revert_backoff(count: i32) -> Duration {
    match count {
        ..=1 => Duration::ZERO,
        n => Duration::from_secs(1u64 << (n - 1).min(9)).min(Duration::from_secs(300)),
    }
}

/// Someone else put the routes back after this canary split them (a GitOps tool's self-heal,
/// a `kubectl apply`): the revert is counted, named in a warning Event, and the split is
/// re-applied after [`revert_backoff`], so that two writers never fight at full speed.
/// `Err` is the plan while the delay runs.
fn after_revert<'a>(
    mut b: Builder<'a>,
    k: &Checked,
    routes: &Routes,
) -> Result<Builder<'a>, Box<Plan>> {
    let o = b.o;
    let Some(vs) = routes.object.filter(|_| !routes.is_split) else {
        if routes.is_split && b.prev.revert_count > 0 {
            // The split holds again; the count starts over after REVERT_MEMORY.
            let last = parse_time(b.prev.last_revert_time.as_deref());
            if last.is_none_or(|t| after(t, REVERT_MEMORY) <= o.now) {
                b.status.revert_count = 0;
                b.status.last_revert_time = None;
            }
        }
        return Ok(b);
    };
    if b.prev.current_percent > 0 {
        let last = parse_time(b.prev.last_revert_time.as_deref());
        let in_a_row = last.is_some_and(|t| o.now < after(t, REVERT_MEMORY));
        let count = if in_a_row { b.prev.revert_count + 1 } else { 1 };
        b.status.revert_count = count;
        b.status.last_revert_time = Some(fmt_time(o.now));
        let field = match routes.kind {
            MeshKind::HttpRoute | MeshKind::GrpcRoute => "rules",
            _ => "http",
        };
        let who = last_writer(vs, &format!("f:{field}")).unwrap_or_else(|| "another client".into());
        b.event(
            true,
            "SplitReverted",
            format!(
                "{who} put back the routes of {} {} to {} ({count} in a row); the split is re-applied in {}. If a GitOps tool self-heals it, make it ignore .spec.{field} (see docs/gitops.md)",
                routes.kind.name(),
                meta_name(vs),
                k.host.fqdn(),
                humantime::format_duration(revert_backoff(count))
            ),
        );
    }
    let Some(since) = parse_time(b.status.last_revert_time.as_deref()) else {
        return Ok(b);
    };
    let count = b.status.revert_count;
    let Some(wait) = remaining(o.now, after(since, revert_backoff(count))) else {
        return Ok(b);
    };
    b.status.current_percent = 0;
    b.requeue(wait);
    b.report(
        Phase::Degraded,
        "SplitReverted",
        &format!(
            "The routes of {} {} were put back {count} times in a row; the split is re-applied in {}s",
            routes.kind.name(),
            meta_name(vs),
            wait.as_secs().max(1)
        ),
    );
    Err(Box::new(b.finish()))
}

/// The field manager that last wrote `field` (`f:http`, `f:subsets`) of the object's spec,
/// other than this controller.
fn last_writer(v: &Value, field: &str) -> Option<String> {
    v.pointer("/metadata/managedFields")?
        .as_array()?
        .iter()
        .filter(|e| e.pointer(&format!("/fieldsV1/f:spec/{field}")).is_some())
        .filter(|e| e.get("manager").and_then(Value::as_str) != Some(FIELD_MANAGER))
        .max_by_key(|e| {
            e.get("time")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        })
        .and_then(|e| e.get("manager").and_then(Value::as_str))
        .map(String::from)
}

/// Before the first split: the subsets must have reached the sidecars (Istio reports the
/// DestinationRule `Reconciled`, or `propagationDelay` ran out, whichever comes first), and every
/// Ready pod of the target must be in the stable subset. `Err` is the plan while something is
/// still awaited.
fn wait_before_split<'a>(
    mut b: Builder<'a>,
    k: &Checked,
    propagated: &Propagation,
) -> Result<Builder<'a>, Box<Plan>> {
    let o = b.o;
    let target_name = &o.canary.spec.target_ref.name;
    // Subsets added by this very plan propagate from now: the same wait.
    let wait = if propagated.reconciled {
        None
    } else {
        remaining(o.now, propagated.until)
    };
    b.status.current_percent = 0;
    if let Some(p) = &propagated.pending {
        // The wait starts once the backends are complete; their changes wake the canary.
        b.report(Phase::Progressing, p.reason, &p.message);
        return Err(Box::new(b.finish()));
    }
    if let Some(wait) = wait {
        b.requeue(wait);
        let (reason, message) = &propagated.waiting;
        b.report(Phase::Progressing, reason, message);
        return Err(Box::new(b.finish()));
    }
    let ready = ready_target_pods(o);
    let labelled = ready
        .iter()
        .filter(|p| p.labels().get(ROLE_LABEL).map(String::as_str) == Some(ROLE_STABLE))
        .count();
    // The stable subset must have an upstream when the split goes in: a labelled target pod that
    // is a Ready endpoint of the Service.
    let endpoints = ready
        .iter()
        .filter(|p| {
            p.labels().get(ROLE_LABEL).map(String::as_str) == Some(ROLE_STABLE)
                && o.endpoints
                    .contains(p.metadata.name.as_deref().unwrap_or_default())
        })
        .count();
    if !ready.is_empty() && labelled == ready.len() && endpoints == 0 {
        b.report(
            Phase::Progressing,
            "WaitingForStableEndpoints",
            &format!(
                "none of the {} ready pods of Deployment {target_name} is a Ready endpoint of Service {} yet (its EndpointSlices); the stable subset would have no upstream",
                ready.len(),
                k.host.name
            ),
        );
        return Err(Box::new(b.finish()));
    }
    if !ready.is_empty() && labelled == ready.len() {
        // This plan makes the dependent write: say what ended its wait.
        b.status.last_propagation_wait = Some(if propagated.reconciled {
            PropagationWait::IstioReconciled
        } else {
            PropagationWait::PropagationDelay
        });
        return Ok(b);
    }
    b.report(
        Phase::Progressing,
        "WaitingForStablePods",
        &format!(
            "{labelled} of {} ready pods of Deployment {target_name} are in the stable subset",
            ready.len()
        ),
    );
    Err(Box::new(b.finish()))
}

/// The weight to route to the clone now, and the clone's size.
struct Weight {
    desired: i32,
    current: i32,
    /// Held back until the clone has the Ready replicas for more.
    capped: bool,
    /// Held at this percent: `spec.maxReplicas` replicas carry no more of the target's traffic.
    limited: Option<i32>,
    replicas: i32,
    clone_ready: i32,
}

/// Step 3, the weight: 0 for a sick clone, else the target percent, or the next ramp step when
/// it is due; never more than the clone's Ready replicas carry.
fn weight(b: &mut Builder, k: &Checked, health: CloneHealth, current: i32) -> Weight {
    let o = b.o;
    let spec = &k.spec;
    let target_replicas = k.target.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    b.status.target_replicas = target_replicas;
    let clone_ready = if o.clone.is_some() {
        safety::clone_ready_pods(b)
    } else {
        0
    };
    b.status.clone_ready_replicas = clone_ready;
    let prev_step = parse_time(b.prev.last_step_time.as_deref());
    let (desired, sizing) = if spec.percent == 0 || !health.healthy() {
        let sizing = match spec.ramp {
            Some((step, _)) => step.min(spec.percent),
            None => spec.percent,
        };
        (0, sizing)
    } else {
        match spec.ramp {
            None => (spec.percent, spec.percent),
            Some(_) if current >= spec.percent => (spec.percent, spec.percent),
            Some((step, interval)) => match prev_step
                .map(|t| after(t, interval))
                .and_then(|d| remaining(o.now, d))
            {
                Some(wait) => {
                    b.requeue(wait);
                    (current, (current + step).min(spec.percent))
                }
                None => {
                    let next = (current + step).min(spec.percent);
                    b.status.last_step_time = Some(fmt_time(o.now));
                    if next < spec.percent {
                        b.requeue(interval);
                    }
                    (next, (next + step).min(spec.percent))
                }
            },
        }
    };
    // `spec.maxReplicas` is a ceiling on the weight too: the share that many replicas carry of
    // the target's traffic (without it, 50 % of a 100-replica service would land on one pod).
    // Unlike the capacity below, it lowers a weight when the target grows.
    let most = |replicas: i32| {
        (0..=100)
            .rev()
            .find(|w| clone_replicas(target_replicas, *w, spec.percent, None) <= replicas)
            .unwrap_or(0)
    };
    let limit = spec.max_replicas.map(most).filter(|l| desired > *l);
    let desired = limit.unwrap_or(desired);
    // The weight rises only as far as the clone's Ready replicas (Ready endpoints) carry it: the
    // replicas sized for a weight are Ready before it gets that weight. This never lowers a
    // weight (an HPA scaling the target up must not move weights).
    let capacity = most(clone_ready.min(spec.max_replicas.unwrap_or(i32::MAX)));
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
    // With `always`, the clone has a replica at `percent: 0` too.
    let floor = i32::from(!spec.always.is_empty());
    let replicas = clone_replicas(
        target_replicas,
        sizing.max(desired).max(floor),
        spec.percent.max(floor),
        spec.max_replicas,
    );
    b.status.clone_replicas = replicas;
    Weight {
        desired,
        current,
        capped,
        limited: limit,
        replicas,
        clone_ready,
    }
}

/// Step 5: the clone follows the target's pod template and replicas.
pub(super) fn sync_clone(b: &mut Builder, k: &Checked, replicas: i32) {
    let o = b.o;
    let c = o.canary;
    let (target_name, clone_name) = (&c.spec.target_ref.name, c.spec.clone_name());
    let Some(cl) = o.clone else {
        b.actions.push(Action::CreateClone(Box::new(build_clone(
            c, k.target, replicas,
        ))));
        return;
    };
    let want_hash = k
        .target
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
        let mut desired = build_clone(c, k.target, replicas);
        desired.metadata.resource_version = cl.resource_version();
        // Keep what others (e.g. an injecting webhook) put on the clone's metadata.
        let mut ann = cl.annotations().clone();
        for k in c.spec.unwanted_capture_annotations() {
            ann.remove(k);
        }
        ann.extend(desired.metadata.annotations.take().unwrap_or_default());
        desired.metadata.annotations = Some(ann);
        let mut labels = cl.labels().clone();
        labels.extend(desired.metadata.labels.take().unwrap_or_default());
        desired.metadata.labels = Some(labels);
        // The selector is immutable: keep the live one.
        if let (Some(ds), Some(ls)) = (desired.spec.as_mut(), cl.spec.as_ref()) {
            ds.selector = ls.selector.clone();
        }
        b.actions.push(Action::ReplaceClone(Box::new(desired)));
        b.event(
            false,
            "CloneSynced",
            format!("Deployment {clone_name} follows the new pod template of {target_name}"),
        );
    } else if have_replicas != replicas {
        b.actions.push(Action::ScaleClone {
            replicas,
            from: cl.spec.as_ref().and_then(|s| s.replicas),
        });
        let target_replicas = b.status.target_replicas;
        b.event(
            false,
            "CloneScaled",
            format!(
                "Deployment {clone_name} scaled from {have_replicas} to {replicas} replicas ({target_name} has {target_replicas})"
            ),
        );
    }
}

/// The Ready pods of the target (not the clone's, which share its template's labels).
fn ready_target_pods<'o>(o: &'o Observed) -> Vec<&'o PodFacts> {
    let target = &o.canary.spec.target_ref.name;
    o.pods
        .iter()
        .filter(|p| {
            pod_of_deployment(p, target)
                && p.labels().get(ROLE_LABEL).map(String::as_str) != Some(ROLE_RECORDING)
                && p.serving()
        })
        .collect()
}

/// The label Istio's sidecar injector puts on every pod it injects.
pub const ISTIO_SIDECAR_LABEL: (&str, &str) = ("security.istio.io/tlsMode", "istio");

/// The `SidecarInjected` condition: whether the target's Ready pods carry Istio's sidecar. The
/// split is done by the clients' sidecars, so a namespace without injection usually means that
/// nothing follows it; a warning Event when that becomes so. Progress does not depend on it.
fn report_sidecars(b: &mut Builder, k: &Checked) {
    let target = &b.o.canary.spec.target_ref.name;
    let ready = ready_target_pods(b.o);
    if ready.is_empty() {
        return;
    }
    let (key, value) = ISTIO_SIDECAR_LABEL;
    let injected = ready
        .iter()
        .filter(|p| p.labels().get(key).map(String::as_str) == Some(value))
        .count();
    if injected > 0 {
        b.condition(
            "SidecarInjected",
            true,
            "IstioSidecar",
            &format!(
                "{injected} of {} Ready pods of Deployment {target} carry Istio's sidecar",
                ready.len()
            ),
        );
        return;
    }
    let message = format!(
        "No Ready pod of Deployment {target} carries Istio's sidecar (label {key}={value}): is sidecar injection on in namespace {}? The split is applied by the sidecars of the clients of {} (and the listed gateways); clients without one ignore it, and with none no request reaches the clone",
        k.host.namespace,
        k.host.fqdn()
    );
    let was = b
        .prev
        .conditions
        .iter()
        .find(|c| c.type_ == "SidecarInjected")
        .map(|c| c.status == "False");
    b.condition("SidecarInjected", false, "NoIstioSidecar", &message);
    if was != Some(true) {
        b.event(true, "NoIstioSidecar", message);
    }
}

/// The report of a canary that serves what it should: Ready at the target (once the routes'
/// parents accepted them, with the Gateway API), else Ramping.
fn report_serving(b: &mut Builder, k: &Checked, desired: i32) {
    let percent = k.spec.percent;
    let mut message =
        format!("{desired}% of requests go to the recording clone (target {percent}%)");
    if let Some(key) = &k.spec.session_key {
        message = format!(
            "{message}; whole sessions by {}: {} of {} buckets ({:.2}% of the keys){}",
            key.describe(),
            key.share(desired),
            key.buckets(),
            key.effective_percent(desired),
            match key.without_key {
                crate::api::session::WithoutKey::Split => ", requests without it split by weight",
                crate::api::session::WithoutKey::Stable =>
                    ", requests without it stay on the stable pods",
            }
        );
    }
    let verdict = match &k.routing {
        Routing::Gateway(g) if desired == percent && desired > 0 => {
            Some(router::gateway::route_verdict(b, g))
        }
        _ => None,
    };
    // Not accepted yet: Ready all the same for propagationDelay after this process last wrote the
    // routes (a mesh reports in milliseconds; Istio's router does not wait for `Reconciled`
    // either), then `WaitingForRouteAccepted` until it does.
    let writes_routes = b
        .actions
        .iter()
        .any(|a| matches!(a, Action::CreateMesh { .. } | Action::PatchMesh { .. }));
    let since = if writes_routes { b.o.now } else { b.o.started };
    let grace = after(since, k.spec.propagation_delay);
    let verdict = match verdict {
        Some(RouteVerdict::Waiting(_)) if b.o.now < grace => {
            if let Some(wait) = remaining(b.o.now, grace) {
                b.requeue(wait);
            }
            b.holds_until = Some(grace);
            None
        }
        v => v,
    };
    match verdict {
        Some(RouteVerdict::Refused(why)) => b.report(
            Phase::Degraded,
            "RouteRefused",
            &format!("{why}; the split ({desired}%) may not take effect"),
        ),
        Some(RouteVerdict::Waiting(routes)) => b.report(
            Phase::Progressing,
            "WaitingForRouteAccepted",
            &format!(
                "{desired}% of requests go to the recording clone once the mesh accepts the current rules of HTTPRoute {} (its status.parents)",
                routes.join(", ")
            ),
        ),
        _ if desired == percent => b.report(Phase::Ready, "TargetReached", &message),
        _ => b.report(Phase::Progressing, "Ramping", &message),
    }
}

/// Step 6: what to report.
fn report(mut b: Builder, k: &Checked, health: CloneHealth, w: &Weight) -> Plan {
    if matches!(k.routing, Routing::Istio(_)) {
        report_sidecars(&mut b, k);
    }
    let o = b.o;
    let clone_name = o.canary.spec.clone_name();
    let percent = k.spec.percent;
    let desired = w.desired;
    // With `always`, the clone records at `percent: 0` too.
    if (percent > 0 || !k.spec.always.is_empty()) && !health.healthy() {
        let was_serving = w.current > 0 || b.prev.phase == Some(Phase::Degraded);
        let (phase, reason, message) = if health == CloneHealth::CrashLooping {
            (
                Phase::Degraded,
                "CloneCrashLooping",
                format!(
                    "A pod of {clone_name} is in CrashLoopBackOff; no traffic goes to the clone"
                ),
            )
        } else if o.clone.is_some_and(clone_stalled) {
            (
                Phase::Degraded,
                "CloneStalled",
                format!(
                    "{clone_name} has made no progress within its progressDeadlineSeconds (image pull, scheduling or readiness?); no traffic goes to the clone"
                ),
            )
        } else if health == CloneHealth::NoEndpoint && was_serving {
            (
                Phase::Degraded,
                "CloneNotAnEndpoint",
                format!(
                    "no ready replica of {clone_name} is a Ready endpoint of Service {} (its EndpointSlices); no traffic goes to the clone",
                    k.host.name
                ),
            )
        } else if o.clone.is_some() && was_serving {
            (
                Phase::Degraded,
                "CloneNotReady",
                format!("{clone_name} has no ready replica; no traffic goes to the clone"),
            )
        } else {
            // One reason and message while the clone's first replica becomes Ready and then an
            // endpoint (usually milliseconds apart): no status write in between.
            (
                Phase::Progressing,
                "WaitingForClone",
                format!(
                    "Waiting for a replica of {clone_name} that is Ready and a Ready endpoint of Service {} (its EndpointSlices, which the mesh routes to)",
                    k.host.name
                ),
            )
        };
        b.report(phase, reason, &message);
    } else if let Some(limit) = w.limited.filter(|_| !w.capped) {
        let max = k.spec.max_replicas.unwrap_or_default();
        let message = format!(
            "spec.maxReplicas ({max}) carries at most {limit}% of the traffic of Deployment {}'s {} replicas; the weight stays at {limit}% (target {percent}%). Raise maxReplicas for more",
            o.canary.spec.target_ref.name, b.status.target_replicas
        );
        if b.reason_changed("LimitedByMaxReplicas") {
            b.event(true, "LimitedByMaxReplicas", message.clone());
        }
        b.report(Phase::Progressing, "LimitedByMaxReplicas", &message);
    } else if w.capped {
        b.report(
            Phase::Progressing,
            "WaitingForCloneCapacity",
            &format!(
                "{} of {} replicas of {clone_name} are Ready; the weight stays at {desired}% until the clone can carry more (target {percent}%)",
                w.clone_ready, w.replicas
            ),
        );
    } else {
        report_serving(&mut b, k, desired);
    }
    b.finish()
}
