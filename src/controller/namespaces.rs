//! What the controller keeps of namespaces: Istio's ambient labels (`istio.io/dataplane-mode`,
//! `istio.io/use-waypoint`), from a metadata-only watch of every namespace (they are few), so
//! that the router choice and the Gateway API router's checks need no read per canary. Watched
//! only where this process may list namespaces (a namespaced install may not): without it, no
//! namespace counts as ambient.

use super::*;
use kube::core::PartialObjectMeta;

/// `Api<PartialObjectMeta<_>>` asks for metadata only (lists and watches).
type NamespaceMeta = PartialObjectMeta<k8s_openapi::api::core::v1::Namespace>;

/// The ambient labels of one namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceFacts {
    /// `istio.io/dataplane-mode: ambient`.
    pub ambient: bool,
    /// `istio.io/use-waypoint`: the waypoint of the namespace's Services.
    pub use_waypoint: Option<String>,
}

impl NamespaceFacts {
    fn of(labels: Option<&std::collections::BTreeMap<String, String>>) -> Self {
        let get = |k: &str| labels.and_then(|l| l.get(k)).cloned();
        Self {
            ambient: get("istio.io/dataplane-mode").as_deref() == Some("ambient"),
            use_waypoint: get(crate::facts::services::USE_WAYPOINT_LABEL),
        }
    }
}

/// Whether this process may read the namespaces it reconciles (`scopes`; empty: all of them),
/// asked once at start: a cluster-wide install lists them, a namespaced one (whose chart grants
/// `get`/`list`/`watch` on its namespaces by name only) reads the first.
pub async fn may_watch(client: &Client, scopes: &[String]) -> bool {
    let api: Api<NamespaceMeta> = Api::all(client.clone());
    let r = match scopes.first() {
        None => api.list(&ListParams::default().limit(1)).await.map(|_| ()),
        Some(ns) => api.get(ns).await.map(|_| ()),
    };
    match r {
        Ok(()) => true,
        Err(e) => {
            warn!(error = %e, "namespaces cannot be read (RBAC?): ambient mode is not detected");
            false
        }
    }
}

/// Keeps `ctx`'s namespace facts up to date until the process stops (one watch of every
/// namespace, or one per namespace in `scopes`, by name); a change wakes the canaries of that
/// namespace.
pub async fn watch(ctx: Arc<Context>, scopes: Vec<String>) {
    let configs: Vec<watcher::Config> = if scopes.is_empty() {
        vec![watcher::Config::default()]
    } else {
        scopes
            .iter()
            .map(|ns| watcher::Config::default().fields(&format!("metadata.name={ns}")))
            .collect()
    };
    let streams = configs.into_iter().map(|config| {
        watcher(Api::<NamespaceMeta>::all(ctx.client.clone()), config)
            .default_backoff()
            .boxed()
    });
    let mut stream = futures::stream::select_all(streams);
    while let Some(ev) = stream.next().await {
        let (meta, deleted) = match ev {
            Ok(Event::Apply(o)) | Ok(Event::InitApply(o)) => (o.metadata, false),
            Ok(Event::Delete(o)) => (o.metadata, true),
            Ok(_) => continue,
            Err(e) => {
                log_watch_error("Namespace", &e);
                continue;
            }
        };
        seen(&ctx, meta, deleted);
    }
}

/// Records a namespace's labels; wakes its canaries when they changed.
fn seen(ctx: &Context, meta: kube::api::ObjectMeta, deleted: bool) {
    let name = meta.name.clone().unwrap_or_default();
    let facts = (!deleted).then(|| NamespaceFacts::of(meta.labels.as_ref()));
    let changed = match ctx.namespaces.write() {
        Ok(mut m) => match facts {
            Some(f) => m.insert(name.clone(), f.clone()) != Some(f),
            None => m.remove(&name).is_some(),
        },
        Err(_) => false,
    };
    if !changed {
        return;
    }
    for scope in ctx.scopes() {
        let keys: Vec<CanaryKey> = scope
            .index()
            .keys()
            .filter(|k| k.0 == name)
            .cloned()
            .collect();
        for k in keys {
            let _ = scope.triggers.send(canary_ref(&k));
        }
    }
}

impl Context {
    /// The ambient labels of namespace `ns` (none known: not ambient).
    pub fn namespace(&self, ns: &str) -> NamespaceFacts {
        self.namespaces
            .read()
            .ok()
            .and_then(|m| m.get(ns).cloned())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_is_ambient_only_with_the_dataplane_mode_label() {
        let labels = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        let f = NamespaceFacts::of(Some(&labels(&[
            ("istio.io/dataplane-mode", "ambient"),
            ("istio.io/use-waypoint", "waypoint"),
        ])));
        assert!(f.ambient);
        assert_eq!(f.use_waypoint.as_deref(), Some("waypoint"));
        assert!(!NamespaceFacts::of(Some(&labels(&[("istio-injection", "enabled")]))).ambient);
        assert_eq!(NamespaceFacts::of(None), NamespaceFacts::default());
    }
}
