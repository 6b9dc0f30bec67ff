// Attention split over position chunks, added up (attention.wgsl writes the chunks): for head h of token t, with
// chunk c's max score m_c, sum l_c = Σ exp(s − m_c) and unnormalized values o_c = Σ exp(s − m_c) · v at
// PART[((t · n_head + h) · nch + c) · (hd + 2)] (m_c, l_c, then hd values), the output is
// Σ_c o_c · exp(m_c − M) / Σ_c l_c · exp(m_c − M) with M = max_c m_c: softmax over every position, as one
// workgroup over all of them would compute it up to rounding. An empty chunk has m_c = −3.4e38 and l_c = o_c = 0:
// its factor exp(m_c − M) is 0. One workgroup per (head, token), an invocation per dim.
//
// What bounds this launch is the chain of dependent loads in one invocation (an H200: 15 µs a launch when each
// chunk's m_c, l_c and value were read one after the other in loops): the chunks' m_c and l_c are read at once,
// one chunk per invocation, and the factors exp(m_c − M) computed once into workgroup memory; each dim's
// values are read eight chunks at a time before they are added (in chunk order, as before).
struct Params { n_head: u32, hd: u32, nch: u32, _a: u32 }
@group(0) @binding(0) var<storage, read> PART: array<f32>;
@group(0) @binding(1) var<storage, read_write> O: array<f32>;
@group(0) @binding(2) var<uniform> P: Params;

var<workgroup> mc: array<f32, 64>; // m_c (nch ≤ 64: kernels::gpu::MAX_ATTENTION_CHUNKS)
var<workgroup> lc: array<f32, 64>; // l_c
var<workgroup> fc: array<f32, 64>; // exp(m_c − M)

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wg.x;
    let t = wg.y;
    let w = P.hd + 2u;
    let nch = min(P.nch, 64u);
    let b = (t * P.n_head + h) * P.nch * w;
    if (li < nch) {
        mc[li] = PART[b + li * w];
        lc[li] = PART[b + li * w + 1u];
    }
    workgroupBarrier();
    var m = -3.4e38;
    for (var c = 0u; c < nch; c++) { m = max(m, mc[c]); }
    if (li < nch) {
        fc[li] = exp(mc[li] - m);
    }
    workgroupBarrier();
    var l = 0.0;
    for (var c = 0u; c < nch; c++) { l = fma(lc[c], fc[c], l); }
    let o0 = (t * P.n_head + h) * P.hd;
    for (var d = li; d < P.hd; d += 64u) {
        var o = 0.0;
        for (var c0 = 0u; c0 < nch; c0 += 8u) {
            var v: array<f32, 8>;
            for (var k = 0u; k < 8u; k++) {
                if (c0 + k < nch) {
                    v[k] = PART[b + (c0 + k) * w + 2u + d];
                }
            }
            for (var k = 0u; k < 8u; k++) {
                if (c0 + k < nch) {
                    o = fma(v[k], fc[c0 + k], o);
                }
            }
        }
        O[o0 + d] = o / l;
    }
}
