//! The Istio router: DestinationRule subsets `rcanary-stable`/`rcanary-recording` and
//! VirtualService weights between them (Istio's sidecar mode). Which VirtualService and
//! DestinationRule to work on and what blocks them; the subsets, then the routes, on the way in;
//! the routes, then (after they reached the proxies) the subsets, on the way out; the drain.

use kube::ResourceExt;
use serde_json::{Value, json};

use super::{Propagation, Routes};
use crate::api::{RECORDING_SUBSET, STABLE_SUBSET, ValidSpec};
use crate::istio::{self, ServiceHost};
use crate::planner::block::{Block, Checked};
use crate::planner::{
    Action, Builder, MeshKind, Observed, Shaped, after, fmt_time, is_root_namespace, meta_name,
    meta_ns, meta_uid, owned_by, owned_dr, owned_mesh_name, owned_vs, parse_time, shape, spec_of,
    splits_at, wildcard_policy,
};

/// What the Istio checks established: the VirtualService and DestinationRule to work on.
pub(in crate::planner) struct IstioSubsets<'a> {
    pub vs: Choice<'a>,
    pub dr: Choice<'a>,
    /// VirtualServices bound to the gateways listed in the spec that route to the host.
    pub gateway_vss: Vec<&'a Value>,
    /// With a DestinationRule of our own: the wildcard DestinationRule whose traffic policy it
    /// carries over, and that policy (see `wildcard_policy`).
    pub carried: Option<(&'a Value, &'a Value)>,
}

/// The checks of the Istio router, in order: which VirtualService and DestinationRule (never a
/// guess between several), that a split can work with them, that every client that sees the
/// routes sees the subsets, and that every route can take the spec's shape exactly.
pub(in crate::planner) fn check<'a>(
    o: &'a Observed<'a>,
    host: &ServiceHost,
    spec: &ValidSpec,
) -> Result<IstioSubsets<'a>, Block> {
    let uid = o.canary.metadata.uid.clone().unwrap_or_default();
    let vs = choose_vs(o, host, &uid)?;
    let dr = choose_dr(o, host, &uid)?;
    check_adopted(o, host, vs, dr)?;
    let gateway_vss = gateway_routes(o, host, vs)?;
    check_exported(o, dr, vs, &gateway_vss)?;
    check_root_dr(o, host)?;
    let carried = match dr {
        Choice::Own(_) => wildcard_policy(o, host),
        Choice::Adopt(_) => None,
    };
    if let Some((d, policy)) = carried
        && let Some(tls) = istio::tls_beyond_istio_mutual(policy)
    {
        return Err(Block::WildcardDestinationRuleTls {
            destination_rule: format!("{}/{}", meta_ns(d), meta_name(d)),
            tls,
        });
    }
    // Every part of the spec's shape, the forced requests included.
    let shaped = shape(spec, spec.percent, true);
    let shape = shaped.view();
    for v in vs.object().into_iter().chain(gateway_vss.iter().copied()) {
        if let Some(problem) = istio::shape_problem(spec_of(v), host, meta_ns(v), &shape) {
            return Err(Block::UnsupportedRoute {
                virtual_service: format!("{}/{}", meta_ns(v), meta_name(v)),
                problem,
            });
        }
    }
    Ok(IstioSubsets {
        vs,
        dr,
        gateway_vss,
        carried,
    })
}

/// The VirtualService or DestinationRule to work on.
#[derive(Clone, Copy)]
pub(in crate::planner) enum Choice<'v> {
    /// The user's: patched surgically, restored on rollback.
    Adopt(&'v Value),
    /// One of our own: `None` until it is created.
    Own(Option<&'v Value>),
}

impl<'v> Choice<'v> {
    pub(super) fn object(self) -> Option<&'v Value> {
        match self {
            Choice::Adopt(v) | Choice::Own(Some(v)) => Some(v),
            Choice::Own(None) => None,
        }
    }
}

/// Every VirtualService whose routes will use the subsets must be seen only by namespaces that
/// also see the DestinationRule defining them (an adopted one; ours is exported everywhere).
pub(super) fn check_exported(
    o: &Observed,
    dr: Choice,
    vs: Choice,
    gateway_vss: &[&Value],
) -> Result<(), Block> {
    let Choice::Adopt(d) = dr else {
        return Ok(());
    };
    let ns = o.canary.namespace().unwrap_or_default();
    let routes = vs.object().into_iter().chain(gateway_vss.iter().copied());
    // A VirtualService still to be created (ours) is exported everywhere.
    let mut views: Vec<(String, istio::Audience)> = routes
        .map(|v| {
            (
                format!("{}/{}", meta_ns(v), meta_name(v)),
                istio::Audience::of(v),
            )
        })
        .collect();
    if vs.object().is_none() {
        views.push((
            format!("{ns}/{}", owned_mesh_name(o.canary)),
            istio::Audience::All,
        ));
    }
    let dr_view = istio::Audience::of(d);
    for (name, view) in views {
        if !dr_view.covers(&view) {
            return Err(Block::DestinationRuleNotExported {
                destination_rule: format!("{}/{}", meta_ns(d), meta_name(d)),
                its_export_to: dr_view.describe(),
                virtual_service: name,
                vs_export_to: view.describe(),
            });
        }
    }
    Ok(())
}

/// With gateways listed, no DestinationRule for the host in the root namespace (see
/// [`Block::RootDestinationRuleForGateways`]).
pub(super) fn check_root_dr(o: &Observed, host: &ServiceHost) -> Result<(), Block> {
    if o.canary.spec.gateways.is_empty() {
        return Ok(());
    }
    match o.destination_rules.iter().find(|d| {
        is_root_namespace(meta_ns(d))
            && d.pointer("/spec/workloadSelector").is_none()
            && host.matches(
                d.pointer("/spec/host")
                    .and_then(Value::as_str)
                    .unwrap_or_default(),
                meta_ns(d),
            )
    }) {
        Some(d) => Err(Block::RootDestinationRuleForGateways {
            destination_rule: format!("{}/{}", meta_ns(d), meta_name(d)),
            host: host.fqdn(),
        }),
        None => Ok(()),
    }
}

/// A user's VirtualService and DestinationRule must be ones a split can work with.
pub(super) fn check_adopted(
    o: &Observed,
    host: &ServiceHost,
    vs: Choice,
    dr: Choice,
) -> Result<(), Block> {
    if let Choice::Adopt(v) = vs {
        let name = meta_name(v).to_string();
        if !istio::vs_routes_to_host(spec_of(v), host, meta_ns(v)) {
            return Err(Block::NoRouteToService {
                virtual_service: name,
                host: host.fqdn(),
            });
        }
        let st = istio::read_split(spec_of(v), host, meta_ns(v));
        if st.pairs == 0 && st.unsplit == 0 {
            return Err(Block::NoSplittableRoute {
                virtual_service: name,
                host: host.fqdn(),
            });
        }
        let (owner, _) = istio::parse_restore_note(istio::restore_note_of(v));
        if let Some(owner) = owner.filter(|n| *n != o.canary.name_any()) {
            return Err(Block::SplitByOther {
                virtual_service: name,
                owner,
            });
        }
    }
    if let Choice::Adopt(d) = dr {
        let its_host = d
            .pointer("/spec/host")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !host.matches(its_host, meta_ns(d)) {
            return Err(Block::DestinationRuleHostMismatch {
                destination_rule: meta_name(d).into(),
                its_host: its_host.into(),
                host: host.fqdn(),
            });
        }
        if let Some(subset) = istio::foreign_subset_with_our_name(spec_of(d)) {
            return Err(Block::SubsetNameTaken {
                destination_rule: meta_name(d).into(),
                subset: subset.to_string(),
            });
        }
    }
    Ok(())
}

/// The gateway VirtualServices to split too; every gateway listed must have one (a typo would
/// otherwise go unnoticed).
pub(super) fn gateway_routes<'a>(
    o: &'a Observed<'a>,
    host: &ServiceHost,
    vs: Choice,
) -> Result<Vec<&'a Value>, Block> {
    let c = o.canary;
    if c.spec.gateways.is_empty() {
        return Ok(Vec::new());
    }
    let ns = c.namespace().unwrap_or_default();
    let routes_host = |v: &Value, gateways: &[String]| {
        meta_ns(v) == ns
            && istio::is_bound_to_gateways(spec_of(v), &ns, gateways, &ns)
            && istio::vs_routes_to_host(spec_of(v), host, &ns)
    };
    if let Some(g) = c.spec.gateways.iter().find(|g| {
        !o.virtual_services
            .iter()
            .any(|v| routes_host(v, std::slice::from_ref(g)))
    }) {
        return Err(Block::GatewayRouteNotFound {
            namespace: ns,
            gateway: g.clone(),
            host: host.fqdn(),
        });
    }
    let adopted = match vs {
        Choice::Adopt(a) => Some(meta_name(a)),
        Choice::Own(_) => None,
    };
    Ok(o.virtual_services
        .iter()
        .filter(|v| Some(meta_name(v)) != adopted && routes_host(v, &c.spec.gateways))
        .collect())
}

pub(super) fn choose_vs<'v>(
    o: &'v Observed<'v>,
    host: &ServiceHost,
    uid: &str,
) -> Result<Choice<'v>, Block> {
    let ns = o.canary.namespace().unwrap_or_default();
    let (mesh, elsewhere): (Vec<&Value>, Vec<&Value>) = o
        .virtual_services
        .iter()
        .filter(|v| {
            istio::is_mesh_bound(spec_of(v)) && istio::vs_has_host(spec_of(v), host, meta_ns(v))
        })
        .partition(|v| meta_ns(v) == ns);
    if let Some(other) = elsewhere.first() {
        return Err(Block::VirtualServiceElsewhere {
            namespace: meta_ns(other).into(),
            name: meta_name(other).into(),
            host: host.fqdn(),
            here: ns,
        });
    }
    choose(
        MeshKind::VirtualService,
        o.canary.spec.virtual_service.as_deref(),
        o.virtual_services,
        mesh,
        (&ns, uid),
        host,
    )
}

pub(super) fn choose_dr<'v>(
    o: &'v Observed<'v>,
    host: &ServiceHost,
    uid: &str,
) -> Result<Choice<'v>, Block> {
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
        return Err(Block::ShadowingDestinationRule {
            namespace: meta_ns(other).into(),
            name: meta_name(other).into(),
            host: host.fqdn(),
        });
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
        MeshKind::DestinationRule,
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
    kind: MeshKind,
    named: Option<&str>,
    all: &'v [Value],
    candidates: Vec<&'v Value>,
    (ns, uid): (&str, &str),
    host: &ServiceHost,
) -> Result<Choice<'v>, Block> {
    if let Some(name) = named {
        return match all
            .iter()
            .find(|v| meta_name(v) == name && meta_ns(v) == ns)
        {
            Some(v) if owned_by(v, uid) => Ok(Choice::Own(Some(v))),
            Some(v) => Ok(Choice::Adopt(v)),
            None => Err(Block::NamedNotFound {
                kind,
                namespace: ns.into(),
                name: name.into(),
            }),
        };
    }
    let (owned, foreign): (Vec<&Value>, Vec<&Value>) =
        candidates.into_iter().partition(|v| owned_by(v, uid));
    match (foreign.as_slice(), owned.as_slice()) {
        ([], []) => Ok(Choice::Own(None)),
        ([], [mine]) => Ok(Choice::Own(Some(mine))),
        ([one], []) => Ok(Choice::Adopt(one)),
        _ => Err(Block::Ambiguous {
            kind,
            host: host.fqdn(),
            names: foreign
                .iter()
                .chain(owned.iter())
                .map(|v| meta_name(v).to_string())
                .collect(),
        }),
    }
}

/// Step 1: our subsets in the DestinationRule. Returns when they will have reached the sidecars.
pub(super) fn subsets(b: &mut Builder, k: &Checked, i: &IstioSubsets) -> Propagation {
    let c = b.o.canary;
    let ns = c.namespace().unwrap_or_default();
    b.status.destination_rule = Some(match i.dr.object() {
        Some(d) => format!("{}/{}", meta_ns(d), meta_name(d)),
        None => format!("{ns}/{}", owned_mesh_name(c)),
    });
    let present =
        i.dr.object()
            .is_some_and(|d| istio::has_our_subsets(spec_of(d)));
    if !present {
        // The time is reported with the status after the write; a crash in between is covered
        // by `Observed::started` (no earlier than the last write of this process, or its start).
        b.status.subsets_added_time = Some(fmt_time(b.o.now));
        match i.dr {
            Choice::Adopt(d) | Choice::Own(Some(d)) => {
                let mut ops = istio::rv_test(d);
                let op = if spec_of(d).get("subsets").is_some() {
                    "replace"
                } else {
                    "add"
                };
                let (subsets, added) = istio::with_our_subsets(spec_of(d));
                ops.push(json!({"op": op, "path": "/spec/subsets", "value": subsets}));
                if matches!(i.dr, Choice::Adopt(_)) {
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
                object: owned_dr(c, &k.host, i.carried.map(|(_, p)| p)),
            }),
        }
    }
    carry_policy(b, k, i, present);
    let since = parse_time(b.status.subsets_added_time.as_deref())
        .unwrap_or(b.o.started)
        .max(b.o.started);
    Propagation {
        until: after(since, k.spec.propagation_delay),
        // The cached object is one revision: its status speaks of its own generation, which
        // holds the subsets (subsets added by this very plan are in no revision yet).
        reconciled: present && i.dr.object().is_some_and(istio::status::reconciled),
        pending: None,
        lost: None,
        waiting: (
            "AddingSubsets",
            format!(
                "Waiting for the DestinationRule subsets to reach the sidecars: until Istio reports DestinationRule {} Reconciled, at most propagationDelay ({})",
                b.status.destination_rule.clone().unwrap_or_default(),
                humantime::format_duration(k.spec.propagation_delay)
            ),
        ),
    }
}

/// Our own DestinationRule follows the traffic policy of the wildcard DestinationRule it
/// displaces for the host (connection pools, outlier detection, load balancing, mTLS): set when
/// it is created, kept up to date after that, said in an Event when it changes.
fn carry_policy(b: &mut Builder, k: &Checked, i: &IstioSubsets, subsets_present: bool) {
    let Choice::Own(own) = i.dr else {
        return;
    };
    let want = i.carried.map(|(_, p)| p);
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
    let note = match i.carried {
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

/// Step 2: reads the split back from the VirtualService.
pub(super) fn read_routes<'a>(b: &mut Builder, k: &Checked, i: &IstioSubsets<'a>) -> Routes<'a> {
    let c = b.o.canary;
    let ns = c.namespace().unwrap_or_default();
    let vs = i.vs.object();
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
                    &shape(&k.spec, b.prev.current_percent, split.always_routes > 0).view(),
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
        i.gateway_vss
            .iter()
            .map(|v| format!("{}/{}", meta_ns(v), meta_name(v))),
    )
    .collect();
    Routes {
        object: vs,
        is_split,
        current,
        kind: MeshKind::VirtualService,
    }
}

/// Step 4: splits the VirtualServices (ours, the adopted one, the gateways') at `desired`, with
/// one Event when the clone first gets traffic and one per weight change after that.
pub(super) fn write_weights(
    b: &mut Builder,
    k: &Checked,
    i: &IstioSubsets,
    routes: &Routes,
    shaped: &Shaped,
) {
    let desired = shaped.nominal;
    let shape = &shaped.view();
    let c = b.o.canary;
    let ns = c.namespace().unwrap_or_default();
    let mut targets: Vec<(Option<&Value>, bool)> =
        vec![(routes.object, matches!(i.vs, Choice::Own(_)))];
    targets.extend(i.gateway_vss.iter().map(|v| (Some(*v), false)));
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

/// Sets the recording weight to 0 in every VirtualService of the namespace that this canary
/// split (ours, or the user's with our restore note) and that sends the clone traffic.
pub(super) fn drain(b: &mut Builder) -> usize {
    let o = b.o;
    let c = o.canary;
    let ns = c.namespace().unwrap_or_default();
    let (me, uid) = (c.name_any(), c.metadata.uid.clone().unwrap_or_default());
    let host = ServiceHost::new(c.spec.service_name(), &ns, o.cluster_domain);
    let mut n = 0;
    for v in o.virtual_services.iter().filter(|v| meta_ns(v) == ns) {
        let own = owned_by(v, &uid);
        let note = istio::restore_note_of(v);
        let (note_owner, _) = istio::parse_restore_note(note);
        if !(own || note_owner.as_deref() == Some(me.as_str())) {
            continue;
        }
        let st = istio::read_split(spec_of(v), &host, meta_ns(v));
        if !st.recording_gets_traffic && st.always_routes == 0 {
            continue;
        }
        // Nothing to the clone: weight (or mirror) 0, no forced requests, the mode kept.
        let shape = istio::Shape {
            mirror: st.mirrored,
            ..istio::Shape::weights(0)
        };
        let s = istio::split_http(spec_of(v), &host, meta_ns(v), &shape, note, &me);
        let mut ops = istio::rv_test(v);
        ops.push(json!({"op": "replace", "path": "/spec/http", "value": s.http}));
        if !own {
            ops.extend(istio::annotation_ops(v, Some(&s.note)));
        }
        b.actions.push(Action::PatchMesh {
            kind: MeshKind::VirtualService,
            name: meta_name(v).into(),
            ops,
        });
        n += 1;
    }
    n
}

/// Whether Istio reports that the routes' removal reached every proxy: each VirtualService this
/// canary split (`status.virtualServices`) is still there, no longer routes to our subsets, and
/// is `Reconciled` for its current generation. A deleted VirtualService (our own) has no status
/// to tell, so its removal is waited for with `propagationDelay`.
pub(super) fn routes_reconciled(b: &Builder, host: &ServiceHost) -> bool {
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
pub(super) fn restore_routes(b: &Builder, host: &ServiceHost) -> Vec<Action> {
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
pub(super) fn remove_subsets(b: &mut Builder) {
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
