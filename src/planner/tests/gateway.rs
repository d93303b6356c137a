//! The Gateway API router: its checks, its two Services, the split of HTTPRoutes (the users' or
//! its own) only once the Services carry the endpoints, the parents' verdicts, the drain and the
//! rollback; and a simulated round trip.

use super::*;
use crate::api::status::Router;
use crate::gateway;

const STABLE_SVC: &str = "rec-stable";
const RECORDING_SVC: &str = "rec-recording";

fn http_route(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-route-{name}"),
                     "resourceVersion": "200", "generation": 1},
        "spec": spec,
    })
}

/// The user's HTTPRoute: the Service as parent (GAMMA), a timeout, one backendRef to it.
fn user_route() -> Value {
    http_route(
        "frontend",
        json!({
            "parentRefs": [{"group": "", "kind": "Service", "name": "frontend", "port": 80}],
            "rules": [{
                "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                "timeouts": {"request": "10s"},
                "backendRefs": [{"name": "frontend", "port": 80}],
            }],
        }),
    )
}

/// The route's parents accept its current generation.
fn accepted(mut r: Value) -> Value {
    let generation = r["metadata"]["generation"].clone();
    let cond = |t: &str| json!({"type": t, "status": "True", "reason": t, "observedGeneration": generation});
    r["status"] = json!({"parents": [{
        "parentRef": {"group": "", "kind": "Service", "name": "frontend", "port": 80},
        "controllerName": "istio.io/gateway-controller",
        "conditions": [cond("Accepted"), cond("ResolvedRefs")],
    }]});
    r
}

fn backend(name: &str, role: &str) -> BackendService {
    BackendService {
        name: name.into(),
        uid: format!("uid-{name}"),
        resource_version: "300".into(),
        controller_uid: Some(CANARY_UID.into()),
        deleting: false,
        selector: BTreeMap::from([
            ("app".to_string(), "frontend".to_string()),
            (ROLE_LABEL.to_string(), role.to_string()),
        ]),
        ports: vec![json!({"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080})],
        endpoints: BTreeSet::new(),
        endpoints_changed: Some(at(-600)),
    }
}

fn both_backends() -> [Option<BackendService>; 2] {
    [
        Some(backend(STABLE_SVC, ROLE_STABLE)),
        Some(backend(RECORDING_SVC, ROLE_RECORDING)),
    ]
}

fn gw_canary() -> CanaryB {
    canary().spec("router", json!("GatewayAPI"))
}

/// Nothing done yet: the user's HTTPRoute, two Ready unlabelled target pods, no mesh object.
fn gateway_world() -> World {
    let mut w = fresh_world().with_canary(gw_canary());
    w.vss = vec![];
    w.drs = vec![];
    w.http_routes = vec![user_route()];
    w
}

fn gw_status(phase_: Phase, reason: &str, current: i32) -> RecordingCanaryStatus {
    RecordingCanaryStatus {
        phase: Some(phase_),
        current_percent: current,
        router: Some(Router::GatewayApi),
        backend_services: vec![
            format!("{NS}/{STABLE_SVC}"),
            format!("{NS}/{RECORDING_SVC}"),
        ],
        http_routes: vec![format!("{NS}/frontend")],
        conditions: vec![ready_condition(reason, phase_ == Phase::Ready)],
        ..Default::default()
    }
}

/// The user's route after our split at `pct` (what the planner itself writes).
fn split_route(pct: i32) -> Value {
    let r = user_route();
    let t = gateway::Target::new("frontend", NS, STABLE_SVC, RECORDING_SVC);
    let s = gateway::split_rules(&r, &t, &gateway::Shape::weights(pct), None, CANARY).unwrap();
    let mut out = r.clone();
    out["spec"]["rules"] = s.rules;
    out["metadata"]["annotations"] = json!({RESTORE_ANNOTATION: s.note});
    out["metadata"]["generation"] = json!(2);
    out
}

/// Serving `pct` % through the user's route, accepted by its parent; everything healthy.
fn gw_serving_world(pct: i32) -> World {
    let mut w = serving_world(pct).with_canary(gw_canary().percent(pct.into()).status(gw_status(
        Phase::Ready,
        "TargetReached",
        pct,
    )));
    w.vss = vec![];
    w.drs = vec![];
    w.http_routes = vec![accepted(split_route(pct))];
    w.backends = both_backends();
    w
}

fn route_patch<'p>(p: &'p Plan, name: &str) -> Option<&'p Vec<Value>> {
    patch_of(p, MeshKind::HttpRoute, name)
}

fn is_route_write(a: &Action) -> bool {
    matches!(
        a,
        Action::PatchMesh {
            kind: MeshKind::HttpRoute,
            ..
        } | Action::CreateMesh {
            kind: MeshKind::HttpRoute,
            ..
        } | Action::DeleteMesh {
            kind: MeshKind::HttpRoute,
            ..
        }
    )
}

fn created_services(p: &Plan) -> Vec<&Value> {
    p.actions
        .iter()
        .filter_map(|a| match a {
            Action::CreateService(o) => Some(o.as_ref()),
            _ => None,
        })
        .collect()
}

/// The weight each backendRef of the route's rules gets, by Service name.
fn route_weights(r: &Value) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for rule in r["spec"]["rules"].as_array().into_iter().flatten() {
        for b in rule["backendRefs"].as_array().into_iter().flatten() {
            *out.entry(b["name"].as_str().unwrap_or_default().to_string())
                .or_default() += b["weight"].as_i64().unwrap_or(1);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

#[test]
fn an_ambient_namespace_without_a_waypoint_blocks_the_gateway_api_router() {
    let mut w = gateway_world();
    w.ambient = true;
    let p = w.plan();
    assert_eq!(ready_reason(&p), "NoWaypoint");
    assert!(!has(&p, is_route_write) && created_services(&p).is_empty());
    assert!(
        ready_message(&p).contains("istio.io/use-waypoint"),
        "{}",
        ready_message(&p)
    );
    // A waypoint (the namespace's or the Service's label): no longer blocked.
    w.waypoint = Some("waypoint".into());
    assert_eq!(created_services(&w.plan()).len(), 2);
}

#[test]
fn a_virtual_service_beside_an_http_route_blocks_both_kinds() {
    let mut w = gateway_world();
    w.vss = vec![user_vs()];
    let p = w.plan();
    assert_eq!(ready_reason(&p), "BothRouteKinds");
    assert!(
        ready_message(&p).contains("shop/frontend"),
        "{}",
        ready_message(&p)
    );
    assert!(!has(&p, is_route_write) && created_services(&p).is_empty());
}

#[test]
fn a_service_with_the_name_of_one_of_ours_that_is_not_ours_blocks() {
    let mut w = gateway_world();
    let mut theirs = backend(RECORDING_SVC, ROLE_RECORDING);
    theirs.controller_uid = None;
    w.backends = [None, Some(theirs)];
    let p = w.plan();
    assert_eq!(ready_reason(&p), "BackendServiceTaken");
    assert!(ready_message(&p).contains(RECORDING_SVC));
    assert!(created_services(&p).is_empty(), "{:#?}", p.actions);
}

#[test]
fn a_route_split_by_another_canary_is_a_conflict() {
    let mut w = gateway_world();
    let mut r = split_route(10);
    r["metadata"]["annotations"][RESTORE_ANNOTATION] =
        json!(json!({"canary": "other", "rules": []}).to_string());
    w.http_routes = vec![r];
    let p = w.plan();
    assert_eq!(ready_reason(&p), "Conflict");
    assert!(
        ready_message(&p).contains("RecordingCanary other"),
        "{}",
        ready_message(&p)
    );
}

#[test]
fn a_listed_gateway_without_a_route_to_the_service_blocks() {
    let mut w = gateway_world().with_canary(gw_canary().spec("gateways", json!(["ingress"])));
    let p = w.plan();
    assert_eq!(ready_reason(&p), "GatewayRouteNotFound");
    assert!(
        ready_message(&p).contains("Gateway ingress"),
        "{}",
        ready_message(&p)
    );
    // A route of that Gateway to the Service: found, and split too.
    w.http_routes.push(http_route(
        "ingress-frontend",
        json!({"parentRefs": [{"name": "ingress"}],
               "rules": [{"backendRefs": [{"name": "frontend", "port": 80}]}]}),
    ));
    assert_ne!(ready_reason(&w.plan()), "GatewayRouteNotFound");
}

#[test]
fn a_canary_named_with_a_leading_digit_cannot_name_its_services() {
    let w = gateway_world().with_canary(gw_canary().named("1st", "uid-1st", -3600));
    let p = w.plan();
    assert_eq!(ready_reason(&p), "UnsupportedByRouter");
    assert!(
        ready_message(&p).contains("start with a letter"),
        "{}",
        ready_message(&p)
    );
}

#[test]
fn without_a_route_a_service_of_several_ports_blocks_its_own_route() {
    let mut w = gateway_world();
    w.http_routes = vec![];
    w.service_ports = vec![
        json!({"name": "http", "port": 80}),
        json!({"name": "grpc", "port": 9090}),
    ];
    let p = w.plan();
    assert_eq!(ready_reason(&p), "UnsupportedByRouter");
    assert!(
        ready_message(&p).contains("2 ports"),
        "{}",
        ready_message(&p)
    );
}

#[test]
fn a_route_that_cannot_take_the_shape_exactly_is_refused_with_the_modules_reason() {
    let mut w = gateway_world();
    // 16 rules already: the `never` rule the canary would insert is a 17th.
    let rules: Vec<Value> = (0..16)
        .map(|i| {
            json!({"matches": [{"path": {"type": "PathPrefix", "value": format!("/p{i}")}}],
                        "backendRefs": [{"name": "frontend", "port": 80}]})
        })
        .collect();
    w.http_routes = vec![http_route(
        "frontend",
        json!({"parentRefs": [{"group": "", "kind": "Service", "name": "frontend"}], "rules": rules}),
    )];
    w.canary = gw_canary()
        .spec(
            "never",
            json!([{"headers": {"x-no-record": {"exact": "1"}}}]),
        )
        .build();
    let p = w.plan();
    assert_eq!(ready_reason(&p), "UnsupportedRoute");
    assert!(
        ready_message(&p).starts_with("HTTPRoute shop/frontend:"),
        "{}",
        ready_message(&p)
    );
}

// ---------------------------------------------------------------------------------------------
// The way in
// ---------------------------------------------------------------------------------------------

#[test]
fn the_two_services_come_first_selecting_each_role_with_the_services_ports() {
    let mut w = gateway_world();
    w.service_ports = vec![
        json!({"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080}),
    ];
    let p = w.plan();
    let created = created_services(&p);
    assert_eq!(created.len(), 2, "{:#?}", p.actions);
    for (svc, role) in created.iter().zip([ROLE_STABLE, ROLE_RECORDING]) {
        assert_eq!(svc["spec"]["type"], "ClusterIP");
        assert_eq!(
            svc["spec"]["selector"],
            json!({"app": "frontend", ROLE_LABEL: role})
        );
        assert_eq!(
            svc["spec"]["ports"],
            json!([{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]),
            "no node port on ours"
        );
        assert_eq!(svc["metadata"]["ownerReferences"][0]["uid"], CANARY_UID);
        assert_eq!(svc["metadata"]["labels"][CANARY_LABEL], CANARY);
    }
    assert_eq!(meta_name(created[0]), STABLE_SVC);
    assert_eq!(meta_name(created[1]), RECORDING_SVC);
    assert!(!has(&p, is_route_write), "no route before the Services");
    assert_eq!(ready_reason(&p), "AddingBackends");
    // Its own writes plan again at once: this report is not written, nor said in an Event.
    assert!(p.transient_status);
    assert!(
        !event_reasons(&p).contains(&"AddingBackends"),
        "{:?}",
        p.events
    );
    assert_eq!(
        p.status.backend_services,
        vec![
            format!("{NS}/{STABLE_SVC}"),
            format!("{NS}/{RECORDING_SVC}")
        ]
    );
    assert_eq!(p.status.router, Some(Router::GatewayApi));
    // The target's pods get the stable role (what the stable Service selects).
    assert_eq!(
        p.actions
            .iter()
            .filter(|a| matches!(a, Action::LabelPod { .. }))
            .count(),
        2
    );
}

#[test]
fn the_split_waits_until_the_stable_service_lists_every_ready_endpoint_of_the_target() {
    let mut w = gateway_world();
    w.pods = vec![
        target_pod("frontend-7d9f-a").stable().build(),
        target_pod("frontend-7d9f-b").stable().build(),
    ];
    w.backends = both_backends();
    // The endpoint-slice controller has listed one of the two pods for the stable Service.
    w.backend_endpoints = Some([
        BTreeSet::from(["frontend-7d9f-a".to_string()]),
        BTreeSet::new(),
    ]);
    let p = w.plan();
    assert_eq!(ready_reason(&p), "AddingBackends");
    let waiting = ready_message(&p);
    assert!(
        waiting.contains("must be an endpoint of rec-stable"),
        "{waiting}"
    );
    assert!(!has(&p, is_route_write));
    assert_eq!(p.requeue_after, None, "the EndpointSlice watch wakes it");

    // Both listed, by a slice written at 0 s (kept to the second): the split waits
    // propagationDelay from the next second, with the same status (no write between the waits).
    w.backend_endpoints = None;
    if let Some(b) = w.backends[0].as_mut() {
        b.endpoints_changed = Some(at(0));
    }
    w.canary.status = Some(p.status.clone());
    let p = w.plan();
    assert!(!p.transient_status, "a wait is worth its status write");
    assert_eq!(ready_reason(&p), "AddingBackends");
    assert_eq!(ready_message(&p), waiting);
    assert!(waiting.contains("propagationDelay (3s)"), "{waiting}");
    assert_eq!(p.requeue_after, Some(Duration::from_secs(4)));
    assert!(!has(&p, is_route_write));
    w.now = at(3);
    assert!(
        !has(&w.plan(), is_route_write),
        "before the second after the write"
    );

    // propagationDelay later: the route is split (at 0 % while the clone is created).
    w.canary.status = Some(p.status.clone());
    w.now = at(4);
    let p = w.plan();
    let ops = route_patch(&p, "frontend").expect("the user's route is split");
    let split = apply_ops(&w.http_routes[0], ops);
    assert_eq!(
        route_weights(&split),
        BTreeMap::from([(STABLE_SVC.to_string(), 1), (RECORDING_SVC.to_string(), 0)])
    );
    assert!(gateway::restore_note_of(&split).is_some());
    assert_eq!(
        split["spec"]["rules"][0]["timeouts"],
        json!({"request": "10s"})
    );
    assert!(created_clone(&p).is_some());
    assert_eq!(p.status.current_percent, 0);
    assert_eq!(p.status.http_routes, vec![format!("{NS}/frontend")]);
}

#[test]
fn the_clone_gets_weight_only_as_an_endpoint_of_the_recording_service() {
    let mut w = gw_serving_world(10);
    w.http_routes = vec![accepted(split_route(0))];
    w.canary = gw_canary()
        .status(gw_status(Phase::Progressing, "WaitingForClone", 0))
        .build();
    // Ready clone pods, endpoints of the Service but not yet of the recording Service.
    let stable_eps: BTreeSet<String> = ["frontend-7d9f-a", "frontend-7d9f-b"]
        .map(String::from)
        .into();
    w.backend_endpoints = Some([stable_eps.clone(), BTreeSet::new()]);
    let p = w.plan();
    assert_eq!(p.status.current_percent, 0);
    assert_eq!(ready_reason(&p), "WaitingForClone");
    assert!(!has(&p, is_route_write), "{:#?}", p.actions);
    // Now they are: 10 %.
    w.backend_endpoints = None;
    let p = w.plan();
    assert_eq!(p.status.current_percent, 10);
    let split = apply_ops(
        &w.http_routes[0],
        route_patch(&p, "frontend").expect("weights"),
    );
    assert_eq!(
        route_weights(&split),
        BTreeMap::from([(STABLE_SVC.to_string(), 9), (RECORDING_SVC.to_string(), 1)])
    );
    assert_eq!(event_reasons(&p), vec!["RoutesSplit", "TargetReached"]);
}

#[test]
fn without_a_user_route_the_canary_creates_its_own_catch_all_route() {
    let mut w = gateway_world();
    w.http_routes = vec![];
    w.pods = vec![
        target_pod("frontend-7d9f-a").stable().build(),
        target_pod("frontend-7d9f-b").stable().build(),
    ];
    w.backends = both_backends();
    w.canary = gw_canary().build();
    let p = w.plan();
    let created = p
        .actions
        .iter()
        .find_map(|a| match a {
            Action::CreateMesh {
                kind: MeshKind::HttpRoute,
                object,
            } => Some(object),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{:#?}", p.actions));
    assert_eq!(meta_name(created), "rec-recording");
    assert_eq!(
        created["spec"]["parentRefs"],
        json!([{"group": "", "kind": "Service", "name": "frontend"}])
    );
    assert_eq!(created["metadata"]["ownerReferences"][0]["uid"], CANARY_UID);
    assert_eq!(created["metadata"]["labels"][MANAGED_BY.0], MANAGED_BY.1);
    let ws = route_weights(created);
    assert!(ws.get(STABLE_SVC).is_some_and(|w| *w > 0), "{created:#}");
    assert_eq!(
        ws.get(RECORDING_SVC),
        Some(&0),
        "0 % while the clone is created"
    );
    assert_eq!(p.status.http_routes, vec![format!("{NS}/rec-recording")]);
}

#[test]
fn ready_at_the_weight_write_then_waiting_if_no_parent_accepts_within_propagation_delay() {
    // The plan that writes the weights: Ready (the parents have not seen them yet), and a look
    // again propagationDelay later.
    let mut w = gw_serving_world(10);
    w.http_routes = vec![accepted(split_route(0))];
    w.canary = gw_canary()
        .status(gw_status(Phase::Progressing, "WaitingForClone", 0))
        .build();
    let p = w.plan();
    assert!(route_patch(&p, "frontend").is_some());
    assert_eq!(ready_reason(&p), "TargetReached");
    assert_eq!(p.requeue_after, Some(Duration::from_secs(3)));
    // That Ready holds for the delay only: a report that waits for its turn longer is not written.
    assert_eq!(p.status_holds_until, Some(at(3)));
    // Its echo, within the delay, the route's status still of the generation before: the same.
    let mut w2 = gw_serving_world(10);
    w2.http_routes[0]["metadata"]["generation"] = json!(3);
    w2.started = at(-1);
    let p = w2.plan();
    assert_eq!(ready_reason(&p), "TargetReached");
    assert_eq!(p.requeue_after, Some(Duration::from_secs(2)));
    assert_eq!(p.status_holds_until, Some(at(2)));
    // Later, still not accepted: said so, and that holds as long as it is true.
    w2.started = at(-4);
    let p = w2.plan();
    assert_eq!(ready_reason(&p), "WaitingForRouteAccepted");
    assert_eq!(p.status_holds_until, None);
    // Accepted: Ready with no end.
    let mut w3 = gw_serving_world(10);
    w3.started = at(-1);
    let p = w3.plan();
    assert_eq!(ready_reason(&p), "TargetReached");
    assert_eq!(p.status_holds_until, None);
}

#[test]
fn ready_only_once_every_parent_accepted_the_current_rules() {
    // Split at the target, the route's status still for the generation before.
    let mut w = gw_serving_world(10);
    w.http_routes[0]["metadata"]["generation"] = json!(3);
    let p = w.plan();
    assert_eq!(ready_reason(&p), "WaitingForRouteAccepted");
    assert!(
        ready_message(&p).contains("shop/frontend"),
        "{}",
        ready_message(&p)
    );
    assert_eq!(p.status.current_percent, 10);
    // Accepted for the current generation: Ready.
    let w = gw_serving_world(10);
    let p = w.plan();
    assert_eq!(ready_reason(&p), "TargetReached");
    assert!(p.actions.is_empty(), "nothing to write: {:#?}", p.actions);
    // A parent refuses the current rules: Degraded, with its reason.
    let mut w = gw_serving_world(10);
    w.http_routes[0]["status"]["parents"][0]["conditions"][1] = json!({
        "type": "ResolvedRefs", "status": "False", "reason": "BackendNotFound", "observedGeneration": 2});
    let p = w.plan();
    assert_eq!(p.status.phase, Some(Phase::Degraded));
    assert_eq!(ready_reason(&p), "RouteRefused");
    assert!(
        ready_message(&p).contains("BackendNotFound"),
        "{}",
        ready_message(&p)
    );
}

#[test]
fn the_services_follow_the_services_ports_and_selector() {
    let mut w = gw_serving_world(10);
    w.service_ports =
        vec![json!({"name": "http", "port": 8080, "protocol": "TCP", "targetPort": 8080})];
    let p = w.plan();
    let patched: Vec<&str> = p
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::PatchService { name, ops } => {
                assert_eq!(ops[0]["op"], "test");
                Some(name.as_str())
            }
            _ => None,
        })
        .collect();
    assert_eq!(patched, vec![STABLE_SVC, RECORDING_SVC]);
}

// ---------------------------------------------------------------------------------------------
// Safety and the way out
// ---------------------------------------------------------------------------------------------

#[test]
fn a_crash_looping_clone_is_drained_in_the_route() {
    let mut w = gw_serving_world(10);
    w.pods.retain(|p| !pod_of_deployment(p, CLONE));
    w.pods.push(
        clone_pod("frontend-recording-5c4b-a")
            .crash_looping()
            .build(),
    );
    let p = w.plan();
    let drained = apply_ops(
        &w.http_routes[0],
        route_patch(&p, "frontend").expect("drain"),
    );
    assert_eq!(route_weights(&drained).get(RECORDING_SVC), Some(&0));
    assert_eq!(p.status.current_percent, 0);
    assert_eq!(ready_reason(&p), "CloneCrashLooping");
}

#[test]
fn rollback_restores_the_users_route_byte_exact_then_waits_then_deletes_the_services() {
    let mut w = gw_serving_world(10);
    w.canary = gw_canary()
        .deleting()
        .status(gw_status(Phase::Ready, "TargetReached", 10))
        .build();
    let p = w.plan();
    let restored = apply_ops(
        &w.http_routes[0],
        route_patch(&p, "frontend").expect("restore"),
    );
    let mut want = user_route();
    want["metadata"]["generation"] = json!(2);
    want["status"] = w.http_routes[0]["status"].clone();
    assert_eq!(restored, want, "the user's route as it was");
    assert!(!has(&p, |a| matches!(a, Action::DeleteService { .. })));
    assert_eq!(p.requeue_after, Some(Duration::from_secs(3)));

    // Restored (a new generation, not yet accepted); within propagationDelay nothing more.
    let mut restored = restored;
    restored["metadata"]["generation"] = json!(3);
    w.http_routes = vec![restored.clone()];
    w.canary.status = Some(p.status.clone());
    w.now = at(1);
    let p = w.plan();
    assert!(p.actions.is_empty(), "{:#?}", p.actions);
    // Its parent accepts the restored rules: the Services go at once, said so.
    let mut early = w.clone();
    early.http_routes = vec![accepted(restored)];
    let p = early.plan();
    assert!(
        has(&p, |a| matches!(a, Action::DeleteService { .. })),
        "{:#?}",
        p.actions
    );
    assert_eq!(
        p.status.last_propagation_wait,
        Some(PropagationWait::RoutesAccepted)
    );
    // Else after propagationDelay: the Services, the clone, the labels, the finalizer.
    w.now = at(3);
    let p = w.plan();
    assert_eq!(
        p.status.last_propagation_wait,
        Some(PropagationWait::PropagationDelay)
    );
    let deleted: Vec<&str> = p
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::DeleteService { name, .. } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(deleted, vec![STABLE_SVC, RECORDING_SVC]);
    assert!(has(&p, |a| matches!(a, Action::DeleteClone { .. })));
    assert_eq!(p.actions.last(), Some(&Action::RemoveFinalizer));
}

#[test]
fn rollback_deletes_the_canarys_own_route() {
    let mut w = gw_serving_world(10);
    let t = gateway::Target::new("frontend", NS, STABLE_SVC, RECORDING_SVC);
    let mut own = gateway::own_route(
        "rec-recording",
        CANARY,
        &t,
        80,
        &gateway::Shape::weights(10),
    )
    .unwrap();
    own["metadata"]["uid"] = json!("uid-own");
    own["metadata"]["resourceVersion"] = json!("5");
    w.http_routes = vec![owned(own)];
    w.canary = gw_canary().deleting().build();
    let p = w.plan();
    assert!(
        has(&p, |a| *a
            == Action::DeleteMesh {
                kind: MeshKind::HttpRoute,
                name: "rec-recording".into(),
                uid: "uid-own".into()
            }),
        "{:#?}",
        p.actions
    );
    assert!(!has(&p, |a| matches!(a, Action::DeleteService { .. })));
}

// ---------------------------------------------------------------------------------------------
// Round trip
// ---------------------------------------------------------------------------------------------

/// Weight to the recording Service, over every route.
fn recording_route_weight(routes: &[Value]) -> i64 {
    routes
        .iter()
        .map(|r| route_weights(r).get(RECORDING_SVC).copied().unwrap_or(0))
        .sum()
}

fn references_backends(routes: &[Value]) -> bool {
    routes.iter().any(|r| {
        let ws = route_weights(r);
        ws.contains_key(STABLE_SVC) || ws.contains_key(RECORDING_SVC)
    })
}

#[test]
fn a_simulated_gateway_api_canary_ramps_and_rolls_back_without_a_route_to_a_missing_backend() {
    let mut w = gateway_world().with_canary(gw_canary().percent(30).ramp(10, "10s"));
    w.target = Some(target(4));
    w.pods = (0..4)
        .map(|i| target_pod(&format!("frontend-7d9f-{}", pod_suffix(i))).build())
        .collect();
    let original = w.http_routes[0].clone();
    let mut sim = GatewaySim {
        w,
        services_since: None,
        routes_clear_since: Some(at(-100_000)),
        next: 0,
    };
    let mut t = 0;
    let mut reached = false;
    for _ in 0..200 {
        let p = sim.step(t);
        if p.status.current_percent == 30 && ready_reason(&p) == "TargetReached" {
            reached = true;
            break;
        }
        t += 1;
    }
    assert!(reached, "30 % reached and accepted");
    // Delete it: everything back, the user's route as it was.
    sim.w.canary.metadata.deletion_timestamp = Some(Time(at(t)));
    let mut gone = false;
    for _ in 0..50 {
        t += 1;
        let p = sim.step(t);
        if p.actions.last() == Some(&Action::RemoveFinalizer) {
            gone = true;
            break;
        }
    }
    assert!(gone, "rolled back");
    assert!(
        sim.w.backends.iter().all(Option::is_none),
        "Services deleted"
    );
    let mut want = original;
    let mut got = sim.w.http_routes[0].clone();
    for v in [&mut want, &mut got] {
        let m = v["metadata"].as_object_mut().unwrap();
        m.remove("resourceVersion");
        m.remove("generation");
        v.as_object_mut().unwrap().remove("status");
    }
    assert_eq!(got, want);
}

struct GatewaySim {
    w: World,
    /// When both Services last existed with the stable one complete.
    services_since: Option<Timestamp>,
    routes_clear_since: Option<Timestamp>,
    next: u32,
}

impl GatewaySim {
    fn step(&mut self, t: i64) -> Plan {
        self.w.now = at(t);
        let p = self.w.plan();
        for a in &p.actions {
            self.apply(a);
        }
        self.w.canary.status = Some(p.status.clone());
        self.cluster_reacts();
        p
    }

    fn apply(&mut self, a: &Action) {
        let now = self.w.now;
        let had_refs = references_backends(&self.w.http_routes);
        match a {
            Action::CreateService(o) => {
                self.next += 1;
                let i = usize::from(meta_name(o).ends_with("-recording"));
                self.w.backends[i] = Some(BackendService {
                    name: meta_name(o).into(),
                    uid: format!("uid-svc-{}", self.next),
                    resource_version: "1".into(),
                    controller_uid: Some(CANARY_UID.into()),
                    deleting: false,
                    selector: serde_json::from_value(o["spec"]["selector"].clone()).unwrap(),
                    ports: serde_json::from_value(o["spec"]["ports"].clone()).unwrap(),
                    endpoints: BTreeSet::new(),
                    endpoints_changed: Some(now),
                });
            }
            Action::DeleteService { name, .. } => {
                assert!(
                    !references_backends(&self.w.http_routes),
                    "Service {name} deleted while a route sends to it"
                );
                // After propagationDelay, or once the mesh accepted the restored rules.
                let clear = self.routes_clear_since.expect("routes cleared");
                let reported = self.w.http_routes.iter().all(|r| {
                    r["status"]["parents"][0]["conditions"][0]["observedGeneration"]
                        == r["metadata"]["generation"]
                });
                assert!(
                    reported || now >= after(clear, Duration::from_secs(3)),
                    "deleted too soon"
                );
                for b in self.w.backends.iter_mut() {
                    if b.as_ref().is_some_and(|b| b.name == *name) {
                        *b = None;
                    }
                }
            }
            Action::PatchMesh {
                kind: MeshKind::HttpRoute,
                name,
                ops,
            } => {
                let r = self
                    .w
                    .http_routes
                    .iter_mut()
                    .find(|r| meta_name(r) == name)
                    .expect("route");
                *r = apply_ops(r, ops);
                let g = r["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
                r["metadata"]["generation"] = json!(g);
            }
            Action::CreateClone(d) => {
                let mut d = d.as_ref().clone();
                d.metadata.uid = Some("uid-clone".into());
                d.metadata.resource_version = Some("1".into());
                self.w.clone = Some(d);
            }
            Action::ScaleClone { replicas, .. } => {
                self.w
                    .clone
                    .as_mut()
                    .unwrap()
                    .spec
                    .as_mut()
                    .unwrap()
                    .replicas = Some(*replicas);
            }
            Action::DeleteClone { .. } => self.w.clone = None,
            Action::LabelPod { name } | Action::UnlabelPod { name } => {
                let p = self
                    .w
                    .pods
                    .iter_mut()
                    .find(|p| p.metadata.name.as_deref() == Some(name))
                    .unwrap();
                let l = p.metadata.labels.get_or_insert_with(BTreeMap::new);
                if matches!(a, Action::LabelPod { .. }) {
                    l.insert(ROLE_LABEL.into(), ROLE_STABLE.into());
                } else {
                    l.remove(ROLE_LABEL);
                }
            }
            Action::AddFinalizer | Action::RemoveFinalizer | Action::RecordRampStep(_) => {}
            other => panic!("unexpected action {other:#?}"),
        }
        // Invariants after every write.
        let refs = references_backends(&self.w.http_routes);
        let complete = self.w.backends.iter().all(Option::is_some) && {
            let eps = self.w.backend_services();
            let stable = &eps[0].as_ref().unwrap().endpoints;
            self.w
                .pods
                .iter()
                .filter(|p| pod_of_deployment(p, TARGET) && p.serving())
                .all(|p| stable.contains(p.metadata.name.as_deref().unwrap()))
        };
        match (complete, self.services_since) {
            (true, None) => self.services_since = Some(now),
            (false, _) if !refs => self.services_since = None,
            _ => {}
        }
        if refs && !had_refs {
            let since = self
                .services_since
                .expect("the Services are complete before a route");
            assert!(
                now >= after(since, Duration::from_secs(3)),
                "a route before the delay"
            );
            self.routes_clear_since = None;
        }
        if !refs && had_refs {
            self.routes_clear_since = Some(now);
        }
        if recording_route_weight(&self.w.http_routes) > 0 {
            let eps = self.w.backend_services();
            let recording = &eps[1].as_ref().expect("recording Service").endpoints;
            assert!(
                !recording.is_empty(),
                "weight to a recording Service without endpoints"
            );
        }
    }

    /// The cluster: the clone's pods come up Ready; the mesh accepts every route's rules.
    fn cluster_reacts(&mut self) {
        self.w.clone_pods_come_up();
        self.w.http_routes = self.w.http_routes.drain(..).map(accepted).collect();
    }
}

#[test]
fn a_grpc_route_attached_to_the_service_blocks_with_its_own_reason() {
    let mut w = gateway_world();
    w.grpc_routes = vec![json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
        "metadata": {"name": "frontend-grpc", "namespace": NS},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "frontend"}],
                 "rules": [{"backendRefs": [{"name": "frontend", "port": 80}]}]},
    })];
    let p = w.plan();
    assert_blocked(&p, "OtherRouteKind");
    assert!(
        ready_message(&p).contains("GRPCRoute (frontend-grpc)"),
        "{}",
        ready_message(&p)
    );
    assert!(created_services(&p).is_empty() && !has(&p, is_route_write));
    // One for another Service changes nothing.
    w.grpc_routes[0]["spec"]["parentRefs"][0]["name"] = json!("checkout");
    assert_ne!(ready_reason(&w.plan()), "OtherRouteKind");
}

#[test]
fn a_session_key_outside_istio_blocks_before_any_write_and_ambient_mode_counts_as_istio() {
    let mut w = gateway_world();
    w.canary = gw_canary()
        .spec("sessionKey", json!({"header": "x-session"}))
        .build();
    for p in &mut w.pods {
        p.metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .remove("security.istio.io/tlsMode");
    }
    let p = w.plan();
    assert_blocked(&p, "UnsupportedByRouter");
    assert!(
        ready_message(&p).contains("spec.sessionKey outside Istio"),
        "{}",
        ready_message(&p)
    );
    assert!(!has(&p, is_route_write) && !has(&p, |a| matches!(a, Action::CreateService(_))));
    // In ambient mode (with a waypoint) Istio applies the routes: no block.
    w.ambient = true;
    w.waypoint = Some("waypoint".into());
    let p = w.plan();
    assert_ne!(p.status.phase, Some(Phase::Blocked), "{:?}", p.status);
}

#[test]
fn a_session_key_becomes_never_and_always_rules_with_regular_expressions_in_the_route() {
    let mut w = gw_serving_world(10);
    w.canary = gw_canary()
        .spec("sessionKey", json!({"header": "x-session"}))
        .status(gw_status(Phase::Ready, "TargetReached", 10))
        .build();
    let p = w.plan();
    let split = apply_ops(
        &w.http_routes[0],
        route_patch(&p, "frontend").expect("a write"),
    );
    let names: Vec<&str> = split["spec"]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap_or("-"))
        .collect();
    assert_eq!(
        names,
        ["rcanary-never-0", "rcanary-always-0", "-"],
        "{split:#}"
    );
    let header = &split["spec"]["rules"][1]["matches"][0]["headers"][0];
    assert_eq!(header["name"], "x-session");
    assert_eq!(header["type"], "RegularExpression");
    let inside = regex::Regex::new(header["value"].as_str().unwrap()).unwrap();
    assert!(inside.is_match("trace-00") && !inside.is_match("trace-ff"));
}

#[test]
fn a_service_of_the_canarys_deleted_under_a_split_route_takes_the_route_back_first() {
    for gone in [0, 1] {
        let mut w = gw_serving_world(10);
        w.backends[gone] = None;
        let p = w.plan();
        assert_eq!(p.status.phase, Some(Phase::Degraded), "{gone}");
        assert_eq!(ready_reason(&p), "BackendServiceLost");
        assert!(!p.transient_status, "written, with its Event");
        assert!(
            event_reasons(&p).contains(&"BackendServiceLost"),
            "{:?}",
            p.events
        );
        let restore = pos(&p, is_route_write).expect("the route restored");
        let create = pos(&p, |a| matches!(a, Action::CreateService(_))).expect("recreated");
        assert!(
            restore < create,
            "the route goes back before the Service is recreated"
        );
        let restored = apply_ops(&w.http_routes[0], route_patch(&p, "frontend").unwrap());
        assert_eq!(restored["spec"], user_route()["spec"]);
        assert_eq!(p.status.current_percent, 0);
        // Back: the Service and its endpoints, then propagationDelay, then the split.
        w.http_routes = vec![accepted(restored)];
        w.canary.status = Some(p.status.clone());
        w.backends = both_backends();
        for b in w.backends.iter_mut().flatten() {
            b.endpoints_changed = Some(at(0));
        }
        let p = w.plan();
        assert_eq!(ready_reason(&p), "AddingBackends");
        assert!(!has(&p, is_route_write));
        w.canary.status = Some(p.status.clone());
        w.now = at(4);
        assert!(route_patch(&w.plan(), "frontend").is_some(), "split again");
    }
}
