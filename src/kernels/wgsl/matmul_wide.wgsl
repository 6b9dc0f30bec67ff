// matmul.wgsl's product with tiles four times larger, for the products large enough to fill a big GPU with them
// (kernels::gpu chooses: WIDE_MIN_TILES): same bindings, parameters, fusions and weights, so one bind group serves
// both. On an H200 it ran an F32 product of 16384 × 8192 by 256 tokens at 22.5 TFLOP/s against matmul.wgsl's 15.3,
// and SmolLM2's prefill (576-row products: 10 workgroups) at 573 tokens/s against matmul.wgsl's 902.
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

const BM: u32 = 128u; // rows per tile
const BN: u32 = 128u; // tokens per tile
const BK: u32 = 16u;  // columns per pass
// The tile kernels::gpu dispatches for (HOST_TILE, a const it puts before this source): a shader-creation
// error where they differ.
const_assert BM == HOST_TILE && BN == HOST_TILE;
// ws[k * 32 + r / 4][r % 4] = W[row0 + r][k0 + k]; xs[k * 32 + t / 4][t % 4] = X[tok0 + t][k0 + k].
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
    // The 64 sums in named vec4s (c<row block><token block><row>): an array indexed in loops was kept in memory
    // by the NVIDIA compiler (the kernel ran 7× slower on an H200).
    var c000 = vec4<f32>(0.0);
    var c001 = vec4<f32>(0.0);
    var c002 = vec4<f32>(0.0);
    var c003 = vec4<f32>(0.0);
    var c010 = vec4<f32>(0.0);
    var c011 = vec4<f32>(0.0);
    var c012 = vec4<f32>(0.0);
    var c013 = vec4<f32>(0.0);
    var c100 = vec4<f32>(0.0);
    var c101 = vec4<f32>(0.0);
    var c102 = vec4<f32>(0.0);
    var c103 = vec4<f32>(0.0);
    var c110 = vec4<f32>(0.0);
    var c111 = vec4<f32>(0.0);
    var c112 = vec4<f32>(0.0);
    var c113 = vec4<f32>(0.0);
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
                c000 = fma(vec4<f32>(a0.x), b0, c000);
                c001 = fma(vec4<f32>(a0.y), b0, c001);
                c002 = fma(vec4<f32>(a0.z), b0, c002);
                c003 = fma(vec4<f32>(a0.w), b0, c003);
                c010 = fma(vec4<f32>(a0.x), b1, c010);
                c011 = fma(vec4<f32>(a0.y), b1, c011);
                c012 = fma(vec4<f32>(a0.z), b1, c012);
                c013 = fma(vec4<f32>(a0.w), b1, c013);
                c100 = fma(vec4<f32>(a1.x), b0, c100);
                c101 = fma(vec4<f32>(a1.y), b0, c101);
                c102 = fma(vec4<f32>(a1.z), b0, c102);
                c103 = fma(vec4<f32>(a1.w), b0, c103);
                c110 = fma(vec4<f32>(a1.x), b1, c110);
                c111 = fma(vec4<f32>(a1.y), b1, c111);
                c112 = fma(vec4<f32>(a1.z), b1, c112);
                c113 = fma(vec4<f32>(a1.w), b1, c113);
            }
        }
        workgroupBarrier();
    }
    let r = row0 + ty * 4u;
    let t = tok0 + tx * 4u;
    store(r, t, c000);
    store(r + 1u, t, c001);
    store(r + 2u, t, c002);
    store(r + 3u, t, c003);
    store(r, t + 64u, c010);
    store(r + 1u, t + 64u, c011);
    store(r + 2u, t + 64u, c012);
    store(r + 3u, t + 64u, c013);
    store(r + 64u, t, c100);
    store(r + 65u, t, c101);
    store(r + 66u, t, c102);
    store(r + 67u, t, c103);
    store(r + 64u, t + 64u, c110);
    store(r + 65u, t + 64u, c111);
    store(r + 66u, t + 64u, c112);
    store(r + 67u, t + 64u, c113);
}
