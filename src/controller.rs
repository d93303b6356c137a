//! Controller wiring: watches, observation, and the reconcile loop around the planner.
//!
//! Watches: RecordingCanaries; Deployments and Pods as metadata only, kept in no cache, each
//! event mapped back to the canaries it concerns (so memory does not grow with unrelated
//! workloads); VirtualServices; DestinationRules (a small cache, to spot shadowing rules in other
//! namespaces). Nothing polls: a reconcile runs on a watch event, or when a wait it planned ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures::{Future, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DynamicObject, ListParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::Value;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::Error;
use crate::api::{CANARY_LABEL, RecordingCanary};
use crate::istio;
use crate::metrics::Metrics;
use crate::planner::{self, Action, Observed, Rival, meta_of_deployment};
use crate::writers;

/// Shared state of all reconciles.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub cluster_domain: String,
    /// Start of this process: waits are measured from no earlier than this.
    pub started: Timestamp,
    /// One store per watched scope (`--namespace` may be given several times).
    canaries: Mutex<Vec<Store<RecordingCanary>>>,
    destination_rules: Mutex<Vec<Store<DynamicObject>>>,
    virtual_services: Mutex<Vec<Store<DynamicObject>>>,
    backoff: Mutex<HashMap<ObjectRef<RecordingCanary>, ExponentialBackoff>>,
}

impl Context {
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        cluster_domain: &str,
        instance: Option<String>,
    ) -> Self {
        let reporter = Reporter {
            controller: "recording-canary".into(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            cluster_domain: cluster_domain.into(),
            started: Timestamp::now(),
            canaries: Mutex::new(Vec::new()),
            destination_rules: Mutex::new(Vec::new()),
            virtual_services: Mutex::new(Vec::new()),
            backoff: Mutex::new(HashMap::new()),
        }
    }

    /// Every cached RecordingCanary, across the watched scopes.
    fn cached_canaries(&self) -> Vec<Arc<RecordingCanary>> {
        all_cached(&self.canaries)
    }

    /// Every cached VirtualService, across the watched scopes.
    fn cached_virtual_services(&self) -> Vec<Arc<DynamicObject>> {
        all_cached(&self.virtual_services)
    }

    /// Every cached DestinationRule, across the watched scopes.
    fn cached_destination_rules(&self) -> Vec<Arc<DynamicObject>> {
        all_cached(&self.destination_rules)
    }
}

/// The objects of every store in `stores` (one store per watched scope).
fn all_cached<K>(stores: &Mutex<Vec<Store<K>>>) -> Vec<Arc<K>>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    stores
        .lock()
        .map(|g| g.iter().flat_map(|s| s.state()).collect())
        .unwrap_or_default()
}

/// Canaries (from the store) in `ns` for which `pick` holds.
fn canaries_in(
    store: &Store<RecordingCanary>,
    ns: &str,
    pick: impl Fn(&RecordingCanary) -> bool,
) -> Vec<ObjectRef<RecordingCanary>> {
    store
        .state()
        .iter()
        .filter(|c| c.namespace().as_deref() == Some(ns) && pick(c))
        .map(|c| ObjectRef::from_obj(c.as_ref()))
        .collect()
}

/// Runs the controller for one scope (a namespace, or all) until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let canaries: Api<RecordingCanary> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let deployments: Api<PartialObjectMeta<Deployment>> = scoped_meta(&client, &namespace);
    let pods: Api<PartialObjectMeta<Pod>> = scoped_meta(&client, &namespace);
    let services: Api<PartialObjectMeta<Service>> = scoped_meta(&client, &namespace);
    let vs_api: Api<DynamicObject> =
        scoped_dyn(&client, &namespace, &istio::virtual_service_resource());
    let dr_api: Api<DynamicObject> =
        scoped_dyn(&client, &namespace, &istio::destination_rule_resource());

    let controller = Controller::new(canaries, watcher::Config::default().any_semantic());
    let store = controller.store();
    if let Ok(mut g) = ctx.canaries.lock() {
        g.push(store.clone());
    }
    let dr_writer =
        reflector::store::Writer::<DynamicObject>::new(istio::destination_rule_resource());
    let dr_reader = dr_writer.as_reader();
    if let Ok(mut g) = ctx.destination_rules.lock() {
        g.push(dr_reader);
    }

    let s1 = store.clone();
    let deploy_stream = watcher(deployments, watcher::Config::default().any_semantic())
        .default_backoff()
        .touched_objects();
    let s2 = store.clone();
    let pod_stream = watcher(pods, watcher::Config::default().any_semantic())
        .default_backoff()
        .touched_objects();
    let s3 = store.clone();
    let vs_writer =
        reflector::store::Writer::<DynamicObject>::new(istio::virtual_service_resource());
    if let Ok(mut g) = ctx.virtual_services.lock() {
        g.push(vs_writer.as_reader());
    }
    let vs_stream = watcher(vs_api, watcher::Config::default().any_semantic())
        .modify(|o| {
            o.metadata.managed_fields = None;
        })
        .default_backoff()
        .reflect(vs_writer)
        .touched_objects();
    let s5 = store.clone();
    let service_stream = watcher(services, watcher::Config::default().any_semantic())
        .default_backoff()
        .touched_objects();
    let s4 = store.clone();
    let dr_stream = watcher(dr_api, watcher::Config::default().any_semantic())
        .modify(|o| {
            o.metadata.managed_fields = None;
        })
        .default_backoff()
        .reflect(dr_writer)
        .touched_objects();

    controller
        .watches_stream(deploy_stream, move |d| {
            let ns = d.namespace().unwrap_or_default();
            let mut refs = canaries_in(&s1, &ns, |c| c.spec.target_ref.name == d.name_any());
            if let Some(owner) = d.labels().get(CANARY_LABEL) {
                refs.push(ObjectRef::new(owner).within(&ns));
            }
            refs
        })
        .watches_stream(pod_stream, move |p| {
            let ns = p.namespace().unwrap_or_default();
            canaries_in(&s2, &ns, |c| {
                meta_of_deployment(&p.metadata, &c.spec.target_ref.name)
                    || meta_of_deployment(&p.metadata, &c.spec.clone_name())
            })
        })
        .watches_stream_with(
            vs_stream,
            move |v| {
                let ns = v.namespace().unwrap_or_default();
                let mut refs = canaries_in(&s3, &ns, |_| true);
                // A mesh VirtualService elsewhere may name a canary's host: `<service>.<ns>...`.
                let hosts: Vec<String> = v
                    .data
                    .pointer("/spec/hosts")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .map(String::from)
                            .collect()
                    })
                    .unwrap_or_default();
                refs.extend(
                    s3.state()
                        .iter()
                        .filter(|c| c.namespace().as_deref() != Some(ns.as_str()))
                        .filter(|c| {
                            let prefix = format!(
                                "{}.{}",
                                c.spec.service_name(),
                                c.namespace().unwrap_or_default()
                            );
                            hosts.iter().any(|h| h.starts_with(&prefix))
                        })
                        .map(|c| ObjectRef::from_obj(c.as_ref())),
                );
                refs
            },
            istio::virtual_service_resource(),
        )
        .watches_stream_with(
            dr_stream,
            move |d| {
                let ns = d.namespace().unwrap_or_default();
                let host = d
                    .data
                    .pointer("/spec/host")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .split('.')
                    .next()
                    .unwrap_or_default()
                    .to_string();
                let mut refs = canaries_in(&s4, &ns, |_| true);
                refs.extend(
                    s4.state()
                        .iter()
                        .filter(|c| {
                            c.spec.service_name() == host
                                && c.namespace().as_deref() != Some(ns.as_str())
                        })
                        .map(|c| ObjectRef::from_obj(c.as_ref())),
                );
                refs
            },
            istio::destination_rule_resource(),
        )
        .watches_stream(service_stream, move |svc| {
            let ns = svc.namespace().unwrap_or_default();
            canaries_in(&s5, &ns, |c| c.spec.service_name() == svc.name_any())
        })
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

fn scoped_meta<K>(client: &Client, ns: &Option<String>) -> Api<PartialObjectMeta<K>>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn scoped_dyn(
    client: &Client,
    ns: &Option<String>,
    ar: &kube::api::ApiResource,
) -> Api<DynamicObject> {
    match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, ar),
        None => Api::all_with(client.clone(), ar),
    }
}

fn to_values(objs: Vec<DynamicObject>) -> Vec<Value> {
    objs.into_iter()
        .filter_map(|o| serde_json::to_value(o).ok())
        .collect()
}

/// Observe, plan, apply, report.
async fn reconcile(trigger: Arc<RecordingCanary>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let ns = trigger.namespace().ok_or(Error::MissingNamespace)?;
    let name = trigger.name_any();
    let span = info_span!("reconcile", namespace = %ns, name = %name);
    let started = Instant::now();
    let result = reconcile_inner(&trigger, &ns, &name, &ctx)
        .instrument(span)
        .await;
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

async fn reconcile_inner(
    trigger: &RecordingCanary,
    ns: &str,
    name: &str,
    ctx: &Context,
) -> Result<Requeue, Error> {
    let client = &ctx.client;
    let canaries: Api<RecordingCanary> = Api::namespaced(client.clone(), ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let vs_api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), ns, &istio::virtual_service_resource());
    let dr_api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), ns, &istio::destination_rule_resource());

    // The names to read come from the cached canary (they are immutable), so that every read
    // goes out at once, the canary itself included: a fresh read of it, since the cache may not
    // yet hold the status this controller wrote a moment ago.
    let target_name = trigger.spec.target_ref.name.clone();
    let clone_name = trigger.spec.clone_name();
    let (canary, target, service, clone, vss, drs) = futures::try_join!(
        canaries.get_opt(name),
        opt_if(!target_name.is_empty(), deployments.get_opt(&target_name)),
        services.get_opt(trigger.spec.service_name()),
        deployments.get_opt(&clone_name),
        list_or_empty(&vs_api),
        list_or_empty(&dr_api),
    )?;
    let Some(canary) = canary else {
        ctx.metrics.forget_canary(ns, name);
        return Ok(Requeue::await_change());
    };
    if canary.spec.target_ref != trigger.spec.target_ref
        || canary.spec.service_name() != trigger.spec.service_name()
    {
        // Changed under us (only possible without the CRD's immutability rules): read again.
        return Ok(Requeue::requeue(Duration::from_millis(50)));
    }
    // Pods by the Service's selector (which also shows other workloads behind the Service),
    // else by the target's.
    let service_selector = service
        .as_ref()
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.selector.clone())
        .unwrap_or_default();
    let target_selector = target
        .as_ref()
        .and_then(|t| t.spec.as_ref())
        .and_then(|s| s.selector.match_labels.clone())
        .unwrap_or_default();
    let selector = if service_selector.is_empty() {
        &target_selector
    } else {
        &service_selector
    };
    let selector = selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods = pods_api
        .list(&ListParams::default().labels(&selector))
        .await?
        .items;

    // DestinationRules elsewhere matter only when they name this Service's host.
    let service_name = canary.spec.service_name();
    let mut destination_rules = to_values(drs);
    destination_rules.extend(
        ctx.cached_destination_rules()
            .iter()
            .filter(|d| d.namespace().as_deref() != Some(ns))
            .filter(|d| {
                d.data
                    .pointer("/spec/host")
                    .and_then(Value::as_str)
                    .and_then(|h| h.split('.').next())
                    == Some(service_name)
            })
            .filter_map(|d| serde_json::to_value(d.as_ref()).ok()),
    );
    let mut virtual_services = to_values(vss);
    let host_prefix = format!("{service_name}.{ns}");
    virtual_services.extend(
        ctx.cached_virtual_services()
            .iter()
            .filter(|v| v.namespace().as_deref() != Some(ns))
            .filter(|v| {
                v.data
                    .pointer("/spec/hosts")
                    .and_then(Value::as_array)
                    .is_some_and(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .any(|h| h.starts_with(&host_prefix))
                    })
            })
            .filter_map(|v| serde_json::to_value(v.as_ref()).ok()),
    );
    let rivals: Vec<Rival> = ctx
        .cached_canaries()
        .iter()
        .filter(|c| c.namespace().as_deref() == Some(ns) && c.name_any() != name)
        .map(|c| Rival {
            name: c.name_any(),
            created: c.metadata.creation_timestamp.as_ref().map(|t| t.0),
            target: c.spec.target_ref.name.clone(),
            service: c.spec.service_name().to_string(),
            deleting: c.metadata.deletion_timestamp.is_some(),
        })
        .collect();

    let observed = Observed {
        canary: &canary,
        now: Timestamp::now(),
        started: ctx.started,
        cluster_domain: &ctx.cluster_domain,
        target: target.as_ref(),
        service_exists: service.is_some(),
        service_selector,
        clone: clone.as_ref(),
        pods: &pods,
        virtual_services: &virtual_services,
        destination_rules: &destination_rules,
        rivals: &rivals,
    };
    let plan = planner::plan(&observed);
    if !plan.actions.is_empty() {
        info!(actions = plan.actions.len(), phase = ?plan.status.phase, percent = plan.status.current_percent, "applying plan");
    }
    writers::apply(client, &canary, &plan.actions).await?;
    let reference = canary.object_ref(&());
    for e in &plan.events {
        let ev = Event {
            type_: if e.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: e.reason.clone(),
            note: Some(e.note.clone()),
            // Events are aggregated by (reason, action): an action naming what was done keeps
            // "weight 10 -> 25" and "weight 25 -> 50" apart.
            action: e.note.chars().take(128).collect(),
            secondary: None,
        };
        match ctx.recorder.publish(&ev, &reference).await {
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
    let finished = plan
        .actions
        .iter()
        .any(|a| matches!(a, Action::RemoveFinalizer));
    if finished {
        ctx.metrics.forget_canary(ns, name);
    } else {
        // The waits run from when the dependent write completed, not from when it was planned
        // (the planned time, recorded before the write, only covers a crash in between).
        let mut status = plan.status.clone();
        let prev = canary.status.clone().unwrap_or_default();
        let done = Some(Timestamp::now().to_string());
        if status.subsets_added_time != prev.subsets_added_time {
            status.subsets_added_time = done.clone();
        }
        if status.routes_removed_time != prev.routes_removed_time {
            status.routes_removed_time = done;
        }
        writers::write_status(client, &canary, &status).await?;
        ctx.metrics.set_canary(
            ns,
            name,
            canary.spec.percent,
            plan.status.current_percent,
            plan.status.clone_replicas,
        );
    }
    Ok(match plan.requeue_after {
        Some(d) => Requeue::requeue(d),
        None => Requeue::await_change(),
    })
}

async fn opt_if<T>(
    cond: bool,
    f: impl Future<Output = Result<Option<T>, kube::Error>>,
) -> Result<Option<T>, kube::Error> {
    if cond { f.await } else { Ok(None) }
}

/// Lists a namespace's objects of an Istio kind; a cluster without the CRD yields none.
async fn list_or_empty(api: &Api<DynamicObject>) -> Result<Vec<DynamicObject>, kube::Error> {
    match api.list(&ListParams::default()).await {
        Ok(l) => Ok(l.items),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Errors back off exponentially per canary: from 50 ms for a lost race (replanned from fresh
/// state), from 500 ms for anything else; both up to a minute. A success resets the backoff.
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
