//! Container image references, parsed and normalised per the distribution/reference grammar.
//!
//! Grammar checks come from `oci_spec::distribution::Reference`; the checks it lacks (ASCII
//! tags, lowercase digest hex, host syntax, the 255-character limit on the normalised name,
//! bare image IDs, case of the registry host) are added here so that one image has exactly
//! one normalised form.

use std::fmt;

use oci_spec::distribution::{ParseError, Reference};

/// Longest normalised name (`registry/repository`) the grammar allows.
const NAME_MAX: usize = 255;
/// The Docker Hub registry host every short name resolves to.
const DOCKER_HUB: &str = "docker.io";
/// The legacy Docker Hub host, the same registry as [`DOCKER_HUB`].
const DOCKER_HUB_LEGACY: &str = "index.docker.io";
/// Repository namespace of single-element Docker Hub names (`nginx` is `library/nginx`).
const DOCKER_HUB_OFFICIAL: &str = "library";
/// What a valid reference looks like, for error messages.
const FORM: &str = "[registry[:port]/]repository[:tag][@sha256:<hex>]";

/// Why a string is not a valid image reference; each message says what a valid one looks like.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    /// The reference is empty or only whitespace.
    #[error("the image reference is empty; write {FORM}")]
    Empty,
    /// The reference contains whitespace.
    #[error("an image reference must not contain whitespace")]
    Whitespace,
    /// The reference starts with a URL scheme such as `https://`.
    #[error("an image reference has no URL scheme; remove the `scheme://` prefix")]
    Scheme,
    /// The reference is a bare 64-character hex image ID.
    #[error(
        "a bare 64-character hex string is an image ID, not a reference; write repository@sha256:<hex>"
    )]
    IdentifierOnly,
    /// The repository path has uppercase letters.
    #[error(
        "the repository path must be lowercase (only the registry host and the tag may have uppercase letters)"
    )]
    Uppercase,
    /// The reference does not follow the grammar.
    #[error(
        "not of the form {FORM}: path components are lowercase letters and digits separated by `.`, `_`, `__` or `-`, separated by `/`"
    )]
    Format,
    /// The registry host is not a host name with an optional port.
    #[error(
        "the registry host is not a host name: dot-separated labels of lowercase letters, digits and inner `-`, with an optional `:port`"
    )]
    Host,
    /// The tag has characters outside the grammar.
    #[error(
        "the tag is invalid: up to 128 ASCII letters, digits, `_`, `.` and `-`, not starting with `.` or `-`"
    )]
    Tag,
    /// The digest is not `algorithm:hex`.
    #[error("the digest is not of the form algorithm:hex, e.g. sha256:<64 hex>")]
    DigestFormat,
    /// The digest algorithm is not one the runtime verifies.
    #[error("the digest algorithm is not supported; use sha256 (or sha384, sha512)")]
    DigestAlgorithm,
    /// The digest's hex part has the wrong length for its algorithm.
    #[error("a {algorithm} digest has {expected} hex characters, not {actual}")]
    DigestLength {
        /// The algorithm.
        algorithm: &'static str,
        /// The length it requires.
        expected: usize,
        /// The length found.
        actual: usize,
    },
    /// The digest's hex part has characters other than `0-9a-f`.
    #[error("the digest must be lowercase hex (0-9, a-f)")]
    DigestHex,
    /// The normalised name is longer than the grammar allows.
    #[error("the name (registry/repository, once normalised) is longer than {NAME_MAX} characters")]
    NameTooLong,
}

/// A parsed, normalised image reference: one value per image, however it was written.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageRef {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
}

impl ImageRef {
    /// The registry `host[:port]`, lowercase; `docker.io` for Docker Hub.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path, e.g. `library/nginx`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag; `latest` when neither tag nor digest was written.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest (`algorithm:hex`), if pinned.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The normalised form, e.g. `docker.io/library/nginx:latest` or `host/repo:tag@sha256:...`.
    pub fn normalized(&self) -> String {
        self.to_string()
    }

    /// Whether both references make the runtime pull the same thing: the same digest, or the
    /// same tag when neither has a digest (with both tag and digest, the runtime pulls by digest).
    pub fn pulls_same_as(&self, other: &Self) -> bool {
        let content = match (&self.digest, &other.digest) {
            (Some(a), Some(b)) => a == b,
            (None, None) => self.tag == other.tag,
            _ => false,
        };
        content && self.registry == other.registry && self.repository == other.repository
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// Parses and normalises an image reference as the container runtime reads it.
///
/// # Errors
/// [`ImageError`] saying why `input` is not a valid reference.
pub fn parse(input: &str) -> Result<ImageRef, ImageError> {
    if input.trim().is_empty() {
        return Err(ImageError::Empty);
    }
    if input.chars().any(char::is_whitespace) {
        return Err(ImageError::Whitespace);
    }
    if input.contains("://") {
        return Err(ImageError::Scheme);
    }
    // The runtime reads a bare 64-hex string as an image ID, not a Docker Hub repository.
    if input.len() == 64 && is_lower_hex(input) {
        return Err(ImageError::IdentifierOnly);
    }
    let reference = Reference::try_from(input).map_err(|e| diagnose(input, e))?;

    // oci-spec files an uppercase first element without `.`/`:` under Docker Hub, whereas the
    // grammar reads it as a registry host; lowercasing it would change which registry it names,
    // so it is rejected (path components are otherwise lowercase by the grammar).
    if has_uppercase(reference.repository()) {
        return Err(ImageError::Uppercase);
    }
    // Host names are case-insensitive, so the host is lowercased; it keeps its `.` or `:` and
    // so stays a host when the normalised form is parsed again.
    let mut registry = reference.registry().to_ascii_lowercase();
    let mut repository = reference.repository().to_owned();
    if registry == DOCKER_HUB_LEGACY {
        registry = DOCKER_HUB.to_owned();
    }
    if registry == DOCKER_HUB && !repository.contains('/') {
        repository = format!("{DOCKER_HUB_OFFICIAL}/{repository}");
    }
    if !is_host(&registry) {
        return Err(ImageError::Host);
    }
    if registry.len() + 1 + repository.len() > NAME_MAX {
        return Err(ImageError::NameTooLong);
    }
    let tag = reference.tag().map(str::to_owned);
    if let Some(tag) = &tag {
        // The grammar's `\w` is ASCII; the regex crate's is Unicode.
        if !tag.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
            return Err(ImageError::Tag);
        }
    }
    let digest = reference.digest().map(str::to_owned);
    if let Some(digest) = &digest {
        let hex = digest.split_once(':').map_or("", |(_, hex)| hex);
        if !is_lower_hex(hex) {
            return Err(ImageError::DigestHex);
        }
    }
    Ok(ImageRef { registry, repository, tag, digest })
}

/// Whether `host` is `name[:port]` with a valid lowercase DNS-style name.
pub(crate) fn is_host(host: &str) -> bool {
    let (name, port) = match host.split_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    port_ok && !name.is_empty() && name.split('.').all(is_host_label)
}

/// Whether `component` is one repository path component of the grammar:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
pub(crate) fn is_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if !alnum(first) || !alnum(last) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        let valid = matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
        if !valid {
            return false;
        }
    }
    true
}

fn is_host_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            alnum(first) && alnum(last) && bytes.iter().all(|b| alnum(b) || *b == b'-')
        }
        _ => false,
    }
}

fn is_lower_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn has_uppercase(s: &str) -> bool {
    s.bytes().any(|b| b.is_ascii_uppercase())
}

/// Turns oci-spec's terse error into one that says which part is wrong.
fn diagnose(input: &str, error: ParseError) -> ImageError {
    match error {
        ParseError::NameEmpty => ImageError::Empty,
        ParseError::NameTooLong => ImageError::NameTooLong,
        ParseError::TagInvalidFormat => ImageError::Tag,
        ParseError::NameContainsUppercase => ImageError::Uppercase,
        ParseError::DigestUnsupported => ImageError::DigestAlgorithm,
        ParseError::DigestInvalidFormat => ImageError::DigestFormat,
        ParseError::DigestInvalidLength => digest_length(input),
        ParseError::ReferenceInvalidFormat => {
            if has_uppercase(repository_path(input)) {
                ImageError::Uppercase
            } else {
                ImageError::Format
            }
        }
    }
}

fn digest_length(input: &str) -> ImageError {
    let digest = input.rsplit_once('@').map_or("", |(_, digest)| digest);
    let (algorithm, hex) = digest.split_once(':').unwrap_or(("", digest));
    let (algorithm, expected) = match algorithm {
        "sha256" => ("sha256", 64),
        "sha384" => ("sha384", 96),
        "sha512" => ("sha512", 128),
        _ => return ImageError::DigestFormat,
    };
    ImageError::DigestLength { algorithm, expected, actual: hex.len() }
}

/// The written repository path: without digest, tag and (when the first element names one)
/// registry host.
fn repository_path(input: &str) -> &str {
    let name = input.split_once('@').map_or(input, |(name, _)| name);
    let name = match name.rfind(':') {
        Some(colon) if !name[colon..].contains('/') => &name[..colon],
        _ => name,
    };
    match name.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => rest,
        _ => name,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn parts(r: &ImageRef) -> (&str, &str, Option<&str>, Option<&str>) {
        (r.registry(), r.repository(), r.tag(), r.digest())
    }

    #[test]
    fn references_normalise_as_the_runtime_reads_them() {
        let digest = format!("sha256:{HEX}");
        let cases: Vec<(String, &str)> = vec![
            ("nginx".into(), "docker.io/library/nginx:latest"),
            ("library/nginx".into(), "docker.io/library/nginx:latest"),
            ("docker.io/nginx".into(), "docker.io/library/nginx:latest"),
            ("docker.io/library/nginx".into(), "docker.io/library/nginx:latest"),
            ("index.docker.io/nginx".into(), "docker.io/library/nginx:latest"),
            ("index.docker.io/library/nginx:latest".into(), "docker.io/library/nginx:latest"),
            ("DOCKER.IO/nginx".into(), "docker.io/library/nginx:latest"),
            ("nginx:1.25".into(), "docker.io/library/nginx:1.25"),
            ("bitnami/nginx".into(), "docker.io/bitnami/nginx:latest"),
            ("foo/bar.com/x".into(), "docker.io/foo/bar.com/x:latest"),
            // Without a `/`, `host:port` is a name and a tag.
            ("test.com:5000".into(), "docker.io/library/test.com:5000"),
            ("localhost".into(), "docker.io/library/localhost:latest"),
            ("localhost/app".into(), "localhost/app:latest"),
            ("localhost:5000/app:v1".into(), "localhost:5000/app:v1"),
            ("registry:5000/team/app".into(), "registry:5000/team/app:latest"),
            ("contoso.azurecr.io/app".into(), "contoso.azurecr.io/app:latest"),
            ("Contoso.AzureCR.io/app:V1".into(), "contoso.azurecr.io/app:V1"),
            (
                "mcr.microsoft.com/oss/nginx/nginx:1.25_x-y.z".into(),
                "mcr.microsoft.com/oss/nginx/nginx:1.25_x-y.z",
            ),
            ("a__b/c---d/e_f.g".into(), "docker.io/a__b/c---d/e_f.g:latest"),
            (
                format!("nginx@{digest}"),
                "docker.io/library/nginx@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            ),
            (
                format!("host.io/app:1.0@{digest}"),
                "host.io/app:1.0@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            ),
        ];
        for (input, expected) in cases {
            let parsed = parse(&input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(parsed.normalized(), expected, "{input}");
        }
    }

    #[test]
    fn parts_are_split_into_registry_repository_tag_and_digest() {
        let digest = format!("sha256:{HEX}");
        let r = parse(&format!("localhost:5000/a/b:t@{digest}")).expect("valid");
        assert_eq!(parts(&r), ("localhost:5000", "a/b", Some("t"), Some(digest.as_str())));
        assert_eq!(r.name(), "localhost:5000/a/b");
        let r = parse(&format!("a/b@{digest}")).expect("valid");
        assert_eq!(parts(&r), ("docker.io", "a/b", None, Some(digest.as_str())));
    }

    #[test]
    fn invalid_references_say_why() {
        let cases: Vec<(String, ImageError)> = vec![
            (String::new(), ImageError::Empty),
            ("   ".into(), ImageError::Empty),
            (" nginx".into(), ImageError::Whitespace),
            ("nginx\n".into(), ImageError::Whitespace),
            ("ngi nx".into(), ImageError::Whitespace),
            ("https://contoso.azurecr.io/app".into(), ImageError::Scheme),
            (HEX.into(), ImageError::IdentifierOnly),
            ("Nginx".into(), ImageError::Uppercase),
            ("Uppercase:tag".into(), ImageError::Uppercase),
            ("Uppercase/lowercase:tag".into(), ImageError::Uppercase),
            ("LOCALHOST/app".into(), ImageError::Uppercase),
            ("test:5000/Uppercase/lowercase:tag".into(), ImageError::Uppercase),
            ("contoso.azurecr.io/App".into(), ImageError::Uppercase),
            (":justtag".into(), ImageError::Format),
            (format!("@sha256:{HEX}"), ImageError::Format),
            ("aa/asdf$$^/aa".into(), ImageError::Format),
            ("nginx:".into(), ImageError::Format),
            ("nginx/".into(), ImageError::Format),
            ("a//b".into(), ImageError::Format),
            ("-nginx".into(), ImageError::Format),
            ("nginx:.tag".into(), ImageError::Format),
            (format!("nginx:{}", "t".repeat(129)), ImageError::Format),
            ("nginx:tæg".into(), ImageError::Tag),
            ("a_b.com/x".into(), ImageError::Host),
            ("repo@sha256:ffff".into(), ImageError::Format),
            (
                "repo@sha256:ffffffffffffffffffffffffffffffffff".into(),
                ImageError::DigestLength { algorithm: "sha256", expected: 64, actual: 34 },
            ),
            (format!("repo@md5:{HEX}"), ImageError::DigestAlgorithm),
            (format!("repo@sha256:{}", HEX.to_uppercase()), ImageError::DigestHex),
            // 255 characters is the limit on the normalised name, registry included.
            (format!("x.io/{}", "a".repeat(251)), ImageError::NameTooLong),
            ("a".repeat(240), ImageError::NameTooLong),
            ("a".repeat(256), ImageError::NameTooLong),
        ];
        for (input, expected) in cases {
            assert_eq!(parse(&input), Err(expected), "{input:?}");
        }
    }

    #[test]
    fn error_messages_name_the_problem() {
        assert!(ImageError::Empty.to_string().contains("empty"));
        assert!(ImageError::Uppercase.to_string().contains("lowercase"));
        let e = ImageError::DigestLength { algorithm: "sha256", expected: 64, actual: 3 };
        assert_eq!(e.to_string(), "a sha256 digest has 64 hex characters, not 3");
    }

    #[test]
    fn docker_hub_spellings_are_one_image() {
        let forms = [
            "nginx",
            "library/nginx",
            "docker.io/nginx",
            "docker.io/library/nginx",
            "index.docker.io/nginx",
            "index.docker.io/library/nginx:latest",
        ];
        let first = parse(forms[0]).expect("valid");
        for form in forms {
            assert_eq!(parse(form).as_ref(), Ok(&first), "{form}");
        }
    }

    #[test]
    fn pull_identity_ignores_the_tag_when_pinned_by_digest() {
        let digest = format!("sha256:{HEX}");
        let by_digest = parse(&format!("nginx@{digest}")).expect("valid");
        let tag_and_digest = parse(&format!("nginx:1.25@{digest}")).expect("valid");
        let tag_only = parse("nginx:1.25").expect("valid");
        assert!(by_digest.pulls_same_as(&tag_and_digest));
        assert!(!tag_only.pulls_same_as(&tag_and_digest));
        assert!(!tag_only.pulls_same_as(&parse("nginx:1.26").expect("valid")));
        assert!(!by_digest.pulls_same_as(&parse(&format!("x.io/nginx@{digest}")).expect("valid")));
    }

    #[test]
    fn path_components_follow_the_grammar() {
        for ok in ["a", "a.b", "a_b", "a__b", "a-b", "a---b", "0"] {
            assert!(is_path_component(ok), "{ok}");
        }
        for bad in ["", "A", "a.", ".a", "a..b", "a___b", "a._b", "a-", "a/b", "a*"] {
            assert!(!is_path_component(bad), "{bad}");
        }
    }

    #[test]
    fn hosts_follow_the_grammar() {
        for ok in ["a", "a.b", "a-b.c", "host:5000", "127.0.0.1:80"] {
            assert!(is_host(ok), "{ok}");
        }
        for bad in ["", "A.b", "a_b.c", "-a.b", "a-.b", "a..b", "a:", "a:x", "a:1:2", ":80"] {
            assert!(!is_host(bad), "{bad}");
        }
    }

    /// Strings shaped like references, so that many of them parse.
    const REFERENCE_LIKE: &str = "((index\\.docker\\.io|docker\\.io|DOCKER\\.io|localhost|LOCALHOST|[a-zA-Z0-9]{1,6}(\\.[a-zA-Z0-9-]{0,4}[a-z0-9]){0,2}(:[0-9]{1,5})?)/)?[a-z0-9]{1,6}((\\.|_|__|-{1,3})[a-z0-9]{1,4}){0,2}(/[a-z0-9]{1,6}){0,2}(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,8})?(@sha256:[0-9a-f]{64})?";

    proptest! {
        #[test]
        fn parse_never_panics_on_arbitrary_strings(input in any::<String>()) {
            let _ = parse(&input);
        }

        #[test]
        fn normalising_arbitrary_strings_is_idempotent(input in any::<String>()) {
            if let Ok(parsed) = parse(&input) {
                prop_assert_eq!(parse(&parsed.normalized()), Ok(parsed));
            }
        }

        #[test]
        fn normalising_reference_like_strings_is_idempotent(input in REFERENCE_LIKE) {
            if let Ok(parsed) = parse(&input) {
                prop_assert_eq!(parse(&parsed.normalized()), Ok(parsed));
            }
        }
    }

    #[test]
    fn reference_like_strategy_yields_parsable_references() {
        use proptest::strategy::ValueTree;
        use proptest::test_runner::TestRunner;
        let mut runner = TestRunner::deterministic();
        let strategy = proptest::string::string_regex(REFERENCE_LIKE).expect("valid regex");
        let parsed = (0..200)
            .filter(|_| {
                let tree = strategy.new_tree(&mut runner).expect("generates");
                parse(&tree.current()).is_ok()
            })
            .count();
        assert!(parsed > 40, "only {parsed} of 200 generated references parse");
    }
}
