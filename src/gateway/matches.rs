//! Gateway API `HTTPRouteMatch`es: a canary's Istio-shaped `always`/`never` entries converted to
//! them, a rule's `matches` ANDed with those, and the precedence the Gateway API gives a match.
//!
//! A rule's `matches` are ORed and the conditions inside one match are ANDed (as in Istio), so
//! "the rule's match AND one of ours" is every pair (rule entry, our entry) merged into one entry.
//! A pair whose conditions exclude each other (two different exact paths) matches nothing and is
//! left out. A pair this code cannot merge exactly (two different regular expressions on one
//! field, or an exact value and a regular expression) is an error: guessing could send a request
//! that must never be recorded to the recording clone.
//!
//! Conversions from Istio's `StringMatch` are exact or refused, with one deliberate exception
//! (a `never` path prefix ending in `/`, a superset: see [`from_istio`]).

use serde_json::{Map, Value, json};

/// `HTTPPathMatch.type`: the whole path, case-sensitive.
pub const EXACT: &str = "Exact";
/// `HTTPPathMatch.type`: whole path segments (`/abc` matches `/abc`, `/abc/` and `/abc/def`,
/// not `/abcd`); a trailing `/` in the value is ignored.
pub const PATH_PREFIX: &str = "PathPrefix";
/// The implementation-specific match type of paths, headers and query parameters.
pub const REGULAR_EXPRESSION: &str = "RegularExpression";

/// `HTTPMethod`: the values the Gateway API accepts (an enum in the CRD).
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// Which list of the canary an Istio match comes from: a conversion that matches more requests
/// than the original is safe for `never` (more requests kept from the clone) and not for
/// `always` (more requests forced onto it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Always,
    Never,
}

impl Role {
    fn field(self) -> &'static str {
        match self {
            Role::Always => "spec.always",
            Role::Never => "spec.never",
        }
    }
}

/// The catch-all match, written out: what the apiserver stores for a rule without `matches`
/// (the CRD's default), and what an entry without `path` means.
pub fn catch_all() -> Value {
    json!({"path": {"type": PATH_PREFIX, "value": "/"}})
}

/// The entries of a rule's `matches`: absent or empty is the catch-all (the Gateway API default).
pub fn entries(rule: &Value) -> Vec<Value> {
    match rule.get("matches").and_then(Value::as_array) {
        Some(m) if !m.is_empty() => m.clone(),
        _ => vec![catch_all()],
    }
}

/// Converts the canary's Istio-shaped `HTTPMatchRequest` (entry `index` of `always` or `never`:
/// `headers`, `uri`, `method`, `queryParams`) to a Gateway API `HTTPRouteMatch`, with the
/// defaults the apiserver would add written out (`path` and every `type`), so that a route
/// written with it reads back equal.
///
/// - `uri.exact` → path `Exact`; `uri.prefix: /` → path `PathPrefix /`. Any other Istio prefix is
///   a string prefix (`/health` matches `/healthz`), a `PathPrefix` matches whole segments: a
///   prefix ending in `/` (`/api/`) becomes `PathPrefix /api/`, which also matches `/api` itself,
///   accepted for `never` only (it keeps one more path from the clone) and refused for `always`;
///   a prefix not ending in `/` is refused. `uri.regex` is refused: the precedence of a
///   `RegularExpression` path is implementation-specific (Istio ranks it below every `Exact` and
///   `PathPrefix` path), so the rule generated with it could not be shown to win over the rule
///   it is carved out of.
/// - `headers` and `queryParams`: `exact` → `Exact`; `regex` → `RegularExpression` (RE2, matched
///   against the whole value, in Istio); `prefix` has no Gateway API form and becomes the exact
///   equivalent `RegularExpression` `^<prefix, escaped>.*`. `RegularExpression` support is
///   implementation-specific (Istio: RE2); a mesh that does not support it rejects the route
///   (`Accepted: False`), which the make-before-break wait sees.
/// - `method.exact` (one of the nine methods) → `method`; a prefix or regex is refused.
pub fn from_istio(m: &Value, role: Role, index: usize) -> Result<Value, String> {
    let at = format!("{}[{index}]", role.field());
    let Some(o) = m.as_object() else {
        return Err(format!("{at} is not an object"));
    };
    let mut out = Map::new();
    out.insert("path".into(), catch_all()["path"].clone());
    for (k, v) in o {
        match k.as_str() {
            "uri" => {
                out.insert("path".into(), path_from_istio(v, role, &at)?);
            }
            "method" => {
                let (kind, text) = string_match(v, &format!("{at}.method"))?;
                if kind != "exact" || !METHODS.contains(&text) {
                    return Err(format!(
                        "{at}.method {v} has no Gateway API form: a method match is one of {} exactly",
                        METHODS.join(", ")
                    ));
                }
                out.insert("method".into(), json!(text));
            }
            "headers" | "queryParams" => {
                let Some(map) = v.as_object() else {
                    return Err(format!("{at}.{k} is not a map"));
                };
                let max = if k == "headers" { 4096 } else { 1024 };
                let list = map
                    .iter()
                    .map(|(name, sm)| named_from_istio(name, sm, &format!("{at}.{k}.{name}"), max))
                    .collect::<Result<Vec<Value>, String>>()?;
                if !list.is_empty() {
                    out.insert(k.clone(), Value::Array(list));
                }
            }
            other => {
                return Err(format!(
                    "{at}.{other} has no Gateway API form (an HTTPRouteMatch has path, headers, queryParams and method)"
                ));
            }
        }
    }
    Ok(Value::Object(out))
}

/// The kind (`exact`, `prefix`, `regex`) and text of an Istio `StringMatch` with exactly one set.
fn string_match<'a>(v: &'a Value, at: &str) -> Result<(&'static str, &'a str), String> {
    let o = v
        .as_object()
        .ok_or_else(|| format!("{at} is not a StringMatch"))?;
    let set: Vec<(&'static str, &str)> = ["exact", "prefix", "regex"]
        .into_iter()
        .filter_map(|k| o.get(k).and_then(Value::as_str).map(|s| (k, s)))
        .collect();
    match set.as_slice() {
        [one] if o.len() == 1 => Ok(*one),
        _ => Err(format!(
            "{at} must set exactly one of exact, prefix or regex"
        )),
    }
}

fn path_from_istio(v: &Value, role: Role, at: &str) -> Result<Value, String> {
    let at = format!("{at}.uri");
    match string_match(v, &at)? {
        ("exact", p) => {
            valid_path(p).map_err(|e| format!("{at}.exact {p:?}: {e}"))?;
            Ok(json!({"type": EXACT, "value": p}))
        }
        ("prefix", "/") => Ok(json!({"type": PATH_PREFIX, "value": "/"})),
        ("prefix", p) if p.ends_with('/') && role == Role::Never => {
            valid_path(p).map_err(|e| format!("{at}.prefix {p:?}: {e}"))?;
            Ok(json!({"type": PATH_PREFIX, "value": p}))
        }
        ("prefix", p) if p.ends_with('/') => Err(format!(
            "{at}.prefix {p:?} has no exact Gateway API form: PathPrefix {p:?} also matches {:?} itself, which would be forced onto the clone; list exact paths instead",
            p.trim_end_matches('/')
        )),
        ("prefix", p) => Err(format!(
            "{at}.prefix {p:?} has no exact Gateway API form: Istio's prefix is a string prefix ({p:?} matches \"{p}x\"), a Gateway API PathPrefix matches whole path segments; write {:?} (segments: {p} and below) plus `exact` entries for any other path it should catch",
            format!("{}/", p.trim_end_matches('/'))
        )),
        (_, r) => Err(format!(
            "{at}.regex {r:?}: the precedence of a RegularExpression path is implementation-specific in the Gateway API (Istio ranks it below every Exact and PathPrefix path), so the rule generated for it could lose to the rule it is carved out of; use exact paths, headers or query parameters"
        )),
    }
}

fn named_from_istio(name: &str, sm: &Value, at: &str, max: usize) -> Result<Value, String> {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token) {
        return Err(format!(
            "{at}: {name:?} is not a valid Gateway API header or query parameter name (an RFC 7230 token; no pseudo-headers such as :authority)"
        ));
    }
    let (ty, value) = match string_match(sm, at)? {
        ("exact", v) => (EXACT, v.to_string()),
        ("regex", v) => (REGULAR_EXPRESSION, v.to_string()),
        (_, p) => (REGULAR_EXPRESSION, prefix_regex(p)),
    };
    if value.is_empty() || value.len() > max {
        return Err(format!(
            "{at}: a Gateway API match value is 1 to {max} characters, got {}",
            value.len()
        ));
    }
    Ok(json!({"name": name, "type": ty, "value": value}))
}

/// The regular expression matching exactly the values that start with `prefix`: anchored, the
/// prefix escaped, valid and equivalent in RE2, PCRE and POSIX ERE, matched against the whole
/// value or searched.
pub fn prefix_regex(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 4);
    out.push('^');
    for c in prefix.chars() {
        if r"\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out.push_str(".*");
    out
}

/// What the CRD accepts as an `Exact` or `PathPrefix` value (its CEL rules on `HTTPPathMatch`).
fn valid_path(p: &str) -> Result<(), &'static str> {
    let valid_char = |c: char| c.is_ascii_alphanumeric() || "-/._~!$&'()*+,;=:@%".contains(c);
    if !p.starts_with('/') {
        return Err("a Gateway API path must start with /");
    }
    if ["//", "/./", "/../", "%2f", "%2F", "#"]
        .iter()
        .any(|s| p.contains(s))
        || p.ends_with("/..")
        || p.ends_with("/.")
    {
        return Err(
            "a Gateway API path must not contain //, /./, /../, %2f or #, nor end with /. or /..",
        );
    }
    if !p.chars().all(valid_char) || p.len() > 1024 {
        return Err("a Gateway API path holds at most 1024 URL path characters");
    }
    Ok(())
}

/// A path match, its defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Path {
    Exact(String),
    Prefix(String),
    /// `RegularExpression`, or a type this code does not know.
    Opaque(Value),
}

fn path_of(entry: &Value) -> Path {
    let Some(p) = entry.get("path") else {
        return Path::Prefix("/".into());
    };
    let value = p.get("value").and_then(Value::as_str).unwrap_or("/");
    match p.get("type").and_then(Value::as_str).unwrap_or(PATH_PREFIX) {
        EXACT => Path::Exact(value.into()),
        PATH_PREFIX => Path::Prefix(value.into()),
        _ => Path::Opaque(p.clone()),
    }
}

/// Whether `path` is under PathPrefix `prefix` (whole segments; a trailing `/` ignored).
pub fn under_prefix(prefix: &str, path: &str) -> bool {
    let p = prefix.trim_end_matches('/');
    p.is_empty() || path == p || path.starts_with(&format!("{p}/"))
}

/// The merge of two conditions: one condition, or none at all (they exclude each other).
enum Merged<T> {
    Both(T),
    Nothing,
}

fn merge_paths(mine: &Value, theirs: &Value) -> Result<Merged<Option<Value>>, String> {
    let keep = |e: &Value| Ok(Merged::Both(e.get("path").cloned()));
    match (path_of(mine), path_of(theirs)) {
        (a, b) if a == b => keep(mine),
        (Path::Prefix(a), Path::Prefix(b)) => {
            if under_prefix(&a, &b) && under_prefix(&b, &a) {
                keep(mine)
            } else if under_prefix(&a, &b) {
                keep(theirs)
            } else if under_prefix(&b, &a) {
                keep(mine)
            } else {
                Ok(Merged::Nothing)
            }
        }
        (Path::Exact(_), Path::Exact(_)) => Ok(Merged::Nothing),
        (Path::Exact(e), Path::Prefix(p)) => {
            if under_prefix(&p, &e) {
                keep(mine)
            } else {
                Ok(Merged::Nothing)
            }
        }
        (Path::Prefix(p), Path::Exact(e)) => {
            if under_prefix(&p, &e) {
                keep(theirs)
            } else {
                Ok(Merged::Nothing)
            }
        }
        (Path::Prefix(p), Path::Opaque(_)) if p.trim_end_matches('/').is_empty() => keep(theirs),
        (Path::Opaque(_), Path::Prefix(p)) if p.trim_end_matches('/').is_empty() => keep(mine),
        _ => Err(format!(
            "the path {} cannot be combined exactly with the path {}",
            mine.get("path").unwrap_or(&Value::Null),
            theirs.get("path").unwrap_or(&Value::Null)
        )),
    }
}

/// The type and value of a header or query parameter match (type `Exact` by default).
fn typed(m: &Value) -> (&str, Option<&Value>) {
    (
        m.get("type").and_then(Value::as_str).unwrap_or(EXACT),
        m.get("value"),
    )
}

fn name_of(m: &Value) -> &str {
    m.get("name").and_then(Value::as_str).unwrap_or_default()
}

/// Two lists of named matches (`headers`, case-insensitive names; `queryParams`, exact names),
/// merged name by name. Only the first entry of a name counts (the Gateway API ignores later
/// ones).
fn merge_named(
    field: &str,
    mine: &[Value],
    theirs: &[Value],
    ignore_case: bool,
) -> Result<Merged<Vec<Value>>, String> {
    let same = |a: &str, b: &str| {
        if ignore_case {
            a.eq_ignore_ascii_case(b)
        } else {
            a == b
        }
    };
    let mut out = mine.to_vec();
    for t in theirs {
        let Some(m) = mine.iter().find(|m| same(name_of(m), name_of(t))) else {
            if !out.iter().any(|o| same(name_of(o), name_of(t))) {
                out.push(t.clone());
            }
            continue;
        };
        match (typed(m), typed(t)) {
            (a, b) if a == b => {}
            ((EXACT, _), (EXACT, _)) => return Ok(Merged::Nothing),
            _ => {
                return Err(format!(
                    "{field} {:?} is matched by {m} on the rule and by {t} in the canary: they cannot be combined exactly",
                    name_of(t)
                ));
            }
        }
    }
    Ok(Merged::Both(out))
}

fn list<'a>(entry: &'a Value, field: &str) -> &'a [Value] {
    entry
        .get(field)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// One rule entry AND one of ours: `Ok(None)` when no request can match both. The rule entry's
/// other fields (unknown ones included) are kept.
pub fn and_entry(mine: &Value, theirs: &Value) -> Result<Option<Value>, String> {
    let (Some(m), Some(t)) = (mine.as_object(), theirs.as_object()) else {
        return Err(format!("a match is not an object: {mine} / {theirs}"));
    };
    let mut out = m.clone();
    match merge_paths(mine, theirs)? {
        Merged::Nothing => return Ok(None),
        Merged::Both(Some(p)) => {
            out.insert("path".into(), p);
        }
        Merged::Both(None) => {}
    }
    match (m.get("method"), t.get("method")) {
        (Some(a), Some(b)) if a != b => return Ok(None),
        (None, Some(b)) => {
            out.insert("method".into(), b.clone());
        }
        _ => {}
    }
    for (field, ignore_case) in [("headers", true), ("queryParams", false)] {
        let theirs = list(theirs, field);
        if theirs.is_empty() {
            continue;
        }
        match merge_named(field, list(mine, field), theirs, ignore_case)? {
            Merged::Nothing => return Ok(None),
            Merged::Both(l) => {
                out.insert(field.into(), Value::Array(l));
            }
        }
    }
    for (k, v) in t {
        if !["path", "method", "headers", "queryParams"].contains(&k.as_str())
            && m.get(k) != Some(v)
        {
            return Err(format!(
                "the rule's match sets {k} to {}, and it cannot be combined with {v}",
                m.get(k).unwrap_or(&Value::Null)
            ));
        }
    }
    Ok(Some(Value::Object(out)))
}

/// A rule's `matches` (absent: every request) ANDed with each of `ours` (Gateway API matches):
/// every pair that some request can match, without duplicates.
pub fn and(rule: &Value, ours: &[Value]) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for m in entries(rule) {
        for o in ours {
            if let Some(e) = and_entry(&m, o)?
                && !out.contains(&e)
            {
                out.push(e);
            }
        }
    }
    Ok(out)
}

/// Whether some request may match both entries: `false` only when they provably exclude each
/// other (different exact paths, methods, or exact values of one header or query parameter).
pub fn may_overlap(a: &Value, b: &Value) -> bool {
    !matches!(and_entry(a, b), Ok(None))
}

/// Whether every request that matches `inner` also matches `outer` (conservatively: `false`
/// when that cannot be shown, e.g. for regular expressions or fields this code does not know).
pub fn covers(outer: &Value, inner: &Value) -> bool {
    let known = ["path", "method", "headers", "queryParams"];
    if outer
        .as_object()
        .is_none_or(|o| o.keys().any(|k| !known.contains(&k.as_str())))
    {
        return false;
    }
    let path = match (path_of(outer), path_of(inner)) {
        (a, b) if a == b => true,
        (Path::Prefix(p), Path::Prefix(q) | Path::Exact(q)) => under_prefix(&p, &q),
        (Path::Prefix(p), Path::Opaque(_)) => p.trim_end_matches('/').is_empty(),
        _ => false,
    };
    let method = outer
        .get("method")
        .is_none_or(|m| inner.get("method") == Some(m));
    let named = |field: &str, ignore_case: bool| {
        let mut seen: Vec<String> = Vec::new();
        list(outer, field).iter().all(|o| {
            let name = name_of(o);
            let key = if ignore_case {
                name.to_ascii_lowercase()
            } else {
                name.to_string()
            };
            if seen.contains(&key) {
                return true; // ignored by the Gateway API
            }
            seen.push(key);
            list(inner, field)
                .iter()
                .find(|i| {
                    if ignore_case {
                        name_of(i).eq_ignore_ascii_case(name)
                    } else {
                        name_of(i) == name
                    }
                })
                .is_some_and(|i| typed(i) == typed(o))
        })
    };
    path && method && named("headers", true) && named("queryParams", false)
}

/// The precedence the Gateway API gives a match (`HTTPRouteRule.matches`): an `Exact` path, then
/// the `PathPrefix` with the most characters, then a method, then the most headers, then the most
/// query parameters; a greater `Rank` wins. Ties go to the older route, then to the first rule in
/// list order. A `RegularExpression` path's place is implementation-specific: it ranks here as in
/// Istio, below every `PathPrefix`, by its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rank {
    path_kind: u8,
    path_len: usize,
    method: bool,
    headers: usize,
    query: usize,
}

fn distinct(l: &[Value], ignore_case: bool) -> usize {
    let mut names: Vec<String> = l
        .iter()
        .map(|m| {
            if ignore_case {
                name_of(m).to_ascii_lowercase()
            } else {
                name_of(m).to_string()
            }
        })
        .collect();
    names.sort();
    names.dedup();
    names.len()
}

/// The precedence of one match.
pub fn rank(entry: &Value) -> Rank {
    let (path_kind, path_len) = match path_of(entry) {
        Path::Exact(p) => (3, p.len()),
        Path::Prefix(p) => (2, p.len()),
        Path::Opaque(p) => (
            1,
            p.get("value").and_then(Value::as_str).map_or(0, str::len),
        ),
    };
    Rank {
        path_kind,
        path_len,
        method: entry.get("method").is_some(),
        headers: distinct(list(entry, "headers"), true),
        query: distinct(list(entry, "queryParams"), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never(m: Value) -> Result<Value, String> {
        from_istio(&m, Role::Never, 0)
    }

    #[test]
    fn istio_entries_convert_with_every_default_written_out() {
        let got = never(json!({
            "uri": {"exact": "/api/admin"},
            "method": {"exact": "POST"},
            "headers": {"x-pii": {"regex": ".+"}, "x-team": {"exact": "qa"}},
            "queryParams": {"debug": {"exact": "1"}},
        }))
        .unwrap();
        assert_eq!(
            got,
            json!({
                "path": {"type": "Exact", "value": "/api/admin"},
                "method": "POST",
                "headers": [{"name": "x-pii", "type": "RegularExpression", "value": ".+"},
                            {"name": "x-team", "type": "Exact", "value": "qa"}],
                "queryParams": [{"name": "debug", "type": "Exact", "value": "1"}],
            })
        );
        let headers_only = never(json!({"headers": {"x-record": {"exact": "1"}}})).unwrap();
        assert_eq!(headers_only["path"], catch_all()["path"]);
    }

    #[test]
    fn a_header_prefix_becomes_an_anchored_escaped_regular_expression() {
        let got = never(json!({"headers": {"x-user": {"prefix": "a.b+(c)"}}})).unwrap();
        assert_eq!(
            got["headers"],
            json!([{"name": "x-user", "type": "RegularExpression", "value": r"^a\.b\+\(c\).*"}])
        );
        let re = regex::Regex::new(&format!("^(?:{})$", prefix_regex("a.b+(c)"))).unwrap();
        assert!(re.is_match("a.b+(c)"));
        assert!(re.is_match("a.b+(c)-and-more"));
        assert!(!re.is_match("aXb+(c)"));
        assert!(!re.is_match("xa.b+(c)"));
    }

    #[test]
    fn istio_path_prefixes_convert_only_where_segments_say_the_same_or_more_for_never() {
        let prefix = |p: &str, role| from_istio(&json!({"uri": {"prefix": p}}), role, 3);
        assert_eq!(
            prefix("/", Role::Always).unwrap()["path"],
            json!({"type": "PathPrefix", "value": "/"})
        );
        assert_eq!(
            prefix("/api/", Role::Never).unwrap()["path"],
            json!({"type": "PathPrefix", "value": "/api/"})
        );
        let e = prefix("/api/", Role::Always).unwrap_err();
        assert!(
            e.contains("spec.always[3].uri.prefix") && e.contains("\"/api\""),
            "{e}"
        );
        let e = prefix("/health", Role::Never).unwrap_err();
        assert!(
            e.contains("string prefix") && e.contains("\"/health/\""),
            "{e}"
        );
        let e = never(json!({"uri": {"regex": "/a.*"}})).unwrap_err();
        assert!(e.contains("implementation-specific"), "{e}");
    }

    #[test]
    fn what_has_no_gateway_api_form_is_refused_with_the_field_named() {
        for (m, says) in [
            (json!({"method": {"prefix": "P"}}), "spec.never[0].method"),
            (json!({"method": {"exact": "BREW"}}), "spec.never[0].method"),
            (
                json!({"headers": {":authority": {"exact": "a"}}}),
                ":authority",
            ),
            (json!({"headers": {"x": {"exact": ""}}}), "1 to 4096"),
            (json!({"uri": {"exact": "api"}}), "must start with /"),
            (json!({"uri": {"exact": "/a//b"}}), "//"),
            (json!({"port": 8080}), "spec.never[0].port"),
            (
                json!({"headers": {"x": {"exact": "1", "regex": "2"}}}),
                "exactly one",
            ),
        ] {
            let e = never(m.clone()).unwrap_err();
            assert!(e.contains(says), "{m}: {e}");
        }
    }

    #[test]
    fn paths_narrow_to_the_more_specific_or_to_nothing() {
        let p = |t: &str, v: &str| json!({"path": {"type": t, "value": v}});
        let cases = [
            (
                p("PathPrefix", "/api"),
                p("PathPrefix", "/api/v2"),
                Some("/api/v2"),
            ),
            (
                p("PathPrefix", "/api/v2"),
                p("PathPrefix", "/api"),
                Some("/api/v2"),
            ),
            (p("PathPrefix", "/api"), p("PathPrefix", "/apix"), None),
            (p("PathPrefix", "/"), p("PathPrefix", "/web"), Some("/web")),
            (
                p("PathPrefix", "/api"),
                p("Exact", "/api/x"),
                Some("/api/x"),
            ),
            (p("Exact", "/api"), p("PathPrefix", "/api/"), Some("/api")),
            (p("Exact", "/apix"), p("PathPrefix", "/api"), None),
            (p("Exact", "/a"), p("Exact", "/b"), None),
            (
                p("PathPrefix", "/api/"),
                p("PathPrefix", "/api"),
                Some("/api/"),
            ),
        ];
        for (mine, theirs, want) in cases {
            let got = and_entry(&mine, &theirs).unwrap();
            let got = got.map(|g| g["path"]["value"].as_str().unwrap().to_string());
            assert_eq!(got.as_deref(), want, "{mine} AND {theirs}");
        }
        let regex = p("RegularExpression", "/a.*");
        assert!(and_entry(&regex, &p("PathPrefix", "/a")).is_err());
        assert_eq!(
            and_entry(&regex, &catch_all()).unwrap(),
            Some(regex.clone())
        );
        assert_eq!(and_entry(&regex, &regex).unwrap(), Some(regex));
    }

    #[test]
    fn headers_merge_by_name_ignoring_case_and_exclusive_values_match_nothing() {
        let rule = json!({"path": {"type": "PathPrefix", "value": "/"},
                          "headers": [{"name": "X-Team", "value": "qa"}], "x-unknown": 1});
        let ours = json!({"headers": [{"name": "x-team", "type": "Exact", "value": "qa"},
                                      {"name": "x-record", "type": "Exact", "value": "1"}]});
        let got = and_entry(&rule, &ours).unwrap().unwrap();
        assert_eq!(
            got["headers"],
            json!([{"name": "X-Team", "value": "qa"}, {"name": "x-record", "type": "Exact", "value": "1"}])
        );
        assert_eq!(got["x-unknown"], 1);
        let other = json!({"headers": [{"name": "x-team", "type": "Exact", "value": "dev"}]});
        assert_eq!(and_entry(&rule, &other).unwrap(), None);
        let regex =
            json!({"headers": [{"name": "x-team", "type": "RegularExpression", "value": "q.*"}]});
        assert!(and_entry(&rule, &regex).is_err());
        // Query parameter names are case-sensitive.
        let q = json!({"queryParams": [{"name": "a", "type": "Exact", "value": "1"}]});
        let q2 = json!({"queryParams": [{"name": "A", "type": "Exact", "value": "2"}]});
        assert_eq!(
            and_entry(&q, &q2).unwrap().unwrap()["queryParams"]
                .as_array()
                .map(Vec::len),
            Some(2)
        );
        let get = json!({"method": "GET"});
        assert_eq!(and_entry(&get, &json!({"method": "POST"})).unwrap(), None);
    }

    #[test]
    fn an_entry_covers_one_whose_every_request_it_matches() {
        let all = catch_all();
        let api = json!({"path": {"type": "PathPrefix", "value": "/api"}, "headers": [{"name": "X-A", "value": "1"}]});
        let api_x = json!({"path": {"type": "Exact", "value": "/api/x"}, "method": "GET",
                           "headers": [{"name": "x-a", "type": "Exact", "value": "1"}, {"name": "b", "value": "2"}]});
        assert!(covers(&all, &api) && covers(&api, &api_x) && covers(&api_x, &api_x));
        assert!(!covers(&api, &all) && !covers(&api_x, &api));
        let other_value = json!({"path": {"type": "PathPrefix", "value": "/api"}, "headers": [{"name": "x-a", "value": "2"}]});
        assert!(!covers(&other_value, &api_x));
        let regex = json!({"path": {"type": "RegularExpression", "value": "/.*"}});
        assert!(covers(&all, &regex) && !covers(&regex, &all));
        assert!(!covers(&json!({"futureField": 1}), &api));
    }

    #[test]
    fn rank_orders_exact_then_prefix_length_then_method_headers_and_query() {
        let r = |v: Value| rank(&v);
        let exact = r(json!({"path": {"type": "Exact", "value": "/a"}}));
        let long = r(json!({"path": {"type": "PathPrefix", "value": "/abc"}}));
        let short_with_all = r(
            json!({"path": {"type": "PathPrefix", "value": "/a"}, "method": "GET",
            "headers": [{"name": "x", "value": "1"}], "queryParams": [{"name": "q", "value": "1"}]}),
        );
        let method = r(json!({"method": "GET"}));
        let headers = r(
            json!({"headers": [{"name": "x", "value": "1"}, {"name": "X", "value": "2"}, {"name": "y", "value": "1"}]}),
        );
        let one_header = r(
            json!({"headers": [{"name": "x", "value": "1"}], "queryParams": [{"name": "q", "value": "1"}]}),
        );
        assert!(exact > long && long > short_with_all);
        assert!(method > headers, "a method outranks any number of headers");
        assert!(headers > one_header, "x and X are one header");
        assert!(r(json!({"path": {"type": "RegularExpression", "value": "/.*"}})) < r(catch_all()));
    }
}
