//! Where the time of one forward pass goes, per tract operator: how the numbers in
//! `plan_cache`'s docs and the benchmark notes were measured.
//!
//! cargo run --release --example profile_ops -- MODEL.onnx [--rows N] [--length N]
//!     [--symbolic-batch] [--symbolic-length] [--no-fold] [--drop-nan-guards] [--bf16]
//!     [--runs N]
//!
//! Loads a BERT-style model (inputs input_ids, attention_mask, token_type_ids), optionally
//! folds constant subgraphs and binds the batch and sequence symbols, runs one batch of
//! `rows` × `length` tokens `runs` times on one thread, and prints the time per run and the
//! operators that took the most.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tract_onnx::prelude::*;

fn number(arguments: &[String], name: &str, default: usize) -> usize {
    arguments
        .iter()
        .position(|argument| argument == name)
        .and_then(|position| arguments.get(position + 1))
        .map_or(default, |value| value.parse().expect("a number"))
}

fn main() -> TractResult<()> {
    let arguments: Vec<String> = std::env::args().collect();
    let path = arguments
        .get(1)
        .expect("usage: profile_ops MODEL.onnx [flags]");
    let (rows, length, runs) = (
        number(&arguments, "--rows", 1),
        number(&arguments, "--length", 256),
        number(&arguments, "--runs", 3),
    );
    let has = |flag: &str| arguments.iter().any(|argument| argument == flag);

    let mut model = tract_onnx::onnx().model_for_path(path)?;
    let batch = model.symbols.sym("batch");
    let sequence = model.symbols.sym("sequence");
    model.symbols.add_assertion("batch>=1")?;
    model.symbols.add_assertion("sequence>=1")?;
    for input in 0..model.input_outlets()?.len() {
        let shape = tvec!(batch.to_dim(), sequence.to_dim());
        model.set_input_fact(input, InferenceFact::dt_shape(i64::datum_type(), shape))?;
    }
    let started = Instant::now();
    let mut typed = model.into_typed()?;
    typed.declutter()?;
    if !has("--no-fold") {
        backfill_onnx::const_fold::fold_constant_subgraphs(&mut typed)?;
    }
    if has("--drop-nan-guards") {
        backfill_onnx::nan_guard::drop_softmax_nan_guards(&mut typed)?;
    }
    if has("--bf16") {
        let replaced = backfill_onnx::bf16_matmul::use_bf16_products(&mut typed)?;
        println!("{replaced} products in bf16");
    }
    let mut bound = HashMap::new();
    if !has("--symbolic-batch") {
        bound.insert(batch, TDim::Val(rows as i64));
    }
    if !has("--symbolic-length") {
        bound.insert(sequence, TDim::Val(length as i64));
    }
    if !bound.is_empty() {
        typed = typed.set_symbols(&bound)?;
        typed.declutter()?;
    }
    typed.optimize()?;
    let plan = typed.into_runnable()?;
    println!("compiled in {:?}", started.elapsed());

    let ids: Vec<i64> = (0..rows * length)
        .map(|i| 1000 + (i as i64 % 500))
        .collect();
    let inputs: TVec<TValue> = tvec!(
        Tensor::from_shape(&[rows, length], &ids)?.into(),
        Tensor::from_shape(&[rows, length], &vec![1i64; rows * length])?.into(),
        Tensor::from_shape(&[rows, length], &vec![0i64; rows * length])?.into()
    );
    let mut state = plan.spawn()?;
    state.run(inputs.clone())?;
    let mut per_operator: HashMap<String, Duration> = HashMap::new();
    let started = Instant::now();
    for _ in 0..runs {
        state.run_plan_with_eval(inputs.clone(), |context, op_state, node, node_inputs| {
            let operator_started = Instant::now();
            let result = tract_onnx::tract_core::plan::eval(context, op_state, node, node_inputs);
            *per_operator.entry(node.op.name().to_string()).or_default() +=
                operator_started.elapsed();
            result
        })?;
    }
    let per_run = started.elapsed() / runs as u32;
    println!(
        "{rows} × {length} tokens: {per_run:?} per run, {:?} per token",
        per_run / (rows * length) as u32
    );
    let mut operators: Vec<_> = per_operator.into_iter().collect();
    operators.sort_by_key(|(_, time)| std::cmp::Reverse(*time));
    for (name, time) in operators.iter().take(12) {
        let share = time.as_secs_f64() / (per_run.as_secs_f64() * runs as f64) * 100.0;
        println!("  {name:<28} {:>10.2?} {share:>5.1}%", *time / runs as u32);
    }
    Ok(())
}
