//! One optimised tract plan per padded sequence length, compiled on first use and shared by
//! all threads.
//!
//! With the sequence length left symbolic, tract cannot prove that elementwise operands are
//! large enough for its SIMD by-scalar and unicast kernels (it needs the element count as a
//! number), so GELU's multiply/add chain, bias and residual adds run through a generic
//! broadcasting loop: on all-MiniLM-L6-v2 that cost about 40 % on top of the matrix products.
//! Binding the sequence length (the batch size stays symbolic, asserted ≥ 1) lets those
//! kernels in. Padded lengths come from the batch planner in steps of `length_bucket`, so a
//! job compiles at most `max_length / length_bucket` plans (each ~1 s at load, and its own
//! packed copy of the weights).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use tract_onnx::prelude::*;

/// A compiled plan, or why it could not be compiled.
type PlanSlot = Arc<OnceLock<Result<Arc<TypedRunnableModel>, String>>>;

/// The plans of one model, by padded length.
#[derive(Debug)]
pub struct PlanCache {
    /// Decluttered, constant-folded model with a symbolic sequence length.
    symbolic: TypedModel,
    /// The sequence-length symbol to bind; `None`: the model keeps one symbolic plan.
    sequence: Option<Symbol>,
    /// Guarded by a Mutex only for the map itself; each slot's OnceLock lets different
    /// lengths compile on different threads at once, and the same length compile once.
    plans: Mutex<HashMap<usize, PlanSlot>>,
}

impl PlanCache {
    pub fn new(symbolic: TypedModel, sequence: Option<Symbol>) -> Self {
        PlanCache { symbolic, sequence, plans: Mutex::new(HashMap::new()) }
    }

    /// The plan for batches padded to `padded_length` tokens.
    pub fn plan_for(&self, padded_length: usize) -> Result<Arc<TypedRunnableModel>, String> {
        let key = if self.sequence.is_some() { padded_length } else { 0 };
        let slot = {
            let mut plans = self.plans.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            plans.entry(key).or_default().clone()
        };
        slot.get_or_init(|| self.compile(padded_length).map_err(|error| format!("{error:#}")))
            .clone()
    }

    /// How many plans have been compiled (for logs and benchmarks).
    pub fn compiled_plans(&self) -> usize {
        let plans = self.plans.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        plans.values().filter(|slot| matches!(slot.get(), Some(Ok(_)))).count()
    }

    fn compile(&self, padded_length: usize) -> TractResult<Arc<TypedRunnableModel>> {
        let started = std::time::Instant::now();
        let mut model = match &self.sequence {
            Some(sequence) => {
                let bound = HashMap::from([(sequence.clone(), TDim::Val(padded_length as i64))]);
                let mut bound_model = self.symbolic.set_symbols(&bound)?;
                bound_model.declutter()?;
                bound_model
            }
            None => self.symbolic.clone(),
        };
        model.optimize()?;
        let plan = model.into_runnable()?;
        tracing::debug!(padded_length, elapsed = ?started.elapsed(), "compiled onnx plan");
        Ok(plan)
    }
}
