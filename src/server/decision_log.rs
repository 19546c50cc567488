//! How many admission decisions reach the log: a denial storm must not write hundreds of
//! megabytes of log (30 s of denials at full speed once wrote 323 MB).
//!
//! Denials, warnings, Audit-policy violations and invalid reviews are logged one line each, up
//! to `per_second` lines in each one-second window; beyond that, the first line of each
//! namespace not yet logged in the window still is (up to four times `per_second` more), so a
//! flood from one namespace does not hide another namespace's denials. The lines beyond are
//! counted, by what they would have said and by namespace (the [`TOP`] busiest named), and said
//! in one summary line when the window closes (at the next decision or the periodic
//! [`DecisionLog::flush`]). Nothing is lost: `arcguard_admission_requests_total` and
//! `arcguard_policy_results_total` count every decision, and where the cluster's audit policy
//! records arcguard's resources at `Metadata` level or above, the kube-apiserver's audit log
//! holds each decision (the response status, and arcguard's `auditAnnotations`). Allows are
//! logged at `debug` and not limited.
//!
//! Kept in the project rather than taken from a rate-limiting crate (`governor`): what is
//! needed is not only allow-or-drop but counts of what was dropped by kind, said once per
//! window; the state is a few integers under a lock taken only for lines that would be
//! logged at `info`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The default number of decision lines logged per second.
pub const DEFAULT_PER_SECOND: u32 = 10;
/// The length of a window.
const WINDOW: Duration = Duration::from_secs(1);
/// Namespaces named in a summary, the busiest first.
pub const TOP: usize = 5;
/// Namespaces counted by name in one summary; the others are counted together.
const NAMESPACES_COUNTED: usize = 64;

/// What a decision line says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Line {
    /// A denied request.
    Denied,
    /// An allowed request with warnings.
    Warned,
    /// An Audit-policy violation of an allowed request.
    AuditViolation,
    /// A request that is not a valid AdmissionReview.
    Invalid,
}

/// Lines not logged, by what they would have said.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Suppressed {
    /// Denials.
    pub denied: u64,
    /// Warnings.
    pub warned: u64,
    /// Audit-policy violations.
    pub audit_violations: u64,
    /// Invalid reviews.
    pub invalid: u64,
    /// The busiest namespaces (at most [`TOP`]) and their lines, most first; `""` for
    /// cluster-scoped objects and invalid reviews, `*` for namespaces beyond those counted.
    pub namespaces: Vec<(String, u64)>,
    /// The time the counts cover.
    pub over: Duration,
}

impl Suppressed {
    /// Lines of every kind.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.denied + self.warned + self.audit_violations + self.invalid
    }
}

#[derive(Debug)]
struct Window {
    started: Instant,
    logged: u32,
    /// Lines logged beyond `per_second` as the first of their namespace in this window.
    extra: u32,
    /// Namespaces with a line logged in this window.
    seen: BTreeSet<String>,
    suppressed: Suppressed,
    /// Lines dropped by namespace since the last summary.
    by_namespace: BTreeMap<String, u64>,
    /// When the lines now counted in `suppressed` began to be dropped.
    since: Option<Instant>,
}

/// The limiter shared by every request of a server.
#[derive(Debug)]
pub struct DecisionLog {
    per_second: u32,
    window: Mutex<Window>,
}

/// What to do with one line: log it or not, and whether a summary of the lines dropped in
/// the window that just closed is due first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admit {
    /// Log the line.
    pub log: bool,
    /// Log this summary first.
    pub summary: Option<Suppressed>,
}

impl DecisionLog {
    /// A limiter logging at most `per_second` decision lines per second (0: none, only the
    /// summaries).
    #[must_use]
    pub fn new(per_second: u32, now: Instant) -> Self {
        let window = Window {
            started: now,
            logged: 0,
            extra: 0,
            seen: BTreeSet::new(),
            suppressed: Suppressed::default(),
            by_namespace: BTreeMap::new(),
            since: None,
        };
        Self { per_second, window: Mutex::new(window) }
    }

    /// Whether to log one `line` about an object in `namespace` (`""`: none) at `now`.
    pub fn admit(&self, line: Line, namespace: &str, now: Instant) -> Admit {
        let Ok(mut window) = self.window.lock() else {
            // A poisoned lock: a panic while holding it; log rather than lose lines.
            return Admit { log: true, summary: None };
        };
        let summary = if now.saturating_duration_since(window.started) >= WINDOW {
            window.started = now;
            window.logged = 0;
            window.extra = 0;
            window.seen.clear();
            take(&mut window, now)
        } else {
            None
        };
        let log = if window.logged < self.per_second {
            window.logged += 1;
            true
        } else if window.extra < self.per_second.saturating_mul(4)
            && !window.seen.contains(namespace)
        {
            window.extra += 1;
            true
        } else {
            false
        };
        if log {
            if window.seen.len() < NAMESPACES_COUNTED && !window.seen.contains(namespace) {
                window.seen.insert(namespace.to_owned());
            }
        } else {
            window.since.get_or_insert(now);
            let counts = &mut window.suppressed;
            *match line {
                Line::Denied => &mut counts.denied,
                Line::Warned => &mut counts.warned,
                Line::AuditViolation => &mut counts.audit_violations,
                Line::Invalid => &mut counts.invalid,
            } += 1;
            let key = if window.by_namespace.len() < NAMESPACES_COUNTED
                || window.by_namespace.contains_key(namespace)
            {
                namespace
            } else {
                "*"
            };
            match window.by_namespace.get_mut(key) {
                Some(count) => *count += 1,
                None => {
                    window.by_namespace.insert(key.to_owned(), 1);
                }
            }
        }
        Admit { log, summary }
    }

    /// The summary of the lines dropped so far, if any, resetting the counts: for a periodic
    /// flush, so the end of a storm is said even when no decision follows it.
    pub fn flush(&self, now: Instant) -> Option<Suppressed> {
        let mut window = self.window.lock().ok()?;
        take(&mut window, now)
    }
}

fn take(window: &mut Window, now: Instant) -> Option<Suppressed> {
    let since = window.since.take()?;
    let mut suppressed = std::mem::take(&mut window.suppressed);
    suppressed.over = now.saturating_duration_since(since);
    let mut namespaces: Vec<(String, u64)> =
        std::mem::take(&mut window.by_namespace).into_iter().collect();
    namespaces.sort_by(|(a, x), (b, y)| y.cmp(x).then_with(|| a.cmp(b)));
    namespaces.truncate(TOP);
    suppressed.namespaces = namespaces;
    (suppressed.total() > 0).then_some(suppressed)
}

/// Logs a summary of dropped decision lines.
pub fn log_summary(suppressed: &Suppressed) {
    let namespaces: Vec<String> =
        suppressed.namespaces.iter().map(|(ns, n)| format!("{ns}={n}")).collect();
    tracing::warn!(
        denied = suppressed.denied,
        warned = suppressed.warned,
        audit_violations = suppressed.audit_violations,
        invalid = suppressed.invalid,
        namespaces = namespaces.join(","),
        over_ms = u64::try_from(suppressed.over.as_millis()).unwrap_or(u64::MAX),
        "admission decisions not logged (over --log-decisions-per-second); arcguard_admission_requests_total counts every one"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storm_logs_the_first_lines_of_each_second_and_counts_the_rest_by_kind() {
        let t0 = Instant::now();
        let log = DecisionLog::new(3, t0);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let first: Vec<bool> = (0..5).map(|i| log.admit(Line::Denied, "evil", at(i)).log).collect();
        assert_eq!(first, [true, true, true, false, false]);
        assert!(!log.admit(Line::Warned, "evil", at(10)).log);
        assert!(!log.admit(Line::AuditViolation, "evil", at(20)).log);
        // A namespace not logged yet in this window still gets its first line.
        assert!(log.admit(Line::Invalid, "", at(30)).log);
        assert!(!log.admit(Line::Invalid, "", at(31)).log);
        // The next window: its first line is logged, after the summary of the last.
        let next = log.admit(Line::Denied, "evil", at(1000));
        assert!(next.log);
        assert_eq!(
            next.summary,
            Some(Suppressed {
                denied: 2,
                warned: 1,
                audit_violations: 1,
                invalid: 1,
                namespaces: vec![("evil".to_owned(), 4), (String::new(), 1)],
                over: Duration::from_millis(997)
            })
        );
        assert_eq!(log.admit(Line::Denied, "evil", at(1001)).summary, None, "said once");
    }

    #[test]
    fn a_quiet_flow_is_never_summarised_and_the_end_of_a_storm_is_flushed() {
        let t0 = Instant::now();
        let log = DecisionLog::new(2, t0);
        for second in 0..5u64 {
            let now = t0 + Duration::from_secs(second);
            assert_eq!(log.admit(Line::Denied, "web", now), Admit { log: true, summary: None });
        }
        assert_eq!(log.flush(t0 + Duration::from_secs(6)), None);
        let storm = t0 + Duration::from_secs(10);
        for i in 0..100 {
            let _ = log.admit(Line::Denied, "evil", storm + Duration::from_millis(i));
        }
        let flushed = log.flush(storm + Duration::from_secs(5)).expect("a summary");
        assert_eq!(flushed.denied, 98);
        assert_eq!(log.flush(storm + Duration::from_secs(6)), None, "counts reset");
    }

    #[test]
    fn zero_lines_per_second_logs_only_summaries() {
        let t0 = Instant::now();
        let log = DecisionLog::new(0, t0);
        assert!(!log.admit(Line::Denied, "web", t0).log);
        assert_eq!(log.flush(t0).map(|s| s.denied), Some(1));
    }

    #[test]
    fn a_flood_from_one_namespace_does_not_hide_the_first_denial_of_another() {
        let t0 = Instant::now();
        let log = DecisionLog::new(2, t0);
        for i in 0..1000 {
            let _ = log.admit(Line::Denied, "evil", t0 + Duration::from_micros(i));
        }
        let victim = t0 + Duration::from_millis(500);
        assert!(log.admit(Line::Denied, "web", victim).log, "the first of its namespace");
        assert!(!log.admit(Line::Denied, "web", victim).log, "not the second");
        // Many namespaces get at most four times the rate more.
        let logged =
            (0..100).filter(|i| log.admit(Line::Denied, &format!("ns-{i}"), victim).log).count();
        assert_eq!(logged, 8 - 1);
        let summary = log.flush(victim).expect("a summary");
        assert_eq!(summary.namespaces[0], ("evil".to_owned(), 998));
        assert_eq!(summary.namespaces.len(), TOP);
    }
}
