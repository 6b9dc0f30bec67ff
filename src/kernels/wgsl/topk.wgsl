// Sampling's candidates on the GPU: the P.rounds largest logits with their token ids, in the order the CPU's
// sampler sorts them (f32::total_cmp descending, then the lower id first), so that the host draws from them
// exactly as it would from all the logits. Two launches of this one kernel:
//   mode 0: workgroup w takes logits [w·256·E, (w+1)·256·E) (IN read as the f32s' bits) and writes its
//           P.rounds best as (key, id) pairs at OUT[w·P.rounds ..];
//   mode 1: one workgroup takes those pairs (P.n of them) and writes the P.rounds best overall.
// Each round every invocation offers the best of its E values not yet taken, a tree of 8 levels picks the
// round's winner, and its owner marks it taken (one bit of `taken` per value it holds: E ≤ 32). The key maps a
// float's bits to an unsigned integer in total_cmp's order (NaN included: positive NaN above +inf, negative
// NaN below -inf, -0 below +0), so any grouping of the comparisons picks the same winner. A round with nothing
// left (fewer values than rounds) writes NONE as the id.
struct Params { n: u32, e: u32, mode: u32, rounds: u32 }
@group(0) @binding(0) var<storage, read> IN: array<u32>;
@group(0) @binding(1) var<storage, read_write> OUT: array<u32>;
@group(0) @binding(2) var<uniform> P: Params;
var<workgroup> sk: array<u32, 256>;
var<workgroup> si: array<u32, 256>;

const NONE: u32 = 0xffffffffu;

fn order(bits: u32) -> u32 {
    if ((bits & 0x80000000u) != 0u) {
        return ~bits;
    }
    return bits | 0x80000000u;
}

// Whether (ak, ai) comes before (bk, bi); an empty side (NONE) comes after everything.
fn better(ak: u32, ai: u32, bk: u32, bi: u32) -> bool {
    if (bi == NONE) { return ai != NONE; }
    if (ai == NONE) { return false; }
    return ak > bk || (ak == bk && ai < bi);
}

fn load(j: u32) -> vec2<u32> {
    if (P.mode == 0u) {
        return vec2<u32>(order(IN[j]), j);
    }
    return vec2<u32>(IN[2u * j], IN[2u * j + 1u]);
}

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let base = wid.x * 256u * P.e;
    var taken = 0u;
    for (var r = 0u; r < P.rounds; r++) {
        var bk = 0u;
        var bi = NONE;
        var bt = 0u;
        for (var t = 0u; t < P.e; t++) {
            let j = base + t * 256u + li;
            if (j < P.n && (taken & (1u << t)) == 0u) {
                let c = load(j);
                if (better(c.x, c.y, bk, bi)) {
                    bk = c.x;
                    bi = c.y;
                    bt = t;
                }
            }
        }
        sk[li] = bk;
        si[li] = bi;
        workgroupBarrier();
        for (var s = 128u; s > 0u; s = s / 2u) {
            if (li < s && better(sk[li + s], si[li + s], sk[li], si[li])) {
                sk[li] = sk[li + s];
                si[li] = si[li + s];
            }
            workgroupBarrier();
        }
        let wk = sk[0];
        let wi = si[0];
        // Ids are unique among the values (each logit once; each chunk's pairs once), so one owner matches.
        if (wi != NONE && bi == wi) {
            taken |= 1u << bt;
        }
        if (li == 0u) {
            let o = 2u * (wid.x * P.rounds + r);
            OUT[o] = wk;
            OUT[o + 1u] = wi;
        }
        workgroupBarrier();
    }
}
