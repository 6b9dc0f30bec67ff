//! The decoder: llama-family transformers (SmolLM2, Llama 2/3.x, TinyLlama, Mistral-style GQA) and Qwen2 (q/k/v
//! biases, NeoX RoPE), run on the CPU with the weights kept quantized in the GGUF bytes.
//!
//! Per layer: RMSNorm → q/k/v projections (+ biases) → RoPE → KV cache → causal attention with grouped KV heads →
//! output projection + residual → RMSNorm → SwiGLU feed-forward + residual. Then the final norm and the output
//! projection (tied to the token embeddings when the file has no `output.weight`).
//!
//! A prompt goes through in batches (matrix × matrix: each weight row is dequantized once per batch), decoding one
//! token at a time (matrix × vector, dequantizing inside the dot product).

use super::gguf::{Gguf, TensorInfo};
use super::lora::{Adapter, Target};
use super::quant::{self, GgmlType};
use crate::{Error, Result};

fn bad(detail: impl Into<String>) -> Error {
    Error::Model {
        file: "model.gguf",
        detail: detail.into(),
    }
}

/// Architectures this build runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// `llama` (SmolLM2, Llama 2/3.x, TinyLlama, Mistral).
    Llama,
    /// `qwen2`.
    Qwen2,
}

/// Hyper-parameters, read from `{arch}.*` metadata and checked against the tensors.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    /// Architecture.
    pub arch: Arch,
    /// Layers.
    pub n_layer: usize,
    /// Hidden size.
    pub n_embd: usize,
    /// Feed-forward size.
    pub n_ff: usize,
    /// Attention heads.
    pub n_head: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_head`).
    pub n_kv_head: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Dimensions of each head that RoPE rotates.
    pub rope_dim: usize,
    /// RoPE base frequency.
    pub rope_base: f64,
    /// Linear RoPE scaling: positions are multiplied by this (1 / `rope.scaling.factor`).
    pub rope_pos_scale: f64,
    /// NeoX-style rotation (halves) instead of adjacent pairs.
    pub rope_neox: bool,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// Context the model was trained with.
    pub n_ctx_train: usize,
    /// Vocabulary size (rows of the embedding table).
    pub n_vocab: usize,
}

/// A weight matrix: a byte range of the model file, `rows` × `cols`, in a ggml type.
#[derive(Debug, Clone, Copy)]
pub struct Mat {
    /// Element type.
    pub ty: GgmlType,
    /// Absolute byte offset of the data in the model bytes.
    pub start: usize,
    /// Byte length.
    pub len: usize,
    /// Output features.
    pub rows: usize,
    /// Input features (the contiguous dimension).
    pub cols: usize,
}

impl Mat {
    pub(crate) fn bytes<'a>(&self, data: &'a [u8]) -> &'a [u8] {
        &data[self.start..self.start + self.len]
    }
    /// `out[r] = W[r] · x` with `x` already quantized to int16 per 32-element block (decoding).
    pub fn apply_q(&self, data: &[u8], xq: &quant::QuantizedActs, out: &mut [f32]) {
        quant::matvec_q(self.ty, self.bytes(data), self.rows, self.cols, xq, out);
    }

    /// `out[i*rows + r] = W[r] · xs[i]` for `n` activations.
    pub fn apply(&self, data: &[u8], xs: &[f32], n: usize, out: &mut [f32]) {
        debug_assert_eq!(xs.len(), n * self.cols);
        debug_assert_eq!(out.len(), n * self.rows);
        if n == 1 {
            quant::matvec(self.ty, self.bytes(data), self.rows, self.cols, xs, out);
        } else {
            quant::matmul(self.ty, self.bytes(data), self.rows, self.cols, xs, n, out);
        }
    }
}

/// One decoder layer's weights.
#[derive(Debug, Clone)]
pub struct Layer {
    pub(crate) attn_norm: Vec<f32>,
    /// Query projection.
    pub wq: Mat,
    /// Key projection.
    pub wk: Mat,
    /// Value projection.
    pub wv: Mat,
    /// Attention output projection.
    pub wo: Mat,
    pub(crate) bq: Option<Vec<f32>>,
    pub(crate) bk: Option<Vec<f32>>,
    pub(crate) bv: Option<Vec<f32>>,
    pub(crate) ffn_norm: Vec<f32>,
    /// Feed-forward gate projection.
    pub w_gate: Mat,
    /// Feed-forward up projection.
    pub w_up: Mat,
    /// Feed-forward down projection.
    pub w_down: Mat,
}

/// The weights of a decoder, as ranges of the model bytes (norms and biases copied out as f32).
#[derive(Debug, Clone)]
pub struct Weights {
    /// Configuration.
    pub cfg: ModelConfig,
    /// Token embeddings (`n_vocab` rows).
    pub tok_embd: Mat,
    /// Layers.
    pub layers: Vec<Layer>,
    pub(crate) output_norm: Vec<f32>,
    /// Output projection (the embeddings when tied).
    pub output: Mat,
    /// RoPE inverse frequencies (with `rope_freqs.weight` factors applied when present).
    inv_freq: Vec<f64>,
    /// Decode one token with integer dot products: each activation vector is quantized once to int16 per
    /// 32-element block (error ≤ half a step of 1/32767 of the block's largest value) and every quantized weight
    /// row is dotted with it in i32. On by default (1.5–2× faster decoding); off, decoding uses the f32 dot
    /// products that prefill uses.
    pub int_acts: bool,
}

fn meta_usize(g: &Gguf, key: &str) -> Result<usize> {
    let v = g
        .u64(key)?
        .ok_or_else(|| bad(format!("metadata {key} is missing")))?;
    if v == 0 || v > 1 << 20 {
        return Err(bad(format!(
            "metadata {key} = {v} is out of range (1..2^20)"
        )));
    }
    Ok(v as usize)
}

fn mat(g: &Gguf, name: &str, rows: usize, cols: usize) -> Result<Mat> {
    let t = g
        .tensor(name)
        .ok_or_else(|| bad(format!("tensor {name} is missing")))?;
    let (r, c) = t.rows_cols();
    if t.dims.len() > 2 || r != rows || c != cols {
        return Err(bad(format!(
            "tensor {name} has shape {:?}, expected [{cols}, {rows}]",
            t.dims
        )));
    }
    Ok(Mat {
        ty: t.ty,
        start: t.start,
        len: t.len,
        rows,
        cols,
    })
}

fn vector(g: &Gguf, data: &[u8], name: &str, len: usize) -> Result<Vec<f32>> {
    let t: &TensorInfo = g
        .tensor(name)
        .ok_or_else(|| bad(format!("tensor {name} is missing")))?;
    if t.elements() != len as u64 || t.dims.len() != 1 {
        return Err(bad(format!(
            "tensor {name} has shape {:?}, expected [{len}]",
            t.dims
        )));
    }
    let mut out = vec![0.0; len];
    quant::dequantize_row(t.ty, &data[t.start..t.start + t.len], &mut out);
    if out.iter().any(|x| !x.is_finite()) {
        return Err(bad(format!("tensor {name} holds NaN or infinite values")));
    }
    Ok(out)
}

impl Weights {
    /// Read and check the configuration and every tensor's shape. `data` is the whole file.
    pub fn from_gguf(g: &Gguf, data: &[u8]) -> Result<Weights> {
        let arch_name = g
            .str("general.architecture")?
            .ok_or_else(|| bad("general.architecture is missing"))?;
        let arch = match arch_name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(bad(format!(
                    "architecture {other:?} is not supported (llama and qwen2 are)"
                )))
            }
        };
        if let Some(t) = g.str("general.type")? {
            if t != "model" {
                return Err(bad(format!(
                    "general.type is {t:?}: this file is not a model (an adapter goes through the LoRA loader)"
                )));
            }
        }
        let a = arch_name;
        let n_layer = meta_usize(g, &format!("{a}.block_count"))?;
        let n_embd = meta_usize(g, &format!("{a}.embedding_length"))?;
        let n_ff = meta_usize(g, &format!("{a}.feed_forward_length"))?;
        let n_head = meta_usize(g, &format!("{a}.attention.head_count"))?;
        let n_kv_head = match g.u64(&format!("{a}.attention.head_count_kv"))? {
            None => n_head,
            Some(_) => meta_usize(g, &format!("{a}.attention.head_count_kv"))?,
        };
        if n_embd % n_head != 0 || n_head % n_kv_head != 0 {
            return Err(bad(format!(
                "embedding {n_embd}, heads {n_head} and KV heads {n_kv_head} do not divide evenly"
            )));
        }
        let head_dim = match g.u64(&format!("{a}.attention.key_length"))? {
            None => n_embd / n_head,
            Some(_) => meta_usize(g, &format!("{a}.attention.key_length"))?,
        };
        let rope_dim = match g.u64(&format!("{a}.rope.dimension_count"))? {
            None => head_dim,
            Some(_) => meta_usize(g, &format!("{a}.rope.dimension_count"))?,
        };
        if rope_dim > head_dim || rope_dim % 2 != 0 || head_dim % 2 != 0 {
            return Err(bad(format!(
                "RoPE dimension {rope_dim} does not fit head size {head_dim}"
            )));
        }
        let rope_base = g.f64(&format!("{a}.rope.freq_base"))?.unwrap_or(10_000.0);
        let scaling = g.str(&format!("{a}.rope.scaling.type"))?.unwrap_or("none");
        let factor = g.f64(&format!("{a}.rope.scaling.factor"))?.unwrap_or(1.0);
        let rope_pos_scale = match scaling {
            "none" => 1.0,
            "linear" => 1.0 / factor,
            other => {
                return Err(bad(format!(
                    "RoPE scaling {other:?} is not supported (linear is)"
                )))
            }
        };
        let eps = g
            .f64(&format!("{a}.attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5);
        let ok = rope_base.is_finite()
            && rope_base > 1.0
            && rope_pos_scale.is_finite()
            && rope_pos_scale > 0.0
            && eps.is_finite()
            && eps > 0.0
            && eps < 1.0;
        if !ok {
            return Err(bad(format!(
                "rope base {rope_base}, rope scale {rope_pos_scale} or norm epsilon {eps} out of range"
            )));
        }
        let n_ctx_train = g
            .u64(&format!("{a}.context_length"))?
            .unwrap_or(2048)
            .clamp(1, 1 << 24) as usize;
        let emb = g
            .tensor("token_embd.weight")
            .ok_or_else(|| bad("tensor token_embd.weight is missing"))?;
        let (n_vocab, emb_cols) = emb.rows_cols();
        if emb_cols != n_embd {
            return Err(bad(format!(
                "token_embd.weight has {emb_cols} columns but the embedding length is {n_embd}"
            )));
        }
        if let Some(v) = g.u64(&format!("{a}.vocab_size"))? {
            if v as usize != n_vocab {
                return Err(bad(format!(
                    "{a}.vocab_size is {v} but token_embd.weight has {n_vocab} rows"
                )));
            }
        }
        let cfg = ModelConfig {
            arch,
            n_layer,
            n_embd,
            n_ff,
            n_head,
            n_kv_head,
            head_dim,
            rope_dim,
            rope_base,
            rope_pos_scale,
            rope_neox: arch == Arch::Qwen2,
            eps: eps as f32,
            n_ctx_train,
            n_vocab,
        };
        let tok_embd = mat(g, "token_embd.weight", n_vocab, n_embd)?;
        let q_dim = n_head * head_dim;
        let kv_dim = n_kv_head * head_dim;
        let mut layers = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let p = |s: &str| format!("blk.{i}.{s}");
            let bias = |s: &str, n: usize| -> Result<Option<Vec<f32>>> {
                match g.tensor(&p(s)) {
                    None => Ok(None),
                    Some(_) => vector(g, data, &p(s), n).map(Some),
                }
            };
            layers.push(Layer {
                attn_norm: vector(g, data, &p("attn_norm.weight"), n_embd)?,
                wq: mat(g, &p("attn_q.weight"), q_dim, n_embd)?,
                wk: mat(g, &p("attn_k.weight"), kv_dim, n_embd)?,
                wv: mat(g, &p("attn_v.weight"), kv_dim, n_embd)?,
                wo: mat(g, &p("attn_output.weight"), n_embd, q_dim)?,
                bq: bias("attn_q.bias", q_dim)?,
                bk: bias("attn_k.bias", kv_dim)?,
                bv: bias("attn_v.bias", kv_dim)?,
                ffn_norm: vector(g, data, &p("ffn_norm.weight"), n_embd)?,
                w_gate: mat(g, &p("ffn_gate.weight"), n_ff, n_embd)?,
                w_up: mat(g, &p("ffn_up.weight"), n_ff, n_embd)?,
                w_down: mat(g, &p("ffn_down.weight"), n_embd, n_ff)?,
            });
        }
        let output_norm = vector(g, data, "output_norm.weight", n_embd)?;
        let output = match g.tensor("output.weight") {
            Some(_) => mat(g, "output.weight", n_vocab, n_embd)?,
            None => tok_embd,
        };
        let half = rope_dim / 2;
        let mut inv_freq: Vec<f64> = (0..half)
            .map(|i| rope_base.powf(-(2.0 * i as f64) / rope_dim as f64))
            .collect();
        if g.tensor("rope_freqs.weight").is_some() {
            let f = vector(g, data, "rope_freqs.weight", half)?;
            for (x, d) in inv_freq.iter_mut().zip(f) {
                if d <= 0.0 {
                    return Err(bad("rope_freqs.weight has a factor ≤ 0"));
                }
                *x /= d as f64;
            }
        }
        Ok(Weights {
            cfg,
            tok_embd,
            layers,
            output_norm,
            output,
            inv_freq,
            int_acts: true,
        })
    }

    /// Integer decoding quantizes activations in 32-element blocks: every input width must be a multiple of 32
    /// (true of every quantized weight, whose rows are whole blocks).
    fn int_dims_ok(&self) -> bool {
        let c = &self.cfg;
        [c.n_embd, c.n_head * c.head_dim, c.n_ff]
            .iter()
            .all(|d| d % 32 == 0)
    }

    /// Bytes of KV cache per token of context (f32 keys and values, all layers).
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.cfg.n_layer * self.cfg.n_kv_head * self.cfg.head_dim * 4
    }
}

/// The key/value cache of one conversation, sized for `n_ctx` tokens.
#[derive(Debug, Clone)]
pub struct KvCache {
    k: Vec<f32>,
    v: Vec<f32>,
    n_ctx: usize,
    kv_dim: usize,
    /// Tokens already in the cache.
    pub len: usize,
}

impl KvCache {
    /// An empty cache for `n_ctx` tokens.
    pub fn new(w: &Weights, n_ctx: usize) -> Result<KvCache> {
        if n_ctx == 0 || n_ctx > 1 << 20 {
            return Err(Error::Config(format!("context size {n_ctx} out of range")));
        }
        let kv_dim = w.cfg.n_kv_head * w.cfg.head_dim;
        let n = w
            .cfg
            .n_layer
            .checked_mul(n_ctx)
            .and_then(|x| x.checked_mul(kv_dim))
            .filter(|&n| n <= (isize::MAX as usize) / 8)
            .ok_or_else(|| Error::Config(format!("context size {n_ctx} is too large")))?;
        let mut k = Vec::new();
        let mut v = Vec::new();
        k.try_reserve_exact(n)
            .and_then(|_| v.try_reserve_exact(n))
            .map_err(|_| Error::ResourceLimit {
                what: "KV cache bytes",
                size: (2 * n * 4) as u64,
                limit: 0,
            })?;
        k.resize(n, 0.0);
        v.resize(n, 0.0);
        Ok(KvCache {
            k,
            v,
            n_ctx,
            kv_dim,
            len: 0,
        })
    }
    /// Capacity in tokens.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * 4
    }
    fn at(&self, layer: usize, pos: usize) -> usize {
        (layer * self.n_ctx + pos) * self.kv_dim
    }
}

/// The adapters a forward pass applies, each with the weight the request gives it.
pub type ActiveAdapters<'a> = [(&'a Adapter, f32)];

/// Applies the matrices that read one input, plus the active adapters' low-rank updates of those matrices.
/// Decoding (`int`) quantizes the input once to int16 blocks and takes integer dot products; otherwise f32
/// (matrix × vector for one token, matrix × matrix for a batch). LoRA products are always f32 on the f32 input.
struct Projector<'a> {
    int: bool,
    xq: quant::QuantizedActs,
    lora: &'a ActiveAdapters<'a>,
    tmp: Vec<f32>,
}

impl Projector<'_> {
    /// `mats`: (matrix, the target it is in `layer`, output).
    fn run(
        &mut self,
        data: &[u8],
        input: &[f32],
        n: usize,
        layer: usize,
        mats: &mut [(&Mat, Option<Target>, &mut [f32])],
    ) {
        if self.int {
            self.xq.quantize(input);
        }
        for (m, target, out) in mats.iter_mut() {
            if self.int {
                m.apply_q(data, &self.xq, out);
            } else {
                m.apply(data, input, n, out);
            }
            let Some(t) = target else { continue };
            for &(a, w) in self.lora {
                if let (Some(lm), true) = (a.get(layer, *t), w != 0.0) {
                    lm.add_to(input, n, w, out, &mut self.tmp);
                }
            }
        }
    }
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (xi, oi) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let ss: f32 = xi.iter().map(|v| v * v).sum::<f32>() / n as f32;
        let scale = 1.0 / (ss + eps).sqrt();
        for j in 0..n {
            oi[j] = xi[j] * scale * w[j];
        }
    }
}

fn add_bias(x: &mut [f32], b: &Option<Vec<f32>>) {
    if let Some(b) = b {
        for row in x.chunks_exact_mut(b.len()) {
            for (v, bi) in row.iter_mut().zip(b) {
                *v += bi;
            }
        }
    }
}

impl Weights {
    /// cos/sin of every rotation angle for positions `p0..p0 + n` (`n × rope_dim/2` pairs), computed in f64 once
    /// per forward pass and shared by all layers and heads.
    pub(crate) fn rope_table(&self, p0: usize, n: usize) -> Vec<(f32, f32)> {
        let c = &self.cfg;
        let mut t = Vec::with_capacity(n * self.inv_freq.len());
        for i in 0..n {
            let p = (p0 + i) as f64 * c.rope_pos_scale;
            for f in &self.inv_freq {
                let (sin, cos) = (p * f).sin_cos();
                t.push((cos as f32, sin as f32));
            }
        }
        t
    }

    pub(crate) fn rope(&self, x: &mut [f32], n_heads: usize, cs: &[(f32, f32)]) {
        let c = &self.cfg;
        let half = c.rope_dim / 2;
        for h in 0..n_heads {
            let head = &mut x[h * c.head_dim..(h + 1) * c.head_dim];
            for (i, &(cos, sin)) in cs.iter().enumerate().take(half) {
                let (a, b) = if c.rope_neox {
                    (i, i + half)
                } else {
                    (2 * i, 2 * i + 1)
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos - x1 * sin;
                head[b] = x0 * sin + x1 * cos;
            }
        }
    }

    /// Run `tokens` (at positions `cache.len..`) through the model with the `lora` adapters applied (each scaled
    /// by its weight), appending to the cache. Returns the logits of the last token (`n_vocab` values), or of
    /// every token when `all_logits`. Adapters must have been checked against these weights
    /// ([`Adapter::from_peft`], [`Adapter::from_gguf`], [`Adapter::set`]).
    pub fn forward(
        &self,
        data: &[u8],
        cache: &mut KvCache,
        tokens: &[u32],
        all_logits: bool,
        lora: &ActiveAdapters,
    ) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let n = tokens.len();
        if n == 0 {
            return Err(Error::InvalidQuery("no tokens to run".into()));
        }
        if cache.len + n > cache.n_ctx {
            return Err(Error::ContextOverflow {
                tokens: cache.len + n,
                context: cache.n_ctx,
            });
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.n_vocab) {
            return Err(Error::InvalidQuery(format!(
                "token id {t} is outside the vocabulary of {}",
                c.n_vocab
            )));
        }
        let (d, hd) = (c.n_embd, c.head_dim);
        let (q_dim, kv_dim) = (c.n_head * hd, c.n_kv_head * hd);
        let emb_row = self.tok_embd.ty.row_bytes(d).unwrap();
        let emb = self.tok_embd.bytes(data);
        let mut x = vec![0.0f32; n * d];
        for (i, &t) in tokens.iter().enumerate() {
            let row = &emb[t as usize * emb_row..(t as usize + 1) * emb_row];
            quant::dequantize_row(self.tok_embd.ty, row, &mut x[i * d..(i + 1) * d]);
        }
        let mut h = vec![0.0f32; n * d];
        let mut q = vec![0.0f32; n * q_dim];
        let mut k = vec![0.0f32; n * kv_dim];
        let mut v = vec![0.0f32; n * kv_dim];
        let mut att = vec![0.0f32; n * q_dim];
        let mut o = vec![0.0f32; n * d];
        let mut g = vec![0.0f32; n * c.n_ff];
        let mut u = vec![0.0f32; n * c.n_ff];
        let mut scores = vec![0.0f32; cache.len + n];
        let group = c.n_head / c.n_kv_head;
        let scale = 1.0 / (hd as f32).sqrt();
        let p0 = cache.len;
        let half = c.rope_dim / 2;
        let rope = self.rope_table(p0, n);
        // Decoding one token: activations quantized once per input vector, shared by the matrices reading it.
        let mut proj = Projector {
            int: self.int_acts && n == 1 && self.int_dims_ok(),
            xq: quant::QuantizedActs::new(),
            lora,
            tmp: Vec::new(),
        };
        for (li, l) in self.layers.iter().enumerate() {
            rms_norm(&x, &l.attn_norm, c.eps, &mut h);
            proj.run(
                data,
                &h,
                n,
                li,
                &mut [
                    (&l.wq, Some(Target::Q), &mut q),
                    (&l.wk, Some(Target::K), &mut k),
                    (&l.wv, Some(Target::V), &mut v),
                ],
            );
            add_bias(&mut q, &l.bq);
            add_bias(&mut k, &l.bk);
            add_bias(&mut v, &l.bv);
            for i in 0..n {
                let cs = &rope[i * half..(i + 1) * half];
                self.rope(&mut q[i * q_dim..(i + 1) * q_dim], c.n_head, cs);
                self.rope(&mut k[i * kv_dim..(i + 1) * kv_dim], c.n_kv_head, cs);
                let at = cache.at(li, p0 + i);
                cache.k[at..at + kv_dim].copy_from_slice(&k[i * kv_dim..(i + 1) * kv_dim]);
                cache.v[at..at + kv_dim].copy_from_slice(&v[i * kv_dim..(i + 1) * kv_dim]);
            }
            let base = cache.at(li, 0);
            for i in 0..n {
                let len = p0 + i + 1;
                for hh in 0..c.n_head {
                    let kvh = hh / group;
                    let qh = &q[i * q_dim + hh * hd..i * q_dim + (hh + 1) * hd];
                    let s = &mut scores[..len];
                    for (j, sj) in s.iter_mut().enumerate() {
                        let kj = base + j * kv_dim + kvh * hd;
                        *sj = quant::dot_f32(qh, &cache.k[kj..kj + hd]) * scale;
                    }
                    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0f32;
                    for sj in s.iter_mut() {
                        *sj = (*sj - max).exp();
                        sum += *sj;
                    }
                    let out = &mut att[i * q_dim + hh * hd..i * q_dim + (hh + 1) * hd];
                    out.fill(0.0);
                    for (j, &sj) in s.iter().enumerate() {
                        let w = sj / sum;
                        let vj = base + j * kv_dim + kvh * hd;
                        for (oo, vv) in out.iter_mut().zip(&cache.v[vj..vj + hd]) {
                            *oo += w * vv;
                        }
                    }
                }
            }
            proj.run(data, &att, n, li, &mut [(&l.wo, Some(Target::O), &mut o)]);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            rms_norm(&x, &l.ffn_norm, c.eps, &mut h);
            proj.run(
                data,
                &h,
                n,
                li,
                &mut [
                    (&l.w_gate, Some(Target::Gate), &mut g),
                    (&l.w_up, Some(Target::Up), &mut u),
                ],
            );
            for (gi, ui) in g.iter_mut().zip(&u) {
                *gi = *gi / (1.0 + (-*gi).exp()) * ui;
            }
            proj.run(
                data,
                &g,
                n,
                li,
                &mut [(&l.w_down, Some(Target::Down), &mut o)],
            );
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        }
        cache.len += n;
        let rows: &[f32] = if all_logits { &x } else { &x[(n - 1) * d..] };
        let m = rows.len() / d;
        let mut normed = vec![0.0f32; m * d];
        rms_norm(rows, &self.output_norm, c.eps, &mut normed);
        let mut logits = vec![0.0f32; m * c.n_vocab];
        // With integer decoding n = 1, so m = 1 too.
        proj.run(
            data,
            &normed,
            m,
            0,
            &mut [(&self.output, None, &mut logits)],
        );
        Ok(logits)
    }
}
