// RoPE on q (in place) and k, for tokens t = 0..n at positions pos0 + t; the rotated k and the v of each token go
// into the layer's KV cache at its position. cos/sin come from a table computed in f64 on the CPU (the same
// values the CPU path uses): CS[(pos · half + i) · 2 + {0: cos, 1: sin}].
struct Params {
    n_head: u32, n_kv: u32, hd: u32, half: u32,
    neox: u32, cache_off: u32, _a: u32, _b: u32,
}
struct Step { pos0: u32, n: u32, _a: u32, _b: u32 }
@group(0) @binding(0) var<storage, read_write> Q: array<f32>;
@group(0) @binding(1) var<storage, read> K: array<f32>;
@group(0) @binding(2) var<storage, read> V: array<f32>;
@group(0) @binding(3) var<storage, read_write> KC: array<f32>;
@group(0) @binding(4) var<storage, read_write> VC: array<f32>;
@group(0) @binding(5) var<storage, read> CS: array<f32>;
@group(0) @binding(6) var<uniform> P: Params;
@group(0) @binding(7) var<uniform> STEP: Step;

fn pair(i: u32) -> vec2<u32> {
    if (P.neox != 0u) { return vec2<u32>(i, i + P.half); }
    return vec2<u32>(2u * i, 2u * i + 1u);
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 64u;
    let q_dim = P.n_head * P.hd;
    let kv_dim = P.n_kv * P.hd;
    let nq = STEP.n * P.n_head * P.half;
    let nk = STEP.n * P.n_kv * P.hd;
    if (idx < nq) {
        let t = idx / (P.n_head * P.half);
        let h = (idx / P.half) % P.n_head;
        let i = idx % P.half;
        let c = CS[((STEP.pos0 + t) * P.half + i) * 2u];
        let s = CS[((STEP.pos0 + t) * P.half + i) * 2u + 1u];
        let ab = pair(i) + vec2<u32>(t * q_dim + h * P.hd);
        let x0 = Q[ab.x];
        let x1 = Q[ab.y];
        Q[ab.x] = x0 * c - x1 * s;
        Q[ab.y] = x0 * s + x1 * c;
    } else if (idx < nq + nk) {
        // One invocation per k element of a head: rotated pairs are written by their first element's invocation,
        // dimensions past the rotary part are copied.
        let j = idx - nq;
        let t = j / kv_dim;
        let e = j % kv_dim;
        let h = e / P.hd;
        let d = e % P.hd;
        let src = t * kv_dim + h * P.hd;
        let dst = P.cache_off + (STEP.pos0 + t) * kv_dim + h * P.hd;
        var rotated = false;
        for (var i = 0u; i < P.half; i++) {
            let ab = pair(i);
            if (ab.x == d) {
                let c = CS[((STEP.pos0 + t) * P.half + i) * 2u];
                let s = CS[((STEP.pos0 + t) * P.half + i) * 2u + 1u];
                let x0 = K[src + ab.x];
                let x1 = K[src + ab.y];
                KC[dst + ab.x] = x0 * c - x1 * s;
                KC[dst + ab.y] = x0 * s + x1 * c;
                rotated = true;
            }
            if (ab.y == d) { rotated = true; }
        }
        if (!rotated) { KC[dst + d] = K[src + d]; }
        VC[dst + d] = V[src + d];
    }
}
