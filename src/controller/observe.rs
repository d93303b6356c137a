//! Observe: what the planner looks at, read from the caches ([`Snapshot`]), and the one-time
//! read of what the caches may lack for a canary ([`prime`]).

use super::*;
use crate::planner::BackendService;

/// What the planner looks at, taken from the caches.
pub(super) struct Snapshot {
    pub(super) target: Option<Deployment>,
    pub(super) clone: Option<Deployment>,
    pub(super) service: Option<Arc<ServiceFacts>>,
    pub(super) pods: Vec<PodFacts>,
    /// The pods that are Ready endpoints in the Service's EndpointSlices.
    pub(super) endpoints: std::collections::BTreeSet<String>,
    /// HTTPRoutes that have the Service (or a listed Gateway) as a parent (the Gateway API
    /// router's watches fill this; none before).
    pub(super) http_routes: Vec<Value>,
    /// GRPCRoutes that concern the Service the same way (never split).
    pub(super) grpc_routes: Vec<Value>,
    /// The namespace is in Istio's ambient mode.
    pub(super) ambient: bool,
    /// The Service's waypoint (its label, else its namespace's).
    pub(super) waypoint: Option<String>,
    pub(super) service_ports: Vec<Value>,
    /// The Gateway API router's Services of this canary, stable then recording.
    pub(super) backend_services: [Option<BackendService>; 2],
    pub(super) virtual_services: Vec<Value>,
    pub(super) destination_rules: Vec<Value>,
    pub(super) rivals: Vec<Rival>,
}

impl Snapshot {
    /// What the planner sees of `canary`: this snapshot, the time, and when its waits may
    /// start. Waits start no earlier than when this process last started to lead (a predecessor
    /// that died between a mesh write and the status write that times it may have written just
    /// before its lease ran out), nor than its own last mesh write of this canary.
    pub(super) fn observed<'a>(
        &'a self,
        ctx: &'a Context,
        canary: &'a RecordingCanary,
    ) -> Observed<'a> {
        let key = (canary.namespace().unwrap_or_default(), canary.name_any());
        let leading = ctx.leading_since();
        let started = ctx
            .writes()
            .mesh_written(&key)
            .map_or(leading, |t| t.max(leading));
        Observed {
            canary,
            now: Timestamp::now(),
            started,
            cluster_domain: &ctx.cluster_domain,
            target: self.target.as_ref(),
            service_exists: self.service.is_some(),
            service_selector: self
                .service
                .as_deref()
                .map(ServiceFacts::selector)
                .unwrap_or_default(),
            clone: self.clone.as_ref(),
            pods: &self.pods,
            endpoints: &self.endpoints,
            virtual_services: &self.virtual_services,
            http_routes: &self.http_routes,
            grpc_routes: &self.grpc_routes,
            ambient: self.ambient,
            waypoint: self.waypoint.as_deref(),
            service_ports: &self.service_ports,
            backend_services: [
                self.backend_services[0].as_ref(),
                self.backend_services[1].as_ref(),
            ],
            destination_rules: &self.destination_rules,
            rivals: &self.rivals,
            stable_labelling: ctx.stable_labelling(),
        }
    }

    pub(super) fn take(ctx: &Context, scope: &Scope, c: &RecordingCanary) -> Self {
        let ns = c.namespace().unwrap_or_default();
        let name = c.name_any();
        let target_name = c.spec.target_ref.name.clone();
        let clone_name = c.spec.clone_name();
        let target = scope
            .deployments
            .get(&ns, &target_name)
            .map(|d| d.deployment());
        let clone = scope
            .deployments
            .get(&ns, &clone_name)
            .map(|d| d.deployment());
        let service = scope.services.get(&ns, c.spec.service_name());
        let selector = service
            .as_deref()
            .map(ServiceFacts::selector)
            .unwrap_or_default();
        let pods = scope
            .pods
            .in_namespace(&ns, |p| {
                deployment_of_pod(&p.metadata).is_some_and(|d| d == target_name || d == clone_name)
                    || p.metadata
                        .labels
                        .as_ref()
                        .is_some_and(|l| selects(&selector, l))
            })
            .iter()
            .map(|p| p.as_ref().clone())
            .collect();
        let service_name = c.spec.service_name();
        let endpoints = endpoints::ready_endpoints(
            scope
                .endpoint_slices
                .in_namespace(&ns, |s| s.service == service_name)
                .iter()
                .map(|s| s.as_ref()),
        );
        let ns_facts = ctx.namespace(&ns);
        let waypoint = service
            .as_deref()
            .and_then(|s| s.use_waypoint.as_deref().map(String::from))
            .or(ns_facts.use_waypoint);
        let service_ports = service
            .as_deref()
            .map(ServiceFacts::ports)
            .unwrap_or_default();
        let (stable_name, recording_name) = crate::api::labels::backend_service_names(&name);
        let backend_services = [
            backend_service(scope, &ns, &stable_name),
            backend_service(scope, &ns, &recording_name),
        ];
        let (mesh, sharing) = {
            let idx = scope.index();
            (idx.mesh_of(&ns, &name), idx.sharing(&ns, &name))
        };
        let [
            virtual_services,
            destination_rules,
            http_routes,
            grpc_routes,
        ] = mesh_objects(ctx, mesh);
        let rivals = sharing
            .iter()
            .filter_map(|n| scope.canaries.get(&ObjectRef::new(n).within(&ns)))
            .map(|r| Rival {
                name: r.name_any(),
                created: r.metadata.creation_timestamp.as_ref().map(|t| t.0),
                target: r.spec.target_ref.name.clone(),
                service: r.spec.service_name().to_string(),
                deleting: r.metadata.deletion_timestamp.is_some(),
            })
            .collect();
        Self {
            target,
            clone,
            service,
            pods,
            endpoints,
            http_routes,
            grpc_routes,
            ambient: ns_facts.ambient,
            waypoint,
            service_ports,
            backend_services,
            virtual_services,
            destination_rules,
            rivals,
        }
    }
}

/// One of the Gateway API router's Services of a canary as the caches hold it, with its Ready
/// endpoints.
fn backend_service(scope: &Scope, ns: &str, name: &str) -> Option<BackendService> {
    let s = scope.services.get(ns, name)?;
    let slices = scope
        .endpoint_slices
        .in_namespace(ns, |e| e.service == name);
    let endpoints = endpoints::ready_endpoints(slices.iter().map(|e| e.as_ref()));
    let endpoints_changed = slices.iter().filter_map(|e| e.changed).max();
    Some(BackendService {
        name: name.to_string(),
        uid: s.metadata.uid.clone().unwrap_or_default(),
        resource_version: s.metadata.resource_version.clone().unwrap_or_default(),
        controller_uid: s.controller_uid.as_deref().map(String::from),
        deleting: s.metadata.deletion_timestamp.is_some(),
        selector: s.selector(),
        ports: s.ports(),
        endpoints,
        endpoints_changed,
    })
}

/// The routing objects the index says concern a canary, as JSON, by kind: VirtualServices,
/// DestinationRules, HTTPRoutes, GRPCRoutes.
fn mesh_objects(ctx: &Context, keys: Vec<crate::cache::index::MeshKey>) -> [Vec<Value>; 4] {
    let mut out: [Vec<Value>; 4] = Default::default();
    for (kind, mns, mname) in keys {
        let Some(obj) = ctx.mesh_object(kind, &mns, &mname) else {
            continue;
        };
        let i = match kind {
            MeshKind::VirtualService => 0,
            MeshKind::DestinationRule => 1,
            MeshKind::HttpRoute => 2,
            MeshKind::GrpcRoute => 3,
        };
        out[i].push(obj.to_value());
    }
    out
}

/// Reads what the caches may lack for a canary (it appeared after the watches listed, or a
/// write found the cache wrong): its target, Service and clone, and the pods they select.
pub(super) async fn prime(
    ctx: &Context,
    scope: &Scope,
    c: &RecordingCanary,
    p: Prime,
) -> Result<(), Error> {
    if p.objects || p.clone {
        prime_objects(ctx, scope, c, p).await?;
    }
    let (ns, name) = (c.namespace().unwrap_or_default(), c.name_any());
    if scope.index().get(&ns, &name).is_some_and(|e| e.prime.pods) {
        prime_pods(ctx, scope, c).await?;
    }
    // The watch handlers set these gauges; what a prime inserted counts as well.
    ctx.metrics.cached("Deployment", scope.deployments.len());
    ctx.metrics.cached("Service", scope.services.len());
    ctx.metrics.cached("Pod", scope.pods.len());
    ctx.metrics
        .cached("EndpointSlice", scope.endpoint_slices.len());
    Ok(())
}

/// `params` asking for a state not older than what the watch behind `store` has delivered: every
/// change it passed by (before the canary was indexed) is in the list, and the apiserver answers
/// from its watch cache at once. A consistent read (no resourceVersion) would wait for that cache
/// to catch up with etcd, seconds under load, and then read etcd instead.
fn not_older_than_the_watch<K: Resource + Clone>(
    params: ListParams,
    store: &Selective<K>,
) -> ListParams {
    match store.newest_seen() {
        Some(rv) => params.at(&rv).matching(VersionMatch::NotOlderThan),
        // The watch has delivered nothing: its first list is still to come.
        None => params.match_any(),
    }
}

/// The target, the Service, its EndpointSlices (`p.objects`) and the clone (`p.clone`), read once.
async fn prime_objects(
    ctx: &Context,
    scope: &Scope,
    c: &RecordingCanary,
    p: Prime,
) -> Result<(), Error> {
    let (ns, name) = (c.namespace().unwrap_or_default(), c.name_any());
    let deployments: Api<DeploymentFacts> = Api::namespaced(ctx.client.clone(), &ns);
    let services: Api<ServiceFacts> = Api::namespaced(ctx.client.clone(), &ns);
    let slices: Api<EndpointSliceFacts> = Api::namespaced(ctx.client.clone(), &ns);
    let (target_name, clone_name) = (c.spec.target_ref.name.clone(), c.spec.clone_name());
    let service_name = c.spec.service_name().to_string();
    // The slices of the Service and of the Gateway API router's two Services, in one list.
    let (stable_name, recording_name) = crate::api::labels::backend_service_names(&name);
    let slice_params = not_older_than_the_watch(
        ListParams::default().labels(&format!(
            "{} in ({service_name},{stable_name},{recording_name})",
            endpoints::SERVICE_NAME_LABEL
        )),
        &scope.endpoint_slices,
    );
    // The backend Services, when a write found the caches wrong (a Service of that name that is
    // not ours, created before the canary, is kept by no watch until read once).
    let backends = p.clone
        && c.spec.router != crate::api::RouterChoice::Istio
        && c.spec.router != crate::api::RouterChoice::Replicas;
    let (stable, recording) = futures::try_join!(
        opt_if(backends, services.get_opt(&stable_name)),
        opt_if(backends, services.get_opt(&recording_name)),
    )?;
    for mut svc in stable.into_iter().chain(recording) {
        svc.strip();
        scope.services.insert_newer(svc);
    }
    let (target, service, clone, listed_slices) = futures::try_join!(
        opt_if(
            p.objects && !target_name.is_empty(),
            deployments.get_opt(&target_name)
        ),
        opt_if(p.objects, services.get_opt(&service_name)),
        opt_if(p.clone, deployments.get_opt(&clone_name)),
        opt_if(p.objects, async {
            slices.list(&slice_params).await.map(Some)
        }),
    )?;
    for mut s in listed_slices.into_iter().flat_map(|l| l.items) {
        s.strip();
        scope.endpoint_slices.insert_newer(s);
    }
    for mut d in target.into_iter().chain(clone) {
        d.strip_lag();
        scope.deployments.insert_newer(d);
    }
    if p.objects {
        let selector = service.as_ref().map(ServiceFacts::selector);
        if let Some(mut svc) = service {
            svc.strip();
            scope.services.insert_newer(svc);
        }
        scope.index_mut().service_seen(&ns, &service_name, selector);
    }
    scope.index_mut().primed(
        &ns,
        &name,
        Prime {
            objects: p.objects,
            clone: p.clone,
            pods: false,
        },
    );
    Ok(())
}

/// The pods the canary's Service selects (the target's selector without a Service), read once.
async fn prime_pods(ctx: &Context, scope: &Scope, c: &RecordingCanary) -> Result<(), Error> {
    let (ns, name) = (c.namespace().unwrap_or_default(), c.name_any());
    let mut selector = scope
        .services
        .get(&ns, c.spec.service_name())
        .map(|s| s.selector())
        .unwrap_or_default();
    if selector.is_empty() {
        selector = scope
            .deployments
            .get(&ns, &c.spec.target_ref.name)
            .and_then(|t| t.deployment().spec?.selector.match_labels)
            .unwrap_or_default();
    }
    if !selector.is_empty() {
        let labels = selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let pods: Api<PodFacts> = Api::namespaced(ctx.client.clone(), &ns);
        let params = not_older_than_the_watch(ListParams::default().labels(&labels), &scope.pods);
        let listed = pods.list(&params).await?;
        let idx = scope.index();
        for mut p in listed.items {
            if !idx.for_pod(&p.metadata).is_empty() {
                p.strip();
                scope.pods.insert_newer(p);
            }
        }
    }
    scope.index_mut().primed(
        &ns,
        &name,
        Prime {
            pods: true,
            ..Prime::default()
        },
    );
    Ok(())
}

pub(super) async fn opt_if<T>(
    cond: bool,
    f: impl Future<Output = Result<Option<T>, kube::Error>>,
) -> Result<Option<T>, kube::Error> {
    if cond { f.await } else { Ok(None) }
}
