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

/// `text` cut to at most `max` bytes on a character boundary, marked `… [N bytes]` (its whole
/// length) when cut, with its control characters [`escaped`]; an escaped text grown past `max`
/// is cut again. So it is at most `max` bytes and the mark, and one line.
pub fn clipped(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    let cut = |part: &str, whole: usize| format!("{}… [{whole} bytes]", prefix(part, max));
    let short = if text.len() <= max {
        std::borrow::Cow::Borrowed(text)
    } else {
        std::borrow::Cow::Owned(cut(text, text.len()))
    };
    match escaped(&short) {
        std::borrow::Cow::Borrowed(_) => short,
        std::borrow::Cow::Owned(escaped) if escaped.len() <= max => {
            std::borrow::Cow::Owned(escaped)
        }
        std::borrow::Cow::Owned(escaped) => std::borrow::Cow::Owned(cut(&escaped, text.len())),
    }
}

/// Control characters, and the Unicode line and paragraph separators and bidirectional
/// overrides, which some log viewers break lines at or reorder text by.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Appends `text` to `out` as `{:?}` writes it (quoted, with `"`, `\` and control and other
/// unprintable characters escaped). Text of printable ASCII other than `"` and `\`, as names
/// and image references are, is copied as it is; only other text goes through `Debug`, which
/// formats it a character at a time.
pub fn push_quoted(out: &mut String, text: &str) {
    if text.bytes().all(|b| matches!(b, b' '..=b'~') && b != b'"' && b != b'\\') {
        out.reserve(text.len() + 2);
        out.push('"');
        out.push_str(text);
        out.push('"');
    } else {
        use std::fmt::Write as _;
        // Writing into a String cannot fail.
        let _ = write!(out, "{text:?}");
    }
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
    fn clipped_text_is_one_bounded_line_that_says_how_long_it_was() {
        let cases = [
            ("shop/web", 64, "shop/web".to_owned()),
            ("a\nb", 64, "a\\nb".to_owned()),
            ("abcdef", 3, "abc… [6 bytes]".to_owned()),
            ("é€", 4, "é… [5 bytes]".to_owned()),
            // Escaped past the size: cut again (escapes included), the mark still naming the
            // original length.
            ("\u{1b}\u{1b}\u{1b}", 8, "\\u{1b}\\u… [3 bytes]".to_owned()),
        ];
        for (text, max, want) in cases {
            assert_eq!(clipped(text, max), want, "{text:?} at {max}");
        }
        let long = "\n".repeat(1_000_000);
        let cut = clipped(&long, 2048);
        assert!(cut.len() <= 2048 + "… [1000000 bytes]".len() && !cut.contains('\n'));
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

    #[test]
    fn quoted_text_reads_as_debug_writes_it() {
        let ascii = (0..=0x7f_u8).map(|b| format!("a{}b", char::from(b)));
        let others = [
            "web",
            "docker.io/library/nginx:1.25",
            "it's",
            "",
            "é",
            "\u{202E}x",
            "\u{301}x",
            "\u{a0}",
            "\u{feff}",
            "\u{10ffff}",
            "~ !",
        ];
        for text in ascii.chain(others.map(str::to_owned)) {
            let mut out = String::from("> ");
            push_quoted(&mut out, &text);
            assert_eq!(out, format!("> {text:?}"), "{text:?}");
        }
    }
}
