//! What the controller keeps of the Kubernetes objects it reads: compact, pure data views that
//! serde reads straight off the wire (the rest of each object is skipped, never built).
//!
//! - [`pods::PodFacts`], [`deployments::DeploymentFacts`], [`services::ServiceFacts`],
//!   [`endpoints::EndpointSliceFacts`]: the parts of pods, Deployments, Services and
//!   EndpointSlices the planner reads;
//! - [`mesh::MeshObject`]: a VirtualService or DestinationRule, its spec kept whole.
//!
//! Layer: pure data. Imports only [`crate::api`]; the planner, the caches and the controller use it.

pub mod deployments;
pub mod endpoints;
pub mod mesh;
pub mod pods;
pub mod services;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;

/// Makes `$facts`, a compact form of the Kubernetes kind `$kind` with a `metadata: ObjectMeta`
/// field, a k8s-openapi resource of that kind (its constants taken from `$kind`), so that
/// `Api<$facts>` lists and watches the real kind and reads each object straight into `$facts`.
#[macro_export]
macro_rules! facts_of {
    ($facts:ty, $kind:ty) => {
        impl k8s_openapi::Resource for $facts {
            const API_VERSION: &'static str = <$kind as k8s_openapi::Resource>::API_VERSION;
            const GROUP: &'static str = <$kind as k8s_openapi::Resource>::GROUP;
            const KIND: &'static str = <$kind as k8s_openapi::Resource>::KIND;
            const VERSION: &'static str = <$kind as k8s_openapi::Resource>::VERSION;
            const URL_PATH_SEGMENT: &'static str =
                <$kind as k8s_openapi::Resource>::URL_PATH_SEGMENT;
            type Scope = <$kind as k8s_openapi::Resource>::Scope;
        }

        impl k8s_openapi::Metadata for $facts {
            type Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
            fn metadata(&self) -> &Self::Ty {
                &self.metadata
            }
            fn metadata_mut(&mut self) -> &mut Self::Ty {
                &mut self.metadata
            }
        }
    };
}

/// Of an object's managedFields, only the time of the newest entry: what the watch's lag is
/// measured from, until the object is stripped (for the compact kinds, `PodFacts` and
/// `DeploymentFacts`, which drop the rest as they are read).
pub fn newest_change_only(
    fields: Option<Vec<ManagedFieldsEntry>>,
) -> Option<Vec<ManagedFieldsEntry>> {
    let newest = fields?
        .into_iter()
        .filter_map(|e| e.time)
        .max_by_key(|t| t.0)?;
    Some(vec![ManagedFieldsEntry {
        time: Some(newest),
        ..ManagedFieldsEntry::default()
    }])
}
