// Y[t][r] (+)= scale · (W[r] · X[t]) (+ bias[r]) for a step of many tokens (prefill): the matrix-matrix product,
// with the same bindings and parameters as matvec.wgsl, so one bind group serves both.
//
// A workgroup of 256 invocations computes a tile of 64 rows × 64 tokens. The shared dimension is walked 32 columns
// at a time: the workgroup decodes the tile's 64 × 32 weights (each element with weight_at, the reference's
// operations in the reference's association, so the weights are bit-identical to quant::dequantize_row_ref) and
// copies the 64 tokens' 32 inputs into workgroup memory, then each invocation multiplies a 4-row × 4-token block
// out of it, in registers (16 sums, two vec4 reads per 16 multiply-adds). Each weight is decoded once per 64
// tokens. Workgroup memory: two 8 KiB tiles, exactly WebGPU's default 16 KiB limit.
//
// Each sum runs over the columns in order (one fma each), so it is a different order from matvec.wgsl's; the
// results agree within the usual bound for two orders of an f32 sum, not bit for bit.
//
// The fusions are matvec.wgsl's (products.wgsl declares the parameters and bindings both share): RMSNorm (NORM =
// 1, the norm weights in AUX) as the tokens' inputs are copied into the tile, SwiGLU (P.glu = 1, the gate in
// GATE) as the results are stored.

const BM: u32 = 64u; // rows per tile
const BN: u32 = 64u; // tokens per tile
const BK: u32 = 32u; // columns per pass
// The tile kernels::gpu dispatches for (HOST_TILE, a const it puts before this source): a shader-creation
// error where they differ.
const_assert BM == HOST_TILE && BN == HOST_TILE;
// ws[k * 16 + r / 4][r % 4] = W[row0 + r][k0 + k]; xs[k * 16 + t / 4][t % 4] = X[tok0 + t][k0 + k].
var<workgroup> ws: array<vec4<f32>, 512>;
var<workgroup> xs: array<vec4<f32>, 512>;

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row0 = (wg.x + wg.y * nwg.x) * BM;
    let tok0 = wg.z * BN;
    // Loading: invocation li fills 8 neighbouring columns (part lp) of tile row / token lr.
    let lr = li / 4u;
    let lp = li % 4u;
    let w_row = row0 + lr;
    let rb = P.w_off + w_row * P.row_bytes;
    let x_tok = tok0 + lr;
    let xb = P.in_off + x_tok * P.in_stride;
    let w_ok = w_row < P.rows;
    let x_ok = x_tok < STEP.n;
    // RMSNorm: token lr's mean square, from its four loaders' partial sums (xs as scratch).
    var inv = 1.0;
    if (NORM == 1u) {
        var s = 0.0;
        if (x_ok) {
            for (var i = lp; i < P.cols; i += 4u) { s += X[xb + i] * X[xb + i]; }
        }
        xs[lr][lp] = s;
        workgroupBarrier();
        let q = xs[lr];
        inv = 1.0 / sqrt(((q.x + q.y) + (q.z + q.w)) / f32(P.cols) + P.eps);
        workgroupBarrier();
    }
    // Computing: rows 4·ty .. 4·ty + 3 of the tile, tokens 4·tx .. 4·tx + 3.
    let tx = li % 16u;
    let ty = li / 16u;
    // A block with no row or no token in range (the last tiles of a short step or a partial row tile) loads its
    // share but multiplies nothing: on a GPU whole warps skip, on a CPU adapter every such block saves its work.
    let live = row0 + ty * 4u < P.rows && tok0 + tx * 4u < STEP.n;
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < P.cols; k0 += BK) {
        for (var e = 0u; e < 8u; e++) {
            let k = lp * 8u + e;
            let c = k0 + k;
            var w = 0.0;
            var x = 0.0;
            if (c < P.cols) {
                if (w_ok) {
                    w = weight_at(rb, c);
                }
                if (x_ok) {
                    x = X[xb + c];
                    if (NORM == 1u) {
                        x = x * inv * AUX[c];
                    }
                }
            }
            ws[k * 16u + lr / 4u][lr % 4u] = w;
            xs[k * 16u + lr / 4u][lr % 4u] = x;
        }
        workgroupBarrier();
        if (live) {
            for (var k = 0u; k < BK; k++) {
                let a = ws[k * 16u + ty];
                let b = xs[k * 16u + tx];
                a0 = fma(vec4<f32>(a.x), b, a0);
                a1 = fma(vec4<f32>(a.y), b, a1);
                a2 = fma(vec4<f32>(a.z), b, a2);
                a3 = fma(vec4<f32>(a.w), b, a3);
            }
        }
        workgroupBarrier();
    }
    let r = row0 + ty * 4u;
    let t = tok0 + tx * 4u;
    store(r, t, a0);
    store(r + 1u, t, a1);
    store(r + 2u, t, a2);
    store(r + 3u, t, a3);
}
