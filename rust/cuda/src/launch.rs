//! Launch shapes shared by the kernels: grid-stride loops with a fixed block size.

/// Threads per block of every elementwise kernel (the kernels' loops assume nothing else).
pub const BLOCK: u32 = 256;

/// Elements one block covers per grid-stride iteration: each warp handles 256 consecutive
/// elements (one Philox block per lane for 8 elements), so a block of 8 warps covers 2048.
pub const ELEMENTS_PER_BLOCK: u64 = 2048;

/// Grid size for `n` elements handled by grid-stride loops: enough blocks to cover `n` once, capped
/// at `blocks_per_sm * sm_count` (more blocks than the GPU runs at once only adds scheduling).
pub fn grid_for(n: u64, sm_count: u32, blocks_per_sm: u32) -> u32 {
    if n == 0 {
        return 0;
    }
    let needed = n.div_ceil(ELEMENTS_PER_BLOCK);
    let cap = (sm_count.max(1) as u64) * (blocks_per_sm.max(1) as u64);
    needed.min(cap).min(u32::MAX as u64) as u32
}

/// Grid size for `tiles` 256-element warp tiles walked by a grid-stride loop over warps: one tile
/// per warp (8 per block), capped as [`grid_for`] caps.
pub fn grid_for_tiles(tiles: u64, sm_count: u32, blocks_per_sm: u32) -> u32 {
    grid_for(tiles.saturating_mul(256), sm_count, blocks_per_sm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_covers_small_and_caps_large() {
        assert_eq!(grid_for(0, 132, 8), 0);
        assert_eq!(grid_for(1, 132, 8), 1);
        assert_eq!(grid_for(2048, 132, 8), 1);
        assert_eq!(grid_for(2049, 132, 8), 2);
        assert_eq!(grid_for(1 << 30, 132, 8), 132 * 8);
        assert_eq!(grid_for(1 << 30, 0, 0), 1, "nonsense device counts still launch");
        assert_eq!(grid_for_tiles(0, 132, 8), 0);
        assert_eq!(grid_for_tiles(9, 132, 8), 2);
    }
}
