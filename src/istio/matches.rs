//! ANDing Istio `HTTPMatchRequest`s: a route's own `match` with a canary's `always`/`never`.
//!
//! Istio ORs the entries of a route's `match` and ANDs the conditions inside one entry, so
//! "the route's match AND one of ours" is every pair (route entry, our entry) merged into one
//! entry. A pair whose conditions exclude each other (two different exact URIs, say) matches
//! nothing and is left out. A pair this code cannot merge exactly (two different regexes on one
//! field, or a field it does not know set differently on both sides) is an error: guessing
//! could send a request that must never be recorded to the recording clone.

use serde_json::{Map, Value};

/// Fields of an `HTTPMatchRequest` that hold one `StringMatch`.
const STRING_FIELDS: [&str; 4] = ["uri", "scheme", "method", "authority"];
/// Fields that map a name to a `StringMatch`.
const MAP_FIELDS: [&str; 3] = ["headers", "queryParams", "withoutHeaders"];

/// The merge of two conditions: one condition, or none at all (they exclude each other).
enum Merged {
    Both(Value),
    Nothing,
}

/// The route's `match` (absent: every request) ANDed with `ours` (a non-empty list).
/// `Ok(empty)`: no request can match both.
pub fn and(route_match: Option<&Value>, ours: &[Value]) -> Result<Vec<Value>, String> {
    let route: Vec<Value> = match route_match.and_then(Value::as_array) {
        Some(entries) if !entries.is_empty() => entries.clone(),
        _ => vec![Value::Object(Map::new())],
    };
    let mut out = Vec::new();
    for r in &route {
        for o in ours {
            if let Merged::Both(m) = entry(r, o)?
                && !out.contains(&m)
            {
                out.push(m);
            }
        }
    }
    Ok(out)
}

/// One route entry AND one of ours.
fn entry(route: &Value, ours: &Value) -> Result<Merged, String> {
    let (Some(r), Some(o)) = (route.as_object(), ours.as_object()) else {
        return Err(format!("a match entry is not an object: {route} / {ours}"));
    };
    let mut out = r.clone();
    for (k, theirs) in o {
        let Some(mine) = r.get(k) else {
            out.insert(k.clone(), theirs.clone());
            continue;
        };
        let ignore_case =
            k == "uri" && r.get("ignoreUriCase").and_then(Value::as_bool) == Some(true);
        let merged = if STRING_FIELDS.contains(&k.as_str()) {
            if ignore_case && mine != theirs {
                return Err(format!(
                    "the route matches uri {mine} ignoring case, and {theirs} cannot be combined with it exactly"
                ));
            }
            string_match(k, mine, theirs)?
        } else if MAP_FIELDS.contains(&k.as_str()) {
            map(k, mine, theirs)?
        } else if mine == theirs {
            Merged::Both(mine.clone())
        } else {
            return Err(format!(
                "the route's match sets {k} to {mine}, and it cannot be combined with {theirs}"
            ));
        };
        match merged {
            Merged::Both(v) => {
                out.insert(k.clone(), v);
            }
            Merged::Nothing => return Ok(Merged::Nothing),
        }
    }
    Ok(Merged::Both(Value::Object(out)))
}

/// Two maps of name → `StringMatch`, merged name by name.
fn map(field: &str, mine: &Value, theirs: &Value) -> Result<Merged, String> {
    let (Some(a), Some(b)) = (mine.as_object(), theirs.as_object()) else {
        return Err(format!("{field} is not a map: {mine} / {theirs}"));
    };
    let mut out = a.clone();
    for (name, t) in b {
        let Some(m) = a.get(name) else {
            out.insert(name.clone(), t.clone());
            continue;
        };
        if field == "withoutHeaders" {
            // Absent-or-different AND absent-or-different: both exclusions must hold, which one
            // entry cannot say unless they are equal.
            if m == t {
                continue;
            }
            return Err(format!(
                "withoutHeaders.{name} is {m} on the route and {t} in the canary: they cannot be combined"
            ));
        }
        match string_match(&format!("{field}.{name}"), m, t)? {
            Merged::Both(v) => {
                out.insert(name.clone(), v);
            }
            Merged::Nothing => return Ok(Merged::Nothing),
        }
    }
    Ok(Merged::Both(Value::Object(out)))
}

/// The kind and text of a `StringMatch` with exactly one of exact/prefix/regex; `None` for an
/// empty one (Istio: the field is present, any value).
fn kind(v: &Value) -> Result<Option<(&str, &str)>, String> {
    let Some(o) = v.as_object() else {
        return Err(format!("{v} is not a StringMatch"));
    };
    let set: Vec<(&str, &str)> = ["exact", "prefix", "regex"]
        .into_iter()
        .filter_map(|k| o.get(k).and_then(Value::as_str).map(|s| (k, s)))
        .collect();
    match set.as_slice() {
        [] if o.is_empty() => Ok(None),
        [one] if o.len() == 1 => Ok(Some(*one)),
        _ => Err(format!(
            "{v} is not a StringMatch this controller can combine"
        )),
    }
}

/// Two `StringMatch`es on one field ANDed.
fn string_match(field: &str, mine: &Value, theirs: &Value) -> Result<Merged, String> {
    if mine == theirs {
        return Ok(Merged::Both(mine.clone()));
    }
    let (a, b) = match (kind(mine)?, kind(theirs)?) {
        (None, _) => return Ok(Merged::Both(theirs.clone())),
        (_, None) => return Ok(Merged::Both(mine.clone())),
        (Some(a), Some(b)) => (a, b),
    };
    let keep = |v: &Value| Ok(Merged::Both(v.clone()));
    match (a, b) {
        (("exact", x), ("exact", y)) if x != y => Ok(Merged::Nothing),
        (("prefix", x), ("prefix", y)) if x.starts_with(y) => keep(mine),
        (("prefix", x), ("prefix", y)) if y.starts_with(x) => keep(theirs),
        (("prefix", _), ("prefix", _)) => Ok(Merged::Nothing),
        (("exact", x), ("prefix", y)) => {
            if x.starts_with(y) {
                keep(mine)
            } else {
                Ok(Merged::Nothing)
            }
        }
        (("prefix", x), ("exact", y)) => {
            if y.starts_with(x) {
                keep(theirs)
            } else {
                Ok(Merged::Nothing)
            }
        }
        _ => Err(format!(
            "{field} matches {mine} on the route and {theirs} in the canary: a regex cannot be combined with another condition on the same field exactly"
        )),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_route_without_match_takes_ours_as_they_are() {
        let ours = vec![json!({"headers": {"x-record": {"exact": "1"}}})];
        assert_eq!(and(None, &ours).unwrap(), ours);
        assert_eq!(and(Some(&json!([])), &ours).unwrap(), ours);
    }

    #[test]
    fn every_route_entry_is_anded_with_every_one_of_ours() {
        let route = json!([{"uri": {"prefix": "/api"}}, {"uri": {"prefix": "/v2"}}]);
        let ours = vec![
            json!({"headers": {"x-team": {"exact": "qa"}}}),
            json!({"method": {"exact": "GET"}}),
        ];
        let got = and(Some(&route), &ours).unwrap();
        assert_eq!(
            got,
            vec![
                json!({"uri": {"prefix": "/api"}, "headers": {"x-team": {"exact": "qa"}}}),
                json!({"uri": {"prefix": "/api"}, "method": {"exact": "GET"}}),
                json!({"uri": {"prefix": "/v2"}, "headers": {"x-team": {"exact": "qa"}}}),
                json!({"uri": {"prefix": "/v2"}, "method": {"exact": "GET"}}),
            ]
        );
    }

    #[test]
    fn the_route_keeps_its_other_conditions_and_headers_merge_by_name() {
        let route = json!([{"port": 8080, "headers": {"x-a": {"exact": "1"}}, "name": "r"}]);
        let ours = vec![json!({"headers": {"x-b": {"prefix": "z"}}})];
        assert_eq!(
            and(Some(&route), &ours).unwrap(),
            vec![
                json!({"port": 8080, "name": "r", "headers": {"x-a": {"exact": "1"}, "x-b": {"prefix": "z"}}})
            ]
        );
    }

    #[test]
    fn prefixes_and_exacts_narrow_to_the_stricter_or_to_nothing() {
        let cases = [
            (
                json!({"prefix": "/api"}),
                json!({"prefix": "/api/health"}),
                Some(json!({"prefix": "/api/health"})),
            ),
            (
                json!({"prefix": "/api/health"}),
                json!({"prefix": "/api"}),
                Some(json!({"prefix": "/api/health"})),
            ),
            (json!({"prefix": "/api"}), json!({"prefix": "/web"}), None),
            (
                json!({"exact": "/api/x"}),
                json!({"prefix": "/api"}),
                Some(json!({"exact": "/api/x"})),
            ),
            (
                json!({"prefix": "/api"}),
                json!({"exact": "/api/x"}),
                Some(json!({"exact": "/api/x"})),
            ),
            (json!({"exact": "/web"}), json!({"prefix": "/api"}), None),
            (json!({"exact": "/a"}), json!({"exact": "/b"}), None),
            (
                json!({"regex": "/a.*"}),
                json!({"regex": "/a.*"}),
                Some(json!({"regex": "/a.*"})),
            ),
            (
                json!({}),
                json!({"exact": "/a"}),
                Some(json!({"exact": "/a"})),
            ),
        ];
        for (mine, theirs, want) in cases {
            let route = json!([{ "uri": mine }]);
            let got = and(Some(&route), &[json!({ "uri": theirs })]).unwrap();
            let want: Vec<Value> = want.map(|w| json!({ "uri": w })).into_iter().collect();
            assert_eq!(got, want, "{mine} AND {theirs}");
        }
    }

    #[test]
    fn what_cannot_be_combined_exactly_is_an_error_not_a_guess() {
        let cases = [
            (
                json!([{"uri": {"regex": "/a.*"}}]),
                json!({"uri": {"prefix": "/a"}}),
            ),
            (
                json!([{"uri": {"prefix": "/A"}, "ignoreUriCase": true}]),
                json!({"uri": {"prefix": "/a/b"}}),
            ),
            (
                json!([{"sourceLabels": {"app": "a"}}]),
                json!({"sourceLabels": {"app": "b"}}),
            ),
            (
                json!([{"withoutHeaders": {"x": {"exact": "1"}}}]),
                json!({"withoutHeaders": {"x": {"exact": "2"}}}),
            ),
            (
                json!([{"uri": {"exact": "/a", "prefix": "/a"}}]),
                json!({"uri": {"prefix": "/b"}}),
            ),
        ];
        for (route, ours) in cases {
            assert!(
                and(Some(&route), std::slice::from_ref(&ours)).is_err(),
                "{route} AND {ours}"
            );
        }
    }

    #[test]
    fn a_route_entry_that_excludes_ours_is_left_out_and_duplicates_collapse() {
        let route = json!([{"uri": {"exact": "/a"}}, {"uri": {"exact": "/b"}}]);
        let ours = vec![
            json!({"uri": {"exact": "/a"}}),
            json!({"uri": {"prefix": "/a"}}),
        ];
        assert_eq!(
            and(Some(&route), &ours).unwrap(),
            vec![json!({"uri": {"exact": "/a"}})]
        );
    }
}
