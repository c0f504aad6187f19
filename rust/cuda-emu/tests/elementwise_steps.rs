//! smallbatch-cuda's SGD and Adam/AdamW steps (`dispatch::sgd_step`, `dispatch::adam_step`: the
//! real host code, tensor lists and launch shapes) on the emulator, against the Rust core on
//! the same tensors: parameters, state and step counts bit for bit. Also their counted forms
//! (`sgd_step_counted`, `adam_step_counted`: step counts and learning rate on the device, as
//! torch's capturable=True), against the same core steps.

mod common;
mod support;

use common::Rng;
use smallbatch_core::rules::adam::{adam_step as core_adam, AdamBuffers, AdamHyper};
use smallbatch_core::rules::sgd::{sgd_step as core_sgd, SgdBuffers, SgdHyper};
use smallbatch_cuda::dispatch::{
    adam_step, adam_step_counted, sgd_step, sgd_step_counted, tensor_lists, DeviceCounts, DeviceGroup, LIST_TENSORS,
};
use smallbatch_cuda::CudaError;
use support::{emu, exec, lr_source, pick, random_matrices, random_stepped, value, Dtype, Harness};

/// (tensors, large tensors) of case `c`: one group of more than 84 tensors (several lists per
/// step count), one with large tensors, then random ones.
fn shape_of_case(rng: &mut Rng, c: usize) -> (usize, usize) {
    match c {
        0 => (130, 0),
        1 => (12, 2),
        _ => (1 + pick(rng, 40), pick(rng, 2)),
    }
}

/// The launches one step of `stepped` needs: one per tensor list.
fn expected_lists(group: &DeviceGroup<'_>, h: &Harness, stepped: &[bool]) -> u64 {
    let mut steps = h.dev_steps.clone();
    let runs = h.table.plan_step(stepped, &mut steps).unwrap();
    tensor_lists(group, &h.table, &runs).unwrap().len() as u64
}

#[test]
fn sgd_equals_the_core_bit_for_bit() {
    const ORD: i32 = 101;
    const STREAM: usize = 101;
    let emu = emu();
    emu.set_sm_count(ORD, 2);
    let exec = exec();
    let mut rng = Rng::new(0x5_6D01);
    let variants = [
        SgdHyper { lr: 0.1, ..SgdHyper::default() },
        SgdHyper { lr: 0.05, momentum: 0.9, dampening: 0.1, weight_decay: 0.01, ..SgdHyper::default() },
        SgdHyper { lr: 0.02, momentum: 0.8, nesterov: true, maximize: true, weight_decay: 1e-3, ..SgdHyper::default() },
        SgdHyper { lr: 0.1, momentum: 0.5, maximize: true, ..SgdHyper::default() },
    ];
    let mut tile_path_tiles = 0;
    for c in 0..support::cases(8) {
        let (count, large) = shape_of_case(&mut rng, c);
        let matrices = random_matrices(&mut rng, count, large);
        for (d, dtype) in Dtype::all().into_iter().enumerate() {
            let hp = variants[(3 * c + d) % variants.len()];
            let total = matrices.iter().map(|m| m[0] * m[1] * m[2]).sum();
            // A misaligned momentum buffer turns sgd_bf16's 16-byte path off.
            let state_offset = if pick(&mut rng, 4) == 0 { 4 } else { 0 };
            let mut h = Harness::new(&mut rng, &matrices, dtype, &[total], state_offset, |rng, _| value(rng));
            if c % 2 == 1 {
                // A shard: its random bits are drawn where the unsharded group would draw them.
                h.shift_draws(&mut rng);
            }
            if matches!(dtype, Dtype::Bf16(_)) && state_offset == 0 {
                tile_path_tiles += h.whole_aligned_tiles();
            }
            let use_momentum = hp.momentum != 0.0;
            for step in 0..3 {
                let what = format!("case {c} {dtype:?} {hp:?} step {step}");
                let stepped = random_stepped(&mut rng, h.table.len());
                h.new_grads(&mut rng, step > 0);
                h.snapshot();
                let addrs = h.device_addrs(&stepped);
                let group = h.group(ORD, STREAM, &addrs);
                let lists = expected_lists(&group, &h, &stepped);
                let before = emu.stats(ORD, STREAM);
                let momentum = if use_momentum { h.state_addr(0) } else { 0 };
                sgd_step(group, &h.table, &stepped, &mut h.dev_steps, momentum, &hp, dtype.rounding())
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                let after = emu.stats(ORD, STREAM);
                let kernel = format!("sgd_{}", if dtype == Dtype::F32 { "f32" } else { "bf16" });
                assert_eq!(after.launches_of(&kernel) - before.launches_of(&kernel), lists, "{what}: launches");
                assert_eq!(
                    (after.uploads, after.allocs),
                    (before.uploads, before.allocs),
                    "{what}: a step copies nothing"
                );
                let params = h.core_params(&stepped);
                let momentum = if use_momentum { Some(&mut h.core_state[0][..]) } else { None };
                core_sgd(&exec, &h.table, &stepped, &mut h.core_steps, SgdBuffers { params, momentum }, &hp).unwrap();
                h.check_exact(&what, &stepped);
            }
        }
    }
    assert!(tile_path_tiles > 50, "sgd_bf16's 16-byte tile path was hardly exercised ({tile_path_tiles} tiles)");
}

#[test]
fn adam_and_adamw_equal_the_core_bit_for_bit() {
    const ORD: i32 = 102;
    const STREAM: usize = 102;
    let emu = emu();
    emu.set_sm_count(ORD, 2);
    let exec = exec();
    let mut rng = Rng::new(0xADA_0002);
    let variants = [
        AdamHyper { lr: 1e-2, weight_decay: 0.01, ..AdamHyper::default() },
        AdamHyper { lr: 1e-2, weight_decay: 0.1, decoupled_weight_decay: true, ..AdamHyper::default() },
        AdamHyper { lr: 3e-3, amsgrad: true, beta1: 0.8, beta2: 0.99, eps: 1e-6, ..AdamHyper::default() },
        AdamHyper {
            lr: 1e-3,
            weight_decay: 0.05,
            decoupled_weight_decay: true,
            amsgrad: true,
            maximize: true,
            ..AdamHyper::default()
        },
        AdamHyper { lr: 1e-2, beta1: 0.0, maximize: true, ..AdamHyper::default() },
    ];
    for c in 0..support::cases(8) {
        let (count, large) = shape_of_case(&mut rng, c);
        let matrices = random_matrices(&mut rng, count, large);
        for (d, dtype) in Dtype::all().into_iter().enumerate() {
            let hp = variants[(3 * c + d) % variants.len()];
            let total = matrices.iter().map(|m| m[0] * m[1] * m[2]).sum();
            // exp_avg any value, the second moments non-negative.
            let init = |rng: &mut Rng, k: usize| if k == 0 { value(rng) } else { value(rng).abs() * 1e-2 };
            let mut h = Harness::new(&mut rng, &matrices, dtype, &[total, total, total], 0, init);
            if c % 2 == 1 {
                // A shard: its random bits are drawn where the unsharded group would draw them.
                h.shift_draws(&mut rng);
            }
            for step in 0..3 {
                let what = format!("case {c} {dtype:?} {hp:?} step {step}");
                let stepped = random_stepped(&mut rng, h.table.len());
                h.new_grads(&mut rng, step > 0);
                h.snapshot();
                let addrs = h.device_addrs(&stepped);
                let group = h.group(ORD, STREAM, &addrs);
                let lists = expected_lists(&group, &h, &stepped);
                let before = emu.stats(ORD, STREAM);
                let max_sq = if hp.amsgrad { h.state_addr(2) } else { 0 };
                let (m, v) = (h.state_addr(0), h.state_addr(1));
                adam_step(group, &h.table, &stepped, &mut h.dev_steps, m, v, max_sq, &hp, dtype.rounding())
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(emu.stats(ORD, STREAM).total_launches() - before.total_launches(), lists, "{what}");
                let params = h.core_params(&stepped);
                let [m, v, max_sq] = &mut h.core_state[..] else { unreachable!() };
                let max_exp_avg_sq = if hp.amsgrad { Some(&mut max_sq[..]) } else { None };
                let bufs = AdamBuffers { params, exp_avg: m, exp_avg_sq: v, max_exp_avg_sq };
                core_adam(&exec, &h.table, &stepped, &mut h.core_steps, bufs, &hp).unwrap();
                h.check_exact(&what, &stepped);
            }
        }
    }
}

/// A stepped tensor without an address is refused before anything runs: no launch, no step
/// count advanced, no parameter changed. Tensors that are not stepped, or empty, need none.
#[test]
fn null_addresses_of_stepped_tensors_are_refused_before_any_launch() {
    const ORD: i32 = 103;
    const STREAM: usize = 103;
    let emu = emu();
    let mut rng = Rng::new(0x0103);
    for dtype in [Dtype::F32, Dtype::Bf16(smallbatch_core::driver::Rounding::Nearest)] {
        let matrices = [[1, 1, 300], [1, 1, 0], [1, 4, 5], [1, 1, 7]];
        let total = 327;
        let mut h = Harness::new(&mut rng, &matrices, dtype, &[total, total, total], 0, |rng, _| value(rng).abs());
        h.new_grads(&mut rng, false);
        h.snapshot();
        let stepped = [true, true, true, false];
        for (bad_param, tensor) in [(true, 2), (false, 0), (false, 2)] {
            let mut addrs = h.device_addrs(&stepped);
            if bad_param {
                addrs.0[tensor] = 0;
            } else {
                addrs.1[tensor] = 0;
            }
            let before = emu.stats(ORD, STREAM);
            let steps_before = h.dev_steps.clone();
            let hp = SgdHyper { lr: 0.1, momentum: 0.9, ..SgdHyper::default() };
            let m0 = h.state_addr(0);
            let err =
                sgd_step(h.group(ORD, STREAM, &addrs), &h.table, &stepped, &mut h.dev_steps, m0, &hp, dtype.rounding())
                    .unwrap_err();
            let what = if bad_param { "parameters" } else { "gradients" };
            assert_eq!(err, CudaError::Invalid(format!("null device address for the {what} of tensor {tensor}")));
            let (m, v) = (h.state_addr(0), h.state_addr(1));
            let err = adam_step(
                h.group(ORD, STREAM, &addrs),
                &h.table,
                &stepped,
                &mut h.dev_steps,
                m,
                v,
                0,
                &AdamHyper::default(),
                dtype.rounding(),
            )
            .unwrap_err();
            assert!(err.to_string().starts_with("null device address"), "{err}");
            assert_eq!(emu.stats(ORD, STREAM), before, "nothing may run");
            assert_eq!(h.dev_steps, steps_before);
            h.check_common("refused step", &[false; 4]);
        }
        // Misaligned addresses are refused too.
        let mut addrs = h.device_addrs(&stepped);
        addrs.0[0] += 1;
        let m0 = h.state_addr(0);
        let err = sgd_step(
            h.group(ORD, STREAM, &addrs),
            &h.table,
            &stepped,
            &mut h.dev_steps,
            m0,
            &SgdHyper::default(),
            dtype.rounding(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("is not aligned to"), "{err}");
        // The empty tensor 1 and the unstepped tensor 3 with null addresses are fine.
        let mut addrs = h.device_addrs(&stepped);
        for i in [1, 3] {
            addrs.0[i] = 0;
            addrs.1[i] = 0;
        }
        let steps_before = h.dev_steps.clone();
        let m0 = h.state_addr(0);
        sgd_step(
            h.group(ORD, STREAM, &addrs),
            &h.table,
            &stepped,
            &mut h.dev_steps,
            m0,
            &SgdHyper::default(),
            dtype.rounding(),
        )
        .unwrap();
        let expected: Vec<f64> = steps_before.iter().zip(stepped).map(|(s, on)| s + on as u8 as f64).collect();
        assert_eq!(h.dev_steps, expected);
        h.core_steps = h.dev_steps.clone();
        h.check_common("null addresses of idle tensors", &stepped);
    }
}

/// SGD and Adam never allocate or copy from the host: a step on a captured stream just runs,
/// even the first one.
#[test]
fn elementwise_steps_run_while_the_stream_is_captured() {
    const ORD: i32 = 104;
    const STREAM: usize = 104;
    let emu = emu();
    let exec = exec();
    let mut rng = Rng::new(0x0104);
    let matrices = random_matrices(&mut rng, 30, 1);
    let total = matrices.iter().map(|m| m[0] * m[1] * m[2]).sum();
    let dtype = Dtype::all()[2];
    let mut h = Harness::new(&mut rng, &matrices, dtype, &[total], 0, |rng, _| value(rng));
    let hp = SgdHyper { lr: 0.05, momentum: 0.9, ..SgdHyper::default() };
    emu.set_capturing(STREAM, true);
    for step in 0..2 {
        let stepped = random_stepped(&mut rng, h.table.len());
        h.new_grads(&mut rng, true);
        h.snapshot();
        let addrs = h.device_addrs(&stepped);
        let m0 = h.state_addr(0);
        sgd_step(h.group(ORD, STREAM, &addrs), &h.table, &stepped, &mut h.dev_steps, m0, &hp, dtype.rounding())
            .unwrap();
        let params = h.core_params(&stepped);
        let bufs = SgdBuffers { params, momentum: Some(&mut h.core_state[0][..]) };
        core_sgd(&exec, &h.table, &stepped, &mut h.core_steps, bufs, &hp).unwrap();
        h.check_exact(&format!("captured step {step}"), &stepped);
    }
    emu.set_capturing(STREAM, false);
    let stats = emu.stats(ORD, STREAM);
    assert!(stats.captured > 0 && stats.captured == stats.total_launches());
    assert_eq!((stats.uploads, stats.allocs, stats.copies), (0, 0, 0));
}

/// Counted steps read each tensor's count and the learning rate on the device: with mixed counts
/// in one list, a learning rate that changes every step (by value, float32 or float64 tensor) and
/// the stream marked captured, parameters, state and counts equal the core's plain steps bit for
/// bit; one launch per list of stepped tensors (whatever their counts), then the counters'.
#[test]
fn counted_steps_equal_the_core_bit_for_bit() {
    const ORD: i32 = 105;
    const STREAM: usize = 105;
    let emu = emu();
    emu.set_sm_count(ORD, 2);
    let exec = exec();
    let mut rng = Rng::new(0xC0_0105);
    let sgd_variants = [
        SgdHyper { lr: 0.05, momentum: 0.9, dampening: 0.1, weight_decay: 0.01, ..SgdHyper::default() },
        SgdHyper { lr: 0.02, momentum: 0.8, nesterov: true, maximize: true, weight_decay: 1e-3, ..SgdHyper::default() },
    ];
    let adam_variants = [
        AdamHyper { lr: 1e-2, weight_decay: 0.1, decoupled_weight_decay: true, ..AdamHyper::default() },
        AdamHyper {
            lr: 3e-3,
            amsgrad: true,
            beta1: 0.8,
            beta2: 0.99,
            eps: 1e-6,
            weight_decay: 0.01,
            ..AdamHyper::default()
        },
    ];
    let (mut f32_cell, mut f64_cell) = (Box::new(0f32), Box::new(0f64));
    emu.set_capturing(STREAM, true);
    for c in 0..support::cases(6) {
        let (count, large) = shape_of_case(&mut rng, c);
        let matrices = random_matrices(&mut rng, count, large);
        let total = matrices.iter().map(|m| m[0] * m[1] * m[2]).sum();
        for (d, dtype) in Dtype::all().into_iter().enumerate() {
            let adam = (c + d) % 2 == 0;
            let init = |rng: &mut Rng, k: usize| if k == 0 { value(rng) } else { value(rng).abs() * 1e-2 };
            let mut h = Harness::new(&mut rng, &matrices, dtype, &[total, total, total], 0, init);
            if c % 2 == 1 {
                h.shift_draws(&mut rng);
            }
            for step in 0..3 {
                let stepped = random_stepped(&mut rng, h.table.len());
                h.new_grads(&mut rng, step > 0);
                h.snapshot();
                let addrs = h.device_addrs(&stepped);
                let group = h.group(ORD, STREAM, &addrs);
                let counters = h.dev_steps.as_mut_ptr() as u64;
                let scheduled = 1.0 / (1.0 + step as f64 + c as f64);
                let runs = (0..h.table.len()).filter(|&i| stepped[i] && h.table.numels()[i] > 0).count();
                let advanced = stepped.iter().filter(|&&on| on).count();
                let before = emu.stats(ORD, STREAM);
                let what;
                if adam {
                    let hp = adam_variants[(c + step) % 2];
                    let (counts, lr) = lr_source(c + step, hp.lr * scheduled, counters, &mut f32_cell, &mut f64_cell);
                    what = format!("case {c} {dtype:?} {hp:?} lr {lr} step {step}");
                    let max_sq = if hp.amsgrad { h.state_addr(2) } else { 0 };
                    let (m, v) = (h.state_addr(0), h.state_addr(1));
                    // The hyperparameters' lr is ignored: the source's is used.
                    let dev_hp = AdamHyper { lr: 123.0, ..hp };
                    adam_step_counted(group, &h.table, &stepped, counts, m, v, max_sq, &dev_hp, dtype.rounding())
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    let params = h.core_params(&stepped);
                    let [m, v, max_sq] = &mut h.core_state[..] else { unreachable!() };
                    let max_exp_avg_sq = if hp.amsgrad { Some(&mut max_sq[..]) } else { None };
                    let bufs = AdamBuffers { params, exp_avg: m, exp_avg_sq: v, max_exp_avg_sq };
                    core_adam(&exec, &h.table, &stepped, &mut h.core_steps, bufs, &AdamHyper { lr, ..hp }).unwrap();
                } else {
                    let hp = sgd_variants[(c + step) % 2];
                    let (counts, lr) = lr_source(c + step, hp.lr * scheduled, counters, &mut f32_cell, &mut f64_cell);
                    what = format!("case {c} {dtype:?} {hp:?} lr {lr} step {step}");
                    let m0 = h.state_addr(0);
                    sgd_step_counted(
                        group,
                        &h.table,
                        &stepped,
                        counts,
                        m0,
                        &SgdHyper { lr: -1.0, ..hp },
                        dtype.rounding(),
                    )
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                    let params = h.core_params(&stepped);
                    let bufs = SgdBuffers { params, momentum: Some(&mut h.core_state[0][..]) };
                    core_sgd(&exec, &h.table, &stepped, &mut h.core_steps, bufs, &SgdHyper { lr, ..hp }).unwrap();
                }
                let after = emu.stats(ORD, STREAM);
                let kernel = format!("{}_counted_{}", if adam { "adam" } else { "sgd" }, dtype.device().suffix());
                let lists = runs.div_ceil(LIST_TENSORS) as u64;
                assert_eq!(after.launches_of(&kernel) - before.launches_of(&kernel), lists, "{what}: launches");
                let advances = after.launches_of("advance_step_counters") - before.launches_of("advance_step_counters");
                assert_eq!(advances, advanced.div_ceil(LIST_TENSORS) as u64, "{what}: counter launches");
                assert_eq!((after.uploads, after.allocs, after.copies), (before.uploads, before.allocs, before.copies));
                h.check_exact(&what, &stepped);
            }
        }
    }
    emu.set_capturing(STREAM, false);
}

/// A counted step checks its counters' and learning rate's addresses before anything runs.
#[test]
fn counted_steps_refuse_bad_counter_addresses() {
    const ORD: i32 = 106;
    const STREAM: usize = 106;
    let emu = emu();
    let mut rng = Rng::new(0x0106);
    let matrices = [[1, 1, 30], [1, 2, 3]];
    let mut h = Harness::new(&mut rng, &matrices, Dtype::F32, &[36], 0, |rng, _| value(rng));
    h.new_grads(&mut rng, false);
    let stepped = [true, true];
    let addrs = h.device_addrs(&stepped);
    let m0 = h.state_addr(0);
    let hp = SgdHyper { momentum: 0.9, ..SgdHyper::default() };
    let before = emu.stats(ORD, STREAM);
    let counters = h.dev_steps.as_mut_ptr() as u64;
    for (counts, expected) in [
        (DeviceCounts::new(0, 0.1, 0, false), "the step counts' device address 0x0 is null or not aligned to 8 bytes"),
        (
            DeviceCounts::new(counters, 0.1, 0x1002, true),
            "the learning rate's device address 0x1002 is not aligned to 8 bytes",
        ),
    ] {
        let err =
            sgd_step_counted(h.group(ORD, STREAM, &addrs), &h.table, &stepped, counts, m0, &hp, Dtype::F32.rounding())
                .unwrap_err();
        assert_eq!(err, CudaError::Invalid(expected.into()));
    }
    assert_eq!(emu.stats(ORD, STREAM), before, "nothing may run");
}
