//! Istio VirtualService and DestinationRule handling, on plain JSON values.
//!
//! User objects are never deserialised into structs: every field this code does not know,
//! including fields from newer Istio versions, survives a read-modify-write untouched.

use kube::api::ApiResource;
use serde_json::{Map, Value, json};

use crate::api::{
    RECORDING_SUBSET, RESTORE_ANNOTATION, ROLE_LABEL, ROLE_RECORDING, ROLE_STABLE, STABLE_SUBSET,
};

/// Istio's networking API version used for reads and writes (served since Istio 1.22).
pub const ISTIO_VERSION: &str = "v1";

/// The VirtualService resource.
pub fn virtual_service_resource() -> ApiResource {
    ApiResource {
        group: "networking.istio.io".into(),
        version: ISTIO_VERSION.into(),
        api_version: format!("networking.istio.io/{ISTIO_VERSION}"),
        kind: "VirtualService".into(),
        plural: "virtualservices".into(),
    }
}

/// The DestinationRule resource.
pub fn destination_rule_resource() -> ApiResource {
    ApiResource {
        group: "networking.istio.io".into(),
        version: ISTIO_VERSION.into(),
        api_version: format!("networking.istio.io/{ISTIO_VERSION}"),
        kind: "DestinationRule".into(),
        plural: "destinationrules".into(),
    }
}

/// How a Service's host may be written in a VirtualService or DestinationRule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceHost {
    pub name: String,
    pub namespace: String,
    pub domain: String,
}

impl ServiceHost {
    pub fn new(name: &str, namespace: &str, domain: &str) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
            domain: domain.into(),
        }
    }

    /// `name.namespace.svc.<domain>`.
    pub fn fqdn(&self) -> String {
        format!("{}.{}.svc.{}", self.name, self.namespace, self.domain)
    }

    /// Whether `host`, written in an object of namespace `obj_ns`, names this Service.
    /// Short names are resolved against the object's namespace, as Istio does.
    pub fn matches(&self, host: &str, obj_ns: &str) -> bool {
        service_of_host(host, obj_ns, &self.domain)
            .is_some_and(|(n, ns)| n == self.name && ns == self.namespace)
    }
}

/// The Service (`name`, `namespace`) a host names, written in an object of namespace `obj_ns`:
/// `name`, `name.ns`, `name.ns.svc` or `name.ns.svc.<domain>`; `None` for any other host
/// (an external name, a wildcard). The one place hosts are resolved.
pub fn service_of_host(host: &str, obj_ns: &str, domain: &str) -> Option<(String, String)> {
    let host = host.trim().trim_end_matches('.');
    let host = host
        .strip_suffix(domain)
        .and_then(|h| h.strip_suffix(".svc."))
        .map(|h| format!("{h}.svc"))
        .unwrap_or_else(|| host.to_string());
    let parts: Vec<&str> = host.split('.').collect();
    let (n, ns) = match parts.as_slice() {
        [n] => (*n, obj_ns),
        [n, ns] | [n, ns, "svc"] => (*n, *ns),
        _ => return None,
    };
    (!n.is_empty() && !ns.is_empty() && n != "*").then(|| (n.to_string(), ns.to_string()))
}

/// Every host a VirtualService names: its `hosts` and the destination host of every HTTP route.
pub fn vs_named_hosts(spec: &Value) -> Vec<&str> {
    let hosts = spec
        .get("hosts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str);
    let dests = http_routes(spec)
        .into_iter()
        .flat_map(destinations)
        .filter_map(dest_host);
    hosts.chain(dests).collect()
}

/// Whether a VirtualService applies to sidecars (no `gateways`, or `mesh` listed).
pub fn is_mesh_bound(spec: &Value) -> bool {
    match spec.get("gateways").and_then(Value::as_array) {
        None => true,
        Some(g) if g.is_empty() => true,
        Some(g) => g.iter().any(|x| x.as_str() == Some("mesh")),
    }
}

/// Whether a VirtualService in `obj_ns` is bound to one of `gateways` (`name` or `ns/name`,
/// the short form resolved against the canary's namespace `canary_ns`).
pub fn is_bound_to_gateways(
    spec: &Value,
    obj_ns: &str,
    gateways: &[String],
    canary_ns: &str,
) -> bool {
    let norm = |g: &str, ns: &str| {
        if g.contains('/') {
            g.to_string()
        } else {
            format!("{ns}/{g}")
        }
    };
    let wanted: Vec<String> = gateways.iter().map(|g| norm(g, canary_ns)).collect();
    spec.get("gateways")
        .and_then(Value::as_array)
        .map(|gs| {
            gs.iter()
                .filter_map(Value::as_str)
                .filter(|g| *g != "mesh")
                .any(|g| wanted.contains(&norm(g, obj_ns)))
        })
        .unwrap_or(false)
}

/// Whether a VirtualService lists the Service's host in `hosts`.
pub fn vs_has_host(spec: &Value, host: &ServiceHost, obj_ns: &str) -> bool {
    spec.get("hosts")
        .and_then(Value::as_array)
        .map(|hs| {
            hs.iter()
                .filter_map(Value::as_str)
                .any(|h| host.matches(h, obj_ns))
        })
        .unwrap_or(false)
}

/// Whether any HTTP route of a VirtualService sends to the Service's host.
pub fn vs_routes_to_host(spec: &Value, host: &ServiceHost, obj_ns: &str) -> bool {
    http_routes(spec).iter().any(|r| {
        destinations(r)
            .iter()
            .any(|d| dest_host(d).is_some_and(|h| host.matches(h, obj_ns)))
    })
}

fn http_routes(spec: &Value) -> Vec<&Value> {
    spec.get("http")
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

fn destinations(route: &Value) -> Vec<&Value> {
    route
        .get("route")
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

fn dest_host(d: &Value) -> Option<&str> {
    d.pointer("/destination/host").and_then(Value::as_str)
}

fn dest_subset(d: &Value) -> Option<&str> {
    d.pointer("/destination/subset").and_then(Value::as_str)
}

fn dest_weight(d: &Value) -> Option<i64> {
    d.get("weight").and_then(Value::as_i64)
}

/// The recording share of a route slice of weight `w` at `percent`, rounded half up.
/// The stable share is `w - recording`, so a route's weights keep their sum.
pub fn recording_share(w: i64, percent: i32) -> i64 {
    let p = i64::from(percent.clamp(0, 100));
    (w * p + 50) / 100
}

/// What the split of one VirtualService looks like now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SplitState {
    /// Number of stable/recording destination pairs found.
    pub pairs: usize,
    /// Destinations to the host without a subset, which a split would replace.
    pub unsplit: usize,
    /// The share routed to the recording subset by the first pair, in percent of that pair.
    pub percent: Option<i32>,
    /// Whether any route refers to one of our subsets at all.
    pub references_subsets: bool,
}

/// Reads the split back from a VirtualService's spec.
pub fn read_split(spec: &Value, host: &ServiceHost, obj_ns: &str) -> SplitState {
    let mut st = SplitState::default();
    for r in http_routes(spec) {
        let ds = destinations(r);
        let mut i = 0;
        while i < ds.len() {
            let d = ds[i];
            let ours = dest_host(d).is_some_and(|h| host.matches(h, obj_ns));
            if ours && matches!(dest_subset(d), Some(STABLE_SUBSET) | Some(RECORDING_SUBSET)) {
                st.references_subsets = true;
            }
            if ours
                && dest_subset(d) == Some(STABLE_SUBSET)
                && ds
                    .get(i + 1)
                    .is_some_and(|n| dest_subset(n) == Some(RECORDING_SUBSET))
            {
                let s = dest_weight(d).unwrap_or(0).max(0);
                let rec = dest_weight(ds[i + 1]).unwrap_or(0).max(0);
                if st.percent.is_none() {
                    let w = s + rec;
                    st.percent = Some(if w == 0 {
                        0
                    } else {
                        ((rec * 100 + w / 2) / w) as i32
                    });
                }
                st.pairs += 1;
                i += 2;
                continue;
            }
            if ours && dest_subset(d).is_none() {
                st.unsplit += 1;
            }
            i += 1;
        }
    }
    st
}

/// What a split records on the object so that rollback restores it exactly.
fn restore_note(weights: &[Option<i64>], canary: &str) -> String {
    json!({"canary": canary, "weights": weights}).to_string()
}

/// Parses the restore note: the canary that wrote it and the original weight of each pair
/// (`None`: the destination had no `weight`).
pub fn parse_restore_note(note: Option<&str>) -> (Option<String>, Vec<Option<i64>>) {
    let Some(v) = note.and_then(|n| serde_json::from_str::<Value>(n).ok()) else {
        return (None, Vec::new());
    };
    let canary = v.get("canary").and_then(Value::as_str).map(String::from);
    let weights = v
        .get("weights")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(Value::as_i64).collect())
        .unwrap_or_default();
    (canary, weights)
}

/// The canary named in a restore note (VirtualService or DestinationRule), if any.
pub fn note_owner(note: Option<&str>) -> Option<String> {
    note.and_then(|n| serde_json::from_str::<Value>(n).ok())
        .and_then(|v| v.get("canary").and_then(Value::as_str).map(String::from))
}

/// The restore note on an object, if any.
pub fn restore_note_of(obj: &Value) -> Option<&str> {
    obj.pointer("/metadata/annotations")
        .and_then(|a| a.get(RESTORE_ANNOTATION))
        .and_then(Value::as_str)
}

/// The result of splitting a VirtualService spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    /// The new `spec.http`.
    pub http: Value,
    /// The restore note to keep on the object.
    pub note: String,
}

/// Splits every route destination to the host (without a subset) into the stable/recording pair
/// at `percent`, and re-weights pairs already there. Everything else is left as it is.
/// `previous_note` carries the original weights of pairs split earlier.
pub fn split_http(
    spec: &Value,
    host: &ServiceHost,
    obj_ns: &str,
    percent: i32,
    previous_note: Option<&str>,
    canary: &str,
) -> Split {
    let (_, mut originals) = parse_restore_note(previous_note);
    let mut pair_index = 0usize;
    let mut http = spec.get("http").cloned().unwrap_or_else(|| json!([]));
    if let Some(routes) = http.as_array_mut() {
        for r in routes.iter_mut() {
            let Some(ds) = r.get_mut("route").and_then(Value::as_array_mut) else {
                continue;
            };
            let single = ds.len() == 1;
            let mut out: Vec<Value> = Vec::with_capacity(ds.len() + 1);
            let mut i = 0;
            while i < ds.len() {
                let d = &ds[i];
                let ours = dest_host(d).is_some_and(|h| host.matches(h, obj_ns));
                let is_pair = ours
                    && dest_subset(d) == Some(STABLE_SUBSET)
                    && ds
                        .get(i + 1)
                        .is_some_and(|n| dest_subset(n) == Some(RECORDING_SUBSET));
                if is_pair {
                    let w = dest_weight(d).unwrap_or(0).max(0)
                        + dest_weight(&ds[i + 1]).unwrap_or(0).max(0);
                    out.extend(pair(d, w, percent));
                    if originals.len() <= pair_index {
                        originals.push(Some(w));
                    }
                    pair_index += 1;
                    i += 2;
                    continue;
                }
                if ours && dest_subset(d).is_none() {
                    let original = dest_weight(d);
                    let w = match original {
                        Some(w) => w.max(0),
                        None if single => 100,
                        None => 0,
                    };
                    out.extend(pair(d, w, percent));
                    if originals.len() <= pair_index {
                        originals.push(original);
                    } else {
                        originals[pair_index] = original;
                    }
                    pair_index += 1;
                    i += 1;
                    continue;
                }
                out.push(d.clone());
                i += 1;
            }
            *ds = out;
        }
    }
    originals.truncate(pair_index);
    Split {
        http,
        note: restore_note(&originals, canary),
    }
}

/// The stable/recording pair replacing destination `d` of weight `w`.
fn pair(d: &Value, w: i64, percent: i32) -> [Value; 2] {
    let rec = recording_share(w, percent);
    let mut stable = d.clone();
    let mut recording = d.clone();
    set_subset(&mut stable, STABLE_SUBSET, w - rec);
    set_subset(&mut recording, RECORDING_SUBSET, rec);
    [stable, recording]
}

fn set_subset(d: &mut Value, subset: &str, weight: i64) {
    if let Some(dest) = d.get_mut("destination").and_then(Value::as_object_mut) {
        dest.insert("subset".into(), Value::String(subset.into()));
    }
    if let Some(o) = d.as_object_mut() {
        o.insert("weight".into(), json!(weight));
    }
}

/// Undoes [`split_http`]: each pair becomes one destination again, with its original weight
/// (or no weight, if it had none). Fields changed by others since the split are kept.
pub fn unsplit_http(spec: &Value, host: &ServiceHost, obj_ns: &str, note: Option<&str>) -> Value {
    let (_, originals) = parse_restore_note(note);
    let mut pair_index = 0usize;
    let mut http = spec.get("http").cloned().unwrap_or_else(|| json!([]));
    if let Some(routes) = http.as_array_mut() {
        for r in routes.iter_mut() {
            let Some(ds) = r.get_mut("route").and_then(Value::as_array_mut) else {
                continue;
            };
            let mut out: Vec<Value> = Vec::with_capacity(ds.len());
            // Destinations that had no `weight` before the split (by the note).
            let mut weightless: Vec<usize> = Vec::new();
            let mut i = 0;
            while i < ds.len() {
                let d = &ds[i];
                let ours = dest_host(d).is_some_and(|h| host.matches(h, obj_ns));
                if ours && dest_subset(d) == Some(STABLE_SUBSET) {
                    let next_is_rec = ds
                        .get(i + 1)
                        .is_some_and(|n| dest_subset(n) == Some(RECORDING_SUBSET));
                    let w = dest_weight(d).unwrap_or(0).max(0)
                        + if next_is_rec {
                            dest_weight(&ds[i + 1]).unwrap_or(0).max(0)
                        } else {
                            0
                        };
                    let mut restored = d.clone();
                    if let Some(dest) = restored
                        .get_mut("destination")
                        .and_then(Value::as_object_mut)
                    {
                        dest.remove("subset");
                    }
                    if let Some(o) = restored.as_object_mut() {
                        o.insert("weight".into(), json!(w));
                    }
                    if originals
                        .get(pair_index)
                        .copied()
                        .unwrap_or(Some(w))
                        .is_none()
                    {
                        weightless.push(out.len());
                    }
                    out.push(restored);
                    pair_index += 1;
                    i += if next_is_rec { 2 } else { 1 };
                    continue;
                }
                if ours && dest_subset(d) == Some(RECORDING_SUBSET) {
                    // A lone recording destination: its weight goes back to the host.
                    let mut restored = d.clone();
                    if let Some(dest) = restored
                        .get_mut("destination")
                        .and_then(Value::as_object_mut)
                    {
                        dest.remove("subset");
                    }
                    out.push(restored);
                    i += 1;
                    continue;
                }
                out.push(d.clone());
                i += 1;
            }
            // A weight is dropped only where it means nothing: a route's single destination.
            // (The note is by position; if routes were removed meanwhile, a weight it calls
            // absent may belong to a route that splits, and is then kept.)
            if out.len() == 1 {
                for k in weightless {
                    if let Some(o) = out[k].as_object_mut() {
                        o.remove("weight");
                    }
                }
            }
            *ds = out;
        }
    }
    http
}

/// The two subsets this controller adds.
pub fn our_subsets() -> [Value; 2] {
    [
        json!({"name": STABLE_SUBSET, "labels": {ROLE_LABEL: ROLE_STABLE}}),
        json!({"name": RECORDING_SUBSET, "labels": {ROLE_LABEL: ROLE_RECORDING}}),
    ]
}

/// Whether a DestinationRule's spec holds both subsets exactly as we define them.
pub fn has_our_subsets(spec: &Value) -> bool {
    let subsets = spec.get("subsets").and_then(Value::as_array);
    our_subsets().iter().all(|want| {
        subsets.is_some_and(|ss| {
            ss.iter()
                .any(|s| s.get("name") == want.get("name") && s.get("labels") == want.get("labels"))
        })
    })
}

/// Whether a DestinationRule's spec holds any subset of ours.
pub fn has_any_of_our_subsets(spec: &Value) -> bool {
    spec.get("subsets")
        .and_then(Value::as_array)
        .is_some_and(|ss| ss.iter().any(is_our_subset))
}

fn is_our_subset(s: &Value) -> bool {
    matches!(
        s.get("name").and_then(Value::as_str),
        Some(STABLE_SUBSET) | Some(RECORDING_SUBSET)
    )
}

/// Subset names in a DestinationRule that collide with ours but select other labels.
pub fn foreign_subset_with_our_name(spec: &Value) -> Option<String> {
    let wanted = our_subsets();
    spec.get("subsets")
        .and_then(Value::as_array)
        .and_then(|ss| {
            ss.iter().find_map(|s| {
                let name = s.get("name")?;
                let w = wanted.iter().find(|w| w.get("name") == Some(name))?;
                (s.get("labels") != w.get("labels"))
                    .then(|| name.as_str().unwrap_or_default().to_string())
            })
        })
}

/// `spec.subsets` with ours added at the end (replacing any of ours that were there).
pub fn with_our_subsets(spec: &Value) -> Value {
    let mut subsets: Vec<Value> = spec
        .get("subsets")
        .and_then(Value::as_array)
        .map(|ss| ss.iter().filter(|s| !is_our_subset(s)).cloned().collect())
        .unwrap_or_default();
    subsets.extend(our_subsets());
    Value::Array(subsets)
}

/// `spec.subsets` without ours; `None` when the field should be removed altogether
/// (it was absent before we added ours).
pub fn without_our_subsets(spec: &Value, field_was_absent: bool) -> Option<Value> {
    let subsets: Vec<Value> = spec
        .get("subsets")
        .and_then(Value::as_array)
        .map(|ss| ss.iter().filter(|s| !is_our_subset(s)).cloned().collect())
        .unwrap_or_default();
    if subsets.is_empty() && field_was_absent {
        None
    } else {
        Some(Value::Array(subsets))
    }
}

/// Restore note for a DestinationRule: whether `spec.subsets` existed before.
pub fn dr_restore_note(spec: &Value, canary: &str) -> String {
    json!({"canary": canary, "subsetsAbsent": spec.get("subsets").is_none()}).to_string()
}

/// Reads a DestinationRule restore note: (canary, subsets field was absent).
pub fn parse_dr_restore_note(note: Option<&str>) -> (Option<String>, bool) {
    let Some(v) = note.and_then(|n| serde_json::from_str::<Value>(n).ok()) else {
        return (None, false);
    };
    (
        v.get("canary").and_then(Value::as_str).map(String::from),
        v.get("subsetsAbsent")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    )
}

/// Escapes a key for a JSON pointer (RFC 6901).
pub fn pointer_escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// JSON-patch operations that set (or, with `None`, remove) our restore annotation,
/// given the object's current metadata.
pub fn annotation_ops(obj: &Value, value: Option<&str>) -> Vec<Value> {
    let annotations = obj
        .pointer("/metadata/annotations")
        .and_then(Value::as_object);
    let path = format!(
        "/metadata/annotations/{}",
        pointer_escape(RESTORE_ANNOTATION)
    );
    match (annotations, value) {
        (None, Some(v)) => {
            let mut m = Map::new();
            m.insert(RESTORE_ANNOTATION.into(), Value::String(v.into()));
            vec![json!({"op": "add", "path": "/metadata/annotations", "value": m})]
        }
        (Some(_), Some(v)) => vec![json!({"op": "add", "path": path, "value": v})],
        (Some(a), None) if a.contains_key(RESTORE_ANNOTATION) => {
            if a.len() == 1 {
                vec![json!({"op": "remove", "path": "/metadata/annotations"})]
            } else {
                vec![json!({"op": "remove", "path": path})]
            }
        }
        _ => vec![],
    }
}

/// A test of `metadata.resourceVersion`, the guard every patch of a user object starts with.
pub fn rv_test(obj: &Value) -> Vec<Value> {
    match obj
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
    {
        Some(rv) => vec![json!({"op": "test", "path": "/metadata/resourceVersion", "value": rv})],
        None => vec![],
    }
}

#[cfg(test)]
#[path = "istio_props.rs"]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> ServiceHost {
        ServiceHost::new("frontend", "shop", "cluster.local")
    }

    #[test]
    fn short_and_long_host_names_match_the_service() {
        let h = host();
        assert!(h.matches("frontend", "shop"));
        assert!(!h.matches("frontend", "other"));
        assert!(h.matches("frontend.shop", "other"));
        assert!(h.matches("frontend.shop.svc", "other"));
        assert!(h.matches("frontend.shop.svc.cluster.local", "other"));
        assert!(!h.matches("frontend.shop.svc.example.org", "shop"));
        assert!(!h.matches("backend", "shop"));
    }

    #[test]
    fn recording_share_keeps_the_route_sum() {
        for w in 0..=100 {
            for p in 0..=100 {
                let r = recording_share(w, p);
                assert!(r >= 0 && r <= w, "w={w} p={p} r={r}");
            }
        }
        assert_eq!(recording_share(100, 10), 10);
        assert_eq!(recording_share(80, 25), 20);
        assert_eq!(recording_share(30, 5), 2); // 1.5 rounds half up
    }

    #[test]
    fn split_then_unsplit_restores_exactly_and_keeps_unknown_fields() {
        let spec = json!({
            "hosts": ["frontend"],
            "futureField": {"x": 1},
            "http": [
                {"name": "hdr", "match": [{"headers": {"x": {"exact": "1"}}}],
                 "route": [{"destination": {"host": "frontend", "port": {"number": 80}}, "headers": {"request": {"set": {"a": "b"}}}}],
                 "retries": {"attempts": 3}, "timeout": "10s", "unknownRouteField": true},
                {"route": [
                    {"destination": {"host": "frontend"}, "weight": 80},
                    {"destination": {"host": "legacy"}, "weight": 20}
                ]}
            ]
        });
        let s = split_http(&spec, &host(), "shop", 10, None, "c");
        let mut after = spec.clone();
        after["http"] = s.http.clone();
        let r0 = &after["http"][0]["route"];
        assert_eq!(r0[0]["weight"], 90);
        assert_eq!(r0[1]["weight"], 10);
        assert_eq!(r0[0]["destination"]["port"]["number"], 80);
        assert_eq!(r0[1]["headers"]["request"]["set"]["a"], "b");
        assert_eq!(after["http"][0]["unknownRouteField"], true);
        let r1 = &after["http"][1]["route"];
        assert_eq!(r1[0]["weight"], 72);
        assert_eq!(r1[1]["weight"], 8);
        assert_eq!(r1[2]["weight"], 20);
        let st = read_split(&after, &host(), "shop");
        assert_eq!(st.pairs, 2);
        assert_eq!(st.unsplit, 0);
        assert_eq!(st.percent, Some(10));

        let back = unsplit_http(&after, &host(), "shop", Some(&s.note));
        let mut restored = after.clone();
        restored["http"] = back;
        assert_eq!(restored, spec);
    }

    #[test]
    fn reweighting_a_split_route_keeps_the_original_weights_in_the_note() {
        let spec = json!({"http": [{"route": [{"destination": {"host": "frontend"}}]}]});
        let s1 = split_http(&spec, &host(), "shop", 10, None, "c");
        let mut v = spec.clone();
        v["http"] = s1.http;
        let s2 = split_http(&v, &host(), "shop", 25, Some(&s1.note), "c");
        v["http"] = s2.http;
        assert_eq!(v["http"][0]["route"][0]["weight"], 75);
        assert_eq!(v["http"][0]["route"][1]["weight"], 25);
        let back = unsplit_http(&v, &host(), "shop", Some(&s2.note));
        assert_eq!(back, spec["http"]);
    }

    #[test]
    fn rollback_keeps_a_needed_weight_when_routes_were_removed_meanwhile() {
        // Split with route 0 (single destination, no weight) and route 1 (80/20); then the user
        // removes route 0: the note's first entry (no weight) now lines up with route 1.
        let spec = json!({"http": [
            {"route": [{"destination": {"host": "frontend"}}]},
            {"route": [{"destination": {"host": "frontend"}, "weight": 80},
                       {"destination": {"host": "legacy"}, "weight": 20}]}
        ]});
        let s = split_http(&spec, &host(), "shop", 10, None, "c");
        let mut v = spec.clone();
        v["http"] = s.http;
        if let Some(a) = v["http"].as_array_mut() {
            a.remove(0);
        }
        let back = unsplit_http(&v, &host(), "shop", Some(&s.note));
        assert_eq!(
            back,
            json!([{"route": [{"destination": {"host": "frontend"}, "weight": 80},
                              {"destination": {"host": "legacy"}, "weight": 20}]}])
        );
    }

    #[test]
    fn destinations_with_a_user_subset_are_left_alone() {
        let spec =
            json!({"http": [{"route": [{"destination": {"host": "frontend", "subset": "v1"}}]}]});
        let s = split_http(&spec, &host(), "shop", 10, None, "c");
        assert_eq!(s.http, spec["http"]);
        assert_eq!(read_split(&spec, &host(), "shop").unsplit, 0);
    }

    #[test]
    fn subsets_are_added_and_removed_without_touching_others() {
        let spec = json!({"host": "frontend", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}},
                          "subsets": [{"name": "v1", "labels": {"version": "v1"}, "newField": 1}]});
        let added = with_our_subsets(&spec);
        assert_eq!(added.as_array().map(Vec::len), Some(3));
        let mut s2 = spec.clone();
        s2["subsets"] = added;
        assert!(has_our_subsets(&s2));
        assert_eq!(
            without_our_subsets(&s2, false),
            Some(spec["subsets"].clone())
        );

        let bare = json!({"host": "frontend"});
        let mut b2 = bare.clone();
        b2["subsets"] = with_our_subsets(&bare);
        assert_eq!(without_our_subsets(&b2, true), None);
    }

    #[test]
    fn mesh_and_gateway_binding() {
        assert!(is_mesh_bound(&json!({})));
        assert!(is_mesh_bound(&json!({"gateways": ["mesh", "gw"]})));
        assert!(!is_mesh_bound(&json!({"gateways": ["gw"]})));
        let spec = json!({"gateways": ["istio-system/public"]});
        assert!(is_bound_to_gateways(
            &spec,
            "shop",
            &["istio-system/public".into()],
            "shop"
        ));
        assert!(!is_bound_to_gateways(
            &spec,
            "shop",
            &["public".into()],
            "shop"
        ));
    }

    #[test]
    fn annotation_ops_remove_the_map_we_created() {
        let obj = json!({"metadata": {"annotations": {RESTORE_ANNOTATION: "{}"}}});
        assert_eq!(
            annotation_ops(&obj, None),
            vec![json!({"op": "remove", "path": "/metadata/annotations"})]
        );
        let obj = json!({"metadata": {}});
        let ops = annotation_ops(&obj, Some("x"));
        assert_eq!(ops[0]["path"], "/metadata/annotations");
    }
}
