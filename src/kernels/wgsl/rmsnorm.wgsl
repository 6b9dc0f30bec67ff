// y[t] = x[t] · (1 / sqrt(mean(x[t]²) + eps)) · w, one workgroup per token (x). With `last`, one workgroup
// normalizes the step's last token into y[0] (the input of the output projection when only the last token's
// logits are wanted).
struct Params { n: u32, last: u32, eps: f32, _a: u32 }
struct Step { pos0: u32, n: u32, _a: u32, _b: u32 }
@group(0) @binding(0) var<storage, read> X: array<f32>;
@group(0) @binding(1) var<storage, read> Wn: array<f32>;
@group(0) @binding(2) var<storage, read_write> Y: array<f32>;
@group(0) @binding(3) var<uniform> P: Params;
@group(0) @binding(4) var<uniform> STEP: Step;
var<workgroup> part: array<f32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let t = select(wg.x, STEP.n - 1u, P.last != 0u);
    let x0 = t * P.n;
    let y0 = select(t * P.n, 0u, P.last != 0u);
    var s = 0.0;
    for (var i = li; i < P.n; i += 256u) { s += X[x0 + i] * X[x0 + i]; }
    part[li] = s;
    workgroupBarrier();
    for (var k = 128u; k > 0u; k = k / 2u) {
        if (li < k) { part[li] += part[li + k]; }
        workgroupBarrier();
    }
    let scale = 1.0 / sqrt(part[0] / f32(P.n) + P.eps);
    for (var i = li; i < P.n; i += 256u) { Y[y0 + i] = X[x0 + i] * scale * Wn[i]; }
}
