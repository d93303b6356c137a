//! Controller wiring: watch caches, the index, and the reconcile loop around the planner.
//!
//! Everything the planner needs is read from watch caches, never listed per reconcile:
//! - RecordingCanaries: kube's reflector store (the controller's own);
//! - VirtualServices and DestinationRules: [`Selective`] stores that keep every one of the
//!   scope (a host may be configured by any of them), as [`MeshObject`]s;
//! - Deployments, Services, Pods and EndpointSlices: [`Selective`] stores that keep only the
//!   objects some canary is interested in (targets, clones, their pods, the canaries' Services and
//!   those Services' EndpointSlices), so that memory does not grow with unrelated workloads.
//!
//! Each watch event is mapped through the [`Index`] to exactly the canaries it concerns. A canary
//! that appears after the watches listed the cluster is read once (`prime`). The controller's
//! own writes are tracked ([`freshness`]): a canary is planned again only once its caches show
//! them, and their echoes wake nobody else.

pub mod events;
pub mod namespaces;
mod observe;
mod reconcile;
mod scope;
mod triggers;
pub mod turns;
mod watches;
pub mod writers;

use observe::*;
use reconcile::*;
pub use scope::Scope;
use triggers::*;
pub use watches::strip_mesh;
use watches::*;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures::stream::{self, BoxStream};
use futures::{Future, FutureExt, StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, ListParams, VersionMatch};
use kube::runtime::controller::{Action as Requeue, Config as ControllerConfig, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher::{self, Event, watcher};
use kube::runtime::{WatchStreamExt, reflector};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::Error;
use crate::api::status::StableLabelling;
use crate::api::{MeshKind, RecordingCanary};
use crate::cache::Selective;
use crate::cache::freshness::{self, Kind, Writes, Written};
use crate::cache::index::{
    CanaryKey, Entry, Index, MeshKey, MeshRefs, Prime, deployment_of_pod, selects,
};
use crate::controller::events::Publisher;
use crate::facts::deployments::DeploymentFacts;
use crate::facts::endpoints::{self, EndpointSliceFacts};
use crate::facts::mesh::MeshObject;
use crate::facts::pods::PodFacts;
use crate::facts::services::ServiceFacts;
use crate::planner::{self, Action, Observed, Rival};
use crate::runtime::api_errors;
use crate::runtime::lease::Fence;
use crate::runtime::metrics::Metrics;
use crate::runtime::shard::Shard;

/// Shared state of all reconciles.
pub struct Context {
    pub client: Client,
    pub events: Publisher,
    pub metrics: Arc<Metrics>,
    pub cluster_domain: String,
    /// Start of this process: waits are measured from no earlier than this (nor than when it
    /// started to lead: [`Context::leading_since`]).
    pub started: Timestamp,
    /// The canaries of which namespaces this process reconciles.
    pub shard: Shard,
    /// Whether this process may write now (it leads, and its lease is fresh).
    pub fence: Fence,
    scopes: RwLock<Vec<Arc<Scope>>>,
    writes: Mutex<Writes>,
    stable_labelling: RwLock<StableLabelling>,
    backoff: Mutex<HashMap<ObjectRef<RecordingCanary>, ExponentialBackoff>>,
    /// Reconciles at work at once, across every scope, traffic before reports (see
    /// [`Context::with_max_reconciles`]).
    reconciles: turns::Turns,
    /// The same limit; each scope's kube-runtime controller runs [`TASKS_PER_TURN`] times as
    /// many reconcile tasks.
    max_reconciles: u16,
    /// The cluster serves the Gateway API's HTTPRoutes: they are watched (and the Gateway API
    /// router can work) only then.
    pub gateway_api: bool,
    /// The cluster serves GRPCRoutes and this process may list them: they are watched (never
    /// written), so that one attached to a split Service blocks its canary.
    pub grpc_routes: bool,
    /// Istio's ambient labels of every namespace ([`namespaces`]).
    namespaces: RwLock<HashMap<String, namespaces::NamespaceFacts>>,
}

/// The default of `--max-concurrent-reconciles`.
pub const DEFAULT_MAX_RECONCILES: u16 = 32;

/// Reconcile tasks per turn in each scope's kube-runtime controller: the tasks over the turns
/// wait for one, among them the reports that wait behind other canaries' traffic
/// ([`turns`]). Were there no more tasks than turns, reports waiting for their turn would
/// keep new canaries from starting.
pub const TASKS_PER_TURN: u16 = 4;

impl Context {
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        cluster_domain: &str,
        instance: Option<String>,
    ) -> Self {
        Self {
            events: Publisher::new(client.clone(), "recording-canary", instance),
            client,
            metrics,
            cluster_domain: cluster_domain.into(),
            started: Timestamp::now(),
            shard: Shard::default(),
            fence: Fence::always(),
            scopes: RwLock::new(Vec::new()),
            writes: Mutex::new(Writes::default()),
            stable_labelling: RwLock::new(StableLabelling::default()),
            backoff: Mutex::new(HashMap::new()),
            reconciles: turns::Turns::new(usize::from(DEFAULT_MAX_RECONCILES)),
            max_reconciles: DEFAULT_MAX_RECONCILES,
            gateway_api: false,
            grpc_routes: false,
            namespaces: RwLock::new(HashMap::new()),
        }
    }

    /// At most `n` canaries (at least 1) observed, planned and applied, or reported, at once,
    /// across every scope ([`turns`]: the traffic of waiting canaries before the reports of
    /// the others). Each scope's kube-runtime controller starts at most [`TASKS_PER_TURN`]` × n`
    /// reconcile tasks at once; unbounded, it would start one for every canary with a trigger,
    /// and when thousands arrive together (a GitOps sync) they would all wait for a turn here at
    /// once. A task waiting for a traffic turn holds a small future; one waiting to report holds
    /// its plan (about 15 KB), so at most `3 × n` of those per scope.
    pub fn with_max_reconciles(mut self, n: usize) -> Self {
        let n = n.clamp(1, usize::from(u16::MAX));
        self.reconciles = turns::Turns::new(n);
        self.max_reconciles = u16::try_from(n).unwrap_or(u16::MAX);
        self
    }

    /// Writes only while `fence` allows it; before that, reconciles wait (the caches fill).
    pub fn with_fence(mut self, fence: Fence) -> Self {
        self.fence = fence;
        self
    }

    /// Watches HTTPRoutes too (the cluster serves the Gateway API).
    pub fn with_gateway_api(mut self, served: bool) -> Self {
        self.gateway_api = served;
        self
    }

    /// Watches GRPCRoutes too (served, and this process may list them).
    pub fn with_grpc_routes(mut self, served: bool) -> Self {
        self.grpc_routes = served;
        self
    }

    /// The routing kinds this process watches.
    fn mesh_kinds(&self) -> Vec<MeshKind> {
        let mut kinds = vec![MeshKind::VirtualService, MeshKind::DestinationRule];
        if self.gateway_api {
            kinds.push(MeshKind::HttpRoute);
        }
        if self.gateway_api && self.grpc_routes {
            kinds.push(MeshKind::GrpcRoute);
        }
        kinds
    }

    /// Reconciles only the canaries of `shard`.
    pub fn with_shard(mut self, shard: Shard) -> Self {
        self.shard = shard;
        self
    }

    /// When this process last started to lead (its start without leader election): a wait
    /// before a dependent write is measured from no earlier than this, so that a standby that
    /// takes over honours the wait its predecessor started and could not record.
    pub fn leading_since(&self) -> Timestamp {
        self.fence
            .leading_since()
            .map_or(self.started, |t| t.max(self.started))
    }

    /// Who labels the target's new pods, as the status reports it.
    pub fn stable_labelling(&self) -> StableLabelling {
        self.stable_labelling.read().map(|g| *g).unwrap_or_default()
    }

    /// Records who labels the target's new pods; on a change, every canary's status is updated.
    pub fn set_stable_labelling(&self, l: StableLabelling) {
        let changed = match self.stable_labelling.write() {
            Ok(mut g) => std::mem::replace(&mut *g, l) != l,
            Err(_) => false,
        };
        if changed {
            info!(
                stable_labelling = l.as_str(),
                "who labels the target's new pods changed"
            );
            for scope in self.scopes() {
                for c in scope.canaries.state() {
                    let _ = scope.triggers.send(ObjectRef::from_obj(c.as_ref()));
                }
            }
        }
    }

    pub(crate) fn scopes(&self) -> Vec<Arc<Scope>> {
        self.scopes.read().map(|g| g.clone()).unwrap_or_default()
    }

    fn scope_for(&self, ns: &str) -> Option<Arc<Scope>> {
        self.scopes().into_iter().find(|s| s.covers(ns))
    }

    fn writes(&self) -> std::sync::MutexGuard<'_, Writes> {
        self.writes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A cached VirtualService, DestinationRule or HTTPRoute, from whichever scope holds it.
    fn mesh_object(&self, kind: MeshKind, ns: &str, name: &str) -> Option<Arc<MeshObject>> {
        self.scope_for(ns)?.mesh_store(kind).get(ns, name)
    }

    /// Whether the caches still lack one of `key`'s writes (see [`Writes::stale`]); writes given
    /// up on are counted in the metrics.
    fn stale(&self, scope: &Scope, key: &CanaryKey) -> bool {
        let (stale, expired) = {
            let mut w = self.writes();
            let stale = w.stale(key, Instant::now(), |k, n, o| self.seen(scope, k, n, o));
            (stale, w.take_expired())
        };
        for kind in expired {
            self.metrics.echo_expired(kind.name());
        }
        stale
    }

    /// What the caches hold of an object the controller wrote: (resourceVersion, UID).
    fn seen(&self, scope: &Scope, kind: Kind, ns: &str, name: &str) -> freshness::Seen {
        fn rv_uid<K: Resource>(o: &K) -> (String, String) {
            (
                o.meta().resource_version.clone().unwrap_or_default(),
                o.meta().uid.clone().unwrap_or_default(),
            )
        }
        match kind {
            Kind::Canary => scope
                .canaries
                .get(&ObjectRef::new(name).within(ns))
                .map(|o| rv_uid(o.as_ref())),
            Kind::Deployment => scope.deployments.get(ns, name).map(|o| rv_uid(o.as_ref())),
            Kind::Pod => scope.pods.get(ns, name).map(|o| rv_uid(o.as_ref())),
            Kind::Service => scope.services.get(ns, name).map(|o| rv_uid(o.as_ref())),
            Kind::VirtualService => self
                .mesh_object(MeshKind::VirtualService, ns, name)
                .map(|o| rv_uid(o.as_ref())),
            Kind::DestinationRule => self
                .mesh_object(MeshKind::DestinationRule, ns, name)
                .map(|o| rv_uid(o.as_ref())),
            Kind::HttpRoute => self
                .mesh_object(MeshKind::HttpRoute, ns, name)
                .map(|o| rv_uid(o.as_ref())),
            Kind::GrpcRoute => self
                .mesh_object(MeshKind::GrpcRoute, ns, name)
                .map(|o| rv_uid(o.as_ref())),
        }
    }
}

/// Runs the controller for one scope (a namespace, or all) until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let (canary_reader, canary_writer) = reflector::store::<RecordingCanary>();
    let (trigger_tx, trigger_rx) = mpsc::unbounded_channel();
    let kinds = ctx.mesh_kinds();
    let scope = Arc::new(Scope::new(
        namespace,
        canary_reader.clone(),
        trigger_tx,
        u8::try_from(kinds.len()).unwrap_or(u8::MAX),
    ));
    if let Ok(mut g) = ctx.scopes.write() {
        g.push(scope.clone());
    }
    let canaries = canary_stream(&ctx, &scope, canary_writer);
    // The other watches list once the canaries are known, so that their first list keeps what
    // the canaries need; pods list once the Services' selectors are known too.
    let triggers = stream::select_all(
        kinds
            .into_iter()
            .map(|kind| mesh_watch(&ctx, &scope, kind))
            .chain([
                facts_watch(
                    &ctx,
                    &scope,
                    canaries_known(&scope),
                    "Deployment",
                    DeploymentFacts::strip_lag,
                    on_deployment_event,
                ),
                facts_watch(
                    &ctx,
                    &scope,
                    canaries_known(&scope),
                    "Service",
                    ServiceFacts::strip,
                    on_service_event,
                ),
                facts_watch(
                    &ctx,
                    &scope,
                    canaries_known(&scope),
                    "EndpointSlice",
                    EndpointSliceFacts::strip,
                    on_endpoint_slice_event,
                ),
                facts_watch(
                    &ctx,
                    &scope,
                    selectors_known(&scope),
                    "Pod",
                    PodFacts::strip,
                    on_pod_event,
                ),
                from_other_scopes(trigger_rx),
            ]),
    );
    Controller::for_stream(canaries, canary_reader)
        .with_config(
            ControllerConfig::default()
                .concurrency(ctx.max_reconciles.saturating_mul(TASKS_PER_TURN)),
        )
        .reconcile_on(triggers)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                // Already logged, at the right level, by error_policy.
                Err(kube::runtime::controller::Error::ReconcilerFailed(..)) => {}
                // A canary deleted between its trigger and its turn: nothing to do.
                Err(kube::runtime::controller::Error::ObjectNotFound(..)) => {}
                Err(e) => warn!(error = %e, "controller error"),
                Ok(_) => {}
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dr(rv: &str, status: Value) -> MeshObject {
        dr_with(rv, status, json!([{"name": "rcanary-stable"}]))
    }

    fn dr_with(rv: &str, status: Value, subsets: Value) -> MeshObject {
        let mut o: MeshObject = serde_json::from_value(json!({
            "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": "d", "namespace": "shop", "generation": 2, "resourceVersion": rv,
                         "managedFields": [{"manager": "istio", "operation": "Update",
                                            "subresource": "status", "fieldsV1": {"f:status": {}}}]},
            "spec": {"host": "frontend", "subsets": subsets},
            "status": status,
        }))
        .unwrap();
        strip_mesh(&mut o);
        o
    }

    #[test]
    fn the_cache_keeps_who_else_wrote_the_routes_but_not_this_controller() {
        let entry = |manager: &str, time: &str| {
            json!({"manager": manager, "operation": "Update", "time": time,
                   "fieldsV1": {"f:metadata": {"f:labels": {}}, "f:spec": {"f:http": {}, "f:hosts": {}}}})
        };
        let mut o: MeshObject = serde_json::from_value(json!({
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "v", "namespace": "shop", "resourceVersion": "7",
                         "managedFields": [entry("argocd-controller", "2026-01-01T00:00:00Z"),
                                           entry(crate::api::FIELD_MANAGER, "2026-01-01T00:00:05Z")]},
            "spec": {"hosts": ["frontend"], "http": []},
        }))
        .unwrap();
        strip_mesh(&mut o);
        assert_eq!(
            o.to_value()["metadata"]["managedFields"],
            json!([{"manager": "argocd-controller", "operation": "Update",
                    "time": "2026-01-01T00:00:00Z", "fieldsV1": {"f:spec": {"f:http": {}}}}])
        );
    }

    /// A Context whose client points nowhere (nothing in these tests calls the API).
    fn offline_context() -> Context {
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let client = Client::try_from(config).unwrap();
        Context::new(client, Arc::new(Metrics::default()), "cluster.local", None)
    }

    #[tokio::test]
    async fn a_reconcile_waiting_for_a_turn_holds_a_small_future_not_the_planning_one() {
        let ctx = Arc::new(offline_context().with_max_reconciles(1));
        let canary: RecordingCanary = serde_json::from_value(json!({
            "apiVersion": "recordingcanary.dev/v1alpha1", "kind": "RecordingCanary",
            "metadata": {"name": "c", "namespace": "shop"},
            "spec": {"targetRef": {"name": "web"}, "percent": 10},
        }))
        .unwrap();
        // kube-runtime spawns each reconcile as a task holding this future; with thousands of
        // canaries triggered at once, the ones waiting for a traffic turn must stay small, and
        // so must those waiting for a report turn (their planning half is done and dropped).
        let waiting = std::mem::size_of_val(&reconcile(Arc::new(canary), ctx.clone()));
        let turn = ctx.reconciles.take(turns::Lane::Traffic).await;
        let reporting = std::mem::size_of_val(&reconcile_inner("shop", "c", &ctx, turn));
        let planning = std::mem::size_of_val(&plan_and_apply("shop", "c", &ctx));
        assert!(
            waiting < 1024 && reporting < 1024 && planning > 4 * waiting.max(reporting),
            "waiting {waiting} bytes, reporting {reporting} bytes, planning {planning} bytes"
        );
        eprintln!(
            "reconcile future: waiting {waiting} bytes, reporting {reporting} bytes, planning {planning} bytes"
        );
        assert_eq!(ctx.max_reconciles, 1);
    }

    #[tokio::test]
    async fn a_deleted_canary_takes_out_of_the_caches_only_what_was_its_own() {
        let ctx = offline_context();
        let (canaries, _writer) = reflector::store::<RecordingCanary>();
        let scope = Scope::new(None, canaries, mpsc::unbounded_channel().0, 2);
        use std::collections::BTreeMap;
        let canary = |ns: &str, name: &str, target: &str| -> RecordingCanary {
            serde_json::from_value(json!({
                "apiVersion": "recordingcanary.dev/v1alpha1", "kind": "RecordingCanary",
                "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}")},
                "spec": {"targetRef": {"name": target}, "percent": 10},
            }))
            .unwrap()
        };
        let deployment = |ns: &str, name: &str| -> DeploymentFacts {
            serde_json::from_value(json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": name, "namespace": ns, "resourceVersion": "1"},
                "spec": {"selector": {"matchLabels": {"app": name}}, "template": {}},
            }))
            .unwrap()
        };
        let service = |ns: &str, name: &str| -> ServiceFacts {
            serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": ns, "resourceVersion": "1"},
                "spec": {"selector": {"app": name}},
            }))
            .unwrap()
        };
        let pod = |ns: &str, app: &str| -> PodFacts {
            serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("{app}-5c4b-a"), "namespace": ns, "resourceVersion": "1",
                             "labels": {"app": app, "pod-template-hash": "5c4b"},
                             "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                                  "name": format!("{app}-5c4b"), "uid": "u", "controller": true}]},
            }))
            .unwrap()
        };
        for (ns, name, target) in [
            ("shop", "a", "web"),
            ("shop", "b", "api"),
            ("other", "a", "web"),
        ] {
            scope.index_mut().upsert(&canary(ns, name, target));
            scope.index_mut().service_seen(
                ns,
                target,
                Some(BTreeMap::from([("app".to_string(), target.to_string())])),
            );
            scope.deployments.insert_newer(deployment(ns, target));
            scope.services.insert_newer(service(ns, target));
            scope.pods.insert_newer(pod(ns, target));
        }
        assert_eq!(
            (
                scope.deployments.len(),
                scope.services.len(),
                scope.pods.len()
            ),
            (3, 3, 3)
        );

        forget_canary(&ctx, &scope, &("shop".to_string(), "a".to_string()));

        assert!(scope.deployments.get("shop", "web").is_none());
        assert!(scope.services.get("shop", "web").is_none());
        assert!(scope.pods.get("shop", "web-5c4b-a").is_none());
        for (ns, app) in [("shop", "api"), ("other", "web")] {
            assert!(scope.deployments.get(ns, app).is_some(), "{ns}/{app}");
            assert!(scope.services.get(ns, app).is_some(), "{ns}/{app}");
            assert!(
                scope.pods.get(ns, &format!("{app}-5c4b-a")).is_some(),
                "{ns}/{app}"
            );
        }
    }

    #[tokio::test]
    async fn another_shards_canaries_clones_and_mesh_objects_stay_out_of_this_shards_caches() {
        let mine = "shop";
        let shard = Shard {
            index: Shard::of(mine, 2),
            count: 2,
        };
        let away = &(0..64)
            .map(|i| format!("ns-{i}"))
            .find(|ns| !shard.owns(ns))
            .unwrap();
        let away = away.as_str();
        let ctx = offline_context().with_shard(shard);
        let everyone = offline_context();
        // A cluster-wide scope in each, as `run` makes it.
        let new_scope = |ctx: &Context| {
            let (canaries, _writer) = reflector::store::<RecordingCanary>();
            let scope = Arc::new(Scope::new(None, canaries, mpsc::unbounded_channel().0, 2));
            ctx.scopes.write().unwrap().push(scope.clone());
            scope
        };
        let (sharded, unsharded) = (new_scope(&ctx), new_scope(&everyone));

        let canary = |ns: &str| -> RecordingCanary {
            serde_json::from_value(json!({
                "apiVersion": "recordingcanary.dev/v1alpha1", "kind": "RecordingCanary",
                "metadata": {"name": "c", "namespace": ns},
                "spec": {"targetRef": {"name": "web"}, "percent": 10},
            }))
            .unwrap()
        };
        assert!(of_shard(&shard, &Event::Apply(canary(mine))));
        assert!(!of_shard(&shard, &Event::Apply(canary(away))));
        assert!(!of_shard(&shard, &Event::Delete(canary(away))));
        assert!(of_shard(&shard, &Event::<RecordingCanary>::InitDone));
        assert!(of_shard(&Shard::default(), &Event::Apply(canary(away))));

        // A clone, labelled as ours, in each namespace.
        let clone = |ns: &str| -> DeploymentFacts {
            serde_json::from_value(json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "web-recording", "namespace": ns, "resourceVersion": "1",
                             "labels": {crate::api::CANARY_LABEL: "c"}},
                "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": {}},
            }))
            .unwrap()
        };
        for ns in [mine, away] {
            on_deployment_event(&ctx, &sharded, &Event::Apply(clone(ns)));
            on_deployment_event(&everyone, &unsharded, &Event::Apply(clone(ns)));
        }
        assert!(sharded.deployments.get(mine, "web-recording").is_some());
        assert!(sharded.deployments.get(away, "web-recording").is_none());
        assert_eq!(unsharded.deployments.len(), 2);

        let vs = |ns: &str, name: &str, host: &str| -> MeshObject {
            MeshObject::new(
                serde_json::from_value(json!({
                    "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                    "metadata": {"name": name, "namespace": ns, "resourceVersion": "1"},
                    "spec": {"hosts": [host], "http": [{"route": [{"destination": {"host": host}}]}]},
                }))
                .unwrap(),
            )
        };
        let fqdn = format!("web.{mine}.svc.cluster.local");
        let objects = [
            // In this shard's namespace, whatever its host.
            (vs(mine, "ext", "api.example.com"), true),
            // Elsewhere, naming a Service of this shard's namespace (a gateway's, say).
            (vs(away, "to-mine", &fqdn), true),
            // Elsewhere, for a Service there.
            (vs(away, "local", "web"), false),
        ];
        for (o, kept) in &objects {
            on_mesh_event(
                &ctx,
                &sharded,
                MeshKind::VirtualService,
                &Event::Apply(o.clone()),
            );
            on_mesh_event(
                &everyone,
                &unsharded,
                MeshKind::VirtualService,
                &Event::Apply(o.clone()),
            );
            let m: MeshKey = (
                MeshKind::VirtualService,
                o.namespace().unwrap(),
                o.name_any(),
            );
            assert_eq!(
                sharded.virtual_services.get(&m.1, &m.2).is_some(),
                *kept,
                "{m:?}"
            );
            assert_eq!(sharded.index().knows_mesh(&m), *kept, "{m:?}");
            assert!(
                unsharded.virtual_services.get(&m.1, &m.2).is_some(),
                "{m:?}"
            );
        }
        // One that stops naming this shard's Service is dropped, from the cache and the index.
        on_mesh_event(
            &ctx,
            &sharded,
            MeshKind::VirtualService,
            &Event::Apply(vs(away, "to-mine", "web")),
        );
        assert!(sharded.virtual_services.get(away, "to-mine").is_none());
        assert!(!sharded.index().knows_mesh(&(
            MeshKind::VirtualService,
            away.to_string(),
            "to-mine".to_string()
        )));
    }

    fn istiod(acked: i64, observed: &str, cond: &str) -> Value {
        json!({
            "observedGeneration": observed,
            "conditions": [
                {"type": "Reconciled", "status": cond, "message": format!("{acked}/3 proxies up to date."),
                 "lastProbeTime": format!("2026-01-01T00:00:0{acked}Z")},
                {"type": "PassedAnalysis", "status": "True"},
            ],
            "validationMessages": [],
        })
    }

    #[test]
    fn the_cache_keeps_of_an_istio_status_only_the_reconciled_condition_and_its_generation() {
        let o = dr("5", istiod(3, "2", "True"));
        assert_eq!(
            o.to_value()["status"],
            json!({"observedGeneration": "2", "conditions": [{"type": "Reconciled", "status": "True"}]})
        );
        assert!(
            o.metadata.managed_fields.is_none(),
            "status writers dropped"
        );
        let v = o.to_value();
        assert!(crate::istio::status::reconciled(&v), "{v}");
        assert!(
            dr("5", json!({"validationMessages": []}))
                .to_value()
                .get("status")
                .is_none()
        );
    }

    #[test]
    fn only_a_change_the_planner_reads_makes_a_mesh_revision_new() {
        // istiod's progress messages: a new revision, nothing new to plan from.
        assert!(
            dr("5", istiod(1, "2", "False")).same_but_revision(&dr("6", istiod(2, "2", "False")))
        );
        // The condition turning True, or speaking of another generation: new.
        assert!(
            !dr("6", istiod(2, "2", "False")).same_but_revision(&dr("7", istiod(3, "2", "True")))
        );
        assert!(
            !dr("6", istiod(3, "1", "True")).same_but_revision(&dr("7", istiod(3, "2", "True")))
        );
        let spec_changed = dr_with("8", istiod(3, "2", "True"), json!([]));
        assert!(!dr("7", istiod(3, "2", "True")).same_but_revision(&spec_changed));
    }
}
