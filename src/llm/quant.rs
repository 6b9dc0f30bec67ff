//! GGML / GGUF tensor formats: block layouts, dequantization and dot products that read the weights in place.
//!
//! A GGUF tensor row is a run of fixed-size *blocks*. Each block holds `block_len` elements: a few f16 scale
//! fields and the packed integer codes (little-endian throughout). The formats handled here:
//!
//! | type   | elements | bytes | element value                                                          |
//! |--------|----------|-------|------------------------------------------------------------------------|
//! | F32    | 1        | 4     | the value                                                              |
//! | F16    | 1        | 2     | IEEE half                                                              |
//! | BF16   | 1        | 2     | the top 16 bits of an f32                                              |
//! | Q4_0   | 32       | 18    | `d·(q−8)`, q a nibble: low nibbles are elements 0..16, high 16..32     |
//! | Q4_1   | 32       | 20    | `d·q + m`                                                              |
//! | Q5_0   | 32       | 22    | `d·(q−16)`, the 5th bit of element j is bit j of a u32                 |
//! | Q5_1   | 32       | 24    | `d·q + m`                                                              |
//! | Q8_0   | 32       | 34    | `d·q`, q an i8                                                         |
//! | Q2_K   | 256      | 84    | `(d·sc)·q − dmin·m`, 2-bit q, 4-bit sc/m per 16 elements               |
//! | Q3_K   | 256      | 110   | `(d·(sc−32))·q`, q = 2 low bits − 4·(high bit clear), 6-bit sc per 16  |
//! | Q4_K   | 256      | 144   | `(d·sc)·q − dmin·m`, 4-bit q, 6-bit sc/m per 32 elements               |
//! | Q5_K   | 256      | 176   | as Q4_K with a 5th bit per element                                     |
//! | Q6_K   | 256      | 210   | `(d·sc)·(q−32)`, 6-bit q, i8 sc per 16 elements                        |
//!
//! (the exact bit positions are spelled out in [`dequantize_row_ref`]).
//!
//! Every operation comes as a scalar reference (`*_ref`: one element at a time, exactly as the format defines
//! it) and as a fast version that dispatches to the best [`Backend`] of this build and CPU: wasm `simd128`
//! (compile time), x86_64 AVX2 + FMA + F16C (run-time detection, cached), or portable Rust that the compiler
//! vectorizes (every other target, aarch64 included).
//!
//! * Dequantization is bit-identical to the reference on every backend: the same f32 multiply and add, in the
//!   same order, one rounding each (never FMA).
//! * Dot products are fused: a block's codes are widened to f32 lanes in registers, multiplied with the
//!   activations and summed per scale group (16 or 32 elements); the scale is applied once per group
//!   (`acc += d·Σq·x`), and for the affine formats the offset as `m·Σx`, with the sums of `x` over each 16
//!   elements computed once per [`matvec`]. They differ from [`dot_row_ref`] only in the order of the
//!   additions and FMA's single rounding.
//! * [`matmul`] (prompt prefill) dequantizes a panel of weight rows once into an f32 scratch buffer and runs a
//!   register-tiled f32 kernel (4 rows × 2 vectors; 4-lane registers on wasm) over all the vectors.
//! * [`matvec_q`] (decoding, opt-in) takes the activations quantized once per matvec to i16 per 32-element
//!   block ([`QuantizedActs`]): every row is then integer dot products (AVX2 `vpmaddwd`, wasm
//!   `i32x4.dot_i16x8`: 16 / 8 multiply-adds an instruction, weights sign-extended to i16), an exact i32 sum
//!   per scale group, scaled once in f32; the affine formats' offsets multiply f32 sums of the original `x`.
//!   Its results differ from [`matvec`]'s by the quantization error of `x` (bounded in [`matvec_q`]);
//!   [`dot_row_q_ref`] is its scalar reference.
//!
//! The kernels are written once, generically, against a small internal trait of 8-lane f32 and 16-byte
//! integer operations, implemented three times (AVX2, simd128, portable arrays). Each block format is a
//! decoder that turns a block into groups of 16 i8 codes with their scale (and offset); a *sink* either
//! stores `d·q (+ m)` (dequantization) or accumulates it against the activations (dot product). Blocks are
//! taken as fixed-size arrays (`as_chunks`), so every offset inside a block is checked at compile time. The
//! only `unsafe` is in the SIMD backends: the intrinsics (on x86_64 behind a token that only run-time
//! detection creates) and unaligned loads and stores through references to arrays of exactly that size.

use std::array;

// ---------------------------------------------------------------------------------------------------------
// Types
// ---------------------------------------------------------------------------------------------------------

/// A ggml tensor type (the subset this crate reads).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
}

impl GgmlType {
    /// Every supported type.
    pub const ALL: [GgmlType; 13] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    /// The type with ggml id `v`, if this crate supports it.
    pub fn from_u32(v: u32) -> Option<GgmlType> {
        Some(match v {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            10 => GgmlType::Q2_K,
            11 => GgmlType::Q3_K,
            12 => GgmlType::Q4_K,
            13 => GgmlType::Q5_K,
            14 => GgmlType::Q6_K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// The ggml type id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q2_K => 10,
            GgmlType::Q3_K => 11,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// The ggml name ("F32", "Q4_K", ...).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q2_K => "Q2_K",
            GgmlType::Q3_K => "Q3_K",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
        }
    }

    /// Elements per block.
    pub fn block_len(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                32
            }
            GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => {
                256
            }
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q2_K => 84,
            GgmlType::Q3_K => 110,
            GgmlType::Q4_K => 144,
            GgmlType::Q5_K => 176,
            GgmlType::Q6_K => 210,
        }
    }

    /// Bytes of a row of `n` elements; `None` when `n` is not a whole number of blocks or the size overflows.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_len()) {
            return None;
        }
        (n / self.block_len()).checked_mul(self.block_bytes())
    }
}

// ---------------------------------------------------------------------------------------------------------
// f16 / bf16
// ---------------------------------------------------------------------------------------------------------

/// IEEE half → f32, exact. Subnormals, zeros and infinities convert exactly; a NaN keeps its sign and payload
/// and comes back quiet (the quiet bit set, as x86's F16C does).
pub fn f16_to_f32(h: u16) -> f32 {
    let em = u32::from(h & 0x7fff);
    if em.wrapping_sub(0x0400) < 0x7800 {
        // Normal (exponent 1..=30), the common case: sign-extended and shifted, the sign lands in bit 31 and
        // exponent + mantissa in bits 13..28; clear bits 28..31 but the sign and rebias by 127 − 15.
        let t = (i32::from(h as i16) << 13) as u32 & 0x8fff_e000;
        return f32::from_bits(t + ((127 - 15) << 23));
    }
    let sign = u32::from(h & 0x8000) << 16;
    let bits = if em >= 0x7c00 {
        // Infinity or NaN: the f32 exponent is all ones, the 10 mantissa bits move to the top.
        let nan_quiet = if em > 0x7c00 { 0x0040_0000 } else { 0 };
        0x7f80_0000 | ((em & 0x3ff) << 13) | nan_quiet
    } else {
        // Zero or subnormal: the value is mantissa · 2⁻²⁴, exact in f32.
        (em as f32 * (1.0 / 16_777_216.0)).to_bits()
    };
    f32::from_bits(sign | bits)
}

/// f32 → IEEE half, rounding to nearest, ties to even. Values beyond the half range become ±infinity, values
/// below half the smallest subnormal become ±0, NaN stays NaN (quiet, top payload bits kept).
pub fn f32_to_f16(f: f32) -> u16 {
    let x = f.to_bits();
    let sign = ((x >> 16) & 0x8000) as u16;
    let exp = (x >> 23) & 0xff;
    let man = x & 0x007f_ffff;
    if exp == 0xff {
        return if man == 0 {
            sign | 0x7c00
        } else {
            sign | 0x7e00 | (man >> 13) as u16
        };
    }
    // Half exponent field for a normal result.
    let e = exp as i32 - 127 + 15;
    if e >= 31 {
        return sign | 0x7c00;
    }
    if e <= 0 {
        // Subnormal half (or zero). The value is m · 2^(exp−150) with m the 24-bit significand; in units of
        // the half subnormal step 2⁻²⁴ that is m >> (126 − exp).
        if exp < 102 {
            // Below 2⁻²⁵: rounds to zero.
            return sign;
        }
        let m = man | 0x0080_0000;
        let shift = 126 - exp; // 14..=24
        let mut h = m >> shift;
        let rem = m & ((1 << shift) - 1);
        let half = 1 << (shift - 1);
        if rem > half || (rem == half && h & 1 == 1) {
            h += 1; // may carry into the smallest normal, which is the right encoding
        }
        return sign | h as u16;
    }
    let mut h = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    if rem > 0x1000 || (rem == 0x1000 && h & 1 == 1) {
        h += 1; // a carry out of the mantissa bumps the exponent; out of the top it makes infinity
    }
    sign | h as u16
}

/// bfloat16 → f32 (exact: the half is the f32's top 16 bits).
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

// ---------------------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------------------

/// `M` elements of `s` from `off`, as an array reference (panics when out of range; with constant offsets
/// into fixed-size arrays the check disappears at compile time).
#[inline(always)]
fn arr<T, const M: usize>(s: &[T], off: usize) -> &[T; M] {
    s[off..off + M].try_into().unwrap()
}

#[inline(always)]
fn arr_mut<T, const M: usize>(s: &mut [T], off: usize) -> &mut [T; M] {
    (&mut s[off..off + M]).try_into().unwrap()
}

#[inline(always)]
fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(*arr(b, off))
}

#[inline(always)]
fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(*arr(b, off))
}

#[inline(always)]
fn f16_at(b: &[u8], off: usize) -> f32 {
    f16_to_f32(le16(b, off))
}

/// Q4_K / Q5_K: the 6-bit scale and min of sub-block `j` (0..8) from the 12 packed bytes. Sub-blocks 0..4 use
/// the low 6 bits of bytes j and j+4; sub-blocks 4..8 take their low 4 bits from byte j+4 (scale: low nibble,
/// min: high nibble) and their top 2 bits from the top bits of bytes j−4 (scale) and j (min).
#[inline(always)]
fn scale_min_k4(j: usize, sc: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (sc[j] & 63, sc[j + 4] & 63)
    } else {
        (
            (sc[j + 4] & 0x0f) | ((sc[j - 4] >> 6) << 4),
            (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4),
        )
    }
}

/// Q3_K: the signed scale (−32..31) of 16-element group `k` (0..16). Its low 4 bits are the low (k < 8) or
/// high (k ≥ 8) nibble of byte k mod 8; its top 2 bits are bits 2·(k/4)..+2 of byte 8 + k mod 4.
#[inline(always)]
fn q3k_scale(sc: &[u8; 12], k: usize) -> i32 {
    let low = if k < 8 { sc[k] & 0x0f } else { sc[k - 8] >> 4 };
    let high = (sc[8 + k % 4] >> (2 * (k / 4))) & 3;
    i32::from(low | (high << 4)) - 32
}

/// For each byte value: a u64 whose byte i is 0x10 when bit i is set (the 5th bit of Q5_0 / Q5_1 codes).
static BIT4_LUT: [u64; 256] = bit4_lut();

const fn bit4_lut() -> [u64; 256] {
    let mut t = [0u64; 256];
    let mut v = 0;
    while v < 256 {
        let mut i = 0;
        let mut e = 0u64;
        while i < 8 {
            if (v >> i) & 1 == 1 {
                e |= 0x10 << (8 * i);
            }
            i += 1;
        }
        t[v] = e;
        v += 1;
    }
    t
}

// ---------------------------------------------------------------------------------------------------------
// Scalar reference
// ---------------------------------------------------------------------------------------------------------

/// Scalar reference dequantization: one element at a time, f32 arithmetic exactly as the format defines it.
/// `src.len()` must be `t.row_bytes(dst.len())`.
pub fn dequantize_row_ref(t: GgmlType, src: &[u8], dst: &mut [f32]) {
    assert_eq!(
        Some(src.len()),
        t.row_bytes(dst.len()),
        "dequantize_row_ref: length mismatch"
    );
    for (b, y) in src
        .chunks_exact(t.block_bytes())
        .zip(dst.chunks_exact_mut(t.block_len()))
    {
        ref_block(t, b, y);
    }
}

/// Scalar reference dot product of a quantized row with `x`: each element is dequantized as in
/// [`dequantize_row_ref`] and `w·x` is added to a single f32 accumulator, in element order.
pub fn dot_row_ref(t: GgmlType, w: &[u8], x: &[f32]) -> f32 {
    assert_eq!(
        Some(w.len()),
        t.row_bytes(x.len()),
        "dot_row_ref: length mismatch"
    );
    let mut buf = [0.0f32; 256];
    let mut acc = 0.0f32;
    for (b, xs) in w
        .chunks_exact(t.block_bytes())
        .zip(x.chunks_exact(t.block_len()))
    {
        let y = &mut buf[..t.block_len()];
        ref_block(t, b, y);
        for (wv, xv) in y.iter().zip(xs) {
            acc += wv * xv;
        }
    }
    acc
}

/// One block of the reference, element by element, written from the layout description (and independent of
/// the decoders the fast paths use).
#[allow(clippy::needless_range_loop)]
fn ref_block(t: GgmlType, b: &[u8], y: &mut [f32]) {
    match t {
        GgmlType::F32 => y[0] = f32::from_le_bytes(*arr(b, 0)),
        GgmlType::F16 => y[0] = f16_to_f32(le16(b, 0)),
        GgmlType::BF16 => y[0] = bf16_to_f32(le16(b, 0)),
        GgmlType::Q4_0 => {
            // d f16 | qs[16]
            let d = f16_at(b, 0);
            for j in 0..16 {
                let v = b[2 + j];
                y[j] = d * ((v & 0x0f) as i32 - 8) as f32;
                y[j + 16] = d * ((v >> 4) as i32 - 8) as f32;
            }
        }
        GgmlType::Q4_1 => {
            // d f16 | m f16 | qs[16]
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            for j in 0..16 {
                let v = b[4 + j];
                y[j] = d * (v & 0x0f) as f32 + m;
                y[j + 16] = d * (v >> 4) as f32 + m;
            }
        }
        GgmlType::Q5_0 => {
            // d f16 | qh u32 | qs[16]
            let d = f16_at(b, 0);
            let qh = le32(b, 2);
            for j in 0..16 {
                let v = u32::from(b[6 + j]);
                let lo = (v & 0x0f) | (((qh >> j) & 1) << 4);
                let hi = (v >> 4) | (((qh >> (j + 16)) & 1) << 4);
                y[j] = d * (lo as i32 - 16) as f32;
                y[j + 16] = d * (hi as i32 - 16) as f32;
            }
        }
        GgmlType::Q5_1 => {
            // d f16 | m f16 | qh u32 | qs[16]
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            let qh = le32(b, 4);
            for j in 0..16 {
                let v = u32::from(b[8 + j]);
                let lo = (v & 0x0f) | (((qh >> j) & 1) << 4);
                let hi = (v >> 4) | (((qh >> (j + 16)) & 1) << 4);
                y[j] = d * lo as f32 + m;
                y[j + 16] = d * hi as f32 + m;
            }
        }
        GgmlType::Q8_0 => {
            // d f16 | qs i8[32]
            let d = f16_at(b, 0);
            for j in 0..32 {
                y[j] = d * (b[2 + j] as i8) as f32;
            }
        }
        GgmlType::Q2_K => {
            // scales[16] (low nibble scale, high nibble min) | qs[64] | d f16 | dmin f16.
            // Element e = 128·n + 32·j + l: bits 2j..2j+2 of qs[32n + l]; its group of 16 is e/16.
            let (sc, qs) = (&b[0..16], &b[16..80]);
            let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
            for e in 0..256 {
                let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
                let q = (qs[32 * n + l] >> (2 * j)) & 3;
                let s = sc[e / 16];
                let dl = d * (s & 0x0f) as f32;
                let ml = dmin * (s >> 4) as f32;
                y[e] = dl * q as f32 - ml;
            }
        }
        GgmlType::Q3_K => {
            // hmask[32] | qs[64] | scales[12] | d f16.
            // Element e = 128·n + 32·j + l: low bits 2j..2j+2 of qs[32n + l], high bit 4n + j of hmask[l];
            // q = low − 4 when the high bit is clear. Scale of group e/16 from the 12-byte packing.
            let (hm, qs) = (&b[0..32], &b[32..96]);
            let scales = q3k_scales_ref(&b[96..108]);
            let d = f16_at(b, 108);
            for e in 0..256 {
                let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
                let low = ((qs[32 * n + l] >> (2 * j)) & 3) as i32;
                let high = (hm[l] >> (4 * n + j)) & 1;
                let q = low - if high == 1 { 0 } else { 4 };
                let dl = d * (scales[e / 16] as i32 - 32) as f32;
                y[e] = dl * q as f32;
            }
        }
        GgmlType::Q4_K => {
            // d f16 | dmin f16 | scales[12] | qs[128].
            // Element e: sub-block s = e/32; byte qs[32·(e/64) + e%32], low nibble for even s, high for odd.
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let sc: &[u8; 12] = arr(b, 4);
            let qs = &b[16..144];
            for e in 0..256 {
                let s = e / 32;
                let byte = qs[32 * (e / 64) + e % 32];
                let q = if s % 2 == 0 { byte & 0x0f } else { byte >> 4 };
                let (scale, min) = scale_min_k4(s, sc);
                let d1 = d * scale as f32;
                let m1 = dmin * min as f32;
                y[e] = d1 * q as f32 - m1;
            }
        }
        GgmlType::Q5_K => {
            // d f16 | dmin f16 | scales[12] | qh[32] | qs[128]: as Q4_K, plus bit s of qh[e%32] as the 5th bit.
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let sc: &[u8; 12] = arr(b, 4);
            let (qh, qs) = (&b[16..48], &b[48..176]);
            for e in 0..256 {
                let s = e / 32;
                let byte = qs[32 * (e / 64) + e % 32];
                let low = if s % 2 == 0 { byte & 0x0f } else { byte >> 4 };
                let q = low | (((qh[e % 32] >> s) & 1) << 4);
                let (scale, min) = scale_min_k4(s, sc);
                let d1 = d * scale as f32;
                let m1 = dmin * min as f32;
                y[e] = d1 * q as f32 - m1;
            }
        }
        GgmlType::Q6_K => {
            // ql[128] | qh[64] | scales i8[16] | d f16.
            // Element e = 128·n + 32·g + l: low 4 bits from ql[64n + 32·(g%2) + l] (low nibble for g < 2,
            // high for g ≥ 2), top 2 bits = bits 2g..2g+2 of qh[32n + l]; scale scales[8n + (e%128)/16].
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = f16_at(b, 208);
            for e in 0..256 {
                let (n, r) = (e / 128, e % 128);
                let (g, l) = (r / 32, r % 32);
                let byte = ql[64 * n + 32 * (g % 2) + l];
                let low = if g < 2 { byte & 0x0f } else { byte >> 4 };
                let high = (qh[32 * n + l] >> (2 * g)) & 3;
                let q = (low | (high << 4)) as i32 - 32;
                let s = sc[8 * n + r / 16] as i8;
                y[e] = (d * s as f32) * q as f32;
            }
        }
    }
}

/// Q3_K's 16 6-bit scales (unsigned, before the −32) from the 12 packed bytes, by the format's u32 recipe:
/// with a0, a1, t the three little-endian words, the four result words are
/// `a0 & 0x0f0f0f0f | (t & 0x03030303) << 4`, `a1 & 0x0f0f0f0f | (t >> 2 & 0x03030303) << 4`,
/// `a0 >> 4 & 0x0f0f0f0f | (t >> 4 & 0x03030303) << 4`, `a1 >> 4 & 0x0f0f0f0f | (t >> 6 & 0x03030303) << 4`.
fn q3k_scales_ref(b: &[u8]) -> [u8; 16] {
    const K1: u32 = 0x0303_0303;
    const K2: u32 = 0x0f0f_0f0f;
    let (a0, a1, t) = (le32(b, 0), le32(b, 4), le32(b, 8));
    let words = [
        (a0 & K2) | ((t & K1) << 4),
        (a1 & K2) | (((t >> 2) & K1) << 4),
        ((a0 >> 4) & K2) | (((t >> 4) & K1) << 4),
        ((a1 >> 4) & K2) | (((t >> 6) & K1) << 4),
    ];
    let mut out = [0u8; 16];
    for (o, w) in out.chunks_exact_mut(4).zip(words) {
        o.copy_from_slice(&w.to_le_bytes());
    }
    out
}

/// The integer view of one block, for [`dot_row_q_ref`]: the codes `q` (in element order) and the scale groups
/// `(first element, length, d, m)`: element `e` of a group is `d·q[e] + m` (`m` = 0 for the symmetric formats,
/// and `−m` for those defined as `d·q − m`), bit for bit what [`ref_block`] computes. Read from the layout
/// element by element like [`ref_block`], independently of the SIMD decoders. Groups are 32 elements where one
/// scale covers 32 (Q4_0 … Q8_0, Q4_K, Q5_K), else 16.
#[allow(clippy::needless_range_loop)]
fn ref_codes(t: GgmlType, b: &[u8], q: &mut [i32; 256]) -> Vec<(usize, usize, f32, f32)> {
    let mut groups = Vec::new();
    match t {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {}
        GgmlType::Q4_0 => {
            for j in 0..16 {
                let v = b[2 + j];
                q[j] = i32::from(v & 0x0f) - 8;
                q[j + 16] = i32::from(v >> 4) - 8;
            }
            groups.push((0, 32, f16_at(b, 0), 0.0));
        }
        GgmlType::Q4_1 => {
            for j in 0..16 {
                let v = b[4 + j];
                q[j] = i32::from(v & 0x0f);
                q[j + 16] = i32::from(v >> 4);
            }
            groups.push((0, 32, f16_at(b, 0), f16_at(b, 2)));
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let (qh_at, qs_at) = if t == GgmlType::Q5_0 { (2, 6) } else { (4, 8) };
            let qh = le32(b, qh_at);
            let c = if t == GgmlType::Q5_0 { 16 } else { 0 };
            for j in 0..16 {
                let v = u32::from(b[qs_at + j]);
                q[j] = ((v & 0x0f) | (((qh >> j) & 1) << 4)) as i32 - c;
                q[j + 16] = ((v >> 4) | (((qh >> (j + 16)) & 1) << 4)) as i32 - c;
            }
            let m = if t == GgmlType::Q5_0 {
                0.0
            } else {
                f16_at(b, 2)
            };
            groups.push((0, 32, f16_at(b, 0), m));
        }
        GgmlType::Q8_0 => {
            for j in 0..32 {
                q[j] = i32::from(b[2 + j] as i8);
            }
            groups.push((0, 32, f16_at(b, 0), 0.0));
        }
        GgmlType::Q2_K => {
            let (sc, qs) = (&b[0..16], &b[16..80]);
            let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
            for e in 0..256 {
                let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
                q[e] = i32::from((qs[32 * n + l] >> (2 * j)) & 3);
            }
            for (g, &s) in sc.iter().enumerate() {
                groups.push((16 * g, 16, d * (s & 0x0f) as f32, -(dmin * (s >> 4) as f32)));
            }
        }
        GgmlType::Q3_K => {
            let (hm, qs) = (&b[0..32], &b[32..96]);
            let scales = q3k_scales_ref(&b[96..108]);
            let d = f16_at(b, 108);
            for e in 0..256 {
                let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
                let low = i32::from((qs[32 * n + l] >> (2 * j)) & 3);
                let high = (hm[l] >> (4 * n + j)) & 1;
                q[e] = low - if high == 1 { 0 } else { 4 };
            }
            for (g, &s) in scales.iter().enumerate() {
                groups.push((16 * g, 16, d * (i32::from(s) - 32) as f32, 0.0));
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let sc: &[u8; 12] = arr(b, 4);
            let qs_at = if t == GgmlType::Q4_K { 16 } else { 48 };
            for e in 0..256 {
                let s = e / 32;
                let byte = b[qs_at + 32 * (e / 64) + e % 32];
                let low = if s % 2 == 0 { byte & 0x0f } else { byte >> 4 };
                let high = if t == GgmlType::Q5_K {
                    ((b[16 + e % 32] >> s) & 1) << 4
                } else {
                    0
                };
                q[e] = i32::from(low | high);
            }
            for s in 0..8 {
                let (scale, min) = scale_min_k4(s, sc);
                groups.push((32 * s, 32, d * scale as f32, -(dmin * min as f32)));
            }
        }
        GgmlType::Q6_K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = f16_at(b, 208);
            for e in 0..256 {
                let (n, r) = (e / 128, e % 128);
                let (g, l) = (r / 32, r % 32);
                let byte = ql[64 * n + 32 * (g % 2) + l];
                let low = if g < 2 { byte & 0x0f } else { byte >> 4 };
                let high = (qh[32 * n + l] >> (2 * g)) & 3;
                q[e] = i32::from(low | (high << 4)) - 32;
            }
            for (g, &s) in sc.iter().enumerate() {
                groups.push((16 * g, 16, d * f32::from(s as i8), 0.0));
            }
        }
    }
    groups
}

// ---------------------------------------------------------------------------------------------------------
// Backends and dispatch
// ---------------------------------------------------------------------------------------------------------

/// An implementation of the kernels. [`Backend::best`] is what the plain functions use; the `*_with` functions
/// take one explicitly (tests and benchmarks run each). An unavailable backend falls back to `Portable`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// Plain Rust on fixed-size arrays, which the compiler partly vectorizes: the fallback (aarch64, wasm
    /// without `simd128`, x86_64 without AVX2).
    Portable,
    /// x86_64 AVX2 + FMA + F16C, detected at run time.
    Avx2,
    /// wasm32 `simd128` (when the build enables the target feature).
    Simd128,
}

impl Backend {
    /// The fastest backend this build and CPU offer.
    pub fn best() -> Backend {
        if Backend::Simd128.is_available() {
            Backend::Simd128
        } else if Backend::Avx2.is_available() {
            Backend::Avx2
        } else {
            Backend::Portable
        }
    }

    /// Whether this backend runs here (otherwise the `*_with` functions use `Portable`).
    pub fn is_available(self) -> bool {
        match self {
            Backend::Portable => true,
            Backend::Avx2 => avx2_available(),
            Backend::Simd128 => cfg!(all(target_arch = "wasm32", target_feature = "simd128")),
        }
    }

    /// The backends that run here, `Portable` first.
    pub fn available() -> Vec<Backend> {
        [Backend::Portable, Backend::Avx2, Backend::Simd128]
            .into_iter()
            .filter(|b| b.is_available())
            .collect()
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_available() -> bool {
    use std::sync::atomic::{AtomicU8, Ordering};
    static STATE: AtomicU8 = AtomicU8::new(0); // 0 unknown, 1 no, 2 yes
    match STATE.load(Ordering::Relaxed) {
        0 => {
            let yes = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c");
            STATE.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
            yes
        }
        s => s == 2,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_available() -> bool {
    false
}

/// Dequantize a row: `src.len()` must be `t.row_bytes(dst.len())`. Bit-identical to [`dequantize_row_ref`].
pub fn dequantize_row(t: GgmlType, src: &[u8], dst: &mut [f32]) {
    dequantize_row_with(Backend::best(), t, src, dst);
}

/// [`dequantize_row`] on a given backend.
pub fn dequantize_row_with(b: Backend, t: GgmlType, src: &[u8], dst: &mut [f32]) {
    assert_eq!(
        Some(src.len()),
        t.row_bytes(dst.len()),
        "dequantize_row: length mismatch"
    );
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    if b == Backend::Simd128 {
        return wasm::dequantize(t, src, dst);
    }
    #[cfg(target_arch = "x86_64")]
    if b == Backend::Avx2 {
        if let Some(s) = x86::Avx2::detect() {
            return x86::dequantize(s, t, src, dst);
        }
    }
    let _ = b;
    kern_dequantize(Portable, t, src, dst);
}

/// Dot product of one quantized row (`t.row_bytes(x.len())` bytes) with the activations `x`, fused
/// (dequantized in registers). Differs from [`dot_row_ref`] only by the order of the additions and FMA.
pub fn dot_row(t: GgmlType, w: &[u8], x: &[f32]) -> f32 {
    dot_row_with(Backend::best(), t, w, x)
}

/// [`dot_row`] on a given backend.
pub fn dot_row_with(b: Backend, t: GgmlType, w: &[u8], x: &[f32]) -> f32 {
    let mut out = [0.0f32];
    matvec_with(b, t, w, 1, x.len(), x, &mut out);
    out[0]
}

/// Matrix × vector: `w` holds `rows` rows of `cols` elements (`t.row_bytes(cols)` bytes each);
/// `out[r] = dot_row(row r, x)`.
pub fn matvec(t: GgmlType, w: &[u8], rows: usize, cols: usize, x: &[f32], out: &mut [f32]) {
    matvec_with(Backend::best(), t, w, rows, cols, x, out);
}

/// The checks every matrix × vector entry point makes (a wrong length panics, never reads out of bounds);
/// returns the bytes per row.
fn matvec_shape(
    what: &str,
    t: GgmlType,
    w: &[u8],
    rows: usize,
    cols: usize,
    x_len: usize,
    out_len: usize,
) -> usize {
    let rb = t
        .row_bytes(cols)
        .unwrap_or_else(|| panic!("{what}: cols is not a whole number of blocks"));
    assert_eq!(
        Some(w.len()),
        rows.checked_mul(rb),
        "{what}: weight length mismatch"
    );
    assert_eq!(x_len, cols, "{what}: activation length mismatch");
    assert_eq!(out_len, rows, "{what}: output length mismatch");
    rb
}

/// [`matvec`] on a given backend.
pub fn matvec_with(
    b: Backend,
    t: GgmlType,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    out: &mut [f32],
) {
    let rb = matvec_shape("matvec", t, w, rows, cols, x.len(), out.len());
    if rb == 0 {
        out.fill(0.0);
        return;
    }
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    if b == Backend::Simd128 {
        return wasm::dot_rows(t, w, rb, x, out);
    }
    #[cfg(target_arch = "x86_64")]
    if b == Backend::Avx2 {
        if let Some(s) = x86::Avx2::detect() {
            return x86::dot_rows(s, t, w, rb, x, out);
        }
    }
    let _ = b;
    kern_dot_rows(Portable, t, w, rb, x, out);
}

/// Rows dequantized together in [`matmul`]'s scratch panel.
const PANEL_ROWS: usize = 16;

/// Matrix × matrix for prompt prefill: `xs` holds `n` activation vectors of `cols` (row-major), `out` is
/// `n × rows` row-major with `out[i·rows + r] = dot(row r, xs[i])`. Each panel of weight rows is dequantized
/// once into an f32 scratch buffer, then a register-tiled f32 kernel runs over all `n` vectors. Equal to `n`
/// calls of [`matvec`] up to the order of the additions (for n ≤ 2 it is those calls).
pub fn matmul(
    t: GgmlType,
    w: &[u8],
    rows: usize,
    cols: usize,
    xs: &[f32],
    n: usize,
    out: &mut [f32],
) {
    matmul_with(Backend::best(), t, w, rows, cols, xs, n, out);
}

/// [`matmul`] on a given backend.
#[allow(clippy::too_many_arguments)]
pub fn matmul_with(
    b: Backend,
    t: GgmlType,
    w: &[u8],
    rows: usize,
    cols: usize,
    xs: &[f32],
    n: usize,
    out: &mut [f32],
) {
    let rb = t
        .row_bytes(cols)
        .expect("matmul: cols is not a whole number of blocks");
    assert_eq!(
        Some(w.len()),
        rows.checked_mul(rb),
        "matmul: weight length mismatch"
    );
    assert_eq!(
        Some(xs.len()),
        n.checked_mul(cols),
        "matmul: activation length mismatch"
    );
    assert_eq!(
        Some(out.len()),
        n.checked_mul(rows),
        "matmul: output length mismatch"
    );
    if n <= 2 || rows == 0 || cols == 0 {
        // Dequantizing costs about one fused dot product, so for one or two vectors fused is as fast.
        for (x, o) in xs
            .chunks_exact(cols.max(1))
            .zip(out.chunks_exact_mut(rows.max(1)))
        {
            matvec_with(b, t, w, rows, cols, x, o);
        }
        if cols == 0 {
            out.fill(0.0);
        }
        return;
    }
    let mut scratch = vec![0.0f32; PANEL_ROWS.min(rows) * cols];
    for r0 in (0..rows).step_by(PANEL_ROWS) {
        let nr = PANEL_ROWS.min(rows - r0);
        let panel = &mut scratch[..nr * cols];
        dequantize_row_with(b, t, &w[r0 * rb..(r0 + nr) * rb], panel);
        let job = Tiles {
            panel,
            nr,
            cols,
            xs,
            n,
            rows,
            r0,
        };
        tiles_with(b, &job, out);
    }
}

/// Dot product of two f32 slices of equal length (attention scores): the same dispatch.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    dot_f32_with(Backend::best(), a, b)
}

/// [`dot_f32`] on a given backend.
pub fn dot_f32_with(be: Backend, a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot_f32: length mismatch");
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    if be == Backend::Simd128 {
        return wasm::dot_f32(a, b);
    }
    #[cfg(target_arch = "x86_64")]
    if be == Backend::Avx2 {
        if let Some(s) = x86::Avx2::detect() {
            return x86::dot_f32(s, a, b);
        }
    }
    let _ = be;
    kern_dot_f32(Portable, a, b)
}

/// `y[j] += g[0]·w[0][j] + g[1]·w[1][j] + g[2]·w[2][j] + g[3]·w[3][j]`: four rows of a matrix scaled and added
/// (training's product with a transposed weight matrix, `dx = Wᵀ dy`, four rows at a time). Every `w[k]` has
/// `y.len()` elements. Same dispatch as [`dot_f32`]; backends differ only in rounding (fused or not).
pub fn axpy4(g: [f32; 4], w: [&[f32]; 4], y: &mut [f32]) {
    axpy4_with(Backend::best(), g, w, y);
}

/// [`axpy4`] on a given backend.
pub fn axpy4_with(be: Backend, g: [f32; 4], w: [&[f32]; 4], y: &mut [f32]) {
    assert!(
        w.iter().all(|r| r.len() == y.len()),
        "axpy4: length mismatch"
    );
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    if be == Backend::Simd128 {
        return wasm::axpy4(g, w, y);
    }
    #[cfg(target_arch = "x86_64")]
    if be == Backend::Avx2 {
        if let Some(s) = x86::Avx2::detect() {
            return x86::axpy4(s, g, w, y);
        }
    }
    let _ = be;
    kern_axpy4(Portable, g, w, y)
}

// ---------------------------------------------------------------------------------------------------------
// Integer activations: matvec with x quantized to int16
// ---------------------------------------------------------------------------------------------------------

/// Largest activation code: codes are symmetric, −32767..=32767 (never −32768, see [`matvec_q`]).
const ACT_QMAX: f32 = 32767.0;

/// An activation vector quantized for integer dot products ([`matvec_q`]), once per matvec and shared by all
/// rows. Per 32-element block `b`: the scale `s_b = max|x_b| / 32767` (0 for an all-zero block) and the codes
/// `q = round(x / s_b)` as i16, with `|x − q·s_b| ≤ s_b/2` and `|q| ≤ 32767`; plus f32 sums of the original
/// `x` over each 16 and each 32 elements (the offsets `m` of the affine formats multiply them, so that term
/// sees no quantization error) and a copy of `x` (for the plain-float types, which [`matvec_q`] runs on the
/// f32 path). The buffers are kept between calls: no allocation once they have grown.
///
/// `x` should be finite: a non-finite element gives meaningless results (but neither a panic nor UB).
#[derive(Clone, Debug, Default)]
pub struct QuantizedActs {
    x: Vec<f32>,
    q: Vec<i16>,
    scales: Vec<f32>,
    sums16: Vec<f32>,
    sums32: Vec<f32>,
}

/// The scale of a block whose largest magnitude is `max`: `max / 32767` in f32, or 0 when `max` is 0. For a
/// normal result `max / s ≤ 32767·(1 + 2⁻²⁴)`; a subnormal one may be rounded down so far that codes would
/// pass 32767 (or to 0), so it steps up until `max / s ≤ 32767.25` (at most a step or two).
fn act_scale(max: f32) -> f32 {
    if max > 0.0 {
        let mut s = max / ACT_QMAX;
        while s == 0.0 || f64::from(max) / f64::from(s) > 32767.25 {
            s = f32::from_bits(s.to_bits() + 1);
        }
        s
    } else {
        0.0 // all zero (or NaN)
    }
}

/// The f32 sum of 16 values in a fixed pairwise order (vectorizes).
#[inline(always)]
fn sum16_f32(x: &[f32; 16]) -> f32 {
    let a: [f32; 8] = array::from_fn(|i| x[i] + x[i + 8]);
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

impl QuantizedActs {
    /// Empty buffers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Quantize `x` (its length a multiple of 32; the K-quant types need a multiple of 256 to match a row).
    ///
    /// Each code is `round(x/s)` with the quotient computed in f64 as `x·(1/s)` and rounded to nearest (ties to
    /// even). That quotient is never on the other side of a half-integer than the exact `x/s`, nor on one
    /// unless `x/s` is: with x = X·2ᵃ, s = S·2ᵇ (X, S integers below 2²⁴) a quotient that is no half-integer is
    /// at least min(1, 2^(a−b))/(2S) from one, while the two f64 roundings move it by at most
    /// 2⁻⁵²·(X/S)·2^(a−b) (< 2^(a−b)·2⁻²⁸/S, and ≤ 2⁻⁵²·32768 = 2⁻³⁷ < 1/(2S)). So `|x − q·s| ≤ s/2` holds
    /// exactly. `|x| ≤ max` and `max/s ≤ 32767.25` (see `act_scale`) give `|q| ≤ 32767`.
    pub fn quantize(&mut self, x: &[f32]) {
        assert!(
            x.len().is_multiple_of(32),
            "QuantizedActs::quantize: length {} is not a multiple of 32",
            x.len()
        );
        let nb = x.len() / 32;
        self.x.clear();
        self.x.extend_from_slice(x);
        self.q.resize(x.len(), 0);
        self.scales.resize(nb, 0.0);
        self.sums16.resize(2 * nb, 0.0);
        self.sums32.resize(nb, 0.0);
        // Adding then subtracting 1.5·2⁵² rounds an f64 of magnitude < 2⁵¹ to an integer, ties to even.
        const ROUND: f64 = 6_755_399_441_055_744.0;
        let blocks = x.as_chunks::<32>().0;
        let qs = self.q.as_chunks_mut::<32>().0;
        let s16 = self.sums16.as_chunks_mut::<2>().0;
        for ((((xb, qb), sc), s16), s32) in blocks
            .iter()
            .zip(qs)
            .zip(&mut self.scales)
            .zip(s16)
            .zip(&mut self.sums32)
        {
            *s16 = [sum16_f32(arr(xb, 0)), sum16_f32(arr(xb, 16))];
            *s32 = s16[0] + s16[1];
            let max = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            *sc = act_scale(max);
            if *sc == 0.0 {
                qb.fill(0);
                continue;
            }
            let inv = 1.0 / f64::from(*sc);
            for (q, &v) in qb.iter_mut().zip(xb) {
                // |v·inv| ≤ 32767.25: the conversion never saturates (NaN would become 0).
                *q = ((f64::from(v) * inv + ROUND) - ROUND) as i32 as i16;
            }
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.q.len()
    }

    /// Whether no elements are held.
    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    /// The codes, one per element.
    pub fn codes(&self) -> &[i16] {
        &self.q
    }

    /// The scale of each 32-element block.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// The f32 sum of the original `x` over each 16 elements (a fixed pairwise order).
    pub fn sums16(&self) -> &[f32] {
        &self.sums16
    }

    /// The f32 sum of the original `x` over each 32-element block (`sums16[2b] + sums16[2b + 1]`).
    pub fn sums32(&self) -> &[f32] {
        &self.sums32
    }

    /// The original `x`.
    pub fn acts(&self) -> &[f32] {
        &self.x
    }
}

/// Whether [`matvec_q`] has an integer kernel for `t`: every block format (Q4_0 … Q8_0 and the K-quants). The
/// plain-float types run on the f32 path with the copy of `x`.
pub fn supports_int_acts(t: GgmlType) -> bool {
    !matches!(t, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
}

/// Whether the format has offsets (`d·q + m`), whose term uses the sums of `x`.
fn is_affine(t: GgmlType) -> bool {
    matches!(
        t,
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q2_K | GgmlType::Q4_K | GgmlType::Q5_K
    )
}

/// Matrix × quantized vector for decoding: `w` holds `rows` rows of `cols` elements (as [`matvec`]), `xq` is
/// `x` quantized by [`QuantizedActs::quantize`] (`xq.len() == cols`). Per row
/// `out[r] = Σ_groups (d_g·s_b)·Σ_{i∈g} q_w,i·q_x,i  +  Σ_groups m_g·Σ_{i∈g} x_i`
/// over the format's scale groups g (16 or 32 elements, each inside one 32-element block b of `x`): integer
/// sums of products per group, converted to f32 and scaled once. [`dot_row_q_ref`] is the scalar reference.
///
/// No i32 overflow: every weight code fits an i8 (|q_w| ≤ 128: Q8_0's −128..127; Q6_K −32..31, Q5 codes
/// ≤ 31, nibbles ≤ 15, Q3_K −4..3, Q2_K ≤ 3) and |q_x| ≤ 32767, so a 16-element group sums to at most
/// 16·128·32767 = 67_106_816 in magnitude and a 32-element one to 134_213_632 < 2³¹; every partial sum (a
/// lane, a pair of products) is smaller still. The pairwise i16 multiply-adds (`pmaddwd`,
/// `i32x4.dot_i16x8`) wrap only for two products of −32768·−32768, impossible with q_x ≠ −32768; weights are
/// sign-extended to i16 first (no `pmaddubsw` and its i16 saturation).
///
/// Compared with [`matvec`] the result carries the quantization error of `x`: at most
/// `Σ_b (s_b/2)·Σ_{i∈b} |d_g·q_w,i|` (the weight without its offset) — relative to each block's own scale,
/// about 1.5·10⁻⁵ of `Σ|w·x|`. The plain-float types (see [`supports_int_acts`]) run [`matvec`] on `x`.
pub fn matvec_q(
    t: GgmlType,
    w: &[u8],
    rows: usize,
    cols: usize,
    xq: &QuantizedActs,
    out: &mut [f32],
) {
    matvec_q_with(Backend::best(), t, w, rows, cols, xq, out);
}

/// [`matvec_q`] on a given backend.
pub fn matvec_q_with(
    b: Backend,
    t: GgmlType,
    w: &[u8],
    rows: usize,
    cols: usize,
    xq: &QuantizedActs,
    out: &mut [f32],
) {
    if !supports_int_acts(t) {
        return matvec_with(b, t, w, rows, cols, &xq.x, out);
    }
    let rb = matvec_shape("matvec_q", t, w, rows, cols, xq.len(), out.len());
    if rb == 0 {
        out.fill(0.0);
        return;
    }
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    if b == Backend::Simd128 {
        return wasm::dot_rows_q(t, w, rb, xq, out);
    }
    #[cfg(target_arch = "x86_64")]
    if b == Backend::Avx2 {
        if let Some(s) = x86::Avx2::detect() {
            return x86::dot_rows_q(s, t, w, rb, xq, out);
        }
    }
    let _ = b;
    kern_dot_rows_q(Portable, t, w, rb, xq, out);
}

/// Dot product of one quantized row (`t.row_bytes(xq.len())` bytes) with quantized activations: one row of
/// [`matvec_q`].
pub fn dot_row_q(t: GgmlType, w: &[u8], xq: &QuantizedActs) -> f32 {
    dot_row_q_with(Backend::best(), t, w, xq)
}

/// [`dot_row_q`] on a given backend.
pub fn dot_row_q_with(b: Backend, t: GgmlType, w: &[u8], xq: &QuantizedActs) -> f32 {
    let mut out = [0.0f32];
    matvec_q_with(b, t, w, 1, xq.len(), xq, &mut out);
    out[0]
}

/// Scalar reference of [`matvec_q`]'s arithmetic for one row: the codes and scale groups read element by
/// element from the layout; per group the i32 sum `Σ q_w·q_x` (checked: it panics on overflow in debug
/// builds), `acc += (d·s_b)·sum`, and for the affine formats `acc_m += m·(sum of x over the group)`; the
/// result `acc + acc_m`. The SIMD kernels compute the same integer sums (exactly) and differ only in the order
/// of the f32 additions and in rounding lane partial sums to f32. Plain-float types: [`dot_row_ref`] on `x`.
pub fn dot_row_q_ref(t: GgmlType, w: &[u8], xq: &QuantizedActs) -> f32 {
    if !supports_int_acts(t) {
        return dot_row_ref(t, w, &xq.x);
    }
    assert_eq!(
        Some(w.len()),
        t.row_bytes(xq.len()),
        "dot_row_q_ref: length mismatch"
    );
    let affine = is_affine(t);
    let mut q = [0i32; 256];
    let (mut acc, mut acc_m) = (0.0f32, 0.0f32);
    for (bi, b) in w.chunks_exact(t.block_bytes()).enumerate() {
        let base = bi * t.block_len();
        for (off, len, d, m) in ref_codes(t, b, &mut q) {
            let e0 = base + off;
            let xb = e0 / 32;
            let mut isum = 0i32;
            for (qw, qx) in q[off..off + len].iter().zip(&xq.q[e0..e0 + len]) {
                isum += qw * i32::from(*qx);
            }
            acc += (d * xq.scales[xb]) * isum as f32;
            if affine {
                let sx = if len == 32 {
                    xq.sums32[xb]
                } else {
                    xq.sums16[e0 / 16]
                };
                acc_m += m * sx;
            }
        }
    }
    acc + acc_m
}

/// One [`matmul`] panel: `nr` dequantized rows starting at weight row `r0`, against all `n` vectors.
struct Tiles<'a> {
    panel: &'a [f32],
    nr: usize,
    cols: usize,
    xs: &'a [f32],
    n: usize,
    rows: usize,
    r0: usize,
}

fn tiles_with(b: Backend, job: &Tiles, out: &mut [f32]) {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    if b == Backend::Simd128 {
        return wasm::tiles(job, out);
    }
    #[cfg(target_arch = "x86_64")]
    if b == Backend::Avx2 {
        if let Some(s) = x86::Avx2::detect() {
            return x86::tiles(s, job, out);
        }
    }
    let _ = b;
    kern_tiles::<Portable, 4, 2>(Portable, job, out);
}

// ---------------------------------------------------------------------------------------------------------
// The SIMD abstraction
// ---------------------------------------------------------------------------------------------------------

/// The operations the generic kernels need: `F` is 8 f32 lanes, `B` is 16 bytes. A value of the implementing
/// type is a token that the CPU supports the instructions (see `x86::Avx2::detect`).
trait Simd: Copy {
    type F: Copy;
    type B: Copy;
    fn zero(self) -> Self::F;
    fn splat(self, v: f32) -> Self::F;
    fn add(self, a: Self::F, b: Self::F) -> Self::F;
    fn mul(self, a: Self::F, b: Self::F) -> Self::F;
    /// `a·b + c`, fused where the backend has FMA (dot products only, never dequantization).
    fn mul_add(self, a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    fn hsum(self, a: Self::F) -> f32;
    fn load(self, x: &[f32; 8]) -> Self::F;
    fn store(self, v: Self::F, y: &mut [f32; 8]);
    /// 8 little-endian f32.
    fn load_f32le(self, b: &[u8; 32]) -> Self::F;
    /// 8 little-endian halves, converted exactly as [`f16_to_f32`].
    fn load_f16(self, b: &[u8; 16]) -> Self::F;
    /// 8 little-endian bfloat16.
    fn load_bf16(self, b: &[u8; 16]) -> Self::F;
    fn bytes(self, b: &[u8; 16]) -> Self::B;
    /// The little-endian half at `b[off..off + 2]`, as [`f16_to_f32`] (a block's scale fields).
    #[inline(always)]
    fn half(self, b: &[u8], off: usize) -> f32 {
        f16_at(b, off)
    }
    /// Bytes 0..8 from `lo`, 8..16 from `hi` (little-endian).
    fn bytes2(self, lo: u64, hi: u64) -> Self::B;
    fn splat8(self, v: u8) -> Self::B;
    fn and8(self, a: Self::B, b: Self::B) -> Self::B;
    fn or8(self, a: Self::B, b: Self::B) -> Self::B;
    /// Bytewise wrapping subtraction.
    fn sub8(self, a: Self::B, b: Self::B) -> Self::B;
    /// Bytewise equality: 0xff or 0.
    fn eq8(self, a: Self::B, b: Self::B) -> Self::B;
    /// Shift each 16-bit lane right by `N`. Bits may cross between the two bytes of a lane (or not, when a
    /// backend shifts bytes): callers mask to bits that come from the same byte.
    fn shr16<const N: i32>(self, a: Self::B) -> Self::B;
    /// Shift each 16-bit lane left by `N` (the same caveat).
    fn shl16<const N: i32>(self, a: Self::B) -> Self::B;
    /// Bytes 0..8 as i8, converted to f32.
    fn lo8(self, q: Self::B) -> Self::F;
    /// Bytes 8..16 as i8, converted to f32.
    fn hi8(self, q: Self::B) -> Self::F;

    /// 8 lanes of i32: partial sums of integer products ([`matvec_q`]).
    type I: Copy;
    fn iadd(self, a: Self::I, b: Self::I) -> Self::I;
    /// The 16 codes `q` (as i8) times the 16 activation codes `x`, as 8 i32 lanes that total `Σ q·x` (how the
    /// products spread over the lanes is the backend's; each lane is a sum of at most 2 products).
    fn idot16(self, q: Self::B, x: &[i16; 16]) -> Self::I;
    /// `acc + d·i`, the lanes of `i` converted to f32 (rounded beyond 2²⁴; a backend may first add lanes of
    /// `i` together, exactly, in i32).
    fn iacc(self, acc: Self::F, i: Self::I, d: f32) -> Self::F;

    /// One format's rows against quantized activations (separate per format, as [`Simd::dot_rows_fmt`]).
    #[inline(never)]
    fn dot_rows_q_fmt<
        F: Format<BB, BL>,
        const BB: usize,
        const BL: usize,
        const G: usize,
        const NB: usize,
    >(
        self,
        w: &[u8],
        rb: usize,
        xq: &QuantizedActs,
        out: &mut [f32],
    ) {
        rows_q_fmt::<Self, F, BB, BL, G, NB>(self, w, rb, xq, out);
    }

    /// One format's rows (`rb` bytes each) dotted with `x`; `gs`: the 16-element group sums of `x` (affine
    /// formats only, else empty). A separate function per format (small functions compile better, in V8
    /// especially); a backend whose instructions need a target feature overrides it to enter code compiled
    /// with the feature.
    #[inline(never)]
    fn dot_rows_fmt<F: Format<BB, BL>, const BB: usize, const BL: usize, const G: usize>(
        self,
        w: &[u8],
        rb: usize,
        x: &[f32],
        gs: &[f32],
        out: &mut [f32],
    ) {
        rows_fmt::<Self, F, BB, BL, G>(self, w, rb, x, gs, out);
    }

    /// `R` dequantized rows (`w`, R·cols) × `C` vectors (`x`, C·cols) for [`matmul`]: `res[r][c]`. A backend
    /// may override it with a kernel that suits its register file.
    #[inline(always)]
    fn tile<const R: usize, const C: usize>(
        self,
        w: &[f32],
        x: &[f32],
        cols: usize,
    ) -> [[f32; C]; R] {
        tile_generic::<Self, R, C>(self, w, x, cols)
    }

    /// One format's dequantization (separate per format, as [`Simd::dot_rows_fmt`]).
    #[inline(never)]
    fn deq_rows_fmt<F: Format<BB, BL>, const BB: usize, const BL: usize>(
        self,
        w: &[u8],
        y: &mut [f32],
    ) {
        deq_fmt::<Self, F, BB, BL>(self, w, y);
    }
}

/// Portable backend: arrays, vectorized by the compiler.
#[derive(Clone, Copy)]
struct Portable;

impl Simd for Portable {
    type F = [f32; 8];
    type B = [u8; 16];
    #[inline(always)]
    fn zero(self) -> [f32; 8] {
        [0.0; 8]
    }
    #[inline(always)]
    fn splat(self, v: f32) -> [f32; 8] {
        [v; 8]
    }
    #[inline(always)]
    fn add(self, a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    fn mul(self, a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        array::from_fn(|i| a[i] * b[i])
    }
    #[inline(always)]
    fn mul_add(self, a: [f32; 8], b: [f32; 8], c: [f32; 8]) -> [f32; 8] {
        array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    fn hsum(self, a: [f32; 8]) -> f32 {
        ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
    }
    #[inline(always)]
    fn load(self, x: &[f32; 8]) -> [f32; 8] {
        *x
    }
    #[inline(always)]
    fn store(self, v: [f32; 8], y: &mut [f32; 8]) {
        *y = v;
    }
    #[inline(always)]
    fn load_f32le(self, b: &[u8; 32]) -> [f32; 8] {
        array::from_fn(|i| f32::from_le_bytes(*arr(b, 4 * i)))
    }
    #[inline(always)]
    fn load_f16(self, b: &[u8; 16]) -> [f32; 8] {
        let mut r = [0.0f32; 8];
        for (r, c) in r.iter_mut().zip(b.as_chunks::<2>().0) {
            *r = f16_to_f32_branchless(u16::from_le_bytes(*c));
        }
        r
    }
    #[inline(always)]
    fn load_bf16(self, b: &[u8; 16]) -> [f32; 8] {
        let mut r = [0.0f32; 8];
        for (r, c) in r.iter_mut().zip(b.as_chunks::<2>().0) {
            *r = bf16_to_f32(u16::from_le_bytes(*c));
        }
        r
    }
    #[inline(always)]
    fn bytes(self, b: &[u8; 16]) -> [u8; 16] {
        *b
    }
    #[inline(always)]
    fn bytes2(self, lo: u64, hi: u64) -> [u8; 16] {
        (u128::from(lo) | (u128::from(hi) << 64)).to_le_bytes()
    }
    #[inline(always)]
    fn splat8(self, v: u8) -> [u8; 16] {
        [v; 16]
    }
    #[inline(always)]
    fn and8(self, mut a: [u8; 16], b: [u8; 16]) -> [u8; 16] {
        for (a, b) in a.iter_mut().zip(b) {
            *a &= b;
        }
        a
    }
    #[inline(always)]
    fn or8(self, mut a: [u8; 16], b: [u8; 16]) -> [u8; 16] {
        for (a, b) in a.iter_mut().zip(b) {
            *a |= b;
        }
        a
    }
    #[inline(always)]
    fn sub8(self, mut a: [u8; 16], b: [u8; 16]) -> [u8; 16] {
        for (a, b) in a.iter_mut().zip(b) {
            *a = a.wrapping_sub(b);
        }
        a
    }
    #[inline(always)]
    fn eq8(self, mut a: [u8; 16], b: [u8; 16]) -> [u8; 16] {
        for (a, b) in a.iter_mut().zip(b) {
            *a = if *a == b { 0xff } else { 0 };
        }
        a
    }
    /// Per byte (no bits cross between bytes), which the callers' masks cannot tell from a 16-bit lane shift.
    #[inline(always)]
    fn shr16<const N: i32>(self, mut a: [u8; 16]) -> [u8; 16] {
        for a in a.iter_mut() {
            *a >>= N;
        }
        a
    }
    #[inline(always)]
    fn shl16<const N: i32>(self, mut a: [u8; 16]) -> [u8; 16] {
        for a in a.iter_mut() {
            *a <<= N;
        }
        a
    }
    #[inline(always)]
    fn lo8(self, q: [u8; 16]) -> [f32; 8] {
        let mut r = [0.0f32; 8];
        for (r, q) in r.iter_mut().zip(q) {
            *r = f32::from(q as i8);
        }
        r
    }
    #[inline(always)]
    fn hi8(self, q: [u8; 16]) -> [f32; 8] {
        let mut r = [0.0f32; 8];
        for (r, q) in r.iter_mut().zip(&q[8..]) {
            *r = f32::from(*q as i8);
        }
        r
    }
    type I = [i32; 8];
    #[inline(always)]
    fn iadd(self, a: [i32; 8], b: [i32; 8]) -> [i32; 8] {
        array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    fn idot16(self, q: [u8; 16], x: &[i16; 16]) -> [i32; 8] {
        let p = |i: usize| i32::from(q[i] as i8) * i32::from(x[i]);
        array::from_fn(|i| p(2 * i) + p(2 * i + 1))
    }
    #[inline(always)]
    fn iacc(self, acc: [f32; 8], i: [i32; 8], d: f32) -> [f32; 8] {
        array::from_fn(|k| i[k] as f32 * d + acc[k])
    }
}

/// [`f16_to_f32`] without branches (the same bits for every input), for code the compiler vectorizes.
#[inline(always)]
fn f16_to_f32_branchless(h: u16) -> f32 {
    let em = u32::from(h & 0x7fff);
    let sign = u32::from(h & 0x8000) << 16;
    let norm = (em << 13) + ((127 - 15) << 23);
    // Exponent 0 (zero / subnormal): read the mantissa with the exponent of 2⁻¹⁴, i.e. 2⁻¹⁴·(1 + m/1024);
    // minus 2⁻¹⁴ leaves m·2⁻²⁴ exactly.
    let sub = (f32::from_bits(norm + (1 << 23)) - 1.0 / 16384.0).to_bits();
    let inf = 0u32.wrapping_sub(u32::from(em >= 0x7c00));
    let nan = 0u32.wrapping_sub(u32::from(em > 0x7c00));
    let big = (norm + (inf & ((127 - 15) << 23))) | (nan & 0x0040_0000);
    let is_sub = 0u32.wrapping_sub(u32::from(em < 0x0400));
    f32::from_bits(((sub & is_sub) | (big & !is_sub)) | sign)
}

// ---------------------------------------------------------------------------------------------------------
// Generic kernels: block decoders and sinks
// ---------------------------------------------------------------------------------------------------------

/// Receives a decoded block 16 (or 32) elements at a time.
trait Sink<S: Simd> {
    /// Elements `off..off + 16` of the block are `d·q` (q: 16 i8 codes).
    fn scaled(&mut self, s: S, off: usize, q: S::B, d: f32);
    /// Elements `off..off + 16` of the block are `d·q + m`. A format defined as `d·q − m` passes `−m`:
    /// IEEE subtraction is addition of the negation, so the result is bit-identical.
    fn affine(&mut self, s: S, off: usize, q: S::B, d: f32, m: f32);
    /// Elements `off..off + 32` are `d·q`, the codes `q0` then `q1`.
    #[inline(always)]
    fn scaled32(&mut self, s: S, off: usize, q0: S::B, q1: S::B, d: f32) {
        self.scaled(s, off, q0, d);
        self.scaled(s, off + 16, q1, d);
    }
    /// Elements `off..off + 32` are `d·q + m`.
    #[inline(always)]
    fn affine32(&mut self, s: S, off: usize, q0: S::B, q1: S::B, d: f32, m: f32) {
        self.affine(s, off, q0, d, m);
        self.affine(s, off + 16, q1, d, m);
    }
}

/// Dot-product accumulators: scaled sums alternate between two vectors, offset terms (`m·Σx`) between two
/// scalars.
struct Acc<S: Simd> {
    a0: S::F,
    a1: S::F,
    m0: f32,
    m1: f32,
}

/// Accumulates a block against its activations `x`; `gs[i]` is the sum of `x[16i..16i + 16]` (G = BL/16).
struct DotSink<'a, S: Simd, const BL: usize, const G: usize> {
    x: &'a [f32; BL],
    gs: &'a [f32; G],
    acc: &'a mut Acc<S>,
}

impl<S: Simd, const BL: usize, const G: usize> DotSink<'_, S, BL, G> {
    /// Σ q·x over elements `off..off + 16`, as 8 lanes.
    #[inline(always)]
    fn dot16(&self, s: S, off: usize, q: S::B) -> S::F {
        let x: &[f32; 16] = arr(self.x, off);
        s.mul_add(
            s.hi8(q),
            s.load(arr(x, 8)),
            s.mul(s.lo8(q), s.load(arr(x, 0))),
        )
    }
    #[inline(always)]
    fn add_scaled(&mut self, s: S, odd: bool, d: f32, p: S::F) {
        if odd {
            self.acc.a1 = s.mul_add(s.splat(d), p, self.acc.a1);
        } else {
            self.acc.a0 = s.mul_add(s.splat(d), p, self.acc.a0);
        }
    }
    /// `m` times the sum of x over `n16` groups of 16 from `off`.
    #[inline(always)]
    fn add_offset(&mut self, off: usize, n16: usize, m: f32) {
        let g = off / 16;
        let sx = if n16 == 2 {
            self.gs[g] + self.gs[g + 1]
        } else {
            self.gs[g]
        };
        if (off / (16 * n16)) & 1 == 1 {
            self.acc.m1 += m * sx;
        } else {
            self.acc.m0 += m * sx;
        }
    }
}

impl<S: Simd, const BL: usize, const G: usize> Sink<S> for DotSink<'_, S, BL, G> {
    #[inline(always)]
    fn scaled(&mut self, s: S, off: usize, q: S::B, d: f32) {
        let p = self.dot16(s, off, q);
        self.add_scaled(s, off & 16 != 0, d, p);
    }
    #[inline(always)]
    fn affine(&mut self, s: S, off: usize, q: S::B, d: f32, m: f32) {
        self.scaled(s, off, q, d);
        self.add_offset(off, 1, m);
    }
    #[inline(always)]
    fn scaled32(&mut self, s: S, off: usize, q0: S::B, q1: S::B, d: f32) {
        let p = s.add(self.dot16(s, off, q0), self.dot16(s, off + 16, q1));
        self.add_scaled(s, off & 32 != 0, d, p);
    }
    #[inline(always)]
    fn affine32(&mut self, s: S, off: usize, q0: S::B, q1: S::B, d: f32, m: f32) {
        self.scaled32(s, off, q0, q1, d);
        self.add_offset(off, 2, m);
    }
}

struct DeqSink<'a, const BL: usize> {
    y: &'a mut [f32; BL],
}

impl<S: Simd, const BL: usize> Sink<S> for DeqSink<'_, BL> {
    #[inline(always)]
    fn scaled(&mut self, s: S, off: usize, q: S::B, d: f32) {
        let dv = s.splat(d);
        s.store(s.mul(dv, s.lo8(q)), arr_mut(&mut self.y[..], off));
        s.store(s.mul(dv, s.hi8(q)), arr_mut(&mut self.y[..], off + 8));
    }
    #[inline(always)]
    fn affine(&mut self, s: S, off: usize, q: S::B, d: f32, m: f32) {
        let (dv, mv) = (s.splat(d), s.splat(m));
        s.store(
            s.add(s.mul(dv, s.lo8(q)), mv),
            arr_mut(&mut self.y[..], off),
        );
        s.store(
            s.add(s.mul(dv, s.hi8(q)), mv),
            arr_mut(&mut self.y[..], off + 8),
        );
    }
}

/// A block format: `BB` bytes → `BL` elements, fed to a sink 16 at a time.
trait Format<const BB: usize, const BL: usize> {
    /// Whether the format has offsets (`d·q + m`): its dot products need the group sums of `x`.
    const AFFINE: bool;
    fn decode<S: Simd, K: Sink<S>>(s: S, b: &[u8; BB], k: &mut K);
}

#[inline(always)]
fn dot_fmt<S: Simd, F: Format<BB, BL>, const BB: usize, const BL: usize, const G: usize>(
    s: S,
    w: &[u8],
    x: &[f32],
    gs: &[f32],
) -> f32 {
    const { assert!(G * 16 == BL) };
    let mut acc = Acc {
        a0: s.zero(),
        a1: s.zero(),
        m0: 0.0,
        m1: 0.0,
    };
    let blocks = w.as_chunks::<BB>().0.iter().zip(x.as_chunks::<BL>().0);
    if F::AFFINE {
        for ((b, xb), gs) in blocks.zip(gs.as_chunks::<G>().0) {
            let mut k = DotSink {
                x: xb,
                gs,
                acc: &mut acc,
            };
            F::decode(s, b, &mut k);
        }
    } else {
        let zeros = [0.0f32; G];
        for (b, xb) in blocks {
            let mut k = DotSink {
                x: xb,
                gs: &zeros,
                acc: &mut acc,
            };
            F::decode(s, b, &mut k);
        }
    }
    s.hsum(s.add(acc.a0, acc.a1)) + (acc.m0 + acc.m1)
}

#[inline(always)]
fn rows_fmt<S: Simd, F: Format<BB, BL>, const BB: usize, const BL: usize, const G: usize>(
    s: S,
    w: &[u8],
    rb: usize,
    x: &[f32],
    gs: &[f32],
    out: &mut [f32],
) {
    for (row, o) in w.chunks_exact(rb).zip(out.iter_mut()) {
        *o = dot_fmt::<S, F, BB, BL, G>(s, row, x, gs);
    }
}

/// Sums of `x` over each group of 16 elements (the offsets of the affine formats multiply them).
#[inline(always)]
fn group_sums<S: Simd>(s: S, x: &[f32]) -> Vec<f32> {
    let groups = x.as_chunks::<16>().0;
    groups
        .iter()
        .map(|g| s.hsum(s.add(s.load(arr(g, 0)), s.load(arr(g, 8)))))
        .collect()
}

#[inline(always)]
fn deq_fmt<S: Simd, F: Format<BB, BL>, const BB: usize, const BL: usize>(
    s: S,
    w: &[u8],
    y: &mut [f32],
) {
    for (b, yb) in w.as_chunks::<BB>().0.iter().zip(y.as_chunks_mut::<BL>().0) {
        F::decode(s, b, &mut DeqSink { y: yb });
    }
}

/// `v` shifted right by `2·j` bits per 16-bit lane, j in 0..4.
#[inline(always)]
fn shr_2j<S: Simd>(s: S, v: S::B, j: usize) -> S::B {
    match j {
        0 => v,
        1 => s.shr16::<2>(v),
        2 => s.shr16::<4>(v),
        _ => s.shr16::<6>(v),
    }
}

struct Q40;
struct Q41;
struct Q50;
struct Q51;
struct Q80;
struct Q2K;
struct Q3K;
struct Q4K;
struct Q5K;
struct Q6K;

impl Format<18, 32> for Q40 {
    const AFFINE: bool = false;
    #[inline(always)]
    fn decode<S: Simd, K: Sink<S>>(s: S, b: &[u8; 18], k: &mut K) {
        let d = s.half(b, 0);
        let v = s.bytes(arr(b, 2));
        let (m4, c8) = (s.splat8(0x0f), s.splat8(8));
        let lo = s.sub8(s.and8(v, m4), c8);
        let hi = s.sub8(s.and8(s.shr16::<4>(v), m4), c8);
        k.scaled32(s, 0, lo, hi, d);
    }
}

impl Format<20, 32> for Q41 {
    const AFFINE: bool = true;
    #[inline(always)]
    fn decode<S: Simd, K: Sink<S>>(s: S, b: &[u8; 20], k: &mut K) {
        let (d, m) = (s.half(b, 0), s.half(b, 2));
        let v = s.bytes(arr(b, 4));
        let m4 = s.splat8(0x0f);
        k.affine32(s, 0, s.and8(v, m4), s.and8(s.shr16::<4>(v), m4), d, m);
    }
}

/// The 5th bits of a Q5 block as two 16-byte vectors of 0x10 / 0.
#[inline(always)]
fn q5_high<S: Simd>(s: S, qh: u32) -> (S::B, S::B) {
    let byte = |i: u32| BIT4_LUT[((qh >> (8 * i)) & 0xff) as usize];
    (s.bytes2(byte(0), byte(1)), s.bytes2(byte(2), byte(3)))
}

impl Format<22, 32> for Q50 {
    const AFFINE: bool = false;
    #[inline(always)]
    fn decode<S: Simd, K: Sink<S>>(s: S, b: &[u8; 22], k: &mut K) {
        let d = s.half(b, 0);
        let (h0, h1) = q5_high(s, le32(b, 2));
        let v = s.bytes(arr(b, 6));
        let (m4, c16) = (s.splat8(0x0f), s.splat8(16));
        let lo = s.sub8(s.or8(s.and8(v, m4), h0), c16);
        let hi = s.sub8(s.or8(s.and8(s.shr16::<4>(v), m4), h1), c16);
        k.scaled32(s, 0, lo, hi, d);
    }
}

impl Format<24, 32> for Q51 {
    const AFFINE: bool = true;
    #[inline(always)]
    fn decode<S: Simd, K: Sink<S>>(s: S, b: &[u8; 24], k: &mut K) {
        let (d, m) = (s.half(b, 0), s.half(b, 2));
        let (h0, h1) = q5_high(s, le32(b, 4));
        let v = s.bytes(arr(b, 8));
        let m4 = s.splat8(0x0f);
        let lo = s.or8(s.and8(v, m4), h0);
        let hi = s.or8(s.and8(s.shr16::<4>(v), m4), h1);
        k.affine32(s, 0, lo, hi, d, m);
    }
}

impl Format<34, 32> for Q80 {
    const AFFINE: bool = false;
    #[inline(always)]
    fn decode<S: Simd, K: Sink<S>>(s: S, b: &[u8; 34], k: &mut K) {
        let d = s.half(b, 0);
        k.scaled32(s, 0, s.bytes(arr(b, 2)), s.bytes(arr(b, 18)), d);
    }
}

impl Format<84, 256> for Q2K {
    const AFFINE: bool = true;
    #[inline(always)]
    fn decode<S: Simd, K: Sink<S>>(s: S, b: &[u8; 84], k: &mut K) {
        let sc: &[u8; 16] = arr(b, 0);
        let (d, dmin) = (s.half(b, 80), s.half(b, 82));
        let c3 = s.splat8(3);
        for n in 0..2 {
            let q0 = s.bytes(arr(b, 16 + 32 * n));
            let q1 = s.bytes(arr(b, 32 + 32 * n));
            for j in 0..4 {
                let g = 8 * n + 2 * j;
                let off = 128 * n + 32 * j;
                let (a, c) = (sc[g], sc[g + 1]);
                let (da, ma) = (d * (a & 0x0f) as f32, dmin * (a >> 4) as f32);
                let (dc, mc) = (d * (c & 0x0f) as f32, dmin * (c >> 4) as f32);
                k.affine(s, off, s.and8(shr_2j(s, q0, j), c3), da, -ma);
                k.affine(s, off + 16, s.and8(shr_2j(s, q1, j), c3), dc, -mc);
            }
        }
    }
}

impl Format<110, 256> for Q3K {
    const AFFINE: bool = false;
    #[inline(always)]
    fn decode<S: Simd, K: Sink<S>>(s: S, b: &[u8; 110], k: &mut K) {
        let hm0 = s.bytes(arr(b, 0));
        let hm1 = s.bytes(arr(b, 16));
        let sc: &[u8; 12] = arr(b, 96);
        let d = s.half(b, 108);
        let (c3, c4, zero) = (s.splat8(3), s.splat8(4), s.splat8(0));
        for n in 0..2 {
            let q0 = s.bytes(arr(b, 32 + 32 * n));
            let q1 = s.bytes(arr(b, 48 + 32 * n));
            for j in 0..4 {
                let bit = s.splat8(1 << (4 * n + j));
                let g = 8 * n + 2 * j;
                let off = 128 * n + 32 * j;
                // 4 where the high bit is clear, subtracted from the 2 low bits.
                let neg0 = s.and8(s.eq8(s.and8(hm0, bit), zero), c4);
                let neg1 = s.and8(s.eq8(s.and8(hm1, bit), zero), c4);
                let v0 = s.sub8(s.and8(shr_2j(s, q0, j), c3), neg0);
                let v1 = s.sub8(s.and8(shr_2j(s, q1, j), c3), neg1);
                k.scaled(s, off, v0, d * q3k_scale(sc, g) as f32);
                k.scaled(s, off + 16, v1, d * q3k_scale(sc, g + 1) as f32);
            }
        }
    }
}

impl Format<144, 256> for Q4K {
    const AFFINE: bool = true;
    #[inline(always)]
    fn decode<S: Simd, K: Sink<S>>(s: S, b: &[u8; 144], k: &mut K) {
        let (d, dmin) = (s.half(b, 0), s.half(b, 2));
        let sc: &[u8; 12] = arr(b, 4);
        let m4 = s.splat8(0x0f);
        for p in 0..4 {
            // Sub-blocks 2p (low nibbles) and 2p + 1 (high nibbles) of the same 32 bytes.
            let (s1, m1) = scale_min_k4(2 * p, sc);
            let (s2, m2) = scale_min_k4(2 * p + 1, sc);
            let (d1, dm1) = (d * s1 as f32, dmin * m1 as f32);
            let (d2, dm2) = (d * s2 as f32, dmin * m2 as f32);
            let v0 = s.bytes(arr(b, 16 + 32 * p));
            let v1 = s.bytes(arr(b, 32 + 32 * p));
            let (lo0, lo1) = (s.and8(v0, m4), s.and8(v1, m4));
            let (hi0, hi1) = (s.and8(s.shr16::<4>(v0), m4), s.and8(s.shr16::<4>(v1), m4));
            k.affine32(s, 64 * p, lo0, lo1, d1, -dm1);
            k.affine32(s, 64 * p + 32, hi0, hi1, d2, -dm2);
        }
    }
}

impl Format<176, 256> for Q5K {
    const AFFINE: bool = true;
    #[inline(always)]
    fn decode<S: Simd, K: Sink<S>>(s: S, b: &[u8; 176], k: &mut K) {
        let (d, dmin) = (s.half(b, 0), s.half(b, 2));
        let sc: &[u8; 12] = arr(b, 4);
        let (qh0, qh1) = (s.bytes(arr(b, 16)), s.bytes(arr(b, 32)));
        let (m4, c16) = (s.splat8(0x0f), s.splat8(16));
        for p in 0..4 {
            let (s1, m1) = scale_min_k4(2 * p, sc);
            let (s2, m2) = scale_min_k4(2 * p + 1, sc);
            let (d1, dm1) = (d * s1 as f32, dmin * m1 as f32);
            let (d2, dm2) = (d * s2 as f32, dmin * m2 as f32);
            // The 5th bit of sub-block 2p is bit 2p of qh[l], of sub-block 2p + 1 bit 2p + 1: 16 or 0.
            let (bit1, bit2) = (s.splat8(1 << (2 * p)), s.splat8(2 << (2 * p)));
            let high = |qh: S::B, bit: S::B| s.and8(s.eq8(s.and8(qh, bit), bit), c16);
            let v0 = s.bytes(arr(b, 48 + 32 * p));
            let v1 = s.bytes(arr(b, 64 + 32 * p));
            let lo0 = s.or8(s.and8(v0, m4), high(qh0, bit1));
            let lo1 = s.or8(s.and8(v1, m4), high(qh1, bit1));
            let hi0 = s.or8(s.and8(s.shr16::<4>(v0), m4), high(qh0, bit2));
            let hi1 = s.or8(s.and8(s.shr16::<4>(v1), m4), high(qh1, bit2));
            k.affine32(s, 64 * p, lo0, lo1, d1, -dm1);
            k.affine32(s, 64 * p + 32, hi0, hi1, d2, -dm2);
        }
    }
}

impl Format<210, 256> for Q6K {
    const AFFINE: bool = false;
    #[inline(always)]
    fn decode<S: Simd, K: Sink<S>>(s: S, b: &[u8; 210], k: &mut K) {
        let d = s.half(b, 208);
        let sc: &[u8; 16] = arr(b, 192);
        let (m4, m30, c32) = (s.splat8(0x0f), s.splat8(0x30), s.splat8(32));
        for n in 0..2 {
            for c in 0..2 {
                let lo = s.bytes(arr(b, 64 * n + 16 * c));
                let hi = s.bytes(arr(b, 64 * n + 32 + 16 * c));
                let h = s.bytes(arr(b, 128 + 32 * n + 16 * c));
                // The 2 high bits of each group, moved to bits 4..6.
                let h0 = s.and8(s.shl16::<4>(h), m30);
                let h1 = s.and8(s.shl16::<2>(h), m30);
                let h2 = s.and8(h, m30);
                let h3 = s.and8(s.shr16::<2>(h), m30);
                let q0 = s.sub8(s.or8(s.and8(lo, m4), h0), c32);
                let q1 = s.sub8(s.or8(s.and8(hi, m4), h1), c32);
                let q2 = s.sub8(s.or8(s.and8(s.shr16::<4>(lo), m4), h2), c32);
                let q3 = s.sub8(s.or8(s.and8(s.shr16::<4>(hi), m4), h3), c32);
                let (base, g) = (128 * n + 16 * c, 8 * n + c);
                let scale = |i: usize| d * (sc[g + i] as i8) as f32;
                k.scaled(s, base, q0, scale(0));
                k.scaled(s, base + 32, q1, scale(2));
                k.scaled(s, base + 64, q2, scale(4));
                k.scaled(s, base + 96, q3, scale(6));
            }
        }
    }
}

// Plain-float rows: 8 elements per SIMD load.
const KF32: u8 = 0;
const KF16: u8 = 1;
const KBF16: u8 = 2;

#[inline(always)]
fn ld8<S: Simd, const K: u8>(s: S, b: &[u8]) -> S::F {
    match K {
        KF32 => s.load_f32le(arr(b, 0)),
        KF16 => s.load_f16(arr(b, 0)),
        _ => s.load_bf16(arr(b, 0)),
    }
}

#[inline(always)]
fn ld1<const K: u8>(b: &[u8]) -> f32 {
    match K {
        KF32 => f32::from_le_bytes(*arr(b, 0)),
        KF16 => f16_to_f32(le16(b, 0)),
        _ => bf16_to_f32(le16(b, 0)),
    }
}

/// Dot product of a plain-float row (`CB` bytes per 8 elements) with `x`: four accumulators.
#[inline(always)]
fn float_dot<S: Simd, const CB: usize, const K: u8>(s: S, w: &[u8], x: &[f32]) -> f32 {
    let (wc, wt) = w.as_chunks::<CB>();
    let (xc, xt) = x.as_chunks::<8>();
    let mut acc = [s.zero(); 4];
    let mut w4 = wc.chunks_exact(4);
    let mut x4 = xc.chunks_exact(4);
    for (wq, xq) in (&mut w4).zip(&mut x4) {
        for ((a, wb), xb) in acc.iter_mut().zip(wq).zip(xq) {
            *a = s.mul_add(ld8::<S, K>(s, wb), s.load(xb), *a);
        }
    }
    for (wb, xb) in w4.remainder().iter().zip(x4.remainder()) {
        acc[0] = s.mul_add(ld8::<S, K>(s, wb), s.load(xb), acc[0]);
    }
    let mut r = s.hsum(s.add(s.add(acc[0], acc[1]), s.add(acc[2], acc[3])));
    for (wb, xv) in wt.chunks_exact(CB / 8).zip(xt) {
        r += ld1::<K>(wb) * xv;
    }
    r
}

#[inline(always)]
fn float_deq<S: Simd, const CB: usize, const K: u8>(s: S, w: &[u8], y: &mut [f32]) {
    let (wc, wt) = w.as_chunks::<CB>();
    let (yc, yt) = y.as_chunks_mut::<8>();
    for (wb, yb) in wc.iter().zip(yc) {
        s.store(ld8::<S, K>(s, wb), yb);
    }
    for (wb, yv) in wt.chunks_exact(CB / 8).zip(yt) {
        *yv = ld1::<K>(wb);
    }
}

/// Every row of `w` (`rb` bytes each, `rb > 0`) dotted with `x`.
#[inline(always)]
fn kern_dot_rows<S: Simd>(s: S, t: GgmlType, w: &[u8], rb: usize, x: &[f32], out: &mut [f32]) {
    macro_rules! quant {
        ($f:ty, $bb:literal, $bl:literal) => {{
            let gs = if <$f as Format<$bb, $bl>>::AFFINE {
                group_sums(s, x)
            } else {
                Vec::new()
            };
            s.dot_rows_fmt::<$f, $bb, $bl, { $bl / 16 }>(w, rb, x, &gs, out)
        }};
    }
    macro_rules! float {
        ($k:expr, $cb:literal) => {
            for (row, o) in w.chunks_exact(rb).zip(out.iter_mut()) {
                *o = float_dot::<S, $cb, { $k }>(s, row, x);
            }
        };
    }
    match t {
        GgmlType::F32 => float!(KF32, 32),
        GgmlType::F16 => float!(KF16, 16),
        GgmlType::BF16 => float!(KBF16, 16),
        GgmlType::Q4_0 => quant!(Q40, 18, 32),
        GgmlType::Q4_1 => quant!(Q41, 20, 32),
        GgmlType::Q5_0 => quant!(Q50, 22, 32),
        GgmlType::Q5_1 => quant!(Q51, 24, 32),
        GgmlType::Q8_0 => quant!(Q80, 34, 32),
        GgmlType::Q2_K => quant!(Q2K, 84, 256),
        GgmlType::Q3_K => quant!(Q3K, 110, 256),
        GgmlType::Q4_K => quant!(Q4K, 144, 256),
        GgmlType::Q5_K => quant!(Q5K, 176, 256),
        GgmlType::Q6_K => quant!(Q6K, 210, 256),
    }
}

/// Accumulates a block's integer dot products against the quantized activations: `x` the block's codes,
/// `sc` the scales of its 32-element blocks, `s16` / `s32` the sums of the original x (G = BL/16, NB = BL/32).
struct IntSink<'a, S: Simd, const BL: usize, const G: usize, const NB: usize> {
    x: &'a [i16; BL],
    sc: &'a [f32; NB],
    s16: &'a [f32; G],
    s32: &'a [f32; NB],
    acc: &'a mut Acc<S>,
}

impl<S: Simd, const BL: usize, const G: usize, const NB: usize> IntSink<'_, S, BL, G, NB> {
    /// `acc += (d·s_b)·i`, the 8 i32 lanes of `i` (one group's products, all within x block `off/32`).
    #[inline(always)]
    fn add_int(&mut self, s: S, odd: bool, off: usize, d: f32, i: S::I) {
        let ds = d * self.sc[off / 32];
        if odd {
            self.acc.a1 = s.iacc(self.acc.a1, i, ds);
        } else {
            self.acc.a0 = s.iacc(self.acc.a0, i, ds);
        }
    }
}

impl<S: Simd, const BL: usize, const G: usize, const NB: usize> Sink<S>
    for IntSink<'_, S, BL, G, NB>
{
    #[inline(always)]
    fn scaled(&mut self, s: S, off: usize, q: S::B, d: f32) {
        let i = s.idot16(q, arr(self.x, off));
        self.add_int(s, off & 16 != 0, off, d, i);
    }
    #[inline(always)]
    fn affine(&mut self, s: S, off: usize, q: S::B, d: f32, m: f32) {
        self.scaled(s, off, q, d);
        let sx = self.s16[off / 16];
        if off & 16 != 0 {
            self.acc.m1 += m * sx;
        } else {
            self.acc.m0 += m * sx;
        }
    }
    #[inline(always)]
    fn scaled32(&mut self, s: S, off: usize, q0: S::B, q1: S::B, d: f32) {
        // ≤ 2·67_106_816 per lane sum: no overflow (see `matvec_q`).
        let i = s.iadd(
            s.idot16(q0, arr(self.x, off)),
            s.idot16(q1, arr(self.x, off + 16)),
        );
        self.add_int(s, off & 32 != 0, off, d, i);
    }
    #[inline(always)]
    fn affine32(&mut self, s: S, off: usize, q0: S::B, q1: S::B, d: f32, m: f32) {
        self.scaled32(s, off, q0, q1, d);
        let sx = self.s32[off / 32];
        if off & 32 != 0 {
            self.acc.m1 += m * sx;
        } else {
            self.acc.m0 += m * sx;
        }
    }
}

/// One block into `acc`: `b` the weights, `x` / `sc` / `s16` / `s32` the matching activations.
#[inline(always)]
fn step_q<
    S: Simd,
    F: Format<BB, BL>,
    const BB: usize,
    const BL: usize,
    const G: usize,
    const NB: usize,
>(
    s: S,
    b: &[u8; BB],
    (x, sc, s16, s32): (&[i16; BL], &[f32; NB], &[f32; G], &[f32; NB]),
    acc: &mut Acc<S>,
) {
    let mut k = IntSink {
        x,
        sc,
        s16,
        s32,
        acc,
    };
    F::decode(s, b, &mut k);
}

/// One row against the quantized activations. 32-element blocks alternate between two sets of accumulators
/// (two independent chains of additions); a 256-element block alternates inside (a0 / a1). (No closures: they
/// would not inherit the target features of the AVX2 entry points. Decoding several rows at once, to share
/// the activation loads, gained ~5% on cached matrices but halved the speed of one streamed from memory.)
#[inline(always)]
fn dot_q_fmt<
    S: Simd,
    F: Format<BB, BL>,
    const BB: usize,
    const BL: usize,
    const G: usize,
    const NB: usize,
>(
    s: S,
    w: &[u8],
    xq: &QuantizedActs,
) -> f32 {
    const { assert!(G * 16 == BL && NB * 32 == BL) };
    let blocks = w.as_chunks::<BB>().0;
    let n = blocks.len();
    let xs = &xq.q.as_chunks::<BL>().0[..n];
    let sc = &xq.scales.as_chunks::<NB>().0[..n];
    let s16 = &xq.sums16.as_chunks::<G>().0[..n];
    let s32 = &xq.sums32.as_chunks::<NB>().0[..n];
    let acts = |j: usize| (&xs[j], &sc[j], &s16[j], &s32[j]);
    let z = s.zero();
    let mut even = Acc::<S> {
        a0: z,
        a1: z,
        m0: 0.0,
        m1: 0.0,
    };
    let mut odd = Acc::<S> { ..even };
    let mut j = 0;
    while j + 2 <= n {
        step_q::<S, F, BB, BL, G, NB>(s, &blocks[j], acts(j), &mut even);
        let second = if BL == 32 { &mut odd } else { &mut even };
        step_q::<S, F, BB, BL, G, NB>(s, &blocks[j + 1], acts(j + 1), second);
        j += 2;
    }
    if j < n {
        step_q::<S, F, BB, BL, G, NB>(s, &blocks[j], acts(j), &mut even);
    }
    let (e, d) = (&even, &odd);
    s.hsum(s.add(s.add(e.a0, e.a1), s.add(d.a0, d.a1))) + ((e.m0 + e.m1) + (d.m0 + d.m1))
}

#[inline(always)]
fn rows_q_fmt<
    S: Simd,
    F: Format<BB, BL>,
    const BB: usize,
    const BL: usize,
    const G: usize,
    const NB: usize,
>(
    s: S,
    w: &[u8],
    rb: usize,
    xq: &QuantizedActs,
    out: &mut [f32],
) {
    for (row, o) in w.chunks_exact(rb).zip(out.iter_mut()) {
        *o = dot_q_fmt::<S, F, BB, BL, G, NB>(s, row, xq);
    }
}

/// Every row of `w` (`rb` bytes each, `rb > 0`) against the quantized activations (block formats only).
#[inline(always)]
fn kern_dot_rows_q<S: Simd>(
    s: S,
    t: GgmlType,
    w: &[u8],
    rb: usize,
    xq: &QuantizedActs,
    out: &mut [f32],
) {
    macro_rules! quant {
        ($f:ty, $bb:literal, $bl:literal) => {
            s.dot_rows_q_fmt::<$f, $bb, $bl, { $bl / 16 }, { $bl / 32 }>(w, rb, xq, out)
        };
    }
    match t {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            unreachable!("kern_dot_rows_q: plain-float rows take the f32 path")
        }
        GgmlType::Q4_0 => quant!(Q40, 18, 32),
        GgmlType::Q4_1 => quant!(Q41, 20, 32),
        GgmlType::Q5_0 => quant!(Q50, 22, 32),
        GgmlType::Q5_1 => quant!(Q51, 24, 32),
        GgmlType::Q8_0 => quant!(Q80, 34, 32),
        GgmlType::Q2_K => quant!(Q2K, 84, 256),
        GgmlType::Q3_K => quant!(Q3K, 110, 256),
        GgmlType::Q4_K => quant!(Q4K, 144, 256),
        GgmlType::Q5_K => quant!(Q5K, 176, 256),
        GgmlType::Q6_K => quant!(Q6K, 210, 256),
    }
}

#[inline(always)]
fn kern_dequantize<S: Simd>(s: S, t: GgmlType, w: &[u8], y: &mut [f32]) {
    match t {
        GgmlType::F32 => float_deq::<S, 32, KF32>(s, w, y),
        GgmlType::F16 => float_deq::<S, 16, KF16>(s, w, y),
        GgmlType::BF16 => float_deq::<S, 16, KBF16>(s, w, y),
        GgmlType::Q4_0 => s.deq_rows_fmt::<Q40, 18, 32>(w, y),
        GgmlType::Q4_1 => s.deq_rows_fmt::<Q41, 20, 32>(w, y),
        GgmlType::Q5_0 => s.deq_rows_fmt::<Q50, 22, 32>(w, y),
        GgmlType::Q5_1 => s.deq_rows_fmt::<Q51, 24, 32>(w, y),
        GgmlType::Q8_0 => s.deq_rows_fmt::<Q80, 34, 32>(w, y),
        GgmlType::Q2_K => s.deq_rows_fmt::<Q2K, 84, 256>(w, y),
        GgmlType::Q3_K => s.deq_rows_fmt::<Q3K, 110, 256>(w, y),
        GgmlType::Q4_K => s.deq_rows_fmt::<Q4K, 144, 256>(w, y),
        GgmlType::Q5_K => s.deq_rows_fmt::<Q5K, 176, 256>(w, y),
        GgmlType::Q6_K => s.deq_rows_fmt::<Q6K, 210, 256>(w, y),
    }
}

#[inline(always)]
fn kern_axpy4<S: Simd>(s: S, g: [f32; 4], w: [&[f32]; 4], y: &mut [f32]) {
    let n = y.len();
    let gs = g.map(|v| s.splat(v));
    let wc = w.map(|r| r.as_chunks::<8>().0);
    let (yc, _) = y.as_chunks_mut::<8>();
    for (i, yv) in yc.iter_mut().enumerate() {
        let mut acc = s.load(yv);
        for k in 0..4 {
            acc = s.mul_add(gs[k], s.load(&wc[k][i]), acc);
        }
        s.store(acc, yv);
    }
    for j in n - n % 8..n {
        y[j] += g[0] * w[0][j] + g[1] * w[1][j] + g[2] * w[2][j] + g[3] * w[3][j];
    }
}

#[inline(always)]
fn kern_dot_f32<S: Simd>(s: S, a: &[f32], b: &[f32]) -> f32 {
    let (ac, at) = a.as_chunks::<8>();
    let (bc, bt) = b.as_chunks::<8>();
    let mut acc = [s.zero(); 4];
    let mut a4 = ac.chunks_exact(4);
    let mut b4 = bc.chunks_exact(4);
    for (aq, bq) in (&mut a4).zip(&mut b4) {
        for ((acc, x), y) in acc.iter_mut().zip(aq).zip(bq) {
            *acc = s.mul_add(s.load(x), s.load(y), *acc);
        }
    }
    for (x, y) in a4.remainder().iter().zip(b4.remainder()) {
        acc[0] = s.mul_add(s.load(x), s.load(y), acc[0]);
    }
    let mut r = s.hsum(s.add(s.add(acc[0], acc[1]), s.add(acc[2], acc[3])));
    for (x, y) in at.iter().zip(bt) {
        r += x * y;
    }
    r
}

/// [`Simd::tile`] on 8-lane vectors.
#[inline(always)]
fn tile_generic<S: Simd, const R: usize, const C: usize>(
    s: S,
    w: &[f32],
    x: &[f32],
    cols: usize,
) -> [[f32; C]; R] {
    let n8 = cols / 8;
    let wr: [&[[f32; 8]]; R] =
        array::from_fn(|r| &w[r * cols..(r + 1) * cols].as_chunks::<8>().0[..n8]);
    let xr: [&[[f32; 8]]; C] =
        array::from_fn(|c| &x[c * cols..(c + 1) * cols].as_chunks::<8>().0[..n8]);
    let mut acc = [[s.zero(); C]; R];
    for j in 0..n8 {
        let mut xv = [s.zero(); C];
        for (v, xc) in xv.iter_mut().zip(&xr) {
            *v = s.load(&xc[j]);
        }
        for (ar, wrow) in acc.iter_mut().zip(&wr) {
            let wv = s.load(&wrow[j]);
            for (a, &xc) in ar.iter_mut().zip(&xv) {
                *a = s.mul_add(wv, xc, *a);
            }
        }
    }
    let mut res = [[0.0f32; C]; R];
    for (r, (rr, ar)) in res.iter_mut().zip(&acc).enumerate() {
        for (c, (v, &a)) in rr.iter_mut().zip(ar).enumerate() {
            let mut sum = s.hsum(a);
            for e in n8 * 8..cols {
                sum += w[r * cols + e] * x[c * cols + e];
            }
            *v = sum;
        }
    }
    res
}

/// One [`matmul`] panel in tiles of at most `MR` rows × `MC` vectors (`MR` ≤ 4, `MC` ≤ 3).
#[inline(always)]
fn kern_tiles<S: Simd, const MR: usize, const MC: usize>(s: S, job: &Tiles, out: &mut [f32]) {
    let cols = job.cols;
    let mut i = 0;
    while i < job.n {
        let nc = (job.n - i).min(MC);
        let x = &job.xs[i * cols..(i + nc) * cols];
        let mut r = 0;
        while r < job.nr {
            let mr = (job.nr - r).min(MR);
            let w = &job.panel[r * cols..(r + mr) * cols];
            let mut res = [[0.0f32; 3]; 4];
            macro_rules! run {
                ($r:literal, $c:literal) => {{
                    let t = s.tile::<$r, $c>(w, x, cols);
                    for (dst, src) in res.iter_mut().zip(&t) {
                        dst[..$c].copy_from_slice(src);
                    }
                }};
            }
            match (mr, nc) {
                (4, 3) => run!(4, 3),
                (4, 2) => run!(4, 2),
                (4, _) => run!(4, 1),
                (3, 3) => run!(3, 3),
                (3, 2) => run!(3, 2),
                (3, _) => run!(3, 1),
                (2, 3) => run!(2, 3),
                (2, 2) => run!(2, 2),
                (2, _) => run!(2, 1),
                (_, 3) => run!(1, 3),
                (_, 2) => run!(1, 2),
                _ => run!(1, 1),
            }
            for (k, rr) in res.iter().enumerate().take(mr) {
                for (c, &v) in rr.iter().enumerate().take(nc) {
                    out[(i + c) * job.rows + job.r0 + r + k] = v;
                }
            }
            r += mr;
        }
        i += nc;
    }
}

// ---------------------------------------------------------------------------------------------------------
// x86_64: AVX2 + FMA + F16C
// ---------------------------------------------------------------------------------------------------------

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// Proof that the CPU has AVX2, FMA and F16C: only [`Avx2::detect`] makes one.
    #[derive(Clone, Copy)]
    pub(super) struct Avx2 {
        _private: (),
    }

    impl Avx2 {
        pub(super) fn detect() -> Option<Avx2> {
            avx2_available().then_some(Avx2 { _private: () })
        }
    }

    // SAFETY (every `unsafe` block in this impl): the intrinsics need AVX, AVX2, FMA or F16C, which the CPU has
    // because an `Avx2` value exists only after run-time detection; loads and stores go through references to
    // arrays of exactly the size they access (unaligned intrinsics).
    impl Simd for Avx2 {
        type F = __m256;
        type B = __m128i;
        #[inline(always)]
        fn zero(self) -> __m256 {
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        fn splat(self, v: f32) -> __m256 {
            unsafe { _mm256_set1_ps(v) }
        }
        #[inline(always)]
        fn add(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        fn mul_add(self, a: __m256, b: __m256, c: __m256) -> __m256 {
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn hsum(self, a: __m256) -> f32 {
            unsafe {
                let s4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
                let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
                _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)))
            }
        }
        #[inline(always)]
        fn load(self, x: &[f32; 8]) -> __m256 {
            unsafe { _mm256_loadu_ps(x.as_ptr()) }
        }
        #[inline(always)]
        fn store(self, v: __m256, y: &mut [f32; 8]) {
            unsafe { _mm256_storeu_ps(y.as_mut_ptr(), v) }
        }
        #[inline(always)]
        fn load_f32le(self, b: &[u8; 32]) -> __m256 {
            unsafe { _mm256_loadu_ps(b.as_ptr().cast()) }
        }
        #[inline(always)]
        fn load_f16(self, b: &[u8; 16]) -> __m256 {
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(b.as_ptr().cast())) }
        }
        #[inline(always)]
        fn half(self, b: &[u8], off: usize) -> f32 {
            let h = le16(b, off);
            unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h)))) }
        }
        #[inline(always)]
        fn load_bf16(self, b: &[u8; 16]) -> __m256 {
            unsafe {
                let w = _mm256_cvtepu16_epi32(_mm_loadu_si128(b.as_ptr().cast()));
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w))
            }
        }
        #[inline(always)]
        fn bytes(self, b: &[u8; 16]) -> __m128i {
            unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
        }
        #[inline(always)]
        fn bytes2(self, lo: u64, hi: u64) -> __m128i {
            unsafe { _mm_set_epi64x(hi as i64, lo as i64) }
        }
        #[inline(always)]
        fn splat8(self, v: u8) -> __m128i {
            unsafe { _mm_set1_epi8(v as i8) }
        }
        #[inline(always)]
        fn and8(self, a: __m128i, b: __m128i) -> __m128i {
            unsafe { _mm_and_si128(a, b) }
        }
        #[inline(always)]
        fn or8(self, a: __m128i, b: __m128i) -> __m128i {
            unsafe { _mm_or_si128(a, b) }
        }
        #[inline(always)]
        fn sub8(self, a: __m128i, b: __m128i) -> __m128i {
            unsafe { _mm_sub_epi8(a, b) }
        }
        #[inline(always)]
        fn eq8(self, a: __m128i, b: __m128i) -> __m128i {
            unsafe { _mm_cmpeq_epi8(a, b) }
        }
        #[inline(always)]
        fn shr16<const N: i32>(self, a: __m128i) -> __m128i {
            unsafe { _mm_srli_epi16::<N>(a) }
        }
        #[inline(always)]
        fn shl16<const N: i32>(self, a: __m128i) -> __m128i {
            unsafe { _mm_slli_epi16::<N>(a) }
        }
        #[inline(always)]
        fn lo8(self, q: __m128i) -> __m256 {
            unsafe { _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)) }
        }
        #[inline(always)]
        fn hi8(self, q: __m128i) -> __m256 {
            unsafe { _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(q, q))) }
        }
        type I = __m256i;
        #[inline(always)]
        fn iadd(self, a: __m256i, b: __m256i) -> __m256i {
            unsafe { _mm256_add_epi32(a, b) }
        }
        #[inline(always)]
        fn idot16(self, q: __m128i, x: &[i16; 16]) -> __m256i {
            // Sign-extended to i16, then pairwise products summed in i32 (vpmaddwd: no saturation).
            unsafe {
                _mm256_madd_epi16(
                    _mm256_cvtepi8_epi16(q),
                    _mm256_loadu_si256(x.as_ptr().cast()),
                )
            }
        }
        #[inline(always)]
        fn iacc(self, acc: __m256, i: __m256i, d: f32) -> __m256 {
            unsafe { _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(d), acc) }
        }
        #[inline(always)]
        fn dot_rows_q_fmt<
            F: Format<BB, BL>,
            const BB: usize,
            const BL: usize,
            const G: usize,
            const NB: usize,
        >(
            self,
            w: &[u8],
            rb: usize,
            xq: &QuantizedActs,
            out: &mut [f32],
        ) {
            // SAFETY: `self` proves the CPU has the features.
            unsafe { rows_q_tf::<F, BB, BL, G, NB>(self, w, rb, xq, out) }
        }
        #[inline(always)]
        fn dot_rows_fmt<F: Format<BB, BL>, const BB: usize, const BL: usize, const G: usize>(
            self,
            w: &[u8],
            rb: usize,
            x: &[f32],
            gs: &[f32],
            out: &mut [f32],
        ) {
            // SAFETY: `self` proves the CPU has the features.
            unsafe { rows_tf::<F, BB, BL, G>(self, w, rb, x, gs, out) }
        }
        #[inline(always)]
        fn deq_rows_fmt<F: Format<BB, BL>, const BB: usize, const BL: usize>(
            self,
            w: &[u8],
            y: &mut [f32],
        ) {
            // SAFETY: `self` proves the CPU has the features.
            unsafe { deq_tf::<F, BB, BL>(self, w, y) }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn rows_tf<F: Format<BB, BL>, const BB: usize, const BL: usize, const G: usize>(
        s: Avx2,
        w: &[u8],
        rb: usize,
        x: &[f32],
        gs: &[f32],
        out: &mut [f32],
    ) {
        rows_fmt::<Avx2, F, BB, BL, G>(s, w, rb, x, gs, out);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn rows_q_tf<
        F: Format<BB, BL>,
        const BB: usize,
        const BL: usize,
        const G: usize,
        const NB: usize,
    >(
        s: Avx2,
        w: &[u8],
        rb: usize,
        xq: &QuantizedActs,
        out: &mut [f32],
    ) {
        rows_q_fmt::<Avx2, F, BB, BL, G, NB>(s, w, rb, xq, out);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn deq_tf<F: Format<BB, BL>, const BB: usize, const BL: usize>(
        s: Avx2,
        w: &[u8],
        y: &mut [f32],
    ) {
        deq_fmt::<Avx2, F, BB, BL>(s, w, y);
    }

    // The entry points: the generic kernels, inlined into functions compiled with the features enabled.

    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_rows_tf(s: Avx2, t: GgmlType, w: &[u8], rb: usize, x: &[f32], out: &mut [f32]) {
        kern_dot_rows(s, t, w, rb, x, out);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn dequantize_tf(s: Avx2, t: GgmlType, w: &[u8], y: &mut [f32]) {
        kern_dequantize(s, t, w, y);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_f32_tf(s: Avx2, a: &[f32], b: &[f32]) -> f32 {
        kern_dot_f32(s, a, b)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn axpy4_tf(s: Avx2, g: [f32; 4], w: [&[f32]; 4], y: &mut [f32]) {
        kern_axpy4(s, g, w, y)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn tiles_tf(s: Avx2, job: &Tiles, out: &mut [f32]) {
        kern_tiles::<Avx2, 4, 2>(s, job, out);
    }

    pub(super) fn dot_rows(s: Avx2, t: GgmlType, w: &[u8], rb: usize, x: &[f32], out: &mut [f32]) {
        // SAFETY: `s` proves the CPU has the features.
        unsafe { dot_rows_tf(s, t, w, rb, x, out) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_rows_q_tf(
        s: Avx2,
        t: GgmlType,
        w: &[u8],
        rb: usize,
        xq: &QuantizedActs,
        out: &mut [f32],
    ) {
        kern_dot_rows_q(s, t, w, rb, xq, out);
    }

    pub(super) fn dot_rows_q(
        s: Avx2,
        t: GgmlType,
        w: &[u8],
        rb: usize,
        xq: &QuantizedActs,
        out: &mut [f32],
    ) {
        // SAFETY: `s` proves the CPU has the features.
        unsafe { dot_rows_q_tf(s, t, w, rb, xq, out) }
    }

    pub(super) fn dequantize(s: Avx2, t: GgmlType, w: &[u8], y: &mut [f32]) {
        // SAFETY: `s` proves the CPU has the features.
        unsafe { dequantize_tf(s, t, w, y) }
    }

    pub(super) fn dot_f32(s: Avx2, a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: `s` proves the CPU has the features.
        unsafe { dot_f32_tf(s, a, b) }
    }

    pub(super) fn axpy4(s: Avx2, g: [f32; 4], w: [&[f32]; 4], y: &mut [f32]) {
        // SAFETY: `s` proves the CPU has the features.
        unsafe { axpy4_tf(s, g, w, y) }
    }

    pub(super) fn tiles(s: Avx2, job: &Tiles, out: &mut [f32]) {
        // SAFETY: `s` proves the CPU has the features.
        unsafe { tiles_tf(s, job, out) }
    }
}

// ---------------------------------------------------------------------------------------------------------
// wasm32 simd128
// ---------------------------------------------------------------------------------------------------------

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod wasm {
    use super::*;
    use core::arch::wasm32::*;

    /// simd128 is enabled for the whole build (a compile-time feature), so no detection.
    #[derive(Clone, Copy)]
    pub(super) struct Wasm;

    /// 4 halves (in the low 16 bits of each u32 lane) → f32, exactly as [`f16_to_f32`].
    #[inline(always)]
    fn f16x4(h: v128) -> v128 {
        let em = v128_and(h, u32x4_splat(0x7fff));
        let sign = i32x4_shl(v128_xor(h, em), 16);
        // Normal numbers: rebias the exponent.
        let norm = i32x4_add(i32x4_shl(em, 13), u32x4_splat((127 - 15) << 23));
        // Exponent 0 (zero / subnormal): read the mantissa with the exponent of 2⁻¹⁴, i.e. 2⁻¹⁴·(1 + m/1024);
        // minus 2⁻¹⁴ leaves m·2⁻²⁴ exactly.
        let sub = f32x4_sub(
            i32x4_add(norm, u32x4_splat(1 << 23)),
            f32x4_splat(1.0 / 16384.0),
        );
        let is_sub = i32x4_lt(em, u32x4_splat(0x0400));
        // Exponent 31 (inf / NaN): add the bias once more to reach exponent 255; NaN gets the quiet bit.
        let inf = i32x4_ge(em, u32x4_splat(0x7c00));
        let nan = i32x4_gt(em, u32x4_splat(0x7c00));
        let big = v128_or(
            i32x4_add(norm, v128_and(inf, u32x4_splat((127 - 15) << 23))),
            v128_and(nan, u32x4_splat(0x0040_0000)),
        );
        v128_or(v128_bitselect(sub, big, is_sub), sign)
    }

    // SAFETY (every `unsafe` block in this impl): unaligned v128 loads and stores through references to arrays
    // of exactly the bytes they access (16 bytes, or two halves of 32).
    impl Simd for Wasm {
        type F = [v128; 2];
        type B = v128;
        #[inline(always)]
        fn zero(self) -> [v128; 2] {
            [f32x4_splat(0.0); 2]
        }
        #[inline(always)]
        fn splat(self, v: f32) -> [v128; 2] {
            [f32x4_splat(v); 2]
        }
        #[inline(always)]
        fn add(self, a: [v128; 2], b: [v128; 2]) -> [v128; 2] {
            [f32x4_add(a[0], b[0]), f32x4_add(a[1], b[1])]
        }
        #[inline(always)]
        fn mul(self, a: [v128; 2], b: [v128; 2]) -> [v128; 2] {
            [f32x4_mul(a[0], b[0]), f32x4_mul(a[1], b[1])]
        }
        #[inline(always)]
        fn mul_add(self, a: [v128; 2], b: [v128; 2], c: [v128; 2]) -> [v128; 2] {
            [
                f32x4_add(f32x4_mul(a[0], b[0]), c[0]),
                f32x4_add(f32x4_mul(a[1], b[1]), c[1]),
            ]
        }
        #[inline(always)]
        fn hsum(self, a: [v128; 2]) -> f32 {
            let v = f32x4_add(a[0], a[1]);
            (f32x4_extract_lane::<0>(v) + f32x4_extract_lane::<1>(v))
                + (f32x4_extract_lane::<2>(v) + f32x4_extract_lane::<3>(v))
        }
        #[inline(always)]
        fn load(self, x: &[f32; 8]) -> [v128; 2] {
            let (a, b): (&[f32; 4], &[f32; 4]) = (arr(x, 0), arr(x, 4));
            unsafe { [v128_load(a.as_ptr().cast()), v128_load(b.as_ptr().cast())] }
        }
        #[inline(always)]
        fn store(self, v: [v128; 2], y: &mut [f32; 8]) {
            let a: &mut [f32; 4] = arr_mut(y, 0);
            unsafe { v128_store(a.as_mut_ptr().cast(), v[0]) };
            let b: &mut [f32; 4] = arr_mut(y, 4);
            unsafe { v128_store(b.as_mut_ptr().cast(), v[1]) };
        }
        #[inline(always)]
        fn load_f32le(self, b: &[u8; 32]) -> [v128; 2] {
            [self.bytes(arr(b, 0)), self.bytes(arr(b, 16))]
        }
        #[inline(always)]
        fn load_f16(self, b: &[u8; 16]) -> [v128; 2] {
            let v = self.bytes(b);
            let e = v128_and(v, u16x8_splat(0x7c00));
            let special = v128_or(
                i16x8_eq(e, u16x8_splat(0)),
                i16x8_eq(e, u16x8_splat(0x7c00)),
            );
            if v128_any_true(special) {
                [
                    f16x4(u32x4_extend_low_u16x8(v)),
                    f16x4(u32x4_extend_high_u16x8(v)),
                ]
            } else {
                // All 8 normal (the common case): sign-extend to 32 bits and shift, so the sign lands in bit 31
                // and exponent + mantissa in bits 13..28; clear bits 28..31 but the sign; rebias.
                let cvt = |h: v128| {
                    let t = v128_and(i32x4_shl(h, 13), u32x4_splat(0x8fff_e000));
                    i32x4_add(t, u32x4_splat((127 - 15) << 23))
                };
                [
                    cvt(i32x4_extend_low_i16x8(v)),
                    cvt(i32x4_extend_high_i16x8(v)),
                ]
            }
        }
        #[inline(always)]
        fn load_bf16(self, b: &[u8; 16]) -> [v128; 2] {
            let v = self.bytes(b);
            [
                i32x4_shl(u32x4_extend_low_u16x8(v), 16),
                i32x4_shl(u32x4_extend_high_u16x8(v), 16),
            ]
        }
        #[inline(always)]
        fn bytes(self, b: &[u8; 16]) -> v128 {
            unsafe { v128_load(b.as_ptr().cast()) }
        }
        #[inline(always)]
        fn bytes2(self, lo: u64, hi: u64) -> v128 {
            u64x2(lo, hi)
        }
        #[inline(always)]
        fn splat8(self, v: u8) -> v128 {
            u8x16_splat(v)
        }
        #[inline(always)]
        fn and8(self, a: v128, b: v128) -> v128 {
            v128_and(a, b)
        }
        #[inline(always)]
        fn or8(self, a: v128, b: v128) -> v128 {
            v128_or(a, b)
        }
        #[inline(always)]
        fn sub8(self, a: v128, b: v128) -> v128 {
            i8x16_sub(a, b)
        }
        #[inline(always)]
        fn eq8(self, a: v128, b: v128) -> v128 {
            i8x16_eq(a, b)
        }
        #[inline(always)]
        fn shr16<const N: i32>(self, a: v128) -> v128 {
            u16x8_shr(a, N as u32)
        }
        #[inline(always)]
        fn shl16<const N: i32>(self, a: v128) -> v128 {
            i16x8_shl(a, N as u32)
        }
        #[inline(always)]
        fn lo8(self, q: v128) -> [v128; 2] {
            let w = i16x8_extend_low_i8x16(q);
            [
                f32x4_convert_i32x4(i32x4_extend_low_i16x8(w)),
                f32x4_convert_i32x4(i32x4_extend_high_i16x8(w)),
            ]
        }
        #[inline(always)]
        fn hi8(self, q: v128) -> [v128; 2] {
            let w = i16x8_extend_high_i8x16(q);
            [
                f32x4_convert_i32x4(i32x4_extend_low_i16x8(w)),
                f32x4_convert_i32x4(i32x4_extend_high_i16x8(w)),
            ]
        }
        #[inline(always)]
        fn tile<const R: usize, const C: usize>(
            self,
            w: &[f32],
            x: &[f32],
            cols: usize,
        ) -> [[f32; C]; R] {
            tile4::<R, C>(w, x, cols)
        }
        type I = [v128; 2];
        #[inline(always)]
        fn iadd(self, a: [v128; 2], b: [v128; 2]) -> [v128; 2] {
            [i32x4_add(a[0], b[0]), i32x4_add(a[1], b[1])]
        }
        #[inline(always)]
        fn idot16(self, q: v128, x: &[i16; 16]) -> [v128; 2] {
            let (a, b): (&[i16; 8], &[i16; 8]) = (arr(x, 0), arr(x, 8));
            let (xa, xb) = unsafe { (v128_load(a.as_ptr().cast()), v128_load(b.as_ptr().cast())) };
            [
                i32x4_dot_i16x8(i16x8_extend_low_i8x16(q), xa),
                i32x4_dot_i16x8(i16x8_extend_high_i8x16(q), xb),
            ]
        }
        /// The 8 lanes are first added to 4 (exact in i32), so one conversion and one multiply.
        #[inline(always)]
        fn iacc(self, acc: [v128; 2], i: [v128; 2], d: f32) -> [v128; 2] {
            let v = f32x4_convert_i32x4(i32x4_add(i[0], i[1]));
            [f32x4_add(acc[0], f32x4_mul(v, f32x4_splat(d))), acc[1]]
        }
    }

    #[inline(always)]
    fn ld4(x: &[f32; 4]) -> v128 {
        // SAFETY: an unaligned load of the 16 bytes of `x`.
        unsafe { v128_load(x.as_ptr().cast()) }
    }

    /// [`Simd::tile`] on single 4-lane vectors: R·C accumulators + C + 2 registers fit the 16 vector
    /// registers of an x86 host for 4 × 2 (the 8-lane version does not).
    #[inline(always)]
    fn tile4<const R: usize, const C: usize>(w: &[f32], x: &[f32], cols: usize) -> [[f32; C]; R] {
        let n4 = cols / 4;
        let wr: [&[[f32; 4]]; R] =
            array::from_fn(|r| &w[r * cols..(r + 1) * cols].as_chunks::<4>().0[..n4]);
        let xr: [&[[f32; 4]]; C] =
            array::from_fn(|c| &x[c * cols..(c + 1) * cols].as_chunks::<4>().0[..n4]);
        let mut acc = [[f32x4_splat(0.0); C]; R];
        for j in 0..n4 {
            let mut xv = [f32x4_splat(0.0); C];
            for (v, xc) in xv.iter_mut().zip(&xr) {
                *v = ld4(&xc[j]);
            }
            for (ar, wrow) in acc.iter_mut().zip(&wr) {
                let wv = ld4(&wrow[j]);
                for (a, &xc) in ar.iter_mut().zip(&xv) {
                    *a = f32x4_add(*a, f32x4_mul(wv, xc));
                }
            }
        }
        let mut res = [[0.0f32; C]; R];
        for (r, (rr, ar)) in res.iter_mut().zip(&acc).enumerate() {
            for (c, (v, &a)) in rr.iter_mut().zip(ar).enumerate() {
                let mut sum = (f32x4_extract_lane::<0>(a) + f32x4_extract_lane::<1>(a))
                    + (f32x4_extract_lane::<2>(a) + f32x4_extract_lane::<3>(a));
                for e in n4 * 4..cols {
                    sum += w[r * cols + e] * x[c * cols + e];
                }
                *v = sum;
            }
        }
        res
    }

    pub(super) fn dot_rows(t: GgmlType, w: &[u8], rb: usize, x: &[f32], out: &mut [f32]) {
        kern_dot_rows(Wasm, t, w, rb, x, out);
    }

    pub(super) fn dequantize(t: GgmlType, w: &[u8], y: &mut [f32]) {
        kern_dequantize(Wasm, t, w, y);
    }

    pub(super) fn dot_rows_q(
        t: GgmlType,
        w: &[u8],
        rb: usize,
        xq: &QuantizedActs,
        out: &mut [f32],
    ) {
        kern_dot_rows_q(Wasm, t, w, rb, xq, out);
    }

    pub(super) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        kern_dot_f32(Wasm, a, b)
    }

    pub(super) fn axpy4(g: [f32; 4], w: [&[f32]; 4], y: &mut [f32]) {
        kern_axpy4(Wasm, g, w, y)
    }

    pub(super) fn tiles(job: &Tiles, out: &mut [f32]) {
        kern_tiles::<Wasm, 4, 2>(Wasm, job, out);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    // In wasm the same tests run under wasm-bindgen-test (Node and headless Chromium): the simd128 kernels.
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    /// xorshift64* — deterministic test data without dependencies.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Rng {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        /// Uniform in [-1, 1).
        fn f32(&mut self) -> f32 {
            ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// Byte offsets of the f16 scale fields in a block.
    fn scale_fields(t: GgmlType) -> &'static [usize] {
        match t {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
            GgmlType::Q2_K => &[80, 82],
            GgmlType::Q3_K => &[108],
            GgmlType::Q6_K => &[208],
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => &[],
        }
    }

    /// A random row of `n` elements: random code bytes, scales finite in [-0.1, 0.1]; plain floats in [-1, 1].
    fn random_row(t: GgmlType, n: usize, rng: &mut Rng) -> Vec<u8> {
        let mut out = Vec::new();
        match t {
            GgmlType::F32 => (0..n).for_each(|_| out.extend(rng.f32().to_le_bytes())),
            GgmlType::F16 => (0..n).for_each(|_| out.extend(f32_to_f16(rng.f32()).to_le_bytes())),
            GgmlType::BF16 => {
                (0..n).for_each(|_| out.extend(((rng.f32().to_bits() >> 16) as u16).to_le_bytes()))
            }
            _ => {
                for _ in 0..n / t.block_len() {
                    let mut b: Vec<u8> = (0..t.block_bytes()).map(|_| rng.next() as u8).collect();
                    for &off in scale_fields(t) {
                        let d = f32_to_f16(rng.f32() * 0.1);
                        b[off..off + 2].copy_from_slice(&d.to_le_bytes());
                    }
                    out.extend(b);
                }
            }
        }
        assert_eq!(Some(out.len()), t.row_bytes(n));
        out
    }

    fn dequant_ref(t: GgmlType, w: &[u8], n: usize) -> Vec<f32> {
        let mut y = vec![0.0; n];
        dequantize_row_ref(t, w, &mut y);
        y
    }

    /// The bound for two sums of the same n terms: reordering n additions (or fusing a multiply into one)
    /// changes an f32 sum by at most about n·ε·Σ|terms| each, so 2·n·ε·Σ|wᵢxᵢ| covers both sides.
    fn bound(w: &[f32], x: &[f32]) -> f64 {
        let abs: f64 = w
            .iter()
            .zip(x)
            .map(|(a, b)| (f64::from(*a) * f64::from(*b)).abs())
            .sum();
        2.0 * w.len().max(1) as f64 * f64::from(f32::EPSILON) * abs + 1e-30
    }

    fn lengths(t: GgmlType) -> Vec<usize> {
        if t.block_len() == 1 {
            vec![1, 2, 3, 7, 8, 9, 16, 31, 32, 33, 40, 64, 100, 257]
        } else {
            [1, 2, 3, 7].iter().map(|b| b * t.block_len()).collect()
        }
    }

    fn check_type(t: GgmlType) {
        let mut rng = Rng::new(u64::from(t.id()) + 17);
        for n in lengths(t) {
            let w = random_row(t, n, &mut rng);
            let x: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
            let wf = dequant_ref(t, &w, n);
            assert!(
                wf.iter().all(|v| v.is_finite()),
                "{t:?}: non-finite test data"
            );
            let bnd = bound(&wf, &x);
            let want = dot_row_ref(t, &w, &x);
            // 3. the reference dot against an f64 sum of the same dequantized values.
            let exact: f64 = wf
                .iter()
                .zip(&x)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum();
            assert!(
                (f64::from(want) - exact).abs() <= bnd,
                "{t:?} n={n}: ref {want} vs f64 {exact}"
            );
            for b in Backend::available() {
                // 1. dequantization bit for bit.
                let mut y = vec![0.0f32; n];
                dequantize_row_with(b, t, &w, &mut y);
                for (i, (p, q)) in y.iter().zip(&wf).enumerate() {
                    assert_eq!(
                        p.to_bits(),
                        q.to_bits(),
                        "{t:?} {b:?} n={n} element {i}: {p} vs {q}"
                    );
                }
                // 2. the fused dot against the reference.
                let got = dot_row_with(b, t, &w, &x);
                assert!(
                    (f64::from(got) - f64::from(want)).abs() <= bnd,
                    "{t:?} {b:?} n={n}: dot {got} vs ref {want} (bound {bnd})"
                );
            }
        }
        // 4. matmul against matvec, and matvec against dot_row, on shapes that are no multiple of any tile.
        let cols = if t.block_len() == 1 {
            37
        } else {
            2 * t.block_len()
        };
        for rows in [7, 37] {
            let w: Vec<u8> = (0..rows)
                .flat_map(|_| random_row(t, cols, &mut rng))
                .collect();
            let rb = t.row_bytes(cols).unwrap();
            for n in [1, 3, 5] {
                let xs: Vec<f32> = (0..n * cols).map(|_| rng.f32()).collect();
                for b in Backend::available() {
                    let mut mm = vec![0.0f32; n * rows];
                    matmul_with(b, t, &w, rows, cols, &xs, n, &mut mm);
                    for i in 0..n {
                        let x = &xs[i * cols..(i + 1) * cols];
                        let mut mv = vec![0.0f32; rows];
                        matvec_with(b, t, &w, rows, cols, x, &mut mv);
                        for r in 0..rows {
                            let row = &w[r * rb..(r + 1) * rb];
                            let d = dot_row_with(b, t, row, x);
                            assert_eq!(d.to_bits(), mv[r].to_bits(), "{t:?} {b:?}: matvec row {r}");
                            let bnd = bound(&dequant_ref(t, row, cols), x);
                            let got = mm[i * rows + r];
                            assert!(
                                (f64::from(got) - f64::from(mv[r])).abs() <= bnd,
                                "{t:?} {b:?} rows={rows} n={n} [{i},{r}]: matmul {got} vs matvec {}",
                                mv[r]
                            );
                        }
                    }
                }
            }
        }
    }

    macro_rules! quant_tests {
        ($($name:ident => $t:expr),* $(,)?) => {
            $(
                #[test]
                fn $name() {
                    check_type($t);
                }
            )*
        };
    }

    quant_tests!(
        f32_rows => GgmlType::F32,
        f16_rows => GgmlType::F16,
        bf16_rows => GgmlType::BF16,
        q4_0 => GgmlType::Q4_0,
        q4_1 => GgmlType::Q4_1,
        q5_0 => GgmlType::Q5_0,
        q5_1 => GgmlType::Q5_1,
        q8_0 => GgmlType::Q8_0,
        q2_k => GgmlType::Q2_K,
        q3_k => GgmlType::Q3_K,
        q4_k => GgmlType::Q4_K,
        q5_k => GgmlType::Q5_K,
        q6_k => GgmlType::Q6_K,
    );

    #[test]
    fn type_table() {
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_u32(t.id()), Some(t));
            assert_eq!(t.row_bytes(t.block_len() * 3), Some(3 * t.block_bytes()));
        }
        for v in [4, 5, 9, 15, 16, 29, 31, 1000] {
            assert_eq!(GgmlType::from_u32(v), None);
        }
        assert_eq!(GgmlType::Q4_K.name(), "Q4_K");
        assert_eq!(GgmlType::Q4_0.row_bytes(33), None);
        assert_eq!(GgmlType::Q8_0.row_bytes(0), Some(0));
        assert_eq!(GgmlType::F32.row_bytes(usize::MAX), None);
    }

    /// Every half, converted by each backend's dequantization, bit for bit against `f16_to_f32` (NaNs too);
    /// the same for bfloat16.
    #[test]
    fn all_halves_every_backend() {
        let bytes: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
        for b in Backend::available() {
            for (t, conv) in [
                (GgmlType::F16, f16_to_f32 as fn(u16) -> f32),
                (GgmlType::BF16, bf16_to_f32),
            ] {
                let mut y = vec![0.0f32; 65536];
                dequantize_row_with(b, t, &bytes, &mut y);
                for (h, v) in y.iter().enumerate() {
                    assert_eq!(
                        v.to_bits(),
                        conv(h as u16).to_bits(),
                        "{t:?} {b:?} {h:#06x}"
                    );
                }
            }
        }
    }

    fn block(t: GgmlType, fill: &[(usize, u8)], scales: &[(usize, f32)]) -> Vec<u8> {
        let mut b = vec![0u8; t.block_bytes()];
        for &(i, v) in fill {
            b[i] = v;
        }
        for &(off, v) in scales {
            b[off..off + 2].copy_from_slice(&f32_to_f16(v).to_le_bytes());
        }
        b
    }

    /// A block checked by hand against the layout, on the reference and every backend.
    fn expect(t: GgmlType, b: &[u8], want: &[(usize, f32)]) {
        let n = t.block_len();
        let mut ys = vec![("ref".to_string(), dequant_ref(t, b, n))];
        for be in Backend::available() {
            let mut y = vec![0.0; n];
            dequantize_row_with(be, t, b, &mut y);
            ys.push((format!("{be:?}"), y));
        }
        for (name, y) in &ys {
            for &(i, v) in want {
                assert_eq!(y[i], v, "{t:?} {name} element {i}");
            }
        }
    }

    #[test]
    fn hand_q4_0() {
        // d = 0.5; qs[0] = 0xF0: element 0 = 0.5·(0−8), element 16 = 0.5·(15−8); qs[3] = 0x38.
        let b = block(GgmlType::Q4_0, &[(2, 0xF0), (5, 0x38)], &[(0, 0.5)]);
        expect(
            GgmlType::Q4_0,
            &b,
            &[(0, -4.0), (16, 3.5), (3, 0.0), (19, -2.5), (1, -4.0)],
        );
    }

    #[test]
    fn hand_q4_1() {
        // d = 0.25, m = −1; qs[1] = 0x4C: element 1 = 0.25·12 − 1, element 17 = 0.25·4 − 1.
        let b = block(GgmlType::Q4_1, &[(5, 0x4C)], &[(0, 0.25), (2, -1.0)]);
        expect(GgmlType::Q4_1, &b, &[(1, 2.0), (17, 0.0), (0, -1.0)]);
    }

    #[test]
    fn hand_q5_0() {
        // d = 1; qh bits 0 and 17 set; qs[0] = 0x21, qs[1] = 0x43.
        // element 0 = (1|16)−16 = 1; 16 = 2−16; 1 = 3−16; 17 = (4|16)−16 = 4.
        let b = block(
            GgmlType::Q5_0,
            &[(2, 0x01), (4, 0x02), (6, 0x21), (7, 0x43)],
            &[(0, 1.0)],
        );
        expect(
            GgmlType::Q5_0,
            &b,
            &[(0, 1.0), (16, -14.0), (1, -13.0), (17, 4.0), (31, -16.0)],
        );
    }

    #[test]
    fn hand_q5_1() {
        // d = 2, m = 0.5; qh bit 31 set; qs[15] = 0xF1: element 15 = 2·1 + 0.5, element 31 = 2·31 + 0.5.
        let b = block(
            GgmlType::Q5_1,
            &[(7, 0x80), (8 + 15, 0xF1)],
            &[(0, 2.0), (2, 0.5)],
        );
        expect(GgmlType::Q5_1, &b, &[(15, 2.5), (31, 62.5), (0, 0.5)]);
    }

    #[test]
    fn hand_q8_0() {
        // d = 2; qs[0] = −3, qs[31] = 127.
        let b = block(GgmlType::Q8_0, &[(2, (-3i8) as u8), (33, 127)], &[(0, 2.0)]);
        expect(GgmlType::Q8_0, &b, &[(0, -6.0), (31, 254.0), (5, 0.0)]);
    }

    #[test]
    fn hand_q4_k() {
        // d = 1, dmin = 0.5. Scales (12 bytes at 4): byte0 = 0x45 → sc0 = 5, top bits 01 feed sc4's high bits;
        // byte4 = 0x83 → m0 = 3, top bits 10 feed m4's; byte8 = 0x72 → sc4 = 2 | 1<<4 = 18, m4 = 7 | 2<<4 = 39;
        // byte1 = 2 → sc1 = 2, byte5 = 4 → m1 = 4.
        // qs (at 16): qs[0] = 0x7A: element 0 (sub-block 0, low nibble 10) = 5·10 − 0.5·3 = 48.5,
        // element 32 (sub-block 1, high nibble 7) = 2·7 − 0.5·4 = 12; qs[64] = 0x03: element 128 (sub-block 4)
        // = 18·3 − 0.5·39 = 34.5, element 160 (sub-block 5: sc5 = m5 = 0) = 0.
        let b = block(
            GgmlType::Q4_K,
            &[
                (4, 0x45),
                (5, 2),
                (8, 0x83),
                (9, 4),
                (12, 0x72),
                (16, 0x7A),
                (16 + 64, 0x03),
            ],
            &[(0, 1.0), (2, 0.5)],
        );
        expect(
            GgmlType::Q4_K,
            &b,
            &[(0, 48.5), (32, 12.0), (128, 34.5), (160, 0.0), (1, -1.5)],
        );
    }

    #[test]
    fn hand_q5_k() {
        // As Q4_K's layout with qh (32 bytes at 16) and qs at 48: d = 1, dmin = 1, sc0 = 3 (m0 = 1),
        // sc3 = 2 (m3 = 0). qh[0] = 0b1001: bit 0 → element 0 gets +16, bit 3 → element 96 (sub-block 3,
        // pair 1 high nibble, lane 0) gets +16. qs[0] = 0x05 → element 0 = 3·(5+16) − 1 = 62;
        // qs[32] = 0x40 → element 96 = 2·(4+16) − 0 = 40, element 64 (sub-block 2: sc = m = 0) = 0.
        let b = block(
            GgmlType::Q5_K,
            &[
                (4, 3),
                (7, 2),
                (8, 1),
                (16, 0b1001),
                (48, 0x05),
                (48 + 32, 0x40),
            ],
            &[(0, 1.0), (2, 1.0)],
        );
        expect(
            GgmlType::Q5_K,
            &b,
            &[(0, 62.0), (96, 40.0), (64, 0.0), (1, -1.0)],
        );
    }

    #[test]
    fn hand_q6_k() {
        // d = 0.5. ql[0] = 0x97, qh[0] = 0xD9 (bit pairs 01, 10, 01, 11 from the bottom), ql[32] = 0x0E.
        // element 0 = 0.5·sc0·((7 | 1<<4) − 32) = 0.5·3·(−9) = −13.5
        // element 32 = 0.5·sc2·((14 | 2<<4) − 32) = 0.5·(−2)·14 = −14
        // element 64 = 0.5·sc4·((9 | 1<<4) − 32) = 0.5·10·(−7) = −35
        // element 96 = 0.5·sc6·((0 | 3<<4) − 32) = 0.5·1·16 = 8
        // element 145 (second half, l = 17): ql[81] = 0x0F, qh[49] = 0x03, sc9 = −1 → 0.5·(−1)·31 = −15.5
        let sc = 192;
        let b = block(
            GgmlType::Q6_K,
            &[
                (0, 0x97),
                (128, 0xD9),
                (32, 0x0E),
                (81, 0x0F),
                (128 + 49, 0x03),
                (sc, 3),
                (sc + 2, (-2i8) as u8),
                (sc + 4, 10),
                (sc + 6, 1),
                (sc + 9, (-1i8) as u8),
            ],
            &[(208, 0.5)],
        );
        expect(
            GgmlType::Q6_K,
            &b,
            &[
                (0, -13.5),
                (32, -14.0),
                (64, -35.0),
                (96, 8.0),
                (145, -15.5),
            ],
        );
    }

    #[test]
    fn hand_q2_k() {
        // d = 1, dmin = 0.25. scales[0] = 0x21 (scale 1, min 2), scales[2] = 0x13 (scale 3, min 1).
        // qs[0] (at 16) = 0xE7 = 0b11_10_01_11: element 0 = 1·3 − 0.25·2 = 2.5; element 32 (shift 2, group 2)
        // = 3·1 − 0.25 = 2.75; element 64 (shift 4, group 4: scales[4] = 0) = 0.
        let b = block(
            GgmlType::Q2_K,
            &[(0, 0x21), (2, 0x13), (16, 0xE7)],
            &[(80, 1.0), (82, 0.25)],
        );
        expect(
            GgmlType::Q2_K,
            &b,
            &[(0, 2.5), (32, 2.75), (64, 0.0), (1, -0.5)],
        );
    }

    #[test]
    fn hand_q3_k() {
        // d = 0.5. Scales (12 bytes at 96): byte0 = 0x03, byte8 = 0x02 → group 0 = (3 | 2<<4) − 32 = 3;
        // group 8 = (0 | 0) − 32 = −32; byte2 = 0x01, byte10 = 0 → group 2 = 1 − 32 = −31.
        // hmask[0] = 0x01, qs[0] (at 32) = 0x02: element 0 = 0.5·3·(2 − 0) = 3;
        // element 32 (shift 2, mask bit 1 clear, group 2) = 0.5·(−31)·(0 − 4) = 62;
        // element 128 (second half: qs[32] = 0, hmask bit 4 clear, group 8) = 0.5·(−32)·(−4) = 64.
        let b = block(
            GgmlType::Q3_K,
            &[(0, 0x01), (32, 0x02), (96, 0x03), (98, 0x01), (104, 0x02)],
            &[(108, 0.5)],
        );
        expect(GgmlType::Q3_K, &b, &[(0, 3.0), (32, 62.0), (128, 64.0)]);
    }

    /// The two Q3_K scale unpackings (the reference's u32 recipe, the decoders' per-group formula) agree.
    #[test]
    fn q3k_scale_unpackings_agree() {
        let mut rng = Rng::new(3);
        for _ in 0..1000 {
            let sc: [u8; 12] = array::from_fn(|_| rng.next() as u8);
            for (k, &r) in q3k_scales_ref(&sc).iter().enumerate() {
                assert_eq!(i32::from(r) - 32, q3k_scale(&sc, k));
            }
        }
    }

    #[test]
    fn f16_values() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x03ff), 1023.0 * 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x0400), 2f32.powi(-14));
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
        assert_eq!(f16_to_f32(0xfc00), f32::NEG_INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan() && f16_to_f32(0x7c01).is_nan());
        assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
        assert_eq!(f32_to_f16(1.0), 0x3c00);
        assert_eq!(f32_to_f16(-2.0), 0xc000);
        assert_eq!(f32_to_f16(65504.0), 0x7bff);
        assert_eq!(f32_to_f16(65519.0), 0x7bff);
        assert_eq!(f32_to_f16(65520.0), 0x7c00); // halfway to the next step: ties to even → infinity
        assert_eq!(f32_to_f16(1e6), 0x7c00);
        assert_eq!(f32_to_f16(f32::NEG_INFINITY), 0xfc00);
        assert_eq!(f32_to_f16(2f32.powi(-24)), 0x0001);
        assert_eq!(f32_to_f16(2f32.powi(-25)), 0x0000); // tie → even (0)
        assert_eq!(f32_to_f16(2f32.powi(-25) * 1.0001), 0x0001);
        assert_eq!(f32_to_f16(3.0 * 2f32.powi(-25)), 0x0002); // 1.5 steps: tie → even (2)
        assert_eq!(f32_to_f16(1e-10), 0);
        assert_eq!(f32_to_f16(-1e-10), 0x8000);
        assert_eq!(f32_to_f16(-0.0), 0x8000);
        assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11)), 0x3c00); // tie → even
        assert_eq!(f32_to_f16(1.0 + 3.0 * 2f32.powi(-11)), 0x3c02); // tie → even (up)
        assert_eq!(f32_to_f16(2f32.powi(-14) - 2f32.powi(-25)), 0x0400); // subnormal rounding carries
        let nan = f32_to_f16(f32::NAN);
        assert!(nan & 0x7c00 == 0x7c00 && nan & 0x3ff != 0);
    }

    /// Every half against its value computed in f64 from the definition; every non-NaN half round-trips.
    #[test]
    fn f16_all_halves() {
        for h in 0..=u16::MAX {
            let (s, e, m) = (h >> 15, (h >> 10) & 0x1f, h & 0x3ff);
            let f = f16_to_f32(h);
            if e == 31 {
                assert!(
                    if m == 0 { f.is_infinite() } else { f.is_nan() },
                    "{h:#06x}"
                );
                if m != 0 {
                    continue;
                }
            } else {
                let mag = if e == 0 {
                    f64::from(m) * 2f64.powi(-24)
                } else {
                    (1.0 + f64::from(m) / 1024.0) * 2f64.powi(i32::from(e) - 15)
                };
                let want = if s == 1 { -mag } else { mag };
                assert_eq!(f64::from(f), want, "{h:#06x}");
                assert_eq!(f.is_sign_negative(), s == 1, "{h:#06x}");
            }
            assert_eq!(f32_to_f16(f), h, "round trip {h:#06x}");
        }
    }

    /// f32 → f16 rounds to the nearest half (ties to even), checked against neighbours in f64.
    #[test]
    fn f32_to_f16_rounds_to_nearest() {
        let mut rng = Rng::new(9);
        for i in 0..200_000 {
            // Magnitudes from 2⁻²⁶ to 2¹⁵.
            let f = rng.f32() * 2f32.powi((i % 42) - 26);
            let h = f32_to_f16(f);
            let v = f64::from(f16_to_f32(h));
            let err = (f64::from(f) - v).abs();
            for nb in [h.wrapping_sub(1), h.wrapping_add(1), h ^ 0x8000] {
                let w = f64::from(f16_to_f32(nb));
                if w.is_finite() && nb & 0x7c00 != 0x7c00 {
                    let e2 = (f64::from(f) - w).abs();
                    assert!(
                        err < e2 || (err == e2 && h & 1 == 0),
                        "{f:e}: {h:#06x} vs {nb:#06x}"
                    );
                }
            }
        }
    }

    #[test]
    fn dot_f32_every_backend() {
        let mut rng = Rng::new(5);
        for n in (0..70).chain([127, 128, 129, 576, 1000]) {
            let a: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
            let b: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
            let mut want = 0.0f32;
            for (x, y) in a.iter().zip(&b) {
                want += x * y;
            }
            let bnd = bound(&a, &b);
            for be in Backend::available() {
                let got = dot_f32_with(be, &a, &b);
                assert!(
                    (f64::from(got) - f64::from(want)).abs() <= bnd,
                    "{be:?} n={n}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn axpy4_every_backend() {
        let mut rng = Rng::new(9);
        for n in (0..40).chain([127, 576, 1000]) {
            let w: Vec<Vec<f32>> = (0..4)
                .map(|_| (0..n).map(|_| rng.f32()).collect())
                .collect();
            let y0: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
            let g = [rng.f32(), rng.f32(), 0.0, rng.f32()];
            let rows = [&w[0][..], &w[1][..], &w[2][..], &w[3][..]];
            for be in Backend::available() {
                let mut y = y0.clone();
                axpy4_with(be, g, rows, &mut y);
                for j in 0..n {
                    let terms = [
                        y0[j],
                        g[0] * w[0][j],
                        g[1] * w[1][j],
                        g[2] * w[2][j],
                        g[3] * w[3][j],
                    ];
                    let want: f64 = terms.iter().map(|&t| f64::from(t)).sum();
                    // Four roundings of the sum and one of each product, at most.
                    let mag: f64 = terms.iter().map(|&t| f64::from(t).abs()).sum();
                    assert!(
                        (f64::from(y[j]) - want).abs() <= 8.0 * f64::from(f32::EPSILON) * mag,
                        "{be:?} n={n} j={j}: {} vs {want}",
                        y[j]
                    );
                }
            }
        }
    }

    #[test]
    fn empty_and_public_wrappers() {
        let mut out = [1.0f32; 3];
        matvec(GgmlType::Q4_0, &[], 3, 0, &[], &mut out);
        assert_eq!(out, [0.0; 3]);
        let mut out = [1.0f32; 6];
        matmul(GgmlType::Q8_0, &[], 3, 0, &[], 2, &mut out);
        assert_eq!(out, [0.0; 6]);
        matmul(GgmlType::Q8_0, &[], 0, 32, &[0.5; 64], 2, &mut []);
        assert_eq!(dot_row(GgmlType::F32, &[], &[]), 0.0);
        let mut rng = Rng::new(11);
        let w = random_row(GgmlType::Q4_K, 256, &mut rng);
        let x: Vec<f32> = (0..256).map(|_| rng.f32()).collect();
        let mut y = vec![0.0; 256];
        dequantize_row(GgmlType::Q4_K, &w, &mut y);
        let bnd = bound(&y, &x);
        assert!(
            (f64::from(dot_row(GgmlType::Q4_K, &w, &x))
                - f64::from(dot_row_ref(GgmlType::Q4_K, &w, &x)))
            .abs()
                <= bnd
        );
        assert!(Backend::available().contains(&Backend::best()));
    }

    // --- Integer activations (matvec_q) ---

    /// Offsets of the f16 fields that multiply the codes (d) and of those that add an offset (m, dmin).
    fn mult_offset_fields(t: GgmlType) -> (&'static [usize], &'static [usize]) {
        match t {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => (&[0], &[]),
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => (&[0], &[2]),
            GgmlType::Q2_K => (&[80], &[82]),
            GgmlType::Q3_K => (&[108], &[]),
            GgmlType::Q6_K => (&[208], &[]),
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => (&[], &[]),
        }
    }

    /// A row's scaled part `d·q` and its offset part `m` per element: the reference dequantization with the
    /// offset fields, respectively the multiplier fields, set to zero (both exact: `d·q + 0`, `0·q + m`).
    fn split_row(t: GgmlType, row: &[u8], n: usize) -> (Vec<f32>, Vec<f32>) {
        let (mult, offs) = mult_offset_fields(t);
        let zeroed = |fields: &[usize]| {
            let mut r = row.to_vec();
            for b in r.chunks_exact_mut(t.block_bytes()) {
                for &f in fields {
                    b[f..f + 2].fill(0);
                }
            }
            dequant_ref(t, &r, n)
        };
        (zeroed(offs), zeroed(mult))
    }

    /// Activations whose 32-element blocks have very different magnitudes (10⁻³⁸ … 3·10⁴, a subnormal one,
    /// an all-zero one), with some zero elements.
    fn int_x(n: usize, rng: &mut Rng) -> Vec<f32> {
        const MAGS: [f32; 9] = [1.0, 1e3, 1e-3, 0.0, 1e-20, 3e4, 1e-38, 5.0, 1e-41];
        let first = rng.next() as usize;
        (0..n)
            .map(|i| {
                let mag = MAGS[(first + i / 32) % MAGS.len()];
                if rng.next().is_multiple_of(8) {
                    0.0
                } else {
                    rng.f32() * mag
                }
            })
            .collect()
    }

    /// The two bounds for one row (n elements, n_g ≤ n/16 scale groups, ε = f32::EPSILON):
    ///
    /// * `reorder` (a SIMD kernel vs [`dot_row_q_ref`]): the integer group sums are exact on both sides, so
    ///   they differ only by f32 rounding: lane partial sums rounded to f32, the products with `d·s_b`, the
    ///   additions across groups and lanes (≤ n_g + 8 roundings on a path), each relative to the magnitudes
    ///   `A = Σᵢ |d·q_w,i|·s_b·|q_x,i| + Σᵢ |m_i·x_i|`: `2·(n_g + 8)·ε·A`, plus `U = (n_g + 1)·2⁻¹¹⁸` for
    ///   products that fall into the subnormal range (absolute error ≤ 2⁻¹⁵⁰ each, times an integer sum
    ///   below 2²⁸).
    /// * `exact` ([`dot_row_q_ref`] vs the f64 dot of the dequantized row with the original x): the
    ///   quantization of x, `Σ_b (s_b/2)·Σ_{i∈b} |d·q_w,i|` (exact: `|x − q·s| ≤ s/2` and the offset term
    ///   uses the sums of the original x), plus f32 rounding `2·(n_g + 40)·ε·(A + Σᵢ|w_i·x_i|)` (the
    ///   reference's roundings, the sums of x, the dequantized `w = fl(d·q + m)`), plus `U`.
    fn int_bounds(t: GgmlType, row: &[u8], xq: &QuantizedActs) -> (f64, f64) {
        let n = xq.len();
        let x = xq.acts();
        let (p, m) = split_row(t, row, n);
        let wf = dequant_ref(t, row, n);
        let (mut a, mut quant, mut plain) = (0.0f64, 0.0f64, 0.0f64);
        for i in 0..n {
            let s = f64::from(xq.scales()[i / 32]);
            let pw = f64::from(p[i]).abs();
            a +=
                pw * s * f64::from(xq.codes()[i]).abs() + (f64::from(m[i]) * f64::from(x[i])).abs();
            quant += pw * s / 2.0;
            plain += (f64::from(wf[i]) * f64::from(x[i])).abs();
        }
        let eps = f64::from(f32::EPSILON);
        let ng = (n / 16) as f64;
        let u = (ng + 1.0) * 2f64.powi(-118);
        let reorder = 2.0 * (ng + 8.0) * eps * a + u;
        let exact = quant + 2.0 * (ng + 40.0) * eps * (a + plain) + u;
        (reorder, exact)
    }

    /// Test 3, the quantization of `x`: `|x − q·s| ≤ s/2` (checked exactly in f64: q·s is exact there, and
    /// rounding the difference cannot pass s/2, which is representable), `|q| ≤ 32767`, `s = 0` and `q = 0` for
    /// an all-zero block, `s` within rounding of `max/32767`, and the sums of the original x.
    fn check_quantized(x: &[f32], xq: &QuantizedActs) {
        assert_eq!(xq.len(), x.len());
        assert_eq!(xq.acts(), x);
        assert_eq!(xq.scales().len(), x.len() / 32);
        for (b, xb) in x.chunks_exact(32).enumerate() {
            let s = xq.scales()[b];
            let qb = &xq.codes()[32 * b..32 * b + 32];
            let max = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            if max == 0.0 {
                assert_eq!(s, 0.0, "block {b}: all zero, scale {s}");
                assert!(
                    qb.iter().all(|&q| q == 0),
                    "block {b}: all zero, codes {qb:?}"
                );
            } else {
                // max/32767 rounded to f32; a subnormal scale may be a step or two above.
                let (maxd, sd) = (f64::from(max), f64::from(s));
                assert!(
                    maxd / sd <= 32767.25 && sd <= maxd / 32767.0 * (1.0 + 1e-7) + 2f64.powi(-148),
                    "block {b}: scale {s:e} for max {max:e}"
                );
            }
            for (i, (&v, &q)) in xb.iter().zip(qb).enumerate() {
                assert!((-32767..=32767).contains(&q), "block {b}: code {q}");
                let err = (f64::from(v) - f64::from(q) * f64::from(s)).abs();
                assert!(
                    err <= f64::from(s) / 2.0,
                    "block {b} element {i}: x = {v:e}, q = {q}, s = {s:e}: error {err:e}"
                );
            }
            for h in 0..2 {
                let g = &xb[16 * h..16 * h + 16];
                let exact: f64 = g.iter().map(|&v| f64::from(v)).sum();
                let abs: f64 = g.iter().map(|&v| f64::from(v).abs()).sum();
                let got = f64::from(xq.sums16()[2 * b + h]);
                if abs > 1e38 {
                    continue; // the f32 sum may overflow, as any f32 sum of such values
                }
                assert!(
                    (got - exact).abs() <= 4.0 * f64::from(f32::EPSILON) * abs + 1e-45,
                    "block {b} half {h}: sum {got} vs {exact}"
                );
            }
            let s32 = xq.sums16()[2 * b] + xq.sums16()[2 * b + 1];
            assert_eq!(xq.sums32()[b].to_bits(), s32.to_bits());
        }
    }

    fn check_int(t: GgmlType) {
        assert!(supports_int_acts(t));
        let mut rng = Rng::new(u64::from(t.id()) + 101);
        let mut xq = QuantizedActs::new();
        let rows = 5;
        for nb in [1, 2, 3, 7, 9] {
            let n = nb * t.block_len();
            let rb = t.row_bytes(n).unwrap();
            let w: Vec<u8> = (0..rows).flat_map(|_| random_row(t, n, &mut rng)).collect();
            let x = int_x(n, &mut rng);
            xq.quantize(&x);
            check_quantized(&x, &xq);
            let outs: Vec<(Backend, Vec<f32>)> = Backend::available()
                .into_iter()
                .map(|b| {
                    let mut o = vec![f32::NAN; rows];
                    matvec_q_with(b, t, &w, rows, n, &xq, &mut o);
                    (b, o)
                })
                .collect();
            for r in 0..rows {
                let row = &w[r * rb..(r + 1) * rb];
                let want = dot_row_q_ref(t, row, &xq);
                let (reorder, vs_exact) = int_bounds(t, row, &xq);
                // 1. every backend against the reference; matvec_q's rows are dot_row_q's bit for bit.
                for (b, o) in &outs {
                    assert!(
                        (f64::from(o[r]) - f64::from(want)).abs() <= reorder,
                        "{t:?} {b:?} n={n} row {r}: {} vs ref {want} (bound {reorder:e})",
                        o[r]
                    );
                    let d = dot_row_q_with(*b, t, row, &xq);
                    assert_eq!(d.to_bits(), o[r].to_bits(), "{t:?} {b:?} n={n} row {r}");
                }
                // 2. the reference against the exact dot with the original x.
                let exact: f64 = dequant_ref(t, row, n)
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum();
                assert!(
                    (f64::from(want) - exact).abs() <= vs_exact,
                    "{t:?} n={n} row {r}: ref {want} vs exact {exact} (bound {vs_exact:e})"
                );
            }
        }
        // The integer reference's decoding reproduces the reference dequantization bit for bit.
        for _ in 0..20 {
            let b = random_row(t, t.block_len(), &mut rng);
            let y = dequant_ref(t, &b, t.block_len());
            let mut q = [0i32; 256];
            for (off, len, d, m) in ref_codes(t, &b, &mut q) {
                for e in off..off + len {
                    let v = d * q[e] as f32;
                    let v = if is_affine(t) { v + m } else { v };
                    assert_eq!(v.to_bits(), y[e].to_bits(), "{t:?} element {e}");
                }
            }
        }
    }

    macro_rules! int_tests {
        ($($name:ident => $t:expr),* $(,)?) => {
            $(
                #[test]
                fn $name() {
                    check_int($t);
                }
            )*
        };
    }

    int_tests!(
        int_q4_0 => GgmlType::Q4_0,
        int_q4_1 => GgmlType::Q4_1,
        int_q5_0 => GgmlType::Q5_0,
        int_q5_1 => GgmlType::Q5_1,
        int_q8_0 => GgmlType::Q8_0,
        int_q2_k => GgmlType::Q2_K,
        int_q3_k => GgmlType::Q3_K,
        int_q4_k => GgmlType::Q4_K,
        int_q5_k => GgmlType::Q5_K,
        int_q6_k => GgmlType::Q6_K,
    );

    /// Test 3, quantization on its own: extreme magnitudes (up to f32::MAX, subnormals down to the smallest), a
    /// lone non-zero element, all-zero blocks; buffers reused with shorter and longer inputs.
    #[test]
    fn quantize_acts() {
        let mut rng = Rng::new(21);
        let mut xq = QuantizedActs::new();
        assert!(xq.is_empty());
        let mags = [
            1.0,
            f32::MAX,
            3e38,
            1e-30,
            f32::MIN_POSITIVE,
            1e-39,
            1e-41,
            1e-44,
            f32::from_bits(1),
            0.0,
        ];
        for &mag in &mags {
            for n in [32, 96, 576, 1536] {
                let x: Vec<f32> = (0..n).map(|_| rng.f32() * mag).collect();
                xq.quantize(&x);
                check_quantized(&x, &xq);
            }
        }
        // Exact ties, a lone element, −max, the largest finite values.
        let mut x = vec![0.0f32; 128];
        x[0] = -2.0;
        x[1] = 1.0;
        x[2] = 2.0 * 0.5 / 32767.0;
        x[40] = 1e-3;
        x[70] = f32::MAX;
        x[71] = -f32::MAX;
        x[72] = f32::MAX / 3.0;
        xq.quantize(&x);
        check_quantized(&x, &xq);
        assert_eq!(xq.codes()[0], -32767);
        assert_eq!(xq.codes()[40], 32767);
        assert_eq!(xq.scales()[3], 0.0);
        xq.quantize(&[]);
        assert!(xq.is_empty() && xq.scales().is_empty());
        let mut out = [1.0f32; 2];
        matvec_q(GgmlType::Q8_0, &[], 2, 0, &xq, &mut out);
        assert_eq!(out, [0.0; 2]);
    }

    #[test]
    #[should_panic]
    fn quantize_length_panics() {
        QuantizedActs::new().quantize(&[0.0; 33]);
    }

    /// Plain-float rows take the f32 path with the copy of x.
    #[test]
    fn int_acts_float_fallback() {
        let mut rng = Rng::new(23);
        let x: Vec<f32> = (0..64).map(|_| rng.f32()).collect();
        let mut xq = QuantizedActs::new();
        xq.quantize(&x);
        for t in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
            assert!(!supports_int_acts(t));
            let w: Vec<u8> = (0..3).flat_map(|_| random_row(t, 64, &mut rng)).collect();
            let (mut a, mut b) = ([0.0f32; 3], [0.0f32; 3]);
            matvec(t, &w, 3, 64, &x, &mut a);
            matvec_q(t, &w, 3, 64, &xq, &mut b);
            assert_eq!(a, b);
            let rb = t.row_bytes(64).unwrap();
            assert_eq!(
                dot_row_q_ref(t, &w[..rb], &xq),
                dot_row_ref(t, &w[..rb], &x)
            );
        }
    }

    #[test]
    #[should_panic]
    fn length_mismatch_panics() {
        let mut y = [0.0f32; 32];
        dequantize_row(GgmlType::Q4_0, &[0u8; 17], &mut y);
    }
}
