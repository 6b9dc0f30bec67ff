// Causal attention over the KV cache with grouped KV heads. One workgroup per (head, token): token t sits at
// position pos0 + t and sees cache positions 0..=pos0 + t. Scores, softmax and the weighted sum of values follow
// the CPU path's operations (scores · scale, max, exp(s − max), sum, weights e / sum).
struct Params {
    n_head: u32, n_kv: u32, hd: u32, n_ctx: u32,
    cache_off: u32, scale: f32, _a: u32, _b: u32,
}
struct Step { pos0: u32, n: u32, _a: u32, _b: u32 }
@group(0) @binding(0) var<storage, read> Q: array<f32>;
@group(0) @binding(1) var<storage, read> KC: array<f32>;
@group(0) @binding(2) var<storage, read> VC: array<f32>;
@group(0) @binding(3) var<storage, read_write> S: array<f32>;
@group(0) @binding(4) var<storage, read_write> O: array<f32>;
@group(0) @binding(5) var<uniform> P: Params;
@group(0) @binding(6) var<uniform> STEP: Step;
var<workgroup> red: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wg.x;
    let t = wg.y;
    let len = STEP.pos0 + t + 1u;
    let q_dim = P.n_head * P.hd;
    let kv_dim = P.n_kv * P.hd;
    let kvh = h / (P.n_head / P.n_kv);
    let q0 = t * q_dim + h * P.hd;
    let s0 = (t * P.n_head + h) * P.n_ctx;
    var mx = -3.4e38;
    for (var j = li; j < len; j += 64u) {
        let k0 = P.cache_off + j * kv_dim + kvh * P.hd;
        var d = 0.0;
        for (var e = 0u; e < P.hd; e++) { d += Q[q0 + e] * KC[k0 + e]; }
        let s = d * P.scale;
        S[s0 + j] = s;
        mx = max(mx, s);
    }
    red[li] = mx;
    workgroupBarrier();
    for (var k = 32u; k > 0u; k = k / 2u) {
        if (li < k) { red[li] = max(red[li], red[li + k]); }
        workgroupBarrier();
    }
    let m = red[0];
    workgroupBarrier();
    var sum = 0.0;
    for (var j = li; j < len; j += 64u) {
        let e = exp(S[s0 + j] - m);
        S[s0 + j] = e;
        sum += e;
    }
    red[li] = sum;
    workgroupBarrier();
    for (var k = 32u; k > 0u; k = k / 2u) {
        if (li < k) { red[li] += red[li + k]; }
        workgroupBarrier();
    }
    let total = red[0];
    for (var d = li; d < P.hd; d += 64u) {
        var acc = 0.0;
        for (var j = 0u; j < len; j++) {
            acc += (S[s0 + j] / total) * VC[P.cache_off + j * kv_dim + kvh * P.hd + d];
        }
        O[q0 + d] = acc;
    }
}
