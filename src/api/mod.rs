//! The `RecordingCanary` custom resource: spec, status and the generated CRD.
//!
//! Each admission rule sits on the field it checks: bounds and patterns as schemars attributes,
//! CEL rules (`x-kubernetes-validations`) as `#[x_kube(validation)]` on a field or a struct and
//! `#[kube(validation)]` on the resource, so that `kubectl apply` rejects a bad spec with a
//! readable message and a renamed field keeps its rules. [`RecordingCanarySpec::validate`] checks
//! the same rules again for an apiserver that does not run them.

pub mod labels;
pub mod session;
pub mod split;
pub mod status;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::core::{Message, Rule};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use self::status::{Phase, PropagationWait, StableLabelling};

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
/// Annotation on the clone that makes the Speedscale operator inject its sidecar (`Sidecar` capture).
pub const SIDECAR_INJECT_ANNOTATION: &str = "sidecar.speedscale.com/inject";
/// Annotation on the clone that makes Speedscale's eBPF collector capture it (`EBPF` capture).
pub const EBPF_CAPTURE_ANNOTATION: &str = "capture.speedscale.com/enabled";
/// Field manager used for every write.
pub const FIELD_MANAGER: &str = "recording-canary";

/// Sends a share of a Service's live requests, through Istio, to a recording clone of a Deployment.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    doc = "RecordingCanary sends `percent` of a Service's requests, through Istio, to a clone of a Deployment that carries a traffic-recording sidecar.",
    // The name is a label value on everything the canary creates.
    validation = Rule::new("self.metadata.name.size() <= 63").message(NAME_TOO_LONG),
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
    printcolumn = r#"{"name":"Time-Left","type":"string","jsonPath":".status.timeLeft"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Stable-Labels","type":"string","priority":1,"jsonPath":".status.stableLabelling"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","priority":1,"jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Capture","type":"string","priority":1,"jsonPath":".spec.capture"}"#,
    printcolumn = r#"{"name":"Router","type":"string","priority":1,"jsonPath":".status.router"}"#
)]
#[serde(rename_all = "camelCase")]
// Rules across fields, and the immutable fields: a rule on an optional field itself would not
// see the field come or go. The bounds on the fields keep these within the apiserver's CEL cost budget.
#[x_kube(
    validation = Rule::new("self.targetRef.name.trim() != ''").message("spec.targetRef.name must not be empty"),
    validation = Rule::new(BOTH_CAPTURES_RULE).message(BOTH_CAPTURES),
    validation = Rule::new("!has(self.mode) || self.mode != 'Mirror' || (has(self.acknowledgeMirrorSideEffects) && self.acknowledgeMirrorSideEffects)").message(MIRROR_ACK),
    validation = immutable("spec.targetRef", "self.targetRef.name == oldSelf.targetRef.name"),
    validation = immutable("spec.service", "has(self.service) == has(oldSelf.service) && (!has(self.service) || self.service == oldSelf.service)"),
    validation = immutable("spec.virtualService", "has(self.virtualService) == has(oldSelf.virtualService) && (!has(self.virtualService) || self.virtualService == oldSelf.virtualService)"),
    validation = immutable("spec.gateways", "has(self.gateways) == has(oldSelf.gateways) && (!has(self.gateways) || self.gateways == oldSelf.gateways)"),
    validation = immutable("spec.destinationRule", "has(self.destinationRule) == has(oldSelf.destinationRule) && (!has(self.destinationRule) || self.destinationRule == oldSelf.destinationRule)"),
    validation = immutable("spec.router", "(has(self.router) ? self.router : 'Auto') == (has(oldSelf.router) ? oldSelf.router : 'Auto')"),
)]
pub struct RecordingCanarySpec {
    /// The apps/v1 Deployment to clone, in the same namespace as the RecordingCanary.
    pub target_ref: TargetRef,
    /// The Service whose traffic is split. Defaults to the target's name. The split applies to mesh
    /// traffic for this Service's host and to the routes of the gateways listed in `gateways`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), pattern(SERVICE_NAME))]
    pub service: Option<String>,
    /// Gateways (`name` or `namespace/name`) whose VirtualService routes to the Service are split too.
    /// Mesh traffic is always split.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 253)))]
    pub gateways: Vec<String>,
    /// Share of requests, 0 to 100, sent to the recording clone (copied to it, in mode Mirror).
    #[schemars(range(min = 0, max = 100))]
    pub percent: i32,
    /// `Split` (the default): `percent` of the requests are served by the clone. `Mirror`: every
    /// response comes from the stable pods, and `percent` of the requests are copied to the clone
    /// (Istio's `mirrors`); needs `acknowledgeMirrorSideEffects: true`.
    #[serde(default)]
    pub mode: Mode,
    /// Mirrored requests are served twice: their writes downstream happen twice (the clone's
    /// answer is discarded, not its side effects). Required to be `true` for mode Mirror.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub acknowledge_mirror_side_effects: bool,
    /// Requests always sent to the recording clone (mirrored to it, in mode Mirror), whatever
    /// `percent` says: Istio `HTTPMatchRequest`s (headers, uri, method, queryParams), any of
    /// which matches. `percent: 0` with `always` records only these requests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub always: Vec<RequestMatch>,
    /// Requests never sent (nor mirrored) to the recording clone: health checks, admin calls,
    /// requests carrying data that must not be recorded. Wins over `always`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub never: Vec<RequestMatch>,
    /// Raise the weight step by step instead of moving straight to `percent`. Decreases apply at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ramp: Option<Ramp>,
    /// How the clone's traffic is captured: `Sidecar` (the default) puts
    /// `sidecar.speedscale.com/inject: "true"` on the clone, `EBPF` puts
    /// `capture.speedscale.com/enabled: "true"` (Speedscale's eBPF collector) and never the
    /// inject annotation, `None` puts neither (bring your own recorder through `sidecar`).
    #[serde(default)]
    pub capture: Capture,
    /// Extra metadata for the clone and its pods (a recorder's settings, say).
    #[serde(default)]
    pub sidecar: Sidecar,
    /// Name of an existing VirtualService, in this namespace, to adopt. When unset, an existing mesh
    /// VirtualService for the Service's host is discovered, or one owned by this RecordingCanary is created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253), pattern(DNS_SUBDOMAIN))]
    pub virtual_service: Option<String>,
    /// Name of an existing DestinationRule, in this namespace, to adopt. When unset, an existing
    /// DestinationRule for the Service's host is discovered, or one owned by this RecordingCanary is created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253), pattern(DNS_SUBDOMAIN))]
    pub destination_rule: Option<String>,
    /// Upper bound for the clone's replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_replicas: Option<i32>,
    /// How the traffic is split: `Auto` (the default) picks `GatewayAPI` when an HTTPRoute already
    /// has the Service as a parent or the Service's namespace is in Istio's ambient mode, else
    /// `Istio`; `Istio`: DestinationRule subsets and VirtualService weights; `GatewayAPI`:
    /// HTTPRoute weights between two Services the canary owns; `Replicas`: no mesh at all, the
    /// clone's pods join the Service's endpoints and the share is theirs (only when asked).
    /// Immutable; `status.router` says which one is in force.
    #[serde(default, skip_serializing_if = "RouterChoice::is_auto")]
    pub router: RouterChoice,
    /// How long to record (a duration such as `30m`), counted from when the clone first gets
    /// traffic. Then the routes are put back as on deletion, the clone is scaled to zero, and the
    /// canary stays as a record in phase `Completed`. Patching it extends or shortens a running
    /// recording. Unset: until the canary is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), pattern(DURATION_PATTERN))]
    #[x_kube(validation = Rule::new(NOT_ZERO_DURATION).message("spec.duration must be longer than 0s"))]
    pub duration: Option<String>,
    /// Whole sessions instead of scattered requests: requests carrying this key (a header, a
    /// cookie or a query parameter) go to the clone when the key's last characters fall in the
    /// canary's share of a fixed set of buckets, so every request of a chosen session is
    /// recorded and none of the others; ramping only adds sessions. `always`/`never` still apply
    /// (`never` wins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_key: Option<session::SessionKey>,
    /// Time left between dependent DestinationRule and VirtualService writes, so that every Envoy has
    /// the subsets before a route uses them (a duration such as `3s`).
    #[serde(default = "default_propagation_delay")]
    #[schemars(length(max = 64), pattern(DURATION_PATTERN))]
    #[x_kube(validation = Rule::new(NOT_ZERO_DURATION).message(ZERO_DELAY))]
    pub propagation_delay: String,
}

/// The Deployment to clone.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// Name of the apps/v1 Deployment, in the RecordingCanary's namespace.
    // The clone is named `<target>-recording`: both must be DNS subdomains.
    #[schemars(length(min = 1, max = 243), pattern(DNS_SUBDOMAIN))]
    pub name: String,
}

/// Step-wise increase of the weight toward `percent`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Ramp {
    /// Percentage points added per step (1 to 100).
    #[schemars(range(min = 1, max = 100))]
    pub step_percent: i32,
    /// Time between two steps, a duration such as `30s` or `2m`.
    #[schemars(length(max = 64), pattern(DURATION_PATTERN))]
    #[x_kube(validation = Rule::new(NOT_ZERO_DURATION).message("spec.ramp.interval must be longer than 0s"))]
    pub interval: String,
}

/// A kind of routing object the controller reads and writes: Istio's VirtualService and
/// DestinationRule, the Gateway API's HTTPRoute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MeshKind {
    VirtualService,
    DestinationRule,
    HttpRoute,
    /// Watched, never written: a GRPCRoute attached to a split Service blocks its canary.
    GrpcRoute,
}

impl MeshKind {
    /// The kind's name, as the API and the messages say it.
    pub fn name(self) -> &'static str {
        match self {
            MeshKind::VirtualService => "VirtualService",
            MeshKind::DestinationRule => "DestinationRule",
            MeshKind::HttpRoute => "HTTPRoute",
            MeshKind::GrpcRoute => "GRPCRoute",
        }
    }

    /// Its API resource: Istio's `networking.istio.io/v1` (served since Istio 1.22), the Gateway
    /// API's `gateway.networking.k8s.io/v1`.
    pub fn api_resource(self) -> kube::api::ApiResource {
        let (group, kind, plural) = match self {
            MeshKind::VirtualService => {
                ("networking.istio.io", "VirtualService", "virtualservices")
            }
            MeshKind::DestinationRule => {
                ("networking.istio.io", "DestinationRule", "destinationrules")
            }
            MeshKind::HttpRoute => ("gateway.networking.k8s.io", "HTTPRoute", "httproutes"),
            MeshKind::GrpcRoute => ("gateway.networking.k8s.io", "GRPCRoute", "grpcroutes"),
        };
        kube::api::ApiResource {
            group: group.into(),
            version: "v1".into(),
            api_version: format!("{group}/v1"),
            kind: kind.into(),
            plural: plural.into(),
        }
    }

    /// The RecordingCanary spec field that names one to adopt.
    pub fn spec_field(self) -> &'static str {
        match self {
            MeshKind::VirtualService => "virtualService",
            MeshKind::DestinationRule => "destinationRule",
            MeshKind::HttpRoute => "httpRoute",
            MeshKind::GrpcRoute => "grpcRoute",
        }
    }
}

/// Which router splits the traffic (`spec.router`).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RouterChoice {
    /// `GatewayAPI` when an HTTPRoute has the Service as a parent or the namespace is ambient, else `Istio`.
    #[default]
    Auto,
    /// DestinationRule subsets and VirtualService weights (Istio's sidecar mode).
    Istio,
    /// HTTPRoute backendRef weights between two Services the canary owns (Istio ambient with a
    /// waypoint, GAMMA meshes, Istio in sidecar mode with Gateway API routes).
    #[serde(rename = "GatewayAPI")]
    GatewayApi,
    /// No mesh: the clone's pods join the Service's endpoints; the share is theirs.
    Replicas,
}

impl RouterChoice {
    fn is_auto(&self) -> bool {
        *self == RouterChoice::Auto
    }
}

/// How the recording clone gets its requests.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Mode {
    /// A weighted split: the clone serves `percent` of the requests.
    #[default]
    Split,
    /// The stable pods serve every request; `percent` of them are copied to the clone.
    Mirror,
}

/// A request condition, shaped like Istio's `HTTPMatchRequest` (the parts a canary may use).
/// Every condition set must hold.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.headers) || has(self.uri) || has(self.method) || has(self.queryParams)").message(EMPTY_MATCH))]
pub struct RequestMatch {
    /// Request headers by lower-case name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 16))]
    pub headers: BTreeMap<String, StringMatch>,
    /// The request path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<StringMatch>,
    /// The HTTP method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<StringMatch>,
    /// Query parameters by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 16))]
    pub query_params: BTreeMap<String, StringMatch>,
}

/// One of `exact`, `prefix` or `regex` (RE2), as in Istio's `StringMatch`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("(has(self.exact) ? 1 : 0) + (has(self.prefix) ? 1 : 0) + (has(self.regex) ? 1 : 0) == 1").message(NOT_ONE_KIND))]
pub struct StringMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub regex: Option<String>,
}

impl StringMatch {
    /// How many of `exact`, `prefix` and `regex` are set (exactly one may be).
    fn kinds_set(&self) -> usize {
        [&self.exact, &self.prefix, &self.regex]
            .iter()
            .filter(|v| v.is_some())
            .count()
    }
}

impl RequestMatch {
    /// `Err` with what is wrong; `field` names the entry (`spec.always[0]`).
    fn check(&self, field: &str) -> Result<(), InvalidSpec> {
        let mut conditions = 0;
        let named = self
            .headers
            .iter()
            .map(|(k, m)| (format!("headers.{k}"), m))
            .chain(
                self.query_params
                    .iter()
                    .map(|(k, m)| (format!("queryParams.{k}"), m)),
            )
            .chain(self.uri.iter().map(|m| ("uri".to_string(), m)))
            .chain(self.method.iter().map(|m| ("method".to_string(), m)));
        for (name, m) in named {
            conditions += 1;
            if m.kinds_set() != 1 {
                return Err(InvalidSpec(format!(
                    "{field}.{name} must set exactly one of exact, prefix or regex"
                )));
            }
        }
        if conditions == 0 {
            return Err(InvalidSpec(format!(
                "{field} must set at least one condition (headers, uri, method or queryParams): an empty match is every request"
            )));
        }
        Ok(())
    }
}

/// How the clone's traffic is recorded.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Capture {
    /// The Speedscale sidecar: `sidecar.speedscale.com/inject: "true"` on the clone.
    #[default]
    Sidecar,
    /// Speedscale's eBPF collector: `capture.speedscale.com/enabled: "true"` on the clone.
    #[serde(rename = "EBPF")]
    Ebpf,
    /// No capture annotation: bring your own recorder through `sidecar.annotations`.
    None,
}

impl Capture {
    /// The annotation this mode puts on the clone, if any.
    pub fn annotation(self) -> Option<(&'static str, &'static str)> {
        match self {
            Capture::Sidecar => Some((SIDECAR_INJECT_ANNOTATION, "true")),
            Capture::Ebpf => Some((EBPF_CAPTURE_ANNOTATION, "true")),
            Capture::None => None,
        }
    }
}

/// Metadata given to the clone and its pods: bounded, and valid as label values where it becomes
/// labels (an invalid label key is refused when the clone is written: a WriteRefused Event).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Sidecar {
    /// Annotations on the clone Deployment's metadata, where the Speedscale operator reads them.
    /// They are added to the annotation of `capture` and win over it (set
    /// `sidecar.speedscale.com/inject: "false"` to turn the sidecar off, say), so adding another
    /// Speedscale annotation keeps the capture on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64, "additionalProperties" = {"type": "string", "maxLength": 4096}))]
    pub annotations: BTreeMap<String, String>,
    /// Extra labels for the clone's pod template.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32, "additionalProperties" = {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE}))]
    #[x_kube(validation = Rule::new("!('recordingcanary.dev/role' in self) && !('pod-template-hash' in self)").message(RESERVED_POD_LABELS))]
    pub pod_labels: BTreeMap<String, String>,
    /// Extra annotations for the clone's pod template.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64, "additionalProperties" = {"type": "string", "maxLength": 4096}))]
    pub pod_annotations: BTreeMap<String, String>,
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
    pub phase: Option<Phase>,
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
    /// Ready replicas of the clone: its pods that are Ready and not being deleted.
    #[serde(default)]
    pub clone_ready_replicas: i32,
    /// The VirtualServices this canary splits (`namespace/name`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub virtual_services: Vec<String>,
    /// The DestinationRule holding the subsets (`namespace/name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_rule: Option<String>,
    /// When the clone first got traffic (RFC 3339): `spec.duration` counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recording_start_time: Option<String>,
    /// When the recording ends (RFC 3339): `recordingStartTime` plus `spec.duration`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recording_end_time: Option<String>,
    /// The time left to record, rounded (`29m`, `40s`), while a `spec.duration` runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_left: Option<String>,
    /// When the recording was complete and everything put back (RFC 3339; phase `Completed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    /// The share of the requests the clone recorded, in percent (the last weight it had).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded_percent: Option<i32>,
    /// The HTTPRoutes this canary splits (`namespace/name`; Gateway API router).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_routes: Vec<String>,
    /// The two Services the routes split between, stable then recording (`namespace/name`;
    /// Gateway API router).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_services: Vec<String>,
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
    pub last_propagation_wait: Option<PropagationWait>,
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
    pub stable_labelling: Option<StableLabelling>,
    /// The router in force: `Istio`, `GatewayAPI` or `Replicas` (set once; never changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<status::Router>,
    /// Ready, Progressing and Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

impl RecordingCanaryStatus {
    /// The reason of its `Ready` condition.
    pub fn ready_reason(&self) -> Option<&str> {
        self.conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.reason.as_str())
    }
}

impl RecordingCanarySpec {
    /// The Service whose traffic is split.
    pub fn service_name(&self) -> &str {
        self.service.as_deref().unwrap_or(&self.target_ref.name)
    }

    /// Annotations for the clone Deployment: the annotation of `capture` plus `sidecar.annotations`.
    pub fn clone_annotations(&self) -> BTreeMap<String, String> {
        let mut a = BTreeMap::new();
        if let Some((k, v)) = self.capture.annotation() {
            a.insert(k.to_string(), v.to_string());
        }
        a.extend(self.sidecar.annotations.clone());
        a
    }

    /// The capture annotations that the clone must not carry: those of the other modes, unless
    /// `sidecar.annotations` sets them. A live clone loses them when it is updated (a switch
    /// from `Sidecar` to `EBPF`, say).
    pub fn unwanted_capture_annotations(&self) -> Vec<&'static str> {
        let want = self.clone_annotations();
        [SIDECAR_INJECT_ANNOTATION, EBPF_CAPTURE_ANNOTATION]
            .into_iter()
            .filter(|k| !want.contains_key(*k))
            .collect()
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
    pub mode: Mode,
    /// `spec.always` as Istio match entries.
    pub always: Vec<Value>,
    /// `spec.never` as Istio match entries.
    pub never: Vec<Value>,
    pub ramp: Option<(i32, Duration)>,
    pub propagation_delay: Duration,
    pub max_replicas: Option<i32>,
    /// `spec.duration`.
    pub duration: Option<Duration>,
    /// `spec.sessionKey`.
    pub session_key: Option<session::SessionKey>,
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
        if propagation_delay.is_zero() {
            return Err(InvalidSpec(ZERO_DELAY.into()));
        }
        let duration = match &self.duration {
            None => None,
            Some(d) => {
                let d = parse_duration("spec.duration", d)?;
                if d.is_zero() {
                    return Err(InvalidSpec("spec.duration must be longer than 0s".into()));
                }
                Some(d)
            }
        };
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
        if self.mode == Mode::Mirror && !self.acknowledge_mirror_side_effects {
            return Err(InvalidSpec(MIRROR_ACK.into()));
        }
        let matches = |field: &str, list: &[RequestMatch]| {
            list.iter()
                .enumerate()
                .map(|(i, m)| {
                    m.check(&format!("{field}[{i}]"))?;
                    serde_json::to_value(m).map_err(|e| InvalidSpec(format!("{field}[{i}]: {e}")))
                })
                .collect::<Result<Vec<Value>, InvalidSpec>>()
        };
        let always = matches("spec.always", &self.always)?;
        let never = matches("spec.never", &self.never)?;
        let a = self.clone_annotations();
        let on = |k: &str| a.get(k).map(String::as_str) == Some("true");
        if on(SIDECAR_INJECT_ANNOTATION) && on(EBPF_CAPTURE_ANNOTATION) {
            return Err(InvalidSpec(BOTH_CAPTURES.into()));
        }
        if let Some(m) = self.max_replicas
            && m < 1
        {
            return Err(InvalidSpec(format!(
                "spec.maxReplicas must be at least 1, got {m}"
            )));
        }
        Ok(ValidSpec {
            percent: self.percent,
            mode: self.mode,
            always,
            never,
            ramp,
            propagation_delay,
            max_replicas: self.max_replicas,
            duration,
            session_key: self.session_key.clone(),
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

/// A schema `pattern` that accepts the durations `humantime` parses in practice: one or more
/// `<number><unit>` groups, e.g. `30s`, `1m30s`, `500ms`.
const DURATION_PATTERN: &str = r"^\s*([0-9]+\s*(ns|us|µs|ms|s|sec|secs|second|seconds|m|min|mins|minute|minutes|h|hr|hrs|hour|hours|d|day|days)\s*)+$";

const ZERO_DELAY: &str = "spec.propagationDelay must be longer than 0s: it is the wait between a DestinationRule write and the VirtualService write that depends on it (make before break), while Istio pushes the first to every proxy";

const MIRROR_ACK: &str = "spec.mode Mirror copies requests to the clone, so their writes downstream happen twice: set spec.acknowledgeMirrorSideEffects: true to accept that";

/// CEL: the clone's effective capture annotations (`sidecar.annotations` win over `capture`)
/// are not both "true". Mirrors [`RecordingCanarySpec::validate`].
const BOTH_CAPTURES_RULE: &str = "!((has(self.sidecar) && has(self.sidecar.annotations) && 'sidecar.speedscale.com/inject' in self.sidecar.annotations ? self.sidecar.annotations['sidecar.speedscale.com/inject'] == 'true' : (!has(self.capture) || self.capture == 'Sidecar')) && (has(self.sidecar) && has(self.sidecar.annotations) && 'capture.speedscale.com/enabled' in self.sidecar.annotations ? self.sidecar.annotations['capture.speedscale.com/enabled'] == 'true' : (has(self.capture) && self.capture == 'EBPF')))";

const BOTH_CAPTURES: &str = "the clone would carry both sidecar.speedscale.com/inject: \"true\" and capture.speedscale.com/enabled: \"true\", which the Speedscale operator refuses: choose one with spec.capture (Sidecar or EBPF) and remove the other from spec.sidecar.annotations";

/// A DNS-1123 subdomain: what Kubernetes object names must be.
const DNS_SUBDOMAIN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// A DNS-1035 label: what Service names must be.
const SERVICE_NAME: &str = "^[a-z]([-a-z0-9]*[a-z0-9])?$";
/// A label value.
const LABEL_VALUE: &str = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$";

/// CEL, on a string that matched [`DURATION_PATTERN`]: not a zero duration (`0s`, `0m0s`).
const NOT_ZERO_DURATION: &str = r"!self.matches('^\\s*(0+\\s*[a-zµ]+\\s*)+$')";

const NAME_TOO_LONG: &str = "a RecordingCanary's name must be at most 63 characters: it becomes the value of the label recordingcanary.dev/canary on the objects it creates";

const RESERVED_POD_LABELS: &str = "spec.sidecar.podLabels must not set recordingcanary.dev/role or pod-template-hash: the controller's subsets depend on them";

/// The apiserver puts the path (`spec.always[0]`, `spec.never[1].uri`) before the message: one
/// rule serves both lists.
const EMPTY_MATCH: &str = "must set at least one condition (headers, uri, method or queryParams): an empty match is every request";

/// See [`EMPTY_MATCH`].
const NOT_ONE_KIND: &str = "must set exactly one of exact, prefix or regex";

/// A rule that keeps a field as it was created: the canary's split depends on it.
fn immutable(field: &str, rule: &str) -> Rule {
    Rule::new(rule).message(Message::Message(format!(
        "{field} is immutable: delete this RecordingCanary (it rolls back) and create a new one"
    )))
}

/// The CRD as YAML, exactly what `recording-canary crd` prints and `crds/` holds.
pub fn crd_yaml() -> Result<String, serde_yaml_ng::Error> {
    serde_yaml_ng::to_string(&RecordingCanary::crd())
}

#[cfg(test)]
mod tests;
