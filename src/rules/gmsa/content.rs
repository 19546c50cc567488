//! gMSA credential spec content as Go's `encoding/json` sees it: compared as the upstream
//! windows-gmsa webhook compares it, and written as the cluster would store it.
//!
//! The webhook (kubernetes-sigs/windows-gmsa, `admission-webhook/webhook.go`,
//! `compareCredSpecContents`) accepts inlined content that is byte-for-byte the JSON of the
//! GMSACredentialSpec's `credspec` (`json.Marshal` of the object the dynamic client decoded,
//! `kube_client.go`), or that decodes, as the credspec's JSON does, into a Go
//! `map[string]interface{}` equal under `reflect.DeepEqual`. Go decodes every JSON number into a
//! `float64` (`encoding/json`, `decode.go`), so `1`, `1.0` and `1e0` are one value, and so are
//! two integers that round to the same `float64`. [`matches`] reproduces that; [`to_go_json`]
//! writes a value as `json.Marshal` writes the decoded object (sorted keys, integers as
//! integers, other numbers in Go's float format, HTML characters escaped), so the content
//! arcguard inlines is the content the webhook and the cluster would have.
//!
//! Deliberately stricter than Go: a string with an unpaired surrogate escape (`"\ud800"`, which
//! Go decodes as U+FFFD) and content nested deeper than serde_json's limit (128; Go's is 10000)
//! do not decode, so such content never matches.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

/// A JSON value as Go's `encoding/json` decodes it into `interface{}`.
#[derive(Debug, PartialEq)]
enum GoValue<'a> {
    Null,
    Bool(bool),
    /// Every number, as the nearest `float64`.
    Number(f64),
    String(&'a str),
    Array(Vec<GoValue<'a>>),
    Object(BTreeMap<&'a str, GoValue<'a>>),
}

impl<'a> GoValue<'a> {
    fn of(value: &'a Value) -> Self {
        match value {
            Value::Null => Self::Null,
            Value::Bool(b) => Self::Bool(*b),
            // u64 and i64 convert to the nearest f64, as Go's ParseFloat of their digits does.
            Value::Number(n) => Self::Number(n.as_f64().unwrap_or(f64::NAN)),
            Value::String(s) => Self::String(s),
            Value::Array(items) => Self::Array(items.iter().map(Self::of).collect()),
            Value::Object(map) => {
                Self::Object(map.iter().map(|(k, v)| (k.as_str(), Self::of(v))).collect())
            }
        }
    }
}

/// Whether inlined `content` is the credential spec `credspec`, as the upstream webhook judges
/// it: byte-equal to `credspec`'s JSON, or both JSON objects (or `null`, which Go decodes into a
/// nil map) that are equal as Go values.
pub fn matches(content: &str, credspec: &Value) -> bool {
    if content == to_go_json(credspec) {
        return true;
    }
    // Go (and serde_json) keep the last of two equal keys; the Windows side that reads the
    // string may keep the first, and a pod could then run as another account than the one
    // compared. No real credential spec repeats a key: such content never matches.
    if has_duplicate_keys(content) {
        return false;
    }
    let Ok(inlined) = serde_json::from_str::<Value>(content) else { return false };
    let object = |v: &Value| matches!(v, Value::Object(_) | Value::Null);
    object(&inlined) && object(credspec) && GoValue::of(&inlined) == GoValue::of(credspec)
}

/// Whether any JSON object in `text` repeats a key (or `text` is not JSON).
pub fn has_duplicate_keys(text: &str) -> bool {
    use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

    /// Walks a value; fails on the first object with a repeated key.
    struct Unique;

    impl<'de> DeserializeSeed<'de> for Unique {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
            deserializer.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Unique {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("JSON without repeated object keys")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq.next_element_seed(Unique)?.is_some() {}
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                if !seen.insert(key) {
                    return Err(serde::de::Error::custom("repeated key"));
                }
                map.next_value_seed(Unique)?;
            }
            Ok(())
        }
    }

    let mut deserializer = serde_json::Deserializer::from_str(text);
    let unique = Unique.deserialize(&mut deserializer).is_ok() && deserializer.end().is_ok();
    !unique
}

/// `value` as Go's `json.Marshal` writes it once the cluster has decoded it: object keys sorted,
/// integers that fit an `int64` as integers, other numbers as `float64` in Go's format, and
/// `<`, `>`, `&`, U+2028 and U+2029 escaped.
pub fn to_go_json(value: &Value) -> String {
    let mut out = String::new();
    write_go(&mut out, value);
    out
}

fn write_go(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match n.as_i64() {
            // client-go decodes a number into int64 when it is an integer that fits.
            Some(i) => {
                let _ = write!(out, "{i}");
            }
            None => write_go_float(out, n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => write_go_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_go(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            // Go sorts map keys by their bytes; serde_json may keep insertion order.
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_go_string(out, key);
                out.push(':');
                write_go(out, item);
            }
            out.push('}');
        }
    }
}

/// A `float64` as `encoding/json`'s `floatEncoder` writes it: the shortest digits that read back
/// as the same number, in fixed notation unless the magnitude is below 1e-6 or at least 1e21,
/// where Go writes `1e+21` and `1e-7`.
fn write_go_float(out: &mut String, f: f64) {
    let abs = f.abs();
    if abs != 0.0 && !(1e-6..1e21).contains(&abs) {
        let text = format!("{f:e}");
        match text.split_once('e') {
            Some((mantissa, exponent)) if !exponent.starts_with('-') => {
                let _ = write!(out, "{mantissa}e+{exponent}");
            }
            _ => out.push_str(&text),
        }
    } else {
        let _ = write!(out, "{f}");
    }
}

/// A string as `encoding/json` writes it with HTML escaping on (`json.Marshal`'s default).
fn write_go_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    #[test]
    fn content_with_a_repeated_key_never_matches() {
        let spec = serde_json::json!({"ActiveDirectoryConfig": {"GroupManagedServiceAccounts": [{"Name": "WebApp1", "Scope": "CONTOSO"}]}, "CmsPlugins": ["ActiveDirectory"]});
        let nested = r#"{"ActiveDirectoryConfig":{"GroupManagedServiceAccounts":[{"Name":"Evil","Name":"WebApp1","Scope":"CONTOSO"}]},"CmsPlugins":["ActiveDirectory"]}"#;
        let top = r#"{"ActiveDirectoryConfig":{"GroupManagedServiceAccounts":[{"Name":"DomainAdmin","Scope":"CONTOSO"}]},"ActiveDirectoryConfig":{"GroupManagedServiceAccounts":[{"Name":"WebApp1","Scope":"CONTOSO"}]},"CmsPlugins":["ActiveDirectory"]}"#;
        for content in [nested, top] {
            assert!(has_duplicate_keys(content), "{content}");
            assert!(!matches(content, &spec), "{content}");
        }
        assert!(!has_duplicate_keys(&to_go_json(&spec)));
        assert!(matches(&to_go_json(&spec), &spec));
        assert!(has_duplicate_keys("{} x"), "trailing garbage is not JSON");
    }

    use serde_json::json;

    use super::*;

    #[test]
    fn content_is_compared_as_go_compares_it() {
        let spec = json!({"ActiveDirectoryConfig": {"GroupManagedServiceAccounts": [{"Name": "WebApp1", "Scope": "CONTOSO"}]}, "Version": 1, "Ratio": 0.5});
        let cases = [
            // Byte-equal to Go's JSON of the spec.
            (
                r#"{"ActiveDirectoryConfig":{"GroupManagedServiceAccounts":[{"Name":"WebApp1","Scope":"CONTOSO"}]},"Ratio":0.5,"Version":1}"#,
                true,
            ),
            // Other spacing, key order and number spellings that decode to the same float64.
            (
                r#"{ "Version": 1.0, "Ratio": 5e-1, "ActiveDirectoryConfig": {"GroupManagedServiceAccounts": [{"Scope": "CONTOSO", "Name": "WebApp1"}]} }"#,
                true,
            ),
            (
                r#"{"Version": 1e0, "Ratio": 0.50, "ActiveDirectoryConfig": {"GroupManagedServiceAccounts": [{"Name": "WebApp1", "Scope": "CONTOSO"}]}}"#,
                true,
            ),
            // A duplicate key: Go keeps the last one and would match; arcguard refuses it, as
            // what reads the string on Windows may keep the first.
            (
                r#"{"Version": 2, "Version": 1, "Ratio": 0.5, "ActiveDirectoryConfig": {"GroupManagedServiceAccounts": [{"Name": "WebApp1", "Scope": "CONTOSO"}]}}"#,
                false,
            ),
            (
                r#"{"Version": "1", "Ratio": 0.5, "ActiveDirectoryConfig": {"GroupManagedServiceAccounts": [{"Name": "WebApp1", "Scope": "CONTOSO"}]}}"#,
                false,
            ),
            (
                r#"{"Version": 1, "Ratio": 0.5, "ActiveDirectoryConfig": {"GroupManagedServiceAccounts": [{"Name": "webapp1", "Scope": "CONTOSO"}]}}"#,
                false,
            ),
            (
                r#"{"Version": 1, "Ratio": 0.5, "ActiveDirectoryConfig": {"GroupManagedServiceAccounts": []}}"#,
                false,
            ),
            (
                r#"{"Version": 1, "Ratio": 0.5, "ActiveDirectoryConfig": {"GroupManagedServiceAccounts": [{"Name": "WebApp1", "Scope": "CONTOSO"}]}, "x": null}"#,
                false,
            ),
            ("", false),
            ("null", false),
            ("not json", false),
            (r#"[{"Version": 1}]"#, false),
        ];
        for (content, want) in cases {
            assert_eq!(matches(content, &spec), want, "{content}");
        }
    }

    #[test]
    fn numbers_are_equal_when_they_decode_to_the_same_float64() {
        let cases = [
            (json!({"n": 1}), r#"{"n": 1.0}"#, true),
            (json!({"n": 1.0}), r#"{"n": 1}"#, true),
            (json!({"n": -0.0}), r#"{"n": 0}"#, true),
            (json!({"n": 100}), r#"{"n": 1E2}"#, true),
            // 2^53 + 1 rounds to 2^53 in a float64.
            (json!({"n": 9_007_199_254_740_993_u64}), r#"{"n": 9007199254740992}"#, true),
            (json!({"n": u64::MAX}), r#"{"n": 18446744073709551616}"#, true),
            (json!({"n": 0.1}), r#"{"n": 0.1000000000000000055511151231257827}"#, true),
            (json!({"n": 1}), r#"{"n": 1.0000001}"#, false),
            (json!({"n": 1}), r#"{"n": true}"#, false),
            (json!({"n": 1}), r#"{"n": 1e400}"#, false),
        ];
        for (spec, content, want) in cases {
            assert_eq!(matches(content, &spec), want, "{spec} {content}");
        }
    }

    #[test]
    fn null_content_matches_only_a_null_spec() {
        assert!(matches("null", &Value::Null));
        assert!(!matches("null", &json!({})));
        assert!(!matches("{}", &Value::Null));
        // A spec that is no object matches only its exact JSON, as upstream's byte comparison.
        assert!(matches("\"x\"", &json!("x")));
        assert!(!matches(" \"x\"", &json!("x")));
    }

    #[test]
    fn values_are_written_as_go_marshals_them() {
        let cases = [
            (json!({"b": 1, "a": [true, null], "A": "x"}), r#"{"A":"x","a":[true,null],"b":1}"#),
            (json!({"v": 1.0}), r#"{"v":1}"#),
            (json!({"v": -0.0}), r#"{"v":-0}"#),
            (json!({"v": 0.5}), r#"{"v":0.5}"#),
            (json!({"v": 1e20}), r#"{"v":100000000000000000000}"#),
            (json!({"v": 1e21}), r#"{"v":1e+21}"#),
            (json!({"v": 1.5e300}), r#"{"v":1.5e+300}"#),
            (json!({"v": 0.000001}), r#"{"v":0.000001}"#),
            (json!({"v": 1.5e-7}), r#"{"v":1.5e-7}"#),
            (json!({"v": 1e-10}), r#"{"v":1e-10}"#),
            (json!({"v": -123456789}), r#"{"v":-123456789}"#),
            (json!({"v": 9_223_372_036_854_775_807_i64}), r#"{"v":9223372036854775807}"#),
            // Beyond int64, client-go decodes a float64.
            (json!({"v": u64::MAX}), r#"{"v":18446744073709552000}"#),
            (json!({"s": "<a&b>\u{2028}\u{2029}"}), r#"{"s":"\u003ca\u0026b\u003e\u2028\u2029"}"#),
            (
                json!({"s": "q\"\\\n\r\t\u{8}\u{c}\u{1}\u{7f}é"}),
                "{\"s\":\"q\\\"\\\\\\n\\r\\t\\b\\f\\u0001\u{7f}é\"}",
            ),
        ];
        for (value, want) in cases {
            assert_eq!(to_go_json(&value), want, "{value}");
            assert!(matches(want, &value), "{want} matches what it was written from");
        }
    }

    #[test]
    fn yaml_floats_are_written_as_the_cluster_stores_them() {
        // A policy file's `Version: 1.0` is what kubectl would send (and etcd store) as 1.
        let from_yaml: Value = serde_yaml::from_str("Version: 1.0\nRatio: 2.50").expect("yaml");
        assert_eq!(to_go_json(&from_yaml), r#"{"Ratio":2.5,"Version":1}"#);
    }
}
