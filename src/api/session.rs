//! `spec.sessionKey`: whole sessions instead of scattered requests. A weighted split picks a side
//! per request, so a recording holds a share of each user's requests; with a session key the
//! side is a pure function of a key the requests already carry (a session cookie, a user id
//! header, the trace id), so every request of a chosen session goes to the clone from the first
//! one, with no cookie injected.
//!
//! The key's last two characters pick one of `n²` buckets, `n` the size of its declared alphabet
//! (hex: 256 buckets, a step of 0.39 %; base64url: 4,096, 0.024 %). At `percent`, the first
//! `round(percent × buckets / 100)` buckets, in a fixed order, go to the clone: ramping only adds
//! buckets, so a session recorded at 10 % is still recorded at 20 %. The buckets become two
//! request matches in Istio's shape ([`SessionKey::matches`]): one for keys in the share (added to
//! `always`), one for keys outside it (added to `never`), as regular expressions (RE2) anchored on
//! both ends, so that they mean the same matched against the whole value (Istio) or searched.
//! Requests without the key (or with one shorter than two characters of the alphabet) follow the
//! weighted split, or never reach the clone (`withoutKey: Stable`).

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// A header name as Istio matches it: lower case, an RFC 7230 token.
const HEADER_NAME: &str = r"^[a-z0-9!#$%&'*+.^_`|~-]+$";
/// A cookie name: an RFC 6265 token.
const COOKIE_NAME: &str = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$";
/// A query parameter name: unreserved URL characters.
const QUERY_PARAM_NAME: &str = r"^[A-Za-z0-9._~-]+$";

const ONE_KEY: &str = "spec.sessionKey must set exactly one of header, cookie or queryParam";

/// Where a request carries its session key, and what the key looks like.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.header) ? 1 : 0) + (has(self.cookie) ? 1 : 0) + (has(self.queryParam) ? 1 : 0) == 1").message(ONE_KEY))]
pub struct SessionKey {
    /// A request header (lower case), such as `x-session-id` or `x-b3-traceid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), pattern(HEADER_NAME))]
    pub header: Option<String>,
    /// A cookie, such as `session`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), pattern(COOKIE_NAME))]
    pub cookie: Option<String>,
    /// A query parameter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), pattern(QUERY_PARAM_NAME))]
    pub query_param: Option<String>,
    /// The characters the key ends with: `Hex` (the default: UUIDs, trace ids; either case) or
    /// `Base64url` (`A-Z a-z 0-9 - _`).
    #[serde(default)]
    pub alphabet: Alphabet,
    /// Requests without the key: `Split` (the default: the weighted split at `percent`) or
    /// `Stable` (never the clone).
    #[serde(default)]
    pub without_key: WithoutKey,
}

/// The alphabet of a session key's last characters.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Alphabet {
    /// `0-9 a-f`, either case.
    #[default]
    Hex,
    /// `A-Z a-z 0-9 - _` (RFC 4648 §5).
    Base64url,
}

/// What happens to requests without the key.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum WithoutKey {
    /// The weighted split at `percent`.
    #[default]
    Split,
    /// Never the clone.
    Stable,
}

impl Alphabet {
    /// The symbols in bucket order, each with the characters that spell it.
    fn symbols(self) -> Vec<Vec<char>> {
        match self {
            Alphabet::Hex => "0123456789abcdef"
                .chars()
                .map(|c| {
                    let up = c.to_ascii_uppercase();
                    if up == c { vec![c] } else { vec![c, up] }
                })
                .collect(),
            Alphabet::Base64url => {
                "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
                    .chars()
                    .map(|c| vec![c])
                    .collect()
            }
        }
    }
}

/// The two request matches of a session key at a percent, in Istio's `HTTPMatchRequest` shape.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionMatches {
    /// Requests whose key is in the share (none at 0 %).
    pub inside: Option<Value>,
    /// Requests whose key is outside the share (none at 100 %).
    pub outside: Option<Value>,
}

impl SessionKey {
    /// How many buckets the key's last two characters pick from.
    pub fn buckets(&self) -> usize {
        let n = self.alphabet.symbols().len();
        n * n
    }

    /// How many buckets go to the clone at `percent` (rounded; never fewer at a higher percent).
    pub fn share(&self, percent: i32) -> usize {
        let p = usize::try_from(percent.clamp(0, 100)).unwrap_or(0);
        (p * self.buckets() + 50) / 100
    }

    /// What the key is, for messages: `header x-session`.
    pub fn describe(&self) -> String {
        match (&self.header, &self.cookie, &self.query_param) {
            (Some(h), _, _) => format!("header {h}"),
            (_, Some(c), _) => format!("cookie {c}"),
            (_, _, Some(q)) => format!("query parameter {q}"),
            _ => "no key".into(),
        }
    }

    /// The share, in percent, that `percent` becomes (a multiple of `100 / buckets`).
    pub fn effective_percent(&self, percent: i32) -> f64 {
        self.share(percent) as f64 * 100.0 / self.buckets() as f64
    }

    /// The regular expression (RE2, anchored) of the values whose last two characters fall in
    /// buckets `range`.
    fn value_regex(&self, range: std::ops::Range<usize>) -> String {
        let syms = self.alphabet.symbols();
        let n = syms.len();
        let mut parts = Vec::new();
        let (lo, hi) = (range.start, range.end);
        let (q_lo, r_lo) = (lo / n, lo % n);
        let (q_hi, r_hi) = (hi / n, hi % n);
        if q_lo == q_hi {
            parts.push(format!(
                "{}{}",
                class(&syms[q_lo..=q_lo]),
                class(&syms[r_lo..r_hi])
            ));
        } else {
            let mut first_full = q_lo;
            if r_lo > 0 {
                parts.push(format!(
                    "{}{}",
                    class(&syms[q_lo..=q_lo]),
                    class(&syms[r_lo..])
                ));
                first_full += 1;
            }
            if first_full < q_hi {
                parts.push(format!(
                    "{}{}",
                    class(&syms[first_full..q_hi]),
                    class(&syms)
                ));
            }
            if r_hi > 0 {
                parts.push(format!(
                    "{}{}",
                    class(&syms[q_hi..=q_hi]),
                    class(&syms[..r_hi])
                ));
            }
        }
        format!("(?:{})", parts.join("|"))
    }

    /// The Istio-shaped match of requests whose key falls in buckets `range`.
    fn entry(&self, range: std::ops::Range<usize>) -> Value {
        let v = self.value_regex(range);
        if let Some(h) = &self.header {
            json!({"headers": {h: {"regex": format!("^.*{v}$")}}})
        } else if let Some(c) = &self.cookie {
            // The cookie's value ends in the bucket: `name=value` at the start of the header or
            // after `; `, up to the next `;` or the end.
            json!({"headers": {"cookie": {"regex": format!("^(?:.*;\\s*)?{}=[^;]*{v}(?:;.*)?$", escape(c))}}})
        } else {
            let q = self.query_param.clone().unwrap_or_default();
            json!({"queryParams": {q: {"regex": format!("^.*{v}$")}}})
        }
    }

    /// The matches of requests whose key is in the clone's share at `percent`, and of those whose
    /// key is outside it.
    pub fn matches(&self, percent: i32) -> SessionMatches {
        let (n, all) = (self.share(percent), self.buckets());
        SessionMatches {
            inside: (n > 0).then(|| self.entry(0..n)),
            outside: (n < all).then(|| self.entry(n..all)),
        }
    }
}

/// A regex character class of `symbols`, contiguous characters as ranges.
fn class(symbols: &[Vec<char>]) -> String {
    let mut chars: Vec<char> = symbols.iter().flatten().copied().collect();
    chars.sort_unstable();
    chars.dedup();
    let mut out = String::from("[");
    let mut i = 0;
    while i < chars.len() {
        let mut j = i;
        while j + 1 < chars.len() && u32::from(chars[j + 1]) == u32::from(chars[j]) + 1 {
            j += 1;
        }
        let esc = |c: char| {
            if "\\]^-[".contains(c) {
                format!("\\{c}")
            } else {
                c.to_string()
            }
        };
        out.push_str(&esc(chars[i]));
        if j > i {
            if j > i + 1 {
                out.push('-');
            }
            out.push_str(&esc(chars[j]));
        }
        i = j + 1;
    }
    out.push(']');
    out
}

/// `s` with RE2's metacharacters escaped.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if r"\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(json: Value) -> SessionKey {
        serde_json::from_value(json).unwrap()
    }

    /// The value regex of an Istio-shaped match, anchored as it is, compiled with an RE2-like
    /// engine (the `regex` crate: no backtracking, RE2 syntax).
    fn regex_of(m: &Value) -> regex::Regex {
        let sm = m
            .pointer("/headers/x-session")
            .or_else(|| m.pointer("/headers/cookie"))
            .or_else(|| m.pointer("/queryParams/sid"))
            .unwrap();
        regex::Regex::new(sm["regex"].as_str().unwrap()).unwrap()
    }

    /// `n` random keys: UUIDs (hex, either case) or 22 base64url characters.
    fn keys(alphabet: Alphabet, n: usize, seed: u64) -> Vec<String> {
        let mut state = seed;
        let mut next = move || {
            // xorshift64*: deterministic, uniform enough for bucket shares.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let b64: Vec<char> = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
            .chars()
            .collect();
        (0..n)
            .map(|_| match alphabet {
                Alphabet::Hex => {
                    let hex: String = (0..32).map(|_| format!("{:x}", next() % 16)).collect();
                    let s = format!(
                        "{}-{}-{}-{}-{}",
                        &hex[..8],
                        &hex[8..12],
                        &hex[12..16],
                        &hex[16..20],
                        &hex[20..]
                    );
                    if next() % 2 == 0 { s.to_uppercase() } else { s }
                }
                Alphabet::Base64url => (0..22).map(|_| b64[(next() % 64) as usize]).collect(),
            })
            .collect()
    }

    #[test]
    fn twenty_thousand_random_keys_split_within_a_point_of_the_percent_and_keep_their_side_through_a_ramp()
     {
        for alphabet in [Alphabet::Hex, Alphabet::Base64url] {
            let k = key(json!({"header": "x-session", "alphabet": alphabet}));
            let keys = keys(alphabet, 20_000, 0x9e37_79b9_7f4a_7c15);
            let mut recorded_before: Vec<bool> = vec![false; keys.len()];
            for percent in [0, 1, 5, 10, 20, 30, 50, 75, 99, 100] {
                let m = k.matches(percent);
                let inside = m.inside.as_ref().map(regex_of);
                let outside = m.outside.as_ref().map(regex_of);
                let mut n = 0;
                for (i, key) in keys.iter().enumerate() {
                    let is_in = inside.as_ref().is_some_and(|r| r.is_match(key));
                    let is_out = outside.as_ref().is_some_and(|r| r.is_match(key));
                    assert!(
                        is_in != is_out,
                        "{alphabet:?} {percent}%: {key} in {is_in}, out {is_out}"
                    );
                    if recorded_before[i] {
                        assert!(
                            is_in,
                            "{alphabet:?}: {key} left the clone's side at {percent}%"
                        );
                    }
                    recorded_before[i] = is_in;
                    n += usize::from(is_in);
                }
                let share = n as f64 * 100.0 / keys.len() as f64;
                assert!(
                    (share - f64::from(percent)).abs() <= 1.0,
                    "{alphabet:?} {percent}%: {share:.2}% of the keys"
                );
            }
        }
    }

    #[test]
    fn cookie_and_query_parameter_keys_match_only_their_own_value() {
        let k = key(json!({"cookie": "session", "alphabet": "Hex"}));
        let m = k.matches(50);
        let inside = regex_of(m.inside.as_ref().unwrap());
        let outside = regex_of(m.outside.as_ref().unwrap());
        // Bucket "00" is the first: inside at 50 %; "ff" is outside.
        assert!(inside.is_match("session=abc00"));
        assert!(inside.is_match("theme=dark; session=abc00; lang=en"));
        assert!(outside.is_match("theme=dark; session=abcff"));
        // Another cookie's value, or a name that ends like it, is no key.
        assert!(!inside.is_match("xsession=abc00") && !outside.is_match("xsession=abc00"));
        // A value that does not end in the alphabet, or no such cookie: no key.
        assert!(!inside.is_match("session=abzz") && !outside.is_match("session=abzz"));
        assert!(!inside.is_match("lang=en") && !outside.is_match("lang=en"));
        let q = key(json!({"queryParam": "sid"}));
        let qm = q.matches(50);
        assert!(regex_of(qm.inside.as_ref().unwrap()).is_match("0a00"));
    }

    #[test]
    fn the_share_is_a_whole_number_of_buckets_and_grows_with_the_percent() {
        let hex = key(json!({"header": "x-session"}));
        assert_eq!(hex.buckets(), 256);
        assert_eq!(hex.share(10), 26);
        assert!((hex.effective_percent(10) - 10.156).abs() < 0.01);
        assert!(hex.matches(0).inside.is_none() && hex.matches(100).outside.is_none());
        let b64 = key(json!({"header": "x-session", "alphabet": "Base64url"}));
        assert_eq!(b64.buckets(), 4096);
        let mut last = 0;
        for p in 0..=100 {
            assert!(b64.share(p) >= last);
            last = b64.share(p);
        }
        // Short regexes: the proxies' RE2 program size limits stay far away.
        for p in 0..=100 {
            for m in [hex.matches(p), b64.matches(p)] {
                for e in [m.inside, m.outside].into_iter().flatten() {
                    assert!(e.to_string().len() < 200, "{e}");
                }
            }
        }
    }
}
