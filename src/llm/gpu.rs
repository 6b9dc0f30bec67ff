//! The decoder on the GPU: the same layers as [`Weights::forward`], as WGSL kernels (src/kernels/wgsl/).
//!
//! [`GpuWeights`] uploads every matrix once, still quantized. A [`GpuSession`] is one conversation: the KV cache
//! and activations live on the GPU, and every kernel launch of a step (all layers, the final norm, the output
//! projection, the active adapters' low-rank products) is built once, with its bind group, when the session
//! starts: per layer, q, k and v in one product (normalizing its input itself; one matrix of the three's rows,
//! uploaded so where their types agree, else three products writing into the same buffer), attention (rotating
//! the step's q and k itself and storing its k and v into the cache), the output projection (adding into the
//! residual), gate and up (normalizing likewise, uploaded as one matrix where their types agree: in steps of up
//! to `TILE` tokens one launch of row pairs, u = silu(gate · x) · (up · x); in longer steps, or where either has
//! an adapter, two launches, up finishing with SwiGLU, silu(gate) · up), and down (adding into the residual): 5
//! launches a layer when decoding (6 in prefill; 2 more where q, k and v are separate; 1 more in steps of 2 to
//! `TILE` tokens where attention is split over position chunks, whose sum one-token steps' output projection
//! computes as it reads them: [`Input::Combine`]), plus the final norm and
//! the output projection (and two per adapted matrix). A step then writes the new tokens' embeddings and the step's position into two small buffers, records the launches into one compute
//! pass, submits once, and reads back only the logits: no buffer or bind group is created per token. Greedy
//! decoding ([`GpuSession::greedy`]) reads back not even those: the argmax and the next token's embedding run on
//! the GPU, several steps a submission, and only the chosen ids come back.

use super::lora::{Adapter, Target};
use super::model::{Mat, Weights};
use super::quant::{self, GgmlType};
use crate::kernels::gpu::{
    attention_partials, combine_fits, Dispatch, Gpu, GpuMatrix, Grid, Input, Kernel, MatvecParams,
    Recorded, Steps, TopK, MAX_GREEDY_BATCH, MAX_HEAD_DIM, MAX_TOP_K, MAX_TOP_K_INPUT, TILE,
};
use crate::{Error, Result};

/// One layer on the GPU.
#[derive(Debug)]
struct GpuLayer {
    /// In [`Target::ALL`]'s order; q, k and v are views of `qkv` where it exists.
    mats: [GpuMatrix; 7],
    /// q, k and v as one matrix (their rows one after the other) with its bias (the three biases, likewise),
    /// where their types agree and they have biases all or none: one product instead of three.
    qkv: Option<(GpuMatrix, Option<wgpu::Buffer>)>,
    /// The gate and up projections as one matrix (the gate's rows, then up's) where their types and shapes
    /// agree; `mats`' gate and up are views of it. Where it is one chunk, decoding runs both in one launch.
    gate_up: Option<GpuMatrix>,
    attn_norm: wgpu::Buffer,
    ffn_norm: wgpu::Buffer,
    bias: [Option<wgpu::Buffer>; 3],
}

impl GpuLayer {
    /// The base products writing a token's `[q | k | v]`: (matrix, bias, its first row there). One where q, k and
    /// v are one matrix, else one each.
    fn qkv_products(&self) -> Vec<(&GpuMatrix, Option<&wgpu::Buffer>, usize)> {
        match &self.qkv {
            Some((m, bias)) => vec![(m, bias.as_ref(), 0)],
            None => {
                let mut r0 = 0;
                (0..3)
                    .map(|i| {
                        let p = (&self.mats[i], self.bias[i].as_ref(), r0);
                        r0 += self.mats[i].rows;
                        p
                    })
                    .collect()
            }
        }
    }
}

/// A model's weights resident on the GPU.
#[derive(Debug)]
pub struct GpuWeights {
    layers: Vec<GpuLayer>,
    output_norm: wgpu::Buffer,
    output: GpuMatrix,
    /// The output matrix is the token embeddings (tied), which greedy decoding's embed.wgsl then reads.
    tied: bool,
    /// Untied: the token embeddings, uploaded when a session first decodes greedily on the GPU.
    embedding: std::sync::OnceLock<GpuMatrix>,
}

fn upload(gpu: &Gpu, m: &Mat, data: &[u8]) -> Result<GpuMatrix> {
    gpu.upload_matrix(m.ty, m.bytes(data), m.rows, m.cols)
}

impl GpuWeights {
    /// Layer `layer`'s projection `t`.
    pub fn matrix(&self, layer: usize, t: super::lora::Target) -> &GpuMatrix {
        &self.layers[layer].mats[t.index()]
    }

    /// The output (logits) matrix.
    pub fn output(&self) -> &GpuMatrix {
        &self.output
    }

    /// Upload `w`'s matrices (read from the model bytes `data`) and norms.
    pub fn upload(gpu: &Gpu, w: &Weights, data: &[u8]) -> Result<GpuWeights> {
        let mut layers = Vec::with_capacity(w.layers.len());
        for l in &w.layers {
            let (q, k, v) = (&l.wq, &l.wk, &l.wv);
            let biases = [&l.bq, &l.bk, &l.bv];
            let fuse = q.ty == k.ty
                && k.ty == v.ty
                && q.cols == k.cols
                && k.cols == v.cols
                && (biases.iter().all(|b| b.is_some()) || biases.iter().all(|b| b.is_none()));
            let qkv = if fuse {
                let bytes = [q, k, v].map(|m| m.bytes(data)).concat();
                let m = gpu.upload_matrix(q.ty, &bytes, q.rows + k.rows + v.rows, q.cols)?;
                let bias: Option<Vec<f32>> = biases
                    .iter()
                    .map(|b| b.as_deref())
                    .collect::<Option<Vec<&[f32]>>>()
                    .map(|b| b.concat());
                Some((m, bias.map(|b| gpu.f32_buffer("qkv bias", &b))))
            } else {
                None
            };
            let [mq, mk, mv] = match &qkv {
                Some((m, _)) => [
                    m.rows(0, q.rows),
                    m.rows(q.rows, k.rows),
                    m.rows(q.rows + k.rows, v.rows),
                ],
                None => [
                    upload(gpu, q, data)?,
                    upload(gpu, k, data)?,
                    upload(gpu, v, data)?,
                ],
            };
            let (g, u) = (&l.w_gate, &l.w_up);
            let gate_up = (g.ty == u.ty && g.rows == u.rows && g.cols == u.cols)
                .then(|| {
                    let bytes = [g.bytes(data), u.bytes(data)].concat();
                    gpu.upload_matrix(g.ty, &bytes, 2 * g.rows, g.cols)
                })
                .transpose()?;
            let [mg, mu] = match &gate_up {
                Some(m) => [m.rows(0, g.rows), m.rows(g.rows, u.rows)],
                None => [upload(gpu, g, data)?, upload(gpu, u, data)?],
            };
            let mats = [
                mq,
                mk,
                mv,
                upload(gpu, &l.wo, data)?,
                mg,
                mu,
                upload(gpu, &l.w_down, data)?,
            ];
            let b = |v: &Option<Vec<f32>>| v.as_ref().map(|v| gpu.f32_buffer("bias", v));
            layers.push(GpuLayer {
                mats,
                qkv,
                gate_up,
                attn_norm: gpu.f32_buffer("attn_norm", &l.attn_norm),
                ffn_norm: gpu.f32_buffer("ffn_norm", &l.ffn_norm),
                // (fused: in the qkv bias)
                bias: match fuse {
                    true => [None, None, None],
                    false => [b(&l.bq), b(&l.bk), b(&l.bv)],
                },
            });
        }
        Ok(GpuWeights {
            layers,
            output_norm: gpu.f32_buffer("output_norm", &w.output_norm),
            output: upload(gpu, &w.output, data)?,
            tied: (w.output.ty, w.output.start, w.output.len)
                == (w.tok_embd.ty, w.tok_embd.start, w.tok_embd.len),
            embedding: std::sync::OnceLock::new(),
        })
    }

    /// The token embeddings on the GPU (uploaded on first use where they are not the output matrix).
    fn embedding(&self, gpu: &Gpu, w: &Weights, data: &[u8]) -> Result<&GpuMatrix> {
        if self.tied {
            return Ok(&self.output);
        }
        if self.embedding.get().is_none() {
            let _ = self.embedding.set(upload(gpu, &w.tok_embd, data)?);
        }
        Ok(self.embedding.get().unwrap())
    }
}

/// One conversation on the GPU: KV cache, activations and the launches of a step, built once.
pub struct GpuSession<'a> {
    gpu: &'a Gpu,
    gw: &'a GpuWeights,
    cpu: &'a Weights,
    data: &'a [u8],
    n_ctx: usize,
    batch: usize,
    /// Tokens in the cache.
    pub len: usize,
    x: wgpu::Buffer,
    step: wgpu::Buffer,
    logits: wgpu::Buffer,
    staging: wgpu::Buffer,
    dispatches: Vec<Dispatch>,
    output: Vec<Dispatch>,
    /// Greedy decoding on the GPU, set up by its first [`GpuSession::greedy`].
    greedy: Option<Greedy>,
    /// Sampling's candidates on the GPU and their read-back buffer, set up by the first
    /// [`GpuSession::forward_top`] (again if it asks for another k).
    top: Option<(TopK, wgpu::Buffer)>,
    /// The next sampled step's commands, recorded while the GPU ran the one before, and the position they run.
    ahead: Option<(usize, Recorded)>,
    /// Sampled steps submitted from commands recorded ahead (for tests).
    pub recorded_ahead: usize,
    // Kept alive for the bind groups that use them.
    _keep: Vec<wgpu::Buffer>,
    _adapters: Vec<GpuMatrix>,
}

impl std::fmt::Debug for GpuSession<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuSession")
            .field("n_ctx", &self.n_ctx)
            .field("len", &self.len)
            .finish()
    }
}

/// A product's input: a buffer, how the kernel transforms it on the way in (the layer's norms run inside the
/// products that read their results), and the norm weights.
type In<'b> = (&'b wgpu::Buffer, Input, Option<&'b wgpu::Buffer>);

/// A product's output: a buffer, where row 0 of token 0 goes, and the elements between tokens.
type Out<'b> = (&'b wgpu::Buffer, u32, u32);

/// How a product finishes: as it is; with SwiGLU by a gate laid out as its output (y = silu(gate) · y); or as the
/// gate and up projections' row pairs (the matrix holds both: [`MatvecParams::pair`]).
#[derive(Clone, Copy)]
enum Glu<'b> {
    Off,
    Gate(&'b wgpu::Buffer),
    Pair,
}

impl<'b> From<Option<&'b wgpu::Buffer>> for Glu<'b> {
    fn from(gate: Option<&'b wgpu::Buffer>) -> Self {
        gate.map_or(Glu::Off, Glu::Gate)
    }
}

fn whole(b: &wgpu::Buffer, rows: usize) -> Out<'_> {
    (b, 0, rows as u32)
}

fn plain(b: &wgpu::Buffer) -> In<'_> {
    (b, Input::Plain, None)
}

/// `ds`, to run only in the steps `steps` admits (a fused launch in some steps, the launches it replaces in the
/// others).
fn in_steps(mut ds: Vec<Dispatch>, steps: Steps) -> Vec<Dispatch> {
    for d in &mut ds {
        d.steps = steps;
    }
    ds
}

/// A session's greedy decoding on the GPU: each step ends with argmax.wgsl writing the chosen token into
/// `tokens` at the next position, and the next step starts with embed.wgsl reading it, so that a submission runs
/// several steps without the host; their tokens come back together.
struct Greedy {
    /// Launches writing the embedding of the token at the step's position into `x`.
    embed: Vec<Dispatch>,
    argmax: Dispatch,
    /// The token at each position (n_ctx + 1 slots; a step at position p reads slot p and writes p + 1).
    tokens: wgpu::Buffer,
    /// Per position p the step record (p, 1, 0, 0): a greedy step copies its own into the step buffer.
    plan: wgpu::Buffer,
    /// Two read-back buffers: a submission's tokens are read while the next one runs.
    staging: [wgpu::Buffer; 2],
    turn: usize,
    /// Submitted, not yet read: at most two, the second continuing from the first's last token.
    pending: std::collections::VecDeque<Pending>,
    /// The token at position `len` from which `pending` continues (the last one the caller got).
    from: Option<u32>,
}

/// What a step reads back: the logits, or the sampling candidates found on the GPU.
enum Read {
    Logits(Vec<f32>),
    Top(Vec<(u32, f32)>),
}

/// A greedy submission: `k` steps from position `pos0`, its tokens going to `staging`.
struct Pending {
    pos0: usize,
    k: usize,
    staging: usize,
    map: crate::kernels::gpu::MapRequest,
}

const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

impl<'a> GpuSession<'a> {
    /// A session for up to `n_ctx` tokens, fed at most `batch` tokens per step, with `lora` applied throughout.
    pub fn new(
        gpu: &'a Gpu,
        gw: &'a GpuWeights,
        cpu: &'a Weights,
        data: &'a [u8],
        n_ctx: usize,
        batch: usize,
        lora: &[(&Adapter, f32)],
    ) -> Result<GpuSession<'a>> {
        gpu.check()?;
        let c = &cpu.cfg;
        if n_ctx == 0 || n_ctx > c.n_ctx_train.max(1 << 16) {
            return Err(Error::Config(format!("context size {n_ctx} out of range")));
        }
        let batch = batch.clamp(1, 512).min(n_ctx);
        let (d, hd, ff) = (c.n_embd, c.head_dim, c.n_ff);
        let (q_dim, kv_dim) = (c.n_head * hd, c.n_kv_head * hd);
        if hd > MAX_HEAD_DIM {
            return Err(Error::Device(format!(
                "head size {hd}: the GPU attention kernel holds heads of up to {MAX_HEAD_DIM} values"
            )));
        }
        let kv_total = (c.n_layer * n_ctx * kv_dim * 4) as u64;
        if kv_total > gpu.info.max_storage_binding {
            return Err(Error::Device(format!(
                "a {n_ctx}-token KV cache needs {kv_total} bytes per buffer, over the device's {}-byte binding",
                gpu.info.max_storage_binding
            )));
        }
        let f = |label: &str, n: usize| gpu.buffer(label, (n * 4) as u64, STORAGE);
        let x = f("x", batch * d);
        let h = f("h", batch * d);
        // Per token [q | k | v], as the fused product writes them and attention reads them.
        let qkv_stride = q_dim + 2 * kv_dim;
        let qkv = f("qkv", batch * qkv_stride);
        let att = f("att", batch * q_dim);
        let g = f("g", batch * ff);
        let u = f("u", batch * ff);
        let scores = f("scores", batch * c.n_head * n_ctx);
        // Decoding steps' attention split over position chunks (Gpu::attention), their partial sums.
        let chunks = gpu.attention_chunks(c.n_head);
        // Decoding's output projection adds the chunks up itself (Input::Combine) where its factors fit.
        let combine_in = gpu.combine_in_product() && combine_fits(c.n_head, chunks);
        let parts = f(
            "attention partials",
            attention_partials(chunks, c.n_head, hd),
        );
        // Per layer n_ctx × kv_dim values each: v by position, k by dim (attention.wgsl says why).
        let kc = gpu.buffer("k cache", kv_total, STORAGE);
        let vc = gpu.buffer("v cache", kv_total, STORAGE);
        let logits = f("logits", c.n_vocab);
        let staging = gpu.buffer(
            "logits staging",
            (c.n_vocab * 4) as u64,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        );
        let cs: Vec<f32> = cpu
            .rope_table(0, n_ctx)
            .into_iter()
            .flat_map(|(c, s)| [c, s])
            .collect();
        let cs = gpu.f32_buffer("rope cos/sin", &cs);
        let step = gpu.uniform(&[0, 0, 0, 0]);
        let mut keep = vec![h.clone(), qkv.clone(), att.clone()];
        keep.extend([
            g.clone(),
            u.clone(),
            scores.clone(),
            parts.clone(),
            kc.clone(),
            vc.clone(),
            cs.clone(),
        ]);
        let mut adapters = Vec::new();
        let mut ds: Vec<Dispatch> = Vec::new();
        // y (+)= scale · m·x (+ bias), finished as `glu` says.
        let mv = |m: &GpuMatrix,
                  (x, input, norm): In,
                  (y, out_off, out_stride): Out,
                  bias,
                  acc: bool,
                  scale: f32,
                  glu: Glu| {
            let gate = match glu {
                Glu::Gate(g) => Some(g),
                Glu::Off | Glu::Pair => None,
            };
            gpu.matvec_dispatches_with(
                m,
                x,
                y,
                bias,
                norm,
                gate,
                &step,
                MatvecParams {
                    in_stride: m.cols as u32,
                    out_off,
                    out_stride,
                    accumulate: acc,
                    scale,
                    input,
                    glu: gate.is_some(),
                    pair: matches!(glu, Glu::Pair),
                    ..Default::default()
                },
            )
        };
        let normed = Input::RmsNorm { eps: c.eps };
        let half = c.rope_dim / 2;
        for (li, l) in gw.layers.iter().enumerate() {
            let cache_off = (li * n_ctx * kv_dim) as u32;
            let attn_in = (&x, normed, Some(&l.attn_norm));
            let ffn_in = (&x, normed, Some(&l.ffn_norm));
            // (matrix index, input, output, accumulate into the output, SwiGLU's gate: the up projection
            // finishes u = silu(g) · u, which down reads)
            type Step<'b> = (usize, In<'b>, Out<'b>, bool, Option<&'b wgpu::Buffer>);
            let at = |off: usize| (&qkv, off as u32, qkv_stride as u32);
            let plan: [Step; 7] = [
                (0, attn_in, at(0), false, None),
                (1, attn_in, at(q_dim), false, None),
                (2, attn_in, at(q_dim + kv_dim), false, None),
                (3, plain(&att), whole(&x, d), true, None),
                (4, ffn_in, whole(&g, ff), false, None),
                (5, ffn_in, whole(&u, ff), false, Some(&g)),
                (6, plain(&u), whole(&x, d), true, None),
            ];
            // The adapters on each of the layer's matrices, uploaded once: (A, B, their intermediate, scale).
            let mut lora_mats: [Vec<(GpuMatrix, GpuMatrix, wgpu::Buffer, f32)>; 7] =
                Default::default();
            for (idx, mats) in lora_mats.iter_mut().enumerate() {
                for &(a, weight) in lora {
                    let Some(lm) = a.get(li, Target::ALL[idx]).filter(|_| weight != 0.0) else {
                        continue;
                    };
                    let to_bytes =
                        |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
                    let am =
                        gpu.upload_matrix(GgmlType::F32, &to_bytes(&lm.a), lm.rank, lm.cols)?;
                    // B is kept transposed (rank × rows); the kernel wants rows × rank.
                    let mut b = vec![0.0f32; lm.rows * lm.rank];
                    for j in 0..lm.rank {
                        for r in 0..lm.rows {
                            b[r * lm.rank + j] = lm.bt[j * lm.rows + r];
                        }
                    }
                    let bm = gpu.upload_matrix(GgmlType::F32, &to_bytes(&b), lm.rows, lm.rank)?;
                    let t = gpu.buffer("lora t", (batch * lm.rank * 4) as u64, STORAGE);
                    mats.push((am, bm, t, weight * lm.scale));
                }
            }
            let adapted = |idx: usize| !lora_mats[idx].is_empty();
            // The adapters' products for matrix idx; the last one finishes with the gate, if any.
            let lora_ds = |idx: usize, input: In, out: Out, gate: Option<&wgpu::Buffer>| {
                let mut out_ds = Vec::new();
                let on = &lora_mats[idx];
                for (i, (am, bm, t, scale)) in on.iter().enumerate() {
                    let last = i + 1 == on.len();
                    out_ds.extend(mv(am, input, whole(t, am.rows), None, false, 1.0, Glu::Off));
                    let g = gate.filter(|_| last).into();
                    out_ds.extend(mv(bm, plain(t), out, None, true, *scale, g));
                }
                out_ds
            };
            // q, k and v: the layer's base products (one where they are one matrix), then their adapters'.
            for (m, bias, r0) in l.qkv_products() {
                ds.extend(mv(m, attn_in, at(r0), bias, false, 1.0, Glu::Off));
            }
            for &(idx, input, out, _, gate) in &plan[..3] {
                ds.extend(lora_ds(idx, input, out, gate));
            }
            // A matrix's product and its adapters' (the gate on the last product writing the output).
            let product = |(idx, input, out, acc, gate): Step| -> Vec<Dispatch> {
                let base_gate = gate.filter(|_| !adapted(idx)).into();
                let mut v = mv(&l.mats[idx], input, out, None, acc, 1.0, base_gate);
                v.extend(lora_ds(idx, input, out, gate));
                v
            };
            let att_p = gpu.uniform(&[
                c.n_head as u32,
                c.n_kv_head as u32,
                hd as u32,
                n_ctx as u32,
                cache_off,
                (1.0 / (hd as f32).sqrt()).to_bits(),
                half as u32,
                c.rope_neox as u32,
            ]);
            // RoPE runs inside attention, which also stores the step's k and v into the cache.
            let mut attention = gpu.attention(
                [&qkv, &kc, &vc, &cs, &scores, &att, &att_p, &step],
                &parts,
                c.n_head,
                hd,
                chunks,
            );
            // One-token steps: the output projection (and its adapters' first products) add attention's chunks
            // up as they read them; its combining launch runs only in steps of 2..=TILE tokens, and the plain
            // products in steps of more than one.
            if combine_in {
                attention[1].steps = Steps::Between(2, TILE);
            }
            ds.extend(attention);
            if combine_in {
                let combined = (
                    &parts,
                    Input::Combine {
                        heads: c.n_head as u32,
                        chunks,
                    },
                    None,
                );
                let (idx, _, out, acc, gate) = plan[3];
                ds.extend(in_steps(
                    product((idx, combined, out, acc, gate)),
                    Steps::UpTo(1),
                ));
                ds.extend(in_steps(product(plan[3]), Steps::Over(1)));
            } else {
                ds.extend(product(plan[3]));
            }
            // Gate and up: in steps of up to TILE tokens one launch of row pairs where they are one chunk
            // without adapters (u = silu(gate · x) · (up · x) directly); longer steps, and the rest, as two.
            let pair = l
                .gate_up
                .as_ref()
                .filter(|m| gpu.row_pairs() && m.chunks.len() == 1 && !adapted(4) && !adapted(5));
            let mut gate_up = product(plan[4]);
            gate_up.extend(product(plan[5]));
            if let Some(m) = pair {
                ds.extend(mv(m, ffn_in, whole(&u, ff), None, false, 1.0, Glu::Pair));
                gate_up = in_steps(gate_up, Steps::Over(TILE));
            }
            ds.extend(gate_up);
            ds.extend(product(plan[6]));
            keep.push(att_p);
            for (am, bm, t, _) in lora_mats.into_iter().flatten() {
                adapters.extend([am, bm]);
                keep.push(t);
            }
        }
        let final_p = gpu.uniform(&[d as u32, 1, c.eps.to_bits(), 0]);
        ds.push(gpu.dispatch(
            Kernel::RmsNorm,
            &[&x, &gw.output_norm, &h, &final_p, &step],
            Grid::One,
        ));
        // The output projection runs for one token (the last), whatever the step's size.
        let out_ds = mv(
            &gw.output,
            plain(&h),
            whole(&logits, c.n_vocab),
            None,
            false,
            1.0,
            Glu::Off,
        );
        keep.push(final_p);
        Ok(GpuSession {
            gpu,
            gw,
            cpu,
            data,
            n_ctx,
            batch,
            len: 0,
            x,
            step,
            logits,
            staging,
            dispatches: ds,
            output: out_ds,
            greedy: None,
            top: None,
            ahead: None,
            recorded_ahead: 0,
            _keep: keep,
            _adapters: adapters,
        })
    }
}

impl GpuSession<'_> {
    /// Capacity in tokens.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Kernel launches in a step of `n` tokens.
    pub fn launches(&self, n: usize) -> usize {
        let runs = |d: &&Dispatch| d.steps.has(n as u32);
        self.dispatches.iter().filter(runs).count() + self.output.iter().filter(runs).count()
    }

    /// Run `tokens` (at positions `len..`) through the model, in steps of at most the session's batch; returns
    /// the last token's logits. One submission per step.
    pub async fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        match self.run(tokens, None).await? {
            Read::Logits(l) => Ok(l),
            Read::Top(_) => unreachable!("logits were asked for"),
        }
    }

    /// As [`GpuSession::forward`], but only the last token's `k` largest logits come back, found on the GPU
    /// ([`Gpu::top_k`]) as (id, logit), in the order the sampler sorts them (descending by `f32::total_cmp`,
    /// ties to the lower id): what [`Sampler::sample_top`](super::sampler::Sampler::sample_top) takes. `8 · k`
    /// bytes read back instead of the vocabulary's logits. One token (a decoding step) runs from commands recorded
    /// while the GPU ran the step before, where [`Gpu::record_ahead`] and the GPU decodes the embeddings; the
    /// next step's are recorded before this one's candidates are awaited.
    pub async fn forward_top(&mut self, tokens: &[u32], k: usize) -> Result<Vec<(u32, f32)>> {
        let ahead = self.gpu.record_ahead()
            && !self.gpu.profiling()
            && crate::kernels::gpu::matvec_supports(self.cpu.tok_embd.ty);
        if let ([t], true) = (tokens, ahead) {
            return self.next_top(*t, k).await;
        }
        match self.run(tokens, Some(k)).await? {
            Read::Top(t) => Ok(t),
            Read::Logits(_) => unreachable!("candidates were asked for"),
        }
    }

    /// [`GpuSession::forward`], or with `top` [`GpuSession::forward_top`]: the steps, then the output projection
    /// and one read-back after the last (the steps before it run for the cache only).
    async fn run(&mut self, tokens: &[u32], top: Option<usize>) -> Result<Read> {
        let c = &self.cpu.cfg;
        if tokens.is_empty() {
            return Err(Error::InvalidQuery("no tokens to run".into()));
        }
        if self.len + tokens.len() > self.n_ctx {
            return Err(Error::ContextOverflow {
                tokens: self.len + tokens.len(),
                context: self.n_ctx,
            });
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.n_vocab) {
            return Err(Error::InvalidQuery(format!(
                "token id {t} is outside the vocabulary of {}",
                c.n_vocab
            )));
        }
        if let Some(k) = top {
            self.top_setup(k)?;
        }
        // The positions greedy submissions ran ahead are run again from `len`.
        self.discard_pending().await?;
        let d = c.n_embd;
        let emb = self.cpu.tok_embd.bytes(self.data);
        let emb_row = self.cpu.tok_embd.ty.row_bytes(d).unwrap();
        let parts = tokens.len().div_ceil(self.batch);
        for (i, part) in tokens.chunks(self.batch).enumerate() {
            let mut x = vec![0.0f32; part.len() * d];
            for (i, &t) in part.iter().enumerate() {
                let row = &emb[t as usize * emb_row..(t as usize + 1) * emb_row];
                quant::dequantize_row(self.cpu.tok_embd.ty, row, &mut x[i * d..(i + 1) * d]);
            }
            let xb: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.gpu.queue.write_buffer(&self.x, 0, &xb);
            let step: Vec<u8> = [self.len as u32, part.len() as u32, 0, 0]
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect();
            self.gpu.queue.write_buffer(&self.step, 0, &step);
            let n = part.len() as u32;
            let last = i + 1 == parts;
            let (logits, staging, output) = (&self.logits, &self.staging, &self.output);
            let cands = self.top.as_ref().filter(|_| top.is_some() && last);
            let gpu = self.gpu;
            // Only the last step's logits are computed and read; the steps before it run for the cache.
            gpu.run(&self.dispatches, n, |enc| {
                if last {
                    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: Some("output"),
                        timestamp_writes: None,
                    });
                    gpu.record(&mut pass, output, 1);
                    if let Some((t, _)) = cands {
                        gpu.record(&mut pass, &t.dispatches, 1);
                    }
                }
                match cands {
                    Some((t, staging)) => {
                        enc.copy_buffer_to_buffer(&t.out, 0, staging, 0, (t.k * 8) as u64)
                    }
                    None if last => {
                        enc.copy_buffer_to_buffer(logits, 0, staging, 0, (c.n_vocab * 4) as u64)
                    }
                    None => {}
                }
            })?;
            self.len += part.len();
        }
        Ok(match top.and(self.top.as_ref()) {
            Some((t, staging)) => {
                let k = t.k;
                let top = self
                    .gpu
                    .read_mapped_with(staging, |b| TopK::decode(b, k))
                    .await?;
                self.gpu.check()?;
                Read::Top(top)
            }
            None => Read::Logits(self.gpu.read_mapped(&self.staging, c.n_vocab).await?),
        })
    }

    /// The top-k launches and read-back buffer for `k` candidates (built on first use, again for another k,
    /// which drops a step recorded ahead for the old ones).
    fn top_setup(&mut self, k: usize) -> Result<()> {
        if self.top.as_ref().is_none_or(|t| t.0.k != k) {
            self.ahead = None;
            let t = self.gpu.top_k(&self.logits, self.cpu.cfg.n_vocab, k)?;
            let staging = self.gpu.buffer(
                "top-k staging",
                (k * 8) as u64,
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            );
            self.top = Some((t, staging));
        }
        Ok(())
    }

    /// One decoding step, `token` at position `len`, its `k` candidates back (as [`GpuSession::forward_top`]):
    /// the token written into the GPU's token buffer, its embedding decoded there (embed.wgsl, as greedy decoding
    /// does), the step submitted from the commands recorded ahead (or recorded now), and the next position's
    /// commands recorded before this step's candidates are awaited, so that the host's recording overlaps the
    /// GPU's work.
    async fn next_top(&mut self, token: u32, k: usize) -> Result<Vec<(u32, f32)>> {
        let n_vocab = self.cpu.cfg.n_vocab;
        if self.len >= self.n_ctx {
            return Err(Error::ContextOverflow {
                tokens: self.len + 1,
                context: self.n_ctx,
            });
        }
        if token as usize >= n_vocab {
            return Err(Error::InvalidQuery(format!(
                "token id {token} is outside the vocabulary of {n_vocab}"
            )));
        }
        self.top_setup(k)?;
        if self.greedy.is_none() {
            self.greedy = Some(self.greedy_setup()?);
        }
        self.discard_pending().await?;
        let pos = self.len;
        let commands = match self.ahead.take() {
            Some((p, r)) if p == pos => {
                self.recorded_ahead += 1;
                r
            }
            _ => self.record_top(pos)?,
        };
        let tokens = &self.greedy.as_ref().unwrap().tokens;
        self.gpu
            .queue
            .write_buffer(tokens, (pos * 4) as u64, &token.to_le_bytes());
        let index = self.gpu.submit_recorded(commands)?;
        let map = self
            .gpu
            .map_request(&self.top.as_ref().unwrap().1, Some(index));
        self.len += 1;
        if self.len < self.n_ctx {
            self.ahead = Some((self.len, self.record_top(self.len)?));
        }
        let (t, staging) = self.top.as_ref().unwrap();
        let k = t.k;
        let top = self
            .gpu
            .map_finish(staging, map, |b| TopK::decode(b, k))
            .await?;
        self.gpu.check()?;
        Ok(top)
    }

    /// A sampled decoding step at `pos` (its token read from the GPU's token buffer), recorded to submit later.
    fn record_top(&self, pos: usize) -> Result<Recorded> {
        let g = self.greedy.as_ref().unwrap();
        let (t, staging) = self.top.as_ref().unwrap();
        let gpu = self.gpu;
        gpu.encode(|enc| {
            enc.copy_buffer_to_buffer(&g.plan, (pos * 16) as u64, &self.step, 0, 16);
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("sampled step"),
                    timestamp_writes: None,
                });
                gpu.record(&mut pass, &g.embed, 1);
                gpu.record(&mut pass, &self.dispatches, 1);
                gpu.record(&mut pass, &self.output, 1);
                gpu.record(&mut pass, &t.dispatches, 1);
            }
            enc.copy_buffer_to_buffer(&t.out, 0, staging, 0, (t.k * 8) as u64);
        })
    }

    /// The largest k [`GpuSession::forward_top`] finds: [`MAX_TOP_K`] where [`Gpu::sample_on_gpu`] (and the
    /// vocabulary fits the kernel), else 0.
    pub fn top_max(&self) -> usize {
        let fits = self.cpu.cfg.n_vocab <= MAX_TOP_K_INPUT;
        if self.gpu.sample_on_gpu() && fits {
            MAX_TOP_K
        } else {
            0
        }
    }

    /// Whether [`GpuSession::greedy`] runs here: turned on ([`Gpu::set_greedy_batch`]) and the token embeddings
    /// of a type the GPU decodes.
    pub fn greedy_on_gpu(&self) -> bool {
        self.gpu.greedy_batch() > 0 && crate::kernels::gpu::matvec_supports(self.cpu.tok_embd.ty)
    }

    /// Greedy decoding on the GPU: the tokens that follow `last` (the token at position `len`, not yet run), as
    /// many as one submission runs ([`Gpu::greedy_batch`]), at most `want` and as the context allows; each
    /// step's choice is the argmax of its logits (as `sampler::argmax` picks it) and the next step's input on
    /// the GPU. Before reading a submission's tokens the next one is queued, continuing from its last token, so
    /// the GPU does not wait for the host; a call with another `last` or after [`GpuSession::forward`] drops it.
    pub async fn greedy(&mut self, last: u32, want: usize) -> Result<Vec<u32>> {
        let c = &self.cpu.cfg;
        let batch = self.gpu.greedy_batch() as usize;
        if want == 0 || batch == 0 {
            return Err(Error::InvalidQuery(
                "greedy decoding on the GPU: no tokens wanted, or turned off".into(),
            ));
        }
        if self.len >= self.n_ctx {
            return Err(Error::ContextOverflow {
                tokens: self.len + 1,
                context: self.n_ctx,
            });
        }
        if last as usize >= c.n_vocab {
            return Err(Error::InvalidQuery(format!(
                "token id {last} is outside the vocabulary of {}",
                c.n_vocab
            )));
        }
        if self.greedy.is_none() {
            self.greedy = Some(self.greedy_setup()?);
        }
        let g = self.greedy.as_ref().unwrap();
        let continues =
            g.from == Some(last) && g.pending.front().is_some_and(|p| p.pos0 == self.len);
        if !continues {
            self.discard_pending().await?;
            let g = self.greedy.as_ref().unwrap();
            self.gpu
                .queue
                .write_buffer(&g.tokens, (self.len * 4) as u64, &last.to_le_bytes());
            self.greedy_submit(self.len, batch.min(want).min(self.n_ctx - self.len))?;
        }
        let first_k = self.greedy.as_ref().unwrap().pending[0].k;
        let next = self.len + first_k;
        if self.greedy.as_ref().unwrap().pending.len() == 1 && want > first_k && next < self.n_ctx {
            self.greedy_submit(next, batch.min(want - first_k).min(self.n_ctx - next))?;
        }
        let g = self.greedy.as_mut().unwrap();
        let p = g.pending.pop_front().unwrap();
        let k = p.k;
        let mut ids: Vec<u32> = self
            .gpu
            .map_finish(&g.staging[p.staging], p.map, |b| {
                b[..k * 4]
                    .chunks_exact(4)
                    .map(|w| u32::from_le_bytes(w.try_into().unwrap()))
                    .collect()
            })
            .await?;
        self.gpu.check()?;
        if let Some(&t) = ids.iter().find(|&&t| t as usize >= c.n_vocab) {
            return Err(Error::Device(format!(
                "greedy decoding on the GPU chose token {t}, outside the vocabulary of {}",
                c.n_vocab
            )));
        }
        ids.truncate(want);
        self.len += ids.len();
        g.from = ids.last().copied();
        Ok(ids)
    }

    /// The launches and buffers of greedy decoding (on the first [`GpuSession::greedy`]).
    fn greedy_setup(&self) -> Result<Greedy> {
        let gpu = self.gpu;
        let emb = self.gw.embedding(gpu, self.cpu, self.data)?;
        let tokens = gpu.buffer("tokens", ((self.n_ctx + 1) * 4) as u64, STORAGE);
        let plan: Vec<u8> = (0..self.n_ctx as u32)
            .flat_map(|p| [p, 1, 0, 0])
            .flat_map(|w| w.to_le_bytes())
            .collect();
        let plan = gpu.buffer_init("greedy steps", &plan, STORAGE);
        let staging = [0, 1].map(|_| {
            gpu.buffer(
                "tokens staging",
                MAX_GREEDY_BATCH as u64 * 4,
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            )
        });
        let n_vocab = self.cpu.cfg.n_vocab as u32;
        let p = gpu.uniform(&[n_vocab]);
        let argmax = gpu.dispatch(
            Kernel::Argmax,
            &[&self.logits, &tokens, &p, &self.step],
            Grid::One,
        );
        Ok(Greedy {
            embed: gpu.embed_dispatches(emb, &tokens, &self.x, &self.step),
            argmax,
            tokens,
            plan,
            staging,
            turn: 0,
            pending: Default::default(),
            from: None,
        })
    }

    /// Submit `k` greedy steps from position `pos0` (whose token is in `tokens`), and ask for their tokens.
    fn greedy_submit(&mut self, pos0: usize, k: usize) -> Result<()> {
        let g = self.greedy.as_mut().unwrap();
        let gpu = self.gpu;
        let (dispatches, output, step) = (&self.dispatches, &self.output, &self.step);
        let staging = &g.staging[g.turn];
        let index = gpu.submit(|enc| {
            for pos in pos0..pos0 + k {
                enc.copy_buffer_to_buffer(&g.plan, (pos * 16) as u64, step, 0, 16);
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("greedy step"),
                    timestamp_writes: None,
                });
                gpu.record(&mut pass, &g.embed, 1);
                gpu.record(&mut pass, dispatches, 1);
                gpu.record(&mut pass, output, 1);
                gpu.record(&mut pass, std::slice::from_ref(&g.argmax), 1);
            }
            let at = ((pos0 + 1) * 4) as u64;
            enc.copy_buffer_to_buffer(&g.tokens, at, staging, 0, (k * 4) as u64);
        })?;
        let map = gpu.map_request(staging, Some(index));
        g.pending.push_back(Pending {
            pos0,
            k,
            staging: g.turn,
            map,
        });
        g.turn ^= 1;
        Ok(())
    }

    /// Wait for greedy submissions not read (their read-back buffers must be unmapped before reuse) and drop
    /// their tokens.
    async fn discard_pending(&mut self) -> Result<()> {
        let Some(g) = self.greedy.as_mut() else {
            return Ok(());
        };
        g.from = None;
        while let Some(p) = g.pending.pop_front() {
            self.gpu
                .map_finish(&g.staging[p.staging], p.map, |_| ())
                .await?;
        }
        Ok(())
    }
}
