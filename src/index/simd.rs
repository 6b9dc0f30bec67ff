//! Dot products for vector search: a scalar `_ref` twin and SIMD versions (wasm simd128, x86_64 AVX2+FMA with
//! run-time detection, aarch64 NEON). They differ from the reference only by the order of the additions
//! (and FMA's single rounding), which the differential tests bound.

/// The scalar reference: one accumulator, in order.
pub fn dot_ref(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut s = 0.0f32;
    for (x, y) in a.iter().zip(b) {
        s += x * y;
    }
    s
}

/// The fastest dot product this build and CPU offer. `a` and `b` must have the same length.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    {
        dot_simd128(a, b)
    }
    #[cfg(target_arch = "x86_64")]
    {
        if avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked at run time).
            return unsafe { dot_avx2(a, b) };
        }
        dot_unrolled(a, b)
    }
    #[cfg(target_arch = "aarch64")]
    {
        dot_neon(a, b)
    }
    #[cfg(not(any(
        all(target_arch = "wasm32", target_feature = "simd128"),
        target_arch = "x86_64",
        target_arch = "aarch64"
    )))]
    {
        dot_unrolled(a, b)
    }
}

/// Eight independent accumulators: what the compiler vectorizes on any target (SSE2 on x86_64).
pub fn dot_unrolled(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s
}

#[cfg(target_arch = "x86_64")]
fn avx2_fma() -> bool {
    use std::sync::atomic::{AtomicU8, Ordering};
    static STATE: AtomicU8 = AtomicU8::new(0); // 0 unknown, 1 no, 2 yes
    match STATE.load(Ordering::Relaxed) {
        0 => {
            let yes = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma");
            STATE.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
            yes
        }
        s => s == 2,
    }
}

/// AVX2 + FMA: four 8-lane accumulators.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (all loads): i + 32 <= n (or i + 8 <= n below) and both slices hold n elements.
    while i + 32 <= n {
        for (j, acc) in acc.iter_mut().enumerate() {
            let x = _mm256_loadu_ps(pa.add(i + 8 * j));
            let y = _mm256_loadu_ps(pb.add(i + 8 * j));
            *acc = _mm256_fmadd_ps(x, y, *acc);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(i)),
            _mm256_loadu_ps(pb.add(i)),
            acc[0],
        );
        i += 8;
    }
    let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s4 = _mm_add_ps(lo, hi);
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    let mut s = _mm_cvtss_f32(s1);
    while i < n {
        s += *pa.add(i) * *pb.add(i);
        i += 1;
    }
    s
}

/// wasm simd128: four 4-lane accumulators.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
pub fn dot_simd128(a: &[f32], b: &[f32]) -> f32 {
    use core::arch::wasm32::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [f32x4_splat(0.0); 4];
    let mut i = 0;
    // SAFETY (all loads): unaligned v128 loads of elements i..i+4 with i + 4 <= n; both slices hold n elements.
    unsafe {
        while i + 16 <= n {
            for (j, acc) in acc.iter_mut().enumerate() {
                let x = v128_load(pa.add(i + 4 * j) as *const v128);
                let y = v128_load(pb.add(i + 4 * j) as *const v128);
                *acc = f32x4_add(*acc, f32x4_mul(x, y));
            }
            i += 16;
        }
        while i + 4 <= n {
            let x = v128_load(pa.add(i) as *const v128);
            let y = v128_load(pb.add(i) as *const v128);
            acc[0] = f32x4_add(acc[0], f32x4_mul(x, y));
            i += 4;
        }
    }
    let v = f32x4_add(f32x4_add(acc[0], acc[1]), f32x4_add(acc[2], acc[3]));
    let mut s = (f32x4_extract_lane::<0>(v) + f32x4_extract_lane::<1>(v))
        + (f32x4_extract_lane::<2>(v) + f32x4_extract_lane::<3>(v));
    while i < n {
        s += a[i] * b[i];
        i += 1;
    }
    s
}

/// aarch64 NEON: four 4-lane accumulators with fused multiply-add.
#[cfg(target_arch = "aarch64")]
pub fn dot_neon(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::aarch64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut i = 0;
    // SAFETY: NEON is part of the aarch64 baseline; loads stay within the first n elements.
    unsafe {
        let mut acc = [vdupq_n_f32(0.0); 4];
        while i + 16 <= n {
            for (j, acc) in acc.iter_mut().enumerate() {
                *acc = vfmaq_f32(
                    *acc,
                    vld1q_f32(pa.add(i + 4 * j)),
                    vld1q_f32(pb.add(i + 4 * j)),
                );
            }
            i += 16;
        }
        let v = vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3]));
        let mut s = vaddvq_f32(v);
        while i < n {
            s += a[i] * b[i];
            i += 1;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Every SIMD variant against the scalar reference, on lengths around every lane and unroll boundary.
    /// Bound: reordering n products changes the sum by at most about n·ε·Σ|aᵢbᵢ| (ε = 2⁻²⁴), both sides.
    #[test]
    fn dot_variants_match_reference() {
        type Dot = fn(&[f32], &[f32]) -> f32;
        let mut variants: Vec<(&str, Dot)> = vec![("dot", dot), ("dot_unrolled", dot_unrolled)];
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        variants.push(("dot_simd128", dot_simd128));
        #[cfg(target_arch = "aarch64")]
        variants.push(("dot_neon", dot_neon));
        #[cfg(target_arch = "x86_64")]
        fn avx(a: &[f32], b: &[f32]) -> f32 {
            if avx2_fma() {
                // SAFETY: checked just above.
                unsafe { dot_avx2(a, b) }
            } else {
                dot_ref(a, b)
            }
        }
        #[cfg(target_arch = "x86_64")]
        variants.push(("dot_avx2", avx));
        for n in (0..70).chain([127, 128, 129, 383, 384, 385, 1000]) {
            let (a, b) = (values(n, n as u64 + 1), values(n, n as u64 + 1000));
            let want = dot_ref(&a, &b) as f64;
            let abs: f64 = a.iter().zip(&b).map(|(x, y)| (x * y).abs() as f64).sum();
            let bound = 2.0 * (n as f64 + 1.0) * f32::EPSILON as f64 * abs + 1e-30;
            for (name, f) in &variants {
                let got = f(&a, &b) as f64;
                assert!(
                    (got - want).abs() <= bound,
                    "{name} n={n}: {got} vs {want} (bound {bound})"
                );
            }
        }
    }
}
