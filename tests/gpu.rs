//! GPU kernels against the scalar CPU references, on real adapters: natively the software Vulkan adapter (Mesa
//! lavapipe, installed by scripts/setup; `LORAG_REQUIRE_GPU=1`, set by scripts/test, turns a missing adapter into
//! a failure instead of a skip), and in headless Chromium its WebGPU (SwiftShader). In Node, which has no WebGPU,
//! opening the GPU must be a typed error, not a panic.
#![cfg(feature = "gpu")]

mod common;

use lorag::kernels::gpu::Gpu;
use lorag::llm::quant::{self, GgmlType};
use lorag::Error;

/// The GPU, or `None` where this environment legitimately has none (Node; a native machine without Vulkan when
/// LORAG_REQUIRE_GPU is not set). Where one must exist, its absence fails the test.
#[allow(clippy::arc_with_non_send_sync)] // wasm's WebGPU handles are neither; one thread there
async fn gpu() -> Option<std::sync::Arc<Gpu>> {
    match Gpu::new().await {
        Ok(g) => Some(std::sync::Arc::new(g)),
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

/// `w` (rows × cols of type `ty`) on the GPU, split into row chunks of at most `cap` bytes when given (and then
/// split for certain).
fn upload(
    g: &Gpu,
    ty: GgmlType,
    w: &[u8],
    rows: usize,
    cols: usize,
    cap: Option<usize>,
) -> lorag::kernels::gpu::GpuMatrix {
    let m = match cap {
        None => g.upload_matrix(ty, w, rows, cols).unwrap(),
        Some(c) => g.upload_matrix_with_cap(ty, w, rows, cols, c).unwrap(),
    };
    if let Some(c) = cap {
        assert!(
            m.chunks.len() > 1,
            "{}: a {c}-byte cap split nothing",
            ty.name()
        );
    }
    m
}

/// Every format, awkward shapes (rows not a multiple of the 4 rows of a workgroup; float rows not a multiple of
/// the 32-element unit), three tokens, against `dot_row_ref`. The shader computes each weight with the reference's
/// operations in the reference's order, so weights are bit-identical and only the order of the sum differs: two
/// orders of an n-term f32 sum each err by at most (n−1)·u·Σ|w·x| (u = 2⁻²⁴), so they differ by at most
/// n·ε·Σ|w·x| (ε = 2⁻²³). That is the tolerance.
///
/// Steps of more than `TILE` tokens take a matrix-matrix kernel (matmul.wgsl: tiles of 64 rows × 64 tokens, 32
/// columns at a time; matmul_wide.wgsl: 128 × 128, 16 columns): 133 rows and 70 tokens leave whole tiles and a
/// partial one in both directions for the first, whole and partial row tiles and a partial token tile for the
/// second (F32 also 20 rows × 135 tokens: a whole token tile and a partial one), and the float formats' 45
/// columns a partial pass. Their sums run in another order again, so only the reference bound applies there.
async fn check_matvec(g: &Gpu, cap: Option<usize>, types: &[GgmlType]) {
    let mut rng = common::Rng(0x9e37_79b9);
    for (ty, (rows, n)) in types.iter().copied().flat_map(|ty| {
        let tokens = (ty == GgmlType::F32).then_some((ty, (20, 135)));
        [(ty, (37, 3)), (ty, (133, 70))].into_iter().chain(tokens)
    }) {
        let cols = match ty {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 45,
            t if t.block_len() == 256 => 512,
            _ => 96,
        };
        let w = random_rows(ty, rows, cols, &mut rng);
        let xs: Vec<f32> = (0..n * cols)
            .map(|_| (rng.below(2001) as f32 - 1000.0) / 1000.0)
            .collect();
        let m = upload(g, ty, &w, rows, cols, cap);
        let got = g.matvec(&m, &xs, n).await.unwrap();
        // Several tokens go through the tiled pipeline (each weight decoded once for the tile), one token through
        // the plain one; each token's sum runs in the same order in both, so the bits agree. Where one-token rows
        // are split over subgroups their sums are added in another order: those are checked against the
        // reference below, as `got` is.
        let split = g.subgroups() && g.decode_rows_for(rows) > 0;
        let mut singles = vec![];
        for t in (0..n).filter(|_| n <= lorag::kernels::gpu::TILE as usize) {
            let one = g
                .matvec(&m, &xs[t * cols..(t + 1) * cols], 1)
                .await
                .unwrap();
            if !split {
                assert_eq!(
                    &one[..],
                    &got[t * rows..(t + 1) * rows],
                    "{} tiled vs single",
                    ty.name()
                );
            }
            singles.extend(one);
        }
        // A view of some rows (`GpuMatrix::rows`: the decoder's q, k and v inside their fused matrix), starting
        // inside a chunk and, when split, crossing chunks: the same rows, bit for bit.
        let (r0, k) = (5, rows - 9);
        let part = g.matvec(&m.rows(r0, k), &xs, n).await.unwrap();
        for t in 0..n {
            assert_eq!(
                &part[t * k..(t + 1) * k],
                &got[t * rows + r0..t * rows + r0 + k],
                "{}: rows {r0}..{} as a view",
                ty.name(),
                r0 + k
            );
        }
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
                let one = singles.get(t * rows + r).copied();
                for (v, what) in [(Some(got[t * rows + r]), ""), (one, ", alone")] {
                    let Some(v) = v else { continue };
                    assert!(
                        (v - want).abs() <= tol,
                        "{} token {t}{what} row {r}: GPU {v} vs reference {want} (tolerance {tol}, split {split})",
                        ty.name()
                    );
                }
            }
        }
    }
}

async_test! {
    fn matvec_matches_the_reference_for_every_format() {
        matvec_every_format().await
    }
}
async fn matvec_every_format() {
    let Some(g) = gpu().await else { return };
    // In the browser (SwiftShader compiles each pipeline for seconds) matmul.wgsl with split tensors for every
    // format, and matmul_wide.wgsl for a float and a K-quant format (the same WGSL as natively: what Chromium
    // adds is its own validation and compilation); natively everything, both ways.
    let browser = cfg!(target_arch = "wasm32");
    let wide_types: &[GgmlType] = match browser {
        true => &[GgmlType::F32, GgmlType::Q6_K],
        false => &TYPES,
    };
    for sg in paths(&g) {
        assert_eq!(g.set_subgroups(sg), sg);
        // The matrix-matrix steps through matmul.wgsl, then (with split tensors) through matmul_wide.wgsl.
        // Tensors over the storage-binding limit are split by rows: a small cap forces it.
        g.set_gemm_tile(Some(lorag::kernels::gpu::GEMM_TILE));
        g.set_decode_rows(Some(0));
        check_matvec(&g, browser.then_some(1024), &TYPES).await;
        g.set_gemm_tile(Some(lorag::kernels::gpu::GEMM_WIDE_TILE));
        check_matvec(&g, Some(1024), wide_types).await;
        g.set_gemm_tile(None);
        // One-token rows split over subgroups (matvec_sg.wgsl's SPLIT), 1 and 2 rows a workgroup (2 to 4
        // subgroups a row on lavapipe's 8-wide subgroups), where the adapter allows it.
        for rows in [1, 2] {
            g.set_decode_rows(Some(rows));
            if sg && g.decode_rows() == Some(rows) {
                check_matvec(&g, None, &TYPES).await;
            }
        }
        g.set_decode_rows(None);
    }
}

/// The matrix-vector paths to test: where the adapter has subgroups, matvec_sg.wgsl (the default there; it
/// must have compiled) and matvec.wgsl's workgroup-memory sums (subgroups turned off); elsewhere the latter.
fn paths(g: &Gpu) -> Vec<bool> {
    assert_eq!(
        g.subgroups(),
        g.info.subgroups,
        "the adapter offers subgroups but the products do not use them (matvec_sg.wgsl did not compile?)"
    );
    #[cfg(not(target_arch = "wasm32"))]
    assert!(
        g.info.subgroups || std::env::var_os("LORAG_REQUIRE_SUBGROUPS").is_none(),
        "LORAG_REQUIRE_SUBGROUPS is set but {} offers no subgroups",
        g.info.name
    );
    if g.info.subgroups {
        vec![true, false]
    } else {
        vec![false]
    }
}

async_test! {
    fn the_products_normalize_or_gate_their_input() {
        input_transforms().await
    }
}
/// The fusions that let the decoder skip its norm and SwiGLU launches, in both product kernels (3 tokens:
/// matvec.wgsl; 70: matmul.wgsl) and with a forced row split, against an f64 reference.
/// - RMSNorm on the input: x' = x · (1/√(mean x² + eps)) · w, then the dequantized row's dot product. Bound:
///   n·ε·Σ|w·x'| for the summation order (as in `check_matvec`) plus each x' element's own error carried into the
///   sum: the f32 sum of n squares ((n−1)·u, all terms positive), the square root, reciprocal and two products
///   (≤ 4u more; matvec.wgsl multiplies by 1/rms once after the sum instead of per element, which is the same
///   count of roundings on each term): 2n·ε·Σ|w·x'| covers both for the n ≥ 96 here.
/// - SwiGLU on the output: y = silu(g) · (row · x). Bound: |silu(g)| · n·ε·Σ|w·x| for the sum, plus silu's own
///   error on |y|: WGSL's exp (≤ 3 + 2·|g| ULP, |g| ≤ 2 here: 7u), 1 + e, the division and the product (≤ 4u
///   more): 16ε·|y| covers it.
async fn input_transforms() {
    use lorag::kernels::gpu::{Input, MatvecParams};
    let Some(g) = gpu().await else { return };
    let mut rng = common::Rng(77);
    let eps = 1e-5f32;
    let silu = |v: f64| v / (1.0 + (-v).exp());
    let sg_paths = paths(&g);
    for ty in [GgmlType::F32, GgmlType::Q4_1, GgmlType::Q6_K] {
        let cols = if ty == GgmlType::Q6_K { 256 } else { 96 };
        for (rows, n, cap) in [(37, 3, None), (101, 70, None), (101, 70, Some(1024))] {
            let w = random_rows(ty, rows, cols, &mut rng);
            let m = upload(&g, ty, &w, rows, cols, cap);
            let step = g.uniform(&[0, n as u32, 0, 0]);
            let xs = rand_vec(&mut rng, n * cols, 2.0);
            let norm_w = rand_vec(&mut rng, cols, 1.5);
            let gate = rand_vec(&mut rng, n * rows, 2.0);
            let rb = ty.row_bytes(cols).unwrap();
            let mut deq = vec![0.0f32; rows * cols];
            for r in 0..rows {
                let row = &w[r * rb..(r + 1) * rb];
                quant::dequantize_row_ref(ty, row, &mut deq[r * cols..(r + 1) * cols]);
            }
            let (x, norm_b, gate_b) = (
                g.f32_buffer("x", &xs),
                g.f32_buffer("norm", &norm_w),
                g.f32_buffer("gate", &gate),
            );
            let both = sg_paths.iter().flat_map(|&sg| [(sg, false), (sg, true)]);
            for (sg, glu) in both {
                g.set_subgroups(sg);
                let y = g.f32_buffer("y", &vec![0.0; n * rows]);
                let input = if glu {
                    Input::Plain
                } else {
                    Input::RmsNorm { eps }
                };
                let params = MatvecParams {
                    in_stride: cols as u32,
                    out_stride: rows as u32,
                    scale: 1.0,
                    input,
                    glu,
                    ..Default::default()
                };
                let (norm, gate_op) = if glu {
                    (None, Some(&gate_b))
                } else {
                    (Some(&norm_b), None)
                };
                let d = g.matvec_dispatches_with(&m, &x, &y, None, norm, gate_op, &step, params);
                let got = g.run_and_read(&d, n as u32, &y, n * rows).await.unwrap();
                for t in 0..n {
                    let x = &xs[t * cols..(t + 1) * cols];
                    let ms = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / cols as f64;
                    let inv = 1.0 / (ms + eps as f64).sqrt();
                    let xp: Vec<f64> = (0..cols)
                        .map(|c| match glu {
                            true => x[c] as f64,
                            false => x[c] as f64 * inv * norm_w[c] as f64,
                        })
                        .collect();
                    for r in 0..rows {
                        let row = &deq[r * cols..(r + 1) * cols];
                        let dot: f64 = row.iter().zip(&xp).map(|(&a, b)| a as f64 * b).sum();
                        let mag: f64 = row
                            .iter()
                            .zip(&xp)
                            .map(|(&a, b)| (a as f64 * b).abs())
                            .sum();
                        let e = f32::EPSILON as f64;
                        let (want, tol) = if glu {
                            let s = silu(gate[t * rows + r] as f64);
                            (
                                s * dot,
                                s.abs() * cols as f64 * e * mag + 16.0 * e * (s * dot).abs(),
                            )
                        } else {
                            (dot, 2.0 * cols as f64 * e * mag)
                        };
                        let v = got[t * rows + r] as f64;
                        assert!(
                            (v - want).abs() <= tol,
                            "{} glu {glu} subgroups {sg} {n} tokens, token {t} row {r}: GPU {v} vs {want} (tolerance {tol})",
                            ty.name()
                        );
                    }
                }
            }
        }
    }
}

async_test! {
    fn gate_and_up_as_row_pairs_match_the_two_products() {
        row_pairs().await
    }
}
/// The product paths of `paths` as (subgroups, one-token rows per workgroup for `Gpu::set_decode_rows`): on
/// subgroups each of `splits`, without them 0 (no split there).
fn with_splits(paths: &[bool], splits: &[u32]) -> Vec<(bool, u32)> {
    paths
        .iter()
        .flat_map(|&sg| match sg {
            true => splits.iter().map(|&k| (sg, k)).collect(),
            false => vec![(sg, 0)],
        })
        .collect()
}

/// The gate and up projections in one launch (`MatvecParams::pair`: the decoder's FFN while decoding) against the
/// two launches it replaces (the gate's product, then up's finishing with SwiGLU, both reading the normalized
/// input), bit for bit: each row's two sums run in the same order in both (same lanes, same slots), and the
/// finishing operations are the same, so nothing may differ. The two-launch path is held to the f64 reference
/// above. One token (matvec.wgsl's TT = 1) and 3 and 8 (its tiled pipeline), both product paths, an odd row
/// count; the pair dispatch does not run in longer steps (matmul.wgsl has no row pairs).
async fn row_pairs() {
    use lorag::kernels::gpu::{Input, MatvecParams, TILE};
    let Some(g) = gpu().await else { return };
    let mut rng = common::Rng(0x51);
    let sg_paths = paths(&g);
    for ty in [
        GgmlType::F32,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q6_K,
    ] {
        let (rows, cols) = (37, if ty == GgmlType::Q6_K { 256 } else { 96 });
        let w = random_rows(ty, 2 * rows, cols, &mut rng);
        let m = upload(&g, ty, &w, 2 * rows, cols, None);
        let norm_w = g.f32_buffer("norm", &rand_vec(&mut rng, cols, 1.5));
        for n in [1usize, 3, TILE as usize] {
            let step = g.uniform(&[0, n as u32, 0, 0]);
            let x = g.f32_buffer("x", &rand_vec(&mut rng, n * cols, 2.0));
            // On subgroups also with one-token rows split over them (the pair's halves split as the two
            // products are: the same bits).
            for (sg, split) in with_splits(&sg_paths, &[0, 1, 2]) {
                g.set_subgroups(sg);
                g.set_decode_rows(Some(split));
                let buf = |name| g.f32_buffer(name, &vec![0.0; n * rows]);
                let (gate, up, fused) = (buf("gate"), buf("up"), buf("fused"));
                let params = |pair, glu| MatvecParams {
                    in_stride: cols as u32,
                    out_stride: rows as u32,
                    scale: 1.0,
                    input: Input::RmsNorm { eps: 1e-5 },
                    glu,
                    pair,
                    ..Default::default()
                };
                let norm = Some(&norm_w);
                let mut two = g.matvec_dispatches_with(
                    &m.rows(0, rows),
                    &x,
                    &gate,
                    None,
                    norm,
                    None,
                    &step,
                    params(false, false),
                );
                two.extend(g.matvec_dispatches_with(
                    &m.rows(rows, rows),
                    &x,
                    &up,
                    None,
                    norm,
                    Some(&gate),
                    &step,
                    params(false, true),
                ));
                let want = g.run_and_read(&two, n as u32, &up, n * rows).await.unwrap();
                let one = g.matvec_dispatches_with(
                    &m,
                    &x,
                    &fused,
                    None,
                    norm,
                    None,
                    &step,
                    params(true, false),
                );
                assert_eq!(one.len(), 1);
                assert!(
                    one[0]
                        .label
                        .contains(&format!("2×{rows}×{cols} +norm +glu")),
                    "{}",
                    one[0].label
                );
                assert!(one[0].steps.has(TILE) && !one[0].steps.has(TILE + 1));
                let got = g
                    .run_and_read(&one, n as u32, &fused, n * rows)
                    .await
                    .unwrap();
                assert!(want.iter().any(|&v| v != 0.0));
                if let Some(i) = (0..n * rows).find(|&i| got[i].to_bits() != want[i].to_bits()) {
                    panic!(
                        "{} subgroups {sg} (split {split}) {n} tokens, token {} row {}: one launch {} vs two {}",
                        ty.name(),
                        i / rows,
                        i % rows,
                        got[i],
                        want[i]
                    );
                }
            }
        }
    }
}

async_test! {
    fn attention_chunks_added_up_in_the_output_projection_match_the_combining_launch() {
        combine_in_product().await
    }
}
/// Decoding's output projection reading attention's position chunks (`Input::Combine`: the products add them up
/// on the way in) against the combining launch (attention_combine.wgsl) and then the same product over its
/// output, bit for bit: the input values are computed with the combining kernel's operations in its order, and
/// the product's sum is the same either way. Chunk partials as attention leaves them (max scores, positive sums,
/// unnormalized values; empty chunks with max −3.4e38 and zero sums), 2 to 16 chunks (the combining launch
/// loads them in groups of 8: 9 and 16 cross one), heads of an odd size (13, F32) and of 24 and 64 (the quantized
/// formats' 32-element units), into a residual that already holds values; both product paths, one-token rows
/// split or not. The combining launch is itself held to an f64 reference below
/// (`attention_kernel_matches_the_reference`).
async fn combine_in_product() {
    use lorag::kernels::gpu::{combine_fits, Input, MatvecParams};
    let Some(g) = gpu().await else { return };
    let mut rng = common::Rng(0xc0);
    let sg_paths = paths(&g);
    for (ty, nh, hd) in [
        (GgmlType::F32, 5, 13),
        (GgmlType::Q4_1, 4, 24),
        (GgmlType::Q6_K, 4, 64),
    ] {
        let (rows, cols) = (37, nh * hd);
        let w = random_rows(ty, rows, cols, &mut rng);
        let m = upload(&g, ty, &w, rows, cols, None);
        let step = g.uniform(&[7, 1, 0, 0]);
        for nch in [2u32, 3, 9, 16] {
            assert!(combine_fits(nh, nch));
            let wd = hd + 2;
            let mut part = vec![0.0f32; nh * nch as usize * wd];
            for (i, p) in part.chunks_exact_mut(wd).enumerate() {
                // Chunk 1 of each head empty (as when the positions do not reach it), the rest filled.
                if i % nch as usize == 1 && nch > 2 {
                    p[0] = -3.4e38;
                    continue;
                }
                p[0] = rand_vec(&mut rng, 1, 3.0)[0];
                p[1] = 0.5 + rng.below(1000) as f32 / 200.0;
                p[2..].copy_from_slice(&rand_vec(&mut rng, hd, 2.0));
            }
            let pb = g.f32_buffer("partials", &part);
            let residual = rand_vec(&mut rng, rows, 1.0);
            for (sg, split) in with_splits(&sg_paths, &[0, 1, 4]) {
                g.set_subgroups(sg);
                g.set_decode_rows(Some(split));
                let params = |input| MatvecParams {
                    in_stride: cols as u32,
                    out_stride: rows as u32,
                    accumulate: true,
                    scale: 1.0,
                    input,
                    ..Default::default()
                };
                let att = g.f32_buffer("att", &vec![f32::NAN; cols]);
                let (y_two, y_one) = (
                    g.f32_buffer("y two", &residual),
                    g.f32_buffer("y one", &residual),
                );
                let p = g.uniform(&[nh as u32, hd as u32, nch, 0]);
                let mut two = vec![g.dispatch(
                    Kernel::AttentionCombine,
                    &[&pb, &att, &p],
                    Grid::TokensY(nh as u32),
                )];
                two.extend(g.matvec_dispatches(
                    &m,
                    &att,
                    &y_two,
                    None,
                    &step,
                    params(Input::Plain),
                ));
                let want = g.run_and_read(&two, 1, &y_two, rows).await.unwrap();
                let input = Input::Combine {
                    heads: nh as u32,
                    chunks: nch,
                };
                let one = g.matvec_dispatches(&m, &pb, &y_one, None, &step, params(input));
                assert_eq!(one.len(), 1);
                assert!(one[0].label.ends_with("+combine"), "{}", one[0].label);
                assert!(
                    one[0].steps.has(1) && !one[0].steps.has(2),
                    "one-token steps only"
                );
                let got = g.run_and_read(&one, 1, &y_one, rows).await.unwrap();
                assert!(want.iter().zip(&residual).any(|(a, b)| a != b));
                if let Some(r) = (0..rows).find(|&r| got[r].to_bits() != want[r].to_bits()) {
                    panic!(
                        "{} {nh} heads of {hd}, {nch} chunks, subgroups {sg} (split {split}), row {r}: \
                         combined in the product {} vs combining launch {}",
                        ty.name(),
                        got[r],
                        want[r]
                    );
                }
            }
        }
    }
}

async_test! {
    fn unsupported_formats_and_bad_shapes_are_errors() {
        bad_uploads().await
    }
}
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

/// The model on a GPU of its own (software adapters included), or `None` where there is legitimately none.
async fn on_gpu(bytes: Vec<u8>) -> Option<Model> {
    let g = gpu().await?;
    let mut m = Model::from_bytes(bytes).unwrap();
    let sg = g.info.subgroups;
    let r = m.attach_gpu(g).unwrap();
    assert_eq!(r.kind, "gpu");
    // The report says whether the products use subgroups: by default wherever the adapter has them.
    assert_eq!(r.subgroups, sg, "{r:?}");
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
/// submission and creates no buffer. Three variants: q, k and v of one type (one product per layer), layer 1's v
/// in F16 (that layer's three products write into the same buffer as the fused one's), and the Qwen2 form with
/// q, k and v biases (the fused product adds the three as one).
async fn tiny_decoder() {
    let f16_v = |_: &mut _, t: &mut common::tiny::Tensors| {
        let v = t.iter_mut().find(|x| x.0 == "blk.1.attn_v.weight").unwrap();
        v.2 = GgmlType::F16;
    };
    let bias = |name: &str, i: usize| ((i * 7 + name.len()) % 13) as f32 / 20.0 - 0.3;
    let variants = [
        ("llama", common::tiny::tiny(|_, _| {}), [true, true]),
        (
            "llama, layer 1's v in F16",
            common::tiny::tiny(f16_v),
            [true, false],
        ),
        (
            "qwen2 (q, k, v biases)",
            common::tiny::tiny_as_qwen2(bias),
            [true, true],
        ),
    ];
    for (i, (variant, bytes, fused)) in variants.into_iter().enumerate() {
        tiny_variant(variant, bytes, fused, i == 0).await;
    }
}

/// `without_adapter`: also run without the adapter (the variants after the first run only with it: the base
/// products are the same launches either way, the adapter adds its own writing at q's, k's and v's offsets).
async fn tiny_variant(variant: &str, bytes: Vec<u8>, fused: [bool; 2], without_adapter: bool) {
    let Some(mut m) = on_gpu(bytes).await else {
        return;
    };
    assert_eq!(
        m.weights.layers[1].wv.ty,
        if fused[1] {
            GgmlType::F32
        } else {
            GgmlType::F16
        },
        "{variant}"
    );
    let all = lorag::llm::Target::ALL;
    let a = common::tiny::random_adapter(&m.weights, &all, 3, 5, 1.0 / 3.0, 0.7);
    m.add_adapter("all", a).unwrap();
    let prompt: Vec<u32> = (0..11).map(|i| (i * 37 % 256) as u32).collect();
    let configs = [vec![], vec![("all", 1.0f32)]];
    for adapters in &configs[!without_adapter as usize..] {
        let uses: Vec<lorag::llm::AdapterUse> = adapters
            .iter()
            .map(|&(n, w)| lorag::llm::AdapterUse {
                name: n.into(),
                weight: w,
            })
            .collect();
        let lora = m.active_adapters(&uses).unwrap();
        // Steps of at most 4 tokens (matvec.wgsl's tiled pipeline for the prompt), and of 16 (the prompt in one
        // step of 11: matmul.wgsl, with the biases, the residual adds and the adapters' scaled products).
        // Attention split into 3 position chunks with the first (in steps of up to TILE tokens: the prompt in
        // steps of 4, with one combining launch more per layer, then decoding, where the output projection adds
        // the chunks up), unsplit with the second.
        for (batch, chunks) in [(4, 3), (16, 1)] {
            let b = m.gpu().unwrap();
            b.gpu.set_attention_chunks(Some(chunks));
            let mut s =
                GpuSession::new(&b.gpu, b.weights(), &m.weights, m.bytes(), 16, batch, &lora)
                    .unwrap();
            let mut cache = m.new_cache(16).unwrap();
            // Per layer 6 launches where q, k and v are one product, else 8 (the norms and SwiGLU run inside the
            // products, RoPE inside attention), the final norm and the output projection; two more per adapted
            // matrix (2 layers × 7). Without adapters, steps of up to TILE tokens run gate and up as one launch.
            let n_layer = m.weights.layers.len();
            let per_layer: usize = fused.iter().map(|&f| if f { 6 } else { 8 }).sum();
            let long = per_layer + 2 + 2 * 7 * n_layer * adapters.len();
            let pairs = if adapters.is_empty() { n_layer } else { 0 };
            // Split, steps of 2..=TILE tokens add a combining launch per layer; one-token steps add the chunks
            // up inside the output projection (its adapter's first product too).
            let split = if chunks > 1 { n_layer } else { 0 };
            assert_eq!(s.launches(16), long, "{variant}");
            assert_eq!(s.launches(1), long - pairs, "{variant}");
            assert_eq!(s.launches(4), long - pairs + split, "{variant}");
            let gpu_logits = s.forward(&prompt).await.unwrap();
            let cpu_logits = m.forward_with(&mut cache, &prompt, false, &lora).unwrap();
            close(
                &gpu_logits,
                &cpu_logits,
                &format!("{variant}: prompt, {chunks} chunks"),
            );
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
                close(
                    &g,
                    &c,
                    &format!("{variant}: decode {t} with {adapters:?}, {chunks} chunks"),
                );
            }
            assert!(s.forward(&[1, 2]).await.is_err(), "context of 16 is full");
            b.gpu.set_attention_chunks(None);
        }
    }
}
async_test! {
    fn the_tiny_decoder_on_the_gpu_matches_the_cpu() {
        tiny_decoder().await
    }
}

/// Per-launch profiling (native: timestamps inside passes, which Vulkan adapters, lavapipe included, offer): a
/// prompt step of 11 tokens and a decoding step of the tiny llama, every launch timed once under what it
/// computed, the output pass recorded inside `run`'s tail included; turning it off stops the timing.
#[cfg(not(target_arch = "wasm32"))]
#[test]
fn a_profile_times_every_launch_by_what_it_computed() {
    lorag::kernels::block_on(async {
        let Some(m) = on_gpu(common::tiny::tiny(|_, _| {})).await else {
            return;
        };
        let b = m.gpu().unwrap();
        if !b.gpu.set_profiling(true) {
            assert!(
                std::env::var_os("LORAG_REQUIRE_GPU").is_none() || b.gpu.info.backend != "Vulkan",
                "Vulkan adapters have timestamps inside passes"
            );
            return;
        }
        let mut s =
            GpuSession::new(&b.gpu, b.weights(), &m.weights, m.bytes(), 16, 16, &[]).unwrap();
        let prompt: Vec<u32> = (0..11).map(|i| (i * 37 % 256) as u32).collect();
        s.forward(&prompt).await.unwrap();
        s.forward(&[3]).await.unwrap();
        let p = b.gpu.profile();
        let n_layer = m.weights.layers.len();
        let count = |f: &dyn Fn(&str) -> bool| -> usize {
            p.iter().filter(|k| f(&k.label)).map(|k| k.launches).sum()
        };
        assert_eq!(count(&|_| true), s.launches(11) + s.launches(1), "{p:#?}");
        assert_eq!(count(&|l| l == "attention"), 2 * n_layer);
        assert_eq!(
            count(&|l| l == "rmsnorm"),
            2,
            "the final norm, once per step"
        );
        // The prompt's 5 products per layer (q, k and v in one) take the matrix-matrix kernel, the decoding
        // step's 4 the matvec one (gate and up in one launch of row pairs); the output projection runs for one
        // token in both.
        assert_eq!(count(&|l| l.starts_with("matmul ")), 5 * n_layer);
        assert_eq!(count(&|l| l.starts_with("matvec ")), 4 * n_layer + 2);
        // Labels name the fusions: qkv (one product) and the gate/up pair read the normalized input, the pair
        // finishes with SwiGLU; in the prompt, gate and up are two products, up finishing with SwiGLU.
        let norm = count(&|l| l.starts_with("matvec ") && l.contains(" +norm"));
        let glu =
            count(&|l| l.starts_with("matvec ") && l.contains(" 2×") && l.ends_with(" +norm +glu"));
        assert_eq!((norm, glu), (2 * n_layer, n_layer), "{p:#?}");
        let glu = count(&|l| l.starts_with("matmul ") && l.ends_with(" +norm +glu"));
        assert_eq!(glu, n_layer, "{p:#?}");
        assert!(p.iter().all(|k| k.ns >= 0.0) && p.iter().any(|k| k.ns > 0.0));
        assert!(b.gpu.profile().is_empty(), "reading resets");
        b.gpu.set_profiling(false);
        s.forward(&[4]).await.unwrap();
        assert!(b.gpu.profile().is_empty(), "off: nothing timed");
    })
}

/// Read when the test runs (`common::asset`), not compiled in.
const SMOLLM: &str = "models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf";

/// SmolLM2 on the GPU: the reference prompts' greedy tokens, and top-5 logits within 0.05 of the float64
/// reference (the same bound as the CPU path). Natively as a GPU decodes it (software adapters split neither by
/// default): attention split into the 4 position chunks a GPU uses for 9 heads, one-token products' rows split
/// over subgroups (one row a workgroup).
async fn smollm_reference() {
    use common::reference::ids;
    let Some(m) = on_gpu(common::asset(SMOLLM).await).await else {
        return;
    };
    // In the browser (SwiftShader, one chunk by default) unsplit: the split costs it a minute, and the attention
    // and tiny decoder tests run it there.
    let browser = cfg!(target_arch = "wasm32");
    if !browser {
        let g = &m.gpu().unwrap().gpu;
        g.set_attention_chunks(Some(4));
        g.set_decode_rows(Some(1));
        assert_eq!(
            g.decode_rows(),
            Some(1),
            "lavapipe's workgroups hold four subgroups"
        );
    }
    // In the browser (SwiftShader runs WebGPU on the CPU, slowly) the raw prompt only; natively both.
    for c in common::reference::cases()
        .iter()
        .filter(|c| c["lora"] == false && !(browser && c["case"] == "chat_base"))
    {
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
async_test! {
    fn smollm2_on_the_gpu_gives_the_reference_tokens() {
        smollm_reference().await
    }
}

/// Faults: a kernel that does not compile is an error naming it; a device lost mid-conversation fails that
/// request with `Error::Device`, and the next request runs (on the CPU) and gives the CPU's tokens. The request
/// is longer than a greedy submission (8 tokens), so the GPU is used again after the loss.
async fn faults() {
    let Some(g) = gpu().await else { return };
    let e = g.compile("broken", "fn main( {").await.unwrap_err();
    assert!(matches!(e, Error::Device(_)), "{e}");
    assert!(e.to_string().contains("kernel broken"), "{e}");
    drop(g);
    let Some(mut m) = on_gpu(common::tiny::tiny(|_, _| {})).await else {
        return;
    };
    let prompt: Vec<u32> = (0..6).map(|i| (i * 41 % 256) as u32).collect();
    let opts = GenerateOptions {
        max_tokens: 12,
        sampler: SamplerConfig::greedy(),
        ..Default::default()
    };
    let want = m.generate(&prompt, &opts, &mut |_| true).unwrap();
    let on_gpu_out = m
        .generate_async(&prompt, &opts, &mut |_| true)
        .await
        .unwrap();
    assert_eq!(on_gpu_out.ids, want.ids);
    let b = m.gpu().unwrap();
    let mut lost_midway = |ev: &lorag::llm::TokenEvent| {
        if ev.index == 1 {
            b.gpu.device.destroy();
        }
        true
    };
    let e = m
        .generate_async(&prompt, &opts, &mut lost_midway)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Device(_)), "{e}");
    let after = m
        .generate_async(&prompt, &opts, &mut |_| true)
        .await
        .unwrap();
    assert_eq!(after.ids, want.ids);
    assert_eq!(
        m.device().kind,
        "gpu",
        "the lost device is still attached until use_device"
    );
    let (name, software) = {
        let i = &m.gpu().unwrap().gpu.info;
        (i.name.clone(), i.software)
    };
    let r = m.use_device(DevicePref::Cpu).await.unwrap();
    assert_eq!(r.kind, "cpu");
    // `auto` declines a software adapter (slower than the CPU path), saying so: natively lavapipe (llvmpipe, its
    // device type CPU), in Chromium SwiftShader (which the browser flags as its fallback adapter, nameless). A
    // hardware GPU it takes.
    assert!(software || !name.contains("llvmpipe"), "{name}");
    let r = m.use_device(DevicePref::Auto).await.unwrap();
    if software {
        assert_eq!(r.kind, "cpu", "{r:?}");
        let notice = r.notice.clone().unwrap_or_default();
        assert!(
            notice.contains("software") && notice.contains(&name),
            "{r:?}"
        );
    } else {
        assert_eq!(r.kind, "gpu", "{r:?}");
    }
    // Heads wider than the attention kernel holds (264 > 256 values): the request fails and says why.
    let hd = lorag::kernels::gpu::MAX_HEAD_DIM + 8;
    let (q, kv) = (4 * hd as u64, 2 * hd as u64);
    let wide = common::tiny::tiny(|w, t| {
        w.u32("llama.attention.key_length", hd as u32)
            .u32("llama.attention.value_length", hd as u32);
        for (name, dims, _) in t.iter_mut() {
            if name.ends_with("attn_q.weight") {
                *dims = vec![32, q];
            } else if name.ends_with("attn_k.weight") || name.ends_with("attn_v.weight") {
                *dims = vec![32, kv];
            } else if name.ends_with("attn_output.weight") {
                *dims = vec![q, 32];
            }
        }
    });
    let Some(m) = on_gpu(wide).await else {
        return;
    };
    m.generate(&prompt, &opts, &mut |_| true).unwrap(); // the CPU runs it
    let e = m
        .generate_async(&prompt, &opts, &mut |_| true)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Device(d) if d.contains(&format!("head size {hd}"))),
        "{e}"
    );
}
async_test! {
    fn faults_are_typed_errors_and_a_lost_device_falls_back() {
        faults().await
    }
}

// ---- The element-wise and attention kernels, one by one, against f64 references ----

use lorag::kernels::gpu::{attention_partials, Grid, Kernel};

const U: f64 = 1.0 / (1u64 << 24) as f64; // f32 unit roundoff

fn rand_vec(rng: &mut common::Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.below(2001) as f32 - 1000.0) / 1000.0 * scale)
        .collect()
}

/// Run one launch for a step of `n` tokens at `pos0`, then read `out` back.
#[allow(clippy::too_many_arguments)]
async fn launch(
    g: &Gpu,
    kernel: Kernel,
    buffers: &[&wgpu::Buffer],
    step: &wgpu::Buffer,
    grid: Grid,
    pos0: u32,
    n: u32,
    out: &wgpu::Buffer,
    len: usize,
) -> Vec<f32> {
    let words: Vec<u8> = [pos0, n, 0, 0]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    g.queue.write_buffer(step, 0, &words);
    let d = g.dispatch(kernel, buffers, grid);
    g.run_and_read(&[d], n, out, len).await.unwrap()
}

/// RMSNorm over 3 tokens of widths 45 and 300 (fewer and more than the 256 invocations). The mean of squares sums
/// d terms (relative error ≤ d·u), the square root and division add a few ulps, the two products two more: the
/// output's relative error is at most (d/2 + 8)·u.
async fn rmsnorm() {
    let Some(g) = gpu().await else { return };
    let mut rng = common::Rng(21);
    for d in [45usize, 300] {
        let n = 3;
        let x = rand_vec(&mut rng, n * d, 2.0);
        let w = rand_vec(&mut rng, d, 1.5);
        let eps = 1e-5f32;
        let (xb, wb) = (g.f32_buffer("x", &x), g.f32_buffer("w", &w));
        let y = g.f32_buffer("y", &vec![0.0; n * d]);
        let p = g.uniform(&[d as u32, 0, eps.to_bits(), 0]);
        let step = g.uniform(&[0, 0, 0, 0]);
        let got = launch(
            &g,
            Kernel::RmsNorm,
            &[&xb, &wb, &y, &p, &step],
            &step,
            Grid::TokensX,
            0,
            n as u32,
            &y,
            n * d,
        )
        .await;
        for t in 0..n {
            let xs = &x[t * d..(t + 1) * d];
            let ms = xs.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
            let s = 1.0 / (ms + eps as f64).sqrt();
            for i in 0..d {
                let want = xs[i] as f64 * s * w[i] as f64;
                let tol = (d as f64 / 2.0 + 8.0) * U * want.abs() + 1e-30;
                let v = got[t * d + i] as f64;
                assert!(
                    (v - want).abs() <= tol,
                    "rmsnorm d={d} t={t} i={i}: {v} vs {want}"
                );
            }
        }
        // `last`: only the step's last token, into row 0.
        let p = g.uniform(&[d as u32, 1, eps.to_bits(), 0]);
        let y2 = g.f32_buffer("y2", &vec![0.0; d]);
        let last = launch(
            &g,
            Kernel::RmsNorm,
            &[&xb, &wb, &y2, &p, &step],
            &step,
            Grid::One,
            0,
            n as u32,
            &y2,
            d,
        )
        .await;
        assert_eq!(&last[..], &got[(n - 1) * d..]);
    }
}
async_test! {
    fn rmsnorm_kernel_matches_the_reference() {
        rmsnorm().await
    }
}

/// SwiGLU on 3 tokens × 50: g/(1 + e^−g)·u. WGSL's exp is within (3 + 2|g|) ulps; the addition, division and
/// product add three roundings.
async fn swiglu() {
    let Some(g) = gpu().await else { return };
    let mut rng = common::Rng(22);
    let (n, per) = (3usize, 50usize);
    let gv = rand_vec(&mut rng, n * per, 6.0);
    let uv = rand_vec(&mut rng, n * per, 2.0);
    let (gb, ub) = (g.f32_buffer("g", &gv), g.f32_buffer("u", &uv));
    let p = g.uniform(&[per as u32, 0, 0, 0]);
    let step = g.uniform(&[0, 0, 0, 0]);
    let got = launch(
        &g,
        Kernel::SwiGlu,
        &[&gb, &ub, &p, &step],
        &step,
        Grid::Flat(per as u32),
        0,
        n as u32,
        &gb,
        n * per,
    )
    .await;
    for i in 0..n * per {
        let (x, u) = (gv[i] as f64, uv[i] as f64);
        let want = x / (1.0 + (-x).exp()) * u;
        let tol = (8.0 + 2.0 * x.abs()) * 2.0 * U * want.abs() + 1e-30;
        assert!(
            (got[i] as f64 - want).abs() <= tol,
            "swiglu {i}: {} vs {want}",
            got[i]
        );
    }
}
async_test! {
    fn swiglu_kernel_matches_the_reference() {
        swiglu().await
    }
}

/// RoPE and causal attention in one launch: 3 tokens at positions 6..9 over layer 1 of a 2-layer cache of 20
/// positions, 4 query heads sharing 2 KV heads of 10 dims of which 8 rotate (partial rotary), pairs and NeoX
/// halves. Positions before 6 come from the cache; the step's q and k are rotated in the kernel: a rotated value
/// is x0·c − x1·s (or x0·s + x1·c), two products and a sum, so within 2u·(|x0·c| + |x1·s|) (3u with a fused
/// multiply-add). Each score is a 10-term dot product of such values: its error δ is at most
/// scale·(10u·Σ|q·k| + Σ(|q|·ε_k + |k|·ε_q + ε_q·ε_k)) (ε: the rotations' bounds); softmax weights then err by at
/// most 2δ_max relative plus a few ulps for exp and the division, and the output sums len terms: the bound is
/// Σ p_j|v_j| · (4δ_max + (len + 10)·u). The step's rotated k and its v land in the cache at their positions
/// (within the rotation bound; v exactly), and nothing else there changes (the slots after the step hold NaN
/// the kernel must neither read nor touch).
///
/// Split over nch position chunks (decoding; 1: unsplit, as prefill runs), each chunk's exponentials are
/// exp(s − m_c) and the combining launch scales them by exp(m_c − M): (s − m_c) + (m_c − M) = s − M, so the
/// arguments' rounding is what one exp(s − M) has, and the products add a few ulps; a chunk's sums take at most
/// len terms and the combination nch more, with one division at the end: the bound above with len + nch terms.
/// The partials buffer starts as NaN: a chunk that failed to write its part would show.
async fn attention() {
    let Some(g) = gpu().await else { return };
    let mut rng = common::Rng(24);
    // The small case, then a long context with SmolLM2's head size (the kernel's value sums split the positions
    // among 4 groups of 64 invocations, 4 running sums each: this reaches their unrolled loop and its tail).
    // Both workgroup sizes (64: CPU adapters' default, 256: GPUs').
    for (wg, (n, nh, nkv, hd, half, n_ctx, pos0)) in [64, 256].into_iter().flat_map(|wg| {
        [
            (3usize, 4usize, 2usize, 10usize, 4usize, 20usize, 6usize),
            (2, 3, 1, 64, 32, 340, 333),
        ]
        .map(|c| (wg, c))
    }) {
        g.set_attention_workgroup(Some(wg));
        let kv_dim = nkv * hd;
        let cache_off = n_ctx * kv_dim; // layer 1 of 2
        let scale = 1.0 / (hd as f32).sqrt();
        let mut cs = Vec::new();
        for p in 0..n_ctx {
            for i in 0..half {
                let a = p as f64 * 10000f64.powf(-(2.0 * i as f64) / (2 * half) as f64);
                cs.extend([a.cos() as f32, a.sin() as f32]);
            }
        }
        // Unsplit, and split into 5 (chunks across the cached and own positions) or 16 (the small case's
        // later chunks empty).
        for (neox, nch) in [1u32, 5, 16]
            .into_iter()
            .flat_map(|c| [(false, c), (true, c)])
        {
            let q = rand_vec(&mut rng, n * nh * hd, 1.5);
            let k = rand_vec(&mut rng, n * kv_dim, 1.5);
            let v = rand_vec(&mut rng, n * kv_dim, 1.0);
            // The caches of layers 0 and 1: v by position ([pos][kv head][dim]), k by dim ([kv head][dim][pos]);
            // layer 1's slots from pos0 on hold NaN (nothing may read them).
            let vi = |j: usize, kvh: usize, d: usize| cache_off + j * kv_dim + kvh * hd + d;
            let ki = |j: usize, kvh: usize, d: usize| cache_off + (kvh * hd + d) * n_ctx + j;
            let mut kc = rand_vec(&mut rng, 2 * cache_off, 1.5);
            let mut vc = rand_vec(&mut rng, 2 * cache_off, 1.0);
            for (j, kvh, d) in (pos0..n_ctx)
                .flat_map(|j| (0..nkv).flat_map(move |kvh| (0..hd).map(move |d| (j, kvh, d))))
            {
                kc[ki(j, kvh, d)] = f32::NAN;
                vc[vi(j, kvh, d)] = f32::NAN;
            }
            // The kernel reads token t's q, k and v from one buffer: [q | k | v] per token.
            let qkv: Vec<f32> = (0..n)
                .flat_map(|t| {
                    let (qt, kt) = (
                        &q[t * nh * hd..(t + 1) * nh * hd],
                        &k[t * kv_dim..(t + 1) * kv_dim],
                    );
                    qt.iter()
                        .chain(kt)
                        .chain(&v[t * kv_dim..(t + 1) * kv_dim])
                        .copied()
                })
                .collect();
            let qkvb = g.f32_buffer("qkv", &qkv);
            let (kcb, vcb) = (g.f32_buffer("kc", &kc), g.f32_buffer("vc", &vc));
            let csb = g.f32_buffer("cs", &cs);
            let sb = g.f32_buffer("scores", &vec![0.0; n * nh * n_ctx]);
            let ob = g.f32_buffer("out", &vec![0.0; n * nh * hd]);
            let p = g.uniform(&[
                nh as u32,
                nkv as u32,
                hd as u32,
                n_ctx as u32,
                cache_off as u32,
                scale.to_bits(),
                half as u32,
                neox as u32,
            ]);
            let step = g.uniform(&[0, 0, 0, 0]);
            let words: Vec<u8> = [pos0 as u32, n as u32, 0, 0]
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect();
            g.queue.write_buffer(&step, 0, &words);
            let partials = vec![f32::NAN; attention_partials(nch, nh, hd)];
            let pb = g.f32_buffer("partials", &partials);
            let ds = g.attention(
                [&qkvb, &kcb, &vcb, &csb, &sb, &ob, &p, &step],
                &pb,
                nh,
                hd,
                nch,
            );
            assert_eq!(ds.len(), if nch > 1 { 2 } else { 1 }, "launches");
            let got = g
                .run_and_read(&ds, n as u32, &ob, n * nh * hd)
                .await
                .unwrap();
            let gk = g.run_and_read(&[], 0, &kcb, 2 * cache_off).await.unwrap();
            let gv = g.run_and_read(&[], 0, &vcb, 2 * cache_off).await.unwrap();
            // A head's vector rotated for position pos: (value, bound) per dim.
            let rot = |x: &[f32], pos: usize| -> Vec<(f64, f64)> {
                let mut out: Vec<(f64, f64)> = x.iter().map(|&v| (v as f64, 0.0)).collect();
                for i in 0..half {
                    let (a, b) = if neox {
                        (i, i + half)
                    } else {
                        (2 * i, 2 * i + 1)
                    };
                    let c = cs[(pos * half + i) * 2] as f64;
                    let s = cs[(pos * half + i) * 2 + 1] as f64;
                    let (x0, x1) = (x[a] as f64, x[b] as f64);
                    out[a] = (x0 * c - x1 * s, 3.0 * U * ((x0 * c).abs() + (x1 * s).abs()));
                    out[b] = (x0 * s + x1 * c, 3.0 * U * ((x0 * s).abs() + (x1 * c).abs()));
                }
                out
            };
            // Key j of KV head kvh: from the cache before pos0 (exact), else the step's k rotated.
            let key = |j: usize, kvh: usize| -> Vec<(f64, f64)> {
                if j < pos0 {
                    (0..hd).map(|d| (kc[ki(j, kvh, d)] as f64, 0.0)).collect()
                } else {
                    let o = (j - pos0) * kv_dim + kvh * hd;
                    rot(&k[o..o + hd], j)
                }
            };
            let value = |j: usize, kvh: usize, d: usize| -> f64 {
                if j < pos0 {
                    vc[vi(j, kvh, d)] as f64
                } else {
                    v[(j - pos0) * kv_dim + kvh * hd + d] as f64
                }
            };
            for t in 0..n {
                let len = pos0 + t + 1;
                for h in 0..nh {
                    let kvh = h / (nh / nkv);
                    let o = t * nh * hd + h * hd;
                    let qv = rot(&q[o..o + hd], pos0 + t);
                    let mut s = Vec::new();
                    let mut dmax = 0f64;
                    for j in 0..len {
                        let kj = key(j, kvh);
                        let (mut dot, mut err) = (0.0, 0.0);
                        for (&(a, ea), &(b, eb)) in qv.iter().zip(&kj) {
                            dot += a * b;
                            err += hd as f64 * U * (a * b).abs()
                                + a.abs() * eb
                                + b.abs() * ea
                                + ea * eb;
                        }
                        dmax = dmax.max(err * scale as f64);
                        s.push(dot * scale as f64);
                    }
                    let m = s.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for d in 0..hd {
                        let mut want = 0.0;
                        let mut mag = 0.0;
                        for (j, ej) in e.iter().enumerate() {
                            let vj = value(j, kvh, d);
                            want += ej / sum * vj;
                            mag += ej / sum * vj.abs();
                        }
                        let tol = mag * (4.0 * dmax + (len as f64 + nch as f64 + 10.0) * U);
                        let got = got[o + d] as f64;
                        assert!(
                            (got - want).abs() <= tol,
                            "attention (workgroup {wg}, {nch} chunks) t{t} h{h} d{d} neox {neox}: {got} vs {want} (tol {tol})"
                        );
                    }
                }
                for kvh in 0..nkv {
                    let src = t * kv_dim + kvh * hd;
                    let j = pos0 + t;
                    for (d, (want, tol)) in rot(&k[src..src + hd], j).into_iter().enumerate() {
                        assert!(
                            (gk[ki(j, kvh, d)] as f64 - want).abs() <= tol,
                            "cached k t{t} kv head {kvh} d{d} neox {neox}"
                        );
                        assert_eq!(gv[vi(j, kvh, d)], v[src + d], "cached v t{t} d{d}");
                    }
                }
            }
            // Nothing else written: every other slot keeps its bits.
            let mut written_v = vec![false; 2 * cache_off];
            let mut written_k = written_v.clone();
            for (j, kvh, d) in (pos0..pos0 + n)
                .flat_map(|j| (0..nkv).flat_map(move |kvh| (0..hd).map(move |d| (j, kvh, d))))
            {
                written_v[vi(j, kvh, d)] = true;
                written_k[ki(j, kvh, d)] = true;
            }
            for i in 0..2 * cache_off {
                if !written_k[i] {
                    assert_eq!(gk[i].to_bits(), kc[i].to_bits(), "k cache slot {i} touched");
                }
                if !written_v[i] {
                    assert_eq!(gv[i].to_bits(), vc[i].to_bits(), "v cache slot {i} touched");
                }
            }
        }
    }
    g.set_attention_workgroup(None);
}
async_test! {
    fn attention_kernel_matches_the_reference() {
        attention().await
    }
}

// ---- Training's products on the GPU ----

/// `Wᵀ·dy` (matvec_t.wgsl, training's backward pass through a frozen matrix) for every format, awkward shapes
/// (11 tokens: a full tile of 8 and a partial one; rows and float columns off every multiple), whole and split
/// into row chunks, against an f64 sum over the reference's dequantized weights. The shader decodes weights
/// bit-identical to the reference's, so the only error is its f32 sum over `rows` terms: at most
/// (rows−1)·u·Σ|dy·w| (u = 2⁻²⁴) per chunk, and the chunks' partial sums add one rounding each. `rows·ε·Σ|dy·w|`
/// (ε = 2u) bounds both with room; a wrongly decoded weight is off by a whole term.
async fn check_matvec_t(g: &Gpu, cap: Option<usize>) {
    let mut rng = common::Rng(0x51ed_270b);
    for ty in TYPES {
        let cols = match ty {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 77,
            t if t.block_len() == 256 => 512,
            _ => 96,
        };
        let (rows, n) = (37, 11);
        let w = random_rows(ty, rows, cols, &mut rng);
        let dy: Vec<f32> = (0..n * rows)
            .map(|_| (rng.below(2001) as f32 - 1000.0) / 1000.0)
            .collect();
        let m = upload(g, ty, &w, rows, cols, cap);
        let got = g.matvec_t(&m, &dy, n).await.unwrap();
        assert_transposed(&got, &[(ty, &w, rows, &dy)], n, cols, ty.name());
        // A view of rows 5..33 (starting inside a chunk; crossing chunks when split).
        let (r0, k) = (5, rows - 9);
        let rb = ty.row_bytes(cols).unwrap();
        let dyv: Vec<f32> = (0..n)
            .flat_map(|t| dy[t * rows + r0..t * rows + r0 + k].iter().copied())
            .collect();
        let got = g.matvec_t(&m.rows(r0, k), &dyv, n).await.unwrap();
        let what = format!("{} rows {r0}..{} as a view", ty.name(), r0 + k);
        assert_transposed(
            &got,
            &[(ty, &w[r0 * rb..(r0 + k) * rb], k, &dyv)],
            n,
            cols,
            &what,
        );
    }
}

/// `got` (n × cols) against `Σ dyᵀ·W` over `mats` ((type, bytes, rows, dy) each, dy n × rows) summed in f64 over
/// the reference's dequantized weights, within (all rows)·ε·Σ|dy·w|.
fn assert_transposed(
    got: &[f32],
    mats: &[(GgmlType, &[u8], usize, &[f32])],
    n: usize,
    cols: usize,
    what: &str,
) {
    let deq: Vec<Vec<f32>> = mats
        .iter()
        .map(|&(ty, w, rows, _)| {
            let rb = ty.row_bytes(cols).unwrap();
            let mut d = vec![0.0f32; rows * cols];
            for r in 0..rows {
                quant::dequantize_row_ref(
                    ty,
                    &w[r * rb..(r + 1) * rb],
                    &mut d[r * cols..(r + 1) * cols],
                );
            }
            d
        })
        .collect();
    let all_rows: usize = mats.iter().map(|m| m.2).sum();
    for t in 0..n {
        for c in 0..cols {
            let (mut want, mut mag) = (0.0f64, 0.0f64);
            for (&(_, _, rows, dy), d) in mats.iter().zip(&deq) {
                for r in 0..rows {
                    let term = dy[t * rows + r] as f64 * d[r * cols + c] as f64;
                    want += term;
                    mag += term.abs();
                }
            }
            let tol = all_rows as f64 * f32::EPSILON as f64 * mag;
            let v = got[t * cols + c] as f64;
            assert!(
                (v - want).abs() <= tol,
                "{what} token {t} column {c}: GPU {v} vs reference {want} (tolerance {tol})"
            );
        }
    }
}

async_test! {
    fn transposed_matvec_matches_the_reference_for_every_format() {
        matvec_t_every_format().await
    }
}
async fn matvec_t_every_format() {
    let Some(g) = gpu().await else { return };
    check_matvec_t(&g, None).await;
    check_matvec_t(&g, Some(1024)).await;
    let m = g.upload_matrix(GgmlType::Q8_0, &[0; 34], 1, 32).unwrap();
    let e = g.matvec_t(&m, &[0.0; 2], 1).await.unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e}");
    // Several matrices of one width in one round trip (training's q, k, v and gate, up): the products are the
    // single products' bits; the transposed sum is within the f64 bound over all their rows.
    let mut rng = common::Rng(77);
    let (cols, n) = (256, 5);
    let shapes = [
        (GgmlType::Q8_0, 37),
        (GgmlType::Q4_K, 12),
        (GgmlType::F16, 20),
    ];
    let bytes: Vec<Vec<u8>> = shapes
        .iter()
        .map(|&(ty, rows)| random_rows(ty, rows, cols, &mut rng))
        .collect();
    let ms: Vec<_> = shapes
        .iter()
        .zip(&bytes)
        .map(|(&(ty, rows), b)| g.upload_matrix(ty, b, rows, cols).unwrap())
        .collect();
    let refs: Vec<_> = ms.iter().collect();
    let xs: Vec<f32> = (0..n * cols)
        .map(|_| (rng.below(2001) as f32 - 1000.0) / 1000.0)
        .collect();
    let many = g.matvec_many(&refs, &xs, n).await.unwrap();
    for (m, got) in ms.iter().zip(&many) {
        assert_eq!(got, &g.matvec(m, &xs, n).await.unwrap());
    }
    let dys: Vec<Vec<f32>> = shapes
        .iter()
        .map(|&(_, rows)| {
            (0..n * rows)
                .map(|_| (rng.below(2001) as f32 - 1000.0) / 1000.0)
                .collect()
        })
        .collect();
    let items: Vec<_> = ms.iter().zip(&dys).map(|(m, dy)| (m, &dy[..])).collect();
    let sum = g.matvec_t_many(&items, n).await.unwrap();
    let mats: Vec<_> = shapes
        .iter()
        .zip(&bytes)
        .zip(&dys)
        .map(|((&(ty, rows), b), dy)| (ty, &b[..], rows, &dy[..]))
        .collect();
    assert_transposed(&sum, &mats, n, cols, "sum");
    // Activation buffers over the binding limit go in token slices: forced here with a 1 kB cap (one token a
    // call); every token's sums are the same, so are the bits.
    g.limit_activation_buffers(1000);
    let before = g.counters.submissions.load(Ordering::Relaxed);
    assert_eq!(g.matvec_many(&refs, &xs, n).await.unwrap(), many);
    assert_eq!(g.matvec_t_many(&items, n).await.unwrap(), sum);
    assert_eq!(
        g.counters.submissions.load(Ordering::Relaxed) - before,
        2 * n
    );
    g.limit_activation_buffers(0);
    let short = [(&ms[0], &dys[0][..]), (&ms[1], &dys[0][..])];
    assert!(matches!(
        g.matvec_t_many(&short, n).await,
        Err(Error::Config(_))
    ));
}

/// Training with the frozen products on the GPU (the tiny llama, adapters on all seven projections, random B so
/// every gradient is non-zero): the loss and every adapter gradient against the CPU's, then two optimizer steps
/// of a `Trainer` on each. The GPU sums each product in another order (the matvec kernels' bounds above, about
/// 1e-6 relative here) and that propagates through two layers and back, as in the decoder test: the loss is
/// held to 1e-5 relative and each gradient matrix to 1e-4 of its largest component. Every product ran on the
/// GPU, a layer's products of one input (q, k, v; gate, up) in one submission.
async fn train_on_gpu() {
    use lorag::llm::train::{
        loss_and_grad, loss_and_grad_on, parse_examples, LoraConfig, LoraParams, Rng, Sequence,
        TrainConfig, Trainer,
    };
    use lorag::llm::Target;
    let bytes = common::tiny::tiny(|_, _| {});
    let cpu = Model::from_bytes(bytes.clone()).unwrap();
    let Some(gm) = on_gpu(bytes).await else {
        return;
    };
    let lora = LoraConfig {
        rank: 4,
        targets: Target::ALL.to_vec(),
        ..Default::default()
    };
    let mut p = LoraParams::init(&cpu.weights, &lora).unwrap();
    let mut rng = Rng::new(3);
    for m in &mut p.mats {
        m.m.bt.iter_mut().for_each(|b| *b = rng.uniform() - 0.5);
    }
    let n_vocab = cpu.config().n_vocab;
    let seq = Sequence {
        ids: (0..13).map(|i| ((i * 53 + 7) % n_vocab) as u32).collect(),
        loss: (0..12).map(|t| t >= 3).collect(),
    };
    let (mut pc, mut pg) = (p.clone(), p.clone());
    let (lc, kc) = loss_and_grad(&cpu.weights, cpu.bytes(), &mut pc, &seq, true, None).unwrap();
    let before = gm
        .gpu()
        .unwrap()
        .gpu
        .counters
        .submissions
        .load(Ordering::Relaxed);
    let (lg, kg) = loss_and_grad_on(&gm, &mut pg, &seq, true, None)
        .await
        .unwrap();
    let submissions = gm
        .gpu()
        .unwrap()
        .gpu
        .counters
        .submissions
        .load(Ordering::Relaxed)
        - before;
    // Per layer and pass (forward, recomputed forward, backward), four round trips: q/k/v together, o, gate/up
    // together, down; 2 layers; the output's forward and backward.
    assert_eq!(submissions, 2 * 3 * 4 + 2);
    assert_eq!(kc, kg);
    assert!(
        (lc - lg).abs() <= 1e-5 * lc.abs(),
        "loss: CPU {lc} vs GPU {lg}"
    );
    for (a, b) in pc.mats.iter().zip(&pg.mats) {
        for (gc, gg, what) in [(&a.ga, &b.ga, "A"), (&a.gbt, &b.gbt, "B")] {
            let top = gc.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(top > 0.0);
            let worst = gc
                .iter()
                .zip(gg)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                worst <= 1e-4 * top,
                "layer {} {:?} {what}: gradients differ by {worst} (largest {top})",
                a.layer,
                a.target
            );
        }
    }
    // The Trainer: on the model's GPU through step_async, on the CPU through step.
    let data = "{\"prompt\": \"the tth\", \"response\": \"th t th\"}\n{\"prompt\": \"ttt\", \"response\": \"t the\"}\n{\"prompt\": \"h t\", \"response\": \"tt h\"}";
    let examples = parse_examples(data, 10).unwrap();
    let cfg = TrainConfig {
        batch_size: 2,
        eval_fraction: 0.0,
        lr: 1e-2,
        ..Default::default()
    };
    let mut tc = Trainer::new(&cpu, &examples, &lora, cfg.clone()).unwrap();
    let mut tg = Trainer::new(&gm, &examples, &lora, cfg).unwrap();
    for step in 1..=2 {
        let (lc, _, nc, _) = tc.step(&cpu).unwrap();
        let (lg, _, ng, _) = tg.step_async(&gm).await.unwrap();
        assert!(
            (lc - lg).abs() <= 1e-5 * lc.abs(),
            "step {step} loss: CPU {lc} vs GPU {lg}"
        );
        assert!(
            (nc - ng).abs() <= 1e-4 * nc,
            "step {step} gradient norm: CPU {nc} vs GPU {ng}"
        );
    }
}
async_test! {
    fn training_on_the_gpu_matches_the_cpu() {
        train_on_gpu().await
    }
}

// ---- Greedy decoding on the GPU: argmax.wgsl, embed.wgsl, and the session's submissions of several steps ----

/// argmax.wgsl against `sampler::argmax` (the CPU's greedy choice): ties to the lowest index, NaN never chosen
/// while any value is not (all NaN: the last index), −0 equal to +0, infinities, fewer and more values than the
/// 256 invocations, SmolLM2's vocabulary. The result is an index, so the bound is equality; the token goes to
/// slot pos0 + 1 and nothing else changes.
async fn argmax_kernel() {
    let Some(g) = gpu().await else { return };
    let mut rng = common::Rng(77);
    let mut cases: Vec<(&str, Vec<f32>)> = Vec::new();
    let mut r = rand_vec(&mut rng, 261, 10.0);
    r[200] = 11.0;
    r[45] = 11.0;
    cases.push(("tie between 45 and 200", r));
    let mut r = rand_vec(&mut rng, 1000, 1.0);
    for i in [0, 1, 300, 777, 999] {
        r[i] = f32::NAN;
    }
    r[500] = 5.0;
    r[501] = -f32::NAN;
    cases.push(("NaNs around the max", r));
    let mut r = rand_vec(&mut rng, 300, 1.0);
    r[0] = f32::NAN;
    r[299] = 2.0;
    cases.push(("NaN first, the max last", r));
    cases.push(("all NaN", vec![f32::NAN; 300]));
    cases.push(("all −∞", vec![f32::NEG_INFINITY; 5]));
    cases.push(("one value", vec![-3.0]));
    cases.push(("−0 then +0", vec![-0.0, 0.0, -1.0]));
    cases.push(("+∞ once", {
        let mut r = rand_vec(&mut rng, 700, 1e30);
        r[650] = f32::INFINITY;
        r
    }));
    let mut r = rand_vec(&mut rng, 49152, 20.0);
    r[49151] = 20.5;
    cases.push(("SmolLM2's vocabulary, the max last", r));
    let pos0 = 3u32;
    for (what, v) in cases {
        let want = lorag::llm::sampler::argmax(&v);
        let l = g.f32_buffer("logits", &v);
        let tok = g.f32_buffer("tokens", &[0.0; 6]);
        let p = g.uniform(&[v.len() as u32]);
        let step = g.uniform(&[0, 0, 0, 0]);
        let out = launch(
            &g,
            Kernel::Argmax,
            &[&l, &tok, &p, &step],
            &step,
            Grid::One,
            pos0,
            1,
            &tok,
            6,
        )
        .await;
        let got: Vec<u32> = out.iter().map(|x| x.to_bits()).collect();
        let mut expect = vec![0u32; 6];
        expect[pos0 as usize + 1] = want;
        assert_eq!(got, expect, "{what}");
    }
}
async_test! {
    fn the_argmax_kernel_picks_as_the_sampler_does() {
        argmax_kernel().await
    }
}

/// topk.wgsl against a full sort of the values by `f32::total_cmp` (descending, ties to the lower index: the
/// order the sampler's candidates take): the first k ids and the values' bits, exactly (the kernel compares and
/// moves values, it computes none). Awkward sizes around its chunks (256 · E values, E from 4 to 32, at most 128
/// chunks): fewer values than k, one chunk, SmolLM2's and Gemma's vocabularies (Gemma's plus 7: 9 values an
/// invocation, its last chunk part-filled), the largest it takes; ties by the thousand (2,001 distinct values),
/// NaN of both signs, ±∞, −0 and +0; k of 1, 40 (the default sampler's) and 64.
async fn top_k_kernel() {
    use lorag::kernels::gpu::{TopK, MAX_TOP_K, MAX_TOP_K_INPUT};
    let Some(g) = gpu().await else { return };
    let mut rng = common::Rng(0x70b);
    let mut cases: Vec<(&str, Vec<f32>)> = vec![
        ("one value", vec![-3.0]),
        ("five values", vec![1.0, -0.0, 0.0, 1.0, f32::NEG_INFINITY]),
    ];
    let mut r = rand_vec(&mut rng, 261, 10.0);
    r[7] = f32::NAN;
    r[8] = -f32::NAN;
    r[100] = f32::INFINITY;
    r[101] = f32::NEG_INFINITY;
    r[102] = -0.0;
    r[103] = 0.0;
    cases.push(("the tiny model's vocabulary, NaNs, infinities, zeros", r));
    cases.push((
        "1,025: a second chunk of one value",
        rand_vec(&mut rng, 1025, 1.0),
    ));
    cases.push(("SmolLM2's vocabulary", rand_vec(&mut rng, 49152, 20.0)));
    let mut r = rand_vec(&mut rng, 262144 + 7, 20.0);
    r[262150] = 25.0;
    cases.push(("Gemma's vocabulary + 7, the max last", r));
    cases.push((
        "the most it takes",
        rand_vec(&mut rng, MAX_TOP_K_INPUT, 5.0),
    ));
    for (what, v) in &cases {
        let mut order: Vec<u32> = (0..v.len() as u32).collect();
        order.sort_by(|&a, &b| v[b as usize].total_cmp(&v[a as usize]).then(a.cmp(&b)));
        let buf = g.f32_buffer("values", v);
        for k in [1, 40, MAX_TOP_K] {
            let t = g.top_k(&buf, v.len(), k).unwrap();
            let out = g
                .run_and_read(&t.dispatches, 1, &t.out, 2 * k)
                .await
                .unwrap();
            let bytes: Vec<u8> = out.iter().flat_map(|x| x.to_le_bytes()).collect();
            let got: Vec<(u32, u32)> = TopK::decode(&bytes, k)
                .into_iter()
                .map(|(i, x)| (i, x.to_bits()))
                .collect();
            let want: Vec<(u32, u32)> = order
                .iter()
                .take(k)
                .map(|&i| (i, v[i as usize].to_bits()))
                .collect();
            assert_eq!(got, want, "{what}, k {k}");
            // The sampler's own helper agrees (it is what the host path sorts with).
            let host = lorag::llm::sampler::top_k(v, k);
            let host: Vec<(u32, u32)> = host.into_iter().map(|(i, x)| (i, x.to_bits())).collect();
            assert_eq!(host, want, "{what}, k {k}: sampler::top_k");
        }
    }
    let buf = g.f32_buffer("values", &[1.0; 8]);
    for (n, k) in [(8, 0), (8, MAX_TOP_K + 1), (0, 4), (MAX_TOP_K_INPUT + 1, 4)] {
        let e = g.top_k(&buf, n, k).err().expect("refused");
        assert!(matches!(e, Error::InvalidQuery(_)), "{n}, {k}: {e}");
    }
}
async_test! {
    fn the_top_k_kernel_finds_the_samplers_candidates() {
        top_k_kernel().await
    }
}

/// embed.wgsl: every format's rows (in several chunks, so that only the chunk holding the token writes) decoded
/// into x bit for bit as the CPU decodes them (`dequantize_row`, and its scalar reference), for the first row,
/// a row inside a later chunk and the last.
async fn embed_kernel() {
    let Some(g) = gpu().await else { return };
    let mut rng = common::Rng(0xe3b);
    let (rows, cols) = (37, 256);
    for ty in TYPES {
        let w = random_rows(ty, rows, cols, &mut rng);
        let rb = ty.row_bytes(cols).unwrap();
        let m = upload(&g, ty, &w, rows, cols, Some(rb * 10 + 1));
        let tokens = g.buffer(
            "tokens",
            64,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        );
        let x = g.f32_buffer("x", &[f32::NAN; 256]);
        let step = g.uniform(&[5, 1, 0, 0]);
        let ds = g.embed_dispatches(&m, &tokens, &x, &step);
        assert_eq!(ds.len(), m.chunks.len());
        for t in [0usize, 23, 36] {
            g.queue.write_buffer(&tokens, 20, &(t as u32).to_le_bytes());
            let got = g.run_and_read(&ds, 1, &x, cols).await.unwrap();
            let row = &w[t * rb..(t + 1) * rb];
            let (mut fast, mut reference) = (vec![0.0; cols], vec![0.0; cols]);
            quant::dequantize_row(ty, row, &mut fast);
            quant::dequantize_row_ref(ty, row, &mut reference);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&fast), "{} row {t}", ty.name());
            assert_eq!(bits(&got), bits(&reference), "{} row {t}", ty.name());
        }
    }
}
async_test! {
    fn the_embedding_kernel_decodes_rows_as_the_cpu() {
        embed_kernel().await
    }
}

/// A session's greedy decoding on the GPU (argmax and the next embedding there, several steps a submission, the
/// next submission queued before the tokens are read) against the same session's kernels one step at a time
/// with the host choosing (`sampler::argmax` of the logits read back): the same logits, so the same tokens,
/// exactly. The tiny llama with its adapter, tied (the output matrix is the embeddings) and untied (an output
/// matrix of its own: the embeddings uploaded for it); 8 tokens a submission (the default), 3 and 1; to the end
/// of the context. After the first call each call submits at most one batch and creates no buffer; a step
/// run with `forward` after greedy calls (which drops the batch queued ahead) gives the one-step path's logits.
async fn greedy_session() {
    let untie = |_: &mut _, t: &mut common::tiny::Tensors| {
        t.push(("output.weight", vec![32, 261], GgmlType::F32));
    };
    for (variant, bytes) in [
        ("tied", common::tiny::tiny(|_, _| {})),
        ("untied", common::tiny::tiny(untie)),
    ] {
        let Some(mut m) = on_gpu(bytes).await else {
            return;
        };
        let targets = [lorag::llm::Target::Q, lorag::llm::Target::Down];
        let a = common::tiny::random_adapter(&m.weights, &targets, 2, 9, 10.0 / 3.0, 0.9);
        m.add_adapter("a", a).unwrap();
        let lora = m
            .active_adapters(&[lorag::llm::AdapterUse {
                name: "a".into(),
                weight: 1.0,
            }])
            .unwrap();
        let b = m.gpu().unwrap();
        let (n_ctx, prompt) = (40, [5u32, 99, 257, 12, 33, 7, 200]);
        // One step at a time, the host choosing: the reference.
        let mut one =
            GpuSession::new(&b.gpu, b.weights(), &m.weights, m.bytes(), n_ctx, 8, &lora).unwrap();
        let mut logits = one.forward(&prompt).await.unwrap();
        let mut want = vec![];
        while one.len < n_ctx {
            let t = lorag::llm::sampler::argmax(&logits);
            want.push(t);
            logits = one.forward(&[t]).await.unwrap();
        }
        want.push(lorag::llm::sampler::argmax(&logits));
        let distinct = want.iter().collect::<std::collections::HashSet<_>>().len();
        assert!(distinct > 8, "{variant}: a varied sequence ({want:?})");
        for batch in [None, Some(3), Some(1)] {
            b.gpu.set_greedy_batch(batch);
            let what = format!("{variant}, batch {batch:?}");
            let mut s =
                GpuSession::new(&b.gpu, b.weights(), &m.weights, m.bytes(), n_ctx, 8, &lora)
                    .unwrap();
            let l = s.forward(&prompt).await.unwrap();
            let mut got = vec![lorag::llm::sampler::argmax(&l)];
            let mut calls = 0;
            while s.len < n_ctx {
                let counts = (
                    b.gpu.counters.submissions.load(Ordering::Relaxed),
                    b.gpu.counters.buffers.load(Ordering::Relaxed),
                );
                let before = s.len;
                let last = *got.last().unwrap();
                let next = s.greedy(last, 1000).await.unwrap();
                let k = batch.unwrap_or(lorag::kernels::gpu::GREEDY_BATCH) as usize;
                assert_eq!(next.len(), k.min(n_ctx - before), "{what}: at {before}");
                assert_eq!(s.len, before + next.len());
                got.extend(next);
                if calls > 0 {
                    let subs = b.gpu.counters.submissions.load(Ordering::Relaxed) - counts.0;
                    assert!(subs <= 1, "{what}: {subs} submissions in one call");
                    let bufs = b.gpu.counters.buffers.load(Ordering::Relaxed) - counts.1;
                    assert_eq!(bufs, 0, "{what}: buffers created in a call");
                }
                calls += 1;
            }
            assert_eq!(got, want, "{what}");
            assert!(matches!(
                s.greedy(1, 5).await,
                Err(Error::ContextOverflow { .. })
            ));
            // Back to one step at a time in the middle: a fresh session, greedy for a while, then forward.
            let mut s =
                GpuSession::new(&b.gpu, b.weights(), &m.weights, m.bytes(), n_ctx, 8, &lora)
                    .unwrap();
            s.forward(&prompt).await.unwrap();
            let next = s.greedy(want[0], 5).await.unwrap();
            assert_eq!(next, want[1..1 + next.len()], "{what}");
            let at = prompt.len() + next.len();
            let l = s.forward(&[want[next.len()]]).await.unwrap();
            let mut r =
                GpuSession::new(&b.gpu, b.weights(), &m.weights, m.bytes(), n_ctx, 8, &lora)
                    .unwrap();
            let mut seq = prompt.to_vec();
            seq.extend(&want[..=next.len()]);
            let lr = r.forward(&seq).await.unwrap();
            assert_eq!(r.len, at + 1);
            close(&l, &lr, &format!("{what}: forward after greedy"));
        }
        b.gpu.set_greedy_batch(None);
        // Whole requests: the same tokens, text and end with greedy decoding on the GPU and with it off, up to
        // the token limit and to a full context.
        for (max_tokens, context) in [(20, 0), (30, 16)] {
            let opts = GenerateOptions {
                max_tokens,
                context,
                sampler: SamplerConfig::greedy(),
                adapters: vec![lorag::llm::AdapterUse {
                    name: "a".into(),
                    weight: 1.0,
                }],
                ignore_eos: true,
                ..Default::default()
            };
            let mut runs = vec![];
            for batch in [None, Some(0)] {
                m.gpu().unwrap().gpu.set_greedy_batch(batch);
                let before = m.device();
                let out = m
                    .generate_async(&prompt, &opts, &mut |_| true)
                    .await
                    .unwrap();
                // The device report counts the request's submissions: the prompt's, then one per token fed
                // back with the host choosing, or one per 8 (and a queued one) on the GPU.
                let after = m.device();
                let subs = after.submissions - before.submissions;
                let fed = out.ids.len() as u64 - 1;
                if batch.is_some() {
                    assert_eq!(subs, 1 + fed, "{variant}: host choosing");
                } else {
                    assert!(
                        subs <= 1 + fed.div_ceil(8) + 1,
                        "{variant}: {subs} submissions"
                    );
                }
                // ... and the host's time recording them (natively a clock of nanoseconds; a browser's
                // performance.now() may round a short recording down to 0).
                #[cfg(not(target_arch = "wasm32"))]
                assert!(after.submit_us > before.submit_us, "{variant}: {after:?}");
                runs.push((out.ids, out.text, out.stop_reason));
            }
            m.gpu().unwrap().gpu.set_greedy_batch(None);
            assert_eq!(
                runs[0], runs[1],
                "{variant}: {max_tokens} tokens, context {context}"
            );
            let n = runs[0].0.len();
            assert_eq!(
                n,
                if context == 0 {
                    max_tokens
                } else {
                    16 - prompt.len() + 1
                }
            );
        }
    }
}
async_test! {
    fn greedy_decoding_on_the_gpu_matches_the_host_choosing() {
        greedy_session().await
    }
}

/// Sampling on the GPU: a step's candidates found there ([`GpuSession::forward_top`]) are the host's top-k of the
/// same step's logits (`sampler::top_k` of `forward`'s), bit for bit, also for steps run from commands recorded
/// while the GPU ran the step before (their token written into a GPU buffer, the embedding decoded there); and
/// whole sampled requests give the same tokens with the candidates found on the GPU, recorded ahead or not, and
/// with every step's logits read back (the same logits, the same draws), reading back 8 bytes a candidate
/// instead of the vocabulary's logits. Penalties and a top-k beyond
/// the kernel's read the logits, as before. The tiny llama with an adapter, tied and untied (in the browser,
/// where SwiftShader takes 20 s a variant, tied only: the sampling path is the same for both).
async fn sampled_session() {
    use lorag::kernels::gpu::MAX_TOP_K;
    let untie = |_: &mut _, t: &mut common::tiny::Tensors| {
        t.push(("output.weight", vec![32, 261], GgmlType::F32));
    };
    let mut variants = vec![("tied", common::tiny::tiny(|_, _| {}))];
    if !cfg!(target_arch = "wasm32") {
        variants.push(("untied", common::tiny::tiny(untie)));
    }
    for (variant, bytes) in variants {
        let Some(mut m) = on_gpu(bytes).await else {
            return;
        };
        let targets = [lorag::llm::Target::Q, lorag::llm::Target::Down];
        let a = common::tiny::random_adapter(&m.weights, &targets, 2, 9, 10.0 / 3.0, 0.9);
        m.add_adapter("a", a).unwrap();
        let adapters = vec![lorag::llm::AdapterUse {
            name: "a".into(),
            weight: 1.0,
        }];
        let lora = m.active_adapters(&adapters).unwrap();
        let b = m.gpu().unwrap();
        let n_vocab = m.weights.cfg.n_vocab;
        let prompt = [5u32, 99, 257, 12, 33, 7, 200];
        let session =
            || GpuSession::new(&b.gpu, b.weights(), &m.weights, m.bytes(), 40, 8, &lora).unwrap();
        let (mut full, mut top) = (session(), session());
        let mut seq = prompt.to_vec();
        // The prompt, steps changing k (each change drops the step recorded ahead for the old launches), then
        // steps run from commands recorded ahead, creating no buffer.
        for (step, k) in [40, 1, MAX_TOP_K, 40, 40, 40, 40, 40, 40]
            .into_iter()
            .enumerate()
        {
            let buffers = b.gpu.counters.buffers.load(Ordering::Relaxed);
            let logits = full.forward(&seq).await.unwrap();
            let want: Vec<(u32, u32)> = lorag::llm::sampler::top_k(&logits, k)
                .into_iter()
                .map(|(i, x)| (i, x.to_bits()))
                .collect();
            let got: Vec<(u32, u32)> = top
                .forward_top(&seq, k)
                .await
                .unwrap()
                .into_iter()
                .map(|(i, x)| (i, x.to_bits()))
                .collect();
            assert_eq!(got, want, "{variant}: k {k} at {}", full.len);
            seq = vec![want[0].0];
            if step > 4 {
                let made = b.gpu.counters.buffers.load(Ordering::Relaxed) - buffers;
                assert_eq!(made, 0, "{variant}: buffers created in step {step}");
            }
        }
        assert_eq!(
            top.recorded_ahead, 5,
            "{variant}: steps run from commands recorded ahead"
        );
        drop(lora);
        let base = SamplerConfig::default();
        let configs = [
            ("the default sampler", base, true),
            (
                "k 64, hot, no top-p or min-p",
                SamplerConfig {
                    top_k: MAX_TOP_K,
                    temperature: 1.7,
                    top_p: 1.0,
                    min_p: 0.0,
                    seed: 3,
                    ..base
                },
                true,
            ),
            ("k 1", SamplerConfig { top_k: 1, ..base }, true),
            (
                "a repeat penalty",
                SamplerConfig {
                    repeat_penalty: 1.3,
                    ..base
                },
                false,
            ),
            (
                "k beyond the kernel's",
                SamplerConfig { top_k: 65, ..base },
                false,
            ),
        ];
        for (what, sampler, candidates) in configs {
            let opts = GenerateOptions {
                max_tokens: 24,
                sampler,
                adapters: adapters.clone(),
                ignore_eos: true,
                ..Default::default()
            };
            let mut runs = vec![];
            // Candidates on the GPU with the steps recorded ahead (the default), without, and all the logits.
            for (on, ahead) in [(true, true), (true, false), (false, true)] {
                let g = &m.gpu().unwrap().gpu;
                g.set_sample_on_gpu(on);
                g.set_record_ahead(ahead);
                let (subs, read) = (
                    g.counters.submissions.load(Ordering::Relaxed),
                    g.counters.read_bytes.load(Ordering::Relaxed),
                );
                let out = m
                    .generate_async(&prompt, &opts, &mut |_| true)
                    .await
                    .unwrap();
                let g = &m.gpu().unwrap().gpu;
                let fed = out.ids.len() - 1;
                let subs = g.counters.submissions.load(Ordering::Relaxed) - subs;
                assert_eq!(subs, 1 + fed, "{variant}, {what}: one submission a step");
                let read = g.counters.read_bytes.load(Ordering::Relaxed) - read;
                let per_step = if on && candidates {
                    8 * sampler.top_k
                } else {
                    4 * n_vocab
                };
                assert_eq!(
                    read as usize,
                    4 * n_vocab + fed * per_step,
                    "{variant}, {what}, on the GPU {on}: bytes read back"
                );
                runs.push(out.ids);
            }
            m.gpu().unwrap().gpu.set_sample_on_gpu(true);
            m.gpu().unwrap().gpu.set_record_ahead(true);
            assert_eq!(runs[0], runs[1], "{variant}, {what}: recorded ahead or not");
            assert_eq!(
                runs[0], runs[2],
                "{variant}, {what}: candidates or all the logits"
            );
            let distinct = runs[0]
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len();
            if sampler.top_k > 1 {
                assert!(distinct > 4, "{variant}, {what}: varied ({:?})", runs[0]);
            }
        }
    }
}
async_test! {
    fn sampling_on_the_gpu_reads_back_only_the_candidates() {
        sampled_session().await
    }
}
