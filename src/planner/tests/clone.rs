//! The clone: its name, labels, selector, annotations, source hash, and how it follows the target.

use super::*;

// ---------------------------------------------------------------------------------------------
// 1. The clone
// ---------------------------------------------------------------------------------------------

#[test]
fn clone_is_named_after_the_target_and_its_pods_carry_the_recording_role() {
    let p = subsets_world().plan();
    let d = created_clone(&p).expect("clone created");
    assert_eq!(d.metadata.name.as_deref(), Some(CLONE));
    assert_eq!(d.metadata.namespace.as_deref(), Some(NS));
    assert_eq!(p.status.clone_name.as_deref(), Some(CLONE));
    let spec = d.spec.as_ref().unwrap();
    let labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    assert_eq!(
        labels.get(ROLE_LABEL).map(String::as_str),
        Some(ROLE_RECORDING)
    );
    // The target's own template labels and containers are kept.
    assert_eq!(labels.get("app").map(String::as_str), Some("frontend"));
    assert_eq!(labels.get("tier").map(String::as_str), Some("web"));
    let containers = &spec.template.spec.as_ref().unwrap().containers;
    assert_eq!(containers.len(), 1);
    assert_eq!(containers[0].image.as_deref(), Some("frontend:v1"));
}

#[test]
fn clone_selector_is_the_target_selector_plus_the_role_label() {
    let p = subsets_world().plan();
    let d = created_clone(&p).expect("clone created");
    let sel = d
        .spec
        .as_ref()
        .unwrap()
        .selector
        .match_labels
        .clone()
        .unwrap();
    assert_eq!(
        sel,
        BTreeMap::from([
            ("app".to_string(), "frontend".to_string()),
            (ROLE_LABEL.to_string(), ROLE_RECORDING.to_string()),
        ])
    );
}

#[test]
fn sidecar_annotations_go_on_the_clone_deployment_metadata_not_its_pods() {
    let w = subsets_world().with_canary(
        canary()
            .spec(
                "sidecar",
                json!({"annotations": {INJECT: "true", "sidecar.speedscale.com/tls-out": "true"}}),
            )
            .status(status(Phase::Progressing, "WaitingForStablePods", 0)),
    );
    let p = w.plan();
    let d = created_clone(&p).expect("clone created");
    let ann = d.metadata.annotations.as_ref().unwrap();
    assert_eq!(ann.get(INJECT).map(String::as_str), Some("true"));
    assert_eq!(
        ann.get("sidecar.speedscale.com/tls-out")
            .map(String::as_str),
        Some("true")
    );
    let pod_ann = d
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .clone()
        .unwrap_or_default();
    assert!(!pod_ann.contains_key(INJECT), "{pod_ann:?}");
    assert_eq!(pod_ann.get("team").map(String::as_str), Some("shop"));
}

#[test]
fn default_sidecar_annotation_asks_for_injection() {
    let p = subsets_world().plan();
    let d = created_clone(&p).expect("clone created");
    assert_eq!(
        d.metadata
            .annotations
            .as_ref()
            .unwrap()
            .get(INJECT)
            .map(String::as_str),
        Some("true")
    );
}

#[test]
fn clone_keeps_the_inject_annotation_when_users_add_other_sidecar_annotations() {
    let c = canary()
        .spec(
            "sidecar",
            json!({"annotations": {"sidecar.speedscale.com/capture-mode": "proxy"}}),
        )
        .build();
    let d = build_clone(&c, &target(4), 1);
    let ann = d.metadata.annotations.unwrap();
    assert_eq!(ann.get(INJECT).map(String::as_str), Some("true"));
    assert_eq!(
        ann.get("sidecar.speedscale.com/capture-mode")
            .map(String::as_str),
        Some("proxy")
    );
    // Set explicitly, it wins.
    let c = canary()
        .spec("sidecar", json!({"annotations": {INJECT: "false"}}))
        .build();
    let d = build_clone(&c, &target(4), 1);
    assert_eq!(
        d.metadata
            .annotations
            .unwrap()
            .get(INJECT)
            .map(String::as_str),
        Some("false")
    );
}

#[test]
fn clone_is_owned_by_the_canary_and_records_the_source_hash() {
    let w = subsets_world();
    let p = w.plan();
    let d = created_clone(&p).expect("clone created");
    let refs = d.metadata.owner_references.as_ref().unwrap();
    assert_eq!(refs.len(), 1);
    assert_eq!(refs[0].uid, CANARY_UID);
    assert_eq!(refs[0].kind, "RecordingCanary");
    assert_eq!(refs[0].name, CANARY);
    assert_eq!(refs[0].controller, Some(true));
    let labels = d.metadata.labels.as_ref().unwrap();
    assert_eq!(labels.get(CANARY_LABEL).map(String::as_str), Some(CANARY));
    assert_eq!(
        labels.get(MANAGED_BY.0).map(String::as_str),
        Some(MANAGED_BY.1)
    );
    let hash = d
        .metadata
        .annotations
        .as_ref()
        .unwrap()
        .get(SOURCE_HASH_ANNOTATION)
        .cloned();
    let want = source_hash(
        &w.target.as_ref().unwrap().spec.as_ref().unwrap().template,
        &w.canary,
    );
    assert_eq!(hash, Some(want.clone()));
    assert!(!want.is_empty());
    // A different template gives a different hash.
    let other = source_hash(
        &target_with(4, "frontend:v2").spec.unwrap().template,
        &w.canary,
    );
    assert_ne!(other, want);
}

#[test]
fn extra_pod_labels_and_annotations_go_on_the_clone_template_and_into_the_hash() {
    let c = canary()
        .spec(
            "sidecar",
            json!({"podLabels": {"recording": "yes"}, "podAnnotations": {"note": "rec"}}),
        )
        .build();
    let t = target(4);
    let d = build_clone(&c, &t, 2);
    let tm = d.spec.as_ref().unwrap().template.metadata.clone().unwrap();
    assert_eq!(
        tm.labels.unwrap().get("recording").map(String::as_str),
        Some("yes")
    );
    assert_eq!(
        tm.annotations.unwrap().get("note").map(String::as_str),
        Some("rec")
    );
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(2));
    let plain = canary().build();
    assert_ne!(
        source_hash(&t.spec.as_ref().unwrap().template, &c),
        source_hash(&t.spec.as_ref().unwrap().template, &plain)
    );
}

#[test]
fn target_template_change_replaces_the_clone_keeping_its_selector_and_foreign_metadata() {
    let mut w = serving_world(10);
    let cl = w.clone.as_mut().unwrap();
    cl.metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert("deployment.kubernetes.io/revision".into(), "4".into());
    // A selector the live clone was created with (immutable) that differs from today's build.
    cl.spec
        .as_mut()
        .unwrap()
        .selector
        .match_labels
        .as_mut()
        .unwrap()
        .insert("legacy".into(), "x".into());
    w.target = Some(target_with(4, "frontend:v2"));
    let p = w.plan();
    let replaced = replaced_clone(&p);
    assert!(!has(&p, |a| matches!(
        a,
        Action::ScaleClone { .. } | Action::CreateClone(_)
    )));
    assert_eq!(replaced.metadata.resource_version.as_deref(), Some("55"));
    let spec = replaced.spec.as_ref().unwrap();
    assert_eq!(
        spec.template.spec.as_ref().unwrap().containers[0]
            .image
            .as_deref(),
        Some("frontend:v2")
    );
    assert_eq!(
        spec.selector
            .match_labels
            .as_ref()
            .unwrap()
            .get("legacy")
            .map(String::as_str),
        Some("x"),
        "the live selector is kept"
    );
    let ann = replaced.metadata.annotations.as_ref().unwrap();
    assert_eq!(
        ann.get("deployment.kubernetes.io/revision")
            .map(String::as_str),
        Some("4")
    );
    let want = source_hash(
        &w.target.as_ref().unwrap().spec.as_ref().unwrap().template,
        &w.canary,
    );
    assert_eq!(ann.get(SOURCE_HASH_ANNOTATION), Some(&want));
    assert!(event_reasons(&p).contains(&"CloneSynced"));
    // Traffic is untouched by a template change.
    assert!(!has(&p, is_mesh_write));
}

#[test]
fn webhook_changes_to_the_live_clone_do_not_trigger_a_replace() {
    let mut w = serving_world(10);
    let cl = w.clone.as_mut().unwrap();
    let tspec = cl.spec.as_mut().unwrap().template.spec.as_mut().unwrap();
    tspec.containers.push(
        serde_json::from_value(json!({"name": "goproxy", "image": "speedscale/goproxy"})).unwrap(),
    );
    tspec.init_containers = Some(vec![
        serde_json::from_value(json!({"name": "init", "image": "speedscale/init"})).unwrap(),
    ]);
    cl.spec
        .as_mut()
        .unwrap()
        .template
        .metadata
        .as_mut()
        .unwrap()
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert("sidecar.speedscale.com/injected".into(), "true".into());
    let p = w.plan();
    assert!(p.actions.is_empty(), "{:#?}", p.actions);
}

#[test]
fn target_replica_change_only_scales_the_clone() {
    let mut w = serving_world(25);
    w.target = Some(target(12));
    let p = w.plan();
    assert_eq!(
        p.actions,
        vec![Action::ScaleClone {
            replicas: 3,
            from: Some(1)
        }]
    );
    assert!(event_reasons(&p).contains(&"CloneScaled"));
    assert_eq!(p.status.target_replicas, 12);
    assert_eq!(p.status.clone_replicas, 3);
}

#[test]
fn changed_sidecar_annotations_replace_the_clone() {
    let w = serving_world(10).with_canary(
        canary()
            .spec("sidecar", json!({"annotations": {INJECT: "true", "sidecar.speedscale.com/capture-mode": "proxy"}}))
            .status(status(Phase::Ready, "TargetReached", 10)),
    );
    let p = w.plan();
    let replaced = p.actions.iter().find_map(|a| match a {
        Action::ReplaceClone(d) => Some(d.as_ref()),
        _ => None,
    });
    let ann = replaced
        .expect("ReplaceClone")
        .metadata
        .annotations
        .clone()
        .unwrap();
    assert_eq!(
        ann.get("sidecar.speedscale.com/capture-mode")
            .map(String::as_str),
        Some("proxy")
    );
}

pub(super) const EBPF: &str = "capture.speedscale.com/enabled";

pub(super) fn clone_annotations_of(c: &RecordingCanary) -> BTreeMap<String, String> {
    build_clone(c, &target(4), 1)
        .metadata
        .annotations
        .unwrap_or_default()
}

#[test]
fn ebpf_capture_puts_the_collector_annotation_on_the_clone_and_never_the_inject_one() {
    let ann = clone_annotations_of(&canary().spec("capture", json!("EBPF")).build());
    assert_eq!(ann.get(EBPF).map(String::as_str), Some("true"));
    assert!(!ann.contains_key(INJECT), "{ann:?}");
    // The pods keep the documented role label, the one to target with eBPF capture.
    let c = canary().spec("capture", json!("EBPF")).build();
    let d = build_clone(&c, &target(4), 1);
    let pod_labels = d.spec.unwrap().template.metadata.unwrap().labels.unwrap();
    assert_eq!(
        pod_labels.get(ROLE_LABEL).map(String::as_str),
        Some(ROLE_RECORDING)
    );
}

#[test]
fn no_capture_puts_only_the_users_annotations_on_the_clone() {
    let ann = clone_annotations_of(
        &canary()
            .spec("capture", json!("None"))
            .spec(
                "sidecar",
                json!({"annotations": {"recorder.example.com/on": "yes"}}),
            )
            .build(),
    );
    assert!(
        !ann.contains_key(INJECT) && !ann.contains_key(EBPF),
        "{ann:?}"
    );
    assert_eq!(
        ann.get("recorder.example.com/on").map(String::as_str),
        Some("yes")
    );
}

#[test]
fn a_spec_that_would_put_both_capture_annotations_on_the_clone_is_invalid() {
    for (capture, annotations) in [
        ("Sidecar", json!({EBPF: "true"})),
        ("EBPF", json!({INJECT: "true"})),
        ("None", json!({INJECT: "true", EBPF: "true"})),
    ] {
        let c = canary()
            .spec("capture", json!(capture))
            .spec("sidecar", json!({ "annotations": annotations }))
            .build();
        let err = c.spec.validate().expect_err(capture);
        assert!(err.0.contains("spec.capture"), "{capture}: {err}");
    }
    // Turning the other one off explicitly is fine.
    for (capture, annotations) in [
        ("Sidecar", json!({EBPF: "false"})),
        ("EBPF", json!({INJECT: "false"})),
        ("Sidecar", json!({INJECT: "false", EBPF: "true"})),
    ] {
        let c = canary()
            .spec("capture", json!(capture))
            .spec("sidecar", json!({ "annotations": annotations }))
            .build();
        assert!(c.spec.validate().is_ok(), "{capture} {annotations}");
    }
}

#[test]
fn switching_a_live_clone_from_sidecar_to_ebpf_removes_the_inject_annotation() {
    // serving_world's clone was built for the default (Sidecar) capture, and carries what a
    // webhook added since.
    let mut w = serving_world(10).with_canary(
        canary()
            .spec("capture", json!("EBPF"))
            .status(status(Phase::Ready, "TargetReached", 10)),
    );
    if let Some(cl) = w.clone.as_mut() {
        cl.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert("webhook.example.com/seen".into(), "1".into());
    }
    let p = w.plan();
    let replaced = replaced_clone(&p);
    let ann = replaced.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(ann.get(EBPF).map(String::as_str), Some("true"));
    assert!(!ann.contains_key(INJECT), "{ann:?}");
    assert_eq!(
        ann.get("webhook.example.com/seen").map(String::as_str),
        Some("1"),
        "what others put on the clone stays"
    );
    // Once switched, nothing more to do.
    let mut w2 = w;
    w2.clone = Some(replaced.clone());
    let p2 = w2.plan();
    assert!(
        !p2.actions
            .iter()
            .any(|a| matches!(a, Action::ReplaceClone(_))),
        "{:#?}",
        p2.actions
    );
}

#[test]
fn the_target_deployment_is_never_written() {
    let mut w = serving_world(10);
    w.target = Some(target_with(9, "frontend:v3"));
    for p in [fresh_world().plan(), subsets_world().plan(), w.plan()] {
        for a in &p.actions {
            match a {
                Action::CreateClone(d) | Action::ReplaceClone(d) => {
                    assert_eq!(d.metadata.name.as_deref(), Some(CLONE))
                }
                Action::LabelPod { name } | Action::UnlabelPod { name } => {
                    assert!(name.starts_with("frontend-7d9f-"), "{name}")
                }
                _ => {}
            }
        }
    }
}
