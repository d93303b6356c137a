//! Stage 2: the checks that may block progress, and why. Every reason has its string (the
//! `Ready` condition's reason and the Event's) and its message here, in one place.

use k8s_openapi::api::apps::v1::Deployment;
use kube::ResourceExt;

use super::router::{self, Routing};
use super::{
    CANARY_LABEL, MeshKind, Observed, ROLE_LABEL, clone_of, clone_pod_labels, first_rival,
    pod_of_deployment,
};
use crate::api::ValidSpec;
use crate::api::status::Router;
use crate::istio::ServiceHost;

/// Why a canary makes no progress. Safety actions still run (see `safety`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Block {
    InvalidSpec(String),
    /// An older RecordingCanary records the same Deployment or Service.
    Rival {
        name: String,
        target: String,
        service: String,
    },
    TargetNotFound {
        name: String,
        namespace: String,
    },
    /// The target is another RecordingCanary's clone.
    TargetIsAClone {
        name: String,
        canary: String,
    },
    ServiceNotFound {
        name: String,
        namespace: String,
    },
    /// The Service has no pod selector (its endpoints are managed by hand): the subsets, which
    /// select pods by label, would not match what it sends traffic to.
    ServiceWithoutSelector {
        name: String,
    },
    CloneNameTaken {
        clone: String,
    },
    /// The VirtualService or DestinationRule named in the spec does not exist.
    NamedNotFound {
        kind: MeshKind,
        namespace: String,
        name: String,
    },
    /// Several objects of `kind` configure the host; Istio would apply only one.
    Ambiguous {
        kind: MeshKind,
        host: String,
        names: Vec<String>,
    },
    /// A mesh VirtualService for the host lives in another namespace.
    VirtualServiceElsewhere {
        namespace: String,
        name: String,
        host: String,
        /// The canary's namespace, where the routing belongs.
        here: String,
    },
    ShadowingDestinationRule {
        namespace: String,
        name: String,
        host: String,
    },
    NoRouteToService {
        virtual_service: String,
        host: String,
    },
    NoSplittableRoute {
        virtual_service: String,
        host: String,
    },
    /// The VirtualService is split by another canary already.
    SplitByOther {
        virtual_service: String,
        owner: String,
    },
    DestinationRuleHostMismatch {
        destination_rule: String,
        its_host: String,
        host: String,
    },
    SubsetNameTaken {
        destination_rule: String,
        subset: String,
    },
    GatewayRouteNotFound {
        namespace: String,
        gateway: String,
        host: String,
    },
    ServiceSelectsOtherPods {
        service: String,
        target: String,
        pods: Vec<String>,
    },
    /// A route of the VirtualService cannot take the spec's mode or `always`/`never` exactly.
    UnsupportedRoute {
        virtual_service: String,
        problem: String,
    },
    /// The clone's pods would not carry labels the Service selects on (a `sidecar.podLabels`
    /// entry overrides one): they would never be its endpoints, so the recording subset would
    /// have no upstream.
    CloneNotSelectedByService {
        service: String,
        clone: String,
        /// `key=value` pairs of the selector that the clone's pod labels do not match.
        unmatched: Vec<String>,
    },
    /// The Service selects on the role label, which the controller sets and removes on pods.
    ServiceSelectsRoleLabel {
        service: String,
    },
    /// The target's pod template (or selector) carries the role label: relabelling its pods would
    /// release them from their ReplicaSet (endless replacement pods), and rollback would orphan
    /// every one of them.
    TargetCarriesRoleLabel {
        target: String,
    },
    /// The adopted DestinationRule is visible to fewer namespaces than a VirtualService that would
    /// route to its subsets: clients (or gateways) outside it would route to undefined subsets.
    DestinationRuleNotExported {
        destination_rule: String,
        its_export_to: String,
        virtual_service: String,
        vs_export_to: String,
    },
    /// A DestinationRule for the host in Istio's root namespace: for proxies that run there (the
    /// ingress gateways, usually) it comes first, so the listed gateways would not see our subsets.
    RootDestinationRuleForGateways {
        destination_rule: String,
        host: String,
    },
    /// The target's pods need privileges (host namespaces, hostPath volumes, privileged
    /// containers, added capabilities) that the controller does not give a clone.
    PrivilegedTarget {
        target: String,
        what: Vec<String>,
    },
    /// The router in force cannot honour a part of the spec.
    UnsupportedByRouter {
        router: String,
        what: String,
        why: String,
    },
    /// Both a mesh VirtualService and an HTTPRoute with the Service as a parent route the host:
    /// Istio says mixing them is undefined.
    BothRouteKinds {
        virtual_service: String,
        http_route: String,
    },
    /// A wildcard DestinationRule for the host carries TLS settings that the DestinationRule the
    /// canary creates would have to copy (see `WildcardPolicy`); only ISTIO_MUTUAL is carried.
    WildcardDestinationRuleTls {
        destination_rule: String,
        /// The TLS settings, as JSON.
        tls: String,
    },
    /// Istio's ambient mode, and no waypoint for the Service: only a waypoint applies HTTPRoutes
    /// (ztunnel routes at layer 4), so a split would not take effect.
    NoWaypoint {
        namespace: String,
        service: String,
    },
    /// A Service with the name of one of the canary's two, not created by it.
    BackendServiceTaken {
        service: String,
    },
    /// The HTTPRoute is split by another canary already.
    HttpRouteSplitByOther {
        http_route: String,
        owner: String,
    },
    /// No HTTPRoute with the listed Gateway as a parent sends to the Service.
    GatewayHttpRouteNotFound {
        gateway: String,
        service: String,
    },
    /// A route of another kind than HTTPRoute (a GRPCRoute) is attached to the Service: its
    /// requests would reach the clone unsplit.
    OtherRouteKind {
        problem: String,
    },
    /// A rule of the HTTPRoute cannot take the spec's mode or `always`/`never` exactly.
    UnsupportedHttpRoute {
        http_route: String,
        problem: String,
    },
}

impl Block {
    /// The reason of the `Ready` condition and of the warning Event.
    pub fn reason(&self) -> String {
        match self {
            Block::InvalidSpec(_) => "InvalidSpec".into(),
            Block::Rival { .. } | Block::SplitByOther { .. } => "Conflict".into(),
            Block::TargetNotFound { .. } => "TargetNotFound".into(),
            Block::TargetIsAClone { .. } => "TargetIsAClone".into(),
            Block::ServiceNotFound { .. } => "ServiceNotFound".into(),
            Block::ServiceWithoutSelector { .. } => "ServiceWithoutSelector".into(),
            Block::CloneNameTaken { .. } => "CloneNameTaken".into(),
            Block::NamedNotFound { kind, .. } => format!("{}NotFound", kind.name()),
            Block::Ambiguous { kind, .. } => format!("Ambiguous{}", kind.name()),
            Block::VirtualServiceElsewhere { .. } => "AmbiguousVirtualService".into(),
            Block::ShadowingDestinationRule { .. } => "ShadowingDestinationRule".into(),
            Block::NoRouteToService { .. } => "NoRouteToService".into(),
            Block::NoSplittableRoute { .. } => "NoSplittableRoute".into(),
            Block::DestinationRuleHostMismatch { .. } => "DestinationRuleHostMismatch".into(),
            Block::SubsetNameTaken { .. } => "SubsetNameTaken".into(),
            Block::GatewayRouteNotFound { .. } => "GatewayRouteNotFound".into(),
            Block::ServiceSelectsOtherPods { .. } => "ServiceSelectsOtherPods".into(),
            Block::UnsupportedRoute { .. } => "UnsupportedRoute".into(),
            Block::CloneNotSelectedByService { .. } => "CloneNotSelectedByService".into(),
            Block::ServiceSelectsRoleLabel { .. } => "ServiceSelectsRoleLabel".into(),
            Block::TargetCarriesRoleLabel { .. } => "TargetCarriesRoleLabel".into(),
            Block::DestinationRuleNotExported { .. } => "DestinationRuleNotExported".into(),
            Block::RootDestinationRuleForGateways { .. } => "RootDestinationRuleForGateways".into(),
            Block::PrivilegedTarget { .. } => "PrivilegedTarget".into(),
            Block::WildcardDestinationRuleTls { .. } => "WildcardDestinationRuleTls".into(),
            Block::UnsupportedByRouter { .. } => "UnsupportedByRouter".into(),
            Block::BothRouteKinds { .. } => "BothRouteKinds".into(),
            Block::NoWaypoint { .. } => "NoWaypoint".into(),
            Block::BackendServiceTaken { .. } => "BackendServiceTaken".into(),
            Block::HttpRouteSplitByOther { .. } => "Conflict".into(),
            Block::GatewayHttpRouteNotFound { .. } => "GatewayRouteNotFound".into(),
            Block::UnsupportedHttpRoute { .. } => "UnsupportedRoute".into(),
            Block::OtherRouteKind { .. } => "OtherRouteKind".into(),
        }
    }

    /// What the user reads in the condition and the Event.
    pub fn message(&self) -> String {
        match self {
            Block::InvalidSpec(m) => m.clone(),
            Block::Rival {
                name,
                target,
                service,
            } => format!(
                "RecordingCanary {name} already records Deployment {target} / Service {service}; this one changes nothing while it exists"
            ),
            Block::TargetNotFound { name, namespace } => {
                format!("Deployment {name} not found in namespace {namespace}")
            }
            Block::TargetIsAClone { name, canary } => format!(
                "Deployment {name} is the recording clone of RecordingCanary {canary}; target the Deployment it clones instead"
            ),
            Block::ServiceNotFound { name, namespace } => {
                format!("Service {name} not found in namespace {namespace}")
            }
            Block::ServiceWithoutSelector { name } => format!(
                "Service {name} has no pod selector: its endpoints are not the target's pods by label, so a split by subsets could send traffic nowhere"
            ),
            Block::CloneNameTaken { clone } => {
                format!("Deployment {clone} exists and was not created by this RecordingCanary")
            }
            Block::NamedNotFound {
                kind,
                namespace,
                name,
            } => format!(
                "{} {namespace}/{name} named in spec.{} does not exist",
                kind.name(),
                kind.spec_field()
            ),
            Block::Ambiguous { kind, host, names } => format!(
                "{} {}s configure host {host} ({}); Istio would apply only one of them. Merge them, or name one in spec.{}",
                names.len(),
                kind.name(),
                names.join(", "),
                kind.spec_field()
            ),
            Block::VirtualServiceElsewhere {
                namespace,
                name,
                host,
                here,
            } => format!(
                "VirtualService {namespace}/{name} in another namespace routes host {host} for the mesh; Istio applies only one VirtualService per host, so a split here might not take effect. Move the routing into namespace {here}"
            ),
            Block::ShadowingDestinationRule {
                namespace,
                name,
                host,
            } => format!(
                "DestinationRule {namespace}/{name} also configures host {host}; for clients in its namespace it takes precedence over the subsets here"
            ),
            Block::NoRouteToService {
                virtual_service,
                host,
            } => format!("VirtualService {virtual_service} has no HTTP route to host {host}"),
            Block::NoSplittableRoute {
                virtual_service,
                host,
            } => format!(
                "every route of VirtualService {virtual_service} to host {host} names a subset of its own; only destinations without a subset can be split"
            ),
            Block::SplitByOther {
                virtual_service,
                owner,
            } => format!(
                "VirtualService {virtual_service} is already split by RecordingCanary {owner}"
            ),
            Block::DestinationRuleHostMismatch {
                destination_rule,
                its_host,
                host,
            } => format!(
                "DestinationRule {destination_rule} is for host {its_host:?}, not {host}; subsets there would not apply to this Service"
            ),
            Block::SubsetNameTaken {
                destination_rule,
                subset,
            } => format!(
                "DestinationRule {destination_rule} already has a subset {subset} with other labels"
            ),
            Block::GatewayRouteNotFound {
                namespace,
                gateway,
                host,
            } => format!(
                "no VirtualService in namespace {namespace} bound to gateway {gateway} routes to host {host}"
            ),
            Block::ServiceSelectsOtherPods {
                service,
                target,
                pods,
            } => format!(
                "Service {service} also selects pods that are not Deployment {target}'s ({}); they would get no mesh traffic while split",
                pods.join(", ")
            ),
            Block::UnsupportedRoute {
                virtual_service,
                problem,
            } => format!("VirtualService {virtual_service}: {problem}"),
            Block::CloneNotSelectedByService {
                service,
                clone,
                unmatched,
            } => format!(
                "the pods of {clone} would not be endpoints of Service {service}: its selector asks for {} and the clone's pod labels (the target's plus spec.sidecar.podLabels) say otherwise; the recording subset would have no upstream. Remove those keys from spec.sidecar.podLabels",
                unmatched.join(", ")
            ),
            Block::ServiceSelectsRoleLabel { service } => format!(
                "Service {service} selects on the label {ROLE_LABEL}, which this controller sets on the target's pods and removes on rollback: its endpoints would change with the canary. Remove that key from the Service's selector"
            ),
            Block::TargetCarriesRoleLabel { target } => format!(
                "the pod template of Deployment {target} carries the label {ROLE_LABEL}, which this controller sets: relabelling its pods would take them out of their ReplicaSet, and rollback would orphan them. Remove that label from the Deployment's template and selector"
            ),
            Block::DestinationRuleNotExported {
                destination_rule,
                its_export_to,
                virtual_service,
                vs_export_to,
            } => format!(
                "DestinationRule {destination_rule} is exported to {its_export_to}, but VirtualService {virtual_service}, whose routes would use its subsets, is exported to {vs_export_to}: clients that see the routes but not the subsets would get 503s. Export the DestinationRule at least as widely"
            ),
            Block::RootDestinationRuleForGateways {
                destination_rule,
                host,
            } => format!(
                "DestinationRule {destination_rule} in Istio's root namespace configures host {host}; gateways running in that namespace apply it before the subsets here, so their split routes would fail. Move it to the Service's namespace, or do not list gateways"
            ),
            Block::PrivilegedTarget { target, what } => format!(
                "the pods of Deployment {target} use {}; the controller does not create a clone with these privileges (its admission fences refuse them). Record a workload without them",
                what.join(", ")
            ),
            Block::UnsupportedByRouter { router, what, why } => {
                format!("the {router} router cannot honour {what}: {why}")
            }
            Block::BothRouteKinds {
                virtual_service,
                http_route,
            } => format!(
                "both VirtualService {virtual_service} and HTTPRoute {http_route} route this Service; Istio says mixing them is undefined. Keep one of them (spec.router picks which one the canary splits)"
            ),
            Block::WildcardDestinationRuleTls {
                destination_rule,
                tls,
            } => format!(
                "DestinationRule {destination_rule} (a wildcard host) sets TLS {tls} for this host; the DestinationRule this canary creates for the exact host would replace it, and it carries over only {{\"mode\":\"ISTIO_MUTUAL\"}}. Create a DestinationRule for the Service's exact host with the trafficPolicy you need: the canary adopts it and restores it exactly"
            ),
            Block::NoWaypoint { namespace, service } => format!(
                "namespace {namespace} is in Istio's ambient mode and neither it nor Service {service} names a waypoint (label istio.io/use-waypoint): ztunnel routes at layer 4 and applies no HTTPRoute, so a split would not take effect. Deploy a waypoint (istioctl waypoint apply -n {namespace} --enroll-namespace) or label the Service"
            ),
            Block::BackendServiceTaken { service } => format!(
                "Service {service} exists and was not created by this RecordingCanary; the Gateway API router needs that name for one of its two Services. Rename that Service, or create the canary under another name"
            ),
            Block::HttpRouteSplitByOther { http_route, owner } => {
                format!("HTTPRoute {http_route} is already split by RecordingCanary {owner}")
            }
            Block::GatewayHttpRouteNotFound { gateway, service } => format!(
                "no HTTPRoute with Gateway {gateway} (spec.gateways) as a parent sends to Service {service}"
            ),
            Block::UnsupportedHttpRoute {
                http_route,
                problem,
            } => format!("HTTPRoute {http_route}: {problem}"),
            Block::OtherRouteKind { problem } => {
                format!("{problem}; remove it, or record another Service")
            }
        }
    }
}

/// What the checks established, for the progress stage.
pub(super) struct Checked<'a> {
    pub spec: ValidSpec,
    pub target: &'a Deployment,
    pub host: ServiceHost,
    /// The router in force, with what its checks established.
    pub routing: Routing<'a>,
}

/// Runs every check, in order; the first that fails blocks progress.
pub(super) fn check<'a>(o: &'a Observed<'a>) -> Result<Checked<'a>, Block> {
    let c = o.canary;
    let ns = c.namespace().unwrap_or_default();
    let spec = c.spec.validate().map_err(|e| Block::InvalidSpec(e.0))?;
    if let Some(r) = first_rival(o) {
        return Err(Block::Rival {
            name: r.name.clone(),
            target: r.target.clone(),
            service: r.service.clone(),
        });
    }
    let target = o.target.ok_or_else(|| Block::TargetNotFound {
        name: c.spec.target_ref.name.clone(),
        namespace: ns.clone(),
    })?;
    if let Some(canary) = clone_of(&target.metadata) {
        return Err(Block::TargetIsAClone {
            name: c.spec.target_ref.name.clone(),
            canary: canary.to_string(),
        });
    }
    if !o.service_exists {
        return Err(Block::ServiceNotFound {
            name: c.spec.service_name().into(),
            namespace: ns,
        });
    }
    if o.service_selector.is_empty() {
        return Err(Block::ServiceWithoutSelector {
            name: c.spec.service_name().into(),
        });
    }
    check_labels(o, target)?;
    if let Some(cl) = o.clone
        && cl.labels().get(CANARY_LABEL) != Some(&c.name_any())
    {
        return Err(Block::CloneNameTaken {
            clone: c.spec.clone_name(),
        });
    }
    let host = ServiceHost::new(c.spec.service_name(), &ns, o.cluster_domain);
    let routing = match router::chosen(o) {
        Router::Istio => Routing::Istio(router::istio::check(o, &host, &spec)?),
        Router::Replicas => {
            router::replicas::check(o)?;
            Routing::Replicas
        }
        Router::GatewayApi => Routing::Gateway(router::gateway::check(o, &host, &spec)?),
    };
    check_service_selects_only_ours(o)?;
    Ok(Checked {
        spec,
        target,
        host,
        routing,
    })
}

/// Labels that must be left to the controller, and a clone that the Service must select.
fn check_labels(o: &Observed, target: &Deployment) -> Result<(), Block> {
    let c = o.canary;
    if o.service_selector.contains_key(ROLE_LABEL) {
        return Err(Block::ServiceSelectsRoleLabel {
            service: c.spec.service_name().into(),
        });
    }
    if super::target_carries_role_label(target) {
        return Err(Block::TargetCarriesRoleLabel {
            target: c.spec.target_ref.name.clone(),
        });
    }
    let privileged = super::privileges(target);
    if !privileged.is_empty() {
        return Err(Block::PrivilegedTarget {
            target: c.spec.target_ref.name.clone(),
            what: privileged,
        });
    }
    let labels = clone_pod_labels(c, target);
    let unmatched: Vec<String> = o
        .service_selector
        .iter()
        .filter(|(k, v)| labels.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if !unmatched.is_empty() {
        return Err(Block::CloneNotSelectedByService {
            service: c.spec.service_name().into(),
            clone: c.spec.clone_name(),
            unmatched,
        });
    }
    Ok(())
}

/// The Service must front only the target (and the clone): the stable subset holds the
/// target's pods alone, so other workloads behind it would silently lose their mesh traffic.
fn check_service_selects_only_ours(o: &Observed) -> Result<(), Block> {
    if o.service_selector.is_empty() {
        return Ok(());
    }
    let c = o.canary;
    let (target, clone) = (&c.spec.target_ref.name, c.spec.clone_name());
    let others: Vec<String> = o
        .pods
        .iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && o.service_selector
                    .iter()
                    .all(|(k, v)| p.labels().get(k) == Some(v))
                && !pod_of_deployment(p, target)
                && !pod_of_deployment(p, &clone)
        })
        .map(|p| p.name_any())
        .take(3)
        .collect();
    if others.is_empty() {
        return Ok(());
    }
    Err(Block::ServiceSelectsOtherPods {
        service: c.spec.service_name().into(),
        target: target.clone(),
        pods: others,
    })
}
