//! Subsets, pod labels, and the user's VirtualService and DestinationRule: what is adopted, what is written, what blocks before any write.

use super::*;

// ---------------------------------------------------------------------------------------------
// 2. Subsets and pod labels
// ---------------------------------------------------------------------------------------------

#[test]
fn target_pods_are_labeled_stable_and_clone_pods_never() {
    let mut w = fresh_world();
    w.pods.push(clone_pod("frontend-recording-5c4b-a").build());
    // A clone pod whose role label was stripped is still not the target's.
    let mut stripped = clone_pod("frontend-recording-5c4b-b");
    stripped.v["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove(ROLE_LABEL);
    w.pods.push(stripped.build());
    let p = w.plan();
    let labeled: Vec<&str> = p
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::LabelPod { name } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(labeled, vec!["frontend-7d9f-a", "frontend-7d9f-b"]);
}

#[test]
fn pods_of_other_deployments_and_terminating_pods_are_not_labeled() {
    let mut w = fresh_world();
    w.pods = vec![
        target_pod("frontend-7d9f-a").build(),
        target_pod("frontend-7d9f-gone").terminating().build(),
        // Same selector labels, but owned by ReplicaSet frontend-admin-7d9f.
        pod_of("frontend-admin", "7d9f", "frontend-admin-7d9f-a").build(),
        // A pod without a controller owner.
        {
            let mut b = target_pod("bare");
            b.v["metadata"]
                .as_object_mut()
                .unwrap()
                .remove("ownerReferences");
            b.build()
        },
    ];
    let p = w.plan();
    let labeled: Vec<Action> = p
        .actions
        .iter()
        .filter(|a| matches!(a, Action::LabelPod { .. }))
        .cloned()
        .collect();
    assert_eq!(
        labeled,
        vec![Action::LabelPod {
            name: "frontend-7d9f-a".into()
        }]
    );
}

#[test]
fn already_labeled_target_pods_are_left_alone() {
    let p = subsets_world().plan();
    assert!(!has(&p, |a| matches!(a, Action::LabelPod { .. })));
}

#[test]
fn no_split_until_every_ready_target_pod_is_in_the_stable_subset() {
    let mut w = subsets_world();
    w.pods[1] = target_pod("frontend-7d9f-b").build();
    let p = w.plan();
    assert_eq!(
        p.actions,
        vec![Action::LabelPod {
            name: "frontend-7d9f-b".into()
        }]
    );
    assert_eq!(ready_reason(&p), "WaitingForStablePods");
    assert_eq!(p.status.current_percent, 0);
    // Once labeled, the split follows.
    w.pods[1] = target_pod("frontend-7d9f-b").stable().build();
    assert!(patch_of(&w.plan(), MeshKind::VirtualService, "frontend").is_some());
}

#[test]
fn unready_unlabeled_target_pods_do_not_hold_back_the_split() {
    let mut w = subsets_world();
    w.pods
        .push(target_pod("frontend-7d9f-c").not_ready().build());
    let p = w.plan();
    assert!(has(&p, |a| *a
        == Action::LabelPod {
            name: "frontend-7d9f-c".into()
        }));
    assert!(patch_of(&p, MeshKind::VirtualService, "frontend").is_some());
}

#[test]
fn no_split_while_the_target_has_no_ready_pod() {
    let mut w = subsets_world();
    w.pods = vec![target_pod("frontend-7d9f-a").stable().not_ready().build()];
    let p = w.plan();
    assert!(!has(&p, is_vs_write));
    assert!(created_clone(&p).is_none());
    assert_eq!(ready_reason(&p), "WaitingForStablePods");
}

#[test]
fn subsets_are_added_to_the_user_dr_selecting_exactly_the_role_labels() {
    let mut w = fresh_world();
    w.drs[0]["spec"]["subsets"] =
        json!([{"name": "v1", "labels": {"version": "v1"}, "futureField": 1}]);
    let p = w.plan();
    let ops = patch_of(&p, MeshKind::DestinationRule, "frontend").expect("DR patch");
    let after = apply_ops(&w.drs[0], ops);
    assert_eq!(
        after["spec"]["subsets"],
        json!([
            {"name": "v1", "labels": {"version": "v1"}, "futureField": 1},
            {"name": STABLE_SUBSET, "labels": {ROLE_LABEL: ROLE_STABLE}},
            {"name": RECORDING_SUBSET, "labels": {ROLE_LABEL: ROLE_RECORDING}},
        ])
    );
    assert_eq!(p.status.subsets_added_time, Some(rfc(at(0))));
    assert_eq!(p.status.destination_rule.as_deref(), Some("shop/frontend"));
}

// ---------------------------------------------------------------------------------------------
// 3. User VirtualService and DestinationRule
// ---------------------------------------------------------------------------------------------

pub(super) fn rich_user_vs() -> Value {
    vs(
        "frontend",
        json!({
            "hosts": ["frontend", "frontend.example.com"],
            "exportTo": ["."],
            "futureTopLevel": {"keep": [1, 2, 3]},
            "http": [
                {
                    "name": "beta-users",
                    "match": [{"headers": {"x-beta": {"exact": "1"}}, "uri": {"prefix": "/api"}}],
                    "route": [{
                        "destination": {"host": "frontend.shop.svc.cluster.local", "port": {"number": 8080}},
                        "headers": {"request": {"set": {"x-route": "beta"}}},
                    }],
                    "retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx"},
                    "timeout": "10s",
                    "futureRouteField": {"x": true},
                },
                {
                    "name": "shared",
                    "route": [
                        {"destination": {"host": "frontend"}, "weight": 80},
                        {"destination": {"host": "legacy"}, "weight": 20},
                    ],
                    "mirror": {"host": "audit"},
                },
                {
                    "name": "pinned",
                    "route": [{"destination": {"host": "frontend", "subset": "v1"}}],
                },
                {"name": "elsewhere", "route": [{"destination": {"host": "backend"}}]},
            ],
            "tcp": [{"route": [{"destination": {"host": "frontend", "port": {"number": 9000}}}]}],
        }),
    )
}

#[test]
fn only_the_split_changes_in_a_user_virtual_service() {
    let mut w = serving_world(10);
    let original = rich_user_vs();
    w.vss = vec![original.clone()];
    let p = w.plan();
    let ops = patch_of(&p, MeshKind::VirtualService, "frontend").expect("VS patch");
    assert_eq!(
        ops[0],
        json!({"op": "test", "path": "/metadata/resourceVersion", "value": "100"})
    );
    let after = apply_ops(&original, ops);

    let mut expected = original.clone();
    expected["spec"]["http"][0]["route"] = json!([
        {"destination": {"host": "frontend.shop.svc.cluster.local", "port": {"number": 8080}, "subset": STABLE_SUBSET},
         "headers": {"request": {"set": {"x-route": "beta"}}}, "weight": 90},
        {"destination": {"host": "frontend.shop.svc.cluster.local", "port": {"number": 8080}, "subset": RECORDING_SUBSET},
         "headers": {"request": {"set": {"x-route": "beta"}}}, "weight": 10},
    ]);
    expected["spec"]["http"][1]["route"] = json!([
        {"destination": {"host": "frontend", "subset": STABLE_SUBSET}, "weight": 72},
        {"destination": {"host": "frontend", "subset": RECORDING_SUBSET}, "weight": 8},
        {"destination": {"host": "legacy"}, "weight": 20},
    ]);
    // Only our restore annotation is added to the metadata.
    let note = after["metadata"]["annotations"][RESTORE_ANNOTATION].clone();
    assert!(note.is_string(), "{after:#?}");
    expected["metadata"]["annotations"] = json!({RESTORE_ANNOTATION: note});
    assert_eq!(after, expected);
}

#[test]
fn a_shared_route_is_split_in_proportion_and_keeps_its_sum() {
    let mut w = serving_world(10);
    w.vss = vec![vs(
        "frontend",
        json!({"hosts": ["frontend"], "http": [{"route": [
            {"destination": {"host": "frontend"}, "weight": 80},
            {"destination": {"host": "legacy"}, "weight": 20},
        ]}]}),
    )];
    let p = w.plan();
    let after = apply_ops(
        &w.vss[0],
        patch_of(&p, MeshKind::VirtualService, "frontend").unwrap(),
    );
    assert_eq!(weights(&after, 0), vec![72, 8, 20]);
    assert_eq!(weights(&after, 0).iter().sum::<i64>(), 100);
    assert_eq!(
        subsets_of_route(&after, 0),
        vec![
            Some(STABLE_SUBSET.into()),
            Some(RECORDING_SUBSET.into()),
            None
        ]
    );
    assert_eq!(
        after["spec"]["http"][0]["route"][2]["destination"]["host"],
        "legacy"
    );
}

pub(super) fn shared_route_vs(frontend: i64, legacy: i64) -> Value {
    vs(
        "frontend",
        json!({"hosts": ["frontend"], "http": [{"route": [
            {"destination": {"host": "frontend"}, "weight": frontend},
            {"destination": {"host": "legacy"}, "weight": legacy},
        ]}]}),
    )
}

#[test]
fn a_shared_route_at_an_ambiguous_percent_stays_put_and_ramps_exactly() {
    // 80 at 7% is 74/6, which reads back as 8%: the planner must not rewrite it every pass.
    let mut w = serving_world(7);
    w.vss = vec![shared_route_vs(80, 20)];
    let p = w.plan();
    let split = apply_ops(
        &w.vss[0],
        patch_of(&p, MeshKind::VirtualService, "frontend").unwrap(),
    );
    assert_eq!(weights(&split, 0), vec![74, 6, 20]);
    assert_eq!(p.status.current_percent, 7);
    w.vss = vec![split.clone()];
    w.canary.status = Some(p.status.clone());
    let p = w.plan();
    assert!(p.actions.is_empty(), "{:#?}", p.actions);
    assert!(p.events.is_empty(), "{:?}", p.events);
    assert_eq!(p.status.current_percent, 7);

    // A ramp of 7-point steps goes 7 -> 14, not 8 -> 15.
    let mut w = serving_world(14);
    w.vss = vec![split];
    w.canary = canary()
        .percent(14)
        .ramp(7, "30s")
        .status(RecordingCanaryStatus {
            last_step_time: Some(rfc(at(-30))),
            ..status(Phase::Progressing, "Ramping", 7)
        })
        .build();
    let p = w.plan();
    let after = apply_ops(
        &w.vss[0],
        patch_of(&p, MeshKind::VirtualService, "frontend").unwrap(),
    );
    assert_eq!(p.status.current_percent, 14);
    assert_eq!(weights(&after, 0), vec![69, 11, 20]);
    assert_eq!(p.status.phase, Some(Phase::Ready));
}

#[test]
fn the_user_dr_keeps_every_other_field_when_subsets_are_added() {
    let mut w = fresh_world();
    let mut original = user_dr();
    original["metadata"]["annotations"] = json!({"owner": "team-shop"});
    original["metadata"]["labels"] = json!({"app": "frontend"});
    original["spec"]["futureField"] = json!({"a": 1});
    original["spec"]["exportTo"] = json!(["*"]);
    w.drs = vec![original.clone()];
    let p = w.plan();
    let after = apply_ops(
        &original,
        patch_of(&p, MeshKind::DestinationRule, "frontend").unwrap(),
    );
    let mut expected = original.clone();
    expected["spec"]["subsets"] = json!(istio::our_subsets());
    expected["metadata"]["annotations"][RESTORE_ANNOTATION] =
        after["metadata"]["annotations"][RESTORE_ANNOTATION].clone();
    assert!(expected["metadata"]["annotations"][RESTORE_ANNOTATION].is_string());
    assert_eq!(after, expected);
}

#[test]
fn owned_dr_and_vs_are_created_when_none_exist() {
    let mut w = fresh_world();
    w.vss.clear();
    w.drs.clear();
    let p = w.plan();
    let dr = p
        .actions
        .iter()
        .find_map(|a| match a {
            Action::CreateMesh {
                kind: MeshKind::DestinationRule,
                object,
            } => Some(object.clone()),
            _ => None,
        })
        .expect("owned DR created");
    assert_eq!(dr["metadata"]["name"], format!("{CANARY}-recording"));
    assert_eq!(dr["metadata"]["namespace"], NS);
    assert_eq!(dr["metadata"]["ownerReferences"][0]["uid"], CANARY_UID);
    assert_eq!(dr["metadata"]["labels"][CANARY_LABEL], CANARY);
    assert_eq!(dr["spec"]["host"], FQDN);
    assert_eq!(dr["spec"]["subsets"], json!(istio::our_subsets()));
    assert!(dr["metadata"].get("annotations").is_none());
    assert!(
        !has(&p, is_vs_write),
        "no VS in the pass that adds the subsets"
    );

    // Later: the DR (ours) is there, long enough: the owned VS is created, already split.
    let mut w = subsets_world();
    w.vss.clear();
    let mut owned_dr = dr.clone();
    owned_dr["metadata"]["uid"] = json!("uid-owned-dr");
    owned_dr["metadata"]["resourceVersion"] = json!("7");
    w.drs = vec![owned_dr];
    let p = w.plan();
    assert!(!has(&p, is_dr_write));
    let vs_obj = p
        .actions
        .iter()
        .find_map(|a| match a {
            Action::CreateMesh {
                kind: MeshKind::VirtualService,
                object,
            } => Some(object.clone()),
            _ => None,
        })
        .expect("owned VS created");
    assert_eq!(vs_obj["metadata"]["ownerReferences"][0]["uid"], CANARY_UID);
    assert_eq!(vs_obj["spec"]["hosts"], json!([FQDN]));
    assert_eq!(weights(&vs_obj, 0), vec![100, 0]);
    assert!(vs_obj["metadata"].get("annotations").is_none());
    assert_eq!(
        p.status.virtual_services,
        vec![format!("{NS}/{CANARY}-recording")]
    );
    assert_eq!(
        p.status.destination_rule.as_deref(),
        Some("shop/rec-recording")
    );
}

#[test]
fn two_mesh_virtual_services_for_the_host_block_without_mesh_actions() {
    let mut w = fresh_world();
    let mut second = user_vs();
    second["metadata"]["name"] = json!("frontend-canary");
    second["spec"]["hosts"] = json!([FQDN]);
    w.vss.push(second);
    let p = w.plan();
    assert_blocked(&p, "AmbiguousVirtualService");
    assert_only_pod_labels(&p);
}

#[test]
fn a_gateway_only_virtual_service_does_not_make_the_mesh_choice_ambiguous() {
    let mut w = serving_world(10);
    let mut gw = user_vs();
    gw["metadata"]["name"] = json!("frontend-public");
    gw["spec"]["gateways"] = json!(["istio-system/public"]);
    gw["spec"]["hosts"] = json!(["shop.example.com"]);
    w.vss.push(gw);
    let p = w.plan();
    assert_eq!(p.status.phase, Some(Phase::Ready), "{p:#?}");
    // It is not split either, since spec.gateways does not name it.
    assert!(patch_of(&p, MeshKind::VirtualService, "frontend-public").is_none());
}

#[test]
fn a_gateway_virtual_service_named_in_the_spec_is_split_too() {
    let mut w = serving_world(10);
    w.canary = canary()
        .spec("gateways", json!(["istio-system/public"]))
        .status(status(Phase::Ready, "TargetReached", 10))
        .build();
    let mut gw = vs(
        "frontend-public",
        json!({"hosts": ["shop.example.com"], "gateways": ["istio-system/public"],
               "http": [{"route": [{"destination": {"host": FQDN, "port": {"number": 80}}}]}]}),
    );
    gw["metadata"]["annotations"] = json!({"owner": "edge"});
    w.vss.push(gw.clone());
    let p = w.plan();
    let after = apply_ops(
        &gw,
        patch_of(&p, MeshKind::VirtualService, "frontend-public").expect("gateway VS split"),
    );
    assert_eq!(weights(&after, 0), vec![90, 10]);
    assert_eq!(after["metadata"]["annotations"]["owner"], "edge");
    assert!(
        p.status
            .virtual_services
            .contains(&"shop/frontend-public".to_string())
    );
}

#[test]
fn a_destination_rule_in_another_namespace_for_the_host_blocks() {
    let mut w = fresh_world();
    w.drs.push(dr_in(
        "payments",
        "frontend-tls",
        json!({"host": FQDN, "trafficPolicy": {}}),
    ));
    let p = w.plan();
    assert_blocked(&p, "ShadowingDestinationRule");
    assert_only_pod_labels(&p);
}

#[test]
fn a_destination_rule_in_the_istio_root_namespace_does_not_block() {
    let mut w = fresh_world();
    w.drs
        .push(dr_in("istio-system", "mesh-default", json!({"host": FQDN})));
    let p = w.plan();
    assert_ne!(p.status.phase, Some(Phase::Blocked), "{p:#?}");
    assert!(patch_of(&p, MeshKind::DestinationRule, "frontend").is_some());
}

/// No mesh write, no clone write: a configuration that would empty a subset is refused before
/// anything changes.
pub(super) fn assert_no_mesh_or_clone_write(p: &Plan) {
    assert!(
        p.actions
            .iter()
            .all(|a| matches!(a, Action::LabelPod { .. } | Action::AddFinalizer)),
        "{:#?}",
        p.actions
    );
}

#[test]
fn pod_labels_that_override_a_key_the_service_selects_on_block_before_any_write() {
    // The Service selects tier=web; podLabels would give the clone tier=recording: its pods
    // would never be endpoints, and the recording subset would have no upstream.
    let mut w = fresh_world().with_canary(canary().spec(
        "sidecar",
        json!({"podLabels": {"tier": "recording", "extra": "yes"}}),
    ));
    w.service_selector.insert("tier".into(), "web".into());
    let p = w.plan();
    assert_blocked(&p, "CloneNotSelectedByService");
    assert_no_mesh_or_clone_write(&p);
    assert!(
        p.status
            .conditions
            .iter()
            .any(|c| c.message.contains("tier=web"))
    );
    // A podLabels key the Service does not select on is fine.
    let mut w =
        fresh_world().with_canary(canary().spec("sidecar", json!({"podLabels": {"extra": "yes"}})));
    w.service_selector.insert("tier".into(), "web".into());
    assert_ne!(w.plan().status.phase, Some(Phase::Blocked));
}

#[test]
fn a_service_selecting_on_the_role_label_blocks_and_no_pod_is_labelled_or_unlabelled() {
    let mut w = fresh_world();
    w.service_selector
        .insert(ROLE_LABEL.into(), ROLE_STABLE.into());
    let p = w.plan();
    assert_blocked(&p, "ServiceSelectsRoleLabel");
    assert!(
        p.actions.iter().all(|a| matches!(a, Action::AddFinalizer)),
        "{:#?}",
        p.actions
    );
    // Rollback leaves the label alone too: removing it would take the pods out of the Service.
    let mut w = serving_world(10);
    w.service_selector
        .insert(ROLE_LABEL.into(), ROLE_STABLE.into());
    w.canary.metadata.deletion_timestamp = Some(Time(at(-10)));
    w.vss = vec![user_vs()];
    w.drs = vec![user_dr()];
    w.clone = None;
    let p = w.plan();
    assert!(
        !has(&p, |a| matches!(a, Action::UnlabelPod { .. })),
        "{:#?}",
        p.actions
    );
    assert!(has(&p, |a| matches!(a, Action::RemoveFinalizer)));
}

#[test]
fn a_target_whose_template_carries_the_role_label_blocks_and_its_pods_are_never_relabelled() {
    // Relabelling would take each pod out of its ReplicaSet's selector (an endless stream of
    // replacement pods), and rollback would orphan every target pod.
    let mut w = fresh_world();
    let mut t = target(4);
    if let Some(spec) = t.spec.as_mut() {
        spec.template
            .metadata
            .get_or_insert_with(Default::default)
            .labels
            .get_or_insert_with(Default::default)
            .insert(ROLE_LABEL.into(), "web".into());
    }
    w.target = Some(t.clone());
    w.pods = vec![target_pod("frontend-7d9f-a").role("web").build()];
    let p = w.plan();
    assert_blocked(&p, "TargetCarriesRoleLabel");
    assert!(
        p.actions.iter().all(|a| matches!(a, Action::AddFinalizer)),
        "{:#?}",
        p.actions
    );
    // Rollback: the label is the template's, never removed.
    let mut w = serving_world(10);
    w.target = Some(t);
    w.canary.metadata.deletion_timestamp = Some(Time(at(-10)));
    w.vss = vec![user_vs()];
    w.drs = vec![user_dr()];
    w.clone = None;
    let p = w.plan();
    assert!(
        !has(&p, |a| matches!(a, Action::UnlabelPod { .. })),
        "{:#?}",
        p.actions
    );
}

#[test]
fn a_target_that_needs_privileges_blocks_before_a_clone_is_created() {
    for (what, spec) in [
        (
            "hostNetwork",
            json!({"hostNetwork": true, "containers": [{"name": "app", "image": "a"}]}),
        ),
        (
            "hostPath volumes",
            json!({"volumes": [{"name": "v", "hostPath": {"path": "/"}}],
                                    "containers": [{"name": "app", "image": "a"}]}),
        ),
        (
            "a privileged container (app)",
            json!({"containers": [{"name": "app", "image": "a",
                                    "securityContext": {"privileged": true}}]}),
        ),
        (
            "added capabilities (init)",
            json!({"containers": [{"name": "app", "image": "a"}],
                                    "initContainers": [{"name": "init", "image": "a",
                                    "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}}]}),
        ),
    ] {
        let mut w = fresh_world();
        let mut t = target(4);
        if let Some(s) = t.spec.as_mut() {
            s.template.spec = Some(serde_json::from_value(spec).expect("pod spec"));
        }
        w.target = Some(t);
        let p = w.plan();
        assert_blocked(&p, "PrivilegedTarget");
        assert!(
            ready_message(&p).contains(what),
            "{what}: {}",
            ready_message(&p)
        );
        assert_no_mesh_or_clone_write(&p);
    }
}

#[test]
fn an_adopted_destination_rule_exported_more_narrowly_than_the_routes_blocks() {
    // Clients outside the namespace would see the split routes but not the subsets: 503 NC.
    let mut w = fresh_world();
    w.drs[0]["spec"]["exportTo"] = json!(["."]);
    let p = w.plan();
    assert_blocked(&p, "DestinationRuleNotExported");
    assert_no_mesh_or_clone_write(&p);
    // The VirtualService seen as narrowly (or more): fine.
    for vs_export in [json!(["."]), json!(["~"])] {
        let mut w = fresh_world();
        w.drs[0]["spec"]["exportTo"] = json!(["."]);
        w.vss[0]["spec"]["exportTo"] = vs_export.clone();
        let p = w.plan();
        assert_ne!(p.status.phase, Some(Phase::Blocked), "{vs_export}: {p:#?}");
    }
    // A DR exported to a list that holds every namespace of the VS's list: fine; one missing: not.
    let mut w = fresh_world();
    w.drs[0]["spec"]["exportTo"] = json!([".", "istio-system"]);
    w.vss[0]["spec"]["exportTo"] = json!(["istio-system", "shop"]);
    assert_ne!(w.plan().status.phase, Some(Phase::Blocked));
    w.vss[0]["spec"]["exportTo"] = json!(["istio-system", "shop", "edge"]);
    assert_blocked(&w.plan(), "DestinationRuleNotExported");
}

#[test]
fn a_root_namespace_destination_rule_for_the_host_blocks_when_gateways_are_listed() {
    // The ingress gateways run in the root namespace: its DestinationRule is theirs first.
    let mut w =
        fresh_world().with_canary(canary().spec("gateways", json!(["istio-system/public"])));
    w.vss.push(vs(
        "frontend-public",
        json!({"hosts": ["shop.example.com"], "gateways": ["istio-system/public"],
               "http": [{"route": [{"destination": {"host": FQDN}}]}]}),
    ));
    w.drs
        .push(dr_in("istio-system", "mesh-default", json!({"host": FQDN})));
    let p = w.plan();
    assert_blocked(&p, "RootDestinationRuleForGateways");
    assert_no_mesh_or_clone_write(&p);
}

#[test]
fn a_propagation_delay_of_zero_is_refused() {
    // It would turn make-before-break off: the routes would follow the subsets at once.
    for d in ["0s", "0ms", "0m0s"] {
        let w = fresh_world().with_canary(canary().delay(d));
        let p = w.plan();
        assert_blocked(&p, "InvalidSpec");
        assert!(ready_message(&p).contains("propagationDelay"), "{d}");
    }
}

#[test]
fn max_replicas_below_the_proportional_size_caps_the_weight_at_what_they_carry() {
    // 50 % of a 100-replica target on at most 2 replicas: 2 % is what they carry, not 50.
    let c = canary().percent(50).max_replicas(2).status(status(
        Phase::Progressing,
        "WaitingForClone",
        0,
    ));
    let mut w = waiting_for_clone_world().with_canary(c);
    w.target = Some(target(100));
    let p = w.plan();
    assert_eq!(vs_weight_after(&w, &p), Some(vec![98, 2]));
    assert_eq!(ready_reason(&p), "LimitedByMaxReplicas");
    assert_eq!(p.status.clone_replicas, 2);
    assert!(
        p.events
            .iter()
            .any(|e| e.warning && e.reason == "LimitedByMaxReplicas"),
        "{:?}",
        p.events
    );
    // A canary serving 50 % whose target grows past what maxReplicas carry is brought down.
    let mut w = serving_world(50).with_canary(canary().percent(50).max_replicas(2).status(status(
        Phase::Ready,
        "TargetReached",
        50,
    )));
    w.target = Some(target(100));
    let p = w.plan();
    assert_eq!(vs_weight_after(&w, &p), Some(vec![98, 2]));
}

#[test]
fn a_users_destination_rule_that_already_holds_our_subsets_is_never_written_nor_stripped() {
    // Committed to git with the subsets (so that a GitOps tool does not fight) and a policy on
    // one of them: the canary uses them as they are, and rollback leaves them.
    let mut d = user_dr();
    d["spec"]["subsets"] = json!([
        {"name": STABLE_SUBSET, "labels": {ROLE_LABEL: ROLE_STABLE},
         "trafficPolicy": {"outlierDetection": {"consecutive5xxErrors": 3}}},
        {"name": RECORDING_SUBSET, "labels": {ROLE_LABEL: ROLE_RECORDING}}
    ]);
    let mut w = subsets_world();
    w.drs = vec![d.clone()];
    let p = w.plan();
    assert!(!has(&p, is_dr_write), "{:#?}", p.actions);
    // Rollback of a split that used them: the routes go back, the DestinationRule stays.
    let mut w = serving_world(10);
    w.drs = vec![d];
    w.canary.metadata.deletion_timestamp = Some(Time(at(-10)));
    w.vss = vec![user_vs()];
    w.canary.status = Some(RecordingCanaryStatus {
        routes_removed_time: Some(rfc(at(-3600))),
        ..status(Phase::Terminating, "RolledBack", 0)
    });
    let p = w.plan();
    assert!(
        has(&p, |a| matches!(a, Action::RemoveFinalizer)),
        "{:#?}",
        p.actions
    );
    assert!(!has(&p, is_dr_write), "{:#?}", p.actions);
}

#[test]
fn only_the_missing_subset_is_added_and_only_it_is_removed_on_rollback() {
    let users = json!({"name": STABLE_SUBSET, "labels": {ROLE_LABEL: ROLE_STABLE},
                       "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"}}});
    let mut d = user_dr();
    d["spec"]["subsets"] = json!([users.clone()]);
    let mut w = fresh_world();
    w.drs = vec![d.clone()];
    let p = w.plan();
    let added = apply_ops(
        &d,
        patch_of(&p, MeshKind::DestinationRule, "frontend").expect("DR write"),
    );
    assert_eq!(
        added["spec"]["subsets"][0], users,
        "the user's subset untouched"
    );
    assert_eq!(added["spec"]["subsets"][1]["name"], RECORDING_SUBSET);
    let note = istio::parse_dr_restore_note(istio::restore_note_of(&added));
    assert_eq!(note.added, [RECORDING_SUBSET]);
    // Rollback takes out what was added, nothing else.
    let mut w = serving_world(10);
    w.drs = vec![added];
    w.canary.metadata.deletion_timestamp = Some(Time(at(-10)));
    w.vss = vec![user_vs()];
    w.canary.status = Some(RecordingCanaryStatus {
        routes_removed_time: Some(rfc(at(-3600))),
        ..status(Phase::Terminating, "RolledBack", 0)
    });
    let p = w.plan();
    let after = apply_ops(
        &w.drs[0],
        patch_of(&p, MeshKind::DestinationRule, "frontend").expect("DR restore"),
    );
    assert_eq!(after, d);
}

#[test]
fn our_own_destination_rule_carries_the_policy_of_the_wildcard_one_it_displaces() {
    // Without a DestinationRule for the host, the most specific wildcard one applies to it (its
    // namespace's before the root namespace's); the exact-host DR the canary creates would drop
    // its connection pools, outlier detection and mTLS for this host.
    let ns_policy = json!({"connectionPool": {"http": {"http1MaxPendingRequests": 7}},
                           "tls": {"mode": "ISTIO_MUTUAL"}});
    let mut w = fresh_world();
    w.drs = vec![
        dr_in(
            "istio-system",
            "mesh-wide",
            json!({"host": "*.local", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}}),
        ),
        dr_in(
            NS,
            "shop-wide",
            json!({"host": "*.shop.svc.cluster.local", "trafficPolicy": ns_policy}),
        ),
        dr_in(
            NS,
            "other-app",
            json!({"host": "*.cart.svc.cluster.local", "trafficPolicy": {"tls": {"mode": "DISABLE"}}}),
        ),
    ];
    let p = w.plan();
    let created = p
        .actions
        .iter()
        .find_map(|a| match a {
            Action::CreateMesh {
                kind: MeshKind::DestinationRule,
                object,
            } => Some(object.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{:#?}", p.actions));
    assert_eq!(created["spec"]["trafficPolicy"], ns_policy);
    assert!(
        event_reasons(&p).contains(&"TrafficPolicyCarried"),
        "{:?}",
        p.events
    );
    // The namespace's wildcard DR gone: the root namespace's applies, and ours follows it.
    let ours = owned(dr_in(
        NS,
        "rec-recording",
        json!({"host": FQDN, "subsets": istio::our_subsets(), "trafficPolicy": ns_policy}),
    ));
    let mut w = serving_world(10);
    w.drs = vec![
        ours.clone(),
        dr_in(
            "istio-system",
            "mesh-wide",
            json!({"host": "*.local", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}}),
        ),
    ];
    let p = w.plan();
    let after = apply_ops(
        &ours,
        patch_of(&p, MeshKind::DestinationRule, "rec-recording").expect("policy sync"),
    );
    assert_eq!(
        after["spec"]["trafficPolicy"],
        json!({"tls": {"mode": "ISTIO_MUTUAL"}})
    );
    assert_eq!(after["spec"]["subsets"], json!(istio::our_subsets()));
}

#[test]
fn a_wildcard_destination_rule_with_tls_other_than_istio_mutual_blocks_instead_of_being_carried() {
    let mut w = fresh_world();
    w.drs = vec![dr_in(
        NS,
        "shop-wide",
        json!({"host": "*.shop.svc.cluster.local",
        "trafficPolicy": {"portLevelSettings": [{"port": {"number": 80}, "tls": {"mode": "DISABLE"}}]}}),
    )];
    let p = w.plan();
    assert_blocked(&p, "WildcardDestinationRuleTls");
    assert_no_mesh_or_clone_write(&p);
    // A wildcard DR with a workloadSelector applies to some workloads only: not carried.
    let mut w = fresh_world();
    w.drs = vec![dr_in(
        NS,
        "shop-wide",
        json!({"host": "*.shop.svc.cluster.local",
        "workloadSelector": {"matchLabels": {"app": "x"}}, "trafficPolicy": {"tls": {"mode": "DISABLE"}}}),
    )];
    assert_ne!(w.plan().status.phase, Some(Phase::Blocked));
}

#[test]
fn a_virtual_service_named_in_the_spec_that_does_not_exist_blocks() {
    let w = fresh_world().with_canary(canary().spec("virtualService", json!("nope")));
    let p = w.plan();
    assert_blocked(&p, "VirtualServiceNotFound");
    assert_only_pod_labels(&p);
}

#[test]
fn a_virtual_service_split_by_another_canary_blocks() {
    let mut w = subsets_world();
    let mut other = split_vs(10);
    other["metadata"]["annotations"][RESTORE_ANNOTATION] =
        json!(json!({"canary": "other", "weights": [null]}).to_string());
    w.vss = vec![other];
    let p = w.plan();
    assert_blocked(&p, "Conflict");
    assert_only_pod_labels(&p);
}

#[test]
fn a_foreign_subset_with_our_name_blocks() {
    let mut w = fresh_world();
    w.drs[0]["spec"]["subsets"] = json!([{"name": STABLE_SUBSET, "labels": {"version": "v1"}}]);
    let p = w.plan();
    assert_blocked(&p, "SubsetNameTaken");
    assert!(!has(&p, is_mesh_write));
}

#[test]
fn a_virtual_service_without_a_route_to_the_service_blocks() {
    let mut w = fresh_world();
    w.vss[0]["spec"]["http"] = json!([{"route": [{"destination": {"host": "backend"}}]}]);
    let p = w.plan();
    assert_blocked(&p, "NoRouteToService");
    assert_only_pod_labels(&p);
}
