//! Prices per deployment (`[prices."<glob>"]`) and the cost of a request's tokens.
//!
//! A leaf helper: admission prices its estimate to reserve against budgets, accounting
//! prices the real usage. Costs are kept in micro-USD (integers) for counters; the most
//! specific glob wins (an exact name over a glob; among globs, the longest pattern).

use wildmatch::WildMatch;

use crate::config::limits::{PriceConfig, Prices};

/// USD per 1M tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input: f64,
    pub cached_input: f64,
    pub output: f64,
}

/// Token counts to price.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    /// All prompt tokens, cached ones included.
    pub prompt: u64,
    pub cached: u64,
    /// Output tokens, reasoning included.
    pub completion: u64,
}

impl Price {
    fn from_config(p: &PriceConfig) -> Self {
        Self {
            input: p.input,
            cached_input: p.cached_input.unwrap_or(p.input),
            output: p.output,
        }
    }

    /// Cost in USD.
    pub fn usd(&self, t: Tokens) -> f64 {
        let cached = t.cached.min(t.prompt);
        ((t.prompt - cached) as f64 * self.input
            + cached as f64 * self.cached_input
            + t.completion as f64 * self.output)
            / 1e6
    }
}

/// Micro-USD, rounded up (a budget is never undercharged by rounding).
pub fn micro_usd(usd: f64) -> u64 {
    if usd.is_finite() && usd > 0.0 {
        (usd * 1e6).ceil() as u64
    } else {
        0
    }
}

/// The compiled `[prices]` table.
#[derive(Debug, Default)]
pub struct PriceTable {
    /// Most specific first.
    entries: Vec<(String, WildMatch, Price)>,
}

impl PriceTable {
    pub fn new(prices: &Prices) -> Self {
        let mut entries: Vec<_> = prices
            .iter()
            .map(|(g, p)| (g.clone(), WildMatch::new(g), Price::from_config(p)))
            .collect();
        let is_glob = |g: &str| g.contains(['*', '?']);
        entries.sort_by(|a, b| {
            is_glob(&a.0)
                .cmp(&is_glob(&b.0))
                .then(b.0.len().cmp(&a.0.len()))
                .then(a.0.cmp(&b.0))
        });
        Self { entries }
    }

    /// The price of `deployment`, if any glob matches it.
    pub fn price(&self, deployment: &str) -> Option<Price> {
        self.entries
            .iter()
            .find(|(_, m, _)| m.matches(deployment))
            .map(|(_, _, p)| *p)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn table() -> PriceTable {
        let prices: Prices = toml::from_str(
            r#"
            "gpt-4o*" = { input = 2.5, cached_input = 1.25, output = 10.0 }
            "gpt-4o-mini" = { input = 0.15, output = 0.6 }
            "*" = { input = 1.0, output = 1.0 }
            "#,
        )
        .unwrap();
        PriceTable::new(&prices)
    }

    #[test]
    fn the_most_specific_price_wins() {
        let t = table();
        assert_eq!(t.price("gpt-4o-mini").unwrap().input, 0.15);
        assert_eq!(t.price("gpt-4o-2024").unwrap().input, 2.5);
        assert_eq!(t.price("other").unwrap().input, 1.0);
        assert!(PriceTable::default().price("gpt-4o").is_none());
    }

    #[test]
    fn costs_count_cached_and_output_tokens_at_their_prices() {
        let p = table().price("gpt-4o").unwrap();
        let usd = p.usd(Tokens {
            prompt: 1_000_000,
            cached: 400_000,
            completion: 100_000,
        });
        // 600k × 2.5 + 400k × 1.25 + 100k × 10, per 1M.
        assert!((usd - (1.5 + 0.5 + 1.0)).abs() < 1e-9, "{usd}");
        assert_eq!(micro_usd(usd), 3_000_000);
        assert_eq!(micro_usd(0.000_000_1), 1, "rounded up");
        let mini = table().price("gpt-4o-mini").unwrap();
        assert_eq!(mini.cached_input, 0.15, "cached defaults to input");
    }
}
