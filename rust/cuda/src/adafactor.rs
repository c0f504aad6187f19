//! Adafactor on the device: the segment table of cuda/adafactor.cu, its scratch buffers, launch
//! shapes, and the step (the math is rust/core/src/rules/adafactor.rs; see cuda/adafactor.cu
//! for how the kernels split it into phases).
//!
//! A [`AdafactorWorkspace`] belongs to one param group. At the group's first step it allocates
//! one device buffer for the table and every scratch array, sized for all of the group's
//! tensors, and uploads the table; the table is uploaded again only when the set of tensors that
//! receive gradients changes. What changes every step (each tensor's parameter and gradient
//! addresses, its step count and its beta2 weight) reaches the device as arguments of
//! `adafactor_set_segments`, one launch per [`UPDATE_SEGMENTS`] tensors. A step is therefore
//! launches only: no allocation, no copy from the host, no synchronisation.

use crate::compile::CudaError;
use crate::dispatch::{
    advance_counters, launch_grid, rounding_args, sm_count, Args, DeviceCounts, DeviceGroup, LrSource, StepCounts,
};
use crate::launch::BLOCK;
use crate::memory::{aligned, upload, DeviceMemory};
use smallbatch_core::driver::Rounding;
use smallbatch_core::rules::adafactor::{AdafactorHyper, AdafactorLayout, Beta2, Shards, Split};
use smallbatch_core::SegmentTable;

/// Elements per unit of an unfactored tensor (cuda/adafactor.cu `ADAFACTOR_UNIT`).
pub const UNIT: u64 = 4096;

/// Rows per column-sum tile before the tile count is capped (cuda/adafactor.cu `row_tiles`).
const ROWS_PER_TILE: u64 = 64;
/// Most row tiles of a matrix: bounds the `col_part` scratch at 64 partial sums per column.
const MAX_ROW_TILES: u64 = 64;

/// Most segments of one launch: `gridDim.z` is at most 65535.
pub const MAX_GRID_Z: usize = 65535;
/// Most blocks along `gridDim.y`.
const MAX_GRID_Y: u64 = 65535;
/// Blocks per SM along `gridDim.x` beyond which the kernels' grid-stride loops take over.
const BLOCKS_PER_SM: u64 = 8;
/// Warps per block (`BLOCK / 32`): the warp-per-unit kernels cover `8` units per block.
const WARPS_PER_BLOCK: u64 = BLOCK as u64 / 32;

/// One stepped tensor, as cuda/adafactor.cu's `AdafactorSegment` (offsets asserted there and in
/// the tests).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AdafactorSegment {
    /// Index of the tensor's element 0 in the group's index space (flat state, random bits).
    pub offset: u64,
    /// `batch * rows * cols`.
    pub numel: u64,
    /// Matrices in the tensor.
    pub batch: u64,
    /// Rows of each matrix.
    pub rows: u64,
    /// Columns of each matrix.
    pub cols: u64,
    /// First row EMA in `row_var` (factored); also indexes the `row_sq` scratch.
    pub row_offset: u64,
    /// First column EMA in `col_var` (factored).
    pub col_offset: u64,
    /// First second moment in `variance` (unfactored).
    pub var_offset: u64,
    /// First slot of the per-unit scratch `param_sq_part` / `update_sq_part`.
    pub unit_offset: u64,
    /// Units: `batch * rows` (factored) or `ceil(numel / UNIT)`.
    pub units: u64,
    /// First slot of the `col_part` scratch (factored; `batch * row_tiles * cols` of them).
    pub colpart_offset: u64,
    /// Row tiles of the column sums (factored).
    pub row_tiles: u64,
    /// First slot of the `row_mean` scratch (factored; `batch` of them).
    pub mean_offset: u64,
    /// The step count after this step: written on the device by `adafactor_set_segments`.
    pub step: u64,
    /// `1 - beta2_t` as f32: written on the device by `adafactor_set_segments`.
    pub weight2: f32,
    /// 0 / 1.
    pub factored: u32,
    /// Address of the parameters' element 0: written on the device by `adafactor_set_segments`.
    pub param: u64,
    /// Address of the gradients' element 0: written on the device by `adafactor_set_segments`.
    pub grad: u64,
    /// The index the tensor's element 0 draws its random bits at (`offset`, unless the tensor is
    /// a shard of a larger one).
    pub draw: u64,
    /// Elements of the whole tensor (`numel`, unless the tensor is a shard).
    pub whole_numel: u64,
    /// Rows of the whole matrix (`rows`, unless the rows are spread over ranks).
    pub whole_rows: u64,
    /// A shard's first slot in the exchange's first round (see [`ExchangeLayout`]).
    pub exchange: u64,
    /// A shard's slot in the exchange's second round.
    pub exchange2: u64,
    /// [`SPLIT_WHOLE`], [`SPLIT_ELEMENTS`] or [`SPLIT_ROWS`].
    pub split: u32,
    /// 0.
    pub pad: u32,
}

/// cuda/adafactor.cu `SPLIT_WHOLE`: the tensor is whole on every rank.
pub const SPLIT_WHOLE: u32 = 0;
/// cuda/adafactor.cu `SPLIT_ELEMENTS`: ranks hold different elements (the RMS sums span ranks).
pub const SPLIT_ELEMENTS: u32 = 1;
/// cuda/adafactor.cu `SPLIT_ROWS`: ranks hold different rows of one factored matrix (the column
/// sums and the sum of the row EMAs span ranks too).
pub const SPLIT_ROWS: u32 = 2;

/// Where a sharded step's sums lie in the exchange vector (f64): the first round is
/// `0 .. first`, the second `first .. first + second`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExchangeLayout {
    /// Values of the first round (per shard: the sum of `P^2`; with rows spread also the sum of
    /// the row EMAs and the column sums of `G^2`).
    pub first: usize,
    /// Values of the second round (per shard: the sum of `U^2`).
    pub second: usize,
}

impl ExchangeLayout {
    /// Values of both rounds.
    pub fn len(&self) -> usize {
        self.first + self.second
    }

    /// Whether nothing is exchanged.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Segments per `adafactor_set_segments` launch (cuda/adafactor.cu `UPDATE_SEGMENTS`).
pub const UPDATE_SEGMENTS: usize = 96;

/// cuda/adafactor.cu's `SegmentUpdate`: what changes from step to step for up to
/// [`UPDATE_SEGMENTS`] consecutive segments, passed by value.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SegmentUpdate {
    /// Each segment's parameter address.
    pub param: [u64; UPDATE_SEGMENTS],
    /// Each segment's gradient address.
    pub grad: [u64; UPDATE_SEGMENTS],
    /// Each segment's step count after this step.
    pub step: [u64; UPDATE_SEGMENTS],
    /// Each segment's `1 - beta2_t` as f32.
    pub weight2: [f32; UPDATE_SEGMENTS],
    /// The first segment.
    pub first: u32,
    /// Segments updated (1 to [`UPDATE_SEGMENTS`]).
    pub count: u32,
}

/// The updates of one step: segment `j` is tensor `tensors[j]`, with the addresses of `group`
/// and the step counts `steps` (already advanced) and beta2 weights from `weight2(step)`.
pub fn segment_updates(
    group: &DeviceGroup<'_>,
    tensors: &[usize],
    steps: &[f64],
    weight2: impl Fn(u64) -> f32,
) -> Vec<SegmentUpdate> {
    tensors
        .chunks(UPDATE_SEGMENTS)
        .enumerate()
        .map(|(c, chunk)| {
            let mut up = SegmentUpdate {
                param: [0; UPDATE_SEGMENTS],
                grad: [0; UPDATE_SEGMENTS],
                step: [0; UPDATE_SEGMENTS],
                weight2: [0.0; UPDATE_SEGMENTS],
                first: (c * UPDATE_SEGMENTS) as u32,
                count: chunk.len() as u32,
            };
            for (j, &i) in chunk.iter().enumerate() {
                let step = steps[i] as u64;
                up.param[j] = group.params[i];
                up.grad[j] = group.grads[i];
                up.step[j] = step;
                up.weight2[j] = weight2(step);
            }
            up
        })
        .collect()
}

/// cuda/adafactor.cu's `SegmentCountedUpdate`: a counted step's per-step values of up to
/// [`UPDATE_SEGMENTS`] consecutive segments (the counts come from the device).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SegmentCountedUpdate {
    /// Each segment's parameter address.
    pub param: [u64; UPDATE_SEGMENTS],
    /// Each segment's gradient address.
    pub grad: [u64; UPDATE_SEGMENTS],
    /// Each segment's tensor (the index of its count).
    pub tensor: [u32; UPDATE_SEGMENTS],
    /// The first segment.
    pub first: u32,
    /// Segments updated (1 to [`UPDATE_SEGMENTS`]).
    pub count: u32,
}

/// The counted updates of one step: segment `j` is tensor `tensors[j]`.
pub fn segment_counted_updates(group: &DeviceGroup<'_>, tensors: &[usize]) -> Vec<SegmentCountedUpdate> {
    tensors
        .chunks(UPDATE_SEGMENTS)
        .enumerate()
        .map(|(c, chunk)| {
            let mut up = SegmentCountedUpdate {
                param: [0; UPDATE_SEGMENTS],
                grad: [0; UPDATE_SEGMENTS],
                tensor: [0; UPDATE_SEGMENTS],
                first: (c * UPDATE_SEGMENTS) as u32,
                count: chunk.len() as u32,
            };
            for (j, &i) in chunk.iter().enumerate() {
                up.param[j] = group.params[i];
                up.grad[j] = group.grads[i];
                up.tensor[j] = i as u32;
            }
            up
        })
        .collect()
}

/// cuda/adafactor.cu's `Beta2Schedule`: the core's [`Beta2`], for the device to evaluate.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Beta2Schedule {
    /// The constant beta2, or the decay exponent.
    pub value: f64,
    /// 1 for torch's schedule `1 - t^value`.
    pub decay: u32,
    /// 0.
    pub pad: u32,
}

impl Beta2Schedule {
    fn of(beta2: Beta2) -> Beta2Schedule {
        match beta2 {
            Beta2::Constant(b) => Beta2Schedule { value: b, decay: 0, pad: 0 },
            Beta2::Decay(d) => Beta2Schedule { value: d, decay: 1, pad: 0 },
        }
    }
}

/// cuda/adafactor.cu's `AdafactorHyper`: what phase 4 needs, passed by value.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KernelHyper {
    /// Learning rate (a value, or a counted step's tensor).
    pub lr: LrSource,
    /// Floor of the parameter RMS.
    pub eps2: f64,
    /// Update clipping threshold.
    pub clip_threshold: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// 0 / 1.
    pub relative_step: u32,
    /// 0 / 1.
    pub cap_lr_at_inv_sqrt_step: u32,
    /// 0 / 1: `beta1 != 0`.
    pub momentum: u32,
    /// 0.
    pub pad: u32,
}

impl KernelHyper {
    /// The kernel's view of `hp`, with the learning rate from `lr`.
    pub fn new(hp: &AdafactorHyper, lr: LrSource) -> Self {
        KernelHyper {
            lr,
            eps2: hp.eps2,
            clip_threshold: hp.clip_threshold,
            weight_decay: hp.weight_decay,
            relative_step: hp.relative_step as u32,
            cap_lr_at_inv_sqrt_step: hp.cap_lr_at_inv_sqrt_step as u32,
            momentum: (hp.beta1 != 0.0) as u32,
            pad: 0,
        }
    }
}

/// cuda/adafactor.cu's `AdafactorScalars`: one per segment, written by phase 4 on the device
/// (the host only sizes the array).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AdafactorScalars {
    /// `-alpha / clip`, or with momentum `1 / clip`.
    pub scale: f32,
    /// `-alpha` with momentum, else 0.
    pub neg_alpha: f32,
    /// `1 - lr * weight_decay`.
    pub decay: f32,
    /// 0.
    pub pad: u32,
    /// Sum of `P^2`.
    pub param_sq: f64,
    /// Sum of `U^2` before clipping.
    pub update_sq: f64,
}

/// Row tiles of a factored matrix's column sums: a function of the shape only, so results do
/// not depend on the device.
pub fn row_tiles(rows: u64) -> u64 {
    rows.div_ceil(ROWS_PER_TILE).clamp(1, MAX_ROW_TILES)
}

/// Element counts of the scratch arrays (f64 unless noted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScratchSizes {
    /// Segments (table entries and `AdafactorScalars`).
    pub segments: usize,
    /// `row_sq`: indexed like `row_var`, so `layout.row_total`.
    pub row_sq: usize,
    /// `col_part`: `batch * row_tiles * cols` per factored segment.
    pub col_part: usize,
    /// `param_sq_part` and `update_sq_part` each: one per unit.
    pub units: usize,
    /// `row_mean` (f32): `batch` per factored segment.
    pub row_mean: usize,
}

/// Byte offsets of the sub-buffers in the workspace's one allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScratchLayout {
    /// The segment table.
    pub table: usize,
    /// `AdafactorScalars`.
    pub scalars: usize,
    /// `row_sq`.
    pub row_sq: usize,
    /// `col_part`.
    pub col_part: usize,
    /// `param_sq_part`.
    pub param_sq: usize,
    /// `update_sq_part`.
    pub update_sq: usize,
    /// `row_mean`.
    pub row_mean: usize,
    /// Total bytes.
    pub bytes: usize,
}

impl ScratchSizes {
    /// Where each array lives, each aligned to [`crate::memory::SUB_ALIGN`].
    pub fn layout(&self) -> ScratchLayout {
        let mut at = 0;
        let mut take = |bytes: usize| {
            let start = at;
            at += aligned(bytes);
            start
        };
        let table = take(self.segments * std::mem::size_of::<AdafactorSegment>());
        let scalars = take(self.segments * std::mem::size_of::<AdafactorScalars>());
        let row_sq = take(self.row_sq * 8);
        let col_part = take(self.col_part * 8);
        let param_sq = take(self.units * 8);
        let update_sq = take(self.units * 8);
        let row_mean = take(self.row_mean * 4);
        ScratchLayout { table, scalars, row_sq, col_part, param_sq, update_sq, row_mean, bytes: at }
    }
}

/// The segments of one step, packed by [`pack`].
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    /// The segment table; `step`, `weight2` and the addresses are left 0 for
    /// `adafactor_set_segments`.
    pub segs: Vec<AdafactorSegment>,
    /// Each segment's tensor.
    pub tensors: Vec<usize>,
    /// The scratch the segments use.
    pub sizes: ScratchSizes,
    /// The sums a sharded step exchanges (empty without `shards`).
    pub exchange: ExchangeLayout,
}

/// The table of the tensors with `stepped[i]`, in tensor order, with their scratch slots packed
/// back to back. Without `shards` tensors without elements are left out, as the CPU skips them;
/// with `shards` (the local shards of tensors spread over ranks) they are kept, so that every
/// rank exchanges the same sums, and each segment gets its split, whole sizes and exchange slots.
/// `draws` gives each tensor's draw index (`None`: its offset).
pub fn pack(
    table: &SegmentTable,
    layout: &AdafactorLayout,
    stepped: &[bool],
    draws: Option<&[u64]>,
    shards: Option<&Shards<'_>>,
) -> Packed {
    let mut segs = Vec::new();
    let mut tensors = Vec::new();
    let mut sizes = ScratchSizes { row_sq: layout.row_total, ..ScratchSizes::default() };
    let mut exchange = ExchangeLayout::default();
    for (i, _) in stepped.iter().enumerate().filter(|(_, &on)| on) {
        let numel = table.numels()[i] as u64;
        if numel == 0 && shards.is_none() {
            continue;
        }
        let [batch, rows, cols] = table.matrix(i).map(|x| x as u64);
        let factored = layout.factored[i];
        let units = if factored { batch * rows } else { numel.div_ceil(UNIT) };
        let mut s = AdafactorSegment {
            offset: table.offsets()[i] as u64,
            draw: draws.map_or(table.offsets()[i] as u64, |d| d[i]),
            numel,
            batch,
            rows,
            cols,
            row_offset: layout.row_offsets[i] as u64,
            col_offset: layout.col_offsets[i] as u64,
            var_offset: layout.variance_offsets[i] as u64,
            unit_offset: sizes.units as u64,
            units,
            factored: factored as u32,
            whole_numel: numel,
            whole_rows: rows,
            ..AdafactorSegment::default()
        };
        if let Some(sh) = shards {
            s.whole_numel = sh.numels[i] as u64;
            s.split = match sh.split[i] {
                Split::Whole => SPLIT_WHOLE,
                Split::Rows if factored => SPLIT_ROWS,
                Split::Rows | Split::Elements => SPLIT_ELEMENTS,
            };
            if s.split == SPLIT_ROWS {
                s.whole_rows = sh.rows[i] as u64;
            }
            if s.split != SPLIT_WHOLE {
                s.exchange = exchange.first as u64;
                exchange.first += if s.split == SPLIT_ROWS { 2 + cols as usize } else { 1 };
                exchange.second += 1;
            }
        }
        sizes.units += units as usize;
        if factored {
            s.row_tiles = row_tiles(rows);
            s.colpart_offset = sizes.col_part as u64;
            s.mean_offset = sizes.row_mean as u64;
            sizes.col_part += (batch * s.row_tiles * cols) as usize;
            sizes.row_mean += batch as usize;
        }
        segs.push(s);
        tensors.push(i);
    }
    sizes.segments = segs.len();
    // The second round follows the first: its slots are known once the first is laid out.
    for (slot, s) in (exchange.first as u64..).zip(segs.iter_mut().filter(|s| s.split != SPLIT_WHOLE)) {
        s.exchange2 = slot;
    }
    Packed { segs, tensors, sizes, exchange }
}

/// Grids of one launch of each phase over a slice of at most [`MAX_GRID_Z`] segments; `None`
/// where no segment of the slice has work in that phase (the factored-only phases).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhaseGrids {
    /// Phases 1 and 5: a warp per unit.
    pub units: (u32, u32, u32),
    /// Column sums.
    pub colsum: Option<(u32, u32, u32)>,
    /// Row and column EMAs.
    pub ema: Option<(u32, u32, u32)>,
    /// Row means.
    pub row_mean: Option<(u32, u32, u32)>,
    /// Column factors.
    pub col_factor: Option<(u32, u32, u32)>,
    /// Phase 3: a warp per factored unit.
    pub phase3: Option<(u32, u32, u32)>,
    /// Phase 4: a block per segment.
    pub phase4: (u32, u32, u32),
}

/// The launch shapes of cuda/adafactor.cu for `segs`: enough blocks along x (and y) to give each
/// warp or thread one piece of the largest segment, capped at `BLOCKS_PER_SM * sm_count` (the
/// loops are grid-stride, so any grid is correct); one z-slice per segment.
pub fn phase_grids(segs: &[AdafactorSegment], sm_count: u32) -> PhaseGrids {
    assert!(!segs.is_empty() && segs.len() <= MAX_GRID_Z, "1 to {MAX_GRID_Z} segments per launch");
    let cap = BLOCKS_PER_SM * sm_count.max(1) as u64;
    let x = |n: u64, per_block: u64| n.div_ceil(per_block).clamp(1, cap) as u32;
    let z = segs.len() as u32;
    let max_of = |f: &dyn Fn(&AdafactorSegment) -> u64, factored_only: bool| {
        segs.iter().filter(|s| !factored_only || s.factored != 0).map(f).max()
    };
    let units = max_of(&|s| s.units, false).unwrap_or(0);
    let fac = |f: &dyn Fn(&AdafactorSegment) -> u64| max_of(f, true);
    PhaseGrids {
        units: (x(units, WARPS_PER_BLOCK), 1, z),
        colsum: fac(&|s| s.cols).map(|cols| {
            let tiles = fac(&|s| s.batch * s.row_tiles).unwrap_or(1);
            (x(cols, BLOCK as u64), tiles.clamp(1, MAX_GRID_Y) as u32, z)
        }),
        ema: fac(&|s| s.batch * (s.rows + s.cols)).map(|n| (x(n, BLOCK as u64), 1, z)),
        row_mean: fac(&|s| s.batch).map(|b| (x(b, WARPS_PER_BLOCK), 1, z)),
        col_factor: fac(&|s| s.batch * s.cols).map(|n| (x(n, BLOCK as u64), 1, z)),
        phase3: fac(&|s| s.units).map(|u| (x(u, WARPS_PER_BLOCK), 1, z)),
        phase4: (1, 1, z),
    }
}

/// Device addresses of a group's Adafactor state (0 where a buffer is empty or unused).
#[derive(Debug, Clone, Copy)]
pub struct AdafactorState {
    /// Row EMAs (`layout.row_total` floats).
    pub row_var: u64,
    /// Column EMAs (`layout.col_total` floats).
    pub col_var: u64,
    /// Unfactored second moments (`layout.variance_total` floats).
    pub variance: u64,
    /// Momentum (`table.total()` floats), required when `beta1 != 0`.
    pub exp_avg: u64,
}

/// What the workspace has on the device: the tensors its table describes.
#[derive(Debug, Clone, PartialEq)]
struct Uploaded {
    table: SegmentTable,
    layout: AdafactorLayout,
    tensors: Vec<usize>,
    segs: Vec<AdafactorSegment>,
}

/// The scratch's key: what it was sized for.
#[derive(Debug, Clone, PartialEq)]
struct ScratchKey {
    table: SegmentTable,
    layout: AdafactorLayout,
    /// Sized for the empty tensors a sharded step keeps.
    with_empty: bool,
}

/// A param group's device table and scratch, kept from step to step.
#[derive(Debug)]
pub struct AdafactorWorkspace {
    memory: DeviceMemory,
    scratch: Option<(ScratchLayout, ScratchKey)>,
    uploaded: Option<Uploaded>,
}

impl AdafactorWorkspace {
    /// An empty workspace for device `ordinal`; memory comes with the first step.
    pub fn new(ordinal: i32) -> Self {
        AdafactorWorkspace { memory: DeviceMemory::new(ordinal), scratch: None, uploaded: None }
    }

    /// The scratch layout for all of `table`'s tensors (any stepped subset fits in it; with
    /// `shards`, also their empty tensors), and the device address of the allocation holding it.
    fn scratch(
        &mut self,
        stream: usize,
        table: &SegmentTable,
        layout: &AdafactorLayout,
        shards: Option<&Shards<'_>>,
    ) -> Result<(ScratchLayout, u64), CudaError> {
        let key = ScratchKey { table: table.clone(), layout: layout.clone(), with_empty: shards.is_some() };
        if !matches!(&self.scratch, Some((_, k)) if *k == key) {
            let sizes = pack(table, layout, &vec![true; table.len()], None, shards).sizes;
            self.scratch = Some((sizes.layout(), key));
            self.uploaded = None;
        }
        let sl = self.scratch.as_ref().map(|(sl, _)| *sl).expect("set above");
        let base = self.memory.ensure(stream, sl.bytes)?;
        Ok((sl, base))
    }
}

/// One Adafactor step of a CUDA param group, launched on `group.stream`: the core's
/// `adafactor_step` on the device (see the module docs for what the host does per step).
///
/// Tensors with `stepped[i]` are updated with their own step count, which is advanced on the
/// host; nothing changes when an error is returned before the first launch.
#[allow(clippy::too_many_arguments)]
pub fn adafactor_step(
    ws: &mut AdafactorWorkspace,
    group: DeviceGroup<'_>,
    table: &SegmentTable,
    layout: &AdafactorLayout,
    stepped: &[bool],
    steps: &mut [f64],
    state: AdafactorState,
    hp: &AdafactorHyper,
    rounding: Rounding,
) -> Result<(), CudaError> {
    run(ws, group, table, layout, stepped, StepCounts::Host(steps), state, hp, rounding, None)
}

/// A counted Adafactor step (torch's `capturable=True`): as [`adafactor_step`], with each
/// tensor's step count and the learning rate read on the device (see [`DeviceCounts`]):
/// `adafactor_set_segments_counted` takes and advances the counts and computes the beta2
/// weights, phase 4 reads the learning rate; `hp.lr` is ignored.
#[allow(clippy::too_many_arguments)]
pub fn adafactor_step_counted(
    ws: &mut AdafactorWorkspace,
    group: DeviceGroup<'_>,
    table: &SegmentTable,
    layout: &AdafactorLayout,
    stepped: &[bool],
    counts: DeviceCounts,
    state: AdafactorState,
    hp: &AdafactorHyper,
    rounding: Rounding,
) -> Result<(), CudaError> {
    run(ws, group, table, layout, stepped, StepCounts::Device(counts), state, hp, rounding, None)
}

/// The sums a sharded step has the ranks add: a device vector of f64 and the all-reduce.
pub struct Exchange<'a> {
    /// Device address of the vector (`capacity` f64, at least the step's
    /// [`ExchangeLayout::len`]; the contents need not be initialised).
    pub addr: u64,
    /// Its length in f64.
    pub capacity: usize,
    /// `sum(first, count)` replaces elements `first .. first + count` of the vector with their
    /// sums over the ranks, in stream order on the step's stream (an all-reduce that the work
    /// queued so far precedes and the work queued afterwards follows). Called twice per step, with
    /// the same ranges on every rank.
    pub sum: &'a mut dyn FnMut(usize, usize) -> Result<(), String>,
}

/// One Adafactor step of the local shards of a CUDA param group whose tensors are spread over
/// several ranks: the core's `adafactor_step_sharded` on the device. What spans ranks (see
/// cuda/adafactor.cu, "Shards") is packed into `exchange` by the kernels and summed by
/// `exchange.sum` between launches, twice per step; the host never reads it.
///
/// A failure of `exchange.sum` is returned with the step half done (state updated up to that
/// point, parameters not; step counts advanced), as a failed collective leaves any distributed
/// step.
#[allow(clippy::too_many_arguments)]
pub fn adafactor_step_sharded(
    ws: &mut AdafactorWorkspace,
    group: DeviceGroup<'_>,
    table: &SegmentTable,
    layout: &AdafactorLayout,
    stepped: &[bool],
    steps: &mut [f64],
    state: AdafactorState,
    hp: &AdafactorHyper,
    rounding: Rounding,
    shards: &Shards<'_>,
    exchange: Exchange<'_>,
) -> Result<(), CudaError> {
    run(ws, group, table, layout, stepped, StepCounts::Host(steps), state, hp, rounding, Some((shards, exchange)))
}

#[allow(clippy::too_many_arguments)]
fn run(
    ws: &mut AdafactorWorkspace,
    group: DeviceGroup<'_>,
    table: &SegmentTable,
    layout: &AdafactorLayout,
    stepped: &[bool],
    counts: StepCounts<'_>,
    state: AdafactorState,
    hp: &AdafactorHyper,
    rounding: Rounding,
    sharded: Option<(&Shards<'_>, Exchange<'_>)>,
) -> Result<(), CudaError> {
    hp.validate()?;
    if let StepCounts::Device(dc) = &counts {
        dc.check(table)?;
    }
    let fresh = AdafactorLayout::new(table, &layout.factored)?;
    if fresh != *layout {
        return Err(CudaError::invalid("the Adafactor layout does not belong to this table"));
    }
    group.check(table, stepped)?;
    let shards = sharded.as_ref().map(|(s, _)| *s);
    if let Some(sh) = shards {
        sh.check(table, layout)?;
    }
    let momentum = hp.beta1 != 0.0;
    // Empty buffers may be null (torch's data pointer of an empty tensor is 0).
    for (name, addr, len) in [
        ("row_var", state.row_var, layout.row_total),
        ("col_var", state.col_var, layout.col_total),
        ("variance", state.variance, layout.variance_total),
        ("exp_avg", state.exp_avg, if momentum { table.total() } else { 0 }),
    ] {
        if len > 0 && addr == 0 {
            return Err(CudaError::invalid(format!("null device pointer for {name} ({len} elements)")));
        }
    }
    let stream = group.stream;
    let (sl, base) = ws.scratch(stream, table, layout, shards)?;
    let packed = pack(table, layout, stepped, group.draws, shards);
    let mut exchange = None;
    if let Some((_, ex)) = sharded {
        let need = packed.exchange.len();
        if need > 0 && (ex.addr == 0 || ex.capacity < need) {
            return Err(CudaError::invalid(format!(
                "the exchange vector holds {} f64 at {:#x}; this step exchanges {need}",
                ex.capacity, ex.addr
            )));
        }
        exchange = Some(ex);
    }
    let current = matches!(&ws.uploaded, Some(u) if u.segs == packed.segs && u.table == *table && u.layout == *layout);
    if !current {
        // SAFETY: the table region holds one entry per tensor of the table, at least segs.len().
        unsafe { upload(stream, base + sl.table as u64, &packed.segs, "uploading the Adafactor segment table")? };
        ws.uploaded =
            Some(Uploaded { table: table.clone(), layout: layout.clone(), tensors: packed.tensors, segs: packed.segs });
    }
    let up = ws.uploaded.as_ref().expect("uploaded above");
    let (host_steps, counted): (&[f64], Option<DeviceCounts>) = match counts {
        StepCounts::Host(steps) => {
            table.plan_step(stepped, steps)?;
            (steps, None)
        }
        StepCounts::Device(dc) => {
            // Stepped tensors that no segment holds (no elements) count too.
            let mut rest = stepped.to_vec();
            for &i in &up.tensors {
                rest[i] = false;
            }
            // SAFETY: `dc.counters` holds one f64 per tensor (the caller's promise; checked non-null).
            unsafe { advance_counters(group.ordinal, group.stream, dc.counters, &rest)? };
            (&[], Some(dc))
        }
    };
    if up.segs.is_empty() {
        return Ok(());
    }
    let ordinal = group.ordinal;
    let sms = sm_count(ordinal)?;
    let seg_addr = |j: usize| base + (sl.table + j * std::mem::size_of::<AdafactorSegment>()) as u64;
    let scal_addr = |j: usize| base + (sl.scalars + j * std::mem::size_of::<AdafactorScalars>()) as u64;
    let (row_sq, col_part) = (base + sl.row_sq as u64, base + sl.col_part as u64);
    let (param_sq, update_sq, row_mean) =
        (base + sl.param_sq as u64, base + sl.update_sq as u64, base + sl.row_mean as u64);

    match &counted {
        None => {
            for update in segment_updates(&group, &up.tensors, host_steps, |step| (1.0 - hp.beta2_at(step)) as f32) {
                let mut a = Args::new().push(base + sl.table as u64).push(update);
                // SAFETY: matches adafactor_set_segments; the segments lie inside the uploaded table.
                unsafe {
                    launch_grid(
                        ordinal,
                        stream,
                        "adafactor.cu",
                        "adafactor_set_segments",
                        (1, 1, 1),
                        &mut a.pointers(),
                    )?
                };
            }
        }
        Some(dc) => {
            let beta2 = Beta2Schedule::of(hp.beta2);
            for update in segment_counted_updates(&group, &up.tensors) {
                let mut a = Args::new().push(base + sl.table as u64).push(dc.counters).push(update).push(beta2);
                // SAFETY: matches adafactor_set_segments_counted; the segments lie inside the
                // uploaded table, the counters hold one f64 per tensor.
                unsafe {
                    let name = "adafactor_set_segments_counted";
                    launch_grid(ordinal, stream, "adafactor.cu", name, (1, 1, 1), &mut a.pointers())?
                };
            }
        }
    }

    let sfx = group.dtype.suffix();
    let (p1, colsum, p3, p5) = (
        format!("adafactor_phase1_{sfx}"),
        format!("adafactor_colsum_{sfx}"),
        format!("adafactor_phase3_{sfx}"),
        format!("adafactor_phase5_{sfx}"),
    );
    let sign = if hp.maximize { -1.0f32 } else { 1.0 };
    let add_eps = hp.eps1.unwrap_or(0.0) as f32;
    let clamp_eps = if hp.eps1.is_none() { f32::EPSILON } else { 0.0 };
    let khp = KernelHyper::new(hp, counted.map_or(LrSource::value(hp.lr), |dc| dc.lr));
    let (seed, stream_id, mode) = rounding_args(rounding);
    // Only the relative step scales by the parameters' RMS: without it phase 1 reads no
    // parameters, as on the CPU.
    let sum_param = hp.relative_step as u32;
    let st = state;
    let ex_addr = exchange.as_ref().map_or(0, |e| e.addr);
    let launch = |name: &str, grid, args: Args| {
        let mut args = args;
        // SAFETY: every argument list below matches its kernel in cuda/adafactor.cu; the table,
        // scratch and state buffers are sized for the table's tensors, the exchange for the step.
        unsafe { launch_grid(ordinal, stream, "adafactor.cu", name, grid, &mut args.pointers()) }
    };
    // Each stage runs over every slice of at most MAX_GRID_Z segments before the next: the
    // exchange between stages needs every segment's sums.
    let slices: Vec<(usize, PhaseGrids)> = (0..up.segs.len())
        .step_by(MAX_GRID_Z)
        .map(|first| (first, phase_grids(&up.segs[first..(first + MAX_GRID_Z).min(up.segs.len())], sms)))
        .collect();
    let each = |stage: &dyn Fn(u64, usize, &PhaseGrids) -> Result<(), CudaError>| {
        slices.iter().try_for_each(|(first, g)| stage(seg_addr(*first), *first, g))
    };
    let ema = |part: u32| {
        move |segs: u64, _: usize, g: &PhaseGrids| match g.ema {
            Some(grid) => {
                let a = Args::new().push(st.row_var).push(st.col_var).push(segs).push(row_sq).push(col_part);
                launch("adafactor_phase2_ema", grid, a.push(ex_addr).push(part).push(add_eps))
            }
            None => Ok(()),
        }
    };
    let pack_sums = |stage: u32| {
        move |segs: u64, _: usize, g: &PhaseGrids| {
            let a = Args::new().push(segs).push(param_sq).push(update_sq).push(st.row_var).push(col_part);
            launch("adafactor_pack_sums", g.phase4, a.push(ex_addr).push(stage))
        }
    };
    let (ex_first, ex_second) = (packed.exchange.first, packed.exchange.second);
    let is_sharded = exchange.is_some();
    let mut sum_across = |first: usize, count: usize| -> Result<(), CudaError> {
        match exchange.as_mut() {
            Some(ex) if count > 0 => (ex.sum)(first, count)
                .map_err(|e| CudaError::Device(format!("the sum across ranks of the Adafactor statistics: {e}"))),
            _ => Ok(()),
        }
    };

    each(&|segs, _, g| {
        let a = Args::new().push(sum_param).push(st.variance).push(segs).push(row_sq).push(param_sq);
        launch(&p1, g.units, a.push(update_sq).push(sign).push(add_eps).push(clamp_eps))?;
        if let Some(grid) = g.colsum {
            launch(&colsum, grid, Args::new().push(segs).push(col_part))?;
        }
        Ok(())
    })?;
    if is_sharded {
        each(&ema(EMA_ROWS))?;
        each(&pack_sums(1))?;
        sum_across(0, ex_first)?;
        each(&ema(EMA_COLS))?;
    } else {
        each(&ema(EMA_ROWS | EMA_COLS))?;
    }
    each(&|segs, _, g| {
        if let Some(grid) = g.row_mean {
            let a = Args::new().push(st.row_var).push(segs).push(ex_addr).push(row_mean).push(clamp_eps);
            launch("adafactor_row_mean", grid, a)?;
        }
        if let Some(grid) = g.col_factor {
            let a = Args::new().push(st.col_var).push(row_mean).push(segs).push(col_part);
            launch("adafactor_col_factor", grid, a)?;
        }
        if let Some(grid) = g.phase3 {
            let a = Args::new().push(st.row_var).push(col_part).push(row_sq).push(segs);
            launch(&p3, grid, a.push(update_sq).push(sign).push(clamp_eps))?;
        }
        Ok(())
    })?;
    if is_sharded {
        each(&pack_sums(2))?;
        sum_across(ex_first, ex_second)?;
    }
    each(&|segs, first, g| {
        let a = Args::new().push(segs).push(param_sq).push(update_sq).push(ex_addr).push(khp);
        launch("adafactor_phase4", g.phase4, a.push(scal_addr(first)))?;
        let a = Args::new().push(st.variance).push(st.row_var).push(col_part);
        let a = a.push(row_sq).push(st.exp_avg).push(segs).push(scal_addr(first)).push(sign).push(clamp_eps);
        let a = a.push(momentum as u32).push(hp.beta1 as f32).push(seed).push(stream_id).push(mode);
        launch(&p5, g.units, a)
    })
}

/// cuda/adafactor.cu `EMA_ROWS`: `adafactor_phase2_ema` updates the row EMAs.
const EMA_ROWS: u32 = 1;
/// cuda/adafactor.cu `EMA_COLS`: `adafactor_phase2_ema` updates the column EMAs.
const EMA_COLS: u32 = 2;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::SOURCES;
    use std::mem::{align_of, offset_of, size_of};

    fn source() -> &'static str {
        SOURCES.iter().find(|(f, _)| *f == "adafactor.cu").map(|(_, s)| *s).unwrap()
    }

    /// (field, Rust offset) of every field of the device structs, for the C++ side to check.
    pub(crate) fn field_offsets() -> Vec<(&'static str, &'static str, usize)> {
        vec![
            ("AdafactorSegment", "offset", offset_of!(AdafactorSegment, offset)),
            ("AdafactorSegment", "numel", offset_of!(AdafactorSegment, numel)),
            ("AdafactorSegment", "batch", offset_of!(AdafactorSegment, batch)),
            ("AdafactorSegment", "rows", offset_of!(AdafactorSegment, rows)),
            ("AdafactorSegment", "cols", offset_of!(AdafactorSegment, cols)),
            ("AdafactorSegment", "row_offset", offset_of!(AdafactorSegment, row_offset)),
            ("AdafactorSegment", "col_offset", offset_of!(AdafactorSegment, col_offset)),
            ("AdafactorSegment", "var_offset", offset_of!(AdafactorSegment, var_offset)),
            ("AdafactorSegment", "unit_offset", offset_of!(AdafactorSegment, unit_offset)),
            ("AdafactorSegment", "units", offset_of!(AdafactorSegment, units)),
            ("AdafactorSegment", "colpart_offset", offset_of!(AdafactorSegment, colpart_offset)),
            ("AdafactorSegment", "row_tiles", offset_of!(AdafactorSegment, row_tiles)),
            ("AdafactorSegment", "mean_offset", offset_of!(AdafactorSegment, mean_offset)),
            ("AdafactorSegment", "step", offset_of!(AdafactorSegment, step)),
            ("AdafactorSegment", "weight2", offset_of!(AdafactorSegment, weight2)),
            ("AdafactorSegment", "factored", offset_of!(AdafactorSegment, factored)),
            ("AdafactorSegment", "param", offset_of!(AdafactorSegment, param)),
            ("AdafactorSegment", "grad", offset_of!(AdafactorSegment, grad)),
            ("AdafactorSegment", "draw", offset_of!(AdafactorSegment, draw)),
            ("AdafactorSegment", "whole_numel", offset_of!(AdafactorSegment, whole_numel)),
            ("AdafactorSegment", "whole_rows", offset_of!(AdafactorSegment, whole_rows)),
            ("AdafactorSegment", "exchange", offset_of!(AdafactorSegment, exchange)),
            ("AdafactorSegment", "exchange2", offset_of!(AdafactorSegment, exchange2)),
            ("AdafactorSegment", "split", offset_of!(AdafactorSegment, split)),
            ("AdafactorSegment", "pad", offset_of!(AdafactorSegment, pad)),
            ("SegmentUpdate", "param", offset_of!(SegmentUpdate, param)),
            ("SegmentUpdate", "grad", offset_of!(SegmentUpdate, grad)),
            ("SegmentUpdate", "step", offset_of!(SegmentUpdate, step)),
            ("SegmentUpdate", "weight2", offset_of!(SegmentUpdate, weight2)),
            ("SegmentUpdate", "first", offset_of!(SegmentUpdate, first)),
            ("SegmentUpdate", "count", offset_of!(SegmentUpdate, count)),
            ("SegmentCountedUpdate", "param", offset_of!(SegmentCountedUpdate, param)),
            ("SegmentCountedUpdate", "grad", offset_of!(SegmentCountedUpdate, grad)),
            ("SegmentCountedUpdate", "tensor", offset_of!(SegmentCountedUpdate, tensor)),
            ("SegmentCountedUpdate", "first", offset_of!(SegmentCountedUpdate, first)),
            ("SegmentCountedUpdate", "count", offset_of!(SegmentCountedUpdate, count)),
            ("Beta2Schedule", "value", offset_of!(Beta2Schedule, value)),
            ("Beta2Schedule", "decay", offset_of!(Beta2Schedule, decay)),
            ("AdafactorHyper", "lr", offset_of!(KernelHyper, lr)),
            ("AdafactorHyper", "eps2", offset_of!(KernelHyper, eps2)),
            ("AdafactorHyper", "clip_threshold", offset_of!(KernelHyper, clip_threshold)),
            ("AdafactorHyper", "weight_decay", offset_of!(KernelHyper, weight_decay)),
            ("AdafactorHyper", "relative_step", offset_of!(KernelHyper, relative_step)),
            ("AdafactorHyper", "cap_lr_at_inv_sqrt_step", offset_of!(KernelHyper, cap_lr_at_inv_sqrt_step)),
            ("AdafactorHyper", "momentum", offset_of!(KernelHyper, momentum)),
            ("AdafactorHyper", "pad", offset_of!(KernelHyper, pad)),
            ("AdafactorScalars", "scale", offset_of!(AdafactorScalars, scale)),
            ("AdafactorScalars", "neg_alpha", offset_of!(AdafactorScalars, neg_alpha)),
            ("AdafactorScalars", "decay", offset_of!(AdafactorScalars, decay)),
            ("AdafactorScalars", "pad", offset_of!(AdafactorScalars, pad)),
            ("AdafactorScalars", "param_sq", offset_of!(AdafactorScalars, param_sq)),
            ("AdafactorScalars", "update_sq", offset_of!(AdafactorScalars, update_sq)),
        ]
    }

    #[test]
    fn structs_have_the_documented_layout() {
        assert_eq!((size_of::<AdafactorSegment>(), align_of::<AdafactorSegment>()), (184, 8));
        assert_eq!((size_of::<SegmentUpdate>(), align_of::<SegmentUpdate>()), (2696, 8));
        assert_eq!((size_of::<KernelHyper>(), align_of::<KernelHyper>()), (64, 8));
        assert_eq!((size_of::<SegmentCountedUpdate>(), align_of::<SegmentCountedUpdate>()), (1928, 8));
        assert_eq!((size_of::<Beta2Schedule>(), align_of::<Beta2Schedule>()), (16, 8));
        assert_eq!((size_of::<AdafactorScalars>(), align_of::<AdafactorScalars>()), (32, 8));
        let src = source();
        assert!(src.contains("sizeof(AdafactorSegment) == 184 && alignof(AdafactorSegment) == 8"));
        for (name, value) in
            [("SPLIT_WHOLE", SPLIT_WHOLE), ("SPLIT_ELEMENTS", SPLIT_ELEMENTS), ("SPLIT_ROWS", SPLIT_ROWS)]
                .into_iter()
                .chain([("EMA_ROWS", EMA_ROWS), ("EMA_COLS", EMA_COLS)])
        {
            assert!(src.contains(&format!("#define {name} {value}u")), "{name} is {value} in adafactor.cu");
        }
        assert!(src.contains("sizeof(SegmentUpdate) == 2696 && alignof(SegmentUpdate) == 8"));
        assert!(src.contains(&format!("#define UPDATE_SEGMENTS {UPDATE_SEGMENTS}u")));
        assert!(src.contains("sizeof(AdafactorHyper) == 64 && alignof(AdafactorHyper) == 8"));
        assert!(src.contains("sizeof(SegmentCountedUpdate) == 1928 && alignof(SegmentCountedUpdate) == 8"));
        assert!(src.contains("sizeof(AdafactorScalars) == 32 && alignof(AdafactorScalars) == 8"));
        // The offsets listed in the source's layout comments are the Rust offsets.
        for (strct, field, off) in field_offsets() {
            let documented = src.lines().any(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                words.windows(2).any(|w| w[0] == "offset" && w[1] == off.to_string())
                    && words.iter().any(|w| w.split('[').next() == Some(field))
            });
            assert!(documented, "{strct}.{field} at {off} is not documented at that offset in adafactor.cu");
        }
        assert!(src.contains(&format!("#define ADAFACTOR_UNIT {UNIT}u")));
    }

    /// NVRTC checks every field offset against the kernels' own struct definitions (no GPU
    /// needed; skipped when NVRTC cannot be loaded). NVRTC has no compile-time `offsetof`, so
    /// each field gets a probe kernel that stores only if the device offset differs from the
    /// Rust one: constant folding leaves a store in the PTX exactly for the mismatches.
    #[test]
    fn kernel_structs_match_the_rust_offsets_under_nvrtc() {
        if !crate::compile::nvrtc_available() {
            eprintln!("skipped: NVRTC not loadable in this process");
            return;
        }
        let fields = field_offsets();
        let mut src = crate::kernels::with_header(source());
        for (k, (strct, field, off)) in fields.iter().enumerate() {
            src.push_str(&format!(
                "extern \"C\" __global__ void layout_probe_{k}(u32* out, const {strct}* p) {{\n\
                 if ((const char*)&p->{field} - (const char*)p != {off}) out[0] = 1u;\n}}\n"
            ));
        }
        let ptx = crate::compile::compile_source("adafactor_layout_check.cu", &src, "sm_80", crate::CompileTarget::Ptx)
            .unwrap_or_else(|e| panic!("{e}"));
        let ptx = String::from_utf8_lossy(&ptx);
        let mut probed = 0;
        for entry in ptx.split(".entry").skip(1) {
            let name = entry.split('(').next().unwrap_or("").trim();
            let Some(k) = name.strip_prefix("layout_probe_").and_then(|k| k.parse::<usize>().ok()) else { continue };
            let body = entry.split('{').nth(1).unwrap_or("");
            let (strct, field, off) = fields[k];
            assert!(!body.contains("st."), "{strct}.{field}: the device offset is not the Rust offset {off}");
            probed += 1;
        }
        assert_eq!(probed, fields.len(), "every probe kernel is in the PTX");
    }

    #[test]
    fn packing_skips_unstepped_and_empty_tensors_and_packs_scratch() {
        // [2, 130, 200] factored, a vector of 5000, an empty tensor, [1, 3, 4] unfactored, [1, 70, 8] factored.
        let table =
            SegmentTable::with_matrices(&[[2, 130, 200], [1, 1, 5000], [1, 0, 4], [1, 3, 4], [1, 70, 8]]).unwrap();
        let layout = AdafactorLayout::new(&table, &[true, false, false, false, true]).unwrap();
        let Packed { segs, tensors, sizes, exchange } =
            pack(&table, &layout, &[true, true, true, false, true], None, None);
        assert_eq!(exchange, ExchangeLayout::default());
        assert_eq!(tensors, [0, 1, 4]);
        let (a, b, c) = (segs[0], segs[1], segs[2]);
        assert_eq!((a.offset, a.numel, a.batch, a.rows, a.cols, a.factored), (0, 52000, 2, 130, 200, 1));
        assert_eq!((a.units, a.unit_offset, a.row_tiles, a.colpart_offset, a.mean_offset), (260, 0, 3, 0, 0));
        assert_eq!((a.row_offset, a.col_offset), (0, 0));
        assert_eq!((b.offset, b.numel, b.factored, b.units, b.unit_offset, b.var_offset), (52000, 5000, 0, 2, 260, 0));
        assert_eq!((c.offset, c.units, c.unit_offset, c.row_tiles), (57012, 70, 262, 2));
        assert_eq!((c.row_offset, c.col_offset, c.colpart_offset, c.mean_offset), (260, 400, 2 * 3 * 200, 2));
        assert!(segs.iter().all(|s| s.step == 0 && s.weight2 == 0.0));
        assert_eq!(sizes, ScratchSizes { segments: 3, row_sq: 330, col_part: 1200 + 16, units: 332, row_mean: 3 });
        // Every stepped subset fits in the scratch of the whole table.
        let all = pack(&table, &layout, &[true; 5], None, None).sizes;
        assert!(all.units >= sizes.units && all.col_part >= sizes.col_part && all.row_mean >= sizes.row_mean);
        assert!(all.segments >= sizes.segments && all.row_sq == sizes.row_sq);
    }

    #[test]
    fn sharded_packing_keeps_empty_shards_and_lays_out_the_exchange() {
        // A row-split [1, 3, 5] matrix, an element-split vector with no local elements, a
        // replicated matrix and a row-split matrix with no local rows.
        let table = SegmentTable::with_matrices(&[[1, 3, 5], [1, 1, 0], [1, 4, 4], [1, 0, 6]]).unwrap();
        let layout = AdafactorLayout::new(&table, &[true, false, true, true]).unwrap();
        let split = [Split::Rows, Split::Elements, Split::Whole, Split::Rows];
        let shards = Shards { split: &split, numels: &[35, 9, 16, 60], rows: &[7, 1, 4, 10] };
        let p = pack(&table, &layout, &[true; 4], None, Some(&shards));
        assert_eq!(p.tensors, [0, 1, 2, 3]);
        let fields: Vec<_> =
            p.segs.iter().map(|s| (s.split, s.whole_numel, s.whole_rows, s.exchange, s.exchange2)).collect();
        assert_eq!(
            fields,
            [
                (SPLIT_ROWS, 35, 7, 0, 16),
                (SPLIT_ELEMENTS, 9, 1, 7, 17),
                (SPLIT_WHOLE, 16, 4, 0, 0),
                (SPLIT_ROWS, 60, 10, 8, 18)
            ]
        );
        assert_eq!(p.exchange, ExchangeLayout { first: 16, second: 3 });
        // The empty row-split matrix keeps its column partials (one tile) and its row mean.
        assert_eq!((p.segs[3].units, p.segs[3].row_tiles, p.segs[3].colpart_offset), (0, 1, 5 + 4));
        // Without shards the empty tensors are left out.
        assert_eq!(pack(&table, &layout, &[true; 4], None, None).tensors, [0, 2]);
    }

    #[test]
    fn scratch_layout_is_aligned_and_disjoint() {
        let sizes = ScratchSizes { segments: 3, row_sq: 330, col_part: 1216, units: 332, row_mean: 3 };
        let l = sizes.layout();
        let starts = [l.table, l.scalars, l.row_sq, l.col_part, l.param_sq, l.update_sq, l.row_mean, l.bytes];
        let lens = [3 * 144, 3 * 32, 330 * 8, 1216 * 8, 332 * 8, 332 * 8, 3 * 4];
        for k in 0..7 {
            assert_eq!(starts[k] % 256, 0);
            assert!(starts[k] + lens[k] <= starts[k + 1], "sub-buffer {k} overlaps the next");
        }
        assert_eq!(ScratchSizes::default().layout().bytes, 0);
    }

    #[test]
    fn row_tiles_depend_on_rows_only() {
        assert_eq!([1, 64, 65, 128, 4096, 4097, 1 << 20].map(row_tiles), [1, 1, 2, 2, 64, 64, 64]);
    }

    #[test]
    fn segment_updates_carry_each_tensors_addresses_and_step() {
        let n = 100;
        let (params, grads): (Vec<u64>, Vec<u64>) = (0..n as u64).map(|i| (0x1000 * (i + 1), 0x80000 + 8 * i)).unzip();
        let group = DeviceGroup {
            ordinal: 0,
            stream: 0,
            dtype: crate::dispatch::DeviceDtype::F32,
            params: &params,
            grads: &grads,
            draws: None,
        };
        // Segments are tensors 1, 3, 5, ... (the stepped ones); tensor i has taken i + 1 steps.
        let tensors: Vec<usize> = (1..n).step_by(2).chain(std::iter::once(0)).collect();
        let steps: Vec<f64> = (0..n).map(|i| (i + 1) as f64).collect();
        let ups = segment_updates(&group, &tensors, &steps, |step| step as f32 / 100.0);
        assert_eq!(ups.len(), 1);
        let up = &ups[0];
        assert_eq!((up.first, up.count), (0, 51));
        assert_eq!((up.param[0], up.grad[0], up.step[0], up.weight2[0]), (0x2000, 0x80008, 2, 0.02));
        assert_eq!((up.param[50], up.step[50]), (0x1000, 1));
        let tensors: Vec<usize> = (0..n).collect();
        let ups = segment_updates(&group, &tensors, &steps, |_| 0.5);
        assert_eq!(ups.iter().map(|u| (u.first, u.count)).collect::<Vec<_>>(), vec![(0, 96), (96, 4)]);
        assert_eq!(ups[1].param[3], 0x1000 * 100);
    }

    #[test]
    fn grids_cover_the_largest_segment_and_skip_idle_phases() {
        let table = SegmentTable::with_matrices(&[[2, 130, 200], [1, 1, 50000]]).unwrap();
        let layout = AdafactorLayout::new(&table, &[true, false]).unwrap();
        let segs = pack(&table, &layout, &[true, true], None, None).segs;
        let g = phase_grids(&segs, 132);
        assert_eq!(g.units, (260u64.div_ceil(8) as u32, 1, 2));
        assert_eq!(g.colsum, Some((1, 6, 2)));
        assert_eq!(g.ema, Some((660u64.div_ceil(256) as u32, 1, 2)));
        assert_eq!(g.row_mean, Some((1, 1, 2)));
        assert_eq!(g.col_factor, Some((400u64.div_ceil(256) as u32, 1, 2)));
        assert_eq!(g.phase3, Some((33, 1, 2)));
        assert_eq!(g.phase4, (1, 1, 2));
        // Only unfactored: the factored phases are not launched.
        let g = phase_grids(&segs[1..], 132);
        assert_eq!((g.units, g.colsum, g.ema, g.row_mean, g.phase3), ((2, 1, 1), None, None, None, None));
        assert_eq!(g.col_factor, None);
        // Huge tensors: x is capped (grid-stride loops), y at the hardware limit.
        let big = AdafactorSegment {
            units: 1 << 30,
            factored: 1,
            batch: 1 << 20,
            rows: 4096,
            cols: 1 << 20,
            row_tiles: 64,
            ..Default::default()
        };
        let g = phase_grids(&[big], 2);
        assert_eq!(g.units, (16, 1, 1));
        assert_eq!(g.colsum, Some((16, 65535, 1)));
    }

    #[test]
    fn kernel_hyper_flags() {
        let hp = AdafactorHyper { beta1: 0.9, relative_step: false, ..AdafactorHyper::default() };
        let k = KernelHyper::new(&hp, LrSource::value(hp.lr));
        assert_eq!((k.relative_step, k.cap_lr_at_inv_sqrt_step, k.momentum, k.pad), (0, 1, 1, 0));
        assert_eq!(k.lr, LrSource::value(hp.lr));
    }
}
