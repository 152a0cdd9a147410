// py_status.h - msld_status -> Python exception, shared by the pybind11 translation units.
#pragma once

#include <pybind11/pybind11.h>

#include <new>
#include <stdexcept>
#include <string>

#include "msld.h"

namespace msld_py {

// Argument problems become ValueError; everything else (CUDA failures, callbacks) RuntimeError.
inline void check(msld_status s, const char* what) {
    if (s == MSLD_OK) return;
    if (s == MSLD_ERR_OUT_OF_MEMORY) throw std::bad_alloc();   // MemoryError in Python
    std::string msg = std::string(what) + ": " + msld_status_string(s);
    if (s == MSLD_ERR_INVALID_ARG || s == MSLD_ERR_NULL_POINTER) throw pybind11::value_error(msg);
    throw std::runtime_error(msg);
}

}  // namespace msld_py
