// dx[t][c] (+)= Σ_r dy[t][r] · W[r][c]: the product with the transposed weight matrix, which training's backward
// pass needs for every frozen projection (the gradient of the input from the gradient of the output). W is one
// row chunk of a quantized or float matrix (rows [r0, r0 + P.rows) of the whole); each weight is decoded with the
// same operations, in the same association, as the scalar reference (quant::dequantize_row_ref) and matvec.wgsl,
// so the weights are bit-identical and only the order of the sum differs.
//
// An invocation owns one column c for a tile of TT tokens: it walks the chunk's rows, decodes W[r][c] once and
// multiplies it into the TT tokens' sums (dy[t][r] is the same address for the whole workgroup: a broadcast).
// The 64 invocations of a workgroup take 64 neighbouring columns, so they read the same blocks. x: column groups,
// y: token tiles. Each sum runs over r in order, so the result does not depend on the tiling.

struct Params {
    rows: u32,       // rows of this chunk
    cols: u32,
    row_bytes: u32,
    n: u32,          // tokens
    r0: u32,         // the chunk's first row: dy's column of row 0
    dy_stride: u32,  // elements between tokens in DY (the whole matrix's rows)
    accumulate: u32, // 1: add to what DX holds (the second and later chunks or matrices)
    dy_off: u32,     // offset of this matrix's dy[0][0] in DY (several matrices' gradients in one buffer)
}

override TY: u32 = 0u;
const TT: u32 = 8u;

@group(0) @binding(0) var<storage, read> W: array<u32>;
@group(0) @binding(1) var<storage, read> DY: array<f32>;
@group(0) @binding(2) var<storage, read_write> DX: array<f32>;
@group(0) @binding(3) var<uniform> P: Params;

// W[r][c], decoded as dequantize_row_ref decodes it.
fn weight(r: u32, c: u32) -> f32 {
    let rb = r * P.row_bytes;
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

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let c = wg.x * 64u + li;
    let t0 = wg.y * TT;
    let nt = min(TT, P.n - min(P.n, t0));
    if (c >= P.cols) {
        return;
    }
    var acc: array<f32, 8>;
    for (var r = 0u; r < P.rows; r++) {
        let w = weight(r, c);
        let dy0 = P.dy_off + t0 * P.dy_stride + P.r0 + r;
        for (var t = 0u; t < nt; t++) {
            acc[t] += w * DY[dy0 + t * P.dy_stride];
        }
    }
    for (var t = 0u; t < nt; t++) {
        let o = (t0 + t) * P.cols + c;
        if (P.accumulate != 0u) {
            DX[o] += acc[t];
        } else {
            DX[o] = acc[t];
        }
    }
}
