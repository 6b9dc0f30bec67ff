// matvec.wgsl's products with subgroup operations (appended to matvec.wgsl only where the adapter offers them;
// in a browser the module starts with `enable subgroups;`). Workgroups of 4 rows and TT tokens as there, but of
// four subgroups (SGW invocations), and a row belongs to a whole subgroup instead of 16 invocations (one row
// each: no subgroup walks two rows one after the other), its lanes' sums added by subgroupAdd: no workgroup
// memory and no barrier for the sums.
//
// Nothing here assumes a subgroup size or which invocations share a subgroup (WGSL fixes neither: 8 on a
// 256-bit llvmpipe, 32 on NVIDIA, 32 or 64 on AMD, up to 128 elsewhere, where one subgroup is the whole
// workgroup): each invocation's rank in its subgroup and the subgroup's active count come from subgroup sums,
// each subgroup draws a number from a workgroup counter, and subgroup s computes rows s, s + S, … of the
// workgroup's 4 (S subgroups). A row's slots go round-robin over its subgroup's lanes, as over 16 lanes in
// matvec.wgsl; the order of subgroupAdd is the hardware's, so bits differ from matvec.wgsl's main (not from one
// run to the next, nor between TT = 1 and TT = 8: the same lanes hold the same slots).

var<workgroup> subgroups: atomic<u32>;

// The workgroup's size: four of the adapter's widest subgroups, within 32..=256 and at most 64 of its smallest
// (kernels::gpu sets it).
override SGW: u32 = 128u;
// SPLIT = 1 (one-token pipelines, where kernels::gpu knows a workgroup has at least four subgroups): the
// workgroup computes RPS rows (1, 2 or 4), each over K = S / RPS subgroups instead of one (S subgroups; each
// takes every K-th group of its row's slots), their sums added in workgroup memory. Decoding's products are short
// rows (576 or 1536 columns for SmolLM2), and a row's time is its lanes' chain of loads: a row over four
// subgroups has a quarter of the chain. With SPLIT = 0, RPS is RPW (4).
override SPLIT: u32 = 0u;
override RPS: u32 = 4u;

// Row wr's slots first, first + step, … dotted into acc[], four per iteration (the same slots in the same order
// as one at a time: the bits do not change), so that a lane has four slots' loads in flight instead of one.
fn row_slots(wr: u32, first: u32, step: u32, slots: u32, tok0: u32) {
    var u = first;
    for (; u + 3u * step < slots; u += 4u * step) {
        slot(wr, u, tok0);
        slot(wr, u + step, tok0);
        slot(wr, u + 2u * step, tok0);
        slot(wr, u + 3u * step, tok0);
    }
    for (; u < slots; u += step) { slot(wr, u, tok0); }
}

// SPLIT's products (TT = 1): see above. Uniform control flow at the barriers.
fn split_rows(row0: u32, rank: u32, lanes: u32, sg: u32, count: u32, tok0: u32) {
    let kk = max(1u, count / RPS);
    let k = sg / RPS;
    let row = row0 + sg % RPS;
    let work = k < kk && row < P.rows;
    let slots = (P.cols + 3u) / 4u;
    let halves = select(1u, 2u, P.glu == 2u);
    let step = kk * lanes;
    if (NORM == 1u) {
        workgroupBarrier(); // inv[] read part[]: written again below
    }
    for (var h = 0u; h < halves; h++) {
        acc[0] = 0.0;
        if (work) {
            row_slots(row + h * P.rows, k * lanes + rank, step, slots, tok0);
        }
        let v = subgroupAdd(acc[0]);
        if (rank == 0u && k < kk) {
            part[sg] = v;
        }
        workgroupBarrier();
        if (rank == 0u && k == 0u && row < P.rows && nt > 0u) {
            var s = 0.0;
            for (var j = 0u; j < kk; j++) { s += part[j * RPS + sg]; }
            if (NORM == 1u) {
                s *= inv[0];
            }
            emit(s, row, 0u, tok0, h, halves);
        }
        workgroupBarrier(); // part[] again in the up pass
    }
}

// RMSNorm's 1 / rms of the tile's tokens into inv[], where `keep` (each subgroup's rank 0): every invocation
// squares and adds its share of the columns (li, li + SGW, …), subgroupAdd adds a subgroup's shares, and each
// keeping invocation adds the subgroups' sums from part[] in subgroup order (all agree): one barrier, and per
// invocation a few loads instead of matvec.wgsl's 64 invocations' columns and the 64 partial sums added one by
// one. At most 64 subgroups (SGW ≤ 64 × the smallest subgroup: kernels::gpu). Uniform control flow.
fn mean_squares_sg(li: u32, sg: u32, count: u32, tok0: u32, keep: bool) {
    for (var t = 0u; t < TT; t++) {
        let s = subgroupAdd(squares(li, SGW, tok0, t));
        if (keep) {
            part[t * 64u + sg] = s;
        }
    }
    workgroupBarrier();
    if (keep) {
        inv_from_parts(count);
    }
}

@compute @workgroup_size(SGW)
fn main_sg(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let tok0 = wg.z * TT;
    nt = min(TT, STEP.n - min(STEP.n, tok0));
    let rank = subgroupExclusiveAdd(1u);
    let lanes = subgroupAdd(1u);
    var drawn = 0u;
    if (rank == 0u) {
        drawn = atomicAdd(&subgroups, 1u) + 1u;
    }
    let sg = subgroupMax(drawn) - 1u;
    workgroupBarrier();
    let count = atomicLoad(&subgroups); // every subgroup has drawn
    if (NORM == 1u) {
        mean_squares_sg(li, sg, count, tok0, rank == 0u);
    }
    if (NORM == 2u) {
        combine_factors(li, SGW);
    }
    if (SPLIT == 1u) {
        split_rows((wg.x + wg.y * nwg.x) * RPS, rank, lanes, sg, count, tok0);
        return;
    }
    let slots = (P.cols + 3u) / 4u;
    let halves = select(1u, 2u, P.glu == 2u); // row pairs: the gate row's pass, then the up row's
    for (var r = sg; r < RPW; r += count) {
        let row = (wg.x + wg.y * nwg.x) * RPW + r;
        if (row >= P.rows) {
            break;
        }
        for (var h = 0u; h < halves; h++) {
            for (var t = 0u; t < TT; t++) { acc[t] = 0.0; }
            row_slots(row + h * P.rows, rank, lanes, slots, tok0);
            for (var t = 0u; t < TT; t++) {
                if (t >= nt) {
                    break;
                }
                var v = subgroupAdd(acc[t]);
                if (NORM == 1u) {
                    v *= inv[t];
                }
                if (rank == 0u) {
                    emit(v, row, t, tok0, h, halves);
                }
            }
        }
    }
}
