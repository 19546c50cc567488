//! Kubernetes names and label keys: the syntax the apiserver validates, checked before a policy
//! is accepted so that a policy never names something the cluster cannot hold.
//!
//! Source: `k8s.io/apimachinery/pkg/util/validation` (`IsDNS1123Label`,
//! `IsDNS1123Subdomain`, `IsQualifiedName`). Each check returns why a value is invalid, in
//! words a policy author can act on.

/// Longest DNS-1123 label (namespace names, label name parts): 63 characters.
pub const DNS_LABEL_MAX: usize = 63;
/// Longest DNS-1123 subdomain (most object names, label key prefixes): 253 characters.
pub const DNS_SUBDOMAIN_MAX: usize = 253;

fn is_lower_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// Whether `label` is lowercase letters, digits and `-`, starting and ending with a letter or
/// digit (length is checked by the callers, whose limits differ).
fn is_dns_label_body(label: &str) -> bool {
    let bytes = label.as_bytes();
    bytes.first().copied().is_some_and(is_lower_alnum)
        && bytes.last().copied().is_some_and(is_lower_alnum)
        && bytes.iter().all(|&b| is_lower_alnum(b) || b == b'-')
}

/// A name part (a DNS label, a label key's name) is not empty and at most 63 characters.
fn check_name_length(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".to_owned());
    }
    if name.len() > DNS_LABEL_MAX {
        return Err(format!(
            "the name is {} characters long (at most {DNS_LABEL_MAX})",
            name.len()
        ));
    }
    Ok(())
}

/// Checks an RFC 1123 DNS label (a namespace name): at most 63 lowercase letters, digits and
/// `-`, starting and ending with a letter or digit.
///
/// # Errors
/// Why the name is invalid.
pub fn check_dns_label(name: &str) -> Result<(), String> {
    check_name_length(name)?;
    if !is_dns_label_body(name) {
        return Err(format!(
            "{name:?} must be lowercase letters, digits and `-`, starting and ending with a \
             letter or digit"
        ));
    }
    Ok(())
}

/// Checks an RFC 1123 DNS subdomain (the name of a GMSACredentialSpec and most objects): at most
/// 253 characters of dot-separated DNS labels.
///
/// # Errors
/// Why the name is invalid.
pub fn check_dns_subdomain(name: &str) -> Result<(), String> {
    check_subdomain("the name", name)
}

/// [`check_dns_subdomain`] for `value`, called `what` in messages.
fn check_subdomain(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if value.len() > DNS_SUBDOMAIN_MAX {
        return Err(format!(
            "{what} is {} characters long (at most {DNS_SUBDOMAIN_MAX})",
            value.len()
        ));
    }
    if !value.split('.').all(is_dns_label_body) {
        return Err(format!(
            "{what} {value:?} is not a DNS subdomain (lowercase letters, digits, `-` and `.`, \
             starting and ending each part with a letter or digit)"
        ));
    }
    Ok(())
}

/// Checks a label key (a qualified name): an optional DNS subdomain prefix and `/`, then a name
/// of at most 63 characters of `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`.
///
/// # Errors
/// Why the key is invalid.
pub fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        check_subdomain("the prefix before `/`", prefix)?;
    }
    check_name_length(name)?;
    let bytes = name.as_bytes();
    let valid = bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !valid {
        return Err(format!(
            "the name {name:?} must be letters, digits, `-`, `_` and `.`, starting and ending \
             with a letter or digit"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels_and_subdomains_follow_rfc_1123() {
        let cases: [(&str, bool, bool); 12] = [
            // (input, label ok, subdomain ok)
            ("default", true, true),
            ("team-a", true, true),
            ("a", true, true),
            ("0abc", true, true),
            ("a.b", false, true),
            ("Team", false, false),
            ("-a", false, false),
            ("a-", false, false),
            ("a..b", false, false),
            ("", false, false),
            ("a_b", false, false),
            ("a b", false, false),
        ];
        for (input, label, subdomain) in cases {
            assert_eq!(check_dns_label(input).is_ok(), label, "label {input:?}");
            assert_eq!(check_dns_subdomain(input).is_ok(), subdomain, "subdomain {input:?}");
        }
        assert!(check_dns_label(&"a".repeat(63)).is_ok());
        assert!(check_dns_label(&"a".repeat(64)).is_err());
        let long =
            format!("{}.{}.{}.{}", "a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(61));
        assert_eq!(long.len(), 253);
        assert!(check_dns_subdomain(&long).is_ok());
        assert!(check_dns_subdomain(&format!("{long}e")).is_err());
    }
}
