// matvec.wgsl's input transform for NORM = 2 (in matvec_input.wgsl's place: see there): one-token products
// reading attention's output as the position chunks attention.wgsl left it (X holds the partials), adding them
// up on the way in as attention_combine.wgsl would, which the decoder then skips (kernels::gpu::Input::Combine).

// Where part[] holds what combine_factors() put there, from CF on (part[0 .. 64] stays the sums' scratch: TT = 1
// uses no more of it): n = P.heads · P.chunks factors exp(m_c − M_h) (head-major), then each head's
// Σ_c l_c · exp(m_c − M_h), then the chunks' l_c. At most 448 floats: kernels::gpu::combine_fits.
const CF: u32 = 64u;

// Attention's output at column c (head h = c / hd, dim c % hd) from the chunks' partials in X (chunk k of head h
// at (h · P.chunks + k) · (hd + 2): m_k, l_k, then hd unnormalized sums; attention.wgsl), added up as
// attention_combine.wgsl adds them (its fma in chunk order, its division): the same bits as the combining launch
// this replaces. Every workgroup computes the values it reads. A plain loop (attention_combine.wgsl loads eight
// chunks before adding them, the same operations): inlined at every call site, the grouped loads took lavapipe
// 60 % longer to compile (the tiny decoder's test 10.2 s against 6.3).
fn input(i: u32, c: u32) -> f32 {
    let nch = P.chunks;
    let hd = P.cols / P.heads;
    let h = c / hd;
    let w = hd + 2u;
    let b = h * nch * w + 2u + c % hd;
    let f0 = CF + h * nch;
    var o = 0.0;
    for (var k = 0u; k < nch; k++) { o = fma(X[b + k * w], part[f0 + k], o); }
    return o / part[CF + P.heads * nch + h];
}

// The factors input() reads, into part[CF ..] (see CF), by the workgroup's `size` invocations: the chunks' m_c
// and l_c, then per head M = max m_c, exp(m_c − M) and Σ l_c · exp(m_c − M) (attention_combine.wgsl's operations
// in its order). Called from uniform control flow (matvec.wgsl's main and matvec_sg.wgsl's, with NORM = 2).
fn combine_factors(li: u32, size: u32) {
    let nch = P.chunks;
    let n = P.heads * nch;
    let w = P.cols / P.heads + 2u;
    let lc = CF + n + P.heads;
    for (var i = li; i < n; i += size) {
        part[CF + i] = X[i * w];
        part[lc + i] = X[i * w + 1u];
    }
    workgroupBarrier();
    for (var h = li; h < P.heads; h += size) {
        let f0 = CF + h * nch;
        var m = -3.4e38;
        for (var k = 0u; k < nch; k++) { m = max(m, part[f0 + k]); }
        var l = 0.0;
        for (var k = 0u; k < nch; k++) {
            let f = exp(part[f0 + k] - m);
            part[f0 + k] = f;
            l = fma(part[lc + h * nch + k], f, l);
        }
        part[CF + n + h] = l;
    }
    workgroupBarrier();
}
