//! Half-life math: EMA coefficients expressed as a half-life in tokens.
//!
//! An EMA with coefficient `beta` keeps `beta^n` of a gradient after `n` steps, so it forgets half of
//! it after `n = ln(1/2) / ln(beta)` steps. With `B` sequences of `T` tokens per step the half-life in
//! tokens is `t_half = B*T * ln(1/2) / ln(beta)`, and conversely `beta = 0.5^(B*T / t_half)`.
//! Keeping `t_half` fixed while the batch size changes is the rule under which small batches train as
//! well as large ones (Marek et al., 2025).

use crate::error::{Error, Result};

fn check_tokens(name: &str, value: f64) -> Result<()> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(name, value, "finite and > 0"))
    }
}

fn check_open_unit(name: &str, value: f64) -> Result<()> {
    if value > 0.0 && value < 1.0 {
        Ok(())
    } else {
        Err(Error::invalid(name, value, "in (0, 1)"))
    }
}

/// `beta = 0.5 ^ (tokens_per_step / halflife_tokens)`: the EMA coefficient whose half-life is
/// `halflife_tokens` when each step consumes `tokens_per_step` tokens.
///
/// ```
/// use smallbatch_core::halflife::beta_from_halflife;
/// // The paper's t2 = 10M tokens at batch size 1 and sequence length 512.
/// let beta2 = beta_from_halflife(10e6, 512.0).unwrap();
/// assert!((beta2 - 0.999965).abs() < 5e-7);
/// ```
pub fn beta_from_halflife(halflife_tokens: f64, tokens_per_step: f64) -> Result<f64> {
    check_tokens("halflife_tokens", halflife_tokens)?;
    check_tokens("tokens_per_step", tokens_per_step)?;
    Ok(0.5f64.powf(tokens_per_step / halflife_tokens))
}

/// `t_half = tokens_per_step * ln(0.5) / ln(beta)`: the half-life in tokens of an EMA with
/// coefficient `beta` in (0, 1).
///
/// ```
/// use smallbatch_core::halflife::halflife_from_beta;
/// let t = halflife_from_beta(0.5, 512.0).unwrap();
/// assert!((t - 512.0).abs() < 1e-9);
/// ```
pub fn halflife_from_beta(beta: f64, tokens_per_step: f64) -> Result<f64> {
    check_open_unit("beta", beta)?;
    check_tokens("tokens_per_step", tokens_per_step)?;
    Ok(tokens_per_step * 0.5f64.ln() / beta.ln())
}

/// `beta ^ (to_tokens_per_step / from_tokens_per_step)`: the coefficient with the same token
/// half-life after the tokens per step change (for example when the batch size changes).
///
/// ```
/// use smallbatch_core::halflife::scale_beta;
/// // beta2 tuned at batch size 1 moved to batch size 64 (same sequence length).
/// let b = scale_beta(0.999965, 512.0, 64.0 * 512.0).unwrap();
/// assert!((b - 0.99776).abs() < 1e-4);
/// ```
pub fn scale_beta(beta: f64, from_tokens_per_step: f64, to_tokens_per_step: f64) -> Result<f64> {
    check_open_unit("beta", beta)?;
    check_tokens("from_tokens_per_step", from_tokens_per_step)?;
    check_tokens("to_tokens_per_step", to_tokens_per_step)?;
    Ok(beta.powf(to_tokens_per_step / from_tokens_per_step))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_table_values() {
        // PAPER.md: tuned beta2 for t2 = 10M tokens, T = 512.
        let cases = [(1.0, 0.999965), (4.0, 0.999858), (16.0, 0.999432), (64.0, 0.997731), (256.0, 0.990956)];
        for (batch, expected) in cases {
            let beta = beta_from_halflife(10e6, batch * 512.0).unwrap();
            assert!((beta - expected).abs() < 5e-7, "batch {batch}: {beta} vs {expected}");
        }
    }

    #[test]
    fn round_trips() {
        for &beta in &[0.1, 0.9, 0.999, 0.999965] {
            let t = halflife_from_beta(beta, 512.0).unwrap();
            let back = beta_from_halflife(t, 512.0).unwrap();
            assert!((back - beta).abs() < 1e-12);
            let scaled = scale_beta(beta, 512.0, 2048.0).unwrap();
            assert!((scaled - beta_from_halflife(t, 2048.0).unwrap()).abs() < 1e-12);
        }
    }

    #[test]
    fn rejects_out_of_range() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = beta_from_halflife(bad, 512.0).unwrap_err();
            assert!(err.to_string().contains("halflife_tokens"), "{err}");
            let err = beta_from_halflife(1e6, bad).unwrap_err();
            assert!(err.to_string().contains("tokens_per_step"), "{err}");
        }
        for bad in [0.0, 1.0, -0.5, 1.5, f64::NAN] {
            let err = halflife_from_beta(bad, 512.0).unwrap_err();
            assert!(err.to_string().starts_with("invalid beta:"), "{err}");
            assert!(scale_beta(bad, 1.0, 2.0).is_err());
        }
        let err = scale_beta(0.9, 1.0, 0.0).unwrap_err();
        assert!(err.to_string().contains("to_tokens_per_step"), "{err}");
    }
}
