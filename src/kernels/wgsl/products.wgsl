// The declarations matvec.wgsl and matmul.wgsl share (this prefix is joined to each): one bind group layout
// serves both, so the parameters and bindings are written once, here.
//
// Override constants: TY, the weights' GGUF type id (dequant.wgsl decodes it); NORM = 1 normalizes the input on
// the way in (RMSNorm: x · (1 / sqrt(mean(x²) + eps)) · AUX[c], AUX the norm weights); NORM = 2 (matvec.wgsl's
// one-token pipelines only) adds attention's position chunks up on the way in (X holds attention.wgsl's
// partials: see matvec.wgsl). NORM is a constant, not a parameter, so the plain product compiles without the
// transform in its innermost loop.

struct Params {
    rows: u32,
    cols: u32,
    row_bytes: u32,
    w_off: u32,      // byte offset of row 0 in W
    in_off: u32,     // offset of x[0] in X (elements)
    in_stride: u32,  // elements between tokens in X
    out_off: u32,    // offset of y[0][0] in Y
    out_stride: u32, // elements between tokens in Y
    accumulate: u32, // 1: add to what Y holds
    has_bias: u32,
    scale: f32,
    bias_off: u32,   // bias[bias_off + row]
    eps: f32,        // RMSNorm's epsilon (NORM = 1)
    glu: u32,        // 1: y = silu(GATE[o]) · y, last; 2: row pairs, y = silu(W[r]·x) · (W[r + rows]·x)
    heads: u32,      // NORM = 2: attention's heads (cols / heads dims each) ...
    chunks: u32,     // ... and position chunks
}
struct Step { pos0: u32, n: u32, _a: u32, _b: u32 }

override TY: u32 = 0u;
override NORM: u32 = 0u;

@group(0) @binding(0) var<storage, read> W: array<u32>;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read_write> Y: array<f32>;
@group(0) @binding(3) var<storage, read> BIAS: array<f32>;
@group(0) @binding(4) var<uniform> P: Params;
@group(0) @binding(5) var<uniform> STEP: Step;
@group(0) @binding(6) var<storage, read> AUX: array<f32>;
@group(0) @binding(7) var<storage, read> GATE: array<f32>;

// The value stored at Y[o] for row r's sum v: scaled, biased, accumulated, then gated by g where P.glu is set
// (SwiGLU: silu(g) · y; g is GATE[o] for glu = 1, the row pair's gate sum for glu = 2: see matvec.wgsl).
fn finish_with(v: f32, r: u32, o: u32, g: f32) -> f32 {
    var y = v * P.scale;
    if (P.has_bias != 0u) {
        y += BIAS[P.bias_off + r];
    }
    if (P.accumulate != 0u) {
        y += Y[o];
    }
    if (P.glu != 0u) {
        y = g / (1.0 + exp(-g)) * y;
    }
    return y;
}

// finish_with with the gate read from GATE (the matrix-matrix kernels: glu is 0 or 1 there).
fn finish(v: f32, r: u32, o: u32) -> f32 {
    var g = 0.0;
    if (P.glu == 1u) {
        g = GATE[o];
    }
    return finish_with(v, r, o, g);
}

// matmul.wgsl and matmul_wide.wgsl: row r's finished sums v for tokens t0 .. t0 + 3, those in range.
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
