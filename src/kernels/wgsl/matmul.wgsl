// Y[t][r] (+)= scale · (W[r] · X[t]) (+ bias[r]) for a step of many tokens (prefill): the matrix-matrix product,
// with the same bindings and parameters as matvec.wgsl, so one bind group serves both.
//
// A workgroup of 256 invocations computes a tile of 128 rows × 128 tokens. The shared dimension is walked 16
// columns at a time: the workgroup decodes the tile's 128 × 16 weights (each element with weight_at, the
// reference's operations in the reference's association, so the weights are bit-identical to
// quant::dequantize_row_ref) and copies the 128 tokens' 16 inputs into workgroup memory, then each invocation
// multiplies an 8-row × 8-token block out of it, in registers (64 sums, four vec4 reads per 64 multiply-adds: rows
// 4·ty .. 4·ty + 3 and 64 + 4·ty .., tokens likewise with tx, so a warp's reads are neighbouring vec4s). Each
// weight is decoded once per 128 tokens. Workgroup memory: two 8 KiB tiles, exactly WebGPU's default 16 KiB
// limit.
//
// Each sum runs over the columns in order (one fma each), so it is a different order from matvec.wgsl's; the
// results agree within the usual bound for two orders of an f32 sum, not bit for bit.
//
// The fusions are matvec.wgsl's (products.wgsl declares the parameters and bindings both share): RMSNorm (NORM =
// 1, the norm weights in AUX) as the tokens' inputs are copied into the tile, SwiGLU (P.glu = 1, the gate in
// GATE) as the results are stored.

const BM: u32 = 128u; // rows per tile (kernels::gpu::GEMM_TILE)
const BN: u32 = 128u; // tokens per tile
const BK: u32 = 16u;  // columns per pass
// ws[k * 32 + r / 4][r % 4] = W[row0 + r][k0 + k]; xs[k * 32 + t / 4][t % 4] = X[tok0 + t][k0 + k].
var<workgroup> ws: array<vec4<f32>, 512>;
var<workgroup> xs: array<vec4<f32>, 512>;

fn store(r: u32, t0: u32, v: vec4<f32>) {
    if (r >= P.rows) {
        return;
    }
    for (var c = 0u; c < 4u; c++) {
        let t = t0 + c;
        if (t < STEP.n) {
            let o = P.out_off + t * P.out_stride + r;
            Y[o] = finish(v[c], r, o);
        }
    }
}

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row0 = (wg.x + wg.y * nwg.x) * BM;
    let tok0 = wg.z * BN;
    // Loading: invocation li fills 8 neighbouring columns (half lp) of tile row / token lr.
    let lr = li / 2u;
    let lp = li % 2u;
    let w_row = row0 + lr;
    let rb = P.w_off + w_row * P.row_bytes;
    let x_tok = tok0 + lr;
    let xb = P.in_off + x_tok * P.in_stride;
    let w_ok = w_row < P.rows;
    let x_ok = x_tok < STEP.n;
    // RMSNorm: token lr's mean square, from its two loaders' partial sums (xs as scratch).
    var inv = 1.0;
    if (NORM == 1u) {
        var s = 0.0;
        if (x_ok) {
            for (var i = lp; i < P.cols; i += 2u) { s += X[xb + i] * X[xb + i]; }
        }
        xs[lr][lp] = s;
        workgroupBarrier();
        let q = xs[lr];
        inv = 1.0 / sqrt((q.x + q.y) / f32(P.cols) + P.eps);
        workgroupBarrier();
    }
    // Computing: rows 4·ty .. 4·ty + 3 and 64 + 4·ty .. of the tile, tokens 4·tx .. and 64 + 4·tx ...
    let tx = li % 16u;
    let ty = li / 16u;
    // A block with no row or no token in range (the last tiles of a short step or a partial row tile) loads its
    // share but multiplies nothing: on a GPU whole warps skip, on a CPU adapter every such block saves its work.
    let live = row0 + ty * 4u < P.rows && tok0 + tx * 4u < STEP.n;
    var acc: array<vec4<f32>, 16>;
    for (var i = 0u; i < 16u; i++) { acc[i] = vec4<f32>(0.0); }
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
            ws[k * 32u + lr / 4u][lr % 4u] = w;
            xs[k * 32u + lr / 4u][lr % 4u] = x;
        }
        workgroupBarrier();
        if (live) {
            for (var k = 0u; k < BK; k++) {
                let a0 = ws[k * 32u + ty];
                let a1 = ws[k * 32u + 16u + ty];
                let b0 = xs[k * 32u + tx];
                let b1 = xs[k * 32u + 16u + tx];
                acc[0] = fma(vec4<f32>(a0.x), b0, acc[0]);
                acc[1] = fma(vec4<f32>(a0.y), b0, acc[1]);
                acc[2] = fma(vec4<f32>(a0.z), b0, acc[2]);
                acc[3] = fma(vec4<f32>(a0.w), b0, acc[3]);
                acc[4] = fma(vec4<f32>(a0.x), b1, acc[4]);
                acc[5] = fma(vec4<f32>(a0.y), b1, acc[5]);
                acc[6] = fma(vec4<f32>(a0.z), b1, acc[6]);
                acc[7] = fma(vec4<f32>(a0.w), b1, acc[7]);
                acc[8] = fma(vec4<f32>(a1.x), b0, acc[8]);
                acc[9] = fma(vec4<f32>(a1.y), b0, acc[9]);
                acc[10] = fma(vec4<f32>(a1.z), b0, acc[10]);
                acc[11] = fma(vec4<f32>(a1.w), b0, acc[11]);
                acc[12] = fma(vec4<f32>(a1.x), b1, acc[12]);
                acc[13] = fma(vec4<f32>(a1.y), b1, acc[13]);
                acc[14] = fma(vec4<f32>(a1.z), b1, acc[14]);
                acc[15] = fma(vec4<f32>(a1.w), b1, acc[15]);
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let r = row0 + ty * 4u + i;
        let t = tok0 + tx * 4u;
        store(r, t, acc[i]);
        store(r, t + 64u, acc[4u + i]);
        store(r + 64u, t, acc[8u + i]);
        store(r + 64u, t + 64u, acc[12u + i]);
    }
}
