//! Refusals and errors of this replica, per minute over the last 24 hours: what the
//! dashboard's "refusals and errors by reason" shows.
//!
//! Fed by the audit sink with every request answered with a status of 400 or more (the
//! gateway's own error code, or `backend_error` for an error the backend answered), so a
//! successful request costs one comparison and nothing else. Kept in memory: each replica
//! counts its own, since it started (usage, in the store, is what all replicas share).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::SystemTime;

/// Minutes kept.
const MINUTES: i64 = 24 * 60;

/// The reason `count` gives an error the backend answered (no gateway error code).
pub const BACKEND_ERROR: &str = "backend_error";

/// One reason's count in a window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReasonCount {
    pub code: &'static str,
    pub status: u16,
    pub count: u64,
}

/// Counts by `(code, status)`.
type Counts = HashMap<(&'static str, u16), u64>;

/// This replica's refusals and errors.
#[derive(Debug)]
pub struct Activity {
    started: SystemTime,
    /// `(minute since the epoch, counts by reason)`, oldest first.
    minutes: Mutex<VecDeque<(i64, Counts)>>,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            started: SystemTime::now(),
            minutes: Mutex::default(),
        }
    }
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Activity {
    /// When this replica started counting.
    pub fn started(&self) -> SystemTime {
        self.started
    }

    /// Count one answer with `status` and the gateway's error `code` (or [`BACKEND_ERROR`]).
    pub fn count(&self, code: &'static str, status: u16) {
        self.count_at(unix_ms(SystemTime::now()), code, status);
    }

    pub(crate) fn count_at(&self, now_ms: i64, code: &'static str, status: u16) {
        let minute = now_ms.div_euclid(60_000);
        let mut minutes = self.minutes.lock().unwrap_or_else(|e| e.into_inner());
        while minutes.front().is_some_and(|(m, _)| *m <= minute - MINUTES) {
            minutes.pop_front();
        }
        if minutes.back().is_none_or(|(m, _)| *m < minute) {
            minutes.push_back((minute, HashMap::new()));
        }
        // A clock stepped back counts into the newest minute.
        if let Some((_, counts)) = minutes.back_mut() {
            *counts.entry((code, status)).or_default() += 1;
        }
    }

    /// Counts by reason from `since_ms` (rounded down to its minute; at most 24 hours
    /// back) to now, largest first, then by code and status.
    pub fn since(&self, since_ms: i64) -> Vec<ReasonCount> {
        self.since_at(unix_ms(SystemTime::now()), since_ms)
    }

    pub(crate) fn since_at(&self, now_ms: i64, since_ms: i64) -> Vec<ReasonCount> {
        let first = since_ms
            .div_euclid(60_000)
            .max(now_ms.div_euclid(60_000) - MINUTES + 1);
        let mut sum = Counts::new();
        let minutes = self.minutes.lock().unwrap_or_else(|e| e.into_inner());
        for (_, counts) in minutes.iter().filter(|(m, _)| *m >= first) {
            for (k, n) in counts {
                *sum.entry(*k).or_default() += n;
            }
        }
        drop(minutes);
        let mut out: Vec<ReasonCount> = sum
            .into_iter()
            .map(|((code, status), count)| ReasonCount {
                code,
                status,
                count,
            })
            .collect();
        out.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then(a.code.cmp(b.code))
                .then(a.status.cmp(&b.status))
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    #[test]
    fn counts_by_reason_within_the_window_asked() {
        let a = Activity::default();
        let t0 = 1_800_000_000_000;
        a.count_at(t0, "rate_limit_exceeded", 429);
        a.count_at(t0 + 1, "rate_limit_exceeded", 429);
        a.count_at(t0 + 2 * MIN, "invalid_api_key", 401);
        a.count_at(t0 + 3 * MIN, BACKEND_ERROR, 503);
        a.count_at(t0 + 3 * MIN, BACKEND_ERROR, 400);
        let all = a.since_at(t0 + 3 * MIN, t0 - 10 * MIN);
        assert_eq!(
            all,
            vec![
                ReasonCount {
                    code: "rate_limit_exceeded",
                    status: 429,
                    count: 2
                },
                ReasonCount {
                    code: BACKEND_ERROR,
                    status: 400,
                    count: 1
                },
                ReasonCount {
                    code: BACKEND_ERROR,
                    status: 503,
                    count: 1
                },
                ReasonCount {
                    code: "invalid_api_key",
                    status: 401,
                    count: 1
                },
            ]
        );
        let recent = a.since_at(t0 + 3 * MIN, t0 + 2 * MIN);
        assert_eq!(recent.iter().map(|r| r.count).sum::<u64>(), 3);
    }

    #[test]
    fn forgets_what_is_older_than_a_day() {
        let a = Activity::default();
        let t0 = 1_800_000_000_000;
        a.count_at(t0, "quota_exceeded", 403);
        let later = t0 + 24 * 60 * MIN;
        a.count_at(later, "budget_exceeded", 403);
        let all = a.since_at(later, 0);
        assert_eq!(all.len(), 1, "{all:?}");
        assert_eq!(all[0].code, "budget_exceeded");
        assert_eq!(a.minutes.lock().unwrap().len(), 1);
    }
}
