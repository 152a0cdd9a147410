// ddim_scalars.h - the per-step DDIM and DPM-Solver++(2M) scalars, computed on the host from
// msld_ddim_coeffs / msld_dpmpp2m_coeffs.
//
// One definition shared by the CPU sampler (sampler_cpu.cpp) and the CUDA entry points
// (cuda/kernels.cu), so both feed ddim_update() (kernel_math.h) exactly the same floats.
// Host code only. The product std*std is stored through a volatile so that no compiler can
// contract `1 - a_prev - std^2` into a fused multiply-add, whatever -ffp-contract the including
// file is built with (nvcc's host pass, or an aarch64 GCC, would otherwise be free to).
#pragma once

#include <cmath>

#include "kernel_math.h"
#include "msld.h"

namespace msld {

inline DdimScalars ddim_scalars(const msld_ddim_coeffs* c, float eta, float clip) {
    double at = c->alpha_t, ap = c->alpha_prev;
    double var = (1.0 - ap) / (1.0 - at) * (1.0 - at / ap);
    // diffusers computes the scalars in float32; do the same so trajectories agree closely.
    float at_f = (float)at, ap_f = (float)ap;
    // eta 0: no noise term, whatever var is (var < 0 when alpha_prev < alpha_t, an inversion step,
    // whose sqrt would otherwise turn the eps direction into NaN and drop it)
    float std_f = eta > 0.0f ? eta * std::sqrt((float)var) : 0.0f;
    DdimScalars s;
    s.sqrt_beta_t = std::sqrt(1.0f - at_f);
    s.sqrt_alpha_t = std::sqrt(at_f);
    s.sqrt_alpha_prev = std::sqrt(ap_f);
    volatile float std2 = std_f * std_f;  // rounded to float on its own: no contraction
    float d = 1.0f - ap_f - std2;
    s.dir = std::sqrt(d > 0.0f ? d : 0.0f);
    s.std = std_f;
    s.clip = clip;
    return s;
}

// The argument checks msld_ddim_step makes (before it looks at `noise`): alphas in (0, 1) and
// (0, 1], a finite eta >= 0, and with eta > 0 a step towards less noise (alpha_prev >= alpha_t:
// the variance of the noise term is negative otherwise).
inline bool ddim_coeffs_valid(const msld_ddim_coeffs* c, float eta) {
    return std::isfinite(eta) && (eta >= 0.0f) && (c->alpha_t > 0.0) && (c->alpha_t < 1.0) &&
           (c->alpha_prev > 0.0) && (c->alpha_prev <= 1.0) && (eta == 0.0f || c->alpha_prev >= c->alpha_t);
}

// The float32 scalars of one DPM-Solver++(2M) step (the x0 terms as ddim_scalars computes them).
inline Dpm2mScalars dpm2m_scalars(const msld_dpmpp2m_coeffs* c, float clip) {
    float at_f = (float)c->alpha_t;
    Dpm2mScalars s;
    s.sqrt_beta_t = std::sqrt(1.0f - at_f);
    s.sqrt_alpha_t = std::sqrt(at_f);
    s.x_coef = (float)c->x_coef;
    s.x0_coef = (float)c->x0_coef;
    s.x0_prev_coef = (float)c->x0_prev_coef;
    s.clip = clip;
    s.order = c->order;
    return s;
}

inline bool dpm2m_coeffs_valid(const msld_dpmpp2m_coeffs* c) {
    return (c->alpha_t > 0.0) && (c->alpha_t < 1.0) && (c->order == 1 || c->order == 2) &&
           std::isfinite(c->x_coef) && std::isfinite(c->x0_coef) && std::isfinite(c->x0_prev_coef);
}

}  // namespace msld
