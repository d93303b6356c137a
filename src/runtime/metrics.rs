//! Prometheus metrics, served by the admin server at `/metrics`.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CanaryLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: String,
}

/// One API request: its verb (get, list, watch, create, update, patch, delete) and resource
/// (the plural, with `/status` for the status subresource).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub verb: String,
    pub resource: String,
}

/// The verb and resource of a request to the Kubernetes API, from its method and URL.
pub fn classify(method: &str, path: &str, query: Option<&str>) -> RequestLabels {
    // /api/v1/[namespaces/<ns>/]<resource>[/<name>[/<sub>]]
    // /apis/<group>/<version>/[namespaces/<ns>/]<resource>[/<name>[/<sub>]]
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest: &[&str] = match parts.as_slice() {
        ["api", _v, rest @ ..] => rest,
        ["apis", _g, _v, rest @ ..] => rest,
        _ => &[],
    };
    let rest = match rest {
        ["namespaces", _ns, more @ ..] if !more.is_empty() => more,
        r => r,
    };
    let (resource, named) = match rest {
        [] => (path.to_string(), false),
        [r] => (r.to_string(), false),
        [r, _name] => (r.to_string(), true),
        [r, _name, sub, ..] => (format!("{r}/{sub}"), true),
    };
    let watch = query.is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    let verb = match method {
        "GET" if watch => "watch",
        "GET" if named => "get",
        "GET" => "list",
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" if named => "delete",
        "DELETE" => "deletecollection",
        other => {
            return RequestLabels {
                verb: other.to_lowercase(),
                resource,
            };
        }
    };
    RequestLabels {
        verb: verb.into(),
        resource,
    }
}

/// The controller's metrics.
pub struct Metrics {
    registry: Registry,
    pub reconciles: Counter,
    pub errors: Family<ErrorLabels, Counter>,
    pub duration: Histogram,
    pub target_percent: Family<CanaryLabels, Gauge>,
    pub current_percent: Family<CanaryLabels, Gauge>,
    pub clone_replicas: Family<CanaryLabels, Gauge>,
    pub is_leader: Gauge,
    pub shard: Gauge,
    pub api_requests: Family<RequestLabels, Counter>,
    pub cached_objects: Family<KindLabels, Gauge>,
    /// How long after one of its writes the controller's watch showed it, by kind.
    pub echo_seconds: Family<KindLabels, Histogram, fn() -> Histogram>,
    /// Writes whose watch event did not come within the wait, by kind.
    pub echo_expired: Family<KindLabels, Counter>,
    /// How old a watch event was when it arrived (from the object's newest managedFields time,
    /// whole seconds), by kind. An estimate: a write that removes all of one manager's fields
    /// leaves no newer time.
    pub watch_lag_seconds: Family<KindLabels, Histogram, fn() -> Histogram>,
}

fn echo_histogram() -> Histogram {
    Histogram::new([0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
}

fn lag_histogram() -> Histogram {
    Histogram::new([1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0])
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("recording_canary");
        let reconciles = Counter::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration = Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ]);
        let target_percent = Family::<CanaryLabels, Gauge>::default();
        let current_percent = Family::<CanaryLabels, Gauge>::default();
        let clone_replicas = Family::<CanaryLabels, Gauge>::default();
        let is_leader = Gauge::default();
        let shard = Gauge::default();
        registry.register(
            "shard",
            "The shard this process reconciles (0 without sharding)",
            shard.clone(),
        );
        let api_requests = Family::<RequestLabels, Counter>::default();
        let cached_objects = Family::<KindLabels, Gauge>::default();
        registry.register(
            "api_requests",
            "Requests this process sent to the Kubernetes API, by verb and resource",
            api_requests.clone(),
        );
        registry.register(
            "cached_objects",
            "Objects held in the selective watch caches (Deployments, Services, pods), by kind",
            cached_objects.clone(),
        );
        let echo_seconds = Family::new_with_constructor(echo_histogram as fn() -> Histogram);
        let echo_expired = Family::<KindLabels, Counter>::default();
        let watch_lag_seconds = Family::new_with_constructor(lag_histogram as fn() -> Histogram);
        registry.register(
            "write_echo_seconds",
            "Time from one of this process's writes to its watch event, by kind",
            echo_seconds.clone(),
        );
        registry.register(
            "write_echo_expired",
            "Writes whose watch event did not come within 10 s (planned without it), by kind",
            echo_expired.clone(),
        );
        registry.register(
            "watch_lag_seconds",
            "Age of a watch event on arrival, estimated from the object's newest managedFields time (whole seconds), by kind",
            watch_lag_seconds.clone(),
        );
        registry.register(
            "reconciles",
            "Reconciles of RecordingCanaries",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by kind of error",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            duration.clone(),
        );
        registry.register(
            "target_percent",
            "spec.percent of each RecordingCanary",
            target_percent.clone(),
        );
        registry.register(
            "current_percent",
            "Share of requests the VirtualService routes to the clone",
            current_percent.clone(),
        );
        registry.register(
            "clone_replicas",
            "Replicas asked of each clone",
            clone_replicas.clone(),
        );
        registry.register(
            "leader",
            "1 while this process holds the lease",
            is_leader.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            duration,
            target_percent,
            current_percent,
            clone_replicas,
            is_leader,
            shard,
            api_requests,
            cached_objects,
            echo_seconds,
            echo_expired,
            watch_lag_seconds,
        }
    }
}

impl Metrics {
    pub fn observe(&self, took: Duration, error: Option<&'static str>) {
        self.reconciles.inc();
        self.duration.observe(took.as_secs_f64());
        if let Some(kind) = error {
            self.errors
                .get_or_create(&ErrorLabels { kind: kind.into() })
                .inc();
        }
    }

    pub fn set_canary(
        &self,
        namespace: &str,
        name: &str,
        target: i32,
        current: i32,
        replicas: i32,
    ) {
        let l = CanaryLabels {
            namespace: namespace.into(),
            name: name.into(),
        };
        self.target_percent.get_or_create(&l).set(target.into());
        self.current_percent.get_or_create(&l).set(current.into());
        self.clone_replicas.get_or_create(&l).set(replicas.into());
    }

    pub fn forget_canary(&self, namespace: &str, name: &str) {
        let l = CanaryLabels {
            namespace: namespace.into(),
            name: name.into(),
        };
        self.target_percent.remove(&l);
        self.current_percent.remove(&l);
        self.clone_replicas.remove(&l);
    }

    /// How many objects of `kind` the watch caches hold.
    pub fn cached(&self, kind: &str, n: usize) {
        self.cached_objects
            .get_or_create(&KindLabels { kind: kind.into() })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// One write of `kind` seen by its watch `after` the write.
    pub fn echo(&self, kind: &str, after: Duration) {
        self.echo_seconds
            .get_or_create(&KindLabels { kind: kind.into() })
            .observe(after.as_secs_f64());
    }

    /// One write of `kind` given up on.
    pub fn echo_expired(&self, kind: &str) {
        self.echo_expired
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    /// A watch event of `kind` that arrived `age` after its object's last recorded change.
    pub fn watch_lag(&self, kind: &str, age: Duration) {
        self.watch_lag_seconds
            .get_or_create(&KindLabels { kind: kind.into() })
            .observe(age.as_secs_f64());
    }

    /// Counts one request to the Kubernetes API.
    pub fn request(&self, method: &str, path: &str, query: Option<&str>) {
        self.api_requests
            .get_or_create(&classify(method, path, query))
            .inc();
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        static LOCK: Mutex<()> = Mutex::new(());
        let _g = LOCK.lock();
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(method: &str, path: &str, query: Option<&str>) -> (String, String) {
        let l = classify(method, path, query);
        (l.verb, l.resource)
    }

    #[test]
    fn requests_are_classified_by_verb_and_resource() {
        let s = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(c("GET", "/api/v1/pods", None), s("list", "pods"));
        assert_eq!(
            c("GET", "/api/v1/pods", Some("watch=true&resourceVersion=5")),
            s("watch", "pods")
        );
        assert_eq!(
            c("GET", "/api/v1/namespaces/shop/services/frontend", None),
            s("get", "services")
        );
        assert_eq!(
            c(
                "GET",
                "/api/v1/namespaces/shop/pods",
                Some("labelSelector=app%3Dx")
            ),
            s("list", "pods")
        );
        assert_eq!(
            c(
                "PATCH",
                "/apis/recordingcanary.dev/v1alpha1/namespaces/shop/recordingcanaries/front/status",
                None
            ),
            s("patch", "recordingcanaries/status")
        );
        assert_eq!(
            c(
                "POST",
                "/apis/networking.istio.io/v1/namespaces/shop/virtualservices",
                None
            ),
            s("create", "virtualservices")
        );
        assert_eq!(
            c(
                "DELETE",
                "/apis/apps/v1/namespaces/shop/deployments/x",
                None
            ),
            s("delete", "deployments")
        );
        assert_eq!(
            c(
                "PUT",
                "/apis/coordination.k8s.io/v1/namespaces/d/leases/l",
                None
            ),
            s("update", "leases")
        );
        assert_eq!(
            c("GET", "/api/v1/namespaces", None),
            s("list", "namespaces")
        );
        assert_eq!(
            c("GET", "/api/v1/namespaces/shop", None),
            s("get", "namespaces")
        );
    }
}
