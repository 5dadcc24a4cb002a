//! Calendar periods in UTC for quotas and budgets: the period holding a moment, as
//! `[start, end)` in unix seconds.
//!
//! Hours and days are what they say; weeks start on Monday 00:00 UTC (ISO 8601); months on
//! the 1st at 00:00 UTC. Boundaries follow the gateway's clock (the counters themselves may
//! live in Redis): replicas whose clocks differ by a few milliseconds switch periods that
//! much apart.

use time::{Date, Month, OffsetDateTime, Time};

use crate::config::limits::Period;

/// The period of kind `p` that holds `unix_s`: `(start_s, end_s)`.
pub fn bounds(p: Period, unix_s: i64) -> (i64, i64) {
    let Ok(at) = OffsetDateTime::from_unix_timestamp(unix_s) else {
        return (unix_s, unix_s + 3600);
    };
    let day_start = |d: Date| d.with_time(Time::MIDNIGHT).assume_utc().unix_timestamp();
    match p {
        Period::Hour => {
            let start = unix_s - unix_s.rem_euclid(3600);
            (start, start + 3600)
        }
        Period::Day => {
            let start = day_start(at.date());
            (start, start + 86_400)
        }
        Period::Week => {
            let back = i64::from(at.weekday().number_days_from_monday());
            let start = day_start(at.date()) - back * 86_400;
            (start, start + 7 * 86_400)
        }
        Period::Month => {
            let (y, m) = (at.year(), at.month());
            let first = Date::from_calendar_date(y, m, 1).map(day_start);
            let next = if m == Month::December {
                Date::from_calendar_date(y + 1, Month::January, 1)
            } else {
                Date::from_calendar_date(y, m.next(), 1)
            }
            .map(day_start);
            match (first, next) {
                (Ok(a), Ok(b)) => (a, b),
                _ => (unix_s, unix_s + 86_400),
            }
        }
    }
}

/// RFC 3339 text of a unix time (for messages: "resets at 2027-01-01T00:00:00Z").
pub fn rfc3339(unix_s: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix_s)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix_s.to_string())
}

/// The name used in counter keys and messages.
pub fn name(p: Period) -> &'static str {
    match p {
        Period::Hour => "hour",
        Period::Day => "day",
        Period::Week => "week",
        Period::Month => "month",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-06T22:30:15Z, a Sunday.
    const T: i64 = 1_796_596_215;

    #[test]
    fn periods_are_calendar_aligned_in_utc() {
        assert_eq!(rfc3339(T), "2026-12-06T22:30:15Z");
        let show = |p| {
            let (a, b) = bounds(p, T);
            (rfc3339(a), rfc3339(b))
        };
        assert_eq!(
            show(Period::Hour),
            ("2026-12-06T22:00:00Z".into(), "2026-12-06T23:00:00Z".into())
        );
        assert_eq!(
            show(Period::Day),
            ("2026-12-06T00:00:00Z".into(), "2026-12-07T00:00:00Z".into())
        );
        assert_eq!(
            show(Period::Week),
            ("2026-11-30T00:00:00Z".into(), "2026-12-07T00:00:00Z".into())
        );
        assert_eq!(
            show(Period::Month),
            ("2026-12-01T00:00:00Z".into(), "2027-01-01T00:00:00Z".into())
        );
    }

    #[test]
    fn boundaries_roll_over() {
        for p in [Period::Hour, Period::Day, Period::Week, Period::Month] {
            let (a, b) = bounds(p, T);
            assert_eq!(bounds(p, b - 1), (a, b), "{p:?} last second");
            let (c, _) = bounds(p, b);
            assert_eq!(c, b, "{p:?} next period starts at the end");
            assert_eq!(bounds(p, a).0, a);
        }
        // February of a leap year, and a week across a month end.
        let feb = bounds(Period::Month, 1_709_251_199); // 2024-02-29T23:59:59Z
        assert_eq!(rfc3339(feb.0), "2024-02-01T00:00:00Z");
        assert_eq!(rfc3339(feb.1), "2024-03-01T00:00:00Z");
    }
}
