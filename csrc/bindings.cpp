// bindings.cpp - the pybind11 module msld_sdk._native over the C surface in msld.h.
// Long work (the sampling loop, aggregation) runs with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>
#include <string>

#include "msld.h"
#include "py_status.h"

namespace py = pybind11;

namespace {

using farray = py::array_t<float, py::array::c_style | py::array::forcecast>;

using msld_py::check;

msld_spacing parse_spacing(const std::string& s) {
    if (s == "leading") return MSLD_SPACING_LEADING;
    if (s == "trailing") return MSLD_SPACING_TRAILING;
    if (s == "linspace_trunc") return MSLD_SPACING_LINSPACE_TRUNC;
    throw py::value_error("timestep spacing must be 'leading', 'trailing' or 'linspace_trunc', got '" + s + "'");
}

// A float32, C-contiguous, writeable array the caller owns (an I/O buffer bound elsewhere).
float* buffer(py::array& a, py::ssize_t n, const char* name) {
    if (!py::isinstance<py::array_t<float>>(a) || !(a.flags() & py::array::c_style))
        throw py::value_error(std::string(name) + " must be a C-contiguous float32 array");
    if (!a.writeable()) throw py::value_error(std::string(name) + " must be writeable");
    if (a.size() != n)
        throw py::value_error(std::string(name) + " has " + std::to_string(a.size()) + " elements, expected " +
                              std::to_string(n));
    return static_cast<float*>(a.mutable_data());
}

struct PyCallbacks {
    py::object denoise, progress;
    py::object error;  // first Python exception raised inside a callback
};

// Keep the callback's exception with its own traceback (the frames inside the callback), so
// that it is re-raised after the loop as if the loop were Python.
void keep_error(PyCallbacks* cb, py::error_already_set& e) {
    if (e.trace()) PyException_SetTraceback(e.value().ptr(), e.trace().ptr());
    cb->error = e.value();
}

// No C++ exception may unwind through the C loop: every failure becomes "stop" plus a kept error.
int denoise_trampoline(void* user, const float*, const float*, float*, int32_t) {
    auto* cb = static_cast<PyCallbacks*>(user);
    py::gil_scoped_acquire gil;
    try {
        cb->denoise();
        return 0;
    } catch (py::error_already_set& e) {
        keep_error(cb, e);
    } catch (const std::exception& e) {
        cb->error = py::reinterpret_steal<py::object>(PyObject_CallFunction(PyExc_RuntimeError, "s", e.what()));
    }
    return 1;
}

int progress_trampoline(void* user, int32_t done, int32_t total) {
    auto* cb = static_cast<PyCallbacks*>(user);
    py::gil_scoped_acquire gil;
    try {
        py::object r = cb->progress(done, total);
        if (r.is_none()) return 0;
        int truth = PyObject_IsTrue(r.ptr());   // any object's truth value, as `if r:` would
        if (truth < 0) throw py::error_already_set();
        return truth ? 0 : 1;                   // returning a false value cancels the loop
    } catch (py::error_already_set& e) {
        keep_error(cb, e);
    } catch (const std::exception& e) {
        cb->error = py::reinterpret_steal<py::object>(PyObject_CallFunction(PyExc_RuntimeError, "s", e.what()));
    }
    return 1;
}

// A timestep grid: 1-D integers (a float grid would be truncated silently, a wide one wrapped),
// each within int32, copied out.
std::vector<int32_t> timestep_grid(const py::object& timesteps, int steps) {
    py::array a = py::array::ensure(timesteps);
    if (!a || (a.dtype().kind() != 'i' && a.dtype().kind() != 'u'))
        throw py::value_error("timesteps must be integers (a 1-D grid of whole timesteps)");
    auto g = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
    if (!g || g.ndim() != 1 || g.size() != steps)
        throw py::value_error("timesteps must be a 1-D array of `steps` timesteps");
    std::vector<int32_t> out((size_t)steps);
    for (int i = 0; i < steps; ++i) {
        int64_t v = g.data()[i];
        if (v < 0 || v > INT32_MAX) throw py::value_error("timesteps must be within 0 .. 2**31-1");
        out[(size_t)i] = (int32_t)v;
    }
    return out;
}

}  // namespace

#ifdef MSLD_WITH_CUDA
void register_cuda(py::module_& m);
#endif

PYBIND11_MODULE(_native, m) {
    m.doc() = "msld_sdk native sampler: DDIM and DPM-Solver++(2M) schedules and fused updates, Philox noise, aggregation";
    m.attr("API_VERSION") = MSLD_API_VERSION;
#ifdef MSLD_WITH_CUDA
    m.attr("built_with_cuda") = true;
    register_cuda(m);
#else
    m.attr("built_with_cuda") = false;
#endif

    m.def("ddim_timesteps", [](int T, int steps, const std::string& spacing) {
        py::array_t<int32_t> out(steps > 0 ? steps : 0);
        check(msld_ddim_timesteps(T, steps, parse_spacing(spacing), out.mutable_data()), "ddim_timesteps");
        return out;
    }, py::arg("num_train_timesteps"), py::arg("steps"), py::arg("spacing") = "trailing",
       "Descending DDIM timesteps, as diffusers' DDIMScheduler.set_timesteps.");

    m.def("ddim_coefficients", [](farray alphas_cumprod, int steps, const std::string& spacing) {
        const msld_spacing sp = parse_spacing(spacing);
        const int32_t T = (int32_t)alphas_cumprod.size();
        const py::ssize_t n = steps > 0 ? steps : 0;
        py::array_t<int32_t> ts(n), prev(n);
        py::array_t<double> at(n), ap(n);
        if (steps < 1) check(MSLD_ERR_INVALID_ARG, "ddim_coefficients");
        for (int32_t i = 0; i < steps; ++i) {
            msld_ddim_coeffs c;
            check(msld_ddim_coeffs_for(alphas_cumprod.data(), T, steps, sp, i, &c), "ddim_coefficients");
            ts.mutable_data()[i] = c.timestep;
            prev.mutable_data()[i] = c.prev_timestep;
            at.mutable_data()[i] = c.alpha_t;
            ap.mutable_data()[i] = c.alpha_prev;
        }
        return py::make_tuple(ts, prev, at, ap);
    }, py::arg("alphas_cumprod"), py::arg("steps"), py::arg("spacing") = "trailing",
       "The scalars of every DDIM step as the native loop uses them (msld_ddim_coeffs_for):\n"
       "(timesteps int32, prev_timesteps int32, alpha_t float64, alpha_prev float64), step 0 first.");

    m.def("dpmpp2m_timesteps", [](int T, int steps, const std::string& spacing) {
        py::array_t<int32_t> out(steps > 0 ? steps : 0);
        check(msld_dpmpp2m_timesteps(T, steps, parse_spacing(spacing), out.mutable_data()), "dpmpp2m_timesteps");
        return out;
    }, py::arg("num_train_timesteps"), py::arg("steps"), py::arg("spacing") = "trailing",
       "Descending DPM-Solver++ timesteps, as diffusers' DPMSolverMultistepScheduler.set_timesteps.");

    m.def("dpmpp2m_coefficients", [](farray alphas_cumprod, int steps, const std::string& spacing,
                                     py::object timesteps) {
        const msld_spacing sp = parse_spacing(spacing);
        const int32_t T = (int32_t)alphas_cumprod.size();
        const py::ssize_t n = steps > 0 ? steps : 0;
        py::array_t<int32_t> ts(n), next(n), order(n);
        py::array_t<double> at(n), xc(n), x0c(n), x0pc(n);
        if (steps < 1) check(MSLD_ERR_INVALID_ARG, "dpmpp2m_coefficients");
        std::vector<int32_t> grid((size_t)steps);
        if (timesteps.is_none()) {
            check(msld_dpmpp2m_timesteps(T, steps, sp, grid.data()), "dpmpp2m_coefficients");
        } else {
            grid = timestep_grid(timesteps, steps);
        }
        for (int32_t i = 0; i < steps; ++i) {
            msld_dpmpp2m_coeffs c;
            check(msld_dpmpp2m_coeffs_at(alphas_cumprod.data(), T, grid.data(), steps, i, &c), "dpmpp2m_coefficients");
            ts.mutable_data()[i] = c.timestep;
            next.mutable_data()[i] = c.next_timestep;
            order.mutable_data()[i] = c.order;
            at.mutable_data()[i] = c.alpha_t;
            xc.mutable_data()[i] = c.x_coef;
            x0c.mutable_data()[i] = c.x0_coef;
            x0pc.mutable_data()[i] = c.x0_prev_coef;
        }
        return py::make_tuple(ts, next, order, at, xc, x0c, x0pc);
    }, py::arg("alphas_cumprod"), py::arg("steps"), py::arg("spacing") = "trailing", py::arg("timesteps") = py::none(),
       "The scalars of every DPM-Solver++(2M) step (msld_dpmpp2m_coeffs_at): (timesteps, next_timesteps,\n"
       "order int32, alpha_t, x_coef, x0_coef, x0_prev_coef float64), step 0 first. `timesteps`: a given\n"
       "grid (int, descending, `steps` long) instead of the spacing rule's.");

    m.def("dpmpp2m_step", [](farray x, farray eps, py::object x0_prev, int order, double alpha_t, double x_coef,
                             double x0_coef, double x0_prev_coef, float clip) {
        if (x.size() != eps.size()) throw py::value_error("x and eps differ in size");
        py::array_t<float> out(x.request().shape);
        py::array_t<float> x0(x.request().shape);
        std::memcpy(out.mutable_data(), x.data(), sizeof(float) * x.size());
        if (!x0_prev.is_none()) {
            farray p = x0_prev.cast<farray>();
            if (p.size() != x.size()) throw py::value_error("x0_prev differs in size from x");
            std::memcpy(x0.mutable_data(), p.data(), sizeof(float) * x.size());
        } else if (order == 2) {
            throw py::value_error("an order-2 step needs x0_prev");
        }
        msld_dpmpp2m_coeffs c{0, 0, order, alpha_t, x_coef, x0_coef, x0_prev_coef};
        msld_status s;
        {
            py::gil_scoped_release rel;
            s = msld_dpmpp2m_step(out.mutable_data(), eps.data(), x0.mutable_data(), (size_t)x.size(), &c, clip);
        }
        check(s, "dpmpp2m_step");
        return py::make_tuple(out, x0);
    }, py::arg("x"), py::arg("eps"), py::arg("x0_prev"), py::arg("order"), py::arg("alpha_t"), py::arg("x_coef"),
       py::arg("x0_coef"), py::arg("x0_prev_coef"), py::arg("clip") = 0.0f,
       "One fused DPM-Solver++(2M) update; returns (x_next, x0_pred) (x0_pred: the next step's x0_prev).");

    m.def("ddim_step", [](farray x, farray eps, double alpha_t, double alpha_prev, float eta,
                          py::object noise, float clip) {
        if (x.size() != eps.size()) throw py::value_error("x and eps differ in size");
        py::array_t<float> out(x.request().shape);
        py::array_t<float> x0(x.request().shape);
        std::memcpy(out.mutable_data(), x.data(), sizeof(float) * x.size());
        const float* np = nullptr;
        farray na;
        if (!noise.is_none()) {
            na = noise.cast<farray>();
            if (na.size() != x.size()) throw py::value_error("noise differs in size from x");
            np = na.data();
        }
        msld_ddim_coeffs c{0, 0, alpha_t, alpha_prev};
        msld_status s;
        {
            py::gil_scoped_release rel;
            s = msld_ddim_step(out.mutable_data(), eps.data(), np, (size_t)x.size(), &c, eta, clip, x0.mutable_data());
        }
        check(s, "ddim_step");
        return py::make_tuple(out, x0);
    }, py::arg("x"), py::arg("eps"), py::arg("alpha_t"), py::arg("alpha_prev"), py::arg("eta") = 0.0f,
       py::arg("noise") = py::none(), py::arg("clip") = 0.0f,
       "One fused DDIM update; returns (x_prev, x0_pred).");

    m.def("gaussian", [](uint64_t seed, int hyp_begin, int n_hyp, int64_t elems, uint32_t stream) {
        py::array_t<float> out({(py::ssize_t)n_hyp, (py::ssize_t)elems});
        msld_status s;
        {
            py::gil_scoped_release rel;
            s = msld_gaussian(seed, hyp_begin, n_hyp, elems, stream, out.mutable_data());
        }
        check(s, "gaussian");
        return out;
    }, py::arg("seed"), py::arg("hyp_begin"), py::arg("n_hyp"), py::arg("elems"), py::arg("stream"),
       "Standard normals keyed by (seed, hypothesis, stream, element): shape (n_hyp, elems).");

    m.def("aggregate", [](farray probs, float threshold) {
        if (probs.ndim() < 2) throw py::value_error("probs must have shape (k, ...) with k >= 1");
        auto shape = probs.request().shape;
        int k = (int)shape[0];
        py::ssize_t n = k ? probs.size() / k : 0;
        std::vector<py::ssize_t> pix(shape.begin() + 1, shape.end());
        py::array_t<bool> masks(shape);
        py::array_t<float> mean(pix), conf(pix);
        py::array_t<bool> cons(pix);
        msld_status s;
        {
            py::gil_scoped_release rel;
            s = msld_aggregate(probs.data(), k, n, threshold, reinterpret_cast<uint8_t*>(masks.mutable_data()),
                               mean.mutable_data(), conf.mutable_data(), reinterpret_cast<uint8_t*>(cons.mutable_data()));
        }
        check(s, "aggregate");
        return py::make_tuple(masks, mean, conf, cons);
    }, py::arg("probs"), py::arg("threshold") = 0.5f,
       "One pass over k hypotheses: (masks, mean probability, confidence, consensus).");

    m.def("ddim_sample", [](py::object denoise, farray alphas_cumprod, int steps, const std::string& spacing,
                            float eta, float clip, uint64_t seed, int k, int n_images,
                            py::array x, py::array eps, py::array t, py::object progress, bool latents_given,
                            const std::string& solver, py::object timesteps) {
        if (k < 1 || n_images < 1) throw py::value_error("k and n_images must be >= 1");
        py::ssize_t batch = (py::ssize_t)k * n_images;
        if (x.size() % batch) throw py::value_error("x size is not a multiple of k * n_images");
        msld_sampler_params p;
        p.num_train_timesteps = (int32_t)alphas_cumprod.size();
        p.alphas_cumprod = alphas_cumprod.data();
        p.steps = steps;
        p.spacing = parse_spacing(spacing);
        p.eta = eta;
        p.clip = clip;
        p.seed = seed;
        p.k = k;
        p.n_images = n_images;
        p.elems = x.size() / batch;
        p.latents_given = latents_given ? 1 : 0;
        if (solver == "ddim") p.solver = MSLD_SOLVER_DDIM;
        else if (solver == "dpmpp2m") p.solver = MSLD_SOLVER_DPMPP2M;
        else throw py::value_error("solver must be 'ddim' or 'dpmpp2m', got '" + solver + "'");
        if (p.solver == MSLD_SOLVER_DPMPP2M && eta != 0.0f) throw py::value_error("dpmpp2m runs with eta 0 only");
        std::vector<int32_t> grid;
        p.timesteps = nullptr;
        if (!timesteps.is_none()) {
            if (p.solver != MSLD_SOLVER_DPMPP2M) throw py::value_error("timesteps: a given grid needs solver 'dpmpp2m'");
            grid = timestep_grid(timesteps, steps);
            p.timesteps = grid.data();
        }
        float* xp = buffer(x, x.size(), "x");
        float* ep = buffer(eps, x.size(), "eps");
        float* tp = buffer(t, batch, "t");
        PyCallbacks cb{denoise, progress, py::none()};
        msld_status s;
        {
            py::gil_scoped_release rel;
            s = msld_ddim_sample(&p, denoise_trampoline, &cb, progress.is_none() ? nullptr : progress_trampoline,
                                 &cb, xp, ep, tp);
        }
        if (!cb.error.is_none()) {
            PyErr_SetObject((PyObject*)Py_TYPE(cb.error.ptr()), cb.error.ptr());
            throw py::error_already_set();
        }
        check(s, "ddim_sample");
    }, py::arg("denoise"), py::arg("alphas_cumprod"), py::arg("steps"), py::arg("spacing"), py::arg("eta"),
       py::arg("clip"), py::arg("seed"), py::arg("k"), py::arg("n_images"), py::arg("x"), py::arg("eps"),
       py::arg("t"), py::arg("progress") = py::none(), py::arg("latents_given") = false,
       py::arg("solver") = "ddim", py::arg("timesteps") = py::none(),
       "Run the whole sampling loop (solver 'ddim' or 'dpmpp2m'; `timesteps`: dpmpp2m's grid, default the spacing's). `denoise()` is called once per step and must read the bound\n"
       "buffers x (latents) and t (timesteps) and write eps; x holds the final latents.\n"
       "latents_given=True: x already holds the initial latents (no noise is drawn for them).");
}
