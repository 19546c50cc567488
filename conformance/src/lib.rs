//! Conformance of arcguard's parsers with their reference implementations.
//!
//! The oracles are small Go programs over the reference code itself (`conformance/oracles/`:
//! github.com/distribution/reference for image references, Calico's libcalico-go
//! `lib/selector` for selectors), built from the Go module proxy by
//! `conformance/build-oracles.sh` into a version-keyed cache. Each reads JSON lines on stdin and
//! answers one JSON line per input, so one process handles a whole batch. The suites in
//! `tests/` feed the same inputs (the upstream test vectors, extracted from the modules'
//! `_test.go` files, plus generated ones) to arcguard and the oracle and compare. See
//! `conformance/README.md`.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, BufWriter, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use proptest::strategy::{Strategy, ValueTree as _};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// The folder holding the oracles and the extracted vectors, or `None` (with the reason printed)
/// when they cannot be had here and the suite should be skipped.
///
/// `ARCGUARD_ORACLES` names a folder made by `build-oracles.sh` (what `.ci/run` does);
/// otherwise the script is run, which reuses its cache or builds the oracles (about 10 s cold).
/// Without Go the suite is skipped, except under CI (`CI` set), where that is a failure.
///
/// # Panics
/// When the oracles cannot be built under CI, or the script fails although Go is installed.
pub fn oracles() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("ARCGUARD_ORACLES") {
        return Some(PathBuf::from(dir));
    }
    let go = Command::new("go").arg("version").stdout(Stdio::null()).status();
    if !go.is_ok_and(|s| s.success()) {
        assert!(
            std::env::var_os("CI").is_none(),
            "the conformance oracles need Go, and CI must not skip them"
        );
        println!(
            "SKIPPED: the conformance oracles are absent and Go is not installed to build them \
             (conformance/build-oracles.sh); this suite compared nothing"
        );
        return None;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("build-oracles.sh");
    let output = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(output.status.success(), "{} failed", script.display());
    let dir = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    Some(PathBuf::from(dir))
}

/// Runs `oracle` once over all `inputs` (one JSON line each) and returns its answers in order.
///
/// # Panics
/// When the oracle cannot be started, dies, or answers a different number of lines.
pub fn ask<I: serde::Serialize + Sync, O: DeserializeOwned>(oracle: &Path, inputs: &[I]) -> Vec<O> {
    let mut child = Command::new(oracle)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", oracle.display()));
    let stdin = child.stdin.take().expect("stdin is piped");
    let stdout = child.stdout.take().expect("stdout is piped");
    let answers = std::thread::scope(|scope| {
        // Writing and reading at once: the oracle answers while it reads, and a full pipe in
        // either direction would otherwise stop both sides.
        scope.spawn(move || {
            let mut writer = BufWriter::new(stdin);
            for input in inputs {
                serde_json::to_writer(&mut writer, input).expect("inputs serialise");
                writer.write_all(b"\n").expect("the oracle reads its input");
            }
            writer.flush().expect("the oracle reads its input");
        });
        BufReader::new(stdout)
            .lines()
            .map(|line| {
                let line = line.expect("the oracle's output is UTF-8");
                serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("oracle answer {line:?} does not decode: {e}"))
            })
            .collect::<Vec<O>>()
    });
    let status = child.wait().expect("the oracle exits");
    assert!(status.success(), "{} exited with {status}", oracle.display());
    assert_eq!(answers.len(), inputs.len(), "the oracle answered every input");
    answers
}

/// The upstream test vectors `extract-vectors` found in one module's `_test.go` files.
#[derive(Debug, Deserialize)]
pub struct Vectors {
    /// Strings found per test file.
    pub files: BTreeMap<String, usize>,
    /// Every distinct string the tests spell out.
    pub inputs: Vec<String>,
    /// Every distinct `map[string]string` literal (label maps, for selectors).
    #[serde(default)]
    pub label_maps: Option<Vec<BTreeMap<String, String>>>,
}

/// Reads `vectors-<name>.json` from the oracle folder.
///
/// # Panics
/// When the file is missing or malformed (build-oracles.sh writes it).
pub fn vectors(dir: &Path, name: &str) -> Vectors {
    let path = dir.join(format!("vectors-{name}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A deterministic random source: the same seed generates the same inputs, so a disagreement
/// is reproducible. `ARCGUARD_CONFORMANCE_SEED` (a number) changes the seed.
pub fn runner() -> TestRunner {
    let seed: u64 = std::env::var("ARCGUARD_CONFORMANCE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x0a4c_9a4d);
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    TestRunner::new_with_rng(Config::default(), TestRng::from_seed(RngAlgorithm::ChaCha, &bytes))
}

/// `count` values drawn from `strategy`.
///
/// # Panics
/// When the strategy cannot generate a value.
pub fn generate<S: Strategy>(runner: &mut TestRunner, strategy: S, count: usize) -> Vec<S::Value> {
    (0..count)
        .map(|_| strategy.new_tree(runner).expect("the strategy generates").current())
        .collect()
}

/// Every input's [`mutations`] (`per_input` each, from a fresh [`runner`]), sorted and without
/// repeats: the mutated vectors both suites compare.
pub fn mutated_inputs(inputs: &[String], alphabet: &[char], per_input: usize) -> Vec<String> {
    let mut runner = runner();
    let mut out: Vec<String> =
        inputs.iter().flat_map(|v| mutations(&mut runner, v, alphabet, per_input)).collect();
    out.sort();
    out.dedup();
    out
}

/// Mutations of a vector: a character deleted, duplicated, case-flipped, or replaced or followed
/// by one of `alphabet`, at positions drawn from `runner`; `per_input` of them.
pub fn mutations(
    runner: &mut TestRunner,
    input: &str,
    alphabet: &[char],
    per_input: usize,
) -> Vec<String> {
    use proptest::prelude::Rng as _;
    let chars: Vec<char> = input.chars().collect();
    let rng = runner.rng();
    let mut out = Vec::with_capacity(per_input);
    for _ in 0..per_input {
        let mut chars = chars.clone();
        let pick = |rng: &mut TestRng, n: usize| (rng.next_u32() as usize) % n.max(1);
        let at = pick(rng, chars.len());
        let other = alphabet[pick(rng, alphabet.len())];
        match rng.next_u32() % 5 {
            0 if !chars.is_empty() => {
                chars.remove(at);
            }
            1 if !chars.is_empty() => chars.insert(at, chars[at]),
            2 if !chars.is_empty() => {
                let c = chars[at];
                chars[at] = if c.is_ascii_lowercase() {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                };
            }
            3 if !chars.is_empty() => chars[at] = other,
            _ => chars.insert(at.min(chars.len()), other),
        }
        out.push(chars.into_iter().collect());
    }
    out
}

/// Disagreements found by a suite, grouped by kind, with a few examples each.
#[derive(Debug, Default)]
pub struct Report {
    /// Inputs compared.
    pub compared: usize,
    /// Agreements per kind of outcome.
    pub agreed: BTreeMap<String, usize>,
    /// Deliberate differences per class (each listed in conformance/README.md).
    pub deliberate: BTreeMap<String, (usize, Vec<String>)>,
    /// Unexplained disagreements per kind.
    pub unexplained: BTreeMap<String, (usize, Vec<String>)>,
}

impl Report {
    /// Records an agreement of the given kind.
    pub fn agree(&mut self, kind: &str) {
        self.compared += 1;
        *self.agreed.entry(kind.to_owned()).or_default() += 1;
    }

    /// Records a deliberate difference of the given class.
    pub fn deliberate(&mut self, class: &str, example: String) {
        self.compared += 1;
        Self::note(&mut self.deliberate, class, example);
    }

    /// Records an unexplained disagreement.
    pub fn unexplained(&mut self, kind: &str, example: String) {
        self.compared += 1;
        Self::note(&mut self.unexplained, kind, example);
    }

    fn note(map: &mut BTreeMap<String, (usize, Vec<String>)>, key: &str, example: String) {
        let entry = map.entry(key.to_owned()).or_default();
        entry.0 += 1;
        if entry.1.len() < 8 {
            entry.1.push(example);
        }
    }

    /// Prints the report (shown by `cargo test -- --nocapture`, and on failure).
    pub fn print(&self, title: &str) {
        println!("{title}: {} compared", self.compared);
        for (kind, n) in &self.agreed {
            println!("  agree    {n:>7}  {kind}");
        }
        for (class, (n, examples)) in &self.deliberate {
            println!("  stricter {n:>7}  {class}  e.g. {:?}", &examples[..examples.len().min(3)]);
        }
        for (kind, (n, examples)) in &self.unexplained {
            println!("  DIFFER   {n:>7}  {kind}");
            for example in examples {
                println!("             {example}");
            }
        }
    }

    /// Fails when any disagreement is unexplained.
    ///
    /// # Panics
    /// With the unexplained disagreements.
    pub fn assert_explained(&self, title: &str) {
        self.print(title);
        let total: usize = self.unexplained.values().map(|(n, _)| n).sum();
        assert!(total == 0, "{title}: {total} unexplained disagreements (listed above)");
    }
}
