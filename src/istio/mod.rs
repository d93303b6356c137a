//! Istio VirtualService and DestinationRule handling, on plain JSON values.
//!
//! User objects are never deserialised into structs: every field this code does not know,
//! including fields from newer Istio versions, survives a read-modify-write untouched.

use kube::api::ApiResource;
use serde_json::{Map, Value, json};

pub mod matches;
pub mod status;

use crate::api::split::percent_of;
use crate::api::{
    RECORDING_SUBSET, RESTORE_ANNOTATION, ROLE_LABEL, ROLE_RECORDING, ROLE_STABLE, STABLE_SUBSET,
};

/// The VirtualService resource (`networking.istio.io/v1`, served since Istio 1.22).
pub fn virtual_service_resource() -> ApiResource {
    crate::api::MeshKind::VirtualService.api_resource()
}

/// The DestinationRule resource.
pub fn destination_rule_resource() -> ApiResource {
    crate::api::MeshKind::DestinationRule.api_resource()
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
    let p = i128::from(percent.clamp(0, 100));
    // In i128: a weight near i64::MAX (a VirtualService that bypassed Istio's validation) must
    // not overflow. The share is at most `w`, so it fits back.
    let share = (i128::from(w.max(0)) * p + 50) / 100;
    i64::try_from(share).unwrap_or(i64::MAX)
}

/// Name (or name suffix, after the split route's own name and a `-`) of a route a canary
/// inserts ahead of a split route for its `spec.always` matches.
pub const ALWAYS_ROUTE: &str = "rcanary-always";
/// The same for `spec.never`.
pub const NEVER_ROUTE: &str = "rcanary-never";

/// What a split should look like (shared by both routers).
pub use crate::api::split::Shape;

/// What the split of one VirtualService looks like now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SplitState {
    /// Number of split destinations found: stable/recording pairs, or stable destinations of a
    /// route that mirrors to the recording subset.
    pub pairs: usize,
    /// Destinations to the host without a subset, which a split would replace.
    pub unsplit: usize,
    /// The share sent (or mirrored) to the recording subset by the first split route that carries
    /// traffic, in percent (0 when every split route has weight 0).
    pub percent: Option<i32>,
    /// Whether any route refers to one of our subsets at all.
    pub references_subsets: bool,
    /// Whether the split mirrors (Mirror mode) rather than weighs.
    pub mirrored: bool,
    /// Whether any route sends (or mirrors) requests to the recording subset: a recording
    /// destination with a weight above 0 (or the only destination of its route), or our mirror
    /// with a percentage above 0. Not only the first split route: a route that gives the host
    /// weight 0 comes first in some VirtualServices.
    pub recording_gets_traffic: bool,
    /// Routes inserted for `spec.always`.
    pub always_routes: usize,
    /// Routes inserted for `spec.never`.
    pub never_routes: usize,
}

/// One route's walk over its destinations to the host: a visitor of the split's building blocks.
enum Dest<'a> {
    /// Our stable destination followed by our recording one.
    Pair(&'a Value, &'a Value),
    /// Our stable destination alone (Mirror mode, or a half-restored pair).
    Stable(&'a Value),
    /// Our recording destination alone.
    Recording(&'a Value),
    /// A destination to the host without a subset.
    Unsplit(&'a Value),
    /// Anything else (another host, a user's subset).
    Other(&'a Value),
}

/// The destinations of a route, grouped as the split sees them. The one route walk.
fn walk<'a>(route: &'a Value, host: &ServiceHost, obj_ns: &str) -> Vec<Dest<'a>> {
    let ds = destinations(route);
    let ours = |d: &Value| dest_host(d).is_some_and(|h| host.matches(h, obj_ns));
    let mut out = Vec::with_capacity(ds.len());
    let mut i = 0;
    while i < ds.len() {
        let d = ds[i];
        let next_rec = ds
            .get(i + 1)
            .is_some_and(|n| ours(n) && dest_subset(n) == Some(RECORDING_SUBSET));
        out.push(match (ours(d), dest_subset(d)) {
            (true, Some(STABLE_SUBSET)) if next_rec => {
                i += 1;
                Dest::Pair(d, ds[i])
            }
            (true, Some(STABLE_SUBSET)) => Dest::Stable(d),
            (true, Some(RECORDING_SUBSET)) => Dest::Recording(d),
            (true, None) => Dest::Unsplit(d),
            _ => Dest::Other(d),
        });
        i += 1;
    }
    out
}

/// Our entry in a route's `mirrors`: to the recording subset of the host.
fn is_our_mirror(m: &Value, host: &ServiceHost, obj_ns: &str) -> bool {
    dest_host(m).is_some_and(|h| host.matches(h, obj_ns))
        && dest_subset(m) == Some(RECORDING_SUBSET)
}

fn our_mirror<'a>(route: &'a Value, host: &ServiceHost, obj_ns: &str) -> Option<&'a Value> {
    route
        .get("mirrors")
        .and_then(Value::as_array)?
        .iter()
        .find(|m| is_our_mirror(m, host, obj_ns))
}

/// Whether a route was inserted by a canary for `always` (`Some(true)`) or `never`
/// (`Some(false)`): named so, and sending only to our subsets of the host.
fn inserted(route: &Value, host: &ServiceHost, obj_ns: &str) -> Option<bool> {
    let name = route.get("name").and_then(Value::as_str)?;
    let always = if name == ALWAYS_ROUTE || name.ends_with(&format!("-{ALWAYS_ROUTE}")) {
        true
    } else if name == NEVER_ROUTE || name.ends_with(&format!("-{NEVER_ROUTE}")) {
        false
    } else {
        return None;
    };
    let ds = walk(route, host, obj_ns);
    let only_ours = !ds.is_empty()
        && ds
            .iter()
            .all(|d| matches!(d, Dest::Stable(_) | Dest::Recording(_)));
    only_ours.then_some(always)
}

/// The percent in a mirror's `percentage.value` (a number, 0 to 100).
fn mirror_percent(m: &Value) -> i32 {
    m.pointer("/percentage/value")
        .and_then(Value::as_f64)
        .map(|p| p.clamp(0.0, 100.0).round() as i32)
        .unwrap_or(100)
}

/// Reads the split back from a VirtualService's spec.
pub fn read_split(spec: &Value, host: &ServiceHost, obj_ns: &str) -> SplitState {
    let mut st = SplitState::default();
    for r in http_routes(spec) {
        if let Some(always) = inserted(r, host, obj_ns) {
            if always {
                st.always_routes += 1;
            } else {
                st.never_routes += 1;
            }
            st.references_subsets = true;
            continue;
        }
        let mirror = our_mirror(r, host, obj_ns);
        if mirror.is_some() {
            st.references_subsets = true;
            if mirror.is_some_and(|m| mirror_percent(m) > 0) {
                st.recording_gets_traffic = true;
            }
        }
        let walked = walk(r, host, obj_ns);
        let single = destinations(r).len() == 1;
        for d in walked {
            match d {
                Dest::Pair(s, rec) => {
                    st.references_subsets = true;
                    let s = dest_weight(s).unwrap_or(0).max(0);
                    let rec = dest_weight(rec).unwrap_or(0).max(0);
                    if rec > 0 {
                        st.recording_gets_traffic = true;
                    }
                    // The first pair that carries traffic says the percent: a pair of weight 0
                    // (a "dark" route ahead of the default one) says nothing.
                    if s.saturating_add(rec) > 0 {
                        st.percent.get_or_insert(percent_of(rec, s));
                    }
                    st.pairs += 1;
                }
                Dest::Recording(rec) => {
                    st.references_subsets = true;
                    if dest_weight(rec).map_or(single, |w| w > 0) {
                        st.recording_gets_traffic = true;
                    }
                }
                Dest::Stable(_) if mirror.is_some() => {
                    st.mirrored = true;
                    st.percent
                        .get_or_insert(mirror.map(mirror_percent).unwrap_or(0));
                    st.pairs += 1;
                }
                Dest::Stable(_) => st.references_subsets = true,
                Dest::Unsplit(_) => st.unsplit += 1,
                Dest::Other(_) => {}
            }
        }
    }
    if st.pairs > 0 {
        st.percent.get_or_insert(0);
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

/// Why a VirtualService cannot take a shape: a route mirrors with the deprecated `mirror`
/// field (Mirror mode), or its `match` cannot be ANDed exactly with `always`/`never`.
pub fn shape_problem(
    spec: &Value,
    host: &ServiceHost,
    obj_ns: &str,
    shape: &Shape,
) -> Option<String> {
    for (i, r) in http_routes(spec).into_iter().enumerate() {
        if inserted(r, host, obj_ns).is_some() {
            continue;
        }
        let splits = walk(r, host, obj_ns)
            .iter()
            .any(|d| !matches!(d, Dest::Other(_)));
        if !splits {
            continue;
        }
        let name = r
            .get("name")
            .and_then(Value::as_str)
            .map(|n| format!("http route {i} ({n})"))
            .unwrap_or_else(|| format!("http route {i}"));
        if shape.mirror && r.get("mirror").is_some() {
            return Some(format!(
                "{name} mirrors with the field `mirror`, which Istio does not allow together with `mirrors`: move it to `mirrors` to use mode Mirror"
            ));
        }
        for (field, ours) in [("never", shape.never), ("always", shape.always)] {
            if ours.is_empty() {
                continue;
            }
            if let Err(e) = matches::and(r.get("match"), ours) {
                return Some(format!(
                    "{name}: spec.{field} cannot be combined with its match: {e}"
                ));
            }
        }
    }
    None
}

/// Splits every route to the host into the shape: each destination to the host (without a
/// subset) becomes the stable/recording pair at `percent` (or, mirroring, the stable destination
/// with the route mirroring `percent` to the recording subset), and the `never` and `always`
/// routes go in ahead of each such route. Everything else is left as it is. `previous_note`
/// carries the original weights of pairs split earlier. Splitting a split spec re-shapes it:
/// the result depends only on the original routes and the shape.
pub fn split_http(
    spec: &Value,
    host: &ServiceHost,
    obj_ns: &str,
    shape: &Shape,
    previous_note: Option<&str>,
    canary: &str,
) -> Split {
    let (_, previous) = parse_restore_note(previous_note);
    let base = unsplit_http(spec, host, obj_ns, previous_note);
    let mut originals: Vec<Option<i64>> = Vec::new();
    let mut http = Vec::new();
    for r in base.as_array().into_iter().flatten() {
        let before = originals.len();
        let split = split_route(r, host, obj_ns, shape, &mut originals);
        if originals.len() > before {
            http.extend(forced_routes(r, &split, host, obj_ns, shape));
        }
        http.push(split);
    }
    // A destination that had no weight before the first split keeps that in the note.
    for (o, p) in originals.iter_mut().zip(previous) {
        if p.is_none() {
            *o = None;
        }
    }
    let http = if spec.get("http").is_none() && http.is_empty() {
        json!([])
    } else {
        Value::Array(http)
    };
    Split {
        http,
        note: restore_note(&originals, canary),
    }
}

/// One original route, split. Pushes the original weight of every destination it splits.
fn split_route(
    r: &Value,
    host: &ServiceHost,
    obj_ns: &str,
    shape: &Shape,
    originals: &mut Vec<Option<i64>>,
) -> Value {
    let ds = walk(r, host, obj_ns);
    let single = ds.len() == 1;
    let mut out: Vec<Value> = Vec::with_capacity(ds.len() + 1);
    let mut mirror_dest: Option<Value> = None;
    for d in ds {
        let Dest::Unsplit(d) = d else {
            out.push(match d {
                Dest::Pair(..) | Dest::Unsplit(_) => continue, // none after unsplit_http
                Dest::Stable(d) | Dest::Recording(d) | Dest::Other(d) => d.clone(),
            });
            continue;
        };
        let original = dest_weight(d);
        originals.push(original);
        if shape.mirror {
            let mut stable = d.clone();
            set_subset(&mut stable, STABLE_SUBSET, original);
            out.push(stable);
            mirror_dest.get_or_insert_with(|| d.clone());
        } else {
            let w = match original {
                Some(w) => w.max(0),
                None if single => 100,
                None => 0,
            };
            out.extend(pair(d, w, shape.percent));
        }
    }
    let mut r = r.clone();
    if let Some(o) = r.as_object_mut() {
        o.insert("route".into(), Value::Array(out));
    }
    if let Some(d) = mirror_dest
        && r.get("mirror").is_none()
    {
        add_our_mirror(&mut r, &d, shape.percent);
    }
    r
}

/// Adds our entry (to the recording subset of destination `d`'s host, at `percent`) to a
/// route's `mirrors`.
fn add_our_mirror(r: &mut Value, d: &Value, percent: i32) {
    let mut dest = d.get("destination").cloned().unwrap_or_else(|| json!({}));
    if let Some(o) = dest.as_object_mut() {
        o.insert("subset".into(), Value::String(RECORDING_SUBSET.into()));
    }
    let entry = json!({"destination": dest, "percentage": {"value": percent.clamp(0, 100)}});
    let Some(o) = r.as_object_mut() else { return };
    match o.get_mut("mirrors").and_then(Value::as_array_mut) {
        Some(ms) => ms.push(entry),
        None => {
            o.insert("mirrors".into(), json!([entry]));
        }
    }
}

/// Removes our entries from a route's `mirrors` (and the field, if nothing else is left).
fn remove_our_mirrors(r: &mut Value, host: &ServiceHost, obj_ns: &str) {
    let Some(o) = r.as_object_mut() else { return };
    let Some(ms) = o.get_mut("mirrors").and_then(Value::as_array_mut) else {
        return;
    };
    let before = ms.len();
    ms.retain(|m| !is_our_mirror(m, host, obj_ns));
    if ms.is_empty() && before > 0 {
        o.remove("mirrors");
    }
}

/// The routes that go in ahead of `split` (the split of the original route `original`): first
/// `never` to the stable subset, then `always` to the recording subset (mirrored at 100 %, in
/// Mirror mode), each a copy of the split route with the original match ANDed with ours.
fn forced_routes(
    original: &Value,
    split: &Value,
    host: &ServiceHost,
    obj_ns: &str,
    shape: &Shape,
) -> Vec<Value> {
    let Some(d) = walk(original, host, obj_ns)
        .into_iter()
        .find_map(|d| match d {
            Dest::Unsplit(d) => Some(d),
            _ => None,
        })
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (ours, always) in [(shape.never, false), (shape.always, true)] {
        if ours.is_empty() {
            continue;
        }
        let matches = match matches::and(original.get("match"), ours) {
            Ok(m) if !m.is_empty() => m,
            // Nothing can match both, or it cannot be said exactly (blocked before a write).
            _ => continue,
        };
        let mut r = split.clone();
        remove_our_mirrors(&mut r, host, obj_ns);
        let mut dest = d.clone();
        let subset = if always && !shape.mirror {
            RECORDING_SUBSET
        } else {
            STABLE_SUBSET
        };
        set_subset(&mut dest, subset, None);
        let suffix = if always { ALWAYS_ROUTE } else { NEVER_ROUTE };
        let name = match original.get("name").and_then(Value::as_str) {
            Some(n) => format!("{n}-{suffix}"),
            None => suffix.to_string(),
        };
        if let Some(o) = r.as_object_mut() {
            o.insert("name".into(), Value::String(name));
            o.insert("match".into(), Value::Array(matches));
            o.insert("route".into(), json!([dest]));
        }
        if always && shape.mirror {
            add_our_mirror(&mut r, d, 100);
        }
        out.push(r);
    }
    out
}

/// The stable/recording pair replacing destination `d` of weight `w`.
fn pair(d: &Value, w: i64, percent: i32) -> [Value; 2] {
    let rec = recording_share(w, percent);
    let mut stable = d.clone();
    let mut recording = d.clone();
    set_subset(&mut stable, STABLE_SUBSET, Some(w - rec));
    set_subset(&mut recording, RECORDING_SUBSET, Some(rec));
    [stable, recording]
}

/// Points `d` at `subset`, with `weight` (none: no `weight` field).
fn set_subset(d: &mut Value, subset: &str, weight: Option<i64>) {
    if let Some(dest) = d.get_mut("destination").and_then(Value::as_object_mut) {
        dest.insert("subset".into(), Value::String(subset.into()));
    }
    if let Some(o) = d.as_object_mut() {
        match weight {
            Some(w) => o.insert("weight".into(), json!(w)),
            None => o.remove("weight"),
        };
    }
}

/// Undoes [`split_http`]: the inserted routes go, our mirrors go, and each pair (or lone stable
/// destination) becomes one destination again, with its original weight (or no weight, if it
/// had none). Fields changed by others since the split are kept.
pub fn unsplit_http(spec: &Value, host: &ServiceHost, obj_ns: &str, note: Option<&str>) -> Value {
    let (_, originals) = parse_restore_note(note);
    let mut pair_index = 0usize;
    let mut http = Vec::new();
    for r in http_routes(spec) {
        if inserted(r, host, obj_ns).is_some() {
            continue;
        }
        let mut out: Vec<Value> = Vec::new();
        // Destinations that had no `weight` before the split (by the note).
        let mut weightless: Vec<usize> = Vec::new();
        for d in walk(r, host, obj_ns) {
            let (d, w) = match d {
                Dest::Pair(s, rec) => (
                    s,
                    Some(
                        dest_weight(s)
                            .unwrap_or(0)
                            .max(0)
                            .saturating_add(dest_weight(rec).unwrap_or(0).max(0)),
                    ),
                ),
                Dest::Stable(s) => (s, dest_weight(s).map(|w| w.max(0))),
                Dest::Recording(rec) => {
                    // A lone recording destination: its weight goes back to the host.
                    let mut restored = rec.clone();
                    unset_subset(&mut restored);
                    out.push(restored);
                    continue;
                }
                Dest::Unsplit(d) | Dest::Other(d) => {
                    out.push(d.clone());
                    continue;
                }
            };
            let mut restored = d.clone();
            unset_subset(&mut restored);
            if let (Some(o), Some(w)) = (restored.as_object_mut(), w) {
                o.insert("weight".into(), json!(w));
            }
            if originals.get(pair_index).copied().unwrap_or(w).is_none() {
                weightless.push(out.len());
            }
            out.push(restored);
            pair_index += 1;
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
        let mut r = r.clone();
        remove_our_mirrors(&mut r, host, obj_ns);
        if let Some(o) = r.as_object_mut()
            && o.contains_key("route")
        {
            o.insert("route".into(), Value::Array(out));
        }
        http.push(r);
    }
    Value::Array(http)
}

fn unset_subset(d: &mut Value) {
    if let Some(dest) = d.get_mut("destination").and_then(Value::as_object_mut) {
        dest.remove("subset");
    }
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

/// `spec.subsets` with those of ours that are missing added at the end, and their names. A subset
/// that is there already with our name and labels stays exactly as it is (a user's, committed to
/// git with its own traffic policy, say): it is never rewritten, and never removed on rollback.
pub fn with_our_subsets(spec: &Value) -> (Value, Vec<String>) {
    let mut subsets: Vec<Value> = spec
        .get("subsets")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut added = Vec::new();
    for want in our_subsets() {
        let name = want.get("name").and_then(Value::as_str).unwrap_or_default();
        if !subsets.iter().any(|s| s.get("name") == want.get("name")) {
            added.push(name.to_string());
            subsets.push(want);
        }
    }
    (Value::Array(subsets), added)
}

/// `spec.subsets` without the subsets a canary added (`added`, by name); `None` when the field
/// should be removed altogether (it was absent before they were added).
pub fn without_our_subsets(
    spec: &Value,
    field_was_absent: bool,
    added: &[String],
) -> Option<Value> {
    let subsets: Vec<Value> = spec
        .get("subsets")
        .and_then(Value::as_array)
        .map(|ss| {
            ss.iter()
                .filter(|s| {
                    !(is_our_subset(s)
                        && s.get("name")
                            .and_then(Value::as_str)
                            .is_some_and(|n| added.iter().any(|a| a == n)))
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    if subsets.is_empty() && field_was_absent {
        None
    } else {
        Some(Value::Array(subsets))
    }
}

/// What a DestinationRule's restore note says: which canary added subsets, whether
/// `spec.subsets` was absent before, and which subsets it added (the only ones rollback removes).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DrNote {
    pub canary: Option<String>,
    pub subsets_absent: bool,
    pub added: Vec<String>,
}

/// Restore note for a DestinationRule: whether `spec.subsets` existed before, and the subsets added.
pub fn dr_restore_note(subsets_absent: bool, canary: &str, added: &[String]) -> String {
    json!({"canary": canary, "subsetsAbsent": subsets_absent, "added": added}).to_string()
}

/// Reads a DestinationRule restore note. A note without `added` (written by an older version,
/// which added both subsets and replaced any of ours) names both.
pub fn parse_dr_restore_note(note: Option<&str>) -> DrNote {
    let Some(v) = note.and_then(|n| serde_json::from_str::<Value>(n).ok()) else {
        return DrNote::default();
    };
    DrNote {
        canary: v.get("canary").and_then(Value::as_str).map(String::from),
        subsets_absent: v
            .get("subsetsAbsent")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        added: match v.get("added").and_then(Value::as_array) {
            Some(a) => a
                .iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect(),
            None => vec![STABLE_SUBSET.to_string(), RECORDING_SUBSET.to_string()],
        },
    }
}

/// Istio's root namespace (`meshConfig.rootNamespace`, `istio-system` by default): its
/// DestinationRules apply mesh-wide, after those of the client's and the Service's namespace.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// A wildcard host of a DestinationRule: `*` or `*.<suffix>` (Istio's wildcard hosts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wildcard {
    /// What a matching FQDN ends with (`.shop.svc.cluster.local`; empty for `*`).
    suffix: String,
    /// The cluster's DNS domain, to build a Service's FQDN.
    domain: String,
}

impl Wildcard {
    /// The wildcard of `host`, if it is one.
    pub fn of(host: &str, domain: &str) -> Option<Self> {
        let host = host.trim().trim_end_matches('.').to_ascii_lowercase();
        let suffix = match host.as_str() {
            "*" => String::new(),
            h => h.strip_prefix('*')?.to_string(),
        };
        (suffix.is_empty() || suffix.starts_with('.')).then(|| Wildcard {
            suffix,
            domain: domain.to_string(),
        })
    }

    /// Whether it matches Service `name` of namespace `ns`.
    pub fn matches(&self, name: &str, ns: &str) -> bool {
        ServiceHost::new(name, ns, &self.domain)
            .fqdn()
            .ends_with(&self.suffix)
    }

    /// How specific it is: the longer the suffix, the more (Istio picks the most specific host).
    pub fn specificity(&self) -> usize {
        self.suffix.len()
    }
}

/// The TLS settings of a DestinationRule traffic policy, at the top and per port, that are not
/// exactly `{mode: ISTIO_MUTUAL}` (the only TLS settings a DestinationRule the canary creates may
/// carry over: the chart's fences refuse any other), described for a message.
pub fn tls_beyond_istio_mutual(policy: &Value) -> Option<String> {
    std::iter::once(policy)
        .chain(
            policy
                .get("portLevelSettings")
                .and_then(Value::as_array)
                .into_iter()
                .flatten(),
        )
        .filter_map(|p| p.get("tls"))
        .find(|tls| **tls != json!({"mode": "ISTIO_MUTUAL"}))
        .map(|tls| tls.to_string())
}

/// The namespaces that see an Istio object, by its `exportTo` (absent or empty: all, Istio's
/// default; the mesh config can change that default, which the controller cannot read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    All,
    /// These namespaces only (`.` resolved to the object's own; `~`: none).
    Some(std::collections::BTreeSet<String>),
}

impl Audience {
    /// The audience of an object, from `spec.exportTo`.
    pub fn of(obj: &Value) -> Self {
        let ns = obj
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let list: Vec<&str> = obj
            .pointer("/spec/exportTo")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if list.is_empty() || list.contains(&"*") {
            return Audience::All;
        }
        Audience::Some(
            list.into_iter()
                .filter(|e| *e != "~")
                .map(|e| if e == "." { ns } else { e }.to_string())
                .collect(),
        )
    }

    /// Whether every namespace that sees `other` sees this too.
    pub fn covers(&self, other: &Audience) -> bool {
        match (self, other) {
            (Audience::All, _) => true,
            (Audience::Some(_), Audience::All) => false,
            (Audience::Some(mine), Audience::Some(theirs)) => theirs.is_subset(mine),
        }
    }

    /// For messages: `every namespace` or the list.
    pub fn describe(&self) -> String {
        match self {
            Audience::All => "every namespace".into(),
            Audience::Some(s) if s.is_empty() => "no namespace".into(),
            Audience::Some(s) => format!(
                "namespace(s) {}",
                s.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
        }
    }
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
    fn weights_near_the_i64_limit_neither_overflow_nor_panic() {
        // A VirtualService that bypassed Istio's validation (its webhook off or failing open).
        let big = i64::MAX - 1;
        let spec = json!({"http": [{"route": [
            {"destination": {"host": "frontend"}, "weight": big},
            {"destination": {"host": "legacy"}, "weight": big}]}]});
        let s = split_http(&spec, &host(), "shop", &Shape::weights(50), None, "c");
        let split = json!({"http": s.http});
        let r0 = &split["http"][0]["route"];
        let (stable, rec) = (r0[0]["weight"].as_i64(), r0[1]["weight"].as_i64());
        assert_eq!(rec, Some(big / 2));
        assert_eq!(stable.zip(rec).map(|(a, b)| a + b), Some(big));
        let st = read_split(&split, &host(), "shop");
        assert_eq!(st.percent, Some(50));
        assert!(st.recording_gets_traffic);
        let back = unsplit_http(&split, &host(), "shop", Some(&s.note));
        assert_eq!(back, spec["http"]);
        assert_eq!(recording_share(i64::MAX, 100), i64::MAX);
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
        let s = split_http(&spec, &host(), "shop", &Shape::weights(10), None, "c");
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
        let s1 = split_http(&spec, &host(), "shop", &Shape::weights(10), None, "c");
        let mut v = spec.clone();
        v["http"] = s1.http;
        let s2 = split_http(
            &v,
            &host(),
            "shop",
            &Shape::weights(25),
            Some(&s1.note),
            "c",
        );
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
        let s = split_http(&spec, &host(), "shop", &Shape::weights(10), None, "c");
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
        let s = split_http(&spec, &host(), "shop", &Shape::weights(10), None, "c");
        assert_eq!(s.http, spec["http"]);
        assert_eq!(read_split(&spec, &host(), "shop").unsplit, 0);
    }

    #[test]
    fn subsets_are_added_and_removed_without_touching_others() {
        let spec = json!({"host": "frontend", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}},
                          "subsets": [{"name": "v1", "labels": {"version": "v1"}, "newField": 1}]});
        let (added, names) = with_our_subsets(&spec);
        assert_eq!(added.as_array().map(Vec::len), Some(3));
        assert_eq!(names, [STABLE_SUBSET, RECORDING_SUBSET]);
        let mut s2 = spec.clone();
        s2["subsets"] = added;
        assert!(has_our_subsets(&s2));
        assert_eq!(
            without_our_subsets(&s2, false, &names),
            Some(spec["subsets"].clone())
        );

        let bare = json!({"host": "frontend"});
        let mut b2 = bare.clone();
        let (added, names) = with_our_subsets(&bare);
        b2["subsets"] = added;
        assert_eq!(without_our_subsets(&b2, true, &names), None);
    }

    #[test]
    fn a_users_subset_with_our_name_is_never_rewritten_nor_removed() {
        // Committed to git with its own policy, so that a GitOps tool does not fight the canary.
        let users = json!({"name": STABLE_SUBSET, "labels": {ROLE_LABEL: ROLE_STABLE},
                           "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": 7}}}});
        let spec = json!({"host": "frontend", "subsets": [users.clone()]});
        let (with, names) = with_our_subsets(&spec);
        assert_eq!(names, [RECORDING_SUBSET], "only the missing one is added");
        assert_eq!(with[0], users, "the user's subset is kept as it is");
        let mut s2 = spec.clone();
        s2["subsets"] = with;
        assert_eq!(
            without_our_subsets(&s2, false, &names),
            Some(json!([users]))
        );
        // An old note (no `added`) names both, as the old writer replaced both.
        let old = parse_dr_restore_note(Some(r#"{"canary":"c","subsetsAbsent":false}"#));
        assert_eq!(old.added, [STABLE_SUBSET, RECORDING_SUBSET]);
        let new = parse_dr_restore_note(Some(&dr_restore_note(true, "c", &names)));
        assert_eq!(
            new,
            DrNote {
                canary: Some("c".into()),
                subsets_absent: true,
                added: vec![RECORDING_SUBSET.to_string()]
            }
        );
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
    fn never_and_always_routes_go_ahead_of_the_split_route_with_its_fields_and_match() {
        let spec = json!({"http": [{
            "name": "api",
            "match": [{"uri": {"prefix": "/api"}}],
            "timeout": "3s",
            "retries": {"attempts": 2},
            "route": [{"destination": {"host": "frontend", "port": {"number": 80}}}],
        }]});
        let always = [json!({"headers": {"x-record": {"exact": "1"}}})];
        let never = [json!({"uri": {"prefix": "/api/admin"}})];
        let shape = Shape {
            percent: 10,
            mirror: false,
            always: &always,
            never: &never,
        };
        let s = split_http(&spec, &host(), "shop", &shape, None, "c");
        let dest =
            |subset: &str| json!({"host": "frontend", "port": {"number": 80}, "subset": subset});
        assert_eq!(
            s.http,
            json!([
                {"name": "api-rcanary-never", "match": [{"uri": {"prefix": "/api/admin"}}],
                 "timeout": "3s", "retries": {"attempts": 2},
                 "route": [{"destination": dest(STABLE_SUBSET)}]},
                {"name": "api-rcanary-always",
                 "match": [{"uri": {"prefix": "/api"}, "headers": {"x-record": {"exact": "1"}}}],
                 "timeout": "3s", "retries": {"attempts": 2},
                 "route": [{"destination": dest(RECORDING_SUBSET)}]},
                {"name": "api", "match": [{"uri": {"prefix": "/api"}}], "timeout": "3s",
                 "retries": {"attempts": 2},
                 "route": [{"destination": dest(STABLE_SUBSET), "weight": 90},
                           {"destination": dest(RECORDING_SUBSET), "weight": 10}]},
            ])
        );
        let v = json!({"http": s.http});
        let st = read_split(&v, &host(), "shop");
        assert_eq!((st.always_routes, st.never_routes, st.pairs), (1, 1, 1));
        assert_eq!(
            unsplit_http(&v, &host(), "shop", Some(&s.note)),
            spec["http"]
        );
        // Without forced requests (a drained clone), the always route goes, never stays.
        let drained = Shape {
            always: &[],
            percent: 0,
            ..shape
        };
        let d = split_http(&v, &host(), "shop", &drained, Some(&s.note), "c");
        let names: Vec<&str> = d
            .http
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["name"].as_str())
            .collect();
        assert_eq!(names, ["api-rcanary-never", "api"]);
    }

    #[test]
    fn mirror_mode_serves_from_stable_and_mirrors_the_percent_next_to_the_users_mirrors() {
        let spec = json!({"http": [{
            "route": [{"destination": {"host": "frontend"}}],
            "mirrors": [{"destination": {"host": "audit"}}],
        }]});
        let always = [json!({"headers": {"x-record": {"exact": "1"}}})];
        let shape = Shape {
            percent: 25,
            mirror: true,
            always: &always,
            never: &[],
        };
        let s = split_http(&spec, &host(), "shop", &shape, None, "c");
        assert_eq!(
            s.http,
            json!([
                {"name": "rcanary-always", "match": [{"headers": {"x-record": {"exact": "1"}}}],
                 "route": [{"destination": {"host": "frontend", "subset": STABLE_SUBSET}}],
                 "mirrors": [{"destination": {"host": "audit"}},
                             {"destination": {"host": "frontend", "subset": RECORDING_SUBSET}, "percentage": {"value": 100}}]},
                {"route": [{"destination": {"host": "frontend", "subset": STABLE_SUBSET}}],
                 "mirrors": [{"destination": {"host": "audit"}},
                             {"destination": {"host": "frontend", "subset": RECORDING_SUBSET}, "percentage": {"value": 25}}]},
            ])
        );
        let v = json!({"http": s.http});
        let st = read_split(&v, &host(), "shop");
        assert!(st.mirrored);
        assert_eq!((st.pairs, st.percent), (1, Some(25)));
        assert_eq!(
            unsplit_http(&v, &host(), "shop", Some(&s.note)),
            spec["http"]
        );
        // Back to a weighted split, live: the mirror goes, the pair comes.
        let back = split_http(&v, &host(), "shop", &Shape::weights(25), Some(&s.note), "c");
        assert_eq!(
            back.http,
            json!([{"route": [{"destination": {"host": "frontend", "subset": STABLE_SUBSET}, "weight": 75},
                              {"destination": {"host": "frontend", "subset": RECORDING_SUBSET}, "weight": 25}],
                    "mirrors": [{"destination": {"host": "audit"}}]}])
        );
    }

    #[test]
    fn shapes_a_route_cannot_take_are_named() {
        let legacy = json!({"http": [{"route": [{"destination": {"host": "frontend"}}], "mirror": {"host": "audit"}}]});
        let mirror = Shape {
            mirror: true,
            ..Shape::weights(10)
        };
        let p = shape_problem(&legacy, &host(), "shop", &mirror).expect("a problem");
        assert!(p.contains("`mirror`"), "{p}");
        assert_eq!(
            shape_problem(&legacy, &host(), "shop", &Shape::weights(10)),
            None
        );
        let regex = json!({"http": [{"match": [{"uri": {"regex": "/a.*"}}], "route": [{"destination": {"host": "frontend"}}]}]});
        let never = [json!({"uri": {"prefix": "/a/health"}})];
        let sh = Shape {
            never: &never,
            ..Shape::weights(10)
        };
        let p = shape_problem(&regex, &host(), "shop", &sh).expect("a problem");
        assert!(p.contains("spec.never"), "{p}");
        // A route to another host is none of our business.
        let other = json!({"http": [{"match": [{"uri": {"regex": "/a.*"}}], "route": [{"destination": {"host": "backend"}}]}]});
        assert_eq!(shape_problem(&other, &host(), "shop", &sh), None);
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
