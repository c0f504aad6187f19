//! smallbatch-cuda's Muon step (`muon::muon_step`: the real host code, shape chunks, workspace,
//! the elementwise kernels and the Newton-Schulz products through the backend's `gemm`) on the
//! emulator, against the Rust core on the same tensors. The momentum buffer is elementwise and
//! bit-identical; the products are summed in another order than the core's GEMM, so the
//! parameters agree within a tolerance relative to each tensor's update.

mod common;
mod support;

use common::Rng;
use smallbatch_core::driver::Rounding;
use smallbatch_core::newton_schulz::NewtonSchulz;
use smallbatch_core::rules::muon::{muon_step as core_muon, LrAdjust, MuonBuffers, MuonHyper};
use smallbatch_core::Executor;
use smallbatch_cuda::cublas::Inputs;
use smallbatch_cuda::muon::{muon_step, muon_step_counted, MuonWorkspace};
use smallbatch_cuda::CudaError;
use support::{assert_bits_eq, emu, exec, lr_source, pick, random_matrices, random_stepped, value, Dtype, Harness};

/// Spacing of the representable values of the storage type at `x` (one unit in the last place).
fn spacing(x: f32, dtype: Dtype) -> f32 {
    let mantissa = if dtype == Dtype::F32 { 23 } else { 7 };
    let exp = ((x.abs().to_bits() >> 23) as i32 - 127).max(-126);
    2f32.powi(exp - mantissa)
}

struct Step<'a> {
    ord: i32,
    stream: usize,
    hp: &'a MuonHyper,
    inputs: Inputs,
    exec: &'a Executor,
}

impl Step<'_> {
    fn device(&self, ws: &mut MuonWorkspace, h: &mut Harness, stepped: &[bool]) -> Result<(), CudaError> {
        let addrs = h.device_addrs(stepped);
        let (momentum, rounding) = (h.state_addr(0), h.dtype.rounding());
        let group = h.group(self.ord, self.stream, &addrs);
        muon_step(ws, group, &h.table, stepped, &mut h.dev_steps, momentum, self.hp, self.inputs, rounding)
    }

    fn core(&self, h: &mut Harness, stepped: &[bool]) {
        let params = h.core_params(stepped);
        let bufs = MuonBuffers { params, momentum: &mut h.core_state[0] };
        core_muon(self.exec, &h.table, stepped, &mut h.core_steps, bufs, self.hp).unwrap();
    }

    /// Both steps; asserts the momentum buffer bit-identical and each stepped tensor's parameters
    /// within `rel` of its largest update (plus one spacing of the storage type for the final
    /// rounding), then gives the device the core's parameters so that the next step starts from
    /// the same ones. Returns the largest difference relative to the tensor's largest update.
    fn both(&self, ws: &mut MuonWorkspace, h: &mut Harness, stepped: &[bool], rel: f32, what: &str) -> Agreement {
        h.snapshot();
        self.device(ws, h, stepped).unwrap_or_else(|e| panic!("{what}: {e}"));
        self.core(h, stepped);
        let worst = compare(h, stepped, rel, what);
        h.adopt_core_params();
        worst
    }
}

/// How closely a device step followed the core's.
#[derive(Debug, Default, Clone, Copy)]
struct Agreement {
    /// The largest difference relative to its tensor's largest update.
    worst: f32,
    /// Stepped elements whose parameters differ in any bit, of all stepped elements.
    differing: usize,
    elements: usize,
}

impl Agreement {
    fn add(self, other: Agreement) -> Agreement {
        Agreement {
            worst: self.worst.max(other.worst),
            differing: self.differing + other.differing,
            elements: self.elements + other.elements,
        }
    }
}

fn compare(h: &Harness, stepped: &[bool], rel: f32, what: &str) -> Agreement {
    h.check_common(what, stepped);
    assert_bits_eq(&format!("{what}: momentum buffer"), &h.dev_state_f32(0), &h.core_state[0]);
    let (mut worst, mut differing, mut elements) = (0f32, 0, 0);
    for i in (0..h.table.len()).filter(|&i| stepped[i] && h.table.numels()[i] > 0) {
        let (dev, core, before) = (h.dev_param(i), h.core_param(i), h.param_before(i));
        let scale = core.iter().zip(&before).map(|(c, b)| (c - b).abs()).fold(0f32, f32::max);
        for k in 0..dev.len() {
            let diff = (dev[k] - core[k]).abs();
            let slack = spacing(dev[k].abs().max(core[k].abs()), h.dtype);
            assert!(
                diff <= rel * scale + slack,
                "{what}: tensor {i} {:?} element {k}: device {:e}, core {:e} (largest update {scale:e})",
                h.table.matrix(i),
                dev[k],
                core[k]
            );
            if scale > 0.0 && diff > slack {
                worst = worst.max(diff / scale);
            }
            differing += usize::from(dev[k].to_bits() != core[k].to_bits());
        }
        elements += dev.len();
    }
    Agreement { worst, differing, elements }
}

fn variants() -> [MuonHyper; 3] {
    [
        MuonHyper { lr: 0.02, ..MuonHyper::default() },
        MuonHyper {
            lr: 0.01,
            nesterov: false,
            maximize: true,
            adjust_lr: LrAdjust::MatchRmsAdamW,
            ..MuonHyper::default()
        },
        MuonHyper {
            lr: 0.05,
            momentum: 0.5,
            weight_decay: 0.0,
            adjust_lr: LrAdjust::None,
            newton_schulz: NewtonSchulz { steps: 3, ..NewtonSchulz::default() },
            ..MuonHyper::default()
        },
    ]
}

/// Matrices only (Muon is given no vectors): every stepped tensor has rows and cols >= 1.
fn muon_matrices(rng: &mut Rng, count: usize, large: usize) -> Vec<[usize; 3]> {
    random_matrices(rng, count, large)
        .into_iter()
        .map(|[b, r, c]| if r == 1 && c > 300 { [1, 16, c / 16] } else { [b, r, c] })
        .collect()
}

#[test]
fn muon_equals_the_core_within_tolerance() {
    const ORD: i32 = 301;
    const STREAM: usize = 301;
    emu().set_sm_count(ORD, 2);
    let exec = exec();
    let mut rng = Rng::new(0x3D0_0001);
    let mut agreement = Agreement::default();
    // Stochastically rounded steps: the parameters that differ between device and core. The
    // products differ in their last bits, which moves a rounding only when the random bits
    // fall that close to the threshold (about 1 in 10^4 here); random bits drawn at other
    // indices (a shard not honouring its draw offsets) move about 1 in 20.
    let mut stochastic = Agreement::default();
    for c in 0..support::cases(5) {
        let (count, large) = if c == 0 { (20, 1) } else { (1 + pick(&mut rng, 25), 0) };
        let matrices = muon_matrices(&mut rng, count, large);
        for (d, dtype) in Dtype::all().into_iter().enumerate() {
            let hp = variants()[(c + d) % 3];
            let total = matrices.iter().map(|m| m[0] * m[1] * m[2]).sum();
            let mut h = Harness::new(&mut rng, &matrices, dtype, &[total], 0, |rng, _| value(rng));
            if c % 2 == 1 {
                // A shard: its random bits are drawn where the unsharded group would draw them.
                h.shift_draws(&mut rng);
            }
            let step = Step { ord: ORD, stream: STREAM, hp: &hp, inputs: Inputs::F32, exec: &exec };
            let mut ws = MuonWorkspace::new(ORD);
            for s in 0..2 {
                let stepped = random_stepped(&mut rng, h.table.len());
                h.new_grads(&mut rng, s > 0);
                let what = format!("case {c} {dtype:?} {hp:?} step {s}");
                let a = step.both(&mut ws, &mut h, &stepped, 1e-4, &what);
                agreement = agreement.add(a);
                if matches!(dtype, Dtype::Bf16(Rounding::Stochastic { .. })) {
                    stochastic = stochastic.add(a);
                }
            }
        }
    }
    eprintln!("muon, f32 products: largest difference {:e} of the tensor's largest update", agreement.worst);
    let Agreement { differing, elements, .. } = stochastic;
    eprintln!("muon, stochastic rounding: {differing} of {elements} parameters differ from the core's");
    assert!(elements > 10_000, "too few stochastically rounded elements ({elements})");
    assert!(
        differing * 100 < elements,
        "{differing} of {elements} stochastically rounded parameters differ from the core's"
    );
}

/// With bf16 inputs the products round their operands to bf16 (by round_nearest_f32_to_bf16 on
/// the device): the update moves away from the core's f32 iteration by about bf16's precision.
#[test]
fn muon_with_bf16_products_stays_near_the_core() {
    const ORD: i32 = 302;
    const STREAM: usize = 302;
    emu().set_sm_count(ORD, 1);
    let exec = exec();
    let mut rng = Rng::new(0x3D0_0002);
    let matrices = muon_matrices(&mut rng, 12, 0);
    let total = matrices.iter().map(|m| m[0] * m[1] * m[2]).sum();
    let hp = variants()[0];
    let mut worst = 0f32;
    for dtype in [Dtype::F32, Dtype::all()[2]] {
        let mut h = Harness::new(&mut rng, &matrices, dtype, &[total], 0, |rng, _| value(rng));
        let step = Step { ord: ORD, stream: STREAM, hp: &hp, inputs: Inputs::Bf16, exec: &exec };
        let mut ws = MuonWorkspace::new(ORD);
        for s in 0..2 {
            let stepped = random_stepped(&mut rng, h.table.len());
            h.new_grads(&mut rng, true);
            worst = worst
                .max(step.both(&mut ws, &mut h, &stepped, 0.1, &format!("bf16 products {dtype:?} step {s}")).worst);
        }
    }
    eprintln!("muon, bf16 products: largest difference {worst:e} of the tensor's largest update");
}

/// The workspace is allocated at the first step and kept; a step that needs more memory while
/// the stream is captured is refused before anything runs, one that fits is captured; a null
/// gradient address is refused before anything runs.
#[test]
fn muon_workspace_capture_and_refusals() {
    const ORD: i32 = 303;
    const STREAM: usize = 303;
    let emu = emu();
    let exec = exec();
    let mut rng = Rng::new(0x3D0_0003);
    let matrices = [[1, 24, 40], [3, 5, 7], [1, 40, 24], [1, 1, 0], [2, 5, 7]];
    let hp = variants()[0];
    let dtype = Dtype::all()[1];
    let mut h = Harness::new(&mut rng, &matrices, dtype, &[960 + 105 + 960 + 70], 0, |rng, _| value(rng));
    let step = Step { ord: ORD, stream: STREAM, hp: &hp, inputs: Inputs::F32, exec: &exec };
    let stats = || emu.stats(ORD, STREAM);
    let mut ws = MuonWorkspace::new(ORD);
    let all = [true; 5];
    let small = [false, true, false, true, true];

    let refused = |ws: &mut MuonWorkspace, h: &mut Harness, set: &[bool], capture: bool| -> CudaError {
        h.snapshot();
        let (before, steps) = (stats(), h.dev_steps.clone());
        emu.set_capturing(STREAM, capture);
        let err = step.device(ws, h, set).unwrap_err();
        emu.set_capturing(STREAM, false);
        assert_eq!(stats(), before, "a refused step runs nothing");
        assert_eq!(h.dev_steps, steps, "a refused step advances no step count");
        h.check_common("refused step", &[false; 5]);
        err
    };
    let capture_message = "smallbatch_rs: allocating workspace memory while the stream is captured into a CUDA graph; \
                           run one optimizer step outside the capture first (with the same parameters receiving \
                           gradients), then capture";

    h.new_grads(&mut rng, false);
    // A null gradient address of a stepped tensor.
    let mut addrs = h.device_addrs(&all);
    addrs.1[4] = 0;
    let momentum = h.state_addr(0);
    let err = muon_step(
        &mut ws,
        h.group(ORD, STREAM, &addrs),
        &h.table,
        &all,
        &mut h.dev_steps,
        momentum,
        &hp,
        Inputs::F32,
        dtype.rounding(),
    );
    assert_eq!(err.unwrap_err().to_string(), "null device address for the gradients of tensor 4");
    assert_eq!(stats(), Default::default());

    // The first step allocates: refused under capture.
    assert_eq!(refused(&mut ws, &mut h, &small, true).to_string(), capture_message);

    // Warm-up with the small set, then the small set captured (new gradient addresses).
    step.both(&mut ws, &mut h, &small, 1e-4, "warm-up");
    assert_eq!(stats().allocs, 1);
    h.new_grads(&mut rng, true);
    let before = stats();
    emu.set_capturing(STREAM, true);
    h.snapshot();
    step.device(&mut ws, &mut h, &small).unwrap();
    emu.set_capturing(STREAM, false);
    step.core(&mut h, &small);
    compare(&h, &small, 1e-4, "captured step");
    h.adopt_core_params();
    let after = stats();
    assert_eq!((after.allocs, after.uploads), (before.allocs, before.uploads));
    let queued = |s: &smallbatch_cuda_emu::Stats| s.total_launches() + s.copies + s.gemms;
    assert!(after.gemms > before.gemms && after.captured - before.captured == queued(&after) - queued(&before));

    // All tensors need a larger workspace: refused under capture, fine outside it.
    h.new_grads(&mut rng, true);
    assert_eq!(refused(&mut ws, &mut h, &all, true).to_string(), capture_message);
    step.both(&mut ws, &mut h, &all, 1e-4, "larger step");
    assert_eq!(stats().allocs, 2);
    // The retired workspace and the current one are freed with the workspace.
    drop(ws);
    assert_eq!(emu.live_allocations(ORD), (0, 0));
    assert_eq!(stats().frees, 2);
}

/// Counted Muon steps (capturable=True: counts and learning rate read on the device by the apply
/// kernels, counts advanced by the last launch) equal plain device steps bit for bit: two
/// harnesses built from the same random sequence, one stepped each way, with a learning rate
/// that changes every step (by value, float32 or float64 tensor) and the counted stream marked
/// captured after the first step.
#[test]
fn counted_muon_equals_the_plain_device_step_bit_for_bit() {
    const ORD: i32 = 305;
    const PLAIN: usize = 305;
    const COUNTED: usize = 306;
    let emu = emu();
    emu.set_sm_count(ORD, 2);
    let (mut f32_cell, mut f64_cell) = (Box::new(0f32), Box::new(0f64));
    for c in 0..support::cases(4) {
        for (d, dtype) in Dtype::all().into_iter().enumerate() {
            let seed = 0x3D0_0005 + 16 * c as u64 + d as u64;
            let (mut r1, mut r2) = (Rng::new(seed), Rng::new(seed));
            let (count, large) = if c == 0 { (20, 1) } else { (1 + pick(&mut r1, 25), 0) };
            let _ = if c == 0 { 0 } else { pick(&mut r2, 25) };
            let matrices = muon_matrices(&mut r1, count, large);
            let _ = muon_matrices(&mut r2, count, large);
            let total = matrices.iter().map(|m| m[0] * m[1] * m[2]).sum();
            let mut h1 = Harness::new(&mut r1, &matrices, dtype, &[total], 0, |rng, _| value(rng));
            let mut h2 = Harness::new(&mut r2, &matrices, dtype, &[total], 0, |rng, _| value(rng));
            if c % 2 == 1 {
                h1.shift_draws(&mut r1);
                h2.shift_draws(&mut r2);
            }
            let base = variants()[(c + d) % 3];
            let (mut ws1, mut ws2) = (MuonWorkspace::new(ORD), MuonWorkspace::new(ORD));
            // One stepped set throughout: a captured step may not grow the workspace.
            let stepped = random_stepped(&mut r1, h1.table.len());
            assert_eq!(stepped, random_stepped(&mut r2, h2.table.len()));
            for s in 0..3 {
                h1.new_grads(&mut r1, s > 0);
                h2.new_grads(&mut r2, s > 0);
                let counters = h2.dev_steps.as_mut_ptr() as u64;
                let (counts, lr) =
                    lr_source(c + d + s, base.lr / (1.0 + s as f64), counters, &mut f32_cell, &mut f64_cell);
                let what = format!("case {c} {dtype:?} {base:?} lr {lr} step {s}");
                let rounding = dtype.rounding();
                let addrs = h1.device_addrs(&stepped);
                let (m1, m2) = (h1.state_addr(0), h2.state_addr(0));
                let hp = MuonHyper { lr, ..base };
                muon_step(
                    &mut ws1,
                    h1.group(ORD, PLAIN, &addrs),
                    &h1.table,
                    &stepped,
                    &mut h1.dev_steps,
                    m1,
                    &hp,
                    Inputs::F32,
                    rounding,
                )
                .unwrap_or_else(|e| panic!("{what}: {e}"));
                emu.set_capturing(COUNTED, s > 0);
                let addrs = h2.device_addrs(&stepped);
                let hp = MuonHyper { lr: 9.0, ..base };
                muon_step_counted(
                    &mut ws2,
                    h2.group(ORD, COUNTED, &addrs),
                    &h2.table,
                    &stepped,
                    counts,
                    m2,
                    &hp,
                    Inputs::F32,
                    rounding,
                )
                .unwrap_or_else(|e| panic!("{what}: {e}"));
                emu.set_capturing(COUNTED, false);
                assert_eq!(h1.dev_steps, h2.dev_steps, "{what}: step counts");
                for i in 0..h1.table.len() {
                    assert_bits_eq(&format!("{what}: tensor {i}"), &h2.dev_param(i), &h1.dev_param(i));
                }
                assert_bits_eq(&format!("{what}: momentum"), &h2.dev_state_f32(0), &h1.dev_state_f32(0));
            }
        }
    }
}
