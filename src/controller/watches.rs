//! The watch streams: each starts once the canaries are known, trims its objects as they arrive,
//! measures its lag, and hands every event to a trigger function that maps it to canaries.

use super::*;

pub(super) fn mesh_resource(kind: MeshKind) -> ApiResource {
    kind.api_resource()
}

pub(super) fn scoped<K>(client: &Client, ns: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

pub(super) fn scoped_dyn(
    client: &Client,
    ns: &Option<String>,
    ar: &ApiResource,
) -> Api<MeshObject> {
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
pub(super) fn gated<K, G>(
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
pub(super) fn with_echo(
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
pub(super) fn of_shard<K: Resource>(shard: &Shard, ev: &Event<K>) -> bool {
    event_object(ev)
        .is_none_or(|(o, _)| shard.owns(o.meta().namespace.as_deref().unwrap_or_default()))
}

pub(super) fn event_object<K>(ev: &Event<K>) -> Option<(&K, bool)> {
    match ev {
        Event::Apply(o) | Event::InitApply(o) => Some((o, false)),
        Event::Delete(o) => Some((o, true)),
        Event::Init | Event::InitDone => None,
    }
}

pub(super) fn log_watch_error(kind: &str, e: &watcher::Error) {
    warn!(kind, error = %e, "watch failed; retrying with backoff");
}

/// The canaries to reconcile for each event of a watch: `strip` trims each object, `handle`
/// updates the caches and maps the event through the index.
pub(super) fn triggers_of<K: Resource + Send + 'static>(
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
pub(super) fn observe_lag<K: Resource>(ctx: &Context, kind: &str, ev: &Event<K>) {
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

pub(super) fn modify<K>(ev: &mut Event<K>, f: impl Fn(&mut K)) {
    match ev {
        Event::Apply(o) | Event::InitApply(o) | Event::Delete(o) => f(o),
        Event::Init | Event::InitDone => {}
    }
}

/// The RecordingCanary watch: the store and the index follow it; another shard's canaries are
/// not kept (its own process plans them); the echo of our own status writes wakes nobody.
pub(super) fn canary_stream(
    ctx: &Arc<Context>,
    scope: &Arc<Scope>,
    mut writer: reflector::store::Writer<RecordingCanary>,
) -> impl futures::Stream<Item = Result<RecordingCanary, watcher::Error>> + Send + 'static {
    let api: Api<RecordingCanary> = scoped(&ctx.client, &scope.namespace);
    let (c, s) = (ctx.clone(), scope.clone());
    watcher(api, watcher::Config::default().any_semantic())
        .default_backoff()
        .map_ok(move |mut ev| {
            observe_lag(&c, "RecordingCanary", &ev);
            modify(&mut ev, |c: &mut RecordingCanary| {
                c.metadata.managed_fields = None
            });
            if of_shard(&c.shard, &ev) {
                writer.apply_watcher_event(&ev);
            }
            let out = on_canary_event(&c, &s, &ev);
            if matches!(ev, Event::InitDone) {
                s.canaries_listed.send_replace(true);
            }
            stream::iter(out.into_iter().map(Ok::<_, watcher::Error>))
        })
        .try_flatten()
}

/// Resolves once the canaries, and so the index, are listed (the gate of most watches).
pub(super) fn canaries_known(scope: &Arc<Scope>) -> impl Future<Output = ()> + Send + 'static {
    let s = scope.clone();
    async move {
        let _ = s.canaries_listed.subscribe().wait_for(|l| *l).await;
        s.index_mut().watches_started();
    }
}

/// Resolves once the canaries and their Services' selectors are known (the gate of the pods).
pub(super) fn selectors_known(scope: &Arc<Scope>) -> impl Future<Output = ()> + Send + 'static {
    let (known, s) = (canaries_known(scope), scope.clone());
    async move {
        known.await;
        s.services.wait_until_ready().await;
        s.index_mut().pods_watch_started();
    }
}

/// The watch of one compact kind (`K`: a facts type), gated, trimmed by `strip`, each event
/// mapped to canaries by `handle`.
pub(super) fn facts_watch<K>(
    ctx: &Arc<Context>,
    scope: &Arc<Scope>,
    gate: impl Future<Output = ()> + Send + 'static,
    kind: &'static str,
    strip: fn(&mut K),
    handle: fn(&Context, &Scope, &Event<K>) -> Vec<ObjectRef<RecordingCanary>>,
) -> BoxStream<'static, ObjectRef<RecordingCanary>>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    let api = scoped::<K>(&ctx.client, &scope.namespace);
    let (c, s) = (ctx.clone(), scope.clone());
    triggers_of(
        ctx,
        gated(gate, api, watcher::Config::default()),
        kind,
        strip,
        move |ev: &Event<K>| handle(&c, &s, ev),
    )
}

/// The watch of a routing kind (VirtualServices, DestinationRules, HTTPRoutes). A revision that differs from the cached
/// one only in what the caches drop (istiod's progress messages, say) changes nothing the
/// planner reads: it only refreshes the cache (and may be an echo of our own write).
pub(super) fn mesh_watch(
    ctx: &Arc<Context>,
    scope: &Arc<Scope>,
    mesh: MeshKind,
) -> BoxStream<'static, ObjectRef<RecordingCanary>> {
    let (c, s) = (ctx.clone(), scope.clone());
    let api = scoped_dyn(&ctx.client, &scope.namespace, &mesh_resource(mesh));
    let kind = mesh.name();
    let mut listed = false;
    triggers_of(
        ctx,
        gated(
            canaries_known(scope),
            api,
            watcher::Config::default().any_semantic(),
        ),
        kind,
        strip_mesh,
        move |ev: &Event<MeshObject>| {
            let store = s.mesh_store(mesh);
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
                    with_echo(&c, Kind::from(mesh), &o.metadata, false, Vec::new)
                }
                _ => on_mesh_event(&c, &s, mesh, ev),
            };
            c.metrics.cached(kind, store.len());
            if matches!(ev, Event::InitDone) && !listed {
                listed = true;
                s.mesh_listed.done();
            }
            out
        },
    )
}

/// Triggers sent by other scopes (a VirtualService elsewhere naming a host here).
pub(super) fn from_other_scopes(
    rx: mpsc::UnboundedReceiver<ObjectRef<RecordingCanary>>,
) -> BoxStream<'static, ObjectRef<RecordingCanary>> {
    stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|t| (t, rx)) }).boxed()
}
