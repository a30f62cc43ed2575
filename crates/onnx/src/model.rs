//! The ONNX model under tract: loading with symbolic `[batch, sequence]` inputs, mapping the
//! model's inputs by name, and running one padded batch on a per-thread state.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use crate::bf16_matmul::use_bf16_products;
use crate::const_fold::fold_constant_subgraphs;
use crate::nan_guard::drop_softmax_nan_guards;
use crate::error::{LoadError, RunError};
use crate::padded_batch::PaddedBatch;
use crate::plan_cache::PlanCache;

/// What a model input is fed with, found from its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InputRole {
    TokenIds,
    AttentionMask,
    TokenTypeIds,
}

impl InputRole {
    fn from_name(name: &str) -> Option<Self> {
        match name {
            "input_ids" => Some(InputRole::TokenIds),
            "attention_mask" => Some(InputRole::AttentionMask),
            "token_type_ids" => Some(InputRole::TokenTypeIds),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct ModelInput {
    role: InputRole,
    datum_type: DatumType,
}

/// A model ready to run; shared by all threads, each with its own [`ModelState`].
#[derive(Debug)]
pub struct OnnxModel {
    path: PathBuf,
    plans: PlanCache,
    inputs: Vec<ModelInput>,
    /// Products computed in bf16 (see [`crate::bf16_matmul`]).
    bf16_products: usize,
}

/// A thread's execution states (scratch buffers), one per batch shape (rows, padded length)
/// it has run, reused across its batches.
#[derive(Debug, Default)]
pub struct ModelState(HashMap<(usize, usize), TypedSimpleState>);

/// Preferred output names, best first; without any of them the first output is used.
pub const EMBEDDING_OUTPUT_NAMES: &[&str] = &[
    "sentence_embedding",
    "last_hidden_state",
    "token_embeddings",
];
pub const CLASSIFICATION_OUTPUT_NAMES: &[&str] = &["logits", "probabilities", "scores"];

impl OnnxModel {
    /// Parse, type and optimise the model at `path` for inputs of shape `[batch, sequence]`,
    /// keeping only the output named first in `preferred_outputs` (else the first output).
    /// With `bf16_products`, products with constant weight matrices run in bf16 where the CPU
    /// has AVX512-BF16 (see [`crate::bf16_matmul`]).
    pub fn load(
        path: &Path,
        preferred_outputs: &[&str],
        bf16_products: bool,
    ) -> Result<Self, LoadError> {
        if !path.is_file() {
            return Err(LoadError::ModelFileMissing {
                path: path.to_path_buf(),
            });
        }
        let unreadable = |error: TractError| LoadError::ModelUnreadable {
            path: path.to_path_buf(),
            message: format!("{error:#}"),
        };
        let mut model = tract_onnx::onnx()
            .model_for_path(path)
            .map_err(unreadable)?;

        let input_names: Vec<String> = model
            .input_outlets()
            .map_err(unreadable)?
            .iter()
            .map(|outlet| model.node(outlet.node).name.clone())
            .collect();
        let roles: Option<Vec<InputRole>> = input_names
            .iter()
            .map(|name| InputRole::from_name(name))
            .collect();
        let roles = match roles {
            Some(roles) if roles.contains(&InputRole::TokenIds) => roles,
            _ => {
                return Err(LoadError::UnsupportedInputs {
                    path: path.to_path_buf(),
                    found: input_names,
                });
            }
        };

        // Every input is [batch, sequence] of the model's own integer type (i64 unless it says
        // i32). The dimensions keep the names the file gives them (its inner shapes use the
        // same names), else get ours.
        let token_ids_index = roles
            .iter()
            .position(|role| *role == InputRole::TokenIds)
            .unwrap_or(0);
        let declared = declared_symbols(&model, token_ids_index);
        let batch = declared.0.unwrap_or_else(|| model.symbols.sym("batch"));
        let sequence = declared.1.unwrap_or_else(|| model.symbols.sym("sequence"));
        model
            .symbols
            .add_assertion(format!("{batch}>=1"))
            .map_err(unreadable)?;
        model
            .symbols
            .add_assertion(format!("{sequence}>=1"))
            .map_err(unreadable)?;
        let mut inputs = Vec::with_capacity(roles.len());
        for (index, role) in roles.into_iter().enumerate() {
            let declared = model
                .input_fact(index)
                .map_err(unreadable)?
                .datum_type
                .concretize();
            let datum_type = match declared {
                Some(DatumType::I32) => DatumType::I32,
                None | Some(DatumType::I64) => DatumType::I64,
                Some(other) => {
                    return Err(LoadError::UnsupportedInputs {
                        path: path.to_path_buf(),
                        found: vec![format!("{} ({other:?})", input_names[index])],
                    });
                }
            };
            let fact =
                InferenceFact::dt_shape(datum_type, tvec!(batch.to_dim(), sequence.to_dim()));
            model.set_input_fact(index, fact).map_err(unreadable)?;
            inputs.push(ModelInput { role, datum_type });
        }

        let output = choose_output(&model, preferred_outputs).map_err(unreadable)?;
        model.select_output_outlets(&[output]).map_err(unreadable)?;
        let (symbolic, bf16_products) =
            declutter_and_fold(model, bf16_products).map_err(unreadable)?;
        let bindable = |axis: usize| {
            symbolic
                .input_fact(token_ids_index)
                .ok()
                .and_then(|fact| fact.shape.get(axis).cloned())
                .and_then(|dim| {
                    if let TDim::Sym(symbol) = dim {
                        Some(symbol)
                    } else {
                        None
                    }
                })
        };
        let (batch_symbol, sequence_symbol) = (bindable(0), bindable(1));
        let plans = PlanCache::new(symbolic, batch_symbol, sequence_symbol);
        Ok(OnnxModel {
            path: path.to_path_buf(),
            plans,
            inputs,
            bf16_products,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many products with constant weights run in bf16 (0 without AVX512-BF16 or when
    /// not asked for).
    pub fn bf16_products(&self) -> usize {
        self.bf16_products
    }

    /// A fresh execution state for one thread.
    pub fn new_state(&self) -> ModelState {
        ModelState::default()
    }

    /// Compile the plan of batches of `rows` × `padded_length` ahead of their first run.
    pub fn compile(&self, rows: usize, padded_length: usize) -> Result<(), String> {
        self.plans.plan_for(rows, padded_length).map(|_| ())
    }

    /// How many per-shape plans have been compiled so far.
    pub fn compiled_plans(&self) -> usize {
        self.plans.compiled_plans()
    }

    /// Run one batch; the output as f32, of the model's shape (`[rows, ...]`).
    pub fn run(
        &self,
        state: &mut ModelState,
        batch: &PaddedBatch,
    ) -> Result<BatchOutput, RunError> {
        let failed = |error: TractError| RunError::Model {
            rows: batch.rows,
            padded_length: batch.padded_length,
            message: format!("{error:#}"),
        };
        let shape = [batch.rows, batch.padded_length];
        let mut values: TVec<TValue> = TVec::with_capacity(self.inputs.len());
        for input in &self.inputs {
            let data = match input.role {
                InputRole::TokenIds => &batch.token_ids,
                InputRole::AttentionMask => &batch.attention_mask,
                InputRole::TokenTypeIds => &batch.token_type_ids,
            };
            let tensor = match input.datum_type {
                DatumType::I32 => {
                    let narrowed: Vec<i32> = data.iter().map(|value| *value as i32).collect();
                    Tensor::from_shape(&shape, &narrowed)
                }
                _ => Tensor::from_shape(&shape, data),
            }
            .map_err(failed)?;
            values.push(tensor.into());
        }
        let plan_state = match state.0.entry((batch.rows, batch.padded_length)) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                let plan = self
                    .plans
                    .plan_for(batch.rows, batch.padded_length)
                    .map_err(|message| RunError::Model {
                        rows: batch.rows,
                        padded_length: batch.padded_length,
                        message,
                    })?;
                entry.insert(plan.spawn().map_err(failed)?)
            }
        };
        let mut outputs = plan_state.run(values).map_err(failed)?;
        let output = outputs.remove(0).into_tensor();
        let output = if output.datum_type() == DatumType::F32 {
            output
        } else {
            output
                .cast_to::<f32>()
                .map(|cast| cast.into_owned())
                .map_err(failed)?
        };
        output
            .try_as_plain_ram()
            .and_then(|plain| plain.as_slice::<f32>().map(|_| ()))
            .map_err(failed)?;
        Ok(BatchOutput(output))
    }
}

/// A batch's model output: f32 values in plain memory, checked by [`OnnxModel::run`].
#[derive(Debug)]
pub struct BatchOutput(Tensor);

impl BatchOutput {
    pub fn shape(&self) -> &[usize] {
        self.0.shape()
    }

    /// The values, row-major.
    pub fn values(&self) -> &[f32] {
        // `run` checked that the tensor is plain f32 memory.
        self.0
            .try_as_plain_ram()
            .and_then(|plain| plain.as_slice::<f32>())
            .unwrap_or(&[])
    }
}

/// Type, declutter, fold constants of any size (see [`crate::const_fold`]), drop the
/// softmax NaN guards (see [`crate::nan_guard`]) and, with `bf16`, move products with
/// constant weights to bf16 (see [`crate::bf16_matmul`]; returns how many); optimisation
/// happens per padded length in [`PlanCache`].
fn declutter_and_fold(model: InferenceModel, bf16: bool) -> TractResult<(TypedModel, usize)> {
    let mut typed = model.into_typed()?;
    typed.declutter()?;
    let folded = fold_constant_subgraphs(&mut typed)?;
    let guards = drop_softmax_nan_guards(&mut typed)?;
    let bf16_products = if bf16 { use_bf16_products(&mut typed)? } else { 0 };
    tracing::debug!(
        folded,
        softmax_nan_guards_dropped = guards,
        bf16_products,
        "folded constant subgraphs"
    );
    Ok((typed, bf16_products))
}

/// The symbols a model file gives the two axes of input `index`, when it names them.
fn declared_symbols(model: &InferenceModel, index: usize) -> (Option<Symbol>, Option<Symbol>) {
    let Ok(fact) = model.input_fact(index) else {
        return (None, None);
    };
    let dims: Vec<Option<TDim>> = fact.shape.dims().map(|dim| dim.concretize()).collect();
    let symbol = |axis: usize| match dims.get(axis) {
        Some(Some(TDim::Sym(symbol))) if dims.len() == 2 => Some(symbol.clone()),
        _ => None,
    };
    (symbol(0), symbol(1))
}

/// The outlet of the first output whose name is in `preferred` (in that order), else the
/// model's first output.
fn choose_output(model: &InferenceModel, preferred: &[&str]) -> TractResult<OutletId> {
    let outputs = model.output_outlets()?;
    let name_of = |outlet: &OutletId| {
        model
            .outlet_label(*outlet)
            .unwrap_or(&model.node(outlet.node).name)
            .to_string()
    };
    for wanted in preferred {
        if let Some(outlet) = outputs.iter().find(|outlet| name_of(outlet) == *wanted) {
            return Ok(*outlet);
        }
    }
    outputs
        .first()
        .copied()
        .ok_or_else(|| TractError::msg("the model declares no output"))
}
