//! What the caches keep of a VirtualService, DestinationRule or HTTPRoute: [`MeshObject`].
//!
//! The controller watches every VirtualService and DestinationRule of its scope (a host may be
//! configured by any of them). Held as `serde_json::Value` trees, each costs 6–7 KiB: every
//! JSON object is a B-tree whose nodes are allocated for eleven entries. So the caches keep the
//! metadata as a struct and the rest (`spec`, and of `status` only what
//! [`crate::istio::status::compact`] keeps) as compact JSON text, parsed again when a canary is planned
//! (a few microseconds for a VirtualService of a few routes).

use std::borrow::Cow;

use kube::api::{ApiResource, DynamicObject, ObjectMeta, TypeMeta};
use kube::core::DynamicResourceScope;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// A VirtualService or DestinationRule as the caches keep it.
#[derive(Clone, Debug, PartialEq)]
pub struct MeshObject {
    pub types: Option<TypeMeta>,
    pub metadata: ObjectMeta,
    /// Every field but `apiVersion`, `kind` and `metadata`, as compact JSON text of an object.
    body: Box<str>,
}

impl MeshObject {
    /// Keeps `o`, with of its status only whether Istio has distributed its current generation
    /// (an HTTPRoute: its parents' verdicts).
    pub fn new(o: DynamicObject) -> Self {
        let DynamicObject {
            types,
            metadata,
            mut data,
        } = o;
        // An HTTPRoute's status says per parent whether it accepted the route; Istio's objects
        // say whether they were distributed.
        let http_route = types.as_ref().is_some_and(|t| t.kind == "HTTPRoute");
        if let Some(fields) = data.as_object_mut()
            && let Some(status) = fields.remove("status")
            && let Some(kept) = if http_route {
                crate::gateway::status::compact(&status)
            } else {
                crate::istio::status::compact(&status)
            }
        {
            fields.insert("status".into(), kept);
        }
        let body = match data {
            Value::Object(_) => data.to_string(),
            _ => "{}".to_string(),
        };
        Self {
            types,
            metadata,
            body: body.into_boxed_str(),
        }
    }

    /// Its `spec` (`null` when it has none).
    pub fn spec(&self) -> Value {
        self.field("spec")
    }

    fn field(&self, name: &str) -> Value {
        match serde_json::from_str::<Value>(&self.body) {
            Ok(Value::Object(mut m)) => m.remove(name).unwrap_or(Value::Null),
            _ => Value::Null,
        }
    }

    /// The whole object as JSON, as the API server would send it (less what the cache drops).
    pub fn to_value(&self) -> Value {
        let mut m = match serde_json::from_str::<Value>(&self.body) {
            Ok(Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        if let Ok(meta) = serde_json::to_value(&self.metadata) {
            m.insert("metadata".into(), meta);
        }
        if let Some(t) = &self.types {
            m.insert("apiVersion".into(), Value::String(t.api_version.clone()));
            m.insert("kind".into(), Value::String(t.kind.clone()));
        }
        Value::Object(m)
    }

    /// Whether the two differ in nothing but their resourceVersion.
    pub fn same_but_revision(&self, other: &MeshObject) -> bool {
        let mut m = self.metadata.clone();
        m.resource_version = other.metadata.resource_version.clone();
        m == other.metadata && self.body == other.body && self.types == other.types
    }
}

impl<'de> Deserialize<'de> for MeshObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        DynamicObject::deserialize(d).map(MeshObject::new)
    }
}

impl kube::Resource for MeshObject {
    type DynamicType = ApiResource;
    type Scope = DynamicResourceScope;

    fn group(dt: &ApiResource) -> Cow<'_, str> {
        dt.group.as_str().into()
    }

    fn version(dt: &ApiResource) -> Cow<'_, str> {
        dt.version.as_str().into()
    }

    fn kind(dt: &ApiResource) -> Cow<'_, str> {
        dt.kind.as_str().into()
    }

    fn api_version(dt: &ApiResource) -> Cow<'_, str> {
        dt.api_version.as_str().into()
    }

    fn plural(dt: &ApiResource) -> Cow<'_, str> {
        dt.plural.as_str().into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn wire() -> Value {
        json!({
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "v", "namespace": "shop", "resourceVersion": "7", "generation": 3,
                         "annotations": {"a": "b"}},
            "spec": {"hosts": ["frontend"], "http": [{"route": [{"destination": {"host": "frontend"}}]}],
                     "somethingNew": {"x": 1}},
            "status": {"observedGeneration": 3, "conditions": [
                {"type": "Reconciled", "status": "True", "message": "3/3 proxies up to date."}],
                "validationMessages": []},
        })
    }

    #[test]
    fn gives_back_the_object_as_sent_but_for_the_status_it_drops() {
        let o: MeshObject = serde_json::from_value(wire()).unwrap();
        let mut want = wire();
        want["status"] = json!({"observedGeneration": 3, "conditions": [{"type": "Reconciled", "status": "True"}]});
        assert_eq!(o.to_value(), want);
        assert_eq!(o.spec(), wire()["spec"], "unknown fields kept");
        assert_eq!(o.metadata.name.as_deref(), Some("v"));
    }

    #[test]
    fn an_object_without_spec_or_status_reads_as_null_spec() {
        let o: MeshObject = serde_json::from_value(json!({
            "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": "d"},
        }))
        .unwrap();
        assert_eq!(o.spec(), Value::Null);
        assert!(o.to_value().get("status").is_none());
    }

    #[test]
    fn only_the_resource_version_may_differ_for_the_same_object() {
        let a: MeshObject = serde_json::from_value(wire()).unwrap();
        let mut w = wire();
        w["metadata"]["resourceVersion"] = json!("8");
        w["status"]["conditions"][0]["message"] = json!("2/3 proxies up to date.");
        let b: MeshObject = serde_json::from_value(w.clone()).unwrap();
        assert!(a.same_but_revision(&b));
        w["spec"]["hosts"] = json!(["other"]);
        let c: MeshObject = serde_json::from_value(w).unwrap();
        assert!(!a.same_but_revision(&c));
    }
}
