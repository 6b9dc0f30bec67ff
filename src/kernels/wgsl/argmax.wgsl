// Greedy decoding's choice on the GPU: TOK[STEP.pos0 + 1] = the index of the largest of the N logits, as the
// CPU's sampler::argmax picks it: the lowest index among equal maxima, NaN never chosen while any value is not
// NaN (all NaN: the last index). NaN is told by its bits, which no compiler may assume away. One workgroup:
// each invocation scans every 256th logit (neighbours read neighbours), then a tree of 8 levels; the rule
// "better" is a total order on (value, index), so any grouping of the comparisons picks the same index.
struct Params { n: u32, _a: u32, _b: u32, _c: u32 }
struct Step { pos0: u32, n: u32, _a: u32, _b: u32 }
@group(0) @binding(0) var<storage, read> L: array<f32>;
@group(0) @binding(1) var<storage, read_write> TOK: array<u32>;
@group(0) @binding(2) var<uniform> P: Params;
@group(0) @binding(3) var<uniform> STEP: Step;
var<workgroup> bv: array<f32, 256>;
var<workgroup> bi: array<u32, 256>;

const NONE: u32 = 0xffffffffu;

fn is_nan(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u;
}

// Whether (av, ai) wins over (bv, bi); NONE marks an empty side.
fn better(av: f32, ai: u32, bv_: f32, bi_: u32) -> bool {
    if (bi_ == NONE) { return ai != NONE; }
    if (ai == NONE) { return false; }
    let an = is_nan(av);
    let bn = is_nan(bv_);
    if (an && bn) { return ai > bi_; }
    if (an || bn) { return bn; }
    if (av != bv_) { return av > bv_; }
    return ai < bi_;
}

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) li: u32) {
    var v = 0.0;
    var i = NONE;
    // Four values a pass, their loads first (in flight together: the loop is latency-bound, not bandwidth-
    // bound, on a GPU's one workgroup), each clamped inside the array and compared only where it exists.
    for (var j = li; j < P.n; j += 1024u) {
        var x: array<f32, 4>;
        for (var u = 0u; u < 4u; u++) {
            x[u] = L[min(j + u * 256u, P.n - 1u)];
        }
        for (var u = 0u; u < 4u; u++) {
            let jj = j + u * 256u;
            if (jj < P.n && better(x[u], jj, v, i)) {
                v = x[u];
                i = jj;
            }
        }
    }
    bv[li] = v;
    bi[li] = i;
    workgroupBarrier();
    for (var k = 128u; k > 0u; k = k / 2u) {
        if (li < k && better(bv[li + k], bi[li + k], bv[li], bi[li])) {
            bv[li] = bv[li + k];
            bi[li] = bi[li + k];
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        TOK[STEP.pos0 + 1u] = bi[0];
    }
}
