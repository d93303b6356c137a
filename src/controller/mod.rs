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
pub mod writers;

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
use crate::api::RecordingCanary;
use crate::api::status::StableLabelling;
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
use crate::istio;
use crate::planner::{self, Action, Observed, Rival};
use crate::runtime::lease::Fence;
use crate::runtime::metrics::Metrics;
use crate::runtime::shard::Shard;

/// The caches and index of one watched scope (a namespace, or the whole cluster).
pub struct Scope {
    pub namespace: Option<String>,
    canaries: Store<RecordingCanary>,
    virtual_services: Selective<MeshObject>,
    destination_rules: Selective<MeshObject>,
    deployments: Selective<DeploymentFacts>,
    services: Selective<ServiceFacts>,
    pods: Selective<PodFacts>,
    /// The EndpointSlices of the canaries' Services: which pods the mesh routes to.
    endpoint_slices: Selective<EndpointSliceFacts>,
    index: RwLock<Index>,
    /// Triggers from events seen in other scopes (a VirtualService elsewhere naming a host here).
    triggers: mpsc::UnboundedSender<ObjectRef<RecordingCanary>>,
    /// Set once the canaries, and so the index, are listed. (kube's `Store::wait_until_ready`
    /// wakes only one of several waiters.)
    canaries_listed: tokio::sync::watch::Sender<bool>,
    /// Counts the VirtualService and DestinationRule watches that have listed (2: ready).
    mesh_listed: Countdown,
}

/// Ready once `n` parts have reported.
struct Countdown {
    left: tokio::sync::watch::Sender<u8>,
}

impl Countdown {
    fn new(n: u8) -> Self {
        Self {
            left: tokio::sync::watch::channel(n).0,
        }
    }

    fn done(&self) {
        self.left.send_modify(|l| *l = l.saturating_sub(1));
    }

    fn is_ready(&self) -> bool {
        *self.left.borrow() == 0
    }

    async fn wait_until_ready(&self) {
        let _ = self.left.subscribe().wait_for(|l| *l == 0).await;
    }
}

impl Scope {
    /// Empty caches and index for `namespace` (None: the whole cluster).
    fn new(
        namespace: Option<String>,
        canaries: Store<RecordingCanary>,
        triggers: mpsc::UnboundedSender<ObjectRef<RecordingCanary>>,
    ) -> Self {
        Self {
            namespace,
            canaries,
            virtual_services: Selective::default(),
            destination_rules: Selective::default(),
            deployments: Selective::default(),
            services: Selective::default(),
            pods: Selective::default(),
            endpoint_slices: Selective::default(),
            index: RwLock::new(Index::default()),
            triggers,
            canaries_listed: tokio::sync::watch::channel(false).0,
            mesh_listed: Countdown::new(2),
        }
    }

    fn covers(&self, ns: &str) -> bool {
        self.namespace.as_deref().is_none_or(|n| n == ns)
    }

    fn index(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn index_mut(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    fn mesh_store(&self, vs: bool) -> &Selective<MeshObject> {
        if vs {
            &self.virtual_services
        } else {
            &self.destination_rules
        }
    }

    /// Whether every cache has listed once.
    fn ready(&self) -> bool {
        self.mesh_listed.is_ready()
            && self.deployments.is_ready()
            && self.services.is_ready()
            && self.pods.is_ready()
            && self.endpoint_slices.is_ready()
    }

    async fn wait_until_ready(&self) {
        self.mesh_listed.wait_until_ready().await;
        self.deployments.wait_until_ready().await;
        self.services.wait_until_ready().await;
        self.pods.wait_until_ready().await;
        self.endpoint_slices.wait_until_ready().await;
    }

    /// Drops what the caches kept for canary `ns/…` only, now that it is gone (`gone`: what the
    /// index knew of it). Only its namespace is looked at, and of its pods only those that were
    /// its own: a scan of every cache per deleted canary made a rollback of 10,000 canaries
    /// CPU-bound (tens of milliseconds each).
    fn evict(&self, ns: &str, gone: &Entry) {
        let idx = self.index();
        self.deployments
            .retain_in(ns, |d| idx.wants_deployment(&d.metadata));
        self.services.retain_in(ns, |s| {
            s.metadata.name.as_deref().is_none_or(|n| n != gone.service)
                || !idx.for_service(ns, &gone.service).is_empty()
        });
        self.endpoint_slices.retain_in(ns, |s| {
            s.service != gone.service || !idx.for_service(ns, &gone.service).is_empty()
        });
        self.pods.retain_in(ns, |p| {
            let was_its = deployment_of_pod(&p.metadata)
                .is_some_and(|d| d == gone.target || d == gone.clone)
                || p.metadata.labels.as_ref().is_some_and(|l| gone.selects(l));
            !was_its || !idx.for_pod(&p.metadata).is_empty()
        });
    }
}

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
    /// Reconciles running at once, across every scope (see [`Context::with_max_reconciles`]).
    reconciles: Arc<tokio::sync::Semaphore>,
    /// The same limit, given to each scope's kube-runtime controller.
    max_reconciles: u16,
}

/// The default of `--max-concurrent-reconciles`.
pub const DEFAULT_MAX_RECONCILES: u16 = 32;

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
            reconciles: Arc::new(tokio::sync::Semaphore::new(usize::from(
                DEFAULT_MAX_RECONCILES,
            ))),
            max_reconciles: DEFAULT_MAX_RECONCILES,
        }
    }

    /// At most `n` canaries (at least 1) observed, planned and applied at once, across every
    /// scope. Each scope's kube-runtime controller starts at most `n` reconciles at once (each
    /// is a task that holds its whole future, about 15 KB, from the start); unbounded, it would
    /// start one for every canary with a trigger, and when thousands arrive together (a GitOps
    /// sync) they would wait for a turn here all at once: 150 MB at 10,000 canaries. The
    /// semaphore bounds the reconciles of all scopes together.
    pub fn with_max_reconciles(mut self, n: usize) -> Self {
        let n = n.clamp(1, usize::from(u16::MAX));
        self.reconciles = Arc::new(tokio::sync::Semaphore::new(n));
        self.max_reconciles = u16::try_from(n).unwrap_or(u16::MAX);
        self
    }

    /// Writes only while `fence` allows it; before that, reconciles wait (the caches fill).
    pub fn with_fence(mut self, fence: Fence) -> Self {
        self.fence = fence;
        self
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

    fn scopes(&self) -> Vec<Arc<Scope>> {
        self.scopes.read().map(|g| g.clone()).unwrap_or_default()
    }

    fn scope_for(&self, ns: &str) -> Option<Arc<Scope>> {
        self.scopes().into_iter().find(|s| s.covers(ns))
    }

    fn writes(&self) -> std::sync::MutexGuard<'_, Writes> {
        self.writes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A cached VirtualService (`vs`) or DestinationRule, from whichever scope holds it.
    fn mesh_object(&self, vs: bool, ns: &str, name: &str) -> Option<Arc<MeshObject>> {
        self.scope_for(ns)?.mesh_store(vs).get(ns, name)
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
            Kind::VirtualService => self.mesh_object(true, ns, name).map(|o| rv_uid(o.as_ref())),
            Kind::DestinationRule => self
                .mesh_object(false, ns, name)
                .map(|o| rv_uid(o.as_ref())),
        }
    }
}

fn mesh_resource(vs: bool) -> ApiResource {
    if vs {
        istio::virtual_service_resource()
    } else {
        istio::destination_rule_resource()
    }
}

fn canary_ref(k: &CanaryKey) -> ObjectRef<RecordingCanary> {
    ObjectRef::new(&k.1).within(&k.0)
}

fn key_of_canary(c: &RecordingCanary) -> CanaryKey {
    (c.namespace().unwrap_or_default(), c.name_any())
}

fn scoped<K>(client: &Client, ns: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn scoped_dyn(client: &Client, ns: &Option<String>, ar: &ApiResource) -> Api<MeshObject> {
    match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, ar),
        None => Api::all_with(client.clone(), ar),
    }
}

/// Keeps of a VirtualService's or DestinationRule's managedFields only who else wrote its routes
/// or subsets, and when (to name whoever undoes a split), without the field sets themselves; this
/// controller's own entries go (the planner never names itself, and each cost about 1.3 KB: two
/// JSON maps). (Of its status, [`MeshObject`] keeps only what says whether Istio has distributed
/// its current generation.)
pub fn strip_mesh(o: &mut MeshObject) {
    o.metadata.managed_fields = o
        .metadata
        .managed_fields
        .take()
        .map(|entries| {
            entries
                .into_iter()
                .filter(|e| e.manager.as_deref() != Some(crate::api::FIELD_MANAGER))
                .filter_map(|e| {
                    let spec = e.fields_v1.as_ref()?.0.get("f:spec")?;
                    let kept: serde_json::Map<String, serde_json::Value> = ["f:http", "f:subsets"]
                        .into_iter()
                        .filter(|k| spec.get(*k).is_some())
                        .map(|k| (k.to_string(), serde_json::json!({})))
                        .collect();
                    (!kept.is_empty()).then(|| ManagedFieldsEntry {
                        manager: e.manager,
                        operation: e.operation,
                        time: e.time,
                        fields_v1: Some(FieldsV1(serde_json::json!({ "f:spec": kept }))),
                        ..Default::default()
                    })
                })
                .collect::<Vec<_>>()
        })
        .filter(|v| !v.is_empty());
}

/// A watch that starts once `gate` resolves: the selective caches list only after the canaries
/// are known, so that their first list already keeps what the canaries need.
fn gated<K, G>(
    gate: G,
    api: Api<K>,
    cfg: watcher::Config,
) -> BoxStream<'static, Result<Event<K>, watcher::Error>>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    G: Future<Output = ()> + Send + 'static,
{
    stream::once(gate)
        .flat_map(move |_| watcher(api.clone(), cfg.clone()).default_backoff())
        .boxed()
}

/// Canaries to reconcile for a watch event on an object the controller may have written:
/// the echo of its own write wakes only a canary waiting for it.
fn with_echo(
    ctx: &Context,
    kind: Kind,
    meta: &kube::api::ObjectMeta,
    deleted: bool,
    mapped: impl FnOnce() -> Vec<CanaryKey>,
) -> Vec<ObjectRef<RecordingCanary>> {
    let verdict = ctx.writes().on_event(
        kind,
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default(),
        meta.resource_version.as_deref().unwrap_or_default(),
        meta.uid.as_deref().unwrap_or_default(),
        deleted,
    );
    if let Some(after) = verdict.after {
        ctx.metrics.echo(kind.name(), after);
    }
    let mut out: Vec<CanaryKey> = if verdict.echo { Vec::new() } else { mapped() };
    out.extend(verdict.wake);
    out.sort();
    out.dedup();
    out.iter().map(canary_ref).collect()
}

/// Whether a watch event is of `shard`'s namespaces (the start and end of a list are of all).
fn of_shard<K: Resource>(shard: &Shard, ev: &Event<K>) -> bool {
    event_object(ev)
        .is_none_or(|(o, _)| shard.owns(o.meta().namespace.as_deref().unwrap_or_default()))
}

fn event_object<K>(ev: &Event<K>) -> Option<(&K, bool)> {
    match ev {
        Event::Apply(o) | Event::InitApply(o) => Some((o, false)),
        Event::Delete(o) => Some((o, true)),
        Event::Init | Event::InitDone => None,
    }
}

fn log_watch_error(kind: &str, e: &watcher::Error) {
    warn!(kind, error = %e, "watch failed; retrying with backoff");
}

/// Runs the controller for one scope (a namespace, or all) until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let (canary_reader, mut canary_writer) = reflector::store::<RecordingCanary>();
    let (trigger_tx, trigger_rx) = mpsc::unbounded_channel();
    let scope = Arc::new(Scope::new(
        namespace.clone(),
        canary_reader.clone(),
        trigger_tx,
    ));
    if let Ok(mut g) = ctx.scopes.write() {
        g.push(scope.clone());
    }

    // Canaries: the index follows the store; the echo of our own status writes wakes nobody.
    let canary_api: Api<RecordingCanary> = scoped(&client, &namespace);
    let (c, s) = (ctx.clone(), scope.clone());
    let canary_stream = watcher(canary_api, watcher::Config::default().any_semantic())
        .default_backoff()
        .map_ok(move |mut ev| {
            observe_lag(&c, "RecordingCanary", &ev);
            modify(&mut ev, |c: &mut RecordingCanary| {
                c.metadata.managed_fields = None
            });
            // Another shard's canaries are not kept: its own process plans them.
            if of_shard(&c.shard, &ev) {
                canary_writer.apply_watcher_event(&ev);
            }
            let out = on_canary_event(&c, &s, &ev);
            if matches!(ev, Event::InitDone) {
                s.canaries_listed.send_replace(true);
            }
            stream::iter(out.into_iter().map(Ok::<_, watcher::Error>))
        })
        .try_flatten();

    // The other watches list once the canaries are known, so that their first list keeps what
    // the canaries need; pods list once the Services' selectors are known too.
    let canaries_known = {
        let s = scope.clone();
        move || {
            let s = s.clone();
            async move {
                let _ = s.canaries_listed.subscribe().wait_for(|l| *l).await;
                s.index_mut().watches_started();
            }
        }
    };
    let selectors_known = {
        let (known, s) = (canaries_known.clone(), scope.clone());
        move || {
            let (known, s) = (known.clone(), s.clone());
            async move {
                known().await;
                s.services.wait_until_ready().await;
                s.index_mut().pods_watch_started();
            }
        }
    };
    let deployments = triggers_of(
        &ctx,
        gated(
            canaries_known(),
            scoped::<DeploymentFacts>(&client, &namespace),
            watcher::Config::default(),
        ),
        "Deployment",
        DeploymentFacts::strip_lag,
        {
            let (c, s) = (ctx.clone(), scope.clone());
            move |ev: &Event<DeploymentFacts>| on_deployment_event(&c, &s, ev)
        },
    );
    let services = triggers_of(
        &ctx,
        gated(
            canaries_known(),
            scoped::<ServiceFacts>(&client, &namespace),
            watcher::Config::default(),
        ),
        "Service",
        ServiceFacts::strip,
        {
            let (c, s) = (ctx.clone(), scope.clone());
            move |ev: &Event<ServiceFacts>| on_service_event(&c, &s, ev)
        },
    );
    let endpoint_slices = triggers_of(
        &ctx,
        gated(
            canaries_known(),
            scoped::<EndpointSliceFacts>(&client, &namespace),
            watcher::Config::default(),
        ),
        "EndpointSlice",
        EndpointSliceFacts::strip,
        {
            let (c, s) = (ctx.clone(), scope.clone());
            move |ev: &Event<EndpointSliceFacts>| on_endpoint_slice_event(&c, &s, ev)
        },
    );
    let pods = triggers_of(
        &ctx,
        gated(
            selectors_known(),
            scoped::<PodFacts>(&client, &namespace),
            watcher::Config::default(),
        ),
        "Pod",
        PodFacts::strip,
        {
            let (c, s) = (ctx.clone(), scope.clone());
            move |ev: &Event<PodFacts>| on_pod_event(&c, &s, ev)
        },
    );
    let mesh = |vs: bool| {
        let (c, s) = (ctx.clone(), scope.clone());
        let api = scoped_dyn(&client, &namespace, &mesh_resource(vs));
        let mut listed = false;
        let kind = if vs {
            "VirtualService"
        } else {
            "DestinationRule"
        };
        triggers_of(
            &ctx,
            gated(
                canaries_known(),
                api,
                watcher::Config::default().any_semantic(),
            ),
            kind,
            strip_mesh,
            move |ev: &Event<MeshObject>| {
                // A revision that differs from the cached one only in what the caches drop
                // (istiod's progress messages, say) changes nothing the planner reads.
                let store = s.mesh_store(vs);
                let unchanged = match ev {
                    Event::Apply(o) => store
                        .get(&o.namespace().unwrap_or_default(), &o.name_any())
                        .is_some_and(|old| old.same_but_revision(o)),
                    _ => false,
                };
                let out = match ev {
                    // Cached already, so it concerned this shard, and still does.
                    Event::Apply(o) if unchanged => {
                        store.apply(ev, |_| true);
                        with_echo(&c, mesh_kind(vs), &o.metadata, false, Vec::new)
                    }
                    _ => on_mesh_event(&c, &s, vs, ev),
                };
                c.metrics.cached(kind, store.len());
                if matches!(ev, Event::InitDone) && !listed {
                    listed = true;
                    s.mesh_listed.done();
                }
                out
            },
        )
    };
    let virtual_services = mesh(true);
    let destination_rules = mesh(false);
    let from_other_scopes = stream::unfold(trigger_rx, |mut rx| async move {
        rx.recv().await.map(|t| (t, rx))
    });
    let triggers = stream::select_all([
        deployments,
        services,
        endpoint_slices,
        pods,
        virtual_services,
        destination_rules,
        from_other_scopes.boxed(),
    ]);

    Controller::for_stream(canary_stream, canary_reader)
        .with_config(ControllerConfig::default().concurrency(ctx.max_reconciles))
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

/// The canaries to reconcile for each event of a watch: `strip` trims each object, `handle`
/// updates the caches and maps the event through the index.
fn triggers_of<K: Resource + Send + 'static>(
    ctx: &Arc<Context>,
    events: BoxStream<'static, Result<Event<K>, watcher::Error>>,
    kind: &'static str,
    strip: fn(&mut K),
    mut handle: impl FnMut(&Event<K>) -> Vec<ObjectRef<RecordingCanary>> + Send + 'static,
) -> BoxStream<'static, ObjectRef<RecordingCanary>> {
    let ctx = ctx.clone();
    events
        .flat_map(move |r| {
            stream::iter(match r {
                Ok(mut ev) => {
                    observe_lag(&ctx, kind, &ev);
                    modify(&mut ev, strip);
                    handle(&ev)
                }
                Err(e) => {
                    log_watch_error(kind, &e);
                    Vec::new()
                }
            })
        })
        .boxed()
}

/// Measures how old a change was when its watch event arrived, from the newest managedFields
/// time (before the caches strip it). Only live changes count, not the objects of a (re)list nor
/// objects being deleted.
fn observe_lag<K: Resource>(ctx: &Context, kind: &str, ev: &Event<K>) {
    let Event::Apply(o) = ev else { return };
    // Marking an object deleted records no managedFields time: its age would be the last write's.
    if o.meta().deletion_timestamp.is_some() {
        return;
    }
    let newest = o
        .meta()
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.time.as_ref())
        .map(|t| t.0)
        .max();
    if let Some(t) = newest
        && let Ok(age) = Duration::try_from(Timestamp::now().duration_since(t))
    {
        ctx.metrics.watch_lag(kind, age);
    }
}

fn modify<K>(ev: &mut Event<K>, f: impl Fn(&mut K)) {
    match ev {
        Event::Apply(o) | Event::InitApply(o) | Event::Delete(o) => f(o),
        Event::Init | Event::InitDone => {}
    }
}

/// Every canary of a scope: after a re-list, objects may have gone unseen.
fn all_canaries(scope: &Scope) -> Vec<ObjectRef<RecordingCanary>> {
    scope.index().keys().map(canary_ref).collect()
}

fn on_canary_event(
    ctx: &Context,
    scope: &Scope,
    ev: &Event<RecordingCanary>,
) -> Vec<RecordingCanary> {
    match ev {
        // Another shard's: not indexed, so nothing of it is cached or reconciled here.
        Event::Apply(c) | Event::InitApply(c)
            if !ctx.shard.owns(c.namespace().as_deref().unwrap_or_default()) =>
        {
            Vec::new()
        }
        Event::Apply(c) | Event::InitApply(c) => {
            debug!(name = %c.name_any(), rv = ?c.resource_version(), "canary event");
            scope.index_mut().upsert(c);
            let verdict = ctx.writes().on_event(
                Kind::Canary,
                &c.namespace().unwrap_or_default(),
                &c.name_any(),
                c.resource_version().as_deref().unwrap_or_default(),
                c.uid().as_deref().unwrap_or_default(),
                false,
            );
            if let Some(after) = verdict.after {
                ctx.metrics.echo(Kind::Canary.name(), after);
            }
            if verdict.echo && verdict.wake.is_none() {
                Vec::new()
            } else {
                vec![c.clone()]
            }
        }
        Event::Delete(c) => {
            let k = key_of_canary(c);
            // A younger canary that this one blocked (same target or Service) may go on now.
            // (From the index, before it forgets this one: not a scan of every canary.)
            let rivals = scope.index().sharing(&k.0, &k.1);
            forget_canary(ctx, scope, &k);
            rivals
                .iter()
                .filter_map(|n| scope.canaries.get(&ObjectRef::new(n).within(&k.0)))
                .map(|o| (*o).clone())
                .collect()
        }
        Event::InitDone => {
            // Canaries deleted while the watch was down.
            let gone: Vec<CanaryKey> = scope
                .index()
                .keys()
                .filter(|k| scope.canaries.get(&canary_ref(k)).is_none())
                .cloned()
                .collect();
            for k in gone {
                forget_canary(ctx, scope, &k);
            }
            Vec::new()
        }
        Event::Init => Vec::new(),
    }
}

fn forget_canary(ctx: &Context, scope: &Scope, k: &CanaryKey) {
    let gone = scope.index_mut().remove(&k.0, &k.1);
    ctx.writes().forget(k);
    ctx.events.forget(k);
    if let Some(gone) = gone {
        scope.evict(&k.0, &gone);
    }
    ctx.metrics.forget_canary(&k.0, &k.1);
    if let Ok(mut b) = ctx.backoff.lock() {
        b.remove(&canary_ref(k));
    }
}

fn on_deployment_event(
    ctx: &Context,
    scope: &Scope,
    ev: &Event<DeploymentFacts>,
) -> Vec<ObjectRef<RecordingCanary>> {
    {
        let idx = scope.index();
        // Only this shard's: another shard's clone, labelled as ours, concerns no canary here.
        scope.deployments.apply(ev, |d| {
            ctx.shard
                .owns(d.metadata.namespace.as_deref().unwrap_or_default())
                && idx.wants_deployment(&d.metadata)
        });
    }
    ctx.metrics.cached("Deployment", scope.deployments.len());
    match event_object(ev) {
        Some((d, deleted)) => with_echo(ctx, Kind::Deployment, &d.metadata, deleted, || {
            scope.index().for_deployment(&d.metadata)
        }),
        None if matches!(ev, Event::InitDone) => all_canaries(scope),
        None => Vec::new(),
    }
}

fn on_service_event(
    ctx: &Context,
    scope: &Scope,
    ev: &Event<ServiceFacts>,
) -> Vec<ObjectRef<RecordingCanary>> {
    {
        let idx = scope.index();
        scope.services.apply(ev, |s| {
            !idx.for_service(&s.namespace().unwrap_or_default(), &s.name_any())
                .is_empty()
        });
    }
    ctx.metrics.cached("Service", scope.services.len());
    match event_object(ev) {
        Some((svc, deleted)) => {
            let selector = (!deleted).then(|| svc.selector());
            scope
                .index_mut()
                .service_seen(
                    &svc.namespace().unwrap_or_default(),
                    &svc.name_any(),
                    selector,
                )
                .iter()
                .map(canary_ref)
                .collect()
        }
        None if matches!(ev, Event::InitDone) => all_canaries(scope),
        None => Vec::new(),
    }
}

/// An EndpointSlice event: kept while a canary of its namespace splits its Service; wakes those
/// canaries (a clone pod that became a Ready endpoint may take weight now). The controller never
/// writes EndpointSlices, so there is no echo to tell apart.
fn on_endpoint_slice_event(
    ctx: &Context,
    scope: &Scope,
    ev: &Event<EndpointSliceFacts>,
) -> Vec<ObjectRef<RecordingCanary>> {
    {
        let idx = scope.index();
        scope.endpoint_slices.apply(ev, |s| {
            !s.service.is_empty()
                && !idx
                    .for_service(&s.namespace().unwrap_or_default(), &s.service)
                    .is_empty()
        });
    }
    ctx.metrics
        .cached("EndpointSlice", scope.endpoint_slices.len());
    match event_object(ev) {
        Some((s, _)) if !s.service.is_empty() => scope
            .index()
            .for_service(&s.namespace().unwrap_or_default(), &s.service)
            .iter()
            .map(canary_ref)
            .collect(),
        Some(_) => Vec::new(),
        None if matches!(ev, Event::InitDone) => all_canaries(scope),
        None => Vec::new(),
    }
}

fn on_pod_event(
    ctx: &Context,
    scope: &Scope,
    ev: &Event<PodFacts>,
) -> Vec<ObjectRef<RecordingCanary>> {
    {
        let idx = scope.index();
        scope
            .pods
            .apply(ev, |p| !idx.for_pod(&p.metadata).is_empty());
    }
    ctx.metrics.cached("Pod", scope.pods.len());
    match event_object(ev) {
        Some((p, deleted)) => with_echo(ctx, Kind::Pod, &p.metadata, deleted, || {
            scope.index().for_pod(&p.metadata)
        }),
        None if matches!(ev, Event::InitDone) => all_canaries(scope),
        None => Vec::new(),
    }
}

/// A VirtualService or DestinationRule event: this scope's cache keeps the object if it may
/// concern this shard's canaries, and the index of every scope learns which canaries it
/// concerns; this scope's are returned, other scopes' are sent to them.
fn on_mesh_event(
    ctx: &Context,
    scope: &Scope,
    vs: bool,
    ev: &Event<MeshObject>,
) -> Vec<ObjectRef<RecordingCanary>> {
    let Some((obj, deleted)) = event_object(ev) else {
        scope.mesh_store(vs).apply(ev, |_| true);
        return if matches!(ev, Event::InitDone) {
            all_canaries(scope)
        } else {
            Vec::new()
        };
    };
    let m: MeshKey = (vs, obj.namespace().unwrap_or_default(), obj.name_any());
    let spec = obj.spec();
    let refs = MeshRefs::of(&obj.metadata, &spec, vs, &ctx.cluster_domain);
    let kept = concerns_shard(&ctx.shard, &m.1, &refs);
    scope.mesh_store(vs).apply(ev, |_| kept);
    let mut mine = Vec::new();
    for other in ctx.scopes() {
        // Another scope records only objects that name a Service it covers (or that it knew);
        // this one, what may concern its shard (one that no longer does, it forgets).
        let own = std::ptr::eq(other.as_ref(), scope);
        let concerns = if own {
            kept
        } else {
            refs.services.iter().any(|(ns, _)| other.covers(ns)) || refs.wildcard.is_some()
        };
        if !concerns && !other.index().knows_mesh(&m) {
            continue;
        }
        let hits = other.index_mut().mesh_seen(
            m.clone(),
            (!deleted && (concerns || !own)).then(|| refs.clone()),
        );
        if own {
            mine = hits;
        } else {
            for k in hits {
                let _ = other.triggers.send(canary_ref(&k));
            }
        }
    }
    with_echo(ctx, mesh_kind(vs), &obj.metadata, deleted, || mine)
}

/// Whether a VirtualService or DestinationRule in namespace `ns` may concern the canaries of
/// `shard`: it is in one of the shard's namespaces, a host it names resolves to a Service in
/// one, it carries a restore note (a split to undo), or it is a DestinationRule for a wildcard
/// host (from the root namespace it applies everywhere). Without sharding, every one.
fn concerns_shard(shard: &Shard, ns: &str, refs: &MeshRefs) -> bool {
    shard.owns(ns)
        || refs.services.iter().any(|(svc_ns, _)| shard.owns(svc_ns))
        || refs.note.is_some()
        || refs.wildcard.is_some()
}

fn mesh_kind(vs: bool) -> Kind {
    if vs {
        Kind::VirtualService
    } else {
        Kind::DestinationRule
    }
}

/// What the planner looks at, taken from the caches.
struct Snapshot {
    target: Option<Deployment>,
    clone: Option<Deployment>,
    service: Option<Arc<ServiceFacts>>,
    pods: Vec<PodFacts>,
    /// The pods that are Ready endpoints in the Service's EndpointSlices.
    endpoints: std::collections::BTreeSet<String>,
    virtual_services: Vec<Value>,
    destination_rules: Vec<Value>,
    rivals: Vec<Rival>,
}

impl Snapshot {
    fn take(ctx: &Context, scope: &Scope, c: &RecordingCanary) -> Self {
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
        let (mesh, sharing) = {
            let idx = scope.index();
            (idx.mesh_of(&ns, &name), idx.sharing(&ns, &name))
        };
        let mut virtual_services = Vec::new();
        let mut destination_rules = Vec::new();
        for (vs, mns, mname) in mesh {
            let Some(obj) = ctx.mesh_object(vs, &mns, &mname) else {
                continue;
            };
            let v = obj.to_value();
            if vs {
                virtual_services.push(v);
            } else {
                destination_rules.push(v);
            }
        }
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
            virtual_services,
            destination_rules,
            rivals,
        }
    }
}

/// Reads what the caches may lack for a canary (it appeared after the watches listed, or a
/// write found the cache wrong): its target, Service and clone, and the pods they select.
async fn prime(ctx: &Context, scope: &Scope, c: &RecordingCanary, p: Prime) -> Result<(), Error> {
    let ns = c.namespace().unwrap_or_default();
    let name = c.name_any();
    let deployments: Api<DeploymentFacts> = Api::namespaced(ctx.client.clone(), &ns);
    let services: Api<ServiceFacts> = Api::namespaced(ctx.client.clone(), &ns);
    let target_name = c.spec.target_ref.name.clone();
    let service_name = c.spec.service_name().to_string();
    if p.objects || p.clone {
        let clone_name = c.spec.clone_name();
        let slices: Api<EndpointSliceFacts> = Api::namespaced(ctx.client.clone(), &ns);
        // Not older than what the EndpointSlice watch has delivered (as for the pods below).
        let slice_params = ListParams::default()
            .labels(&format!("{}={service_name}", endpoints::SERVICE_NAME_LABEL));
        let slice_params = match scope.endpoint_slices.newest_seen() {
            Some(rv) => slice_params.at(&rv).matching(VersionMatch::NotOlderThan),
            None => slice_params.match_any(),
        };
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
    }
    let needs_pods = scope.index().get(&ns, &name).is_some_and(|e| e.prime.pods);
    if needs_pods {
        let mut selector = scope
            .services
            .get(&ns, &service_name)
            .map(|s| s.selector())
            .unwrap_or_default();
        if selector.is_empty() {
            selector = scope
                .deployments
                .get(&ns, &target_name)
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
            // Not older than what the pod watch has delivered: every change it passed by (before
            // the canary was indexed) is in the list, and the apiserver answers from its watch
            // cache at once. A consistent read (no resourceVersion) would wait for that cache to
            // catch up with etcd, seconds under load, and then read etcd instead.
            let params = ListParams::default().labels(&labels);
            let params = match scope.pods.newest_seen() {
                Some(rv) => params.at(&rv).matching(VersionMatch::NotOlderThan),
                // The pod watch has delivered nothing: its first list is still to come.
                None => params.match_any(),
            };
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
    }
    // The watch handlers set these gauges; what a prime inserted counts as well.
    ctx.metrics.cached("Deployment", scope.deployments.len());
    ctx.metrics.cached("Service", scope.services.len());
    ctx.metrics.cached("Pod", scope.pods.len());
    ctx.metrics
        .cached("EndpointSlice", scope.endpoint_slices.len());
    Ok(())
}

/// Observe, plan, apply, report.
async fn reconcile(trigger: Arc<RecordingCanary>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let ns = trigger.namespace().ok_or(Error::MissingNamespace)?;
    let name = trigger.name_any();
    let span = info_span!("reconcile", namespace = %ns, name = %name);
    // Never closed, so never an error; without a permit it would only run unbounded.
    let _turn = ctx.reconciles.clone().acquire_owned().await.ok();
    let started = Instant::now();
    // Boxed: the planning future is large, and a reconcile that waits for its turn above (one
    // of another scope's, say) should not hold it meanwhile. A panic (a bug) is caught here:
    // kube-runtime would re-raise it and end every canary's controller with it; caught, this
    // canary backs off and says so (an error log, the `panic` error metric, a Warning Event),
    // and the others go on.
    let inner = Box::pin(reconcile_inner(&ns, &name, &ctx).instrument(span));
    let result = match AssertUnwindSafe(inner).catch_unwind().await {
        Ok(r) => r,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            tracing::error!(namespace = %ns, %name, panic = %what, "reconcile panicked");
            let note = planner::EventNote {
                warning: true,
                reason: "ReconcilePanicked".into(),
                note: format!(
                    "The controller hit a bug planning this canary and retries with backoff; nothing was written after it: {what}"
                ),
            };
            // Boxed: a reconcile waiting for its turn must stay a small future.
            Box::pin(publish_events(&ctx, &trigger, std::slice::from_ref(&note))).await;
            Err(Error::Panicked(what))
        }
    };
    ctx.metrics.observe(
        started.elapsed(),
        result.as_ref().err().map(Error::metric_label),
    );
    if result.is_ok()
        && let Ok(mut b) = ctx.backoff.lock()
    {
        b.remove(&ObjectRef::from_obj(trigger.as_ref()));
    }
    result
}

async fn reconcile_inner(ns: &str, name: &str, ctx: &Context) -> Result<Requeue, Error> {
    // A standby waits here with warm caches, and plans as soon as it leads.
    ctx.fence.until_leading().await;
    let Some(scope) = ctx.scope_for(ns) else {
        return Ok(Requeue::await_change());
    };
    // Another shard's canary: its own process plans it (the canary watch sees every canary).
    if !ctx.shard.owns(ns) {
        debug!("another shard's canary");
        return Ok(Requeue::await_change());
    }
    // Plan nothing before every cache has listed once; bounded, so that a shutdown never waits
    // on a watch that cannot list.
    if !scope.ready()
        && tokio::time::timeout(Duration::from_secs(5), scope.wait_until_ready())
            .await
            .is_err()
    {
        debug!("the watch caches have not listed yet");
        return Ok(Requeue::requeue(Duration::from_secs(1)));
    }
    let key: CanaryKey = (ns.to_string(), name.to_string());
    // Plan only from caches that show this controller's own last writes.
    let stale = ctx.stale(&scope, &key);
    if stale {
        debug!("waiting for the watches to show this controller's last writes");
        return Ok(Requeue::requeue(freshness::EXPIRY + Duration::from_secs(1)));
    }
    let Some(canary) = scope.canaries.get(&ObjectRef::new(name).within(ns)) else {
        return Ok(Requeue::await_change());
    };
    // Failpoint (tests only): a bug in planning this canary.
    fail::fail_point!("reconcile");
    let prime_needed = scope
        .index()
        .get(ns, name)
        .map(|e| e.prime)
        .unwrap_or_default();
    if prime_needed.any() {
        prime(ctx, &scope, &canary, prime_needed).await?;
    }

    let snap = Snapshot::take(ctx, &scope, &canary);
    // Waits start no earlier than when this process last started to lead (a predecessor that
    // died between a mesh write and the status write that times it may have written just before
    // its lease ran out), nor than its own last mesh write of this canary.
    let leading = ctx.leading_since();
    let started = ctx
        .writes()
        .mesh_written(&key)
        .map_or(leading, |t| t.max(leading));
    let observed = Observed {
        canary: &canary,
        now: Timestamp::now(),
        started,
        cluster_domain: &ctx.cluster_domain,
        target: snap.target.as_ref(),
        service_exists: snap.service.is_some(),
        service_selector: snap
            .service
            .as_deref()
            .map(ServiceFacts::selector)
            .unwrap_or_default(),
        clone: snap.clone.as_ref(),
        pods: &snap.pods,
        endpoints: &snap.endpoints,
        virtual_services: &snap.virtual_services,
        destination_rules: &snap.destination_rules,
        rivals: &snap.rivals,
        stable_labelling: ctx.stable_labelling(),
    };
    let plan = planner::plan(&observed);
    if !plan.actions.is_empty() {
        info!(actions = plan.actions.len(), phase = ?plan.status.phase, percent = plan.status.current_percent, "applying plan");
    }
    if !ctx.fence.may_write() {
        warn!("the lease is not fresh; writing nothing");
        return Ok(Requeue::requeue(Duration::from_secs(1)));
    }
    let mut written: Vec<Written> = Vec::new();
    let applied = writers::apply(
        &ctx.client,
        &ctx.fence,
        &canary,
        &plan.actions,
        &mut written,
    )
    .await;
    let wrote = !written.is_empty();
    let rv = writers::canary_rv(&canary, &written);
    ctx.writes().record(&key, ns, written, Instant::now());
    if let Err(e) = applied {
        if e.is_conflict() {
            // Something differs from what the caches showed: read the canary's objects again.
            scope.index_mut().reprime(ns, name);
        } else if let Error::Kube(kube::Error::Api(s)) = &e {
            // Refused (an admission policy or webhook, RBAC, validation): say so where the
            // user looks, not only in the controller's log. Retried with backoff.
            let note = planner::EventNote {
                warning: true,
                reason: "WriteRefused".into(),
                note: format!(
                    "The API server refused a write ({} {}): {}",
                    s.code, s.reason, s.message
                ),
            };
            publish_events(ctx, &canary, std::slice::from_ref(&note)).await;
        }
        return Err(e);
    }
    publish_events(ctx, &canary, &plan.events).await;
    let finished = plan
        .actions
        .iter()
        .any(|a| matches!(a, Action::RemoveFinalizer));
    let mut status_written = None;
    if !finished {
        // The waits run from when the dependent write completed, not from when it was planned.
        let mut status = plan.status.clone();
        let prev = canary.status.clone().unwrap_or_default();
        let done = Some(Timestamp::now().to_string());
        if status.subsets_added_time != prev.subsets_added_time {
            status.subsets_added_time = done.clone();
        }
        if status.routes_removed_time != prev.routes_removed_time {
            status.routes_removed_time = done;
        }
        status_written =
            writers::write_status(&ctx.client, &ctx.fence, &canary, &status, rv).await?;
        ctx.metrics.set_canary(
            ns,
            name,
            canary.spec.percent,
            plan.status.current_percent,
            plan.status.clone_replicas,
        );
    }
    let wrote = wrote || status_written.is_some();
    ctx.writes().record(
        &key,
        ns,
        status_written.into_iter().collect(),
        Instant::now(),
    );
    if wrote {
        // Plan again once the watches show these writes: their echo wakes this canary.
        ctx.stale(&scope, &key);
    }
    let fallback = wrote.then_some(freshness::EXPIRY + Duration::from_secs(1));
    Ok(match plan.requeue_after.into_iter().chain(fallback).min() {
        Some(d) => Requeue::requeue(d),
        None => Requeue::await_change(),
    })
}

async fn publish_events(ctx: &Context, canary: &RecordingCanary, events: &[planner::EventNote]) {
    for e in events {
        match ctx.events.publish(canary, e).await {
            Ok(()) => {}
            // A namespace being deleted refuses new objects, Events included: expected then.
            Err(kube::Error::Api(s))
                if s.code == 404 || (s.code == 403 && s.message.contains("being terminated")) =>
            {
                debug!(reason = %e.reason, "namespace is terminating; event not published");
            }
            Err(err) => warn!(error = %err, "could not publish an event"),
        }
    }
}

async fn opt_if<T>(
    cond: bool,
    f: impl Future<Output = Result<Option<T>, kube::Error>>,
) -> Result<Option<T>, kube::Error> {
    if cond { f.await } else { Ok(None) }
}

/// Errors back off exponentially per canary: from 50 ms for a lost race (replanned from the
/// caches), from 500 ms for anything else; both up to a minute. A success resets the backoff.
fn error_policy(canary: Arc<RecordingCanary>, error: &Error, ctx: Arc<Context>) -> Requeue {
    let conflict = error.is_conflict();
    if conflict {
        debug!(namespace = ?canary.namespace(), name = %canary.name_any(), %error, "write lost a race; planning again");
    } else {
        warn!(namespace = ?canary.namespace(), name = %canary.name_any(), %error, "reconcile failed; will retry");
    }
    let key = ObjectRef::from_obj(canary.as_ref());
    let min = if conflict {
        Duration::from_millis(50)
    } else {
        Duration::from_millis(500)
    };
    let delay = ctx
        .backoff
        .lock()
        .ok()
        .and_then(|mut b| {
            b.entry(key)
                .or_insert_with(|| {
                    ExponentialBuilder::default()
                        .with_min_delay(min)
                        .with_max_delay(Duration::from_secs(60))
                        .with_jitter()
                        .without_max_times()
                        .build()
                })
                .next()
        })
        .unwrap_or(Duration::from_secs(5));
    Requeue::requeue(delay)
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
    async fn a_reconcile_waiting_for_its_turn_holds_a_small_future_not_the_planning_one() {
        let ctx = Arc::new(offline_context().with_max_reconciles(1));
        let canary: RecordingCanary = serde_json::from_value(json!({
            "apiVersion": "recordingcanary.dev/v1alpha1", "kind": "RecordingCanary",
            "metadata": {"name": "c", "namespace": "shop"},
            "spec": {"targetRef": {"name": "web"}, "percent": 10},
        }))
        .unwrap();
        // kube-runtime spawns each reconcile as a task holding this future; with thousands of
        // canaries triggered at once, the ones waiting must stay small.
        let waiting = std::mem::size_of_val(&reconcile(Arc::new(canary), ctx.clone()));
        let planning = std::mem::size_of_val(&reconcile_inner("shop", "c", &ctx));
        assert!(
            waiting < 1024 && planning > 4 * waiting,
            "waiting {waiting} bytes, planning {planning} bytes"
        );
        eprintln!("reconcile future: waiting {waiting} bytes, planning {planning} bytes");
        assert_eq!(ctx.max_reconciles, 1);
    }

    #[tokio::test]
    async fn a_deleted_canary_takes_out_of_the_caches_only_what_was_its_own() {
        let ctx = offline_context();
        let (canaries, _writer) = reflector::store::<RecordingCanary>();
        let scope = Scope::new(None, canaries, mpsc::unbounded_channel().0);
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
            let scope = Arc::new(Scope::new(None, canaries, mpsc::unbounded_channel().0));
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
            on_mesh_event(&ctx, &sharded, true, &Event::Apply(o.clone()));
            on_mesh_event(&everyone, &unsharded, true, &Event::Apply(o.clone()));
            let m: MeshKey = (true, o.namespace().unwrap(), o.name_any());
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
            true,
            &Event::Apply(vs(away, "to-mine", "web")),
        );
        assert!(sharded.virtual_services.get(away, "to-mine").is_none());
        assert!(
            !sharded
                .index()
                .knows_mesh(&(true, away.to_string(), "to-mine".to_string()))
        );
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
