//! Sharding: several controller processes split the canaries between them by a stable hash of
//! the namespace, each holding the Lease of its shard.
//!
//! With `--shards N`, a process takes the first free Lease of `<lease-name>-shard-0-of-N` …
//! `<lease-name>-shard-<N-1>-of-N` and reconciles only the canaries of namespaces whose hash falls in
//! that shard. A namespace never moves between shards while N stays the same, and every process
//! watches the same objects but caches only what its own canaries need.
//!
//! **Partitions.** Changing N moves namespaces between shards, so processes of two shard counts
//! must never lead at once. The shard count (with a generation that only grows) is the
//! *partition*, recorded in the Lease `<lease-name>-partition` ([`Record`]), which changes only
//! with `resourceVersion` concurrency. A process of partition N leads only while the record says
//! N and names no earlier partition that may still write ([`Record::admits`]), checked after each
//! take or renewal of its shard's Lease; it moves the record to N only when every Lease of the
//! record's partitions is free or expired and the record's generation is not newer than its own
//! ([`gate`]). Why that suffices: a process of the old partition that takes a Lease *after* the
//! record moved reads the record after its own Lease write and does not lead; one that took it
//! before is seen holding that Lease by every process of the new partition, which waits for it to
//! be released or to expire before it leads.

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

    /// The Lease of shard `index` of `count`: the base name alone without sharding (as before
    /// partitions, so that single-replica installs keep their Lease), else
    /// `<base>-shard-<index>-of-<count>`: the count is in the name, so that processes of two
    /// counts never lead through the same Lease.
    pub fn lease_name(base: &str, index: u32, count: u32) -> String {
        if count <= 1 {
            base.to_string()
        } else {
            format!("{base}-shard-{index}-of-{count}")
        }
    }

    /// The Lease of shard `index` as builds before partitions named it (`<base>-shard-<index>`,
    /// whatever the count). Such a build never reads the partition record, so a new partition
    /// waits until these Leases are free or expired (see [`Previous::Legacy`]).
    pub fn legacy_lease_name(base: &str, index: u32) -> String {
        format!("{base}-shard-{index}")
    }
}

/// The Lease that records the current partition.
pub fn record_name(base: &str) -> String {
    format!("{base}-partition")
}

/// How the canaries are split between processes: `shards`, and a `generation` that a deployment
/// raises with every change (the chart passes its release revision) so that a process of an
/// older deployment, restarted later, never takes the partition back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub shards: u32,
    pub generation: u64,
}

impl Partition {
    /// The Leases of this partition's shards.
    pub fn lease_names(&self, base: &str) -> Vec<String> {
        (0..self.shards.max(1))
            .map(|i| Shard::lease_name(base, i, self.shards))
            .collect()
    }
}

impl std::fmt::Display for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "shards={} generation={}", self.shards, self.generation)
    }
}

/// A partition before the current one, whose processes may still write until every one of its
/// Leases is seen free or expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Previous {
    /// Processes of this shard count.
    Shards(u32),
    /// Processes of a build before partitions (the record did not exist): they lead the Leases
    /// `<base>` and `<base>-shard-<i>` and never read the record.
    Legacy,
}

impl std::fmt::Display for Previous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Previous::Shards(n) => write!(f, "{n}"),
            Previous::Legacy => f.write_str(LEGACY),
        }
    }
}

const LEGACY: &str = "legacy";
/// Annotations of the record Lease.
pub const SHARDS_ANNOTATION: &str = "recordingcanary.dev/shards";
pub const GENERATION_ANNOTATION: &str = "recordingcanary.dev/generation";
pub const PREVIOUS_ANNOTATION: &str = "recordingcanary.dev/previous-shards";

/// The partition record: which partition leads, and which earlier one may still write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub current: Partition,
    /// Set when the record moves to `current`; cleared once a process of `current` saw every
    /// Lease of it free or expired (after the move, so that nobody of it can lead any more).
    pub previous: Option<Previous>,
}

impl Record {
    /// Reads the record from the annotations of its Lease; `None` if they are missing or garbled.
    pub fn from_annotations(a: &std::collections::BTreeMap<String, String>) -> Option<Self> {
        let shards: u32 = a.get(SHARDS_ANNOTATION)?.parse().ok()?;
        let generation: u64 = a.get(GENERATION_ANNOTATION)?.parse().ok()?;
        let previous = match a.get(PREVIOUS_ANNOTATION).map(String::as_str) {
            None | Some("") => None,
            Some(LEGACY) => Some(Previous::Legacy),
            Some(n) => Some(Previous::Shards(n.parse().ok().filter(|n| *n >= 1)?)),
        };
        (shards >= 1).then_some(Self {
            current: Partition { shards, generation },
            previous,
        })
    }

    /// The annotations that say this record (set on the Lease, replacing the old ones).
    pub fn annotations(&self) -> [(&'static str, Option<String>); 3] {
        [
            (SHARDS_ANNOTATION, Some(self.current.shards.to_string())),
            (
                GENERATION_ANNOTATION,
                Some(self.current.generation.to_string()),
            ),
            (PREVIOUS_ANNOTATION, self.previous.map(|p| p.to_string())),
        ]
    }

    /// Whether a process of `mine` may lead: the record is of its shard count and no earlier
    /// partition may still write. (The generation only decides who may move the record: a
    /// process of the same count leads through the same Leases, so never beside another.)
    pub fn admits(&self, mine: Partition) -> bool {
        self.current.shards == mine.shards && self.previous.is_none()
    }
}

impl std::fmt::Display for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.current)?;
        if let Some(p) = self.previous {
            write!(f, " previous-shards={p}")?;
        }
        Ok(())
    }
}

/// Whose Leases a process must see free or expired before the next step of [`gate`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ToCheck {
    /// Partitions (by shard count) whose Leases to check.
    pub shards: Vec<u32>,
    /// Also the Leases of builds before partitions.
    pub legacy: bool,
}

impl ToCheck {
    fn of(previous: Option<Previous>) -> Self {
        match previous {
            None => Self::default(),
            Some(Previous::Shards(n)) => Self {
                shards: vec![n],
                legacy: false,
            },
            Some(Previous::Legacy) => Self {
                shards: Vec::new(),
                legacy: true,
            },
        }
    }

    pub fn is_empty(&self) -> bool {
        self.shards.is_empty() && !self.legacy
    }
}

/// What a process of partition `mine` must check before [`gate`] can decide, given the record.
/// (A Lease of `mine`'s own names needs no check: whoever holds it excludes this process.)
pub fn to_check(mine: Partition, record: Option<&Record>) -> ToCheck {
    let Some(r) = record else {
        return ToCheck::default();
    };
    if r.current.shards == mine.shards {
        return ToCheck::of(r.previous);
    }
    if r.current.generation > mine.generation {
        return ToCheck::default();
    }
    let mut c = ToCheck::of(r.previous);
    c.shards.insert(0, r.current.shards);
    c
}

/// The next step of a process of partition `mine` towards leading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// The record admits this partition: try to take a shard's Lease.
    Open,
    /// No record yet: create this one (a build before partitions may still be running).
    Create(Record),
    /// Replace the record (read at a `resourceVersion`) with this one.
    Write(Record),
    /// Not now.
    Wait(Waiting),
}

/// Why a process does not lead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Waiting {
    /// The record is of another shard count and a newer generation: this process belongs to an
    /// older deployment and stays a standby.
    Newer(Record),
    /// Leases of partitions other than this one are still held (not released, not expired).
    Held(Record, Vec<String>),
}

/// Decides, from the record and the Leases of [`to_check`] still held (`held`), what a process of
/// partition `mine` does next. The record moves only forward in generation (ties allowed, for
/// deployments that cannot raise it) and only once nobody of the partitions it names can write.
pub fn gate(mine: Partition, record: Option<&Record>, held: &[String]) -> Gate {
    let Some(r) = record else {
        return Gate::Create(Record {
            current: mine,
            previous: Some(Previous::Legacy),
        });
    };
    if r.current.shards != mine.shards {
        if r.current.generation > mine.generation {
            return Gate::Wait(Waiting::Newer(*r));
        }
        if !held.is_empty() {
            return Gate::Wait(Waiting::Held(*r, held.to_vec()));
        }
        return Gate::Write(Record {
            current: mine,
            previous: Some(Previous::Shards(r.current.shards)),
        });
    }
    if r.previous.is_some() && !held.is_empty() {
        return Gate::Wait(Waiting::Held(*r, held.to_vec()));
    }
    let settled = Record {
        current: Partition {
            shards: mine.shards,
            generation: r.current.generation.max(mine.generation),
        },
        previous: None,
    };
    if settled == *r {
        Gate::Open
    } else {
        Gate::Write(settled)
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
    fn shard_leases_are_named_after_the_base_lease_and_the_count() {
        assert_eq!(
            Shard::lease_name("rc", 0, 1),
            "rc",
            "one shard keeps the plain name"
        );
        assert_eq!(Shard::lease_name("rc", 1, 3), "rc-shard-1-of-3");
        assert_eq!(
            Partition {
                shards: 2,
                generation: 9
            }
            .lease_names("rc"),
            ["rc-shard-0-of-2", "rc-shard-1-of-2"]
        );
        assert_eq!(record_name("rc"), "rc-partition");
    }

    fn p(shards: u32, generation: u64) -> Partition {
        Partition { shards, generation }
    }

    fn rec(shards: u32, generation: u64, previous: Option<Previous>) -> Record {
        Record {
            current: p(shards, generation),
            previous,
        }
    }

    #[test]
    fn the_record_round_trips_through_its_annotations_and_garbage_reads_as_none() {
        for r in [
            rec(3, 7, None),
            rec(1, 0, Some(Previous::Legacy)),
            rec(2, 5, Some(Previous::Shards(4))),
        ] {
            let a: std::collections::BTreeMap<String, String> = r
                .annotations()
                .into_iter()
                .filter_map(|(k, v)| Some((k.to_string(), v?)))
                .collect();
            assert_eq!(Record::from_annotations(&a), Some(r), "{a:?}");
        }
        let mut a = std::collections::BTreeMap::new();
        a.insert(SHARDS_ANNOTATION.to_string(), "two".to_string());
        a.insert(GENERATION_ANNOTATION.to_string(), "1".to_string());
        assert_eq!(Record::from_annotations(&a), None);
        a.insert(SHARDS_ANNOTATION.to_string(), "0".to_string());
        assert_eq!(Record::from_annotations(&a), None);
    }

    #[test]
    fn the_first_process_creates_the_record_and_then_checks_the_leases_of_builds_before_it() {
        assert_eq!(
            gate(p(2, 1), None, &[]),
            Gate::Create(rec(2, 1, Some(Previous::Legacy)))
        );
        let r = rec(2, 1, Some(Previous::Legacy));
        let c = to_check(p(2, 1), Some(&r));
        assert!(c.legacy && c.shards.is_empty());
        let held = ["rc-shard-0".to_string()];
        assert_eq!(
            gate(p(2, 1), Some(&r), &held),
            Gate::Wait(Waiting::Held(r, held.to_vec()))
        );
        assert_eq!(gate(p(2, 1), Some(&r), &[]), Gate::Write(rec(2, 1, None)));
        assert_eq!(gate(p(2, 1), Some(&rec(2, 1, None)), &[]), Gate::Open);
    }

    #[test]
    fn a_new_count_moves_the_record_only_once_the_old_leases_are_free_then_waits_again() {
        let old = rec(2, 1, None);
        let new = p(3, 2);
        assert_eq!(
            to_check(new, Some(&old)),
            ToCheck {
                shards: vec![2],
                legacy: false
            }
        );
        let held = ["rc-shard-1-of-2".to_string()];
        assert_eq!(
            gate(new, Some(&old), &held),
            Gate::Wait(Waiting::Held(old, held.to_vec()))
        );
        let moved = rec(3, 2, Some(Previous::Shards(2)));
        assert_eq!(gate(new, Some(&old), &[]), Gate::Write(moved));
        // After the move: the old count's Leases again, for a leader that slipped in meanwhile.
        assert_eq!(
            to_check(new, Some(&moved)),
            ToCheck {
                shards: vec![2],
                legacy: false
            }
        );
        assert!(
            !moved.admits(new),
            "not before the old Leases are seen free again"
        );
        assert_eq!(
            gate(new, Some(&moved), &held),
            Gate::Wait(Waiting::Held(moved, held.to_vec()))
        );
        assert_eq!(gate(new, Some(&moved), &[]), Gate::Write(rec(3, 2, None)));
        assert!(rec(3, 2, None).admits(new));
        // A move from a record not yet settled checks both partitions it names.
        assert_eq!(
            to_check(p(1, 3), Some(&moved)),
            ToCheck {
                shards: vec![3, 2],
                legacy: false
            }
        );
        assert_eq!(
            gate(p(1, 3), Some(&moved), &[]),
            Gate::Write(rec(1, 3, Some(Previous::Shards(3))))
        );
    }

    #[test]
    fn a_process_of_an_older_generation_never_moves_the_record() {
        let new = rec(3, 2, None);
        let old = p(2, 1);
        assert_eq!(to_check(old, Some(&new)), ToCheck::default());
        assert_eq!(gate(old, Some(&new), &[]), Gate::Wait(Waiting::Newer(new)));
        assert!(!new.admits(old));
        // The same generation may move it (deployments that cannot raise it), once the Leases
        // of the record's partition are free or expired.
        assert_eq!(
            gate(p(2, 2), Some(&new), &[]),
            Gate::Write(rec(2, 2, Some(Previous::Shards(3))))
        );
    }

    #[test]
    fn the_same_count_leads_whatever_the_generation_and_raises_it_without_waiting() {
        let r = rec(2, 5, None);
        assert_eq!(gate(p(2, 3), Some(&r), &[]), Gate::Open);
        assert!(r.admits(p(2, 3)));
        assert_eq!(gate(p(2, 8), Some(&r), &[]), Gate::Write(rec(2, 8, None)));
    }
}
