//! LoRA fine-tuning on a frozen, quantized base (QLoRA-style): the GGUF weights stay as they are and are
//! dequantized on the fly in the forward and the backward pass; only the adapters' `A` and `B` learn.
//!
//! One training sequence at a time (no padding): the forward pass keeps each layer's input (activation
//! checkpointing), the backward pass recomputes one layer's intermediates from it and back-propagates through
//! RMSNorm, RoPE, causal grouped-query attention, SwiGLU, the residuals and the (tied) output projection.
//! Memory: `n_layer × T × n_embd` floats of checkpoints plus one layer's intermediates (`n_head × T²` attention
//! probabilities the largest), whatever the model's depth.
//!
//! Loss: cross-entropy on the positions whose next token is marked (the assistant's tokens), summed; the
//! optimizer divides by the number of such tokens in the step, so a step's loss is the mean over its tokens.

use super::lora::{Adapter, AdapterFormat, LoraMat, Target};
use super::model::{Mat, Weights};
use super::quant;
use crate::{Error, Result};

/// Which matrices get adapters, and how.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct LoraConfig {
    /// Rank.
    pub rank: usize,
    /// Scale numerator: updates are `alpha / rank · B A x` (`alpha / √rank` with `rslora`).
    pub alpha: f32,
    /// Rank-stabilized scaling.
    pub rslora: bool,
    /// Dropout on the adapters' input while training (0 = none).
    pub dropout: f32,
    /// Adapted matrices.
    pub targets: Vec<Target>,
    /// Seed of `A`'s initialization and of dropout.
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            rslora: false,
            dropout: 0.0,
            targets: vec![Target::Q, Target::V],
            seed: 1,
        }
    }
}

impl LoraConfig {
    /// The update's scale.
    pub fn scale(&self) -> f32 {
        if self.rslora {
            self.alpha / (self.rank as f32).sqrt()
        } else {
            self.alpha / self.rank as f32
        }
    }
}

/// A small, seedable generator (SplitMix64): the same seed gives the same initialization and shuffles
/// everywhere (natively and in wasm).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Rng(u64);

impl Rng {
    /// From a seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    /// 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// One adapted matrix being trained: the adapter's `A` / `Bᵀ` and their gradients.
#[derive(Debug, Clone)]
pub struct TrainMat {
    /// Layer.
    pub layer: usize,
    /// Which matrix of the layer.
    pub target: Target,
    /// The adapter matrix (rows in GGUF order).
    pub m: LoraMat,
    /// Gradient of `A` (rank × cols).
    pub ga: Vec<f32>,
    /// Gradient of `Bᵀ` (rank × rows).
    pub gbt: Vec<f32>,
}

/// The trainable parameters: one [`TrainMat`] per (layer, target).
#[derive(Debug, Clone)]
pub struct LoraParams {
    /// The matrices, by layer then target.
    pub mats: Vec<TrainMat>,
    /// Configuration they were made with.
    pub config: LoraConfig,
    n_layer: usize,
}

impl LoraParams {
    /// Fresh adapters for `w`: `A` Kaiming-uniform as PEFT initializes it (`a = √5`, so bound `1/√cols`), `B`
    /// zero, so the adapted model starts equal to the base.
    pub fn init(w: &Weights, config: &LoraConfig) -> Result<LoraParams> {
        if config.rank == 0 || config.rank > 1024 {
            return Err(Error::Config(format!(
                "LoRA rank {} out of 1..=1024",
                config.rank
            )));
        }
        if !(0.0..1.0).contains(&config.dropout) {
            return Err(Error::Config(format!(
                "dropout {} out of [0, 1)",
                config.dropout
            )));
        }
        if config.targets.is_empty() {
            return Err(Error::Config("no LoRA targets".into()));
        }
        let mut rng = Rng::new(config.seed);
        let mut mats = Vec::new();
        for (li, l) in w.layers.iter().enumerate() {
            for t in Target::ALL {
                if !config.targets.contains(&t) {
                    continue;
                }
                let base = t.mat(l);
                let (rows, cols, r) = (base.rows, base.cols, config.rank);
                let bound = 1.0 / (cols as f32).sqrt();
                let a = (0..r * cols)
                    .map(|_| (rng.uniform() * 2.0 - 1.0) * bound)
                    .collect();
                mats.push(TrainMat {
                    layer: li,
                    target: t,
                    m: LoraMat {
                        rank: r,
                        rows,
                        cols,
                        a,
                        bt: vec![0.0; r * rows],
                        scale: config.scale(),
                    },
                    ga: vec![0.0; r * cols],
                    gbt: vec![0.0; r * rows],
                });
            }
        }
        Ok(LoraParams {
            mats,
            config: config.clone(),
            n_layer: w.layers.len(),
        })
    }

    /// Trainable parameters.
    pub fn count(&self) -> usize {
        self.mats.iter().map(|m| m.m.params()).sum()
    }

    /// Zero every gradient.
    pub fn zero_grad(&mut self) {
        for m in &mut self.mats {
            m.ga.fill(0.0);
            m.gbt.fill(0.0);
        }
    }

    fn find(&self, layer: usize, target: Target) -> Option<usize> {
        self.mats
            .iter()
            .position(|m| m.layer == layer && m.target == target)
    }

    /// The adapter as the generator uses it (hot-swappable into a [`super::Model`]).
    pub fn to_adapter(&self, w: &Weights) -> Result<Adapter> {
        let mut a = Adapter::empty(self.n_layer, AdapterFormat::Peft);
        for m in &self.mats {
            a.set(w, "trained", m.layer, m.target, m.m.clone())?;
        }
        Ok(a)
    }
}

/// One training sequence: token ids and, for each position `t < len − 1`, whether predicting `ids[t + 1]`
/// counts in the loss.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    /// Token ids.
    pub ids: Vec<u32>,
    /// `loss[t]`: the prediction of `ids[t + 1]` counts (`len − 1` entries).
    pub loss: Vec<bool>,
}

impl Sequence {
    /// Positions whose prediction counts.
    pub fn loss_tokens(&self) -> usize {
        self.loss.iter().filter(|&&b| b).count()
    }
}

/// `dx[i] += Σ_r dy[i][r] · W[r]` for the `n` rows of `dy`: the product with the transposed quantized matrix,
/// dequantizing each weight row once and adding four rows at a time ([`quant::axpy4`]: one pass over `dx[i]` per
/// four rows).
fn mat_t(m: &Mat, data: &[u8], dy: &[f32], n: usize, dx: &mut [f32]) {
    let (rows, cols) = (m.rows, m.cols);
    let rb =
        m.ty.row_bytes(cols)
            .expect("checked when the model was loaded");
    let bytes = m.bytes(data);
    let mut block = vec![0.0f32; 4 * cols];
    for r0 in (0..rows).step_by(4) {
        let k = (rows - r0).min(4);
        for j in 0..k {
            let r = r0 + j;
            quant::dequantize_row(
                m.ty,
                &bytes[r * rb..(r + 1) * rb],
                &mut block[j * cols..(j + 1) * cols],
            );
        }
        // Fewer than four rows at the end: the missing ones get weight 0 (and any row's values).
        let w: [&[f32]; 4] = std::array::from_fn(|j| {
            let j = if j < k { j } else { 0 };
            &block[j * cols..(j + 1) * cols]
        });
        for i in 0..n {
            let g: [f32; 4] =
                std::array::from_fn(|j| if j < k { dy[i * rows + r0 + j] } else { 0.0 });
            if g != [0.0; 4] {
                quant::axpy4(g, w, &mut dx[i * cols..(i + 1) * cols]);
            }
        }
    }
}

/// Where the frozen base's matrix products run: the CPU kernels, or the GPU the model is attached to
/// ([`super::Model::use_device`]): the forward `W·x` through the generator's matvec kernel, the backward `Wᵀ·dy`
/// through matvec_t.wgsl, on the weights already resident there. The adapters, attention and the element-wise
/// work stay on the CPU.
#[derive(Clone, Copy)]
struct Products<'a> {
    #[cfg(feature = "gpu")]
    gpu: Option<&'a super::GpuBackend>,
    _model: std::marker::PhantomData<&'a ()>,
}

impl<'a> Products<'a> {
    fn cpu() -> Products<'a> {
        Products {
            #[cfg(feature = "gpu")]
            gpu: None,
            _model: std::marker::PhantomData,
        }
    }

    /// The model's GPU when it has one and `allow`, else the CPU.
    fn of(model: &'a Model, allow: bool) -> Products<'a> {
        #[cfg(feature = "gpu")]
        if allow {
            if let Some(g) = model.gpu() {
                return Products {
                    gpu: Some(g),
                    _model: std::marker::PhantomData,
                };
            }
        }
        let _ = (model, allow);
        Products::cpu()
    }

    /// Whether products go to the GPU (where several of one layer share a round trip).
    fn on_gpu(&self) -> bool {
        #[cfg(feature = "gpu")]
        return self.gpu.is_some();
        #[cfg(not(feature = "gpu"))]
        false
    }

    /// Layer `li`'s projections `targets` (the same input width) applied to the `n` rows of `x`: one GPU round
    /// trip for all of them.
    async fn apply_many(
        &self,
        w: &Weights,
        data: &[u8],
        li: usize,
        targets: &[Target],
        x: &[f32],
        n: usize,
    ) -> Result<Vec<Vec<f32>>> {
        #[cfg(feature = "gpu")]
        if let Some(g) = self.gpu {
            let ms: Vec<_> = targets.iter().map(|&t| g.weights().matrix(li, t)).collect();
            return g.gpu.matvec_many(&ms, x, n).await;
        }
        Ok(targets
            .iter()
            .map(|&t| {
                let m = t.mat(&w.layers[li]);
                let mut out = vec![0.0; n * m.rows];
                m.apply(data, x, n, &mut out);
                out
            })
            .collect())
    }

    /// `dx += Σ Wₜᵀ·dyₜ` over layer `li`'s projections in `items`: one GPU round trip for all of them.
    async fn apply_t_many(
        &self,
        w: &Weights,
        data: &[u8],
        li: usize,
        items: &[(Target, &[f32])],
        n: usize,
        dx: &mut [f32],
    ) -> Result<()> {
        #[cfg(feature = "gpu")]
        if let Some(g) = self.gpu {
            let ms: Vec<_> = items
                .iter()
                .map(|&(t, dy)| (g.weights().matrix(li, t), dy))
                .collect();
            let got = g.gpu.matvec_t_many(&ms, n).await?;
            dx.iter_mut().zip(&got).for_each(|(d, v)| *d += v);
            return Ok(());
        }
        for &(t, dy) in items {
            mat_t(t.mat(&w.layers[li]), data, dy, n, dx);
        }
        Ok(())
    }

    /// The logits: `out = W_out·x` for the `n` rows of `x`.
    async fn output(
        &self,
        w: &Weights,
        data: &[u8],
        x: &[f32],
        n: usize,
        out: &mut [f32],
    ) -> Result<()> {
        #[cfg(feature = "gpu")]
        if let Some(g) = self.gpu {
            out.copy_from_slice(&g.gpu.matvec(g.weights().output(), x, n).await?);
            return Ok(());
        }
        w.output.apply(data, x, n, out);
        Ok(())
    }

    /// Back through the logits: `dx += W_outᵀ·dy` for the `n` rows of `dy`.
    async fn output_t(
        &self,
        w: &Weights,
        data: &[u8],
        dy: &[f32],
        n: usize,
        dx: &mut [f32],
    ) -> Result<()> {
        #[cfg(feature = "gpu")]
        if let Some(g) = self.gpu {
            let got = g.gpu.matvec_t(g.weights().output(), dy, n).await?;
            dx.iter_mut().zip(&got).for_each(|(d, v)| *d += v);
            return Ok(());
        }
        mat_t(&w.output, data, dy, n, dx);
        Ok(())
    }
}

/// `out += s · B (A x)` for `n` inputs; returns `A x` (n × rank) for the backward pass.
fn lora_fwd(m: &LoraMat, x: &[f32], n: usize, out: &mut [f32]) -> Vec<f32> {
    let (r, rows, cols) = (m.rank, m.rows, m.cols);
    let mut t = vec![0.0f32; n * r];
    for i in 0..n {
        let xi = &x[i * cols..(i + 1) * cols];
        for j in 0..r {
            t[i * r + j] = quant::dot_f32(&m.a[j * cols..(j + 1) * cols], xi);
        }
        let oi = &mut out[i * rows..(i + 1) * rows];
        for j in 0..r {
            let tj = t[i * r + j] * m.scale;
            for (o, b) in oi.iter_mut().zip(&m.bt[j * rows..(j + 1) * rows]) {
                *o += tj * b;
            }
        }
    }
    t
}

/// Backward of [`lora_fwd`]: accumulates the gradients of `A` and `Bᵀ`, and adds the input gradient to `dx`
/// (`x` the input the forward pass saw, `t` what it returned).
fn lora_bwd(p: &mut TrainMat, x: &[f32], t: &[f32], dy: &[f32], n: usize, dx: &mut [f32]) {
    let m = &p.m;
    let (r, rows, cols, s) = (m.rank, m.rows, m.cols, m.scale);
    let mut dt = vec![0.0f32; r];
    for i in 0..n {
        let dyi = &dy[i * rows..(i + 1) * rows];
        for j in 0..r {
            let tj = t[i * r + j] * s;
            for (g, d) in p.gbt[j * rows..(j + 1) * rows].iter_mut().zip(dyi) {
                *g += tj * d;
            }
            dt[j] = s * quant::dot_f32(&m.bt[j * rows..(j + 1) * rows], dyi);
        }
        let xi = &x[i * cols..(i + 1) * cols];
        let dxi = &mut dx[i * cols..(i + 1) * cols];
        for (j, &dtj) in dt.iter().enumerate() {
            let a = &m.a[j * cols..(j + 1) * cols];
            for ((g, d), (&xv, &av)) in p.ga[j * cols..(j + 1) * cols]
                .iter_mut()
                .zip(dxi.iter_mut())
                .zip(xi.iter().zip(a))
            {
                *g += dtj * xv;
                *d += dtj * av;
            }
        }
    }
}

/// RMSNorm forward; returns the inverse RMS of each row.
fn rms_fwd(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) -> Vec<f32> {
    let d = w.len();
    x.chunks_exact(d)
        .zip(out.chunks_exact_mut(d))
        .map(|(xi, oi)| {
            let ss = xi.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let r = 1.0 / (ss + eps).sqrt();
            for j in 0..d {
                oi[j] = xi[j] * r * w[j];
            }
            r
        })
        .collect()
}

/// RMSNorm backward: adds `∂L/∂x` to `dx` given `dy` = `∂L/∂out` and the forward's inverse RMS values.
fn rms_bwd(x: &[f32], w: &[f32], inv: &[f32], dy: &[f32], dx: &mut [f32]) {
    let d = w.len();
    for (i, &r) in inv.iter().enumerate() {
        let (xi, dyi) = (&x[i * d..(i + 1) * d], &dy[i * d..(i + 1) * d]);
        let dot: f32 = (0..d).map(|j| dyi[j] * w[j] * xi[j]).sum();
        let k = r * r * r * dot / d as f32;
        for (j, o) in dx[i * d..(i + 1) * d].iter_mut().enumerate() {
            *o += r * w[j] * dyi[j] - k * xi[j];
        }
    }
}

/// Rotate every head of each of the `n` rows of `x` by its position's angles, with the generator's own
/// rotation ([`Weights::rope`]); given the table with its sines negated, this is the rotation's backward pass.
fn rope(w: &Weights, x: &mut [f32], n: usize, heads: usize, table: &[(f32, f32)]) {
    let half = w.cfg.rope_dim / 2;
    let width = heads * w.cfg.head_dim;
    for i in 0..n {
        w.rope(
            &mut x[i * width..(i + 1) * width],
            heads,
            &table[i * half..(i + 1) * half],
        );
    }
}

/// Dropout masks (already divided by `1 − p`) for one adapter input, or none.
fn dropout(rng: &mut Rng, p: f32, len: usize) -> Option<Vec<f32>> {
    (p > 0.0).then(|| {
        let keep = 1.0 / (1.0 - p);
        (0..len)
            .map(|_| if rng.uniform() < p { 0.0 } else { keep })
            .collect()
    })
}

/// What one adapted matrix saw in the forward pass.
struct LoraSaved {
    idx: usize,
    /// The input after dropout (`None`: the matrix's own input, undropped).
    x: Option<Vec<f32>>,
    mask: Option<Vec<f32>>,
    t: Vec<f32>,
}

/// One layer's intermediates, recomputed from its input for the backward pass.
struct Tape {
    inv1: Vec<f32>,
    h1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention probabilities, `[head][i][j]`, `j ≤ i`.
    p: Vec<f32>,
    att: Vec<f32>,
    x2: Vec<f32>,
    inv2: Vec<f32>,
    h2: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    act: Vec<f32>,
    lora: Vec<(Target, LoraSaved)>,
}

struct Pass<'a> {
    w: &'a Weights,
    data: &'a [u8],
    dev: Products<'a>,
    table: Vec<(f32, f32)>,
    /// `table` with the sines negated: rotation by minus each angle.
    inverse: Vec<(f32, f32)>,
    n: usize,
}

impl Pass<'_> {
    /// `W x (+ bias) (+ adapter)` for layer `li`'s projections `targets`, all reading `x` (their base products in
    /// one GPU round trip), remembering what each adapter saw. Dropout masks are drawn in `targets`' order.
    #[allow(clippy::too_many_arguments)]
    async fn project(
        &self,
        p: &LoraParams,
        mut rng: Option<&mut Rng>,
        li: usize,
        targets: &[Target],
        x: &[f32],
        saved: &mut Vec<(Target, LoraSaved)>,
    ) -> Result<Vec<Vec<f32>>> {
        let l = &self.w.layers[li];
        let mut outs = self
            .dev
            .apply_many(self.w, self.data, li, targets, x, self.n)
            .await?;
        for (&t, out) in targets.iter().zip(&mut outs) {
            let bias = match t {
                Target::Q => l.bq.as_ref(),
                Target::K => l.bk.as_ref(),
                Target::V => l.bv.as_ref(),
                _ => None,
            };
            if let Some(b) = bias {
                for row in out.chunks_exact_mut(b.len()) {
                    row.iter_mut().zip(b).for_each(|(o, bi)| *o += bi);
                }
            }
            if let Some(idx) = p.find(li, t) {
                let mask = rng
                    .as_deref_mut()
                    .and_then(|r| dropout(r, p.config.dropout, x.len()));
                let xd: Option<Vec<f32>> = mask
                    .as_ref()
                    .map(|mk| x.iter().zip(mk).map(|(a, b)| a * b).collect());
                let tt = lora_fwd(&p.mats[idx].m, xd.as_deref().unwrap_or(x), self.n, out);
                saved.push((
                    t,
                    LoraSaved {
                        idx,
                        x: xd,
                        mask,
                        t: tt,
                    },
                ));
            }
        }
        Ok(outs)
    }

    /// One decoder layer: `x` in, the layer's output returned, intermediates in the tape.
    async fn layer(
        &self,
        p: &LoraParams,
        mut rng: Option<&mut Rng>,
        li: usize,
        x: &[f32],
    ) -> Result<(Vec<f32>, Tape)> {
        let (w, n) = (self.w, self.n);
        let c = &w.cfg;
        let l = &w.layers[li];
        let (d, hd) = (c.n_embd, c.head_dim);
        let (qd, kvd) = (c.n_head * hd, c.n_kv_head * hd);
        let mut lora = Vec::new();
        let mut h1 = vec![0.0; n * d];
        let inv1 = rms_fwd(x, &l.attn_norm, c.eps, &mut h1);
        let qkv = [Target::Q, Target::K, Target::V];
        let [mut q, mut k, v]: [Vec<f32>; 3] = self
            .project(p, rng.as_deref_mut(), li, &qkv, &h1, &mut lora)
            .await?
            .try_into()
            .expect("three projections");
        rope(w, &mut q, n, c.n_head, &self.table);
        rope(w, &mut k, n, c.n_kv_head, &self.table);
        let group = c.n_head / c.n_kv_head;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut probs = vec![0.0f32; c.n_head * n * n];
        let mut att = vec![0.0f32; n * qd];
        for h in 0..c.n_head {
            let g = h / group;
            for i in 0..n {
                let qi = &q[i * qd + h * hd..i * qd + (h + 1) * hd];
                let row = &mut probs[(h * n + i) * n..(h * n + i) * n + i + 1];
                for (j, s) in row.iter_mut().enumerate() {
                    *s = quant::dot_f32(qi, &k[j * kvd + g * hd..j * kvd + (g + 1) * hd]) * scale;
                }
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for s in row.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let out = &mut att[i * qd + h * hd..i * qd + (h + 1) * hd];
                for (j, s) in row.iter_mut().enumerate() {
                    *s /= sum;
                    for (o, vv) in out
                        .iter_mut()
                        .zip(&v[j * kvd + g * hd..j * kvd + (g + 1) * hd])
                    {
                        *o += *s * vv;
                    }
                }
            }
        }
        let o = self
            .project(p, rng.as_deref_mut(), li, &[Target::O], &att, &mut lora)
            .await?
            .remove(0);
        let x2: Vec<f32> = x.iter().zip(&o).map(|(a, b)| a + b).collect();
        let mut h2 = vec![0.0; n * d];
        let inv2 = rms_fwd(&x2, &l.ffn_norm, c.eps, &mut h2);
        let [g, u]: [Vec<f32>; 2] = self
            .project(
                p,
                rng.as_deref_mut(),
                li,
                &[Target::Gate, Target::Up],
                &h2,
                &mut lora,
            )
            .await?
            .try_into()
            .expect("two projections");
        let act: Vec<f32> = g
            .iter()
            .zip(&u)
            .map(|(&gi, &ui)| gi / (1.0 + (-gi).exp()) * ui)
            .collect();
        let down = self
            .project(p, rng, li, &[Target::Down], &act, &mut lora)
            .await?
            .remove(0);
        let out = x2.iter().zip(&down).map(|(a, b)| a + b).collect();
        let tape = Tape {
            inv1,
            h1,
            q,
            k,
            v,
            p: probs,
            att,
            x2,
            inv2,
            h2,
            g,
            u,
            act,
            lora,
        };
        Ok((out, tape))
    }

    /// Backward through layer `li`'s projections `items` (each with its output gradient), all of which read `x`:
    /// `dx += Σ Wₜᵀ dyₜ` (+ each adapter's part, whose gradients accumulate). On the GPU the base products share
    /// one round trip; on the CPU each matrix is followed by its adapter, as they always were.
    async fn project_bwd(
        &self,
        p: &mut LoraParams,
        tape_lora: &[(Target, LoraSaved)],
        li: usize,
        items: &[(Target, &[f32])],
        x: &[f32],
        dx: &mut [f32],
    ) -> Result<()> {
        let (w, data, n) = (self.w, self.data, self.n);
        let batched = self.dev.on_gpu();
        if batched {
            self.dev.apply_t_many(w, data, li, items, n, dx).await?;
        }
        for &(t, dy) in items {
            if !batched {
                self.dev
                    .apply_t_many(w, data, li, &[(t, dy)], n, dx)
                    .await?;
            }
            if let Some((_, s)) = tape_lora.iter().find(|(tt, _)| *tt == t) {
                let input = s.x.as_deref().unwrap_or(x);
                match &s.mask {
                    None => lora_bwd(&mut p.mats[s.idx], input, &s.t, dy, n, dx),
                    Some(mask) => {
                        let mut dxd = vec![0.0; dx.len()];
                        lora_bwd(&mut p.mats[s.idx], input, &s.t, dy, n, &mut dxd);
                        for ((d, g), m) in dx.iter_mut().zip(&dxd).zip(mask) {
                            *d += g * m;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Backward through one layer: `dout` = ∂L/∂(layer output) in, ∂L/∂(layer input) returned.
    async fn layer_bwd(
        &self,
        p: &mut LoraParams,
        li: usize,
        x: &[f32],
        tp: &Tape,
        dout: &[f32],
    ) -> Result<Vec<f32>> {
        let (w, n) = (self.w, self.n);
        let c = &w.cfg;
        let l = &w.layers[li];
        let (d, hd, ff) = (c.n_embd, c.head_dim, c.n_ff);
        let (qd, kvd) = (c.n_head * hd, c.n_kv_head * hd);
        // Feed-forward: out = x2 + Wd(silu(Wg h2) ⊙ Wu h2), h2 = norm(x2).
        let mut dact = vec![0.0; n * ff];
        self.project_bwd(p, &tp.lora, li, &[(Target::Down, dout)], &tp.act, &mut dact)
            .await?;
        let (mut dg, mut du) = (vec![0.0; n * ff], vec![0.0; n * ff]);
        for i in 0..n * ff {
            let (g, u) = (tp.g[i], tp.u[i]);
            let sig = 1.0 / (1.0 + (-g).exp());
            du[i] = dact[i] * g * sig;
            dg[i] = dact[i] * u * sig * (1.0 + g * (1.0 - sig));
        }
        let mut dh2 = vec![0.0; n * d];
        let gate_up = [(Target::Gate, &dg[..]), (Target::Up, &du[..])];
        self.project_bwd(p, &tp.lora, li, &gate_up, &tp.h2, &mut dh2)
            .await?;
        let mut dx2 = dout.to_vec();
        rms_bwd(&tp.x2, &l.ffn_norm, &tp.inv2, &dh2, &mut dx2);
        // Attention: x2 = x + Wo attn(q, k, v).
        let mut datt = vec![0.0; n * qd];
        self.project_bwd(p, &tp.lora, li, &[(Target::O, &dx2)], &tp.att, &mut datt)
            .await?;
        let group = c.n_head / c.n_kv_head;
        let scale = 1.0 / (hd as f32).sqrt();
        let (mut dq, mut dk, mut dv) = (vec![0.0; n * qd], vec![0.0; n * kvd], vec![0.0; n * kvd]);
        let mut dp = vec![0.0f32; n];
        for h in 0..c.n_head {
            let g = h / group;
            for i in 0..n {
                let pr = &tp.p[(h * n + i) * n..(h * n + i) * n + i + 1];
                let dai = &datt[i * qd + h * hd..i * qd + (h + 1) * hd];
                let mut dot = 0.0f32;
                for j in 0..=i {
                    let vj = &tp.v[j * kvd + g * hd..j * kvd + (g + 1) * hd];
                    dp[j] = quant::dot_f32(dai, vj);
                    dot += dp[j] * pr[j];
                    for (dvv, a) in dv[j * kvd + g * hd..j * kvd + (g + 1) * hd]
                        .iter_mut()
                        .zip(dai)
                    {
                        *dvv += pr[j] * a;
                    }
                }
                let qi = &tp.q[i * qd + h * hd..i * qd + (h + 1) * hd];
                for j in 0..=i {
                    let ds = pr[j] * (dp[j] - dot) * scale;
                    if ds == 0.0 {
                        continue;
                    }
                    let kj = &tp.k[j * kvd + g * hd..j * kvd + (g + 1) * hd];
                    for (dqq, kk) in dq[i * qd + h * hd..i * qd + (h + 1) * hd]
                        .iter_mut()
                        .zip(kj)
                    {
                        *dqq += ds * kk;
                    }
                    for (dkk, qq) in dk[j * kvd + g * hd..j * kvd + (g + 1) * hd]
                        .iter_mut()
                        .zip(qi)
                    {
                        *dkk += ds * qq;
                    }
                }
            }
        }
        rope(w, &mut dq, n, c.n_head, &self.inverse);
        rope(w, &mut dk, n, c.n_kv_head, &self.inverse);
        let mut dh1 = vec![0.0; n * d];
        let qkv = [
            (Target::Q, &dq[..]),
            (Target::K, &dk[..]),
            (Target::V, &dv[..]),
        ];
        self.project_bwd(p, &tp.lora, li, &qkv, &tp.h1, &mut dh1)
            .await?;
        let mut dx = dx2;
        rms_bwd(x, &l.attn_norm, &tp.inv1, &dh1, &mut dx);
        Ok(dx)
    }
}

/// The summed cross-entropy of the marked predictions in `seq`, and (with `grad`) the gradients of that sum
/// added to `p`'s. `dropout`: the generator that draws the adapters' dropout masks (training); `None`, no
/// dropout (evaluation). Returns (loss sum, tokens counted).
pub fn loss_and_grad(
    w: &Weights,
    data: &[u8],
    p: &mut LoraParams,
    seq: &Sequence,
    grad: bool,
    dropout: Option<&mut Rng>,
) -> Result<(f64, usize)> {
    super::run_ready(loss_and_grad_with(
        Products::cpu(),
        w,
        data,
        p,
        seq,
        grad,
        dropout,
    ))
}

/// [`loss_and_grad`] for `model`, its frozen products on the GPU when the model is attached to one (the
/// result differs from the CPU's only in the order of the products' sums).
pub async fn loss_and_grad_on(
    model: &Model,
    p: &mut LoraParams,
    seq: &Sequence,
    grad: bool,
    dropout: Option<&mut Rng>,
) -> Result<(f64, usize)> {
    let dev = Products::of(model, true);
    loss_and_grad_with(dev, &model.weights, model.bytes(), p, seq, grad, dropout).await
}

async fn loss_and_grad_with(
    dev: Products<'_>,
    w: &Weights,
    data: &[u8],
    p: &mut LoraParams,
    seq: &Sequence,
    grad: bool,
    mut dropout: Option<&mut Rng>,
) -> Result<(f64, usize)> {
    let c = &w.cfg;
    let n = seq.ids.len();
    if n < 2 || seq.loss.len() != n - 1 {
        return Err(Error::Config(format!(
            "a training sequence needs at least 2 tokens and one loss flag per prediction (got {n} tokens, {} flags)",
            seq.loss.len()
        )));
    }
    if n > c.n_ctx_train.max(1) {
        return Err(Error::ContextOverflow {
            tokens: n,
            context: c.n_ctx_train,
        });
    }
    if let Some(&t) = seq.ids.iter().find(|&&t| t as usize >= c.n_vocab) {
        return Err(Error::InvalidQuery(format!(
            "token id {t} is outside the vocabulary of {}",
            c.n_vocab
        )));
    }
    let d = c.n_embd;
    let table = w.rope_table(0, n);
    let pass = Pass {
        w,
        data,
        dev,
        inverse: table.iter().map(|&(c, s)| (c, -s)).collect(),
        table,
        n,
    };
    // Embeddings.
    let rb = w
        .tok_embd
        .ty
        .row_bytes(d)
        .expect("checked when the model was loaded");
    let emb = w.tok_embd.bytes(data);
    let mut x = vec![0.0f32; n * d];
    for (i, &t) in seq.ids.iter().enumerate() {
        quant::dequantize_row(
            w.tok_embd.ty,
            &emb[t as usize * rb..(t as usize + 1) * rb],
            &mut x[i * d..(i + 1) * d],
        );
    }
    // Forward, keeping each layer's input (and the dropout generator's state, so the recomputation draws the same
    // masks).
    let mut inputs = Vec::with_capacity(w.layers.len());
    for li in 0..w.layers.len() {
        let state = dropout.as_deref().cloned();
        let (out, _) = pass.layer(p, dropout.as_deref_mut(), li, &x).await?;
        inputs.push((std::mem::replace(&mut x, out), state));
    }
    // Output: norm, the marked positions' logits, cross-entropy.
    let rows: Vec<usize> = (0..n - 1).filter(|&t| seq.loss[t]).collect();
    if rows.is_empty() {
        return Ok((0.0, 0));
    }
    let m = rows.len();
    let mut xs = vec![0.0f32; m * d];
    for (r, &t) in rows.iter().enumerate() {
        xs[r * d..(r + 1) * d].copy_from_slice(&x[t * d..(t + 1) * d]);
    }
    let mut hn = vec![0.0f32; m * d];
    let inv = rms_fwd(&xs, &w.output_norm, c.eps, &mut hn);
    let mut logits = vec![0.0f32; m * c.n_vocab];
    dev.output(w, data, &hn, m, &mut logits).await?;
    let mut loss = 0.0f64;
    for (r, &t) in rows.iter().enumerate() {
        let row = &mut logits[r * c.n_vocab..(r + 1) * c.n_vocab];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = row.iter().map(|&z| ((z - max) as f64).exp()).sum();
        let target = seq.ids[t + 1] as usize;
        loss += sum.ln() + max as f64 - row[target] as f64;
        if grad {
            // ∂/∂z of −log softmax(z)[target]: softmax − one-hot, in place.
            for z in row.iter_mut() {
                *z = (((*z - max) as f64).exp() / sum) as f32;
            }
            row[target] -= 1.0;
        }
    }
    if !grad {
        return Ok((loss, m));
    }
    let mut dhn = vec![0.0f32; m * d];
    dev.output_t(w, data, &logits, m, &mut dhn).await?;
    let mut dxs = vec![0.0f32; m * d];
    rms_bwd(&xs, &w.output_norm, &inv, &dhn, &mut dxs);
    let mut dx = vec![0.0f32; n * d];
    for (r, &t) in rows.iter().enumerate() {
        dx[t * d..(t + 1) * d].copy_from_slice(&dxs[r * d..(r + 1) * d]);
    }
    // Layers in reverse, each recomputed from its input.
    for li in (0..w.layers.len()).rev() {
        let (input, state) = &inputs[li];
        let mut r = state.clone();
        let (_, tape) = pass.layer(p, r.as_mut(), li, input).await?;
        dx = pass.layer_bwd(p, li, input, &tape, &dx).await?;
    }
    Ok((loss, m))
}

// ---------------------------------------------------------------------------------------------------------
// Data

use super::template::Message;
use super::Model;

/// Most training examples read from one JSONL text (`lorag train`, the wasm `Trainer`).
pub const MAX_EXAMPLES: usize = 1_000_000;

/// One training example: a conversation whose assistant turns are learned.
pub type Example = Vec<Message>;

/// Examples from JSONL: each line `{"messages": [{"role", "content"}, …]}` (the chat format, as `lorag log
/// export` writes) or `{"prompt": …, "response": …}` (optionally `"system"`). Blank lines are skipped; a bad
/// line is an error naming its number. At most `max_examples` examples.
pub fn parse_examples(text: &str, max_examples: usize) -> Result<Vec<Example>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Pair {
        prompt: String,
        response: String,
        #[serde(default)]
        system: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Chat {
        messages: Vec<Message>,
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |why: String| Error::Config(format!("training data line {}: {why}", i + 1));
        if out.len() == max_examples {
            return Err(bad(format!("more than {max_examples} examples")));
        }
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let messages = if v.get("messages").is_some() {
            serde_json::from_value::<Chat>(v)
                .map_err(|e| bad(e.to_string()))?
                .messages
        } else {
            let p: Pair = serde_json::from_value(v).map_err(|e| {
                bad(format!(
                    "{e} (expected {{\"messages\": …}} or {{\"prompt\", \"response\"}})"
                ))
            })?;
            let mut m = Vec::new();
            if let Some(s) = p.system {
                m.push(Message {
                    role: "system".into(),
                    content: s,
                });
            }
            m.push(Message {
                role: "user".into(),
                content: p.prompt,
            });
            m.push(Message {
                role: "assistant".into(),
                content: p.response,
            });
            m
        };
        if !messages.iter().any(|m| m.role == "assistant") {
            return Err(bad("no assistant message to learn".into()));
        }
        out.push(messages);
    }
    Ok(out)
}

/// An example rendered with the model's chat template and tokenized, the loss on the assistant turns' tokens
/// (their text and end-of-turn marker). Each segment is tokenized on its own, split where generation splits
/// it: the prompt up to the opened assistant turn, then the answer. `None` when it is longer than `max_len`
/// tokens (such examples are skipped, not cut: a cut answer teaches stopping mid-sentence).
pub fn encode_example(
    model: &Model,
    example: &[Message],
    max_len: usize,
) -> Result<Option<Sequence>> {
    let mut ids: Vec<u32> = Vec::new();
    let mut learn: Vec<bool> = Vec::new();
    let mut text = String::new();
    let push = |ids: &mut Vec<u32>, learn: &mut Vec<bool>, segment: &str, on: bool| -> Result<()> {
        let toks = if ids.is_empty() {
            model.encode(segment, true)?
        } else {
            model.tokenizer.encode(segment, true)?
        };
        learn.extend(std::iter::repeat_n(on, toks.len()));
        ids.extend(toks);
        Ok(())
    };
    let template_error = || {
        Error::Template(
            "the chat template does not render a conversation as a prefix of its continuation; cannot mark the \
             assistant's tokens"
                .into(),
        )
    };
    for (i, m) in example.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let prompt = model.render_chat_with(&example[..i], true)?;
        let rest = prompt
            .strip_prefix(text.as_str())
            .ok_or_else(template_error)?;
        push(&mut ids, &mut learn, rest, false)?;
        let full = model.render_chat_with(&example[..=i], false)?;
        let answer = full
            .strip_prefix(prompt.as_str())
            .ok_or_else(template_error)?;
        push(&mut ids, &mut learn, answer, true)?;
        text = full;
        if ids.len() > max_len {
            return Ok(None);
        }
    }
    if ids.len() < 2 {
        return Ok(None);
    }
    // The prediction at position t is of token t + 1: it counts when token t + 1 is learned.
    let loss = learn[1..].to_vec();
    Ok(Some(Sequence { ids, loss }))
}

// ---------------------------------------------------------------------------------------------------------
// Optimizer

/// Learning-rate schedule after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Linear decay to 0 (Hugging Face Trainer's default).
    Linear,
    /// Half a cosine down to 0.
    Cosine,
    /// Constant.
    Constant,
}

/// Training hyper-parameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct TrainConfig {
    /// Peak learning rate.
    pub lr: f32,
    /// Decoupled weight decay (AdamW).
    pub weight_decay: f32,
    /// Adam β1, β2.
    pub betas: (f32, f32),
    /// Adam ε.
    pub eps: f32,
    /// Linear warm-up steps.
    pub warmup_steps: usize,
    /// Decay after warm-up.
    pub schedule: Schedule,
    /// Passes over the training examples.
    pub epochs: usize,
    /// Sequences per optimizer step (gradient accumulation: one sequence at a time).
    pub batch_size: usize,
    /// Longest sequence in tokens (longer examples are skipped).
    pub max_len: usize,
    /// Gradient clipping: global L2 norm (0 = none).
    pub max_grad_norm: f32,
    /// Fraction of the examples held out for evaluation (at least one when there are two or more examples).
    pub eval_fraction: f32,
    /// Seed of the split and the shuffles.
    pub seed: u64,
    /// Threads computing a batch's sequences side by side (0 = one per core; wasm: always one). The result does
    /// not depend on it: each sequence's gradient is computed on its own and they are summed in order.
    pub threads: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 2e-4,
            weight_decay: 0.0,
            betas: (0.9, 0.999),
            eps: 1e-8,
            warmup_steps: 0,
            schedule: Schedule::Linear,
            epochs: 3,
            batch_size: 4,
            max_len: 256,
            max_grad_norm: 1.0,
            eval_fraction: 0.1,
            seed: 1,
            threads: 0,
        }
    }
}

impl TrainConfig {
    /// The learning rate at optimizer step `step` (from 0) of `total`.
    pub fn lr_at(&self, step: usize, total: usize) -> f32 {
        if step < self.warmup_steps {
            return self.lr * step as f32 / self.warmup_steps.max(1) as f32;
        }
        let span = total.saturating_sub(self.warmup_steps).max(1) as f32;
        let progress = ((step - self.warmup_steps) as f32 / span).min(1.0);
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Linear => self.lr * (1.0 - progress),
            Schedule::Cosine => self.lr * 0.5 * (1.0 + (std::f32::consts::PI * progress).cos()),
        }
    }
}

/// AdamW's state (PyTorch's algorithm: decoupled decay, bias-corrected moments).
#[derive(Debug, Clone, Default)]
pub struct AdamW {
    /// First and second moments of each matrix's `A` then `Bᵀ`.
    pub m: Vec<Vec<f32>>,
    /// Second moments.
    pub v: Vec<Vec<f32>>,
    /// Steps taken.
    pub t: u64,
}

impl AdamW {
    /// One step on `p` with its gradients multiplied by `grad_scale` first, then clipped to
    /// `cfg.max_grad_norm`. Returns the gradient norm before clipping.
    pub fn step(&mut self, p: &mut LoraParams, cfg: &TrainConfig, lr: f32, grad_scale: f32) -> f32 {
        let n = p.mats.len() * 2;
        if self.m.len() != n {
            self.m = p
                .mats
                .iter()
                .flat_map(|m| [vec![0.0; m.ga.len()], vec![0.0; m.gbt.len()]])
                .collect();
            self.v = self.m.clone();
        }
        let mut sq = 0.0f64;
        for m in &mut p.mats {
            for g in m.ga.iter_mut().chain(m.gbt.iter_mut()) {
                *g *= grad_scale;
                sq += (*g as f64) * (*g as f64);
            }
        }
        let norm = sq.sqrt() as f32;
        let clip = if cfg.max_grad_norm > 0.0 && norm > cfg.max_grad_norm {
            cfg.max_grad_norm / (norm + 1e-6)
        } else {
            1.0
        };
        self.t += 1;
        let (b1, b2) = cfg.betas;
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        let step = lr / bc1;
        let decay = 1.0 - lr * cfg.weight_decay;
        for (i, tm) in p.mats.iter_mut().enumerate() {
            for (j, (w, g)) in [(&mut tm.m.a, &tm.ga), (&mut tm.m.bt, &tm.gbt)]
                .into_iter()
                .enumerate()
            {
                let (m, v) = (&mut self.m[2 * i + j], &mut self.v[2 * i + j]);
                for k in 0..w.len() {
                    let gk = g[k] * clip;
                    m[k] = b1 * m[k] + (1.0 - b1) * gk;
                    v[k] = b2 * v[k] + (1.0 - b2) * gk * gk;
                    w[k] *= decay;
                    w[k] -= step * m[k] / ((v[k] / bc2).sqrt() + cfg.eps);
                }
            }
        }
        norm
    }
}

// ---------------------------------------------------------------------------------------------------------
// Export

impl LoraParams {
    /// The adapter in PEFT's format: `adapter_config.json` text and `adapter_model.safetensors` bytes (f32,
    /// `lora_A` rank × in, `lora_B` out × rank, rows in Hugging Face order), loadable by Python PEFT on the
    /// Hugging Face model and by [`Adapter::from_peft`] on the GGUF.
    pub fn to_peft(&self, w: &Weights, base_model: &str) -> (String, Vec<u8>) {
        let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        for tm in &self.mats {
            let m = &tm.m;
            let stem = format!(
                "base_model.model.model.layers.{}.{}",
                tm.layer,
                tm.target.peft_path()
            );
            // Bᵀ (rank × rows) → B (rows × rank).
            let mut b = vec![0.0f32; m.rows * m.rank];
            for j in 0..m.rank {
                for r in 0..m.rows {
                    b[r * m.rank + j] = m.bt[j * m.rows + r];
                }
            }
            if w.cfg.arch == super::Arch::Llama && matches!(tm.target, Target::Q | Target::K) {
                let heads = if tm.target == Target::Q {
                    w.cfg.n_head
                } else {
                    w.cfg.n_kv_head
                };
                b = super::lora::gguf_rows_to_hf(&b, m.rows, m.rank, heads);
            }
            tensors.push((
                format!("{stem}.lora_A.weight"),
                vec![m.rank, m.cols],
                m.a.clone(),
            ));
            tensors.push((format!("{stem}.lora_B.weight"), vec![m.rows, m.rank], b));
        }
        let refs: Vec<(String, Vec<usize>, &[f32])> = tensors
            .iter()
            .map(|(n, s, v)| (n.clone(), s.clone(), v.as_slice()))
            .collect();
        let st = super::safetensors::write_f32(&refs, &[("format", "pt")]);
        let c = &self.config;
        let mut targets: Vec<&str> = c.targets.iter().map(|t| t.peft_name()).collect();
        targets.sort();
        targets.dedup();
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": c.rank,
            "lora_alpha": c.alpha,
            "lora_dropout": c.dropout,
            "use_rslora": c.rslora,
            "target_modules": targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
        });
        (
            serde_json::to_string_pretty(&config).expect("plain JSON"),
            st,
        )
    }
}

// ---------------------------------------------------------------------------------------------------------
// The training loop

/// Where a run stands, after each optimizer step.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Optimizer steps done.
    pub step: usize,
    /// Steps in the whole run.
    pub total_steps: usize,
    /// Current epoch (from 1).
    pub epoch: usize,
    /// Mean loss per learned token in this step.
    pub loss: f64,
    /// Learning rate used in this step.
    pub lr: f32,
    /// Gradient norm before clipping.
    pub grad_norm: f32,
    /// Tokens run through the model so far (learned or not).
    pub tokens: usize,
    /// Tokens per second in this session.
    pub tokens_per_s: f64,
    /// Seconds so far in this session.
    pub elapsed_s: f64,
    /// Estimated seconds left.
    pub eta_s: f64,
    /// Held-out loss, after the last step of each epoch.
    pub eval_loss: Option<f64>,
}

/// Trains one adapter: examples encoded and split, AdamW with warm-up and decay, gradient accumulation and
/// clipping, held-out evaluation after every epoch; resumable from [`Trainer::checkpoint`].
pub struct Trainer {
    /// The adapter being trained.
    pub params: LoraParams,
    /// Optimizer state.
    pub opt: AdamW,
    /// Hyper-parameters.
    pub cfg: TrainConfig,
    /// Training sequences.
    pub train: Vec<Sequence>,
    /// Held-out sequences.
    pub eval: Vec<Sequence>,
    /// Examples skipped for being longer than `max_len`.
    pub skipped: usize,
    order: Vec<usize>,
    pos: usize,
    /// Optimizer steps done.
    pub step: usize,
    epoch: usize,
    tokens: usize,
    rng: Rng,
}

impl Trainer {
    /// A run over `examples` for `model` (whose adapters are not used: training starts from the base).
    pub fn new(
        model: &Model,
        examples: &[Example],
        lora: &LoraConfig,
        cfg: TrainConfig,
    ) -> Result<Trainer> {
        if cfg.batch_size == 0 || cfg.epochs == 0 || cfg.max_len < 2 {
            return Err(Error::Config(
                "batch size, epochs and max_len must be positive".into(),
            ));
        }
        if !cfg.lr.is_finite() || cfg.lr <= 0.0 || !(0.0..1.0).contains(&cfg.eval_fraction) {
            return Err(Error::Config(
                "lr must be positive and eval_fraction in [0, 1)".into(),
            ));
        }
        let mut seqs = Vec::new();
        let mut skipped = 0;
        for e in examples {
            match encode_example(model, e, cfg.max_len.min(model.config().n_ctx_train.max(2)))? {
                Some(s) if s.loss_tokens() > 0 => seqs.push(s),
                _ => skipped += 1,
            }
        }
        if seqs.is_empty() {
            return Err(Error::Config(format!(
                "no usable training examples ({skipped} longer than {} tokens or without answer tokens)",
                cfg.max_len
            )));
        }
        let mut rng = Rng::new(cfg.seed);
        shuffle(&mut seqs, &mut rng);
        let n_eval = if seqs.len() >= 2 && cfg.eval_fraction > 0.0 {
            ((seqs.len() as f32 * cfg.eval_fraction).round() as usize).clamp(1, seqs.len() - 1)
        } else {
            0
        };
        let eval = seqs.split_off(seqs.len() - n_eval);
        let params = LoraParams::init(&model.weights, lora)?;
        let mut t = Trainer {
            params,
            opt: AdamW::default(),
            cfg,
            order: (0..seqs.len()).collect(),
            train: seqs,
            eval,
            skipped,
            pos: 0,
            step: 0,
            epoch: 0,
            tokens: 0,
            rng,
        };
        t.new_epoch();
        Ok(t)
    }

    fn new_epoch(&mut self) {
        self.epoch += 1;
        self.pos = 0;
        shuffle(&mut self.order, &mut self.rng);
    }

    /// Optimizer steps per epoch.
    pub fn steps_per_epoch(&self) -> usize {
        self.train.len().div_ceil(self.cfg.batch_size)
    }

    /// Optimizer steps in the run.
    pub fn total_steps(&self) -> usize {
        self.steps_per_epoch() * self.cfg.epochs
    }

    /// Whether every step has been taken.
    pub fn done(&self) -> bool {
        self.step >= self.total_steps()
    }

    /// Mean loss per learned token over the held-out sequences (`None` when there are none). Natively on the
    /// model's GPU when it has one; in wasm on the CPU (use [`Trainer::eval_loss_async`] there for the GPU).
    pub fn eval_loss(&mut self, model: &Model) -> Result<Option<f64>> {
        drive(self.eval_loss_with(model, BLOCKING_GPU))
    }

    /// [`Trainer::eval_loss`], on the model's GPU when it has one.
    pub async fn eval_loss_async(&mut self, model: &Model) -> Result<Option<f64>> {
        self.eval_loss_with(model, true).await
    }

    async fn eval_loss_with(&mut self, model: &Model, gpu: bool) -> Result<Option<f64>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        let seqs: Vec<&Sequence> = self.eval.iter().collect();
        let none = vec![None; seqs.len()];
        let (mut sum, mut n) = (0.0, 0);
        let run = batch(
            model,
            gpu,
            &self.params,
            &seqs,
            none,
            false,
            self.cfg.threads,
        );
        for (l, k, _) in run.await? {
            sum += l;
            n += k;
        }
        Ok(Some(sum / n.max(1) as f64))
    }

    /// One optimizer step (`batch_size` sequences, fewer at the end of an epoch). Returns (mean loss, lr,
    /// gradient norm, tokens run). Natively on the model's GPU when it has one; in wasm on the CPU (use
    /// [`Trainer::step_async`] there for the GPU).
    pub fn step(&mut self, model: &Model) -> Result<(f64, f32, f32, usize)> {
        drive(self.step_with(model, BLOCKING_GPU))
    }

    /// [`Trainer::step`], on the model's GPU when it has one.
    pub async fn step_async(&mut self, model: &Model) -> Result<(f64, f32, f32, usize)> {
        self.step_with(model, true).await
    }

    async fn step_with(&mut self, model: &Model, gpu: bool) -> Result<(f64, f32, f32, usize)> {
        if self.done() {
            return Err(Error::Config("training is finished".into()));
        }
        if self.pos >= self.order.len() {
            self.new_epoch();
        }
        let end = (self.pos + self.cfg.batch_size).min(self.order.len());
        let seqs: Vec<&Sequence> = (self.pos..end)
            .map(|i| &self.train[self.order[i]])
            .collect();
        // Each sequence's dropout masks come from its own generator, forked in order from the run's.
        let rngs = seqs
            .iter()
            .map(|_| Some(Rng::new(self.rng.next_u64())))
            .collect();
        let results = batch(
            model,
            gpu,
            &self.params,
            &seqs,
            rngs,
            true,
            self.cfg.threads,
        )
        .await?;
        self.params.zero_grad();
        let (mut sum, mut n) = (0.0, 0usize);
        for (l, k, g) in &results {
            sum += l;
            n += k;
            if let Some(g) = g {
                for (m, gm) in self.params.mats.iter_mut().zip(&g.mats) {
                    add(&mut m.ga, &gm.ga);
                    add(&mut m.gbt, &gm.gbt);
                }
            }
        }
        let tokens = seqs.iter().map(|s| s.ids.len()).sum::<usize>();
        self.pos = end;
        let lr = self.cfg.lr_at(self.step, self.total_steps());
        let norm = self
            .opt
            .step(&mut self.params, &self.cfg, lr, 1.0 / n.max(1) as f32);
        self.step += 1;
        self.tokens += tokens;
        Ok((sum / n.max(1) as f64, lr, norm, tokens))
    }

    /// Steps until the run is done or `on_progress` returns `false` (abort: the state stays resumable).
    pub fn run(
        &mut self,
        model: &Model,
        on_progress: &mut dyn FnMut(&Progress) -> bool,
    ) -> Result<()> {
        let mut clock = RunClock::start(self);
        while !self.done() {
            let p = self.advance(model, &mut clock)?;
            if !on_progress(&p) {
                break;
            }
        }
        Ok(())
    }

    /// One optimizer step, and the held-out loss at the end of an epoch, reported against `clock` (speed and
    /// time left over this session's steps).
    pub fn advance(&mut self, model: &Model, clock: &mut RunClock) -> Result<Progress> {
        drive(self.advance_with(model, clock, BLOCKING_GPU))
    }

    /// [`Trainer::advance`], on the model's GPU when it has one.
    pub async fn advance_async(&mut self, model: &Model, clock: &mut RunClock) -> Result<Progress> {
        self.advance_with(model, clock, true).await
    }

    async fn advance_with(
        &mut self,
        model: &Model,
        clock: &mut RunClock,
        gpu: bool,
    ) -> Result<Progress> {
        let (loss, lr, grad_norm, tokens) = self.step_with(model, gpu).await?;
        clock.tokens += tokens;
        let end_of_epoch = self.pos >= self.order.len();
        let eval_loss = if end_of_epoch {
            self.eval_loss_with(model, gpu).await?
        } else {
            None
        };
        let elapsed_s = (super::now_ms() - clock.t0) / 1000.0;
        let per_step = elapsed_s / (self.step - clock.first_step).max(1) as f64;
        Ok(Progress {
            step: self.step,
            total_steps: self.total_steps(),
            epoch: self.epoch,
            loss,
            lr,
            grad_norm,
            tokens: self.tokens,
            tokens_per_s: clock.tokens as f64 / elapsed_s.max(1e-9),
            elapsed_s,
            eta_s: per_step * (self.total_steps() - self.step) as f64,
            eval_loss,
        })
    }
}

/// Where a session of steps started (for speed and time-left figures).
#[derive(Debug, Clone)]
pub struct RunClock {
    t0: f64,
    tokens: usize,
    first_step: usize,
}

impl RunClock {
    /// Start counting now, from `t`'s current step.
    pub fn start(t: &Trainer) -> RunClock {
        RunClock {
            t0: super::now_ms(),
            tokens: 0,
            first_step: t.step,
        }
    }
}

fn add(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

/// Whether the synchronous [`Trainer`] calls may wait for a GPU: natively they block on it; in wasm they cannot.
const BLOCKING_GPU: bool = cfg!(not(target_arch = "wasm32"));

/// Drive a step's future: natively to its end (waiting for the GPU when there is one); in wasm it must not
/// wait ([`BLOCKING_GPU`] keeps it on the CPU).
fn drive<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    #[cfg(not(target_arch = "wasm32"))]
    return crate::kernels::block_on(f);
    #[cfg(target_arch = "wasm32")]
    super::run_ready(f)
}

/// Per sequence: (loss sum, tokens counted, the gradients when `grad`), each computed from its own copy of the
/// parameters, their frozen products on the model's GPU when it has one and `gpu`, on up to `threads` threads
/// (0 = one per core; wasm: this thread, in turn). The same results whatever the thread count.
#[allow(clippy::type_complexity)]
async fn batch(
    model: &Model,
    gpu: bool,
    p: &LoraParams,
    seqs: &[&Sequence],
    rngs: Vec<Option<Rng>>,
    grad: bool,
    threads: usize,
) -> Result<Vec<(f64, usize, Option<LoraParams>)>> {
    let (w, data) = (&model.weights, model.bytes());
    let dev = Products::of(model, gpu);
    // In wasm (one thread) each sequence in turn, awaiting the GPU when there is one.
    #[cfg(target_arch = "wasm32")]
    {
        let _ = threads;
        let mut out = Vec::with_capacity(seqs.len());
        for (seq, rng) in seqs.iter().zip(rngs) {
            out.push(sequence_grad(dev, w, data, p, seq, grad, rng).await?);
        }
        Ok(out)
    }
    // Natively the sequences side by side on `threads` threads, each blocking on its own GPU products when the
    // model is on the GPU (the device takes work from several threads; their CPU parts overlap its waits).
    #[cfg(not(target_arch = "wasm32"))]
    {
        let one = |i: usize, rng: Option<Rng>| {
            crate::kernels::block_on(sequence_grad(dev, w, data, p, seqs[i], grad, rng))
        };
        let threads = match threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            t => t,
        }
        .min(seqs.len());
        if threads > 1 {
            use std::sync::atomic::{AtomicUsize, Ordering};
            use std::sync::Mutex;
            let next = AtomicUsize::new(0);
            let rngs: Vec<Mutex<Option<Rng>>> = rngs.into_iter().map(Mutex::new).collect();
            let slots: Vec<Mutex<Option<Result<(f64, usize, Option<LoraParams>)>>>> =
                seqs.iter().map(|_| Mutex::new(None)).collect();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= seqs.len() {
                            break;
                        }
                        let rng = rngs[i].lock().unwrap_or_else(|e| e.into_inner()).take();
                        let r = one(i, rng);
                        *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                    });
                }
            });
            return slots
                .into_iter()
                .map(|m| {
                    m.into_inner()
                        .unwrap_or_else(|e| e.into_inner())
                        .expect("every sequence ran")
                })
                .collect();
        }
        rngs.into_iter()
            .enumerate()
            .map(|(i, r)| one(i, r))
            .collect()
    }
}

/// One sequence of a batch: (loss sum, tokens counted, the gradients when `grad`) from its own zeroed copy of
/// the parameters.
async fn sequence_grad(
    dev: Products<'_>,
    w: &Weights,
    data: &[u8],
    p: &LoraParams,
    seq: &Sequence,
    grad: bool,
    mut rng: Option<Rng>,
) -> Result<(f64, usize, Option<LoraParams>)> {
    let mut q = p.clone();
    q.zero_grad();
    let (l, k) = loss_and_grad_with(dev, w, data, &mut q, seq, grad, rng.as_mut()).await?;
    Ok((l, k, grad.then_some(q)))
}

fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i + 1));
    }
}

// ---------------------------------------------------------------------------------------------------------
// Checkpoints

#[derive(serde::Serialize, serde::Deserialize)]
struct CheckpointMeta {
    version: u32,
    lora: LoraConfig,
    train: TrainConfig,
    step: usize,
    epoch: usize,
    pos: usize,
    tokens: usize,
    rng: String,
    adam_t: u64,
    order: Vec<usize>,
    mats: Vec<(usize, Target)>,
    data: String,
}

fn data_hash(train: &[Sequence], eval: &[Sequence]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (tag, set) in [(0u8, train), (1u8, eval)] {
        for s in set {
            h.update([tag]);
            h.update((s.ids.len() as u64).to_le_bytes());
            for (i, id) in s.ids.iter().enumerate() {
                h.update(id.to_le_bytes());
                h.update([s.loss.get(i).copied().unwrap_or(false) as u8]);
            }
        }
    }
    format!("{:x}", h.finalize())
}

impl Trainer {
    /// The whole state (adapter, optimizer moments, position in the data, generator) as one safetensors file.
    pub fn checkpoint(&self) -> Vec<u8> {
        let meta = CheckpointMeta {
            version: 1,
            lora: self.params.config.clone(),
            train: self.cfg.clone(),
            step: self.step,
            epoch: self.epoch,
            pos: self.pos,
            tokens: self.tokens,
            rng: self.rng.0.to_string(),
            adam_t: self.opt.t,
            order: self.order.clone(),
            mats: self
                .params
                .mats
                .iter()
                .map(|m| (m.layer, m.target))
                .collect(),
            data: data_hash(&self.train, &self.eval),
        };
        let meta = serde_json::to_string(&meta).expect("plain JSON");
        let mut tensors: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
        for (i, m) in self.params.mats.iter().enumerate() {
            tensors.push((format!("a.{i}"), vec![m.m.a.len()], &m.m.a));
            tensors.push((format!("bt.{i}"), vec![m.m.bt.len()], &m.m.bt));
        }
        for (i, (m, v)) in self.opt.m.iter().zip(&self.opt.v).enumerate() {
            tensors.push((format!("m.{i}"), vec![m.len()], m));
            tensors.push((format!("v.{i}"), vec![v.len()], v));
        }
        super::safetensors::write_f32(&tensors, &[("lorag_checkpoint", &meta)])
    }

    /// Continue a run from [`Trainer::checkpoint`]'s bytes, on the same model and examples (checked by hash:
    /// another data file is refused, not silently mixed in).
    pub fn resume(model: &Model, examples: &[Example], checkpoint: &[u8]) -> Result<Trainer> {
        let bad = |why: &str| Error::Config(format!("training checkpoint: {why}"));
        let st = super::safetensors::SafeTensors::parse(checkpoint, Default::default())?;
        let meta = st
            .metadata
            .iter()
            .find(|(k, _)| k == "lorag_checkpoint")
            .ok_or_else(|| bad("not a lorag training checkpoint"))?;
        let meta: CheckpointMeta =
            serde_json::from_str(&meta.1).map_err(|e| bad(&e.to_string()))?;
        if meta.version != 1 {
            return Err(bad("unknown version"));
        }
        let mut t = Trainer::new(model, examples, &meta.lora, meta.train.clone())?;
        if data_hash(&t.train, &t.eval) != meta.data {
            return Err(bad(
                "made from other training data (or another model's tokenizer)",
            ));
        }
        let mats: Vec<(usize, Target)> =
            t.params.mats.iter().map(|m| (m.layer, m.target)).collect();
        if mats != meta.mats || meta.order.len() != t.train.len() || meta.pos > t.train.len() {
            return Err(bad("does not fit this model and data"));
        }
        let mut perm = meta.order.clone();
        perm.sort_unstable();
        if perm.iter().enumerate().any(|(i, &o)| i != o) {
            return Err(bad("the example order is not a permutation"));
        }
        let get = |name: &str, len: usize| -> Result<Vec<f32>> {
            let e = st
                .get(name)
                .ok_or_else(|| bad(&format!("{name} is missing")))?;
            if e.elements() != len || e.dtype != super::safetensors::Dtype::F32 {
                return Err(bad(&format!("{name} has the wrong size or type")));
            }
            let v = super::safetensors::to_f32(e, checkpoint);
            if v.iter().any(|x| !x.is_finite()) {
                return Err(bad(&format!("{name} holds NaN or infinite values")));
            }
            Ok(v)
        };
        for (i, m) in t.params.mats.iter_mut().enumerate() {
            m.m.a = get(&format!("a.{i}"), m.m.a.len())?;
            m.m.bt = get(&format!("bt.{i}"), m.m.bt.len())?;
        }
        if meta.adam_t > 0 {
            let sizes: Vec<usize> = t
                .params
                .mats
                .iter()
                .flat_map(|m| [m.ga.len(), m.gbt.len()])
                .collect();
            t.opt.m = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| get(&format!("m.{i}"), n))
                .collect::<Result<_>>()?;
            t.opt.v = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| get(&format!("v.{i}"), n))
                .collect::<Result<_>>()?;
        }
        t.opt.t = meta.adam_t;
        t.step = meta.step;
        t.epoch = meta.epoch;
        t.pos = meta.pos;
        t.tokens = meta.tokens;
        t.order = meta.order;
        t.rng = Rng(meta.rng.parse().map_err(|_| bad("bad generator state"))?);
        Ok(t)
    }
}
