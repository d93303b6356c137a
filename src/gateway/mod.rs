//! Gateway API HTTPRoute handling, on plain JSON values: for HTTPRoutes what the `istio` module
//! does for VirtualServices (the pure core; the planner decides when to call it).
//!
//! User routes are never deserialised into structs: every field this code does not know,
//! including fields of newer Gateway API versions, survives a read-modify-write untouched. (The
//! `gateway-api` crate is also built on an older kube and k8s-openapi than this project's kube 5,
//! so its types could not be used here anyway.) The reference is the standard channel of Gateway
//! API v1.6 (`gateway.networking.k8s.io/v1`).
//!
//! # The model
//!
//! A canary splits Service `S` (namespace `ns`) between two Services it owns, `stable` and
//! `recording` ([`Backends`]): the Gateway API has no subsets, it splits between Services. An
//! HTTPRoute concerns `S` ([`concerns`]) when a parentRef names `S` (GAMMA: group `""` or `core`,
//! kind `Service`, the port if the canary names one), or one of the Gateways the canary lists. In
//! every rule, each backendRef to `S` of weight `w` (absent: 1) becomes a backendRef to `stable`
//! and one to `recording`, copies of it (port, `filters`, unknown fields) with `group: ""`,
//! `kind: Service` and `weight` written out, as the apiserver stores them, so that what is written
//! reads back equal and nothing looks like drift. Everything else stays byte-equal, except, when
//! exactness needs it, the weights of the rule's other backends (next section).
//!
//! A route is one object: when it has several parents (`S` and another Service or Gateway), its
//! split rules apply to all of them.
//!
//! # Weights: exact, and as small as possible
//!
//! Weights are integers (0 to 1,000,000) and a rule's weights are proportions of their sum. At
//! percent `p`, a backendRef to `S` of weight `w` becomes `w·k·(100−p)/100` and `w·k·p/100`, and
//! every other backendRef of the rule is multiplied by the same `k`, so that every backend keeps
//! exactly its share of the rule and `S`'s share is split exactly at `p`. `k = 100 / gcd(100,
//! p·g)`, `g` the gcd of the rule's weights to `S`, is the smallest factor that makes every weight
//! an integer: "scale by 100, then reduce by the gcd". Reducing keeps the weights far from the
//! 1,000,000 limit, and leaves the other backends untouched (`k = 1`) whenever the weights to `S`
//! allow it: weight 80 to `S` and 20 to `legacy` at 10 % becomes 72/8/20, as in a VirtualService;
//! a lone backendRef of weight 1 (the default) becomes 9/1. A route whose weights could exceed
//! 1,000,000 at some percent is refused (checked for the worst percent, so a ramp cannot block
//! half-way). All arithmetic is in `i128`.
//!
//! # The restore note
//!
//! A split writes a restore note (annotation [`RESTORE_ANNOTATION`], JSON): the canary's name
//! and, per split rule, the factor `k`, the original `group`, `kind` and `weight` of each split
//! backendRef (a missing key: the field was absent), the original weights of the rule's other
//! backendRefs when `k > 1`, and whether the rule had no `filters` before our mirror. With it,
//! [`unsplit_rules`] gives back the original rules byte for byte. Splitting a split route again
//! (a new percent, another mode) first restores, then splits: the result depends only on the
//! original and the shape. Rules are found in the note by name, else by position among split
//! rules, and an entry is used only if the rule's weights are still what it says; otherwise each
//! pair becomes one backendRef carrying the pair's weight, which keeps every share as it is.
//!
//! # Modes
//!
//! - Split: as above.
//! - Mirror: each backendRef to `S` points at `stable` with its whole weight, and the rule gets a
//!   `RequestMirror` filter copying `percent` of its requests to `recording`. The filter is in the
//!   standard channel since v1.0, its `percent` only since v1.3 (experimental in v1.2; both
//!   "Extended": optional for a mesh): on older standard CRDs the apiserver prunes `percent` and
//!   the filter mirrors every request, so Mirror mode needs the CRDs of v1.3 or later
//!   ([`mirror_percent_supported`]). A rule-level mirror copies every request of the rule, so a
//!   rule that also sends requests to other backends is refused in this mode (their requests
//!   would be copied to the clone).
//! - `always` / `never`: the canary's Istio-shaped matches ([`matches::from_istio`]) ANDed with
//!   the split rule's matches, in rules named `rcanary-never-<i>` and `rcanary-always-<i>` (`i`:
//!   the split rule's index in the original route), inserted right before the split rule. The
//!   `never` rule sends to `stable` what the split rule sent to `S` (the other backends keep
//!   theirs); the `always` rule sends only to `recording` (Mirror: to `stable`, mirrored at 100 %).
//!   Both copy the split rule's other fields. Rules whose weights to `S` are all 0 get neither.
//!
//! # Precedence
//!
//! The Gateway API does not pick the first rule that matches, but the most specific match across
//! all rules ([`matches::Rank`]): an `Exact` path, the longest `PathPrefix`, a method, the most
//! headers, the most query parameters, then the older route, then the first rule in list order.
//! ANDing never makes a match less specific, so a generated entry ranks at least as high as the
//! split rule's entry it comes from, and, listed before it, wins ties. A `never` entry `m∧n`
//! might rank below an `always` entry `m∧a` (an `always` with an exact path, a `never` with a
//! header): then `m∧n∧a` is added to the `never` rule, which ranks at least as high as `m∧a` and,
//! listed first, wins. An entry of the split rule that never wins (another rule's entry matches
//! all its requests and ranks above it) gets nothing carved out of it. Adding conditions can also
//! lift a generated entry above another rule's
//! entry that used to win over the split rule: the requests they share would change rules; such
//! a route is refused ([`ProblemKind::Precedence`]). Routes of other objects attached to the same
//! parent are not seen here.
//!
//! # The canary's own route
//!
//! With no route for the Service, the canary creates one ([`own_route`]): `S` as parent and one
//! catch-all rule (`PathPrefix /`) with the two backends. Attaching the first route to a Service
//! changes its behaviour: requests that match no rule of any route attached to it are refused
//! (404); the catch-all rule keeps every HTTP request served.
//!
//! # Limits
//!
//! The Gateway API allows 16 rules per route, 16 backendRefs per rule, 64 matches per rule and 128
//! per route. A split that would exceed one is refused ([`Problem`]), as is everything that cannot
//! be split exactly or safely: see [`ProblemKind`].

use kube::api::ApiResource;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

pub mod matches;
pub mod status;

#[cfg(test)]
mod precedence;
#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;

use self::matches::Role;
use crate::api::split::percent_of;
use crate::api::{CANARY_LABEL, RESTORE_ANNOTATION};

/// The Gateway API group.
pub const GROUP: &str = "gateway.networking.k8s.io";
/// The version used for reads and writes (HTTPRoute's storage version since v1.0).
pub const VERSION: &str = "v1";

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: GROUP.into(),
        version: VERSION.into(),
        api_version: format!("{GROUP}/{VERSION}"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// The HTTPRoute resource.
pub fn http_route_resource() -> ApiResource {
    resource("HTTPRoute", "httproutes")
}

/// The GRPCRoute resource (not split: see [`other_route_problem`]).
pub fn grpc_route_resource() -> ApiResource {
    resource("GRPCRoute", "grpcroutes")
}

/// The annotation on the Gateway API CRDs that names their release (`v1.6.1`).
pub const BUNDLE_VERSION_ANNOTATION: &str = "gateway.networking.k8s.io/bundle-version";

/// Whether CRDs of release `bundle_version` (the HTTPRoute CRD's [`BUNDLE_VERSION_ANNOTATION`])
/// keep `RequestMirror.percent`: standard since v1.3.0 (an experimental-channel CRD has it since
/// v1.2.0, which the caller may check through `gateway.networking.k8s.io/channel`). Without it the
/// apiserver prunes the field and the mirror copies every request. Unknown: `false`.
pub fn mirror_percent_supported(bundle_version: Option<&str>) -> bool {
    let Some(v) = bundle_version.map(|v| v.trim().trim_start_matches('v')) else {
        return false;
    };
    let mut parts = v.split(['.', '-']).map(|p| p.parse::<u64>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= (1, 3),
        _ => false,
    }
}

/// Rules per route (CRD `maxItems`).
pub const MAX_RULES: usize = 16;
/// BackendRefs per rule.
pub const MAX_BACKEND_REFS: usize = 16;
/// Matches per rule.
pub const MAX_MATCHES_PER_RULE: usize = 64;
/// Matches per route, over all rules (a CEL rule of the CRD).
pub const MAX_MATCHES: usize = 128;
/// The largest weight.
pub const MAX_WEIGHT: i64 = 1_000_000;

/// Name prefix of the rule inserted for `spec.always` (`rcanary-always-<i>`).
pub const ALWAYS_RULE: &str = "rcanary-always";
/// Name prefix of the rule inserted for `spec.never` (`rcanary-never-<i>`).
pub const NEVER_RULE: &str = "rcanary-never";

/// The two Services a canary owns, in the Service's namespace: one selecting only the target's
/// pods, one only the clone's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backends {
    pub stable: String,
    pub recording: String,
}

/// A port of the split Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub number: i32,
    /// Its name, which a parentRef's `sectionName` may give instead of (or besides) the number.
    pub name: Option<String>,
}

/// What is split: Service `service` of `namespace`, between `backends`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub service: String,
    pub namespace: String,
    /// The one port the canary splits; `None`: every port (a parentRef with any port or section
    /// concerns the Service).
    pub port: Option<ServicePort>,
    /// The canary's `spec.gateways` (`name` or `namespace/name`; a short name is in `namespace`):
    /// routes with one of them as parent concern the Service too.
    pub gateways: Vec<String>,
    pub backends: Backends,
}

impl Target {
    pub fn new(service: &str, namespace: &str, stable: &str, recording: &str) -> Self {
        Target {
            service: service.into(),
            namespace: namespace.into(),
            port: None,
            gateways: Vec::new(),
            backends: Backends {
                stable: stable.into(),
                recording: recording.into(),
            },
        }
    }
}

/// What a split should look like (shared by both routers).
pub use crate::api::split::Shape;

/// What kind of shape a route cannot take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// More than 16 rules after the split.
    TooManyRules,
    /// More than 16 backendRefs in a rule after the split.
    TooManyBackendRefs,
    /// More than 64 matches in a rule, or 128 in the route.
    TooManyMatches,
    /// An exact split would need a weight above 1,000,000.
    WeightTooLarge,
    /// A backendRef to the Service from a route in another namespace: the split Services would
    /// need a ReferenceGrant, which the canary does not write.
    CrossNamespace,
    /// A rule or backendRef mirrors to the Service itself, whose endpoints the clone is not kept
    /// out of: its copies would reach the clone whatever `percent` and `never` say.
    MirrorsToService,
    /// Mirror mode on a rule that also sends to other backends: their requests would be copied.
    MirrorCopiesOtherBackends,
    /// Mirror mode on a rule that sends to the Service on several ports: a mirror has one.
    MirrorPorts,
    /// `always`/`never` have no exact Gateway API form, or cannot be ANDed with a rule's match.
    Matches,
    /// A rule rewrites with `ReplacePrefixMatch`, which needs the generated rules to keep its one
    /// `PathPrefix` match.
    PrefixRewrite,
    /// A generated rule would take requests from another rule that wins over the split rule.
    Precedence,
    /// A rule of the route already has the name of a rule the canary would insert.
    RuleName,
    /// Every backendRef to the Service has weight 0: nothing of this route reaches it.
    NoTraffic,
    /// A route of another kind (GRPCRoute, …) is attached to the Service: it is not split.
    OtherRouteKind,
}

/// Why a route cannot take a shape, for a `Blocked` reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Problem {
    pub kind: ProblemKind,
    pub message: String,
}

fn problem(kind: ProblemKind, message: String) -> Problem {
    Problem { kind, message }
}

/// What the split of one route looks like now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SplitState {
    /// Split backendRefs found: stable/recording pairs, or stable backendRefs of a rule that
    /// mirrors to the recording Service.
    pub pairs: usize,
    /// BackendRefs to the Service itself, which a split would replace.
    pub unsplit: usize,
    /// The share sent (or mirrored) to the recording Service by the first pair that carries
    /// traffic, in percent (0 when no pair does).
    pub percent: Option<i32>,
    /// Whether the split mirrors (Mirror mode) rather than weighs.
    pub mirrored: bool,
    /// Whether any rule refers to one of the canary's Services at all.
    pub references_backends: bool,
    /// Whether requests reach the recording Service anywhere in the route: a backendRef to it of
    /// weight above 0 (the `always` rule's included), or our mirror with a percent above 0.
    pub recording_gets_traffic: bool,
    /// Rules inserted for `spec.always`.
    pub always_rules: usize,
    /// Rules inserted for `spec.never`.
    pub never_rules: usize,
}

/// The result of splitting a route.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    /// The new `spec.rules`.
    pub rules: Value,
    /// The restore note to keep on the route.
    pub note: String,
}

// ---------------------------------------------------------------------------------------------
// References

/// The namespace of a route (its metadata's; the Service's when absent, as for a route being
/// built).
fn route_ns<'a>(route: &'a Value, t: &'a Target) -> &'a str {
    route
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or(&t.namespace)
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// Whether a parentRef of a route in `route_ns` concerns the target: the Service (matching port
/// or section, if the canary names a port) or one of the canary's Gateways.
pub fn parent_concerns(parent: &Value, route_ns: &str, t: &Target) -> bool {
    let ns = str_of(parent, "namespace").unwrap_or(route_ns);
    let name = str_of(parent, "name").unwrap_or_default();
    // The defaults of a parentRef are a Gateway's: a Service parent must say its group.
    let group = str_of(parent, "group").unwrap_or(GROUP);
    let kind = str_of(parent, "kind").unwrap_or("Gateway");
    match (group, kind) {
        ("" | "core", "Service") => {
            if name != t.service || ns != t.namespace {
                return false;
            }
            let Some(port) = &t.port else { return true };
            let port_ok = parent
                .get("port")
                .and_then(Value::as_i64)
                .is_none_or(|p| p == i64::from(port.number));
            let section_ok = match str_of(parent, "sectionName").filter(|s| !s.is_empty()) {
                None => true,
                Some(s) => port.name.as_deref() == Some(s),
            };
            port_ok && section_ok
        }
        (GROUP, "Gateway") => t.gateways.iter().any(|g| match g.split_once('/') {
            Some((gns, gname)) => gns == ns && gname == name,
            None => t.namespace == ns && g == name,
        }),
        _ => false,
    }
}

/// Whether a route (HTTPRoute, GRPCRoute, …) has a parentRef that concerns the target.
pub fn concerns(route: &Value, t: &Target) -> bool {
    !concerning_parents(route, t).is_empty()
}

/// The parentRefs of a route that concern the target: those whose `status.parents[]` entries
/// tell whether the split is live ([`status::accepted_for_current_generation`]).
pub fn concerning_parents<'a>(route: &'a Value, t: &Target) -> Vec<&'a Value> {
    let ns = route_ns(route, t);
    route
        .pointer("/spec/parentRefs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|p| parent_concerns(p, ns, t))
        .collect()
}

/// Whether backendRef (or mirror backendRef) `r`, in a route of `route_ns`, names Service
/// `name` of `ns`.
fn refers_to(r: &Value, name: &str, ns: &str, route_ns: &str) -> bool {
    matches!(str_of(r, "group"), None | Some("" | "core"))
        && matches!(str_of(r, "kind"), None | Some("Service"))
        && str_of(r, "name") == Some(name)
        && str_of(r, "namespace").unwrap_or(route_ns) == ns
}

fn rules(route: &Value) -> &[Value] {
    route
        .pointer("/spec/rules")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn backend_refs(rule: &Value) -> &[Value] {
    rule.get("backendRefs")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn filters(v: &Value) -> &[Value] {
    v.get("filters")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// Whether any rule of a route has a backendRef to the Service.
pub fn routes_to_service(route: &Value, t: &Target) -> bool {
    let ns = route_ns(route, t);
    rules(route).iter().any(|r| {
        backend_refs(r)
            .iter()
            .any(|b| refers_to(b, &t.service, &t.namespace, ns))
    })
}

/// The weight of a backendRef (absent: 1, the Gateway API default; never below 0).
fn weight(r: &Value) -> i64 {
    r.get("weight")
        .map_or(1, |w| w.as_i64().unwrap_or(1).max(0))
}

/// A rule's backendRefs, grouped as the split sees them. The one rule walk.
enum Ref<'a> {
    /// Our stable backendRef followed by our recording one, on the same port.
    Pair(&'a Value, &'a Value),
    /// Our stable backendRef alone (Mirror mode, or a half-restored pair).
    Stable(&'a Value),
    /// Our recording backendRef alone.
    Recording(&'a Value),
    /// A backendRef to the Service itself.
    Service(&'a Value),
    /// Anything else.
    Other(&'a Value),
}

fn walk<'a>(rule: &'a Value, t: &Target, ns: &str) -> Vec<Ref<'a>> {
    let refs = backend_refs(rule);
    let is = |r: &Value, name: &str| refers_to(r, name, &t.namespace, ns);
    let mut out = Vec::with_capacity(refs.len());
    let mut i = 0;
    while i < refs.len() {
        let r = &refs[i];
        out.push(if is(r, &t.backends.stable) {
            match refs.get(i + 1) {
                Some(n) if is(n, &t.backends.recording) && n.get("port") == r.get("port") => {
                    i += 1;
                    Ref::Pair(r, n)
                }
                _ => Ref::Stable(r),
            }
        } else if is(r, &t.backends.recording) {
            Ref::Recording(r)
        } else if is(r, &t.service) {
            Ref::Service(r)
        } else {
            Ref::Other(r)
        });
        i += 1;
    }
    out
}

fn mirror_ref(f: &Value) -> Option<&Value> {
    (str_of(f, "type") == Some("RequestMirror"))
        .then(|| f.pointer("/requestMirror/backendRef"))
        .flatten()
}

fn is_our_mirror(f: &Value, t: &Target, ns: &str) -> bool {
    mirror_ref(f).is_some_and(|b| refers_to(b, &t.backends.recording, &t.namespace, ns))
}

fn our_mirror<'a>(rule: &'a Value, t: &Target, ns: &str) -> Option<&'a Value> {
    filters(rule).iter().find(|f| is_our_mirror(f, t, ns))
}

/// The percent a `RequestMirror` filter copies: `percent`, or `fraction` (denominator 100 by
/// default), or 100 when neither is set.
fn mirror_percent(f: &Value) -> i32 {
    let m = f.get("requestMirror");
    if let Some(p) = m.and_then(|m| m.get("percent")).and_then(Value::as_i64) {
        return p.clamp(0, 100) as i32;
    }
    let Some(fr) = m.and_then(|m| m.get("fraction")) else {
        return 100;
    };
    let num = i128::from(
        fr.get("numerator")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            .max(0),
    );
    let den = i128::from(
        fr.get("denominator")
            .and_then(Value::as_i64)
            .unwrap_or(100)
            .max(1),
    );
    ((num * 100 + den / 2) / den).clamp(0, 100) as i32
}

/// Whether a rule was inserted by a canary for `always` (`Some(true)`) or `never`
/// (`Some(false)`): named so, and sending to one of our Services.
fn inserted(rule: &Value, t: &Target, ns: &str) -> Option<bool> {
    let name = str_of(rule, "name")?;
    let numbered = |prefix: &str| {
        name.strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('-'))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    let always = if numbered(ALWAYS_RULE) {
        true
    } else if numbered(NEVER_RULE) {
        false
    } else {
        return None;
    };
    let ours = walk(rule, t, ns)
        .iter()
        .any(|r| matches!(r, Ref::Pair(..) | Ref::Stable(_) | Ref::Recording(_)));
    ours.then_some(always)
}

// ---------------------------------------------------------------------------------------------
// Reading

/// Reads the split back from a route.
pub fn read_split(route: &Value, t: &Target) -> SplitState {
    let ns = route_ns(route, t);
    let mut st = SplitState::default();
    for rule in rules(route) {
        let mirror = our_mirror(rule, t, ns);
        if mirror.is_some() {
            st.references_backends = true;
            if mirror.is_some_and(|m| mirror_percent(m) > 0) {
                st.recording_gets_traffic = true;
            }
        }
        if let Some(always) = inserted(rule, t, ns) {
            st.references_backends = true;
            if always {
                st.always_rules += 1;
            } else {
                st.never_rules += 1;
            }
            let to_recording = walk(rule, t, ns).iter().any(|r| match r {
                Ref::Recording(r) => weight(r) > 0,
                Ref::Pair(_, r) => weight(r) > 0,
                _ => false,
            });
            st.recording_gets_traffic |= to_recording;
            continue;
        }
        for r in walk(rule, t, ns) {
            match r {
                Ref::Pair(s, rec) => {
                    st.references_backends = true;
                    st.pairs += 1;
                    let (s, rec) = (weight(s), weight(rec));
                    if rec > 0 {
                        st.recording_gets_traffic = true;
                    }
                    if s.saturating_add(rec) > 0 {
                        st.percent.get_or_insert(percent_of(rec, s));
                    }
                }
                Ref::Stable(s) => {
                    st.references_backends = true;
                    if let Some(m) = mirror {
                        st.mirrored = true;
                        st.pairs += 1;
                        if weight(s) > 0 {
                            st.percent.get_or_insert(mirror_percent(m));
                        }
                    }
                }
                Ref::Recording(rec) => {
                    st.references_backends = true;
                    if weight(rec) > 0 {
                        st.recording_gets_traffic = true;
                    }
                }
                Ref::Service(_) => st.unsplit += 1,
                Ref::Other(_) => {}
            }
        }
    }
    if st.pairs > 0 {
        st.percent.get_or_insert(0);
    }
    st
}

// ---------------------------------------------------------------------------------------------
// The restore note

/// What a split records on a route so that rollback restores it exactly.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Note {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    canary: Option<String>,
    #[serde(default)]
    rules: Vec<RuleNote>,
}

/// One split rule in the note.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RuleNote {
    /// The rule's name, if it has one: the note's entry is found by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    /// The factor `k` the rule's weights were multiplied by.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    scale: i64,
    /// Per split backendRef, its original `group`, `kind` and `weight` (absent: absent).
    #[serde(default)]
    refs: Vec<Map<String, Value>>,
    /// Per other backendRef, its original `weight` (absent: absent); only when `scale > 1`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    others: Vec<Map<String, Value>>,
    /// Whether the rule had no `filters` before our mirror was added.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    filters_absent: bool,
}

fn one() -> i64 {
    1
}

fn is_one(v: &i64) -> bool {
    *v == 1
}

/// The fields of a backendRef the split overwrites.
const OVERWRITTEN: [&str; 3] = ["group", "kind", "weight"];

fn originals(r: &Value, keys: &[&str]) -> Map<String, Value> {
    keys.iter()
        .filter_map(|k| r.get(*k).map(|v| (k.to_string(), v.clone())))
        .collect()
}

/// The effective weight a note's entry records (absent: 1).
fn noted_weight(orig: &Map<String, Value>) -> i64 {
    orig.get("weight")
        .map_or(1, |w| w.as_i64().unwrap_or(1).max(0))
}

fn parse_note(note: Option<&str>) -> Note {
    note.and_then(|n| serde_json::from_str(n).ok())
        .unwrap_or_default()
}

/// The canary named in a route's restore note, if any.
pub fn note_owner(note: Option<&str>) -> Option<String> {
    parse_note(note).canary
}

/// The restore note on a route, if any.
pub fn restore_note_of(route: &Value) -> Option<&str> {
    route
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(RESTORE_ANNOTATION))
        .and_then(Value::as_str)
}

// ---------------------------------------------------------------------------------------------
// Restoring

/// Undoes [`split_rules`]: the inserted rules go, our mirrors go, and each pair (or lone stable
/// or recording backendRef) becomes the backendRef to the Service it was, with the fields the
/// note recorded; the other backends get their weights back. Returns the new `spec.rules`.
/// Fields changed by others since the split are kept.
pub fn unsplit_rules(route: &Value, t: &Target, note: Option<&str>) -> Value {
    let ns = route_ns(route, t);
    let note = parse_note(note);
    let mut ordinal = 0;
    let mut out = Vec::new();
    for rule in rules(route) {
        if inserted(rule, t, ns).is_some() {
            continue;
        }
        let walked = walk(rule, t, ns);
        let ours = walked
            .iter()
            .filter(|r| matches!(r, Ref::Pair(..) | Ref::Stable(_) | Ref::Recording(_)))
            .count();
        let mirror = our_mirror(rule, t, ns).is_some();
        if ours == 0 && !mirror {
            out.push(rule.clone());
            continue;
        }
        let entry = match str_of(rule, "name") {
            Some(n) => note.rules.iter().find(|e| e.name.as_deref() == Some(n)),
            None => note.rules.get(ordinal).filter(|e| e.name.is_none()),
        }
        .filter(|e| fits(e, &walked));
        ordinal += 1;
        let mut refs = Vec::with_capacity(walked.len());
        let (mut n_ours, mut n_other) = (0, 0);
        for r in &walked {
            let (r, total) = match r {
                Ref::Pair(s, rec) => (*s, weight(s).saturating_add(weight(rec))),
                Ref::Stable(r) | Ref::Recording(r) => (*r, weight(r)),
                Ref::Service(r) => {
                    refs.push((*r).clone());
                    continue;
                }
                Ref::Other(r) => {
                    let orig = entry.and_then(|e| e.others.get(n_other).map(|o| (e.scale, o)));
                    n_other += 1;
                    refs.push(other_restored(r, orig));
                    continue;
                }
            };
            let mut restored = r.clone();
            if let Some(o) = restored.as_object_mut() {
                o.insert("name".into(), json!(t.service));
                match entry.and_then(|e| e.refs.get(n_ours)) {
                    Some(orig) => restore_fields(o, orig, &OVERWRITTEN),
                    None => {
                        o.insert("weight".into(), json!(total));
                    }
                }
            }
            n_ours += 1;
            refs.push(restored);
        }
        let mut rule = rule.clone();
        if let Some(o) = rule.as_object_mut() {
            if o.contains_key("backendRefs") {
                o.insert("backendRefs".into(), Value::Array(refs));
            }
            remove_our_mirrors(o, t, ns, entry.is_some_and(|e| e.filters_absent));
        }
        out.push(rule);
    }
    Value::Array(out)
}

/// Whether a note's entry still describes a rule: as many split backendRefs, each with the
/// weight the entry says (scaled).
fn fits(e: &RuleNote, walked: &[Ref]) -> bool {
    let totals: Vec<i64> = walked
        .iter()
        .filter_map(|r| match r {
            Ref::Pair(s, rec) => Some(weight(s).saturating_add(weight(rec))),
            Ref::Stable(r) | Ref::Recording(r) => Some(weight(r)),
            _ => None,
        })
        .collect();
    totals.len() == e.refs.len()
        && totals
            .iter()
            .zip(&e.refs)
            .all(|(t, o)| i128::from(*t) == i128::from(noted_weight(o)) * i128::from(e.scale))
}

/// Sets each of `keys` to the recorded value, or removes it where the note says it was absent.
fn restore_fields(o: &mut Map<String, Value>, orig: &Map<String, Value>, keys: &[&str]) {
    for k in keys {
        match orig.get(*k) {
            Some(v) => {
                o.insert(k.to_string(), v.clone());
            }
            None => {
                o.remove(*k);
            }
        }
    }
}

/// Another backendRef of a split rule, its weight divided back when it is still the scaled one.
fn other_restored(r: &Value, orig: Option<(i64, &Map<String, Value>)>) -> Value {
    let mut restored = r.clone();
    if let Some((scale, orig)) = orig
        && i128::from(weight(r)) == i128::from(noted_weight(orig)) * i128::from(scale)
        && let Some(o) = restored.as_object_mut()
    {
        restore_fields(o, orig, &["weight"]);
    }
    restored
}

fn remove_our_mirrors(rule: &mut Map<String, Value>, t: &Target, ns: &str, field_was_absent: bool) {
    let Some(fs) = rule.get_mut("filters").and_then(Value::as_array_mut) else {
        return;
    };
    let before = fs.len();
    fs.retain(|f| !is_our_mirror(f, t, ns));
    if fs.is_empty() && before > 0 && field_was_absent {
        rule.remove("filters");
    }
}

// ---------------------------------------------------------------------------------------------
// Splitting

fn gcd(a: i128, b: i128) -> i128 {
    let (mut a, mut b) = (a.abs(), b.abs());
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// A weight as JSON (the limit is checked before: it fits).
fn num(w: i128) -> Value {
    json!(i64::try_from(w).unwrap_or(MAX_WEIGHT))
}

/// Our backendRef to Service `name`, a copy of `r` with the defaults written out.
fn our_ref(r: &Value, name: &str, weight: i128) -> Value {
    let mut out = r.clone();
    if let Some(o) = out.as_object_mut() {
        o.insert("group".into(), json!(""));
        o.insert("kind".into(), json!("Service"));
        o.insert("name".into(), json!(name));
        o.insert("weight".into(), num(weight));
    }
    out
}

/// Our `RequestMirror` filter, to port `port` of the recording Service.
fn mirror_filter(t: &Target, port: Option<&Value>, percent: i32) -> Value {
    let mut backend = json!({"group": "", "kind": "Service", "name": t.backends.recording});
    if let Some(p) = port {
        backend["port"] = p.clone();
    }
    json!({"type": "RequestMirror",
           "requestMirror": {"backendRef": backend, "percent": percent.clamp(0, 100)}})
}

fn add_filter(rule: &mut Value, f: Value) {
    let Some(o) = rule.as_object_mut() else {
        return;
    };
    match o.get_mut("filters").and_then(Value::as_array_mut) {
        Some(fs) => fs.push(f),
        None => {
            o.insert("filters".into(), json!([f]));
        }
    }
}

/// How messages name rule `i`.
fn rule_label(i: usize, rule: &Value) -> String {
    match str_of(rule, "name") {
        Some(n) => format!("rule {i} ({n})"),
        None => format!("rule {i}"),
    }
}

/// Whether a filter rewrites or redirects with `ReplacePrefixMatch`.
fn replaces_prefix(f: &Value) -> bool {
    ["/urlRewrite/path/type", "/requestRedirect/path/type"]
        .iter()
        .any(|p| f.pointer(p).and_then(Value::as_str) == Some("ReplacePrefixMatch"))
}

/// The Istio-shaped `always` and `never` entries, converted.
fn converted(ours: &[Value], role: Role) -> Result<Vec<Value>, Problem> {
    ours.iter()
        .enumerate()
        .map(|(i, m)| matches::from_istio(m, role, i))
        .collect::<Result<_, _>>()
        .map_err(|e| problem(ProblemKind::Matches, e))
}

/// A generated match entry, with the split rule's entry it was carved out of.
struct Generated {
    entry: Value,
    /// Index of the split rule in the original rules.
    rule: usize,
    source: Value,
}

/// One original rule, split.
struct SplitRule {
    forced: Vec<Value>,
    rule: Value,
    note: RuleNote,
    generated: Vec<Generated>,
}

/// Splits every rule with a backendRef to the Service into the shape (see the module doc), and
/// inserts the `never` and `always` rules ahead of each. `previous_note` is the note of an
/// earlier split of this route, if any: splitting a split route re-shapes it, and the result
/// depends only on the original rules and the shape. Refuses, with the reason, any shape the
/// route cannot take exactly and safely: nothing is ever half-applied.
pub fn split_rules(
    route: &Value,
    t: &Target,
    shape: &Shape,
    previous_note: Option<&str>,
    canary: &str,
) -> Result<Split, Problem> {
    let ns = route_ns(route, t);
    let never = converted(shape.never, Role::Never)?;
    let always = converted(shape.always, Role::Always)?;
    let base_rules = unsplit_rules(route, t, previous_note);
    let base = base_rules.as_array().map(Vec::as_slice).unwrap_or_default();
    let mut out = Vec::with_capacity(base.len());
    let mut notes = Vec::new();
    let mut generated = Vec::new();
    for (i, rule) in base.iter().enumerate() {
        match split_rule(i, base, t, ns, shape, &never, &always)? {
            None => out.push(rule.clone()),
            Some(s) => {
                out.extend(s.forced);
                out.push(s.rule);
                notes.push(s.note);
                generated.extend(s.generated);
            }
        }
    }
    check_limits(base, &out)?;
    check_precedence(base, &generated)?;
    let note = Note {
        canary: Some(canary.to_string()),
        rules: notes,
    };
    Ok(Split {
        rules: Value::Array(out),
        note: serde_json::to_string(&note).unwrap_or_default(),
    })
}

fn split_rule(
    i: usize,
    base: &[Value],
    t: &Target,
    ns: &str,
    shape: &Shape,
    never: &[Value],
    always: &[Value],
) -> Result<Option<SplitRule>, Problem> {
    let rule = &base[i];
    let refs = backend_refs(rule);
    let is_s = |r: &Value| refers_to(r, &t.service, &t.namespace, ns);
    if !refs.iter().any(is_s) {
        return Ok(None);
    }
    let label = rule_label(i, rule);
    if ns != t.namespace {
        return Err(problem(
            ProblemKind::CrossNamespace,
            format!(
                "{label} of a route in namespace {ns} sends to Service {}/{}: the canary's Services would need a ReferenceGrant in {}, which it does not write; split it from a route in {} instead",
                t.namespace, t.service, t.namespace, t.namespace
            ),
        ));
    }
    let mirrors_to_s = filters(rule)
        .iter()
        .chain(refs.iter().flat_map(filters))
        .filter_map(mirror_ref)
        .any(|b| refers_to(b, &t.service, &t.namespace, ns));
    if mirrors_to_s {
        return Err(problem(
            ProblemKind::MirrorsToService,
            format!(
                "{label} mirrors requests to Service {} itself, whose endpoints include the recording clone's pods: those copies would reach the clone whatever percent and spec.never say; mirror to another Service",
                t.service
            ),
        ));
    }
    let p = i128::from(shape.percent.clamp(0, 100));
    let ws: Vec<i128> = refs
        .iter()
        .filter(|r| is_s(r))
        .map(|r| i128::from(weight(r)))
        .collect();
    let to_s: i128 = ws.iter().sum();
    if shape.mirror {
        if let Some(o) = refs.iter().find(|r| !is_s(r) && weight(r) > 0) {
            return Err(problem(
                ProblemKind::MirrorCopiesOtherBackends,
                format!(
                    "{label} also sends requests to {}: a RequestMirror filter copies every request of its rule, so mode Mirror would copy those to the clone as well; give it a rule of its own or use mode Split",
                    str_of(o, "name").unwrap_or("another backend")
                ),
            ));
        }
        let mut ports: Vec<Option<&Value>> = refs
            .iter()
            .filter(|r| is_s(r))
            .map(|r| r.get("port"))
            .collect();
        ports.dedup();
        if ports.len() > 1 {
            return Err(problem(
                ProblemKind::MirrorPorts,
                format!(
                    "{label} sends to Service {} on several ports: a RequestMirror filter copies to one port; use mode Split or one rule per port",
                    t.service
                ),
            ));
        }
    }
    let g = ws.iter().fold(0, |a, w| gcd(a, *w));
    let (k, worst) = if shape.mirror {
        (1, 1)
    } else {
        (100 / gcd(100, g * p), 100 / gcd(100, g))
    };
    let heaviest = refs
        .iter()
        .map(|r| i128::from(weight(r)))
        .max()
        .unwrap_or(0);
    if heaviest * worst > i128::from(MAX_WEIGHT) {
        return Err(problem(
            ProblemKind::WeightTooLarge,
            format!(
                "{label}: an exact split needs its weights multiplied by up to {worst}, and its weight {heaviest} would exceed the Gateway API's maximum of {MAX_WEIGHT}; divide the rule's weights by a common factor"
            ),
        ));
    }

    let mut note = RuleNote {
        name: str_of(rule, "name").map(String::from),
        scale: i64::try_from(k).unwrap_or(1),
        refs: Vec::new(),
        others: Vec::new(),
        filters_absent: false,
    };
    let mut new_refs = Vec::with_capacity(refs.len() * 2);
    for r in refs {
        if !is_s(r) {
            if k > 1 {
                note.others.push(originals(r, &["weight"]));
                let mut scaled = r.clone();
                if let Some(o) = scaled.as_object_mut() {
                    o.insert("weight".into(), num(i128::from(weight(r)) * k));
                }
                new_refs.push(scaled);
            } else {
                new_refs.push(r.clone());
            }
            continue;
        }
        note.refs.push(originals(r, &OVERWRITTEN));
        let w = i128::from(weight(r)) * k;
        if shape.mirror {
            new_refs.push(our_ref(r, &t.backends.stable, w));
        } else {
            let rec = w * p / 100;
            new_refs.push(our_ref(r, &t.backends.stable, w - rec));
            new_refs.push(our_ref(r, &t.backends.recording, rec));
        }
    }
    let mut split = rule.clone();
    if let Some(o) = split.as_object_mut() {
        o.insert("backendRefs".into(), Value::Array(new_refs));
    }
    let port = refs.iter().find(|r| is_s(r)).and_then(|r| r.get("port"));
    if shape.mirror {
        note.filters_absent = rule.get("filters").is_none();
        add_filter(&mut split, mirror_filter(t, port, shape.percent));
    }

    let mut forced = Vec::new();
    let mut generated = Vec::new();
    if to_s > 0 {
        // Entries of the rule that never win (another rule's entry covers them and ranks above)
        // get nothing carved out of them: that would only take requests from the winner.
        let sources: Vec<Value> = matches::entries(rule)
            .into_iter()
            .filter(|m| !shadowed(m, i, base))
            .collect();
        let rewrites = filters(rule)
            .iter()
            .chain(refs.iter().flat_map(filters))
            .any(replaces_prefix);
        let mut make = |pairs: Vec<(Value, Value)>, always: bool| -> Result<(), Problem> {
            let mut entries: Vec<Value> = Vec::new();
            for (e, _) in &pairs {
                if !entries.contains(e) {
                    entries.push(e.clone());
                }
            }
            if entries.is_empty() {
                return Ok(());
            }
            let (kind, field) = if always {
                (ALWAYS_RULE, "spec.always")
            } else {
                (NEVER_RULE, "spec.never")
            };
            if rewrites
                && (entries.len() != 1
                    || sources.len() != 1
                    || entries[0].get("path") != sources[0].get("path"))
            {
                return Err(problem(
                    ProblemKind::PrefixRewrite,
                    format!(
                        "{label} rewrites paths with ReplacePrefixMatch, which needs its rule to keep exactly one PathPrefix match: the rule for {field} would change which prefix is replaced; keep {field} off this rule's paths or use ReplaceFullPath"
                    ),
                ));
            }
            if entries.len() > MAX_MATCHES_PER_RULE {
                return Err(problem(
                    ProblemKind::TooManyMatches,
                    format!(
                        "{label} ANDed with {field} needs {} matches in one rule, more than the Gateway API's {MAX_MATCHES_PER_RULE}",
                        entries.len()
                    ),
                ));
            }
            let mut r = rule.clone();
            let to_recording = always && !shape.mirror;
            let backends: Vec<Value> = refs
                .iter()
                .filter(|b| !to_recording || is_s(b))
                .map(|b| match (is_s(b), to_recording) {
                    (true, true) => our_ref(b, &t.backends.recording, i128::from(weight(b))),
                    (true, false) => our_ref(b, &t.backends.stable, i128::from(weight(b))),
                    _ => b.clone(),
                })
                .collect();
            if let Some(o) = r.as_object_mut() {
                o.insert("name".into(), json!(format!("{kind}-{i}")));
                o.insert("matches".into(), Value::Array(entries));
                o.insert("backendRefs".into(), Value::Array(backends));
            }
            if always && shape.mirror {
                add_filter(&mut r, mirror_filter(t, port, 100));
            }
            generated.extend(pairs.into_iter().map(|(entry, source)| Generated {
                entry,
                rule: i,
                source,
            }));
            forced.push(r);
            Ok(())
        };
        // Every (entry, the rule's entry it comes from), duplicates included: each source counts.
        let anded = |ours: &[Value], field: &str| -> Result<Vec<(Value, Value)>, Problem> {
            let mut out = Vec::new();
            for m in &sources {
                for (k, o) in ours.iter().enumerate() {
                    let e = matches::and_entry(m, o).map_err(|e| {
                        problem(
                            ProblemKind::Matches,
                            format!("{label}: {field}[{k}] cannot be combined with its match: {e}"),
                        )
                    })?;
                    if let Some(e) = e {
                        out.push((e, m.clone()));
                    }
                }
            }
            Ok(out)
        };
        let always_entries = anded(always, "spec.always")?;
        let mut never_entries = anded(never, "spec.never")?;
        // A never entry ranking below an always entry of the same source gets the always
        // conditions added, so that never wins wherever both match.
        let mut extra = Vec::new();
        for (n, src) in &never_entries {
            for (a, asrc) in &always_entries {
                if asrc != src || matches::rank(n) >= matches::rank(a) {
                    continue;
                }
                let both = matches::and_entry(n, a).map_err(|e| {
                    problem(
                        ProblemKind::Matches,
                        format!(
                            "{label}: spec.never cannot be made to win over spec.always here: {e}"
                        ),
                    )
                })?;
                if let Some(b) = both {
                    extra.push((b, src.clone()));
                }
            }
        }
        never_entries.extend(extra);
        make(never_entries, false)?;
        make(always_entries, true)?;
    }
    Ok(Some(SplitRule {
        forced,
        rule: split,
        note,
        generated,
    }))
}

/// Whether another rule's entry wins over entry `m` of rule `i` for every request `m` matches.
fn shadowed(m: &Value, i: usize, base: &[Value]) -> bool {
    let rm = matches::rank(m);
    base.iter().enumerate().any(|(j, other)| {
        j != i
            && matches::entries(other).iter().any(|o| {
                let ro = matches::rank(o);
                (ro > rm || (ro == rm && j < i)) && matches::covers(o, m)
            })
    })
}

/// The Gateway API's limits on the split rules, and the names of the inserted rules.
fn check_limits(base: &[Value], out: &[Value]) -> Result<(), Problem> {
    if out.len() > MAX_RULES {
        return Err(problem(
            ProblemKind::TooManyRules,
            format!(
                "the split needs {} rules ({} of the route's own and {} for spec.always and spec.never), more than the Gateway API's {MAX_RULES}",
                out.len(),
                base.len(),
                out.len() - base.len()
            ),
        ));
    }
    for (i, r) in out.iter().enumerate() {
        let n = backend_refs(r).len();
        if n > MAX_BACKEND_REFS {
            return Err(problem(
                ProblemKind::TooManyBackendRefs,
                format!(
                    "{} would have {n} backendRefs after the split (each backendRef to the Service becomes two), more than the Gateway API's {MAX_BACKEND_REFS}",
                    rule_label(i, r)
                ),
            ));
        }
    }
    let total: usize = out.iter().map(|r| matches::entries(r).len()).sum();
    if total > MAX_MATCHES {
        return Err(problem(
            ProblemKind::TooManyMatches,
            format!(
                "the split route would have {total} matches over all its rules, more than the Gateway API's {MAX_MATCHES}"
            ),
        ));
    }
    let names: Vec<&str> = out.iter().filter_map(|r| str_of(r, "name")).collect();
    if let Some(n) = names.iter().find(|n| {
        (n.starts_with(ALWAYS_RULE) || n.starts_with(NEVER_RULE))
            && names.iter().filter(|m| m == n).count() > 1
    }) {
        return Err(problem(
            ProblemKind::RuleName,
            format!(
                "the route already has a rule named {n}, the name of a rule the canary inserts; rename it"
            ),
        ));
    }
    Ok(())
}

/// Refuses a split whose generated entries would take requests from a rule that wins over the
/// split rule for them (see the module doc).
fn check_precedence(base: &[Value], generated: &[Generated]) -> Result<(), Problem> {
    for g in generated {
        let (rg, rm) = (matches::rank(&g.entry), matches::rank(&g.source));
        for (j, other) in base.iter().enumerate() {
            if j == g.rule {
                continue;
            }
            for o in matches::entries(other) {
                let ro = matches::rank(&o);
                // The other entry wins over the split rule's (ties: the earlier rule wins), and
                // the generated one (listed right before the split rule) would win over it.
                let beat_source = ro > rm || (ro == rm && j < g.rule);
                let loses_now = rg > ro || (rg == ro && j > g.rule);
                if beat_source && loses_now && matches::may_overlap(&g.entry, &o) {
                    return Err(problem(
                        ProblemKind::Precedence,
                        format!(
                            "the rule the canary would insert for {} with match {} would rank above {} (match {o}), which wins over {} today: requests they share would change rules; make spec.always/spec.never narrower or that rule more specific",
                            rule_label(g.rule, &base[g.rule]),
                            g.entry,
                            rule_label(j, other),
                            rule_label(g.rule, &base[g.rule]),
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Why a route cannot take a shape: [`split_rules`]'s refusal, or a route whose backendRefs to
/// the Service all have weight 0 (none of its requests reach the Service, so none can reach the
/// clone; the planner may accept that when another route carries the traffic).
pub fn shape_problem(route: &Value, t: &Target, shape: &Shape) -> Option<Problem> {
    let note = restore_note_of(route);
    if let Err(p) = split_rules(route, t, shape, note, "") {
        return Some(p);
    }
    let ns = route_ns(route, t);
    let base = unsplit_rules(route, t, note);
    let ws: Vec<i64> = base
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(backend_refs)
        .filter(|r| refers_to(r, &t.service, &t.namespace, ns))
        .map(weight)
        .collect();
    (!ws.is_empty() && ws.iter().all(|w| *w == 0)).then(|| {
        problem(
            ProblemKind::NoTraffic,
            format!(
                "every backendRef to Service {} in this route has weight 0: none of its requests reach the Service, so none could reach the clone",
                t.service
            ),
        )
    })
}

/// Why a route of another kind (GRPCRoute, TCPRoute, TLSRoute) attached to the Service blocks
/// the canary: its requests would go to the Service's endpoints, the clone's among them, unsplit.
pub fn other_route_problem(kind: &str, route: &Value, t: &Target) -> Option<Problem> {
    concerns(route, t).then(|| {
        problem(
            ProblemKind::OtherRouteKind,
            format!(
                "a {kind} ({}) is attached to Service {}: this controller splits HTTPRoutes only, and the {kind}'s requests would reach the Service's endpoints, the clone's included, unsplit",
                route
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or("unnamed"),
                t.service
            ),
        )
    })
}

/// The HTTPRoute a canary creates when no route concerns the Service: named `name`, labelled with
/// the canary, the Service (port `port`, if the canary names one) as its only parent, and one
/// catch-all rule (`PathPrefix /`, written out as the apiserver would default it) sending to port
/// `port`, split into the shape, with its restore note. The caller adds the owner reference.
/// Attaching a first route to a Service makes requests that match none of its rules be refused
/// (404): the catch-all rule keeps every request served.
pub fn own_route(
    name: &str,
    canary: &str,
    t: &Target,
    port: i32,
    shape: &Shape,
) -> Result<Value, Problem> {
    let mut parent = json!({"group": "", "kind": "Service", "name": t.service});
    if let Some(p) = &t.port {
        parent["port"] = json!(p.number);
    }
    let mut route = json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": t.namespace, "labels": {CANARY_LABEL: canary}},
        "spec": {
            "parentRefs": [parent],
            "rules": [{
                "matches": [matches::catch_all()],
                "backendRefs": [{"group": "", "kind": "Service", "name": t.service, "port": port, "weight": 100}],
            }],
        },
    });
    let split = split_rules(&route, t, shape, None, canary)?;
    route["spec"]["rules"] = split.rules;
    route["metadata"]["annotations"] = json!({RESTORE_ANNOTATION: split.note});
    Ok(route)
}
