// sampler_cpu.cpp - CPU implementation of the C surface in msld.h: DDIM schedule, fused update,
// counter-based noise, aggregation, and the sampling loop that calls the host's denoiser.
#include "msld.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <new>
#include <system_error>
#include <thread>
#include <vector>

#include "ddim_scalars.h"
#include "kernel_math.h"

namespace {

// Split [0, n) over the cores for large element-wise work; small work stays on one thread so
// that it never competes with the inference runtime's own thread pool.
template <class F>
void parallel_for(int64_t n, int64_t min_per_thread, F&& body) {
    unsigned hw = std::max(1u, std::thread::hardware_concurrency());
    int64_t threads = std::min<int64_t>(hw, n / std::max<int64_t>(1, min_per_thread));
    if (threads <= 1) {
        body(int64_t(0), n);
        return;
    }
    std::vector<std::thread> pool;
    int64_t chunk = (n + threads - 1) / threads;
    int64_t done_here = chunk;   // [0, done_here) runs on this thread
    try {
        pool.reserve((size_t)threads);
        for (int64_t i = 1; i < threads; ++i) {
            int64_t b = i * chunk, e = std::min(n, b + chunk);
            if (b < e) pool.emplace_back([&body, b, e] { body(b, e); });
        }
    } catch (const std::exception&) {   // no thread (or no memory for one): the rest runs here
        done_here = std::min(n, (int64_t)(pool.size() + 1) * chunk);
        body(0, std::min(n, chunk));
        if (done_here < n) body(done_here, n);
        for (auto& t : pool) t.join();
        return;
    }
    body(0, std::min(n, done_here));
    for (auto& t : pool) t.join();
}

// A C entry point's body: no C++ exception crosses the C surface (an allocation that fails is
// MSLD_ERR_OUT_OF_MEMORY).
template <class F>
msld_status guarded(F&& body) {
    try {
        return body();
    } catch (const std::bad_alloc&) {
        return MSLD_ERR_OUT_OF_MEMORY;
    } catch (...) {
        return MSLD_ERR_OUT_OF_MEMORY;   // std::length_error from a vector size: also "cannot allocate"
    }
}

// The sampling loop's update, specialised so that each body is branch-free and vectorises.
// Same operations in the same order as msld::ddim_update (kernel_math.h), so the results are
// bit-identical to it (and to the CUDA kernel, which uses ddim_update itself).
template <bool CLIP, bool NOISE>
void ddim_update_span(float* __restrict x, const float* __restrict eps, const float* __restrict noise,
                      int64_t n, const msld::DdimScalars& s) {
    const float sb = s.sqrt_beta_t, sa = s.sqrt_alpha_t, sap = s.sqrt_alpha_prev, dir = s.dir, sd = s.std,
                c = s.clip;
    for (int64_t j = 0; j < n; ++j) {
        float x0 = (x[j] - sb * eps[j]) / sa;
        if (CLIP) x0 = x0 < -c ? -c : (x0 > c ? c : x0);
        float y = sap * x0 + dir * eps[j];
        if (NOISE) y = y + sd * noise[j];
        x[j] = y;
    }
}

// The DPM-Solver++(2M) update in one pass (same operations, same order as msld::dpm2m_update).
template <bool CLIP, bool ORDER2>
void dpm2m_update_span(float* __restrict x, const float* __restrict eps, float* __restrict x0p, int64_t n,
                       const msld::Dpm2mScalars& s) {
    const float sb = s.sqrt_beta_t, sa = s.sqrt_alpha_t, a = s.x_coef, b = s.x0_coef, cp = s.x0_prev_coef,
                c = s.clip;
    for (int64_t j = 0; j < n; ++j) {
        float x0 = (x[j] - sb * eps[j]) / sa;
        if (CLIP) x0 = x0 < -c ? -c : (x0 > c ? c : x0);
        float y = a * x[j] + b * x0;
        if (ORDER2) y = y + cp * x0p[j];
        if (x0p) x0p[j] = x0;
        x[j] = y;
    }
}

// log(alpha / sigma) of alphas_cumprod value a, in double.
double dpm_lambda(double a) { return 0.5 * (std::log(a) - std::log1p(-a)); }

}  // namespace

extern "C" {

const char* msld_status_string(msld_status s) {
    switch (s) {
        case MSLD_OK: return "ok";
        case MSLD_ERR_NULL_POINTER: return "a required pointer was NULL";
        case MSLD_ERR_INVALID_ARG: return "an argument was out of range";
        case MSLD_ERR_CALLBACK: return "the denoiser callback failed";
        case MSLD_ERR_CUDA: return "a CUDA call failed";
        case MSLD_ERR_NO_CUDA: return "built without CUDA";
        case MSLD_ERR_CANCELLED: return "cancelled by the progress callback";
        case MSLD_ERR_OUT_OF_MEMORY: return "out of memory (a work buffer could not be allocated)";
    }
    return "unknown status";
}

msld_status msld_ddim_timesteps(int32_t T, int32_t steps, msld_spacing spacing, int32_t* out) {
    if (!out) return MSLD_ERR_NULL_POINTER;
    if (T < 1 || steps < 1 || steps > T) return MSLD_ERR_INVALID_ARG;
    if (spacing == MSLD_SPACING_LEADING) {
        // np.arange(0, steps) * (T // steps), reversed
        int32_t ratio = T / steps;
        for (int32_t i = 0; i < steps; ++i) out[i] = (steps - 1 - i) * ratio;
    } else if (spacing == MSLD_SPACING_TRAILING) {
        // np.round(np.arange(T, 0, -T / steps)) - 1 ; numpy's arange fills start + i * delta
        double delta = -(double)T / (double)steps;
        for (int32_t i = 0; i < steps; ++i) out[i] = (int32_t)std::nearbyint((double)T + i * delta) - 1;
    } else if (spacing == MSLD_SPACING_LINSPACE_TRUNC) {
        // torch.linspace(0, T - 1, steps) in float32 (its scalar CPU formula), .to(int64), flipped.
        // Each product is stored through a volatile so that no contraction into an FMA changes it.
        const float start = 0.0f, end = (float)(T - 1);
        const float step = steps > 1 ? (end - start) / (float)(steps - 1) : 0.0f;  // float32, as torch
        const int32_t half = steps / 2;
        if (steps == 1) {  // torch.linspace with one step gives [start]
            out[0] = (int32_t)start;
            return MSLD_OK;
        }
        for (int32_t j = 0; j < steps; ++j) {
            volatile float prod = step * (float)(j < half ? j : steps - j - 1);
            float v = j < half ? start + prod : end - prod;
            out[steps - 1 - j] = (int32_t)v;  // truncation toward zero, as .to(torch.int64)
        }
    } else {
        return MSLD_ERR_INVALID_ARG;
    }
    return MSLD_OK;
}

msld_status msld_ddim_coeffs_for(const float* ac, int32_t T, int32_t steps, msld_spacing spacing,
                                 int32_t i, msld_ddim_coeffs* out) {
    if (!ac || !out) return MSLD_ERR_NULL_POINTER;
    if (i < 0 || i >= steps) return MSLD_ERR_INVALID_ARG;
    return guarded([&]() -> msld_status {
        std::vector<int32_t> ts(std::max(steps, 1));
        msld_status st = msld_ddim_timesteps(T, steps, spacing, ts.data());
        if (st != MSLD_OK) return st;
        int32_t t = ts[i];
        if (t < 0 || t >= T) return MSLD_ERR_INVALID_ARG;
        int32_t prev = t - T / steps;  // diffusers: timestep - T // num_inference_steps
        out->timestep = t;
        out->prev_timestep = prev;
        out->alpha_t = ac[t];
        out->alpha_prev = prev >= 0 ? (double)ac[prev] : 1.0;  // set_alpha_to_one
        return MSLD_OK;
    });
}

msld_status msld_dpmpp2m_timesteps(int32_t T, int32_t steps, msld_spacing spacing, int32_t* out) {
    if (!out) return MSLD_ERR_NULL_POINTER;
    if (spacing != MSLD_SPACING_LEADING) return msld_ddim_timesteps(T, steps, spacing, out);
    if (T < 1 || steps < 1 || steps >= T) return MSLD_ERR_INVALID_ARG;
    // diffusers: (np.arange(0, steps + 1) * (T // (steps + 1))).round()[::-1][:-1]
    const int32_t ratio = T / (steps + 1);
    for (int32_t i = 0; i < steps; ++i) out[i] = (steps - i) * ratio;
    return MSLD_OK;
}

msld_status msld_dpmpp2m_coeffs_for(const float* ac, int32_t T, int32_t steps, msld_spacing spacing,
                                    int32_t i, msld_dpmpp2m_coeffs* out) {
    if (!ac || !out) return MSLD_ERR_NULL_POINTER;
    if (i < 0 || i >= steps) return MSLD_ERR_INVALID_ARG;
    return guarded([&]() -> msld_status {
        std::vector<int32_t> ts(std::max(steps, 1));
        msld_status st = msld_dpmpp2m_timesteps(T, steps, spacing, ts.data());
        if (st != MSLD_OK) return st;
        return msld_dpmpp2m_coeffs_at(ac, T, ts.data(), steps, i, out);
    });
}

msld_status msld_dpmpp2m_coeffs_at(const float* ac, int32_t T, const int32_t* ts, int32_t steps, int32_t i,
                                   msld_dpmpp2m_coeffs* out) {
    if (!ac || !ts || !out) return MSLD_ERR_NULL_POINTER;
    if (steps < 1 || steps > T || i < 0 || i >= steps) return MSLD_ERR_INVALID_ARG;
    for (int32_t j = std::max(0, i - 1); j <= std::min(i + 1, steps - 1); ++j)
        if (ts[j] < 0 || ts[j] >= T || !(ac[ts[j]] > 0.0f && ac[ts[j]] < 1.0f)) return MSLD_ERR_INVALID_ARG;
    const double a = ac[ts[i]];
    const bool last = i == steps - 1;
    out->timestep = ts[i];
    out->next_timestep = last ? -1 : ts[i + 1];
    out->alpha_t = a;
    out->order = (i == 0 || last) ? 1 : 2;  // diffusers: lower_order_nums < 1, lower_order_final
    if (last) {  // to sigma 0: alpha 1, h infinite, x_next = x0
        out->x_coef = 0.0;
        out->x0_coef = 1.0;
        out->x0_prev_coef = 0.0;
        return MSLD_OK;
    }
    const double an = ac[ts[i + 1]];
    const double h = dpm_lambda(an) - dpm_lambda(a);
    if (!(h > 0.0)) return MSLD_ERR_INVALID_ARG;  // timesteps must strictly decrease in noise
    const double phi = std::sqrt(an) * -std::expm1(-h);
    out->x_coef = std::sqrt(1.0 - an) / std::sqrt(1.0 - a);
    if (out->order == 1) {
        out->x0_coef = phi;
        out->x0_prev_coef = 0.0;
    } else {
        const double h0 = dpm_lambda(a) - dpm_lambda((double)ac[ts[i - 1]]);
        if (!(h0 > 0.0)) return MSLD_ERR_INVALID_ARG;
        const double half_inv_r = 0.5 * h / h0;  // 1 / (2 r0), r0 = h0 / h
        out->x0_coef = phi * (1.0 + half_inv_r);
        out->x0_prev_coef = -phi * half_inv_r;
    }
    return MSLD_OK;
}

msld_status msld_dpmpp2m_step(float* x, const float* eps, float* x0_prev, size_t n,
                              const msld_dpmpp2m_coeffs* c, float clip) {
    if (!x || !eps || !c) return MSLD_ERR_NULL_POINTER;
    if (!msld::dpm2m_coeffs_valid(c)) return MSLD_ERR_INVALID_ARG;
    if (c->order == 2 && !x0_prev) return MSLD_ERR_NULL_POINTER;
    const msld::Dpm2mScalars s = msld::dpm2m_scalars(c, clip);
    parallel_for((int64_t)n, 1 << 20, [&](int64_t b, int64_t e) {
        float* xp = x0_prev ? x0_prev + b : nullptr;
        const bool clip_on = s.clip > 0.0f, o2 = s.order == 2;
        if (clip_on && o2) dpm2m_update_span<true, true>(x + b, eps + b, xp, e - b, s);
        else if (clip_on) dpm2m_update_span<true, false>(x + b, eps + b, xp, e - b, s);
        else if (o2) dpm2m_update_span<false, true>(x + b, eps + b, xp, e - b, s);
        else dpm2m_update_span<false, false>(x + b, eps + b, xp, e - b, s);
    });
    return MSLD_OK;
}

msld_status msld_ddim_step(float* x, const float* eps, const float* noise, size_t n,
                           const msld_ddim_coeffs* c, float eta, float clip, float* x0_out) {
    if (!x || !eps || !c) return MSLD_ERR_NULL_POINTER;
    if (!msld::ddim_coeffs_valid(c, eta)) return MSLD_ERR_INVALID_ARG;
    msld::DdimScalars s = msld::ddim_scalars(c, eta, clip);
    if (s.std > 0.0f && !noise) return MSLD_ERR_NULL_POINTER;
    parallel_for((int64_t)n, 1 << 20, [&](int64_t b, int64_t e) {
        if (x0_out) {  // general path (tests, C hosts that want x0)
            for (int64_t j = b; j < e; ++j)
                x[j] = msld::ddim_update(x[j], eps[j], s.std > 0.0f ? noise[j] : 0.0f, s, x0_out + j);
            return;
        }
        const bool clip_on = s.clip > 0.0f, noisy = s.std > 0.0f;
        if (clip_on && noisy) ddim_update_span<true, true>(x + b, eps + b, noise + b, e - b, s);
        else if (clip_on) ddim_update_span<true, false>(x + b, eps + b, nullptr, e - b, s);
        else if (noisy) ddim_update_span<false, true>(x + b, eps + b, noise + b, e - b, s);
        else ddim_update_span<false, false>(x + b, eps + b, nullptr, e - b, s);
    });
    return MSLD_OK;
}

msld_status msld_gaussian(uint64_t seed, int32_t hyp_begin, int32_t n_hyp, int64_t elems,
                          uint32_t stream, float* out) {
    if (!out) return MSLD_ERR_NULL_POINTER;
    if (hyp_begin < 0 || n_hyp < 0 || elems < 0 || elems / 4 >= (int64_t)UINT32_MAX) return MSLD_ERR_INVALID_ARG;
    int64_t blocks = (elems + 3) / 4;
    parallel_for((int64_t)n_hyp * blocks, 1 << 16, [&](int64_t b, int64_t e) {
        float v[4];
        for (int64_t j = b; j < e; ++j) {
            int64_t h = j / blocks, blk = j % blocks;
            msld::normal4(seed, (uint32_t)(hyp_begin + h), stream, (uint32_t)blk, v);
            float* o = out + h * elems + blk * 4;
            int64_t m = std::min<int64_t>(4, elems - blk * 4);
            for (int64_t q = 0; q < m; ++q) o[q] = v[q];
        }
    });
    return MSLD_OK;
}

msld_status msld_aggregate(const float* probs, int32_t k, int64_t n_pix, float threshold,
                           uint8_t* masks_out, float* mean_out, float* conf_out, uint8_t* cons_out) {
    if (!probs || !mean_out || !conf_out) return MSLD_ERR_NULL_POINTER;
    if (k < 1 || n_pix < 0 || k > 65535) return MSLD_ERR_INVALID_ARG;
    const float inv_k = 1.0f / (float)k;
    // Tiles of pixels; inside a tile the hypotheses are visited in order (the same sequential
    // float sum as before) with unit-stride, vectorisable inner loops.
    constexpr int64_t TILE = 2048;
    parallel_for(n_pix, 1 << 18, [=](int64_t b, int64_t e) {  // by value: no aliasing with outputs
        float sum[TILE];
        int32_t votes[TILE];
        for (int64_t t0 = b; t0 < e; t0 += TILE) {
            const int64_t m = std::min(TILE, e - t0);
            for (int64_t q = 0; q < m; ++q) { sum[q] = 0.0f; votes[q] = 0; }
            for (int32_t i = 0; i < k; ++i) {
                const float* pr = probs + (int64_t)i * n_pix + t0;
                for (int64_t q = 0; q < m; ++q) {
                    sum[q] += pr[q];
                    votes[q] += pr[q] > threshold ? 1 : 0;
                }
                if (masks_out) {
                    uint8_t* mo = masks_out + (int64_t)i * n_pix + t0;
                    for (int64_t q = 0; q < m; ++q) mo[q] = (uint8_t)(pr[q] > threshold);
                }
            }
            for (int64_t q = 0; q < m; ++q) {
                mean_out[t0 + q] = sum[q] * inv_k;
                conf_out[t0 + q] = msld::confidence_from_votes(votes[q], k);
                if (cons_out) cons_out[t0 + q] = (uint8_t)(2 * votes[q] > k);
            }
        }
    });
    return MSLD_OK;
}

msld_status msld_ddim_sample(const msld_sampler_params* p, msld_denoise_fn denoise, void* duser,
                             msld_progress_fn progress, void* puser, float* x, float* eps, float* t) {
    if (!p || !denoise || !x || !eps || !t || !p->alphas_cumprod) return MSLD_ERR_NULL_POINTER;
    if (p->k < 1 || p->n_images < 1 || p->elems < 1 || p->steps < 1 ||
        p->steps > p->num_train_timesteps || !(p->eta >= 0.0f))
        return MSLD_ERR_INVALID_ARG;
    if (p->solver != MSLD_SOLVER_DDIM && p->solver != MSLD_SOLVER_DPMPP2M) return MSLD_ERR_INVALID_ARG;
    if (p->solver == MSLD_SOLVER_DPMPP2M && p->eta != 0.0f) return MSLD_ERR_INVALID_ARG;
    if (p->timesteps && p->solver != MSLD_SOLVER_DPMPP2M) return MSLD_ERR_INVALID_ARG;
    if ((int64_t)p->k * p->n_images > INT32_MAX) return MSLD_ERR_INVALID_ARG;   // the batch is an int32
    return guarded([&]() -> msld_status {
    const int64_t per_image = (int64_t)p->k * p->elems;
    const int32_t batch = p->k * p->n_images;
    const int64_t n = (int64_t)batch * p->elems;
    // Initial latents: stream 0. Every image gets hypotheses 0..k-1 of the same seed, so a
    // batch gives exactly what each image would give alone. Given latents are used as they are.
    for (int32_t b = 0; b < (p->latents_given ? 0 : p->n_images); ++b) {
        msld_status st = msld_gaussian(p->seed, 0, p->k, p->elems, 0u, x + b * per_image);
        if (st != MSLD_OK) return st;
    }
    if (p->solver == MSLD_SOLVER_DPMPP2M) {
        std::vector<int32_t> ts((size_t)p->steps);   // the given grid, or the spacing rule's
        if (p->timesteps) std::copy(p->timesteps, p->timesteps + p->steps, ts.begin());
        else {
            msld_status st = msld_dpmpp2m_timesteps(p->num_train_timesteps, p->steps, p->spacing, ts.data());
            if (st != MSLD_OK) return st;
        }
        std::vector<float> x0_prev((size_t)n);  // the one extra buffer: the previous step's x0
        for (int32_t i = 0; i < p->steps; ++i) {
            msld_dpmpp2m_coeffs c;
            msld_status st = msld_dpmpp2m_coeffs_at(p->alphas_cumprod, p->num_train_timesteps, ts.data(), p->steps,
                                                    i, &c);
            if (st != MSLD_OK) return st;
            std::fill(t, t + batch, (float)c.timestep);
            if (denoise(duser, x, t, eps, batch) != 0) return MSLD_ERR_CALLBACK;
            st = msld_dpmpp2m_step(x, eps, i + 1 < p->steps ? x0_prev.data() : nullptr, (size_t)n, &c, p->clip);
            if (st != MSLD_OK) return st;
            if (progress && progress(puser, i + 1, p->steps) != 0) return MSLD_ERR_CANCELLED;
        }
        return MSLD_OK;
    }
    std::vector<float> noise;
    if (p->eta > 0.0f) noise.resize((size_t)n);
    for (int32_t i = 0; i < p->steps; ++i) {
        msld_ddim_coeffs c;
        msld_status st = msld_ddim_coeffs_for(p->alphas_cumprod, p->num_train_timesteps, p->steps,
                                              p->spacing, i, &c);
        if (st != MSLD_OK) return st;
        std::fill(t, t + batch, (float)c.timestep);
        if (denoise(duser, x, t, eps, batch) != 0) return MSLD_ERR_CALLBACK;
        if (p->eta > 0.0f) {
            for (int32_t b = 0; b < p->n_images; ++b) {
                st = msld_gaussian(p->seed, 0, p->k, p->elems, (uint32_t)(i + 1), noise.data() + b * per_image);
                if (st != MSLD_OK) return st;
            }
        }
        st = msld_ddim_step(x, eps, p->eta > 0.0f ? noise.data() : nullptr, (size_t)n, &c, p->eta, p->clip, nullptr);
        if (st != MSLD_OK) return st;
        if (progress && progress(puser, i + 1, p->steps) != 0) return MSLD_ERR_CANCELLED;
    }
    return MSLD_OK;
    });
}

}  // extern "C"
