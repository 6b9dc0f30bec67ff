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

/// `B` (`k × n`) packed for [`matmul`].
#[derive(Clone, Default)]
pub(crate) struct Packed {
    k: usize,
    n: usize,
    data: Vec<f32>,
}

impl Packed {
    /// Pack `b(row, col)` for `row < k`, `col < n`.
    pub fn new(k: usize, n: usize, b: impl Fn(usize, usize) -> f32) -> Packed {
        let mut p = Packed::default();
        p.repack(k, n, b);
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

    /// Element (`row`, `col`) of the packed matrix.
    pub fn at(&self, row: usize, col: usize) -> f32 {
        self.data[(col / NR) * self.k * NR + row * NR + col % NR]
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
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

/// Rows per block: a block of `A` stays in cache (≈ 128 KiB) while every panel of `B` passes over it.
fn block_rows(k: usize, mr: usize) -> usize {
    ((128 * 1024 / 4) / k.max(1)).max(mr) / mr * mr
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
    for i0 in (0..m).step_by(mb) {
        let i1 = (i0 + mb).min(m);
        for p in 0..n.div_ceil(NR) {
            let panel = b.data[p * k * NR..].as_ptr();
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

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile(
        rows: usize,
        k: usize,
        a: *const f32,
        lda: usize,
        panel: *const f32,
    ) -> [[f32; NR]; 8] {
        let mut acc = [_mm256_setzero_ps(); 8];
        let mut ptr = [a; 8];
        for (r, p) in ptr.iter_mut().enumerate().take(rows) {
            *p = a.add(r * lda);
        }
        for kk in 0..k {
            let bv = _mm256_loadu_ps(panel.add(kk * NR));
            for r in 0..8 {
                acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(&*ptr[r].add(kk)), bv, acc[r]);
            }
        }
        let mut out = [[0f32; NR]; 8];
        for r in 0..8 {
            _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
