//! Folding constant subgraphs of any size into constants before optimisation.
//!
//! Weight-only quantised models (int8 weights stored with a scale, `Cast` then `Mul` at run
//! time) leave one such chain per weight. Tract folds the small ones itself but keeps those
//! whose float result passes its 4 MiB budget: in all-MiniLM-L6-v2 int8 that is the word
//! embedding table (30522 × 384), whose cast and scaling then ran on every forward pass
//! (about 40 ms per batch, most of a short batch's time). Folding it once at load trades
//! 47 MB of memory for that time.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::TypedModelPatch;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::source::TypedSource;

/// Replace every node whose inputs are all constants by the constant it evaluates to.
/// Nodes that cannot be evaluated ahead of a run (stateful ones, or ones whose result
/// depends on a symbolic dimension) are left in place. Returns how many nodes were folded.
pub fn fold_constant_subgraphs(model: &mut TypedModel) -> TractResult<usize> {
    let mut folded = 0;
    let mut left_in_place: Vec<usize> = Vec::new();
    while let Some(node_id) = next_foldable(model, &left_in_place)? {
        let node = model.node(node_id);
        let inputs: TVec<TValue> = model
            .node_input_facts(node_id)?
            .iter()
            .filter_map(|fact| fact.konst.clone())
            .map(|tensor| tensor.into_tvalue())
            .collect();
        let Ok(Some(outputs)) = node.op.eval_out_of_plan(inputs) else {
            left_in_place.push(node_id);
            continue;
        };
        let mut patch = TypedModelPatch::default();
        for (slot, value) in outputs.into_iter().enumerate() {
            let wire = patch.add_const(
                format!("{}.folded.{slot}", node.name),
                value.into_arc_tensor(),
            )?;
            patch.shunt_outside(model, OutletId::new(node_id, slot), wire)?;
        }
        patch.apply(model)?;
        folded += 1;
    }
    if folded > 0 {
        model.compact()?;
    }
    Ok(folded)
}

/// The first node, in evaluation order and not in `left_in_place`, with all-constant inputs
/// and numeric outputs that something uses.
fn next_foldable(model: &TypedModel, left_in_place: &[usize]) -> TractResult<Option<usize>> {
    for node_id in model.eval_order()? {
        let node = model.node(node_id);
        if node.inputs.is_empty()
            || node.op_is::<Const>()
            || node.op_is::<TypedSource>()
            || left_in_place.contains(&node_id)
        {
            continue;
        }
        let inputs_constant = model
            .node_input_facts(node_id)?
            .iter()
            .all(|fact| fact.konst.is_some());
        let outputs_numeric = node
            .outputs
            .iter()
            .all(|output| output.fact.datum_type.is_number());
        let outputs_used = node
            .outputs
            .iter()
            .any(|output| !output.successors.is_empty());
        if inputs_constant && outputs_numeric && outputs_used {
            return Ok(Some(node_id));
        }
    }
    Ok(None)
}
