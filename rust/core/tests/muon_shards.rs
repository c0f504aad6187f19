//! `muon_step_sharded` on the row shards of a group spread over two ranks (threads that swap
//! their momentum outputs, as the torch layer gathers a matrix to one rank) against `muon_step`
//! on the whole matrices: the same parameters and momentum bit for bit, f32 and bf16 with
//! stochastic rounding (each shard drawing its elements' own bits).

use smallbatch_core::driver::Rounding;
use smallbatch_core::newton_schulz::orthogonalize_many;
use smallbatch_core::rounding::round_bf16_nearest;
use smallbatch_core::rules::muon::{muon_step, muon_step_sharded, LrAdjust, MuonBuffers, MuonHyper};
use smallbatch_core::rules::{Params, Storage, TensorAddresses};
use smallbatch_core::{Error, Executor, SegmentTable, SimdPath};

mod common;
use common::ranks::Ranks;
use common::Rng;

impl Rng {
    fn value(&mut self) -> f32 {
        ((self.next() % 2_000_001) as f32 / 1_000_000.0 - 1.0) * 0.1
    }
}

/// Whole matrices `(rows, cols)`, each spread over the ranks by rows (torch.chunk's split: the
/// 1x7 matrix leaves rank 1 without rows).
const WHOLE: [(usize, usize); 4] = [(37, 23), (1, 7), (300, 64), (5, 40)];
const WORLD: usize = 2;

fn rows_of(rows: usize, rank: usize) -> (usize, usize) {
    let chunk = rows.div_ceil(WORLD);
    ((rank * chunk).min(rows), ((rank + 1) * chunk).min(rows))
}

fn hyper() -> MuonHyper {
    MuonHyper { lr: 0.02, weight_decay: 0.1, adjust_lr: LrAdjust::MatchRmsAdamW, ..MuonHyper::default() }
}

#[test]
fn row_shards_step_as_the_whole_matrices() {
    let exec = Executor::new(SimdPath::best(), 2).unwrap();
    let hp = hyper();
    for storage in [Storage::F32, Storage::Bf16(Rounding::Stochastic { seed: 3, stream: 1 })] {
        let mut rng = Rng(0x3_0a5d);
        let whole_table = SegmentTable::with_matrices(&WHOLE.map(|(r, c)| [1, r, c])).unwrap();
        let total = whole_table.total();
        let param: Vec<f32> = (0..total).map(|_| rng.value()).collect();
        let grads: Vec<Vec<f32>> = (0..3).map(|_| (0..total).map(|_| rng.value()).collect()).collect();
        let bf16 = |v: &[f32]| v.iter().map(|&x| round_bf16_nearest(x)).collect::<Vec<u16>>();
        let as_f32 = |v: &[u16]| v.iter().map(|&b| f32::from_bits((b as u32) << 16)).collect::<Vec<f32>>();
        let stored = |v: &[f32]| if storage == Storage::F32 { v.to_vec() } else { as_f32(&bf16(v)) };

        // The whole matrices, stepped in one process.
        let (mut wp, mut wp16) = (param.clone(), bf16(&param));
        let mut wm = vec![0f32; total];
        let mut wsteps = vec![0.0; WHOLE.len()];
        for g in &grads {
            let g16 = bf16(g);
            let params = match storage {
                Storage::F32 => Params::F32 { param: &mut wp, grad: g },
                Storage::Bf16(rounding) => Params::Bf16 { param: &mut wp16, grad: &g16, rounding },
            };
            muon_step(&exec, &whole_table, &[true; 4], &mut wsteps, MuonBuffers { params, momentum: &mut wm }, &hp)
                .unwrap();
        }
        let whole_params = if storage == Storage::F32 { wp.clone() } else { as_f32(&wp16) };

        let exchange = Ranks::<f32>::new(WORLD);
        let results: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..WORLD)
                .map(|rank| {
                    let (exchange, exec, hp, param, grads, whole_table) =
                        (&exchange, &exec, &hp, &param, &grads, &whole_table);
                    scope.spawn(move || {
                        let ranges: Vec<std::ops::Range<usize>> = WHOLE
                            .iter()
                            .enumerate()
                            .map(|(i, &(r, c))| {
                                let (r0, r1) = rows_of(r, rank);
                                whole_table.offsets()[i] + r0 * c..whole_table.offsets()[i] + r1 * c
                            })
                            .collect();
                        let pick = |v: &[f32]| ranges.iter().flat_map(|r| v[r.clone()].to_vec()).collect::<Vec<f32>>();
                        let shapes: Vec<[usize; 3]> =
                            WHOLE.iter().map(|&(r, c)| [1, rows_of(r, rank).1 - rows_of(r, rank).0, c]).collect();
                        let table = SegmentTable::with_matrices(&shapes).unwrap();
                        let (mut p, mut p16) = (pick(param), bf16(&pick(param)));
                        let mut m = vec![0f32; table.total()];
                        let mut steps = vec![0.0; WHOLE.len()];
                        let draws: Vec<usize> = ranges.iter().map(|r| r.start).collect();
                        for g in grads {
                            let (gl, gl16) = (pick(g), bf16(&pick(g)));
                            let esize = if storage == Storage::F32 { 4 } else { 2 };
                            let (pa, ga) = match storage {
                                Storage::F32 => (p.as_mut_ptr() as usize, gl.as_ptr() as usize),
                                Storage::Bf16(_) => (p16.as_mut_ptr() as usize, gl16.as_ptr() as usize),
                            };
                            let addrs = |base: usize| table.offsets().iter().map(|&o| base + o * esize).collect();
                            // SAFETY: the buffers outlive the step.
                            let t = unsafe { TensorAddresses::new(storage, addrs(pa), addrs(ga)) };
                            let bufs = MuonBuffers {
                                params: Params::Tensors(t.with_draw_offsets(draws.clone())),
                                momentum: &mut m,
                            };
                            // Every rank orthogonalises every whole matrix (the torch layer
                            // gives each matrix to one owner; the bits are the same).
                            let mut ortho = |u: &mut [f32]| {
                                let all = exchange.all_gather(rank, u.to_vec());
                                let mut full = Vec::new();
                                let mut at = [0usize; WORLD];
                                for &(r, c) in &WHOLE {
                                    for (k, a) in at.iter_mut().enumerate() {
                                        let n = (rows_of(r, k).1 - rows_of(r, k).0) * c;
                                        full.extend_from_slice(&all[k][*a..*a + n]);
                                        *a += n;
                                    }
                                }
                                let mut out = vec![0f32; full.len()];
                                orthogonalize_many(exec, &full, &WHOLE, &hp.newton_schulz, &mut out)?;
                                let mine: Vec<f32> = WHOLE
                                    .iter()
                                    .scan(0usize, |start, &(r, c)| {
                                        let (r0, r1) = rows_of(r, rank);
                                        let piece = out[*start + r0 * c..*start + r1 * c].to_vec();
                                        *start += r * c;
                                        Some(piece)
                                    })
                                    .flatten()
                                    .collect();
                                u.copy_from_slice(&mine);
                                Ok(())
                            };
                            muon_step_sharded(exec, &table, &[true; 4], &mut steps, bufs, hp, &WHOLE, &mut ortho)
                                .unwrap();
                        }
                        let out = if storage == Storage::F32 { p } else { as_f32(&p16) };
                        (out, m)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (rank, (p, m)) in results.iter().enumerate() {
            let mut at = 0;
            for (i, &(r, c)) in WHOLE.iter().enumerate() {
                let (r0, r1) = rows_of(r, rank);
                let range = whole_table.offsets()[i] + r0 * c..whole_table.offsets()[i] + r1 * c;
                let n = range.len();
                assert_eq!(p[at..at + n], whole_params[range.clone()], "{storage:?} rank {rank} matrix {i}");
                assert_eq!(m[at..at + n], wm[range], "{storage:?} rank {rank} matrix {i}: momentum");
                at += n;
            }
        }
        // The parameters moved (the comparison is not of untouched values).
        assert_ne!(stored(&param), whole_params);
    }
}

#[test]
fn a_failed_exchange_is_returned_and_leaves_parameters_and_steps() {
    let exec = Executor::new(SimdPath::Scalar, 1).unwrap();
    let table = SegmentTable::with_matrices(&[[1, 2, 3]]).unwrap();
    let (mut p, g, mut m) = (vec![0.5f32; 6], vec![0.25f32; 6], vec![0f32; 6]);
    let mut steps = vec![4.0];
    let bufs = MuonBuffers { params: Params::F32 { param: &mut p, grad: &g }, momentum: &mut m };
    let mut fail = |_: &mut [f32]| Err(Error::Collective("gloo: connection closed".into()));
    let err = muon_step_sharded(&exec, &table, &[true], &mut steps, bufs, &hyper(), &[(4, 3)], &mut fail).unwrap_err();
    assert!(err.to_string().contains("connection closed"), "{err}");
    assert_eq!((&p, &steps), (&vec![0.5; 6], &vec![4.0]));
    // A shard wider than its whole matrix is refused before anything runs.
    let (mut p, g, mut m) = (vec![0.5f32; 6], vec![0.25f32; 6], vec![0f32; 6]);
    let bufs = MuonBuffers { params: Params::F32 { param: &mut p, grad: &g }, momentum: &mut m };
    let err =
        muon_step_sharded(&exec, &table, &[true], &mut steps, bufs, &hyper(), &[(4, 2)], &mut |_| Ok(())).unwrap_err();
    assert!(err.to_string().contains("not part of whole 4x2 matrices"), "{err}");
    assert_eq!(m, vec![0.0; 6]);
}
