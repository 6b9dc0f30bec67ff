// Reading GGUF weight bytes out of the u32 storage array `W` (declared, with the override constant TY, by the
// kernel this prefix is joined to: matvec.wgsl, matvec_t.wgsl, matmul.wgsl): bytes, little-endian u16/u32, f16
// scales, signed bytes, the K formats' packed 6-bit scales and mins, and one element of a row.

fn byte_at(off: u32) -> u32 {
    return (W[off >> 2u] >> ((off & 3u) * 8u)) & 0xffu;
}
fn u16_at(off: u32) -> u32 {
    return byte_at(off) | (byte_at(off + 1u) << 8u);
}
fn f16_at(off: u32) -> f32 {
    return unpack2x16float(u16_at(off)).x;
}
fn i8_of(b: u32) -> f32 {
    return f32((i32(b) << 24u) >> 24u);
}
fn u32_at(off: u32) -> u32 {
    return u16_at(off) | (u16_at(off + 2u) << 16u);
}
// The four bytes at off as a little-endian u32, without a branch (a lane's loads of several slots can then be
// in flight together): the products' inner loops read their packed bytes a word at a time with it. Where the
// type's blocks are whole words (Q4_1 20 bytes, Q5_1 24, Q4_K 144, Q5_K 176: rows and blocks start on words,
// since every row and view starts at a multiple of the row's bytes) one load; otherwise two, the second shifted
// in (by 32 − s as two shifts, so that s = 0 adds nothing).
fn word_at(off: u32) -> u32 {
    let lo = W[off >> 2u];
    if (TY == 3u || TY == 7u || TY == 12u || TY == 13u) {
        return lo;
    }
    let s = (off & 3u) * 8u;
    return (lo >> s) | ((W[(off >> 2u) + 1u] << 1u) << (31u - s));
}
// Q4_K / Q5_K: scale and min (6 bits each) of sub-block j from the 12 packed bytes at sc.
fn scale_min_k4(j: u32, sc: u32) -> vec2<u32> {
    if (j < 4u) {
        return vec2<u32>(byte_at(sc + j) & 63u, byte_at(sc + j + 4u) & 63u);
    }
    let s = (byte_at(sc + j + 4u) & 15u) | ((byte_at(sc + j - 4u) >> 6u) << 4u);
    let m = (byte_at(sc + j + 4u) >> 4u) | ((byte_at(sc + j) >> 6u) << 4u);
    return vec2<u32>(s, m);
}

// Element c of the row whose bytes start at rb, decoded as dequantize_row_ref decodes it (matvec_t.wgsl and
// matmul.wgsl; the override constant TY is the row's GGML type).
fn weight_at(rb: u32, c: u32) -> f32 {
    let j = c % 32u;   // place in a 32-element block (or in a K format's 32-element sub-block)
    let h = j % 16u;   // byte of the block's 16 packed nibble pairs
    let u = c / 32u;   // block (32-element formats) or sub-block (K formats)
    switch TY {
        case 0u: { return bitcast<f32>(W[(rb >> 2u) + c]); } // F32
        case 1u: { return f16_at(rb + c * 2u); }             // F16
        case 30u: { return bitcast<f32>(u16_at(rb + c * 2u) << 16u); } // BF16
        case 2u: { // Q4_0: d f16 | qs[16]
            let b = rb + u * 18u;
            let v = byte_at(b + 2u + h);
            let q = select(v >> 4u, v & 15u, j < 16u);
            return f16_at(b) * f32(i32(q) - 8);
        }
        case 3u: { // Q4_1: d f16 | m f16 | qs[16]
            let b = rb + u * 20u;
            let v = byte_at(b + 4u + h);
            let q = select(v >> 4u, v & 15u, j < 16u);
            return (f16_at(b) * f32(q) + f16_at(b + 2u));
        }
        case 6u: { // Q5_0: d f16 | qh u32 | qs[16]; the fifth bit of element j is bit j of qh
            let b = rb + u * 22u;
            let v = byte_at(b + 6u + h);
            let q = select(v >> 4u, v & 15u, j < 16u) | (((u32_at(b + 2u) >> j) & 1u) << 4u);
            return f16_at(b) * f32(i32(q) - 16);
        }
        case 7u: { // Q5_1: d f16 | m f16 | qh u32 | qs[16]
            let b = rb + u * 24u;
            let v = byte_at(b + 8u + h);
            let q = select(v >> 4u, v & 15u, j < 16u) | (((u32_at(b + 4u) >> j) & 1u) << 4u);
            return (f16_at(b) * f32(q) + f16_at(b + 2u));
        }
        case 8u: { // Q8_0: d f16 | qs i8[32]
            let b = rb + u * 34u;
            return f16_at(b) * i8_of(byte_at(b + 2u + j));
        }
        case 12u: { // Q4_K: d f16 | dmin f16 | scales[12] | qs[128]; sub-block s of super-block u / 8
            let s = u % 8u;
            let b = rb + (u / 8u) * 144u;
            let sm = scale_min_k4(s, b + 4u);
            let d1 = f16_at(b) * f32(sm.x);
            let m1 = f16_at(b + 2u) * f32(sm.y);
            let q = (byte_at(b + 16u + 32u * (s / 2u) + j) >> ((s % 2u) * 4u)) & 15u;
            return (d1 * f32(q) - m1);
        }
        case 13u: { // Q5_K: d f16 | dmin f16 | scales[12] | qh[32] | qs[128]
            let s = u % 8u;
            let b = rb + (u / 8u) * 176u;
            let sm = scale_min_k4(s, b + 4u);
            let d1 = f16_at(b) * f32(sm.x);
            let m1 = f16_at(b + 2u) * f32(sm.y);
            let q = ((byte_at(b + 48u + 32u * (s / 2u) + j) >> ((s % 2u) * 4u)) & 15u)
                | (((byte_at(b + 16u + j) >> s) & 1u) << 4u);
            return (d1 * f32(q) - m1);
        }
        case 14u: { // Q6_K: ql[128] | qh[64] | scales i8[16] | d f16
            let s = u % 8u;
            let b = rb + (u / 8u) * 210u;
            let d = f16_at(b + 208u);
            let n = s / 4u;
            let g = s % 4u;
            let shift = select(4u, 0u, g < 2u);
            let low = (byte_at(b + 64u * n + 32u * (g % 2u) + j) >> shift) & 15u;
            let high = (byte_at(b + 128u + 32u * n + j) >> (2u * g)) & 3u;
            let q = i32(low | (high << 4u)) - 32;
            let sc = i8_of(byte_at(b + 192u + 8u * n + (g * 32u + j) / 16u));
            return (d * sc) * f32(q);
        }
        default: { return 0.0; }
    }
}
