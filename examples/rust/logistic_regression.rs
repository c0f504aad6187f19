//! Logistic regression trained at batch size 1 with smallbatch-core directly: no Python, no torch.
//!
//!     cargo run --release --example logistic_regression
//!
//! The weights and bias are two tensors in one flat buffer described by a `SegmentTable`; each
//! step computes the gradient of one example's log-loss by hand and calls `adam_step` once, with
//! beta2 set by a half-life in tokens (here one example = one token).

use smallbatch_core::halflife::beta_from_halflife;
use smallbatch_core::rules::adam::{adam_step, AdamBuffers, AdamHyper};
use smallbatch_core::rules::Params;
use smallbatch_core::{Executor, SegmentTable};

const FEATURES: usize = 16;

/// A small deterministic generator, so the example prints the same numbers everywhere.
struct Lcg(u64);
impl Lcg {
    fn uniform(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32) / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        // Box-Muller
        let (u, v) = (self.uniform().max(1e-7), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
    }
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

fn main() -> Result<(), smallbatch_core::Error> {
    let mut rng = Lcg(7);
    let true_w: Vec<f32> = (0..FEATURES).map(|_| rng.normal()).collect();
    let data: Vec<(Vec<f32>, f32)> = (0..4000)
        .map(|_| {
            let x: Vec<f32> = (0..FEATURES).map(|_| rng.normal()).collect();
            let z: f32 = x.iter().zip(&true_w).map(|(a, b)| a * b).sum::<f32>() + 0.5;
            (x, if rng.uniform() < sigmoid(z) { 1.0 } else { 0.0 })
        })
        .collect();

    // Two tensors, weights then bias, back to back in one flat buffer.
    let table = SegmentTable::packed(&[FEATURES, 1])?;
    let mut param = vec![0f32; table.total()];
    let mut grad = vec![0f32; table.total()];
    let (mut exp_avg, mut exp_avg_sq) = (vec![0f32; table.total()], vec![0f32; table.total()]);
    let mut steps = vec![0.0f64; table.len()];
    let hp = AdamHyper { lr: 3e-2, beta2: beta_from_halflife(2000.0, 1.0)?, ..AdamHyper::default() };
    let exec = Executor::global()?;

    let loss = |param: &[f32]| -> f32 {
        let (w, b) = param.split_at(FEATURES);
        let total: f32 = data
            .iter()
            .map(|(x, y)| {
                let p = sigmoid(x.iter().zip(w).map(|(a, b)| a * b).sum::<f32>() + b[0]).clamp(1e-7, 1.0 - 1e-7);
                -(y * p.ln() + (1.0 - y) * (1.0 - p).ln())
            })
            .sum();
        total / data.len() as f32
    };

    println!("beta2 = {:.6} (half-life 2000 examples at batch size 1)", hp.beta2);
    println!("epoch 0  loss {:.4}", loss(&param));
    for epoch in 1..=3 {
        for (x, y) in &data {
            let (w, b) = param.split_at(FEATURES);
            let p = sigmoid(x.iter().zip(w).map(|(a, b)| a * b).sum::<f32>() + b[0]);
            let err = p - y; // d(log-loss)/dz
            for (g, xi) in grad[..FEATURES].iter_mut().zip(x) {
                *g = err * xi;
            }
            grad[FEATURES] = err;
            let bufs = AdamBuffers {
                params: Params::F32 { param: &mut param, grad: &grad },
                exp_avg: &mut exp_avg,
                exp_avg_sq: &mut exp_avg_sq,
                max_exp_avg_sq: None,
            };
            adam_step(exec, &table, &[true, true], &mut steps, bufs, &hp)?;
        }
        println!("epoch {epoch}  loss {:.4}", loss(&param));
    }
    let err: f32 = param[..FEATURES].iter().zip(&true_w).map(|(a, b)| (a - b).abs()).sum::<f32>() / FEATURES as f32;
    println!("mean |w - w_true| = {err:.3}, bias {:.3} (true 0.5); {} steps", param[FEATURES], steps[0]);
    Ok(())
}
