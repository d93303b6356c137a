//! From each watch event to the canaries it concerns: the caches keep what some canary needs,
//! the index learns what each object refers to, and the echo of this controller's own writes
//! wakes only a canary waiting for it.

use super::*;

pub(super) fn canary_ref(k: &CanaryKey) -> ObjectRef<RecordingCanary> {
    ObjectRef::new(&k.1).within(&k.0)
}

pub(super) fn key_of_canary(c: &RecordingCanary) -> CanaryKey {
    (c.namespace().unwrap_or_default(), c.name_any())
}

/// Every canary of a scope: after a re-list, objects may have gone unseen.
pub(super) fn all_canaries(scope: &Scope) -> Vec<ObjectRef<RecordingCanary>> {
    scope.index().keys().map(canary_ref).collect()
}

pub(super) fn on_canary_event(
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

pub(super) fn forget_canary(ctx: &Context, scope: &Scope, k: &CanaryKey) {
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

pub(super) fn on_deployment_event(
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

pub(super) fn on_service_event(
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
pub(super) fn on_endpoint_slice_event(
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

pub(super) fn on_pod_event(
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
pub(super) fn on_mesh_event(
    ctx: &Context,
    scope: &Scope,
    mesh: MeshKind,
    ev: &Event<MeshObject>,
) -> Vec<ObjectRef<RecordingCanary>> {
    let Some((obj, deleted)) = event_object(ev) else {
        scope.mesh_store(mesh).apply(ev, |_| true);
        return if matches!(ev, Event::InitDone) {
            all_canaries(scope)
        } else {
            Vec::new()
        };
    };
    let m: MeshKey = (mesh, obj.namespace().unwrap_or_default(), obj.name_any());
    let spec = obj.spec();
    let refs = MeshRefs::of(&obj.metadata, &spec, mesh, &ctx.cluster_domain);
    let kept = concerns_shard(&ctx.shard, &m.1, &refs);
    scope.mesh_store(mesh).apply(ev, |_| kept);
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
    with_echo(ctx, Kind::from(mesh), &obj.metadata, deleted, || mine)
}

/// Whether a VirtualService or DestinationRule in namespace `ns` may concern the canaries of
/// `shard`: it is in one of the shard's namespaces, a host it names resolves to a Service in
/// one, it carries a restore note (a split to undo), or it is a DestinationRule for a wildcard
/// host (from the root namespace it applies everywhere). Without sharding, every one.
pub(super) fn concerns_shard(shard: &Shard, ns: &str, refs: &MeshRefs) -> bool {
    shard.owns(ns)
        || refs.services.iter().any(|(svc_ns, _)| shard.owns(svc_ns))
        || refs.note.is_some()
        || refs.wildcard.is_some()
}
