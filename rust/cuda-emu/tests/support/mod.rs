//! What the step tests share: random tables of tensors, each tensor's parameters and gradients
//! in host memory of its own (guarded, at a chosen offset), the same tensors for the CPU core,
//! and comparisons of the two.

#![allow(dead_code)] // each test file uses a different subset

use crate::common::Rng;
use smallbatch_core::driver::Rounding;
use smallbatch_core::rounding::{bf16_to_f32, round_bf16_nearest};
use smallbatch_core::rules::{Params, Storage, TensorAddresses};
use smallbatch_core::{Executor, SegmentTable, SimdPath};
use smallbatch_cuda::dispatch::{DeviceCounts, DeviceDtype, DeviceGroup};
use smallbatch_cuda_emu::Emulator;
use std::alloc::Layout;

/// The emulator, installed as smallbatch-cuda's backend.
pub fn emu() -> &'static Emulator {
    smallbatch_cuda_emu::install()
}

/// The core's executor for the reference steps (the SIMD path the CPU has, two threads: the core
/// guarantees the same bits for every path and thread count).
pub fn exec() -> Executor {
    Executor::new(SimdPath::best(), 2).unwrap()
}

/// `default` random cases, times `SMALLBATCH_EMU_CASES` when set (a longer soak: the case
/// generators are seeded, so a larger count only adds cases after the default ones).
pub fn cases(default: usize) -> usize {
    let times = std::env::var("SMALLBATCH_EMU_CASES").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(1);
    default * times.max(1)
}

/// A uniform draw below `n`.
pub fn pick(rng: &mut Rng, n: usize) -> usize {
    rng.below(n as u32) as usize
}

/// A parameter or gradient value: zero now and then, magnitudes from 1e-3 to 10.
pub fn value(rng: &mut Rng) -> f32 {
    if pick(rng, 13) == 0 {
        return 0.0;
    }
    rng.uniform(-1.0, 1.0) * 10f32.powi(pick(rng, 5) as i32 - 3)
}

/// Byte of the guard regions around every tensor.
pub const GUARD: u8 = 0xA5;

/// Host memory of one tensor: `offset` guard bytes, the tensor's bytes, 64 more guard bytes;
/// the allocation is 64-byte aligned.
pub struct HostBuf {
    ptr: *mut u8,
    layout: Layout,
    offset: usize,
    len: usize,
}

impl HostBuf {
    pub fn new(offset: usize, len: usize) -> Self {
        let layout = Layout::from_size_align(offset + len + 64, 64).unwrap();
        // SAFETY: a layout of non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        assert!(!ptr.is_null(), "out of memory");
        // SAFETY: the allocation holds layout.size() bytes.
        unsafe { std::ptr::write_bytes(ptr, GUARD, layout.size()) };
        HostBuf { ptr, layout, offset, len }
    }

    /// A buffer holding `data` at `offset`.
    pub fn with(offset: usize, data: &[u8]) -> Self {
        let mut b = HostBuf::new(offset, data.len());
        b.write(data);
        b
    }

    /// An f32 buffer holding `values` at byte offset `offset`.
    pub fn of_f32(offset: usize, values: &[f32]) -> Self {
        HostBuf::with(offset, &f32_bytes(values))
    }

    /// Address of the tensor's first byte.
    pub fn addr(&self) -> u64 {
        self.ptr as u64 + self.offset as u64
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: offset + len lies inside the allocation.
        unsafe { std::slice::from_raw_parts(self.ptr.add(self.offset), self.len) }
    }

    pub fn write(&mut self, data: &[u8]) {
        assert_eq!(data.len(), self.len);
        // SAFETY: offset + len lies inside the allocation, which `data` cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(self.offset), self.len) };
    }

    pub fn f32s(&self) -> Vec<f32> {
        bytes_f32(self.bytes())
    }

    /// Whether nothing outside the tensor's bytes was written.
    pub fn guards_intact(&self) -> bool {
        // SAFETY: the whole allocation is initialised.
        let all = unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) };
        all[..self.offset].iter().chain(&all[self.offset + self.len..]).all(|&b| b == GUARD)
    }
}

impl Drop for HostBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// Parameter storage of a case.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Dtype {
    F32,
    Bf16(Rounding),
}

impl Dtype {
    /// f32, bf16 rounded to nearest, bf16 with stochastic rounding.
    pub fn all() -> [Dtype; 3] {
        [
            Dtype::F32,
            Dtype::Bf16(Rounding::Nearest),
            Dtype::Bf16(Rounding::Stochastic { seed: 0x5EED_0123_4567_89AB, stream: 3 }),
        ]
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16(_) => 2,
        }
    }

    pub fn device(self) -> DeviceDtype {
        match self {
            Dtype::F32 => DeviceDtype::F32,
            Dtype::Bf16(_) => DeviceDtype::Bf16,
        }
    }

    pub fn storage(self) -> Storage {
        match self {
            Dtype::F32 => Storage::F32,
            Dtype::Bf16(r) => Storage::Bf16(r),
        }
    }

    /// The rounding the device kernels take (ignored for f32).
    pub fn rounding(self) -> Rounding {
        match self {
            Dtype::F32 => Rounding::Nearest,
            Dtype::Bf16(r) => r,
        }
    }

    pub fn encode(self, v: &[f32]) -> Vec<u8> {
        match self {
            Dtype::F32 => f32_bytes(v),
            Dtype::Bf16(_) => v.iter().flat_map(|&x| round_bf16_nearest(x).to_le_bytes()).collect(),
        }
    }

    pub fn decode(self, b: &[u8]) -> Vec<f32> {
        match self {
            Dtype::F32 => bytes_f32(b),
            Dtype::Bf16(_) => b.chunks_exact(2).map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
        }
    }
}

/// Random shapes `[batch, rows, cols]`: empty tensors, single elements, odd sizes, small
/// matrices and batches of them, and `large` tensors of tens of thousands of elements (more
/// 256-element tiles than a grid capped at 2 SMs has warps). `count` tensors.
pub fn random_matrices(rng: &mut Rng, count: usize, large: usize) -> Vec<[usize; 3]> {
    let mut out: Vec<[usize; 3]> = (0..count)
        .map(|_| match pick(rng, 7) {
            0 => [1, 1, pick(rng, 2)],
            1 => [1, 1, 1 + 2 * pick(rng, 20)],
            2 => [1 + pick(rng, 3), 1 + pick(rng, 12), 1 + pick(rng, 12)],
            3 => [1, 2 + pick(rng, 40), 2 + pick(rng, 40)],
            4 => [1, 1, 256 * (1 + pick(rng, 3)) + pick(rng, 2)],
            5 => [pick(rng, 2), 3, 5],
            _ => [1, 1 + pick(rng, 6), 1 + pick(rng, 60)],
        })
        .collect();
    for _ in 0..large {
        let at = pick(rng, out.len() + 1);
        let shape = if pick(rng, 2) == 0 {
            [1, 1, 33_000 + pick(rng, 8000)]
        } else {
            [1, 150 + pick(rng, 60), 170 + pick(rng, 60)]
        };
        out.insert(at, shape);
    }
    out
}

/// Which tensors a step updates: each with probability 4/5.
pub fn random_stepped(rng: &mut Rng, n: usize) -> Vec<bool> {
    (0..n).map(|_| pick(rng, 5) != 0).collect()
}

/// Step counts tensors start from: fresh, early, and past 2^32 (Philox takes the low 32 bits).
pub fn random_steps(rng: &mut Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| [0.0, 0.0, 0.0, 1.0, 6.0, 4_294_967_297.0][pick(rng, 6)]).collect()
}

/// One param group twice: in host memory the emulated device steps (each tensor in an
/// allocation of its own at a chosen offset, state in flat buffers) and in memory the core
/// steps, with the same values.
pub struct Harness {
    pub table: SegmentTable,
    pub dtype: Dtype,
    dev_p: Vec<HostBuf>,
    dev_g: Vec<HostBuf>,
    core_p: Vec<HostBuf>,
    core_g: Vec<HostBuf>,
    /// The device's flat f32 state buffers.
    pub dev_state: Vec<HostBuf>,
    /// The core's.
    pub core_state: Vec<Vec<f32>>,
    pub dev_steps: Vec<f64>,
    pub core_steps: Vec<f64>,
    /// Whether tensor i's parameters and gradients sit where sgd_bf16's 16-byte tile path applies.
    pub tile_aligned: Vec<bool>,
    /// Whether tensor i gets null addresses when a step does not touch it.
    null_when_idle: Vec<bool>,
    before: Vec<Vec<u8>>,
    /// Gradient allocations replaced by new ones (at new addresses), kept alive until the end.
    retired: Vec<HostBuf>,
    /// Where each tensor's element 0 draws its random bits, when not at its table offset (a
    /// shard of a larger group).
    draws: Option<Vec<u64>>,
}

impl Harness {
    /// A group of `matrices` in `dtype`, with flat state buffers of `state_lens` floats filled by
    /// `init(rng, buffer)` (the device's at a 64-byte aligned address plus `state_offset` bytes).
    pub fn new(
        rng: &mut Rng,
        matrices: &[[usize; 3]],
        dtype: Dtype,
        state_lens: &[usize],
        state_offset: usize,
        mut init: impl FnMut(&mut Rng, usize) -> f32,
    ) -> Harness {
        let table = SegmentTable::with_matrices(matrices).unwrap();
        let n = table.len();
        let esize = dtype.size();
        let tile_aligned: Vec<bool> = (0..n).map(|_| pick(rng, 2) == 0).collect();
        let null_when_idle: Vec<bool> = (0..n).map(|_| pick(rng, 2) == 0).collect();
        let mut h = Harness {
            dtype,
            dev_p: Vec::new(),
            dev_g: Vec::new(),
            core_p: Vec::new(),
            core_g: Vec::new(),
            dev_state: Vec::new(),
            core_state: Vec::new(),
            dev_steps: Vec::new(),
            core_steps: Vec::new(),
            tile_aligned,
            null_when_idle,
            before: Vec::new(),
            retired: Vec::new(),
            draws: None,
            table,
        };
        for i in 0..n {
            let numel = h.table.numels()[i];
            let values: Vec<f32> = (0..numel).map(|_| value(rng)).collect();
            let bytes = dtype.encode(&values);
            let off = h.device_offset(rng, i);
            h.dev_p.push(HostBuf::with(off, &bytes));
            h.core_p.push(HostBuf::with(esize * pick(rng, 4), &bytes));
            let off = h.device_offset(rng, i);
            h.dev_g.push(HostBuf::new(off, numel * esize));
            h.core_g.push(HostBuf::new(esize * pick(rng, 4), numel * esize));
        }
        for (k, &len) in state_lens.iter().enumerate() {
            let v: Vec<f32> = (0..len).map(|_| init(rng, k)).collect();
            h.dev_state.push(HostBuf::of_f32(state_offset, &v));
            h.core_state.push(v);
        }
        h.dev_steps = random_steps(rng, n);
        h.core_steps = h.dev_steps.clone();
        h
    }

    /// Byte offset of a device allocation of tensor i: where the 16-byte tile path applies
    /// (`(address - size * start) % 16 == 0`), or any multiple of the element size.
    fn device_offset(&self, rng: &mut Rng, i: usize) -> usize {
        let esize = self.dtype.size();
        if self.tile_aligned[i] {
            (esize * self.table.offsets()[i]) % 16 + 16 * pick(rng, 4)
        } else {
            esize * pick(rng, 16)
        }
    }

    /// Tiles (256 elements of the index space, wholly inside one tensor) of the tensors whose
    /// parameter and gradient allocations make `sgd_bf16` take its 16-byte path for them.
    pub fn whole_aligned_tiles(&self) -> usize {
        (0..self.table.len())
            .filter(|&i| {
                let s = self.dtype.size() as u64 * self.table.offsets()[i] as u64;
                self.dev_p[i].addr().wrapping_sub(s).is_multiple_of(16)
                    && self.dev_g[i].addr().wrapping_sub(s).is_multiple_of(16)
            })
            .map(|i| {
                let r = self.table.range(i);
                (r.start.div_ceil(256)..r.end / 256).count()
            })
            .sum()
    }

    /// New gradients for every tensor (all zero for some tensors, zero rows in others), the
    /// same on both sides; with `move_some`, some device gradients move to new allocations (new
    /// addresses, as torch may hand a step).
    pub fn new_grads(&mut self, rng: &mut Rng, move_some: bool) {
        let esize = self.dtype.size();
        for i in 0..self.table.len() {
            let [batch, rows, cols] = self.table.matrix(i);
            let mode = pick(rng, 10);
            let mut g: Vec<f32> = (0..batch * rows * cols).map(|_| if mode == 0 { 0.0 } else { value(rng) }).collect();
            if mode == 1 && cols > 0 {
                for (r, row) in g.chunks_mut(cols).enumerate() {
                    if r % 2 == 0 {
                        row.iter_mut().for_each(|x| *x = 0.0);
                    }
                }
            }
            let bytes = self.dtype.encode(&g);
            if move_some && pick(rng, 3) == 0 {
                let off = self.device_offset(rng, i);
                let old = std::mem::replace(&mut self.dev_g[i], HostBuf::new(off, bytes.len()));
                self.retired.push(old);
            }
            self.dev_g[i].write(&bytes);
            self.core_g[i].write(&bytes);
            debug_assert_eq!(bytes.len(), esize * self.table.numels()[i]);
        }
    }

    fn addrs(&self, bufs: &[HostBuf], stepped: &[bool]) -> Vec<u64> {
        (0..self.table.len())
            .map(|i| {
                let touched = stepped[i] && self.table.numels()[i] > 0;
                if !touched && self.null_when_idle[i] {
                    0
                } else {
                    bufs[i].addr()
                }
            })
            .collect()
    }

    /// The device's (parameter, gradient) addresses for a step of `stepped`: null for some of
    /// the tensors it does not touch.
    /// and the draw offsets, if the group is a shard.
    pub fn device_addrs(&self, stepped: &[bool]) -> (Vec<u64>, Vec<u64>, Option<Vec<u64>>) {
        (self.addrs(&self.dev_p, stepped), self.addrs(&self.dev_g, stepped), self.draws.clone())
    }

    /// A device group of these addresses.
    pub fn group<'a>(
        &self,
        ordinal: i32,
        stream: usize,
        addrs: &'a (Vec<u64>, Vec<u64>, Option<Vec<u64>>),
    ) -> DeviceGroup<'a> {
        let draws = addrs.2.as_deref();
        DeviceGroup { ordinal, stream, dtype: self.dtype.device(), params: &addrs.0, grads: &addrs.1, draws }
    }

    /// Makes the group a shard of a larger one: each tensor draws its random bits at a random
    /// place (element 0 anywhere, not necessarily at its table offset or on a 4-element boundary).
    pub fn shift_draws(&mut self, rng: &mut Rng) {
        let mut next = pick(rng, 1000) as u64;
        let draws = self
            .table
            .numels()
            .iter()
            .map(|&n| {
                let d = next;
                next += n as u64 + pick(rng, 3000) as u64;
                d
            })
            .collect();
        self.draws = Some(draws);
    }

    /// The core's parameters for a step of `stepped`.
    pub fn core_params(&self, stepped: &[bool]) -> Params<'static> {
        let to_usize = |v: Vec<u64>| v.into_iter().map(|a| a as usize).collect();
        let (p, g) = (self.addrs(&self.core_p, stepped), self.addrs(&self.core_g, stepped));
        // SAFETY: every address is a live HostBuf of its tensor's elements owned by `self`, which
        // outlives the step; nothing else touches them during it.
        let tensors = unsafe { TensorAddresses::new(self.dtype.storage(), to_usize(p), to_usize(g)) };
        Params::Tensors(match &self.draws {
            Some(d) => tensors.with_draw_offsets(to_usize(d.clone())),
            None => tensors,
        })
    }

    /// The device state buffers' addresses.
    pub fn state_addr(&self, k: usize) -> u64 {
        if self.dev_state[k].bytes().is_empty() {
            0
        } else {
            self.dev_state[k].addr()
        }
    }

    /// Remembers the device parameters, to check after a step which ones changed.
    pub fn snapshot(&mut self) {
        self.before = self.dev_p.iter().map(|b| b.bytes().to_vec()).collect();
    }

    /// Gives the device the core's parameters (after a step compared within a tolerance, so
    /// that differences do not carry into the next step's comparison).
    pub fn adopt_core_params(&mut self) {
        for i in 0..self.table.len() {
            let bytes = self.core_p[i].bytes().to_vec();
            self.dev_p[i].write(&bytes);
        }
    }

    /// Device tensor i's parameters as f32 (bf16 widened).
    pub fn dev_param(&self, i: usize) -> Vec<f32> {
        self.dtype.decode(self.dev_p[i].bytes())
    }

    pub fn core_param(&self, i: usize) -> Vec<f32> {
        self.dtype.decode(self.core_p[i].bytes())
    }

    pub fn param_before(&self, i: usize) -> Vec<f32> {
        self.dtype.decode(&self.before[i])
    }

    pub fn dev_state_f32(&self, k: usize) -> Vec<f32> {
        self.dev_state[k].f32s()
    }

    /// What holds whatever the rule: step counts agree; tensors the step did not touch (not
    /// stepped, or empty) kept their parameters; nothing was written outside any tensor; the
    /// gradients are unchanged.
    pub fn check_common(&self, what: &str, stepped: &[bool]) {
        assert_eq!(self.dev_steps, self.core_steps, "{what}: step counts");
        for (i, &on) in stepped.iter().enumerate() {
            assert!(self.dev_p[i].guards_intact(), "{what}: written outside the parameters of tensor {i}");
            assert!(self.dev_g[i].guards_intact(), "{what}: written outside the gradients of tensor {i}");
            assert_eq!(self.dev_g[i].bytes(), self.core_g[i].bytes(), "{what}: gradients of tensor {i} changed");
            if !on || self.table.numels()[i] == 0 {
                assert_eq!(self.dev_p[i].bytes(), &self.before[i][..], "{what}: tensor {i} is not stepped but changed");
            }
        }
        for (k, s) in self.dev_state.iter().enumerate() {
            assert!(s.guards_intact(), "{what}: written outside state buffer {k}");
        }
    }

    /// Parameters and state bit-identical to the core's.
    pub fn check_exact(&self, what: &str, stepped: &[bool]) {
        self.check_common(what, stepped);
        for i in 0..self.table.len() {
            let (d, c) = (self.dev_p[i].bytes(), self.core_p[i].bytes());
            if d != c {
                let (dv, cv) = (self.dtype.decode(d), self.dtype.decode(c));
                let k = (0..dv.len()).find(|&k| dv[k].to_bits() != cv[k].to_bits()).unwrap_or(0);
                panic!(
                    "{what}: parameters of tensor {i} ({:?}, index {}) differ at element {k}: device {:e}, core {:e}",
                    self.table.matrix(i),
                    self.table.offsets()[i] + k,
                    dv[k],
                    cv[k]
                );
            }
        }
        for k in 0..self.dev_state.len() {
            assert_bits_eq(&format!("{what}: state buffer {k}"), &self.dev_state[k].f32s(), &self.core_state[k]);
        }
    }
}

/// Asserts `got` and `want` have the same bits, naming the first difference.
pub fn assert_bits_eq(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(k) = (0..got.len()).find(|&k| got[k].to_bits() != want[k].to_bits()) {
        panic!(
            "{what}: element {k} differs: device {:e} ({:#010x}), core {:e} ({:#010x})",
            got[k],
            got[k].to_bits(),
            want[k],
            want[k].to_bits()
        );
    }
}

/// Distance in units in the last place between two f32 of the same sign (u32::MAX across signs
/// or for NaN).
pub fn ulps(a: f32, b: f32) -> u32 {
    if a.to_bits() == b.to_bits() || a == b {
        return 0;
    }
    if a.is_nan() || b.is_nan() || (a < 0.0) != (b < 0.0) {
        return u32::MAX;
    }
    let (x, y) = (a.abs().to_bits(), b.abs().to_bits());
    x.abs_diff(y)
}

/// The learning rate of a counted step, read as step `k` of a test reads it: by value (k % 3 ==
/// 0), from a float32 "tensor" (1) or a float64 one (2); returns the source and the value the
/// core must use (a float32 tensor's value, widened).
pub fn lr_source(
    k: usize,
    lr: f64,
    counters: u64,
    f32_cell: &mut Box<f32>,
    f64_cell: &mut Box<f64>,
) -> (DeviceCounts, f64) {
    match k % 3 {
        0 => (DeviceCounts::new(counters, lr, 0, false), lr),
        1 => {
            **f32_cell = lr as f32;
            (DeviceCounts::new(counters, f64::NAN, &**f32_cell as *const f32 as u64, false), (lr as f32) as f64)
        }
        _ => {
            **f64_cell = lr;
            (DeviceCounts::new(counters, f64::NAN, &**f64_cell as *const f64 as u64, true), lr)
        }
    }
}
