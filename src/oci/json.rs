//! JSON arrays from registries, read with bounded memory.
//!
//! A registry's answer is read up to 1 MiB ([`super::fetch::MANIFEST_MAX_BYTES`]), but what
//! serde builds from it can be far larger than its text: an index of 1 MiB of `{}` entries
//! decodes to some 350,000 entries of about 100 bytes each (35 MiB, and twice that while the
//! vector doubles), a referrers index or signature manifest of tiny descriptors to several times
//! its size. A registry in scope (anyone who may push to a repository in it) could so make each
//! of the 16 reads in flight hold tens of MiB. Each array a read decodes is therefore read
//! element by element: at most `N` elements are kept and the rest are skipped as they are read
//! ([`IgnoredAny`] allocates nothing), so a read holds what it keeps, not what it was sent.
//! serde has no bounded sequence of its own; this is its documented `visit_seq` pattern.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, IgnoredAny, SeqAccess, Visitor};

/// The first `N` elements of a JSON array, and how many after them were skipped unread.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Kept<T, const N: usize> {
    /// The elements kept, in order.
    pub(crate) items: Vec<T>,
    /// Elements after the first `N`, skipped.
    pub(crate) skipped: usize,
}

impl<T, const N: usize> Default for Kept<T, N> {
    fn default() -> Self {
        Self { items: Vec::new(), skipped: 0 }
    }
}

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for Kept<T, N> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_seq(KeptVisitor::<T, N>(PhantomData))
    }
}

struct KeptVisitor<T, const N: usize>(PhantomData<T>);

impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for KeptVisitor<T, N> {
    type Value = Kept<T, N>;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("an array")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        // Not `seq.size_hint()`: the count is the registry's to claim.
        let mut kept = Kept::default();
        while kept.items.len() < N {
            match seq.next_element::<T>()? {
                Some(item) => kept.items.push(item),
                None => return Ok(kept),
            }
        }
        while seq.next_element::<IgnoredAny>()?.is_some() {
            kept.skipped += 1;
        }
        Ok(kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_first_n_and_counts_the_rest() {
        let cases: [(&str, Vec<u32>, usize); 4] = [
            ("[]", vec![], 0),
            ("[1,2]", vec![1, 2], 0),
            ("[1,2,3]", vec![1, 2, 3], 0),
            // What is skipped need not even have the element's type.
            (r#"[1,2,3,4,{"a":[5]},"x"]"#, vec![1, 2, 3], 3),
        ];
        for (json, items, skipped) in cases {
            let kept: Kept<u32, 3> = serde_json::from_str(json).expect(json);
            assert_eq!((kept.items, kept.skipped), (items, skipped), "{json}");
        }
        // Kept elements must have the type; skipped ones must still be JSON.
        assert!(serde_json::from_str::<Kept<u32, 3>>(r#"[1,"x"]"#).is_err());
        assert!(serde_json::from_str::<Kept<u32, 1>>("[1,2,").is_err());
        assert!(serde_json::from_str::<Kept<u32, 1>>("{}").is_err());
    }
}
