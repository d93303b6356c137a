//! The values of the status fields that are not free text.
//!
//! Each is serialized under the name it had when these fields were strings, so that objects
//! written before still read, and the CRD lists the names (`enum:`) for clients.
//!
//! The CRD describes an optional enum field with the enum's doc, not the field's (kube's
//! `OptionalEnum` schema transform hoists the enum's schema over the field's): each type's first
//! paragraph is what `kubectl explain` shows for its status field.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Progressing, Ready, Degraded, Blocked or Terminating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    /// On the way to `spec.percent`: subsets, clone, endpoints, ramp steps.
    Progressing,
    /// The routes send `spec.percent` to the clone.
    Ready,
    /// A sick clone (crash-looping, stalled, not ready) or reverted routes: no traffic goes to it.
    Degraded,
    /// A configuration that would hurt traffic; the Ready condition gives the reason.
    Blocked,
    /// The canary is being deleted: its split is rolled back.
    Terminating,
    /// Its `spec.duration` ran out: the routes are back, the clone at zero replicas; the canary
    /// stays as a record until deleted.
    Completed,
}

impl Phase {
    /// The name on the wire, also the reason of the Progressing condition outside that phase.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Progressing => "Progressing",
            Phase::Ready => "Ready",
            Phase::Degraded => "Degraded",
            Phase::Blocked => "Blocked",
            Phase::Terminating => "Terminating",
            Phase::Completed => "Completed",
        }
    }
}

/// What ended the last wait before the split: `IstioReconciled` (Istio reported the
/// DestinationRule holding the subsets `Reconciled` for its generation) or `PropagationDelay`
/// (the delay ran out first, or Istio does not report); on rollback with the Gateway API router
/// also `RoutesAccepted` (every parent accepted the restored HTTPRoutes). The `RolledBack` Event
/// says what ended the wait before the subsets (or Services) left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PropagationWait {
    /// Istio reported the object written before (the DestinationRule with the subsets, or the
    /// VirtualServices without the routes) `Reconciled` for its current generation.
    IstioReconciled,
    /// `spec.propagationDelay` ran out first (or Istio does not report).
    PropagationDelay,
    /// Every parent of the restored HTTPRoutes accepted their current generation (Gateway API
    /// router, on rollback).
    RoutesAccepted,
}

impl PropagationWait {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            PropagationWait::IstioReconciled => "IstioReconciled",
            PropagationWait::PropagationDelay => "PropagationDelay",
            PropagationWait::RoutesAccepted => "RoutesAccepted",
        }
    }
}

/// Who labels the target's new pods for the stable subset: `AdmissionPolicy` (the API server
/// at admission, also while no controller runs) or `Controller` (this controller, while it runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum StableLabelling {
    /// The API server, at admission (the policy and its binding exist).
    AdmissionPolicy,
    /// Only this controller, while it runs.
    #[default]
    Controller,
}

impl StableLabelling {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            StableLabelling::AdmissionPolicy => "AdmissionPolicy",
            StableLabelling::Controller => "Controller",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn status_values_keep_the_names_they_had_as_strings() {
        for p in [
            Phase::Progressing,
            Phase::Ready,
            Phase::Degraded,
            Phase::Blocked,
            Phase::Terminating,
            Phase::Completed,
        ] {
            assert_eq!(serde_json::to_value(p).unwrap(), json!(p.as_str()));
            assert_eq!(
                serde_json::from_value::<Phase>(json!(p.as_str())).unwrap(),
                p
            );
        }
        for w in [
            PropagationWait::IstioReconciled,
            PropagationWait::PropagationDelay,
            PropagationWait::RoutesAccepted,
        ] {
            assert_eq!(serde_json::to_value(w).unwrap(), json!(w.as_str()));
            assert_eq!(
                serde_json::from_value::<PropagationWait>(json!(w.as_str())).unwrap(),
                w
            );
        }
        for l in [
            StableLabelling::AdmissionPolicy,
            StableLabelling::Controller,
        ] {
            assert_eq!(serde_json::to_value(l).unwrap(), json!(l.as_str()));
            assert_eq!(
                serde_json::from_value::<StableLabelling>(json!(l.as_str())).unwrap(),
                l
            );
        }
    }
}

/// Istio, GatewayAPI or Replicas: the router in force (`spec.router`, or what `Auto` chose). Set
/// once; it never changes on a running canary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Router {
    /// DestinationRule subsets and VirtualService weights.
    Istio,
    /// HTTPRoute backendRef weights between two Services the canary owns.
    #[serde(rename = "GatewayAPI")]
    GatewayApi,
    /// No mesh: the clone's share of the Service's Ready endpoints.
    Replicas,
}

impl Router {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Router::Istio => "Istio",
            Router::GatewayApi => "GatewayAPI",
            Router::Replicas => "Replicas",
        }
    }
}
