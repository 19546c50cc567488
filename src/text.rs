//! Text quoted from others (registries, objects, policies) in messages, logs and statuses: cut
//! to a size on a character boundary, and with control characters escaped, so that it is
//! bounded, never split inside a character, and cannot forge a line of a log.
//!
//! std's `str::floor_char_boundary` does this from Rust 1.91; the crate's `rust-version` is
//! 1.89 (kube's), so the same few lines live here, once.

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
pub fn prefix(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// `text` with its control characters escaped as Rust writes them (a line break as the two
/// characters `\` `n`, others as `\u{..}`); borrowed when it has none.
pub fn escaped(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains(needs_escape) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if needs_escape(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Control characters, and the Unicode line and paragraph separators and bidirectional
/// overrides, which some log viewers break lines at or reorder text by.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert!(matches!(escaped("plain é €"), std::borrow::Cow::Borrowed("plain é €")));
        assert_eq!(escaped("a\nb\tc\u{1b}[0m\r"), "a\\nb\\tc\\u{1b}[0m\\r");
        assert_eq!(escaped("a\u{2028}b\u{202e}c"), "a\\u{2028}b\\u{202e}c");
    }

    #[test]
    fn cuts_on_a_character_boundary_at_or_below_the_size() {
        let cases = [
            ("", 0, ""),
            ("abc", 0, ""),
            ("abc", 2, "ab"),
            ("abc", 3, "abc"),
            ("abc", 10, "abc"),
            // "é" is two bytes, "€" three: a cut inside one ends before it.
            ("aé", 2, "a"),
            ("aé", 3, "aé"),
            ("€€", 4, "€"),
            ("€€", 5, "€"),
        ];
        for (text, max, want) in cases {
            assert_eq!(prefix(text, max), want, "{text:?} at {max}");
        }
    }
}
