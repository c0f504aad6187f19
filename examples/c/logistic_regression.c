/*
 * Logistic regression trained at batch size 1 through the C API: no Python, no torch.
 *
 *     cargo build --release -p smallbatch-capi
 *     cc -std=c11 -O2 -Irust/capi/include examples/c/logistic_regression.c \
 *        target/release/libsmallbatch_capi.a -lpthread -ldl -lm -o logistic_regression
 *     ./logistic_regression
 *
 * The weights (a 1 x 16 matrix) and the bias are two tensors in one flat buffer; each step
 * computes one example's log-loss gradient by hand and calls the optimizer once. beta2 comes
 * from a half-life in tokens (here one example is one token). Halfway through, the optimizer
 * is checkpointed to bytes, freed, and resumed from them, as a training job restarted from a
 * checkpoint would be. Exits non-zero unless the loss falls.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "smallbatch.h"

#define FEATURES 16
#define EXAMPLES 4000
#define PARAMS (FEATURES + 1)

/* Fails the program with the library's message when a call does not return OK. */
#define CHECK(call)                                                                          \
    do {                                                                                     \
        enum SmallbatchStatus status_ = (call);                                              \
        if (status_ != SMALLBATCH_STATUS_OK) {                                               \
            fprintf(stderr, "%s: %s\n", smallbatch_status_name(status_), smallbatch_last_error()); \
            exit(2);                                                                         \
        }                                                                                    \
    } while (0)

/* A small deterministic generator, so the example prints the same numbers everywhere. */
static uint64_t rng_state = 7;

static float uniform(void) {
    rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float)(rng_state >> 40) / (float)(1u << 24);
}

static float normal(void) {
    float u = fmaxf(uniform(), 1e-7f), v = uniform();
    return sqrtf(-2.0f * logf(u)) * cosf(6.2831853f * v);
}

static float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

static float x[EXAMPLES][FEATURES];
static float y[EXAMPLES];

static float predict(const float *param, const float *xi) {
    float z = param[FEATURES];
    for (int j = 0; j < FEATURES; j++) z += param[j] * xi[j];
    return sigmoid(z);
}

static float mean_loss(const float *param) {
    double total = 0.0;
    for (int i = 0; i < EXAMPLES; i++) {
        float p = fminf(fmaxf(predict(param, x[i]), 1e-7f), 1.0f - 1e-7f);
        total -= y[i] * logf(p) + (1.0f - y[i]) * logf(1.0f - p);
    }
    return (float)(total / EXAMPLES);
}

static SmallbatchOptimizer *make_optimizer(void) {
    SmallbatchConfig cfg;
    CHECK(smallbatch_config_default(SMALLBATCH_RULE_ADAMW, &cfg));
    cfg.lr = 3e-2;
    cfg.weight_decay = 0.0;
    cfg.t2 = 2000.0;          /* beta2 from a half-life of 2000 examples... */
    cfg.tokens_per_step = 1.0; /* ...at one example per step */
    SmallbatchTensor tensors[2] = {{2, {1, FEATURES}}, {1, {1}}};
    SmallbatchOptimizer *opt = NULL;
    CHECK(smallbatch_optimizer_new(&cfg, tensors, 2, &opt));
    return opt;
}

/* One epoch at batch size 1. */
static void train_epoch(SmallbatchOptimizer *opt, float *param) {
    float grad[PARAMS];
    for (int i = 0; i < EXAMPLES; i++) {
        float err = predict(param, x[i]) - y[i]; /* d(log-loss)/dz */
        for (int j = 0; j < FEATURES; j++) grad[j] = err * x[i][j];
        grad[FEATURES] = err;
        CHECK(smallbatch_optimizer_step_f32(opt, param, grad, PARAMS));
    }
}

int main(void) {
    float true_w[FEATURES];
    for (int j = 0; j < FEATURES; j++) true_w[j] = normal();
    for (int i = 0; i < EXAMPLES; i++) {
        float z = 0.5f;
        for (int j = 0; j < FEATURES; j++) z += (x[i][j] = normal()) * true_w[j];
        y[i] = uniform() < sigmoid(z) ? 1.0f : 0.0f;
    }

    float param[PARAMS] = {0};
    SmallbatchOptimizer *opt = make_optimizer();
    SmallbatchConfig in_use;
    CHECK(smallbatch_optimizer_get_config(opt, &in_use));
    printf("smallbatch %s: AdamW, beta2 = %.6f (half-life 2000 examples at batch size 1)\n", smallbatch_version(),
           in_use.beta2);

    float first = mean_loss(param), loss = first;
    printf("epoch 0  loss %.4f\n", first);
    for (int epoch = 1; epoch <= 4; epoch++) {
        train_epoch(opt, param);
        loss = mean_loss(param);
        printf("epoch %d  loss %.4f\n", epoch, loss);
        if (epoch == 2) {
            /* Checkpoint: the state as bytes, then a fresh optimizer resumed from them. */
            size_t size = 0, written = 0;
            CHECK(smallbatch_optimizer_state_size(opt, &size));
            uint8_t *bytes = malloc(size);
            if (bytes == NULL) return 2;
            CHECK(smallbatch_optimizer_export_state(opt, bytes, size, &written));
            smallbatch_optimizer_free(opt);
            opt = make_optimizer();
            CHECK(smallbatch_optimizer_import_state(opt, bytes, written));
            free(bytes);
            printf("checkpointed %zu bytes of optimizer state and resumed from them\n", written);
        }
    }
    smallbatch_optimizer_free(opt);

    float err = 0.0f;
    for (int j = 0; j < FEATURES; j++) err += fabsf(param[j] - true_w[j]);
    printf("mean |w - w_true| = %.3f, bias %.3f (true 0.5)\n", err / FEATURES, param[FEATURES]);
    if (!(loss < 0.8f * first)) {
        fprintf(stderr, "the loss did not fall: %.4f -> %.4f\n", first, loss);
        return 1;
    }
    return 0;
}
