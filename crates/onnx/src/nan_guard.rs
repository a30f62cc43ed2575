//! Dropping the NaN guard that PyTorch exports after each attention softmax.
//!
//! Exported BERT models compute `Where(IsNaN(p), 0, p)` on the attention probabilities `p =
//! Softmax(scores + mask)`, for rows whose every position is masked (-inf everywhere gives
//! NaN). Under tract that guard is a pass over the whole `[rows, heads, length, length]`
//! tensor twice (the test, then the select): about 7 % of a 256-token pass on
//! all-MiniLM-L6-v2. The processor never feeds such a row: every row of a batch has at least
//! one real token (an empty text becomes one pad token marked real, see
//! [`crate::padded_batch`]), so each softmax row has a position whose mask adds nothing and
//! the softmax of finite scores is finite. The guard then always selects `p`, and `p` itself
//! replaces it.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::TypedModelPatch;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::logic::Iff;
use tract_onnx::tract_core::ops::math::IsNan;
use tract_onnx::tract_core::ops::nn::Softmax;

/// Replace every `Iff(IsNan(p), 0, p)` whose `p` is a softmax output by `p`. Returns how many
/// guards were dropped.
pub fn drop_softmax_nan_guards(model: &mut TypedModel) -> TractResult<usize> {
    let mut guards = Vec::new();
    for node in model.nodes() {
        if let Some(probabilities) = guarded_softmax(model, node)? {
            guards.push((node.id, probabilities));
        }
    }
    if guards.is_empty() {
        return Ok(0);
    }
    let mut patch = TypedModelPatch::default();
    for (guard, probabilities) in &guards {
        let tapped = patch.tap_model(model, *probabilities)?;
        patch.shunt_outside(model, OutletId::new(*guard, 0), tapped)?;
    }
    patch.apply(model)?;
    model.compact()?;
    Ok(guards.len())
}

/// The softmax output `p` that `node` guards, when `node` is `Iff(IsNan(p), 0, p)` of `p`'s
/// own shape.
fn guarded_softmax(model: &TypedModel, node: &TypedNode) -> TractResult<Option<OutletId>> {
    if !node.op_is::<Iff>() || node.inputs.len() != 3 {
        return Ok(None);
    }
    let (condition, when_nan, probabilities) = (node.inputs[0], node.inputs[1], node.inputs[2]);
    if !model.node(probabilities.node).op_is::<Softmax>() {
        return Ok(None);
    }
    let test = model.node(condition.node);
    let tests_probabilities = test
        .op_as::<ElementWiseOp>()
        .is_some_and(|op| op.0.is::<IsNan>())
        && test.inputs.first() == Some(&probabilities);
    let zero = model
        .outlet_fact(when_nan)?
        .konst
        .as_ref()
        .and_then(|konst| {
            let values = konst.cast_to::<f32>().ok()?;
            let plain = values.try_as_plain_ram().ok()?;
            Some(plain.as_slice::<f32>().ok()?.iter().all(|value| *value == 0.0))
        })
        .unwrap_or(false);
    let same_shape =
        model.outlet_fact(OutletId::new(node.id, 0))?.shape == model.outlet_fact(probabilities)?.shape;
    Ok((tests_probabilities && zero && same_shape).then_some(probabilities))
}
