//! LoRA adapters, applied unmerged at run time: `y = W·x + Σᵢ wᵢ · sᵢ · Bᵢ(Aᵢ·x)` where `W` stays quantized in the
//! model file, `Aᵢ` (rank × in) and `Bᵢ` (out × rank) are kept in f32 beside it, `sᵢ` is the adapter's own scale
//! (alpha / rank, or alpha / √rank with rsLoRA) and `wᵢ` the weight the request gives it. Many adapters stay
//! resident; each request picks none, one or a weighted mix, and nothing of the base is copied or reloaded.
//!
//! Two file formats:
//! - PEFT: `adapter_config.json` + `adapter_model.safetensors` (keys such as
//!   `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`; Hugging Face row order). For a `llama` base,
//!   whose GGUF q/k rows llama.cpp's converter permuted to interleaved RoPE pairs, the rows of q/k `lora_B` get the
//!   same permutation (per head for q, per KV head for k).
//! - GGUF-LoRA (`general.type = adapter`, `adapter.lora.alpha`, `blk.N.attn_q.weight.lora_a` / `.lora_b`), already
//!   in GGUF order; scale alpha / rank (1 when alpha is 0, as llama.cpp does).
//!
//! Everything is checked against the loaded base before an adapter exists: module names, layer indices, shapes,
//! ranks against the config, finite values. PEFT only warns about a mismatch; lorag refuses, naming the tensor.

use super::gguf::{Gguf, GgufLimits};
use super::model::{Arch, Layer, Mat, Weights};
use super::quant;
use super::safetensors::{self, SafeTensors, SafetensorsLimits};
use crate::{Error, Result};

fn err(tensor: impl Into<String>, detail: impl Into<String>) -> Error {
    Error::Adapter {
        tensor: tensor.into(),
        detail: detail.into(),
    }
}

/// A projection LoRA can target.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Attention query projection (`q_proj`, `attn_q`).
    Q,
    /// Attention key projection (`k_proj`, `attn_k`).
    K,
    /// Attention value projection (`v_proj`, `attn_v`).
    V,
    /// Attention output projection (`o_proj`, `attn_output`).
    O,
    /// Feed-forward gate (`gate_proj`, `ffn_gate`).
    Gate,
    /// Feed-forward up (`up_proj`, `ffn_up`).
    Up,
    /// Feed-forward down (`down_proj`, `ffn_down`).
    Down,
}

impl Target {
    /// Every target, in layer order.
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// The Hugging Face module name (`q_proj`, …).
    pub fn peft_name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// The Hugging Face module path inside a layer (`self_attn.q_proj`, `mlp.gate_proj`, …).
    pub fn peft_path(self) -> &'static str {
        match self {
            Target::Q => "self_attn.q_proj",
            Target::K => "self_attn.k_proj",
            Target::V => "self_attn.v_proj",
            Target::O => "self_attn.o_proj",
            Target::Gate => "mlp.gate_proj",
            Target::Up => "mlp.up_proj",
            Target::Down => "mlp.down_proj",
        }
    }

    /// The GGUF tensor stem (`attn_q`, …).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Target::Q => "attn_q",
            Target::K => "attn_k",
            Target::V => "attn_v",
            Target::O => "attn_output",
            Target::Gate => "ffn_gate",
            Target::Up => "ffn_up",
            Target::Down => "ffn_down",
        }
    }

    /// The target with this Hugging Face module name, GGUF stem, or short name (`q`, `gate`, …).
    pub fn parse(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| {
            name == t.peft_name()
                || name == t.gguf_name()
                || name == t.peft_name().trim_end_matches("_proj")
        })
    }

    /// Position in [`Target::ALL`] (also the order of a GPU layer's matrices).
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// The base matrix this target adapts in `layer`.
    pub fn mat(self, layer: &Layer) -> &Mat {
        match self {
            Target::Q => &layer.wq,
            Target::K => &layer.wk,
            Target::V => &layer.wv,
            Target::O => &layer.wo,
            Target::Gate => &layer.w_gate,
            Target::Up => &layer.w_up,
            Target::Down => &layer.w_down,
        }
    }
}

/// One adapted matrix: `A` (rank × cols, row-major) and `Bᵀ` (rank × rows, so the update is a sum of `rank` scaled
/// rows), with its scale. Rows are in GGUF order.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraMat {
    /// Rank.
    pub rank: usize,
    /// Output features of the base matrix.
    pub rows: usize,
    /// Input features of the base matrix.
    pub cols: usize,
    /// `A`, rank × cols.
    pub a: Vec<f32>,
    /// `Bᵀ`, rank × rows.
    pub bt: Vec<f32>,
    /// alpha / rank (or alpha / √rank with rsLoRA).
    pub scale: f32,
}

impl LoraMat {
    /// `out[i] += weight · scale · B(A · x[i])` for the `n` inputs in `x`; `tmp` is scratch.
    pub fn add_to(&self, x: &[f32], n: usize, weight: f32, out: &mut [f32], tmp: &mut Vec<f32>) {
        let (r, s) = (self.rank, weight * self.scale);
        tmp.clear();
        tmp.resize(r, 0.0);
        for i in 0..n {
            let xi = &x[i * self.cols..(i + 1) * self.cols];
            for (j, t) in tmp.iter_mut().enumerate() {
                *t = quant::dot_f32(&self.a[j * self.cols..(j + 1) * self.cols], xi) * s;
            }
            let oi = &mut out[i * self.rows..(i + 1) * self.rows];
            for (j, &t) in tmp.iter().enumerate() {
                let b = &self.bt[j * self.rows..(j + 1) * self.rows];
                for (o, bv) in oi.iter_mut().zip(b) {
                    *o += t * bv;
                }
            }
        }
    }

    /// Parameters (A and B elements).
    pub fn params(&self) -> usize {
        self.a.len() + self.bt.len()
    }
}

/// Where an adapter came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterFormat {
    /// `adapter_config.json` + `adapter_model.safetensors`.
    Peft,
    /// A GGUF-LoRA file.
    Gguf,
    /// Built in memory (training).
    Memory,
}

/// A LoRA adapter checked against one base model.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    /// Source format.
    pub format: AdapterFormat,
    layers: Vec<[Option<LoraMat>; 7]>,
}

/// A summary of an adapter.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdapterInfo {
    /// Source format.
    pub format: AdapterFormat,
    /// Targets present in at least one layer.
    pub targets: Vec<Target>,
    /// Layers with at least one adapted matrix.
    pub layers: usize,
    /// Smallest and largest rank.
    pub rank: (usize, usize),
    /// Trainable parameters (A and B elements).
    pub params: usize,
    /// Bytes held (f32).
    pub bytes: usize,
}

impl Adapter {
    /// An adapter with no matrices for a base of `n_layer` layers (filled with [`Adapter::set`]).
    pub fn empty(n_layer: usize, format: AdapterFormat) -> Adapter {
        Adapter {
            format,
            layers: (0..n_layer).map(|_| Default::default()).collect(),
        }
    }

    /// Layers this adapter was built for.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// The adapted matrix of `target` in `layer`, if any.
    pub fn get(&self, layer: usize, target: Target) -> Option<&LoraMat> {
        self.layers.get(layer)?[target.index()].as_ref()
    }

    /// Install `m` for `target` in `layer` after checking it against `base` (`name` is used in errors).
    pub fn set(
        &mut self,
        base: &Weights,
        name: &str,
        layer: usize,
        target: Target,
        m: LoraMat,
    ) -> Result<()> {
        let n_layer = base.cfg.n_layer;
        if layer >= n_layer || self.layers.len() != n_layer {
            return Err(err(
                name,
                format!("layer {layer} does not exist: the base model has {n_layer} layers"),
            ));
        }
        let bm = target.mat(&base.layers[layer]);
        if m.rows != bm.rows || m.cols != bm.cols {
            return Err(err(
                name,
                format!(
                    "adapts a {}×{} matrix but the base's {} is {}×{} (an adapter for another model?)",
                    m.rows,
                    m.cols,
                    target.gguf_name(),
                    bm.rows,
                    bm.cols
                ),
            ));
        }
        if m.rank == 0 {
            return Err(err(name, "rank is 0"));
        }
        if m.rank > 1 << 14 {
            return Err(err(name, format!("rank {} is out of range", m.rank)));
        }
        if m.a.len() != m.rank * m.cols || m.bt.len() != m.rank * m.rows {
            return Err(err(name, "A or B holds the wrong number of values"));
        }
        if !m.scale.is_finite() {
            return Err(err(name, format!("scale {} is not finite", m.scale)));
        }
        if m.a.iter().chain(&m.bt).any(|x| !x.is_finite()) {
            return Err(err(name, "holds NaN or infinite values"));
        }
        self.layers[layer][target.index()] = Some(m);
        Ok(())
    }

    /// Every adapted matrix: (layer, target, matrix), in layer and target order.
    pub fn mats(&self) -> impl Iterator<Item = (usize, Target, &LoraMat)> {
        self.layers.iter().enumerate().flat_map(|(l, ms)| {
            Target::ALL
                .into_iter()
                .filter_map(move |t| ms[t.index()].as_ref().map(|m| (l, t, m)))
        })
    }

    /// A summary.
    pub fn info(&self) -> AdapterInfo {
        let mats: Vec<(usize, Target, &LoraMat)> = self.mats().collect();
        let mut targets: Vec<Target> = mats.iter().map(|m| m.1).collect();
        targets.sort();
        targets.dedup();
        let mut layers: Vec<usize> = mats.iter().map(|m| m.0).collect();
        layers.dedup();
        let params: usize = mats.iter().map(|m| m.2.params()).sum();
        AdapterInfo {
            format: self.format,
            targets,
            layers: layers.len(),
            rank: (
                mats.iter().map(|m| m.2.rank).min().unwrap_or(0),
                mats.iter().map(|m| m.2.rank).max().unwrap_or(0),
            ),
            params,
            bytes: params * 4,
        }
    }

    /// The adapter as a GGUF-LoRA file for a base of architecture `arch` (f32 tensors). One file has one alpha
    /// (scale = alpha / rank): alpha is taken from the first matrix, and a matrix whose scale differs has its B
    /// multiplied by the difference, so loading the file gives the same products.
    pub fn to_gguf(&self, arch: Arch) -> Vec<u8> {
        let mats: Vec<(usize, Target, &LoraMat)> = self.mats().collect();
        let alpha = mats
            .first()
            .map_or(1.0, |m| m.2.scale * m.2.rank as f32)
            .max(f32::MIN_POSITIVE);
        let mut w = super::gguf::GgufWriter::new();
        w.str(
            "general.architecture",
            match arch {
                Arch::Llama => "llama",
                Arch::Qwen2 => "qwen2",
            },
        )
        .str("general.type", "adapter")
        .str("adapter.type", "lora")
        .f32("adapter.lora.alpha", alpha);
        let bytes = |v: &mut dyn Iterator<Item = f32>| v.flat_map(f32::to_le_bytes).collect();
        for (l, t, m) in mats {
            let stem = format!("blk.{l}.{}.weight", t.gguf_name());
            let k = m.scale / (alpha / m.rank as f32);
            let b = bytes(
                &mut (0..m.rows)
                    .flat_map(|r| (0..m.rank).map(move |j| (r, j)))
                    .map(|(r, j)| m.bt[j * m.rows + r] * k),
            );
            w.tensor(
                &format!("{stem}.lora_a"),
                &[m.cols as u64, m.rank as u64],
                quant::GgmlType::F32,
                bytes(&mut m.a.iter().copied()),
            );
            w.tensor(
                &format!("{stem}.lora_b"),
                &[m.rank as u64, m.rows as u64],
                quant::GgmlType::F32,
                b,
            );
        }
        w.to_bytes()
    }

    fn check_nonempty(self, file: &str) -> Result<Adapter> {
        if self.layers.iter().all(|l| l.iter().all(Option::is_none)) {
            return Err(err(file, "the adapter holds no LoRA tensors"));
        }
        Ok(self)
    }

    /// Load a GGUF-LoRA file and check it against `base`.
    pub fn from_gguf(bytes: &[u8], base: &Weights) -> Result<Adapter> {
        let file = "adapter.gguf";
        let g = Gguf::parse(bytes, GgufLimits::default()).map_err(|e| err(file, e.to_string()))?;
        match g.str("general.type")? {
            Some("adapter") => {}
            other => {
                return Err(err(
                    "general.type",
                    format!("is {other:?}, not \"adapter\": this file is not a LoRA adapter"),
                ))
            }
        }
        if let Some(t) = g.str("adapter.type")? {
            if t != "lora" {
                return Err(err(
                    "adapter.type",
                    format!("{t:?} is not supported (lora is)"),
                ));
            }
        }
        let base_arch = match base.cfg.arch {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        };
        if let Some(a) = g.str("general.architecture")? {
            if a != base_arch {
                return Err(err(
                    "general.architecture",
                    format!("the adapter is for {a:?} but the base model is {base_arch:?}"),
                ));
            }
        }
        let alpha = g.f64("adapter.lora.alpha")?.unwrap_or(0.0);
        if !alpha.is_finite() {
            return Err(err("adapter.lora.alpha", format!("{alpha} is not finite")));
        }
        let mut out = Adapter::empty(base.cfg.n_layer, AdapterFormat::Gguf);
        let pairs = pair_up(g.tensors.iter().map(|t| t.name.as_str()), parse_gguf_name)?;
        for ((layer, target), [a, b]) in pairs {
            let stem = format!("blk.{layer}.{}.weight", target.gguf_name());
            let (Some(a), Some(b)) = (a, b) else {
                return Err(err(&stem, "has only one of lora_a and lora_b"));
            };
            let (ta, tb) = (&g.tensors[a], &g.tensors[b]);
            if ta.dims.len() != 2 || tb.dims.len() != 2 {
                return Err(err(&stem, "lora_a and lora_b must be matrices"));
            }
            // ggml dims are [ne0 = contiguous, ne1]: lora_a is [in, rank] (A: rank × in), lora_b [rank, out].
            let (rank, cols) = ta.rows_cols();
            let (rows, rank_b) = tb.rows_cols();
            if rank != rank_b {
                return Err(err(
                    &stem,
                    format!("lora_a has rank {rank} but lora_b has rank {rank_b}"),
                ));
            }
            check_base_shape(base, &stem, layer, target, rows, cols)?;
            let a = dequantize(bytes, ta)?;
            let b = dequantize(bytes, tb)?;
            let scale = if alpha == 0.0 {
                1.0
            } else {
                (alpha / rank as f64) as f32
            };
            let m = LoraMat {
                rank,
                rows,
                cols,
                a,
                bt: transpose(&b, rows, rank),
                scale,
            };
            out.set(base, &stem, layer, target, m)?;
        }
        out.check_nonempty(file)
    }

    /// Load a PEFT adapter (`adapter_config.json` text and `adapter_model.safetensors` bytes) and check it against
    /// `base`.
    pub fn from_peft(config_json: &[u8], safetensors: &[u8], base: &Weights) -> Result<Adapter> {
        let cfg = PeftConfig::parse(config_json)?;
        let st = SafeTensors::parse(safetensors, SafetensorsLimits::default())?;
        let pairs = pair_up(st.tensors.iter().map(|t| t.name.as_str()), |name| {
            let (layer, target, which) = parse_peft_name(name)?;
            let key = format!("model.layers.{layer}.{}", target.peft_path());
            if !cfg.targets(&key, target) {
                return Err(err(
                    name,
                    "its module is not in adapter_config.json's target_modules",
                ));
            }
            Ok((layer, target, which))
        })?;
        let mut out = Adapter::empty(base.cfg.n_layer, AdapterFormat::Peft);
        for ((layer, target), [a, b]) in pairs {
            let key = format!("model.layers.{layer}.{}", target.peft_path());
            let (Some(a), Some(b)) = (a, b) else {
                return Err(err(&key, "has only one of lora_A and lora_B"));
            };
            let (ta, tb) = (&st.tensors[a], &st.tensors[b]);
            if ta.shape.len() != 2 || tb.shape.len() != 2 {
                return Err(err(&ta.name, "lora_A and lora_B must be matrices"));
            }
            let (rank, cols) = (ta.shape[0], ta.shape[1]);
            let (rows, rank_b) = (tb.shape[0], tb.shape[1]);
            if rank != rank_b {
                return Err(err(
                    &tb.name,
                    format!("lora_A has rank {rank} but lora_B has rank {rank_b}"),
                ));
            }
            check_base_shape(base, &ta.name, layer, target, rows, cols)?;
            let (r_cfg, alpha) = cfg.rank_alpha(&key)?;
            if r_cfg != rank {
                return Err(err(
                    &ta.name,
                    format!(
                        "has rank {rank} but adapter_config.json gives this module r = {r_cfg}"
                    ),
                ));
            }
            let scale = if cfg.rslora {
                alpha / (rank as f64).sqrt()
            } else {
                alpha / rank as f64
            } as f32;
            let a_vals = safetensors::to_f32(ta, safetensors);
            let mut b_vals = safetensors::to_f32(tb, safetensors);
            // llama.cpp's converter interleaves each head's q/k rows for a llama base; B's rows must follow.
            if base.cfg.arch == Arch::Llama && matches!(target, Target::Q | Target::K) {
                let heads = if target == Target::Q {
                    base.cfg.n_head
                } else {
                    base.cfg.n_kv_head
                };
                b_vals = hf_rows_to_gguf(&b_vals, rows, rank, heads);
            }
            let m = LoraMat {
                rank,
                rows,
                cols,
                a: a_vals,
                bt: transpose(&b_vals, rows, rank),
                scale,
            };
            out.set(base, &ta.name, layer, target, m)?;
        }
        out.check_nonempty("adapter_model.safetensors")
    }
}

/// The Hugging Face row that GGUF row `g` of a q/k matrix with `hd`-row heads holds: GGUF row `h·hd + 2i + c` is
/// Hugging Face row `h·hd + c·hd/2 + i` (llama.cpp's `permute(w, n_head)`).
fn hf_row_of(g: usize, hd: usize) -> usize {
    let (h, j) = (g / hd, g % hd);
    h * hd + (j % 2) * hd / 2 + j / 2
}

/// Rows of a matrix in Hugging Face q/k order put in GGUF order (see [`hf_row_of`]).
pub fn hf_rows_to_gguf(m: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let hd = rows / heads;
    let mut out = vec![0.0; m.len()];
    for g in 0..rows {
        let hf = hf_row_of(g, hd);
        out[g * cols..(g + 1) * cols].copy_from_slice(&m[hf * cols..(hf + 1) * cols]);
    }
    out
}

/// Rows of a GGUF-ordered q/k matrix put back in Hugging Face order: the inverse of [`hf_rows_to_gguf`].
pub fn gguf_rows_to_hf(m: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let hd = rows / heads;
    let mut out = vec![0.0; m.len()];
    for g in 0..rows {
        let hf = hf_row_of(g, hd);
        out[hf * cols..(hf + 1) * cols].copy_from_slice(&m[g * cols..(g + 1) * cols]);
    }
    out
}

/// The indices of each (layer, target)'s A (`[0]`) and B (`[1]`) tensors among `names`, each name read by `parse`
/// into (layer, target, 0 for A / 1 for B); a tensor named twice is an error.
type Pairs = std::collections::BTreeMap<(usize, Target), [Option<usize>; 2]>;

fn pair_up<'a>(
    names: impl Iterator<Item = &'a str>,
    parse: impl Fn(&str) -> Result<(usize, Target, usize)>,
) -> Result<Pairs> {
    let mut pairs = Pairs::new();
    for (i, name) in names.enumerate() {
        let (layer, target, which) = parse(name)?;
        let slot = &mut pairs.entry((layer, target)).or_default()[which];
        if slot.is_some() {
            return Err(err(name, "appears twice"));
        }
        *slot = Some(i);
    }
    Ok(pairs)
}

fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; m.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = m[r * cols + c];
        }
    }
    t
}

fn check_base_shape(
    base: &Weights,
    name: &str,
    layer: usize,
    target: Target,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let n = base.cfg.n_layer;
    let l = base.layers.get(layer).ok_or_else(|| {
        err(
            name,
            format!("layer {layer} does not exist: the base model has {n} layers (an adapter for another model?)"),
        )
    })?;
    let m = target.mat(l);
    if (m.rows, m.cols) != (rows, cols) {
        return Err(err(
            name,
            format!(
                "adapts a {rows}×{cols} matrix but the base's {} is {}×{} (an adapter for another model?)",
                target.gguf_name(),
                m.rows,
                m.cols
            ),
        ));
    }
    Ok(())
}

fn dequantize(bytes: &[u8], t: &super::gguf::TensorInfo) -> Result<Vec<f32>> {
    let (rows, cols) = t.rows_cols();
    let rb =
        t.ty.row_bytes(cols)
            .ok_or_else(|| err(&t.name, "rows are not whole quantization blocks"))?;
    let mut out = vec![0.0f32; rows * cols];
    for (r, o) in out.chunks_exact_mut(cols).enumerate() {
        quant::dequantize_row(t.ty, &bytes[t.start + r * rb..t.start + (r + 1) * rb], o);
    }
    Ok(out)
}

fn unsupported_module(name: &str) -> Option<&'static str> {
    if name.contains("embed_tokens")
        || name.contains("lora_embedding")
        || name.contains("token_embd")
    {
        Some("LoRA on the token embeddings is not supported (the attention and feed-forward projections are)")
    } else if name.contains("lm_head") || name.starts_with("output.") {
        Some("LoRA on the output head (lm_head) is not supported (the attention and feed-forward projections are)")
    } else if name.contains("lora_magnitude_vector") {
        Some("DoRA (lora_magnitude_vector) is not supported")
    } else if name.contains("modules_to_save") {
        Some("fully trained modules (modules_to_save) are not supported")
    } else {
        None
    }
}

/// `blk.N.attn_q.weight.lora_a` → (N, Q, 0).
fn parse_gguf_name(name: &str) -> Result<(usize, Target, usize)> {
    if let Some(why) = unsupported_module(name) {
        return Err(err(name, why));
    }
    let bad = || {
        err(
            name,
            "is not a LoRA tensor of an attention or feed-forward projection (blk.N.attn_q.weight.lora_a, …)",
        )
    };
    let rest = name.strip_prefix("blk.").ok_or_else(bad)?;
    let (layer, rest) = rest.split_once('.').ok_or_else(bad)?;
    let layer: usize = layer.parse().map_err(|_| bad())?;
    let (stem, which) = if let Some(s) = rest.strip_suffix(".weight.lora_a") {
        (s, 0)
    } else if let Some(s) = rest.strip_suffix(".weight.lora_b") {
        (s, 1)
    } else {
        return Err(bad());
    };
    let target = Target::ALL
        .into_iter()
        .find(|t| t.gguf_name() == stem)
        .ok_or_else(bad)?;
    Ok((layer, target, which))
}

/// `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` → (N, Q, 0).
fn parse_peft_name(name: &str) -> Result<(usize, Target, usize)> {
    if let Some(why) = unsupported_module(name) {
        return Err(err(name, why));
    }
    let bad = || {
        err(
            name,
            "is not a LoRA tensor of an attention or feed-forward projection \
             (base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight, …)",
        )
    };
    let at = name.find("layers.").ok_or_else(bad)?;
    let rest = &name[at + "layers.".len()..];
    let (layer, rest) = rest.split_once('.').ok_or_else(bad)?;
    let layer: usize = layer.parse().map_err(|_| bad())?;
    let rest = rest
        .strip_suffix(".weight")
        .ok_or_else(bad)?
        .trim_end_matches(".default");
    let (path, which) = if let Some(p) = rest.strip_suffix(".lora_A") {
        (p, 0)
    } else if let Some(p) = rest.strip_suffix(".lora_B") {
        (p, 1)
    } else {
        return Err(bad());
    };
    let target = Target::ALL
        .into_iter()
        .find(|t| t.peft_path() == path)
        .ok_or_else(bad)?;
    Ok((layer, target, which))
}

/// The parts of `adapter_config.json` that change the arithmetic.
struct PeftConfig {
    r: usize,
    alpha: f64,
    rslora: bool,
    targets: Targets,
    rank_pattern: Vec<(regex::Regex, String, usize)>,
    alpha_pattern: Vec<(regex::Regex, String, f64)>,
}

enum Targets {
    List(Vec<String>),
    Regex(regex::Regex),
    AllLinear,
}

fn cfg_err(field: &str, detail: impl Into<String>) -> Error {
    err(format!("adapter_config.json {field}"), detail)
}

fn pattern(field: &str, key: &str) -> Result<regex::Regex> {
    // PEFT: a module matches a pattern key when it equals it or ends with ".{key}" (the key is a regex).
    regex::RegexBuilder::new(&format!("^(?:.*\\.)?(?:{key})$"))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| cfg_err(field, format!("pattern {key:?} is not a valid regex: {e}")))
}

impl PeftConfig {
    fn parse(json: &[u8]) -> Result<PeftConfig> {
        if json.len() > 1 << 20 {
            return Err(cfg_err(
                "",
                format!("is {} bytes; the limit is 1 MiB", json.len()),
            ));
        }
        let v: serde_json::Value =
            serde_json::from_slice(json).map_err(|e| cfg_err("", format!("is not JSON: {e}")))?;
        let o = v
            .as_object()
            .ok_or_else(|| cfg_err("", "is not an object"))?;
        if let Some(t) = o.get("peft_type").and_then(|t| t.as_str()) {
            if t != "LORA" {
                return Err(cfg_err(
                    "peft_type",
                    format!("{t:?} is not supported (LORA is)"),
                ));
            }
        }
        let flag = |k: &str| o.get(k).and_then(|b| b.as_bool()).unwrap_or(false);
        if flag("use_dora") {
            return Err(cfg_err("use_dora", "DoRA is not supported"));
        }
        if flag("fan_in_fan_out") {
            return Err(cfg_err(
                "fan_in_fan_out",
                "transposed (Conv1D) weights are not supported",
            ));
        }
        let r = match o.get("r") {
            None => 8,
            Some(r) => r
                .as_u64()
                .filter(|&r| r > 0 && r <= 1 << 14)
                .ok_or_else(|| cfg_err("r", format!("{r} is not a rank in 1..16384")))?
                as usize,
        };
        let alpha = match o.get("lora_alpha") {
            None => 8.0,
            Some(a) => a
                .as_f64()
                .filter(|a| a.is_finite())
                .ok_or_else(|| cfg_err("lora_alpha", format!("{a} is not a finite number")))?,
        };
        let targets = match o.get("target_modules") {
            None | Some(serde_json::Value::Null) => {
                return Err(cfg_err("target_modules", "is missing"))
            }
            Some(serde_json::Value::String(s)) if s == "all-linear" => Targets::AllLinear,
            Some(serde_json::Value::String(s)) => Targets::Regex(
                regex::RegexBuilder::new(&format!("^(?:{s})$"))
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|e| cfg_err("target_modules", format!("{s:?}: {e}")))?,
            ),
            Some(serde_json::Value::Array(a)) => {
                let mut names = Vec::new();
                for t in a {
                    let t = t
                        .as_str()
                        .ok_or_else(|| cfg_err("target_modules", format!("{t} is not a name")))?;
                    let short = t.rsplit('.').next().unwrap_or(t);
                    if let Some(why) = unsupported_module(short) {
                        return Err(cfg_err("target_modules", format!("{t}: {why}")));
                    }
                    if Target::ALL.iter().all(|x| x.peft_name() != short) {
                        return Err(cfg_err(
                            "target_modules",
                            format!(
                                "{t:?} is not a module of a llama-family base \
                                 (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
                            ),
                        ));
                    }
                    names.push(t.to_owned());
                }
                Targets::List(names)
            }
            Some(other) => {
                return Err(cfg_err(
                    "target_modules",
                    format!("{other} is neither a list nor a regex"),
                ))
            }
        };
        let mut rank_pattern = Vec::new();
        if let Some(m) = o.get("rank_pattern").and_then(|m| m.as_object()) {
            for (k, v) in m {
                let r = v
                    .as_u64()
                    .filter(|&r| r > 0 && r <= 1 << 14)
                    .ok_or_else(|| cfg_err("rank_pattern", format!("{k}: {v} is not a rank")))?;
                rank_pattern.push((pattern("rank_pattern", k)?, k.clone(), r as usize));
            }
        }
        let mut alpha_pattern = Vec::new();
        if let Some(m) = o.get("alpha_pattern").and_then(|m| m.as_object()) {
            for (k, v) in m {
                let a = v
                    .as_f64()
                    .filter(|a| a.is_finite())
                    .ok_or_else(|| cfg_err("alpha_pattern", format!("{k}: {v} is not finite")))?;
                alpha_pattern.push((pattern("alpha_pattern", k)?, k.clone(), a));
            }
        }
        Ok(PeftConfig {
            r,
            alpha,
            rslora: flag("use_rslora"),
            targets,
            rank_pattern,
            alpha_pattern,
        })
    }

    /// Whether `key` (`model.layers.3.self_attn.q_proj`) is targeted.
    fn targets(&self, key: &str, t: Target) -> bool {
        match &self.targets {
            Targets::AllLinear => true,
            Targets::Regex(r) => r.is_match(key),
            Targets::List(names) => names
                .iter()
                .any(|n| n == t.peft_name() || key == n || key.ends_with(&format!(".{n}"))),
        }
    }

    /// Rank and alpha for `key`: the first matching pattern (exact key first), else `r` / `lora_alpha`.
    fn rank_alpha(&self, key: &str) -> Result<(usize, f64)> {
        fn pick<T: Copy>(ps: &[(regex::Regex, String, T)], key: &str) -> Option<T> {
            ps.iter()
                .find(|p| p.1 == key)
                .or_else(|| ps.iter().find(|p| p.0.is_match(key)))
                .map(|p| p.2)
        }
        Ok((
            pick(&self.rank_pattern, key).unwrap_or(self.r),
            pick(&self.alpha_pattern, key).unwrap_or(self.alpha),
        ))
    }
}
