//! Calico selectors: arcguard's parser and its Linux scoping against Calico's own parser and
//! evaluator (libcalico-go `lib/selector`).
//!
//! For every input: accepted or rejected by both. For every selector both accept, over label
//! maps generated from its own keys and values, evaluated by Calico:
//! - arcguard's printed form selects exactly what the selector selects (its tree is faithful);
//! - the scoped rewrite (`scope_selector`) selects exactly what the selector selects, minus pods
//!   labelled `<key>: windows` (a missing label counts as not Windows).
//!
//! For every selector Calico rejects, the rewrite is rejected too (wrapping never turns an
//! invalid selector into a valid one). arcguard may be stricter than Calico only in the classes
//! of [`deliberate`] (listed in conformance/README.md), never more permissive.

use std::collections::{BTreeMap, BTreeSet};

use arcguard::rules::calico::selector::{self, Expr, MAX_DEPTH, ParseError};
use arcguard::rules::calico::{DEFAULT_OS_LABEL_KEY, scope_selector};
use arcguard_conformance::{Report, ask, generate, mutated_inputs, oracles, runner, vectors};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use serde::{Deserialize, Serialize};

/// The OS label key the rewrite scopes with.
const KEY: &str = DEFAULT_OS_LABEL_KEY;
/// Label maps evaluated per selector.
const MAPS: usize = 16;
/// Generated selectors per strategy.
const GENERATED: usize = 3_000;
/// Mutations per upstream vector.
const MUTATIONS: usize = 12;

/// Characters mutations insert.
const ALPHABET: &[char] = &[
    'a', 'B', '0', '.', '/', '-', '_', ' ', '\t', '\n', '\'', '"', '(', ')', '{', '}', ',', '=',
    '!', '&', '|', 'é',
];

/// One request to selector-oracle.
#[derive(Serialize)]
struct Request<'a> {
    selector: &'a str,
    labels: &'a [BTreeMap<String, String>],
}

/// selector-oracle's answer.
#[derive(Debug, Deserialize)]
struct Answer {
    ok: bool,
    #[serde(default)]
    error: String,
    #[serde(default)]
    matches: Vec<bool>,
    #[serde(default)]
    panic: String,
}

/// Why arcguard rejects a selector Calico accepts, if on purpose.
fn deliberate(ours: &ParseError) -> Option<&'static str> {
    match ours {
        ParseError::TooDeep { .. } => Some("parentheses nested deeper than MAX_DEPTH"),
        _ => None,
    }
}

/// Label keys and values a selector reads.
fn words(expr: &Expr, keys: &mut BTreeSet<String>, values: &mut BTreeSet<String>) {
    match expr {
        Expr::All | Expr::Global => {}
        Expr::Has(key) => {
            keys.insert(key.clone());
        }
        Expr::Compare { key, value, .. } => {
            keys.insert(key.clone());
            values.insert(value.clone());
            // Near misses for contains, starts with and ends with.
            values.insert(format!("x{value}"));
            values.insert(format!("{value}x"));
        }
        Expr::In { key, values: set } | Expr::NotIn { key, values: set } => {
            keys.insert(key.clone());
            values.extend(set.iter().cloned());
        }
        Expr::Not(inner) => words(inner, keys, values),
        Expr::And(terms) | Expr::Or(terms) => {
            for term in terms {
                words(term, keys, values);
            }
        }
    }
}

/// Label maps over the selector's own keys and values, the OS label absent, `linux`, `windows`
/// or something else in turn; plus the upstream vectors' label maps.
fn label_maps(
    runner: &mut TestRunner,
    expr: Option<&Expr>,
    upstream: &[BTreeMap<String, String>],
) -> Vec<BTreeMap<String, String>> {
    use proptest::prelude::Rng as _;
    let mut keys = BTreeSet::from(["app".to_owned()]);
    let mut values = BTreeSet::from(["".to_owned(), "web".to_owned()]);
    if let Some(expr) = expr {
        words(expr, &mut keys, &mut values);
    }
    keys.remove(KEY);
    let keys: Vec<String> = keys.into_iter().collect();
    let values: Vec<String> = values.into_iter().collect();
    let os = [None, Some("linux"), Some("windows"), Some("Windows"), Some("")];
    let rng = runner.rng();
    let mut maps: Vec<BTreeMap<String, String>> = (0..MAPS)
        .map(|i| {
            let mut map = BTreeMap::new();
            for key in &keys {
                if !rng.next_u32().is_multiple_of(3) {
                    let value = &values[(rng.next_u32() as usize) % values.len()];
                    map.insert(key.clone(), value.clone());
                }
            }
            if let Some(os) = os[i % os.len()] {
                map.insert(KEY.to_owned(), os.to_owned());
            }
            map
        })
        .collect();
    maps.extend(upstream.iter().cloned());
    maps
}

/// What Calico must answer for the rewrite, given its answers for the original.
fn scoped_expectation(original: &[bool], maps: &[BTreeMap<String, String>]) -> Vec<bool> {
    original
        .iter()
        .zip(maps)
        .map(|(&selected, labels)| {
            selected && labels.get(KEY).map(String::as_str) != Some("windows")
        })
        .collect()
}

fn run(title: &str, selectors: &[String], upstream_maps: &[BTreeMap<String, String>]) -> Report {
    let Some(dir) = oracles() else { return Report::default() };
    let oracle = dir.join("selector-oracle");
    let mut runner = runner();
    let ours: Vec<Result<Expr, ParseError>> =
        selectors.iter().map(|s| selector::parse(s)).collect();
    let maps: Vec<Vec<BTreeMap<String, String>>> = ours
        .iter()
        .map(|parsed| label_maps(&mut runner, parsed.as_ref().ok(), upstream_maps))
        .collect();
    let printed: Vec<Option<String>> =
        ours.iter().map(|parsed| parsed.as_ref().ok().map(ToString::to_string)).collect();
    let scoped: Vec<String> = selectors.iter().map(|s| scope_selector(s, KEY)).collect();
    // One batch: each selector, its printed form (or the selector again) and its rewrite.
    let mut requests = Vec::with_capacity(selectors.len() * 3);
    for (i, selector) in selectors.iter().enumerate() {
        requests.push(Request { selector, labels: &maps[i] });
        requests.push(Request {
            selector: printed[i].as_deref().unwrap_or(selector),
            labels: &maps[i],
        });
        requests.push(Request { selector: &scoped[i], labels: &maps[i] });
    }
    let answers: Vec<Answer> = ask(&oracle, &requests);
    let mut report = Report::default();
    for (i, selector) in selectors.iter().enumerate() {
        let [theirs, reprinted, rewritten] =
            [&answers[3 * i], &answers[3 * i + 1], &answers[3 * i + 2]];
        for answer in [theirs, reprinted, rewritten] {
            if !answer.panic.is_empty() {
                report
                    .unexplained("the oracle panicked", format!("{selector:?}: {}", answer.panic));
            }
        }
        match (&ours[i], theirs.ok) {
            (Err(_), false) => {
                if rewritten.ok {
                    report.unexplained(
                        "the rewrite of a selector Calico rejects is accepted by Calico",
                        format!("{selector:?} became {:?}", scoped[i]),
                    );
                } else {
                    report.agree("both reject");
                }
            }
            (Ok(expr), false) => report.unexplained(
                "arcguard accepts what Calico rejects",
                format!("{selector:?}: ours {expr}, Calico: {}", theirs.error),
            ),
            (Err(why), true) => match deliberate(why) {
                Some(class) => report.deliberate(class, format!("{selector:.60?}")),
                None => report.unexplained(
                    "arcguard rejects what Calico accepts",
                    format!("{selector:?}: ours {why}"),
                ),
            },
            (Ok(_), true) => {
                let expected = scoped_expectation(&theirs.matches, &maps[i]);
                if !reprinted.ok || reprinted.matches != theirs.matches {
                    report.unexplained(
                        "arcguard's printed selector selects differently",
                        format!("{selector:?} printed as {:?}", printed[i]),
                    );
                } else if !rewritten.ok || rewritten.matches != expected {
                    let first = rewritten
                        .matches
                        .iter()
                        .zip(&expected)
                        .position(|(a, b)| a != b)
                        .map(|at| &maps[i][at]);
                    report.unexplained(
                        "the rewrite selects other than the selector minus Windows pods",
                        format!(
                            "{selector:?} became {:?} ({}); first differing labels {first:?}",
                            scoped[i],
                            if rewritten.ok { "accepted" } else { rewritten.error.as_str() }
                        ),
                    );
                } else if selector::parse(&scoped[i]).is_err() {
                    report.unexplained(
                        "arcguard cannot parse its own rewrite",
                        format!("{selector:.80?} became {:.80?}", scoped[i]),
                    );
                } else {
                    report.agree("both accept; printed form and rewrite select as they should");
                }
            }
        }
    }
    report.assert_explained(title);
    report
}

/// Selector-shaped text: tokens of every kind, with the blanks and near-misses the tokenizer
/// treats specially (newlines inside `has( )`, `not\tin`, words glued to operators).
fn token_soup() -> impl Strategy<Value = String> {
    let token = prop::sample::select(vec![
        "a",
        "b.c/d-e_f",
        KEY,
        "in",
        "has",
        "all",
        "not",
        "!",
        "==",
        "!=",
        " in ",
        " not in ",
        "notin",
        " not\tin ",
        " contains ",
        " starts with ",
        " startswith ",
        " ends\twith ",
        "'x'",
        "\"y\"",
        "'linux'",
        "'windows'",
        "''",
        "(",
        ")",
        "{",
        "}",
        ",",
        "has(a)",
        "has( a )",
        "has(\na)",
        "has(\ra\n)",
        "all()",
        "all( )",
        "all(\n)",
        "global()",
        "global(\t)",
        "&&",
        "||",
        " ",
        "\t",
        "\n",
        "\r",
        "é",
        "in{",
        "'a\nb'",
    ]);
    prop::collection::vec(token, 0..14).prop_map(|tokens| tokens.concat())
}

/// Mostly valid selectors with random blanks, built from terms, `&&`, `||`, `!` and parentheses.
fn structured() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec!["app", "tier", KEY, "a.b/c", "in", "x-y_z"]);
    let value = prop::sample::select(vec!["web", "db", "linux", "windows", "", "it's", "w"]);
    let blank = prop::sample::select(vec!["", " ", "  ", "\t"]);
    let leaf = (key.clone(), value.clone(), 0usize..9, value.clone(), blank.clone()).prop_map(
        |(key, value, op, other, b)| {
            let q = |v: &str| if v.contains('\'') { format!("\"{v}\"") } else { format!("'{v}'") };
            match op {
                0 => format!("{key}{b}=={b}{}", q(value)),
                1 => format!("{key}{b}!={b}{}", q(value)),
                2 => format!("{key} in {{{}, {}}}", q(value), q(other)),
                3 => format!("{key} not in {{{}}}", q(value)),
                4 => format!("{key} contains {}", q(value)),
                5 => format!("{key} starts with {}", q(value)),
                6 => format!("{key} ends with {}", q(value)),
                7 => format!("has({b}{key}{b})"),
                _ => {
                    if value.is_empty() {
                        "all()".to_owned()
                    } else {
                        "global()".to_owned()
                    }
                }
            }
        },
    );
    leaf.prop_recursive(5, 24, 3, move |inner| {
        prop_oneof![
            inner.clone().prop_map(|e| format!("!{e}")),
            inner.clone().prop_map(|e| format!("({e})")),
            inner.clone().prop_map(|e| format!("!({e})")),
            prop::collection::vec(inner.clone(), 2..4).prop_map(|t| t.join(" && ")),
            prop::collection::vec(inner, 2..4).prop_map(|t| t.join(" || ")),
        ]
    })
}

/// Label keys around Calico's 512-byte limit, in every position a key can take.
fn long_labels() -> impl Strategy<Value = String> {
    (505usize..520, 0usize..6, "[a-z]{0,3}").prop_map(|(len, form, tail)| {
        let key = "k".repeat(len);
        match form {
            0 => format!("{key} == 'x'"),
            1 => format!("has({key})"),
            2 => format!("{key}in {{'x'}}"),
            3 => format!("{key}{tail} == 'x'"),
            4 => format!("a == 'x' && !has({key})"),
            _ => format!("{key} not in {{}}"),
        }
    })
}

/// Parentheses nested around the depth limit, bare and under operators.
fn deep() -> Vec<String> {
    let mut out = Vec::new();
    for depth in MAX_DEPTH - 2..=MAX_DEPTH + 2 {
        let (open, close) = ("(".repeat(depth), ")".repeat(depth));
        out.push(format!("{open}a == 'x'{close}"));
        out.push(format!("{open}a == 'x'{close} && b == 'y'"));
        out.push(format!("!{open}a == 'x' || has(b){close}"));
        out.push(format!("{}a == 'x'{}", "(!".repeat(depth), ")".repeat(depth)));
    }
    out
}

#[test]
fn upstream_vectors_agree_with_calico() {
    let Some(dir) = oracles() else { return };
    let vectors = vectors(&dir, "selector");
    println!("vectors per upstream file: {:?}", vectors.files);
    let maps = vectors.label_maps.unwrap_or_default();
    let report = run("Calico selector test vectors", &vectors.inputs, &maps);
    assert!(report.compared >= 250, "only {} vectors", report.compared);
}

#[test]
fn mutated_vectors_agree_with_calico() {
    let Some(dir) = oracles() else { return };
    let vectors = vectors(&dir, "selector");
    let inputs = mutated_inputs(&vectors.inputs, ALPHABET, MUTATIONS);
    run("mutated Calico selector vectors", &inputs, &[]);
}

#[test]
fn generated_selectors_agree_with_calico() {
    let mut runner = runner();
    let mut inputs = generate(&mut runner, structured(), GENERATED);
    inputs.extend(generate(&mut runner, token_soup(), GENERATED));
    inputs.extend(generate(&mut runner, long_labels(), GENERATED / 20));
    inputs.extend(generate(&mut runner, any::<String>(), GENERATED / 10));
    inputs.extend(deep());
    run("generated selectors", &inputs, &[]);
}

#[test]
fn a_selector_at_the_depth_limit_survives_the_rewrite() {
    let at_limit = format!("{}a == 'x'{}", "(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
    assert!(selector::parse(&at_limit).is_ok());
    let scoped = scope_selector(&at_limit, KEY);
    assert_ne!(scoped, at_limit);
    assert!(selector::parse(&scoped).is_ok(), "the rewrite of a selector at the limit parses");
    let beyond = format!("{}a == 'x'{}", "(".repeat(MAX_DEPTH + 1), ")".repeat(MAX_DEPTH + 1));
    assert!(matches!(selector::parse(&beyond), Err(ParseError::TooDeep { .. })));
}
