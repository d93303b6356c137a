//! Prometheus metrics, served by the admin server at `/metrics`.

use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::api::RecordingCanaryStatus;
use crate::api::status::Phase;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CanaryLabels {
    pub namespace: String,
    pub name: String,
}

/// One canary and one of its possible phases.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub namespace: String,
    pub name: String,
    pub phase: String,
}

/// Every phase, each with a series of its own per canary: an alert on `phase="Blocked" == 1`
/// then sees the series go to 0, not vanish, when the canary leaves the phase.
const PHASES: [Phase; 6] = [
    Phase::Progressing,
    Phase::Ready,
    Phase::Degraded,
    Phase::Blocked,
    Phase::Terminating,
    Phase::Completed,
];

/// The place of `phase` in [`PHASES`]: exhaustive, so that a new phase fails to compile here
/// until it has its series.
const fn phase_index(phase: Phase) -> usize {
    match phase {
        Phase::Progressing => 0,
        Phase::Ready => 1,
        Phase::Degraded => 2,
        Phase::Blocked => 3,
        Phase::Terminating => 4,
        Phase::Completed => 5,
    }
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

fn canary_labels(namespace: &str, name: &str) -> CanaryLabels {
    CanaryLabels {
        namespace: namespace.into(),
        name: name.into(),
    }
}

fn phase_labels(namespace: &str, name: &str, phase: Phase) -> PhaseLabels {
    PhaseLabels {
        namespace: namespace.into(),
        name: name.into(),
        phase: phase.as_str().into(),
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
    /// 1 for each canary's current phase, 0 for the others.
    pub phase: Family<PhaseLabels, Gauge>,
    /// `status.recordingEndTime` in Unix seconds, while a canary has one.
    pub recording_end: Family<CanaryLabels, Gauge>,
    /// `WriteRefused` Events: writes the API server refused (admission, RBAC, validation).
    pub writes_refused: Family<CanaryLabels, Counter>,
    /// `TrafficDrained` Events: a sick clone's weight put to 0.
    pub traffic_drained: Family<CanaryLabels, Counter>,
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
        let phase = Family::<PhaseLabels, Gauge>::default();
        let recording_end = Family::<CanaryLabels, Gauge>::default();
        let writes_refused = Family::<CanaryLabels, Counter>::default();
        let traffic_drained = Family::<CanaryLabels, Counter>::default();
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
            "phase",
            "1 for the phase of each RecordingCanary, 0 for the other phases",
            phase.clone(),
        );
        registry.register(
            "recording_end_timestamp_seconds",
            "status.recordingEndTime of each RecordingCanary with a spec.duration, in Unix seconds",
            recording_end.clone(),
        );
        registry.register(
            "writes_refused",
            "Writes for each RecordingCanary that the API server refused (its WriteRefused Events)",
            writes_refused.clone(),
        );
        registry.register(
            "traffic_drained",
            "Times a sick clone's weight was put to 0 (the TrafficDrained Events of each RecordingCanary)",
            traffic_drained.clone(),
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
            phase,
            recording_end,
            writes_refused,
            traffic_drained,
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

    /// A canary's series from the status just written: `percent` is its `spec.percent`.
    pub fn set_canary(
        &self,
        namespace: &str,
        name: &str,
        percent: i32,
        status: &RecordingCanaryStatus,
    ) {
        let l = canary_labels(namespace, name);
        self.target_percent.get_or_create(&l).set(percent.into());
        self.current_percent
            .get_or_create(&l)
            .set(status.current_percent.into());
        self.clone_replicas
            .get_or_create(&l)
            .set(status.clone_replicas.into());
        // The counters exist from the first report, at 0: `increase()` sees no rise on a series
        // that first appears at 1, so without this an alert would miss a canary's first drain.
        let _ = self.writes_refused.get_or_create(&l);
        let _ = self.traffic_drained.get_or_create(&l);
        let current = status.phase.map(phase_index);
        for (i, p) in PHASES.iter().enumerate() {
            self.phase
                .get_or_create(&phase_labels(namespace, name, *p))
                .set(i64::from(current == Some(i)));
        }
        // Absent or unreadable: no series, so that `end - time()` never compares against 0.
        let end = status
            .recording_end_time
            .as_deref()
            .and_then(|t| t.parse::<Timestamp>().ok());
        match end {
            Some(t) => {
                self.recording_end.get_or_create(&l).set(t.as_second());
            }
            None => {
                self.recording_end.remove(&l);
            }
        }
    }

    /// One Event published about a canary: those with a counter of their own are counted.
    pub fn canary_event(&self, namespace: &str, name: &str, reason: &str) {
        let counter = match reason {
            "WriteRefused" => &self.writes_refused,
            "TrafficDrained" => &self.traffic_drained,
            _ => return,
        };
        counter.get_or_create(&canary_labels(namespace, name)).inc();
    }

    /// Removes every series of a canary that is gone.
    pub fn forget_canary(&self, namespace: &str, name: &str) {
        let l = canary_labels(namespace, name);
        self.target_percent.remove(&l);
        self.current_percent.remove(&l);
        self.clone_replicas.remove(&l);
        self.recording_end.remove(&l);
        self.writes_refused.remove(&l);
        self.traffic_drained.remove(&l);
        for p in PHASES {
            self.phase.remove(&phase_labels(namespace, name, p));
        }
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

    fn status(phase: Option<Phase>, end: Option<&str>) -> RecordingCanaryStatus {
        RecordingCanaryStatus {
            phase,
            current_percent: 10,
            clone_replicas: 2,
            recording_end_time: end.map(str::to_string),
            ..Default::default()
        }
    }

    /// The rendered lines of one metric (its samples, not its HELP and TYPE).
    fn samples(m: &Metrics, metric: &str) -> Vec<String> {
        let mut out: Vec<String> = m
            .encode()
            .lines()
            .filter(|l| {
                l.strip_prefix(metric)
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            })
            .map(str::to_string)
            .collect();
        out.sort();
        out
    }

    #[test]
    fn a_canary_has_a_phase_series_per_phase_and_only_the_current_one_is_1() {
        let m = Metrics::default();
        m.set_canary("shop", "front", 20, &status(Some(Phase::Blocked), None));
        let series = |phase: &str, v: u8| {
            format!(
                r#"recording_canary_phase{{namespace="shop",name="front",phase="{phase}"}} {v}"#
            )
        };
        let mut want = vec![
            series("Blocked", 1),
            series("Completed", 0),
            series("Degraded", 0),
            series("Progressing", 0),
            series("Ready", 0),
            series("Terminating", 0),
        ];
        want.sort();
        assert_eq!(samples(&m, "recording_canary_phase"), want);

        m.set_canary("shop", "front", 20, &status(Some(Phase::Completed), None));
        let now = samples(&m, "recording_canary_phase");
        assert!(now.contains(&series("Completed", 1)), "{now:?}");
        assert!(now.contains(&series("Blocked", 0)), "{now:?}");
        assert_eq!(now.iter().filter(|l| l.ends_with(" 1")).count(), 1);

        // A status without a phase yet: every series at 0.
        m.set_canary("shop", "front", 20, &status(None, None));
        let none = samples(&m, "recording_canary_phase");
        assert_eq!(none.len(), PHASES.len());
        assert!(none.iter().all(|l| l.ends_with(" 0")), "{none:?}");
    }

    #[test]
    fn the_recording_end_is_its_unix_time_and_has_no_series_without_one() {
        let m = Metrics::default();
        m.set_canary(
            "shop",
            "front",
            10,
            &status(Some(Phase::Ready), Some("2026-01-02T03:04:05Z")),
        );
        assert_eq!(
            samples(&m, "recording_canary_recording_end_timestamp_seconds"),
            [
                r#"recording_canary_recording_end_timestamp_seconds{namespace="shop",name="front"} 1767323045"#
            ]
        );
        assert_eq!(
            samples(&m, "recording_canary_current_percent"),
            [r#"recording_canary_current_percent{namespace="shop",name="front"} 10"#]
        );
        assert_eq!(
            samples(&m, "recording_canary_target_percent"),
            [r#"recording_canary_target_percent{namespace="shop",name="front"} 10"#]
        );
        assert_eq!(
            samples(&m, "recording_canary_clone_replicas"),
            [r#"recording_canary_clone_replicas{namespace="shop",name="front"} 2"#]
        );

        // The duration removed from the spec (no end any more), or an end that does not parse.
        m.set_canary("shop", "front", 10, &status(Some(Phase::Ready), None));
        assert!(samples(&m, "recording_canary_recording_end_timestamp_seconds").is_empty());
        m.set_canary(
            "shop",
            "front",
            10,
            &status(Some(Phase::Ready), Some("soon")),
        );
        assert!(samples(&m, "recording_canary_recording_end_timestamp_seconds").is_empty());
    }

    #[test]
    fn a_reported_canary_has_its_event_counters_at_0_before_the_first_event() {
        let m = Metrics::default();
        m.set_canary("shop", "front", 10, &status(Some(Phase::Ready), None));
        assert_eq!(
            samples(&m, "recording_canary_writes_refused_total"),
            [r#"recording_canary_writes_refused_total{namespace="shop",name="front"} 0"#]
        );
        assert_eq!(
            samples(&m, "recording_canary_traffic_drained_total"),
            [r#"recording_canary_traffic_drained_total{namespace="shop",name="front"} 0"#]
        );
        m.canary_event("shop", "front", "TrafficDrained");
        assert_eq!(
            samples(&m, "recording_canary_traffic_drained_total"),
            [r#"recording_canary_traffic_drained_total{namespace="shop",name="front"} 1"#]
        );
    }

    #[test]
    fn refused_writes_and_drains_are_counted_per_canary_by_event_reason() {
        let m = Metrics::default();
        m.canary_event("shop", "front", "WriteRefused");
        m.canary_event("shop", "front", "WriteRefused");
        m.canary_event("shop", "front", "TrafficDrained");
        m.canary_event("shop", "back", "CloneScaled");
        assert_eq!(
            samples(&m, "recording_canary_writes_refused_total"),
            [r#"recording_canary_writes_refused_total{namespace="shop",name="front"} 2"#]
        );
        assert_eq!(
            samples(&m, "recording_canary_traffic_drained_total"),
            [r#"recording_canary_traffic_drained_total{namespace="shop",name="front"} 1"#]
        );
    }

    #[test]
    fn forgetting_a_canary_removes_each_of_its_series_and_keeps_the_others() {
        let m = Metrics::default();
        for name in ["front", "back"] {
            m.set_canary(
                "shop",
                name,
                10,
                &status(Some(Phase::Degraded), Some("2026-01-02T03:04:05Z")),
            );
            m.canary_event("shop", name, "WriteRefused");
            m.canary_event("shop", name, "TrafficDrained");
        }
        m.forget_canary("shop", "front");
        let text = m.encode();
        let front: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(r#"name="front""#))
            .collect();
        assert!(front.is_empty(), "{front:?}");
        // Each per-canary metric keeps the other canary's series.
        for metric in [
            "recording_canary_target_percent",
            "recording_canary_current_percent",
            "recording_canary_clone_replicas",
            "recording_canary_recording_end_timestamp_seconds",
            "recording_canary_writes_refused_total",
            "recording_canary_traffic_drained_total",
        ] {
            assert_eq!(samples(&m, metric).len(), 1, "{metric}");
        }
        assert_eq!(samples(&m, "recording_canary_phase").len(), PHASES.len());
    }

    /// Every metric of the registry, with at least one series each: the families that have no
    /// series render no sample.
    fn every_metric() -> Metrics {
        let m = Metrics::default();
        m.observe(Duration::from_millis(3), Some("kube"));
        m.set_canary(
            "shop",
            "front",
            10,
            &status(Some(Phase::Ready), Some("2026-01-02T03:04:05Z")),
        );
        m.canary_event("shop", "front", "WriteRefused");
        m.canary_event("shop", "front", "TrafficDrained");
        m.is_leader.set(1);
        m.shard.set(0);
        m.request("GET", "/api/v1/pods", None);
        m.cached("pods", 3);
        m.echo("deployments", Duration::from_millis(40));
        m.echo_expired("deployments");
        m.watch_lag("deployments", Duration::from_secs(1));
        m
    }

    /// The names of the samples in OpenMetrics text (`_total`, `_bucket` and the like included).
    fn sample_names(text: &str) -> std::collections::BTreeSet<String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(str::to_string)
            .collect()
    }

    /// The list tests/alerts/check.sh checks the chart's alert rules and dashboard queries
    /// against: exactly the names of the samples this registry renders. After a change of
    /// metrics, write it again with
    /// `RC_WRITE_METRIC_NAMES=1 cargo test --lib exported_metric_names`.
    #[test]
    fn exported_metric_names_are_the_list_the_alerts_check_reads() {
        let m = every_metric();
        let text = m.encode();
        // Each registered metric has a sample here (a new one must be given a series above).
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        let names = sample_names(&text);
        for f in &families {
            assert!(
                names
                    .iter()
                    .any(|n| n == f || n.strip_prefix(f).is_some_and(|r| r.starts_with('_'))),
                "{f} has no series in every_metric(): give it one"
            );
        }
        let list: String = names.iter().map(|n| format!("{n}\n")).collect();
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/alerts/exported-metrics.txt"
        );
        if std::env::var_os("RC_WRITE_METRIC_NAMES").is_some() {
            std::fs::write(path, &list).unwrap();
        }
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            list == checked_in,
            "tests/alerts/exported-metrics.txt differs from the registry's metrics; write it with:\n  RC_WRITE_METRIC_NAMES=1 cargo test --lib exported_metric_names\nthe registry's:\n{list}"
        );
    }

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
