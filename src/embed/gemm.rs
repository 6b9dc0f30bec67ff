//! f32 matrix products for the BERT encoder: `C = A·B` with `B` packed into panels of [`NR`] columns
//! (`k × NR` floats each, the last one zero-padded), so the inner loop reads `B` contiguously and keeps a
//! tile of `C` in registers. Three micro-kernels with one driver: wasm simd128 (4 × 8 tile: 8 accumulators,
//! room for V8's 15 usable xmm registers), AVX2 + FMA picked at run time (8 × 8), and portable Rust. Each
//! element of `C` is a sum over `k` in order, whatever the tile or the row's place in it, so a row's result
//! does not depend on the other rows of the batch.

/// Columns per packed panel.
pub(crate) const NR: usize = 8;

/// Rows per tile of the simd128 (and portable) kernel: 8 accumulators + 2 panel vectors + 1 splat (6 rows,
/// 15 registers, spills in V8: 25 % slower).
const WASM_MR: usize = 4;

/// `B` (`k × n`) packed for [`matmul`]: f32 panels, or int8 panels with one scale per column (weight-only
/// int8 models: a quarter of the memory, and of the memory traffic when few rows share each panel). An int8
/// panel is dequantized (`q as f32 × scale`, the f32 product onnxruntime computes) into a small buffer once
/// per block of rows, so both give the same bits.
#[derive(Clone, Default)]
pub(crate) struct Packed {
    k: usize,
    n: usize,
    data: Vec<f32>,
    q: Vec<i8>,
    /// Per column, padded to whole panels (int8 only).
    scale: Vec<f32>,
}

impl Packed {
    /// Pack `b(row, col)` for `row < k`, `col < n`.
    pub fn new(k: usize, n: usize, b: impl Fn(usize, usize) -> f32) -> Packed {
        let mut p = Packed::default();
        p.repack(k, n, b);
        p
    }

    /// Pack int8 `q(row, col)` with per-column `scale(col)`.
    pub fn new_i8(
        k: usize,
        n: usize,
        q: impl Fn(usize, usize) -> i8,
        scale: impl Fn(usize) -> f32,
    ) -> Packed {
        let panels = n.div_ceil(NR);
        let mut p = Packed {
            k,
            n,
            data: Vec::new(),
            q: vec![0; panels * k * NR],
            scale: vec![0.0; panels * NR],
        };
        for col in 0..n {
            let (panel, j) = (col / NR, col % NR);
            p.scale[col] = scale(col);
            for row in 0..k {
                p.q[panel * k * NR + row * NR + j] = q(row, col);
            }
        }
        p
    }

    /// Pack again into the same allocation (attention packs each head's keys and values).
    pub fn repack(&mut self, k: usize, n: usize, b: impl Fn(usize, usize) -> f32) {
        let panels = n.div_ceil(NR);
        self.k = k;
        self.n = n;
        self.data.clear();
        self.data.resize(panels * k * NR, 0.0);
        for p in 0..panels {
            let panel = &mut self.data[p * k * NR..(p + 1) * k * NR];
            for j in 0..NR.min(n - p * NR) {
                let col = p * NR + j;
                for row in 0..k {
                    panel[row * NR + j] = b(row, col);
                }
            }
        }
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 4 + self.q.len() + self.scale.len() * 4
    }

    /// Panel `p` as f32: the packed floats, or the int8 panel dequantized into `buf`.
    #[inline(always)]
    fn panel<'a>(&'a self, p: usize, buf: &'a mut Vec<f32>) -> &'a [f32] {
        let len = self.k * NR;
        if self.q.is_empty() {
            return &self.data[p * len..(p + 1) * len];
        }
        buf.resize(len, 0.0);
        let scale: &[f32; NR] = self.scale[p * NR..(p + 1) * NR].try_into().expect("NR");
        let src = &self.q[p * len..(p + 1) * len];
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        {
            use core::arch::wasm32::*;
            // SAFETY: `src` and `buf` hold `len` = k·8 elements; each step reads 8 int8 and writes 8 f32.
            unsafe {
                let s0 = v128_load(scale.as_ptr() as *const v128);
                let s1 = v128_load(scale.as_ptr().add(4) as *const v128);
                for row in 0..self.k {
                    let q8 = v128_load64_zero(src.as_ptr().add(row * NR) as *const u64);
                    let q16 = i16x8_extend_low_i8x16(q8);
                    let lo = f32x4_convert_i32x4(i32x4_extend_low_i16x8(q16));
                    let hi = f32x4_convert_i32x4(i32x4_extend_high_i16x8(q16));
                    let d = buf.as_mut_ptr().add(row * NR) as *mut v128;
                    v128_store(d, f32x4_mul(lo, s0));
                    v128_store(d.add(1), f32x4_mul(hi, s1));
                }
            }
        }
        #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
        for (dst, src) in buf.chunks_exact_mut(NR).zip(src.chunks_exact(NR)) {
            for j in 0..NR {
                dst[j] = src[j] as f32 * scale[j];
            }
        }
        buf
    }
}

/// `c[i·ldc + j] = Σ_kk a[i·lda + kk] · b[kk][j]` for `i < m`, `j < b.n()` (overwrites `c`).
pub(crate) fn matmul(a: &[f32], lda: usize, m: usize, b: &Packed, c: &mut [f32], ldc: usize) {
    let (k, n) = (b.k, b.n);
    if m == 0 || n == 0 {
        return;
    }
    assert!(lda >= k && ldc >= n, "matmul strides");
    assert!(a.len() >= (m - 1) * lda + k, "matmul: A too short");
    assert!(c.len() >= (m - 1) * ldc + n, "matmul: C too short");
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVX2: OnceLock<bool> = OnceLock::new();
        if *AVX2.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        }) {
            // SAFETY: the CPU has AVX2 and FMA (checked above); bounds asserted above.
            unsafe { avx2::drive_avx2(a, lda, m, b, c, ldc) };
            return;
        }
    }
    drive::<WASM_MR>(a, lda, m, b, c, ldc, |rows, k, a, lda, panel| {
        // SAFETY: the driver passes `rows` rows of `k` readable floats at stride `lda`, a `k × NR` panel.
        unsafe { kernel(rows, k, a, lda, panel) }
    });
}

/// Rows per block: a block of `A` stays in cache (≈ 256 KiB) while every panel of `B` passes over it (an int8
/// panel is dequantized once per block).
fn block_rows(k: usize, mr: usize) -> usize {
    ((256 * 1024 / 4) / k.max(1)).max(mr) / mr * mr
}

/// The driver: row blocks, then panels, then tiles of `MR` rows (the last one shorter); `tile` returns the
/// `rows × NR` products of one tile.
#[inline(always)]
fn drive<const MR: usize>(
    a: &[f32],
    lda: usize,
    m: usize,
    b: &Packed,
    c: &mut [f32],
    ldc: usize,
    tile: impl Fn(usize, usize, *const f32, usize, *const f32) -> [[f32; NR]; MR],
) {
    let (k, n) = (b.k, b.n);
    let mb = block_rows(k, MR);
    let mut buf = Vec::new();
    for i0 in (0..m).step_by(mb) {
        let i1 = (i0 + mb).min(m);
        for p in 0..n.div_ceil(NR) {
            let panel = b.panel(p, &mut buf).as_ptr();
            let cols = NR.min(n - p * NR);
            let mut i = i0;
            while i < i1 {
                let rows = MR.min(i1 - i);
                let acc = tile(rows, k, a[i * lda..].as_ptr(), lda, panel);
                for (r, acc) in acc.iter().enumerate().take(rows) {
                    let dst = &mut c[(i + r) * ldc + p * NR..][..cols];
                    dst.copy_from_slice(&acc[..cols]);
                }
                i += rows;
            }
        }
    }
}

/// One tile, up to 4 rows: simd128 in wasm, portable Rust elsewhere.
///
/// # Safety
/// `a` points at `rows` rows of `k` floats spaced `lda` apart; `panel` at `k × NR` floats.
#[inline(always)]
unsafe fn kernel(
    rows: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    panel: *const f32,
) -> [[f32; NR]; WASM_MR] {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    match rows {
        1 => wasm_tile::<1>(k, a, lda, panel),
        2 => wasm_tile::<2>(k, a, lda, panel),
        3 => wasm_tile::<3>(k, a, lda, panel),
        _ => wasm_tile::<4>(k, a, lda, panel),
    }
    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
    {
        let mut acc = [[0f32; NR]; WASM_MR];
        for (r, acc) in acc.iter_mut().enumerate().take(rows) {
            let ar = a.add(r * lda);
            for kk in 0..k {
                let x = *ar.add(kk);
                let bp = panel.add(kk * NR);
                for (j, v) in acc.iter_mut().enumerate() {
                    *v += x * *bp.add(j);
                }
            }
        }
        acc
    }
}

/// `R` rows (≤ 4) × 8 columns in simd128 registers: per step two panel loads, `R` splat loads, `2R` products.
///
/// # Safety
/// As [`kernel`].
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
#[inline(always)]
unsafe fn wasm_tile<const R: usize>(
    k: usize,
    a: *const f32,
    lda: usize,
    panel: *const f32,
) -> [[f32; NR]; WASM_MR] {
    use core::arch::wasm32::*;
    let mut acc = [[f32x4_splat(0.0); 2]; R];
    let mut rows = [a; R];
    for (r, p) in rows.iter_mut().enumerate() {
        *p = a.add(r * lda);
    }
    for kk in 0..k {
        let bp = panel.add(kk * NR) as *const v128;
        let (b0, b1) = (v128_load(bp), v128_load(bp.add(1)));
        for r in 0..R {
            let x = v128_load32_splat(rows[r].add(kk) as *const u32);
            acc[r][0] = f32x4_add(acc[r][0], f32x4_mul(x, b0));
            acc[r][1] = f32x4_add(acc[r][1], f32x4_mul(x, b1));
        }
    }
    let mut out = [[0f32; NR]; WASM_MR];
    for r in 0..R {
        v128_store(out[r].as_mut_ptr() as *mut v128, acc[r][0]);
        v128_store(out[r].as_mut_ptr().add(4) as *mut v128, acc[r][1]);
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{drive, Packed, NR};
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2 and FMA present; bounds as [`super::matmul`] asserts.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn drive_avx2(
        a: &[f32],
        lda: usize,
        m: usize,
        b: &Packed,
        c: &mut [f32],
        ldc: usize,
    ) {
        drive::<8>(a, lda, m, b, c, ldc, |rows, k, a, lda, panel| {
            // SAFETY: as for the driver's contract; AVX2/FMA enabled on this function.
            unsafe { tile(rows, k, a, lda, panel) }
        });
    }

    /// Up to 8 rows: one tile function per row count, so a short tile does only its own rows.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile(
        rows: usize,
        k: usize,
        a: *const f32,
        lda: usize,
        panel: *const f32,
    ) -> [[f32; NR]; 8] {
        match rows {
            1 => rows_tile::<1>(k, a, lda, panel),
            2 => rows_tile::<2>(k, a, lda, panel),
            3 => rows_tile::<3>(k, a, lda, panel),
            4 => rows_tile::<4>(k, a, lda, panel),
            5 => rows_tile::<5>(k, a, lda, panel),
            6 => rows_tile::<6>(k, a, lda, panel),
            7 => rows_tile::<7>(k, a, lda, panel),
            _ => rows_tile::<8>(k, a, lda, panel),
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows_tile<const R: usize>(
        k: usize,
        a: *const f32,
        lda: usize,
        panel: *const f32,
    ) -> [[f32; NR]; 8] {
        let mut acc = [_mm256_setzero_ps(); R];
        let mut ptr = [a; R];
        for (r, p) in ptr.iter_mut().enumerate() {
            *p = a.add(r * lda);
        }
        for kk in 0..k {
            let bv = _mm256_loadu_ps(panel.add(kk * NR));
            for r in 0..R {
                acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(&*ptr[r].add(kk)), bv, acc[r]);
            }
        }
        let mut out = [[0f32; NR]; 8];
        for r in 0..R {
            _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Int8 panels give the same bits as f32 panels of the dequantized weights, for short and long inputs.
    #[test]
    fn int8_panels_equal_dequantized_f32_panels() {
        let (k, n) = (37, 21);
        let q = |r: usize, c: usize| ((r * 31 + c * 17) % 255) as i8;
        let scale = |c: usize| 0.001 + c as f32 * 1e-4;
        let b8 = Packed::new_i8(k, n, q, scale);
        let b32 = Packed::new(k, n, |r, c| q(r, c) as f32 * scale(c));
        for m in [1, 3, 11, 700] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let (mut c8, mut c32) = (vec![0f32; m * n], vec![1f32; m * n]);
            matmul(&a, k, m, &b8, &mut c8, n);
            matmul(&a, k, m, &b32, &mut c32, n);
            assert!(
                c8.iter().zip(&c32).all(|(x, y)| x.to_bits() == y.to_bits()),
                "m = {m}"
            );
        }
        assert_eq!(b8.bytes(), 3 * k * NR + 3 * NR * 4);
    }

    /// Awkward shapes (rows not a multiple of any tile, columns not of the panel) against an f64 sum, with
    /// the f32 summation bound k·ε·Σ|a·b|.
    #[test]
    fn matmul_matches_a_double_precision_sum() {
        let mut seed = 7u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for &(m, k, n, lda) in &[
            (1, 1, 1, 1),
            (3, 5, 9, 7),
            (11, 384, 37, 390),
            (37, 33, 17, 33),
        ] {
            let a: Vec<f32> = (0..m * lda).map(|_| rnd()).collect();
            let bm: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
            let b = Packed::new(k, n, |r, c| bm[r * n + c]);
            let ldc = n + 3;
            let mut c = vec![f32::NAN; m * ldc];
            matmul(&a, lda, m, &b, &mut c, ldc);
            for i in 0..m {
                for j in 0..n {
                    let (mut s, mut bound) = (0f64, 0f64);
                    for kk in 0..k {
                        let p = a[i * lda + kk] as f64 * bm[kk * n + j] as f64;
                        s += p;
                        bound += p.abs();
                    }
                    let tol = k as f64 * f32::EPSILON as f64 * bound + 1e-30;
                    let got = c[i * ldc + j] as f64;
                    assert!(
                        (got - s).abs() <= tol,
                        "({m},{k},{n}) [{i},{j}]: {got} vs {s}"
                    );
                }
            }
        }
    }
}
