//! [`Emulator`]: a [`Backend`] of `smallbatch-cuda` that runs its steps on the CPU, so that the
//! crate's real host code (tensor lists, segment tables, workspaces, launch shapes) runs
//! unmodified against the emulated kernels.
//!
//! - "Device pointers" are host addresses; launches are synchronous, on the calling thread.
//! - [`Backend::alloc`] hands out host memory aligned to 256 bytes and filled with `0xFF` bytes
//!   (a NaN as f32, f64 and bf16, and an absurd value as an integer), so that a kernel reading
//!   scratch nobody wrote shows up as NaN rather than as a plausible zero. Allocations are tracked:
//!   [`Backend::free_when_idle`] frees them (and counts frees of unknown addresses), and copies
//!   that start inside an allocation must end inside it.
//! - [`Backend::gemm`] runs [`Gemm::run_host`]: f64 accumulation of exact f32 products, the sum
//!   rounded once to f32, then `alpha * sum + beta * C` in f32 (C not read when `beta == 0`).
//!   bf16 inputs are widened exactly to f32 first.
//! - The multiprocessor count is 2 unless `SMALLBATCH_EMU_SMS` says otherwise, and can be set per
//!   device ordinal ([`Emulator::set_sm_count`]): launch grids are capped by it, so small values
//!   exercise the kernels' grid-stride loops.
//! - A stream can be marked as captured into a CUDA graph ([`Emulator::set_capturing`]); while it
//!   is, launches, uploads, copies and products on it still work (the emulator counts them), and [`Backend::is_capturing`] answers true so that the host code
//!   refuses allocations and uploads.
//! - Every call is counted per stream or device ordinal ([`Emulator::stats`]). Tests that run in
//!   parallel in one process share the emulator, so each should use its own ordinal and stream.

use smallbatch_cuda::backend::Backend;
use smallbatch_cuda::cublas::{Cublas, Gemm, Inputs};
use smallbatch_cuda::CudaError;
use std::alloc::Layout;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::c_void;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// Alignment of every allocation (cudaMalloc gives at least 256 bytes).
pub const ALLOC_ALIGN: usize = 256;

/// Byte every allocation is filled with: `0xFFFF_FFFF` is a NaN as f32, as are the f64 and bf16
/// patterns of all ones.
pub const ALLOC_FILL: u8 = 0xFF;

/// Multiprocessors of a device whose count was not set, unless `SMALLBATCH_EMU_SMS` is set.
pub const DEFAULT_SM_COUNT: u32 = 2;

/// What the emulator did for one stream (launches, copies, products) or one device ordinal
/// (allocations).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Kernel launches, by kernel name.
    pub launches: BTreeMap<String, u64>,
    /// Host-to-device copies.
    pub uploads: u64,
    /// Bytes uploaded.
    pub upload_bytes: u64,
    /// Device-to-device copies.
    pub copies: u64,
    /// Matrix products.
    pub gemms: u64,
    /// Allocations of the ordinal.
    pub allocs: u64,
    /// Allocations of the ordinal freed.
    pub frees: u64,
    /// Launches, uploads, copies and products queued while the stream was marked as captured.
    pub captured: u64,
}

impl Stats {
    /// Launches of `kernel`.
    pub fn launches_of(&self, kernel: &str) -> u64 {
        self.launches.get(kernel).copied().unwrap_or(0)
    }

    /// All launches.
    pub fn total_launches(&self) -> u64 {
        self.launches.values().sum()
    }
}

#[derive(Default)]
struct State {
    sm_counts: HashMap<i32, u32>,
    capturing: HashSet<usize>,
    /// Live allocations: address -> (ordinal, layout).
    allocations: BTreeMap<u64, (i32, Layout)>,
    streams: HashMap<usize, Stats>,
    ordinals: HashMap<i32, Stats>,
    bad_frees: u64,
}

impl State {
    /// Checks that `bytes` at `addr` do not run past the end of the allocation they start in
    /// (addresses outside every allocation belong to the test, which vouches for them).
    fn check_range(&self, what: &str, addr: u64, bytes: usize) -> Result<(), CudaError> {
        if let Some((&start, (_, layout))) = self.allocations.range(..=addr).next_back() {
            let end = start + layout.size() as u64;
            if addr < end && addr + bytes as u64 > end {
                return Err(CudaError::Device(format!(
                    "emulator: {what} of {bytes} bytes at {addr:#x} runs past the end of the allocation \
                     {start:#x}..{end:#x}"
                )));
            }
        }
        Ok(())
    }
}

/// The CPU emulation of a CUDA device (see the module docs). Install it with [`install`].
pub struct Emulator {
    state: Mutex<State>,
    default_sms: u32,
}

impl Default for Emulator {
    fn default() -> Self {
        Emulator::new()
    }
}

impl Emulator {
    /// An emulator with no allocations, no stream captured, [`DEFAULT_SM_COUNT`] multiprocessors
    /// per device (or `SMALLBATCH_EMU_SMS`).
    pub fn new() -> Self {
        let default_sms = std::env::var("SMALLBATCH_EMU_SMS")
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .filter(|&n| n > 0)
            .unwrap_or(DEFAULT_SM_COUNT);
        Emulator { state: Mutex::new(State::default()), default_sms }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock leaves consistent state behind (every
        // update is a single insertion or counter bump).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the multiprocessor count device `ordinal` reports (at least 1).
    pub fn set_sm_count(&self, ordinal: i32, sms: u32) {
        self.state().sm_counts.insert(ordinal, sms.max(1));
    }

    /// Marks `stream` as captured into a CUDA graph (or no longer).
    pub fn set_capturing(&self, stream: usize, capturing: bool) {
        let mut st = self.state();
        if capturing {
            st.capturing.insert(stream);
        } else {
            st.capturing.remove(&stream);
        }
    }

    /// What was done on `stream` (launches, uploads, copies, products) and for device `ordinal`
    /// (allocations and frees).
    pub fn stats(&self, ordinal: i32, stream: usize) -> Stats {
        let st = self.state();
        let mut out = st.streams.get(&stream).cloned().unwrap_or_default();
        if let Some(o) = st.ordinals.get(&ordinal) {
            out.allocs = o.allocs;
            out.frees = o.frees;
        }
        out
    }

    /// Live allocations of device `ordinal` and their total bytes.
    pub fn live_allocations(&self, ordinal: i32) -> (usize, usize) {
        let st = self.state();
        let of_ordinal = st.allocations.values().filter(|(o, _)| *o == ordinal);
        of_ordinal.fold((0, 0), |(n, bytes), (_, l)| (n + 1, bytes + l.size()))
    }

    /// Frees of addresses the emulator never allocated (or freed twice), over all devices.
    pub fn bad_frees(&self) -> u64 {
        self.state().bad_frees
    }

    fn on_stream(&self, stream: usize, f: impl FnOnce(&mut Stats)) {
        let mut st = self.state();
        let captured = st.capturing.contains(&stream);
        let stats = st.streams.entry(stream).or_default();
        f(stats);
        if captured {
            stats.captured += 1;
        }
    }
}

/// Elements a column-major operand spans: `rows x cols` as `op` sees it, stored transposed when
/// `trans`, `count` matrices `stride` apart.
fn span(rows: usize, cols: usize, ld: usize, trans: bool, stride: usize, count: usize) -> usize {
    let (r, c) = if trans { (cols, rows) } else { (rows, cols) };
    if r == 0 || c == 0 || count == 0 {
        return 0;
    }
    (count - 1) * stride + (c - 1) * ld + r
}

/// `n` elements at `addr` as f32: borrowed for f32 inputs, widened (exactly) for bf16 bits.
///
/// # Safety
/// `addr` must hold `n` readable elements of the input type.
unsafe fn operand<'a>(addr: u64, n: usize, inputs: Inputs) -> std::borrow::Cow<'a, [f32]> {
    if n == 0 {
        return std::borrow::Cow::Owned(Vec::new());
    }
    match inputs {
        Inputs::F32 => std::borrow::Cow::Borrowed(std::slice::from_raw_parts(addr as *const f32, n)),
        Inputs::Bf16 => std::borrow::Cow::Owned(
            std::slice::from_raw_parts(addr as *const u16, n)
                .iter()
                .map(|&b| f32::from_bits((b as u32) << 16))
                .collect(),
        ),
    }
}

impl Backend for Emulator {
    fn sm_count(&self, ordinal: i32) -> Result<u32, CudaError> {
        Ok(self.state().sm_counts.get(&ordinal).copied().unwrap_or(self.default_sms))
    }

    unsafe fn launch(
        &self,
        _ordinal: i32,
        stream: usize,
        _file: &'static str,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        args: &mut [*mut c_void],
    ) -> Result<(), CudaError> {
        self.on_stream(stream, |s| *s.launches.entry(name.to_string()).or_default() += 1);
        // SAFETY: the caller's contract: `args` match the kernel and its addresses are live.
        crate::launch(name, grid, (block, 1, 1), args).map_err(|e| CudaError::Device(format!("emulator: {e}")))
    }

    fn is_capturing(&self, stream: usize) -> Result<bool, CudaError> {
        Ok(self.state().capturing.contains(&stream))
    }

    fn alloc(&self, ordinal: i32, bytes: usize) -> Result<u64, CudaError> {
        let layout = Layout::from_size_align(bytes.max(1), ALLOC_ALIGN)
            .map_err(|e| CudaError::Device(format!("emulator: allocating {bytes} bytes: {e}")))?;
        // SAFETY: a layout of non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            return Err(CudaError::Device(format!("emulator: out of memory allocating {bytes} bytes")));
        }
        // SAFETY: the allocation just made holds layout.size() bytes.
        unsafe { std::ptr::write_bytes(ptr, ALLOC_FILL, layout.size()) };
        let mut st = self.state();
        st.allocations.insert(ptr as u64, (ordinal, layout));
        st.ordinals.entry(ordinal).or_default().allocs += 1;
        Ok(ptr as u64)
    }

    unsafe fn free_when_idle(&self, ordinal: i32, ptrs: &[u64]) {
        // Launches are synchronous: the device is always idle.
        let mut st = self.state();
        for &ptr in ptrs {
            match st.allocations.get(&ptr) {
                Some(&(o, layout)) if o == ordinal => {
                    st.allocations.remove(&ptr);
                    st.ordinals.entry(ordinal).or_default().frees += 1;
                    // SAFETY: allocated by `alloc` with this layout, removed from the table above
                    // so freed once.
                    std::alloc::dealloc(ptr as *mut u8, layout);
                }
                _ => st.bad_frees += 1,
            }
        }
    }

    unsafe fn upload(&self, stream: usize, dst: u64, src: &[u8]) -> Result<(), CudaError> {
        self.state().check_range("upload", dst, src.len())?;
        self.on_stream(stream, |s| {
            s.uploads += 1;
            s.upload_bytes += src.len() as u64;
        });
        // SAFETY: the caller's contract: dst holds src.len() bytes.
        std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len());
        Ok(())
    }

    unsafe fn copy(&self, stream: usize, dst: u64, src: u64, bytes: usize) -> Result<(), CudaError> {
        {
            let st = self.state();
            st.check_range("copy destination", dst, bytes)?;
            st.check_range("copy source", src, bytes)?;
        }
        if bytes > 0 && dst < src + bytes as u64 && src < dst + bytes as u64 {
            return Err(CudaError::Device(format!("emulator: overlapping copy of {bytes} bytes {src:#x} -> {dst:#x}")));
        }
        self.on_stream(stream, |s| s.copies += 1);
        // SAFETY: the caller's contract: both ranges are live, checked not to overlap above.
        std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, bytes);
        Ok(())
    }

    unsafe fn gemm(
        &self,
        _ordinal: i32,
        stream: usize,
        _handle: &mut Option<Cublas>,
        g: &Gemm,
        inputs: Inputs,
        a: u64,
        b: u64,
        c: u64,
    ) -> Result<(), CudaError> {
        self.on_stream(stream, |s| s.gemms += 1);
        if g.m == 0 || g.n == 0 || g.batch == 0 {
            return Ok(());
        }
        let na = span(g.m, g.k, g.lda, g.transa, g.stride_a, g.batch);
        let nb = span(g.k, g.n, g.ldb, g.transb, g.stride_b, g.batch);
        let nc = span(g.m, g.n, g.ldc, false, g.stride_c, g.batch);
        let esize = if inputs == Inputs::F32 { 4 } else { 2 };
        {
            let st = self.state();
            st.check_range("gemm operand A", a, na * esize)?;
            st.check_range("gemm operand B", b, nb * esize)?;
            st.check_range("gemm result C", c, nc * 4)?;
        }
        let (c_start, c_end) = (c, c + 4 * nc as u64);
        for (what, addr, n) in [("A", a, na), ("B", b, nb)] {
            if n > 0 && addr < c_end && c_start < addr + (esize * n) as u64 {
                return Err(CudaError::Device(format!("emulator: gemm operand {what} overlaps its result")));
            }
        }
        // SAFETY: the caller's contract: every element the product touches is live; the result
        // was checked not to overlap the operands.
        let (av, bv) = (operand(a, na, inputs), operand(b, nb, inputs));
        let cv = std::slice::from_raw_parts_mut(c as *mut f32, nc);
        g.run_host(&av, &bv, cv);
        Ok(())
    }
}

/// The process's emulator, installed as `smallbatch-cuda`'s backend on the first call (every
/// later call returns the same one).
///
/// # Panics
/// If another backend was installed in this process before.
pub fn install() -> &'static Emulator {
    static EMULATOR: OnceLock<&'static Emulator> = OnceLock::new();
    EMULATOR.get_or_init(|| {
        let emu: &'static Emulator = Box::leak(Box::new(Emulator::new()));
        assert!(
            smallbatch_cuda::backend::install(emu),
            "another smallbatch-cuda backend was installed in this process before the emulator"
        );
        emu
    })
}
