// Attention split over position chunks, added up (attention.wgsl writes the chunks): for head h of token t, with
// chunk c's max score m_c, sum l_c = Σ exp(s − m_c) and unnormalized values o_c = Σ exp(s − m_c) · v at
// PART[((t · n_head + h) · nch + c) · (hd + 2)] (m_c, l_c, then hd values), the output is
// Σ_c o_c · exp(m_c − M) / Σ_c l_c · exp(m_c − M) with M = max_c m_c: softmax over every position, as one
// workgroup over all of them would compute it up to rounding. An empty chunk has m_c = −3.4e38 and l_c = o_c = 0:
// its factor exp(m_c − M) is 0. One workgroup per (head, token), an invocation per dim.
struct Params { n_head: u32, hd: u32, nch: u32, _a: u32 }
@group(0) @binding(0) var<storage, read> PART: array<f32>;
@group(0) @binding(1) var<storage, read_write> O: array<f32>;
@group(0) @binding(2) var<uniform> P: Params;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wg.x;
    let t = wg.y;
    let w = P.hd + 2u;
    let b = (t * P.n_head + h) * P.nch * w;
    var m = -3.4e38;
    for (var c = 0u; c < P.nch; c++) { m = max(m, PART[b + c * w]); }
    var l = 0.0;
    for (var c = 0u; c < P.nch; c++) { l = fma(PART[b + c * w + 1u], exp(PART[b + c * w] - m), l); }
    let o0 = (t * P.n_head + h) * P.hd;
    for (var d = li; d < P.hd; d += 64u) {
        var o = 0.0;
        for (var c = 0u; c < P.nch; c++) { o = fma(PART[b + c * w + 2u + d], exp(PART[b + c * w] - m), o); }
        O[o0 + d] = o / l;
    }
}
