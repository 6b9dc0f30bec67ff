// Greedy decoding's next input on the GPU: X[c] = row t of the token-embedding matrix, decoded as the CPU
// decodes it (dequant.wgsl's weight_at: the operations of quant::dequantize_row_ref, the same bits), where t =
// TOK[STEP.pos0] is the token at the step's position (written by the previous step's argmax.wgsl, or by the
// host for the first). W is one row chunk of the matrix (rows [r0, r0 + rows)); a matrix in several chunks is
// one launch per chunk, and only the chunk holding t writes. One invocation per column.
struct Params {
    rows: u32,      // rows of this chunk
    cols: u32,
    row_bytes: u32,
    r0: u32,        // the chunk's first row in the whole matrix
    w_off: u32,     // byte offset of the chunk's row 0 in W
    _a: u32,
    _b: u32,
    _c: u32,
}
struct Step { pos0: u32, n: u32, _a: u32, _b: u32 }

override TY: u32 = 0u;

@group(0) @binding(0) var<storage, read> W: array<u32>;
@group(0) @binding(1) var<storage, read> TOK: array<u32>;
@group(0) @binding(2) var<storage, read_write> X: array<f32>;
@group(0) @binding(3) var<uniform> P: Params;
@group(0) @binding(4) var<uniform> STEP: Step;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = TOK[STEP.pos0];
    let c = gid.x;
    if (t < P.r0 || t - P.r0 >= P.rows || c >= P.cols) {
        return;
    }
    X[c] = weight_at(P.w_off + (t - P.r0) * P.row_bytes, c);
}
