//! Cost attribution for one call: the provider's own figure when it sends one, else usage ×
//! the job's price, else (no usage at all) the reservation's estimate.

use crate::pricing::{ModelPrice, Picos, Tier, Usage};

/// Where a call's cost came from, as recorded in the ledger's `cost_source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CostSource {
    /// usage × the job's price table.
    PriceTable,
    /// The provider's reported `usage.cost`.
    Provider,
    /// No usage came back: the estimate reserved before sending.
    Estimate,
    /// Answered from the response cache: nothing was billed.
    Cache,
    /// No answer, nothing billed (rate limited, connection refused).
    None,
}

impl CostSource {
    pub fn as_str(self) -> &'static str {
        match self {
            CostSource::PriceTable => "price_table",
            CostSource::Provider => "provider",
            CostSource::Estimate => "estimate",
            CostSource::Cache => "cache",
            CostSource::None => "none",
        }
    }
}

/// The cost of an answered call.
pub fn answered_cost(
    price: &ModelPrice,
    tier: Tier,
    usage: Option<&Usage>,
    reported_usd: Option<f64>,
    estimate: Picos,
) -> (Picos, CostSource) {
    if let Some(usd) = reported_usd {
        return (Picos::from_usd(usd), CostSource::Provider);
    }
    match usage {
        Some(usage) => (price.cost(usage, tier), CostSource::PriceTable),
        None => (estimate, CostSource::Estimate),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::file::PriceFile;

    #[test]
    fn provider_cost_wins_then_usage_then_estimate() {
        let price = ModelPrice::from_file(&PriceFile { input: 1.0, output: 2.0, cached_input: None, batch_input: None, batch_output: None, encoding: None });
        let usage = Usage { prompt_tokens: 100, completion_tokens: 10, cached_tokens: 0 };
        assert_eq!(answered_cost(&price, Tier::Sync, Some(&usage), Some(0.5), Picos(7)), (Picos::from_usd(0.5), CostSource::Provider));
        assert_eq!(answered_cost(&price, Tier::Sync, Some(&usage), None, Picos(7)), (Picos(120_000_000), CostSource::PriceTable));
        assert_eq!(answered_cost(&price, Tier::Sync, None, None, Picos(7)), (Picos(7), CostSource::Estimate));
    }
}
