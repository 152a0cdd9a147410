// bindings_cuda.cpp - the CUDA entry points of msld_cuda.h in the module msld_sdk._native.
//
// Device buffers and streams cross the boundary as Python ints: a pointer is e.g. torch's
// `tensor.data_ptr()` and a stream `torch.cuda.current_stream().cuda_stream` (0 = the legacy
// default stream). Nothing here touches the CUDA driver at import time, so the module imports on
// a machine without a GPU; cuda_device_count() then returns 0. The functions only enqueue work on
// the given stream (no synchronisation), so they may run inside torch.cuda.graph capture.
// The caller owns the buffers: their sizes and dtypes (float32, uint8/bool, uint64/int64 seed)
// are not checked here.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "msld_cuda.h"
#include "py_status.h"

namespace py = pybind11;

namespace {

using msld_py::check;

template <class T>
T* ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

void* stream_of(std::uintptr_t s) { return reinterpret_cast<void*>(s); }

}  // namespace

void register_cuda(py::module_& m) {
    m.def("cuda_device_count", []() {
        int32_t n = 0;
        check(msld_cuda_device_count(&n), "cuda_device_count");
        return n;
    }, "Number of CUDA devices visible to the native kernels; 0 without a driver or GPU.");

    m.def("cuda_gaussian", [](uint64_t seed, int32_t hyp_begin, int32_t n_hyp, int64_t elems, uint32_t stream_id,
                              std::uintptr_t out, std::uintptr_t cuda_stream) {
        msld_status s;
        {
            py::gil_scoped_release rel;
            s = msld_cuda_gaussian(seed, hyp_begin, n_hyp, elems, stream_id, ptr<float>(out), stream_of(cuda_stream));
        }
        check(s, "cuda_gaussian");
    }, py::arg("seed"), py::arg("hyp_begin"), py::arg("n_hyp"), py::arg("elems"), py::arg("stream"),
       py::arg("out"), py::arg("cuda_stream") = 0,
       "As gaussian(), into the float32 device buffer `out` (n_hyp * elems), enqueued on `cuda_stream`.");

    m.def("cuda_gaussian_dev", [](std::uintptr_t seed_dev, int32_t hyp_begin, int32_t n_hyp, int32_t n_images,
                                  int64_t elems, uint32_t stream_id, std::uintptr_t out, std::uintptr_t cuda_stream) {
        msld_status s;
        {
            py::gil_scoped_release rel;
            s = msld_cuda_gaussian_dev(ptr<const uint64_t>(seed_dev), hyp_begin, n_hyp, n_images, elems, stream_id,
                                       ptr<float>(out), stream_of(cuda_stream));
        }
        check(s, "cuda_gaussian_dev");
    }, py::arg("seed_ptr"), py::arg("hyp_begin"), py::arg("n_hyp"), py::arg("n_images"), py::arg("elems"),
       py::arg("stream"), py::arg("out"), py::arg("cuda_stream") = 0,
       "As cuda_gaussian with the seed read on the device from a 64-bit word at `seed_ptr` when the\n"
       "kernel runs (CUDA graphs), written to each of n_images images: out is (n_images, n_hyp, elems).");

    m.def("cuda_ddim_step", [](std::uintptr_t x, std::uintptr_t eps, std::uintptr_t noise, std::size_t n,
                               double alpha_t, double alpha_prev, float eta, float clip, std::uintptr_t cuda_stream) {
        msld_ddim_coeffs c{0, 0, alpha_t, alpha_prev};
        msld_status s;
        {
            py::gil_scoped_release rel;
            s = msld_cuda_ddim_step(ptr<float>(x), ptr<const float>(eps), ptr<const float>(noise), n, &c, eta, clip,
                                    stream_of(cuda_stream));
        }
        check(s, "cuda_ddim_step");
    }, py::arg("x"), py::arg("eps"), py::arg("noise"), py::arg("n"), py::arg("alpha_t"), py::arg("alpha_prev"),
       py::arg("eta") = 0.0f, py::arg("clip") = 0.0f, py::arg("cuda_stream") = 0,
       "As ddim_step(), in place on the float32 device buffer x (n elements); noise = 0 for none.");

    m.def("cuda_ddim_step_noise", [](std::uintptr_t x, std::uintptr_t eps, double alpha_t, double alpha_prev,
                                     float eta, float clip, uint64_t seed, int32_t k, int32_t n_images, int64_t elems,
                                     uint32_t stream_id, std::uintptr_t cuda_stream) {
        msld_ddim_coeffs c{0, 0, alpha_t, alpha_prev};
        msld_status s;
        {
            py::gil_scoped_release rel;
            s = msld_cuda_ddim_step_noise(ptr<float>(x), ptr<const float>(eps), &c, eta, clip, seed, k, n_images,
                                          elems, stream_id, stream_of(cuda_stream));
        }
        check(s, "cuda_ddim_step_noise");
    }, py::arg("x"), py::arg("eps"), py::arg("alpha_t"), py::arg("alpha_prev"), py::arg("eta"), py::arg("clip"),
       py::arg("seed"), py::arg("k"), py::arg("n_images"), py::arg("elems"), py::arg("stream"),
       py::arg("cuda_stream") = 0,
       "DDIM step over x (n_images, k, elems) with the noise of Philox stream `stream` (step s: s + 1)\n"
       "generated in the kernel; equals cuda_gaussian per image + cuda_ddim_step.");

    m.def("cuda_ddim_step_noise_dev", [](std::uintptr_t x, std::uintptr_t eps, double alpha_t, double alpha_prev,
                                         float eta, float clip, std::uintptr_t seed_dev, int32_t k, int32_t n_images,
                                         int64_t elems, uint32_t stream_id, std::uintptr_t cuda_stream) {
        msld_ddim_coeffs c{0, 0, alpha_t, alpha_prev};
        msld_status s;
        {
            py::gil_scoped_release rel;
            s = msld_cuda_ddim_step_noise_dev(ptr<float>(x), ptr<const float>(eps), &c, eta, clip,
                                              ptr<const uint64_t>(seed_dev), k, n_images, elems, stream_id,
                                              stream_of(cuda_stream));
        }
        check(s, "cuda_ddim_step_noise_dev");
    }, py::arg("x"), py::arg("eps"), py::arg("alpha_t"), py::arg("alpha_prev"), py::arg("eta"), py::arg("clip"),
       py::arg("seed_ptr"), py::arg("k"), py::arg("n_images"), py::arg("elems"), py::arg("stream"),
       py::arg("cuda_stream") = 0,
       "As cuda_ddim_step_noise with the seed read on the device from `seed_ptr` (CUDA graphs).");

    m.def("cuda_dpmpp2m_step", [](std::uintptr_t x, std::uintptr_t eps, std::uintptr_t x0_prev, std::size_t n,
                                  int32_t order, double alpha_t, double x_coef, double x0_coef, double x0_prev_coef,
                                  float clip, std::uintptr_t cuda_stream) {
        msld_dpmpp2m_coeffs c{0, 0, order, alpha_t, x_coef, x0_coef, x0_prev_coef};
        msld_status s;
        {
            py::gil_scoped_release rel;
            s = msld_cuda_dpmpp2m_step(ptr<float>(x), ptr<const float>(eps), ptr<float>(x0_prev), n, &c, clip,
                                       stream_of(cuda_stream));
        }
        check(s, "cuda_dpmpp2m_step");
    }, py::arg("x"), py::arg("eps"), py::arg("x0_prev"), py::arg("n"), py::arg("order"), py::arg("alpha_t"),
       py::arg("x_coef"), py::arg("x0_coef"), py::arg("x0_prev_coef"), py::arg("clip") = 0.0f,
       py::arg("cuda_stream") = 0,
       "As dpmpp2m_step(), in place on the float32 device buffers x and x0_prev (n elements each;\n"
       "x0_prev = 0 for none at order 1): x gets x_next, x0_prev this step's x0.");

    m.def("cuda_aggregate", [](std::uintptr_t probs, int32_t k, int64_t n_pix, float threshold, std::uintptr_t masks,
                               std::uintptr_t mean, std::uintptr_t conf, std::uintptr_t consensus,
                               std::uintptr_t cuda_stream) {
        msld_status s;
        {
            py::gil_scoped_release rel;
            s = msld_cuda_aggregate(ptr<const float>(probs), k, n_pix, threshold, ptr<uint8_t>(masks), ptr<float>(mean),
                                    ptr<float>(conf), ptr<uint8_t>(consensus), stream_of(cuda_stream));
        }
        check(s, "cuda_aggregate");
    }, py::arg("probs"), py::arg("k"), py::arg("n_pix"), py::arg("threshold"), py::arg("masks"), py::arg("mean"),
       py::arg("conf"), py::arg("consensus"), py::arg("cuda_stream") = 0,
       "As aggregate() for one image: probs (k, n_pix) float32 -> masks (k, n_pix) uint8/bool (0: none),\n"
       "mean and conf (n_pix) float32, consensus (n_pix) uint8/bool (0: none).");
}
