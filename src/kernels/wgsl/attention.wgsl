// RoPE and causal attention over the KV cache with grouped KV heads, in one launch. One workgroup per (head, token)
// (and position chunk, below):
// token t sits at position pos0 + t and sees positions 0..=pos0 + t, those before pos0 from the layer's cache, the
// step's own from K and V as the products left them, rotated here (q too). The first query head of each KV group
// stores its token's rotated k and its v into the cache for the later steps; nothing in this launch reads those
// cache slots. The step's q, k and v share one buffer, token t's at QKV[t · (q_dim + 2 · kv_dim)]: [q | k | v], as
// the fused product writes them. A rotated pair (x0, x1) becomes (x0·c − x1·s, x0·s + x1·c); dims past the rotary part stay as they
// are. cos/sin come from a table computed in f64 on the CPU (the values the CPU path uses):
// CS[(pos · half + i) · 2 + {0: cos, 1: sin}]. Scores, softmax and the weighted sum of values follow the CPU path's
// operations (scores · scale, max, exp(s − max), sum, weights e / sum).
//
// Split over position chunks (decoding: a step of up to TILE tokens has too few (head, token) workgroups to keep
// a GPU busy): a launch of nch = num_workgroups.z > 1 chunks per (head, token) gives chunk c the positions
// c·⌈len / nch⌉ .. (c + 1)·⌈len / nch⌉ (clipped to len; a chunk may be empty). Each chunk writes to PART, at
// ((t · n_head + h) · nch + c) · (hd + 2): its max score m_c, its sum l_c = Σ exp(s − m_c) and its unnormalized
// sum o_c = Σ exp(s − m_c) · v (hd values); attention_combine.wgsl adds the chunks up into O. With nch = 1 the one
// chunk holds every position and writes the normalized output to O itself (prefill), as the CPU path computes
// it. Only chunk 0 stores the step's k and v into the cache.
//
// The caches' layouts (each layer's part from P.cache_off): VC by position, [pos][kv head][dim], as the values
// are read (a dim quad per invocation, neighbouring invocations neighbouring quads of one position); KC by dim,
// [kv head][dim][pos] (n_ctx positions a row), as the scores read it (an invocation per position, so a warp's
// load of dim e is one run of neighbouring positions, not 32 keys' rows apart).
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
@group(0) @binding(8) var<storage, read_write> PART: array<f32>;
// A workgroup of WG invocations per (head, token) (a const the host puts before this source: 256, or 64 on a CPU
// adapter). Scores: the positions are shared out round-robin, each
// invocation's dot products in four independent partial sums. Values: hd ≤ MAX_HEAD_DIM ≤ 4 · WG (WG ≥ 64), so the
// invocations form G = WG / ⌈hd / 4⌉ groups of ⌈hd / 4⌉ (four dims each: 16 groups for hd = 64); group g sums
// positions g, g + G, … in four independent running sums, and the groups' sums are added in group order at the
// end. Decoding has one workgroup per head (9 for SmolLM2), so what bounds it is the chain of dependent loads
// inside one invocation: these splits keep that chain about len / (4 · G) loads long instead of len (an H200
// decoding SmolLM2 after 720 positions: 406 µs a launch with one invocation per dim walking every position, 69
// with 4 groups of 64, one dim each). The cached positions (before pos0) and the step's own are separate loops
// (no branch in the long one).
var<workgroup> red: array<f32, WG>;
var<workgroup> red4: array<vec4<f32>, WG>;

// The cached values at VC[i ..] for dims d0 .. d0 + 3 of a head, zero past the head's last dim (hd not a
// multiple of 4); own4 the same from the step's own v in QKV.
fn v4(i: u32, d0: u32) -> vec4<f32> {
    if (d0 + 4u <= P.hd) {
        return vec4<f32>(VC[i], VC[i + 1u], VC[i + 2u], VC[i + 3u]);
    }
    var v = vec4<f32>(0.0);
    for (var e = 0u; d0 + e < P.hd; e++) { v[e] = VC[i + e]; }
    return v;
}
fn own4(i: u32, d0: u32) -> vec4<f32> {
    if (d0 + 4u <= P.hd) {
        return vec4<f32>(QKV[i], QKV[i + 1u], QKV[i + 2u], QKV[i + 3u]);
    }
    var v = vec4<f32>(0.0);
    for (var e = 0u; d0 + e < P.hd; e++) { v[e] = QKV[i + e]; }
    return v;
}
// The token's rotated q. HD: a const the host puts before this source, the model's head size or a bound on it
// (P.hd ≤ HD ≤ kernels::gpu::MAX_HEAD_DIM): the loops over a head's dims run to this constant with `e < P.hd`
// inside, so the compiler can unroll them and issue a key's loads together instead of one round trip to memory
// after another (an H200 decoding SmolLM2: 28.8 µs a launch with the bound read from P).
var<workgroup> qr: array<f32, HD>;
// The step's own keys, rotated, for its first OWN positions (pos0 ..): written once per workgroup, dims shared out
// over the invocations, then read by the invocation scoring each position. Rotating them inside the score loop
// made that one invocation walk a head's dims in a chain of loads and cos/sin lookups (an H200, after 230
// positions: the score phase 31 of a launch's 48 µs, with one position per invocation).
const OWN: u32 = 8u;
var<workgroup> kr: array<f32, OWN * HD>;

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

// red[0] = max or sum of red[0..WG] (a tree; every invocation calls it).
fn reduce(li: u32, is_max: bool) -> f32 {
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k = k / 2u) {
        if (li < k) {
            if (is_max) {
                red[li] = max(red[li], red[li + k]);
            } else {
                red[li] += red[li + k];
            }
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier(); // red is written again next
    return r;
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let h = wg.x;
    let t = wg.y;
    let c = wg.z;
    let nch = nwg.z;
    let pos0 = STEP.pos0;
    let len = pos0 + t + 1u;
    // This chunk's positions lo .. hi: cached ones lo .. ch, the step's own oh .. hi.
    let per = (len + nch - 1u) / nch;
    let lo = min(c * per, len);
    let hi = min(lo + per, len);
    let ch = min(hi, pos0);
    let oh = max(lo, pos0);
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
    let kbase = P.cache_off + kvh * P.hd * P.n_ctx; // dim 0, position 0 of this KV head's keys
    for (var d = li; d < P.hd; d += WG) {
        let pi = pair_of(d);
        qr[d] = rot(QKV[q0 + d], QKV[q0 + pi.y], pi, pos0 + t);
        if (h % group == 0u && c == 0u) {
            KC[kbase + d * P.n_ctx + pos0 + t] = rot(QKV[own + d], QKV[own + pi.y], pi, pos0 + t);
            VC[dst + d] = QKV[own + kv_dim + d];
        }
    }
    // The own positions this chunk scores (oh .. hi), up to OWN of them, rotated into kr.
    let staged = min(hi, pos0 + OWN);
    if (oh < staged) {
        for (var i = li; i < (staged - pos0) * HD; i += WG) {
            let jj = i / HD;
            let d = i % HD;
            if (pos0 + jj >= oh && d < P.hd) {
                let k0 = jj * stride + q_dim + kvh * P.hd;
                let pi = pair_of(d);
                kr[i] = rot(QKV[k0 + d], QKV[k0 + pi.y], pi, pos0 + jj);
            }
        }
    }
    workgroupBarrier();
    var mx = -3.4e38;
    // Scores of the cached positions.
    let hd4 = P.hd & ~3u;
    let nc = P.n_ctx;
    for (var j = lo + li; j < ch; j += WG) {
        let k0 = kbase + j;
        var d0 = 0.0;
        var d1 = 0.0;
        var d2 = 0.0;
        var d3 = 0.0;
        for (var e = 0u; e < (HD & ~3u); e += 4u) {
            if (e < hd4) {
                d0 = fma(qr[e], KC[k0 + e * nc], d0);
                d1 = fma(qr[e + 1u], KC[k0 + (e + 1u) * nc], d1);
                d2 = fma(qr[e + 2u], KC[k0 + (e + 2u) * nc], d2);
                d3 = fma(qr[e + 3u], KC[k0 + (e + 3u) * nc], d3);
            }
        }
        for (var e = hd4; e < P.hd; e++) { d0 = fma(qr[e], KC[k0 + e * nc], d0); }
        let s = ((d0 + d1) + (d2 + d3)) * P.scale;
        S[s0 + j] = s;
        mx = max(mx, s);
    }
    // The step's own positions up to this token: their k rotated here.
    for (var j = oh + li; j < hi; j += WG) {
        let k0 = (j - pos0) * stride + q_dim + kvh * P.hd;
        var d = 0.0;
        if (j < staged) {
            let kb = (j - pos0) * HD;
            for (var e = 0u; e < HD; e++) {
                if (e < P.hd) {
                    d += qr[e] * kr[kb + e];
                }
            }
        } else {
            for (var e = 0u; e < HD; e++) {
                if (e < P.hd) {
                    let pi = pair_of(e);
                    d += qr[e] * rot(QKV[k0 + e], QKV[k0 + pi.y], pi, j);
                }
            }
        }
        let s = d * P.scale;
        S[s0 + j] = s;
        mx = max(mx, s);
    }
    red[li] = mx;
    let m = reduce(li, true);
    var sum = 0.0;
    for (var j = lo + li; j < hi; j += WG) {
        let e = exp(S[s0 + j] - m);
        S[s0 + j] = e;
        sum += e;
    }
    red[li] = sum;
    let total = reduce(li, false);
    // Unsplit: the weights e / total (the CPU path's), each by the invocation that wrote its e. Then every
    // invocation reads every weight (split: every e).
    if (nch == 1u) {
        for (var j = li; j < len; j += WG) { S[s0 + j] = S[s0 + j] / total; }
    }
    storageBarrier();
    // Values: invocation li takes dims 4·(li % q4) .. + 3 (q4 = ⌈hd / 4⌉ quads) of the positions g, g + gs, …
    // (g = li / q4, gs = WG / q4 groups: 16 for hd = 64), four positions an iteration.
    let q4 = (P.hd + 3u) / 4u;
    let gs = WG / q4;
    let g = li / q4;
    let d0 = (li % q4) * 4u;
    var acc = vec4<f32>(0.0);
    if (g < gs) {
        var a0 = vec4<f32>(0.0);
        var a1 = vec4<f32>(0.0);
        var a2 = vec4<f32>(0.0);
        var a3 = vec4<f32>(0.0);
        let vb = P.cache_off + kvh * P.hd + d0;
        var j = lo + g;
        for (; j + 3u * gs < ch; j += 4u * gs) {
            a0 = fma(vec4<f32>(S[s0 + j]), v4(vb + j * kv_dim, d0), a0);
            a1 = fma(vec4<f32>(S[s0 + j + gs]), v4(vb + (j + gs) * kv_dim, d0), a1);
            a2 = fma(vec4<f32>(S[s0 + j + 2u * gs]), v4(vb + (j + 2u * gs) * kv_dim, d0), a2);
            a3 = fma(vec4<f32>(S[s0 + j + 3u * gs]), v4(vb + (j + 3u * gs) * kv_dim, d0), a3);
        }
        for (; j < ch; j += gs) { a0 = fma(vec4<f32>(S[s0 + j]), v4(vb + j * kv_dim, d0), a0); }
        let ov = q_dim + kv_dim + kvh * P.hd + d0;
        for (; j < hi; j += gs) { a0 = fma(vec4<f32>(S[s0 + j]), own4((j - pos0) * stride + ov, d0), a0); }
        acc = (a0 + a1) + (a2 + a3);
    }
    red4[li] = acc;
    workgroupBarrier();
    let pb = ((t * P.n_head + h) * nch + c) * (P.hd + 2u);
    if (g == 0u) {
        var o = vec4<f32>(0.0);
        for (var k = 0u; k < gs; k++) { o += red4[k * q4 + li]; }
        for (var e = 0u; e < 4u; e++) {
            if (d0 + e < P.hd) {
                if (nch == 1u) {
                    O[o0 + d0 + e] = o[e];
                } else {
                    PART[pb + 2u + d0 + e] = o[e];
                }
            }
        }
    }
    if (nch > 1u && li == 0u) {
        PART[pb] = m;
        PART[pb + 1u] = total;
    }
}
