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
