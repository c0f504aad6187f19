//! smallbatch-cuda's Adafactor step (`adafactor::adafactor_step`: the real host code, segment
//! table, scratch layout, `adafactor_set_segments` and the phase launches) on the emulator,
//! against the Rust core on the same tensors, and the workspace's upload and allocation rules
//! around CUDA-graph capture.

mod common;
mod support;

use common::Rng;
use smallbatch_core::rules::adafactor::{
    adafactor_step as core_adafactor, AdafactorBuffers, AdafactorHyper, AdafactorLayout, Beta2,
};
use smallbatch_core::Executor;
use smallbatch_cuda::adafactor::{
    adafactor_step, adafactor_step_counted, AdafactorState, AdafactorWorkspace, UPDATE_SEGMENTS,
};
use smallbatch_cuda::dispatch::DeviceCounts;
use smallbatch_cuda::CudaError;
use support::{emu, exec, lr_source, pick, random_matrices, random_stepped, value, Dtype, Harness};

/// Which tensors are factored: most matrices (also empty batches of them), never vectors.
fn random_factored(rng: &mut Rng, matrices: &[[usize; 3]]) -> Vec<bool> {
    matrices.iter().map(|&[_, r, c]| r >= 2 && c >= 1 && pick(rng, 4) != 0).collect()
}

/// A harness with Adafactor's four state buffers (row EMAs, column EMAs, unfactored second
/// moments: small non-negative values; momentum: any value).
fn harness(rng: &mut Rng, matrices: &[[usize; 3]], dtype: Dtype, layout: &AdafactorLayout) -> Harness {
    let total = matrices.iter().map(|m| m[0] * m[1] * m[2]).sum();
    let lens = [layout.row_total, layout.col_total, layout.variance_total, total];
    Harness::new(rng, matrices, dtype, &lens, 0, |rng, k| if k == 3 { value(rng) } else { value(rng).abs() * 1e-3 })
}

struct Step<'a> {
    ord: i32,
    stream: usize,
    layout: &'a AdafactorLayout,
    hp: &'a AdafactorHyper,
    exec: &'a Executor,
}

impl Step<'_> {
    /// The device step of `stepped` on `h`'s device copy; with `counts`, the counted step.
    fn device(&self, ws: &mut AdafactorWorkspace, h: &mut Harness, stepped: &[bool]) -> Result<(), CudaError> {
        self.device_with(ws, h, stepped, None)
    }

    fn device_with(
        &self,
        ws: &mut AdafactorWorkspace,
        h: &mut Harness,
        stepped: &[bool],
        counts: Option<DeviceCounts>,
    ) -> Result<(), CudaError> {
        let addrs = h.device_addrs(stepped);
        let state = AdafactorState {
            row_var: h.state_addr(0),
            col_var: h.state_addr(1),
            variance: h.state_addr(2),
            // Not state_addr(3): for a group without elements that is null, which adafactor_step
            // refuses with momentum (see `null_exp_avg_of_an_empty_group_with_momentum`).
            exp_avg: if self.hp.beta1 != 0.0 { h.dev_state[3].addr() } else { 0 },
        };
        let group = h.group(self.ord, self.stream, &addrs);
        let rounding = h.dtype.rounding();
        match counts {
            None => {
                adafactor_step(ws, group, &h.table, self.layout, stepped, &mut h.dev_steps, state, self.hp, rounding)
            }
            Some(c) => adafactor_step_counted(ws, group, &h.table, self.layout, stepped, c, state, self.hp, rounding),
        }
    }

    /// The core's step of `stepped` on `h`'s core copy.
    fn core(&self, h: &mut Harness, stepped: &[bool]) {
        let params = h.core_params(stepped);
        let [r, c, v, m] = &mut h.core_state[..] else { unreachable!() };
        let exp_avg = if self.hp.beta1 != 0.0 { Some(&mut m[..]) } else { None };
        let bufs = AdafactorBuffers { params, row_var: r, col_var: c, variance: v, exp_avg };
        core_adafactor(self.exec, &h.table, self.layout, stepped, &mut h.core_steps, bufs, self.hp).unwrap();
    }

    /// Both steps, compared bit for bit.
    fn both(&self, ws: &mut AdafactorWorkspace, h: &mut Harness, stepped: &[bool], what: &str) {
        h.snapshot();
        self.device(ws, h, stepped).unwrap_or_else(|e| panic!("{what}: {e}"));
        self.core(h, stepped);
        h.check_exact(what, stepped);
    }
}

fn variants() -> Vec<AdafactorHyper> {
    vec![
        // torch.optim.Adafactor's defaults: relative step, eps1 None (torch's clamps), beta2 decay.
        AdafactorHyper::default(),
        // The paper's setup with momentum, constant beta2, eps1 added, no relative step, decay.
        AdafactorHyper {
            lr: 1e-2,
            beta1: 0.9,
            beta2: Beta2::Constant(0.999),
            eps1: Some(1e-30),
            weight_decay: 0.1,
            relative_step: false,
            ..AdafactorHyper::default()
        },
        // Relative step with momentum, no step cap, a clipping threshold above 1, maximizing.
        AdafactorHyper {
            lr: 3e-2,
            beta1: 0.5,
            clip_threshold: 1.5,
            cap_lr_at_inv_sqrt_step: false,
            maximize: true,
            ..AdafactorHyper::default()
        },
        // eps1 given with the relative step and weight decay, no momentum.
        AdafactorHyper {
            lr: 1e-3,
            eps1: Some(1e-30),
            weight_decay: 0.01,
            beta2: Beta2::Decay(-0.5),
            ..AdafactorHyper::default()
        },
    ]
}

#[test]
fn adafactor_equals_the_core() {
    const ORD: i32 = 201;
    const STREAM: usize = 201;
    let emu = emu();
    emu.set_sm_count(ORD, 2);
    let exec = exec();
    let mut rng = Rng::new(0xADAF_0001);
    let variants = variants();
    for c in 0..support::cases(8) {
        let (count, large) = match c {
            0 => (110, 0),
            1 => (10, 2),
            _ => (1 + pick(&mut rng, 30), pick(&mut rng, 2)),
        };
        let matrices = random_matrices(&mut rng, count, large);
        let factored = random_factored(&mut rng, &matrices);
        for (d, dtype) in Dtype::all().into_iter().enumerate() {
            let hp = variants[(3 * c + d) % variants.len()];
            let table = smallbatch_core::SegmentTable::with_matrices(&matrices).unwrap();
            let layout = AdafactorLayout::new(&table, &factored).unwrap();
            let mut h = harness(&mut rng, &matrices, dtype, &layout);
            if c % 2 == 1 {
                // A shard: its random bits are drawn where the unsharded group would draw them.
                h.shift_draws(&mut rng);
            }
            let step = Step { ord: ORD, stream: STREAM, layout: &layout, hp: &hp, exec: &exec };
            let mut ws = AdafactorWorkspace::new(ORD);
            for s in 0..3 {
                let stepped = random_stepped(&mut rng, h.table.len());
                h.new_grads(&mut rng, s > 0);
                step.both(&mut ws, &mut h, &stepped, &format!("case {c} {dtype:?} {hp:?} step {s}"));
            }
        }
    }
}

/// Counted steps (capturable=True: counts and learning rate on the device, the beta2 weights
/// computed there) equal the core's plain steps bit for bit, with mixed counts, a learning rate
/// that changes every step (by value, float32 or float64 tensor), torch's beta2 schedule and a
/// constant beta2, and the stream marked captured after the first step.
#[test]
fn counted_adafactor_equals_the_core() {
    const ORD: i32 = 205;
    const STREAM: usize = 205;
    let emu = emu();
    emu.set_sm_count(ORD, 2);
    let exec = exec();
    let mut rng = Rng::new(0xADAF_0005);
    let variants = variants();
    let (mut f32_cell, mut f64_cell) = (Box::new(0f32), Box::new(0f64));
    for c in 0..support::cases(6) {
        let (count, large) = if c == 0 { (110, 0) } else { (1 + pick(&mut rng, 30), pick(&mut rng, 2)) };
        let matrices = random_matrices(&mut rng, count, large);
        let factored = random_factored(&mut rng, &matrices);
        for (d, dtype) in Dtype::all().into_iter().enumerate() {
            let base = variants[(c + d) % variants.len()];
            let table = smallbatch_core::SegmentTable::with_matrices(&matrices).unwrap();
            let layout = AdafactorLayout::new(&table, &factored).unwrap();
            let mut h = harness(&mut rng, &matrices, dtype, &layout);
            let mut ws = AdafactorWorkspace::new(ORD);
            // One stepped set throughout: a captured step may not upload a new table.
            let stepped = random_stepped(&mut rng, h.table.len());
            for s in 0..3 {
                emu.set_capturing(STREAM, s > 0);
                h.new_grads(&mut rng, s > 0);
                let counters = h.dev_steps.as_mut_ptr() as u64;
                let (counts, lr) =
                    lr_source(c + d + s, base.lr / (1.0 + s as f64), counters, &mut f32_cell, &mut f64_cell);
                let hp = AdafactorHyper { lr, ..base };
                let what = format!("case {c} {dtype:?} {hp:?} step {s}");
                // The device ignores the hyperparameters' lr: the source's is used.
                let dev_hp = AdafactorHyper { lr: 5.0, ..hp };
                let step = Step { ord: ORD, stream: STREAM, layout: &layout, hp: &dev_hp, exec: &exec };
                h.snapshot();
                step.device_with(&mut ws, &mut h, &stepped, Some(counts)).unwrap_or_else(|e| panic!("{what}: {e}"));
                Step { hp: &hp, ..step }.core(&mut h, &stepped);
                h.check_exact(&what, &stepped);
            }
            emu.set_capturing(STREAM, false);
        }
    }
}

/// The segment table is uploaded at the first step and again only when the set of stepped
/// tensors changes; new gradient addresses travel as kernel arguments. A step that would need an
/// allocation or an upload while the stream is captured is refused before anything runs, and
/// once a step with the same stepped set has run outside the capture, a captured step works.
#[test]
fn adafactor_uploads_only_when_the_stepped_set_changes_and_captured_steps_need_none() {
    const ORD: i32 = 202;
    const STREAM: usize = 202;
    let emu = emu();
    let exec = exec();
    let mut rng = Rng::new(0xADAF_0002);
    // More than UPDATE_SEGMENTS tensors with elements: two set_segments launches per step.
    let mut matrices = random_matrices(&mut rng, 120, 1);
    matrices.extend([[1, 5, 7], [2, 3, 4], [1, 1, 9]]);
    let factored = random_factored(&mut rng, &matrices);
    let table = smallbatch_core::SegmentTable::with_matrices(&matrices).unwrap();
    let layout = AdafactorLayout::new(&table, &factored).unwrap();
    let dtype = Dtype::all()[2];
    let hp = AdafactorHyper { beta1: 0.9, ..AdafactorHyper::default() };
    let mut h = harness(&mut rng, &matrices, dtype, &layout);
    let step = Step { ord: ORD, stream: STREAM, layout: &layout, hp: &hp, exec: &exec };
    let n = table.len();
    let set_a: Vec<bool> = (0..n).map(|i| i != 3).collect();
    let set_b: Vec<bool> = (0..n).map(|i| i % 5 != 1).collect();
    let segments = |set: &[bool]| (0..n).filter(|&i| set[i] && table.numels()[i] > 0).count() as u64;
    assert!(segments(&set_a) > UPDATE_SEGMENTS as u64);
    let stats = || emu.stats(ORD, STREAM);
    let mut ws = AdafactorWorkspace::new(ORD);

    let refused = |ws: &mut AdafactorWorkspace, h: &mut Harness, set: &[bool], what: &str| {
        h.snapshot();
        let (before, steps) = (stats(), h.dev_steps.clone());
        emu.set_capturing(STREAM, true);
        let err = step.device(ws, h, set).unwrap_err();
        emu.set_capturing(STREAM, false);
        assert_eq!(
            err.to_string(),
            format!(
                "smallbatch_rs: {what} while the stream is captured into a CUDA graph; run one optimizer step \
                 outside the capture first (with the same parameters receiving gradients), then capture"
            )
        );
        assert_eq!(stats(), before, "a refused step runs nothing");
        assert_eq!(h.dev_steps, steps, "a refused step advances no step count");
        h.check_common("refused step", &vec![false; n]);
    };

    // The first step needs the workspace: refused under capture.
    h.new_grads(&mut rng, false);
    refused(&mut ws, &mut h, &set_a, "allocating workspace memory");
    assert_eq!(emu.live_allocations(ORD).0, 0);

    // First step: one allocation, one upload, two set_segments launches.
    let before = stats();
    step.both(&mut ws, &mut h, &set_a, "first step");
    let after = stats();
    assert_eq!((after.allocs - before.allocs, after.uploads - before.uploads), (1, 1));
    assert_eq!(after.launches_of("adafactor_set_segments") - before.launches_of("adafactor_set_segments"), 2);

    // Same stepped set, gradients at new addresses: nothing allocated or uploaded.
    let before = stats();
    h.new_grads(&mut rng, true);
    step.both(&mut ws, &mut h, &set_a, "same set, new gradient addresses");
    let after = stats();
    assert_eq!((after.allocs, after.uploads), (before.allocs, before.uploads));

    // Another set: the table is uploaded again (into the same memory).
    let before = stats();
    h.new_grads(&mut rng, true);
    step.both(&mut ws, &mut h, &set_b, "other set");
    let after = stats();
    assert_eq!((after.allocs - before.allocs, after.uploads - before.uploads), (0, 1));

    // Back to set A under capture: the upload is refused.
    h.new_grads(&mut rng, true);
    refused(&mut ws, &mut h, &set_a, "uploading the Adafactor segment table");

    // Warm-up outside the capture, then captured steps with new gradient addresses succeed.
    step.both(&mut ws, &mut h, &set_a, "warm-up");
    for k in 0..2 {
        h.new_grads(&mut rng, true);
        let before = stats();
        emu.set_capturing(STREAM, true);
        h.snapshot();
        step.device(&mut ws, &mut h, &set_a).unwrap_or_else(|e| panic!("captured step {k}: {e}"));
        emu.set_capturing(STREAM, false);
        step.core(&mut h, &set_a);
        h.check_exact(&format!("captured step {k}"), &set_a);
        let after = stats();
        assert_eq!((after.allocs, after.uploads), (before.allocs, before.uploads));
        assert_eq!(after.captured - before.captured, after.total_launches() - before.total_launches());
    }

    // The workspace frees its memory when dropped.
    drop(ws);
    assert_eq!(emu.live_allocations(ORD), (0, 0));
    let s = stats();
    assert_eq!(s.allocs, s.frees);
    assert_eq!(emu.bad_frees(), 0);
}

/// A stepped tensor with a null address is refused before anything runs (nothing allocated,
/// uploaded or launched, no step count advanced).
#[test]
fn adafactor_refuses_null_addresses_before_anything_runs() {
    const ORD: i32 = 203;
    const STREAM: usize = 203;
    let emu = emu();
    let exec = exec();
    let mut rng = Rng::new(0xADAF_0003);
    let matrices = [[1, 8, 9], [1, 1, 40], [1, 0, 3], [2, 3, 3]];
    let factored = [true, false, false, true];
    let table = smallbatch_core::SegmentTable::with_matrices(&matrices).unwrap();
    let layout = AdafactorLayout::new(&table, &factored).unwrap();
    let hp = AdafactorHyper::default();
    let mut h = harness(&mut rng, &matrices, Dtype::F32, &layout);
    let step = Step { ord: ORD, stream: STREAM, layout: &layout, hp: &hp, exec: &exec };
    let mut ws = AdafactorWorkspace::new(ORD);
    h.new_grads(&mut rng, false);
    h.snapshot();
    let stepped = [true; 4];
    let mut addrs = h.device_addrs(&stepped);
    addrs.1[3] = 0;
    let state =
        AdafactorState { row_var: h.state_addr(0), col_var: h.state_addr(1), variance: h.state_addr(2), exp_avg: 0 };
    let steps = h.dev_steps.clone();
    let err = adafactor_step(
        &mut ws,
        h.group(ORD, STREAM, &addrs),
        &table,
        &layout,
        &stepped,
        &mut h.dev_steps,
        state,
        &hp,
        h.dtype.rounding(),
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "null device address for the gradients of tensor 3");
    assert_eq!(h.dev_steps, steps);
    assert_eq!(emu.stats(ORD, STREAM), Default::default());
    h.check_common("refused", &[false; 4]);
    // The same step with the address works; the empty tensor 2 needs none.
    step.both(&mut ws, &mut h, &stepped, "after the refusal");
}

/// A group without elements may have null state buffers (torch's empty tensors have null data
/// pointers), as for SGD, Adam and Muon, and as the core takes empty slices.
#[test]
fn null_exp_avg_of_an_empty_group_with_momentum() {
    const ORD: i32 = 204;
    const STREAM: usize = 204;
    emu();
    let table = smallbatch_core::SegmentTable::with_matrices(&[[1, 1, 0], [0, 3, 4]]).unwrap();
    let layout = AdafactorLayout::new(&table, &[false, true]).unwrap();
    let hp = AdafactorHyper { beta1: 0.9, ..AdafactorHyper::default() };
    let mut ws = AdafactorWorkspace::new(ORD);
    let (params, grads) = ([0u64; 2], [0u64; 2]);
    let group = smallbatch_cuda::dispatch::DeviceGroup {
        ordinal: ORD,
        stream: STREAM,
        dtype: smallbatch_cuda::dispatch::DeviceDtype::F32,
        params: &params,
        grads: &grads,
        draws: None,
    };
    let state = AdafactorState { row_var: 0, col_var: 0, variance: 0, exp_avg: 0 };
    let mut steps = vec![0.0; 2];
    let rounding = smallbatch_core::driver::Rounding::Nearest;
    adafactor_step(&mut ws, group, &table, &layout, &[true, true], &mut steps, state, &hp, rounding).unwrap();
    assert_eq!(steps, [1.0, 1.0]);
}
