//! Sharding: several controller processes split the canaries between them by a stable hash of
//! the namespace, each holding the Lease of its shard.
//!
//! With `--shards N`, a process takes the first free Lease of `<lease-name>-shard-0` …
//! `<lease-name>-shard-<N-1>` and reconciles only the canaries of namespaces whose hash falls in
//! that shard. A namespace never moves between shards while N stays the same, and every process
//! watches the same objects but caches only what its own canaries need.

/// The canaries this process reconciles: those of namespaces in shard `index` of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Default for Shard {
    /// One shard holding every namespace.
    fn default() -> Self {
        Self { index: 0, count: 1 }
    }
}

/// FNV-1a (64 bit): a hash that never changes between builds or Rust versions, unlike std's.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// MurmurHash3's 64-bit finalizer: every bit of the result depends on every bit of `k`.
/// FNV-1a alone mixes its low bits poorly: its lowest bit is the parity of the odd bytes of the
/// name, so with 2 shards `app-1`, `app-3` … `app-9` would all fall in the same one.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

impl Shard {
    /// The shard namespace `ns` belongs to, of `count`.
    pub fn of(ns: &str, count: u32) -> u32 {
        (fmix64(fnv1a(ns)) % u64::from(count.max(1))) as u32
    }

    /// Whether this shard reconciles the canaries of namespace `ns`.
    pub fn owns(&self, ns: &str) -> bool {
        self.count <= 1 || Self::of(ns, self.count) == self.index
    }

    /// The Lease of shard `index` (the base name alone without sharding).
    pub fn lease_name(base: &str, index: u32, count: u32) -> String {
        if count <= 1 {
            base.to_string()
        } else {
            format!("{base}-shard-{index}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_shard_owns_every_namespace() {
        assert!(Shard::default().owns("anything"));
    }

    #[test]
    fn every_namespace_belongs_to_exactly_one_of_n_shards_and_the_split_is_even() {
        let n = 4;
        let mut counts = [0u32; 4];
        for i in 0..1000 {
            let ns = format!("team-{i}");
            let owners: Vec<u32> = (0..n)
                .filter(|&s| Shard { index: s, count: n }.owns(&ns))
                .collect();
            assert_eq!(owners.len(), 1, "{ns}: {owners:?}");
            counts[owners[0] as usize] += 1;
        }
        for c in counts {
            assert!((200..=300).contains(&c), "uneven split: {counts:?}");
        }
    }

    #[test]
    fn names_that_differ_in_one_character_spread_over_the_shards() {
        // The last character changes and is always odd.
        for prefix in ["app-", "team", "prod-eu-", "rc-fleet-abcde-"] {
            for count in [2, 3, 4] {
                let used: std::collections::BTreeSet<u32> =
                    ["1", "3", "5", "7", "9", "a", "c", "e"]
                        .iter()
                        .map(|last| Shard::of(&format!("{prefix}{last}"), count))
                        .collect();
                // FNV-1a alone: one of 2 shards, and 2 of 4.
                assert_eq!(
                    used.len(),
                    count as usize,
                    "{prefix}* over {count} shards: {used:?}"
                );
            }
        }
    }

    #[test]
    fn the_hash_is_stable_across_builds() {
        // Test vectors: a change here would move namespaces between shards on upgrade.
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fmix64(0), 0);
        assert_eq!(fmix64(1), 0xb456_bcfc_34c2_cb2c);
        let shards: Vec<u32> = ["default", "shop", "kube-system", "team-7"]
            .iter()
            .map(|ns| Shard::of(ns, 4))
            .collect();
        assert_eq!(shards, [1, 3, 0, 0]);
    }

    #[test]
    fn shard_leases_are_named_after_the_base_lease() {
        assert_eq!(Shard::lease_name("rc", 0, 1), "rc");
        assert_eq!(Shard::lease_name("rc", 1, 3), "rc-shard-1");
    }
}
