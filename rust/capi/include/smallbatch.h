/*
 * smallbatch-rs C API: native optimizer steps (SGD, Adam, AdamW, Adafactor, Muon) over
 * caller-owned float or bf16 buffers.
 *
 * Generated from rust/capi/src by cbindgen; do not edit. After changing the Rust sources:
 *     SMALLBATCH_BLESS=1 cargo test --release -p smallbatch-capi --test header
 */

#ifndef SMALLBATCH_H
#define SMALLBATCH_H

#include <stddef.h>
#include <stdint.h>

/*
 The most dims a `SmallbatchTensor` describes; merge leading dims of larger tensors (only the
 product of all dims but the last two matters).
 */
#define SMALLBATCH_MAX_DIMS 8

/*
 Version of the byte format of `smallbatch_optimizer_export_state`; importing state of another
 version fails with `SMALLBATCH_STATUS_STATE`.
 */
#define SMALLBATCH_STATE_FORMAT_VERSION 1

/*
 What a call returned. Every function that can fail returns one; on anything but
 `SMALLBATCH_STATUS_OK`, `smallbatch_last_error()` says what went wrong, naming the culprit.
 */
typedef enum SmallbatchStatus {
  /*
   Success.
   */
  SMALLBATCH_STATUS_OK = 0,
  /*
   A required pointer argument was NULL.
   */
  SMALLBATCH_STATUS_NULL_POINTER = 1,
  /*
   A hyperparameter or argument outside its valid range (NaN, negative lr, beta outside
   [0, 1), unknown enum value, misaligned or overlapping buffers).
   */
  SMALLBATCH_STATUS_INVALID_VALUE = 2,
  /*
   A buffer whose length does not match the optimizer's tensors.
   */
  SMALLBATCH_STATUS_LENGTH = 3,
  /*
   A tensor shape or table the rule cannot use (overflow, too many dims, Muon on a vector).
   */
  SMALLBATCH_STATUS_SHAPE = 4,
  /*
   A float step on a bf16 optimizer or the other way round.
   */
  SMALLBATCH_STATUS_DTYPE = 5,
  /*
   State bytes that are corrupted, of another format version, or of another optimizer.
   */
  SMALLBATCH_STATUS_STATE = 6,
  /*
   The caller's buffer is too small (see `smallbatch_optimizer_state_size`).
   */
  SMALLBATCH_STATUS_BUFFER_TOO_SMALL = 7,
  /*
   Not available on this machine (for example a SIMD path forced by SMALLBATCH_SIMD).
   */
  SMALLBATCH_STATUS_UNSUPPORTED = 8,
  /*
   A bug in the library, caught before it crossed into the caller.
   */
  SMALLBATCH_STATUS_INTERNAL = 9,
} SmallbatchStatus;

/*
 Update rules (values of `SmallbatchConfig.rule`).
 */
enum SmallbatchRule
#if defined(__cplusplus) || __STDC_VERSION__ >= 202311L
  : uint32_t
#endif // defined(__cplusplus) || __STDC_VERSION__ >= 202311L
 {
  /*
   SGD with momentum, dampening, Nesterov and L2 weight decay (torch.optim.SGD).
   */
  SMALLBATCH_RULE_SGD = 0,
  /*
   Adam with an L2 penalty (torch.optim.Adam).
   */
  SMALLBATCH_RULE_ADAM = 1,
  /*
   Adam with decoupled weight decay (torch.optim.AdamW).
   */
  SMALLBATCH_RULE_ADAMW = 2,
  /*
   Adafactor: factored second moments (smallbatch_rs.Adafactor).
   */
  SMALLBATCH_RULE_ADAFACTOR = 3,
  /*
   Muon: momentum and Newton-Schulz orthogonalisation of matrices (torch.optim.Muon).
   */
  SMALLBATCH_RULE_MUON = 4,
};
#ifndef __cplusplus
#if __STDC_VERSION__ >= 202311L
typedef enum SmallbatchRule SmallbatchRule;
#else
typedef uint32_t SmallbatchRule;
#endif // __STDC_VERSION__ >= 202311L
#endif // __cplusplus

/*
 Storage types of parameters and gradients (values of `SmallbatchConfig.param_dtype`).
 Optimizer state is float32 either way.
 */
enum SmallbatchDtype
#if defined(__cplusplus) || __STDC_VERSION__ >= 202311L
  : uint32_t
#endif // defined(__cplusplus) || __STDC_VERSION__ >= 202311L
 {
  /*
   `float`.
   */
  SMALLBATCH_DTYPE_F32 = 0,
  /*
   bfloat16 as raw `uint16_t` bits: updates are computed in float32 and rounded back.
   */
  SMALLBATCH_DTYPE_BF16 = 1,
};
#ifndef __cplusplus
#if __STDC_VERSION__ >= 202311L
typedef enum SmallbatchDtype SmallbatchDtype;
#else
typedef uint32_t SmallbatchDtype;
#endif // __STDC_VERSION__ >= 202311L
#endif // __cplusplus

/*
 How bf16 parameters are rounded after an update (values of `SmallbatchConfig.rounding`).
 */
enum SmallbatchRounding
#if defined(__cplusplus) || __STDC_VERSION__ >= 202311L
  : uint32_t
#endif // defined(__cplusplus) || __STDC_VERSION__ >= 202311L
 {
  /*
   To nearest, ties to even.
   */
  SMALLBATCH_ROUNDING_NEAREST = 0,
  /*
   Stochastically (unbiased), with random bits keyed by `seed` and counted by (step,
   element, `stream`): deterministic, and a resumed run continues bit for bit.
   */
  SMALLBATCH_ROUNDING_STOCHASTIC = 1,
};
#ifndef __cplusplus
#if __STDC_VERSION__ >= 202311L
typedef enum SmallbatchRounding SmallbatchRounding;
#else
typedef uint32_t SmallbatchRounding;
#endif // __STDC_VERSION__ >= 202311L
#endif // __cplusplus

/*
 How Muon scales the learning rate by each matrix's shape (values of `SmallbatchConfig.adjust_lr`).
 */
enum SmallbatchLrAdjust
#if defined(__cplusplus) || __STDC_VERSION__ >= 202311L
  : uint32_t
#endif // defined(__cplusplus) || __STDC_VERSION__ >= 202311L
 {
  /*
   `sqrt(max(1, rows / cols))`, torch.optim.Muon's default.
   */
  SMALLBATCH_LR_ADJUST_ORIGINAL = 0,
  /*
   `0.2 sqrt(max(rows, cols))`: the update's RMS matches AdamW's.
   */
  SMALLBATCH_LR_ADJUST_MATCH_RMS_ADAMW = 1,
  /*
   No scaling.
   */
  SMALLBATCH_LR_ADJUST_NONE = 2,
};
#ifndef __cplusplus
#if __STDC_VERSION__ >= 202311L
typedef enum SmallbatchLrAdjust SmallbatchLrAdjust;
#else
typedef uint32_t SmallbatchLrAdjust;
#endif // __STDC_VERSION__ >= 202311L
#endif // __cplusplus

/*
 An optimizer: its rule and hyperparameters, tensor table, step counters and state. Made by
 `smallbatch_optimizer_new`, released by `smallbatch_optimizer_free`.
 */
typedef struct SmallbatchOptimizer SmallbatchOptimizer;

/*
 Everything an optimizer is made of. Fill it with `smallbatch_config_default(rule, &config)`
 (the defaults of the Python package's optimizer of that rule), then change what you need.
 Fields a rule does not use are ignored, except `t2` (must be 0 for SGD and Muon).
 */
typedef struct SmallbatchConfig {
  /*
   A `SmallbatchRule`.
   */
  uint32_t rule;
  /*
   A `SmallbatchDtype`: the type of the parameter and gradient buffers.
   */
  uint32_t param_dtype;
  /*
   A `SmallbatchRounding`, for bf16 parameters (ignored for float).
   */
  uint32_t rounding;
  /*
   Separates the random bits of optimizers that share a seed (the Python package uses the
   param group's index).
   */
  uint32_t stream;
  /*
   Seed of stochastic rounding's random bits.
   */
  uint64_t seed;
  /*
   Learning rate (finite, >= 0).
   */
  double lr;
  /*
   SGD: momentum factor (>= 0; 0 keeps no momentum buffer). Muon: momentum in [0, 1).
   */
  double momentum;
  /*
   SGD: dampening of the momentum.
   */
  double dampening;
  /*
   Adam, AdamW, Adafactor: first-moment coefficient in [0, 1) (Adafactor: 0 = no momentum).
   */
  double beta1;
  /*
   Adam, AdamW: second-moment coefficient in [0, 1). Adafactor: a constant beta2, used when
   `t2` and `beta2_decay` are 0.
   */
  double beta2;
  /*
   Adafactor: torch's schedule `beta2_t = 1 - t^beta2_decay` when < 0 and `t2` is 0;
   0 selects the constant `beta2`.
   */
  double beta2_decay;
  /*
   Half-life in tokens that sets `momentum` (SGD, Muon) or `beta1` (Adam, AdamW,
   Adafactor) to `0.5^(tokens_per_step / t1)`; 0 = not used.
   */
  double t1;
  /*
   Half-life in tokens that sets `beta2` (Adam, AdamW, Adafactor); 0 = not used.
   */
  double t2;
  /*
   Tokens per step (batch size x sequence length), needed with `t1` or `t2`.
   */
  double tokens_per_step;
  /*
   Adam, AdamW: added to the denominator. Muon: floor of the Newton-Schulz input's norm.
   */
  double eps;
  /*
   Adafactor: added to the squared gradient (the paper's 1e-30); 0 selects torch's
   handling instead (no addition, clamps at float32's epsilon).
   */
  double eps1;
  /*
   Adafactor: floor of the parameter RMS in the relative step size.
   */
  double eps2;
  /*
   Adafactor: clipping threshold on the update's RMS (>= 1).
   */
  double clip_threshold;
  /*
   Weight decay: L2 penalty (SGD, Adam) or decoupled (AdamW, Adafactor, Muon).
   */
  double weight_decay;
  /*
   Adafactor: factor tensors of 2 or more dims whose smaller last-two dim is at least this.
   */
  size_t min_dim_size_to_factor;
  /*
   Muon: coefficients (a, b, c) of the Newton-Schulz quintic.
   */
  float ns_coefficients[3];
  /*
   Muon: Newton-Schulz iterations (<= 99).
   */
  uint32_t ns_steps;
  /*
   Muon: a `SmallbatchLrAdjust`.
   */
  uint32_t adjust_lr;
  /*
   SGD, Muon: Nesterov momentum (nonzero = on).
   */
  uint8_t nesterov;
  /*
   Ascend instead of descend (nonzero = on).
   */
  uint8_t maximize;
  /*
   Adafactor: scale the step by `max(eps2, RMS(param))` (nonzero = on).
   */
  uint8_t relative_step;
  /*
   Adafactor: cap the step size at `1/sqrt(t)`, as torch.optim.Adafactor does (nonzero = on).
   */
  uint8_t step_size_cap;
} SmallbatchConfig;

/*
 One tensor of the flat buffer, by its shape. Tensors lie back to back in the buffer, in
 table order; each is row-major. Adafactor factors and Muon orthogonalises over the last two
 dims (a tensor of more dims is a batch of matrices); SGD and Adam need only the sizes.
 */
typedef struct SmallbatchTensor {
  /*
   Number of dims, at most `SMALLBATCH_MAX_DIMS` (0 for a scalar).
   */
  uint32_t ndim;
  /*
   Dims, outermost first; entries from `ndim` on are ignored.
   */
  size_t shape[SMALLBATCH_MAX_DIMS];
} SmallbatchTensor;

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

/*
 The library's version, e.g. "0.1.0" (a static string).
 */
const char *smallbatch_version(void);

/*
 The message of the last failed call on this thread, naming the function and the culprit;
 "" if none has failed. Valid until the next failing call on this thread.
 */
const char *smallbatch_last_error(void);

/*
 The name of a status code, e.g. "SMALLBATCH_STATUS_LENGTH" (a static string; "unknown status"
 for values that are none).
 */
const char *smallbatch_status_name(int32_t status);

/*
 `sizeof(SmallbatchConfig)` as this library sees it, for bindings that declare the struct
 themselves to check their layout.
 */
size_t smallbatch_config_size(void);

/*
 Fills `out` with the defaults of the Python package's optimizer for `rule` (a
 `SmallbatchRule`): float parameters, round-to-nearest, seed 0, no half-lives.

 # Safety
 `out` must be NULL or point at writable memory for a `SmallbatchConfig`.
 */
enum SmallbatchStatus smallbatch_config_default(uint32_t rule, struct SmallbatchConfig *out);

/*
 Makes an optimizer for `n_tensors` tensors laid back to back, in table order, in one flat
 parameter buffer (and likewise one gradient buffer). Every hyperparameter is checked here.
 On success `*out` is the new handle; on failure it is set to NULL.

 # Safety
 `config` must be NULL or point at a `SmallbatchConfig`; `tensors` NULL or at `n_tensors`
 `SmallbatchTensor`s; `out` NULL or at writable memory for a pointer.
 */
enum SmallbatchStatus smallbatch_optimizer_new(const struct SmallbatchConfig *config,
                                               const struct SmallbatchTensor *tensors,
                                               size_t n_tensors,
                                               struct SmallbatchOptimizer **out);

/*
 Releases an optimizer; NULL is ignored.

 # Safety
 `opt` must be NULL or a handle from `smallbatch_optimizer_new` not yet freed, and no other
 call may be using it.
 */
void smallbatch_optimizer_free(struct SmallbatchOptimizer *opt);

/*
 Writes the number of elements of the flat parameter buffer (the sum of the tensors' sizes)
 to `*out`.

 # Safety
 `opt` must be NULL or a live handle; `out` NULL or writable.
 */
enum SmallbatchStatus smallbatch_optimizer_num_elements(const struct SmallbatchOptimizer *opt,
                                                        size_t *out);

/*
 Writes the optimizer's config to `*out`, with the betas in use: `momentum`, `beta1` and
 `beta2` as computed from `t1`, `t2` and `tokens_per_step` where those are set.

 # Safety
 `opt` must be NULL or a live handle; `out` NULL or writable.
 */
enum SmallbatchStatus smallbatch_optimizer_get_config(const struct SmallbatchOptimizer *opt,
                                                      struct SmallbatchConfig *out);

/*
 Changes the learning rate from the next step on (for schedules). Refused, changing nothing,
 unless finite and >= 0.

 # Safety
 `opt` must be NULL or a live handle.
 */
enum SmallbatchStatus smallbatch_optimizer_set_lr(struct SmallbatchOptimizer *opt, double lr);

/*
 Changes the tokens per step (when the batch size changes): betas set by half-lives are
 recomputed so that the half-lives in tokens stay the same. Refused, changing nothing, unless
 finite and > 0, and when a momentum would turn on or off (state buffers are fixed at creation).

 # Safety
 `opt` must be NULL or a live handle.
 */
enum SmallbatchStatus smallbatch_optimizer_set_tokens_per_step(struct SmallbatchOptimizer *opt,
                                                               double tokens_per_step);

/*
 One optimizer step of an optimizer made for float parameters: `param` (updated in place)
 and `grad` each hold `len` floats, the optimizer's tensors back to back.

 # Safety
 `opt` must be NULL or a live handle; `param` NULL or `len` writable floats, `grad` NULL or
 `len` readable floats, neither touched by anyone else during the call.
 */
enum SmallbatchStatus smallbatch_optimizer_step_f32(struct SmallbatchOptimizer *opt,
                                                    float *param,
                                                    const float *grad,
                                                    size_t len);

/*
 One optimizer step of an optimizer made for bf16 parameters (raw bits): as
 `smallbatch_optimizer_step_f32`, with the update computed in float32 and rounded back as the
 config's `rounding` says.

 # Safety
 As for `smallbatch_optimizer_step_f32`, with `uint16_t` elements.
 */
enum SmallbatchStatus smallbatch_optimizer_step_bf16(struct SmallbatchOptimizer *opt,
                                                     uint16_t *param,
                                                     const uint16_t *grad,
                                                     size_t len);

/*
 Writes the bytes `smallbatch_optimizer_export_state` needs to `*out`.

 # Safety
 `opt` must be NULL or a live handle; `out` NULL or writable.
 */
enum SmallbatchStatus smallbatch_optimizer_state_size(const struct SmallbatchOptimizer *opt,
                                                      size_t *out);

/*
 Writes the optimizer's state (step counters and state buffers, with a description of its
 rule and tensors, a format version and a checksum) to `buf`, which holds `len` bytes, and the
 byte count to `*written` (which may be NULL). Fails with SMALLBATCH_STATUS_BUFFER_TOO_SMALL,
 writing nothing, when `len` is less than `smallbatch_optimizer_state_size` says.

 # Safety
 `opt` must be NULL or a live handle; `buf` NULL or `len` writable bytes; `written` NULL or
 writable.
 */
enum SmallbatchStatus smallbatch_optimizer_export_state(const struct SmallbatchOptimizer *opt,
                                                        uint8_t *buf,
                                                        size_t len,
                                                        size_t *written);

/*
 Replaces the optimizer's step counters and state with those exported by
 `smallbatch_optimizer_export_state` from an optimizer of the same rule, tensors and state
 buffers; hyperparameters stay this optimizer's. Bytes that are not such state (another
 format version, a checksum mismatch, another optimizer) fail with SMALLBATCH_STATUS_STATE
 and change nothing.

 # Safety
 `opt` must be NULL or a live handle; `buf` NULL or `len` readable bytes.
 */
enum SmallbatchStatus smallbatch_optimizer_import_state(struct SmallbatchOptimizer *opt,
                                                        const uint8_t *buf,
                                                        size_t len);

/*
 `*out = 0.5^(tokens_per_step / halflife_tokens)`: the EMA coefficient with a half-life of
 `halflife_tokens` tokens when each step consumes `tokens_per_step` (both finite and > 0).

 # Safety
 `out` must be NULL or writable.
 */
enum SmallbatchStatus smallbatch_beta_from_halflife(double halflife_tokens,
                                                    double tokens_per_step,
                                                    double *out);

/*
 `*out = tokens_per_step * ln(0.5) / ln(beta)`: the half-life in tokens of an EMA with
 coefficient `beta` in (0, 1).

 # Safety
 `out` must be NULL or writable.
 */
enum SmallbatchStatus smallbatch_halflife_from_beta(double beta,
                                                    double tokens_per_step,
                                                    double *out);

/*
 `*out = beta^(to_tokens_per_step / from_tokens_per_step)`: the coefficient with the same
 half-life in tokens after the tokens per step change.

 # Safety
 `out` must be NULL or writable.
 */
enum SmallbatchStatus smallbatch_scale_beta(double beta,
                                            double from_tokens_per_step,
                                            double to_tokens_per_step,
                                            double *out);

/*
 Rounds `n` floats at `src` to bf16 bits at `dst` stochastically (unbiased): element `i`
 with random bits from Philox4x32-10 keyed by `seed` and counted by (`step`, `i`, `stream`),
 the same bits the optimizers use, on every SIMD path and thread count. NaN stays NaN, +-Inf
 stays +-Inf.

 # Safety
 `src` must be NULL or `n` readable floats; `dst` NULL or `n` writable `uint16_t`s, not
 overlapping `src`.
 */
enum SmallbatchStatus smallbatch_stochastic_round(const float *src,
                                                  uint16_t *dst,
                                                  size_t n,
                                                  uint64_t seed,
                                                  uint64_t step,
                                                  uint32_t stream);

/*
 Rounds `n` floats at `src` to the nearest bf16 (ties to even) at `dst`.

 # Safety
 As for `smallbatch_stochastic_round`.
 */
enum SmallbatchStatus smallbatch_round_nearest(const float *src, uint16_t *dst, size_t n);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* SMALLBATCH_H */
