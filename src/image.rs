//! Container image references, parsed and normalised as the container runtime reads them.
//!
//! The reference is github.com/distribution/reference v0.6.0: its grammar (`regexp.go`),
//! `[host[:port]/]path-component(/path-component)*[:tag][@algorithm:hex]` with `host` a DNS
//! name or a bracketed IPv6 address, and its normalisation (`normalize.go`, `ParseDockerRef`,
//! which runtimes call): the first component names a registry when it has a `.` or `:`, is
//! `localhost`, or has an uppercase letter; otherwise the registry is Docker Hub, whose
//! single-component names get `library/`; the repository path is at most 255 characters.
//! The conformance suite (`conformance/`) compares this parser with that code on its own test
//! vectors and generated input. Where arcguard is stricter on purpose, [`ImageError`] says so
//! (`DockerHubCase`, `UppercaseHost`, `Host`); it never accepts what the reference rejects.
//!
//! The grammar is checked by scanning bytes (no regex: a regex paid microseconds per image and
//! milliseconds to compile on the first request). Registry hosts are written in lowercase in the
//! normalised form (host names are case-insensitive), so one image has one normalised form.
//! [`parse_parts`] borrows from the written string and allocates nothing; [`parse`] builds the
//! normalised form in one allocation.

use std::fmt;
use std::ops::Range;

/// Longest repository path (`library/` included for official images) the reference allows:
/// `RepositoryNameTotalLengthMax` in distribution/reference's `reference.go`. The registry host
/// does not count.
const NAME_MAX: usize = 255;
/// Longest tag the grammar allows, in characters.
const TAG_MAX: usize = 128;
/// Fewest hex characters the grammar allows in a digest, whatever its algorithm.
const DIGEST_HEX_MIN: usize = 32;
/// The Docker Hub registry host every short name resolves to.
const DOCKER_HUB: &str = "docker.io";
/// The legacy Docker Hub host, the same registry as [`DOCKER_HUB`].
const DOCKER_HUB_LEGACY: &str = "index.docker.io";
/// Repository namespace of single-element Docker Hub names (`nginx` is `library/nginx`).
const DOCKER_HUB_OFFICIAL: &str = "library";
/// The tag the runtime pulls when neither tag nor digest is written.
const DEFAULT_TAG: &str = "latest";
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
    /// The first component has uppercase letters but no `.` or `:` and is no spelling of
    /// `localhost`: the runtime would read it as a registry host (distribution/reference's
    /// `splitDockerDomain`). Denied on purpose: such a host cannot be told from a Docker Hub
    /// namespace once written in lowercase.
    #[error(
        "the first path component has uppercase letters, so the runtime would read it as a registry host; write the repository in lowercase, or the registry as host.domain or host:port"
    )]
    UppercaseHost,
    /// Docker Hub's host written with uppercase letters (`DOCKER.IO/nginx`). The runtime does not
    /// take that spelling for Docker Hub (no `library/`, no Docker Hub endpoint); denied on
    /// purpose rather than read as another registry.
    #[error("write the Docker Hub host in lowercase: docker.io")]
    DockerHubCase,
    /// The reference does not follow the grammar.
    #[error(
        "not of the form {FORM}: path components are lowercase letters and digits separated by `.`, `_`, `__` or `-`, separated by `/`"
    )]
    Format,
    /// The registry host is not a host name or bracketed IPv6 address with an optional port.
    #[error(
        "the registry host is not a host name (dot-separated labels of letters, digits and inner `-`) or a bracketed IPv6 address, with an optional `:port`"
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
    /// The repository path is longer than the reference allows.
    #[error(
        "the repository path (with `library/` for official Docker Hub images) is longer than {NAME_MAX} characters"
    )]
    NameTooLong,
}

/// A parsed, normalised image reference: one value per image, however it was written.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// The normalised form, `registry/repository[:tag][@digest]`; the offsets below split it,
    /// and follow from it, so deriving equality and hashing over all fields is sound.
    text: String,
    /// End of `registry`.
    registry_end: usize,
    /// End of `registry/repository`.
    name_end: usize,
    /// End of `registry/repository[:tag]`.
    tag_end: usize,
}

impl ImageRef {
    /// The registry `host[:port]` (a bracketed IPv6 address as written), lowercase; `docker.io`
    /// for Docker Hub.
    pub fn registry(&self) -> &str {
        &self.text[..self.registry_end]
    }

    /// The repository path, e.g. `library/nginx`.
    pub fn repository(&self) -> &str {
        &self.text[self.registry_end + 1..self.name_end]
    }

    /// The tag; `latest` when neither tag nor digest was written.
    pub fn tag(&self) -> Option<&str> {
        (self.tag_end > self.name_end).then(|| &self.text[self.name_end + 1..self.tag_end])
    }

    /// The digest (`algorithm:hex`), if pinned.
    pub fn digest(&self) -> Option<&str> {
        (self.text.len() > self.tag_end).then(|| &self.text[self.tag_end + 1..])
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        self.text[..self.name_end].to_owned()
    }

    /// The normalised form, borrowed: see [`ImageRef::normalized`].
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The normalised form, e.g. `docker.io/library/nginx:latest` or `host/repo:tag@sha256:...`.
    pub fn normalized(&self) -> String {
        self.text.clone()
    }

    /// Whether both references make the runtime pull the same thing: the same digest, or the
    /// same tag when neither has a digest (with both tag and digest, the runtime pulls by digest).
    pub fn pulls_same_as(&self, other: &Self) -> bool {
        let content = match (self.digest(), other.digest()) {
            (Some(a), Some(b)) => a == b,
            (None, None) => self.tag() == other.tag(),
            _ => false,
        };
        // The registry has no `/`, so equal names mean equal registries and repositories.
        content && self.text[..self.name_end] == other.text[..other.name_end]
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A valid image reference borrowed from the string it was parsed from: the parts as written,
/// with the normalisation (Docker Hub host, `library/`, `latest`) implied rather than built.
/// It compares with normalised names and [`ImageRef`]s without allocating.
#[derive(Clone, Copy, Debug)]
pub struct ImageParts<'a> {
    /// The registry host as written (any case), or [`DOCKER_HUB`] for every Docker Hub spelling.
    registry: &'a str,
    /// Whether the normalised repository is `library/` followed by `repository`.
    official: bool,
    /// The repository path as written.
    repository: &'a str,
    /// The tag; `latest` when neither tag nor digest was written.
    tag: Option<&'a str>,
    /// The digest (`algorithm:hex`), if pinned.
    digest: Option<&'a str>,
}

impl<'a> ImageParts<'a> {
    /// Whether the registry is `host`, a lowercase `host[:port]` (`docker.io` for Docker Hub).
    pub fn registry_is(&self, host: &str) -> bool {
        self.registry.eq_ignore_ascii_case(host)
    }

    /// Whether the normalised repository is `prefix` or lies under it: a prefix matches whole
    /// path components only (`oss` covers `oss/nginx`, not `ossevil`).
    pub fn repository_is_under(&self, prefix: &str) -> bool {
        let prefix = if self.official {
            match prefix.strip_prefix(DOCKER_HUB_OFFICIAL) {
                Some("") => return true,
                Some(rest) => match rest.strip_prefix('/') {
                    Some(rest) => rest,
                    None => return false,
                },
                None => return false,
            }
        } else {
            prefix
        };
        self.repository
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }

    /// The tag; `latest` when neither tag nor digest was written.
    pub fn tag(&self) -> Option<&'a str> {
        self.tag
    }

    /// The digest (`algorithm:hex`), if pinned.
    pub fn digest(&self) -> Option<&'a str> {
        self.digest
    }

    /// Whether the runtime pulls the same thing for both, as [`ImageRef::pulls_same_as`].
    pub fn pulls_same_as(&self, other: &ImageRef) -> bool {
        let content = match (self.digest, other.digest()) {
            (Some(a), Some(b)) => a == b,
            (None, None) => self.tag == other.tag(),
            _ => false,
        };
        let repository = if self.official {
            other.repository().strip_prefix(DOCKER_HUB_OFFICIAL).and_then(|r| r.strip_prefix('/'))
        } else {
            Some(other.repository())
        };
        content && repository == Some(self.repository) && self.registry_is(other.registry())
    }

    /// The normalised, owned reference.
    pub fn to_image_ref(&self) -> ImageRef {
        self.normalized(true)
    }

    /// The normalised reference the runtime pulls: `registry/repository@digest` when pinned
    /// (a tag next to the digest does not matter), else `registry/repository:tag`. One
    /// allocation; the key registry facts are read and cached by.
    pub fn pull_reference(&self) -> String {
        self.normalized(self.digest.is_none()).text
    }

    /// The normalised reference, with its tag (if any) when `with_tag`.
    fn normalized(&self, with_tag: bool) -> ImageRef {
        let tag = self.tag.filter(|_| with_tag);
        let official = if self.official { DOCKER_HUB_OFFICIAL.len() + 1 } else { 0 };
        let tag_len = tag.map_or(0, |tag| 1 + tag.len());
        let digest_len = self.digest.map_or(0, |digest| 1 + digest.len());
        let mut text = String::with_capacity(
            self.registry.len() + 1 + official + self.repository.len() + tag_len + digest_len,
        );
        text.push_str(self.registry);
        // Host names are case-insensitive; the host keeps its `.` or `:` (or is `localhost`),
        // so it stays a host when the normalised form is parsed again.
        text.make_ascii_lowercase();
        let registry_end = text.len();
        text.push('/');
        if self.official {
            text.push_str(DOCKER_HUB_OFFICIAL);
            text.push('/');
        }
        text.push_str(self.repository);
        let name_end = text.len();
        if let Some(tag) = tag {
            text.push(':');
            text.push_str(tag);
        }
        let tag_end = text.len();
        if let Some(digest) = self.digest {
            text.push('@');
            text.push_str(digest);
        }
        ImageRef { text, registry_end, name_end, tag_end }
    }
}

/// Parses and normalises an image reference as the container runtime reads it.
///
/// # Errors
/// [`ImageError`] saying why `input` is not a valid reference.
pub fn parse(input: &str) -> Result<ImageRef, ImageError> {
    parse_parts(input).map(|parts| parts.to_image_ref())
}

/// Parses an image reference as [`parse`] does, without allocating: the result borrows `input`.
///
/// # Errors
/// [`ImageError`] saying why `input` is not a valid reference.
pub fn parse_parts(input: &str) -> Result<ImageParts<'_>, ImageError> {
    parse_spans(input).map(|spans| spans.parts(input))
}

/// Where the parts of a valid reference lie in the string it was parsed from: an
/// [`ImageParts`] without the borrow, so that a parse can be kept next to its string (the
/// request view parses each container's image once, however many rules read it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSpans {
    /// The registry host; `None` for Docker Hub, however it was spelled.
    registry: Option<Range<usize>>,
    official: bool,
    repository: Range<usize>,
    /// The tag as written; `None` with no digest either means `latest`.
    tag: Option<Range<usize>>,
    digest: Option<Range<usize>>,
}

impl ImageSpans {
    /// The parts of `input`, the string these spans were parsed from (any other string gives
    /// empty parts, never a panic).
    pub fn parts<'a>(&self, input: &'a str) -> ImageParts<'a> {
        let slice = |range: &Range<usize>| input.get(range.clone()).unwrap_or_default();
        ImageParts {
            registry: self.registry.as_ref().map_or(DOCKER_HUB, slice),
            official: self.official,
            repository: slice(&self.repository),
            tag: match (&self.tag, &self.digest) {
                (Some(tag), _) => Some(slice(tag)),
                (None, None) => Some(DEFAULT_TAG),
                (None, Some(_)) => None,
            },
            digest: self.digest.as_ref().map(slice),
        }
    }
}

/// Parses an image reference as [`parse_parts`] does, giving where its parts lie in `input`.
///
/// # Errors
/// [`ImageError`] saying why `input` is not a valid reference.
pub fn parse_spans(input: &str) -> Result<ImageSpans, ImageError> {
    let scan = Scan::of(input);
    check_shape(input, &scan)?;
    let (rest, digest) = match scan.at {
        Some(at) => (&input[..at], Some(&input[at + 1..])),
        None => (input, None),
    };
    let (name, tag) = match scan.colon {
        Some(colon) if scan.last_slash.is_none_or(|slash| slash < colon) => {
            (&rest[..colon], Some(&rest[colon + 1..]))
        }
        _ => (rest, None),
    };
    let split = scan.first_slash.map(|slash| (&name[..slash], &name[slash + 1..]));
    if !is_name(name, split) || !tag.is_none_or(is_tag) || !digest.is_none_or(is_digest) {
        return Err(if has_uppercase(repository_path(input)) {
            ImageError::Uppercase
        } else {
            ImageError::Format
        });
    }

    let (registry, repository) = match split {
        Some((first, rest)) if names_registry(first) => (Some(first), rest),
        _ => (None, name),
    };
    let official = match registry {
        Some(host) => is_docker_hub(host) && scan.first_slash == scan.last_slash,
        None => scan.first_slash.is_none(),
    };
    let (registry, docker_hub) = match registry {
        Some(host) if !is_docker_hub(host) => (host, false),
        _ => (DOCKER_HUB, true),
    };
    let repository_len =
        repository.len() + if official { DOCKER_HUB_OFFICIAL.len() + 1 } else { 0 };
    if repository_len > NAME_MAX {
        return Err(ImageError::NameTooLong);
    }
    if let Some(digest) = digest {
        check_digest_length(digest)?;
    }
    if has_uppercase(repository) {
        return Err(ImageError::Uppercase);
    }
    if let Some((first, _)) = split.filter(|(first, _)| has_uppercase(first)) {
        let lower = first.to_ascii_lowercase();
        if lower == DOCKER_HUB || lower == DOCKER_HUB_LEGACY {
            return Err(ImageError::DockerHubCase);
        }
        // Written in lowercase it would name a Docker Hub namespace, not a host.
        if !names_registry(&lower) {
            return Err(ImageError::UppercaseHost);
        }
    }
    // A first element that passed the grammar as a path component (`a_b.com`) is no host.
    if !is_host_of_any_case(registry) {
        return Err(ImageError::Host);
    }
    // The grammar's `\w` is ASCII; `is_tag` let other characters through to say so here.
    if tag.is_some_and(|tag| !tag.is_ascii()) {
        return Err(ImageError::Tag);
    }
    // The algorithm is a lowercase `sha…` by now, so any uppercase letter is in the hex.
    if digest.is_some_and(has_uppercase) {
        return Err(ImageError::DigestHex);
    }
    // Every part but a Docker Hub registry is a slice of `input`: its span is its offset.
    let span = |part: &str| {
        let start = (part.as_ptr() as usize).wrapping_sub(input.as_ptr() as usize);
        start..start + part.len()
    };
    Ok(ImageSpans {
        registry: (!docker_hub).then(|| span(registry)),
        official,
        repository: span(repository),
        tag: tag.map(span),
        digest: digest.map(span),
    })
}

/// Where the separators of a reference are, found in one pass over its bytes.
///
/// Neither name nor tag has an `@`; neither tag nor digest has a `/`; a `:` in the name is a
/// port, always followed by `/`. So the digest follows the first `@`, and the tag the last `:`
/// before it when no `/` comes after that `:`.
struct Scan {
    /// The first `@`.
    at: Option<usize>,
    /// The last `:` before the first `@`.
    colon: Option<usize>,
    /// The first `/` before the first `@`.
    first_slash: Option<usize>,
    /// The last `/` before the first `@`.
    last_slash: Option<usize>,
    /// Whether there is whitespace or a non-ASCII byte, which need the Unicode checks.
    unusual: bool,
    /// Whether there is a `://`.
    scheme: bool,
}

impl Scan {
    fn of(input: &str) -> Self {
        let bytes = input.as_bytes();
        let mut scan = Self {
            at: None,
            colon: None,
            first_slash: None,
            last_slash: None,
            unusual: false,
            scheme: false,
        };
        for (i, &b) in bytes.iter().enumerate() {
            match b {
                b'@' if scan.at.is_none() => scan.at = Some(i),
                b':' => {
                    scan.scheme |= bytes.get(i + 1..i + 3) == Some(b"//");
                    if scan.at.is_none() {
                        scan.colon = Some(i);
                    }
                }
                b'/' if scan.at.is_none() => {
                    scan.first_slash = scan.first_slash.or(Some(i));
                    scan.last_slash = Some(i);
                }
                b'\t'..=b'\r' | b' ' | 0x80.. => scan.unusual = true,
                _ => {}
            }
        }
        scan
    }
}

/// The checks made before the grammar, for the mistakes it would only call a bad format.
fn check_shape(input: &str, scan: &Scan) -> Result<(), ImageError> {
    // Whitespace needs Unicode decoding only when the byte scan saw a candidate.
    if scan.unusual || input.is_empty() {
        if input.trim().is_empty() {
            return Err(ImageError::Empty);
        }
        if input.chars().any(char::is_whitespace) {
            return Err(ImageError::Whitespace);
        }
    }
    if scan.scheme {
        return Err(ImageError::Scheme);
    }
    // The runtime reads a bare 64-hex string as an image ID, not a Docker Hub repository.
    if input.len() == 64 && is_lower_hex(input) {
        return Err(ImageError::IdentifierOnly);
    }
    Ok(())
}

/// Whether the first of several path components names a registry host rather than a Docker Hub
/// namespace: it has a `.` or a `:`, is `localhost`, or has an uppercase letter
/// (`splitDockerDomain` in distribution/reference's `normalize.go`).
fn names_registry(first: &str) -> bool {
    first.bytes().any(|b| matches!(b, b'.' | b':') || b.is_ascii_uppercase())
        || first == "localhost"
}

/// Whether `host` is Docker Hub as the reference spells it: `docker.io` or `index.docker.io`,
/// in lowercase (the reference compares them case-sensitively).
fn is_docker_hub(host: &str) -> bool {
    host == DOCKER_HUB || host == DOCKER_HUB_LEGACY
}

/// Whether `name` is `[host[:port]/]path` of the grammar, the host in any case; `split` is
/// `name` cut at its first `/`, if it has one.
///
/// As the reference does (`ParseNormalizedNamed`), the first component is a host only when
/// [`names_registry`] says so; otherwise the whole name must be a path, so `[9]/x` is no
/// Docker Hub repository.
fn is_name(name: &str, split: Option<(&str, &str)>) -> bool {
    match split {
        // A first element such as `contoso.azurecr.io` is both a host and a path component;
        // either reading accepts the name (`a_b.com/x` is then denied as no host, later).
        Some((host, path)) if names_registry(host) => {
            is_path(name) || (host_follows(host, Grammar::Reference) && is_path(path))
        }
        _ => is_path(name),
    }
}

/// Whether `path` is path components joined by `/`: [`is_path_component`] over a whole path
/// in one pass.
fn is_path(path: &str) -> bool {
    /// What the grammar allows next.
    #[derive(Clone, Copy, PartialEq)]
    enum Next {
        /// A letter or digit: at the start of a component or after a separator.
        Alnum,
        /// Anything: after a letter or digit.
        Any,
        /// A letter or digit or a second `_`.
        AfterUnderscore,
        /// A letter or digit or another `-`.
        AfterDash,
    }
    let mut next = Next::Alnum;
    for &b in path.as_bytes() {
        let alnum = b.is_ascii_lowercase() || b.is_ascii_digit();
        next = match (next, b) {
            _ if alnum => Next::Any,
            (Next::Any, b'/' | b'.') => Next::Alnum,
            (Next::Any, b'_') => Next::AfterUnderscore,
            (Next::Any | Next::AfterDash, b'-') => Next::AfterDash,
            (Next::AfterUnderscore, b'_') => Next::Alnum,
            _ => return false,
        };
    }
    next == Next::Any
}

/// Whether `tag` is `[\w][\w.-]{0,127}`; characters beyond ASCII count as `\w` here, so that
/// [`parse_parts`] can reject them as [`ImageError::Tag`] rather than as a bad format.
fn is_tag(tag: &str) -> bool {
    let word = |c: char| !c.is_ascii() || c.is_ascii_alphanumeric() || c == '_';
    let mut chars = tag.chars();
    chars.next().is_some_and(word)
        && chars.all(|c| word(c) || c == '.' || c == '-')
        && (tag.len() <= TAG_MAX || tag.chars().count() <= TAG_MAX)
}

/// Whether `digest` is `algorithm:hex` of the grammar: algorithm components
/// `[A-Za-z][A-Za-z0-9]*` joined by one of `-_+.`, and at least 32 hex digits of either case.
fn is_digest(digest: &str) -> bool {
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return false;
    };
    let component = |c: &str| {
        c.as_bytes().first().is_some_and(u8::is_ascii_alphabetic)
            && c.bytes().all(|b| b.is_ascii_alphanumeric())
    };
    hex.len() >= DIGEST_HEX_MIN
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
        && algorithm.split(['-', '_', '+', '.']).all(component)
}

/// Checks the algorithm of a digest that follows the grammar and the length of its hex part.
fn check_digest_length(digest: &str) -> Result<(), ImageError> {
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return Err(ImageError::DigestFormat);
    };
    let (algorithm, expected) = match algorithm {
        "sha256" => ("sha256", 64),
        "sha384" => ("sha384", 96),
        "sha512" => ("sha512", 128),
        _ => return Err(ImageError::DigestAlgorithm),
    };
    if hex.len() == expected {
        Ok(())
    } else {
        Err(ImageError::DigestLength { algorithm, expected, actual: hex.len() })
    }
}

/// Whether `host` is `name[:port]` with a valid lowercase DNS-style name, or `[ipv6][:port]`
/// with a lowercase IPv6 address.
pub(crate) fn is_host(host: &str) -> bool {
    host_follows(host, Grammar::Lowercase)
}

/// Whether `host` is `name[:port]` with a valid DNS-style name, or `[ipv6][:port]`, of any case.
fn is_host_of_any_case(host: &str) -> bool {
    host_follows(host, Grammar::AnyCase)
}

/// How strictly [`host_follows`] reads a host.
#[derive(Clone, Copy, PartialEq)]
enum Grammar {
    /// The reference's grammar: letters of any case, and any `[hex:]` in brackets.
    Reference,
    /// Letters of any case, and brackets holding an IPv6 address.
    AnyCase,
    /// Lowercase letters, and brackets holding an IPv6 address.
    Lowercase,
}

impl Grammar {
    fn letter(self, b: u8) -> bool {
        if self == Self::Lowercase { b.is_ascii_lowercase() } else { b.is_ascii_alphabetic() }
    }
}

/// Splits `host[:port]` (`host` possibly a bracketed IPv6 address) into the host and the port.
pub(crate) fn split_port(host: &str) -> (&str, Option<&str>) {
    let after = if host.starts_with('[') { host.find(']').map_or(0, |end| end + 1) } else { 0 };
    match host[after..].find(':') {
        Some(colon) => (&host[..after + colon], Some(&host[after + colon + 1..])),
        None => (host, None),
    }
}

/// Whether `address` is `[ipv6]`: the reference's `\[(?:[a-fA-F0-9:]+)\]` (`ipv6address` in
/// its `regexp.go`) and, except for [`Grammar::Reference`], an address that parses: stricter
/// than the reference, which takes `[1:2:3:4:5:6:7:8:9]`.
fn is_ipv6_literal(address: &str, grammar: Grammar) -> bool {
    let Some(inner) = address.strip_prefix('[').and_then(|rest| rest.strip_suffix(']')) else {
        return false;
    };
    let hex = |b: u8| b.is_ascii_digit() || (grammar.letter(b) && b.is_ascii_hexdigit());
    !inner.is_empty()
        && inner.bytes().all(|b| b == b':' || hex(b))
        && (grammar == Grammar::Reference || inner.parse::<std::net::Ipv6Addr>().is_ok())
}

fn host_follows(host: &str, grammar: Grammar) -> bool {
    let (name, port) = split_port(host);
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if name.starts_with('[') {
        return port_ok && is_ipv6_literal(name, grammar);
    }
    let name = name.as_bytes();
    // Labels of letters, digits and inner `-`, joined by `.`; one pass, tracking the byte
    // before, which starts as a `.` so that an empty first label fails like any other.
    let mut before = b'.';
    for &b in name {
        let valid = match b {
            b'.' => !matches!(before, b'.' | b'-'),
            b'-' => before != b'.',
            _ => grammar.letter(b) || b.is_ascii_digit(),
        };
        if !valid {
            return false;
        }
        before = b;
    }
    port_ok && !matches!(before, b'.' | b'-')
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
        let separator = &bytes[start..i];
        let valid =
            matches!(separator, b"." | b"_" | b"__") || separator.iter().all(|&b| b == b'-');
        if !valid {
            return false;
        }
    }
    true
}

fn is_lower_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn has_uppercase(s: &str) -> bool {
    s.bytes().any(|b| b.is_ascii_uppercase())
}

/// The written repository path: without digest, tag and (when the first element names one)
/// registry host. Used to say "uppercase" rather than "bad format" when that is the mistake.
fn repository_path(input: &str) -> &str {
    let name = input.split_once('@').map_or(input, |(name, _)| name);
    let name = match name.rfind(':') {
        Some(colon) if !name[colon..].contains('/') => &name[..colon],
        _ => name,
    };
    match name.split_once('/') {
        Some((first, rest)) if names_registry(first) => rest,
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
            ("nginx:1.25".into(), "docker.io/library/nginx:1.25"),
            ("bitnami/nginx".into(), "docker.io/bitnami/nginx:latest"),
            ("foo/bar.com/x".into(), "docker.io/foo/bar.com/x:latest"),
            // Without a `/`, `host:port` is a name and a tag.
            ("test.com:5000".into(), "docker.io/library/test.com:5000"),
            ("localhost".into(), "docker.io/library/localhost:latest"),
            ("localhost/app".into(), "localhost/app:latest"),
            // An uppercase first component is a host; `LOCALHOST` is `localhost`.
            ("LOCALHOST/app".into(), "localhost/app:latest"),
            ("LocalHost:5000/app".into(), "localhost:5000/app:latest"),
            // Bracketed IPv6 hosts, written in lowercase.
            ("[::1]:5000/repo".into(), "[::1]:5000/repo:latest"),
            ("[2001:DB8::1]/team/repo:v1".into(), "[2001:db8::1]/team/repo:v1"),
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
    fn the_length_limit_counts_the_repository_path_only() {
        let longest = [
            format!("x.io/{}", "a".repeat(255)),
            format!("{}.example.com:5000/{}", "h".repeat(60), "a".repeat(255)),
            "a".repeat(247),
            format!("a/{}", "b".repeat(253)),
        ];
        for input in longest {
            let parsed = parse(&input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(parsed.repository().len(), 255, "{input}");
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
            ("Uppercase/lowercase:tag".into(), ImageError::UppercaseHost),
            ("Foo/bar".into(), ImageError::UppercaseHost),
            ("DOCKER.IO/nginx".into(), ImageError::DockerHubCase),
            ("Docker.io/library/nginx".into(), ImageError::DockerHubCase),
            ("Index.Docker.IO/library/nginx".into(), ImageError::DockerHubCase),
            ("[1:2:3:4:5:6:7:8:9]/repo".into(), ImageError::Host),
            ("[::ffff:1.2.3.4]/repo".into(), ImageError::Format),
            ("[fe80::1%eth0]:5000/repo".into(), ImageError::Format),
            ("[::1]".into(), ImageError::Format),
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
            // 255 characters is the limit on the repository path, `library/` included.
            (format!("x.io/{}", "a".repeat(256)), ImageError::NameTooLong),
            ("a".repeat(248), ImageError::NameTooLong),
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
    fn whole_paths_are_scanned_as_their_components_are() {
        let paths = [
            "a",
            "a___b",
            "a__b",
            "a_b",
            "a_-b",
            "a-_b",
            "a._b",
            "a--b",
            "a.b",
            "a..b",
            "a-",
            "_a",
            "a/b",
            "a//b",
            "a/",
            "/a",
            "a/-b",
            "a_/b",
            "a/__b",
            "a/b__c/d-e",
            "A",
            "a.B",
            "aé",
            "",
        ];
        for path in paths {
            let expected = path.split('/').all(is_path_component);
            assert_eq!(is_path(path), expected, "{path:?}");
        }
    }

    #[test]
    fn hosts_follow_the_grammar() {
        for ok in [
            "a",
            "a.b",
            "a-b.c",
            "host:5000",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:5000",
            "[2001:db8::1]",
        ] {
            assert!(is_host(ok), "{ok}");
        }
        let bad = [
            "",
            "A.b",
            "a_b.c",
            "-a.b",
            "a-.b",
            "a..b",
            "a:",
            "a:x",
            "a:1:2",
            ":80",
            "[]",
            "[::1",
            "[::1]:",
            "[::1]x",
            "[2001:DB8::1]",
            "[1:2:3:4:5:6:7:8:9]",
            "[::ffff:1.2.3.4]",
            "[fe80::1%eth0]",
            "[::1]:5000:1",
        ];
        for bad in bad {
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

    #[test]
    fn non_ascii_tags_are_tag_errors() {
        let cases: Vec<(String, ImageError)> = vec![
            ("nginx:t€g".into(), ImageError::Tag),
            (format!("nginx:tæg@sha256:{HEX}"), ImageError::Tag),
            (format!("nginx:{}", "æ".repeat(128)), ImageError::Tag),
            // The limit counts characters, not bytes.
            (format!("nginx:{}", "æ".repeat(129)), ImageError::Format),
            ("Nginx:tæg".into(), ImageError::Uppercase),
        ];
        for (input, expected) in cases {
            assert_eq!(parse(&input), Err(expected), "{input:?}");
        }
    }

    #[test]
    fn digest_grammar_is_checked_before_the_algorithm() {
        let cases: Vec<(String, ImageError)> = vec![
            (format!("repo@sha256+b64:{HEX}"), ImageError::DigestAlgorithm),
            (format!("repo@SHA256:{HEX}"), ImageError::DigestAlgorithm),
            (
                format!("repo@sha256:{HEX}{HEX}"),
                ImageError::DigestLength { algorithm: "sha256", expected: 64, actual: 128 },
            ),
            (
                format!("repo@sha512:{HEX}"),
                ImageError::DigestLength { algorithm: "sha512", expected: 128, actual: 64 },
            ),
            (format!("repo@1sha:{HEX}"), ImageError::Format),
            (format!("repo@sha--256:{HEX}"), ImageError::Format),
            (format!("repo@:{HEX}"), ImageError::Format),
            (format!("repo@sha256:{HEX}@sha256:{HEX}"), ImageError::Format),
            (format!("repo@sha256:{}g", &HEX[1..]), ImageError::Format),
            // The grammar wants at least 32 hex digits before the algorithm's length applies.
            (format!("repo@sha256:{}", &HEX[..31]), ImageError::Format),
            (
                format!("repo@sha256:{}", &HEX[..32]),
                ImageError::DigestLength { algorithm: "sha256", expected: 64, actual: 32 },
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(parse(&input), Err(expected), "{input:?}");
        }
    }

    #[test]
    fn borrowed_parts_compare_as_the_normalised_reference_does() {
        let under = [
            ("nginx", "library", true),
            ("nginx", "library/nginx", true),
            ("docker.io/nginx", "library/nginx", true),
            ("nginx", "library/ng", false),
            ("nginx", "library/", false),
            ("nginx", "lib", false),
            ("nginx", "libraryx", false),
            ("nginx", "library/nginx/x", false),
            ("nginx", "nginx", false),
            ("bitnami/nginx", "bitnami", true),
            ("bitnami/nginx", "library", false),
            ("library/nginx", "library", true),
            ("host.io/a/b", "a", true),
            ("host.io/a/b", "a/b", true),
            ("host.io/ab", "a", false),
            ("host.io/a/b", "a/", false),
        ];
        for (image, prefix, expected) in under {
            let parts = parse_parts(image).expect("valid");
            assert_eq!(parts.repository_is_under(prefix), expected, "{image} under {prefix}");
        }
        let registry = [
            ("nginx", "docker.io", true),
            ("index.docker.io/nginx", "docker.io", true),
            ("LOCALHOST/x", "localhost", true),
            ("[::1]:5000/x", "[::1]:5000", true),
            ("[::1]:5000/x", "[::1]", false),
            ("index.docker.io/x/y", "index.docker.io", false),
            ("Contoso.io/x", "contoso.io", true),
            ("localhost:5000/x", "localhost:5000", true),
            ("localhost:5000/x", "localhost", false),
            ("contoso.io.evil.com/x", "contoso.io", false),
        ];
        for (image, host, expected) in registry {
            let parts = parse_parts(image).expect("valid");
            assert_eq!(parts.registry_is(host), expected, "{image} from {host}");
        }
    }

    #[test]
    fn the_pull_reference_is_the_digest_when_pinned_else_the_tag() {
        let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        for (image, want) in [
            ("nginx".to_owned(), "docker.io/library/nginx:latest".to_owned()),
            ("index.docker.io/nginx:1.27".to_owned(), "docker.io/library/nginx:1.27".to_owned()),
            (format!("nginx@{digest}"), format!("docker.io/library/nginx@{digest}")),
            (format!("Reg.IO/team/app:1@{digest}"), format!("reg.io/team/app@{digest}")),
            ("localhost:5000/app".to_owned(), "localhost:5000/app:latest".to_owned()),
        ] {
            let parts = parse_parts(&image).expect("valid");
            assert_eq!(parts.pull_reference(), want, "{image}");
            // As the normalised reference spells it, without the tag next to a digest.
            let owned = parts.to_image_ref();
            let spelled = match owned.digest() {
                Some(digest) => format!("{}@{digest}", owned.name()),
                None => owned.to_string(),
            };
            assert_eq!(parts.pull_reference(), spelled, "{image}");
        }
    }

    #[test]
    fn spans_give_the_parts_of_their_own_string_and_nothing_of_another() {
        for image in [
            "nginx",
            "docker.io/library/nginx:1.27",
            "index.docker.io/team/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "contoso.azurecr.io:5000/a/b:v1@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "[::1]:5000/app",
        ] {
            let spans = parse_spans(image).expect("valid");
            let parts = spans.parts(image);
            assert_eq!(parts.to_image_ref(), parse(image).expect("valid"), "{image}");
            // A string the spans were not parsed from never panics: its parts are empty.
            let other = spans.parts("x");
            assert!(other.repository.is_empty() || other.repository == "x", "{image}");
        }
    }

    proptest! {
        #[test]
        fn borrowed_parts_agree_with_the_owned_reference(
            input in REFERENCE_LIKE,
            other in REFERENCE_LIKE,
            depth in 0usize..4,
            prefix in "library|library/[a-z0-9]{1,2}|[a-z0-9]{1,3}(/[a-z0-9]{1,3})?",
        ) {
            let Ok(parts) = parse_parts(&input) else {
                return Ok(());
            };
            let owned = parts.to_image_ref();
            prop_assert_eq!(parse(&input), Ok(owned.clone()));
            prop_assert!(parts.registry_is(owned.registry()));
            prop_assert!(parts.pulls_same_as(&owned));
            let components: Vec<&str> = owned.repository().split('/').collect();
            let own_prefix = components[..depth.min(components.len())].join("/");
            for prefix in [prefix.as_str(), own_prefix.as_str()] {
                let expected = owned
                    .repository()
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
                prop_assert_eq!(parts.repository_is_under(prefix), expected, "{} under {}", owned, prefix);
            }
            if let Ok(other) = parse(&other) {
                prop_assert_eq!(parts.pulls_same_as(&other), owned.pulls_same_as(&other), "{}", other);
            }
        }
    }
}
