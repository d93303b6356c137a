//! What an error answer of the API server means, read from its status code, reason and details,
//! never from its English message. Each case is pinned below with the body a real API server
//! sent (Kubernetes 1.37, measured on the local control plane).

use kube::core::Status;

/// A JSON patch that did not apply to the object as it is now: a failed `test` operation (the
/// controller's resourceVersion guard) or a path that is gone. The API server answers both with
/// 422 `Invalid` and empty details; a validation error names its causes, and an admission
/// policy's or webhook's denial names the object.
pub fn failed_patch_test(s: &Status) -> bool {
    s.code == 422
        && s.reason == "Invalid"
        && s.details
            .as_ref()
            .is_none_or(|d| d.causes.is_empty() && d.name.is_empty() && d.kind.is_empty())
}

/// Another writer won: a stale resourceVersion on an update or a merge patch that names one
/// (409 `Conflict`), or a create of a name that exists (409 `AlreadyExists`).
pub fn conflict(s: &Status) -> bool {
    s.code == 409
}

/// A create refused because the namespace is being deleted (403 with the cause
/// `NamespaceTerminating`): its canaries are about to roll back.
pub fn namespace_terminating(s: &Status) -> bool {
    s.code == 403
        && s.details
            .as_ref()
            .is_some_and(|d| d.causes.iter().any(|c| c.reason == "NamespaceTerminating"))
}

/// The object (or its namespace) is gone.
pub fn not_found(s: &Status) -> bool {
    s.code == 404
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(body: &str) -> Status {
        serde_json::from_str(body).expect("a Status")
    }

    #[test]
    fn a_failed_json_patch_test_is_told_apart_from_an_admission_denial_by_its_details() {
        let failed_test = status(
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"the server rejected our request due to an error in our request","reason":"Invalid","details":{},"code":422}"#,
        );
        let denied = status(
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"configmaps \"ok\" is forbidden: ValidatingAdmissionPolicy 'p' with binding 'p' denied request: no","reason":"Invalid","details":{"name":"ok","kind":"configmaps","causes":[{"message":"ValidatingAdmissionPolicy 'p' with binding 'p' denied request: no"}]},"code":422}"#,
        );
        let invalid_field = status(
            r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"x is invalid","reason":"Invalid","details":{"name":"x","kind":"deployments","causes":[{"reason":"FieldValueInvalid","message":"bad","field":"spec.replicas"}]},"code":422}"#,
        );
        assert!(failed_patch_test(&failed_test));
        assert!(!failed_patch_test(&denied));
        assert!(!failed_patch_test(&invalid_field));
    }

    #[test]
    fn a_create_in_a_namespace_being_deleted_is_told_by_its_cause() {
        let terminating = status(
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"configmaps \"z\" is forbidden: unable to create new content in namespace p because it is being terminated","reason":"Forbidden","details":{"name":"z","kind":"configmaps","causes":[{"reason":"NamespaceTerminating","message":"namespace p is being terminated","field":"metadata.namespace"}]},"code":403}"#,
        );
        let rbac = status(
            r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"forbidden: User cannot create","reason":"Forbidden","details":{"kind":"configmaps"},"code":403}"#,
        );
        assert!(namespace_terminating(&terminating));
        assert!(!namespace_terminating(&rbac));
        assert!(!conflict(&terminating) && !not_found(&terminating));
    }
}
