// matvec.wgsl's input transform for NORM = 0 and 1 (this file sits between products.wgsl and matvec.wgsl). NORM = 2
// pipelines are built from a module with matvec_combine.wgsl in this place instead: its per-element sum, inlined
// at each of matvec.wgsl's many call sites, made every product pipeline slower to compile (lavapipe: the
// product tests 18 → 36 s) though no other pipeline runs it.

// The input at X[i] (column c), after the transform: with NORM = 1, x · AUX[c]; the token's 1 / rms is a
// common factor of the whole sum, applied once at the end (not once per weight, as the sum's inner loop would).
fn input(i: u32, c: u32) -> f32 {
    let x = X[i];
    if (NORM == 1u) {
        return x * AUX[c];
    }
    return x;
}

// NORM = 2's prologue (matvec_combine.wgsl): nothing here.
fn combine_factors(li: u32, size: u32) {}
