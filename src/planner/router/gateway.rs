//! The Gateway API router: two Services of the canary's own, `<canary>-stable` and
//! `<canary>-recording` (the Service's selector with the role label), and HTTPRoute weights
//! between them (GAMMA: Istio's ambient mode with a waypoint, Istio's sidecars, other meshes).
//! The routes that have the Service as a parent (or a listed Gateway, with a backendRef to it)
//! are split; with none, the canary creates one of its own. [`crate::gateway`] does the
//! splitting on JSON; this file decides what to write and when.
//!
//! On the way in: both Services, then (once the stable one lists every Ready endpoint of the
//! target, and `propagationDelay` later, for the mesh to know them) the weights. On the way out:
//! the routes restored (or ours deleted), `propagationDelay`, then the Services deleted.

use std::collections::BTreeMap;
use std::time::Duration;

use kube::ResourceExt;
use serde_json::{Value, json};

use super::{Pending, Propagation, Routes};
use crate::api::labels::{backend_names_valid, backend_service_names};
use crate::api::{ROLE_LABEL, ROLE_RECORDING, ROLE_STABLE, ValidSpec};
use crate::gateway::{self, ProblemKind, Target};
use crate::istio::{self, ServiceHost};
use crate::planner::Shaped;
use crate::planner::block::{Block, Checked};
use crate::planner::progress::ISTIO_SIDECAR_LABEL;
use crate::planner::{
    Action, Builder, MeshKind, Observed, after, meta_name, meta_ns, meta_uid, our_labels, owned_by,
    owned_mesh_name, owner_reference, pod_of_deployment, shape, spec_of,
};

/// What the Gateway API checks established: what to split.
pub(in crate::planner) struct GatewayRoutes<'a> {
    pub target: Target,
    /// The users' HTTPRoutes that concern the Service.
    pub routes: Vec<&'a Value>,
    /// With no user route: the canary's own route (`None` until it is created) and the Service
    /// port it sends to.
    pub own: Option<(Option<&'a Value>, i32)>,
}

/// What the canary splits: its Service (every port), between its two Services; routes with a
/// listed Gateway as parent concern it too.
pub(in crate::planner) fn target(o: &Observed) -> Target {
    let c = o.canary;
    let (stable, recording) = backend_service_names(&c.name_any());
    let mut t = Target::new(
        c.spec.service_name(),
        &c.namespace().unwrap_or_default(),
        &stable,
        &recording,
    );
    t.gateways = c.spec.gateways.clone();
    t
}

fn route_label(r: &Value) -> String {
    format!("{}/{}", meta_ns(r), meta_name(r))
}

/// The checks of the Gateway API router, in order: names it can use, a mesh that applies
/// HTTPRoutes to the Service, no VirtualService beside them, its Services' names free, the
/// routes to split (never one another canary split), and every route able to take the spec's
/// shape exactly.
pub(in crate::planner) fn check<'a>(
    o: &'a Observed<'a>,
    host: &ServiceHost,
    spec: &ValidSpec,
) -> Result<GatewayRoutes<'a>, Block> {
    let c = o.canary;
    let (me, uid) = (c.name_any(), c.metadata.uid.clone().unwrap_or_default());
    let ns = c.namespace().unwrap_or_default();
    let service = c.spec.service_name();
    where_it_can_split(o, &me, &ns, service)?;
    let t = target(o);
    let concerning: Vec<&Value> = o
        .http_routes
        .iter()
        .filter(|r| gateway::concerns(r, &t))
        .collect();
    if let Some(v) = o.virtual_services.iter().find(|v| {
        istio::is_mesh_bound(spec_of(v)) && istio::vs_has_host(spec_of(v), host, meta_ns(v))
    }) {
        return Err(Block::BothRouteKinds {
            virtual_service: route_label(v),
            http_route: concerning
                .first()
                .map(|r| route_label(r))
                .unwrap_or_else(|| format!("{ns}/{} (the canary's own)", owned_mesh_name(c))),
        });
    }
    if let Some(p) = o
        .grpc_routes
        .iter()
        .find_map(|r| gateway::other_route_problem("GRPCRoute", r, &t))
    {
        return Err(Block::OtherRouteKind { problem: p.message });
    }
    for s in o.backend_services.iter().flatten() {
        if s.controller_uid.as_deref() != Some(uid.as_str()) {
            return Err(Block::BackendServiceTaken {
                service: s.name.clone(),
            });
        }
    }
    let (own, user): (Vec<&Value>, Vec<&Value>) =
        concerning.into_iter().partition(|r| owned_by(r, &uid));
    for r in &user {
        if let Some(owner) = gateway::note_owner(gateway::restore_note_of(r)).filter(|n| *n != me) {
            return Err(Block::HttpRouteSplitByOther {
                http_route: route_label(r),
                owner,
            });
        }
    }
    for g in &c.spec.gateways {
        let mut only = Target::new("", &ns, &t.backends.stable, &t.backends.recording);
        only.gateways = vec![g.clone()];
        let found = o
            .http_routes
            .iter()
            .any(|r| gateway::concerns(r, &only) && gateway::routes_to_service(r, &t));
        if !found {
            return Err(Block::GatewayHttpRouteNotFound {
                gateway: g.clone(),
                service: service.into(),
            });
        }
    }
    let full = shape(spec, spec.percent, true);
    let full = full.view();
    let mut no_traffic = None;
    for r in user.iter().chain(own.iter()) {
        match gateway::shape_problem(r, &t, &full) {
            Some(p) if p.kind == ProblemKind::NoTraffic => {
                no_traffic.get_or_insert((route_label(r), p.message));
            }
            Some(p) => {
                return Err(Block::UnsupportedHttpRoute {
                    http_route: route_label(r),
                    problem: p.message,
                });
            }
            None => {}
        }
    }
    // A route that sends nothing to the Service is left alone when another one carries traffic.
    let carried = user.len() + own.len() > usize::from(no_traffic.is_some());
    if let Some((http_route, problem)) = no_traffic.filter(|_| !carried) {
        return Err(Block::UnsupportedHttpRoute {
            http_route,
            problem,
        });
    }
    let own = if user.is_empty() {
        Some((own.first().copied(), own_port(o, &t, &full)?))
    } else {
        None
    };
    Ok(GatewayRoutes {
        target: t,
        routes: user,
        own,
    })
}

/// The checks of where the canary is, before its routes: a name its Services can take, a
/// waypoint in ambient mode, and Istio for a session key.
fn where_it_can_split(o: &Observed, me: &str, ns: &str, service: &str) -> Result<(), Block> {
    let c = o.canary;
    if !backend_names_valid(me) {
        return Err(Block::UnsupportedByRouter {
            router: "GatewayAPI".into(),
            what: format!("a RecordingCanary named {me}"),
            why: "it names its two Services after the canary, and a Service name must start with a letter; create the canary under a name that does".into(),
        });
    }
    if o.ambient && o.waypoint.is_none() {
        return Err(Block::NoWaypoint {
            namespace: ns.into(),
            service: service.into(),
        });
    }
    if c.spec.session_key.is_some() && !o.ambient && !istio_sidecars(o) {
        return Err(Block::UnsupportedByRouter {
            router: "GatewayAPI".into(),
            what: "spec.sessionKey outside Istio".into(),
            why: format!(
                "a session key is matched with RegularExpression matches, which the Gateway API leaves to each implementation; Istio (sidecars, or ambient mode with a waypoint) matches them with RE2, and no other mesh is known to this controller to. No pod of Deployment {} carries Istio's sidecar (label {}={}) and namespace {ns} is not in ambient mode; remove spec.sessionKey to split by weight",
                c.spec.target_ref.name, ISTIO_SIDECAR_LABEL.0, ISTIO_SIDECAR_LABEL.1
            ),
        });
    }
    Ok(())
}

/// Whether a pod of the target carries Istio's sidecar: Istio is the mesh that applies the
/// routes.
fn istio_sidecars(o: &Observed) -> bool {
    let (key, value) = ISTIO_SIDECAR_LABEL;
    o.pods.iter().any(|p| {
        pod_of_deployment(p, &o.canary.spec.target_ref.name)
            && p.labels().get(key).map(String::as_str) == Some(value)
    })
}

/// The port the canary's own route sends to: the Service's only port.
fn own_port(o: &Observed, t: &Target, full: &gateway::Shape) -> Result<i32, Block> {
    let ports: Vec<i64> = o
        .service_ports
        .iter()
        .filter_map(|p| p.get("port").and_then(Value::as_i64))
        .collect();
    let [port] = ports.as_slice() else {
        return Err(Block::UnsupportedByRouter {
            router: "GatewayAPI".into(),
            what: format!("Service {} with {} ports", t.service, ports.len()),
            why: "no HTTPRoute has it as a parent, so the canary would create one, and a route sends to one port; create an HTTPRoute for the port to record (the canary splits it)".into(),
        });
    };
    let port = i32::try_from(*port).unwrap_or_default();
    if let Err(p) = gateway::own_route("probe", "probe", t, port, full) {
        return Err(Block::UnsupportedHttpRoute {
            http_route: format!(
                "{}/{} (the canary's own)",
                t.namespace,
                owned_mesh_name(o.canary)
            ),
            problem: p.message,
        });
    }
    Ok(port)
}

/// The Service's ports as one of ours carries them (ClusterIP: no node ports).
fn backend_ports(o: &Observed) -> Vec<Value> {
    o.service_ports
        .iter()
        .map(|p| {
            let mut p = p.clone();
            if let Some(m) = p.as_object_mut() {
                m.remove("nodePort");
            }
            p
        })
        .collect()
}

fn backend_selector(o: &Observed, role: &str) -> BTreeMap<String, String> {
    let mut s = o.service_selector.clone();
    s.insert(ROLE_LABEL.into(), role.into());
    s
}

/// One of the canary's two Services.
fn backend_service(o: &Observed, name: &str, role: &str) -> Value {
    let c = o.canary;
    let mut labels = our_labels(c);
    labels.insert(ROLE_LABEL.into(), role.into());
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": c.namespace(),
            "labels": labels,
            "ownerReferences": [owner_reference(c)],
        },
        "spec": {
            "type": "ClusterIP",
            "selector": backend_selector(o, role),
            "ports": backend_ports(o),
        },
    })
}

/// Step 1: both Services, as they should be. Returns when the routes may send to them.
pub(super) fn services(b: &mut Builder, k: &Checked, g: &GatewayRoutes) -> Propagation {
    let o = b.o;
    let ns = o.canary.namespace().unwrap_or_default();
    let t = &g.target;
    b.status.backend_services = vec![
        format!("{ns}/{}", t.backends.stable),
        format!("{ns}/{}", t.backends.recording),
    ];
    let all_there = ensure_services(b, t);
    let target = &o.canary.spec.target_ref.name;
    let (listed, want) = stable_endpoints(o);
    let complete = all_there && want > 0 && listed == want;
    // Services created or pods labelled by this very plan: what it would report is about to
    // change (their echo plans again at once). Not so when a Service was lost under a split
    // route: that report is worth its write and its Event.
    let lost = lost(o, g);
    b.transient = !complete
        && lost.is_none()
        && b.actions
            .iter()
            .any(|a| matches!(a, Action::CreateService(_) | Action::LabelPod { .. }));
    // One message for both waits (for the endpoints, then for the mesh): no status write
    // between them.
    let message = format!(
        "Waiting for Services {} and {} to reach the mesh: every Ready endpoint of Service {} that is a pod of Deployment {target} must be an endpoint of {} (its EndpointSlices), then propagationDelay ({}) must pass",
        t.backends.stable,
        t.backends.recording,
        t.service,
        t.backends.stable,
        humantime::format_duration(k.spec.propagation_delay)
    );
    let pending = (!complete).then(|| Pending {
        reason: "AddingBackends",
        message: message.clone(),
    });
    // The wait runs from the stable Service's last EndpointSlice change: the mesh learns of the
    // Services and their endpoints from those writes. Kept to the second: the next second is
    // after the write.
    let changed = o.backend_services[0]
        .and_then(|s| s.endpoints_changed)
        .map(|t| after(t, Duration::from_secs(1)));
    let since = changed.unwrap_or(o.started).max(o.started);
    Propagation {
        until: after(since, k.spec.propagation_delay),
        reconciled: false,
        lost,
        pending,
        waiting: ("AddingBackends", message),
    }
}

/// Both Services as they should be: created, or patched to follow the Service's selector and
/// ports. Whether both were there as they should be.
fn ensure_services(b: &mut Builder, t: &Target) -> bool {
    let o = b.o;
    let ports = backend_ports(o);
    let mut all_there = true;
    for (i, (name, role)) in [
        (&t.backends.stable, ROLE_STABLE),
        (&t.backends.recording, ROLE_RECORDING),
    ]
    .into_iter()
    .enumerate()
    {
        match o.backend_services[i] {
            None => {
                b.actions
                    .push(Action::CreateService(Box::new(backend_service(
                        o, name, role,
                    ))));
                all_there = false;
            }
            Some(s) if s.deleting => all_there = false,
            Some(s) if s.selector != backend_selector(o, role) || s.ports != ports => {
                // The Service's selector or ports changed: ours follow.
                b.actions.push(Action::PatchService {
                    name: name.clone(),
                    ops: vec![
                        json!({"op": "test", "path": "/metadata/resourceVersion", "value": s.resource_version}),
                        json!({"op": "replace", "path": "/spec/selector", "value": backend_selector(o, role)}),
                        json!({"op": "replace", "path": "/spec/ports", "value": ports}),
                    ],
                });
                all_there = false;
            }
            Some(_) => {}
        }
    }
    all_there
}

/// Of the target's pods that are Ready endpoints of the Service in the stable role (all of the
/// Service's stable traffic, which the split moves to the stable Service), how many the stable
/// Service lists: `(listed, of)`.
fn stable_endpoints(o: &Observed) -> (usize, usize) {
    let target = &o.canary.spec.target_ref.name;
    let want: Vec<&str> = o
        .pods
        .iter()
        .filter(|p| {
            pod_of_deployment(p, target)
                && p.serving()
                && p.labels().get(ROLE_LABEL).map(String::as_str) == Some(ROLE_STABLE)
        })
        .filter_map(|p| p.metadata.name.as_deref())
        .filter(|n| o.endpoints.contains(*n))
        .collect();
    let listed = o.backend_services[0].map_or(0, |s| {
        want.iter().filter(|n| s.endpoints.contains(**n)).count()
    });
    (listed, want.len())
}

/// One of the Services gone (or going) while a route still sends to it: that share of the
/// requests would be refused until it is back.
fn lost(o: &Observed, g: &GatewayRoutes) -> Option<String> {
    let t = &g.target;
    let gone: Vec<&str> = [&t.backends.stable, &t.backends.recording]
        .into_iter()
        .zip(o.backend_services)
        .filter(|(_, s)| s.is_none_or(|s| s.deleting))
        .map(|(n, _)| n.as_str())
        .collect();
    let referenced = split_routes(g)
        .iter()
        .any(|r| gateway::read_split(r, t).references_backends);
    (!gone.is_empty() && referenced).then(|| {
        format!(
            "Service {} was deleted while the routes sent to it; the routes went back to Service {} until it is recreated and has its endpoints again",
            gone.join(" and "),
            t.service
        )
    })
}

/// Every route this canary splits now: the users', and its own once created.
fn split_routes<'a>(g: &GatewayRoutes<'a>) -> Vec<&'a Value> {
    let mut all = g.routes.clone();
    if let Some((Some(own), _)) = g.own {
        all.push(own);
    }
    all
}

/// Whether a route is exactly its split at `shape`.
fn splits_at(r: &Value, t: &Target, shape: &gateway::Shape, me: &str) -> bool {
    let note = gateway::restore_note_of(r);
    match gateway::split_rules(r, t, shape, note, me) {
        Ok(s) => spec_of(r).get("rules") == Some(&s.rules) && note == Some(s.note.as_str()),
        Err(_) => false,
    }
}

/// Step 2: reads the split back from the routes.
pub(super) fn read_routes<'a>(b: &mut Builder, k: &Checked, g: &GatewayRoutes<'a>) -> Routes<'a> {
    let c = b.o.canary;
    let ns = c.namespace().unwrap_or_default();
    let t = &g.target;
    let routes = split_routes(g);
    let states: Vec<gateway::SplitState> =
        routes.iter().map(|r| gateway::read_split(r, t)).collect();
    let is_split = !routes.is_empty() && states.iter().all(|s| s.pairs > 0 && s.unsplit == 0);
    let prev = shape(
        &k.spec,
        b.prev.current_percent,
        states.iter().any(|s| s.always_rules > 0),
    );
    let prev = prev.view();
    let current = if !is_split {
        0
    } else if routes.iter().all(|r| splits_at(r, t, &prev, &c.name_any())) {
        b.prev.current_percent
    } else {
        states.iter().find_map(|s| s.percent).unwrap_or(0)
    };
    b.status.http_routes = routes.iter().map(|r| route_label(r)).collect();
    if matches!(g.own, Some((None, _))) {
        b.status
            .http_routes
            .push(format!("{ns}/{}", owned_mesh_name(c)));
    }
    let unsplit = routes
        .iter()
        .zip(&states)
        .find(|(_, s)| s.pairs == 0 || s.unsplit > 0)
        .map(|(r, _)| *r);
    Routes {
        object: unsplit.or(routes.first().copied()),
        is_split,
        current,
        kind: MeshKind::HttpRoute,
    }
}

/// Step 4: splits every route (the users', ours) at `shape`, with one Event when the clone first
/// gets traffic and one per weight change after that.
pub(super) fn write_weights(
    b: &mut Builder,
    k: &Checked,
    g: &GatewayRoutes,
    routes: &Routes,
    shaped: &Shaped,
) {
    let c = b.o.canary;
    let me = c.name_any();
    let t = &g.target;
    let desired = shaped.nominal;
    let shape = &shaped.view();
    let mut wrote = false;
    if let Some((None, port)) = g.own {
        match gateway::own_route(&owned_mesh_name(c), &me, t, port, shape) {
            Ok(mut r) => {
                r["metadata"]["labels"] = json!(our_labels(c));
                r["metadata"]["ownerReferences"] = json!([owner_reference(c)]);
                b.actions.push(Action::CreateMesh {
                    kind: MeshKind::HttpRoute,
                    object: r,
                });
                wrote = true;
            }
            Err(p) => b.event(true, "UnsupportedRoute", p.message),
        }
    }
    for r in split_routes(g) {
        if splits_at(r, t, shape, &me) {
            continue;
        }
        let note = gateway::restore_note_of(r);
        let split = match gateway::split_rules(r, t, shape, note, &me) {
            Ok(s) => s,
            Err(p) => {
                b.event(
                    true,
                    "UnsupportedRoute",
                    format!("HTTPRoute {}: {}", route_label(r), p.message),
                );
                continue;
            }
        };
        let mut ops = istio::rv_test(r);
        let op = if spec_of(r).get("rules").is_some() {
            "replace"
        } else {
            "add"
        };
        ops.push(json!({"op": op, "path": "/spec/rules", "value": split.rules}));
        ops.extend(istio::annotation_ops(r, Some(&split.note)));
        b.actions.push(Action::PatchMesh {
            kind: MeshKind::HttpRoute,
            name: meta_name(r).into(),
            ops,
        });
        wrote = true;
    }
    let current = routes.current;
    let between = format!(
        "Services {} and {}",
        t.backends.stable, t.backends.recording
    );
    if wrote && desired > 0 && current == 0 {
        b.event(
            false,
            "RoutesSplit",
            format!(
                "HTTPRoutes to Service {} split between {between}; {desired}% go to the recording clone",
                k.host.name
            ),
        );
    } else if wrote && desired != current {
        b.event(
            false,
            "WeightChanged",
            format!(
                "{desired}% of requests to Service {} now go to the recording clone (was {current}%)",
                k.host.name
            ),
        );
    } else if wrote && routes.is_split {
        b.event(
            false,
            "RoutesReshaped",
            format!(
                "HTTPRoutes to Service {} now {}: {desired}%, {} forced and {} excluded request matches",
                k.host.name,
                if shape.mirror { "mirror" } else { "split" },
                shape.always.len(),
                shape.never.len()
            ),
        );
    }
    b.status.current_percent = desired;
}

/// Whether route `r` is this canary's: its own, or a user's whose restore note names it.
fn is_ours(r: &Value, me: &str, uid: &str) -> bool {
    owned_by(r, uid) || gateway::note_owner(gateway::restore_note_of(r)).as_deref() == Some(me)
}

/// Sets the recording weight to 0 in every route of the namespace that this canary split and
/// that sends the clone traffic (its forced requests included).
pub(super) fn drain(b: &mut Builder) -> usize {
    let o = b.o;
    let c = o.canary;
    let ns = c.namespace().unwrap_or_default();
    let (me, uid) = (c.name_any(), c.metadata.uid.clone().unwrap_or_default());
    let t = target(o);
    let mut n = 0;
    for r in o.http_routes.iter().filter(|r| meta_ns(r) == ns) {
        if !is_ours(r, &me, &uid) {
            continue;
        }
        let st = gateway::read_split(r, &t);
        if !st.recording_gets_traffic {
            continue;
        }
        let shape = gateway::Shape {
            mirror: st.mirrored,
            ..gateway::Shape::weights(0)
        };
        let Ok(split) = gateway::split_rules(r, &t, &shape, gateway::restore_note_of(r), &me)
        else {
            continue;
        };
        let mut ops = istio::rv_test(r);
        ops.push(json!({"op": "replace", "path": "/spec/rules", "value": split.rules}));
        ops.extend(istio::annotation_ops(r, Some(&split.note)));
        b.actions.push(Action::PatchMesh {
            kind: MeshKind::HttpRoute,
            name: meta_name(r).into(),
            ops,
        });
        n += 1;
    }
    n
}

/// The writes that take every route of this canary's split back to the Service: its own routes
/// deleted, the users' restored from their notes.
pub(super) fn restore_routes(b: &Builder) -> Vec<Action> {
    let o = b.o;
    let c = o.canary;
    let ns = c.namespace().unwrap_or_default();
    let (me, uid) = (c.name_any(), c.metadata.uid.clone().unwrap_or_default());
    let t = target(o);
    let mut writes = Vec::new();
    for r in o.http_routes.iter().filter(|r| meta_ns(r) == ns) {
        if owned_by(r, &uid) {
            writes.push(Action::DeleteMesh {
                kind: MeshKind::HttpRoute,
                name: meta_name(r).into(),
                uid: meta_uid(r).into(),
            });
            continue;
        }
        let note = gateway::restore_note_of(r);
        let owner = gateway::note_owner(note);
        let ours = owner.as_deref() == Some(me.as_str());
        let refers = gateway::read_split(r, &t).references_backends;
        // Ours by the note, or split with no note at all (ours: nobody else splits to our
        // Services).
        let restorable = (ours && note.is_some()) || (refers && owner.is_none());
        if !restorable {
            continue;
        }
        let rules = gateway::unsplit_rules(r, &t, note);
        let mut ops = istio::rv_test(r);
        if spec_of(r).get("rules").is_some() {
            ops.push(json!({"op": "replace", "path": "/spec/rules", "value": rules}));
        }
        ops.extend(istio::annotation_ops(r, None));
        writes.push(Action::PatchMesh {
            kind: MeshKind::HttpRoute,
            name: meta_name(r).into(),
            ops,
        });
    }
    writes
}

/// Rollback, step 2: whether the mesh reports the restored routes: every route this canary split
/// (`status.httpRoutes`) is still there, no longer sends to its Services, and every parent that
/// concerns the Service accepted its current generation. A deleted route (its own) has no status
/// to tell: its removal is waited for with `propagationDelay`.
pub(super) fn routes_accepted(b: &Builder) -> bool {
    let o = b.o;
    let t = target(o);
    let split = &b.prev.http_routes;
    !split.is_empty()
        && split.iter().all(|key| {
            let Some((ns, name)) = key.split_once('/') else {
                return false;
            };
            o.http_routes
                .iter()
                .find(|r| meta_ns(r) == ns && meta_name(r) == name)
                .is_some_and(|r| {
                    let parents = gateway::concerning_parents(r, &t);
                    !gateway::read_split(r, &t).references_backends
                        && !parents.is_empty()
                        && parents
                            .iter()
                            .all(|p| gateway::status::accepted_for_current_generation(r, p))
                })
        })
}

/// Rollback, step 3: the canary's two Services deleted.
pub(super) fn remove_services(b: &mut Builder) {
    let uid = b.o.canary.metadata.uid.clone().unwrap_or_default();
    for s in b.o.backend_services.iter().flatten() {
        if s.controller_uid.as_deref() == Some(uid.as_str()) && !s.deleting {
            b.actions.push(Action::DeleteService {
                name: s.name.clone(),
                uid: s.uid.clone(),
            });
        }
    }
}

/// What the routes' parents report of the split (`Ok` once every parent that concerns the
/// Service accepted the current rules, with every backend resolved), for the report.
pub(in crate::planner) fn route_verdict(b: &Builder, g: &GatewayRoutes) -> RouteVerdict {
    let o = b.o;
    let t = &g.target;
    let mut waiting = Vec::new();
    // Rules written by this very plan are in no revision the mesh has seen.
    let written: Vec<&str> = b
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::PatchMesh {
                kind: MeshKind::HttpRoute,
                name,
                ..
            } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    for r in split_routes(g) {
        if written.contains(&meta_name(r)) {
            waiting.push(route_label(r));
            continue;
        }
        for p in gateway::concerning_parents(r, t) {
            if gateway::status::accepted_for_current_generation(r, p) {
                continue;
            }
            if let Some((reason, message)) = gateway::status::unresolved_waypoint(r) {
                return RouteVerdict::Refused(format!(
                    "HTTPRoute {}: {reason} {message}",
                    route_label(r)
                ));
            }
            if let Some(why) = refused(r, p) {
                return RouteVerdict::Refused(format!("HTTPRoute {}: {why}", route_label(r)));
            }
            waiting.push(route_label(r));
            break;
        }
    }
    if matches!(g.own, Some((None, _))) {
        waiting.push(format!("{} (to be created)", owned_mesh_name(o.canary)));
    }
    if waiting.is_empty() {
        RouteVerdict::Accepted
    } else {
        RouteVerdict::Waiting(waiting)
    }
}

/// A parent's explicit refusal of the route's current generation: `Accepted` or `ResolvedRefs`
/// `False` for it.
fn refused(r: &Value, parent: &Value) -> Option<String> {
    let generation = r.pointer("/metadata/generation").and_then(Value::as_i64)?;
    let entries = r.pointer("/status/parents")?.as_array()?;
    let name = parent
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    entries
        .iter()
        .filter(|e| e.pointer("/parentRef/name").and_then(Value::as_str) == Some(name))
        .flat_map(|e| {
            e.get("conditions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
        })
        .find(|c| {
            matches!(
                c.get("type").and_then(Value::as_str),
                Some(gateway::status::ACCEPTED | gateway::status::RESOLVED_REFS)
            ) && c.get("status").and_then(Value::as_str) == Some("False")
                && c.get("observedGeneration").and_then(Value::as_i64) == Some(generation)
        })
        .map(|c| {
            format!(
                "its parent {name} reports {} False ({})",
                c.get("type").and_then(Value::as_str).unwrap_or_default(),
                c.get("reason").and_then(Value::as_str).unwrap_or_default()
            )
        })
}

/// What the routes' parents say of the split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::planner) enum RouteVerdict {
    /// Every parent accepted the current rules and resolved every backend.
    Accepted,
    /// Not yet reported for the current rules, on these routes.
    Waiting(Vec<String>),
    /// A parent refused the route (or Istio found no waypoint for it).
    Refused(String),
}
