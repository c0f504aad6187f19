//! smallbatch-cuda's sharded Muon step (`muon::muon_step_sharded`: momentum into the caller's
//! updates vector, the exchange called back, the update from the vector) on two ranks as threads
//! whose exchange gathers each matrix, orthogonalises it with `muon::orthogonalize_many` and
//! takes its rows back, against `muon::muon_step` on the whole matrices: the same parameters and
//! momentum bit for bit, f32 and bf16 with stochastic rounding (each shard drawing its elements'
//! own bits), also a rank holding no rows.

mod common;
#[path = "../../core/tests/common/ranks.rs"]
mod ranks;
mod support;

use common::Rng;
use ranks::Ranks;
use smallbatch_core::rules::muon::{LrAdjust, MuonHyper};
use smallbatch_core::SegmentTable;
use smallbatch_cuda::cublas::Inputs;
use smallbatch_cuda::dispatch::DeviceGroup;
use smallbatch_cuda::muon::{muon_step, muon_step_sharded, orthogonalize_many, MuonWorkspace, ShardedUpdates};
use smallbatch_cuda::CudaError;
use support::{assert_bits_eq, emu, value, Dtype};

const WORLD: usize = 2;
const STEPS: usize = 3;
/// Whole matrices `(rows, cols)`, spread over the ranks by rows (the 1x7 matrix leaves rank 1
/// without rows; two matrices share a shape, so the whole step batches them).
const WHOLE: [(usize, usize); 5] = [(37, 23), (1, 7), (300, 64), (5, 40), (37, 23)];

/// torch.chunk's rows of a matrix for `rank`, as FSDP2 shards dim 0.
fn rows_of(rows: usize, rank: usize) -> (usize, usize) {
    let chunk = rows.div_ceil(WORLD);
    ((rank * chunk).min(rows), ((rank + 1) * chunk).min(rows))
}

fn hyper() -> MuonHyper {
    MuonHyper { lr: 0.02, weight_decay: 0.1, adjust_lr: LrAdjust::MatchRmsAdamW, ..MuonHyper::default() }
}

/// A group of matrices with parameters in the case's storage and a momentum buffer.
struct Group {
    table: SegmentTable,
    params: Vec<u8>,
    momentum: Vec<f32>,
    steps: Vec<f64>,
}

impl Group {
    fn new(shapes: &[(usize, usize)], params: Vec<u8>) -> Group {
        let matrices: Vec<[usize; 3]> = shapes.iter().map(|&(r, c)| [1, r, c]).collect();
        let table = SegmentTable::with_matrices(&matrices).unwrap();
        let total = table.total();
        Group { momentum: vec![0.0; total], steps: vec![0.0; shapes.len()], table, params }
    }

    /// The device view of the group with gradients `grads` (laid out like the parameters).
    fn addrs(&mut self, grads: &[u8], esize: usize) -> (Vec<u64>, Vec<u64>) {
        let (p, g) = (self.params.as_mut_ptr() as u64, grads.as_ptr() as u64);
        self.table.offsets().iter().map(|&o| (p + (o * esize) as u64, g + (o * esize) as u64)).unzip()
    }
}

/// Rank `rank`'s rows of every matrix of a whole group's flat values (`esize` bytes each).
fn pick_rows(whole: &[u8], rank: usize, esize: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut at = 0;
    for &(rows, cols) in &WHOLE {
        let (r0, r1) = rows_of(rows, rank);
        out.extend_from_slice(&whole[(at + r0 * cols) * esize..(at + r1 * cols) * esize]);
        at += rows * cols;
    }
    out
}

/// Runs the whole group and its shards for `STEPS` steps on the emulator; returns the whole
/// group's parameters before, the whole group and each rank's.
fn run(dtype: Dtype, ordinal: i32) -> (Vec<u8>, Group, Vec<Group>) {
    emu().set_sm_count(ordinal, 2);
    let hp = hyper();
    let esize = dtype.size();
    let mut rng = Rng::new(0x3D05_0001);
    let total: usize = WHOLE.iter().map(|&(r, c)| r * c).sum();
    let start = dtype.encode(&(0..total).map(|_| value(&mut rng) * 0.1).collect::<Vec<_>>());
    let grads: Vec<Vec<u8>> =
        (0..STEPS).map(|_| dtype.encode(&(0..total).map(|_| value(&mut rng)).collect::<Vec<_>>())).collect();
    let stepped = vec![true; WHOLE.len()];

    let mut whole = Group::new(&WHOLE, start.clone());
    let mut ws = MuonWorkspace::new(ordinal);
    for g in &grads {
        let (pa, ga) = whole.addrs(g, esize);
        let group = DeviceGroup { ordinal, stream: 3300, dtype: dtype.device(), params: &pa, grads: &ga, draws: None };
        let momentum = whole.momentum.as_mut_ptr() as u64;
        muon_step(
            &mut ws,
            group,
            &whole.table,
            &stepped,
            &mut whole.steps,
            momentum,
            &hp,
            Inputs::F32,
            dtype.rounding(),
        )
        .unwrap();
    }

    let ranks: Ranks<f32> = Ranks::new(WORLD);
    let shards = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..WORLD)
            .map(|rank| {
                let (ranks, start, grads, hp, stepped) = (&ranks, &start, &grads, &hp, &stepped);
                scope.spawn(move || {
                    let local: Vec<(usize, usize)> = WHOLE
                        .iter()
                        .map(|&(rows, cols)| {
                            let (r0, r1) = rows_of(rows, rank);
                            (r1 - r0, cols)
                        })
                        .collect();
                    let mut g = Group::new(&local, pick_rows(start, rank, esize));
                    // Each element draws its bits at its index in the whole group.
                    let mut at = 0;
                    let draws: Vec<u64> = WHOLE
                        .iter()
                        .map(|&(rows, cols)| {
                            let d = at + rows_of(rows, rank).0 * cols;
                            at += rows * cols;
                            d as u64
                        })
                        .collect();
                    let mut ows = MuonWorkspace::new(ordinal);
                    let mut updates = vec![f32::NAN; g.table.total()];
                    for grad in grads {
                        let grad = pick_rows(grad, rank, esize);
                        let (pa, ga) = g.addrs(&grad, esize);
                        let stream = 3310 + rank;
                        let group = DeviceGroup {
                            ordinal,
                            stream,
                            dtype: dtype.device(),
                            params: &pa,
                            grads: &ga,
                            draws: Some(&draws),
                        };
                        let (u_addr, capacity) = (updates.as_mut_ptr(), updates.len());
                        let mut orthogonalize = || -> Result<(), String> {
                            // SAFETY: the emulator's device memory is this host vector, which the
                            // momentum kernels have finished writing (launches are synchronous).
                            let u = unsafe { std::slice::from_raw_parts_mut(u_addr, capacity) };
                            let all = ranks.all_gather(rank, u.to_vec());
                            let mut src = Vec::new();
                            let mut ats = [0usize; WORLD];
                            for &(rows, cols) in &WHOLE {
                                for (k, part) in all.iter().enumerate() {
                                    let (r0, r1) = rows_of(rows, k);
                                    src.extend_from_slice(&part[ats[k]..ats[k] + (r1 - r0) * cols]);
                                    ats[k] += (r1 - r0) * cols;
                                }
                            }
                            let mut dst = vec![f32::NAN; src.len()];
                            let (s, d) = (src.as_ptr() as u64, dst.as_mut_ptr() as u64);
                            orthogonalize_many(&mut ows, stream, s, d, &WHOLE, &hp.newton_schulz, Inputs::F32)
                                .map_err(|e| e.to_string())?;
                            let (mut mine, mut at) = (0, 0);
                            for &(rows, cols) in &WHOLE {
                                let (r0, r1) = rows_of(rows, rank);
                                let n = (r1 - r0) * cols;
                                u[mine..mine + n].copy_from_slice(&dst[at + r0 * cols..at + r1 * cols]);
                                mine += n;
                                at += rows * cols;
                            }
                            Ok(())
                        };
                        let up = ShardedUpdates { addr: u_addr as u64, capacity, orthogonalize: &mut orthogonalize };
                        let momentum = g.momentum.as_mut_ptr() as u64;
                        let rounding = dtype.rounding();
                        muon_step_sharded(group, &g.table, stepped, &mut g.steps, momentum, hp, rounding, &WHOLE, up)
                            .unwrap_or_else(|e| panic!("rank {rank}: {e}"));
                    }
                    g
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    (start, whole, shards)
}

#[test]
fn row_shards_step_as_the_whole_matrices_bit_for_bit() {
    for (k, dtype) in [Dtype::F32, Dtype::all()[2]].into_iter().enumerate() {
        let (start, whole, shards) = run(dtype, 330 + k as i32);
        let esize = dtype.size();
        let whole_momentum: Vec<u8> = whole.momentum.iter().flat_map(|x| x.to_le_bytes()).collect();
        for (rank, g) in shards.iter().enumerate() {
            assert_eq!(g.steps, whole.steps, "rank {rank}: step counts");
            let want = dtype.decode(&pick_rows(&whole.params, rank, esize));
            assert_bits_eq(&format!("{dtype:?} rank {rank} parameters"), &dtype.decode(&g.params), &want);
            let want = support::bytes_f32(&pick_rows(&whole_momentum, rank, 4));
            assert_bits_eq(&format!("{dtype:?} rank {rank} momentum"), &g.momentum, &want);
        }
        // The parameters moved.
        assert_ne!(whole.params, start);
    }
}

#[test]
fn a_failed_exchange_or_a_small_vector_leaves_the_parameters() {
    let ordinal = 340;
    emu().set_sm_count(ordinal, 2);
    let table = SegmentTable::with_matrices(&[[1, 2, 3]]).unwrap();
    let mut params = vec![1.0f32; 6];
    let grads = [0.5f32; 6];
    let (pa, ga) = ([params.as_mut_ptr() as u64], [grads.as_ptr() as u64]);
    let mut momentum = vec![0f32; 6];
    let mut updates = vec![0f32; 6];
    let hp = hyper();
    let mut steps = vec![0.0];
    for (capacity, fail) in [(5, false), (6, true)] {
        let group =
            DeviceGroup { ordinal, stream: 3400, dtype: Dtype::F32.device(), params: &pa, grads: &ga, draws: None };
        let mut called = false;
        let mut orthogonalize = || -> Result<(), String> {
            called = true;
            Err("the gather failed".into())
        };
        let up = ShardedUpdates { addr: updates.as_mut_ptr() as u64, capacity, orthogonalize: &mut orthogonalize };
        let m = momentum.as_mut_ptr() as u64;
        let err = muon_step_sharded(group, &table, &[true], &mut steps, m, &hp, Dtype::F32.rounding(), &[(4, 3)], up)
            .unwrap_err();
        if fail {
            assert!(called);
            assert_eq!(err, CudaError::Device("orthogonalising the sharded matrices: the gather failed".into()));
            // The momentum moved (as in the core), the parameters did not.
            assert!(momentum.iter().all(|&m| m != 0.0));
        } else {
            assert!(!called);
            let at = updates.as_ptr() as u64;
            let msg = format!("the updates vector holds 5 f32 at {at:#x}; this step's shards have 6 elements");
            assert_eq!(err, CudaError::Invalid(msg));
            assert_eq!((momentum.clone(), steps.clone()), (vec![0.0; 6], vec![0.0]));
        }
        assert_eq!(params, vec![1.0; 6]);
    }
}
