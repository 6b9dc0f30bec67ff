// Reading GGUF weight bytes out of the u32 storage array `W` (declared by the kernel this prefix is joined to:
// matvec.wgsl, matvec_t.wgsl): bytes, little-endian u16/u32, f16 scales, signed bytes, and the K formats' packed
// 6-bit scales and mins.

fn byte_at(off: u32) -> u32 {
    return (W[off >> 2u] >> ((off & 3u) * 8u)) & 0xffu;
}
fn u16_at(off: u32) -> u32 {
    return byte_at(off) | (byte_at(off + 1u) << 8u);
}
fn f16_at(off: u32) -> f32 {
    return unpack2x16float(u16_at(off)).x;
}
fn i8_of(b: u32) -> f32 {
    return f32((i32(b) << 24u) >> 24u);
}
fn u32_at(off: u32) -> u32 {
    return u16_at(off) | (u16_at(off + 2u) << 16u);
}
// Q4_K / Q5_K: scale and min (6 bits each) of sub-block j from the 12 packed bytes at sc.
fn scale_min_k4(j: u32, sc: u32) -> vec2<u32> {
    if (j < 4u) {
        return vec2<u32>(byte_at(sc + j) & 63u, byte_at(sc + j + 4u) & 63u);
    }
    let s = (byte_at(sc + j + 4u) & 15u) | ((byte_at(sc + j - 4u) >> 6u) << 4u);
    let m = (byte_at(sc + j + 4u) >> 4u) | ((byte_at(sc + j) >> 6u) << 4u);
    return vec2<u32>(s, m);
}
