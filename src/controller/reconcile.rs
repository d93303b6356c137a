//! The reconcile, one call per phase: gate (lease, shard, caches listed, own writes seen),
//! observe, plan, apply (each write fenced), report (Events, status, metrics), requeue.

use super::*;

/// Observe, plan, apply, report.
pub(super) async fn reconcile(
    trigger: Arc<RecordingCanary>,
    ctx: Arc<Context>,
) -> Result<Requeue, Error> {
    let ns = trigger.namespace().ok_or(Error::MissingNamespace)?;
    let name = trigger.name_any();
    let span = info_span!("reconcile", namespace = %ns, name = %name);
    let turn = ctx.reconciles.take(turns::Lane::Traffic).await;
    let started = Instant::now();
    // Boxed: the planning future is large, and a reconcile that waits for its turn above (one
    // of another scope's, say) should not hold it meanwhile. A panic (a bug) is caught here:
    // kube-runtime would re-raise it and end every canary's controller with it; caught, this
    // canary backs off and says so (an error log, the `panic` error metric, a Warning Event),
    // and the others go on.
    let inner = Box::pin(reconcile_inner(&ns, &name, &ctx, turn).instrument(span));
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

/// One reconcile: each phase is its own function. `turn` (a traffic turn) is held to observe,
/// plan and apply; once the plan wrote something it is exchanged for a report turn. Each half
/// runs boxed, so that a reconcile waiting for its report turn holds only what it reports.
pub(super) async fn reconcile_inner(
    ns: &str,
    name: &str,
    ctx: &Context,
    turn: turns::Turn,
) -> Result<Requeue, Error> {
    let done = match Box::pin(plan_and_apply(ns, name, ctx)).await? {
        Planned::Later(requeue) => return Ok(requeue),
        Planned::Applied(done) => done,
    };
    // Its writes are made: canaries waiting to make theirs go before this report. A canary
    // whose finalizer came off is gone: its last Events go out at once.
    let _turn = if done.wrote && !done.finalized {
        drop(turn);
        ctx.reconciles.take(turns::Lane::Report).await
    } else {
        turn
    };
    Box::pin(report_and_next(ctx, done)).await
}

/// What the first half of a reconcile decided.
pub(super) enum Planned {
    /// Nothing to report: come back as this says.
    Later(Requeue),
    /// The plan was applied; its report is next.
    Applied(Box<ToReport>),
}

/// What a reconcile keeps from its writes to its report (it may wait for a turn in between).
pub(super) struct ToReport {
    scope: Arc<Scope>,
    canary: Arc<RecordingCanary>,
    status: crate::api::RecordingCanaryStatus,
    events: Vec<planner::EventNote>,
    requeue_after: Option<Duration>,
    /// The plan took the finalizer off: the canary is gone, and so is its status.
    finalized: bool,
    /// The plan's status is transient and its own writes plan again at once: that plan reports.
    transient: bool,
    /// The status holds until then ([`planner::Plan::status_holds_until`]).
    holds_until: Option<Timestamp>,
    /// Whether the plan wrote anything.
    wrote: bool,
    /// The canary's resourceVersion after the writes.
    rv: Option<String>,
}

/// Gate, observe, plan, apply.
pub(super) async fn plan_and_apply(ns: &str, name: &str, ctx: &Context) -> Result<Planned, Error> {
    let (scope, canary) = match gate(ns, name, ctx).await {
        Gate::Go(scope, canary) => (scope, canary),
        Gate::Later(requeue) => return Ok(Planned::Later(requeue)),
    };
    // Failpoint (tests only): a bug in planning this canary.
    fail::fail_point!("reconcile");
    let snap = observe(ctx, &scope, &canary).await?;
    let plan = planner::plan(&snap.observed(ctx, &canary));
    drop(snap);
    if !plan.actions.is_empty() {
        info!(actions = plan.actions.len(), phase = ?plan.status.phase, percent = plan.status.current_percent, "applying plan");
    }
    if !ctx.fence.may_write() {
        warn!("the lease is not fresh; writing nothing");
        return Ok(Planned::Later(Requeue::requeue(Duration::from_secs(1))));
    }
    let applied = apply(ctx, &scope, &canary, &plan).await?;
    let finalized = plan
        .actions
        .iter()
        .any(|a| matches!(a, Action::RemoveFinalizer));
    let transient = plan.transient_status && !plan.actions.is_empty();
    Ok(Planned::Applied(Box::new(ToReport {
        scope,
        canary,
        status: plan.status,
        events: plan.events,
        requeue_after: plan.requeue_after,
        finalized,
        transient,
        holds_until: plan.status_holds_until,
        wrote: applied.wrote,
        rv: applied.rv,
    })))
}

/// Report, then say when to come back.
async fn report_and_next(ctx: &Context, done: Box<ToReport>) -> Result<Requeue, Error> {
    let wrote_status = report(ctx, &done).await?;
    Ok(next(
        ctx,
        &done.scope,
        &done.canary,
        done.requeue_after,
        done.wrote || wrote_status,
    ))
}

/// What the gate decided.
enum Gate {
    /// Plan this canary now, from this scope's caches.
    Go(Arc<Scope>, Arc<RecordingCanary>),
    /// Not now: come back as this says.
    Later(Requeue),
}

/// Gate: plan only while leading, for this shard's canaries, from caches that have listed once and
/// show this controller's own last writes.
async fn gate(ns: &str, name: &str, ctx: &Context) -> Gate {
    // A standby waits here with warm caches, and plans as soon as it leads.
    ctx.fence.until_leading().await;
    let Some(scope) = ctx.scope_for(ns) else {
        return Gate::Later(Requeue::await_change());
    };
    // Another shard's canary: its own process plans it (the canary watch sees every canary).
    if !ctx.shard.owns(ns) {
        debug!("another shard's canary");
        return Gate::Later(Requeue::await_change());
    }
    // Plan nothing before every cache has listed once; bounded, so that a shutdown never waits
    // on a watch that cannot list.
    if !scope.ready()
        && tokio::time::timeout(Duration::from_secs(5), scope.wait_until_ready())
            .await
            .is_err()
    {
        debug!("the watch caches have not listed yet");
        return Gate::Later(Requeue::requeue(Duration::from_secs(1)));
    }
    // Plan only from caches that show this controller's own last writes.
    if ctx.stale(&scope, &key_of(ns, name)) {
        debug!("waiting for the watches to show this controller's last writes");
        return Gate::Later(Requeue::requeue(freshness::EXPIRY + Duration::from_secs(1)));
    }
    match scope.canaries.get(&ObjectRef::new(name).within(ns)) {
        Some(canary) => Gate::Go(scope, canary),
        None => Gate::Later(Requeue::await_change()),
    }
}

fn key_of(ns: &str, name: &str) -> CanaryKey {
    (ns.to_string(), name.to_string())
}

/// Observe: read once what the caches may lack for this canary, then take its snapshot.
async fn observe(
    ctx: &Context,
    scope: &Scope,
    canary: &RecordingCanary,
) -> Result<Snapshot, Error> {
    let (ns, name) = (canary.namespace().unwrap_or_default(), canary.name_any());
    let prime_needed = scope
        .index()
        .get(&ns, &name)
        .map(|e| e.prime)
        .unwrap_or_default();
    if prime_needed.any() {
        prime(ctx, scope, canary, prime_needed).await?;
    }
    Ok(Snapshot::take(ctx, scope, canary))
}

/// What [`apply`] did.
struct Applied {
    /// Whether anything was written.
    wrote: bool,
    /// The canary's resourceVersion after the writes.
    rv: Option<String>,
}

/// Apply: the plan's writes, in order, each one fenced; what they left behind is recorded for
/// read-your-writes. A write that lost a race has the canary's objects read again; one that was
/// refused is said in a Warning Event.
async fn apply(
    ctx: &Context,
    scope: &Scope,
    canary: &RecordingCanary,
    plan: &planner::Plan,
) -> Result<Applied, Error> {
    let (ns, name) = (canary.namespace().unwrap_or_default(), canary.name_any());
    let mut written: Vec<Written> = Vec::new();
    let applied =
        writers::apply(&ctx.client, &ctx.fence, canary, &plan.actions, &mut written).await;
    let done = Applied {
        wrote: !written.is_empty(),
        rv: writers::canary_rv(canary, &written),
    };
    ctx.writes()
        .record(&key_of(&ns, &name), &ns, written, Instant::now());
    match applied {
        Ok(()) => Ok(done),
        Err(e) => {
            if e.is_conflict() {
                // Something differs from what the caches showed: read the objects again.
                scope.index_mut().reprime(&ns, &name);
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
                publish_events(ctx, canary, std::slice::from_ref(&note)).await;
            }
            Err(e)
        }
    }
}

/// Report: the plan's Events, the status (guarded by the canary's resourceVersion after the
/// writes, the wait marks stamped with when their writes completed) and the canary's metrics.
/// Whether a status was written.
async fn report(ctx: &Context, done: &ToReport) -> Result<bool, Error> {
    let canary = done.canary.as_ref();
    if done.holds_until.is_some_and(|t| Timestamp::now() >= t) {
        // It waited for its turn past the grace its Ready was planned in: written now, it
        // would say Ready where the mesh has not accepted the routes. The next plan (the
        // writes' echo, or the requeue, wakes it) reports what holds then, with its Event.
        let mut events = done.events.clone();
        planner::drop_ready_event(&done.status, &mut events);
        publish_events(ctx, canary, &events).await;
        return Ok(false);
    }
    publish_events(ctx, canary, &done.events).await;
    if done.finalized || done.transient {
        return Ok(false);
    }
    let (ns, name) = (canary.namespace().unwrap_or_default(), canary.name_any());
    // The waits run from when the dependent write completed, not from when it was planned.
    let mut status = done.status.clone();
    let prev = canary.status.clone().unwrap_or_default();
    let at = Some(Timestamp::now().to_string());
    if status.subsets_added_time != prev.subsets_added_time {
        status.subsets_added_time = at.clone();
    }
    if status.routes_removed_time != prev.routes_removed_time {
        status.routes_removed_time = at;
    }
    let written =
        writers::write_status(&ctx.client, &ctx.fence, canary, &status, done.rv.clone()).await?;
    ctx.metrics
        .set_canary(&ns, &name, canary.spec.percent, &status);
    let wrote = written.is_some();
    ctx.writes().record(
        &key_of(&ns, &name),
        &ns,
        written.into_iter().collect(),
        Instant::now(),
    );
    Ok(wrote)
}

/// When to plan this canary again: once the watches show this reconcile's writes (their echo
/// wakes it; at the latest after the echo expiry), when the plan's wait ends, or on a change.
fn next(
    ctx: &Context,
    scope: &Scope,
    canary: &RecordingCanary,
    requeue_after: Option<Duration>,
    wrote: bool,
) -> Requeue {
    let key = key_of(&canary.namespace().unwrap_or_default(), &canary.name_any());
    if wrote {
        // Plan again once the watches show these writes: their echo wakes this canary.
        ctx.stale(scope, &key);
    }
    let fallback = wrote.then_some(freshness::EXPIRY + Duration::from_secs(1));
    match requeue_after.into_iter().chain(fallback).min() {
        Some(d) => Requeue::requeue(d),
        None => Requeue::await_change(),
    }
}

pub(super) async fn publish_events(
    ctx: &Context,
    canary: &RecordingCanary,
    events: &[planner::EventNote],
) {
    let (ns, name) = (canary.namespace().unwrap_or_default(), canary.name_any());
    for e in events {
        // Counted by reason (`WriteRefused`, `TrafficDrained`) whether or not the Event gets
        // through: the alerts on them should not depend on the events API.
        ctx.metrics.canary_event(&ns, &name, &e.reason);
        match ctx.events.publish(canary, e).await {
            Ok(()) => {}
            // A namespace being deleted refuses new objects, Events included: expected then.
            Err(kube::Error::Api(s))
                if api_errors::not_found(&s) || api_errors::namespace_terminating(&s) =>
            {
                debug!(reason = %e.reason, "namespace is terminating; event not published");
            }
            Err(err) => warn!(error = %err, "could not publish an event"),
        }
    }
}

/// Errors back off exponentially per canary: from 50 ms for a lost race (replanned from the
/// caches), from 500 ms for anything else; both up to a minute. A success resets the backoff.
pub(super) fn error_policy(
    canary: Arc<RecordingCanary>,
    error: &Error,
    ctx: Arc<Context>,
) -> Requeue {
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
