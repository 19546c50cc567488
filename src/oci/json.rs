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
//! Strings kept are bounded too ([`Short`]): a descriptor's media type of a megabyte, kept by
//! each of 16 signatures and quoted in each reason, held 16 MiB per read. serde has no bounded
//! sequence or string of its own; these are its documented visitor patterns.

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

/// Longest media type or artifact type kept: RFC 6838 allows 127 characters for the type and
/// for the subtype.
pub(crate) const MEDIA_TYPE_MAX: usize = 255;
/// Longest digest kept: `sha512:` and 128 hex digits is 135 bytes.
pub(crate) const DIGEST_MAX: usize = 256;
/// Longest cosign signature annotation kept: base64 of an RSA-4096 signature is 684 bytes.
pub(crate) const SIGNATURE_MAX: usize = 4096;

/// For `#[serde(deserialize_with)]`: a media type, at most [`MEDIA_TYPE_MAX`] bytes.
pub(crate) fn media_type<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    short::<MEDIA_TYPE_MAX, D>(deserializer)
}

/// For `#[serde(default, deserialize_with)]`: an optional media type, as [`media_type`].
pub(crate) fn optional_media_type<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    optional_short::<MEDIA_TYPE_MAX, D>(deserializer)
}

/// For `#[serde(deserialize_with)]`: a digest, at most [`DIGEST_MAX`] bytes.
pub(crate) fn digest<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    short::<DIGEST_MAX, D>(deserializer)
}

/// For `#[serde(default, deserialize_with)]`: a cosign signature annotation, at most
/// [`SIGNATURE_MAX`] bytes.
pub(crate) fn optional_signature<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    optional_short::<SIGNATURE_MAX, D>(deserializer)
}

/// A string of at most `N` bytes ([`Short`]); serde's `deserialize_with` takes only a named
/// function, hence the named ones above.
fn short<'de, const N: usize, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    Short::<N>::deserialize(deserializer).map(|short| short.0)
}

/// An optional string of at most `N` bytes.
fn optional_short<'de, const N: usize, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    Option::<Short<N>>::deserialize(deserializer).map(|short| short.map(|short| short.0))
}

/// A string of at most `N` bytes; a longer one fails the decoding, without quoting it.
#[derive(Debug)]
struct Short<const N: usize>(String);

impl<'de, const N: usize> Deserialize<'de> for Short<N> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(ShortVisitor::<N>)
    }
}

struct ShortVisitor<const N: usize>;

impl<const N: usize> Visitor<'_> for ShortVisitor<N> {
    type Value = Short<N>;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "a string of at most {N} bytes")
    }

    fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Self::Value, E> {
        if value.len() > N {
            return Err(E::custom(format_args!(
                "a string of {} bytes, over the {N} read",
                value.len()
            )));
        }
        Ok(Short(value.to_owned()))
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

    #[test]
    fn short_strings_are_kept_and_long_ones_refused_unquoted() {
        let kept: Short<4> = serde_json::from_str(r#""abcd""#).expect("fits");
        assert_eq!(kept.0, "abcd");
        // Escapes are counted decoded.
        let kept: Short<2> = serde_json::from_str(r#""\u00e9""#).expect("fits");
        assert_eq!(kept.0, "é");
        let long = format!("\"{}\"", "x".repeat(5000));
        let error = serde_json::from_str::<Short<4>>(&long).expect_err("too long").to_string();
        assert!(error.starts_with("a string of 5000 bytes, over the 4 read"), "{error}");
        assert!(!error.contains("xxxx"), "{error}");
        assert!(serde_json::from_str::<Short<4>>("12").is_err());
    }
}
