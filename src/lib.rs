//! recording-canary: sends a chosen share of a Service's live requests, through Istio, to a clone
//! of its Deployment that carries a traffic-recording sidecar.
//!
//! The crate is a library with a thin binary. One module per concern:
//! - [`api`]: the `RecordingCanary` custom resource and its CRD;
//! - [`istio`]: VirtualService and DestinationRule handling on plain JSON;
//! - [`mesh_object`]: what the caches keep of a VirtualService or DestinationRule;
//! - [`istio_status`]: whether Istio reports a VirtualService or DestinationRule generation
//!   as reached every proxy (its `Reconciled` condition);
//! - [`planner`]: the pure function from observed objects to ordered actions;
//! - [`writers`]: the thin layer that carries the actions out;
//! - [`cache`], [`pods`], [`deployments`], [`services`], [`index`], [`freshness`]: selective watch
//!   caches, what they keep of a pod, a Deployment and a Service, the map from each watched object to the canaries it concerns, and read-your-writes
//!   over the caches; [`small_set`]: the index's sets of one or two;
//! - [`controller`]: watches, observation and the reconcile loop;
//! - [`client`]: the Kubernetes client, counting its requests;
//! - [`memory`]: freed heap pages go back to the system;
//! - [`metrics`], [`admin`], [`lease`], [`shard`]: Prometheus metrics, the admin server, leader
//!   election, and the split of canaries between shards.

pub mod admin;
pub mod admission;
pub mod api;
pub mod cache;
pub mod client;
pub mod controller;
pub mod deployments;
pub mod endpoints;
pub mod events;
pub mod freshness;
pub mod index;
pub mod istio;
pub mod istio_status;
pub mod lease;
pub mod memory;
pub mod mesh_object;
pub mod metrics;
pub mod planner;
pub mod pods;
pub mod services;
pub mod shard;
pub mod small_set;
pub mod writers;

/// Errors of a reconcile. Each is retried with backoff; none stops the controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("JSON: {0}")]
    Serialization(#[from] serde_json::Error),
    #[error("RecordingCanary has no namespace")]
    MissingNamespace,
    /// A guarded write lost a race: the object changed since it was read.
    #[error("an object changed since it was read (resourceVersion guard); planning again: {0}")]
    Conflict(String),
    /// The lease was not fresh when a write was about to be sent: nothing more is written (a
    /// standby may lead by now).
    #[error("the lease is not fresh; the remaining writes of this plan were not sent")]
    Fenced,
    /// The reconcile panicked: a bug. Caught, so that one canary does not end the others'.
    #[error("the reconcile panicked (a bug; please report it): {0}")]
    Panicked(String),
}

/// Whether the API server refused a JSON patch that did not apply to the object as it is now: a
/// failed `test` operation (our resourceVersion guard) or a path that is gone. The API server
/// says only this, with 422, for both; an admission policy's or a validation's 422 says more.
pub fn failed_patch_test(s: &kube::core::Status) -> bool {
    s.code == 422 && s.message == "the server rejected our request due to an error in our request"
}

impl Error {
    /// A write lost a race (resourceVersion conflict, failed JSON-patch test, already exists):
    /// plan again right away from fresh state.
    pub fn is_conflict(&self) -> bool {
        match self {
            Error::Conflict(_) => true,
            Error::Kube(kube::Error::Api(s)) => s.code == 409 || failed_patch_test(s),
            _ => false,
        }
    }

    /// A short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Conflict(_) => "conflict",
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(_)) => "api",
            Error::Kube(_) => "transport",
            Error::Serialization(_) => "serialization",
            Error::MissingNamespace => "invalid",
            Error::Fenced => "fenced",
            Error::Panicked(_) => "panic",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, message: &str) -> Error {
        Error::Kube(kube::Error::Api(
            kube::core::Status::failure(message, "Invalid")
                .with_code(code)
                .boxed(),
        ))
    }

    #[test]
    fn a_failed_patch_test_is_a_conflict_but_an_admission_denial_is_not() {
        // What the API server answers to a JSON patch whose `test` fails (measured).
        assert!(
            status(
                422,
                "the server rejected our request due to an error in our request"
            )
            .is_conflict()
        );
        assert!(status(409, "the object has been modified").is_conflict());
        let denied = status(
            422,
            "deployments.apps \"x\" is forbidden: ValidatingAdmissionPolicy 'p' with binding 'b' denied request: test",
        );
        assert!(!denied.is_conflict());
        assert_eq!(denied.metric_label(), "api");
    }

    #[test]
    fn a_lost_race_is_a_conflict_and_takes_the_fast_path() {
        assert!(Error::Conflict("rv".into()).is_conflict());
        assert_eq!(Error::Conflict("rv".into()).metric_label(), "conflict");
        assert!(!Error::MissingNamespace.is_conflict());
    }
}
