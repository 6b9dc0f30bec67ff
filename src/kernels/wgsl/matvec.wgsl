// y[t][r] (+)= scale · (W[r] · x[t]) (+ bias[r]) for a quantized or float weight matrix W, dequantized inside the
// shader. Work is split in 4-element slots (a quarter of a packed word's worth: columns 4s .. 4s + 3, fewer at
// the end of a float row). Each element's weight is computed with the same operations, in the same association,
// as the scalar reference (quant::dequantize_row_ref), so weights are bit-identical; only the order of the sum
// differs.
//
// A workgroup of 64 invocations handles 4 rows (16 lanes per row) for TT tokens (a register tile: each weight
// is decoded once and used for all TT tokens, which is what makes prefill cheaper than TT separate products);
// lanes take slots round-robin and lane 0 adds up the row's 16 sums from workgroup memory. Workgroups are laid
// out in x and y (more than 65,535 row groups) and z is the tile of tokens; STEP.n bounds the tokens. Each
// token's sum runs in the same order whatever TT is, so the decoding (TT = 1) and prefill (TT = 8) pipelines
// give identical bits.
//
// Three fusions save the decoder a launch each (products.wgsl declares them): NORM = 1 normalizes the input on the
// way in (each workgroup computes its tokens' mean square); NORM = 2 (TT = 1: decoding's attention output
// projection) reads attention's output as the position chunks attention.wgsl left it, adding them up on the way
// in as attention_combine.wgsl would (matvec_combine.wgsl); and P.glu = 1 applies SwiGLU to the result on the way
// out (y = silu(GATE[o]) · y, GATE laid out as Y: the up projection finishing g = silu(gate) · up once per
// element). P.glu = 2 fuses the gate and up projections into one launch: W holds 2 · P.rows rows (the gate's,
// then the up projection's), and output row r is silu(W[r] · x) · (W[r + P.rows] · x): the workgroup's rows
// take their gate sums first (kept in gate[]), then their up sums, each in the order of a product of its own
// (same lanes, same slots), so the bits are those of the two launches it replaces. Steps of up to TT tokens
// only: the host runs longer ones (matmul.wgsl) as two products.

override TT: u32 = 1u;
const TMAX: u32 = 8u;

const LANES: u32 = 16u;
const RPW: u32 = 4u;
var<workgroup> part: array<f32, 512>; // TMAX × 64 (more made the GPU's L1 smaller: slower products on an H200)
var<private> acc: array<f32, 8>;
var<private> xo: array<u32, 8>;
var<private> nt: u32;
var<private> cu: u32;            // the unit's first column
var<private> inv: array<f32, 8>; // RMSNorm: 1 / sqrt(mean(x²) + eps) of the tile's tokens (where lane = 0)
var<private> gate: array<f32, 8>; // P.glu = 2: the row's gate sums, finished (where lane = 0)

// The gate of token t's output o (P.glu = 1: GATE[o], the gate product's output; 2: the pair's own sum).
fn gate_of(t: u32, o: u32) -> f32 {
    if (P.glu == 1u) {
        return GATE[o];
    }
    return gate[t];
}

// Row `row`'s finished sum v of token t (and the pass h of halves): stored at Y[o], or, the gate pass of a row
// pair, kept in gate[t].
fn emit(v: f32, row: u32, t: u32, tok0: u32, h: u32, halves: u32) {
    if (h + 1u < halves) {
        gate[t] = v * P.scale;
        return;
    }
    let o = P.out_off + (tok0 + t) * P.out_stride + row;
    Y[o] = finish_with(v, row, o, gate_of(t, o));
}

// input() (the transform on the way in) comes from matvec_input.wgsl, or for NORM = 2 from matvec_combine.wgsl,
// before this source: see there.


// acc[t] += w · x_t[j] for the tile's tokens. Every loop over the tile's tokens runs to the constant TT (the
// pipeline's override) and tests t < nt inside: with constant bounds the compiler can unroll them and keep acc,
// xo and inv in registers (a loop to nt indexes them at run time, which puts them in memory on some GPUs). One
// token (decoding) without the loop: the same operation, and SwiftShader (Chromium's software WebGPU) took 63 ms
// for a 1536 × 576 Q4_1 product with it against 45 without (it keeps the loop and indexes the arrays in memory).
fn put(j: u32, w: f32) {
    if (TT == 1u) {
        if (nt == 1u) {
            acc[0] += w * input(xo[0] + j, cu + j);
        }
        return;
    }
    for (var t = 0u; t < TT; t++) {
        if (t < nt) {
            acc[t] += w * input(xo[t] + j, cu + j);
        }
    }
}

// Slot s of row r (its columns 4s .. 4s + 3: quarter q = s % 8 of the 32-element unit u = s / 8) dotted with
// the tile's inputs (xo[t] = the slot's first input of token t), into acc[t]. A row's slots go round-robin over
// its lanes, so neighbouring lanes read neighbouring inputs and neighbouring words of a block (a lane per whole
// unit had a warp's input loads touch 32 cache lines each). In the 32-element formats element j < 16 is the low
// nibble of packed byte j and j ≥ 16 the high nibble of byte j − 16, so a quarter is one packed word.
fn slot_dot(r: u32, s: u32) {
    let rb = P.w_off + r * P.row_bytes;
    let u = s / 8u;
    let q = s % 8u;
    let c0 = 4u * s;
    switch TY {
        case 0u: { // F32
            let n = min(4u, P.cols - c0);
            let w0 = (rb >> 2u) + c0;
            for (var e = 0u; e < n; e++) { put(e, bitcast<f32>(W[w0 + e])); }
        }
        case 1u: { // F16
            let n = min(4u, P.cols - c0);
            for (var e = 0u; e < n; e++) { put(e, f16_at(rb + (c0 + e) * 2u)); }
        }
        case 30u: { // BF16
            let n = min(4u, P.cols - c0);
            for (var e = 0u; e < n; e++) { put(e, bitcast<f32>(u16_at(rb + (c0 + e) * 2u) << 16u)); }
        }
        case 2u: { // Q4_0: d f16 | qs[16]
            let b = rb + u * 18u;
            let d = f16_at(b);
            let w = word_at(b + 2u + 4u * (q % 4u));
            let sh = select(4u, 0u, q < 4u);
            for (var k = 0u; k < 4u; k++) { put(k, d * f32(i32((w >> (8u * k + sh)) & 15u) - 8)); }
        }
        case 3u: { // Q4_1: d f16 | m f16 | qs[16]
            let b = rb + u * 20u;
            let dm = unpack2x16float(word_at(b));
            let w = word_at(b + 4u + 4u * (q % 4u));
            let sh = select(4u, 0u, q < 4u);
            for (var k = 0u; k < 4u; k++) { put(k, (dm.x * f32((w >> (8u * k + sh)) & 15u) + dm.y)); }
        }
        case 6u: { // Q5_0: d f16 | qh u32 | qs[16]; element j's fifth bit is bit j of qh
            let b = rb + u * 22u;
            let d = f16_at(b);
            let qh = word_at(b + 2u);
            let w = word_at(b + 6u + 4u * (q % 4u));
            let sh = select(4u, 0u, q < 4u);
            for (var k = 0u; k < 4u; k++) {
                let x = ((w >> (8u * k + sh)) & 15u) | (((qh >> (4u * q + k)) & 1u) << 4u);
                put(k, d * f32(i32(x) - 16));
            }
        }
        case 7u: { // Q5_1: d f16 | m f16 | qh u32 | qs[16]
            let b = rb + u * 24u;
            let d = f16_at(b);
            let m = f16_at(b + 2u);
            let qh = word_at(b + 4u);
            let w = word_at(b + 8u + 4u * (q % 4u));
            let sh = select(4u, 0u, q < 4u);
            for (var k = 0u; k < 4u; k++) {
                let x = ((w >> (8u * k + sh)) & 15u) | (((qh >> (4u * q + k)) & 1u) << 4u);
                put(k, (d * f32(x) + m));
            }
        }
        case 8u: { // Q8_0: d f16 | qs i8[32]
            let b = rb + u * 34u;
            let d = f16_at(b);
            let w = word_at(b + 2u + 4u * q);
            for (var k = 0u; k < 4u; k++) { put(k, d * i8_of((w >> (8u * k)) & 0xffu)); }
        }
        case 12u: { // Q4_K: d f16 | dmin f16 | scales[12] | qs[128]; unit = sub-block sb of super-block u / 8
            let sb = u % 8u;
            let b = rb + (u / 8u) * 144u;
            let sm = scale_min_k4(sb, b + 4u);
            let d1 = f16_at(b) * f32(sm.x);
            let m1 = f16_at(b + 2u) * f32(sm.y);
            let w = word_at(b + 16u + 32u * (sb / 2u) + 4u * q);
            let shift = (sb % 2u) * 4u;
            for (var k = 0u; k < 4u; k++) { put(k, (d1 * f32((w >> (8u * k + shift)) & 15u) - m1)); }
        }
        case 13u: { // Q5_K: d f16 | dmin f16 | scales[12] | qh[32] | qs[128]
            let sb = u % 8u;
            let b = rb + (u / 8u) * 176u;
            let sm = scale_min_k4(sb, b + 4u);
            let d1 = f16_at(b) * f32(sm.x);
            let m1 = f16_at(b + 2u) * f32(sm.y);
            let w = word_at(b + 48u + 32u * (sb / 2u) + 4u * q);
            let hw = word_at(b + 16u + 4u * q);
            let shift = (sb % 2u) * 4u;
            for (var k = 0u; k < 4u; k++) {
                let x = ((w >> (8u * k + shift)) & 15u) | (((hw >> (8u * k + sb)) & 1u) << 4u);
                put(k, (d1 * f32(x) - m1));
            }
        }
        case 14u: { // Q6_K: ql[128] | qh[64] | scales i8[16] | d f16
            let sb = u % 8u;
            let b = rb + (u / 8u) * 210u;
            let d = f16_at(b + 208u);
            let n = sb / 4u;
            let g = sb % 4u;
            let shift = select(4u, 0u, g < 2u);
            let lw = word_at(b + 64u * n + 32u * (g % 2u) + 4u * q);
            let hw = word_at(b + 128u + 32u * n + 4u * q);
            let sc = i8_of(byte_at(b + 192u + 8u * n + (g * 32u + 4u * q) / 16u));
            for (var k = 0u; k < 4u; k++) {
                let low = (lw >> (8u * k + shift)) & 15u;
                let high = (hw >> (8u * k + 2u * g)) & 3u;
                put(k, (d * sc) * f32(i32(low | (high << 4u)) - 32));
            }
        }
        default: {}
    }
}

// The slot s's inputs and columns set, then its products added into acc[].
fn slot(row: u32, s: u32, tok0: u32) {
    for (var t = 0u; t < TT; t++) { xo[t] = P.in_off + (tok0 + t) * P.in_stride + s * 4u; }
    cu = s * 4u;
    slot_dot(row, s);
}

// The invocation's share of token t's sum of squares: columns li, li + stride, … (0 past the tile's tokens).
fn squares(li: u32, stride: u32, tok0: u32, t: u32) -> f32 {
    var s = 0.0;
    if (t < nt) {
        let x0 = P.in_off + (tok0 + t) * P.in_stride;
        for (var i = li; i < P.cols; i += stride) { s += X[x0 + i] * X[x0 + i]; }
    }
    return s;
}

// RMSNorm's 1 / rms of the tile's tokens into inv[] from the first n partial sums of each in part[] (token t's
// at t · 64), added in order.
fn inv_from_parts(n: u32) {
    for (var t = 0u; t < TT; t++) {
        if (t < nt) {
            var s = 0.0;
            for (var k = 0u; k < n; k++) { s += part[t * 64u + k]; }
            inv[t] = 1.0 / sqrt(s / f32(P.cols) + P.eps);
        }
    }
}

// RMSNorm's 1 / rms of the tile's tokens into inv[], where `keep` (the invocations that store results): the
// workgroup's 64 partial sums of squares in part[], then each keeping invocation adds them up itself (in the same
// order, so all agree): two barriers whatever TT is. Called from uniform control flow.
fn mean_squares(li: u32, tok0: u32, keep: bool) {
    for (var t = 0u; t < TT; t++) { part[t * 64u + li] = squares(li, 64u, tok0, t); }
    workgroupBarrier();
    if (keep) {
        inv_from_parts(64u);
    }
    workgroupBarrier(); // part[] is the sums' scratch next
}

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row = (wg.x + wg.y * nwg.x) * RPW + li / LANES;
    let lane = li % LANES;
    let tok0 = wg.z * TT;
    nt = min(TT, STEP.n - min(STEP.n, tok0));
    if (NORM == 1u) {
        mean_squares(li, tok0, lane == 0u);
    }
    if (NORM == 2u) {
        combine_factors(li, 64u);
    }
    let halves = select(1u, 2u, P.glu == 2u);
    for (var h = 0u; h < halves; h++) {
        for (var t = 0u; t < TT; t++) { acc[t] = 0.0; }
        if (row < P.rows) {
            let slots = (P.cols + 3u) / 4u;
            for (var u = lane; u < slots; u += LANES) { slot(row + h * P.rows, u, tok0); }
        }
        // The row's 16 lanes' sums, added in lane order by lane 0 (one barrier; a tree would take four).
        for (var t = 0u; t < TT; t++) { part[t * 64u + li] = acc[t]; }
        workgroupBarrier();
        if (lane == 0u && row < P.rows) {
            for (var t = 0u; t < TT; t++) {
                if (t >= nt) {
                    break;
                }
                var v = 0.0;
                for (var k = 0u; k < LANES; k++) { v += part[t * 64u + li + k]; }
                if (NORM == 1u) {
                    v *= inv[t];
                }
                emit(v, row, t, tok0, h, halves);
            }
        }
        if (h + 1u < halves) {
            workgroupBarrier(); // the up pass writes part[] again
        }
    }
}
