//! The labels that tie objects to a canary: what marks a clone, and which Deployment a pod is of.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::CANARY_LABEL;

/// Label every object created by the controller carries.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "recording-canary");

/// The canary whose clone a Deployment is (by the labels every clone carries), if it is one.
pub fn clone_of(meta: &ObjectMeta) -> Option<&str> {
    let labels = meta.labels.as_ref()?;
    if labels.get(MANAGED_BY.0).map(String::as_str) != Some(MANAGED_BY.1) {
        return None;
    }
    labels.get(CANARY_LABEL).map(String::as_str)
}

/// Whether the controlling ReplicaSet of a pod (its metadata alone, what a metadata-only watch
/// delivers) belongs to Deployment `deploy` (a Deployment names its ReplicaSets
/// `<deployment>-<pod-template-hash>`).
pub fn meta_of_deployment(meta: &ObjectMeta, deploy: &str) -> bool {
    let Some(hash) = meta
        .labels
        .as_ref()
        .and_then(|l| l.get("pod-template-hash"))
    else {
        return false;
    };
    let rs = format!("{deploy}-{hash}");
    meta.owner_references.as_ref().is_some_and(|o| {
        o.iter()
            .any(|r| r.controller == Some(true) && r.kind == "ReplicaSet" && r.name == rs)
    })
}

/// The two Services a canary owns on the Gateway API router, `(stable, recording)`: its name made
/// a DNS label (dots become hyphens), then `-stable` / `-recording`; a name too long for 63
/// characters is cut and ends in 8 hex digits of its SHA-256, so two canaries never share one. A
/// Service name must start with a letter: a canary whose name starts with a digit cannot use the
/// Gateway API router (see [`backend_names_valid`]). The chart's fences check the same shape.
pub fn backend_service_names(canary: &str) -> (String, String) {
    use sha2::{Digest, Sha256};
    const MAX: usize = 63;
    const LONGEST_SUFFIX: &str = "-recording";
    let base: String = canary
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '-' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .collect();
    if base.len() + LONGEST_SUFFIX.len() > MAX {
        let hash: String = Sha256::digest(canary.as_bytes())
            .iter()
            .take(4)
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut base = base;
        base.truncate(MAX - LONGEST_SUFFIX.len() - hash.len() - 1);
        let base = base.trim_end_matches('-');
        return (
            format!("{base}-{hash}-stable"),
            format!("{base}-{hash}-recording"),
        );
    }
    (format!("{base}-stable"), format!("{base}-recording"))
}

/// Whether the canary's backend Service names are valid Service names (they start with a
/// letter).
pub fn backend_names_valid(canary: &str) -> bool {
    canary.starts_with(|c: char| c.is_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_service_names_are_dns_labels_of_at_most_63_characters() {
        assert_eq!(
            backend_service_names("frontend"),
            ("frontend-stable".into(), "frontend-recording".into())
        );
        assert_eq!(
            backend_service_names("shop.front"),
            ("shop-front-stable".into(), "shop-front-recording".into())
        );
        assert!(!backend_names_valid("1st") && backend_names_valid("frontend"));
        let long = "a".repeat(63);
        let (s, r) = backend_service_names(&long);
        assert!(s.len() <= 63 && r.len() <= 63, "{s} {r}");
        assert!(r.ends_with("-recording") && s.ends_with("-stable"));
        // Two long names that share their first characters stay apart.
        let other = format!("{}b", "a".repeat(62));
        assert_ne!(backend_service_names(&other).1, r);
        for (s, r) in [backend_service_names(&long), backend_service_names("x.y-z")] {
            // What the chart's fence accepts: the name with dots as hyphens, or cut with a hash.
            for n in [s, r] {
                assert!(
                    n.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                );
                assert!(n.starts_with(|c: char| c.is_ascii_lowercase()));
                assert!(!n.ends_with('-'));
            }
        }
    }
}
