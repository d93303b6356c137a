//! For tests: which rule of an HTTPRoute a request reaches, by the Gateway API's documented
//! algorithm (`HTTPRouteRule.matches`, v1.6), written from its text and independent of
//! [`super::matches::rank`]; and which requests the canary's Istio-shaped matches select, by
//! Istio's semantics (string prefixes, RE2 regular expressions matched against the whole value).
//!
//! > Proxy or Load Balancer routing configuration generated from HTTPRoutes MUST prioritize
//! > matches based on the following criteria, continuing on ties. Across all rules specified on
//! > applicable Routes, precedence must be given to the match having:
//! > * "Exact" path match.
//! > * "Prefix" path match with largest number of characters.
//! > * Method match.
//! > * Largest number of header matches.
//! > * Largest number of query param matches.
//! >
//! > Note: The precedence of RegularExpression path matches are implementation-specific.
//! > [...] If ties still exist within an HTTPRoute, matching precedence MUST be granted to the
//! > FIRST matching rule (in list order) with a match meeting the above criteria.
//!
//! A `RegularExpression` path ranks here below every `PathPrefix`, as Istio does.

use std::cmp::Ordering;

use serde_json::Value;

/// An HTTP request, as far as matching goes.
#[derive(Debug, Clone)]
pub struct Request {
    pub path: String,
    pub method: String,
    /// Header names as sent (any case).
    pub headers: Vec<(String, String)>,
    pub query: Vec<(String, String)>,
}

fn full_match(re: &str, value: &str) -> bool {
    regex::Regex::new(&format!("^(?:{re})$")).is_ok_and(|r| r.is_match(value))
}

fn header<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn query<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.query
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// PathPrefix semantics, from the Gateway API's text: element-wise, a trailing `/` ignored.
fn path_prefix(prefix: &str, path: &str) -> bool {
    let want: Vec<&str> = prefix.split('/').filter(|s| !s.is_empty()).collect();
    let have: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    have.len() >= want.len() && have[..want.len()] == want[..]
}

/// How a Gateway API match entry's path matched: its precedence class and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PathHit {
    Exact,
    Prefix(usize),
    Regex(usize),
}

fn path_hit(entry: &Value, path: &str) -> Option<PathHit> {
    let p = entry.get("path");
    let ty = p
        .and_then(|p| p.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("PathPrefix");
    let value = p
        .and_then(|p| p.get("value"))
        .and_then(Value::as_str)
        .unwrap_or("/");
    match ty {
        "Exact" => (path == value).then_some(PathHit::Exact),
        "PathPrefix" => path_prefix(value, path).then_some(PathHit::Prefix(value.len())),
        _ => full_match(value, path).then_some(PathHit::Regex(value.len())),
    }
}

fn named_all(entry: &Value, field: &str, get: impl Fn(&str) -> Option<String>) -> Option<usize> {
    let list = entry
        .get(field)
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut seen: Vec<String> = Vec::new();
    for m in &list {
        let name = m["name"].as_str().unwrap_or_default();
        let key = if field == "headers" {
            name.to_ascii_lowercase()
        } else {
            name.to_string()
        };
        if seen.contains(&key) {
            continue; // only the first entry of a name counts
        }
        seen.push(key);
        let v = get(name)?;
        let want = m["value"].as_str().unwrap_or_default();
        let ok = match m["type"].as_str().unwrap_or("Exact") {
            "Exact" => v == want,
            _ => full_match(want, &v),
        };
        if !ok {
            return None;
        }
    }
    Some(seen.len())
}

/// The precedence of a matching entry, `None` if it does not match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hit {
    path: PathHit,
    method: bool,
    headers: usize,
    query: usize,
}

fn hit(entry: &Value, req: &Request) -> Option<Hit> {
    let path = path_hit(entry, &req.path)?;
    let method = match entry.get("method").and_then(Value::as_str) {
        Some(m) if m != req.method => return None,
        Some(_) => true,
        None => false,
    };
    let headers = named_all(entry, "headers", |n| header(req, n).map(String::from))?;
    let query = named_all(entry, "queryParams", |n| query(req, n).map(String::from))?;
    Some(Hit {
        path,
        method,
        headers,
        query,
    })
}

/// "Continuing on ties": the first criterion that differs decides.
fn compare(a: &Hit, b: &Hit) -> Ordering {
    let class = |p: PathHit| match p {
        PathHit::Exact => (2, 0),
        PathHit::Prefix(n) => (1, n),
        PathHit::Regex(n) => (0, n),
    };
    class(a.path)
        .cmp(&class(b.path))
        .then(a.method.cmp(&b.method))
        .then(a.headers.cmp(&b.headers))
        .then(a.query.cmp(&b.query))
}

/// Whether an entry of a rule's `matches` matches the request.
pub fn matches(entry: &Value, req: &Request) -> bool {
    hit(entry, req).is_some()
}

/// The index of the rule the request reaches, if any.
pub fn winner(rules: &[Value], req: &Request) -> Option<usize> {
    let mut best: Option<(Hit, usize)> = None;
    for (i, rule) in rules.iter().enumerate() {
        let entries = match rule.get("matches").and_then(Value::as_array) {
            Some(m) if !m.is_empty() => m.clone(),
            _ => vec![serde_json::json!({})],
        };
        for e in entries {
            let Some(h) = hit(&e, req) else { continue };
            // Strictly better only: on a tie the earlier rule (already held) keeps it.
            if best
                .as_ref()
                .is_none_or(|(b, _)| compare(&h, b) == Ordering::Greater)
            {
                best = Some((h, i));
            }
        }
    }
    best.map(|(_, i)| i)
}

fn istio_string(sm: &Value, value: Option<&str>) -> bool {
    let Some(v) = value else { return false };
    if let Some(e) = sm.get("exact").and_then(Value::as_str) {
        return v == e;
    }
    if let Some(p) = sm.get("prefix").and_then(Value::as_str) {
        return v.starts_with(p);
    }
    if let Some(r) = sm.get("regex").and_then(Value::as_str) {
        return full_match(r, v);
    }
    false
}

/// Whether an Istio `HTTPMatchRequest` (the canary's `always`/`never` entry) matches, by Istio's
/// semantics.
pub fn istio_matches(m: &Value, req: &Request) -> bool {
    let map_ok = |field: &str, get: &dyn Fn(&str) -> Option<String>| {
        m.get(field)
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .all(|(name, sm)| istio_string(sm, get(name).as_deref()))
    };
    m.get("uri")
        .is_none_or(|u| istio_string(u, Some(&req.path)))
        && m.get("method")
            .is_none_or(|u| istio_string(u, Some(&req.method)))
        && map_ok("headers", &|n| header(req, n).map(String::from))
        && map_ok("queryParams", &|n| query(req, n).map(String::from))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn get(path: &str) -> Request {
        Request {
            path: path.into(),
            method: "GET".into(),
            headers: vec![],
            query: vec![],
        }
    }

    #[test]
    fn the_documented_order_decides_and_ties_go_to_the_first_rule() {
        let rules = vec![
            json!({"matches": [{"path": {"type": "PathPrefix", "value": "/"}}]}),
            json!({"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}]}),
            json!({"matches": [{"path": {"type": "PathPrefix", "value": "/api"}, "headers": [{"name": "x", "value": "1"}]}]}),
            json!({"matches": [{"path": {"type": "Exact", "value": "/api/x"}}]}),
            json!({"matches": [{"path": {"type": "PathPrefix", "value": "/api"}, "method": "GET"}]}),
            json!({"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}]}),
        ];
        assert_eq!(winner(&rules, &get("/web")), Some(0));
        assert_eq!(
            winner(&rules, &get("/apix")),
            Some(0),
            "segments, not characters"
        );
        assert_eq!(winner(&rules, &get("/api/x")), Some(3));
        assert_eq!(
            winner(&rules, &get("/api/y")),
            Some(4),
            "a method beats a header"
        );
        let mut post = get("/api/y");
        post.method = "POST".into();
        assert_eq!(winner(&rules, &post), Some(1), "the first of equals");
        post.headers.push(("X".into(), "1".into()));
        assert_eq!(winner(&rules, &post), Some(2));
        assert_eq!(winner(&[], &post), None);
    }

    #[test]
    fn istio_prefixes_are_string_prefixes() {
        let m = json!({"uri": {"prefix": "/health"}, "headers": {"x-a": {"regex": "a+"}}});
        let mut r = get("/healthz");
        assert!(!istio_matches(&m, &r));
        r.headers.push(("X-A".into(), "aaa".into()));
        assert!(istio_matches(&m, &r));
        r.headers[0].1 = "aab".into();
        assert!(!istio_matches(&m, &r), "a regex matches the whole value");
    }
}
