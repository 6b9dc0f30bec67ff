//! GPU kernels against the scalar CPU references, on real adapters: natively the software Vulkan adapter (Mesa
//! lavapipe, installed by scripts/setup; `LORAG_REQUIRE_GPU=1`, set by scripts/test, turns a missing adapter into
//! a failure instead of a skip), and in headless Chromium its WebGPU (SwiftShader). In Node, which has no WebGPU,
//! opening the GPU must be a typed error, not a panic.
#![cfg(feature = "gpu")]

mod common;

use lorag::kernels::gpu::Gpu;
use lorag::llm::quant::{self, GgmlType};
use lorag::Error;

/// A test that runs natively (blocking on the future) and in wasm (awaited by the test runner).
macro_rules! gpu_test {
    ($name:ident, $body:ident) => {
        #[cfg(not(target_arch = "wasm32"))]
        #[test]
        fn $name() {
            lorag::kernels::gpu::block_on($body())
        }
        #[cfg(target_arch = "wasm32")]
        #[wasm_bindgen_test::wasm_bindgen_test]
        async fn $name() {
            $body().await
        }
    };
}

/// The GPU, or `None` where this environment legitimately has none (Node; a native machine without Vulkan when
/// LORAG_REQUIRE_GPU is not set). Where one must exist, its absence fails the test.
async fn gpu() -> Option<Gpu> {
    match Gpu::new().await {
        Ok(g) => Some(g),
        Err(e) => {
            assert!(matches!(e, Error::Device(_)), "{e:?}");
            #[cfg(target_arch = "wasm32")]
            {
                let browser =
                    js_sys::Reflect::has(&js_sys::global(), &"document".into()).unwrap_or(false);
                assert!(
                    !browser,
                    "headless Chromium has WebGPU (SwiftShader) but: {e}"
                );
            }
            #[cfg(not(target_arch = "wasm32"))]
            assert!(
                std::env::var_os("LORAG_REQUIRE_GPU").is_none(),
                "no GPU adapter although LORAG_REQUIRE_GPU is set: {e}"
            );
            None
        }
    }
}

fn f16_bits(rng: &mut common::Rng, lo_exp: i32) -> [u8; 2] {
    // A normal f16 of magnitude in [2^lo_exp, 2^(lo_exp+4)), either sign: no subnormals, which a GPU may flush.
    let m = 1.0 + rng.below(1024) as f32 / 1024.0;
    let v = m * 2f32.powi(lo_exp + rng.below(4) as i32);
    let v = if rng.below(2) == 0 { v } else { -v };
    quant::f32_to_f16(v).to_le_bytes()
}

/// Random rows of type `ty`: random code bytes, with every scale field a normal f16.
fn random_rows(ty: GgmlType, rows: usize, cols: usize, rng: &mut common::Rng) -> Vec<u8> {
    let rb = ty.row_bytes(cols).unwrap();
    let mut out = Vec::with_capacity(rows * rb);
    match ty {
        GgmlType::F32 => {
            for _ in 0..rows * cols {
                out.extend(((rng.below(2001) as f32 - 1000.0) / 700.0).to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for _ in 0..rows * cols {
                out.extend(f16_bits(rng, -4));
            }
        }
        GgmlType::BF16 => {
            for _ in 0..rows * cols {
                let v = (rng.below(2001) as f32 - 1000.0) / 300.0;
                out.extend(((v.to_bits() >> 16) as u16).to_le_bytes());
            }
        }
        _ => {
            let scales: &[usize] = match ty {
                GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
                GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
                GgmlType::Q6_K => &[208],
                _ => unreachable!(),
            };
            for _ in 0..rows * rb / ty.block_bytes() {
                let mut b: Vec<u8> = (0..ty.block_bytes())
                    .map(|_| rng.below(256) as u8)
                    .collect();
                for &o in scales {
                    b[o..o + 2].copy_from_slice(&f16_bits(rng, -8));
                }
                out.extend(b);
            }
        }
    }
    out
}

const TYPES: [GgmlType; 11] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Every format, awkward shapes (rows not a multiple of the 4 rows of a workgroup; float rows not a multiple of
/// the 32-element unit), three tokens, against `dot_row_ref`. The shader computes each weight with the reference's
/// operations in the reference's order, so weights are bit-identical and only the order of the sum differs: two
/// orders of an n-term f32 sum each err by at most (n−1)·u·Σ|w·x| (u = 2⁻²⁴), so they differ by at most
/// n·ε·Σ|w·x| (ε = 2⁻²³). That is the tolerance.
async fn check_matvec(g: &Gpu, cap: Option<usize>) {
    let mut rng = common::Rng(0x9e37_79b9);
    for ty in TYPES {
        let cols = match ty {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 45,
            t if t.block_len() == 256 => 512,
            _ => 96,
        };
        let rows = 37;
        let n = 3;
        let w = random_rows(ty, rows, cols, &mut rng);
        let xs: Vec<f32> = (0..n * cols)
            .map(|_| (rng.below(2001) as f32 - 1000.0) / 1000.0)
            .collect();
        let m = match cap {
            None => g.upload_matrix(ty, &w, rows, cols).unwrap(),
            Some(c) => g.upload_matrix_with_cap(ty, &w, rows, cols, c).unwrap(),
        };
        if let Some(c) = cap {
            assert!(
                m.chunks.len() > 1,
                "{}: a {c}-byte cap split nothing",
                ty.name()
            );
        }
        let got = g.matvec(&m, &xs, n).await.unwrap();
        let rb = ty.row_bytes(cols).unwrap();
        let mut deq = vec![0.0f32; cols];
        for t in 0..n {
            let x = &xs[t * cols..(t + 1) * cols];
            for r in 0..rows {
                let row = &w[r * rb..(r + 1) * rb];
                let want = quant::dot_row_ref(ty, row, x);
                quant::dequantize_row_ref(ty, row, &mut deq);
                let mag: f32 = deq.iter().zip(x).map(|(a, b)| (a * b).abs()).sum();
                let tol = cols as f32 * f32::EPSILON * mag;
                let v = got[t * rows + r];
                assert!(
                    (v - want).abs() <= tol,
                    "{} token {t} row {r}: GPU {v} vs reference {want} (tolerance {tol})",
                    ty.name()
                );
            }
        }
    }
}

gpu_test!(
    matvec_matches_the_reference_for_every_format,
    matvec_every_format
);
async fn matvec_every_format() {
    let Some(g) = gpu().await else { return };
    check_matvec(&g, None).await;
    // Tensors over the storage-binding limit are split by rows: force it with a small cap.
    check_matvec(&g, Some(1024)).await;
}

gpu_test!(unsupported_formats_and_bad_shapes_are_errors, bad_uploads);
async fn bad_uploads() {
    let Some(g) = gpu().await else { return };
    let e = g
        .upload_matrix(GgmlType::Q2_K, &[0; 84], 1, 256)
        .unwrap_err();
    assert!(matches!(e, Error::Device(_)), "{e}");
    let e = g
        .upload_matrix(GgmlType::Q8_0, &[0; 33], 1, 32)
        .unwrap_err();
    assert!(matches!(e, Error::Device(_)), "{e}");
    let m = g.upload_matrix(GgmlType::Q8_0, &[0; 34], 1, 32).unwrap();
    assert!(g.matvec(&m, &[0.0; 31], 1).await.is_err());
}

// ---- The decoder on the GPU against the CPU path ----

use lorag::kernels::DevicePref;
use lorag::llm::gpu::GpuSession;
use lorag::llm::{GenerateOptions, Model, SamplerConfig};
use std::sync::atomic::Ordering;

/// The model on the GPU (forced, software adapters included), or `None` where there is legitimately none.
async fn on_gpu(bytes: Vec<u8>) -> Option<Model> {
    gpu().await?;
    let mut m = Model::from_bytes(bytes).unwrap();
    let r = m.use_device(DevicePref::Gpu).await.unwrap();
    assert_eq!(r.kind, "gpu");
    Some(m)
}

fn close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
            "{what}: logit {i}: GPU {a} vs CPU {b}"
        );
    }
}

/// A tiny llama (2 layers, GQA, F32 and F16 weights) with a LoRA adapter on all seven projections: a batched
/// prompt and then one token at a time, every step's logits against the CPU's. The CPU and GPU compute the same
/// operations in different summation orders (f32 throughout, about 1e-6 relative per layer here), so 1e-4
/// relative is the bound, as between the CPU's own batched and one-at-a-time paths. A decode step is one
/// submission and creates no buffer.
async fn tiny_decoder() {
    let bytes = common::tiny::tiny(|_, _| {});
    let Some(mut m) = on_gpu(bytes).await else {
        return;
    };
    let mut rng = common::Rng(5);
    let mut a = lorag::llm::Adapter::empty(2, lorag::llm::AdapterFormat::Memory);
    for l in 0..2 {
        for t in lorag::llm::Target::ALL {
            let base = t.mat(&m.weights.layers[l]);
            let mut r = || (rng.below(2001) as f32 - 1000.0) / 3000.0;
            let lm = lorag::llm::lora::LoraMat {
                rank: 3,
                rows: base.rows,
                cols: base.cols,
                a: (0..3 * base.cols).map(|_| r()).collect(),
                bt: (0..3 * base.rows).map(|_| r()).collect(),
                scale: 0.7,
            };
            a.set(&m.weights, "t", l, t, lm).unwrap();
        }
    }
    m.add_adapter("all", a).unwrap();
    let prompt: Vec<u32> = (0..11).map(|i| (i * 37 % 256) as u32).collect();
    for adapters in [vec![], vec![("all", 1.0f32)]] {
        let uses: Vec<lorag::llm::AdapterUse> = adapters
            .iter()
            .map(|&(n, w)| lorag::llm::AdapterUse {
                name: n.into(),
                weight: w,
            })
            .collect();
        let lora = m.active_adapters(&uses).unwrap();
        let b = m.gpu().unwrap();
        let mut s =
            GpuSession::new(&b.gpu, b.weights(), &m.weights, m.bytes(), 16, 4, &lora).unwrap();
        let mut cache = m.new_cache(16).unwrap();
        let gpu_logits = s.forward(&prompt).await.unwrap();
        let cpu_logits = m.forward_with(&mut cache, &prompt, false, &lora).unwrap();
        close(&gpu_logits, &cpu_logits, "prompt");
        for t in [3u32, 250, 7, 100] {
            let before = (
                b.gpu.counters.submissions.load(Ordering::Relaxed),
                b.gpu.counters.buffers.load(Ordering::Relaxed),
            );
            let g = s.forward(&[t]).await.unwrap();
            let after = (
                b.gpu.counters.submissions.load(Ordering::Relaxed),
                b.gpu.counters.buffers.load(Ordering::Relaxed),
            );
            assert_eq!(after.0 - before.0, 1, "one submission per decode step");
            assert_eq!(after.1, before.1, "no buffer created per decode step");
            let c = m.forward_with(&mut cache, &[t], false, &lora).unwrap();
            close(&g, &c, &format!("decode {t} with {adapters:?}"));
        }
        assert!(s.forward(&[1, 2]).await.is_err(), "context of 16 is full");
    }
}
gpu_test!(the_tiny_decoder_on_the_gpu_matches_the_cpu, tiny_decoder);

const SMOLLM: &[u8] =
    include_bytes!("../models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
const REFERENCE: &str = include_str!("../../shared/reference/smollm2_135m_q4_1.json");

/// SmolLM2 on the GPU: the reference prompts' greedy tokens, and top-5 logits within 0.05 of the float64
/// reference (the same bound as the CPU path).
async fn smollm_reference() {
    let Some(m) = on_gpu(SMOLLM.to_vec()).await else {
        return;
    };
    let r: serde_json::Value = serde_json::from_str(REFERENCE).unwrap();
    for c in r["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["lora"] == false)
    {
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        let prompt = ids(&c["prompt_ids"]);
        let want = ids(&c["greedy_ids"]);
        let opts = GenerateOptions {
            max_tokens: want.len(),
            sampler: SamplerConfig::greedy(),
            top_logits: 5,
            ..Default::default()
        };
        let out = m
            .generate_async(&prompt, &opts, &mut |_| true)
            .await
            .unwrap();
        assert_eq!(out.ids, want, "{}", c["case"]);
        for (g, w) in out
            .top_logits
            .iter()
            .zip(c["top5_next"].as_array().unwrap())
        {
            assert_eq!(g.0 as u64, w["id"].as_u64().unwrap());
            let wl = w["logit"].as_f64().unwrap() as f32;
            assert!((g.1 - wl).abs() <= 0.05, "{}: {} vs {wl}", c["case"], g.1);
        }
    }
}
gpu_test!(
    smollm2_on_the_gpu_gives_the_reference_tokens,
    smollm_reference
);
