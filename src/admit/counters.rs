//! Limit counters: what one reservation asks for ([`Item`]), what the answer is
//! ([`Outcome`]), and the in-memory backend ([`MemoryCounters`]).
//!
//! The Redis backend ([`super::redis`]) implements the same semantics in one Lua script;
//! both are tested against the same cases.
//!
//! ## Semantics
//! - [`Window::Sliding`] (requests or tokens per minute): 1-second buckets. At time `t`
//!   (seconds), `used` is the sum of the buckets `floor(t) - secs ..= floor(t)`. An item
//!   fits when `used + amount <= limit`. Counting one bucket more than the window makes the
//!   guarantee exact: in *any* interval of `secs` seconds, the amounts admitted never exceed
//!   the limit (the last admission inside such an interval counted every bucket it
//!   overlaps). The price is that a request may wait up to one second longer than a
//!   perfect sliding log would make it.
//! - [`Window::Period`] (quotas and budgets): one counter per calendar period; it fits
//!   when `used + amount <= limit`.
//! - A reservation checks every item and charges all of them only if all fit.
//! - When one does not fit, the wait until it would (`retry_after_ms`) is exact for
//!   windows (the time until enough old buckets leave it) and the period's end for
//!   periods; with several refusing items, the longest wait is given.
//! - [`MemoryCounters::adjust`] reconciles: a bucket still inside its window is corrected
//!   (never below 0); an aged-out bucket is left alone for refunds, and extra charges land
//!   in the current bucket.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};

/// How an item's counter is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    /// A sliding window of `secs` seconds (60 for per-minute limits).
    Sliding { secs: u32 },
    /// A calendar period `[start_s, end_s)` in unix seconds.
    Period { start_s: i64, end_s: i64 },
}

/// One limit a reservation must fit, and what it takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Unique within one client: `rpm`, `tpm`, `d:gpt-4o*:tpm`, `s:<subject>:q:<start>`, ...
    pub key: String,
    pub window: Window,
    pub limit: u64,
    pub amount: u64,
}

/// A correction after the real usage is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adjust {
    pub key: String,
    pub window: Window,
    /// The bucket the reservation charged (from [`Admitted::bucket_s`]).
    pub bucket_s: i64,
    pub delta: i64,
}

/// A reservation that fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// The counters' clock when it was taken (unix ms).
    pub now_ms: i64,
    /// The second charged (for [`Adjust::bucket_s`]).
    pub bucket_s: i64,
    /// Per item: `limit - used` after this reservation.
    pub remaining: Vec<u64>,
    /// Per item: ms until everything counted so far has left the window (or the period ends).
    pub reset_ms: Vec<u64>,
}

/// The answer to a reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Admitted(Admitted),
    /// Nothing was charged. `index` is the item that refused (the longest wait).
    Refused {
        index: usize,
        retry_after_ms: u64,
    },
}

/// One sliding window: `(second, amount)` buckets, oldest first, and their sum.
#[derive(Debug, Default)]
struct Sliding {
    buckets: VecDeque<(i64, u64)>,
    total: u64,
}

impl Sliding {
    fn expire(&mut self, now_s: i64, secs: u32) {
        let oldest = now_s - i64::from(secs);
        while let Some(&(b, n)) = self.buckets.front() {
            if b >= oldest {
                break;
            }
            self.total -= n;
            self.buckets.pop_front();
        }
    }

    fn charge(&mut self, bucket: i64, amount: u64) {
        match self.buckets.iter_mut().rev().find(|(b, _)| *b == bucket) {
            Some((_, n)) => *n += amount,
            None => {
                // Buckets are kept in order; a charge is never older than the newest.
                let at = self
                    .buckets
                    .iter()
                    .rposition(|(b, _)| *b < bucket)
                    .map_or(0, |i| i + 1);
                self.buckets.insert(at, (bucket, amount));
            }
        }
        self.total += amount;
    }

    /// Ms from `now_ms` until `amount` more would fit under `limit`.
    fn wait_ms(&self, now_ms: i64, secs: u32, limit: u64, amount: u64) -> u64 {
        let mut used = self.total;
        for &(b, n) in &self.buckets {
            used -= n;
            if used + amount <= limit {
                let at = (b + i64::from(secs) + 1) * 1000;
                return u64::try_from(at - now_ms).unwrap_or(0).max(1);
            }
        }
        // Only reached when `amount > limit`, which callers refuse before reserving.
        u64::from(secs) * 1000
    }

    fn reset_ms(&self, now_ms: i64, secs: u32) -> u64 {
        self.buckets.back().map_or(0, |&(b, _)| {
            u64::try_from((b + i64::from(secs) + 1) * 1000 - now_ms).unwrap_or(0)
        })
    }
}

#[derive(Debug)]
enum Counter {
    Sliding(Sliding),
    Period { end_s: i64, used: u64 },
}

impl Counter {
    fn new(w: Window) -> Self {
        match w {
            Window::Sliding { .. } => Counter::Sliding(Sliding::default()),
            Window::Period { end_s, .. } => Counter::Period { end_s, used: 0 },
        }
    }

    /// Nothing left to remember at `now_s`.
    fn is_idle(&self, now_s: i64) -> bool {
        match self {
            Counter::Sliding(s) => s.buckets.back().is_none_or(|&(b, _)| b < now_s - 3600),
            Counter::Period { end_s, .. } => *end_s <= now_s,
        }
    }
}

/// One client's counters, behind the client's own lock.
#[derive(Debug, Default)]
struct ClientCounters {
    counters: HashMap<String, Counter>,
    /// Prune idle counters (per-subject ones come and go) when the map doubles.
    prune_at: usize,
}

const SHARDS: usize = 16;

/// One shard of the client map.
type Shard = Mutex<HashMap<Arc<str>, Arc<Mutex<ClientCounters>>>>;

/// The in-memory backend: counters per client, each client behind its own mutex (held for a
/// few hundred nanoseconds), clients found through a sharded map. No lock is shared by all
/// requests.
pub struct MemoryCounters {
    shards: [Shard; SHARDS],
    hasher: std::hash::RandomState,
}

impl Default for MemoryCounters {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryCounters {
    pub fn new() -> Self {
        Self {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            hasher: std::hash::RandomState::new(),
        }
    }

    fn client(&self, client: &str) -> Arc<Mutex<ClientCounters>> {
        let shard = &self.shards[(self.hasher.hash_one(client) as usize) % SHARDS];
        let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(client) {
            return c.clone();
        }
        map.entry(Arc::from(client)).or_default().clone()
    }

    /// Check every item and charge all of them if all fit, at the system clock.
    pub fn reserve(&self, client: &str, items: &[Item]) -> Outcome {
        self.reserve_at(now_ms(), client, items)
    }

    /// [`Self::reserve`] at a given time (unix ms), for tests with a controlled clock.
    pub fn reserve_at(&self, now_ms: i64, client: &str, items: &[Item]) -> Outcome {
        let now_s = now_ms.div_euclid(1000);
        let c = self.client(client);
        let mut c = c.lock().unwrap_or_else(|p| p.into_inner());
        let c = &mut *c;
        if c.counters.len() >= c.prune_at.max(1024) {
            c.counters.retain(|_, v| !v.is_idle(now_s));
            c.prune_at = c.counters.len() * 2;
        }
        let mut refused: Option<(usize, u64)> = None;
        for (i, it) in items.iter().enumerate() {
            let wait = match (it.window, c.counters.get_mut(&it.key)) {
                (_, None) => (it.amount > it.limit).then_some(0),
                (Window::Sliding { secs }, Some(Counter::Sliding(s))) => {
                    s.expire(now_s, secs);
                    (s.total + it.amount > it.limit)
                        .then(|| s.wait_ms(now_ms, secs, it.limit, it.amount))
                }
                (Window::Period { end_s, .. }, Some(Counter::Period { end_s: e, used })) => {
                    if *e != end_s {
                        // The key names the period; a different end is a new period.
                        *e = end_s;
                        *used = 0;
                    }
                    (*used + it.amount > it.limit)
                        .then(|| u64::try_from(end_s * 1000 - now_ms).unwrap_or(0).max(1))
                }
                (w, Some(other)) => {
                    // The same key with another window kind: the configuration changed.
                    *other = Counter::new(w);
                    (it.amount > it.limit).then_some(0)
                }
            };
            if let Some(w) = wait {
                if refused.is_none_or(|(_, longest)| w > longest) {
                    refused = Some((i, w));
                }
            }
        }
        if let Some((index, retry_after_ms)) = refused {
            return Outcome::Refused {
                index,
                retry_after_ms,
            };
        }
        let mut remaining = Vec::with_capacity(items.len());
        let mut reset_ms = Vec::with_capacity(items.len());
        for it in items {
            let counter = c
                .counters
                .entry(it.key.clone())
                .or_insert_with(|| Counter::new(it.window));
            match counter {
                Counter::Sliding(s) => {
                    s.charge(now_s, it.amount);
                    remaining.push(it.limit.saturating_sub(s.total));
                    let secs = match it.window {
                        Window::Sliding { secs } => secs,
                        Window::Period { .. } => 60,
                    };
                    reset_ms.push(s.reset_ms(now_ms, secs));
                }
                Counter::Period { end_s, used } => {
                    *used += it.amount;
                    remaining.push(it.limit.saturating_sub(*used));
                    reset_ms.push(u64::try_from(*end_s * 1000 - now_ms).unwrap_or(0));
                }
            }
        }
        Outcome::Admitted(Admitted {
            now_ms,
            bucket_s: now_s,
            remaining,
            reset_ms,
        })
    }

    /// Apply reconciliations (see the module docs).
    pub fn adjust(&self, client: &str, adjusts: &[Adjust]) {
        self.adjust_at(now_ms(), client, adjusts);
    }

    /// [`Self::adjust`] at a given time (unix ms).
    pub fn adjust_at(&self, now_ms: i64, client: &str, adjusts: &[Adjust]) {
        let now_s = now_ms.div_euclid(1000);
        let c = self.client(client);
        let mut c = c.lock().unwrap_or_else(|p| p.into_inner());
        for a in adjusts {
            if a.delta == 0 {
                continue;
            }
            let counter = c
                .counters
                .entry(a.key.clone())
                .or_insert_with(|| Counter::new(a.window));
            match (a.window, counter) {
                (Window::Sliding { secs }, Counter::Sliding(s)) => {
                    s.expire(now_s, secs);
                    let live = a.bucket_s >= now_s - i64::from(secs);
                    if a.delta > 0 {
                        let at = if live { a.bucket_s } else { now_s };
                        s.charge(at, a.delta.unsigned_abs());
                    } else if live {
                        if let Some((_, n)) = s.buckets.iter_mut().find(|(b, _)| *b == a.bucket_s) {
                            let back = a.delta.unsigned_abs().min(*n);
                            *n -= back;
                            s.total -= back;
                        }
                    }
                }
                (Window::Period { end_s, .. }, Counter::Period { end_s: e, used })
                    if *e == end_s =>
                {
                    *used = used.saturating_add_signed(a.delta);
                }
                _ => {}
            }
        }
    }
}

/// The system clock in unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    const MIN: Window = Window::Sliding { secs: 60 };

    fn item(key: &str, window: Window, limit: u64, amount: u64) -> Item {
        Item {
            key: key.into(),
            window,
            limit,
            amount,
        }
    }

    fn admitted(o: Outcome) -> Admitted {
        match o {
            Outcome::Admitted(a) => a,
            Outcome::Refused { .. } => panic!("refused: {o:?}"),
        }
    }

    #[test]
    fn a_window_admits_up_to_its_limit_and_says_when_the_next_fits() {
        let m = MemoryCounters::new();
        let t0 = 1_000_000_000; // ms, on a second boundary
        let a = admitted(m.reserve_at(t0, "c", &[item("tpm", MIN, 100, 60)]));
        assert_eq!(a.remaining, vec![40]);
        assert_eq!(a.reset_ms, vec![61_000]);
        // 0.5 s later, 30 more fit, 50 do not.
        let b = admitted(m.reserve_at(t0 + 500, "c", &[item("tpm", MIN, 100, 30)]));
        assert_eq!(b.remaining, vec![10]);
        let r = m.reserve_at(t0 + 2_300, "c", &[item("tpm", MIN, 100, 50)]);
        // The first 90 are all in the bucket of t0: they leave the window at t0 + 61 s.
        assert_eq!(
            r,
            Outcome::Refused {
                index: 0,
                retry_after_ms: 61_000 - 2_300
            }
        );
        // Just before that it still does not fit; at it, it does.
        assert!(matches!(
            m.reserve_at(t0 + 60_999, "c", &[item("tpm", MIN, 100, 50)]),
            Outcome::Refused { .. }
        ));
        admitted(m.reserve_at(t0 + 61_000, "c", &[item("tpm", MIN, 100, 50)]));
    }

    #[test]
    fn no_interval_of_a_minute_ever_admits_more_than_the_limit() {
        // Admit greedily every 250 ms for five minutes, then check every interval.
        let m = MemoryCounters::new();
        let t0 = 5_000_000_000;
        let mut admitted_at = Vec::new();
        let mut t = t0;
        while t < t0 + 300_000 {
            if let Outcome::Admitted(_) = m.reserve_at(t, "c", &[item("tpm", MIN, 1000, 70)]) {
                admitted_at.push(t);
            }
            t += 250;
        }
        for &start in &admitted_at {
            let n = admitted_at
                .iter()
                .filter(|&&x| x >= start && x < start + 60_000)
                .count() as u64;
            assert!(n * 70 <= 1000, "{n} admissions in the minute from {start}");
        }
        // And the limit is used, not starved: at least 14 of 14 possible per 61 s.
        assert!(admitted_at.len() >= 14 * 4, "{}", admitted_at.len());
    }

    #[test]
    fn a_reservation_charges_all_of_its_items_or_none() {
        let m = MemoryCounters::new();
        let t = 2_000_000_000;
        let q = Window::Period {
            start_s: 1_999_000,
            end_s: 2_003_600,
        };
        admitted(m.reserve_at(t, "c", &[item("q", q, 100, 90)]));
        let r = m.reserve_at(t, "c", &[item("rpm", MIN, 10, 1), item("q", q, 100, 20)]);
        assert_eq!(
            r,
            Outcome::Refused {
                index: 1,
                retry_after_ms: 2_003_600_000 - t as u64
            }
        );
        // The refused reservation took no request from the rpm window.
        let a = admitted(m.reserve_at(t, "c", &[item("rpm", MIN, 10, 1), item("q", q, 100, 10)]));
        assert_eq!(a.remaining, vec![9, 0]);
        // Other clients have their own counters.
        admitted(m.reserve_at(t, "d", &[item("q", q, 100, 100)]));
    }

    #[test]
    fn a_new_period_starts_from_zero() {
        let m = MemoryCounters::new();
        let p1 = Window::Period {
            start_s: 0,
            end_s: 3600,
        };
        let p2 = Window::Period {
            start_s: 3600,
            end_s: 7200,
        };
        admitted(m.reserve_at(1_000, "c", &[item("q:0", p1, 10, 10)]));
        assert!(matches!(
            m.reserve_at(3_599_999, "c", &[item("q:0", p1, 10, 1)]),
            Outcome::Refused { .. }
        ));
        admitted(m.reserve_at(3_600_000, "c", &[item("q:3600", p2, 10, 10)]));
    }

    #[test]
    fn refunds_let_the_next_request_fit_and_extra_charges_count() {
        let m = MemoryCounters::new();
        let t = 3_000_000_000;
        let a = admitted(m.reserve_at(t, "c", &[item("tpm", MIN, 100, 100)]));
        assert!(matches!(
            m.reserve_at(t + 10, "c", &[item("tpm", MIN, 100, 50)]),
            Outcome::Refused { .. }
        ));
        m.adjust_at(
            t + 20,
            "c",
            &[Adjust {
                key: "tpm".into(),
                window: MIN,
                bucket_s: a.bucket_s,
                delta: -60,
            }],
        );
        let b = admitted(m.reserve_at(t + 30, "c", &[item("tpm", MIN, 100, 50)]));
        assert_eq!(b.remaining, vec![10]);
        // An answer longer than reserved is charged (and may push the window over).
        m.adjust_at(
            t + 40,
            "c",
            &[Adjust {
                key: "tpm".into(),
                window: MIN,
                bucket_s: b.bucket_s,
                delta: 30,
            }],
        );
        assert!(matches!(
            m.reserve_at(t + 50, "c", &[item("tpm", MIN, 100, 1)]),
            Outcome::Refused { .. }
        ));
        // A refund for a bucket that already left the window changes nothing.
        m.adjust_at(
            t + 120_000,
            "c",
            &[Adjust {
                key: "tpm".into(),
                window: MIN,
                bucket_s: a.bucket_s,
                delta: -40,
            }],
        );
        let c = admitted(m.reserve_at(t + 120_000, "c", &[item("tpm", MIN, 100, 100)]));
        assert_eq!(c.remaining, vec![0]);
    }

    #[test]
    fn concurrent_reservations_never_exceed_the_limit() {
        let m = Arc::new(MemoryCounters::new());
        let t = 4_000_000_000;
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    let mut got = 0u64;
                    for _ in 0..1000 {
                        if let Outcome::Admitted(_) =
                            m.reserve_at(t, "c", &[item("tpm", MIN, 10_000, 7)])
                        {
                            got += 7;
                        }
                    }
                    got
                })
            })
            .collect();
        let total: u64 = threads.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(total, 10_000 / 7 * 7);
    }

    #[test]
    fn idle_subjects_are_pruned() {
        let m = MemoryCounters::new();
        for i in 0..5000 {
            let key = format!("s:{i}:rpm");
            admitted(m.reserve_at(i64::from(i) * 10_000, "c", &[item(&key, MIN, 5, 1)]));
        }
        let c = m.client("c");
        let n = c.lock().unwrap().counters.len();
        assert!(n < 2100, "{n} counters kept");
    }
}
