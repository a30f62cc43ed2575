//! Prices and cost arithmetic.
//!
//! Money is counted in integer pico-dollars ([`Picos`], 10⁻¹² USD): a price of `p` USD per
//! million tokens is exactly `p × 10⁶` picos per token for any price with up to six decimals, so
//! sums over many calls are exact and the ledger equals usage × price to the last digit.

mod table;

use std::fmt;
use std::ops::{Add, AddAssign, Sub};

use serde::{Deserialize, Serialize};

pub use table::{PriceOrigin, PriceTable};

use crate::job::file::PriceFile;

/// An amount of money in pico-dollars (10⁻¹² USD).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Picos(pub i64);

impl Picos {
    pub const ZERO: Picos = Picos(0);

    /// USD to picos, rounded; NaN is zero and amounts beyond `i64` saturate (use
    /// [`Picos::checked_from_usd`] for a figure that must be plausible).
    pub fn from_usd(usd: f64) -> Self {
        Picos((usd * 1e12).round() as i64)
    }

    /// USD to picos when the amount is a finite, non-negative amount that fits; else `None`.
    pub fn checked_from_usd(usd: f64) -> Option<Self> {
        let picos = (usd * 1e12).round();
        (picos.is_finite() && picos >= 0.0 && picos < i64::MAX as f64).then_some(Picos(picos as i64))
    }

    /// `self × factor`, saturating.
    pub fn saturating_mul(self, factor: i64) -> Picos {
        Picos(self.0.saturating_mul(factor))
    }

    pub fn usd(self) -> f64 {
        self.0 as f64 / 1e12
    }
}

impl Add for Picos {
    type Output = Picos;
    fn add(self, other: Picos) -> Picos {
        Picos(self.0.saturating_add(other.0))
    }
}

impl AddAssign for Picos {
    fn add_assign(&mut self, other: Picos) {
        *self = *self + other;
    }
}

impl Sub for Picos {
    type Output = Picos;
    fn sub(self, other: Picos) -> Picos {
        Picos(self.0.saturating_sub(other.0))
    }
}

impl std::iter::Sum for Picos {
    fn sum<I: Iterator<Item = Picos>>(iter: I) -> Picos {
        iter.fold(Picos::ZERO, Add::add)
    }
}

/// A budget cap for people: cents from a cent up ("$5.00"), and below a cent as many places as
/// it takes ("$0.005", not "$0.00").
pub fn format_usd_cap(usd: f64) -> String {
    if usd >= 0.01 || usd <= 0.0 {
        return format!("${usd:.2}");
    }
    let text = format!("{usd:.8}");
    format!("${}", text.trim_end_matches('0'))
}

impl fmt::Display for Picos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "${:.4}", self.usd())
    }
}

/// Token counts of one call as the provider reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// All input tokens, cached ones included (OpenAI's `prompt_tokens`).
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// The part of `prompt_tokens` served from the provider's prompt cache.
    pub cached_tokens: u64,
}

/// Which price column a call is billed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// The synchronous chat API.
    Sync,
    /// The provider's batch API.
    Batch,
}

/// Prices of one model, in picos per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelPrice {
    pub input: i64,
    pub output: i64,
    pub cached_input: i64,
    pub batch_input: i64,
    pub batch_output: i64,
    /// The price entry gives batch-API prices (else the batch columns repeat the sync ones).
    pub batch_known: bool,
}

fn per_token(usd_per_million: f64) -> i64 {
    (usd_per_million * 1e6).round() as i64
}

impl ModelPrice {
    pub fn from_file(price: &PriceFile) -> Self {
        let input = per_token(price.input);
        let output = per_token(price.output);
        Self {
            input,
            output,
            cached_input: price.cached_input.map(per_token).unwrap_or(input),
            batch_input: price.batch_input.map(per_token).unwrap_or(input),
            batch_output: price.batch_output.map(per_token).unwrap_or(output),
            batch_known: price.batch_input.is_some() || price.batch_output.is_some(),
        }
    }

    pub const FREE: ModelPrice =
        ModelPrice { input: 0, output: 0, cached_input: 0, batch_input: 0, batch_output: 0, batch_known: false };

    /// The exact cost of `usage`, computed in 128 bits: any token counts give a cost between
    /// zero and `i64::MAX` picos (saturated), never a wrapped or negative one.
    pub fn cost(&self, usage: &Usage, tier: Tier) -> Picos {
        let cached = i128::from(usage.cached_tokens.min(usage.prompt_tokens));
        let uncached = i128::from(usage.prompt_tokens) - cached;
        let completion = i128::from(usage.completion_tokens);
        let price = |p: i64| i128::from(p.max(0));
        let picos = match tier {
            Tier::Sync => uncached * price(self.input) + cached * price(self.cached_input) + completion * price(self.output),
            // Batch APIs bill cached input at the batch input price or lower; use the lower.
            Tier::Batch => {
                uncached * price(self.batch_input)
                    + cached * price(self.cached_input.min(self.batch_input))
                    + completion * price(self.batch_output)
            }
        };
        Picos(i64::try_from(picos.max(0)).unwrap_or(i64::MAX))
    }

    /// An upper bound for a call with `prompt_tokens` in and at most `max_output` out.
    pub fn estimate(&self, prompt_tokens: u64, max_output: u64, tier: Tier) -> Picos {
        self.cost(&Usage { prompt_tokens, completion_tokens: max_output, cached_tokens: 0 }, tier)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(input: f64, output: f64) -> ModelPrice {
        ModelPrice::from_file(&PriceFile {
            input,
            output,
            cached_input: Some(input / 4.0),
            batch_input: None,
            batch_output: None,
            encoding: None,
        })
    }

    #[test]
    fn cost_is_exact_in_picos() {
        let p = price(0.10, 0.30);
        let u = Usage { prompt_tokens: 1234, completion_tokens: 567, cached_tokens: 0 };
        // 1234 × 0.10e-6 + 567 × 0.30e-6 = 0.0001234 + 0.0001701 USD
        assert_eq!(p.cost(&u, Tier::Sync), Picos(123_400_000 + 170_100_000));
        let many: Picos = (0..10_000).map(|_| p.cost(&u, Tier::Sync)).sum();
        assert_eq!(many, Picos(10_000 * 293_500_000));
        assert!((many.usd() - 2.935).abs() < 1e-12);
    }

    #[test]
    fn cached_tokens_are_billed_at_the_cached_price() {
        let p = price(2.0, 8.0);
        let u = Usage { prompt_tokens: 1000, completion_tokens: 0, cached_tokens: 400 };
        assert_eq!(p.cost(&u, Tier::Sync), Picos(600 * 2_000_000 + 400 * 500_000));
    }

    #[test]
    fn huge_usage_saturates_and_is_never_negative() {
        let p = price(0.15, 0.60);
        let u = Usage { prompt_tokens: u64::MAX, completion_tokens: 15_372_286_728_092, cached_tokens: 0 };
        assert_eq!(p.cost(&u, Tier::Sync), Picos(i64::MAX));
        let u = Usage { prompt_tokens: 0, completion_tokens: 15_372_286_728_092, cached_tokens: 0 };
        assert_eq!(p.cost(&u, Tier::Sync), Picos(i64::MAX), "15,372,286,728,092 × 600,000 picos passes i64");
        let u = Usage { prompt_tokens: 0, completion_tokens: 15_000_000_000_000, cached_tokens: 0 };
        assert_eq!(p.cost(&u, Tier::Sync), Picos(15_000_000_000_000 * 600_000));
        assert_eq!(Picos::checked_from_usd(1e308), None);
        assert_eq!(Picos::checked_from_usd(-0.01), None);
        assert_eq!(Picos::checked_from_usd(f64::NAN), None);
        assert_eq!(Picos::checked_from_usd(0.5), Some(Picos(500_000_000_000)));
    }

    #[test]
    fn batch_prices_default_to_sync_prices() {
        let p = price(1.0, 1.0);
        let u = Usage { prompt_tokens: 10, completion_tokens: 10, cached_tokens: 0 };
        assert_eq!(p.cost(&u, Tier::Batch), p.cost(&u, Tier::Sync));
    }
}
