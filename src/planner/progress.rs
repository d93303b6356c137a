//! Stage 3: progress, once nothing blocks: subsets in the DestinationRule, then (after they
//! propagated, and with every Ready target pod in the stable subset) the split, the ramp, the
//! clone following the target, and finally the report.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde_json::{Value, json};

use super::block::{Checked, Choice};
use super::safety::{self, CloneHealth};
use super::{
    Action, Builder, MeshKind, Observed, Plan, ROLE_LABEL, ROLE_RECORDING, ROLE_STABLE,
    SOURCE_HASH_ANNOTATION, after, build_clone, clone_replicas, clone_stalled, fmt_time, meta_name,
    meta_ns, owned_dr, owned_mesh_name, owned_vs, parse_time, pod_of_deployment, remaining, shape,
    sidecar_annotations_differ, source_hash, spec_of, splits_at,
};
use crate::api::status::{Phase, PropagationWait};
use crate::api::{FIELD_MANAGER, RECORDING_SUBSET, STABLE_SUBSET};
use crate::facts::pods::PodFacts;
use crate::istio;

pub(super) fn plan_progress(mut b: Builder, k: &Checked, health: CloneHealth) -> Plan {
    let propagated = subsets(&mut b, k);
    let routes = read_routes(&mut b, k);
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
    write_weights(&mut b, k, &routes, &shape(&k.spec, w.desired, serves));
    sync_clone(&mut b, k, w.replicas);
    report(b, k, health, &w)
}

/// When the subsets in the DestinationRule will have reached the sidecars.
struct Propagation {
    /// `propagationDelay` after they were added: the fallback, and the upper bound.
    until: Timestamp,
    /// Istio reports the DestinationRule, with the subsets in it, `Reconciled` for its current
    /// generation: they reached every proxy, whatever the delay says.
    reconciled: bool,
}

/// Step 1: our subsets in the DestinationRule. Returns when they will have reached the sidecars.
fn subsets(b: &mut Builder, k: &Checked) -> Propagation {
    let c = b.o.canary;
    let ns = c.namespace().unwrap_or_default();
    b.status.destination_rule = Some(match k.dr.object() {
        Some(d) => format!("{}/{}", meta_ns(d), meta_name(d)),
        None => format!("{ns}/{}", owned_mesh_name(c)),
    });
    let present =
        k.dr.object()
            .is_some_and(|d| istio::has_our_subsets(spec_of(d)));
    if !present {
        // The time is reported with the status after the write; a crash in between is covered
        // by `Observed::started` (no earlier than the last write of this process, or its start).
        b.status.subsets_added_time = Some(fmt_time(b.o.now));
        match k.dr {
            Choice::Adopt(d) | Choice::Own(Some(d)) => {
                let mut ops = istio::rv_test(d);
                let op = if spec_of(d).get("subsets").is_some() {
                    "replace"
                } else {
                    "add"
                };
                let (subsets, added) = istio::with_our_subsets(spec_of(d));
                ops.push(json!({"op": op, "path": "/spec/subsets", "value": subsets}));
                if matches!(k.dr, Choice::Adopt(_)) {
                    // The note names every subset this canary added, over several writes (the
                    // user may have removed one of ours meanwhile): rollback removes those only.
                    let prev = istio::parse_dr_restore_note(istio::restore_note_of(d));
                    let (absent, mut all) = match prev.canary {
                        Some(ref n) if *n == c.name_any() => (prev.subsets_absent, prev.added),
                        _ => (spec_of(d).get("subsets").is_none(), Vec::new()),
                    };
                    for a in added {
                        if !all.contains(&a) {
                            all.push(a);
                        }
                    }
                    ops.extend(istio::annotation_ops(
                        d,
                        Some(&istio::dr_restore_note(absent, &c.name_any(), &all)),
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
                object: owned_dr(c, &k.host, k.carried.map(|(_, p)| p)),
            }),
        }
    }
    carry_policy(b, k, present);
    let since = parse_time(b.status.subsets_added_time.as_deref())
        .unwrap_or(b.o.started)
        .max(b.o.started);
    Propagation {
        until: after(since, k.spec.propagation_delay),
        // The cached object is one revision: its status speaks of its own generation, which
        // holds the subsets (subsets added by this very plan are in no revision yet).
        reconciled: present && k.dr.object().is_some_and(istio::status::reconciled),
    }
}

/// Our own DestinationRule follows the traffic policy of the wildcard DestinationRule it
/// displaces for the host (connection pools, outlier detection, load balancing, mTLS): set when
/// it is created, kept up to date after that, said in an Event when it changes.
fn carry_policy(b: &mut Builder, k: &Checked, subsets_present: bool) {
    let Choice::Own(own) = k.dr else {
        return;
    };
    let want = k.carried.map(|(_, p)| p);
    match own {
        // Created with it (see `subsets`): say so.
        None if want.is_some() => {}
        // Kept up to date; a DestinationRule whose subsets are being added is patched for them
        // first (both writes are guarded by the same resourceVersion).
        Some(d) if subsets_present && want != d.pointer("/spec/trafficPolicy") => {
            let op = match (want, d.pointer("/spec/trafficPolicy")) {
                (Some(p), Some(_)) => {
                    json!({"op": "replace", "path": "/spec/trafficPolicy", "value": p})
                }
                (Some(p), None) => json!({"op": "add", "path": "/spec/trafficPolicy", "value": p}),
                (None, _) => json!({"op": "remove", "path": "/spec/trafficPolicy"}),
            };
            let mut ops = istio::rv_test(d);
            ops.push(op);
            b.actions.push(Action::PatchMesh {
                kind: MeshKind::DestinationRule,
                name: meta_name(d).into(),
                ops,
            });
        }
        _ => return,
    }
    let dr = format!(
        "{}/{}",
        b.o.canary.namespace().unwrap_or_default(),
        owned_mesh_name(b.o.canary)
    );
    let note = match k.carried {
        Some((from, _)) => format!(
            "DestinationRule {dr} carries the trafficPolicy of DestinationRule {}/{} (host {}), which no longer applies to host {} while this canary's DestinationRule exists",
            meta_ns(from),
            meta_name(from),
            from.pointer("/spec/host")
                .and_then(Value::as_str)
                .unwrap_or_default(),
            k.host.fqdn()
        ),
        None => format!(
            "DestinationRule {dr} carries no trafficPolicy any more: no wildcard DestinationRule sets one for host {}",
            k.host.fqdn()
        ),
    };
    b.event(false, "TrafficPolicyCarried", note);
}

/// The VirtualService as it is: split or not, at which percent.
struct Routes<'a> {
    vs: Option<&'a Value>,
    is_split: bool,
    current: i32,
}

/// Step 2: reads the split back from the VirtualService.
fn read_routes<'a>(b: &mut Builder, k: &Checked<'a>) -> Routes<'a> {
    let c = b.o.canary;
    let ns = c.namespace().unwrap_or_default();
    let vs = k.vs.object();
    let split = vs
        .map(|v| istio::read_split(spec_of(v), &k.host, meta_ns(v)))
        .unwrap_or_default();
    let is_split = split.pairs > 0;
    // The percent read back from rounded weights is ambiguous on a shared route (80 at 7% and at
    // 8% both give 74/6): when the VS is exactly the split at the last reported percent, that is it.
    let current = match vs {
        Some(v)
            if is_split
                && splits_at(
                    v,
                    &k.host,
                    &shape(&k.spec, b.prev.current_percent, split.always_routes > 0),
                    &c.name_any(),
                ) =>
        {
            b.prev.current_percent
        }
        _ if is_split => split.percent.unwrap_or(0),
        _ => 0,
    };
    b.status.virtual_services = std::iter::once(match vs {
        Some(v) => format!("{}/{}", meta_ns(v), meta_name(v)),
        None => format!("{ns}/{}", owned_mesh_name(c)),
    })
    .chain(
        k.gateway_vss
            .iter()
            .map(|v| format!("{}/{}", meta_ns(v), meta_name(v))),
    )
    .collect();
    Routes {
        vs,
        is_split,
        current,
    }
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
    let Some(vs) = routes.vs.filter(|_| !routes.is_split) else {
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
        let who = last_writer(vs, "f:http").unwrap_or_else(|| "another client".into());
        b.event(
            true,
            "SplitReverted",
            format!(
                "{who} put back the routes of VirtualService {} to {} ({count} in a row); the split is re-applied in {}. If a GitOps tool self-heals it, make it ignore .spec.http (see docs/gitops.md)",
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
            "The routes of VirtualService {} were put back {count} times in a row; the split is re-applied in {}s",
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
    if let Some(wait) = wait {
        b.requeue(wait);
        let dr = b.status.destination_rule.clone().unwrap_or_default();
        b.report(
            Phase::Progressing,
            "AddingSubsets",
            &format!(
                "Waiting for the DestinationRule subsets to reach the sidecars: until Istio reports DestinationRule {dr} Reconciled, at most propagationDelay ({})",
                humantime::format_duration(k.spec.propagation_delay)
            ),
        );
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

/// Step 4: splits the VirtualServices (ours, the adopted one, the gateways') at `desired`, with
/// one Event when the clone first gets traffic and one per weight change after that.
fn write_weights(b: &mut Builder, k: &Checked, routes: &Routes, shape: &istio::Shape) {
    let desired = shape.percent;
    let c = b.o.canary;
    let ns = c.namespace().unwrap_or_default();
    let mut targets: Vec<(Option<&Value>, bool)> =
        vec![(routes.vs, matches!(k.vs, Choice::Own(_)))];
    targets.extend(k.gateway_vss.iter().map(|v| (Some(*v), false)));
    let mut wrote = false;
    for (v, own) in targets {
        let Some(v) = v else {
            let mut obj = owned_vs(c, &k.host);
            let s = istio::split_http(spec_of(&obj), &k.host, &ns, shape, None, &c.name_any());
            obj["spec"]["http"] = s.http;
            b.actions.push(Action::CreateMesh {
                kind: MeshKind::VirtualService,
                object: obj,
            });
            wrote = true;
            continue;
        };
        let st = istio::read_split(spec_of(v), &k.host, meta_ns(v));
        if st.pairs > 0 && st.unsplit == 0 && splits_at(v, &k.host, shape, &c.name_any()) {
            continue;
        }
        let note = istio::restore_note_of(v);
        let s = istio::split_http(spec_of(v), &k.host, meta_ns(v), shape, note, &c.name_any());
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
        wrote = true;
    }
    let current = routes.current;
    if wrote && desired > 0 && current == 0 {
        b.event(
            false,
            "RoutesSplit",
            format!(
                "Routes to {} split between subsets {STABLE_SUBSET} and {RECORDING_SUBSET}; {desired}% go to the recording clone",
                k.host.fqdn()
            ),
        );
    } else if wrote && desired != current {
        b.event(
            false,
            "WeightChanged",
            format!(
                "{desired}% of requests to {} now go to the recording clone (was {current}%)",
                k.host.fqdn()
            ),
        );
    } else if wrote && routes.is_split {
        b.event(
            false,
            "RoutesReshaped",
            format!(
                "Routes to {} now {}: {desired}%, {} forced and {} excluded request matches",
                k.host.fqdn(),
                if shape.mirror { "mirror" } else { "split" },
                shape.always.len(),
                shape.never.len()
            ),
        );
    }
    b.status.current_percent = desired;
}

/// Step 5: the clone follows the target's pod template and replicas.
fn sync_clone(b: &mut Builder, k: &Checked, replicas: i32) {
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

/// Step 6: what to report.
fn report(mut b: Builder, k: &Checked, health: CloneHealth, w: &Weight) -> Plan {
    report_sidecars(&mut b, k);
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
        let message =
            format!("{desired}% of requests go to the recording clone (target {percent}%)");
        if desired == percent {
            b.report(Phase::Ready, "TargetReached", &message);
        } else {
            b.report(Phase::Progressing, "Ramping", &message);
        }
    }
    b.finish()
}
