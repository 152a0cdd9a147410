/* Uses the native sampler through its C surface only (csrc/include/msld.h), as a vendor's
 * C or C++ host would: schedule, noise, fused step, aggregation and the whole loop with a
 * C denoiser callback. Prints "N passed, M failed" and exits non-zero on any failure. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "msld.h"

static int passed = 0, failed = 0;
#define CHECK(cond, what)                                              \
    do {                                                               \
        if (cond) { ++passed; }                                        \
        else { ++failed; fprintf(stderr, "FAIL %s (line %d)\n", what, __LINE__); } \
    } while (0)

/* A toy denoiser: eps = 0.5 * x + 0.001 * t. Counts its calls. */
typedef struct { int calls; int batch_seen; } toy_state;
static int toy_denoise(void* user, const float* x, const float* t, float* eps, int32_t batch) {
    toy_state* s = (toy_state*)user;
    s->calls++;
    s->batch_seen = batch;
    for (int32_t b = 0; b < batch; ++b)
        for (int e = 0; e < 16; ++e) eps[b * 16 + e] = 0.5f * x[b * 16 + e] + 0.001f * t[b];
    return 0;
}
static int failing_denoise(void* u, const float* x, const float* t, float* eps, int32_t b) {
    (void)u; (void)x; (void)t; (void)eps; (void)b;
    return 7;
}
static int cancel_after_two(void* u, int32_t done, int32_t total) { (void)u; (void)total; return done >= 2; }

int main(void) {
    /* schedule */
    int32_t ts[20];
    CHECK(msld_ddim_timesteps(1000, 20, MSLD_SPACING_TRAILING, ts) == MSLD_OK, "timesteps ok");
    CHECK(ts[0] == 999 && ts[19] == 49, "trailing timesteps 999..49");
    CHECK(msld_ddim_timesteps(1000, 20, MSLD_SPACING_LEADING, ts) == MSLD_OK && ts[0] == 950 && ts[19] == 0,
          "leading timesteps 950..0");
    CHECK(msld_ddim_timesteps(1000, 0, MSLD_SPACING_TRAILING, ts) == MSLD_ERR_INVALID_ARG, "steps 0 rejected");
    CHECK(msld_ddim_timesteps(1000, 5, MSLD_SPACING_TRAILING, NULL) == MSLD_ERR_NULL_POINTER, "NULL rejected");
    CHECK(strlen(msld_status_string(MSLD_ERR_CUDA)) > 0, "status strings");

    /* noise: deterministic, keyed by hypothesis */
    float a[3 * 10], b[2 * 10];
    CHECK(msld_gaussian(42, 0, 3, 10, 0, a) == MSLD_OK, "gaussian ok");
    CHECK(msld_gaussian(42, 1, 2, 10, 0, b) == MSLD_OK, "gaussian subrange ok");
    CHECK(memcmp(a + 10, b, sizeof(b)) == 0, "hypotheses 1..2 independent of the range asked");
    double s = 0, s2 = 0;
    float big[4096];
    msld_gaussian(7, 0, 1, 4096, 3, big);
    for (int i = 0; i < 4096; ++i) { s += big[i]; s2 += (double)big[i] * big[i]; }
    CHECK(fabs(s / 4096) < 0.05 && fabs(s2 / 4096 - 1.0) < 0.1, "noise mean 0, variance 1");

    /* fused step: eta = 0 reduces to the closed form */
    float x[4] = {1.0f, -2.0f, 0.5f, 3.0f}, eps[4] = {0.1f, 0.2f, -0.3f, 0.0f}, x0[4];
    msld_ddim_coeffs c = {500, 450, 0.25, 0.36};
    float expect[4];
    for (int i = 0; i < 4; ++i) {
        float p = (x[i] - sqrtf(0.75f) * eps[i]) / 0.5f;
        expect[i] = 0.6f * p + sqrtf(1.0f - 0.36f) * eps[i];
    }
    CHECK(msld_ddim_step(x, eps, NULL, 4, &c, 0.0f, 0.0f, x0) == MSLD_OK, "step ok");
    int close = 1;
    for (int i = 0; i < 4; ++i) close &= fabsf(x[i] - expect[i]) < 1e-5f;
    CHECK(close, "step matches closed form");
    CHECK(msld_ddim_step(x, eps, NULL, 4, &c, 1.0f, 0.0f, NULL) == MSLD_ERR_NULL_POINTER, "eta>0 needs noise");
    msld_ddim_coeffs bad = {500, 450, 1.5, 0.36};
    CHECK(msld_ddim_step(x, eps, NULL, 4, &bad, 0.0f, 0.0f, NULL) == MSLD_ERR_INVALID_ARG, "alpha > 1 rejected");
    /* a step to more noise (a_prev < a_t, an inversion): eta 0 keeps the eps term, eta > 0 is refused */
    {
        float xi[1] = {1.0f}, ei[1] = {0.5f}, nz[1] = {0.0f};
        msld_ddim_coeffs inv = {100, 200, 0.5, 0.3};
        float want = sqrtf(0.3f) * ((1.0f - sqrtf(0.5f) * 0.5f) / sqrtf(0.5f)) + sqrtf(0.7f) * 0.5f;
        CHECK(msld_ddim_step(xi, ei, NULL, 1, &inv, 0.0f, 0.0f, NULL) == MSLD_OK && fabsf(xi[0] - want) < 1e-5f,
              "eta 0 step towards more noise keeps its eps direction");
        CHECK(msld_ddim_step(xi, ei, nz, 1, &inv, 0.5f, 0.0f, NULL) == MSLD_ERR_INVALID_ARG,
              "eta > 0 with a_prev < a_t rejected");
        msld_ddim_coeffs over = {500, 450, 0.25, 1.5};
        CHECK(msld_ddim_step(xi, ei, NULL, 1, &over, 0.0f, 0.0f, NULL) == MSLD_ERR_INVALID_ARG, "a_prev > 1 rejected");
        CHECK(msld_ddim_step(xi, ei, nz, 1, &c, INFINITY, 0.0f, NULL) == MSLD_ERR_INVALID_ARG, "eta inf rejected");
    }
    CHECK(strcmp(msld_status_string(MSLD_ERR_OUT_OF_MEMORY), "unknown status") != 0, "out-of-memory has a text");

    /* the loop's specialised update bodies equal the general per-element update bit for bit */
    {
        enum { N = 1001 };
        static float xa[N], xb[N], ep[N], nz[N], x0s[N];
        msld_gaussian(3, 0, 1, N, 1, ep);
        msld_gaussian(3, 0, 1, N, 2, nz);
        int same = 1;
        for (int variant = 0; variant < 4; ++variant) {
            float eta = (variant & 1) ? 1.0f : 0.0f, clip = (variant & 2) ? 1.0f : 0.0f;
            msld_gaussian(3, 0, 1, N, 0, xa);
            memcpy(xb, xa, sizeof(xa));
            msld_ddim_step(xa, ep, nz, N, &c, eta, clip, x0s);  /* general path (x0 requested) */
            msld_ddim_step(xb, ep, nz, N, &c, eta, clip, NULL); /* specialised, vectorised path */
            same &= memcmp(xa, xb, sizeof(xa)) == 0;
        }
        CHECK(same, "specialised update equals the general one bit for bit");
    }

    /* aggregation */
    float probs[3 * 2] = {0.9f, 0.1f, 0.8f, 0.6f, 0.2f, 0.4f}; /* k=3, 2 pixels */
    unsigned char masks[6], cons[2];
    float mean[2], conf[2];
    CHECK(msld_aggregate(probs, 3, 2, 0.5f, masks, mean, conf, cons) == MSLD_OK, "aggregate ok");
    CHECK(masks[0] == 1 && masks[1] == 0 && masks[3] == 1 && masks[4] == 0, "masks thresholded");
    CHECK(cons[0] == 1 && cons[1] == 0, "consensus is the majority");
    CHECK(fabsf(mean[0] - (0.9f + 0.8f + 0.2f) / 3) < 1e-6f, "mean probability");
    CHECK(fabsf(conf[0] - (1.0f - 2.0f * sqrtf((2.0f / 3) * (1.0f / 3)))) < 1e-6f, "confidence from votes");
    CHECK(msld_aggregate(probs, 0, 2, 0.5f, NULL, mean, conf, NULL) == MSLD_ERR_INVALID_ARG, "k=0 rejected");

    /* the whole loop */
    float ac[1000];
    double prod = 1.0;
    for (int i = 0; i < 1000; ++i) { prod *= 1.0 - (1e-4 + (0.02 - 1e-4) * i / 999.0); ac[i] = (float)prod; }
    msld_sampler_params p = {1000, ac, 10, MSLD_SPACING_TRAILING, 0.0f, 0.0f, 123, 3, 2, 16, 0, MSLD_SOLVER_DDIM, NULL};
    float lx[6 * 16], le[6 * 16], lt[6];
    toy_state st = {0, 0};
    CHECK(msld_ddim_sample(&p, toy_denoise, &st, NULL, NULL, lx, le, lt) == MSLD_OK, "loop ok");
    CHECK(st.calls == 10 && st.batch_seen == 6, "one denoiser call per step for all hypotheses");
    CHECK(memcmp(lx, lx + 3 * 16, 3 * 16 * sizeof(float)) == 0, "each image of a batch gets the same hypotheses");
    int finite = 1;
    for (int i = 0; i < 6 * 16; ++i) finite &= isfinite(lx[i]);
    CHECK(finite, "finite latents");
    CHECK(msld_ddim_sample(&p, failing_denoise, NULL, NULL, NULL, lx, le, lt) == MSLD_ERR_CALLBACK,
          "callback failure reported");
    st.calls = 0;
    CHECK(msld_ddim_sample(&p, toy_denoise, &st, cancel_after_two, NULL, lx, le, lt) == MSLD_ERR_CANCELLED &&
              st.calls == 2, "progress callback cancels");
    p.eta = 1.0f;
    CHECK(msld_ddim_sample(&p, toy_denoise, &st, NULL, NULL, lx, le, lt) == MSLD_OK, "loop with eta=1 ok");
    /* k * n_images beyond int32: refused before anything is allocated or called */
    {
        msld_sampler_params big = p;
        big.k = 65536;
        big.n_images = 32768;
        big.eta = 0.0f;
        st.calls = 0;
        CHECK(msld_ddim_sample(&big, toy_denoise, &st, NULL, NULL, lx, le, lt) == MSLD_ERR_INVALID_ARG &&
                  st.calls == 0, "k * n_images over int32 rejected");
    }
    /* DPM-Solver++(2M) through the same loop: one denoiser call per step, eta > 0 refused */
    p.solver = MSLD_SOLVER_DPMPP2M;
    CHECK(msld_ddim_sample(&p, toy_denoise, &st, NULL, NULL, lx, le, lt) == MSLD_ERR_INVALID_ARG,
          "dpmpp2m refuses eta > 0");
    p.eta = 0.0f;
    st.calls = 0;
    CHECK(msld_ddim_sample(&p, toy_denoise, &st, NULL, NULL, lx, le, lt) == MSLD_OK && st.calls == 10,
          "dpmpp2m loop ok, one denoiser call per step");
    finite = 1;
    for (int i = 0; i < 6 * 16; ++i) finite &= isfinite(lx[i]);
    CHECK(finite, "finite dpmpp2m latents");
    /* a given grid (v4) that spells the trailing rule gives the rule's run bit for bit; DDIM refuses one */
    int32_t grid[10];
    float rx[6 * 16];
    memcpy(rx, lx, sizeof rx);
    CHECK(msld_dpmpp2m_timesteps(1000, 10, MSLD_SPACING_TRAILING, grid) == MSLD_OK, "trailing grid");
    p.timesteps = grid;
    CHECK(msld_ddim_sample(&p, toy_denoise, &st, NULL, NULL, lx, le, lt) == MSLD_OK &&
              memcmp(rx, lx, sizeof rx) == 0, "dpmpp2m on the rule's own grid = the rule");
    grid[3] = grid[2];
    CHECK(msld_ddim_sample(&p, toy_denoise, &st, NULL, NULL, lx, le, lt) == MSLD_ERR_INVALID_ARG,
          "a grid with a repeated timestep is refused");
    p.solver = MSLD_SOLVER_DDIM;
    CHECK(msld_ddim_sample(&p, toy_denoise, &st, NULL, NULL, lx, le, lt) == MSLD_ERR_INVALID_ARG,
          "DDIM refuses a grid");
    p.timesteps = NULL;
    /* given initial latents: the loop starts from x instead of drawing */
    p.eta = 0.0f;
    float gx[6 * 16], gx2[6 * 16];
    for (int i = 0; i < 6 * 16; ++i) gx[i] = gx2[i] = 0.01f * (float)(i % 17) - 0.08f;
    p.latents_given = 1;
    CHECK(msld_ddim_sample(&p, toy_denoise, &st, NULL, NULL, gx, le, lt) == MSLD_OK, "loop from given latents ok");
    p.latents_given = 0;
    CHECK(msld_ddim_sample(&p, toy_denoise, &st, NULL, NULL, gx2, le, lt) == MSLD_OK &&
              memcmp(gx, gx2, sizeof gx) != 0, "given latents are used, not overwritten by drawn noise");
    /* the reference sampler's timesteps: trunc(linspace(0, 999, steps)) descending */
    int32_t rts[20];
    CHECK(msld_ddim_timesteps(1000, 20, MSLD_SPACING_LINSPACE_TRUNC, rts) == MSLD_OK && rts[0] == 999 &&
              rts[1] == 946 && rts[18] == 52 && rts[19] == 0, "linspace_trunc timesteps");
    CHECK(msld_ddim_timesteps(1000, 1, MSLD_SPACING_LINSPACE_TRUNC, rts) == MSLD_OK && rts[0] == 0,
          "linspace_trunc with one step starts at 0");
    p.k = 0;
    CHECK(msld_ddim_sample(&p, toy_denoise, &st, NULL, NULL, lx, le, lt) == MSLD_ERR_INVALID_ARG, "k=0 rejected");

    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
