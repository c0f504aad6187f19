//! A host-supplied parallel-for (how the Python bindings step on torch's OpenMP threads) receives
//! the elementwise work and gives the same bits as the core's own pool. Its own test binary,
//! because the hook is process-wide.

use smallbatch_core::driver::{set_host_parallel_for, uses_host_threads};
use smallbatch_core::rules::adafactor::{adafactor_step, AdafactorBuffers, AdafactorHyper, AdafactorLayout};
use smallbatch_core::rules::adam::{adam_step, AdamBuffers, AdamHyper};
use smallbatch_core::rules::Params;
use smallbatch_core::{Executor, SegmentTable, SimdPath};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn step_adam(exec: &Executor, table: &SegmentTable, n: usize) -> Vec<f32> {
    let mut param: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let grad: Vec<f32> = (0..n).map(|i| ((i * 104_729) % 977) as f32 / 977.0 - 0.5).collect();
    let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
    let mut steps = vec![0.0; table.len()];
    let hp = AdamHyper { lr: 1e-2, ..AdamHyper::default() };
    let stepped = vec![true; table.len()];
    for _ in 0..3 {
        let bufs = AdamBuffers {
            params: Params::F32 { param: &mut param, grad: &grad },
            exp_avg: &mut m,
            exp_avg_sq: &mut v,
            max_exp_avg_sq: None,
        };
        adam_step(exec, table, &stepped, &mut steps, bufs, &hp).unwrap();
    }
    param
}

/// Adafactor's phases (parallel maps with results) go through the same hook.
fn step_adafactor(exec: &Executor) -> Vec<f32> {
    let table = SegmentTable::with_matrices(&[[1, 300, 301], [4, 64, 64], [1, 1, 5000]]).unwrap();
    let layout = AdafactorLayout::new(&table, &[true, true, false]).unwrap();
    let n = table.total();
    let mut param: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let grad: Vec<f32> = (0..n).map(|i| ((i * 104_729) % 977) as f32 / 977.0 - 0.5).collect();
    let (mut row, mut col, mut var) = (vec![0.0; layout.row_total], vec![0.0; layout.col_total], vec![0.0; 5000]);
    let mut steps = vec![0.0; 3];
    for _ in 0..2 {
        let bufs = AdafactorBuffers {
            params: Params::F32 { param: &mut param, grad: &grad },
            row_var: &mut row,
            col_var: &mut col,
            variance: &mut var,
            exp_avg: None,
        };
        adafactor_step(exec, &table, &layout, &[true; 3], &mut steps, bufs, &AdafactorHyper::default()).unwrap();
    }
    param
}

#[test]
fn host_parallel_for_runs_the_tasks_and_changes_no_bit() {
    let n = 300_001;
    let table = SegmentTable::packed(&[100_000, 200_001]).unwrap();
    let pool = Executor::new(SimdPath::selected().unwrap(), 3).unwrap();
    let reference = step_adam(&pool, &table, n);
    let reference_adafactor = step_adafactor(&pool);

    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    assert!(!uses_host_threads());
    // The host here runs the tasks in reverse order on two scoped threads: order and placement
    // must not matter.
    assert!(set_host_parallel_for(Box::new(move |tasks, body| {
        counted.fetch_add(1, Ordering::Relaxed);
        std::thread::scope(|s| {
            s.spawn(|| (0..tasks).rev().step_by(2).for_each(body));
            s.spawn(|| (0..tasks).rev().skip(1).step_by(2).for_each(body));
        });
    })));
    assert!(uses_host_threads());
    assert!(!set_host_parallel_for(Box::new(|_, _| {})), "set once");
    let hosted = step_adam(&pool, &table, n);
    assert_eq!(calls.load(Ordering::Relaxed), 3, "one host call per step");
    assert_eq!(
        reference.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        hosted.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );

    let before = calls.load(Ordering::Relaxed);
    let hosted_adafactor = step_adafactor(&pool);
    assert!(calls.load(Ordering::Relaxed) > before, "Adafactor's phases ran on the host");
    assert_eq!(
        reference_adafactor.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        hosted_adafactor.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    let calls_so_far = calls.load(Ordering::Relaxed);

    // A one-thread executor keeps everything on the caller.
    let single = Executor::new(SimdPath::selected().unwrap(), 1).unwrap();
    let _ = step_adam(&single, &table, n);
    let _ = step_adafactor(&single);
    assert_eq!(calls.load(Ordering::Relaxed), calls_so_far);
}
