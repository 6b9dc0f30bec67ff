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
    w_off: u32,      // byte offset of the chunk's row 0 in W (a view of some rows of a larger matrix)
}

override TY: u32 = 0u;
const TT: u32 = 8u;

@group(0) @binding(0) var<storage, read> W: array<u32>;
@group(0) @binding(1) var<storage, read> DY: array<f32>;
@group(0) @binding(2) var<storage, read_write> DX: array<f32>;
@group(0) @binding(3) var<uniform> P: Params;

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
        let w = weight_at(P.w_off + r * P.row_bytes, c);
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
