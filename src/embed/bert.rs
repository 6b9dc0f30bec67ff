//! lorag's own BERT encoder: the sentence-transformers graphs (BERT, post-LayerNorm, exact-erf GELU) run on
//! our kernels instead of tract's. Recognized from the ONNX graph itself, not from names alone: every weight
//! product is a `MatMul` by a constant (f32, or weight-only int8 `Mul(Cast(q), scale)`) followed by an `Add` of a
//! named bias (`…encoder.layer.N.attention.self.query.bias`, …), the LayerNorms are `LayerNormalization` nodes
//! with named weights, the activation is `Erf`, the head size is the constant the query is reshaped by, and
//! the graph's token-states output is the last layer's LayerNorm. Anything else is left to tract.
//!
//! Why: tract folds weight-only int8 weights to f32 and runs a plan of ~400 small operators; this runs each
//! layer as three fused steps (q/k/v in one product, attention per sequence, the feed-forward per block of
//! rows), on the exact lengths (no padding: a batch's sequences are concatenated, attention stays within each),
//! with weights dequantized exactly as onnxruntime does (`q as f32 * scale`, one f32 product) and packed once.

use std::collections::HashMap;

use super::gemm::{matmul, Packed};
use super::onnx::pb::{self, tensor_proto::DataType, ModelProto, NodeProto, TensorProto};

/// Why a graph is not run by this encoder (tract runs it instead).
pub(crate) type NotBert = String;

/// A table of rows (embeddings): f32, or int8 with one scale per row.
enum Table {
    F32 {
        cols: usize,
        data: Vec<f32>,
    },
    I8 {
        cols: usize,
        q: Vec<i8>,
        scale: Vec<f32>,
    },
}

impl Table {
    fn rows(&self) -> usize {
        match self {
            Table::F32 { cols, data } => data.len() / cols,
            Table::I8 { cols, q, .. } => q.len() / cols,
        }
    }

    fn cols(&self) -> usize {
        match self {
            Table::F32 { cols, .. } | Table::I8 { cols, .. } => *cols,
        }
    }

    /// Row `r` into `out`, bit-identical to dequantizing the whole table first.
    fn row(&self, r: usize, out: &mut [f32]) {
        match self {
            Table::F32 { cols, data } => out.copy_from_slice(&data[r * cols..(r + 1) * cols]),
            Table::I8 { cols, q, scale } => {
                let s = scale[r];
                for (o, &v) in out.iter_mut().zip(&q[r * cols..(r + 1) * cols]) {
                    *o = v as f32 * s;
                }
            }
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Table::F32 { data, .. } => data.len() * 4,
            Table::I8 { q, scale, .. } => q.len() + scale.len() * 4,
        }
    }
}

struct Linear {
    w: Packed,
    bias: Vec<f32>,
}

impl Linear {
    /// `out[r] = x[r]·W + bias` for `rows` rows.
    fn run(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        let (k, n) = (self.w.k(), self.w.n());
        matmul(x, k, rows, &self.w, out, n);
        for row in out[..rows * n].chunks_exact_mut(n) {
            for (o, b) in row.iter_mut().zip(&self.bias) {
                *o += b;
            }
        }
    }
}

struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
}

impl Norm {
    /// LayerNorm of each row of `x` in place (mean and variance in f64, then f32 as onnxruntime's
    /// `stash_type` 1 does).
    fn run(&self, x: &mut [f32]) {
        let n = self.gamma.len();
        for row in x.chunks_exact_mut(n) {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            let var = row
                .iter()
                .map(|&v| (v as f64 - mean) * (v as f64 - mean))
                .sum::<f64>()
                / n as f64;
            let inv = (1.0 / (var + self.eps as f64).sqrt()) as f32;
            let mean = mean as f32;
            for ((v, g), b) in row.iter_mut().zip(&self.gamma).zip(&self.beta) {
                *v = (*v - mean) * inv * g + b;
            }
        }
    }
}

struct Layer {
    qkv: Linear,
    out: Linear,
    norm1: Norm,
    up: Linear,
    down: Linear,
    norm2: Norm,
}

/// The encoder.
pub(crate) struct Bert {
    hidden: usize,
    heads: usize,
    word: Table,
    position: Table,
    token_type0: Vec<f32>,
    emb_norm: Norm,
    layers: Vec<Layer>,
}

/// Working buffers for one batch, kept between calls.
#[derive(Default)]
pub(crate) struct Scratch {
    x: Vec<f32>,
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    tmp: Vec<f32>,
    ffn: Vec<f32>,
    scores: Vec<f32>,
    keys: Packed,
    values: Packed,
    /// Milliseconds and calls per stage, when profiling.
    pub profile: Option<std::collections::BTreeMap<&'static str, (f64, usize)>>,
}

impl Scratch {
    /// Charge the time since `*t` to `stage` (when profiling).
    fn tick(&mut self, stage: &'static str, t: &mut f64) {
        if let Some(p) = &mut self.profile {
            let now = super::now_ms();
            let e = p.entry(stage).or_default();
            e.0 += now - *t;
            e.1 += 1;
            *t = now;
        }
    }
}

/// Rows of the feed-forward computed together (its `rows × intermediate` buffer stays small).
const FFN_ROWS: usize = 256;

impl Bert {
    /// Weights held, in bytes.
    pub fn bytes(&self) -> usize {
        let lin = |l: &Linear| l.w.bytes() + l.bias.len() * 4;
        self.word.bytes()
            + self.position.bytes()
            + self
                .layers
                .iter()
                .map(|l| lin(&l.qkv) + lin(&l.out) + lin(&l.up) + lin(&l.down))
                .sum::<usize>()
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }

    pub fn max_positions(&self) -> usize {
        self.position.rows()
    }

    pub fn vocab(&self) -> usize {
        self.word.rows()
    }

    /// Token states of each sequence, concatenated (`Σ len × hidden`). Ids must be in the vocabulary and
    /// sequences at most `max_positions` long (the caller checks).
    pub fn forward(&self, seqs: &[&[u32]], s: &mut Scratch) -> Vec<f32> {
        let h = self.hidden;
        let total: usize = seqs.iter().map(|q| q.len()).sum();
        let mut t = if s.profile.is_some() {
            super::now_ms()
        } else {
            0.0
        };
        s.x.resize(total * h, 0.0);
        let mut row = vec![0f32; h];
        let mut tok = 0;
        for q in seqs {
            for (pos, &id) in q.iter().enumerate() {
                let x = &mut s.x[tok * h..(tok + 1) * h];
                self.word.row(id as usize, x);
                for (v, tt) in x.iter_mut().zip(&self.token_type0) {
                    *v += tt;
                }
                self.position.row(pos, &mut row);
                for (v, p) in x.iter_mut().zip(&row) {
                    *v += p;
                }
                tok += 1;
            }
        }
        self.emb_norm.run(&mut s.x);
        s.tick("embeddings", &mut t);
        for layer in &self.layers {
            self.layer(layer, seqs, total, s, &mut t);
        }
        std::mem::take(&mut s.x)
    }

    fn layer(&self, l: &Layer, seqs: &[&[u32]], total: usize, s: &mut Scratch, t: &mut f64) {
        let h = self.hidden;
        s.qkv.resize(total * 3 * h, 0.0);
        l.qkv.run(&s.x, total, &mut s.qkv);
        s.tick("q/k/v product", t);
        s.ctx.resize(total * h, 0.0);
        self.attention(seqs, s);
        s.tick("attention", t);
        // Output projection + residual, LayerNorm.
        s.tmp.resize(total * h, 0.0);
        l.out.run(&s.ctx, total, &mut s.tmp);
        for (t, x) in s.tmp.iter_mut().zip(&s.x) {
            *t += x;
        }
        l.norm1.run(&mut s.tmp);
        s.tick("output product + LayerNorm", t);
        // Feed-forward per block of rows: up, GELU, down, residual; then LayerNorm.
        let inter = l.up.w.n();
        s.ffn.resize(FFN_ROWS.min(total) * inter, 0.0);
        for r0 in (0..total).step_by(FFN_ROWS) {
            let rows = FFN_ROWS.min(total - r0);
            l.up.run(&s.tmp[r0 * h..], rows, &mut s.ffn);
            gelu(&mut s.ffn[..rows * inter]);
            l.down.run(
                &s.ffn[..rows * inter],
                rows,
                &mut s.x[r0 * h..(r0 + rows) * h],
            );
        }
        for (x, t) in s.x.iter_mut().zip(&s.tmp) {
            *x += t;
        }
        l.norm2.run(&mut s.x);
        s.tick("feed-forward + LayerNorm", t);
    }

    /// Scaled dot-product attention of each sequence with itself, head by head, into `s.ctx`.
    fn attention(&self, seqs: &[&[u32]], s: &mut Scratch) {
        let (h, heads) = (self.hidden, self.heads);
        let d = h / heads;
        let scale = 1.0 / (d as f32).sqrt();
        let ld = 3 * h;
        let mut t0 = 0;
        for q in seqs {
            let n = q.len();
            let block = &s.qkv[t0 * ld..(t0 + n) * ld];
            s.scores.resize(n * n, 0.0);
            for head in 0..heads {
                let (qo, ko, vo) = (head * d, h + head * d, 2 * h + head * d);
                // scores = Q·Kᵀ (keys packed as the d × n matrix Kᵀ).
                s.keys.repack(d, n, |dim, j| block[j * ld + ko + dim]);
                matmul(&block[qo..], ld, n, &s.keys, &mut s.scores, n);
                for row in s.scores.chunks_exact_mut(n) {
                    softmax_scaled(row, scale);
                }
                // ctx = P·V.
                s.values.repack(n, d, |j, dim| block[j * ld + vo + dim]);
                matmul(
                    &s.scores,
                    n,
                    n,
                    &s.values,
                    &mut s.ctx[t0 * h + head * d..],
                    h,
                );
            }
            t0 += n;
        }
    }
}

/// `row = softmax(row · scale)`.
fn softmax_scaled(row: &mut [f32], scale: f32) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * scale;
    map(row, |v| {
        let (scale, max) = (Lane::splat(scale), Lane::splat(max));
        exp(v.mul(scale).sub(max))
    });
    // Four partial sums (a loop-carried f32 sum would not vectorize, and the order is fixed either way).
    let mut part = [0f32; 4];
    let mut quads = row.chunks_exact(4);
    for q in &mut quads {
        for (p, v) in part.iter_mut().zip(q) {
            *p += v;
        }
    }
    let sum = (part[0] + part[1]) + (part[2] + part[3]) + quads.remainder().iter().sum::<f32>();
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// `x · ½(1 + erf(x/√2))` in place.
fn gelu(x: &mut [f32]) {
    map(x, |v| {
        let half = Lane::splat(0.5);
        let e = erf(v.mul(Lane::splat(std::f32::consts::FRAC_1_SQRT_2)));
        v.mul(half).mul(Lane::splat(1.0).add(e))
    });
}

/// `f` over `xs` in place: four lanes at a time with wasm simd128, one at a time elsewhere and for the tail.
/// The lane operations are the scalar ones (IEEE add/sub/mul/div, ties-to-even rounding, compare-select), so
/// both give the same bits.
#[inline(always)]
fn map(xs: &mut [f32], f: impl Fn(Lane) -> Lane + Copy) {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    let xs = {
        let mut quads = xs.chunks_exact_mut(4);
        for q in &mut quads {
            let p = q.as_mut_ptr() as *mut core::arch::wasm32::v128;
            // SAFETY: `q` is 4 f32s; unaligned v128 loads and stores are allowed in wasm.
            unsafe { p.write_unaligned(f4(p.read_unaligned(), f)) };
        }
        quads.into_remainder()
    };
    for v in xs.iter_mut() {
        *v = f(Lane::splat(*v)).first();
    }
}

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
#[inline(always)]
fn f4(v: core::arch::wasm32::v128, f: impl Fn(Lane) -> Lane) -> core::arch::wasm32::v128 {
    f(Lane(v)).0
}

/// Four f32 lanes (wasm simd128) or one (elsewhere).
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
#[derive(Clone, Copy)]
struct Lane(core::arch::wasm32::v128);
#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
#[derive(Clone, Copy)]
struct Lane(f32);

trait Lanes: Copy {
    fn splat(x: f32) -> Self;
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    fn abs(self) -> Self;
    /// Round to the nearest integer, ties to even.
    fn nearest(self) -> Self;
    /// `if self < b { yes } else { no }`.
    fn lt_select(self, b: Self, yes: Self, no: Self) -> Self;
    /// 2ⁿ for integral `n` in −127..=128 (exponent bits).
    fn pow2(self) -> Self;
    /// `self` (≥ 0) with the sign of `x`.
    fn sign_of(self, x: Self) -> Self;
    /// The first lane.
    fn first(self) -> f32;
}

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
impl Lanes for Lane {
    #[inline(always)]
    fn splat(x: f32) -> Self {
        Lane(core::arch::wasm32::f32x4_splat(x))
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        Lane(core::arch::wasm32::f32x4_add(self.0, o.0))
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        Lane(core::arch::wasm32::f32x4_sub(self.0, o.0))
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        Lane(core::arch::wasm32::f32x4_mul(self.0, o.0))
    }
    #[inline(always)]
    fn div(self, o: Self) -> Self {
        Lane(core::arch::wasm32::f32x4_div(self.0, o.0))
    }
    #[inline(always)]
    fn abs(self) -> Self {
        Lane(core::arch::wasm32::f32x4_abs(self.0))
    }
    #[inline(always)]
    fn nearest(self) -> Self {
        Lane(core::arch::wasm32::f32x4_nearest(self.0))
    }
    #[inline(always)]
    fn lt_select(self, b: Self, yes: Self, no: Self) -> Self {
        use core::arch::wasm32::*;
        Lane(v128_bitselect(yes.0, no.0, f32x4_lt(self.0, b.0)))
    }
    #[inline(always)]
    fn pow2(self) -> Self {
        use core::arch::wasm32::*;
        let n = i32x4_trunc_sat_f32x4(self.0);
        Lane(i32x4_shl(i32x4_add(n, i32x4_splat(127)), 23))
    }
    #[inline(always)]
    fn sign_of(self, x: Self) -> Self {
        use core::arch::wasm32::*;
        Lane(v128_or(self.0, v128_and(x.0, u32x4_splat(0x8000_0000))))
    }
    #[inline(always)]
    fn first(self) -> f32 {
        core::arch::wasm32::f32x4_extract_lane::<0>(self.0)
    }
}

#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
impl Lanes for Lane {
    #[inline(always)]
    fn splat(x: f32) -> Self {
        Lane(x)
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        Lane(self.0 + o.0)
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        Lane(self.0 - o.0)
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        Lane(self.0 * o.0)
    }
    #[inline(always)]
    fn div(self, o: Self) -> Self {
        Lane(self.0 / o.0)
    }
    #[inline(always)]
    fn abs(self) -> Self {
        Lane(self.0.abs())
    }
    #[inline(always)]
    fn nearest(self) -> Self {
        Lane(self.0.round_ties_even())
    }
    #[inline(always)]
    fn lt_select(self, b: Self, yes: Self, no: Self) -> Self {
        if self.0 < b.0 {
            yes
        } else {
            no
        }
    }
    #[inline(always)]
    fn pow2(self) -> Self {
        Lane(f32::from_bits(((self.0 as i32 + 127) as u32) << 23))
    }
    #[inline(always)]
    fn sign_of(self, x: Self) -> Self {
        Lane(f32::from_bits(
            self.0.to_bits() | (x.0.to_bits() & 0x8000_0000),
        ))
    }
    #[inline(always)]
    fn first(self) -> f32 {
        self.0
    }
}

/// eˣ: range reduction by powers of two and a degree-6 polynomial (relative error ≈ 2 ulp).
#[inline(always)]
fn exp(x: Lane) -> Lane {
    let c = Lane::splat;
    let x = x.lt_select(c(-87.0), c(-87.0), x);
    let x = c(88.0).lt_select(x, c(88.0), x);
    let n = x.mul(c(std::f32::consts::LOG2_E)).nearest();
    let r = x.sub(n.mul(c(0.693_145_75))).sub(n.mul(c(1.428_606_8e-6)));
    let mut p = c(1.0 / 720.0);
    for k in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = c(k).add(r.mul(p));
    }
    p.mul(n.pow2())
}

/// erf(x): the odd Taylor series below 0.5, above it 1 − erfc(|x|) with Numerical Recipes' Chebyshev fit
/// of erfc (relative error < 1.2e-7, so absolute ≤ 1.2e-7 · erfc(0.5) ≈ 6e-8 there). Both are computed and
/// one selected (no branch per lane).
#[inline(always)]
#[allow(clippy::excessive_precision)] // the published coefficients, as printed
fn erf(x: Lane) -> Lane {
    let c = Lane::splat;
    let a = x.abs();
    let z = a.mul(a);
    // 2/√π (x − x³/3 + x⁵/10 − x⁷/42 + x⁹/216 − x¹¹/1320 + x¹³/9360), error < 1e-9 for |x| < 0.5.
    let mut s = c(1.0 / 9360.0);
    for k in [
        -1.0 / 1320.0,
        1.0 / 216.0,
        -1.0 / 42.0,
        1.0 / 10.0,
        -1.0 / 3.0,
        1.0,
    ] {
        s = c(k).add(z.mul(s));
    }
    let series = a.mul(c(std::f32::consts::FRAC_2_SQRT_PI)).mul(s);
    let t = c(1.0).div(c(1.0).add(c(0.5).mul(a)));
    let mut p = c(0.170_872_77);
    for k in [
        -0.822_152_23,
        1.488_515_87,
        -1.135_203_98,
        0.278_868_07,
        -0.186_288_06,
        0.096_784_18,
        0.374_091_96,
        1.000_023_7,
        -1.265_512_2,
    ] {
        p = c(k).add(t.mul(p));
    }
    let erfc = t.mul(exp(p.sub(z)));
    a.lt_select(c(0.5), series, c(1.0).sub(erfc)).sign_of(x)
}

// ---- Recognition -------------------------------------------------------------------------------------------

/// The six weight products of a layer, by the bias name's suffix.
const ROLES: [&str; 6] = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
];

struct Graph<'a> {
    inits: HashMap<&'a str, &'a TensorProto>,
    producer: HashMap<&'a str, &'a NodeProto>,
    consumers: HashMap<&'a str, Vec<&'a NodeProto>>,
}

fn f32s(t: &TensorProto) -> Result<Vec<f32>, NotBert> {
    if t.data_type != DataType::Float as i32 {
        return Err(format!("{} is not f32", t.name));
    }
    Ok(if t.raw_data.is_empty() {
        t.float_data.clone()
    } else {
        t.raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    })
}

fn i8s(t: &TensorProto) -> Result<Vec<i8>, NotBert> {
    if t.data_type != DataType::Int8 as i32 {
        return Err(format!("{} is not int8", t.name));
    }
    Ok(if t.raw_data.is_empty() {
        t.int32_data.iter().map(|&v| v as i8).collect()
    } else {
        t.raw_data.iter().map(|&b| b as i8).collect()
    })
}

fn ints(t: &TensorProto) -> Vec<i64> {
    match DataType::try_from(t.data_type) {
        Ok(DataType::Int64) if !t.raw_data.is_empty() => t
            .raw_data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        Ok(DataType::Int64) => t.int64_data.clone(),
        Ok(DataType::Int32) if !t.raw_data.is_empty() => t
            .raw_data
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as i64)
            .collect(),
        Ok(DataType::Int32) => t.int32_data.iter().map(|&v| v as i64).collect(),
        _ => Vec::new(),
    }
}

fn attr_f(n: &NodeProto, name: &str) -> Option<f32> {
    n.attribute.iter().find(|a| a.name == name).map(|a| a.f)
}

fn attr_i(n: &NodeProto, name: &str) -> Option<i64> {
    n.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

/// A constant matrix `[rows, cols]`: f32, or weight-only int8 `Mul(Cast(q), scale)` with one scale per row
/// (`[rows, 1]`, tables) or per column (`[1, cols]` or `[cols]`, weights).
enum Matrix {
    F32(Vec<f32>),
    I8 {
        q: Vec<i8>,
        scale: Vec<f32>,
        per_row: bool,
    },
}

impl<'a> Graph<'a> {
    fn new(g: &'a pb::GraphProto) -> Self {
        let mut consumers: HashMap<&str, Vec<&NodeProto>> = HashMap::new();
        for n in &g.node {
            for i in &n.input {
                consumers.entry(i.as_str()).or_default().push(n);
            }
        }
        Graph {
            inits: g.initializer.iter().map(|t| (t.name.as_str(), t)).collect(),
            producer: g
                .node
                .iter()
                .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
                .collect(),
            consumers,
        }
    }

    /// Follow `Identity` back to the value's origin.
    fn origin(&self, mut v: &'a str) -> &'a str {
        while let Some(n) = self.producer.get(v) {
            if n.op_type == "Identity" && n.input.len() == 1 {
                v = n.input[0].as_str();
            } else {
                break;
            }
        }
        v
    }

    /// A constant tensor: an initializer or a `Constant` node's value.
    fn constant(&self, v: &'a str) -> Option<&'a TensorProto> {
        let v = self.origin(v);
        if let Some(t) = self.inits.get(v) {
            return Some(t);
        }
        let n = self.producer.get(v)?;
        (n.op_type == "Constant")
            .then(|| n.attribute.iter().find(|a| a.name == "value")?.t.as_ref())
            .flatten()
    }

    /// The matrix behind value `v`, with its dims.
    fn matrix(&self, v: &'a str) -> Result<(Matrix, usize, usize), NotBert> {
        let v = self.origin(v);
        if let Some(t) = self.inits.get(v) {
            let (r, c) = dims2(t)?;
            return Ok((Matrix::F32(f32s(t)?), r, c));
        }
        let mul = self
            .producer
            .get(v)
            .filter(|n| n.op_type == "Mul" && n.input.len() == 2)
            .ok_or_else(|| format!("{v} is neither a constant nor a dequantized one"))?;
        for (a, b) in [(0, 1), (1, 0)] {
            let cast = self
                .producer
                .get(self.origin(&mul.input[a]))
                .filter(|n| n.op_type == "Cast" && attr_i(n, "to") == Some(DataType::Float as i64));
            let (Some(cast), Some(scale)) = (cast, self.inits.get(self.origin(&mul.input[b])))
            else {
                continue;
            };
            let Some(q) = self.inits.get(self.origin(&cast.input[0])) else {
                continue;
            };
            let (r, c) = dims2(q)?;
            let sd: Vec<i64> = scale.dims.clone();
            let per_row = match sd.as_slice() {
                [a, 1] if *a as usize == r && c != 1 => true,
                [1, b] if *b as usize == c => false,
                [b] if *b as usize == c => false,
                _ => {
                    return Err(format!(
                        "{v}: scale of shape {sd:?} for a [{r}, {c}] weight"
                    ))
                }
            };
            return Ok((
                Matrix::I8 {
                    q: i8s(q)?,
                    scale: f32s(scale)?,
                    per_row,
                },
                r,
                c,
            ));
        }
        Err(format!("{v} is neither a constant nor a dequantized one"))
    }

    fn table(&self, v: &'a str) -> Result<Table, NotBert> {
        let (m, _, cols) = self.matrix(v)?;
        Ok(match m {
            Matrix::F32(data) => Table::F32 { cols, data },
            Matrix::I8 {
                q,
                scale,
                per_row: true,
            } => Table::I8 { cols, q, scale },
            Matrix::I8 {
                q,
                scale,
                per_row: false,
            } => Table::F32 {
                cols,
                data: q
                    .chunks_exact(cols)
                    .flat_map(|row| row.iter().zip(&scale).map(|(&v, &s)| v as f32 * s))
                    .collect(),
            },
        })
    }
}

fn dims2(t: &TensorProto) -> Result<(usize, usize), NotBert> {
    match t.dims.as_slice() {
        [r, c] if *r > 0 && *c > 0 => Ok((*r as usize, *c as usize)),
        d => Err(format!("{} has dims {d:?}, expected a matrix", t.name)),
    }
}

/// A weight product as recognized: (matrix, rows, columns) and its bias.
type Weight = ((Matrix, usize, usize), Vec<f32>);

/// Pack matrices `[k, cols_i]` side by side (q, k, v as one product; or one matrix): int8 panels when every
/// one is int8 with per-column scales, else f32 panels of the dequantized values (the same f32 either way).
fn pack(parts: &[&(Matrix, usize, usize)]) -> Packed {
    let k = parts[0].1;
    let n: usize = parts.iter().map(|p| p.2).sum();
    let mut owner = Vec::with_capacity(n);
    for (i, p) in parts.iter().enumerate() {
        owner.extend((0..p.2).map(|c| (i, c)));
    }
    let all_i8 = parts
        .iter()
        .all(|p| matches!(p.0, Matrix::I8 { per_row: false, .. }));
    if all_i8 {
        Packed::new_i8(
            k,
            n,
            |r, c| {
                let (i, c) = owner[c];
                match &parts[i].0 {
                    Matrix::I8 { q, .. } => q[r * parts[i].2 + c],
                    Matrix::F32(_) => unreachable!("checked: all int8"),
                }
            },
            |c| {
                let (i, c) = owner[c];
                match &parts[i].0 {
                    Matrix::I8 { scale, .. } => scale[c],
                    Matrix::F32(_) => unreachable!("checked: all int8"),
                }
            },
        )
    } else {
        Packed::new(k, n, |r, c| {
            let (i, c) = owner[c];
            weight_at(&parts[i].0, parts[i].2, r, c)
        })
    }
}

/// `W[k][n]` as f32: the same product onnxruntime computes for a dequantized weight.
fn weight_at(m: &Matrix, cols: usize, r: usize, c: usize) -> f32 {
    match m {
        Matrix::F32(d) => d[r * cols + c],
        Matrix::I8 { q, scale, per_row } => {
            q[r * cols + c] as f32 * if *per_row { scale[r] } else { scale[c] }
        }
    }
}

/// Recognize the graph (see the module's documentation); `output` is the token-states output's name.
pub(crate) fn from_graph(proto: &ModelProto, output: &str) -> Result<Bert, NotBert> {
    let g = proto.graph.as_ref().ok_or("no graph")?;
    let graph = Graph::new(g);
    // Embedding tables: Gathers of values named …embeddings.{word,position,token_type}_embeddings.weight.
    let mut tables: HashMap<&str, &str> = HashMap::new();
    for n in &g.node {
        if n.op_type == "Gather" && n.input.len() == 2 {
            for kind in ["word", "position", "token_type"] {
                if n.input[0].ends_with(&format!("embeddings.{kind}_embeddings.weight")) {
                    tables.insert(kind, n.input[0].as_str());
                }
            }
        }
    }
    let table = |kind: &str| -> Result<Table, NotBert> {
        graph.table(
            tables
                .get(kind)
                .ok_or_else(|| format!("no {kind}_embeddings lookup"))?,
        )
    };
    let (word, position) = (table("word")?, table("position")?);
    let hidden = word.cols();
    let mut token_type0 = vec![0f32; hidden];
    if tables.contains_key("token_type") {
        let tt = table("token_type")?;
        if tt.cols() != hidden {
            return Err(format!(
                "token-type embeddings are {} wide, not {hidden}",
                tt.cols()
            ));
        }
        tt.row(0, &mut token_type0);
    }
    if position.cols() != hidden {
        return Err("embedding widths differ".into());
    }

    // Weight products, by the bias added to them.
    let mut linears: HashMap<(usize, usize), Weight> = HashMap::new();
    let mut constant_matmuls = 0;
    let mut query_out: Option<&str> = None;
    for n in &g.node {
        if n.op_type != "MatMul" || n.input.len() != 2 {
            continue;
        }
        let Ok((m, k, cols)) = graph.matrix(&n.input[1]) else {
            continue; // activation × activation (attention)
        };
        constant_matmuls += 1;
        let adds = graph
            .consumers
            .get(n.output[0].as_str())
            .cloned()
            .unwrap_or_default();
        let [add] = adds.as_slice() else {
            return Err(format!("MatMul {} feeds {} nodes", n.name, adds.len()));
        };
        let bias_name = add
            .input
            .iter()
            .find(|i| *i != &n.output[0])
            .map(|i| graph.origin(i))
            .filter(|_| add.op_type == "Add")
            .ok_or_else(|| format!("MatMul {} is not followed by a bias", n.name))?;
        let (layer, role) = parse_role(bias_name)
            .ok_or_else(|| format!("bias {bias_name} names no BERT weight"))?;
        let bias = f32s(
            graph
                .inits
                .get(bias_name)
                .ok_or_else(|| format!("bias {bias_name} is not a constant"))?,
        )?;
        if bias.len() != cols {
            return Err(format!(
                "bias {bias_name} has {} values for {cols} columns",
                bias.len()
            ));
        }
        if role == 0 && layer == 0 {
            query_out = Some(add.output[0].as_str());
        }
        if linears
            .insert((layer, role), ((m, k, cols), bias))
            .is_some()
        {
            return Err(format!("two weights for {bias_name}"));
        }
    }
    let layers_n = linears.keys().map(|(l, _)| l + 1).max().unwrap_or(0);
    if layers_n == 0 || constant_matmuls != 6 * layers_n || linears.len() != 6 * layers_n {
        return Err(format!(
            "{constant_matmuls} weight products for {layers_n} layers (expected 6 each)"
        ));
    }

    // LayerNorms by their weight's name.
    let mut norms: HashMap<String, (Norm, &str)> = HashMap::new();
    for n in &g.node {
        if n.op_type != "LayerNormalization" || n.input.len() != 3 {
            continue;
        }
        let wname = graph.origin(&n.input[1]);
        let Some(prefix) = wname.strip_suffix("LayerNorm.weight") else {
            return Err(format!("LayerNormalization with weight {wname}"));
        };
        let get = |v: &str| {
            graph
                .inits
                .get(graph.origin(v))
                .ok_or_else(|| format!("LayerNorm parameter {v} is not a constant"))
                .and_then(|t| f32s(t))
        };
        if attr_i(n, "axis").unwrap_or(-1) != -1 {
            return Err("LayerNormalization over another axis than the last".into());
        }
        let norm = Norm {
            gamma: get(&n.input[1])?,
            beta: get(&n.input[2])?,
            eps: attr_f(n, "epsilon").unwrap_or(1e-5),
        };
        if norm.gamma.len() != hidden || norm.beta.len() != hidden {
            return Err("LayerNorm width".into());
        }
        let key = match prefix.rfind("encoder.layer.") {
            Some(i) => prefix[i..].to_string(),
            None if prefix.ends_with("embeddings.") => "embeddings.".into(),
            None => return Err(format!("LayerNorm {wname}")),
        };
        norms.insert(key, (norm, n.output[0].as_str()));
    }
    if norms.len() != 1 + 2 * layers_n {
        return Err(format!("{} LayerNorms for {layers_n} layers", norms.len()));
    }
    let count = |op: &str| g.node.iter().filter(|n| n.op_type == op).count();
    if count("Softmax") != layers_n || count("Erf") != layers_n || count("Tanh") != 0 {
        return Err("not one softmax and one erf GELU per layer".into());
    }
    // The token states are the last LayerNorm's output.
    let last = format!("encoder.layer.{}.output.", layers_n - 1);
    let (_, last_out) = norms.get(&last).ok_or("no final LayerNorm")?;
    if graph.origin(output) != *last_out {
        return Err(format!("output {output} is not the last layer's LayerNorm"));
    }
    // Head size: the last entry of the shape the query is reshaped by.
    let query_out = query_out.ok_or("no query product in layer 0")?;
    let head_dim = graph
        .consumers
        .get(query_out)
        .into_iter()
        .flatten()
        .find(|n| n.op_type == "Reshape")
        .and_then(|r| graph.producer.get(r.input.get(1)?.as_str()))
        .filter(|c| c.op_type == "Concat")
        .and_then(|c| {
            let last = graph.constant(c.input.last()?)?;
            ints(last).first().copied()
        })
        .filter(|&d| d > 0 && hidden % d as usize == 0)
        .ok_or("cannot tell the attention head size")? as usize;

    let mut layers = Vec::with_capacity(layers_n);
    for l in 0..layers_n {
        let mut take = |role: usize| linears.remove(&(l, role)).expect("counted above");
        let (q, k, v) = (take(0), take(1), take(2));
        let (out, up, down) = (take(3), take(4), take(5));
        let dims = |x: &Weight| (x.0 .1, x.0 .2);
        if [&q, &k, &v, &out]
            .iter()
            .any(|x| dims(x) != (hidden, hidden))
            || dims(&up).0 != hidden
            || dims(&down) != (dims(&up).1, hidden)
        {
            return Err(format!("layer {l}: weight shapes are not a BERT layer's"));
        }
        let linear = |x: Weight| Linear {
            w: pack(&[&x.0]),
            bias: x.1,
        };
        // q, k, v as one [hidden, 3·hidden] product.
        let qkv = Linear {
            w: pack(&[&q.0, &k.0, &v.0]),
            bias: [q.1, k.1, v.1].concat(),
        };
        let (out, up, down) = (linear(out), linear(up), linear(down));
        let mut norm = |name: String| norms.remove(&name).map(|(n, _)| n).ok_or(name);
        layers.push(Layer {
            qkv,
            out,
            norm1: norm(format!("encoder.layer.{l}.attention.output."))?,
            up,
            down,
            norm2: norm(format!("encoder.layer.{l}.output."))?,
        });
    }
    let emb_norm = norms
        .remove("embeddings.")
        .ok_or("no embedding LayerNorm")?
        .0;
    Ok(Bert {
        hidden,
        heads: hidden / head_dim,
        word,
        position,
        token_type0,
        emb_norm,
        layers,
    })
}

/// `…encoder.layer.N.<role>.bias` → (N, role index).
fn parse_role(bias: &str) -> Option<(usize, usize)> {
    let rest = &bias[bias.rfind("encoder.layer.")? + "encoder.layer.".len()..];
    let (n, role) = rest.split_once('.')?;
    let role = role.strip_suffix(".bias")?;
    Some((n.parse().ok()?, ROLES.iter().position(|r| *r == role)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_erf_are_accurate() {
        let mut worst_exp = 0f64;
        let mut x = -80f32;
        while x < 80.0 {
            let rel =
                ((exp(Lane::splat(x)).first() as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            worst_exp = worst_exp.max(rel);
            x += 0.01;
        }
        assert!(worst_exp < 5e-7, "exp relative error {worst_exp}");
        // erf against a series/continued-fraction-free reference: erf(x) = 1 - erfc, via f64 integration.
        let erf64 = |x: f64| {
            // Simpson over [0, x] of 2/√π e^{-t²}.
            let n = 2000;
            let h = x / n as f64;
            let f = |t: f64| (-t * t).exp();
            let mut s = f(0.0) + f(x);
            for i in 1..n {
                s += f(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
            }
            s * h / 3.0 * 2.0 / std::f64::consts::PI.sqrt()
        };
        let mut worst = 0f64;
        for i in -6000..=6000 {
            let x = i as f32 / 1000.0;
            worst = worst.max((erf(Lane::splat(x)).first() as f64 - erf64(x as f64)).abs());
        }
        // Method error ≤ 6e-8 (see `erf`) plus the f32 rounding of a result below 1 (≤ 6e-8 per operation, two).
        assert!(worst < 2e-7, "erf absolute error {worst}");
    }

    #[test]
    fn roles_parse_from_bias_names() {
        assert_eq!(
            parse_role("inner.encoder.layer.11.attention.self.value.bias"),
            Some((11, 2))
        );
        assert_eq!(
            parse_role("model.0.auto_model.encoder.layer.0.output.dense.bias"),
            Some((0, 5))
        );
        assert_eq!(parse_role("encoder.layer.0.output.LayerNorm.bias"), None);
    }
}
