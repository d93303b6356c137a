//! Admission: invalid specs are refused by `kubectl apply` with a message naming the field.

use serde_json::{Value, json};

use crate::support::*;

fn canary(spec: Value) -> Value {
    json!({
        "apiVersion": "recordingcanary.dev/v1alpha1",
        "kind": "RecordingCanary",
        "metadata": {"name": "frontend"},
        "spec": spec,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_are_rejected_with_a_readable_message() {
    let mut h = Harness::start("invalid").await;
    h.apply_example("app.yaml").await;

    // A valid spec is accepted, so that the refusals below are about the fields.
    let valid = canary(json!({
        "targetRef": {"name": "frontend"},
        "percent": 10,
        "ramp": {"stepPercent": 10, "interval": "10s"},
        "propagationDelay": "3s",
    }));
    let path = h.manifest("valid", &valid.to_string());
    h.k(&[
        "apply",
        "--dry-run=server",
        "-f",
        path.to_str().expect("path"),
    ])
    .await;

    let base = json!({"targetRef": {"name": "frontend"}, "percent": 10});
    let cases: Vec<(&str, Value, &str)> = vec![
        ("percent-150", json!({"percent": 150}), "spec.percent"),
        ("percent-minus-1", json!({"percent": -1}), "spec.percent"),
        (
            "empty-target",
            json!({"targetRef": {"name": ""}}),
            "spec.targetRef.name",
        ),
        (
            "step-0",
            json!({"ramp": {"stepPercent": 0, "interval": "10s"}}),
            "spec.ramp.stepPercent",
        ),
        (
            "interval-soon",
            json!({"ramp": {"stepPercent": 10, "interval": "soon"}}),
            "spec.ramp.interval",
        ),
        (
            "delay-x",
            json!({"propagationDelay": "x"}),
            "spec.propagationDelay",
        ),
        // Hostile input.
        ("percent-string", json!({"percent": "10"}), "spec.percent"),
        (
            "target-not-a-name",
            json!({"targetRef": {"name": "Frontend_V2"}}),
            "spec.targetRef.name",
        ),
        (
            "target-too-long-for-its-clone",
            json!({"targetRef": {"name": "a".repeat(250)}}),
            "spec.targetRef.name",
        ),
        (
            "service-not-a-name",
            json!({"service": "front.end"}),
            "spec.service",
        ),
        (
            "virtual-service-not-a-name",
            json!({"virtualService": "Routes!"}),
            "spec.virtualService",
        ),
        (
            "role-label-on-the-clone",
            json!({"sidecar": {"podLabels": {"recordingcanary.dev/role": "stable"}}}),
            "spec.sidecar.podLabels",
        ),
        (
            "label-value-not-a-label",
            json!({"sidecar": {"podLabels": {"team": "a b c"}}}),
            "spec.sidecar.podLabels",
        ),
        (
            "huge-annotation-map",
            json!({"sidecar": {"annotations": (0..100).map(|i| (format!("a{i}"), json!("x"))).collect::<serde_json::Map<_, _>>()}}),
            "spec.sidecar.annotations",
        ),
        (
            "huge-annotation-value",
            json!({"sidecar": {"podAnnotations": {"a": "x".repeat(5000)}}}),
            "spec.sidecar.podAnnotations",
        ),
        ("unknown-field", json!({"weight": 10}), "weight"),
        (
            "mirror-without-acknowledgement",
            json!({"mode": "Mirror"}),
            "acknowledgeMirrorSideEffects",
        ),
        (
            "always-with-an-empty-match",
            json!({"always": [{}]}),
            "spec.always",
        ),
        (
            "never-with-two-kinds-of-match",
            json!({"never": [{"uri": {"exact": "/a", "prefix": "/a"}}]}),
            "spec.never",
        ),
        (
            "capture-mode-unknown",
            json!({"capture": "Tcpdump"}),
            "spec.capture",
        ),
        (
            "both-capture-annotations",
            json!({"capture": "EBPF", "sidecar": {"annotations": {"sidecar.speedscale.com/inject": "true"}}}),
            "spec.capture",
        ),
        (
            "both-capture-annotations-by-default-mode",
            json!({"sidecar": {"annotations": {"capture.speedscale.com/enabled": "true"}}}),
            "spec.capture",
        ),
    ];
    let mut failures = Vec::new();
    for (name, change, field) in cases {
        let mut spec = base.clone();
        for (k, v) in change.as_object().expect("object") {
            spec[k] = v.clone();
        }
        let path = h.manifest(name, &canary(spec.clone()).to_string());
        let o = h
            .kubectl(&["apply", "-f", path.to_str().expect("path")])
            .await;
        eprintln!(
            "[e2e] {}: {name}: exit {:?}: {}",
            h.ns,
            o.code,
            o.stderr.trim()
        );
        if o.ok {
            failures.push(format!(
                "{name}: spec {spec} was accepted: {}",
                o.stdout.trim()
            ));
            // Do not let an accepted one hide the next case.
            h.kubectl(&["delete", "rcanary", "frontend", "--wait=false"])
                .await;
        } else if !o.stderr.contains(field) {
            failures.push(format!(
                "{name}: refused, but the message does not mention {field}: {}",
                o.stderr.trim()
            ));
        }
    }
    // A name that does not fit in a label value.
    let mut long = canary(base.clone());
    long["metadata"]["name"] = json!("c".repeat(64));
    let path = h.manifest("long-name", &long.to_string());
    let o = h
        .kubectl(&["apply", "-f", path.to_str().expect("path")])
        .await;
    if o.ok || !o.stderr.contains("at most 63 characters") {
        failures.push(format!(
            "long-name: a 64-character name must be refused with its reason: {o:?}"
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let left = h.k(&["get", "rcanary", "-o", "name"]).await;
    assert_eq!(left.trim(), "", "no RecordingCanary may exist");

    h.finish(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_in_a_namespace_without_sidecar_injection_says_so_once_and_still_works() {
    let mut h = Harness::start("noinject").await;
    // The namespace loses its injection label before the app's pods are created.
    let ns = h.ns.clone();
    h.k(&["label", "namespace", &ns, "istio-injection-"]).await;
    h.app_and_canary("canary.yaml").await;
    h.wait_ready("frontend").await;
    let c = h.wait_status("frontend", "Ready", 10).await;
    let cond = c["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "SidecarInjected")
        .cloned()
        .unwrap_or_else(|| panic!("no SidecarInjected condition: {}", c["status"]));
    assert_eq!(cond["status"], "False", "{cond}");
    assert_eq!(cond["reason"], "NoIstioSidecar", "{cond}");
    let events = h
        .k(&[
            "get",
            "events",
            "--field-selector",
            "involvedObject.kind=RecordingCanary,reason=NoIstioSidecar",
            "-o",
            // events.k8s.io: a repeated Event is one object with a `series`; none here.
            "jsonpath={range .items[*]}{.type}|{.series.count}|{.message}{\"\\n\"}{end}",
        ])
        .await;
    let lines: Vec<&str> = events.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one NoIstioSidecar Event: {events}");
    assert!(
        lines[0].starts_with("Warning||") && lines[0].contains("sidecar injection"),
        "{events}"
    );
    h.finish(true).await;
}
