//! The spec's rules twice over: [`RecordingCanarySpec::validate`], and the CRD's CEL rules
//! evaluated offline by kube's CEL validator (kube-cel), as the apiserver would on `kubectl apply`.
//! The schema keywords (bounds, patterns) are the apiserver's to check: tests/e2e/validation.rs.

use std::time::Duration;

use kube::CustomResourceExt;
use kube::core::cel::{Validator, compile_schema};
use serde_json::{Value, json};

use super::*;

/// A spec that passes every rule, with `change`'s top-level fields replacing its own.
fn spec_json(change: Value) -> Value {
    let mut spec = json!({"targetRef": {"name": "frontend"}, "percent": 10});
    for (k, v) in change.as_object().expect("an object") {
        spec[k] = v.clone();
    }
    spec
}

fn spec(change: Value) -> RecordingCanarySpec {
    serde_json::from_value(spec_json(change)).expect("a RecordingCanarySpec")
}

/// The message of `validate`'s refusal.
fn refusal(change: Value) -> String {
    match spec(change.clone()).validate() {
        Ok(v) => panic!("{change} was accepted: {v:?}"),
        Err(InvalidSpec(m)) => m,
    }
}

// --- RecordingCanarySpec::validate ---

#[test]
fn a_minimal_spec_is_valid_with_the_defaults() {
    let v = spec(json!({})).validate().expect("valid");
    assert_eq!(v.percent, 10);
    assert_eq!(v.mode, Mode::Split);
    assert_eq!(v.propagation_delay, Duration::from_secs(3));
    assert_eq!(v.ramp, None);
    assert_eq!(v.max_replicas, None);
    assert!(v.always.is_empty() && v.never.is_empty());
}

#[test]
fn the_target_name_must_not_be_blank() {
    for name in ["", "  "] {
        let m = refusal(json!({"targetRef": {"name": name}}));
        assert_eq!(m, "spec.targetRef.name must not be empty");
    }
}

#[test]
fn percent_is_between_0_and_100() {
    for ok in [0, 100] {
        assert_eq!(spec(json!({"percent": ok})).validate().unwrap().percent, ok);
    }
    for bad in [-1, 101] {
        assert_eq!(
            refusal(json!({"percent": bad})),
            format!("spec.percent must be between 0 and 100, got {bad}")
        );
    }
}

#[test]
fn a_service_given_must_not_be_blank() {
    assert_eq!(
        refusal(json!({"service": " "})),
        "spec.service must not be empty"
    );
    let s = spec(json!({"service": "api"}));
    assert!(s.validate().is_ok());
    assert_eq!(s.service_name(), "api");
}

#[test]
fn the_propagation_delay_is_a_duration_longer_than_zero() {
    let m = refusal(json!({"propagationDelay": "x"}));
    assert!(
        m.starts_with("spec.propagationDelay: \"x\" is not a duration"),
        "{m}"
    );
    assert_eq!(refusal(json!({"propagationDelay": "0s"})), ZERO_DELAY);
    let v = spec(json!({"propagationDelay": "1m30s"}))
        .validate()
        .unwrap();
    assert_eq!(v.propagation_delay, Duration::from_secs(90));
}

#[test]
fn a_ramp_steps_1_to_100_points_at_an_interval_longer_than_zero() {
    for bad in [0, 101] {
        assert_eq!(
            refusal(json!({"ramp": {"stepPercent": bad, "interval": "30s"}})),
            format!("spec.ramp.stepPercent must be between 1 and 100, got {bad}")
        );
    }
    let m = refusal(json!({"ramp": {"stepPercent": 10, "interval": "soon"}}));
    assert!(m.starts_with("spec.ramp.interval: \"soon\""), "{m}");
    assert_eq!(
        refusal(json!({"ramp": {"stepPercent": 10, "interval": "0m"}})),
        "spec.ramp.interval must be longer than 0s"
    );
    let v = spec(json!({"ramp": {"stepPercent": 10, "interval": "2m"}}))
        .validate()
        .unwrap();
    assert_eq!(v.ramp, Some((10, Duration::from_secs(120))));
}

#[test]
fn mirror_needs_the_side_effects_acknowledged() {
    assert_eq!(refusal(json!({"mode": "Mirror"})), MIRROR_ACK);
    let v = spec(json!({"mode": "Mirror", "acknowledgeMirrorSideEffects": true}))
        .validate()
        .unwrap();
    assert_eq!(v.mode, Mode::Mirror);
}

#[test]
fn a_request_match_sets_a_condition_each_with_one_kind_of_match() {
    assert_eq!(
        refusal(json!({"always": [{"uri": {"prefix": "/a"}}, {}]})),
        "spec.always[1] must set at least one condition (headers, uri, method or queryParams): an empty match is every request"
    );
    assert_eq!(
        refusal(json!({"never": [{"uri": {"exact": "/a", "prefix": "/a"}}]})),
        "spec.never[0].uri must set exactly one of exact, prefix or regex"
    );
    assert_eq!(
        refusal(json!({"always": [{"headers": {"x-record": {}}}]})),
        "spec.always[0].headers.x-record must set exactly one of exact, prefix or regex"
    );
    assert_eq!(
        refusal(json!({"never": [{"queryParams": {"debug": {"exact": "1", "regex": "1"}}}]})),
        "spec.never[0].queryParams.debug must set exactly one of exact, prefix or regex"
    );
    assert_eq!(
        refusal(json!({"never": [{"method": {}}]})),
        "spec.never[0].method must set exactly one of exact, prefix or regex"
    );
    let v = spec(json!({
        "always": [{"headers": {"x-record": {"exact": "yes"}}, "method": {"exact": "GET"}}],
        "never": [{"uri": {"prefix": "/healthz"}}],
    }))
    .validate()
    .unwrap();
    assert_eq!(
        v.always,
        vec![json!({"headers": {"x-record": {"exact": "yes"}}, "method": {"exact": "GET"}})]
    );
    assert_eq!(v.never, vec![json!({"uri": {"prefix": "/healthz"}})]);
}

#[test]
fn the_clone_never_carries_both_capture_annotations() {
    let inject = json!({"sidecar.speedscale.com/inject": "true"});
    let ebpf = json!({"capture.speedscale.com/enabled": "true"});
    assert_eq!(
        refusal(json!({"capture": "EBPF", "sidecar": {"annotations": inject}})),
        BOTH_CAPTURES
    );
    // The default capture is the sidecar.
    assert_eq!(
        refusal(json!({"sidecar": {"annotations": ebpf}})),
        BOTH_CAPTURES
    );
    // The annotations win over `capture`: the sidecar turned off leaves eBPF alone.
    let one =
        json!({"sidecar.speedscale.com/inject": "false", "capture.speedscale.com/enabled": "true"});
    assert!(
        spec(json!({"sidecar": {"annotations": one}}))
            .validate()
            .is_ok()
    );
    assert!(spec(json!({"capture": "EBPF"})).validate().is_ok());
    assert!(
        spec(json!({"capture": "None", "sidecar": {"annotations": ebpf}}))
            .validate()
            .is_ok()
    );
}

#[test]
fn max_replicas_is_at_least_1() {
    assert_eq!(
        refusal(json!({"maxReplicas": 0})),
        "spec.maxReplicas must be at least 1, got 0"
    );
    let v = spec(json!({"maxReplicas": 1})).validate().unwrap();
    assert_eq!(v.max_replicas, Some(1));
}

#[test]
fn a_status_written_before_the_enums_reads_and_writes_back_the_same() {
    // A canary as an apiserver sent it, when phase, lastPropagationWait and stableLabelling were
    // free strings.
    let wire: Value =
        serde_json::from_str(include_str!("../../benches/fixtures/canary.json")).unwrap();
    let c: RecordingCanary = serde_json::from_value(wire.clone()).expect("it still reads");
    let status = c.status.as_ref().expect("a status");
    assert_eq!(status.phase, Some(Phase::Ready));
    assert_eq!(
        status.last_propagation_wait,
        Some(PropagationWait::PropagationDelay)
    );
    assert_eq!(status.stable_labelling, Some(StableLabelling::Controller));
    assert_eq!(serde_json::to_value(status).unwrap(), wire["status"]);
}

#[test]
fn the_crd_lists_the_values_of_the_status_enums() {
    let status = &schema()["properties"]["status"]["properties"];
    for (field, values) in [
        (
            "phase",
            json!([
                "Progressing",
                "Ready",
                "Degraded",
                "Blocked",
                "Terminating",
                "Completed"
            ]),
        ),
        (
            "lastPropagationWait",
            json!(["IstioReconciled", "PropagationDelay", "RoutesAccepted"]),
        ),
        ("stableLabelling", json!(["AdmissionPolicy", "Controller"])),
    ] {
        assert_eq!(status[field]["enum"], values, "{field}");
        assert_eq!(status[field]["nullable"], true, "{field}");
    }
}

// --- The CRD's CEL rules, offline ---

fn schema() -> Value {
    let crd = RecordingCanary::crd();
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("the CRD has a schema");
    serde_json::to_value(schema).expect("the schema as JSON")
}

fn object(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "recordingcanary.dev/v1alpha1",
        "kind": "RecordingCanary",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": spec,
    })
}

/// What the CEL rules say about creating `frontend` with the base spec and `change`, or about
/// updating it from `old` (both raw JSON, as `kubectl apply` sends them, defaults applied by the
/// validator as by the apiserver): `field: message` per failed rule.
fn cel(change: Value, old: Option<Value>) -> Vec<String> {
    let new = object("frontend", spec_json(change));
    let old = old.map(|o| object("frontend", spec_json(o)));
    match Validator::new().validate(&schema(), &new, old.as_ref()) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

#[track_caller]
fn refused_by_cel(change: Value, field: &str, message: &str) {
    let errors = cel(change.clone(), None);
    assert_eq!(
        errors,
        vec![format!("{field}: {message}")],
        "creating with {change}"
    );
}

#[test]
fn every_cel_rule_compiles() {
    let compiled = compile_schema(&schema());
    assert!(
        !compiled.has_errors(),
        "{:?}",
        compiled.compilation_errors()
    );
}

#[test]
fn cel_accepts_a_canary_built_from_the_types() {
    let mut c = RecordingCanary::new("frontend", spec(json!({})));
    c.spec.ramp = Some(Ramp {
        step_percent: 10,
        interval: "30s".into(),
    });
    c.spec.always = vec![RequestMatch {
        uri: Some(StringMatch {
            prefix: Some("/api".into()),
            ..Default::default()
        }),
        ..Default::default()
    }];
    kube::core::cel::validate_cel(&c).expect("the CEL rules accept it");
    let mut next = c.clone();
    next.spec.percent = 50;
    kube::core::cel::validate_cel_update(&next, &c).expect("percent may change");
}

#[test]
fn cel_refuses_a_name_too_long_for_a_label_value() {
    let errors = |name: &str| {
        let o = object(name, spec_json(json!({})));
        Validator::new().validate(&schema(), &o, None)
    };
    assert!(errors(&"c".repeat(63)).is_ok());
    let e = errors(&"c".repeat(64)).expect_err("64 characters");
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].message, NAME_TOO_LONG);
}

#[test]
fn cel_refuses_a_blank_target() {
    refused_by_cel(
        json!({"targetRef": {"name": " "}}),
        "spec",
        "spec.targetRef.name must not be empty",
    );
}

#[test]
fn cel_refuses_both_capture_annotations_as_validate_does() {
    let inject = json!({"sidecar.speedscale.com/inject": "true"});
    let ebpf = json!({"capture.speedscale.com/enabled": "true"});
    refused_by_cel(
        json!({"capture": "EBPF", "sidecar": {"annotations": inject}}),
        "spec",
        BOTH_CAPTURES,
    );
    refused_by_cel(
        json!({"sidecar": {"annotations": ebpf}}),
        "spec",
        BOTH_CAPTURES,
    );
    let one =
        json!({"sidecar.speedscale.com/inject": "false", "capture.speedscale.com/enabled": "true"});
    assert_eq!(
        cel(json!({"sidecar": {"annotations": one}}), None),
        Vec::<String>::new()
    );
    assert_eq!(
        cel(
            json!({"capture": "None", "sidecar": {"annotations": ebpf}}),
            None
        ),
        Vec::<String>::new()
    );
    assert_eq!(cel(json!({"capture": "EBPF"}), None), Vec::<String>::new());
}

#[test]
fn cel_refuses_mirror_without_the_acknowledgement() {
    refused_by_cel(json!({"mode": "Mirror"}), "spec", MIRROR_ACK);
    refused_by_cel(
        json!({"mode": "Mirror", "acknowledgeMirrorSideEffects": false}),
        "spec",
        MIRROR_ACK,
    );
    assert_eq!(
        cel(
            json!({"mode": "Mirror", "acknowledgeMirrorSideEffects": true}),
            None
        ),
        Vec::<String>::new()
    );
}

#[test]
fn cel_refuses_zero_durations() {
    for zero in ["0s", "00m", "0m 0s", " 0ms "] {
        refused_by_cel(
            json!({"propagationDelay": zero}),
            "spec.propagationDelay",
            ZERO_DELAY,
        );
        refused_by_cel(
            json!({"ramp": {"stepPercent": 10, "interval": zero}}),
            "spec.ramp.interval",
            "spec.ramp.interval must be longer than 0s",
        );
    }
    for some in ["1s", "10ms", "0m30s"] {
        assert_eq!(
            cel(
                json!({"propagationDelay": some, "ramp": {"stepPercent": 10, "interval": some}}),
                None
            ),
            Vec::<String>::new(),
            "{some}"
        );
    }
}

#[test]
fn cel_refuses_the_pod_labels_the_subsets_depend_on() {
    for label in [ROLE_LABEL, "pod-template-hash"] {
        refused_by_cel(
            json!({"sidecar": {"podLabels": {label: "x"}}}),
            "spec.sidecar.podLabels",
            RESERVED_POD_LABELS,
        );
    }
    assert_eq!(
        cel(
            json!({"sidecar": {"podLabels": {"team": "checkout"}}}),
            None
        ),
        Vec::<String>::new()
    );
}

#[test]
fn cel_refuses_an_empty_match_or_a_condition_of_two_kinds() {
    refused_by_cel(json!({"always": [{}]}), "spec.always[0]", EMPTY_MATCH);
    refused_by_cel(
        json!({"never": [{"uri": {"prefix": "/healthz"}}, {}]}),
        "spec.never[1]",
        EMPTY_MATCH,
    );
    refused_by_cel(
        json!({"never": [{"uri": {"exact": "/a", "prefix": "/a"}}]}),
        "spec.never[0].uri",
        NOT_ONE_KIND,
    );
    refused_by_cel(
        json!({"always": [{"method": {}}]}),
        "spec.always[0].method",
        NOT_ONE_KIND,
    );
    for map in ["headers", "queryParams"] {
        let errors = cel(
            json!({"always": [{map: {"k": {"regex": "a", "prefix": "a"}}}]}),
            None,
        );
        assert_eq!(errors.len(), 1, "{map}: {errors:?}");
        assert!(errors[0].ends_with(NOT_ONE_KIND), "{map}: {errors:?}");
        assert!(
            errors[0].starts_with(&format!("spec.always[0].{map}")),
            "{map}: {errors:?}"
        );
    }
    assert_eq!(
        cel(
            json!({"always": [{"headers": {"x-record": {"exact": "yes"}}, "queryParams": {"debug": {"regex": "1|true"}}}]}),
            None
        ),
        Vec::<String>::new()
    );
}

#[test]
fn cel_keeps_what_the_split_depends_on_immutable() {
    let immutable = |field: &str| {
        format!(
            "spec: {field} is immutable: delete this RecordingCanary (it rolls back) and create a new one"
        )
    };
    let cases = [
        (
            json!({}),
            json!({"targetRef": {"name": "backend"}}),
            "spec.targetRef",
        ),
        (json!({}), json!({"service": "api"}), "spec.service"),
        (json!({"service": "api"}), json!({}), "spec.service"),
        (
            json!({"service": "api"}),
            json!({"service": "web"}),
            "spec.service",
        ),
        (
            json!({}),
            json!({"virtualService": "routes"}),
            "spec.virtualService",
        ),
        (
            json!({"virtualService": "a"}),
            json!({"virtualService": "b"}),
            "spec.virtualService",
        ),
        (json!({"gateways": ["edge"]}), json!({}), "spec.gateways"),
        (
            json!({"gateways": ["edge"]}),
            json!({"gateways": ["edge", "mesh/internal"]}),
            "spec.gateways",
        ),
        (
            json!({}),
            json!({"destinationRule": "subsets"}),
            "spec.destinationRule",
        ),
        (
            json!({"destinationRule": "a"}),
            json!({}),
            "spec.destinationRule",
        ),
    ];
    for (old, new, field) in cases {
        assert_eq!(
            cel(new.clone(), Some(old.clone())),
            vec![immutable(field)],
            "{old} -> {new}"
        );
    }
    // What may change.
    let old = json!({"service": "api", "gateways": ["edge"], "virtualService": "routes", "destinationRule": "subsets"});
    let new = json!({"service": "api", "gateways": ["edge"], "virtualService": "routes", "destinationRule": "subsets",
        "percent": 50, "ramp": {"stepPercent": 10, "interval": "30s"}, "maxReplicas": 3});
    assert_eq!(cel(new, Some(old)), Vec::<String>::new());
}

#[test]
fn cel_refuses_a_zero_duration_and_a_session_key_of_none_or_two_kinds() {
    refused_by_cel(
        json!({"duration": "0m"}),
        "spec.duration",
        "spec.duration must be longer than 0s",
    );
    assert_eq!(cel(json!({"duration": "30m"}), None), Vec::<String>::new());
    let one = "spec.sessionKey must set exactly one of header, cookie or queryParam";
    refused_by_cel(json!({"sessionKey": {}}), "spec.sessionKey", one);
    refused_by_cel(
        json!({"sessionKey": {"header": "x-session", "cookie": "session"}}),
        "spec.sessionKey",
        one,
    );
    for ok in [
        json!({"header": "x-b3-traceid"}),
        json!({"cookie": "JSESSIONID", "alphabet": "Base64url"}),
        json!({"queryParam": "sid", "withoutKey": "Stable"}),
    ] {
        assert_eq!(
            cel(json!({"sessionKey": ok}), None),
            Vec::<String>::new(),
            "{ok}"
        );
    }
    // Names the proxies would refuse are refused at admission (the schema's patterns).
    let schema = schema();
    let header = &schema["properties"]["spec"]["properties"]["sessionKey"]["properties"]["header"];
    assert_eq!(
        header["pattern"], r"^[a-z0-9!#$%&'*+.^_`|~-]+$",
        "lower-case tokens only"
    );
}
