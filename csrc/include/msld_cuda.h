/*
 * msld_cuda.h - CUDA twins of the C surface in msld.h, for device pointers.
 *
 * Every pointer here is a device pointer (or NULL where allowed); `cuda_stream` is a
 * cudaStream_t passed as void* (NULL = the legacy default stream), so a host needs no CUDA
 * header to call these. Each call only enqueues kernels on that stream: it never synchronises,
 * never allocates and never copies between host and device, so every call may be recorded into
 * a CUDA graph (stream capture). A launch error (cudaGetLastError after each launch) returns
 * MSLD_ERR_CUDA; an error of the kernel itself surfaces at the caller's next synchronisation.
 *
 * Results are those of the CPU functions in msld.h: the noise is bit-identical (same Philox
 * counters and the same double-precision Box-Muller from kernel_math.h), and the DDIM update
 * and the aggregation use the same float32 operations in the same order (CUDA code is built
 * with --fmad=false), so they agree with the CPU bit for bit as well.
 *
 * The *_dev variants read the seed from device memory (`seed_dev`, one uint64) when the kernel
 * runs, not when it is enqueued: a captured graph can then be replayed with another seed by
 * writing that word before the replay.
 */
#ifndef MSLD_CUDA_H
#define MSLD_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "msld.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Number of CUDA devices; 0 (and MSLD_OK) when there is no driver or no GPU. */
msld_status msld_cuda_device_count(int32_t* count_out);

/* As msld_gaussian: out_dev[n_hyp * elems] = normals of hypotheses [hyp_begin, hyp_begin + n_hyp),
 * Philox stream `stream_id` (0 = initial latent, s + 1 = noise of DDIM step s), seed `seed`. */
msld_status msld_cuda_gaussian(uint64_t seed, int32_t hyp_begin, int32_t n_hyp, int64_t elems,
                               uint32_t stream_id, float* out_dev, void* cuda_stream);

/* Seed read from device memory, and the same n_hyp hypotheses written for each of n_images
 * images: out_dev[n_images][n_hyp][elems] (as msld_ddim_sample lays out its initial latents). */
msld_status msld_cuda_gaussian_dev(const uint64_t* seed_dev, int32_t hyp_begin, int32_t n_hyp,
                                   int32_t n_images, int64_t elems, uint32_t stream_id,
                                   float* out_dev, void* cuda_stream);

/* As msld_ddim_step (without x0_out), in place on x_dev[n]. The scalars are computed on the
 * host by the CPU's own code (ddim_scalars.h). noise_dev may be NULL when no noise is added
 * (eta == 0, or a step whose variance is 0). clip <= 0 disables clipping. */
msld_status msld_cuda_ddim_step(float* x_dev, const float* eps_dev, const float* noise_dev, size_t n,
                                const msld_ddim_coeffs* c, float eta, float clip, void* cuda_stream);

/* DDIM step with the eta noise generated inside the update kernel (no noise buffer).
 * x_dev/eps_dev hold n_images * k latents of `elems` each, laid out [n_images][k][elems]; the
 * noise of latent (b, h) is hypothesis h of Philox stream `stream_id` (step s uses s + 1), so the
 * result equals msld_cuda_gaussian (per image) + msld_cuda_ddim_step bit for bit. */
msld_status msld_cuda_ddim_step_noise(float* x_dev, const float* eps_dev, const msld_ddim_coeffs* c,
                                      float eta, float clip, uint64_t seed, int32_t k, int32_t n_images,
                                      int64_t elems, uint32_t stream_id, void* cuda_stream);

/* The same with the seed read from device memory (CUDA graphs). */
msld_status msld_cuda_ddim_step_noise_dev(float* x_dev, const float* eps_dev, const msld_ddim_coeffs* c,
                                          float eta, float clip, const uint64_t* seed_dev, int32_t k,
                                          int32_t n_images, int64_t elems, uint32_t stream_id,
                                          void* cuda_stream);

/* As msld_dpmpp2m_step, in place on x_dev[n]: this step's x0 goes to x0_prev_dev[n] (read first
 * at order 2; may be NULL at order 1 when no later step needs it). Scalars from the CPU's code. */
msld_status msld_cuda_dpmpp2m_step(float* x_dev, const float* eps_dev, float* x0_prev_dev, size_t n,
                                   const msld_dpmpp2m_coeffs* c, float clip, void* cuda_stream);

/* As msld_aggregate, for one image's k hypotheses probs_dev[k * n_pix]:
 *   masks_dev[k*n_pix] (uint8, may be NULL), mean_dev[n_pix], conf_dev[n_pix],
 *   consensus_dev[n_pix] (uint8, may be NULL). */
msld_status msld_cuda_aggregate(const float* probs_dev, int32_t k, int64_t n_pix, float threshold,
                                uint8_t* masks_dev, float* mean_dev, float* conf_dev,
                                uint8_t* consensus_dev, void* cuda_stream);

#ifdef __cplusplus
}
#endif
#endif /* MSLD_CUDA_H */
