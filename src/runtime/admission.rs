//! Which guarantee keeps the stable subset complete: the chart's MutatingAdmissionPolicy (the
//! target's new pods are labelled at admission, with or without a running controller) or the
//! controller alone (it labels them after they are created, while it runs).

use std::time::Duration;

use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject};
use tracing::{debug, warn};

pub use crate::api::status::StableLabelling;

/// How often the policy's presence is checked again (two GETs).
pub const RECHECK: Duration = Duration::from_secs(60);

/// The API versions that serve MutatingAdmissionPolicy, newest first.
const VERSIONS: [&str; 2] = ["v1", "v1beta1"];

fn resource(version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "admissionregistration.k8s.io".into(),
        version: version.into(),
        api_version: format!("admissionregistration.k8s.io/{version}"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// Whether the policy `name` and its binding of the same name are installed (as the chart names
/// them). A version the cluster does not serve answers 404 like a missing object.
pub async fn probe(client: &Client, name: &str) -> Result<StableLabelling, kube::Error> {
    for version in VERSIONS {
        let bindings: Api<DynamicObject> = Api::all_with(
            client.clone(),
            &resource(
                version,
                "MutatingAdmissionPolicyBinding",
                "mutatingadmissionpolicybindings",
            ),
        );
        let Some(binding) = bindings.get_opt(name).await? else {
            continue;
        };
        let policy_name = binding
            .data
            .pointer("/spec/policyName")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default();
        if policy_name != name {
            debug!(
                binding = name,
                policy_name, "the binding names another policy"
            );
            return Ok(StableLabelling::Controller);
        }
        let policies: Api<DynamicObject> = Api::all_with(
            client.clone(),
            &resource(
                version,
                "MutatingAdmissionPolicy",
                "mutatingadmissionpolicies",
            ),
        );
        return Ok(match policies.get_opt(name).await? {
            Some(_) => StableLabelling::AdmissionPolicy,
            None => StableLabelling::Controller,
        });
    }
    Ok(StableLabelling::Controller)
}

/// [`probe`], with an error read as "only the controller" (the guarantee that holds for certain).
pub async fn check(client: &Client, name: &str) -> StableLabelling {
    match probe(client, name).await {
        Ok(l) => l,
        Err(e) => {
            warn!(policy = name, error = %e, "cannot read the stable-label admission policy; reporting Controller");
            StableLabelling::Controller
        }
    }
}
