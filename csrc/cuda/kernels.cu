// kernels.cu - CUDA twins of the CPU kernels in sampler_cpu.cpp (C surface: msld_cuda.h).
//
// The per-element math is kernel_math.h, shared verbatim with the CPU, and this file is built with
// --fmad=false, so the noise (Philox4x32-10 + double Box-Muller), the DDIM update and the
// aggregation give the CPU's bits (so does the DPM-Solver++(2M) update). The per-step scalars are computed on the host by the same
// function the CPU uses (ddim_scalars.h) and passed to the kernels by value.
//
// Every entry point only launches kernels on the caller's stream: no synchronisation, no
// allocation, no host<->device copy, so all of them can be captured into a CUDA graph.
// Kernels use grid-stride loops; where the sizes and pointers allow, 4 elements move as a float4.
#include <cuda_runtime.h>

#include <stdint.h>

#include "ddim_scalars.h"
#include "kernel_math.h"
#include "msld_cuda.h"

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loops cover the rest

unsigned grid_for(int64_t work) {
    int64_t b = (work + kThreads - 1) / kThreads;
    if (b < 1) b = 1;
    if (b > kMaxBlocks) b = kMaxBlocks;
    return (unsigned)b;
}

inline bool aligned16(const void* p) { return p == nullptr || ((uintptr_t)p & 15u) == 0; }

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

msld_status launch_status() {
    return cudaGetLastError() == cudaSuccess ? MSLD_OK : MSLD_ERR_CUDA;
}

__device__ __forceinline__ int64_t global_thread() {
    return (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_threads() { return (int64_t)blockDim.x * gridDim.x; }

// ---- noise ------------------------------------------------------------------------------------
// Work item j = (hypothesis h, block blk of 4 elements), as msld_gaussian: one Philox call gives
// elements 4*blk .. 4*blk+3 of hypothesis hyp_begin + h. The same values go to every image.
template <bool kVec>
__global__ void gaussian_kernel(uint64_t seed, const uint64_t* __restrict__ seed_dev, uint32_t hyp_begin,
                                int64_t n_hyp, int32_t n_images, int64_t elems, int64_t blocks,
                                uint32_t stream_id, float* __restrict__ out) {
    const uint64_t s = seed_dev ? *seed_dev : seed;
    const int64_t total = n_hyp * blocks;
    const int64_t image_stride = n_hyp * elems;
    for (int64_t j = global_thread(); j < total; j += grid_threads()) {
        const int64_t h = j / blocks, blk = j - h * blocks;
        float v[4];
        msld::normal4(s, hyp_begin + (uint32_t)h, stream_id, (uint32_t)blk, v);
        float* o = out + h * elems + blk * 4;
        if (kVec) {
            const float4 q = make_float4(v[0], v[1], v[2], v[3]);
            for (int32_t b = 0; b < n_images; ++b) *reinterpret_cast<float4*>(o + b * image_stride) = q;
        } else {
            const int64_t rest = elems - blk * 4;
            const int m = rest < 4 ? (int)rest : 4;
            for (int32_t b = 0; b < n_images; ++b)
                for (int q = 0; q < m; ++q) o[b * image_stride + q] = v[q];
        }
    }
}

msld_status launch_gaussian(uint64_t seed, const uint64_t* seed_dev, int32_t hyp_begin, int32_t n_hyp,
                            int32_t n_images, int64_t elems, uint32_t stream_id, float* out, void* stream) {
    if (!out) return MSLD_ERR_NULL_POINTER;
    if (hyp_begin < 0 || n_hyp < 0 || n_images < 0 || elems < 0 || elems / 4 >= (int64_t)UINT32_MAX)
        return MSLD_ERR_INVALID_ARG;
    const int64_t blocks = (elems + 3) / 4;
    const int64_t total = (int64_t)n_hyp * blocks;
    if (total == 0 || n_images == 0) return MSLD_OK;
    const bool vec = (elems % 4) == 0 && aligned16(out);
    const unsigned grid = grid_for(total);
    if (vec)
        gaussian_kernel<true><<<grid, kThreads, 0, as_stream(stream)>>>(
            seed, seed_dev, (uint32_t)hyp_begin, n_hyp, n_images, elems, blocks, stream_id, out);
    else
        gaussian_kernel<false><<<grid, kThreads, 0, as_stream(stream)>>>(
            seed, seed_dev, (uint32_t)hyp_begin, n_hyp, n_images, elems, blocks, stream_id, out);
    return launch_status();
}

// ---- DDIM update with the noise from a buffer (or none) ----------------------------------------
template <bool kVec, bool kNoise>
__global__ void ddim_step_kernel(float* __restrict__ x, const float* __restrict__ eps,
                                 const float* __restrict__ noise, int64_t n, msld::DdimScalars s) {
    int64_t done = 0;
    if (kVec) {
        const int64_t n4 = n / 4;
        float4* x4 = reinterpret_cast<float4*>(x);
        const float4* e4 = reinterpret_cast<const float4*>(eps);
        const float4* z4 = reinterpret_cast<const float4*>(noise);
        for (int64_t i = global_thread(); i < n4; i += grid_threads()) {
            float4 xv = x4[i];
            const float4 ev = e4[i];
            float4 zv = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (kNoise) zv = z4[i];
            xv.x = msld::ddim_update(xv.x, ev.x, zv.x, s, nullptr);
            xv.y = msld::ddim_update(xv.y, ev.y, zv.y, s, nullptr);
            xv.z = msld::ddim_update(xv.z, ev.z, zv.z, s, nullptr);
            xv.w = msld::ddim_update(xv.w, ev.w, zv.w, s, nullptr);
            x4[i] = xv;
        }
        done = n4 * 4;
    }
    for (int64_t i = done + global_thread(); i < n; i += grid_threads()) {
        const float z = kNoise ? noise[i] : 0.0f;
        x[i] = msld::ddim_update(x[i], eps[i], z, s, nullptr);
    }
}

msld_status launch_step(float* x, const float* eps, const float* noise, int64_t n,
                        const msld::DdimScalars& s, void* stream) {
    if (n == 0) return MSLD_OK;
    const bool with_noise = s.std > 0.0f;
    const bool vec = aligned16(x) && aligned16(eps) && (!with_noise || aligned16(noise));
    const unsigned grid = grid_for(vec ? (n + 3) / 4 : n);
    cudaStream_t st = as_stream(stream);
    if (vec && with_noise)
        ddim_step_kernel<true, true><<<grid, kThreads, 0, st>>>(x, eps, noise, n, s);
    else if (vec)
        ddim_step_kernel<true, false><<<grid, kThreads, 0, st>>>(x, eps, nullptr, n, s);
    else if (with_noise)
        ddim_step_kernel<false, true><<<grid, kThreads, 0, st>>>(x, eps, noise, n, s);
    else
        ddim_step_kernel<false, false><<<grid, kThreads, 0, st>>>(x, eps, nullptr, n, s);
    return launch_status();
}

// ---- DDIM update with the noise generated in place ---------------------------------------------
// Work item j = (latent row, block of 4 elements); row = image * k + h, and the noise is
// hypothesis h of Philox stream `stream_id`: exactly what msld_gaussian would have written.
template <bool kVec>
__global__ void ddim_step_noise_kernel(float* __restrict__ x, const float* __restrict__ eps,
                                       msld::DdimScalars s, uint64_t seed,
                                       const uint64_t* __restrict__ seed_dev, int32_t k, int64_t rows,
                                       int64_t elems, int64_t blocks, uint32_t stream_id) {
    const uint64_t sd = seed_dev ? *seed_dev : seed;
    const int64_t total = rows * blocks;
    for (int64_t j = global_thread(); j < total; j += grid_threads()) {
        const int64_t row = j / blocks, blk = j - row * blocks;
        const uint32_t h = (uint32_t)(row % k);
        float v[4];
        msld::normal4(sd, h, stream_id, (uint32_t)blk, v);
        const int64_t base = row * elems + blk * 4;
        if (kVec) {
            float4 xv = *reinterpret_cast<const float4*>(x + base);
            const float4 ev = *reinterpret_cast<const float4*>(eps + base);
            xv.x = msld::ddim_update(xv.x, ev.x, v[0], s, nullptr);
            xv.y = msld::ddim_update(xv.y, ev.y, v[1], s, nullptr);
            xv.z = msld::ddim_update(xv.z, ev.z, v[2], s, nullptr);
            xv.w = msld::ddim_update(xv.w, ev.w, v[3], s, nullptr);
            *reinterpret_cast<float4*>(x + base) = xv;
        } else {
            const int64_t rest = elems - blk * 4;
            const int m = rest < 4 ? (int)rest : 4;
            for (int q = 0; q < m; ++q) x[base + q] = msld::ddim_update(x[base + q], eps[base + q], v[q], s, nullptr);
        }
    }
}

msld_status launch_step_noise(float* x, const float* eps, const msld_ddim_coeffs* c, float eta, float clip,
                              uint64_t seed, const uint64_t* seed_dev, int32_t k, int32_t n_images,
                              int64_t elems, uint32_t stream_id, void* stream) {
    if (!x || !eps || !c) return MSLD_ERR_NULL_POINTER;
    if (!msld::ddim_coeffs_valid(c, eta)) return MSLD_ERR_INVALID_ARG;
    if (k < 1 || n_images < 1 || elems < 0 || elems / 4 >= (int64_t)UINT32_MAX) return MSLD_ERR_INVALID_ARG;
    const msld::DdimScalars s = msld::ddim_scalars(c, eta, clip);
    const int64_t rows = (int64_t)k * n_images;
    if (!(s.std > 0.0f)) return launch_step(x, eps, nullptr, rows * elems, s, stream);  // no noise term
    const int64_t blocks = (elems + 3) / 4;
    const int64_t total = rows * blocks;
    if (total == 0) return MSLD_OK;
    const bool vec = (elems % 4) == 0 && aligned16(x) && aligned16(eps);
    const unsigned grid = grid_for(total);
    cudaStream_t st = as_stream(stream);
    if (vec)
        ddim_step_noise_kernel<true><<<grid, kThreads, 0, st>>>(x, eps, s, seed, seed_dev, k, rows, elems, blocks, stream_id);
    else
        ddim_step_noise_kernel<false><<<grid, kThreads, 0, st>>>(x, eps, s, seed, seed_dev, k, rows, elems, blocks, stream_id);
    return launch_status();
}

// ---- DPM-Solver++(2M) update (one pass; x0_prev read at order 2, then overwritten) -------------
template <bool kVec>
__global__ void dpm2m_step_kernel(float* __restrict__ x, const float* __restrict__ eps,
                                  float* __restrict__ x0p, int64_t n, msld::Dpm2mScalars s) {
    int64_t done = 0;
    if (kVec) {
        const int64_t n4 = n / 4;
        float4* x4 = reinterpret_cast<float4*>(x);
        const float4* e4 = reinterpret_cast<const float4*>(eps);
        float4* p4 = reinterpret_cast<float4*>(x0p);
        for (int64_t i = global_thread(); i < n4; i += grid_threads()) {
            float4 xv = x4[i];
            const float4 ev = e4[i];
            float4 pv = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (p4 && s.order == 2) pv = p4[i];
            float4 q;
            xv.x = msld::dpm2m_update(xv.x, ev.x, pv.x, s, &q.x);
            xv.y = msld::dpm2m_update(xv.y, ev.y, pv.y, s, &q.y);
            xv.z = msld::dpm2m_update(xv.z, ev.z, pv.z, s, &q.z);
            xv.w = msld::dpm2m_update(xv.w, ev.w, pv.w, s, &q.w);
            x4[i] = xv;
            if (p4) p4[i] = q;
        }
        done = n4 * 4;
    }
    for (int64_t i = done + global_thread(); i < n; i += grid_threads()) {
        float q;
        const float pv = (x0p && s.order == 2) ? x0p[i] : 0.0f;
        x[i] = msld::dpm2m_update(x[i], eps[i], pv, s, &q);
        if (x0p) x0p[i] = q;
    }
}

// ---- aggregation ------------------------------------------------------------------------------
// One thread per pixel; the k hypotheses are summed in order 0..k-1 in float32, as the CPU does.
__global__ void aggregate_kernel(const float* __restrict__ probs, int32_t k, int64_t n_pix, float threshold,
                                 float inv_k, uint8_t* __restrict__ masks, float* __restrict__ mean,
                                 float* __restrict__ conf, uint8_t* __restrict__ cons) {
    for (int64_t p = global_thread(); p < n_pix; p += grid_threads()) {
        float sum = 0.0f;
        int votes = 0;
        for (int32_t i = 0; i < k; ++i) {
            const float v = probs[(int64_t)i * n_pix + p];
            sum += v;
            const int on = v > threshold;
            votes += on;
            if (masks) masks[(int64_t)i * n_pix + p] = (uint8_t)on;
        }
        mean[p] = sum * inv_k;
        conf[p] = msld::confidence_from_votes(votes, k);
        if (cons) cons[p] = (uint8_t)(2 * votes > k);
    }
}

}  // namespace

extern "C" {

msld_status msld_cuda_device_count(int32_t* count_out) {
    if (!count_out) return MSLD_ERR_NULL_POINTER;
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) n = 0;  // no driver, no device: not an error
    cudaGetLastError();                                // leave no sticky error behind
    *count_out = n;
    return MSLD_OK;
}

msld_status msld_cuda_gaussian(uint64_t seed, int32_t hyp_begin, int32_t n_hyp, int64_t elems,
                               uint32_t stream_id, float* out_dev, void* cuda_stream) {
    return launch_gaussian(seed, nullptr, hyp_begin, n_hyp, 1, elems, stream_id, out_dev, cuda_stream);
}

msld_status msld_cuda_gaussian_dev(const uint64_t* seed_dev, int32_t hyp_begin, int32_t n_hyp,
                                   int32_t n_images, int64_t elems, uint32_t stream_id,
                                   float* out_dev, void* cuda_stream) {
    if (!seed_dev) return MSLD_ERR_NULL_POINTER;
    return launch_gaussian(0, seed_dev, hyp_begin, n_hyp, n_images, elems, stream_id, out_dev, cuda_stream);
}

msld_status msld_cuda_ddim_step(float* x_dev, const float* eps_dev, const float* noise_dev, size_t n,
                                const msld_ddim_coeffs* c, float eta, float clip, void* cuda_stream) {
    if (!x_dev || !eps_dev || !c) return MSLD_ERR_NULL_POINTER;
    if (!msld::ddim_coeffs_valid(c, eta)) return MSLD_ERR_INVALID_ARG;
    if (n > (size_t)INT64_MAX) return MSLD_ERR_INVALID_ARG;
    const msld::DdimScalars s = msld::ddim_scalars(c, eta, clip);
    if (s.std > 0.0f && !noise_dev) return MSLD_ERR_NULL_POINTER;
    return launch_step(x_dev, eps_dev, noise_dev, (int64_t)n, s, cuda_stream);
}

msld_status msld_cuda_ddim_step_noise(float* x_dev, const float* eps_dev, const msld_ddim_coeffs* c,
                                      float eta, float clip, uint64_t seed, int32_t k, int32_t n_images,
                                      int64_t elems, uint32_t stream_id, void* cuda_stream) {
    return launch_step_noise(x_dev, eps_dev, c, eta, clip, seed, nullptr, k, n_images, elems, stream_id,
                             cuda_stream);
}

msld_status msld_cuda_ddim_step_noise_dev(float* x_dev, const float* eps_dev, const msld_ddim_coeffs* c,
                                          float eta, float clip, const uint64_t* seed_dev, int32_t k,
                                          int32_t n_images, int64_t elems, uint32_t stream_id,
                                          void* cuda_stream) {
    if (!seed_dev) return MSLD_ERR_NULL_POINTER;
    return launch_step_noise(x_dev, eps_dev, c, eta, clip, 0, seed_dev, k, n_images, elems, stream_id,
                             cuda_stream);
}

msld_status msld_cuda_dpmpp2m_step(float* x_dev, const float* eps_dev, float* x0_prev_dev, size_t n,
                                   const msld_dpmpp2m_coeffs* c, float clip, void* cuda_stream) {
    if (!x_dev || !eps_dev || !c) return MSLD_ERR_NULL_POINTER;
    if (!msld::dpm2m_coeffs_valid(c)) return MSLD_ERR_INVALID_ARG;
    if (c->order == 2 && !x0_prev_dev) return MSLD_ERR_NULL_POINTER;
    if (n > (size_t)INT64_MAX) return MSLD_ERR_INVALID_ARG;
    if (n == 0) return MSLD_OK;
    const msld::Dpm2mScalars s = msld::dpm2m_scalars(c, clip);
    const bool vec = aligned16(x_dev) && aligned16(eps_dev) && aligned16(x0_prev_dev);
    const unsigned grid = grid_for(vec ? ((int64_t)n + 3) / 4 : (int64_t)n);
    if (vec)
        dpm2m_step_kernel<true><<<grid, kThreads, 0, as_stream(cuda_stream)>>>(x_dev, eps_dev, x0_prev_dev, (int64_t)n, s);
    else
        dpm2m_step_kernel<false><<<grid, kThreads, 0, as_stream(cuda_stream)>>>(x_dev, eps_dev, x0_prev_dev, (int64_t)n, s);
    return launch_status();
}

msld_status msld_cuda_aggregate(const float* probs_dev, int32_t k, int64_t n_pix, float threshold,
                                uint8_t* masks_dev, float* mean_dev, float* conf_dev,
                                uint8_t* consensus_dev, void* cuda_stream) {
    if (!probs_dev || !mean_dev || !conf_dev) return MSLD_ERR_NULL_POINTER;
    if (k < 1 || n_pix < 0 || k > 65535) return MSLD_ERR_INVALID_ARG;
    if (n_pix == 0) return MSLD_OK;
    const float inv_k = 1.0f / (float)k;
    aggregate_kernel<<<grid_for(n_pix), kThreads, 0, as_stream(cuda_stream)>>>(
        probs_dev, k, n_pix, threshold, inv_k, masks_dev, mean_dev, conf_dev, consensus_dev);
    return launch_status();
}

}  // extern "C"
