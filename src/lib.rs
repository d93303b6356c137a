//! recording-canary: sends a chosen share of a Service's live requests, through Istio, to a clone
//! of its Deployment that carries a traffic-recording sidecar.
//!
//! A library with a thin binary (`src/main.rs`). The folders follow the shape of a reconcile,
//! observe → plan → apply, each with a module doc that says what it owns:
//!
//! | folder | what it holds | may import |
//! | --- | --- | --- |
//! | [`api`] | the `RecordingCanary` resource, its CRD, status enums, labels and keys | nothing of this crate |
//! | [`facts`] | compact views of the Kubernetes objects the controller reads | `api`, `istio` and `gateway` (what it keeps of their status) |
//! | [`istio`] | VirtualService and DestinationRule handling on plain JSON: split, restore, matches, Istio's status | `api` |
//! | [`gateway`] | Gateway API HTTPRoute handling on plain JSON: split, restore, matches and their precedence, route status | `api` |
//! | [`planner`] | the pure function from observed objects to ordered actions | `api`, `facts`, `istio`, `gateway` |
//! | [`cache`] | selective watch stores, the index from events to canaries, read-your-writes | `api`, `facts`, `istio`, `gateway` |
//! | [`controller`] | watches, the reconcile by phase, the writers and Events | everything above, `runtime` |
//! | [`runtime`] | client, metrics, admin server, lease, shards, admission check, memory | `api` |
//!
//! `tests/layers.rs` checks that no module imports upward across these lines: the planner never
//! reaches anything that talks to the API server.

pub mod api;
pub mod cache;
pub mod controller;
pub mod facts;
pub mod gateway;
pub mod istio;
pub mod planner;
pub mod runtime;

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

impl Error {
    /// A write lost a race (resourceVersion conflict, failed JSON-patch test, already exists):
    /// plan again right away from fresh state.
    pub fn is_conflict(&self) -> bool {
        match self {
            Error::Conflict(_) => true,
            Error::Kube(kube::Error::Api(s)) => {
                runtime::api_errors::conflict(s) || runtime::api_errors::failed_patch_test(s)
            }
            _ => false,
        }
    }

    /// A short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Conflict(_) => "conflict",
            Error::Kube(kube::Error::Api(s)) if runtime::api_errors::conflict(s) => "conflict",
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
        // A denial names the object in its details (as measured; see runtime::api_errors).
        let denied: kube::core::Status = serde_json::from_value(serde_json::json!({
            "status": "Failure", "reason": "Invalid", "code": 422,
            "message": "deployments.apps \"x\" is forbidden: ValidatingAdmissionPolicy 'p' with binding 'b' denied request: test",
            "details": {"name": "x", "group": "apps", "kind": "deployments"}
        }))
        .expect("status");
        let denied = Error::Kube(kube::Error::Api(denied.boxed()));
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
