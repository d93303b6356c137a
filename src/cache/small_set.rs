//! [`SmallSet`]: an ordered set in a sorted `Vec`, for the index's many sets of one or two.
//!
//! Nearly every set in the [`crate::cache::index`] holds one canary or one object: the canaries of a
//! Deployment, the VirtualServices of a host. A `BTreeSet` allocates a node for eleven entries
//! even for one (about 300 bytes for `String`s, 600 for the index's tuple keys), so at 10,000
//! canaries its sets alone took tens of MiB. A sorted `Vec` holds one entry in its size, keeps
//! the same order for iteration, and finds an entry by binary search.

use std::borrow::Borrow;

/// An ordered set kept as a sorted `Vec` without duplicates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmallSet<T>(Vec<T>);

impl<T> Default for SmallSet<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T: Ord> SmallSet<T> {
    /// Adds `v`; false when it was there already.
    pub fn insert(&mut self, v: T) -> bool {
        match self.0.binary_search(&v) {
            Ok(_) => false,
            Err(i) => {
                // Room for one at a time while small: most sets stay at one or two.
                let len = self.0.len();
                if len == self.0.capacity() {
                    self.0.reserve_exact(if len < 4 { 1 } else { len });
                }
                self.0.insert(i, v);
                true
            }
        }
    }

    /// Removes `v`; false when it was not there.
    pub fn remove<Q: Ord + ?Sized>(&mut self, v: &Q) -> bool
    where
        T: Borrow<Q>,
    {
        match self.0.binary_search_by(|e| e.borrow().cmp(v)) {
            Ok(i) => {
                self.0.remove(i);
                self.shrink();
                true
            }
            Err(_) => false,
        }
    }

    pub fn contains<Q: Ord + ?Sized>(&self, v: &Q) -> bool
    where
        T: Borrow<Q>,
    {
        self.0.binary_search_by(|e| e.borrow().cmp(v)).is_ok()
    }

    /// Gives back room that removals left, once it is more than half.
    fn shrink(&mut self) {
        if self.0.capacity() > 2 * self.0.len().max(1) {
            self.0.shrink_to_fit();
        }
    }
}

impl<T> SmallSet<T> {
    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<T: Ord> FromIterator<T> for SmallSet<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut v: Vec<T> = iter.into_iter().collect();
        v.sort();
        v.dedup();
        v.shrink_to_fit();
        Self(v)
    }
}

impl<T: Ord> Extend<T> for SmallSet<T> {
    fn extend<I: IntoIterator<Item = T>>(&mut self, iter: I) {
        for v in iter {
            self.insert(v);
        }
    }
}

impl<T> IntoIterator for SmallSet<T> {
    type Item = T;
    type IntoIter = std::vec::IntoIter<T>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a, T> IntoIterator for &'a SmallSet<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn behaves_as_an_ordered_set() {
        let mut s = SmallSet::default();
        let mut b = BTreeSet::new();
        // A fixed pseudo-random walk of inserts and removes over a few values.
        let mut x: u32 = 7;
        for _ in 0..2000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let v = (x >> 16) % 13;
            if (x >> 8).is_multiple_of(3) {
                assert_eq!(s.remove(&v), b.remove(&v));
            } else {
                assert_eq!(s.insert(v), b.insert(v));
            }
            assert_eq!(
                s.iter().copied().collect::<Vec<_>>(),
                b.iter().copied().collect::<Vec<_>>()
            );
            assert_eq!(s.len(), b.len());
            assert_eq!(s.contains(&v), b.contains(&v));
        }
    }

    #[test]
    fn finds_string_entries_by_str_and_collects_sorted_without_duplicates() {
        let s: SmallSet<String> = ["b", "a", "b"].into_iter().map(String::from).collect();
        assert_eq!(s.iter().map(String::as_str).collect::<Vec<_>>(), ["a", "b"]);
        assert!(s.contains("a") && !s.contains("c"));
        let mut s = s;
        s.extend(["c".to_string(), "a".to_string()]);
        assert_eq!(s.into_iter().collect::<Vec<_>>(), ["a", "b", "c"]);
    }

    #[test]
    fn one_entry_takes_no_more_room_than_itself() {
        let s: SmallSet<String> = std::iter::once("x".to_string()).collect();
        assert_eq!(s.0.capacity(), 1);
        let mut s = s;
        s.insert("y".into());
        s.insert("z".into());
        s.remove("y");
        s.remove("z");
        assert!(s.0.capacity() <= 2, "{}", s.0.capacity());
    }
}
