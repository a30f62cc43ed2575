//! Products of activations with constant weight matrices in bf16 on CPUs with AVX512-BF16.
//!
//! Under tract every linear layer of a BERT-style model (query, key, value, attention output,
//! the two feed-forward products: ~90 % of a pass's multiply-adds) is an f32 matrix product:
//! 16 multiply-adds per AVX-512 instruction. `vdpbf16ps` does 32 (pairs of bf16 products
//! accumulated in f32), so where the CPU has it (`avx512_bf16`: AMD Zen 4 and later, Intel
//! Cooper Lake and Sapphire Rapids and later) each such product is replaced at load by
//! [`Bf16MatMul`]: the weights packed once, as bf16, for all plans; each pass rounds its
//! activations to bf16 (round to nearest even) and accumulates in f32.
//!
//! Precision: a weight-only int8 model's weights (`q × scale` per output column) are kept
//! exactly (`q` fits bf16's 8-bit significand; the column scale multiplies the f32 sums).
//! Other weights are rounded to bf16. The activations lose their low 16 mantissa bits (relative
//! error at most 2⁻⁸ per value, to nearest, before the f32 sums). On 200 motions through all-MiniLM-L6-v2
//! int8 the lowest cosine against onnxruntime's f32 embeddings stays above 0.9999
//! (`motions_reference`, `local_minilm`). The attention's own products (queries × keys,
//! probabilities × values) and everything else stay f32 under tract.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;

/// Columns of one packed weight panel: four 16-lane registers.
const PANEL: usize = 64;

/// Whether this CPU runs [`Bf16MatMul`] (AVX-512F and AVX512-BF16).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A `[k, n]` weight matrix packed for the kernel: panels of [`PANEL`] columns, each a run of
/// `pairs` rows of `PANEL` lanes holding the bf16 pair (row 2p, row 2p + 1) of one column.
#[derive(Debug)]
pub struct PackedWeights {
    k: usize,
    n: usize,
    pairs: usize,
    data: Vec<u32>,
    /// Per-column scale of weights stored as integers (weight-only int8 models).
    column_scales: Option<Vec<f32>>,
}

impl PackedWeights {
    /// Pack `weights`, `[k, n]` row-major (`transposed`: `[n, k]`).
    pub fn new(weights: &[f32], k: usize, n: usize, transposed: bool) -> PackedWeights {
        let at = |row: usize, column: usize| {
            if transposed {
                weights[column * k + row]
            } else {
                weights[row * n + column]
            }
        };
        let column_scales = integer_column_scales(k, n, &at);
        let pairs = k.div_ceil(2);
        let panels = n.div_ceil(PANEL);
        let mut data = vec![0u32; panels * pairs * PANEL];
        for panel in 0..panels {
            for pair in 0..pairs {
                for lane in 0..PANEL.min(n - panel * PANEL) {
                    let column = panel * PANEL + lane;
                    let value = |row: usize| match (&column_scales, row < k) {
                        (_, false) => 0.0,
                        (Some(scales), true) => (at(row, column) / scales[column]).round(),
                        (None, true) => at(row, column),
                    };
                    data[(panel * pairs + pair) * PANEL + lane] =
                        bf16_bits(value(2 * pair)) | (bf16_bits(value(2 * pair + 1)) << 16);
                }
            }
        }
        PackedWeights {
            k,
            n,
            pairs,
            data,
            column_scales,
        }
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// Whether the weights are kept exactly (integers times a column scale).
    pub fn exact(&self) -> bool {
        self.column_scales.is_some()
    }

    /// `output[m, n] = input[m, k] · weights`, both row-major. Panics unless the CPU has
    /// the instructions ([`available`]).
    pub fn multiply(&self, input: &[f32], rows: usize, output: &mut [f32]) {
        assert!(available(), "bf16 products need AVX-512F and AVX512-BF16");
        assert_eq!(input.len(), rows * self.k);
        assert_eq!(output.len(), rows * self.n);
        #[cfg(target_arch = "x86_64")]
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            if scratch.len() < rows * self.pairs {
                scratch.resize(rows * self.pairs, 0);
            }
            // SAFETY: the CPU has the instructions (asserted above); the slices' lengths
            // are checked above and follow from `pairs`, `k` and `n` below.
            unsafe {
                kernels::to_bf16_pairs(input, rows, self.k, self.pairs, &mut scratch);
                self.multiply_pairs(&scratch, rows, output);
            }
        });
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn multiply_pairs(&self, input: &[u32], rows: usize, output: &mut [f32]) {
        let panels = self.n.div_ceil(PANEL);
        // Panel by panel: one panel's weights (pairs × 256 bytes) stay in the core's cache
        // while every row block runs over them.
        for panel in 0..panels {
            let weights = &self.data[panel * self.pairs * PANEL..(panel + 1) * self.pairs * PANEL];
            let columns = (self.n - panel * PANEL).min(PANEL);
            let scales = self
                .column_scales
                .as_ref()
                .map(|scales| &scales[panel * PANEL..panel * PANEL + columns]);
            let mut row = 0;
            while row < rows {
                let block = (rows - row).min(kernels::ROWS);
                let block_input = &input[row * self.pairs..(row + block) * self.pairs];
                let block_output = &mut output[row * self.n + panel * PANEL..];
                let run = match block {
                    6 => kernels::block::<6>,
                    5 => kernels::block::<5>,
                    4 => kernels::block::<4>,
                    3 => kernels::block::<3>,
                    2 => kernels::block::<2>,
                    _ => kernels::block::<1>,
                };
                // SAFETY: `block_input` holds `block` rows of `pairs`, `weights` one panel of
                // `pairs` × PANEL, `block_output` `block` rows of stride `n` from this panel's
                // first column (the last row reaching at least `columns` further).
                unsafe {
                    run(
                        block_input,
                        self.pairs,
                        weights,
                        block_output,
                        self.n,
                        columns,
                        scales,
                    )
                };
                row += block;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Each thread's activations rounded to bf16 pairs, reused across products.
    static SCRATCH: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The scale of each column when every weight of it is an integer of at most 127 in
/// magnitude times that scale (as a weight-only int8 model's dequantised weights are):
/// `max |w| / 127`, checked against every weight of the column. `None` otherwise.
fn integer_column_scales(
    k: usize,
    n: usize,
    at: &impl Fn(usize, usize) -> f32,
) -> Option<Vec<f32>> {
    let mut scales = vec![1.0f32; n];
    for (column, scale) in scales.iter_mut().enumerate() {
        let largest = (0..k)
            .map(|row| at(row, column).abs())
            .fold(0.0f32, f32::max);
        if largest == 0.0 {
            continue;
        }
        if !largest.is_finite() {
            return None;
        }
        let candidate = largest / 127.0;
        let integral = (0..k).all(|row| {
            let q = at(row, column) / candidate;
            (q - q.round()).abs() <= 1e-3
        });
        if !integral {
            return None;
        }
        *scale = candidate;
    }
    Some(scales)
}

/// `value` rounded to bf16 (to nearest, ties to even), as its 16 bits.
fn bf16_bits(value: f32) -> u32 {
    if value.is_nan() {
        return 0x7fc0;
    }
    let bits = value.to_bits();
    (bits + 0x7fff + ((bits >> 16) & 1)) >> 16
}

#[cfg(target_arch = "x86_64")]
mod kernels {
    use std::arch::x86_64::*;

    use super::{PANEL, bf16_bits};

    /// Rows of one block: 6 rows × 4 registers = 24 accumulators of the 32.
    pub const ROWS: usize = 6;

    /// `input` (`rows` × `k` f32) as rows of `pairs` bf16 pairs (the last padded with 0).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn to_bf16_pairs(
        input: &[f32],
        rows: usize,
        k: usize,
        pairs: usize,
        out: &mut [u32],
    ) {
        for row in 0..rows {
            let source = &input[row * k..(row + 1) * k];
            let target = &mut out[row * pairs..(row + 1) * pairs];
            let mut index = 0;
            while index + 32 <= k {
                // SAFETY: 32 values from `index` are within the row, 16 pairs in `target`.
                unsafe {
                    let low = _mm512_loadu_ps(source.as_ptr().add(index));
                    let high = _mm512_loadu_ps(source.as_ptr().add(index + 16));
                    let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(high, low));
                    _mm512_storeu_si512(target.as_mut_ptr().add(index / 2) as *mut _, packed);
                }
                index += 32;
            }
            while index < k {
                let low = bf16_bits(source[index]);
                let high = if index + 1 < k {
                    bf16_bits(source[index + 1])
                } else {
                    0
                };
                target[index / 2] = low | (high << 16);
                index += 2;
            }
        }
    }

    /// `R` rows of `output` (stride `output_stride`), `columns` (≤ PANEL) wide, from `R` rows
    /// of `pairs` bf16 pairs and one panel of weights.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn block<const R: usize>(
        input: &[u32],
        pairs: usize,
        weights: &[u32],
        output: &mut [f32],
        output_stride: usize,
        columns: usize,
        scales: Option<&[f32]>,
    ) {
        debug_assert!(input.len() >= R * pairs && weights.len() >= pairs * PANEL);
        debug_assert!(output.len() >= (R - 1) * output_stride + columns);
        let mut sums = [[_mm512_setzero_ps(); 4]; R];
        let a = input.as_ptr();
        let b = weights.as_ptr();
        for pair in 0..pairs {
            // SAFETY: within `weights` (one panel of `pairs` × PANEL) and `input` (R rows).
            unsafe {
                let panel = b.add(pair * PANEL);
                let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(panel as *const _));
                let w1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(panel.add(16) as *const _));
                let w2: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(panel.add(32) as *const _));
                let w3: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(panel.add(48) as *const _));
                for (row, sum) in sums.iter_mut().enumerate() {
                    let x: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(*a.add(row * pairs + pair) as i32));
                    sum[0] = _mm512_dpbf16_ps(sum[0], x, w0);
                    sum[1] = _mm512_dpbf16_ps(sum[1], x, w1);
                    sum[2] = _mm512_dpbf16_ps(sum[2], x, w2);
                    sum[3] = _mm512_dpbf16_ps(sum[3], x, w3);
                }
            }
        }
        for (row, sum) in sums.iter().enumerate() {
            for (register, values) in sum.iter().enumerate() {
                let start = register * 16;
                if start >= columns {
                    break;
                }
                let left = columns - start;
                let mask: __mmask16 = if left >= 16 {
                    0xffff
                } else {
                    ((1u32 << left) - 1) as u16
                };
                // SAFETY: the mask keeps the accesses within the row's `columns`.
                unsafe {
                    let mut values = *values;
                    if let Some(scales) = scales {
                        values = _mm512_mul_ps(
                            values,
                            _mm512_maskz_loadu_ps(mask, scales.as_ptr().add(start)),
                        );
                    }
                    _mm512_mask_storeu_ps(
                        output.as_mut_ptr().add(row * output_stride + start),
                        mask,
                        values,
                    );
                }
            }
        }
    }
}

/// `input[..., k] · weights[k, n]` with bf16 products and f32 sums (see the module); `k` may
/// span the input's last `contracted` axes.
#[derive(Debug, Clone)]
pub struct Bf16MatMul {
    weights: Arc<PackedWeights>,
    contracted: usize,
}

impl PartialEq for Bf16MatMul {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weights, &other.weights) && self.contracted == other.contracted
    }
}

impl Eq for Bf16MatMul {}

impl Op for Bf16MatMul {
    fn name(&self) -> StaticName {
        "Bf16MatMul".into()
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "k={} n={} weights {}",
            self.weights.k,
            self.weights.n,
            if self.weights.exact() {
                "exact (int8 × column scale)"
            } else {
                "rounded to bf16"
            }
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for Bf16MatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let shape = input.shape();
        let kept = shape.len() - self.contracted;
        ensure!(
            shape[kept..].iter().product::<usize>() == self.weights.k,
            "Bf16MatMul: input {shape:?}, k {}",
            self.weights.k
        );
        let rows = shape[..kept].iter().product::<usize>();
        let mut output_shape: TVec<usize> = shape[..kept].into();
        output_shape.push(self.weights.n);
        // SAFETY: every value of the output is written by `multiply`.
        let mut output = unsafe { Tensor::uninitialized::<f32>(&output_shape)? };
        {
            let plain = input.try_as_plain_ram()?;
            let values = plain.as_slice::<f32>()?;
            let mut target = output.try_as_plain_ram_mut()?;
            self.weights
                .multiply(values, rows, target.as_slice_mut::<f32>()?);
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for Bf16MatMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let input = inputs[0];
        ensure!(input.datum_type == f32::datum_type() && input.rank() >= self.contracted);
        let kept = input.rank() - self.contracted;
        ensure!(input.shape.iter().skip(kept).product::<TDim>() == self.weights.k.to_dim());
        let mut shape: TVec<TDim> = input.shape.iter().take(kept).cloned().collect();
        shape.push(self.weights.n.to_dim());
        Ok(tvec!(f32::fact(&*shape)))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let rows: TDim = inputs[0]
            .shape
            .iter()
            .take(inputs[0].rank() - self.contracted)
            .product();
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            rows * (self.weights.k * self.weights.n) as i64
        )))
    }

    as_op!();
}

/// Replace every f32 product of an activation with a constant `[k, n]` matrix (an `EinSum`
/// `...k,kn->...n`, with the matrix stored `[n, k]`, or `k` spanning several axes) by a
/// [`Bf16MatMul`]. Returns how many
/// were replaced (none when the CPU lacks the instructions).
pub fn use_bf16_products(model: &mut TypedModel) -> TractResult<usize> {
    if !available() {
        return Ok(0);
    }
    let mut found = Vec::new();
    for node in model.nodes() {
        if let Some((activation, weights, contracted)) = weight_product(model, node)? {
            found.push((node.id, activation, weights, contracted));
        }
    }
    let replaced = found.len();
    for (node_id, activation, weights, contracted) in found {
        let name = model.node(node_id).name.clone();
        let mut patch = TypedModelPatch::default();
        let tapped = patch.tap_model(model, activation)?;
        let op = Bf16MatMul {
            weights: Arc::new(weights),
            contracted,
        };
        let wire = patch.wire_node(name, op, &[tapped])?;
        patch.shunt_outside(model, OutletId::new(node_id, 0), wire[0])?;
        patch.apply(model)?;
    }
    if replaced > 0 {
        model.compact()?;
    }
    Ok(replaced)
}

/// The activation outlet, packed weights and number of contracted axes of `node` when it is
/// an f32 product of an activation (contracted on its last axes) with a constant matrix.
fn weight_product(
    model: &TypedModel,
    node: &TypedNode,
) -> TractResult<Option<(OutletId, PackedWeights, usize)>> {
    let Some(op) = node.op_as::<EinSum>() else {
        return Ok(None);
    };
    if op.q_params.is_some() || op.operating_dt != f32::datum_type() || node.inputs.len() != 2 {
        return Ok(None);
    }
    let facts = model.node_input_facts(node.id)?;
    let constant = |index: usize| facts[index].konst.is_some();
    let (activation, weight) = match (constant(0), constant(1)) {
        (false, true) => (0, 1),
        (true, false) => (1, 0),
        _ => return Ok(None),
    };
    let (input_facts, weight_fact) = (facts[activation], facts[weight]);
    if input_facts.datum_type != f32::datum_type()
        || weight_fact.datum_type != f32::datum_type()
        || weight_fact.rank() < 2
        || input_facts.rank() < 1
    {
        return Ok(None);
    }
    // The formula, e.g. "bmk,kn->bmn": the activation's last axes are the contracted ones,
    // the matrix holds them in the same order before (or after) one more axis `n`, and the
    // output is the activation's other axes, then `n`. Tensors are contiguous, so the
    // contracted axes flatten into one `k` (a reshape tract folded into the product, as in
    // "bshd,hdn->bsn").
    let (inputs, outputs) = op.axes.to_strs();
    let (Some(act), Some(mat), Some(out)) = (
        inputs
            .get(activation)
            .map(|s| s.chars().collect::<Vec<_>>()),
        inputs.get(weight).map(|s| s.chars().collect::<Vec<_>>()),
        outputs.first().map(|s| s.chars().collect::<Vec<_>>()),
    ) else {
        return Ok(None);
    };
    let contracted = mat.len() - 1;
    if act.len() < contracted {
        return Ok(None);
    }
    let (kept, trailing) = act.split_at(act.len() - contracted);
    let transposed = if mat[..contracted] == *trailing {
        false
    } else if mat[1..] == *trailing {
        true
    } else {
        return Ok(None);
    };
    let n_axis = if transposed { mat[0] } else { mat[contracted] };
    let mut expected: Vec<char> = kept.to_vec();
    expected.push(n_axis);
    if out != expected || kept.contains(&n_axis) || trailing.contains(&n_axis) {
        return Ok(None);
    }
    let Some(konst) = &weight_fact.konst else {
        return Ok(None);
    };
    let shape = konst.shape();
    let (k, n) = if transposed {
        (shape[1..].iter().product::<usize>(), shape[0])
    } else {
        (
            shape[..contracted].iter().product::<usize>(),
            shape[contracted],
        )
    };
    let activation_k = input_facts.shape.iter().skip(kept.len()).product::<TDim>();
    if activation_k != k.to_dim() {
        return Ok(None);
    }
    let plain = konst.try_as_plain_ram()?;
    let values = plain.as_slice::<f32>()?;
    Ok(Some((
        node.inputs[activation],
        PackedWeights::new(values, k, n, transposed),
        contracted,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(count: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..count)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    fn reference(input: &[f32], weights: &[f32], rows: usize, k: usize, n: usize) -> Vec<f64> {
        let mut output = vec![0f64; rows * n];
        for row in 0..rows {
            for column in 0..n {
                output[row * n + column] = (0..k)
                    .map(|i| input[row * k + i] as f64 * weights[i * n + column] as f64)
                    .sum();
            }
        }
        output
    }

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80); // tie, even stays
        assert_eq!(bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82); // tie, odd rounds up
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(bf16_bits(-2.0), 0xc000);
    }

    #[test]
    fn int8_weights_are_kept_exactly_and_others_rounded() {
        let (k, n) = (5, 3);
        let scales = [0.01f32, 0.002, 0.5];
        let q = [
            127.0f32, -3.0, 5.0, 1.0, -127.0, 7.0, -20.0, 127.0, 0.0, 64.0, 2.0, -1.0, 0.0, 9.0,
            127.0,
        ];
        let weights: Vec<f32> = q
            .iter()
            .enumerate()
            .map(|(i, q)| q * scales[i % n])
            .collect();
        let packed = PackedWeights::new(&weights, k, n, false);
        assert!(packed.exact());
        let noisy: Vec<f32> = weights.iter().map(|w| w * 1.0001 + 1e-4).collect();
        assert!(!PackedWeights::new(&noisy, k, n, false).exact());
    }

    #[test]
    fn products_match_f64_within_bf16_rounding_for_every_shape() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        for (rows, k, n) in [
            (1, 1, 1),
            (7, 3, 17),
            (13, 64, 64),
            (6, 33, 130),
            (37, 384, 70),
            (256, 384, 384),
        ] {
            let input: Vec<f32> = values(rows * k, 1).iter().map(|v| v * 8.0).collect();
            let weights = values(k * n, 2);
            let expected = reference(&input, &weights, rows, k, n);
            let mut output = vec![f32::NAN; rows * n];
            PackedWeights::new(&weights, k, n, false).multiply(&input, rows, &mut output);
            // Both operands rounded to bf16 (half an ulp: 2⁻⁸ relative each): at most about
            // 2 × 2⁻⁸ relative per product, plus the f32 sums.
            let bound: Vec<f64> = (0..rows * n)
                .map(|index| {
                    let (row, column) = (index / n, index % n);
                    (0..k)
                        .map(|i| (input[row * k + i] as f64 * weights[i * n + column] as f64).abs())
                        .sum::<f64>()
                        * 2.0
                        / 256.0
                        + 1e-5
                })
                .collect();
            for index in 0..rows * n {
                assert!(
                    (output[index] as f64 - expected[index]).abs() <= bound[index],
                    "{rows}×{k}×{n} at {index}: {} vs {}",
                    output[index],
                    expected[index]
                );
            }
            // The transposed layout gives the same result.
            let transposed: Vec<f32> = (0..n * k).map(|i| weights[(i % k) * n + i / k]).collect();
            let mut again = vec![f32::NAN; rows * n];
            PackedWeights::new(&transposed, k, n, true).multiply(&input, rows, &mut again);
            assert_eq!(output, again, "{rows}×{k}×{n} transposed");
        }
    }

    /// `formula` over a source of `input_shape` and a constant of `weight_shape`, run under
    /// tract as it is and after [`use_bf16_products`]: how many products were replaced, and
    /// the largest difference between the two outputs relative to the largest output.
    fn replaced_and_difference(
        formula: &str,
        input_shape: &[usize],
        weight_shape: &[usize],
    ) -> (usize, f32) {
        let mut model = TypedModel::default();
        let input_count = input_shape.iter().product();
        let weight_count = weight_shape.iter().product();
        let source = model.add_source("x", f32::fact(input_shape)).unwrap();
        let weights = Tensor::from_shape(weight_shape, &values(weight_count, 3)).unwrap();
        let constant = model.add_const("w", weights.into_arc_tensor()).unwrap();
        let product = EinSum::new(formula.parse().unwrap(), f32::datum_type());
        let output = model
            .wire_node("product", product, &[source, constant])
            .unwrap();
        model.select_output_outlets(&output).unwrap();
        let input = Tensor::from_shape(input_shape, &values(input_count, 4)).unwrap();
        let run = |model: &TypedModel| -> Vec<f32> {
            let plan = model.clone().into_runnable().unwrap();
            let mut state = plan.spawn().unwrap();
            let outputs = state.run(tvec!(input.clone().into_tvalue())).unwrap();
            let plain = outputs[0].try_as_plain_ram().unwrap();
            plain.as_slice::<f32>().unwrap().to_vec()
        };
        let exact = run(&model);
        let replaced = use_bf16_products(&mut model).unwrap();
        let rounded = run(&model);
        assert_eq!(exact.len(), rounded.len(), "{formula}");
        let largest = exact.iter().fold(0f32, |top, value| top.max(value.abs()));
        let difference = exact
            .iter()
            .zip(&rounded)
            .fold(0f32, |top, (a, b)| top.max((a - b).abs()));
        (replaced, difference / largest)
    }

    #[test]
    fn products_with_constant_matrices_are_replaced_and_others_left() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        for (formula, input, weights) in [
            ("bmk,kn->bmn", &[2usize, 5, 6][..], &[6usize, 7][..]),
            ("bmk,nk->bmn", &[2, 5, 6], &[7, 6]),
            ("bmhd,hdn->bmn", &[2, 5, 2, 3], &[2, 3, 7]),
            ("mk,kn->mn", &[9, 40], &[40, 70]),
        ] {
            let (replaced, difference) = replaced_and_difference(formula, input, weights);
            assert_eq!(replaced, 1, "{formula}");
            assert!(
                difference > 0.0 && difference < 1e-2,
                "{formula}: {difference}"
            );
        }
        // A batch of matrices, and a product over the input's first axis: not linear layers.
        for (formula, input, weights) in [
            ("bmk,bkn->bmn", &[2usize, 5, 6][..], &[2usize, 6, 7][..]),
            ("km,kn->mn", &[6, 5], &[6, 7]),
        ] {
            let (replaced, difference) = replaced_and_difference(formula, input, weights);
            assert_eq!(replaced, 0, "{formula}");
            assert_eq!(difference, 0.0, "{formula}");
        }
    }
}
