//! Image references: arcguard's parser against github.com/distribution/reference, the code the
//! container runtime normalises references with (`ParseDockerRef`).
//!
//! For every input: valid or invalid, and for valid ones the normalised registry, repository,
//! tag and digest. arcguard may be stricter than the reference only in the classes of
//! [`deliberate`] (listed in conformance/README.md), never more permissive.

use arcguard::image::{self, ImageError};
use arcguard_conformance::{Report, ask, generate, mutated_inputs, oracles, runner, vectors};
use proptest::prelude::*;
use serde::Deserialize;

/// What the reference makes of one input (reference-oracle's answer).
#[derive(Debug, Deserialize)]
struct Answer {
    ok: bool,
    #[serde(default)]
    error: String,
    #[serde(default)]
    domain: String,
    #[serde(default)]
    path: String,
    #[serde(default)]
    tag: String,
    #[serde(default)]
    digest: String,
    #[serde(default)]
    panic: String,
}

/// Generated inputs per strategy.
const GENERATED: usize = 4_000;
/// Mutations per upstream vector.
const MUTATIONS: usize = 12;

/// Strings shaped like references, hosts of every kind (and case) included.
const REFERENCE_LIKE: &str = "((index\\.docker\\.io|docker\\.io|DOCKER\\.IO|Docker\\.io|Index\\.Docker\\.IO|localhost|LOCALHOST|LocalHost|[a-zA-Z0-9]{1,6}(\\.[a-zA-Z0-9-]{0,4}[a-zA-Z0-9]){0,2}(:[0-9]{1,5})?|\\[[0-9a-fA-F:]{1,12}\\](:[0-9]{1,4})?)/)?[a-zA-Z0-9]{1,6}((\\.|_|__|-{1,3})[a-z0-9]{1,4}){0,2}(/[a-z0-9]{1,6}){0,2}(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,8})?(@sha(256|384|512):[0-9a-fA-F]{64})?";
/// Near-references: valid and invalid hosts, separators, cases, tags and digests.
const NEAR_REFERENCE: &str = "((([a-zA-Z0-9_-]{1,4}\\.){0,2}[a-zA-Z0-9_-]{1,4}|localhost|LOCALHOST|DOCKER\\.IO|index\\.docker\\.io|\\[[0-9a-fA-F:%.]{0,8}\\])(:[0-9a-z]{0,3})?/)?([a-zA-Z0-9]{1,3}([._-]{1,3}[a-zA-Z0-9]{1,3}){0,2}/){0,2}[a-zA-Z0-9]{1,3}(:[a-zA-Z0-9_.æ€-]{0,5})?(@(sha256|sha512|[a-zA-Z0-9+._-]{0,7})(:[0-9a-fA-F]{28,130})?)?";
/// Names around the 255-character limit, with and without registry, tag and digest.
const LONG_REFERENCE: &str = "((index\\.)?(docker|DOCKER)\\.(io|IO)/|[a-z]{1,3}\\.io/|[a-z]{20,40}\\.example\\.com:5000/)?([a-z]{110,130}/)?[a-z]{100,140}(:[a-z]{1,3})?(@sha(256|512):[0-9a-fA-F]{62,66})?";
/// Short strings of the characters references are made of.
const SHORT: &str = "[a-zA-Z0-9._:/@+\\[\\]-]{0,24}";

/// Characters mutations insert.
const ALPHABET: &[char] =
    &['a', 'Z', '0', '.', '_', '-', ':', '/', '@', '[', ']', '%', ' ', 'é', 'A', 'f'];

/// Why arcguard denies a reference the reference implementation accepts, if on purpose: the
/// class (conformance/README.md lists each), when arcguard's error is the one that class gives.
fn deliberate(input: &str, ours: &ImageError, theirs: &Answer) -> Option<&'static str> {
    let name = input.split('@').next().unwrap_or(input);
    let first = name.split_once('/').map_or("", |(first, _)| first);
    let lower = first.to_ascii_lowercase();
    match ours {
        ImageError::DockerHubCase
            if (lower == "docker.io" || lower == "index.docker.io") && first != lower =>
        {
            Some("Docker Hub host not written in lowercase")
        }
        ImageError::UppercaseHost
            if first.bytes().any(|b| b.is_ascii_uppercase()) && !lower.contains(['.', ':']) =>
        {
            Some("uppercase first component without `.` or `:` read as a host")
        }
        ImageError::Host
            if first.starts_with('[')
                && first
                    .strip_prefix('[')
                    .and_then(|rest| rest.split(']').next())
                    .is_some_and(|inner| inner.parse::<std::net::Ipv6Addr>().is_err()) =>
        {
            Some("bracketed host that is not an IPv6 address")
        }
        ImageError::Host if theirs.domain.is_empty() => {
            Some("first component with `.` or `:` that is not a host name")
        }
        _ => None,
    }
}

fn compare(input: &str, theirs: &Answer, report: &mut Report) {
    if !theirs.panic.is_empty() {
        report.unexplained("the oracle panicked", format!("{input:?}: {}", theirs.panic));
        return;
    }
    match (image::parse(input), theirs.ok) {
        (Err(_), false) => report.agree("both invalid"),
        (Ok(ours), false) => report.unexplained(
            "arcguard accepts what the reference rejects",
            format!("{input:?}: ours {ours}, reference: {}", theirs.error),
        ),
        (Err(why), true) => match deliberate(input, &why, theirs) {
            Some(class) => report.deliberate(class, input.to_owned()),
            None => report.unexplained(
                "arcguard rejects what the reference accepts",
                format!("{input:?}: ours {why:?}, reference {theirs:?}"),
            ),
        },
        (Ok(ours), true) => {
            // The runtime adds `latest` only when neither tag nor digest is written.
            let tag = match (theirs.tag.as_str(), theirs.digest.as_str()) {
                ("", "") => Some("latest"),
                ("", _) => None,
                (tag, _) => Some(tag),
            };
            let digest = Some(theirs.digest.as_str()).filter(|d| !d.is_empty());
            // Host names are case-insensitive: arcguard writes them in lowercase.
            let same = ours.registry().eq_ignore_ascii_case(&theirs.domain)
                && ours.repository() == theirs.path
                && ours.tag() == tag
                && ours.digest() == digest;
            if same {
                report.agree("both valid, same registry, repository, tag and digest");
            } else {
                report.unexplained(
                    "both valid, normalised differently",
                    format!(
                        "{input:?}: ours ({}, {}, {:?}, {:?}), reference ({}, {}, {tag:?}, {digest:?})",
                        ours.registry(),
                        ours.repository(),
                        ours.tag(),
                        ours.digest(),
                        theirs.domain,
                        theirs.path
                    ),
                );
            }
        }
    }
}

fn run(title: &str, inputs: &[String]) -> Report {
    let Some(dir) = oracles() else { return Report::default() };
    let answers: Vec<Answer> = ask(&dir.join("reference-oracle"), inputs);
    let mut report = Report::default();
    for (input, answer) in inputs.iter().zip(&answers) {
        compare(input, answer, &mut report);
    }
    report.assert_explained(title);
    report
}

#[test]
fn upstream_vectors_agree_with_distribution_reference() {
    let Some(dir) = oracles() else { return };
    let vectors = vectors(&dir, "reference");
    println!("vectors per upstream file: {:?}", vectors.files);
    let report = run("distribution/reference test vectors", &vectors.inputs);
    assert!(report.compared >= 400, "only {} vectors", report.compared);
}

#[test]
fn mutated_vectors_agree_with_distribution_reference() {
    let Some(dir) = oracles() else { return };
    let vectors = vectors(&dir, "reference");
    let inputs = mutated_inputs(&vectors.inputs, ALPHABET, MUTATIONS);
    run("mutated distribution/reference vectors", &inputs);
}

#[test]
fn generated_references_agree_with_distribution_reference() {
    let mut runner = runner();
    let mut inputs = Vec::new();
    for pattern in [REFERENCE_LIKE, NEAR_REFERENCE, LONG_REFERENCE, SHORT] {
        inputs.extend(generate(&mut runner, pattern, GENERATED));
    }
    inputs.extend(generate(&mut runner, any::<String>(), GENERATED / 4));
    run("generated references", &inputs);
}
