// RoPE and causal attention over the KV cache with grouped KV heads, in one launch. One workgroup per (head, token):
// token t sits at position pos0 + t and sees positions 0..=pos0 + t, those before pos0 from the layer's cache, the
// step's own from K and V as the products left them, rotated here (q too). The first query head of each KV group
// stores its token's rotated k and its v into the cache for the later steps; nothing in this launch reads those
// cache slots. The step's q, k and v share one buffer, token t's at QKV[t · (q_dim + 2 · kv_dim)]: [q | k | v], as
// the fused product writes them. A rotated pair (x0, x1) becomes (x0·c − x1·s, x0·s + x1·c); dims past the rotary part stay as they
// are. cos/sin come from a table computed in f64 on the CPU (the values the CPU path uses):
// CS[(pos · half + i) · 2 + {0: cos, 1: sin}]. Scores, softmax and the weighted sum of values follow the CPU path's
// operations (scores · scale, max, exp(s − max), sum, weights e / sum).
struct Params {
    n_head: u32, n_kv: u32, hd: u32, n_ctx: u32,
    cache_off: u32, scale: f32, half: u32, neox: u32,
}
struct Step { pos0: u32, n: u32, _a: u32, _b: u32 }
@group(0) @binding(0) var<storage, read> QKV: array<f32>;
@group(0) @binding(1) var<storage, read_write> KC: array<f32>;
@group(0) @binding(2) var<storage, read_write> VC: array<f32>;
@group(0) @binding(3) var<storage, read> CS: array<f32>;
@group(0) @binding(4) var<storage, read_write> S: array<f32>;
@group(0) @binding(5) var<storage, read_write> O: array<f32>;
@group(0) @binding(6) var<uniform> P: Params;
@group(0) @binding(7) var<uniform> STEP: Step;
var<workgroup> red: array<f32, 64>;
// The token's rotated q. MAX_HEAD_DIM: a const the host puts before this source (kernels::gpu::MAX_HEAD_DIM; it
// refuses models with larger heads).
var<workgroup> qr: array<f32, MAX_HEAD_DIM>;

// Dim d's rotation: (pair index i, the partner dim, 1 if d is the pair's first); i = half for a dim that does
// not rotate (partial rotary).
fn pair_of(d: u32) -> vec3<u32> {
    if (P.neox != 0u) {
        if (d < P.half) { return vec3<u32>(d, d + P.half, 1u); }
        if (d < 2u * P.half) { return vec3<u32>(d - P.half, d - P.half, 0u); }
    } else if (d < 2u * P.half) {
        if (d % 2u == 0u) { return vec3<u32>(d / 2u, d + 1u, 1u); }
        return vec3<u32>(d / 2u, d - 1u, 0u);
    }
    return vec3<u32>(P.half, d, 1u);
}

// x (dim d of a head) rotated for position pos, its partner dim's value being `partner`.
fn rot(x: f32, partner: f32, pi: vec3<u32>, pos: u32) -> f32 {
    if (pi.x == P.half) { return x; }
    let c = CS[(pos * P.half + pi.x) * 2u];
    let s = CS[(pos * P.half + pi.x) * 2u + 1u];
    if (pi.z == 1u) { return x * c - partner * s; }
    return partner * s + x * c;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wg.x;
    let t = wg.y;
    let pos0 = STEP.pos0;
    let len = pos0 + t + 1u;
    let q_dim = P.n_head * P.hd;
    let kv_dim = P.n_kv * P.hd;
    let group = P.n_head / P.n_kv;
    let kvh = h / group;
    // Token t's q, k and v in QKV (k: `+ q_dim`, v: `+ q_dim + kv_dim`).
    let stride = q_dim + 2u * kv_dim;
    let q0 = t * stride + h * P.hd;
    let o0 = t * q_dim + h * P.hd;
    let s0 = (t * P.n_head + h) * P.n_ctx;
    let own = t * stride + q_dim + kvh * P.hd;
    let dst = P.cache_off + (pos0 + t) * kv_dim + kvh * P.hd;
    for (var d = li; d < P.hd; d += 64u) {
        let pi = pair_of(d);
        qr[d] = rot(QKV[q0 + d], QKV[q0 + pi.y], pi, pos0 + t);
        if (h % group == 0u) {
            KC[dst + d] = rot(QKV[own + d], QKV[own + pi.y], pi, pos0 + t);
            VC[dst + d] = QKV[own + kv_dim + d];
        }
    }
    workgroupBarrier();
    var mx = -3.4e38;
    for (var j = li; j < len; j += 64u) {
        var d = 0.0;
        if (j < pos0) {
            let k0 = P.cache_off + j * kv_dim + kvh * P.hd;
            for (var e = 0u; e < P.hd; e++) { d += qr[e] * KC[k0 + e]; }
        } else {
            let k0 = (j - pos0) * stride + q_dim + kvh * P.hd;
            for (var e = 0u; e < P.hd; e++) {
                let pi = pair_of(e);
                d += qr[e] * rot(QKV[k0 + e], QKV[k0 + pi.y], pi, j);
            }
        }
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
            var v = 0.0;
            if (j < pos0) {
                v = VC[P.cache_off + j * kv_dim + kvh * P.hd + d];
            } else {
                v = QKV[(j - pos0) * stride + q_dim + kv_dim + kvh * P.hd + d];
            }
            acc += (S[s0 + j] / total) * v;
        }
        O[o0 + d] = acc;
    }
}
