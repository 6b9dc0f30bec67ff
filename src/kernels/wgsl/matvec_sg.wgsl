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

// The workgroup's size: four of the adapter's widest subgroups, within 32..=256 (kernels::gpu sets it).
override SGW: u32 = 128u;

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
    if (NORM == 1u) {
        mean_squares(li, min(SGW, 64u), tok0, rank == 0u);
    } else {
        workgroupBarrier();
    }
    let count = atomicLoad(&subgroups); // every subgroup has drawn (a barrier above)
    let slots = (P.cols + 3u) / 4u;
    for (var r = sg; r < RPW; r += count) {
        let row = (wg.x + wg.y * nwg.x) * RPW + r;
        if (row >= P.rows) {
            break;
        }
        for (var t = 0u; t < TT; t++) { acc[t] = 0.0; }
        // Four slots per iteration (the same slots in the same order as one at a time: the bits do not
        // change), so that a lane has four slots' loads in flight instead of one.
        var u = rank;
        for (; u + 3u * lanes < slots; u += 4u * lanes) {
            slot(row, u, tok0);
            slot(row, u + lanes, tok0);
            slot(row, u + 2u * lanes, tok0);
            slot(row, u + 3u * lanes, tok0);
        }
        for (; u < slots; u += lanes) { slot(row, u, tok0); }
        for (var t = 0u; t < TT; t++) {
            if (t >= nt) {
                break;
            }
            var v = subgroupAdd(acc[t]);
            if (rank == 0u) {
                let o = P.out_off + (tok0 + t) * P.out_stride + row;
                if (NORM == 1u) {
                    v *= inv[t];
                }
                Y[o] = finish(v, row, o);
            }
        }
    }
}
