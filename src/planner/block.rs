//! Stage 2: the checks that may block progress, and why. Every reason has its string (the
//! `Ready` condition's reason and the Event's) and its message here, in one place.

use k8s_openapi::api::apps::v1::Deployment;
use kube::ResourceExt;
use serde_json::Value;

use super::{
    CANARY_LABEL, MeshKind, Observed, ROLE_LABEL, clone_of, clone_pod_labels, first_rival,
    is_root_namespace, meta_name, meta_ns, owned_by, pod_of_deployment, shape, spec_of,
};
use crate::api::ValidSpec;
use crate::istio::{self, ServiceHost};

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
    /// A wildcard DestinationRule for the host carries TLS settings that the DestinationRule the
    /// canary creates would have to copy (see `WildcardPolicy`); only ISTIO_MUTUAL is carried.
    WildcardDestinationRuleTls {
        destination_rule: String,
        /// The TLS settings, as JSON.
        tls: String,
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
            Block::WildcardDestinationRuleTls {
                destination_rule,
                tls,
            } => format!(
                "DestinationRule {destination_rule} (a wildcard host) sets TLS {tls} for this host; the DestinationRule this canary creates for the exact host would replace it, and it carries over only {{\"mode\":\"ISTIO_MUTUAL\"}}. Create a DestinationRule for the Service's exact host with the trafficPolicy you need: the canary adopts it and restores it exactly"
            ),
        }
    }
}

/// The VirtualService or DestinationRule to work on.
#[derive(Clone, Copy)]
pub(super) enum Choice<'v> {
    /// The user's: patched surgically, restored on rollback.
    Adopt(&'v Value),
    /// One of our own: `None` until it is created.
    Own(Option<&'v Value>),
}

impl<'v> Choice<'v> {
    pub(super) fn object(self) -> Option<&'v Value> {
        match self {
            Choice::Adopt(v) | Choice::Own(Some(v)) => Some(v),
            Choice::Own(None) => None,
        }
    }
}

/// What the checks established, for the progress stage.
pub(super) struct Checked<'a> {
    pub spec: ValidSpec,
    pub target: &'a Deployment,
    pub host: ServiceHost,
    pub vs: Choice<'a>,
    pub dr: Choice<'a>,
    /// VirtualServices bound to the gateways listed in the spec that route to the host.
    pub gateway_vss: Vec<&'a Value>,
    /// With a DestinationRule of our own: the wildcard DestinationRule whose traffic policy it
    /// carries over, and that policy (see `wildcard_policy`).
    pub carried: Option<(&'a Value, &'a Value)>,
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
    let uid = c.metadata.uid.clone().unwrap_or_default();
    let host = ServiceHost::new(c.spec.service_name(), &ns, o.cluster_domain);
    let vs = choose_vs(o, &host, &uid)?;
    let dr = choose_dr(o, &host, &uid)?;
    check_adopted(o, &host, vs, dr)?;
    let gateway_vss = gateway_routes(o, &host, vs)?;
    check_exported(o, dr, vs, &gateway_vss)?;
    check_root_dr(o, &host)?;
    let carried = match dr {
        Choice::Own(_) => super::wildcard_policy(o, &host),
        Choice::Adopt(_) => None,
    };
    if let Some((d, policy)) = carried
        && let Some(tls) = istio::tls_beyond_istio_mutual(policy)
    {
        return Err(Block::WildcardDestinationRuleTls {
            destination_rule: format!("{}/{}", meta_ns(d), meta_name(d)),
            tls,
        });
    }
    // Every part of the spec's shape, the forced requests included.
    let shape = shape(&spec, spec.percent, true);
    for v in vs.object().into_iter().chain(gateway_vss.iter().copied()) {
        if let Some(problem) = istio::shape_problem(spec_of(v), &host, meta_ns(v), &shape) {
            return Err(Block::UnsupportedRoute {
                virtual_service: format!("{}/{}", meta_ns(v), meta_name(v)),
                problem,
            });
        }
    }
    check_service_selects_only_ours(o)?;
    Ok(Checked {
        spec,
        target,
        host,
        vs,
        dr,
        gateway_vss,
        carried,
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

/// Every VirtualService whose routes will use the subsets must be seen only by namespaces that
/// also see the DestinationRule defining them (an adopted one; ours is exported everywhere).
fn check_exported(
    o: &Observed,
    dr: Choice,
    vs: Choice,
    gateway_vss: &[&Value],
) -> Result<(), Block> {
    let Choice::Adopt(d) = dr else {
        return Ok(());
    };
    let ns = o.canary.namespace().unwrap_or_default();
    let routes = vs.object().into_iter().chain(gateway_vss.iter().copied());
    // A VirtualService still to be created (ours) is exported everywhere.
    let mut views: Vec<(String, istio::Audience)> = routes
        .map(|v| {
            (
                format!("{}/{}", meta_ns(v), meta_name(v)),
                istio::Audience::of(v),
            )
        })
        .collect();
    if vs.object().is_none() {
        views.push((
            format!("{ns}/{}", super::owned_mesh_name(o.canary)),
            istio::Audience::All,
        ));
    }
    let dr_view = istio::Audience::of(d);
    for (name, view) in views {
        if !dr_view.covers(&view) {
            return Err(Block::DestinationRuleNotExported {
                destination_rule: format!("{}/{}", meta_ns(d), meta_name(d)),
                its_export_to: dr_view.describe(),
                virtual_service: name,
                vs_export_to: view.describe(),
            });
        }
    }
    Ok(())
}

/// With gateways listed, no DestinationRule for the host in the root namespace (see
/// [`Block::RootDestinationRuleForGateways`]).
fn check_root_dr(o: &Observed, host: &ServiceHost) -> Result<(), Block> {
    if o.canary.spec.gateways.is_empty() {
        return Ok(());
    }
    match o.destination_rules.iter().find(|d| {
        is_root_namespace(meta_ns(d))
            && d.pointer("/spec/workloadSelector").is_none()
            && host.matches(
                d.pointer("/spec/host")
                    .and_then(Value::as_str)
                    .unwrap_or_default(),
                meta_ns(d),
            )
    }) {
        Some(d) => Err(Block::RootDestinationRuleForGateways {
            destination_rule: format!("{}/{}", meta_ns(d), meta_name(d)),
            host: host.fqdn(),
        }),
        None => Ok(()),
    }
}

/// A user's VirtualService and DestinationRule must be ones a split can work with.
fn check_adopted(o: &Observed, host: &ServiceHost, vs: Choice, dr: Choice) -> Result<(), Block> {
    if let Choice::Adopt(v) = vs {
        let name = meta_name(v).to_string();
        if !istio::vs_routes_to_host(spec_of(v), host, meta_ns(v)) {
            return Err(Block::NoRouteToService {
                virtual_service: name,
                host: host.fqdn(),
            });
        }
        let st = istio::read_split(spec_of(v), host, meta_ns(v));
        if st.pairs == 0 && st.unsplit == 0 {
            return Err(Block::NoSplittableRoute {
                virtual_service: name,
                host: host.fqdn(),
            });
        }
        let (owner, _) = istio::parse_restore_note(istio::restore_note_of(v));
        if let Some(owner) = owner.filter(|n| *n != o.canary.name_any()) {
            return Err(Block::SplitByOther {
                virtual_service: name,
                owner,
            });
        }
    }
    if let Choice::Adopt(d) = dr {
        let its_host = d
            .pointer("/spec/host")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !host.matches(its_host, meta_ns(d)) {
            return Err(Block::DestinationRuleHostMismatch {
                destination_rule: meta_name(d).into(),
                its_host: its_host.into(),
                host: host.fqdn(),
            });
        }
        if let Some(subset) = istio::foreign_subset_with_our_name(spec_of(d)) {
            return Err(Block::SubsetNameTaken {
                destination_rule: meta_name(d).into(),
                subset: subset.to_string(),
            });
        }
    }
    Ok(())
}

/// The gateway VirtualServices to split too; every gateway listed must have one (a typo would
/// otherwise go unnoticed).
fn gateway_routes<'a>(
    o: &'a Observed<'a>,
    host: &ServiceHost,
    vs: Choice,
) -> Result<Vec<&'a Value>, Block> {
    let c = o.canary;
    if c.spec.gateways.is_empty() {
        return Ok(Vec::new());
    }
    let ns = c.namespace().unwrap_or_default();
    let routes_host = |v: &Value, gateways: &[String]| {
        meta_ns(v) == ns
            && istio::is_bound_to_gateways(spec_of(v), &ns, gateways, &ns)
            && istio::vs_routes_to_host(spec_of(v), host, &ns)
    };
    if let Some(g) = c.spec.gateways.iter().find(|g| {
        !o.virtual_services
            .iter()
            .any(|v| routes_host(v, std::slice::from_ref(g)))
    }) {
        return Err(Block::GatewayRouteNotFound {
            namespace: ns,
            gateway: g.clone(),
            host: host.fqdn(),
        });
    }
    let adopted = match vs {
        Choice::Adopt(a) => Some(meta_name(a)),
        Choice::Own(_) => None,
    };
    Ok(o.virtual_services
        .iter()
        .filter(|v| Some(meta_name(v)) != adopted && routes_host(v, &c.spec.gateways))
        .collect())
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

fn choose_vs<'v>(o: &'v Observed<'v>, host: &ServiceHost, uid: &str) -> Result<Choice<'v>, Block> {
    let ns = o.canary.namespace().unwrap_or_default();
    let (mesh, elsewhere): (Vec<&Value>, Vec<&Value>) = o
        .virtual_services
        .iter()
        .filter(|v| {
            istio::is_mesh_bound(spec_of(v)) && istio::vs_has_host(spec_of(v), host, meta_ns(v))
        })
        .partition(|v| meta_ns(v) == ns);
    if let Some(other) = elsewhere.first() {
        return Err(Block::VirtualServiceElsewhere {
            namespace: meta_ns(other).into(),
            name: meta_name(other).into(),
            host: host.fqdn(),
            here: ns,
        });
    }
    choose(
        MeshKind::VirtualService,
        o.canary.spec.virtual_service.as_deref(),
        o.virtual_services,
        mesh,
        (&ns, uid),
        host,
    )
}

fn choose_dr<'v>(o: &'v Observed<'v>, host: &ServiceHost, uid: &str) -> Result<Choice<'v>, Block> {
    let ns = o.canary.namespace().unwrap_or_default();
    let dr_host = |v: &Value| {
        v.pointer("/spec/host")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    if let Some(other) = o.destination_rules.iter().find(|v| {
        meta_ns(v) != ns && host.matches(&dr_host(v), meta_ns(v)) && !is_root_namespace(meta_ns(v))
    }) {
        return Err(Block::ShadowingDestinationRule {
            namespace: meta_ns(other).into(),
            name: meta_name(other).into(),
            host: host.fqdn(),
        });
    }
    let local: Vec<&Value> = o
        .destination_rules
        .iter()
        .filter(|v| {
            meta_ns(v) == ns
                && host.matches(&dr_host(v), &ns)
                && v.pointer("/spec/workloadSelector").is_none()
        })
        .collect();
    choose(
        MeshKind::DestinationRule,
        o.canary.spec.destination_rule.as_deref(),
        o.destination_rules,
        local,
        (&ns, uid),
        host,
    )
}

/// The object to work on: the one `named` in the spec, else the only candidate for the host
/// (ours or the user's), else one to create. Never a guess between several.
fn choose<'v>(
    kind: MeshKind,
    named: Option<&str>,
    all: &'v [Value],
    candidates: Vec<&'v Value>,
    (ns, uid): (&str, &str),
    host: &ServiceHost,
) -> Result<Choice<'v>, Block> {
    if let Some(name) = named {
        return match all
            .iter()
            .find(|v| meta_name(v) == name && meta_ns(v) == ns)
        {
            Some(v) if owned_by(v, uid) => Ok(Choice::Own(Some(v))),
            Some(v) => Ok(Choice::Adopt(v)),
            None => Err(Block::NamedNotFound {
                kind,
                namespace: ns.into(),
                name: name.into(),
            }),
        };
    }
    let (owned, foreign): (Vec<&Value>, Vec<&Value>) =
        candidates.into_iter().partition(|v| owned_by(v, uid));
    match (foreign.as_slice(), owned.as_slice()) {
        ([], []) => Ok(Choice::Own(None)),
        ([], [mine]) => Ok(Choice::Own(Some(mine))),
        ([one], []) => Ok(Choice::Adopt(one)),
        _ => Err(Block::Ambiguous {
            kind,
            host: host.fqdn(),
            names: foreign
                .iter()
                .chain(owned.iter())
                .map(|v| meta_name(v).to_string())
                .collect(),
        }),
    }
}
