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
