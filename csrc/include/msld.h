/*
 * msld.h - stable C surface of the msld_sdk native sampler.
 *
 * Plain pointers, explicit error codes, no C++ types, no allocation behind the caller's back:
 * a C or C++ host can run the fused DDIM step, the counter-based noise and the hypothesis
 * aggregation without Python. All arrays are float32, contiguous, row-major.
 *
 * Layout conventions
 *   latents: [n_hyp, elems] where elems = channels * height * width of one latent
 *   probs:   [k, n_pix] foreground probabilities of k hypotheses for one image
 *
 * Determinism: noise element e of hypothesis h for stream s under seed S is a pure function
 * of (S, h, s, e) (Philox4x32-10 + Box-Muller in IEEE double with no fused multiply-add), so
 * the CPU and CUDA kernels give bit-identical noise and hypothesis h never depends on how
 * many hypotheses run together.
 */
#ifndef MSLD_H
#define MSLD_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MSLD_API_VERSION 5  /* 2: MSLD_SPACING_LINSPACE_TRUNC, msld_sampler_params.latents_given;
                               3: msld_solver, DPM-Solver++(2M), msld_sampler_params.solver;
                               4: msld_dpmpp2m_coeffs_at, msld_sampler_params.timesteps;
                               5: MSLD_ERR_OUT_OF_MEMORY; no C++ exception leaves a C entry point */

typedef enum msld_status {
    MSLD_OK = 0,
    MSLD_ERR_NULL_POINTER = 1,   /* a required pointer was NULL */
    MSLD_ERR_INVALID_ARG = 2,    /* a size, count or parameter out of range */
    MSLD_ERR_CALLBACK = 3,       /* the denoiser callback returned non-zero */
    MSLD_ERR_CUDA = 4,           /* a CUDA call failed (CUDA entry points only) */
    MSLD_ERR_NO_CUDA = 5,        /* the library was built without CUDA */
    MSLD_ERR_CANCELLED = 6,      /* the progress callback asked to stop */
    MSLD_ERR_OUT_OF_MEMORY = 7   /* a work buffer could not be allocated (msld_ddim_sample's x0 or
                                    noise buffer, a schedule table) */
} msld_status;

/* Human-readable text for a status code (static storage, never NULL). */
const char* msld_status_string(msld_status s);

/* Timestep spacing. LEADING and TRAILING are diffusers' DDIMScheduler `timestep_spacing`.
 * LINSPACE_TRUNC is the rule of the MedSegLatDiff reference sampler (huynhspm/Generative-Model
 * at 3983e93, BaseSampler.set_timesteps 'uniform'): torch.linspace(0, T - 1, steps) in float32
 * (start + step * i for the first steps/2 entries, end - step * (steps - 1 - i) after, as
 * torch's scalar CPU kernel), truncated toward zero, descending. With every spacing the
 * previous timestep is t - T / steps (integer division) and alpha_prev = 1 when it is negative,
 * so with LINSPACE_TRUNC the previous timestep is generally not the next visited one. */
typedef enum msld_spacing {
    MSLD_SPACING_LEADING = 0,
    MSLD_SPACING_TRAILING = 1,
    MSLD_SPACING_LINSPACE_TRUNC = 2
} msld_spacing;

/* One DDIM step's scalars (host-side, per step). */
typedef struct msld_ddim_coeffs {
    int32_t timestep;      /* t */
    int32_t prev_timestep; /* t - T/steps (may be negative: then alpha_prev = 1) */
    double alpha_t;        /* alphas_cumprod[t] */
    double alpha_prev;     /* alphas_cumprod[prev] or 1 */
} msld_ddim_coeffs;

/* Fill `timesteps_out[steps]` (descending) exactly as diffusers' DDIMScheduler.set_timesteps
 * with steps_offset = 0. */
msld_status msld_ddim_timesteps(int32_t num_train_timesteps, int32_t steps, msld_spacing spacing,
                                int32_t* timesteps_out);

/* Coefficients of step `i` (0 = first, noisiest) for a schedule `alphas_cumprod[T]`. */
msld_status msld_ddim_coeffs_for(const float* alphas_cumprod, int32_t num_train_timesteps,
                                 int32_t steps, msld_spacing spacing, int32_t i,
                                 msld_ddim_coeffs* out);

/* Fused DDIM update over n elements, in place on x:
 *   x0 = (x - sqrt(1-a_t) eps) / sqrt(a_t)          (optionally clipped to [-clip, clip])
 *   x  = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s * noise,
 *   s  = eta * sqrt((1-a_prev)/(1-a_t) * (1 - a_t/a_prev))
 * `noise` may be NULL when eta == 0. clip <= 0 disables clipping.
 * x0_out, if not NULL, receives the (clipped) x0 prediction.
 * MSLD_ERR_INVALID_ARG unless 0 < a_t < 1, 0 < a_prev <= 1, eta finite and >= 0, and, when
 * eta > 0, a_prev >= a_t (s^2 < 0 otherwise; with eta 0 a step to more noise is allowed). */
msld_status msld_ddim_step(float* x, const float* eps, const float* noise, size_t n,
                           const msld_ddim_coeffs* c, float eta, float clip, float* x0_out);

/* Solvers of the sampling loop. DDIM: the update above. DPMPP2M: DPM-Solver++(2M) (Lu et al.
 * 2022) in its data-prediction form, eta 0 only, as diffusers' DPMSolverMultistepScheduler
 * (algorithm_type "dpmsolver++", solver_order 2, solver_type "midpoint", final_sigmas_type
 * "zero": first order at the first and the last step, and the last step lands on sigma 0). */
typedef enum msld_solver {
    MSLD_SOLVER_DDIM = 0,
    MSLD_SOLVER_DPMPP2M = 1
} msld_solver;

/* One DPM-Solver++(2M) step's scalars (host-side, per step). With sigma = sqrt(1 - a),
 * alpha = sqrt(a), lambda = log(alpha / sigma), h = lambda_next - lambda_t, r = h_prev / h,
 * phi = alpha_next (1 - exp(-h)):
 *   x0     = (x - sigma_t eps) / alpha_t                      (optionally clipped)
 *   order 1: x_next = sigma_next / sigma_t x + phi x0
 *   order 2: x_next = sigma_next / sigma_t x + phi (1 + 1/(2r)) x0 - phi / (2r) x0_prev
 * The last step goes to sigma 0 (x_next = x0). */
typedef struct msld_dpmpp2m_coeffs {
    int32_t timestep;       /* t of this step's denoiser call */
    int32_t next_timestep;  /* the next step's t; -1 at the last step (sigma 0) */
    int32_t order;          /* 1 or 2 */
    double alpha_t;         /* alphas_cumprod[t] */
    double x_coef;          /* sigma_next / sigma_t */
    double x0_coef;         /* coefficient of this step's x0 */
    double x0_prev_coef;    /* coefficient of the previous step's x0 (0 at order 1) */
} msld_dpmpp2m_coeffs;

/* Timesteps of a DPM-Solver++ run, descending: diffusers' DPMSolverMultistepScheduler
 * set_timesteps (steps_offset 0). TRAILING and LINSPACE_TRUNC are the DDIM timesteps; LEADING
 * is that scheduler's own rule, (steps - i) * (T / (steps + 1)), so it needs steps < T. */
msld_status msld_dpmpp2m_timesteps(int32_t num_train_timesteps, int32_t steps, msld_spacing spacing,
                                   int32_t* timesteps_out);

/* Coefficients of DPM-Solver++(2M) step `i` (0 = first, noisiest). MSLD_ERR_INVALID_ARG also
 * when two visited timesteps coincide (h = 0). */
msld_status msld_dpmpp2m_coeffs_for(const float* alphas_cumprod, int32_t num_train_timesteps,
                                    int32_t steps, msld_spacing spacing, int32_t i,
                                    msld_dpmpp2m_coeffs* out);

/* Coefficients of DPM-Solver++(2M) step `i` on a given grid `timesteps[steps]` (each in
 * [0, num_train_timesteps), strictly decreasing in noise; a tuned grid, msld_sdk.timestep_grids).
 * msld_dpmpp2m_coeffs_for is this on msld_dpmpp2m_timesteps' grid. */
msld_status msld_dpmpp2m_coeffs_at(const float* alphas_cumprod, int32_t num_train_timesteps,
                                   const int32_t* timesteps, int32_t steps, int32_t i,
                                   msld_dpmpp2m_coeffs* out);

/* Fused DPM-Solver++(2M) update over n elements, in place on x, in one pass: computes x0 (clipped
 * to [-clip, clip] when clip > 0), writes x_next to x and this step's x0 to x0_prev (the buffer
 * the next step reads). x0_prev is read only at order 2; it may be NULL at order 1 when the
 * caller needs no x0 (the last step). */
msld_status msld_dpmpp2m_step(float* x, const float* eps, float* x0_prev, size_t n,
                              const msld_dpmpp2m_coeffs* c, float clip);

/* Standard normal noise for hypotheses [hyp_begin, hyp_begin + n_hyp), `elems` each,
 * stream `stream` (0 = initial latent, s + 1 = noise of DDIM step s), seed `seed`. */
msld_status msld_gaussian(uint64_t seed, int32_t hyp_begin, int32_t n_hyp, int64_t elems,
                          uint32_t stream, float* out);

/* Aggregate k hypotheses of one image in one pass.
 *   masks_out[k*n_pix]   (uint8, may be NULL): probs > threshold
 *   mean_out[n_pix]      mean probability (sequential float32 sum / k)
 *   confidence_out[n_pix] 1 - 2 sqrt(p (1 - p)), p = fraction of hypotheses voting foreground
 *   consensus_out[n_pix] (uint8, may be NULL): 2 * votes > k (majority) */
msld_status msld_aggregate(const float* probs, int32_t k, int64_t n_pix, float threshold,
                           uint8_t* masks_out, float* mean_out, float* confidence_out,
                           uint8_t* consensus_out);

/* The denoiser, supplied by the host: read x[batch*elems] and t[batch] (float timesteps),
 * write eps[batch*elems]. Return 0 on success. */
typedef int (*msld_denoise_fn)(void* user, const float* x, const float* t, float* eps, int32_t batch);

/* Progress: called after each step with (step + 1, steps); return non-zero to cancel. */
typedef int (*msld_progress_fn)(void* user, int32_t done, int32_t total);

typedef struct msld_sampler_params {
    int32_t num_train_timesteps;
    const float* alphas_cumprod; /* [num_train_timesteps] */
    int32_t steps;
    msld_spacing spacing;
    float eta;
    float clip;                  /* <= 0: no clipping of x0 */
    uint64_t seed;
    int32_t k;                   /* hypotheses per image */
    int32_t n_images;            /* batch of images; each gets hypotheses 0..k-1 */
    int64_t elems;               /* elements of one latent */
    int32_t latents_given;       /* non-zero: x already holds the initial latents [n_images*k*elems]
                                    and the loop draws none (zero-initialise for v1 behaviour) */
    int32_t solver;              /* msld_solver (v3; zero: DDIM). DPMPP2M needs eta == 0 */
    const int32_t* timesteps;    /* v4: DPMPP2M's grid [steps] (msld_dpmpp2m_coeffs_at); NULL: the
                                    spacing rule's. Must be NULL with DDIM */
} msld_sampler_params;

/* The whole sampling loop on the CPU, with the solver p->solver. x[n_images*k*elems] receives
 * the final latents; eps is scratch of the same size; t is scratch of n_images*k floats. The
 * loop draws the initial noise itself (unless p->latents_given: then it starts from what x
 * holds) and calls `denoise` once per step with all n_images*k latents in one batch.
 * DPM-Solver++(2M) allocates one more buffer of x's size (the previous step's x0), DDIM with
 * eta > 0 one for the noise: MSLD_ERR_OUT_OF_MEMORY when that fails. k * n_images must fit an
 * int32. Both callbacks run on the calling thread; element-wise work may use up to
 * std::thread::hardware_concurrency() threads per step (large buffers only). */
msld_status msld_ddim_sample(const msld_sampler_params* p, msld_denoise_fn denoise, void* denoise_user,
                             msld_progress_fn progress, void* progress_user,
                             float* x, float* eps, float* t);

#ifdef __cplusplus
}
#endif
#endif /* MSLD_H */
