//! The `RecordingCanary` custom resource: spec, status and the generated CRD.
//!
//! Admission rules that the type system cannot express (ranges, CEL rules) are added to the
//! generated schema in [`crd`], so that `kubectl apply` rejects bad specs with a readable message.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// API group of the custom resource.
pub const GROUP: &str = "recordingcanary.dev";
/// Finalizer that runs the rollback before a RecordingCanary goes away.
pub const FINALIZER: &str = "recordingcanary.dev/rollback";
/// Label put on the clone's pods (`recording`) and on the target's pods (`stable`).
pub const ROLE_LABEL: &str = "recordingcanary.dev/role";
/// Value of [`ROLE_LABEL`] on the target's pods.
pub const ROLE_STABLE: &str = "stable";
/// Value of [`ROLE_LABEL`] on the clone's pods.
pub const ROLE_RECORDING: &str = "recording";
/// Label on every object the controller creates, naming the canary that owns it.
pub const CANARY_LABEL: &str = "recordingcanary.dev/canary";
/// Annotation on the clone: hash of the target's pod template it was built from.
pub const SOURCE_HASH_ANNOTATION: &str = "recordingcanary.dev/source-hash";
/// Annotation on a user's VirtualService or DestinationRule: what to restore on rollback.
pub const RESTORE_ANNOTATION: &str = "recordingcanary.dev/restore";
/// DestinationRule subset for the target's pods.
pub const STABLE_SUBSET: &str = "rcanary-stable";
/// DestinationRule subset for the clone's pods.
pub const RECORDING_SUBSET: &str = "rcanary-recording";
/// Field manager used for every write.
pub const FIELD_MANAGER: &str = "recording-canary";

/// Sends a share of a Service's live requests, through Istio, to a recording clone of a Deployment.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "recordingcanary.dev",
    version = "v1alpha1",
    kind = "RecordingCanary",
    plural = "recordingcanaries",
    shortname = "rcanary",
    namespaced,
    status = "RecordingCanaryStatus",
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.targetRef.name"}"#,
    printcolumn = r#"{"name":"Percent","type":"integer","jsonPath":".spec.percent"}"#,
    printcolumn = r#"{"name":"Current","type":"integer","jsonPath":".status.currentPercent"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Stable-Labels","type":"string","priority":1,"jsonPath":".status.stableLabelling"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RecordingCanarySpec {
    /// The apps/v1 Deployment to clone, in the same namespace as the RecordingCanary.
    pub target_ref: TargetRef,
    /// The Service whose traffic is split. Defaults to the target's name. The split applies to mesh
    /// traffic for this Service's host and to the routes of the gateways listed in `gateways`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Gateways (`name` or `namespace/name`) whose VirtualService routes to the Service are split too.
    /// Mesh traffic is always split.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    /// Share of requests, 0 to 100, sent to the recording clone.
    pub percent: i32,
    /// Raise the weight step by step instead of moving straight to `percent`. Decreases apply at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ramp: Option<Ramp>,
    /// What the clone carries to get the recording sidecar injected.
    #[serde(default)]
    pub sidecar: Sidecar,
    /// Name of an existing VirtualService, in this namespace, to adopt. When unset, an existing mesh
    /// VirtualService for the Service's host is discovered, or one owned by this RecordingCanary is created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_service: Option<String>,
    /// Name of an existing DestinationRule, in this namespace, to adopt. When unset, an existing
    /// DestinationRule for the Service's host is discovered, or one owned by this RecordingCanary is created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_rule: Option<String>,
    /// Upper bound for the clone's replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_replicas: Option<i32>,
    /// Time left between dependent DestinationRule and VirtualService writes, so that every Envoy has
    /// the subsets before a route uses them (a duration such as `3s`).
    #[serde(default = "default_propagation_delay")]
    pub propagation_delay: String,
}

/// The Deployment to clone.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// Name of the apps/v1 Deployment, in the RecordingCanary's namespace.
    pub name: String,
}

/// Step-wise increase of the weight toward `percent`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Ramp {
    /// Percentage points added per step (1 to 100).
    pub step_percent: i32,
    /// Time between two steps, a duration such as `30s` or `2m`.
    pub interval: String,
}

/// Metadata given to the clone so that the recording sidecar is injected into it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Sidecar {
    /// Annotations on the clone Deployment's metadata, where the Speedscale operator reads them.
    /// `sidecar.speedscale.com/inject: "true"` is added unless set here (to `"false"`, say), so
    /// adding another Speedscale annotation keeps the sidecar injected.
    #[serde(default = "default_sidecar_annotations")]
    pub annotations: BTreeMap<String, String>,
    /// Extra labels for the clone's pod template.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_labels: BTreeMap<String, String>,
    /// Extra annotations for the clone's pod template.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,
}

impl Default for Sidecar {
    fn default() -> Self {
        Self {
            annotations: default_sidecar_annotations(),
            pod_labels: BTreeMap::new(),
            pod_annotations: BTreeMap::new(),
        }
    }
}

fn default_sidecar_annotations() -> BTreeMap<String, String> {
    BTreeMap::from([(
        "sidecar.speedscale.com/inject".to_string(),
        "true".to_string(),
    )])
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

fn default_propagation_delay() -> String {
    "3s".to_string()
}

/// Observed state, written by the controller only.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecordingCanaryStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Progressing, Ready, Degraded, Blocked or Terminating.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Share of requests that the VirtualService routes to the clone now, read back from it.
    #[serde(default)]
    pub current_percent: i32,
    /// Name of the clone Deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_name: Option<String>,
    /// Replicas the target Deployment asks for (what its HPA last set).
    #[serde(default)]
    pub target_replicas: i32,
    /// Replicas the clone Deployment asks for.
    #[serde(default)]
    pub clone_replicas: i32,
    /// Ready replicas of the clone.
    #[serde(default)]
    pub clone_ready_replicas: i32,
    /// The VirtualServices this canary splits (`namespace/name`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub virtual_services: Vec<String>,
    /// The DestinationRule holding the subsets (`namespace/name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_rule: Option<String>,
    /// When the weight last rose by a ramp step (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_step_time: Option<String>,
    /// When subsets were last added to the DestinationRule (RFC 3339). A route may use them
    /// only `propagationDelay` later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subsets_added_time: Option<String>,
    /// When the VirtualService last stopped routing to the subsets (RFC 3339). The subsets may
    /// leave the DestinationRule only `propagationDelay` later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes_removed_time: Option<String>,
    /// What ended the last wait before the split: `IstioReconciled` (Istio reported the
    /// DestinationRule holding the subsets `Reconciled` for its generation) or `PropagationDelay`
    /// (the delay ran out first, or Istio does not report). On rollback the `RolledBack` Event
    /// says what ended the wait before the subsets left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_propagation_wait: Option<String>,
    /// How many times in a row someone else put the VirtualService's routes back (a GitOps
    /// tool's self-heal, say) after this canary split them; 0 once a split stays.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revert_count: i32,
    /// When the last such revert was seen (RFC 3339). The split is re-applied after a delay that
    /// doubles with each revert in a row (at once, 2 s, 4 s, ... at most 5 min).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_revert_time: Option<String>,
    /// Who labels the target's new pods for the stable subset: `AdmissionPolicy` (the API server
    /// at admission, also while no controller runs) or `Controller` (this controller, while it runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_labelling: Option<String>,
    /// Ready, Progressing and Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

impl RecordingCanarySpec {
    /// The Service whose traffic is split.
    pub fn service_name(&self) -> &str {
        self.service.as_deref().unwrap_or(&self.target_ref.name)
    }

    /// Annotations for the clone Deployment: the default inject annotation plus `sidecar.annotations`.
    pub fn clone_annotations(&self) -> BTreeMap<String, String> {
        let mut a = default_sidecar_annotations();
        a.extend(self.sidecar.annotations.clone());
        a
    }

    /// Name of the clone Deployment.
    pub fn clone_name(&self) -> String {
        format!("{}-recording", self.target_ref.name)
    }
}

/// A spec that passed admission but still cannot be acted on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSpec(pub String);

/// The parts of the spec that need parsing, checked once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidSpec {
    pub percent: i32,
    pub ramp: Option<(i32, Duration)>,
    pub propagation_delay: Duration,
    pub max_replicas: Option<i32>,
}

impl RecordingCanarySpec {
    /// Checks what the schema cannot (older CRDs, or an apiserver without CEL) and parses durations.
    pub fn validate(&self) -> Result<ValidSpec, InvalidSpec> {
        if self.target_ref.name.trim().is_empty() {
            return Err(InvalidSpec("spec.targetRef.name must not be empty".into()));
        }
        if !(0..=100).contains(&self.percent) {
            return Err(InvalidSpec(format!(
                "spec.percent must be between 0 and 100, got {}",
                self.percent
            )));
        }
        if self.service_name().trim().is_empty() {
            return Err(InvalidSpec("spec.service must not be empty".into()));
        }
        let propagation_delay = parse_duration("spec.propagationDelay", &self.propagation_delay)?;
        let ramp = match &self.ramp {
            None => None,
            Some(r) => {
                if !(1..=100).contains(&r.step_percent) {
                    return Err(InvalidSpec(format!(
                        "spec.ramp.stepPercent must be between 1 and 100, got {}",
                        r.step_percent
                    )));
                }
                let interval = parse_duration("spec.ramp.interval", &r.interval)?;
                if interval.is_zero() {
                    return Err(InvalidSpec(
                        "spec.ramp.interval must be longer than 0s".into(),
                    ));
                }
                Some((r.step_percent, interval))
            }
        };
        if let Some(m) = self.max_replicas
            && m < 1
        {
            return Err(InvalidSpec(format!(
                "spec.maxReplicas must be at least 1, got {m}"
            )));
        }
        Ok(ValidSpec {
            percent: self.percent,
            ramp,
            propagation_delay,
            max_replicas: self.max_replicas,
        })
    }
}

fn parse_duration(field: &str, s: &str) -> Result<Duration, InvalidSpec> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        InvalidSpec(format!(
            "{field}: {s:?} is not a duration such as 30s or 2m: {e}"
        ))
    })
}

/// A CEL expression that accepts the durations `humantime` parses in practice: one or more
/// `<number><unit>` groups, e.g. `30s`, `1m30s`, `500ms`.
const DURATION_PATTERN: &str = r"^\s*([0-9]+\s*(ns|us|µs|ms|s|sec|secs|second|seconds|m|min|mins|minute|minutes|h|hr|hrs|hour|hours|d|day|days)\s*)+$";

/// A DNS-1123 subdomain: what Kubernetes object names must be.
const DNS_SUBDOMAIN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// A label value.
const LABEL_VALUE: &str = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$";

/// The CRD, with the admission rules the derive cannot express.
pub fn crd() -> CustomResourceDefinition {
    let mut crd = RecordingCanary::crd();
    for version in &mut crd.spec.versions {
        let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        else {
            continue;
        };
        let mut value = match serde_json::to_value(&*schema) {
            Ok(v) => v,
            Err(_) => continue,
        };
        harden_schema(&mut value);
        if let Ok(s) = serde_json::from_value(value) {
            *schema = s;
        }
    }
    crd
}

fn harden_schema(root: &mut Value) {
    if let Some(Value::Object(o)) = Some(&mut *root) {
        o.insert(
            "description".into(),
            json!("RecordingCanary sends `percent` of a Service's requests, through Istio, to a clone of a Deployment that carries a traffic-recording sidecar."),
        );
        // The name is a label value on everything the canary creates.
        o.insert(
            "x-kubernetes-validations".into(),
            json!([{"rule": "self.metadata.name.size() <= 63", "message": "a RecordingCanary's name must be at most 63 characters: it becomes the value of the label recordingcanary.dev/canary on the objects it creates"}]),
        );
    }
    let Some(spec) = root.pointer_mut("/properties/spec") else {
        return;
    };
    set(
        spec,
        "/properties/percent",
        json!({"minimum": 0, "maximum": 100}),
    );
    // The clone is named `<target>-recording`: both must be DNS subdomains.
    set(
        spec,
        "/properties/targetRef/properties/name",
        json!({"minLength": 1, "maxLength": 243, "pattern": DNS_SUBDOMAIN}),
    );
    set(
        spec,
        "/properties/service",
        json!({"minLength": 1, "maxLength": 63, "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$"}),
    );
    // What goes on the clone's metadata: bounded, and valid as label values where it becomes
    // labels (an invalid label key is refused when the clone is written: a WriteRefused Event).
    for field in ["annotations", "podAnnotations"] {
        set(
            spec,
            &format!("/properties/sidecar/properties/{field}"),
            json!({"maxProperties": 64}),
        );
        set(
            spec,
            &format!("/properties/sidecar/properties/{field}/additionalProperties"),
            json!({"maxLength": 4096}),
        );
    }
    set(
        spec,
        "/properties/sidecar/properties/podLabels",
        json!({"maxProperties": 32, "x-kubernetes-validations": [
            {"rule": "!('recordingcanary.dev/role' in self) && !('pod-template-hash' in self)", "message": "spec.sidecar.podLabels must not set recordingcanary.dev/role or pod-template-hash: the controller's subsets depend on them"}
        ]}),
    );
    set(
        spec,
        "/properties/sidecar/properties/podLabels/additionalProperties",
        json!({"maxLength": 63, "pattern": LABEL_VALUE}),
    );
    set(spec, "/properties/maxReplicas", json!({"minimum": 1}));
    // Bounds keep the CEL immutability rules within the apiserver's cost budget.
    set(spec, "/properties/gateways", json!({"maxItems": 32}));
    set(
        spec,
        "/properties/gateways/items",
        json!({"maxLength": 253}),
    );
    set(
        spec,
        "/properties/virtualService",
        json!({"maxLength": 253, "pattern": DNS_SUBDOMAIN}),
    );
    set(
        spec,
        "/properties/destinationRule",
        json!({"maxLength": 253, "pattern": DNS_SUBDOMAIN}),
    );
    set(
        spec,
        "/properties/propagationDelay",
        json!({"maxLength": 64}),
    );
    set(
        spec,
        "/properties/ramp/properties/interval",
        json!({"maxLength": 64}),
    );
    set(
        spec,
        "/properties/ramp/properties/stepPercent",
        json!({"minimum": 1, "maximum": 100}),
    );
    set(
        spec,
        "/properties/ramp/properties/interval",
        json!({"pattern": DURATION_PATTERN, "x-kubernetes-validations": [
            {"rule": "!self.matches('^\\\\s*(0+\\\\s*[a-zµ]+\\\\s*)+$')", "message": "spec.ramp.interval must be longer than 0s"}
        ]}),
    );
    set(
        spec,
        "/properties/propagationDelay",
        json!({"pattern": DURATION_PATTERN}),
    );
    set(
        spec,
        "",
        json!({"x-kubernetes-validations": [
            {"rule": "self.targetRef.name.trim() != ''", "message": "spec.targetRef.name must not be empty"},
            {"rule": "self.targetRef.name == oldSelf.targetRef.name", "message": "spec.targetRef is immutable: delete this RecordingCanary (it rolls back) and create a new one"},
            {"rule": "has(self.service) == has(oldSelf.service) && (!has(self.service) || self.service == oldSelf.service)", "message": "spec.service is immutable: delete this RecordingCanary (it rolls back) and create a new one"},
            {"rule": "has(self.virtualService) == has(oldSelf.virtualService) && (!has(self.virtualService) || self.virtualService == oldSelf.virtualService)", "message": "spec.virtualService is immutable: delete this RecordingCanary (it rolls back) and create a new one"},
            {"rule": "has(self.gateways) == has(oldSelf.gateways) && (!has(self.gateways) || self.gateways == oldSelf.gateways)", "message": "spec.gateways is immutable: delete this RecordingCanary (it rolls back) and create a new one"},
            {"rule": "has(self.destinationRule) == has(oldSelf.destinationRule) && (!has(self.destinationRule) || self.destinationRule == oldSelf.destinationRule)", "message": "spec.destinationRule is immutable: delete this RecordingCanary (it rolls back) and create a new one"}
        ]}),
    );
}

/// Merges `extra` into the object at `path` below `node`.
fn set(node: &mut Value, path: &str, extra: Value) {
    let Some(Value::Object(target)) = node.pointer_mut(path) else {
        return;
    };
    if let Value::Object(extra) = extra {
        for (k, v) in extra {
            target.insert(k, v);
        }
    }
}

/// The CRD as YAML, exactly what `recording-canary crd` prints and `crds/` holds.
pub fn crd_yaml() -> Result<String, serde_yaml_ng::Error> {
    serde_yaml_ng::to_string(&crd())
}
