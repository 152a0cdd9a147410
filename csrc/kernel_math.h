// kernel_math.h - per-element math shared verbatim by the CPU and CUDA kernels.
//
// Everything here is a pure function of its arguments built only from IEEE-754 operations that
// are correctly rounded on both host and device (+, -, *, /, sqrt, integer ops). The files that
// include it are compiled without floating-point contraction (-ffp-contract=off on the host,
// --fmad=false for CUDA), so the CPU and GPU produce bit-identical noise.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define MSLD_HD __host__ __device__ __forceinline__
#else
#define MSLD_HD inline
#endif

namespace msld {

// ---- Philox4x32-10 (Salmon et al., SC'11) -----------------------------------------------------
struct u32x4 { uint32_t v[4]; };

MSLD_HD void mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
    uint64_t p = (uint64_t)a * (uint64_t)b;
    *hi = (uint32_t)(p >> 32);
    *lo = (uint32_t)p;
}

MSLD_HD u32x4 philox4x32_10(u32x4 c, uint32_t k0, uint32_t k1) {
    const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
    for (int r = 0; r < 10; ++r) {
        uint32_t hi0, lo0, hi1, lo1;
        mulhilo(M0, c.v[0], &hi0, &lo0);
        mulhilo(M1, c.v[2], &hi1, &lo1);
        u32x4 n;
        n.v[0] = hi1 ^ c.v[1] ^ k0;
        n.v[1] = lo1;
        n.v[2] = hi0 ^ c.v[3] ^ k1;
        n.v[3] = lo0;
        c = n;
        k0 += W0;
        k1 += W1;
    }
    return c;
}

// ---- deterministic log and sincos in double (no libm: libm differs between host and device) ---

// ln(m) for m in [sqrt(1/2), sqrt(2)) via atanh series: ln m = 2 (s + s^3/3 + ...), s=(m-1)/(m+1).
MSLD_HD double log_reduced(double m) {
    double s = (m - 1.0) / (m + 1.0);
    double z = s * s;  // <= 0.0295
    double p = 1.0 / 25.0;
    p = p * z + 1.0 / 23.0;
    p = p * z + 1.0 / 21.0;
    p = p * z + 1.0 / 19.0;
    p = p * z + 1.0 / 17.0;
    p = p * z + 1.0 / 15.0;
    p = p * z + 1.0 / 13.0;
    p = p * z + 1.0 / 11.0;
    p = p * z + 1.0 / 9.0;
    p = p * z + 1.0 / 7.0;
    p = p * z + 1.0 / 5.0;
    p = p * z + 1.0 / 3.0;
    p = p * z + 1.0;
    return 2.0 * s * p;
}

// ln(u) for u = n * 2^-32, n in [1, 2^32] (exact in double).
MSLD_HD double log_uniform(uint64_t n) {
    // n = m * 2^e with m in [1, 2): find e by shifting (integer ops only).
    int e = 0;
    uint64_t v = n;
    while (v >= 2) { v >>= 1; ++e; }
    double m = (double)n;
    for (int i = 0; i < e; ++i) m *= 0.5;  // exact scaling to [1, 2)
    if (m > 1.4142135623730951) { m *= 0.5; ++e; }  // to [sqrt(1/2), sqrt(2))
    const double LN2 = 0.69314718055994530942;
    return (double)(e - 32) * LN2 + log_reduced(m);
}

// sin and cos of theta in [0, pi/4] by Taylor series (error < 1e-17).
MSLD_HD void sincos_reduced(double th, double* s, double* c) {
    double z = th * th;
    double ps = 1.0 / 355687428096000.0;           // 1/17!
    ps = ps * (-z) + 1.0 / 1307674368000.0;        // 1/15!
    ps = ps * (-z) + 1.0 / 6227020800.0;           // 1/13!
    ps = ps * (-z) + 1.0 / 39916800.0;             // 1/11!
    ps = ps * (-z) + 1.0 / 362880.0;               // 1/9!
    ps = ps * (-z) + 1.0 / 5040.0;                 // 1/7!
    ps = ps * (-z) + 1.0 / 120.0;                  // 1/5!
    ps = ps * (-z) + 1.0 / 6.0;                    // 1/3!
    ps = ps * (-z) + 1.0;
    double pc = 1.0 / 6402373705728000.0;          // 1/18!
    pc = pc * (-z) + 1.0 / 20922789888000.0;       // 1/16!
    pc = pc * (-z) + 1.0 / 87178291200.0;          // 1/14!
    pc = pc * (-z) + 1.0 / 479001600.0;            // 1/12!
    pc = pc * (-z) + 1.0 / 3628800.0;              // 1/10!
    pc = pc * (-z) + 1.0 / 40320.0;                // 1/8!
    pc = pc * (-z) + 1.0 / 720.0;                  // 1/6!
    pc = pc * (-z) + 1.0 / 24.0;                   // 1/4!
    pc = pc * (-z) + 1.0 / 2.0;                    // 1/2!
    pc = pc * (-z) + 1.0;
    *s = th * ps;
    *c = pc;
}

// sin and cos of 2*pi*v for v = n * 2^-32, n in [0, 2^32): exact octant reduction.
MSLD_HD void sincos_2pi_uniform(uint32_t n, double* s, double* c) {
    const double PI_4 = 0.78539816339744830962;
    uint32_t octant = n >> 29;                   // which eighth of the circle
    uint32_t rem = n & 0x1FFFFFFFu;              // position inside it, 29 bits
    double f = (double)rem * (1.0 / 536870912.0);  // [0, 1), exact
    // Within an octant the angle is (octant + f) * pi/4. Use symmetry so the series argument
    // stays in [0, pi/4]: odd octants measure from the octant's upper edge.
    double th = (octant & 1u) ? (1.0 - f) * PI_4 : f * PI_4;
    double sr, cr;
    sincos_reduced(th, &sr, &cr);
    // (sin, cos) of angle = base + th (even octants) or base + pi/4 - th... expressed via quadrant.
    double sa, ca;  // sin/cos of the angle within its quadrant [0, pi/2)
    if (octant & 1u) { sa = cr; ca = sr; } else { sa = sr; ca = cr; }
    switch (octant >> 1) {
        case 0: *s = sa; *c = ca; break;
        case 1: *s = ca; *c = -sa; break;
        case 2: *s = -sa; *c = -ca; break;
        default: *s = -ca; *c = sa; break;
    }
}

// Four standard normals for block `block` of (seed, hyp, stream).
MSLD_HD void normal4(uint64_t seed, uint32_t hyp, uint32_t stream, uint32_t block, float out[4]) {
    u32x4 c;
    c.v[0] = block;
    c.v[1] = hyp;
    c.v[2] = stream;
    c.v[3] = 0x6D736C64u;  // "msld": domain separation
    u32x4 r = philox4x32_10(c, (uint32_t)seed, (uint32_t)(seed >> 32));
    for (int p = 0; p < 2; ++p) {
        double l = log_uniform((uint64_t)r.v[2 * p] + 1u);  // u1 in (0, 1]
        double rad = sqrt(-2.0 * l);
        double sn, cs;
        sincos_2pi_uniform(r.v[2 * p + 1], &sn, &cs);
        out[2 * p] = (float)(rad * cs);
        out[2 * p + 1] = (float)(rad * sn);
    }
}

// ---- DDIM update of one element ---------------------------------------------------------------
struct DdimScalars {
    float sqrt_beta_t;     // sqrt(1 - a_t)
    float sqrt_alpha_t;    // sqrt(a_t)
    float sqrt_alpha_prev; // sqrt(a_prev)
    float dir;             // sqrt(1 - a_prev - std^2)
    float std;             // eta * sqrt(variance)
    float clip;            // <= 0: off
};

MSLD_HD float ddim_update(float x, float eps, float noise, const DdimScalars& s, float* x0_out) {
    float x0 = (x - s.sqrt_beta_t * eps) / s.sqrt_alpha_t;
    if (s.clip > 0.0f) x0 = x0 < -s.clip ? -s.clip : (x0 > s.clip ? s.clip : x0);
    if (x0_out) *x0_out = x0;
    float y = s.sqrt_alpha_prev * x0 + s.dir * eps;
    if (s.std > 0.0f) y = y + s.std * noise;
    return y;
}

// ---- DPM-Solver++(2M) update of one element ---------------------------------------------------
struct Dpm2mScalars {
    float sqrt_beta_t;   // sigma_t = sqrt(1 - a_t)
    float sqrt_alpha_t;  // alpha_t = sqrt(a_t)
    float x_coef;        // sigma_next / sigma_t
    float x0_coef;
    float x0_prev_coef;  // used at order 2 only
    float clip;          // <= 0: off
    int order;           // 1 or 2
};

// x_next; *x0_out (never NULL) receives this step's (clipped) x0. x0_prev is read only at order 2,
// so at order 1 whatever the buffer holds (uninitialised at the first step) cannot leak in.
MSLD_HD float dpm2m_update(float x, float eps, float x0_prev, const Dpm2mScalars& s, float* x0_out) {
    float x0 = (x - s.sqrt_beta_t * eps) / s.sqrt_alpha_t;
    if (s.clip > 0.0f) x0 = x0 < -s.clip ? -s.clip : (x0 > s.clip ? s.clip : x0);
    *x0_out = x0;
    float y = s.x_coef * x + s.x0_coef * x0;
    if (s.order == 2) y = y + s.x0_prev_coef * x0_prev;
    return y;
}

// ---- aggregation of one pixel -----------------------------------------------------------------
MSLD_HD float confidence_from_votes(int votes, int k) {
    float p = (float)votes / (float)k;
    float q = p * (1.0f - p);
    return 1.0f - 2.0f * sqrtf(q);
}

}  // namespace msld
