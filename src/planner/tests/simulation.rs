//! Over many inputs: split sums and exact restore for all weights, and a small simulated reconcile loop that applies the planned patches.

use super::*;

// ---------------------------------------------------------------------------------------------
// Property: split sums and exact restore over many weights and percents
// ---------------------------------------------------------------------------------------------

#[test]
fn split_weights_keep_route_sums_and_rollback_restores_exactly_for_all_weights() {
    for w_host in (1..=100).step_by(3).chain([1, 2, 99, 100]) {
        for p in (0..=100).step_by(1) {
            let route = if w_host == 100 {
                json!([{"destination": {"host": "frontend"}, "weight": 100}])
            } else {
                json!([
                    {"destination": {"host": "legacy"}, "weight": 100 - w_host},
                    {"destination": {"host": "frontend"}, "weight": w_host},
                ])
            };
            let original = vs(
                "frontend",
                json!({"hosts": ["frontend"], "http": [{"route": route}]}),
            );
            let mut w = serving_world(p);
            w.vss = vec![original.clone()];
            let plan1 = w.plan();
            let ops = patch_of(&plan1, MeshKind::VirtualService, "frontend")
                .unwrap_or_else(|| panic!("w={w_host} p={p}: {:#?}", plan1.actions));
            let split = apply_ops(&original, ops);
            let ws = weights(&split, 0);
            assert_eq!(ws.iter().sum::<i64>(), 100, "w={w_host} p={p} {ws:?}");
            let (s, r) = if w_host == 100 {
                (ws[0], ws[1])
            } else {
                (ws[1], ws[2])
            };
            assert_eq!(s + r, w_host, "w={w_host} p={p}");
            let exact = w_host as f64 * f64::from(p) / 100.0;
            assert!((r as f64 - exact).abs() <= 0.5, "w={w_host} p={p} r={r}");
            if w_host != 100 {
                assert_eq!(ws[0], 100 - w_host, "the other destination is untouched");
            }

            // Planning again on the split VS writes nothing more.
            let mut w2 = w.clone();
            w2.vss = vec![split.clone()];
            w2.canary.status = Some(plan1.status.clone());
            w2.now = at(1);
            let plan2 = w2.plan();
            assert!(
                !has(&plan2, is_vs_write),
                "w={w_host} p={p}: re-split {:#?}",
                plan2.actions
            );

            // Rollback puts the route back exactly.
            let mut w3 = deleting_world();
            w3.vss = vec![split];
            let plan3 = w3.plan();
            let restored = apply_ops(
                &w3.vss[0],
                patch_of(&plan3, MeshKind::VirtualService, "frontend").unwrap(),
            );
            assert_eq!(restored, original, "w={w_host} p={p}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Round trip: a small simulated reconcile loop
// ---------------------------------------------------------------------------------------------

pub(super) fn referenced_subsets(vss: &[Value]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for v in vss {
        for r in v["spec"]["http"].as_array().into_iter().flatten() {
            for d in r["route"].as_array().into_iter().flatten() {
                if let Some(s) = d["destination"]["subset"].as_str()
                    && (s == STABLE_SUBSET || s == RECORDING_SUBSET)
                {
                    out.insert(s.to_string());
                }
            }
        }
    }
    out
}

pub(super) fn dr_subsets(drs: &[Value]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for d in drs.iter().filter(|d| meta_ns(d) == NS) {
        for s in d["spec"]["subsets"].as_array().into_iter().flatten() {
            if let Some(n) = s["name"].as_str() {
                out.insert(n.to_string());
            }
        }
    }
    out
}

pub(super) fn recording_weight(vss: &[Value]) -> i64 {
    vss.iter()
        .flat_map(|v| v["spec"]["http"].as_array().cloned().unwrap_or_default())
        .flat_map(|r| r["route"].as_array().cloned().unwrap_or_default())
        .filter(|d| d["destination"]["subset"] == RECORDING_SUBSET)
        .map(|d| d["weight"].as_i64().unwrap_or(0))
        .sum()
}

pub(super) struct Sim {
    pub(super) w: World,
    delay: Duration,
    /// When the DR last got both subsets (None while it lacks them).
    subsets_since: Option<Timestamp>,
    /// When the VSs last stopped referencing the subsets.
    routes_clear_since: Option<Timestamp>,
    pub(super) gone: bool,
    next_uid: u32,
    pub(super) plans: Vec<(Timestamp, Plan)>,
}

impl Sim {
    pub(super) fn new(w: World) -> Self {
        let delay = w.canary.spec.validate().unwrap().propagation_delay;
        let subsets_since = (dr_subsets(&w.drs).len() == 2).then_some(at(-100_000));
        Sim {
            w,
            delay,
            subsets_since,
            routes_clear_since: Some(at(-100_000)),
            gone: false,
            next_uid: 0,
            plans: Vec::new(),
        }
    }

    fn bump_rv(obj: &mut Value) {
        let rv: u64 = obj["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        obj["metadata"]["resourceVersion"] = json!((rv + 1).to_string());
    }

    fn mesh_list(&mut self, kind: MeshKind) -> &mut Vec<Value> {
        match kind {
            MeshKind::VirtualService => &mut self.w.vss,
            MeshKind::DestinationRule => &mut self.w.drs,
            MeshKind::HttpRoute => &mut self.w.http_routes,
            MeshKind::GrpcRoute => &mut self.w.grpc_routes,
        }
    }

    fn apply(&mut self, a: &Action) {
        let refs_before = referenced_subsets(&self.w.vss);
        let had_subsets = dr_subsets(&self.w.drs).len() == 2;
        match a {
            Action::AddFinalizer => self
                .w
                .canary
                .metadata
                .finalizers
                .get_or_insert_with(Vec::new)
                .push(FINALIZER.into()),
            Action::RemoveFinalizer => self.gone = true,
            Action::RecordRampStep(t) => {
                let st = self.w.canary.status.get_or_insert_with(Default::default);
                {
                    st.last_step_time = Some(t.clone());
                }
            }
            Action::LabelPod { name } | Action::UnlabelPod { name } => {
                let label = matches!(a, Action::LabelPod { .. });
                let p = self
                    .w
                    .pods
                    .iter_mut()
                    .find(|p| p.metadata.name.as_deref() == Some(name))
                    .expect("pod");
                assert!(
                    pod_of_deployment(p, TARGET),
                    "only target pods get the stable label: {name}"
                );
                let labels = p.metadata.labels.get_or_insert_with(BTreeMap::new);
                if label {
                    labels.insert(ROLE_LABEL.into(), ROLE_STABLE.into());
                } else {
                    labels.remove(ROLE_LABEL);
                }
            }
            Action::CreateClone(d) => {
                assert!(self.w.clone.is_none());
                assert!(
                    !referenced_subsets(&self.w.vss).is_empty(),
                    "the clone is created only once the VS is split"
                );
                let mut d = d.as_ref().clone();
                d.metadata.uid = Some("uid-clone".into());
                d.metadata.resource_version = Some("1".into());
                self.w.clone = Some(d);
            }
            Action::ReplaceClone(d) => {
                let cl = self.w.clone.as_mut().expect("clone");
                assert_eq!(d.metadata.resource_version, cl.metadata.resource_version);
                let status = cl.status.clone();
                *cl = d.as_ref().clone();
                cl.status = status;
            }
            Action::ScaleClone { replicas, from } => {
                let cl = self.w.clone.as_mut().expect("clone");
                assert_eq!(*from, cl.spec.as_ref().and_then(|s| s.replicas));
                cl.spec.as_mut().unwrap().replicas = Some(*replicas);
            }
            Action::DeleteClone { uid } => {
                assert_eq!(
                    self.w.clone.as_ref().and_then(|c| c.metadata.uid.as_ref()),
                    Some(uid)
                );
                self.w.clone = None;
            }
            Action::CreateMesh { kind, object } => {
                self.next_uid += 1;
                let mut o = object.clone();
                o["metadata"]["uid"] = json!(format!("uid-created-{}", self.next_uid));
                o["metadata"]["resourceVersion"] = json!("1");
                let name = meta_name(&o).to_string();
                let list = self.mesh_list(*kind);
                assert!(
                    list.iter().all(|v| meta_name(v) != name),
                    "create of an existing {name}"
                );
                list.push(o);
            }
            Action::PatchMesh { kind, name, ops } => {
                assert_eq!(
                    ops[0]["op"], "test",
                    "every patch tests the resourceVersion first"
                );
                assert_eq!(ops[0]["path"], "/metadata/resourceVersion");
                let list = self.mesh_list(*kind);
                let obj = list
                    .iter_mut()
                    .find(|v| meta_name(v) == name && meta_ns(v) == NS)
                    .expect("patched object exists");
                *obj = apply_ops(obj, ops);
                Self::bump_rv(obj);
            }
            Action::DeleteMesh { kind, name, uid } => {
                let list = self.mesh_list(*kind);
                let before = list.len();
                list.retain(|v| !(meta_name(v) == name && meta_uid(v) == uid));
                assert_eq!(
                    list.len() + 1,
                    before,
                    "delete of {name} with the right uid"
                );
            }
            Action::CreateService(o) => {
                self.next_uid += 1;
                let name = meta_name(o).to_string();
                let i = usize::from(name.ends_with("-recording"));
                assert!(self.w.backends[i].is_none(), "create of an existing {name}");
                self.w.backends[i] = Some(BackendService {
                    name,
                    uid: format!("uid-svc-{}", self.next_uid),
                    resource_version: "1".into(),
                    controller_uid: Some(CANARY_UID.into()),
                    deleting: false,
                    selector: serde_json::from_value(o["spec"]["selector"].clone()).unwrap(),
                    ports: serde_json::from_value(o["spec"]["ports"].clone()).unwrap(),
                    endpoints: BTreeSet::new(),
                    endpoints_changed: Some(self.w.now),
                });
            }
            Action::PatchService { name, ops } => {
                let b = self
                    .w
                    .backends
                    .iter_mut()
                    .flatten()
                    .find(|b| b.name == *name)
                    .expect("patched Service exists");
                assert_eq!(ops[0]["value"], json!(b.resource_version));
                for op in &ops[1..] {
                    match op["path"].as_str() {
                        Some("/spec/selector") => {
                            b.selector = serde_json::from_value(op["value"].clone()).unwrap()
                        }
                        Some("/spec/ports") => {
                            b.ports = serde_json::from_value(op["value"].clone()).unwrap()
                        }
                        other => panic!("unexpected Service patch path {other:?}"),
                    }
                }
            }
            Action::DeleteService { name, uid } => {
                let before = self.w.backends.iter().flatten().count();
                for b in self.w.backends.iter_mut() {
                    if b.as_ref().is_some_and(|b| b.name == *name && b.uid == *uid) {
                        *b = None;
                    }
                }
                assert_eq!(self.w.backends.iter().flatten().count() + 1, before);
            }
        }

        // Invariants after every single write.
        let now = self.w.now;
        let refs = referenced_subsets(&self.w.vss);
        let have = dr_subsets(&self.w.drs);
        assert!(
            refs.is_subset(&have),
            "a VS references {refs:?} but the DR has {have:?} after {a:#?}"
        );
        let has_subsets = have.len() == 2;
        if has_subsets && !had_subsets {
            self.subsets_since = Some(now);
        }
        if !has_subsets {
            if had_subsets {
                let clear = self
                    .routes_clear_since
                    .expect("routes cleared before subsets go");
                assert!(
                    now >= after(clear, self.delay),
                    "subsets removed {now} only since {clear}"
                );
            }
            self.subsets_since = None;
        }
        if is_vs_write(a) && !refs.is_empty() {
            let since = self.subsets_since.expect("subsets present");
            assert!(
                now >= after(since, self.delay),
                "VS uses subsets at {now}, added {since}"
            );
            self.routes_clear_since = None;
        }
        if is_vs_write(a) && refs.is_empty() && !refs_before.is_empty() {
            self.routes_clear_since = Some(now);
        }
        if recording_weight(&self.w.vss) > 0 {
            let ready = self
                .w
                .pods
                .iter()
                .filter(|p| pod_of_deployment(p, CLONE) && p.serving())
                .count();
            assert!(ready >= 1, "weight to a clone without a ready pod");
        }
    }

    /// The Deployment controller and kubelet: the clone's pods come up, ready.
    fn cluster_reacts(&mut self) {
        self.w.clone_pods_come_up();
    }

    fn step(&mut self) -> Plan {
        let p = self.w.plan();
        if let Some(i) = pos(&p, |a| *a == Action::RemoveFinalizer) {
            assert_eq!(i + 1, p.actions.len(), "RemoveFinalizer is last");
        }
        let prev_phase = self.w.canary.status.as_ref().and_then(|s| s.phase);
        let weight_before = recording_weight(&self.w.vss);
        for a in &p.actions {
            self.apply(a);
        }
        if prev_phase != p.status.phase && p.status.phase != Some(Phase::Terminating) {
            assert!(
                !p.events.is_empty(),
                "phase {prev_phase:?} -> {:?} without an event",
                p.status.phase
            );
        }
        if recording_weight(&self.w.vss) != weight_before && !self.gone {
            assert!(
                p.events
                    .iter()
                    .any(|e| ["RoutesSplit", "WeightChanged", "TrafficRestored"]
                        .contains(&e.reason.as_str())),
                "weight change without an event: {:?}",
                p.events
            );
        }
        if !self.gone {
            self.w.canary.status = Some(p.status.clone());
        }
        self.cluster_reacts();
        self.plans.push((self.w.now, p.clone()));
        p
    }

    /// Plans, applies, advances time, until nothing is left to do.
    pub(super) fn run(&mut self, max_steps: usize) {
        for _ in 0..max_steps {
            let p = self.step();
            if self.gone || (p.actions.is_empty() && p.requeue_after.is_none()) {
                return;
            }
            let d = p.requeue_after.unwrap_or(Duration::from_millis(200));
            self.w.now = after(self.w.now, d);
        }
        panic!(
            "not steady after {max_steps} steps: {:#?}",
            self.plans.last()
        );
    }
}

pub(super) fn strip_rv(mut v: Value) -> Value {
    v["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    v
}

#[test]
fn simulated_loop_converges_and_never_routes_to_missing_subsets() {
    let original_vs = rich_user_vs();
    let original_dr = user_dr();
    let mut w = fresh_world();
    w.canary = canary().without_finalizer().build();
    w.started = at(-1);
    w.vss = vec![original_vs.clone()];
    w.drs = vec![original_dr.clone()];
    let mut sim = Sim::new(w);
    sim.run(40);

    let v = sim.w.vs_named("frontend").clone();
    assert_eq!(weights(&v, 0), vec![90, 10]);
    assert_eq!(weights(&v, 1), vec![72, 8, 20]);
    assert_eq!(v["spec"]["http"][2], original_vs["spec"]["http"][2]);
    assert_eq!(v["spec"]["tcp"], original_vs["spec"]["tcp"]);
    let st = sim.w.canary.status.clone().unwrap();
    assert_eq!(st.phase, Some(Phase::Ready));
    assert_eq!(st.current_percent, 10);
    assert!(sim.w.canary.finalizers().contains(&FINALIZER.to_string()));
    assert_eq!(
        sim.w
            .clone
            .as_ref()
            .unwrap()
            .spec
            .as_ref()
            .unwrap()
            .replicas,
        Some(1)
    );
    for p in sim.w.pods.iter().filter(|p| pod_of_deployment(p, TARGET)) {
        assert_eq!(
            p.labels().get(ROLE_LABEL).map(String::as_str),
            Some(ROLE_STABLE)
        );
    }
    // The first VS write came a full propagation delay after the DR write.
    let dr_at = sim
        .plans
        .iter()
        .find(|(_, p)| has(p, is_dr_write))
        .unwrap()
        .0;
    let vs_at = sim
        .plans
        .iter()
        .find(|(_, p)| has(p, is_vs_write))
        .unwrap()
        .0;
    assert!(
        vs_at >= after(dr_at, Duration::from_secs(3)),
        "{dr_at} {vs_at}"
    );

    // HPA scales the target: only the clone follows.
    sim.w.target = Some(target(30));
    sim.w.now = after(sim.w.now, Duration::from_secs(60));
    let p = sim.step();
    assert!(!has(&p, is_mesh_write));
    assert_eq!(
        sim.w
            .clone
            .as_ref()
            .unwrap()
            .spec
            .as_ref()
            .unwrap()
            .replicas,
        Some(3)
    );

    // Deletion: everything goes back exactly.
    sim.w.canary.metadata.deletion_timestamp = Some(Time(sim.w.now));
    sim.w.now = after(sim.w.now, Duration::from_secs(1));
    sim.run(20);
    assert!(sim.gone);
    assert_eq!(
        strip_rv(sim.w.vs_named("frontend").clone()),
        strip_rv(original_vs)
    );
    assert_eq!(strip_rv(sim.w.drs[0].clone()), strip_rv(original_dr));
    assert!(sim.w.clone.is_none());
    for p in sim.w.pods.iter().filter(|p| pod_of_deployment(p, TARGET)) {
        assert!(!p.labels().contains_key(ROLE_LABEL));
    }
}

#[test]
fn simulated_loop_with_owned_objects_ramps_in_steps_and_rolls_back() {
    let mut w = fresh_world();
    w.canary = canary().percent(12).ramp(5, "10s").build();
    w.vss.clear();
    w.drs.clear();
    let mut sim = Sim::new(w);
    sim.run(40);
    let v = sim.w.vs_named(&format!("{CANARY}-recording")).clone();
    assert_eq!(weights(&v, 0), vec![88, 12]);
    assert_eq!(
        sim.w.canary.status.as_ref().unwrap().phase,
        Some(Phase::Ready)
    );

    // The weights the VS went through, and when.
    let mut seen: Vec<(Timestamp, i64)> = Vec::new();
    for (t, p) in &sim.plans {
        for a in &p.actions {
            let obj = match a {
                Action::CreateMesh {
                    kind: MeshKind::VirtualService,
                    object,
                } => Some(object.clone()),
                Action::PatchMesh {
                    kind: MeshKind::VirtualService,
                    ops,
                    ..
                } => ops
                    .iter()
                    .find(|o| o["path"] == "/spec/http")
                    .map(|o| json!({"spec": {"http": o["value"]}})),
                _ => None,
            };
            if let Some(o) = obj {
                seen.push((*t, recording_weight(&[o])));
            }
        }
    }
    let ws: Vec<i64> = seen.iter().map(|(_, w)| *w).collect();
    assert_eq!(ws, vec![0, 5, 10, 12], "{seen:?}");
    for pair in seen.windows(2).skip(1) {
        assert!(
            pair[1].0 >= after(pair[0].0, Duration::from_secs(10)),
            "{seen:?}"
        );
    }

    sim.w.canary.metadata.deletion_timestamp = Some(Time(sim.w.now));
    sim.run(20);
    assert!(sim.gone);
    assert!(sim.w.vss.is_empty() && sim.w.drs.is_empty());
    assert!(sim.w.clone.is_none());
}

#[test]
fn a_blocked_canary_keeps_new_target_pods_in_the_stable_subset() {
    // Split and serving, then a second mesh VirtualService appears (Blocked), and the target
    // rolls out: its new pods must still be labelled, or the stable subset would empty out.
    let mut w = serving_world(10);
    let mut second = user_vs();
    second["metadata"]["name"] = json!("frontend-copy");
    second["metadata"]["uid"] = json!("uid-vs-copy");
    w.vss.push(second);
    w.pods
        .push(pod_of(TARGET, "8e0a", "frontend-8e0a-new").build());
    let p = w.plan();
    assert_blocked(&p, "AmbiguousVirtualService");
    assert!(
        p.actions.contains(&Action::LabelPod {
            name: "frontend-8e0a-new".into()
        }),
        "{:#?}",
        p.actions
    );
    assert_only_pod_labels(&p);
}

#[test]
fn a_user_virtual_service_next_to_ours_is_ambiguous_not_a_silent_switch() {
    // Ours was created when none existed; then the user applied one for the same host.
    let mut w = serving_world(10);
    let mut ours = user_vs();
    ours["metadata"]["name"] = json!(CANARY);
    ours["metadata"]["uid"] = json!("uid-vs-ours");
    w.vss = vec![owned(ours), user_vs()];
    let p = w.plan();
    assert_blocked(&p, "AmbiguousVirtualService");
    assert_only_pod_labels(&p);
}

#[test]
fn a_clone_whose_rollout_stalled_is_reported_degraded_with_no_traffic() {
    let mut w = waiting_for_clone_world();
    w = w.clone_ready(0);
    if let Some(cl) = w.clone.as_mut()
        && let Some(st) = cl.status.as_mut()
    {
        st.conditions = Some(vec![
            serde_json::from_value(json!({
                "type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                "message": "ReplicaSet has timed out progressing."
            }))
            .expect("condition"),
        ]);
    }
    let p = w.plan();
    assert!(!has(&p, is_vs_write), "{:#?}", p.actions);
    assert_eq!(p.status.phase, Some(Phase::Degraded));
    assert_eq!(ready_reason(&p), "CloneStalled");
    assert!(
        p.events
            .iter()
            .any(|e| e.warning && e.reason == "CloneStalled")
    );
}

#[test]
fn the_weight_rises_only_as_far_as_the_clones_ready_replicas_carry_it() {
    // 10% of a 4-replica target, one clone replica Ready; the user asks for 100%.
    let mut w = serving_world(10).clone_ready(1);
    w.canary = canary()
        .percent(100)
        .status(status(Phase::Ready, "TargetReached", 10))
        .build();
    let p = w.plan();
    // One Ready replica carries ceil(4 × w / 100) <= 1, i.e. w <= 25.
    let after = apply_ops(
        &w.vss[0],
        patch_of(&p, MeshKind::VirtualService, "frontend").unwrap(),
    );
    assert_eq!(weights(&after, 0), vec![75, 25]);
    assert_eq!(p.status.phase, Some(Phase::Progressing));
    assert_eq!(ready_reason(&p), "WaitingForCloneCapacity");
    // The clone is asked for what 100% needs.
    assert!(
        p.actions
            .iter()
            .any(|a| matches!(a, Action::ScaleClone { replicas: 4, .. })),
        "{:#?}",
        p.actions
    );
    // Once the replicas are Ready, the weight follows.
    let w2 = serving_world(25).clone_ready(4);
    let mut w2 = w2;
    w2.canary = canary()
        .percent(100)
        .status(status(Phase::Progressing, "WaitingForCloneCapacity", 25))
        .build();
    let p2 = w2.plan();
    let after2 = apply_ops(
        &w2.vss[0],
        patch_of(&p2, MeshKind::VirtualService, "frontend").unwrap(),
    );
    assert_eq!(weights(&after2, 0), vec![0, 100]);
}

#[test]
fn capacity_never_lowers_a_weight_when_the_target_scales_up() {
    // The HPA takes the target from 4 to 40 replicas: the clone (1 Ready) is now small for
    // 10%, but the weight must not move; the clone grows instead.
    let mut w = serving_world(10).clone_ready(1);
    w.target = Some(target(40));
    let p = w.plan();
    assert!(!has(&p, is_vs_write), "{:#?}", p.actions);
    assert!(
        p.actions
            .iter()
            .any(|a| matches!(a, Action::ScaleClone { replicas: 4, .. })),
        "{:#?}",
        p.actions
    );
    assert_eq!(p.status.current_percent, 10);
}

#[test]
fn a_destination_rule_named_in_the_spec_for_another_host_blocks() {
    let mut w = fresh_world().with_canary(canary().spec("destinationRule", json!("other")));
    w.drs.push(dr_in(NS, "other", json!({"host": "other"})));
    let p = w.plan();
    assert_blocked(&p, "DestinationRuleHostMismatch");
    assert_only_pod_labels(&p);
}

#[test]
fn a_virtual_service_whose_routes_all_name_a_user_subset_blocks() {
    let mut w = fresh_world();
    w.vss = vec![vs(
        "frontend",
        json!({"hosts": ["frontend"], "http": [{"route": [{"destination": {"host": "frontend", "subset": "v1"}}]}]}),
    )];
    let p = w.plan();
    assert_blocked(&p, "NoSplittableRoute");
    assert_only_pod_labels(&p);
}

#[test]
fn a_mesh_virtual_service_for_the_host_in_another_namespace_blocks() {
    let mut w = fresh_world();
    w.vss = vec![mesh_obj(
        "VirtualService",
        "elsewhere",
        "frontend-routing",
        json!({"hosts": [FQDN], "http": [{"route": [{"destination": {"host": FQDN}}]}]}),
    )];
    let p = w.plan();
    assert_blocked(&p, "AmbiguousVirtualService");
    assert_only_pod_labels(&p);
}

#[test]
fn a_listed_gateway_without_a_route_to_the_service_blocks() {
    let w = fresh_world().with_canary(canary().spec("gateways", json!(["istio-system/typo-gw"])));
    let p = w.plan();
    assert_blocked(&p, "GatewayRouteNotFound");
    assert_only_pod_labels(&p);
}

#[test]
fn a_service_that_also_selects_another_workload_blocks() {
    let mut w = fresh_world();
    w.pods
        .push(pod_of("frontend-v2", "9a9a", "frontend-v2-9a9a-a").build());
    let p = w.plan();
    assert_blocked(&p, "ServiceSelectsOtherPods");
    assert_only_pod_labels(&p);
    // Pods the Service does not select do not matter.
    w.service_selector = BTreeMap::from([
        ("app".to_string(), "frontend".to_string()),
        ("tier".to_string(), "web".to_string()),
    ]);
    assert_ne!(w.plan().status.phase, Some(Phase::Blocked));
}

#[test]
fn a_ramp_step_is_recorded_before_the_weight_moves() {
    let w = ramp_world(10, Some(-30));
    let p = w.plan();
    let rec = pos(
        &p,
        |a| matches!(a, Action::RecordRampStep(t) if *t == rfc(at(0))),
    )
    .expect("the step time is recorded");
    let write = pos(&p, is_vs_write).expect("the weight moves");
    assert!(rec < write, "{:#?}", p.actions);
}
