//! The C API through its `extern "C"` functions, as a C caller sees it: every invalid call
//! returns its status and a message naming the culprit, and state exported and imported as
//! bytes continues a run bit for bit.

use smallbatch_capi::*;
use smallbatch_core::rules::adam::{adam_step, AdamBuffers, AdamHyper};
use smallbatch_core::rules::Params;
use smallbatch_core::{halflife, rounding, Executor, SegmentTable};
use std::ffi::CStr;
use std::ptr::{null, null_mut};

fn last_error() -> String {
    unsafe { CStr::from_ptr(smallbatch_last_error()) }.to_str().unwrap().to_string()
}

/// Asserts that `status` is `expected` and the thread's message contains every piece of `parts`.
#[track_caller]
fn assert_fails(status: SmallbatchStatus, expected: SmallbatchStatus, parts: &[&str]) {
    let msg = last_error();
    assert_eq!(status, expected, "message: {msg}");
    for p in parts {
        assert!(msg.contains(p), "{msg:?} does not mention {p:?}");
    }
}

fn config(rule: SmallbatchRule) -> SmallbatchConfig {
    let mut c = std::mem::MaybeUninit::<SmallbatchConfig>::uninit();
    assert_eq!(unsafe { smallbatch_config_default(rule as u32, c.as_mut_ptr()) }, SmallbatchStatus::Ok);
    unsafe { c.assume_init() }
}

fn tensor(shape: &[usize]) -> SmallbatchTensor {
    let mut t = SmallbatchTensor { ndim: shape.len() as u32, shape: [0; SMALLBATCH_MAX_DIMS] };
    t.shape[..shape.len()].copy_from_slice(shape);
    t
}

/// A handle, freed on drop.
struct Opt(*mut SmallbatchOptimizer);

impl Drop for Opt {
    fn drop(&mut self) {
        unsafe { smallbatch_optimizer_free(self.0) }
    }
}

fn try_new(cfg: &SmallbatchConfig, tensors: &[SmallbatchTensor]) -> Result<Opt, SmallbatchStatus> {
    // Not NULL, so that the test sees it overwritten, also on failure.
    let mut out = std::ptr::NonNull::<SmallbatchOptimizer>::dangling().as_ptr();
    let status = unsafe { smallbatch_optimizer_new(cfg, tensors.as_ptr(), tensors.len(), &mut out) };
    if status == SmallbatchStatus::Ok {
        assert!(!out.is_null());
        Ok(Opt(out))
    } else {
        assert!(out.is_null(), "a failed smallbatch_optimizer_new must leave *out NULL");
        Err(status)
    }
}

fn new(cfg: &SmallbatchConfig, tensors: &[SmallbatchTensor]) -> Opt {
    try_new(cfg, tensors).unwrap_or_else(|s| panic!("{s:?}: {}", last_error()))
}

/// Deterministic gradients for step `t`.
fn grads(n: usize, t: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7 + t * 13) % 23) as f32 / 23.0 - 0.45).collect()
}

/// Deterministic initial parameters. Plain arithmetic: a transcendental function could be
/// constant-folded where the count is a constant and differ by an ulp from the run-time one.
fn init(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect()
}

fn step_f32(opt: &Opt, param: &mut [f32], grad: &[f32]) {
    let s = unsafe { smallbatch_optimizer_step_f32(opt.0, param.as_mut_ptr(), grad.as_ptr(), param.len()) };
    assert_eq!(s, SmallbatchStatus::Ok, "{}", last_error());
}

fn export(opt: &Opt) -> Vec<u8> {
    let mut size = 0;
    assert_eq!(unsafe { smallbatch_optimizer_state_size(opt.0, &mut size) }, SmallbatchStatus::Ok);
    let mut bytes = vec![0u8; size];
    let mut written = 0;
    let s = unsafe { smallbatch_optimizer_export_state(opt.0, bytes.as_mut_ptr(), bytes.len(), &mut written) };
    assert_eq!(s, SmallbatchStatus::Ok, "{}", last_error());
    assert_eq!(written, size);
    bytes
}

fn import(opt: &Opt, bytes: &[u8]) -> SmallbatchStatus {
    unsafe { smallbatch_optimizer_import_state(opt.0, bytes.as_ptr(), bytes.len()) }
}

fn small_model() -> Vec<SmallbatchTensor> {
    vec![tensor(&[4, 6]), tensor(&[6]), tensor(&[2, 3, 5])]
}

const SMALL_TOTAL: usize = 24 + 6 + 30;

#[test]
fn version_and_status_names() {
    let v = unsafe { CStr::from_ptr(smallbatch_version()) }.to_str().unwrap();
    assert_eq!(v, smallbatch_core::VERSION);
    let name = |s: i32| unsafe { CStr::from_ptr(smallbatch_status_name(s)) }.to_str().unwrap().to_string();
    assert_eq!(name(SmallbatchStatus::Length as i32), "SMALLBATCH_STATUS_LENGTH");
    assert_eq!(name(0), "SMALLBATCH_STATUS_OK");
    assert_eq!(name(-1), "unknown status");
    assert_eq!(smallbatch_config_size(), std::mem::size_of::<SmallbatchConfig>());
}

#[test]
fn null_handles_are_refused() {
    let mut f = [0f32; 4];
    let mut n = 0usize;
    let mut cfg = config(SmallbatchRule::Sgd);
    let b = [0u8; 8];
    let check = |func: &str, status: SmallbatchStatus| {
        assert_fails(status, SmallbatchStatus::NullPointer, &[func, "opt is NULL"]);
    };
    unsafe {
        check(
            "smallbatch_optimizer_step_f32",
            smallbatch_optimizer_step_f32(null_mut(), f.as_mut_ptr(), f.as_ptr(), 4),
        );
        check("smallbatch_optimizer_step_bf16", smallbatch_optimizer_step_bf16(null_mut(), null_mut(), null(), 0));
        check("smallbatch_optimizer_num_elements", smallbatch_optimizer_num_elements(null(), &mut n));
        check("smallbatch_optimizer_get_config", smallbatch_optimizer_get_config(null(), &mut cfg));
        check("smallbatch_optimizer_set_lr", smallbatch_optimizer_set_lr(null_mut(), 0.1));
        check("smallbatch_optimizer_set_tokens_per_step", smallbatch_optimizer_set_tokens_per_step(null_mut(), 1.0));
        check("smallbatch_optimizer_state_size", smallbatch_optimizer_state_size(null(), &mut n));
        check(
            "smallbatch_optimizer_export_state",
            smallbatch_optimizer_export_state(null(), null_mut(), 0, null_mut()),
        );
        check("smallbatch_optimizer_import_state", smallbatch_optimizer_import_state(null_mut(), b.as_ptr(), 8));
    }
    // Freeing NULL is a no-op, as free(NULL) is.
    unsafe { smallbatch_optimizer_free(null_mut()) };
}

#[test]
fn null_arguments_are_refused() {
    let cfg = config(SmallbatchRule::Adamw);
    let ts = small_model();
    let mut out = null_mut();
    let s = unsafe { smallbatch_optimizer_new(null(), ts.as_ptr(), ts.len(), &mut out) };
    assert_fails(s, SmallbatchStatus::NullPointer, &["smallbatch_optimizer_new", "config is NULL"]);
    let s = unsafe { smallbatch_optimizer_new(&cfg, null(), 3, &mut out) };
    assert_fails(s, SmallbatchStatus::NullPointer, &["tensors is NULL"]);
    let s = unsafe { smallbatch_optimizer_new(&cfg, ts.as_ptr(), ts.len(), null_mut()) };
    assert_fails(s, SmallbatchStatus::NullPointer, &["out is NULL"]);
    let s = unsafe { smallbatch_config_default(0, null_mut()) };
    assert_fails(s, SmallbatchStatus::NullPointer, &["smallbatch_config_default", "out is NULL"]);

    let opt = new(&cfg, &ts);
    let mut p = vec![0f32; SMALL_TOTAL];
    let g = vec![0f32; SMALL_TOTAL];
    let s = unsafe { smallbatch_optimizer_step_f32(opt.0, null_mut(), g.as_ptr(), SMALL_TOTAL) };
    assert_fails(s, SmallbatchStatus::NullPointer, &["param is NULL"]);
    let s = unsafe { smallbatch_optimizer_step_f32(opt.0, p.as_mut_ptr(), null(), SMALL_TOTAL) };
    assert_fails(s, SmallbatchStatus::NullPointer, &["grad is NULL"]);
    let s = unsafe { smallbatch_optimizer_num_elements(opt.0, null_mut()) };
    assert_fails(s, SmallbatchStatus::NullPointer, &["out is NULL"]);
    let s = unsafe { smallbatch_optimizer_export_state(opt.0, null_mut(), 100, null_mut()) };
    assert_fails(s, SmallbatchStatus::NullPointer, &["buf is NULL"]);
    let s = unsafe { smallbatch_optimizer_import_state(opt.0, null(), 100) };
    assert_fails(s, SmallbatchStatus::NullPointer, &["buf is NULL"]);
    let s = unsafe { smallbatch_beta_from_halflife(1e6, 512.0, null_mut()) };
    assert_fails(s, SmallbatchStatus::NullPointer, &["smallbatch_beta_from_halflife", "out is NULL"]);
    let s = unsafe { smallbatch_stochastic_round(null(), null_mut(), 3, 0, 0, 0) };
    assert_fails(s, SmallbatchStatus::NullPointer, &["src is NULL"]);
    let src = [1.0f32; 3];
    let s = unsafe { smallbatch_round_nearest(src.as_ptr(), null_mut(), 3) };
    assert_fails(s, SmallbatchStatus::NullPointer, &["dst is NULL"]);
}

#[test]
fn wrong_lengths_are_refused() {
    let opt = new(&config(SmallbatchRule::Adamw), &small_model());
    let mut total = 0;
    assert_eq!(unsafe { smallbatch_optimizer_num_elements(opt.0, &mut total) }, SmallbatchStatus::Ok);
    assert_eq!(total, SMALL_TOTAL);
    let mut p = vec![0f32; SMALL_TOTAL - 1];
    let g = vec![0f32; SMALL_TOTAL - 1];
    let s = unsafe { smallbatch_optimizer_step_f32(opt.0, p.as_mut_ptr(), g.as_ptr(), p.len()) };
    assert_fails(s, SmallbatchStatus::Length, &["smallbatch_optimizer_step_f32", "param has 59 elements, expected 60"]);
    // A length past the address space is refused before it becomes a slice.
    let s = unsafe { smallbatch_optimizer_step_f32(opt.0, p.as_mut_ptr(), g.as_ptr(), usize::MAX / 2) };
    assert_fails(s, SmallbatchStatus::InvalidValue, &["param length"]);
    // Empty buffers with a non-empty table: a length error, not a NULL one.
    let s = unsafe { smallbatch_optimizer_step_f32(opt.0, null_mut(), null(), 0) };
    assert_fails(s, SmallbatchStatus::Length, &["param has 0 elements"]);
    let src = [1.0f32; 3];
    let mut dst = [0u16; 3];
    let s = unsafe { smallbatch_stochastic_round(src.as_ptr(), dst.as_mut_ptr(), usize::MAX, 0, 0, 0) };
    assert_fails(s, SmallbatchStatus::InvalidValue, &["src length"]);
}

#[test]
fn bad_hyperparameters_are_refused() {
    let ts = small_model();
    type Change = Box<dyn Fn(&mut SmallbatchConfig)>;
    let cases: Vec<(SmallbatchRule, Change, &[&str])> = vec![
        (SmallbatchRule::Adamw, Box::new(|c| c.lr = f64::NAN), &["invalid lr: NaN"]),
        (SmallbatchRule::Sgd, Box::new(|c| c.lr = -0.1), &["invalid lr: -0.1", "finite and >= 0"]),
        (SmallbatchRule::Adam, Box::new(|c| c.beta1 = 1.0), &["invalid beta1: 1", "in [0, 1)"]),
        (SmallbatchRule::Adamw, Box::new(|c| c.beta2 = -0.5), &["invalid beta2: -0.5"]),
        (SmallbatchRule::Adamw, Box::new(|c| c.eps = f64::INFINITY), &["invalid eps: inf"]),
        (SmallbatchRule::Adamw, Box::new(|c| c.weight_decay = -1.0), &["invalid weight_decay"]),
        (SmallbatchRule::Sgd, Box::new(|c| c.momentum = f64::NAN), &["invalid momentum: NaN"]),
        (SmallbatchRule::Sgd, Box::new(|c| c.nesterov = 1), &["invalid nesterov"]),
        (SmallbatchRule::Muon, Box::new(|c| c.momentum = 1.5), &["invalid momentum: 1.5"]),
        (SmallbatchRule::Muon, Box::new(|c| c.ns_steps = 100), &["invalid ns_steps: 100"]),
        (SmallbatchRule::Muon, Box::new(|c| c.ns_coefficients[1] = f32::NAN), &["invalid ns_coefficients[1]"]),
        (SmallbatchRule::Muon, Box::new(|c| c.adjust_lr = 7), &["invalid adjust_lr: 7"]),
        (SmallbatchRule::Adafactor, Box::new(|c| c.beta1 = 1.0), &["invalid beta1"]),
        (SmallbatchRule::Adafactor, Box::new(|c| c.beta2_decay = 0.5), &["invalid beta2_decay: 0.5"]),
        (SmallbatchRule::Adafactor, Box::new(|c| c.clip_threshold = 0.5), &["invalid clip_threshold"]),
        (SmallbatchRule::Adafactor, Box::new(|c| c.eps1 = -1e-30), &["invalid eps1"]),
        (
            SmallbatchRule::Adafactor,
            Box::new(|c| {
                c.beta2_decay = 0.0;
                c.beta2 = 1.0
            }),
            &["invalid beta2: 1"],
        ),
        (SmallbatchRule::Adamw, Box::new(|c| c.t2 = -5.0), &["invalid t2: -5", "finite and > 0"]),
        (SmallbatchRule::Adamw, Box::new(|c| c.t1 = f64::NAN), &["invalid t1: NaN"]),
        (SmallbatchRule::Adamw, Box::new(|c| c.t2 = 1e6), &["invalid tokens_per_step: 0"]),
        (SmallbatchRule::Sgd, Box::new(|c| c.t2 = 1e6), &["invalid t2", "SGD and Muon"]),
        (SmallbatchRule::Sgd, Box::new(|c| c.rule = 9), &["invalid rule: 9"]),
        (SmallbatchRule::Sgd, Box::new(|c| c.param_dtype = 2), &["invalid param_dtype: 2"]),
        (
            SmallbatchRule::Sgd,
            Box::new(|c| {
                c.param_dtype = SmallbatchDtype::Bf16 as u32;
                c.rounding = 5
            }),
            &["invalid rounding: 5"],
        ),
    ];
    for (rule, change, parts) in cases {
        let mut cfg = config(rule);
        change(&mut cfg);
        let status = try_new(&cfg, &ts).err().unwrap_or(SmallbatchStatus::Ok);
        assert_fails(status, SmallbatchStatus::InvalidValue, parts);
        assert!(last_error().starts_with("smallbatch_optimizer_new: "), "{}", last_error());
    }
    let s = unsafe { smallbatch_config_default(42, &mut config(SmallbatchRule::Sgd)) };
    assert_fails(s, SmallbatchStatus::InvalidValue, &["invalid rule: 42"]);
}

#[test]
fn set_lr_and_tokens_per_step_are_checked_and_recompute_betas() {
    let mut cfg = config(SmallbatchRule::Adamw);
    cfg.t1 = 5e3;
    cfg.t2 = 1e6;
    cfg.tokens_per_step = 512.0;
    let opt = new(&cfg, &small_model());
    let get = || {
        let mut c = config(SmallbatchRule::Sgd);
        assert_eq!(unsafe { smallbatch_optimizer_get_config(opt.0, &mut c) }, SmallbatchStatus::Ok);
        c
    };
    assert_eq!(get().beta1, halflife::beta_from_halflife(5e3, 512.0).unwrap());
    assert_eq!(get().beta2, halflife::beta_from_halflife(1e6, 512.0).unwrap());

    for bad in [f64::NAN, -1.0, f64::INFINITY] {
        let s = unsafe { smallbatch_optimizer_set_lr(opt.0, bad) };
        assert_fails(s, SmallbatchStatus::InvalidValue, &["smallbatch_optimizer_set_lr", "invalid lr"]);
        let s = unsafe { smallbatch_optimizer_set_tokens_per_step(opt.0, bad) };
        assert_fails(s, SmallbatchStatus::InvalidValue, &["invalid tokens_per_step"]);
    }
    assert_eq!(get().lr, cfg.lr, "a refused lr changes nothing");
    assert_eq!(unsafe { smallbatch_optimizer_set_lr(opt.0, 0.25) }, SmallbatchStatus::Ok);
    assert_eq!(unsafe { smallbatch_optimizer_set_tokens_per_step(opt.0, 4.0 * 512.0) }, SmallbatchStatus::Ok);
    let c = get();
    assert_eq!(c.lr, 0.25);

    // 0.5^(2048 / 1) underflows to 0: SGD would lose the momentum its buffer was made for.
    let sgd = new(&SmallbatchConfig { t1: 1.0, tokens_per_step: 1.0, ..config(SmallbatchRule::Sgd) }, &small_model());
    let s = unsafe { smallbatch_optimizer_set_tokens_per_step(sgd.0, 2048.0) };
    assert_fails(s, SmallbatchStatus::InvalidValue, &["would turn momentum off", "new optimizer"]);
    assert_eq!(c.beta2, halflife::beta_from_halflife(1e6, 2048.0).unwrap());
    assert_eq!(c.beta1, halflife::beta_from_halflife(5e3, 2048.0).unwrap());
}

#[test]
fn bad_shapes_dtypes_and_buffers_are_refused() {
    let cfg = config(SmallbatchRule::Adamw);
    let mut big = tensor(&[1; 8]);
    big.ndim = 9;
    let s = try_new(&cfg, &[big]).err().unwrap();
    assert_fails(s, SmallbatchStatus::Shape, &["tensors[0].ndim is 9"]);
    let s = try_new(&cfg, &[tensor(&[2]), tensor(&[usize::MAX, 2, 3, 4])]).err().unwrap();
    assert_fails(s, SmallbatchStatus::Shape, &["tensors[1]", "overflows"]);
    let s = try_new(&config(SmallbatchRule::Muon), &small_model()).err().unwrap();
    assert_fails(s, SmallbatchStatus::Shape, &["tensors[1] has 1 dims", "Muon steps matrices"]);

    let opt = new(&cfg, &small_model());
    let mut p = [0u16; SMALL_TOTAL];
    let g = [0u16; SMALL_TOTAL];
    let s = unsafe { smallbatch_optimizer_step_bf16(opt.0, p.as_mut_ptr(), g.as_ptr(), SMALL_TOTAL) };
    assert_fails(s, SmallbatchStatus::Dtype, &["smallbatch_optimizer_step_bf16", "float parameters"]);
    let bf16 = new(&SmallbatchConfig { param_dtype: SmallbatchDtype::Bf16 as u32, ..cfg }, &small_model());
    let mut pf = vec![0f32; SMALL_TOTAL + 1];
    let gf = vec![0f32; SMALL_TOTAL];
    let s = unsafe { smallbatch_optimizer_step_f32(bf16.0, pf.as_mut_ptr(), gf.as_ptr(), SMALL_TOTAL) };
    assert_fails(s, SmallbatchStatus::Dtype, &["smallbatch_optimizer_step_bf16"]);

    // Parameters and gradients that overlap, and a misaligned float pointer.
    let s = unsafe { smallbatch_optimizer_step_f32(opt.0, pf.as_mut_ptr(), pf.as_ptr().add(1), SMALL_TOTAL) };
    assert_fails(s, SmallbatchStatus::InvalidValue, &["invalid param", "overlapping grad"]);
    let misaligned = unsafe { (pf.as_mut_ptr() as *mut u8).add(1) } as *mut f32;
    let s = unsafe { smallbatch_optimizer_step_f32(opt.0, misaligned, gf.as_ptr(), SMALL_TOTAL) };
    assert_fails(s, SmallbatchStatus::InvalidValue, &["invalid param", "aligned"]);
}

/// The state of an optimizer after a few steps, and the parameters it stepped.
fn trained(cfg: &SmallbatchConfig, ts: &[SmallbatchTensor], steps: usize) -> (Opt, Vec<f32>) {
    let opt = new(cfg, ts);
    let mut n = 0;
    assert_eq!(unsafe { smallbatch_optimizer_num_elements(opt.0, &mut n) }, SmallbatchStatus::Ok);
    let mut p = init(n);
    for t in 0..steps {
        step_f32(&opt, &mut p, &grads(n, t));
    }
    (opt, p)
}

#[test]
fn corrupted_or_foreign_state_is_refused_and_changes_nothing() {
    let cfg = config(SmallbatchRule::Adamw);
    let (opt, _) = trained(&cfg, &small_model(), 3);
    let good = export(&opt);
    let (fresh, _) = trained(&cfg, &small_model(), 0);
    let before = export(&fresh);

    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x10;
    assert_fails(import(&fresh, &flipped), SmallbatchStatus::State, &["smallbatch_optimizer_import_state", "checksum"]);
    assert_fails(import(&fresh, &good[..good.len() - 1]), SmallbatchStatus::State, &["checksum"]);
    assert_fails(import(&fresh, &good[..10]), SmallbatchStatus::State, &["truncated"]);
    assert_fails(import(&fresh, b"not a checkpoint at all"), SmallbatchStatus::State, &["magic"]);
    assert_fails(import(&fresh, &[]), SmallbatchStatus::State, &["magic"]);
    let mut version = good.clone();
    version[8] = 2;
    assert_fails(import(&fresh, &version), SmallbatchStatus::State, &["format version 2", "reads version 1"]);

    let (sgd, _) = trained(&SmallbatchConfig { momentum: 0.9, ..config(SmallbatchRule::Sgd) }, &small_model(), 2);
    assert_fails(import(&fresh, &export(&sgd)), SmallbatchStatus::State, &["SGD optimizer", "AdamW one"]);
    let (other, _) = trained(&cfg, &[tensor(&[6, 4]), tensor(&[6]), tensor(&[2, 3, 5])], 1);
    assert_fails(import(&fresh, &export(&other)), SmallbatchStatus::State, &["tensor 0 is", "[1, 6, 4, 0]"]);
    let (fewer, _) = trained(&cfg, &small_model()[..2], 1);
    assert_fails(import(&fresh, &export(&fewer)), SmallbatchStatus::State, &["holds 2 tensors", "has 3"]);
    let plain = new(&config(SmallbatchRule::Sgd), &small_model());
    assert_fails(import(&plain, &export(&sgd)), SmallbatchStatus::State, &["momentum_buffer", "keeps []"]);

    assert_eq!(export(&fresh), before, "failed imports must change nothing");

    let mut small = vec![0u8; good.len() - 1];
    let s = unsafe { smallbatch_optimizer_export_state(opt.0, small.as_mut_ptr(), small.len(), null_mut()) };
    assert_fails(s, SmallbatchStatus::BufferTooSmall, &["needs", "smallbatch_optimizer_state_size"]);
    assert!(small.iter().all(|&b| b == 0), "a refused export writes nothing");
}

/// Stepping `a` and `b` with the same gradients gives the same bits.
fn assert_same_continuation(a: &Opt, pa: &mut [f32], b: &Opt, pb: &mut [f32], from: usize) {
    for t in from..from + 4 {
        let g = grads(pa.len(), t);
        step_f32(a, pa, &g);
        step_f32(b, pb, &g);
        assert!(pa.iter().zip(pb.iter()).all(|(x, y)| x.to_bits() == y.to_bits()), "step {t} differs");
    }
    assert_eq!(export(a), export(b));
}

#[test]
fn export_import_continues_bit_for_bit() {
    let mut adafactor = config(SmallbatchRule::Adafactor);
    adafactor.min_dim_size_to_factor = 2;
    adafactor.t1 = 100.0;
    adafactor.t2 = 1e4;
    adafactor.tokens_per_step = 8.0;
    let configs = [
        SmallbatchConfig { momentum: 0.9, nesterov: 1, ..config(SmallbatchRule::Sgd) },
        config(SmallbatchRule::Sgd),
        config(SmallbatchRule::Adam),
        SmallbatchConfig { t2: 1e6, tokens_per_step: 512.0, ..config(SmallbatchRule::Adamw) },
        adafactor,
        config(SmallbatchRule::Adafactor),
    ];
    for cfg in configs {
        let (a, mut pa) = trained(&cfg, &small_model(), 5);
        let b = new(&cfg, &small_model());
        assert_eq!(import(&b, &export(&a)), SmallbatchStatus::Ok, "{}", last_error());
        let mut pb = pa.clone();
        assert_same_continuation(&a, &mut pa, &b, &mut pb, 5);
    }
    let muon = config(SmallbatchRule::Muon);
    let ts = [tensor(&[8, 6]), tensor(&[2, 3, 4])];
    let (a, mut pa) = trained(&muon, &ts, 3);
    let b = new(&muon, &ts);
    assert_eq!(import(&b, &export(&a)), SmallbatchStatus::Ok, "{}", last_error());
    let mut pb = pa.clone();
    assert_same_continuation(&a, &mut pa, &b, &mut pb, 3);
}

#[test]
fn bf16_stochastic_rounding_resumes_bit_for_bit() {
    for rule in [SmallbatchRule::Sgd, SmallbatchRule::Adamw, SmallbatchRule::Adafactor] {
        let cfg = SmallbatchConfig {
            param_dtype: SmallbatchDtype::Bf16 as u32,
            rounding: SmallbatchRounding::Stochastic as u32,
            seed: 1234,
            stream: 3,
            ..config(rule)
        };
        let ts = small_model();
        let run = |opt: &Opt, p: &mut [u16], from: usize, to: usize| {
            for t in from..to {
                let g: Vec<u16> = grads(p.len(), t).iter().map(|&x| rounding::round_bf16_nearest(x)).collect();
                let s = unsafe { smallbatch_optimizer_step_bf16(opt.0, p.as_mut_ptr(), g.as_ptr(), p.len()) };
                assert_eq!(s, SmallbatchStatus::Ok, "{}", last_error());
            }
        };
        let start: Vec<u16> = init(SMALL_TOTAL).into_iter().map(rounding::round_bf16_nearest).collect();
        let whole = new(&cfg, &ts);
        let mut pw = start.clone();
        run(&whole, &mut pw, 0, 8);

        let first = new(&cfg, &ts);
        let mut pr = start.clone();
        run(&first, &mut pr, 0, 4);
        let resumed = new(&cfg, &ts);
        assert_eq!(import(&resumed, &export(&first)), SmallbatchStatus::Ok);
        drop(first);
        run(&resumed, &mut pr, 4, 8);
        assert_eq!(pw, pr, "{rule:?}: a resumed run must match an uninterrupted one");
        assert_ne!(pw, start);
    }
}

#[test]
fn steps_equal_the_core_called_directly() {
    let mut cfg = config(SmallbatchRule::Adamw);
    cfg.t2 = 1e6;
    cfg.tokens_per_step = 512.0;
    let (opt, p) = trained(&cfg, &small_model(), 6);

    let table = SegmentTable::packed(&[24, 6, 30]).unwrap();
    let mut param = init(SMALL_TOTAL);
    let (mut m, mut v) = (vec![0f32; SMALL_TOTAL], vec![0f32; SMALL_TOTAL]);
    let mut steps = vec![0.0; 3];
    let hp = AdamHyper {
        beta2: halflife::beta_from_halflife(1e6, 512.0).unwrap(),
        weight_decay: 1e-2,
        decoupled_weight_decay: true,
        ..AdamHyper::default()
    };
    for t in 0..6 {
        let g = grads(SMALL_TOTAL, t);
        let bufs = AdamBuffers {
            params: Params::F32 { param: &mut param, grad: &g },
            exp_avg: &mut m,
            exp_avg_sq: &mut v,
            max_exp_avg_sq: None,
        };
        adam_step(Executor::global().unwrap(), &table, &[true; 3], &mut steps, bufs, &hp).unwrap();
    }
    assert!(p.iter().zip(&param).all(|(a, b)| a.to_bits() == b.to_bits()));
    drop(opt);
}

#[test]
fn halflife_and_rounding_functions_match_the_core() {
    let mut out = 0.0;
    assert_eq!(unsafe { smallbatch_beta_from_halflife(10e6, 512.0, &mut out) }, SmallbatchStatus::Ok);
    assert_eq!(out, halflife::beta_from_halflife(10e6, 512.0).unwrap());
    assert_eq!(unsafe { smallbatch_halflife_from_beta(0.999, 512.0, &mut out) }, SmallbatchStatus::Ok);
    assert_eq!(out, halflife::halflife_from_beta(0.999, 512.0).unwrap());
    assert_eq!(unsafe { smallbatch_scale_beta(0.999, 512.0, 4096.0, &mut out) }, SmallbatchStatus::Ok);
    assert_eq!(out, halflife::scale_beta(0.999, 512.0, 4096.0).unwrap());
    let s = unsafe { smallbatch_beta_from_halflife(-1.0, 512.0, &mut out) };
    assert_fails(s, SmallbatchStatus::InvalidValue, &["smallbatch_beta_from_halflife", "invalid halflife_tokens: -1"]);
    let s = unsafe { smallbatch_halflife_from_beta(1.0, 512.0, &mut out) };
    assert_fails(s, SmallbatchStatus::InvalidValue, &["invalid beta: 1"]);
    let s = unsafe { smallbatch_scale_beta(0.9, 512.0, f64::NAN, &mut out) };
    assert_fails(s, SmallbatchStatus::InvalidValue, &["invalid to_tokens_per_step: NaN"]);

    let src: Vec<f32> = (0..40_000).map(|i| (i as f32 * 0.001).cos() * 3.0).collect();
    let mut dst = vec![0u16; src.len()];
    let s = unsafe { smallbatch_stochastic_round(src.as_ptr(), dst.as_mut_ptr(), src.len(), 9, 2, 1) };
    assert_eq!(s, SmallbatchStatus::Ok);
    let mut expected = vec![0u16; src.len()];
    rounding::stochastic_round_slice(Executor::global().unwrap(), &src, &mut expected, 9, 2, 1).unwrap();
    assert_eq!(dst, expected);
    assert_eq!(unsafe { smallbatch_round_nearest(src.as_ptr(), dst.as_mut_ptr(), src.len()) }, SmallbatchStatus::Ok);
    assert!(dst.iter().zip(&src).all(|(&d, &s)| d == rounding::round_bf16_nearest(s)));
    // dst over src's own bytes.
    let mut both = vec![1.0f32; 8];
    let s = unsafe { smallbatch_round_nearest(both.as_ptr(), both.as_mut_ptr().cast::<u16>(), 8) };
    assert_fails(s, SmallbatchStatus::InvalidValue, &["invalid dst", "overlapping src"]);
}

#[test]
fn last_error_is_per_thread() {
    let s = unsafe { smallbatch_optimizer_set_lr(null_mut(), 1.0) };
    assert_eq!(s, SmallbatchStatus::NullPointer);
    let other = std::thread::spawn(last_error).join().unwrap();
    assert_eq!(other, "", "another thread's failure must not show here");
    assert!(last_error().contains("opt is NULL"));
}
