//! How many admission decisions reach the log: a denial storm must not write hundreds of
//! megabytes of log (30 s of denials at full speed once wrote 323 MB).
//!
//! Denials, warnings and Audit-policy violations are logged at `info` one line each, up to
//! `per_second` lines in each one-second window; the lines beyond are counted, by what they
//! would have said, and said in one summary line when the window closes (at the next decision
//! or the periodic [`DecisionLog::flush`]). Nothing is lost: `arcguard_requests_total` and
//! `arcguard_policy_results_total` count every decision, and the kube-apiserver's audit log
//! holds each one (the response status, and arcguard's `auditAnnotations`). Allows are logged at
//! `debug` and not limited.
//!
//! Kept in the project rather than taken from a rate-limiting crate (`governor`): what is
//! needed is not only allow-or-drop but counts of what was dropped by kind, said once per
//! window; the state is a few integers under a lock taken only for lines that would be
//! logged at `info`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The default number of decision lines logged per second.
pub const DEFAULT_PER_SECOND: u32 = 10;
/// The length of a window.
const WINDOW: Duration = Duration::from_secs(1);

/// What a decision line says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Line {
    /// A denied request.
    Denied,
    /// An allowed request with warnings.
    Warned,
    /// An Audit-policy violation of an allowed request.
    AuditViolation,
}

/// Lines not logged, by what they would have said.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Suppressed {
    /// Denials.
    pub denied: u64,
    /// Warnings.
    pub warned: u64,
    /// Audit-policy violations.
    pub audit_violations: u64,
    /// The time the counts cover.
    pub over: Duration,
}

impl Suppressed {
    /// Lines of every kind.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.denied + self.warned + self.audit_violations
    }
}

#[derive(Debug)]
struct Window {
    started: Instant,
    logged: u32,
    suppressed: Suppressed,
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
        let window =
            Window { started: now, logged: 0, suppressed: Suppressed::default(), since: None };
        Self { per_second, window: Mutex::new(window) }
    }

    /// Whether to log one `line` at `now`.
    pub fn admit(&self, line: Line, now: Instant) -> Admit {
        let Ok(mut window) = self.window.lock() else {
            // A poisoned lock: a panic while holding it; log rather than lose lines.
            return Admit { log: true, summary: None };
        };
        let summary = if now.saturating_duration_since(window.started) >= WINDOW {
            window.started = now;
            window.logged = 0;
            take(&mut window, now)
        } else {
            None
        };
        let log = window.logged < self.per_second;
        if log {
            window.logged += 1;
        } else {
            window.since.get_or_insert(now);
            let counts = &mut window.suppressed;
            *match line {
                Line::Denied => &mut counts.denied,
                Line::Warned => &mut counts.warned,
                Line::AuditViolation => &mut counts.audit_violations,
            } += 1;
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
    (suppressed.total() > 0).then_some(suppressed)
}

/// Logs a summary of dropped decision lines.
pub fn log_summary(suppressed: &Suppressed) {
    tracing::info!(
        denied = suppressed.denied,
        warned = suppressed.warned,
        audit_violations = suppressed.audit_violations,
        over_ms = u64::try_from(suppressed.over.as_millis()).unwrap_or(u64::MAX),
        "admission decisions not logged (over --log-decisions-per-second); arcguard_requests_total counts every one and the kube-apiserver's audit log holds each"
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
        let first: Vec<bool> = (0..5).map(|i| log.admit(Line::Denied, at(i)).log).collect();
        assert_eq!(first, [true, true, true, false, false]);
        assert!(!log.admit(Line::Warned, at(10)).log);
        assert!(!log.admit(Line::AuditViolation, at(20)).log);
        // The next window: its first line is logged, after the summary of the last.
        let next = log.admit(Line::Denied, at(1000));
        assert!(next.log);
        assert_eq!(
            next.summary,
            Some(Suppressed {
                denied: 2,
                warned: 1,
                audit_violations: 1,
                over: Duration::from_millis(997)
            })
        );
        assert_eq!(log.admit(Line::Denied, at(1001)).summary, None, "said once");
    }

    #[test]
    fn a_quiet_flow_is_never_summarised_and_the_end_of_a_storm_is_flushed() {
        let t0 = Instant::now();
        let log = DecisionLog::new(2, t0);
        for second in 0..5u64 {
            let now = t0 + Duration::from_secs(second);
            assert_eq!(log.admit(Line::Denied, now), Admit { log: true, summary: None });
        }
        assert_eq!(log.flush(t0 + Duration::from_secs(6)), None);
        let storm = t0 + Duration::from_secs(10);
        for i in 0..100 {
            let _ = log.admit(Line::Denied, storm + Duration::from_millis(i));
        }
        let flushed = log.flush(storm + Duration::from_secs(5)).expect("a summary");
        assert_eq!(flushed.denied, 98);
        assert_eq!(log.flush(storm + Duration::from_secs(6)), None, "counts reset");
    }

    #[test]
    fn zero_lines_per_second_logs_only_summaries() {
        let t0 = Instant::now();
        let log = DecisionLog::new(0, t0);
        assert!(!log.admit(Line::Denied, t0).log);
        assert_eq!(log.flush(t0).map(|s| s.denied), Some(1));
    }
}
