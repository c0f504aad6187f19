//! Counter-based random bits and fp32 -> bf16 rounding: the bulk generator equals the per-element
//! reference for any start and length, the draws look uniform, stochastic rounding is unbiased
//! and keeps special values, round-to-nearest matches an independent f64 reference, and the slice
//! versions give the reference's output on every SIMD path and thread count.

use smallbatch_core::driver::CHUNK;
use smallbatch_core::philox::{fill_random_u16, random_u16};
use smallbatch_core::rounding::{
    bf16_to_f32, round_bf16_nearest, round_bf16_stochastic, round_nearest_slice, stochastic_round_slice,
};
use smallbatch_core::{Error, Executor, SimdPath};

mod common;
use common::Rng;

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Values spanning many binades of either sign, with special values sprinkled in.
    fn value(&mut self) -> f32 {
        match self.below(20) {
            0 => [0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, -f32::MAX][self.below(6) as usize],
            // NaN of either sign with any payload.
            1 => f32::from_bits((self.next() as u32 & 0x8000_0000) | (0x7F80_0001 + self.below(0x7F_FFFF) as u32)),
            2 => f32::from_bits(self.next() as u32 & 0x807F_FFFF), // subnormals
            3 => f32::from_bits(self.next() as u32),               // any pattern
            _ => {
                let mantissa = (self.below(2_000_001) as f32) / 1_000_000.0 - 1.0;
                mantissa * 10f32.powi(self.below(13) as i32 - 6)
            }
        }
    }
}

fn executors() -> Vec<Executor> {
    let mut out = vec![Executor::new(SimdPath::Scalar, 1).unwrap(), Executor::new(SimdPath::Scalar, 3).unwrap()];
    for path in SimdPath::supported() {
        for threads in [1, 3] {
            out.push(Executor::new(path, threads).unwrap());
        }
    }
    out
}

#[test]
fn fill_matches_reference_for_any_start_and_length() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut starts = vec![0, 1, 7, 8, 9, 127, 128, 129, u64::MAX - 3, u64::MAX - 200, 1 << 35];
    starts.extend((0..40).map(|_| rng.next() >> rng.below(64)));
    for &start in &starts {
        for len in [0usize, 1, 7, 8, 9, 127, 128, 129, 1000] {
            let (seed, step, stream) = (rng.next(), rng.next(), rng.next() as u32);
            let mut got = vec![0xABCDu16; len];
            fill_random_u16(seed, step, stream, start, &mut got);
            for (k, &g) in got.iter().enumerate() {
                let want = random_u16(seed, step, stream, start.wrapping_add(k as u64));
                assert_eq!(g, want, "start {start} len {len} k {k} seed {seed} step {step}");
            }
        }
    }
}

#[test]
fn draws_look_uniform() {
    const N: usize = 1_000_000;
    let mut draws = vec![0u16; N];
    fill_random_u16(12345, 678, 3, 0, &mut draws);
    // Mean within 4 standard errors of (2^16 - 1) / 2; the sd of a uniform draw is 2^16/sqrt(12).
    let mean = draws.iter().map(|&d| f64::from(d)).sum::<f64>() / N as f64;
    let se = 65536.0 / 12f64.sqrt() / (N as f64).sqrt();
    assert!((mean - 32767.5).abs() < 4.0 * se, "mean {mean}, se {se}");
    // Every byte value occurs in both halves, each bit is set about half the time, and the high
    // byte's histogram passes a generous chi-square test (255 dof: mean 255, sd 22.6).
    let mut low = [0u64; 256];
    let mut high = [0u64; 256];
    let mut bits = [0u64; 16];
    for &d in &draws {
        low[usize::from(d & 0xFF)] += 1;
        high[usize::from(d >> 8)] += 1;
        for (b, count) in bits.iter_mut().enumerate() {
            *count += u64::from((d >> b) & 1);
        }
    }
    assert!(low.iter().chain(&high).all(|&c| c > 0));
    for (b, &count) in bits.iter().enumerate() {
        let p = count as f64 / N as f64;
        assert!((p - 0.5).abs() < 4.0 * 0.5 / (N as f64).sqrt(), "bit {b}: {p}");
    }
    let expected = N as f64 / 256.0;
    for hist in [low, high] {
        let chi2: f64 = hist.iter().map(|&c| (c as f64 - expected).powi(2) / expected).sum();
        assert!(chi2 < 400.0, "chi2 {chi2}");
    }
}

#[test]
fn seed_step_and_stream_each_change_the_draws() {
    let base = |seed, step, stream| {
        let mut d = vec![0u16; 64];
        fill_random_u16(seed, step, stream, 0, &mut d);
        d
    };
    let reference = base(1, 1, 1);
    for other in [base(2, 1, 1), base(1 << 40, 1, 1), base(1, 2, 1), base(1, 1, 2)] {
        let same = reference.iter().zip(&other).filter(|(a, b)| a == b).count();
        assert!(same < 8, "{same} of 64 draws coincide");
    }
    // Only the low 32 bits of the step are used (documented).
    assert_eq!(base(1, 1 + (1 << 32), 1), reference);
}

/// The two bf16 neighbours of a finite `x` (truncation toward zero and the next one away).
fn neighbours(x: f32) -> (u16, u16) {
    let lo = (x.to_bits() >> 16) as u16;
    (lo, lo + 1)
}

#[test]
fn stochastic_rounding_is_unbiased() {
    const N: u64 = 200_000;
    let ulp_at_one = 2f32.powi(-7);
    let mut values = vec![];
    for frac in [1.0 / 65536.0, 0.01, 0.25, 0.5, 0.7, 0.999] {
        values.push(1.0 + frac * ulp_at_one);
        values.push(-(3.0 + 2.0 * frac * ulp_at_one));
        values.push(1.0e-3 * (1.0 + frac * ulp_at_one));
    }
    // Subnormals (bf16 neighbours 0x0001 and 0x0002, and 0 and the smallest), and a value just
    // below a binade boundary whose upper neighbour is the next binade's first value.
    values.extend([
        f32::from_bits(0x0001_8000),
        f32::from_bits(0x8000_4000),
        f32::from_bits(0x0000_0100),
        f32::from_bits(0x3FFF_C000),
        f32::from_bits(0xC07F_F000),
    ]);
    for (v, &x) in values.iter().enumerate() {
        let (lo, hi) = neighbours(x);
        let (flo, fhi) = (f64::from(bf16_to_f32(lo)), f64::from(bf16_to_f32(hi)));
        let mut sum = 0.0;
        for i in 0..N {
            let b = round_bf16_stochastic(x, random_u16(99, 5, v as u32, i));
            assert!(b == lo || b == hi, "x {x:e}: {b:#06x} is not {lo:#06x} or {hi:#06x}");
            sum += f64::from(bf16_to_f32(b));
        }
        let mean = sum / N as f64;
        let p = (f64::from(x) - flo) / (fhi - flo); // probability of rounding away from zero
        let se = (fhi - flo).abs() * (p * (1.0 - p) / N as f64).sqrt();
        let err = (mean - f64::from(x)).abs();
        assert!(
            err <= 4.0 * se + f64::from(x).abs() * 1e-15,
            "x {x:e}: mean {mean:e}, off by {err:e} = {:.2} se",
            err / se
        );
    }
}

#[test]
fn stochastic_rounding_keeps_special_values() {
    let nans: [u32; 8] = [
        0x7FC0_0000,
        0xFFC0_0000,
        0x7F80_0001, // signalling, payload only in the low half
        0xFF80_FFFF,
        0x7FBF_FFFF,
        0x7FFF_FFFF,
        0xFFFF_FFFF,
        0x7FA5_1234,
    ];
    for r in 0..=u16::MAX {
        for &bits in &nans {
            let b = round_bf16_stochastic(f32::from_bits(bits), r);
            assert!(bf16_to_f32(b).is_nan(), "{bits:#010x} r {r}: {b:#06x}");
            assert_eq!(b, ((bits >> 16) as u16) | 0x0040, "{bits:#010x}");
        }
        assert_eq!(round_bf16_stochastic(f32::INFINITY, r), 0x7F80);
        assert_eq!(round_bf16_stochastic(f32::NEG_INFINITY, r), 0xFF80);
        // Zeros are bf16 values, so they stay exactly, sign included, for every draw.
        assert_eq!(round_bf16_stochastic(0.0, r), 0x0000);
        assert_eq!(round_bf16_stochastic(-0.0, r), 0x8000);
    }
    // Above the largest bf16, round-up overflows to Inf (with probability = the fraction).
    assert_eq!(round_bf16_stochastic(f32::MAX, 0), 0x7F7F);
    assert_eq!(round_bf16_stochastic(f32::MAX, 1), 0x7F80);
    assert_eq!(round_bf16_stochastic(-f32::MAX, 0xFFFF), 0xFF80);
}

#[test]
fn exact_bf16_values_are_unchanged_for_every_draw() {
    let mut rng = Rng(7);
    // Every non-NaN bf16 against a few draws ...
    for b in 0..=u16::MAX {
        if bf16_to_f32(b).is_nan() {
            continue;
        }
        for r in [0, 1, 0x7FFF, 0x8000, 0xFFFF, rng.next() as u16] {
            assert_eq!(round_bf16_stochastic(bf16_to_f32(b), r), b, "{b:#06x} r {r}");
        }
    }
    // ... and a sample of them against every draw.
    for b in [0x0001u16, 0x3F80, 0xBF80, 0x7F7F, 0xFF7F, 0x0080, 0x807F] {
        for r in 0..=u16::MAX {
            assert_eq!(round_bf16_stochastic(bf16_to_f32(b), r), b, "{b:#06x} r {r}");
        }
    }
}

#[test]
fn bf16_widening_is_exact() {
    for b in 0..=u16::MAX {
        let x = bf16_to_f32(b);
        assert_eq!(x.to_bits(), u32::from(b) << 16);
        if x.is_nan() {
            assert_eq!(round_bf16_nearest(x), b | 0x0040);
        } else {
            assert_eq!(round_bf16_nearest(x), b);
        }
    }
}

/// Round to nearest, ties to even, computed independently in f64: scale by the bf16 spacing at
/// `x`'s binade (2^(e-7), with e clamped to bf16's least normal exponent -126 so subnormals get
/// the fixed spacing 2^-133), round the quotient ties-to-even, scale back, overflow to Inf at 2^128.
fn nearest_reference(x: f32) -> u16 {
    assert!(!x.is_nan());
    let sign = (x.to_bits() >> 16) as u16 & 0x8000;
    let a = f64::from(x).abs();
    if a == 0.0 || a.is_infinite() {
        return (x.to_bits() >> 16) as u16;
    }
    // Every f32, subnormals included, is a normal f64: its exponent field gives floor(log2 a).
    let e = (((a.to_bits() >> 52) as i32) - 1023).max(-126);
    let spacing = 2f64.powi(e - 7);
    let y = (a / spacing).round_ties_even() * spacing;
    let y = if y >= 2f64.powi(128) { f32::INFINITY } else { y as f32 };
    assert_eq!(y.to_bits() & 0xFFFF, 0, "reference produced a non-bf16 {y:e}");
    sign | (y.to_bits() >> 16) as u16
}

#[test]
fn round_nearest_matches_f64_reference() {
    let mut rng = Rng(0xDEAD_BEEF);
    let mut checked = 0;
    let mut check = |x: f32| {
        if !x.is_nan() {
            assert_eq!(round_bf16_nearest(x), nearest_reference(x), "x {x:e} ({:#010x})", x.to_bits());
            checked += 1;
        }
    };
    // Every bf16 pattern with low halves just below, at and above the tie, and at the extremes.
    for hi in 0..=u32::from(u16::MAX) {
        for low in [0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF] {
            check(f32::from_bits(hi << 16 | low));
        }
    }
    for _ in 0..1_000_000 {
        check(f32::from_bits(rng.next() as u32));
    }
    assert!(checked > 1_300_000);
}

#[test]
fn round_nearest_quiets_nan() {
    for bits in [0x7F80_0001u32, 0xFF80_0001, 0x7FC0_0000, 0xFFFF_FFFF, 0x7FBF_0000] {
        let b = round_bf16_nearest(f32::from_bits(bits));
        assert_eq!(b, ((bits >> 16) as u16) | 0x0040);
        assert!(bf16_to_f32(b).is_nan());
    }
}

#[test]
fn slices_match_reference_on_every_path_and_thread_count() {
    let mut rng = Rng(0x5EED);
    let (seed, step, stream) = (0xFEED_FACE_CAFE_BEEF, 1_000_003, 4);
    for len in [0, 1, 9, 1000, 3 * CHUNK + 1234] {
        let src: Vec<f32> = (0..len).map(|_| rng.value()).collect();
        let want_sr: Vec<u16> = src
            .iter()
            .enumerate()
            .map(|(i, &x)| round_bf16_stochastic(x, random_u16(seed, step, stream, i as u64)))
            .collect();
        let want_rn: Vec<u16> = src.iter().map(|&x| round_bf16_nearest(x)).collect();
        for exec in executors() {
            let what = format!("len {len}, {} x {}", exec.path(), exec.threads());
            let mut got = vec![0u16; len];
            stochastic_round_slice(&exec, &src, &mut got, seed, step, stream).unwrap();
            assert!(got == want_sr, "stochastic, {what}");
            // Deterministic: a second call gives the same bits.
            let mut again = vec![1u16; len];
            stochastic_round_slice(&exec, &src, &mut again, seed, step, stream).unwrap();
            assert!(again == got, "stochastic repeat, {what}");
            round_nearest_slice(&exec, &src, &mut got).unwrap();
            assert!(got == want_rn, "nearest, {what}");
        }
    }
}

#[test]
fn slices_reject_length_mismatch() {
    let exec = Executor::new(SimdPath::Scalar, 1).unwrap();
    let src = [1.0f32; 5];
    let err = stochastic_round_slice(&exec, &src, &mut [0u16; 6], 1, 2, 3).unwrap_err();
    assert!(matches!(err, Error::Length { expected: 5, got: 6, .. }), "{err:?}");
    let err = round_nearest_slice(&exec, &src, &mut [0u16; 0]).unwrap_err();
    assert!(matches!(err, Error::Length { expected: 5, got: 0, .. }), "{err:?}");
}
