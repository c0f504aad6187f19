//! Muon on the device: rust/core/src/rules/muon.rs `muon_step` with the elementwise parts in
//! cuda/muon.cu and the Newton-Schulz products in cuBLAS.
//!
//! For each matrix `W` (rows x cols) with gradient `G`, momentum buffer `B`,
//! `s = min(rows, cols)`, `l = max(rows, cols)`:
//!
//! ```text
//! B = lerp(B, sign G, 1 - momentum); U = lerp(sign G, B, momentum) (Nesterov) or B
//! X = U, or U^T when rows > cols              s x l (never formed: a change of cuBLAS operands)
//! X = X / max(||X||_F, eps)
//! repeat ns_steps:  A = X X^T;  P = b A + c A A^T + a I;  X = P X
//! W = W (1 - lr weight_decay) - lr f(rows, cols) X
//! ```
//!
//! Matrices of the same shape are orthogonalised together: one strided-batched product per
//! shape chunk (at most [`CHUNK_ELEMENTS`] elements, or one tensor's matrices, and at most 65535
//! matrices), the chunk's updates packed back to back in a workspace. The workspace lives from
//! step to step and grows only when a step needs more than any before it.
//!
//! With [`Inputs::Bf16`] the products take bf16 copies of their operands (rounded to nearest by
//! `round_nearest_f32_to_bf16`) and accumulate and store in f32; the iterate, the norm and the
//! polynomial's sums stay f32.

use crate::backend::backend;
use crate::compile::CudaError;
use crate::cublas::{Cublas, Gemm, Inputs};
use crate::dispatch::{
    advance_counters, launch_grid, round_to_bf16, rounding_args, sm_count, Args, DeviceCounts, DeviceGroup, LrSource,
    StepCounts,
};
use crate::launch::{grid_for, BLOCK};
use crate::memory::{aligned, DeviceMemory};
use smallbatch_core::driver::Rounding;
use smallbatch_core::newton_schulz::NewtonSchulz;
use smallbatch_core::rules::muon::{check_whole_shapes, MuonHyper};
use smallbatch_core::SegmentTable;

/// Most elements of one shape chunk (64 MiB of f32 per iterate buffer), unless one tensor's
/// matrices are larger.
pub const CHUNK_ELEMENTS: usize = 16 << 20;
/// Most matrices of one chunk: the kernels take the matrix index from `gridDim.y`.
pub const MAX_MATRICES: usize = 65535;
/// Elements per pass-1 block of the Frobenius norm (cuda/muon.cu `NORM_CHUNK`).
pub const NORM_CHUNK: usize = 16384;
/// Blocks per SM beyond which the grid-stride loops take over.
const BLOCKS_PER_SM: u64 = 8;

/// Matrices `first .. first + count` of tensor `tensor`, at element `slot` of its chunk's buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Tensor index in the table.
    pub tensor: usize,
    /// Index of the piece's first element in the group's index space (flat state, random bits).
    pub start: usize,
    /// One past its last element.
    pub end: usize,
    /// First element of the piece in the chunk's iterate buffers.
    pub slot: usize,
}

/// Same-shape matrices orthogonalised together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Rows of each matrix.
    pub rows: usize,
    /// Columns of each matrix.
    pub cols: usize,
    /// Matrices in the chunk.
    pub count: usize,
    /// Where they come from.
    pub pieces: Vec<Piece>,
}

impl Chunk {
    /// `min(rows, cols)`: the Gram matrix's side.
    pub fn small(&self) -> usize {
        self.rows.min(self.cols)
    }

    /// Elements of the iterate (`count` matrices).
    pub fn elements(&self) -> usize {
        self.count * self.rows * self.cols
    }

    /// Elements of the Gram and polynomial matrices (`count` of `s x s`).
    pub fn gram_elements(&self) -> usize {
        self.count * self.small() * self.small()
    }

    /// Pass-1 blocks of the norm per matrix.
    pub fn norm_parts(&self) -> usize {
        (self.rows * self.cols).div_ceil(NORM_CHUNK)
    }
}

/// The chunks of the stepped non-empty tensors: grouped by shape in order of first appearance,
/// each chunk at most [`CHUNK_ELEMENTS`] elements (a larger tensor is split by matrices, a
/// single larger matrix is a chunk of its own) and [`MAX_MATRICES`] matrices.
pub fn plan_chunks(table: &SegmentTable, stepped: &[bool]) -> Vec<Chunk> {
    let mut shapes: Vec<(usize, usize)> = Vec::new();
    let mut by_shape: Vec<Vec<usize>> = Vec::new();
    for (i, _) in stepped.iter().enumerate().filter(|(_, &on)| on) {
        if table.numels()[i] == 0 {
            continue;
        }
        let [_, r, c] = table.matrix(i);
        match shapes.iter().position(|&s| s == (r, c)) {
            Some(k) => by_shape[k].push(i),
            None => {
                shapes.push((r, c));
                by_shape.push(vec![i]);
            }
        }
    }
    let mut chunks = Vec::new();
    for ((rows, cols), tensors) in shapes.into_iter().zip(by_shape) {
        let mn = rows * cols;
        let per_chunk = (CHUNK_ELEMENTS / mn).clamp(1, MAX_MATRICES);
        let mut cur = Chunk { rows, cols, count: 0, pieces: Vec::new() };
        for i in tensors {
            let [batch, _, _] = table.matrix(i);
            let mut b = 0;
            while b < batch {
                if cur.count == per_chunk {
                    chunks.push(std::mem::replace(&mut cur, Chunk { rows, cols, count: 0, pieces: Vec::new() }));
                }
                let take = (per_chunk - cur.count).min(batch - b);
                let start = table.offsets()[i] + b * mn;
                cur.pieces.push(Piece { tensor: i, start, end: start + take * mn, slot: cur.count * mn });
                cur.count += take;
                b += take;
            }
        }
        if cur.count > 0 {
            chunks.push(cur);
        }
    }
    chunks
}

/// The three products of one Newton-Schulz step of a chunk, in cuBLAS's column-major terms, and
/// whether the update takes the iterate as its first operand.
///
/// The iterate buffer holds each matrix as the parameter stores it, row-major `rows x cols`. As
/// column-major data that is `X^T` (an `l x s` matrix, leading dimension `l`) when
/// `rows <= cols`, and `X` itself (`s x l`, leading dimension `s`) when `rows > cols`: either way
/// no transpose is ever copied. `A` and `P` are column-major `s x s`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NsProducts {
    /// `A = X X^T` (operands: iterate, iterate).
    pub gram: Gemm,
    /// `P = b P + c A A^T` (operands: A, A; P holds a copy of A before).
    pub poly: Gemm,
    /// `Y = P X` (operands: iterate then P when `update_iterate_first`, else P then iterate).
    pub update: Gemm,
    /// Operand order of `update`.
    pub update_iterate_first: bool,
}

/// The products of a chunk of `count` `rows x cols` matrices with coefficients `b`, `c`.
pub fn ns_products(rows: usize, cols: usize, count: usize, b: f32, c: f32) -> NsProducts {
    let (s, l) = (rows.min(cols), rows.max(cols));
    let base = Gemm {
        transa: false,
        transb: false,
        m: s,
        n: s,
        k: l,
        lda: s,
        ldb: s,
        ldc: s,
        stride_a: s * l,
        stride_b: s * l,
        stride_c: s * s,
        batch: count,
        alpha: 1.0,
        beta: 0.0,
    };
    let poly = Gemm { transa: false, transb: true, k: s, stride_a: s * s, stride_b: s * s, alpha: c, beta: b, ..base };
    if rows <= cols {
        NsProducts {
            // X X^T = (X^T)^T X^T with X^T the stored l x s matrix.
            gram: Gemm { transa: true, transb: false, lda: l, ldb: l, ..base },
            poly,
            // (P X)^T = X^T P^T: stored X^T times P transposed, into the l x s result.
            update: Gemm {
                transa: false,
                transb: true,
                m: l,
                n: s,
                k: s,
                lda: l,
                ldb: s,
                ldc: l,
                stride_a: s * l,
                stride_b: s * s,
                stride_c: s * l,
                ..base
            },
            update_iterate_first: true,
        }
    } else {
        NsProducts {
            gram: Gemm { transa: false, transb: true, ..base },
            poly,
            update: Gemm {
                m: s,
                n: l,
                k: s,
                lda: s,
                ldb: s,
                ldc: s,
                stride_a: s * s,
                stride_b: s * l,
                stride_c: s * l,
                ..base
            },
            update_iterate_first: false,
        }
    }
}

/// Byte offsets of the workspace's sub-buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MuonScratch {
    /// Iterate, first buffer (f32).
    pub x: usize,
    /// Iterate, second buffer (f32).
    pub y: usize,
    /// `A` (f32).
    pub gram: usize,
    /// `P` (f32).
    pub poly: usize,
    /// Norm partials (f64).
    pub partials: usize,
    /// Norm squares per matrix (f64).
    pub sums: usize,
    /// bf16 copy of the iterate (bf16 products only).
    pub x16: usize,
    /// bf16 copy of `A`, then of `P` (bf16 products only).
    pub gram16: usize,
    /// Total bytes.
    pub bytes: usize,
}

/// The workspace the largest of `chunks` needs, each sub-buffer aligned.
pub fn scratch_for(chunks: &[Chunk], inputs: Inputs) -> MuonScratch {
    let max = |f: &dyn Fn(&Chunk) -> usize| chunks.iter().map(f).max().unwrap_or(0);
    let xy = max(&|c| c.elements());
    let g = max(&|c| c.gram_elements());
    let parts = max(&|c| c.count * c.norm_parts());
    let count = max(&|c| c.count);
    let half = if inputs == Inputs::Bf16 { 2 } else { 0 };
    let mut at = 0;
    let mut take = |bytes: usize| {
        let start = at;
        at += aligned(bytes);
        start
    };
    let (x, y, gram, poly) = (take(xy * 4), take(xy * 4), take(g * 4), take(g * 4));
    let (partials, sums) = (take(parts * 8), take(count * 8));
    let (x16, gram16) = (take(xy * half), take(g * half));
    MuonScratch { x, y, gram, poly, partials, sums, x16, gram16, bytes: at }
}

/// A param group's Newton-Schulz workspace and cuBLAS handle, kept from step to step.
#[derive(Debug)]
pub struct MuonWorkspace {
    ordinal: i32,
    memory: DeviceMemory,
    cublas: Option<Cublas>,
}

impl MuonWorkspace {
    /// An empty workspace on device `ordinal`; memory and the cuBLAS handle come with the first step.
    pub fn new(ordinal: i32) -> Self {
        MuonWorkspace { ordinal, memory: DeviceMemory::new(ordinal), cublas: None }
    }
}

/// One Muon step of a CUDA param group on `group.stream` (see the module docs). `inputs` chooses
/// the products' input precision. Step counts advance on the host; nothing changes when an
/// error is returned before the first launch.
#[allow(clippy::too_many_arguments)]
pub fn muon_step(
    ws: &mut MuonWorkspace,
    group: DeviceGroup<'_>,
    table: &SegmentTable,
    stepped: &[bool],
    steps: &mut [f64],
    momentum_buffer: u64,
    hp: &MuonHyper,
    inputs: Inputs,
    rounding: Rounding,
) -> Result<(), CudaError> {
    run(ws, group, table, stepped, StepCounts::Host(steps), momentum_buffer, hp, inputs, rounding)
}

/// A counted Muon step (torch's `capturable=True`): as [`muon_step`], with each tensor's step
/// count (the Philox step of stochastic rounding) and the learning rate read on the device by
/// the apply kernels, and the counts advanced by the last launch (see [`DeviceCounts`]);
/// `hp.lr` is ignored.
#[allow(clippy::too_many_arguments)]
pub fn muon_step_counted(
    ws: &mut MuonWorkspace,
    group: DeviceGroup<'_>,
    table: &SegmentTable,
    stepped: &[bool],
    counts: DeviceCounts,
    momentum_buffer: u64,
    hp: &MuonHyper,
    inputs: Inputs,
    rounding: Rounding,
) -> Result<(), CudaError> {
    run(ws, group, table, stepped, StepCounts::Device(counts), momentum_buffer, hp, inputs, rounding)
}

#[allow(clippy::too_many_arguments)]
fn run(
    ws: &mut MuonWorkspace,
    group: DeviceGroup<'_>,
    table: &SegmentTable,
    stepped: &[bool],
    counts: StepCounts<'_>,
    momentum_buffer: u64,
    hp: &MuonHyper,
    inputs: Inputs,
    rounding: Rounding,
) -> Result<(), CudaError> {
    check_step(&group, table, stepped, momentum_buffer, hp)?;
    if let StepCounts::Device(dc) = &counts {
        dc.check(table)?;
    }
    if ws.ordinal != group.ordinal {
        return Err(CudaError::invalid(format!(
            "the Muon workspace is on device {}, the group on {}",
            ws.ordinal, group.ordinal
        )));
    }
    let stream = group.stream;
    let chunks = plan_chunks(table, stepped);
    let ns = ws.prepare(stream, &chunks, &hp.newton_schulz, inputs)?;
    let (host_steps, counted): (&[f64], Option<DeviceCounts>) = match counts {
        StepCounts::Host(steps) => {
            table.plan_step(stepped, steps)?;
            (steps, None)
        }
        StepCounts::Device(dc) => (&[], Some(dc)),
    };
    let k = Kernels::new(&group, table, hp, rounding)?;
    for chunk in &chunks {
        let x = ns.x();
        for p in &chunk.pieces {
            k.momentum(p.tensor, p.start, p.end, momentum_buffer, x + 4 * p.slot as u64)?;
        }
        let out = ns.orthogonalize(&mut ws.cublas, chunk)?;
        let factor = hp.adjust_lr.factor(chunk.rows, chunk.cols);
        for p in &chunk.pieces {
            let ortho = out + 4 * p.slot as u64;
            match &counted {
                None => {
                    k.apply(p.tensor, p.start, p.end, ortho, (-hp.lr * factor) as f32, host_steps[p.tensor] as u64)?
                }
                Some(dc) => k.apply_counted(p.tensor, p.start, p.end, ortho, dc, hp, factor)?,
            }
        }
    }
    if let Some(dc) = counted {
        // SAFETY: `dc.counters` holds one f64 per tensor (the caller's promise; checked non-null).
        unsafe { advance_counters(group.ordinal, stream, dc.counters, stepped)? };
    }
    Ok(())
}

/// The momentum outputs of a sharded step: a device vector of f32 and the exchange that
/// orthogonalises them.
pub struct ShardedUpdates<'a> {
    /// Device address of the vector (`capacity` f32, at least the local elements of the stepped
    /// tensors; the contents need not be initialised).
    pub addr: u64,
    /// Its length in f32.
    pub capacity: usize,
    /// Replaces the vector's `U` (every stepped tensor's local elements, back to back in tensor
    /// order, each row-major) with this rank's elements of the orthogonalised whole matrices, in
    /// stream order on the step's stream (e.g. by gathering each matrix to one rank,
    /// orthogonalising it there with [`orthogonalize_many`], and scattering its rows back).
    pub orthogonalize: &'a mut dyn FnMut() -> Result<(), String>,
}

/// One Muon step of the local shards of a CUDA param group whose matrices are spread over
/// several ranks: the core's `muon_step_sharded` on the device. The momentum kernels write `U`
/// to `updates`, `updates.orthogonalize` turns it into this rank's part of the orthogonalised
/// whole matrices, and the apply kernels update the parameters from it; `whole[i]` is the
/// `(rows, cols)` of tensor `i`'s whole matrices, which scale its learning rate.
///
/// A failure of `updates.orthogonalize` is returned with the momentum buffers updated and the
/// parameters not (step counts advanced).
#[allow(clippy::too_many_arguments)]
pub fn muon_step_sharded(
    group: DeviceGroup<'_>,
    table: &SegmentTable,
    stepped: &[bool],
    steps: &mut [f64],
    momentum_buffer: u64,
    hp: &MuonHyper,
    rounding: Rounding,
    whole: &[(usize, usize)],
    updates: ShardedUpdates<'_>,
) -> Result<(), CudaError> {
    check_step(&group, table, stepped, momentum_buffer, hp)?;
    check_whole_shapes(table, stepped, whole)?;
    let taking_part: Vec<usize> = (0..table.len()).filter(|&i| stepped[i] && table.numels()[i] > 0).collect();
    let need: usize = taking_part.iter().map(|&i| table.numels()[i]).sum();
    if need > 0 && (updates.addr == 0 || updates.capacity < need) {
        return Err(CudaError::invalid(format!(
            "the updates vector holds {} f32 at {:#x}; this step's shards have {need} elements",
            updates.capacity, updates.addr
        )));
    }
    table.plan_step(stepped, steps)?;
    let k = Kernels::new(&group, table, hp, rounding)?;
    let mut slots = Vec::with_capacity(taking_part.len());
    let mut at = 0u64;
    for &i in &taking_part {
        let r = table.range(i);
        slots.push(updates.addr + 4 * at);
        k.momentum(i, r.start, r.end, momentum_buffer, updates.addr + 4 * at)?;
        at += r.len() as u64;
    }
    (updates.orthogonalize)().map_err(|e| CudaError::Device(format!("orthogonalising the sharded matrices: {e}")))?;
    for (&i, &slot) in taking_part.iter().zip(&slots) {
        let r = table.range(i);
        let neg_lr = (-hp.lr * hp.adjust_lr.factor(whole[i].0, whole[i].1)) as f32;
        k.apply(i, r.start, r.end, slot, neg_lr, steps[i] as u64)?;
    }
    Ok(())
}

/// What every Muon step checks before anything runs: the hyperparameters, the group's
/// addresses, and a momentum buffer for a group with elements.
fn check_step(
    group: &DeviceGroup<'_>,
    table: &SegmentTable,
    stepped: &[bool],
    momentum_buffer: u64,
    hp: &MuonHyper,
) -> Result<(), CudaError> {
    hp.validate()?;
    group.check(table, stepped)?;
    if momentum_buffer == 0 && table.total() > 0 {
        return Err(CudaError::invalid("null device pointer for momentum_buffer"));
    }
    Ok(())
}

/// Orthogonalises the f32 row-major matrices of `shapes`, back to back at device address `src`,
/// into the same places at `dst` (which may be `src`), on `stream` of the workspace's device:
/// the normalisation and Newton-Schulz iteration of [`muon_step`], the same bits for the same
/// matrices.
pub fn orthogonalize_many(
    ws: &mut MuonWorkspace,
    stream: usize,
    src: u64,
    dst: u64,
    shapes: &[(usize, usize)],
    ns: &NewtonSchulz,
    inputs: Inputs,
) -> Result<(), CudaError> {
    ns.validate()?;
    let matrices: Vec<[usize; 3]> = shapes.iter().map(|&(r, c)| [1, r, c]).collect();
    let table = SegmentTable::with_matrices(&matrices)?;
    if table.total() > 0 && (src == 0 || dst == 0) {
        return Err(CudaError::invalid("null device pointer for the matrices to orthogonalise"));
    }
    let chunks = plan_chunks(&table, &vec![true; table.len()]);
    let iter = ws.prepare(stream, &chunks, ns, inputs)?;
    for chunk in &chunks {
        let x = iter.x();
        for p in &chunk.pieces {
            // SAFETY: the piece lies inside `src` (the caller's matrices) and the chunk's slot
            // inside the workspace's iterate buffer; both are ordered on `stream`.
            unsafe { backend().copy(stream, x + 4 * p.slot as u64, src + 4 * p.start as u64, 4 * (p.end - p.start))? };
        }
        let out = iter.orthogonalize(&mut ws.cublas, chunk)?;
        for p in &chunk.pieces {
            // SAFETY: as above, the other way.
            unsafe {
                backend().copy(stream, dst + 4 * p.start as u64, out + 4 * p.slot as u64, 4 * (p.end - p.start))?
            };
        }
    }
    Ok(())
}

impl MuonWorkspace {
    /// Memory for the largest of `chunks` (and cuBLAS when products will run), ready to
    /// orthogonalise them on `stream`.
    fn prepare(
        &mut self,
        stream: usize,
        chunks: &[Chunk],
        ns: &NewtonSchulz,
        inputs: Inputs,
    ) -> Result<Iteration, CudaError> {
        let sl = scratch_for(chunks, inputs);
        let base = self.memory.ensure(stream, sl.bytes)?;
        if !chunks.is_empty() && ns.steps > 0 {
            backend().prepare_gemm(self.ordinal, stream, &mut self.cublas)?;
        }
        let cap = BLOCKS_PER_SM * sm_count(self.ordinal)? as u64;
        Ok(Iteration { ordinal: self.ordinal, stream, base, sl, cap, ns: *ns, inputs })
    }
}

/// The grid of a thread-per-element kernel over `n` elements, capped at `cap` blocks.
fn threads_grid(n: usize, cap: u64) -> u32 {
    (n as u64).div_ceil(BLOCK as u64).clamp(1, cap) as u32
}

/// Launches a kernel of cuda/muon.cu.
///
/// # Safety
/// `args` must match the kernel's parameters, and every address in them be a live buffer of
/// the sizes the kernel touches.
unsafe fn launch(ordinal: i32, stream: usize, name: &str, grid: (u32, u32, u32), args: Args) -> Result<(), CudaError> {
    let mut args = args;
    launch_grid(ordinal, stream, "muon.cu", name, grid, &mut args.pointers())
}

/// The normalisation and Newton-Schulz iteration of a chunk, in a workspace.
struct Iteration {
    ordinal: i32,
    stream: usize,
    base: u64,
    sl: MuonScratch,
    cap: u64,
    ns: NewtonSchulz,
    inputs: Inputs,
}

impl Iteration {
    /// The iterate buffer the chunk's matrices go into before [`Self::orthogonalize`].
    fn x(&self) -> u64 {
        self.base + self.sl.x as u64
    }

    /// `X = U / max(||U||_F, eps)`, then the Newton-Schulz steps, on the chunk's matrices in
    /// [`Self::x`]; returns the buffer holding the result.
    fn orthogonalize(&self, cublas: &mut Option<Cublas>, chunk: &Chunk) -> Result<u64, CudaError> {
        let (ordinal, stream, inputs, ns) = (self.ordinal, self.stream, self.inputs, &self.ns);
        let addr = |off: usize| self.base + off as u64;
        // SAFETY (every launch): the argument lists match cuda/muon.cu; all buffers lie in the
        // workspace, sized by scratch_for for this chunk.
        let launch = |name: &str, grid, args| unsafe { launch(ordinal, stream, name, grid, args) };
        let (mn, count, s) = (chunk.rows * chunk.cols, chunk.count, chunk.small());
        let (mut x, mut y) = (addr(self.sl.x), addr(self.sl.y));
        let parts = chunk.norm_parts();
        let (partials, sums) = (addr(self.sl.partials), addr(self.sl.sums));
        launch(
            "muon_sumsq_partial",
            (parts as u32, count as u32, 1),
            Args::new().push(x).push(mn as u64).push(partials),
        )?;
        launch("muon_sumsq_final", (count as u32, 1, 1), Args::new().push(partials).push(parts as u64).push(sums))?;
        let a = Args::new().push(x).push(x).push(mn as u64).push(sums).push(ns.eps);
        launch("muon_normalize", (threads_grid(mn, self.cap), count as u32, 1), a)?;
        let prods = ns_products(chunk.rows, chunk.cols, count, ns.b, ns.c);
        let (gram, poly) = (addr(self.sl.gram), addr(self.sl.poly));
        let (x16, gram16) = (addr(self.sl.x16), addr(self.sl.gram16));
        for _ in 0..ns.steps {
            // The products' operands: the f32 buffers, or bf16 copies rounded to nearest.
            let to16 = |src: u64, dst: u64, n: usize| round_to_bf16(ordinal, stream, src, dst, n as u64, None);
            let (xin, gin) = match inputs {
                Inputs::F32 => (x, gram),
                Inputs::Bf16 => {
                    to16(x, x16, chunk.elements())?;
                    (x16, gram16)
                }
            };
            // SAFETY (all products): operands and results lie in the workspace, sized for the chunk.
            let gemm = |g: &Gemm, a: u64, b: u64, c: u64, cublas: &mut Option<Cublas>| unsafe {
                backend().gemm(ordinal, stream, cublas, g, inputs, a, b, c)
            };
            gemm(&prods.gram, xin, xin, gram, cublas)?;
            // SAFETY: two workspace buffers of gram_elements floats each, ordered on the stream.
            unsafe { backend().copy(stream, poly, gram, chunk.gram_elements() * 4)? };
            if inputs == Inputs::Bf16 {
                to16(gram, gram16, chunk.gram_elements())?;
            }
            gemm(&prods.poly, gin, gin, poly, cublas)?;
            launch(
                "muon_add_diagonal",
                (threads_grid(s, self.cap), count as u32, 1),
                Args::new().push(poly).push(s as u64).push(ns.a),
            )?;
            let pin = match inputs {
                Inputs::F32 => poly,
                Inputs::Bf16 => {
                    to16(poly, gram16, chunk.gram_elements())?;
                    gram16
                }
            };
            let (a, b) = if prods.update_iterate_first { (xin, pin) } else { (pin, xin) };
            gemm(&prods.update, a, b, y, cublas)?;
            std::mem::swap(&mut x, &mut y);
        }
        Ok(x)
    }
}

/// The elementwise kernels of a step of `group`: momentum into an f32 buffer, and the update
/// from one.
struct Kernels<'a> {
    group: &'a DeviceGroup<'a>,
    table: &'a SegmentTable,
    cap: u64,
    sign: f32,
    lerp_weight: f32,
    momentum: f32,
    nesterov: u32,
    decay: f32,
    rounding: (u64, u32, u32),
    names: (String, String),
}

impl<'a> Kernels<'a> {
    fn new(
        group: &'a DeviceGroup<'a>,
        table: &'a SegmentTable,
        hp: &MuonHyper,
        rounding: Rounding,
    ) -> Result<Self, CudaError> {
        let sfx = group.dtype.suffix();
        Ok(Kernels {
            group,
            table,
            cap: BLOCKS_PER_SM * sm_count(group.ordinal)? as u64,
            sign: if hp.maximize { -1.0 } else { 1.0 },
            lerp_weight: (1.0 - hp.momentum) as f32,
            momentum: hp.momentum as f32,
            nesterov: hp.nesterov as u32,
            decay: (1.0 - hp.lr * hp.weight_decay) as f32,
            rounding: rounding_args(rounding),
            names: (format!("muon_momentum_{sfx}"), format!("muon_apply_{sfx}")),
        })
    }

    /// The device address of element `index` (of the group's index space) of tensor `i`.
    fn at(&self, addrs: &[u64], i: usize, index: usize) -> u64 {
        addrs[i] + (index - self.table.offsets()[i]) as u64 * self.group.dtype.bytes() as u64
    }

    /// Momentum of elements `start .. end` of tensor `i`, `U` into `out` (f32, from `start`).
    fn momentum(&self, i: usize, start: usize, end: usize, momentum_buffer: u64, out: u64) -> Result<(), CudaError> {
        let a = Args::new().push(self.at(self.group.grads, i, start)).push(momentum_buffer).push(out);
        let a = a.push(start as u64).push(end as u64).push(self.sign).push(self.lerp_weight);
        let a = a.push(self.momentum).push(self.nesterov);
        // SAFETY: matches muon_momentum_*; the gradients, momentum buffer and `out` hold the range.
        unsafe {
            launch(self.group.ordinal, self.group.stream, &self.names.0, (threads_grid(end - start, self.cap), 1, 1), a)
        }
    }

    /// The update of elements `start .. end` of tensor `i` from the orthogonalised `ortho` (f32,
    /// from `start`), at step `step`.
    fn apply(&self, i: usize, start: usize, end: usize, ortho: u64, neg_lr: f32, step: u64) -> Result<(), CudaError> {
        let blocks = grid_for((end - start) as u64, self.cap as u32, 1);
        let draw = self.group.draw(self.table, i) + (start - self.table.offsets()[i]) as u64;
        let (seed, stream_id, mode) = self.rounding;
        let a = Args::new().push(self.at(self.group.params, i, start)).push(ortho).push(start as u64).push(end as u64);
        let a = a.push(draw).push(self.decay).push(neg_lr).push(seed).push(step).push(stream_id).push(mode);
        // SAFETY: matches muon_apply_*; the parameters and `ortho` hold the range.
        unsafe { launch(self.group.ordinal, self.group.stream, &self.names.1, (blocks, 1, 1), a) }
    }

    /// [`Kernels::apply`] in a counted step: the learning rate and step count from `counts`,
    /// `lr_factor` the shape's learning-rate factor.
    #[allow(clippy::too_many_arguments)]
    fn apply_counted(
        &self,
        i: usize,
        start: usize,
        end: usize,
        ortho: u64,
        counts: &DeviceCounts,
        hp: &MuonHyper,
        lr_factor: f64,
    ) -> Result<(), CudaError> {
        let blocks = grid_for((end - start) as u64, self.cap as u32, 1);
        let draw = self.group.draw(self.table, i) + (start - self.table.offsets()[i]) as u64;
        let (seed, stream_id, mode) = self.rounding;
        let h = MuonCountedHyper { lr: counts.lr, weight_decay: hp.weight_decay, lr_factor };
        let a = Args::new().push(self.at(self.group.params, i, start)).push(ortho).push(start as u64).push(end as u64);
        let a = a.push(draw).push(h).push(counts.counters).push(i as u32).push(seed).push(stream_id).push(mode);
        let name = format!("muon_apply_counted_{}", self.group.dtype.suffix());
        // SAFETY: matches muon_apply_counted_*; the parameters and `ortho` hold the range, the
        // counters one f64 per tensor.
        unsafe { launch(self.group.ordinal, self.group.stream, &name, (blocks, 1, 1), a) }
    }
}

/// cuda/muon.cu's `MuonCountedHyper`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct MuonCountedHyper {
    lr: LrSource,
    weight_decay: f64,
    lr_factor: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use smallbatch_core::newton_schulz::{orthogonalize, NewtonSchulz};
    use smallbatch_core::Executor;

    #[test]
    fn chunks_group_shapes_and_split_large_tensors() {
        // Two 3x4 tensors around a 4x3 one, an unstepped 3x4, a 2x3x4 batch, an empty tensor.
        let table =
            SegmentTable::with_matrices(&[[1, 3, 4], [1, 4, 3], [1, 3, 4], [1, 3, 4], [2, 3, 4], [1, 0, 5]]).unwrap();
        let chunks = plan_chunks(&table, &[true, true, true, false, true, true]);
        assert_eq!(chunks.len(), 2);
        let c = &chunks[0];
        assert_eq!((c.rows, c.cols, c.count), (3, 4, 4));
        assert_eq!(
            c.pieces,
            vec![
                Piece { tensor: 0, start: 0, end: 12, slot: 0 },
                Piece { tensor: 2, start: 24, end: 36, slot: 12 },
                Piece { tensor: 4, start: 48, end: 72, slot: 24 },
            ]
        );
        assert_eq!((chunks[1].rows, chunks[1].cols, chunks[1].count), (4, 3, 1));
        assert_eq!((c.small(), c.elements(), c.gram_elements(), c.norm_parts()), (3, 48, 36, 1));
    }

    #[test]
    fn chunks_respect_the_element_and_matrix_caps() {
        // 70000 1x2 matrices: more than a grid's y dimension allows.
        let table = SegmentTable::with_matrices(&[[70000, 1, 2]]).unwrap();
        let chunks = plan_chunks(&table, &[true]);
        assert_eq!(chunks.iter().map(|c| c.count).collect::<Vec<_>>(), [MAX_MATRICES, 70000 - MAX_MATRICES]);
        assert_eq!(chunks[1].pieces[0], Piece { tensor: 0, start: 2 * MAX_MATRICES, end: 140000, slot: 0 });
        // Matrices of 2^23 elements: two per chunk; one of 2^25 alone.
        let table = SegmentTable::with_matrices(&[[3, 2048, 4096], [1, 4096, 8192]]).unwrap();
        let counts: Vec<usize> = plan_chunks(&table, &[true, true]).iter().map(|c| c.count).collect();
        assert_eq!(counts, [2, 1, 1]);
        let all = plan_chunks(&table, &[true, true]);
        assert!(all.iter().all(|c| c.elements() <= CHUNK_ELEMENTS || c.count == 1));
    }

    #[test]
    fn scratch_fits_the_largest_chunk() {
        let table = SegmentTable::with_matrices(&[[1, 300, 40], [2, 10, 10]]).unwrap();
        let chunks = plan_chunks(&table, &[true, true]);
        for inputs in [Inputs::F32, Inputs::Bf16] {
            let s = scratch_for(&chunks, inputs);
            let starts = [s.x, s.y, s.gram, s.poly, s.partials, s.sums, s.x16, s.gram16, s.bytes];
            let lens = [12000 * 4, 12000 * 4, 1600 * 4, 1600 * 4, 8, 16];
            for k in 0..lens.len() {
                assert!(starts[k] + lens[k] <= starts[k + 1], "sub-buffer {k} overflows");
                assert_eq!(starts[k] % 256, 0);
            }
            let half = if inputs == Inputs::Bf16 { 2 } else { 0 };
            assert!(s.x16 + 12000 * half <= s.gram16 && s.gram16 + 1600 * half <= s.bytes);
        }
    }

    /// Runs the chunk's Newton-Schulz with the planned products on the host (the operand
    /// conventions cuBLAS will see) and compares it with the CPU core's orthogonalisation.
    fn host_ns(rows: usize, cols: usize, count: usize, g: &[f32], ns: &NewtonSchulz) -> Vec<f32> {
        let (s, mn) = (rows.min(cols), rows * cols);
        let mut x = g.to_vec();
        for m in 0..count {
            let mat = &mut x[m * mn..(m + 1) * mn];
            let norm = mat.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt() as f32;
            let norm = if norm < ns.eps { ns.eps } else { norm };
            mat.iter_mut().for_each(|v| *v /= norm);
        }
        let p = ns_products(rows, cols, count, ns.b, ns.c);
        let mut y = vec![0f32; x.len()];
        let (mut gram, mut poly) = (vec![0f32; count * s * s], vec![0f32; count * s * s]);
        for _ in 0..ns.steps {
            p.gram.run_host(&x, &x, &mut gram);
            poly.copy_from_slice(&gram);
            p.poly.run_host(&gram, &gram, &mut poly);
            for m in 0..count {
                for i in 0..s {
                    poly[m * s * s + i * s + i] += ns.a;
                }
            }
            if p.update_iterate_first {
                p.update.run_host(&x, &poly, &mut y);
            } else {
                p.update.run_host(&poly, &x, &mut y);
            }
            std::mem::swap(&mut x, &mut y);
        }
        x
    }

    #[test]
    fn planned_products_orthogonalise_like_the_core() {
        let exec = Executor::global().unwrap();
        let ns = NewtonSchulz::default();
        for (rows, cols, count) in [(5, 9, 1), (9, 5, 1), (6, 6, 2), (3, 7, 3), (8, 2, 2)] {
            let mn = rows * cols;
            let g: Vec<f32> = (0..count * mn).map(|k| ((k * 37 + 11) % 23) as f32 / 7.0 - 1.5).collect();
            let got = host_ns(rows, cols, count, &g, &ns);
            for m in 0..count {
                let mut want = vec![0f32; mn];
                orthogonalize(exec, &g[m * mn..(m + 1) * mn], rows, cols, &ns, &mut want).unwrap();
                for (k, (a, b)) in got[m * mn..(m + 1) * mn].iter().zip(&want).enumerate() {
                    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{rows}x{cols} #{m} [{k}]: {a} vs {b}");
                }
            }
        }
    }
}
