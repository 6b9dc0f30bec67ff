//! The GPU backend: a wgpu device, weights uploaded once as storage buffers (split by rows where a tensor is
//! larger than the device's largest storage binding), and WGSL kernels recorded into command buffers.
//!
//! Faults are errors, never panics: no WebGPU (`navigator.gpu` missing), no adapter, a device that cannot be
//! created, a shader that fails to compile (named), a lost device (every later call says so).

use crate::llm::quant::GgmlType;
use crate::{Error, Result};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use wgpu::util::DeviceExt;

fn dev_err(detail: impl Into<String>) -> Error {
    Error::Device(detail.into())
}

/// What the GPU is.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuInfo {
    /// Adapter name (`llvmpipe (LLVM 19.1.7, 256 bits)`, `NVIDIA H100 …`, …).
    pub name: String,
    /// Graphics API under wgpu (Vulkan, Metal, Dx12, BrowserWebGpu, …).
    pub backend: String,
    /// Discrete, integrated, virtual, CPU (software), other.
    pub device_type: String,
    /// A software adapter: the CPU runs its workgroups (device type CPU: lavapipe natively, a browser's fallback
    /// adapter; or one named SwiftShader).
    pub software: bool,
    /// Subgroup operations are available.
    pub subgroups: bool,
    /// `shader-f16` is available.
    pub shader_f16: bool,
    /// Largest storage-buffer binding, bytes.
    pub max_storage_binding: u64,
    /// Largest buffer, bytes.
    pub max_buffer: u64,
}

/// Work counters, for tests that bound what a step issues.
#[derive(Debug, Default)]
pub struct Counters {
    /// Command-buffer submissions.
    pub submissions: AtomicUsize,
    /// Buffers created.
    pub buffers: AtomicUsize,
    /// The host's time in [`Gpu::submit`], in microseconds: recording the launches (in a browser each one a
    /// call into the page's WebGPU), finishing the command buffer and submitting it. Decoding cannot go faster
    /// than this per step, however fast the GPU.
    pub submit_us: AtomicU64,
    /// Bytes read back from the GPU (mapped staging buffers: logits, tokens, candidates, timestamps).
    pub read_bytes: AtomicU64,
}

/// A product pipeline's specialization: (GGUF type id, tokens per workgroup or `MATMUL`, the input transform
/// compiled in (products.wgsl's NORM: [`Input::mode`]), subgroup operations, one-token rows per workgroup split
/// over subgroups or 0).
type MatvecKey = (u32, u32, u32, bool, u32);

/// A wgpu device with the lorag kernels.
pub struct Gpu {
    /// The device.
    pub device: wgpu::Device,
    /// Its queue.
    pub queue: wgpu::Queue,
    /// What it is.
    pub info: GpuInfo,
    /// Work counters.
    pub counters: Counters,
    lost: Arc<AtomicBool>,
    matvec_layout: wgpu::BindGroupLayout,
    matvec_module: wgpu::ShaderModule,
    /// matvec.wgsl + matvec_sg.wgsl, where the adapter has subgroup operations (and the module compiled).
    matvec_sg_module: Option<wgpu::ShaderModule>,
    /// The two modules above with the input transform of [`Input::Combine`] (one-token pipelines with NORM 2).
    matvec_combine_module: wgpu::ShaderModule,
    matvec_sg_combine_module: Option<wgpu::ShaderModule>,
    /// matvec_sg.wgsl's workgroup size: four of the adapter's widest subgroups (one row each), within 32..=256,
    /// and at most 64 of its smallest.
    sg_width: u32,
    /// Every workgroup of `sg_width` holds at least four subgroups (so one-token products may split rows over
    /// subgroups: matvec_sg.wgsl's SPLIT).
    sg_split: bool,
    /// One-token products' rows per workgroup on subgroups ([`Gpu::set_decode_rows`]; `u32::MAX`: the default).
    decode_rows: AtomicU32,
    /// Build matrix-vector pipelines on `matvec_sg_module` ([`Gpu::set_subgroups`]).
    use_subgroups: AtomicBool,
    matmul_module: wgpu::ShaderModule,
    matmul_wide_module: wgpu::ShaderModule,
    /// Which matrix-matrix kernel steps take: 0 as `WIDE_MIN_TILES` says, else that tile (64 or 128) always.
    gemm_tile: AtomicU32,
    /// Whether decoder sessions built from now on run gate and up as row pairs ([`Gpu::set_row_pairs`]).
    row_pairs: AtomicBool,
    /// Whether decoder sessions built from now on add attention's chunks up inside the output projection
    /// ([`Gpu::set_combine_in_product`]).
    combine_in_product: AtomicBool,
    matvec: Mutex<Vec<(MatvecKey, wgpu::ComputePipeline)>>,
    matvec_t_module: wgpu::ShaderModule,
    matvec_t: Mutex<Vec<(u32, wgpu::ComputePipeline)>>,
    /// embed.wgsl (greedy decoding's next input), and its pipelines by GGUF type id, built on first use.
    embed_module: wgpu::ShaderModule,
    embed: Mutex<Vec<(u32, wgpu::ComputePipeline)>>,
    /// Tokens a greedy decoding submission runs ([`Gpu::set_greedy_batch`]; 0: greedy decoding reads logits).
    greedy_batch: AtomicU32,
    /// Sampling reads back its candidates only ([`Gpu::set_sample_on_gpu`]).
    sample_on_gpu: AtomicBool,
    /// A sampled step's commands are recorded while the GPU runs the step before ([`Gpu::set_record_ahead`]).
    record_ahead: AtomicBool,
    kernels: Vec<wgpu::ComputePipeline>,
    /// attention.wgsl's pipelines by (workgroup size, head size bound HD): the adapter's default workgroup with
    /// heads of `ATTENTION_HD` built with the device, others on request (each costs a software adapter seconds
    /// to compile); and the workgroup size dispatches built now take (0: the default, 64 on a CPU adapter and 256
    /// elsewhere).
    attention: Mutex<Vec<((u32, u32), wgpu::ComputePipeline)>>,
    attention_wg: AtomicU32,
    /// Position chunks per (head, token) that [`Gpu::attention`] splits decoding steps into (0: the default).
    attention_chunks: AtomicU32,
    /// Bytes an activation buffer of `matvec_many` / `matvec_t_many` may take (0: the device's binding limit).
    activation_cap: AtomicUsize,
    /// The device has timestamp queries inside passes (native only).
    #[cfg(not(target_arch = "wasm32"))]
    timestamps: bool,
    #[cfg(not(target_arch = "wasm32"))]
    profiler: Mutex<Option<Profiler>>,
}

/// Timestamps a profiled submission may write (two per launch): wgpu's limit per query set.
#[cfg(not(target_arch = "wasm32"))]
const PROFILE_QUERIES: u32 = 4096;

/// Per-launch timing state ([`Gpu::set_profiling`]).
#[cfg(not(target_arch = "wasm32"))]
struct Profiler {
    queries: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    staging: wgpu::Buffer,
    period_ns: f64,
    /// The current submission's timed launches (timestamps 2i and 2i + 1).
    labels: Vec<String>,
    times: Vec<KernelTime>,
}

/// GPU time of the launches that computed one thing ([`Gpu::profile`]).
#[cfg(not(target_arch = "wasm32"))]
#[derive(Debug, Clone, PartialEq)]
pub struct KernelTime {
    /// The pipeline and what it computed ("matvec Q4_1 576×576", "attention").
    pub label: String,
    /// Launches timed.
    pub launches: usize,
    /// Their GPU time, summed (ns).
    pub ns: f64,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("info", &self.info).finish()
    }
}

#[cfg(not(target_arch = "wasm32"))]
pub use super::block_on;

/// A mapping asked for ([`Gpu::map_request`]), not yet waited for.
pub struct MapRequest {
    fut: SlotFuture<std::result::Result<(), String>>,
    index: Option<wgpu::SubmissionIndex>,
}

impl std::fmt::Debug for MapRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MapRequest")
    }
}

/// A one-shot slot a wgpu callback fills.
struct Slot<T> {
    value: Option<T>,
    waker: Option<Waker>,
}

struct SlotFuture<T>(Arc<Mutex<Slot<T>>>);

impl<T> Future for SlotFuture<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut s = self.0.lock().unwrap();
        match s.value.take() {
            Some(v) => Poll::Ready(v),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

fn slot<T>() -> (Arc<Mutex<Slot<T>>>, SlotFuture<T>) {
    let s = Arc::new(Mutex::new(Slot {
        value: None,
        waker: None,
    }));
    (s.clone(), SlotFuture(s))
}

fn fill<T>(s: &Mutex<Slot<T>>, v: T) {
    let mut s = s.lock().unwrap();
    s.value = Some(v);
    if let Some(w) = s.waker.take() {
        w.wake();
    }
}

#[cfg(target_arch = "wasm32")]
fn has_webgpu() -> bool {
    let g = js_sys::global();
    js_sys::Reflect::get(&g, &"navigator".into())
        .ok()
        .filter(|n| !n.is_undefined() && !n.is_null())
        .and_then(|n| js_sys::Reflect::get(&n, &"gpu".into()).ok())
        .is_some_and(|gpu| !gpu.is_undefined() && !gpu.is_null())
}

/// Parameters of one matrix-vector dispatch (matvec.wgsl's `Params`).
#[derive(Debug, Clone, Copy, Default)]
pub struct MatvecParams {
    /// Rows of this dispatch.
    pub rows: u32,
    /// Columns.
    pub cols: u32,
    /// Bytes per row.
    pub row_bytes: u32,
    /// Byte offset of row 0 in the weight buffer.
    pub w_off: u32,
    /// Offset of x\[0\] in the input buffer (elements).
    pub in_off: u32,
    /// Elements between tokens in the input.
    pub in_stride: u32,
    /// Offset of y\[0\]\[0\] in the output buffer (elements).
    pub out_off: u32,
    /// Elements between tokens in the output.
    pub out_stride: u32,
    /// Add to the output instead of overwriting it.
    pub accumulate: bool,
    /// Add `bias[row]`.
    pub has_bias: bool,
    /// Multiply the dot product by this.
    pub scale: f32,
    /// Offset of bias\[0\] in the bias buffer.
    pub bias_off: u32,
    /// What the kernel does to the input on the way in (the norm weights are an operand of
    /// [`Gpu::matvec_dispatches_with`]).
    pub input: Input,
    /// Finish with SwiGLU: y = silu(gate) · y, after the bias and the accumulation (the gate, laid out as y, is an
    /// operand of [`Gpu::matvec_dispatches_with`]).
    pub glu: bool,
    /// Row pairs, SwiGLU's gate and up projections in one launch: the matrix holds the gate's rows, then as many
    /// of the up projection's, and output row r is silu(gate_r · x) · (up_r · x) (scaled, not biased, not
    /// accumulated). Steps of up to `TILE` tokens only (the matrix-vector kernels): see
    /// [`Gpu::matvec_dispatches_with`].
    pub pair: bool,
}

/// An input transform of the matvec and matmul kernels: the decoder's RMSNorm runs inside the products that read
/// its result instead of in a launch of its own.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum Input {
    /// x as it is.
    #[default]
    Plain,
    /// x · (1 / sqrt(mean(x²) + eps)) · w\[c\] (w: the norm weights, one per column).
    RmsNorm {
        /// Epsilon.
        eps: f32,
    },
    /// One-token steps only: the input is attention's output for `heads` heads (the product's columns / `heads`
    /// values each) as [`Gpu::attention`] left it split over `chunks` position chunks (its partials buffer),
    /// added up on the way in exactly as its combining launch adds them (same bits), which the decoder then
    /// skips. At most [`combine_fits`] of them.
    Combine {
        /// Attention heads.
        heads: u32,
        /// Position chunks (2..=`MAX_ATTENTION_CHUNKS`).
        chunks: u32,
    },
}

impl Input {
    /// products.wgsl's NORM for this transform: 0 plain, 1 RMSNorm, 2 attention's chunks added up.
    pub fn mode(self) -> u32 {
        match self {
            Input::Plain => 0,
            Input::RmsNorm { .. } => 1,
            Input::Combine { .. } => 2,
        }
    }
}

/// Whether a one-token product can add up attention's `chunks` position chunks of `heads` heads on the way in
/// ([`Input::Combine`]): its factors and sums take 2 · heads · chunks + heads floats of the 448 matvec.wgsl keeps
/// for them (SmolLM2's 9 heads up to 24 chunks; the default chunk counts keep heads · chunks under 48).
pub fn combine_fits(heads: usize, chunks: u32) -> bool {
    chunks > 1 && heads > 0 && 2 * heads * chunks as usize + heads <= 448
}

impl MatvecParams {
    fn bytes(&self) -> [u8; 64] {
        let (eps, heads, chunks) = match self.input {
            Input::Plain => (0.0f32, 0, 0),
            Input::RmsNorm { eps } => (eps, 0, 0),
            Input::Combine { heads, chunks } => (0.0, heads, chunks),
        };
        let w = [
            self.rows,
            self.cols,
            self.row_bytes,
            self.w_off,
            self.in_off,
            self.in_stride,
            self.out_off,
            self.out_stride,
            self.accumulate as u32,
            self.has_bias as u32,
            self.scale.to_bits(),
            self.bias_off,
            eps.to_bits(),
            if self.pair { 2 } else { self.glu as u32 },
            heads,
            chunks,
        ];
        let mut out = [0u8; 64];
        for (o, v) in out.chunks_exact_mut(4).zip(w) {
            o.copy_from_slice(&v.to_le_bytes());
        }
        out
    }
}

/// A weight matrix resident on the GPU, in row chunks that each fit one storage binding.
#[derive(Debug)]
pub struct GpuMatrix {
    /// Element type (as in the GGUF file).
    pub ty: GgmlType,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Bytes per row.
    pub row_bytes: usize,
    /// The row chunks, in order.
    pub chunks: Vec<Chunk>,
}

/// Rows `r0..r0 + rows` of a [`GpuMatrix`], stored from byte `offset` of `buffer`.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// The buffer holding them (bound whole; the kernels add `offset`).
    pub buffer: wgpu::Buffer,
    /// The chunk's first row in the matrix.
    pub r0: usize,
    /// Rows.
    pub rows: usize,
    /// Byte offset of the chunk's first row in `buffer`.
    pub offset: usize,
}

impl GpuMatrix {
    /// Rows `r0..r0 + n` as a matrix of their own, sharing this one's buffers (no copy): how the decoder's q, k
    /// and v projections, uploaded as one matrix, are still multiplied one by one (training).
    pub fn rows(&self, r0: usize, n: usize) -> GpuMatrix {
        assert!(
            r0 + n <= self.rows,
            "rows {r0}..{} of {}",
            r0 + n,
            self.rows
        );
        let chunks = self
            .chunks
            .iter()
            .filter_map(|c| {
                let lo = c.r0.max(r0);
                let hi = (c.r0 + c.rows).min(r0 + n);
                (lo < hi).then(|| Chunk {
                    buffer: c.buffer.clone(),
                    r0: lo - r0,
                    rows: hi - lo,
                    offset: c.offset + (lo - c.r0) * self.row_bytes,
                })
            })
            .collect();
        GpuMatrix {
            ty: self.ty,
            rows: n,
            cols: self.cols,
            row_bytes: self.row_bytes,
            chunks,
        }
    }
}

/// How a dispatch's workgroup counts follow the number of tokens `n` in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grid {
    /// (x, y, n).
    TokensZ(u32, u32),
    /// (n, 1, 1).
    TokensX,
    /// (1, 1, 1).
    One,
    /// (x, n, 1).
    TokensY(u32),
    /// ⌈n · per_token / 64⌉ workgroups of 64, laid out in x and y.
    Flat(u32),
    /// (x, n, z) in steps of up to `TILE` tokens, (x, n, 1) in longer ones: attention split over z position
    /// chunks when decoding.
    TokensYChunks(u32, u32),
}

impl Grid {
    /// Workgroup counts for `n` tokens.
    pub fn groups(self, n: u32) -> (u32, u32, u32) {
        match self {
            Grid::TokensZ(x, y) => (x, y, n),
            Grid::TokensX => (n, 1, 1),
            Grid::One => (1, 1, 1),
            Grid::TokensY(x) => (x, n, 1),
            Grid::TokensYChunks(x, z) => (x, n, if n <= TILE { z } else { 1 }),
            Grid::Flat(per) => {
                let g = (n * per).div_ceil(64).max(1);
                let x = g.min(65_535);
                (x, g.div_ceil(x), 1)
            }
        }
    }
}

/// A kernel launch built once: pipeline, bind group, and how its size follows the step's tokens.
#[derive(Debug, Clone)]
pub struct Dispatch {
    /// Pipeline.
    pub pipeline: wgpu::ComputePipeline,
    /// Its bindings.
    pub bind_group: wgpu::BindGroup,
    /// Workgroup counts.
    pub grid: Grid,
    /// For steps of 2..=`TILE` tokens: a pipeline handling `TILE` tokens per workgroup (same bindings), and its
    /// row workgroups (x, y; z is the token tiles).
    pub tiled: Option<(wgpu::ComputePipeline, u32, u32)>,
    /// For steps of more than `TILE` tokens: the matrix-matrix pipeline (matmul.wgsl, same bindings) and its
    /// workgroups for the rows (x, y); z is the token tiles.
    pub gemm: Option<Gemm>,
    /// What it computes, for profiles ("attention"; "Q4_1 576×576" for a product, "+norm" / "+glu" with a fusion).
    pub label: String,
    /// Its matrix-vector pipelines use subgroup operations (matvec_sg.wgsl).
    pub subgroups: bool,
    /// The steps it runs in.
    pub steps: Steps,
}

/// Which steps a [`Dispatch`] runs in, by their number of tokens: a fusion the matrix-matrix kernels lack (the
/// gate and up projections' row pairs) runs up to `TILE` tokens, the unfused launches it replaces above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steps {
    /// Every step.
    All,
    /// Steps of at most this many tokens.
    UpTo(u32),
    /// Steps of more than this many tokens.
    Over(u32),
    /// Steps of this many tokens to that many (both included).
    Between(u32, u32),
}

impl Steps {
    /// Whether a step of `n` tokens runs it.
    pub fn has(self, n: u32) -> bool {
        match self {
            Steps::All => true,
            Steps::UpTo(k) => n <= k,
            Steps::Over(k) => n > k,
            Steps::Between(lo, hi) => lo <= n && n <= hi,
        }
    }
}

/// Tokens a greedy decoding submission runs by default: each step's argmax and the next step's embedding on
/// the GPU, the tokens read back once per submission, the next submission queued before they are read.
pub const GREEDY_BATCH: u32 = 8;

/// The most candidates [`Gpu::top_k`] finds: sampling with a top-k up to this reads back only its candidates
/// (the default sampler's 40 among them); a larger top-k, or none, reads all the logits.
pub const MAX_TOP_K: usize = 64;

/// The most values [`Gpu::top_k`] takes: 128 workgroups of 256 invocations holding 32 values each (every
/// vocabulary in use is smaller: Gemma's 262,144 the largest here).
pub const MAX_TOP_K_INPUT: usize = 128 * 256 * 32;

/// Sampling's candidates found on the GPU (topk.wgsl): the launches, and the buffer they leave the result in.
pub struct TopK {
    /// Two launches of the top-k kernel: per chunk of the values, then over the chunks' candidates. One token.
    pub dispatches: Vec<Dispatch>,
    /// The result: `k` (key, id) pairs, best first ([`TopK::decode`] reads them); `8 · k` bytes.
    pub out: wgpu::Buffer,
    /// Candidates asked for.
    pub k: usize,
    // The per-chunk candidates and the parameters, kept alive for the bind groups.
    _keep: Vec<wgpu::Buffer>,
}

impl TopK {
    /// The candidates in `out`'s bytes as (id, value), best first: `k` of them, fewer where the input had
    /// fewer values. The key is the value's bits mapped to total_cmp's order; this maps it back.
    pub fn decode(bytes: &[u8], k: usize) -> Vec<(u32, f32)> {
        bytes
            .chunks_exact(8)
            .take(k)
            .map(|p| {
                let key = u32::from_le_bytes(p[..4].try_into().unwrap());
                let id = u32::from_le_bytes(p[4..].try_into().unwrap());
                let bits = if key & 0x8000_0000 != 0 {
                    key & 0x7fff_ffff
                } else {
                    !key
                };
                (id, f32::from_bits(bits))
            })
            .take_while(|&(id, _)| id != u32::MAX)
            .collect()
    }
}

/// Commands recorded ahead ([`Gpu::encode`]), and the host's time recording them.
pub struct Recorded {
    commands: wgpu::CommandBuffer,
    ms: f64,
}

/// The most tokens [`Gpu::set_greedy_batch`] lets a submission run.
pub const MAX_GREEDY_BATCH: u32 = 64;

/// Tokens per workgroup of the tiled matvec pipeline; longer steps (prefill) take the matrix-matrix kernel.
pub const TILE: u32 = 8;

/// Rows and tokens of one matmul.wgsl workgroup's tile.
pub const GEMM_TILE: u32 = 64;

/// Rows and tokens of one matmul_wide.wgsl workgroup's tile.
pub const GEMM_WIDE_TILE: u32 = 128;

/// A step takes matmul_wide.wgsl where it makes at least this many of its tiles (a big GPU's multiprocessors:
/// an H200 has 132), else matmul.wgsl, whose 4× smaller tiles spread a small model's products wider.
pub const WIDE_MIN_TILES: u32 = 128;

/// Products of fewer rows never take matmul_wide.wgsl unless forced (`Gpu::set_gemm_tile`), and so do not
/// compile it (each pipeline costs a software adapter seconds): with fewer rows the wide kernel would need
/// steps of over 900 tokens to fill `WIDE_MIN_TILES`.
pub const WIDE_MIN_ROWS: usize = 2048;

/// A product's matrix-matrix pipelines, their row workgroups (x, y; z is the token tiles), and the step size from
/// which the wide one runs (`u32::MAX`: never).
#[derive(Clone, Debug)]
pub struct Gemm {
    pub small: (wgpu::ComputePipeline, u32, u32),
    pub wide: Option<(wgpu::ComputePipeline, u32, u32)>,
    pub wide_from: u32,
}

impl Dispatch {
    /// Record into a compute pass for a step of `n` tokens; returns which pipeline it took ("matmul", "matvec×8",
    /// "matvec", the last two with " sg" on subgroups, or "" for a kernel with one pipeline).
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>, n: u32) -> &'static str {
        if let (Some(g), true) = (&self.gemm, n > TILE) {
            let ((p, x, y), tile, wide) = match &g.wide {
                Some(w) if n >= g.wide_from => (w, GEMM_WIDE_TILE, true),
                _ => (&g.small, GEMM_TILE, false),
            };
            pass.set_pipeline(p);
            pass.set_bind_group(0, &self.bind_group, &[]);
            pass.dispatch_workgroups(*x, *y, n.div_ceil(tile));
            return if wide { "matmul wide" } else { "matmul" };
        }
        if let (Some((p, x, y)), true) = (&self.tiled, n > 1) {
            pass.set_pipeline(p);
            pass.set_bind_group(0, &self.bind_group, &[]);
            pass.dispatch_workgroups(*x, *y, n.div_ceil(TILE));
            return if self.subgroups {
                "matvec×8 sg"
            } else {
                "matvec×8"
            };
        }
        let (x, y, z) = self.grid.groups(n);
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        pass.dispatch_workgroups(x, y, z);
        if self.subgroups {
            "matvec sg"
        } else if matches!(self.grid, Grid::TokensZ(..)) {
            "matvec"
        } else {
            ""
        }
    }
}

/// The element-wise and attention kernels (auto-derived bind-group layouts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// rmsnorm.wgsl.
    RmsNorm,
    /// attention.wgsl: RoPE on the step's q and k, the step's k and v stored into the cache, and attention.
    Attention,
    /// attention_combine.wgsl: attention split over position chunks, added up.
    AttentionCombine,
    /// swiglu.wgsl.
    SwiGlu,
    /// argmax.wgsl: greedy decoding's choice of the next token, on the GPU.
    Argmax,
    /// topk.wgsl: sampling's candidates (the largest logits, in the sampler's order), on the GPU.
    TopK,
}

impl Kernel {
    const ALL: [Kernel; 6] = [
        Kernel::RmsNorm,
        Kernel::Attention,
        Kernel::AttentionCombine,
        Kernel::SwiGlu,
        Kernel::Argmax,
        Kernel::TopK,
    ];
    fn name(self) -> &'static str {
        match self {
            Kernel::RmsNorm => "rmsnorm",
            Kernel::Attention => "attention",
            Kernel::AttentionCombine => "attention combine",
            Kernel::SwiGlu => "swiglu",
            Kernel::Argmax => "argmax",
            Kernel::TopK => "top-k",
        }
    }
    /// The WGSL source; attention's workgroup size `wg` (64 or 256) and bound on its heads' size `hd` (the
    /// loops over a head's dims run to it).
    fn source(self, wg: u32, hd: u32) -> String {
        match self {
            Kernel::RmsNorm => include_str!("wgsl/rmsnorm.wgsl").into(),
            Kernel::Attention => format!(
                "const HD: u32 = {hd}u;\nconst WG: u32 = {wg}u;\n{}",
                include_str!("wgsl/attention.wgsl")
            ),
            Kernel::AttentionCombine => include_str!("wgsl/attention_combine.wgsl").into(),
            Kernel::SwiGlu => include_str!("wgsl/swiglu.wgsl").into(),
            Kernel::Argmax => include_str!("wgsl/argmax.wgsl").into(),
            Kernel::TopK => include_str!("wgsl/topk.wgsl").into(),
        }
    }
}

/// Floats of the partials buffer [`Gpu::attention`] needs: per token of a step of up to `TILE`, head and chunk,
/// the chunk's max score, sum and `hd` unnormalized values.
pub fn attention_partials(chunks: u32, n_head: usize, hd: usize) -> usize {
    TILE as usize * n_head * chunks.max(1) as usize * (hd + 2)
}

/// The most position chunks [`Gpu::attention`] splits a (head, token) into.
pub const MAX_ATTENTION_CHUNKS: u32 = 64;

/// The largest head (values per attention head) the attention kernel holds: it keeps the token's rotated q in
/// workgroup memory, an array of its pipeline's head size bound (at most this).
pub const MAX_HEAD_DIM: usize = 256;

/// The head size whose attention pipeline is built with the device (SmolLM2's, Llama's and most small models'
/// 64); other sizes compile on first use.
const ATTENTION_HD: u32 = 64;

/// matvec.wgsl, matvec_t.wgsl and matmul.wgsl share the weight-reading helpers (dequant.wgsl); matvec.wgsl and
/// matmul.wgsl also their parameters and bindings (products.wgsl: one bind group layout serves both).
const MATVEC_WGSL: &str = concat!(
    include_str!("wgsl/dequant.wgsl"),
    include_str!("wgsl/products.wgsl"),
    include_str!("wgsl/matvec_input.wgsl"),
    include_str!("wgsl/matvec.wgsl")
);
/// MATVEC_WGSL with the input transform that adds attention's chunks up ([`Input::Combine`]): a module of its
/// own, so that the other products' pipelines do not compile its code (matvec_input.wgsl says why).
const MATVEC_COMBINE_WGSL: &str = concat!(
    include_str!("wgsl/dequant.wgsl"),
    include_str!("wgsl/products.wgsl"),
    include_str!("wgsl/matvec_combine.wgsl"),
    include_str!("wgsl/matvec.wgsl")
);
const MATVEC_T_WGSL: &str = concat!(
    include_str!("wgsl/dequant.wgsl"),
    include_str!("wgsl/matvec_t.wgsl")
);
const EMBED_WGSL: &str = concat!(
    include_str!("wgsl/dequant.wgsl"),
    include_str!("wgsl/embed.wgsl")
);
/// Where the adapter has subgroups, MATVEC_WGSL with a second entry point (matvec_sg.wgsl), after this prefix.
/// Browsers need the extension enabled (and WGSL's uniformity analysis cannot see that a loop bounded by a
/// workgroup counter runs the same in a whole subgroup); naga, natively, rejects `enable subgroups;` and takes the
/// operations as they are.
#[cfg(not(target_arch = "wasm32"))]
const SUBGROUPS_PREFIX: &str = "";
#[cfg(target_arch = "wasm32")]
const SUBGROUPS_PREFIX: &str = "enable subgroups;\ndiagnostic(off, subgroup_uniformity);\n";
const MATMUL_WGSL: &str = concat!(
    include_str!("wgsl/dequant.wgsl"),
    include_str!("wgsl/products.wgsl"),
    include_str!("wgsl/matmul.wgsl")
);
const MATMUL_WIDE_WGSL: &str = concat!(
    include_str!("wgsl/dequant.wgsl"),
    include_str!("wgsl/products.wgsl"),
    include_str!("wgsl/matmul_wide.wgsl")
);

/// `matvec_pipeline`'s tile values for matmul.wgsl and matmul_wide.wgsl.
const MATMUL: u32 = 0;
const MATMUL_WIDE: u32 = u32::MAX;

/// Tokens per workgroup of matvec_t.wgsl.
const T_TILE: usize = 8;

/// Types the matvec kernel dequantizes.
pub fn matvec_supports(ty: GgmlType) -> bool {
    !matches!(ty, GgmlType::Q2_K | GgmlType::Q3_K)
}

impl Gpu {
    /// Open the first high-performance adapter. `Err(Error::Device)` when there is no WebGPU, no adapter, or
    /// no device.
    pub async fn new() -> Result<Gpu> {
        #[cfg(target_arch = "wasm32")]
        if !has_webgpu() {
            return Err(dev_err("WebGPU is not available here (no navigator.gpu)"));
        }
        // Vulkan / Metal / DX12 / browser WebGPU; not the GL fallback, whose EGL probing prints to stderr on
        // machines without a display and is no compute target. WGPU_BACKEND still overrides.
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
        desc.backends = wgpu::Backends::PRIMARY;
        let instance = wgpu::Instance::new(desc.with_env());
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                ..Default::default()
            })
            .await
            .map_err(|e| dev_err(format!("no GPU adapter: {e}")))?;
        let ai = adapter.get_info();
        let features = adapter.features();
        let mut want = wgpu::Features::empty();
        // Timestamps inside passes (native only) serve `set_profiling`; asking for them costs nothing unused.
        #[cfg(not(target_arch = "wasm32"))]
        let timing =
            [wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES];
        #[cfg(target_arch = "wasm32")]
        let timing = [];
        for f in [wgpu::Features::SUBGROUP, wgpu::Features::SHADER_F16]
            .into_iter()
            .chain(timing)
        {
            if features.contains(f) {
                want |= f;
            }
        }
        let limits = adapter.limits();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("lorag"),
                required_features: want,
                required_limits: limits.clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| dev_err(format!("the GPU device could not be created: {e}")))?;
        let lost = Arc::new(AtomicBool::new(false));
        {
            let lost = lost.clone();
            device.set_device_lost_callback(move |_, _| lost.store(true, Ordering::SeqCst));
        }
        device.on_uncaptured_error(Arc::new(|e| warn(&format!("lorag: GPU error: {e}"))));
        let info = GpuInfo {
            name: ai.name.clone(),
            backend: format!("{:?}", ai.backend),
            device_type: format!("{:?}", ai.device_type),
            // In a browser wgpu says `Cpu` for the fallback adapter (headless Chromium 156 flags SwiftShader so, and
            // gives it no name) and `Other` for any other; the name catches a SwiftShader not flagged.
            software: ai.device_type == wgpu::DeviceType::Cpu || ai.name.contains("SwiftShader"),
            subgroups: want.contains(wgpu::Features::SUBGROUP),
            shader_f16: want.contains(wgpu::Features::SHADER_F16),
            max_storage_binding: limits.max_storage_buffer_binding_size as u64,
            max_buffer: limits.max_buffer_size,
        };
        let matvec_module = shader(&device, "matvec", MATVEC_WGSL).await?;
        let matvec_combine_module =
            shader(&device, "matvec (combine)", MATVEC_COMBINE_WGSL).await?;
        // A driver that offers subgroups but cannot compile them loses nothing: the products run without.
        let mut matvec_sg_modules = None;
        if info.subgroups {
            let sg = |src| [SUBGROUPS_PREFIX, src, include_str!("wgsl/matvec_sg.wgsl")].concat();
            let both = match shader(&device, "matvec_sg", &sg(MATVEC_WGSL)).await {
                Ok(p) => shader(&device, "matvec_sg (combine)", &sg(MATVEC_COMBINE_WGSL))
                    .await
                    .map(|c| (p, c)),
                Err(e) => Err(e),
            };
            match both {
                Ok(m) => matvec_sg_modules = Some(m),
                Err(e) => warn(&format!("lorag: {e}; the products run without subgroups")),
            }
        }
        let (matvec_sg_module, matvec_sg_combine_module) = matvec_sg_modules.unzip();
        let matvec_t_module = shader(&device, "matvec_t", MATVEC_T_WGSL).await?;
        let embed_module = shader(&device, "embed", EMBED_WGSL).await?;
        // The kernels assert that their tile is the one the dispatches assume (const_assert on HOST_TILE).
        let tiled = |t: u32, src: &str| format!("const HOST_TILE: u32 = {t}u;\n{src}");
        let matmul_module = shader(&device, "matmul", &tiled(GEMM_TILE, MATMUL_WGSL)).await?;
        let matmul_wide_module = shader(
            &device,
            "matmul_wide",
            &tiled(GEMM_WIDE_TILE, MATMUL_WIDE_WGSL),
        )
        .await?;
        let storage = |binding, read_only| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let uniform = |binding| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let matvec_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("matvec"),
            entries: &[
                storage(0, true),
                storage(1, true),
                storage(2, false),
                storage(3, true),
                uniform(4),
                uniform(5),
                storage(6, true),
                storage(7, true),
            ],
        });
        let mut kernels = Vec::new();
        let mut attention = vec![];
        let sg_width = (4 * ai.subgroup_max_size)
            .clamp(32, 256)
            .min(64 * ai.subgroup_min_size.max(1));
        let attention_wg = default_attention_wg(&info);
        for k in Kernel::ALL {
            let module = shader(&device, k.name(), &k.source(attention_wg, ATTENTION_HD)).await?;
            let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
            let p = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(k.name()),
                layout: None,
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            });
            if let Some(e) = scope.pop().await {
                return Err(dev_err(format!("kernel {} failed to build: {e}", k.name())));
            }
            match k {
                Kernel::Attention => attention.push(((attention_wg, ATTENTION_HD), p)),
                _ => kernels.push(p),
            }
        }
        Ok(Gpu {
            device,
            queue,
            info,
            counters: Counters::default(),
            lost,
            matvec_layout,
            use_subgroups: AtomicBool::new(matvec_sg_module.is_some()),
            matvec_module,
            matvec_sg_module,
            matvec_combine_module,
            matvec_sg_combine_module,
            // (wgpu's smallest subgroup is ≥ 4, so a workgroup of ≤ 256 has ≤ 64 subgroups: matvec_sg.wgsl's
            // mean square keeps one sum per subgroup in 64 places; the min() says so for any adapter.)
            sg_width,
            sg_split: sg_width >= 4 * ai.subgroup_max_size,
            decode_rows: AtomicU32::new(u32::MAX),
            matmul_module,
            matmul_wide_module,
            gemm_tile: AtomicU32::new(0),
            row_pairs: AtomicBool::new(true),
            combine_in_product: AtomicBool::new(true),
            matvec: Mutex::new(Vec::new()),
            matvec_t_module,
            matvec_t: Mutex::new(Vec::new()),
            embed_module,
            embed: Mutex::new(Vec::new()),
            greedy_batch: AtomicU32::new(GREEDY_BATCH),
            sample_on_gpu: AtomicBool::new(true),
            record_ahead: AtomicBool::new(true),
            activation_cap: AtomicUsize::new(0),
            kernels,
            attention: Mutex::new(attention),
            attention_wg: AtomicU32::new(0),
            attention_chunks: AtomicU32::new(0),
            #[cfg(not(target_arch = "wasm32"))]
            timestamps: want.contains(
                wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES,
            ),
            #[cfg(not(target_arch = "wasm32"))]
            profiler: Mutex::new(None),
        })
    }

    /// [`Gpu::new`], waiting for it (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new_blocking() -> Result<Gpu> {
        block_on(Gpu::new())
    }

    /// Compile a WGSL module; a compile error is `Error::Device` naming the kernel.
    pub async fn compile(&self, name: &str, src: &str) -> Result<wgpu::ShaderModule> {
        shader(&self.device, name, src).await
    }

    /// Treat the device as lost from now on (a failure that means it is unusable).
    pub fn mark_lost(&self) {
        self.lost.store(true, Ordering::SeqCst);
    }

    /// `Err` once the device is lost.
    pub fn check(&self) -> Result<()> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(dev_err("the GPU device was lost"));
        }
        Ok(())
    }

    /// A storage buffer of `bytes` (padded to 4), counted.
    pub fn buffer_init(
        &self,
        label: &str,
        bytes: &[u8],
        usage: wgpu::BufferUsages,
    ) -> wgpu::Buffer {
        self.counters.buffers.fetch_add(1, Ordering::Relaxed);
        let mut padded;
        let contents = if !bytes.len().is_multiple_of(4) || bytes.is_empty() {
            padded = bytes.to_vec();
            padded.resize(bytes.len().div_ceil(4).max(1) * 4, 0);
            &padded[..]
        } else {
            bytes
        };
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents,
                usage,
            })
    }

    /// An empty buffer of `size` bytes, counted.
    pub fn buffer(&self, label: &str, size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        self.counters.buffers.fetch_add(1, Ordering::Relaxed);
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: size.div_ceil(4).max(1) * 4,
            usage,
            mapped_at_creation: false,
        })
    }

    /// A read-write f32 storage buffer holding `data`.
    pub fn f32_buffer(&self, label: &str, data: &[f32]) -> wgpu::Buffer {
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.buffer_init(
            label,
            &bytes,
            wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
        )
    }

    /// Upload a `rows × cols` weight matrix of type `ty` (its GGUF bytes), split into row chunks that each fit
    /// the device's storage-binding and buffer limits.
    pub fn upload_matrix(
        &self,
        ty: GgmlType,
        bytes: &[u8],
        rows: usize,
        cols: usize,
    ) -> Result<GpuMatrix> {
        let cap = self.info.max_storage_binding.min(self.info.max_buffer) as usize;
        self.upload_matrix_with_cap(ty, bytes, rows, cols, cap)
    }

    /// [`Gpu::upload_matrix`] with chunks of at most `cap` bytes (tests force splitting with a small cap).
    pub fn upload_matrix_with_cap(
        &self,
        ty: GgmlType,
        bytes: &[u8],
        rows: usize,
        cols: usize,
        cap: usize,
    ) -> Result<GpuMatrix> {
        self.check()?;
        if !matvec_supports(ty) {
            return Err(dev_err(format!(
                "the GPU kernels do not read {} weights",
                ty.name()
            )));
        }
        let row_bytes = ty
            .row_bytes(cols)
            .filter(|&rb| rb * rows == bytes.len())
            .ok_or_else(|| {
                dev_err(format!(
                    "{rows}×{cols} {} does not fit its bytes",
                    ty.name()
                ))
            })?;
        let cap = cap.min(self.info.max_storage_binding.min(self.info.max_buffer) as usize);
        let per = (cap / row_bytes.max(1)).min(rows);
        if per == 0 {
            return Err(dev_err(format!(
                "one row of {row_bytes} bytes is larger than the device's {cap}-byte storage binding"
            )));
        }
        let mut chunks = Vec::new();
        let mut r0 = 0;
        while r0 < rows {
            let n = per.min(rows - r0);
            let buf = self.buffer_init(
                "weights",
                &bytes[r0 * row_bytes..(r0 + n) * row_bytes],
                wgpu::BufferUsages::STORAGE,
            );
            chunks.push(Chunk {
                buffer: buf,
                r0,
                rows: n,
                offset: 0,
            });
            r0 += n;
        }
        Ok(GpuMatrix {
            ty,
            rows,
            cols,
            row_bytes,
            chunks,
        })
    }

    /// Whether matrix-vector products built from now on use subgroup operations (matvec_sg.wgsl): on by default
    /// where the adapter offers them; `on = false` takes matvec.wgsl's workgroup-memory sums instead (tests run
    /// both on one adapter). Returns the setting in effect (never on without subgroups). Dispatches already built
    /// keep their pipelines.
    pub fn set_subgroups(&self, on: bool) -> bool {
        let on = on && self.matvec_sg_module.is_some();
        self.use_subgroups.store(on, Ordering::SeqCst);
        on
    }

    /// Which matrix-matrix kernel the products built from now on take for steps of more than `TILE` tokens:
    /// `None` (the default) matmul_wide.wgsl where a step makes at least `WIDE_MIN_TILES` of its tiles, else
    /// matmul.wgsl; `Some(GEMM_TILE)` or `Some(GEMM_WIDE_TILE)` that one always (tests run both).
    pub fn set_gemm_tile(&self, tile: Option<u32>) {
        self.gemm_tile.store(tile.unwrap_or(0), Ordering::SeqCst);
    }

    /// Whether decoder sessions (`llm::gpu::GpuSession`) built from now on add attention's position chunks up
    /// inside the output projection of one-token steps ([`Input::Combine`]; on by default, where
    /// [`combine_fits`]) or in a launch of their own (attention_combine.wgsl): the same results bit for bit, so
    /// the switch is for measuring what the launch saves (`cargo bench --bench gpu`).
    pub fn set_combine_in_product(&self, on: bool) {
        self.combine_in_product.store(on, Ordering::SeqCst);
    }

    /// See [`Gpu::set_combine_in_product`].
    pub fn combine_in_product(&self) -> bool {
        self.combine_in_product.load(Ordering::SeqCst)
    }

    /// Whether decoder sessions (`llm::gpu::GpuSession`) built from now on run the gate and up projections as one
    /// launch of row pairs in steps of up to `TILE` tokens (on by default), or as two launches always: the same
    /// results bit for bit, so the switch is for measuring what the launch saves (`cargo bench --bench gpu`).
    pub fn set_row_pairs(&self, on: bool) {
        self.row_pairs.store(on, Ordering::SeqCst);
    }

    /// See [`Gpu::set_row_pairs`].
    pub fn row_pairs(&self) -> bool {
        self.row_pairs.load(Ordering::SeqCst)
    }

    /// One-token products' rows per workgroup on subgroups for a product of `rows` rows, each row split over
    /// the workgroup's subgroups (1, 2 or 4), or 0: a subgroup per row, four rows a workgroup (also where a
    /// workgroup may have fewer than four subgroups). As set by [`Gpu::set_decode_rows`], else by the rows:
    /// up to 1024 one a workgroup, up to 2048 two, more 0; 0 on a CPU adapter (its subgroups run one after the
    /// other: the split only adds the sums' barrier). On an H200 (one token, Q4_1, time per dependent launch):
    /// 576 × 1536 12 µs split against 26 µs unsplit, 576 × 576 11 against 18, 960 × 576 15 against 21; but
    /// 3072 × 576 25 µs at one row a workgroup, 20 at two, 17 unsplit, and SmolLM2's 49152-row output projection
    /// 127 µs at one row a workgroup against 83 unsplit: past a thousand workgroups more only queue.
    pub fn decode_rows_for(&self, rows: usize) -> u32 {
        match self.decode_rows.load(Ordering::SeqCst) {
            _ if !self.sg_split => 0,
            u32::MAX if self.info.software => 0,
            u32::MAX if rows <= 1024 => 1,
            u32::MAX if rows <= 2048 => 2,
            u32::MAX => 0,
            r => r,
        }
    }

    /// What [`Gpu::set_decode_rows`] set: `None` where it is the default (by the rows, [`Gpu::decode_rows_for`]),
    /// `Some(0)` where the adapter cannot split rows whatever was set.
    pub fn decode_rows(&self) -> Option<u32> {
        match (self.sg_split, self.decode_rows.load(Ordering::SeqCst)) {
            (false, _) => Some(0),
            (true, u32::MAX) => None,
            (true, r) => Some(r),
        }
    }

    /// Rows per workgroup of one-token products on subgroups built from now on (`None`: the default; `Some(0)`:
    /// one subgroup per row; `Some(1 | 2 | 4)`: rows split over subgroups; other values are taken as 4).
    pub fn set_decode_rows(&self, rows: Option<u32>) {
        let r = match rows {
            None => u32::MAX,
            Some(r @ (0 | 1 | 2 | 4)) => r,
            Some(_) => 4,
        };
        self.decode_rows.store(r, Ordering::SeqCst);
    }

    /// Whether matrix-vector products built now use subgroup operations.
    pub fn subgroups(&self) -> bool {
        self.use_subgroups.load(Ordering::SeqCst)
    }

    /// The matvec.wgsl pipeline for `ty` with `tile` tokens per workgroup, or matmul.wgsl's (`tile` = `MATMUL`);
    /// `mode`: the input transform compiled in (the override constant NORM, [`Input::mode`]; 2 only with `tile`
    /// 1); `sg`: matvec_sg.wgsl's entry
    /// point where the module exists (matrix-vector only).
    /// `split`: rows per workgroup of a one-token pipeline on subgroups, each split over subgroups (SPLIT;
    /// 0: one subgroup per row, four rows).
    fn matvec_pipeline(
        &self,
        ty: GgmlType,
        tile: u32,
        mode: u32,
        sg: bool,
        split: u32,
    ) -> wgpu::ComputePipeline {
        debug_assert!(
            mode < 2 || tile == 1,
            "the chunks' sum is a one-token transform"
        );
        let sg = sg && tile != MATMUL && tile != MATMUL_WIDE && self.matvec_sg_module.is_some();
        let split = if sg && tile == 1 { split } else { 0 };
        let mut cache = self.matvec.lock().unwrap();
        let key = (ty.id(), tile, mode, sg, split);
        if let Some((_, p)) = cache.iter().find(|(k, _)| *k == key) {
            return p.clone();
        }
        let layout = self
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some("matvec"),
                bind_group_layouts: &[Some(&self.matvec_layout)],
                immediate_size: 0,
            });
        let norm = ("NORM", mode as f64);
        let tiles = [("TY", ty.id() as f64), ("TT", tile as f64), norm];
        let sg_tiles = [
            ("TY", ty.id() as f64),
            ("TT", tile as f64),
            norm,
            ("SGW", self.sg_width as f64),
            ("SPLIT", (split > 0) as u32 as f64),
            ("RPS", split.max(1) as f64),
        ];
        let (label, module, entry, constants): (_, _, _, &[(&str, f64)]) =
            match &self.matvec_sg_module {
                _ if tile == MATMUL => (
                    "matmul",
                    &self.matmul_module,
                    "main",
                    &[("TY", ty.id() as f64), norm],
                ),
                _ if tile == MATMUL_WIDE => (
                    "matmul_wide",
                    &self.matmul_wide_module,
                    "main",
                    &[("TY", ty.id() as f64), norm],
                ),
                Some(_) if sg && mode == 2 => (
                    "matvec_sg",
                    self.matvec_sg_combine_module.as_ref().unwrap(),
                    "main_sg",
                    &sg_tiles,
                ),
                Some(m) if sg => ("matvec_sg", m, "main_sg", &sg_tiles),
                _ if mode == 2 => ("matvec", &self.matvec_combine_module, "main", &tiles),
                _ => ("matvec", &self.matvec_module, "main", &tiles),
            };
        let p = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(label),
                layout: Some(&layout),
                module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    ..Default::default()
                },
                cache: None,
            });
        cache.push((key, p.clone()));
        p
    }

    /// The dispatches computing `y (+)= scale · W·x (+ bias)` for the step's tokens (`step` holds `[pos0, n,
    /// 0, 0]`): `x` holds token t's input at `in_off + t·in_stride`, `y` gets row r of token t at
    /// `out_off + t·out_stride + r`. Built once, recorded as often as needed (the buffers' contents may change
    /// between recordings); steps of up to `TILE` tokens use the tiled pipeline, longer ones matmul.wgsl.
    pub fn matvec_dispatches(
        &self,
        m: &GpuMatrix,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        bias: Option<&wgpu::Buffer>,
        step: &wgpu::Buffer,
        base: MatvecParams,
    ) -> Vec<Dispatch> {
        self.matvec_dispatches_with(m, x, y, bias, None, None, step, base)
    }

    /// [`Gpu::matvec_dispatches`] with the fusions' operands: `norm`, the norm weights of `base.input`
    /// (one per column), and `gate`, the gate of `base.glu` (laid out as `y`). With `base.pair` the dispatch
    /// runs only in steps of up to `TILE` tokens ([`Steps::UpTo`]): the matrix-matrix kernels have no row pairs,
    /// so the caller adds the two products it replaces for longer steps ([`Steps::Over`]). With
    /// [`Input::Combine`] (`x`: attention's partials) it runs only in one-token steps ([`Steps::UpTo`]`(1)`).
    #[allow(clippy::too_many_arguments)]
    pub fn matvec_dispatches_with(
        &self,
        m: &GpuMatrix,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        bias: Option<&wgpu::Buffer>,
        norm: Option<&wgpu::Buffer>,
        gate: Option<&wgpu::Buffer>,
        step: &wgpu::Buffer,
        base: MatvecParams,
    ) -> Vec<Dispatch> {
        let mode = base.input.mode();
        let combine = mode == 2;
        if let Input::Combine { heads, chunks } = base.input {
            assert!(
                combine_fits(heads as usize, chunks)
                    && m.cols.is_multiple_of(heads as usize)
                    && !base.pair,
                "attention's chunks added up in a product: {heads} heads over {} columns, {chunks} chunks",
                m.cols
            );
        }
        // Row pairs: one chunk holding both halves (row r's partner is r + rows/2 in the same binding), and
        // nothing the pass over the gate rows would have to skip.
        assert!(
            !base.pair
                || m.rows.is_multiple_of(2)
                    && m.chunks.len() == 1
                    && bias.is_none()
                    && gate.is_none()
                    && !base.glu
                    && !base.accumulate,
            "row pairs need one chunk of 2 × rows, no bias, gate or accumulation"
        );
        let halves = if base.pair { 2 } else { 1 };
        let subgroups = self.subgroups();
        let split = match subgroups {
            true => self.decode_rows_for(m.rows / halves),
            false => 0,
        };
        let pipeline = self.matvec_pipeline(m.ty, 1, mode, subgroups, split);
        // The chunks' sum is a one-token transform: no pipelines for longer steps.
        let tiled = (!combine).then(|| self.matvec_pipeline(m.ty, TILE, mode, subgroups, 0));
        let gemm = (!combine).then(|| self.matvec_pipeline(m.ty, MATMUL, mode, subgroups, 0));
        let forced = self.gemm_tile.load(Ordering::SeqCst);
        let gemm_wide = (!combine
            && (forced == GEMM_WIDE_TILE || forced == 0 && m.rows >= WIDE_MIN_ROWS))
            .then(|| self.matvec_pipeline(m.ty, MATMUL_WIDE, mode, subgroups, 0));
        let dummy = (bias.is_none() || norm.is_none() || gate.is_none())
            .then(|| self.buffer("no operand", 4, wgpu::BufferUsages::STORAGE));
        let [bias_buf, norm_buf, gate_buf] =
            [bias, norm, gate].map(|b| b.or(dummy.as_ref()).unwrap());
        m.chunks
            .iter()
            .map(|c| {
                let rows = c.rows / halves;
                let p = MatvecParams {
                    rows: rows as u32,
                    cols: m.cols as u32,
                    row_bytes: m.row_bytes as u32,
                    w_off: c.offset as u32,
                    out_off: base.out_off + c.r0 as u32,
                    has_bias: bias.is_some(),
                    bias_off: base.bias_off + c.r0 as u32,
                    ..base
                };
                let uniform =
                    self.buffer_init("matvec params", &p.bytes(), wgpu::BufferUsages::UNIFORM);
                let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("matvec"),
                    layout: &self.matvec_layout,
                    entries: &[
                        wgpu::BindGroupEntry {
                            binding: 0,
                            resource: c.buffer.as_entire_binding(),
                        },
                        wgpu::BindGroupEntry {
                            binding: 1,
                            resource: x.as_entire_binding(),
                        },
                        wgpu::BindGroupEntry {
                            binding: 2,
                            resource: y.as_entire_binding(),
                        },
                        wgpu::BindGroupEntry {
                            binding: 3,
                            resource: bias_buf.as_entire_binding(),
                        },
                        wgpu::BindGroupEntry {
                            binding: 4,
                            resource: uniform.as_entire_binding(),
                        },
                        wgpu::BindGroupEntry {
                            binding: 5,
                            resource: step.as_entire_binding(),
                        },
                        wgpu::BindGroupEntry {
                            binding: 6,
                            resource: norm_buf.as_entire_binding(),
                        },
                        wgpu::BindGroupEntry {
                            binding: 7,
                            resource: gate_buf.as_entire_binding(),
                        },
                    ],
                });
                // Row workgroups (x, y) of `per` rows each, for the one-token pipeline and the tiled one.
                let row_groups = |per: usize| {
                    let groups = rows.div_ceil(per) as u32;
                    let gx = groups.min(65_535);
                    (gx, groups.div_ceil(gx))
                };
                let (gx, gy) = row_groups(if split > 0 { split as usize } else { 4 });
                let (tgx, tgy) = row_groups(4);
                // Row workgroups (x, y) for a tile of `t` rows.
                let grid = |t: u32| {
                    let tiles = (c.rows as u32).div_ceil(t);
                    let tx = tiles.min(65_535);
                    (tx, tiles.div_ceil(tx))
                };
                let (sx, sy) = grid(GEMM_TILE);
                let (wx, wy) = grid(GEMM_WIDE_TILE);
                // The wide kernel from the step size whose wide tiles number WIDE_MIN_TILES.
                let wide_rows = (c.rows as u32).div_ceil(GEMM_WIDE_TILE);
                let wide_from = match forced {
                    0 => (WIDE_MIN_TILES.div_ceil(wide_rows) - 1)
                        .saturating_mul(GEMM_WIDE_TILE)
                        .saturating_add(1),
                    GEMM_WIDE_TILE => 0,
                    _ => u32::MAX,
                };
                Dispatch {
                    pipeline: pipeline.clone(),
                    bind_group,
                    grid: Grid::TokensZ(gx, gy),
                    tiled: tiled.clone().map(|p| (p, tgx, tgy)),
                    gemm: gemm.clone().filter(|_| !base.pair).map(|small| Gemm {
                        small: (small, sx, sy),
                        wide: gemm_wide.clone().map(|p| (p, wx, wy)),
                        wide_from,
                    }),
                    label: format!(
                        "{} {}{}×{}{}{}",
                        m.ty.name(),
                        if base.pair { "2×" } else { "" },
                        rows,
                        m.cols,
                        match mode {
                            1 => " +norm",
                            2 => " +combine",
                            _ => "",
                        },
                        if base.glu || base.pair { " +glu" } else { "" }
                    ),
                    subgroups,
                    steps: if combine {
                        Steps::UpTo(1)
                    } else if base.pair {
                        Steps::UpTo(TILE)
                    } else {
                        Steps::All
                    },
                }
            })
            .collect()
    }

    /// A uniform buffer holding `words` (padded to 16 bytes).
    pub fn uniform(&self, words: &[u32]) -> wgpu::Buffer {
        let mut bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        bytes.resize(bytes.len().div_ceil(16).max(1) * 16, 0);
        self.buffer_init(
            "params",
            &bytes,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        )
    }

    /// A launch of `kernel` with `buffers` bound to bindings 0, 1, … in order.
    pub fn dispatch(&self, kernel: Kernel, buffers: &[&wgpu::Buffer], grid: Grid) -> Dispatch {
        let pipeline = match kernel {
            // Any head size up to MAX_HEAD_DIM ([`Gpu::attention`] takes the pipeline for the model's own).
            Kernel::Attention => self.attention_pipeline(MAX_HEAD_DIM as u32),
            _ => {
                let others = Kernel::ALL.iter().filter(|k| **k != Kernel::Attention);
                self.kernels[others.clone().position(|k| *k == kernel).unwrap()].clone()
            }
        };
        self.launch(kernel.name(), pipeline, buffers, grid)
    }

    /// attention.wgsl's pipeline for heads of up to `hd` values, with the workgroup size dispatches take now.
    fn attention_pipeline(&self, hd: u32) -> wgpu::ComputePipeline {
        let wg = match self.attention_wg.load(Ordering::SeqCst) {
            0 => default_attention_wg(&self.info),
            wg => wg,
        };
        let mut built = self.attention.lock().unwrap();
        if let Some((_, p)) = built.iter().find(|(k, _)| *k == (wg, hd)) {
            return p.clone();
        }
        // The source the device compiled with other constants (compile errors surfaced there).
        let p = self.pipeline_from_wgsl("attention", &Kernel::Attention.source(wg, hd));
        built.push(((wg, hd), p.clone()));
        p
    }

    /// A pipeline of `source`'s entry point `main`, its layout derived from the shader (for [`Gpu::launch`]), not
    /// checked for compile errors (the kernels' sources are checked when the device is built; benches/gpu.rs
    /// builds variants of them).
    pub fn pipeline_from_wgsl(&self, label: &str, source: &str) -> wgpu::ComputePipeline {
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(label),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
        self.device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(label),
                layout: None,
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            })
    }

    /// The attention kernel's workgroup size for dispatches built from now on: `None` (the default) 64 on a CPU
    /// adapter and 256 elsewhere, or `Some(64)` / `Some(256)` (tests run both).
    pub fn set_attention_workgroup(&self, wg: Option<u32>) {
        self.attention_wg.store(wg.unwrap_or(0), Ordering::SeqCst);
    }

    /// The position chunks [`Gpu::attention`] splits a decoding step's (head, token) into, for a model of
    /// `n_head` query heads: as set by [`Gpu::set_attention_chunks`], else enough for 32 workgroups up to 16
    /// chunks (4 for SmolLM2's 9 heads: an H200 decoded fastest there both after 197 and after 720 positions,
    /// of 1 to 32 chunks; more chunks make each shorter but the combine longer), or 1 (no split) on a CPU
    /// adapter, which runs workgroups one after the other anyway.
    pub fn attention_chunks(&self, n_head: usize) -> u32 {
        match self.attention_chunks.load(Ordering::SeqCst) {
            0 if self.info.software => 1,
            0 => (32u32.div_ceil(n_head.max(1) as u32)).clamp(1, 16),
            k => k,
        }
    }

    /// Position chunks for attention dispatches built from now on: `None` for the default
    /// ([`Gpu::attention_chunks`]), `Some(1)` never to split (tests run several).
    pub fn set_attention_chunks(&self, chunks: Option<u32>) {
        self.attention_chunks.store(
            chunks.unwrap_or(0).min(MAX_ATTENTION_CHUNKS),
            Ordering::SeqCst,
        );
    }

    /// One layer's attention: attention.wgsl over `buffers` (the step's q|k|v, the k and v caches, the RoPE
    /// table, the scores, the output, its parameters, the step) and, where `chunks` > 1, in steps of up to `TILE`
    /// tokens split over that many position chunks per (head, token) with attention_combine.wgsl adding them up
    /// into the output (a second launch; longer steps have workgroups enough and run unsplit). `partials`: at
    /// least [`attention_partials`]`(chunks, n_head, hd)` floats. `hd` at most [`MAX_HEAD_DIM`] (the decoder refuses
    /// larger heads with a typed error; larger here fails the pipeline's workgroup-memory limit).
    pub fn attention(
        &self,
        buffers: [&wgpu::Buffer; 8],
        partials: &wgpu::Buffer,
        n_head: usize,
        hd: usize,
        chunks: u32,
    ) -> Vec<Dispatch> {
        let mut b = buffers.to_vec();
        b.push(partials);
        let (nh, chunks) = (n_head as u32, chunks.clamp(1, MAX_ATTENTION_CHUNKS));
        let pipeline = self.attention_pipeline(hd as u32);
        let mut ds = vec![self.launch(
            Kernel::Attention.name(),
            pipeline,
            &b,
            Grid::TokensYChunks(nh, chunks),
        )];
        if chunks > 1 {
            let p = self.uniform(&[nh, hd as u32, chunks, 0]);
            let mut d = self.dispatch(
                Kernel::AttentionCombine,
                &[partials, buffers[5], &p],
                Grid::TokensY(nh),
            );
            d.steps = Steps::UpTo(TILE);
            ds.push(d);
        }
        ds
    }

    /// Greedy decoding's next input: launches of embed.wgsl writing row `TOK[step.pos0]` of `m` (the token
    /// embeddings) into `x`, one per row chunk of `m`.
    pub fn embed_dispatches(
        &self,
        m: &GpuMatrix,
        tokens: &wgpu::Buffer,
        x: &wgpu::Buffer,
        step: &wgpu::Buffer,
    ) -> Vec<Dispatch> {
        let pipeline = self.typed_pipeline("embed", &self.embed_module, &self.embed, m.ty);
        m.chunks
            .iter()
            .map(|c| {
                let p = self.uniform(&[
                    c.rows as u32,
                    m.cols as u32,
                    m.row_bytes as u32,
                    c.r0 as u32,
                    c.offset as u32,
                ]);
                self.launch(
                    &format!("embed {}", m.ty.name()),
                    pipeline.clone(),
                    &[&c.buffer, tokens, x, &p, step],
                    Grid::Flat(m.cols as u32),
                )
            })
            .collect()
    }

    /// Whether sampling with a top-k of at most [`MAX_TOP_K`] and no penalties finds its candidates on the GPU
    /// and reads back only those (on by default).
    pub fn sample_on_gpu(&self) -> bool {
        self.sample_on_gpu.load(Ordering::SeqCst)
    }

    /// Turn candidates on the GPU on or off (off: every sampled step reads all the logits back, as tests and
    /// benchmarks compare).
    pub fn set_sample_on_gpu(&self, on: bool) {
        self.sample_on_gpu.store(on, Ordering::SeqCst);
    }

    /// Whether a sampled decoding step (candidates found on the GPU) is recorded while the GPU runs the step
    /// before, its token then written into a GPU buffer and its embedding decoded there (on by default).
    pub fn record_ahead(&self) -> bool {
        self.record_ahead.load(Ordering::SeqCst)
    }

    /// Turn recording ahead on or off (off: each sampled step is recorded after the one before has come back,
    /// as benchmarks compare).
    pub fn set_record_ahead(&self, on: bool) {
        self.record_ahead.store(on, Ordering::SeqCst);
    }

    /// Tokens per submission when a session decodes greedily on the GPU (`llm::gpu::GpuSession::greedy`), for
    /// requests from now on.
    pub fn greedy_batch(&self) -> u32 {
        self.greedy_batch.load(Ordering::SeqCst)
    }

    /// Tokens per greedy decoding submission: `Some(0)` never to decode on the GPU alone (every step reads the
    /// logits back and the host picks the token: what sampling does), `None` for the default
    /// ([`GREEDY_BATCH`]).
    pub fn set_greedy_batch(&self, tokens: Option<u32>) {
        self.greedy_batch.store(
            tokens.unwrap_or(GREEDY_BATCH).min(MAX_GREEDY_BATCH),
            Ordering::SeqCst,
        );
    }

    /// A launch of `pipeline` (its layout derived from the shader) with `buffers` bound to bindings 0, 1, … in
    /// order (public for measurements of variants of a kernel: benches/gpu.rs).
    pub fn launch(
        &self,
        label: &str,
        pipeline: wgpu::ComputePipeline,
        buffers: &[&wgpu::Buffer],
        grid: Grid,
    ) -> Dispatch {
        let layout = pipeline.get_bind_group_layout(0);
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: b.as_entire_binding(),
            })
            .collect();
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(label),
            layout: &layout,
            entries: &entries,
        });
        Dispatch {
            pipeline,
            bind_group,
            grid,
            tiled: None,
            gemm: None,
            label: label.to_string(),
            subgroups: false,
            steps: Steps::All,
        }
    }

    /// Launches finding the `k` largest of the `n` f32 values in `values`, in the order the sampler sorts
    /// them (descending by `f32::total_cmp`, ties to the lower index), as topk.wgsl describes: per chunk of
    /// 256 · E values (E from 4 to 32, at most 128 chunks) its `k` best, then the `k` best of those. `Err` for
    /// `k` outside 1..=[`MAX_TOP_K`] or `n` outside 1..=[`MAX_TOP_K_INPUT`].
    pub fn top_k(&self, values: &wgpu::Buffer, n: usize, k: usize) -> Result<TopK> {
        if !(1..=MAX_TOP_K).contains(&k) || !(1..=MAX_TOP_K_INPUT).contains(&n) {
            return Err(Error::InvalidQuery(format!(
                "top-k on the GPU: {k} of {n} values (k up to {MAX_TOP_K}, values up to {MAX_TOP_K_INPUT})"
            )));
        }
        let e = n.div_ceil(256 * 128).max(4);
        let groups = n.div_ceil(256 * e);
        let merged = groups * k;
        let rw = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
        let partial = self.buffer("top-k chunks", (merged * 8) as u64, rw);
        let out = self.buffer("top-k", (k * 8) as u64, rw);
        let p1 = self.uniform(&[n as u32, e as u32, 0, k as u32]);
        let p2 = self.uniform(&[merged as u32, merged.div_ceil(256) as u32, 1, k as u32]);
        let dispatches = vec![
            self.dispatch(
                Kernel::TopK,
                &[values, &partial, &p1],
                Grid::TokensZ(groups as u32, 1),
            ),
            self.dispatch(Kernel::TopK, &[&partial, &out, &p2], Grid::One),
        ];
        Ok(TopK {
            dispatches,
            out,
            k,
            _keep: vec![partial, p1, p2],
        })
    }

    /// Record `dispatches` for a step of `n` tokens in one compute pass, let `then` add copies, and submit
    /// (one submission).
    pub fn run(
        &self,
        dispatches: &[Dispatch],
        n: u32,
        then: impl FnOnce(&mut wgpu::CommandEncoder),
    ) -> Result<()> {
        self.submit(|enc| {
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("lorag"),
                    timestamp_writes: None,
                });
                self.record(&mut pass, dispatches, n);
            }
            then(enc);
        })?;
        Ok(())
    }

    /// Let `build` record into a command encoder and submit it (one submission, counted; with profiling on,
    /// its timed launches collected); the submission's index.
    pub fn submit(
        &self,
        build: impl FnOnce(&mut wgpu::CommandEncoder),
    ) -> Result<wgpu::SubmissionIndex> {
        self.check()?;
        let t0 = crate::clock::now_ms();
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("lorag"),
            });
        build(&mut enc);
        #[cfg(not(target_arch = "wasm32"))]
        let timed = self.profile_resolve(&mut enc);
        let index = self.queue.submit([enc.finish()]);
        self.counters.submissions.fetch_add(1, Ordering::Relaxed);
        let us = ((crate::clock::now_ms() - t0) * 1e3).max(0.0) as u64;
        self.counters.submit_us.fetch_add(us, Ordering::Relaxed);
        #[cfg(not(target_arch = "wasm32"))]
        if timed {
            self.profile_collect()?;
        }
        Ok(index)
    }

    /// Let `build` record into a command encoder and finish it, to submit later ([`Gpu::submit_recorded`]): a
    /// step recorded while the GPU runs the one before. Not with profiling on (its timestamps belong to one
    /// submission: [`Gpu::profiling`]).
    pub fn encode(&self, build: impl FnOnce(&mut wgpu::CommandEncoder)) -> Result<Recorded> {
        self.check()?;
        let t0 = crate::clock::now_ms();
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("lorag"),
            });
        build(&mut enc);
        let commands = enc.finish();
        Ok(Recorded {
            commands,
            ms: crate::clock::now_ms() - t0,
        })
    }

    /// Submit commands [`Gpu::encode`] recorded (one submission, counted; their recording time counted in
    /// `submit_us` with the submission's); the submission's index.
    pub fn submit_recorded(&self, r: Recorded) -> Result<wgpu::SubmissionIndex> {
        self.check()?;
        let t0 = crate::clock::now_ms();
        let index = self.queue.submit([r.commands]);
        self.counters.submissions.fetch_add(1, Ordering::Relaxed);
        let us = ((crate::clock::now_ms() - t0 + r.ms) * 1e3).max(0.0) as u64;
        self.counters.submit_us.fetch_add(us, Ordering::Relaxed);
        Ok(index)
    }

    /// Whether launches are being timed ([`Gpu::set_profiling`]).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn profiling(&self) -> bool {
        self.profiler.lock().unwrap().is_some()
    }

    /// Whether launches are being timed: never in wasm.
    #[cfg(target_arch = "wasm32")]
    pub fn profiling(&self) -> bool {
        false
    }

    /// Record `dispatches` for a step of `n` tokens into `pass` (what [`Gpu::run`] does; for callers adding a pass
    /// of their own inside `run`'s `then`). With profiling on, each launch is timed.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>, dispatches: &[Dispatch], n: u32) {
        #[cfg(not(target_arch = "wasm32"))]
        let mut prof = self.profiler.lock().unwrap();
        for d in dispatches.iter().filter(|d| d.steps.has(n)) {
            #[cfg(not(target_arch = "wasm32"))]
            let slot = prof.as_mut().and_then(|p| {
                let i = 2 * p.labels.len() as u32;
                (i + 2 <= PROFILE_QUERIES).then(|| {
                    pass.write_timestamp(&p.queries, i);
                    i
                })
            });
            let kind = d.record(pass, n);
            #[cfg(not(target_arch = "wasm32"))]
            if let (Some(i), Some(p)) = (slot, prof.as_mut()) {
                pass.write_timestamp(&p.queries, i + 1);
                p.labels.push(match kind {
                    "" => d.label.clone(),
                    k => format!("{k} {}", d.label),
                });
            }
            #[cfg(target_arch = "wasm32")]
            let _ = kind;
        }
    }

    /// Turn per-launch timing on or off (native, where the adapter has timestamp queries inside passes); returns
    /// whether it is on. While on, every [`Gpu::run`] waits for its submission and adds each launch's GPU time
    /// to [`Gpu::profile`]: a measuring aid (timestamps between launches of one pass are as precise as the
    /// driver makes them), not for production.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn set_profiling(&self, on: bool) -> bool {
        let mut prof = self.profiler.lock().unwrap();
        if !on || !self.timestamps {
            *prof = None;
            return false;
        }
        if prof.is_none() {
            let bytes = PROFILE_QUERIES as u64 * 8;
            let buf = |label, usage| {
                self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(label),
                    size: bytes,
                    usage,
                    mapped_at_creation: false,
                })
            };
            *prof = Some(Profiler {
                queries: self.device.create_query_set(&wgpu::QuerySetDescriptor {
                    label: Some("lorag profile"),
                    ty: wgpu::QueryType::Timestamp,
                    count: PROFILE_QUERIES,
                }),
                resolve: buf(
                    "profile resolve",
                    wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                ),
                staging: buf(
                    "profile staging",
                    wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                ),
                period_ns: self.queue.get_timestamp_period() as f64,
                labels: Vec::new(),
                times: Vec::new(),
            });
        }
        true
    }

    /// The launches timed since profiling was turned on or last read, summed by what they computed, longest
    /// first; reading resets them.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn profile(&self) -> Vec<KernelTime> {
        let mut prof = self.profiler.lock().unwrap();
        let mut out = prof
            .as_mut()
            .map(|p| std::mem::take(&mut p.times))
            .unwrap_or_default();
        out.sort_by(|a, b| b.ns.total_cmp(&a.ns));
        out
    }

    /// Resolve this submission's timestamps into the staging buffer; whether there are any.
    #[cfg(not(target_arch = "wasm32"))]
    fn profile_resolve(&self, enc: &mut wgpu::CommandEncoder) -> bool {
        let prof = self.profiler.lock().unwrap();
        let Some(p) = prof.as_ref().filter(|p| !p.labels.is_empty()) else {
            return false;
        };
        let n = 2 * p.labels.len() as u32;
        enc.resolve_query_set(&p.queries, 0..n, &p.resolve, 0);
        enc.copy_buffer_to_buffer(&p.resolve, 0, &p.staging, 0, n as u64 * 8);
        true
    }

    /// Wait for the submission, read its timestamps and add each launch's time to its label's sum.
    #[cfg(not(target_arch = "wasm32"))]
    fn profile_collect(&self) -> Result<()> {
        let mut prof = self.profiler.lock().unwrap();
        let Some(p) = prof.as_mut() else {
            return Ok(());
        };
        let labels = std::mem::take(&mut p.labels);
        let ticks: Vec<u64> = block_on(self.read_mapped_with(&p.staging, |bytes| {
            bytes[..labels.len() * 16]
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
                .collect()
        }))?;
        for (label, t) in labels.into_iter().zip(ticks.chunks_exact(2)) {
            let ns = t[1].saturating_sub(t[0]) as f64 * p.period_ns;
            match p.times.iter_mut().find(|k| k.label == label) {
                Some(k) => {
                    k.launches += 1;
                    k.ns += ns;
                }
                None => p.times.push(KernelTime {
                    label,
                    launches: 1,
                    ns,
                }),
            }
        }
        Ok(())
    }

    /// Map `staging` (a `MAP_READ` buffer already filled by a submitted copy) and read `len` f32 values.
    pub async fn read_mapped(&self, staging: &wgpu::Buffer, len: usize) -> Result<Vec<f32>> {
        let out = self
            .read_mapped_with(staging, |bytes| {
                bytes[..len * 4]
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect()
            })
            .await?;
        self.check()?;
        Ok(out)
    }

    /// Map `staging` once its copy has run, hand its bytes to `read`, unmap: the read-back sequence the values
    /// (`read_mapped`) and the profile's timestamps share.
    pub async fn read_mapped_with<T>(
        &self,
        staging: &wgpu::Buffer,
        read: impl FnOnce(&[u8]) -> T,
    ) -> Result<T> {
        let request = self.map_request(staging, None);
        self.map_finish(staging, request, read).await
    }

    /// Ask for `staging` (a `MAP_READ` buffer a submitted copy fills) to be mapped, right after the submission
    /// `index` that fills it (`None`: the latest), so that later submissions run while it is read
    /// ([`Gpu::map_finish`] waits for that one submission only).
    pub fn map_request(
        &self,
        staging: &wgpu::Buffer,
        index: Option<wgpu::SubmissionIndex>,
    ) -> MapRequest {
        let (s, fut) = slot();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            fill(&s, r.map_err(|e| e.to_string()))
        });
        MapRequest { fut, index }
    }

    /// Wait for a [`Gpu::map_request`]'s mapping, hand the bytes to `read`, unmap.
    pub async fn map_finish<T>(
        &self,
        staging: &wgpu::Buffer,
        request: MapRequest,
        read: impl FnOnce(&[u8]) -> T,
    ) -> Result<T> {
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: request.index,
                timeout: None,
            })
            .map_err(|e| dev_err(format!("waiting for the GPU: {e}")))?;
        #[cfg(target_arch = "wasm32")]
        let _ = request.index;
        request
            .fut
            .await
            .map_err(|e| dev_err(format!("reading back from the GPU: {e}")))?;
        let out = {
            let view = staging
                .slice(..)
                .get_mapped_range()
                .map_err(|e| dev_err(format!("reading back from the GPU: {e}")))?;
            self.counters
                .read_bytes
                .fetch_add(view.len() as u64, Ordering::Relaxed);
            read(&view)
        };
        staging.unmap();
        Ok(out)
    }

    /// `W·x` for `n` inputs (`xs` is n × cols): upload, one submission, read back (n × rows). Builds its buffers
    /// per call; the generator builds its dispatches once instead.
    pub async fn matvec(&self, m: &GpuMatrix, xs: &[f32], n: usize) -> Result<Vec<f32>> {
        Ok(self.matvec_many(&[m], xs, n).await?.remove(0))
    }

    /// `Wᵢ·x` for several matrices of the same input width (a layer's q, k and v; gate and up): one upload,
    /// one submission, one read back; the products in order.
    pub async fn matvec_many(
        &self,
        ms: &[&GpuMatrix],
        xs: &[f32],
        n: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let cols = ms.first().map_or(0, |m| m.cols);
        if ms.iter().any(|m| m.cols != cols) || xs.len() != n * cols {
            return Err(Error::Config(format!(
                "{} inputs for {n} × {cols} columns (every matrix must have {cols})",
                xs.len()
            )));
        }
        let total: usize = ms.iter().map(|m| m.rows).sum();
        let per_call = self.tokens_per_call(total.max(cols));
        if n > per_call {
            // In token slices whose buffers fit one binding; each token's sums are the same whatever the slice.
            let mut out = vec![Vec::new(); ms.len()];
            for t0 in (0..n).step_by(per_call) {
                let k = per_call.min(n - t0);
                let part =
                    Box::pin(self.matvec_many(ms, &xs[t0 * cols..(t0 + k) * cols], k)).await?;
                for (o, p) in out.iter_mut().zip(part) {
                    o.extend(p);
                }
            }
            return Ok(out);
        }
        let x = self.f32_buffer("x", xs);
        let y = self.buffer(
            "y",
            (n * total * 4) as u64,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        );
        let step = self.uniform(&[0, n as u32, 0, 0]);
        let mut d = Vec::new();
        let mut off = 0;
        for m in ms {
            d.extend(self.matvec_dispatches(
                m,
                &x,
                &y,
                None,
                &step,
                MatvecParams {
                    in_stride: cols as u32,
                    out_off: (n * off) as u32,
                    out_stride: m.rows as u32,
                    scale: 1.0,
                    ..Default::default()
                },
            ));
            off += m.rows;
        }
        let all = self.run_and_read(&d, n as u32, &y, n * total).await?;
        let mut out = Vec::with_capacity(ms.len());
        let mut off = 0;
        for m in ms {
            out.push(all[n * off..n * (off + m.rows)].to_vec());
            off += m.rows;
        }
        Ok(out)
    }

    /// `Wᵀ·dy` for `n` rows of `dy` (n × rows): `dx` (n × cols), `dx[t][c] = Σ_r dy[t][r] · W[r][c]` (training's
    /// backward pass through a frozen matrix). Upload, one submission (one launch per row chunk, each after the
    /// first adding to the sum), read back.
    pub async fn matvec_t(&self, m: &GpuMatrix, dy: &[f32], n: usize) -> Result<Vec<f32>> {
        self.matvec_t_many(&[(m, dy)], n).await
    }

    /// `Σᵢ Wᵢᵀ·dyᵢ` for matrices of the same width (the gradient reaching a layer's normed input through q, k
    /// and v, or gate and up): one upload, one submission, one read back (n × cols).
    pub async fn matvec_t_many(
        &self,
        items: &[(&GpuMatrix, &[f32])],
        n: usize,
    ) -> Result<Vec<f32>> {
        let cols = items.first().map_or(0, |(m, _)| m.cols);
        if let Some((m, dy)) = items
            .iter()
            .find(|(m, dy)| m.cols != cols || dy.len() != n * m.rows)
        {
            return Err(Error::Config(format!(
                "{} gradients for {n} × {} rows (every matrix must have {cols} columns)",
                dy.len(),
                m.rows
            )));
        }
        self.check()?;
        let total: usize = items.iter().map(|(m, _)| m.rows).sum();
        let per_call = self.tokens_per_call(total.max(cols));
        if n > per_call {
            let mut out = Vec::with_capacity(n * cols);
            for t0 in (0..n).step_by(per_call) {
                let k = per_call.min(n - t0);
                let part: Vec<(&GpuMatrix, &[f32])> = items
                    .iter()
                    .map(|&(m, dy)| (m, &dy[t0 * m.rows..(t0 + k) * m.rows]))
                    .collect();
                out.extend(Box::pin(self.matvec_t_many(&part, k)).await?);
            }
            return Ok(out);
        }
        let all: Vec<f32> = items
            .iter()
            .flat_map(|(_, dy)| dy.iter().copied())
            .collect();
        let dy_buf = self.f32_buffer("dy", &all);
        let dx = self.buffer(
            "dx",
            (n * cols * 4) as u64,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        );
        let mut d: Vec<Dispatch> = Vec::new();
        let mut dy_off = 0;
        for (m, _) in items {
            let pipeline = self.matvec_t_pipeline(m.ty);
            for c in &m.chunks {
                let uniform = self.uniform(&[
                    c.rows as u32,
                    cols as u32,
                    m.row_bytes as u32,
                    n as u32,
                    c.r0 as u32,
                    m.rows as u32,
                    !d.is_empty() as u32,
                    dy_off as u32,
                    c.offset as u32,
                ]);
                d.push(self.launch(
                    "matvec_t",
                    pipeline.clone(),
                    &[&c.buffer, &dy_buf, &dx, &uniform],
                    Grid::TokensY(cols.div_ceil(64) as u32),
                ));
            }
            dy_off += n * m.rows;
        }
        self.run_and_read(&d, n.div_ceil(T_TILE) as u32, &dx, n * cols)
            .await
    }

    /// Split the activation buffers of [`Gpu::matvec_many`] / [`Gpu::matvec_t_many`] at `bytes` (tests; 0: the
    /// device's storage-binding limit, the default). Long training sequences against a large vocabulary need
    /// that split: 1,024 tokens × 49,152 logits is 200 MB, over WebGPU's default 128 MiB binding.
    pub fn limit_activation_buffers(&self, bytes: usize) {
        self.activation_cap.store(bytes, Ordering::Relaxed);
    }

    /// Tokens per call when each token needs `width` f32 values in the widest activation buffer.
    fn tokens_per_call(&self, width: usize) -> usize {
        let device = self.info.max_storage_binding.min(self.info.max_buffer) as usize;
        let cap = match self.activation_cap.load(Ordering::Relaxed) {
            0 => device,
            c => c.min(device),
        };
        (cap / (4 * width.max(1))).max(1)
    }

    fn matvec_t_pipeline(&self, ty: GgmlType) -> wgpu::ComputePipeline {
        self.typed_pipeline("matvec_t", &self.matvec_t_module, &self.matvec_t, ty)
    }

    /// `module`'s pipeline for weights of type `ty` (its override constant TY), built once into `cache`.
    fn typed_pipeline(
        &self,
        label: &str,
        module: &wgpu::ShaderModule,
        cache: &Mutex<Vec<(u32, wgpu::ComputePipeline)>>,
        ty: GgmlType,
    ) -> wgpu::ComputePipeline {
        let mut cache = cache.lock().unwrap();
        if let Some((_, p)) = cache.iter().find(|(k, _)| *k == ty.id()) {
            return p.clone();
        }
        let p = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(label),
                layout: None,
                module,
                entry_point: Some("main"),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &[("TY", ty.id() as f64)],
                    ..Default::default()
                },
                cache: None,
            });
        cache.push((ty.id(), p.clone()));
        p
    }

    /// Run `dispatches` for `n` tokens, then read the first `len` f32 values of `src` (a `COPY_SRC` buffer)
    /// through a staging buffer made for the call: one submission. For tests and one-off calls (no dispatches:
    /// just a read); a generation step reuses its own staging buffer.
    pub async fn run_and_read(
        &self,
        dispatches: &[Dispatch],
        n: u32,
        src: &wgpu::Buffer,
        len: usize,
    ) -> Result<Vec<f32>> {
        let size = (len * 4) as u64;
        let staging = self.buffer(
            "staging",
            size,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        );
        self.run(dispatches, n, |enc| {
            enc.copy_buffer_to_buffer(src, 0, &staging, 0, size)
        })?;
        self.read_mapped(&staging, len).await
    }
}

/// Compile a WGSL module, turning a compile error into `Error::Device` naming the kernel.
async fn shader(device: &wgpu::Device, name: &str, src: &str) -> Result<wgpu::ShaderModule> {
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let m = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(name),
        source: wgpu::ShaderSource::Wgsl(src.into()),
    });
    if let Some(e) = scope.pop().await {
        return Err(dev_err(format!("kernel {name} failed to compile: {e}")));
    }
    Ok(m)
}

/// attention.wgsl's workgroup size unless set: 64 on a CPU adapter (it runs every invocation's barriers one
/// after the other), 256 on a GPU (more invocations share a head's positions: faster decoding after long prompts).
fn default_attention_wg(info: &GpuInfo) -> u32 {
    match info.software {
        true => 64,
        false => 256,
    }
}

/// A warning the caller cannot act on (standard error natively, the console in a browser).
fn warn(s: &str) {
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("{s}");
    #[cfg(target_arch = "wasm32")]
    web_sys_log(s);
}

#[cfg(target_arch = "wasm32")]
fn web_sys_log(s: &str) {
    let console = js_sys::Reflect::get(&js_sys::global(), &"console".into()).ok();
    if let Some(c) = console {
        if let Ok(f) = js_sys::Reflect::get(&c, &"warn".into()) {
            if let Ok(f) = f.dyn_into::<js_sys::Function>() {
                let _ = f.call1(&c, &s.into());
            }
        }
    }
}

#[cfg(target_arch = "wasm32")]
use wasm_bindgen::JsCast;
